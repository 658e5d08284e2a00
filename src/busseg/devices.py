"""One device helper for the whole package: auto picks cuda, then mps, then cpu."""

from __future__ import annotations

import torch

__all__ = ["available_devices", "get_device"]

_KINDS = ("cuda", "mps", "cpu")


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    if backend is None:
        return False
    try:
        return bool(backend.is_available())
    except Exception:  # pragma: no cover - defensive, old or odd builds
        return False


def available_devices() -> list[str]:
    """List the torch devices usable on this machine.

    Returns
    -------
    list of str
        Device names in order of preference: ``"cuda:0"``, ``"cuda:1"``, ... for each
        visible CUDA GPU, then ``"mps"`` on Apple silicon, then always ``"cpu"``.
    """
    names: list[str] = []
    if torch.cuda.is_available():
        names.extend(f"cuda:{i}" for i in range(torch.cuda.device_count()))
    if _mps_available():
        names.append("mps")
    names.append("cpu")
    return names


def get_device(name: str | torch.device | None = "auto") -> torch.device:
    """Resolve a device name to a :class:`torch.device`, checking that it exists.

    Parameters
    ----------
    name : str or torch.device or None, optional
        ``"auto"`` (default; ``None`` means the same) picks ``cuda`` if a CUDA GPU is
        visible, else ``mps`` if available, else ``cpu``. Explicit names are ``"cuda"``,
        ``"cuda:<index>"`` (e.g. ``"cuda:1"``), ``"mps"`` and ``"cpu"``; case and
        surrounding whitespace are ignored. A :class:`torch.device` is checked the same way.

    Returns
    -------
    torch.device
        The resolved device.

    Raises
    ------
    ValueError
        If the name is not one of the forms above, or the requested device is not present
        on this machine; the message names the devices that are available.
    """
    if name is None:
        name = "auto"
    if isinstance(name, torch.device):
        name = str(name)
    if not isinstance(name, str):
        raise ValueError(
            f"device must be a string such as 'auto', 'cuda', 'cuda:1', 'mps' or 'cpu', "
            f"got {name!r} of type {type(name).__name__}"
        )
    key = name.strip().lower()
    available = available_devices()

    if key == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")

    kind, _, index = key.partition(":")
    if kind not in _KINDS or (index and not index.isdigit()) or (index and kind != "cuda"):
        raise ValueError(
            f"Unknown device {name!r}: use 'auto', 'cuda', 'cuda:<index>', 'mps' or 'cpu'. "
            f"Available on this machine: {', '.join(available)}."
        )

    if kind == "cpu":
        return torch.device("cpu")
    if kind == "mps":
        if not _mps_available():
            raise ValueError(
                f"Device 'mps' is not available on this machine. Available: {', '.join(available)}."
            )
        return torch.device("mps")
    # cuda
    if not torch.cuda.is_available():
        raise ValueError(
            f"Device {name!r} is not available: no CUDA GPU is visible. "
            f"Available: {', '.join(available)}."
        )
    if index:
        i = int(index)
        count = torch.cuda.device_count()
        if i >= count:
            raise ValueError(
                f"Device {name!r} is not available: {count} CUDA device(s) visible. "
                f"Available: {', '.join(available)}."
            )
        return torch.device("cuda", i)
    return torch.device("cuda")
