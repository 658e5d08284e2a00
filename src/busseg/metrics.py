"""Segmentation metrics for binary lesion masks: per image, per class, and their uncertainty.

Everything here works on numpy arrays and needs only numpy and scipy (no torch), so the
napari widgets, ``training/evaluate.py`` and ``benchmarks/`` can all use it.

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
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from scipy import ndimage

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

#: Metrics that :func:`summarize` aggregates by default (those present in every row).
DEFAULT_SUMMARY_METRICS: tuple[str, ...] = (
    "dice",
    "iou",
    "precision",
    "recall",
    "accuracy",
    "hd95",
)

#: Labels that make up the pooled ``"lesion"`` group in :func:`summarize`.
LESION_LABELS: tuple[str, ...] = ("benign", "malignant")

_LABEL_ORDER = ("benign", "malignant", "normal")


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
        Binary masks; any value ``> 0`` is lesion. Any dtype.

    Returns
    -------
    float
        In [0, 1]. 1.0 when both masks are empty (see the module notes).

    Raises
    ------
    ValueError
        If the shapes differ (the message names both) or the arrays are empty.
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
        Binary masks; any value ``> 0`` is lesion. Any dtype.

    Returns
    -------
    float
        Non-negative, unbounded above.

    Raises
    ------
    ValueError
        If the shapes differ (the message names both) or the arrays are empty.
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


# --------------------------------------------------------------------------- summaries


def _finite_values(values: Iterable[Any]) -> tuple[np.ndarray, int]:
    """Return the non-nan values as float64 and the number of nan (None counts as nan)."""
    arr = np.asarray([math.nan if v is None else v for v in values], dtype=np.float64)
    nan = np.isnan(arr)
    return arr[~nan], int(nan.sum())


def bootstrap_ci(
    values: Iterable[float],
    n_boot: int = 2000,
    ci: float = 0.95,
    seed: int | None = 0,
) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of the mean (Efron & Tibshirani 1993).

    Resamples the non-nan values with replacement ``n_boot`` times, takes the mean of each
    resample, and returns the ``(1 - ci) / 2`` and ``(1 + ci) / 2`` quantiles of those means.

    Parameters
    ----------
    values : iterable of float
        Per-image values, e.g. Dice scores; ``nan`` (and None) are ignored.
    n_boot : int, optional
        Number of bootstrap resamples, >= 1.
    ci : float, optional
        Confidence level in (0, 1).
    seed : int or None, optional
        Seed of ``numpy.random.default_rng``; the same seed gives the same interval. None
        draws fresh entropy.

    Returns
    -------
    (float, float)
        ``(low, high)`` with ``low <= high``, in the units of ``values``. ``(nan, nan)`` when
        no value is left after dropping nan; ``(v, v)`` for a single value.

    Raises
    ------
    ValueError
        If ``n_boot < 1`` or ``ci`` is not in (0, 1).
    """
    if int(n_boot) < 1:
        raise ValueError(f"n_boot must be at least 1, got {n_boot!r}")
    if not 0.0 < float(ci) < 1.0:
        raise ValueError(f"ci must be in (0, 1), e.g. 0.95, got {ci!r}")
    x, _ = _finite_values(values)
    n = x.size
    if n == 0:
        return (math.nan, math.nan)
    rng = np.random.default_rng(seed)
    means = np.empty(int(n_boot), dtype=np.float64)
    chunk = max(1, 2_000_000 // n)  # bound memory to ~16 MB of indices per chunk
    for start in range(0, int(n_boot), chunk):
        stop = min(start + chunk, int(n_boot))
        idx = rng.integers(0, n, size=(stop - start, n))
        means[start:stop] = x[idx].mean(axis=1)
    alpha = (1.0 - float(ci)) / 2.0
    low, high = np.quantile(means, [alpha, 1.0 - alpha])
    return (float(low), float(high))


def _describe(values: Iterable[Any], ci: float | None, n_boot: int, seed: int) -> dict:
    """Nan-aware mean, std (ddof=1), median, n and nan count (and bootstrap CI) of values."""
    x, n_nan = _finite_values(values)
    n = int(x.size)
    out: dict[str, Any] = {
        "mean": float(x.mean()) if n else math.nan,
        "std": float(x.std(ddof=1)) if n > 1 else math.nan,
        "median": float(np.median(x)) if n else math.nan,
        "n": n,
        "n_nan": n_nan,
    }
    if ci is not None:
        out["ci_low"], out["ci_high"] = bootstrap_ci(x, n_boot=n_boot, ci=ci, seed=seed)
    return out


def _group_order(labels: Iterable[str]) -> list[str]:
    present = set(labels)
    known = [g for g in _LABEL_ORDER if g in present]
    return known + sorted(present.difference(_LABEL_ORDER))


def summarize(
    rows: Sequence[Mapping[str, Any]],
    by: str | None = "label",
    *,
    metrics: Sequence[str] | None = None,
    ci: float | None = None,
    n_boot: int = 2000,
    seed: int = 0,
) -> dict[str, dict[str, Any]]:
    """Per-group summary of per-image metrics (e.g. per BUSI class).

    Groups are each value of ``row[by]`` (benign, malignant, normal first, others sorted),
    then ``"lesion"`` (the rows labelled benign or malignant, if any) and ``"all"``.

    Parameters
    ----------
    rows : sequence of mapping
        One dict per image, typically :func:`segmentation_metrics` output plus the grouping
        key, e.g. ``{"label": "benign", "dice": 0.8, ...}``.
    by : str or None, optional
        Key that holds each row's group. None gives only the ``"all"`` group.
    metrics : sequence of str, optional
        Keys to aggregate. By default those of :data:`DEFAULT_SUMMARY_METRICS` present in
        every row. Values must be numbers or ``nan``/None.
    ci : float, optional
        If given (e.g. 0.95), also a percentile bootstrap interval of each mean
        (:func:`bootstrap_ci`, ``n_boot`` resamples, ``seed``).
    n_boot, seed : int, optional
        Passed to :func:`bootstrap_ci` when ``ci`` is given.

    Returns
    -------
    dict
        ``{group: {"n": int, "metrics": {metric: stats}, "n_empty_truth": int,
        "n_fp": int, "fp_rate": float}}`` in group order. ``stats`` holds ``mean``,
        ``std`` (sample, ddof=1; ``nan`` for fewer than two values), ``median``, ``n`` (values
        used) and ``n_nan`` (values ignored as ``nan``, e.g. HD95 of an image where one mask
        is empty), plus ``ci_low``/``ci_high`` when ``ci`` is given. ``fp_rate`` is, among
        the group's images with an empty truth (``true_area == 0``), the share with any
        predicted pixel (``any_pred``); ``n_fp`` counts them. For groups without such images
        (or rows without ``true_area``/``any_pred``) ``fp_rate`` is ``nan`` and the counts 0.

    Raises
    ------
    KeyError
        If a row lacks ``by`` or a metric named in ``metrics``.
    ValueError
        If ``rows`` is empty.
    """
    if len(rows) == 0:
        raise ValueError("rows is empty: nothing to summarize")
    if metrics is None:
        metrics = [m for m in DEFAULT_SUMMARY_METRICS if all(m in r for r in rows)]
    for i, row in enumerate(rows):
        for key in ([by] if by is not None else []) + list(metrics):
            if key not in row:
                raise KeyError(f"row {i} has no {key!r} key (keys: {sorted(row)})")

    groups: dict[str, list[Mapping[str, Any]]] = {}
    if by is not None:
        labels = [str(r[by]) for r in rows]
        for g in _group_order(labels):
            groups[g] = [r for r, lab in zip(rows, labels, strict=True) if lab == g]
        lesion = [r for r, lab in zip(rows, labels, strict=True) if lab in LESION_LABELS]
        if lesion and "lesion" not in groups:
            groups["lesion"] = lesion
    groups["all"] = list(rows)

    summary: dict[str, dict[str, Any]] = {}
    for name, members in groups.items():
        empty_truth = [
            r for r in members if "true_area" in r and "any_pred" in r and r["true_area"] == 0
        ]
        n_fp = sum(bool(r["any_pred"]) for r in empty_truth)
        summary[name] = {
            "n": len(members),
            "metrics": {m: _describe((r[m] for r in members), ci, n_boot, seed) for m in metrics},
            "n_empty_truth": len(empty_truth),
            "n_fp": n_fp,
            "fp_rate": n_fp / len(empty_truth) if empty_truth else math.nan,
        }
    return summary


_COLUMN_TITLES = {
    "dice": "Dice",
    "iou": "IoU",
    "precision": "Precision",
    "recall": "Recall",
    "accuracy": "Accuracy",
    "hd95": "HD95",
}


def _fmt(x: float, digits: int) -> str:
    return "–" if x is None or math.isnan(x) else f"{x:.{digits}f}"


def summary_markdown(
    summary: Mapping[str, Mapping[str, Any]],
    metrics: Sequence[str] = ("dice", "iou", "precision", "recall", "hd95"),
    *,
    digits: int = 3,
    hd95_unit: str = "px",
) -> str:
    """Render a :func:`summarize` result as a Markdown table of mean ± std.

    Rows are the groups; columns ``Group``, ``n``, one per metric, and ``FP rate`` when any
    group has images with an empty truth. Cells read ``mean ± std``; ``(k nan)`` is appended
    when k values were ignored as ``nan``; ``–`` marks an undefined value. The FP-rate cell
    reads ``rate (images with a prediction / images with an empty truth)``.

    Parameters
    ----------
    summary : mapping
        Output of :func:`summarize`.
    metrics : sequence of str, optional
        Metric columns, in order; metrics absent from a group show ``–``.
    digits : int, optional
        Decimal places; HD95 always gets one.
    hd95_unit : str, optional
        Unit shown in the HD95 header (``"px"``, or e.g. ``"mm"`` with ``spacing``).

    Returns
    -------
    str
        A GitHub-flavoured Markdown table ending with a newline.
    """
    show_fp = any(g.get("n_empty_truth", 0) for g in summary.values())
    header = ["Group", "n"]
    for m in metrics:
        title = _COLUMN_TITLES.get(m, m)
        header.append(f"{title} ({hd95_unit})" if m == "hd95" else title)
    if show_fp:
        header.append("FP rate")
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|",
    ]
    for name, group in summary.items():
        cells = [str(name), str(group.get("n", ""))]
        for m in metrics:
            stats = group.get("metrics", {}).get(m)
            if stats is None:
                cells.append("–")
                continue
            d = 1 if m == "hd95" else digits
            cell = _fmt(stats["mean"], d)
            if not math.isnan(stats["mean"]) and not math.isnan(stats["std"]):
                cell += f" ± {_fmt(stats['std'], d)}"
            if stats.get("n_nan"):
                cell += f" ({stats['n_nan']} nan)"
            cells.append(cell)
        if show_fp:
            n_empty = group.get("n_empty_truth", 0)
            cells.append(
                f"{_fmt(group['fp_rate'], digits)} ({group['n_fp']}/{n_empty})" if n_empty else "–"
            )
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def roc_auc(labels: Any, scores: Any) -> float:
    """Area under the ROC curve of ``scores`` for the binary ``labels``.

    Computed as the Mann-Whitney U statistic over the product of the class sizes
    (Hanley and McNeil, Radiology 143, 1982), with ties counting one half, via
    :func:`scipy.stats.mannwhitneyu`.

    Parameters
    ----------
    labels : array-like
        (N,) bool or 0/1: the positive class.
    scores : array-like
        (N,) float, higher = more likely positive (e.g. a probability in [0, 1]).

    Returns
    -------
    float
        AUC in [0, 1] (0.5 = chance); NaN when either class is absent.

    Raises
    ------
    ValueError
        If the lengths differ or a score is not finite.
    """
    from scipy.stats import mannwhitneyu

    y = np.asarray(labels).astype(bool).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    if y.shape != s.shape:
        raise ValueError(f"labels ({y.size}) and scores ({s.size}) differ in length")
    if not np.isfinite(s).all():
        raise ValueError("scores contain NaN or infinite values")
    n1, n0 = int(y.sum()), int((~y).sum())
    if n1 == 0 or n0 == 0:
        return float("nan")
    u = mannwhitneyu(s[y], s[~y], alternative="two-sided").statistic
    return float(u) / (n1 * n0)


