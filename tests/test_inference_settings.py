"""Typed inference settings: one validated value that every predict function and job takes."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from busseg.settings import INFERENCE_FIELDS, InferenceSettings


def _grey(shape, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)


@pytest.mark.parametrize(("field", "value", "match"), [
    ("threshold", 1.0, "threshold must be in"),
    ("threshold", 0.0, "threshold must be in"),
    ("threshold", "half", "threshold must be a number"),
    ("threshold", True, "threshold must be a number"),
    ("keep", "biggest", "keep must be one of"),
    ("min_area", -1, "min_area must be a non-negative integer"),
    ("min_area", 2.5, "min_area must be a non-negative integer"),
    ("normal_gate", 1.5, "normal_gate must be in"),
    ("normal_gate", "on", "normal_gate must be 'auto'"),
    ("region_filter", "on", "region_filter must be 'auto'"),
    ("region_filter", 3, "region_filter must be 'auto'"),
    ("device", "gpu", "device must be one of"),
])
def test_bad_values_are_refused_when_the_settings_are_made(field, value, match):
    with pytest.raises(ValueError, match=match):
        InferenceSettings(**{field: value})


def test_values_are_normalised_to_one_type_each():
    import torch

    s = InferenceSettings(threshold=np.float32(0.25), tta=np.bool_(True), normal_gate=False,
                          region_filter=False, min_area=np.int64(5), device=torch.device("cpu"))
    assert (s.threshold, s.tta, s.normal_gate, s.region_filter, s.min_area, s.device) == (
        0.25, True, None, None, 5, "cpu")
    assert type(s.min_area) is int and type(s.threshold) is float
    assert InferenceSettings(region_filter=True).region_filter == "auto"  # the jobs' old bool
    assert InferenceSettings(device="cuda:1").device == "cuda:1"


def test_a_region_filter_mapping_is_parsed_and_the_settings_stay_hashable():
    from busseg.region_filter import RegionFilter

    rf = RegionFilter(["log_area"], [0.0], [1.0], [1.0], 0.0, 0.5)
    s = InferenceSettings(region_filter=rf.to_dict())
    assert isinstance(s.region_filter, RegionFilter) and s.region_filter == rf
    assert hash(s) == hash(InferenceSettings(region_filter=rf))
    assert s.key() == InferenceSettings(region_filter=rf).key()
    assert s.key() != InferenceSettings(region_filter=rf.to_dict() | {"threshold": 0.6}).key()
    assert s.to_dict()["region_filter"] == rf.to_dict()


def test_settings_are_immutable_and_replace_validates():
    s = InferenceSettings(threshold=0.4)
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.threshold = 0.5
    assert s.replace(threshold=0.6).threshold == 0.6 and s.threshold == 0.4
    with pytest.raises(ValueError, match="threshold"):
        s.replace(threshold=2)
    with pytest.raises(TypeError, match="'treshold'"):
        s.replace(treshold=0.5)


def test_coerce_takes_settings_a_mapping_or_none_and_lists_the_fields_on_a_typo():
    base = InferenceSettings(threshold=0.3, tta=True)
    assert InferenceSettings.coerce(None) == InferenceSettings()
    assert InferenceSettings.coerce(base) is base
    assert InferenceSettings.coerce({"threshold": 0.3, "tta": True}) == base
    assert InferenceSettings.coerce(base, threshold=0.7) == base.replace(threshold=0.7)
    with pytest.raises(TypeError) as err:
        InferenceSettings.coerce(base, "predict", thresh=0.5)
    assert "predict()" in str(err.value) and "'thresh'" in str(err.value)
    assert all(f in str(err.value) for f in INFERENCE_FIELDS)
    with pytest.raises(TypeError, match="InferenceSettings"):
        InferenceSettings.coerce(0.5)


def test_resolve_fills_in_the_checkpoint_values():
    cfg = {"inference": {"threshold": 0.35, "tta_flips": True,
                         "normal_gate": {"p_normal": 0.9, "lesion_confidence": 0.8}}}
    r = InferenceSettings().resolve(cfg)
    assert (r.threshold, r.tta, r.gate, r.region_filter, r.post) == (
        0.35, True, {"p_normal": 0.9, "lesion_confidence": 0.8}, None, None)
    r = InferenceSettings(threshold=0.6, tta=False, normal_gate=0.5, keep="largest").resolve(cfg)
    assert (r.threshold, r.tta, r.gate, r.post) == (
        0.6, False, {"p_normal": 0.5, "lesion_confidence": 0.8}, (False, "largest", 0))
    assert InferenceSettings(normal_gate=None).resolve(cfg).gate is None
    with pytest.raises(ValueError, match="threshold"):
        InferenceSettings().resolve({"inference": {"threshold": 1.5}})


@pytest.fixture
def model(tiny_checkpoint):
    from busseg.inference import load_model

    return load_model(tiny_checkpoint, device="cpu")


def _settings_for(model, image) -> list[dict]:
    """Keyword settings whose masks differ (thresholds around the untrained model's output)."""
    from busseg.inference import predict_proba

    p = predict_proba(image, model)
    lo, hi = (float(np.clip(np.quantile(p, q), 0.01, 0.99)) for q in (0.3, 0.8))
    return [{"threshold": lo}, {"threshold": hi, "keep": "largest"},
            {"threshold": lo, "fill_holes": True, "min_area": 20, "tta": True},
            {"threshold": hi, "region_filter": None, "normal_gate": None}]


def test_predict_functions_give_the_same_masks_from_settings_as_from_keywords(model):
    from busseg.inference import predict, predict_mask, predict_stack_iter

    images = [_grey((40, 48), seed=i) for i in range(3)]
    cases = _settings_for(model, images[0])
    masks = [predict_mask(images[0], model, **kw) for kw in cases]
    assert len({m.tobytes() for m in masks}) > 1  # the settings matter for this model
    for kw in cases:
        s = InferenceSettings(**kw)
        for im in images:
            a, b = predict(im, model, s), predict(im, model, **kw)
            np.testing.assert_array_equal(a.mask, b.mask)
            np.testing.assert_array_equal(a.proba, b.proba)
        stack_s = [m for _, m, _ in predict_stack_iter(images, model, s, batch_size=2)]
        stack_k = [m for _, m, _ in predict_stack_iter(images, model, batch_size=2, **kw)]
        for im, m1, m2 in zip(images, stack_s, stack_k, strict=True):
            np.testing.assert_array_equal(m1, m2)
            np.testing.assert_array_equal(m1, predict_mask(im, model, s))


def test_keywords_override_the_settings_and_a_typo_is_a_type_error(model):
    from busseg.inference import classify, predict, predict_mask, predict_proba

    image = _grey((40, 48))
    cases = _settings_for(model, image)
    lo, hi = cases[0]["threshold"], cases[1]["threshold"]
    np.testing.assert_array_equal(
        predict_mask(image, model, InferenceSettings(threshold=hi), threshold=lo),
        predict_mask(image, model, threshold=lo))
    for fn in (predict, predict_mask, predict_proba):
        with pytest.raises(TypeError, match="'thresold'"):
            fn(image, model, thresold=0.5)
    with pytest.raises(TypeError, match="'tta_flips'"):
        classify(image, model, tta_flips=True)
    with pytest.raises(ValueError, match="cuda"):  # not here, or not where the model is
        predict(image, model, InferenceSettings(device="cuda"))


def test_segment_job_takes_the_settings_whole(tiny_checkpoint, model):
    from busseg.engine import drain
    from busseg.jobs import segment_job

    stack = np.stack([_grey((40, 48), seed=i) for i in range(2)])
    kw = _settings_for(model, stack[0])[1]
    s = InferenceSettings(device="cpu", **kw)
    a = drain(segment_job(stack, rgb=False, checkpoint=tiny_checkpoint, settings=s))
    b = drain(segment_job(stack, rgb=False, checkpoint=tiny_checkpoint, device="cpu", **kw))
    np.testing.assert_array_equal(a.labels, b.labels)
    assert a.threshold == b.threshold == pytest.approx(kw["threshold"])
    with pytest.raises(TypeError, match="segment_job"):
        drain(segment_job(stack, rgb=False, checkpoint=tiny_checkpoint, with_probability=True))


def test_the_session_caches_one_prediction_for_equal_settings(tmp_path, tiny_checkpoint):
    from PIL import Image

    from busseg.session import AnnotationSession

    folder = tmp_path / "scans"
    folder.mkdir()
    for i in range(2):
        Image.fromarray(_grey((40, 48), seed=i)).save(folder / f"scan{i}.png")
    s = AnnotationSession(folder, checkpoint=tiny_checkpoint)
    settings = InferenceSettings(threshold=0.5, device="cpu")
    assert s.prediction_key(0, settings) == s.prediction_key(0, threshold=0.5, device="cpu")
    assert s.prediction_key(0, settings) != s.prediction_key(0, threshold=0.6, device="cpu")
    mask = s.prefetch(1, settings)
    np.testing.assert_array_equal(s.cached_prediction(1, threshold=0.5, device="cpu"), mask)
    assert s.prediction_key(0, settings, boxes=np.zeros((1, 4))) is None  # prompts: not cached
