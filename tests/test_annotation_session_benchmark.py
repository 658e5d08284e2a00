"""benchmarks/annotation_session.py: the simulated annotator's report.

The protocol itself lives in the core (:mod:`busseg.annotator`, tested in
tests/test_annotator.py); here the benchmark is checked to drive that implementation. Block
aggregation is checked on numbers; one end-to-end run on a fake BUS-UCLM folder and a fake
BUS-BRA folder with a tiny untrained prompt model drives the real
:class:`busseg.session.AnnotationSession` (learning as you go included, a few steps).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import load_benchmark, save_png, write_busbra, write_split_csv


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("annotation_session")


def test_the_benchmark_drives_the_core_annotator(bench):
    """The protocol itself is tested in tests/test_annotator.py (busseg.annotator)."""
    import busseg.annotator as core

    assert bench.annotate_scan is core.annotate_scan and bench.model_prompt is core.model_prompt
    assert (bench.ACCEPT_IOU, bench.MAX_INTERACTIONS, bench.BOX_MARGIN) == (
        core.ACCEPT_IOU, core.MAX_INTERACTIONS, core.BOX_MARGIN)


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
        save_png(root / "images" / f"{name}.png", image)
        save_png(root / "masks" / f"{name}.png", colour)
        rows.append([f"images/{name}.png", "normal" if normal else "benign", k // 2,
                     "train" if name.startswith("CCCC") else "test"])
    return root, write_split_csv(tmp_path / "busuclm.csv", rows)


@pytest.fixture
def fake_busbra(tmp_path, synthetic_pairs) -> Path:
    root = tmp_path / "busbra"
    images, masks = synthetic_pairs(3, size=(40, 48), seed=3)
    rows = [{"ID": f"bus_000{k}-s", "Case": str(k), "Pathology": "benign", "Device": "x",
             "Histology": "x", "BIRADS": "3", "Side": "left", "BBOX": "0,0,1,1"}
            for k in range(3)]
    return write_busbra(root, images, masks, rows)


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
