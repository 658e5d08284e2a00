"""Keyboard shortcuts of the Scan browser (bound on the viewer, not globally).

N records the open case and moves on, Shift+N moves back (recording too), K leaves the case
without recording it (skip), Shift+S saves now, H records "no lesion"; G, Q, W and J are
Segment lesions' actions (segment, box prompts, click prompts, toggle the click label), which
that widget offers through the viewer's :class:`busseg.state.ViewerState`. None of them is one
of napari's default keys for the viewer or for Image, Labels, Shapes or Points layers.
:class:`KeysMixin` binds them and forwards the Segment lesions ones.
"""

from __future__ import annotations

import weakref
from typing import Any

from busseg.layers import find_layer
from busseg.state import NoHandler

__all__ = ["KeysMixin", "SHORTCUTS", "shortcut_help"]

#: Keyboard shortcuts bound on the viewer: key -> (action, method of the browser).
SHORTCUTS: dict[str, tuple[str, str]] = {
    "N": ("next case (records the open one)", "next_case"),
    "Shift-N": ("previous case (records the open one)", "previous_case"),
    "K": ("skip: next case without recording the open one", "skip_case"),
    "Shift-S": ("save the correction now", "save_correction"),
    "G": ("segment the open case (Segment lesions)", "segment_current"),
    "Q": ("box prompt mode", "box_mode"),
    "W": ("click prompt mode", "click_mode"),
    "J": ("toggle lesion / background click", "toggle_click_label"),
    "H": ("no lesion: clear the mask and record a normal scan", "no_lesion"),
}


def shortcut_help() -> str:
    """Return the keyboard shortcuts as text, one ``key: action`` per line."""
    return "\n".join(f"{k.replace('-', '+')}: {action}" for k, (action, _) in SHORTCUTS.items())


class KeysMixin:
    """Bind :data:`SHORTCUTS`; forward Segment lesions' keys through the viewer's state."""

    def segment_current(self) -> None:
        """Run Segment lesions on the open case (key G)."""
        if not self._can("segment"):
            return
        rec = self.open_record
        if rec is not None:
            image = find_layer(self._viewer, rec.name, "image")
            if image is not None:
                self._viewer.layers.selection.active = image
        self._perform("segment")

    def box_mode(self) -> None:
        """Switch Segment lesions to box prompts (key Q)."""
        self._perform("set_prompt_mode", "box")

    def click_mode(self) -> None:
        """Switch Segment lesions to click prompts (key W)."""
        self._perform("set_prompt_mode", "click")

    def toggle_click_label(self) -> None:
        """Toggle new clicks between lesion and background (key J)."""
        self._perform("toggle_click_label")

    def _can(self, action: str) -> bool:
        """Whether Segment lesions offers ``action``; else say how to get it."""
        if self._state.offers(action):
            return True
        self._notify_warning("Open the 'Segment lesions' widget (Plugins > BUS Seg) for this key.")
        return False

    def _perform(self, action: str, *args: Any) -> Any:
        """Perform a Segment lesions action (None, with a note, when it is not open)."""
        try:
            return self._state.perform(action, *args)
        except NoHandler:
            self._can(action)
            return None

    def _bind_keys(self) -> None:
        """Bind :data:`SHORTCUTS` on the viewer (not globally); a later browser rebinds them."""
        ref = weakref.ref(self)
        for key, (_, method) in SHORTCUTS.items():
            def action(_viewer: Any, method: str = method) -> None:
                widget = ref()
                if widget is not None:
                    getattr(widget, method)()

            action.__doc__ = SHORTCUTS[key][0]
            self._viewer.bind_key(key, action, overwrite=True)

    def _watch_window_close(self) -> None:
        """Autosave when the napari window closes (the layers are still there then)."""
        viewer = getattr(self._viewer, "__wrapped__", self._viewer)  # napari's PublicOnlyProxy
        qt_window = getattr(getattr(viewer, "window", None), "_qt_window", None)
        qt_window = getattr(qt_window, "__wrapped__", qt_window)
        if qt_window is None:
            return
        from qtpy.QtCore import QEvent, QObject

        ref = weakref.ref(self)

        class _CloseFilter(QObject):
            def eventFilter(self, obj: Any, event: Any) -> bool:  # noqa: N802 - Qt API
                if event.type() == QEvent.Type.Close:
                    widget = ref()
                    if widget is not None:
                        widget._autosave()
                        widget._viewer_closing = True  # late predictions are dropped
                return False

        self._close_filter = _CloseFilter(qt_window)
        qt_window.installEventFilter(self._close_filter)
