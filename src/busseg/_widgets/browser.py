"""The "BUSI browser" dock widget: step through a BUSI-layout dataset and save corrections.

Thin by design (DESIGN practice 3): reading cases is :func:`busseg._reader.read_case`, file
logic (where corrections go, status, atomic saving) is :class:`busseg.corrections.CorrectionStore`,
and prediction is :func:`busseg.predict_mask` run in a ``thread_worker``. This module only wires
them to napari layers.

Layers it manages for a case ``<stem>`` (e.g. ``benign (4)``):

- ``"<stem>"``: the grey image; ``"<stem> ground truth"``: the expert masks (when present);
- ``"<stem> prediction"``: the editable Labels layer, made by "Predict on open" or by the
  "Segment lesions" widget (which names its output ``"<image layer name> prediction"``). An
  existing prediction layer is never replaced, since the user may have corrected it.

Ranking (active learning): "Rank by uncertainty" scores every case of the dataset with the
checkpoint of the "Segment lesions" widget (or, without one, the browser's own "Model") through
:func:`busseg.uncertainty.rank_iter` in a ``thread_worker`` (progress bar, Cancel). Each case
shows its score beside its status; "Sort" orders the list by name or by uncertainty (highest
first); "Next suggested" opens the most uncertain case of the list that has no saved
correction yet. Scores are cached per (checkpoint, image), and the list is re-ranked by itself
when the "Segment lesions" widget switches checkpoint (the widget is polled, since it has no
signal for that; the check is two ``stat`` calls).

"Save correction" writes the prediction layer of the selected case as
``<corrections>/<class>/<stem>_mask.png`` (0/255) and the image as
``<corrections>/<class>/<stem>.png``, so the corrections folder is itself a BUSI-layout
dataset for the fine-tune widget and ``training/train.py``. It refuses a corrections folder
that overlaps the dataset and asks before replacing an existing correction.
"""

from __future__ import annotations

import math
import time
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
)

from busseg._widgets._common import (
    ask_yes_no,
    busseg_metadata,
    find_layer,
    guarded,
    notify_error,
    notify_info,
    notify_warning,
    prediction_name,
)
from busseg.corrections import CORRECTED, NOT_SEGMENTED, PREDICTED, CorrectionStore
from busseg.data.busi import CLASSES, BusiRecord

ALL = "all"
_STATUS_MARK = {NOT_SEGMENTED: "", PREDICTED: "  [predicted]", CORRECTED: "  [corrected]"}
#: Choices of the "Sort" box.
SORT_NAME = "name"
SORT_UNCERTAINTY = "uncertainty (highest first)"


def _path_or_none(value: Any) -> Path | None:
    """Return a FileEdit value as a Path, or None when empty."""
    if value is None:
        return None
    text = str(value).strip()
    if text in ("", "."):
        return None
    return Path(text).expanduser()


