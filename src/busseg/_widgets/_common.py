"""Small helpers shared by the napari-busseg dock widgets (napari side; imports no torch).

- Layer names: :func:`prediction_name` (``"<image layer name> prediction"``, the editable Labels
  layer the segment widget writes and the Scan browser saves as a correction) and
  :func:`ground_truth_name` (``"<image layer name> ground truth"``, written by the reader).
- :func:`busseg_metadata`: the ``layer.metadata["busseg"]`` dict the reader and widgets attach.
- :func:`find_layer`: a layer by name (and optionally kind) or ``None``.
- :func:`notify_info`, :func:`notify_warning`, :func:`notify_error`: napari notifications
  (one place for tests to monkeypatch).
- :func:`ask_yes_no`: a modal yes/no question (tests monkeypatch it; it is never called without
  a display).
- :func:`guarded` / :class:`WorkerError`: re-exported from :mod:`busseg.jobs`.
- :func:`wrap_label`, :func:`connect_layer_changes`: small Qt/napari wiring shared by widgets.
"""

from __future__ import annotations

from typing import Any

from busseg.jobs import WorkerError, guarded  # noqa: F401  (Qt-free; re-exported)

#: Key of the plugin's entry in ``layer.metadata``.
META_KEY = "busseg"
#: Suffix of the editable prediction Labels layer: ``"<image layer name> prediction"``.
PREDICTION_SUFFIX = " prediction"
#: Suffix of the ground-truth Labels layer: ``"<image layer name> ground truth"``.
GROUND_TRUTH_SUFFIX = " ground truth"


#: Metadata kind (and name prefix) of the hidden layers the Scan browser makes ahead for the
#: next case to take over; widgets do not offer them as images.
SPARE_KIND = "busseg spare"


def is_spare(layer: Any) -> bool:
    """Whether ``layer`` is one of the Scan browser's hidden spare layers."""
    return busseg_metadata(layer).get("kind") == SPARE_KIND


def prediction_name(image_name: str) -> str:
    """Name of the prediction Labels layer of an image layer.

    Parameters
    ----------
    image_name : str
        The image layer's name, e.g. ``"benign (4)"``.

    Returns
    -------
    str
        ``"<image_name> prediction"``.
    """
    return f"{image_name}{PREDICTION_SUFFIX}"


def ground_truth_name(image_name: str) -> str:
    """Name of the ground-truth Labels layer of an image layer.

    Parameters
    ----------
    image_name : str
        The image layer's name, e.g. ``"benign (4)"``.

    Returns
    -------
    str
        ``"<image_name> ground truth"``.
    """
    return f"{image_name}{GROUND_TRUTH_SUFFIX}"


def busseg_metadata(layer: Any) -> dict:
    """Return the plugin's metadata of a layer.

    Parameters
    ----------
    layer : napari.layers.Layer or None
        Any layer.

    Returns
    -------
    dict
        ``layer.metadata["busseg"]`` (keys such as ``source``, ``label``, ``name``, ``root``,
        ``original_size``, ``slices``; see :mod:`busseg._reader`), or an empty dict when the
        layer has none.
    """
    meta = getattr(layer, "metadata", None) or {}
    value = meta.get(META_KEY)
    return value if isinstance(value, dict) else {}


def find_layer(viewer: Any, name: str, layer_type: str | None = None) -> Any:
    """Find a layer by name.

    Parameters
    ----------
    viewer : napari.viewer.Viewer
        The viewer to search.
    name : str
        Exact layer name.
    layer_type : {"image", "labels"} or None
        Only accept a layer of this kind.

    Returns
    -------
    napari.layers.Layer or None
        The layer, or ``None`` when no layer has that name (or it is of another kind).
    """
    for layer in viewer.layers:
        if layer.name != name:
            continue
        if layer_type is None or _is_kind(layer, layer_type):
            return layer
    return None


def _is_kind(layer: Any, layer_type: str) -> bool:
    import napari.layers

    kinds = {"image": napari.layers.Image, "labels": napari.layers.Labels}
    if layer_type not in kinds:
        raise ValueError(f"layer_type must be one of {sorted(kinds)}, got {layer_type!r}")
    return isinstance(layer, kinds[layer_type])


def notify_info(message: str) -> None:
    """Show an information notification in napari (and the log when there is no window)."""
    from napari.utils.notifications import show_info

    show_info(message)


