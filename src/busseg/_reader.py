"""napari reader: breast-ultrasound images, DICOM cine loops, cases and whole folders of scans.

What it opens (``napari_get_reader`` only looks at names and folder listings; no pixel is decoded
until the returned reader function runs):

- **an image file** (``.png``, ``.jpg``/``.jpeg``, ``.tif``/``.tiff``, ``.bmp``; grey, RGB or
  RGBA; ultrasound DICOM ``.dcm`` when pydicom is installed): an Image layer named after the
  file stem, converted to 8-bit grey like the network sees it, plus, when it has ground truth,
  a Labels layer ``"<stem> ground truth"`` holding the union of its masks (0 background, 1
  lesion): ``<stem>_mask*.png`` siblings (BUSI naming), or the same scan's mask in the
  ``Masks/`` (``masks/``) folder beside an ``Images/`` (``images/``) folder (BUS-BRA
  ``bus_X`` <-> ``mask_X``, BUS-UCLM same-name colour masks).
- **a multi-page TIFF or a multi-frame DICOM (cine loop)**: one Image stack (N, H, W), one
  slice per page or frame, segmented slice by slice like any stack.
- **a mask file** (``<stem>_mask.png``, ``<stem>_mask_<k>.png``): a Labels layer named after the
  file (0/1). Masks are opened rather than refused so that a saved correction can be inspected
  on its own; to see it over its image, open the image instead (its ground truth comes along).
- **a folder**, indexed by :func:`busseg.data.discover` (never by globbing here): a BUSI
  dataset root (``Dataset_BUSI_with_GT`` or its parent), one class folder, a corrections folder
  in BUSI layout, an image/mask folder pair (BUS-BRA, BUS-UCLM), or any folder of scans
  (searched recursively; no ground truth). The images become ONE lazy
  Image stack of shape (N, H_max, W_max) and the masks one lazy Labels stack: each slice is a
  :func:`dask.delayed` decode, zero-padded at the bottom and right to the largest height and
  width in the folder, so the 780-image BUSI opens in about a second with bounded memory.
  ``layer.metadata["busseg"]["slices"][i]`` gives slice ``i``'s file name, class, original shape
  and paths.
- **several image files opened as a stack**: the same lazy stack.

Anything else returns ``None`` so that other readers may try (``.dcm`` files too when pydicom
is not installed). Colour images are converted to grey, as the network sees them. A file
that cannot be decoded shows a napari error notification naming it instead of a traceback;
in a stack a corrupt slice shows as zeros and a warning notification names the file (once).

Layer metadata (``layer.metadata["busseg"]``, see :mod:`busseg.layers`):

``kind``
    ``"case"`` (one image), ``"mask"`` (a mask file) or ``"stack"`` (a folder or file list).
``name``, ``label``, ``source``, ``mask_paths``, ``original_shape``, ``root``
    For a case: file stem, class (``benign``/``malignant``/``normal``/``unknown``), image path,
    mask paths, ``[height, width]`` in pixels, and the dataset root (the parent of the class
    folder, or the image's folder).
``slices``, ``padded_shape``, ``root``, ``problems``
    For a stack: one dict per slice (keys ``name``, ``label``, ``image_path``, ``mask_paths``,
    ``rel_path``, ``original_shape``), the common ``[H_max, W_max]``, the dataset root, and the
    problems :func:`busseg.data.discover` reported, and its ``layout``.
    For a multi-page file (``kind`` ``"frames"``): ``source``, ``n_frames``, ``original_shape``
    and, for DICOM, ``modality``, ``spacing_mm`` and ``frame_time_ms`` where the file has them.
"""

from __future__ import annotations

import os
import re
import threading
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from busseg.data.busi import CLASSES, BusiRecord, is_busi_image
from busseg.data.discover import scan_suffixes
from busseg.data.io import IMAGE_SUFFIXES
from busseg.layers import META_KEY, ground_truth_name

LayerData = tuple  # (data, kwargs, layer_type)
ReaderFunction = Callable[[Any], list]

_IMAGE_KWARGS = {"colormap": "gray", "contrast_limits": (0, 255), "rgb": False}
_LABELS_OPACITY = 0.5


# --------------------------------------------------------------------------------------------
# get_reader: names and listings only


