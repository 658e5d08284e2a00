"""Box and click prompts in the "Segment lesions" widget, loaded through the napari manifest.

The prompt layers, the worker that answers each prompt, the region a prompt may change, undo,
bad prompts, stacks, the image-combo fix and the class probabilities after Run. A tiny
untrained prompt checkpoint (``tiny_prompt_checkpoint``) stands in for the real model; where
the test is about *which pixels* may change, ``prompt_job`` is replaced by a fake model that
paints a disk at each lesion click, so the expected mask is known exactly.
"""

from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import numpy as np
import pytest

pytest.importorskip("napari")
pytest.importorskip("pytestqt")

pytestmark = pytest.mark.gui

TIMEOUT_MS = 60_000


def _grey(shape, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)


@pytest.fixture
def widget(open_segment, tiny_prompt_checkpoint):
    return open_segment(tiny_prompt_checkpoint)


def _first_click(qtbot, viewer, widget, monkeypatch):
    """The fake model (:func:`_disk_model`), a 64x80 image "img" and one lesion click at
    (20, 20), applied; returns (the model's calls, the clicks layer, the prediction layer)."""
    calls = _disk_model(monkeypatch)
    viewer.add_image(_grey((64, 80)), name="img")
    clicks = viewer.layers["img clicks"]
    clicks.add([20, 20])
    wait_prompt(qtbot, widget)
    return calls, clicks, viewer.layers["img prediction"]


def wait_prompt(qtbot, w):
    """Wait until every queued prompt update has been applied."""
    qtbot.waitUntil(lambda: not w.prompt_busy, timeout=TIMEOUT_MS)


def run(qtbot, w):
    w._run_btn.native.click()
    qtbot.waitUntil(lambda: not w.running, timeout=TIMEOUT_MS)


def _disk_model(monkeypatch):
    """Replace the network by a disk of radius 6 at each lesion click (boxes: filled)."""
    import busseg._widgets.segment as seg

    calls = []

    def fake(req):
        h, w = req.slice_shape
        yy, xx = np.mgrid[:h, :w]
        mask = np.zeros((h, w), bool)
        for (r, c), lab in zip(req.points, req.point_labels, strict=True):
            if lab == 1:
                mask |= (yy - r) ** 2 + (xx - c) ** 2 <= 36
        for r0, c0, r1, c1 in req.boxes:
            mask[int(r0):int(r1) + 1, int(c0):int(c1) + 1] = True
        calls.append(req)
        return seg.PromptResult(mask, 0.001)

    monkeypatch.setattr(seg, "prompt_job", fake)
    return calls


# --------------------------------------------------------------------------- prompt layers


def test_prompt_layers_are_added_for_the_chosen_image(qtbot, viewer, widget):
    from napari.layers import Points, Shapes

    image = viewer.add_image(_grey((64, 80)), name="img")
    assert widget._image.value is image
    boxes, clicks = viewer.layers["img boxes"], viewer.layers["img clicks"]
    assert isinstance(boxes, Shapes) and boxes.mode == "add_rectangle"
    assert isinstance(clicks, Points) and clicks.mode == "add"
    qtbot.waitUntil(lambda: viewer.layers.selection.active is boxes)  # ready to draw a box
    assert "prompts:" in widget._prompt_info.value
    # choosing the image again does not add a second pair
    widget._image.value = None
    widget._image.value = image
    assert [lay.name for lay in viewer.layers] == ["img", "img boxes", "img clicks"]


def test_drawn_box_produces_the_prediction(qtbot, viewer, widget, prompt_model):
    from busseg.inference import predict
    from busseg.prompts import box_mask

    image = _grey((64, 80), seed=1)
    viewer.add_image(image, name="img")
    viewer.layers["img boxes"].add_rectangles(np.array([[10, 12], [40, 50]]))
    wait_prompt(qtbot, widget)

    pred = viewer.layers["img prediction"]
    expected = predict(image, prompt_model, boxes=[[10, 12, 40, 50]],
                       threshold=widget._threshold.value).mask
    assert expected.any()
    np.testing.assert_array_equal(pred.data, expected.astype(np.uint8))
    assert not pred.data[~box_mask([[10, 12, 40, 50]], (64, 80), 0.1)].any()
    assert "pixel(s) changed" in widget._status.value and "Ctrl+Z" in widget._status.value
    assert 0 < widget.last_prompt_latency < 30
    # prompts stay on top of the prediction; the boxes layer stays active for the next box
    names = [lay.name for lay in viewer.layers]
    assert names.index("img prediction") < names.index("img boxes")
    assert viewer.layers.selection.active is viewer.layers["img boxes"]


