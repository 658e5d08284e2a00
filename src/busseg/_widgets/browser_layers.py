"""The layers of the open case: open, hand over to the next case, close (the Scan browser).

The viewer holds the open case's layers only. Moving to another case hands the case's layers
on to the next case: napari makes a layer far more slowly than it swaps one's data, so one
image, one ground-truth and one prediction Labels layer and Segment lesions' boxes and clicks
layers serve every case. Their data, name, metadata and contrast limits become the new case's,
the Labels undo history is emptied (Ctrl+Z never reaches into the case left) and the prompt
layers are emptied (no prompt runs); a layer the new case does not need is hidden at once and
removed ``CLOSE_DELAY_MS`` later, once the new case is drawn (napari ends a layer removal with a
full garbage collection). When a folder is chosen with "Predict on open" on, the layers are
made ahead, hidden ("warm-up"; Segment lesions never offers them), so the first Open does not
pay napari's first-layer costs either. While layers are renamed and swapped the viewer's
:class:`busseg.state.ViewerState` holds its observers still. :class:`CaseLayersMixin` is that
part of the browser widget.
"""

from __future__ import annotations

import contextlib
from typing import Any

import numpy as np

from busseg._widgets.prompts import CLICK_COLOURS, reuse_prompt_layers
from busseg.data.busi import BusiRecord
from busseg.layers import (
    BOXES_SUFFIX,
    CASE_LAYER_SUFFIXES,
    CLICKS_SUFFIX,
    SEGMENT_WRITTEN_BY,
    SPARE_KIND,
    busseg_metadata,
    data_sha1,
    find_layer,
    prediction_name,
)
from busseg.session import mask_fingerprint

__all__ = ["CaseLayersMixin", "SPARE", "WRITTEN_BY"]

#: Who wrote a prediction layer the browser made (prediction on open, a loaded correction).
WRITTEN_BY = "scan browser"
#: Name prefix and metadata kind of the hidden layers made ahead for the first case.
SPARE = SPARE_KIND


