"""benchmarks/interactive.py runs end to end on tiny inputs and reports what it claims.

A fake BUSI tree, a fake BUS-BRA folder and untrained tiny checkpoints (a prompt model and an
automatic baseline); the protocol helpers (NoC, crop-to-box, the click loop) are checked on
inputs whose answer is known.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def bench():
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    key = "bench_interactive"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, BENCH / "interactive.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[key] = mod
        spec.loader.exec_module(mod)
    return sys.modules[key]


def _save_png(path: Path, array: np.ndarray) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


@pytest.fixture
def fake_split(fake_busi, tmp_path) -> Path:
    from busseg.data import discover_busi

    path = tmp_path / "split.csv"
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["image", "label", "group", "split"])
        for i, r in enumerate(discover_busi(fake_busi).records):
            w.writerow([r.rel_path, r.label, i, "test"])
    return path


@pytest.fixture
def fake_busbra(tmp_path, synthetic_pairs) -> Path:
    root = tmp_path / "busbra"
    images, masks = synthetic_pairs(3, size=(40, 48), seed=3)
    rows = []
    for k, (image, mask) in enumerate(zip(images, masks, strict=True)):
        rid = f"bus_000{k}-s"
        _save_png(root / "Images" / f"{rid}.png", image)
        _save_png(root / "Masks" / f"mask_000{k}-s.png", mask.astype(np.uint8) * 255)
        rows.append({"ID": rid, "Case": str(k), "Pathology": "benign", "Device": "x"})
    with open(root / "bus_data.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return root


def test_quick_run_writes_tables_json_and_plot(bench, tmp_path, fake_busi, fake_split,
                                               fake_busbra, tiny_prompt_checkpoint,
                                               tiny_checkpoint):
    out = tmp_path / "out"
    result = bench.main([
        "--checkpoint", str(tiny_prompt_checkpoint), "--baseline-checkpoint",
        str(tiny_checkpoint), "--busi", str(fake_busi), "--split", str(fake_split),
        "--busbra", str(fake_busbra), "--quick", "--out", str(out), "--quiet",
    ])
    for ext in ("md", "json", "png"):
        assert (out / f"interactive.{ext}").stat().st_size > 0
    payload = json.loads((out / "interactive.json").read_text())
    assert payload["hardware"]["torch_threads"] == 2
    assert [(r["model"], r["dataset"]) for r in payload["rows"]] == [
        ("baseline", "BUSI test"), ("prompt model", "BUSI test"),
        ("baseline", "BUS-BRA"), ("prompt model", "BUS-BRA")]
    busi = payload["rows"][1]
    # --quick: 3 lesion images (the fake tree's normal image is not a lesion image), 5 clicks
    assert busi["summary"]["n"] == 3 and len(busi["summary"]["miou_curve"]) == 5
    for rec in busi["per_image"]:
        assert len(rec["ious"]) == 5 and 1 <= rec["noc85"] <= 5
        assert rec["noc85"] <= rec["noc90"]
        assert 0.0 <= rec["dice_tight"] <= 1.0
    assert payload["rows"][0]["summary"].get("noc85") is None  # the baseline takes no clicks
    md = (out / "interactive.md").read_text()
    assert "| prompt model | BUSI test | 3 |" in md and "| baseline | BUS-BRA | 3 |" in md
    assert "Limited run" in md
    assert result["widget_latency"] is None


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
