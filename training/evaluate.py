"""Evaluate a checkpoint on a BUSI-layout dataset: per-image and per-class metrics at full size.

Examples
--------
    python training/evaluate.py --split test --out eval/default_test          # shipped model
    python training/evaluate.py --checkpoint runs/x/best --split val --out eval/x_val --tta
    python training/evaluate.py --data my_busi_like_folder --split all --out eval/mine
    python training/evaluate.py --busbra ../shared/data/busbra-fold1 --out eval/busbra

Each image is segmented with one forward pass of ``busseg.inference.predict`` (the
probabilities are computed at the network input size and resized back to the image's own
size) and thresholded at the checkpoint's threshold (or ``--threshold``); metrics come from
``busseg.metrics.segmentation_metrics`` against the union of the image's masks, at the
original resolution. Summaries are per class (benign, malignant, normal), for ``lesion``
(benign + malignant) and ``all``; for normal images (empty truth) the image-level
false-positive rate is reported (Metrics Reloaded conventions, see ``busseg.metrics``).

Models with an image-level class head (normal / benign / malignant):

- the normal-scan gate stored in the checkpoint (``inference.normal_gate``) is on, as in
  ``busseg predict``: the headline metrics are those of the gated masks; ``--no-gate``
  switches it off. With the gate on, the same forward pass also gives the ungated masks, so
  the FP rate on normal images and the lesion Dice are reported with the gate on and off,
  with the share of lesion images the gate empties and the median P(normal) on them;
- the checkpoint's region filter (``inference.region_filter``, :mod:`busseg.region_filter`)
  is on after the gate, as in ``busseg predict``; ``--no-region-filter`` switches it off.
  The "gate off" (ungated) figures are those of the thresholded mask, gate and filter off;
- the AUC of malignant vs benign on images with a lesion (score P(malignant) /
  (P(benign) + P(malignant))) and of lesion vs normal (score P(lesion) = 1 - P(normal)),
  with 95 % stratified bootstrap intervals (``busseg.metrics.roc_auc_ci``), and the
  calibration of P(lesion) (10-bin reliability diagram and expected calibration error,
  ``busseg.metrics.reliability_curve``). Research output, not a diagnosis.

``--busbra DIR`` evaluates every image of a BUS-BRA folder (``Images/``, ``Masks/``,
``bus_data.csv``; all images have a lesion, labels are the pathology) instead of BUSI.

With ``--out DIR`` it writes
    DIR/per_image.csv                   one row per image: metrics, pixel counts, seconds,
                                        class probabilities, gated, ungated Dice / any pixel
    DIR/summary.md, DIR/summary.json    per-class mean, std, median, 95 % bootstrap CI; gate;
                                        class-head AUCs and calibration
    DIR/reliability.png                 reliability diagram of P(lesion) (class head only)
    DIR/predictions/<class>/<stem>_mask.png   predicted masks (0/255, original size)
    DIR/overlays/<class>/<stem>.png     grey image, truth contour green, prediction red
                                        (yellow where they coincide)
DIR must not exist or be empty, unless --overwrite (which replaces files of the same names
and leaves others). Without --out only the Markdown summary is printed.

The split file's ``test`` rows are for the final report only: never tune on them.
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import io
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "src") not in sys.path:
    sys.path.insert(0, str(ROOT / "src"))

from busseg.cli import (  # noqa: E402  (shared with busseg predict)
    UsageError,
    add_inference_args,
    filter_status,
    gate_status,
    load_cli_model,
)
from busseg.cli.common import inference_settings  # noqa: E402
from busseg.settings import InferenceSettings  # noqa: E402

CSV_COLUMNS = (
    "image", "label", "height", "width", "dice", "iou", "precision", "recall", "accuracy",
    "hd95", "tp", "fp", "fn", "tn", "pred_area", "true_area", "any_pred", "seconds",
    "p_normal", "p_benign", "p_malignant", "gated", "dice_ungated", "any_pred_ungated",
)
CLASS_NAMES = ("normal", "benign", "malignant")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--checkpoint", default=None,
                    help="checkpoint directory (default: the shipped default model)")
    ap.add_argument("--data", default=str(ROOT.parent / "shared/data/busi/Dataset_BUSI_with_GT"),
                    help="BUSI-layout dataset root (Dataset_BUSI_with_GT, a class folder, or any "
                         "folder of <name>.png with <name>_mask*.png)")
    ap.add_argument("--split", default="test", choices=["train", "val", "test", "all"],
                    help="which rows of --split-file to evaluate; 'all' = every usable image of "
                         "--data, no split file needed (default: test)")
    ap.add_argument("--split-file", default=str(ROOT / "training/splits/busi.csv"),
                    help="split CSV (columns image,label,group,split)")
    ap.add_argument("--busbra", default=None, metavar="DIR",
                    help="evaluate every image of this BUS-BRA folder (Images/, Masks/, "
                         "bus_data.csv) instead of BUSI; --data, --split and --split-file "
                         "are then ignored")
    ap.add_argument("--out", default=None, help="output folder (must not exist or be empty)")
    ap.add_argument("--overwrite", action="store_true",
                    help="write into a non-empty --out, replacing files of the same names")
    add_inference_args(ap)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--limit", type=int, default=None, help="only the first N images (smoke tests)")
    ap.add_argument("--n-boot", type=int, default=2000,
                    help="bootstrap resamples of the confidence intervals (default 2000)")
    ap.add_argument("--no-overlays", action="store_true", help="skip the overlay PNGs")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    return ap


def select_records(data: str, split: str, split_file: str):
    """The usable records to evaluate and the dataset index."""
    from busseg.data.discover import discover
    from busseg.data.splits import read_split_csv, select_split

    try:
        index = discover(data)
    except (FileNotFoundError, ValueError) as exc:
        raise UsageError(str(exc)) from None
    if split == "all":
        return index.usable, index
    if not Path(split_file).is_file():
        raise UsageError(f"split file {split_file} not found; pass --split-file, or --split all")
    try:
        rows = read_split_csv(split_file)
        records = select_split(index, rows, split)
    except ValueError as exc:
        raise UsageError(f"{exc} (or evaluate every image with --split all)") from None
    return records, index


class _Record(NamedTuple):
    """What evaluate() needs of an image: the fields of busseg.data.busi records."""

    rel_path: str
    label: str
    image_path: Path
    mask_paths: tuple


class _Index(NamedTuple):
    root: Path


def select_busbra(folder: str):
    """Every image of a BUS-BRA folder as records (label = pathology) and a pseudo-index."""
    if str(ROOT / "benchmarks") not in sys.path:
        sys.path.insert(0, str(ROOT / "benchmarks"))
    import _common

    root = Path(folder).expanduser()
    if not root.is_dir():
        raise UsageError(f"--busbra {root} is not a folder; give the BUS-BRA folder (with "
                         "Images/, Masks/ and bus_data.csv)")
    try:
        recs = _common.read_busbra(root)
    except SystemExit as exc:  # read_busbra reports problems as SystemExit(message)
        raise UsageError(str(exc)) from None
    return ([_Record(f"Images/{r.image_path.name}", r.pathology, r.image_path, (r.mask_path,))
             for r in recs], _Index(root.resolve()))


def overlay_rgb(image, truth, pred):
    """(H, W) uint8 grey + two (H, W) bool masks -> (H, W, 3) uint8 with coloured contours."""
    import numpy as np
    from skimage.segmentation import find_boundaries

    rgb = np.repeat(np.asarray(image, dtype=np.uint8)[..., None], 3, axis=-1)
    t_edge = find_boundaries(truth, mode="thick")
    p_edge = find_boundaries(pred, mode="thick")
    rgb[t_edge] = (0, 255, 0)
    rgb[p_edge] = (255, 0, 0)
    rgb[t_edge & p_edge] = (255, 255, 0)
    return rgb


def _png_bytes(rgb) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


def _json_clean(obj):
    """NaN/inf -> None so the JSON is standard."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _json_clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_clean(v) for v in obj]
    return obj


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UsageError(
            f"--out {out} exists and is not empty; choose a new folder or pass --overwrite "
            "(replaces files of the same names)"
        )


