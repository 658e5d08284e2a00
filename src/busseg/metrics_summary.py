"""Summaries of per-image segmentation metrics: means with bootstrap CIs per class, tables.

Part of :mod:`busseg.metrics` (which re-exports the public names); numpy only. The empty-mask
conventions (``nan`` for undefined values, the false-positive rate on images with an empty
truth) are described there.

References
----------
Efron B, Tibshirani RJ (1993). An Introduction to the Bootstrap. Chapman & Hall.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

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


def finite_values(values: Iterable[Any]) -> tuple[np.ndarray, int]:
    """Drop the missing values of a sequence of per-image values.

    Parameters
    ----------
    values : iterable of float or None
        Per-image values; ``nan`` and None count as missing.

    Returns
    -------
    (numpy.ndarray, int)
        The remaining values as a 1-D float64 array, and how many were missing.
    """
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
    x, _ = finite_values(values)
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
    x, n_nan = finite_values(values)
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


def group_order(labels: Iterable[str]) -> list[str]:
    """Order class labels for tables: benign, malignant, normal, then the others sorted.

    Parameters
    ----------
    labels : iterable of str
        Labels, with repeats.

    Returns
    -------
    list of str
        Each distinct label once.
    """
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
        for g in group_order(labels):
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
