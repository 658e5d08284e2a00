"""The "Segment lesions" dock widget, loaded through the napari manifest (needs a display)."""

from __future__ import annotations

import csv

import numpy as np
import pytest

from busseg.settings import InferenceSettings

pytest.importorskip("napari")
pytest.importorskip("pytestqt")

pytestmark = pytest.mark.gui

TIMEOUT_MS = 60_000


@pytest.fixture
def widget(open_segment, tiny_checkpoint):
    return open_segment(tiny_checkpoint)


def run(qtbot, w):
    """Click Run and wait until the worker has finished."""
    w._run_btn.native.click()
    qtbot.waitUntil(lambda: not w.running, timeout=TIMEOUT_MS)


def _grey(shape, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)


def test_manifest_widget_is_a_segment_widget(widget, tiny_checkpoint):
    from busseg._widgets.segment import SegmentWidget

    assert isinstance(widget, SegmentWidget)
    assert widget.current_checkpoint() == tiny_checkpoint
    # the threshold comes from the checkpoint's config
    assert widget._threshold.value == pytest.approx(0.5)


def test_use_checkpoint_accepts_a_file_inside_the_folder(widget, tiny_checkpoint):
    widget.use_checkpoint(tiny_checkpoint / "model.safetensors")
    assert widget.current_checkpoint() == tiny_checkpoint
    assert "input 32×32" in widget._model_info.value
    widget.use_checkpoint(None)
    assert widget.current_checkpoint() is None


def test_segment_real_busi_test_image(qtbot, viewer, widget, tiny_model, busi_root, repo_root):
    from busseg.data.io import read_image, read_mask
    from busseg.inference import predict_mask
    from busseg.metrics import dice_score, iou_score

    rows = list(csv.DictReader(open(repo_root / "training" / "splits" / "busi.csv")))
    rel = next(r["image"] for r in rows if r["split"] == "test" and r["label"] == "benign")
    path = busi_root / rel
    name = path.stem
    image = read_image(path)
    truth = read_mask(sorted(path.parent.glob(f"{name}_mask*.png")))
    viewer.add_image(image, name=name)
    viewer.add_labels(truth.astype(np.uint8), name=f"{name} ground truth")
    widget._image.value = viewer.layers[name]
    run(qtbot, widget)

    pred = viewer.layers[f"{name} prediction"]
    assert type(pred).__name__ == "Labels"
    assert pred.data.shape == image.shape and pred.data.dtype == np.uint8
    expected = predict_mask(image, tiny_model, threshold=widget._threshold.value)
    np.testing.assert_array_equal(pred.data, expected.astype(np.uint8))
    # Dice and IoU against the ground-truth layer are shown
    assert widget.last_metrics["dice"] == pytest.approx(dice_score(expected, truth))
    assert widget.last_metrics["iou"] == pytest.approx(iou_score(expected, truth))
    assert f"Dice {dice_score(expected, truth):.3f}" in widget._metrics.value


@pytest.mark.parametrize("channels", [3, 4])
def test_rgb_and_rgba_layers(qtbot, viewer, widget, tiny_model, channels):
    from busseg.inference import predict_mask

    rgb = _grey((40, 48, channels), seed=channels)
    if channels == 4:
        rgb[..., 3] = 255
    layer = viewer.add_image(rgb, name="colour", rgb=True)
    widget._image.value = layer
    widget._with_proba.value = True
    run(qtbot, widget)

    pred = viewer.layers["colour prediction"]
    assert pred.data.shape == (40, 48)
    np.testing.assert_array_equal(pred.data, predict_mask(rgb, tiny_model).astype(np.uint8))
    prob = viewer.layers["colour probability"]
    assert prob.data.shape == (40, 48) and prob.data.dtype == np.float32
    assert prob.colormap.name == "magma" and prob.opacity == pytest.approx(0.5)
    assert 0.0 <= prob.data.min() and prob.data.max() <= 1.0
    # the prediction stays on top and active, ready to be painted
    assert viewer.layers.index(pred) > viewer.layers.index(prob)


