"""The one training loop, used by ``training/train.py`` and by the napari fine-tune widget.

``fit_iter`` is a generator: it yields :class:`ProgressEvent` objects while it trains and
returns a :class:`FitResult` (``StopIteration.value``). The napari widget wraps it in a
``thread_worker``; ``fit`` drains it synchronously for scripts and tests. Nothing here imports
Qt; stopping is a plain ``threading.Event`` (anything with ``is_set()``) checked every step.

Optimiser Adam (Kingma & Ba, ICLR 2015) with decoupled weight decay (AdamW; Loshchilov &
Hutter, ICLR 2019), linear warm-up then cosine decay of the learning rate (Loshchilov & Hutter,
SGDR, ICLR 2017), early stopping on validation Dice, best-checkpoint saving and resume.
"""

from __future__ import annotations

import csv
import json
import math
import os
import time
from collections.abc import Callable, Generator, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from busseg.devices import get_device
from busseg.losses import build_loss

LOG_COLUMNS = (
    "epoch", "step", "lr", "train_loss", "val_loss", "val_dice", "val_dice_lesion",
    "val_fp_rate_normal", "val_dice_box", "val_auc_normal", "val_interactions",
    "val_never_converged", "best_val_dice", "elapsed_s",
)
#: Least seconds between two redraws of a run's ``curves.png`` (it is always drawn at the end).
CURVES_EVERY_S = 60.0
#: Validation metrics :class:`TrainConfig` can select the best checkpoint on.
SELECT_METRICS: tuple[str, ...] = ("dice", "dice_lesion", "lesion_and_normal", "interactions")


