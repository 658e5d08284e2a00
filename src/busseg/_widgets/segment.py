"""The "Segment lesions" dock widget: run a U-Net checkpoint on an Image layer.

The widget is thin (DESIGN.md practices 2-4): on Run it snapshots the chosen layer and
settings on the GUI thread, runs :func:`busseg.jobs.segment_job` (Qt-free, like
:func:`~busseg.jobs.prompt_job` and :func:`~busseg.jobs.prompt_region`, which this module
re-exports; a generator: model loading and one
prediction per 2D slice through :func:`busseg.inference.predict_stack_iter`) in a napari
``thread_worker``, and applies the result in the ``returned`` slot. The output is an editable
Labels layer ``"<image name> prediction"`` (1 = lesion) and, optionally, an Image layer
``"<image name> probability"``.

A prediction layer the user has edited is never overwritten silently: the widget stores a hash
of what it wrote in ``layer.metadata["busseg"]["written_sha1"]``; when the layer's data no longer
match, :attr:`SegmentWidget.ask_overwrite` asks whether to replace it, write a new layer
(``"<image name> prediction [2]"``) or cancel.

Prompts (models that take guidance channels, :func:`busseg.inference.accepts_prompts`): when the
widget has an image it adds, if absent, a Shapes layer ``"<image> boxes"`` (rectangle mode) and a
Points layer ``"<image> clicks"`` (feature ``label``: 1 lesion, green; 0 background, red). Each
drawn, moved or deleted box and each added, moved or removed click re-predicts the current 2D
slice in a worker (one at a time; events that arrive meanwhile are coalesced into one more run)
and writes the result into ``"<image> prediction"`` with ``Labels.data_setitem``, one undoable
step. Only the pixels the prompt affects change (:func:`prompt_region`): inside the changed
boxes (grown by the box margin) and inside the connected lesions (old or new mask) that hold a
changed click; brush edits elsewhere survive.

Actions for keyboard shortcuts (the browser binds them on the viewer): :meth:`SegmentWidget.segment`
(as Run), :meth:`~SegmentWidget.set_prompt_mode` (``"box"``, ``"click"``, ``"off"``),
:meth:`~SegmentWidget.toggle_click_label` and :meth:`~SegmentWidget.clear_mask` (empty the shown
slice of the prediction, one undoable edit). The Dice row follows every prompt and clear.

The rows sit in a vertical scroll area, so a short dock (other docks beside it, a 900-pixel
screen) scrolls instead of squashing wrapped lines; long rows wrap and show their full text as a
tooltip.

torch and :mod:`busseg.inference` are imported when the widget is built or run, never when napari
starts.
"""

from __future__ import annotations

import hashlib
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
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
    RadioButtons,
    SpinBox,
)

from busseg._widgets._common import (
    GROUND_TRUTH_SUFFIX,
    META_KEY,
    PREDICTION_SUFFIX,
    busseg_metadata,
    connect_layer_changes,
    find_layer,
    ground_truth_name,
    is_spare,
    prediction_name,
    scroll_rows,
    wrap_label,
)

# The Qt-free jobs live in busseg.jobs; these names stay importable from here.
from busseg.jobs import (  # noqa: F401
    PromptRequest,
    PromptResult,
    SegmentResult,
    WorkerError,
    _read_slice,
    _was_gated,
    guarded,
    prompt_job,
    prompt_region,
    segment_job,
    slice_crop,
)

if TYPE_CHECKING:  # pragma: no cover
    import napari

