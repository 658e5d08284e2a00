"""Tests for busseg.metrics: hand-computed cases, empty-mask conventions, HD95, summaries."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy import ndimage
from scipy.spatial.distance import cdist

from busseg.metrics import (
    bootstrap_ci,
    correction_effort,
    dice_score,
    hausdorff_distance,
    iou_score,
    segmentation_metrics,
    summarize,
    summary_markdown,
)


def square(shape=(64, 64), top=10, left=10, size=20):
    m = np.zeros(shape, dtype=bool)
    m[top : top + size, left : left + size] = True
    return m


def brute_force_hd(pred, truth, percentile, spacing=(1.0, 1.0), connectivity=1):
    """medpy's definition written out with explicit point sets (no distance transform)."""
    structure = ndimage.generate_binary_structure(2, connectivity)
    surf_p = pred ^ ndimage.binary_erosion(pred, structure=structure)
    surf_t = truth ^ ndimage.binary_erosion(truth, structure=structure)
    cp = np.argwhere(surf_p) * np.asarray(spacing)
    ct = np.argwhere(surf_t) * np.asarray(spacing)
    d = cdist(cp, ct)
    return float(np.percentile(np.concatenate([d.min(axis=1), d.min(axis=0)]), percentile))


def blob(seed, shape=(48, 48), level=0.6):
    rng = np.random.default_rng(seed)
    smooth = ndimage.gaussian_filter(rng.random(shape), sigma=4)
    return smooth > np.quantile(smooth, level)


# --------------------------------------------------------------------------- per image


def test_identical_masks():
    m = square()
    r = segmentation_metrics(m, m)
    for key in ("dice", "iou", "precision", "recall", "accuracy"):
        assert r[key] == 1.0
    assert r["hd95"] == 0.0
    assert (r["tp"], r["fp"], r["fn"], r["tn"]) == (400, 0, 0, 64 * 64 - 400)
    assert r["pred_area"] == r["true_area"] == 400
    assert r["any_pred"] is True


def test_disjoint_masks():
    pred = square(top=0, left=0, size=10)
    truth = square(top=30, left=0, size=10)
    r = segmentation_metrics(pred, truth)
    assert r["dice"] == r["iou"] == r["precision"] == r["recall"] == 0.0
    assert r["tp"] == 0 and r["fp"] == 100 and r["fn"] == 100
    assert r["accuracy"] == pytest.approx((64 * 64 - 200) / (64 * 64))
    # every surface pixel is at least 21 rows (row 9 -> row 30) from the other square
    assert r["hd95"] >= 21.0
    assert hausdorff_distance(pred, truth, percentile=0) == pytest.approx(21.0)


def test_both_empty():
    z = np.zeros((32, 40), dtype=np.uint8)
    r = segmentation_metrics(z, z)
    assert r["dice"] == r["iou"] == r["precision"] == r["recall"] == r["accuracy"] == 1.0
    assert r["hd95"] == 0.0
    assert r["any_pred"] is False
    assert r["tn"] == 32 * 40 and r["pred_area"] == r["true_area"] == 0
    assert dice_score(z, z) == iou_score(z, z) == 1.0
    assert correction_effort(z, z) == 0.0
    assert hausdorff_distance(z, z, percentile=100) == 0.0


def test_truth_empty_prediction_not():
    pred = square(size=5)
    truth = np.zeros_like(pred)
    r = segmentation_metrics(pred, truth)
    assert r["dice"] == r["iou"] == r["precision"] == 0.0
    assert math.isnan(r["recall"])
    assert math.isnan(r["hd95"])
    assert r["any_pred"] is True and r["fp"] == 25
    assert correction_effort(pred, truth) == 25.0  # denominator max(|T|, 1) = 1


def test_prediction_empty_truth_not():
    truth = square(size=5)
    pred = np.zeros_like(truth)
    r = segmentation_metrics(pred, truth)
    assert r["dice"] == r["iou"] == r["precision"] == r["recall"] == 0.0
    assert math.isnan(r["hd95"])
    assert r["any_pred"] is False and r["fn"] == 25
    assert correction_effort(pred, truth) == 1.0
    assert math.isnan(hausdorff_distance(pred, truth))


