"""Typed inference settings: one value from the widget (or the CLI) to the network.

:class:`InferenceSettings` holds what decides an automatic prediction beyond the image and
the checkpoint: the probability threshold, flip test-time augmentation, the normal-scan gate,
the region filter, post-processing and the device. It is validated once, when it is made;
every predict function (:func:`busseg.inference.predict`, :func:`~busseg.inference.predict_mask`,
:func:`~busseg.inference.predict_stack_iter`), the jobs (:func:`busseg.jobs.segment_job`),
the annotation session, the site calibration and the widgets take it whole. The same fields
are accepted as keyword overrides (``predict(image, model, threshold=0.4)``), folded into one
:class:`InferenceSettings` by :meth:`InferenceSettings.coerce`.

:meth:`InferenceSettings.resolve` turns the ``None`` / ``"auto"`` fields into the
checkpoint's stored values (:class:`ResolvedInference`), the one place that is done.

Torch-free (the Scan browser builds cache keys from it on the GUI thread).
"""

from __future__ import annotations

import dataclasses
import json
import numbers
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = [
    "DEVICE_CHOICES",
    "INFERENCE_FIELDS",
    "InferenceSettings",
    "ResolvedInference",
    "check_gate",
    "check_postprocess",
    "check_threshold",
    "resolve_threshold",
    "resolve_tta",
]

#: Devices a setting may name (``"cuda:1"`` and the like are accepted too).
DEVICE_CHOICES = ("auto", "cpu", "cuda", "mps")


def check_threshold(value: Any) -> float:
    """Validate a probability threshold.

    Parameters
    ----------
    value : float
        In (0, 1): a pixel is lesion where its probability >= the threshold.

    Returns
    -------
    float

    Raises
    ------
    ValueError
        If it is not a number in (0, 1).
    """
    if isinstance(value, bool):
        raise ValueError(f"threshold must be a number in (0, 1), got {value!r}")
    try:
        t = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"threshold must be a number in (0, 1), got {value!r}") from None
    if not 0.0 < t < 1.0:
        raise ValueError(f"threshold must be in (0, 1) (a probability), got {value!r}")
    return t


def resolve_threshold(threshold: float | None, cfg: Mapping[str, Any]) -> float:
    """Return the probability threshold: ``threshold``, or the checkpoint's.

    Parameters
    ----------
    threshold : float or None
        In (0, 1); None uses the checkpoint's ``inference.threshold`` (default 0.5).
    cfg : mapping
        The checkpoint config.

    Returns
    -------
    float
        In (0, 1).

    Raises
    ------
    ValueError
        If the threshold is not a number in (0, 1).
    """
    if threshold is None:
        threshold = cfg.get("inference", {}).get("threshold", 0.5)
    return check_threshold(threshold)


def resolve_tta(tta: bool | None, cfg: Mapping[str, Any]) -> bool:
    """Return whether to flip-average: ``tta``, or the checkpoint's ``inference.tta_flips``.

    Parameters
    ----------
    tta : bool or None
        As :func:`busseg.inference.predict_proba`; None uses the checkpoint setting.
    cfg : mapping
        The checkpoint config.

    Returns
    -------
    bool
    """
    if tta is None:
        return bool(cfg.get("inference", {}).get("tta_flips", False))
    return bool(tta)


def check_postprocess(keep: str, min_area: int) -> None:
    """Validate the post-processing options (see :func:`busseg.postprocess.postprocess_mask`).

    Parameters
    ----------
    keep : str
        One of :data:`busseg.postprocess.KEEP_CHOICES`.
    min_area : int
        Pixels, >= 0.

    Raises
    ------
    ValueError
        If either is invalid.
    """
    from busseg.postprocess import KEEP_CHOICES

    if keep not in KEEP_CHOICES:
        raise ValueError(f"keep must be one of {', '.join(map(repr, KEEP_CHOICES))}, got {keep!r}")
    if (isinstance(min_area, bool) or not isinstance(min_area, numbers.Integral)
            or min_area < 0):
        raise ValueError(f"min_area must be a non-negative integer (pixels), got {min_area!r}")


def check_gate(value: Any) -> Any:
    """Validate a normal-scan gate setting.

    Parameters
    ----------
    value : "auto" or None or False or float
        ``"auto"`` the checkpoint's stored gate, None or False none, a float in (0, 1] the
        gate's ``p_normal``.

    Returns
    -------
    "auto" or None or float

    Raises
    ------
    ValueError
        For any other value.
    """
    if value is None or value is False:
        return None
    if isinstance(value, str):
        if value != "auto":
            raise ValueError(f"normal_gate must be 'auto', None or a probability in (0, 1], "
                             f"got {value!r}")
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"normal_gate must be 'auto', None or a probability in (0, 1], got "
                         f"{value!r}")
    if not 0.0 < float(value) <= 1.0:
        raise ValueError(f"normal_gate must be in (0, 1], got {value!r}")
    return float(value)


