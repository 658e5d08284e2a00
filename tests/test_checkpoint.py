import inspect
import json
import os
import re
from pathlib import Path

import pytest
import torch

import busseg
from busseg.models import (
    CheckpointError,
    build_model,
    default_checkpoint_path,
    load_checkpoint,
    read_checkpoint_config,
    save_checkpoint,
)
from busseg.models import checkpoint as ckpt_module

SMALL = {"encoder": "plain", "depth": 2, "base_channels": 4}


def _trained_model(config=SMALL, seed=0):
    torch.manual_seed(seed)
    model = build_model(config)
    # one optimiser step so batch-norm statistics and weights differ from init
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(2, 1, 16, 16)
    loss = model(x).pow(2).mean()
    loss.backward()
    opt.step()
    return model.eval()


@pytest.fixture
def saved(tmp_path):
    model = _trained_model()
    config = {
        "model": dict(SMALL),
        "training": {"epochs": 1, "data": Path("/data/busi"), "lr": 1e-3},
        "metrics": {"val_dice": 0.5, "hd95": float("nan")},
    }
    path = save_checkpoint(tmp_path / "ckpt", model, config)
    return path, model, config


def test_layout_and_config(saved):
    path, _, config = saved
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "model.safetensors"]
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["format"] == "busseg-checkpoint"
    assert cfg["format_version"] == 1
    assert cfg["busseg_version"] == busseg.__version__
    assert cfg["model"] == build_model(SMALL).busseg_model_config
    assert cfg["training"]["data"] == "/data/busi"
    assert cfg["preprocessing"]["input_size"] == [256, 256]
    assert cfg["inference"]["threshold"] == 0.5
    assert cfg["lineage"] == {"base_model": None, "pairs": []}
    # the caller's dict is not modified
    assert "format" not in config and isinstance(config["training"]["data"], Path)
    # no leftovers from the atomic write
    assert [p.name for p in path.parent.iterdir()] == ["ckpt"]


def test_round_trip_identical_outputs(saved):
    path, model, _ = saved
    loaded, cfg = load_checkpoint(path)
    assert not loaded.training
    assert loaded.busseg_config is cfg
    assert cfg["metrics"]["val_dice"] == 0.5
    x = torch.randn(1, 1, 16, 16)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k


@pytest.mark.parametrize("which", [None, "model.safetensors", "config.json"])
def test_load_accepts_dir_or_file(saved, which):
    path = saved[0]
    target = path if which is None else path / which
    model, cfg = load_checkpoint(str(target), device="cpu")
    assert cfg["model"]["depth"] == 2
    assert read_checkpoint_config(target)["format"] == "busseg-checkpoint"


def test_resnet_round_trip(tmp_path):
    config = {"encoder": "resnet34", "depth": 2, "base_channels": 4, "upsample": "bilinear"}
    model = _trained_model(config)
    path = save_checkpoint(tmp_path / "r", model, {})  # model config taken from the model
    loaded, cfg = load_checkpoint(path)
    assert cfg["model"]["encoder"] == "resnet34"
    x = torch.randn(1, 1, 16, 16)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))


def test_wrapped_model_saved_unwrapped(tmp_path):
    model = _trained_model()
    path = save_checkpoint(tmp_path / "dp", torch.nn.DataParallel(model), {})
    loaded, _ = load_checkpoint(path)
    assert set(loaded.state_dict()) == set(model.state_dict())


def test_no_overwrite(saved):
    path, model, config = saved
    before = (path / "model.safetensors").read_bytes()
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_checkpoint(path, _trained_model(seed=1), config)
    assert (path / "model.safetensors").read_bytes() == before


def test_overwrite_true_replaces(saved):
    path, _, config = saved
    other = _trained_model(seed=1)
    save_checkpoint(path, other, {**config, "metrics": {"val_dice": 0.9}}, overwrite=True)
    loaded, cfg = load_checkpoint(path)
    assert cfg["metrics"] == {"val_dice": 0.9}
    x = torch.randn(1, 1, 16, 16)
    with torch.no_grad():
        assert torch.equal(other(x), loaded(x))
    assert sorted(p.name for p in path.parent.iterdir()) == ["ckpt"]


def test_overwrite_refuses_unrelated_directory(tmp_path):
    precious = tmp_path / "photos"
    precious.mkdir()
    (precious / "holiday.jpg").write_bytes(b"x")
    with pytest.raises(FileExistsError, match="not a busseg checkpoint"):
        save_checkpoint(precious, _trained_model(), {}, overwrite=True)
    assert (precious / "holiday.jpg").exists()


def test_failed_save_leaves_nothing(tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt_module, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path / "c", _trained_model(), {})
    assert list(tmp_path.iterdir()) == []


