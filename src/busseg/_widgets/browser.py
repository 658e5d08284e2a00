"""The "Scan browser" dock widget: annotate a folder of scans one case at a time.

Thin by design (DESIGN practice 3): the case list, the current case, autosave, progress and the
learning-as-you-go schedule are :class:`busseg.session.AnnotationSession` (Qt-free, driven
headless by ``benchmarks/annotation_session.py`` too); folders are read by
:func:`busseg.data.discover` (BUSI, BUS-BRA ``Images/`` + ``Masks/``, BUS-UCLM-style
``images/`` + ``masks/`` and plain folders of scans without masks); reading a case is
:func:`busseg._reader.read_case`; prediction and fine-tuning run in thread workers. This
module only wires them to napari layers.

One case at a time. The viewer holds the open case's layers only: for a case ``<stem>``

- ``"<stem>"``: the grey image; ``"<stem> ground truth"``: the expert masks, where the folder
  has them;
- ``"<stem> prediction"``: the editable Labels layer (made by "Predict on open", by the
  "Segment lesions" widget, or loaded from the corrections folder when the case was corrected
  before), and the Segment lesions widget's ``"<stem> boxes"``, ``"<stem> clicks"`` and
  ``"<stem> probability"`` layers.

Predict on open (on by default) and prefetch: opening a case shows its automatic prediction,
made with the "Segment lesions" widget's checkpoint and settings (without that widget, the
browser's own "Model" and the checkpoint's defaults). While the user works on a case, the next
case of the list (in its order: by name, or by uncertainty when sorted so) is predicted in the
background (:meth:`busseg.session.AnnotationSession.prefetch_job`, one worker, one forward
pass at a time), so Next shows its mask at once; choosing a folder prefetches the selected
case, which loads the model before the first Open. A prefetch the user has moved past is
skipped; a prediction layer that exists (the user's edits, a loaded correction) is never
replaced.

The rows sit in a vertical scroll area with a small minimum height, so the browser and
"Segment lesions" fit side by side or stacked in a 1500x900 window.

Moving to another case (Next, Previous, a double-click, Open, Next suggested) saves the open
case's prediction layer to the corrections folder when it was edited (autosave; an unedited
automatic prediction is not a correction), keeping an earlier correction of the case under
``versions/``, then hands the case's layers on to the next case: napari makes a layer far more
slowly than it swaps one's data, so one image, one ground-truth and one prediction Labels
layer and Segment lesions' boxes and clicks layers serve every case. Their data, name,
metadata and contrast limits become the new case's, the Labels undo history is emptied (Ctrl+Z
never reaches into the case left) and the prompt layers are emptied (no prompt runs); a layer
the new case does not need (its prediction is still to come, it has no ground truth, the
probability map) is hidden at once and removed :attr:`BusiBrowserWidget.CLOSE_DELAY_MS` later,
once the new case is drawn (napari ends a layer removal with a full garbage collection). When
a folder is chosen with "Predict on open" on, the browser makes these layers ahead, hidden
("warm-up"; Segment lesions never offers them), so the first Open does not pay napari's
first-layer costs either. Removing the prediction layer and closing napari save it too.
When no corrections folder is chosen, one is
made under ``~/.busseg/corrections/`` for the dataset (``BUSSEG_HOME`` overrides ``~/.busseg``), so
reopening the same folder later shows every case's status and "Resume" continues at the
first uncorrected case.

Keyboard shortcuts (bound on the viewer, see :data:`SHORTCUTS`): N next case, Shift+N previous
case, Shift+S save, G segment, Q box prompts, W click prompts, J toggle lesion/background click,
H no lesion (clear the mask and record a normal scan). None of them is one of napari's default
keys for the viewer or for Image, Labels, Shapes or Points layers.

Learning as you go (off by default): after every N new corrections the current checkpoint is
fine-tuned on all corrections in a worker; the Segment lesions widget switches to the new
checkpoint only when its held-out Dice is not worse, and the status line says so.

Ranking (active learning): "Rank by uncertainty" scores every case with the checkpoint of the
"Segment lesions" widget (or, without one, the browser's own "Model") through
:func:`busseg.uncertainty.rank_iter` in a ``thread_worker`` (progress bar, Cancel). Each case
shows its score beside its status; "Sort" orders the list by name or by uncertainty (highest
first); "Next suggested" opens the most uncertain case of the list that has no saved
correction yet. Scores are cached per (checkpoint, image), and the list is re-ranked by itself
when the "Segment lesions" widget switches checkpoint (polled; two ``stat`` calls).
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import time
import weakref
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
    SPARE_KIND,
    busseg_metadata,
    find_layer,
    guarded,
    notify_error,
    notify_info,
    notify_warning,
    prediction_name,
    scroll_rows,
    wrap_label,
)
from busseg.corrections import CORRECTED, NOT_SEGMENTED, PREDICTED
from busseg.data.busi import BusiRecord
from busseg.session import DEFAULT_LEARN_EVERY, AnnotationSession, mask_fingerprint

ALL = "all"
_STATUS_MARK = {NOT_SEGMENTED: "", PREDICTED: "  [predicted]", CORRECTED: "  [corrected]"}
#: Choices of the "Sort" box.
SORT_NAME = "name"
SORT_UNCERTAINTY = "uncertainty (highest first)"
#: Who wrote a prediction layer the browser made (prediction on open, a loaded correction).
WRITTEN_BY = "scan browser"
#: Name prefix and metadata kind of the hidden layers made ahead for the first case.
SPARE = SPARE_KIND
#: Suffixes of the layers of one case, besides the image layer itself.
CASE_LAYER_SUFFIXES = (" ground truth", " prediction", " boxes", " clicks", " probability")
#: Settings of the Segment lesions widget that the browser's automatic predictions follow
#: (keyword arguments of :meth:`busseg.session.AnnotationSession.predict`).
PREDICT_SETTINGS = ("device", "threshold", "tta", "fill_holes", "keep", "min_area")
#: Minimum height (pixels) of the browser's scroll area: the dock's minimum, nearly.
MIN_HEIGHT = 160
#: Keyboard shortcuts bound on the viewer: key -> (action, method of the browser).
SHORTCUTS: dict[str, tuple[str, str]] = {
    "N": ("next case (saves the edited mask)", "next_case"),
    "Shift-N": ("previous case (saves the edited mask)", "previous_case"),
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


def default_corrections_dir(root: str | os.PathLike) -> Path:
    """Corrections folder used for a dataset when none is chosen.

    Parameters
    ----------
    root : str or os.PathLike
        The dataset folder.

    Returns
    -------
    pathlib.Path
        ``~/.busseg/corrections/<folder name>-<8 hex digits of its absolute path>``
        (``BUSSEG_HOME`` overrides ``~/.busseg``): the same folder every time the same
        dataset is opened, so the status of its cases survives a restart.
    """
    root = Path(root).expanduser().resolve()
    home = Path(os.environ.get("BUSSEG_HOME", Path.home() / ".busseg"))
    digest = hashlib.sha1(str(root).encode()).hexdigest()[:8]
    return home / "corrections" / f"{root.name}-{digest}"


def _path_or_none(value: Any) -> Path | None:
    """Return a FileEdit value as a Path, or None when empty."""
    if value is None:
        return None
    text = str(value).strip()
    if text in ("", "."):
        return None
    return Path(text).expanduser()


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


def layer_edited(layer: Any) -> bool | None:
    """Whether a prediction layer's data differs from what the plugin last wrote into it.

    Parameters
    ----------
    layer : napari.layers.Labels
        A ``"<case> prediction"`` layer.

    Returns
    -------
    bool or None
        Compared with the browser's fingerprint (``session_fp``: a loaded correction, a
        prediction on open, a save) or else the Segment lesions widget's ``written_sha1``
        (an automatic segmentation; a prompt edit changes the data, so it counts as an edit).
        None when the layer carries neither (a layer the user made: then any lesion pixel
        is an edit).
    """
    meta = busseg_metadata(layer)
    if meta.get("session_fp"):
        return mask_fingerprint(layer.data) != meta["session_fp"]
    if meta.get("written_sha1"):
        from busseg._widgets.segment import data_sha1

        return data_sha1(layer.data) != meta["written_sha1"]
    return None


def _data_sha1(data: np.ndarray) -> str:
    """Hash a layer's data as Segment lesions does (its record of an unedited output)."""
    from busseg._widgets.segment import data_sha1

    return data_sha1(data)


