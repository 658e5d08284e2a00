"""The Qt-free annotation session core (busseg.session)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import scan_folder
from PIL import Image

from busseg.data.io import read_mask
from busseg.session import AnnotationSession, case_names, mask_fingerprint


def _mask(shape, k: int) -> np.ndarray:
    m = np.zeros(shape, np.uint8)
    m[2 + k: 8 + k, 3: 10 + k] = 1
    return m


def test_the_core_imports_no_qt():
    code = ("import sys, busseg.session; "
            "bad = [m for m in ('qtpy', 'PyQt5', 'PyQt6', 'PySide2', 'PySide6', 'napari', "
            "'magicgui', 'torch') if m in sys.modules]; print(bad); assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_autosave_on_move_unedited_recorded_as_accepted_and_resume(tmp_path):
    scans = scan_folder(tmp_path / "scans")
    corr = tmp_path / "corr"
    s = AnnotationSession(scans, corr)
    assert len(s) == 5 and s.progress_text() == "0 of 5 recorded"
    assert s.first_uncorrected() == 0

    case = s.open(0)
    shape = case.image.shape
    s.set_prediction(np.zeros(shape, bool))
    edited = _mask(shape, 0)
    s.set_mask(edited)
    assert s.is_edited()
    s.next()  # autosave
    assert s.last_save is not None and s.last_save.label == "unknown"
    assert s.last_save.status == "corrected"
    np.testing.assert_array_equal(read_mask(corr / "unknown" / "scan0_mask.png"), edited > 0)

    s.set_prediction(_mask(shape, 1))  # left as predicted: recorded as accepted
    s.set_mask(_mask(shape, 1) * 255)  # same lesion pixels in another dtype/scale
    assert not s.is_edited()
    s.next()
    assert s.last_save is not None and s.last_save.status == "accepted"
    np.testing.assert_array_equal(read_mask(corr / "unknown" / "scan1_mask.png"),
                                  _mask(shape, 1) > 0)

    s.set_mask(_mask(shape, 2))  # no prediction: a painted lesion is an edit
    s.next()
    assert s.progress() == (3, 5)
    s.set_mask(np.zeros(shape, np.uint8))  # an empty layer, no prediction: nothing to save
    s.close()
    assert s.progress() == (3, 5) and s.current is None

    # reopening later: status from the folder, resume at the first unrecorded case
    again = AnnotationSession(scans, corr)
    assert again.progress_text() == "3 of 5 recorded"
    assert [again.is_corrected(i) for i in range(5)] == [True, True, True, False, False]
    assert [again.status_of(i) for i in range(5)] == [
        "corrected", "accepted", "corrected", None, None]
    assert again.first_uncorrected() == 3
    assert again.first_uncorrected(4) == 4
    case = again.resume()
    assert case.index == 3 and case.correction is None
    opened = again.open(0)  # a stored correction is loaded and is the baseline
    np.testing.assert_array_equal(opened.correction, edited > 0)
    again.set_mask(opened.correction)
    assert not again.is_edited() and again.save() is None


def test_saving_again_keeps_the_earlier_version(tmp_path):
    scans = scan_folder(tmp_path / "scans", n=2)
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
    scans = scan_folder(tmp_path / "scans", n=3)
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
    a = scan_folder(tmp_path / "a", n=2)
    b = scan_folder(tmp_path / "b", n=2, seed=1)
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


# The adoption tests of learning as you go (adopted on the simulated annotation
# cost, whatever the Dice says) are in tests/test_session_adoption.py.


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



# --------------------------------------------------------------------------- prefetch


def _second_checkpoint(path, seed=1):
    import torch

    from busseg.models import build_model, save_checkpoint

    torch.manual_seed(seed)
    model = build_model({"base_channels": 4, "depth": 2})
    config = {"preprocessing": {"input_size": [32, 32], "grey": True, "normalize": "zscore"}}
    return save_checkpoint(path, model, config)


@pytest.fixture
def count_forward(monkeypatch):
    """Count the calls of busseg.inference.predict (the session's one model call: through
    predict_mask, or the site calibrator's raw prediction)."""
    import busseg.inference

    calls = []
    real = busseg.inference.predict

    def counting(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(busseg.inference, "predict", counting)
    return calls


def test_prefetched_prediction_is_what_predict_makes(tmp_path, tiny_checkpoint, count_forward):
    scans = scan_folder(tmp_path / "scans", n=4)
    s = AnnotationSession(scans, tmp_path / "corr", checkpoint=tiny_checkpoint)
    assert s.cached_prediction(1) is None and s.prefetched == 0
    pre = s.prefetch(1, threshold=0.5)
    assert len(count_forward) == 1 and s.prefetched == 1
    np.testing.assert_array_equal(s.cached_prediction(1, threshold=0.5), pre)
    assert s.cached_prediction(1) is None  # other settings: not this prediction
    s.open(1)
    got = s.predict(threshold=0.5)  # from the cache: no forward pass
    assert len(count_forward) == 1
    np.testing.assert_array_equal(got, pre)
    assert not s.is_edited()  # the baseline is the prefetched prediction
    cached = s.cached_prediction(1, threshold=0.5)
    assert got.flags.writeable and not cached.flags.writeable  # the caller gets a copy
    got[:] = True
    np.testing.assert_array_equal(s.cached_prediction(1, threshold=0.5), pre)

    # a fresh session without prefetch computes the same mask (same call, same defaults)
    fresh = AnnotationSession(scans, tmp_path / "corr2", checkpoint=tiny_checkpoint)
    fresh.open(1)
    np.testing.assert_array_equal(fresh.predict(threshold=0.5), pre)
    from busseg.inference import load_model, predict_mask

    direct = predict_mask(fresh.current.image, load_model(tiny_checkpoint), threshold=0.5)
    np.testing.assert_array_equal(direct, pre)


def test_prefetch_cache_follows_the_checkpoint_and_settings(tmp_path, tiny_checkpoint,
                                                             count_forward):
    scans = scan_folder(tmp_path / "scans", n=3)
    other = _second_checkpoint(tmp_path / "other")
    s = AnnotationSession(scans, tmp_path / "corr", checkpoint=tiny_checkpoint)
    a = s.prefetch(0)
    s.prefetch(1)
    assert s.prefetched == 2
    s.checkpoint = other  # e.g. a fine-tune adopted: the old masks no longer apply
    assert s.cached_prediction(0) is None
    b = s.prefetch(0)
    assert s.prefetched == 1  # the other checkpoint's masks are dropped
    s.open(0)
    np.testing.assert_array_equal(s.predict(), b)
    assert len(count_forward) == 3
    s.checkpoint = tiny_checkpoint
    s.open(0)
    np.testing.assert_array_equal(s.predict(), a)  # computed again for this checkpoint
    assert len(count_forward) == 4

    # a checkpoint rewritten in place gets a new key
    import os

    key = s.prediction_key(0)
    weights = Path(tiny_checkpoint) / "model.safetensors"
    st = weights.stat()
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    try:
        assert s.prediction_key(0) != key and s.cached_prediction(0) is None
    finally:
        os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert s.prediction_key(1, boxes=np.zeros((1, 4))) is None  # prompts: never cached


def test_cache_lookup_imports_no_torch(tmp_path, tiny_checkpoint):
    """The GUI thread looks up the cache before any model is loaded: no torch import then."""
    scans = scan_folder(tmp_path / "scans", n=2)
    code = f"""
import sys
from busseg.session import AnnotationSession
s = AnnotationSession({str(scans)!r}, checkpoint={str(tiny_checkpoint)!r})
assert s.prediction_key(0) is not None and s.cached_prediction(1) is None
default = AnnotationSession({str(scans)!r})  # the shipped model
assert default.prediction_key(0)[1][0].endswith("default")
assert "torch" not in sys.modules, "torch imported"
"""
    subprocess.run([sys.executable, "-c", code], check=True)
    from busseg.uncertainty import checkpoint_key  # the model cache's key: the same identity

    s = AnnotationSession(scans, checkpoint=tiny_checkpoint)
    assert s.prediction_key(0)[1] == checkpoint_key(tiny_checkpoint)


def test_prefetch_cache_is_bounded(tmp_path, tiny_checkpoint):
    scans = scan_folder(tmp_path / "scans", n=7, size=(64, 80))
    s = AnnotationSession(scans, tmp_path / "corr", checkpoint=tiny_checkpoint)
    s.prefetch_limit = 3
    for i in range(7):
        s.prefetch(i)
        assert s.prefetched == min(i + 1, 3)
    assert [s.cached_prediction(i) is not None for i in range(7)] == [False] * 4 + [True] * 3
    s.clear_predictions()
    assert s.prefetched == 0


def test_cancelled_prefetch_skips_the_model(tmp_path, tiny_checkpoint, count_forward):
    from busseg.engine import drain

    scans = scan_folder(tmp_path / "scans", n=3)
    s = AnnotationSession(scans, tmp_path / "corr", checkpoint=tiny_checkpoint)
    stale = s.prefetch_job(1)
    wanted = s.prefetch_job(2, cancellable=False)
    s.cancel_prefetch()  # the user moved on before the worker got to case 1
    assert drain(stale) is None and s.cached_prediction(1) is None
    assert drain(wanted) is not None and s.cached_prediction(2) is not None
    assert len(count_forward) == 1
    assert drain(s.prefetch_job(1)) is not None  # made after the cancel: runs
    with pytest.raises(IndexError):
        s.prefetch_job(3)


def test_one_forward_pass_at_a_time(tmp_path, tiny_checkpoint, monkeypatch):
    """A prefetch in a worker thread and predict() on the caller's thread never overlap."""
    import threading
    import time

    import busseg.inference

    real = busseg.inference.predict  # the one model call (predict_mask and calibrator)
    active, overlaps, calls = [0], [], []
    guard = threading.Lock()

    def slow(*args, **kwargs):
        with guard:
            active[0] += 1
            overlaps.append(active[0])
        calls.append(threading.get_ident())
        time.sleep(0.2)
        try:
            return real(*args, **kwargs)
        finally:
            with guard:
                active[0] -= 1

    monkeypatch.setattr(busseg.inference, "predict", slow)
    scans = scan_folder(tmp_path / "scans", n=3)
    s = AnnotationSession(scans, tmp_path / "corr", checkpoint=tiny_checkpoint)
    worker = threading.Thread(target=s.prefetch, args=(1,))
    worker.start()
    while not calls:
        time.sleep(0.005)
    s.open(1)
    mask = s.predict()  # waits for the prefetch of the same case, then takes its result
    worker.join()
    assert max(overlaps) == 1
    assert calls == [worker.ident]  # one forward pass, in the worker
    np.testing.assert_array_equal(mask, s.cached_prediction(1))


def test_the_image_copy_is_written_once_per_case_and_again_when_missing(tmp_path):
    scans = scan_folder(tmp_path / "scans")
    corr = tmp_path / "corr"
    s = AnnotationSession(scans, corr)
    case = s.open(0)
    shape = case.image.shape
    s.set_mask(_mask(shape, 0))
    s.save()
    image = corr / "unknown" / "scan0.png"
    first = image.stat()
    s.set_mask(_mask(shape, 1))  # corrected again: the mask changes, the image does not
    s.save()
    again = image.stat()
    assert (again.st_ino, again.st_mtime_ns) == (first.st_ino, first.st_mtime_ns)
    np.testing.assert_array_equal(read_mask(corr / "unknown" / "scan0_mask.png"),
                                  _mask(shape, 1) > 0)
    image.unlink()  # removed behind the session's back: written again
    s.set_mask(_mask(shape, 2))
    s.save()
    np.testing.assert_array_equal(np.asarray(Image.open(image)), case.image)
    fresh = AnnotationSession(scans, corr)  # another session compares before it keeps a file
    fresh.open(0)
    fresh.set_mask(_mask(shape, 3))
    fresh.save()
    np.testing.assert_array_equal(np.asarray(Image.open(image)), case.image)
