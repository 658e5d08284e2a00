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
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "clear_model_cache",
    "load_model",
    "model_device",
    "predict_logits_batch",
    "predict_mask",
    "predict_proba",
    "predict_stack_iter",
    "preprocess",
]

ModelLike = nn.Module | str | os.PathLike | None


# --------------------------------------------------------------------------- loading


def _checkpoint_dir(path: str | os.PathLike | None) -> Path:
    from busseg.models import default_checkpoint_path
    from busseg.models.checkpoint import CONFIG_NAME, WEIGHTS_NAME

    p = default_checkpoint_path() if path is None else Path(path).expanduser()
    if p.name in (CONFIG_NAME, WEIGHTS_NAME) and not p.is_dir():
        p = p.parent
    try:
        return p.resolve()
    except OSError:  # pragma: no cover - unreadable path; load_checkpoint reports it
        return p


def _files_key(directory: Path) -> tuple:
    """(mtime_ns, size, inode) of config.json and model.safetensors; raises CheckpointError."""
    from busseg.models import read_checkpoint_config
    from busseg.models.checkpoint import CONFIG_NAME, WEIGHTS_NAME

    try:
        stats = [os.stat(directory / n) for n in (CONFIG_NAME, WEIGHTS_NAME)]
    except OSError:
        read_checkpoint_config(directory)  # raises CheckpointError saying what is missing
        raise  # pragma: no cover - only if the files appeared in between
    return tuple((s.st_mtime_ns, s.st_size, s.st_ino) for s in stats)


@functools.lru_cache(maxsize=8)
def _load_cached(directory: str, files_key: tuple, device: str) -> nn.Module:
    from busseg.models import load_checkpoint

    model, _ = load_checkpoint(directory, device=device)
    if torch.device(device).type in ("cpu", "cuda"):
        # NHWC convolutions are ~25 % faster on CPU (measured for the base-16 U-Net).
        model = model.to(memory_format=torch.channels_last)
    for p in model.parameters():
        p.requires_grad_(False)
    model.busseg_checkpoint_path = directory
    return model


def load_model(path: str | os.PathLike | None = None, device: str | torch.device = "auto"):
    """Load a checkpoint for inference, cached by (path, file modification times, device).

    Parameters
    ----------
    path : str or os.PathLike or None, optional
        A checkpoint directory (``model.safetensors`` + ``config.json``, written by
        :func:`busseg.models.save_checkpoint`) or either file in it. ``None`` (default) is the
        shipped default model (:func:`busseg.models.default_checkpoint_path`).
    device : str or torch.device, optional
        ``"auto"`` (default: cuda, then mps, then cpu), ``"cuda"``, ``"cuda:<i>"``, ``"mps"``
        or ``"cpu"`` (see :func:`busseg.devices.get_device`).

    Returns
    -------
    torch.nn.Module
        The network in eval mode on ``device`` with gradients disabled, mapping
        (N, 1, h, w) float to logits (N, 1, h, w). ``model.busseg_config`` is the checkpoint
        config (``preprocessing.input_size``, ``inference.threshold`` ...);
        ``model.busseg_checkpoint_path`` the resolved checkpoint directory (str). Calling
        again with the same path and device returns the *same object* until either file of
        the checkpoint changes (new modification time, size or inode), which reloads it.
        The object is shared: do not train or modify it; use
        :func:`busseg.models.load_checkpoint` for a private copy.

    Raises
    ------
    busseg.models.CheckpointError
        If the checkpoint (or the default model) is missing, incomplete or corrupt; the
        message says what to do.
    ValueError
        If ``device`` is unknown or not present on this machine.
    """
    from busseg.devices import get_device

    directory = _checkpoint_dir(path)
    key = _files_key(directory)
    dev = get_device(device)
    return _load_cached(str(directory), key, str(dev))


def clear_model_cache() -> None:
    """Forget all models cached by :func:`load_model` (frees their memory once unused)."""
    _load_cached.cache_clear()


def _resolve_model(model: ModelLike) -> nn.Module:
    if model is None or isinstance(model, (str, os.PathLike)):
        return load_model(model)
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"model must be a torch.nn.Module from busseg.load_model, a checkpoint path or "
            f"None (the default model), got {type(model).__name__}"
        )
    return model


def _config(model: nn.Module) -> Mapping[str, Any]:
    cfg = getattr(model, "busseg_config", None)
    if not isinstance(cfg, Mapping):
        raise ValueError(
            f"this {type(model).__name__} carries no checkpoint config (model.busseg_config); "
            "load it with busseg.load_model(path) or busseg.models.load_checkpoint(path), or "
            "set model.busseg_config to a checkpoint config dict"
        )
    return cfg


def model_device(model: nn.Module) -> torch.device:
    """Return the device a model's parameters live on.

    Parameters
    ----------
    model : torch.nn.Module
        Any model.

    Returns
    -------
    torch.device
        The device of its first parameter (or buffer); ``cpu`` for a model without either.
    """
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def _multiple(model: nn.Module, cfg: Mapping[str, Any]) -> int:
    m = getattr(model, "required_multiple", None)
    if m is not None:
        return int(m)
    from busseg.models import required_multiple

    return required_multiple(cfg.get("model"))


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


