"""What the ``busseg`` sub-commands share: exit statuses, errors and the inference options."""

from __future__ import annotations

import argparse
import sys

from busseg.settings import InferenceSettings

EXIT_OK, EXIT_PARTIAL, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


class UsageError(Exception):
    """An error the user can fix; printed without a traceback, exit status 2."""


def print_error(msg: str) -> None:
    """Print ``busseg: error: MSG`` to stderr."""
    print(f"busseg: error: {msg}", file=sys.stderr)


def no_progress_bar(args: argparse.Namespace) -> bool:
    """No progress bar with ``--no-progress`` or when stderr is not a terminal (a log, a pipe)."""
    if getattr(args, "no_progress", False):
        return True
    try:
        return not sys.stderr.isatty()
    except (AttributeError, ValueError):  # closed or replaced stream
        return True


def probability_arg(text: str) -> float:
    """Parse a command-line probability in (0, 1) (argparse ``type`` of ``--threshold``)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1), got {text}")
    return value


def add_inference_args(p: argparse.ArgumentParser) -> None:
    """Add the options that reach predict_mask (device, threshold, flips, post-processing, gate).

    Shared by ``busseg predict`` and ``training/evaluate.py``; the values arrive as
    ``device``, ``threshold`` (None: the checkpoint's), ``tta`` (None: the checkpoint's),
    ``fill_holes``, ``keep``, ``min_area``, ``no_gate`` (True: ``normal_gate=None``) and
    ``no_region_filter`` (True: ``region_filter=None``).
    """
    p.add_argument("--device", default="auto", help="auto (default), cuda, cuda:N, mps or cpu")
    p.add_argument(
        "--threshold", type=probability_arg, default=None, metavar="T",
        help="probability threshold in (0, 1) (default: the checkpoint's)",
    )
    tta = p.add_mutually_exclusive_group()
    tta.add_argument("--tta", dest="tta", action="store_true", default=None,
                     help="average with the left-right flipped image (2x slower)")
    tta.add_argument("--no-tta", dest="tta", action="store_false",
                     help="no test-time flips (default: the checkpoint's setting)")
    p.add_argument("--fill-holes", action="store_true", help="fill holes in predicted lesions")
    p.add_argument("--keep", choices=("all", "largest"), default="all",
                   help="keep all lesions (default) or only the largest")
    p.add_argument("--min-area", type=non_negative_int, default=0, metavar="PX",
                   help="drop predicted lesions smaller than PX pixels (default 0)")
    p.add_argument("--no-gate", action="store_true",
                   help="switch the normal-scan gate off (models with a class head: by default "
                   "a mask is emptied when P(normal) and the lesion probabilities say normal, "
                   "as stored in the checkpoint)")
    p.add_argument("--no-region-filter", action="store_true",
                   help="switch the region filter off (by default regions of the automatic mask "
                   "that the checkpoint's filter finds unlikely to be lesions are removed; "
                   "see `busseg info`)")


def inference_settings(args: argparse.Namespace) -> InferenceSettings:
    """Return the :class:`~busseg.settings.InferenceSettings` of the inference options.

    Parameters
    ----------
    args : argparse.Namespace
        Parsed with :func:`add_inference_args`.

    Returns
    -------
    busseg.settings.InferenceSettings
        ``device`` included (where the command loads its model).
    """
    return InferenceSettings(
        threshold=args.threshold, tta=args.tta, fill_holes=args.fill_holes, keep=args.keep,
        min_area=args.min_area, device=args.device,
        normal_gate=None if args.no_gate else "auto",
        region_filter=None if args.no_region_filter else "auto")


def non_negative_int(text: str) -> int:
    """Parse a command-line integer >= 0 (argparse ``type`` of ``--min-area``)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def _setting_status(stored: dict | None, off: bool, option: str, describe) -> str:
    """``off (OPTION)``, ``none stored in the checkpoint`` or ``on (<describe(stored)>)``."""
    if off:
        return f"off ({option})"
    if not stored:
        return "none stored in the checkpoint"
    return f"on ({describe(stored)})"


def gate_status(gate: dict | None, off: bool) -> str:
    """Describe the normal-scan gate a run applies (``busseg predict``, ``info``, evaluate.py).

    Parameters
    ----------
    gate : dict or None
        The checkpoint's ``inference.normal_gate``.
    off : bool
        True when ``--no-gate`` switched it off.

    Returns
    -------
    str
        ``"off (--no-gate)"``, ``"none stored in the checkpoint"`` or ``"on (<rule>)"`` with
        the rule of :func:`busseg.inference.describe_gate`.
    """
    from busseg.inference import describe_gate

    return _setting_status(gate, off, "--no-gate", describe_gate)


def filter_status(spec: dict | None, off: bool) -> str:
    """Describe the region filter a run applies, as :func:`gate_status` describes the gate.

    ``spec`` is the checkpoint's ``inference.region_filter`` (dict or None) and ``off`` is True
    when ``--no-region-filter`` switched it off. Returns ``"off (--no-region-filter)"``,
    ``"none stored in the checkpoint"``, ``"on (<rule>)"`` with the rule of
    :func:`busseg.region_filter.describe_filter`, or ``"invalid (<why>)"`` for a filter that
    does not validate.
    """
    from busseg.region_filter import describe_filter

    try:
        return _setting_status(spec, off, "--no-region-filter", describe_filter)
    except ValueError as exc:
        return f"invalid ({exc})"


def load_cli_model(checkpoint: str | None, device: str):
    """Load the model a command runs with, turning a bad checkpoint or device into a UsageError.

    Parameters
    ----------
    checkpoint : str or None
        ``--checkpoint``: a checkpoint folder, or None for the shipped default model.
    device : str
        ``--device``: ``auto``, ``cuda``, ``cuda:N``, ``mps`` or ``cpu``.

    Returns
    -------
    torch.nn.Module
        The model from :func:`busseg.inference.load_model` (cached).

    Raises
    ------
    UsageError
        If the checkpoint cannot be loaded or the device is not available.
    """
    from busseg.inference import load_model
    from busseg.models import CheckpointError

    try:
        return load_model(checkpoint, device=device)
    except (CheckpointError, ValueError) as exc:
        raise UsageError(str(exc)) from None
