import csv
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from busseg.cli import main
from busseg.data.io import read_image, read_mask
from busseg.metrics import dice_score
from busseg.samples import sample_cases, samples_dir

REPO = Path(__file__).resolve().parents[1]


def _run(argv, capsys):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _predict_ok(capsys, out_dir, checkpoint, *args):
    """Run ``busseg predict ARGS --out OUT_DIR --checkpoint CHECKPOINT --no-progress``, check
    that it succeeded; return its stdout and the written files (relative to out_dir, sorted)."""
    code, out, err = _run(["predict", *args, "--out", out_dir, "--checkpoint", checkpoint,
                           "--no-progress"], capsys)
    assert code == 0, err
    return out, sorted(p.relative_to(out_dir).as_posix() for p in out_dir.rglob("*.png"))


def _mask_png(path):
    with Image.open(path) as im:
        assert im.mode == "L"
        a = np.asarray(im)
    assert set(np.unique(a)) <= {0, 255}
    return a > 0


def _printed_dice(out):
    return {m.group(1): float(m.group(2)) for m in re.finditer(r"^(.+): Dice ([0-9.]+)", out, re.M)}


def test_predict_busi_tree_writes_masks_and_dice(fake_busi, tiny_checkpoint, tmp_path, capsys):
    out_dir = tmp_path / "out"
    out, written = _predict_ok(capsys, out_dir, tiny_checkpoint, fake_busi)
    assert written == [
        "benign/benign (1)_mask.png",
        "benign/benign (2)_mask.png",
        "benign/benign (3)_mask.png",
        "malignant/malignant (1)_mask.png",
        "malignant/malignant (2)_mask.png",
        "normal/normal (1)_mask.png",
    ]
    dice = _printed_dice(out)
    assert len(dice) == 6
    for rel in written:
        cls, name = rel.split("/")
        stem = name.replace("_mask.png", "")
        image = read_image(fake_busi / cls / f"{stem}.png")
        pred = _mask_png(out_dir / rel)
        assert pred.shape == image.shape
        truth = read_mask(sorted((fake_busi / cls).glob(f"{stem}_mask*.png")))
        assert dice[f"{cls}/{stem}.png"] == pytest.approx(dice_score(pred, truth), abs=5e-4)
    mean = float(re.search(r"mean Dice ([0-9.]+) over 6 image", out).group(1))
    assert mean == pytest.approx(np.mean(list(dice.values())), abs=2e-3)
    assert "wrote 6 mask(s)" in out


def test_no_overwrite_then_overwrite(fake_busi, tiny_checkpoint, tmp_path, capsys):
    out_dir = tmp_path / "out"
    args = [
        "predict",
        fake_busi / "benign",
        "--out",
        out_dir,
        "--checkpoint",
        tiny_checkpoint,
        "--no-progress",
    ]
    assert _run(args, capsys)[0] == 0
    # a class folder as PATH: OUT mirrors the layout under it
    assert sorted(p.name for p in out_dir.iterdir()) == [
        "benign (1)_mask.png",
        "benign (2)_mask.png",
        "benign (3)_mask.png",
    ]
    target = out_dir / "benign (1)_mask.png"
    target.write_bytes(b"user edited")  # stands for a file the user changed
    code, out, err = _run(args, capsys)
    assert code == 1
    assert "--overwrite" in err and "benign (1)_mask.png" in err
    assert target.read_bytes() == b"user edited"
    # only some outputs present: the others are still written, exit status still 1
    (out_dir / "benign (3)_mask.png").unlink()
    code, out, err = _run(args, capsys)
    assert code == 1 and (out_dir / "benign (3)_mask.png").is_file()
    assert "wrote 1 mask(s)" in out
    code, out, err = _run([*args, "--overwrite"], capsys)
    assert code == 0
    assert _mask_png(target).shape == (40, 48)


