"""The Qt-free viewer state (busseg.state) and layer conventions (busseg.layers): no viewer."""

from __future__ import annotations

import dataclasses
import gc
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from busseg.settings import InferenceSettings
from busseg.state import Event, NoHandler, ViewerState, viewer_state


class _Viewer:
    """Stands in for a napari viewer (the state is keyed by identity)."""


class _Proxy:
    """Stands in for napari's PublicOnlyProxy (``__wrapped__``)."""

    def __init__(self, viewer):
        self.__wrapped__ = viewer


def test_one_state_per_viewer_and_its_proxy():
    a, b = _Viewer(), _Viewer()
    assert viewer_state(a) is viewer_state(a) is viewer_state(_Proxy(a))
    assert viewer_state(a) is not viewer_state(b)


def test_checkpoint_and_session_announce_changes_once():
    state = ViewerState()
    seen = []
    state.checkpoint_changed.connect(seen.append)
    state.checkpoint = "ck"
    state.checkpoint = Path("ck")  # the same: no second event
    state.checkpoint = None
    assert seen == [Path("ck"), None]
    sessions = []
    state.session_changed.connect(sessions.append)
    marker = object()
    state.session = marker
    state.session = marker
    assert sessions == [marker]


def test_settings_vanish_with_their_publisher():
    state = ViewerState()
    assert state.settings is None

    class Publisher:
        pass

    pub = Publisher()
    seen = []
    state.settings_changed.connect(seen.append)
    state.publish_settings({"threshold": 0.4}, owner=pub)  # a mapping is made typed
    assert state.settings == InferenceSettings(threshold=0.4)
    with pytest.raises(dataclasses.FrozenInstanceError):  # nobody changes what others read
        state.settings.threshold = 0.9
    assert state.settings == InferenceSettings(threshold=0.4)
    state.publish_settings(InferenceSettings(threshold=0.4), owner=pub)  # unchanged: no event
    assert seen == [InferenceSettings(threshold=0.4)]
    with pytest.raises(TypeError, match="checkpoint"):  # not a setting: said, not dropped
        state.publish_settings({"checkpoint": None}, owner=pub)
    del pub
    gc.collect()
    assert state.settings is None


def test_actions_are_performed_and_held_weakly():
    state = ViewerState()

    class Widget:
        def segment(self, image=None):
            return ("segmented", image)

    w = Widget()
    with pytest.raises(NoHandler):
        state.perform("segment")
    state.offer("segment", w.segment)
    assert state.offers("segment") and state.handler("segment").__self__ is w
    assert state.perform("segment", "img") == ("segmented", "img")
    del w
    gc.collect()
    assert not state.offers("segment")
    with pytest.raises(NoHandler):
        state.perform("segment")


def test_holding_layers_nests_and_releases_once():
    state = ViewerState()
    events = []
    state.layers_held.connect(lambda: events.append("held"))
    state.layers_released.connect(lambda: events.append("released"))
    with state.holding_layers():
        assert state.layers_held_now
        with state.holding_layers():
            pass
        assert state.layers_held_now
    assert not state.layers_held_now
    assert events == ["held", "released"]
    got = []
    state.prompts_reused.connect(lambda name, old: got.append((name, old)))
    state.prompts_handed_over("scan 01", ("scan 00",))
    assert got == [("scan 01", ("scan 00",))]


def test_event_drops_dead_bound_methods():
    ev = Event()

    class Listener:
        def __init__(self):
            self.got = []

        def on(self, value):
            self.got.append(value)

    a = Listener()
    ev.connect(a.on)
    ev.emit(1)
    assert a.got == [1] and len(ev) == 1
    ev.disconnect(a.on)
    ev.emit(2)
    assert a.got == [1]
    b = Listener()
    ev.connect(b.on)
    del b
    gc.collect()
    ev.emit(3)
    assert len(ev) == 0


def test_layer_conventions():
    from busseg.layers import (
        busseg_metadata,
        data_sha1,
        ground_truth_name,
        image_name_of,
        is_spare,
        prediction_name,
        spatial_shape,
    )

    class Layer:
        def __init__(self, name, data, metadata=None, rgb=False):
            self.name, self.data, self.metadata, self.rgb = name, data, metadata or {}, rgb
            self.multiscale = False

    assert prediction_name("benign (4)") == "benign (4) prediction"
    assert ground_truth_name("benign (4)") == "benign (4) ground truth"
    assert image_name_of(Layer("scan 01 clicks", None)) == "scan 01"
    owned = Layer("x", None, {"busseg": {"image": "scan", "written_by": "segment widget"}})
    assert image_name_of(owned) == "scan" and busseg_metadata(owned)["image"] == "scan"
    assert is_spare(Layer("s", None, {"busseg": {"kind": "busseg spare"}}))
    a = np.zeros((3, 4), np.uint8)
    assert data_sha1(a) == data_sha1(a.copy()) != data_sha1(a.astype(bool))
    assert spatial_shape(Layer("rgb", np.zeros((5, 6, 3)), rgb=True)) == (5, 6)


def test_state_and_layers_import_no_qt_or_napari():
    code = ("import sys, busseg.state, busseg.layers\n"
            "bad = [m for m in sys.modules if m.split('.')[0] in "
            "('qtpy', 'PyQt5', 'PyQt6', 'PySide2', 'PySide6', 'napari', 'magicgui', 'torch')]\n"
            "assert not bad, bad\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
