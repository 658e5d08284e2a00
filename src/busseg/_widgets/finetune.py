"""The "Fine-tune" dock widget: fine-tune a checkpoint on corrected masks, then segment again.

Training pairs come from the viewer (an Image layer and its corrected Labels layer; "Add pair"
copies the current slice, or every labelled slice of a stack) and/or from a corrections folder
in the BUSI layout (:class:`busseg.corrections.CorrectionStore`). Start runs
:func:`busseg.finetune.finetune_iter` in a napari ``thread_worker``; Stop sets the
``threading.Event`` it checks every step, so the best weights so far are still written. The new
checkpoint (``<output folder>/best``) records its lineage; when it is written it becomes the
viewer's checkpoint (:class:`busseg.state.ViewerState`), which "Segment lesions" follows.

The widget holds no model code; torch loads when training starts.
"""

from __future__ import annotations

import threading
from collections.abc import Generator, Sequence
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
    PushButton,
    Select,
    SpinBox,
)

from busseg._widgets._common import (
    RunStatusMixin,
    connect_layer_changes,
    find_layer,
    prediction_name,
    start_worker,
    wrap_label,
)
from busseg.jobs import slice_crop
from busseg.layers import stack_slices
from busseg.state import viewer_state

if TYPE_CHECKING:  # pragma: no cover
    import napari

    from busseg.finetune import FinetuneResult
    from busseg.finetune_settings import FinetuneSettings

__all__ = [
    "BASE_CHECKPOINT",
    "BASE_DEFAULT",
    "BASE_SEGMENT",
    "FineTuneWidget",
    "Pair",
    "finetune_job",
]

#: Base-model choices.
BASE_SEGMENT = "same as the segment widget"
BASE_DEFAULT = "shipped default"
BASE_CHECKPOINT = "checkpoint folder"
#: Which slices of a stack "Add pair" takes.
SCOPE_CURRENT = "current slice"
SCOPE_LABELLED = "all labelled slices"
#: Default amount per training unit.
_DEFAULT_EPOCHS = 10


@dataclass
class Pair:
    """One training pair copied from the viewer.

    Attributes
    ----------
    name : str
        Shown in the list and recorded in the checkpoint's lineage, e.g. ``"benign (4)"`` or
        ``"stack [z=3]"``.
    key : tuple
        (image layer name, labels layer name, slice index); adding the same key again replaces
        the pair.
    image : numpy.ndarray
        (H, W) grey or (H, W, 3|4) colour, a copy.
    mask : numpy.ndarray
        (H, W) bool, a copy (any label > 0 is lesion).
    """

    name: str
    key: tuple
    image: np.ndarray
    mask: np.ndarray


