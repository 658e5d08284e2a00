"""Box and click prompts of "Segment lesions": the prompt layers and their live updates.

When the widget has an image it adds, if absent, a Shapes layer ``"<image> boxes"`` (rectangle
mode) and a Points layer ``"<image> clicks"`` (feature ``label``: 1 lesion, green; 0
background, red). Each drawn, moved or deleted box and each added, moved or removed click
re-predicts the current 2D slice in a worker (one at a time; events that arrive meanwhile are
coalesced into one more run) and writes the result into ``"<image> prediction"`` with
``Labels.data_setitem``, one undoable step. Only the pixels the prompt affects change
(:func:`busseg.jobs.prompt_region`): inside the changed boxes (grown by the box margin) and
inside the connected lesions (old or new mask) that hold a changed click; brush edits
elsewhere survive.

:class:`PromptsMixin` is the part of :class:`busseg._widgets.segment.SegmentWidget` that does
this (the widget starts the worker); :func:`reuse_prompt_layers` hands a case's prompt layers
to the next case (the Scan browser) and tells the viewer's widgets through
:class:`busseg.state.ViewerState`.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Sequence
from typing import Any

import numpy as np

from busseg._widgets.segment_results import DEFAULT_MODEL, prediction_colours
from busseg.jobs import PromptRequest, PromptResult, prompt_region
from busseg.layers import (
    BOXES_SUFFIX,
    CLICKS_SUFFIX,
    META_KEY,
    SEGMENT_WRITTEN_BY,
    busseg_metadata,
    data_sha1,
    find_layer,
    image_name_of,
    prediction_name,
    spatial_shape,
)
from busseg.state import viewer_state

__all__ = [
    "BACKGROUND_CLICK",
    "BOXES_SUFFIX",
    "CLICKS_SUFFIX",
    "CLICK_COLOURS",
    "LESION_CLICK",
    "NEGATIVE_MODIFIERS",
    "PROMPT_MODES",
    "PromptsMixin",
    "click_labels",
    "clip_boxes",
    "prompt_size",
    "reuse_prompt_layers",
    "shape_boxes",
    "slice_clicks",
]

WRITTEN_BY = SEGMENT_WRITTEN_BY
#: Face colours of lesion (label 1) and background (label 0) clicks.
CLICK_COLOURS = {1: "lime", 0: "red"}
#: Choices of the widget's "click label" toggle.
LESION_CLICK, BACKGROUND_CLICK = "lesion (+)", "background (−)"
#: Modes of :meth:`PromptsMixin.set_prompt_mode`.
PROMPT_MODES = ("box", "click", "off")
#: Keyboard modifiers that make a new click a background click whatever the toggle says.
NEGATIVE_MODIFIERS = frozenset({"Shift", "Control"})


def prompt_size(image: Any) -> float:
    """Size (data pixels) of click markers, and four times the box edge width, for ``image``."""
    shape = spatial_shape(image)
    return max(4.0, round(max(shape[-2:]) / 60))



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
    old_names = {image_name_of(lay) for lay in (boxes, clicks) if lay is not None}
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
    viewer_state(viewer).prompts_handed_over(image.name, tuple(n for n in old_names if n))



def shape_boxes(shapes: Any, lead: tuple[int, ...]) -> tuple[np.ndarray, list[int]]:
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


def clip_boxes(boxes: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Clip boxes that overlap the image to it; boxes wholly outside are kept (and refused)."""
    out = boxes.copy()
    h, w = shape
    for b in out:
        if b[2] >= 0 and b[0] <= h - 1 and b[3] >= 0 and b[1] <= w - 1:
            b[[0, 2]] = np.clip(b[[0, 2]], 0, h - 1)
            b[[1, 3]] = np.clip(b[[1, 3]], 0, w - 1)
    return out


def slice_clicks(points: Any, lead: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Clicks ``(row, col)`` on slice ``lead`` and their labels (1 lesion, 0 background)."""
    data = np.asarray(points.data, np.float64).reshape(-1, points.ndim)
    labels = click_labels(points)
    k = len(lead)
    if k and len(data):
        keep = np.all(np.round(data[:, :k]).astype(int) == np.asarray(lead), axis=1)
        data, labels = data[keep], labels[keep]
    return data[:, -2:], labels


def click_labels(points: Any) -> np.ndarray:
    """Return the ``label`` feature of a clicks layer as int8 (missing or unreadable: 1)."""
    n = len(points.data)
    feats = getattr(points, "features", None)
    if feats is None or "label" not in feats or len(feats) != n:
        return np.ones(n, np.int8)
    try:
        return np.array(feats["label"], dtype=np.int8)  # a writable copy
    except (TypeError, ValueError):
        return np.ones(n, np.int8)



class PromptsMixin:
    """Prompt layers, prompt events and the prompt actions of "Segment lesions".

    Mixed into :class:`busseg._widgets.segment.SegmentWidget`, which owns the rows
    (``_click_label``, ``_prompt_info``), the status line and the worker
    (``_start_prompt``).
    """

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

        if not isinstance(layer, Labels) or spatial_shape(layer) != spatial_shape(image):
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
        labels = click_labels(layer)
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
        image_name = image_name_of(layer)
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
        shape = spatial_shape(image)
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
        shape = spatial_shape(image)
        hw = (int(shape[-2]), int(shape[-1]))
        lead = self._current_index(image)
        boxes_layer, clicks_layer = self.prompt_layers(image)
        boxes = (clip_boxes(shape_boxes(boxes_layer, lead)[0], hw) if boxes_layer is not None
                 else np.zeros((0, 4)))
        points, labels = ((np.zeros((0, 2)), np.zeros(0, np.int8)) if clicks_layer is None
                          else slice_clicks(clicks_layer, lead))
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
        if len(points) and pred is not None and spatial_shape(pred) == shape:
            previous = np.asarray(pred.data[lead]) > 0
        data = image.data[0] if image.multiscale else image.data
        settings, checkpoint = self.settings(), self.current_checkpoint()
        req = PromptRequest(
            data=data, index=lead, boxes=boxes, points=points, point_labels=labels,
            previous_mask=previous,
            changed_boxes=np.asarray(sorted(changed_boxes), np.float64).reshape(-1, 4),
            changed_clicks=np.asarray([c[:2] for c in sorted(changed_clicks)],
                                      np.float64).reshape(-1, 2),
            checkpoint=checkpoint, device=settings.device or "auto",
            threshold=settings.threshold, box_margin=0.1, t0=t0, image_name=image_name,
            slice_shape=hw,
        )
        self._prompt_note = note
        return req


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
        labels = np.zeros(spatial_shape(image), np.uint8)
        active = self._viewer.layers.selection.active
        checkpoint, threshold = self.current_checkpoint(), self.settings().threshold
        layer = self._viewer.add_labels(
            labels, name=prediction_name(image_name), scale=image.scale,
            translate=image.translate,
            metadata={META_KEY: {
                "written_by": WRITTEN_BY, "kind": "prediction", "image": image_name,
                "checkpoint": str(checkpoint) if checkpoint else DEFAULT_MODEL,
                "threshold": threshold, "written_sha1": data_sha1(labels)}},
        )
        prediction_colours(layer)
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
        if image is not None and spatial_shape(layer) != spatial_shape(image):
            self._set_status(f"⚠ “{layer.name}” has shape {spatial_shape(layer)}, the image "
                             f"{spatial_shape(image)}; the prompt's mask was not written")
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
        name = image_name_of(layer)
        pred = find_layer(self._viewer, prediction_name(name or ""), "labels")
        if pred is not None:
            pred.undo()

