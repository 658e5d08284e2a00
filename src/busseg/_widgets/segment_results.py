"""Output layers of "Segment lesions": the prediction and probability layers and the Dice row.

The output is an editable Labels layer ``"<image name> prediction"`` (1 = lesion) and,
optionally, an Image layer ``"<image name> probability"``. A prediction layer the user has
edited is never overwritten silently: the widget stores a hash of what it wrote in
``layer.metadata["busseg"]["written_sha1"]``; when the layer's data no longer match,
``ask_overwrite`` asks whether to replace it, write a new layer (``"<image name> prediction
[2]"``) or cancel. :class:`ResultsMixin` is that part of
:class:`busseg._widgets.segment.SegmentWidget`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from busseg.layers import (
    META_KEY,
    SEGMENT_WRITTEN_BY,
    busseg_metadata,
    data_sha1,
    find_layer,
    ground_truth_name,
    prediction_name,
    spatial_shape,
)
from busseg.settings import InferenceSettings

if TYPE_CHECKING:  # pragma: no cover
    from busseg.jobs import SegmentResult

__all__ = ["CANCEL", "CLASS_NOTE", "DEFAULT_MODEL", "NEW_LAYER", "PREDICTION_COLOUR", "REPLACE",
           "ResultsMixin", "RunRecord", "format_classes", "prediction_colours"]

WRITTEN_BY = SEGMENT_WRITTEN_BY
#: Model choice of the widget meaning the shipped default checkpoint.
DEFAULT_MODEL = "shipped default"
#: Answers of ``SegmentWidget.ask_overwrite``.
REPLACE, NEW_LAYER, CANCEL = "replace", "new layer", "cancel"
#: The lesion probabilities are research output: shown with this note wherever they appear.
CLASS_NOTE = "research output, not a diagnosis"

#: Colour of lesion pixels (label 1) in prediction layers: distinct from the reader's
#: ground-truth layers, which use napari's automatic label colours.
PREDICTION_COLOUR = "#00c8ff"


def prediction_colours(layer: Any) -> None:
    """Show label 1 of a prediction layer in :data:`PREDICTION_COLOUR` (others: auto colours)."""
    from napari.utils.colormaps import DirectLabelColormap

    try:
        layer.colormap = DirectLabelColormap(
            color_dict={None: "magenta", 0: "transparent", 1: PREDICTION_COLOUR}
        )
    except (TypeError, ValueError, AttributeError):  # pragma: no cover - other napari versions
        pass



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




@dataclass
class RunRecord:
    """What a run of "Segment lesions" needs back on the GUI thread to write its output."""

    image: Any
    image_name: str
    target: str  # layer name to write
    replace_sha1: str | None  # data hash of the layer to replace (None: add a new layer)
    with_proba: bool
    scale: tuple
    translate: tuple
    settings: InferenceSettings
    checkpoint: Path | None  # None: the shipped default model


class ResultsMixin:
    """Writing a run's output layers and the "vs truth" / "class" rows of "Segment lesions"."""

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

    def _meta(self, run: RunRecord, data: np.ndarray, kind: str) -> dict:
        return {
            "written_by": WRITTEN_BY,
            "kind": kind,
            "image": run.image_name,
            "checkpoint": str(run.checkpoint) if run.checkpoint else DEFAULT_MODEL,
            "threshold": run.settings.threshold,
            "written_sha1": data_sha1(data),
        }

    def _write_prediction(self, run: RunRecord, labels: np.ndarray) -> tuple[Any, str]:
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
        prediction_colours(layer)
        self._below_prompts(layer, run.image_name)
        self._viewer.layers.selection.active = layer
        return layer, note

    def _write_probability(self, run: RunRecord, proba: np.ndarray) -> Any:
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
        if tuple(np.shape(truth)) != spatial_shape(layer):
            self._metrics.value = (f"“{gt.name}” has shape {tuple(np.shape(truth))}, the "
                                   f"prediction {spatial_shape(layer)}; no Dice")
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