def test_known_overlap_half_shift():
    # 10x10 squares overlapping on a 10x5 strip: TP=50, FP=50, FN=50 in a 20x20 image
    pred = np.zeros((20, 20), dtype=bool)
    truth = np.zeros((20, 20), dtype=bool)
    pred[0:10, 0:10] = True
    truth[0:10, 5:15] = True
    r = segmentation_metrics(pred, truth)
    assert (r["tp"], r["fp"], r["fn"], r["tn"]) == (50, 50, 50, 250)
    assert r["dice"] == pytest.approx(2 * 50 / (100 + 100))  # 0.5
    assert r["iou"] == pytest.approx(50 / 150)
    assert r["precision"] == pytest.approx(0.5)
    assert r["recall"] == pytest.approx(0.5)
    assert r["accuracy"] == pytest.approx(300 / 400)
    assert dice_score(pred, truth) == pytest.approx(0.5)
    assert iou_score(pred, truth) == pytest.approx(1 / 3)
    assert correction_effort(pred, truth) == pytest.approx(100 / 100)


def test_known_overlap_prediction_inside_truth():
    truth = np.zeros((20, 20), dtype=bool)
    truth[0:10, 0:10] = True  # 100 px
    pred = np.zeros_like(truth)
    pred[2:6, 2:7] = True  # 20 px, all inside
    r = segmentation_metrics(pred, truth)
    assert r["dice"] == pytest.approx(2 * 20 / 120)
    assert r["iou"] == pytest.approx(20 / 100)
    assert r["precision"] == 1.0
    assert r["recall"] == pytest.approx(0.2)
    assert correction_effort(pred, truth) == pytest.approx(80 / 100)


def test_scalar_helpers_match_and_iou_dice_relation():
    for seed in range(5):
        p, t = blob(seed), blob(seed + 100)
        r = segmentation_metrics(p, t)
        assert dice_score(p, t) == pytest.approx(r["dice"])
        assert iou_score(p, t) == pytest.approx(r["iou"])
        assert r["iou"] == pytest.approx(r["dice"] / (2 - r["dice"]))


def test_any_array_greater_than_zero_is_lesion():
    m = square(size=8)
    as_255 = m.astype(np.uint8) * 255
    as_float = m.astype(np.float32) * 0.7
    as_labels = m.astype(np.int64) * 3 - (~m).astype(np.int64)  # -1 background, 2 lesion
    ref = segmentation_metrics(m, m)
    for arr in (as_255, as_float, as_labels, m.tolist()):
        assert segmentation_metrics(arr, m) == ref


def test_result_is_plain_json_types():
    r = segmentation_metrics(square(), square(left=12))
    json.dumps(r)
    assert all(type(r[k]) is int for k in ("tp", "fp", "fn", "tn", "pred_area", "true_area"))
    assert all(type(r[k]) is float for k in ("dice", "iou", "precision", "recall", "hd95"))


@pytest.mark.parametrize(
    "func",
    [segmentation_metrics, dice_score, iou_score, correction_effort, hausdorff_distance],
)
def test_shape_mismatch_raises_with_both_shapes(func):
    with pytest.raises(ValueError, match=r"\(20, 30\).*\(20, 31\)"):
        func(np.zeros((20, 30)), np.zeros((20, 31)))


def test_empty_array_raises():
    with pytest.raises(ValueError, match="non-empty"):
        segmentation_metrics(np.zeros((0, 5)), np.zeros((0, 5)))


# --------------------------------------------------------------------------- HD95


@pytest.mark.parametrize("k", [1, 3, 5])
@pytest.mark.parametrize("axis", [0, 1])
def test_hd95_offset_squares_equals_offset(k, axis):
    # 20x20 squares shifted by k px: the trailing edge of one square is exactly k from the
    # other surface (20 px each way), a band of the far edge also sits at k, everything else
    # is closer; well over 5 % of the 152 surface distances equal k, none exceed it.
    truth = square()
    pred = np.roll(truth, k, axis=axis)
    r = segmentation_metrics(pred, truth)
    assert r["hd95"] == pytest.approx(k)
    assert hausdorff_distance(pred, truth, percentile=100) == pytest.approx(k)
    assert r["hd95"] == pytest.approx(brute_force_hd(pred, truth, 95))


def test_hd95_ignores_single_far_outlier_but_max_does_not():
    truth = square()  # rows/cols 10..29
    pred = truth.copy()
    pred[55, 20] = True  # 26 rows below the bottom edge (row 29)
    assert hausdorff_distance(pred, truth, percentile=100) == pytest.approx(26.0)
    # 1 of 153 surface distances is non-zero: below the 95th percentile
    assert segmentation_metrics(pred, truth)["hd95"] == 0.0
    assert hausdorff_distance(pred, truth) == 0.0


def test_hd_is_symmetric():
    p, t = blob(1), blob(2)
    assert hausdorff_distance(p, t) == pytest.approx(hausdorff_distance(t, p))


