"""Prediction on open and prefetch, the Scan browser's part that keeps masks ready.

Opening a case shows its automatic prediction, made with the viewer's checkpoint and
inference settings (:class:`busseg.state.ViewerState`, published by "Segment lesions";
without that widget, the browser's own "Model" and the checkpoint's defaults). While the user
works on a case, the next case of the list is predicted in the background
(:meth:`busseg.session.AnnotationSession.prefetch_job`, one worker, one forward pass at a
time), so Next shows its mask at once. A prediction layer that exists (the user's edits, a
loaded correction) is never replaced. :class:`PredictMixin` is that part of the browser.
"""

from __future__ import annotations

import weakref
from typing import Any

import numpy as np

from busseg._widgets._common import start_worker
from busseg.data.busi import BusiRecord
from busseg.layers import find_layer, prediction_name
from busseg.settings import InferenceSettings

__all__ = ["PredictMixin"]

class PredictMixin:
    """Predict the open case in a worker and the next one ahead of time."""

    @property
    def prefetch_running(self) -> bool:
        """Whether a background prediction of an upcoming case is running."""
        return self._prefetch_worker is not None

    @property
    def predicting(self) -> bool:
        """Whether the open case's automatic prediction is running."""
        return bool(self._pending)

    def _prediction_settings(self) -> InferenceSettings:
        """Return the settings of automatic predictions; point the session at the checkpoint.

        Segment lesions' checkpoint and settings when that widget is open (so a prediction on
        open is what its Run would make), else the browser's "Model" with the checkpoint's
        own defaults.
        """
        self._session.checkpoint = self._current_checkpoint()
        settings = self._state.settings
        return settings if settings is not None else InferenceSettings()

    def _cached_prediction(self, index: int) -> np.ndarray | None:
        """Case ``index``'s prefetched mask for the current checkpoint and settings, or None."""
        return self._session.cached_prediction(index, self._prediction_settings())

    def _start_prediction(self, index: int) -> None:
        """Predict the open case in a worker (its prefetch, if running, is waited for)."""
        rec = self._all[index]
        name = prediction_name(rec.name)
        if name in self._pending:
            return
        job = self._session.prefetch_job(index, self._prediction_settings(), cancellable=False)
        ref = weakref.ref(self)  # a late worker must not keep a closed viewer alive

        def returned(mask: Any, rec: BusiRecord = rec) -> None:
            widget = ref()
            if widget is not None:
                widget._on_prediction(rec, mask)

        def errored(exc: BaseException, rec: BusiRecord = rec) -> None:
            widget = ref()
            if widget is not None and not widget._viewer_closing:
                widget._notify_error(f"Prediction of {rec.name} failed: {exc}")

        def finished(name: str = name) -> None:
            widget = ref()
            if widget is not None:
                widget._on_worker_finished(name, worker)

        worker = start_worker(job, returned=returned, errored=errored, finished=finished,
                              start=False)
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
            self._notify_info(f"'{name}' appeared meanwhile and is kept; the new prediction is "
                              "dropped.")
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
        return self._state.segmenting == image_name

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
        settings = self._prediction_settings()  # snapshotted here, on the GUI thread
        if self._session.cached_prediction(index, settings) is not None:
            return
        job = self._session.prefetch_job(index, settings)
        ref = weakref.ref(self)

        def finished() -> None:
            widget = ref()
            if widget is not None:
                widget._on_prefetch_finished()

        # errors are not shown here: opening the case predicts it again and says why
        self._prefetch_worker = start_worker(job, finished=finished, start=False)
        self._prefetch_index = index
        self._prefetch_worker.start()

    def _on_prefetch_finished(self) -> None:
        self._prefetch_worker = None
        self._prefetch_index = None
        wanted, self._prefetch_wanted = self._prefetch_wanted, None
        if wanted is not None and not self._viewer_closing:
            self._schedule_prefetch(wanted)

