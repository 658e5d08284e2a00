"""Segmentation losses on logits: soft Dice, BCE + Dice, focal + Dice.

All losses take ``logits`` (N, 1, H, W) float (before the sigmoid) and ``targets``
(N, 1, H, W) with values in {0, 1} (float, int or bool), and return a scalar tensor.
They are computed in float32 even under mixed precision. Images with an empty target
(BUSI "normal" images) give finite losses that are small when the prediction is empty.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["BCEDiceLoss", "DiceLoss", "FocalDiceLoss", "LOSSES", "build_loss", "focal_loss"]


def _check(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(logits, torch.Tensor) or not isinstance(targets, torch.Tensor):
        raise ValueError("logits and targets must be torch tensors")
    if logits.ndim != 4:
        raise ValueError(f"logits must have shape (N, 1, H, W), got {tuple(logits.shape)}")
    if logits.shape != targets.shape:
        raise ValueError(
            f"logits and targets must have the same shape, got {tuple(logits.shape)} and "
            f"{tuple(targets.shape)}"
        )
    if not logits.is_floating_point():
        raise ValueError(f"logits must be a floating-point tensor, got {logits.dtype}")
    return logits.float(), targets.to(dtype=torch.float32)


def soft_dice_per_image(
    logits: torch.Tensor, targets: torch.Tensor, smooth: float = 1.0
) -> torch.Tensor:
    """Soft Dice coefficient of ``sigmoid(logits)`` against ``targets``, per image.

    Milletari, Navab and Ahmadi, "V-Net", 3DV 2016 (arXiv:1606.04797), with the additive
    smoothing term of common practice: ``(2 sum(p t) + s) / (sum(p) + sum(t) + s)``.

    Parameters
    ----------
    logits : torch.Tensor
        (N, 1, H, W) float logits.
    targets : torch.Tensor
        (N, 1, H, W) in {0, 1}.
    smooth : float, optional
        Smoothing ``s`` > 0; makes an empty prediction of an empty target score 1.

    Returns
    -------
    torch.Tensor
        (N,) float32 in (0, 1].

    Raises
    ------
    ValueError
        If the shapes differ or are not 4-D, or ``logits`` is not floating point.
    """
    logits, targets = _check(logits, targets)
    probs = torch.sigmoid(logits).flatten(1)
    targets = targets.flatten(1)
    inter = (probs * targets).sum(dim=1)
    denom = probs.sum(dim=1) + targets.sum(dim=1)
    return (2.0 * inter + smooth) / (denom + smooth)


def focal_loss(
    logits: torch.Tensor, targets: torch.Tensor, gamma: float = 2.0, alpha: float = 0.25
) -> torch.Tensor:
    """Binary focal loss, averaged over all pixels.

    Lin, Goyal, Girshick, He and Dollar, "Focal Loss for Dense Object Detection", ICCV 2017
    (arXiv:1708.02002): ``-alpha_t (1 - p_t)**gamma log(p_t)``.

    Parameters
    ----------
    logits, targets : torch.Tensor
        (N, 1, H, W) float logits and their {0, 1} targets.
    gamma : float, optional
        Focusing parameter >= 0 (0 gives alpha-weighted BCE).
    alpha : float, optional
        Weight of the positive class in [0, 1]; negatives get ``1 - alpha``. A negative
        value disables the weighting.

    Returns
    -------
    torch.Tensor
        Scalar float32 >= 0.

    Raises
    ------
    ValueError
        If the shapes differ or are not 4-D, or ``logits`` is not floating point.
    """
    logits, targets = _check(logits, targets)
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p = torch.sigmoid(logits)
    p_t = p * targets + (1 - p) * (1 - targets)
    loss = ce * (1 - p_t).pow(gamma)
    if alpha >= 0:
        loss = loss * (alpha * targets + (1 - alpha) * (1 - targets))
    return loss.mean()


class DiceLoss(nn.Module):
    """Soft Dice loss: ``1 - mean over images of the soft Dice`` of ``sigmoid(logits)``.

    Milletari et al., 3DV 2016 (V-Net). The Dice is computed per image, then averaged over
    the batch, so small lesions count as much as large ones.

    Parameters
    ----------
    smooth : float, optional
        Additive smoothing (> 0) in numerator and denominator; with the default 1.0 an
        image with an empty target scores about ``1 / (1 + sum(p))``, so the loss pushes its
        prediction towards empty and stays finite.

    Notes
    -----
    ``forward(logits, targets)``: logits (N, 1, H, W) float, targets (N, 1, H, W) in
    {0, 1}; returns a scalar float32 in [0, 1). Raises ``ValueError`` on shape mismatch.
    """

    def __init__(self, smooth: float = 1.0) -> None:
        super().__init__()
        if smooth <= 0:
            raise ValueError(f"smooth must be > 0, got {smooth}")
        self.smooth = float(smooth)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Return the scalar Dice loss (see the class docstring)."""
        return 1.0 - soft_dice_per_image(logits, targets, self.smooth).mean()