def test_moving_and_deleting_a_box_update_the_prediction(qtbot, viewer, widget, monkeypatch):
    _disk_model(monkeypatch)
    viewer.add_image(_grey((64, 80)), name="img")
    boxes = viewer.layers["img boxes"]
    boxes.add_rectangles(np.array([[5, 5], [15, 20]]))
    wait_prompt(qtbot, widget)
    pred = viewer.layers["img prediction"]
    assert pred.data[5:16, 5:21].all() and pred.data.sum() == 11 * 16
    # move it (what a drag in select mode ends with)
    boxes.data = [np.array([[30, 40], [30, 60], [50, 60], [50, 40]], float)]
    wait_prompt(qtbot, widget)
    assert pred.data[30:51, 40:61].all() and pred.data.sum() == 21 * 21
    boxes.selected_data = {0}
    boxes.remove_selected()
    wait_prompt(qtbot, widget)
    assert not pred.data.any()  # deleting the last prompt clears what it produced


def test_click_changes_the_prediction_of_a_run(qtbot, viewer, widget, prompt_model):
    from busseg.inference import predict

    image = _grey((64, 80), seed=2)
    viewer.add_image(image, name="img")
    run(qtbot, widget)
    pred = viewer.layers["img prediction"]
    before = pred.data.copy()

    viewer.layers["img clicks"].add([30, 40])
    wait_prompt(qtbot, widget)
    p = predict(image, prompt_model, points=[[30, 40]], point_labels=[1],
                previous_mask=before > 0, threshold=widget._threshold.value).mask
    from busseg._widgets.segment import prompt_region

    region = prompt_region(before > 0, p, clicks=[[30, 40]])
    expected = np.where(region, p, before > 0).astype(np.uint8)
    np.testing.assert_array_equal(pred.data, expected)
    assert not np.array_equal(pred.data, before)


def test_brush_edit_outside_survives_a_later_click(qtbot, viewer, widget, monkeypatch):
    calls, clicks, pred = _first_click(qtbot, viewer, widget, monkeypatch)
    assert pred.data[20, 20] == 1 and pred.data[20, 27] == 0

    # the user paints a second lesion by hand, far from the click
    pred.brush_size = 7
    pred.selected_label = 1
    pred.paint((50, 65), 1)
    painted = pred.data.copy()
    assert painted[50, 65] == 1

    clicks.add([22, 24])  # a second click on the first lesion
    wait_prompt(qtbot, widget)
    assert len(calls) == 2
    # the network saw the mask with the brush edit as the mask to correct ...
    np.testing.assert_array_equal(calls[1].previous_mask, painted > 0)
    # ... and did not paint it, yet the edit survives: only the clicked lesion changed
    assert pred.data[50, 65] == 1
    np.testing.assert_array_equal(pred.data[40:, 55:], painted[40:, 55:])
    assert pred.data[22, 30] == 1  # the clicked lesion grew


def test_negative_clicks_toggle_modifier_and_colours(qtbot, viewer, widget, monkeypatch):
    _disk_model(monkeypatch)
    viewer.add_image(_grey((64, 80)), name="img")
    clicks = viewer.layers["img clicks"]
    clicks.add([20, 20])
    widget._click_label.value = "background (−)"
    clicks.add([40, 40])
    widget._click_label.value = "lesion (+)"
    widget._on_clicks_press(clicks, SimpleNamespace(modifiers=("Shift",)))  # Shift-click
    clicks.add([50, 60])
    clicks.add([10, 70])
    wait_prompt(qtbot, widget)
    assert clicks.features["label"].tolist() == [1, 0, 0, 1]
    red, green = [1.0, 0.0, 0.0, 1.0], [0.0, 1.0, 0.0, 1.0]
    np.testing.assert_allclose(clicks.face_color, [green, red, red, green])


