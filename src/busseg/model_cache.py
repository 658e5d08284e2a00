"""Loading checkpoints for inference, cached and shared, and reading what a loaded model says.

:func:`load_model` caches models by (checkpoint folder, its files' modification time, size and
inode, device) (:mod:`busseg.checkpoint_id`), so a checkpoint rewritten in place is reloaded.
Models returned here are shared: never train or modify them (the fine-tuning code loads its
own copy with :func:`busseg.models.load_checkpoint`). Everything here is re-exported by
:mod:`busseg.inference`.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from busseg.checkpoint_id import checkpoint_dir, files_key

__all__ = [
    "ModelLike",
    "clear_model_cache",
    "load_model",
    "model_config",
    "model_device",
    "model_multiple",
    "resolve_model",
]

ModelLike = nn.Module | str | os.PathLike | None


@functools.lru_cache(maxsize=8)
def _load_cached(directory: str, key: tuple, device: str) -> nn.Module:
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

    directory = checkpoint_dir(path)
    key = files_key(directory, explain=True)
    dev = get_device(device)
    return _load_cached(str(directory), key, str(dev))


def clear_model_cache() -> None:
    """Forget all models cached by :func:`load_model` (frees their memory once unused)."""
    _load_cached.cache_clear()


def resolve_model(model: ModelLike) -> nn.Module:
    """Turn a model argument of the inference functions into a model.

    Parameters
    ----------
    model : torch.nn.Module or str or os.PathLike or None
        A model (returned as is), a checkpoint path (loaded with :func:`load_model`), or None
        for the shipped default model.

    Returns
    -------
    torch.nn.Module

    Raises
    ------
    TypeError
        If ``model`` is none of these.
    busseg.models.CheckpointError
        If a checkpoint cannot be loaded.
    """
    if model is None or isinstance(model, (str, os.PathLike)):
        return load_model(model)
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"model must be a torch.nn.Module from busseg.load_model, a checkpoint path or "
            f"None (the default model), got {type(model).__name__}"
        )
    return model


def model_config(model: nn.Module) -> Mapping[str, Any]:
    """Return the checkpoint config a model carries (``model.busseg_config``).

    Parameters
    ----------
    model : torch.nn.Module
        A model from :func:`load_model` or :func:`busseg.models.load_checkpoint`.

    Returns
    -------
    mapping
        The checkpoint config (``preprocessing``, ``inference``, ``model`` ...).

    Raises
    ------
    ValueError
        If the model carries no config; the message says how to give it one.
    """
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


def model_multiple(model: nn.Module, cfg: Mapping[str, Any] | None = None) -> int:
    """Return the multiple a network's input height and width must be (its ``2 ** depth``).

    Parameters
    ----------
    model : torch.nn.Module
        A model; its ``required_multiple`` attribute is used where it has one.
    cfg : mapping or None, optional
        Its checkpoint config (default: :func:`model_config` of the model), whose ``model``
        section gives the multiple otherwise.

    Returns
    -------
    int
        Pixels, >= 1.
    """
    m = getattr(model, "required_multiple", None)
    if m is not None:
        return int(m)
    from busseg.models import required_multiple

    return required_multiple((model_config(model) if cfg is None else cfg).get("model"))
