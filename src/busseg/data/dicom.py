"""Ultrasound DICOM (single-frame images and multi-frame cine loops) through pydicom.

pydicom is an optional dependency (``pip install "napari-busseg[dicom]"``); nothing here
imports it until a DICOM file is read. Frames are returned as the display would show them:

- ``MONOCHROME2`` grey as stored, ``MONOCHROME1`` inverted (0 = white);
- ``RGB`` as stored; ``YBR_FULL``, ``YBR_FULL_422``, ``YBR_RCT``, ``YBR_ICT`` converted to RGB
  (pydicom >= 3 does this when it decodes; older versions are converted here);
- ``PALETTE COLOR`` through the file's colour lookup table;
- integer pixels of more than 8 stored bits scaled from ``BitsStored`` to the full range, so
  :func:`busseg.data.io.to_grey` maps them to 0-255.

The pixel spacing of the first region of the ultrasound region calibration (``Sequence of
Ultrasound Regions``, ``PhysicalDeltaX/Y`` in cm when ``PhysicalUnitsX/YDirection`` is 3) or
of ``PixelSpacing`` is reported in mm where the file has it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from busseg.data.errors import ImageReadError

__all__ = ["DICOM_SUFFIXES", "DicomInfo", "has_pydicom", "is_dicom", "read_dicom",
           "read_dicom_header"]

DICOM_SUFFIXES = (".dcm", ".dicom")
_INSTALL = 'install pydicom to read DICOM files: pip install "napari-busseg[dicom]"'


def has_pydicom() -> bool:
    """Tell whether pydicom can be imported (DICOM support is then on)."""
    try:
        import pydicom  # noqa: F401
    except ImportError:
        return False
    return True


def is_dicom(path: str | os.PathLike) -> bool:
    """Tell whether a file is DICOM: a ``.dcm``/``.dicom`` name or the ``DICM`` preamble.

    Only the name of ``path`` (str or os.PathLike) and its first 132 bytes are looked at.
    """
    p = Path(path)
    if p.suffix.lower() in DICOM_SUFFIXES:
        return True
    try:
        with open(p, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


class DicomInfo(dict):
    """What :func:`read_dicom` reports besides the pixels (a plain dict).

    Keys: ``modality`` (e.g. ``"US"``), ``photometric`` (the stored interpretation),
    ``n_frames``, ``spacing_mm`` ((row, col) in mm, or None), ``frame_time_ms`` (cine, or
    None).
    """


def _spacing_mm(ds: Any) -> tuple[float, float] | None:
    regions = ds.get("SequenceOfUltrasoundRegions")
    if regions:
        r = regions[0]
        try:
            if int(r.get("PhysicalUnitsXDirection", 0)) == 3 and int(
                    r.get("PhysicalUnitsYDirection", 0)) == 3:  # 3 = cm
                return (abs(float(r.PhysicalDeltaY)) * 10.0, abs(float(r.PhysicalDeltaX)) * 10.0)
        except (AttributeError, TypeError, ValueError):
            pass
    spacing = ds.get("PixelSpacing")
    if spacing is not None and len(spacing) == 2:
        try:
            return (float(spacing[0]), float(spacing[1]))
        except (TypeError, ValueError):
            return None
    return None


def _info(ds: Any, n_frames: int) -> DicomInfo:
    frame_time = ds.get("FrameTime")
    try:
        frame_ms = float(frame_time) if frame_time not in (None, "") else None
    except (TypeError, ValueError):
        frame_ms = None
    return DicomInfo(
        modality=str(ds.get("Modality", "")),
        photometric=str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper(),
        n_frames=int(n_frames), spacing_mm=_spacing_mm(ds), frame_time_ms=frame_ms,
    )


def read_dicom_header(path: str | os.PathLike) -> DicomInfo:
    """Describe a DICOM file from its header only (no pixel data is read).

    Parameters
    ----------
    path : str or os.PathLike
        A DICOM file.

    Returns
    -------
    DicomInfo
        As :func:`read_dicom` reports it (``n_frames`` from ``NumberOfFrames``).

    Raises
    ------
    ImportError
        If pydicom is not installed.
    busseg.data.io.ImageReadError
        If the header cannot be read.
    """
    try:
        import pydicom
    except ImportError:
        raise ImportError(f"{path}: {_INSTALL}") from None
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
    except Exception as exc:  # noqa: BLE001
        raise ImageReadError(f"{path} is not a readable DICOM file ({type(exc).__name__}: "
                             f"{exc})") from exc
    return _info(ds, int(ds.get("NumberOfFrames", 1) or 1))


def read_dicom(path: str | os.PathLike) -> tuple[np.ndarray, DicomInfo]:
    """Decode every frame of a DICOM file as displayed (grey or RGB).

    Parameters
    ----------
    path : str or os.PathLike
        A DICOM file (Part 10, or a raw data set pydicom can read with ``force=True``).

    Returns
    -------
    frames : numpy.ndarray
        (N, H, W) grey or (N, H, W, 3) RGB, one entry per frame (N = 1 for a single image);
        uint8 or uint16 (scaled to the full 16-bit range when more than 8 bits are stored),
        float for floating-point pixel data.
    info : DicomInfo
        Modality, photometric interpretation, frame count, pixel spacing and frame time.

    Raises
    ------
    ImportError
        If pydicom is not installed (the message says how to install it).
    busseg.data.io.ImageReadError
        If the file is not DICOM, has no pixel data, or its pixel data cannot be decoded
        (e.g. a compressed transfer syntax without its decoder plugin).
    """
    try:
        import pydicom
    except ImportError:
        raise ImportError(f"{path}: {_INSTALL}") from None
    p = Path(path)
    try:
        ds = pydicom.dcmread(p, force=True)
    except Exception as exc:  # noqa: BLE001 - pydicom raises many types on foreign files
        raise ImageReadError(f"{p} is not a readable DICOM file ({type(exc).__name__}: "
                             f"{exc})") from exc
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise ImageReadError(f"{p} is a DICOM file without pixel data (modality "
                             f"{ds.get('Modality', '?')}); nothing to show")
    try:
        arr = np.asarray(ds.pixel_array)
    except Exception as exc:  # noqa: BLE001 - missing decoder, corrupt data ...
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        name = getattr(syntax, "name", syntax) or "unknown transfer syntax"
        raise ImageReadError(
            f"cannot decode the pixels of {p} ({name}; {type(exc).__name__}: {exc}); a "
            "compressed DICOM may need a decoder plugin such as pylibjpeg") from exc
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    if n_frames == 1:
        arr = arr[None]
    if samples == 1 and arr.ndim != 3 or samples > 1 and arr.ndim != 4:
        raise ImageReadError(f"{p} holds pixel data of shape {arr.shape} for {n_frames} "
                             f"frame(s) of {samples} sample(s); busseg reads 2D frames")
    if photometric == "PALETTE COLOR":
        from pydicom.pixels import apply_color_lut

        arr = np.asarray(apply_color_lut(arr, ds))
    elif photometric.startswith("YBR") and samples == 3 and not _decoded_as_rgb(pydicom):
        from pydicom.pixels import convert_color_space

        arr = np.asarray(convert_color_space(arr, photometric, "RGB"))
    elif photometric == "MONOCHROME1" and np.issubdtype(arr.dtype, np.integer):
        bits = int(ds.get("BitsStored", arr.dtype.itemsize * 8) or 8)
        if np.issubdtype(arr.dtype, np.signedinteger):
            arr = arr.max() - arr.astype(np.int64)
        else:
            arr = (1 << bits) - 1 - arr.astype(np.int64)
        arr = np.clip(arr, 0, None).astype(np.uint16 if bits > 8 else np.uint8)
    if np.issubdtype(arr.dtype, np.integer) and photometric != "PALETTE COLOR":
        arr = _full_range(arr, int(ds.get("BitsStored", 8) or 8))
    return arr, _info(ds, len(arr))


def _decoded_as_rgb(pydicom: Any) -> bool:
    """Tell whether pydicom converts YBR pixel data to RGB when it decodes (version >= 3)."""
    try:
        return int(str(pydicom.__version__).split(".")[0]) >= 3
    except ValueError:  # pragma: no cover
        return True


def _full_range(arr: np.ndarray, bits: int) -> np.ndarray:
    """Integer pixels as uint8 (<= 8 stored bits) or uint16 scaled from ``bits`` stored bits."""
    if np.issubdtype(arr.dtype, np.signedinteger):
        lo = int(arr.min())
        arr = arr.astype(np.int64) - min(lo, 0)
    hi = int(arr.max()) if arr.size else 0
    if bits <= 8 and hi <= 255:
        return arr.astype(np.uint8)
    top = max((1 << min(bits, 16)) - 1, hi, 1)
    return np.clip(np.rint(arr.astype(np.float64) * (65535.0 / top)), 0, 65535).astype(np.uint16)
