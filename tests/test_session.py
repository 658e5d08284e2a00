"""The Qt-free annotation session core (busseg.session)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from busseg.data.io import read_mask
from busseg.session import AnnotationSession, FinetuneOutcome, case_names, mask_fingerprint


def _folder(root: Path, n: int = 5, size=(24, 32), seed: int = 0) -> Path:
    """A plain folder of n unlabeled grey scans."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, size, dtype=np.uint8)).save(root / f"scan{i}.png")
    return root


def _mask(shape, k: int) -> np.ndarray:
    m = np.zeros(shape, np.uint8)
    m[2 + k: 8 + k, 3: 10 + k] = 1
    return m


def test_the_core_imports_no_qt():
    code = ("import sys, busseg.session; "
            "bad = [m for m in ('qtpy', 'PyQt5', 'PyQt6', 'PySide2', 'PySide6', 'napari', "
            "'magicgui', 'torch') if m in sys.modules]; print(bad); assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_autosave_on_move_unedited_not_saved_and_resume(tmp_path):
    scans = _folder(tmp_path / "scans")
    corr = tmp_path / "corr"
    s = AnnotationSession(scans, corr)
    assert len(s) == 5 and s.progress_text() == "0 of 5 corrected"
    assert s.first_uncorrected() == 0

    case = s.open(0)
    shape = case.image.shape
    s.set_prediction(np.zeros(shape, bool))
    edited = _mask(shape, 0)
    s.set_mask(edited)
    assert s.is_edited()
    s.next()  # autosave
    assert s.last_save is not None and s.last_save.label == "unknown"
    np.testing.assert_array_equal(read_mask(corr / "unknown" / "scan0_mask.png"), edited > 0)

    s.set_prediction(_mask(shape, 1))  # accepted as predicted: no correction
    s.set_mask(_mask(shape, 1) * 255)  # same lesion pixels in another dtype/scale
    assert not s.is_edited()
    s.next()
    assert s.last_save is None
    assert not (corr / "unknown" / "scan1_mask.png").exists()

    s.set_mask(_mask(shape, 2))  # no prediction: a painted lesion is an edit
    s.next()
    assert s.progress() == (2, 5)
    s.set_mask(np.zeros(shape, np.uint8))  # an empty layer, no prediction: nothing to save
    s.close()
    assert s.progress() == (2, 5) and s.current is None

    # reopening later: status from the folder, resume at the first uncorrected case
    again = AnnotationSession(scans, corr)
    assert again.progress_text() == "2 of 5 corrected"
    assert [again.is_corrected(i) for i in range(5)] == [True, False, True, False, False]
    assert again.first_uncorrected() == 1
    assert again.first_uncorrected(2) == 3
    case = again.resume()
    assert case.index == 1 and case.correction is None
    opened = again.open(0)  # a stored correction is loaded and is the baseline
    np.testing.assert_array_equal(opened.correction, edited > 0)
    again.set_mask(opened.correction)
    assert not again.is_edited() and again.save() is None


def test_saving_again_keeps_the_earlier_version(tmp_path):
    scans = _folder(tmp_path / "scans", n=2)
    corr = tmp_path / "corr"
    s = AnnotationSession(scans, corr)
    shape = s.open(0).image.shape
    first, second, third = (_mask(shape, k) for k in range(3))
    s.set_mask(first)
    r1 = s.save()
    assert r1.version is None
    s.set_mask(second)
    r2 = s.save()
    assert r2.version == corr / "versions" / "unknown" / "scan0_mask.v1.png"
    s.set_mask(third)
    s.goto(1)
    assert s.last_save.version == corr / "versions" / "unknown" / "scan0_mask.v2.png"
    versions = s.versions(0)
    assert [p.name for p in versions] == ["scan0_mask.v1.png", "scan0_mask.v2.png"]
    np.testing.assert_array_equal(read_mask(versions[0]), first > 0)
    np.testing.assert_array_equal(read_mask(versions[1]), second > 0)
    np.testing.assert_array_equal(read_mask(corr / "unknown" / "scan0_mask.png"), third > 0)
    # the versions are invisible to fine-tuning: the folder reads as 1 corrected case
    assert [r.rel_path for r in s.store.records()] == ["unknown/scan0.png"]
    # an explicit Save of an unedited mask is allowed (force) and versions the old one too
    s.open(0)
    s.set_mask(third)
    assert s.save() is None
    assert s.save(force=True).version.name == "scan0_mask.v3.png"


def test_no_lesion_is_a_normal_scan_correction(tmp_path):
    scans = _folder(tmp_path / "scans", n=3)
    corr = tmp_path / "corr"
    s = AnnotationSession(scans, corr)
    shape = s.open(0).image.shape
    s.set_prediction(_mask(shape, 0))  # a false region
    res = s.mark_no_lesion()
    assert res.no_lesion and res.label == "normal"
    stored = read_mask(corr / "normal" / "scan0_mask.png")
    assert stored.shape == shape and not stored.any()
    assert s.correction_label(0) == "normal" and s.progress() == (1, 3)
    assert s.next() is not None and s.last_save is None  # already saved: nothing more

    # an empty prediction marked "no lesion" is still recorded (an explicit decision)
    s.set_prediction(np.zeros(shape, bool))
    s.mark_no_lesion(save=False)
    s.next()
    assert s.last_save is not None and (corr / "normal" / "scan1_mask.png").is_file()

    # painting a lesion later moves the case out of normal/ and keeps the empty version
    s.open(0)
    s.set_mask(_mask(shape, 3))
    s.save()
    assert s.correction_label(0) == "unknown"
    assert not (corr / "normal" / "scan0_mask.png").exists()
    assert not (corr / "normal" / "scan0.png").exists()
    assert [p.relative_to(corr).as_posix() for p in s.versions(0)] == [
        "versions/normal/scan0_mask.v1.png"]
    images, masks, names = s.store.load_pairs()  # empty masks count for fine-tuning
    assert sorted(names) == ["normal/scan1.png", "unknown/scan0.png"]
    assert not masks[names.index("normal/scan1.png")].any()


def test_several_roots_same_names_and_overlap(tmp_path):
    a = _folder(tmp_path / "a", n=2)
    b = _folder(tmp_path / "b", n=2, seed=1)
    s = AnnotationSession([a, b], tmp_path / "corr")
    assert len(s) == 4
    assert len(set(s.names)) == 4  # scan0 of a and of b do not share a correction
    with pytest.raises(ValueError, match="overlaps"):
        AnnotationSession([a], a / "corrections")
    # folders inside a plain folder disambiguate by their path
    from busseg.data.busi import BusiRecord

    recs = [BusiRecord("x", "unknown", Path("p/x.png"), (), "p/x.png"),
            BusiRecord("x", "unknown", Path("q/x.png"), (), "q/x.png"),
            BusiRecord("y", "unknown", Path("y.png"), (), "y.png")]
    assert case_names(recs) == ["p_x", "q_x", "y"]


def test_busi_labels_and_ground_truth(fake_busi, tmp_path):
    s = AnnotationSession(fake_busi, tmp_path / "corr")
    assert s.layouts == ["busi"] and len(s) == 6
    case = s.open(0)
    assert case.record.label == "benign" and case.ground_truth is not None
    s.set_mask(case.ground_truth)
    s.next()
    assert (tmp_path / "corr" / "benign" / "benign (1)_mask.png").is_file()


def test_fingerprint_ignores_dtype_and_scale():
    m = np.zeros((5, 6), bool)
    m[1:3, 2:4] = True
    assert mask_fingerprint(m) == mask_fingerprint(m.astype(np.uint8) * 255)
    assert mask_fingerprint(m) != mask_fingerprint(m.T)
    assert mask_fingerprint(m) != mask_fingerprint(~m)


# --------------------------------------------------------------------------- learning as you go


def _corrected_session(tmp_path, synthetic_pairs, n, **kwargs):
    images, masks = synthetic_pairs(n, size=(32, 32))
    scans = tmp_path / "scans"
    scans.mkdir()
    for i, im in enumerate(images):
        Image.fromarray(im).save(scans / f"s{i:02d}.png")
    s = AnnotationSession(scans, tmp_path / "corr", models_dir=tmp_path / "models", **kwargs)
    s.open(0)
    for i in range(n):
        s.set_prediction(np.zeros_like(masks[i]))
        s.set_mask(masks[i] if i % 4 else np.zeros_like(masks[i]), edited=True)
        if i + 1 < n:
            s.next()
    s.save()
    return s


def _fake_finetune(before, after, lesion_before=0.5, lesion_after=0.5):
    from busseg.finetune import FinetuneResult

    def fake(images, masks, base=None, *, out_dir=None, **kwargs):
        yield "progress"
        ck = Path(out_dir) / "best"
        ck.mkdir(parents=True)
        heldout = {"before": {"mean_dice": before, "dice_lesion": lesion_before},
                   "after": {"mean_dice": after, "dice_lesion": lesion_after}}
        return FinetuneResult(ck, None, before, after, len(images) - 1, 1,
                              extra={"heldout": heldout})

    return fake


@pytest.mark.parametrize(("before", "after", "adopted"),
                         [(0.5, 0.6, True), (0.5, 0.5, True), (0.6, 0.5, False)])
def test_schedule_adopts_only_when_not_worse(tmp_path, synthetic_pairs, monkeypatch,
                                             before, after, adopted):
    import busseg.finetune

    s = _corrected_session(tmp_path, synthetic_pairs, 3, learn_every=3)
    assert s.new_corrections == 3
    assert not s.finetune_due()  # learning as you go is off by default
    s.learn = True
    assert s.finetune_due()
    monkeypatch.setattr(busseg.finetune, "finetune_iter", _fake_finetune(before, after))
    events = []
    out = s.run_due_finetune(events.append)
    assert events == ["progress"]
    assert isinstance(out, FinetuneOutcome) and out.adopted is adopted
    assert s.new_corrections == 0 and not s.finetune_due() and not s.finetune_running
    assert (s.checkpoint == out.checkpoint) is adopted
    assert ("adopted" in s.status and "not" not in s.status) is adopted
    assert s.history == [out]


@pytest.mark.parametrize(("lesion_before", "lesion_after", "says"),
                         [(0.7, 0.4, "held-out lesion Dice 0.400 < 0.700"),
                          (None, None, "no held-out correction has a lesion")])
def test_schedule_rejects_a_model_that_only_got_quieter(tmp_path, synthetic_pairs, monkeypatch,
                                                        lesion_before, lesion_after, says):
    """Held-out Dice 0 -> 1 on normal scans alone must not adopt a model that lost lesions."""
    import busseg.finetune

    s = _corrected_session(tmp_path, synthetic_pairs, 3, learn=True, learn_every=3)
    monkeypatch.setattr(busseg.finetune, "finetune_iter",
                        _fake_finetune(0.0, 1.0, lesion_before, lesion_after))
    out = s.run_due_finetune()
    assert not out.adopted and s.checkpoint is None
    assert says in s.status


def test_heldout_split_keeps_a_lesion_pair():
    from busseg.finetune import split_pairs

    strata = [False] * 8 + [True] * 2  # a normal-heavy site: 8 normal scans, 2 lesions
    for seed in range(20):
        tr, va = split_pairs(10, 0.2, seed, strata=strata)
        assert len(va) == 2 and any(strata[i] for i in va) and sorted(tr + va) == list(range(10))
    tr, va = split_pairs(10, 0.2, 0, strata=[False] * 10)
    assert len(va) == 2
    with pytest.raises(ValueError, match="strata"):
        split_pairs(4, 0.5, 0, strata=[True])


def test_one_finetune_at_a_time(tmp_path, synthetic_pairs, monkeypatch):
    import busseg.finetune

    s = _corrected_session(tmp_path, synthetic_pairs, 3, learn=True, learn_every=2)
    monkeypatch.setattr(busseg.finetune, "finetune_iter", _fake_finetune(0.1, 0.2))
    job = s.finetune_job()
    next(job)  # running now
    assert s.finetune_running and not s.finetune_due()
    with pytest.raises(RuntimeError, match="one at a time"):
        next(s.finetune_job())
    from busseg.engine import drain

    assert drain(job).adopted and not s.finetune_running


def test_schedule_with_a_tiny_model(tmp_path, synthetic_pairs, tiny_checkpoint):
    s = _corrected_session(
        tmp_path, synthetic_pairs, 6, checkpoint=tiny_checkpoint, learn=True, learn_every=5,
        finetune_options={"cfg": {"max_steps": 4, "batch_size": 2, "augment": False},
                          "device": "cpu", "augment": False},
    )
    assert s.finetune_due()
    out = s.run_due_finetune()
    assert out.n_train + out.n_val == 6 and out.n_val >= 1  # the empty masks count too
    assert out.checkpoint is not None and (out.checkpoint / "config.json").is_file()
    from busseg.finetune import lesions_kept  # noqa: F401 - the rule the session applies

    heldout = json.loads((out.checkpoint / "config.json").read_text())["metrics"]["heldout"]
    assert heldout["before"]["dice_lesion"] is not None  # a lesion pair was held out
    kept = heldout["after"]["dice_lesion"] >= heldout["before"]["dice_lesion"]
    assert out.adopted is (out.dice_after >= out.dice_before and kept)
    assert s.checkpoint == (out.checkpoint if out.adopted else tiny_checkpoint)
    assert out.message == s.status and "held-out Dice" in s.status
