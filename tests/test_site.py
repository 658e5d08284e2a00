"""Site checkpoints (busseg.site), leave-later-out hold-outs and the learning schedule."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from busseg.finetune import later_split
from busseg.site import (
    BASE_DIRNAME,
    SiteModel,
    drawing_base,
    is_site_checkpoint,
    make_site_checkpoint,
    site_settings,
)

# --------------------------------------------------------------------------- leave-later-out


def test_later_split_holds_out_the_latest_answers():
    tr, va = later_split([True] * 20)
    assert va == [16, 17, 18, 19]  # 20 %, the most recent
    assert tr == list(range(16))
    tr, va = later_split([True] * 3)
    assert va == [1, 2] and tr == [0]  # at least 2 held out, one trained on
    tr, va = later_split([True] * 200)
    assert len(va) == 12 and va[-1] == 199  # at most 12


def test_later_split_adds_the_latest_lesion_when_the_window_has_none():
    has = [True, False, True, False, False, False, False, False, False, False]
    tr, va = later_split(has)
    assert va == [2, 8, 9]  # the latest window is normal scans only: the latest lesion joins
    assert 2 not in tr and tr == [0, 1, 3, 4, 5, 6, 7]


def test_later_split_rejects_bad_input():
    with pytest.raises(ValueError, match="at least 2"):
        later_split([True])
    with pytest.raises(ValueError, match="fraction"):
        later_split([True] * 5, 1.5)


def test_learning_waits_longer_as_answers_grow(tmp_path):
    from busseg.session import LEARN_MAX_EVERY, AnnotationSession

    s = AnnotationSession([], tmp_path / "corr", records=[], learn=True, learn_every=10)
    starts, answers = [], 0
    for _ in range(12):
        answers += s.learn_interval()
        starts.append(answers)
        s._answers_at_finetune = answers  # what finetune_job records when it starts
    assert starts[:6] == [10, 20, 30, 45, 67, 100]
    assert all(b - a <= LEARN_MAX_EVERY for a, b in zip(starts, starts[1:], strict=False))


# --------------------------------------------------------------------------- the site model


class _Const(nn.Module):
    """A fake network: fixed logits (1, 1, h, w) for every image, class logits too."""

    def __init__(self, logits: np.ndarray, class_logits=(0.0, 0.0, 0.0)):
        super().__init__()
        self.register_buffer("logits", torch.as_tensor(logits, dtype=torch.float32)[None, None])
        self.register_buffer("cls", torch.tensor(class_logits, dtype=torch.float32)[None])
        self.in_channels = 5
        self.num_classes = 3
        self.calls = 0

    def forward(self, x, with_class=False):
        self.calls += 1
        out = self.logits.expand(x.shape[0], -1, -1, -1).clone()
        return (out, self.cls.expand(x.shape[0], -1)) if with_class else out


def _two_regions() -> tuple[np.ndarray, np.ndarray]:
    """Base logits with two regions (left, right); adapted logits with the left one only."""
    base = np.full((16, 16), -5.0)
    base[2:6, 2:6] = 5.0
    base[10:14, 10:14] = 5.0
    adapted = np.full((16, 16), -5.0)
    adapted[3:5, 3:5] = 5.0
    return base, adapted


def test_the_vote_keeps_only_the_base_regions_the_adapted_network_sees():
    b, a = _two_regions()
    model = SiteModel(_Const(a), _Const(b), automatic="vote", prompts="base")
    x = torch.zeros(2, 5, 16, 16)
    out = model(x)
    prob = torch.sigmoid(out)[0, 0].numpy() >= 0.5
    assert prob[2:6, 2:6].all()  # drawn by the base network, whole
    assert not prob[10:14, 10:14].any()  # the adapted network does not see it: removed
    assert torch.equal(out[0], out[1])


def test_the_adapted_gate_empties_the_vote():
    b, a = _two_regions()
    adapted = _Const(a, class_logits=(10.0, 0.0, 0.0))  # P(normal) ~ 1
    model = SiteModel(adapted, _Const(b), automatic="vote", prompts="base",
                      adapted_gate={"p_normal": 0.9, "lesion_confidence": 1.01})
    prob = torch.sigmoid(model(torch.zeros(1, 5, 16, 16)))[0, 0].numpy()
    assert (prob < 0.5).all()


def test_prompted_images_go_to_the_prompt_network_automatic_ones_to_the_vote():
    b, a = _two_regions()
    base, adapted = _Const(b), _Const(a)
    model = SiteModel(adapted, base, automatic="adapted", prompts="base")
    x = torch.zeros(3, 5, 16, 16)
    x[1, 1] = 1.0  # a box on image 1
    logits, cls = model(x, with_class=True)
    assert torch.equal(logits[0, 0], adapted.logits[0, 0])  # automatic: adapted draws
    assert torch.equal(logits[1, 0], base.logits[0, 0])  # prompted: the base answers
    assert torch.equal(logits[2, 0], adapted.logits[0, 0])
    assert cls.shape == (3, 3)
    model = SiteModel(adapted, base, automatic="adapted", prompts="adapted")
    assert torch.equal(model(x)[1, 0], adapted.logits[0, 0])


def test_site_settings_validate_the_modes():
    assert site_settings({}) is None
    assert site_settings({"site": {"automatic": "vote", "prompts": "base"}})["automatic"] == "vote"
    with pytest.raises(ValueError, match="automatic"):
        site_settings({"site": {"automatic": "always", "prompts": "base"}})
    with pytest.raises(ValueError, match="prompts"):
        site_settings({"site": {"automatic": "vote", "prompts": "nobody"}})


# --------------------------------------------------------------------------- site checkpoints


def _adapted_copy(base: Path, dest: Path, seed: int = 1) -> Path:
    """A checkpoint with the base's architecture and other (seeded) weights."""
    from busseg.models import load_checkpoint, save_checkpoint

    model, config = load_checkpoint(base)
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    keep = {k: v for k, v in config.items() if k not in ("format", "format_version",
                                                           "busseg_version")}
    return save_checkpoint(dest, model, keep)


