"""Fine-tuning a checkpoint on a user's corrected masks (the napari widget and the benchmarks).

The loop that matters: segment, correct by hand, fine-tune, segment the next images better.
This module turns corrected (image, mask) pairs into training and held-out sets, runs the one
training loop (:func:`busseg.engine.fit_iter`) from a base checkpoint, and writes a new
checkpoint that records its lineage (base model and the pairs used). It never writes over the
base checkpoint or an existing folder.

Recipes: a fine-tune on a few corrections from a new site raises the automatic Dice
there but can cost the model some of its box-and-click skill. :data:`FINETUNE_RECIPES` names
complete settings to compare (``benchmarks/annotation_loop.py --recipes``) on both numbers:
lower learning rates, correction rounds in the prompt simulation, a replay of shipped BUSI
training pairs beside the corrections (:func:`replay_pairs`) and L2-SP towards the base
weights (Li et al., ICML 2018; ``TrainConfig.l2sp_alpha``). :data:`FINETUNE_DEFAULTS` is the
one chosen; :func:`heldout_costs` gives the simulated annotation cost of two models on the
held-out corrections (learning as you go adopts on it). The recipes and
:class:`FinetuneSettings` (a recipe resolved once, with overrides, and passed whole to
:func:`finetune_iter`) live in :mod:`busseg.finetune_settings`; this module re-exports them.
"""

from __future__ import annotations

import datetime as _dt
import os
from collections.abc import Generator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from busseg.engine import FitResult, ProgressEvent, TrainConfig
from busseg.finetune_settings import (
    DEFAULT_RECIPE,
    FINETUNE_DEFAULTS,
    FINETUNE_RECIPES,
    MAX_REPLAY,
    SETTINGS_KEYS,
    SITE_RECIPE,
    FinetuneSettings,
    recipe_settings,
)

__all__ = [
    "DEFAULT_RECIPE",
    "FINETUNE_DEFAULTS",
    "FINETUNE_RECIPES",
    "MAX_REPLAY",
    "MIN_PROMPT_EVIDENCE",
    "PROMPT_MARGIN",
    "REPLAY_DIR",
    "SETTINGS_KEYS",
    "SITE_RECIPE",
    "FinetuneResult",
    "FinetuneSettings",
    "default_output_dir",
    "finetune",
    "finetune_config",
    "finetune_iter",
    "heldout_costs",
    "later_split",
    "lesions_kept",
    "prompt_costs",
    "prompts_from_adapted",
    "recipe_settings",
    "replay_pairs",
    "split_pairs",
]

#: Where the shipped replay pairs live (see its README for source, citation and licence).
REPLAY_DIR = Path(__file__).resolve().parent / "replay"