def test_negative_click_removes_the_lesion_it_is_on(qtbot, viewer, widget, monkeypatch):
    calls, clicks, pred = _first_click(qtbot, viewer, widget, monkeypatch)
    pred.paint((50, 65), 1)  # a brush edit elsewhere
    widget._click_label.value = "background (−)"
    clicks.add([20, 22])
    wait_prompt(qtbot, widget)
    assert calls[-1].point_labels.tolist() == [1, 0]
    # the fake model still paints the positive disk, so the lesion stays; removing the
    # positive click clears it, the brush edit stays
    clicks.selected_data = {0}
    clicks.remove_selected()
    wait_prompt(qtbot, widget)
    assert pred.data[20, 20] == 0 and pred.data[50, 65] == 1


def test_undo_reverts_a_prompt(qtbot, viewer, widget, monkeypatch):
    _, clicks, pred = _first_click(qtbot, viewer, widget, monkeypatch)
    after_first = pred.data.copy()
    clicks.add([40, 60])
    wait_prompt(qtbot, widget)
    assert pred.data[40, 60] == 1
    pred.undo()  # Ctrl+Z on the prediction layer
    np.testing.assert_array_equal(pred.data, after_first)
    pred.redo()
    assert pred.data[40, 60] == 1
    # Ctrl+Z on the clicks layer is bound to the same undo
    assert any(str(k) == "Ctrl+Z" for k in clicks.keymap)
    widget._undo_key(clicks)
    np.testing.assert_array_equal(pred.data, after_first)
    widget._undo_key(clicks)
    assert not pred.data.any()


def test_bad_prompts_give_a_clear_message(qtbot, viewer, widget, monkeypatch):
    calls = _disk_model(monkeypatch)
    viewer.add_image(_grey((64, 80)), name="img")
    viewer.layers["img clicks"].add([100, 20])  # below the image
    wait_prompt(qtbot, widget)
    assert widget._status.value.startswith("⚠ prompt not used: click 0")
    assert "outside the 64x80 image" in widget._status.value
    assert calls == [] and "img prediction" not in viewer.layers
    viewer.layers["img boxes"].add_rectangles(np.array([[-50, -50], [-10, -20]]))
    wait_prompt(qtbot, widget)
    assert "box 0" in widget._status.value and "outside" in widget._status.value


def test_errors_in_the_worker_reach_the_status_line(qtbot, viewer, widget, monkeypatch):
    import busseg._widgets.segment as seg

    def broken(req):
        raise ValueError("the model is broken")

    monkeypatch.setattr(seg, "prompt_job", broken)
    viewer.add_image(_grey((64, 80)), name="img")
    viewer.layers["img clicks"].add([20, 20])
    wait_prompt(qtbot, widget)
    assert widget._status.value == "⚠ prompt not used: the model is broken"


def test_checkpoint_without_prompts_says_so(qtbot, viewer, widget, tiny_checkpoint):
    widget.use_checkpoint(tiny_checkpoint)  # a plain U-Net, one input channel
    assert "takes no box or click prompts" in widget._prompt_info.value
    viewer.add_image(_grey((32, 32)), name="img")
    viewer.layers["img boxes"].add_rectangles(np.array([[2, 2], [20, 20]]))
    wait_prompt(qtbot, widget)
    assert "takes no box or click prompts" in widget._status.value
    assert "img prediction" not in viewer.layers


def test_stack_prompts_act_on_the_current_slice(qtbot, viewer, widget, monkeypatch):
    _disk_model(monkeypatch)
    viewer.add_image(_grey((3, 64, 80)), name="stack")
    viewer.dims.set_current_step(0, 1)
    viewer.layers["stack clicks"].add([1, 30, 30])
    wait_prompt(qtbot, widget)
    pred = viewer.layers["stack prediction"]
    assert pred.data.shape == (3, 64, 80)
    assert pred.data[1, 30, 30] == 1 and not pred.data[0].any() and not pred.data[2].any()
    assert "(slice 1)" in widget._status.value
    viewer.dims.set_current_step(0, 2)
    viewer.layers["stack boxes"].add_rectangles(
        np.array([[2, 5, 5], [2, 5, 10], [2, 10, 10], [2, 10, 5]]))
    wait_prompt(qtbot, widget)
    assert pred.data[2, 5:11, 5:11].all() and pred.data[2].sum() == 36
    assert pred.data[1, 30, 30] == 1  # the other slice is untouched


