"""The manifest of a corrections folder: every case the annotator left, as they decided it.

Qt-free and torch-free (numpy, scipy.ndimage, csv). A corrections folder
(:class:`busseg.corrections.CorrectionStore`) keeps each recorded case as
``<corrections>/<class>/<name>.png`` (a copy of the image) and ``<name>_mask.png`` (the mask),
the BUSI layout fine-tuning and ``training/train.py`` read. Beside them,
``<corrections>/manifest.csv`` holds one row per case, the latest decision:

========== ==================================================================================
column     meaning
========== ==================================================================================
seq        1, 2, 3 ...: the order the decisions were recorded in (a case recorded again gets
           a new, higher number); leave-later-out hold-outs follow it
name       the case's name in the corrections folder (the file stem of both files)
status     :data:`ACCEPTED`, :data:`CORRECTED`, :data:`NORMAL` or :data:`BRUSHED`
label      the class folder: ``benign``, ``malignant``, ``normal`` or ``unknown``
image      the source scan's path as the case list gave it
mask       the mask file, relative to the corrections folder (``<class>/<name>_mask.png``)
regions    number of 8-connected lesion regions in the mask
area_px    lesion pixels
area_mm2   lesion area in mm² where the scan (DICOM) gives its pixel spacing, else empty
checkpoint the checkpoint that made the automatic prediction: its path, or ``default``
time       when it was recorded, ISO 8601 in UTC (``2026-12-07T02:50:00.123+00:00``)
========== ==================================================================================

Statuses: an unedited automatic prediction the annotator moved on from is :data:`ACCEPTED`
(saved as it is; an empty accepted prediction is a normal answer too: its mask stays empty),
an edited one is :data:`CORRECTED` (prompts, erasing or any other edit), a scan marked "no
lesion" is :data:`NORMAL`, a mask drawn by hand is :data:`BRUSHED`.

The file is rewritten whole and atomically (a temporary file in the same folder, fsync,
``os.replace``) after the case's mask files are written, so a crash or a kill leaves either the
previous or the new manifest, never a torn one. A row whose files are missing is reported, not
trusted (:func:`check_files`). A folder written before manifests existed (masks, no
``manifest.csv``) reads as :data:`CORRECTED` rows (:meth:`CaseManifest.legacy_rows`), written
into a manifest at the first save.
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

__all__ = [
    "ACCEPTED", "BRUSHED", "COLUMNS", "CORRECTED", "CaseManifest", "MANIFEST_NAME",
    "ManifestError", "ManifestRow", "NORMAL", "STATUSES", "check_files", "mask_stats",
    "now_iso", "spacing_of", "sweep_temporaries",
]

#: The annotator moved on from an unedited automatic prediction: it is saved as it is.
ACCEPTED = "accepted"
#: The annotator edited the automatic mask (prompts, erasing or any other edit).
CORRECTED = "corrected"
#: The annotator marked the scan "no lesion": an empty mask in the ``normal`` class folder.
NORMAL = "normal"
#: The annotator drew the mask by hand.
BRUSHED = "brushed"
#: Every status a manifest row may have.
STATUSES = (ACCEPTED, CORRECTED, NORMAL, BRUSHED)
#: The manifest's file name inside the corrections folder.
MANIFEST_NAME = "manifest.csv"
#: The manifest's columns, in the order they are written.
COLUMNS = ("seq", "name", "status", "label", "image", "mask", "regions", "area_px",
           "area_mm2", "checkpoint", "time")
#: Class folders a row may name (those of :data:`busseg.corrections.LABELS`).
_LABELS = ("benign", "malignant", "normal", "unknown")
_ENCODING = "utf-8"
_ERRORS = "surrogateescape"  # file names that are not valid UTF-8 round-trip unchanged


class ManifestError(ValueError):
    """A corrections folder's manifest cannot be used; the message says what to do."""


