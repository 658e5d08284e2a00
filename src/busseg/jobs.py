"""Qt-free jobs behind the "Segment lesions" widget, the annotation session and scripts.

Nothing here imports Qt, napari or magicgui (a test checks it); torch and
:mod:`busseg.inference` are imported when a job runs.

- :func:`segment_job`: automatic segmentation of every 2D slice of an image array, a generator
  that yields progress events and returns a :class:`SegmentResult` (DESIGN.md practice 2:
  napari wraps it in a ``thread_worker``; tests, the CLI and the session drain it with
  :func:`busseg.engine.drain`).
- :func:`prompt_job`: one prompted prediction of one 2D slice (:class:`PromptRequest` ->
  :class:`PromptResult`).
- :func:`prompt_region`: the pixels a prompt may change (so brush edits elsewhere survive).
- :func:`guarded` / :class:`WorkerError`: re-raise torch's ``RuntimeError`` under a type that
  superqt's workers report.
- :func:`slice_crop`: the unpadded (H, W) of a slice of the folder reader's stacks.
"""

from __future__ import annotations

import time
from collections.abc import Generator, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from busseg.settings import InferenceSettings

__all__ = [
    "PromptRequest",
    "PromptResult",
    "SegmentResult",
    "WorkerError",
    "guarded",
    "prompt_job",
    "prompt_region",
    "segment_job",
    "slice_crop",
]


class WorkerError(Exception):
    """An error raised inside a worker job, re-raised under a type the worker reports.

    superqt's ``GeneratorWorker`` takes any ``RuntimeError`` from the generator (torch raises
    those, e.g. when memory runs out) for a deleted Qt object and only warns; this type makes
    it reach the ``errored`` signal and the widget's status line.
    """


def guarded(gen: Generator) -> Generator:
    """Run a job generator, re-raising ``RuntimeError`` as :class:`WorkerError`.

    Parameters
    ----------
    gen : generator
        A job such as :func:`segment_job` or :func:`busseg.finetune.finetune_iter`.

    Yields
    ------
    object
        What ``gen`` yields.

    Returns
    -------
    object
        What ``gen`` returns.

    Raises
    ------
    WorkerError
        If ``gen`` raises a ``RuntimeError``.
    """
    try:
        return (yield from gen)
    except RuntimeError as exc:
        raise WorkerError(f"{type(exc).__name__}: {exc}") from exc


def slice_crop(slices: list[dict] | None, i: int) -> tuple[int, int] | None:
    """Return the (H, W) of slice ``i`` without its padding, or None (the whole slice)."""
    if slices is None:
        return None
    shp = slices[i].get("original_shape")
    return (int(shp[0]), int(shp[1])) if shp else None



def _read_slice(data: Any, index: tuple[int, ...]) -> np.ndarray:
    """One 2D (or 2D colour) slice of a layer's data as a numpy array (runs in the worker)."""
    return np.asarray(data[index])


# --------------------------------------------------------------------------- the job


@dataclass
class SegmentResult:
    """What :func:`segment_job` returns.

    Attributes
    ----------
    labels : numpy.ndarray
        uint8, the image's spatial shape (leading axes + (H, W)); 1 = lesion, 0 = background.
    proba : numpy.ndarray or None
        float32 in [0, 1], same shape, when asked for.
    checkpoint : str
        The checkpoint folder that was used.
    device : str
        Where the model ran (``"cpu"``, ``"cuda"``, ``"mps"``).
    threshold : float
        Probability threshold used.
    elapsed : float
        Wall time of the job in seconds (model loading included).
    extra : dict
        ``"gated"``: list of bool per slice (C order of the leading axes), True where the
        normal-scan gate emptied the mask; ``"regions_removed"``: list of int per slice, the
        regions of the automatic mask the region filter removed; ``"class_proba"`` (models
        with a class head only):
        list of ``{"normal", "benign", "malignant"}`` probability dicts per slice (research
        output, not a diagnosis).
    """

    labels: np.ndarray
    proba: np.ndarray | None
    checkpoint: str
    device: str
    threshold: float
    elapsed: float
    extra: dict = field(default_factory=dict)


