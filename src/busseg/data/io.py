"""Image and mask I/O: PNG/JPEG/TIFF/BMP (and DICOM with pydicom) -> grey uint8; masks -> bool.

- :func:`read_image`: one 2D image as grey uint8; :func:`read_stack`: every page of a
  multi-page TIFF or frame of a multi-frame (cine) DICOM as an (N, H, W) grey stack;
  :func:`frame_count` reads only the header.
- :func:`read_mask`: mask files merged by union.
- :func:`write_mask_png`, :func:`atomic_write_bytes`, :func:`atomic_output`: atomic writes.

DICOM (``.dcm``, or any file with the ``DICM`` preamble) needs the optional pydicom
(``pip install "napari-busseg[dicom]"``); see :mod:`busseg.data.dicom`.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from struct import error as struct_error

import numpy as np

from busseg.data.errors import ImageReadError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")

# ITU-R BT.601 luma weights, the same as Pillow's "L" conversion.
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float64)


def to_grey(image: np.ndarray) -> np.ndarray:
    """Convert an image array to 8-bit grey.

    Parameters
    ----------
    image : numpy.ndarray
        (H, W) grey, (H, W, 3) RGB or (H, W, 4) RGBA (alpha is ignored); also (H, W, 1).
        dtype uint8 (0-255), uint16 (0-65535), bool, or float. Float images with a maximum of
        at most 1 are taken as [0, 1]; other float images are scaled from their own
        minimum-maximum range to 0-255.

    Returns
    -------
    numpy.ndarray
        (H, W) uint8 in 0-255. Colour is reduced with the ITU-R BT.601 luma weights
        (0.299 R + 0.587 G + 0.114 B); an RGB image whose channels are equal keeps its values
        exactly.

    Raises
    ------
    ValueError
        If the array is not 2D or 3D with 1, 3 or 4 channels, is empty, or is not numeric
        (complex, object or string dtype).
    """
    arr = np.asarray(image)
    if arr.dtype != np.bool_ and (
        not np.issubdtype(arr.dtype, np.number) or np.iscomplexobj(arr)
    ):
        raise ValueError(
            f"an image must hold real numbers (uint8, uint16, float or bool), got dtype "
            f"{arr.dtype}"
        )
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim == 3 and arr.shape[-1] in (3, 4):
        rgb = arr[..., :3]
        if np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 0], rgb[..., 2]):
            arr = rgb[..., 0]
        else:
            arr = rgb.astype(np.float64) @ _LUMA
            if np.issubdtype(rgb.dtype, np.integer):  # keep the dtype so its range applies below
                info = np.iinfo(rgb.dtype)
                arr = np.clip(np.rint(arr), info.min, info.max).astype(rgb.dtype)
    if arr.ndim != 2:
        raise ValueError(
            f"expected a 2D grey image (H, W) or a colour image (H, W, 3|4), got shape "
            f"{np.shape(image)}; for a stack, pass one slice at a time"
        )
    if arr.size == 0:
        raise ValueError(f"the image is empty (shape {np.shape(image)})")
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == bool:
        return arr.astype(np.uint8) * 255
    if arr.dtype == np.uint16:
        return (arr.astype(np.float64) / 257.0).round().astype(np.uint8)
    arr = arr.astype(np.float64)
    finite = np.isfinite(arr)
    if not finite.all():
        arr = np.where(finite, arr, 0.0)
    lo, hi = float(arr.min()), float(arr.max())
    if lo >= 0.0 and hi <= 1.0:
        scaled = arr * 255.0
    elif lo >= 0.0 and hi <= 255.0 and np.issubdtype(np.asarray(image).dtype, np.integer):
        scaled = arr
    else:
        scaled = (arr - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(arr)
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def _frames_error(path: Path, n: int) -> ImageReadError:
    return ImageReadError(
        f"{path} holds {n} pages (frames), not one 2D image; read it with "
        "busseg.data.io.read_stack, or open it in napari (the busseg reader opens it as a "
        "stack and segments it slice by slice)"
    )


def _dicom_frames(path: Path) -> np.ndarray:
    """All frames of a DICOM file, (N, H, W) or (N, H, W, 3) (see busseg.data.dicom)."""
    from busseg.data.dicom import read_dicom

    try:
        frames, _ = read_dicom(path)
    except ImportError as exc:
        raise ImageReadError(str(exc)) from None
    return frames


def _open_tiff_fallback(path: Path, cause: Exception) -> np.ndarray:
    """Read a TIFF that Pillow cannot decode (float64, int64, float16 ...) with tifffile."""
    try:
        import tifffile
    except ImportError:  # pragma: no cover - tifffile comes with scikit-image / napari
        raise cause from None
    try:
        with tifffile.TiffFile(path) as tif:
            if len(tif.pages) > 1:
                raise _frames_error(path, len(tif.pages))
            arr = tif.pages[0].asarray()
    except ImageReadError:
        raise
    except Exception:  # noqa: BLE001 - tifffile cannot read it either: report Pillow's reason
        raise cause from None
    arr = np.asarray(arr)
    if arr.ndim == 3 and arr.shape[-1] not in (1, 3, 4):
        raise ImageReadError(
            f"{path} has shape {arr.shape}; busseg reads 2D grey, RGB or RGBA images"
        )
    if arr.ndim not in (2, 3) or arr.size == 0:
        raise ImageReadError(f"{path} has shape {arr.shape}; busseg reads 2D images")
    if np.iscomplexobj(arr) or not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool):
        raise ImageReadError(f"{path} holds {arr.dtype} pixels; busseg reads real-valued images")
    if np.issubdtype(arr.dtype, np.floating):
        arr = arr.astype(np.float64)
    return arr


def _existing_file(path: str | os.PathLike) -> Path:
    """``path`` as a Path, after checking that it is a non-empty file (else the error)."""
    path = Path(path)
    if not path.is_file():
        if path.is_dir():
            raise IsADirectoryError(f"{path} is a folder, not an image file")
        raise FileNotFoundError(f"no such image file: {path}")
    _check_not_empty(path)
    return path


def _open(path: str | os.PathLike) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    path = _existing_file(path)
    if _is_dicom(path):
        frames = _dicom_frames(path)
        if len(frames) > 1:
            raise _frames_error(path, len(frames))
        return frames[0]
    try:
        return _decode(path)
    except ImageReadError:
        raise
    except PermissionError as exc:
        raise ImageReadError(f"cannot read {path}: permission denied ({exc})") from exc
    except Image.DecompressionBombError as exc:
        raise ImageReadError(
            f"cannot read {path}: its header claims more pixels than Pillow's safety limit "
            f"({exc}); a real ultrasound image is far smaller, so the file is probably corrupt"
        ) from exc
    except MemoryError as exc:
        raise ImageReadError(f"cannot read {path}: not enough memory to decode it") from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, TypeError, KeyError,
            IndexError, EOFError, ZeroDivisionError, OverflowError, struct_error) as exc:
        # Pillow's decoders raise all of these on corrupt or hostile files
        err = ImageReadError(
            f"cannot read {path} as an image ({type(exc).__name__}: {exc}); check that the "
            "file is a complete PNG/JPEG/TIFF/BMP"
        )
        err.__cause__ = exc
        if path.suffix.lower() in (".tif", ".tiff"):
            return _open_tiff_fallback(path, err)
        raise err from exc


def _check_not_empty(path: Path) -> None:
    try:
        size = path.stat().st_size
    except OSError:
        return  # the decoder reports it
    if size == 0:
        raise ImageReadError(f"{path} is empty (0 bytes); an interrupted copy or download?")


def _is_dicom(path: Path) -> bool:
    from busseg.data.dicom import is_dicom

    return is_dicom(path)


def _decode(path: Path) -> np.ndarray:
    """Decode one image file with Pillow (errors are mapped by :func:`_open`)."""
    from PIL import Image

    with Image.open(path) as im:
        n_frames = getattr(im, "n_frames", 1)
        if n_frames > 1:
            raise _frames_error(path, n_frames)
        im.load()
        if im.mode in ("P", "PA"):
            im = im.convert("RGBA")
        elif im.mode == "1":
            im = im.convert("L")
        elif im.mode.startswith("I;16"):
            return np.asarray(im, dtype=np.uint16)
        elif im.mode in ("I", "F"):
            return np.asarray(im, dtype=np.float64)
        elif im.mode not in ("L", "LA", "RGB", "RGBA"):
            im = im.convert("RGB")
        arr = np.asarray(im)
        if im.mode == "LA":
            arr = arr[..., 0]
        return arr


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Read an image file as 8-bit grey.

    Parameters
    ----------
    path : str or os.PathLike
        A PNG, JPEG, TIFF or BMP file: 1-bit, grey, grey+alpha, palette, RGB or RGBA, 8 or 16
        bit; or a single-frame DICOM file (with pydicom installed).

    Returns
    -------
    numpy.ndarray
        (H, W) uint8 grey in 0-255 (see :func:`to_grey`).

    Raises
    ------
    FileNotFoundError
        If the file does not exist (``IsADirectoryError`` if it is a folder).
    ImageReadError
        A ``ValueError`` naming the file once: empty (0 bytes), not a decodable image
        (truncated, corrupt, another format, an absurd size in its header, unreadable),
        several pages or frames (a stack: see :func:`read_stack`), pixels that are not a 2D
        grey / RGB / RGBA image, or a DICOM file without pydicom installed. TIFFs that Pillow
        cannot decode (float64, int64 ...) are read with ``tifffile``.
    """
    return to_grey(_open(path))