def test_a_site_checkpoint_is_one_folder_that_load_model_loads(tmp_path, tiny_prompt_checkpoint):
    from busseg.inference import load_model, predict
    from busseg.models import load_checkpoint

    adapted = _adapted_copy(tiny_prompt_checkpoint, tmp_path / "ft" / "best")
    assert not is_site_checkpoint(adapted)
    make_site_checkpoint(adapted, tiny_prompt_checkpoint, automatic="adapted", prompts="base",
                         info={"prompt_costs": {"base": 2.0, "adapted": 3.0}})
    assert is_site_checkpoint(adapted)
    assert (adapted / BASE_DIRNAME / "model.safetensors").is_file()
    assert drawing_base(adapted) == adapted / BASE_DIRNAME
    assert drawing_base(tiny_prompt_checkpoint) == tiny_prompt_checkpoint
    model = load_model(adapted)
    assert model.automatic == "adapted" and model.prompts == "base"
    plain_adapted, _ = load_checkpoint(adapted)  # the adapted network alone
    image = (np.random.default_rng(0).random((48, 40)) * 255).astype(np.uint8)
    auto = predict(image, model, normal_gate=None, region_filter=None).proba
    np.testing.assert_allclose(auto, predict(image, plain_adapted, normal_gate=None,
                                             region_filter=None).proba, atol=1e-5)
    box = np.array([[10, 8, 30, 30]])
    prompted = predict(image, model, boxes=box).proba
    np.testing.assert_allclose(prompted, predict(image, tiny_prompt_checkpoint,
                                                 boxes=box).proba, atol=1e-5)
    with pytest.raises(ValueError, match="already"):
        make_site_checkpoint(adapted, tiny_prompt_checkpoint)


def test_a_site_checkpoint_without_its_base_says_what_to_do(tmp_path, tiny_prompt_checkpoint):
    import shutil

    from busseg.inference import load_model
    from busseg.models import CheckpointError

    adapted = _adapted_copy(tiny_prompt_checkpoint, tmp_path / "ck")
    make_site_checkpoint(adapted, tiny_prompt_checkpoint)
    shutil.rmtree(adapted / BASE_DIRNAME)
    with pytest.raises(CheckpointError, match="base network .* is missing; copy the whole"):
        load_model(adapted)
    cfg = json.loads((adapted / "config.json").read_text())
    cfg["site"]["automatic"] = "sometimes"
    (adapted / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="automatic"):
        load_model(adapted)


# --------------------------------------------------------------------------- the session


def _answered_session(tmp_path, synthetic_pairs, ck, n=8, **kwargs):
    from conftest import answered_session

    images, masks = synthetic_pairs(n, size=(48, 48))
    return answered_session(tmp_path, images, masks, empty_every=3, checkpoint=ck, learn=True,
                            learn_every=n, **kwargs)


