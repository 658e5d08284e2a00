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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "Prediction",
    "accepts_prompts",
    "apply_automatic_settings",
    "classify",
    "clear_model_cache",
    "describe_gate",
    "has_class_head",
    "load_model",
    "model_device",
    "predict",
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

    model, config = load_checkpoint(directory, device=device)
    if config.get("site"):  # a site checkpoint: adapted + base network (busseg.site)
        from busseg.site import load_site_model

        model = load_site_model(directory, model, config, device)
        model.busseg_config = config
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
        :func:`busseg.models.load_checkpoint` for a private copy. A site checkpoint
        (:mod:`busseg.site`: a network adapted to one hospital plus the one it came from)
        loads as one :class:`busseg.site.SiteModel` that routes automatic and prompted
        images to the right network.

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
    return _forward(batch, model, tta=tta, with_class=False)[0]


def _forward(batch: torch.Tensor, model: nn.Module, *, tta: bool, with_class: bool
             ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Logits (N, V, h, w) and, with ``with_class``, class probabilities (N, K) (view mean)."""
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


def _predict_tensor(
    images: Sequence[np.ndarray], model: nn.Module, tta: bool, prompts: Sequence | None = None,
    with_class: bool = False,
) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """Map validated arrays (and optional prompts) to probabilities on the model's device.

    Returns one ((H, W) probabilities, (K,) class probabilities or None) per image.
    """
    from busseg.prompts import DEFAULT_CLICK_RADIUS, render_guidance

    cfg = _config(model)
    prep = cfg.get("preprocessing", {})
    multiple = _multiple(model, cfg)
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
        groups = [(_forward(torch.cat(xs), model, tta=tta, with_class=with_class),
                   list(range(len(xs))))]
    else:
        groups = [(_forward(x, model, tta=tta, with_class=with_class), [i])
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


def predict_proba(
    image: Any,
    model: ModelLike = None,
    *,
    device: str | torch.device | None = None,
    tta: bool | None = None,
    boxes: Any = None,
    points: Any = None,
    point_labels: Any = None,
    previous_mask: Any = None,
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

    Raises
    ------
    ValueError
        If the image is not 2D grey / RGB / RGBA, is empty or holds NaN / infinity; if the
        model has no checkpoint config; if ``device`` is not the model's device; if prompts
        are malformed (outside the image, an empty box, lengths that differ) or given to a
        model that does not take them.
    busseg.models.CheckpointError
        If ``model`` is a path (or ``None``) and the checkpoint cannot be loaded.
    """
    model, arr, cfg = _prepare(image, model, device)
    pr = _prompts(model, arr, boxes, points, point_labels, previous_mask)
    proba = _predict_tensor([arr], model, _resolve_tta(tta, cfg), [pr])[0][0]
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


def _class_dict(model: nn.Module, probs: torch.Tensor) -> dict:
    from busseg.models import CLASS_NAMES

    names = list(_config(model).get("classes", CLASS_NAMES))
    values = probs.to("cpu", torch.float64).tolist()
    return {name: float(v) for name, v in zip(names, values, strict=True)}


def _resolve_gate(normal_gate: Any, cfg: Mapping[str, Any]) -> dict | None:
    """Return the gate {"p_normal": t, "lesion_confidence": c} to apply, or None."""
    stored = cfg.get("inference", {}).get("normal_gate")
    if normal_gate is None or normal_gate is False:
        return None
    if isinstance(normal_gate, str):
        if normal_gate != "auto":
            raise ValueError(f"normal_gate must be 'auto', None or a probability in (0, 1], "
                             f"got {normal_gate!r}")
        return dict(stored) if stored else None
    try:
        t = float(normal_gate)
    except (TypeError, ValueError):
        raise ValueError(f"normal_gate must be 'auto', None or a probability in (0, 1], got "
                         f"{normal_gate!r}") from None
    if not 0.0 < t <= 1.0:
        raise ValueError(f"normal_gate must be in (0, 1], got {normal_gate!r}")
    conf = (stored or {}).get("lesion_confidence", 1.0 + 1e-9)
    return {"p_normal": t, "lesion_confidence": conf}


def describe_gate(gate: Mapping[str, Any] | None) -> str:
    """Say in words what a normal-scan gate does (for the CLI, evaluate.py and model cards).

    Parameters
    ----------
    gate : mapping or None
        A checkpoint's ``inference.normal_gate``: ``{"p_normal": t, "lesion_confidence": c}``
        (``c`` >= 1 or absent: the lesion probabilities never protect a mask); None or empty
        for no gate.

    Returns
    -------
    str
        E.g. ``"mask emptied when P(normal) >= 0.95 and no pixel reaches lesion probability
        0.95"``; ``"none"`` without a gate.
    """
    if not gate:
        return "none"
    text = f"mask emptied when P(normal) >= {float(gate['p_normal']):.4g}"
    conf = gate.get("lesion_confidence")
    if conf is not None and float(conf) < 1.0:
        return text + f" and no pixel reaches lesion probability {float(conf):.4g}"
    return text + ", whatever the lesion probabilities"


def _apply_gate(mask: np.ndarray, proba: torch.Tensor, class_proba: dict | None,
                gate: dict | None) -> tuple[np.ndarray, bool]:
    """Empty the mask when the head says normal and no predicted pixel is confident."""
    if gate is None or class_proba is None or not mask.any():
        return mask, False
    if class_proba.get("normal", 0.0) < float(gate["p_normal"]):
        return mask, False
    if float(proba.max()) >= float(gate.get("lesion_confidence", 1.0 + 1e-9)):
        return mask, False
    return np.zeros_like(mask), True



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
    boxes: Any = None,
    points: Any = None,
    point_labels: Any = None,
    previous_mask: Any = None,
    normal_gate: Any = "auto",
    box_margin: float = 0.1,
    region_filter: Any = "auto",
) -> np.ndarray:
    """Binary lesion mask at the image's original size (see :func:`predict` for all outputs).

    Parameters
    ----------
    image, model, threshold, tta, fill_holes, keep, min_area, device, boxes, points,
    point_labels, previous_mask, normal_gate, box_margin, region_filter
        As in :func:`predict`.

    Returns
    -------
    numpy.ndarray
        (H, W) bool, True = lesion.

    Raises
    ------
    ValueError, busseg.models.CheckpointError
        As :func:`predict`.
    """
    return predict(image, model, threshold=threshold, tta=tta, fill_holes=fill_holes,
                   keep=keep, min_area=min_area, device=device, boxes=boxes, points=points,
                   point_labels=point_labels, previous_mask=previous_mask,
                   normal_gate=normal_gate, box_margin=box_margin,
                   region_filter=region_filter).mask


