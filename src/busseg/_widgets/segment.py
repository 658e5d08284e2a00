"""The "Segment lesions" dock widget: run a U-Net checkpoint on an Image layer.

The widget is thin (DESIGN.md practices 2-4): on Run it snapshots the chosen layer and
settings on the GUI thread, runs :func:`busseg.jobs.segment_job` (Qt-free, like
:func:`~busseg.jobs.prompt_job` and :func:`~busseg.jobs.prompt_region`, which this module
re-exports; a generator: model loading and one prediction per 2D slice through
:func:`busseg.inference.predict_stack_iter`) in a napari worker
(:func:`busseg._widgets._common.start_worker`), and applies the result in the ``returned``
slot. One module per thing a person does:

- this module: the rows, the model, Run / Cancel;
- :mod:`busseg._widgets.prompts`: box and click prompts
  (:class:`~busseg._widgets.prompts.PromptsMixin`);
- :mod:`busseg._widgets.segment_results`: the prediction / probability layers it writes (an
  edited prediction is never overwritten silently) and the Dice row.

The widget shares its checkpoint and inference settings through the viewer's
:class:`busseg.state.ViewerState` and offers its keyboard actions there
(:meth:`SegmentWidget.segment` as Run, :meth:`~SegmentWidget.set_prompt_mode`,
:meth:`~SegmentWidget.toggle_click_label`, :meth:`~SegmentWidget.clear_mask`); the Scan
browser and Fine-tune use them through the state, never through the widget.

The annotator's rows (image, model, click label, Run) come first; the expert settings
(device, threshold, test-time flips, fill holes, region filter, keep, min area, probability
map) fold away in a section that is closed by default. The rows sit in a vertical scroll area,
so a short dock scrolls instead of squashing wrapped lines.

torch and :mod:`busseg.inference` are imported when the widget is built or run, never when napari
starts.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from magicgui.widgets import (
    CheckBox,
    ComboBox,
    Container,
    FileEdit,
    FloatSpinBox,
    RadioButtons,
    SpinBox,
)

from busseg._widgets._common import (
    RunStatusMixin,
    TextRow,
    cap_height_to_content,
    connect_layer_changes,
    fit_labels_on_show,
    scroll_form,
    start_worker,
    wrap_label,
)
from busseg._widgets.prompts import (  # noqa: F401  (re-exported)
    BACKGROUND_CLICK,
    CLICK_COLOURS,
    LESION_CLICK,
    NEGATIVE_MODIFIERS,
    PROMPT_MODES,
    PromptsMixin,
    prompt_size,
    reuse_prompt_layers,
)
from busseg._widgets.segment_results import (  # noqa: F401  (re-exported)
    CANCEL,
    CLASS_NOTE,
    DEFAULT_MODEL,
    NEW_LAYER,
    PREDICTION_COLOUR,
    REPLACE,
    ResultsMixin,
    RunRecord,
    format_classes,
)

# The Qt-free jobs live in busseg.jobs; these names stay importable from here.
from busseg.jobs import (  # noqa: F401
    PromptRequest,
    PromptResult,
    SegmentResult,
    WorkerError,
    guarded,
    prompt_job,
    prompt_region,
    segment_job,
    slice_crop,
)
from busseg.layers import (  # noqa: F401  (re-exported)
    BOXES_SUFFIX,
    CLICKS_SUFFIX,
    SEGMENT_WRITTEN_BY,
    data_sha1,
    find_layer,
    image_name_of,
    is_spare,
    stack_slices,
)
from busseg.settings import InferenceSettings
from busseg.state import viewer_state

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
    "data_sha1",
    "find_segment_widget",
    "guarded",
    "layers_swapping",
    "prompt_job",
    "prompt_region",
    "reuse_prompt_layers",
    "segment_job",
    "slice_crop",
    "stack_slices",
]

#: Model choice of the widget meaning a checkpoint folder.
CHECKPOINT_FOLDER = "checkpoint folder"
#: Device choices (the widget shows which one ``auto`` resolves to).
DEVICES = ("auto", "cuda", "mps", "cpu")
#: ``layer.metadata["busseg"]["written_by"]`` of the layers this widget writes.
WRITTEN_BY = SEGMENT_WRITTEN_BY
#: Actions the widget offers to the other widgets of its viewer (:class:`ViewerState`).
ACTIONS = ("segment", "set_prompt_mode", "toggle_click_label", "clear_mask")


def find_segment_widget(viewer: Any) -> SegmentWidget | None:
    """Find the "Segment lesions" widget of a viewer (for scripts; widgets use the state).

    Parameters
    ----------
    viewer : napari.viewer.Viewer
        The viewer.

    Returns
    -------
    SegmentWidget or None
        The live widget that offers the viewer's ``"segment"`` action
        (:func:`busseg.state.viewer_state`), else ``None``.
    """
    action = viewer_state(viewer).handler("segment")
    return getattr(action, "__self__", None)


@contextmanager
def layers_swapping(viewer: Any) -> Iterator[None]:
    """Hold the widgets of ``viewer`` still while layers are renamed and swapped.

    Same as ``viewer_state(viewer).holding_layers()``: inside the block the widgets ignore
    layer-list and active-layer changes; on leaving it they refresh their choices once.

    Parameters
    ----------
    viewer : napari.viewer.Viewer
        The viewer whose widgets are held.
    """
    with viewer_state(viewer).holding_layers():
        yield


def _checkpoint_dir(path: str | Path) -> Path:
    """Map a checkpoint folder, or a file picked inside it, to the folder."""
    p = Path(path).expanduser()
    if p.is_file():
        p = p.parent
    return p


# --------------------------------------------------------------------------- the widget


class SegmentWidget(PromptsMixin, ResultsMixin, RunStatusMixin, Container):
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
        self._viewer = viewer
        self._state = viewer_state(viewer)
        self._worker = None
        self._run: RunRecord | None = None
        self.last_result: SegmentResult | None = None
        self.last_metrics: dict | None = None
        self.ask_overwrite: Callable[[str], str] = self._ask_overwrite_dialog
        self._make_rows()
        self._lay_out_rows()
        self._init_prompts()
        self._source.changed.connect(self._on_model_changed)
        self._checkpoint.changed.connect(self._on_model_changed)
        self._source.changed.connect(self._publish_settings)
        self._checkpoint.changed.connect(self._publish_settings)
        self._run_btn.changed.connect(self._on_run)
        self._cancel_btn.changed.connect(self._on_cancel)
        self._image.changed.connect(self._on_image_changed)
        self._expert.changed.connect(self._publish_settings)
        connect_layer_changes(viewer, self._on_layers_changed)
        viewer.layers.selection.events.active.connect(self._on_active_layer)
        if self._state.checkpoint is not None:  # e.g. adopted by learning as you go
            self.use_checkpoint(self._state.checkpoint)
        else:
            self._on_model_changed()
        self._on_active_layer()
        self._on_layers_changed()
        self._join_state()

    def _make_rows(self) -> None:
        """Make the rows: the annotator's first, then the expert settings."""
        from busseg.devices import available_devices, get_device

        self._image = ComboBox(label="image", choices=self._image_choices, nullable=True,
                               tooltip="Image layer to segment (2D grey, RGB/RGBA or a stack)")
        self._source = ComboBox(label="model", choices=[DEFAULT_MODEL, CHECKPOINT_FOLDER],
                                value=DEFAULT_MODEL)
        self._checkpoint = FileEdit(
            label="checkpoint", mode="d", nullable=True, enabled=False,
            tooltip="A checkpoint folder (model.safetensors + config.json) or a file in it",
        )
        self._model_info = TextRow(value="")
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
        self._run_btn, self._cancel_btn = self._run_controls("Run", "Cancel")
        self._status = TextRow(label="status", value="ready")
        self._metrics = TextRow(label="vs truth", value="")
        self._classes = TextRow(label="class", value="")
        self._click_label = RadioButtons(
            label="click label", choices=[LESION_CLICK, BACKGROUND_CLICK], value=LESION_CLICK,
            orientation="horizontal",
            tooltip="Label of new clicks in the “<image> clicks” layer; hold Shift or Ctrl "
                    "while clicking to place a background click",
        )
        self._prompt_info = TextRow(value="")
        for lab in (self._model_info, self._status, self._metrics, self._classes,
                    self._prompt_info):
            wrap_label(lab)  # in the scroll area below, wrapped lines keep their height

    def _lay_out_rows(self) -> None:
        """Put the rows in a scrolling form; the expert settings fold away (closed).

        When the dock is short (other docks above or below it, a 900-pixel-high screen) the
        form scrolls instead of squashing the rows, and wrapped lines keep their height.
        """
        from superqt import QCollapsible

        self._form = Container(labels=True)
        self._form.extend([  # after construction, so the label column gets one width
            self._image, self._source, self._checkpoint, self._model_info, self._click_label,
            self._prompt_info, Container(widgets=[self._run_btn, self._cancel_btn],
                                         layout="horizontal", labels=False),
            self._progress, self._status, self._metrics, self._classes,
        ])
        self._expert = Container(labels=True, widgets=[
            self._device, self._threshold, self._tta, self._fill_holes, self._region_filter,
            self._keep, self._min_area, self._with_proba])
        self._expert.margins = (0, 0, 0, 0)
        self._expert_section = QCollapsible("Expert settings")
        self._expert_section.setObjectName("busseg_segment_expert")
        self._expert_section.setToolTip(
            "device, threshold, test-time flips, fill holes, region filter, keep, min area, "
            "probability map")
        self._expert_section.addWidget(self._expert.native)
        self._expert_section.collapse(animate=False)
        self._form.native.layout().addWidget(self._expert_section)
        self.append(self._form)
        scroll_form(self, min_height=120, object_name="busseg_segment_scroll")
        fit_labels_on_show(self._form)
        fit_labels_on_show(self._expert)
        from qtpy.QtWidgets import QScrollArea

        # all rows shown: the rest of the height goes to the dock below (the Scan browser)
        refit = cap_height_to_content(self.native.findChild(QScrollArea, "busseg_segment_scroll"))
        self._expert_section.toggled.connect(lambda *_: refit())

    def _init_prompts(self) -> None:
        """Prompt bookkeeping: one worker at a time; events meanwhile are coalesced."""
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

    def _join_state(self) -> None:
        """Offer the keyboard actions and watch the viewer's shared state."""
        for name in ACTIONS:
            self._state.offer(name, getattr(self, name))
        self._state.checkpoint_changed.connect(self._on_state_checkpoint)
        self._state.layers_released.connect(self._on_layers_released)
        self._state.prompts_reused.connect(self._on_prompts_reused)
        self._publish_settings()

    @property
    def expert_settings_open(self) -> bool:
        """Whether the "Expert settings" section is unfolded."""
        return bool(self._expert_section.isExpanded())

    def set_expert_settings_open(self, on: bool) -> None:
        """Unfold (True) or fold (False) the "Expert settings" section."""
        if on:
            self._expert_section.expand(animate=False)
        else:
            self._expert_section.collapse(animate=False)

    # ---------------------------------------------------------------- shared state

    def _publish_settings(self, *_: Any) -> None:
        """Publish the checkpoint and inference settings as the viewer's."""
        self._state.publish_settings(self.settings(), owner=self)
        self._state.checkpoint = self.current_checkpoint()

    def _on_state_checkpoint(self, path: Path | None) -> None:
        """Another widget adopted a checkpoint (fine-tune, learning as you go): use it."""
        if path != self.current_checkpoint():
            try:
                self.use_checkpoint(path)
            except RuntimeError:  # the Qt side is gone
                pass

    def _on_layers_released(self) -> None:
        try:
            self._on_layers_changed()
        except RuntimeError:  # the widget's Qt side is gone
            pass

    def _on_prompts_reused(self, image_name: str, old_names: tuple) -> None:
        """Start a case's prompt layers afresh: they now belong to ``image_name``."""
        try:
            self.forget_image(image_name, *old_names)
            image = find_layer(self._viewer, image_name, "image")
            if image is not None:  # layers it did not make itself: listen to them now
                self._ensure_prompt_layers(image, activate=False)
        except RuntimeError:
            pass

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
        self._publish_settings()

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

    # ---------------------------------------------------------------- choices and model

    def _image_choices(self, _widget: Any = None) -> list[tuple[str, Any]]:
        from napari.layers import Image

        return [(lay.name, lay) for lay in self._viewer.layers
                if isinstance(lay, Image) and not is_spare(lay)]

    def _on_layers_changed(self, _event: Any = None) -> None:
        if self._state.layers_held_now:
            return
        self._image.reset_choices()
        if self._image.value is None and not self.running:
            # e.g. the reader added an image and its ground truth, and the latter is active
            pick = self._pick_image()
            if pick is not None:
                self._image.value = pick

    def _on_active_layer(self, _event: Any = None) -> None:
        from napari.layers import Image

        if self._state.layers_held_now:
            return
        if self.running:
            return
        active = self._viewer.layers.selection.active
        if not isinstance(active, Image):
            active = find_layer(self._viewer, image_name_of(active) or "", "image")
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
        owner = find_layer(self._viewer, image_name_of(active) or "", "image")
        if owner is not None and not is_spare(owner):
            return owner
        images = [lay for lay in self._viewer.layers
                  if isinstance(lay, Image) and not is_spare(lay)]
        return images[-1] if images else None

    def _on_image_changed(self, value: Any = None) -> None:
        if self._state.layers_held_now:
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

    def settings(self) -> InferenceSettings:
        """Return the widget's inference settings (read on the GUI thread).

        What Run passes to :func:`busseg.jobs.segment_job` and what the widget publishes as
        the viewer's settings (:attr:`busseg.state.ViewerState.settings`: the Scan browser
        predicts with them). The checkpoint is :meth:`current_checkpoint`; "probability
        map" is a choice of output, not a setting.

        Returns
        -------
        busseg.settings.InferenceSettings
            ``device`` (str), ``threshold`` (float in (0, 1)), ``tta``, ``fill_holes``,
            ``region_filter`` (``"auto"``: the checkpoint's, or None: off), ``keep`` (str)
            and ``min_area`` (int, pixels).
        """
        return InferenceSettings(
            device=self._device.value,
            threshold=float(self._threshold.value),
            tta=bool(self._tta.value),
            fill_holes=bool(self._fill_holes.value),
            region_filter="auto" if self._region_filter.value else None,
            keep=self._keep.value,
            min_area=int(self._min_area.value),
        )

    def _on_run(self, _value: Any = None) -> None:
        if self.running:
            return
        layer = self._image.value
        if layer is None:
            self._set_status("add or open an Image layer first (File > Open, or the BUSI "
                             "samples), then choose it above")
            return
        settings, checkpoint = self.settings(), self.current_checkpoint()
        if self._source.value == CHECKPOINT_FOLDER and checkpoint is None:
            self._set_status("choose a checkpoint folder, or switch the model to "
                             f"'{DEFAULT_MODEL}'")
            return
        target = self._choose_target(layer.name)
        if target is None:
            self._set_status("cancelled; the edited prediction layer was left as it is")
            return
        data = layer.data[0] if layer.multiscale else layer.data
        with_proba = bool(self._with_proba.value)
        self._run = RunRecord(layer, layer.name, target[0], target[1], with_proba,
                              tuple(layer.scale), tuple(layer.translate), settings, checkpoint)
        self._metrics.value = ""
        slices = stack_slices(layer)
        crops = [slice_crop(slices, i) for i in range(len(slices))] if slices else None
        job = segment_job(data, rgb=bool(layer.rgb), checkpoint=checkpoint, settings=settings,
                          with_proba=with_proba, crops=crops)
        self._worker = start_worker(
            job, yielded=self._on_yielded, returned=self._on_returned, errored=self._on_errored,
            aborted=self._on_aborted, finished=self._on_finished, start=False)
        self._state.segmenting = layer.name
        self._run_btn.enabled = False
        self._cancel_btn.enabled = True
        self._progress.max = 0  # busy indicator while the model loads
        self._set_status(f"segmenting “{layer.name}” …")
        self._worker.start()

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

    def _on_aborted(self) -> None:
        self._set_status("cancelled; nothing was written")

    def _on_finished(self) -> None:
        self._state.segmenting = None
        self._end_run(self._run_btn, self._cancel_btn)

    def _start_prompt(self, req: PromptRequest) -> None:
        """Run :func:`busseg.jobs.prompt_job` on ``req`` in a worker (one at a time)."""
        self._prompt_worker = start_worker(
            lambda: prompt_job(req), returned=lambda res: self._apply_prompt(req, res),
            errored=self._on_prompt_errored, finished=self._on_prompt_finished)