def frame_count(path: str | os.PathLike) -> int:
    """Count the pages (TIFF, GIF ...) or frames (DICOM) of an image file from its header.

    ``path`` (str or os.PathLike) is an image file. Returns 1 for a single 2D image, 0 when
    the header cannot be read (the readers report why when they decode the file).
    """
    path = Path(path)
    try:
        if _is_dicom(path):
            import pydicom

            ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
            return int(ds.get("NumberOfFrames", 1) or 1)
        from PIL import Image

        try:
            with Image.open(path) as im:
                return int(getattr(im, "n_frames", 1))
        except Exception:  # noqa: BLE001 - e.g. float64 TIFFs Pillow cannot open
            if path.suffix.lower() not in (".tif", ".tiff"):
                return 0
            import tifffile

            with tifffile.TiffFile(path) as tif:
                return len(tif.pages)
    except Exception:  # noqa: BLE001 - unreadable header, pydicom absent
        return 0


def read_stack(path: str | os.PathLike) -> np.ndarray:
    """Read every page of a multi-page TIFF or frame of a DICOM cine loop as grey.

    Parameters
    ----------
    path : str or os.PathLike
        A multi-page TIFF, a multi-frame (or single-frame) DICOM, or any single image.

    Returns
    -------
    numpy.ndarray
        (N, H, W) uint8 grey, one slice per page or frame (N = 1 for a single image); colour
        frames are reduced as in :func:`to_grey`.

    Raises
    ------
    FileNotFoundError
        If the file does not exist.
    ImageReadError
        If it cannot be decoded, its pages differ in size, or (DICOM) pydicom is missing.
    """
    path = _existing_file(path)
    if _is_dicom(path):
        frames = [to_grey(f) for f in _dicom_frames(path)]
    else:
        frames = _tiff_pages(path) if path.suffix.lower() in (".tif", ".tiff") else None
        if frames is None:
            frames = [read_image(path)] if frame_count(path) <= 1 else _pil_pages(path)
    shapes = {f.shape for f in frames}
    if len(shapes) > 1:
        raise ImageReadError(f"{path}: its pages differ in size ({sorted(shapes)}); busseg "
                             "stacks pages of one size only")
    return np.stack(frames)


