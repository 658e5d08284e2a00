"""The "remove likely false regions" checkbox of the Segment lesions widget, loaded through
the napari manifest (needs a display: ``xvfb-run -a python -m pytest ...``)."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("napari")
pytest.importorskip("pytestqt")

pytestmark = pytest.mark.gui

TIMEOUT_MS = 60_000


def _run(qtbot, w):
    w._run_btn.native.click()
    qtbot.waitUntil(lambda: not w.running, timeout=TIMEOUT_MS)


def test_checkbox_switches_the_region_filter(qtbot, make_napari_viewer, make_head_checkpoint):
    from busseg.inference import load_model, predict
    from busseg.region_filter import RegionFilter, label_components

    remove_all = RegionFilter.rule("log_area", 1.0).to_dict()
    on = make_head_checkpoint({}, name="rf_widget", threshold=0.3, region_filter=remove_all)
    viewer = make_napari_viewer()
    _, w = viewer.window.add_plugin_dock_widget("napari-busseg", "Segment lesions")
    w.use_checkpoint(on)
    assert w._region_filter.value is True  # default on
    assert w._region_filter.text == "remove likely false regions"
    image = np.random.default_rng(0).integers(0, 256, size=(64, 64), dtype=np.uint8)
    viewer.add_image(image, name="img")
    w._image.value = viewer.layers["img"]
    raw = predict(image, load_model(on, device="cpu"), region_filter=None).mask
    assert raw.any()

    _run(qtbot, w)
    assert not viewer.layers["img prediction"].data.any()
    n = label_components(raw)[1]
    assert w.last_result.extra["regions_removed"] == [n]
    assert "region filter removed" in w._status.value

    w._region_filter.value = False
    _run(qtbot, w)  # the unedited prediction is replaced without asking
    np.testing.assert_array_equal(viewer.layers["img prediction"].data > 0, raw)
    assert w.last_result.extra["regions_removed"] == [0]
    assert "region filter" not in w._status.value
