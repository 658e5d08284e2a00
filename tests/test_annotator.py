"""busseg.annotator: the simulated annotator (the protocol, the click, the cost of a model).

:func:`annotate_scan` is checked with fake prompt functions whose answers are known:
acceptance at IoU 0.85, the normal-scan clear, one interaction per box and one for erasing
false regions outside the grown boxes, clicks inside the grown boxes with the boxes kept and
the previous mask fed back, the cap of 20 (then brushed to the truth). :func:`next_click` (the
cropped click simulator of :mod:`busseg.prompts`) is compared with the same rule on the whole
image on random masks. :func:`annotation_cost` is
checked with :func:`busseg.inference.predict` replaced by a fake whose masks are known, and
once end to end with a tiny untrained prompt model.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import ndimage

import busseg.inference as inf
from busseg import annotator as A
from busseg.prompts import deepest_error_click as reference_click
from busseg.prompts import jitter_box, mask_to_boxes


def _rect(shape, r0, c0, r1, c1):
    m = np.zeros(shape, bool)
    m[r0:r1, c0:c1] = True
    return m


class Recorder:
    """A prompt function that records its calls and answers from a list (last one repeats)."""

    def __init__(self, answers):
        self.answers = list(answers)
        self.calls = []

    def __call__(self, boxes, points, labels, previous):
        self.calls.append((np.asarray(boxes).copy(), np.asarray(points).copy(),
                           np.asarray(labels).copy(),
                           None if previous is None else np.asarray(previous).copy()))
        k = min(len(self.calls), len(self.answers)) - 1
        return self.answers[k]


SHAPE = (60, 80)
TRUTH = _rect(SHAPE, 20, 20, 40, 50)  # rows 20..39, cols 20..49: 20 x 30 pixels
EMPTY = np.zeros(SHAPE, bool)
RNG = np.random.default_rng


def test_constants_are_the_documented_protocol():
    assert (A.ACCEPT_IOU, A.MAX_INTERACTIONS, A.BOX_MARGIN, A.JITTER) == (0.85, 20, 0.1, 0.1)


# --------------------------------------------------------------------------- acceptance


def test_a_good_automatic_mask_is_accepted_without_interaction():
    auto = TRUTH.copy()
    auto[20:22] = False  # IoU 0.9
    prompt = Recorder([TRUTH])
    res = A.annotate_scan(auto, TRUTH, prompt, RNG(0))
    assert res["kind"] == "accepted" and res["interactions"] == 0 and res["mask"] is None
    assert res["auto_iou"] == pytest.approx(0.9) and res["final_iou"] == pytest.approx(0.9)
    assert prompt.calls == [] and res["prompt_calls"] == 0 and res["ious"] == []


def test_acceptance_threshold_is_inclusive_and_exclusive_below():
    auto = TRUTH.copy()
    auto[20:23] = False  # 17/20 rows: IoU exactly 0.85
    assert A.annotate_scan(auto, TRUTH, Recorder([TRUTH]), RNG(0))["kind"] == "accepted"
    auto[23] = False  # IoU 0.80
    res = A.annotate_scan(auto, TRUTH, Recorder([TRUTH]), RNG(0))
    assert res["kind"] == "prompted" and res["interactions"] == 1  # one box fixed it
    # another acceptance level moves the line
    res = A.annotate_scan(auto, TRUTH, Recorder([TRUTH]), RNG(0), accept_iou=0.8)
    assert res["kind"] == "accepted"


def test_masks_of_any_dtype_count_nonzero_as_lesion():
    auto = (TRUTH * 255).astype(np.uint8)
    res = A.annotate_scan(auto, TRUTH.astype(np.uint8), Recorder([TRUTH]), RNG(0))
    assert res["kind"] == "accepted" and res["auto_iou"] == 1.0


def test_normal_scan_empty_prediction_costs_nothing():
    res = A.annotate_scan(EMPTY, EMPTY, Recorder([EMPTY]), RNG(0))
    assert res["kind"] == "accepted" and res["interactions"] == 0 and res["mask"] is None
    assert res["final_iou"] == 1.0


def test_normal_scan_false_regions_cost_one_clear():
    auto = _rect(SHAPE, 2, 2, 8, 8) | _rect(SHAPE, 40, 60, 50, 70)  # two false regions
    prompt = Recorder([TRUTH])
    res = A.annotate_scan(auto, EMPTY, prompt, RNG(0))
    assert res["kind"] == "cleared" and res["interactions"] == 1
    assert res["mask"] is not None and not res["mask"].any()
    assert res["auto_iou"] == 0.0 and res["boxes"] == 0 and res["erases"] == 0
    assert prompt.calls == []  # "no lesion" needs no prompt


# --------------------------------------------------------------------------- box then clicks


def test_one_box_per_lesion_each_one_interaction():
    second = _rect(SHAPE, 5, 60, 15, 75)
    truth = TRUTH | second
    prompt = Recorder([truth])
    res = A.annotate_scan(EMPTY, truth, prompt, RNG(0))
    assert res["kind"] == "prompted" and res["boxes"] == 2 and res["interactions"] == 2
    boxes, points, labels, prev = prompt.calls[0]
    assert boxes.shape == (2, 4) and points.shape == (0, 2) and len(labels) == 0
    assert prev is None  # the first call is box-only
    assert res["clicks"] == 0 and res["ious"] == [1.0] and res["prompt_calls"] == 1


def test_without_jitter_the_box_is_the_tight_box():
    prompt = Recorder([TRUTH])
    A.annotate_scan(EMPTY, TRUTH, prompt, RNG(0), jitter=0.0)
    np.testing.assert_array_equal(prompt.calls[0][0], [[20, 20, 39, 49]])


def test_false_regions_outside_the_grown_boxes_cost_one_erase():
    auto = _rect(SHAPE, 0, 0, 5, 5) | _rect(SHAPE, 52, 70, 58, 78)  # two, far from the lesion
    res = A.annotate_scan(auto, TRUTH, Recorder([TRUTH]), RNG(0))
    assert res["erases"] == 1 and res["boxes"] == 1 and res["interactions"] == 2
    assert res["kind"] == "prompted"
    # a false region inside the box is replaced by the prompt: no erase
    res = A.annotate_scan(_rect(SHAPE, 21, 21, 25, 25), TRUTH, Recorder([TRUTH]), RNG(0))
    assert res["erases"] == 0 and res["interactions"] == 1


def test_the_erase_boundary_is_the_box_grown_by_the_margin():
    # tight box rows 20..39, cols 20..49; 10 % grows it by 2 rows and 3 columns: rows 18..41
    inside_margin = _rect(SHAPE, 18, 20, 19, 30)  # just above the box, within the margin
    outside_margin = _rect(SHAPE, 16, 20, 17, 30)  # one row further up
    kw = {"jitter": 0.0, "box_margin": 0.1}
    res = A.annotate_scan(inside_margin, TRUTH, Recorder([TRUTH]), RNG(0), **kw)
    assert res["erases"] == 0 and res["interactions"] == 1
    res = A.annotate_scan(outside_margin, TRUTH, Recorder([TRUTH]), RNG(0), **kw)
    assert res["erases"] == 1 and res["interactions"] == 2
    # without a margin the first region is outside too
    res = A.annotate_scan(inside_margin, TRUTH, Recorder([TRUTH]), RNG(0), jitter=0.0,
                          box_margin=0.0)
    assert res["erases"] == 1


def test_the_erase_counts_towards_the_cap():
    auto = _rect(SHAPE, 0, 0, 5, 5)  # an erase, and the prompt never gets there
    prompt = Recorder([EMPTY])
    res = A.annotate_scan(auto, TRUTH, prompt, RNG(0))
    assert res["kind"] == "brushed" and res["interactions"] == 20
    # box + erase + 18 clicks = 20 interactions
    assert res["erases"] == 1 and res["clicks"] == 18 and len(prompt.calls) == 19
    assert res["prompt_calls"] == 19 and len(res["ious"]) == 19


def test_clicks_keep_the_box_and_feed_the_previous_mask_back():
    half = _rect(SHAPE, 20, 20, 40, 35)  # IoU 0.5
    better = _rect(SHAPE, 20, 20, 40, 44)  # IoU 0.8
    prompt = Recorder([half, better, TRUTH])
    res = A.annotate_scan(EMPTY, TRUTH, prompt, RNG(0))
    # box (1) + two clicks: 3 interactions, the box counted as one
    assert res["kind"] == "prompted" and res["interactions"] == 3 and res["clicks"] == 2
    assert res["ious"] == pytest.approx([0.5, 0.8, 1.0]) and res["final_iou"] == 1.0
    np.testing.assert_array_equal(res["mask"], TRUTH)
    box0 = prompt.calls[0][0]
    for k, (boxes, points, labels, prev) in enumerate(prompt.calls[1:], start=1):
        np.testing.assert_array_equal(boxes, box0)  # the box is kept
        assert points.shape == (k, 2) and len(labels) == k  # all clicks so far
        np.testing.assert_array_equal(prev, prompt.answers[k - 1])  # the previous mask
    # the first click is positive, in the missed part of the lesion (columns 35..49)
    (r, c), lab = prompt.calls[1][1][0], prompt.calls[1][2][0]
    assert lab == 1 and 20 <= r < 40 and 35 <= c < 50


def test_clicks_are_taken_inside_the_grown_boxes_only():
    # the prompt's mask misses half the lesion and has a larger false block far outside the
    # box (the real model cannot do that; the widget ignores clicks there): the click goes
    # to the missed half, not to the bigger error outside
    far = _rect(SHAPE, 45, 55, 60, 80)
    answer = _rect(SHAPE, 20, 20, 40, 35) | far
    prompt = Recorder([answer, TRUTH])
    res = A.annotate_scan(EMPTY, TRUTH, prompt, RNG(0), jitter=0.0)
    (r, c), lab = prompt.calls[1][1][0], prompt.calls[1][2][0]
    assert lab == 1 and 20 <= r < 40 and 35 <= c < 50
    assert res["kind"] == "prompted" and res["interactions"] == 2


def test_no_error_left_inside_the_boxes_means_brushing():
    # right inside the grown box, a false block outside: IoU < 0.85 and nothing to click
    answer = TRUTH | _rect(SHAPE, 44, 0, 60, 80)
    prompt = Recorder([answer])
    res = A.annotate_scan(EMPTY, TRUTH, prompt, RNG(0), jitter=0.0)
    assert res["kind"] == "brushed" and res["interactions"] == 20 and res["clicks"] == 0
    assert len(prompt.calls) == 1 and res["final_iou"] < 0.85
    np.testing.assert_array_equal(res["mask"], TRUTH)


def test_a_scan_that_never_converges_counts_the_cap_and_is_brushed():
    prompt = Recorder([EMPTY])
    res = A.annotate_scan(EMPTY, TRUTH, prompt, RNG(0))
    assert res["kind"] == "brushed" and res["interactions"] == 20
    np.testing.assert_array_equal(res["mask"], TRUTH)  # the saved correction is the truth
    assert res["mask"] is not TRUTH  # a copy, not the caller's array
    assert len(prompt.calls) == 20  # the box, then 19 clicks: 20 interactions in all
    assert res["final_iou"] == 0.0
    res = A.annotate_scan(EMPTY, TRUTH, Recorder([EMPTY]), RNG(0), max_interactions=5)
    assert res["interactions"] == 5 and res["clicks"] == 4
    res = A.annotate_scan(EMPTY, TRUTH, Recorder([EMPTY]), RNG(0), max_interactions=1)
    assert res["kind"] == "brushed" and res["interactions"] == 1 and res["clicks"] == 0


def test_converging_on_the_last_allowed_click_is_not_brushed():
    answers = [EMPTY] * 19 + [TRUTH]  # box + 18 clicks fail, click 19 fixes
    res = A.annotate_scan(EMPTY, TRUTH, Recorder(answers), RNG(0))
    assert res["kind"] == "prompted" and res["interactions"] == 20 and res["clicks"] == 19


def test_box_jitter_depends_only_on_the_seed():
    prompt_a, prompt_b = Recorder([TRUTH]), Recorder([TRUTH])
    A.annotate_scan(EMPTY, TRUTH, prompt_a, np.random.default_rng([0, 7]))
    A.annotate_scan(EMPTY, TRUTH, prompt_b, np.random.default_rng([0, 7]))
    np.testing.assert_array_equal(prompt_a.calls[0][0], prompt_b.calls[0][0])
    r0, c0, r1, c1 = prompt_a.calls[0][0][0]
    assert abs(r0 - 20) <= 2 and abs(r1 - 39) <= 2 and abs(c0 - 20) <= 3 and abs(c1 - 49) <= 3
    # the box is jitter_box of the tight box, drawn from the given generator
    expected = jitter_box(mask_to_boxes(TRUTH)[0], SHAPE, np.random.default_rng([0, 7]), 0.1)
    np.testing.assert_array_equal(prompt_a.calls[0][0][0], expected)


# --------------------------------------------------------------------------- next_click


def _blobs(rng, shape, density, grow):
    seeds = rng.random(shape) < density
    return ndimage.binary_dilation(seeds, iterations=grow) if grow else seeds


def test_next_click_is_the_project_click_simulator_on_random_masks():
    rng = np.random.default_rng(7)
    for _ in range(300):
        h, w = (int(v) for v in rng.integers(1, 70, 2))
        truth = _blobs(rng, (h, w), rng.uniform(0.0, 0.05), int(rng.integers(0, 5)))
        pred = _blobs(rng, (h, w), rng.uniform(0.0, 0.05), int(rng.integers(0, 5)))
        if rng.random() < 0.3:  # a prediction close to the truth: small, thin errors
            pred = truth ^ _blobs(rng, (h, w), 0.01, 1)
        assert A.next_click(pred, truth) == reference_click(pred, truth)


@settings(max_examples=150, deadline=None)
@given(st.integers(1, 24), st.integers(1, 24), st.integers(0, 2**32 - 1))
def test_next_click_matches_on_any_small_masks(h, w, seed):
    rng = np.random.default_rng(seed)
    truth, pred = rng.random((h, w)) < rng.random(), rng.random((h, w)) < rng.random()
    assert A.next_click(pred, truth) == reference_click(pred, truth)


def test_next_click_errors_at_the_border_and_ties():
    truth = np.zeros((30, 40), bool)
    truth[0:10, 0:10] = True  # a lesion in the corner: the image border counts as outside
    pred = np.zeros_like(truth)
    assert A.next_click(pred, truth) == reference_click(pred, truth) == (4, 4, 1)
    # equal false negative and false positive depth: the false negative wins, as in prompts
    pred = np.zeros((30, 40), bool)
    pred[20:25, 30:35] = True
    truth = np.zeros_like(pred)
    truth[5:10, 5:10] = True
    click = A.next_click(pred, truth)
    assert click == reference_click(pred, truth) and click[2] == 1


def test_next_click_none_when_they_agree_and_shape_errors():
    assert A.next_click(TRUTH, TRUTH) is None
    assert A.next_click(EMPTY, EMPTY) is None
    with pytest.raises(ValueError, match="differ in shape"):
        A.next_click(np.zeros((3, 4)), np.zeros((4, 3)))


# --------------------------------------------------------------------------- annotation_cost


class FakeModel:
    """``busseg.inference.predict`` stand-in: the image's value i picks scan i's masks."""

    def __init__(self, autos, prompted):
        self.autos, self.prompted = autos, prompted
        self.calls = []

    def predict(self, image, model, **kw):
        i = int(np.asarray(image).flat[0])
        self.calls.append((i, model, kw))
        mask = self.autos[i] if kw.get("boxes") is None else self.prompted[i]
        return inf.Prediction(mask.copy(), mask.astype(np.float32), None)


def _scans():
    """Five scans: a lesion the automatic mask gets, one a box fixes, a normal scan left
    empty, a normal scan with a false region, and a lesion no prompt ever finds."""
    images = [np.full(SHAPE, i, np.uint8) for i in range(5)]
    truths = [TRUTH, TRUTH, EMPTY, EMPTY, TRUTH]
    autos = [TRUTH, EMPTY, EMPTY, _rect(SHAPE, 0, 0, 5, 5), EMPTY]
    prompted = [TRUTH, TRUTH, EMPTY, EMPTY, EMPTY]
    return images, truths, autos, prompted


@pytest.fixture
def fake(monkeypatch):
    images, truths, autos, prompted = _scans()
    model = FakeModel(autos, prompted)
    monkeypatch.setattr(inf, "predict", model.predict)
    return images, truths, autos, model


def test_annotation_cost_means_per_scan_lesion_and_normal(fake):
    images, truths, _, model = fake
    out = A.annotation_cost("model", images, truths)
    assert out["n"] == 5 and out["interactions"] == [0, 1, 0, 1, 20]
    assert out["per_scan"] == pytest.approx(22 / 5)
    assert out["lesion_per_scan"] == pytest.approx(21 / 3)
    assert out["normal_per_scan"] == pytest.approx(0.5)
    assert out["kinds"] == {"accepted": 2, "cleared": 1, "prompted": 1, "brushed": 1}
    assert out["never_converged"] == 1
    # the model itself went to every call; one automatic call per scan
    assert {m for _, m, _ in model.calls} == {"model"}
    autos = [i for i, _, kw in model.calls if kw.get("boxes") is None]
    assert autos == [0, 1, 2, 3, 4]


def test_annotation_cost_passes_the_settings_on(fake):
    images, truths, _, model = fake
    out = A.annotation_cost("m", images, truths, max_interactions=6, box_margin=0.2,
                            predict_kwargs={"normal_gate": None})
    assert out["interactions"] == [0, 1, 0, 1, 6]
    for _, _, kw in model.calls:
        if kw.get("boxes") is None:  # the automatic call gets the extra arguments
            assert kw == {"normal_gate": None}
        else:  # the prompted calls get the margin
            assert kw["box_margin"] == 0.2 and "normal_gate" not in kw
    # the prompted calls of the never-converging scan: the box, then 5 clicks, fed back
    calls = [kw for i, _, kw in model.calls if i == 4 and kw.get("boxes") is not None]
    assert len(calls) == 6 and calls[0]["points"] is None and calls[0]["previous_mask"] is None
    assert [len(kw["points"]) for kw in calls[1:]] == [1, 2, 3, 4, 5]
    # an all-empty previous mask is not passed (the model's first-click input)
    assert all(kw["previous_mask"] is None for kw in calls[1:])


def test_annotation_cost_uses_given_automatic_masks(fake):
    images, truths, autos, model = fake
    swapped = [EMPTY, TRUTH, EMPTY, EMPTY, EMPTY]  # scan 0 now needs a box, scan 3 nothing
    out = A.annotation_cost("m", images, truths, autos=swapped)
    assert out["interactions"] == [1, 0, 0, 0, 20]
    assert all(kw.get("boxes") is not None for _, _, kw in model.calls)  # no automatic call


def test_annotation_cost_without_normal_or_lesion_scans_gives_nan(fake):
    images, truths, _, _ = fake
    lesions = A.annotation_cost("m", images[:2], truths[:2])
    assert math.isnan(lesions["normal_per_scan"]) and lesions["lesion_per_scan"] == 0.5
    normals = A.annotation_cost("m", images[2:4], truths[2:4])
    assert math.isnan(normals["lesion_per_scan"]) and normals["normal_per_scan"] == 0.5


def test_annotation_cost_rejects_lengths_that_differ(fake):
    images, truths, autos, _ = fake
    with pytest.raises(ValueError, match="5 images but 4 masks"):
        A.annotation_cost("m", images, truths[:4])
    with pytest.raises(ValueError, match="3 automatic masks for 5 images"):
        A.annotation_cost("m", images, truths, autos=autos[:3])


def test_annotation_cost_seed_fixes_the_boxes(monkeypatch):
    big = _rect((200, 200), 40, 40, 160, 160)  # 120 px sides: a 10 % jitter is 12 px
    images = [np.full((200, 200), i, np.uint8) for i in range(3)]
    model = FakeModel([np.zeros((200, 200), bool)] * 3, [big] * 3)
    monkeypatch.setattr(inf, "predict", model.predict)

    def boxes(seed):
        model.calls.clear()
        out = A.annotation_cost("m", images, [big] * 3, seed=seed)
        return out, [kw["boxes"].tolist() for _, _, kw in model.calls if "boxes" in kw]

    (a, boxes_a), (b, boxes_b), (_, boxes_c) = boxes(3), boxes(3), boxes(4)
    # two calls with one seed: identical (normal_per_scan is NaN here: no normal scan)
    assert boxes_a == boxes_b and math.isnan(a["normal_per_scan"])
    assert {k: v for k, v in a.items() if k != "normal_per_scan"} == {
        k: v for k, v in b.items() if k != "normal_per_scan"}
    assert boxes_c != boxes_a
    assert len({str(x) for x in boxes_a}) == 3  # each scan its own draw
    # scan i's boxes come from default_rng([seed, i]), whatever the other scans are
    tight = mask_to_boxes(big)[0]
    for i in range(3):
        expected = jitter_box(tight, (200, 200), np.random.default_rng([3, i]), 0.1)
        np.testing.assert_array_equal(boxes_a[i][0], expected)


def test_annotation_cost_of_a_tiny_real_prompt_model(tiny_prompt_checkpoint, synthetic_pairs):
    """End to end with the real predict: the counts agree with annotate_scan driven by
    model_prompt, scan by scan, with the documented seeds."""
    from busseg.inference import load_model, predict

    model = load_model(tiny_prompt_checkpoint, device="cpu")
    images, truths = synthetic_pairs(3, size=(48, 56), seed=11)
    normal_images, normal_truths = synthetic_pairs(1, size=(48, 56), seed=12, lesion=False)
    images, truths = [*images, *normal_images], [*truths, *normal_truths]
    out = A.annotation_cost(model, images, truths, max_interactions=4)
    assert out["n"] == 4 and sum(out["kinds"].values()) == 4
    assert all(0 <= k <= 4 for k in out["interactions"]) and out["interactions"][3] <= 1
    for i, (image, truth) in enumerate(zip(images, truths, strict=True)):
        auto = predict(image, model).mask
        res = A.annotate_scan(auto, truth, A.model_prompt(image, model),
                              np.random.default_rng([0, i]), max_interactions=4)
        assert res["interactions"] == out["interactions"][i]
