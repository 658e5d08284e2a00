"""Layer conventions of napari-busseg: names, metadata keys and small layer helpers (Qt-free).

The reader, the writer and every dock widget name and tag layers through this module, so a
convention lives in one place:

- one case ``<image>`` has the layers ``"<image>"`` (the grey image), ``"<image> ground truth"``
  (the reader's expert masks), ``"<image> prediction"`` (the editable Labels layer the
  widgets write and the Scan browser saves), ``"<image> boxes"`` / ``"<image> clicks"``
  (prompt layers) and ``"<image> probability"`` (an optional probability map);
- the plugin's metadata of a layer is the dict ``layer.metadata["busseg"]`` (:data:`META_KEY`);
  its ``kind`` says what the layer is (``"case"``, ``"stack"``, ``"prediction"``,
  ``"box prompts"``, :data:`SPARE_KIND` ...), ``image`` names the image layer a derived layer
  belongs to, ``written_by`` says which widget wrote it and ``written_sha1`` fingerprints the
  data it wrote (:func:`data_sha1`).

This module imports numpy only (napari lazily, inside :func:`find_layer`); it holds no Qt.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np

__all__ = [
    "BOXES_SUFFIX",
    "CASE_LAYER_SUFFIXES",
    "CLICKS_SUFFIX",
    "GROUND_TRUTH_SUFFIX",
    "META_KEY",
    "PREDICTION_SUFFIX",
    "PROBABILITY_SUFFIX",
    "SEGMENT_WRITTEN_BY",
    "SPARE_KIND",
    "boxes_name",
    "busseg_metadata",
    "clicks_name",
    "data_sha1",
    "find_layer",
    "ground_truth_name",
    "image_name_of",
    "is_spare",
    "prediction_name",
    "probability_name",
    "spatial_shape",
    "stack_slices",
]

#: Key of the plugin's entry in ``layer.metadata``.
META_KEY = "busseg"
#: Suffix of the editable prediction Labels layer: ``"<image layer name> prediction"``.
PREDICTION_SUFFIX = " prediction"
#: Suffix of the ground-truth Labels layer: ``"<image layer name> ground truth"``.
GROUND_TRUTH_SUFFIX = " ground truth"
#: Suffix of the box-prompt Shapes layer: ``"<image> boxes"``.
BOXES_SUFFIX = " boxes"
#: Suffix of the click-prompt Points layer: ``"<image> clicks"``.
CLICKS_SUFFIX = " clicks"
#: Suffix of the probability-map Image layer: ``"<image> probability"``.
PROBABILITY_SUFFIX = " probability"
#: Suffixes of the layers of one case, besides the image layer itself.
CASE_LAYER_SUFFIXES = (GROUND_TRUTH_SUFFIX, PREDICTION_SUFFIX, BOXES_SUFFIX, CLICKS_SUFFIX,
                       PROBABILITY_SUFFIX)
#: Metadata kind (and name prefix) of the hidden layers the Scan browser makes ahead for the
#: next case to take over; widgets do not offer them as images.
SPARE_KIND = "busseg spare"
#: ``layer.metadata["busseg"]["written_by"]`` of the layers "Segment lesions" writes.
SEGMENT_WRITTEN_BY = "segment widget"


def prediction_name(image_name: str) -> str:
    """Name of the prediction Labels layer of an image layer.

    Parameters
    ----------
    image_name : str
        The image layer's name, e.g. ``"benign (4)"``.

    Returns
    -------
    str
        ``"<image_name> prediction"``.
    """
    return f"{image_name}{PREDICTION_SUFFIX}"


def ground_truth_name(image_name: str) -> str:
    """Name of the ground-truth Labels layer of an image layer: ``"<image_name> ground truth"``."""
    return f"{image_name}{GROUND_TRUTH_SUFFIX}"


def boxes_name(image_name: str) -> str:
    """Name of the box-prompt Shapes layer of an image layer: ``"<image_name> boxes"``."""
    return f"{image_name}{BOXES_SUFFIX}"


def clicks_name(image_name: str) -> str:
    """Name of the click-prompt Points layer of an image layer: ``"<image_name> clicks"``."""
    return f"{image_name}{CLICKS_SUFFIX}"


def probability_name(image_name: str) -> str:
    """Name of the probability-map Image layer: ``"<image_name> probability"``."""
    return f"{image_name}{PROBABILITY_SUFFIX}"


def busseg_metadata(layer: Any) -> dict:
    """Return the plugin's metadata of a layer.

    Parameters
    ----------
    layer : napari.layers.Layer or None
        Any layer (or any object with a ``metadata`` mapping).

    Returns
    -------
    dict
        ``layer.metadata["busseg"]`` (keys such as ``source``, ``label``, ``name``, ``root``,
        ``original_size``, ``slices``; see :mod:`busseg._reader`), or an empty dict when the
        layer has none.
    """
    meta = getattr(layer, "metadata", None) or {}
    value = meta.get(META_KEY)
    return value if isinstance(value, dict) else {}


def is_spare(layer: Any) -> bool:
    """Whether ``layer`` is one of the Scan browser's hidden spare layers."""
    return busseg_metadata(layer).get("kind") == SPARE_KIND


