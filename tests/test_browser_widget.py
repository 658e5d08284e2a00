"""The Scan browser dock widget, loaded through the manifest (GUI; needs Xvfb)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from busseg._widgets import browser as browser_mod
from busseg.data.busi import discover_busi
from busseg.data.io import read_image, read_mask

pytestmark = pytest.mark.gui


@pytest.fixture
def notes(monkeypatch):
    seen: list[tuple[str, str]] = []
    for kind in ("info", "warning", "error"):
        monkeypatch.setattr(
            browser_mod, f"notify_{kind}", lambda msg, kind=kind: seen.append((kind, msg))
        )
    return seen


def _dock(viewer, *, predict=False, learn=False):
    """Dock the Scan browser; "Predict on open" and "Learn as you go" (both on by default)
    off unless asked for.

    Tests of other behaviour switch them off so that no background prediction adds layers
    while they count layers or add their own prediction layers, and no background fine-tune
    starts after ten saved corrections.
    """
    _, widget = viewer.window.add_plugin_dock_widget("napari-busseg", "Scan browser")
    assert isinstance(widget, browser_mod.BusiBrowserWidget)
    widget._predict_check.value = predict
    widget._learn_check.value = learn
    return widget


def test_predict_on_open_is_on_and_site_finetunes_off_by_default(make_napari_viewer,
                                                                  busseg_plugin):
    viewer = make_napari_viewer()
    _, widget = viewer.window.add_plugin_dock_widget("napari-busseg", "Scan browser")
    assert not widget._learn_check.value and widget._predict_check.value


def _closed(qtbot, widget):
    """Wait until the hidden layers of the case left last are removed (a moment after Next)."""
    qtbot.waitUntil(lambda: not widget.closing_pending, timeout=10_000)


def _settle(qtbot, widget, timeout=60_000):
    """Wait until no prediction or prefetch of the browser runs (before the viewer closes)."""
    qtbot.waitUntil(lambda: not widget.prefetch_running and not widget.predicting,
                    timeout=timeout)


@pytest.fixture
def browser(make_napari_viewer, notes, busseg_plugin):
    viewer = make_napari_viewer()
    return viewer, _dock(viewer)


def _names(viewer, visible_only=False):
    return [layer.name for layer in viewer.layers if layer.visible or not visible_only]


def test_open_next_and_save_corrections(browser, notes, fake_busi, tmp_path, qtbot):
    viewer, widget = browser
    widget.set_root(fake_busi)
    assert len(widget.records) == 6
    assert list(widget._class_combo.choices) == ["all", "benign", "malignant", "normal"]
    widget.set_class_filter("benign")
    assert [r.name for r in widget.records] == ["benign (1)", "benign (2)", "benign (3)"]

    widget.select(0)
    widget.open_current()
    assert _names(viewer) == ["benign (1)", "benign (1) ground truth"]
    image, truth = viewer.layers["benign (1)"], viewer.layers["benign (1) ground truth"]
    widget.next_case()
    assert widget.current_record().name == "benign (2)"
    # the case left's layers are reused: the same layer objects hold the new case
    assert _names(viewer, visible_only=True) == ["benign (2)", "benign (2) ground truth"]
    assert viewer.layers["benign (2)"] is image
    assert viewer.layers["benign (2) ground truth"] is truth
    rec2 = widget.current_record()
    np.testing.assert_array_equal(image.data, read_image(rec2.image_path))
    np.testing.assert_array_equal(truth.data, read_mask(rec2.mask_paths))
    assert image.metadata["busseg"]["name"] == "benign (2)"
    assert truth.metadata["busseg"]["source"] == str(rec2.image_path)
    _closed(qtbot, widget)
    assert _names(viewer) == ["benign (2)", "benign (2) ground truth"]

    # the user's (corrected) prediction layer, as the segment widget names it
    rec = widget.current_record()
    mask = read_mask(rec.mask_paths)
    layer = viewer.add_labels(mask.astype(np.uint8), name="benign (2) prediction")
    assert widget.status_of(rec) == "predicted"
    assert "[predicted]" in widget._cases.native.item(1).text()

    # refuses a corrections folder inside the dataset, writes nothing there
    widget.set_corrections(fake_busi / "benign" / "corrections")
    assert widget.save_correction() is None
    assert notes[-1][0] == "error" and "outside the dataset" in notes[-1][1]
    assert not (fake_busi / "benign" / "corrections").exists()

    corr = tmp_path / "corrections"
    widget.set_corrections(corr)
    saved = widget.save_correction()
    assert saved == corr / "benign" / "benign (2)_mask.png"
    np.testing.assert_array_equal(read_mask(saved), mask)
    np.testing.assert_array_equal(
        read_image(corr / "benign" / "benign (2).png"), read_image(rec.image_path)
    )
    assert widget.status_of(rec) == "corrected"
    assert "[corrected]" in widget._cases.native.item(1).text()
    assert widget._progress_label.value == "1 of 6 recorded"
    assert [r.rel_path for r in discover_busi(corr).usable] == ["benign/benign (2).png"]

    # saving again keeps the earlier correction as a version (no question asked)
    layer.data = np.zeros_like(layer.data)
    assert widget.save_correction() == saved
    assert not read_mask(saved).any()
    version = corr / "versions" / "benign" / "benign (2)_mask.v1.png"
    np.testing.assert_array_equal(read_mask(version), mask)
    assert "kept as benign (2)_mask.v1.png" in notes[-1][1]

    # Previous/Next stop at the ends of the list
    widget.previous_case()
    widget.previous_case()
    assert widget.current_record().name == "benign (1)"
    assert notes[-1] == ("info", "That was the first case.")
    _closed(qtbot, widget)
    assert _names(viewer) == ["benign (1)", "benign (1) ground truth"]


def test_predict_on_open_never_replaces_a_prediction(
    browser, notes, fake_busi, tiny_checkpoint, qtbot
):
    viewer, widget = browser
    widget.set_root(fake_busi)
    _predict_on_open(widget, tiny_checkpoint)
    widget.select(0)
    widget.open_current()
    qtbot.waitUntil(lambda: "benign (1) prediction" in _names(viewer), timeout=60_000)
    pred = viewer.layers["benign (1) prediction"]
    assert pred.data.shape == viewer.layers["benign (1)"].data.shape
    assert pred.metadata["busseg"]["name"] == "benign (1)"

    pred.data = np.full_like(pred.data, 1)  # the user's edit
    widget.open_current()  # opening again keeps the edited layer
    qtbot.wait(50)
    assert (viewer.layers["benign (1) prediction"].data == 1).all()
    assert any("kept" in msg for _, msg in notes)
    assert not [n for n in notes if n[0] == "error"]
    _settle(qtbot, widget)


def test_uses_the_folder_the_reader_opened(make_napari_viewer, notes, fake_busi, busseg_plugin,
                                           qtbot):
    viewer = make_napari_viewer()
    viewer.open(str(fake_busi / "malignant"), plugin="napari-busseg")
    widget = _dock(viewer)
    _settle(qtbot, widget)  # the selected case was prefetched (predict on open is the default)
    assert widget.root == fake_busi
    assert len(widget.records) == 6
    assert widget._cases.native.count() == 6  # docking did not clear the list
    empty = fake_busi.parent.parent / "empty"
    empty.mkdir()
    widget.set_root(empty)  # no scans: said in the widget, no traceback
    assert widget.records == [] and widget.root is None
    assert "No scans to browse" in widget._status.value


# --------------------------------------------------------------------------- uncertainty ranking


def _other_checkpoint(path, seed=1):
    import torch

    from busseg.models import build_model, save_checkpoint

    torch.manual_seed(seed)
    model = build_model({"base_channels": 4, "depth": 2})
    config = {"preprocessing": {"input_size": [32, 32], "grey": True, "normalize": "zscore"}}
    return save_checkpoint(path, model, config)


def _expected_scores(records, checkpoint):
    from busseg.uncertainty import rank

    ranking = rank([r.image_path for r in records], checkpoint, cache=False)
    return {str(e.path): e.score for e in ranking.entries}


def _ranked(widget, n):
    return not widget.ranking_running and sum(
        widget.score_of(r) is not None for r in widget._all
    ) == n


def test_sort_by_uncertainty_scores_and_next_suggested(
    browser, notes, fake_busi, tiny_checkpoint, tmp_path, qtbot
):
    from busseg.uncertainty import default_cache

    default_cache().clear()
    viewer, widget = browser
    widget.set_root(fake_busi)
    widget._model_edit.value = tiny_checkpoint  # no Segment lesions widget: the browser's model
    assert widget.score_of(widget.records[0]) is None
    widget.set_sort("uncertainty")  # without scores, sorting by uncertainty ranks first
    qtbot.waitUntil(lambda: _ranked(widget, 6), timeout=60_000)

    expected = _expected_scores(widget._all, tiny_checkpoint)
    assert {str(r.image_path): widget.score_of(r) for r in widget._all} == pytest.approx(expected)
    order = [r.name for r in widget.records]
    by_score = sorted(widget._all, key=lambda r: -expected[str(r.image_path)])
    assert order == [r.name for r in by_score]
    texts = [widget._cases.native.item(i).text() for i in range(6)]
    for rec, text in zip(widget.records, texts, strict=True):
        assert text == f"{rec.name}  u={expected[str(rec.image_path)]:.2f}"
    assert "Ranked 6 cases" in widget._status.value

    widget.set_sort("name")
    assert [r.name for r in widget.records][:3] == ["benign (1)", "benign (2)", "benign (3)"]
    widget.set_sort("uncertainty")

    # correct the most uncertain case; Next suggested then opens the second one
    top, second, third = by_score[:3]
    widget.set_corrections(tmp_path / "corrections")
    widget.select(0)
    widget.open_current()
    viewer.add_labels(np.zeros(viewer.layers[top.name].data.shape, np.uint8),
                      name=f"{top.name} prediction")
    assert widget.save_correction() is not None
    assert "[corrected]" in widget._cases.native.item(0).text()
    assert widget.next_suggested() == second
    assert widget.current_record() == second
    _closed(qtbot, widget)
    assert second.name in _names(viewer) and top.name not in _names(viewer)  # closed
    assert widget.next_suggested() == third  # the selected case is skipped: moves on
    # the class filter applies: only malignant cases are suggested then
    widget.set_class_filter("malignant")
    rec = widget.next_suggested()
    assert rec.label == "malignant"
    assert not [n for n in notes if n[0] == "error"]


def test_reranks_when_segment_widget_switches_checkpoint(
    make_napari_viewer, notes, busseg_plugin, fake_busi, tiny_checkpoint, tmp_path, qtbot
):
    from busseg.uncertainty import default_cache

    default_cache().clear()
    viewer = make_napari_viewer()
    seg, widget = _dock_with_segment(viewer, tiny_checkpoint)
    widget._model_edit.value = tmp_path  # ignored: the Segment lesions widget's checkpoint wins
    widget.set_root(fake_busi)
    assert widget.ranking_checkpoint() == tiny_checkpoint
    assert widget.rank()
    qtbot.waitUntil(lambda: _ranked(widget, 6), timeout=60_000)
    first_key = widget._ranked_key
    first = {str(r.image_path): widget.score_of(r) for r in widget._all}

    other = _other_checkpoint(tmp_path / "other")
    seg.use_checkpoint(other)  # no click in the browser: it notices and ranks again
    qtbot.waitUntil(lambda: widget._ranked_key not in (None, first_key) and _ranked(widget, 6),
                    timeout=60_000)
    second = {str(r.image_path): widget.score_of(r) for r in widget._all}
    assert second == pytest.approx(_expected_scores(widget._all, other))
    assert second != first
    assert "(0 from the cache)" in widget._status.value

    seg.use_checkpoint(tiny_checkpoint)  # back: every score comes from the cache
    qtbot.waitUntil(lambda: widget._ranked_key == first_key and _ranked(widget, 6),
                    timeout=60_000)
    qtbot.waitUntil(lambda: "(6 from the cache)" in widget._status.value, timeout=10_000)
    assert {str(r.image_path): widget.score_of(r) for r in widget._all} == first


def test_cancel_keeps_the_scores_so_far(browser, notes, fake_busi, tiny_checkpoint, qtbot,
                                        monkeypatch):
    import time

    from busseg.uncertainty import default_cache

    default_cache().clear()
    real = browser_mod.rank_job

    def slow_job(*args, **kwargs):
        for event in real(*args, **kwargs):
            time.sleep(0.3)
            yield event

    monkeypatch.setattr(browser_mod, "rank_job", slow_job)
    viewer, widget = browser
    widget.set_root(fake_busi)
    widget._model_edit.value = tiny_checkpoint
    widget.rank()
    assert widget.ranking_running and widget._rank_cancel_btn.enabled
    qtbot.waitUntil(lambda: any(widget.score_of(r) is not None for r in widget._all),
                    timeout=60_000)
    widget.cancel_ranking()
    qtbot.waitUntil(lambda: not widget.ranking_running, timeout=60_000)
    n = sum(widget.score_of(r) is not None for r in widget._all)
    assert 0 < n < 6
    assert "cancelled" in widget._status.value and widget._rank_btn.enabled
    assert sum("u=" in widget._cases.native.item(i).text() for i in range(6)) == n


# --------------------------------------------------------------------------- one case at a time


def _predict_on_open(widget, checkpoint):
    """Switch the browser's "Predict on open" on, with its own model ``checkpoint``."""
    widget._model_edit.value = checkpoint
    widget._predict_check.value = True