@pytest.mark.parametrize(
    "shape,rgb", [((4, 40, 48), False), ((2, 3, 32, 36), False), ((3, 40, 48, 3), True)]
)
def test_stack_is_segmented_slice_by_slice(qtbot, viewer, widget, tiny_model, shape, rgb):
    from busseg.inference import predict_mask

    data = _grey(shape, seed=1)
    spatial = shape[:-1] if rgb else shape
    scale = (2.0,) + (1.0,) * (len(spatial) - 1)
    layer = viewer.add_image(data, name="stack", rgb=rgb, scale=scale)
    widget._image.value = layer
    run(qtbot, widget)

    pred = viewer.layers["stack prediction"]
    assert pred.data.shape == spatial
    assert tuple(pred.scale) == scale
    n = int(np.prod(spatial[:-2]))
    assert widget._progress.value == n and widget._progress.max == n
    for idx in np.ndindex(*spatial[:-2]):
        np.testing.assert_array_equal(pred.data[idx], predict_mask(data[idx], tiny_model))


def test_stack_dice_is_the_mean_over_slices(qtbot, viewer, widget, tiny_model):
    from busseg.inference import predict_mask

    data = _grey((3, 32, 32), seed=2)
    viewer.add_image(data, name="vol")
    expected = np.stack([predict_mask(s, tiny_model) for s in data]).astype(np.uint8)
    viewer.add_labels(expected.copy(), name="vol ground truth")
    widget._image.value = viewer.layers["vol"]
    run(qtbot, widget)
    assert widget.last_metrics == {"dice": 1.0, "iou": 1.0, "ground_truth": "vol ground truth"}
    assert "mean over 3 slices: Dice 1.000, IoU 1.000" in widget._metrics.value


def test_no_metrics_without_ground_truth(qtbot, viewer, widget):
    viewer.add_image(_grey((32, 32)), name="img")
    widget._image.value = viewer.layers["img"]
    run(qtbot, widget)
    assert widget.last_metrics is None and widget._metrics.value == ""
    assert widget._status.value.startswith("wrote “img prediction”")


def test_postprocessing_settings_are_applied(qtbot, viewer, widget, tiny_model):
    from busseg.inference import predict_mask

    image = _grey((48, 48), seed=5)
    viewer.add_image(image, name="img")
    widget._image.value = viewer.layers["img"]
    widget._threshold.value = 0.3
    widget._fill_holes.value = True
    widget._keep.value = "largest"
    widget._min_area.value = 4
    run(qtbot, widget)
    expected = predict_mask(
        image, tiny_model, threshold=0.3, fill_holes=True, keep="largest", min_area=4
    )
    np.testing.assert_array_equal(viewer.layers["img prediction"].data, expected)


def test_unedited_prediction_is_replaced_without_asking(qtbot, viewer, widget):
    viewer.add_image(_grey((32, 32)), name="img")
    widget._image.value = viewer.layers["img"]
    asked = []
    widget.ask_overwrite = lambda name: asked.append(name) or "cancel"
    run(qtbot, widget)
    first = viewer.layers["img prediction"]
    widget._threshold.value = 0.9  # a different prediction
    run(qtbot, widget)
    assert asked == []
    assert viewer.layers["img prediction"] is first
    # one prediction layer, below the prompt layers the widget added for the image
    assert [lay.name for lay in viewer.layers] == ["img", "img prediction", "img boxes",
                                                   "img clicks"]


@pytest.mark.parametrize("answer", ["new layer", "replace", "cancel"])
def test_edited_prediction_is_never_overwritten_silently(qtbot, viewer, widget, answer):
    viewer.add_image(_grey((32, 32)), name="img")
    widget._image.value = viewer.layers["img"]
    run(qtbot, widget)
    layer = viewer.layers["img prediction"]
    layer.data = np.where(np.arange(32)[:, None] < 8, 1, layer.data).astype(np.uint8)  # an edit
    edited = layer.data.copy()

    asked = []
    widget.ask_overwrite = lambda name: asked.append(name) or answer
    widget._threshold.value = 0.05
    run(qtbot, widget)

    assert asked == ["img prediction"]
    if answer == "new layer":
        np.testing.assert_array_equal(layer.data, edited)
        new = viewer.layers["img prediction [2]"]
        np.testing.assert_array_equal(new.data, widget.last_result.labels)
    elif answer == "replace":
        assert "img prediction [2]" not in viewer.layers
        np.testing.assert_array_equal(layer.data, widget.last_result.labels)
    else:
        assert "img prediction [2]" not in viewer.layers
        np.testing.assert_array_equal(layer.data, edited)
        assert "cancelled" in widget._status.value


