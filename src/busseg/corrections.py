"""A folder of hand-corrected masks, kept in the BUSI layout (numpy only; no Qt, no napari).

The segment-correct-fine-tune loop stores each corrected case as two files::

    <corrections>/<class>/<stem>.png        the image, 8-bit grey
    <corrections>/<class>/<stem>_mask.png   the corrected mask, 0/255

so the corrections folder is itself a BUSI-layout dataset that
:func:`busseg.data.busi.discover_busi`, the fine-tune widget and ``training/train.py`` read like
BUSI. Files are written atomically and never over an existing correction without
``overwrite=True``. The folder must lie outside the dataset it corrects, so a correction can never
replace an expert mask.

The annotation session (:mod:`busseg.session`) also keeps ``<corrections>/manifest.csv``, one
row per case with what the annotator decided (accepted, corrected, normal, brushed), read and
written by :class:`busseg.manifest.CaseManifest` (:attr:`CorrectionStore.manifest`).
"""

from __future__ import annotations

import dataclasses
import io as _io
import os
import sys
import unicodedata
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from busseg.data.io import (
    IMAGE_SUFFIXES,
    atomic_write_bytes,
    read_image,
    read_mask,
    to_grey,
    write_mask_png,
)
from busseg.manifest import CORRECTED as _MANIFEST_CORRECTED
from busseg.manifest import CaseManifest

#: Class folders a correction may go to: BUSI's classes, and "unknown" for images of no class
#: (what the reader labels images outside a class folder).
LABELS = ("benign", "malignant", "normal", "unknown")

#: Case status values, in order of precedence (``"corrected"`` stands for a stored mask of
#: any manifest status here; :data:`busseg.manifest.STATUSES` tells them apart).
CORRECTED = _MANIFEST_CORRECTED
PREDICTED = "predicted"
NOT_SEGMENTED = "not segmented"


class CorrectionPaths(NamedTuple):
    """Where one corrected case lives.

    Attributes
    ----------
    image : pathlib.Path
        ``<root>/<class>/<stem>.png``.
    mask : pathlib.Path
        ``<root>/<class>/<stem>_mask.png``.
    """

    image: Path
    mask: Path


def _is_within(path: Path, other: Path) -> bool:
    """Whether ``path`` equals ``other`` or lies inside it (both resolved)."""
    try:
        path.relative_to(other)
    except ValueError:
        return False
    return True


#: Longest case name or class, in bytes (file systems allow 255 per name, and the mask file
#: adds ``_mask.png``; :func:`busseg.data.io.atomic_output` adds a short temporary prefix).
MAX_NAME_BYTES = 200


def check_part(value: str, what: str) -> str:
    """Check that a case name or class can be one file or folder name.

    Parameters
    ----------
    value : str
        The name (converted with ``str``).
    what : str
        What to call it in the error message (e.g. ``"case name"``).

    Returns
    -------
    str
        ``value`` as a str, unchanged.

    Raises
    ------
    ValueError
        If it is empty, ``.`` or ``..``, holds a path separator, leading or trailing
        spaces or control characters, starts with ``.`` (a hidden file), cannot be encoded
        for this file system or is longer than :data:`MAX_NAME_BYTES` bytes; the message
        says what to use instead.
    """
    value = str(value)
    if (
        not value
        or value in (".", "..")
        or "/" in value
        or "\\" in value
        or os.sep in value
        or value != value.strip()
    ):
        raise ValueError(
            f"{what} {value!r} cannot be used as a file or folder name; use a plain name such "
            f"as 'benign (4)' (no slashes, no leading or trailing spaces)"
        )
    if value.startswith("."):
        raise ValueError(
            f"{what} {value!r} starts with '.', which makes a hidden file that dataset readers "
            "skip; use a plain name such as 'benign (4)'"
        )
    if any(unicodedata.category(c) == "Cc" for c in value):
        raise ValueError(
            f"{what} {value!r} contains control characters (newline, tab, NUL ...); use a "
            "plain name such as 'benign (4)'"
        )
    try:
        size = len(value.encode(sys.getfilesystemencoding(), "surrogateescape"))
    except UnicodeEncodeError:
        raise ValueError(
            f"{what} {value!r} cannot be written as a file name on this system (encoding "
            f"{sys.getfilesystemencoding()}); use a plain name such as 'benign (4)'"
        ) from None
    if size > MAX_NAME_BYTES:
        raise ValueError(
            f"{what} is {size} bytes long; file names are limited, keep it under "
            f"{MAX_NAME_BYTES} bytes"
        )
    return value


# The older, private spelling of check_part.
_check_part = check_part


