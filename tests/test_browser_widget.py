"""The BUSI browser dock widget, loaded through the manifest (GUI; needs Xvfb)."""

from __future__ import annotations

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


@pytest.fixture
def browser(make_napari_viewer, notes, busseg_plugin):
    viewer = make_napari_viewer()
    _, widget = viewer.window.add_plugin_dock_widget("napari-busseg", "BUSI browser")
    assert isinstance(widget, browser_mod.BusiBrowserWidget)
    return viewer, widget


def _names(viewer, visible_only=False):
    return [layer.name for layer in viewer.layers if layer.visible or not visible_only]


def test_open_next_and_save_corrections(browser, notes, fake_busi, tmp_path, monkeypatch):
    viewer, widget = browser
    widget.set_root(fake_busi)
    assert len(widget.records) == 6
    widget.set_class_filter("benign")
    assert [r.name for r in widget.records] == ["benign (1)", "benign (2)", "benign (3)"]

    widget.select(0)
    widget.open_current()
    assert _names(viewer) == ["benign (1)", "benign (1) ground truth"]
    widget.next_case()
    assert widget.current_record().name == "benign (2)"
    assert _names(viewer, visible_only=True) == ["benign (2)", "benign (2) ground truth"]
    assert len(viewer.layers) == 4  # the previous case is hidden, not deleted

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
    assert [r.rel_path for r in discover_busi(corr).usable] == ["benign/benign (2).png"]

    # an existing correction is replaced only after a Yes
    layer.data = np.zeros_like(layer.data)
    asked = []
    cls = browser_mod.BusiBrowserWidget  # patched on the class: magicgui owns instance attrs
    monkeypatch.setattr(cls, "_confirm_overwrite", lambda self, p: asked.append(p) or False)
    assert widget.save_correction() is None
    assert asked == [saved] and read_mask(saved).any()
    monkeypatch.setattr(cls, "_confirm_overwrite", lambda self, p: True)
    assert widget.save_correction() == saved
    assert not read_mask(saved).any()

    # Previous/Next stop at the ends of the list
    widget.previous_case()
    widget.previous_case()
    assert widget.current_record().name == "benign (1)"
    assert notes[-1] == ("info", "That was the first case.")


def test_predict_on_open_never_replaces_a_prediction(
    browser, notes, fake_busi, tiny_checkpoint, qtbot
):
    viewer, widget = browser
    widget.set_root(fake_busi)
    widget._model_edit.value = tiny_checkpoint
    widget._predict_check.value = True
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


def test_uses_the_folder_the_reader_opened(make_napari_viewer, notes, fake_busi, busseg_plugin):
    viewer = make_napari_viewer()
    viewer.open(str(fake_busi / "malignant"), plugin="napari-busseg")
    _, widget = viewer.window.add_plugin_dock_widget("napari-busseg", "BUSI browser")
    assert widget.root == fake_busi
    assert len(widget.records) == 6
    assert widget._cases.native.count() == 6  # docking did not clear the list
    widget.set_root(fake_busi.parent.parent)  # not BUSI-like: said in the widget, no traceback
    assert widget.records == [] and widget.root is None
    assert "Not a BUSI-layout folder" in widget._status.value
