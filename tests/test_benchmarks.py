"""The benchmark scripts keep working: each runs end to end on tiny inputs.

Benchmarks are not tests (CI never runs them in full); these run each script's ``main`` on a
fake BUSI tree, a fake BUS-BRA folder and an untrained tiny checkpoint, and check that the
tables, JSON and plots are written and hold what they claim.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
from conftest import load_benchmark, save_png, write_busbra

_load = load_benchmark


@pytest.fixture(scope="module")
def common():
    return _load("_common")


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
    rows = [{"ID": rid, "Case": case, "Histology": "x", "Pathology": path, "BIRADS": "4",
             "Device": dev, "Width": 48, "Height": 40, "Side": "left", "BBOX": "[1,1,2,2]"}
            for rid, case, path, dev in FAKE_BUSBRA]
    return write_busbra(root, images, masks, rows)


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
            "--no-busuclm",
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
              "--no-busuclm", "--quiet"])
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
    # the BUS-BRA gate count is also in the summary against the targets
    assert "| BUS-BRA fold 1 lesion masks the normal-scan gate empties | " \
        f"{gb['n_lesion_gated']} (" in md
    assert saved["headline"]["busbra_gate_emptied"] == gb["n_lesion_gated"]
    assert saved["busuclm"] is None


#: (name, label, Marks, split) of the fake BUS-UCLM folder; BBBB_002 is smaller than its mask.
FAKE_UCLM = [
    ("AAAA_000", "Benign", "Yes", "test"),
    ("AAAA_001", "Normal", "No", "test"),
    ("AAAA_002", "Malignant", "No", "test"),
    ("BBBB_000", "Benign", "No", "test"),
    ("BBBB_001", "Normal", "No", "test"),
    ("BBBB_002", "Benign", "No", "test"),
    ("CCCC_000", "Benign", "No", "train"),
    ("CCCC_001", "Normal", "No", "train"),
]


@pytest.fixture
def fake_busuclm(tmp_path, synthetic_pairs) -> tuple[Path, Path]:
    """A BUS-UCLM-like folder (images/, colour-coded masks/, INFO.csv) and its split CSV."""
    root = tmp_path / "busuclm"
    images, masks = synthetic_pairs(len(FAKE_UCLM), size=(40, 48), seed=5)
    colour = {"Benign": (0, 255, 0), "Malignant": (255, 0, 0)}
    info = ["Image;Resolution;Label;Doppler;Marks;Combined"]
    split = [["image", "label", "group", "split"]]
    for (name, label, marks, part), image, mask in zip(FAKE_UCLM, images, masks, strict=True):
        rgb = np.zeros((*mask.shape, 3), np.uint8)
        if label != "Normal":
            rgb[mask] = colour[label]
        save_png(root / "masks" / f"{name}.png", rgb)
        save_png(root / "images" / f"{name}.png",
                  image[:30, :36] if name == "BBBB_002" else image)
        info.append(f"{name}.png;48x40;{label};No;{marks};No")
        split.append([f"images/{name}.png", label.lower(), "ABC".index(name[0]), part])
    (root / "INFO.csv").write_text("\n".join(info) + "\n")
    split_csv = tmp_path / "busuclm.csv"
    with open(split_csv, "w", newline="") as fh:
        csv.writer(fh).writerows(split)
    return root, split_csv


def test_read_info_flags(tmp_path):
    acc = _load("accuracy")
    (tmp_path / "INFO.csv").write_text(
        "Image;Resolution;Label;Doppler;Marks;Combined\nX_000.png;1x1;Benign;No;Yes;No\n"
        "X_001.png;1x1;Normal;No;No;?\n")
    flags = acc.read_info_flags(tmp_path)
    assert flags == {"X_000": {"marks": True, "doppler": False, "combined": False},
                     "X_001": {"marks": False, "doppler": False, "combined": None}}
    assert acc.read_info_flags(tmp_path / "none") == {}


def test_accuracy_busuclm_section(tmp_path, fake_busi, fake_split, fake_busuclm,
                                  make_head_checkpoint):
    acc = _load("accuracy")
    root, split_csv = fake_busuclm
    # no pixel reaches 0.9 in an untrained model: this gate empties every non-empty mask
    ckpt = make_head_checkpoint({"p_normal": 0.3, "lesion_confidence": 0.9})
    out = tmp_path / "out"
    acc.main(["--checkpoint", str(ckpt), "--busi", str(fake_busi), "--split", str(fake_split),
              "--no-busbra", "--busuclm", str(root), "--busuclm-split", str(split_csv),
              "--out", str(out), "--n-boot", "50", "--quiet"])
    saved = _outputs(out, "accuracy")
    u = saved["busuclm"]
    rows = [r for r in saved["per_image"] if r["dataset"] == "BUS-UCLM"]
    # the test patients only; BBBB_002 (image smaller than its mask) is reported, not scored
    assert sorted(r["name"] for r in rows) == ["AAAA_000", "AAAA_001", "AAAA_002",
                                               "BBBB_000", "BBBB_001"]
    assert u["patients"] == ["AAAA", "BBBB"]
    assert (u["n_lesion"], u["n_normal"]) == (3, 2)
    assert [s["image"] for s in u["skipped"]] == ["images/BBBB_002.png"]
    assert u["skipped_by_reason"] == {"size mismatch": 1}
    assert {r["name"]: r["marks"] for r in rows}["AAAA_000"] is True
    lesion = [r for r in rows if r["label"] != "normal"]
    nm = u["lesion_dice_no_marks"]
    assert nm["gate_on"]["n"] == 2 and u["lesion_dice_marks"]["gate_on"]["n"] == 1
    assert nm["gate_off"]["mean"] == pytest.approx(
        np.mean([r["dice_ungated"] for r in lesion if r["marks"] is False]))
    ld = u["lesion_dice"]
    assert ld["gate_on"]["mean"] == pytest.approx(np.mean([r["dice"] for r in lesion]))
    assert ld["gate_on"]["ci_low"] <= ld["gate_on"]["mean"] <= ld["gate_on"]["ci_high"]
    fp = u["fp_rate_normal"]
    assert fp["gate_on"]["mean"] == 0.0  # this gate empties every mask
    assert fp["gate_off"]["sum"] == sum(r["any_pred_ungated"] for r in rows
                                        if r["label"] == "normal")
    assert u["gate"]["n_lesion_gated"] == sum(r["gated"] for r in lesion)
    auc = u["class_head"]["auc_lesion_vs_normal"]
    assert (auc["n_pos"], auc["n_neg"]) == (3, 2) and auc["auc"] == 0.5  # all scores tie
    assert saved["headline"]["uclm_fp_normal"] == 0.0
    md = (out / "accuracy.md").read_text()
    assert "## BUS-UCLM test patients" in md
    assert "| lesion Dice, scans without caliper marks | 2 |" in md
    assert "1 x size mismatch" in md and "images/BBBB_002.png" in md
    assert "## Summary against the targets of issue 13 (default settings)" in md
    assert "| BUS-UCLM test patients: normal scans with any predicted lesion | 0.000 | <= 0.10 " \
        "| yes |" in md


def test_accuracy_busuclm_missing_folder_is_an_error(tmp_path, fake_busi, fake_split,
                                                    tiny_checkpoint):
    acc = _load("accuracy")
    with pytest.raises(SystemExit, match="BUS-UCLM not found"):
        acc.main(["--checkpoint", str(tiny_checkpoint), "--busi", str(fake_busi), "--split",
                  str(fake_split), "--no-busbra", "--busuclm", str(tmp_path / "none"),
                  "--out", str(tmp_path / "out"), "--quick", "--quiet"])


def test_busuclm_test_patients_on_the_real_data():
    acc = _load("accuracy")
    root = acc.C.DEFAULT_BUSUCLM
    if not root.is_dir():
        pytest.skip(f"{root} absent (../shared/data/busuclm-dev is not distributed here)")
    items, skipped = acc.busuclm_items(root, acc.C.DEFAULT_BUSUCLM_SPLIT, "test", None)
    assert sorted({i["patient"] for i in items}) == ["ALWI", "ANFO", "CHCO", "UNCU"]
    lesion = [i for i in items if i["label"] != "normal"]
    assert (len(lesion), len(items) - len(lesion)) == (34, 29)
    assert all(i["marks"] in (True, False) for i in items)
    assert sum(i["marks"] is False for i in lesion) == 22
    assert skipped == []  # the 13 HESN scans smaller than their masks are in val


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
    assert ft["freeze_encoder"] is False and ft["repeats"] == 1  # the widget default
    assert ft["cpu_seconds"] > 0 and len(ft["cpu_seconds_all"]) == 1
    fz = saved["finetune_frozen"]  # the widget's frozen option, for comparison
    assert fz["freeze_encoder"] is True and fz["steps"] == 2 and fz["seconds"] > 0
    md = (out / "speed.md").read_text()
    assert "## Issue targets (measured in this run)" in md
    assert "| busseg old default |" in md and "plain U-Net base 16 (reference)" in md
    assert "(not the target's setting)" in md
    assert "widget settings: whole network" in md
    assert "the same with the encoder frozen" in md


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
    from busseg.finetune import FINETUNE_DEFAULTS

    for key in ("freeze_encoder", "loss", "lr", "batch_size", "augment"):
        assert saved["settings"]["finetune"][key] == FINETUNE_DEFAULTS[key]  # widget defaults
    assert all(r["freeze_encoder"] is FINETUNE_DEFAULTS["freeze_encoder"] for r in runs[1:])
    assert saved["frozen_summary"] == []
    assert res["estimate_s"] > 0


def test_annotation_loop_compare_frozen(tmp_path, fake_busbra, tiny_checkpoint):
    loop = _load("annotation_loop")
    out = tmp_path / "out"
    loop.main(["--checkpoint", str(tiny_checkpoint), "--busbra", str(fake_busbra), "--no-busi",
               "--out", str(out), "--ks", "0", "2", "--draws", "1", "--eval-limit", "3",
               "--max-steps", "2", "--compare-frozen", "--quiet"])
    saved = _outputs(out, "annotation_loop")
    runs = saved["runs"]
    assert [(r["k"], r.get("mode")) for r in runs] == [(0, None), (2, "default"),
                                                        (2, "frozen")]
    assert runs[1]["freeze_encoder"] is False and runs[2]["freeze_encoder"] is True
    assert runs[1]["ids"] == runs[2]["ids"]  # the same corrected pairs
    assert all(r["finetune_s"] > 0 for r in runs[1:])
    base = runs[0]["eval"]["mean_dice"]
    fz = {r["k"]: r for r in saved["frozen_summary"]}
    assert fz[2]["gain"] == pytest.approx(runs[2]["eval"]["mean_dice"] - base)
    df = {r["k"]: r for r in saved["summary"]}
    assert df[2]["gain"] == pytest.approx(runs[1]["eval"]["mean_dice"] - base)
    assert df[2]["finetune_s_median"] == pytest.approx(runs[1]["finetune_s"])
    assert saved["targets"]["10"]["gain"] is None  # k = 10 not run
    md = (out / "annotation_loop.md").read_text()
    assert "### Widget default vs frozen encoder (same pairs, same steps)" in md
    assert "whole network, loss bce_lesion_dice" in md


def test_annotation_loop_recipes_same_pairs_and_box_clicks(tmp_path, fake_busbra,
                                                          tiny_prompt_checkpoint):
    """``--recipes``: one fine-tune per recipe on the same pairs; box-then-clicks numbers."""
    loop = _load("annotation_loop")
    out = tmp_path / "out"
    loop.main(["--checkpoint", str(tiny_prompt_checkpoint), "--busbra", str(fake_busbra),
               "--no-busi", "--out", str(out), "--ks", "0", "2", "--draws", "1",
               "--eval-limit", "3", "--max-steps", "2", "--recipes", "replay", "v2-default",
               "--quiet"])
    saved = _outputs(out, "annotation_loop")
    runs = saved["runs"]
    assert [(r["k"], r.get("mode")) for r in runs] == [(0, None), (2, "replay"),
                                                        (2, "v2-default")]
    assert runs[1]["ids"] == runs[2]["ids"]  # the same corrected pairs
    assert runs[1]["n_replay"] == 30 and runs[2]["n_replay"] == 0
    for r in runs:
        bc = r["box_clicks"]
        assert bc["n"] == 3 and len(bc["interactions"]) == 3  # every eval scan has a lesion
        assert all(1 <= x <= 20 for x in bc["interactions"])  # a box at least
        assert bc["per_lesion_scan"] == pytest.approx(np.mean(bc["interactions"]))
    rows = {r["recipe"]: r for r in saved["recipe_rows"]}
    assert set(rows) == {"replay", "v2-default"}
    assert rows["replay"]["inter_before"] == pytest.approx(runs[0]["box_clicks"]["per_lesion_scan"])
    assert rows["replay"]["inter_after"][0] == pytest.approx(
        runs[1]["box_clicks"]["per_lesion_scan"])
    assert rows["v2-default"]["gain"] == pytest.approx(
        runs[2]["eval"]["mean_dice"] - runs[0]["eval"]["mean_dice"])
    assert saved["recipe_choice"] is None  # k = 10 not run
    assert saved["settings"]["finetune"]["replay"] == 30  # the first recipe's settings
    md = (out / "annotation_loop.md").read_text()
    assert "### Fine-tune recipes: automatic Dice and box-then-clicks interactions" in md
    assert "| 2 | replay | 1 |" in md
    with pytest.raises(SystemExit, match="unknown recipe"):
        loop.parse_args(["--recipes", "nope"])


def _recipe_row(recipe, gain, inter, base_inter=2.0, k=10):
    return {"k": k, "recipe": recipe, "gain": gain, "inter_before": base_inter,
            "inter_after": (inter, 0.0), "meets": gain >= 0.04 and inter <= base_inter}


def test_annotation_loop_choose_recipe_rule():
    loop = _load("annotation_loop")
    rows = [_recipe_row("a", 0.06, 1.9), _recipe_row("b", 0.05, 1.8),
            _recipe_row("c", 0.09, 2.5), _recipe_row("d", 0.03, 1.0),
            _recipe_row("e", 0.08, 0.5, k=40)]
    got = loop.choose_recipe(rows)
    assert got["recipe"] == "b" and got["met"] is True  # fewest interactions among the met
    # none meets both: fewest interactions among positive gains, target missed
    rows = [_recipe_row("a", 0.06, 2.4), _recipe_row("b", 0.01, 2.2),
            _recipe_row("c", -0.01, 1.0)]
    got = loop.choose_recipe(rows)
    assert got["recipe"] == "b" and got["met"] is False and "no recipe meets" in got["reason"]
    got = loop.choose_recipe([_recipe_row("c", -0.01, 1.0)])
    assert got["recipe"] is None and got["met"] is False


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
    from busseg.finetune import FINETUNE_DEFAULTS  # the widget defaults are what it runs

    assert saved["settings"]["finetune"]["freeze_encoder"] == FINETUNE_DEFAULTS["freeze_encoder"]
    assert saved["settings"]["finetune"]["loss"] == FINETUNE_DEFAULTS["loss"]
    assert "whole network" in md or "encoder frozen" in md
    assert al.verdict(0.5, [0.6, 0.7]).startswith("random better")
    assert al.verdict(0.8, [0.6, 0.7]).startswith("uncertainty better")
    assert al.verdict(0.65, [0.6, 0.7]).startswith("within")
    assert "did not beat" in al.outcome([{"k": 5, "verdict": al.verdict(0.5, [0.6])}])