class BCEDiceLoss(nn.Module):
    """Weighted sum of binary cross-entropy (on logits) and soft Dice loss; the default loss.

    Parameters
    ----------
    bce_weight : float, optional
        Weight of the pixel-mean BCE term (>= 0).
    dice_weight : float, optional
        Weight of the Dice term (>= 0), see :class:`DiceLoss`.
    smooth : float, optional
        Dice smoothing.
    pos_weight : float or None, optional
        Optional weight of positive pixels in BCE (``pos_weight`` of
        :func:`torch.nn.functional.binary_cross_entropy_with_logits`).

    Notes
    -----
    ``forward(logits, targets)``: logits (N, 1, H, W) float, targets (N, 1, H, W) in
    {0, 1}; returns a scalar float32 >= 0.
    """

    def __init__(
        self,
        bce_weight: float = 1.0,
        dice_weight: float = 1.0,
        smooth: float = 1.0,
        pos_weight: float | None = None,
    ) -> None:
        super().__init__()
        if bce_weight < 0 or dice_weight < 0:
            raise ValueError("bce_weight and dice_weight must be >= 0")
        self.bce_weight = float(bce_weight)
        self.dice_weight = float(dice_weight)
        self.pos_weight = None if pos_weight is None else float(pos_weight)
        self.dice = DiceLoss(smooth)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Return ``bce_weight * BCE + dice_weight * Dice loss``."""
        x, t = _check(logits, targets)
        pw = None
        if self.pos_weight is not None:
            pw = torch.tensor(self.pos_weight, device=x.device, dtype=x.dtype)
        bce = F.binary_cross_entropy_with_logits(x, t, pos_weight=pw)
        return self.bce_weight * bce + self.dice_weight * self.dice(x, t)


class FocalDiceLoss(nn.Module):
    """Weighted sum of binary focal loss and soft Dice loss.

    Focal loss: Lin et al., ICCV 2017 (gamma 2, alpha 0.25); Dice: Milletari et al., 3DV 2016.

    Parameters
    ----------
    gamma : float, optional
        Focal focusing parameter (>= 0).
    alpha : float, optional
        Focal positive-class weight in [0, 1] (negative: no weighting).
    focal_weight : float, optional
        Weight of the focal term (>= 0).
    dice_weight : float, optional
        Weight of the Dice term (>= 0).
    smooth : float, optional
        Dice smoothing.

    Notes
    -----
    ``forward(logits, targets)`` takes and returns what :class:`BCEDiceLoss`'s does.
    """

    def __init__(
        self,
        gamma: float = 2.0,
        alpha: float = 0.25,
        focal_weight: float = 1.0,
        dice_weight: float = 1.0,
        smooth: float = 1.0,
    ) -> None:
        super().__init__()
        if gamma < 0:
            raise ValueError(f"gamma must be >= 0, got {gamma}")
        if alpha > 1:
            raise ValueError(f"alpha must be in [0, 1] (or negative to disable), got {alpha}")
        if focal_weight < 0 or dice_weight < 0:
            raise ValueError("focal_weight and dice_weight must be >= 0")
        self.gamma = float(gamma)
        self.alpha = float(alpha)
        self.focal_weight = float(focal_weight)
        self.dice_weight = float(dice_weight)
        self.dice = DiceLoss(smooth)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Return ``focal_weight * focal + dice_weight * Dice loss``."""
        focal = focal_loss(logits, targets, self.gamma, self.alpha)
        return self.focal_weight * focal + self.dice_weight * self.dice(logits, targets)


