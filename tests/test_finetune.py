import hashlib
import json
import os
import threading

import numpy as np
import pytest
import torch

from busseg.finetune import (
    FINETUNE_DEFAULTS,
    FinetuneResult,
    default_output_dir,
    finetune,
    finetune_config,
    finetune_iter,
    split_pairs,
)
from busseg.models import load_checkpoint


def _digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.fixture
def pairs(synthetic_pairs):
    images, masks = synthetic_pairs(5, size=(40, 36), seed=3)
    images[1] = np.repeat(images[1][..., None], 3, axis=-1)  # an RGB image among grey ones
    return images, masks, [f"case {i}" for i in range(5)]


def test_finetune_writes_a_new_checkpoint_with_lineage(pairs, tiny_checkpoint, tmp_path):
    images, masks, names = pairs
    base_digest = _digest(tiny_checkpoint)
    base_model, base_cfg = load_checkpoint(tiny_checkpoint)
    out = tmp_path / "ft"
    events = []
    cfg = finetune_config(max_steps=6, batch_size=2, lr=1e-2)
    result = finetune(
        images,
        masks,
        tiny_checkpoint,
        cfg=cfg,
        out_dir=out,
        names=names,
        device="cpu",
        callback=events.append,
    )
    assert isinstance(result, FinetuneResult)
    assert result.checkpoint == out / "best"
    assert result.n_train == 4 and result.n_val == 1
    assert result.fit.steps == 6
    assert events[0].kind == "start" and "held-out Dice before" in events[0].message
    assert events[-1].kind == "end"

    model, config = load_checkpoint(result.checkpoint)
    changed = [
        k
        for k, v in model.state_dict().items()
        if v.is_floating_point() and not torch.equal(v, base_model.state_dict()[k])
    ]
    assert changed, "fine-tuning did not change the weights"
    assert config["model"] == base_cfg["model"]
    assert config["preprocessing"]["input_size"] == [32, 32]  # taken from the base checkpoint
    lineage = config["lineage"]
    assert lineage["base_model"] == str(tiny_checkpoint.resolve())
    assert sorted(lineage["pairs"] + lineage["heldout_pairs"]) == names
    assert len(lineage["pairs"]) == 4 and len(lineage["heldout_pairs"]) == 1
    assert config["training"]["kind"] == "fine-tune"
    assert config["training"]["hyperparameters"]["max_steps"] == 6
    metrics = config["metrics"]
    assert metrics["heldout_dice_before"] == pytest.approx(result.dice_before)
    assert metrics["heldout_dice_after"] == pytest.approx(result.dice_after)
    assert 0.0 <= result.dice_before <= 1.0 and 0.0 <= result.dice_after <= 1.0
    assert _digest(tiny_checkpoint) == base_digest  # the base checkpoint is untouched


def test_finetune_refuses_an_existing_out_dir(pairs, tiny_checkpoint, tmp_path):
    images, masks, _ = pairs
    out = tmp_path / "exists"
    out.mkdir()
    with pytest.raises(FileExistsError, match="exists"):
        finetune(
            images,
            masks,
            tiny_checkpoint,
            cfg=finetune_config(max_steps=1),
            out_dir=out,
            device="cpu",
        )
    assert list(out.iterdir()) == []


def test_finetune_refuses_the_base_checkpoint_as_out_dir(pairs, tiny_checkpoint):
    images, masks, _ = pairs
    before = _digest(tiny_checkpoint)
    with pytest.raises(FileExistsError):
        finetune(
            images,
            masks,
            tiny_checkpoint,
            cfg=finetune_config(max_steps=1),
            out_dir=tiny_checkpoint,
            device="cpu",
        )
    assert _digest(tiny_checkpoint) == before


def test_finetune_validates_pairs(pairs, tiny_checkpoint, tmp_path):
    images, masks, _ = pairs
    with pytest.raises(ValueError, match="5 images but 4 masks"):
        finetune(images, masks[:4], tiny_checkpoint, out_dir=tmp_path / "a", device="cpu")
    with pytest.raises(ValueError, match="at least one"):
        finetune([], [], tiny_checkpoint, out_dir=tmp_path / "b", device="cpu")
    bad = [m[:-2] for m in masks]
    with pytest.raises(ValueError, match="size"):
        finetune(images, bad, tiny_checkpoint, out_dir=tmp_path / "c", device="cpu")
    assert not any((tmp_path / n).exists() for n in "abc")


def test_finetune_single_pair_and_stop(pairs, tiny_checkpoint, tmp_path):
    images, masks, _ = pairs
    stop = threading.Event()

    def stop_at_2(ev):
        if ev.kind == "step" and ev.step == 2:
            stop.set()

    result = finetune(
        images[:1],
        masks[:1],
        tiny_checkpoint,
        out_dir=tmp_path / "one",
        cfg=finetune_config(max_steps=50, batch_size=1),
        device="cpu",
        stop=stop,
        callback=stop_at_2,
    )
    assert result.n_train == 1 and result.n_val == 0
    assert result.dice_before is None and result.dice_after is None
    assert result.fit.stopped and result.fit.steps == 2
    assert result.checkpoint is not None and (result.checkpoint / "config.json").is_file()
    model, config = load_checkpoint(result.checkpoint)
    assert config["lineage"]["pairs"] == ["pair 0"] and config["lineage"]["heldout_pairs"] == []
    base, _ = load_checkpoint(tiny_checkpoint)
    assert any(not torch.equal(v, base.state_dict()[k]) for k, v in model.state_dict().items()
               if v.is_floating_point()), "the two steps done before the stop were lost"