def finetune_job(
    images: Sequence[np.ndarray],
    masks: Sequence[np.ndarray],
    names: Sequence[str],
    *,
    corrections: str | Path | None = None,
    base: str | Path | None = None,
    settings: FinetuneSettings | None = None,
    overrides: dict | None = None,
    val_fraction: float | None = None,
    augment: bool | None = None,
    out_dir: str | Path | None = None,
    device: str = "auto",
    stop: Any = None,
    recipe: str | None = None,
) -> Generator[Any, None, FinetuneResult]:
    """Collect the pairs and fine-tune, yielding progress (runs in a worker thread).

    Parameters
    ----------
    images, masks, names : sequence
        Pairs from the viewer: (H, W) or (H, W, 3|4) images, (H, W) masks (> 0 = lesion),
        one name each.
    corrections : path, optional
        A corrections folder in the BUSI layout; its pairs
        (:meth:`busseg.corrections.CorrectionStore.load_pairs`) are added.
    base : path, optional
        Checkpoint to start from; None for the shipped default model.
    settings : busseg.finetune.FinetuneSettings, optional
        Everything the fine-tune runs with, passed whole to
        :func:`busseg.finetune.finetune_iter` (the widget resolves it once from its recipe
        and fields). Default: the recipe's settings with ``overrides``.
    overrides : dict, optional
        The older way: settings of :meth:`busseg.finetune.FinetuneSettings.resolve`
        (``max_steps`` or ``epochs``, ``lr``, ``batch_size`` ...) over ``recipe``'s. Not
        together with ``settings``, nor are ``val_fraction``, ``augment`` and ``recipe``.
    val_fraction, augment : optional
        Override the recipe's (the older way, as ``overrides``).
    out_dir, device, stop
        As :func:`busseg.finetune.finetune_iter`.
    recipe : str, optional
        A named recipe (:data:`busseg.finetune.FINETUNE_RECIPES`) whose settings the
        ``overrides`` start from (its replay pairs included); None for the defaults.

    Yields
    ------
    tuple or busseg.engine.ProgressEvent
        ``("status", message)`` while collecting pairs, then the training events.

    Returns
    -------
    busseg.finetune.FinetuneResult

    Raises
    ------
    TypeError
        If ``settings`` comes with ``overrides``, ``val_fraction``, ``augment`` or
        ``recipe``, or an override is not a setting.
    ValueError
        If there is no pair at all, a mask is not its image's size, or a setting is invalid.
    FileExistsError
        If ``out_dir`` exists.
    busseg.models.CheckpointError
        If the base checkpoint cannot be loaded.
    """
    from busseg.finetune import FinetuneSettings, finetune_iter

    legacy = {"overrides": overrides, "val_fraction": val_fraction, "augment": augment,
              "recipe": recipe}
    if settings is None:
        settings = FinetuneSettings.from_parts(recipe, cfg=overrides, val_fraction=val_fraction,
                                               augment=augment)
    elif given := [k for k, v in legacy.items() if v is not None]:
        raise TypeError(f"pass either settings or {', '.join(given)}, not both")
    images, masks, names = list(images), list(masks), list(names)
    if corrections is not None:
        from busseg.corrections import CorrectionStore

        yield ("status", f"reading corrections in {corrections} …")
        ci, cm, cn = CorrectionStore(corrections).load_pairs()
        images += ci
        masks += cm
        names += [f"{Path(corrections).name}/{n}" for n in cn]
        yield ("status", f"{len(ci)} pair(s) from the corrections folder")
    if not images:
        raise ValueError(
            "no training pairs: add pairs from the viewer (Add pair) or choose a corrections "
            "folder that holds corrected cases"
        )
    yield ("status", f"loading the base model; {len(images)} pair(s) …")
    result = yield from finetune_iter(
        images, masks, base, settings=settings, out_dir=out_dir, names=names, device=device,
        stop=stop,
    )
    return result


