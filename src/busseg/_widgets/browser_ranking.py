"""Ranking by uncertainty, the Scan browser's part for active learning.

"Rank by uncertainty" scores every case with the viewer's checkpoint
(:class:`busseg.state.ViewerState`; without "Segment lesions", the browser's own "Model")
through :func:`busseg.uncertainty.rank_iter` in a worker (progress bar, Cancel). Each case
shows its score beside its status; "Sort" orders the list by name or by uncertainty (highest
first); "Next suggested" opens the most uncertain case of the list that is not recorded yet.
Scores are cached per (checkpoint, image), and the list is re-ranked by itself when the
checkpoint changes (polled; two ``stat`` calls). :class:`RankingMixin` is that part of the
browser widget; the job itself is :func:`busseg._widgets.browser.rank_job`.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

from busseg._widgets._common import start_worker
from busseg.data.busi import BusiRecord

__all__ = ["RankingMixin", "SORT_NAME", "SORT_UNCERTAINTY"]

#: Choices of the "Sort" box.
SORT_NAME = "name"
SORT_UNCERTAINTY = "uncertainty (highest first)"


class RankingMixin:
    """Rank the cases by uncertainty, sort by it and open the next suggested case."""

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
        return self._current_checkpoint()

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
            self._notify_warning("Choose a dataset folder first; then rank its cases.")
            return False
        checkpoint = self.ranking_checkpoint()
        self._ranked_checkpoint = checkpoint
        paths = [r.image_path for r in self._all]
        self._rank_worker = start_worker(
            self._rank_job(paths, checkpoint), yielded=self._on_rank_yielded,
            returned=self._on_rank_returned, errored=self._on_rank_errored,
            aborted=self._on_rank_aborted, finished=self._on_rank_finished, start=False)
        self._rank_btn.enabled = False
        self._rank_cancel_btn.enabled = True
        self._rank_progress.max = 0  # busy while the model loads
        where = "the shipped default model" if checkpoint is None else checkpoint.name
        self._status.value = f"Ranking {len(paths)} cases with {where} …"
        self._rank_worker.start()
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
            self._notify_info("Ranking is running; the suggested case opens when it finishes.")
            return None
        if self._ranked_key is None or self._checkpoint_changed():
            self._suggest_after_rank = self.rank()
            return None
        rec = self._suggestion()
        if rec is None:
            self._notify_info("No case left to suggest: every ranked case of the list is "
                              "recorded.")
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
        self._notify_error(f"Ranking failed: {exc}")

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

