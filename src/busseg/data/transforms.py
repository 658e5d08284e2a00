"""Preprocessing and ultrasound-suited augmentation on torch tensors.

Preprocessing (shared by training and inference): grey uint8 -> float in [0, 1] -> resize to
the network input size -> per-image z-score. Augmentation (training only): horizontal flip,
small affine (rotation, scale, shift), brightness / contrast / gamma, and speckle-like
multiplicative noise (fully developed speckle has Rayleigh-distributed amplitude; here a
smoothed gamma-distributed gain field, as in e.g. Goodman, "Speckle Phenomena in Optics", 2007).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F


def resize_image(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize a grey uint8 image with antialiased bilinear interpolation.

    Parameters
    ----------
    image : numpy.ndarray
        (H, W) uint8.
    size : tuple of int
        (height, width) of the output in pixels.

    Returns
    -------
    numpy.ndarray
        (height, width) uint8.
    """
    t = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None, None]
    out = F.interpolate(t, size=tuple(size), mode="bilinear", align_corners=False, antialias=True)
    return out[0, 0].round().clamp(0, 255).to(torch.uint8).numpy()


def resize_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize a binary mask (bilinear on 0/1, then threshold at 0.5).

    Parameters
    ----------
    mask : numpy.ndarray
        (H, W) bool or any array where > 0 is lesion.
    size : tuple of int
        (height, width) in pixels.

    Returns
    -------
    numpy.ndarray
        (height, width) bool.
    """
    t = torch.from_numpy((np.asarray(mask) > 0).astype(np.float32))[None, None]
    out = F.interpolate(t, size=tuple(size), mode="bilinear", align_corners=False, antialias=True)
    return (out[0, 0] >= 0.5).numpy()


def normalize(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Per-image z-score: subtract the mean and divide by the standard deviation.

    Parameters
    ----------
    x : torch.Tensor
        (..., H, W) float; statistics are taken over the last two dimensions.
    eps : float
        Images whose standard deviation is at most ``eps`` (constant images) give exact
        zeros rather than NaN or amplified rounding noise.

    Returns
    -------
    torch.Tensor
        Same shape, zero mean and unit variance per image (zeros for constant images).
    """
    mean = x.mean(dim=(-2, -1), keepdim=True)
    std = x.std(dim=(-2, -1), keepdim=True)
    # (x - mean) of a constant image is rounding noise, not signal: give exact zeros
    return torch.where(std > eps, (x - mean) / std.clamp_min(eps), torch.zeros_like(x))