def _dock_with_segment(viewer, checkpoint, **kwargs):
    """Dock "Segment lesions", then the Scan browser (``_dock(viewer, **kwargs)``); point
    Segment lesions at ``checkpoint``. Returns (segment widget, browser widget)."""
    _, seg = viewer.window.add_plugin_dock_widget("napari-busseg", "Segment lesions")
    widget = _dock(viewer, **kwargs)
    seg.use_checkpoint(checkpoint)
    return seg, widget


def _open_scans(widget, tmp_path, n, index=0, corr_name="corr"):
    """Browse ``n`` scans written to ``tmp_path/scans`` and open scan ``index``.

    Corrections go to ``tmp_path/<corr_name>``, which is returned.
    """
    corr = tmp_path / corr_name
    widget.set_root(_write_scans(tmp_path / "scans", n))
    widget.set_corrections(corr)
    widget.select(index)
    widget.open_current()
    return corr


def _write_scans(root, n, size=(40, 48), seed=0):
    """A plain folder of n unlabeled grey scans (no masks)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, size, dtype=np.uint8)).save(root / f"scan {i:02d}.png")
    return root


def _press(viewer, key):
    """Call what a key is bound to on the viewer (as napari does on a key press)."""
    from napari.utils.key_bindings import KeyBinding

    viewer.keymap[KeyBinding.from_str(key)](viewer)


def test_plain_folder_browse_paint_next_autosaves_every_case(
    make_napari_viewer, notes, busseg_plugin, tiny_checkpoint, tmp_path, qtbot
):
    """Issue 14's "Done when": 12 scans, paint, Next through all without Save."""
    scans = _write_scans(tmp_path / "scans", 12)
    corr = tmp_path / "corrections"
    viewer = make_napari_viewer()
    widget = _dock(viewer, predict=True)
    widget._model_edit.value = tiny_checkpoint
    widget.set_root(scans)
    widget.set_corrections(corr)
    assert len(widget.records) == 12 and widget.session.layouts == ["folder"]
    assert list(widget._class_combo.choices) == ["all", "unknown"]
    assert widget._progress_label.value == "0 of 12 recorded"
    _predict_on_open(widget, tiny_checkpoint)

    expected = {}
    widget.select(0)
    widget.open_current()
    for i in range(12):
        rec = widget.open_record
        assert rec.name == f"scan {i:02d}"
        pred_name = f"{rec.name} prediction"
        qtbot.waitUntil(lambda n=pred_name: n in _names(viewer), timeout=60_000)
        pred = viewer.layers[pred_name]
        # the segment widget's prompt layers of this case, as it names them (added when
        # absent: the browser hands the case left's prompt layers on to the next case)
        if f"{rec.name} boxes" not in _names(viewer):
            viewer.add_shapes(name=f"{rec.name} boxes",
                              metadata={"busseg": {"kind": "box prompts", "image": rec.name}})
        if f"{rec.name} clicks" not in _names(viewer):
            viewer.add_points(name=f"{rec.name} clicks",
                              metadata={"busseg": {"kind": "click prompts",
                                                   "image": rec.name}})
        pred.brush_size = 5
        pred.paint((10 + i, 12 + i), 1)  # the annotator paints
        pred.paint((30, 30 - i), 0)
        expected[rec.name] = np.asarray(pred.data) > 0
        _closed(qtbot, widget)
        assert len(viewer.layers) <= 6
        assert widget.session.prefetched <= widget.session.prefetch_limit
        if i % 2:
            _press(viewer, "N")  # the keyboard shortcut
        else:
            widget.next_case()
    assert notes[-1][0] == "info" and "That was the last case" in notes[-1][1]
    assert not [n for n in notes if n[0] == "error"]
    _closed(qtbot, widget)

    masks = sorted(p.name for p in (corr / "unknown").glob("*_mask.png"))
    assert masks == [f"scan {i:02d}_mask.png" for i in range(12)]
    for name, mask in expected.items():
        np.testing.assert_array_equal(read_mask(corr / "unknown" / f"{name}_mask.png"), mask)
    assert len(viewer.layers) <= 6
    assert set(_names(viewer)) <= {"scan 11", "scan 11 prediction", "scan 11 boxes",
                                   "scan 11 clicks"}
    assert widget._progress_label.value == "12 of 12 recorded"
    assert widget._progress.value == 12

    # a new viewer shows all 12 corrected (read back from the corrections folder)
    _settle(qtbot, widget)
    viewer2 = make_napari_viewer()
    again = _dock(viewer2)
    again.set_corrections(corr)
    again.set_root(scans)
    assert again._progress_label.value == "12 of 12 recorded"
    assert [again.status_of(r) for r in again.records] == ["corrected"] * 12
    assert all("[corrected]" in again._cases.native.item(i).text() for i in range(12))
    again.select(3)
    again.open_current()  # the stored correction is loaded for further editing
    np.testing.assert_array_equal(viewer2.layers["scan 03 prediction"].data > 0,
                                  expected["scan 03"])


