"""The automatic-mode settings applied after thresholding: the normal-scan gate, the region filter.

Both act only on automatic predictions (never on a prompted mask): the gate empties the mask
of an image the class head calls normal when no pixel is a confident lesion; the region filter
(:mod:`busseg.region_filter`) removes connected components its classifier finds unlikely to be
lesions. Torch-free; :mod:`busseg.inference` and :func:`busseg.inference.predict_stack_iter`
apply them, and re-export :func:`describe_gate`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

__all__ = [
    "apply_filter",
    "apply_gate",
    "describe_gate",
    "finish_mask",
    "resolve_filter",
    "resolve_gate",
]


def resolve_gate(normal_gate: Any, cfg: Mapping[str, Any]) -> dict | None:
    """Return the normal-scan gate to apply, or None.

    Parameters
    ----------
    normal_gate : "auto" or None or False or float
        As :func:`busseg.inference.predict`: ``"auto"`` the checkpoint's stored gate, None or
        False none, a float in (0, 1] its ``p_normal`` (keeping the stored
        ``lesion_confidence``).
    cfg : mapping
        The checkpoint config (its ``inference.normal_gate``).

    Returns
    -------
    dict or None
        ``{"p_normal": t, "lesion_confidence": c}``.

    Raises
    ------
    ValueError
        For any other ``normal_gate``.
    """
    from busseg.settings import check_gate

    stored = cfg.get("inference", {}).get("normal_gate")
    gate = check_gate(normal_gate)
    if gate is None:
        return None
    if gate == "auto":
        return dict(stored) if stored else None
    conf = (stored or {}).get("lesion_confidence", 1.0 + 1e-9)
    return {"p_normal": gate, "lesion_confidence": conf}


def describe_gate(gate: Mapping[str, Any] | None) -> str:
    """Say in words what a normal-scan gate does (for the CLI, evaluate.py and model cards).

    Parameters
    ----------
    gate : mapping or None
        A checkpoint's ``inference.normal_gate``: ``{"p_normal": t, "lesion_confidence": c}``
        (``c`` >= 1 or absent: the lesion probabilities never protect a mask); None or empty
        for no gate.

    Returns
    -------
    str
        E.g. ``"mask emptied when P(normal) >= 0.95 and no pixel reaches lesion probability
        0.95"``; ``"none"`` without a gate.
    """
    if not gate:
        return "none"
    text = f"mask emptied when P(normal) >= {float(gate['p_normal']):.4g}"
    conf = gate.get("lesion_confidence")
    if conf is not None and float(conf) < 1.0:
        return text + f" and no pixel reaches lesion probability {float(conf):.4g}"
    return text + ", whatever the lesion probabilities"


def apply_gate(mask: np.ndarray, proba: Any, class_proba: dict | None,
               gate: dict | None) -> tuple[np.ndarray, bool]:
    """Empty the mask when the head says normal and no pixel is a confident lesion.

    Parameters
    ----------
    mask : numpy.ndarray
        (H, W) bool.
    proba : numpy.ndarray or torch.Tensor
        (H, W) lesion probabilities in [0, 1].
    class_proba : dict or None
        The class head's probabilities (``"normal"`` ...); None without a head (no gate).
    gate : dict or None
        From :func:`resolve_gate`.

    Returns
    -------
    mask : numpy.ndarray
        The mask, or an all-False one when gated.
    gated : bool
        Whether a non-empty mask was emptied.
    """
    if gate is None or class_proba is None or not mask.any():
        return mask, False
    if class_proba.get("normal", 0.0) < float(gate["p_normal"]):
        return mask, False
    if float(proba.max()) >= float(gate.get("lesion_confidence", 1.0 + 1e-9)):
        return mask, False
    return np.zeros_like(mask), True


def resolve_filter(region_filter: Any, cfg: Mapping[str, Any]):
    """Return the region filter to apply, or None (see :func:`busseg.inference.predict`).

    Parameters
    ----------
    region_filter : "auto" or None or False or RegionFilter or dict
        As :func:`busseg.region_filter.resolve_filter`.
    cfg : mapping
        The checkpoint config (its ``inference.region_filter``).

    Returns
    -------
    busseg.region_filter.RegionFilter or None

    Raises
    ------
    ValueError
        For a bad ``region_filter`` or an invalid stored one.
    """
    from busseg.region_filter import resolve_filter as _resolve

    return _resolve(region_filter, cfg)


def apply_filter(mask: np.ndarray, proba: np.ndarray, image: np.ndarray,
                 classes: dict | None, rfilter) -> tuple[np.ndarray, int]:
    """Remove the connected components the region filter rejects.

    Parameters
    ----------
    mask : numpy.ndarray
        (H, W) bool.
    proba : numpy.ndarray
        (H, W) float32 lesion probabilities.
    image : numpy.ndarray
        The image predicted.
    classes : dict or None
        The class head's probabilities.
    rfilter : busseg.region_filter.RegionFilter or None
        From :func:`resolve_filter`; None changes nothing.

    Returns
    -------
    mask : numpy.ndarray
        (H, W) bool.
    removed : int
        Components removed.
    """
    if rfilter is None or not mask.any():
        return mask, 0
    res = rfilter.apply(mask, proba, image, classes)
    return res.mask, res.removed


def finish_mask(mask: np.ndarray, proba: np.ndarray, image: np.ndarray, classes: dict | None,
                resolved: Any, automatic: bool = True) -> tuple[np.ndarray, bool, int]:
    """Post-process a thresholded mask, then gate and filter it when it is automatic.

    The steps every prediction takes after the threshold, in this order: post-processing
    (:func:`busseg.postprocess.postprocess_mask`), the normal-scan gate, the region filter
    (the last two in automatic mode only).

    Parameters
    ----------
    mask : numpy.ndarray
        (H, W) bool, the probabilities thresholded.
    proba : numpy.ndarray
        (H, W) float32 lesion probabilities in [0, 1].
    image : numpy.ndarray
        The image predicted (the region filter's features).
    classes : dict or None
        The class head's probabilities.
    resolved : busseg.settings.ResolvedInference
        The settings, resolved against the checkpoint.
    automatic : bool, optional
        False for a prompted mask: no gate, no filter.

    Returns
    -------
    mask : numpy.ndarray
        (H, W) bool.
    gated : bool
        Whether the gate emptied a non-empty mask.
    removed : int
        Components the region filter removed.
    """
    if resolved.post is not None:
        from busseg.postprocess import postprocess_mask

        fill_holes, keep, min_area = resolved.post
        mask = postprocess_mask(mask, fill_holes=fill_holes, keep=keep, min_area=min_area)
    if not automatic:
        return mask, False, 0
    mask, gated = apply_gate(mask, proba, classes, resolved.gate)
    mask, removed = apply_filter(mask, proba, image, classes, resolved.region_filter)
    return mask, gated, removed