def test_failed_overwrite_keeps_old(saved, monkeypatch):
    path, _, config = saved
    real_rename = os.rename

    def flaky(src, dst):
        if ".tmp-" in str(src):
            raise OSError("rename failed")
        return real_rename(src, dst)

    monkeypatch.setattr(ckpt_module.os, "rename", flaky)
    with pytest.raises(OSError, match="rename failed"):
        save_checkpoint(path, _trained_model(seed=1), config, overwrite=True)
    monkeypatch.undo()
    assert sorted(p.name for p in path.parent.iterdir()) == ["ckpt"]
    load_checkpoint(path)


def test_save_rejects_mismatched_config(tmp_path):
    model = _trained_model()
    with pytest.raises(ValueError, match="does not match"):
        save_checkpoint(tmp_path / "c", model, {"model": {**SMALL, "depth": 3}})
    with pytest.raises(ValueError, match="not JSON serialisable"):
        save_checkpoint(tmp_path / "d", model, {"training": {"x": object()}})
    assert list(tmp_path.iterdir()) == []


def test_truncated_weights(saved):
    path = saved[0]
    f = path / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(path)
    f.write_bytes(b"")
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(path)


@pytest.mark.parametrize(
    ("text", "match"),
    [('{"format": "busseg-checkpoint", ', "not valid JSON"), ("[1, 2]", "JSON object")],
    ids=["corrupt", "not_an_object"],
)
def test_bad_json(saved, text, match):
    path = saved[0]
    (path / "config.json").write_text(text)
    with pytest.raises(CheckpointError, match=match):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match=match):
        read_checkpoint_config(path)


def _edit_config(path, **changes):
    cfg = json.loads((path / "config.json").read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k)
        else:
            cfg[k] = v
    (path / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"format": "smp"}, "not a busseg checkpoint.*'smp'"),
        ({"format_version": 2}, "format_version 2.*Upgrade"),
        ({"format_version": "1"}, "invalid 'format_version'"),
        ({"model": None}, "missing required key.*'model'"),
        ({"model": "unet"}, "'model' must be a JSON object"),
    ],
)
def test_bad_config_fields(saved, changes, match):
    path = saved[0]
    _edit_config(path, **changes)
    with pytest.raises(CheckpointError, match=match):
        load_checkpoint(path)


def test_invalid_model_section(saved):
    path = saved[0]
    _edit_config(path, model={**SMALL, "encoder": "vit"})
    with pytest.raises(CheckpointError, match="invalid 'model' section.*'plain', 'resnet34'"):
        load_checkpoint(path)


def test_shape_mismatch_names_keys(saved):
    path = saved[0]
    _edit_config(path, model={**SMALL, "base_channels": 8})
    with pytest.raises(CheckpointError, match=r"shape mismatches: .*encoders\.0\.0\.weight"):
        load_checkpoint(path)


def test_wrong_arch_names_keys(saved):
    path = saved[0]
    _edit_config(path, model={**SMALL, "encoder": "resnet34"})
    with pytest.raises(
        CheckpointError, match=r"missing keys: full_res.*unexpected keys: .*encoders"
    ):
        load_checkpoint(path)
    _edit_config(path, model={**SMALL, "depth": 3})
    with pytest.raises(CheckpointError, match=r"missing keys: .*encoders\.2"):
        load_checkpoint(path)


@pytest.mark.parametrize("name", ["model.safetensors", "config.json"])
def test_missing_file(saved, name):
    path = saved[0]
    (path / name).unlink()
    with pytest.raises(CheckpointError, match=f"incomplete: missing {name}"):
        load_checkpoint(path)


def test_missing_directory(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope")
    other = tmp_path / "weights.pt"
    other.write_bytes(b"x")
    with pytest.raises(CheckpointError, match="not a busseg checkpoint"):
        load_checkpoint(other)


def test_default_checkpoint_path(monkeypatch, tmp_path):
    expected = Path(busseg.__file__).parent / "weights" / "default"
    assert default_checkpoint_path() == expected
    monkeypatch.setattr(ckpt_module, "default_checkpoint_path", lambda: tmp_path / "default")
    with pytest.raises(CheckpointError, match="default busseg model is missing.*training/train"):
        load_checkpoint(None)
    with pytest.raises(CheckpointError, match="default busseg model is missing"):
        load_checkpoint(tmp_path / "default")


def test_bad_device(saved):
    with pytest.raises(ValueError, match="Unknown device"):
        load_checkpoint(saved[0], device="gpu")


def test_never_unpickles(saved, monkeypatch):
    src = inspect.getsource(ckpt_module)
    assert re.search(r"(?<!safetensors\.)torch\.load\b(?!_file)", src) is None
    assert "import pickle" not in src and "pickle.load" not in src
    assert "from safetensors.torch import load_file" in src

    def forbidden(*args, **kwargs):
        raise AssertionError("torch.load / pickle used")

    monkeypatch.setattr(torch, "load", forbidden)
    monkeypatch.setattr("pickle.load", forbidden)
    monkeypatch.setattr("pickle.loads", forbidden)
    load_checkpoint(saved[0])
