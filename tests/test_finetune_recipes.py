"""Fine-tune recipes, the shipped replay set and L2-SP."""

from __future__ import annotations

import csv
import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from busseg.finetune import (
    DEFAULT_RECIPE,
    FINETUNE_DEFAULTS,
    FINETUNE_RECIPES,
    REPLAY_DIR,
    finetune,
    finetune_config,
    recipe_settings,
    replay_pairs,
)

REPO = Path(__file__).resolve().parents[1]


def _make_replay_module():
    spec = importlib.util.spec_from_file_location(
        "make_replay_set", REPO / "training" / "make_replay_set.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["make_replay_set"] = mod
    spec.loader.exec_module(mod)
    return mod


# --------------------------------------------------------------------------- recipes


def test_the_default_is_a_named_recipe_and_every_recipe_builds():
    assert DEFAULT_RECIPE in FINETUNE_RECIPES
    assert FINETUNE_DEFAULTS == FINETUNE_RECIPES[DEFAULT_RECIPE]
    for name in FINETUNE_RECIPES:
        s = recipe_settings(name)
        cfg = finetune_config(name)
        assert cfg.lr == s["lr"] and cfg.prompts == s["prompts"]
        assert cfg.l2sp_alpha == s["l2sp_alpha"] and cfg.weight_decay == s["weight_decay"]
        assert 0 <= s["replay"] <= 30
    # v2 stays what model v2 shipped with, whatever the default becomes
    v2 = FINETUNE_RECIPES["v2-default"]
    assert (v2["lr"], v2["replay"], v2["l2sp_alpha"]) == (3e-4, 0, 0.0)
    assert v2["prompts"] == {"max_rounds": 0, "from_auto": 0.0}
    assert FINETUNE_RECIPES["replay+rounds4"]["prompts"]["max_rounds"] == 4
    assert FINETUNE_RECIPES["l2sp"]["weight_decay"] == 0.0  # towards the base, not zero


def test_recipe_settings_copies_and_names_errors():
    s = recipe_settings("replay")
    s["prompts"]["max_rounds"] = 99
    s["lr"] = 1.0
    assert FINETUNE_RECIPES["replay"]["lr"] != 1.0
    assert FINETUNE_RECIPES["replay"]["prompts"]["max_rounds"] != 99
    assert recipe_settings() == FINETUNE_DEFAULTS
    with pytest.raises(ValueError, match="unknown fine-tune recipe 'nope'; choose one of"):
        finetune_config("nope")
    assert finetune_config("lr1e-4", max_steps=3).max_steps == 3  # overrides win


# --------------------------------------------------------------------------- replay set


def test_replay_pairs_balanced_and_valid():
    images, masks, names = replay_pairs()
    assert len(images) == len(masks) == len(names) == 30 and len(set(names)) == 30
    for im, m in zip(images, masks, strict=True):
        assert im.dtype == np.uint8 and im.ndim == 2 and max(im.shape) == 224
        assert m.dtype == bool and m.shape == im.shape and m.any()
    ten = replay_pairs(10)[2]
    assert sum("benign/" in n for n in ten) == sum("malignant/" in n for n in ten) == 5
    assert ten == names[:10]  # any n is the first n of one order
    assert replay_pairs(0) == ([], [], [])
    with pytest.raises(ValueError, match="between 0 and 30"):
        replay_pairs(31)


def test_replay_set_is_small_cited_and_from_the_train_split(repo_root):
    total = sum(p.stat().st_size for p in REPLAY_DIR.rglob("*") if p.is_file())
    assert total < 1_000_000
    readme = (REPLAY_DIR / "README.md").read_text()
    assert "doi:10.1016/j.dib.2019.104863" in readme and "CC BY 4.0" in readme
    with open(repo_root / "training" / "splits" / "busi.csv", newline="") as f:
        split = {r["image"]: r for r in csv.DictReader(f)}
    with open(REPLAY_DIR / "manifest.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 30
    assert all(split[r["source"]]["split"] == "train" for r in rows)  # never val or test
    groups = [split[r["source"]]["group"] for r in rows]
    assert len(set(groups)) == len(groups)  # one per duplicate group
    assert {r["label"] for r in rows} == {"benign", "malignant"}


def test_make_replay_set_is_reproducible(tmp_path, fake_busi):
    mod = _make_replay_module()
    from busseg.data import discover_busi

    split = tmp_path / "split.csv"
    with open(split, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["image", "label", "group", "split"])
        for i, r in enumerate(discover_busi(fake_busi).records):
            w.writerow([r.rel_path, r.label, i, "train" if r.label != "malignant" or i % 2
                        else "test"])
    outs = []
    for name in ("a", "b"):
        out = tmp_path / name
        assert mod.main(["--busi", str(fake_busi), "--split", str(split), "--out", str(out),
                         "--per-class", "1", "--longest", "32"]) == 0
        outs.append(out)
    files = sorted(p.relative_to(outs[0]) for p in outs[0].rglob("*.png"))
    assert len(files) == 4  # 1 benign + 1 malignant, image and mask each
    for rel in files:
        assert (outs[0] / rel).read_bytes() == (outs[1] / rel).read_bytes()
    rows = list(csv.DictReader(open(outs[0] / "manifest.csv", newline="")))
    test_only = {r[0] for r in csv.reader(open(split)) if r[3] == "test"}
    assert not {r["source"] for r in rows} & test_only
    with pytest.raises(ValueError, match="usable benign"):
        mod.choose(discover_busi(fake_busi), list(csv.DictReader(open(split))), 50, 0)


def test_shipped_replay_set_matches_the_script(busi_root, repo_root):
    """The shipped draw is the one ``training/make_replay_set.py`` makes (seed 0)."""
    mod = _make_replay_module()
    from busseg.data import discover_busi
    from busseg.data.splits import read_split_csv

    recs = mod.choose(discover_busi(busi_root),
                      read_split_csv(repo_root / "training" / "splits" / "busi.csv"), 15, 0)
    with open(REPLAY_DIR / "manifest.csv", newline="") as f:
        assert [r["source"] for r in csv.DictReader(f)] == [r.rel_path for r in recs]


def test_finetune_with_replay_never_holds_replay_pairs_out(synthetic_pairs, tiny_checkpoint,
                                                           tmp_path):
    import json

    images, masks = synthetic_pairs(5, size=(40, 36), seed=3)
    names = [f"case {i}" for i in range(5)]
    res = finetune(images, masks, tiny_checkpoint, recipe="replay", replay=4,
                   cfg=finetune_config("replay", max_steps=2, batch_size=2),
                   out_dir=tmp_path / "ft", names=names, device="cpu")
    assert res.n_train == 4 and res.n_val == 1 and res.extra["n_replay"] == 4
    assert sorted(res.extra["train_indices"] + res.extra["val_indices"]) == list(range(5))
    lineage = json.loads((res.checkpoint / "config.json").read_text())["lineage"]
    assert len(lineage["replay_pairs"]) == 4
    assert all(n.startswith("replay:") for n in lineage["replay_pairs"])
    assert set(lineage["heldout_pairs"]) <= set(names)
    cfg = json.loads((res.checkpoint / "config.json").read_text())["training"]
    assert cfg["recipe"] == "replay" and cfg["n_replay"] == 4


# --------------------------------------------------------------------------- L2-SP


def test_l2sp_pulls_towards_the_starting_weights(synthetic_pairs):
    from busseg.data.dataset import SegmentationDataset
    from busseg.engine import TrainConfig, fit
    from busseg.models import build_model

    with pytest.raises(ValueError, match="l2sp_alpha"):
        TrainConfig(l2sp_alpha=-1.0)
    images, masks = synthetic_pairs(4, size=(32, 32), seed=1)
    moved = {}
    for alpha in (0.0, 50.0):
        torch.manual_seed(0)
        model = build_model({"base_channels": 4, "depth": 2})
        w0 = [p.detach().clone() for p in model.parameters()]
        data = SegmentationDataset(images, masks, (32, 32))
        cfg = TrainConfig(max_steps=8, batch_size=2, lr=1e-2, weight_decay=0.0, warmup_steps=0,
                          early_stopping=None, l2sp_alpha=alpha, channels_last=False)
        fit(model, data, None, cfg, device="cpu")
        moved[alpha] = float(sum(((p.detach() - q) ** 2).sum()
                                 for p, q in zip(model.parameters(), w0, strict=True)))
    assert moved[0.0] > 0 and moved[50.0] < 0.5 * moved[0.0]