def _mark_saved(layer: Any, case_name: str) -> None:
    """Record in a prediction layer's metadata that its data is what is stored now."""
    meta = dict(busseg_metadata(layer))
    meta.update(session_fp=mask_fingerprint(layer.data), kind="prediction", name=case_name)
    meta.setdefault("written_by", WRITTEN_BY)
    layer.metadata = {**layer.metadata, "busseg": meta}


class _CaseList(Select):
    """A list whose items the browser owns.

    napari calls ``reset_choices`` on dock widgets whenever layers change, and magicgui resets
    a categorical widget to its initial choices then; the browser rebuilds the list itself
    (:meth:`BusiBrowserWidget._refresh_list`), so the reset is a no-op here.
    """

    def reset_choices(self, *_: Any) -> None:
        """Keep the items (the browser refreshes them)."""


class BusiBrowserWidget(Container):
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
    :meth:`next_case`, :meth:`previous_case`, :meth:`resume`, :meth:`save_correction`,
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

    def __init__(self, napari_viewer: Any) -> None:
        super().__init__(labels=True)
        self._viewer = napari_viewer
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
        self._progress_label = Label(value="0 of 0 corrected")
        self._progress = ProgressBar(label="Corrected", min=0, max=1, value=0)
        # on by default: the annotation-session benchmark measured 2.03 interactions per scan with
        # it against 2.31 without (benchmarks/results/learning/annotation_session.md)
        self._learn_check = CheckBox(text="Learn as you go, every", value=True)
        self._learn_spin = SpinBox(label="every", value=DEFAULT_LEARN_EVERY, min=2, max=1000,
                                   tooltip="fine-tune after this many new corrections")
        self._keys_label = Label(value="Keys: " + " · ".join(
            f"{k.replace('-', '+')} {a.split(' (')[0].split(':')[0]}"
            for k, (a, _) in SHORTCUTS.items()))
        self._status = Label(value="Choose a folder of scans.")

        nav = Container(
            layout="horizontal",
            labels=False,
            widgets=[self._prev_btn, self._open_btn, self._next_btn, self._resume_btn],
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
            widgets=[
                self._root_edit,
                self._from_layer_btn,
                self._class_combo,
                self._sort_combo,
                self._cases,
                ranking,
                self._rank_progress,
                self._predict_check,
                self._model_edit,
                nav,
                self._corr_edit,
                saving,
                self._progress_label,
                self._progress,
                learning,
                self._keys_label,
                self._status,
            ],
        )
        rows.margins = (4, 4, 4, 4)
        self.append(rows)
        self._scroll = scroll_rows(self, min_height=MIN_HEIGHT, fit_width=True,
                                   object_name="busseg_browser_scroll")
        from qtpy.QtWidgets import QAbstractItemView

        self._cases.native.setSelectionMode(QAbstractItemView.SelectionMode.SingleSelection)
        self._cases.native.setMinimumHeight(90)  # ~4 rows; the list takes the spare height
        row = self._cases.native  # the list's row in the form (its labelled wrapper)
        while row is not None and row.parentWidget() is not rows.native:
            row = row.parentWidget()
        if row is not None:
            rows.native.layout().setStretchFactor(row, 1)
        self._cases.tooltip = (
            "[predicted]: a '<case> prediction' Labels layer is open; [corrected]: a mask is "
            "saved in the corrections folder; no mark: not segmented. u: uncertainty of the "
            "model's prediction (0 sure, 1 unsure; 'Rank by uncertainty'). Double-click to open."
        )
        self._rank_btn.tooltip = (
            "Score every case with the 'Segment lesions' checkpoint (or 'Model' below when that "
            "widget is not open): entropy of the lesion probabilities around the predicted "
            "lesion and disagreement with the flipped image. Cached per checkpoint and image."
        )
        self._suggest_btn.tooltip = (
            "Open the most uncertain case of the list that has no saved correction yet"
        )
        self._next_btn.tooltip = "Save the edited mask and open the next case (key N)"
        self._prev_btn.tooltip = "Save the edited mask and open the previous case (Shift+N)"
        self._resume_btn.tooltip = "Open the first case without a saved correction"
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
        self._learn_check.tooltip = (
            "After every N new corrections, fine-tune the current checkpoint on all corrections "
            "in the background; Segment lesions switches to it only when its held-out Dice is "
            "not worse")
        self.tooltip = "Keyboard shortcuts (in the viewer):\n" + shortcut_help()
        self._keys_label.tooltip = self.tooltip
        wrap_label(self._status)
        wrap_label(self._keys_label)
        wrap_label(self._progress_label)
        self._cases.native.itemDoubleClicked.connect(lambda *_: self.open_current())

        self._root_edit.changed.connect(self._on_root_changed)
        self._from_layer_btn.changed.connect(self._on_from_layer)
        self._class_combo.changed.connect(self._on_filter_changed)
        self._open_btn.changed.connect(self.open_current)
        self._prev_btn.changed.connect(self.previous_case)
        self._next_btn.changed.connect(self.next_case)
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

        root = self._root_from_layers()
        if root is not None:
            self.set_root(root)

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
        """``"corrected"``, ``"predicted"`` or ``"not segmented"`` for a case."""
        if self._session is not None and self._session.store is not None:
            try:
                if self._session.is_corrected(record):
                    return CORRECTED
            except ValueError:
                pass
        layer = find_layer(self._viewer, prediction_name(record.name), "labels")
        predicted = layer is not None and not self._is_doomed(layer)
        return PREDICTED if predicted else NOT_SEGMENTED

    def open_current(self) -> None:
        """Open the selected case (saving and closing the open one); predict it if asked."""
        rec = self.current_record()
        if rec is None:
            notify_warning("Select a case in the list first.")
            return
        self._open_index_(self._all.index(rec))

    def next_case(self) -> None:
        """Save the open case if edited, close it and open the next case of the list."""
        self._step(+1)

    def previous_case(self) -> None:
        """Save the open case if edited, close it and open the previous case of the list."""
        self._step(-1)

    def resume(self) -> BusiRecord | None:
        """Open the first listed case without a saved correction (where the user stopped).

        Returns
        -------
        BusiRecord or None
            The case opened, or None when every listed case is corrected.
        """
        if self._session is None:
            notify_warning("Choose a folder of scans first.")
            return None
        for pos, i in enumerate(self._shown):
            if not self._session.is_corrected(i):
                self.select(pos)
                self.open_current()
                return self._all[i]
        notify_info("Every case of the list is corrected.")
        return None

    def save_open_case(self) -> Path | None:
        """Autosave: store the open case's prediction layer if it was edited.

        Returns
        -------
        pathlib.Path or None
            The written mask file; None when nothing needed saving or saving failed (then a
            notification says why).
        """
        ok, path = self._autosave()
        return path

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
            notify_warning("Select the case to save in the list first.")
            return None
        layer = find_layer(self._viewer, prediction_name(rec.name), "labels")
        if layer is None:
            notify_error(
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
        notify_info(f"Saved the correction of {rec.name} to {result.paths.mask}{note}")
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
            notify_warning("Open a case first.")
            return None
        if not self._has_store(quiet=False):
            return None
        image = find_layer(self._viewer, rec.name, "image")
        layer = None
        from busseg._widgets.segment import find_segment_widget

        seg = find_segment_widget(self._viewer)
        if seg is not None and hasattr(seg, "clear_mask") and image is not None:
            self._viewer.layers.selection.active = image
            layer = seg.clear_mask()  # one undoable edit; makes an empty layer if absent
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
            notify_error(f"Not saved: {exc}")
            return None
        _mark_saved(layer, rec.name)
        self._status.value = f"{rec.rel_path}: no lesion, recorded as a normal scan."
        self._after_save()
        return result.paths.mask if result is not None else None

    # ---------------------------------------------------------------- keyboard

    def segment_current(self) -> None:
        """Run the Segment lesions widget on the open case (key G)."""
        seg = self._segment_widget("segment")
        if seg is None:
            return
        rec = self.open_record
        if rec is not None:
            image = find_layer(self._viewer, rec.name, "image")
            if image is not None:
                self._viewer.layers.selection.active = image
        seg.segment()

    def box_mode(self) -> None:
        """Switch the Segment lesions widget to box prompts (key Q)."""
        seg = self._segment_widget("set_prompt_mode")
        if seg is not None:
            seg.set_prompt_mode("box")

    def click_mode(self) -> None:
        """Switch the Segment lesions widget to click prompts (key W)."""
        seg = self._segment_widget("set_prompt_mode")
        if seg is not None:
            seg.set_prompt_mode("click")

    def toggle_click_label(self) -> None:
        """Toggle new clicks between lesion and background (key J)."""
        seg = self._segment_widget("toggle_click_label")
        if seg is not None:
            seg.toggle_click_label()

    def _segment_widget(self, method: str) -> Any:
        from busseg._widgets.segment import find_segment_widget

        seg = find_segment_widget(self._viewer)
        if seg is None or not hasattr(seg, method):
            notify_warning("Open the 'Segment lesions' widget (Plugins > BUS Seg) for this key.")
            return None
        return seg

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

    # ---------------------------------------------------------------- learning as you go

    @property
    def finetune_running(self) -> bool:
        """Whether a learning-as-you-go fine-tune is running."""
        return self._finetune_worker is not None

    def _on_learning_changed(self, *_: Any) -> None:
        if self._session is not None:
            self._session.learn = bool(self._learn_check.value)
            self._session.learn_every = int(self._learn_spin.value)
            self._maybe_finetune()

    def _current_checkpoint(self) -> Path | None:
        from busseg._widgets.segment import find_segment_widget

        seg = find_segment_widget(self._viewer)
        if seg is not None:
            return seg.current_checkpoint()
        return _path_or_none(self._model_edit.value)

    def _maybe_finetune(self) -> bool:
        """Start a fine-tune in a worker when the session says one is due."""
        s = self._session
        if s is None or self._finetune_worker is not None:
            return False
        s.learn = bool(self._learn_check.value)
        s.learn_every = int(self._learn_spin.value)
        if not s.finetune_due():
            return False
        from napari.qt.threading import create_worker

        s.checkpoint = self._current_checkpoint()
        worker = create_worker(guarded, s.finetune_job(), _start_thread=False,
                               _ignore_errors=True)
        worker.yielded.connect(self._on_finetune_yielded)
        worker.returned.connect(self._on_finetune_returned)
        worker.errored.connect(self._on_finetune_errored)
        worker.finished.connect(self._on_finetune_finished)
        self._finetune_worker = worker
        self._status.value = (f"Learning as you go: fine-tuning on the corrections in the "
                              f"background ({s.progress_text()}) …")
        worker.start()
        return True

    def _on_finetune_yielded(self, event: Any) -> None:
        msg = getattr(event, "message", None)
        if msg and getattr(event, "kind", "") != "step":
            self._status.value = f"Learning as you go: {msg}"

    def _on_finetune_returned(self, outcome: Any) -> None:
        self._status.value = outcome.message
        if outcome.adopted and outcome.checkpoint is not None:
            from busseg._widgets.segment import find_segment_widget

            seg = find_segment_widget(self._viewer)
            if seg is not None:
                seg.use_checkpoint(outcome.checkpoint)
            else:
                self._model_edit.value = outcome.checkpoint
            notify_info(outcome.message)

    def _on_finetune_errored(self, exc: BaseException) -> None:
        self._status.value = f"Learning as you go: fine-tune failed: {exc}"
        notify_error(f"Fine-tune failed: {exc}")

    def _on_finetune_finished(self) -> None:
        self._finetune_worker = None

    # ---------------------------------------------------------------- ranking

    @property
    def ranking_running(self) -> bool:
        """Whether an uncertainty ranking is running."""
        return self._rank_worker is not None

    def score_of(self, record: BusiRecord) -> float | None:
        """Uncertainty score in [0, 1] of a case under the ranked checkpoint, or None."""
        return self._scores.get(str(record.image_path))

    def set_sort(self, by: str) -> None:
        """Order the list by ``"name"`` or by ``"uncertainty"`` (highest first)."""
        self._sort_combo.value = SORT_UNCERTAINTY if by.startswith("uncertainty") else SORT_NAME

    def ranking_checkpoint(self) -> Path | None:
        """Return the checkpoint to rank with: Segment lesions' checkpoint, else "Model".

        Returns
        -------
        pathlib.Path or None
            A checkpoint folder, or None for the shipped default model.
        """
        from busseg._widgets.segment import find_segment_widget

        seg = find_segment_widget(self._viewer)
        if seg is not None:
            return seg.current_checkpoint()
        return _path_or_none(self._model_edit.value)

    def rank(self) -> bool:
        """Score every case of the dataset by uncertainty in a worker thread.

        Returns
        -------
        bool
            True when a ranking was started (False: no dataset, or one is running).
        """
        if self._rank_worker is not None:
            return False
        if not self._all:
            notify_warning("Choose a dataset folder first; then rank its cases.")
            return False
        from napari.qt.threading import create_worker

        checkpoint = self.ranking_checkpoint()
        self._ranked_checkpoint = checkpoint
        paths = [r.image_path for r in self._all]
        worker = create_worker(guarded, rank_job(paths, checkpoint), _start_thread=False,
                               _ignore_errors=True)
        worker.yielded.connect(self._on_rank_yielded)
        worker.returned.connect(self._on_rank_returned)
        worker.errored.connect(self._on_rank_errored)
        worker.aborted.connect(self._on_rank_aborted)
        worker.finished.connect(self._on_rank_finished)
        self._rank_worker = worker
        self._rank_btn.enabled = False
        self._rank_cancel_btn.enabled = True
        self._rank_progress.max = 0  # busy while the model loads
        where = "the shipped default model" if checkpoint is None else checkpoint.name
        self._status.value = f"Ranking {len(paths)} cases with {where} …"
        worker.start()
        return True

    def cancel_ranking(self) -> None:
        """Stop the ranking after the current image; the scores so far are kept."""
        if self._rank_worker is not None:
            self._rank_worker.quit()
            self._suggest_after_rank = False
            self._status.value = "Cancelling the ranking after the current image …"

    def next_suggested(self) -> BusiRecord | None:
        """Open the most uncertain listed case that has no saved correction.

        Ranks first when there is no ranking yet or the checkpoint changed since (the case
        opens when the ranking finishes). The selected case is skipped while another one is
        left, so pressing the button again moves on.

        Returns
        -------
        BusiRecord or None
            The case opened now, or None (ranking first, or nothing left to suggest).
        """
        if self._rank_worker is not None:
            self._suggest_after_rank = True
            notify_info("Ranking is running; the suggested case opens when it finishes.")
            return None
        if self._ranked_key is None or self._checkpoint_changed():
            self._suggest_after_rank = self.rank()
            return None
        rec = self._suggestion()
        if rec is None:
            notify_info("No case left to suggest: every ranked case of the list is corrected.")
            return None
        self.select(self._shown.index(self._all.index(rec)))
        self.open_current()
        return rec

    def _suggestion(self) -> BusiRecord | None:
        session = self._session if self._has_store(quiet=True) else None
        current = self.current_record()
        best: list[tuple[float, int, BusiRecord]] = []
        for i in self._shown:
            rec = self._all[i]
            score = self.score_of(rec)
            if score is None or not math.isfinite(score):
                continue
            if session is not None and session.is_corrected(i):
                continue
            best.append((-score, i, rec))
        best.sort(key=lambda t: t[:2])
        others = [b for b in best if b[2] is not current]
        pick = others or best
        return pick[0][2] if pick else None

    def _checkpoint_changed(self) -> bool:
        """Whether the ranking checkpoint (its folder or its files) differs from the ranked one."""
        from busseg.models import CheckpointError
        from busseg.uncertainty import checkpoint_key

        try:
            return checkpoint_key(self.ranking_checkpoint()) != self._ranked_key
        except (CheckpointError, OSError):
            return False  # an incomplete checkpoint folder: keep the scores we have

    def _on_checkpoint_poll(self) -> None:
        if self._rank_worker is None and self._ranked_key is not None and self._all:
            if self._checkpoint_changed():
                self.rank()

    def _on_rank_yielded(self, event: tuple) -> None:
        kind = event[0]
        if kind == "checkpoint":
            if event[1] != self._ranked_key:  # another model: its old scores do not apply
                self._scores.clear()
                self._ranked_key = event[1]
                self._refresh_list()
        elif kind == "status":
            self._status.value = event[1]
        elif kind == "progress":
            done, total, entry = event[1], event[2], event[3]
            self._rank_progress.max = max(total, 1)
            self._rank_progress.value = done
            if entry is not None and entry.path is not None:
                self._scores[str(entry.path)] = entry.score
            now = time.monotonic()
            if now - self._last_list_refresh > 0.5:  # keep the GUI responsive
                self._last_list_refresh = now
                self._refresh_list()

    def _on_rank_returned(self, ranking: Any) -> None:
        for e in ranking.entries:
            if e.path is not None:
                self._scores[str(e.path)] = e.score
        failed = [e for e in ranking.entries if e.error]
        self._refresh_list()
        where = ("the shipped default model" if self._ranked_checkpoint is None
                 else self._ranked_checkpoint.name)
        text = (f"Ranked {len(ranking.entries) - len(failed)} cases with {where} "
                f"({ranking.n_cached} from the cache).")
        if failed:
            text += f" {len(failed)} could not be read, e.g. {failed[0].error}"
        self._status.value = text
        self._poll.start()

    def _on_rank_errored(self, exc: BaseException) -> None:
        self._suggest_after_rank = False
        self._status.value = f"Ranking failed: {exc}"
        notify_error(f"Ranking failed: {exc}")

    def _on_rank_aborted(self) -> None:
        self._suggest_after_rank = False
        self._refresh_list()
        self._status.value = f"Ranking cancelled; {len(self._scores)} cases have a score."
        self._poll.start()

    def _on_rank_finished(self) -> None:
        self._rank_worker = None
        self._rank_btn.enabled = True
        self._rank_cancel_btn.enabled = False
        if self._rank_progress.max == 0:
            self._rank_progress.max = 1
        if self._suggest_after_rank:
            self._suggest_after_rank = False
            self.next_suggested()

    def _on_sort_changed(self, *_: Any) -> None:
        self._refresh_list()
        if self._sort_combo.value == SORT_UNCERTAINTY and not self._scores and self._all:
            self.rank()

    # ---------------------------------------------------------------- internals

    def _has_store(self, *, quiet: bool) -> bool:
        if self._session is None:
            if not quiet:
                notify_error("Choose a folder of scans first.")
            return False
        if self._session.store is None:
            if not quiet:
                notify_error(self._store_error
                             or "Choose a corrections folder (outside the dataset) first.")
            return False
        return True

    def _ensure_session_case(self, index: int) -> AnnotationSession:
        s = self._session
        if s.current is None or s.current.index != index:
            s.open(index)
        return s

    def _save_layer(self, index: int, layer: Any, *, force: bool) -> Any:
        """Hand a prediction layer's data to the session and save it (raises on failure)."""
        s = self._ensure_session_case(index)
        s.set_mask(np.asarray(layer.data), edited=layer_edited(layer))
        result = s.save(force=force)
        if result is not None:
            _mark_saved(layer, self._all[index].name)
        return result

    def _autosave(self) -> tuple[bool, Path | None]:
        """Save the open case's prediction layer if edited: ``(ok, written mask or None)``."""
        if self._open_index is None or self._session is None:
            return True, None
        rec = self._all[self._open_index]
        layer = find_layer(self._viewer, prediction_name(rec.name), "labels")
        if layer is None:
            return True, None
        if self._session.store is None:
            edited = layer_edited(layer)
            if edited is False or (edited is None and not np.any(np.asarray(layer.data))):
                return True, None
            notify_error(f"The edits of {rec.name} are not saved: "
                         f"{self._store_error or 'choose a corrections folder'}. "
                         "Its layers stay open.")
            return False, None
        try:
            result = self._save_layer(self._open_index, layer, force=False)
        except (OSError, ValueError, RuntimeError) as exc:
            notify_error(f"The edits of {rec.name} are not saved: {exc}. Its layers stay open.")
            return False, None
        if result is None:
            return True, None
        self._after_save()
        return True, result.paths.mask

    def _after_save(self) -> None:
        self._refresh_list()
        self._maybe_finetune()

    def _leave_open_case(self, *, reuse: bool = False) -> dict[str, Any]:
        """Autosave the open case, then close its layers (hide them if saving failed).

        With ``reuse`` the layers that the next case can take over (:meth:`_reusable`) are
        returned instead of being closed, by role (``"image"``, ``"ground truth"``,
        ``"prediction"``, ``"boxes"``, ``"clicks"``); the others are closed. The case's edits
        are saved before any of its layers is handed on.
        """
        if self._open_index is None:
            return {}
        name = self._all[self._open_index].name
        ok, _ = self._autosave()
        spare: dict[str, Any] = {}
        if ok:
            if reuse:
                spare = self._reusable(name)
                self._doom([lay for lay in self._case_layers(name)
                            if not any(lay is v for v in spare.values())])
            else:
                self._close_case_layers(name, later=True)
        else:
            for layer in self._case_layers(name):
                layer.visible = False
        self._open_index = None
        return spare

    def _reusable(self, name: str) -> dict[str, Any]:
        """Return the layers of case ``name`` that another case can reuse, by role."""
        from napari.layers import Image, Labels, Points, Shapes

        roles = {"image": (name, Image), "ground truth": (name + " ground truth", Labels),
                 "prediction": (prediction_name(name), Labels),
                 "boxes": (name + " boxes", Shapes), "clicks": (name + " clicks", Points)}
        out = {}
        for role, (layer_name, kind) in roles.items():
            layer = find_layer(self._viewer, layer_name)
            if (isinstance(layer, kind) and not self._is_doomed(layer)
                    and not getattr(layer, "multiscale", False)
                    and not (role == "image" and getattr(layer, "rgb", False))):
                out[role] = layer
        return out

    def _doom(self, layers: list) -> None:
        """Hide ``layers`` now and remove them :attr:`CLOSE_DELAY_MS` later (one batch)."""
        layers = [lay for lay in layers if not self._is_doomed(lay)]
        if not layers:
            return
        if len(self._doomed) + len(layers) > 6:
            self._remove_doomed()  # a fast user: the ones left earlier go now
        for layer in layers:
            layer.visible = False
        self._doomed.extend(layers)
        self._close_timer.start()

    def _case_layers(self, name: str) -> list:
        names = {name, *(name + s for s in CASE_LAYER_SUFFIXES)}
        out = []
        for layer in self._viewer.layers:
            if self._is_doomed(layer):
                continue
            meta = busseg_metadata(layer)
            if meta.get("kind") == "stack":
                continue
            if (layer.name in names or meta.get("image") == name
                    or (meta.get("name") == name and meta.get("kind") in ("case", "prediction"))):
                out.append(layer)
        return out

    @property
    def closing_pending(self) -> bool:
        """Whether the hidden layers of the case left last are still waiting to be removed."""
        return bool(self._doomed)

    def _is_doomed(self, layer: Any) -> bool:
        return any(layer is d for d in self._doomed)

    def _close_case_layers(self, name: str, *, later: bool = False) -> None:
        """Remove a case's layers; ``later``: hide them now, remove them after a short delay."""
        doomed = self._case_layers(name)
        if later:
            self._remove_doomed()  # a fast user: the case before is removed now
            for layer in doomed:
                layer.visible = False
            self._doomed = doomed
            if doomed:
                self._close_timer.start()
            return
        self._remove_layers(doomed)

    def _remove_doomed(self) -> None:
        """Remove the hidden layers of the case left last (the close timer's slot)."""
        doomed, self._doomed = self._doomed, []
        self._close_timer.stop()
        if doomed and not self._viewer_closing:
            self._remove_layers(doomed)

    def _remove_layers(self, doomed: list) -> None:
        if not doomed:
            return
        self._closing_case = True
        try:
            # one batch: napari cleans its scene graph (a full gc.collect) once, not per layer
            with self._viewer.layers.batched_update():
                for layer in doomed:
                    if layer in self._viewer.layers:
                        self._viewer.layers.remove(layer)
        finally:
            self._closing_case = False

    def _open_index_(self, index: int) -> None:
        """Open case ``index`` of ``self._all``: autosave and close the open one first.

        The layers of the case left are reused (:meth:`_reuse_layer`): its image, ground-truth,
        prediction, boxes and clicks layers get the new case's data, names and metadata
        (napari adds a layer far more slowly than it swaps one's data); what the new case
        does not need is closed.
        """
        if self._session is None:
            return
        rec = self._all[index]
        spare: dict[str, Any] = {}
        if self._open_index is not None and self._open_index != index:
            spare = self._leave_open_case(reuse=True)
        for role, layer in self.spare_layers.items():
            if role in spare:
                self._doom([layer])
            else:
                spare[role] = layer
        self._spares = {}
        if any(layer.name == rec.name or layer.name.startswith(rec.name + " ")
               for layer in self._doomed):
            self._remove_doomed()  # back to the case just left: its old layers go first
        from napari.layers import Layer

        from busseg._reader import read_case
        from busseg._widgets.segment import layers_swapping

        self._closing_case = True  # one list refresh at the end, not one per layer
        pred = image_layer = correction = prefetched = None
        existed = False
        held = layers_swapping(self._viewer) if spare else contextlib.nullcontext()
        try:
            held.__enter__()
            image_layer = find_layer(self._viewer, rec.name, "image")
            if image_layer is None:
                try:
                    layer_data = read_case(
                        rec.image_path, rec.mask_paths, label=rec.label, root=self._root
                    )
                except (OSError, ValueError) as exc:
                    notify_error(f"cannot open {rec.image_path.name}: {exc}")
                    return
                for data, kwargs, kind in layer_data:
                    existing = find_layer(self._viewer, kwargs["name"])
                    if existing is not None:
                        if not existing.visible:
                            existing.visible = True
                        continue
                    role = "image" if kind == "image" else "ground truth"
                    if self._reuse_layer(spare.pop(role, None), data, kwargs) is None:
                        layer = self._viewer.add_layer(Layer.create(data, kwargs, kind))
                        if role == "ground truth":  # just above the image, below the rest
                            self._place_above(layer, find_layer(self._viewer, rec.name))
                image_layer = find_layer(self._viewer, rec.name, "image")
            for layer in self._case_layers(rec.name):
                if not layer.visible:  # napari redraws on every visible set
                    layer.visible = True
            if self._session.current is None or self._session.current.index != index:
                self._session.open(index)
            self._open_index = index
            if self._prefetch_index != index:
                self._session.cancel_prefetch()  # guesses queued for other cases give up
            pred = find_layer(self._viewer, prediction_name(rec.name), "labels")
            existed = pred is not None
            correction = self._session.current.correction
            if pred is None and correction is not None:
                pred = self._show_prediction(rec, correction.astype(np.uint8), spare)
            if pred is None and self._predict_check.value and image_layer is not None:
                prefetched = self._cached_prediction(index)
                if prefetched is not None:  # predicted in the background: shown at once
                    pred = self._show_prediction(rec, prefetched, spare)
            if image_layer is not None:
                self._reuse_prompts(spare, image_layer)
        finally:
            self._closing_case = False
            keep = spare.pop("prediction", None)
            if keep is not None and self._predict_check.value and pred is None:
                self._keep_spare("prediction", keep)  # for the prediction on its way
            elif keep is not None:
                spare["prediction"] = keep
            self._doom(list(spare.values()))  # what the new case did not take over
            held.__exit__(None, None, None)
        active = pred if pred is not None else image_layer
        if active is not None:
            self._viewer.layers.selection.active = active
        self._viewer.reset_view()
        self._refresh_list()
        status = self.status_of(rec)
        if status == CORRECTED:
            label = self._session.correction_label(index)
            status += " (no lesion)" if label == "normal" and not correction.any() else ""
            status += "; the stored correction is loaded"
        self._status.value = f"{rec.rel_path}: {status}"
        if not self._predict_check.value or image_layer is None:
            return
        if prefetched is not None:
            self._status.value = f"{rec.rel_path}: predicted; correct it, then move on (saved)."
        elif existed:
            notify_info(f"'{prediction_name(rec.name)}' exists and is kept "
                        "(it may hold your edits).")
        elif pred is None:
            self._start_prediction(index)
            return  # the next case is prefetched once this one is predicted
        self._schedule_prefetch()

    @property
    def spare_layers(self) -> dict[str, Any]:
        """The hidden layers made ahead for the next case to take over, by role."""
        self._spares = {k: v for k, v in self._spares.items() if v in self._viewer.layers}
        return dict(self._spares)

    def _warm_up(self) -> None:
        """Add the (transparent) layers the first case will take over (see :attr:`warm_up`).

        napari creates and first draws the first layer of each kind far more slowly than
        later ones (its controls, its canvas visual and shaders); paying that when the folder
        is chosen, while the model loads in the background, makes the first Open nearly as
        fast as a Next. The spares are visible with opacity 0 so that the canvas draws them
        (compiling their shaders) before the first Open; Segment lesions never offers them.
        """
        if (not self.warm_up or self._open_index is not None or self.spare_layers
                or not self._predict_check.value or self._viewer_closing):
            return
        from busseg._widgets.segment import (
            BOXES_SUFFIX,
            CLICKS_SUFFIX,
            find_segment_widget,
            layers_swapping,
        )

        def meta(role: str) -> dict:
            return {"busseg": {"kind": SPARE, "role": role}}

        tiny = np.zeros((2, 2), np.uint8)
        active = self._viewer.layers.selection.active
        self._closing_case = True
        try:
            with layers_swapping(self._viewer):
                v = self._viewer
                self._spares["image"] = v.add_image(
                    tiny, name=f"{SPARE} image", colormap="gray", contrast_limits=(0, 255),
                    opacity=0.0, metadata=meta("image"))
                if any(r.mask_paths for r in self._all[:50]):
                    self._spares["ground truth"] = v.add_labels(
                        tiny, name=f"{SPARE} ground truth", opacity=0.0,
                        metadata=meta("ground truth"))
                self._spares["prediction"] = v.add_labels(
                    tiny, name=f"{SPARE} prediction", opacity=0.0,
                    metadata=meta("prediction"))
                seg = find_segment_widget(self._viewer)
                if seg is not None:  # it adds a case's prompt layers: made ahead as well
                    from busseg._widgets.segment import CLICK_COLOURS
                    from busseg._widgets.segment import WRITTEN_BY as SEG

                    self._spares["boxes"] = v.add_shapes(
                        ndim=2, name=f"{SPARE}{BOXES_SUFFIX}", edge_color="yellow",
                        face_color="transparent", opacity=0.0,
                        metadata={"busseg": {"kind": "box prompts", "written_by": SEG,
                                             "image": f"{SPARE} image", "spare": True}})
                    self._spares["clicks"] = v.add_points(
                        ndim=2, name=f"{SPARE}{CLICKS_SUFFIX}", face_color=CLICK_COLOURS[1],
                        border_color="white", features={"label": np.zeros(0, np.int8)},
                        feature_defaults={"label": 1}, opacity=0.0,
                        metadata={"busseg": {"kind": "click prompts", "written_by": SEG,
                                             "image": f"{SPARE} image", "spare": True}})
                    self._spares["boxes"].mode = "add_rectangle"
                    self._spares["clicks"].mode = "add"
        finally:
            self._closing_case = False
        # the layers themselves, not napari's proxies of them (compared with ``is``)
        self._spares = {k: getattr(v, "__wrapped__", v) for k, v in self._spares.items()}
        if active is not None and active in self._viewer.layers:
            self._viewer.layers.selection.active = active
        else:  # no hidden spare is active (a click would land in it)
            self._viewer.layers.selection.clear()

    def _reuse_layer(self, layer: Any, data: np.ndarray, kwargs: dict) -> Any:
        """Give ``layer`` (a layer of the case left) new data, name and metadata.

        Parameters
        ----------
        layer : napari.layers.Image or napari.layers.Labels or None
            The layer to reuse; None: nothing is done.
        data : numpy.ndarray
            The new data (same number of dimensions, else the layer is not reused).
        kwargs : dict
            Layer keyword arguments as :func:`busseg._reader.read_case` returns them
            (``name``, ``metadata``, ``contrast_limits``, ``colormap``, ``opacity``).

        Returns
        -------
        napari layer or None
            ``layer``, or None when it was not reused (the caller adds a new layer then).
            A Labels layer's undo history is emptied: Ctrl+Z never reaches into the case left.
        """
        if layer is None or np.ndim(data) != layer.ndim:
            return None
        from napari.layers import Labels

        if find_layer(self._viewer, kwargs["name"]) is not None:
            return None
        ndim = layer.ndim
        if not np.array_equal(layer.scale, kwargs.get("scale", (1.0,) * ndim)):
            layer.scale = kwargs.get("scale", (1.0,) * ndim)
        if not np.array_equal(layer.translate, kwargs.get("translate", (0.0,) * ndim)):
            layer.translate = kwargs.get("translate", (0.0,) * ndim)
        if isinstance(layer, Labels):
            layer.data = data
            reset = getattr(layer, "_reset_history", None)
            if reset is not None:
                reset()  # napari keeps the undo history across a data swap
        else:
            limits = kwargs.get("contrast_limits")
            layer.data = data
            if limits is not None:
                limits = [float(v) for v in limits]
                if [float(v) for v in layer.contrast_limits_range] != limits:
                    layer.contrast_limits_range = limits
                if [float(v) for v in layer.contrast_limits] != limits:
                    layer.contrast_limits = limits
            colormap = kwargs.get("colormap")
            if colormap is not None and getattr(layer.colormap, "name", None) != colormap:
                layer.colormap = colormap
        opacity = kwargs.get("opacity", 1.0)  # napari's default (a spare's is 0)
        if layer.opacity != opacity:
            layer.opacity = opacity
        layer.metadata = dict(kwargs.get("metadata") or {})
        layer.name = kwargs["name"]
        if not layer.visible:
            layer.visible = True
        return layer

    def _keep_spare(self, role: str, layer: Any) -> None:
        """Keep ``layer`` hidden as a spare for ``role`` (the next layer of that kind)."""
        layer = getattr(layer, "__wrapped__", layer)
        layer.visible = False
        layer.metadata = {"busseg": {"kind": SPARE, "role": role}}
        name = f"{SPARE} {role}"
        if find_layer(self._viewer, name) is None:
            layer.name = name
        self._spares[role] = layer

    def _show_prediction(self, rec: BusiRecord, data: np.ndarray, spare: dict) -> Any:
        """Show ``data`` as case ``rec``'s prediction layer, reusing the spare one if any."""
        data = np.asarray(data, dtype=np.uint8)
        kwargs = {"name": prediction_name(rec.name), "opacity": 0.5,
                  "metadata": {"busseg": self._prediction_meta(rec, data)}}
        layer = self._reuse_layer(spare.pop("prediction", None), data, kwargs)
        if layer is None:
            layer = self._add_prediction_layer(rec, data)
        return layer

    def _reuse_prompts(self, spare: dict, image: Any) -> None:
        """Hand the case left's boxes and clicks layers to ``image`` (emptied)."""
        boxes, clicks = spare.get("boxes"), spare.get("clicks")
        if boxes is None and clicks is None:
            return
        if boxes is not None and find_layer(self._viewer, image.name + " boxes") is None:
            spare.pop("boxes")
        else:
            boxes = None
        if clicks is not None and find_layer(self._viewer, image.name + " clicks") is None:
            spare.pop("clicks")
        else:
            clicks = None
        if (boxes is not None or clicks is not None) and all(
                lay is None or lay.ndim == image.ndim for lay in (boxes, clicks)):
            from busseg._widgets.segment import reuse_prompt_layers

            reuse_prompt_layers(self._viewer, boxes, clicks, image)
        else:  # another dimensionality: closed, Segment lesions adds fitting ones
            for lay in (boxes, clicks):
                if lay is not None:
                    spare[lay.name] = lay

    def _prediction_meta(self, rec: BusiRecord, data: np.ndarray) -> dict:
        """Metadata (``"busseg"`` key) of a prediction layer the browser writes."""
        return {
            "kind": "prediction",
            "written_by": WRITTEN_BY,
            "name": rec.name,
            "image": rec.name,
            "label": rec.label,
            "source": str(rec.image_path),
            "root": str(self._root) if self._root else None,
            "session_fp": mask_fingerprint(data),
            # Segment lesions' record of an unedited output: Run/G replaces it without asking
            "written_sha1": _data_sha1(data),
        }

    def _add_prediction_layer(self, rec: BusiRecord, data: np.ndarray) -> Any:
        data = np.asarray(data, dtype=np.uint8)
        meta = self._prediction_meta(rec, data)
        layer = self._viewer.add_labels(data, name=prediction_name(rec.name), opacity=0.5,
                                        metadata={"busseg": meta})
        self._below_prompts(layer, rec.name)
        return layer

    def _place_above(self, layer: Any, below: Any) -> None:
        """Move ``layer`` just above ``below`` in the layer list (when both are there)."""
        layers = self._viewer.layers
        if below is None or layer not in layers or below not in layers:
            return
        src, dest = layers.index(layer), layers.index(below) + 1
        if src not in (dest, dest - 1):
            layers.move(src, dest)  # napari: inserted before the layer now at ``dest``

    def _below_prompts(self, layer: Any, name: str) -> None:
        """Move ``layer`` just below case ``name``'s boxes and clicks layers (prompts on top)."""
        layers = self._viewer.layers
        idx = [layers.index(lay) for lay in (find_layer(self._viewer, name + " boxes"),
                                              find_layer(self._viewer, name + " clicks"))
               if lay is not None]
        if idx and layers.index(layer) > min(idx):
            layers.move(layers.index(layer), min(idx))

    def _root_from_layers(self) -> Path | None:
        layers = list(self._viewer.layers)
        active = self._viewer.layers.selection.active
        if active is not None:
            layers.insert(0, active)
        for layer in layers:
            root = busseg_metadata(layer).get("root")
            if root and Path(root).is_dir():
                return Path(root)
        return None

    def _on_from_layer(self, *_: Any) -> None:
        root = self._root_from_layers()
        if root is None:
            notify_warning("No opened layer comes from a folder of scans; choose the folder.")
            return
        self.set_root(root)

    def _on_predict_changed(self, on: Any = None) -> None:
        """Predict the open case when switched on; drop queued prefetches when switched off."""
        if self._session is None:
            return
        if not self._predict_check.value:
            self._prefetch_wanted = None
            self._session.cancel_prefetch()
            return
        rec = self.open_record
        if rec is not None and find_layer(self._viewer, prediction_name(rec.name)) is None:
            self._start_prediction(self._open_index)
        elif rec is not None:
            self._schedule_prefetch()

    def _on_root_changed(self, value: Any) -> None:
        path = _path_or_none(value)
        self._leave_open_case()
        self._all, self._root, self._session = [], None, None
        self._prefetch_wanted = None  # indices of the previous folder
        self._scores.clear()  # keyed by path; a ranking of another folder does not apply
        if path is None or not path.is_dir():
            self._status.value = "Choose a folder of scans."
            self._set_class_choices([])
            self._refresh_list()
            return
        try:
            session = AnnotationSession(path, None, learn=bool(self._learn_check.value),
                                        learn_every=int(self._learn_spin.value),
                                        finetune_options=self.finetune_options)
        except (OSError, ValueError) as exc:
            # shown in the widget, not as a notification: the line edit reports every keystroke
            self._status.value = f"No scans to browse: {exc}"
            self._set_class_choices([])
            self._refresh_list()
            return
        self._session = session
        self._all, self._root = list(session.records), session.roots[0]
        labels = [r.label for r in self._all]
        self._set_class_choices(labels)
        counts = ", ".join(f"{labels.count(c)} {c}" for c in dict.fromkeys(labels))
        layout = session.layouts[0] if session.layouts else "?"
        self._status.value = f"{len(self._all)} scans ({counts}; layout: {layout})"
        if session.problems:
            notify_warning(f"{len(session.problems)} problem(s), e.g. {session.problems[0]}")
        corr = _path_or_none(self._corr_edit.value)
        if corr is None:
            # emits changed -> _on_corrections_changed
            self._corr_edit.value = default_corrections_dir(self._root)
        else:
            self._apply_corrections(corr)
        self._refresh_list()
        if self._shown:
            first = session.first_uncorrected() if session.store is not None else None
            pos = self._shown.index(first) if first in self._shown else 0
            self.select(pos)
            # predict the selected case now: the model is loaded before the first Open
            self._schedule_prefetch(self._shown[pos])
            self._warm_up()

    def _class_choices(self, _widget: Any = None) -> list[str]:
        """``"all"`` and the labels present in the folder (a callable: survives reset_choices)."""
        order = ["benign", "malignant", "normal", "unknown"]
        present = sorted({r.label for r in self._all},
                         key=lambda c: (order.index(c) if c in order else 9, c))
        return [ALL, *present]

    def _set_class_choices(self, _labels: Any = None) -> None:
        current = self._class_combo.value
        with self._class_combo.changed.blocked():
            self._class_combo.reset_choices()
            self._class_combo.value = current if current in self._class_combo.choices else ALL

    def _apply_corrections(self, path: Path | None) -> None:
        s = self._session
        if s is None:
            return
        self._store_error = None
        if path is None:
            s.store = None
            self._store_error = "Choose a corrections folder (outside the dataset) first."
            return
        try:
            s.set_corrections(path)
        except ValueError as exc:
            s.store = None
            self._store_error = str(exc)
            self._status.value = f"Corrections folder refused: {exc}"

    def _on_filter_changed(self, *_: Any) -> None:
        self._refresh_list()
        if self._shown and self.current_record() is None:
            self.select(0)

    def _on_corrections_changed(self, value: Any = None) -> None:
        self._apply_corrections(_path_or_none(self._corr_edit.value))
        self._refresh_list()

    def _on_layers_changed(self, *_: Any) -> None:
        if not self._closing_case:
            self._refresh_list()

    def _on_layer_removed(self, event: Any) -> None:
        """Save a removed prediction layer of the open case (also when the viewer closes)."""
        if self._closing_case:
            return
        layer = getattr(event, "value", None)
        rec = self.open_record
        if (layer is not None and rec is not None and self._session is not None
                and layer.name == prediction_name(rec.name)):
            from napari.layers import Labels

            if isinstance(layer, Labels) and self._session.store is not None:
                try:
                    if self._save_layer(self._open_index, layer, force=False) is not None:
                        notify_info(f"Saved the edits of {rec.name} (its prediction layer "
                                    "was removed).")
                except (OSError, ValueError, RuntimeError) as exc:
                    notify_error(f"The edits of {rec.name} could not be saved: {exc}")
        try:
            self._refresh_list()
        except RuntimeError:  # the Qt widget is gone (the viewer is closing)
            pass

    def _refresh_list(self) -> None:
        """Rebuild the list (filter and status marks) and the progress, keeping the selection."""
        if self._refreshing:
            return
        self._refreshing = True
        try:
            current = self._cases.value
            label = self._class_combo.value
            self._shown = [i for i, r in enumerate(self._all) if label == ALL or r.label == label]
            if self._sort_combo.value == SORT_UNCERTAINTY:
                self._shown.sort(key=self._uncertainty_order)
            s = self._session
            has_store = s is not None and s.store is not None
            predicted = {
                layer.name for layer in self._viewer.layers
                if layer.name.endswith(" prediction") and not self._is_doomed(layer)
            }
            choices = []
            for i in self._shown:
                rec = self._all[i]
                if has_store and s.is_corrected(i):
                    status = CORRECTED
                else:
                    status = PREDICTED if prediction_name(rec.name) in predicted else NOT_SEGMENTED
                score = self.score_of(rec)
                shown = "" if score is None else (
                    "  u=?" if not math.isfinite(score) else f"  u={score:.2f}"
                )
                name = s.names[i] if s is not None else rec.name  # unique: items need it
                choices.append((f"{name}{_STATUS_MARK[status]}{shown}", i))
            self._cases.choices = []  # clear first: keeps the order when marks change
            self._cases.choices = choices
            keep = [i for i in current if i in self._shown]
            if keep:
                self._cases.value = keep
            n, total = s.progress() if has_store else (0, len(self._all))
            self._progress_label.value = f"{n} of {total} corrected"
            self._progress.max = max(total, 1)
            self._progress.value = n
        finally:
            self._refreshing = False

    def _uncertainty_order(self, i: int) -> tuple:
        """Sort key: highest score first, unscored cases last, then dataset order."""
        score = self.score_of(self._all[i])
        if score is None or not math.isfinite(score):
            return (1, 0.0, i)
        return (0, -score, i)

    def _step(self, delta: int) -> None:
        if not self._shown:
            notify_warning("No case to show: choose a folder of scans (and class).")
            return
        if self._open_index is not None and self._open_index in self._shown:
            pos = self._shown.index(self._open_index)
        else:
            value = self._cases.value
            pos = self._shown.index(value[0]) if value and value[0] in self._shown else -1
        new = pos + delta if pos >= 0 else 0
        if not 0 <= new < len(self._shown):
            ok, path = self._autosave()  # the last case's edits are saved all the same
            end = "last" if delta > 0 else "first"
            note = f"; its edits are saved to {path}" if path is not None else ""
            notify_info(f"That was the {end} case{note}.")
            return
        self.select(new)
        self.open_current()

    # ---------------------------------------------------------------- predict and prefetch

    @property
    def prefetch_running(self) -> bool:
        """Whether a background prediction of an upcoming case is running."""
        return self._prefetch_worker is not None

    @property
    def predicting(self) -> bool:
        """Whether the open case's automatic prediction is running."""
        return bool(self._pending)

    def _prediction_settings(self) -> dict:
        """Return the settings of automatic predictions; point the session at the checkpoint.

        Segment lesions' checkpoint and :data:`PREDICT_SETTINGS` when that widget is open
        (so a prediction on open is what its Run would make), else the browser's "Model"
        with the checkpoint's own defaults.
        """
        from busseg._widgets.segment import find_segment_widget

        self._session.checkpoint = self._current_checkpoint()
        seg = find_segment_widget(self._viewer)
        if seg is None:
            return {}
        try:
            settings = seg.settings()
        except (AttributeError, RuntimeError, TypeError, ValueError):
            return {}
        out = {k: settings[k] for k in PREDICT_SETTINGS if k in settings}
        if settings.get("region_filter") is False:  # the widget's region filter switched off
            out["region_filter"] = None
        return out

    def _cached_prediction(self, index: int) -> np.ndarray | None:
        """Case ``index``'s prefetched mask for the current checkpoint and settings, or None."""
        return self._session.cached_prediction(index, **self._prediction_settings())

    def _start_prediction(self, index: int) -> None:
        """Predict the open case in a worker (its prefetch, if running, is waited for)."""
        from napari.qt.threading import create_worker

        rec = self._all[index]
        name = prediction_name(rec.name)
        if name in self._pending:
            return
        job = self._session.prefetch_job(index, cancellable=False, **self._prediction_settings())
        worker = create_worker(guarded, job, _start_thread=False, _ignore_errors=True)
        ref = weakref.ref(self)  # a late worker must not keep a closed viewer alive

        def returned(mask: Any, rec: BusiRecord = rec) -> None:
            widget = ref()
            if widget is not None:
                widget._on_prediction(rec, mask)

        def errored(exc: BaseException, rec: BusiRecord = rec) -> None:
            widget = ref()
            if widget is not None and not widget._viewer_closing:
                notify_error(f"Prediction of {rec.name} failed: {exc}")

        def finished(name: str = name) -> None:
            widget = ref()
            if widget is not None:
                widget._on_worker_finished(name, worker)

        worker.returned.connect(returned)
        worker.errored.connect(errored)
        worker.finished.connect(finished)
        self._pending.add(name)
        self._workers.append(worker)
        self._status.value = f"Predicting {rec.name} ..."
        worker.start()

    def _on_worker_finished(self, name: str, worker: Any) -> None:
        self._pending.discard(name)
        if worker in self._workers:
            self._workers.remove(worker)

    def _on_prediction(self, rec: BusiRecord, mask: np.ndarray | None) -> None:
        name = prediction_name(rec.name)
        if self._viewer_closing or mask is None:  # napari is closing: no new layers
            return
        if self.open_record != rec:  # the user moved on meanwhile: the case is closed
            return
        if find_layer(self._viewer, name) is not None:  # made meanwhile (e.g. segment widget)
            notify_info(f"'{name}' appeared meanwhile and is kept; the new prediction is dropped.")
            self._schedule_prefetch()
            return
        if self._segment_running_on(rec.name):  # G or Run was pressed meanwhile: its mask wins
            self._schedule_prefetch()
            return
        spare = self.spare_layers
        layer = self._show_prediction(rec, mask, spare)
        self._spares = spare
        active = self._viewer.layers.selection.active
        if active is None or active.name == rec.name:  # paint on the mask without a click
            self._viewer.layers.selection.active = layer
        self._status.value = f"{rec.rel_path}: predicted; correct it, then move on (saved)."
        self._schedule_prefetch()

    def _segment_running_on(self, image_name: str) -> bool:
        """Whether Segment lesions is segmenting the image layer ``image_name`` now."""
        from busseg._widgets.segment import find_segment_widget

        seg = find_segment_widget(self._viewer)
        if seg is None or not getattr(seg, "running", False):
            return False
        try:
            image = seg.current_image()
        except (AttributeError, RuntimeError):
            return False
        return image is not None and image.name == image_name

    def _next_to_prefetch(self) -> int | None:
        """Return the case after the open one in the list's order (or None at the end)."""
        pos = self._shown.index(self._open_index) if self._open_index in self._shown else -1
        if pos < 0 or pos + 1 >= len(self._shown):
            return None
        return self._shown[pos + 1]

    def _wants_prefetch(self, index: int | None) -> bool:
        s = self._session
        if (index is None or s is None or not self.prefetch_next or self._viewer_closing
                or not self._predict_check.value or not 0 <= index < len(self._all)):
            return False
        if s.store is not None and s.is_corrected(index):
            return False  # its stored correction is shown, not a prediction
        return find_layer(self._viewer, prediction_name(self._all[index].name)) is None

    def _schedule_prefetch(self, index: int | None = None) -> None:
        """Predict case ``index`` (default: the one after the open case) in the background.

        One prefetch worker at a time: a request made while one runs replaces any earlier
        waiting request and starts when the running one finishes.
        """
        if index is None:
            index = self._next_to_prefetch()
        if not self._wants_prefetch(index):
            return
        if self._prefetch_worker is not None:
            self._prefetch_wanted = index
            return
        from napari.qt.threading import create_worker

        settings = self._prediction_settings()  # snapshotted here, on the GUI thread
        if self._session.cached_prediction(index, **settings) is not None:
            return
        job = self._session.prefetch_job(index, **settings)
        worker = create_worker(guarded, job, _start_thread=False, _ignore_errors=True)
        ref = weakref.ref(self)

        def finished() -> None:
            widget = ref()
            if widget is not None:
                widget._on_prefetch_finished()

        # errors are not shown here: opening the case predicts it again and says why
        worker.finished.connect(finished)
        self._prefetch_worker = worker
        self._prefetch_index = index
        worker.start()

    def _on_prefetch_finished(self) -> None:
        self._prefetch_worker = None
        self._prefetch_index = None
        wanted, self._prefetch_wanted = self._prefetch_wanted, None
        if wanted is not None and not self._viewer_closing:
            self._schedule_prefetch(wanted)


#: The widget's display name is "Scan browser"; both class names work.
ScanBrowserWidget = BusiBrowserWidget