def _check_filter(value: Any) -> Any:
    """``"auto"``, None or a RegionFilter (True is "auto", False None, a mapping parsed)."""
    from busseg.region_filter import RegionFilter

    if value is None or value is False:
        return None
    if value is True:
        return "auto"
    if isinstance(value, str):
        if value != "auto":
            raise ValueError(f"region_filter must be 'auto', None, False or a RegionFilter, "
                             f"got {value!r}")
        return value
    if isinstance(value, RegionFilter):
        return value
    if isinstance(value, Mapping):
        return RegionFilter.from_dict(value)
    raise ValueError(f"region_filter must be 'auto', None, False or a RegionFilter, got "
                     f"{type(value).__name__}")


def _check_device(value: Any) -> str | None:
    """None or a device name (a torch.device becomes its string)."""
    if value is None:
        return None
    name = str(value)
    if name.split(":")[0] not in DEVICE_CHOICES:
        raise ValueError(f"device must be one of {', '.join(map(repr, DEVICE_CHOICES))} "
                         f"(or 'cuda:N'), got {value!r}")
    return name


@dataclass(frozen=True)
class ResolvedInference:
    """:class:`InferenceSettings` with the checkpoint's stored values filled in.

    Attributes
    ----------
    threshold : float
        In (0, 1).
    tta : bool
        Left-right flip test-time augmentation.
    gate : dict or None
        ``{"p_normal": t, "lesion_confidence": c}`` (:func:`busseg.gating.apply_gate`).
    region_filter : busseg.region_filter.RegionFilter or None
    post : tuple or None
        ``(fill_holes, keep, min_area)`` when post-processing changes anything, else None.
    """

    threshold: float
    tta: bool
    gate: dict | None
    region_filter: Any
    post: tuple[bool, str, int] | None