def napari_get_reader(path: str | os.PathLike | Sequence[str | os.PathLike]):
    """Return a reader function for ``path``, or ``None`` when this plugin does not handle it.

    Parameters
    ----------
    path : str, os.PathLike or list of them
        A file, a folder, or several files (napari passes a list when stacking).

    Returns
    -------
    callable or None
        ``reader(path) -> list of (data, kwargs, layer_type)`` tuples; ``None`` for anything
        that is not an image file, a mask file, a folder holding image files, or a list of
        image files. Only file names and folder listings are inspected here.
    """
    if isinstance(path, (list, tuple)):
        paths = [Path(p) for p in path]
        if len(paths) == 1:
            return napari_get_reader(paths[0])
        if paths and all(_is_image_file(p) and p.is_file() for p in paths):
            return read_files_as_stack
        return None
    try:
        p = Path(path)
    except TypeError:
        return None
    if p.is_dir():
        return read_folder if _folder_has_images(p) else None
    if _is_image_file(p) and p.is_file():
        if p.suffix.lower() == ".dcm" or _is_multipage_tiff(p):
            return read_frames_file  # DICOM (one frame or a cine loop), a multi-page TIFF
        return read_image_file if is_busi_image(p) else read_mask_file
    return None


def _is_multipage_tiff(p: Path) -> bool:
    """Whether a TIFF holds several pages (reads the header only, never the pixels)."""
    if p.suffix.lower() not in (".tif", ".tiff"):
        return False
    from PIL import Image

    try:
        with Image.open(p) as im:
            return getattr(im, "n_frames", 1) > 1
    except Exception:  # noqa: BLE001 - Pillow cannot open it (float64, int64 ...): ask tifffile
        pass
    try:
        import tifffile

        with tifffile.TiffFile(p) as tif:
            return len(tif.pages) > 1
    except Exception:  # noqa: BLE001 - unreadable: the reader function reports it
        return False


def _is_image_file(p: Path) -> bool:
    """Whether ``p`` is named like a scan this plugin reads (``.dcm`` only with pydicom)."""
    return p.suffix.lower() in scan_suffixes() and not p.name.startswith(".")


def _folder_has_images(folder: Path) -> bool:
    """Whether :func:`busseg.data.discover` would find a scan in ``folder`` (listings only).

    BUSI layouts (the dataset, its parent, a class folder), image/mask folder pairs and any
    folder with a scan file at any depth (hidden folders skipped).
    """
    from busseg.data.discover import pair_dirs

    try:
        pair = pair_dirs(folder)
        candidates = [pair[0]] if pair is not None else [folder]
        sub = folder / "Dataset_BUSI_with_GT"
        if sub.is_dir():
            candidates.append(sub)
        for base in list(candidates):
            candidates.extend(base / c for c in CLASSES if (base / c).is_dir())
        for d in candidates:
            with os.scandir(d) as it:
                if any(e.is_file() and _is_image_file(Path(e.name)) for e in it):
                    return True
        for _dirpath, dirnames, filenames in os.walk(folder):  # a plain folder, recursively
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            if any(_is_image_file(Path(f)) for f in filenames):
                return True
    except OSError:
        return False
    return False


# --------------------------------------------------------------------------------------------
# helpers


def _notify(kind: str, message: str) -> None:
    from napari.utils.notifications import show_error, show_warning

    (show_error if kind == "error" else show_warning)(message)


def _label_for(path: Path) -> str:
    folder = path.parent.name.lower()
    if folder in CLASSES:
        return folder
    head = path.stem.split(" ")[0].split("(")[0].strip().lower()
    return head if head in CLASSES else "unknown"


def _root_for(path: Path) -> Path:
    """Return the dataset root of an image: the parent of its class folder, or its own folder."""
    return path.parent.parent if path.parent.name.lower() in CLASSES else path.parent


def sibling_masks(image_path: str | os.PathLike) -> tuple[Path, ...]:
    """Find the BUSI mask files of an image: ``<stem>_mask.png``, ``<stem>_mask_1.png``, ...

    Parameters
    ----------
    image_path : str or os.PathLike
        The image file.

    Returns
    -------
    tuple of pathlib.Path
        Mask files in the image's folder, ordered ``_mask``, ``_mask_1``, ``_mask_2`` ...;
        empty when there are none.
    """
    p = Path(image_path)
    pattern = re.compile(rf"^{re.escape(p.stem)}_mask(?:_(\d+))?$", re.IGNORECASE)
    found = []
    try:
        with os.scandir(p.parent) as it:
            for e in it:
                q = Path(e.name)
                if q.suffix.lower() in IMAGE_SUFFIXES and e.is_file():
                    m = pattern.match(q.stem)
                    if m:
                        found.append((int(m.group(1) or 0), p.parent / e.name))
    except OSError:
        return ()
    return tuple(path for _, path in sorted(found))


