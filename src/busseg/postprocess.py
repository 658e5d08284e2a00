"""Post-processing of predicted binary masks: hole filling and connected-component filtering.

Everything here is a thin layer over :mod:`scipy.ndimage` (``binary_fill_holes``, ``label``);
no own morphology. Numpy only, no torch.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy import ndimage

__all__ = ["KEEP_CHOICES", "postprocess_mask"]

#: Allowed values of ``keep`` in :func:`postprocess_mask`.
KEEP_CHOICES: tuple[str, ...] = ("all", "largest")


def postprocess_mask(
    mask: Any,
    *,
    fill_holes: bool = False,
    keep: str = "all",
    min_area: int = 0,
) -> np.ndarray:
    """Clean a binary mask: fill holes, drop small components, optionally keep the largest.

    The steps run in this order: (1) fill holes (``scipy.ndimage.binary_fill_holes``: background
    regions not connected to the image border become foreground); (2) remove connected
    components with fewer than ``min_area`` pixels; (3) with ``keep="largest"``, keep only the
    largest remaining component (the first one in raster order on a tie). Components are
    8-connected (``scipy.ndimage.label`` with a full 3x3 structuring element), so pixels that
    touch diagonally belong to one lesion.

    Parameters
    ----------
    mask : array_like, shape (H, W)
        Binary mask; any value ``> 0`` is lesion (bool, 0/1, 0/255 and napari Labels data all
        work).
    fill_holes : bool, optional
        Fill holes inside lesions.
    keep : {"all", "largest"}, optional
        ``"all"`` keeps every component (that survives ``min_area``); ``"largest"`` keeps only
        the biggest one. BUSI images usually hold one lesion, but 17 of 780 hold several, so
        ``"largest"`` can delete true lesions.
    min_area : int, optional
        Components smaller than this many pixels are removed; 0 (default) keeps all. In pixels
        of the mask's own grid.

    Returns
    -------
    numpy.ndarray
        (H, W) bool, a new array (the input is never modified). With the defaults it equals
        ``mask > 0``.

    Raises
    ------
    ValueError
        If ``mask`` is not 2D or is empty, ``keep`` is not one of :data:`KEEP_CHOICES`, or
        ``min_area`` is negative or not an integer.
    """
    arr = np.asarray(mask)
    if arr.ndim != 2 or arr.size == 0:
        raise ValueError(
            f"postprocess_mask needs a non-empty 2D mask (H, W), got shape {arr.shape}; "
            "for a stack, process one slice at a time"
        )
    if keep not in KEEP_CHOICES:
        raise ValueError(f"keep must be one of {', '.join(map(repr, KEEP_CHOICES))}, got {keep!r}")
    if isinstance(min_area, bool) or not isinstance(min_area, (int, np.integer)) or min_area < 0:
        raise ValueError(f"min_area must be a non-negative integer (pixels), got {min_area!r}")

    out = arr > 0 if arr.dtype != np.bool_ else arr.copy()
    if fill_holes:
        out = ndimage.binary_fill_holes(out)
    if (min_area <= 1 and keep == "all") or not out.any():
        return out
    labels, n = ndimage.label(out, structure=np.ones((3, 3), dtype=bool))
    if n == 0:
        return out
    areas = np.bincount(labels.ravel(), minlength=n + 1)
    areas[0] = 0  # background
    wanted = areas >= max(int(min_area), 1)
    if keep == "largest" and wanted.any():
        largest = int(np.argmax(np.where(wanted, areas, -1)))
        wanted = np.zeros_like(wanted)
        wanted[largest] = True
    return wanted[labels]