def test_painting_counts_as_an_edit(qtbot, viewer, widget):
    viewer.add_image(_grey((32, 32)), name="img")
    widget._image.value = viewer.layers["img"]
    run(qtbot, widget)
    layer = viewer.layers["img prediction"]
    layer.brush_size = 5
    layer.paint((16, 16), 1 - int(layer.data[16, 16]))
    asked = []
    widget.ask_overwrite = lambda name: asked.append(name) or "new layer"
    run(qtbot, widget)
    assert asked == ["img prediction"]
    assert "img prediction [2]" in viewer.layers


def test_cancel_stops_between_slices(qtbot, viewer, widget, monkeypatch):
    import busseg.jobs as seg

    calls = []
    read = seg._read_slice

    def slow_read(data, index):
        calls.append(index)
        if len(calls) == 3:
            widget._worker.quit()  # what Cancel does; thread-safe (sets a flag)
        return read(data, index)

    monkeypatch.setattr(seg, "_read_slice", slow_read)
    viewer.add_image(_grey((30, 32, 32)), name="stack")
    widget._image.value = viewer.layers["stack"]
    run(qtbot, widget)
    assert len(calls) <= 4  # stopped right after the slice in progress
    assert "stack prediction" not in viewer.layers
    assert widget._status.value == "cancelled; nothing was written"
    assert widget._run_btn.enabled and not widget._cancel_btn.enabled


def test_cancel_button(qtbot, viewer, widget):
    viewer.add_image(_grey((20, 32, 32)), name="stack")
    widget._image.value = viewer.layers["stack"]
    widget._run_btn.native.click()
    widget._cancel_btn.native.click()  # before the first slice is done
    qtbot.waitUntil(lambda: not widget.running, timeout=TIMEOUT_MS)
    assert "stack prediction" not in viewer.layers
    assert "cancelled" in widget._status.value


def test_errors_are_shown_not_raised(qtbot, viewer, widget, tmp_path):
    viewer.add_image(_grey((32, 32)), name="img")
    widget._image.value = viewer.layers["img"]
    widget.use_checkpoint(tmp_path / "missing")
    run(qtbot, widget)
    assert widget._status.value.startswith("error:")
    assert "does not exist" in widget._status.value
    assert "img prediction" not in viewer.layers


def test_run_without_image_says_what_to_do(widget):
    widget._run_btn.native.click()
    assert not widget.running
    assert "Image layer" in widget._status.value


def test_image_choices_follow_the_layer_list(viewer, widget):
    def names():
        return [c.name for c in widget._image.choices if c is not None]

    assert names() == []
    viewer.add_labels(np.zeros((8, 8), np.uint8), name="labels")
    viewer.add_image(_grey((8, 8)), name="a")
    assert names() == ["a"]
    assert widget._image.value is viewer.layers["a"]


def test_segment_job_runs_without_qt(tiny_checkpoint, tiny_model):
    """The job generator is plain Python: drain it like a script would."""
    from busseg._widgets.segment import segment_job
    from busseg.engine import drain
    from busseg.inference import predict_proba

    image = _grey((2, 40, 44), seed=3)
    events = []
    res = drain(
        segment_job(image, rgb=False, checkpoint=tiny_checkpoint, device="cpu", with_proba=True),
        events.append,
    )
    assert events[0][0] == "status" and events[-1] == ("progress", 2, 2)
    assert res.labels.shape == (2, 40, 44) and res.labels.dtype == np.uint8
    np.testing.assert_allclose(res.proba[1], predict_proba(image[1], tiny_model), atol=1e-6)


def test_find_segment_widget(viewer, widget):
    from busseg._widgets.segment import find_segment_widget

    assert find_segment_widget(viewer) is widget