class BCELesionDiceLoss(nn.Module):
    """BCE over every image plus soft Dice over the images whose target has a lesion.

    Per-image soft Dice of an image with an empty target (a normal scan) is about
    ``sum(p) / (1 + sum(p))``: close to 1 for any predicted pixel, so a batch with many
    normal scans drives the whole network towards empty masks and it misses lesions
    elsewhere. Here normal scans stay in the segmentation loss through the pixel-wise BCE
    (whose pull grows with the false area, not with its mere presence), and Dice (Milletari et
    al., 3DV 2016) is averaged over the lesion images only, as nnU-Net's batch Dice ignores
    empty foreground (Isensee et al., Nature Methods 18, 2021).

    Parameters
    ----------
    bce_weight, dice_weight : float, optional
        Weights (>= 0) of the two terms.
    smooth : float, optional
        Dice smoothing (> 0).

    Notes
    -----
    ``forward(logits, targets)``: logits (N, 1, H, W) float, targets (N, 1, H, W) in
    {0, 1}; returns a scalar float32 >= 0. A batch without any lesion gets the BCE term only.
    """

    def __init__(self, bce_weight: float = 1.0, dice_weight: float = 1.0,
                 smooth: float = 1.0) -> None:
        super().__init__()
        if bce_weight < 0 or dice_weight < 0:
            raise ValueError("bce_weight and dice_weight must be >= 0")
        if smooth <= 0:
            raise ValueError(f"smooth must be > 0, got {smooth}")
        self.bce_weight = float(bce_weight)
        self.dice_weight = float(dice_weight)
        self.smooth = float(smooth)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Return ``bce_weight * BCE(all) + dice_weight * Dice loss(lesion images)``."""
        x, t = _check(logits, targets)
        bce = F.binary_cross_entropy_with_logits(x, t)
        lesion = t.flatten(1).amax(dim=1) > 0
        if not bool(lesion.any()):
            return self.bce_weight * bce
        dice = soft_dice_per_image(x[lesion], t[lesion], self.smooth)
        return self.bce_weight * bce + self.dice_weight * (1.0 - dice.mean())


LOSSES: dict[str, type[nn.Module]] = {
    "dice": DiceLoss,
    "bce_dice": BCEDiceLoss,
    "bce_lesion_dice": BCELesionDiceLoss,
    "focal_dice": FocalDiceLoss,
}


def build_loss(name: str = "bce_dice", **kwargs) -> nn.Module:
    """Build a loss module by name.

    Parameters
    ----------
    name : {"dice", "bce_dice", "bce_lesion_dice", "focal_dice"}, optional
        :class:`DiceLoss`, :class:`BCEDiceLoss` (default), :class:`BCELesionDiceLoss` or
        :class:`FocalDiceLoss`;
        case-insensitive, ``-`` accepted for ``_``.
    **kwargs
        Passed to the loss class (e.g. ``dice_weight=2.0``, ``gamma=1.5``).

    Returns
    -------
    torch.nn.Module
        Called as ``loss(logits, targets)`` with (N, 1, H, W) tensors; returns a scalar.

    Raises
    ------
    ValueError
        If the name is unknown (the message lists the allowed names), a keyword is not
        accepted by that loss (the message lists the accepted ones), or a value is invalid.
    """
    key = str(name).strip().lower().replace("-", "_")
    if key not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; allowed: {', '.join(map(repr, LOSSES))}")
    cls = LOSSES[key]
    accepted = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    bad = sorted(set(kwargs) - set(accepted))
    if bad:
        raise ValueError(
            f"loss {key!r} does not accept {', '.join(map(repr, bad))}; "
            f"accepted keywords: {', '.join(accepted)}"
        )
    return cls(**kwargs)
