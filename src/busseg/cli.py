"""The ``busseg`` command: segment image files headlessly, and describe the installation.

Examples
--------
::

    busseg predict --samples --out preds/              # the three shipped sample cases
    busseg predict scans/ one.png --out preds/ --tta   # folders (BUSI or plain) and files
    busseg predict Dataset_BUSI_with_GT --out preds/ --checkpoint runs/x/best
    busseg info
    busseg rank Dataset_BUSI_with_GT --out ranking.csv  # most uncertain images first

``busseg predict`` writes one ``<stem>_mask.png`` (0 = background, 255 = lesion, the image's
own size) per image. With a model that has an image-level class head (normal / benign /
malignant) it also writes ``OUT/classes.csv`` (columns path, p_normal, p_benign, p_malignant,
gated; research output, not a diagnosis) and applies the checkpoint's normal-scan gate
(``--no-gate`` switches it off; see :func:`busseg.inference.predict`), then the checkpoint's
region filter, which removes regions of the automatic mask unlikely to be lesions
(``--no-region-filter`` switches it off; :mod:`busseg.region_filter`). Folders are indexed by
:func:`busseg.data.discover` (BUSI, BUS-BRA / BUS-UCLM image and mask folders, any folder of
scans, searched recursively; single-frame DICOM with pydicom); the layout under each PATH
folder is mirrored in OUT (a BUSI folder gives ``OUT/benign/benign (1)_mask.png`` ...);
single files go straight into OUT. The ``path`` column of ``classes.csv`` is the image's
path relative to its PATH folder (the shipped samples' folder for ``--samples``; the file
name for single files), the same relative place its mask has under OUT. Mask files are never
taken as input; when an image has ground-truth masks (BUSI ``<stem>_mask*.png`` siblings, or
the dataset's mask folder as :func:`busseg.data.discover` pairs it, for a folder and for a
single image file alike), its Dice is printed, and the mean at the end. Empty files and files
that do not open as an image are named once and refused before torch and the model load.

Output is plain text when it is not a terminal (no progress bar frames), and a closed pipe
(``busseg rank ... | head -1``) silences the output without a traceback; the work goes on.

Exit status: 0 all masks written; 1 the run finished but some images were skipped because
their output exists (pass ``--overwrite`` to replace) or could not be read, including when
no mask at all was written; 2 nothing was done because of a usage error (missing file, no
images, bad checkpoint or device); 130 interrupted.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["main"]

EXIT_OK, EXIT_PARTIAL, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130

_EPILOG = """examples:
  busseg predict --samples --out preds/              # the three shipped sample cases
  busseg predict scans/ one.png --out preds/ --tta   # folders (BUSI or plain) and files
  busseg predict Dataset_BUSI_with_GT --out preds/ --checkpoint runs/x/best
  busseg info
  busseg rank Dataset_BUSI_with_GT --out ranking.csv  # most uncertain images first