def test_busbra_layout_opens_with_ground_truth(browser, notes, tmp_path, qtbot):
    from PIL import Image

    viewer, widget = browser
    root = tmp_path / "busbra"
    (root / "Images").mkdir(parents=True)
    (root / "Masks").mkdir()
    rng = np.random.default_rng(0)
    truth = {}
    for stem in ("0001-l", "0001-r", "0002-s"):
        Image.fromarray(rng.integers(0, 255, (30, 36), dtype=np.uint8)).save(
            root / "Images" / f"bus_{stem}.png")
        m = np.zeros((30, 36), np.uint8)
        m[5:15, 8:20] = 255
        Image.fromarray(m).save(root / "Masks" / f"mask_{stem}.png")
        truth[stem] = m > 0
    (root / "bus_data.csv").write_text(
        "ID,Case,Pathology\nbus_0001-l,1,benign\nbus_0001-r,1,malignant\nbus_0002-s,2,benign\n")
    widget.set_root(root)
    widget.set_corrections(tmp_path / "corr")
    assert widget.session.layouts == ["busbra"]
    assert [r.name for r in widget.records] == ["bus_0001-l", "bus_0001-r", "bus_0002-s"]
    assert list(widget._class_combo.choices) == ["all", "benign", "malignant"]
    widget.select(1)
    widget.open_current()
    assert _names(viewer) == ["bus_0001-r", "bus_0001-r ground truth"]
    np.testing.assert_array_equal(viewer.layers["bus_0001-r ground truth"].data > 0,
                                  truth["0001-r"])
    widget.next_case()
    _closed(qtbot, widget)
    assert _names(viewer) == ["bus_0002-s", "bus_0002-s ground truth"]


