"""Inference inputs: validated once, at the API boundary, and preprocessed as in training.

:func:`preprocess` turns an image into the network input exactly as
:class:`busseg.data.dataset.SegmentationDataset` does in training; the ``check_*`` and
``resolve_*`` functions validate what a caller of :mod:`busseg.inference` passes, with
messages that say what to do. Everything here is re-exported by :mod:`busseg.inference`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from busseg.model_cache import model_device
from busseg.settings import check_postprocess, resolve_threshold, resolve_tta

__all__ = [
    "check_device",
    "check_image",
    "check_postprocess",
    "preprocess",
    "resolve_threshold",
    "resolve_tta",
]


def check_image(image: Any, what: str = "image") -> np.ndarray:
    """Validate one image at the API boundary and return it as an ndarray.

    Parameters
    ----------
    image : array-like or torch.Tensor
        (H, W) grey or (H, W, 1|3|4) colour; numeric or bool, finite.
    what : str, optional
        What to call it in error messages (e.g. ``"slice 3"``).

    Returns
    -------
    numpy.ndarray
        The image as an array (a tensor is copied to the CPU).

    Raises
    ------
    ValueError
        If it is not numeric, not 2D grey or colour (a stack is pointed to
        :func:`predict_stack_iter`), empty, or holds NaN or infinity.
    """
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().numpy()
    arr = np.asarray(image)
    if arr.dtype == object or not (
        np.issubdtype(arr.dtype, np.number) or arr.dtype == np.bool_
    ) or np.iscomplexobj(arr):
        raise ValueError(
            f"{what} must be a numeric array (uint8, uint16 or float), got dtype {arr.dtype}"
        )
    if arr.ndim == 3 and arr.shape[-1] not in (1, 3, 4):
        raise ValueError(
            f"{what} has shape {arr.shape}, which looks like a stack of {arr.shape[0]} slices; "
            "predict one slice at a time or use busseg.inference.predict_stack_iter"
        )
    if arr.ndim not in (2, 3):
        raise ValueError(
            f"{what} must be 2D grey (H, W) or colour (H, W, 3|4), got shape {arr.shape}"
            + ("; for a stack use busseg.inference.predict_stack_iter" if arr.ndim == 4 else "")
        )
    if arr.size == 0:
        raise ValueError(f"{what} is empty (shape {arr.shape}); give an image with pixels")
    if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
        n_bad = int(arr.size - np.count_nonzero(np.isfinite(arr)))
        raise ValueError(
            f"{what} contains {n_bad} NaN or infinite value(s); replace them first, e.g. "
            "numpy.nan_to_num(image)"
        )
    return arr


def check_device(model: nn.Module, device: str | torch.device | None) -> torch.device:
    """Check that a requested device is the model's own (shared models are never moved).

    Parameters
    ----------
    model : torch.nn.Module
        The model.
    device : str or torch.device or None
        The device asked for; None accepts the model's.

    Returns
    -------
    torch.device
        The model's device.

    Raises
    ------
    ValueError
        If ``device`` is another device (the message says how to load the model there).
    """
    own = model_device(model)
    if device is None:
        return own
    from busseg.devices import get_device

    want = get_device(device)
    same = want.type == own.type and (
        want.index is None or own.index is None or want.index == own.index
    )
    if not same:
        raise ValueError(
            f"the model is on {own} but device={str(device)!r} was asked for; load it there "
            f"with busseg.load_model(path, device={str(want)!r}) (models are shared, so "
            "inference never moves them)"
        )
    return own


# --------------------------------------------------------------------------- preprocessing


def preprocess(
    image: Any, preprocessing: Mapping[str, Any], *, multiple: int = 1
) -> torch.Tensor:
    """Turn an image into the network input, exactly as in training.

    Parameters
    ----------
    image : numpy.ndarray
        (H, W) grey, (H, W, 3) RGB or (H, W, 4) RGBA (alpha ignored); uint8, uint16, bool or
        float (see :func:`busseg.data.io.to_grey`).
    preprocessing : mapping
        The checkpoint's ``preprocessing`` section: ``input_size`` [h, w] in pixels (or
        ``None``: keep the native size), ``grey`` (must be true) and ``normalize`` (must be
        ``"zscore"``).
    multiple : int, optional
        With ``input_size`` None, the output is padded at the bottom and right (reflecting the
        image) up to multiples of this (the network's ``2 ** depth``); ignored otherwise.

    Returns
    -------
    torch.Tensor
        (1, 1, h, w) float32 on the CPU, zero mean and unit variance over the image (before
        any padding). (h, w) is ``input_size``, or (H, W) rounded up to ``multiple``.

    Raises
    ------
    ValueError
        If the image is not 2D grey / RGB / RGBA, is empty, holds NaN or infinity, or the
        preprocessing asks for something this version does not do.
    """
    from busseg.data.io import to_grey
    from busseg.data.transforms import normalize, resize_image

    arr = check_image(image)
    if not preprocessing.get("grey", True):
        raise ValueError("only grey-scale checkpoints (preprocessing.grey = true) are supported")
    norm = preprocessing.get("normalize", "zscore")
    if norm != "zscore":
        raise ValueError(f"unsupported preprocessing.normalize {norm!r}; expected 'zscore'")
    grey = to_grey(arr)
    size = preprocessing.get("input_size")
    if size is not None:
        if len(size) != 2 or any(int(s) < 1 for s in size):
            raise ValueError(f"preprocessing.input_size must be [h, w] > 0, got {size!r}")
        size = (int(size[0]), int(size[1]))
        if grey.shape != size:
            grey = resize_image(grey, size)
    if not grey.flags.writeable:  # e.g. a session's read-only case image: torch wants a copy
        grey = grey.copy()
    x = normalize(torch.from_numpy(np.ascontiguousarray(grey))[None, None].float() / 255.0)
    if size is None and multiple > 1:
        h, w = grey.shape
        ph, pw = (-h) % multiple, (-w) % multiple
        if ph or pw:
            mode = "reflect" if ph < h and pw < w else "replicate"
            x = F.pad(x, (0, pw, 0, ph), mode=mode)
    return x