def _header_size(path: Path) -> tuple[int, int] | None:
    """(width, height) from the file's header (PIL, or pydicom for DICOM); None if unreadable."""
    from busseg.data.dicom import is_dicom

    try:
        if is_dicom(path):
            import pydicom

            ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
            return int(ds.Columns), int(ds.Rows)
        from PIL import Image

        with Image.open(path) as im:
            return im.size
    except Exception:  # noqa: BLE001 - an unreadable file becomes a zero slice with a warning
        return None


def _pair_record(path: Path) -> BusiRecord | None:
    """Find the record of an image in an image/mask folder pair (BUS-BRA, BUS-UCLM).

    Only when ``path`` lies in the ``Images/`` (``images/`` ...) folder of such a pair; the
    pair is indexed by :func:`busseg.data.discover` without reading any header. None for
    any other image.
    """
    from busseg.data.discover import detect_layout, discover, pair_dirs

    root = path.parent.parent
    try:
        pair = pair_dirs(root)
        if pair is None or pair[0].resolve() != path.parent.resolve():
            return None
        layout = detect_layout(root)
        if layout not in ("busbra", "pairs"):
            return None
        index = discover(root, layout=layout, check_sizes=False)
    except (OSError, ValueError):
        return None
    key = path.resolve()
    return next((r for r in index.records if r.image_path.resolve() == key), None)


def _record_for_file(path: Path, root: Path, *, with_size: bool) -> BusiRecord:
    try:
        rel = path.relative_to(root).as_posix()
    except ValueError:
        rel = path.name
    return BusiRecord(
        name=path.stem,
        label=_label_for(path),
        image_path=path,
        mask_paths=sibling_masks(path),
        rel_path=rel,
        size=_header_size(path) if with_size else None,
    )


# --------------------------------------------------------------------------------------------
# one case


def read_case(
    image_path: str | os.PathLike,
    mask_paths: Sequence[str | os.PathLike] | None = None,
    *,
    label: str | None = None,
    root: str | os.PathLike | None = None,
) -> list[LayerData]:
    """Read one case as layer data: the grey image and, when it has masks, its ground truth.

    Parameters
    ----------
    image_path : str or os.PathLike
        The image file (grey, RGB or RGBA PNG/JPEG/TIFF/BMP, single-frame DICOM).
    mask_paths : sequence of paths, optional
        Its mask files; by default the ``<stem>_mask*.png`` siblings, else its mask in the
        mask folder of an image/mask folder pair (BUS-BRA, BUS-UCLM).
    label : str, optional
        Class; by default from the folder or file name.
    root : str or os.PathLike, optional
        Dataset root recorded in the metadata; by default the parent of the class folder.

    Returns
    -------
    list of (data, kwargs, layer_type)
        ``(image (H, W) uint8, {"name": stem, ...}, "image")`` and, when masks exist,
        ``(mask (H, W) uint8 in {0, 1}, {"name": "<stem> ground truth", ...}, "labels")``.

    Raises
    ------
    FileNotFoundError, busseg.data.io.ImageReadError
        If the image cannot be read (:func:`read_image_file` turns this into a notification).
    """
    from busseg.data.io import read_image, read_mask

    path = Path(image_path)
    image = read_image(path)
    pair = None
    if mask_paths is not None:
        masks = tuple(Path(m) for m in mask_paths)
    else:
        masks = sibling_masks(path)
        if not masks:
            pair = _pair_record(path)
            masks = pair.mask_paths if pair is not None else ()
    if pair is not None:
        label = label or (pair.label if pair.label != "unknown" else None)
        root = root if root is not None else path.parent.parent
    meta = {
        "kind": "case",
        "name": path.stem,
        "label": label or _label_for(path),
        "source": str(path),
        "mask_paths": [str(m) for m in masks],
        "original_shape": [int(image.shape[0]), int(image.shape[1])],
        "root": str(root if root is not None else _root_for(path)),
    }
    layers: list[LayerData] = [
        (image, {"name": path.stem, "metadata": {META_KEY: meta}, **_IMAGE_KWARGS}, "image")
    ]
    if masks:
        try:
            gt = read_mask(masks)
            if gt.shape != image.shape:
                raise ValueError(
                    f"the mask is {gt.shape[1]}x{gt.shape[0]} (W x H) but the image is "
                    f"{image.shape[1]}x{image.shape[0]}"
                )
        except (OSError, ValueError) as exc:
            _notify("warning", f"ground truth of {path.name} not loaded: {exc}")
        else:
            layers.append(_ground_truth_layer(gt.astype(np.uint8), path.stem, meta, "ground truth"))
    return layers