def image_name_of(layer: Any) -> str | None:
    """Return the image layer name a prediction / ground-truth / prompt layer belongs to.

    Parameters
    ----------
    layer : napari.layers.Layer or None
        A derived layer.

    Returns
    -------
    str or None
        Its metadata's ``image`` when "Segment lesions" wrote it, else the name without one
        of the :data:`CASE_LAYER_SUFFIXES` (probability excepted); None when neither applies.
    """
    if layer is None:
        return None
    meta = busseg_metadata(layer)
    if isinstance(meta.get("image"), str) and meta.get("written_by") == SEGMENT_WRITTEN_BY:
        return meta["image"]
    for suffix in (PREDICTION_SUFFIX, GROUND_TRUTH_SUFFIX, BOXES_SUFFIX, CLICKS_SUFFIX):
        if layer.name.endswith(suffix) and len(layer.name) > len(suffix):
            return layer.name[: -len(suffix)]
    return None


def data_sha1(data: Any) -> str:
    """Fingerprint an array's shape, dtype and bytes (detects any edit of a layer).

    Parameters
    ----------
    data : array_like
        Any array (a Labels layer's data).

    Returns
    -------
    str
        Hex SHA-1 digest; equal for equal shape, dtype and values.
    """
    arr = np.ascontiguousarray(np.asarray(data))
    h = hashlib.sha1(f"{arr.shape}|{arr.dtype.str}|".encode())
    h.update(memoryview(arr.reshape(-1).view(np.uint8)))
    return h.hexdigest()


def spatial_shape(layer: Any) -> tuple[int, ...]:
    """Shape of a layer's data without colour channels (leading axes + (H, W)).

    Parameters
    ----------
    layer : napari.layers.Layer
        An Image or Labels layer (multiscale: its first level).

    Returns
    -------
    tuple of int
        The data shape, without the last axis of an RGB(A) image.
    """
    data = layer.data[0] if getattr(layer, "multiscale", False) else layer.data
    shape = tuple(int(v) for v in np.shape(data))
    return shape[:-1] if getattr(layer, "rgb", False) else shape


def stack_slices(layer: Any) -> list[dict] | None:
    """Per-slice records of a stack opened by the plugin's folder reader.

    Parameters
    ----------
    layer : napari.layers.Layer
        Any layer.

    Returns
    -------
    list of dict or None
        ``layer.metadata["busseg"]["slices"]`` (keys ``name``, ``original_shape`` [H, W] ...)
        when the layer is such a 3D stack with one record per slice, else None. Slices of
        those stacks are zero-padded at the bottom and right; ``original_shape`` tells how
        much of each is the image.
    """
    slices = busseg_metadata(layer).get("slices")
    shape = np.shape(layer.data[0] if getattr(layer, "multiscale", False) else layer.data)
    if not isinstance(slices, list) or len(shape) != 3 or len(slices) != shape[0]:
        return None
    return slices


def find_layer(viewer: Any, name: str, layer_type: str | None = None) -> Any:
    """Find a layer by name.

    Parameters
    ----------
    viewer : napari.viewer.Viewer
        The viewer to search.
    name : str
        Exact layer name.
    layer_type : {"image", "labels"} or None
        Only accept a layer of this kind.

    Returns
    -------
    napari.layers.Layer or None
        The layer, or ``None`` when no layer has that name (or it is of another kind).

    Raises
    ------
    ValueError
        For another ``layer_type``.
    """
    for layer in viewer.layers:
        if layer.name != name:
            continue
        if layer_type is None or _is_kind(layer, layer_type):
            return layer
    return None


def _is_kind(layer: Any, layer_type: str) -> bool:
    import napari.layers

    kinds = {"image": napari.layers.Image, "labels": napari.layers.Labels}
    if layer_type not in kinds:
        raise ValueError(f"layer_type must be one of {sorted(kinds)}, got {layer_type!r}")
    return isinstance(layer, kinds[layer_type])
