"""Predicting a stack of images slice after slice: :func:`predict_stack_iter`.

A generator, so a GUI can show progress and stop between slices; re-exported by
:mod:`busseg.inference`, whose per-image steps (validation, the network pass, the class names)
it uses, and which applies the same gate and region filter (:mod:`busseg.gating`).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from busseg.gating import finish_mask
from busseg.inputs import check_device, check_image
from busseg.model_cache import ModelLike, model_config, resolve_model
from busseg.settings import InferenceSettings, ResolvedInference

__all__ = ["predict_stack_iter"]


def predict_stack_iter(
    images: Iterable[Any] | np.ndarray,
    model: ModelLike = None,
    settings: InferenceSettings | None = None,
    *,
    batch_size: int = 4,
    with_class: bool = False,
    with_info: bool = False,
    **overrides: Any,
) -> Iterator[tuple]:
    """Predict slice after slice, yielding each result as soon as it is ready.

    A generator, so a GUI can show progress and stop between slices (napari's
    ``thread_worker`` wraps it; scripts simply loop over it).

    Parameters
    ----------
    images : numpy.ndarray or iterable of numpy.ndarray
        A stack (N, H, W) grey or (N, H, W, 3|4) colour, or any iterable of 2D images (sizes
        may differ), each as accepted by :func:`predict_proba`. A 3D array whose last axis
        has length 3 or 4 is refused as ambiguous (one colour image?): wrap a single image
        in a list.
    model : torch.nn.Module or str or os.PathLike or None, optional
        As in :func:`predict_proba`.
    settings : InferenceSettings or None, optional
        As in :func:`busseg.inference.predict` (the gate, then the region filter, act on
        every slice: there are no prompts here).
    batch_size : int, optional
        Slices per forward pass (>= 1); results are still yielded one slice at a time.
    with_class : bool, optional
        Also yield the class probabilities (a dict, or None without a class head) as a
        fourth item.
    with_info : bool, optional
        Also yield, last, ``{"gated": bool, "regions_removed": int}`` (see
        :class:`Prediction`).

    Yields
    ------
    index : int
        Position of the slice in ``images`` (0-based).
    mask : numpy.ndarray
        (H, W) bool.
    proba : numpy.ndarray
        (H, W) float32 in [0, 1].
    class_proba : dict or None
        Only with ``with_class``: as :attr:`Prediction.class_proba`.
    info : dict
        Only with ``with_info``: ``{"gated": bool, "regions_removed": int}``.

    Other Parameters
    ----------------
    **overrides
        Fields of :class:`~busseg.settings.InferenceSettings` replacing those of
        ``settings``.

    Raises
    ------
    ValueError
        As :func:`predict_mask` (raised when the offending slice is reached; inputs that
        are wrong as a whole raise on the first ``next()``), or for ``batch_size < 1``.
    TypeError
        For a keyword that is not a field of ``InferenceSettings``.
    """
    from busseg.inference import has_class_head

    s = InferenceSettings.coerce(settings, "predict_stack_iter", **overrides)
    model = resolve_model(model)
    check_device(model, s.device)
    resolved = s.resolve(model_config(model))
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    images = _check_stack(images)
    out = _Output(has_class_head(model), with_class, with_info)
    chunk: list[tuple[int, np.ndarray]] = []
    for i, im in enumerate(images):
        chunk.append((i, check_image(im, what=f"slice {i}")))
        if len(chunk) == batch_size:
            yield from _emit(chunk, model, resolved, out)
            chunk = []
    if chunk:
        yield from _emit(chunk, model, resolved, out)


@dataclass(frozen=True)
class _Output:
    """What the network computes and what each yielded tuple holds."""

    head: bool
    with_class: bool
    with_info: bool


def _check_stack(images: Iterable[Any] | np.ndarray) -> Iterable[Any]:
    """Refuse an array that is not a stack of 2D images; a tensor becomes an array."""
    if isinstance(images, torch.Tensor):
        images = images.detach().cpu().numpy()
    if isinstance(images, np.ndarray):
        if images.ndim == 2:
            raise ValueError(
                f"images has shape {images.shape}: one 2D image, not a stack; use "
                "predict_mask, or wrap it in a list"
            )
        if images.ndim == 3 and images.shape[-1] in (3, 4):
            raise ValueError(
                f"images has shape {images.shape}: ambiguous between one colour image and a "
                f"stack of {images.shape[0]} slices {images.shape[1]} pixels wide; wrap a "
                "single image in a list, or use predict_mask"
            )
        if images.ndim not in (3, 4):
            raise ValueError(
                f"a stack must be (N, H, W) or (N, H, W, 3|4), got shape {images.shape}"
            )
    return images


def _emit(chunk: list[tuple[int, np.ndarray]], model: nn.Module, resolved: ResolvedInference,
          out: _Output) -> Iterator[tuple]:
    """Predict one batch of checked slices and yield each slice's result tuple."""
    from busseg.inference import class_dict, predict_tensor

    results = predict_tensor([a for _, a in chunk], model, resolved.tta, with_class=out.head)
    for (i, arr), (p, cp) in zip(chunk, results, strict=True):
        classes = class_dict(model, cp) if cp is not None else None
        p_np = p.to("cpu", torch.float32).numpy()
        mask = (p >= resolved.threshold).cpu().numpy()
        mask, gated, removed = finish_mask(mask, p_np, arr, classes, resolved)
        item = (i, mask, p_np)
        if out.with_class:
            item = (*item, classes)
        if out.with_info:
            item = (*item, {"gated": bool(gated), "regions_removed": int(removed)})
        yield item