def test_plain_folder_and_single_files(tmp_path, tiny_checkpoint, capsys):
    src = tmp_path / "scans"
    src.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (30, 41), dtype=np.uint8)).save(src / "a.png")
    Image.fromarray(rng.integers(0, 255, (25, 20, 3), dtype=np.uint8)).save(src / "b.jpg")
    Image.fromarray(rng.integers(0, 60000, (22, 18), dtype=np.uint16)).save(src / "c.tif")
    (src / "notes.txt").write_text("not an image")
    out_dir = tmp_path / "out"
    code, out, err = _run(
        [
            "predict",
            src,
            "--out",
            out_dir,
            "--checkpoint",
            tiny_checkpoint,
            "--no-progress",
            "--threshold",
            "0.4",
            "--tta",
            "--fill-holes",
            "--keep",
            "largest",
            "--min-area",
            "2",
        ],
        capsys,
    )
    assert code == 0, err
    assert sorted(p.name for p in out_dir.iterdir()) == ["a_mask.png", "b_mask.png", "c_mask.png"]
    assert _mask_png(out_dir / "b_mask.png").shape == (25, 20)
    assert _mask_png(out_dir / "c_mask.png").shape == (22, 18)
    assert "Dice" not in out  # no ground truth
    # a single file with a ground-truth sibling gets a Dice line
    Image.fromarray(np.zeros((30, 41), np.uint8)).save(src / "a_mask.png")
    code, out, err = _run(
        [
            "predict",
            src / "a.png",
            "--out",
            tmp_path / "o2",
            "--checkpoint",
            tiny_checkpoint,
            "--no-progress",
        ],
        capsys,
    )
    assert code == 0 and re.search(r"^a\.png: Dice [0-9.]+", out, re.M)


def test_samples(tiny_checkpoint, tmp_path, capsys):
    out, names = _predict_ok(capsys, tmp_path / "s", tiny_checkpoint, "--samples")
    assert names == [
        "benign/benign (100)_mask.png",
        "malignant/malignant (181)_mask.png",
        "normal/normal (9)_mask.png",
    ]
    assert len(_printed_dice(out)) == 3


def test_sample_cases_are_test_split_busi_cases():
    recs = sample_cases()
    assert [r.label for r in recs] == ["benign", "malignant", "normal"]
    assert all(r.usable for r in recs)
    assert len(recs[0].mask_paths) == 2  # benign (100) has two lesions
    assert not read_mask(recs[2].mask_paths).any()  # the normal case has no lesion
    assert read_mask(recs[1].mask_paths).any()
    total = sum(p.stat().st_size for p in samples_dir().rglob("*") if p.is_file())
    assert total < 1_000_000
    readme = (samples_dir() / "README.md").read_text()
    assert "10.1016/j.dib.2019.104863" in readme and "CC" in readme
    with open(REPO / "training" / "splits" / "busi.csv", newline="") as fh:
        split = {r["image"]: r["split"] for r in csv.DictReader(fh)}
    for r in recs:
        assert split[r.rel_path] == "test", r.rel_path


@pytest.mark.realdata
def test_real_rgb_originals_and_grey_copies_agree(
    busi_root, busi_originals, tiny_checkpoint, tmp_path, capsys
):
    code, out, err = _run(
        [
            "predict",
            busi_originals,
            "--out",
            tmp_path / "rgb",
            "--checkpoint",
            tiny_checkpoint,
            "--no-progress",
        ],
        capsys,
    )
    assert code == 0, err
    rgb_masks = sorted((tmp_path / "rgb").rglob("*_mask.png"))
    assert len(rgb_masks) >= 6
    assert len(_printed_dice(out)) == len(rgb_masks)
    files = [busi_root / p.parent.name / p.name.replace("_mask.png", ".png") for p in rgb_masks]
    code, out, err = _run(
        [
            "predict",
            *files,
            "--out",
            tmp_path / "grey",
            "--checkpoint",
            tiny_checkpoint,
            "--no-progress",
        ],
        capsys,
    )
    assert code == 0, err
    with Image.open(files[0]) as im:
        assert im.mode in ("L", "RGB")
    n_grey_inputs = 0
    for p in rgb_masks:
        grey = tmp_path / "grey" / p.name
        np.testing.assert_array_equal(_mask_png(grey), _mask_png(p))
        with Image.open(busi_root / p.parent.name / p.name.replace("_mask.png", ".png")) as im:
            n_grey_inputs += im.mode == "L"
    assert n_grey_inputs >= 1  # the comparison really crossed RGB and single-channel files


