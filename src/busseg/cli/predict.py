"""``busseg predict``: segment image files and write one ``<stem>_mask.png`` per image."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from busseg.cli.common import (
    EXIT_OK,
    EXIT_PARTIAL,
    UsageError,
    add_inference_args,
    filter_status,
    gate_status,
    inference_settings,
    load_cli_model,
    no_progress_bar,
)
from busseg.cli.inputs import Job, collect_jobs


def add_predict_parser(sub) -> None:
    """Add the ``predict`` sub-command to the ``busseg`` parser's sub-parsers ``sub``."""
    p = sub.add_parser(
        "predict",
        help="segment images and write <stem>_mask.png files",
        description="Segment image files (PNG/JPEG/TIFF/BMP; grey, RGB or RGBA) and write one "
        "<stem>_mask.png (0/255) per image into --out; for a model with a class head also "
        "--out/classes.csv (P(normal), P(benign), P(malignant) per image: research output, "
        "not a diagnosis). Exit status: 0 all written, 1 some "
        "skipped (output exists, or unreadable image), 2 usage error.",
    )
    p.add_argument(
        "paths", nargs="*", metavar="PATH",
        help="image files or folders (a BUSI Dataset_BUSI_with_GT folder, a class folder, or "
        "any folder of images; *_mask*.png files are skipped)",
    )
    p.add_argument("--out", "-o", required=True, metavar="DIR", help="folder for the masks")
    p.add_argument("--samples", action="store_true", help="also run on the 3 shipped samples")
    p.add_argument(
        "--checkpoint", metavar="CKPT", default=None,
        help="checkpoint directory (default: the shipped default model)",
    )
    add_inference_args(p)
    p.add_argument("--overwrite", action="store_true",
                   help="replace existing mask files (default: skip them and exit with 1)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run_predict(args: argparse.Namespace) -> int:
    """Run ``busseg predict`` with parsed arguments; return the exit status.

    Raises
    ------
    UsageError
        If the inputs, the output folder, the checkpoint or the device are unusable.
    """
    out = Path(args.out).expanduser()
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} exists and is not a folder")
    jobs = collect_jobs(args.paths, out, args.samples)

    existing = [j for j in jobs if j.out.exists()] if not args.overwrite else []
    skip = {id(j) for j in existing}
    todo = [j for j in jobs if id(j) not in skip]
    # refuse empty and unreadable images before torch and the model load (seconds)
    failed: list[str] = []
    for j in todo:
        problem = _unreadable(j.image)
        if problem is not None:
            failed.append(problem)
            print(problem, file=sys.stderr)
            skip.add(id(j))
    if failed:
        todo = [j for j in todo if id(j) not in skip]
        if not todo:
            return _finish(out, 0, failed, existing, dice=[], classes={})

    model = load_cli_model(args.checkpoint, args.device)
    if not todo:
        _report_existing(existing)
        return EXIT_PARTIAL

    from tqdm import tqdm

    from busseg.data.io import ImageReadError, read_image, read_mask, write_mask_png
    from busseg.inference import has_class_head, predict
    from busseg.metrics import dice_score

    cfg = model.busseg_config
    settings = inference_settings(args).replace(device=None)  # the model is loaded there
    resolved = settings.resolve(cfg)
    threshold, tta = resolved.threshold, resolved.tta
    head = has_class_head(model)
    print(
        f"model {getattr(model, 'busseg_checkpoint_path', args.checkpoint)}: input "
        f"{cfg['preprocessing'].get('input_size')}, threshold {threshold}, "
        f"TTA {'on' if tta else 'off'}"
        + (f", normal-scan gate {gate_status(cfg['inference'].get('normal_gate'), args.no_gate)}"
           if head else "")
        + ", region filter "
        + filter_status(cfg["inference"].get("region_filter"), args.no_region_filter)
        + f"; {len(todo)} image(s) to segment"
    )
    if head:
        print("class probabilities P(normal) / P(benign) / P(malignant) are research output, "
              f"not a diagnosis (also into {CLASSES_CSV} in --out)")
    dice: list[tuple[str, float, bool]] = []
    classes: dict[str, dict] = {}
    written = 0
    bar = tqdm(todo, unit="image", disable=no_progress_bar(args) or not todo, dynamic_ncols=True)
    for job in bar:
        try:
            image = read_image(job.image)
        except (ImageReadError, FileNotFoundError, OSError) as exc:
            failed.append(_read_error(job.image, exc))
            tqdm.write(failed[-1], file=sys.stderr)
            continue
        pred = predict(image, model, settings)
        mask = pred.mask
        try:
            write_mask_png(job.out, mask, overwrite=args.overwrite)
            written += 1
        except FileExistsError:  # appeared while we were running
            existing.append(job)
            continue
        if pred.class_proba is not None:
            cp = pred.class_proba
            classes[job.display] = {"path": job.display, **{
                f"p_{k}": f"{cp.get(k, float('nan')):.4f}" for k in ("normal", "benign",
                                                                       "malignant")},
                "gated": pred.gated}
            tqdm.write(
                f"{job.display}: P(normal) {cp.get('normal', float('nan')):.3f}, P(benign) "
                f"{cp.get('benign', float('nan')):.3f}, P(malignant) "
                f"{cp.get('malignant', float('nan')):.3f} (research output, not a diagnosis)"
                + ("; gate: mask emptied, the scan looks normal" if pred.gated else "")
            )
        if job.masks:
            try:
                truth = read_mask(job.masks)
            except (ValueError, OSError) as exc:
                tqdm.write(f"{job.display}: ground truth unreadable ({exc}); no Dice")
                continue
            if truth.shape != mask.shape:
                tqdm.write(
                    f"{job.display}: ground truth is {truth.shape[::-1]} (W, H) but the image "
                    f"is {mask.shape[::-1]}; no Dice"
                )
                continue
            d = dice_score(mask, truth)
            dice.append((job.display, d, bool(truth.any())))
            tqdm.write(f"{job.display}: Dice {d:.3f}" + ("" if truth.any() else " (no lesion)"))
    bar.close()
    return _finish(out, written, failed, existing, dice=dice, classes=classes)