def classify(
    image: Any,
    model: ModelLike = None,
    *,
    tta: bool | None = None,
    device: str | torch.device | None = None,
) -> dict:
    """Image-level class probabilities from the model's class head.

    Parameters
    ----------
    image : numpy.ndarray
        As for :func:`predict_mask`.
    model : torch.nn.Module or str or os.PathLike or None, optional
        A model with a class head (:func:`has_class_head`), a checkpoint path, or ``None``
        (the default model).
    tta : bool or None, optional
        Average over the image and its mirror image; ``None`` uses the checkpoint setting.
    device : str or torch.device or None, optional
        See :func:`predict_proba`.

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
    busseg.models.CheckpointError
        If ``model`` is a path (or ``None``) and the checkpoint cannot be loaded.
    """
    model, arr, cfg = _prepare(image, model, device)
    if not has_class_head(model):
        raise ValueError(
            "this checkpoint has no lesion class head; use the shipped default model "
            "(busseg.load_model()) or one trained with `train.py --class-head`")
    _, class_proba = _predict_tensor([arr], model, _resolve_tta(tta, cfg), with_class=True)[0]
    return _class_dict(model, class_proba)


def predict(
    image: Any,
    model: ModelLike = None,
    *,
    threshold: float | None = None,
    tta: bool | None = None,
    fill_holes: bool = False,
    keep: str = "all",
    min_area: int = 0,
    device: str | torch.device | None = None,
    boxes: Any = None,
    points: Any = None,
    point_labels: Any = None,
    previous_mask: Any = None,
    normal_gate: Any = "auto",
    box_margin: float = 0.1,
    region_filter: Any = "auto",
) -> Prediction:
    """Mask, probabilities and class probabilities of one image from one forward pass.

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
    boxes, points, point_labels, previous_mask : optional
        Prompts, as in :func:`predict_proba`. With boxes, the mask is restricted to the boxes
        (each grown by ``box_margin``).
    normal_gate : "auto" or None or float, optional
        The normal-scan gate of a model with a class head: in automatic mode (no prompts),
        the mask is emptied when P(normal) >= the gate's ``p_normal`` *and* no pixel's
        lesion probability reaches its ``lesion_confidence``, so the class head alone
        cannot silence a confident lesion. ``"auto"`` (default) uses the gate chosen on the
        validation split and stored in the checkpoint's ``inference.normal_gate`` (none
        stored: no gate); ``None`` switches it off; a float in (0, 1] sets ``p_normal``
        (keeping the stored ``lesion_confidence``). Ignored for models without a head.
    box_margin : float, optional
        Share of a box's side by which the mask may extend past it (>= 0), for boxes drawn
        a little too tight.
    region_filter : "auto" or None or False or busseg.region_filter.RegionFilter, optional
        The region filter (:mod:`busseg.region_filter`), applied after the gate in automatic
        mode only (never to a prompted mask): connected components of the mask that its
        classifier finds unlikely to be lesions are removed. ``"auto"`` (default) uses the
        checkpoint's ``inference.region_filter`` (none stored: no filter, as before); None
        or False switch it off; a :class:`~busseg.region_filter.RegionFilter` (or its
        ``to_dict()``) is used as given.

    Returns
    -------
    Prediction
        ``mask`` (H, W) bool, ``proba`` (H, W) float32, ``class_proba`` dict or None,
        ``gated`` bool, ``regions_removed`` int.

    Raises
    ------
    ValueError
        As :func:`predict_proba`; also for a threshold outside (0, 1), invalid
        post-processing options, a bad ``normal_gate``, a bad ``region_filter`` (or an
        invalid stored one) or a negative ``box_margin``.
    busseg.models.CheckpointError
        If ``model`` is a path (or ``None``) and the checkpoint cannot be loaded.
    """
    from busseg.postprocess import postprocess_mask
    from busseg.prompts import box_mask

    model, arr, cfg = _prepare(image, model, device)
    t = _resolve_threshold(threshold, cfg)
    _check_postprocess(keep, min_area)
    gate = _resolve_gate(normal_gate, cfg)
    rfilter = _resolve_filter(region_filter, cfg)
    if not (isinstance(box_margin, (int, float)) and box_margin >= 0):
        raise ValueError(f"box_margin must be a number >= 0, got {box_margin!r}")
    pr = _prompts(model, arr, boxes, points, point_labels, previous_mask)
    with_class = has_class_head(model)
    proba, class_proba = _predict_tensor([arr], model, _resolve_tta(tta, cfg), [pr],
                                         with_class=with_class)[0]
    mask = (proba >= t).cpu().numpy()
    if pr is not None and len(pr.boxes):
        mask &= box_mask(pr.boxes, mask.shape, box_margin)
    if fill_holes or keep != "all" or min_area > 0:
        mask = postprocess_mask(mask, fill_holes=fill_holes, keep=keep, min_area=min_area)
    classes = _class_dict(model, class_proba) if class_proba is not None else None
    gated, removed = False, 0
    proba_np = proba.to("cpu", torch.float32).numpy()
    if pr is None or pr.empty:
        mask, gated = _apply_gate(mask, proba, classes, gate)
        mask, removed = _apply_filter(mask, proba_np, arr, classes, rfilter)
    return Prediction(mask, proba_np, classes, gated, removed)


