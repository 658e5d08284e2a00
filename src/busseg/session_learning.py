"""Learning as you go and site calibration of an annotation session.

A mixin of :class:`busseg.session.AnnotationSession`: after every few answers a background
fine-tune (:meth:`~SessionLearning.finetune_job`) trains on the corrections so far and is
adopted only when the simulated annotation cost of the held-out corrections is not higher
with it (:mod:`busseg.annotator`); the site calibration
(:mod:`busseg.calibration`) re-chooses the automatic masks' settings from the answers.
"""

from __future__ import annotations

import time
from collections.abc import Generator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from busseg.session_types import (
    DEFAULT_SITE_MODE,
    LEARN_GROWTH,
    LEARN_MAX_EVERY,
    SITE_MODES,
    Case,
    FinetuneOutcome,
    checkpoint_text,
)

if TYPE_CHECKING:  # pragma: no cover
    from busseg.finetune_settings import FinetuneSettings

__all__ = ["SessionLearning"]


class SessionLearning:
    """The learning part of :class:`busseg.session.AnnotationSession` (a mixin)."""

    @property
    def learn_every(self) -> int:
        """New corrections between two fine-tunes (>= 1)."""
        return self._learn_every

    @learn_every.setter
    def learn_every(self, value: int) -> None:
        value = int(value)
        if value < 1:
            raise ValueError(f"learn_every must be at least 1, got {value}")
        self._learn_every = value

    # ------------------------------------------------------------------ learning as you go

    @property
    def finetune_running(self) -> bool:
        """Whether a fine-tune job is running."""
        return self._finetune_running

    # ------------------------------------------------------------------ site calibration

    def _load_calibration(self) -> None:
        """Read the corrections folder's calibration for the checkpoint in use, if any."""
        from busseg.calibration import CalibrationError

        if self.calibrator is None or self.store is None:
            return
        try:
            self.calibrator.load(self.store.root, checkpoint_text(self.checkpoint))
        except CalibrationError as exc:
            self.problems.append(f"site calibration not used: {exc}")

    def _observe_answer(self, case: Case, mask: np.ndarray) -> None:
        """Give an answer to the site calibration; refit, store and re-predict when due."""
        if self.calibrator is None or self.store is None:
            return
        from busseg.inference import load_model

        ck = checkpoint_text(self.checkpoint)
        try:
            model = load_model(self.checkpoint)
            refitted = self.calibrator.observe(case.index, case.image, mask, ck, model)
        except (OSError, ValueError) as exc:  # a checkpoint that cannot load: no calibration
            self.problems.append(f"site calibration skipped for {case.name}: {exc}")
            return
        if refitted:  # cached masks of the previous settings no longer match a key; the
            # calibrator re-applies the new settings to its raw predictions without the model
            self.calibrator.save(self.store.root)

    def calibration_text(self) -> str:
        """Describe the site calibration in one line ("" when off or before the first one).

        E.g. ``"site calibration: 14 answers, false regions 9 -> 3 on them, interactions
        12 -> 6"``: the region filter's threshold and the normal-scan gate re-chosen on the
        answers so far by their simulated annotation cost (:mod:`busseg.calibration`).
        """
        return "" if self.calibrator is None else self.calibrator.text()

    def learn_interval(self) -> int:
        """Return how many new answers the next fine-tune waits for.

        :attr:`learn_every` for the first fine-tunes, then half the answers the previous
        fine-tune was trained on, at most :data:`LEARN_MAX_EVERY`: with the defaults
        fine-tunes start after 10, 20, 30, 45, 67, 100, 140 ... answers, so the first 20
        scans already benefit and a long session does not spend its compute on retraining
        after every few scans once many answers are in.

        Returns
        -------
        int
            >= :attr:`learn_every`.
        """
        grown = int(self._answers_at_finetune * LEARN_GROWTH)
        return max(self.learn_every, min(LEARN_MAX_EVERY, grown))

    def finetune_due(self) -> bool:
        """Whether learning as you go should start a fine-tune now.

        True when learning is on, no fine-tune is running, a corrections folder is set and
        at least :meth:`learn_interval` answers were recorded since the last fine-tune
        started.
        """
        return (self.learn and not self._finetune_running and self.store is not None
                and self.new_corrections >= self.learn_interval())

    def stop_finetune(self) -> None:
        """Ask a running fine-tune to stop after the current step (its best weights count)."""
        self._stop.set()

    def finetune_job(self) -> Generator[Any, None, FinetuneOutcome]:
        """Fine-tune on every recorded answer; adopt the result only if it costs less to annotate.

        A generator (run it in a worker thread, or drain it): it yields the progress events of
        :func:`busseg.finetune.finetune_iter` and returns a :class:`FinetuneOutcome`. The
        recorded cases (accepted, corrected, brushed and normal answers, empty masks
        included) are read in the order they were recorded when it starts; the new-answer
        counter restarts then.

        - **Held out: the latest answers** (leave-later-out, :func:`busseg.finetune.later_split`),
          so the fine-tune is judged on the scans that came after the ones it learned from,
          as the annotator will use it.
        - **A site checkpoint** (:mod:`busseg.site`; ``finetune_options["site"]``, default
          :data:`DEFAULT_SITE_MODE`): the network the session started from (never an earlier
          fine-tune: adapting twice never stacks) is fine-tuned on all answers, and the new
          folder keeps both networks: ``"vote"`` lets the adapted network decide which
          regions of the base's automatic mask stay; ``"adapted"`` lets it draw the automatic
          mask. Box and click prompts come from whichever network costs fewer interactions on
          the held-out lesion answers (:func:`busseg.finetune.prompts_from_adapted`: a clear
          saving on enough answers, else the base).
          ``"whole"`` keeps the fine-tuned network alone for everything (fine-tuned from the
          current checkpoint, as before site checkpoints existed).
        - **Adoption**: the simulated annotator (:mod:`busseg.annotator`: accept, clear, box
          then clicks) annotates the held-out answers with the current and with the new
          checkpoint, same box jitter; the new one is adopted when its interactions per
          held-out scan are not higher, whatever the Dice says. Without a held-out lesion it
          is not adopted (a model that learned to predict nothing would cost nothing on
          normal scans alone). :attr:`status` and :attr:`history` record the outcome.

        Yields
        ------
        busseg.engine.ProgressEvent

        Returns
        -------
        FinetuneOutcome

        Raises
        ------
        RuntimeError
            If another fine-tune is running or no corrections folder is set.
        ValueError
            If fewer than two answers are recorded (one to train on, one to hold out), or
            ``finetune_options["site"]`` is unknown.
        """
        with self._finetune_lock:
            if self._finetune_running:
                raise RuntimeError("a fine-tune is running already; one at a time")
            if self.store is None:
                raise RuntimeError("choose a corrections folder before fine-tuning")
            self._finetune_running = True
        self._stop.clear()
        self.new_corrections = 0
        t0 = time.perf_counter()
        current = self.checkpoint
        try:
            from busseg.finetune import default_output_dir, finetune_iter, later_split
            from busseg.site import drawing_base

            images, masks, names, _ = self.recorded_pairs()
            self._answers_at_finetune = len(images)
            if len(images) < 2:
                raise ValueError(
                    f"learning as you go needs at least 2 recorded answers (one held out), "
                    f"{len(images)} recorded")
            opts = dict(self.finetune_options)
            site = opts.pop("site", DEFAULT_SITE_MODE)
            if site not in SITE_MODES:
                raise ValueError(f"finetune_options['site'] must be one of {SITE_MODES}, "
                                 f"got {site!r}")
            random_split = "val_fraction" in opts
            settings = self._finetune_settings(opts, site)
            out = opts.pop("out_dir", None) or default_output_dir(self.models_dir)
            if "val_indices" not in opts and not random_split:
                _, opts["val_indices"] = later_split([bool(np.any(m)) for m in masks])
            start = current if site == "whole" else drawing_base(current)
            self.status = f"Fine-tuning on {len(images)} recorded answers …"
            result = yield from finetune_iter(images, masks, start, settings=settings,
                                              out_dir=out, names=names, stop=self._stop, **opts)
            if site != "whole" and result.checkpoint is not None:
                self._make_site(result, images, masks, start, site)
            outcome = self._adoption(result, images, masks, current, t0)
            self.status = outcome.message
            self.history.append(outcome)
            return outcome
        except Exception as exc:
            self.status = f"Fine-tune failed: {exc}"
            raise
        finally:
            self._finetune_running = False

    @staticmethod
    def _finetune_settings(opts: dict[str, Any], site: str) -> FinetuneSettings:
        """Resolve the fine-tune's settings once, taking their keys out of ``opts``.

        ``opts["settings"]`` (a :class:`busseg.finetune.FinetuneSettings`) is used whole;
        otherwise ``recipe`` (default :data:`busseg.finetune.SITE_RECIPE` unless ``site`` is
        ``"whole"``), ``cfg`` (a dict of overrides or a ``TrainConfig``), ``val_fraction``,
        ``augment`` and ``replay`` are folded into one. What stays in ``opts`` (``val_indices``,
        ``device`` ...) goes to :func:`busseg.finetune.finetune_iter` as it is.
        """
        from busseg.finetune import SITE_RECIPE, FinetuneSettings

        keys = ("recipe", "cfg", "val_fraction", "augment", "replay")
        parts = {k: opts.pop(k) for k in keys if k in opts}
        settings = opts.pop("settings", None)
        if settings is not None:
            if parts:
                raise TypeError(f"finetune_options: pass either 'settings' or "
                                f"{', '.join(map(repr, parts))}, not both")
            return settings
        recipe = parts.pop("recipe", None if site == "whole" else SITE_RECIPE)
        return FinetuneSettings.from_parts(recipe, **parts)

    def _make_site(self, result: Any, images: Sequence[np.ndarray],
                   masks: Sequence[np.ndarray], start: Path | None, site: str) -> None:
        """Make a fine-tune's checkpoint a site checkpoint, prompts from the cheaper network."""
        from busseg.finetune import prompt_costs, prompts_from_adapted
        from busseg.inference import accepts_prompts, load_model
        from busseg.site import make_site_checkpoint

        val = list(result.extra.get("val_indices") or [])
        costs = {"base": float("nan"), "adapted": float("nan")}
        if accepts_prompts(load_model(start)):  # else prompts never reach the model
            self.status = "Choosing the network that answers prompts …"
            costs = prompt_costs(images, masks, val,
                                 {"base": start, "adapted": result.checkpoint})
        adapted_ok = prompts_from_adapted(costs, masks, val)
        make_site_checkpoint(result.checkpoint, start, automatic=site,
                             prompts="adapted" if adapted_ok else "base",
                             info={"prompt_costs": {k: (float(v) if np.isfinite(v) else None)
                                                    for k, v in costs.items()},
                                   "heldout": "latest answers"})

    def _adoption(self, result: Any, images: Sequence[np.ndarray], masks: Sequence[np.ndarray],
                  base: Path | None, t0: float) -> FinetuneOutcome:
        """Decide on a fine-tune's checkpoint by the simulated annotation cost.

        The held-out corrections are annotated by the simulated annotator
        (:func:`busseg.finetune.heldout_costs`, :mod:`busseg.annotator`: accept, clear, box
        then clicks) with the current and the new checkpoint, with the same box jitter. The
        new checkpoint is adopted when its interactions per held-out scan are not higher,
        whatever the Dice says; never without a held-out correction that has a lesion (on
        normal scans alone a model that predicts nothing would cost nothing). Switches
        :attr:`checkpoint` when adopted and returns the outcome (both numbers in its
        message). ``t0``: the job's start (``time.perf_counter``).
        """
        from busseg.finetune import heldout_costs

        before, after = result.dice_before, result.dice_after
        val = list(result.extra.get("val_indices") or [])
        n_lesion = sum(bool(np.asarray(masks[i]).any()) for i in val)
        where = "the default model" if base is None else Path(base).name
        costs, why = None, ""
        if result.checkpoint is not None and val and n_lesion:
            self.status = f"Simulating the annotator on {len(val)} held-out corrections …"
            try:
                costs = heldout_costs(images, masks, val, base, result.checkpoint, seed=0)
            except ValueError as exc:  # a checkpoint without prompts
                why = str(exc)
        ib = costs["before"]["per_scan"] if costs else None
        ia = costs["after"]["per_scan"] if costs else None
        adopted = costs is not None and ia <= ib

        def dice() -> str:
            if before is None or after is None:
                return "held-out Dice –"
            return f"held-out Dice {before:.3f} -> {after:.3f}"

        numbers = (f"{ib:.2f} -> {ia:.2f} interactions per held-out scan, {dice()}"
                   if costs else "")
        if adopted:
            self.checkpoint = Path(result.checkpoint)
            msg = (f"New checkpoint adopted: {numbers} ({result.n_train} trained, "
                   f"{result.n_val} held out); now using {self.checkpoint}")
        elif result.checkpoint is None:
            msg = f"Fine-tune not adopted: no checkpoint was written; kept {where}"
        elif not val:
            msg = f"Fine-tune not adopted: no held-out pairs to compare; kept {where}"
        elif not n_lesion:
            msg = (f"Fine-tune not adopted: no held-out correction has a lesion, so it "
                   f"cannot show that lesions are still found; kept {where}")
        elif costs is None:
            msg = f"Fine-tune not adopted: {why}; kept {where}"
        else:
            msg = (f"Fine-tune not adopted: it would cost more to annotate: {numbers}; "
                   f"kept {where}")
        return FinetuneOutcome(adopted, result.checkpoint, base, before, after,
                               result.n_train, result.n_val, time.perf_counter() - t0, msg,
                               interactions_before=ib, interactions_after=ia, costs=costs)

    def run_due_finetune(self, callback: Any = None) -> FinetuneOutcome | None:
        """Run a due fine-tune synchronously (benchmarks, scripts); None when none is due.

        Parameters
        ----------
        callback : callable, optional
            Called with each progress event.

        Returns
        -------
        FinetuneOutcome or None
        """
        if not self.finetune_due():
            return None
        from busseg.engine import drain

        return drain(self.finetune_job(), callback)
