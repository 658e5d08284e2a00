"""Inference: image -> preprocessing -> network -> probabilities at the original size -> mask.

No Qt or napari here; the napari widgets, the ``busseg`` command, ``training/evaluate.py`` and
``benchmarks/`` all call these functions.

Preprocessing is exactly the training preprocessing of
:class:`busseg.data.dataset.SegmentationDataset`: grey uint8 (:func:`busseg.data.io.to_grey`)
-> antialiased bilinear resize to the checkpoint's ``preprocessing.input_size``
(:func:`busseg.data.transforms.resize_image`) -> float in [0, 1] -> per-image z-score
(:func:`busseg.data.transforms.normalize`). The logits are resized back to the original
image size with bilinear interpolation (:func:`torch.nn.functional.interpolate`) before the
sigmoid, so the probabilities and the mask have the image's own size. Test-time augmentation
(TTA) averages the probabilities of the image and of its left-right mirror image.

Models returned by :func:`load_model` are cached and shared: never train or modify them (the
fine-tuning code loads its own copy with :func:`busseg.models.load_checkpoint`).

This module runs the network and assembles a prediction; every name of the inference API is
importable from here, though some live in the modules it is split into:
:mod:`busseg.model_cache` (loading and caching checkpoints, what a loaded model says),
:mod:`busseg.inputs` (validating inputs, preprocessing), :mod:`busseg.gating` (the normal-scan
gate and the region filter of automatic masks) and :mod:`busseg.stack`
(:func:`predict_stack_iter`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from busseg.gating import apply_filter, apply_gate, describe_gate, finish_mask
from busseg.inputs import (
    check_device,
    check_image,
    check_postprocess,
    preprocess,
    resolve_threshold,
    resolve_tta,
)
from busseg.model_cache import (
    ModelLike,
    clear_model_cache,
    load_model,
    model_config,
    model_device,
    model_multiple,
    resolve_model,
)
from busseg.settings import InferenceSettings
from busseg.stack import predict_stack_iter

__all__ = [
    "InferenceSettings",
    "ModelLike",
    "Prediction",
    "accepts_prompts",
    "apply_automatic_settings",
    "check_device",
    "check_image",
    "check_postprocess",
    "class_dict",
    "classify",
    "clear_model_cache",
    "describe_gate",
    "forward",
    "has_class_head",
    "load_model",
    "model_config",
    "model_device",
    "model_multiple",
    "predict",
    "predict_logits_batch",
    "predict_mask",
    "predict_proba",
    "predict_stack_iter",
    "predict_tensor",
    "preprocess",
    "resolve_model",
    "resolve_threshold",
    "resolve_tta",
]


@contextlib.contextmanager
def _eval_mode(model: nn.Module):
    """Run in eval mode; a model in training mode is switched back afterwards."""
    was_training = model.training
    if was_training:
        model.eval()
    try:
        yield
    finally:
        if was_training:
            model.train()


# --------------------------------------------------------------------------- prediction


def predict_logits_batch(batch: torch.Tensor, model: nn.Module, *, tta: bool = False):
    """Run the network on a preprocessed batch, optionally with a left-right flipped view.

    Parameters
    ----------
    batch : torch.Tensor
        (N, 1, h, w) float32 as from :func:`preprocess` (concatenated), on any device; it is
        moved to the model's device. For a model with prompt-guidance channels
        (:func:`accepts_prompts`) it may also be (N, C, h, w) with the guidance after the
        image channel; a one-channel batch gets all-zero guidance (automatic mode).
    model : torch.nn.Module
        A model from :func:`load_model` (eval mode); h and w must be multiples of its
        ``2 ** depth``.
    tta : bool, optional
        Also run the mirror image (one forward pass of 2N images) and flip its logits back.

    Returns
    -------
    torch.Tensor
        Logits (N, V, h, w) float32 on the model's device: view 0 is the image, view 1 (only
        with ``tta``) the mirrored image's logits mirrored back.

    Raises
    ------
    ValueError
        If ``batch`` is not (N, 1, h, w) (or (N, C, h, w) for a prompt model), or the model
        does not return (N, 1, h, w) logits.
    """
    return forward(batch, model, tta=tta, with_class=False)[0]


def forward(batch: torch.Tensor, model: nn.Module, *, tta: bool, with_class: bool
             ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Run the network: logits and, with ``with_class``, class probabilities.

    Parameters
    ----------
    batch, model, tta
        As :func:`predict_logits_batch`.
    with_class : bool
        Also return the class head's softmax probabilities (the model must have a head).

    Returns
    -------
    logits : torch.Tensor
        (N, V, h, w) float32 on the model's device (see :func:`predict_logits_batch`).
    class_proba : torch.Tensor or None
        (N, K) float32, averaged over the views; None without ``with_class``.

    Raises
    ------
    ValueError
        As :func:`predict_logits_batch`.
    """
    device = model_device(model)
    x = batch.to(device, non_blocking=True)
    channels = int(getattr(model, "in_channels", 1))
    if x.ndim != 4 or x.shape[1] not in {1, channels}:
        raise ValueError(f"batch must be (N, 1, h, w) or (N, {channels}, h, w), "
                         f"got {tuple(x.shape)}")
    if x.shape[1] != channels:
        x = torch.cat([x, x.new_zeros((x.shape[0], channels - 1, *x.shape[-2:]))], dim=1)
    n = x.shape[0]
    if tta:
        x = torch.cat([x, x.flip(-1)], dim=0)
    if device.type in ("cpu", "cuda"):
        x = x.contiguous(memory_format=torch.channels_last)
    class_proba = None
    with torch.inference_mode(), _eval_mode(model):
        if with_class:
            logits, class_logits = model(x, with_class=True)
            class_proba = torch.softmax(class_logits.float(), dim=1)
            if tta:
                class_proba = 0.5 * (class_proba[:n] + class_proba[n:])
        else:
            logits = model(x)
        logits = logits.float()
    if logits.ndim != 4 or logits.shape[1] != 1:
        raise ValueError(
            f"the model returned logits of shape {tuple(logits.shape)}; expected (N, 1, h, w)"
        )
    if tta:
        logits = torch.cat([logits[:n], logits[n:].flip(-1)], dim=1)
    return logits, class_proba