@pytest.mark.realdata
def test_real_busbra_folder_opens_with_ground_truth(browser, notes, busbra_root, tmp_path):
    viewer, widget = browser
    widget.set_root(busbra_root)
    widget.set_corrections(tmp_path / "corr")
    assert len(widget.records) == 376 and widget.session.layouts == ["busbra"]
    widget.select(0)
    widget.open_current()
    rec = widget.open_record
    gt = viewer.layers[f"{rec.name} ground truth"]
    assert gt.data.shape == viewer.layers[rec.name].data.shape and gt.data.any()


@pytest.mark.parametrize(
    ("close", "n", "index", "edit"),
    [
        ("napari", 3, 1, np.s_[5:9, 5:9]),  # napari removes the layers first: saved then
        ("window", 2, 0, np.s_[1:4, 2:9]),  # the window's close button (layers still there)
    ],
)
def test_closing_saves_the_open_case(make_napari_viewer, notes, busseg_plugin, tmp_path,
                                     close, n, index, edit):
    viewer = make_napari_viewer()
    corr = _open_scans(_dock(viewer), tmp_path, n, index, "corrections")
    layer = viewer.add_labels(np.zeros((40, 48), np.uint8), name=f"scan {index:02d} prediction")
    layer.data[edit] = 1
    if close == "napari":
        viewer.close()
    else:
        viewer.window._qt_window.close()
    np.testing.assert_array_equal(read_mask(corr / "unknown" / f"scan {index:02d}_mask.png"),
                                  layer.data > 0)


def test_keyboard_shortcuts(browser, notes, tmp_path, monkeypatch):
    import napari.layers
    from napari.utils.key_bindings import KeyBinding
    from napari.utils.shortcuts import default_shortcuts

    viewer, widget = browser
    # none of them is a napari default, nor a layer's own key
    napari_keys = {str(k) for keys in default_shortcuts.values() for k in keys}
    for cls in (napari.layers.Labels, napari.layers.Shapes, napari.layers.Points,
                napari.layers.Image):
        napari_keys |= {str(k) for k in cls.class_keymap}
    ours = {str(KeyBinding.from_str(k)) for k in browser_mod.SHORTCUTS}
    assert not ours & napari_keys
    assert ours <= {str(k) for k in viewer.keymap}
    for key in browser_mod.SHORTCUTS:
        assert key.replace("-", "+") in widget.tooltip

    corr = _open_scans(widget, tmp_path, 3, 0)
    _press(viewer, "N")
    assert widget.open_record.name == "scan 01"
    _press(viewer, "Shift-N")
    assert widget.open_record.name == "scan 00"
    _press(viewer, "H")  # no lesion: an empty mask recorded as a normal scan
    assert not read_mask(corr / "normal" / "scan 00_mask.png").any()
    assert not viewer.layers["scan 00 prediction"].data.any()
    assert widget.status_of(widget.open_record) == "normal"
    viewer.layers["scan 00 prediction"].data[2:5, 2:5] = 1
    _press(viewer, "Shift-S")  # save now: the lesion moves the case out of normal/
    assert read_mask(corr / "unknown" / "scan 00_mask.png").any()
    assert (corr / "versions" / "normal" / "scan 00_mask.v1.png").is_file()

    # the Segment lesions keys are forwarded to that widget
    calls = []

    class FakeSegment:
        def segment(self):
            calls.append("segment")

        def set_prompt_mode(self, mode):
            calls.append(mode)

        def toggle_click_label(self):
            calls.append("toggle")

    from busseg.state import viewer_state

    _press(viewer, "G")  # no Segment lesions widget offers the action
    assert "Segment lesions" in notes[-1][1] and not calls
    fake = FakeSegment()  # offers its actions through the viewer's state, as the widget does
    state = viewer_state(viewer)
    for name in ("segment", "set_prompt_mode", "toggle_click_label"):
        state.offer(name, getattr(fake, name))
    for key in ("G", "Q", "W", "J"):
        _press(viewer, key)
    assert calls == ["segment", "box", "click", "toggle"]
    assert viewer.layers.selection.active.name == "scan 00"  # G segments the open image


def test_unedited_prediction_is_recorded_as_accepted(browser, notes, tiny_checkpoint, tmp_path,
                                                     qtbot):
    viewer, widget = browser
    scans = _write_scans(tmp_path / "scans", 3)
    corr = tmp_path / "corr"
    widget.set_root(scans)
    widget.set_corrections(corr)
    _predict_on_open(widget, tiny_checkpoint)
    widget.select(0)
    widget.open_current()
    qtbot.waitUntil(lambda: "scan 00 prediction" in _names(viewer), timeout=60_000)
    widget.next_case()  # left unedited: recorded as accepted (the prediction as it was)
    assert [p.name for p in corr.rglob("*_mask.png")] == ["scan 00_mask.png"]
    assert widget.session.status_of(0) == "accepted"
    assert widget._progress_label.value == "1 of 3 recorded"
    assert "[accepted]" in widget._cases.native.item(0).text()
    _closed(qtbot, widget)
    assert _names(viewer)[0] == "scan 01"
    # the next case's prediction runs in a worker: let it land before the viewer closes
    qtbot.waitUntil(lambda: "scan 01 prediction" in _names(viewer), timeout=60_000)


def test_resume_opens_the_first_uncorrected_case(browser, notes, tmp_path):
    viewer, widget = browser
    scans = _write_scans(tmp_path / "scans", 4)
    corr = tmp_path / "corr"
    widget.set_corrections(corr)
    widget.set_root(scans)
    for i in (0, 1):
        widget.select(i)
        widget.open_current()
        viewer.add_labels(np.ones((40, 48), np.uint8), name=f"scan {i:02d} prediction")
    widget.next_case()
    # another session on the same folders continues where the user stopped
    widget.set_root(tmp_path)  # elsewhere first
    widget.set_root(scans)
    assert widget.current_record().name == "scan 02"  # selected on opening the folder
    assert widget.resume().name == "scan 02"
    assert widget._progress_label.value == "2 of 4 recorded"