@pytest.mark.parametrize("seed", range(4))
def test_hd_matches_brute_force_medpy_definition(seed):
    p, t = blob(seed), blob(seed + 50)
    p[:, :3] = True  # touch the image edge: the edge row/column is surface (medpy)
    for q in (50, 95, 100):
        assert hausdorff_distance(p, t, percentile=q) == pytest.approx(brute_force_hd(p, t, q))
    assert hausdorff_distance(p, t, 95, connectivity=2) == pytest.approx(
        brute_force_hd(p, t, 95, connectivity=2)
    )
    spacing = (0.8, 0.3)
    assert segmentation_metrics(p, t, spacing=spacing)["hd95"] == pytest.approx(
        brute_force_hd(p, t, 95, spacing=spacing)
    )


def test_spacing_scales_hd95():
    truth = square()
    cols = np.roll(truth, 4, axis=1)  # shifted 4 columns
    rows = np.roll(truth, 4, axis=0)  # shifted 4 rows
    assert segmentation_metrics(cols, truth, spacing=0.5)["hd95"] == pytest.approx(2.0)
    assert segmentation_metrics(cols, truth, spacing=(2.0, 0.5))["hd95"] == pytest.approx(2.0)
    assert segmentation_metrics(rows, truth, spacing=(2.0, 0.5))["hd95"] == pytest.approx(8.0)
    # spacing changes distances only
    a = segmentation_metrics(cols, truth)
    b = segmentation_metrics(cols, truth, spacing=0.5)
    assert {k: v for k, v in a.items() if k != "hd95"} == {
        k: v for k, v in b.items() if k != "hd95"
    }


@pytest.mark.parametrize("spacing", [0.0, -1.0, (1.0, 2.0, 3.0), float("nan"), "x"])
def test_invalid_spacing_raises(spacing):
    with pytest.raises(ValueError):
        segmentation_metrics(square(), square(), spacing=spacing)


def test_invalid_percentile_raises():
    with pytest.raises(ValueError, match="percentile"):
        hausdorff_distance(square(), square(), percentile=101)


# --------------------------------------------------------------------------- summaries


def make_rows():
    def row(label, dice, iou, hd95, true_area, any_pred):
        return dict(
            label=label, dice=dice, iou=iou, hd95=hd95, true_area=true_area, any_pred=any_pred
        )

    nan = math.nan
    return [
        row("benign", 0.8, 0.6, 4.0, 10, True),
        row("benign", 0.6, 0.4, 6.0, 10, True),
        row("benign", 0.0, 0.0, nan, 10, False),  # missed lesion: HD95 undefined
        row("malignant", 0.5, 0.3, 10.0, 9, True),
        row("normal", 1.0, 1.0, 0.0, 0, False),  # empty truth, nothing predicted
        row("normal", 1.0, 1.0, 0.0, 0, False),
        row("normal", 0.0, 0.0, nan, 0, True),  # empty truth, false positive
    ]


def test_summarize_groups_and_statistics():
    s = summarize(make_rows())
    assert list(s) == ["benign", "malignant", "normal", "lesion", "all"]
    assert [s[g]["n"] for g in s] == [3, 1, 3, 4, 7]

    b = s["benign"]["metrics"]
    assert b["dice"]["mean"] == pytest.approx((0.8 + 0.6 + 0.0) / 3)
    assert b["dice"]["median"] == pytest.approx(0.6)
    assert b["dice"]["std"] == pytest.approx(np.std([0.8, 0.6, 0.0], ddof=1))
    assert b["dice"]["n"] == 3 and b["dice"]["n_nan"] == 0
    # nan-aware: the nan HD95 is counted, not averaged
    assert b["hd95"]["mean"] == pytest.approx(5.0)
    assert b["hd95"]["n"] == 2 and b["hd95"]["n_nan"] == 1
    # one value: mean defined, std undefined
    m = s["malignant"]["metrics"]["dice"]
    assert m["mean"] == 0.5 and math.isnan(m["std"]) and m["n"] == 1

    lesion = s["lesion"]["metrics"]["dice"]
    assert lesion["mean"] == pytest.approx((0.8 + 0.6 + 0.0 + 0.5) / 4)
    assert s["all"]["metrics"]["hd95"]["n_nan"] == 2
    # only metrics present in every row are summarized by default
    assert set(b) == {"dice", "iou", "hd95"}


