"""napari writer for Labels layers: lesion masks as PNG (0/255) and Labels stacks as TIFF.

Formats, chosen by the extension of the path napari passes:

- ``.png``, 2D Labels: one 8-bit mask PNG, 0 background and 255 lesion (every label > 0 is
  lesion), the format of BUSI masks, so ``benign (4)_mask.png`` saved here sits beside its image
  and is read back by this plugin's reader, :func:`busseg.data.busi.discover_busi` and
  ``training/train.py``.
- ``.png``, 3D Labels (a stack): a folder named after the path without ``.png``, holding one
  0/255 PNG per slice. When the layer came from this plugin's folder reader, each slice is
  cropped back to its original size and named ``<case>_mask.png`` in a class sub-folder
  (``benign/benign (4)_mask.png``), i.e. BUSI layout; otherwise ``<stem>_<i:04d>.png``.
- ``.tif`` / ``.tiff``, 2D or 3D: one (multi-page) TIFF that keeps the label values and dtype
  exactly (several labels stay distinct), written with ``tifffile``.

Every file is written atomically (a temporary file in the same folder, then a rename), so an
interrupted save never leaves half a mask.

Overwriting: napari calls a writer with a path only after its save dialog has asked the user to
confirm replacing an existing file (and ``viewer.layers.save(path)`` replaces files like napari's
built-in writers), so the single file named by ``path`` is replaced. The per-slice files of a
PNG stack were never shown to the user, so that save refuses (``FileExistsError``) when any of
them exists.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from busseg.data.io import atomic_output, atomic_write_bytes, write_mask_png
from busseg.layers import META_KEY

PNG_SUFFIXES = (".png",)
TIFF_SUFFIXES = (".tif", ".tiff")


def write_labels(path: str, data: Any, meta: dict) -> list[str]:
    """Write one Labels layer (napari single-layer writer).

    Parameters
    ----------
    path : str
        Destination chosen in napari's save dialog: ``*.png``, ``*.tif`` or ``*.tiff``.
    data : array-like
        The Labels data: (H, W) or (N, H, W) integers or bools (numpy or dask).
    meta : dict
        The layer's attributes (``name``, ``metadata`` ...). ``metadata["busseg"]["slices"]``
        from this plugin's folder reader names and crops the per-slice PNGs of a stack.

    Returns
    -------
    list of str
        The written files; empty when the extension or the dimensionality is not supported
        (napari then reports that nothing was written).

    Raises
    ------
    FileExistsError
        For a PNG stack when a per-slice file already exists, or its folder name is a file.
    IsADirectoryError
        When ``path`` is a folder.
    ValueError
        For data that is not 2D or 3D, has no pixels, or is not numeric; for a PNG stack
        whose slice names (from the layer metadata) are not plain file names.
    """
    p = Path(path)
    suffix = p.suffix.lower()
    ndim = len(np.shape(data)) if not hasattr(data, "ndim") else data.ndim
    if ndim not in (2, 3):
        raise ValueError(
            f"can only save 2D (H, W) or 3D (N, H, W) Labels, got {ndim} dimensions; "
            "save one slice or use napari's built-in TIFF writer"
        )
    shape = tuple(int(n) for n in np.shape(data))
    if 0 in shape:
        raise ValueError(f"the Labels layer has no pixels (shape {shape}); nothing to save")
    dtype = getattr(data, "dtype", None)
    dtype = np.dtype(dtype if dtype is not None else np.asarray(data).dtype)
    if dtype != np.bool_ and (not np.issubdtype(dtype, np.number)
                              or np.issubdtype(dtype, np.complexfloating)):
        raise ValueError(f"Labels must hold integers or bools, got dtype {dtype}")
    if suffix in PNG_SUFFIXES:
        if ndim == 2:
            # napari's dialog has confirmed any replacement of this very file.
            write_mask_png(p, np.asarray(data), overwrite=True)
            return [str(p)]
        return [str(f) for f in write_png_stack(p.with_suffix(""), data, meta)]
    if suffix in TIFF_SUFFIXES:
        return [str(write_tiff(p, data, overwrite=True))]
    return []


def write_png_stack(folder: str | os.PathLike, data: Any, meta: dict | None = None) -> list[Path]:
    """Write a Labels stack as one 0/255 PNG per slice.

    Parameters
    ----------
    folder : str or os.PathLike
        Destination folder (created).
    data : array-like
        (N, H, W) labels; slices are read one at a time (dask stacks stay bounded in memory).
    meta : dict, optional
        Layer attributes; with ``metadata["busseg"]["slices"]`` (N entries from this plugin's
        folder reader) slice ``i`` is cropped to ``original_shape`` and written as
        ``<label>/<name>_mask.png``; otherwise as ``<folder name>_<i:04d>.png``.

    Returns
    -------
    list of pathlib.Path
        The written files, in slice order.

    Raises
    ------
    FileExistsError
        If any destination file exists, or ``folder`` is a file (checked before anything is
        written).
    ValueError
        If a slice's ``name`` or ``label`` in the metadata is not a plain file name (a path
        separator, ``..``, control characters ...): files are never written outside
        ``folder``.
    """
    from busseg.corrections import check_part

    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise FileExistsError(
            f"{folder} exists and is a file; a PNG stack is saved as a folder of that name, "
            "so choose another name"
        )
    n = int(np.shape(data)[0])
    slices = ((meta or {}).get("metadata") or {}).get(META_KEY, {}).get("slices")
    if not (isinstance(slices, list) and len(slices) == n):
        slices = None
    targets: list[tuple[Path, list | None]] = []
    for i in range(n):
        if slices is not None:
            info = slices[i]
            label = check_part(str(info.get("label") or "unknown"), f"slice {i}'s class")
            name = check_part(str(info.get("name")), f"slice {i}'s name")
            targets.append((folder / label / f"{name}_mask.png", info.get("original_shape")))
        else:
            targets.append((folder / f"{folder.name}_{i:04d}.png", None))
    existing = [t for t, _ in targets if t.exists()]
    if existing:
        raise FileExistsError(
            f"{len(existing)} file(s) already exist in {folder}, e.g. {existing[0]}; "
            "save the stack under another name or move the old files away"
        )
    written = []
    for i, (target, shape) in enumerate(targets):
        sl = np.asarray(data[i])
        if shape:
            sl = sl[: int(shape[0]), : int(shape[1])]
        written.append(write_mask_png(target, sl, overwrite=False))
    return written


def write_tiff(path: str | os.PathLike, data: Any, *, overwrite: bool = False) -> Path:
    """Write labels as a (multi-page) TIFF that keeps values and dtype, atomically.

    Parameters
    ----------
    path : str or os.PathLike
        Destination ``.tif``/``.tiff`` file (label values kept, unlike the PNG writer's
        0/255).
    data : array-like
        (H, W) or (N, H, W) labels; bool is stored as uint8 0/1. A 3D stack is written one
        page at a time, so a dask stack is never held in memory whole.
    overwrite : bool
        Replace an existing file. Without it an existing file raises.

    Returns
    -------
    pathlib.Path
        The written path.

    Raises
    ------
    FileExistsError
        If ``path`` exists and ``overwrite`` is False.
    """
    import tifffile

    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists; pass overwrite=True to replace it")
    dtype = np.dtype(getattr(data, "dtype", np.asarray(data).dtype))
    if dtype == np.bool_:
        dtype = np.dtype(np.uint8)
    if np.shape(data) and len(np.shape(data)) == 2:
        import io

        buf = io.BytesIO()
        tifffile.imwrite(buf, np.asarray(data).astype(dtype, copy=False))
        return atomic_write_bytes(path, buf.getvalue(), overwrite=overwrite)
    n = int(np.shape(data)[0])
    with atomic_output(path, overwrite=overwrite) as tmp:
        with tifffile.TiffWriter(tmp, bigtiff=_needs_bigtiff(data, dtype)) as tif:
            for i in range(n):
                tif.write(np.asarray(data[i]).astype(dtype, copy=False), contiguous=True)
    return path


def _needs_bigtiff(data: Any, dtype: np.dtype) -> bool:
    return int(np.prod(np.shape(data))) * dtype.itemsize > 2**32 - 2**25