def test_learn_as_you_go_switches_segment_lesions(
    make_napari_viewer, notes, busseg_plugin, tiny_checkpoint, tmp_path, qtbot, monkeypatch
):
    import busseg.finetune
    from busseg.finetune import FinetuneResult

    dice = {"before": 0.4, "after": 0.6}
    cost = {"before": 3.0, "after": 2.0}  # simulated interactions per held-out scan

    def fake_costs(images, masks, val_indices, model_before, model_after, **kwargs):
        n = len(val_indices)
        return {"n": n, "n_lesion": n, "before": {"per_scan": cost["before"]},
                "after": {"per_scan": cost["after"]}}

    def fake_finetune(images, masks, base=None, *, out_dir=None, **kwargs):
        yield "progress"
        ck = Path(out_dir) / "best"
        ck.mkdir(parents=True)
        from shutil import copytree

        copytree(tiny_checkpoint, ck, dirs_exist_ok=True)
        heldout = {"before": {"mean_dice": dice["before"], "dice_lesion": dice["before"]},
                   "after": {"mean_dice": dice["after"], "dice_lesion": dice["after"]}}
        n = len(images)
        return FinetuneResult(ck, None, dice["before"], dice["after"], n - 1, 1,
                              extra={"heldout": heldout, "train_indices": list(range(n - 1)),
                                     "val_indices": [n - 1]})

    monkeypatch.setattr(busseg.finetune, "finetune_iter", fake_finetune)
    monkeypatch.setattr(busseg.finetune, "heldout_costs", fake_costs)
    viewer = make_napari_viewer()
    # the test adds its own prediction layers
    seg, widget = _dock_with_segment(viewer, tiny_checkpoint)
    widget.set_learning(True, every=2)
    scans = _write_scans(tmp_path / "scans", 6)
    widget.set_corrections(tmp_path / "corr")
    widget.set_root(scans)
    widget.select(0)
    widget.open_current()
    for i in range(2):
        viewer.add_labels(np.ones((40, 48), np.uint8), name=f"scan {i:02d} prediction")
        widget.next_case()
    qtbot.waitUntil(lambda: not widget.finetune_running and "adopted" in widget._status.value,
                    timeout=30_000)
    assert widget._status.value.startswith("New checkpoint adopted: 3.00 -> 2.00 interactions")
    new = widget.session.checkpoint
    assert new is not None and new != tiny_checkpoint
    assert seg.current_checkpoint() == new

    dice.update(before=0.6, after=0.5)
    cost.update(before=2.0, after=2.5)  # costs more to annotate: kept
    for i in range(2, 4):
        viewer.add_labels(np.ones((40, 48), np.uint8), name=f"scan {i:02d} prediction")
        widget.next_case()
    qtbot.waitUntil(lambda: not widget.finetune_running and "not adopted" in widget._status.value,
                    timeout=30_000)
    assert seg.current_checkpoint() == new and widget.session.checkpoint == new


@pytest.mark.slow
def test_memory_stays_flat_over_200_cases(make_napari_viewer, notes, busseg_plugin, tmp_path):
    """RSS after 200 cases is at most 300 MB above RSS after 10.

    Each case: open, paint into its prediction layer, Next (autosave, close). Between cases
    Qt runs its deferred deletions, as napari's event loop does between two key presses
    (without that, napari's closed layer controls pile up until the loop runs). About 1 s per
    case on a busy 2-core machine, most of it napari creating and removing layers.
    """
    import gc
    import time

    import psutil
    from qtpy.QtCore import QCoreApplication, QEvent
    from qtpy.QtWidgets import QApplication

    n, size = 200, (512, 512)
    scans = _write_scans(tmp_path / "scans", n, size=size)
    viewer = make_napari_viewer()
    widget = _dock(viewer)
    widget.set_root(scans)
    widget.set_corrections(tmp_path / "corr")
    proc = psutil.Process()
    rss = {}
    t0 = time.perf_counter()
    widget.select(0)
    widget.open_current()
    for i in range(n):
        rec = widget.open_record
        layer = viewer.add_labels(np.zeros(size, np.uint8), name=f"{rec.name} prediction")
        layer.brush_size = 20
        layer.paint((100 + i, 200), 1)
        widget.next_case()
        QApplication.processEvents()
        QCoreApplication.sendPostedEvents(None, QEvent.Type.DeferredDelete)
        if i + 1 in (10, 100, 200):
            gc.collect()
            rss[i + 1] = proc.memory_info().rss / 2**20
    seconds = time.perf_counter() - t0
    print(f"RSS after 10 / 100 / 200 cases: {rss[10]:.0f} / {rss[100]:.0f} / {rss[200]:.0f} "
          f"MiB ({seconds:.0f} s for {n} cases of {size[1]}x{size[0]})")
    assert len(list((tmp_path / "corr" / "unknown").glob("*_mask.png"))) == n
    deadline = time.perf_counter() + 10  # the last case left is removed a moment after Next
    while widget.closing_pending and time.perf_counter() < deadline:
        QApplication.processEvents()
        time.sleep(0.01)
    assert len(viewer.layers) <= 6
    assert rss[200] - rss[10] <= 300


def test_keys_drive_the_segment_lesions_widget(
    make_napari_viewer, notes, busseg_plugin, tiny_checkpoint, tmp_path, qtbot
):
    from napari.layers import Points, Shapes

    viewer = make_napari_viewer()
    # G races the prediction on open: G's mask wins
    seg, widget = _dock_with_segment(viewer, tiny_checkpoint, predict=True)
    corr = _open_scans(widget, tmp_path, 2, 0)
    _press(viewer, "G")
    qtbot.waitUntil(lambda: "scan 00 prediction" in _names(viewer) and not seg.running,
                    timeout=60_000)
    _press(viewer, "Q")
    assert isinstance(viewer.layers.selection.active, Shapes)
    assert viewer.layers.selection.active.name == "scan 00 boxes"
    _press(viewer, "W")
    assert isinstance(viewer.layers.selection.active, Points)
    before = seg._click_label.value
    _press(viewer, "J")
    assert seg._click_label.value != before
    pred = viewer.layers["scan 00 prediction"]
    pred.data = np.ones_like(pred.data)  # an edit ...
    _press(viewer, "H")  # ... then "no lesion": cleared and recorded as a normal scan
    assert not viewer.layers["scan 00 prediction"].data.any()
    assert not read_mask(corr / "normal" / "scan 00_mask.png").any()
    _press(viewer, "N")
    # the image, prediction and prompt layers of scan 00 are closed
    _closed(qtbot, widget)
    assert "scan 01" in _names(viewer) and not [n for n in _names(viewer) if "scan 00" in n]
    assert widget._progress_label.value == "1 of 2 recorded"
    _settle(qtbot, widget)


# ------------------------------------------------------------- an annotator who never waits


@pytest.fixture
def forward_threads(monkeypatch):
    """Record the thread of every forward pass (``busseg.inference.predict``, which
    ``predict_mask`` and the session's site calibrator both call).

    ``.on_gui`` lists, per call, whether it ran on the GUI (main) thread; ``.real`` is the
    unpatched ``predict_mask``, for the test's own reference predictions (not recorded).
    """
    import threading
    from types import SimpleNamespace

    import busseg.inference

    real_predict = busseg.inference.predict
    real_mask = busseg.inference.predict_mask
    local = threading.local()

    def recording(*args, **kwargs):
        if not getattr(local, "reference", False):
            record.on_gui.append(threading.current_thread() is threading.main_thread())
        return real_predict(*args, **kwargs)

    def reference(*args, **kwargs):
        local.reference = True
        try:
            return real_mask(*args, **kwargs)
        finally:
            local.reference = False

    record = SimpleNamespace(on_gui=[], real=reference)
    monkeypatch.setattr(busseg.inference, "predict", recording)
    return record