def test_finetune_stopped_before_its_first_validation_keeps_the_steps(
    pairs, tiny_checkpoint, tmp_path
):
    images, masks, _ = pairs  # 5 pairs: 4 trained on, 1 held out
    stop = threading.Event()

    def stop_at_2(ev):
        if ev.kind == "step" and ev.step == 2:
            stop.set()

    result = finetune(
        images, masks, tiny_checkpoint, out_dir=tmp_path / "held",
        cfg=finetune_config(max_steps=50, batch_size=2), device="cpu", stop=stop,
        callback=stop_at_2,
    )
    assert result.n_val == 1 and result.fit.stopped and result.fit.steps == 2
    assert [h["step"] for h in result.fit.history] == [2]  # validated on stop, not at step 5
    model, _ = load_checkpoint(result.checkpoint)
    base, _ = load_checkpoint(tiny_checkpoint)
    assert any(not torch.equal(v, base.state_dict()[k]) for k, v in model.state_dict().items()
               if v.is_floating_point()), "a 'fine-tuned' checkpoint identical to its base"


def test_finetune_stopped_before_any_step_writes_no_checkpoint(pairs, tiny_checkpoint, tmp_path):
    images, masks, _ = pairs
    stop = threading.Event()
    stop.set()
    result = finetune(images, masks, tiny_checkpoint, out_dir=tmp_path / "none",
                      cfg=finetune_config(max_steps=5), device="cpu", stop=stop)
    assert result.fit.steps == 0 and result.checkpoint is None
    assert not (tmp_path / "none").exists()  # no empty run folder left behind


def test_finetune_iter_is_a_generator_that_does_nothing_until_iterated(
    pairs, tiny_checkpoint, tmp_path
):
    images, masks, _ = pairs
    gen = finetune_iter(
        images,
        masks,
        tiny_checkpoint,
        out_dir=tmp_path / "g",
        device="cpu",
        cfg=finetune_config(max_steps=2, batch_size=2),
    )
    assert not (tmp_path / "g").exists()
    first = next(gen)
    assert first.kind == "start" and first.total_steps == 2
    gen.close()


def test_finetune_config():
    cfg = finetune_config()
    assert cfg.max_steps == FINETUNE_DEFAULTS["max_steps"] == 100
    assert cfg.eval_every_steps == 10 and cfg.early_stopping is None
    assert cfg.lr == FINETUNE_DEFAULTS["lr"]
    assert finetune_config(max_steps=7).eval_every_steps == 1
    by_epochs = finetune_config(epochs=3)
    assert by_epochs.max_steps is None and by_epochs.epochs == 3
    assert finetune_config(not_a_field=1).max_steps == 100  # widget-only keys are ignored


@pytest.mark.parametrize(
    ("n", "fraction", "n_val"), [(1, 0.2, 0), (2, 0.2, 1), (10, 0.2, 2), (10, 0.0, 0), (3, 0.9, 2)]
)
def test_split_pairs(n, fraction, n_val):
    train, val = split_pairs(n, fraction, seed=1)
    assert len(val) == n_val and len(train) == n - n_val
    assert sorted(train + val) == list(range(n))
    assert (train, val) == split_pairs(n, fraction, seed=1)


def test_split_pairs_errors():
    with pytest.raises(ValueError, match="at least one"):
        split_pairs(0)
    with pytest.raises(ValueError, match="val_fraction"):
        split_pairs(4, 1.0)


def test_default_output_dir_is_new_and_under_busseg_home(tmp_path):
    home = os.environ["BUSSEG_HOME"]  # set to a temporary folder by conftest
    out = default_output_dir()
    assert str(out).startswith(home) and not out.exists()
    first = default_output_dir(tmp_path)
    first.mkdir()
    second = default_output_dir(tmp_path)
    assert second != first and second.name.startswith(first.name)


def test_lineage_chains(pairs, tiny_checkpoint, tmp_path):
    images, masks, names = pairs
    cfg = finetune_config(max_steps=1, batch_size=2)
    one = finetune(
        images, masks, tiny_checkpoint, cfg=cfg, out_dir=tmp_path / "1", names=names, device="cpu"
    )
    two = finetune(images, masks, one.checkpoint, cfg=cfg, out_dir=tmp_path / "2", device="cpu")
    config = json.loads((two.checkpoint / "config.json").read_text())
    assert config["lineage"]["base_model"] == str(one.checkpoint.resolve())
    assert config["lineage"]["base_lineage"]["base_model"] == str(tiny_checkpoint.resolve())
