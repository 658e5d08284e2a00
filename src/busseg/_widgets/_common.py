"""Small helpers shared by the napari-busseg dock widgets (napari side; imports no torch).

- Layer conventions (:func:`prediction_name`, :func:`ground_truth_name`,
  :func:`busseg_metadata`, :func:`find_layer` ...) are :mod:`busseg.layers`'s, re-exported.
- :func:`start_worker`: run a generator job in a napari worker and connect its signals.
- :func:`notify_info`, :func:`notify_warning`, :func:`notify_error`: napari notifications
  (one place for tests to monkeypatch).
- :func:`ask_yes_no`: a modal yes/no question (tests monkeypatch it; it is never called without
  a display).
- :func:`guarded` / :class:`WorkerError`: re-exported from :mod:`busseg.jobs`.
- :func:`wrap_label`, :func:`connect_layer_changes`, :func:`scroll_rows`, :func:`scroll_form`,
  :func:`fit_labels_on_show`, :class:`TextRow`: small Qt/napari wiring shared by widgets.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from magicgui.widgets import Label, ProgressBar, PushButton

from busseg.jobs import WorkerError, guarded  # noqa: F401  (Qt-free; re-exported)

# The layer conventions live in the Qt-free busseg.layers; these names stay importable here.
from busseg.layers import (  # noqa: F401
    GROUND_TRUTH_SUFFIX,
    META_KEY,
    PREDICTION_SUFFIX,
    SPARE_KIND,
    busseg_metadata,
    find_layer,
    ground_truth_name,
    is_spare,
    prediction_name,
)


def start_worker(job: Any, *, yielded: Any = None, returned: Any = None, errored: Any = None,
                 aborted: Any = None, finished: Any = None, start: bool = True) -> Any:
    """Run a job in a napari thread worker and connect its signals.

    Every long job of the widgets is a generator that yields progress events and returns its
    result (DESIGN practice 2); this is the one place that wraps it for napari.

    Parameters
    ----------
    job : generator or callable
        A generator (already made, its inputs snapshotted on the GUI thread): it runs wrapped
        in :func:`busseg.jobs.guarded`, so an exception reaches ``errored`` as a
        :class:`~busseg.jobs.WorkerError` with a readable message. Or a callable without
        arguments (a short job with no progress): its return value reaches ``returned``.
    yielded, returned, errored, aborted, finished : callable, optional
        Slots for the worker's signals (run on the GUI thread): ``yielded(event)``,
        ``returned(result)``, ``errored(exception)``, ``aborted()``, ``finished()``.
    start : bool
        Start the worker now; False: the caller calls ``worker.start()`` (e.g. after keeping
        a reference that the job itself may use).

    Returns
    -------
    napari.qt.threading.WorkerBase
        The worker (a generator's ``quit()`` stops it at its next yield).
    """
    import inspect

    from napari.qt.threading import create_worker

    args = (guarded, job) if inspect.isgenerator(job) else (job,)
    worker = create_worker(*args, _start_thread=False, _ignore_errors=True)
    for signal, slot in (("yielded", yielded), ("returned", returned), ("errored", errored),
                         ("aborted", aborted), ("finished", finished)):
        if slot is not None:
            getattr(worker, signal).connect(slot)
    if start:
        worker.start()
    return worker


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
                fit_width: bool = False, full_height_hint: bool = False) -> Any:
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
    full_height_hint : bool
        Ask for the form's whole height (Qt's scroll areas ask for at most 24 lines): where
        docks are stacked, this dock then gets the larger share of the height.

    Returns
    -------
    qtpy.QtWidgets.QScrollArea
        The scroll area, now the container's only child widget.
    """
    from qtpy.QtCore import Qt
    from qtpy.QtWidgets import QFrame, QScrollArea

    form = container[0].native
    scroll = _FullHeightScrollArea() if full_height_hint else QScrollArea()
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


class RunStatusMixin:
    """The status line and the end of a worker run, shared by "Segment lesions" and "Fine-tune".

    The widget has ``_status`` (a text widget), ``_progress`` (a progress bar) and ``_worker``.
    """

    def _set_status(self, text: str) -> None:
        self._status.value = text

    def _run_controls(self, start: str, stop: str) -> tuple[PushButton, PushButton]:
        """Make the progress bar ``_progress``; return new start and (disabled) stop buttons."""
        self._progress = ProgressBar(label="progress", min=0, max=1, value=0)
        return PushButton(text=start), PushButton(text=stop, enabled=False)

    def _on_errored(self, exc: BaseException) -> None:
        self._set_status(f"error: {exc}")

    def _end_run(self, start_btn: Any, stop_btn: Any) -> None:
        """Forget the worker, enable ``start_btn``, disable ``stop_btn``, fill an empty bar."""
        self._worker = None
        start_btn.enabled = True
        stop_btn.enabled = False
        if self._progress.max == 0:
            self._progress.max = 1


def _refit_on_layout(form: Any, attr: str, fit: Callable[[], None]) -> None:
    """Call ``fit`` now and whenever ``form`` is shown, restyled or laid out again.

    The event filter is kept alive as ``form.<attr>``.
    """
    from qtpy.QtCore import QEvent, QObject

    class _Filter(QObject):
        def eventFilter(self, obj: Any, event: Any) -> bool:  # noqa: N802 (Qt's name)
            if event.type() in (QEvent.Type.Show, QEvent.Type.StyleChange,
                                QEvent.Type.FontChange, QEvent.Type.LayoutRequest):
                fit()
            return False

    setattr(form, attr, _Filter(form))
    form.installEventFilter(getattr(form, attr))
    fit()


def _fit_width(scroll: Any, form: Any) -> None:
    """Widen ``scroll`` to ``form``'s minimum width whenever the form is laid out or styled."""

    def fit() -> None:
        bar = scroll.verticalScrollBar().sizeHint().width()
        width = form.minimumSizeHint().width() + bar
        if scroll.minimumWidth() != width:
            scroll.setMinimumWidth(width)

    _refit_on_layout(form, "_busseg_width_filter", fit)


class TextRow(Label):
    """A text row whose tooltip is its full text (set a custom tooltip after the value)."""

    @property
    def value(self) -> str:
        """The text."""
        return Label.value.fget(self)

    @value.setter
    def value(self, text: str) -> None:
        Label.value.fset(self, text)
        self.native.setToolTip(str(text or ""))


def scroll_form(container: Any, *, min_height: int = 120, object_name: str = "",
                min_width: int = 300) -> None:
    """Scroll a container's form of rows (:func:`scroll_rows`), rows at the top.

    Parameters
    ----------
    container : magicgui.widgets.Container
        A container whose first child is the form to scroll.
    min_height, object_name
        As :func:`scroll_rows`.
    min_width : int
        Minimum width of the form in pixels.
    """
    form = container[0].native
    form.layout().addStretch(1)  # rows at the top when the dock is taller than they are
    scroll_rows(container, min_height=min_height, object_name=object_name)
    form.setMinimumWidth(min_width)


def fit_label_column(form: Any) -> None:
    """Widen a labelled form's label column to its widest label in the font it is shown in.

    magicgui measures label widths in the application's default font; napari's stylesheet
    (applied when the widget is docked) may be larger, which clipped e.g. "checkpoint".
    """
    labels = []
    for w in form:
        lw = w._labeled_widget() if hasattr(w, "_labeled_widget") else None
        if lw is not None:
            labels.append(lw._label_widget.native)
    if labels:
        width = max(lab.fontMetrics().horizontalAdvance(lab.text()) for lab in labels) + 6
        for lab in labels:
            lab.setMinimumWidth(width)


def fit_labels_on_show(form: Any) -> None:
    """Run :func:`fit_label_column` whenever the form is shown or restyled."""
    from qtpy.QtCore import QEvent, QObject

    class _Filter(QObject):
        def eventFilter(self, obj: Any, event: Any) -> bool:  # noqa: N802 (Qt's name)
            if event.type() in (QEvent.Type.Show, QEvent.Type.StyleChange,
                                QEvent.Type.FontChange):
                fit_label_column(form)
            return False

    native = form.native
    native._busseg_label_filter = _Filter(native)  # kept alive by the widget
    native.installEventFilter(native._busseg_label_filter)


@functools.lru_cache(maxsize=1)
def _full_height_scroll_area_class() -> Any:
    from qtpy.QtCore import QSize
    from qtpy.QtWidgets import QScrollArea

    class FullHeightScrollArea(QScrollArea):
        """A scroll area whose size hint is its widget's full height."""

        def sizeHint(self) -> QSize:  # noqa: N802 (Qt's name)
            hint = super().sizeHint()
            inner = self.widget()
            if inner is not None:
                hint.setHeight(max(hint.height(), inner.sizeHint().height()
                                   + 2 * self.frameWidth()))
            return hint

    return FullHeightScrollArea


def _FullHeightScrollArea() -> Any:  # noqa: N802 (made like a class)
    return _full_height_scroll_area_class()()


def cap_height_to_content(scroll: Any) -> Any:
    """Keep a scroll area no taller than its content (re-measured whenever that changes).

    Where docks are stacked, a dock whose rows are all shown then leaves the rest of the
    height to the dock below it; a section unfolded later raises the cap again.

    Parameters
    ----------
    scroll : qtpy.QtWidgets.QScrollArea
        A scroll area made by :func:`scroll_rows`.

    Returns
    -------
    callable
        Re-measure now (e.g. after a section was folded or unfolded).
    """
    form = scroll.widget()

    def fit() -> None:
        layout = form.layout()
        width = scroll.viewport().width()
        if layout is not None and layout.hasHeightForWidth() and width > 0:
            content = layout.heightForWidth(width)  # wrapped rows at the width shown
        else:
            content = form.sizeHint().height()
        cap = max(scroll.minimumHeight(), content + 2 * scroll.frameWidth() + 2)
        if scroll.maximumHeight() != cap:
            scroll.setMaximumHeight(cap)
            outer = scroll.parentWidget()  # the widget's own container (no margins)
            if outer is not None:
                outer.setMaximumHeight(cap)

    _refit_on_layout(form, "_busseg_height_filter", fit)
    return fit