__all__ = [
    "BOXES_SUFFIX",
    "CANCEL",
    "CLICKS_SUFFIX",
    "CHECKPOINT_FOLDER",
    "DEFAULT_MODEL",
    "NEW_LAYER",
    "PromptRequest",
    "PromptResult",
    "REPLACE",
    "SegmentResult",
    "SegmentWidget",
    "WorkerError",
    "find_segment_widget",
    "guarded",
    "prompt_job",
    "prompt_region",
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
#: Suffixes of the prompt layers: ``"<image> boxes"`` (Shapes) and ``"<image> clicks"`` (Points).
BOXES_SUFFIX, CLICKS_SUFFIX = " boxes", " clicks"
#: Face colours of lesion (label 1) and background (label 0) clicks.
CLICK_COLOURS = {1: "lime", 0: "red"}
#: Choices of the widget's "click label" toggle.
LESION_CLICK, BACKGROUND_CLICK = "lesion (+)", "background (−)"
#: Modes of :meth:`SegmentWidget.set_prompt_mode`.
PROMPT_MODES = ("box", "click", "off")
#: Keyboard modifiers that make a new click a background click whatever the toggle says.
NEGATIVE_MODIFIERS = frozenset({"Shift", "Control"})
#: The lesion probabilities are research output: shown with this note wherever they appear.
CLASS_NOTE = "research output, not a diagnosis"

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


def prompt_size(image: Any) -> float:
    """Size (data pixels) of click markers, and four times the box edge width, for ``image``."""
    shape = _spatial_shape(image)
    return max(4.0, round(max(shape[-2:]) / 60))


def _unwrapped(viewer: Any) -> Any:
    """Return the viewer behind napari's ``PublicOnlyProxy`` (plugins get the proxy)."""
    return getattr(viewer, "__wrapped__", viewer)


def _widgets_of(viewer: Any) -> list:
    """Return the live Segment lesions widgets of ``viewer``."""
    _INSTANCES[:] = [r for r in _INSTANCES if r() is not None]
    target = _unwrapped(viewer)
    return [w for w in (r() for r in _INSTANCES)
            if w is not None and _unwrapped(w._viewer) is target]


@contextmanager
def layers_swapping(viewer: Any) -> Iterator[None]:
    """Hold the Segment lesions widgets of ``viewer`` still while layers are renamed and swapped.

    Inside the block the widgets ignore layer-list and active-layer changes (a renamed image
    layer would otherwise make a widget add prompt layers for a name about to change); on
    leaving it they refresh their image choice once.

    Parameters
    ----------
    viewer : napari.viewer.Viewer
        The viewer whose widgets are held.
    """
    widgets = _widgets_of(viewer)
    for w in widgets:
        w._swapping += 1
    try:
        yield
    finally:
        for w in widgets:
            w._swapping -= 1
            if not w._swapping:
                try:
                    w._on_layers_changed()
                except RuntimeError:  # the widget's Qt side is gone
                    pass


def reuse_prompt_layers(viewer: Any, boxes: Any, clicks: Any, image: Any) -> None:
    """Empty a case's ``boxes`` and ``clicks`` layers and give them to another image layer.

    The Scan browser keeps one pair of prompt layers for all cases (napari adds a layer far
    more slowly than it swaps its data): on Next they are emptied, renamed
    ``"<image> boxes"`` / ``"<image> clicks"``, their metadata points at ``image`` and their
    marker sizes follow its shape. Emptying them runs no prompt (their data events are
    blocked meanwhile), and every Segment lesions widget of the viewer forgets the prompts of
    the old and the new image.

    Parameters
    ----------
    viewer : napari.viewer.Viewer
        The viewer holding the layers.
    boxes : napari.layers.Shapes or None
        The boxes layer to reuse.
    clicks : napari.layers.Points or None
        The clicks layer to reuse.
    image : napari.layers.Image
        The image layer they now belong to (its name and transform are already the new
        case's).
    """
    old_names = {_image_name_of(lay) for lay in (boxes, clicks) if lay is not None}
    size = prompt_size(image)
    for layer, suffix in ((boxes, BOXES_SUFFIX), (clicks, CLICKS_SUFFIX)):
        if layer is None:
            continue
        with layer.events.data.blocker():
            if len(layer.data):
                layer.selected_data = set()
                if layer is clicks:
                    layer.data = np.zeros((0, layer.ndim))
                    layer.features = {"label": np.zeros(0, np.int8)}
                    layer.face_color = CLICK_COLOURS[1]
                else:
                    layer.data = []
        meta = dict(busseg_metadata(layer))
        meta["image"] = image.name
        layer.metadata = {**layer.metadata, META_KEY: meta}
        layer.name = f"{image.name}{suffix}"
        if not layer.visible:
            layer.visible = True
        if layer.opacity == 0:  # the Scan browser's transparent spare
            layer.opacity = 1.0
        if not np.array_equal(layer.scale, image.scale):
            layer.scale = image.scale
        if not np.array_equal(layer.translate, image.translate):
            layer.translate = image.translate
        if layer is clicks:
            layer.current_size = size
        else:
            layer.current_edge_width = max(1.0, size / 4)
    for widget in _widgets_of(viewer):
        widget.forget_image(image.name, *(n for n in old_names if n))
        # layers it did not make itself (the browser's spares): listen to them now
        widget._ensure_prompt_layers(image, activate=False)


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


def _image_name_of(layer: Any) -> str | None:
    """Return the image layer name a prediction / ground-truth / prompt layer belongs to."""
    if layer is None:
        return None
    meta = busseg_metadata(layer)
    if isinstance(meta.get("image"), str) and meta.get("written_by") == WRITTEN_BY:
        return meta["image"]
    for suffix in (PREDICTION_SUFFIX, GROUND_TRUTH_SUFFIX, BOXES_SUFFIX, CLICKS_SUFFIX):
        if layer.name.endswith(suffix) and len(layer.name) > len(suffix):
            return layer.name[: -len(suffix)]
    return None


class _TextRow(Label):
    """A text row whose tooltip is its full text (set a custom tooltip after the value)."""

    @property
    def value(self) -> str:
        """The text."""
        return Label.value.fget(self)

    @value.setter
    def value(self, text: str) -> None:
        Label.value.fset(self, text)
        self.native.setToolTip(str(text or ""))


def _scroll_rows(container: Any) -> None:
    """Put a container's first child (the form of rows) into a vertical scroll area."""
    form = container[0].native
    form.layout().addStretch(1)  # rows at the top when the dock is taller than they are
    scroll_rows(container, min_height=120, object_name="busseg_segment_scroll")
    form.setMinimumWidth(300)


def _fit_label_column(form: Any) -> None:
    """Widen a labelled form's label column to its widest label in the font it is shown in.

    magicgui measures label widths in the application's default font; napari's stylesheet
    (applied when the widget is docked) may be larger, which clipped e.g. "checkpoint".
    """
    labels = []
    for w in form:
        lw = w._labeled_widget() if hasattr(w, "_labeled_widget") else None
        if lw is not None:
            labels.append(lw._label_widget.native)
    if labels:
        width = max(lab.fontMetrics().horizontalAdvance(lab.text()) for lab in labels) + 6
        for lab in labels:
            lab.setMinimumWidth(width)


def _fit_on_show(form: Any) -> None:
    """Run :func:`_fit_label_column` whenever the form is shown or restyled."""
    from qtpy.QtCore import QEvent, QObject

    class _Filter(QObject):
        def eventFilter(self, obj: Any, event: Any) -> bool:  # noqa: N802 (Qt's name)
            if event.type() in (QEvent.Type.Show, QEvent.Type.StyleChange,
                                QEvent.Type.FontChange):
                _fit_label_column(form)
            return False

    native = form.native
    native._busseg_label_filter = _Filter(native)  # kept alive by the widget
    native.installEventFilter(native._busseg_label_filter)


def format_classes(classes: dict) -> str:
    """One line of class probabilities, e.g. ``"benign 0.81 · malignant 0.14 · normal 0.05"``.

    Parameters
    ----------
    classes : dict
        Class name -> probability in [0, 1].

    Returns
    -------
    str
        Classes sorted by decreasing probability, with :data:`CLASS_NOTE` appended.
    """
    items = sorted(classes.items(), key=lambda kv: -kv[1])
    return " · ".join(f"{k} {v:.2f}" for k, v in items) + f" ({CLASS_NOTE})"



def _spatial_shape(layer: Any) -> tuple[int, ...]:
    """Shape of a layer's data without colour channels (leading axes + (H, W))."""
    data = layer.data[0] if getattr(layer, "multiscale", False) else layer.data
    shape = tuple(int(v) for v in np.shape(data))
    return shape[:-1] if getattr(layer, "rgb", False) else shape


def _shape_boxes(shapes: Any, lead: tuple[int, ...]) -> tuple[np.ndarray, list[int]]:
    """Bounding boxes (B, 4) of the shapes on slice ``lead`` and their indices."""
    boxes, idx = [], []
    k = len(lead)
    for i, verts in enumerate(shapes.data):
        v = np.asarray(verts, np.float64)
        if v.ndim != 2 or v.shape[1] < 2 or not len(v):
            continue
        if k and tuple(np.round(v[0, :k]).astype(int)) != lead:
            continue
        box = []
        for axis in (-2, -1):  # napari pixel centres are integers: keep those inside
            lo, hi = np.ceil(v[:, axis].min() - 1e-6), np.floor(v[:, axis].max() + 1e-6)
            if hi < lo:  # thinner than a pixel: the nearest pixel
                lo = hi = np.round(v[:, axis].mean())
            box.append((lo, hi))
        boxes.append((box[0][0], box[1][0], box[0][1], box[1][1]))
        idx.append(i)
    return np.asarray(boxes, np.float64).reshape(-1, 4), idx


def _clip_boxes(boxes: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Clip boxes that overlap the image to it; boxes wholly outside are kept (and refused)."""
    out = boxes.copy()
    h, w = shape
    for b in out:
        if b[2] >= 0 and b[0] <= h - 1 and b[3] >= 0 and b[1] <= w - 1:
            b[[0, 2]] = np.clip(b[[0, 2]], 0, h - 1)
            b[[1, 3]] = np.clip(b[[1, 3]], 0, w - 1)
    return out


def _slice_clicks(points: Any, lead: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Clicks ``(row, col)`` on slice ``lead`` and their labels (1 lesion, 0 background)."""
    data = np.asarray(points.data, np.float64).reshape(-1, points.ndim)
    labels = _click_labels(points)
    k = len(lead)
    if k and len(data):
        keep = np.all(np.round(data[:, :k]).astype(int) == np.asarray(lead), axis=1)
        data, labels = data[keep], labels[keep]
    return data[:, -2:], labels


def _click_labels(points: Any) -> np.ndarray:
    """Return the ``label`` feature of a clicks layer as int8 (missing or unreadable: 1)."""
    n = len(points.data)
    feats = getattr(points, "features", None)
    if feats is None or "label" not in feats or len(feats) != n:
        return np.ones(n, np.int8)
    try:
        return np.array(feats["label"], dtype=np.int8)  # a writable copy
    except (TypeError, ValueError):
        return np.ones(n, np.int8)


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
        super().__init__(labels=False)
        from busseg.devices import available_devices, get_device

        self._viewer = viewer
        self._swapping = 0  # > 0 while the Scan browser swaps a case's layers
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
        self._model_info = _TextRow(value="")
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
        self._region_filter = CheckBox(
            text="remove likely false regions", value=True,
            tooltip="Apply the checkpoint's region filter: regions of the automatic mask that "
                    "its classifier finds unlikely to be lesions are removed (never applied "
                    "to box or click prompts)")
        self._keep = ComboBox(label="keep", choices=["all", "largest"], value="all",
                              tooltip="Keep every lesion or only the largest one")
        self._min_area = SpinBox(label="min area", min=0, max=10_000_000, value=0,
                                 tooltip="Remove predicted regions smaller than this many pixels")
        self._with_proba = CheckBox(text="also add probability map", value=False)
        self._run_btn = PushButton(text="Run")
        self._cancel_btn = PushButton(text="Cancel", enabled=False)
        self._progress = ProgressBar(label="progress", min=0, max=1, value=0)
        self._status = _TextRow(label="status", value="ready")
        self._metrics = _TextRow(label="vs truth", value="")
        self._classes = _TextRow(label="class", value="")
        self._click_label = RadioButtons(
            label="click label", choices=[LESION_CLICK, BACKGROUND_CLICK], value=LESION_CLICK,
            orientation="horizontal",
            tooltip="Label of new clicks in the “<image> clicks” layer; hold Shift or Ctrl "
                    "while clicking to place a background click",
        )
        self._prompt_info = _TextRow(value="")
        for lab in (self._model_info, self._status, self._metrics, self._classes,
                    self._prompt_info):
            wrap_label(lab)  # in the scroll area below, wrapped lines keep their height
        # the rows live in a form inside a vertical scroll area: when the dock is short (other
        # docks above or below it, a 900-pixel-high screen) it scrolls instead of squashing
        # the rows, and wrapped lines keep their full height
        self._form = Container(labels=True)
        self._form.extend([  # after construction, so the label column gets one width
            self._image, self._source, self._checkpoint, self._model_info, self._click_label,
            self._prompt_info, self._device,
            self._threshold, self._tta, self._fill_holes, self._region_filter, self._keep,
            self._min_area,
            self._with_proba, Container(widgets=[self._run_btn, self._cancel_btn],
                                        layout="horizontal", labels=False),
            self._progress, self._status, self._metrics, self._classes,
        ])
        self.append(self._form)
        _scroll_rows(self)
        _fit_on_show(self._form)

        # prompts: one worker at a time; events meanwhile are coalesced (latest wins)
        from qtpy.QtCore import QTimer

        self._takes_prompts = False
        self._prompt_worker = None
        self._prompt_queue: dict[str, float] = {}  # image name -> time of its first event
        self._applied: dict[tuple, tuple[set, set]] = {}  # (image, slice) -> prompts done
        self._negative_modifier = False
        self._prompt_note = ""
        self._connected: set[int] = set()
        #: Seconds from the last prompt event to the updated Labels layer.
        self.last_prompt_latency: float | None = None
        self._prompt_timer = QTimer()
        self._prompt_timer.setSingleShot(True)
        self._prompt_timer.setInterval(15)  # ms: one update for a burst of events
        self._prompt_timer.timeout.connect(self._on_prompt_timer)

        self._source.changed.connect(self._on_model_changed)
        self._checkpoint.changed.connect(self._on_model_changed)
        self._run_btn.changed.connect(self._on_run)
        self._cancel_btn.changed.connect(self._on_cancel)
        self._image.changed.connect(self._on_image_changed)
        connect_layer_changes(viewer, self._on_layers_changed)
        viewer.layers.selection.events.active.connect(self._on_active_layer)
        self._on_model_changed()
        self._on_active_layer()
        self._on_layers_changed()
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

    # ---------------------------------------------------------------- actions (keyboard)

    def current_image(self) -> Any:
        """Return the Image layer the widget works on (the chosen one, else the best guess).

        Returns
        -------
        napari.layers.Image or None
            The layer chosen in the widget; else the active image, the image of the active
            derived layer, or the top Image layer; None when the viewer has no Image layer.
        """
        layer = self._image.value
        if layer is not None and layer in self._viewer.layers:
            return layer
        return self._pick_image()

    def segment(self) -> bool:
        """Segment the current image, as the **Run** button does (shortcut action).

        Returns
        -------
        bool
            True when a run started (it finishes in a worker thread; see :attr:`running`);
            False when it did not (no image, no checkpoint, already running, or cancelled),
            with the reason in the status line.
        """
        if self.running:
            self._set_status("a segmentation is already running")
            return False
        image = self.current_image()
        if image is not None and self._image.value is not image:
            self._image.value = image
        self._on_run()
        return self.running

    def set_prompt_mode(self, mode: str) -> Any:
        """Select the prompt layer of the current image and put it in its add mode.

        Parameters
        ----------
        mode : {"box", "click", "off"}
            ``"box"``: the ``"<image> boxes"`` Shapes layer in rectangle mode; ``"click"``: the
            ``"<image> clicks"`` Points layer in add mode (both added if absent); ``"off"``:
            both prompt layers back to pan/zoom and the prediction layer (else the image)
            selected, ready for the brush.

        Returns
        -------
        napari.layers.Layer or None
            The layer now selected; None when there is no image.

        Raises
        ------
        ValueError
            For another ``mode``.
        """
        if mode not in PROMPT_MODES:
            raise ValueError(f"mode must be one of {', '.join(PROMPT_MODES)}, not {mode!r}")
        image = self.current_image()
        if image is None:
            self._set_status("add or open an Image layer first")
            return None
        if mode != "off":
            self._ensure_prompt_layers(image, activate=False)
        boxes, clicks = self.prompt_layers(image)
        if mode == "box":
            layer, layer_mode = boxes, "add_rectangle"
        elif mode == "click":
            layer, layer_mode = clicks, "add"
        else:
            for lay in (boxes, clicks):
                if lay is not None:
                    lay.mode = "pan_zoom"
            layer = find_layer(self._viewer, prediction_name(image.name), "labels") or image
            layer_mode = None
        if layer is None:  # a layer of that name that is not Shapes / Points
            self._set_status(f"“{image.name}{BOXES_SUFFIX if mode == 'box' else CLICKS_SUFFIX}"
                             "” is not a prompt layer; rename it")
            return None
        self._viewer.layers.selection.active = layer
        if layer_mode is not None:
            layer.mode = layer_mode
            if not self._takes_prompts:
                self._set_status("the chosen checkpoint takes no box or click prompts; "
                                 "choose a prompt model")
        return layer

    def toggle_click_label(self) -> int:
        """Switch the label of new clicks between lesion (1) and background (0).

        Returns
        -------
        int
            The label new clicks now get: 1 lesion, 0 background.
        """
        lesion = self._click_label.value != LESION_CLICK
        self._click_label.value = LESION_CLICK if lesion else BACKGROUND_CLICK
        self._set_status(f"new clicks: {self._click_label.value}")
        return int(lesion)

    def clear_mask(self) -> Any:
        """Empty the current image's prediction on the shown slice: one undoable edit.

        An image without a prediction layer gets an empty one (a "no lesion" answer to
        save). The Dice row follows.

        Returns
        -------
        napari.layers.Labels or None
            The prediction layer; None when there is no image (or the layer of that name is
            not a Labels layer of the image's shape), with the reason in the status line.
        """
        image = self.current_image()
        if image is None:
            self._set_status("add or open an Image layer first")
            return None
        name = prediction_name(image.name)
        layer = find_layer(self._viewer, name)
        created = layer is None
        if created:
            layer = self._empty_prediction(image.name)
        from napari.layers import Labels

        if not isinstance(layer, Labels) or _spatial_shape(layer) != _spatial_shape(image):
            self._set_status(f"⚠ “{name}” is not a Labels layer of the image's shape; "
                             "nothing was cleared")
            return None
        index = self._current_index(image)
        rr, cc = np.nonzero(np.asarray(layer.data[index]))
        if len(rr):
            idx = tuple(np.full(len(rr), i, np.intp) for i in index) + (rr, cc)
            layer.data_setitem(idx, np.zeros(len(rr), layer.data.dtype))
        if created:
            meta = dict(busseg_metadata(layer))
            meta["written_sha1"] = None  # the user's answer, not a model's output
            layer.metadata = {**layer.metadata, META_KEY: meta}
        where = f" (slice {', '.join(map(str, index))})" if index else ""
        self._set_status(f"cleared {len(rr)} pixel(s) of “{layer.name}”{where}"
                         + ("; Ctrl+Z undoes" if len(rr) else ""))
        self._metrics_after_edit(image.name, layer, index)
        return layer

    # ---------------------------------------------------------------- choices and model

    def _image_choices(self, _widget: Any = None) -> list[tuple[str, Any]]:
        from napari.layers import Image

        return [(lay.name, lay) for lay in self._viewer.layers
                if isinstance(lay, Image) and not is_spare(lay)]

    def _on_layers_changed(self, _event: Any = None) -> None:
        if self._swapping:
            return
        self._image.reset_choices()
        if self._image.value is None and not self.running:
            # e.g. the reader added an image and its ground truth, and the latter is active
            pick = self._pick_image()
            if pick is not None:
                self._image.value = pick

    def _on_active_layer(self, _event: Any = None) -> None:
        from napari.layers import Image

        if self._swapping:
            return
        if self.running:
            return
        active = self._viewer.layers.selection.active
        if not isinstance(active, Image):
            active = find_layer(self._viewer, _image_name_of(active) or "", "image")
        if active is not None and is_spare(active):
            return
        if active is not None:
            self._image.reset_choices()
            self._image.value = active

    def _pick_image(self) -> Any:
        """Return the active Image layer, else the image of the active layer, else the top one.

        The image of a layer is found from its name (``"<image> ground truth"``, ``...
        prediction``, ``... boxes``, ``... clicks``); None when there is no Image layer.
        """
        from napari.layers import Image

        active = self._viewer.layers.selection.active
        if isinstance(active, Image) and not is_spare(active):
            return active
        owner = find_layer(self._viewer, _image_name_of(active) or "", "image")
        if owner is not None and not is_spare(owner):
            return owner
        images = [lay for lay in self._viewer.layers
                  if isinstance(lay, Image) and not is_spare(lay)]
        return images[-1] if images else None

    def _on_image_changed(self, value: Any = None) -> None:
        if self._swapping:
            return
        if value is not None:
            self._ensure_prompt_layers(value)

    def _on_model_changed(self, _value: Any = None) -> None:
        from busseg.models import CheckpointError, default_checkpoint_path, read_checkpoint_config

        use_folder = self._source.value == CHECKPOINT_FOLDER
        self._checkpoint.enabled = use_folder
        path = self.current_checkpoint() if use_folder else default_checkpoint_path()
        self._takes_prompts = False
        self._show_prompt_info()
        if path is None:
            self._model_info.value = "choose a checkpoint folder"
            return
        try:
            cfg = read_checkpoint_config(path)
        except CheckpointError as exc:
            self._model_info.value = f"⚠ {exc}"
            return
        self._takes_prompts = int(cfg.get("model", {}).get("in_channels", 1) or 1) > 1
        self._show_prompt_info()
        inf = cfg.get("inference", {})
        self._threshold.value = float(inf.get("threshold", 0.5))
        self._tta.value = bool(inf.get("tta_flips", False))
        size = cfg.get("preprocessing", {}).get("input_size")
        m = cfg.get("model", {})
        if m.get("encoder") not in (None, "plain"):
            parts = [f"U-Net ({m['encoder']})"]
        else:
            parts = [f"U-Net {m.get('base_channels', '?')}×{m.get('depth', '?')}"]
        if size:
            parts.append(f"input {size[0]}×{size[1]}")
        metrics = cfg.get("metrics", {})
        test_lesion = (metrics.get("test") or {}).get("lesion") or {}
        if cfg.get("training", {}).get("kind") == "fine-tune":  # written by the Fine-tune widget
            parts.append(f"fine-tuned on {len(cfg.get('lineage', {}).get('pairs', []))} pair(s)")
            dice, what = metrics.get("heldout_dice_after"), "held-out Dice"
        elif isinstance(test_lesion.get("dice"), (int, float)):  # e.g. the shipped default
            dice, what = test_lesion["dice"], "BUSI test Dice"
        else:
            dice, what = metrics.get("val_dice"), "validation Dice"
        if isinstance(dice, (int, float)):
            parts.append(f"{what} {dice:.3f}")
        self._model_info.value = ", ".join(parts)
        tip = [f"{path}", f"architecture: {m.get('arch', 'unet')}, encoder "
               f"{m.get('encoder') or 'plain'}, base {m.get('base_channels', '?')}, depth "
               f"{m.get('depth', '?')}, input channels {m.get('in_channels', 1)}"]
        if what == "BUSI test Dice":
            tip.append("BUSI test Dice: mean over the test images with a lesion")
        self._model_info.native.setToolTip("\n".join(tip))

    # ---------------------------------------------------------------- run

    def settings(self) -> dict:
        """Return a snapshot of the widget's segmentation settings (read on the GUI thread).

        Returns
        -------
        dict
            ``checkpoint`` (Path or None: the shipped default), ``device`` (str),
            ``threshold`` (float in (0, 1)), ``tta``, ``fill_holes``, ``region_filter``,
            ``with_proba`` (bool), ``keep`` (str) and ``min_area`` (int, pixels): what Run
            passes to :func:`busseg.jobs.segment_job`; the Scan browser predicts with them.
        """
        return {
            "checkpoint": self.current_checkpoint(),
            "device": self._device.value,
            "threshold": float(self._threshold.value),
            "tta": bool(self._tta.value),
            "fill_holes": bool(self._fill_holes.value),
            "region_filter": bool(self._region_filter.value),
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
        settings = self.settings()
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
        gated = int(sum(result.extra.get("gated", [])))
        if gated:
            note += ("; the normal-scan gate emptied the mask (the class head says normal and "
                     "no pixel is confident)" if n == 1 else
                     f"; the normal-scan gate emptied {gated} of {n} slice masks")
        removed = int(sum(result.extra.get("regions_removed", [])))
        if removed:
            note += (f"; the region filter removed {removed} likely false region"
                     f"{'s' if removed > 1 else ''}")
        self._set_status(
            f"wrote “{layer.name}”: {n} slice(s) in {result.elapsed:.1f} s on {result.device}, "
            f"threshold {result.threshold:.2f}, lesion {frac:.1f} % of pixels{note}"
        )
        self._show_metrics(run.image_name, result.labels)
        self._show_classes(layer, result)

    def _show_classes(self, layer: Any, result: SegmentResult) -> None:
        """Class probabilities into the widget and the prediction layer's metadata."""
        classes = result.extra.get("class_proba")
        gated = result.extra.get("gated", [])
        meta = dict(busseg_metadata(layer))
        if not classes:
            self._classes.value = ""
            meta.pop("class_proba", None)
        elif len(classes) == 1:
            self._classes.value = format_classes(classes[0])
            meta["class_proba"] = classes[0]
        else:
            self._classes.value = (f"per slice in the metadata of “{layer.name}” "
                                   f"({CLASS_NOTE})")
            meta["class_proba"] = classes
        meta["gated"] = (bool(gated[0]) if len(gated) == 1 else [bool(g) for g in gated])
        meta["class_note"] = CLASS_NOTE
        layer.metadata = {**layer.metadata, META_KEY: meta}

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

    # ---------------------------------------------------------------- prompts

    def _show_prompt_info(self) -> None:
        if self._takes_prompts:
            self._prompt_info.value = (
                "prompts: box or click a lesion (Shift-click: background); Ctrl+Z undoes")
            self._prompt_info.native.setToolTip(
                "Draw boxes in the “<image> boxes” layer and click in the “<image> clicks” "
                "layer (Shift- or Ctrl-click, or the click label below: background). The mask "
                "of the shown slice updates at once, inside the box or the lesion a click "
                "touches; Ctrl+Z undoes.")
        else:
            self._prompt_info.value = (
                "this checkpoint takes no box or click prompts: press Run")
            self._prompt_info.native.setToolTip(
                "The checkpoint was trained without guidance channels (automatic "
                "segmentation only); choose a prompt model for boxes and clicks.")

    def prompt_layers(self, image: Any) -> tuple[Any, Any]:
        """Return the ``"<image> boxes"`` Shapes and ``"<image> clicks"`` Points layers.

        Parameters
        ----------
        image : napari.layers.Image
            The image layer.

        Returns
        -------
        tuple
            (Shapes layer or None, Points layer or None).
        """
        from napari.layers import Points, Shapes

        boxes = find_layer(self._viewer, f"{image.name}{BOXES_SUFFIX}")
        clicks = find_layer(self._viewer, f"{image.name}{CLICKS_SUFFIX}")
        return (boxes if isinstance(boxes, Shapes) else None,
                clicks if isinstance(clicks, Points) else None)

    def forget_image(self, *names: str) -> None:
        """Forget the prompts applied to and queued for the image layers ``names``.

        The Scan browser calls this when it reuses a case's layers for another case (Next):
        the emptied boxes and clicks layers then start afresh, and a prompt event of the case
        left is not run on the new one. The "vs truth" and "class" rows are cleared.
        """
        for name in names:
            self._prompt_queue.pop(name, None)
            for key in [k for k in self._applied if k and k[0] == name]:
                del self._applied[key]
        self._metrics.value = ""
        self._classes.value = ""
        self.last_metrics = None
        if not self.running:
            self._image.reset_choices()

    def _ensure_prompt_layers(self, image: Any, activate: bool = True) -> None:
        """Add the image's boxes and clicks layers if absent and listen to them.

        With ``activate`` (and a prompt model) a newly added boxes layer becomes the active
        layer after this event-loop turn, ready to draw.
        """
        boxes, clicks = self.prompt_layers(image)
        size = prompt_size(image)
        active = self._viewer.layers.selection.active

        def meta(kind: str) -> dict:
            return {META_KEY: {"written_by": WRITTEN_BY, "kind": kind, "image": image.name}}

        added = False
        if boxes is None and find_layer(self._viewer, f"{image.name}{BOXES_SUFFIX}") is None:
            boxes = self._viewer.add_shapes(
                ndim=image.ndim, name=f"{image.name}{BOXES_SUFFIX}", scale=image.scale,
                translate=image.translate, edge_color="yellow", face_color="transparent",
                edge_width=max(1.0, size / 4), metadata=meta("box prompts"),
            )
            boxes.mode = "add_rectangle"
            added = True
        if clicks is None and find_layer(self._viewer, f"{image.name}{CLICKS_SUFFIX}") is None:
            clicks = self._viewer.add_points(
                ndim=image.ndim, name=f"{image.name}{CLICKS_SUFFIX}", scale=image.scale,
                translate=image.translate, size=size, face_color=CLICK_COLOURS[1],
                border_color="white", features={"label": np.zeros(0, np.int8)},
                feature_defaults={"label": 1}, metadata=meta("click prompts"),
            )
            clicks.mode = "add"
            added = True
        for layer in (boxes, clicks):
            if layer is not None and id(layer) not in self._connected:
                self._connected.add(id(layer))
                layer.events.data.connect(
                    lambda event, lay=layer: self._on_prompt_event(lay, event))
                layer.bind_key("Control-Z", self._undo_key, overwrite=True)
                if layer is clicks:
                    layer.mouse_drag_callbacks.append(self._on_clicks_press)
        if added and activate and self._takes_prompts:
            # ready to draw a box; after the event loop turn, as napari activates the layer it
            # has just added (often the image that brought us here) when this returns
            from qtpy.QtCore import QTimer

            ref = weakref.ref(boxes)

            def activate() -> None:
                lay = ref()
                if lay is not None and lay in self._viewer.layers:
                    self._viewer.layers.selection.active = lay

            QTimer.singleShot(0, activate)
        elif added and activate and active is not None and active in self._viewer.layers:
            self._viewer.layers.selection.active = active

    def _on_clicks_press(self, _layer: Any, event: Any) -> None:
        mods = getattr(event, "modifiers", ()) or ()
        self._negative_modifier = any(m in mods for m in NEGATIVE_MODIFIERS)

    def _label_new_clicks(self, layer: Any, indices: Sequence[int]) -> None:
        """Give new clicks their label (toggle or modifier) and colour (green / red)."""
        label = 0 if (self._click_label.value == BACKGROUND_CLICK
                      or self._negative_modifier) else 1
        self._negative_modifier = False
        n = len(layer.data)
        labels = _click_labels(layer)
        for i in indices:
            labels[int(i) % n] = label
        layer.features = {"label": labels}
        layer.face_color = [CLICK_COLOURS[int(v)] for v in labels] if n else CLICK_COLOURS[1]

    def _on_prompt_event(self, layer: Any, event: Any) -> None:
        action = str(getattr(event, "action", "") or "")
        if action not in ("added", "removed", "changed", ""):
            return  # "adding", "changing", "removing": wait for the end of the edit
        from napari.layers import Points

        if action == "added" and isinstance(layer, Points):
            self._label_new_clicks(layer, getattr(event, "data_indices", (-1,)))
        image_name = _image_name_of(layer)
        if image_name is None:
            return
        self._prompt_queue.setdefault(image_name, time.perf_counter())
        self._prompt_timer.start()

    def _on_prompt_timer(self) -> None:
        if self._prompt_worker is not None:
            return  # started again when the running update finishes
        for name in list(self._prompt_queue):
            boxes = find_layer(self._viewer, f"{name}{BOXES_SUFFIX}")
            if boxes is not None and getattr(boxes, "_is_creating", False):
                self._prompt_timer.start()  # still drawing: wait for the release
                return
        while self._prompt_queue:
            name, t0 = next(iter(self._prompt_queue.items()))
            del self._prompt_queue[name]
            try:
                req = self._prompt_request(name, t0)
            except ValueError as exc:
                self._set_status(f"⚠ prompt not used: {exc}")
                continue
            if req is not None:
                self._start_prompt(req)
                return

    def _current_index(self, image: Any) -> tuple[int, ...]:
        """Return the slice of ``image`` shown in the viewer (leading data indices)."""
        shape = _spatial_shape(image)
        nlead = len(shape) - 2
        if nlead <= 0:
            return ()
        pt = np.asarray(image.world_to_data(self._viewer.dims.point), np.float64)
        return tuple(int(np.clip(np.round(pt[i]), 0, shape[i] - 1)) for i in range(nlead))

    def _prompt_request(self, image_name: str, t0: float) -> PromptRequest | None:
        """Snapshot the prompts of the shown slice; None when nothing changed.

        Raises ValueError with a message for the status line.
        """
        from busseg.prompts import box_mask, validate_prompts

        image = find_layer(self._viewer, image_name, "image")
        if image is None:
            return None
        if not self._takes_prompts:
            raise ValueError(
                "the chosen checkpoint takes no box or click prompts (it was trained "
                "without guidance channels); press Run for automatic segmentation, or choose "
                "a prompt model")
        shape = _spatial_shape(image)
        hw = (int(shape[-2]), int(shape[-1]))
        lead = self._current_index(image)
        boxes_layer, clicks_layer = self.prompt_layers(image)
        boxes = (_clip_boxes(_shape_boxes(boxes_layer, lead)[0], hw) if boxes_layer is not None
                 else np.zeros((0, 4)))
        points, labels = ((np.zeros((0, 2)), np.zeros(0, np.int8)) if clicks_layer is None
                          else _slice_clicks(clicks_layer, lead))
        validate_prompts(hw, boxes, points, labels)  # a clear ValueError for a bad prompt
        key = (image_name, lead)
        old_boxes, old_clicks = self._applied.get(key, (set(), set()))
        new_boxes = {tuple(float(v) for v in b) for b in boxes}
        new_clicks = {(float(r), float(c), int(lab)) for (r, c), lab in zip(points, labels,
                                                                             strict=True)}
        changed_boxes, changed_clicks = old_boxes ^ new_boxes, old_clicks ^ new_clicks
        self._applied[key] = (new_boxes, new_clicks)
        if not changed_boxes and not changed_clicks:
            return None
        note = ""
        if len(boxes) and len(points):  # clicks outside every box cannot change the mask
            inside = box_mask(boxes, hw, 0.1)
            rc = np.clip(np.round(points).astype(int), 0, np.asarray(hw) - 1)
            keep = inside[rc[:, 0], rc[:, 1]]
            if not keep.all():
                note = (f"{int((~keep).sum())} click(s) outside the boxes ignored: with boxes "
                        "on a slice the mask stays inside them; draw a box around that lesion")
            points, labels = points[keep], labels[keep]
            changed_clicks = {c for c in changed_clicks if inside[
                min(max(round(c[0]), 0), hw[0] - 1), min(max(round(c[1]), 0), hw[1] - 1)]}
        pred = find_layer(self._viewer, prediction_name(image_name), "labels")
        previous = None
        if len(points) and pred is not None and _spatial_shape(pred) == shape:
            previous = np.asarray(pred.data[lead]) > 0
        data = image.data[0] if image.multiscale else image.data
        settings = self.settings()
        req = PromptRequest(
            data=data, index=lead, boxes=boxes, points=points, point_labels=labels,
            previous_mask=previous,
            changed_boxes=np.asarray(sorted(changed_boxes), np.float64).reshape(-1, 4),
            changed_clicks=np.asarray([c[:2] for c in sorted(changed_clicks)],
                                      np.float64).reshape(-1, 2),
            checkpoint=settings["checkpoint"], device=settings["device"],
            threshold=settings["threshold"], box_margin=0.1, t0=t0, image_name=image_name,
            slice_shape=hw,
        )
        self._prompt_note = note
        return req

    def _start_prompt(self, req: PromptRequest) -> None:
        from napari.qt.threading import create_worker

        worker = create_worker(prompt_job, req, _start_thread=False, _ignore_errors=True)
        worker.returned.connect(lambda res, req=req: self._apply_prompt(req, res))
        worker.errored.connect(self._on_prompt_errored)
        worker.finished.connect(self._on_prompt_finished)
        self._prompt_worker = worker
        worker.start()

    def _on_prompt_errored(self, exc: BaseException) -> None:
        self._set_status(f"⚠ prompt not used: {exc}")

    def _on_prompt_finished(self) -> None:
        self._prompt_worker = None
        if self._prompt_queue:
            self._on_prompt_timer()

    @property
    def prompt_busy(self) -> bool:
        """Whether a prompt update is running or waiting to run."""
        return (self._prompt_worker is not None or bool(self._prompt_queue)
                or self._prompt_timer.isActive())

    def _prompt_target(self, req: PromptRequest) -> Any:
        """Return the request's prediction Labels layer (added, all zero, if absent)."""
        from napari.layers import Labels

        name = prediction_name(req.image_name)
        existing = find_layer(self._viewer, name)
        if existing is not None:
            return existing if isinstance(existing, Labels) else None
        return self._empty_prediction(req.image_name)

    def _empty_prediction(self, image_name: str) -> Any:
        """Add an all-zero ``"<image> prediction"`` Labels layer (None without the image)."""
        image = find_layer(self._viewer, image_name, "image")
        if image is None:
            return None
        labels = np.zeros(_spatial_shape(image), np.uint8)
        active = self._viewer.layers.selection.active
        s = self.settings()
        layer = self._viewer.add_labels(
            labels, name=prediction_name(image_name), scale=image.scale,
            translate=image.translate,
            metadata={META_KEY: {
                "written_by": WRITTEN_BY, "kind": "prediction", "image": image_name,
                "checkpoint": str(s["checkpoint"]) if s["checkpoint"] else DEFAULT_MODEL,
                "threshold": s["threshold"], "written_sha1": data_sha1(labels)}},
        )
        _prediction_colours(layer)
        self._below_prompts(layer, image_name)
        if active is not None and active in self._viewer.layers:
            self._viewer.layers.selection.active = active  # keep clicking / drawing
        return layer

    def _below_prompts(self, layer: Any, image_name: str) -> None:
        """Move ``layer`` just below the image's boxes and clicks layers (prompts on top)."""
        layers = self._viewer.layers
        idx = [layers.index(lay) for lay in (
            find_layer(self._viewer, f"{image_name}{BOXES_SUFFIX}"),
            find_layer(self._viewer, f"{image_name}{CLICKS_SUFFIX}")) if lay is not None]
        if idx and layers.index(layer) > min(idx):
            layers.move(layers.index(layer), min(idx))

    def _apply_prompt(self, req: PromptRequest, res: PromptResult) -> None:
        """Write the prompted mask into the prediction layer: one undoable edit."""
        if find_layer(self._viewer, req.image_name, "image") is None:
            # the case was left meanwhile (the Scan browser reused its layers): never write
            # one case's prompt into another case's mask
            self._set_status(f"prompt of “{req.image_name}” dropped: its image is closed")
            return
        layer = self._prompt_target(req)
        if layer is None:
            self._set_status(f"⚠ “{prediction_name(req.image_name)}” is not a Labels layer; "
                             "rename it to get the prompt's mask")
            return
        image = find_layer(self._viewer, req.image_name, "image")
        if image is not None and _spatial_shape(layer) != _spatial_shape(image):
            self._set_status(f"⚠ “{layer.name}” has shape {_spatial_shape(layer)}, the image "
                             f"{_spatial_shape(image)}; the prompt's mask was not written")
            return
        old = np.asarray(layer.data[req.index]) > 0
        region = prompt_region(old, res.mask, boxes=req.changed_boxes,
                               clicks=req.changed_clicks, box_margin=req.box_margin)
        rr, cc = np.nonzero(region & (old != res.mask))
        if len(rr):
            idx = tuple(np.full(len(rr), i, np.intp) for i in req.index) + (rr, cc)
            layer.data_setitem(idx, res.mask[rr, cc].astype(layer.data.dtype))
        self.last_prompt_latency = time.perf_counter() - req.t0
        where = f" (slice {', '.join(map(str, req.index))})" if req.index else ""
        msg = (f"prompt{where}: {len(rr)} pixel(s) changed in “{layer.name}” in "
               f"{1000 * self.last_prompt_latency:.0f} ms (model {1000 * res.seconds:.0f} ms); "
               "Ctrl+Z undoes")
        if not len(rr) and (len(req.points) or len(req.boxes)):
            msg = f"prompt{where}: the model left the mask as it was"
        note = self._prompt_note
        self._set_status(msg + (f". {note}" if note else ""))
        self._metrics_after_edit(req.image_name, layer, req.index)

    def _undo_key(self, layer: Any) -> None:
        """Ctrl+Z on a boxes / clicks layer: undo the last change of the prediction layer."""
        name = _image_name_of(layer)
        pred = find_layer(self._viewer, prediction_name(name or ""), "labels")
        if pred is not None:
            pred.undo()

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
        self._below_prompts(layer, run.image_name)
        self._viewer.layers.selection.active = layer
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

    def _metrics_after_edit(self, image_name: str, layer: Any, index: tuple) -> None:
        """Recompute the Dice row after a prompt or a clear changed slice ``index``.

        A 2D image: Dice of the whole mask; a stack: Dice of the edited slice (the one the
        annotator looks at; a full pass over a long stack would stall the GUI).
        """
        if not index:
            self._show_metrics(image_name, np.asarray(layer.data))
            return
        from busseg.metrics import dice_score, iou_score

        gt = find_layer(self._viewer, ground_truth_name(image_name), "labels")
        if gt is None:
            self.last_metrics = None
            self._metrics.value = ""
            return
        truth = gt.data[0] if gt.multiscale else gt.data
        if tuple(np.shape(truth)) != _spatial_shape(layer):
            self._metrics.value = (f"“{gt.name}” has shape {tuple(np.shape(truth))}, the "
                                   f"prediction {_spatial_shape(layer)}; no Dice")
            self.last_metrics = None
            return
        pred, true = np.asarray(layer.data[index]), np.asarray(truth[index])
        d, i = dice_score(pred, true), iou_score(pred, true)
        where = ", ".join(map(str, index))
        self._metrics.value = f"slice {where}: Dice {d:.3f}, IoU {i:.3f}"
        self._metrics.native.setToolTip(f"slice {where} vs “{gt.name}”")
        self.last_metrics = {"dice": d, "iou": i, "ground_truth": gt.name, "slice": index}

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
            self._metrics.value = f"Dice {d:.3f}, IoU {i:.3f}"
        else:
            idx = list(np.ndindex(*labels.shape[:-2]))
            d = float(np.mean([dice_score(labels[k], truth[k]) for k in idx]))
            i = float(np.mean([iou_score(labels[k], truth[k]) for k in idx]))
            self._metrics.value = f"mean over {len(idx)} slices: Dice {d:.3f}, IoU {i:.3f}"
        self._metrics.native.setToolTip(f"{self._metrics.value} vs “{gt.name}”")
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
