"""Segmentation metrics for binary lesion masks: per image, per class, and their uncertainty.

Everything here works on numpy arrays and needs only numpy and scipy (no torch), so the
napari widgets, ``training/evaluate.py`` and ``benchmarks/`` can all use it. The overlap and
distance metrics live here; summaries over images (means, bootstrap CIs, Markdown tables) in
:mod:`busseg.metrics_summary`, and the class head's and the normal-scan gate's metrics in
:mod:`busseg.metrics_class_head`. All their public names are importable from here.

Masks
-----
A mask is an (H, W) array; any value ``> 0`` counts as lesion (True), so bool, 0/1 and 0/255
masks all work. Pass thresholded masks, not probabilities (a probability of 0.01 is ``> 0``).
Prediction and truth must have the same shape (``ValueError`` otherwise). Nothing is specific
to 2-D: (D, H, W) volumes work too, with one ``spacing`` entry per axis.

Conventions for empty masks
---------------------------
Overlap metrics are 0/0 when a mask is empty. BUSI's *normal* images have an empty truth, so
the choice matters. We follow the Metrics Reloaded recommendations (Maier-Hein et al. 2024;
pitfalls in Reinke et al. 2024) and their reference implementation
(``MetricsReloaded.metrics.pairwise_measures.BinaryPairwiseMeasures``): a correct empty
prediction is a perfect result; a metric that stays undefined is ``nan``, not a made-up
number. Summaries then report how many values are ``nan`` and, for images with an empty
truth, the image-level false-positive rate, as Metrics Reloaded advises for cases without a
target structure.

=========================  ====  ====  =========  ======  =====
case                       dice  iou   precision  recall  hd95
=========================  ====  ====  =========  ======  =====
both empty                 1     1     1          1       0
truth empty, pred not      0     0     0          nan     nan
pred empty, truth not      0     0     0          0       nan
both non-empty             formula (finite)
=========================  ====  ====  =========  ======  =====

Where this differs from the Metrics Reloaded code: for *both empty* it returns ``nan`` for
IoU, precision and recall (but 1 for Dice and F-beta, and 0 for the Hausdorff distances). We
return 1 for all overlap metrics so that an empty-on-empty image scores the same under every
overlap metric, and IoU = Dice / (2 - Dice) holds for every image. Precision with an empty
prediction and a non-empty truth is 0 (as in Metrics Reloaded); recall with an empty truth and
a non-empty prediction is ``nan`` (as in Metrics Reloaded): there was no lesion to find, and
the error is counted by the false-positive rate instead. Pixel accuracy is always defined.

HD95
----
The 95th percentile Hausdorff distance, computed exactly as ``medpy.metric.binary.hd95``:
the surface of a mask is ``mask XOR binary_erosion(mask)`` with the 4-connected (cross)
structuring element ``generate_binary_structure(2, 1)`` (medpy's default ``connectivity=1``)
and pixels outside the image counted as background; the distance from each surface pixel of
one mask to the nearest surface pixel of the other comes from
``scipy.ndimage.distance_transform_edt`` (with ``sampling=spacing``); HD95 is the 95th
percentile (numpy's linear interpolation) over the *union* of both directed distance sets.
MONAI's ``compute_hausdorff_distance(percentile=95)`` and the Metrics Reloaded code instead
take the larger of the two directed 95th percentiles, which can be larger on asymmetric
errors; the maximum (100th percentile) is the same in all three.

References
----------
Dice LR (1945). Measures of the amount of ecologic association between species. Ecology
26(3), 297-302.

Jaccard P (1912). The distribution of the flora in the alpine zone. New Phytologist 11(2),
37-50.

Huttenlocher DP, Klanderman GA, Rucklidge WJ (1993). Comparing images using the Hausdorff
distance. IEEE TPAMI 15(9), 850-863.

Maier-Hein L, Reinke A, et al. (2024). Metrics reloaded: recommendations for image analysis
validation. Nature Methods 21, 195-212.

Reinke A, Tizabi MD, et al. (2024). Understanding metric-related pitfalls in image analysis
validation. Nature Methods 21, 182-194.

Efron B, Tibshirani RJ (1993). An Introduction to the Bootstrap. Chapman & Hall.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import ndimage

from busseg.metrics_class_head import (
    class_head_summary,
    gate_summary,
    reliability_curve,
    roc_auc,
    roc_auc_ci,
)
from busseg.metrics_summary import (
    DEFAULT_SUMMARY_METRICS,
    LESION_LABELS,
    bootstrap_ci,
    summarize,
    summary_markdown,
)

__all__ = [
    "DEFAULT_SUMMARY_METRICS",
    "LESION_LABELS",
    "bootstrap_ci",
    "class_head_summary",
    "correction_effort",
    "dice_score",
    "gate_summary",
    "hausdorff_distance",
    "iou_score",
    "reliability_curve",
    "roc_auc",
    "roc_auc_ci",
    "segmentation_metrics",
    "summarize",
    "summary_markdown",
]


# --------------------------------------------------------------------------- input checks


def _as_mask(a: Any) -> np.ndarray:
    """Return ``a`` as a bool array (``> 0`` is True) without copying bool input."""
    arr = np.asarray(a)
    if arr.dtype == np.bool_:
        return arr
    return arr > 0


def _check_pair(pred: Any, truth: Any) -> tuple[np.ndarray, np.ndarray]:
    """Convert ``pred`` and ``truth`` to bool masks of one shape, or raise ``ValueError``."""
    p = _as_mask(pred)
    t = _as_mask(truth)
    if p.shape != t.shape:
        raise ValueError(
            f"pred and truth must have the same shape, got pred {p.shape} and truth "
            f"{t.shape}; resize the prediction to the image size (nearest neighbour) first"
        )
    if p.ndim == 0 or p.size == 0:
        raise ValueError(f"masks must be non-empty arrays with at least one axis, got {p.shape}")
    return p, t


def _check_spacing(spacing: Any, ndim: int) -> tuple[float, ...] | None:
    """Validate ``spacing`` (None, a number, or one number per axis) and return a tuple."""
    if spacing is None:
        return None
    values = np.atleast_1d(np.asarray(spacing, dtype=np.float64))
    if values.ndim != 1 or values.size not in (1, ndim):
        raise ValueError(
            f"spacing must be a number or {ndim} numbers (one per axis, row spacing first), "
            f"got {spacing!r}"
        )
    if not np.all(np.isfinite(values)) or np.any(values <= 0):
        raise ValueError(f"spacing must be positive and finite, got {spacing!r}")
    if values.size == 1:
        values = np.repeat(values, ndim)
    return tuple(float(v) for v in values)


# --------------------------------------------------------------------------- overlap metrics


def dice_score(pred: Any, truth: Any) -> float:
    """Dice similarity coefficient (Sørensen-Dice, F1 score) of two binary masks.

    ``2 |P ∩ T| / (|P| + |T|)``, as in Dice (1945). Cheap enough to call on every edit in the
    GUI: two counts over the image, no copies for bool input.

    Parameters
    ----------
    pred, truth : array_like, shape (H, W)
        Binary masks; any value ``> 0`` is lesion. Any dtype.

    Returns
    -------
    float
        In [0, 1]. 1.0 when both masks are empty (Metrics Reloaded convention).

    Raises
    ------
    ValueError
        If the shapes differ (the message names both) or the arrays are empty.
    """
    p, t = _check_pair(pred, truth)
    denom = np.count_nonzero(p) + np.count_nonzero(t)
    if denom == 0:
        return 1.0
    return 2.0 * np.count_nonzero(p & t) / denom


def iou_score(pred: Any, truth: Any) -> float:
    """Intersection over union (Jaccard index) of two binary masks.

    ``|P ∩ T| / |P ∪ T|``, as in Jaccard (1912); equal to ``dice / (2 - dice)``.

    Parameters
    ----------
    pred, truth : array_like, shape (H, W)
        Binary masks, as for :func:`dice_score`.

    Returns
    -------
    float
        In [0, 1]. 1.0 when both masks are empty (see the module notes).

    Raises
    ------
    ValueError
        As :func:`dice_score` does.
    """
    p, t = _check_pair(pred, truth)
    union = np.count_nonzero(p | t)
    if union == 0:
        return 1.0
    return np.count_nonzero(p & t) / union


def correction_effort(pred: Any, truth: Any) -> float:
    """Share of pixels a user must repaint to turn ``pred`` into ``truth``, per lesion pixel.

    ``|P XOR T| / max(|T|, 1)``: wrongly painted plus missed pixels, relative to the lesion
    area. 0 means nothing to correct; 1 means as many pixels to fix as the lesion has (for
    example an empty prediction of a lesion); it can exceed 1 when the prediction spills far
    outside the lesion. For an empty truth (normal image) it is the number of false-positive
    pixels, since the denominator is then 1.

    Parameters
    ----------
    pred, truth : array_like, shape (H, W)
        The prediction and the reference; any value ``> 0`` is lesion.

    Returns
    -------
    float
        Non-negative, unbounded above.

    Raises
    ------
    ValueError
        If the masks differ in shape or have no pixels.
    """
    p, t = _check_pair(pred, truth)
    return np.count_nonzero(p ^ t) / max(np.count_nonzero(t), 1)


# --------------------------------------------------------------------------- distances


def _surface(mask: np.ndarray, structure: np.ndarray) -> np.ndarray:
    """Surface pixels: ``mask XOR binary_erosion(mask)``, outside the array is background."""
    return mask ^ ndimage.binary_erosion(mask, structure=structure, iterations=1, border_value=0)


def _surface_distances(
    pred: np.ndarray,
    truth: np.ndarray,
    spacing: tuple[float, ...] | None,
    connectivity: int,
) -> np.ndarray:
    """Both directed surface-distance sets, concatenated (medpy's ``hd95`` algorithm).

    Both masks must be non-empty. The arrays are cropped to the bounding box of their union
    plus a one-pixel margin first; this changes no distance (all surface pixels lie inside)
    and no surface (the margin is background, or the image edge where it is clipped).
    """
    union = pred | truth
    slices = []
    for axis in range(union.ndim):
        other = tuple(i for i in range(union.ndim) if i != axis)
        hits = np.flatnonzero(np.any(union, axis=other))
        lo = max(int(hits[0]) - 1, 0)
        hi = min(int(hits[-1]) + 2, union.shape[axis])
        slices.append(slice(lo, hi))
    box = tuple(slices)
    p, t = pred[box], truth[box]

    structure = ndimage.generate_binary_structure(p.ndim, connectivity)
    p_surf = _surface(p, structure)
    t_surf = _surface(t, structure)
    # distance of every pixel to the nearest surface pixel of the other mask
    dist_to_t = ndimage.distance_transform_edt(~t_surf, sampling=spacing)
    dist_to_p = ndimage.distance_transform_edt(~p_surf, sampling=spacing)
    return np.concatenate([dist_to_t[p_surf], dist_to_p[t_surf]])


def hausdorff_distance(
    pred: Any,
    truth: Any,
    percentile: float = 95.0,
    spacing: float | Sequence[float] | None = None,
    *,
    connectivity: int = 1,
) -> float:
    """Percentile Hausdorff distance between the surfaces of two binary masks.

    With ``percentile=100`` this is the symmetric Hausdorff distance of Huttenlocher et al.
    (1993) between the two mask surfaces; with 95 (the default) it is HD95 as computed by
    ``medpy.metric.binary.hd95``: the percentile over the union of both directed
    surface-distance sets (see the module notes for how MONAI differs). HD95 ignores the
    farthest 5 % of surface pixels, so a few stray pixels far from the lesion do not dominate
    it the way they dominate the maximum.

    Parameters
    ----------
    pred, truth : array_like, shape (H, W)
        Binary masks; any value ``> 0`` is lesion. Any dtype.
    percentile : float, optional
        In [0, 100]; 95 for HD95, 100 for the classic (maximum) Hausdorff distance.
    spacing : float or sequence of float, optional
        Pixel size per axis (rows first), e.g. mm per pixel; a single number applies to all
        axes. Without it the distance is in pixels.
    connectivity : int, optional
        Connectivity of the erosion structuring element that defines the surface, passed to
        ``scipy.ndimage.generate_binary_structure``: 1 (default, as medpy) is the 4-connected
        cross, 2 the full 3x3 square.

    Returns
    -------
    float
        In pixels, or in the units of ``spacing``. 0.0 when both masks are empty; ``nan``
        when exactly one is empty (undefined; summaries count these).

    Raises
    ------
    ValueError
        If the shapes differ, the arrays are empty, ``percentile`` is outside [0, 100] or
        ``spacing`` is not positive with one value per axis.
    """
    p, t = _check_pair(pred, truth)
    if not 0.0 <= float(percentile) <= 100.0:
        raise ValueError(f"percentile must be in [0, 100], got {percentile!r}")
    sampling = _check_spacing(spacing, p.ndim)
    p_any, t_any = bool(p.any()), bool(t.any())
    if not p_any and not t_any:
        return 0.0
    if not (p_any and t_any):
        return math.nan
    distances = _surface_distances(p, t, sampling, connectivity)
    return float(np.percentile(distances, float(percentile)))


# --------------------------------------------------------------------------- per image


def segmentation_metrics(
    pred: Any,
    truth: Any,
    spacing: float | Sequence[float] | None = None,
) -> dict[str, Any]:
    """All per-image metrics of a predicted mask against the reference mask.

    Parameters
    ----------
    pred : array_like, shape (H, W)
        Predicted mask; any value ``> 0`` is lesion. Any dtype.
    truth : array_like, shape (H, W)
        Reference mask, same shape; any value ``> 0`` is lesion.
    spacing : float or sequence of float, optional
        Pixel size (rows, columns), e.g. in mm; only ``hd95`` uses it. BUSI has no
        calibration, so by default distances are in pixels.

    Returns
    -------
    dict
        ``dice``, ``iou``, ``precision`` (TP / (TP + FP)), ``recall`` (sensitivity,
        TP / (TP + FN)), ``accuracy`` (pixel accuracy, (TP + TN) / all): float in [0, 1] or
        ``nan``; ``hd95``: float >= 0 in pixels (or ``spacing`` units) or ``nan``; ``tp``,
        ``fp``, ``fn``, ``tn``, ``pred_area``, ``true_area`` (pixel counts): int;
        ``any_pred``: bool, whether anything was predicted. Plain Python types, so the dict
        goes straight into JSON or a DataFrame. Empty masks follow the table in the module
        notes (both empty: all overlap metrics 1, hd95 0; one empty: dice = iou = 0,
        hd95 = ``nan``, recall ``nan`` when the truth is empty).

    Raises
    ------
    ValueError
        If the shapes differ (the message names both), the arrays are empty, or ``spacing``
        is invalid.

    See Also
    --------
    summarize : per-class mean, std, median and nan counts of a list of these dicts.
    """
    p, t = _check_pair(pred, truth)
    sampling = _check_spacing(spacing, p.ndim)
    tp = int(np.count_nonzero(p & t))
    pred_area = int(np.count_nonzero(p))
    true_area = int(np.count_nonzero(t))
    fp = pred_area - tp
    fn = true_area - tp
    tn = int(p.size) - tp - fp - fn

    if pred_area == 0 and true_area == 0:
        dice = iou = precision = recall = 1.0
        hd95 = 0.0
    else:
        dice = 2.0 * tp / (pred_area + true_area)
        iou = tp / (tp + fp + fn)
        precision = tp / pred_area if pred_area else 0.0
        recall = tp / true_area if true_area else math.nan
        if pred_area and true_area:
            hd95 = float(np.percentile(_surface_distances(p, t, sampling, 1), 95.0))
        else:
            hd95 = math.nan

    return {
        "dice": float(dice),
        "iou": float(iou),
        "precision": float(precision),
        "recall": float(recall),
        "accuracy": (tp + tn) / p.size,
        "hd95": hd95,
        "tp": tp,
        "fp": fp,
        "fn": fn,
        "tn": tn,
        "pred_area": pred_area,
        "true_area": true_area,
        "any_pred": pred_area > 0,
    }