def test_rapid_prompts_are_coalesced(qtbot, viewer, widget, monkeypatch):
    calls = _disk_model(monkeypatch)
    viewer.add_image(_grey((64, 80)), name="img")
    clicks = viewer.layers["img clicks"]
    for k in range(5):  # faster than the worker: one or two updates, never five
        clicks.add([10 + 8 * k, 20])
    wait_prompt(qtbot, widget)
    assert 1 <= len(calls) <= 2
    assert len(calls[-1].points) == 5  # the last update saw every click
    pred = viewer.layers["img prediction"]
    assert all(pred.data[10 + 8 * k, 20] == 1 for k in range(5))


# --------------------------------------------------------------------------- Run and the combo


def test_class_probabilities_after_run(qtbot, viewer, widget):
    viewer.add_image(_grey((64, 80)), name="img")
    run(qtbot, widget)
    meta = viewer.layers["img prediction"].metadata["busseg"]
    classes = meta["class_proba"]
    assert set(classes) == {"normal", "benign", "malignant"}
    assert sum(classes.values()) == pytest.approx(1.0)
    assert "research output, not a diagnosis" in widget._classes.value
    assert f"benign {classes['benign']:.2f}" in widget._classes.value
    assert meta["gated"] is False


def test_normal_gate_is_reported(qtbot, viewer, widget, tiny_prompt_checkpoint, tmp_path):
    ck = tmp_path / "gated"
    shutil.copytree(tiny_prompt_checkpoint, ck)
    cfg = json.loads((ck / "config.json").read_text())
    # the untrained head says 1/3 normal; this gate fires at P(normal) >= 0.01
    cfg["inference"] = {"threshold": 0.5,
                        "normal_gate": {"p_normal": 0.01, "lesion_confidence": 1.01}}
    (ck / "config.json").write_text(json.dumps(cfg))
    widget.use_checkpoint(ck)
    viewer.add_image(_grey((64, 80)), name="img")
    run(qtbot, widget)
    assert not viewer.layers["img prediction"].data.any()
    assert "normal-scan gate emptied the mask" in widget._status.value
    assert viewer.layers["img prediction"].metadata["busseg"]["gated"] is True


def test_image_combo_picks_the_image_after_opening_a_busi_file(viewer, fake_busi):
    """The reader adds the image, then its ground truth (active): the combo takes the image."""
    path = fake_busi / "benign" / "benign (1).png"
    viewer.open(str(path), plugin="napari-busseg")
    assert type(viewer.layers.selection.active).__name__ == "Labels"
    _, w = viewer.window.add_plugin_dock_widget("napari-busseg", "Segment lesions")
    assert w._image.value is viewer.layers["benign (1)"]
    # and when the widget is open first
    viewer.open(str(fake_busi / "malignant" / "malignant (2).png"), plugin="napari-busseg")
    assert w._image.value is viewer.layers["malignant (2)"]


def test_selecting_a_derived_layer_selects_its_image(viewer, widget):
    a = viewer.add_image(_grey((16, 16)), name="a")
    viewer.add_image(_grey((16, 16)), name="b")
    assert widget._image.value is viewer.layers["b"]
    viewer.add_labels(np.zeros((16, 16), np.uint8), name="a ground truth")
    viewer.layers.selection.active = viewer.layers["a ground truth"]
    assert widget._image.value is a


def test_status_lines_wrap(widget):
    for lab in (widget._status, widget._metrics, widget._classes, widget._prompt_info):
        assert lab.native.wordWrap()
        assert lab.native.minimumWidth() <= 200


# --------------------------------------------------------------------------- Qt-free parts


def test_prompt_region_boxes_and_clicks():
    from busseg._widgets.segment import prompt_region

    old = np.zeros((40, 40), bool)
    old[5:10, 5:10] = True  # lesion A
    old[30:35, 30:35] = True  # brush edit B
    new = np.zeros((40, 40), bool)
    new[4:12, 4:12] = True  # A grown
    r = prompt_region(old, new, clicks=[[7, 7]])
    assert r[4:12, 4:12].all() and not r[30:35, 30:35].any()
    # a click on background that creates nothing changes nothing
    assert not prompt_region(old, old, clicks=[[20, 20]]).any()
    # boxes: the box grown by the margin (10 % of 10 px = 1 px)
    r = prompt_region(old, new, boxes=[[10, 10, 19, 19]])
    assert r[9:21, 9:21].all() and r.sum() == 12 * 12
    # clicks outside the image are ignored
    assert not prompt_region(old, new, clicks=[[-5, 100]]).any()
    with pytest.raises(ValueError, match="differ in shape"):
        prompt_region(old, new[:-1])


