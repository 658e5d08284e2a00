"""Building blocks shared by every encoder and the U-Net decoder.

Normalisation, the U-Net "double conv" and decoder step of Ronneberger, Fischer and Brox,
"U-Net: Convolutional Networks for Biomedical Image Segmentation", MICCAI 2015
(arXiv:1505.04597), He initialisation, and the input check every model runs first.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = [
    "NORMS",
    "UPSAMPLES",
    "ConvBlock",
    "UpBlock",
    "check_input",
    "init_weights",
    "make_norm",
]

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