def test_predict_on_open_is_the_default_and_the_rows_scroll(make_napari_viewer, notes,
                                                            busseg_plugin):
    from qtpy.QtWidgets import QScrollArea

    viewer = make_napari_viewer()
    _, widget = viewer.window.add_plugin_dock_widget("napari-busseg", "Scan browser")
    assert widget._predict_check.value is True and widget.prefetch_next is True
    scroll = widget.native.findChild(QScrollArea, "busseg_browser_scroll")
    assert scroll is not None and scroll.widgetResizable()
    for part in (widget._cases, widget._predict_check, widget._next_btn, widget._status):
        assert scroll.widget().isAncestorOf(part.native)
    # the dock can be short: the rows scroll (two docks fit stacked in a 900-pixel window)
    assert widget.native.minimumSizeHint().height() <= 250
    assert scroll.widget().minimumSizeHint().height() > scroll.minimumHeight()
    # no horizontal scroll bar: the dock is kept wide enough that no row of buttons is clipped
    assert scroll.minimumWidth() >= scroll.widget().minimumSizeHint().width()


def test_next_shows_the_prefetched_mask_without_a_forward_pass_on_the_gui_thread(
    make_napari_viewer, notes, busseg_plugin, tiny_checkpoint, tmp_path, qtbot, forward_threads
):
    from busseg.inference import load_model

    predict_mask = forward_threads.real
    scans = _write_scans(tmp_path / "scans", 4)
    viewer = make_napari_viewer()
    widget = _dock(viewer, predict=True)
    widget._model_edit.value = tiny_checkpoint
    widget.set_root(scans)  # the selected case is prefetched at once (model loaded)
    widget.set_corrections(tmp_path / "corr")
    _settle(qtbot, widget)
    assert widget.session.cached_prediction(0) is not None
    widget.select(0)
    widget.open_current()
    assert "scan 00 prediction" in _names(viewer)  # shown at once, no wait
    assert viewer.layers.selection.active.name == "scan 00 prediction"
    for i in (1, 2):
        # while the user works on the case, the next one is predicted in the background
        qtbot.waitUntil(lambda i=i: widget.session.cached_prediction(i) is not None,
                        timeout=60_000)
        _settle(qtbot, widget)
        widget.next_case()
        name = f"scan {i:02d}"
        assert f"{name} prediction" in _names(viewer)  # in the same call: no worker awaited
        expected = predict_mask(read_image(scans / f"{name}.png"), load_model(tiny_checkpoint))
        np.testing.assert_array_equal(viewer.layers[f"{name} prediction"].data > 0, expected)
        assert widget._status.value.endswith("predicted; correct it, then move on (saved).")
    _settle(qtbot, widget)
    assert forward_threads.on_gui and not any(forward_threads.on_gui)  # never the GUI thread
    assert not [n for n in notes if n[0] == "error"]


def test_prefetch_follows_the_list_order(browser, notes, fake_busi, tiny_checkpoint, qtbot):
    viewer, widget = browser
    widget._model_edit.value = tiny_checkpoint
    widget.set_root(fake_busi)
    widget.set_sort("uncertainty")
    qtbot.waitUntil(lambda: _ranked(widget, 6), timeout=60_000)
    widget._predict_check.value = True
    widget.select(2)
    widget.open_current()
    qtbot.waitUntil(lambda: f"{widget.records[2].name} prediction" in _names(viewer),
                    timeout=60_000)
    _settle(qtbot, widget)
    order = widget._shown
    assert widget.session.cached_prediction(order[3]) is not None  # the next in the list
    file_next = widget._all.index(widget.records[2]) + 1
    if file_next < 6 and file_next != order[3]:
        assert widget.session.cached_prediction(file_next) is None  # not the file order
    widget.next_case()
    assert f"{widget.records[3].name} prediction" in _names(viewer)
    _settle(qtbot, widget)


def test_stale_prefetches_are_ignored(make_napari_viewer, notes, busseg_plugin, tiny_checkpoint,
                                      tmp_path, qtbot, forward_threads):
    from busseg.inference import load_model

    predict_mask = forward_threads.real
    scans = _write_scans(tmp_path / "scans", 5)
    other = _other_checkpoint(tmp_path / "other")
    viewer = make_napari_viewer()
    widget = _dock(viewer, predict=True)
    widget._model_edit.value = tiny_checkpoint
    widget.set_root(scans)
    widget.set_corrections(tmp_path / "corr")
    widget.select(0)
    widget.open_current()
    qtbot.waitUntil(lambda: widget.session.cached_prediction(1) is not None, timeout=60_000)
    _settle(qtbot, widget)

    # another checkpoint: the prediction prefetched with the old one is not used
    widget._model_edit.value = other
    widget.next_case()
    assert "scan 01 prediction" not in _names(viewer)
    qtbot.waitUntil(lambda: "scan 01 prediction" in _names(viewer), timeout=60_000)
    image = read_image(scans / "scan 01.png")
    np.testing.assert_array_equal(viewer.layers["scan 01 prediction"].data > 0,
                                  predict_mask(image, load_model(other)))
    _settle(qtbot, widget)

    # a layer the user made for the next case is never replaced by its prefetched mask
    assert widget.session.cached_prediction(2) is not None
    mine = viewer.add_labels(np.zeros((40, 48), np.uint8), name="scan 02 prediction")
    mine.data[3:9, 4:12] = 1
    widget.next_case()  # saves scan 01 (unedited: nothing), opens scan 02 with the user's layer
    assert viewer.layers["scan 02 prediction"] is mine and mine.data.sum() == 6 * 8
    assert any("kept" in msg for _, msg in notes)

    # moving on faster than the model: nothing lands in a case that was left
    widget.next_case()
    widget.next_case()
    assert widget.open_record.name == "scan 04"
    _settle(qtbot, widget)
    qtbot.wait(50)
    assert not [n for n in _names(viewer) if n.startswith(("scan 02", "scan 03"))]
    assert "scan 04 prediction" in _names(viewer)
    assert not any(forward_threads.on_gui)
    assert not [n for n in notes if n[0] == "error"]


