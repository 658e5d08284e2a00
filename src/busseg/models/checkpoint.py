"""Self-describing checkpoints: a directory with ``model.safetensors`` and ``config.json``.

The weights are a flat safetensors file (no pickled code is ever loaded); ``config.json``
holds everything needed to rebuild the network with :func:`busseg.models.build_model` plus
the preprocessing, inference settings, training record, metrics and lineage. A checkpoint is
written to a temporary sibling directory and renamed into place, so it appears whole or
not at all.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from busseg.data.io import default_file_mode

from .atomic_dir import check_replaceable, fsync_path, write_dir_atomically

__all__ = [
    "CONFIG_NAME",
    "FORMAT",
    "FORMAT_VERSION",
    "WEIGHTS_NAME",
    "CheckpointError",
    "default_checkpoint_path",
    "load_checkpoint",
    "read_checkpoint_config",
    "save_checkpoint",
]

FORMAT = "busseg-checkpoint"
FORMAT_VERSION = 1
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
_REQUIRED_KEYS = ("format", "format_version", "model")
_MAX_LISTED = 8


def _default_sections() -> dict[str, Any]:
    return {
        "preprocessing": {"input_size": [256, 256], "grey": True, "normalize": "zscore"},
        "inference": {"threshold": 0.5, "tta_flips": False},
        "training": {},
        "metrics": {},
        "lineage": {"base_model": None, "pairs": []},
    }


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete, corrupt or does not match its architecture."""


def default_checkpoint_path() -> Path:
    """Return the directory of the shipped default model.

    Returns
    -------
    pathlib.Path
        ``<busseg package>/weights/default``. It may not exist (e.g. in a source checkout
        before training); :func:`load_checkpoint` then raises :class:`CheckpointError`
        explaining how to train one.
    """
    return Path(__file__).parent.parent / "weights" / "default"


def _listing(items: list[str]) -> str:
    shown = ", ".join(items[:_MAX_LISTED])
    if len(items) > _MAX_LISTED:
        shown += f", ... and {len(items) - _MAX_LISTED} more"
    return shown


def _is_default(path: Path) -> bool:
    try:
        return path.expanduser().resolve() == default_checkpoint_path().resolve()
    except OSError:  # pragma: no cover
        return False


def _missing_default_message(path: Path) -> str:
    return (
        f"The default busseg model is missing (expected a checkpoint directory at {path}). "
        "Train one with `python training/train.py` (see `python training/train.py --help`) "
        "and save or copy its checkpoint directory there, or pass the path of a checkpoint "
        "directory explicitly."
    )


def _resolve_dir(path: str | os.PathLike) -> Path:
    """Map a checkpoint directory or either of its files to the directory, checking both."""
    p = Path(path).expanduser()
    if p.is_file():
        if p.name not in (WEIGHTS_NAME, CONFIG_NAME):
            raise CheckpointError(
                f"{p} is not a busseg checkpoint: pass a checkpoint directory (holding "
                f"{WEIGHTS_NAME} and {CONFIG_NAME}) or one of those two files"
            )
        directory = p.parent
    elif p.is_dir():
        directory = p
    elif p.name in (WEIGHTS_NAME, CONFIG_NAME) and p.parent.is_dir():
        directory = p.parent
    else:
        if _is_default(p):
            raise CheckpointError(_missing_default_message(p))
        raise CheckpointError(
            f"checkpoint {p} does not exist; pass a directory written by "
            f"busseg.models.save_checkpoint (holding {WEIGHTS_NAME} and {CONFIG_NAME})"
        )
    missing = [n for n in (CONFIG_NAME, WEIGHTS_NAME) if not (directory / n).is_file()]
    if missing:
        if _is_default(directory):
            raise CheckpointError(_missing_default_message(directory))
        raise CheckpointError(
            f"checkpoint {directory} is incomplete: missing {' and '.join(missing)}. "
            f"A busseg checkpoint is a directory holding {WEIGHTS_NAME} and {CONFIG_NAME}, "
            "written by busseg.models.save_checkpoint."
        )
    return directory


