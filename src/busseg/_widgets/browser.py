"""The "Scan browser" dock widget: annotate a folder of scans one case at a time.

A thin view (DESIGN practice 3) of :class:`busseg.session.AnnotationSession` (the case list,
the current case, recording, progress, learning as you go; Qt-free and driven headless by
``benchmarks/annotation_session.py`` too), which it shares with the other widgets of its
viewer through :class:`busseg.state.ViewerState`. Folders are read by
:func:`busseg.data.discover`; a case by :func:`busseg._reader.read_case`; predictions,
fine-tunes and rankings run in workers (:func:`busseg._widgets._common.start_worker`).
One module per thing a person does:

- this module: the widget, its rows and public actions;
- :mod:`~busseg._widgets.browser_cases`: the case list, statuses, progress and recording;
- :mod:`~busseg._widgets.browser_layers`: the open case's layers and their hand-over;
- :mod:`~busseg._widgets.browser_predict`: prediction on open and prefetch;
- :mod:`~busseg._widgets.browser_learning`: learning as you go;
- :mod:`~busseg._widgets.browser_ranking`: ranking by uncertainty;
- :mod:`~busseg._widgets.browser_keys`: the keyboard shortcuts.

One case at a time. The viewer holds the open case's layers only: for a case ``<stem>``,
``"<stem>"`` (the grey image), ``"<stem> ground truth"`` where the folder has masks,
``"<stem> prediction"`` (the editable Labels layer: the prediction on open, Segment lesions'
output, or the stored mask of a recorded case) and Segment lesions' ``"<stem> boxes"``,
``"<stem> clicks"`` and ``"<stem> probability"`` (:mod:`busseg.layers`).

Leaving a case records it in the corrections folder (:meth:`ScanBrowserWidget.next_case`: an
edited mask as corrected, an unedited automatic prediction as accepted, keeping an earlier
mask under ``versions/``); Skip (key K) leaves it without recording. When no corrections
folder is chosen, one is made under ``~/.busseg/corrections/`` for the dataset
(``BUSSEG_HOME`` overrides ``~/.busseg``), so reopening the same folder later shows every
case's status and "Resume" continues at the first case not recorded. The status area has a
line for the session's site calibration (``session.calibration_text()``) when it has one.

Keyboard shortcuts: :data:`SHORTCUTS` (N next, Shift+N previous, K skip, Shift+S save, G
segment, Q box prompts, W click prompts, J toggle the click label, H no lesion).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from magicgui.widgets import (
    CheckBox,
    ComboBox,
    Container,
    FileEdit,
    Label,
    ProgressBar,
    PushButton,
    Select,
    SpinBox,
)

from busseg._widgets._common import (
    find_layer,
    notify_error,
    notify_info,
    notify_warning,
    prediction_name,
    scroll_rows,
    wrap_label,
)
from busseg._widgets.browser_cases import (  # noqa: F401  (re-exported)
    ALL,
    CaseListMixin,
    default_corrections_dir,
    layer_edited,
    mark_saved,
)
from busseg._widgets.browser_keys import SHORTCUTS, KeysMixin, shortcut_help  # noqa: F401
from busseg._widgets.browser_layers import SPARE, WRITTEN_BY, CaseLayersMixin  # noqa: F401
from busseg._widgets.browser_learning import LEARNING_TOOLTIP, LearningMixin
from busseg._widgets.browser_predict import PredictMixin
from busseg._widgets.browser_ranking import (  # noqa: F401
    SORT_NAME,
    SORT_UNCERTAINTY,
    RankingMixin,
)
from busseg.corrections import CORRECTED, NOT_SEGMENTED, PREDICTED
from busseg.data.busi import BusiRecord
from busseg.layers import CASE_LAYER_SUFFIXES  # noqa: F401  (re-exported)
from busseg.session import DEFAULT_LEARN_EVERY, AnnotationSession
from busseg.state import viewer_state

__all__ = ["BusiBrowserWidget", "SHORTCUTS", "ScanBrowserWidget", "default_corrections_dir",
           "layer_edited", "rank_job", "shortcut_help"]

#: Minimum height (pixels) of the browser's scroll area: the dock's minimum, nearly.
MIN_HEIGHT = 160


def rank_job(paths: list[Path], checkpoint: Path | None, cache: Any = True):
    """Rank images by uncertainty in a worker thread (see :func:`busseg.uncertainty.rank_iter`).

    Parameters
    ----------
    paths : list of pathlib.Path
        Image files.
    checkpoint : pathlib.Path or None
        Checkpoint folder; None for the shipped default model.
    cache : UncertaintyCache or bool
        As in :func:`busseg.uncertainty.rank_iter` (True: the process-wide cache).

    Yields
    ------
    tuple
        ``("checkpoint", key)`` first (:func:`busseg.uncertainty.checkpoint_key`), then the
        events of :func:`busseg.uncertainty.rank_iter`.

    Returns
    -------
    busseg.uncertainty.Ranking
    """
    from busseg.uncertainty import checkpoint_key, rank_iter

    yield ("checkpoint", checkpoint_key(checkpoint))
    return (yield from rank_iter(paths, checkpoint, cache=cache))


class _CaseList(Select):
    """A list whose items the browser owns.

    napari calls ``reset_choices`` on dock widgets whenever layers change, and magicgui resets
    a categorical widget to its initial choices then; the browser rebuilds the list itself
    (its ``_refresh_list``), so the reset is a no-op here.
    """

    def reset_choices(self, *_: Any) -> None:
        """Keep the items (the browser refreshes them)."""


class ScanBrowserWidget(KeysMixin, CaseListMixin, CaseLayersMixin, PredictMixin,
                        LearningMixin, RankingMixin, Container):
    """Annotate a folder of scans case by case: autosave, progress, learning as you go.

    Shown as "Scan browser". Opens BUSI, BUS-BRA- and BUS-UCLM-style image/mask folder pairs
    and plain folders of scans (:func:`busseg.data.discover`).

    Parameters
    ----------
    napari_viewer : napari.viewer.Viewer
        The viewer (napari passes it when the widget is opened from the Plugins menu).

    Notes
    -----
    Public methods mirror the buttons and keys, for scripts and tests: :meth:`set_root`,
    :meth:`set_corrections`, :meth:`set_class_filter`, :meth:`select`, :meth:`open_current`,
    :meth:`next_case`, :meth:`skip_case`, :meth:`previous_case`, :meth:`resume`,
    :meth:`save_correction`,
    :meth:`no_lesion`, :meth:`save_open_case`, :meth:`set_learning`, :meth:`rank`,
    :meth:`cancel_ranking`, :meth:`set_sort`, :meth:`next_suggested`; :attr:`records` lists
    the cases shown, :attr:`session` is the :class:`~busseg.session.AnnotationSession`,
    :meth:`status_of` a case's status and :meth:`score_of` its uncertainty.
    :attr:`prefetch_next` (default True) switches the background prediction of the next case
    on or off; :attr:`prefetch_running` and :attr:`predicting` say whether a prefetch or the
    open case's prediction is running, :attr:`closing_pending` whether the hidden layers of
    the case left last are still to be removed.
    """

    #: How often (ms) the Segment lesions widget's checkpoint is compared with the ranked one.
    CHECKPOINT_POLL_MS = 500
    #: Delay (ms) between moving on and removing the left case's (hidden) layers, so the new
    #: case is drawn first: napari ends a layer removal with a full garbage collection.
    CLOSE_DELAY_MS = 250
    #: Rows of the case list kept in view (the list gets any spare height besides).
    LIST_ROWS = 10

    def __init__(self, napari_viewer: Any) -> None:
        super().__init__(labels=True)
        self._viewer = napari_viewer
        self._state = viewer_state(napari_viewer)
        self._record_on_leave = True  # False while Skip leaves a case
        self._session: AnnotationSession | None = None
        self._root: Path | None = None
        self._all: list[BusiRecord] = []
        self._shown: list[int] = []
        self._refreshing = False
        self._pending: set[str] = set()
        self._workers: list[Any] = []
        self._scores: dict[str, float] = {}
        self._ranked_key: tuple | None = None
        self._ranked_checkpoint: Path | None = None
        self._rank_worker: Any = None
        self._suggest_after_rank = False
        self._last_list_refresh = 0.0
        self._open_index: int | None = None  # the case whose layers are in the viewer
        self._closing_case = False
        self._viewer_closing = False
        self._store_error: str | None = None
        self._finetune_worker: Any = None
        self._doomed: list = []  # the left case's hidden layers, removed after a delay
        self._spares: dict[str, Any] = {}  # hidden layers made ahead, by role (warm-up)
        self._prefetch_worker: Any = None  # one at a time
        self._prefetch_wanted: int | None = None  # started when the running one finishes
        self._prefetch_index: int | None = None  # the case the running prefetch is for
        #: Predict the next case of the list in the background while a case is open.
        self.prefetch_next = True
        #: Add the layers of the first case (hidden) when a folder is chosen.
        self.warm_up = True
        #: Keyword arguments of :func:`busseg.finetune.finetune_iter` for learning as you go
        #: (see :class:`busseg.session.AnnotationSession`); applied to the next folder opened.
        self.finetune_options: dict = {}

        self._make_rows()
        self._lay_out_rows()
        self._set_tooltips()
        self._connect()
        root = self._root_from_layers()
        if root is not None:
            self.set_root(root)

    def _make_rows(self) -> None:
        """Make the rows of the dock."""
        self._root_edit = FileEdit(mode="d", label="Scans", nullable=True,
                                   tooltip="a folder of scans: BUSI, Images/ + Masks/ "
                                           "(BUS-BRA), images/ + masks/ (BUS-UCLM) or plain")
        self._from_layer_btn = PushButton(text="Use folder of the opened layer")
        self._class_combo = ComboBox(label="Class", choices=self._class_choices, value=ALL)
        self._cases = _CaseList(label="Cases")
        self._sort_combo = ComboBox(label="Sort", choices=[SORT_NAME, SORT_UNCERTAINTY],
                                    value=SORT_NAME)
        self._rank_btn = PushButton(text="Rank by uncertainty")
        self._rank_cancel_btn = PushButton(text="Cancel", enabled=False)
        self._rank_progress = ProgressBar(label="Ranking", min=0, max=1, value=0)
        self._suggest_btn = PushButton(text="Next suggested")
        self._predict_check = CheckBox(text="Predict on open", value=True)
        self._model_edit = FileEdit(
            mode="d", label="Model", nullable=True, tooltip="checkpoint folder; empty: default"
        )
        self._prev_btn = PushButton(text="< Previous")
        self._open_btn = PushButton(text="Open")
        self._next_btn = PushButton(text="Next >")
        self._resume_btn = PushButton(text="Resume")
        self._corr_edit = FileEdit(mode="d", label="Corrections", nullable=True)
        self._save_btn = PushButton(text="Save correction")
        self._no_lesion_btn = PushButton(text="No lesion")
        self._progress_label = Label(value="0 of 0 recorded")
        self._progress = ProgressBar(label="Recorded", min=0, max=1, value=0)
        # on by default: the annotation-session benchmark measured 2.03 interactions per scan with
        # it against 2.31 without (benchmarks/results/learning/annotation_session.md)
        # off by default: on the annotation-session benchmark the site fine-tunes add nothing
        # measurable on top of the site calibration, which is always on (README)
        self._learn_check = CheckBox(text="Learn as you go, every", value=False)
        self._learn_spin = SpinBox(label="every", value=DEFAULT_LEARN_EVERY, min=2, max=1000,
                                   tooltip="fine-tune after this many new corrections")
        self._keys_label = Label(value="Keys: " + " · ".join(
            f"{k.replace('-', '+')} {a.split(' (')[0].split(':')[0]}"
            for k, (a, _) in SHORTCUTS.items()))
        self._status = Label(value="Choose a folder of scans.")
        self._calibration = Label(value="", visible=False)  # the session's site calibration
        self._skip_btn = PushButton(text="Skip")


    def _lay_out_rows(self) -> None:
        """Lay the rows out in a scroll area; the case list takes the spare height."""
        nav = Container(
            layout="horizontal",
            labels=False,
            widgets=[self._prev_btn, self._open_btn, self._next_btn, self._skip_btn,
                     self._resume_btn],
        )
        nav.margins = (0, 0, 0, 0)
        ranking = Container(
            layout="horizontal",
            labels=False,
            widgets=[self._rank_btn, self._rank_cancel_btn, self._suggest_btn],
        )
        ranking.margins = (0, 0, 0, 0)
        saving = Container(layout="horizontal", labels=False,
                           widgets=[self._save_btn, self._no_lesion_btn])
        saving.margins = (0, 0, 0, 0)
        learning = Container(layout="horizontal", labels=False,
                             widgets=[self._learn_check, self._learn_spin,
                                      Label(value="corrections")])
        learning.margins = (0, 0, 0, 0)
        rows = Container(
            labels=True,
            widgets=[  # what the annotator uses on every scan first, then the set-up
                self._root_edit,
                self._cases,
                nav,
                saving,
                self._progress_label,
                self._progress,
                self._status,
                self._calibration,
                self._class_combo,
                self._sort_combo,
                ranking,
                self._rank_progress,
                self._predict_check,
                self._model_edit,
                self._corr_edit,
                learning,
                self._from_layer_btn,
                self._keys_label,
            ],
        )
        rows.margins = (4, 4, 4, 4)
        self.append(rows)
        self._scroll = scroll_rows(self, min_height=MIN_HEIGHT, fit_width=True,
                                   object_name="busseg_browser_scroll", full_height_hint=True)
        from qtpy.QtWidgets import QAbstractItemView

        self._cases.native.setSelectionMode(QAbstractItemView.SelectionMode.SingleSelection)
        self._fit_list_height()  # the list takes the spare height too
        row = self._cases.native  # the list's row in the form (its labelled wrapper)
        while row is not None and row.parentWidget() is not rows.native:
            row = row.parentWidget()
        if row is not None:
            rows.native.layout().setStretchFactor(row, 1)
        wrap_label(self._status)
        wrap_label(self._keys_label)
        wrap_label(self._progress_label)

    def _fit_list_height(self) -> None:
        """Keep :attr:`LIST_ROWS` rows of the case list in view, even in a short dock.

        The list gets room for that many rows (fewer when it has fewer), and the dock's
        minimum height covers the folder row above it and the list: stacked under
        "Segment lesions" in a 900-pixel window, the dock is that tall at least.
        """
        lw = self._cases.native
        n = min(max(lw.count(), 4), self.LIST_ROWS)
        row = lw.sizeHintForRow(0) if lw.count() else lw.fontMetrics().height() + 4
        height = n * max(row, 1) + 2 * lw.frameWidth() + 2
        if lw.minimumHeight() != height:
            lw.setMinimumHeight(height)
        form = self._scroll.widget()
        spacing = max(form.layout().spacing(), 0)
        above = self._root_edit.native.sizeHint().height() + spacing + 8  # margins: 4 + 4
        want = max(MIN_HEIGHT, above + height + 2 * self._scroll.frameWidth() + 2)
        if self._scroll.minimumHeight() != want:
            self._scroll.setMinimumHeight(want)

    def _set_tooltips(self) -> None:
        """Say what each control does (and which key does it)."""
        self._cases.tooltip = (
            "What the annotator decided, as recorded in the corrections folder: [accepted] the "
            "prediction as it was, [corrected] an edited mask, [brushed] drawn by hand, "
            "[normal] no lesion; [predicted]: its prediction layer is open, not recorded yet; "
            "no mark: not segmented. u: uncertainty of the model's prediction (0 sure, 1 "
            "unsure; 'Rank by uncertainty'). Double-click to open."
        )
        self._rank_btn.tooltip = (
            "Score every case with the 'Segment lesions' checkpoint (or 'Model' below when that "
            "widget is not open): entropy of the lesion probabilities around the predicted "
            "lesion and disagreement with the flipped image. Cached per checkpoint and image."
        )
        self._suggest_btn.tooltip = (
            "Open the most uncertain case of the list that has no saved correction yet"
        )
        self._next_btn.tooltip = ("Record the open case (edited: corrected; the prediction as "
                                  "it was: accepted) and open the next case (key N)")
        self._prev_btn.tooltip = "Record the open case and open the previous case (Shift+N)"
        self._skip_btn.tooltip = "Open the next case without recording the open one (key K)"
        self._resume_btn.tooltip = "Open the first case not recorded yet"
        self._save_btn.tooltip = (
            "Save the open case's prediction layer now (Shift+S); moving on saves an edited "
            "mask by itself. An earlier correction is kept under versions/.")
        self._no_lesion_btn.tooltip = "Clear the mask and record the case as a normal scan (H)"
        self._corr_edit.tooltip = (
            "where corrected masks go (BUSI layout: <class>/<case>_mask.png); default: "
            "~/.busseg/corrections/<folder>-<id>")
        self._predict_check.tooltip = (
            "Show the automatic prediction when a case opens, and predict the next case in the "
            "background meanwhile, so Next shows its mask at once (Segment lesions' model and "
            "settings; without that widget, 'Model' below)")
        self._learn_check.tooltip = LEARNING_TOOLTIP
        self.tooltip = "Keyboard shortcuts (in the viewer):\n" + shortcut_help()
        self._keys_label.tooltip = self.tooltip

    def _connect(self) -> None:
        """Connect the controls, the layer list, the keys and the window's close."""
        self._cases.native.itemDoubleClicked.connect(lambda *_: self.open_current())

        self._root_edit.changed.connect(self._on_root_changed)
        self._from_layer_btn.changed.connect(self._on_from_layer)
        self._class_combo.changed.connect(self._on_filter_changed)
        self._open_btn.changed.connect(self.open_current)
        self._prev_btn.changed.connect(self.previous_case)
        self._next_btn.changed.connect(self.next_case)
        self._skip_btn.changed.connect(self.skip_case)
        self._resume_btn.changed.connect(self.resume)
        self._corr_edit.changed.connect(self._on_corrections_changed)
        self._save_btn.changed.connect(self.save_correction)
        self._no_lesion_btn.changed.connect(self.no_lesion)
        self._learn_check.changed.connect(self._on_learning_changed)
        self._predict_check.changed.connect(self._on_predict_changed)
        self._learn_spin.changed.connect(self._on_learning_changed)
        self._sort_combo.changed.connect(self._on_sort_changed)
        self._rank_btn.changed.connect(self.rank)
        self._rank_cancel_btn.changed.connect(self.cancel_ranking)
        self._suggest_btn.changed.connect(self.next_suggested)
        from qtpy.QtCore import QTimer

        self._poll = QTimer(self.native)
        self._poll.setInterval(self.CHECKPOINT_POLL_MS)
        self._poll.timeout.connect(self._on_checkpoint_poll)
        self._close_timer = QTimer(self.native)
        self._close_timer.setSingleShot(True)
        self._close_timer.setInterval(self.CLOSE_DELAY_MS)
        self._close_timer.timeout.connect(self._remove_doomed)
        self._viewer.layers.events.inserted.connect(self._on_layers_changed)
        self._viewer.layers.events.removed.connect(self._on_layer_removed)
        self._bind_keys()
        self._watch_window_close()

    # ---------------------------------------------------------------- public API

    @property
    def session(self) -> AnnotationSession | None:
        """The annotation session of the folder browsed now (None before one is chosen)."""
        return self._session

    @property
    def records(self) -> list[BusiRecord]:
        """The cases listed now (after the class filter), in list order."""
        return [self._all[i] for i in self._shown]

    @property
    def root(self) -> Path | None:
        """The folder being browsed (as resolved by :func:`busseg.data.discover`), or None."""
        return self._root

    @property
    def open_record(self) -> BusiRecord | None:
        """The case whose layers are in the viewer, or None."""
        return self._all[self._open_index] if self._open_index is not None else None

    def set_root(self, path: str | Path) -> None:
        """Browse the folder of scans at ``path`` (a layout :func:`busseg.data.discover` reads)."""
        self._root_edit.value = Path(path)  # emits changed -> _on_root_changed

    def set_corrections(self, path: str | Path) -> None:
        """Use ``path`` as the corrections folder (created on the first save)."""
        self._corr_edit.value = Path(path)

    def set_class_filter(self, label: str) -> None:
        """Show ``"all"`` cases or one class present in the folder (``"benign"``, ``"unknown"``)."""
        self._class_combo.value = label

    def set_learning(self, on: bool, every: int | None = None) -> None:
        """Switch learning as you go on or off; ``every``: new corrections between fine-tunes."""
        if every is not None:
            self._learn_spin.value = int(every)
        self._learn_check.value = bool(on)

    def current_record(self) -> BusiRecord | None:
        """Return the selected case, or None."""
        value = self._cases.value
        return self._all[value[0]] if value else None

    def select(self, position: int) -> BusiRecord | None:
        """Select the case at ``position`` in the shown list (no layer is opened)."""
        if not self._shown:
            return None
        position = max(0, min(int(position), len(self._shown) - 1))
        self._cases.value = [self._shown[position]]
        self._cases.native.scrollToItem(self._cases.native.item(position))
        return self.current_record()

    def status_of(self, record: BusiRecord) -> str:
        """Return a case's status: its recorded one, else ``"predicted"`` or ``"not segmented"``.

        Returns
        -------
        str
            ``"accepted"``, ``"corrected"``, ``"normal"`` or ``"brushed"`` (what the session
            recorded, :data:`busseg.manifest.STATUSES`); else ``"predicted"`` while its
            prediction layer is open, else ``"not segmented"``.
        """
        if self._session is not None and self._session.store is not None:
            try:
                if self._session.is_recorded(record):
                    return self._session.status_of(record) or CORRECTED
            except ValueError:
                pass
        layer = find_layer(self._viewer, prediction_name(record.name), "labels")
        predicted = layer is not None and not self._is_doomed(layer)
        return PREDICTED if predicted else NOT_SEGMENTED

    def open_current(self) -> None:
        """Open the selected case (saving and closing the open one); predict it if asked."""
        rec = self.current_record()
        if rec is None:
            self._notify_warning("Select a case in the list first.")
            return
        self._open_index_(self._all.index(rec))

    def next_case(self) -> None:
        """Record the open case (key N), close it and open the next case of the list.

        An edited mask is recorded as corrected, an unedited automatic prediction as
        accepted (:meth:`busseg.session.AnnotationSession.record`).
        """
        self._step(+1)

    def skip_case(self) -> None:
        """Leave the open case without recording it (key K) and open the next one."""
        self._step(+1, record=False)

    def previous_case(self) -> None:
        """Record the open case (Shift+N), close it and open the previous case of the list."""
        self._step(-1)

    def resume(self) -> BusiRecord | None:
        """Open the first listed case without a saved correction (where the user stopped).

        Returns
        -------
        BusiRecord or None
            The case opened, or None when every listed case is corrected.
        """
        if self._session is None:
            self._notify_warning("Choose a folder of scans first.")
            return None
        for pos, i in enumerate(self._shown):
            if not self._session.is_corrected(i):
                self.select(pos)
                self.open_current()
                return self._all[i]
        self._notify_info("Every case of the list is corrected.")
        return None

    def save_open_case(self) -> Path | None:
        """Record the open case now, as leaving it would (edited: corrected; accepted ...).

        Returns
        -------
        pathlib.Path or None
            The written mask file; None when nothing needed recording or it failed (then a
            notification says why).
        """
        return self._autosave()[1]

    def save_correction(self) -> Path | None:
        """Save the open (else the selected) case's prediction layer as a correction now.

        An earlier correction of the case is kept under ``versions/`` in the corrections
        folder; the mask is saved even when it equals the automatic prediction (pressing
        Save accepts it).

        Returns
        -------
        pathlib.Path or None
            The written mask file, or None when nothing was saved (the reason is shown as a
            notification).
        """
        rec = self.open_record or self.current_record()
        if rec is None:
            self._notify_warning("Select the case to save in the list first.")
            return None
        layer = find_layer(self._viewer, prediction_name(rec.name), "labels")
        if layer is None:
            self._notify_error(
                f"No Labels layer named '{prediction_name(rec.name)}'. Predict the case first "
                "('Predict on open', or the 'Segment lesions' widget), correct it, then save."
            )
            return None
        if not self._has_store(quiet=False):
            return None
        result = self._save_layer(self._all.index(rec), layer, force=True)
        if result is None:
            return None
        note = f" (the earlier one is kept as {result.version.name})" if result.version else ""
        self._notify_info(f"Saved the correction of {rec.name} to {result.paths.mask}{note}")
        self._after_save()
        return result.paths.mask

    def no_lesion(self) -> Path | None:
        """Clear the open case's mask and record it as a normal scan (an empty mask).

        Returns
        -------
        pathlib.Path or None
            The written (empty) mask file in ``<corrections>/normal/``, or None.
        """
        rec = self.open_record
        if rec is None:
            self._notify_warning("Open a case first.")
            return None
        if not self._has_store(quiet=False):
            return None
        image = find_layer(self._viewer, rec.name, "image")
        layer = None
        if self._state.offers("clear_mask") and image is not None:
            self._viewer.layers.selection.active = image
            # Segment lesions: one undoable edit; makes an empty layer if absent
            layer = self._state.perform("clear_mask")
            if layer is not None and layer.name != prediction_name(rec.name):
                layer = None
        if layer is None:
            layer = find_layer(self._viewer, prediction_name(rec.name), "labels")
        if layer is None:
            shape = (np.asarray(image.data).shape[:2] if image is not None
                     else self._session.current.image.shape)
            layer = self._add_prediction_layer(rec, np.zeros(shape, np.uint8))
        elif np.any(np.asarray(layer.data)):
            layer.data = np.zeros_like(np.asarray(layer.data))
        session = self._ensure_session_case(self._open_index)
        try:
            result = session.mark_no_lesion()
        except (OSError, ValueError, RuntimeError) as exc:
            self._notify_error(f"Not saved: {exc}")
            return None
        mark_saved(layer, rec.name)
        self._status.value = f"{rec.rel_path}: no lesion, recorded as a normal scan."
        self._after_save()
        return result.paths.mask if result is not None else None

    # ---------------------------------------------------------------- notifications

    def _notify_info(self, message: str) -> None:
        notify_info(message)

    def _notify_warning(self, message: str) -> None:
        notify_warning(message)

    def _notify_error(self, message: str) -> None:
        notify_error(message)

    def _rank_job(self, paths: list[Path], checkpoint: Path | None) -> Any:
        """Return the ranking job (:func:`rank_job`) the "Rank by uncertainty" worker runs."""
        return rank_job(paths, checkpoint)


#: Deprecated name of :class:`ScanBrowserWidget` (for older scripts).
BusiBrowserWidget = ScanBrowserWidget
