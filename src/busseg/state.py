"""One state object per napari viewer that the dock widgets observe (Qt-free).

The widgets of napari-busseg never look each other up. What they share lives in a
:class:`ViewerState`, found with :func:`viewer_state` (one per viewer, created on first use):

- ``session``: the :class:`busseg.session.AnnotationSession` of the folder the Scan browser
  shows (None before one is chosen);
- ``checkpoint``: the checkpoint folder in use (None: the shipped default model), set by the
  widget that chooses the model (Segment lesions) and by whatever adopts a new one (Fine-tune,
  learning as you go);
- ``settings``: the :class:`busseg.settings.InferenceSettings` the automatic predictions
  follow (threshold, flips, gate, region filter, fill holes, keep, min area, device),
  published by Segment lesions; None while no widget publishes them;
- ``segmenting``: the image layer name being segmented now, or None;
- actions: named callables a widget offers to the others (``"segment"``, ``"set_prompt_mode"``,
  ``"toggle_click_label"``, ``"clear_mask"``), called with :meth:`ViewerState.perform`;
- layer hand-over: :meth:`ViewerState.holding_layers` marks a span in which layers are renamed
  and swapped (observers pause), and :meth:`ViewerState.prompts_reused` tells observers that
  a prompt-layer pair now belongs to another image.

Each change is announced through an :class:`Event` (plain callbacks, no Qt), as micro-sam's
``sam_annotator/_state.py`` holds one annotator state that its widgets watch.
"""

from __future__ import annotations

import types
import weakref
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from busseg.settings import InferenceSettings

__all__ = ["Event", "NoHandler", "ViewerState", "viewer_state"]


def _ref(callback: Callable[..., Any]) -> Callable[[], Any]:
    """Return a weak reference to a bound method (a closed widget drops out), else a strong one."""
    if isinstance(callback, types.MethodType):
        return weakref.WeakMethod(callback)
    return lambda: callback


class NoHandler(LookupError):
    """Raised by :meth:`ViewerState.perform` when no widget offers the action."""


class Event:
    """A list of callbacks called with the event's arguments (a tiny, Qt-free signal).

    Bound methods are held weakly, so a closed widget drops out by itself.
    """

    def __init__(self) -> None:
        self._callbacks: list[Any] = []

    def connect(self, callback: Callable[..., Any]) -> Callable[..., Any]:
        """Call ``callback(*args)`` on every :meth:`emit`; returns ``callback``."""
        self._callbacks.append(_ref(callback))
        return callback

    def disconnect(self, callback: Callable[..., Any]) -> None:
        """Stop calling ``callback`` (no error when it was not connected)."""
        self._callbacks = [r for r in self._callbacks if r() not in (None, callback)]

    def emit(self, *args: Any) -> None:
        """Call every live callback with ``args``, in the order they were connected."""
        for ref in list(self._callbacks):
            cb = ref()
            if cb is not None:
                cb(*args)
        self._callbacks = [r for r in self._callbacks if r() is not None]

    def __len__(self) -> int:
        return sum(r() is not None for r in self._callbacks)