def _validate_config(config: Any, source: Path) -> dict:
    if not isinstance(config, dict):
        raise CheckpointError(f"{source} must hold a JSON object, got {type(config).__name__}")
    missing = [k for k in _REQUIRED_KEYS if k not in config]
    if missing:
        raise CheckpointError(
            f"{source} is missing required key(s) {', '.join(map(repr, missing))}; "
            f"a busseg checkpoint config has 'format': {FORMAT!r}, 'format_version' and "
            "'model' (the architecture)"
        )
    if config["format"] != FORMAT:
        raise CheckpointError(
            f"{source} is not a busseg checkpoint: 'format' is {config['format']!r}, "
            f"expected {FORMAT!r}"
        )
    version = config["format_version"]
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise CheckpointError(
            f"{source} has an invalid 'format_version' {version!r}; expected a positive integer"
        )
    if version > FORMAT_VERSION:
        written_by = config.get("busseg_version", "a newer version")
        raise CheckpointError(
            f"{source} has format_version {version}, written by busseg {written_by}; this "
            f"busseg reads format_version up to {FORMAT_VERSION}. Upgrade napari-busseg to "
            "load it."
        )
    if not isinstance(config["model"], dict):
        raise CheckpointError(
            f"{source}: 'model' must be a JSON object describing the architecture, got "
            f"{type(config['model']).__name__}"
        )
    for key, value in _default_sections().items():
        config.setdefault(key, value)
    return config


def _read_config(directory: Path) -> dict:
    source = directory / CONFIG_NAME
    try:
        text = source.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"cannot read {source}: {exc}") from exc
    try:
        config = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CheckpointError(
            f"{source} is not valid JSON ({exc}); the checkpoint is corrupt or was edited by "
            "hand. Restore it or save the checkpoint again."
        ) from exc
    return _validate_config(config, source)


def read_checkpoint_config(path: str | os.PathLike) -> dict:
    """Read and validate a checkpoint's ``config.json`` without loading weights or torch models.

    Parameters
    ----------
    path : str or os.PathLike
        The checkpoint directory, or its ``config.json`` or ``model.safetensors``.

    Returns
    -------
    dict
        The config, with the optional sections (``preprocessing``, ``inference``,
        ``training``, ``metrics``, ``lineage``) filled with defaults where absent.

    Raises
    ------
    CheckpointError
        If the directory or either file is missing, the JSON is invalid, a required key
        (``format``, ``format_version``, ``model``) is missing, the format tag is wrong, or
        the format version is newer than this busseg reads.
    """
    return _read_config(_resolve_dir(path))


def _mismatch(expected: Mapping[str, torch.Size], got: Mapping[str, Any]) -> str | None:
    """Describe key and shape differences between two state dicts; ``None`` if they agree."""
    missing = [k for k in expected if k not in got]
    unexpected = [k for k in got if k not in expected]
    shapes = [
        f"{k} (checkpoint {tuple(got[k].shape)}, model {tuple(expected[k])})"
        for k in expected
        if k in got and tuple(got[k].shape) != tuple(expected[k])
    ]
    parts = []
    if missing:
        parts.append(f"missing keys: {_listing(missing)}")
    if unexpected:
        parts.append(f"unexpected keys: {_listing(unexpected)}")
    if shapes:
        parts.append(f"shape mismatches: {_listing(shapes)}")
    return "; ".join(parts) if parts else None