def has_class_head(model: nn.Module) -> bool:
    """Tell whether ``model`` has an image-level normal / benign / malignant head.

    Parameters
    ----------
    model : torch.nn.Module
        A model from :func:`load_model`.

    Returns
    -------
    bool
        True when the model predicts class probabilities (:func:`classify`, the gate).
    """
    return bool(getattr(model, "num_classes", 0))


def accepts_prompts(model: nn.Module) -> bool:
    """Tell whether ``model`` takes box / click / previous-mask guidance channels.

    Parameters
    ----------
    model : torch.nn.Module
        A model from :func:`load_model`.

    Returns
    -------
    bool
        True when its input has channels beyond the image (box and click prompts work).
    """
    return int(getattr(model, "in_channels", 1)) > 1


def _logits_to_proba(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(N, V, h, w) logits -> (N, H, W) probabilities: resize logits, sigmoid, mean over V."""
    h, w = logits.shape[-2:]
    if (h, w) != tuple(size):
        with torch.inference_mode():
            logits = F.interpolate(
                logits, size=tuple(size), mode="bilinear", align_corners=False,
                antialias=size[0] < h or size[1] < w,
            )
    proba = torch.sigmoid(logits)
    return proba[:, 0] if proba.shape[1] == 1 else proba.mean(dim=1)


def predict_tensor(
    images: Sequence[np.ndarray], model: nn.Module, tta: bool, prompts: Sequence | None = None,
    with_class: bool = False,
) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """Map validated images (and optional prompts) to probabilities on the model's device.

    Images of one shape go through the network in one batch.

    Parameters
    ----------
    images : sequence of numpy.ndarray
        Images checked by :func:`check_image`.
    model : torch.nn.Module
        A model carrying its checkpoint config.
    tta : bool
        Flip-average.
    prompts : sequence of busseg.prompts.Prompts or None, optional
        One per image (None or empty: automatic), from :func:`busseg.prompts.validate_prompts`.
    with_class : bool, optional
        Also return the class probabilities (the model must have a head).

    Returns
    -------
    list of tuple
        One ((H, W) float probabilities at the image's size, (K,) class probabilities or
        None) per image, tensors on the model's device.
    """
    from busseg.prompts import DEFAULT_CLICK_RADIUS, render_guidance

    cfg = model_config(model)
    prep = cfg.get("preprocessing", {})
    multiple = model_multiple(model, cfg)
    xs = [preprocess(im, prep, multiple=multiple) for im in images]
    sizes = [tuple(np.shape(im)[:2]) for im in images]
    if prompts is not None and any(p is not None and not p.empty for p in prompts):
        radius = float(cfg.get("prompts", {}).get("click_radius", DEFAULT_CLICK_RADIUS))
        guided = []
        for x, size, pr in zip(xs, sizes, prompts, strict=True):
            if pr is None or pr.empty:
                guided.append(x)
                continue
            size_in = size if prep.get("input_size") is None else tuple(x.shape[-2:])
            g = render_guidance(pr, size, size_in, click_radius=radius)[None]
            ph, pw = x.shape[-2] - g.shape[-2], x.shape[-1] - g.shape[-1]
            if ph or pw:
                g = F.pad(g, (0, pw, 0, ph))
            guided.append(torch.cat([x, g], dim=1))
        channels = max(g.shape[1] for g in guided)
        xs = [g if g.shape[1] == channels else
              torch.cat([g, g.new_zeros((1, channels - 1, *g.shape[-2:]))], 1) for g in guided]
    out: list[tuple[torch.Tensor, torch.Tensor | None]] = []
    if len({tuple(x.shape) for x in xs}) == 1:
        groups = [(forward(torch.cat(xs), model, tta=tta, with_class=with_class),
                   list(range(len(xs))))]
    else:
        groups = [(forward(x, model, tta=tta, with_class=with_class), [i])
                  for i, x in enumerate(xs)]
    for (logits, class_proba), idx in groups:
        for j, i in enumerate(idx):
            H, W = sizes[i]
            lg = logits[j : j + 1]
            if prep.get("input_size") is None:
                lg = lg[..., :H, :W]  # drop the padding
            out.append((_logits_to_proba(lg, (H, W))[0],
                        None if class_proba is None else class_proba[j]))
    return out


# predict_proba, predict and classify run the network through this name (tests replace it).
_predict_tensor = predict_tensor


def predict_proba(
    image: Any,
    model: ModelLike = None,
    settings: InferenceSettings | None = None,
    *,
    boxes: Any = None,
    points: Any = None,
    point_labels: Any = None,
    previous_mask: Any = None,
    **overrides: Any,
) -> np.ndarray:
    """Lesion probability per pixel at the image's original size.

    Parameters
    ----------
    image : numpy.ndarray
        (H, W) grey, (H, W, 3) RGB or (H, W, 4) RGBA; uint8, uint16, bool or float (float in
        [0, 1] is taken as is, other ranges are min-max scaled; see
        :func:`busseg.data.io.to_grey`). No NaN or infinity.
    model : torch.nn.Module or str or os.PathLike or None, optional
        A model from :func:`load_model`, a checkpoint path (loaded and cached), or ``None``
        for the shipped default model.
    settings : InferenceSettings or None, optional
        Its ``device`` and ``tta`` are used (the other fields decide masks, not
        probabilities). ``device``: where to run; ``None`` (default) uses the model's own
        device; anything else must be that device (shared models are never moved; load one
        with ``load_model(path, device=...)`` instead). ``tta``: test-time augmentation,
        the probabilities of the image and of its left-right mirror image averaged (twice
        the network cost); ``None`` uses the checkpoint's ``inference.tta_flips``.
    boxes, points, point_labels, previous_mask : optional
        Prompts for a prompt model (:func:`accepts_prompts`), in pixels of ``image``,
        napari's (row, col) order: ``boxes`` (B, 4) ``(row_min, col_min, row_max, col_max)``
        inclusive, one per lesion; ``points`` (P, 2) clicks with ``point_labels`` (P,)
        1 = lesion, 0 = background (default all 1); ``previous_mask`` (H, W) bool, the mask
        the clicks correct. See :func:`busseg.prompts.validate_prompts`. The probabilities
        are those of the whole image (:func:`predict_mask` restricts the mask to the boxes).

    Returns
    -------
    numpy.ndarray
        (H, W) float32 in [0, 1]: the sigmoid of the logits, resized (bilinear) from the
        network input size to the image size before the sigmoid.

    Other Parameters
    ----------------
    **overrides
        Fields of :class:`InferenceSettings` (``device=``, ``tta=`` ...) replacing those of
        ``settings``.

    Raises
    ------
    ValueError
        If the image is not 2D grey / RGB / RGBA, is empty or holds NaN / infinity; if the
        model has no checkpoint config; if ``device`` is not the model's device; if prompts
        are malformed (outside the image, an empty box, lengths that differ) or given to a
        model that does not take them; for a setting out of range.
    TypeError
        For a keyword that is neither a prompt nor a field of :class:`InferenceSettings`.
    busseg.models.CheckpointError
        If ``model`` is a path (or ``None``) and the checkpoint cannot be loaded.

    """
    s = InferenceSettings.coerce(settings, "predict_proba", **overrides)
    model, arr, cfg = _prepare(image, model, s.device)
    pr = _prompts(model, arr, boxes, points, point_labels, previous_mask)
    proba = _predict_tensor([arr], model, resolve_tta(s.tta, cfg), [pr])[0][0]
    return proba.to("cpu", torch.float32).numpy()


def _prompts(model, arr, boxes, points, point_labels, previous_mask):
    """Validate the prompts: :class:`busseg.prompts.Prompts`, or None without any."""
    if boxes is None and points is None and previous_mask is None:
        if point_labels is not None and len(np.atleast_1d(point_labels)):
            raise ValueError("point_labels were given without points")
        return None
    from busseg.prompts import validate_prompts

    pr = validate_prompts(arr.shape[:2], boxes, points, point_labels, previous_mask)
    if not pr.empty and not accepts_prompts(model):
        raise ValueError(
            "this checkpoint takes no box or click prompts (it was trained without guidance "
            "channels); use the shipped default model or one trained with "
            "`train.py --prompts`")
    return pr


@dataclass
class Prediction:
    """Everything one forward pass gives for one image (:func:`predict`).

    Attributes
    ----------
    mask : numpy.ndarray
        (H, W) bool, True = lesion, after the normal-scan gate, the box restriction and
        post-processing.
    proba : numpy.ndarray
        (H, W) float32 lesion probabilities in [0, 1] (before the gate).
    class_proba : dict or None
        ``{"normal": p, "benign": p, "malignant": p}`` (summing to 1) from the class head;
        None for a model without one. Research output, not a diagnosis.
    gated : bool
        True when the normal-scan gate emptied a non-empty mask.
    regions_removed : int
        Connected components of the automatic mask that the region filter removed
        (:mod:`busseg.region_filter`; 0 without a filter, with prompts, or when gated).
    """

    mask: np.ndarray
    proba: np.ndarray
    class_proba: dict | None
    gated: bool = False
    regions_removed: int = 0


def class_dict(model: nn.Module, probs: torch.Tensor) -> dict:
    """Name a model's class probabilities.

    Parameters
    ----------
    model : torch.nn.Module
        The model (its config's ``classes``, default normal, benign, malignant).
    probs : torch.Tensor
        (K,) class probabilities.

    Returns
    -------
    dict
        ``{class name: float}``.
    """
    from busseg.models import CLASS_NAMES

    names = list(model_config(model).get("classes", CLASS_NAMES))
    values = probs.to("cpu", torch.float64).tolist()
    return {name: float(v) for name, v in zip(names, values, strict=True)}


def predict_mask(
    image: Any,
    model: ModelLike = None,
    settings: InferenceSettings | None = None,
    *,
    boxes: Any = None,
    points: Any = None,
    point_labels: Any = None,
    previous_mask: Any = None,
    box_margin: float = 0.1,
    **overrides: Any,
) -> np.ndarray:
    """Binary lesion mask at the image's original size (see :func:`predict` for all outputs).

    Parameters
    ----------
    image, model, settings, boxes, points, point_labels, previous_mask, box_margin, **overrides
        As in :func:`predict`.

    Returns
    -------
    numpy.ndarray
        (H, W) bool, True = lesion.

    Raises
    ------
    ValueError, TypeError, busseg.models.CheckpointError
        As :func:`predict`.
    """
    return predict(image, model, settings, boxes=boxes, points=points,
                   point_labels=point_labels, previous_mask=previous_mask,
                   box_margin=box_margin, **overrides).mask


def classify(
    image: Any,
    model: ModelLike = None,
    settings: InferenceSettings | None = None,
    **overrides: Any,
) -> dict:
    """Image-level class probabilities from the model's class head.

    Parameters
    ----------
    image : numpy.ndarray
        As for :func:`predict_mask`.
    model : torch.nn.Module or str or os.PathLike or None, optional
        A model with a class head (:func:`has_class_head`), a checkpoint path, or ``None``
        (the default model).
    settings : InferenceSettings or None, optional
        Its ``tta`` (average over the image and its mirror image; ``None`` uses the
        checkpoint setting) and ``device`` (see :func:`predict_proba`) are used.
    **overrides
        Fields of :class:`InferenceSettings` (``tta=``, ``device=``).

    Returns
    -------
    dict
        ``{"normal": p, "benign": p, "malignant": p}``, floats in [0, 1] summing to 1.
        Research output, not a diagnosis.

    Raises
    ------
    ValueError
        If the model has no class head (the message names one that does), or as
        :func:`predict_proba` for a bad image.
    TypeError
        For a keyword that is not a field of :class:`InferenceSettings`.
    busseg.models.CheckpointError
        If ``model`` is a path (or ``None``) and the checkpoint cannot be loaded.
    """
    s = InferenceSettings.coerce(settings, "classify", **overrides)
    model, arr, cfg = _prepare(image, model, s.device)
    if not has_class_head(model):
        raise ValueError(
            "this checkpoint has no lesion class head; use the shipped default model "
            "(busseg.load_model()) or one trained with `train.py --class-head`")
    _, class_proba = _predict_tensor([arr], model, resolve_tta(s.tta, cfg), with_class=True)[0]
    return class_dict(model, class_proba)


def predict(
    image: Any,
    model: ModelLike = None,
    settings: InferenceSettings | None = None,
    *,
    boxes: Any = None,
    points: Any = None,
    point_labels: Any = None,
    previous_mask: Any = None,
    box_margin: float = 0.1,
    **overrides: Any,
) -> Prediction:
    """Mask, probabilities and class probabilities of one image from one forward pass.

    Parameters
    ----------
    image : numpy.ndarray
        (H, W) grey, (H, W, 3) RGB or (H, W, 4) RGBA; uint8, uint16, bool or float.
    model : torch.nn.Module or str or os.PathLike or None, optional
        A model from :func:`load_model`, a checkpoint path, or ``None`` (the default model).
    settings : InferenceSettings or None, optional
        Threshold, test-time flips, normal-scan gate, region filter, post-processing and
        device (see :class:`busseg.settings.InferenceSettings`); None: the defaults, which
        take the checkpoint's stored threshold, flips, gate and filter and post-process
        nothing. The gate and the region filter act in automatic mode only (no prompts): the
        gate empties the mask when P(normal) >= its ``p_normal`` *and* no pixel's lesion
        probability reaches its ``lesion_confidence``, so the class head alone cannot silence
        a confident lesion; the filter then removes connected components its classifier
        finds unlikely to be lesions (:mod:`busseg.region_filter`).
    boxes, points, point_labels, previous_mask : optional
        Prompts, as in :func:`predict_proba`. With boxes, the mask is restricted to the boxes
        (each grown by ``box_margin``).
    box_margin : float, optional
        Share of a box's side by which the mask may extend past it (>= 0), for boxes drawn
        a little too tight.

    Returns
    -------
    Prediction
        ``mask`` (H, W) bool, ``proba`` (H, W) float32, ``class_proba`` dict or None,
        ``gated`` bool, ``regions_removed`` int.

    Other Parameters
    ----------------
    **overrides
        Fields of :class:`~busseg.settings.InferenceSettings` (``threshold=``, ``tta=``,
        ``normal_gate=``, ``region_filter=``, ``fill_holes=``, ``keep=``, ``min_area=``,
        ``device=``) replacing those of ``settings``.

    Raises
    ------
    ValueError
        As :func:`predict_proba`; also for a setting out of range (threshold outside
        (0, 1), bad post-processing options, a bad ``normal_gate`` or ``region_filter``, or
        an invalid stored one) or a negative ``box_margin``.
    TypeError
        For a keyword that is neither a prompt nor a field of ``InferenceSettings``.
    busseg.models.CheckpointError
        If ``model`` is a path (or ``None``) and the checkpoint cannot be loaded.
    """
    from busseg.prompts import box_mask

    s = InferenceSettings.coerce(settings, "predict", **overrides)
    model, arr, cfg = _prepare(image, model, s.device)
    r = s.resolve(cfg)
    if not (isinstance(box_margin, (int, float)) and box_margin >= 0):
        raise ValueError(f"box_margin must be a number >= 0, got {box_margin!r}")
    pr = _prompts(model, arr, boxes, points, point_labels, previous_mask)
    with_class = has_class_head(model)
    proba, class_proba = _predict_tensor([arr], model, r.tta, [pr], with_class=with_class)[0]
    mask = (proba >= r.threshold).cpu().numpy()
    if pr is not None and len(pr.boxes):
        mask &= box_mask(pr.boxes, mask.shape, box_margin)
    classes = class_dict(model, class_proba) if class_proba is not None else None
    proba_np = proba.to("cpu", torch.float32).numpy()
    mask, gated, removed = finish_mask(mask, proba_np, arr, classes, r,
                                       automatic=pr is None or pr.empty)
    return Prediction(mask, proba_np, classes, gated, removed)


def apply_automatic_settings(raw: Prediction, image: Any, model: ModelLike = None,
                             settings: InferenceSettings | None = None, **overrides: Any
                             ) -> np.ndarray:
    """Apply the normal-scan gate and the region filter to a raw automatic prediction.

    ``predict(image, model, normal_gate=None, region_filter=None)`` followed by this gives
    the mask ``predict(image, model, normal_gate=..., region_filter=...)`` gives, without a
    second forward pass: a site calibration (:mod:`busseg.calibration`) tries other settings
    on the same probabilities.

    Parameters
    ----------
    raw : Prediction
        From :func:`predict` with ``normal_gate=None`` and ``region_filter=None``, no prompts.
    image : numpy.ndarray
        The image it was predicted from.
    model : torch.nn.Module or str or os.PathLike or None
        The model (its stored gate and filter are the ``"auto"`` settings).
    settings : InferenceSettings or None, optional
        Its ``normal_gate`` and ``region_filter`` are applied (the other fields made ``raw``).
    **overrides
        Fields of :class:`InferenceSettings` (``normal_gate=``, ``region_filter=``).

    Returns
    -------
    numpy.ndarray
        (H, W) bool mask.

    Raises
    ------
    ValueError
        As :func:`predict` for a bad gate or filter.
    """
    s = InferenceSettings.coerce(settings, "apply_automatic_settings", **overrides)
    model = resolve_model(model)
    r = s.resolve(model_config(model))
    arr = check_image(image)
    mask, _ = apply_gate(np.asarray(raw.mask, bool), torch.from_numpy(raw.proba),
                          raw.class_proba, r.gate)
    mask, _ = apply_filter(mask, raw.proba, arr, raw.class_proba, r.region_filter)
    return mask


def _prepare(image: Any, model: ModelLike, device) -> tuple[torch.nn.Module, np.ndarray, dict]:
    """Validate the inputs of predict_proba / predict_mask once: (model, image array, config)."""
    model = resolve_model(model)
    arr = check_image(image)
    check_device(model, device)
    return model, arr, model_config(model)