def test_summarize_false_positive_rate():
    s = summarize(make_rows())
    assert s["normal"]["n_empty_truth"] == 3
    assert s["normal"]["n_fp"] == 1
    assert s["normal"]["fp_rate"] == pytest.approx(1 / 3)
    assert s["all"]["fp_rate"] == pytest.approx(1 / 3)
    assert s["benign"]["n_empty_truth"] == 0 and math.isnan(s["benign"]["fp_rate"])


def test_summarize_with_real_metric_rows():
    truth = square(size=10)
    empty = np.zeros_like(truth)
    rows = [
        dict(segmentation_metrics(truth, truth), label="benign"),
        dict(segmentation_metrics(empty, truth), label="malignant"),
        dict(segmentation_metrics(empty, empty), label="normal"),
        dict(segmentation_metrics(truth, empty), label="normal"),
    ]
    s = summarize(rows)
    assert s["normal"]["fp_rate"] == 0.5
    assert s["lesion"]["metrics"]["dice"]["mean"] == 0.5
    assert s["lesion"]["metrics"]["hd95"]["n_nan"] == 1
    assert s["normal"]["metrics"]["recall"]["n_nan"] == 1
    assert set(s["all"]["metrics"]) == {"dice", "iou", "precision", "recall", "accuracy", "hd95"}


def test_summarize_options_and_errors():
    rows = make_rows()
    only_all = summarize(rows, by=None)
    assert list(only_all) == ["all"]
    s = summarize(rows, metrics=["dice"], ci=0.9, n_boot=200)
    d = s["all"]["metrics"]["dice"]
    assert d["ci_low"] <= d["mean"] <= d["ci_high"]
    assert set(s["all"]["metrics"]) == {"dice"}
    with pytest.raises(KeyError, match="precision"):
        summarize(rows, metrics=["precision"])
    with pytest.raises(KeyError, match="split"):
        summarize(rows, by="split")
    with pytest.raises(ValueError, match="empty"):
        summarize([])


def test_bootstrap_ci_contains_mean_and_is_deterministic():
    values = np.random.default_rng(42).beta(5, 2, size=120)
    low, high = bootstrap_ci(values, n_boot=1000, seed=3)
    assert low < values.mean() < high
    assert high - low < 0.2
    assert bootstrap_ci(values, n_boot=1000, seed=3) == (low, high)
    assert bootstrap_ci(values, n_boot=1000, seed=4) != (low, high)
    narrow = bootstrap_ci(values, n_boot=1000, ci=0.5, seed=3)
    assert low <= narrow[0] <= narrow[1] <= high


def test_bootstrap_ci_ignores_nan_and_edge_cases():
    values = [0.2, 0.4, 0.9, 0.7]
    assert bootstrap_ci([*values, math.nan, None], n_boot=300) == bootstrap_ci(values, n_boot=300)
    assert all(math.isnan(v) for v in bootstrap_ci([math.nan, math.nan]))
    assert bootstrap_ci([0.5]) == (0.5, 0.5)
    with pytest.raises(ValueError, match="ci"):
        bootstrap_ci(values, ci=95)
    with pytest.raises(ValueError, match="n_boot"):
        bootstrap_ci(values, n_boot=0)


def test_summary_markdown_table():
    s = summarize(make_rows())
    md = summary_markdown(s)
    lines = md.strip().splitlines()
    assert lines[0] == "| Group | n | Dice | IoU | Precision | Recall | HD95 (px) | FP rate |"
    assert len(lines) == 2 + 5  # header, separator, 5 groups
    benign = next(line for line in lines if line.startswith("| benign "))
    assert "0.467 ± 0.416" in benign  # dice mean ± sample std
    assert "5.0 ± 1.4 (1 nan)" in benign  # hd95
    assert benign.rstrip(" |").endswith("–")  # no empty-truth images: no FP rate
    normal = next(line for line in lines if line.startswith("| normal "))
    assert "0.333 (1/3)" in normal
    # precision/recall absent from these rows: shown as undefined
    assert "| – | – |" in benign
    # no FP-rate column without empty-truth images
    lesion_only = summarize([r for r in make_rows() if r["label"] != "normal"])
    assert "FP rate" not in summary_markdown(lesion_only, hd95_unit="mm")
    assert "HD95 (mm)" in summary_markdown(lesion_only, hd95_unit="mm")


# --------------------------------------------------------------------------- class head