def load_checkpoint(
    path: str | os.PathLike | None, device: str | torch.device = "cpu"
) -> tuple[nn.Module, dict]:
    """Load a checkpoint written by :func:`save_checkpoint`.

    The model is rebuilt from ``config["model"]`` with :func:`busseg.models.build_model` and
    its weights are read with :func:`safetensors.torch.load_file`; nothing is unpickled.

    Parameters
    ----------
    path : str or os.PathLike or None
        The checkpoint directory, or its ``model.safetensors`` or ``config.json``. ``None``
        means :func:`default_checkpoint_path`.
    device : str or torch.device, optional
        Where to put the model: ``"cpu"`` (default), ``"cuda"``, ``"cuda:1"``, ``"mps"`` or
        ``"auto"`` (see :func:`busseg.devices.get_device`).

    Returns
    -------
    model : torch.nn.Module
        In eval mode on ``device``; maps (N, in_channels, H, W) float to logits
        (N, out_channels, H, W). ``model.busseg_config`` is the returned config.
    config : dict
        The checkpoint config (see ``docs/architecture.md``), optional sections filled with
        defaults.

    Raises
    ------
    CheckpointError
        If the checkpoint (or the default model) is missing or incomplete, ``config.json``
        is not JSON, lacks required keys, has the wrong format tag or a newer format
        version, its ``model`` section is invalid, ``model.safetensors`` is truncated or
        corrupt, or the weights' keys or shapes do not match the architecture (the message
        lists the keys).
    ValueError
        If ``device`` is unknown or not available.
    """
    from busseg.devices import get_device

    from . import build_model

    if path is None:
        path = default_checkpoint_path()
    directory = _resolve_dir(path)
    config = _read_config(directory)
    target = get_device(device)

    try:
        model = build_model(config["model"])
    except ValueError as exc:
        raise CheckpointError(
            f"{directory / CONFIG_NAME} has an invalid 'model' section: {exc}"
        ) from exc

    weights = directory / WEIGHTS_NAME
    try:
        state = load_file(str(weights), device="cpu")
    except Exception as exc:  # safetensors raises its own SafetensorError and others
        raise CheckpointError(
            f"{weights} is truncated or corrupt and cannot be read ({exc}). Re-copy the "
            "checkpoint or save it again."
        ) from exc

    expected = {k: v.shape for k, v in model.state_dict().items()}
    problem = _mismatch(expected, state)
    if problem:
        raise CheckpointError(
            f"the weights in {weights} do not match the architecture in "
            f"{directory / CONFIG_NAME} (model: {json.dumps(config['model'])}): {problem}. "
            "Was config.json edited, or the weights copied from another checkpoint?"
        )
    model.load_state_dict(state, strict=True)
    model.to(target)
    model.eval()
    model.busseg_config = config
    return model, config


def _json_default(obj: Any) -> Any:
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, torch.Tensor) and obj.numel() == 1:
        return obj.item()
    if hasattr(obj, "tolist"):  # numpy scalars and arrays
        return obj.tolist()
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    raise TypeError(f"object of type {type(obj).__name__} is not JSON serialisable")


def _structure_matches(model: nn.Module, model_config: dict) -> str | None:
    """Check that ``model``'s state dict fits ``build_model(model_config)``, cheaply."""
    from . import build_model

    try:
        with torch.device("meta"):
            reference = build_model(model_config)
    except Exception:  # pragma: no cover - torch without meta-device support
        reference = build_model(model_config)
    expected = {k: v.shape for k, v in reference.state_dict().items()}
    return _mismatch(expected, model.state_dict())


def _unwrap(model: nn.Module) -> nn.Module:
    """Strip DataParallel / DistributedDataParallel and ``torch.compile`` wrappers."""
    for _ in range(4):
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            break
    return model


