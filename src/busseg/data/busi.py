"""Discovery of BUSI-layout datasets (Al-Dhabyani et al., Data in Brief 28, 2020, 104863).

The distributed layout is ``Dataset_BUSI_with_GT/{benign,malignant,normal}/`` with files
``benign (1).png``, ``benign (1)_mask.png``, ``benign (1)_mask_1.png``, ...; an image's ground
truth is the union of all its masks.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from busseg.data.io import IMAGE_SUFFIXES

CLASSES = ("benign", "malignant", "normal")
DATASET_DIRNAME = "Dataset_BUSI_with_GT"
#: Matches a BUSI mask file stem (``"<stem>_mask"`` or ``"<stem>_mask_<k>"``); groups
#: ``stem`` (the image's stem) and ``k`` (the mask's index, None for the first).
MASK_RE = re.compile(r"^(?P<stem>.+?)_mask(?:_(?P<k>\d+))?$", re.IGNORECASE)


@dataclass(frozen=True)
class ScanRecord:
    """One scan of a dataset or folder (any layout :func:`busseg.data.discover` reads).

    ``BusiRecord`` is the same class under its earlier name (kept as a deprecated alias).

    Attributes
    ----------
    name : str
        File stem, e.g. ``"benign (1)"``.
    label : str
        ``"benign"``, ``"malignant"``, ``"normal"`` or ``"unknown"``.
    image_path : pathlib.Path
        The image file.
    mask_paths : tuple of pathlib.Path
        Its mask files in order (``_mask``, ``_mask_1``, ...); empty when it has none.
    rel_path : str
        Image path relative to the dataset root with forward slashes, e.g.
        ``"benign/benign (1).png"`` (the key used in split files).
    size : tuple of int or None
        (width, height) of the image in pixels, read from the header when sizes are checked.
    problems : tuple of str
        What is wrong with this record (no mask, size mismatch); empty when it is usable.
    group : str or None
        Patient or group the scan belongs to where the dataset says (BUS-BRA ``Case``,
        BUS-UCLM file prefix, a plain folder's sub-folder); None for BUSI, whose patients are
        unknown. Splits keep a group together.
    """

    name: str
    label: str
    image_path: Path
    mask_paths: tuple[Path, ...]
    rel_path: str
    size: tuple[int, int] | None = None
    problems: tuple[str, ...] = ()
    group: str | None = None

    @property
    def usable(self) -> bool:
        """True when the record has at least one mask and no problem."""
        return bool(self.mask_paths) and not self.problems


@dataclass
class ScanIndex:
    """The records of a folder, as :func:`busseg.data.discover` and :func:`discover_busi` give them.

    ``BusiIndex`` is the same class under its earlier name (kept as a deprecated alias).

    Attributes
    ----------
    root : pathlib.Path
        The dataset root that relative paths refer to.
    records : list of BusiRecord
        One per image file, sorted by class then natural number order.
    problems : list of str
        Every problem found: images without a mask, masks without an image, size mismatches.
    layout : str
        How the folder was read: ``"busi"``, ``"busbra"``, ``"pairs"`` or ``"folder"`` (see
        :func:`busseg.data.discover.discover`).
    """

    root: Path
    records: list[BusiRecord] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    layout: str = "busi"

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self):
        return iter(self.records)

    @property
    def usable(self) -> list[BusiRecord]:
        """Records with at least one mask and no problem (the ones training may use)."""
        return [r for r in self.records if r.usable]

    def counts(self) -> dict[str, int]:
        """Count the images per class."""
        return dict(Counter(r.label for r in self.records))

    def by_rel_path(self) -> dict[str, BusiRecord]:
        """Return the records keyed by ``rel_path``."""
        return {r.rel_path: r for r in self.records}


def natural_key(s: str) -> list:
    """Sort key that orders digit runs by value: ``"benign (2)"`` before ``"benign (10)"``.

    Parameters
    ----------
    s : str
        A file name or relative path.

    Returns
    -------
    list
        Alternating lower-cased text and int parts, for ``sorted(..., key=natural_key)``.
    """
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", s)]


def is_busi_image(path: str | os.PathLike) -> bool:
    """Whether ``path`` names an image file (not a mask) by BUSI naming.

    Parameters
    ----------
    path : str or os.PathLike
        A file path; the file need not exist.

    Returns
    -------
    bool
        True for ``.png``/``.jpg``/``.tif``/``.bmp`` files whose stem does not end in
        ``_mask`` or ``_mask_<k>``.
    """
    p = Path(path)
    return p.suffix.lower() in IMAGE_SUFFIXES and not MASK_RE.match(p.stem)


def _label_for(folder: Path, stem: str) -> str:
    if folder.name.lower() in CLASSES:
        return folder.name.lower()
    head = stem.split(" ")[0].split("(")[0].strip().lower()
    return head if head in CLASSES else "unknown"


def image_size(path: Path) -> tuple[int, int] | None:
    """Read an image file's (width, height) from its header, without decoding the pixels.

    Parameters
    ----------
    path : pathlib.Path
        An image file Pillow can open.

    Returns
    -------
    tuple of int or None
        ``(width, height)`` in pixels, or None when the file cannot be opened (the caller
        reports it as a problem).
    """
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.size
    except Exception:  # noqa: BLE001 - reported as a problem by the caller
        return None


def size_problems(image: Path, masks: tuple[Path, ...], *,
                  folders: bool = False) -> tuple[tuple[int, int] | None, list[str]]:
    """Read the headers of an image and its masks and say what does not fit.

    Parameters
    ----------
    image : pathlib.Path
        The image file.
    masks : tuple of pathlib.Path
        Its mask files.
    folders : bool
        Name the files with their folder (``images/X.png``, ``masks/X.png``), for layouts
        where image and mask have the same name.

    Returns
    -------
    size : tuple of int or None
        (width, height) of the image in pixels; None when its header cannot be read.
    problems : list of str
        ``"unreadable image: ..."``, ``"unreadable mask: ..."`` or ``"size mismatch: ..."``.
    """
    def name(p: Path) -> str:
        return f"{p.parent.name}/{p.name}" if folders else p.name

    size = image_size(image)
    if size is None:
        return None, [f"unreadable image: {image}"]
    problems = []
    for mp in masks:
        msize = image_size(mp)
        if msize is None:
            problems.append(f"unreadable mask: {mp}")
        elif msize != size:
            problems.append(f"size mismatch: {name(image)} is {size[0]}x{size[1]} but "
                            f"{name(mp)} is {msize[0]}x{msize[1]}"
                            + (" (skipped for training and evaluation)" if folders else ""))
    return size, problems


def resolve_busi_root(root: str | os.PathLike) -> tuple[Path, list[Path]]:
    """Find the dataset root and the class folders to scan.

    Parameters
    ----------
    root : str or os.PathLike
        The ``Dataset_BUSI_with_GT`` folder, its parent, or one class folder (``benign`` ...),
        or any folder of ``<stem>.png`` images with ``<stem>_mask*.png`` masks.

    Returns
    -------
    root : pathlib.Path
        The folder relative paths refer to.
    folders : list of pathlib.Path
        The folders holding images.

    Raises
    ------
    FileNotFoundError
        If ``root`` does not exist.
    ValueError
        If the folder is not BUSI-like; the message says what was expected.
    """
    root = Path(root).expanduser()
    if not root.exists():
        raise FileNotFoundError(f"no such folder: {root}")
    if root.is_file():
        raise ValueError(
            f"{root} is a file; give the BUSI dataset folder ({DATASET_DIRNAME}) or a class "
            "folder (benign, malignant or normal)"
        )
    if (root / DATASET_DIRNAME).is_dir():
        root = root / DATASET_DIRNAME
    class_dirs = [root / c for c in CLASSES if (root / c).is_dir()]
    if class_dirs:
        return root, class_dirs
    files = [p for p in root.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
    if any(MASK_RE.match(p.stem) for p in files):
        return root.parent, [root]
    raise ValueError(
        f"{root} is not a BUSI-like folder: expected {DATASET_DIRNAME}/ with class folders "
        f"{', '.join(CLASSES)}, or one folder of images '<name>.png' with masks "
        f"'<name>_mask.png' (and '<name>_mask_1.png', ... for further lesions)"
    )


def discover_busi(root: str | os.PathLike, *, check_sizes: bool = True) -> BusiIndex:
    """Index a BUSI-layout dataset: one record per image with all its mask paths.

    Parameters
    ----------
    root : str or os.PathLike
        The dataset root (``Dataset_BUSI_with_GT`` or its parent) or one class folder.
    check_sizes : bool
        Read each image's and mask's header (not the pixels) and report size mismatches.

    Returns
    -------
    BusiIndex
        Records sorted by class and natural order, and the list of problems found. Images
        without a mask, masks without an image, unreadable files and size mismatches are
        reported in ``problems`` (and on the record), never dropped silently.

    Raises
    ------
    FileNotFoundError
        If ``root`` does not exist.
    ValueError
        If the folder is not BUSI-like, or holds no image at all.
    """
    base, folders = resolve_busi_root(root)
    index = ScanIndex(root=base)
    for folder in folders:
        images: dict[str, Path] = {}
        masks: dict[str, list[tuple[int, Path]]] = {}
        for p in folder.iterdir():
            if not p.is_file() or p.suffix.lower() not in IMAGE_SUFFIXES or p.name.startswith("."):
                continue
            m = MASK_RE.match(p.stem)
            if m:
                masks.setdefault(m.group("stem"), []).append((int(m.group("k") or 0), p))
            else:
                images[p.stem] = p
        for stem in sorted(set(masks) - set(images), key=natural_key):
            for _, mp in sorted(masks[stem]):
                index.problems.append(f"mask without an image: {mp}")
        for stem in sorted(images, key=natural_key):
            img = images[stem]
            mps = tuple(p for _, p in sorted(masks.get(stem, [])))
            problems: list[str] = []
            size = None
            if not mps:
                problems.append(f"image without a mask: {img}")
            if check_sizes:
                size, found = size_problems(img, mps)
                problems += found
            rel = img.relative_to(base).as_posix()
            rec = ScanRecord(
                name=stem,
                label=_label_for(folder, stem),
                image_path=img,
                mask_paths=mps,
                rel_path=rel,
                size=size,
                problems=tuple(problems),
            )
            index.records.append(rec)
            index.problems.extend(problems)
    if not index.records:
        raise ValueError(
            f"no images found under {root}; expected files like 'benign (1).png' beside "
            "'benign (1)_mask.png'"
        )
    return index


#: Earlier names of :class:`ScanRecord` and :class:`ScanIndex` (deprecated aliases: the records
#: come from any folder layout, not only BUSI).
BusiRecord = ScanRecord
BusiIndex = ScanIndex