@pytest.mark.parametrize(
    "extra, match",
    [
        (["missing.png"], "no such file or folder"),
        (["EMPTY"], "no scans found"),
        (["NOTIMAGE"], "not an image file"),
        (["MASK"], "named like a mask"),
        ([], "no input"),
    ],
)
def test_usage_errors_exit_2_without_traceback(extra, match, tmp_path, tiny_checkpoint, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "x.txt").write_text("x")
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "y_mask.png")
    subst = {
        "EMPTY": tmp_path / "empty",
        "NOTIMAGE": tmp_path / "x.txt",
        "MASK": tmp_path / "y_mask.png",
    }
    paths = [subst.get(e, tmp_path / e) for e in extra]
    code, out, err = _run(
        ["predict", *paths, "--out", tmp_path / "out", "--checkpoint", tiny_checkpoint], capsys
    )
    assert code == 2
    assert re.search(match, err) and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_bad_checkpoint_device_and_threshold(fake_busi, tmp_path, capsys):
    bad = tmp_path / "ckpt"
    bad.mkdir()
    (bad / "config.json").write_text("{not json")
    (bad / "model.safetensors").write_bytes(b"junk")
    code, out, err = _run(
        ["predict", fake_busi, "--out", tmp_path / "o", "--checkpoint", bad], capsys
    )
    assert code == 2 and "not valid JSON" in err
    code, out, err = _run(
        ["predict", fake_busi, "--out", tmp_path / "o", "--checkpoint", tmp_path / "nope"], capsys
    )
    assert code == 2 and "does not exist" in err
    with pytest.raises(SystemExit) as exc:
        main(["predict", str(fake_busi), "--out", str(tmp_path / "o"), "--threshold", "1.5"])
    assert exc.value.code == 2
    assert "(0, 1)" in capsys.readouterr().err


def test_device_error(fake_busi, tiny_checkpoint, tmp_path, capsys):
    code, out, err = _run(
        [
            "predict",
            fake_busi,
            "--out",
            tmp_path / "o",
            "--checkpoint",
            tiny_checkpoint,
            "--device",
            "tpu",
        ],
        capsys,
    )
    assert code == 2 and "Unknown device" in err


def test_refuses_to_write_beside_inputs_or_collide(fake_busi, tiny_checkpoint, tmp_path, capsys):
    before = sorted(fake_busi.rglob("*"))
    for src in (fake_busi, fake_busi / "benign"):  # predictions would land on / beside the truth
        code, out, err = _run(
            ["predict", src, "--out", src, "--checkpoint", tiny_checkpoint], capsys
        )
        assert code == 2 and "ground-truth" in err
    assert sorted(fake_busi.rglob("*")) == before
    one, two = tmp_path / "one", tmp_path / "two"
    for d in (one, two):
        d.mkdir()
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(d / "scan.png")
    code, out, err = _run(
        [
            "predict",
            one / "scan.png",
            two / "scan.png",
            "--out",
            tmp_path / "o",
            "--checkpoint",
            tiny_checkpoint,
        ],
        capsys,
    )
    assert code == 2 and "would both be written" in err
    # the same image named twice is segmented once
    code, out, err = _run(
        [
            "predict",
            one / "scan.png",
            one,
            "--out",
            tmp_path / "o",
            "--checkpoint",
            tiny_checkpoint,
            "--no-progress",
        ],
        capsys,
    )
    assert code == 0 and "wrote 1 mask(s)" in out


