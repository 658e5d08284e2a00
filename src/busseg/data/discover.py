"""One discovery function for every folder of scans the project reads.

:func:`discover` turns a folder into records (image path, mask paths or none, label or
``"unknown"``, patient or group where the dataset says) plus a report of what it skipped and
why. It recognises, in this order:

``busi``
    BUSI's distributed layout ``Dataset_BUSI_with_GT/{benign,malignant,normal}/`` with
    ``X.png`` and ``X_mask.png``, ``X_mask_1.png``, ... (merged by union; Al-Dhabyani et al.,
    Data in Brief 28, 2020, 104863), or one folder of such files.
``busbra``
    Image/mask folder pairs named as BUS-BRA: ``Images/bus_X.png`` <-> ``Masks/mask_X.png``,
    with ``bus_data.csv`` (columns ``ID``, ``Case``, ``Pathology``) giving the patient and
    the label (Gomez-Flores et al., Medical Physics 51, 2024, 3110-3123).
``pairs``
    Image/mask folder pairs with the same file name in both (BUS-UCLM: ``images/`` and
    ``masks/``, RGB colour-coded masks: green benign, red malignant, black none; an
    ``INFO.csv`` beside them gives the label per scan; Vallez et al., Scientific Data 12, 2025).
    The patient is the file-name prefix before the first ``_`` (``ALWI_000`` -> ``ALWI``).
``folder``
    A plain folder of scans without masks (PNG, JPEG, BMP, TIFF; DICOM ``.dcm`` when pydicom
    is installed), searched recursively; for prediction and annotation.

Records are :class:`busseg.data.busi.BusiRecord` objects (also exported as ``ScanRecord``), so
splits, datasets and the corrections store take them all alike.
"""

from __future__ import annotations

import csv
import os
import re
from pathlib import Path

from busseg.data.busi import (
    DATASET_DIRNAME,
    MASK_RE,
    BusiIndex,
    BusiRecord,
    discover_busi,
    image_size,
    natural_key,
    size_problems,
)
from busseg.data.io import IMAGE_SUFFIXES

ScanRecord = BusiRecord  # the same classes (busseg.data.busi defines them under both names)
ScanIndex = BusiIndex

LAYOUTS = ("busi", "busbra", "pairs", "folder")
_IMAGE_DIRS = ("images", "Images", "IMAGES", "image", "img", "imgs")
_MASK_DIRS = ("masks", "Masks", "MASKS", "mask", "labels", "gt", "GT")
_LABELS = {"benign": "benign", "malignant": "malignant", "normal": "normal"}


def scan_suffixes() -> tuple[str, ...]:
    """File suffixes read as scans: images, and ``.dcm`` when pydicom is importable."""
    try:
        import pydicom  # noqa: F401
    except ImportError:
        return IMAGE_SUFFIXES
    return (*IMAGE_SUFFIXES, ".dcm")


def _is_scan_file(p: Path, suffixes: tuple[str, ...]) -> bool:
    return p.is_file() and not p.name.startswith(".") and p.suffix.lower() in suffixes


def pair_dirs(root: Path) -> tuple[Path, Path] | None:
    """Find an image folder and a mask folder side by side (BUS-BRA, BUS-UCLM layouts).

    Parameters
    ----------
    root : pathlib.Path
        A dataset folder.

    Returns
    -------
    tuple of pathlib.Path or None
        ``(images, masks)``: the first image folder (``images``, ``image``, ``img``, ...)
        and the first mask folder (``masks``, ``mask``, ``labels``, ``gt``, ...) under
        ``root``; None unless both exist.
    """
    images = next((root / d for d in _IMAGE_DIRS if (root / d).is_dir()), None)
    masks = next((root / d for d in _MASK_DIRS if (root / d).is_dir()), None)
    return (images, masks) if images is not None and masks is not None else None


def detect_layout(root: str | os.PathLike) -> str:
    """Name the layout :func:`discover` will read ``root`` as.

    Parameters
    ----------
    root : str or os.PathLike
        A folder.

    Returns
    -------
    str
        One of :data:`LAYOUTS`.

    Raises
    ------
    FileNotFoundError
        If ``root`` does not exist.
    ValueError
        If ``root`` is a file.
    """
    root = Path(root).expanduser()
    if not root.exists():
        raise FileNotFoundError(f"no such folder: {root}")
    if not root.is_dir():
        raise ValueError(f"{root} is a file; give the folder that holds the scans")
    if (root / DATASET_DIRNAME).is_dir() or any(
        (root / c).is_dir() for c in ("benign", "malignant", "normal")
    ):
        return "busi"
    pair = pair_dirs(root)
    if pair is not None:
        images, _ = pair
        if any(p.stem.startswith("bus_") for p in images.iterdir()):
            return "busbra"
        return "pairs"
    files = [p for p in root.iterdir() if _is_scan_file(p, IMAGE_SUFFIXES)]
    if any(MASK_RE.match(p.stem) for p in files):
        return "busi"
    return "folder"


