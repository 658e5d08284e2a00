"""Learning as you go adopts a fine-tune on the simulated annotation cost.

``AnnotationSession.finetune_job`` fine-tunes on the stored corrections, then annotates the
held-out corrections with the simulated annotator (:func:`busseg.finetune.heldout_costs`, one
implementation in :mod:`busseg.annotator`) with the current and the new checkpoint; it adopts
the new one when its interactions per scan are not higher, whatever the Dice says.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import answered_session

from busseg.session import AnnotationSession, FinetuneOutcome


def _session(tmp_path, synthetic_pairs, n, **kwargs) -> AnnotationSession:
    """A session over ``n`` synthetic scans, all corrected (scan 0 as a normal scan)."""
    images, masks = synthetic_pairs(n, size=(32, 32))
    # these tests check the adoption rule on the fine-tuned network itself ("whole"); the
    # site checkpoints of the default mode are tested in tests/test_site.py
    opts = kwargs.setdefault("finetune_options", {})
    opts.setdefault("site", "whole")
    return answered_session(tmp_path, images, masks, empty_every=4, **kwargs)


def _fake_finetune(dice_before, dice_after, val=None):
    """A finetune_iter stand-in: writes an empty ``best`` folder, holds out ``val``
    (default: the split the real one draws)."""
    from busseg.finetune import FinetuneResult, split_pairs

    def fake(images, masks, base=None, *, out_dir=None, **kwargs):
        yield "progress"
        ck = Path(out_dir) / "best"
        ck.mkdir(parents=True)
        strata = [bool(np.asarray(m).any()) for m in masks]
        tr, va = split_pairs(len(images), 0.2, 0, strata=strata)
        va = va if val is None else list(val)
        tr = sorted(set(range(len(images))) - set(va))
        return FinetuneResult(ck, None, dice_before, dice_after, len(tr), len(va),
                              extra={"heldout": {}, "train_indices": tr, "val_indices": va})

    return fake


def _fake_costs(before, after, calls):
    def fake(images, masks, val_indices, model_before, model_after, *, seed=0, **kwargs):
        calls.append({"val": list(val_indices), "before": model_before, "after": model_after,
                      "seed": seed, "n": len(images)})
        n = len(val_indices)
        return {"n": n, "n_lesion": n,
                "before": {"per_scan": before, "never_converged": 0},
                "after": {"per_scan": after, "never_converged": 0}}

    return fake


@pytest.mark.parametrize(
    ("cost_before", "cost_after", "dice_before", "dice_after", "adopted"),
    [
        (3.0, 2.0, 0.80, 0.60, True),   # cheaper to annotate, lower Dice: adopted
        (2.0, 2.0, 0.70, 0.70, True),   # not higher: adopted
        (2.0, 3.0, 0.50, 0.90, False),  # Dice rose but it costs more: kept
    ],
)
def test_adopts_on_interactions_whatever_the_dice(tmp_path, synthetic_pairs, monkeypatch,
                                                  cost_before, cost_after, dice_before,
                                                  dice_after, adopted):
    import busseg.finetune

    s = _session(tmp_path, synthetic_pairs, 5, learn=True, learn_every=5)
    calls: list[dict] = []
    monkeypatch.setattr(busseg.finetune, "finetune_iter",
                        _fake_finetune(dice_before, dice_after))
    monkeypatch.setattr(busseg.finetune, "heldout_costs",
                        _fake_costs(cost_before, cost_after, calls))
    events: list = []
    out = s.run_due_finetune(events.append)
    assert events == ["progress"]
    assert isinstance(out, FinetuneOutcome) and out.adopted is adopted
    # both checkpoints annotated once, on the held-out pairs, with the same jitter seed
    assert len(calls) == 1
    assert calls[0]["before"] is None and calls[0]["after"] == out.checkpoint
    assert calls[0]["n"] == 5 and len(calls[0]["val"]) == out.n_val >= 1
    assert out.interactions_before == cost_before and out.interactions_after == cost_after
    assert out.dice_before == dice_before and out.dice_after == dice_after
    assert (s.checkpoint == out.checkpoint) is adopted
    numbers = (f"{cost_before:.2f} -> {cost_after:.2f} interactions per held-out scan, "
               f"held-out Dice {dice_before:.3f} -> {dice_after:.3f}")
    assert numbers in s.status and s.status == out.message
    assert s.status.startswith("New checkpoint adopted" if adopted
                               else "Fine-tune not adopted: it would cost more")
    assert s.history == [out] and not s.finetune_running


def test_not_adopted_without_a_heldout_lesion(tmp_path, synthetic_pairs, monkeypatch):
    """Normal scans alone would make a model that predicts nothing look free."""
    import busseg.finetune

    s = _session(tmp_path, synthetic_pairs, 5, learn=True, learn_every=5)
    calls: list[dict] = []
    monkeypatch.setattr(busseg.finetune, "finetune_iter", _fake_finetune(0.0, 1.0, val=[0]))
    monkeypatch.setattr(busseg.finetune, "heldout_costs", _fake_costs(5.0, 0.0, calls))
    out = s.run_due_finetune()
    assert not out.adopted and s.checkpoint is None and calls == []
    assert out.interactions_before is None and out.interactions_after is None
    assert "no held-out correction has a lesion" in s.status


def test_not_adopted_without_heldout_pairs(tmp_path, synthetic_pairs, monkeypatch):
    import busseg.finetune

    s = _session(tmp_path, synthetic_pairs, 3, learn=True, learn_every=3)
    monkeypatch.setattr(busseg.finetune, "finetune_iter", _fake_finetune(None, None, val=[]))
    monkeypatch.setattr(busseg.finetune, "heldout_costs", _fake_costs(1.0, 0.0, []))
    out = s.run_due_finetune()
    assert not out.adopted and "no held-out pairs" in s.status


def test_one_finetune_at_a_time(tmp_path, synthetic_pairs, monkeypatch):
    import busseg.finetune

    s = _session(tmp_path, synthetic_pairs, 3, learn=True, learn_every=2)
    monkeypatch.setattr(busseg.finetune, "finetune_iter", _fake_finetune(0.1, 0.2))
    monkeypatch.setattr(busseg.finetune, "heldout_costs", _fake_costs(1.0, 1.0, []))
    job = s.finetune_job()
    next(job)  # running now
    assert s.finetune_running and not s.finetune_due()
    with pytest.raises(RuntimeError, match="one at a time"):
        next(s.finetune_job())
    from busseg.engine import drain

    assert drain(job).adopted and not s.finetune_running


def test_heldout_costs_same_boxes_for_both_models(synthetic_pairs, tiny_prompt_checkpoint):
    from busseg.finetune import heldout_costs

    images, masks = synthetic_pairs(4, size=(32, 32))
    masks[0] = np.zeros_like(masks[0])  # a normal scan among the held-out pairs
    c = heldout_costs(images, masks, [0, 2, 3], tiny_prompt_checkpoint,
                      tiny_prompt_checkpoint, seed=3)
    assert c["n"] == 3 and c["n_lesion"] == 2
    assert c["before"] == c["after"]  # same model, same jitter: the same cost
    assert len(c["before"]["interactions"]) == 3
    assert all(0 <= x <= 20 for x in c["before"]["interactions"])
    assert c["before"]["per_scan"] == pytest.approx(np.mean(c["before"]["interactions"]))
    with pytest.raises(ValueError, match="no held-out pairs"):
        heldout_costs(images, masks, [], tiny_prompt_checkpoint, tiny_prompt_checkpoint)
    with pytest.raises(ValueError, match="do not fit"):
        heldout_costs(images, masks, [4], tiny_prompt_checkpoint, tiny_prompt_checkpoint)


def test_a_checkpoint_without_prompts_is_not_adopted(tmp_path, synthetic_pairs,
                                                     tiny_checkpoint):
    """Its box-then-clicks cost cannot be simulated, so nothing shows it is not worse."""
    s = _session(tmp_path, synthetic_pairs, 6, checkpoint=tiny_checkpoint, learn=True,
                 learn_every=5, finetune_options={"cfg": {"max_steps": 2, "batch_size": 2},
                                                  "device": "cpu", "augment": False})
    out = s.run_due_finetune()
    assert out.checkpoint is not None and (out.checkpoint / "config.json").is_file()
    assert not out.adopted and s.checkpoint == tiny_checkpoint
    assert "takes no box or click prompts" in s.status


def test_schedule_with_a_tiny_prompt_model(tmp_path, synthetic_pairs, tiny_prompt_checkpoint):
    s = _session(tmp_path, synthetic_pairs, 6, checkpoint=tiny_prompt_checkpoint, learn=True,
                 learn_every=5, finetune_options={"cfg": {"max_steps": 2, "batch_size": 2},
                                                  "device": "cpu", "augment": False})
    out = s.run_due_finetune()
    assert out.n_train + out.n_val == 6 and out.n_val >= 1  # the empty masks count too
    assert out.interactions_before is not None and out.interactions_after is not None
    assert out.costs["n_lesion"] >= 1
    assert out.adopted is (out.interactions_after <= out.interactions_before)
    assert s.checkpoint == (out.checkpoint if out.adopted else tiny_prompt_checkpoint)
    assert "interactions per held-out scan" in s.status and "held-out Dice" in s.status