def _tiff_pages(path: Path) -> list[np.ndarray] | None:
    """Grey pages of a TIFF with tifffile (None: not a multi-page TIFF, or tifffile absent)."""
    try:
        import tifffile
    except ImportError:  # pragma: no cover - tifffile comes with napari / scikit-image
        return None
    try:
        with tifffile.TiffFile(path) as tif:
            if len(tif.pages) <= 1:
                return None
            return [to_grey(np.asarray(page.asarray())) for page in tif.pages]
    except ValueError as exc:  # to_grey: not a 2D page
        raise ImageReadError(f"{path}: {exc}") from exc
    except Exception:  # noqa: BLE001 - tifffile cannot read it: Pillow's error via read_image
        return None


def _pil_pages(path: Path) -> list[np.ndarray]:
    """Grey frames of a multi-frame Pillow image (GIF, multi-page TIFF)."""
    from PIL import Image, ImageSequence

    try:
        with Image.open(path) as im:
            return [to_grey(np.asarray(f.convert("RGB") if f.mode not in ("L", "RGB", "RGBA")
                                       else f)) for f in ImageSequence.Iterator(im)]
    except Exception as exc:  # noqa: BLE001
        raise ImageReadError(f"cannot read the pages of {path} ({type(exc).__name__}: "
                             f"{exc})") from exc