def discover(
    root: str | os.PathLike, *, layout: str | None = None, check_sizes: bool = True
) -> BusiIndex:
    """Index a folder of scans: one record per scan, with its masks where it has them.

    Parameters
    ----------
    root : str or os.PathLike
        A BUSI dataset (``Dataset_BUSI_with_GT``, its parent or one class folder), an
        image/mask folder pair (BUS-BRA, BUS-UCLM or any same-name pair) or a plain folder of
        scans.
    layout : str, optional
        Force one of :data:`LAYOUTS` instead of detecting it.
    check_sizes : bool
        Read each image's and mask's header (not the pixels) and report size mismatches
        (BUS-UCLM patient HESN's images are smaller than their masks).

    Returns
    -------
    BusiIndex
        ``records`` (sorted in natural file order), ``problems`` (everything skipped or
        suspicious, with the reason: masks without an image, images without a mask in a
        labelled layout, size mismatches, unreadable headers) and ``layout``. Plain folders
        report no missing masks: their scans have none by design.

    Raises
    ------
    FileNotFoundError
        If ``root`` does not exist.
    ValueError
        If ``root`` is a file, ``layout`` is unknown, or the folder holds no scan; the
        message says which layouts are read.
    """
    root = Path(root).expanduser()
    layout = layout or detect_layout(root)
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; use one of {LAYOUTS}")
    if layout == "busi":
        index = discover_busi(root, check_sizes=check_sizes)
    elif layout in ("busbra", "pairs"):
        index = _discover_pairs(root, layout, check_sizes)
    else:
        index = _discover_folder(root, check_sizes)
    index.layout = layout
    return index


def _read_table(path: Path, delimiter: str) -> list[dict]:
    with open(path, newline="", encoding="utf-8-sig") as fh:
        return [{k.strip(): (v or "").strip() for k, v in row.items() if k}
                for row in csv.DictReader(fh, delimiter=delimiter)]


def _busbra_meta(root: Path) -> dict[str, tuple[str, str | None]]:
    table = root / "bus_data.csv"
    if not table.is_file():
        return {}
    out = {}
    for row in _read_table(table, ","):
        rid = row.get("ID", "")
        label = _LABELS.get(row.get("Pathology", "").lower(), "unknown")
        case = row.get("Case") or None
        out[rid] = (label, case)
    return out


def _info_meta(root: Path) -> dict[str, tuple[str, str | None]]:
    table = next((root / n for n in ("INFO.csv", "info.csv") if (root / n).is_file()), None)
    if table is None:
        return {}
    head = table.read_text(encoding="utf-8-sig").splitlines()[:1]
    delim = ";" if head and head[0].count(";") > head[0].count(",") else ","
    out = {}
    for row in _read_table(table, delim):
        name = row.get("Image", "")
        out[Path(name).stem] = (_LABELS.get(row.get("Label", "").lower(), "unknown"), None)
    return out


def mask_colour_label(path: str | os.PathLike) -> str:
    """Class of a colour-coded BUS-UCLM mask: green benign, red malignant, black normal.

    Parameters
    ----------
    path : str or os.PathLike
        An RGB(A) mask PNG.

    Returns
    -------
    str
        ``"normal"`` (no lesion pixel), ``"benign"`` (green dominates), ``"malignant"``
        (red dominates) or ``"unknown"`` (grey/binary lesion pixels, no colour code).
    """
    import numpy as np
    from PIL import Image

    with Image.open(path) as im:
        a = np.asarray(im.convert("RGB"))
    lesion = a.max(axis=-1) > 0
    if not lesion.any():
        return "normal"
    r = int(a[..., 0][lesion].astype(np.int64).sum())
    g = int(a[..., 1][lesion].astype(np.int64).sum())
    b = int(a[..., 2][lesion].astype(np.int64).sum())
    if g > 2 * max(r, b):
        return "benign"
    if r > 2 * max(g, b):
        return "malignant"
    return "unknown"


def _patient_of(stem: str) -> str | None:
    m = re.match(r"^([A-Za-z]+)_\d+$", stem)
    return m.group(1) if m else None