@dataclass(frozen=True)
class ManifestRow:
    """One recorded case (one line of ``manifest.csv``).

    Attributes
    ----------
    name : str
        The case's name in the corrections folder.
    status : str
        One of :data:`STATUSES`.
    label : str
        Class folder: ``"benign"``, ``"malignant"``, ``"normal"`` or ``"unknown"``.
    image : str
        The source scan's path as the case list gave it ("" when unknown: a migrated folder).
    mask : str
        The mask file relative to the corrections folder, forward slashes.
    regions : int
        Number of 8-connected lesion regions.
    area_px : int
        Lesion pixels.
    area_mm2 : float or None
        Lesion area in mm² where the pixel spacing is known.
    checkpoint : str
        The checkpoint that predicted the case (its path), ``"default"`` for the shipped
        model, "" when unknown (a migrated folder).
    time : str
        ISO 8601 time of the decision, UTC.
    seq : int
        Recording order (>= 1; 0 for a row not written yet).
    extra : dict
        Columns this version does not know, kept as read so rewriting never drops them.
    """

    name: str
    status: str
    label: str
    image: str
    mask: str
    regions: int
    area_px: int
    area_mm2: float | None
    checkpoint: str
    time: str
    seq: int = 0
    extra: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def image_copy(self) -> str:
        """The image copy relative to the corrections folder: ``<class>/<name>.png``."""
        return f"{self.label}/{self.name}.png"

    def mask_path(self, root: str | os.PathLike) -> Path:
        """Return the mask file under the corrections folder ``root``."""
        return Path(root).joinpath(*PurePosixPath(self.mask).parts)

    def image_copy_path(self, root: str | os.PathLike) -> Path:
        """Return the image copy under the corrections folder ``root``."""
        return Path(root) / self.label / f"{self.name}.png"

    def as_csv(self) -> dict[str, str]:
        """Return the row as the strings written to the file (column -> text)."""
        out = {k: str(v) for k, v in self.extra.items()}
        for k, v in asdict(self).items():
            if k == "extra":
                continue
            if k == "area_mm2":
                v = "" if v is None else f"{float(v):.4f}"
            out[k] = str(v)
        return out