@dataclass
class TrainConfig:
    """Hyper-parameters of :func:`fit_iter`.

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
        the network input size (:func:`box_click_interactions`): ``val_interactions`` (mean
        interactions to IoU 0.85, boxes included, capped at 20) and ``val_never_converged``.
        For models with guidance channels; up to 20 more forward passes per lesion image.
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
        to the loss, ``w0`` being the trainable weights :func:`fit_iter` was given (the base
        checkpoint of a fine-tune), so the weights are pulled towards the starting point
        instead of towards zero (pair it with ``weight_decay=0``). 0 (default) disables it.
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
    """One progress report of :func:`fit_iter`.

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
    """What :func:`fit_iter` returns.

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


def selection_score(metric: str, ev: dict) -> float:
    """Return the value of a :data:`SELECT_METRICS` metric for one validation.

    Parameters
    ----------
    metric : str
        ``"dice"``, ``"dice_lesion"``, ``"lesion_and_normal"`` or ``"interactions"`` (see
        :class:`TrainConfig`).
    ev : dict
        The output of :func:`evaluate_dataset` (``mean_dice``, ``mean_dice_lesion``,
        ``fp_rate_normal``, ``mean_interactions``).

    Returns
    -------
    float
        Higher is better: in [0, 1] for the Dice metrics, minus the mean interactions per
        lesion image (in [-20, 0]) for ``"interactions"`` (falls back to ``"dice_lesion"``
        when the validation set has no lesion image).
    """
    lesion, fp = ev["mean_dice_lesion"], ev["fp_rate_normal"]
    if metric == "interactions" and np.isfinite(ev.get("mean_interactions", float("nan"))):
        return -float(ev["mean_interactions"])
    if metric == "lesion_and_normal" and np.isfinite(lesion):
        return float((lesion + 1.0 - fp) / 2.0) if np.isfinite(fp) else float(lesion)
    if metric in ("dice_lesion", "lesion_and_normal") and np.isfinite(lesion):
        return float(lesion)
    return float(ev["mean_dice"])


def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)


def _dist_info() -> tuple[bool, int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return True, torch.distributed.get_rank(), torch.distributed.get_world_size()
    return False, 0, 1


@torch.no_grad()
def evaluate_dataset(
    model: torch.nn.Module,
    dataset: Dataset,
    device: torch.device | str = "cpu",
    batch_size: int = 8,
    threshold: float = 0.5,
    loss_fn: Callable | None = None,
    channels_last: bool = False,
    box_prompts: bool = True,
    interactions: bool = False,
) -> dict[str, Any]:
    """Per-image Dice of a model on a dataset at the network input size.

    Parameters
    ----------
    model : torch.nn.Module
        Returns logits (N, 1, h, w) for images (N, 1, h, w).
    dataset : Dataset
        Yields (image (1, h, w) float32, mask (1, h, w) float32 in {0, 1}); if it has
        ``labels``, per-class figures are added.
    device : torch.device or str
        Where to run.
    batch_size : int
        Images per forward pass.
    threshold : float
        Probability threshold in (0, 1).
    loss_fn : callable, optional
        If given, the mean loss is reported too.
    channels_last : bool
        Run in channels-last memory format.
    box_prompts : bool
        For a model with guidance channels, also score tight-box prompts (one more forward
        pass over the lesion images).
    interactions : bool
        For a model with guidance channels, also simulate box then clicks on the lesion
        images (:func:`box_click_interactions`): ``mean_interactions``, ``never_converged``.

    Returns
    -------
    dict
        ``dice`` (N,) float64 per image (1.0 when prediction and truth are both empty),
        ``mean_dice``, ``mean_dice_lesion`` (images with a lesion), ``fp_rate_normal`` (share
        of lesion-free images with any predicted pixel; NaN without such images) and ``loss``.
        Models with guidance channels (``in_channels`` > 1) are scored in automatic mode
        (zero guidance), and also with tight boxes from the truth on the lesion images:
        ``mean_dice_box`` (NaN for other models). Models with a class head add
        ``auc_normal``: the ROC AUC of 1 - P(normal) for lesion vs lesion-free images (NaN
        without both kinds or without a head).
    """
    from busseg.metrics import roc_auc

    was_training = model.training
    model.eval()
    device = torch.device(device)
    guided = int(getattr(model, "in_channels", 1)) > 1
    box_prompts = box_prompts and guided
    with_class = bool(getattr(model, "num_classes", 0))
    dices, losses, nonempty_truth, any_pred, box_dices, p_lesion = [], [], [], [], [], []
    lesion_images: list[torch.Tensor] = []
    lesion_masks: list[torch.Tensor] = []
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)

    def dice_of(logits, y):
        pred = torch.sigmoid(logits) >= threshold
        truth = y >= 0.5
        inter = (pred & truth).flatten(1).sum(1).double()
        total = pred.flatten(1).sum(1).double() + truth.flatten(1).sum(1).double()
        dice = torch.where(total > 0, 2 * inter / total.clamp_min(1), torch.ones_like(total))
        return dice.cpu(), pred

    for x, y, *_ in loader:
        x, y = x.to(device), y.to(device)
        img = x
        if guided:
            x = with_guidance(img, None, model)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if with_class:
            logits, cls = model(x, with_class=True)
            p_lesion.append(1.0 - torch.softmax(cls.float(), 1)[:, 0].cpu())
        else:
            logits = model(x)
        logits = logits.float()
        if loss_fn is not None:
            losses.append(float(loss_fn(logits, y)) * x.shape[0])
        dice, pred = dice_of(logits, y)
        dices.append(dice)
        truth = y >= 0.5
        nonempty_truth.append(truth.flatten(1).any(1).cpu())
        any_pred.append(pred.flatten(1).any(1).cpu())
        if box_prompts:
            keep = truth.flatten(1).any(1)
            if keep.any():
                xb = with_guidance(img[keep], _tight_box_guidance(y[keep]), model)
                if channels_last:
                    xb = xb.contiguous(memory_format=torch.channels_last)
                box_dices.append(dice_of(model(xb).float(), y[keep])[0])
        if interactions and guided:
            keep = truth.flatten(1).any(1)
            lesion_images.append(img[keep].cpu())
            lesion_masks.append(y[keep].cpu())
    inter = {"mean_interactions": float("nan"), "never_converged": float("nan")}
    if lesion_images and sum(len(t) for t in lesion_images):
        counts, converged = box_click_interactions(
            model, torch.cat(lesion_images), torch.cat(lesion_masks), device=device,
            threshold=threshold, batch_size=batch_size, channels_last=channels_last)
        inter = {"mean_interactions": float(np.mean(counts)),
                 "never_converged": int(np.sum(~converged))}
    if was_training:
        model.train()
    dice = torch.cat(dices).numpy()
    has_lesion = torch.cat(nonempty_truth).numpy()
    predicted = torch.cat(any_pred).numpy()
    n = len(dice)
    auc = float("nan")
    if p_lesion and has_lesion.any() and (~has_lesion).any():
        auc = roc_auc(has_lesion, torch.cat(p_lesion).numpy())
    return {
        "dice": dice,
        "mean_dice": float(dice.mean()) if n else float("nan"),
        "mean_dice_lesion": float(dice[has_lesion].mean()) if has_lesion.any() else float("nan"),
        "fp_rate_normal": (
            float(predicted[~has_lesion].mean()) if (~has_lesion).any() else float("nan")
        ),
        "mean_dice_box": float(torch.cat(box_dices).mean()) if box_dices else float("nan"),
        "auc_normal": auc,
        "loss": float(sum(losses) / n) if losses and n else float("nan"),
        **inter,
    }


@torch.no_grad()
def box_click_interactions(
    model: torch.nn.Module,
    images: torch.Tensor,
    masks: torch.Tensor,
    *,
    device: torch.device | str = "cpu",
    threshold: float = 0.5,
    accept_iou: float = 0.85,
    max_interactions: int = 20,
    jitter: float = 0.1,
    box_margin: float = 0.1,
    seed: int = 0,
    batch_size: int = 8,
    channels_last: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Simulate box-then-clicks interactions per image, at the network input size.

    The prompted part of the annotator of :mod:`busseg.annotator`, batched for validation:
    one box per lesion (8-connected component of the mask, each side moved by up to
    ``jitter`` of its side, drawn from ``numpy.random.default_rng([seed, i])`` so every
    validation sees the same boxes), then clicks from :func:`busseg.annotator.next_click` on
    the errors inside the boxes grown by ``box_margin``, each given with the boxes, every
    click so far and the current mask as the previous mask (RITM's iterative protocol,
    Sofiiuk et al., ICIP 2022), until IoU >= ``accept_iou``. The mask is restricted to the
    grown boxes, as :func:`busseg.inference.predict` does.

    Parameters
    ----------
    model : torch.nn.Module
        A model with guidance channels (``in_channels`` 5), in eval mode.
    images : torch.Tensor
        (N, 1, h, w) float, preprocessed images.
    masks : torch.Tensor
        (N, 1, h, w) float in {0, 1}, each with at least one lesion pixel.
    device : torch.device or str
        Where to run.
    threshold : float
        Probability threshold in (0, 1).
    accept_iou : float
        IoU at which an image is done.
    max_interactions : int
        Cap (boxes and clicks together); an image that does not reach ``accept_iou`` counts
        this many.
    jitter, box_margin : float
        As :func:`busseg.annotator.annotate_scan`.
    seed : int
        Seed of the box jitter.
    batch_size : int
        Images per forward pass.
    channels_last : bool
        Run in channels-last memory format.

    Returns
    -------
    counts : numpy.ndarray
        (N,) int, interactions per image.
    converged : numpy.ndarray
        (N,) bool, False where ``max_interactions`` did not reach ``accept_iou``.

    Raises
    ------
    ValueError
        If the model has no guidance channels or a mask is empty.
    """
    from busseg.annotator import next_click
    from busseg.prompts import Prompts, box_mask, jitter_box, mask_to_boxes, render_guidance

    if int(getattr(model, "in_channels", 1)) <= 1:
        raise ValueError("box_click_interactions needs a model with guidance channels")
    truth = masks[:, 0].cpu().numpy() >= 0.5
    if not truth.reshape(len(truth), -1).any(1).all():
        raise ValueError("box_click_interactions needs a lesion in every mask")
    n, shape = len(truth), truth.shape[1:]
    device = torch.device(device)
    states = []
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        boxes = np.stack([jitter_box(b, shape, rng, jitter) for b in mask_to_boxes(truth[i])])
        states.append({"boxes": boxes, "region": box_mask(boxes, shape, box_margin),
                       "points": [], "labels": [], "prev": None, "count": len(boxes),
                       "done": False, "iou": 0.0})

    def run(idx: list[int]) -> None:
        for s0 in range(0, len(idx), batch_size):
            part = idx[s0:s0 + batch_size]
            guide = torch.stack([render_guidance(
                Prompts(states[i]["boxes"], np.asarray(states[i]["points"], np.float64)
                        .reshape(-1, 2), np.asarray(states[i]["labels"], np.int8),
                        states[i]["prev"]), shape, shape) for i in part])
            x = with_guidance(images[part].to(device), guide.to(device), model)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            pred = (torch.sigmoid(model(x).float()) >= threshold)[:, 0].cpu().numpy()
            for j, i in enumerate(part):
                st = states[i]
                st["prev"] = pred[j] & st["region"]
                union = np.count_nonzero(st["prev"] | truth[i])
                st["iou"] = np.count_nonzero(st["prev"] & truth[i]) / union if union else 1.0
                st["done"] = st["iou"] >= accept_iou

    run(list(range(n)))
    while True:
        active = []
        for i, st in enumerate(states):
            if st["done"] or st["count"] >= max_interactions:
                continue
            click = next_click(st["prev"], truth[i] & st["region"])
            if click is None:  # nothing left to click inside the boxes
                st["count"] = max_interactions
                continue
            st["points"].append(click[:2])
            st["labels"].append(click[2])
            st["count"] += 1
            active.append(i)
        if not active:
            break
        run(active)
    converged = np.array([st["done"] for st in states])
    counts = np.array([st["count"] if st["done"] else max_interactions for st in states])
    return counts, converged