def save_checkpoint(
    path: str | os.PathLike,
    model: nn.Module,
    config: Mapping[str, Any] | None = None,
    *,
    overwrite: bool = False,
) -> Path:
    """Save a model and its config as a checkpoint directory, atomically.

    Writes ``model.safetensors`` (the state dict, tensors contiguous and on the CPU) and
    ``config.json`` into a temporary sibling directory, then renames it to ``path``, so the
    checkpoint appears whole or not at all.

    Parameters
    ----------
    path : str or os.PathLike
        The checkpoint directory to create; its parent is created if needed.
    model : torch.nn.Module
        A model built by :func:`busseg.models.build_model` (any device, any mode; a
        ``DataParallel``, ``DistributedDataParallel`` or ``torch.compile`` wrapper is
        unwrapped).
    config : mapping or None, optional
        The checkpoint config (see ``docs/architecture.md``): ``model`` (architecture; taken
        from ``model.busseg_model_config`` if absent), ``preprocessing``, ``inference``,
        ``training``, ``metrics``, ``lineage``; other keys are kept. ``format``,
        ``format_version`` and ``busseg_version`` are set here. Absent optional sections get
        defaults (preprocessing ``input_size`` [256, 256], ``grey``, ``zscore``; inference
        ``threshold`` 0.5, no flips; empty training and metrics; no base model). Values must
        be JSON serialisable (paths, numpy scalars and arrays are converted). The caller's
        mapping is not modified. ``weights_dtype`` ("float32", default, or "float16") sets
        how floating-point tensors are stored: float16 halves the file (used for the shipped
        default, to stay under 10 MB); :func:`load_checkpoint` loads them into the float32
        model either way.
    overwrite : bool, optional
        If True and ``path`` is an existing checkpoint directory (or an empty directory),
        replace it: the old one is renamed aside, the new one renamed in, then the old one
        deleted (restored if the rename fails).

    Returns
    -------
    pathlib.Path
        The checkpoint directory.

    Raises
    ------
    FileExistsError
        If ``path`` exists and ``overwrite`` is False, or it exists and is not a busseg
        checkpoint directory (so nothing unrelated is ever deleted).
    ValueError
        If the model config is missing or invalid, does not match the model's weights, the
        config is not JSON serialisable, or ``weights_dtype`` is not float32 or float16.
    """
    model = _unwrap(model)
    path = Path(path).expanduser()
    if path.name in ("", ".", ".."):
        raise ValueError(f"invalid checkpoint path {str(path)!r}: give a directory name")
    text, weights_dtype = _config_text(model, config)
    check_replaceable(path, overwrite, CONFIG_NAME)
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    if weights_dtype == "float16":
        state = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}

    def write(tmp: Path) -> None:
        save_file(state, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        os.chmod(tmp / WEIGHTS_NAME, default_file_mode())  # safetensors writes 0600
        with open(tmp / CONFIG_NAME, "w", encoding="utf-8") as fh:
            fh.write(text + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        fsync_path(tmp / WEIGHTS_NAME)

    return write_dir_atomically(path, write, overwrite=overwrite, marker=CONFIG_NAME)


def _config_text(model: nn.Module, config: Mapping[str, Any] | None) -> tuple[str, str]:
    """Validate the model config against ``model``; return the config JSON and weights dtype."""
    from busseg import __version__

    from . import normalize_model_config

    cfg: dict[str, Any] = dict(config) if config is not None else {}  # top level only
    model_cfg = cfg.get("model")
    if model_cfg is None:
        model_cfg = getattr(model, "busseg_model_config", None)
        if model_cfg is None:
            raise ValueError(
                "no model config: pass config={'model': {...}} or a model built by "
                "busseg.models.build_model"
            )
    model_cfg = normalize_model_config(model_cfg)
    own = getattr(model, "busseg_model_config", None)
    if own is not None and normalize_model_config(own) != model_cfg:
        raise ValueError(f"config['model'] {model_cfg} does not match the model's own config {own}")
    problem = _structure_matches(model, model_cfg)
    if problem:
        raise ValueError(f"the model's weights do not match config['model'] {model_cfg}: {problem}")

    weights_dtype = cfg.get("weights_dtype", "float32")
    if weights_dtype not in ("float32", "float16"):
        raise ValueError(f"weights_dtype must be 'float32' or 'float16', got {weights_dtype!r}")
    for key in ("format", "format_version", "busseg_version", "model"):
        cfg.pop(key, None)
    out: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "busseg_version": __version__,
        "model": model_cfg,
    }
    for key, value in _default_sections().items():
        out[key] = cfg.pop(key, value)
    out.update(cfg)
    try:
        text = json.dumps(out, indent=2, default=_json_default, allow_nan=True)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"checkpoint config is not JSON serialisable: {exc}") from exc
    return text, weights_dtype
