"""The "Segment lesions" dock widget: run a U-Net checkpoint on an Image layer.

The widget is thin (DESIGN.md practices 2-4): on Run it snapshots the chosen layer and
settings on the GUI thread, runs :func:`segment_job` (a generator: model loading and one
prediction per 2D slice through :func:`busseg.inference.predict_stack_iter`) in a napari
``thread_worker``, and applies the result in the ``returned`` slot. The output is an editable
Labels layer ``"<image name> prediction"`` (1 = lesion) and, optionally, an Image layer
``"<image name> probability"``.

A prediction layer the user has edited is never overwritten silently: the widget stores a hash
of what it wrote in ``layer.metadata["busseg"]["written_sha1"]``; when the layer's data no longer
match, :attr:`SegmentWidget.ask_overwrite` asks whether to replace it, write a new layer
(``"<image name> prediction [2]"``) or cancel.

torch and :mod:`busseg.inference` are imported when the widget is built or run, never when napari
starts.
"""

from __future__ import annotations

import hashlib
import time
import weakref
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from magicgui.widgets import (
    CheckBox,
    ComboBox,
    Container,
    FileEdit,
    FloatSpinBox,
    Label,
    ProgressBar,
    PushButton,
    SpinBox,
)

from busseg._widgets._common import (
    META_KEY,
    WorkerError,
    busseg_metadata,
    connect_layer_changes,
    find_layer,
    ground_truth_name,
    guarded,
    prediction_name,
    wrap_label,
)

if TYPE_CHECKING:  # pragma: no cover
    import napari

__all__ = [
    "CANCEL",
    "CHECKPOINT_FOLDER",
    "DEFAULT_MODEL",
    "NEW_LAYER",
    "REPLACE",
    "SegmentResult",
    "SegmentWidget",
    "WorkerError",
    "find_segment_widget",
    "guarded",
    "segment_job",
    "slice_crop",
    "stack_slices",
]

#: Model choices of the widget.
DEFAULT_MODEL = "shipped default"
CHECKPOINT_FOLDER = "checkpoint folder"
#: Answers of :attr:`SegmentWidget.ask_overwrite`.
REPLACE, NEW_LAYER, CANCEL = "replace", "new layer", "cancel"
#: Device choices (the widget shows which one ``auto`` resolves to).
DEVICES = ("auto", "cuda", "mps", "cpu")
#: ``layer.metadata["busseg"]["written_by"]`` of the layers this widget writes.
WRITTEN_BY = "segment widget"

# Live SegmentWidget instances, oldest first, so the fine-tune widget can find the one of its
# viewer even when it was created outside a dock (scripts, tests).
_INSTANCES: list[weakref.ref] = []


def find_segment_widget(viewer: Any) -> SegmentWidget | None:
    """Find the "Segment lesions" widget of a viewer.

    Parameters
    ----------
    viewer : napari.viewer.Viewer
        The viewer.

    Returns
    -------
    SegmentWidget or None
        The docked widget of this viewer (``viewer.window.dock_widgets``) if there is one,
        else the most recently created live widget of this viewer, else ``None``.
    """
    try:
        docked = [w for w in viewer.window.dock_widgets.values() if isinstance(w, SegmentWidget)]
    except Exception:  # no Qt window (headless viewer) or an older napari
        docked = []
    if docked:
        return docked[-1]
    _INSTANCES[:] = [r for r in _INSTANCES if r() is not None]
    mine = [w for w in (r() for r in _INSTANCES) if w is not None and w._viewer is viewer]
    return mine[-1] if mine else None


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


def _checkpoint_dir(path: str | Path) -> Path:
    """Map a checkpoint folder, or a file picked inside it, to the folder."""
    p = Path(path).expanduser()
    if p.is_file():
        p = p.parent
    return p


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


def slice_crop(slices: list[dict] | None, i: int) -> tuple[int, int] | None:
    """Return the (H, W) of slice ``i`` without its padding, or None (the whole slice)."""
    if slices is None:
        return None
    shp = slices[i].get("original_shape")
    return (int(shp[0]), int(shp[1])) if shp else None