@dataclass
class Augment:
    """Random augmentation of one (image, mask) pair; all probabilities in [0, 1].

    Attributes
    ----------
    hflip : float
        Probability of a left-right flip (anatomically plausible in breast ultrasound).
    vflip : float
        Probability of an up-down flip (off by default: the skin line is always on top).
    affine : float
        Probability of a random affine with the ranges below.
    rotate_deg, scale, shift : float
        Rotation in degrees (+/-), relative scale (+/-), shift as a share of the size (+/-).
    intensity : float
        Probability of a random brightness, contrast and gamma change.
    brightness, contrast, gamma : float
        Additive brightness (+/-, on [0, 1] images), relative contrast (+/-), log-gamma (+/-).
    speckle : float
        Probability of multiplicative speckle-like noise.
    speckle_strength : float
        Standard deviation of the multiplicative gain.
    blur : float
        Probability of a Gaussian blur of standard deviation uniform in (0, ``blur_sigma``]
        pixels (softer transducers and lower frequencies at other sites).
    blur_sigma : float
        Largest blur standard deviation in pixels.
    lowres : float
        Probability of down-sampling by a factor uniform in [1.5, ``lowres_factor``] and
        up-sampling back (coarser scanners and re-scaled exports).
    lowres_factor : float
        Largest down-sampling factor (>= 1.5).
    """

    hflip: float = 0.5
    vflip: float = 0.0
    affine: float = 0.7
    rotate_deg: float = 12.0
    scale: float = 0.15
    shift: float = 0.08
    intensity: float = 0.8
    brightness: float = 0.1
    contrast: float = 0.25
    gamma: float = 0.3
    speckle: float = 0.3
    speckle_strength: float = 0.15
    blur: float = 0.0
    blur_sigma: float = 1.5
    lowres: float = 0.0
    lowres_factor: float = 2.5

    @classmethod
    def scanner(cls) -> Augment:
        """Stronger appearance changes that mimic other scanners and sites.

        Wider gamma, contrast and speckle ranges plus blur and low-resolution re-sampling;
        used for the default model so that its class head and masks hold at other
        hospitals (domain randomisation, Tobin et al., IROS 2017).
        """
        return cls(intensity=0.9, contrast=0.4, gamma=0.5, brightness=0.12, speckle=0.4,
                   speckle_strength=0.25, blur=0.25, lowres=0.25)

    def to_dict(self) -> dict:
        """Return the settings as a JSON-serialisable dict."""
        return asdict(self)

    def __call__(
        self, image: torch.Tensor, mask: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Augment one pair.

        Parameters
        ----------
        image : torch.Tensor
            (1, H, W) float32 in [0, 1].
        mask : torch.Tensor
            (1, H, W) float32 in {0, 1}.
        generator : torch.Generator, optional
            Source of randomness (for reproducibility).

        Returns
        -------
        image, mask : torch.Tensor
            Same shapes; image clipped to [0, 1], mask in {0, 1}.
        """
        g = generator

        def rnd() -> float:
            return float(torch.rand((), generator=g))

        def uni(a: float) -> float:
            return (2.0 * rnd() - 1.0) * a

        if rnd() < self.hflip:
            image, mask = image.flip(-1), mask.flip(-1)
        if rnd() < self.vflip:
            image, mask = image.flip(-2), mask.flip(-2)
        if rnd() < self.affine:
            ang = math.radians(uni(self.rotate_deg))
            s = 1.0 + uni(self.scale)
            tx, ty = uni(self.shift) * 2, uni(self.shift) * 2
            cos, sin = math.cos(ang) / s, math.sin(ang) / s
            theta = torch.tensor([[cos, -sin, tx], [sin, cos, ty]], dtype=torch.float32)[None]
            grid = F.affine_grid(theta, [1, 1, *image.shape[-2:]], align_corners=False)
            image = F.grid_sample(image[None], grid, mode="bilinear", padding_mode="zeros",
                                  align_corners=False)[0]
            mask = (F.grid_sample(mask[None], grid, mode="bilinear", padding_mode="zeros",
                                  align_corners=False)[0] >= 0.5).float()
        if rnd() < self.intensity:
            gamma = math.exp(uni(self.gamma))
            image = image.clamp(0, 1) ** gamma
            mean = image.mean()
            image = (image - mean) * (1.0 + uni(self.contrast)) + mean + uni(self.brightness)
        if rnd() < self.speckle:
            h, w = image.shape[-2:]
            noise = torch.randn((1, 1, max(h // 2, 1), max(w // 2, 1)), generator=g)
            noise = F.interpolate(noise, size=(h, w), mode="bilinear", align_corners=False)[0]
            image = image * (1.0 + self.speckle_strength * noise)
        if rnd() < self.blur:
            sigma = max(rnd() * self.blur_sigma, 0.3)
            radius = max(1, int(math.ceil(2.5 * sigma)))
            k = torch.exp(-0.5 * (torch.arange(-radius, radius + 1.0) / sigma) ** 2)
            k = (k / k.sum()).to(image)
            img = F.pad(image[None], (radius, radius, radius, radius), mode="replicate")
            img = F.conv2d(img, k.view(1, 1, 1, -1))
            image = F.conv2d(img, k.view(1, 1, -1, 1))[0]
        if rnd() < self.lowres:
            h, w = image.shape[-2:]
            f = 1.5 + rnd() * max(self.lowres_factor - 1.5, 0.0)
            small = F.interpolate(image[None], size=(max(int(h / f), 1), max(int(w / f), 1)),
                                  mode="bilinear", align_corners=False, antialias=True)
            image = F.interpolate(small, size=(h, w), mode="bilinear", align_corners=False)[0]
        return image.clamp(0, 1), mask
