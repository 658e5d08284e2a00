"""benchmarks/annotation_session.py: the simulated annotator's protocol and its report.

The protocol (:func:`annotate_scan`) is checked with fake prompt functions whose answers are
known: acceptance at IoU 0.85, the normal-scan clear, one interaction per box and per erased
false region, clicks with the boxes kept and the previous mask fed back, the cap of 20 (then
brushed to the truth). Block aggregation is checked on numbers; one end-to-end run on a fake
BUS-UCLM folder and a fake BUS-BRA folder with a tiny untrained prompt model drives the real
:class:`busseg.session.AnnotationSession` (learning as you go included, a few steps).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import load_benchmark


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("annotation_session")


def _rect(shape, r0, c0, r1, c1):
    m = np.zeros(shape, bool)
    m[r0:r1, c0:c1] = True
    return m


class Recorder:
    """A prompt function that records its calls and answers from a list (last one repeats)."""

    def __init__(self, answers):
        self.answers = list(answers)
        self.calls = []

    def __call__(self, boxes, points, labels, previous):
        self.calls.append((np.asarray(boxes).copy(), np.asarray(points).copy(),
                           np.asarray(labels).copy(),
                           None if previous is None else np.asarray(previous).copy()))
        k = min(len(self.calls), len(self.answers)) - 1
        return self.answers[k]


SHAPE = (60, 80)
TRUTH = _rect(SHAPE, 20, 20, 40, 50)
RNG = np.random.default_rng


# --------------------------------------------------------------------------- acceptance


def test_a_good_automatic_mask_is_accepted_without_interaction(bench):
    auto = TRUTH.copy()
    auto[20:22] = False  # IoU 0.9
    prompt = Recorder([TRUTH])
    res = bench.annotate_scan(auto, TRUTH, prompt, RNG(0))
    assert res["kind"] == "accepted" and res["interactions"] == 0 and res["mask"] is None
    assert prompt.calls == []


def test_acceptance_threshold_is_inclusive_and_exclusive_below(bench):
    auto = TRUTH.copy()
    auto[20:23] = False  # 17/20 rows: IoU exactly 0.85
    assert bench.annotate_scan(auto, TRUTH, Recorder([TRUTH]), RNG(0))["kind"] == "accepted"
    auto[23] = False  # IoU 0.80
    res = bench.annotate_scan(auto, TRUTH, Recorder([TRUTH]), RNG(0))
    assert res["kind"] == "prompted" and res["interactions"] == 1  # one box fixed it


def test_normal_scan_empty_prediction_costs_nothing(bench):
    empty = np.zeros(SHAPE, bool)
    res = bench.annotate_scan(empty, empty, Recorder([empty]), RNG(0))
    assert res["kind"] == "accepted" and res["interactions"] == 0 and res["mask"] is None


def test_normal_scan_false_regions_cost_one_clear(bench):
    empty = np.zeros(SHAPE, bool)
    auto = _rect(SHAPE, 2, 2, 8, 8) | _rect(SHAPE, 40, 60, 50, 70)  # two false regions
    prompt = Recorder([TRUTH])
    res = bench.annotate_scan(auto, empty, prompt, RNG(0))
    assert res["kind"] == "cleared" and res["interactions"] == 1
    assert res["mask"] is not None and not res["mask"].any()
    assert prompt.calls == []  # "no lesion" needs no prompt


# --------------------------------------------------------------------------- box then clicks


def test_one_box_per_lesion_each_one_interaction(bench):
    second = _rect(SHAPE, 5, 60, 15, 75)
    truth = TRUTH | second
    prompt = Recorder([truth])
    res = bench.annotate_scan(np.zeros(SHAPE, bool), truth, prompt, RNG(0))
    assert res["kind"] == "prompted" and res["boxes"] == 2 and res["interactions"] == 2
    boxes, points, _, prev = prompt.calls[0]
    assert boxes.shape == (2, 4) and len(points) == 0 and prev is None


def test_false_regions_outside_the_boxes_cost_one_clear(bench):
    auto = _rect(SHAPE, 0, 0, 5, 5) | _rect(SHAPE, 52, 70, 58, 78)  # far from the lesion
    res = bench.annotate_scan(auto, TRUTH, Recorder([TRUTH]), RNG(0))
    assert res["erases"] == 1 and res["boxes"] == 1 and res["interactions"] == 2
    # a false region inside the box is replaced by the prompt: no clear
    auto = _rect(SHAPE, 21, 21, 25, 25)
    res = bench.annotate_scan(auto, TRUTH, Recorder([TRUTH]), RNG(0))
    assert res["erases"] == 0 and res["interactions"] == 1


def test_clicks_keep_the_box_and_feed_the_previous_mask_back(bench):
    half = _rect(SHAPE, 20, 20, 40, 35)  # IoU 0.5
    better = _rect(SHAPE, 20, 20, 40, 44)  # IoU 0.8
    prompt = Recorder([half, better, TRUTH])
    res = bench.annotate_scan(np.zeros(SHAPE, bool), TRUTH, prompt, RNG(0))
    # box (1) + two clicks: 3 interactions, the box counted as one
    assert res["kind"] == "prompted" and res["interactions"] == 3 and res["clicks"] == 2
    assert res["ious"] == pytest.approx([0.5, 0.8, 1.0])
    np.testing.assert_array_equal(res["mask"], TRUTH)
    box0 = prompt.calls[0][0]
    for k, (boxes, points, labels, prev) in enumerate(prompt.calls[1:], start=1):
        np.testing.assert_array_equal(boxes, box0)  # the box is kept
        assert len(points) == k and len(labels) == k  # all clicks so far
        np.testing.assert_array_equal(prev, prompt.answers[k - 1])  # the previous mask
    # the first click is positive, in the missed part of the lesion (columns 35..49)
    (r, c), lab = prompt.calls[1][1][0], prompt.calls[1][2][0]
    assert lab == 1 and 20 <= r < 40 and 35 <= c < 50


def test_a_scan_that_never_converges_counts_the_cap_and_is_brushed(bench):
    prompt = Recorder([np.zeros(SHAPE, bool)])
    res = bench.annotate_scan(np.zeros(SHAPE, bool), TRUTH, prompt, RNG(0))
    assert res["kind"] == "brushed" and res["interactions"] == 20
    np.testing.assert_array_equal(res["mask"], TRUTH)  # the saved correction is the truth
    assert len(prompt.calls) == 20  # the box, then 19 clicks: 20 interactions in all
    res = bench.annotate_scan(np.zeros(SHAPE, bool), TRUTH, Recorder([np.zeros(SHAPE, bool)]),
                              RNG(0), max_interactions=5)
    assert res["interactions"] == 5 and res["clicks"] == 4


def test_converging_on_the_last_allowed_click_is_not_brushed(bench):
    answers = [np.zeros(SHAPE, bool)] * 19 + [TRUTH]  # box + 18 clicks fail, click 19 fixes
    res = bench.annotate_scan(np.zeros(SHAPE, bool), TRUTH, Recorder(answers), RNG(0))
    assert res["kind"] == "prompted" and res["interactions"] == 20 and res["clicks"] == 19


def test_box_jitter_depends_only_on_the_seed(bench):
    prompt_a, prompt_b = Recorder([TRUTH]), Recorder([TRUTH])
    bench.annotate_scan(np.zeros(SHAPE, bool), TRUTH, prompt_a, np.random.default_rng([0, 7]))
    bench.annotate_scan(np.zeros(SHAPE, bool), TRUTH, prompt_b, np.random.default_rng([0, 7]))
    np.testing.assert_array_equal(prompt_a.calls[0][0], prompt_b.calls[0][0])
    r0, c0, r1, c1 = prompt_a.calls[0][0][0]
    assert abs(r0 - 20) <= 2 and abs(r1 - 39) <= 2 and abs(c0 - 20) <= 3 and abs(c1 - 49) <= 3


# --------------------------------------------------------------------------- aggregation


def test_block_means_of_ten(bench):
    values = list(range(25))
    blocks = bench.block_means(values)
    assert [(b["first"], b["last"], b["n"]) for b in blocks] == [(1, 10, 10), (11, 20, 10),
                                                                (21, 25, 5)]
    assert [b["mean"] for b in blocks] == [4.5, 14.5, 22.0]
    assert sum(b["total"] for b in blocks) == sum(values)
    with pytest.raises(ValueError):
        bench.block_means(values, 0)


def test_summary_counts_kinds_sites_and_finetunes(bench):
    def scan(site, lesion, kind, n):
        return {"site": site, "lesion": lesion, "kind": kind, "interactions": n, "boxes": 0,
                "erases": 0, "clicks": 0}

    scans = [scan("A", True, "accepted", 0), scan("A", False, "cleared", 1),
             scan("B", True, "brushed", 20), scan("B", True, "prompted", 3)]
    s = bench.summarise_arm(scans, [{"adopted": True, "seconds": 20.0},
                                    {"adopted": False, "seconds": 30.0}])
    assert s["interactions"] == 24 and s["per_scan"] == 6.0
    assert s["lesion_per_scan"] == pytest.approx(23 / 3) and s["normal_per_scan"] == 1.0
    assert s["kinds"] == {"accepted": 1, "cleared": 1, "prompted": 1, "brushed": 1}
    assert s["sites"]["A"]["per_scan"] == 0.5 and s["sites"]["B"]["interactions"] == 23
    assert s["finetunes"] == 2 and s["finetunes_adopted"] == 1
    assert s["finetune_seconds"] == 50.0 and s["finetune_seconds_mean"] == 25.0


# --------------------------------------------------------------------------- end to end


def _save_png(path: Path, array: np.ndarray) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


@pytest.fixture
def fake_busuclm(tmp_path, synthetic_pairs):
    """BUS-UCLM-like pairs (colour masks) of patients AAAA, BBBB (test) and CCCC (train, one
    image smaller than its mask), and their split CSV."""
    root = tmp_path / "busuclm"
    images, masks = synthetic_pairs(6, size=(40, 48), seed=5)
    rows = []
    names = ["AAAA_000", "AAAA_001", "BBBB_000", "BBBB_001", "CCCC_000", "CCCC_001"]
    for k, name in enumerate(names):
        normal = k in (1, 4)
        colour = np.zeros((*masks[k].shape, 3), np.uint8)
        if not normal:
            colour[masks[k]] = (0, 255, 0)
        image = images[k] if name != "CCCC_001" else images[k][:30]
        _save_png(root / "images" / f"{name}.png", image)
        _save_png(root / "masks" / f"{name}.png", colour)
        rows.append([f"images/{name}.png", "normal" if normal else "benign", k // 2,
                     "train" if name.startswith("CCCC") else "test"])
    split = tmp_path / "busuclm.csv"
    with open(split, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["image", "label", "group", "split"])
        w.writerows(rows)
    return root, split


@pytest.fixture
def fake_busbra(tmp_path, synthetic_pairs) -> Path:
    root = tmp_path / "busbra"
    images, masks = synthetic_pairs(3, size=(40, 48), seed=3)
    rows = []
    for k, (image, mask) in enumerate(zip(images, masks, strict=True)):
        rid = f"bus_000{k}-s"
        _save_png(root / "Images" / f"{rid}.png", image)
        _save_png(root / "Masks" / f"mask_000{k}-s.png", mask.astype(np.uint8) * 255)
        rows.append({"ID": rid, "Case": str(k), "Pathology": "benign", "Device": "x",
                     "Histology": "x", "BIRADS": "3", "Side": "left", "BBOX": "0,0,1,1"})
    with open(root / "bus_data.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return root


@pytest.mark.slow
def test_end_to_end_on_fake_sites_drives_the_session(bench, tmp_path, fake_busuclm,
                                                     fake_busbra, tiny_prompt_checkpoint):
    uclm, split = fake_busuclm
    out = tmp_path / "out"
    result = bench.main([
        "--checkpoint", str(tiny_prompt_checkpoint), "--busuclm", str(uclm),
        "--busuclm-split", str(split), "--busbra", str(fake_busbra), "--busbra-limit", "2",
        "--learn-every", "2", "--max-steps", "2", "--out-dir", str(out), "--quiet",
    ])
    for ext in ("md", "json", "png"):
        assert (out / f"annotation_session.{ext}").stat().st_size > 0
    payload = json.loads((out / "annotation_session.json").read_text())
    # BUS-UCLM test patients AAAA, BBBB (4 scans, 1 normal), then 2 BUS-BRA scans
    assert payload["stream"]["sites"] == {"BUS-UCLM test": {"n": 4, "n_normal": 1},
                                          "BUS-BRA fold 1": {"n": 2, "n_normal": 0}}
    assert [a["label"] for a in result["arms"]] == [
        "file order, learning on", "file order, learning off",
        "uncertainty order, learning on", "uncertainty order, learning off"]
    file_arm = result["arms"][1]
    assert [s["name"] for s in file_arm["scans"]] == [
        "AAAA_000", "AAAA_001", "BBBB_000", "BBBB_001", "bus_0000-s", "bus_0001-s"]
    unc = result["arms"][3]["scans"]
    assert {s["name"] for s in unc[:4]} == {"AAAA_000", "AAAA_001", "BBBB_000", "BBBB_001"}
    for arm in result["arms"]:
        for s in arm["scans"]:
            assert 0 <= s["interactions"] <= 20
            assert (s["interactions"] == 0) == (s["kind"] == "accepted")
            if not s["lesion"]:
                assert s["kind"] in ("accepted", "cleared") and s["interactions"] <= 1
        saved = sum(s["kind"] != "accepted" for s in arm["scans"])
        assert arm["corrections_saved"] == saved  # every edit autosaved, nothing else
        if not arm["learn"]:
            assert arm["finetunes"] == []
    learn = result["arms"][0]
    n_saved = learn["corrections_saved"]
    if n_saved >= 3:  # a fine-tune is due after 2 corrections, once a third scan opens
        assert learn["finetunes"] and learn["finetunes"][0]["seconds"] > 0
    md = (out / "annotation_session.md").read_text()
    assert "Truncated run" in md and "first 2 BUS-BRA scans" in md
    assert "counts **20**" in md and "**1 interaction each**" in md
    assert "| 1-6 (BUS-BRA from scan 5) |" in md and "cut to 2 steps" in md
