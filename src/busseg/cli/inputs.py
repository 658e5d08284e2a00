"""Turn the files and folders given to ``busseg predict`` and ``busseg rank`` into jobs."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from busseg.cli.common import UsageError


@dataclass
class Job:
    """One image to segment."""

    image: Path
    out: Path
    display: str
    masks: tuple[Path, ...] = field(default_factory=tuple)


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


def folder_records(folder: Path) -> list:
    """List the scans of a folder with :func:`busseg.data.discover` (any layout it reads)."""
    from busseg.data.discover import discover

    try:
        return discover(folder, check_sizes=False).records
    except ValueError as exc:  # no scan in it
        raise UsageError(str(exc)) from None


def _folder_jobs(folder: Path, out: Path) -> list[Job]:
    jobs = []
    for rec in folder_records(folder):
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


def file_job(path: Path, out: Path, pairs: dict | None = None) -> Job:
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
            jobs.append(file_job(path, out, pairs))
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