def test_learning_as_you_go_writes_a_site_checkpoint_from_the_starting_network(
        tmp_path, synthetic_pairs, tiny_prompt_checkpoint):
    s = _answered_session(tmp_path, synthetic_pairs, tiny_prompt_checkpoint,
                          finetune_options={"cfg": {"max_steps": 2, "batch_size": 2},
                                            "device": "cpu"})
    assert s.finetune_due()
    out = s.run_due_finetune()
    cfg = json.loads((out.checkpoint / "config.json").read_text())
    assert cfg["site"]["automatic"] == "vote"
    assert cfg["site"]["prompts"] in ("base", "adapted")
    assert set(cfg["site"]["prompt_costs"]) == {"base", "adapted"}
    assert Path(cfg["lineage"]["base_model"]) == tiny_prompt_checkpoint.resolve()
    # leave-later-out: the held-out answers are the latest recorded ones
    n = len(s.recorded_pairs()[0])
    assert cfg["lineage"]["heldout_pairs"][-1] == s.recorded_pairs()[2][n - 1]
    if out.adopted:  # the next fine-tune starts from the starting network again
        s.checkpoint = out.checkpoint
        assert drawing_base(s.checkpoint) == out.checkpoint / BASE_DIRNAME


def test_an_unknown_site_mode_is_refused(tmp_path, synthetic_pairs, tiny_prompt_checkpoint):
    s = _answered_session(tmp_path, synthetic_pairs, tiny_prompt_checkpoint, n=4,
                          finetune_options={"site": "everything"})
    with pytest.raises(ValueError, match="site"):
        s.run_due_finetune()
    assert not s.finetune_running


_KILLED_FINETUNE = textwrap.dedent("""
    import sys, numpy as np, torch
    torch.set_num_threads(1)
    from busseg.finetune import finetune, finetune_config
    from busseg.site import make_site_checkpoint
    rng = np.random.default_rng(0)
    images = [(rng.random((48, 48)) * 255).astype(np.uint8) for _ in range(6)]
    masks = [np.zeros((48, 48), bool) for _ in range(6)]
    for m in masks[::2]:
        m[10:30, 12:28] = True
    base, out = sys.argv[1], sys.argv[2]
    res = finetune(images, masks, base, cfg=finetune_config("site", max_steps=400,
                   batch_size=2, eval_every_steps=1), out_dir=out, device="cpu")
    make_site_checkpoint(res.checkpoint, base)
""")


def test_a_killed_finetune_leaves_the_current_checkpoint_and_answers_readable(
        tmp_path, tiny_prompt_checkpoint):
    """SIGKILL a fine-tune while it writes checkpoints: nothing readable is lost."""
    from busseg.inference import clear_model_cache, load_model
    from busseg.models import load_checkpoint

    script = tmp_path / "ft.py"
    script.write_text(_KILLED_FINETUNE)
    before = {p.name: p.read_bytes() for p in tiny_prompt_checkpoint.iterdir() if p.is_file()}
    rng = np.random.default_rng(1)
    for k in range(3):
        out = tmp_path / f"run{k}"
        proc = subprocess.Popen([sys.executable, str(script), str(tiny_prompt_checkpoint),
                                 str(out)], env={**os.environ, "OMP_NUM_THREADS": "1"})
        # wait until it writes (a checkpoint folder appears), then kill at a random moment
        t_end = time.monotonic() + 120
        while time.monotonic() < t_end and not (out / "best").exists() and proc.poll() is None:
            time.sleep(0.05)
        time.sleep(float(rng.uniform(0.0, 1.0)))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        # the starting checkpoint is untouched and loads
        assert {p.name: p.read_bytes() for p in tiny_prompt_checkpoint.iterdir()
                if p.is_file()} == before
        clear_model_cache()
        load_model(tiny_prompt_checkpoint)
        # whatever was written whole loads; a half-written folder is never at out/best
        best = out / "best"
        if best.exists():
            load_checkpoint(best)


def test_prompts_stay_with_the_base_without_a_clear_saving_on_enough_answers():
    from busseg.finetune import MIN_PROMPT_EVIDENCE, PROMPT_MARGIN, prompts_from_adapted

    masks = [np.ones((4, 4), bool)] * (MIN_PROMPT_EVIDENCE + 2)
    val = list(range(len(masks)))
    cheaper = {"base": 3.0, "adapted": 3.0 - PROMPT_MARGIN}
    assert prompts_from_adapted(cheaper, masks, val)
    assert not prompts_from_adapted({"base": 3.0, "adapted": 2.9}, masks, val)
    assert not prompts_from_adapted(cheaper, masks, val[:MIN_PROMPT_EVIDENCE - 1])
    assert not prompts_from_adapted({"base": 3.0, "adapted": float("nan")}, masks, val)