def notify_warning(message: str) -> None:
    """Show a warning notification in napari."""
    from napari.utils.notifications import show_warning

    show_warning(message)


def notify_error(message: str) -> None:
    """Show an error notification in napari; use it instead of raising from a widget slot."""
    from napari.utils.notifications import show_error

    show_error(message)


def ask_yes_no(title: str, text: str, parent: Any = None) -> bool:
    """Ask a modal yes/no question; "No" is the default button.

    Parameters
    ----------
    title, text : str
        Window title and question.
    parent : QWidget, optional
        The dialog's parent (e.g. a widget's ``native``).

    Returns
    -------
    bool
        True when the user answered Yes.
    """
    from qtpy.QtWidgets import QMessageBox

    answer = QMessageBox.question(
        parent,
        title,
        text,
        QMessageBox.StandardButton.Yes | QMessageBox.StandardButton.No,
        QMessageBox.StandardButton.No,
    )
    return answer == QMessageBox.StandardButton.Yes


def wrap_label(label: Any) -> None:
    """Word-wrap a status label without letting long text widen the dock."""
    from qtpy.QtWidgets import QSizePolicy

    label.native.setWordWrap(True)
    policy = QSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Preferred)
    policy.setHeightForWidth(True)  # keep the word-wrap height; a new policy drops it
    label.native.setSizePolicy(policy)
    label.native.setMinimumWidth(120)


def connect_layer_changes(viewer: Any, callback: Any) -> None:
    """Call ``callback`` whenever layers are inserted, removed, moved, reordered or renamed.

    Parameters
    ----------
    viewer : napari.viewer.Viewer
        The viewer whose layer list is watched.
    callback : callable
        Connected to each of those layer-list events that this napari version has.
    """
    ev = viewer.layers.events
    for name in ("inserted", "removed", "moved", "reordered", "renamed"):
        emitter = getattr(ev, name, None)
        if emitter is not None:
            emitter.connect(callback)


def scroll_rows(container: Any, *, min_height: int = 120, object_name: str = "",
                fit_width: bool = False) -> Any:
    """Put a container's first child (the form of rows) into a vertical scroll area.

    A short dock (other docks beside it, a 900-pixel screen) then scrolls instead of
    squashing its rows or forcing the window taller.

    Parameters
    ----------
    container : magicgui.widgets.Container
        A container whose first child is the form to scroll.
    min_height : int
        Minimum height of the scroll area in pixels (the dock's minimum, nearly).
    object_name : str
        Qt object name of the scroll area (tests find it by this name).
    fit_width : bool
        Keep the scroll area at least as wide as the form's minimum width (plus the scroll
        bar), in the font and style it is shown in, so rows of buttons are never clipped
        (there is no horizontal scroll bar).

    Returns
    -------
    qtpy.QtWidgets.QScrollArea
        The scroll area, now the container's only child widget.
    """
    from qtpy.QtCore import Qt
    from qtpy.QtWidgets import QFrame, QScrollArea

    form = container[0].native
    scroll = QScrollArea()
    if object_name:
        scroll.setObjectName(object_name)
    scroll.setWidgetResizable(True)
    scroll.setFrameShape(QFrame.Shape.NoFrame)
    scroll.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
    scroll.setVerticalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAsNeeded)
    scroll.setMinimumHeight(min_height)
    layout = container.native.layout()
    layout.removeWidget(form)
    scroll.setWidget(form)
    layout.addWidget(scroll)
    layout.setContentsMargins(0, 0, 0, 0)
    if fit_width:
        _fit_width(scroll, form)
    return scroll


def _fit_width(scroll: Any, form: Any) -> None:
    """Widen ``scroll`` to ``form``'s minimum width whenever the form is laid out or styled."""
    from qtpy.QtCore import QEvent, QObject

    def fit() -> None:
        bar = scroll.verticalScrollBar().sizeHint().width()
        width = form.minimumSizeHint().width() + bar
        if scroll.minimumWidth() != width:
            scroll.setMinimumWidth(width)

    class _Filter(QObject):
        def eventFilter(self, obj: Any, event: Any) -> bool:  # noqa: N802 (Qt's name)
            if event.type() in (QEvent.Type.Show, QEvent.Type.StyleChange,
                                QEvent.Type.FontChange, QEvent.Type.LayoutRequest):
                fit()
            return False

    form._busseg_width_filter = _Filter(form)  # kept alive by the form
    form.installEventFilter(form._busseg_width_filter)
    fit()