def _predict(image: np.ndarray, model_path: Path | None) -> np.ndarray:
    """Run in a worker thread: load (cached) and predict; returns (H, W) bool."""
    from busseg.inference import load_model, predict_mask

    model = load_model(model_path)
    return predict_mask(image, model)


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
    (:meth:`BusiBrowserWidget._refresh_list`), so the reset is a no-op here.
    """

    def reset_choices(self, *_: Any) -> None:
        """Keep the items (the browser refreshes them)."""


class BusiBrowserWidget(Container):
    """Browse a BUSI-layout dataset case by case and save corrected masks.

    Parameters
    ----------
    napari_viewer : napari.viewer.Viewer
        The viewer (napari passes it when the widget is opened from the Plugins menu).

    Notes
    -----
    Public methods mirror the buttons, for scripts and tests: :meth:`set_root`,
    :meth:`set_class_filter`, :meth:`select`, :meth:`open_current`, :meth:`next_case`,
    :meth:`previous_case`, :meth:`save_correction`, :meth:`rank`, :meth:`cancel_ranking`,
    :meth:`set_sort`, :meth:`next_suggested`; :attr:`records` lists the cases shown and
    :meth:`score_of` a case's uncertainty.
    """

    #: How often (ms) the Segment lesions widget's checkpoint is compared with the ranked one.
    CHECKPOINT_POLL_MS = 500

    def __init__(self, napari_viewer: Any) -> None:
        super().__init__(labels=True)
        self._viewer = napari_viewer
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

        self._root_edit = FileEdit(mode="d", label="Dataset", nullable=True)
        self._from_layer_btn = PushButton(text="Use folder of the opened layer")
        self._class_combo = ComboBox(label="Class", choices=[ALL, *CLASSES], value=ALL)
        self._cases = _CaseList(label="Cases")
        self._sort_combo = ComboBox(label="Sort", choices=[SORT_NAME, SORT_UNCERTAINTY],
                                    value=SORT_NAME)
        self._rank_btn = PushButton(text="Rank by uncertainty")
        self._rank_cancel_btn = PushButton(text="Cancel", enabled=False)
        self._rank_progress = ProgressBar(label="Ranking", min=0, max=1, value=0)
        self._suggest_btn = PushButton(text="Next suggested")
        self._predict_check = CheckBox(text="Predict on open", value=False)
        self._model_edit = FileEdit(
            mode="d", label="Model", nullable=True, tooltip="checkpoint folder; empty: default"
        )
        self._prev_btn = PushButton(text="< Previous")
        self._open_btn = PushButton(text="Open")
        self._next_btn = PushButton(text="Next >")
        self._corr_edit = FileEdit(mode="d", label="Corrections", nullable=True)
        self._save_btn = PushButton(text="Save correction")
        self._status = Label(value="Choose a dataset folder.")

        nav = Container(
            layout="horizontal",
            labels=False,
            widgets=[self._prev_btn, self._open_btn, self._next_btn],
        )
        nav.margins = (0, 0, 0, 0)
        ranking = Container(
            layout="horizontal",
            labels=False,
            widgets=[self._rank_btn, self._rank_cancel_btn, self._suggest_btn],
        )
        ranking.margins = (0, 0, 0, 0)
        self.extend(
            [
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
                self._save_btn,
                self._status,
            ]
        )
        from qtpy.QtWidgets import QAbstractItemView

        self._cases.native.setSelectionMode(QAbstractItemView.SelectionMode.SingleSelection)
        self._cases.native.setMinimumHeight(200)
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
        self._status.native.setWordWrap(True)
        self._cases.native.itemDoubleClicked.connect(lambda *_: self.open_current())

        self._root_edit.changed.connect(self._on_root_changed)
        self._from_layer_btn.changed.connect(self._on_from_layer)
        self._class_combo.changed.connect(self._on_filter_changed)
        self._open_btn.changed.connect(self.open_current)
        self._prev_btn.changed.connect(self.previous_case)
        self._next_btn.changed.connect(self.next_case)
        self._corr_edit.changed.connect(self._on_corrections_changed)
        self._save_btn.changed.connect(self.save_correction)
        self._sort_combo.changed.connect(self._on_sort_changed)
        self._rank_btn.changed.connect(self.rank)
        self._rank_cancel_btn.changed.connect(self.cancel_ranking)
        self._suggest_btn.changed.connect(self.next_suggested)
        from qtpy.QtCore import QTimer

        self._poll = QTimer(self.native)
        self._poll.setInterval(self.CHECKPOINT_POLL_MS)
        self._poll.timeout.connect(self._on_checkpoint_poll)
        self._viewer.layers.events.inserted.connect(self._on_layers_changed)
        self._viewer.layers.events.removed.connect(self._on_layers_changed)

        root = self._root_from_layers()
        if root is not None:
            self.set_root(root)

    # ---------------------------------------------------------------- public API

    @property
    def records(self) -> list[BusiRecord]:
        """The cases listed now (after the class filter), in list order."""
        return [self._all[i] for i in self._shown]

    @property
    def root(self) -> Path | None:
        """The dataset root being browsed (as resolved by ``discover_busi``), or None."""
        return self._root

    def set_root(self, path: str | Path) -> None:
        """Browse the BUSI-layout dataset at ``path`` (root, parent or one class folder)."""
        self._root_edit.value = Path(path)  # emits changed -> _on_root_changed

    def set_corrections(self, path: str | Path) -> None:
        """Use ``path`` as the corrections folder (created on the first save)."""
        self._corr_edit.value = Path(path)

    def set_class_filter(self, label: str) -> None:
        """Show ``"all"`` cases or one class (``"benign"``, ``"malignant"``, ``"normal"``)."""
        self._class_combo.value = label

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
        predicted = find_layer(self._viewer, prediction_name(record.name), "labels") is not None
        store = self._store(quiet=True)
        if store is None:
            return PREDICTED if predicted else NOT_SEGMENTED
        return store.status(record, predicted=predicted)

    def open_current(self) -> None:
        """Add the selected case's image and ground truth; predict it if asked."""
        rec = self.current_record()
        if rec is None:
            notify_warning("Select a case in the list first.")
            return
        from napari.layers import Layer

        from busseg._reader import read_case

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
                if existing is None:
                    self._viewer.add_layer(Layer.create(data, kwargs, kind))
                else:
                    existing.visible = True
            image_layer = find_layer(self._viewer, rec.name, "image")
        self._show_only(rec.name)
        if image_layer is not None:
            self._viewer.layers.selection.active = image_layer
        self._viewer.reset_view()
        self._status.value = f"{rec.rel_path}: {self.status_of(rec)}"
        if self._predict_check.value and image_layer is not None:
            self._start_prediction(rec, np.asarray(image_layer.data))

    def next_case(self) -> None:
        """Select and open the next case in the list."""
        self._step(+1)

    def previous_case(self) -> None:
        """Select and open the previous case in the list."""
        self._step(-1)

    def save_correction(self) -> Path | None:
        """Save the selected case's prediction layer as a correction.

        Returns
        -------
        pathlib.Path or None
            The written mask file, or None when nothing was saved (the reason is shown as a
            notification).
        """
        rec = self.current_record()
        if rec is None:
            notify_warning("Select the case to save in the list first.")
            return None
        store = self._store(quiet=False)
        if store is None:
            return None
        layer = find_layer(self._viewer, prediction_name(rec.name), "labels")
        if layer is None:
            notify_error(
                f"No Labels layer named '{prediction_name(rec.name)}'. Predict the case first "
                "('Predict on open', or the 'Segment lesions' widget), correct it, then save."
            )
            return None
        from busseg.data.io import read_image

        try:
            image = read_image(rec.image_path)
        except (OSError, ValueError) as exc:
            notify_error(f"cannot read the image {rec.image_path}: {exc}")
            return None
        mask = np.asarray(layer.data)
        overwrite = False
        target = store.path_for(rec).mask
        if store.is_corrected(rec):
            if not self._confirm_overwrite(target):
                notify_info(f"Not saved: {target} kept as it was.")
                return None
            overwrite = True
        try:
            paths = store.save(rec, None, image, mask, overwrite=overwrite)
        except (OSError, ValueError) as exc:
            notify_error(f"Correction not saved: {exc}")
            return None
        notify_info(f"Saved the correction of {rec.name} to {paths.mask}")
        self._refresh_list()
        return paths.mask

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
        store = self._store(quiet=True)
        current = self.current_record()
        best: list[tuple[float, int, BusiRecord]] = []
        for i in self._shown:
            rec = self._all[i]
            score = self.score_of(rec)
            if score is None or not math.isfinite(score):
                continue
            if store is not None and store.is_corrected(rec):
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

    def _confirm_overwrite(self, path: Path) -> bool:
        return ask_yes_no(
            "Replace correction?",
            f"A correction already exists:\n{path}\n\nReplace it with the current layer?",
            parent=self.native,
        )

    def _store(self, *, quiet: bool) -> CorrectionStore | None:
        corr = _path_or_none(self._corr_edit.value)
        if corr is None:
            if not quiet:
                notify_error("Choose a corrections folder (outside the dataset) first.")
            return None
        try:
            return CorrectionStore(corr, dataset_root=self._root)
        except ValueError as exc:
            if not quiet:
                notify_error(str(exc))
            return None

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
            notify_warning("No opened layer comes from a BUSI folder; choose the dataset folder.")
            return
        self.set_root(root)

    def _on_root_changed(self, value: Any) -> None:
        from busseg.data.busi import discover_busi

        path = _path_or_none(value)
        self._all, self._root = [], None
        self._scores.clear()  # keyed by path; a ranking of another folder does not apply
        if path is None or not path.is_dir():
            self._status.value = "Choose a dataset folder."
            self._refresh_list()
            return
        try:
            index = discover_busi(path, check_sizes=False)
        except (OSError, ValueError) as exc:
            # shown in the widget, not as a notification: the line edit reports every keystroke
            self._status.value = f"Not a BUSI-layout folder: {exc}"
            self._refresh_list()
            return
        self._all, self._root = list(index.records), index.root
        counts = ", ".join(f"{n} {label}" for label, n in index.counts().items())
        self._status.value = f"{len(self._all)} cases ({counts})"
        if index.problems:
            notify_warning(f"{len(index.problems)} problem(s), e.g. {index.problems[0]}")
        self._refresh_list()
        if self._shown:
            self.select(0)

    def _on_filter_changed(self, *_: Any) -> None:
        self._refresh_list()
        if self._shown and self.current_record() is None:
            self.select(0)

    def _on_corrections_changed(self, *_: Any) -> None:
        self._refresh_list()

    def _on_layers_changed(self, *_: Any) -> None:
        self._refresh_list()

    def _refresh_list(self) -> None:
        """Rebuild the list (filter and status marks), keeping the selection."""
        if self._refreshing:
            return
        self._refreshing = True
        try:
            current = self._cases.value
            label = self._class_combo.value
            self._shown = [i for i, r in enumerate(self._all) if label == ALL or r.label == label]
            if self._sort_combo.value == SORT_UNCERTAINTY:
                self._shown.sort(key=self._uncertainty_order)
            store = self._store(quiet=True)
            predicted = {
                layer.name for layer in self._viewer.layers if layer.name.endswith(" prediction")
            }
            choices = []
            for i in self._shown:
                rec = self._all[i]
                is_pred = prediction_name(rec.name) in predicted
                if store is not None:
                    status = store.status(rec, predicted=is_pred)
                else:
                    status = PREDICTED if is_pred else NOT_SEGMENTED
                score = self.score_of(rec)
                shown = "" if score is None else (
                    "  u=?" if not math.isfinite(score) else f"  u={score:.2f}"
                )
                choices.append((f"{rec.name}{_STATUS_MARK[status]}{shown}", i))
            self._cases.choices = []  # clear first: keeps the order when marks change
            self._cases.choices = choices
            keep = [i for i in current if i in self._shown]
            if keep:
                self._cases.value = keep
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
            notify_warning("No case to show: choose a dataset folder (and class).")
            return
        value = self._cases.value
        pos = self._shown.index(value[0]) if value and value[0] in self._shown else -1
        new = pos + delta if pos >= 0 else 0
        if not 0 <= new < len(self._shown):
            notify_info("That was the last case." if delta > 0 else "That was the first case.")
            return
        self.select(new)
        self.open_current()

    def _show_only(self, name: str) -> None:
        """Hide the layers of other cases (never delete them: they may hold corrections)."""
        other_names = {r.name for r in self._all} - {name}
        for layer in self._viewer.layers:
            meta = busseg_metadata(layer)
            case = meta.get("name") if meta.get("kind") != "stack" else None
            if case is None and layer.name.endswith(" prediction"):
                case = layer.name[: -len(" prediction")]
            if case in other_names:
                layer.visible = False
            elif case == name:
                layer.visible = True

    def _start_prediction(self, rec: BusiRecord, image: np.ndarray) -> None:
        name = prediction_name(rec.name)
        if find_layer(self._viewer, name) is not None:
            notify_info(f"'{name}' exists and is kept (it may hold your edits).")
            return
        if name in self._pending:
            return
        from napari.qt.threading import create_worker

        self._pending.add(name)
        model_path = _path_or_none(self._model_edit.value)
        worker = create_worker(_predict, image, model_path, _start_thread=False)
        worker.returned.connect(lambda mask, rec=rec: self._on_prediction(rec, mask))
        worker.errored.connect(lambda exc: notify_error(f"Prediction of {rec.name} failed: {exc}"))
        worker.finished.connect(lambda: self._on_worker_finished(name, worker))
        self._workers.append(worker)
        self._status.value = f"Predicting {rec.name} ..."
        worker.start()

    def _on_worker_finished(self, name: str, worker: Any) -> None:
        self._pending.discard(name)
        if worker in self._workers:
            self._workers.remove(worker)

    def _on_prediction(self, rec: BusiRecord, mask: np.ndarray) -> None:
        name = prediction_name(rec.name)
        if find_layer(self._viewer, name) is not None:  # made meanwhile (e.g. segment widget)
            notify_info(f"'{name}' appeared meanwhile and is kept; the new prediction is dropped.")
            return
        meta = {
            "kind": "prediction",
            "name": rec.name,
            "label": rec.label,
            "source": str(rec.image_path),
            "root": str(self._root) if self._root else None,
        }
        self._viewer.add_labels(
            np.asarray(mask, dtype=np.uint8),
            name=name,
            opacity=0.5,
            metadata={"busseg": meta},
        )
        self._status.value = f"{rec.rel_path}: predicted; correct it, then save."
