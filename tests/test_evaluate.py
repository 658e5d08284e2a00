import csv
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from busseg.data.io import read_image, read_mask
from busseg.metrics import segmentation_metrics

REPO = Path(__file__).resolve().parents[1]

TEST_ROWS = [
    "benign/benign (1).png",
    "benign/benign (2).png",
    "malignant/malignant (1).png",
    "normal/normal (1).png",
]


@pytest.fixture(scope="module")
def evaluate():
    spec = importlib.util.spec_from_file_location("busseg_evaluate", REPO / "training/evaluate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def split_file(fake_busi, tmp_path):
    from busseg.data.busi import discover_busi

    path = tmp_path / "split.csv"
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["image", "label", "group", "split"])
        for i, r in enumerate(discover_busi(fake_busi).records):
            w.writerow([r.rel_path, r.label, i, "test" if r.rel_path in TEST_ROWS else "train"])
    return path


def _run(evaluate, argv, capsys):
    code = evaluate.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_end_to_end(evaluate, fake_busi, split_file, tiny_checkpoint, tmp_path, capsys):
    out_dir = tmp_path / "eval"
    code, out, err = _run(
        evaluate,
        [
            "--checkpoint",
            tiny_checkpoint,
            "--data",
            fake_busi,
            "--split",
            "test",
            "--split-file",
            split_file,
            "--out",
            out_dir,
            "--no-progress",
            "--threshold",
            "0.45",
        ],
        capsys,
    )
    assert code == 0, err
    assert "| Group | n | Dice |" in out and "| lesion | 3 |" in out

    with open(out_dir / "per_image.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["image"] for r in rows] == TEST_ROWS
    for r in rows:
        cls, name = r["image"].split("/")
        stem = name[:-4]
        image = read_image(fake_busi / r["image"])
        with Image.open(out_dir / "predictions" / cls / f"{stem}_mask.png") as im:
            pred = np.asarray(im) > 0
        assert pred.shape == image.shape == (int(r["height"]), int(r["width"]))
        truth = read_mask(sorted((fake_busi / cls).glob(f"{stem}_mask*.png")))
        expected = segmentation_metrics(pred, truth)
        assert float(r["dice"]) == pytest.approx(expected["dice"], abs=1e-5)
        assert int(r["true_area"]) == expected["true_area"] and int(r["tp"]) == expected["tp"]
        with Image.open(out_dir / "overlays" / cls / f"{stem}.png") as im:
            assert im.mode == "RGB" and im.size == (image.shape[1], image.shape[0])

    summary = json.loads((out_dir / "summary.json").read_text())
    assert summary["threshold"] == 0.45 and summary["n_images"] == 4 and summary["split"] == "test"
    groups = summary["summary"]
    assert list(groups) == ["benign", "malignant", "normal", "lesion", "all"]
    assert groups["lesion"]["n"] == 3 and groups["all"]["n"] == 4
    normal = [r for r in rows if r["label"] == "normal"][0]
    assert groups["normal"]["n_empty_truth"] == 1
    assert groups["normal"]["fp_rate"] == (1.0 if normal["any_pred"] == "True" else 0.0)
    dices = [float(r["dice"]) for r in rows]
    assert groups["all"]["metrics"]["dice"]["mean"] == pytest.approx(np.mean(dices), abs=1e-5)
    assert "ci_low" in groups["all"]["metrics"]["dice"]
    md = (out_dir / "summary.md").read_text()
    assert "| all | 4 |" in md and "threshold 0.45" in md


def test_refuses_non_empty_out_unless_overwrite(
    evaluate, fake_busi, tiny_checkpoint, tmp_path, capsys
):
    out_dir = tmp_path / "eval"
    out_dir.mkdir()
    (out_dir / "keep.txt").write_text("mine")
    args = [
        "--checkpoint",
        tiny_checkpoint,
        "--data",
        fake_busi,
        "--split",
        "all",
        "--out",
        out_dir,
        "--no-progress",
        "--no-overlays",
    ]
    code, out, err = _run(evaluate, args, capsys)
    assert code == 2 and "not empty" in err and "Traceback" not in err
    assert sorted(p.name for p in out_dir.iterdir()) == ["keep.txt"]
    code, out, err = _run(evaluate, [*args, "--overwrite"], capsys)
    assert code == 0, err
    assert (out_dir / "keep.txt").read_text() == "mine"
    with open(out_dir / "per_image.csv", newline="") as fh:
        assert len(list(csv.DictReader(fh))) == 6  # --split all: every usable image
    assert not (out_dir / "overlays").exists()


def test_split_all_without_out_only_prints(evaluate, fake_busi, tiny_checkpoint, tmp_path, capsys):
    code, out, err = _run(
        evaluate,
        [
            "--checkpoint",
            tiny_checkpoint,
            "--data",
            fake_busi / "benign",
            "--split",
            "all",
            "--no-progress",
            "--tta",
            "--keep",
            "largest",
        ],
        capsys,
    )
    assert code == 0, err
    assert "| benign | 3 |" in out and "TTA on" in out and "keep=largest" in out
    assert not any(p.name == "per_image.csv" for p in tmp_path.rglob("*"))


@pytest.mark.parametrize("case", ["foreign_split", "missing_split", "bad_checkpoint", "bad_data"])
def test_errors_exit_2(case, evaluate, fake_busi, tiny_checkpoint, tmp_path, capsys):
    args = {
        "--checkpoint": tiny_checkpoint,
        "--data": fake_busi,
        "--split": "test",
        "--split-file": REPO / "training/splits/busi.csv",
    }
    match = {
        "foreign_split": "missing from",
        "missing_split": "not found",
        "bad_checkpoint": "does not exist",
        "bad_data": "no such folder",
    }[case]
    if case == "missing_split":
        args["--split-file"] = tmp_path / "none.csv"
    elif case == "bad_checkpoint":
        args["--checkpoint"] = tmp_path / "nope"
        args["--split"] = "all"
    elif case == "bad_data":
        args["--data"] = tmp_path / "nodata"
    argv = [x for kv in args.items() for x in kv] + ["--no-progress"]
    code, out, err = _run(evaluate, argv, capsys)
    assert code == 2 and match in err and "Traceback" not in err


def test_overlay_colours(evaluate):
    image = np.full((20, 20), 100, np.uint8)
    truth = np.zeros((20, 20), bool)
    truth[5:15, 5:15] = True
    pred = np.zeros((20, 20), bool)
    pred[5:15, 5:12] = True  # shares the left edge with the truth
    rgb = evaluate.overlay_rgb(image, truth, pred)
    assert rgb.shape == (20, 20, 3) and rgb.dtype == np.uint8
    assert tuple(rgb[10, 14]) == (0, 255, 0)  # truth only
    assert tuple(rgb[10, 11]) == (255, 0, 0)  # prediction only
    assert tuple(rgb[10, 5]) == (255, 255, 0)  # both
    assert tuple(rgb[0, 0]) == (100, 100, 100)


def _csv_rows(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture
def varied_class_proba(monkeypatch):
    """Make the (untrained, constant) class head's output vary with the image: P(normal)
    grows with the mean grey level (the fake normal images have no dark lesion)."""
    from busseg import inference

    real = inference.predict

    def predict(image, model=None, **kw):
        res = real(image, model, **kw)
        if res.class_proba is not None:
            g = float(np.asarray(image, dtype=float).mean()) / 255.0
            res.class_proba = {"normal": g, "benign": (1 - g) * 0.6, "malignant": (1 - g) * 0.4}
        return res

    monkeypatch.setattr(inference, "predict", predict)


def test_class_head_gate_aucs_and_reliability(
    evaluate, fake_busi, split_file, make_head_checkpoint, tmp_path, capsys, varied_class_proba
):
    from busseg.metrics import class_head_summary

    # the untrained model: P(normal) = 1/3 and no pixel reaches 0.9, so a 0.3 gate empties
    # every mask; the monkeypatched head above only changes the reported probabilities
    ckpt = make_head_checkpoint({"p_normal": 0.3, "lesion_confidence": 0.9})
    base = ["--checkpoint", ckpt, "--data", fake_busi, "--split", "test", "--split-file",
            split_file, "--no-progress", "--no-overlays", "--n-boot", "200"]
    code, out, err = _run(evaluate, [*base, "--out", tmp_path / "off", "--no-gate"], capsys)
    assert code == 0, err
    off = _csv_rows(tmp_path / "off" / "per_image.csv")
    assert all(r["gated"] == "False" and r["dice_ungated"] == r["dice"] for r in off)
    assert any(r["any_pred"] == "True" for r in off)

    # class probabilities: in the CSV, and the AUCs / calibration computed from them
    for r in off:
        p = [float(r[f"p_{k}"]) for k in ("normal", "benign", "malignant")]
        assert sum(p) == pytest.approx(1.0, abs=1e-5)
    summary = json.loads((tmp_path / "off" / "summary.json").read_text())
    expected = class_head_summary(
        [r["label"] for r in off],
        [{k: float(r[f"p_{k}"]) for k in ("normal", "benign", "malignant")} for r in off],
        n_boot=200)
    head = summary["class_head"]
    for key in ("auc_malignant_vs_benign", "auc_lesion_vs_normal"):
        assert head[key]["auc"] == pytest.approx(expected[key]["auc"], abs=1e-4)
        assert head[key]["ci_low"] <= head[key]["auc"] <= head[key]["ci_high"]
    assert (head["auc_lesion_vs_normal"]["n_pos"], head["auc_lesion_vs_normal"]["n_neg"]) == (3, 1)
    assert head["auc_malignant_vs_benign"]["n_pos"] == 1
    assert head["calibration"]["n"] == 4 and sum(head["calibration"]["count"]) == 4
    assert head["calibration"]["ece"] == pytest.approx(expected["calibration"]["ece"], abs=1e-4)
    with Image.open(tmp_path / "off" / "reliability.png") as im:
        assert im.format == "PNG" and im.size[0] > 100
    md = (tmp_path / "off" / "summary.md").read_text()
    assert "## Class head (research output, not a diagnosis)" in md
    assert "normal-scan gate off (--no-gate)" in md

    # gate on (default): every mask emptied; the ungated columns reproduce the --no-gate run
    code, out, err = _run(evaluate, [*base, "--out", tmp_path / "on"], capsys)
    assert code == 0, err
    on = _csv_rows(tmp_path / "on" / "per_image.csv")
    assert [r["image"] for r in on] == [r["image"] for r in off]
    for a, b in zip(on, off, strict=True):
        assert a["any_pred"] == "False"
        assert a["gated"] == b["any_pred"]  # emptied exactly where the mask had pixels
        assert a["any_pred_ungated"] == b["any_pred"]
        assert float(a["dice_ungated"]) == pytest.approx(float(b["dice"]), abs=1e-5)
    gate = json.loads((tmp_path / "on" / "summary.json").read_text())["gate"]
    normal_off = next(r for r in off if r["label"] == "normal")
    assert gate["on"] and gate["stored"] == {"p_normal": 0.3, "lesion_confidence": 0.9}
    assert gate["fp_rate_normal"] == 0.0
    assert gate["fp_rate_normal_ungated"] == (1.0 if normal_off["any_pred"] == "True" else 0.0)
    lesion_off = [float(r["dice"]) for r in off if r["label"] != "normal"]
    assert gate["lesion_dice_ungated"] == pytest.approx(np.mean(lesion_off), abs=1e-5)
    assert gate["lesion_dice"] == 0.0 and gate["n_lesion"] == 3
    assert gate["n_lesion_gated"] == sum(r["any_pred"] == "True" for r in off
                                         if r["label"] != "normal")
    md = (tmp_path / "on" / "summary.md").read_text()
    assert "## Normal-scan gate" in md
    assert "| FP rate, images without a lesion | 0.000 (0/1) |" in md


def test_busbra_mode(evaluate, make_head_checkpoint, synthetic_pairs, tmp_path, capsys):
    root = tmp_path / "busbra"
    (root / "Images").mkdir(parents=True)
    (root / "Masks").mkdir()
    images, masks = synthetic_pairs(3, size=(40, 48), seed=5)
    lines = ["ID,Case,Pathology,Device"]
    for i, (image, mask) in enumerate(zip(images, masks, strict=True)):
        Image.fromarray(image).save(root / "Images" / f"bus_000{i}-s.png")
        Image.fromarray(mask.astype(np.uint8) * 255).save(root / "Masks" / f"mask_000{i}-s.png")
        lines.append(f"bus_000{i}-s,{i},{'malignant' if i == 0 else 'benign'},GE Logiq 5")
    (root / "bus_data.csv").write_text("\n".join(lines) + "\n")
    ckpt = make_head_checkpoint({"p_normal": 0.3, "lesion_confidence": 0.9})
    out_dir = tmp_path / "eval"
    code, out, err = _run(evaluate, ["--checkpoint", ckpt, "--busbra", root, "--out", out_dir,
                                     "--no-progress", "--n-boot", "100"], capsys)
    assert code == 0, err
    assert "# Evaluation: split `all` of BUS-BRA" in out
    rows = _csv_rows(out_dir / "per_image.csv")
    assert [r["image"] for r in rows] == [f"Images/bus_000{i}-s.png" for i in range(3)]
    assert [r["label"] for r in rows] == ["malignant", "benign", "benign"]
    assert (out_dir / "predictions" / "benign" / "bus_0001-s_mask.png").is_file()
    summary = json.loads((out_dir / "summary.json").read_text())
    assert summary["dataset"] == "busbra" and summary["split_file"] is None
    gate = summary["gate"]
    assert gate["n_lesion"] == 3 and gate["n_normal"] == 0
    assert gate["median_p_normal_lesion"] == pytest.approx(1 / 3, abs=1e-4)
    assert gate["share_lesion_gated"] == gate["n_lesion_gated"] / 3
    assert gate["n_lesion_gated"] == sum(r["gated"] == "True" for r in rows)
    assert "n+ 3, n- 0" in (out_dir / "summary.md").read_text()  # lesion vs normal undefined

    code, out, err = _run(evaluate, ["--checkpoint", ckpt, "--busbra", tmp_path / "none",
                                     "--no-progress"], capsys)
    assert code == 2 and "BUS-BRA folder" in err and "Traceback" not in err


# --------------------------------------------------------------------------- export_default


@pytest.fixture(scope="module")
def export():
    import sys

    sys.path.insert(0, str(REPO / "training"))
    path = REPO / "training/export_default.py"
    spec = importlib.util.spec_from_file_location("busseg_export", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gate_candidates_and_rule_by_hand(export):
    lesion = np.array([False] * 4 + [True] * 4)
    any_pred = np.ones(8, bool)
    dice = np.array([0.0] * 4 + [0.8, 0.7, 0.6, 0.9])
    p_normal = np.array([0.9, 0.8, 0.4, 0.2, 0.1, 0.2, 0.85, 0.1])
    max_proba = np.array([0.6, 0.95, 0.6, 0.6, 0.99, 0.9, 0.7, 0.9])
    rows = export.gate_candidates(dice, any_pred, lesion, max_proba, p_normal)
    assert len(rows) == 1 + len(export.GATE_P_NORMAL) * len(export.GATE_LESION_CONFIDENCE)
    none = rows[0]
    assert none["p_normal"] is None and none["val_fp_rate_normal"] == 1.0
    assert none["val_dice_lesion"] == pytest.approx(0.75) and none["dice_drop"] == 0.0
    by = {(r["p_normal"], r["lesion_confidence"]): r for r in rows[1:]}
    # P(normal) >= 0.4 and max probability < 0.7 empties normal images 0 and 2 only
    assert by[(0.4, 0.7)]["val_fp_rate_normal"] == 0.5 and by[(0.4, 0.7)]["dice_drop"] == 0.0
    # P(normal) >= 0.8 with lesion confidence 1.0 also empties lesion image 2 (Dice 0.6)
    assert by[(0.8, 1.0)]["n_gated_lesion"] == 1
    assert by[(0.8, 1.0)]["dice_drop"] == pytest.approx(0.15)
    # rule: lowest FP rate with a Dice drop <= 0.005; ties to the higher p_normal
    chosen = export.choose_gate(rows)
    assert (chosen["p_normal"], chosen["lesion_confidence"]) == (0.4, 0.7)
    # a looser Dice budget buys a lower FP rate: normal image 1 needs confidence 1.0
    loose = export.choose_gate(rows, max_drop=1.0)
    assert (loose["p_normal"], loose["lesion_confidence"]) == (0.4, 1.0)
    assert loose["val_fp_rate_normal"] == 0.25
    # no gate when none lowers the FP rate
    rows = export.gate_candidates(dice, any_pred, lesion, max_proba, np.full(8, 0.1))
    assert export.choose_gate(rows)["p_normal"] is None


def test_export_default_end_to_end(
    export, evaluate, make_fake_busi, make_head_checkpoint, tmp_path, capsys
):
    import shutil

    from busseg.cli import main as busseg_main
    from busseg.data.busi import discover_busi
    from busseg.models import read_checkpoint_config

    data = make_fake_busi(tmp_path / "busi")
    for k in (2, 3):  # two more normal images, so val and test both have one
        for suffix in ("", "_mask"):
            shutil.copy(data / "normal" / f"normal (1){suffix}.png",
                        data / "normal" / f"normal ({k}){suffix}.png")
    split = tmp_path / "split.csv"
    val = {"benign/benign (3).png", "malignant/malignant (2).png", "normal/normal (2).png"}
    with open(split, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["image", "label", "group", "split"])
        for i, r in enumerate(discover_busi(data).records):
            w.writerow([r.rel_path, r.label, i, "val" if r.rel_path in val
                        else "train" if r.rel_path == "normal/normal (3).png" else "test"])
    run = tmp_path / "run"
    best = make_head_checkpoint(name="run/best")
    cfg_path = best / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["training"] = {"hyperparameters": {"select_metric": "dice_lesion"}}
    cfg_path.write_text(json.dumps(cfg))
    dest = tmp_path / "default"
    # the untrained model cannot separate anything: allow any Dice drop to force a gate
    code = export.main([str(a) for a in (
        "--run", run, "--dest", dest, "--data", data, "--split-file", split, "--eval-out",
        tmp_path / "eval", "--no-flips", "--threads", "1", "--n-boot", "50",
        "--max-dice-drop", "1.0")])
    out = capsys.readouterr().out
    assert code == 0
    cfg = read_checkpoint_config(dest)
    assert cfg["weights_dtype"] == "float16"
    assert (dest / "model.safetensors").stat().st_size < 10e6
    inf = cfg["inference"]
    assert inf["tta_flips"] is False and inf["threshold"] in export.THRESHOLDS
    tuning = cfg["training"]["gate_tuning"]
    chosen = tuning["chosen"]
    assert inf["normal_gate"] == {"p_normal": chosen["p_normal"],
                                  "lesion_confidence": chosen["lesion_confidence"]}
    assert len(tuning["grid"]) == 1 + 8 * 7 and tuning["max_dice_drop"] == 1.0
    assert chosen["val_fp_rate_normal"] < tuning["grid"][0]["val_fp_rate_normal"]
    # the simulated gate is the real one: evaluate.py on the val split agrees
    code = evaluate.main([str(a) for a in (
        "--checkpoint", dest, "--data", data, "--split", "val", "--split-file", split,
        "--no-progress", "--out", tmp_path / "val", "--n-boot", "20")])
    assert code == 0
    gate = json.loads((tmp_path / "val" / "summary.json").read_text())["gate"]
    assert gate["fp_rate_normal"] == pytest.approx(chosen["val_fp_rate_normal"])
    assert gate["lesion_dice"] == pytest.approx(chosen["val_dice_lesion"], abs=1e-6)
    # the card: rule, candidates, test metrics with the gate on and off, AUCs
    card_md = (dest / "MODEL_CARD.md").read_text()
    assert "## Normal-scan gate candidates (validation split)" in card_md
    assert "lowest FP rate on normal images" in card_md and "**(chosen)**" in card_md
    assert "FP rate, gate off |" in card_md and "## Class head on the test split" in card_md
    card = json.loads((dest / "model_card.json").read_text())
    assert set(card["test_class_head"]) >= {"auc_malignant_vs_benign", "auc_lesion_vs_normal"}
    assert card["test_metrics"]["normal"]["fp_rate_ungated"] is not None
    assert cfg["metrics"]["test_class_head"] == card["test_class_head"]
    assert "chosen: P(normal) >=" in out
    code = busseg_main(["info", "--checkpoint", str(dest)])
    info = capsys.readouterr().out
    assert code == 0 and "test figures: lesion Dice" in info and "with the gate (" in info
    assert "class head AUC (test split, 95 % CI): malignant vs benign" in info


def test_export_keep_inference_and_checkpoint(export, make_fake_busi, make_head_checkpoint,
                                              tmp_path, capsys):
    """--checkpoint exports a chosen checkpoint; --keep-inference keeps its settings as is."""
    from busseg.models import read_checkpoint_config

    data = make_fake_busi(tmp_path / "busi")
    split = tmp_path / "split.csv"
    from busseg.data.busi import discover_busi

    with open(split, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["image", "label", "group", "split"])
        for i, r in enumerate(discover_busi(data).records):
            w.writerow([r.rel_path, r.label, i, "test" if i % 2 else "val"])
    gate = {"p_normal": 0.95, "lesion_confidence": 0.95}
    chosen = make_head_checkpoint(name="run/evals/step_000004", threshold=0.7,
                                  normal_gate=gate)
    cfg = json.loads((chosen / "config.json").read_text())
    cfg["training"] = {"hyperparameters": {"select_metric": "interactions"}}
    (chosen / "config.json").write_text(json.dumps(cfg))
    dest = tmp_path / "default"
    code = export.main([str(a) for a in (
        "--run", tmp_path / "run", "--checkpoint", chosen, "--keep-inference", "--dest", dest,
        "--data", data, "--split-file", split, "--eval-out", tmp_path / "eval", "--threads",
        "1", "--n-boot", "20")])
    assert code == 0
    inf = read_checkpoint_config(dest)["inference"]
    assert inf["threshold"] == 0.7 and inf["normal_gate"] == gate and inf["tta_flips"] is False
    assert "kept the checkpoint's inference settings" in capsys.readouterr().out