def _binary_scores(labels: Any, scores: Any) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(labels).astype(bool).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    if y.shape != s.shape:
        raise ValueError(f"labels ({y.size}) and scores ({s.size}) differ in length")
    if not np.isfinite(s).all():
        raise ValueError("scores contain NaN or infinite values")
    return y, s


def roc_auc_ci(
    labels: Any,
    scores: Any,
    n_boot: int = 2000,
    ci: float = 0.95,
    seed: int | None = 0,
) -> dict:
    """ROC AUC with a stratified percentile bootstrap confidence interval.

    Each resample draws the positives and the negatives with replacement *separately*, so
    every resample keeps the class sizes and its AUC is defined (the stratified bootstrap of
    pROC; Robin et al., BMC Bioinformatics 12, 2011, 77; Efron & Tibshirani 1993). The AUC of
    a resample is the Mann-Whitney statistic over its pairs (ties count one half), computed
    exactly from the resample counts: ``c_pos @ W @ c_neg / (n_pos * n_neg)`` with ``W`` the
    (n_pos, n_neg) pairwise win matrix.

    Parameters
    ----------
    labels : array-like
        (N,) bool or 0/1: the positive class.
    scores : array-like
        (N,) float, higher = more likely positive (e.g. a probability in [0, 1]).
    n_boot : int, optional
        Number of bootstrap resamples, >= 1.
    ci : float, optional
        Confidence level in (0, 1).
    seed : int or None, optional
        Seed of ``numpy.random.default_rng``; the same seed gives the same interval.

    Returns
    -------
    dict
        ``auc`` (as :func:`roc_auc`), ``ci_low``, ``ci_high`` (floats in [0, 1], low <=
        auc's bootstrap distribution <= high), ``n_pos``, ``n_neg`` (ints). AUC and interval
        are NaN when either class is absent.

    Raises
    ------
    ValueError
        If the lengths differ, a score is not finite, ``n_boot < 1`` or ``ci`` is not in
        (0, 1).
    """
    if int(n_boot) < 1:
        raise ValueError(f"n_boot must be at least 1, got {n_boot!r}")
    if not 0.0 < float(ci) < 1.0:
        raise ValueError(f"ci must be in (0, 1), e.g. 0.95, got {ci!r}")
    y, s = _binary_scores(labels, scores)
    pos, neg = s[y], s[~y]
    out: dict[str, Any] = {"auc": math.nan, "ci_low": math.nan, "ci_high": math.nan,
                           "n_pos": int(pos.size), "n_neg": int(neg.size)}
    if pos.size == 0 or neg.size == 0:
        return out
    wins = (pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])
    out["auc"] = float(wins.mean())
    rng = np.random.default_rng(seed)
    aucs = np.empty(int(n_boot), dtype=np.float64)
    chunk = max(1, 4_000_000 // max(pos.size, neg.size))
    for start in range(0, int(n_boot), chunk):
        stop = min(start + chunk, int(n_boot))
        cp = rng.multinomial(pos.size, np.full(pos.size, 1.0 / pos.size), size=stop - start)
        cn = rng.multinomial(neg.size, np.full(neg.size, 1.0 / neg.size), size=stop - start)
        cp, cn = cp.astype(np.float64), cn.astype(np.float64)
        aucs[start:stop] = ((cp @ wins) * cn).sum(axis=1) / (pos.size * neg.size)
    alpha = (1.0 - float(ci)) / 2.0
    low, high = np.quantile(aucs, [alpha, 1.0 - alpha])
    out["ci_low"], out["ci_high"] = float(low), float(high)
    return out


def reliability_curve(labels: Any, probs: Any, n_bins: int = 10) -> dict:
    """Reliability diagram data and expected calibration error of binary probabilities.

    The predicted probabilities are put into ``n_bins`` equal-width bins over [0, 1] (the
    last bin includes 1); per bin the mean predicted probability is compared with the
    observed share of positives. The expected calibration error (ECE) is the count-weighted
    mean absolute gap, ``sum_b n_b / N * |observed_b - predicted_b|`` (Naeini, Cooper &
    Hauskrecht, AAAI 2015; Guo et al., "On calibration of modern neural networks", ICML
    2017). With few images per bin the ECE is noisy and biased upwards; report ``n``.

    Parameters
    ----------
    labels : array-like
        (N,) bool or 0/1: the event (e.g. "the image has a lesion").
    probs : array-like
        (N,) float in [0, 1]: the predicted probability of the event.
    n_bins : int, optional
        Number of bins, >= 1.

    Returns
    -------
    dict
        ``bin_edges`` (n_bins + 1 floats), ``count`` (n_bins ints), ``predicted`` and
        ``observed`` (n_bins floats, NaN for an empty bin), ``ece`` (float in [0, 1], NaN
        for N = 0), ``n`` (int).

    Raises
    ------
    ValueError
        If the lengths differ, a probability is not finite or outside [0, 1], or
        ``n_bins < 1``.
    """
    if isinstance(n_bins, bool) or int(n_bins) != n_bins or n_bins < 1:
        raise ValueError(f"n_bins must be a positive integer, got {n_bins!r}")
    y, p = _binary_scores(labels, probs)
    if ((p < 0) | (p > 1)).any():
        raise ValueError("probabilities must be in [0, 1]")
    edges = np.linspace(0.0, 1.0, int(n_bins) + 1)
    idx = np.clip(np.searchsorted(edges, p, side="right") - 1, 0, int(n_bins) - 1)
    count = np.bincount(idx, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        predicted = np.bincount(idx, weights=p, minlength=n_bins) / count
        observed = np.bincount(idx, weights=y.astype(float), minlength=n_bins) / count
    n = int(p.size)
    filled = count > 0
    ece = (float(np.sum(count[filled] / n * np.abs(observed[filled] - predicted[filled])))
           if n else math.nan)
    return {"bin_edges": edges.tolist(), "count": count.astype(int).tolist(),
            "predicted": predicted.tolist(), "observed": observed.tolist(), "ece": ece, "n": n}


def class_head_summary(
    labels: Sequence[str],
    class_proba: Sequence[Mapping[str, float] | None],
    *,
    n_boot: int = 2000,
    ci: float = 0.95,
    seed: int | None = 0,
    n_bins: int = 10,
) -> dict | None:
    """Discrimination and calibration of an image-level normal / benign / malignant head.

    - ``auc_malignant_vs_benign``: on images with a lesion (label benign or malignant), the
      AUC of ``P(malignant) / (P(benign) + P(malignant))`` (the head's malignancy
      probability given a lesion) for malignant vs benign;
    - ``auc_lesion_vs_normal``: on all images, the AUC of ``P(lesion) = 1 - P(normal)`` for
      images with a lesion vs normal ones;
    - ``calibration``: :func:`reliability_curve` of ``P(lesion)`` against "has a lesion";
    - ``p_normal``: median, 25th and 75th percentile of ``P(normal)`` per label.

    AUCs carry a stratified bootstrap CI (:func:`roc_auc_ci`). Research output, not a
    diagnosis.

    Parameters
    ----------
    labels : sequence of str
        (N,) per-image labels: ``"normal"``, ``"benign"`` or ``"malignant"`` (others are
        ignored for the malignancy AUC and count as lesion-free only if ``"normal"``).
    class_proba : sequence of mapping or None
        (N,) ``{"normal": p, "benign": p, "malignant": p}`` per image, as
        :attr:`busseg.inference.Prediction.class_proba`; None entries are skipped.
    n_boot, ci, seed : optional
        As :func:`roc_auc_ci`.
    n_bins : int, optional
        Bins of the reliability curve.

    Returns
    -------
    dict or None
        ``n``, ``auc_malignant_vs_benign``, ``auc_lesion_vs_normal`` (dicts of
        :func:`roc_auc_ci`; NaN AUC where a class is missing), ``calibration``,
        ``p_normal`` (``{label: {"median", "q25", "q75", "n"}}``); None when no image has
        class probabilities (a model without a class head).

    Raises
    ------
    ValueError
        If the lengths differ or a probability is missing, not finite or outside [0, 1].
    """
    if len(labels) != len(class_proba):
        raise ValueError(f"{len(labels)} labels but {len(class_proba)} class probabilities")
    kept = [(str(lab), cp) for lab, cp in zip(labels, class_proba, strict=True) if cp is not None]
    if not kept:
        return None
    try:
        probs = np.array([[float(cp[k]) for k in ("normal", "benign", "malignant")]
                          for _, cp in kept])
    except KeyError as exc:
        raise ValueError(f"class probabilities lack the class {exc}; expected normal, benign "
                         "and malignant") from None
    if not np.isfinite(probs).all() or ((probs < 0) | (probs > 1)).any():
        raise ValueError("class probabilities must be finite and in [0, 1]")
    labs = np.array([lab for lab, _ in kept])
    lesion = np.isin(labs, LESION_LABELS)
    p_lesion = np.clip(1.0 - probs[:, 0], 0.0, 1.0)
    denom = probs[lesion, 1] + probs[lesion, 2]
    p_malig = np.divide(probs[lesion, 2], denom, out=np.full(denom.shape, 0.5), where=denom > 0)
    scored = np.isin(labs, (*LESION_LABELS, "normal"))  # a known lesion state
    p_normal = {}
    for lab in _group_order(labs.tolist()):
        v = probs[labs == lab, 0]
        q25, q50, q75 = np.percentile(v, [25, 50, 75])
        p_normal[lab] = {"median": float(q50), "q25": float(q25), "q75": float(q75),
                         "n": int(v.size)}
    return {
        "n": int(len(kept)),
        "auc_malignant_vs_benign": roc_auc_ci(labs[lesion] == "malignant", p_malig, n_boot, ci,
                                              seed),
        "auc_lesion_vs_normal": roc_auc_ci(lesion[scored], p_lesion[scored], n_boot, ci, seed),
        "calibration": reliability_curve(lesion[scored], p_lesion[scored], n_bins),
        "p_normal": p_normal,
    }


def _nan_median(values: Iterable[Any]) -> float:
    x, _ = _finite_values(values)
    return float(np.median(x)) if x.size else math.nan


def gate_summary(
    rows: Sequence[Mapping[str, Any]], stored: Mapping[str, Any] | None = None, on: bool = True
) -> dict:
    """FP rate on normal images and lesion Dice with the gate on and off (one forward pass).

    The gate of :func:`busseg.inference.predict` empties a mask when the class head says
    normal; one forward pass gives both the gated and the ungated mask, so callers record
    both per image and this function compares them.

    Parameters
    ----------
    rows : sequence of mapping
        Per-image rows: ``true_area`` (int, 0 = no lesion), ``any_pred`` and ``dice`` of the
        headline (gated when ``on``) mask, ``any_pred_ungated`` and ``dice_ungated`` of the
        ungated mask, ``gated`` (bool) and ``p_normal`` (float in [0, 1], or None).
    stored : mapping or None, optional
        The checkpoint's ``inference.normal_gate`` (recorded as is).
    on : bool, optional
        Whether the gate was applied (the headline masks are gated).

    Returns
    -------
    dict
        ``on``, ``stored``, ``n_normal``, ``fp_rate_normal`` / ``fp_rate_normal_ungated``
        (share of images with an empty truth with any predicted pixel, gate on / off; NaN
        without such images), ``n_lesion``, ``lesion_dice`` / ``lesion_dice_ungated`` (mean
        Dice over images with a lesion), ``n_lesion_gated`` and ``share_lesion_gated``
        (lesion images the gate emptied), ``median_p_normal_lesion`` and
        ``median_p_normal_normal``.
    """
    normal = [r for r in rows if r["true_area"] == 0]
    lesion = [r for r in rows if r["true_area"] > 0]

    def mean(vals):
        vals = [float(v) for v in vals]
        return sum(vals) / len(vals) if vals else math.nan

    n_gated = sum(bool(r["gated"]) for r in lesion)
    return {
        "on": on,
        "stored": None if stored is None else dict(stored),
        "n_normal": len(normal),
        "fp_rate_normal": mean(r["any_pred"] for r in normal),
        "fp_rate_normal_ungated": mean(r["any_pred_ungated"] for r in normal),
        "n_fp_normal": sum(bool(r["any_pred"]) for r in normal),
        "n_fp_normal_ungated": sum(bool(r["any_pred_ungated"]) for r in normal),
        "n_lesion": len(lesion),
        "lesion_dice": mean(r["dice"] for r in lesion),
        "lesion_dice_ungated": mean(r["dice_ungated"] for r in lesion),
        "n_lesion_gated": n_gated,
        "share_lesion_gated": n_gated / len(lesion) if lesion else math.nan,
        "median_p_normal_lesion": _nan_median(r.get("p_normal") for r in lesion),
        "median_p_normal_normal": _nan_median(r.get("p_normal") for r in normal),
    }