def test_padded_stack_from_the_folder_reader_is_cropped(qtbot, viewer, widget, tiny_model):
    """Slices of the folder reader's stacks are zero-padded; only the image part is segmented."""
    from busseg.inference import predict_mask

    data = np.zeros((2, 40, 44), np.uint8)
    a, b = _grey((30, 36), seed=7), _grey((40, 44), seed=8)
    data[0, :30, :36], data[1] = a, b
    meta = {"busseg": {"kind": "stack", "slices": [
        {"name": "a", "original_shape": [30, 36]}, {"name": "b", "original_shape": [40, 44]}]}}
    viewer.add_image(data, name="folder", metadata=meta)
    widget._image.value = viewer.layers["folder"]
    run(qtbot, widget)
    pred = viewer.layers["folder prediction"].data
    np.testing.assert_array_equal(pred[0, :30, :36], predict_mask(a, tiny_model))
    assert not pred[0, 30:].any() and not pred[0, :, 36:].any()
    np.testing.assert_array_equal(pred[1], predict_mask(b, tiny_model))


def test_model_line_tells_shipped_default_from_a_fine_tune(widget, tiny_checkpoint, tmp_path):
    import json
    import shutil

    from busseg.models import default_checkpoint_path

    widget.use_checkpoint(default_checkpoint_path())  # trained by train.py, test metrics in it
    assert "BUSI test Dice 0." in widget._model_info.value
    assert "fine-tuned" not in widget._model_info.value
    ft = tmp_path / "ft"
    shutil.copytree(tiny_checkpoint, ft)
    cfg = json.loads((ft / "config.json").read_text())
    cfg["training"] = {"kind": "fine-tune"}
    cfg["lineage"] = {"base_model": str(tiny_checkpoint), "pairs": ["a", "b", "c"]}
    cfg["metrics"] = {"heldout_dice_after": 0.5}
    (ft / "config.json").write_text(json.dumps(cfg))
    widget.use_checkpoint(ft)
    assert "fine-tuned on 3 pair(s), held-out Dice 0.500" in widget._model_info.value


def test_expert_settings_fold_away_and_the_viewer_state_follows(make_napari_viewer, qtbot,
                                                                tiny_checkpoint):
    from busseg.state import viewer_state

    viewer = make_napari_viewer(show=True)
    _, widget = viewer.window.add_plugin_dock_widget("napari-busseg", "Segment lesions")
    widget.use_checkpoint(tiny_checkpoint)

    from qtpy.QtWidgets import QApplication, QScrollArea

    assert not widget.expert_settings_open  # closed by default: the annotator's rows first
    assert widget._expert_section.isAncestorOf(widget._threshold.native)
    scroll = widget.native.findChild(QScrollArea, "busseg_segment_scroll")
    folded = scroll.maximumHeight()  # no taller than its rows: the dock below gets the rest
    widget.set_expert_settings_open(True)
    QApplication.processEvents()
    assert widget.expert_settings_open
    assert scroll.maximumHeight() > folded  # unfolded rows get their room
    unfolded = scroll.maximumHeight()
    widget.set_expert_settings_open(False)
    qtbot.waitUntil(lambda: scroll.maximumHeight() < unfolded, timeout=5_000)
    folded = scroll.maximumHeight()
    widget._expert_section.toggleButton().click()  # as the annotator does: animated
    qtbot.waitUntil(lambda: scroll.maximumHeight() > folded + 50, timeout=5_000)
    state = viewer_state(viewer)
    assert state.checkpoint == tiny_checkpoint  # the checkpoint in use is the viewer's
    widget._threshold.value = 0.3
    assert state.settings.threshold == pytest.approx(0.3)
    assert isinstance(state.settings, InferenceSettings)  # no checkpoint, no output choice
    assert not hasattr(state.settings, "checkpoint") and not hasattr(state.settings, "with_proba")
    state.checkpoint = None  # adopted elsewhere (fine-tune, learning as you go)
    assert widget.current_checkpoint() is None
    assert state.perform("toggle_click_label") in (0, 1)  # the keyboard actions it offers