def replay_pairs(n: int | None = None) -> tuple[list[np.ndarray], list[np.ndarray], list[str]]:
    """Load shipped BUSI training pairs to replay beside a user's corrections.

    The replay set (``busseg/replay``, built by ``training/make_replay_set.py``) holds 30
    lesion images of the **train** split of BUSI (15 benign, 15 malignant; Al-Dhabyani et al.,
    Data in Brief 28, 2020, 104863, CC BY 4.0 / CC0 1.0: see its README), downsized to a
    longest side of 224 pixels. Mixing a few of the base model's own training pairs into a
    fine-tune ("rehearsal", Robins 1995) keeps what the model learned about box and click
    prompts while it adapts to a new site.

    Parameters
    ----------
    n : int, optional
        How many pairs (0 <= n <= 30), alternating benign and malignant in the manifest's
        seeded order, so any ``n`` is balanced; None for all.

    Returns
    -------
    images : list of numpy.ndarray
        (H, W) uint8 grey images.
    masks : list of numpy.ndarray
        (H, W) bool lesion masks (never empty).
    names : list of str
        ``"replay:benign/benign (15).png"`` ...

    Raises
    ------
    ValueError
        If ``n`` is negative or more than the shipped pairs.
    FileNotFoundError
        If the replay files are missing from the installation (reinstall napari-busseg).
    """
    import csv

    from busseg.data import read_image, read_mask

    manifest = REPLAY_DIR / "manifest.csv"
    if not manifest.is_file():
        raise FileNotFoundError(f"the busseg replay set is missing from {REPLAY_DIR}; "
                                "reinstall napari-busseg")
    with open(manifest, newline="") as f:
        rows = list(csv.DictReader(f))
    by_class = [[r for r in rows if r["label"] == c] for c in ("benign", "malignant")]
    order = [r for pair in zip(*by_class, strict=False) for r in pair]
    order += [r for group in by_class for r in group[len(order) // 2:]]  # unequal classes
    total = len(order)
    if n is None:
        n = total
    if not 0 <= n <= total:
        raise ValueError(f"replay must be between 0 and {total} pairs, got {n}")
    images, masks, names = [], [], []
    for r in order[:n]:
        path = REPLAY_DIR / r["image"]
        images.append(read_image(path))
        masks.append(read_mask(path.with_name(path.stem + "_mask.png")))
        names.append(f"replay:{r['image']}")
    return images, masks, names


def finetune_config(recipe: str | None = None, **overrides: Any) -> TrainConfig:
    """Return the :class:`~busseg.engine.TrainConfig` of fine-tuning, with optional overrides.

    The ``train`` part of :meth:`FinetuneSettings.resolve` ``(recipe, **overrides)``: use
    that to get the held-out share, augmentation and replay of the recipe too.

    Parameters
    ----------
    recipe : str, optional
        A key of :data:`FINETUNE_RECIPES` to start from; None for :data:`FINETUNE_DEFAULTS`.
    **overrides
        Any ``TrainConfig`` field (``max_steps``, ``epochs``, ``lr``, ``batch_size`` ...).
        Passing ``epochs`` without ``max_steps`` trains for that many epochs instead. Other
        keys (a widget's ``val_fraction`` ...) are ignored.

    Returns
    -------
    TrainConfig
        Validation every ``max(1, max_steps // 10)`` steps, no early stopping by default.

    Raises
    ------
    ValueError
        If ``recipe`` is unknown or a setting is invalid.
    """
    keys = set(TrainConfig.__dataclass_fields__)
    train = {k: v for k, v in overrides.items() if k in keys}
    return FinetuneSettings.resolve(recipe, **train).train


def split_pairs(n: int, val_fraction: float = 0.2, seed: int = 0,
                strata: Sequence[bool] | None = None) -> tuple[list[int], list[int]]:
    """Choose the indices of the pairs to train on and to hold out.

    Parameters
    ----------
    n : int
        Number of corrected pairs (>= 1).
    val_fraction : float
        Share held out for validation, in [0, 1). At least one pair is held out when
        ``val_fraction > 0`` and ``n >= 2``; at least one is always trained on.
    seed : int
        Seed of the permutation.
    strata : sequence of bool, optional
        (n,) True for pairs whose mask has a lesion. The held-out pairs are then drawn from
        both kinds in proportion, with at least one lesion pair whenever two or more pairs
        have a lesion: a held-out set of normal scans only would reward a model that has
        learned to predict nothing.

    Returns
    -------
    train, val : list of int
        Sorted indices.

    Raises
    ------
    ValueError
        If ``n < 1`` or ``val_fraction`` is outside [0, 1).
    """
    if n < 1:
        raise ValueError("fine-tuning needs at least one corrected image/mask pair")
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    k = int(round(n * val_fraction))
    if val_fraction > 0 and n >= 2:
        k = max(1, k)
    k = min(k, n - 1)
    rng = np.random.default_rng(seed)
    if strata is None or k == 0:
        perm = rng.permutation(n)
        return sorted(int(i) for i in perm[k:]), sorted(int(i) for i in perm[:k])
    if len(strata) != n:
        raise ValueError(f"strata has {len(strata)} entries for {n} pairs")
    lesion = [i for i in range(n) if strata[i]]
    other = [i for i in range(n) if not strata[i]]
    k_lesion = int(round(k * len(lesion) / n))
    if len(lesion) >= 2:
        k_lesion = max(1, k_lesion)
    k_lesion = min(k_lesion, len(lesion), k)
    k_other = min(k - k_lesion, len(other))
    val = [lesion[i] for i in rng.permutation(len(lesion))[:k_lesion]]
    val += [other[i] for i in rng.permutation(len(other))[:k_other]]
    return sorted(set(range(n)) - set(val)), sorted(val)


def later_split(has_lesion: Sequence[bool], fraction: float = 0.2, *, minimum: int = 2,
                maximum: int | None = 12) -> tuple[list[int], list[int]]:
    """Hold out the most recent answers (leave-later-out) for a fine-tune on a site's stream.

    A model adapted to a site is judged on the scans that come next, so the held-out pairs
    are the latest ones recorded, not a random draw: a random draw would reward memorising
    neighbours of the training scans. When the latest window holds no lesion but an earlier
    pair does, the most recent lesion pair is held out too (a held-out set of normal scans
    alone rewards a model that predicts nothing).

    Parameters
    ----------
    has_lesion : sequence of bool
        (n,) per recorded pair in the order recorded, True when its mask has a lesion.
    fraction : float
        Share held out, in (0, 1).
    minimum, maximum : int
        Bounds on the held-out count before the lesion rule (``maximum`` None: no bound);
        at least one pair is always trained on.

    Returns
    -------
    train, val : list of int
        Sorted positions.

    Raises
    ------
    ValueError
        If fewer than two pairs are given or ``fraction`` is outside (0, 1).
    """
    n = len(has_lesion)
    if n < 2:
        raise ValueError(f"a held-out split needs at least 2 recorded pairs, got {n}")
    if not 0 < fraction < 1:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    k = max(int(minimum), int(round(n * fraction)))
    if maximum is not None:
        k = min(k, int(maximum))
    k = max(1, min(k, n - 1))
    val = list(range(n - k, n))
    if not any(has_lesion[i] for i in val):
        earlier = [i for i in range(n - k) if has_lesion[i]]
        if earlier and n - k > 1:
            val = [earlier[-1], *val]
    train = [i for i in range(n) if i not in set(val)]
    return train, sorted(val)


def default_output_dir(root: str | os.PathLike | None = None) -> Path:
    """Return a new, time-stamped folder for a fine-tuned checkpoint.

    Parameters
    ----------
    root : path, optional
        Parent folder; default ``~/.busseg/finetuned`` (``BUSSEG_HOME`` overrides ``~/.busseg``).

    Returns
    -------
    pathlib.Path
        ``root/finetune-YYYYmmdd-HHMMSS`` (with a numeric suffix if that exists already).
    """
    if root is None:
        root = Path(os.environ.get("BUSSEG_HOME", Path.home() / ".busseg")) / "finetuned"
    root = Path(root)
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = root / f"finetune-{stamp}"
    i = 1
    while out.exists():
        out = root / f"finetune-{stamp}-{i}"
        i += 1
    return out


@dataclass
class FinetuneResult:
    """What :func:`finetune_iter` returns.

    Attributes
    ----------
    checkpoint : pathlib.Path or None
        The new checkpoint folder (``out_dir/best``), None if nothing was written.
    fit : FitResult
        The engine's result (the trained model is ``fit.model``).
    dice_before, dice_after : float or None
        Mean Dice of the base and the fine-tuned model on the held-out pairs (None without
        held-out pairs).
    n_train, n_val : int
        The user's pairs trained on and held out (replay pairs not counted).
    extra : dict
        ``heldout`` (mean / lesion Dice and normal FP rate before and after),
        ``train_indices`` and ``val_indices`` (positions in the ``images`` given, sorted)
        and ``n_replay`` (shipped pairs trained on beside them).
    """

    checkpoint: Path | None
    fit: FitResult
    dice_before: float | None
    dice_after: float | None
    n_train: int
    n_val: int
    extra: dict = field(default_factory=dict)


def finetune_iter(
    images: Sequence[np.ndarray],
    masks: Sequence[np.ndarray],
    base: str | os.PathLike | None = None,
    *,
    settings: FinetuneSettings | None = None,
    cfg: TrainConfig | None = None,
    val_fraction: float | None = None,
    augment: bool | None = None,
    out_dir: str | os.PathLike | None = None,
    names: Sequence[str] | None = None,
    device: str = "auto",
    stop: Any = None,
    recipe: str | None = None,
    replay: int | None = None,
    val_indices: Sequence[int] | None = None,
) -> Generator[ProgressEvent, None, FinetuneResult]:
    """Fine-tune a checkpoint on corrected pairs, yielding progress; return the new checkpoint.

    Parameters
    ----------
    images : sequence of numpy.ndarray
        (H, W) grey or (H, W, 3|4) colour images (uint8, uint16 or float), any sizes.
    masks : sequence of numpy.ndarray
        (H, W) corrected masks, > 0 = lesion, each its image's size.
    base : path, optional
        Checkpoint to start from; None for the shipped default model.
    settings : FinetuneSettings, optional
        Everything the fine-tune runs with (:meth:`FinetuneSettings.resolve`), used whole:
        the training loop's ``TrainConfig``, the held-out share, the augmentation and the
        replayed pairs (added to the pairs trained on, never held out: the held-out split is
        drawn from the user's pairs alone, so the held-out Dice measures the user's site).
        Its ``recipe`` goes into the checkpoint's lineage. Default: the recipe's settings.
    cfg, val_fraction, augment, recipe, replay : optional
        The older way to give the settings, folded into one by
        :meth:`FinetuneSettings.from_parts` (``cfg`` a ``TrainConfig`` used whole, the others
        overriding the recipe's; ``recipe`` a key of :data:`FINETUNE_RECIPES`, None for
        :data:`FINETUNE_DEFAULTS`). Not together with ``settings``.
    out_dir : path, optional
        Run folder to create (default :func:`default_output_dir`); must not exist.
    names : sequence of str, optional
        A name per pair (file or layer name), recorded in the checkpoint's lineage.
    device : str
        ``"auto"``, ``"cuda"``, ``"mps"`` or ``"cpu"``.
    stop : threading.Event, optional
        Set it to stop early; the best weights so far are still written.
    val_indices : sequence of int, optional
        Hold out exactly these pairs (positions in ``images``) instead of a random draw of
        ``val_fraction``: learning as you go holds out the most recent answers
        (leave-later-out, :func:`later_split`). At least one pair must remain to train on.

    Yields
    ------
    ProgressEvent
        As :func:`busseg.engine.fit_iter`; the ``start`` event's message also gives the
        held-out Dice of the base model.

    Returns
    -------
    FinetuneResult

    Raises
    ------
    TypeError
        If ``settings`` comes with any of ``cfg``, ``val_fraction``, ``augment``, ``recipe``
        or ``replay``.
    ValueError
        If there are no pairs, lengths differ, a mask is not its image's size, or a setting
        is invalid.
    FileExistsError
        If ``out_dir`` exists.
    busseg.models.CheckpointError
        If ``base`` cannot be loaded.
    """
    from busseg.data.dataset import SegmentationDataset
    from busseg.data.transforms import Augment
    from busseg.devices import get_device
    from busseg.engine import fit_iter
    from busseg.models import default_checkpoint_path, load_checkpoint

    settings = _one_settings(settings, recipe=recipe, cfg=cfg, val_fraction=val_fraction,
                             augment=augment, replay=replay)
    if len(images) != len(masks):
        raise ValueError(f"{len(images)} images but {len(masks)} masks")
    cfg, aug, n_replay = settings.train, settings.augment, settings.replay
    names = list(names) if names is not None else [f"pair {i}" for i in range(len(images))]
    tr, va = _train_val(masks, settings.val_fraction, cfg.seed, val_indices)
    r_images, r_masks, r_names = replay_pairs(n_replay) if n_replay else ([], [], [])
    base_path = Path(base) if base is not None else default_checkpoint_path()
    dev = get_device(device)
    model, base_cfg = load_checkpoint(base_path, device=dev)
    size = tuple(base_cfg["preprocessing"]["input_size"])
    train_set = SegmentationDataset([images[i] for i in tr] + r_images,
                                    [masks[i] for i in tr] + r_masks, size,
                                    Augment() if aug else None,
                                    names=[names[i] for i in tr] + r_names, seed=cfg.seed)
    val_set = (SegmentationDataset([images[i] for i in va], [masks[i] for i in va], size,
                                   names=[names[i] for i in va]) if va else None)
    before, heldout = _evaluate_before(model, val_set, dev, cfg)
    out = Path(out_dir) if out_dir is not None else default_output_dir()
    if out.exists():
        raise FileExistsError(f"{out} exists; fine-tuning writes a new folder, choose another")
    ckpt_cfg = _checkpoint_config(base_cfg, base_path, settings.recipe, aug, before,
                                  [names[i] for i in tr], [names[i] for i in va], r_names)
    gen = fit_iter(model, train_set, val_set, cfg, device=dev, stop=stop, out_dir=out,
                   checkpoint_config=ckpt_cfg)
    fit = yield from _with_before(gen, before)
    after = fit.best_val_dice if val_set is not None else None
    ckpt = fit.checkpoint  # the engine writes out/best whenever a step was taken
    if ckpt is not None and (row := _best_row(fit)) is not None:
        heldout["after"] = _heldout_summary(row["val_dice"], row["val_dice_lesion"],
                                            row["val_fp_rate_normal"], len(va))
    if ckpt is not None:
        _record_after(ckpt, before, after, heldout)
    return FinetuneResult(ckpt, fit, before, after, len(tr), len(va),
                          extra={"heldout": heldout, "train_indices": tr, "val_indices": va,
                                 "n_replay": len(r_names)})


def _one_settings(settings: FinetuneSettings | None, **legacy: Any) -> FinetuneSettings:
    """Return ``settings``, or the older keywords folded into one (not both)."""
    given = [k for k, v in legacy.items() if v is not None]
    if settings is None:
        return FinetuneSettings.from_parts(legacy.pop("recipe"), **legacy)
    if given:
        raise TypeError(f"pass either settings or {', '.join(given)}, not both: settings "
                        "already holds them (use settings.replace(...) to change one)")
    if not isinstance(settings, FinetuneSettings):
        raise TypeError(f"settings must be a FinetuneSettings, got {type(settings).__name__}")
    return settings


def _evaluate_before(model: Any, val_set: Any, device: Any, cfg: TrainConfig
                     ) -> tuple[float | None, dict[str, Any]]:
    """Return the base model's held-out mean Dice and summary (None, {} without a hold-out)."""
    from busseg.engine import evaluate_dataset

    if val_set is None:
        return None, {}
    ev = evaluate_dataset(model, val_set, device, cfg.batch_size, cfg.threshold,
                          box_prompts=False)
    return ev["mean_dice"], {"before": _heldout_summary(
        ev["mean_dice"], ev["mean_dice_lesion"], ev["fp_rate_normal"], len(val_set))}


def _with_before(gen: Generator[ProgressEvent, None, FitResult], before: float | None
                 ) -> Generator[ProgressEvent, None, FitResult]:
    """Pass the engine's events on, the first one telling the held-out Dice before."""
    first = next(gen)
    if before is not None:
        first.message += f"; held-out Dice before: {before:.3f}"
    yield first
    return (yield from gen)


def _best_row(fit: FitResult) -> dict | None:
    """Return the validation row of the selected weights (with their held-out lesion Dice)."""
    return next((r for r in reversed(fit.history) if r["step"] == fit.best_step), None)


def _train_val(masks: Sequence[np.ndarray], val_fraction: float, seed: int,
               val_indices: Sequence[int] | None) -> tuple[list[int], list[int]]:
    """Return the pairs to train on and to hold out (``val_indices``, else a stratified draw)."""
    if val_indices is None:
        has_lesion = [bool(np.asarray(m).any()) for m in masks]
        return split_pairs(len(masks), val_fraction, seed, strata=has_lesion)
    va = sorted({int(i) for i in val_indices})
    if va and (va[0] < 0 or va[-1] >= len(masks)):
        raise ValueError(f"val_indices {va} do not fit {len(masks)} pairs")
    tr = [i for i in range(len(masks)) if i not in set(va)]
    if not tr:
        raise ValueError("every pair is held out; leave at least one to train on")
    return tr, va


def _checkpoint_config(base_cfg: dict, base_path: Path, recipe: str | None, aug: bool,
                       before: float | None, train_names: list[str], val_names: list[str],
                       replay_names: list[str]) -> dict:
    """Return the fine-tuned checkpoint's config: the base's, with training record and lineage."""
    from busseg.data.transforms import Augment

    drop = ("format", "format_version", "busseg_version", "training", "metrics", "lineage")
    cfg = {k: v for k, v in base_cfg.items() if k not in drop}
    cfg["training"] = {"kind": "fine-tune", "n_train": len(train_names),
                       "n_val": len(val_names), "n_replay": len(replay_names),
                       "recipe": recipe or DEFAULT_RECIPE,
                       "augment": Augment().to_dict() if aug else None,
                       "base_training": base_cfg.get("training", {})}
    cfg["metrics"] = {"heldout_dice_before": before}
    cfg["lineage"] = {"base_model": str(base_path.resolve()),
                      "base_lineage": base_cfg.get("lineage", {}),
                      "pairs": list(train_names), "replay_pairs": list(replay_names),
                      "heldout_pairs": list(val_names)}
    return cfg


def _heldout_summary(mean_dice: float, dice_lesion: float, fp_rate: float, n: int) -> dict:
    """Held-out mean Dice, lesion Dice and normal-scan FP rate (NaN -> None), JSON-safe."""
    import math

    def finite(x: float) -> float | None:
        return float(x) if math.isfinite(x) else None

    return {"mean_dice": float(mean_dice), "dice_lesion": finite(dice_lesion),
            "fp_rate_normal": finite(fp_rate), "n": int(n)}


def lesions_kept(result: FinetuneResult, tolerance: float = 0.0) -> bool | None:
    """Whether a fine-tune kept the lesion Dice of the held-out pairs that have a lesion.

    Parameters
    ----------
    result : FinetuneResult
        From :func:`finetune_iter`.
    tolerance : float
        Allowed drop of the held-out lesion Dice, >= 0.

    Returns
    -------
    bool or None
        None when no held-out pair has a lesion (nothing to check: a model that learned to
        predict nothing would look perfect on normal scans alone).
    """
    h = result.extra.get("heldout", {})
    b, a = h.get("before", {}).get("dice_lesion"), h.get("after", {}).get("dice_lesion")
    if b is None or a is None:
        return None
    return a >= b - tolerance


def heldout_costs(images: Sequence[np.ndarray], masks: Sequence[np.ndarray],
                  val_indices: Sequence[int], before: Any, after: Any, *, seed: int = 0,
                  predict_kwargs: dict | None = None) -> dict[str, Any]:
    """Simulate the annotation cost of two models on the held-out corrections.

    Runs the project's one simulated annotator (:func:`busseg.annotator.annotation_cost`:
    accept, clear a normal scan, or box then clicks to IoU 0.85, capped at 20 interactions)
    on the held-out pairs with each model, with the same box jitter (``seed``), so the two
    numbers differ only by the models. The corrected masks are the ground truth.

    Parameters
    ----------
    images, masks : sequence of numpy.ndarray
        All corrected pairs, as given to :func:`finetune_iter` ((H, W) or (H, W, C) images;
        (H, W) masks, > 0 = lesion, empty for a normal scan).
    val_indices : sequence of int
        The held-out pairs (``FinetuneResult.extra["val_indices"]``).
    before, after : torch.nn.Module, path or None
        The current model and the fine-tuned one (checkpoint folders; None = the shipped
        default model).
    seed : int
        Seed of the box jitter.
    predict_kwargs : dict, optional
        Settings of the automatic prediction (as the session's :meth:`predict`).

    Returns
    -------
    dict
        ``before`` and ``after``: ``per_scan`` (mean interactions per held-out scan),
        ``lesion_per_scan``, ``never_converged``, ``kinds`` and ``interactions`` (per scan);
        ``n`` and ``n_lesion`` (held-out scans, with a lesion).

    Raises
    ------
    ValueError
        If there are no held-out pairs, an index is out of range, or a model takes no box
        or click prompts (its box-then-clicks cost cannot be simulated).
    """
    from busseg import annotator
    from busseg.inference import accepts_prompts, load_model

    val = [int(i) for i in val_indices]
    if not val:
        raise ValueError("no held-out pairs: the annotation cost needs at least one")
    if min(val) < 0 or max(val) >= len(images) or len(images) != len(masks):
        raise ValueError(f"held-out indices {val} do not fit {len(images)} images / "
                         f"{len(masks)} masks")
    hi = [images[i] for i in val]
    hm = [np.asarray(masks[i]) > 0 for i in val]
    keys = ("per_scan", "lesion_per_scan", "never_converged", "kinds", "interactions")
    out: dict[str, Any] = {"n": len(val), "n_lesion": sum(bool(m.any()) for m in hm)}
    for name, model in (("before", before), ("after", after)):
        loaded = model if hasattr(model, "forward") else load_model(model)
        if not accepts_prompts(loaded):
            where = "the default model" if model is None else str(model)
            raise ValueError(f"{where} takes no box or click prompts, so its annotation cost "
                             "cannot be simulated")
        res = annotator.annotation_cost(model, hi, hm, seed=seed, predict_kwargs=predict_kwargs)
        out[name] = {k: res[k] for k in keys}
    return out


def prompt_costs(images: Sequence[np.ndarray], masks: Sequence[np.ndarray],
                 val_indices: Sequence[int], models: dict[str, Any], *,
                 seed: int = 0) -> dict[str, float]:
    """Box-then-clicks interactions per held-out lesion scan, for each of several networks.

    On a lesion scan the prompted part of the simulated annotator (:mod:`busseg.annotator`)
    depends only on the truth, the jittered boxes and the network that answers prompts, so
    it is run once per network (:func:`busseg.annotator.prompt_path`) with the same boxes;
    the cost counted is the boxes plus the clicks to IoU 0.85 (the cap when never reached).
    A site checkpoint takes its prompt network from the base unless
    :func:`prompts_from_adapted` finds a clear saving on enough answers.

    Parameters
    ----------
    images, masks : sequence of numpy.ndarray
        All recorded pairs ((H, W) masks, > 0 = lesion).
    val_indices : sequence of int
        The held-out pairs; those without a lesion are skipped.
    models : dict
        Name -> prompt model (``torch.nn.Module`` or checkpoint path).
    seed : int
        Seed of the box jitter (scan ``i`` uses ``default_rng([seed, i])``).

    Returns
    -------
    dict
        Name -> mean interactions per held-out lesion scan (NaN when there is none).
    """
    from busseg.annotator import model_prompt, prompt_path
    from busseg.inference import load_model

    lesion = [int(i) for i in val_indices if np.asarray(masks[int(i)]).any()]
    out: dict[str, float] = {}
    for name, model in models.items():
        net = model if hasattr(model, "forward") else load_model(model)
        costs = []
        for i in lesion:
            truth = np.asarray(masks[i]) > 0
            path = prompt_path(truth, model_prompt(images[i], net),
                               np.random.default_rng([seed, i]))
            k = path["clicks_to_accept"]
            costs.append(path["max_interactions"] if k is None
                         else min(path["boxes"] + k, path["max_interactions"]))
        out[name] = float(np.mean(costs)) if costs else float("nan")
    return out


#: Held-out lesion answers needed before the adapted network may answer prompts, and the
#: interactions per held-out lesion scan it must save. Measured on BUS-BRA's later patients
#: (``benchmarks/annotation_loop.py --recipes site:vote``): with 3 answers and no margin the
#: adapted prompts won on the hold-out at k = 20 and 40 and then cost 2.90 and 3.52
#: interactions per lesion scan on the site's other patients, against the base's 2.73.
MIN_PROMPT_EVIDENCE = 10
PROMPT_MARGIN = 0.5


def prompts_from_adapted(costs: dict[str, float], masks: Sequence[np.ndarray],
                         val_indices: Sequence[int]) -> bool:
    """Whether a site checkpoint's prompts should come from its adapted network.

    Only when :func:`prompt_costs` says it saves at least :data:`PROMPT_MARGIN` interactions
    per scan against the base on at least :data:`MIN_PROMPT_EVIDENCE` held-out lesion
    answers: ties and small samples keep the base network, whose box-and-click skill was
    trained on thousands of prompts.

    Parameters
    ----------
    costs : dict
        ``{"base": float, "adapted": float}`` from :func:`prompt_costs` (NaN: not measured).
    masks, val_indices
        As :func:`prompt_costs` (the held-out answers with a lesion are counted).

    Returns
    -------
    bool
    """
    n_lesion = sum(bool(np.asarray(masks[int(i)]).any()) for i in val_indices)
    a, b = costs.get("adapted", np.nan), costs.get("base", np.nan)
    return bool(n_lesion >= MIN_PROMPT_EVIDENCE and np.isfinite(a) and np.isfinite(b)
                and a <= b - PROMPT_MARGIN)


def _record_after(ckpt: Path, before: float | None, after: float | None,
                  heldout: dict | None = None) -> None:
    import json

    from busseg.data.io import atomic_write_bytes

    p = Path(ckpt) / "config.json"
    cfg = json.loads(p.read_text())
    cfg.setdefault("metrics", {}).update(heldout_dice_before=before, heldout_dice_after=after)
    if heldout:
        cfg["metrics"]["heldout"] = heldout
    atomic_write_bytes(p, json.dumps(cfg, indent=2).encode(), overwrite=True)


def finetune(images, masks, base=None, *, callback=None, **kwargs) -> FinetuneResult:
    """Run :func:`finetune_iter` to the end (scripts, tests, benchmarks).

    Parameters
    ----------
    images, masks, base, **kwargs
        As :func:`finetune_iter`.
    callback : callable, optional
        Called with each :class:`~busseg.engine.ProgressEvent`.

    Returns
    -------
    FinetuneResult
    """
    from busseg.engine import drain

    return drain(finetune_iter(images, masks, base, **kwargs), callback)