def _discover_pairs(root: Path, layout: str, check_sizes: bool) -> BusiIndex:
    pair = pair_dirs(root)
    if pair is None:
        raise ValueError(
            f"{root} has no image/mask folder pair; expected e.g. 'images/' and 'masks/' "
            "(BUS-UCLM) or 'Images/' and 'Masks/' (BUS-BRA)"
        )
    img_dir, mask_dir = pair
    suffixes = scan_suffixes()
    meta = _busbra_meta(root) if layout == "busbra" else _info_meta(root)
    masks = {p.stem: p for p in mask_dir.iterdir() if _is_scan_file(p, IMAGE_SUFFIXES)}
    index = BusiIndex(root=root)
    used: set[str] = set()
    for img in sorted((p for p in img_dir.iterdir() if _is_scan_file(p, suffixes)),
                      key=lambda p: natural_key(p.name)):
        stem = img.stem
        candidates = [stem]
        if stem.startswith("bus_"):
            candidates.insert(0, "mask_" + stem[len("bus_"):])
        candidates += [f"{stem}_mask"]
        mstem = next((c for c in candidates if c in masks), None)
        mps = (masks[mstem],) if mstem is not None else ()
        if mstem is not None:
            used.add(mstem)
        label, group = meta.get(stem, ("unknown", None))
        if layout == "pairs":
            group = _patient_of(stem)
            if label == "unknown" and mps:
                try:
                    label = mask_colour_label(mps[0])
                except Exception:  # noqa: BLE001 - reported below by the size check
                    label = "unknown"
        problems: list[str] = []
        size = None
        if not mps:
            problems.append(f"image without a mask: {img}")
        if check_sizes and img.suffix.lower() != ".dcm":
            size, found = size_problems(img, mps, folders=True)
            problems += found
        index.records.append(BusiRecord(
            name=stem, label=label, image_path=img, mask_paths=mps,
            rel_path=img.relative_to(root).as_posix(), size=size, problems=tuple(problems),
            group=group,
        ))
        index.problems.extend(problems)
    for stem in sorted(set(masks) - used, key=natural_key):
        index.problems.append(f"mask without an image: {masks[stem]}")
    if not index.records:
        raise ValueError(f"no scans found in {img_dir}; expected PNG/JPEG/BMP/TIFF files")
    return index


def _discover_folder(root: Path, check_sizes: bool) -> BusiIndex:
    suffixes = scan_suffixes()
    index = BusiIndex(root=root)
    files = sorted((p for p in root.rglob("*") if _is_scan_file(p, suffixes)
                    and not any(part.startswith(".") for part in p.relative_to(root).parts)),
                   key=lambda p: natural_key(p.relative_to(root).as_posix()))
    for img in files:
        problems: list[str] = []
        size = None
        if check_sizes and img.suffix.lower() != ".dcm":
            size = image_size(img)
            if size is None:
                problems.append(f"unreadable image: {img}")
        rel = img.relative_to(root)
        index.records.append(BusiRecord(
            name=img.stem, label="unknown", image_path=img, mask_paths=(),
            rel_path=rel.as_posix(), size=size, problems=tuple(problems),
            group=rel.parent.as_posix() if rel.parent != Path(".") else None,
        ))
        index.problems.extend(problems)
    if not index.records:
        raise ValueError(
            f"no scans found in {root}; expected image files ({', '.join(suffixes)}), a BUSI "
            f"dataset ({DATASET_DIRNAME}) or an image/mask folder pair (images/ + masks/)"
        )
    return index


#: Citation and licence of the datasets the project trains and benchmarks on, by the folder
#: names they are distributed under (lower case).
CITATIONS = {
    "busi": "BUSI (Al-Dhabyani et al., Data in Brief 28, 2020, 104863; CC BY 4.0)",
    "busuclm": "BUS-UCLM (Vallez et al., Scientific Data 12, 2025, "
               "doi:10.1038/s41597-025-04562-3; research use)",
    "busbra": "BUS-BRA (Gomez-Flores et al., Medical Physics 51, 2024, 3110-3123; CC BY 4.0)",
}


def _dataset_key(root: str | os.PathLike) -> str | None:
    parts = [p.lower().replace("-", "").replace("_", "") for p in Path(root).resolve().parts]
    for part in reversed(parts):
        for key in CITATIONS:
            if part.startswith(key) or (key == "busi" and part == "datasetbusiwithgt"):
                return key
    return None


def dataset_citation(root: str | os.PathLike) -> str:
    """Return the citation of a known dataset folder (BUSI, BUS-UCLM, BUS-BRA), else its name.

    Parameters
    ----------
    root : str or os.PathLike
        A dataset folder, e.g. ``../shared/data/busuclm-dev``.

    Returns
    -------
    str
        E.g. ``"BUS-UCLM (Vallez et al., ...; research use)"``, or ``"folder <name>"``.
    """
    key = _dataset_key(root)
    return CITATIONS[key] if key else f"folder {Path(root).name}"


def default_split(root: str | os.PathLike) -> Path:
    """Return the committed split CSV of a dataset folder (``training/splits/<name>.csv``).

    Parameters
    ----------
    root : str or os.PathLike
        A BUSI or BUS-UCLM folder.

    Returns
    -------
    pathlib.Path
        ``training/splits/busi.csv`` or ``training/splits/busuclm.csv`` in this repository.

    Raises
    ------
    ValueError
        If the folder is not a dataset with a committed split; make one with
        ``training/make_split.py``.
    """
    key = _dataset_key(root)
    path = Path(__file__).resolve().parents[3] / "training" / "splits" / f"{key}.csv"
    if key is None or not path.is_file():
        raise ValueError(f"no committed split for {root}; make one with "
                         "training/make_split.py and pass it with --split")
    return path