def _score_one(rec, model, args, *, settings: InferenceSettings, out: Path | None) -> dict:
    """Predict one record, score it against its truth and write its mask (and overlay) to out.

    Returns the per-image row: :func:`busseg.metrics.segmentation_metrics` plus the image's
    name, label, size, seconds, the gate's decision, the Dice without the gate and the region
    filter, and the class probabilities of a model with a class head.
    """
    from busseg.data.io import atomic_write_bytes, read_image, read_mask, write_mask_png
    from busseg.inference import predict
    from busseg.metrics import segmentation_metrics
    from busseg.postprocess import postprocess_mask

    image = read_image(rec.image_path)
    truth = read_mask(rec.mask_paths)
    t0 = time.perf_counter()
    res = predict(image, model, settings=settings)
    pred = res.mask
    seconds = time.perf_counter() - t0
    m = segmentation_metrics(pred, truth)
    row = {"image": rec.rel_path, "label": rec.label, "height": image.shape[0],
           "width": image.shape[1], **m, "seconds": seconds, "gated": res.gated,
           "dice_ungated": m["dice"], "any_pred_ungated": m["any_pred"]}
    if res.gated or res.regions_removed:
        # the same forward pass without the gate and the region filter
        ungated = res.proba >= settings.threshold
        if settings.fill_holes or settings.keep != "all" or settings.min_area > 0:
            ungated = postprocess_mask(ungated, fill_holes=settings.fill_holes,
                                       keep=settings.keep, min_area=settings.min_area)
        um = segmentation_metrics(ungated, truth)
        row["dice_ungated"], row["any_pred_ungated"] = um["dice"], um["any_pred"]
    if res.class_proba is not None:
        row["class_proba"] = res.class_proba
        row.update({f"p_{k}": float(res.class_proba.get(k, math.nan)) for k in CLASS_NAMES})
    if out is not None:
        stem = Path(rec.rel_path).stem
        write_mask_png(out / "predictions" / rec.label / f"{stem}_mask.png", pred,
                       overwrite=args.overwrite)
        if not args.no_overlays:
            atomic_write_bytes(out / "overlays" / rec.label / f"{stem}.png",
                               _png_bytes(overlay_rgb(image, truth, pred)),
                               overwrite=args.overwrite)
    return row