def now_iso() -> str:
    """Return the current time as ISO 8601 in UTC with milliseconds (``...+00:00``)."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def mask_stats(mask: Any, spacing_mm: Sequence[float] | None = None
               ) -> tuple[int, int, float | None]:
    """Count a mask's lesion regions and measure its area.

    Parameters
    ----------
    mask : array_like
        (H, W) mask, any dtype; values > 0 are lesion.
    spacing_mm : (float, float), optional
        (row, col) pixel spacing in mm (e.g. a DICOM's ``spacing_mm``).

    Returns
    -------
    regions : int
        Number of 8-connected lesion components.
    area_px : int
        Lesion pixels.
    area_mm2 : float or None
        ``area_px * row_spacing * col_spacing``; None without a spacing.

    Raises
    ------
    ValueError
        If ``mask`` is not 2D.
    """
    from scipy import ndimage

    arr = np.asarray(mask) > 0
    if arr.ndim != 2:
        raise ValueError(f"a mask must be 2D (H, W), got shape {arr.shape}")
    area = int(arr.sum())
    regions = int(ndimage.label(arr, structure=np.ones((3, 3), bool))[1]) if area else 0
    mm2 = None
    if spacing_mm is not None:
        dy, dx = (float(v) for v in spacing_mm)
        mm2 = area * dy * dx
    return regions, area, mm2


def spacing_of(image_path: str | os.PathLike) -> tuple[float, float] | None:
    """Pixel spacing in mm of a scan where its file says (DICOM with pydicom installed).

    Parameters
    ----------
    image_path : str or os.PathLike
        The source scan.

    Returns
    -------
    (float, float) or None
        (row, col) spacing in mm (:func:`busseg.data.dicom.read_dicom_header`'s
        ``spacing_mm``); None for other files, without pydicom, or when the header has none
        or cannot be read.
    """
    from busseg.data import dicom

    try:
        if not dicom.is_dicom(image_path) or not dicom.has_pydicom():
            return None
        spacing = dicom.read_dicom_header(image_path).get("spacing_mm")
    except (ImportError, OSError, ValueError):
        return None
    return tuple(spacing) if spacing else None


def _parse_row(raw: Mapping[str | None, Any], line: int, path: Path) -> ManifestRow:
    def bad(what: str) -> ManifestError:
        return ManifestError(
            f"{path}, line {line}: {what}. The manifest was changed by hand or by another "
            f"program; fix that line, or move {path.name} aside (rename it) and reopen the "
            "folder: its masks are then read again as corrected cases")

    if None in raw or any(v is None for v in raw.values()):
        raise bad(f"it has a different number of fields than the header ({len(COLUMNS)} "
                  "columns expected)")
    values = {k: (v or "") for k, v in raw.items()}
    status = values["status"].strip()
    if status not in STATUSES:
        raise bad(f"status {status!r} is not one of {', '.join(STATUSES)}")
    label = values["label"].strip()
    if label not in _LABELS:
        raise bad(f"class {label!r} is not one of {', '.join(_LABELS)}")
    name = values["name"]
    if not name or "/" in name or "\\" in name or name in (".", ".."):
        raise bad(f"case name {name!r} is not a plain file name")
    mask = values["mask"].strip()
    parts = PurePosixPath(mask).parts
    if not mask or PurePosixPath(mask).is_absolute() or ".." in parts or "\\" in mask:
        raise bad(f"mask {mask!r} is not a path inside the corrections folder")
    if mask != f"{label}/{name}_mask.png":
        raise bad(f"mask {mask!r} is not {label}/{name}_mask.png, where the class folder "
                  "layout that fine-tuning reads keeps the case's mask")
    try:
        seq = int(values["seq"])
        regions = int(values["regions"])
        area = int(values["area_px"])
        mm2 = float(values["area_mm2"]) if values["area_mm2"].strip() else None
    except ValueError:
        raise bad("seq, regions and area_px must be whole numbers and area_mm2 a number or "
                  "empty") from None
    if seq < 1 or regions < 0 or area < 0:
        raise bad("seq must be >= 1, regions and area_px >= 0")
    extra = {k: v for k, v in values.items() if k not in COLUMNS}
    return ManifestRow(name, status, label, values["image"], mask, regions, area, mm2,
                       values["checkpoint"], values["time"], seq, extra)


def check_files(root: str | os.PathLike, rows: Iterable[ManifestRow]
                ) -> tuple[list[ManifestRow], list[str]]:
    """Split rows into those whose files exist and problems naming the missing files.

    Parameters
    ----------
    root : str or os.PathLike
        The corrections folder.
    rows : iterable of ManifestRow

    Returns
    -------
    trusted : list of ManifestRow
        Rows whose mask and image copy are both files.
    problems : list of str
        One line per other row: which file is missing, and that the case counts as not
        recorded until it is recorded again.
    """
    root = Path(root)
    trusted, problems = [], []
    for row in rows:
        missing = [p for p in (row.mask_path(root), row.image_copy_path(root))
                   if not p.is_file()]
        if missing:
            problems.append(
                f"manifest row {row.seq} ({row.name!r}, {row.status}): "
                f"{' and '.join(str(p) for p in missing)} missing; the case counts as not "
                "recorded until it is recorded again")
        else:
            trusted.append(row)
    return trusted, problems


def sweep_temporaries(root: str | os.PathLike, *, older_than_s: float = 3600.0) -> int:
    """Remove temporary files that a killed save left in a corrections folder.

    An atomic write (:func:`busseg.data.io.atomic_output`) writes ``.<name>.<random>.tmp``
    beside its target and renames it; a process killed in between leaves it behind
    (hidden, ignored by every reader). Only such files older than ``older_than_s`` are
    removed, in the folder, its class folders and ``versions/<class>/``, so a save in
    progress elsewhere is never disturbed.

    Parameters
    ----------
    root : str or os.PathLike
        The corrections folder.
    older_than_s : float
        Minimum age in seconds (modification time).

    Returns
    -------
    int
        Number of files removed.
    """
    root = Path(root)
    folders = [root] + [root / lb for lb in _LABELS] + [root / "versions" / lb
                                                          for lb in _LABELS]
    limit = datetime.now().timestamp() - older_than_s
    removed = 0
    for folder in folders:
        try:
            entries = list(os.scandir(folder))
        except OSError:
            continue
        for e in entries:
            if not (e.name.startswith(".") and e.name.endswith(".tmp")):
                continue
            try:
                if e.is_file(follow_symlinks=False) and e.stat().st_mtime < limit:
                    os.unlink(e.path)
                    removed += 1
            except OSError:
                pass
    return removed


class CaseManifest:
    """Read and write ``<corrections>/manifest.csv`` (one row per recorded case).

    Parameters
    ----------
    root : str or os.PathLike
        The corrections folder (it need not exist yet).

    Notes
    -----
    :meth:`record` reads the file again before adding a row, so rows written meanwhile by
    another session on the same folder are kept (the last writer of one case's row wins).
    """

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        self.path = self.root / MANIFEST_NAME

    def __repr__(self) -> str:
        return f"CaseManifest({str(self.root)!r})"

    def exists(self) -> bool:
        """Whether ``manifest.csv`` exists."""
        return self.path.is_file()

    def read(self) -> list[ManifestRow]:
        """Read the rows, one per case (the latest decision), in recording order.

        Returns
        -------
        list of ManifestRow
            Sorted by ``seq``; empty when there is no manifest.

        Raises
        ------
        ManifestError
            If the file is not a manifest: not UTF-8 text, no CSV, empty, missing columns,
            a bad status, class, number or path on some line. The message says how to
            recover (fix the line, or move the file aside so the folder is migrated again).
        """
        if not self.path.exists():
            return []
        if self.path.is_dir():
            raise ManifestError(f"{self.path} is a folder; rename it so the manifest can be "
                                "written there")
        aside = (f"move {self.path.name} aside (rename it) and reopen the folder: its masks "
                 "are then read again as corrected cases")
        try:
            text = self.path.read_bytes().decode(_ENCODING, _ERRORS)
        except OSError as exc:
            raise ManifestError(f"{self.path} cannot be read ({exc}); check its permissions"
                                ) from exc
        if "\x00" in text:
            raise ManifestError(f"{self.path} is not a text file (it holds NUL bytes); {aside}")
        try:
            reader = csv.DictReader(io.StringIO(text, newline=""), strict=True)
            header = reader.fieldnames
            if not header:
                raise ManifestError(f"{self.path} is empty (no header line); {aside}")
            missing = [c for c in COLUMNS if c not in header]
            if missing:
                raise ManifestError(
                    f"{self.path} lacks the column(s) {', '.join(missing)} (it has "
                    f"{', '.join(map(str, header))}); it is not a napari-busseg manifest or "
                    f"was cut short: {aside}")
            latest: dict[str, ManifestRow] = {}
            for raw in reader:
                row = _parse_row(raw, reader.line_num, self.path)
                old = latest.get(row.name)
                if old is None or row.seq > old.seq:
                    latest[row.name] = row
        except csv.Error as exc:
            raise ManifestError(f"{self.path} is not valid CSV ({exc}); {aside}") from exc
        return sorted(latest.values(), key=lambda r: (r.seq, r.name))

    def write(self, rows: Iterable[ManifestRow]) -> Path:
        """Replace the manifest with ``rows`` (sorted by ``seq``), atomically.

        A temporary file beside it is written, fsynced and renamed over it
        (:func:`busseg.data.io.atomic_write_bytes`), so readers see the old or the new file.

        Parameters
        ----------
        rows : iterable of ManifestRow
            Rows with ``seq >= 1``.

        Returns
        -------
        pathlib.Path
            The manifest's path.

        Raises
        ------
        OSError
            If the folder cannot be written.
        """
        from busseg.data.io import atomic_write_bytes

        rows = sorted(rows, key=lambda r: (r.seq, r.name))
        extras = sorted({k for r in rows for k in r.extra if k not in COLUMNS})
        buf = io.StringIO(newline="")
        writer = csv.DictWriter(buf, fieldnames=list(COLUMNS) + extras, lineterminator="\n",
                                restval="")
        writer.writeheader()
        for r in rows:
            writer.writerow(r.as_csv())
        data = buf.getvalue().encode(_ENCODING, _ERRORS)
        return atomic_write_bytes(self.path, data, overwrite=True)

    def record(self, row: ManifestRow, *, pending: Sequence[ManifestRow] = ()
               ) -> ManifestRow:
        """Add or replace a case's row (with the next ``seq``) and write the manifest.

        Parameters
        ----------
        row : ManifestRow
            The decision; its ``seq`` is ignored.
        pending : sequence of ManifestRow
            Rows to add first where the manifest has none for their case (a migrated legacy
            folder's :meth:`legacy_rows`), numbered in the given order.

        Returns
        -------
        ManifestRow
            ``row`` with its ``seq``.

        Raises
        ------
        ManifestError
            If the manifest on disk is corrupt (see :meth:`read`).
        OSError
            If it cannot be written.
        """
        rows = {r.name: r for r in self.read()}
        seq = max((r.seq for r in rows.values()), default=0)
        for p in pending:
            if p.name not in rows and p.name != row.name:
                seq += 1
                rows[p.name] = replace(self._measured(p), seq=seq)
        stored = replace(row, seq=seq + 1)
        rows[row.name] = stored
        self.write(rows.values())
        return stored

    def _measured(self, row: ManifestRow) -> ManifestRow:
        """Fill a migrated row's regions and area from its mask (unchanged if unreadable)."""
        from busseg.data.io import read_mask

        try:
            regions, area, _ = mask_stats(read_mask(row.mask_path(self.root)))
        except (OSError, ValueError):
            return row
        return replace(row, regions=regions, area_px=area)

    def scan_masks(self, labels: Sequence[str] = _LABELS) -> dict[str, tuple[str, Path]]:
        """Find the mask files in the class folders: name -> (class, path).

        Returns
        -------
        dict
            ``<class>/<name>_mask.png`` files found (first class in ``labels`` order wins for
            a name in two folders); empty when the folder does not exist.
        """
        out: dict[str, tuple[str, Path]] = {}
        for label in labels:
            folder = self.root / label
            if not folder.is_dir():
                continue
            for entry in os.scandir(folder):
                if entry.name.endswith("_mask.png") and not entry.name.startswith("."):
                    name = entry.name[: -len("_mask.png")]
                    if name not in out:
                        out[name] = (label, Path(entry.path))
        return out

    def legacy_rows(self, known: Iterable[str], *, images: Mapping[str, str] | None = None,
                    labels: Sequence[str] = _LABELS) -> list[ManifestRow]:
        """Rows for masks in the class folders that the manifest has no row for.

        Used for a folder written before manifests existed, and for a save cut short after
        its mask was written and before the manifest was: such masks count as
        :data:`CORRECTED`, in the order of their files' modification times.

        Parameters
        ----------
        known : iterable of str
            Case names the manifest has rows for.
        images : mapping, optional
            Case name -> source image path, for the ``image`` column.
        labels : sequence of str
            Class folders to look in.

        Returns
        -------
        list of ManifestRow
            Masks with an image copy beside them; ``seq`` 0, ``regions`` and ``area_px`` 0:
            numbered and measured when :meth:`record` writes them (reading no mask here keeps
            opening a large folder fast); ``time`` from the mask file.
        """
        known = set(known)
        images = images or {}
        found = []
        for name, (label, path) in self.scan_masks(labels).items():
            if name in known or not (path.parent / f"{name}.png").is_file():
                continue
            try:
                mtime = path.stat().st_mtime
            except OSError:
                continue
            when = datetime.fromtimestamp(mtime, timezone.utc).isoformat(
                timespec="milliseconds")
            found.append((mtime, name, ManifestRow(
                name, CORRECTED, label, images.get(name, ""), f"{label}/{name}_mask.png",
                0, 0, None, "", when)))
        return [r for _, _, r in sorted(found, key=lambda t: (t[0], t[1]))]

    def check_belongs(self, rows: Sequence[ManifestRow], names: Iterable[str],
                      images: Iterable[str]) -> None:
        """Refuse a manifest none of whose rows is a case of the session.

        Parameters
        ----------
        rows : sequence of ManifestRow
            The manifest's rows.
        names, images : iterable of str
            The session's case names and source image paths.

        Raises
        ------
        ManifestError
            If ``rows`` is not empty and no row's name or image is among them; the message
            names the folder of scans the manifest seems to belong to and suggests choosing
            another corrections folder.
        """
        if not rows:
            return
        names, images = set(names), set(images)
        if not names and not images:
            return
        if any(r.name in names or (r.image and r.image in images) for r in rows):
            return
        parents = [str(Path(r.image).parent) for r in rows if r.image]
        where = ""
        if parents:
            try:
                where = os.path.commonpath(parents)
            except ValueError:  # different drives
                where = parents[0]
        sample = ", ".join(repr(r.name) for r in rows[:3])
        origin = f"scans in {where}" if where else f"other scans (e.g. {sample})"
        raise ManifestError(
            f"the corrections folder {self.root} records {len(rows)} case(s) of {origin}, "
            "none of which is a case of the scans opened now; it seems to belong to that "
            "folder. Choose another (e.g. a new, empty) corrections folder for these scans, "
            "or open the scans it belongs to")