class ViewerState:
    """What the dock widgets of one viewer share: session, checkpoint, settings, actions.

    Attributes
    ----------
    session_changed, checkpoint_changed, settings_changed : Event
        Emitted with the new value when it changes.
    layers_held, layers_released : Event
        Emitted (no argument) when a :meth:`holding_layers` span begins and ends.
    prompts_reused : Event
        Emitted with ``(image_name, old_image_names)`` by :meth:`prompts_handed_over`.
    segmenting : str or None
        The image layer name a segmentation runs on now (set by Segment lesions).
    """

    def __init__(self) -> None:
        self._session: Any = None
        self._checkpoint: Path | None = None
        self._settings: InferenceSettings | None = None
        self._settings_owner: Any = None
        self._actions: dict[str, Any] = {}
        self._held = 0
        self.segmenting: str | None = None
        self.session_changed = Event()
        self.checkpoint_changed = Event()
        self.settings_changed = Event()
        self.layers_held = Event()
        self.layers_released = Event()
        self.prompts_reused = Event()

    # ------------------------------------------------------------------ session

    @property
    def session(self) -> Any:
        """The :class:`busseg.session.AnnotationSession` browsed now, or None."""
        return self._session

    @session.setter
    def session(self, value: Any) -> None:
        if value is not self._session:
            self._session = value
            self.session_changed.emit(value)

    # ------------------------------------------------------------------ checkpoint

    @property
    def checkpoint(self) -> Path | None:
        """The checkpoint folder in use; None for the shipped default model."""
        return self._checkpoint

    @checkpoint.setter
    def checkpoint(self, value: str | Path | None) -> None:
        value = None if value is None else Path(value)
        if value != self._checkpoint:
            self._checkpoint = value
            self.checkpoint_changed.emit(value)

    # ------------------------------------------------------------------ settings

    @property
    def settings(self) -> InferenceSettings | None:
        """The published inference settings; None while no widget publishes them."""
        if self._settings is None:
            return None
        owner = self._settings_owner() if self._settings_owner is not None else None
        if self._settings_owner is not None and owner is None:  # the publisher is gone
            self._settings = self._settings_owner = None
            return None
        return self._settings

    def publish_settings(self, settings: InferenceSettings | Mapping[str, Any],
                         owner: Any = None) -> None:
        """Publish the inference settings the viewer's automatic predictions follow.

        Parameters
        ----------
        settings : busseg.settings.InferenceSettings or mapping
            Threshold, flips, gate, region filter, post-processing, device; a mapping of
            those fields is made an ``InferenceSettings`` (immutable, so nobody changes what
            another widget reads).
        owner : object, optional
            The publisher, held weakly: once it is garbage, :attr:`settings` is None again.

        Raises
        ------
        TypeError, ValueError
            For a mapping with a key that is not a setting, or a value out of range.
        """
        from busseg.settings import InferenceSettings

        new = InferenceSettings.coerce(settings, "publish_settings")
        changed = new != self._settings
        self._settings = new
        self._settings_owner = weakref.ref(owner) if owner is not None else None
        if changed:
            self.settings_changed.emit(new)

    def withdraw_settings(self, owner: Any = None) -> None:
        """Stop publishing settings (``owner``: only when it is the publisher)."""
        current = self._settings_owner() if self._settings_owner is not None else None
        if owner is not None and current is not owner:
            return
        self._settings = self._settings_owner = None
        self.settings_changed.emit(None)

    # ------------------------------------------------------------------ actions

    def offer(self, name: str, callback: Callable[..., Any]) -> None:
        """Offer an action to the other widgets (a bound method is held weakly).

        Parameters
        ----------
        name : str
            E.g. ``"segment"``, ``"set_prompt_mode"``, ``"toggle_click_label"``,
            ``"clear_mask"``.
        callback : callable
            Called by :meth:`perform` with its arguments; a later offer replaces it.
        """
        self._actions[name] = _ref(callback)

    def withdraw(self, name: str) -> None:
        """Withdraw an action (no error when it is not offered)."""
        self._actions.pop(name, None)

    def offers(self, name: str) -> bool:
        """Whether a live widget offers the action ``name``."""
        ref = self._actions.get(name)
        return ref is not None and ref() is not None

    def handler(self, name: str) -> Callable[..., Any] | None:
        """Return the live callable offered as ``name``, or None."""
        ref = self._actions.get(name)
        return ref() if ref is not None else None

    def perform(self, name: str, *args: Any, **kwargs: Any) -> Any:
        """Call the action ``name`` and return what it returns.

        Raises
        ------
        NoHandler
            When no live widget offers it (e.g. "Segment lesions" is not open).
        """
        ref = self._actions.get(name)
        callback = ref() if ref is not None else None
        if callback is None:
            self._actions.pop(name, None)
            raise NoHandler(name)
        return callback(*args, **kwargs)

    # ------------------------------------------------------------------ layer hand-over

    @property
    def layers_held_now(self) -> bool:
        """Whether layers are being renamed and swapped (inside :meth:`holding_layers`)."""
        return self._held > 0

    @contextmanager
    def holding_layers(self) -> Iterator[None]:
        """Mark a span in which a case's layers are renamed and swapped (nests).

        Observers ignore layer-list changes between :attr:`layers_held` and
        :attr:`layers_released` (emitted once, when the outermost span ends).
        """
        self._held += 1
        if self._held == 1:
            self.layers_held.emit()
        try:
            yield
        finally:
            self._held -= 1
            if not self._held:
                self.layers_released.emit()

    def prompts_handed_over(self, image_name: str, old_names: tuple[str, ...]) -> None:
        """Announce that a boxes/clicks pair now belongs to ``image_name`` (was ``old_names``)."""
        self.prompts_reused.emit(image_name, tuple(old_names))


_STATES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_BY_ID: dict[int, tuple[Any, ViewerState]] = {}


def _unwrapped(viewer: Any) -> Any:
    """Return the viewer behind napari's ``PublicOnlyProxy`` (plugins are given the proxy)."""
    return getattr(viewer, "__wrapped__", viewer)


def viewer_state(viewer: Any) -> ViewerState:
    """Return the :class:`ViewerState` of a viewer (made on first use).

    Parameters
    ----------
    viewer : napari.viewer.Viewer or any object
        The viewer (napari's public proxy of it gives the same state).

    Returns
    -------
    ViewerState
        The same object for the same viewer for as long as the viewer lives.
    """
    key = _unwrapped(viewer)
    try:
        state = _STATES.get(key)
        if state is None:
            state = _STATES[key] = ViewerState()
        return state
    except TypeError:  # not weak-referenceable: keyed by identity while it lives
        entry = _BY_ID.get(id(key))
        if entry is None or entry[0] is not key:
            entry = _BY_ID[id(key)] = (key, ViewerState())
        return entry[1]