def _ground_truth_layer(data: Any, image_name: str, meta: dict, kind: str,
                        **kwargs: Any) -> LayerData:
    """Return the Labels layer of an image layer's ground truth (``meta`` with ``kind``)."""
    return (data, {"name": ground_truth_name(image_name),
                   "metadata": {META_KEY: {**meta, "kind": kind}},
                   "opacity": _LABELS_OPACITY, **kwargs}, "labels")


def read_image_file(path: str | os.PathLike) -> list[LayerData]:
    """Read an image file (and its BUSI ground truth) for napari; see :func:`read_case`.

    Parameters
    ----------
    path : str or os.PathLike
        The image file.

    Returns
    -------
    list of (data, kwargs, layer_type)
        The layers; ``[(None,)]`` (napari's "nothing to add") after an error notification
        naming the file when it cannot be decoded.
    """
    path = Path(path[0] if isinstance(path, (list, tuple)) else path)
    try:
        return read_case(path)
    except (OSError, ValueError) as exc:
        _notify("error", f"cannot open {path.name}: {exc}")
        return [(None,)]


def read_mask_file(path: str | os.PathLike) -> list[LayerData]:
    """Read one mask file as a Labels layer (0 background, 1 lesion).

    Parameters
    ----------
    path : str or os.PathLike
        A mask file (any value > 0 is lesion).

    Returns
    -------
    list of (data, kwargs, layer_type)
        ``[(mask (H, W) uint8, {"name": stem, ...}, "labels")]``, or ``[(None,)]`` after an
        error notification when the file cannot be decoded.
    """
    from busseg.data.io import read_mask

    path = Path(path[0] if isinstance(path, (list, tuple)) else path)
    try:
        mask = read_mask(path)
    except (OSError, ValueError) as exc:
        _notify("error", f"cannot open {path.name}: {exc}")
        return [(None,)]
    meta = {
        "kind": "mask",
        "name": path.stem,
        "label": _label_for(path),
        "source": str(path),
        "original_shape": [int(mask.shape[0]), int(mask.shape[1])],
        "root": str(_root_for(path)),
    }
    return [
        (
            mask.astype(np.uint8),
            {"name": path.stem, "metadata": {META_KEY: meta}, "opacity": _LABELS_OPACITY},
            "labels",
        )
    ]


def read_frames_file(path: str | os.PathLike) -> list[LayerData]:
    """Read a DICOM file or a multi-page TIFF: one frame as a case, several as a stack.

    Parameters
    ----------
    path : str or os.PathLike
        A ``.dcm`` file (single-frame image or multi-frame cine loop; needs pydicom) or a
        multi-page TIFF.

    Returns
    -------
    list of (data, kwargs, layer_type)
        A single frame: as :func:`read_image_file`. Several: ``[(frames (N, H, W) uint8,
        {"name": stem, "metadata": {"busseg": {"kind": "frames", ...}}, ...}, "image")]``.
        ``[(None,)]`` after an error notification naming the file when it cannot be read.
    """
    from busseg.data.io import frame_count, read_stack

    path = Path(path[0] if isinstance(path, (list, tuple)) else path)
    try:
        if frame_count(path) == 1:
            return read_case(path)
        frames = read_stack(path)
    except (OSError, ValueError) as exc:
        _notify("error", f"cannot open {path.name}: {exc}")
        return [(None,)]
    if len(frames) == 1:
        return read_image_file(path)
    meta: dict = {
        "kind": "frames",
        "name": path.stem,
        "label": _label_for(path),
        "source": str(path),
        "n_frames": int(len(frames)),
        "original_shape": [int(frames.shape[1]), int(frames.shape[2])],
        "root": str(path.parent),
    }
    if path.suffix.lower() == ".dcm":
        try:
            from busseg.data.dicom import read_dicom_header

            meta.update(read_dicom_header(path))
        except Exception:  # noqa: BLE001 - the description is optional
            pass
    return [(frames, {"name": path.stem, "metadata": {META_KEY: meta}, **_IMAGE_KWARGS},
             "image")]


