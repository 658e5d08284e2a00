"""``busseg info``: the version, the devices and a checkpoint's model card."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from busseg.cli.common import EXIT_OK, UsageError, filter_status, gate_status


def add_info_parser(sub) -> None:
    """Add the ``info`` sub-command to the ``busseg`` parser's sub-parsers ``sub``."""
    i = sub.add_parser("info", help="print the version, devices and the model card summary")
    i.add_argument("--checkpoint", metavar="CKPT", default=None,
                   help="describe this checkpoint instead of the default model")


def _count_parameters(weights: Path) -> int | None:
    try:
        from safetensors import safe_open

        n = 0
        with safe_open(str(weights), framework="numpy") as fh:
            for key in fh.keys():
                if key.rsplit(".", 1)[-1] in ("running_mean", "running_var", "num_batches_tracked"):
                    continue
                size = 1
                for s in fh.get_slice(key).get_shape():
                    size *= int(s)
                n += size
        return n
    except Exception:  # noqa: BLE001 - informational only
        return None


def _fmt_value(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def model_card_lines(path: str | os.PathLike | None) -> list[str]:
    """Summarise a checkpoint's config as text lines (no torch model is built).

    Parameters
    ----------
    path : str or os.PathLike or None
        Checkpoint directory, or None for the shipped default model.

    Returns
    -------
    list of str
        Path, architecture, parameter count, preprocessing, inference settings (with the
        normal-scan gate), whether the model has a class head and takes prompts, training
        data and metrics, and the model card's test-split figures where it has them (lesion
        Dice, false-positive rate on normal images with the gate on and off, class-head AUCs
        with 95 % CIs).

    Raises
    ------
    busseg.models.CheckpointError
        If the checkpoint is missing or invalid.
    """
    from busseg.models import default_checkpoint_path, read_checkpoint_config
    from busseg.models.checkpoint import WEIGHTS_NAME

    directory = Path(path).expanduser() if path is not None else default_checkpoint_path()
    if directory.is_file():
        directory = directory.parent
    cfg = read_checkpoint_config(directory)
    m, prep, inf = cfg["model"], cfg["preprocessing"], cfg["inference"]
    tr, metrics, lineage = cfg.get("training", {}), cfg.get("metrics", {}), cfg.get("lineage", {})
    n_params = _count_parameters(directory / WEIGHTS_NAME)
    size = prep.get("input_size")
    lines = [
        f"checkpoint: {directory.resolve()}",
        f"  written by busseg {cfg.get('busseg_version', '?')} (format {cfg['format_version']})",
        f"  model: {m.get('arch', 'unet')}, {m.get('encoder', 'plain')} encoder, base "
        f"{m.get('base_channels')} channels, depth {m.get('depth')}"
        + (f", {n_params / 1e6:.2f} M parameters" if n_params else ""),
        f"  input: {'native size' if size is None else f'{size[0]} x {size[1]} (h x w)'}, grey, "
        f"{prep.get('normalize', 'zscore')}",
        f"  inference: threshold {inf.get('threshold')}, TTA flips "
        f"{'on' if inf.get('tta_flips') else 'off'}"
        + (f", normal-scan gate {gate_status(cfg.get('inference', {}).get('normal_gate'), False)}"
           if m.get("num_classes") else ""),
        f"  region filter (automatic masks only): "
        f"{filter_status(inf.get('region_filter'), False)}",
        "  class head: " + ("normal / benign / malignant (research output, not a diagnosis)"
                            if m.get("num_classes") else "none"),
        "  prompts: " + (f"boxes, clicks and previous mask ({int(m['in_channels']) - 1} "
                         "guidance channels)" if int(m.get("in_channels", 1)) > 1 else "none"),
    ]
    if tr:
        data = tr.get("data", "?")
        counts = tr.get("train_counts")
        lines.append(
            f"  trained on: {data}"
            + (f"; split {_shown_path(str(tr['split_file']), shipped=path is None)}"
               if tr.get("split_file") else "")
            + (f"; {tr['n_train']} train / {tr.get('n_val', '?')} val images" if "n_train" in tr
               else "")
            + (f" ({', '.join(f'{k} {v}' for k, v in counts.items())})" if counts else "")
        )
        if "best_epoch" in tr or "train_time_s" in tr:
            lines.append(
                f"  training: best epoch {tr.get('best_epoch', '?')}, "
                f"{_fmt_value(tr.get('train_time_s', '?'))} s on "
                f"{tr.get('hardware', {}).get('device', '?')}"
            )
    flat = {k: v for k, v in metrics.items() if isinstance(v, (int, float, str))}
    if flat:
        lines.append("  metrics: " + ", ".join(f"{k} {_fmt_value(v)}" for k, v in flat.items()))
    test = metrics.get("test")
    if isinstance(test, dict):
        parts = [f"{group} Dice {_fmt_value(row['dice'])} (n={row.get('n', '?')})"
                 for group, row in test.items()
                 if isinstance(row, dict) and isinstance(row.get("dice"), (int, float))]
        if parts:
            lines.append("  test split: " + ", ".join(parts))
        lines += _test_figures(test, metrics.get("test_class_head"))
        measured = metrics.get("test_settings")
        if isinstance(measured, dict) and (
                measured.get("normal_gate") != inf.get("normal_gate")
                or measured.get("region_filter") != inf.get("region_filter")):
            from busseg.inference import describe_gate
            from busseg.region_filter import describe_filter

            lines.append(
                "  (test figures measured with other settings: normal-scan gate "
                f"{describe_gate(measured.get('normal_gate'))}; region filter "
                f"{describe_filter(measured.get('region_filter'))})")
    if lineage.get("base_model"):
        base = _shown_path(str(lineage["base_model"]), shipped=path is None)
        if tr.get("kind") == "fine-tune":  # written by the Fine-tune widget / busseg.finetune
            lines.append(f"  fine-tuned from {base} on "
                         f"{len(lineage.get('pairs', []))} pair(s)")
        else:  # train.py --init
            lines.append(f"  initialised from {base}")
    return lines


def _shown_path(text: str, *, shipped: bool) -> str:
    """Format a path from a checkpoint's config for ``busseg info``.

    Paths of the machine that trained a model mean nothing elsewhere: an absolute path that
    does not exist here, or any absolute path in the shipped default model's config, is shown
    by its last two components (``runs/v2_main/best``). A path on this machine (a fine-tune
    of a local checkpoint) is shown as it is.
    """
    p = Path(text)
    if not p.is_absolute() or (not shipped and p.exists()):
        return text
    parts = [q for q in p.parts if q not in (p.anchor, "")]
    return "…/" + "/".join(parts[-2:]) if parts else text


def _ci_text(entry) -> str | None:
    """'0.85 [0.78, 0.91]' from {"auc": x, "ci95": [lo, hi]} (None if absent)."""
    if not isinstance(entry, dict) or not isinstance(entry.get("auc"), (int, float)):
        return None
    ci = entry.get("ci95") or [None, None]
    if all(isinstance(v, (int, float)) for v in ci):
        return f"{entry['auc']:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"
    return f"{entry['auc']:.3f}"


def _test_figures(test: dict, head) -> list[str]:
    """Format the card's headline test figures: lesion Dice, FP rate (gate on/off), AUCs."""
    parts = []
    lesion = test.get("lesion") if isinstance(test.get("lesion"), dict) else {}
    if isinstance(lesion.get("dice"), (int, float)):
        parts.append(f"lesion Dice {lesion['dice']:.3f}")
    normal = test.get("normal") if isinstance(test.get("normal"), dict) else {}
    if isinstance(normal.get("fp_rate"), (int, float)):
        text = f"FP rate on normal images {normal['fp_rate']:.2f}"
        if isinstance(normal.get("fp_rate_ungated"), (int, float)):
            text += f" with the gate ({normal['fp_rate_ungated']:.2f} without)"
        parts.append(text)
    lines = ["  test figures: " + ", ".join(parts)] if parts else []
    if isinstance(head, dict):
        aucs = [(name, _ci_text(head.get(key))) for name, key in (
            ("malignant vs benign", "auc_malignant_vs_benign"),
            ("lesion vs normal", "auc_lesion_vs_normal"))]
        aucs = [f"{name} {text}" for name, text in aucs if text]
        if aucs:
            lines.append("  class head AUC (test split, 95 % CI): " + ", ".join(aucs))
    return lines


def run_info(args: argparse.Namespace) -> int:
    """Run ``busseg info``: print the version, the devices and the model card; exit status."""
    import platform

    import torch

    from busseg import __version__
    from busseg.devices import available_devices, get_device
    from busseg.models import CheckpointError

    print(f"busseg {__version__} (torch {torch.__version__}, Python {platform.python_version()})")
    print(f"devices: {', '.join(available_devices())} (auto -> {get_device('auto')}); "
          f"CPU threads {torch.get_num_threads()}")
    try:
        lines = model_card_lines(args.checkpoint)
    except CheckpointError as exc:
        if args.checkpoint is not None:
            raise UsageError(str(exc)) from None
        print(f"default model: not installed. {exc}")
        return EXIT_OK
    if args.checkpoint is None:
        lines[0] = "default model " + lines[0]
    print("\n".join(lines))
    return EXIT_OK
