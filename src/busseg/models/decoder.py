"""The one U-Net decoder used by every encoder, and the image-level class head.

Decoder: Ronneberger, Fischer and Brox, "U-Net: Convolutional Networks for Biomedical Image
Segmentation", MICCAI 2015 (arXiv:1505.04597): from the deepest encoder feature, repeated
x2 upsampling, concatenation of the encoder feature at that scale (the skip connection) and a
double conv, down to the input's scale; as the "Unet" decoder of segmentation_models.pytorch,
which serves every encoder of its registry.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .layers import UpBlock

__all__ = ["ClassHead", "UNetDecoder"]


class UNetDecoder(nn.ModuleList):
    """U-Net decoder over the features of any encoder, from the deepest up to stride 1.

    One :class:`~busseg.models.layers.UpBlock` (x2 upsampling, skip concatenation, double
    conv) per halving of the stride, deepest first: ``self[0]`` upsamples the deepest feature.
    A step whose target stride has no encoder feature (the EfficientNet encoder has none at
    stride 1) upsamples without a skip. The module is a :class:`torch.nn.ModuleList` of the
    steps, so its state-dict keys are ``<name>.<step>.up.*`` and ``<name>.<step>.conv.*``.

    Parameters
    ----------
    encoder_channels : sequence of int
        Channels of the encoder features, finest first (e.g. ``(16, 32, 64, 128, 256)``).
    encoder_strides : sequence of int
        Their strides relative to the input, finest first: powers of two, strictly
        increasing (e.g. ``(1, 2, 4, 8, 16)``).
    decoder_channels : sequence of int or None, optional
        Output channels of each step, deepest step first (one per halving of the deepest
        stride). ``None`` mirrors the encoder: each step has the channels of its skip feature,
        which needs an encoder feature at every stride down to 1.
    upsample : {"transpose", "bilinear"}, optional
        Upsampling of each step.
    norm : {"batch", "instance", "none"}, optional
        Normalisation in each step's double conv.

    Raises
    ------
    ValueError
        If channels and strides differ in length, a stride is not a power of two or the
        strides do not increase, or ``decoder_channels`` has the wrong length (or is needed
        and missing).
    """

    def __init__(
        self,
        encoder_channels: Sequence[int],
        encoder_strides: Sequence[int],
        decoder_channels: Sequence[int] | None = None,
        upsample: str = "transpose",
        norm: str = "batch",
    ) -> None:
        channels, strides = tuple(encoder_channels), tuple(encoder_strides)
        if len(channels) != len(strides) or not channels:
            raise ValueError(f"one stride per encoder feature: got channels {channels}, "
                             f"strides {strides}")
        if any(s < 1 or s & (s - 1) for s in strides) or list(strides) != sorted(set(strides)):
            raise ValueError(f"encoder strides must be increasing powers of two, got {strides}")
        by_stride = {s: i for i, s in enumerate(strides)}
        n_steps = strides[-1].bit_length() - 1
        targets = [strides[-1] >> (j + 1) for j in range(n_steps)]
        skip_index = [by_stride.get(t) for t in targets]
        if decoder_channels is None:
            if None in skip_index:
                raise ValueError("decoder_channels is needed for an encoder without a feature "
                                 f"at every stride (strides {strides})")
            decoder_channels = [channels[i] for i in skip_index]
        outs = tuple(decoder_channels)
        if len(outs) != n_steps:
            raise ValueError(f"decoder_channels needs {n_steps} entries (one per x2 step), "
                             f"got {outs}")
        ins = (channels[-1], *outs[:-1])
        skips = [0 if i is None else channels[i] for i in skip_index]
        super().__init__(
            UpBlock(i, s, o, upsample, norm) for i, s, o in zip(ins, skips, outs, strict=True)
        )
        self.skip_index: list[int | None] = skip_index
        self.out_channels = outs[-1] if outs else channels[-1]

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        """Decode encoder features into a full-resolution feature map.

        Parameters
        ----------
        features : sequence of torch.Tensor
            The encoder features, finest first, feature ``i`` of shape
            (N, encoder_channels[i], H / encoder_strides[i], W / encoder_strides[i]), float.

        Returns
        -------
        torch.Tensor
            (N, out_channels, H, W) float, ``out_channels`` the last step's channels.
        """
        y = features[-1]
        for step, i in zip(self, self.skip_index, strict=True):
            y = step(y, None if i is None else features[i])
        return y


class ClassHead(nn.Sequential):
    """Image-level class head: global average pooling, dropout, linear layer.

    Maps the deepest encoder feature (N, in_channels, h, w) float to class logits
    (N, num_classes) float. Its layers are numbered 0 (pooling) to 3 (linear), so the
    state-dict keys are ``<name>.3.weight`` and ``<name>.3.bias``.

    Parameters
    ----------
    in_channels : int
        Channels of the pooled feature.
    num_classes : int
        Outputs (3 for normal, benign, malignant).
    dropout : float, optional
        Dropout probability before the linear layer, in [0, 1).
    """

    def __init__(self, in_channels: int, num_classes: int, dropout: float = 0.0) -> None:
        super().__init__(
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout),
            nn.Linear(in_channels, num_classes),
        )