def test_prompt_job_runs_without_qt(tiny_prompt_checkpoint, prompt_model):
    from busseg._widgets.segment import PromptRequest, prompt_job
    from busseg.inference import predict

    image = _grey((2, 48, 56), seed=4)
    req = PromptRequest(
        data=image, index=(1,), boxes=np.array([[5.0, 6.0, 30.0, 40.0]]),
        points=np.zeros((0, 2)), point_labels=np.zeros(0, np.int8), previous_mask=None,
        changed_boxes=np.array([[5.0, 6.0, 30.0, 40.0]]), changed_clicks=np.zeros((0, 2)),
        checkpoint=tiny_prompt_checkpoint, device="cpu", threshold=0.5,
    )
    res = prompt_job(req)
    np.testing.assert_array_equal(
        res.mask, predict(image[1], prompt_model, boxes=req.boxes, threshold=0.5).mask)
    empty = prompt_job(PromptRequest(**{**req.__dict__, "boxes": np.zeros((0, 4))}))
    assert not empty.mask.any() and empty.mask.shape == (48, 56)


# --------------------------------------------------------------------------- Dice follows prompts


def test_dice_row_follows_a_box_and_a_click(qtbot, viewer, widget, monkeypatch):
    """After a prompt the Dice row is the prompted mask's, not the automatic one's."""
    from busseg.metrics import dice_score

    _disk_model(monkeypatch)
    viewer.add_image(_grey((64, 80)), name="img")
    truth = np.zeros((64, 80), np.uint8)
    truth[5:16, 5:21] = 1
    viewer.add_labels(truth, name="img ground truth")
    viewer.add_labels(np.zeros((64, 80), np.uint8), name="img prediction")
    widget._metrics.value = "Dice 0.019, IoU 0.010"  # what the automatic mask showed
    viewer.layers["img boxes"].add_rectangles(np.array([[5, 5], [15, 20]]))
    wait_prompt(qtbot, widget)
    assert widget._metrics.value == "Dice 1.000, IoU 1.000"
    assert widget.last_metrics["dice"] == pytest.approx(1.0)
    viewer.layers["img clicks"].add([40, 60])  # outside the box: ignored, Dice unchanged
    wait_prompt(qtbot, widget)
    assert widget._metrics.value == "Dice 1.000, IoU 1.000"
    viewer.layers["img boxes"].data = []  # no prompt left: the box's mask is cleared
    wait_prompt(qtbot, widget)
    pred = np.asarray(viewer.layers["img prediction"].data)
    # a click outside the (now absent) box draws a disk; Dice follows whatever is there
    assert widget.last_metrics["dice"] == pytest.approx(dice_score(pred, truth))
    assert widget._metrics.value.startswith(f"Dice {dice_score(pred, truth):.3f}")


def test_dice_row_follows_a_prompt_on_a_stack_slice(qtbot, viewer, widget, monkeypatch):
    _disk_model(monkeypatch)
    viewer.add_image(_grey((3, 40, 40)), name="st")
    truth = np.zeros((3, 40, 40), np.uint8)
    truth[1, 10:21, 10:21] = 1
    viewer.add_labels(truth, name="st ground truth")
    viewer.dims.set_current_step(0, 1)
    viewer.layers["st boxes"].add_rectangles(
        np.array([[1, 10, 10], [1, 10, 20], [1, 20, 20], [1, 20, 10]]))
    wait_prompt(qtbot, widget)
    assert widget._metrics.value == "slice 1: Dice 1.000, IoU 1.000"
    assert widget.last_metrics["slice"] == (1,)


# --------------------------------------------------------------------------- keyboard actions


def test_set_prompt_mode_selects_the_layer_in_add_mode(qtbot, viewer, widget):
    image = viewer.add_image(_grey((32, 32)), name="img")
    boxes, clicks = viewer.layers["img boxes"], viewer.layers["img clicks"]
    boxes.mode = clicks.mode = "pan_zoom"
    assert widget.set_prompt_mode("click") is clicks
    assert viewer.layers.selection.active is clicks and clicks.mode == "add"
    assert widget.set_prompt_mode("box") is boxes
    assert viewer.layers.selection.active is boxes and boxes.mode == "add_rectangle"
    assert widget.set_prompt_mode("off") is image  # no prediction yet: the image
    assert boxes.mode == clicks.mode == "pan_zoom"
    pred = viewer.add_labels(np.zeros((32, 32), np.uint8), name="img prediction")
    assert widget.set_prompt_mode("off") is pred
    with pytest.raises(ValueError, match="box, click, off"):
        widget.set_prompt_mode("brush")