@dataclass(frozen=True)
class InferenceSettings:
    """Settings of an automatic prediction, validated when made (immutable).

    Attributes
    ----------
    threshold : float or None
        Probability threshold in (0, 1); a pixel is lesion where probability >= threshold.
        None: the checkpoint's ``inference.threshold``.
    tta : bool or None
        Left-right flip test-time augmentation (the probabilities of the image and its mirror
        image averaged); None: the checkpoint's ``inference.tta_flips``.
    normal_gate : "auto" or None or float
        The normal-scan gate of a model with a class head (:mod:`busseg.gating`): ``"auto"``
        the checkpoint's stored gate, None off (False is taken as None), a float in (0, 1]
        its ``p_normal`` with the stored ``lesion_confidence``.
    region_filter : "auto" or None or busseg.region_filter.RegionFilter
        The region filter (:mod:`busseg.region_filter`): ``"auto"`` the checkpoint's, None off.
        True is taken as ``"auto"``, False as None, a mapping as
        :meth:`~busseg.region_filter.RegionFilter.from_dict`.
    fill_holes : bool
        Fill holes inside the mask (:func:`busseg.postprocess.postprocess_mask`).
    keep : str
        ``"all"`` or ``"largest"`` connected component.
    min_area : int
        Components smaller than this many pixels are dropped (>= 0).
    device : str or None
        ``"auto"``, ``"cpu"``, ``"cuda"`` (``"cuda:N"``) or ``"mps"``; None: where the model
        is. A job loads its model there; a predict function given a loaded model checks that
        the model is there (models are shared, never moved).

    Raises
    ------
    ValueError
        For a value outside the ranges above (the message names the field).

    Examples
    --------
    >>> s = InferenceSettings(threshold=0.4, region_filter=False)
    >>> s.region_filter is None
    True
    >>> s.replace(tta=True).tta
    True
    """

    threshold: float | None = None
    tta: bool | None = None
    normal_gate: Any = "auto"
    region_filter: Any = "auto"
    fill_holes: bool = False
    keep: str = "all"
    min_area: int = 0
    device: str | None = None

    def __post_init__(self) -> None:
        put = object.__setattr__
        if self.threshold is not None:
            put(self, "threshold", check_threshold(self.threshold))
        if self.tta is not None:
            put(self, "tta", bool(self.tta))
        put(self, "normal_gate", check_gate(self.normal_gate))
        put(self, "region_filter", _check_filter(self.region_filter))
        put(self, "fill_holes", bool(self.fill_holes))
        check_postprocess(self.keep, self.min_area)
        put(self, "min_area", int(self.min_area))
        put(self, "device", _check_device(self.device))

    # ------------------------------------------------------------------ making

    @classmethod
    def coerce(cls, settings: InferenceSettings | Mapping[str, Any] | None = None,
               what: str = "settings", **overrides: Any) -> InferenceSettings:
        """Return ``settings`` (or the defaults) with keyword overrides applied.

        Parameters
        ----------
        settings : InferenceSettings or mapping or None
            The starting settings; a mapping holds field names; None the defaults.
        what : str, optional
            The caller's name, for the error message of an unknown keyword.
        **overrides
            Fields of :class:`InferenceSettings`.

        Returns
        -------
        InferenceSettings

        Raises
        ------
        TypeError
            For a name that is not a field (the message lists the fields), or a ``settings``
            of another type.
        ValueError
            For a value out of range.
        """
        if settings is None:
            base = cls()
        elif isinstance(settings, InferenceSettings):
            base = settings
        elif isinstance(settings, Mapping):
            _check_names(settings, what)
            base = cls(**settings)
        else:
            raise TypeError(f"{what}: settings must be an InferenceSettings, a mapping or None, "
                            f"got {type(settings).__name__}")
        return base.replace(what=what, **overrides) if overrides else base

    @classmethod
    def from_call(cls, settings: InferenceSettings | Mapping[str, Any] | None,
                  kwargs: Mapping[str, Any], what: str = "predict"
                  ) -> tuple[InferenceSettings, dict]:
        """Split a call's keywords into the settings (overrides applied) and the rest.

        For callers that pass other keywords (prompts, ``box_margin``) on to a predict
        function beside the settings: the annotation session and the site calibration.

        Parameters
        ----------
        settings : InferenceSettings or mapping or None
            As :meth:`coerce`.
        kwargs : mapping
            Keyword arguments: fields of :class:`InferenceSettings` and any others.
        what : str, optional
            As :meth:`coerce`.

        Returns
        -------
        settings : InferenceSettings
            ``settings`` with the field keywords applied.
        rest : dict
            The other keywords.

        Raises
        ------
        TypeError, ValueError
            As :meth:`coerce`.
        """
        fields = {k: v for k, v in kwargs.items() if k in INFERENCE_FIELDS}
        rest = {k: v for k, v in kwargs.items() if k not in INFERENCE_FIELDS}
        return cls.coerce(settings, what, **fields), rest

    def replace(self, what: str = "replace", **changes: Any) -> InferenceSettings:
        """Return a copy with some fields changed (validated again).

        Raises
        ------
        TypeError
            For a name that is not a field.
        ValueError
            For a value out of range.
        """
        _check_names(changes, what)
        return dataclasses.replace(self, **changes) if changes else self

    # ------------------------------------------------------------------ reading

    def to_dict(self) -> dict:
        """Plain-JSON form: the fields, a region filter as its ``to_dict()``."""
        out = dataclasses.asdict(self)
        if not isinstance(self.region_filter, (str, type(None))):
            out["region_filter"] = self.region_filter.to_dict()
        return out

    def key(self) -> tuple:
        """Hashable form, equal for equal settings (part of prediction cache keys)."""
        d = self.to_dict()
        if isinstance(d["region_filter"], dict):
            d["region_filter"] = json.dumps(d["region_filter"], sort_keys=True)
        return tuple(sorted(d.items()))

    def __hash__(self) -> int:  # a RegionFilter field is not hashable itself
        return hash(self.key())

    def resolve(self, cfg: Mapping[str, Any]) -> ResolvedInference:
        """Fill in the checkpoint's stored values for ``None`` / ``"auto"`` fields.

        Parameters
        ----------
        cfg : mapping
            The checkpoint config (its ``inference`` section: ``threshold``, ``tta_flips``,
            ``normal_gate``, ``region_filter``).

        Returns
        -------
        ResolvedInference

        Raises
        ------
        ValueError
            If a stored threshold, gate or filter is invalid.
        """
        from busseg.gating import resolve_filter, resolve_gate

        post = ((self.fill_holes, self.keep, self.min_area)
                if self.fill_holes or self.keep != "all" or self.min_area > 0 else None)
        return ResolvedInference(resolve_threshold(self.threshold, cfg),
                                 resolve_tta(self.tta, cfg), resolve_gate(self.normal_gate, cfg),
                                 resolve_filter(self.region_filter, cfg), post)


#: The field names of :class:`InferenceSettings`.
INFERENCE_FIELDS = tuple(f.name for f in dataclasses.fields(InferenceSettings))


def _check_names(names: Mapping[str, Any], what: str) -> None:
    unknown = [k for k in names if k not in INFERENCE_FIELDS]
    if unknown:
        raise TypeError(f"{what}() got unexpected keyword argument(s) "
                        f"{', '.join(map(repr, unknown))}; the inference settings are "
                        f"{', '.join(INFERENCE_FIELDS)}")