class CaseLayersMixin:
    """Open a case's layers, reuse them for the next case, and close what is left over."""

    def _leave_open_case(self, *, reuse: bool = False) -> dict[str, Any]:
        """Autosave the open case, then close its layers (hide them if saving failed).

        With ``reuse`` the layers that the next case can take over (:meth:`_reusable`) are
        returned instead of being closed, by role (``"image"``, ``"ground truth"``,
        ``"prediction"``, ``"boxes"``, ``"clicks"``); the others are closed. The case's edits
        are saved before any of its layers is handed on.
        """
        if self._open_index is None:
            return {}
        name = self._all[self._open_index].name
        ok = self._autosave()[0] if self._record_on_leave else True  # Skip records nothing
        spare: dict[str, Any] = {}
        if ok:
            if reuse:
                spare = self._reusable(name)
                self._doom([lay for lay in self._case_layers(name)
                            if not any(lay is v for v in spare.values())])
            else:
                self._close_case_layers(name, later=True)
        else:
            for layer in self._case_layers(name):
                layer.visible = False
        self._open_index = None
        return spare

    def _reusable(self, name: str) -> dict[str, Any]:
        """Return the layers of case ``name`` that another case can reuse, by role."""
        from napari.layers import Image, Labels, Points, Shapes

        roles = {"image": (name, Image), "ground truth": (name + " ground truth", Labels),
                 "prediction": (prediction_name(name), Labels),
                 "boxes": (name + " boxes", Shapes), "clicks": (name + " clicks", Points)}
        out = {}
        for role, (layer_name, kind) in roles.items():
            layer = find_layer(self._viewer, layer_name)
            if (isinstance(layer, kind) and not self._is_doomed(layer)
                    and not getattr(layer, "multiscale", False)
                    and not (role == "image" and getattr(layer, "rgb", False))):
                out[role] = layer
        return out

    def _doom(self, layers: list) -> None:
        """Hide ``layers`` now and remove them :attr:`CLOSE_DELAY_MS` later (one batch)."""
        layers = [lay for lay in layers if not self._is_doomed(lay)]
        if not layers:
            return
        if len(self._doomed) + len(layers) > 6:
            self._remove_doomed()  # a fast user: the ones left earlier go now
        for layer in layers:
            layer.visible = False
        self._doomed.extend(layers)
        self._close_timer.start()

    def _case_layers(self, name: str) -> list:
        names = {name, *(name + s for s in CASE_LAYER_SUFFIXES)}
        out = []
        for layer in self._viewer.layers:
            if self._is_doomed(layer):
                continue
            meta = busseg_metadata(layer)
            if meta.get("kind") == "stack":
                continue
            if (layer.name in names or meta.get("image") == name
                    or (meta.get("name") == name and meta.get("kind") in ("case", "prediction"))):
                out.append(layer)
        return out

    @property
    def closing_pending(self) -> bool:
        """Whether the hidden layers of the case left last are still waiting to be removed."""
        return bool(self._doomed)

    def _is_doomed(self, layer: Any) -> bool:
        return any(layer is d for d in self._doomed)

    def _close_case_layers(self, name: str, *, later: bool = False) -> None:
        """Remove a case's layers; ``later``: hide them now, remove them after a short delay."""
        doomed = self._case_layers(name)
        if later:
            self._remove_doomed()  # a fast user: the case before is removed now
            for layer in doomed:
                layer.visible = False
            self._doomed = doomed
            if doomed:
                self._close_timer.start()
            return
        self._remove_layers(doomed)

    def _remove_doomed(self) -> None:
        """Remove the hidden layers of the case left last (the close timer's slot)."""
        doomed, self._doomed = self._doomed, []
        self._close_timer.stop()
        if doomed and not self._viewer_closing:
            self._remove_layers(doomed)

    def _remove_layers(self, doomed: list) -> None:
        if not doomed:
            return
        self._closing_case = True
        try:
            # one batch: napari cleans its scene graph (a full gc.collect) once, not per layer
            with self._viewer.layers.batched_update():
                for layer in doomed:
                    if layer in self._viewer.layers:
                        self._viewer.layers.remove(layer)
        finally:
            self._closing_case = False

    def _open_index_(self, index: int) -> None:
        """Open case ``index`` of ``self._all``: autosave and close the open one first.

        The layers of the case left are reused (:meth:`_reuse_layer`): its image, ground-truth,
        prediction, boxes and clicks layers get the new case's data, names and metadata
        (napari adds a layer far more slowly than it swaps one's data); what the new case
        does not need is closed.
        """
        if self._session is None:
            return
        rec = self._all[index]
        spare: dict[str, Any] = {}
        if self._open_index is not None and self._open_index != index:
            spare = self._leave_open_case(reuse=True)
        for role, layer in self.spare_layers.items():
            if role in spare:
                self._doom([layer])
            else:
                spare[role] = layer
        self._spares = {}
        if any(layer.name == rec.name or layer.name.startswith(rec.name + " ")
               for layer in self._doomed):
            self._remove_doomed()  # back to the case just left: its old layers go first
        from napari.layers import Layer

        from busseg._reader import read_case

        self._closing_case = True  # one list refresh at the end, not one per layer
        pred = image_layer = correction = prefetched = None
        existed = False
        held = self._state.holding_layers() if spare else contextlib.nullcontext()
        try:
            held.__enter__()
            image_layer = find_layer(self._viewer, rec.name, "image")
            if image_layer is None:
                try:
                    layer_data = read_case(
                        rec.image_path, rec.mask_paths, label=rec.label, root=self._root
                    )
                except (OSError, ValueError) as exc:
                    self._notify_error(f"cannot open {rec.image_path.name}: {exc}")
                    return
                for data, kwargs, kind in layer_data:
                    existing = find_layer(self._viewer, kwargs["name"])
                    if existing is not None:
                        if not existing.visible:
                            existing.visible = True
                        continue
                    role = "image" if kind == "image" else "ground truth"
                    if self._reuse_layer(spare.pop(role, None), data, kwargs) is None:
                        layer = self._viewer.add_layer(Layer.create(data, kwargs, kind))
                        if role == "ground truth":  # just above the image, below the rest
                            self._place_above(layer, find_layer(self._viewer, rec.name))
                image_layer = find_layer(self._viewer, rec.name, "image")
            for layer in self._case_layers(rec.name):
                if not layer.visible:  # napari redraws on every visible set
                    layer.visible = True
            if self._session.current is None or self._session.current.index != index:
                self._session.open(index)
            self._open_index = index
            if self._prefetch_index != index:
                self._session.cancel_prefetch()  # guesses queued for other cases give up
            pred = find_layer(self._viewer, prediction_name(rec.name), "labels")
            existed = pred is not None
            correction = self._session.current.correction
            if pred is None and correction is not None:
                pred = self._show_prediction(rec, correction.astype(np.uint8), spare)
            if pred is None and self._predict_check.value and image_layer is not None:
                prefetched = self._cached_prediction(index)
                if prefetched is not None:  # predicted in the background: shown at once
                    pred = self._show_prediction(rec, prefetched, spare)
            if image_layer is not None:
                self._reuse_prompts(spare, image_layer)
        finally:
            self._closing_case = False
            keep = spare.pop("prediction", None)
            if keep is not None and self._predict_check.value and pred is None:
                self._keep_spare("prediction", keep)  # for the prediction on its way
            elif keep is not None:
                spare["prediction"] = keep
            self._doom(list(spare.values()))  # what the new case did not take over
            held.__exit__(None, None, None)
        active = pred if pred is not None else image_layer
        if active is not None:
            self._viewer.layers.selection.active = active
        self._viewer.reset_view()
        self._refresh_list()
        status = self.status_of(rec)
        if self._session.store is not None and self._session.is_recorded(index):
            label = self._session.correction_label(index)
            status += (" (no lesion)" if label == "normal" and status != "normal"
                       and not correction.any() else "")
            status += "; the stored mask is loaded"
        self._status.value = f"{rec.rel_path}: {status}"
        if not self._predict_check.value or image_layer is None:
            return
        if prefetched is not None:
            self._status.value = f"{rec.rel_path}: predicted; correct it, then move on (saved)."
        elif existed:
            self._notify_info(f"'{prediction_name(rec.name)}' exists and is kept "
                        "(it may hold your edits).")
        elif pred is None:
            self._start_prediction(index)
            return  # the next case is prefetched once this one is predicted
        self._schedule_prefetch()

    @property
    def spare_layers(self) -> dict[str, Any]:
        """The hidden layers made ahead for the next case to take over, by role."""
        self._spares = {k: v for k, v in self._spares.items() if v in self._viewer.layers}
        return dict(self._spares)

    def _warm_up(self) -> None:
        """Add the (transparent) layers the first case will take over (see :attr:`warm_up`).

        napari creates and first draws the first layer of each kind far more slowly than
        later ones (its controls, its canvas visual and shaders); paying that when the folder
        is chosen, while the model loads in the background, makes the first Open nearly as
        fast as a Next. The spares are visible with opacity 0 so that the canvas draws them
        (compiling their shaders) before the first Open; Segment lesions never offers them.
        """
        if (not self.warm_up or self._open_index is not None or self.spare_layers
                or not self._predict_check.value or self._viewer_closing):
            return

        def meta(role: str) -> dict:
            return {"busseg": {"kind": SPARE, "role": role}}

        def prompt_meta(kind: str) -> dict:
            return {"busseg": {"kind": kind, "written_by": SEGMENT_WRITTEN_BY,
                               "image": f"{SPARE} image", "spare": True}}

        tiny = np.zeros((2, 2), np.uint8)
        active = self._viewer.layers.selection.active
        self._closing_case = True
        try:
            with self._state.holding_layers():
                v = self._viewer
                self._spares["image"] = v.add_image(
                    tiny, name=f"{SPARE} image", colormap="gray", contrast_limits=(0, 255),
                    opacity=0.0, metadata=meta("image"))
                if any(r.mask_paths for r in self._all[:50]):
                    self._spares["ground truth"] = v.add_labels(
                        tiny, name=f"{SPARE} ground truth", opacity=0.0,
                        metadata=meta("ground truth"))
                self._spares["prediction"] = v.add_labels(
                    tiny, name=f"{SPARE} prediction", opacity=0.0,
                    metadata=meta("prediction"))
                if self._state.offers("segment"):  # Segment lesions adds prompt layers
                    self._spares["boxes"] = v.add_shapes(
                        ndim=2, name=f"{SPARE}{BOXES_SUFFIX}", edge_color="yellow",
                        face_color="transparent", opacity=0.0,
                        metadata=prompt_meta("box prompts"))
                    self._spares["clicks"] = v.add_points(
                        ndim=2, name=f"{SPARE}{CLICKS_SUFFIX}", face_color=CLICK_COLOURS[1],
                        border_color="white", features={"label": np.zeros(0, np.int8)},
                        feature_defaults={"label": 1}, opacity=0.0,
                        metadata=prompt_meta("click prompts"))
                    self._spares["boxes"].mode = "add_rectangle"
                    self._spares["clicks"].mode = "add"
        finally:
            self._closing_case = False
        # the layers themselves, not napari's proxies of them (compared with ``is``)
        self._spares = {k: getattr(v, "__wrapped__", v) for k, v in self._spares.items()}
        if active is not None and active in self._viewer.layers:
            self._viewer.layers.selection.active = active
        else:  # no hidden spare is active (a click would land in it)
            self._viewer.layers.selection.clear()

    def _reuse_layer(self, layer: Any, data: np.ndarray, kwargs: dict) -> Any:
        """Give ``layer`` (a layer of the case left) new data, name and metadata.

        Parameters
        ----------
        layer : napari.layers.Image or napari.layers.Labels or None
            The layer to reuse; None: nothing is done.
        data : numpy.ndarray
            The new data (same number of dimensions, else the layer is not reused).
        kwargs : dict
            Layer keyword arguments as :func:`busseg._reader.read_case` returns them
            (``name``, ``metadata``, ``contrast_limits``, ``colormap``, ``opacity``).

        Returns
        -------
        napari layer or None
            ``layer``, or None when it was not reused (the caller adds a new layer then).
            A Labels layer's undo history is emptied: Ctrl+Z never reaches into the case left.
        """
        if layer is None or np.ndim(data) != layer.ndim:
            return None
        from napari.layers import Labels

        if find_layer(self._viewer, kwargs["name"]) is not None:
            return None
        ndim = layer.ndim
        if not np.array_equal(layer.scale, kwargs.get("scale", (1.0,) * ndim)):
            layer.scale = kwargs.get("scale", (1.0,) * ndim)
        if not np.array_equal(layer.translate, kwargs.get("translate", (0.0,) * ndim)):
            layer.translate = kwargs.get("translate", (0.0,) * ndim)
        if isinstance(layer, Labels):
            layer.data = data
            reset = getattr(layer, "_reset_history", None)
            if reset is not None:
                reset()  # napari keeps the undo history across a data swap
        else:
            limits = kwargs.get("contrast_limits")
            layer.data = data
            if limits is not None:
                limits = [float(v) for v in limits]
                if [float(v) for v in layer.contrast_limits_range] != limits:
                    layer.contrast_limits_range = limits
                if [float(v) for v in layer.contrast_limits] != limits:
                    layer.contrast_limits = limits
            colormap = kwargs.get("colormap")
            if colormap is not None and getattr(layer.colormap, "name", None) != colormap:
                layer.colormap = colormap
        opacity = kwargs.get("opacity", 1.0)  # napari's default (a spare's is 0)
        if layer.opacity != opacity:
            layer.opacity = opacity
        layer.metadata = dict(kwargs.get("metadata") or {})
        layer.name = kwargs["name"]
        if not layer.visible:
            layer.visible = True
        return layer

    def _keep_spare(self, role: str, layer: Any) -> None:
        """Keep ``layer`` hidden as a spare for ``role`` (the next layer of that kind)."""
        layer = getattr(layer, "__wrapped__", layer)
        layer.visible = False
        layer.metadata = {"busseg": {"kind": SPARE, "role": role}}
        name = f"{SPARE} {role}"
        if find_layer(self._viewer, name) is None:
            layer.name = name
        self._spares[role] = layer

    def _show_prediction(self, rec: BusiRecord, data: np.ndarray, spare: dict) -> Any:
        """Show ``data`` as case ``rec``'s prediction layer, reusing the spare one if any."""
        data = np.asarray(data, dtype=np.uint8)
        kwargs = {"name": prediction_name(rec.name), "opacity": 0.5,
                  "metadata": {"busseg": self._prediction_meta(rec, data)}}
        layer = self._reuse_layer(spare.pop("prediction", None), data, kwargs)
        if layer is None:
            layer = self._add_prediction_layer(rec, data)
        return layer

    def _reuse_prompts(self, spare: dict, image: Any) -> None:
        """Hand the case left's boxes and clicks layers to ``image`` (emptied)."""
        boxes, clicks = spare.get("boxes"), spare.get("clicks")
        if boxes is None and clicks is None:
            return
        if boxes is not None and find_layer(self._viewer, image.name + " boxes") is None:
            spare.pop("boxes")
        else:
            boxes = None
        if clicks is not None and find_layer(self._viewer, image.name + " clicks") is None:
            spare.pop("clicks")
        else:
            clicks = None
        if (boxes is not None or clicks is not None) and all(
                lay is None or lay.ndim == image.ndim for lay in (boxes, clicks)):
            reuse_prompt_layers(self._viewer, boxes, clicks, image)
        else:  # another dimensionality: closed, Segment lesions adds fitting ones
            for lay in (boxes, clicks):
                if lay is not None:
                    spare[lay.name] = lay

    def _prediction_meta(self, rec: BusiRecord, data: np.ndarray) -> dict:
        """Metadata (``"busseg"`` key) of a prediction layer the browser writes."""
        return {
            "kind": "prediction",
            "written_by": WRITTEN_BY,
            "name": rec.name,
            "image": rec.name,
            "label": rec.label,
            "source": str(rec.image_path),
            "root": str(self._root) if self._root else None,
            "session_fp": mask_fingerprint(data),
            # Segment lesions' record of an unedited output: Run/G replaces it without asking
            "written_sha1": data_sha1(data),
        }

    def _add_prediction_layer(self, rec: BusiRecord, data: np.ndarray) -> Any:
        data = np.asarray(data, dtype=np.uint8)
        meta = self._prediction_meta(rec, data)
        layer = self._viewer.add_labels(data, name=prediction_name(rec.name), opacity=0.5,
                                        metadata={"busseg": meta})
        self._below_prompts(layer, rec.name)
        return layer

    def _place_above(self, layer: Any, below: Any) -> None:
        """Move ``layer`` just above ``below`` in the layer list (when both are there)."""
        layers = self._viewer.layers
        if below is None or layer not in layers or below not in layers:
            return
        src, dest = layers.index(layer), layers.index(below) + 1
        if src not in (dest, dest - 1):
            layers.move(src, dest)  # napari: inserted before the layer now at ``dest``

    def _below_prompts(self, layer: Any, name: str) -> None:
        """Move ``layer`` just below case ``name``'s boxes and clicks layers (prompts on top)."""
        layers = self._viewer.layers
        idx = [layers.index(lay) for lay in (find_layer(self._viewer, name + " boxes"),
                                              find_layer(self._viewer, name + " clicks"))
               if lay is not None]
        if idx and layers.index(layer) > min(idx):
            layers.move(layers.index(layer), min(idx))

