"""Classic U-Net and the building blocks shared with the ResNet-encoder variant.

Ronneberger, Fischer and Brox, "U-Net: Convolutional Networks for Biomedical Image
Segmentation", MICCAI 2015, arXiv:1505.04597. Unlike the paper, convolutions are padded
("same") so the output has the input's size, and each convolution is followed by a
normalisation layer (BatchNorm by default; Ioffe and Szegedy, ICML 2015).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["ConvBlock", "UNet", "UpBlock", "check_input", "init_weights", "make_norm"]

NORMS = ("batch", "instance", "none")
UPSAMPLES = ("transpose", "bilinear")


def make_norm(norm: str, channels: int) -> nn.Module:
    """Build a 2-D normalisation layer.

    Parameters
    ----------
    norm : {"batch", "instance", "none"}
        ``"batch"``: :class:`torch.nn.BatchNorm2d`; ``"instance"``: affine
        :class:`torch.nn.InstanceNorm2d`; ``"none"``: identity.
    channels : int
        Number of feature channels (> 0).

    Returns
    -------
    torch.nn.Module

    Raises
    ------
    ValueError
        If ``norm`` is not one of the allowed names.
    """
    if norm == "batch":
        return nn.BatchNorm2d(channels)
    if norm == "instance":
        return nn.InstanceNorm2d(channels, affine=True)
    if norm == "none":
        return nn.Identity()
    raise ValueError(f"norm must be one of {', '.join(map(repr, NORMS))}, got {norm!r}")


class ConvBlock(nn.Sequential):
    """Two (3x3 conv, norm, ReLU) layers: the U-Net "double conv".

    Maps (N, in_channels, H, W) float to (N, out_channels, H, W) float; the spatial size
    is preserved (padding 1).
    """

    def __init__(self, in_channels: int, out_channels: int, norm: str = "batch") -> None:
        bias = norm == "none"
        super().__init__(
            nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=bias),
            make_norm(norm, out_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=bias),
            make_norm(norm, out_channels),
            nn.ReLU(inplace=True),
        )


class UpBlock(nn.Module):
    """Decoder step: upsample x2, concatenate the skip connection, double conv.

    Parameters
    ----------
    in_channels : int
        Channels of the coarser input (N, in_channels, h, w).
    skip_channels : int
        Channels of the skip tensor (N, skip_channels, 2h, 2w); 0 for no skip.
    out_channels : int
        Channels of the output (N, out_channels, 2h, 2w).
    upsample : {"transpose", "bilinear"}
        ``"transpose"``: 2x2 transposed convolution with stride 2 (as in the U-Net paper's
        "up-convolution"); ``"bilinear"``: bilinear interpolation followed by a 1x1 conv.
    norm : {"batch", "instance", "none"}
        Normalisation in the double conv.
    """

    def __init__(
        self,
        in_channels: int,
        skip_channels: int,
        out_channels: int,
        upsample: str = "transpose",
        norm: str = "batch",
    ) -> None:
        super().__init__()
        if upsample == "transpose":
            self.up: nn.Module = nn.ConvTranspose2d(in_channels, out_channels, 2, stride=2)
        elif upsample == "bilinear":
            self.up = nn.Sequential(
                nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
                nn.Conv2d(in_channels, out_channels, 1),
            )
        else:
            raise ValueError(
                f"upsample must be one of {', '.join(map(repr, UPSAMPLES))}, got {upsample!r}"
            )
        self.conv = ConvBlock(out_channels + skip_channels, out_channels, norm)

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        """Upsample ``x`` by 2, concatenate ``skip`` on channels and apply the double conv."""
        x = self.up(x)
        if skip is not None:
            x = torch.cat([skip, x], dim=1)
        return self.conv(x)


def init_weights(module: nn.Module) -> None:
    """Initialise convolutions with He (Kaiming) normal init and norms with (1, 0).

    He, Zhang, Ren and Sun, "Delving Deep into Rectifiers", ICCV 2015.

    Parameters
    ----------
    module : torch.nn.Module
        Module whose sub-modules are initialised in place.
    """
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.InstanceNorm2d)) and m.affine:
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def check_input(x: torch.Tensor, in_channels: int, multiple: int) -> None:
    """Validate a network input tensor.

    Parameters
    ----------
    x : torch.Tensor
        Expected shape (N, in_channels, H, W), floating point.
    in_channels : int
        Expected number of channels.
    multiple : int
        H and W must be multiples of this (``2 ** depth``).

    Raises
    ------
    ValueError
        If ``x`` is not 4-D, has the wrong number of channels, or H or W is not a multiple of
        ``multiple``; the message says how to fix it (pad, e.g. as ``busseg.inference`` does).
    """
    if x.ndim != 4:
        raise ValueError(
            f"expected a 4-D input (N, {in_channels}, H, W), got shape {tuple(x.shape)}"
        )
    if x.shape[1] != in_channels:
        hint = "; convert the image to grey first" if in_channels == 1 else ""
        raise ValueError(
            f"expected {in_channels} input channel(s), got {x.shape[1]} "
            f"(input shape {tuple(x.shape)}){hint}"
        )
    h, w = int(x.shape[-2]), int(x.shape[-1])
    if h % multiple or w % multiple:
        new_h = -(-h // multiple) * multiple
        new_w = -(-w // multiple) * multiple
        raise ValueError(
            f"input height and width must be multiples of {multiple} for this model, "
            f"got {h}x{w}; pad the input to {new_h}x{new_w} "
            f"(busseg.inference pads automatically)"
        )


class UNet(nn.Module):
    """Classic U-Net producing per-pixel logits.

    Ronneberger et al., MICCAI 2015, arXiv:1505.04597. Encoder: ``depth`` steps of double
    conv (3x3 conv + norm + ReLU, twice) followed by 2x2 max-pooling, widths
    ``base_channels * 2**i``; a double-conv bottleneck of width ``base_channels * 2**depth``
    (optionally followed by dropout); a symmetric decoder of upsampling + skip concatenation
    + double conv; and a 1x1 output convolution. ``forward`` returns logits (no sigmoid).

    Parameters
    ----------
    in_channels : int, optional
        Input channels (1 for grey ultrasound).
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

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 1,
        base_channels: int = 16,
        depth: int = 4,
        norm: str = "batch",
        dropout: float = 0.0,
        upsample: str = "transpose",
    ) -> None:
        super().__init__()
        if not 1 <= depth <= 7:
            raise ValueError(f"depth must be between 1 and 7, got {depth}")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.depth = depth
        self.required_multiple = 2**depth
        widths = [base_channels * 2**i for i in range(depth + 1)]

        self.encoders = nn.ModuleList()
        prev = in_channels
        for w in widths[:-1]:
            self.encoders.append(ConvBlock(prev, w, norm))
            prev = w
        self.pool = nn.MaxPool2d(2)
        self.bottleneck = ConvBlock(widths[-2], widths[-1], norm)
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.decoders = nn.ModuleList(
            UpBlock(widths[i + 1], widths[i], widths[i], upsample, norm)
            for i in reversed(range(depth))
        )
        self.head = nn.Conv2d(widths[0], out_channels, 1)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Compute logits.

        Parameters
        ----------
        x : torch.Tensor
            (N, in_channels, H, W) float, H and W multiples of ``2 ** depth``.

        Returns
        -------
        torch.Tensor
            (N, out_channels, H, W) float logits.

        Raises
        ------
        ValueError
            If the shape is wrong (see :func:`check_input`).
        """
        check_input(x, self.in_channels, self.required_multiple)
        skips = []
        for enc in self.encoders:
            x = enc(x)
            skips.append(x)
            x = self.pool(x)
        x = self.dropout(self.bottleneck(x))
        for dec, skip in zip(self.decoders, reversed(skips), strict=True):
            x = dec(x, skip)
        return self.head(x)