def _write_outputs(out: Path, rows: list[dict], md: str, meta: dict, *,
                   reliability_title: str, overwrite: bool) -> None:
    """Write per_image.csv, summary.md, summary.json and (class head) reliability.png to out."""
    from busseg.data.io import atomic_write_bytes

    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, lineterminator="\n", extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
    atomic_write_bytes(out / "per_image.csv", buf.getvalue().encode(), overwrite=overwrite)
    atomic_write_bytes(out / "summary.md", md.encode(), overwrite=overwrite)
    classes = meta.get("class_head")
    if classes is not None:
        atomic_write_bytes(out / "reliability.png",
                           reliability_png(classes["calibration"], reliability_title),
                           overwrite=overwrite)
    atomic_write_bytes(out / "summary.json",
                       (json.dumps(_json_clean(meta), indent=2) + "\n").encode(),
                       overwrite=overwrite)


def _inputs(args) -> tuple[Path | None, list, object, str]:
    """Check the options and select the records: ``(out or None, records, index, split)``.

    Raises UsageError for a negative --min-area, --n-boot < 1, a non-empty --out without
    --overwrite, or a split without usable images.
    """
    if args.min_area < 0:
        raise UsageError(f"--min-area must be >= 0, got {args.min_area}")
    if args.n_boot < 1:
        raise UsageError(f"--n-boot must be >= 1, got {args.n_boot}")
    out = Path(args.out).expanduser() if args.out else None
    if out is not None:
        _check_out(out, args.overwrite)
    if args.busbra:
        records, index = select_busbra(args.busbra)
        split = "all"
    else:
        records, index = select_records(args.data, args.split, args.split_file)
        split = args.split
    if args.limit:
        records = records[: args.limit]
    if not records:
        raise UsageError(f"no usable images in split {split!r} of {index.root}")
    return out, records, index, split


def evaluate(args) -> int:
    import torch
    from tqdm import tqdm

    from busseg import __version__
    from busseg.inference import has_class_head
    from busseg.metrics import (
        class_head_summary,
        gate_summary,
        summarize,
        summary_markdown,
    )

    if args.threads:
        torch.set_num_threads(args.threads)
    out, records, index, split = _inputs(args)
    model = load_cli_model(args.checkpoint, args.device)
    cfg = model.busseg_config
    settings = inference_settings(args).replace(device=None)  # the model is loaded there
    resolved = settings.resolve(cfg)
    threshold, tta, post = resolved.threshold, resolved.tta, resolved.post is not None
    settings = settings.replace(threshold=threshold, tta=tta)  # as printed and recorded
    head = has_class_head(model)
    stored_gate = cfg["inference"].get("normal_gate") if head else None
    gate_on = bool(stored_gate) and not args.no_gate
    ckpt_path = getattr(model, "busseg_checkpoint_path", str(args.checkpoint))
    dataset = "BUS-BRA" if args.busbra else index.root.name
    print(f"checkpoint {ckpt_path}: input {cfg['preprocessing'].get('input_size')}, threshold "
          f"{threshold}, TTA {'on' if tta else 'off'}"
          + (f", post-processing fill_holes={args.fill_holes} keep={args.keep} "
             f"min_area={args.min_area}" if post else "")
          + (f", normal-scan gate {gate_status(stored_gate, args.no_gate)}" if head else "")
          + ", region filter "
          + filter_status(cfg["inference"].get("region_filter"), args.no_region_filter))
    print(f"{len(records)} image(s) of split {split!r} from {index.root}")

    rows = [_score_one(rec, model, args, settings=settings, out=out)
            for rec in tqdm(records, unit="image", disable=args.no_progress, dynamic_ncols=True)]

    summary = summarize(rows, by="label", ci=0.95, n_boot=args.n_boot)
    gate = gate_summary(rows, stored_gate, gate_on) if head else None
    if gate is not None:
        for g, key in (("normal", "fp_rate_normal_ungated"), ("all", "fp_rate_normal_ungated")):
            if g in summary and summary[g].get("n_empty_truth"):
                summary[g]["fp_rate_ungated"] = gate[key]
    classes = (class_head_summary([r["label"] for r in rows],
                                  [r.get("class_proba") for r in rows], n_boot=args.n_boot)
               if head else None)
    table = summary_markdown(summary)
    secs = [r["seconds"] for r in rows]
    speed = (f"{statistics.median(secs) * 1000:.0f} ms median per image (prediction and "
             f"threshold, decoding excluded) on {model_device_name(model)}, "
             f"{torch.get_num_threads()} CPU thread(s)")
    header = (
        f"# Evaluation: split `{split}` of {dataset}\n\n"
        f"- checkpoint: `{ckpt_path}`\n"
        f"- data: `{index.root}`"
        + ("" if split == "all" else f", split file `{args.split_file}`")
        + f"\n- images: {len(rows)}\n"
        f"- threshold {threshold}, TTA {'on' if tta else 'off'}"
        + (f", post-processing fill_holes={args.fill_holes}, keep={args.keep}, "
           f"min_area={args.min_area}" if post else ", no post-processing")
        + (f", normal-scan gate {gate_status(stored_gate, args.no_gate)}" if head else "")
        + "\n"
        f"- metrics at the original image size; mean ± std; HD95 in pixels; FP rate = share of "
        f"images without a lesion (normal) with any predicted pixel\n"
        f"- speed: {speed}\n\n"
    )
    md = header + table
    if gate is not None:
        md += "\n" + gate_markdown(gate)
    if classes is not None:
        md += "\n" + class_head_markdown(classes, reliability_png=out is not None)
    if out is not None:
        meta = {
            "checkpoint": ckpt_path,
            "model": cfg["model"],
            "preprocessing": cfg["preprocessing"],
            "data": str(index.root),
            "dataset": "busbra" if args.busbra else "busi",
            "split": split,
            "split_file": None if split == "all" else str(args.split_file),
            "n_images": len(rows),
            "threshold": threshold,
            "tta": tta,
            "postprocess": {"fill_holes": args.fill_holes, "keep": args.keep,
                            "min_area": args.min_area},
            "seconds_per_image_median": statistics.median(secs),
            "device": model_device_name(model),
            "torch_threads": torch.get_num_threads(),
            "busseg_version": __version__,
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "summary": summary,
            "gate": gate,
            "class_head": classes,
        }
        _write_outputs(out, rows, md, meta, reliability_title=f"{dataset} {split}",
                       overwrite=args.overwrite)
    print()
    print(md)
    if out is not None:
        print(f"wrote {out}/per_image.csv, summary.md, summary.json, predictions/"
              + ("" if args.no_overlays else ", overlays/")
              + (", reliability.png" if classes is not None else ""))
    return 0


def _f(x, digits: int = 3) -> str:
    return "–" if x is None or (isinstance(x, float) and not math.isfinite(x)) else \
        f"{x:.{digits}f}"


def gate_markdown(g: dict) -> str:
    """Markdown section of :func:`gate_summary`."""
    status = ("on (headline figures above are gated)" if g["on"] else
              "off (headline figures above are ungated)")
    lines = [
        "## Normal-scan gate", "",
        f"Gate {status}; stored gate: {g['stored'] or 'none'}. Both columns come from the same "
        "forward pass.", "",
        "| | gate on | gate off |", "|---|---:|---:|",
    ]
    if g["n_normal"]:
        on = (f"{_f(g['fp_rate_normal'])} ({g['n_fp_normal']}/{g['n_normal']})" if g["on"]
              else "–")
        lines.append(f"| FP rate, images without a lesion | {on} | "
                     f"{_f(g['fp_rate_normal_ungated'])} "
                     f"({g['n_fp_normal_ungated']}/{g['n_normal']}) |")
    if g["n_lesion"]:
        lines.append(f"| mean Dice, images with a lesion (n={g['n_lesion']}) | "
                     f"{_f(g['lesion_dice']) if g['on'] else '–'} | "
                     f"{_f(g['lesion_dice_ungated'])} |")
        lines.append(f"| lesion images the gate empties | "
                     f"{g['n_lesion_gated']}/{g['n_lesion']} "
                     f"({_f(100 * g['share_lesion_gated'], 1)} %) | – |" if g["on"] else
                     "| lesion images the gate empties | – | – |")
    lines += ["", f"Median P(normal): {_f(g['median_p_normal_lesion'])} on images with a "
              f"lesion, {_f(g['median_p_normal_normal'])} on images without.", ""]
    return "\n".join(lines)


def class_head_markdown(c: dict, reliability_png: bool = False) -> str:
    """Markdown section of :func:`busseg.metrics.class_head_summary`."""
    def auc(entry):
        if not math.isfinite(entry["auc"]):
            return f"undefined (n+ {entry['n_pos']}, n- {entry['n_neg']})"
        return (f"{entry['auc']:.3f} [{entry['ci_low']:.3f}, {entry['ci_high']:.3f}] "
                f"(n+ {entry['n_pos']}, n- {entry['n_neg']})")

    cal = c["calibration"]
    lines = [
        "## Class head (research output, not a diagnosis)", "",
        "AUC with a 95 % stratified bootstrap interval.", "",
        "| AUC | value [95 % CI] |", "|---|---|",
        "| malignant vs benign, images with a lesion; score P(malignant) / (P(benign) + "
        f"P(malignant)) | {auc(c['auc_malignant_vs_benign'])} |",
        "| lesion vs normal, all images; score P(lesion) = 1 - P(normal) | "
        f"{auc(c['auc_lesion_vs_normal'])} |", "",
        f"Calibration of P(lesion) = 1 - P(normal) against 'the image has a lesion': expected "
        f"calibration error {_f(cal['ece'])} over {cal['n']} images, "
        f"{len(cal['count'])} equal-width bins"
        + (" (reliability diagram: reliability.png)." if reliability_png else "."), "",
        "| P(lesion) bin | images | mean P(lesion) | share with a lesion |",
        "|---|---:|---:|---:|",
    ]
    edges = cal["bin_edges"]
    for i, n in enumerate(cal["count"]):
        if n:
            lines.append(f"| {edges[i]:.1f}-{edges[i + 1]:.1f} | {n} | "
                         f"{_f(cal['predicted'][i])} | {_f(cal['observed'][i])} |")
    lines += ["", "| label | n | P(normal) median [25th, 75th percentile] |", "|---|---:|---|"]
    for lab, q in c["p_normal"].items():
        lines.append(f"| {lab} | {q['n']} | {_f(q['median'])} [{_f(q['q25'])}, "
                     f"{_f(q['q75'])}] |")
    return "\n".join(lines) + "\n"


def reliability_png(curve: dict, title: str) -> bytes:
    """PNG bytes of the reliability diagram of P(lesion) (matplotlib, Agg backend)."""
    if str(ROOT / "benchmarks") not in sys.path:
        sys.path.insert(0, str(ROOT / "benchmarks"))
    import _common

    fig, axes = _common.new_figure(1, 1, size=(4.5, 4.0))
    _common.plot_reliability(axes[0][0], curve, "P(lesion) = 1 - P(normal)")
    axes[0][0].set_title(f"Reliability of P(lesion), {title}", fontsize=9)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return buf.getvalue()


def model_device_name(model) -> str:
    from busseg.inference import model_device

    return str(model_device(model))


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return evaluate(args)
    except UsageError as exc:
        print(f"evaluate.py: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
