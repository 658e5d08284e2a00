"""Learning as you go, the Scan browser's part that fine-tunes on the annotator's answers.

After every N new recorded cases the session's checkpoint is fine-tuned on all corrections in
a worker (:meth:`busseg.session.AnnotationSession.finetune_job`); the new checkpoint is
adopted only when the simulated annotator (:mod:`busseg.annotator`) needs no more
interactions per held-out scan with it than with the current one (not by Dice). An adopted
checkpoint becomes the viewer's (:class:`busseg.state.ViewerState`), which "Segment lesions"
follows. :class:`LearningMixin` is that part of the browser widget.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from busseg._widgets._common import start_worker

__all__ = ["LEARNING_TOOLTIP", "LearningMixin", "path_or_none"]

#: Tooltip of the "Learn as you go" check box.
LEARNING_TOOLTIP = (
    "Site fine-tunes in the background (off by default): after 10, 20, 30, 45 ... recorded "
    "answers the checkpoint you started from is fine-tuned on all of them, the latest held "
    "out, and written as a site checkpoint; Segment lesions switches to it only when the "
    "simulated annotator needs no more interactions per held-out scan with it than with the "
    "current one (adoption is decided by those interactions, not by Dice). The site "
    "calibration of the automatic masks runs every 5 answers whether this is on or off.")


def path_or_none(value: Any) -> Path | None:
    """Return a FileEdit value as a Path, or None when empty."""
    if value is None:
        return None
    text = str(value).strip()
    if text in ("", "."):
        return None
    return Path(text).expanduser()


class LearningMixin:
    """Learning as you go: start due fine-tunes, report them, adopt their checkpoint."""

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
        if self._state.settings is not None:  # a model chooser (Segment lesions) is open
            return self._state.checkpoint
        return path_or_none(self._model_edit.value)

    def _maybe_finetune(self) -> bool:
        """Start a fine-tune in a worker when the session says one is due."""
        s = self._session
        if s is None or self._finetune_worker is not None:
            return False
        s.learn = bool(self._learn_check.value)
        s.learn_every = int(self._learn_spin.value)
        if not s.finetune_due():
            return False
        s.checkpoint = self._current_checkpoint()
        self._finetune_worker = start_worker(
            s.finetune_job(), yielded=self._on_finetune_yielded,
            returned=self._on_finetune_returned, errored=self._on_finetune_errored,
            finished=self._on_finetune_finished, start=False)
        self._status.value = (f"Learning as you go: fine-tuning on the corrections in the "
                              f"background ({s.progress_text()}) …")
        self._finetune_worker.start()
        return True

    def _on_finetune_yielded(self, event: Any) -> None:
        msg = getattr(event, "message", None)
        if msg and getattr(event, "kind", "") != "step":
            self._status.value = f"Learning as you go: {msg}"

    def _on_finetune_returned(self, outcome: Any) -> None:
        self._status.value = outcome.message
        if outcome.adopted and outcome.checkpoint is not None:
            if self._state.settings is None:  # no Segment lesions: the browser's own model
                self._model_edit.value = outcome.checkpoint
            self._state.checkpoint = outcome.checkpoint  # Segment lesions follows
            self._notify_info(outcome.message)

    def _on_finetune_errored(self, exc: BaseException) -> None:
        self._status.value = f"Learning as you go: fine-tune failed: {exc}"
        self._notify_error(f"Fine-tune failed: {exc}")

    def _on_finetune_finished(self) -> None:
        self._finetune_worker = None