def test_late_prediction_after_napari_closes_is_dropped(make_napari_viewer, notes,
                                                        busseg_plugin, tiny_checkpoint,
                                                        tmp_path, qtbot, monkeypatch):
    import threading

    import busseg.inference

    gate = threading.Event()
    real = busseg.inference.predict  # the model's one entry (predict_mask, calibrator)

    def held(*args, **kwargs):
        gate.wait(30)
        return real(*args, **kwargs)

    monkeypatch.setattr(busseg.inference, "predict", held)
    scans = _write_scans(tmp_path / "scans", 3)
    viewer = make_napari_viewer()
    widget = _dock(viewer, predict=True)
    widget._model_edit.value = tiny_checkpoint
    widget.set_root(scans)
    widget.select(0)
    widget.open_current()
    assert widget.predicting or widget.prefetch_running
    viewer.close()  # napari closes while the model is still working
    gate.set()
    _settle(qtbot, widget)
    qtbot.wait(50)
    assert not [n for n in notes if n[0] == "error"]


def test_segment_replaces_an_unedited_browser_prediction_without_asking(
    make_napari_viewer, notes, busseg_plugin, tiny_checkpoint, tmp_path, qtbot
):
    viewer = make_napari_viewer()
    # the browser predicts with Segment lesions' model
    seg, widget = _dock_with_segment(viewer, tiny_checkpoint, predict=True)
    scans = _write_scans(tmp_path / "scans", 2)
    widget.set_root(scans)
    widget.set_corrections(tmp_path / "corr")
    widget.select(0)
    widget.open_current()
    qtbot.waitUntil(lambda: "scan 00 prediction" in _names(viewer), timeout=60_000)
    layer = viewer.layers["scan 00 prediction"]
    assert layer.metadata["busseg"]["written_by"] == browser_mod.WRITTEN_BY
    asked = []
    seg.ask_overwrite = lambda name: asked.append(name) or "cancel"
    _press(viewer, "G")
    qtbot.waitUntil(lambda: not seg.running, timeout=60_000)
    assert not asked  # an unedited automatic prediction: replaced without a question
    assert [n for n in _names(viewer) if "prediction" in n] == ["scan 00 prediction"]
    assert viewer.layers["scan 00 prediction"].metadata["busseg"]["written_by"] != (
        browser_mod.WRITTEN_BY)
    edited = viewer.layers["scan 00 prediction"]
    edited.data = (np.asarray(edited.data) == 0).astype(np.uint8)  # an edit: now it asks
    _press(viewer, "G")
    assert asked == ["scan 00 prediction"]
    _settle(qtbot, widget)


def test_next_reuses_the_layers_and_keeps_each_case_its_own_edits(
    make_napari_viewer, notes, busseg_plugin, tiny_checkpoint, fake_busi, tmp_path, qtbot
):
    """Issue 18 item 4: Next swaps the data of the same layers; nothing crosses cases."""
    viewer = make_napari_viewer()
    seg, widget = _dock_with_segment(viewer, tiny_checkpoint, predict=True)
    corr = tmp_path / "corrections"
    widget.set_corrections(corr)
    widget.set_root(fake_busi)
    widget.set_class_filter("benign")
    widget.select(0)
    widget.open_current()
    qtbot.waitUntil(lambda: "benign (1) prediction" in _names(viewer), timeout=60_000)
    _settle(qtbot, widget)
    names = ("", " ground truth", " prediction", " boxes", " clicks")
    layers = [viewer.layers[f"benign (1){n}"] for n in names]
    pred, boxes, clicks = layers[2], layers[3], layers[4]

    saved = {}
    for k in (1, 2):
        name = f"benign ({k})"
        assert [viewer.layers[f"{name}{n}"] for n in names] == layers  # the same objects
        assert len(viewer.layers) == 5
        assert not len(boxes.data) and not len(clicks.data)  # the prompts start empty
        assert boxes.metadata["busseg"]["image"] == name
        assert clicks.metadata["busseg"]["image"] == name
        assert pred.metadata["busseg"]["name"] == name
        assert browser_mod.layer_edited(pred) is False  # the prefetched mask, unedited
        shown = np.array(pred.data)
        pred.undo()  # nothing to undo: Ctrl+Z never reaches into the case left
        np.testing.assert_array_equal(pred.data, shown)
        pred.brush_size = 3
        at = (5 + 3 * k, 6 + 2 * k)
        value = 0 if shown[at] else 1  # the annotator's edit of this case: a change
        pred.paint(at, value)
        assert browser_mod.layer_edited(pred) is True
        saved[name] = np.array(pred.data) > 0
        pred.undo()
        np.testing.assert_array_equal(pred.data, shown)  # undo works within the case
        pred.paint(at, value)
        # a prompt layer the annotator used; emptying it on Next runs no prompt
        clicks.add([[4.0, 4.0]])
        qtbot.waitUntil(lambda: not seg.prompt_busy, timeout=60_000)
        saved[name] = np.array(pred.data) > 0
        qtbot.waitUntil(lambda k=k: widget._cached_prediction(k) is not None,
                        timeout=60_000)
        _settle(qtbot, widget)
        widget.next_case()
        assert not widget.closing_pending, [d.name for d in widget._doomed]  # all reused
        assert seg._image.value is layers[0]
    qtbot.wait(100)
    assert not seg.prompt_busy
    # the saved correction of each case is that case's edits, not the next case's
    for name, mask in saved.items():
        np.testing.assert_array_equal(read_mask(corr / "benign" / f"{name}_mask.png"), mask)
    rec = widget.open_record
    assert rec.name == "benign (3)"
    np.testing.assert_array_equal(layers[0].data, read_image(rec.image_path))
    np.testing.assert_array_equal(layers[1].data, read_mask(rec.mask_paths))
    np.testing.assert_array_equal(pred.data, widget._cached_prediction(2))
    # Previous: the stored correction of benign (2) is shown in the same layer, unedited
    widget.previous_case()
    assert viewer.layers["benign (2) prediction"] is pred
    np.testing.assert_array_equal(pred.data > 0, saved["benign (2)"])
    assert browser_mod.layer_edited(pred) is False
    _settle(qtbot, widget)
    assert not [n for n in notes if n[0] == "error"]