def with_guidance(images: torch.Tensor, guidance: torch.Tensor | None, model) -> torch.Tensor:
    """Append guidance channels (zeros for automatic mode) to a batch of images.

    Parameters
    ----------
    images : torch.Tensor
        (N, 1, h, w) float.
    guidance : torch.Tensor or None
        (N, C - 1, h, w) float, or None for all-zero guidance.
    model : torch.nn.Module
        The network; ``model.in_channels`` is C.

    Returns
    -------
    torch.Tensor
        (N, C, h, w); ``images`` itself when the model takes one channel.
    """
    c = int(getattr(model, "in_channels", 1))
    if c == 1:
        return images
    if guidance is None:
        guidance = images.new_zeros((images.shape[0], c - 1, *images.shape[-2:]))
    return torch.cat([images, guidance.to(images)], dim=1)


def _tight_box_guidance(masks: torch.Tensor) -> torch.Tensor:
    """(N, 1, h, w) masks -> (N, 4, h, w) guidance with one tight box per lesion."""
    from busseg.prompts import Prompts, mask_to_boxes, render_guidance

    out = []
    for m in masks[:, 0].cpu().numpy() >= 0.5:
        pr = Prompts(mask_to_boxes(m), np.zeros((0, 2)), np.zeros(0, np.int8), None)
        out.append(render_guidance(pr, m.shape, m.shape))
    return torch.stack(out).to(masks.device)


