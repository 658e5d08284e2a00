"""FinetuneSettings: a recipe resolved once, with overrides, and carried whole to finetune_iter."""

from __future__ import annotations

import csv
import dataclasses
import json

import numpy as np
import pytest

from busseg.engine import TrainConfig, drain
from busseg.finetune import (
    DEFAULT_RECIPE,
    FINETUNE_DEFAULTS,
    FINETUNE_RECIPES,
    MAX_REPLAY,
    REPLAY_DIR,
    SETTINGS_KEYS,
    SITE_RECIPE,
    FinetuneSettings,
    finetune,
    finetune_config,
    finetune_iter,
    recipe_settings,
)


def _old_finetune_config(recipe, **overrides):
    """``finetune_config`` as it was before FinetuneSettings (the reference)."""
    keys = set(TrainConfig.__dataclass_fields__)
    base = {k: v for k, v in recipe_settings(recipe).items() if k in keys}
    if "epochs" in overrides and "max_steps" not in overrides:
        base["max_steps"] = None
    base.update({k: v for k, v in overrides.items() if k in keys})
    if base.get("max_steps"):
        base.setdefault("eval_every_steps", max(1, int(base["max_steps"]) // 10))
    return TrainConfig(**base)


@pytest.mark.parametrize("recipe", [None, *FINETUNE_RECIPES])
@pytest.mark.parametrize("overrides", [{}, {"max_steps": 7, "lr": 1e-3}, {"epochs": 3}])
def test_resolve_equals_the_recipe_and_finetune_config(recipe, overrides):
    s = FinetuneSettings.resolve(recipe, **overrides)
    old = recipe_settings(recipe)
    assert s.recipe == recipe
    assert s.train.to_dict() == _old_finetune_config(recipe, **overrides).to_dict()
    assert s.train.to_dict() == finetune_config(recipe, **overrides).to_dict()
    assert (s.val_fraction, s.augment, s.replay) == (old["val_fraction"], old["augment"],
                                                     old["replay"])
    flat = s.to_dict()
    assert flat == {"recipe": recipe, **s.train.to_dict(), "val_fraction": s.val_fraction,
                    "augment": s.augment, "replay": s.replay}
    json.dumps(flat)  # JSON-safe
    # the flat dict is what the benchmarks logged before: the recipe with the TrainConfig
    assert {k: v for k, v in flat.items() if k != "recipe"} == {
        **old, **_old_finetune_config(recipe, **overrides).to_dict()}


def test_defaults_and_extra_overrides():
    s = FinetuneSettings.resolve()
    assert s.recipe is None  # recorded as DEFAULT_RECIPE in a checkpoint's lineage
    assert dataclasses.replace(s, recipe=DEFAULT_RECIPE) == FinetuneSettings.resolve(DEFAULT_RECIPE)
    assert s.train == finetune_config(DEFAULT_RECIPE)
    assert s.replay == FINETUNE_DEFAULTS["replay"] and s.augment is FINETUNE_DEFAULTS["augment"]
    t = FinetuneSettings.resolve(SITE_RECIPE, val_fraction=0.5, augment=False, replay=3)
    assert (t.recipe, t.val_fraction, t.augment, t.replay) == (SITE_RECIPE, 0.5, False, 3)
    assert t.train == finetune_config(SITE_RECIPE)
    assert set(SETTINGS_KEYS) == set(TrainConfig.__dataclass_fields__) | {
        "val_fraction", "augment", "replay"}
    with pytest.raises(dataclasses.FrozenInstanceError):
        t.replay = 4


def test_unknown_keys_raise_and_name_the_known_ones():
    with pytest.raises(TypeError, match=r"unknown fine-tune setting\(s\) 'not_a_field'.*"
                                        r"max_steps.*val_fraction, augment, replay"):
        FinetuneSettings.resolve(not_a_field=1)
    with pytest.raises(TypeError, match="'nope'"):
        FinetuneSettings.resolve().replace(nope=2)
    with pytest.raises(TypeError, match="'recipe'"):  # the recipe is not an override
        FinetuneSettings.resolve().replace(recipe="site")
    with pytest.raises(TypeError, match="'bogus'"):
        FinetuneSettings.from_parts(cfg={"bogus": 1})
    with pytest.raises(ValueError, match="unknown fine-tune recipe 'nope'; choose one of"):
        FinetuneSettings.resolve("nope")
    # finetune_config keeps ignoring keys that are not TrainConfig fields (as before)
    assert finetune_config(not_a_field=1).max_steps == 100


def test_values_are_checked():
    with pytest.raises(ValueError, match=r"val_fraction must be in \[0, 1\), got 1.0"):
        FinetuneSettings.resolve(val_fraction=1.0)
    with pytest.raises(ValueError, match="val_fraction"):
        FinetuneSettings.resolve().replace(val_fraction=-0.1)
    with pytest.raises(ValueError, match=f"replay must be .* between 0 and {MAX_REPLAY}"):
        FinetuneSettings.resolve(replay=MAX_REPLAY + 1)
    with pytest.raises(ValueError, match="replay"):
        FinetuneSettings.resolve(replay=-1)
    with pytest.raises(ValueError, match="replay"):
        FinetuneSettings.resolve(replay=2.5)
    with pytest.raises(ValueError, match="lr must be positive"):  # TrainConfig's own checks
        FinetuneSettings.resolve(lr=0.0)
    with pytest.raises(TypeError, match="TrainConfig"):
        FinetuneSettings(None, {"lr": 1e-3}, 0.2, True, 0)
    with pytest.raises(ValueError, match="unknown fine-tune recipe"):
        FinetuneSettings("nope", TrainConfig(), 0.2, True, 0)
    assert FinetuneSettings.resolve(val_fraction=0.0, replay=MAX_REPLAY).replay == MAX_REPLAY


def test_max_replay_is_the_shipped_replay_set():
    with open(REPLAY_DIR / "manifest.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) == MAX_REPLAY
    assert max(r["replay"] for r in FINETUNE_RECIPES.values()) <= MAX_REPLAY


def test_epochs_without_max_steps_train_by_epochs():
    s = FinetuneSettings.resolve("lr1e-4", epochs=3)
    assert s.train.max_steps is None and s.train.epochs == 3
    assert s.train.eval_every_steps is None  # validated at the end of every epoch
    both = FinetuneSettings.resolve(epochs=3, max_steps=20)
    assert both.train.max_steps == 20 and both.train.eval_every_steps == 2
    assert FinetuneSettings.resolve(max_steps=7).train.eval_every_steps == 1
    assert FinetuneSettings.resolve(max_steps=50, eval_every_steps=3).train.eval_every_steps == 3


def test_replace_re_derives_what_resolve_derives():
    s = FinetuneSettings.resolve("replay")
    assert (s.train.max_steps, s.train.eval_every_steps) == (100, 10)
    r = s.replace(max_steps=40, lr=1e-4, val_fraction=0.3, augment=False)
    assert (r.train.max_steps, r.train.eval_every_steps, r.train.lr) == (40, 4, 1e-4)
    assert (r.recipe, r.val_fraction, r.augment, r.replay) == ("replay", 0.3, False, 30)
    assert r == FinetuneSettings.resolve("replay", max_steps=40, lr=1e-4, val_fraction=0.3,
                                         augment=False)
    assert s.replace(max_steps=40, eval_every_steps=7).train.eval_every_steps == 7  # given
    assert s.replace(lr=1e-4).train.eval_every_steps == 10  # untouched without max_steps
    by_epochs = s.replace(epochs=5)
    assert by_epochs == FinetuneSettings.resolve("replay", epochs=5)
    assert by_epochs.train.max_steps is None and by_epochs.train.eval_every_steps is None
    assert by_epochs.replace(max_steps=30).train.eval_every_steps == 3
    # the original is unchanged and shares no dict with the copy
    assert (s.train.max_steps, s.train.lr, s.val_fraction) == (100, 3e-4, 0.2)
    r.train.prompts["max_rounds"] = 99
    assert s.train.prompts["max_rounds"] == 0
    assert FINETUNE_RECIPES["replay"]["prompts"]["max_rounds"] == 0


def test_from_parts_folds_the_older_keywords():
    cfg = finetune_config("lr3e-5", max_steps=3, batch_size=2)
    s = FinetuneSettings.from_parts("replay", cfg=cfg, val_fraction=0.4)
    assert s.train is cfg  # a TrainConfig is used whole
    assert (s.recipe, s.val_fraction, s.augment, s.replay) == ("replay", 0.4, True, 30)
    d = FinetuneSettings.from_parts(SITE_RECIPE, cfg={"max_steps": 2, "batch_size": 2},
                                    replay=1)
    assert d == FinetuneSettings.resolve(SITE_RECIPE, max_steps=2, batch_size=2, replay=1)
    assert FinetuneSettings.from_parts() == FinetuneSettings.resolve()
    with pytest.raises(TypeError, match="cfg must be a TrainConfig or a dict"):
        FinetuneSettings.from_parts(cfg=3)


def test_session_resolves_its_options_once():
    from busseg.session import AnnotationSession

    resolve = AnnotationSession._finetune_settings
    opts = {"cfg": {"max_steps": 2, "batch_size": 2}, "device": "cpu", "val_indices": [1]}
    s = resolve(opts, "vote")
    assert s == FinetuneSettings.resolve(SITE_RECIPE, max_steps=2, batch_size=2)
    assert opts == {"device": "cpu", "val_indices": [1]}  # the rest goes to finetune_iter
    whole = resolve({"cfg": {"max_steps": 2}, "val_fraction": 0.5, "replay": 0}, "whole")
    assert whole == FinetuneSettings.resolve(None, max_steps=2, val_fraction=0.5, replay=0)
    assert resolve({"recipe": "lr1e-4"}, "vote").recipe == "lr1e-4"
    cfg = finetune_config(max_steps=3)
    assert resolve({"cfg": cfg}, "adapted").train is cfg
    given = FinetuneSettings.resolve("l2sp", max_steps=4)
    assert resolve({"settings": given}, "vote") is given
    with pytest.raises(TypeError, match="either 'settings' or 'cfg'"):
        resolve({"settings": given, "cfg": {"max_steps": 2}}, "vote")


# --------------------------------------------------------------------------- finetune_iter


@pytest.fixture
def pairs64(synthetic_pairs):
    images, masks = synthetic_pairs(5, size=(64, 64), seed=5)
    return images, masks, [f"case {i}" for i in range(5)]


def _weights(path):
    from safetensors.numpy import load_file

    return load_file(str(path / "model.safetensors"))


def test_finetune_iter_with_settings_runs_as_with_the_old_keywords(pairs64, tiny_checkpoint,
                                                                    tmp_path):
    images, masks, names = pairs64
    old = finetune(images, masks, tiny_checkpoint, recipe="replay", replay=2, val_fraction=0.4,
                   cfg=finetune_config("replay", max_steps=2, batch_size=2),
                   out_dir=tmp_path / "old", names=names, device="cpu")
    settings = FinetuneSettings.resolve("replay", max_steps=2, batch_size=2, replay=2,
                                        val_fraction=0.4)
    new = finetune(images, masks, tiny_checkpoint, settings=settings,
                   out_dir=tmp_path / "new", names=names, device="cpu")
    for res in (old, new):
        assert res.fit.steps == 2 and res.checkpoint is not None
    assert (new.n_train, new.n_val) == (old.n_train, old.n_val) == (3, 2)
    for key in ("train_indices", "val_indices", "n_replay"):
        assert new.extra[key] == old.extra[key]
    assert new.extra["n_replay"] == 2
    assert new.dice_before == pytest.approx(old.dice_before)
    assert new.dice_after == pytest.approx(old.dice_after)
    configs = [json.loads((r.checkpoint / "config.json").read_text()) for r in (old, new)]
    untimed = [{k: v for k, v in c["training"].items() if not k.endswith("_time_s")}
               for c in configs]  # the wall time differs from run to run
    assert untimed[0] == untimed[1]
    assert configs[0]["lineage"] == configs[1]["lineage"]  # same base, pairs and replay
    assert configs[1]["training"]["recipe"] == "replay"
    assert configs[1]["training"]["hyperparameters"] == configs[0]["training"]["hyperparameters"]
    wa, wb = _weights(old.checkpoint), _weights(new.checkpoint)
    assert wa.keys() == wb.keys()
    assert all(np.allclose(wa[k], wb[k]) for k in wa)


def test_the_default_recipe_is_recorded_without_a_name(pairs64, tiny_checkpoint, tmp_path):
    images, masks, names = pairs64
    res = finetune(images[:2], masks[:2], tiny_checkpoint, names=names[:2], device="cpu",
                   settings=FinetuneSettings.resolve(max_steps=1, batch_size=2, replay=0),
                   out_dir=tmp_path / "d")
    training = json.loads((res.checkpoint / "config.json").read_text())["training"]
    assert training["recipe"] == DEFAULT_RECIPE and training["n_replay"] == 0


@pytest.mark.parametrize("legacy", [{"cfg": TrainConfig(max_steps=1)}, {"recipe": "site"},
                                    {"val_fraction": 0.5}, {"augment": False}, {"replay": 0}])
def test_settings_with_an_old_keyword_is_a_type_error(pairs64, tiny_checkpoint, tmp_path,
                                                      legacy):
    images, masks, _ = pairs64
    gen = finetune_iter(images, masks, tiny_checkpoint, settings=FinetuneSettings.resolve(),
                        out_dir=tmp_path / "x", device="cpu", **legacy)
    with pytest.raises(TypeError, match=f"either settings or {next(iter(legacy))}, not both"):
        next(gen)
    assert not (tmp_path / "x").exists()
    with pytest.raises(TypeError, match="settings must be a FinetuneSettings"):
        next(finetune_iter(images, masks, tiny_checkpoint, settings={"max_steps": 1}))


def test_finetune_job_takes_settings_whole(tiny_checkpoint, synthetic_pairs, tmp_path):
    from busseg._widgets.finetune import finetune_job

    images, masks = synthetic_pairs(2, size=(64, 64))
    settings = FinetuneSettings.resolve("v2-default", max_steps=2, batch_size=2)
    res = drain(finetune_job(images, masks, ["a", "b"], base=tiny_checkpoint,
                             settings=settings, out_dir=tmp_path / "o", device="cpu"))
    assert res.fit.steps == 2 and res.extra["n_replay"] == 0
    training = json.loads((res.checkpoint / "config.json").read_text())["training"]
    assert training["recipe"] == "v2-default"
    with pytest.raises(TypeError, match="either settings or overrides, recipe, not both"):
        next(finetune_job(images, masks, ["a", "b"], settings=settings,
                          overrides={"max_steps": 1}, recipe="site"))