class FineTuneWidget(RunStatusMixin, Container):
    """Dock widget "Fine-tune": train a checkpoint further on corrected masks.

    Parameters
    ----------
    viewer : napari.viewer.Viewer
        The viewer holding the images and corrected Labels layers.

    Attributes
    ----------
    pairs : list of Pair
        The pairs added from the viewer.
    last_result : busseg.finetune.FinetuneResult or None
        The result of the last finished run (its ``fit.model`` is released).
    """

    def __init__(self, viewer: napari.viewer.Viewer) -> None:
        super().__init__(labels=True)
        from busseg.finetune import (
            DEFAULT_RECIPE,
            FINETUNE_RECIPES,
            FinetuneSettings,
            default_output_dir,
        )

        self._viewer = viewer
        self._state = viewer_state(viewer)
        self._worker = None
        self._stop_event: threading.Event | None = None
        self._run_out: Path | None = None
        self.pairs: list[Pair] = []
        self.last_result: FinetuneResult | None = None
        #: The chosen recipe's settings, resolved once; Start changes the widget's fields
        self._defaults = FinetuneSettings.resolve(DEFAULT_RECIPE)
        train = self._defaults.train

        # --- pairs from the viewer
        self._pair_image = ComboBox(label="image", choices=self._image_choices, nullable=True)
        self._pair_labels = ComboBox(label="corrected mask", choices=self._labels_choices,
                                     nullable=True, tooltip="The corrected Labels layer of "
                                     "the image (any label > 0 is lesion)")
        self._scope = ComboBox(label="stack slices", choices=[SCOPE_CURRENT, SCOPE_LABELLED],
                               value=SCOPE_CURRENT)
        self._add_btn = PushButton(text="Add pair")
        self._remove_btn = PushButton(text="Remove selected")
        self._pair_list = Select(label="pairs", choices=self._pair_choices)
        self._pair_list.native.setMaximumHeight(120)
        self._folder = FileEdit(label="corrections folder", mode="d", nullable=True,
                                tooltip="Optional: a BUSI-layout folder of corrected cases "
                                "(<class>/<name>.png + <name>_mask.png)")
        # --- base model and settings
        self._base = ComboBox(label="base model",
                              choices=[BASE_SEGMENT, BASE_DEFAULT, BASE_CHECKPOINT],
                              value=BASE_SEGMENT)
        self._base_path = FileEdit(label="base checkpoint", mode="d", nullable=True,
                                   enabled=False)
        self._recipe = ComboBox(
            label="recipe", choices=list(FINETUNE_RECIPES), value=DEFAULT_RECIPE,
            tooltip="Named fine-tune settings (busseg.finetune.FINETUNE_RECIPES); choosing one "
            "fills the settings below. The default keeps box and click prompts working "
            "(benchmarks/annotation_loop.py --recipes compares them)")
        self._unit = ComboBox(label="train for", choices=["steps", "epochs"], value="steps")
        self._amount = SpinBox(label="steps", min=1, max=1_000_000,
                               value=int(train.max_steps))
        self._lr = FloatSpinBox(label="learning rate", min=1e-6, max=1.0, step=1e-5,
                                value=float(train.lr))
        self._batch = SpinBox(label="batch size", min=1, max=256, value=int(train.batch_size))
        self._augment = CheckBox(text="augmentation", value=self._defaults.augment)
        self._freeze = CheckBox(
            text="freeze the encoder (faster; the decoder alone adapts)",
            value=bool(train.freeze_encoder),
            tooltip="Off (default): the whole network trains, which is what adapts the model "
            "to a new scanner. On: only the decoder and heads train, about 20 % faster per "
            "step, but on 10 corrected BUS-BRA images it lifted Dice on other patients by "
            "+0.008 against +0.063 for the whole network",
        )
        self._val_fraction = FloatSpinBox(label="held-out fraction", min=0.0, max=0.9,
                                          step=0.05, value=self._defaults.val_fraction,
                                          tooltip="Share of the pairs kept out of training to "
                                          "measure Dice before and after")
        self._out = FileEdit(label="output folder", mode="d", value=default_output_dir(),
                             tooltip="A new folder for the run; if you pick an existing folder, "
                             "the run goes into a new time-stamped folder inside it")
        # --- run
        self._start_btn, self._stop_btn = self._run_controls("Start", "Stop")
        self._live = Label(label="training", value="")
        self._status = Label(label="status", value="add corrected pairs, then Start")
        self._result = Label(label="result", value="")
        for lab in (self._live, self._status, self._result):
            wrap_label(lab)

        self.extend([
            self._pair_image, self._pair_labels, self._scope,
            Container(widgets=[self._add_btn, self._remove_btn], layout="horizontal",
                      labels=False),
            self._pair_list, self._folder, self._base, self._base_path, self._recipe,
            self._unit,
            self._amount, self._lr, self._batch, self._augment, self._freeze,
            self._val_fraction, self._out,
            Container(widgets=[self._start_btn, self._stop_btn], layout="horizontal",
                      labels=False),
            self._progress, self._live, self._status, self._result,
        ])
        self._pair_image.changed.connect(self._on_image_changed)
        self._add_btn.changed.connect(self._on_add_pair)
        self._remove_btn.changed.connect(self._on_remove_pairs)
        self._base.changed.connect(self._on_base_changed)
        self._unit.changed.connect(self._on_unit_changed)
        self._recipe.changed.connect(self._on_recipe_changed)
        self._start_btn.changed.connect(self._on_start)
        self._stop_btn.changed.connect(self._on_stop)
        connect_layer_changes(viewer, self._on_layers_changed)
        self._on_image_changed()

    # ---------------------------------------------------------------- public API

    @property
    def running(self) -> bool:
        """Whether fine-tuning is running."""
        return self._worker is not None

    def base_checkpoint(self) -> Path | None:
        """Return the checkpoint fine-tuning starts from; None for the shipped default.

        Returns
        -------
        pathlib.Path or None
            With "same as the segment widget", that widget's checkpoint (None when it uses
            the shipped default, or when no such widget is open).
        """
        if self._base.value == BASE_CHECKPOINT:
            p = self._base_path.value
            if p is None:
                return None
            p = Path(p).expanduser()
            return p.parent if p.is_file() else p
        if self._base.value == BASE_SEGMENT and self._state.settings is not None:
            return self._state.checkpoint  # chosen in Segment lesions
        return None

    # ---------------------------------------------------------------- layer choices

    def _image_choices(self, _widget: Any = None) -> list[tuple[str, Any]]:
        from napari.layers import Image

        return [(lay.name, lay) for lay in self._viewer.layers if isinstance(lay, Image)]

    def _labels_choices(self, _widget: Any = None) -> list[tuple[str, Any]]:
        from napari.layers import Labels

        return [(lay.name, lay) for lay in self._viewer.layers if isinstance(lay, Labels)]

    def _pair_choices(self, _widget: Any = None) -> list[tuple[str, int]]:
        return [(p.name, i) for i, p in enumerate(self.pairs)]

    def _on_layers_changed(self, _event: Any = None) -> None:
        self._pair_image.reset_choices()
        self._pair_labels.reset_choices()
        self._on_image_changed()

    def _on_image_changed(self, _value: Any = None) -> None:
        """Pre-select the image's prediction layer (the one the user corrects)."""
        image = self._pair_image.value
        if image is None:
            return
        pred = find_layer(self._viewer, prediction_name(image.name), "labels")
        if pred is not None and any(c is pred for c in self._pair_labels.choices):
            self._pair_labels.value = pred

    def _on_base_changed(self, _value: Any = None) -> None:
        self._base_path.enabled = self._base.value == BASE_CHECKPOINT

    def _on_recipe_changed(self, _value: Any = None) -> None:
        from busseg.finetune import FinetuneSettings

        self._defaults = FinetuneSettings.resolve(self._recipe.value)
        train = self._defaults.train
        if self._unit.value == "steps":
            self._amount.value = int(train.max_steps)
        self._lr.value = float(train.lr)
        self._batch.value = int(train.batch_size)
        self._augment.value = self._defaults.augment
        self._freeze.value = bool(train.freeze_encoder)
        self._val_fraction.value = self._defaults.val_fraction

    def _on_unit_changed(self, _value: Any = None) -> None:
        steps = self._unit.value == "steps"
        self._amount.label = "steps" if steps else "epochs"
        self._amount.value = int(self._defaults.train.max_steps) if steps else _DEFAULT_EPOCHS

    # ---------------------------------------------------------------- pairs

    def _slice_indices(self, labels_layer: Any, mask_data: np.ndarray) -> list[tuple]:
        leading = mask_data.shape[:-2]
        if not leading:
            return [()]
        if self._scope.value == SCOPE_LABELLED:
            return [idx for idx in np.ndindex(*leading) if np.any(mask_data[idx])]
        pos = labels_layer.world_to_data(self._viewer.dims.point)
        idx = tuple(
            int(np.clip(round(float(p)), 0, n - 1))
            for p, n in zip(pos[: len(leading)], leading, strict=True)
        )
        return [idx]

    def _on_add_pair(self, _value: Any = None) -> None:
        image, labels = self._pair_image.value, self._pair_labels.value
        if image is None or labels is None:
            self._set_status("choose an Image layer and its corrected Labels layer first")
            return
        img = image.data[0] if image.multiscale else image.data
        lab = labels.data[0] if labels.multiscale else labels.data
        spatial = tuple(img.shape[:-1]) if image.rgb else tuple(img.shape)
        if tuple(lab.shape) != spatial:
            self._set_status(
                f"“{labels.name}” has shape {tuple(lab.shape)} but “{image.name}” has "
                f"{spatial}; choose the mask that belongs to the image"
            )
            return
        indices = self._slice_indices(labels, np.asarray(lab))
        if not indices:
            self._set_status(f"no slice of “{labels.name}” has any label; paint the lesions "
                             "first, or add the current slice")
            return
        records = stack_slices(image)  # a padded stack from the folder reader, or None
        added = 0
        for idx in indices:
            key = (image.name, labels.name, idx)
            suffix = "" if idx == () else " [" + ",".join(str(i) for i in idx) + "]"
            name = f"{image.name}{suffix}"
            im, m = np.array(img[idx]), np.asarray(lab[idx]) > 0
            crop = slice_crop(records, idx[0]) if records else None
            if crop is not None:  # drop the zero padding of the stack
                im, m = im[: crop[0], : crop[1]].copy(), m[: crop[0], : crop[1]].copy()
                name = f"{records[idx[0]].get('name', name)}{suffix}"
            pair = Pair(name, key, im, m)
            self.pairs = [p for p in self.pairs if p.key != key] + [pair]
            added += 1
        self._pair_list.reset_choices()
        self._set_status(f"added {added} pair(s); {len(self.pairs)} in the list")

    def _on_remove_pairs(self, _value: Any = None) -> None:
        chosen = set(self._pair_list.value or [])
        if not chosen:
            self._set_status("select pairs in the list to remove them")
            return
        self.pairs = [p for i, p in enumerate(self.pairs) if i not in chosen]
        self._pair_list.reset_choices()
        self._set_status(f"{len(self.pairs)} pair(s) in the list")

    # ---------------------------------------------------------------- run

    def _output_dir(self) -> tuple[Path, str]:
        from busseg.finetune import default_output_dir

        out = self._out.value
        if out is None or str(out).strip() in ("", "."):
            return default_output_dir(), ""
        out = Path(out).expanduser()
        if out.exists():
            new = default_output_dir(out)
            return new, f" ({out} exists, so the run goes into {new.name} inside it)"
        return out, ""

    def _settings(self) -> FinetuneSettings:
        """Return the chosen recipe's settings with the widget's fields."""
        unit = "max_steps" if self._unit.value == "steps" else "epochs"
        return self._defaults.replace(
            lr=float(self._lr.value), batch_size=int(self._batch.value),
            freeze_encoder=bool(self._freeze.value), val_fraction=float(self._val_fraction.value),
            augment=bool(self._augment.value), **{unit: int(self._amount.value)})

    def _on_start(self, _value: Any = None) -> None:
        if self.running:
            return
        folder = self._folder.value
        folder = None if folder is None or str(folder).strip() in ("", ".") else Path(folder)
        if not self.pairs and folder is None:
            self._set_status("add corrected pairs (Add pair) or choose a corrections folder "
                             "first")
            return
        if self._base.value == BASE_CHECKPOINT and self._base_path.value is None:
            self._set_status(f"choose the base checkpoint folder, or switch to '{BASE_DEFAULT}'")
            return
        try:
            settings = self._settings()
        except (TypeError, ValueError) as exc:
            self._set_status(f"error: {exc}")
            return
        out, note = self._output_dir()
        base = self.base_checkpoint()
        self._stop_event = threading.Event()
        job = finetune_job(
            [p.image for p in self.pairs], [p.mask for p in self.pairs],
            [p.name for p in self.pairs], corrections=folder, base=base, settings=settings,
            out_dir=out, stop=self._stop_event,
        )
        self._worker = start_worker(job, yielded=self._on_yielded, returned=self._on_returned,
                                    errored=self._on_errored, finished=self._on_finished,
                                    start=False)
        self._run_out = out
        self._start_btn.enabled = False
        self._stop_btn.enabled = True
        self._progress.max, self._progress.value = 0, 0
        self._live.value = ""
        self._result.value = ""
        where = "the shipped default model" if base is None else str(base)
        self._set_status(f"fine-tuning {where} into {out}{note} …")
        self._worker.start()

    def _on_stop(self, _value: Any = None) -> None:
        if self._stop_event is not None and self.running:
            self._stop_event.set()
            self._stop_btn.enabled = False
            self._set_status("stopping after the current step; the best weights so far are "
                             "written …")

    def _on_yielded(self, item: Any) -> None:
        if isinstance(item, tuple):
            self._set_status(item[1])
            return
        ev = item  # busseg.engine.ProgressEvent
        self._progress.max = max(int(ev.total_steps), 1)
        self._progress.value = min(int(ev.step), self._progress.max)
        if ev.kind in ("start", "end"):
            self._set_status(ev.message)
            return
        text = f"step {ev.step}/{ev.total_steps}"
        if ev.loss is not None:
            text += f", loss {ev.loss:.3f}"
        if ev.best_val_dice is not None:
            text += f", best held-out Dice {ev.best_val_dice:.3f}"
        if ev.kind == "eval" and ev.val_dice is not None and np.isfinite(ev.val_dice):
            text += f" (now {ev.val_dice:.3f})"
        self._live.value = text

    def _on_returned(self, result: FinetuneResult) -> None:
        from busseg.finetune import default_output_dir

        result.fit.model = None  # free the trained copy; the checkpoint is on disk
        self.last_result = result
        fit = result.fit
        if result.dice_before is not None and result.dice_after is not None:
            dice = (f"held-out Dice {result.dice_before:.3f} → {result.dice_after:.3f} "
                    f"({result.n_val} held-out pair(s), {result.n_train} trained on)")
        else:
            dice = (f"trained on {result.n_train} pair(s); no held-out pair (needs at least 2 "
                    "pairs and a held-out fraction > 0) to measure Dice")
        how = "stopped" if fit.stopped else "done"
        if result.checkpoint is None:
            self._result.value = f"{how} after {fit.steps} steps; nothing was written"
            return
        switched = ""
        if self._state.settings is not None:  # Segment lesions is open: it follows the state
            switched = "; “Segment lesions” now uses it"
        self._state.checkpoint = result.checkpoint
        self._result.value = (f"{how} after {fit.steps} steps in {fit.elapsed:.0f} s; {dice}. "
                              f"Checkpoint: {result.checkpoint}{switched}")
        self._out.value = default_output_dir(Path(self._run_out).parent)

    def _on_finished(self) -> None:
        self._stop_event = None
        self._end_run(self._start_btn, self._stop_btn)
