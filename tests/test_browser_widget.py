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
    assert viewer.layers[second.name].visible and not viewer.layers[top.name].visible
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
    _, seg = viewer.window.add_plugin_dock_widget("napari-busseg", "Segment lesions")
    _, widget = viewer.window.add_plugin_dock_widget("napari-busseg", "BUSI browser")
    seg.use_checkpoint(tiny_checkpoint)
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
