"""The benchmark scripts keep working: each runs end to end on tiny inputs.

Benchmarks are not tests (CI never runs them in full); these run each script's ``main`` on a
fake BUSI tree, a fake BUS-BRA folder and an untrained tiny checkpoint, and check that the
tables, JSON and plots are written and hold what they claim.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str):
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    if name == "_common":  # the scripts import it by this name
        return importlib.import_module("_common")
    key = f"bench_{name}"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, BENCH / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[key] = mod  # dataclasses look their module up while it executes
        spec.loader.exec_module(mod)
    return sys.modules[key]


@pytest.fixture(scope="module")
def common():
    return _load("_common")


def _save_png(path: Path, array: np.ndarray) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


#: (ID, Case, Pathology, Device) of the fake BUS-BRA folder: 8 images of 6 patients.
FAKE_BUSBRA = [
    ("bus_0001-l", "1", "benign", "GE Logiq 7 @10-14MHz"),
    ("bus_0001-r", "1", "benign", "GE Logiq 7 @10-14MHz"),
    ("bus_0002-s", "2", "malignant", "GE Logiq 5 @10-12MHz"),
    ("bus_0003-s", "3", "benign", "Toshiba Aplio 300 @12-14 MHz"),
    ("bus_0004-l", "4", "malignant", "GE Logiq 5 @10-12MHz"),
    ("bus_0004-r", "4", "benign", "GE Logiq 5 @10-12MHz"),
    ("bus_0005-s", "5", "benign", "GE Logiq 7 @10-14MHz"),
    ("bus_0006-s", "6", "malignant", "GE Logiq 7 @10-14MHz"),
]


@pytest.fixture
def fake_busbra(tmp_path, synthetic_pairs) -> Path:
    root = tmp_path / "busbra"
    images, masks = synthetic_pairs(len(FAKE_BUSBRA), size=(40, 48), seed=3)
    rows = []
    for (rid, case, path, dev), image, mask in zip(FAKE_BUSBRA, images, masks, strict=True):
        _save_png(root / "Images" / f"{rid}.png", image)
        _save_png(
            root / "Masks" / f"{rid.replace('bus_', 'mask_')}.png", mask.astype(np.uint8) * 255
        )
        rows.append(
            {
                "ID": rid,
                "Case": case,
                "Histology": "x",
                "Pathology": path,
                "BIRADS": "4",
                "Device": dev,
                "Width": 48,
                "Height": 40,
                "Side": "left",
                "BBOX": "[1,1,2,2]",
            }
        )
    with open(root / "bus_data.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return root


@pytest.fixture
def fake_split(fake_busi, tmp_path) -> Path:
    """A split CSV putting every image of ``fake_busi`` in the test split."""
    from busseg.data import discover_busi

    path = tmp_path / "split.csv"
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["image", "label", "group", "split"])
        for i, r in enumerate(discover_busi(fake_busi).records):
            w.writerow([r.rel_path, r.label, i, "test"])
    return path


def _outputs(out: Path, name: str) -> dict:
    for ext in ("md", "json", "png"):
        assert (out / f"{name}.{ext}").stat().st_size > 0, f"{name}.{ext} missing or empty"
    return json.loads((out / f"{name}.json").read_text())


def _check_hardware(payload: dict) -> None:
    hw = payload["hardware"]
    for key in ("cpu", "torch_threads", "torch", "device"):
        assert hw[key] not in (None, ""), key


# --------------------------------------------------------------------------- helpers


def test_patient_split_keeps_patients_apart(common, fake_busbra):
    recs = common.read_busbra(fake_busbra)
    assert len(recs) == len(FAKE_BUSBRA)
    a, b = common.patient_split(recs, 0.5, seed=1)
    assert len(a) + len(b) == len(recs)
    assert not {r.case for r in a} & {r.case for r in b}
    assert {r.case for r in a} and {r.case for r in b}
    a2, _ = common.patient_split(recs, 0.5, seed=1)
    assert [r.id for r in a2] == [r.id for r in a]


def test_read_busbra_explains_missing_table(common, tmp_path):
    with pytest.raises(SystemExit, match="bus_data.csv"):
        common.read_busbra(tmp_path)


def test_json_is_strict(common):
    text = common.to_json({"a": math.nan, "b": [np.float32(1.5), np.inf], "c": Path("x")})
    assert json.loads(text) == {"a": None, "b": [1.5, None], "c": "x"}


def test_missing_checkpoint_says_what_to_pass(common, tmp_path):
    with pytest.raises(SystemExit, match="--checkpoint"):
        common.resolve_checkpoint(tmp_path / "nope")


def test_published_rows_name_their_source_and_protocol():
    acc = _load("accuracy")
    assert acc.PUBLISHED
    for row in acc.PUBLISHED:
        src = acc.PUBLISHED_SOURCES[row["source"]]
        assert src["citation"] and src["protocol"]
        assert isinstance(src["duplicate_aware"], bool)
        assert isinstance(src["normal_included"], bool)
        assert 0 < row["iou"] < row["dice"] < 100  # IoU < Dice for any imperfect overlap


# --------------------------------------------------------------------------- scripts


def test_accuracy_quick(tmp_path, fake_busi, fake_split, fake_busbra, tiny_checkpoint):
    acc = _load("accuracy")
    out = tmp_path / "out"
    payload = acc.main(
        [
            "--checkpoint",
            str(tiny_checkpoint),
            "--busi",
            str(fake_busi),
            "--split",
            str(fake_split),
            "--busbra",
            str(fake_busbra),
            "--out",
            str(out),
            "--quick",
            "--n-boot",
            "50",
            "--quiet",
        ]
    )
    saved = _outputs(out, "accuracy")
    _check_hardware(saved)
    summ = saved["busi"]["summary"]
    assert {g: summ[g]["n"] for g in ("benign", "malignant", "lesion", "normal")} == {
        "benign": 3,
        "malignant": 2,
        "lesion": 5,
        "normal": 1,
    }
    assert summ["normal"]["n_empty_truth"] == 1
    assert summ["normal"]["fp_rate"] in (0.0, 1.0)
    dice = summ["lesion"]["metrics"]["dice"]
    assert dice["ci_low"] <= dice["mean"] <= dice["ci_high"]
    bb = saved["busbra"]["summary"]
    assert bb["all"]["n"] == 3  # --quick: at most 3 BUS-BRA images
    assert set(bb) >= {"all", "GE Logiq 7 @10-14MHz"}
    assert len(saved["per_image"]) == 6 + 3
    assert all(0.0 <= r["dice"] <= 1.0 for r in saved["per_image"])
    md = (out / "accuracy.md").read_text()
    assert "Tang et al. 2024" in md and "Not directly comparable" in md
    assert payload["n_params"] > 0
    # a model without a class head: no gate or class-head section
    assert saved["busi"]["gate"] is None and saved["busi"]["class_head"] is None
    assert "Normal-scan gate" not in md


def test_accuracy_class_head_and_gate(
    tmp_path, fake_busi, fake_split, fake_busbra, make_head_checkpoint
):
    acc = _load("accuracy")
    # untrained head: P(normal) = 1/3 everywhere and no pixel reaches 0.9, so this gate
    # empties every non-empty mask
    ckpt = make_head_checkpoint({"p_normal": 0.3, "lesion_confidence": 0.9})
    out = tmp_path / "out"
    acc.main(["--checkpoint", str(ckpt), "--busi", str(fake_busi), "--split", str(fake_split),
              "--busbra", str(fake_busbra), "--out", str(out), "--quick", "--n-boot", "50",
              "--quiet"])
    saved = _outputs(out, "accuracy")
    assert saved["class_head"] is True
    assert saved["normal_gate"] == {"p_normal": 0.3, "lesion_confidence": 0.9}
    rows = saved["per_image"]
    for r in rows:
        assert r["p_normal"] == pytest.approx(1 / 3, abs=1e-4)
        assert not r["any_pred"]  # gated or empty
        assert r["gated"] == r["any_pred_ungated"]
        if not r["gated"]:
            assert r["dice_ungated"] == r["dice"]
    busi = [r for r in rows if r["dataset"] == "BUSI"]
    bb = [r for r in rows if r["dataset"] == "BUS-BRA"]
    g = saved["busi"]["gate"]
    normal = next(r for r in busi if r["label"] == "normal")
    assert g["fp_rate_normal"] == 0.0
    assert g["fp_rate_normal_ungated"] == float(normal["any_pred_ungated"])
    assert g["n_lesion"] == 5 and g["n_lesion_gated"] == sum(
        r["gated"] for r in busi if r["label"] != "normal")
    gb = saved["busbra"]["gate"]
    assert gb["n_lesion"] == 3 and gb["n_normal"] == 0
    assert gb["lesion_dice"] == pytest.approx(np.mean([r["dice"] for r in bb]))
    assert gb["lesion_dice_ungated"] == pytest.approx(np.mean([r["dice_ungated"] for r in bb]))
    assert gb["share_lesion_gated"] == pytest.approx(sum(r["gated"] for r in bb) / 3)
    assert gb["median_p_normal_lesion"] == pytest.approx(1 / 3, abs=1e-4)
    head = saved["busi"]["class_head"]
    assert head["auc_lesion_vs_normal"]["auc"] == 0.5  # all scores tie
    assert (head["auc_lesion_vs_normal"]["n_pos"], head["auc_lesion_vs_normal"]["n_neg"]) == (5, 1)
    assert saved["busbra"]["class_head"]["auc_lesion_vs_normal"]["auc"] is None  # no normal
    assert saved["busbra"]["class_head"]["calibration"]["n"] == 3
    md = (out / "accuracy.md").read_text()
    assert "## Normal-scan gate and class head (research output, not a diagnosis)" in md
    assert "| BUSI gate on | BUSI gate off | BUS-BRA gate on | BUS-BRA gate off |" in md
    assert "| FP rate, images without a lesion | 0.000 |" in md
    assert "U-Net, efficientnet_lite0 encoder, 64x64" in md


def test_speed_quick(tmp_path, fake_busi, fake_split, tiny_checkpoint):
    speed = _load("speed")
    monai = speed.monai_version() is not None
    out = tmp_path / "out"
    args = [
        "--checkpoint",
        str(tiny_checkpoint),
        "--busi",
        str(fake_busi),
        "--split",
        str(fake_split),
        "--out",
        str(out),
        "--quick",
        "--sizes",
        "32",
        "--memory-models",
        "ours",
        "--memory-modes",
        "train",
        "--quiet",
    ]
    res = speed.main(args)
    saved = _outputs(out, "speed")
    _check_hardware(saved)
    models = ["ours"] + (["monai_unet_r0", "monai_unet_r2"] if monai else [])
    assert set(models) <= set(saved["params"])
    assert "monai_basicunet" not in saved["params"]  # depth 2: BasicUNet needs depth 4
    rows = saved["latency"]["rows"]
    assert {(tuple(r["size"]), r["batch"]) for r in rows} == {((32, 32), b) for b in (1, 2)}
    assert all(r["median"] > 0 and len(r["seconds_per_image"]) == 2 for r in rows)
    assert all(r["ratio"] == "1.00" for r in rows if r["model"] == "ours")
    assert all(r["images_per_s"] > 0 for r in saved["training"]["rows"])
    mem = saved["memory"]
    assert [(r["model"], r["mode"]) for r in mem] == [("ours", "train")]
    assert mem[0]["increase_mib"] > 0  # a training step allocates
    assert saved["e2e"]["n_images"] == 2 and len(saved["e2e"]["total_s"]) == 2
    assert saved["widget"] is None
    assert res["definitions"]["ours"].startswith("build_model")


def test_speed_new_model_old_default_and_targets(
    tmp_path, fake_busi, fake_split, tiny_checkpoint, make_head_checkpoint
):
    speed = _load("speed")
    head = make_head_checkpoint()  # 5 input channels (4 of prompt guidance), class head
    out = tmp_path / "out"
    speed.main(["--checkpoint", str(head), "--old-checkpoint", str(tiny_checkpoint),
                "--busi", str(fake_busi), "--split", str(fake_split), "--out", str(out),
                "--quick", "--sizes", "64", "--no-monai", "--memory-models", "old",
                "--memory-modes", "infer", "--quiet"])
    saved = _outputs(out, "speed")
    assert set(saved["params"]) == {"ours", "old", "unet16"}
    assert saved["params"]["old"] < saved["params"]["unet16"]  # base 4 vs base 16
    assert saved["definitions"]["ours"].startswith("build_model({encoder: efficientnet_lite0")
    rows = saved["latency"]["rows"]
    assert {r["model"] for r in rows} == {"ours", "old", "unet16"}
    assert all(r["median"] > 0 for r in rows)
    assert {r["model"] for r in saved["training"]["rows"]} == {"ours", "old", "unet16"}
    mem = saved["memory"]  # the subprocess probe loads the old checkpoint, not ours
    assert [(r["model"], r["mode"]) for r in mem] == [("old", "infer")]
    target = saved["target"]
    assert len(target["predict_s"]) == len(target["reference_s"]) == 2  # 2 images x 1 round
    assert target["ratio"] == pytest.approx(
        np.median(target["predict_s"]) / np.median(target["reference_s"]))
    assert target["passed"] == (target["ratio"] <= 0.8)
    ft = saved["finetune"]
    assert (ft["n_images"], ft["steps_asked"], ft["threads"]) == (2, 2, 2)
    assert ft["steps"] == 2 and 0 < ft["seconds"] < 120 and ft["n_train"] + ft["n_val"] == 2
    md = (out / "speed.md").read_text()
    assert "## Issue targets (measured in this run)" in md
    assert "| busseg old default |" in md and "plain U-Net base 16 (reference)" in md
    assert "(not the target's setting)" in md


@pytest.mark.gui
def test_speed_widget_probe(make_napari_viewer, tmp_path, fake_busi, tiny_checkpoint):
    pytest.importorskip("napari")
    speed = _load("speed")
    image = next((fake_busi / "benign").glob("benign (1).png"))
    out = speed.widget_probe(
        tiny_checkpoint, image, repeats=2, timeout=60, viewer=make_napari_viewer()
    )
    assert len(out["seconds"]) == 2 and all(0 < s < 60 for s in out["seconds"])
    assert out["image_shape"] == [40, 48]


def test_annotation_loop_quick(tmp_path, fake_busi, fake_split, fake_busbra, tiny_checkpoint):
    loop = _load("annotation_loop")
    out = tmp_path / "out"
    res = loop.main(
        [
            "--checkpoint",
            str(tiny_checkpoint),
            "--busbra",
            str(fake_busbra),
            "--busi",
            str(fake_busi),
            "--split",
            str(fake_split),
            "--out",
            str(out),
            "--ks",
            "0",
            "2",
            "--draws",
            "2",
            "--eval-limit",
            "3",
            "--busi-limit",
            "1",
            "--max-steps",
            "2",
            "--quiet",
        ]
    )
    saved = _outputs(out, "annotation_loop")
    _check_hardware(saved)
    runs = saved["runs"]
    assert [(r["k"], r["draw"]) for r in runs] == [(0, None), (2, 0), (2, 1)]
    case = {rid: c for rid, c, _, _ in FAKE_BUSBRA}
    eval_cases = {case[i] for i in saved["eval_ids"]}
    assert len(saved["eval_ids"]) == 3
    for r in runs[1:]:
        assert len(r["ids"]) == 2 and set(r["ids"]) <= set(saved["pool_ids"])
        assert not {case[i] for i in r["ids"]} & eval_cases  # other patients
        assert r["steps"] == 2 and r["finetune_s"] > 0
        assert r["n_train"] == 1 and r["n_val"] == 1  # the widget's 20 % held out
        assert 0.0 <= r["eval"]["mean_dice"] <= 1.0
        assert r["busi"] is not None and len(r["busi"]["dice"]) == 3  # 1 per class
    assert [s["k"] for s in saved["summary"]] == [0, 2]
    assert saved["settings"]["finetune"]["max_steps"] == 2
    assert res["estimate_s"] > 0


def test_active_learning_quick(tmp_path, fake_busbra, tiny_checkpoint):
    al = _load("active_learning")
    loop = _load("annotation_loop")
    out = tmp_path / "out"
    res = al.main(
        [
            "--checkpoint",
            str(tiny_checkpoint),
            "--busbra",
            str(fake_busbra),
            "--out",
            str(out),
            "--ks",
            "1",
            "2",
            "--draws",
            "2",
            "--eval-limit",
            "3",
            "--max-steps",
            "2",
            "--quiet",
        ]
    )
    saved = _outputs(out, "active_learning")
    _check_hardware(saved)
    runs = saved["runs"]
    assert [(r["strategy"], r["draw"], r["k"]) for r in runs] == [
        ("uncertainty", None, 1), ("uncertainty", None, 2),
        ("random", 0, 1), ("random", 0, 2), ("random", 1, 1), ("random", 1, 2),
    ]
    case = {rid: c for rid, c, _, _ in FAKE_BUSBRA}
    eval_cases = {case[i] for i in saved["eval_ids"]}
    for r in runs:
        assert len(r["ids"]) == r["k"] and set(r["ids"]) <= set(saved["pool_ids"])
        assert not {case[i] for i in r["ids"]} & eval_cases  # other patients
        assert r["steps"] == 2 and 0.0 <= r["eval"]["mean_dice"] <= 1.0
    # the uncertainty arm takes the pool images ranked most uncertain, nested over k
    unc = saved["pool_uncertainty"]
    top = sorted(unc, key=lambda i: -unc[i]["score"])
    assert runs[1]["ids"] == top[:2] and runs[0]["ids"] == top[:1]
    # the random arm uses annotation_loop.py's orders: same split, same draws
    split = loop.C.patient_split(loop.C.read_busbra(fake_busbra), 0.5, 0)[0]
    order = np.random.default_rng([0, 1]).permutation(len(split))
    assert runs[5]["ids"] == [split[i].id for i in order[:2]]
    # effort spent = the base model's effort on exactly the chosen images
    eff = saved["pool_effort_before"]
    assert runs[1]["pool_effort_before"] == pytest.approx(np.mean([eff[i] for i in top[:2]]))
    rows = {s["k"]: s for s in saved["summary"]}
    assert rows[2]["uncertainty_dice"] == runs[1]["eval"]["mean_dice"]
    lo, hi = rows[2]["random_dice_range"]
    assert lo == min(runs[3]["eval"]["mean_dice"], runs[5]["eval"]["mean_dice"]) and lo <= hi
    md = (out / "active_learning.md").read_text()
    assert "**Outcome:**" in md and res["outcome"] in md
    assert al.verdict(0.5, [0.6, 0.7]).startswith("random better")
    assert al.verdict(0.8, [0.6, 0.7]).startswith("uncertainty better")
    assert al.verdict(0.65, [0.6, 0.7]).startswith("within")
    assert "did not beat" in al.outcome([{"k": 5, "verdict": al.verdict(0.5, [0.6])}])