def test_reused_layers_follow_the_case_shape_and_ground_truth(
    browser, notes, tmp_path, qtbot
):
    """Cases of other sizes, with and without ground truth, in the reused layers."""
    from PIL import Image

    viewer, widget = browser
    root = tmp_path / "mixed"
    (root / "Images").mkdir(parents=True)
    (root / "Masks").mkdir()
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate([(40, 48), (64, 30), (50, 50)]):
        Image.fromarray(rng.integers(0, 255, (h, w), dtype=np.uint8)).save(
            root / "Images" / f"bus_{i:04d}-l.png")
        if i != 1:
            m = np.zeros((h, w), np.uint8)
            m[5:15, 5:15] = 255
            Image.fromarray(m).save(root / "Masks" / f"mask_{i:04d}-l.png")
    widget.set_root(root)
    widget.set_corrections(tmp_path / "corr")
    widget.select(0)
    widget.open_current()
    image = viewer.layers["bus_0000-l"]
    assert _names(viewer) == ["bus_0000-l", "bus_0000-l ground truth"]
    widget.next_case()  # no ground truth: that layer is closed
    assert viewer.layers["bus_0001-l"] is image and image.data.shape == (64, 30)
    _closed(qtbot, widget)
    assert _names(viewer) == ["bus_0001-l"]
    widget.next_case()  # ground truth again: a new layer, just above the image
    assert viewer.layers["bus_0002-l"] is image and image.data.shape == (50, 50)
    assert _names(viewer) == ["bus_0002-l", "bus_0002-l ground truth"]
    assert tuple(image.contrast_limits) == (0, 255)
    assert not [n for n in notes if n[0] == "error"]


def test_first_open_takes_over_the_layers_made_when_the_folder_is_chosen(
    make_napari_viewer, notes, busseg_plugin, tiny_checkpoint, fake_busi, tmp_path, qtbot
):
    """The warm-up: napari's first layer of each kind is made before the first Open."""
    viewer = make_napari_viewer()
    seg, widget = _dock_with_segment(viewer, tiny_checkpoint, predict=True)
    widget.set_corrections(tmp_path / "corr")
    widget.set_root(fake_busi)
    spares = widget.spare_layers
    assert set(spares) == {"image", "ground truth", "prediction", "boxes", "clicks"}
    assert all(layer.opacity == 0 for layer in viewer.layers)  # drawn, not seen
    assert viewer.layers.selection.active is None  # a click never lands in a spare
    assert seg._image.value is None
    assert not [c for c in seg._image.choices if c is not None]  # never offered
    assert all(widget.status_of(r) == "not segmented" for r in widget.records)
    widget.open_current()
    rec = widget.open_record
    for role, suffix in (("image", ""), ("ground truth", " ground truth"),
                         ("boxes", " boxes"), ("clicks", " clicks")):
        assert viewer.layers[f"{rec.name}{suffix}"] is spares[role]
        assert spares[role].visible and spares[role].opacity > 0
    assert viewer.layers[rec.name].metadata["busseg"]["kind"] == "case"
    # Segment lesions listens to the prompt layers it did not make
    assert {id(spares["boxes"]), id(spares["clicks"])} <= seg._connected
    qtbot.waitUntil(lambda: f"{rec.name} prediction" in _names(viewer), timeout=60_000)
    assert viewer.layers[f"{rec.name} prediction"] is spares["prediction"]
    assert seg._image.value is viewer.layers[rec.name]
    assert len(viewer.layers) == 5 and not widget.spare_layers
    _settle(qtbot, widget)
    assert not [n for n in notes if n[0] == "error"]


# ------------------------------------------------------------- both docks in a 1500x900 window


def _visible_rows(list_widget):
    """Rows of a QListWidget wholly visible on screen (clipped by its scroll areas too)."""
    shown = list_widget.viewport().visibleRegion().boundingRect()
    return sum(shown.contains(list_widget.visualItemRect(list_widget.item(i)))
               for i in range(list_widget.count()))


def test_both_docks_at_1500x900_show_ten_cases(make_napari_viewer, notes, busseg_plugin,
                                               tmp_path, qtbot):
    """The annotator's rows come first and Segment lesions' expert settings fold away, so the
    case list shows at least ten rows with both docks open in a 1500x900 window."""
    from qtpy.QtWidgets import QApplication

    viewer = make_napari_viewer(show=True)
    viewer.window.resize(1500, 900)
    _, seg = viewer.window.add_plugin_dock_widget("napari-busseg", "Segment lesions")
    widget = _dock(viewer)
    viewer.window.resize(1500, 900)
    assert not seg.expert_settings_open  # folded by default
    widget.set_corrections(tmp_path / "corr")
    widget.set_root(_write_scans(tmp_path / "scans", 14))
    widget.select(0)
    widget.open_current()
    for _ in range(5):
        QApplication.processEvents()
        qtbot.wait(50)
    rows = _visible_rows(widget._cases.native)
    # the README's picture is rewritten only when asked (BUSSEG_WRITE_DOCS_IMAGES=1), so a
    # test run leaves the checkout as it was
    docs = Path(__file__).resolve().parents[1] / "docs" / "images"
    out = docs if os.environ.get("BUSSEG_WRITE_DOCS_IMAGES") == "1" else tmp_path
    shot = viewer.window.screenshot(str(out / "scan_browser_case_list_1500x900.png"),
                                    canvas_only=False, flash=False)
    assert shot.shape[0] >= 850 and shot.shape[1] >= 1450
    assert all(shot[..., c].max() > 0 for c in range(3))  # not a black image
    assert rows >= 10, f"the case list shows {rows} rows"


def test_skip_key_leaves_a_case_unrecorded(browser, notes, tmp_path, monkeypatch):
    viewer, widget = browser
    assert "K" in browser_mod.SHORTCUTS and "K" in widget.tooltip
    corr = _open_scans(widget, tmp_path, 3, 0)
    viewer.add_labels(np.ones((40, 48), np.uint8), name="scan 00 prediction")  # an edit ...
    _press(viewer, "K")  # ... left without recording it
    assert widget.open_record.name == "scan 01"
    assert not corr.exists() or not list(corr.rglob("*_mask.png"))
    assert widget._progress_label.value == "0 of 3 recorded"
    assert widget.session.status_of(0) is None
    viewer.add_labels(np.ones((40, 48), np.uint8), name="scan 01 prediction")
    _press(viewer, "N")  # N records it
    assert widget.session.status_of(1) == "corrected"
    assert "[corrected]" in widget._cases.native.item(1).text()
    assert widget._progress_label.value == "1 of 3 recorded"


def test_learning_tooltip_and_site_calibration_line(browser, tmp_path, monkeypatch):
    viewer, widget = browser
    tip = widget._learn_check.tooltip
    assert "interactions per held-out scan" in tip and "not by Dice" in tip
    widget.set_root(_write_scans(tmp_path / "scans", 2))
    widget.set_corrections(tmp_path / "corr")
    session_type = type(widget.session)
    if not hasattr(session_type, "calibration_text"):
        assert widget._calibration.native.isHidden()  # no such line: nothing shown
    monkeypatch.setattr(session_type, "calibration_text",
                        lambda self: "site calibration: threshold 0.42", raising=False)
    widget._refresh_list()
    assert widget._calibration.value == "site calibration: threshold 0.42"
    assert not widget._calibration.native.isHidden()
    monkeypatch.setattr(session_type, "calibration_text", lambda self: "", raising=False)
    widget._refresh_list()
    assert widget._calibration.native.isHidden()