# --------------------------------------------------------------------------------------------
# lazy stacks


class _SliceLoader:
    """Decode one slice, zero-padded to the stack shape; corrupt files become zeros + a warning."""

    def __init__(self, shape: tuple[int, int]) -> None:
        self.shape = shape
        self._warned: set[str] = set()
        self._lock = threading.Lock()

    def _warn(self, path: Any, exc: Exception) -> None:
        key = str(path)
        with self._lock:
            if key in self._warned:
                return
            self._warned.add(key)
        _notify("warning", f"cannot read {Path(key).name}; its slice shows zeros ({exc})")

    def _pad(self, arr: np.ndarray) -> np.ndarray:
        out = np.zeros(self.shape, dtype=np.uint8)
        h, w = min(arr.shape[0], self.shape[0]), min(arr.shape[1], self.shape[1])
        out[:h, :w] = arr[:h, :w]
        return out

    def image(self, path: str) -> np.ndarray:
        from busseg.data.io import read_image

        try:
            return self._pad(read_image(path))
        except Exception as exc:  # noqa: BLE001 - any decode failure must not break the viewer
            self._warn(path, exc)
            return np.zeros(self.shape, dtype=np.uint8)

    def mask(self, paths: tuple[str, ...]) -> np.ndarray:
        from busseg.data.io import read_mask

        if not paths:
            return np.zeros(self.shape, dtype=np.uint8)
        try:
            return self._pad(read_mask(paths).astype(np.uint8))
        except Exception as exc:  # noqa: BLE001
            self._warn(paths[0], exc)
            return np.zeros(self.shape, dtype=np.uint8)


def stack_layers(records: Sequence[BusiRecord], root: Path, name: str) -> list[LayerData]:
    """Build the lazy Image and Labels stacks of a list of cases.

    Parameters
    ----------
    records : sequence of BusiRecord
        The cases, in slice order; ``size`` (width, height) should be set from the headers
        (a record without a size, i.e. an unreadable image, becomes a zero slice).
    root : pathlib.Path
        Dataset root recorded in the metadata.
    name : str
        Image layer name; the Labels layer is ``"<name> ground truth"``.

    Returns
    -------
    list of (data, kwargs, layer_type)
        ``(dask.array (N, H_max, W_max) uint8, {...}, "image")`` and, when any case has masks,
        ``(dask.array (N, H_max, W_max) uint8 in {0, 1}, {...}, "labels")``. Nothing is
        decoded until napari displays a slice: each slice is one dask block (a lazy decode
        of one file), zero-padded at the bottom and right.

    Raises
    ------
    ValueError
        If ``records`` is empty.
    """
    import dask.array as da

    if not records:
        raise ValueError("no image to stack")
    sizes = [r.size for r in records if r.size]
    if sizes:
        shape = (max(s[1] for s in sizes), max(s[0] for s in sizes))
    else:
        shape = (1, 1)
    loader = _SliceLoader(shape)
    # One (1, H, W) block per case, decoded on demand. map_blocks keeps the graph one
    # blockwise layer: indexing one slice of a da.stack of 780 from_delayed arrays cost
    # 0.2-0.4 s of graph optimisation per slice on a 2-core CPU; this costs ~ the decode.
    # Unique names: napari's dask cache must never mix the slices of two stacks.
    token = uuid.uuid4().hex
    image_paths = [str(r.image_path) for r in records]
    mask_paths = [tuple(str(m) for m in r.mask_paths) for r in records]
    chunks = ((1,) * len(records), (shape[0],), (shape[1],))
    meta_array = np.empty((0, 0, 0), dtype=np.uint8)

    def _image_block(block_info=None):
        i = block_info[None]["chunk-location"][0]
        return loader.image(image_paths[i])[None]

    def _mask_block(block_info=None):
        i = block_info[None]["chunk-location"][0]
        return loader.mask(mask_paths[i])[None]

    images = da.map_blocks(
        _image_block, dtype=np.uint8, chunks=chunks, meta=meta_array, name=f"busseg-image-{token}"
    )
    slices = [
        {
            "name": r.name,
            "label": r.label,
            "image_path": str(r.image_path),
            "mask_paths": [str(m) for m in r.mask_paths],
            "rel_path": r.rel_path,
            "original_shape": [int(r.size[1]), int(r.size[0])] if r.size else None,
        }
        for r in records
    ]
    problems = [p for r in records for p in r.problems]
    meta = {
        "kind": "stack",
        "root": str(root),
        "slices": slices,
        "padded_shape": [int(shape[0]), int(shape[1])],
        "problems": problems,
    }
    layers: list[LayerData] = [
        (
            images,
            {"name": name, "metadata": {META_KEY: meta}, "multiscale": False, **_IMAGE_KWARGS},
            "image",
        )
    ]
    if any(r.mask_paths for r in records):
        masks = da.map_blocks(
            _mask_block, dtype=np.uint8, chunks=chunks, meta=meta_array, name=f"busseg-mask-{token}"
        )
        layers.append(_ground_truth_layer(masks, name, meta, "ground truth stack",
                                          multiscale=False))
    return layers


