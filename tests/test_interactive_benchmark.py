"""benchmarks/interactive.py runs end to end on tiny inputs and reports what it claims.

A fake BUSI tree, a fake BUS-BRA folder and untrained tiny checkpoints (a prompt model and an
automatic baseline); the protocol helpers (NoC, crop-to-box, the click loop) are checked on
inputs whose answer is known.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from conftest import load_benchmark, save_png, write_busbra, write_split_csv


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("interactive")


@pytest.fixture
def fake_busbra(tmp_path, synthetic_pairs) -> Path:
    root = tmp_path / "busbra"
    images, masks = synthetic_pairs(3, size=(40, 48), seed=3)
    rows = [{"ID": f"bus_000{k}-s", "Case": str(k), "Pathology": "benign", "Device": "x"}
            for k in range(3)]
    return write_busbra(root, images, masks, rows)


@pytest.fixture
def fake_busuclm(tmp_path, synthetic_pairs):
    """BUS-UCLM-like pairs (colour masks): test patients AAAA (a lesion and a normal scan) and
    BBBB (a lesion scan whose image is smaller than its mask), train patient CCCC."""
    root = tmp_path / "busuclm"
    images, masks = synthetic_pairs(5, size=(40, 48), seed=5)
    rows = []
    for k, name in enumerate(["AAAA_000", "AAAA_001", "BBBB_000", "BBBB_001", "CCCC_000"]):
        normal = name == "AAAA_001"
        colour = np.zeros((*masks[k].shape, 3), np.uint8)
        if not normal:
            colour[masks[k]] = (255, 0, 0) if k == 2 else (0, 255, 0)
        save_png(root / "images" / f"{name}.png",
                  images[k][:30] if name == "BBBB_001" else images[k])
        save_png(root / "masks" / f"{name}.png", colour)
        rows.append([f"images/{name}.png", "normal" if normal else "benign", k // 2,
                     "train" if name.startswith("CCCC") else "test"])
    return root, write_split_csv(tmp_path / "busuclm.csv", rows)


def test_quick_run_writes_tables_json_and_plot(bench, tmp_path, fake_busi, fake_split,
                                               fake_busbra, fake_busuclm,
                                               tiny_prompt_checkpoint, tiny_checkpoint):
    out = tmp_path / "out"
    uclm, usplit = fake_busuclm
    result = bench.main([
        "--checkpoint", str(tiny_prompt_checkpoint), "--baseline-checkpoint",
        str(tiny_checkpoint), "--busi", str(fake_busi), "--split", str(fake_split),
        "--busbra", str(fake_busbra), "--busuclm", str(uclm), "--busuclm-split", str(usplit),
        "--quick", "--out", str(out), "--quiet",
    ])
    for ext in ("md", "json", "png"):
        assert (out / f"interactive.{ext}").stat().st_size > 0
    payload = json.loads((out / "interactive.json").read_text())
    assert payload["hardware"]["torch_threads"] == 2
    assert [(r["model"], r["dataset"]) for r in payload["rows"]] == [
        ("baseline", "BUSI test"), ("prompt model", "BUSI test"),
        ("baseline", "BUS-BRA"), ("prompt model", "BUS-BRA"),
        ("baseline", "BUS-UCLM test"), ("prompt model", "BUS-UCLM test")]
    busi = payload["rows"][1]
    # --quick: 3 lesion images (the fake tree's normal image is not a lesion image), 5 clicks
    assert busi["summary"]["n"] == 3 and len(busi["summary"]["miou_curve"]) == 5
    for rec in busi["per_image"]:
        assert len(rec["ious"]) == 5 and 1 <= rec["noc85"] <= 5
        assert rec["noc85"] <= rec["noc90"]
        assert 0.0 <= rec["dice_tight"] <= 1.0
        # box then clicks: 5 interactions (--quick), the boxes first (the same jittered
        # boxes as the box row: IoU after the last box = its Dice as IoU)
        assert len(rec["bc_ious"]) == 5 and 1 <= rec["bc_noc85"] <= rec["bc_noc90"] <= 5
        assert rec["bc_ious"][rec["n_boxes"] - 1] == pytest.approx(
            rec["dice_jittered"] / (2 - rec["dice_jittered"]), abs=1e-6)
    assert busi["summary"]["bc_n"] == 3 and len(busi["summary"]["bc_miou_curve"]) == 5
    assert payload["rows"][0]["summary"].get("noc85") is None  # the baseline takes no clicks
    assert payload["rows"][0]["summary"].get("bc_noc85") is None
    # BUS-UCLM: test patients' lesion scans only; the mismatched one is skipped and named
    uclm_row = payload["rows"][5]
    assert [r["name"] for r in uclm_row["per_image"]] == ["images/AAAA_000.png",
                                                          "images/BBBB_000.png"]
    skipped = payload["datasets"]["BUS-UCLM test"]["skipped"]
    assert [d["image"] for d in skipped] == ["images/BBBB_001.png"]
    assert "size mismatch" in skipped[0]["problems"][0]
    md = (out / "interactive.md").read_text()
    assert "| prompt model | BUSI test | 3 |" in md and "| baseline | BUS-BRA | 3 |" in md
    assert "| prompt model | BUS-UCLM test | 2 |" in md and "| BUS-UCLM test | 2 |" in md
    assert "## Box then clicks" in md and "BBBB_001.png: size mismatch" in md
    assert "Limited run" in md
    assert result["widget_latency"] is None
    # lesion size per image (the truth's pixels and share of the image), tertiles per dataset
    for rec in busi["per_image"]:
        assert rec["lesion_px"] > 0 and rec["lesion_share"] == pytest.approx(
            rec["lesion_px"] / (40 * 48))
    tert = busi["summary"]["bc_tertiles"]
    assert [t["tertile"] for t in tert] == ["small", "medium", "large"]
    assert [t["n"] for t in tert] == [1, 1, 1]  # 3 images: one per tertile
    assert tert[0]["share_max"] < tert[1]["share_min"] == tert[1]["share_max"]
    assert tert[1]["share_max"] < tert[2]["share_min"]
    s = busi["summary"]
    assert s["bc_never85_share"] == s["bc_never85"] / 3
    assert "| BUSI test | small | 1 |" in md and "as a share of the image" in md
    # the box-then-clicks targets: one line per check, met or missed, in the report and the JSON
    checks = payload["target_checks_17"]
    assert {c["dataset"] for c in checks} == {"BUSI test", "BUS-BRA", "BUS-UCLM test"}
    assert sum(c["dataset"] == "BUSI test" for c in checks) == 4  # NoC@85, @90, never x 2
    assert sum(c["dataset"] == "BUS-BRA" for c in checks) == 2  # never 0.85, 0.90 only
    for c in checks:
        assert c["met"] == (c["value"] <= c["target"])
        assert f"- {c['line']}" in md and c["line"].endswith("met" if c["met"] else "missed")

    # a second checkpoint's quick run on BUSI only, set against this one (--compare): the same
    # model on the same images gives the same numbers
    again = bench.main([
        "--checkpoint", str(tiny_prompt_checkpoint), "--busi", str(fake_busi), "--split",
        str(fake_split), "--datasets", "busi", "--protocols", "box-clicks", "--quick",
        "--compare", str(out / "interactive.json"), "--out", str(tmp_path / "cand"),
        "--quiet"])
    assert [r["dataset"] for r in again["rows"]] == ["BUSI test"]
    (cmp,) = again["comparison"]
    assert cmp["dataset"] == "BUSI test" and cmp["same_images"] and cmp["n"] == 3
    for key in ("dice_jittered", "bc_noc85", "bc_noc90", "bc_never90"):
        assert cmp[key]["delta"] == pytest.approx(0.0)
    assert "(`--compare`)" in (tmp_path / "cand" / "interactive.md").read_text()


def test_a_missing_busuclm_split_skips_the_row(bench, tmp_path, fake_busi, fake_split,
                                               tiny_prompt_checkpoint):
    result = bench.main([
        "--checkpoint", str(tiny_prompt_checkpoint), "--busi", str(fake_busi), "--split",
        str(fake_split), "--no-busbra", "--busuclm-split", str(tmp_path / "none.csv"),
        "--quick", "--limit", "1", "--max-interactions", "2", "--protocols", "box-clicks",
        "--out", str(tmp_path / "o"), "--quiet"])
    assert [r["dataset"] for r in result["rows"]] == ["BUSI test"]
    summ = result["rows"][0]["summary"]
    assert "noc85" not in summ and "bc_noc85" in summ  # --protocols box-clicks: no click row


def test_dataset_selection_is_checked(bench, tmp_path):
    with pytest.raises(SystemExit, match="--datasets: unknown"):
        bench.parse_args(["--datasets", "busi,bogus"])
    with pytest.raises(SystemExit, match="no dataset left"):
        bench.parse_args(["--datasets", "busbra", "--no-busbra"])
    with pytest.raises(SystemExit, match="--compare"):
        bench.parse_args(["--compare", str(tmp_path / "none.json")])
    assert bench.parse_args(["--datasets", "busuclm,busi"]).datasets == ["busi", "busuclm"]
    assert bench.parse_args(["--no-busuclm"]).datasets == ["busi", "busbra"]


def test_a_model_without_prompts_is_refused(bench, tmp_path, fake_busi, fake_split,
                                            tiny_checkpoint):
    with pytest.raises(SystemExit, match="takes no prompts"):
        bench.main(["--checkpoint", str(tiny_checkpoint), "--busi", str(fake_busi),
                    "--split", str(fake_split), "--no-busbra", "--quick",
                    "--out", str(tmp_path), "--quiet"])


def test_noc_counts_the_cap_when_never_reached(bench):
    assert bench.noc([0.5, 0.86, 0.95], 0.85, 20) == 2
    assert bench.noc([0.5, 0.86, 0.95], 0.90, 20) == 3
    assert bench.noc([0.5, 0.6], 0.85, 20) == 20


def test_crop_to_box_keeps_the_mask_inside_the_box(bench, tiny_checkpoint):
    from busseg.inference import load_model, predict_mask

    model = load_model(tiny_checkpoint, device="cpu")
    image = np.random.default_rng(0).integers(0, 256, (60, 70), dtype=np.uint8)
    box = np.array([[20.0, 25.0, 39.0, 44.0]])
    mask = bench.crop_to_box_mask(image, box, model)
    assert not mask[:20].any() and not mask[40:].any()
    assert not mask[:, :25].any() and not mask[:, 45:].any()
    # the crop is the box grown by 30 % (6 px) on every side
    crop = predict_mask(image[14:46, 19:51], model)
    np.testing.assert_array_equal(mask[20:40, 25:45], crop[6:26, 6:26])


def test_click_curve_follows_the_ritm_protocol(bench, tiny_prompt_checkpoint, monkeypatch):
    """With a model that returns the truth once clicked inside it, IoU is 1 after click 1."""
    import busseg.inference as inf

    truth = np.zeros((30, 30), bool)
    truth[10:20, 5:25] = True
    seen = []

    def fake_predict(image, model, *, points, point_labels, previous_mask, **kw):
        seen.append((np.asarray(points).tolist(), list(point_labels), previous_mask))
        return inf.Prediction(truth.copy(), truth.astype(np.float32), None)

    monkeypatch.setattr(inf, "predict", fake_predict)
    ious, secs = bench.click_curve(np.zeros((30, 30), np.uint8), truth, None, max_clicks=6)
    assert ious == [1.0] * 6 and len(secs) == 1
    # the first click is the deepest lesion point, positive; no previous mask yet
    (points, labels, prev), = seen
    assert labels == [1] and prev is None
    r, c = points[0]
    assert 14 <= r <= 15 and 9 <= c <= 20  # on the ridge, 5 px from the border


# --------------------------------------------------------------------------- box then clicks


def _rect(shape, r0, c0, r1, c1):
    m = np.zeros(shape, bool)
    m[r0:r1, c0:c1] = True
    return m


def _fake_predict(monkeypatch, answer):
    """Replace busseg.inference.predict by ``answer(call_number, kwargs) -> mask``."""
    import busseg.inference as inf

    calls = []

    def fake(image, model, **kw):
        calls.append(kw)
        mask = answer(len(calls), kw)
        return inf.Prediction(mask, mask.astype(np.float32), None)

    monkeypatch.setattr(inf, "predict", fake)
    return calls


def test_box_then_clicks_counts_the_box_as_one_interaction(bench, monkeypatch):
    truth = _rect((40, 50), 10, 10, 30, 40)
    half = _rect((40, 50), 10, 10, 30, 25)  # IoU 0.5 after the box
    box = np.array([[10.0, 10.0, 29.0, 39.0]])
    calls = _fake_predict(monkeypatch, lambda k, kw: half if k == 1 else truth)
    ious, secs, n_run = bench.box_click_curve(np.zeros((40, 50), np.uint8), truth, None, box,
                                              max_interactions=20, stop_at=0.90)
    assert ious[0] == pytest.approx(0.5) and ious[1] == 1.0 and n_run == 2 and len(ious) == 20
    assert bench.noc(ious, 0.85, 20) == 2 and bench.noc(ious, 0.90, 20) == 2
    # the box alone, then the box kept with the click and the previous mask fed back
    assert "points" not in calls[0] or calls[0].get("points") is None
    np.testing.assert_array_equal(calls[1]["boxes"], box)
    assert calls[1]["point_labels"] == [1]
    np.testing.assert_array_equal(calls[1]["previous_mask"], half)
    r, c = calls[1]["points"][0]
    assert 10 <= r < 30 and 25 <= c < 40  # in the missed half


def test_box_then_clicks_caps_at_twenty_and_counts_failures(bench, monkeypatch):
    truth = _rect((40, 50), 10, 10, 30, 40)
    box = np.array([[10.0, 10.0, 29.0, 39.0]])
    calls = _fake_predict(monkeypatch, lambda k, kw: np.zeros((40, 50), bool))
    ious, _, n_run = bench.box_click_curve(np.zeros((40, 50), np.uint8), truth, None, box)
    assert len(calls) == 20 and n_run == 20 and max(ious) == 0.0
    assert bench.noc(ious, 0.85, 20) == 20 and bench.noc(ious, 0.90, 20) == 20
    rec = {"n_boxes": 1, "dice_tight": 0.0, "dice_jittered": 0.0, "box_seconds": [0.1],
           "bc_ious": ious, "bc_seconds": [0.1], "bc_run": n_run, "bc_noc85": 20,
           "bc_noc90": 20}
    good = {**rec, "bc_ious": [0.95] * 20, "bc_noc85": 1, "bc_noc90": 1, "bc_run": 1}
    s = bench.summarise([rec, good], 20, True)
    assert s["bc_never90"] == 1 and s["bc_noc90"] == 10.5 and s["bc_box_iou"] == 0.475


def _bc_record(share, noc85, noc90, best):
    return {"lesion_share": share, "lesion_px": int(share * 10000), "bc_noc85": noc85,
            "bc_noc90": noc90, "bc_ious": [best]}


def test_size_tertiles_split_at_the_quantiles_of_the_shares(bench):
    # shares 0.01..0.06 in a shuffled order: tertiles {1, 2}, {3, 4}, {5, 6} (x 0.01)
    order = [4, 1, 6, 3, 2, 5]
    recs = [_bc_record(k / 100, k, 2 * k, 0.95 if k != 2 else 0.5) for k in order]
    small, medium, large = bench.size_tertiles(recs)
    assert (small["n"], medium["n"], large["n"]) == (2, 2, 2)
    assert small["share_min"] == 0.01 and small["share_max"] == 0.02
    assert medium["share_min"] == 0.03 and large["share_max"] == 0.06
    assert small["px_min"] == 100 and large["px_max"] == 600
    assert (small["noc85"], medium["noc85"], large["noc85"]) == (1.5, 3.5, 5.5)
    assert (small["noc90"], medium["noc90"], large["noc90"]) == (3.0, 7.0, 11.0)
    assert (small["never85"], small["never90"], medium["never90"]) == (1, 1, 0)
    assert small["edges"] == pytest.approx([1 / 3 * 0.05 + 0.01, 2 / 3 * 0.05 + 0.01])
    # ties on an edge go to the lower tertile; an empty tertile is reported as such
    tied = bench.size_tertiles([_bc_record(0.02, 1, 1, 0.95) for _ in range(3)])
    assert [t["n"] for t in tied] == [3, 0, 0]
    assert math.isnan(tied[1]["noc85"]) and tied[1]["px_min"] is None


def test_target_checks_say_met_or_missed(bench):
    def row(dataset, noc85, noc90, never85, never90, n=100, model="prompt model"):
        return {"model": model, "dataset": dataset, "summary": {
            "bc_n": n, "bc_cap": 20, "bc_noc85": noc85, "bc_noc90": noc90,
            "bc_never85": never85, "bc_never90": never90, "bc_never85_share": never85 / n,
            "bc_never90_share": never90 / n}}

    checks = bench.target_checks([
        row("BUSI test", 3.0, 6.5, 2, 3), row("BUS-UCLM test", 2.6, 5.0, 0, 1, n=34),
        row("BUSI test", 1.0, 1.0, 0, 0, model="baseline")])
    got = {(c["dataset"], c["what"]): c["met"] for c in checks}
    assert got == {
        ("BUSI test", "box then clicks NoC@85"): True,  # 3.0 <= 3.0
        ("BUSI test", "box then clicks NoC@90"): False,
        ("BUSI test", "lesion scans never at IoU 0.85 in 20"): True,  # 2 % <= 2 %
        ("BUSI test", "lesion scans never at IoU 0.90 in 20"): False,
        ("BUS-UCLM test", "box then clicks NoC@85"): False,  # target 2.5
        ("BUS-UCLM test", "lesion scans never at IoU 0.85 in 20"): True,
        ("BUS-UCLM test", "lesion scans never at IoU 0.90 in 20"): False,  # 1 of 34
    }
    line = next(c["line"] for c in checks if c["what"].endswith("NoC@90"))
    assert line == "BUSI test: box then clicks NoC@90: 6.50 interactions; target <= 6: missed"


def test_compare_pairs_rows_by_dataset_and_flags_other_images(bench):
    def row(dataset, names, noc90, model="prompt model"):
        return {"model": model, "dataset": dataset, "per_image": [{"name": n} for n in names],
                "summary": {"n": len(names), "bc_noc90": noc90, "dice_jittered": 0.9}}

    previous = {"checkpoint": {"path": "old/ck"},
                "rows": [row("BUSI test", ["a", "b"], 8.0), row("BUS-BRA", ["c"], 7.0)]}
    out = bench.compare_rows([row("BUSI test", ["a", "b"], 6.0),
                              row("BUS-UCLM test", ["d"], 4.0),
                              row("BUS-BRA", ["c", "e"], 5.0)], previous)
    assert [c["dataset"] for c in out] == ["BUSI test", "BUS-BRA"]
    assert out[0]["same_images"] and not out[1]["same_images"]
    assert out[0]["bc_noc90"] == {"previous": 8.0, "this": 6.0, "delta": -2.0}
    assert "bc_noc85" not in out[0] and out[0]["previous_checkpoint"] == "old/ck"
    table = "\n".join(bench._comparison_table(out))
    assert "| BUSI test | 2 / 2 | yes |" in table and "8.00 -> 6.00 (-2.00)" in table
    assert "| BUS-BRA | 1 / 2 | **no** |" in table


def test_box_then_clicks_stops_at_the_target_and_two_boxes_count_two(bench, monkeypatch):
    truth = _rect((40, 60), 5, 5, 15, 20) | _rect((40, 60), 25, 35, 35, 55)
    boxes = np.array([[5.0, 5.0, 14.0, 19.0], [25.0, 35.0, 34.0, 54.0]])

    def answer(k, kw):  # each box finds its lesion exactly
        out = np.zeros((40, 60), bool)
        for r0, c0, r1, c1 in kw["boxes"]:
            out[int(r0):int(r1) + 1, int(c0):int(c1) + 1] = True
        return out & truth

    calls = _fake_predict(monkeypatch, answer)
    ious, _, n_run = bench.box_click_curve(np.zeros((40, 60), np.uint8), truth, None, boxes)
    assert len(calls) == 2 and n_run == 2  # IoU 1 after the second box: stop
    assert ious[0] < 0.85 and ious[1] == 1.0
    assert bench.noc(ious, 0.85, 20) == 2 and bench.noc(ious, 0.90, 20) == 2


@pytest.mark.realdata
def test_busuclm_test_split_on_the_real_data(bench, repo_root):
    import _common as C

    root, split = C.DEFAULT_BUSUCLM, C.DEFAULT_BUSUCLM_SPLIT
    if not root.is_dir() or not split.is_file():
        pytest.skip(f"BUS-UCLM ({root}) or its split ({split}) not found")
    items, skipped = bench.busuclm_test_lesions(root, split, None)
    from busseg.data.splits import read_split_csv

    rows = read_split_csv(split)
    test = {r["image"] for r in rows if r["split"] == "test"}
    lesion = {r["image"] for r in rows if r["split"] == "test" and r["label"] != "normal"}
    assert {name for name, _, _ in items} | {d["image"] for d in skipped} == lesion
    assert all(name in test for name, _, _ in items)
    # the 13 HESN scans (smaller than their masks) are named, not dropped, in their split
    hesn_split = {r["split"] for r in rows if r["image"].startswith("images/HESN_")}
    for name in hesn_split:
        _, skipped = C.split_records(root, split, name)
        hesn = [d for d in skipped if d["image"].startswith("images/HESN_")]
        n = sum(r["image"].startswith("images/HESN_") and r["split"] == name for r in rows)
        assert len(hesn) == n and all("size mismatch" in d["problems"][0] for d in hesn)


@pytest.mark.slow
def test_a_worker_pool_gets_the_same_boxes_and_records(bench, tiny_prompt_checkpoint):
    """--jobs: the jitter is drawn in image order before the work is shared out."""
    import argparse

    from busseg.inference import load_model

    model = load_model(tiny_prompt_checkpoint, device="cpu")
    truth = _rect((40, 48), 10, 10, 30, 30)
    rng = np.random.default_rng(0)
    data = [(f"img{k}", rng.integers(0, 256, (40, 48), dtype=np.uint8), truth)
            for k in range(2)]
    args = argparse.Namespace(seed=0, jitter=0.1, protocols=["box", "box-clicks"],
                              max_interactions=3, max_clicks=5, stop_at=0.9, quiet=True)

    class InlinePool:  # a pool whose workers are this process
        def imap(self, fn, tasks, chunksize=1):
            return map(fn, list(tasks))

    bench._WORKER_MODELS["prompt"] = model
    try:
        pooled, _ = bench.evaluate(None, data, prompt=True, args=args, label="x",
                                   pool=InlinePool())
    finally:
        bench._WORKER_MODELS.clear()
    plain, _ = bench.evaluate(model, data, prompt=True, args=args, label="x")
    for a, b in zip(pooled, plain, strict=True):
        assert a["jittered_boxes"] == b["jittered_boxes"] and a["bc_ious"] == b["bc_ious"]
    # the two images got different draws of the one sequence
    assert len({str(r["jittered_boxes"]) for r in plain}) == 2