def apply_automatic_settings(raw: Prediction, image: Any, model: ModelLike = None, *,
                             normal_gate: Any = "auto", region_filter: Any = "auto"
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
    normal_gate, region_filter
        As :func:`predict`.

    Returns
    -------
    numpy.ndarray
        (H, W) bool mask.

    Raises
    ------
    ValueError
        As :func:`predict` for a bad gate or filter.
    """
    model = _resolve_model(model)
    cfg = _config(model)
    gate = _resolve_gate(normal_gate, cfg)
    rfilter = _resolve_filter(region_filter, cfg)
    arr = _check_image(image)
    mask, _ = _apply_gate(np.asarray(raw.mask, bool), torch.from_numpy(raw.proba),
                          raw.class_proba, gate)
    mask, _ = _apply_filter(mask, raw.proba, arr, raw.class_proba, rfilter)
    return mask


def _resolve_filter(region_filter: Any, cfg: Mapping[str, Any]):
    """Return the RegionFilter to apply, or None (see :func:`predict`)."""
    from busseg.region_filter import resolve_filter

    return resolve_filter(region_filter, cfg)


def _apply_filter(mask: np.ndarray, proba: np.ndarray, image: np.ndarray,
                  classes: dict | None, rfilter) -> tuple[np.ndarray, int]:
    """Remove the components the region filter rejects: (mask, number removed)."""
    if rfilter is None or not mask.any():
        return mask, 0
    res = rfilter.apply(mask, proba, image, classes)
    return res.mask, res.removed


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
    normal_gate: Any = "auto",
    with_class: bool = False,
    region_filter: Any = "auto",
    with_info: bool = False,
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
    threshold, tta, fill_holes, keep, min_area, device
        As in :func:`predict_mask`.
    batch_size : int, optional
        Slices per forward pass (>= 1); results are still yielded one slice at a time.
    normal_gate : "auto" or None or float, optional
        The normal-scan gate, as in :func:`predict`.
    with_class : bool, optional
        Also yield the class probabilities (a dict, or None without a class head) as a
        fourth item.
    region_filter : "auto" or None or False or RegionFilter, optional
        The region filter, as in :func:`predict` (applied after the gate).
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
    gate = _resolve_gate(normal_gate, cfg)
    rfilter = _resolve_filter(region_filter, cfg)
    head = has_class_head(model)

    def emit(chunk: list[tuple[int, np.ndarray]]):
        results = _predict_tensor([a for _, a in chunk], model, use_tta, with_class=head)
        for (i, arr), (p, cp) in zip(chunk, results, strict=True):
            mask = (p >= t).cpu().numpy()
            if post:
                mask = postprocess_mask(mask, fill_holes=fill_holes, keep=keep, min_area=min_area)
            classes = _class_dict(model, cp) if cp is not None else None
            mask, gated = _apply_gate(mask, p, classes, gate)
            p_np = p.to("cpu", torch.float32).numpy()
            mask, removed = _apply_filter(mask, p_np, arr, classes, rfilter)
            out = (i, mask, p_np)
            if with_class:
                out = (*out, classes)
            if with_info:
                out = (*out, {"gated": bool(gated), "regions_removed": int(removed)})
            yield out

    chunk: list[tuple[int, np.ndarray]] = []
    for i, im in enumerate(images):
        chunk.append((i, _check_image(im, what=f"slice {i}")))
        if len(chunk) == batch_size:
            yield from emit(chunk)
            chunk = []
    if chunk:
        yield from emit(chunk)