#: Colour of lesion pixels (label 1) in prediction layers: distinct from the reader's
#: ground-truth layers, which use napari's automatic label colours.
PREDICTION_COLOUR = "#00c8ff"


def _prediction_colours(layer: Any) -> None:
    """Show label 1 of a prediction layer in :data:`PREDICTION_COLOUR` (others: auto colours)."""
    from napari.utils.colormaps import DirectLabelColormap

    try:
        layer.colormap = DirectLabelColormap(
            color_dict={None: "magenta", 0: "transparent", 1: PREDICTION_COLOUR}
        )
    except (TypeError, ValueError, AttributeError):  # pragma: no cover - other napari versions
        pass


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
    device: str = "auto",
    threshold: float | None = None,
    tta: bool | None = None,
    fill_holes: bool = False,
    keep: str = "all",
    min_area: int = 0,
    with_proba: bool = False,
    crops: Sequence[tuple[int, int] | None] | None = None,
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
    device : str
        ``"auto"``, ``"cuda"``, ``"mps"`` or ``"cpu"``.
    threshold : float or None
        Probability threshold in (0, 1); None uses the checkpoint's.
    tta : bool or None
        Left-right flip test-time augmentation; None uses the checkpoint's setting.
    fill_holes, keep, min_area
        Post-processing (see :func:`busseg.postprocess.postprocess_mask`); ``min_area`` in
        pixels.
    with_proba : bool
        Also return the probability map.
    crops : sequence of (int, int) or None, optional
        Per slice (in C order of the leading axes), the (H, W) of the image inside a
        zero-padded slice (stacks of the plugin's folder reader); only that part is segmented
        and the padding stays background. None: whole slices.

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
    """
    from busseg.inference import load_model, model_device, predict_stack_iter

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
    model = load_model(checkpoint, device=device)
    dev = model_device(model)
    cfg = model.busseg_config
    t = float(threshold if threshold is not None else cfg["inference"].get("threshold", 0.5))
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
    results = predict_stack_iter(
        slices, model, threshold=t, tta=tta, fill_holes=fill_holes, keep=keep,
        min_area=int(min_area), batch_size=1 if dev.type == "cpu" else 4,
    )
    for i, mask, p in results:
        labels[indices[i]][crop(i)] = mask
        if proba is not None:
            proba[indices[i]][crop(i)] = p
        yield ("progress", i + 1, n)
    return SegmentResult(labels, proba, str(getattr(model, "busseg_checkpoint_path", where)),
                         dev.type, t, time.perf_counter() - t0)


# --------------------------------------------------------------------------- the widget


@dataclass
class _Run:
    """What a run needs back on the GUI thread."""

    image: Any
    image_name: str
    target: str  # layer name to write
    replace_sha1: str | None  # data hash of the layer to replace (None: add a new layer)
    with_proba: bool
    scale: tuple
    translate: tuple
    settings: dict


class SegmentWidget(Container):
    """Dock widget "Segment lesions": U-Net prediction into an editable Labels layer.

    Parameters
    ----------
    viewer : napari.viewer.Viewer
        The viewer whose Image layers are segmented.

    Attributes
    ----------
    ask_overwrite : callable
        ``(layer_name: str) -> str`` called when the prediction layer was edited since the
        widget wrote it; returns :data:`REPLACE`, :data:`NEW_LAYER` or :data:`CANCEL`. The
        default shows a ``QMessageBox``; tests replace it.
    last_result : SegmentResult or None
        The result of the last finished run.
    last_metrics : dict or None
        ``{"dice", "iou", "ground_truth"}`` of the last run when a ground-truth layer
        (``"<image name> ground truth"``) of the image's shape exists, else None.
    """

    def __init__(self, viewer: napari.viewer.Viewer) -> None:
        super().__init__(labels=True)
        from busseg.devices import available_devices, get_device

        self._viewer = viewer
        self._worker = None
        self._run: _Run | None = None
        self.last_result: SegmentResult | None = None
        self.last_metrics: dict | None = None
        self.ask_overwrite: Callable[[str], str] = self._ask_overwrite_dialog

        self._image = ComboBox(label="image", choices=self._image_choices, nullable=True,
                               tooltip="Image layer to segment (2D grey, RGB/RGBA or a stack)")
        self._source = ComboBox(label="model", choices=[DEFAULT_MODEL, CHECKPOINT_FOLDER],
                                value=DEFAULT_MODEL)
        self._checkpoint = FileEdit(
            label="checkpoint", mode="d", nullable=True, enabled=False,
            tooltip="A checkpoint folder (model.safetensors + config.json) or a file in it",
        )
        self._model_info = Label(value="")
        auto = get_device("auto").type
        present = {d.split(":")[0] for d in available_devices()}
        device_choices = [(f"auto ({auto})", "auto")] + [
            (d if d in present else f"{d} (not available)", d) for d in DEVICES[1:]
        ]
        self._device = ComboBox(label="device", choices=device_choices, value="auto")
        self._threshold = FloatSpinBox(label="threshold", min=0.01, max=0.99, step=0.05,
                                       value=0.5, tooltip="Probability threshold (default: the "
                                       "checkpoint's)")
        self._tta = CheckBox(text="test-time flips (2x slower)", value=False)
        self._fill_holes = CheckBox(text="fill holes", value=False)
        self._keep = ComboBox(label="keep", choices=["all", "largest"], value="all",
                              tooltip="Keep every lesion or only the largest one")
        self._min_area = SpinBox(label="min area (px)", min=0, max=10_000_000, value=0,
                                 tooltip="Remove predicted regions smaller than this (pixels)")
        self._with_proba = CheckBox(text="also add probability map", value=False)
        self._run_btn = PushButton(text="Run")
        self._cancel_btn = PushButton(text="Cancel", enabled=False)
        self._progress = ProgressBar(label="progress", min=0, max=1, value=0)
        self._status = Label(label="status", value="ready")
        self._metrics = Label(label="vs ground truth", value="")
        for lab in (self._model_info, self._status, self._metrics):
            wrap_label(lab)
        self.extend([
            self._image, self._source, self._checkpoint, self._model_info, self._device,
            self._threshold, self._tta, self._fill_holes, self._keep, self._min_area,
            self._with_proba, Container(widgets=[self._run_btn, self._cancel_btn],
                                        layout="horizontal", labels=False),
            self._progress, self._status, self._metrics,
        ])

        self._source.changed.connect(self._on_model_changed)
        self._checkpoint.changed.connect(self._on_model_changed)
        self._run_btn.changed.connect(self._on_run)
        self._cancel_btn.changed.connect(self._on_cancel)
        connect_layer_changes(viewer, self._on_layers_changed)
        viewer.layers.selection.events.active.connect(self._on_active_layer)
        self._on_active_layer()
        self._on_model_changed()
        _INSTANCES.append(weakref.ref(self))

    # ---------------------------------------------------------------- public API

    def use_checkpoint(self, path: str | Path | None) -> None:
        """Switch the widget to a checkpoint (e.g. one the fine-tune widget just wrote).

        Parameters
        ----------
        path : path or None
            A checkpoint folder or a file in it; None for the shipped default model. The
            threshold and test-time-flip settings are reset to the checkpoint's.
        """
        with self._source.changed.blocked(), self._checkpoint.changed.blocked():
            if path is None:
                self._source.value = DEFAULT_MODEL
            else:
                self._checkpoint.value = _checkpoint_dir(path)
                self._source.value = CHECKPOINT_FOLDER
        self._on_model_changed()

    def current_checkpoint(self) -> Path | None:
        """Return the checkpoint folder the widget will use; None for the shipped default."""
        if self._source.value == DEFAULT_MODEL or self._checkpoint.value is None:
            return None
        return _checkpoint_dir(self._checkpoint.value)

    @property
    def running(self) -> bool:
        """Whether a segmentation is running."""
        return self._worker is not None

    # ---------------------------------------------------------------- choices and model

    def _image_choices(self, _widget: Any = None) -> list[tuple[str, Any]]:
        from napari.layers import Image

        return [(lay.name, lay) for lay in self._viewer.layers if isinstance(lay, Image)]

    def _on_layers_changed(self, _event: Any = None) -> None:
        self._image.reset_choices()

    def _on_active_layer(self, _event: Any = None) -> None:
        from napari.layers import Image

        active = self._viewer.layers.selection.active
        if isinstance(active, Image) and not self.running:
            self._image.reset_choices()
            self._image.value = active

    def _on_model_changed(self, _value: Any = None) -> None:
        from busseg.models import CheckpointError, default_checkpoint_path, read_checkpoint_config

        use_folder = self._source.value == CHECKPOINT_FOLDER
        self._checkpoint.enabled = use_folder
        path = self.current_checkpoint() if use_folder else default_checkpoint_path()
        if path is None:
            self._model_info.value = "choose a checkpoint folder"
            return
        try:
            cfg = read_checkpoint_config(path)
        except CheckpointError as exc:
            self._model_info.value = f"⚠ {exc}"
            return
        inf = cfg.get("inference", {})
        self._threshold.value = float(inf.get("threshold", 0.5))
        self._tta.value = bool(inf.get("tta_flips", False))
        size = cfg.get("preprocessing", {}).get("input_size")
        m = cfg.get("model", {})
        parts = [f"U-Net base {m.get('base_channels', '?')} depth {m.get('depth', '?')}"]
        if size:
            parts.append(f"input {size[0]}×{size[1]}")
        metrics = cfg.get("metrics", {})
        test_lesion = (metrics.get("test") or {}).get("lesion") or {}
        if cfg.get("training", {}).get("kind") == "fine-tune":  # written by the Fine-tune widget
            parts.append(f"fine-tuned on {len(cfg.get('lineage', {}).get('pairs', []))} pair(s)")
            dice, what = metrics.get("heldout_dice_after"), "held-out Dice"
        elif isinstance(test_lesion.get("dice"), (int, float)):  # e.g. the shipped default
            dice, what = test_lesion["dice"], "BUSI test Dice (lesions)"
        else:
            dice, what = metrics.get("val_dice"), "validation Dice"
        if isinstance(dice, (int, float)):
            parts.append(f"{what} {dice:.3f}")
        self._model_info.value = ", ".join(parts)

    # ---------------------------------------------------------------- run

    def _settings(self) -> dict:
        return {
            "checkpoint": self.current_checkpoint(),
            "device": self._device.value,
            "threshold": float(self._threshold.value),
            "tta": bool(self._tta.value),
            "fill_holes": bool(self._fill_holes.value),
            "keep": self._keep.value,
            "min_area": int(self._min_area.value),
            "with_proba": bool(self._with_proba.value),
        }

    def _on_run(self, _value: Any = None) -> None:
        from napari.qt.threading import create_worker

        if self.running:
            return
        layer = self._image.value
        if layer is None:
            self._set_status("add or open an Image layer first (File > Open, or the BUSI "
                             "samples), then choose it above")
            return
        settings = self._settings()
        if self._source.value == CHECKPOINT_FOLDER and settings["checkpoint"] is None:
            self._set_status("choose a checkpoint folder, or switch the model to "
                             f"'{DEFAULT_MODEL}'")
            return
        target = self._choose_target(layer.name)
        if target is None:
            self._set_status("cancelled; the edited prediction layer was left as it is")
            return
        data = layer.data[0] if layer.multiscale else layer.data
        self._run = _Run(layer, layer.name, target[0], target[1], settings["with_proba"],
                         tuple(layer.scale), tuple(layer.translate), settings)
        self._metrics.value = ""
        kwargs = {k: v for k, v in settings.items() if k != "checkpoint"}
        slices = stack_slices(layer)
        crops = [slice_crop(slices, i) for i in range(len(slices))] if slices else None
        job = segment_job(data, rgb=bool(layer.rgb), checkpoint=settings["checkpoint"],
                          crops=crops, **kwargs)
        worker = create_worker(guarded, job, _start_thread=False, _ignore_errors=True)
        worker.yielded.connect(self._on_yielded)
        worker.returned.connect(self._on_returned)
        worker.errored.connect(self._on_errored)
        worker.aborted.connect(self._on_aborted)
        worker.finished.connect(self._on_finished)
        self._worker = worker
        self._run_btn.enabled = False
        self._cancel_btn.enabled = True
        self._progress.max = 0  # busy indicator while the model loads
        self._set_status(f"segmenting “{layer.name}” …")
        worker.start()

    def _on_cancel(self, _value: Any = None) -> None:
        if self._worker is not None:
            self._worker.quit()  # the generator stops at its next yield (after a slice)
            self._set_status("cancelling after the current slice …")

    def _on_yielded(self, item: tuple) -> None:
        if item[0] == "status":
            self._set_status(item[1])
        elif item[0] == "progress":
            done, total = item[1], item[2]
            self._progress.max = max(total, 1)
            self._progress.value = done
            if total > 1:
                self._set_status(f"segmenting “{self._run.image_name}”: slice {done}/{total}")

    def _on_returned(self, result: SegmentResult) -> None:
        run = self._run
        self.last_result = result
        layer, note = self._write_prediction(run, result.labels)
        if run.with_proba and result.proba is not None:
            self._write_probability(run, result.proba)
        n = int(np.prod(result.labels.shape[:-2])) if result.labels.ndim > 2 else 1
        frac = 100.0 * np.count_nonzero(result.labels) / max(result.labels.size, 1)
        self._set_status(
            f"wrote “{layer.name}”: {n} slice(s) in {result.elapsed:.1f} s on {result.device}, "
            f"threshold {result.threshold:.2f}, lesion {frac:.1f} % of pixels{note}"
        )
        self._show_metrics(run.image_name, result.labels)

    def _on_errored(self, exc: BaseException) -> None:
        self._set_status(f"error: {exc}")

    def _on_aborted(self) -> None:
        self._set_status("cancelled; nothing was written")

    def _on_finished(self) -> None:
        self._worker = None
        self._run_btn.enabled = True
        self._cancel_btn.enabled = False
        if self._progress.max == 0:
            self._progress.max = 1

    def _set_status(self, text: str) -> None:
        self._status.value = text

    # ---------------------------------------------------------------- output layers

    def _free_name(self, base: str) -> str:
        names = {lay.name for lay in self._viewer.layers}
        k = 2
        while f"{base} [{k}]" in names:
            k += 1
        return f"{base} [{k}]"

    def _choose_target(self, image_name: str) -> tuple[str, str | None] | None:
        """(layer name to write, hash of the layer to replace or None), or None to cancel."""
        from napari.layers import Labels

        name = prediction_name(image_name)
        existing = find_layer(self._viewer, name)
        if existing is None:
            return name, None
        if not isinstance(existing, Labels):
            return self._free_name(name), None
        current = data_sha1(existing.data)
        if busseg_metadata(existing).get("written_sha1") == current:
            return name, current  # unedited output of this widget: replace it
        answer = self.ask_overwrite(name)
        if answer == REPLACE:
            return name, current
        if answer == NEW_LAYER:
            return self._free_name(name), None
        return None

    def _meta(self, run: _Run, data: np.ndarray, kind: str) -> dict:
        s = run.settings
        return {
            "written_by": WRITTEN_BY,
            "kind": kind,
            "image": run.image_name,
            "checkpoint": str(s["checkpoint"]) if s["checkpoint"] else DEFAULT_MODEL,
            "threshold": s["threshold"],
            "written_sha1": data_sha1(data),
        }

    def _write_prediction(self, run: _Run, labels: np.ndarray) -> tuple[Any, str]:
        from napari.layers import Labels

        note = ""
        existing = find_layer(self._viewer, run.target)
        if existing is not None and run.replace_sha1 is not None:
            if isinstance(existing, Labels) and data_sha1(existing.data) == run.replace_sha1:
                existing.data = labels
                existing.scale, existing.translate = run.scale, run.translate
                existing.metadata = {**existing.metadata,
                                     META_KEY: self._meta(run, labels, "prediction")}
                return existing, note
            note = f" (“{run.target}” was edited during the run, so it was kept)"
        name = run.target if find_layer(self._viewer, run.target) is None else self._free_name(
            prediction_name(run.image_name))
        layer = self._viewer.add_labels(
            labels, name=name, scale=run.scale, translate=run.translate,
            metadata={META_KEY: self._meta(run, labels, "prediction")},
        )
        _prediction_colours(layer)
        return layer, note

    def _write_probability(self, run: _Run, proba: np.ndarray) -> Any:
        from napari.layers import Image

        name = f"{run.image_name} probability"
        existing = find_layer(self._viewer, name)
        ours = busseg_metadata(existing).get("written_by") == WRITTEN_BY
        if isinstance(existing, Image) and ours:
            existing.data = proba
            existing.metadata = {**existing.metadata,
                                 META_KEY: self._meta(run, proba, "probability")}
            return existing
        if existing is not None:
            name = self._free_name(name)
        layer = self._viewer.add_image(
            proba, name=name, colormap="magma", opacity=0.5, contrast_limits=(0.0, 1.0),
            scale=run.scale, translate=run.translate,
            metadata={META_KEY: self._meta(run, proba, "probability")},
        )
        # keep the prediction on top, so it stays the layer the user paints on
        pred = find_layer(self._viewer, run.target, "labels")
        if pred is not None:
            src, dst = self._viewer.layers.index(layer), self._viewer.layers.index(pred)
            if src > dst:
                self._viewer.layers.move(src, dst)
            self._viewer.layers.selection.active = pred
        return layer

    def _show_metrics(self, image_name: str, labels: np.ndarray) -> None:
        from busseg.metrics import dice_score, iou_score

        self.last_metrics = None
        gt = find_layer(self._viewer, ground_truth_name(image_name), "labels")
        if gt is None:
            self._metrics.value = ""
            return
        truth = np.asarray(gt.data[0] if gt.multiscale else gt.data)
        if truth.shape != labels.shape:
            self._metrics.value = (f"“{gt.name}” has shape {truth.shape}, the prediction "
                                   f"{labels.shape}; no Dice")
            return
        if labels.ndim == 2:
            d, i = dice_score(labels, truth), iou_score(labels, truth)
            self._metrics.value = f"Dice {d:.3f}, IoU {i:.3f} (vs “{gt.name}”)"
        else:
            idx = list(np.ndindex(*labels.shape[:-2]))
            d = float(np.mean([dice_score(labels[k], truth[k]) for k in idx]))
            i = float(np.mean([iou_score(labels[k], truth[k]) for k in idx]))
            self._metrics.value = (f"mean over {len(idx)} slices: Dice {d:.3f}, IoU {i:.3f} "
                                   f"(vs “{gt.name}”)")
        self.last_metrics = {"dice": d, "iou": i, "ground_truth": gt.name}

    def _ask_overwrite_dialog(self, layer_name: str) -> str:
        from qtpy.QtWidgets import QMessageBox

        box = QMessageBox(self.native)
        box.setIcon(QMessageBox.Icon.Question)
        box.setWindowTitle("Edited prediction")
        box.setText(f"“{layer_name}” was edited since this widget wrote it.")
        box.setInformativeText(
            "Replace it with the new prediction (your edits are lost), write the new "
            "prediction to a new layer, or cancel?"
        )
        replace = box.addButton("Replace", QMessageBox.ButtonRole.DestructiveRole)
        new = box.addButton("New layer", QMessageBox.ButtonRole.AcceptRole)
        box.addButton(QMessageBox.StandardButton.Cancel)
        box.setDefaultButton(new)
        box.exec()
        clicked = box.clickedButton()
        if clicked is replace:
            return REPLACE
        if clicked is new:
            return NEW_LAYER
        return CANCEL