def test_unreadable_image_is_reported_and_the_rest_written(tmp_path, tiny_checkpoint, capsys):
    src = tmp_path / "in"
    src.mkdir()
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(src / "good.png")
    (src / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    code, out, err = _run(
        ["predict", src, "--out", tmp_path / "o", "--checkpoint", tiny_checkpoint, "--no-progress"],
        capsys,
    )
    assert code == 1
    assert "broken.png" in err and (tmp_path / "o" / "good_mask.png").is_file()
    assert not (tmp_path / "o" / "broken_mask.png").exists()


def test_info(tiny_checkpoint, tmp_path, capsys):
    code, out, err = _run(["info", "--checkpoint", tiny_checkpoint], capsys)
    assert code == 0
    assert "busseg 0.1.0" in out and "devices: " in out and "cpu" in out
    assert "input: 32 x 32" in out and "base 4 channels, depth 2" in out
    assert "threshold 0.5" in out
    code, out, err = _run(["info"], capsys)
    assert code == 0
    # the default model ships with the package, with its test-split metrics in the model card
    assert "default model checkpoint:" in out
    assert "test split: " in out and "lesion Dice" in out
    assert "fine-tuned from" not in out  # the default was trained by train.py, not fine-tuned
    code, out, err = _run(["info", "--checkpoint", tmp_path / "nope"], capsys)
    assert code == 2 and "does not exist" in err


def _classes_csv(path):
    with open(path, newline="") as fh:
        return {r["path"]: r for r in csv.DictReader(fh)}


def test_predict_class_head_writes_classes_csv_and_gates(
    fake_busi, make_head_checkpoint, tiny_checkpoint, tmp_path, capsys
):
    # the untrained head says P(normal) = 1/3 and no pixel reaches 0.9: a gate at 0.3 empties
    ckpt = make_head_checkpoint({"p_normal": 0.3, "lesion_confidence": 0.9})
    # classes.csv paths are relative to the input folder, like the masks under --out
    images = sorted(p.relative_to(fake_busi).as_posix() for p in fake_busi.rglob("*.png")
                    if "_mask" not in p.name)
    off, on = tmp_path / "off", tmp_path / "on"
    code, out, err = _run(["predict", fake_busi, "--out", off, "--checkpoint", ckpt,
                           "--no-gate", "--no-progress"], capsys)
    assert code == 0, err
    assert "normal-scan gate off (--no-gate)" in out
    assert out.count("(research output, not a diagnosis)") == 6
    rows = _classes_csv(off / "classes.csv")
    assert sorted(rows) == images
    for r in rows.values():
        p = [float(r[k]) for k in ("p_normal", "p_benign", "p_malignant")]
        assert all(0 <= v <= 1 for v in p) and sum(p) == pytest.approx(1, abs=1e-3)
        assert r["gated"] == "False"
    ungated = {p.relative_to(off).as_posix(): _mask_png(p).any() for p in off.rglob("*.png")}
    assert any(ungated.values())  # the untrained model predicts something somewhere

    code, out, err = _run(["predict", fake_busi, "--out", on, "--checkpoint", ckpt,
                           "--no-progress"], capsys)
    assert code == 0, err
    assert "normal-scan gate on (mask emptied when P(normal) >= 0.3 and no pixel" in out
    assert "gate: mask emptied" in out
    rows = _classes_csv(on / "classes.csv")
    for rel, had_lesion in ungated.items():
        assert not _mask_png(on / rel).any()  # gated, or empty already
        image = rel.replace("_mask.png", ".png")
        assert rows[image]["gated"] == str(had_lesion)

    # a rerun without --overwrite segments only the missing mask and keeps the other rows
    (on / "benign" / "benign (1)_mask.png").unlink()
    (on / "classes.csv").write_text((on / "classes.csv").read_text().replace("True", "stale"))
    code, out, err = _run(["predict", fake_busi, "--out", on, "--checkpoint", ckpt,
                           "--no-gate", "--no-progress"], capsys)
    assert code == 1 and "skipped 5 image(s)" in err
    rows = _classes_csv(on / "classes.csv")
    assert sorted(rows) == images
    assert rows["benign/benign (1).png"]["gated"] == "False"  # rewritten
    assert sum(r["gated"] == "stale" for r in rows.values()) == sum(ungated.values()) - (
        ungated["benign/benign (1)_mask.png"])

    # a model without a class head writes no classes.csv and prints no probabilities
    plain = tmp_path / "plain"
    code, out, err = _run(["predict", fake_busi, "--out", plain, "--checkpoint",
                           tiny_checkpoint, "--no-progress"], capsys)
    assert code == 0 and not (plain / "classes.csv").exists()
    assert "P(normal)" not in out and "normal-scan gate" not in out


def test_info_class_head_gate_and_card_figures(make_head_checkpoint, tiny_checkpoint, capsys):
    import json

    code, out, _ = _run(["info", "--checkpoint", tiny_checkpoint], capsys)
    assert code == 0 and "class head: none" in out and "prompts: none" in out
    assert "normal-scan gate" not in out and "test figures" not in out

    ckpt = make_head_checkpoint()
    code, out, _ = _run(["info", "--checkpoint", ckpt], capsys)
    assert code == 0
    assert "class head: normal / benign / malignant (research output, not a diagnosis)" in out
    assert "prompts: boxes, clicks and previous mask (4 guidance channels)" in out
    assert ("normal-scan gate on (mask emptied when P(normal) >= 0.5 and no pixel reaches "
            "lesion probability 0.9)") in out
    assert "test figures" not in out  # no model card figures yet

    cfg_path = ckpt / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["metrics"] = {
        "test": {"lesion": {"n": 96, "dice": 0.7012},
                 "normal": {"n": 21, "dice": 0.7, "fp_rate": 0.2857, "fp_rate_ungated": 0.5714}},
        "test_class_head": {"auc_malignant_vs_benign": {"auc": 0.851, "ci95": [0.78, 0.912]},
                            "auc_lesion_vs_normal": {"auc": 0.9, "ci95": [None, None]}},
    }
    cfg_path.write_text(json.dumps(cfg))
    code, out, _ = _run(["info", "--checkpoint", ckpt], capsys)
    assert ("test figures: lesion Dice 0.701, FP rate on normal images 0.29 with the gate "
            "(0.57 without)") in out
    assert ("class head AUC (test split, 95 % CI): malignant vs benign 0.851 [0.780, 0.912], "
            "lesion vs normal 0.900") in out


def test_no_command_prints_help(capsys):
    assert main([]) == 2
    assert "predict" in capsys.readouterr().out


def test_module_entry_point_runs():
    env = {"PYTHONPATH": str(REPO / "src"), "PATH": "/usr/bin:/bin"}
    res = subprocess.run(
        [sys.executable, "-m", "busseg.cli", "--version"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert res.returncode == 0 and res.stdout.strip() == "busseg 0.1.0"
    assert "busseg = busseg.cli:main" in (REPO / "setup.cfg").read_text()


# --------------------------------------------------------------------------- rough edges


def _env():
    import os

    return {**os.environ, "PYTHONPATH": str(REPO / "src"), "PYTHONUNBUFFERED": "1",
            "OMP_NUM_THREADS": "1"}


@pytest.mark.parametrize("command", ["rank", "predict"])
def test_closed_pipe_ends_quietly_like_a_unix_tool(command, fake_busi, tiny_checkpoint,
                                                   tmp_path):
    """``busseg rank DIR --out r.csv | head -1``: no BrokenPipeError traceback, work done."""
    out = tmp_path / ("r.csv" if command == "rank" else "masks")
    argv = [sys.executable, "-m", "busseg.cli", command, str(fake_busi), "--out", str(out),
            "--checkpoint", str(tiny_checkpoint), "--device", "cpu"]
    if command == "rank":
        argv.append("--no-cache")
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=_env(), stdin=subprocess.DEVNULL)
    first = proc.stdout.readline()  # what `head -1` reads, then it exits
    proc.stdout.close()
    err = proc.stderr.read().decode()
    code = proc.wait(timeout=300)
    assert first.startswith(b"model ")
    assert "Traceback" not in err and "BrokenPipeError" not in err, err
    assert "Exception ignored" not in err, err
    assert code == 0, err
    if command == "rank":
        assert out.is_file()  # the work was finished
    else:
        assert len(list(out.rglob("*_mask.png"))) == 6


def test_nothing_written_is_said_and_exits_non_zero(tmp_path, make_head_checkpoint, capsys):
    src = tmp_path / "in"
    src.mkdir()
    (src / "only.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    out_dir = tmp_path / "o"
    code, out, err = _run(["predict", src, "--out", out_dir, "--checkpoint",
                           make_head_checkpoint(), "--no-progress"], capsys)
    assert code == 1
    assert "written to" not in out and "wrote 0 mask(s)" not in out
    assert "wrote" not in out and not (out_dir / "classes.csv").exists()
    assert "no mask written: 1 image(s) could not be read" in err
    assert not out_dir.exists()  # nothing claims it exists


def test_no_progress_bar_frames_when_not_a_terminal(fake_busi, tiny_checkpoint, tmp_path,
                                                    capsys):
    code, out, err = _run(["predict", fake_busi, "--out", tmp_path / "o", "--checkpoint",
                           tiny_checkpoint], capsys)  # no --no-progress; stderr is captured
    assert code == 0, err
    assert "\r" not in err and "image/s" not in err and "%|" not in err, err
    assert "\r" not in out and "image/s" not in out


def test_unreadable_and_empty_images_are_named_once(tmp_path, tiny_checkpoint, capsys):
    src = tmp_path / "in"
    src.mkdir()
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(src / "good.png")
    (src / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    (src / "empty.png").write_bytes(b"")
    code, out, err = _run(["predict", src, "--out", tmp_path / "o", "--checkpoint",
                           tiny_checkpoint, "--no-progress"], capsys)
    assert code == 1
    for name in ("broken.png", "empty.png"):
        lines = [ln for ln in err.splitlines() if name in ln]
        assert len(lines) == 1, err  # named once, not again in the summary at the end
        assert lines[0].count(name) == 1, lines
    assert any("empty.png is empty (0 bytes)" in ln for ln in err.splitlines()), err
    assert "could not read 2 image(s), each named above" in err
    assert (tmp_path / "o" / "good_mask.png").is_file()


class _ModelLoaded(Exception):
    pass


def test_bad_input_is_refused_before_the_model_loads(tmp_path, tiny_checkpoint, capsys,
                                                     monkeypatch):
    import busseg.inference

    def no_load(*args, **kwargs):
        raise _ModelLoaded("the model was loaded for input that cannot be segmented")

    monkeypatch.setattr(busseg.inference, "load_model", no_load)
    src = tmp_path / "in"
    src.mkdir()
    (src / "empty.png").write_bytes(b"")
    (src / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    out_dir = tmp_path / "o"
    for argv in (["predict", src], ["predict", src / "empty.png"]):
        code, out, err = _run([*argv, "--out", out_dir, "--checkpoint", tiny_checkpoint,
                               "--no-progress"], capsys)
        assert code == 1, err
        assert "empty.png is empty (0 bytes)" in err
        assert "no mask written" in err and not out_dir.exists()
    assert "no mask written: 2 image(s) could not be read" in _run(
        ["predict", src, "--out", out_dir, "--checkpoint", tiny_checkpoint], capsys)[2]


def test_bad_input_is_refused_without_importing_torch(tmp_path, tiny_checkpoint):
    (tmp_path / "empty.png").write_bytes(b"")
    code = (
        "import sys; from busseg.cli import main; "
        f"status = main(['predict', {str(tmp_path / 'empty.png')!r}, '--out', "
        f"{str(tmp_path / 'o')!r}, '--checkpoint', {str(tiny_checkpoint)!r}]); "
        "print('status', status, 'torch', 'torch' in sys.modules)"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=_env(), timeout=120)
    assert res.stdout.strip().splitlines()[-1] == "status 1 torch False", res.stdout + res.stderr
    assert "is empty (0 bytes)" in res.stderr


def _fake_pairs(root, images="Images", masks="Masks", image_name="bus_{}-l.png",
                mask_name="mask_{}-l.png", size=(20, 24)):
    """A tiny image/mask folder pair: BUS-BRA naming by default, BUS-UCLM's with the args."""
    for d in (images, masks):
        (root / d).mkdir(parents=True)
    for k, rows in (("0001", slice(4, 10)), ("0002", slice(8, 16))):
        Image.fromarray(np.full(size, 90, np.uint8)).save(root / images / image_name.format(k))
        m = np.zeros(size, np.uint8)
        m[rows, 5:12] = 255
        Image.fromarray(m).save(root / masks / mask_name.format(k))
    return root


@pytest.mark.parametrize("layout", ["busbra", "busuclm"])
def test_single_image_of_a_pair_layout_gets_its_dice(layout, tmp_path, tiny_checkpoint, capsys):
    """``busseg predict Images/bus_X.png``: its ground truth in Masks/ is found by discover."""
    if layout == "busbra":
        root = _fake_pairs(tmp_path / "bra")
        image, mask = root / "Images" / "bus_0002-l.png", root / "Masks" / "mask_0002-l.png"
    else:
        root = _fake_pairs(tmp_path / "uclm", "images", "masks", "ALWI_{}.png", "ALWI_{}.png")
        image, mask = root / "images" / "ALWI_0002.png", root / "masks" / "ALWI_0002.png"
    code, out, err = _run(["predict", image, "--out", tmp_path / "o", "--checkpoint",
                           tiny_checkpoint, "--no-progress"], capsys)
    assert code == 0, err
    dice = _printed_dice(out)
    assert list(dice) == [image.name], out
    pred = _mask_png(tmp_path / "o" / f"{image.stem}_mask.png")
    assert dice[image.name] == pytest.approx(dice_score(pred, read_mask(mask)), abs=5e-4)
    assert "mean Dice" in out
    # the mask itself is not an input
    code, out, err = _run(["predict", mask, "--out", tmp_path / "m", "--checkpoint",
                           tiny_checkpoint, "--no-progress"], capsys)
    assert code == 2 and "ground-truth mask of" in err, err


def test_single_image_outside_a_pair_has_no_dice(tmp_path, tiny_checkpoint, capsys):
    root = tmp_path / "plain"
    (root / "scans").mkdir(parents=True)
    Image.fromarray(np.full((20, 24), 90, np.uint8)).save(root / "scans" / "bus_0001-l.png")
    code, out, err = _run(["predict", root / "scans" / "bus_0001-l.png", "--out",
                           tmp_path / "o", "--checkpoint", tiny_checkpoint, "--no-progress"],
                          capsys)
    assert code == 0, err
    assert not _printed_dice(out) and "mean Dice" not in out


@pytest.mark.realdata
def test_single_real_busbra_image_gets_its_dice(busbra_root, tiny_checkpoint, tmp_path,
                                                capsys):
    image = sorted((busbra_root / "Images").glob("bus_*-l.png"))[0]
    mask = busbra_root / "Masks" / image.name.replace("bus_", "mask_", 1)
    assert mask.is_file()
    code, out, err = _run(["predict", image, "--out", tmp_path / "o", "--checkpoint",
                           tiny_checkpoint, "--no-progress"], capsys)
    assert code == 0, err
    pred = _mask_png(tmp_path / "o" / f"{image.stem}_mask.png")
    dice = _printed_dice(out)
    assert dice[image.name] == pytest.approx(dice_score(pred, read_mask(mask)), abs=5e-4)


def test_classes_csv_paths_are_relative_to_the_input_folder(make_head_checkpoint, tmp_path,
                                                             capsys):
    ckpt = make_head_checkpoint()
    code, out, err = _run(["predict", "--samples", "--out", tmp_path / "s", "--checkpoint",
                           ckpt, "--no-progress"], capsys)
    assert code == 0, err
    assert sorted(_classes_csv(tmp_path / "s" / "classes.csv")) == [
        "benign/benign (100).png", "malignant/malignant (181).png", "normal/normal (9).png"]
    src = tmp_path / "in"
    (src / "sub").mkdir(parents=True)
    Image.fromarray(np.zeros((12, 12), np.uint8)).save(src / "sub" / "a.png")
    Image.fromarray(np.zeros((12, 12), np.uint8)).save(tmp_path / "b.png")
    code, out, err = _run(["predict", src, tmp_path / "b.png", "--out", tmp_path / "p",
                           "--checkpoint", ckpt, "--no-progress"], capsys)
    assert code == 0, err
    assert sorted(_classes_csv(tmp_path / "p" / "classes.csv")) == ["b.png", "sub/a.png"]
    assert (tmp_path / "p" / "sub" / "a_mask.png").is_file()  # the same relative place


def test_predict_reads_busbra_layout_through_discover(tmp_path, tiny_checkpoint, capsys):
    root = tmp_path / "bra"
    for d in ("Images", "Masks"):
        (root / d).mkdir(parents=True)
    Image.fromarray(np.full((20, 24), 90, np.uint8)).save(root / "Images" / "bus_0001-l.png")
    m = np.zeros((20, 24), np.uint8)
    m[4:10, 5:12] = 255
    Image.fromarray(m).save(root / "Masks" / "mask_0001-l.png")
    code, out, err = _run(["predict", root, "--out", tmp_path / "o", "--checkpoint",
                           tiny_checkpoint, "--no-progress"], capsys)
    assert code == 0, err
    assert (tmp_path / "o" / "Images" / "bus_0001-l_mask.png").is_file()
    assert re.search(r"^Images/bus_0001-l\.png: Dice [0-9.]+", out, re.M)  # ground truth found


def test_readme_demo_command_can_be_rerun(tmp_path, tiny_checkpoint, capsys, monkeypatch):
    """README command 1 writes busseg-demo/ into the clone: git ignores it, a re-run works."""
    readme = (REPO / "README.md").read_text()
    m = re.search(r"busseg predict (--samples[^\n&;|]*)", readme)
    assert m, "README command 1 no longer runs busseg predict --samples"
    args = m.group(1).split()
    out_name = args[args.index("--out") + 1]
    ignored = [ln.strip().strip("/") for ln in (REPO / ".gitignore").read_text().splitlines()]
    assert out_name.strip("/") in ignored, f"{out_name} is not in .gitignore"
    monkeypatch.chdir(tmp_path)
    for _ in range(2):
        code, out, err = _run(["predict", *args, "--checkpoint", tiny_checkpoint,
                               "--no-progress"], capsys)
        assert code == 0, err


def _export_module():
    import importlib.util

    sys.path.insert(0, str(REPO / "training"))
    spec = importlib.util.spec_from_file_location("busseg_export_paths",
                                                  REPO / "training/export_default.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_ABS = re.compile(r"""(?:^|[\s='"(\[])(/(?:work|home|tmp|Users|root|mnt|opt|data)/[^\s'"]*)""")


def test_shipped_model_card_and_info_name_no_training_machine_path(capsys):
    from busseg.models import default_checkpoint_path

    folder = default_checkpoint_path()
    for name in ("config.json", "model_card.json", "MODEL_CARD.md"):
        assert not _ABS.findall((folder / name).read_text()), name
    code, out, _ = _run(["info"], capsys)
    assert code == 0
    lines = [ln for ln in out.splitlines() if not ln.startswith("default model checkpoint:")]
    assert not [ln for ln in lines if _ABS.search(ln)], lines


def test_export_writes_portable_paths():
    export = _export_module()
    cfg = {"training": {"data_root": "/work/shared/data/busi/Dataset_BUSI_with_GT",
                        "command": f"train.py --out {export.ROOT}/runs/x --data /srv/busi",
                        "data": "BUSI (Al-Dhabyani et al., 2020)"},
           "lineage": {"base_model": str(export.ROOT / "runs" / "v2_main" / "best"),
                       "pairs": ["benign/benign (1).png"]},
           "n": 3}
    out = export.portable(cfg)
    assert out["training"]["data_root"] == "busi/Dataset_BUSI_with_GT"
    assert out["training"]["command"] == "train.py --out runs/x --data srv/busi"
    assert out["training"]["data"] == cfg["training"]["data"]
    assert out["lineage"] == {"base_model": "runs/v2_main/best",
                              "pairs": ["benign/benign (1).png"]}
    assert out["n"] == 3


def test_info_shortens_absolute_lineage_paths_of_another_machine(tiny_checkpoint, tmp_path,
                                                                  capsys):
    import json
    import shutil

    ck = tmp_path / "ck"
    shutil.copytree(tiny_checkpoint, ck)
    cfg = json.loads((ck / "config.json").read_text())
    cfg["lineage"] = {"base_model": "/nowhere/machine/runs/v9/best", "pairs": []}
    (ck / "config.json").write_text(json.dumps(cfg))
    code, out, _ = _run(["info", "--checkpoint", ck], capsys)
    assert code == 0 and "initialised from …/v9/best" in out