class CorrectionStore:
    """A BUSI-layout folder of corrected (image, mask) pairs.

    Parameters
    ----------
    root : str or os.PathLike
        The corrections folder; created on the first save.
    dataset_root : str or os.PathLike, optional
        The dataset the corrections belong to. The corrections folder may neither equal it,
        lie inside it, nor contain it.

    Raises
    ------
    ValueError
        If ``root`` and ``dataset_root`` overlap, ``root`` is an existing file, empty, or
        holds a NUL character.
    """

    def __init__(
        self, root: str | os.PathLike, dataset_root: str | os.PathLike | None = None
    ) -> None:
        if str(root).strip() in ("", "."):
            raise ValueError("choose a corrections folder (an empty path is not allowed)")
        for p in (root, dataset_root):
            if p is not None and "\x00" in str(p):
                raise ValueError(f"the path {str(p)!r} contains a NUL character; choose a folder")
        self.root = Path(root).expanduser()
        if self.root.is_file():
            raise ValueError(f"{self.root} is a file; choose a folder for the corrections")
        self.dataset_root = Path(dataset_root).expanduser() if dataset_root else None
        if self.dataset_root is not None:
            mine, theirs = self.root.resolve(), self.dataset_root.resolve()
            if _is_within(mine, theirs) or _is_within(theirs, mine):
                raise ValueError(
                    f"the corrections folder {self.root} overlaps the dataset {self.dataset_root}; "
                    "choose a folder outside the dataset so its expert masks are never replaced"
                )

    def __repr__(self) -> str:
        return f"CorrectionStore({str(self.root)!r})"

    @property
    def manifest(self) -> CaseManifest:
        """The folder's case manifest (``<root>/manifest.csv``; it need not exist yet)."""
        return CaseManifest(self.root)

    @staticmethod
    def _name_label(record_or_name: Any, label: str | None) -> tuple[str, str]:
        if isinstance(record_or_name, (str, os.PathLike)):
            name = str(record_or_name)
            if Path(name).suffix.lower() in IMAGE_SUFFIXES:
                name = name[: -len(Path(name).suffix)]
        else:
            name = getattr(record_or_name, "name", None)
            label = label or getattr(record_or_name, "label", None)
            if name is None:
                raise TypeError(
                    f"expected a BusiRecord or a case name, got {type(record_or_name).__name__}"
                )
        if not label:
            raise ValueError(
                f"no class given for {name!r}; pass label='benign', 'malignant', 'normal' or "
                "'unknown'"
            )
        if str(label) not in LABELS:
            raise ValueError(
                f"class {str(label)!r} is not one of {', '.join(map(repr, LABELS))}; "
                "corrections in other class folders would be invisible to fine-tuning"
            )
        return check_part(name, "case name"), str(label)

    def path_for(self, record_or_name: Any, label: str | None = None) -> CorrectionPaths:
        """Paths of a case's corrected image and mask.

        Parameters
        ----------
        record_or_name : BusiRecord or str
            A :class:`~busseg.data.busi.BusiRecord` (its ``name`` and ``label`` are used) or a
            case name such as ``"benign (4)"`` (a file name's suffix is dropped).
        label : str, optional
            The class folder; required with a name, overrides a record's label.

        Returns
        -------
        CorrectionPaths
            ``(image, mask)``: ``<root>/<label>/<name>.png`` and ``<root>/<label>/<name>_mask.png``.

        Raises
        ------
        ValueError
            If the class is not one of :data:`LABELS`, or the name is empty, contains a path
            separator or control characters, starts with '.', has leading or trailing spaces,
            or is longer than :data:`MAX_NAME_BYTES`.
        """
        name, label = self._name_label(record_or_name, label)
        folder = self.root / label
        return CorrectionPaths(folder / f"{name}.png", folder / f"{name}_mask.png")

    def is_corrected(self, record_or_name: Any, label: str | None = None) -> bool:
        """Whether a corrected mask exists for the case (see :meth:`path_for`)."""
        return self.path_for(record_or_name, label).mask.is_file()

    def status(
        self, record_or_name: Any, label: str | None = None, *, predicted: bool = False
    ) -> str:
        """Return a case's status in the correction loop.

        Parameters
        ----------
        record_or_name, label
            As in :meth:`path_for`.
        predicted : bool
            Whether a prediction exists for the case (the caller knows, e.g. a viewer layer).

        Returns
        -------
        str
            ``"corrected"`` when a corrected mask is stored, else ``"predicted"`` when
            ``predicted`` is True, else ``"not segmented"``.
        """
        if self.is_corrected(record_or_name, label):
            return CORRECTED
        return PREDICTED if predicted else NOT_SEGMENTED

    def save(
        self,
        record_or_name: Any,
        label: str | None,
        image: np.ndarray,
        mask: np.ndarray,
        *,
        overwrite: bool = False,
        image_known: bool = False,
    ) -> CorrectionPaths:
        """Store a corrected case: the image as 8-bit grey PNG and the mask as 0/255 PNG.

        Both files are written atomically, the image first and the mask last, so a case counts
        as corrected (:meth:`is_corrected`) only once both are complete.

        Parameters
        ----------
        record_or_name, label
            As in :meth:`path_for`.
        image : numpy.ndarray
            (H, W) grey or (H, W, 3|4) colour, any dtype :func:`busseg.data.io.to_grey` accepts.
        mask : numpy.ndarray
            (H, W); any value > 0 is lesion (a napari Labels layer's data, bool, 0/1, 0/255).
        overwrite : bool
            Replace an existing correction. Without it an existing mask raises; an existing
            image file is left alone when it holds the same pixels and raises otherwise.
        image_known : bool
            The caller wrote this image to this case's image file before (a session saving
            the same case again): an existing image file is kept as it is, neither read nor
            encoded again (a missing one is written).

        Returns
        -------
        CorrectionPaths
            The written paths.

        Raises
        ------
        FileExistsError
            If the case is already corrected (or a different image has its name) and
            ``overwrite`` is False.
        ValueError
            If the name is not usable (see :meth:`path_for`), the image is not a 2D grey /
            colour image of real numbers, or the mask is not 2D, not numeric or not the
            image's size.
        IsADirectoryError
            If a folder has the name of one of the two files.
        """
        paths = self.path_for(record_or_name, label)
        grey = to_grey(np.asarray(image))
        mask = np.asarray(mask)
        if mask.ndim != 2:
            raise ValueError(f"a mask must be 2D (H, W), got shape {mask.shape}")
        if mask.dtype != np.bool_ and (
            not np.issubdtype(mask.dtype, np.number) or np.iscomplexobj(mask)
        ):
            raise ValueError(f"a mask must hold numbers or bools, got dtype {mask.dtype}")
        if mask.shape != grey.shape:
            raise ValueError(
                f"the mask is {mask.shape[1]}x{mask.shape[0]} (W x H) but the image is "
                f"{grey.shape[1]}x{grey.shape[0]}; correct the mask on the image it belongs to"
            )
        if not overwrite and paths.mask.exists():
            raise FileExistsError(
                f"{paths.mask} already exists; pass overwrite=True to replace the correction"
            )
        write_image = not (image_known and paths.image.is_file())
        if write_image and paths.image.exists() and not overwrite:
            try:
                same = np.array_equal(read_image(paths.image), grey)
            except (OSError, ValueError):
                same = False
            if not same:
                raise FileExistsError(
                    f"{paths.image} already exists and holds another image; pass overwrite=True "
                    "to replace it"
                )
            write_image = False
        if write_image:
            from PIL import Image

            buf = _io.BytesIO()
            # zlib level 1: lossless like the default 6, four times faster to encode (a
            # 562x471 BUSI image: 11 ms against 41 ms) for files about 12 % larger; this
            # runs on every Next of the Scan browser
            Image.fromarray(grey, mode="L").save(buf, format="PNG", compress_level=1)
            atomic_write_bytes(paths.image, buf.getvalue(), overwrite=overwrite)
        write_mask_png(paths.mask, mask, overwrite=overwrite)
        return paths

    def load(self, record_or_name: Any, label: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Read one stored correction.

        Returns
        -------
        image : numpy.ndarray
            (H, W) uint8 grey.
        mask : numpy.ndarray
            (H, W) bool.

        Raises
        ------
        FileNotFoundError
            If the case has no stored correction.
        busseg.data.io.ImageReadError
            If a stored file is corrupt (a ``ValueError`` naming the file).
        """
        paths = self.path_for(record_or_name, label)
        return read_image(paths.image), read_mask(paths.mask)

    def records(self) -> list:
        """List the stored cases as :class:`~busseg.data.busi.BusiRecord` (usable ones only).

        Returns
        -------
        list of BusiRecord
            Cases with an image and a mask of equal size, sorted by class and natural order;
            an empty list when the folder does not exist or holds no case yet.
        """
        from busseg.data.busi import discover_busi

        if not self.root.is_dir():
            return []
        out = []
        for label in LABELS:  # one class folder at a time: "unknown" is no BUSI class folder
            folder = self.root / label
            if not folder.is_dir():
                continue
            try:
                index = discover_busi(folder, check_sizes=True)
            except ValueError:  # no image with a mask yet
                continue
            out += [dataclasses.replace(r, label=label) for r in index.usable]
        return out

    def load_pairs(self) -> tuple[list[np.ndarray], list[np.ndarray], list[str]]:
        """All stored corrections as training pairs (for fine-tuning).

        Returns
        -------
        images : list of numpy.ndarray
            (H, W) uint8 grey images.
        masks : list of numpy.ndarray
            (H, W) bool masks, each the size of its image.
        names : list of str
            ``"<class>/<stem>.png"`` (the record's ``rel_path``), unique within the folder.
            All three lists are empty when nothing is stored yet.

        Raises
        ------
        busseg.data.io.ImageReadError
            If a stored file has a valid header but cannot be decoded (files whose header is
            unreadable are left out by :meth:`records`).
        """
        images, masks, names = [], [], []
        for rec in self.records():
            images.append(read_image(rec.image_path))
            masks.append(read_mask(rec.mask_paths))
            names.append(rec.rel_path)
        return images, masks, names