def _finish(out: Path, written: int, failed: list[str], existing: list[Job], *,
            dice: list[tuple[str, float, bool]], classes: dict[str, dict]) -> int:
    """Print the end of a ``busseg predict`` run and return its exit status.

    Each unreadable image was named once when it was found; here only their number.
    """
    if written:
        print(f"wrote {written} mask(s) to {out}")
    else:
        print(f"no mask written: {_nothing_written(failed, existing)}", file=sys.stderr)
    if classes:
        path = write_classes_csv(out / CLASSES_CSV, classes)
        print(f"wrote {path} ({len(classes)} row(s) from this run)")
    if dice:
        import numpy as np

        values = np.array([d for _, d, _ in dice])
        lesion = np.array([d for _, d, has in dice if has])
        line = f"mean Dice {values.mean():.3f} over {len(values)} image(s) with ground truth"
        if 0 < len(lesion) < len(values):
            line += f"; {lesion.mean():.3f} over the {len(lesion)} with a lesion"
        print(line)
    status = EXIT_OK
    if existing:
        _report_existing(existing)
        status = EXIT_PARTIAL
    if failed and written:
        print(f"could not read {len(failed)} image(s), each named above", file=sys.stderr)
    if failed:
        status = EXIT_PARTIAL
    if not written:
        status = max(status, EXIT_PARTIAL)
    return status


def _unreadable(path: Path) -> str | None:
    """Why ``path`` cannot be read as an image, or None if it looks readable.

    Cheap: the file's size and image header only (no pixels decoded, no torch). Where the
    header does not open, :func:`busseg.data.io.read_image` reads the file to name the
    problem (and to accept what it can read all the same: a TIFF only ``tifffile`` decodes).
    An image whose header is fine but whose pixels are damaged is reported when it is read.
    """
    from busseg.data.io import ImageReadError, read_image

    try:
        if path.stat().st_size > 0 and (path.suffix.lower() == ".dcm" or _header_opens(path)):
            return None
    except OSError:
        pass
    try:
        read_image(path)
    except (ImageReadError, OSError) as exc:
        return _read_error(path, exc)
    return None


def _header_opens(path: Path) -> bool:
    from PIL import Image

    try:
        with Image.open(path):
            return True
    except Exception:  # noqa: BLE001 - any failure: read_image names it
        return False


def _read_error(path: Path, exc: BaseException) -> str:
    """One line for an unreadable image that names the file once."""
    text = str(exc)
    return text if str(path) in text else f"cannot read {path}: {text}"


def _nothing_written(failed: list[str], existing: list[Job]) -> str:
    parts = []
    if failed:
        parts.append(f"{len(failed)} image(s) could not be read")
    if existing:
        parts.append(f"{len(existing)} mask file(s) appeared during the run")
    return "; ".join(parts) or "nothing to segment"


def _report_existing(existing: list[Job]) -> None:
    print(
        f"skipped {len(existing)} image(s) whose mask file already exists (pass "
        "--overwrite to replace them):", file=sys.stderr,
    )
    for j in existing[:10]:
        print(f"  {j.out}", file=sys.stderr)
    if len(existing) > 10:
        print(f"  ... and {len(existing) - 10} more", file=sys.stderr)


#: File name of the class probabilities ``busseg predict`` writes into ``--out``.
CLASSES_CSV = "classes.csv"
CLASSES_COLUMNS = ("path", "p_normal", "p_benign", "p_malignant", "gated")


def write_classes_csv(path: Path, rows: dict[str, dict]) -> Path:
    """Write (or update) ``classes.csv`` atomically: one row per image path.

    Rows of an existing file whose ``path`` is not in ``rows`` are kept (images skipped in
    this run because their mask existed), so the file always describes the masks in the
    folder; rows of ``rows`` replace those of the same path.

    Parameters
    ----------
    path : pathlib.Path
        The CSV to write.
    rows : dict
        ``{image path: {"path", "p_normal", "p_benign", "p_malignant", "gated"}}``.

    Returns
    -------
    pathlib.Path
        ``path``.
    """
    import csv
    import io

    from busseg.data.io import atomic_write_bytes

    merged: dict[str, dict] = {}
    if path.is_file():
        try:
            with open(path, newline="") as fh:
                reader = csv.DictReader(fh)
                if set(CLASSES_COLUMNS) <= set(reader.fieldnames or ()):
                    merged = {r["path"]: r for r in reader}
        except (OSError, UnicodeDecodeError, csv.Error):
            merged = {}  # unreadable: replaced by this run's rows
    merged.update(rows)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CLASSES_COLUMNS, lineterminator="\n",
                       extrasaction="ignore")
    w.writeheader()
    for r in merged.values():
        w.writerow(r)
    return atomic_write_bytes(path, buf.getvalue().encode(), overwrite=True)