class _WithClass(Dataset):
    """Adds the class index (``busseg.models.CLASS_NAMES``; -1 if unknown) to each pair."""

    def __init__(self, dataset: Dataset) -> None:
        from busseg.models import CLASS_NAMES

        self.dataset = dataset
        labels = getattr(dataset, "labels", None) or ["unknown"] * len(dataset)
        self.targets = torch.tensor(
            [CLASS_NAMES.index(lab) if lab in CLASS_NAMES else -1 for lab in labels])

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i):
        x, y = self.dataset[i][:2]
        return x, y, self.targets[i]

    def class_weights(self, k: int) -> torch.Tensor | None:
        """Inverse-frequency weights (K,), normalised to mean 1 over present classes."""
        t = self.targets[self.targets >= 0]
        if not len(t):
            return None
        counts = torch.bincount(t, minlength=k).double()
        w = torch.where(counts > 0, counts.sum() / counts.clamp_min(1), torch.zeros_like(counts))
        return (w / w[counts > 0].mean()).float()


def _lr_lambda(cfg: TrainConfig, total_steps: int) -> Callable[[int], float]:
    warm = max(0, min(cfg.warmup_steps, total_steps // 5))

    def f(step: int) -> float:
        if warm and step < warm:
            return (step + 1) / warm
        t = (step - warm) / max(1, total_steps - warm)
        cosine = 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cosine

    return f


def _write_curves(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    if not rows:
        return
    ep = [r["epoch"] for r in rows]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.4))
    a1.plot(ep, [r["train_loss"] for r in rows], label="train")
    if any(np.isfinite(r["val_loss"]) for r in rows):
        a1.plot(ep, [r["val_loss"] for r in rows], label="validation")
    a1.set_xlabel("epoch")
    a1.set_ylabel("loss")
    a1.legend()
    a2.plot(ep, [r["val_dice"] for r in rows], label="all validation images")
    a2.plot(ep, [r["val_dice_lesion"] for r in rows], label="images with a lesion")
    a2.set_xlabel("epoch")
    a2.set_ylabel("mean Dice")
    a2.set_ylim(0, 1)
    a2.legend()
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


def _save_training_state(path: Path, model, optimizer, scheduler, state: dict,
                         ema=None) -> None:
    """Write resumable state: weights + optimiser tensors in safetensors, scalars in JSON."""
    from safetensors.torch import save_file

    from busseg.data.io import atomic_write_bytes

    tensors: dict[str, torch.Tensor] = {}
    for k, v in model.state_dict().items():
        tensors[f"model.{k}"] = v.detach().cpu().contiguous()
    opt = optimizer.state_dict()
    scalars: dict[str, Any] = {"param_groups": opt["param_groups"], "opt_scalars": {}}
    for pid, st in opt["state"].items():
        for name, val in st.items():
            if torch.is_tensor(val) and val.ndim > 0:
                tensors[f"opt.{pid}.{name}"] = val.detach().cpu().contiguous()
            else:
                scalars["opt_scalars"][f"{pid}.{name}"] = float(val)
    if ema is not None:
        for k, v in ema.state_dict().items():
            tensors[f"ema.{k}"] = v.detach().cpu().contiguous()
    scalars["scheduler"] = scheduler.state_dict()
    scalars["scheduler"].pop("lr_lambdas", None)
    scalars.update(state)
    path.mkdir(parents=True, exist_ok=True)
    tmp = path / ".training_state.safetensors.tmp"
    save_file(tensors, str(tmp))
    os.replace(tmp, path / "training_state.safetensors")
    atomic_write_bytes(path / "training_state.json", json.dumps(scalars, default=float).encode(),
                       overwrite=True)


def _load_training_state(path: Path, model, optimizer, scheduler, ema=None) -> dict:
    from safetensors.torch import load_file

    st_path, js_path = path / "training_state.safetensors", path / "training_state.json"
    if not st_path.is_file() or not js_path.is_file():
        raise FileNotFoundError(
            f"no resumable state in {path}: expected training_state.safetensors and "
            "training_state.json, written by an earlier run with the same out_dir"
        )
    tensors = load_file(str(st_path))
    scalars = json.loads(js_path.read_text())
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    if ema is not None:
        ema_state = {k[4:]: v for k, v in tensors.items() if k.startswith("ema.")}
        if not ema_state:
            raise ValueError(f"{path} holds no weight average: the run was trained without "
                             "ema_decay; resume it with the same settings")
        ema.load_state_dict(ema_state)
    opt_state: dict[int, dict] = {}
    for k, v in tensors.items():
        if k.startswith("opt."):
            _, pid, name = k.split(".", 2)
            opt_state.setdefault(int(pid), {})[name] = v
    for k, v in scalars["opt_scalars"].items():
        pid, name = k.split(".", 1)
        opt_state.setdefault(int(pid), {})[name] = torch.tensor(v)
    optimizer.load_state_dict({"state": opt_state, "param_groups": scalars["param_groups"]})
    sched = dict(scalars["scheduler"])
    # the lambdas are code, not state: they are rebuilt from the TrainConfig, so none is saved
    sched.setdefault("lr_lambdas", [None] * len(optimizer.param_groups))
    scheduler.load_state_dict(sched)
    return scalars


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
        If the training set is empty.
    """
    from torch.utils.data import DistributedSampler, WeightedRandomSampler

    cfg = cfg or TrainConfig()
    if len(train_set) == 0:
        raise ValueError("the training set is empty")
    distributed, rank, world = _dist_info()
    is_main = rank == 0
    dev = get_device(device) if not isinstance(device, torch.device) else device
    _seed_everything(cfg.seed)
    out = Path(out_dir) if out_dir is not None else None
    created_out = out is not None and is_main and not out.exists()
    if out is not None and is_main:
        if out.exists() and not resume and any(out.iterdir()):
            raise FileExistsError(
                f"{out} already holds a run; choose a new --out folder or pass resume=True "
                "(--resume) to continue it"
            )
        out.mkdir(parents=True, exist_ok=True)

    model.to(dev)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    frozen = list(model.encoder_modules()) if (
        cfg.freeze_encoder and hasattr(model, "encoder_modules")) else []
    frozen_params = [p for m in frozen for p in m.parameters() if p.requires_grad]
    for p in frozen_params:
        p.requires_grad_(False)
    train_model: torch.nn.Module = model
    if distributed:
        train_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[dev.index] if dev.type == "cuda" else None
        )
    loss_fn = build_loss(cfg.loss)
    num_classes = int(getattr(model, "num_classes", 0))
    class_weights = None
    if num_classes:
        train_set = _WithClass(train_set)
        class_weights = train_set.class_weights(num_classes)
        if class_weights is not None:
            class_weights = class_weights.to(dev)
    simulator = None
    if int(getattr(model, "in_channels", 1)) > 1:
        from busseg.prompts import PromptSimulator

        simulator = PromptSimulator(**(cfg.prompts or {}))
    prompt_rng = np.random.default_rng(cfg.seed + 7919 * rank)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    # L2-SP: the starting weights (those given, before any resume) the penalty pulls towards
    l2sp_anchor = ([(p, p.detach().clone()) for p in model.parameters() if p.requires_grad]
                   if cfg.l2sp_alpha > 0 else [])
    ema = None
    if cfg.ema_decay is not None:
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

        ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema_decay),
                            use_buffers=True)
    # the weights that are validated, selected and saved
    eval_model = ema.module if ema is not None else model

    g = torch.Generator().manual_seed(cfg.seed)
    if distributed:
        sampler = DistributedSampler(train_set, num_replicas=world, rank=rank, shuffle=True,
                                     seed=cfg.seed, drop_last=True)
    elif cfg.oversample and hasattr(train_set, "sample_weights"):
        sampler = WeightedRandomSampler(train_set.sample_weights(), len(train_set),
                                        replacement=True, generator=g)
    else:
        sampler = None
    loader = DataLoader(
        train_set, batch_size=cfg.batch_size, shuffle=sampler is None, sampler=sampler,
        generator=g if sampler is None else None,
        drop_last=len(train_set) // world > cfg.batch_size,
        num_workers=cfg.num_workers, persistent_workers=cfg.num_workers > 0,
    )
    steps_per_epoch = max(1, len(loader))
    total = cfg.epochs * steps_per_epoch
    if cfg.max_steps is not None:
        total = cfg.max_steps
    epochs = math.ceil(total / steps_per_epoch)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(cfg, total))
    use_amp = cfg.amp == "on" or (cfg.amp == "auto" and dev.type == "cuda")
    amp_dtype = torch.bfloat16

    step, start_epoch, best, best_step, best_epoch, bad = 0, 1, None, 0, 0, 0
    history: list[dict] = []
    best_state = _snapshot(eval_model)
    t0 = time.perf_counter()
    elapsed_before = 0.0
    if resume:
        if out is None:
            raise ValueError("resume needs out_dir, the folder of the run to continue")
        st = _load_training_state(out / "last", model, optimizer, scheduler, ema)
        step, start_epoch = int(st["step"]), int(st["epoch"]) + 1
        best, best_step, best_epoch, bad = st["best"], st["best_step"], st["best_epoch"], st["bad"]
        elapsed_before = float(st.get("elapsed", 0.0))
        history = st.get("history", [])
        if (out / "best").is_dir():
            from busseg.models import load_checkpoint

            best_model, _ = load_checkpoint(out / "best")
            best_state = best_model.state_dict()

    def elapsed() -> float:
        return elapsed_before + time.perf_counter() - t0

    def lr_now() -> float:
        return float(optimizer.param_groups[0]["lr"])

    yield ProgressEvent("start", start_epoch, step, total, lr=lr_now(),
                        message=f"training on {dev.type}: {len(train_set)} images, {total} steps")
    stopped = early = False
    curves_at = time.perf_counter()  # first drawn a minute in (short runs: at the end only)
    eval_every = cfg.eval_every_steps
    epoch = start_epoch - 1
    ckpt_path = None
    for epoch in range(start_epoch, epochs + 1):
        if distributed:
            sampler.set_epoch(epoch)
        train_model.train()
        losses: list[float] = []
        for x, y, *extra in loader:
            # a stop request ends training once the steps done are validated: when it arrives
            # between a step's own check and the next batch, one more step runs and is
            # validated, so a stopped run always returns (and saves) validated weights
            validated = step == 0 or (history and history[-1]["step"] == step)
            if step >= total or (stop is not None and stop.is_set() and validated):
                break
            x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
            prompted = torch.zeros(x.shape[0], dtype=torch.bool, device=dev)
            if simulator is not None:
                guidance, prompted = simulator(model, x, y, prompt_rng)
                x, prompted = with_guidance(x, guidance, model), prompted.to(dev)
            if cfg.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            for m in frozen:  # (the prompt simulator toggles train/eval on the whole model)
                m.eval()
            with torch.autocast(dev.type, dtype=amp_dtype, enabled=use_amp):
                if num_classes:
                    logits, class_logits = train_model(x, with_class=True)
                else:
                    logits = train_model(x)
            loss = loss_fn(logits.float(), y)
            if num_classes and class_weights is not None and cfg.class_loss_weight > 0:
                target = extra[0].to(dev)
                target = torch.where(prompted, torch.full_like(target, -1), target)
                if (target >= 0).any():
                    loss = loss + cfg.class_loss_weight * torch.nn.functional.cross_entropy(
                        class_logits.float(), target, weight=class_weights, ignore_index=-1)
            if l2sp_anchor:
                loss = loss + 0.5 * cfg.l2sp_alpha * sum(
                    (p - p0).pow(2).sum() for p, p0 in l2sp_anchor)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            scheduler.step()
            if ema is not None:
                ema.update_parameters(model)
            step += 1
            losses.append(loss.item())
            yield ProgressEvent("step", epoch, step, total, loss=losses[-1], best_val_dice=best,
                                lr=lr_now(), elapsed=elapsed())
            at_epoch_end = step % steps_per_epoch == 0 or step >= total
            due = at_epoch_end if eval_every is None else (step % eval_every == 0 or step >= total)
            # a stop request validates the steps done since the last validation, so the
            # returned (and saved) weights are never older than the work the user kept
            if not (due or (stop is not None and stop.is_set())):
                continue
            # ---- validation ----
            row = {"epoch": epoch, "step": step, "lr": lr_now(),
                   "train_loss": float(np.mean(losses)) if losses else float("nan"),
                   "val_loss": float("nan"), "val_dice": float("nan"),
                   "val_dice_lesion": float("nan"), "val_fp_rate_normal": float("nan"),
                   "val_dice_box": float("nan"), "val_auc_normal": float("nan"),
                   "val_interactions": float("nan"), "val_never_converged": float("nan")}
            improved = False
            if val_set is not None and len(val_set):
                ev = evaluate_dataset(eval_model, val_set, dev, cfg.batch_size, cfg.threshold,
                                      loss_fn, cfg.channels_last, cfg.eval_box_prompts,
                                      cfg.eval_interactions)
                row.update(val_loss=ev["loss"], val_dice=ev["mean_dice"],
                           val_dice_lesion=ev["mean_dice_lesion"],
                           val_fp_rate_normal=ev["fp_rate_normal"],
                           val_dice_box=ev.get("mean_dice_box", float("nan")),
                           val_auc_normal=ev.get("auc_normal", float("nan")),
                           val_interactions=ev.get("mean_interactions", float("nan")),
                           val_never_converged=ev.get("never_converged", float("nan")))
                score = selection_score(cfg.select_metric, ev)
                guard = cfg.select_min_dice_lesion
                eligible = (guard is None or not np.isfinite(ev["mean_dice_lesion"])
                            or ev["mean_dice_lesion"] >= guard)
                if eligible and (best is None or score > best + 1e-4):
                    best, best_step, best_epoch = score, step, epoch
                    bad, improved = 0, True
                    best_state = _snapshot(eval_model)
                else:
                    bad += 1
            else:
                best_step, best_epoch = step, epoch
                best_state = _snapshot(eval_model)
                improved = True
            row["best_val_dice"] = best if best is not None else float("nan")
            row["elapsed_s"] = round(elapsed(), 2)
            history.append(row)
            if out is not None and is_main:
                _append_log(out / "log.csv", row)
                # a plot costs ~1-2 s of CPU: at most once a minute, and at the end
                if time.perf_counter() - curves_at >= CURVES_EVERY_S:
                    _write_curves(history, out / "curves.png")
                    curves_at = time.perf_counter()
                if cfg.save_every_eval and val_set is not None and len(val_set):
                    _save_best(out / "evals" / f"step_{step:06d}", model, _snapshot(eval_model),
                               cfg, checkpoint_config, score, step, epoch, elapsed(), history)
                if improved:
                    ckpt_path = _save_best(out / "best", model, best_state, cfg, checkpoint_config,
                                           best, best_step, best_epoch, elapsed(), history)
                _save_training_state(out / "last", model, optimizer, scheduler, ema=ema, state={
                    "step": step, "epoch": epoch if at_epoch_end else epoch - 1, "best": best,
                    "best_step": best_step, "best_epoch": best_epoch, "bad": bad,
                    "elapsed": elapsed(), "history": history})
            msg = (f"epoch {epoch} step {step}/{total} loss {row['train_loss']:.4f} "
                   f"val Dice {row['val_dice']:.4f}, lesion {row['val_dice_lesion']:.4f} "
                   f"(best {cfg.select_metric} {row['best_val_dice']:.4f})")
            if np.isfinite(row["val_dice_box"]):
                msg += f", box {row['val_dice_box']:.4f}"
            if np.isfinite(row["val_interactions"]):
                msg += (f", box then clicks {row['val_interactions']:.2f} per lesion "
                        f"({int(row['val_never_converged'])} never reach IoU 0.85)")
            if np.isfinite(row["val_auc_normal"]):
                msg += f", AUC lesion/normal {row['val_auc_normal']:.3f}"
            if np.isfinite(row["val_fp_rate_normal"]):
                msg += f", FP normal {row['val_fp_rate_normal']:.2f}"
            yield ProgressEvent("eval", epoch, step, total, loss=row["train_loss"],
                                val_dice=row["val_dice"], best_val_dice=best, lr=lr_now(),
                                elapsed=elapsed(), metrics=row, message=msg)
            if cfg.early_stopping is not None and bad >= cfg.early_stopping:
                early = True
                break
        validated = step == 0 or (history and history[-1]["step"] == step)
        if stop is not None and stop.is_set() and validated:
            stopped = True
        if stopped or early or step >= total:
            break
    if (val_set is None or not len(val_set)) and step > best_step:
        # stopped between validations without a validation set: the last weights are the result
        best_step, best_epoch = step, epoch
        best_state = _snapshot(eval_model)
        if out is not None and is_main:
            _save_best(out / "best", model, best_state, cfg, checkpoint_config, best, best_step,
                       best_epoch, elapsed(), history)
    if out is not None and is_main and history:
        _write_curves(history, out / "curves.png")
    model.load_state_dict(best_state)
    model.eval()
    for p in frozen_params:
        p.requires_grad_(True)
    if out is not None and is_main and (out / "best").is_dir():
        ckpt_path = out / "best"
    if created_out and not any(out.iterdir()):
        out.rmdir()  # stopped before the first step: leave no empty run folder behind
    result = FitResult(model=model, best_val_dice=best, best_step=best_step, best_epoch=best_epoch,
                       history=history, steps=step, elapsed=elapsed(), stopped=stopped,
                       early_stopped=early, checkpoint=ckpt_path)
    why = "stopped by the user" if stopped else "early stopping" if early else "done"
    yield ProgressEvent("end", epoch, step, total, best_val_dice=best, lr=lr_now(),
                        elapsed=result.elapsed, message=f"{why} after {step} steps")
    return result


def _append_log(path: Path, row: dict) -> None:
    new = not path.exists()
    with open(path, "a", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=LOG_COLUMNS, lineterminator="\n")
        if new:
            w.writeheader()
        w.writerow({k: row.get(k) for k in LOG_COLUMNS})
        fh.flush()
        os.fsync(fh.fileno())


def _snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Detached copies of a model's state dict (weights and buffers)."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _save_best(path, model, best_state, cfg, checkpoint_config, best, best_step, best_epoch,
               elapsed, history) -> Path:
    from busseg.models import build_model, save_checkpoint

    config = dict(checkpoint_config or {})
    model_cfg = getattr(model, "busseg_model_config", None) or config.get("model")
    snapshot = build_model(model_cfg)
    snapshot.load_state_dict({k: v.cpu() for k, v in best_state.items()})
    training = dict(config.get("training", {}))
    training.update(hyperparameters=cfg.to_dict(), best_step=best_step, best_epoch=best_epoch,
                    train_time_s=round(elapsed, 1))
    config["training"] = training
    metrics = dict(config.get("metrics", {}))
    last = next((r for r in reversed(history) if r["step"] == best_step), {})
    metrics.update(val_dice=last.get("val_dice", best), val_dice_lesion=last.get("val_dice_lesion"),
                   val_fp_rate_normal=last.get("val_fp_rate_normal"),
                   val_dice_box=last.get("val_dice_box"),
                   val_auc_normal=last.get("val_auc_normal"),
                   val_interactions=last.get("val_interactions"),
                   selected_on=cfg.select_metric)
    config["metrics"] = metrics
    config["model"] = model_cfg
    return save_checkpoint(path, snapshot, config, overwrite=True)


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
        Called with every :class:`ProgressEvent`.
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
    """Yield lists of at most ``n`` consecutive items."""
    batch = []
    for it in items:
        batch.append(it)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch
