"""The one training loop, used by ``training/train.py``, fine-tuning and the napari widget.

:func:`fit_iter` is a generator: it yields :class:`~busseg.engine.ProgressEvent` objects while
it trains and returns a :class:`~busseg.engine.FitResult` (``StopIteration.value``). The
napari widget wraps it in a ``thread_worker``; :func:`fit` drains it synchronously for scripts
and tests. Nothing here imports Qt; stopping is a plain ``threading.Event`` (anything with
``is_set()``) checked every step.

The loop only decides when to step, validate and stop. The step itself is
:class:`~busseg.engine.trainer.Trainer`'s; validation is
:func:`~busseg.engine.evaluate_dataset`; selection, early stopping, the weight average and
the run folder are the hooks of :mod:`busseg.engine.hooks`, called at fixed points.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Generator, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from busseg.devices import get_device
from busseg.engine.config import FitResult, ProgressEvent, TrainConfig
from busseg.engine.evaluation import selection_score
from busseg.engine.hooks import (
    BestSelection,
    EarlyStopping,
    RunWriter,
    dist_info,
    seed_everything,
)
from busseg.engine.state import resume_state
from busseg.engine.trainer import Trainer


def fit_iter(
    model: torch.nn.Module,
    train_set: Dataset,
    val_set: Dataset | None,
    cfg: TrainConfig | None = None,
    *,
    device: str | torch.device = "auto",
    stop: Any = None,
    out_dir: str | os.PathLike | None = None,
    checkpoint_config: dict | None = None,
    resume: bool = False,
) -> Generator[ProgressEvent, None, FitResult]:
    """Train ``model`` on ``train_set``, yielding progress, and return the best model.

    Parameters
    ----------
    model : torch.nn.Module
        A model from :func:`busseg.models.build_model` (trained further in place).
    train_set : Dataset
        Yields (image (1, h, w) float32, mask (1, h, w) float32 in {0, 1}), e.g. a
        :class:`busseg.data.dataset.SegmentationDataset` with augmentation.
    val_set : Dataset or None
        Validation pairs without augmentation; without it the last weights are kept.
    cfg : TrainConfig, optional
        Hyper-parameters (defaults if None).
    device : str or torch.device
        ``"auto"``, ``"cuda"``, ``"mps"`` or ``"cpu"`` (see :func:`busseg.devices.get_device`).
    stop : object with ``is_set()``, optional
        A ``threading.Event``; when set, training ends after the current step and the best
        weights so far are returned (``FitResult.stopped``).
    out_dir : path, optional
        Run folder: ``log.csv`` (one row per validation), ``curves.png``, ``best/`` (the
        best checkpoint) and ``last/`` (resumable state). Must not exist yet unless
        ``resume``.
    checkpoint_config : dict, optional
        Config sections written into ``best/config.json`` (preprocessing, training data,
        split, lineage); the training settings and metrics are added here.
    resume : bool
        Continue the run in ``out_dir`` from its ``last/`` state.

    Yields
    ------
    ProgressEvent
        ``start``, then ``step`` per optimiser step and ``eval`` per validation, then ``end``.

    Returns
    -------
    FitResult
        Through ``StopIteration.value``; use :func:`fit` to get it directly.

    Raises
    ------
    FileExistsError
        If ``out_dir`` exists and ``resume`` is False (a run is never overwritten).
    ValueError
        If the training set is empty, or ``resume`` is given without ``out_dir``.
    """
    cfg = cfg or TrainConfig()
    if len(train_set) == 0:
        raise ValueError("the training set is empty")
    distributed, rank, world = dist_info()
    dev = get_device(device) if not isinstance(device, torch.device) else device
    seed_everything(cfg.seed)
    out = Path(out_dir) if out_dir is not None else None
    writer = None
    if out is not None and rank == 0:  # only the main process writes the run folder
        writer = RunWriter(out, cfg, checkpoint_config, RunWriter.prepare(out, resume))
    trainer = Trainer(model, train_set, cfg, dev, distributed=distributed, rank=rank,
                      world=world)
    run = _Run(trainer, val_set, stop, writer)
    if resume:
        if out is None:
            raise ValueError("resume needs out_dir, the folder of the run to continue")
        run.resume(out)
    return (yield from _train(run))


class _Run:
    """The state of one run between steps: counts, history, selection, stop flags, clock."""

    def __init__(self, trainer: Trainer, val_set: Dataset | None, stop: Any,
                 writer: RunWriter | None) -> None:
        self.trainer, self.cfg, self.val_set = trainer, trainer.cfg, val_set
        self.stop, self.writer = stop, writer
        self.step, self.start_epoch = 0, 1
        self.history: list[dict] = []
        # the best weights are those validated (the weight average with ema_decay)
        self.best = BestSelection(trainer.eval_model, self.cfg.select_min_dice_lesion)
        self.stopping = EarlyStopping(self.cfg.early_stopping)
        self.stopped = self.early = False
        self.t0, self.elapsed_before = time.perf_counter(), 0.0

    def resume(self, out: Path) -> None:
        """Continue from the run folder's ``last/`` state (and ``best/`` weights)."""
        tr = self.trainer
        st = resume_state(out, tr.model, tr.optimizer, tr.scheduler, tr.averaged)
        self.step, self.start_epoch = st["step"], st["epoch"] + 1
        self.best.score, self.best.step, self.best.epoch = (st["best"], st["best_step"],
                                                            st["best_epoch"])
        self.stopping.bad = st["bad"]
        self.elapsed_before, self.history = st["elapsed"], st["history"]
        if st["best_state"] is not None:
            self.best.state = st["best_state"]

    def elapsed(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.t0

    def has_val(self) -> bool:
        return bool(self.val_set is not None and len(self.val_set))

    def stop_requested(self) -> bool:
        return self.stop is not None and self.stop.is_set()

    def validated(self) -> bool:
        """Return whether every step done has been validated (or none was done)."""
        return self.step == 0 or bool(self.history and self.history[-1]["step"] == self.step)


def _train(run: _Run) -> Generator[ProgressEvent, None, FitResult]:
    tr = run.trainer
    yield ProgressEvent("start", run.start_epoch, run.step, tr.total, lr=tr.lr(),
                        message=f"training on {tr.device.type}: {len(tr.train_set)} images, "
                                f"{tr.total} steps")
    if run.writer is not None:
        run.writer.start()  # curves first drawn a minute in (short runs: at the end only)
    epoch = run.start_epoch - 1
    for epoch in range(run.start_epoch, tr.epochs + 1):
        tr.begin_epoch(epoch)
        yield from _epoch(run, epoch)
        if run.stop_requested() and run.validated():
            run.stopped = True
        if run.stopped or run.early or run.step >= tr.total:
            break
    result = _finish(run, epoch)
    why = "stopped by the user" if run.stopped else "early stopping" if run.early else "done"
    yield ProgressEvent("end", epoch, run.step, tr.total, best_val_dice=run.best.score,
                        lr=tr.lr(), elapsed=result.elapsed,
                        message=f"{why} after {run.step} steps")
    return result


def _epoch(run: _Run, epoch: int) -> Generator[ProgressEvent, None, None]:
    tr, every = run.trainer, run.cfg.eval_every_steps
    losses: list[float] = []
    for x, y, *extra in tr.loader:
        # a stop request ends training once the steps done are validated: when it arrives
        # between a step's own check and the next batch, one more step runs and is
        # validated, so a stopped run always returns (and saves) validated weights
        if run.step >= tr.total or (run.stop_requested() and run.validated()):
            break
        losses.append(tr.train_step(x, y, extra))
        run.step += 1
        yield ProgressEvent("step", epoch, run.step, tr.total, loss=losses[-1],
                            best_val_dice=run.best.score, lr=tr.lr(), elapsed=run.elapsed())
        at_epoch_end = run.step % tr.steps_per_epoch == 0 or run.step >= tr.total
        due = at_epoch_end if every is None else (run.step % every == 0 or run.step >= tr.total)
        # a stop request validates the steps done since the last validation, so the
        # returned (and saved) weights are never older than the work the user kept
        if not (due or run.stop_requested()):
            continue
        row = _validate(run, epoch, losses, at_epoch_end)
        yield ProgressEvent("eval", epoch, run.step, tr.total, loss=row["train_loss"],
                            val_dice=row["val_dice"], best_val_dice=run.best.score,
                            lr=tr.lr(), elapsed=run.elapsed(), metrics=row,
                            message=_eval_message(run, epoch, row))
        if run.stopping.should_stop:
            run.early = True
            break


def _evaluator() -> Callable:
    """``busseg.engine.evaluate_dataset``, looked up on the package when called.

    Replacing the package's attribute (as tests do to script validations) thus replaces what
    the loop validates with.
    """
    import busseg.engine

    return busseg.engine.evaluate_dataset


def _validate(run: _Run, epoch: int, losses: list[float], at_epoch_end: bool) -> dict:
    """Validate, select, write the run folder; return the new history row."""
    tr, cfg, nan = run.trainer, run.cfg, float("nan")
    row = {"epoch": epoch, "step": run.step, "lr": tr.lr(),
           "train_loss": float(np.mean(losses)) if losses else nan,
           "val_loss": nan, "val_dice": nan, "val_dice_lesion": nan,
           "val_fp_rate_normal": nan, "val_dice_box": nan, "val_auc_normal": nan,
           "val_interactions": nan, "val_never_converged": nan}
    score = None
    if run.has_val():
        ev = _evaluator()(tr.eval_model, run.val_set, tr.device, cfg.batch_size, cfg.threshold,
                          tr.loss_fn, cfg.channels_last, cfg.eval_box_prompts,
                          cfg.eval_interactions)
        row.update(val_loss=ev["loss"], val_dice=ev["mean_dice"],
                   val_dice_lesion=ev["mean_dice_lesion"],
                   val_fp_rate_normal=ev["fp_rate_normal"],
                   val_dice_box=ev.get("mean_dice_box", nan),
                   val_auc_normal=ev.get("auc_normal", nan),
                   val_interactions=ev.get("mean_interactions", nan),
                   val_never_converged=ev.get("never_converged", nan))
        score = selection_score(cfg.select_metric, ev)
        improved = run.best.consider(ev, score, run.step, epoch, tr.eval_model)
        run.stopping.record(improved)
    else:
        run.best.take(run.step, epoch, tr.eval_model)
        improved = True
    row["best_val_dice"] = run.best.score if run.best.score is not None else nan
    row["elapsed_s"] = round(run.elapsed(), 2)
    run.history.append(row)
    if run.writer is not None:
        run.writer.after_eval(tr, epoch=epoch, at_epoch_end=at_epoch_end, history=run.history,
                              score=score, improved=improved, best=run.best,
                              stopping=run.stopping, clock=run.elapsed)
    return row


def _eval_message(run: _Run, epoch: int, row: dict) -> str:
    msg = (f"epoch {epoch} step {run.step}/{run.trainer.total} loss {row['train_loss']:.4f} "
           f"val Dice {row['val_dice']:.4f}, lesion {row['val_dice_lesion']:.4f} "
           f"(best {run.cfg.select_metric} {row['best_val_dice']:.4f})")
    if np.isfinite(row["val_dice_box"]):
        msg += f", box {row['val_dice_box']:.4f}"
    if np.isfinite(row["val_interactions"]):
        msg += (f", box then clicks {row['val_interactions']:.2f} per lesion "
                f"({int(row['val_never_converged'])} never reach IoU 0.85)")
    if np.isfinite(row["val_auc_normal"]):
        msg += f", AUC lesion/normal {row['val_auc_normal']:.3f}"
    if np.isfinite(row["val_fp_rate_normal"]):
        msg += f", FP normal {row['val_fp_rate_normal']:.2f}"
    return msg


def _finish(run: _Run, epoch: int) -> FitResult:
    """Load the best weights into the model, finish the run folder, build the result."""
    tr, best = run.trainer, run.best
    if not run.has_val() and run.step > best.step:
        # stopped between validations without a validation set: the last weights are the result
        best.take(run.step, epoch, tr.eval_model)
        if run.writer is not None:
            run.writer.save_best(tr, best, run.elapsed(), run.history)
    checkpoint = run.writer.finish(run.history) if run.writer is not None else None
    tr.model.load_state_dict(best.state)
    tr.model.eval()
    tr.frozen.release()
    if run.writer is not None:
        run.writer.discard_if_empty()  # stopped before the first step: no empty run folder
    return FitResult(model=tr.model, best_val_dice=best.score, best_step=best.step,
                     best_epoch=best.epoch, history=run.history, steps=run.step,
                     elapsed=run.elapsed(), stopped=run.stopped, early_stopped=run.early,
                     checkpoint=checkpoint)


def fit(
    model: torch.nn.Module,
    train_set: Dataset,
    val_set: Dataset | None,
    cfg: TrainConfig | None = None,
    *,
    callback: Callable[[ProgressEvent], None] | None = None,
    **kwargs: Any,
) -> FitResult:
    """Run :func:`fit_iter` to the end, passing each event to ``callback``.

    Parameters
    ----------
    model, train_set, val_set, cfg
        As in :func:`fit_iter`.
    callback : callable, optional
        Called with every :class:`~busseg.engine.ProgressEvent`.
    **kwargs
        ``device``, ``stop``, ``out_dir``, ``checkpoint_config``, ``resume``.

    Returns
    -------
    FitResult
    """
    return drain(fit_iter(model, train_set, val_set, cfg, **kwargs), callback)


def drain(gen: Generator[Any, None, Any], callback: Callable[[Any], None] | None = None) -> Any:
    """Run a progress generator to the end and return its return value.

    Parameters
    ----------
    gen : generator
        Yields progress events and returns a result (``StopIteration.value``).
    callback : callable, optional
        Called with each yielded event.

    Returns
    -------
    object
        The generator's return value.
    """
    while True:
        try:
            ev = next(gen)
        except StopIteration as stop:
            return stop.value
        if callback is not None:
            callback(ev)


def iter_batches(items: Iterable, n: int):
    """Yield lists of at most ``n`` consecutive items.

    Parameters
    ----------
    items : iterable
        Anything iterable.
    n : int
        Batch size, at least 1.

    Yields
    ------
    list
        The next ``n`` items (fewer at the end).
    """
    batch = []
    for it in items:
        batch.append(it)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch
