"""Evaluate a checkpoint on a BUSI-layout dataset: per-image and per-class metrics at full size.

Examples
--------
    python training/evaluate.py --split test --out eval/default_test          # shipped model
    python training/evaluate.py --checkpoint runs/x/best --split val --out eval/x_val --tta
    python training/evaluate.py --data my_busi_like_folder --split all --out eval/mine

Each image is segmented with ``busseg.inference.predict_proba`` (the probabilities are
computed at the network input size and resized back to the image's own size) and thresholded
at the checkpoint's threshold (or ``--threshold``); metrics come from
``busseg.metrics.segmentation_metrics`` against the union of the image's masks, at the
original resolution. Summaries are per class (benign, malignant, normal), for ``lesion``
(benign + malignant) and ``all``; for normal images (empty truth) the image-level
false-positive rate is reported (Metrics Reloaded conventions, see ``busseg.metrics``).

With ``--out DIR`` it writes
    DIR/per_image.csv                   one row per image: metrics, pixel counts, seconds
    DIR/summary.md, DIR/summary.json    per-class mean, std, median, 95 % bootstrap CI
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

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "src") not in sys.path:
    sys.path.insert(0, str(ROOT / "src"))

from busseg.cli import UsageError, add_inference_args  # noqa: E402  (shared with busseg predict)

CSV_COLUMNS = (
    "image", "label", "height", "width", "dice", "iou", "precision", "recall", "accuracy",
    "hd95", "tp", "fp", "fn", "tn", "pred_area", "true_area", "any_pred", "seconds",
)


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
    ap.add_argument("--out", default=None, help="output folder (must not exist or be empty)")
    ap.add_argument("--overwrite", action="store_true",
                    help="write into a non-empty --out, replacing files of the same names")
    add_inference_args(ap)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--limit", type=int, default=None, help="only the first N images (smoke tests)")
    ap.add_argument("--no-overlays", action="store_true", help="skip the overlay PNGs")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    return ap


def select_records(data: str, split: str, split_file: str):
    """The usable records to evaluate and the dataset index."""
    from busseg.data.busi import discover_busi
    from busseg.data.splits import read_split_csv, select_split

    try:
        index = discover_busi(data)
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


def evaluate(args) -> int:
    import torch
    from tqdm import tqdm

    from busseg import __version__
    from busseg.data.io import atomic_write_bytes, read_image, read_mask, write_mask_png
    from busseg.inference import load_model, predict_proba
    from busseg.metrics import segmentation_metrics, summarize, summary_markdown
    from busseg.models import CheckpointError
    from busseg.postprocess import postprocess_mask

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.min_area < 0:
        raise UsageError(f"--min-area must be >= 0, got {args.min_area}")
    out = Path(args.out).expanduser() if args.out else None
    if out is not None:
        _check_out(out, args.overwrite)
    records, index = select_records(args.data, args.split, args.split_file)
    if args.limit:
        records = records[: args.limit]
    if not records:
        raise UsageError(f"no usable images in split {args.split!r} of {args.data}")
    try:
        model = load_model(args.checkpoint, device=args.device)
    except (CheckpointError, ValueError) as exc:
        raise UsageError(str(exc)) from None
    cfg = model.busseg_config
    threshold = args.threshold
    if threshold is None:
        threshold = float(cfg["inference"]["threshold"])
    tta = args.tta if args.tta is not None else bool(cfg["inference"].get("tta_flips", False))
    post = args.fill_holes or args.keep != "all" or args.min_area > 0
    ckpt_path = getattr(model, "busseg_checkpoint_path", str(args.checkpoint))
    print(f"checkpoint {ckpt_path}: input {cfg['preprocessing'].get('input_size')}, threshold "
          f"{threshold}, TTA {'on' if tta else 'off'}"
          + (f", post-processing fill_holes={args.fill_holes} keep={args.keep} "
             f"min_area={args.min_area}" if post else ""))
    print(f"{len(records)} image(s) of split {args.split!r} from {index.root}")

    rows = []
    for rec in tqdm(records, unit="image", disable=args.no_progress, dynamic_ncols=True):
        image = read_image(rec.image_path)
        truth = read_mask(rec.mask_paths)
        t0 = time.perf_counter()
        proba = predict_proba(image, model, tta=tta)
        pred = proba >= threshold
        if post:
            pred = postprocess_mask(pred, fill_holes=args.fill_holes, keep=args.keep,
                                    min_area=args.min_area)
        seconds = time.perf_counter() - t0
        m = segmentation_metrics(pred, truth)
        rows.append({"image": rec.rel_path, "label": rec.label, "height": image.shape[0],
                     "width": image.shape[1], **m, "seconds": seconds})
        if out is not None:
            stem = Path(rec.rel_path).stem
            write_mask_png(out / "predictions" / rec.label / f"{stem}_mask.png", pred,
                           overwrite=args.overwrite)
            if not args.no_overlays:
                atomic_write_bytes(out / "overlays" / rec.label / f"{stem}.png",
                                   _png_bytes(overlay_rgb(image, truth, pred)),
                                   overwrite=args.overwrite)

    summary = summarize(rows, by="label", ci=0.95)
    table = summary_markdown(summary)
    secs = [r["seconds"] for r in rows]
    speed = (f"{statistics.median(secs) * 1000:.0f} ms median per image (prediction and "
             f"threshold, decoding excluded) on {model_device_name(model)}, "
             f"{torch.get_num_threads()} CPU thread(s)")
    header = (
        f"# Evaluation: split `{args.split}` of {index.root.name}\n\n"
        f"- checkpoint: `{ckpt_path}`\n"
        f"- data: `{index.root}`"
        + ("" if args.split == "all" else f", split file `{args.split_file}`")
        + f"\n- images: {len(rows)}\n"
        f"- threshold {threshold}, TTA {'on' if tta else 'off'}"
        + (f", post-processing fill_holes={args.fill_holes}, keep={args.keep}, "
           f"min_area={args.min_area}" if post else ", no post-processing") + "\n"
        f"- metrics at the original image size; mean ± std; HD95 in pixels; FP rate = share of "
        f"images without a lesion (normal) with any predicted pixel\n"
        f"- speed: {speed}\n\n"
    )
    md = header + table
    if out is not None:
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, lineterminator="\n", extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
        atomic_write_bytes(out / "per_image.csv", buf.getvalue().encode(), overwrite=args.overwrite)
        atomic_write_bytes(out / "summary.md", md.encode(), overwrite=args.overwrite)
        meta = {
            "checkpoint": ckpt_path,
            "model": cfg["model"],
            "preprocessing": cfg["preprocessing"],
            "data": str(index.root),
            "split": args.split,
            "split_file": None if args.split == "all" else str(args.split_file),
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
        }
        atomic_write_bytes(out / "summary.json",
                           (json.dumps(_json_clean(meta), indent=2) + "\n").encode(),
                           overwrite=args.overwrite)
    print()
    print(md)
    if out is not None:
        print(f"wrote {out}/per_image.csv, summary.md, summary.json, predictions/"
              + ("" if args.no_overlays else ", overlays/"))
    return 0


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
