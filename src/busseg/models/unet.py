"""Classic U-Net: the plain encoder (double convs and max-pooling) with the shared decoder.

Ronneberger, Fischer and Brox, "U-Net: Convolutional Networks for Biomedical Image
Segmentation", MICCAI 2015, arXiv:1505.04597. Unlike the paper, convolutions are padded
("same") so the output has the input's size, and each convolution is followed by a
normalisation layer (BatchNorm by default; Ioffe and Szegedy, ICML 2015).

The building blocks (:class:`ConvBlock`, :class:`UpBlock`, :func:`make_norm`,
:func:`init_weights`, :func:`check_input`) live in :mod:`busseg.models.layers` and are
re-exported here.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from .base import DepthEncoderUNet, Encoder
from .layers import NORMS, UPSAMPLES, ConvBlock, UpBlock, check_input, init_weights, make_norm

__all__ = [
    "NORMS",
    "UPSAMPLES",
    "ConvBlock",
    "PlainEncoder",
    "UNet",
    "UpBlock",
    "check_input",
    "init_weights",
    "make_norm",
]

MAX_DEPTH = 7


class PlainEncoder(Encoder):
    """The contracting path of the classic U-Net.

    ``depth`` steps of double conv (3x3 conv + norm + ReLU, twice) followed by 2x2
    max-pooling, widths ``base_channels * 2**i``, then a double-conv bottleneck of width
    ``base_channels * 2**depth``. Features: the output of each double conv before pooling
    (strides 1, 2, ..., ``2 ** (depth - 1)``) and the bottleneck (stride ``2 ** depth``).
    Layers: ``encoders`` (a ModuleList of :class:`ConvBlock`), ``pool``, ``bottleneck``.

    Parameters
    ----------
    in_channels : int, optional
        Input channels.
    base_channels : int, optional
        Width of the first level; doubled at each level.
    depth : int, optional
        Number of down-sampling steps, 1 to 7.
    norm : {"batch", "instance", "none"}, optional
        Normalisation after each convolution.

    Raises
    ------
    ValueError
        If ``depth`` is outside 1 to 7.
    """

    def __init__(
        self, in_channels: int = 1, base_channels: int = 16, depth: int = 4, norm: str = "batch"
    ) -> None:
        super().__init__()
        if not 1 <= depth <= MAX_DEPTH:
            raise ValueError(f"depth must be between 1 and {MAX_DEPTH}, got {depth}")
        self.in_channels = in_channels
        self.depth = depth
        self.feature_channels, self.feature_strides = self.channels_and_strides(
            {"base_channels": base_channels, "depth": depth})
        widths = self.feature_channels
        self.encoders = nn.ModuleList()
        prev = in_channels
        for w in widths[:-1]:
            self.encoders.append(ConvBlock(prev, w, norm))
            prev = w
        self.pool = nn.MaxPool2d(2)
        self.bottleneck = ConvBlock(widths[-2], widths[-1], norm)

    @classmethod
    def channels_and_strides(cls, config: Mapping[str, Any]
                             ) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Return ``(base_channels * 2**i, 2**i)`` for ``i`` in 0..depth (see :class:`Encoder`)."""
        b, d = int(config["base_channels"]), int(config["depth"])
        return tuple(b * 2**i for i in range(d + 1)), tuple(2**i for i in range(d + 1))

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Compute the ``depth + 1`` features, finest first (see :meth:`Encoder.features`)."""
        feats = []
        for enc in self.encoders:
            x = enc(x)
            feats.append(x)
            x = self.pool(x)
        feats.append(self.bottleneck(x))
        return feats

    def input_convs(self) -> list[nn.Conv2d]:
        """Return the first convolution (the only one that sees the input)."""
        return [self.encoders[0][0]]


class UNet(DepthEncoderUNet, PlainEncoder):
    """Classic U-Net producing per-pixel logits.

    Ronneberger et al., MICCAI 2015, arXiv:1505.04597: the :class:`PlainEncoder`, optional
    dropout on the bottleneck, the shared :class:`~busseg.models.decoder.UNetDecoder`
    mirroring the encoder widths (upsampling + skip concatenation + double conv), and a
    1x1 output convolution. ``forward`` returns logits (no sigmoid).

    Parameters
    ----------
    in_channels : int, optional
        Input channels (1 for grey ultrasound; more adds prompt-guidance channels, whose
        first-layer weights start at zero).
    out_channels : int, optional
        Output channels (1 for binary lesion segmentation).
    base_channels : int, optional
        Width of the first level; doubled at each level.
    depth : int, optional
        Number of down-sampling steps (1 to 7). Inputs must have H, W multiples of
        ``2 ** depth``.
    norm : {"batch", "instance", "none"}, optional
        Normalisation after each convolution.
    dropout : float, optional
        Channel dropout probability (:class:`torch.nn.Dropout2d`) after the bottleneck,
        in [0, 1).
    upsample : {"transpose", "bilinear"}, optional
        Decoder upsampling.

    Notes
    -----
    Input: float tensor (N, in_channels, H, W), typically z-scored. Output: float logits
    (N, out_channels, H, W); apply ``torch.sigmoid`` for probabilities in [0, 1].
    """