def read_mask(paths: str | os.PathLike | Sequence[str | os.PathLike]) -> np.ndarray:
    """Read one or several mask files and merge them by union.

    Parameters
    ----------
    paths : path or sequence of paths
        Mask files (BUSI: ``X_mask.png``, ``X_mask_1.png``, ...). 1-bit, grey, RGB or RGBA;
        any value > 0 in any colour channel is lesion (alpha is ignored).

    Returns
    -------
    numpy.ndarray
        (H, W) bool, True where any mask marks lesion.

    Raises
    ------
    ValueError
        If no path is given or the masks differ in size.
    FileNotFoundError, ImageReadError
        If a file is missing or cannot be decoded (see :func:`read_image`).
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    paths = list(paths)
    if not paths:
        raise ValueError("read_mask needs at least one mask path")
    union = None
    for p in paths:
        arr = _open(p)
        if arr.ndim == 3:
            arr = arr[..., :3].max(axis=-1) if arr.shape[-1] >= 3 else arr[..., 0]
        m = arr > 0
        if union is None:
            union = m
        elif m.shape != union.shape:
            raise ValueError(
                f"mask {p} has size {m.shape[::-1]} (W, H) but {paths[0]} has "
                f"{union.shape[::-1]}; all masks of one image must have the image's size"
            )
        else:
            union |= m
    return union


def default_file_mode() -> int:
    """Permission bits a newly created file gets under the current umask (e.g. 0o644)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Give a temporary path beside ``path``; on success, move it to ``path`` atomically.

    The caller writes the whole file to the yielded path; when the ``with`` block ends without
    an exception, the file is fsynced, given the umask's permissions and renamed onto
    ``path`` (or hard-linked, when ``overwrite`` is False, so an existing file is never
    replaced, not even by a concurrent writer). On an exception the temporary file is
    removed and ``path`` is untouched.

    Parameters
    ----------
    path : str or os.PathLike
        Destination file; its folder is created if needed.
    overwrite : bool
        Replace an existing file. Without it an existing file raises.

    Yields
    ------
    pathlib.Path
        The temporary file (created empty) to write.

    Raises
    ------
    FileExistsError
        If ``path`` exists and ``overwrite`` is False (checked before and after writing).
    IsADirectoryError
        If ``path`` is a folder.
    """
    path = Path(path)
    exists_msg = f"{path} already exists; choose another name or pass overwrite=True"
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder; give a file name to write to")
    if not overwrite and path.exists():
        raise FileExistsError(exists_msg)
    path.parent.mkdir(parents=True, exist_ok=True)
    # a short prefix: the temporary name must stay within the file system's name length
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name[:40]}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        # mkstemp creates 0600 files; give the file the mode an ordinary open() would.
        os.chmod(tmp, default_file_mode())
        if overwrite:
            os.replace(tmp, path)
        else:
            # os.link fails if the destination exists: no window where a file could be replaced.
            try:
                os.link(tmp, path)
            except FileExistsError:
                raise FileExistsError(exists_msg) from None
            except OSError:  # file systems without hard links
                if path.exists():
                    raise FileExistsError(exists_msg) from None
                os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, overwrite: bool = False) -> Path:
    """Write bytes to ``path`` atomically (see :func:`atomic_output`).

    Parameters
    ----------
    path : str or os.PathLike
        Destination file; its folder is created if needed.
    data : bytes
        The content.
    overwrite : bool
        Replace an existing file. Without it an existing file raises.

    Returns
    -------
    pathlib.Path
        The destination path.

    Raises
    ------
    FileExistsError
        If ``path`` exists and ``overwrite`` is False.
    """
    with atomic_output(path, overwrite=overwrite) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_mask_png(
    path: str | os.PathLike, mask: np.ndarray, *, overwrite: bool = False
) -> Path:
    """Write a mask as an 8-bit PNG with values 0 and 255, atomically.

    Parameters
    ----------
    path : str or os.PathLike
        Destination ``.png`` file.
    mask : numpy.ndarray
        (H, W) array; any value > 0 is lesion (napari Labels data, bool, 0/1 or 0/255).
    overwrite : bool
        Replace an existing file. Without it an existing file raises.

    Returns
    -------
    pathlib.Path
        The written path.

    Raises
    ------
    ValueError
        If ``mask`` is not 2D, has no pixels, or is not numeric.
    FileExistsError
        If ``path`` exists and ``overwrite`` is False.
    """
    import io as _io

    from PIL import Image

    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"a mask must be 2D (H, W), got shape {mask.shape}")
    if mask.size == 0:
        raise ValueError(f"a mask must have at least one pixel, got shape {mask.shape}")
    if mask.dtype != np.bool_ and (
        not np.issubdtype(mask.dtype, np.number) or np.iscomplexobj(mask)
    ):
        raise ValueError(f"a mask must hold numbers or bools, got dtype {mask.dtype}")
    buf = _io.BytesIO()
    Image.fromarray(np.where(mask > 0, 255, 0).astype(np.uint8), mode="L").save(buf, format="PNG")
    return atomic_write_bytes(path, buf.getvalue(), overwrite=overwrite)
