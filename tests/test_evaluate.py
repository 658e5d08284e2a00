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
