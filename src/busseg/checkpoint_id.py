"""A checkpoint's folder and identity, without torch.

A busseg checkpoint is a folder holding ``config.json`` and ``model.safetensors``
(:func:`busseg.models.save_checkpoint`). Its identity is the resolved folder plus the
modification time (ns), size and inode of both files: a checkpoint rewritten in place (a
fine-tune saved over it) gets a new identity. :func:`busseg.inference.load_model` caches
models by it, :func:`busseg.uncertainty.checkpoint_key` caches scores by it and the annotation
session (:mod:`busseg.session`) keys its prefetched predictions by it.

This module imports neither torch nor :mod:`busseg.models`, so the GUI thread can compute an
identity before torch is loaded.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = [
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "checkpoint_dir",
    "checkpoint_identity",
    "default_checkpoint_dir",
    "files_key",
]

WEIGHTS_NAME = "model.safetensors"
"""File name of a checkpoint's weights (the same as ``busseg.models.checkpoint``'s)."""
CONFIG_NAME = "config.json"
"""File name of a checkpoint's config (the same as ``busseg.models.checkpoint``'s)."""


def default_checkpoint_dir() -> Path:
    """Return the folder of the shipped default model.

    The same folder as :func:`busseg.models.default_checkpoint_path`, without importing torch.

    Returns
    -------
    pathlib.Path
        ``<busseg package>/weights/default`` (it may not exist).
    """
    return Path(__file__).parent / "weights" / "default"


def checkpoint_dir(path: str | os.PathLike | None) -> Path:
    """Return the resolved folder of a checkpoint.

    Parameters
    ----------
    path : str or os.PathLike or None
        A checkpoint folder, either of its two files (``config.json``, ``model.safetensors``)
        or None for the shipped default model.

    Returns
    -------
    pathlib.Path
        The folder, resolved (symbolic links followed); unresolved where the path cannot be
        resolved (loading it then says why).
    """
    p = default_checkpoint_dir() if path is None else Path(path).expanduser()
    if p.name in (CONFIG_NAME, WEIGHTS_NAME) and not p.is_dir():
        p = p.parent
    try:
        return p.resolve()
    except OSError:  # pragma: no cover - unreadable path; loading reports it
        return p


def files_key(directory: str | os.PathLike, *, explain: bool = False) -> tuple:
    """Return ``(mtime_ns, size, inode)`` of a checkpoint folder's config and weights files.

    Parameters
    ----------
    directory : str or os.PathLike
        A checkpoint folder (see :func:`checkpoint_dir`).
    explain : bool, optional
        Where a file is missing, raise :class:`busseg.models.CheckpointError` saying what
        is missing and what to do (this imports torch) instead of the bare ``OSError``.

    Returns
    -------
    tuple
        ``((mtime_ns, size, inode) of config.json, (mtime_ns, size, inode) of
        model.safetensors)``, integers.

    Raises
    ------
    OSError
        If either file is missing or unreadable (``explain=False``).
    busseg.models.CheckpointError
        If either file is missing (``explain=True``).
    """
    directory = Path(directory)
    try:
        stats = [os.stat(directory / n) for n in (CONFIG_NAME, WEIGHTS_NAME)]
    except OSError:
        if explain:
            from busseg.models import read_checkpoint_config

            read_checkpoint_config(directory)  # raises CheckpointError saying what is missing
        raise
    return tuple((s.st_mtime_ns, s.st_size, s.st_ino) for s in stats)


def checkpoint_identity(path: str | os.PathLike | None, *, explain: bool = False) -> tuple:
    """Return a checkpoint's identity: its resolved folder and its files' key.

    Parameters
    ----------
    path : str or os.PathLike or None
        As :func:`checkpoint_dir`.
    explain : bool, optional
        As :func:`files_key`.

    Returns
    -------
    tuple
        ``(folder as str, files_key(folder))``: the key :func:`busseg.inference.load_model`
        caches models by.

    Raises
    ------
    OSError, busseg.models.CheckpointError
        As :func:`files_key`.
    """
    directory = checkpoint_dir(path)
    return (str(directory), files_key(directory, explain=explain))