exit status: 0 all masks written; 1 finished, but some images were skipped (output exists
without --overwrite, or unreadable) or none was written; 2 usage error, nothing done;
130 interrupted.
"""


class UsageError(Exception):
    """An error the user can fix; printed without a traceback, exit status 2."""


@dataclass
class Job:
    """One image to segment."""

    image: Path
    out: Path
    display: str
    masks: tuple[Path, ...] = field(default_factory=tuple)


# --------------------------------------------------------------------------- arguments


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
    p.add_argument("--min-area", type=_non_negative_int, default=0, metavar="PX",
                   help="drop predicted lesions smaller than PX pixels (default 0)")
    p.add_argument("--no-gate", action="store_true",
                   help="switch the normal-scan gate off (models with a class head: by default "
                   "a mask is emptied when P(normal) and the lesion probabilities say normal, "
                   "as stored in the checkpoint)")
    p.add_argument("--no-region-filter", action="store_true",
                   help="switch the region filter off (by default regions of the automatic mask "
                   "that the checkpoint's filter finds unlikely to be lesions are removed; "
                   "see `busseg info`)")


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """Build the argument parser of the ``busseg`` command.

    Returns
    -------
    argparse.ArgumentParser
        With the sub-commands ``predict``, ``rank`` and ``info``.
    """
    from busseg import __version__

    ap = argparse.ArgumentParser(
        prog="busseg",
        description="Breast-ultrasound lesion segmentation with a U-Net (napari-busseg).",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--version", action="version", version=f"busseg {__version__}")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")

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

    _add_rank_parser(sub)

    i = sub.add_parser("info", help="print the version, devices and the model card summary")
    i.add_argument("--checkpoint", metavar="CKPT", default=None,
                   help="describe this checkpoint instead of the default model")
    return ap


# --------------------------------------------------------------------------- inputs


def _sibling_masks(image: Path) -> tuple[Path, ...]:
    """Ground-truth masks beside ``image`` by BUSI naming: <stem>_mask.png, <stem>_mask_1.png."""
    from busseg.data.io import IMAGE_SUFFIXES

    pattern = re.compile(rf"^{re.escape(image.stem)}_mask(?:_(\d+))?$", re.IGNORECASE)
    found = []
    try:
        entries = list(image.parent.iterdir())
    except OSError:
        return ()
    for p in entries:
        m = pattern.match(p.stem)
        if m and p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES:
            found.append((int(m.group(1) or 0), p))
    return tuple(p for _, p in sorted(found))


def _folder_records(folder: Path) -> list:
    """List the scans of a folder with :func:`busseg.data.discover` (any layout it reads)."""
    from busseg.data.discover import discover

    try:
        return discover(folder, check_sizes=False).records
    except ValueError as exc:  # no scan in it
        raise UsageError(str(exc)) from None


def _folder_jobs(folder: Path, out: Path) -> list[Job]:
    jobs = []
    for rec in _folder_records(folder):
        image = rec.image_path
        try:
            rel = image.relative_to(folder)
        except ValueError:
            rel = Path(image.name)
        jobs.append(Job(image, out / rel.parent / f"{image.stem}_mask.png",
                        rel.as_posix(), tuple(rec.mask_paths)))
    return jobs


def _pair_records(root: Path, cache: dict) -> tuple[dict[Path, tuple[Path, ...]],
                                                     dict[Path, Path]]:
    """Masks by image, and image by mask, of an image/mask folder pair, as discover pairs them.

    ``root`` holds the pair (BUS-BRA's ``Images/`` + ``Masks/``, BUS-UCLM's ``images/`` +
    ``masks/``); both dicts (keyed by resolved path) are empty when it holds none. Results are
    kept in ``cache`` by folder, so many files of one dataset cost one discovery.
    """
    from busseg.data.discover import detect_layout, discover

    key = root.resolve()
    if key not in cache:
        masks: dict[Path, tuple[Path, ...]] = {}
        try:
            layout = detect_layout(root)
            if layout in ("busbra", "pairs"):
                masks = {r.image_path.resolve(): tuple(r.mask_paths)
                         for r in discover(root, layout=layout, check_sizes=False).records}
        except (OSError, ValueError):  # no readable pair there: no ground truth
            masks = {}
        owners = {m.resolve(): image for image, ms in masks.items() for m in ms}
        cache[key] = (masks, owners)
    return cache[key]


def _file_job(path: Path, out: Path, pairs: dict | None = None) -> Job:
    """One job for a file given on the command line, with its ground truth where it has one.

    The ground truth is found as :func:`busseg.data.discover` finds it: BUSI ``_mask``
    siblings, or the mask folder of the image/mask folder pair whose image folder holds
    ``path`` (a BUS-BRA ``Images/bus_X.png`` gets ``Masks/mask_X.png``). ``pairs`` caches the
    pairs' discovery across files (see :func:`_pair_records`).
    """
    from busseg.data.busi import is_busi_image
    from busseg.data.discover import scan_suffixes

    suffixes = scan_suffixes()
    if path.suffix.lower() not in suffixes:
        hint = "" if ".dcm" in suffixes or path.suffix.lower() != ".dcm" else (
            '; DICOM needs pydicom: pip install "napari-busseg[dicom]"')
        raise UsageError(
            f"{path} is not an image file: expected one of {', '.join(suffixes)}{hint}"
        )
    if not is_busi_image(path):
        raise UsageError(f"{path} is named like a mask (*_mask*); pass the image instead")
    masks = _sibling_masks(path)
    if not masks:
        by_image, by_mask = _pair_records(path.parent.parent, {} if pairs is None else pairs)
        masks = by_image.get(path.resolve(), ())
        owner = by_mask.get(path.resolve())
        if owner is not None:
            raise UsageError(f"{path} is the ground-truth mask of {owner}; pass the image instead")
    return Job(path, out / f"{path.stem}_mask.png", path.name, masks)


def collect_jobs(paths: list[str], out: Path, samples: bool) -> list[Job]:
    """Expand files and folders into jobs and check them before any work is done.

    Parameters
    ----------
    paths : list of str
        Image files and folders from the command line.
    out : pathlib.Path
        The output folder.
    samples : bool
        Add the shipped sample cases (written to ``OUT/<class>/<stem>_mask.png``).

    Returns
    -------
    list of Job
        One per distinct image, in command-line order.

    Raises
    ------
    UsageError
        If a path does not exist, is not an image, a folder holds no image, two images would
        write the same output file, or an output would land beside its input image (where it
        would pass for a ground-truth mask) or on an input file.
    """
    jobs: list[Job] = []
    pairs: dict = {}
    if samples:
        from busseg.samples import samples_dir

        jobs += _folder_jobs(samples_dir(), out)
    for text in paths:
        path = Path(text).expanduser()
        if path.is_dir():
            jobs += _folder_jobs(path, out)
        elif path.is_file():
            jobs.append(_file_job(path, out, pairs))
        else:
            raise UsageError(f"no such file or folder: {path}")
    if not jobs:
        raise UsageError("no input: give image files or folders, or --samples")

    seen_images: set[Path] = set()
    unique: list[Job] = []
    for j in jobs:
        key = j.image.resolve()
        if key not in seen_images:
            seen_images.add(key)
            unique.append(j)
    inputs = set(seen_images) | {m.resolve() for j in unique for m in j.masks}
    outputs: dict[Path, Job] = {}
    for j in unique:
        target = j.out.resolve()
        if target in outputs:
            raise UsageError(
                f"{j.image} and {outputs[target].image} would both be written to {j.out}; "
                "segment them in separate runs with different --out folders"
            )
        if target in inputs or target.parent == j.image.resolve().parent:
            raise UsageError(
                f"refusing to write {j.out} beside its input image {j.image}: a predicted "
                "<stem>_mask.png there would pass for a ground-truth mask; choose another --out"
            )
        outputs[target] = j
    return unique


# --------------------------------------------------------------------------- commands


def _err(msg: str) -> None:
    print(f"busseg: error: {msg}", file=sys.stderr)


def _predict(args: argparse.Namespace) -> int:
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

    from busseg.inference import load_model
    from busseg.models import CheckpointError

    try:
        model = load_model(args.checkpoint, device=args.device)
    except (CheckpointError, ValueError) as exc:
        raise UsageError(str(exc)) from None
    if not todo:
        _report_existing(existing)
        return EXIT_PARTIAL

    from tqdm import tqdm

    from busseg.data.io import ImageReadError, read_image, read_mask, write_mask_png
    from busseg.inference import has_class_head, predict
    from busseg.metrics import dice_score

    cfg = model.busseg_config
    threshold = args.threshold if args.threshold is not None else cfg["inference"]["threshold"]
    tta = args.tta if args.tta is not None else cfg["inference"].get("tta_flips", False)
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
    bar = tqdm(todo, unit="image", disable=_no_bar(args) or not todo, dynamic_ncols=True)
    for job in bar:
        try:
            image = read_image(job.image)
        except (ImageReadError, FileNotFoundError, OSError) as exc:
            failed.append(_read_error(job.image, exc))
            tqdm.write(failed[-1], file=sys.stderr)
            continue
        pred = predict(
            image, model, threshold=args.threshold, tta=args.tta,
            fill_holes=args.fill_holes, keep=args.keep, min_area=args.min_area,
            normal_gate=None if args.no_gate else "auto",
            region_filter=None if args.no_region_filter else "auto",
        )
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


def _no_bar(args: argparse.Namespace) -> bool:
    """No progress bar with ``--no-progress`` or when stderr is not a terminal (a log, a pipe)."""
    if getattr(args, "no_progress", False):
        return True
    try:
        return not sys.stderr.isatty()
    except (AttributeError, ValueError):  # closed or replaced stream
        return True


#: File name of the class probabilities ``busseg predict`` writes into ``--out``.
CLASSES_CSV = "classes.csv"
CLASSES_COLUMNS = ("path", "p_normal", "p_benign", "p_malignant", "gated")


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

    if off:
        return "off (--no-gate)"
    if not gate:
        return "none stored in the checkpoint"
    return f"on ({describe_gate(gate)})"


def filter_status(spec: dict | None, off: bool) -> str:
    """Describe the region filter a run applies (``busseg predict``, ``info``, evaluate.py).

    Parameters
    ----------
    spec : dict or None
        The checkpoint's ``inference.region_filter``.
    off : bool
        True when ``--no-region-filter`` switched it off.

    Returns
    -------
    str
        ``"off (--no-region-filter)"``, ``"none stored in the checkpoint"`` or ``"on (<rule>)"``
        with the rule of :func:`busseg.region_filter.describe_filter`.
    """
    from busseg.region_filter import describe_filter

    if off:
        return "off (--no-region-filter)"
    if not spec:
        return "none stored in the checkpoint"
    try:
        return f"on ({describe_filter(spec)})"
    except ValueError as exc:
        return f"invalid ({exc})"


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


# --------------------------------------------------------------------------- rank


def _add_rank_parser(sub) -> None:
    r = sub.add_parser(
        "rank",
        help="rank images by the model's uncertainty (most uncertain first) into a CSV",
        description="Score each image's prediction uncertainty with a checkpoint (see "
        "busseg.uncertainty) and write a CSV, most uncertain first: the images whose "
        "correction should teach the model most. Columns: rank, path, score, entropy, "
        "flip_disagreement, class_entropy, entropy_region, cached, error, and class for "
        "images of a BUSI folder. Scores are cached per (checkpoint, image), so ranking again "
        "with the same checkpoint is immediate. Exit status: 0 all scored, 1 some images "
        "unreadable, 2 usage error (including an existing CSV without --overwrite).",
    )
    r.add_argument("paths", nargs="+", metavar="PATH",
                   help="image files or folders (BUSI or plain; *_mask*.png files are skipped)")
    r.add_argument("--out", "-o", required=True, metavar="CSV", help="the ranking CSV to write")
    r.add_argument("--checkpoint", metavar="CKPT", default=None,
                   help="checkpoint directory (default: the shipped default model)")
    r.add_argument("--device", default="auto", help="auto (default), cuda, cuda:N, mps or cpu")
    r.add_argument("--cache", metavar="FILE", default=None,
                   help="JSON file of cached scores (default: $BUSSEG_HOME/cache/"
                   "uncertainty.json, BUSSEG_HOME defaulting to ~/.busseg)")
    r.add_argument("--no-cache", action="store_true", help="neither read nor write the cache")
    r.add_argument("--overwrite", action="store_true", help="replace an existing CSV")
    r.add_argument("--no-progress", action="store_true", help="no progress bar")


def _rank_inputs(paths: list[str]) -> tuple[list[Path], dict[int, str]]:
    """Expand files and folders into image paths (deduplicated) and BUSI classes by index."""
    found: list[tuple[Path, str | None]] = []
    pairs: dict = {}
    for text in paths:
        path = Path(text).expanduser()
        if path.is_dir():
            found += [(r.image_path, r.label if r.label != "unknown" else None)
                      for r in _folder_records(path)]
        elif path.is_file():
            found.append((_file_job(path, path.parent, pairs).image, None))
        else:
            raise UsageError(f"no such file or folder: {path}")
    images: list[Path] = []
    labels: dict[int, str] = {}
    seen: set[Path] = set()
    for image, label in found:
        key = image.resolve()
        if key in seen:
            continue
        seen.add(key)
        if label is not None:
            labels[len(images)] = label
        images.append(image)
    return images, labels


def _rank(args: argparse.Namespace) -> int:
    from busseg.uncertainty import UncertaintyCache, rank_iter, write_ranking_csv

    out = Path(args.out).expanduser()
    if out.is_dir():
        raise UsageError(f"--out {out} is a folder; give a file name such as ranking.csv")
    if out.exists() and not args.overwrite:
        raise UsageError(f"{out} exists; pass --overwrite to replace it, or choose another --out")
    images, labels = _rank_inputs(args.paths)

    from busseg.inference import load_model
    from busseg.models import CheckpointError

    try:
        model = load_model(args.checkpoint, device=args.device)
    except (CheckpointError, ValueError) as exc:
        raise UsageError(str(exc)) from None
    cache = None
    if not args.no_cache:
        home = Path(os.environ.get("BUSSEG_HOME", Path.home() / ".busseg"))
        cache = UncertaintyCache(args.cache or home / "cache" / "uncertainty.json")

    from tqdm import tqdm

    print(f"model {model.busseg_checkpoint_path}; ranking {len(images)} image(s)")
    bar = tqdm(total=len(images), unit="image", disable=_no_bar(args), dynamic_ncols=True)
    gen = rank_iter(images, model, cache=cache if cache is not None else False)
    try:
        while True:
            event = next(gen)
            if event[0] == "progress" and event[3] is not None:
                bar.update(1)
    except StopIteration as done:
        ranking = done.value
    finally:
        bar.close()
        if cache is not None:
            try:
                cache.save()
            except OSError as exc:
                _err(f"could not save the score cache {cache.path}: {exc}")
    try:
        write_ranking_csv(ranking, out, labels=labels or None, overwrite=args.overwrite)
    except FileExistsError:
        raise UsageError(f"{out} appeared while ranking; pass --overwrite to replace it") from None
    failed = [e for e in ranking.entries if e.error]
    print(f"wrote {out}: {len(ranking.entries) - len(failed)} image(s) ranked "
          f"({ranking.n_cached} from the cache); most uncertain first:")
    for e in ranking.entries[: min(5, len(ranking.entries) - len(failed))]:
        print(f"  {e.score:.3f}  {e.name}")
    if failed:
        print(f"could not score {len(failed)} image(s):", file=sys.stderr)
        for e in failed[:10]:
            print(f"  {e.name}: {e.error}", file=sys.stderr)
        return EXIT_PARTIAL
    return EXIT_OK


def _report_existing(existing: list[Job]) -> None:
    print(
        f"skipped {len(existing)} image(s) whose mask file already exists (pass "
        "--overwrite to replace them):", file=sys.stderr,
    )
    for j in existing[:10]:
        print(f"  {j.out}", file=sys.stderr)
    if len(existing) > 10:
        print(f"  ... and {len(existing) - 10} more", file=sys.stderr)


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


def _info(args: argparse.Namespace) -> int:
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


def main(argv: list[str] | None = None) -> int:
    """Run the ``busseg`` command.

    Parameters
    ----------
    argv : list of str, optional
        Arguments without the program name; default ``sys.argv[1:]``.

    Returns
    -------
    int
        Exit status: 0 success, 1 finished with skipped images, 2 usage error, 130
        interrupted (argparse errors exit with 2 through ``SystemExit``).
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    out, err = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = _PipeGuard(out), _PipeGuard(err)
    try:
        if args.command == "predict":
            return _predict(args)
        if args.command == "rank":
            return _rank(args)
        return _info(args)
    except UsageError as exc:
        _err(str(exc))
        return EXIT_USAGE
    except KeyboardInterrupt:
        _err("interrupted; masks written so far are complete (each file is written atomically)")
        return EXIT_INTERRUPTED
    finally:
        sys.stdout, sys.stderr = out, err


class _PipeGuard:
    """A text stream that goes quiet when its reader goes away (``busseg rank ... | head -1``).

    The first ``BrokenPipeError`` points the file descriptor at ``os.devnull`` (so Python's
    final flush at exit does not fail either) and drops all later output; the command goes on
    and exits with its usual status, without a traceback.
    """

    def __init__(self, stream) -> None:
        self._stream = stream
        self.broken = False

    def write(self, text: str) -> int:
        if not self.broken:
            try:
                return self._stream.write(text)
            except BrokenPipeError:
                self._silence()
        return len(text)

    def flush(self) -> None:
        if not self.broken:
            try:
                self._stream.flush()
            except BrokenPipeError:
                self._silence()

    def _silence(self) -> None:
        self.broken = True
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            try:
                os.dup2(devnull, self._stream.fileno())
            finally:
                os.close(devnull)
        except (OSError, ValueError, AttributeError):  # no real file descriptor (tests)
            pass

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
