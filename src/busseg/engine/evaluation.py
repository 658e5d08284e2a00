"""Validation: per-image Dice at the network input size, box prompts, simulated clicks.

:func:`evaluate_dataset` scores a model on a dataset (automatic mode, tight-box prompts for
models with guidance channels, lesion-vs-normal AUC for models with a class head),
:func:`box_click_interactions` counts the box-then-clicks interactions a simulated annotator
needs, and :func:`selection_score` turns a validation into the number the best checkpoint is
selected on.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from busseg.engine.guidance import tight_box_guidance, with_guidance


def selection_score(metric: str, ev: dict) -> float:
    """Return the value of a :data:`busseg.engine.SELECT_METRICS` metric for one validation.

    Parameters
    ----------
    metric : str
        ``"dice"``, ``"dice_lesion"``, ``"lesion_and_normal"`` or ``"interactions"`` (see
        :class:`busseg.engine.TrainConfig`).
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


@dataclass
class _Scores:
    """Per-batch figures of :func:`evaluate_dataset`, concatenated at the end."""

    dices: list = field(default_factory=list)
    losses: list = field(default_factory=list)
    nonempty_truth: list = field(default_factory=list)
    any_pred: list = field(default_factory=list)
    box_dices: list = field(default_factory=list)
    p_lesion: list = field(default_factory=list)
    lesion_images: list = field(default_factory=list)
    lesion_masks: list = field(default_factory=list)


def _dice_of(logits: torch.Tensor, y: torch.Tensor, threshold: float):
    """Per-image Dice (N,) float64 on the CPU (1 where both are empty) and the predicted mask."""
    pred = torch.sigmoid(logits) >= threshold
    truth = y >= 0.5
    inter = (pred & truth).flatten(1).sum(1).double()
    total = pred.flatten(1).sum(1).double() + truth.flatten(1).sum(1).double()
    dice = torch.where(total > 0, 2 * inter / total.clamp_min(1), torch.ones_like(total))
    return dice.cpu(), pred


def _score_batch(model, img, y, acc: _Scores, threshold, loss_fn, channels_last, box_prompts,
                 interactions) -> None:
    """Score one batch (images ``img`` and masks ``y`` on the device) into ``acc``."""
    guided = int(getattr(model, "in_channels", 1)) > 1
    x = with_guidance(img, None, model) if guided else img
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    if getattr(model, "num_classes", 0):
        logits, cls = model(x, with_class=True)
        acc.p_lesion.append(1.0 - torch.softmax(cls.float(), 1)[:, 0].cpu())
    else:
        logits = model(x)
    logits = logits.float()
    if loss_fn is not None:
        acc.losses.append(float(loss_fn(logits, y)) * x.shape[0])
    dice, pred = _dice_of(logits, y, threshold)
    acc.dices.append(dice)
    truth = y >= 0.5
    acc.nonempty_truth.append(truth.flatten(1).any(1).cpu())
    acc.any_pred.append(pred.flatten(1).any(1).cpu())
    if box_prompts:
        keep = truth.flatten(1).any(1)
        if keep.any():
            xb = with_guidance(img[keep], tight_box_guidance(y[keep]), model)
            if channels_last:
                xb = xb.contiguous(memory_format=torch.channels_last)
            acc.box_dices.append(_dice_of(model(xb).float(), y[keep], threshold)[0])
    if interactions:
        keep = truth.flatten(1).any(1)
        acc.lesion_images.append(img[keep].cpu())
        acc.lesion_masks.append(y[keep].cpu())


def _summary(acc: _Scores, inter: dict) -> dict[str, Any]:
    """Return the figures of :func:`evaluate_dataset` from its per-batch scores."""
    from busseg.metrics import roc_auc

    dice = torch.cat(acc.dices).numpy()
    has_lesion = torch.cat(acc.nonempty_truth).numpy()
    predicted = torch.cat(acc.any_pred).numpy()
    n = len(dice)
    auc = float("nan")
    if acc.p_lesion and has_lesion.any() and (~has_lesion).any():
        auc = roc_auc(has_lesion, torch.cat(acc.p_lesion).numpy())
    return {
        "dice": dice,
        "mean_dice": float(dice.mean()) if n else float("nan"),
        "mean_dice_lesion": float(dice[has_lesion].mean()) if has_lesion.any() else float("nan"),
        "fp_rate_normal": (
            float(predicted[~has_lesion].mean()) if (~has_lesion).any() else float("nan")
        ),
        "mean_dice_box": float(torch.cat(acc.box_dices).mean()) if acc.box_dices else float("nan"),
        "auc_normal": auc,
        "loss": float(sum(acc.losses) / n) if acc.losses and n else float("nan"),
        **inter,
    }


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
    was_training = model.training
    model.eval()
    device = torch.device(device)
    guided = int(getattr(model, "in_channels", 1)) > 1
    acc = _Scores()
    for x, y, *_ in DataLoader(dataset, batch_size=batch_size, shuffle=False):
        _score_batch(model, x.to(device), y.to(device), acc, threshold, loss_fn, channels_last,
                     box_prompts and guided, interactions and guided)
    inter = {"mean_interactions": float("nan"), "never_converged": float("nan")}
    if acc.lesion_images and sum(len(t) for t in acc.lesion_images):
        counts, converged = box_click_interactions(
            model, torch.cat(acc.lesion_images), torch.cat(acc.lesion_masks), device=device,
            threshold=threshold, batch_size=batch_size, channels_last=channels_last)
        inter = {"mean_interactions": float(np.mean(counts)),
                 "never_converged": int(np.sum(~converged))}
    if was_training:
        model.train()
    return _summary(acc, inter)


def _initial_states(truth: np.ndarray, seed: int, jitter: float, box_margin: float) -> list:
    """One jittered box per lesion of each mask: the first interaction of every image."""
    from busseg.prompts import box_mask, jitter_box, mask_to_boxes

    shape, states = truth.shape[1:], []
    for i in range(len(truth)):
        rng = np.random.default_rng([seed, i])
        boxes = np.stack([jitter_box(b, shape, rng, jitter) for b in mask_to_boxes(truth[i])])
        states.append({"boxes": boxes, "region": box_mask(boxes, shape, box_margin),
                       "points": [], "labels": [], "prev": None, "count": len(boxes),
                       "done": False, "iou": 0.0})
    return states


def _predict_states(model, images, truth, states, idx, *, device, threshold, accept_iou,
                    batch_size, channels_last) -> None:
    """Predict images ``idx`` with their prompts so far; update their mask, IoU and done."""
    from busseg.prompts import Prompts, render_guidance

    shape = truth.shape[1:]
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


def _add_clicks(states: list, truth: np.ndarray, max_interactions: int) -> list[int]:
    """Give every image still short of its IoU one more click; return those that got one."""
    from busseg.annotator import next_click

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
    return active


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
    if int(getattr(model, "in_channels", 1)) <= 1:
        raise ValueError("box_click_interactions needs a model with guidance channels")
    truth = masks[:, 0].cpu().numpy() >= 0.5
    if not truth.reshape(len(truth), -1).any(1).all():
        raise ValueError("box_click_interactions needs a lesion in every mask")
    states = _initial_states(truth, seed, jitter, box_margin)
    active = list(range(len(truth)))
    while active:
        _predict_states(model, images, truth, states, active, device=torch.device(device),
                        threshold=threshold, accept_iou=accept_iou, batch_size=batch_size,
                        channels_last=channels_last)
        active = _add_clicks(states, truth, max_interactions)
    converged = np.array([st["done"] for st in states])
    counts = np.array([st["count"] if st["done"] else max_interactions for st in states])
    return counts, converged