# --------------------------------------------------------------------------- inputs


def _check_image(image: Any, what: str = "image") -> np.ndarray:
    """Validate one image at the API boundary and return it as an ndarray."""
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


def _resolve_tta(tta: bool | None, cfg: Mapping[str, Any]) -> bool:
    if tta is None:
        return bool(cfg.get("inference", {}).get("tta_flips", False))
    return bool(tta)


def _resolve_threshold(threshold: float | None, cfg: Mapping[str, Any]) -> float:
    if threshold is None:
        threshold = cfg.get("inference", {}).get("threshold", 0.5)
    try:
        t = float(threshold)
    except (TypeError, ValueError):
        raise ValueError(f"threshold must be a number in (0, 1), got {threshold!r}") from None
    if not 0.0 < t < 1.0:
        raise ValueError(f"threshold must be in (0, 1) (a probability), got {threshold!r}")
    return t


def _check_device(model: nn.Module, device: str | torch.device | None) -> torch.device:
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

    arr = _check_image(image)
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
    x = normalize(torch.from_numpy(np.ascontiguousarray(grey))[None, None].float() / 255.0)
    if size is None and multiple > 1:
        h, w = grey.shape
        ph, pw = (-h) % multiple, (-w) % multiple
        if ph or pw:
            mode = "reflect" if ph < h and pw < w else "replicate"
            x = F.pad(x, (0, pw, 0, ph), mode=mode)
    return x


# --------------------------------------------------------------------------- prediction


def predict_logits_batch(batch: torch.Tensor, model: nn.Module, *, tta: bool = False):
    """Run the network on a preprocessed batch, optionally with a left-right flipped view.

    Parameters
    ----------
    batch : torch.Tensor
        (N, 1, h, w) float32 as from :func:`preprocess` (concatenated), on any device; it is
        moved to the model's device.
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
        If ``batch`` is not (N, 1, h, w), or the model does not return (N, 1, h, w) logits.
    """
    device = model_device(model)
    x = batch.to(device, non_blocking=True)
    if x.ndim != 4 or x.shape[1] != 1:
        raise ValueError(f"batch must be (N, 1, h, w), got {tuple(x.shape)}")
    n = x.shape[0]
    if tta:
        x = torch.cat([x, x.flip(-1)], dim=0)
    if device.type in ("cpu", "cuda"):
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode(), _eval_mode(model):
        logits = model(x).float()
    if logits.ndim != 4 or logits.shape[1] != 1:
        raise ValueError(
            f"the model returned logits of shape {tuple(logits.shape)}; expected (N, 1, h, w)"
        )
    if tta:
        return torch.cat([logits[:n], logits[n:].flip(-1)], dim=1)
    return logits


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


def _predict_tensor(
    images: Sequence[np.ndarray], model: nn.Module, tta: bool
) -> list[torch.Tensor]:
    """Map validated arrays to (H, W) probability tensors on the model's device."""
    cfg = _config(model)
    prep = cfg.get("preprocessing", {})
    multiple = _multiple(model, cfg)
    xs = [preprocess(im, prep, multiple=multiple) for im in images]
    sizes = [tuple(np.shape(im)[:2]) for im in images]
    out: list[torch.Tensor] = []
    if len({tuple(x.shape) for x in xs}) == 1:
        logits = predict_logits_batch(torch.cat(xs), model, tta=tta)
        groups = [(logits, list(range(len(xs))))]
    else:
        groups = [(predict_logits_batch(x, model, tta=tta), [i]) for i, x in enumerate(xs)]
    for logits, idx in groups:
        for j, i in enumerate(idx):
            H, W = sizes[i]
            lg = logits[j : j + 1]
            if prep.get("input_size") is None:
                lg = lg[..., :H, :W]  # drop the padding
            out.append(_logits_to_proba(lg, (H, W))[0])
    return out


