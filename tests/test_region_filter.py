"""The region filter (busseg.region_filter), its use in inference, the CLI, the segment job
and the widget, and the cost helpers of busseg.annotator used to choose it."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from busseg.region_filter import (
    FEATURE_NAMES,
    RegionFilter,
    component_features,
    describe_filter,
    label_components,
)

REPO = Path(__file__).resolve().parents[1]
#: A rule that keeps no component (no component covers 10x the image).
REMOVE_ALL = RegionFilter.rule("log_area", 1.0).to_dict()


def _col(name):
    return FEATURE_NAMES.index(name)


def _scene():
    """Grey 60x80 image: a dark 20x30 lesion on bright tissue and a small dark blob."""
    image = np.full((60, 80), 200, np.uint8)
    mask = np.zeros((60, 80), bool)
    image[10:30, 20:50] = 40
    mask[10:30, 20:50] = True  # component 1: 600 px, wider than tall
    image[45:48, 70:73] = 60
    mask[45:48, 70:73] = True  # component 2: 9 px
    proba = np.where(mask, 0.6, 0.1).astype(np.float32)
    proba[15:25, 30:40] = 0.99
    return image, mask, proba


# --------------------------------------------------------------------------- features


def test_component_features_on_a_synthetic_scene():
    image, mask, proba = _scene()
    cp = {"normal": 0.2, "benign": 0.5, "malignant": 0.3}
    f = component_features(mask, proba, image, cp)
    assert f.shape == (2, len(FEATURE_NAMES)) and f.dtype == np.float64
    big, small = f
    assert big[_col("log_area")] == pytest.approx(math.log10(600 / 4800))
    assert big[_col("area_share")] == pytest.approx(600 / 609)
    assert small[_col("area_share")] == pytest.approx(9 / 609)
    assert big[_col("max_proba")] == pytest.approx(0.99)
    assert small[_col("max_proba")] == pytest.approx(0.6)
    assert big[_col("share_095")] == pytest.approx(100 / 600)
    assert big[_col("mean_proba")] == pytest.approx((100 * 0.99 + 500 * 0.6) / 600, rel=1e-5)
    assert (big[_col("rank")], small[_col("rank")]) == (1, 2)
    assert big[_col("n_components")] == small[_col("n_components")] == 2
    assert big[_col("p_benign")] == 0.5 and small[_col("p_normal")] == 0.2
    assert big[_col("centroid_row")] == pytest.approx(20 / 60)
    assert big[_col("centroid_col_offset")] == pytest.approx(abs(35 / 80 - 0.5))
    assert big[_col("log_aspect")] == pytest.approx(math.log10(20 / 30))
    assert big[_col("extent")] == pytest.approx(1.0)
    # dark inside, bright ring: the contrast (ring - inside) is positive, the spread is 0
    assert big[_col("contrast")] > 1.0 and big[_col("std_inside")] == pytest.approx(0, abs=1e-6)
    assert big[_col("mean_ring")] - big[_col("mean_inside")] == pytest.approx(
        big[_col("contrast")])


def test_features_of_an_empty_mask_and_bad_shapes():
    image, mask, proba = _scene()
    assert component_features(np.zeros_like(mask), proba, image, None).shape == (0, 19)
    with pytest.raises(ValueError, match="differ in size"):
        component_features(mask, proba[:10], image, None)
    with pytest.raises(ValueError, match="differ in size"):
        component_features(mask, proba, image[:10], None)
    # without a class head the class features are 1/3 each
    f = component_features(mask, proba, image, None)
    assert np.allclose(f[:, _col("p_normal")], 1 / 3)


def test_components_are_8_connected():
    m = np.zeros((5, 5), bool)
    m[1, 1] = m[2, 2] = True  # diagonal neighbours: one component
    m[4, 4] = True
    assert label_components(m)[1] == 2


# --------------------------------------------------------------------------- apply


def test_apply_removes_what_scores_below_the_threshold():
    image, mask, proba = _scene()
    rule = RegionFilter.rule("log_area", math.log10(100 / 4800))  # min 100 px
    res = rule.apply(mask, proba, image)
    assert (res.removed, res.kept) == (1, 1)
    assert res.mask.sum() == 600 and res.removed_mask.sum() == 9
    assert not (res.mask & res.removed_mask).any()
    assert res.scores.shape == (2,) and res.scores[0] > 0.5 > res.scores[1]
    assert mask.sum() == 609  # the input is not modified
    peak = RegionFilter.rule("max_proba", 0.95)
    assert peak.apply(mask, proba, image).mask.sum() == 600
    keep_all = RegionFilter.from_dict({**rule.to_dict(), "threshold": 0.0})
    assert keep_all.apply(mask, proba, image).removed == 0
    empty = rule.apply(np.zeros_like(mask), proba, image)
    assert (empty.removed, empty.kept) == (0, 0) and not empty.mask.any()


def test_logistic_scores_follow_the_formula():
    rng = np.random.default_rng(0)
    f = RegionFilter(["max_proba", "log_area"], [0.8, -2.0], [0.1, 0.5], [2.0, -1.0], 0.3, 0.4)
    x = rng.normal(size=(5, len(FEATURE_NAMES)))
    z = 0.3 + 2.0 * (x[:, _col("max_proba")] - 0.8) / 0.1 - (x[:, _col("log_area")] + 2) / 0.5
    np.testing.assert_allclose(f.scores(x), 1 / (1 + np.exp(-z)))
    with pytest.raises(ValueError, match=r"features must be \(n, 19\)"):
        f.scores(x[:, :3])


# --------------------------------------------------------------------------- (de)serialisation


def test_to_dict_from_dict_round_trip_through_json():
    rng = np.random.default_rng(1)
    n = len(FEATURE_NAMES)
    f = RegionFilter(list(FEATURE_NAMES), rng.normal(size=n).tolist(),
                     rng.uniform(0.5, 2, n).tolist(), rng.normal(size=n).tolist(), -0.7, 0.35,
                     info={"fitted_on": "x"})
    d = json.loads(json.dumps(f.to_dict()))
    g = RegionFilter.from_dict(d)
    assert g.to_dict() == f.to_dict()
    x = rng.normal(size=(7, n))
    np.testing.assert_array_equal(f.scores(x), g.scores(x))
    assert "lesion probability" in describe_filter(d) and "0.35" in describe_filter(g)
    assert describe_filter(None) == "none"
    assert "max_proba is below 0.9" in RegionFilter.rule("max_proba", 0.9).describe()


@pytest.mark.parametrize("change, match", [
    ({"threshold": 1.5}, "threshold must be in"),
    ({"threshold": "high"}, "threshold must be a number"),
    ({"intercept": float("nan")}, "intercept must be finite"),
    ({"coef": [1.0, 2.0]}, "coef must be a list of 1"),
    ({"scale": [0.0]}, "scale must be > 0"),
    ({"mean": [True]}, r"mean\[0\] must be a number"),
    ({"features": ["colour"]}, "unknown feature"),
    ({"features": []}, "feature_names is empty"),
    ({"features": "max_proba"}, "features must be a list"),
])
def test_from_dict_validation_errors_say_what_is_wrong(change, match):
    d = {**RegionFilter.rule("max_proba", 0.9).to_dict(), **change}
    with pytest.raises(ValueError, match=match):
        RegionFilter.from_dict(d)


def test_from_dict_missing_keys_and_wrong_type():
    d = RegionFilter.rule("max_proba", 0.9).to_dict()
    del d["coef"]
    with pytest.raises(ValueError, match=r"missing key\(s\) \['coef'\].*fit_region_filter"):
        RegionFilter.from_dict(d)
    with pytest.raises(ValueError, match="expected a JSON object"):
        RegionFilter.from_dict([1, 2])


# --------------------------------------------------------------------------- inference


@pytest.fixture
def filtered_checkpoint(make_head_checkpoint):
    """A class-head prompt checkpoint (no gate, threshold 0.3) whose filter removes every
    region, and the same one without a filter."""
    on = make_head_checkpoint({}, name="rf_on", threshold=0.3, region_filter=REMOVE_ALL)
    off = make_head_checkpoint({}, name="rf_off", threshold=0.3)
    return on, off


def _image(seed=0, shape=(64, 64)):
    return np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)


def test_predict_applies_the_stored_filter_in_automatic_mode_only(filtered_checkpoint):
    from busseg.inference import load_model, predict, predict_mask

    on, off = (load_model(p, device="cpu") for p in filtered_checkpoint)
    image = _image()
    plain = predict(image, off)
    assert plain.mask.any() and plain.regions_removed == 0  # no key: as before
    filt = predict(image, on)
    assert not filt.mask.any() and filt.regions_removed == label_components(plain.mask)[1]
    np.testing.assert_array_equal(filt.proba, plain.proba)
    # switched off: the same as the checkpoint without a filter
    for arg in (None, False):
        res = predict(image, on, region_filter=arg)
        np.testing.assert_array_equal(res.mask, plain.mask)
        assert res.regions_removed == 0
    np.testing.assert_array_equal(predict_mask(image, on, region_filter=None), plain.mask)
    assert not predict_mask(image, on).any()
    # a filter given as an argument overrides the stored one; a bad one is refused
    res = predict(image, off, region_filter=RegionFilter.rule("log_area", -9.0))
    np.testing.assert_array_equal(res.mask, plain.mask)
    with pytest.raises(ValueError, match="region_filter must be"):
        predict(image, on, region_filter="yes")
    # prompted masks are never filtered
    box = np.array([[8, 8, 50, 50]])
    for kw in ({"boxes": box}, {"points": np.array([[30, 30]]), "point_labels": [1]}):
        a = predict(image, on, **kw)
        b = predict(image, on, region_filter=None, **kw)
        np.testing.assert_array_equal(a.mask, b.mask)
        assert a.regions_removed == 0
        assert a.mask.any()


def test_stack_iter_filters_and_reports(filtered_checkpoint):
    from busseg.inference import load_model, predict, predict_stack_iter

    on, off = (load_model(p, device="cpu") for p in filtered_checkpoint)
    images = [_image(1), _image(2)]
    out = list(predict_stack_iter(images, on, with_class=True, with_info=True))
    for (_i, mask, _p, _cp, info), im in zip(out, images, strict=True):
        ref = predict(im, off)
        assert not mask.any()
        assert info == {"gated": False, "regions_removed": label_components(ref.mask)[1]}
    for (_i, mask, _p), im in zip(predict_stack_iter(images, on, region_filter=None), images,
                                  strict=True):
        np.testing.assert_array_equal(mask, predict(im, off).mask)


def test_invalid_stored_filter_is_reported(make_head_checkpoint):
    from busseg.inference import load_model, predict

    bad = {**REMOVE_ALL, "threshold": 7}
    model = load_model(make_head_checkpoint({}, name="rf_bad", region_filter=bad), device="cpu")
    with pytest.raises(ValueError, match="threshold must be in"):
        predict(_image(), model)
    assert predict(_image(), model, region_filter=None).mask.shape == (64, 64)


def test_segment_job_switch(filtered_checkpoint):
    from busseg.engine import drain
    from busseg.inference import load_model, predict
    from busseg.jobs import segment_job

    on, off = filtered_checkpoint
    image = _image(3)
    ref = predict(image, load_model(off, device="cpu"))
    res = drain(segment_job(image, rgb=False, checkpoint=on, device="cpu"))
    assert not res.labels.any() and res.extra["regions_removed"] == [
        label_components(ref.mask)[1]]
    assert res.extra["gated"] == [False]
    res = drain(segment_job(image, rgb=False, checkpoint=on, device="cpu", region_filter=False))
    np.testing.assert_array_equal(res.labels > 0, ref.mask)
    assert res.extra["regions_removed"] == [0]


# --------------------------------------------------------------------------- CLI


def test_cli_no_region_filter_and_info(filtered_checkpoint, tmp_path, capsys):
    from PIL import Image

    from busseg.cli import main

    on, _ = filtered_checkpoint
    src = tmp_path / "scan.png"
    Image.fromarray(_image(4)).save(src)
    assert main(["predict", str(src), "--out", str(tmp_path / "a"), "--checkpoint", str(on),
                 "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "region filter on (removes mask regions whose log_area is below 1)" in out
    assert main(["predict", str(src), "--out", str(tmp_path / "b"), "--checkpoint", str(on),
                 "--device", "cpu", "--no-region-filter"]) == 0
    assert "region filter off (--no-region-filter)" in capsys.readouterr().out
    a = np.asarray(Image.open(tmp_path / "a" / "scan_mask.png")) > 0
    b = np.asarray(Image.open(tmp_path / "b" / "scan_mask.png")) > 0
    assert not a.any() and b.any()
    assert main(["info", "--checkpoint", str(on)]) == 0
    out = capsys.readouterr().out
    assert "region filter (automatic masks only): on (removes" in out
    assert "measured with other settings" not in out
    # test figures measured before the filter: info says so
    cfg = json.loads((on / "config.json").read_text())
    cfg["metrics"] = {"test": {"lesion": {"dice": 0.7}},
                      "test_settings": {"normal_gate": None, "region_filter": None}}
    (on / "config.json").write_text(json.dumps(cfg))
    assert main(["info", "--checkpoint", str(on)]) == 0
    out = capsys.readouterr().out
    assert "lesion Dice 0.700" in out
    assert ("(test figures measured with other settings: normal-scan gate none; region "
            "filter none)") in out


def test_info_without_a_stored_filter(tiny_checkpoint, capsys):
    from busseg.cli import main

    assert main(["info", "--checkpoint", str(tiny_checkpoint)]) == 0
    assert "region filter (automatic masks only): none stored" in capsys.readouterr().out


# --------------------------------------------------------------------------- annotator cost


def _toy_prompt(truth):
    """A deterministic prompt model: the box alone gives the truth eroded twice; each click
    grows it back by one pixel (so it converges after a few clicks)."""
    from scipy import ndimage

    def prompt(boxes, points, labels, previous):
        return ndimage.binary_erosion(truth, iterations=max(0, 3 - len(points)))

    return prompt


def test_scan_cost_from_a_prompt_path_equals_annotate_scan():
    from busseg.annotator import annotate_scan, prompt_path, scan_cost

    rng = np.random.default_rng(0)
    truth = np.zeros((60, 60), bool)
    truth[20:40, 15:45] = True
    truth[5:9, 50:55] = True  # two lesions: two boxes
    autos = [np.zeros_like(truth), truth.copy(), truth & (np.arange(60)[:, None] < 35)]
    for _ in range(20):
        a = rng.random(truth.shape) < rng.uniform(0, 0.02)
        a[20:40, 15:45] |= rng.random() < 0.5
        autos.append(a)
    far = truth.copy()
    far[55:58, 0:3] = True  # a false region far from the boxes: one erase
    autos.append(far)
    for max_inter in (20, 4, 3):
        path = prompt_path(truth, _toy_prompt(truth), np.random.default_rng([0, 1]),
                           max_interactions=max_inter)
        for auto in autos:
            want = annotate_scan(auto, truth, _toy_prompt(truth), np.random.default_rng([0, 1]),
                                 max_interactions=max_inter)["interactions"]
            assert scan_cost(auto, truth, path) == want
    normal = np.zeros_like(truth)
    assert scan_cost(normal, normal, None) == 0 and scan_cost(far, normal, None) == 1
    with pytest.raises(ValueError, match="needs its prompt_path"):
        scan_cost(far, truth, None)
    with pytest.raises(ValueError, match="lesion scan"):
        prompt_path(normal, _toy_prompt(truth), np.random.default_rng(0))


# --------------------------------------------------------------------------- real data


def test_shipped_filter_on_real_busi_scans(busi_root):
    """The shipped filter removes the false region of some BUSI normal test scans and keeps
    the lesion of BUSI lesion test scans (the first three of each, split file order)."""
    import csv

    from busseg.data.io import read_image, read_mask
    from busseg.inference import load_model, predict
    from busseg.models import default_checkpoint_path, read_checkpoint_config

    cfg = read_checkpoint_config(default_checkpoint_path())
    assert cfg["inference"].get("region_filter"), (
        "the shipped model stores no region filter; run training/fit_region_filter.py "
        "--checkpoint src/busseg/weights/default --write")
    model = load_model(device="cpu")
    rows = list(csv.DictReader(open(REPO / "training" / "splits" / "busi.csv")))
    test = [r for r in rows if r["split"] == "test"]
    normals = [r["image"] for r in test if r["label"] == "normal"]
    removed_any = False
    for name in normals[:8]:
        image = read_image(busi_root / name)
        res = predict(image, model, normal_gate=None)
        raw = predict(image, model, normal_gate=None, region_filter=None).mask
        if raw.any() and not res.mask.any():
            removed_any = True
            break
    assert removed_any, "no false region removed on the first 8 BUSI normal test scans"
    lesions = [r for r in test if r["label"] != "normal"][:3]
    for r in lesions:
        stem = Path(r["image"]).with_suffix("")
        truth = read_mask(sorted(busi_root.glob(f"{stem}_mask*.png")))
        mask = predict(read_image(busi_root / r["image"]), model).mask
        assert (mask & truth).any(), f"{r['image']}: the lesion was removed"


# --------------------------------------------------------------------------- site refit


def test_refit_follows_the_site_and_stays_near_the_prior():
    rng = np.random.default_rng(0)
    n = len(FEATURE_NAMES)
    base = RegionFilter(list(FEATURE_NAMES), [0.0] * n, [1.0] * n, [0.0] * n, 0.0, 0.5)
    x = rng.normal(size=(400, n))
    y = x[:, _col("contrast")] > 0  # at this site, contrast decides
    weak = base.refit(x, y, strength=1.0)
    strong = base.refit(x, y, strength=1e4)
    assert weak is not base and base.coef == [0.0] * n  # a new filter; the base is unchanged
    acc = ((weak.scores(x) >= 0.5) == y).mean()
    assert acc > 0.95
    assert abs(weak.coef[_col("contrast")]) > 10 * abs(strong.coef[_col("contrast")])
    assert weak.threshold == base.threshold and weak.info["refit"]["n"] == 400
    json.dumps(weak.to_dict())  # plain numbers
    assert base.refit(x, np.ones(400, bool)) is base  # one class: nothing to learn
    with pytest.raises(ValueError, match="strength must be > 0"):
        base.refit(x, y, strength=0)
    with pytest.raises(ValueError, match="features must be"):
        base.refit(x[:, :3], y)


# --------------------------------------------------------------------------- session benchmark


def test_session_benchmark_filter_arms(tmp_path, synthetic_pairs, make_head_checkpoint):
    """--region-filter on,off,site: three arms on the same scans; the filter-off arm sees the
    unfiltered automatic masks, the others the filtered ones (here: empty)."""
    from conftest import load_benchmark, write_busbra

    bench = load_benchmark("annotation_session")
    images, masks = synthetic_pairs(3, size=(64, 64), seed=3)
    rows = [{"ID": f"bus_000{k}-s", "Case": str(k), "Pathology": "benign", "Device": "x",
             "Histology": "x", "BIRADS": "3", "Side": "left", "BBOX": "0,0,1,1"}
            for k in range(3)]
    root = write_busbra(tmp_path / "busbra", images, masks, rows)
    ck = make_head_checkpoint({}, name="rf_bench", threshold=0.3, region_filter=REMOVE_ALL)
    result = bench.main(["--checkpoint", str(ck), "--no-busuclm", "--busbra", str(root),
                         "--learn", "off", "--orders", "file", "--region-filter", "on,off,site",
                         "--refit-every", "2", "--out-dir", str(tmp_path / "out"), "--quiet"])
    arms = {a["region_filter_mode"]: a for a in result["arms"]}
    assert [a["label"] for a in result["arms"]] == [
        f"file order, learning off, region filter {m}" for m in ("on", "off", "site")]
    assert all(s["auto_iou"] == 0 for s in arms["on"]["scans"])  # the filter empties all
    assert any(s["auto_iou"] > 0 for s in arms["off"]["scans"])
    assert arms["site"]["site_refits"] == 1 and arms["on"]["site_refits"] == 0
    md = (tmp_path / "out" / "annotation_session.md").read_text()
    assert "region filter off" in md and "Region filter arms" in md
    with pytest.raises(SystemExit, match="choose from on,off,site"):
        bench.parse_args(["--region-filter", "maybe"])