def test_roc_auc_ci_matches_roc_auc_and_brackets_it():
    from busseg.metrics import roc_auc, roc_auc_ci

    rng = np.random.default_rng(0)
    y = rng.random(300) < 0.3
    s = rng.normal(size=300) + 1.0 * y
    r = roc_auc_ci(y, s, n_boot=500, seed=1)
    assert r["auc"] == pytest.approx(roc_auc(y, s), abs=1e-12)
    assert r["n_pos"] == int(y.sum()) and r["n_neg"] == int((~y).sum())
    assert r["ci_low"] < r["auc"] < r["ci_high"] and r["ci_high"] - r["ci_low"] < 0.25
    assert roc_auc_ci(y, s, n_boot=500, seed=1) == r
    # perfect separation: every stratified resample is perfect too
    perfect = roc_auc_ci([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9], n_boot=50)
    assert (perfect["auc"], perfect["ci_low"], perfect["ci_high"]) == (1.0, 1.0, 1.0)
    # ties count one half
    assert roc_auc_ci([0, 1], [0.5, 0.5], n_boot=10)["auc"] == 0.5
    missing = roc_auc_ci([1, 1], [0.2, 0.3], n_boot=10)
    assert all(math.isnan(missing[k]) for k in ("auc", "ci_low", "ci_high"))
    with pytest.raises(ValueError, match="differ in length"):
        roc_auc_ci([0, 1], [0.5])
    with pytest.raises(ValueError, match="n_boot"):
        roc_auc_ci([0, 1], [0.1, 0.9], n_boot=0)


def test_reliability_curve_by_hand():
    from busseg.metrics import reliability_curve

    r = reliability_curve([0, 1, 1, 1, 1], [0.05, 0.05, 0.95, 0.95, 1.0], n_bins=10)
    assert r["count"] == [2, 0, 0, 0, 0, 0, 0, 0, 0, 3]  # 1.0 falls into the last bin
    assert r["predicted"][0] == pytest.approx(0.05) and r["observed"][0] == 0.5
    assert math.isnan(r["predicted"][1]) and math.isnan(r["observed"][1])
    assert r["predicted"][9] == pytest.approx((0.95 + 0.95 + 1.0) / 3) and r["observed"][9] == 1
    # ECE = 2/5 * |0.5 - 0.05| + 3/5 * |1 - 0.9667|
    assert r["ece"] == pytest.approx(0.4 * 0.45 + 0.6 * (1 - 2.9 / 3))
    assert r["n"] == 5 and len(r["bin_edges"]) == 11
    assert reliability_curve([1, 0], [1.0, 0.0])["ece"] == 0.0  # perfectly calibrated
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        reliability_curve([1], [1.5])
    with pytest.raises(ValueError, match="n_bins"):
        reliability_curve([1], [0.5], n_bins=0)


def test_class_head_summary():
    from busseg.metrics import class_head_summary

    def cp(n, b, m):
        return {"normal": n, "benign": b, "malignant": m}

    labels = ["normal", "normal", "benign", "benign", "malignant", "malignant"]
    probs = [cp(0.9, 0.05, 0.05), cp(0.6, 0.3, 0.1), cp(0.2, 0.7, 0.1), cp(0.1, 0.6, 0.3),
             cp(0.3, 0.1, 0.6), cp(0.05, 0.15, 0.8)]
    s = class_head_summary(labels, probs, n_boot=100)
    assert s["n"] == 6
    # malignancy given a lesion: benign 0.125, 1/3; malignant 6/7, 0.842: perfectly ranked
    assert s["auc_malignant_vs_benign"]["auc"] == 1.0
    assert (s["auc_malignant_vs_benign"]["n_pos"], s["auc_malignant_vs_benign"]["n_neg"]) == (2, 2)
    # P(lesion) = 1 - P(normal): normal 0.1, 0.4; lesion 0.8, 0.9, 0.7, 0.95: all above
    assert s["auc_lesion_vs_normal"]["auc"] == 1.0
    assert s["calibration"]["n"] == 6 and 0.0 <= s["calibration"]["ece"] <= 1.0
    assert s["p_normal"]["normal"]["median"] == pytest.approx(0.75)
    assert list(s["p_normal"]) == ["benign", "malignant", "normal"]
    # a lesion-only set (BUS-BRA): lesion vs normal is undefined, malignancy is not
    s2 = class_head_summary(labels[2:], probs[2:], n_boot=50)
    assert math.isnan(s2["auc_lesion_vs_normal"]["auc"])
    assert s2["auc_malignant_vs_benign"]["auc"] == 1.0
    assert class_head_summary(labels, [None] * 6) is None  # a model without a class head
    with pytest.raises(ValueError, match="lack the class"):
        class_head_summary(["benign"], [{"normal": 0.5, "benign": 0.5}])
