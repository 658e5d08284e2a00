"""Site calibration (busseg.calibration): two numbers chosen on the answers by their cost."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

from busseg.calibration import (
    CALIBRATION_NAME,
    Calibration,
    CalibrationError,
    CaseEvidence,
    case_evidence,
    fit_calibration,
)

CONFIG = {"inference": {"threshold": 0.5,
                        "normal_gate": {"p_normal": 0.95, "lesion_confidence": 0.95},
                        "region_filter": {"threshold": 0.2}}}


def _normal(score: float, p_normal: float = 0.5) -> CaseEvidence:
    """A normal answer whose automatic mask had one false region with this filter score."""
    return CaseEvidence(False, 0, p_normal, 0.8, [score], [50], [0], [True])


def _lesion(score: float, p_normal: float = 0.1) -> CaseEvidence:
    """A lesion answer whose automatic mask was the lesion itself (accepted as it is)."""
    return CaseEvidence(True, 100, p_normal, 0.9, [score], [100], [100], [False])


def test_costs_follow_the_simulated_annotator():
    assert _normal(0.3).cost(0.2, 0.95, 0.95) == 1.0  # kept: the annotator clears it
    assert _normal(0.3).cost(0.4, 0.95, 0.95) == 0.0  # dropped: nothing to do
    assert _lesion(0.3).cost(0.2, 0.95, 0.95) == 0.0  # accepted
    assert _lesion(0.3).cost(0.4, 0.95, 0.95) == 3.0  # lost: box and clicks
    gated = _normal(0.9, p_normal=0.97)
    assert gated.cost(0.2, 0.95, 0.95) == 0.0  # the gate empties it


def test_a_site_whose_false_regions_score_low_gets_a_higher_threshold():
    evidence = [_normal(0.3)] * 6 + [_lesion(0.6)] * 4
    cal = fit_calibration(evidence, CONFIG, checkpoint="ck")
    assert cal.changed and 0.3 < cal.threshold <= 0.6
    assert (cal.false_before, cal.false_after) == (6, 0)
    assert (cal.cost_before, cal.cost_after) == (6.0, 0.0)
    assert "false regions 6 -> 0" in cal.text()
    kw = cal.predict_kwargs({"inference": {"region_filter": _stored_filter()}})
    assert kw["region_filter"]["threshold"] == cal.threshold


def test_a_calibration_that_would_lose_lesions_keeps_the_checkpoint_settings():
    # the false regions score like the lesions and the head cannot tell them apart either:
    # any higher threshold or lower gate drops lesions too
    evidence = [_normal(0.5)] * 2 + [_lesion(0.5, p_normal=0.5)] * 4
    cal = fit_calibration(evidence, CONFIG)
    assert not cal.changed and cal.cost_after == cal.cost_before == 2.0
    assert "checkpoint settings kept" in cal.text()


def test_a_gain_below_min_gain_is_noise():
    cal = fit_calibration([_normal(0.3), _lesion(0.6)], CONFIG, min_gain=2.0)
    assert not cal.changed


def test_the_gate_can_move_too():
    # normal answers the head calls normal at 0.9 (< the stored 0.95), lesions at 0.1
    evidence = [_normal(0.9, p_normal=0.9)] * 5 + [_lesion(0.9, p_normal=0.1)] * 5
    cal = fit_calibration(evidence, CONFIG)
    assert cal.p_normal is not None and cal.p_normal <= 0.9 and cal.threshold is None
    assert cal.predict_kwargs(CONFIG)["normal_gate"] == cal.p_normal


def test_evidence_from_masks(tmp_path):
    raw = np.zeros((40, 40), bool)
    raw[5:15, 5:15] = True  # overlaps the answer
    raw[30:35, 30:35] = True  # a false region far from it
    proba = raw * 0.8
    answer = np.zeros_like(raw)
    answer[6:16, 6:16] = True
    e = case_evidence(raw, proba.astype(np.float32), (raw * 200).astype(np.uint8),
                      {"normal": 0.2, "benign": 0.5, "malignant": 0.3}, None, answer)
    assert e.lesion and e.answer_area == 100 and e.p_normal == 0.2
    assert e.areas == [100, 25] and e.overlaps == [81, 0] and e.outside == [False, True]
    assert e.scores == [1.0, 1.0]  # no filter: every component scores 1
    with pytest.raises(ValueError, match="differ in shape"):
        case_evidence(raw, proba, raw, None, None, answer[:10])


def test_calibration_is_fast_on_hundreds_of_answers():
    rng = np.random.default_rng(0)
    evidence = []
    for i in range(300):
        k = int(rng.integers(0, 4))
        lesion = bool(i % 3)
        evidence.append(CaseEvidence(lesion, 200 if lesion else 0, float(rng.random()),
                                     float(rng.random()), list(rng.random(k)),
                                     list(rng.integers(10, 300, k)),
                                     list(rng.integers(0, 10, k)), list(rng.random(k) > 0.5)))
    t0 = time.perf_counter()
    fit_calibration(evidence, CONFIG)
    assert time.perf_counter() - t0 < 0.5


def test_stored_calibration_round_trip_and_clear_errors(tmp_path):
    cal = Calibration(0.4, None, 12, 9.0, 4.0, 6, 1, checkpoint="/models/a")
    cal.save(tmp_path)
    assert Calibration.load(tmp_path, "/models/a") == cal
    assert Calibration.load(tmp_path / "nothing", "/models/a") is None
    with pytest.raises(CalibrationError, match="made for the checkpoint /models/a"):
        Calibration.load(tmp_path, "/models/b")
    (tmp_path / CALIBRATION_NAME).write_text("{not json")
    with pytest.raises(CalibrationError, match="corrupt.*delete it"):
        Calibration.load(tmp_path, "/models/a")
    (tmp_path / CALIBRATION_NAME).write_text(json.dumps({"format": "other"}))
    with pytest.raises(CalibrationError, match="corrupt"):
        Calibration.load(tmp_path, "/models/a")


def _stored_filter() -> dict:
    from busseg.region_filter import FEATURE_NAMES

    return {"kind": "logistic", "features": [FEATURE_NAMES[0]], "mean": [0.0], "scale": [1.0],
            "coef": [1.0], "intercept": 0.0, "threshold": 0.2}


def test_applying_a_calibration_equals_predict_with_its_settings(head_checkpoint):
    """The calibration arm's one-pass gate + filter gives predict's own mask."""
    from busseg.inference import apply_automatic_settings, load_model, predict

    model = load_model(head_checkpoint)
    image = (np.random.default_rng(1).random((64, 64)) * 255).astype(np.uint8)
    raw = predict(image, model, normal_gate=None, region_filter=None)
    for gate in ("auto", None, 0.3):
        expected = predict(image, model, normal_gate=gate).mask
        np.testing.assert_array_equal(
            apply_automatic_settings(raw, image, model, normal_gate=gate), expected)


def _scan_folder(tmp_path, n=6):
    from PIL import Image

    rng = np.random.default_rng(3)
    scans = tmp_path / "scans"
    scans.mkdir()
    for i in range(n):
        Image.fromarray((rng.random((64, 64)) * 255).astype(np.uint8)).save(
            scans / f"s{i:02d}.png")
    return scans


def test_a_session_calibrates_from_its_answers_and_keeps_it(tmp_path, make_head_checkpoint):
    """Five "no lesion" answers on false regions: the session's calibration removes them."""
    from busseg.region_filter import FEATURE_NAMES
    from busseg.session import AnnotationSession

    # a filter that keeps everything (threshold 0) with a score that varies by region
    rf = {"kind": "logistic", "features": [FEATURE_NAMES[0]], "mean": [0.0], "scale": [1.0],
          "coef": [1.0], "intercept": 0.0, "threshold": 0.0}
    ck = make_head_checkpoint(normal_gate={}, region_filter=rf, threshold=0.3)
    scans = _scan_folder(tmp_path)
    s = AnnotationSession(scans, tmp_path / "corr", checkpoint=ck, calibrate=True,
                          calibrate_every=5)
    s.open(0)
    autos = []
    for _ in range(5):
        autos.append(s.predict(device="cpu"))
        s.mark_no_lesion(save=False)  # every answer: no lesion here
        s.next()
    assert any(a.any() for a in autos), "the untrained model should draw false regions"
    assert s.calibrator.calibration is not None and len(s.calibrator.evidence) == 5
    assert s.calibration_text().startswith("site calibration: 5 answers")
    assert (tmp_path / "corr" / CALIBRATION_NAME).is_file()
    if s.calibrator.calibration.changed:
        assert not s.predict(device="cpu").any()  # the next scan: its false regions go
    # reopened: the calibration is read back for the same checkpoint
    s2 = AnnotationSession(scans, tmp_path / "corr", checkpoint=ck, calibrate=True)
    assert s2.calibration_text() == s.calibration_text()
    # another checkpoint: not used, and said so
    other = make_head_checkpoint(normal_gate={}, name="other")
    s3 = AnnotationSession(scans, tmp_path / "corr", checkpoint=other, calibrate=True)
    assert s3.calibration_text() == ""
    assert any("made for the checkpoint" in p for p in s3.problems)
    # switched off: no calibration at all
    s4 = AnnotationSession(scans, tmp_path / "corr", checkpoint=ck, calibrate=False)
    assert s4.calibrator is None and s4.calibration_text() == ""