def read_folder(path: str | os.PathLike) -> list[LayerData]:
    """Open a folder of scans as lazy Image and Labels stacks, indexed by ``discover``.

    Parameters
    ----------
    path : str or os.PathLike
        ``Dataset_BUSI_with_GT`` or its parent, one class folder, a corrections folder, an
        image/mask folder pair (BUS-BRA ``Images/`` + ``Masks/``, BUS-UCLM ``images/`` +
        ``masks/``), or any folder of scans (searched recursively).

    Returns
    -------
    list of (data, kwargs, layer_type)
        See :func:`stack_layers` (a Labels stack ``"<folder> ground truth"`` when any scan
        has a mask); ``[(None,)]`` after an error notification when the folder holds no
        readable scan. What :func:`busseg.data.discover` skipped or found suspicious is shown
        as one warning and kept in ``metadata["busseg"]["problems"]``.
    """
    from dataclasses import replace

    from busseg.data.discover import discover

    folder = Path(path[0] if isinstance(path, (list, tuple)) else path)
    try:
        index = discover(folder, check_sizes=True)
    except ValueError as exc:  # no scan in it, or a file
        _notify("error", f"cannot open {folder.name}: {exc}")
        return [(None,)]
    except OSError as exc:  # vanished or unreadable folder
        _notify("error", f"cannot open {folder}: {exc}")
        return [(None,)]
    records = [r if r.size is not None else replace(r, size=_header_size(r.image_path))
               for r in index.records]
    if not records:
        _notify("error", f"no image files in {folder}")
        return [(None,)]
    if index.problems:
        _notify(
            "warning",
            f"{len(index.problems)} problem(s) in {folder.name}, e.g. "
            f"{index.problems[0]}; see the layer's metadata['busseg']['problems']",
        )
    layers = stack_layers(records, index.root, folder.name)
    for _, kwargs, _ in layers:
        kwargs["metadata"][META_KEY]["layout"] = getattr(index, "layout", None)
        kwargs["metadata"][META_KEY]["problems"] = list(index.problems)
    return layers


def read_files_as_stack(paths: Sequence[str | os.PathLike]) -> list[LayerData]:
    """Open several image files as one lazy stack (with their BUSI masks as a Labels stack).

    Parameters
    ----------
    paths : sequence of str or os.PathLike
        Image files; mask files among them are opened as slices too.

    Returns
    -------
    list of (data, kwargs, layer_type)
        See :func:`stack_layers`.
    """
    files = [Path(p) for p in ([paths] if isinstance(paths, (str, os.PathLike)) else paths)]
    root = Path(os.path.commonpath([str(p.parent) for p in files]))
    records = [_record_for_file(p, root, with_size=True) for p in files]
    for r in records:
        if r.size is None:
            _notify("warning", f"cannot read {r.image_path.name}; its slice shows zeros")
    return stack_layers(records, root, f"{root.name} stack")
