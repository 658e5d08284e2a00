"""Small objects the training loop calls at fixed points (MONAI's ``handlers``).

- before the first step: :func:`seed_everything`, :func:`dist_info`, :func:`distributed_model`
  and :func:`make_sampler` (data-parallel training with ``torch.distributed``);
- around each step: :class:`FrozenEncoder` (``before_forward``), :class:`WeightAverage`
  (``after_step``: the exponential moving average of the weights);
- after each validation: :class:`BestSelection` (keeps the best weights),
  :class:`EarlyStopping` (counts validations without improvement) and :class:`RunWriter`
  (``log.csv``, ``curves.png``, ``best/``, ``evals/``, ``last/``);
- at the end: ``FrozenEncoder.release`` and ``RunWriter.finish``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from busseg.engine.config import TrainConfig
from busseg.engine.curves import CURVES_EVERY_S, write_curves
from busseg.engine.state import append_log, save_training_state, save_weights, snapshot


def seed_everything(seed: int) -> None:
    """Seed torch's and numpy's global generators.

    Parameters
    ----------
    seed : int
        Any integer (numpy gets it modulo 2**32).
    """
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)


def dist_info() -> tuple[bool, int, int]:
    """Return whether ``torch.distributed`` is initialised, this process's rank and the world size.

    Returns
    -------
    tuple of (bool, int, int)
        ``(False, 0, 1)`` outside data-parallel training.
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return True, torch.distributed.get_rank(), torch.distributed.get_world_size()
    return False, 0, 1


def distributed_model(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """Wrap a model in ``DistributedDataParallel`` (gradients averaged over the processes).

    Parameters
    ----------
    model : torch.nn.Module
        The model, already on ``device``, with its frozen parameters already frozen.
    device : torch.device
        This process's device (its CUDA index is the one device id).

    Returns
    -------
    torch.nn.parallel.DistributedDataParallel
    """
    return torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None
    )


def make_sampler(train_set, cfg: TrainConfig, distributed: bool, rank: int, world: int,
                 generator: torch.Generator):
    """Return the sampler of the training loader, or None for a plain shuffle.

    Parameters
    ----------
    train_set : Dataset
        The training pairs; ``sample_weights()``, where it has one, balances the classes.
    cfg : TrainConfig
        ``seed`` and ``oversample`` are read.
    distributed : bool
        Data-parallel training: each process gets its own shard of every epoch.
    rank, world : int
        This process's rank and the number of processes.
    generator : torch.Generator
        The seeded generator of the data order.

    Returns
    -------
    torch.utils.data.Sampler or None
        A ``DistributedSampler`` (shuffled, seeded, dropping the last uneven images), a
        ``WeightedRandomSampler`` (with ``cfg.oversample``) or None.
    """
    from torch.utils.data import DistributedSampler, WeightedRandomSampler

    if distributed:
        return DistributedSampler(train_set, num_replicas=world, rank=rank, shuffle=True,
                                  seed=cfg.seed, drop_last=True)
    if cfg.oversample and hasattr(train_set, "sample_weights"):
        return WeightedRandomSampler(train_set.sample_weights(), len(train_set),
                                     replacement=True, generator=generator)
    return None


class FrozenEncoder:
    """Keeps a model's encoder fixed while the rest trains (``TrainConfig.freeze_encoder``).

    Parameters
    ----------
    model : torch.nn.Module
        A model; only those with ``encoder_modules()`` have an encoder to freeze.
    enabled : bool
        Freeze (True) or do nothing (False).

    Attributes
    ----------
    modules : list of torch.nn.Module
        The encoder's modules, kept in eval mode (batch-norm statistics fixed).
    params : list of torch.nn.Parameter
        The parameters frozen here (``requires_grad`` False until :meth:`release`).
    """

    def __init__(self, model: torch.nn.Module, enabled: bool) -> None:
        self.modules = list(model.encoder_modules()) if (
            enabled and hasattr(model, "encoder_modules")) else []
        self.params = [p for m in self.modules for p in m.parameters() if p.requires_grad]
        for p in self.params:
            p.requires_grad_(False)

    def before_forward(self) -> None:
        """Put the encoder back in eval mode (the prompt simulator toggles the whole model)."""
        for m in self.modules:
            m.eval()

    def release(self) -> None:
        """Make the frozen parameters trainable again (the returned model is whole)."""
        for p in self.params:
            p.requires_grad_(True)