def segment_job(
    data: Any,
    *,
    rgb: bool,
    checkpoint: str | Path | None,
    settings: InferenceSettings | None = None,
    with_proba: bool = False,
    crops: Sequence[tuple[int, int] | None] | None = None,
    **overrides: Any,
) -> Generator[tuple, None, SegmentResult]:
    """Segment every 2D slice of an image array, yielding progress (runs in a worker thread).

    Parameters
    ----------
    data : array_like
        (..., H, W) grey or (..., H, W, 3|4) colour (``rgb=True``); any leading axes are a
        stack, segmented slice by slice. numpy, dask or zarr arrays (slices are read lazily).
    rgb : bool
        Whether the last axis holds colour channels (napari's ``layer.rgb``).
    checkpoint : path or None
        Checkpoint folder (or a file in it); None for the shipped default model.
    settings : busseg.settings.InferenceSettings or None
        Threshold, test-time flips, gate, region filter, post-processing (``min_area`` in
        pixels) and device, as :func:`busseg.inference.predict`; the model is loaded on
        ``settings.device`` (None: ``"auto"``, a GPU when there is one). None: the defaults.
    with_proba : bool
        Also return the probability map.
    crops : sequence of (int, int) or None, optional
        Per slice (in C order of the leading axes), the (H, W) of the image inside a
        zero-padded slice (stacks of the plugin's folder reader); only that part is segmented
        and the padding stays background. None: whole slices.
    **overrides
        Fields of :class:`~busseg.settings.InferenceSettings` replacing those of
        ``settings`` (``region_filter=False`` switches the checkpoint's filter off).

    Yields
    ------
    tuple
        ``("status", message)`` while loading the model, then ``("progress", done, total)``
        after each slice.

    Returns
    -------
    SegmentResult

    Raises
    ------
    busseg.models.CheckpointError
        If the checkpoint cannot be loaded.
    ValueError
        For an unknown or absent device, a threshold outside (0, 1), or a slice that is not
        a valid image.
    TypeError
        For a keyword that is not a field of ``InferenceSettings``.
    """
    from busseg.inference import load_model, model_device, predict_stack_iter

    settings = InferenceSettings.coerce(settings, "segment_job", **overrides)
    t0 = time.perf_counter()
    shape = tuple(np.shape(data))
    spatial_ndim = 3 if rgb else 2
    if len(shape) < spatial_ndim:
        raise ValueError(f"the image has shape {shape}; expected (..., H, W) or (..., H, W, 3|4)")
    leading = shape[: len(shape) - spatial_ndim]
    out_shape = shape[:-1] if rgb else shape
    indices = list(np.ndindex(*leading)) if leading else [()]
    n = len(indices)
    where = "the shipped default model" if checkpoint is None else str(checkpoint)
    yield ("status", f"loading {where} …")
    model = load_model(checkpoint, device=settings.device or "auto")
    dev = model_device(model)
    t = settings.resolve(model.busseg_config).threshold
    yield ("progress", 0, n)
    labels = np.zeros(out_shape, dtype=np.uint8)
    proba = np.zeros(out_shape, dtype=np.float32) if with_proba else None
    if crops is not None and len(crops) != n:
        raise ValueError(f"crops has {len(crops)} entries for {n} slices")

    def crop(i: int) -> tuple[slice, slice]:
        c = crops[i] if crops is not None else None
        return (slice(None), slice(None)) if c is None else (slice(0, c[0]), slice(0, c[1]))

    slices: Iterator[np.ndarray] = (
        _read_slice(data, idx)[crop(i)] for i, idx in enumerate(indices)
    )
    results = predict_stack_iter(slices, model, settings.replace(device=None),
                                 batch_size=1 if dev.type == "cpu" else 4, with_class=True,
                                 with_info=True)
    classes: list[dict | None] = [None] * n
    gated = [False] * n
    removed = [0] * n
    for i, mask, p, cp, info in results:
        labels[indices[i]][crop(i)] = mask
        if proba is not None:
            proba[indices[i]][crop(i)] = p
        classes[i] = cp
        gated[i] = bool(info["gated"])
        removed[i] = int(info["regions_removed"])
        yield ("progress", i + 1, n)
    extra = {"gated": gated, "regions_removed": removed}
    if any(c is not None for c in classes):
        extra["class_proba"] = classes
    return SegmentResult(labels, proba, str(getattr(model, "busseg_checkpoint_path", where)),
                         dev.type, t, time.perf_counter() - t0, extra)