def predict_proba(
    image: Any,
    model: ModelLike = None,
    *,
    device: str | torch.device | None = None,
    tta: bool | None = None,
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
    device : str or torch.device or None, optional
        Where to run. ``None`` (default) uses the model's own device; anything else must be
        that device (shared models are never moved; load one with ``load_model(path,
        device=...)`` instead).
    tta : bool or None, optional
        Test-time augmentation: average the probabilities of the image and of its left-right
        mirror image (twice the network cost). ``None`` uses the checkpoint's
        ``inference.tta_flips``.

    Returns
    -------
    numpy.ndarray
        (H, W) float32 in [0, 1]: the sigmoid of the logits, resized (bilinear) from the
        network input size to the image size before the sigmoid.

    Raises
    ------
    ValueError
        If the image is not 2D grey / RGB / RGBA, is empty or holds NaN / infinity; if the
        model has no checkpoint config; if ``device`` is not the model's device.
    busseg.models.CheckpointError
        If ``model`` is a path (or ``None``) and the checkpoint cannot be loaded.
    """
    model, arr, cfg = _prepare(image, model, device)
    proba = _predict_tensor([arr], model, _resolve_tta(tta, cfg))[0]
    return proba.to("cpu", torch.float32).numpy()


def predict_mask(
    image: Any,
    model: ModelLike = None,
    *,
    threshold: float | None = None,
    tta: bool | None = None,
    fill_holes: bool = False,
    keep: str = "all",
    min_area: int = 0,
    device: str | torch.device | None = None,
) -> np.ndarray:
    """Binary lesion mask at the image's original size.

    Parameters
    ----------
    image : numpy.ndarray
        (H, W) grey, (H, W, 3) RGB or (H, W, 4) RGBA; uint8, uint16, bool or float.
    model : torch.nn.Module or str or os.PathLike or None, optional
        A model from :func:`load_model`, a checkpoint path, or ``None`` (the default model).
    threshold : float or None, optional
        Probability threshold in (0, 1); a pixel is lesion where probability >= threshold.
        ``None`` uses the checkpoint's ``inference.threshold``.
    tta : bool or None, optional
        Left-right flip test-time augmentation (see :func:`predict_proba`); ``None`` uses the
        checkpoint's ``inference.tta_flips``.
    fill_holes, keep, min_area
        Post-processing, see :func:`busseg.postprocess.postprocess_mask`; the defaults (no
        hole filling, ``keep="all"``, ``min_area=0``) return the thresholded mask as is.
    device : str or torch.device or None, optional
        See :func:`predict_proba`.

    Returns
    -------
    numpy.ndarray
        (H, W) bool, True = lesion.

    Raises
    ------
    ValueError
        As :func:`predict_proba`; also for a threshold outside (0, 1) or invalid
        post-processing options.
    busseg.models.CheckpointError
        If ``model`` is a path (or ``None``) and the checkpoint cannot be loaded.
    """
    from busseg.postprocess import postprocess_mask

    model, arr, cfg = _prepare(image, model, device)
    t = _resolve_threshold(threshold, cfg)
    _check_postprocess(keep, min_area)
    proba = _predict_tensor([arr], model, _resolve_tta(tta, cfg))[0]
    mask = (proba >= t).cpu().numpy()
    if fill_holes or keep != "all" or min_area > 0:
        mask = postprocess_mask(mask, fill_holes=fill_holes, keep=keep, min_area=min_area)
    return mask


def _prepare(image: Any, model: ModelLike, device) -> tuple[torch.nn.Module, np.ndarray, dict]:
    """Validate the inputs of predict_proba / predict_mask once: (model, image array, config)."""
    model = _resolve_model(model)
    arr = _check_image(image)
    _check_device(model, device)
    return model, arr, _config(model)


def _check_postprocess(keep: str, min_area: int) -> None:
    from busseg.postprocess import KEEP_CHOICES

    if keep not in KEEP_CHOICES:
        raise ValueError(f"keep must be one of {', '.join(map(repr, KEEP_CHOICES))}, got {keep!r}")
    if isinstance(min_area, bool) or not isinstance(min_area, (int, np.integer)) or min_area < 0:
        raise ValueError(f"min_area must be a non-negative integer (pixels), got {min_area!r}")


def predict_stack_iter(
    images: Iterable[Any] | np.ndarray,
    model: ModelLike = None,
    *,
    threshold: float | None = None,
    tta: bool | None = None,
    fill_holes: bool = False,
    keep: str = "all",
    min_area: int = 0,
    batch_size: int = 4,
    device: str | torch.device | None = None,
) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
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
    threshold, tta, fill_holes, keep, min_area, device
        As in :func:`predict_mask`.
    batch_size : int, optional
        Slices per forward pass (>= 1); results are still yielded one slice at a time.

    Yields
    ------
    index : int
        Position of the slice in ``images`` (0-based).
    mask : numpy.ndarray
        (H, W) bool.
    proba : numpy.ndarray
        (H, W) float32 in [0, 1].

    Raises
    ------
    ValueError
        As :func:`predict_mask` (raised when the offending slice is reached; inputs that
        are wrong as a whole raise on the first ``next()``), or for ``batch_size < 1``.
    """
    from busseg.postprocess import postprocess_mask

    model = _resolve_model(model)
    _check_device(model, device)
    cfg = _config(model)
    t = _resolve_threshold(threshold, cfg)
    use_tta = _resolve_tta(tta, cfg)
    _check_postprocess(keep, min_area)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
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
    post = fill_holes or keep != "all" or min_area > 0

    def emit(chunk: list[tuple[int, np.ndarray]]):
        probas = _predict_tensor([a for _, a in chunk], model, use_tta)
        for (i, _), p in zip(chunk, probas, strict=True):
            mask = (p >= t).cpu().numpy()
            if post:
                mask = postprocess_mask(mask, fill_holes=fill_holes, keep=keep, min_area=min_area)
            yield i, mask, p.to("cpu", torch.float32).numpy()

    chunk: list[tuple[int, np.ndarray]] = []
    for i, im in enumerate(images):
        chunk.append((i, _check_image(im, what=f"slice {i}")))
        if len(chunk) == batch_size:
            yield from emit(chunk)
            chunk = []
    if chunk:
        yield from emit(chunk)