def test_set_prompt_mode_adds_missing_prompt_layers(qtbot, viewer, widget):
    viewer.add_image(_grey((32, 32)), name="img")
    viewer.layers.remove("img boxes")
    viewer.layers.remove("img clicks")
    clicks = widget.set_prompt_mode("click")
    assert clicks.name == "img clicks" and "img boxes" in viewer.layers
    qtbot.wait(50)  # no delayed activation of the new boxes layer takes the selection away
    assert viewer.layers.selection.active is clicks


def test_set_prompt_mode_without_an_image(viewer, widget):
    assert widget.set_prompt_mode("box") is None
    assert "Image layer first" in widget._status.value


def test_toggle_click_label_switches_new_clicks(qtbot, viewer, widget, monkeypatch):
    from busseg._widgets.segment import BACKGROUND_CLICK, LESION_CLICK

    _disk_model(monkeypatch)
    viewer.add_image(_grey((64, 80)), name="img")
    assert widget.toggle_click_label() == 0
    assert widget._click_label.value == BACKGROUND_CLICK
    clicks = viewer.layers["img clicks"]
    clicks.add([20, 20])
    wait_prompt(qtbot, widget)
    assert list(clicks.features["label"]) == [0]
    assert widget.toggle_click_label() == 1
    assert widget._click_label.value == LESION_CLICK
    clicks.add([40, 40])
    wait_prompt(qtbot, widget)
    assert list(clicks.features["label"]) == [0, 1]


def test_clear_mask_empties_the_shown_slice_undoably(qtbot, viewer, widget):
    viewer.add_image(_grey((2, 20, 20)), name="st")
    data = np.zeros((2, 20, 20), np.uint8)
    data[:, 5:10, 5:10] = 1
    pred = viewer.add_labels(data.copy(), name="st prediction")
    truth = np.zeros_like(data)
    viewer.add_labels(truth, name="st ground truth")
    viewer.dims.set_current_step(0, 1)
    assert widget.clear_mask() is pred
    assert not pred.data[1].any() and pred.data[0].sum() == 25  # only the shown slice
    assert "cleared 25 pixel(s)" in widget._status.value
    assert widget._metrics.value.startswith("slice 1: Dice 1.000")  # both empty
    pred.undo()
    np.testing.assert_array_equal(pred.data, data)


def test_clear_mask_without_a_prediction_adds_an_empty_one(viewer, widget):
    viewer.add_image(_grey((20, 20)), name="img")
    layer = widget.clear_mask()
    assert layer.name == "img prediction" and not layer.data.any()
    assert layer.metadata["busseg"]["written_sha1"] is None  # the user's answer: "edited"
    # (the widget gets napari's proxy of the viewer: compare names, not identities)
    assert widget.clear_mask().name == layer.name
    assert [lay.name for lay in viewer.layers].count("img prediction") == 1
    assert "cleared 0 pixel(s)" in widget._status.value


def test_segment_action_runs_like_the_run_button(qtbot, viewer, widget):
    assert widget.segment() is False and "Image layer" in widget._status.value
    viewer.add_image(_grey((32, 32)), name="img")
    assert widget.segment() is True
    qtbot.waitUntil(lambda: not widget.running, timeout=TIMEOUT_MS)
    assert "img prediction" in viewer.layers and widget.last_result is not None


def test_rows_scroll_instead_of_being_squashed(viewer, widget):
    """A short dock scrolls; the wrapped rows keep their height (they were clipped once)."""
    from qtpy.QtWidgets import QScrollArea

    scroll = widget.native.findChild(QScrollArea, "busseg_segment_scroll")
    assert scroll is not None and scroll.widget() is widget._form.native
    assert scroll.minimumHeight() <= 150
    widget._status.value = "a long status line " * 12
    assert widget._status.native.toolTip() == widget._status.value
    assert widget._status.native.wordWrap()
