"""busseg.prompts: validation, guidance rendering, boxes, simulated clicks and training prompts."""

import numpy as np
import pytest
import torch

from busseg.prompts import (
    GUIDANCE_CHANNELS,
    Prompts,
    PromptSimulator,
    box_mask,
    jitter_box,
    mask_to_boxes,
    next_click,
    render_guidance,
    validate_prompts,
)


def _disk(shape, r, c, radius):
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return (yy - r) ** 2 + (xx - c) ** 2 <= radius**2


def test_validate_accepts_single_prompts_and_defaults_to_positive():
    pr = validate_prompts((40, 50), boxes=(1, 2, 10, 20), points=(5, 6))
    assert pr.boxes.shape == (1, 4) and pr.points.shape == (1, 2)
    assert pr.point_labels.tolist() == [1]
    assert not pr.empty and validate_prompts((4, 4)).empty
    prev = validate_prompts((4, 4), previous_mask=np.eye(4) * 255)
    assert prev.previous_mask.dtype == bool and prev.previous_mask.sum() == 4


def test_render_guidance_at_input_scale():
    pr = validate_prompts((100, 200), boxes=[(20, 40, 59, 119)], points=[(50, 100), (10, 10)],
                          point_labels=[1, 0], previous_mask=np.ones((100, 200), bool))
    g = render_guidance(pr, (100, 200), (50, 100), click_radius=2)
    assert g.shape == (len(GUIDANCE_CHANNELS), 50, 100) and g.dtype == torch.float32
    pos, neg, box, prev = (g[i].numpy() for i in range(4))
    # clicks land at the scaled position (row 24.75, col 49.75), the negative one elsewhere
    assert pos[25, 50] == 1 and pos[0:10].sum() == 0
    assert neg[5, 5] == 1 and neg[25, 50] == 0
    # box rows 20..59 -> input rows 10..29, cols 40..119 -> 20..59, exactly
    rows, cols = np.nonzero(box)
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (10, 29, 20, 59)
    assert prev.all()


def test_render_identity_scale_and_tiny_boxes():
    pr = Prompts(np.array([[3.0, 3.0, 3.0, 3.0]]), np.zeros((0, 2)), np.zeros(0, np.int8))
    g = render_guidance(pr, (10, 10), (10, 10))
    assert g[2].sum() == 1 and g[2, 3, 3] == 1
    # a one-pixel box of a large image still marks one input pixel
    g = render_guidance(pr, (1000, 1000), (10, 10))
    assert g[2].sum() >= 1


def test_mask_to_boxes_and_box_mask():
    m = np.zeros((30, 30), bool)
    m[2:6, 3:9] = True
    m[20:25, 20:22] = True
    boxes = mask_to_boxes(m)
    assert sorted(map(tuple, boxes.tolist())) == [(2, 3, 5, 8), (20, 20, 24, 21)]
    assert mask_to_boxes(np.zeros((5, 5))).shape == (0, 4)
    bm = box_mask(boxes, m.shape)
    assert (bm >= m).all() and bm.sum() == 4 * 6 + 5 * 2
    assert box_mask(boxes, m.shape, margin=0.5).sum() > bm.sum()


def test_jitter_box_stays_valid_and_bounded():
    rng = np.random.default_rng(0)
    box = np.array([20.0, 30.0, 59.0, 69.0])
    for _ in range(200):
        j = jitter_box(box, (80, 100), rng, 0.1)
        assert j[0] <= j[2] and j[1] <= j[3]
        assert np.all(np.abs(j - box) <= 0.1 * 40 + 0.5)
        assert j.min() >= 0 and j[2] <= 79 and j[3] <= 99


def test_next_click_goes_to_the_deepest_point_of_the_larger_error():
    truth = _disk((60, 60), 30, 30, 15)
    assert next_click(truth, truth) is None
    # nothing predicted: a positive click at the lesion centre
    r, c, lab = next_click(np.zeros_like(truth), truth)
    assert lab == 1 and abs(r - 30) <= 1 and abs(c - 30) <= 1
    # a large false positive elsewhere beats a thin miss: negative click inside it
    pred = truth.copy()
    pred[truth & (np.arange(60)[None, :] > 43)] = False  # thin miss at the right edge
    fp = _disk((60, 60), 8, 8, 6)
    r, c, lab = next_click(pred | fp, truth)
    assert lab == 0 and fp[r, c]
    with pytest.raises(ValueError, match="differ in shape"):
        next_click(np.zeros((3, 3)), np.zeros((3, 4)))


def test_prompt_simulator_modes():
    torch.manual_seed(0)
    n, h, w = 12, 48, 48
    masks = torch.zeros(n, 1, h, w)
    for i in range(n - 2):  # the last two are lesion-free (normal) images
        masks[i, 0] = torch.from_numpy(_disk((h, w), 20 + i, 24, 8))
    images = torch.randn(n, 1, h, w)
    seen = []

    def model(x):
        seen.append(x.shape)
        return torch.full((x.shape[0], 1, h, w), -5.0)  # predicts nothing

    rng = np.random.default_rng(0)
    auto = PromptSimulator(p_auto=1.0)
    g, prompted = auto(model, images, masks, rng)
    assert not g.any() and not prompted.any() and not seen

    boxes = PromptSimulator(p_auto=0.0, p_box=1.0)
    g, prompted = boxes(model, images, masks, rng)
    assert prompted.tolist() == [True] * (n - 2) + [False, False]
    assert g[:, 2].flatten(1).any(1).tolist() == prompted.tolist()
    assert not g[:, [0, 1, 3]].any()

    clicks = PromptSimulator(p_auto=0.0, p_box=0.0, click_box=0.0, from_auto=0.0,
                             max_rounds=0)
    g, prompted = clicks(model, images, masks, rng)
    for i in range(n - 2):
        pos = g[i, 0].numpy() > 0
        assert pos.any() and (pos & masks[i, 0].numpy().astype(bool)).any()
    assert not g[n - 2:].any()

    # correction rounds feed back the (empty) prediction and add positive clicks
    rounds = PromptSimulator(p_auto=0.0, p_box=0.0, click_box=0.0, from_auto=1.0,
                             max_rounds=2)
    g, prompted = rounds(model, images, masks, np.random.default_rng(3))
    assert seen and all(s[1] == 5 for s in seen)
    assert g[: n - 2, 0].flatten(1).any(1).all()
