"""Fine-tune settings: the named recipes, and the one typed value a fine-tune runs with.

A fine-tune is set by a recipe name (:data:`FINETUNE_RECIPES`: complete settings to compare
with ``benchmarks/annotation_loop.py --recipes``) plus a few overrides (the widget's fields,
a benchmark's ``--max-steps``, learning as you go's ``finetune_options``).
:meth:`FinetuneSettings.resolve` is the one place where a name and overrides become
settings: the :class:`~busseg.engine.TrainConfig` of the training loop and what the
fine-tune adds around it (the held-out share, the augmentation, the replayed BUSI pairs).
The result travels whole to :func:`busseg.finetune.finetune_iter`, which looks nothing up
again, and its ``recipe`` goes into the new checkpoint's lineage.

:mod:`busseg.finetune` re-exports every public name of this module.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from busseg.engine.config import TrainConfig

__all__ = [
    "DEFAULT_RECIPE",
    "FINETUNE_DEFAULTS",
    "FINETUNE_RECIPES",
    "MAX_REPLAY",
    "SETTINGS_KEYS",
    "SITE_RECIPE",
    "FinetuneSettings",
    "recipe_settings",
]

#: The fine-tune settings of model v2's release: the widget's defaults before the recipes.
_V2: dict[str, Any] = {
    "max_steps": 100,
    "batch_size": 4,
    "lr": 3e-4,
    "weight_decay": 1e-4,
    "warmup_steps": 5,
    "min_lr_ratio": 0.1,
    "early_stopping": None,
    "val_fraction": 0.2,
    "augment": True,
    "seed": 0,
    # the whole network adapts: on 10 corrected BUS-BRA images, Dice on other patients of
    # that site rose +0.063 with it against +0.008 with the encoder frozen
    "freeze_encoder": False,
    # BCE on every pair, Dice on pairs with a lesion: a corrected normal scan (empty mask)
    # teaches "no lesion here" without pushing every mask towards empty
    "loss": "bce_lesion_dice",
    # the live held-out Dice is the automatic one: no extra box-prompt pass per validation
    "eval_box_prompts": False,
    # box and first-click prompts only: correction rounds cost extra forward passes
    "prompts": {"max_rounds": 0, "from_auto": 0.0},
    # shipped BUSI training pairs replayed beside the corrections
    # (:func:`busseg.finetune.replay_pairs`)
    "replay": 0,
    # L2-SP strength (``TrainConfig.l2sp_alpha``); 0 = plain weight decay towards zero
    "l2sp_alpha": 0.0,
}

#: Correction rounds as the base model was trained with them (RITM's iterative protocol).
_ROUNDS4 = {"max_rounds": 4, "from_auto": 0.5}

#: Named fine-tune recipes: complete settings, each the v2 settings with a few changed.
#: ``benchmarks/annotation_loop.py --recipes NAME ...`` compares them on the same
#: corrections; :data:`FINETUNE_DEFAULTS` is one of them.
FINETUNE_RECIPES: dict[str, dict[str, Any]] = {
    "v2-default": dict(_V2),
    "lr1e-4": {**_V2, "lr": 1e-4},
    "lr3e-5": {**_V2, "lr": 3e-5},
    "rounds4": {**_V2, "prompts": dict(_ROUNDS4)},
    "replay": {**_V2, "replay": 30},
    "replay+rounds4": {**_V2, "replay": 30, "prompts": dict(_ROUNDS4)},
    "replay+lr1e-4": {**_V2, "replay": 30, "lr": 1e-4},
    "replay10+rounds4": {**_V2, "replay": 10, "prompts": dict(_ROUNDS4)},
    "l2sp": {**_V2, "l2sp_alpha": 0.01, "weight_decay": 0.0},
    "l2sp0.1": {**_V2, "l2sp_alpha": 0.1, "weight_decay": 0.0},
    "l2sp+replay10+rounds4": {**_V2, "l2sp_alpha": 0.01, "weight_decay": 0.0, "replay": 10,
                              "prompts": dict(_ROUNDS4)},
    # the adapted network of a site checkpoint (busseg.site): it draws or votes on the
    # automatic mask only, prompts stay with the base network unless the adapted one costs
    # no more, so nothing holds it back from fitting the site (whole network, the site's
    # normal scans in the loss, no replay, no correction rounds)
    "site": dict(_V2),
}

#: The recipe of a site checkpoint's adapted network (learning as you go, "vote" and
#: "adapted" modes of :meth:`busseg.session.AnnotationSession.finetune_job`).
SITE_RECIPE = "site"

#: Name of the recipe :data:`FINETUNE_DEFAULTS` holds, chosen by this rule: at k = 10
#: corrected BUS-BRA scans, automatic Dice gain on other patients >= +0.04 and box-then-clicks
#: interactions per lesion scan no higher than the base model's, fewest interactions among
#: those; if none meets both, fewest interactions among those that gain Dice. Measured with
#: ``python benchmarks/annotation_loop.py --checkpoint <snapshot of weights/default> --ks 0 10
#: --draws 3 --eval-limit 60 --busi-limit 10 --recipes l2sp+replay10+rounds4 v2-default
#: replay10+rounds4 --threads 1`` (benchmarks/results/annotation_loop.md; 60 evaluation scans)
#: on the BUSI + BUS-UCLM default model: Dice gain / interactions (base 0.740 / 2.73)
#: l2sp+replay10+rounds4 +0.030 / 2.37, replay10+rounds4 +0.029 / 2.57, v2-default +0.063 /
#: 2.99 (0.7 scans per model never converge). No recipe met both there (the gain target is
#: missed); this one costs the fewest interactions. On two earlier base models it met both
#: (BUSI-only v2, 3 draws: +0.068 / 2.91 against 3.17, v2-default +0.082 / 3.09; a BUSI +
#: BUS-UCLM candidate: +0.066 / 2.62 against 2.87, v2-default +0.076 / 3.13). L2-SP alone
#: (alpha 0.01, 0.1) kept the interactions below the base on the BUSI-only model but not on
#: the candidate (3.09 / 3.16 against 2.87); lr 1e-4 (BUSI-only model only, 2 draws: +0.038 /
#: 2.97 against 3.17); 30 replay pairs without correction rounds raised them (3.28).
DEFAULT_RECIPE = "l2sp+replay10+rounds4"

#: Settings of the fine-tune widget, of learning as you go and of
#: ``benchmarks/annotation_loop.py``: the one source of the default recipe.
FINETUNE_DEFAULTS: dict[str, Any] = copy.deepcopy(FINETUNE_RECIPES[DEFAULT_RECIPE])


#: The shipped BUSI training pairs a fine-tune can replay: the rows of
#: ``busseg/replay/manifest.csv`` (:func:`busseg.finetune.replay_pairs` loads them and
#: refuses more than the manifest holds).
MAX_REPLAY = 30

#: The settings a fine-tune adds to the ``TrainConfig`` fields.
_EXTRA_KEYS = ("val_fraction", "augment", "replay")
_TRAIN_KEYS = tuple(f.name for f in dataclasses.fields(TrainConfig))

#: Every key :meth:`FinetuneSettings.resolve` and :meth:`FinetuneSettings.replace` take: the
#: ``TrainConfig`` fields, then ``val_fraction``, ``augment`` and ``replay``.
SETTINGS_KEYS: tuple[str, ...] = _TRAIN_KEYS + _EXTRA_KEYS


def recipe_settings(recipe: str | None = None) -> dict[str, Any]:
    """Return a copy of a named recipe's settings (None: :data:`FINETUNE_DEFAULTS`).

    Parameters
    ----------
    recipe : str, optional
        A key of :data:`FINETUNE_RECIPES`.

    Returns
    -------
    dict
        ``TrainConfig`` fields plus ``val_fraction``, ``augment`` and ``replay``.

    Raises
    ------
    ValueError
        If the name is unknown (the message lists the known ones).
    """
    if recipe is None:
        return copy.deepcopy(FINETUNE_DEFAULTS)
    if recipe not in FINETUNE_RECIPES:
        raise ValueError(f"unknown fine-tune recipe {recipe!r}; choose one of "
                         f"{', '.join(FINETUNE_RECIPES)}")
    return copy.deepcopy(FINETUNE_RECIPES[recipe])


def _check_keys(overrides: Mapping[str, Any]) -> None:
    """Raise a TypeError naming the known keys if an override is not a setting."""
    unknown = sorted(set(overrides) - set(SETTINGS_KEYS))
    if unknown:
        raise TypeError(f"unknown fine-tune setting(s) {', '.join(map(repr, unknown))}; "
                        f"the settings are {', '.join(SETTINGS_KEYS)}")


def _eval_every(max_steps: int | None) -> int | None:
    """Return the validation interval of ``max_steps`` steps (None: by epochs)."""
    return max(1, int(max_steps) // 10) if max_steps else None


@dataclass(frozen=True)
class FinetuneSettings:
    """Everything a fine-tune runs with, resolved once from a recipe name and overrides.

    Make it with :meth:`resolve` (or :meth:`replace` of another); construction checks the
    values. :func:`busseg.finetune.finetune_iter` takes it whole (``settings=``).

    Attributes
    ----------
    recipe : str or None
        The key of :data:`FINETUNE_RECIPES` it was resolved from, recorded in the new
        checkpoint's lineage; None for :data:`FINETUNE_DEFAULTS` (recorded as
        :data:`DEFAULT_RECIPE`).
    train : TrainConfig
        The training loop's settings (:func:`busseg.engine.fit_iter`): ``max_steps``
        (optimiser steps; None trains ``epochs`` passes), ``lr``, ``batch_size``,
        ``eval_every_steps`` (validation interval in steps) ...
    val_fraction : float
        Share of the user's pairs held out to measure Dice before and after, in [0, 1)
        (ignored where the caller names the held-out pairs, ``val_indices``).
    augment : bool
        Whether the pairs trained on go through the training augmentation.
    replay : int
        Shipped BUSI training pairs (:func:`busseg.finetune.replay_pairs`) trained on beside
        the user's pairs, never held out; 0 to :data:`MAX_REPLAY`.

    Raises
    ------
    TypeError
        On construction, if ``train`` is not a ``TrainConfig``.
    ValueError
        On construction, if ``recipe`` is unknown, ``val_fraction`` is outside [0, 1) or
        ``replay`` is outside 0 to :data:`MAX_REPLAY` (the message names it).
    """

    recipe: str | None
    train: TrainConfig
    val_fraction: float
    augment: bool
    replay: int

    def __post_init__(self) -> None:
        if self.recipe is not None and self.recipe not in FINETUNE_RECIPES:
            raise ValueError(f"unknown fine-tune recipe {self.recipe!r}; choose one of "
                             f"{', '.join(FINETUNE_RECIPES)}")
        if not isinstance(self.train, TrainConfig):
            raise TypeError(f"train must be a busseg.engine.TrainConfig, got "
                            f"{type(self.train).__name__}")
        if not 0 <= self.val_fraction < 1:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if isinstance(self.replay, bool) or int(self.replay) != self.replay or not (
                0 <= self.replay <= MAX_REPLAY):
            raise ValueError(f"replay must be a whole number of pairs between 0 and "
                             f"{MAX_REPLAY} (the shipped replay set), got {self.replay!r}")
        object.__setattr__(self, "val_fraction", float(self.val_fraction))
        object.__setattr__(self, "augment", bool(self.augment))
        object.__setattr__(self, "replay", int(self.replay))

    @classmethod
    def resolve(cls, recipe: str | None = None, **overrides: Any) -> FinetuneSettings:
        """Return a recipe's settings with overrides: the one place a recipe name is read.

        Parameters
        ----------
        recipe : str, optional
            A key of :data:`FINETUNE_RECIPES`; None for :data:`FINETUNE_DEFAULTS`.
        **overrides
            Any ``TrainConfig`` field (``max_steps``, ``epochs``, ``lr``, ``batch_size``,
            ``freeze_encoder`` ...), ``val_fraction``, ``augment`` or ``replay``. Passing
            ``epochs`` without ``max_steps`` trains for that many epochs (``max_steps``
            None). With ``max_steps`` set, ``eval_every_steps`` defaults to
            ``max(1, max_steps // 10)``.

        Returns
        -------
        FinetuneSettings

        Raises
        ------
        TypeError
            If an override is not a setting (the message lists :data:`SETTINGS_KEYS`).
        ValueError
            If ``recipe`` is unknown or a value is out of range.
        """
        _check_keys(overrides)
        flat = recipe_settings(recipe)
        if "epochs" in overrides and "max_steps" not in overrides:
            flat["max_steps"] = None
        flat.update(overrides)
        if flat.get("max_steps"):
            flat.setdefault("eval_every_steps", _eval_every(flat["max_steps"]))
        train = TrainConfig(**{k: v for k, v in flat.items() if k in _TRAIN_KEYS})
        return cls(recipe, train, val_fraction=flat["val_fraction"], augment=flat["augment"],
                   replay=flat.get("replay", 0))

    @classmethod
    def from_parts(cls, recipe: str | None = None, *,
                   cfg: TrainConfig | Mapping[str, Any] | None = None,
                   val_fraction: float | None = None, augment: bool | None = None,
                   replay: int | None = None) -> FinetuneSettings:
        """Fold the separate keywords of older callers into one :class:`FinetuneSettings`.

        Parameters
        ----------
        recipe : str, optional
            As :meth:`resolve`; gives whatever the other arguments leave out.
        cfg : TrainConfig or dict, optional
            A ``TrainConfig`` used whole (the recipe's training settings are not used), or a
            dict of overrides for :meth:`resolve`.
        val_fraction, augment, replay : optional
            As the attributes; None takes the recipe's (or ``cfg``'s, when a dict gives it).

        Returns
        -------
        FinetuneSettings
            One value for all of them.

        Raises
        ------
        TypeError
            If ``cfg`` is neither, or a dict key is not a setting.
        ValueError
            As :meth:`resolve`.
        """
        extra = {k: v for k, v in (("val_fraction", val_fraction), ("augment", augment),
                                   ("replay", replay)) if v is not None}
        if cfg is None or isinstance(cfg, Mapping):
            return cls.resolve(recipe, **{**(cfg or {}), **extra})
        if not isinstance(cfg, TrainConfig):
            raise TypeError(f"cfg must be a TrainConfig or a dict of overrides, got "
                            f"{type(cfg).__name__}")
        return dataclasses.replace(cls.resolve(recipe, **extra), train=cfg)

    def replace(self, **overrides: Any) -> FinetuneSettings:
        """Return a copy with some settings changed (same recipe).

        Parameters
        ----------
        **overrides
            As :meth:`resolve`. Derived values follow what they derive from, as in
            :meth:`resolve`: ``epochs`` without ``max_steps`` trains by epochs, and a new
            ``max_steps`` (or training by epochs) re-derives ``eval_every_steps``
            (``max(1, max_steps // 10)``, None by epochs) unless it is given in the same call.

        Returns
        -------
        FinetuneSettings
            A new value; this one is unchanged.

        Raises
        ------
        TypeError
            If an override is not a setting.
        ValueError
            If a value is out of range.
        """
        _check_keys(overrides)
        train = self.train.to_dict()  # a deep copy: the two never share a dict
        steps_changed = "max_steps" in overrides or "epochs" in overrides
        if "epochs" in overrides and "max_steps" not in overrides:
            train["max_steps"] = None
        train.update({k: v for k, v in overrides.items() if k in _TRAIN_KEYS})
        if steps_changed and "eval_every_steps" not in overrides:
            train["eval_every_steps"] = _eval_every(train["max_steps"])
        extra = {k: v for k, v in overrides.items() if k in _EXTRA_KEYS}
        return dataclasses.replace(self, train=TrainConfig(**train), **extra)

    def to_dict(self) -> dict[str, Any]:
        """Return the settings as one flat, JSON-serialisable dict (logs, benchmark reports).

        Returns
        -------
        dict
            ``recipe``, every ``TrainConfig`` field, ``val_fraction``, ``augment`` and
            ``replay``.
        """
        return {"recipe": self.recipe, **self.train.to_dict(), "val_fraction": self.val_fraction,
                "augment": self.augment, "replay": self.replay}
