"""Settings, progress events and results of the training loop.

:class:`TrainConfig` holds every hyper-parameter of :func:`busseg.engine.fit_iter`,
:class:`ProgressEvent` is what the loop yields and :class:`FitResult` what it returns.
:func:`lr_lambda` is the learning-rate schedule the configuration describes: linear warm-up,
then cosine decay (Loshchilov & Hutter, SGDR, ICLR 2017).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

#: Columns of a run's ``log.csv``, one row per validation (also :attr:`FitResult.history`).
LOG_COLUMNS = (
    "epoch", "step", "lr", "train_loss", "val_loss", "val_dice", "val_dice_lesion",
    "val_fp_rate_normal", "val_dice_box", "val_auc_normal", "val_interactions",
    "val_never_converged", "best_val_dice", "elapsed_s",
)
#: Validation metrics :class:`TrainConfig` can select the best checkpoint on.
SELECT_METRICS: tuple[str, ...] = ("dice", "dice_lesion", "lesion_and_normal", "interactions")


@dataclass
class TrainConfig:
    """Hyper-parameters of :func:`busseg.engine.fit_iter`.

    Attributes
    ----------
    epochs : int
        Passes over the training set (ignored when ``max_steps`` is set).
    max_steps : int or None
        Train for exactly this many optimiser steps, however many epochs that takes
        (fine-tuning counts in steps).
    batch_size : int
        Images per step.
    lr : float
        Peak learning rate.
    weight_decay : float
        AdamW decoupled weight decay.
    warmup_steps : int
        Linear warm-up steps before the cosine decay.
    min_lr_ratio : float
        Final learning rate as a share of ``lr``.
    loss : str
        ``"bce_dice"`` (default), ``"dice"`` or ``"focal_dice"``.
    early_stopping : int or None
        Stop after this many validations without a better validation Dice; None to disable.
    eval_every_steps : int or None
        Validate every this many steps; None validates at the end of every epoch.
    oversample : bool
        Draw training images with a ``WeightedRandomSampler`` that balances the classes.
    amp : str
        ``"auto"`` (bfloat16 autocast on CUDA, off elsewhere), ``"on"`` or ``"off"``.
    channels_last : bool
        Use the channels-last memory format (faster convolutions on CPU and recent GPUs).
    grad_clip : float or None
        Clip the gradient norm to this value.
    seed : int
        Seed of torch, numpy and the data order.
    num_workers : int
        DataLoader worker processes (0: load in the training process).
    threshold : float
        Probability threshold for the validation Dice, in (0, 1).
    select_metric : str
        Validation metric that picks the best checkpoint and drives early stopping:
        ``"dice"`` (mean per-image Dice over all validation images, normal images included,
        where an empty prediction on an empty mask counts 1) or ``"dice_lesion"`` (mean Dice
        over the validation images that hold a lesion; falls back to ``"dice"`` when there
        are none) or ``"lesion_and_normal"`` (the mean of lesion Dice and of the share of
        lesion-free validation images predicted empty, ``(dice_lesion + 1 - fp_rate) / 2``:
        misses and false lesions on normal scans weigh alike however many normal scans the
        validation set holds; falls back to ``"dice_lesion"`` without normal images) or
        ``"interactions"`` (fewest simulated box-then-clicks interactions per validation
        lesion image, ``val_interactions``; needs ``eval_interactions``; the score is minus
        that number, so higher is still better).
    select_min_dice_lesion : float or None
        A guard for the selection: a validation whose lesion Dice (automatic mode) is below
        this is never selected, whatever its score (used with ``"interactions"``: a
        checkpoint that clicks well but segments worse on its own is not taken).
    eval_interactions : bool
        Validation also simulates the annotator's box then clicks on every lesion image at
        the network input size (:func:`busseg.engine.box_click_interactions`):
        ``val_interactions`` (mean interactions to IoU 0.85, boxes included, capped at 20)
        and ``val_never_converged``. For models with guidance channels; up to 20 more
        forward passes per lesion image.
    save_every_eval : bool
        Also save the validated weights of every validation as a checkpoint
        ``evals/step_NNNNNN/`` in the run folder (for choosing among them afterwards on
        data the validation does not hold, e.g. a guard at another site).
    class_loss_weight : float
        Weight of the class head's cross-entropy (normal / benign / malignant, weighted by
        inverse class frequency in the training set: class-balanced) added to the
        segmentation loss, for models with a class head. Pairs of unknown class and pairs
        that got prompt guidance do not count.
    eval_box_prompts : bool
        Validation also scores tight-box prompts (``val_dice_box``) for models with guidance
        channels: one more forward pass over the lesion images per validation.
    freeze_encoder : bool
        Train only the decoder and heads: the encoder's weights stay fixed and its
        batch-norm layers stay in eval mode (for models with ``encoder_modules()``, i.e. the
        pretrained EfficientNet-Lite0 U-Net; ignored for others). Fine-tuning on a few
        corrected images uses it: about half the step time, and the ImageNet/BUSI features
        are not overwritten by a handful of images.
    prompts : dict or None
        Settings of :class:`busseg.prompts.PromptSimulator` for models with guidance input
        channels (``in_channels`` > 1); None uses its defaults. Ignored for other models.
    ema_decay : float or None
        With a decay in (0, 1), validate, select and save an exponential moving average of
        the weights (and batch-norm statistics) instead of the raw weights, updated after each
        step: ``ema = decay * ema + (1 - decay) * weights`` (Polyak & Juditsky 1992; the
        weight averaging of Izmailov et al., UAI 2018). About ``1 / (1 - decay)`` steps are
        averaged. None (default) disables it.
    l2sp_alpha : float
        L2-SP (Li, Grandvalet & Davoine, ICML 2018): adds ``l2sp_alpha / 2 * ||w - w0||^2``
        to the loss, ``w0`` being the trainable weights :func:`busseg.engine.fit_iter` was
        given (the base checkpoint of a fine-tune), so the weights are pulled towards the
        starting point instead of towards zero (pair it with ``weight_decay=0``). 0 (default)
        disables it.

    Raises
    ------
    ValueError
        On construction, if a setting is out of range (the message names it).
    """

    epochs: int = 100
    max_steps: int | None = None
    batch_size: int = 8
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup_steps: int = 100
    min_lr_ratio: float = 0.01
    loss: str = "bce_dice"
    early_stopping: int | None = 25
    eval_every_steps: int | None = None
    oversample: bool = False
    amp: str = "auto"
    channels_last: bool = True
    grad_clip: float | None = 1.0
    seed: int = 0
    num_workers: int = 0
    threshold: float = 0.5
    select_metric: str = "dice"
    ema_decay: float | None = None
    l2sp_alpha: float = 0.0
    class_loss_weight: float = 0.5
    freeze_encoder: bool = False
    eval_box_prompts: bool = True
    prompts: dict | None = None
    eval_interactions: bool = False
    select_min_dice_lesion: float | None = None
    save_every_eval: bool = False

    def __post_init__(self) -> None:
        if self.epochs < 1 or (self.max_steps is not None and self.max_steps < 1):
            raise ValueError("epochs and max_steps must be at least 1")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {self.batch_size}")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if self.amp not in ("auto", "on", "off"):
            raise ValueError(f"amp must be 'auto', 'on' or 'off', got {self.amp!r}")
        if self.ema_decay is not None and not 0.0 < self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in (0, 1) or None, got {self.ema_decay}")
        if not self.l2sp_alpha >= 0:
            raise ValueError(f"l2sp_alpha must be >= 0, got {self.l2sp_alpha}")
        if self.class_loss_weight < 0:
            raise ValueError(f"class_loss_weight must be >= 0, got {self.class_loss_weight}")
        if self.select_metric not in SELECT_METRICS:
            raise ValueError(f"select_metric must be one of {SELECT_METRICS}, "
                             f"got {self.select_metric!r}")
        if self.select_metric == "interactions" and not self.eval_interactions:
            raise ValueError("select_metric 'interactions' needs eval_interactions=True")

    def to_dict(self) -> dict:
        """Return the settings as a JSON-serialisable dict."""
        return asdict(self)


@dataclass
class ProgressEvent:
    """One progress report of :func:`busseg.engine.fit_iter`.

    Attributes
    ----------
    kind : str
        ``"start"``, ``"step"`` (after each optimiser step), ``"eval"`` (after a validation)
        or ``"end"``.
    epoch, step, total_steps : int
        1-based epoch, optimiser steps done, planned steps.
    loss : float or None
        Training loss of the last step (``step``) or mean of the epoch so far.
    val_dice : float or None
        Mean per-image validation Dice over all validation images (empty/empty counts 1).
    best_val_dice : float or None
        Best value so far of the selection metric (``TrainConfig.select_metric``).
    lr : float
        Current learning rate.
    elapsed : float
        Seconds since the start.
    metrics : dict
        The log row of an ``eval`` event (see ``LOG_COLUMNS``).
    message : str
        Human-readable summary.
    """

    kind: str
    epoch: int
    step: int
    total_steps: int
    loss: float | None = None
    val_dice: float | None = None
    best_val_dice: float | None = None
    lr: float = 0.0
    elapsed: float = 0.0
    metrics: dict = field(default_factory=dict)
    message: str = ""


@dataclass
class FitResult:
    """What :func:`busseg.engine.fit_iter` returns.

    Attributes
    ----------
    model : torch.nn.Module
        The trained model with the best validation weights loaded, in eval mode.
    best_val_dice : float or None
        Best value of the selection metric ``TrainConfig.select_metric`` (None without a
        validation set).
    best_step, best_epoch : int
        When the best weights were seen.
    history : list of dict
        One row per validation (``LOG_COLUMNS``).
    steps : int
        Optimiser steps done.
    elapsed : float
        Wall time in seconds.
    stopped : bool
        True when the stop flag ended training early.
    early_stopped : bool
        True when early stopping ended training.
    checkpoint : pathlib.Path or None
        The best checkpoint written under ``out_dir`` (None without ``out_dir``).
    """

    model: torch.nn.Module
    best_val_dice: float | None
    best_step: int
    best_epoch: int
    history: list[dict]
    steps: int
    elapsed: float
    stopped: bool = False
    early_stopped: bool = False
    checkpoint: Path | None = None


def lr_lambda(cfg: TrainConfig, total_steps: int) -> Callable[[int], float]:
    """Return the learning-rate factor of each step, for ``torch.optim.lr_scheduler.LambdaLR``.

    Linear warm-up over ``cfg.warmup_steps`` (at most a fifth of the run), then cosine decay
    from 1 to ``cfg.min_lr_ratio`` at ``total_steps`` (Loshchilov & Hutter, ICLR 2017).

    Parameters
    ----------
    cfg : TrainConfig
        ``warmup_steps`` and ``min_lr_ratio`` are read.
    total_steps : int
        Planned optimiser steps of the run.

    Returns
    -------
    callable
        ``f(step) -> float``, the factor of the peak learning rate ``cfg.lr`` at 0-based
        ``step``, in (0, 1].
    """
    warm = max(0, min(cfg.warmup_steps, total_steps // 5))

    def f(step: int) -> float:
        if warm and step < warm:
            return (step + 1) / warm
        t = (step - warm) / max(1, total_steps - warm)
        cosine = 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cosine

    return f