def _was_gated(mask: np.ndarray, proba: np.ndarray, threshold: float, classes: dict | None,
               fill_holes: bool, keep: str, min_area: int) -> bool:
    """Tell whether the normal-scan gate emptied a mask that thresholding had kept."""
    if classes is None or mask.any():
        return False
    raw = proba >= threshold
    if raw.any() and (fill_holes or keep != "all" or min_area > 0):
        from busseg.postprocess import postprocess_mask

        raw = postprocess_mask(raw, fill_holes=fill_holes, keep=keep, min_area=int(min_area))
    return bool(raw.any())


# --------------------------------------------------------------------------- prompts (Qt-free)


def prompt_region(
    old: np.ndarray,
    new: np.ndarray,
    *,
    boxes: Any = (),
    clicks: Any = (),
    box_margin: float = 0.1,
) -> np.ndarray:
    """Pixels a prompt may change: inside its boxes and the lesions its clicks touch.

    A box prompt may change the pixels inside the box grown by ``box_margin`` (the region
    :func:`busseg.inference.predict` restricts its mask to). A click may change the connected
    component (8-connectivity) of ``old | new`` holding the click: the lesion it extends,
    shrinks, creates or removes. Everything else (e.g. brush edits elsewhere) is kept.

    Parameters
    ----------
    old, new : numpy.ndarray
        (H, W) bool: the mask before the prompt (the Labels layer's slice) and the prediction.
    boxes : array-like, optional
        (B, 4) ``(row_min, col_min, row_max, col_max)`` inclusive, in pixels: the boxes drawn,
        moved (old and new position) or deleted.
    clicks : array-like, optional
        (P, 2) ``(row, col)`` in pixels: the clicks added, moved (old and new position) or
        removed. Clicks outside the image are ignored.
    box_margin : float, optional
        Share of a box's side added on every side (>= 0).

    Returns
    -------
    numpy.ndarray
        (H, W) bool.

    Raises
    ------
    ValueError
        If ``old`` and ``new`` differ in shape.
    """
    from scipy import ndimage

    from busseg.prompts import box_mask

    old, new = np.asarray(old) > 0, np.asarray(new) > 0
    if old.shape != new.shape:
        raise ValueError(f"old {old.shape} and new {new.shape} masks differ in shape")
    h, w = old.shape
    b = np.asarray(boxes, np.float64).reshape(-1, 4)
    region = box_mask(b, (h, w), box_margin) if len(b) else np.zeros((h, w), bool)
    pts = np.round(np.asarray(clicks, np.float64).reshape(-1, 2)).astype(int)
    pts = pts[(pts[:, 0] >= 0) & (pts[:, 0] < h) & (pts[:, 1] >= 0) & (pts[:, 1] < w)]
    if len(pts):
        lab, _ = ndimage.label(old | new, structure=np.ones((3, 3), bool))
        ids = np.unique(lab[pts[:, 0], pts[:, 1]])
        ids = ids[ids > 0]
        if len(ids):
            region |= np.isin(lab, ids)
    return region