class WeightAverage:
    """The exponential moving average of the weights and buffers (``TrainConfig.ema_decay``).

    ``ema = decay * ema + (1 - decay) * weights`` after each step, the first step copied
    (``torch.optim.swa_utils.AveragedModel``; Polyak & Juditsky 1992).

    Parameters
    ----------
    model : torch.nn.Module
        The trained model.
    decay : float
        In (0, 1).

    Attributes
    ----------
    averaged : torch.optim.swa_utils.AveragedModel
        The average (its ``state_dict`` is what ``last/`` saves under ``ema.``).
    """

    def __init__(self, model: torch.nn.Module, decay: float) -> None:
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

        self.averaged = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay),
                                      use_buffers=True)

    @property
    def module(self) -> torch.nn.Module:
        """The averaged network: what is validated, selected and saved."""
        return self.averaged.module

    def after_step(self, model: torch.nn.Module) -> None:
        """Fold the model's weights after an optimiser step into the average."""
        self.averaged.update_parameters(model)


class BestSelection:
    """The best validation so far and its weights (checkpoint-on-best).

    Parameters
    ----------
    model : torch.nn.Module
        The validated model; its current weights are the best until a validation is taken.
    min_dice_lesion : float or None
        ``TrainConfig.select_min_dice_lesion``: a validation with a lower lesion Dice is never
        taken.

    Attributes
    ----------
    score : float or None
        Best selection score (:func:`busseg.engine.selection_score`); None before one.
    step, epoch : int
        When the best weights were validated.
    state : dict of str to torch.Tensor
        A copy of the best weights.
    """

    def __init__(self, model: torch.nn.Module, min_dice_lesion: float | None = None) -> None:
        self.min_dice_lesion = min_dice_lesion
        self.score: float | None = None
        self.step = self.epoch = 0
        self.state = snapshot(model)

    def consider(self, ev: dict, score: float, step: int, epoch: int,
                 model: torch.nn.Module) -> bool:
        """Take the validation if it beats the best by more than 1e-4 and passes the guard.

        Parameters
        ----------
        ev : dict
            The validation (:func:`busseg.engine.evaluate_dataset`); ``mean_dice_lesion``
            is checked against the guard.
        score : float
            Its selection score.
        step, epoch : int
            When it was made.
        model : torch.nn.Module
            The validated model, copied when taken.

        Returns
        -------
        bool
            True when taken.
        """
        guard, lesion = self.min_dice_lesion, ev["mean_dice_lesion"]
        eligible = guard is None or not np.isfinite(lesion) or lesion >= guard
        if eligible and (self.score is None or score > self.score + 1e-4):
            self.score = score
            self.take(step, epoch, model)
            return True
        return False

    def take(self, step: int, epoch: int, model: torch.nn.Module) -> None:
        """Make the model's current weights the best (no validation set: the last weights)."""
        self.step, self.epoch = step, epoch
        self.state = snapshot(model)


class EarlyStopping:
    """Counts validations without improvement (``TrainConfig.early_stopping``).

    Parameters
    ----------
    patience : int or None
        Stop after this many validations in a row without a new best; None never stops.

    Attributes
    ----------
    bad : int
        Validations since the best (saved in ``last/`` and restored on resume).
    """

    def __init__(self, patience: int | None) -> None:
        self.patience = patience
        self.bad = 0

    def record(self, improved: bool) -> None:
        """Count one validation."""
        self.bad = 0 if improved else self.bad + 1

    @property
    def should_stop(self) -> bool:
        """True when the patience has run out."""
        return self.patience is not None and self.bad >= self.patience


