"""Metrics of the image-level class head and of the normal-scan gate.

ROC AUC with bootstrap CIs, reliability curves, the class-head summary and the gate's
false-positive rate with the gate on and off. Part of :mod:`busseg.metrics` (which
re-exports the public names); numpy and scipy only.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from busseg.metrics_summary import LESION_LABELS, finite_values, group_order


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

    y, s = _binary_scores(labels, scores)
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
    labels, scores : array-like
        (N,) each, as for :func:`roc_auc`.
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
    for lab in group_order(labs.tolist()):
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
    x, _ = finite_values(values)
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