@dataclass
class PromptRequest:
    """One prompt update of one 2D slice, snapshotted on the GUI thread.

    Attributes
    ----------
    data : array_like
        The image layer's data (numpy, dask, zarr); the slice is read in the worker.
    index : tuple of int
        The slice's position along the leading (stack) axes; ``()`` for a 2D image.
    boxes : numpy.ndarray
        (B, 4) float64, all boxes on the slice, ``(row_min, col_min, row_max, col_max)``.
    points, point_labels : numpy.ndarray
        (P, 2) float64 clicks ``(row, col)`` on the slice (inside a box when boxes exist) and
        (P,) int8 labels (1 lesion, 0 background).
    previous_mask : numpy.ndarray or None
        (H, W) bool, the Labels slice the clicks correct (None without clicks).
    changed_boxes, changed_clicks : numpy.ndarray
        (b, 4) boxes and (p, 2) clicks that changed since the last update (both positions of
        a moved one): they define :func:`prompt_region`.
    checkpoint : path or None
        Checkpoint folder; None for the shipped default model.
    device : str
        ``"auto"``, ``"cuda"``, ``"mps"`` or ``"cpu"``.
    threshold : float
        Probability threshold in (0, 1).
    box_margin : float
        As in :func:`busseg.inference.predict`.
    t0 : float
        ``time.perf_counter()`` of the first prompt event this update answers.
    """

    data: Any
    index: tuple
    boxes: np.ndarray
    points: np.ndarray
    point_labels: np.ndarray
    previous_mask: np.ndarray | None
    changed_boxes: np.ndarray
    changed_clicks: np.ndarray
    checkpoint: str | Path | None = None
    device: str = "auto"
    threshold: float | None = None
    box_margin: float = 0.1
    t0: float = 0.0
    image_name: str = ""
    slice_shape: tuple = ()

    @property
    def settings(self) -> InferenceSettings:
        """The request's inference settings (its threshold).

        A prompted mask is neither gated, filtered nor post-processed, so the other fields
        do not apply; the device is :attr:`device`, where the model is loaded.
        """
        return InferenceSettings(threshold=self.threshold)


@dataclass
class PromptResult:
    """What :func:`prompt_job` returns.

    Attributes
    ----------
    mask : numpy.ndarray
        (H, W) bool, the prompted prediction of the slice (all False when no prompt is left).
    seconds : float
        Time of the prediction (model loading included on the first call).
    """

    mask: np.ndarray
    seconds: float


def prompt_job(req: PromptRequest) -> PromptResult:
    """Predict one slice from its prompts (runs in a worker thread; no Qt).

    With neither boxes nor clicks left on the slice the result is an empty mask, so deleting
    the last prompt clears what it produced (inside :func:`prompt_region`).

    Parameters
    ----------
    req : PromptRequest
        The slice and its prompts.

    Returns
    -------
    PromptResult

    Raises
    ------
    ValueError
        For malformed prompts (the message says which one) or a checkpoint without prompt
        channels (:func:`busseg.inference.accepts_prompts`).
    busseg.models.CheckpointError
        If the checkpoint cannot be loaded.
    WorkerError
        Instead of a ``RuntimeError`` from torch (see :func:`guarded`).
    """
    from busseg.inference import load_model, predict

    t0 = time.perf_counter()
    image = _read_slice(req.data, req.index)
    if not len(req.boxes) and not len(req.points):
        return PromptResult(np.zeros(image.shape[:2], bool), time.perf_counter() - t0)
    try:
        model = load_model(req.checkpoint, device=req.device)
        pred = predict(image, model, req.settings, boxes=req.boxes,
                       points=req.points, point_labels=req.point_labels,
                       previous_mask=req.previous_mask, box_margin=req.box_margin)
    except RuntimeError as exc:
        raise WorkerError(f"{type(exc).__name__}: {exc}") from exc
    return PromptResult(pred.mask, time.perf_counter() - t0)


