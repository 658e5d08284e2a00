"""U-Net with a ResNet-34-style encoder, in plain torch (no torchvision, no pretrained weights).

Encoder: He, Zhang, Ren and Sun, "Deep Residual Learning for Image Recognition", CVPR 2016
(arXiv:1512.03385), BasicBlock layers [3, 4, 6, 3]. Decoder: the U-Net decoder of
Ronneberger et al., MICCAI 2015 (arXiv:1505.04597), the one shared by every encoder
(:class:`busseg.models.decoder.UNetDecoder`), as in the "ResNet-UNet" models of
segmentation_models.pytorch.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from .base import DepthEncoderUNet, Encoder
from .layers import ConvBlock, make_norm

__all__ = ["BasicBlock", "ResNet34Encoder", "ResNetUNet"]

LAYERS = (3, 4, 6, 3)
MAX_DEPTH = 5


class BasicBlock(nn.Module):
    """ResNet basic block: 3x3 conv, norm, ReLU, 3x3 conv, norm, plus shortcut, ReLU.

    He et al., CVPR 2016. Maps (N, in_channels, H, W) to
    (N, out_channels, H / stride, W / stride); the shortcut is a strided 1x1 conv + norm
    when the shape changes (option B of the paper), else the identity.
    """

    def __init__(
        self, in_channels: int, out_channels: int, stride: int = 1, norm: str = "batch"
    ) -> None:
        super().__init__()
        bias = norm == "none"
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=bias)
        self.norm1 = make_norm(norm, out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=bias)
        self.norm2 = make_norm(norm, out_channels)
        self.relu = nn.ReLU(inplace=True)
        if stride != 1 or in_channels != out_channels:
            self.shortcut: nn.Module = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=bias),
                make_norm(norm, out_channels),
            )
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the residual block."""
        out = self.relu(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


def _layer(in_channels: int, out_channels: int, blocks: int, stride: int, norm: str):
    mods = [BasicBlock(in_channels, out_channels, stride, norm)]
    mods += [BasicBlock(out_channels, out_channels, 1, norm) for _ in range(blocks - 1)]
    return nn.Sequential(*mods)


class ResNet34Encoder(Encoder):
    """A (possibly slimmed) ResNet-34 encoder with a full-resolution feature.

    Stages (scale relative to the input): stem 7x7/2 conv + norm + ReLU (1/2, width
    ``w``); 3x3/2 max-pool + layer1, 3 blocks (1/4, ``w``); layer2, 4 blocks (1/8, ``2w``);
    layer3, 6 blocks (1/16, ``4w``); layer4, 3 blocks (1/32, ``8w``), where
    ``w = base_channels`` (64 gives the original ResNet-34 widths). Only the first ``depth``
    stages are built (``stages``). A light double conv at full resolution (``full_res``,
    width ``max(w // 2, 4)``) provides the finest feature. Features: ``full_res(x)`` and the
    output of each stage, at strides 1, 2, ..., ``2 ** depth``.

    Parameters
    ----------
    in_channels : int, optional
        Input channels.
    base_channels : int, optional
        Stem width ``w``; 64 for the standard ResNet-34.
    depth : int, optional
        Number of stages / down-sampling steps, 1 to 5.
    norm : {"batch", "instance", "none"}, optional
        Normalisation.

    Raises
    ------
    ValueError
        If ``depth`` is outside 1 to 5.
    """

    def __init__(
        self, in_channels: int = 1, base_channels: int = 16, depth: int = 4, norm: str = "batch"
    ) -> None:
        super().__init__()
        if not 1 <= depth <= MAX_DEPTH:
            raise ValueError(
                f"depth must be between 1 and {MAX_DEPTH} for the resnet34 encoder, got {depth}"
            )
        self.in_channels = in_channels
        self.depth = depth
        self.feature_channels, self.feature_strides = self.channels_and_strides(
            {"base_channels": base_channels, "depth": depth})
        w = base_channels
        bias = norm == "none"
        self.full_res = ConvBlock(in_channels, self.feature_channels[0], norm)
        stages: list[nn.Module] = [
            nn.Sequential(
                nn.Conv2d(in_channels, w, 7, 2, 3, bias=bias),
                make_norm(norm, w),
                nn.ReLU(inplace=True),
            ),
            nn.Sequential(nn.MaxPool2d(3, 2, 1), _layer(w, w, LAYERS[0], 1, norm)),
            _layer(w, 2 * w, LAYERS[1], 2, norm),
            _layer(2 * w, 4 * w, LAYERS[2], 2, norm),
            _layer(4 * w, 8 * w, LAYERS[3], 2, norm),
        ]
        self.stages = nn.ModuleList(stages[:depth])

    @classmethod
    def channels_and_strides(cls, config: Mapping[str, Any]
                             ) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Return the feature channels and strides (see :class:`Encoder`).

        Channels ``(max(w // 2, 4), w, w, 2w, 4w, 8w)`` up to ``depth + 1`` entries, strides
        ``2**i``, with ``w = base_channels``.
        """
        w, d = int(config["base_channels"]), int(config["depth"])
        channels = (max(w // 2, 4), w, w, 2 * w, 4 * w, 8 * w)[: d + 1]
        return channels, tuple(2**i for i in range(d + 1))

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Compute the ``depth + 1`` features, finest first (see :meth:`Encoder.features`)."""
        feats = [self.full_res(x)]
        for stage in self.stages:
            x = stage(x)
            feats.append(x)
        return feats

    def input_convs(self) -> list[nn.Conv2d]:
        """Return the two convolutions that see the input (full-resolution block and stem)."""
        return [self.full_res[0], self.stages[0][0]]


class ResNetUNet(DepthEncoderUNet, ResNet34Encoder):
    """U-Net whose encoder is a (possibly slimmed) ResNet-34, producing per-pixel logits.

    The :class:`ResNet34Encoder` (``w = base_channels``; the width multiplier of ResNet-34
    is ``base_channels / 64``), optional dropout on the deepest feature, the shared
    :class:`~busseg.models.decoder.UNetDecoder` mirroring the encoder widths down to full
    resolution, and a 1x1 output convolution. ``forward`` returns logits (no sigmoid).
    Weights are initialised from scratch (He init); no ImageNet weights are used.

    Parameters
    ----------
    in_channels : int, optional
        Input channels (1 for grey ultrasound; more adds prompt-guidance channels, whose
        input-convolution weights start at zero).
    out_channels : int, optional
        Output channels.
    base_channels : int, optional
        Stem width ``w``; 64 for the standard ResNet-34.
    depth : int, optional
        Number of encoder stages / down-sampling steps, 1 to 5. Inputs must have H, W
        multiples of ``2 ** depth``.
    norm : {"batch", "instance", "none"}, optional
        Normalisation in encoder and decoder.
    dropout : float, optional
        :class:`torch.nn.Dropout2d` probability on the deepest encoder feature, in [0, 1).
    upsample : {"transpose", "bilinear"}, optional
        Decoder upsampling.
    """