class RunWriter:
    """Writes a run folder after each validation and at the end.

    ``log.csv`` (a row per validation), ``curves.png`` (at most every
    :data:`busseg.engine.CURVES_EVERY_S` seconds, and at the end), ``best/`` (when the
    selection improves), ``evals/step_NNNNNN/`` (with ``TrainConfig.save_every_eval``) and
    ``last/`` (resumable state). Only the main process of a data-parallel run writes.

    Parameters
    ----------
    out : pathlib.Path
        The run folder, already made (:meth:`prepare`).
    cfg : TrainConfig
        The run's settings.
    checkpoint_config : dict or None
        Config sections written into every checkpoint (see :func:`busseg.engine.fit_iter`).
    created : bool
        The run made the folder: it is removed again if nothing was written into it.
    """

    def __init__(self, out: Path, cfg: TrainConfig, checkpoint_config: dict | None,
                 created: bool) -> None:
        self.out, self.cfg, self.checkpoint_config = out, cfg, checkpoint_config
        self.created = created
        self.curves_at = time.perf_counter()

    @staticmethod
    def prepare(out: Path, resume: bool) -> bool:
        """Make the run folder; return whether it was made here.

        Raises
        ------
        FileExistsError
            If ``out`` already holds files and ``resume`` is False (a run is never
            overwritten).
        """
        created = not out.exists()
        if out.exists() and not resume and any(out.iterdir()):
            raise FileExistsError(
                f"{out} already holds a run; choose a new --out folder or pass resume=True "
                "(--resume) to continue it"
            )
        out.mkdir(parents=True, exist_ok=True)
        return created

    def start(self) -> None:
        """Start the curves' clock (the first drawing comes a minute in)."""
        self.curves_at = time.perf_counter()

    def save_best(self, trainer, best: BestSelection, elapsed: float,
                  history: list[dict]) -> Path:
        """Write the best weights to ``best/``; return the checkpoint folder."""
        return save_weights(self.out / "best", trainer.model, best.state, self.cfg,
                            self.checkpoint_config, best.score, best.step, best.epoch, elapsed,
                            history)

    def after_eval(self, trainer, *, epoch: int, at_epoch_end: bool, history: list[dict],
                   score: float | None, improved: bool, best: BestSelection,
                   stopping: EarlyStopping, clock: Callable[[], float]) -> None:
        """Write what a validation changed.

        Parameters
        ----------
        trainer : busseg.engine.trainer.Trainer
            The run's model, validated model, optimiser, schedule and weight average.
        epoch : int
            The epoch of the validation.
        at_epoch_end : bool
            The validation ends its epoch (a resumed run starts the next one).
        history : list of dict
            The validation rows, this one last.
        score : float or None
            Its selection score (None without a validation set).
        improved : bool
            It is the new best.
        best : BestSelection
            The selection after it.
        stopping : EarlyStopping
            The early-stopping count after it.
        clock : callable
            Training seconds so far.
        """
        step = history[-1]["step"]
        append_log(self.out / "log.csv", history[-1])
        # a plot costs ~1-2 s of CPU: at most once a minute, and at the end
        if time.perf_counter() - self.curves_at >= CURVES_EVERY_S:
            write_curves(history, self.out / "curves.png")
            self.curves_at = time.perf_counter()
        if self.cfg.save_every_eval and score is not None:
            save_weights(self.out / "evals" / f"step_{step:06d}", trainer.model,
                         snapshot(trainer.eval_model), self.cfg, self.checkpoint_config, score,
                         step, epoch, clock(), history)
        if improved:
            self.save_best(trainer, best, clock(), history)
        save_training_state(self.out / "last", trainer.model, trainer.optimizer,
                            trainer.scheduler, ema=trainer.averaged, state={
                                "step": step, "epoch": epoch if at_epoch_end else epoch - 1,
                                "best": best.score, "best_step": best.step,
                                "best_epoch": best.epoch, "bad": stopping.bad,
                                "elapsed": clock(), "history": history})

    def finish(self, history: list[dict]) -> Path | None:
        """Draw the final curves; return the best checkpoint folder, or None if none."""
        if history:
            write_curves(history, self.out / "curves.png")
        return self.out / "best" if (self.out / "best").is_dir() else None

    def discard_if_empty(self) -> None:
        """Remove the run folder if this run made it and wrote nothing (stopped at once)."""
        if self.created and not any(self.out.iterdir()):
            self.out.rmdir()

