"""Site calibration: the region filter's threshold and the normal-scan gate, from the answers.

Without training and in milliseconds, re-choose two numbers of the automatic mask on the
cases the annotator has answered at their own site:

- the **region filter's threshold** (:class:`busseg.region_filter.RegionFilter`: components
  whose lesion probability is below it are removed), and
- the **normal-scan gate's** ``p_normal`` (the mask is emptied when the class head's
  P(normal) reaches it and no pixel reaches the gate's ``lesion_confidence``),

by the simulated annotation cost (:mod:`busseg.annotator`) of the answered cases, as if the
annotator had seen the masks each candidate gives. Each answered case is kept as a few numbers
(:class:`CaseEvidence`): per connected component of the unfiltered, ungated automatic mask,
its filter score, its area, its overlap with the answer and whether it lies outside the
answer's grown boxes; the case's P(normal) and peak probability. The cost of a candidate is
then, per case, as :func:`busseg.annotator.scan_cost` counts it:

- a **normal answer** (empty mask): 1 when a component is kept (the annotator clears it),
  else 0;
- a **lesion answer**: 0 when the kept components reach IoU 0.85 with the answer (accepted),
  else ``prompt_cost`` (boxes and clicks, which do not depend on the automatic mask) plus 1
  when a kept component lies outside the grown boxes (the clear).

A candidate replaces the checkpoint's own settings only when it saves at least
``min_gain`` interactions on the answers (ties keep the checkpoint's): a site's first answers
are few, and a calibration that moves on noise costs lesions later (a refit of the filter's
19 coefficients on the answers did: see the README's annotation-session section).
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from busseg.settings import InferenceSettings

__all__ = [
    "CALIBRATION_NAME",
    "Calibration",
    "CalibrationError",
    "CaseEvidence",
    "SiteCalibrator",
    "case_evidence",
    "fit_calibration",
]

#: File name of a session's stored calibration (in its corrections folder).
CALIBRATION_NAME = "calibration.json"
#: Interactions assumed for the box-then-clicks of a lesion scan that is not accepted.
PROMPT_COST = 3.0
#: Gate values tried (1.01: no gate).
GATE_GRID = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.01)


class CalibrationError(ValueError):
    """A stored calibration cannot be used (corrupt, or made for another checkpoint)."""


@dataclass
class CaseEvidence:
    """One answered case, reduced to what a calibration candidate needs.

    Attributes
    ----------
    lesion : bool
        The answer has a lesion.
    answer_area : int
        Lesion pixels of the answer.
    p_normal : float or None
        The class head's P(normal) (None without a head).
    peak : float
        Largest lesion probability of the automatic mask's pixels, in [0, 1].
    scores : list of float
        (K,) region-filter lesion probability of each component of the unfiltered mask.
    areas, overlaps : list of int
        (K,) each component's pixels, and how many of them are in the answer.
    outside : list of bool
        (K,) the component has pixels outside the answer's boxes grown by 10 %.
    """

    lesion: bool
    answer_area: int
    p_normal: float | None
    peak: float
    scores: list[float] = field(default_factory=list)
    areas: list[int] = field(default_factory=list)
    overlaps: list[int] = field(default_factory=list)
    outside: list[bool] = field(default_factory=list)

    def cost(self, threshold: float, gate: float, lesion_confidence: float,
             accept_iou: float = 0.85, prompt_cost: float = PROMPT_COST) -> float:
        """Return the simulated interactions for this case under one candidate.

        The rule :func:`fit_calibration` scores every candidate with (one implementation).
        """
        ungated, gated = _cost_table([self], np.array([float(threshold)]), accept_iou,
                                     prompt_cost)
        is_gated = (self.p_normal is not None and self.p_normal >= gate
                    and self.peak < lesion_confidence)
        return float(gated[0] if is_gated else ungated[0, 0])


def case_evidence(raw_mask: np.ndarray, proba: np.ndarray, image: np.ndarray,
                  class_proba: Mapping[str, float] | None, region_filter: Any,
                  answer: np.ndarray, box_margin: float = 0.1) -> CaseEvidence:
    """Reduce one answered case to a :class:`CaseEvidence`.

    Parameters
    ----------
    raw_mask : numpy.ndarray
        (H, W) bool automatic mask before the gate and the region filter.
    proba : numpy.ndarray
        (H, W) float lesion probabilities it came from.
    image : numpy.ndarray
        (H, W) grey or colour image (the filter's features read it).
    class_proba : mapping or None
        The class head's probabilities.
    region_filter : RegionFilter or None
        The checkpoint's filter (None: every component scores 1).
    answer : numpy.ndarray
        (H, W) the annotator's answer (> 0 = lesion; empty for "no lesion").
    box_margin : float
        Growth of the answer's boxes (as the annotator's).

    Returns
    -------
    CaseEvidence

    Raises
    ------
    ValueError
        If the arrays differ in shape.
    """
    from busseg.prompts import box_mask, mask_to_boxes
    from busseg.region_filter import component_features, label_components

    raw = np.asarray(raw_mask) > 0
    ans = np.asarray(answer) > 0
    if raw.shape != ans.shape or np.shape(proba)[:2] != raw.shape:
        raise ValueError(f"mask {raw.shape}, probabilities {np.shape(proba)} and answer "
                         f"{ans.shape} differ in shape")
    lab, n = label_components(raw)
    if n and region_filter is not None:
        scores = region_filter.scores(
            component_features(raw, proba, image, class_proba, (lab, n)))
    else:
        scores = np.ones(n)
    areas = np.bincount(lab.ravel(), minlength=n + 1)[1:]
    overlaps = np.bincount(lab[ans].ravel(), minlength=n + 1)[1:]
    if ans.any():
        region = box_mask(mask_to_boxes(ans), ans.shape, box_margin)
        outside = np.bincount(lab[~region].ravel(), minlength=n + 1)[1:] > 0
    else:
        outside = np.ones(n, bool)
    p_normal = None if class_proba is None else float(class_proba.get("normal", 0.0))
    peak = float(np.asarray(proba)[raw].max()) if raw.any() else 0.0
    return CaseEvidence(bool(ans.any()), int(ans.sum()), p_normal, peak,
                        [float(v) for v in scores], [int(v) for v in areas],
                        [int(v) for v in overlaps], [bool(v) for v in outside])


@dataclass
class Calibration:
    """A site's calibration of the automatic mask (see the module docstring).

    Attributes
    ----------
    threshold : float or None
        Region-filter threshold in [0, 1] (None: the checkpoint's filter as stored, or none).
    p_normal : float or None
        Gate ``p_normal`` in (0, 1.01] (1.01: gate off; None: the checkpoint's gate).
    n_answers : int
        Answers it was chosen on.
    cost_before, cost_after : float
        Simulated interactions on those answers with the checkpoint's settings and with it.
    false_before, false_after : int
        Normal answers with a kept region, before and after.
    checkpoint : str
        Identity of the checkpoint it was made for (its resolved folder).
    """

    threshold: float | None = None
    p_normal: float | None = None
    n_answers: int = 0
    cost_before: float = 0.0
    cost_after: float = 0.0
    false_before: int = 0
    false_after: int = 0
    checkpoint: str = ""

    @property
    def changed(self) -> bool:
        """Whether it differs from the checkpoint's own settings."""
        return self.threshold is not None or self.p_normal is not None

    def text(self) -> str:
        """One line for a status bar."""
        if not self.n_answers:
            return ""
        if not self.changed:
            return (f"site calibration: {self.n_answers} answers, checkpoint settings kept "
                    f"(false regions {self.false_before} on them)")
        return (f"site calibration: {self.n_answers} answers, false regions "
                f"{self.false_before} -> {self.false_after} on them, interactions "
                f"{self.cost_before:.0f} -> {self.cost_after:.0f}")

    def predict_kwargs(self, config: Mapping[str, Any]) -> dict:
        """Keyword arguments of :func:`busseg.inference.predict` that apply it.

        Parameters
        ----------
        config : mapping
            The checkpoint's config (its stored filter and gate).

        Returns
        -------
        dict
            ``region_filter`` and/or ``normal_gate``; empty when nothing changed.
        """
        from busseg.region_filter import resolve_filter

        out: dict[str, Any] = {}
        if self.threshold is not None:
            stored = resolve_filter("auto", config)
            if stored is not None:
                d = stored.to_dict()
                d["threshold"] = float(self.threshold)
                out["region_filter"] = d
        if self.p_normal is not None:
            out["normal_gate"] = None if self.p_normal > 1.0 else float(self.p_normal)
        return out

    def save(self, folder: str | os.PathLike) -> Path:
        """Write ``folder/calibration.json`` atomically; return its path."""
        from busseg.data.io import atomic_write_bytes

        path = Path(folder) / CALIBRATION_NAME
        data = json.dumps({"format": "busseg-calibration", **asdict(self)}, indent=2)
        return atomic_write_bytes(path, data.encode(), overwrite=True)

    @classmethod
    def load(cls, folder: str | os.PathLike, checkpoint: str) -> Calibration | None:
        """Read ``folder/calibration.json`` (None when there is none).

        Raises
        ------
        CalibrationError
            If the file is corrupt, or was made for another checkpoint (the message says
            to delete it or to switch back to that checkpoint).
        """
        path = Path(folder) / CALIBRATION_NAME
        if not path.is_file():
            return None
        return cls._from_data(_read_file(path), path, checkpoint)

    @classmethod
    def _from_data(cls, data: dict, path: Path, checkpoint: str) -> Calibration:
        """Build the calibration stored in ``data`` (read from ``path``) for ``checkpoint``."""
        try:
            fields = set(cls.__dataclass_fields__)
            cal = cls(**{k: v for k, v in data.items() if k in fields})
        except TypeError as exc:
            raise _corrupt(path, exc) from exc
        if cal.checkpoint != checkpoint:
            raise CalibrationError(
                f"{path} was made for the checkpoint {cal.checkpoint}, not {checkpoint}; "
                "switch back to that checkpoint, or delete the file to calibrate anew")
        return cal


def _corrupt(path: Path, exc: Exception) -> CalibrationError:
    return CalibrationError(f"{path} is corrupt ({exc}); delete it, a new calibration is made "
                            "from the answers")


def _read_file(path: Path) -> dict:
    """Return a stored calibration file's JSON object; CalibrationError when corrupt."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict) or data.pop("format", None) != "busseg-calibration":
            raise ValueError("not a busseg calibration")
    except ValueError as exc:
        raise _corrupt(path, exc) from exc
    return data


def _cost_table(evidence: Sequence[CaseEvidence], thresholds: np.ndarray, accept_iou: float,
                prompt_cost: float) -> tuple[np.ndarray, np.ndarray]:
    """(n, M) cost of each case at each threshold without the gate, and (n,) when gated."""
    ungated = np.zeros((len(evidence), len(thresholds)))
    gated = np.zeros(len(evidence))
    for i, e in enumerate(evidence):
        keep = np.asarray(e.scores, float)[None, :] >= thresholds[:, None]  # (M, K)
        any_kept = keep.any(1)
        if not e.lesion:
            ungated[i] = any_kept
            continue
        gated[i] = prompt_cost
        inter = keep @ np.asarray(e.overlaps, float)
        union = e.answer_area + keep @ np.asarray(e.areas, float) - inter
        accepted = (union > 0) & (inter >= accept_iou * np.maximum(union, 1e-9))
        outside = (keep & np.asarray(e.outside, bool)[None, :]).any(1)
        ungated[i] = np.where(accepted, 0.0, prompt_cost + outside)
    return ungated, gated


def fit_calibration(evidence: Sequence[CaseEvidence], config: Mapping[str, Any], *,
                    checkpoint: str = "", min_gain: float = 1.0,
                    prompt_cost: float = PROMPT_COST) -> Calibration:
    """Choose the region-filter threshold and the gate on a site's answered cases.

    Parameters
    ----------
    evidence : sequence of CaseEvidence
        The answered cases (:func:`case_evidence`).
    config : mapping
        The checkpoint's config (``inference.region_filter`` and ``inference.normal_gate``:
        the settings kept when nothing saves ``min_gain``).
    checkpoint : str
        Identity recorded in the result.
    min_gain : float
        Interactions a candidate must save on the answers to replace the stored settings.
    prompt_cost : float
        Interactions of a lesion scan's boxes and clicks.

    Returns
    -------
    Calibration
    """
    inf = config.get("inference", {}) or {}
    stored_t = float((inf.get("region_filter") or {}).get("threshold", 0.0))
    gate = inf.get("normal_gate") or {}
    stored_g = float(gate.get("p_normal", 1.01))
    conf = float(gate.get("lesion_confidence", 1.0 + 1e-9))
    if not evidence:
        return Calibration(None, None, 0, 0.0, 0.0, 0, 0, checkpoint)
    scores = np.unique(np.concatenate([np.asarray(e.scores, float) for e in evidence]
                                      + [np.array([stored_t])]))
    # a threshold between two observed scores gives the masks of the score above it: try
    # each observed score (keeps it) and the next float above it (drops it)
    thresholds = np.unique(np.clip(np.concatenate([scores, np.nextafter(scores, 2.0)]),
                                   0.0, 1.0))
    ungated, gated_cost = _cost_table(evidence, thresholds, 0.85, prompt_cost)
    normal = np.array([not e.lesion for e in evidence])
    p_normal = np.array([-1.0 if e.p_normal is None else e.p_normal for e in evidence])
    peak = np.array([e.peak for e in evidence])
    t_stored = int(np.searchsorted(thresholds, stored_t))

    def totals(g: float) -> tuple[np.ndarray, np.ndarray]:
        gated = (p_normal >= g) & (peak < conf)
        cost = np.where(gated[:, None], gated_cost[:, None], ungated)  # (n, M)
        false = ((cost > 0) & normal[:, None]).sum(0)
        return cost.sum(0), false

    base_costs, base_false = totals(stored_g)
    base_cost = float(base_costs[t_stored])
    cal = Calibration(None, None, len(evidence), base_cost, base_cost,
                      int(base_false[t_stored]), int(base_false[t_stored]), checkpoint)
    best = (base_cost, 0.0, stored_t, stored_g, int(base_false[t_stored]))
    for g in sorted({stored_g, *GATE_GRID}):
        costs, false = totals(g)
        dist = np.abs(thresholds - stored_t) + abs(min(g, 1.01) - min(stored_g, 1.01))
        j = int(np.lexsort((dist, costs))[0])
        if (float(costs[j]), float(dist[j])) < best[:2]:
            best = (float(costs[j]), float(dist[j]), float(thresholds[j]), g, int(false[j]))
    if base_cost - best[0] >= min_gain:
        cal.threshold = None if best[2] == stored_t else float(best[2])
        cal.p_normal = None if best[3] == stored_g else float(best[3])
        cal.cost_after, cal.false_after = best[0], best[4]
    return cal


class SiteCalibrator:
    """A session's site calibration: evidence from each answer, a refit every few answers.

    :class:`busseg.session.AnnotationSession` holds one (``calibrate=True``). Its automatic
    predictions go through :meth:`predict` (one forward pass without the gate and the
    filter, then both applied with the calibrated settings, so the raw prediction is kept
    for the evidence); each recorded answer goes through :meth:`observe`. Evidence and
    calibration belong to one checkpoint: predicting or answering with another starts anew.

    Parameters
    ----------
    every : int
        Answers between two refits (>= 1); the first after ``every`` answers.
    min_gain : float
        As :func:`fit_calibration`.
    keep : int
        Raw predictions kept (the cases open or prefetched).
    """

    def __init__(self, every: int = 5, min_gain: float = 1.0, keep: int = 6) -> None:
        if int(every) < 1:
            raise ValueError(f"every must be at least 1, got {every}")
        self.every = int(every)
        self.min_gain = float(min_gain)
        self.keep = int(keep)
        self.checkpoint = ""
        self.evidence: list[CaseEvidence] = []
        self.calibration: Calibration | None = None
        self._raw: dict[int, tuple[str, Any, Any, str]] = {}
        # a prefetch worker predicts while the GUI thread records answers
        self._lock = threading.RLock()

    def _use(self, checkpoint: str) -> None:
        with self._lock:
            if checkpoint != self.checkpoint:  # another model: its answers say nothing here
                self.checkpoint = checkpoint
                self.evidence, self.calibration = [], None
                self._raw.clear()

    def settings_key(self) -> tuple:
        """Hashable summary of the calibration in use (part of a prediction cache key)."""
        c = self.calibration
        return ("calibration", None if c is None else (c.threshold, c.p_normal))

    def predict(self, index: int, image: np.ndarray, model: Any, checkpoint: str,
                settings: InferenceSettings | None = None, **kwargs: Any) -> np.ndarray:
        """Automatic mask of case ``index`` with the calibration in use.

        Parameters
        ----------
        index : int
            The case (its raw prediction is kept for :meth:`observe`).
        image : numpy.ndarray
            Its image.
        model : torch.nn.Module
            The checkpoint's model.
        checkpoint : str
            Identity of the checkpoint.
        settings : busseg.settings.InferenceSettings or None
            ``normal_gate`` and ``region_filter`` left at ``"auto"`` take the calibrated
            values; anything else is used as given. None: the defaults.
        **kwargs
            Fields of ``InferenceSettings`` overriding those of ``settings``; other keywords
            go to :func:`busseg.inference.predict`.

        Returns
        -------
        numpy.ndarray
            (H, W) bool.
        """
        from busseg.inference import apply_automatic_settings, predict

        settings, extra = InferenceSettings.from_call(settings, kwargs)
        self._use(checkpoint)
        gate, rfilter = settings.normal_gate, settings.region_filter
        raw_settings = settings.replace(normal_gate=None, region_filter=None)
        sig = repr((raw_settings.key(), sorted(extra.items())))
        with self._lock:
            held = self._raw.get(int(index))
        if held is not None and held[0] == checkpoint and held[3] == sig:
            raw = held[1]  # predicted before: only the settings changed, no forward pass
        else:
            raw = predict(image, model, raw_settings, **extra)
        cal = (self.calibration.predict_kwargs(model.busseg_config)
               if self.calibration is not None else {})
        if gate != "auto":
            cal["normal_gate"] = gate
        if rfilter != "auto":
            cal["region_filter"] = rfilter
        with self._lock:
            self._raw.pop(int(index), None)
            self._raw[int(index)] = (checkpoint, raw, rfilter, sig)
            while len(self._raw) > self.keep:
                self._raw.pop(next(iter(self._raw)))
        return apply_automatic_settings(raw, image, model, **cal)

    def observe(self, index: int, image: np.ndarray, answer: np.ndarray, checkpoint: str,
                model: Any) -> bool:
        """Add the answer to case ``index`` to the evidence; refit when due.

        Parameters
        ----------
        index : int
            The case (its raw prediction must have been made by :meth:`predict` with the
            same checkpoint; otherwise the answer is not used).
        image, answer : numpy.ndarray
            The image and the annotator's mask (> 0 = lesion; empty for "no lesion").
        checkpoint : str
            Identity of the checkpoint in use.
        model : torch.nn.Module
            That checkpoint's model (its stored filter and gate).

        Returns
        -------
        bool
            Whether the calibration was refitted.
        """
        from busseg.region_filter import resolve_filter

        self._use(checkpoint)
        with self._lock:
            held = self._raw.pop(int(index), None)
        if held is None or held[0] != checkpoint:
            return False
        _, raw, rfilter, _ = held
        if rfilter is None or rfilter is False:  # the filter is off: its threshold is moot
            return False
        config = model.busseg_config
        e = case_evidence(raw.mask, raw.proba, image, raw.class_proba,
                          resolve_filter("auto", config), answer)
        self.evidence.append(e)
        if len(self.evidence) % self.every:
            return False
        self.calibration = fit_calibration(self.evidence, config, checkpoint=checkpoint,
                                           min_gain=self.min_gain)
        return True

    def text(self) -> str:
        """One status line ("" before the first calibration)."""
        return "" if self.calibration is None else self.calibration.text()

    def save(self, folder: str | os.PathLike) -> Path | None:
        """Write the calibration and its evidence to ``folder/calibration.json`` atomically."""
        from busseg.data.io import atomic_write_bytes

        if self.calibration is None:
            return None
        data = {"format": "busseg-calibration", **asdict(self.calibration),
                "every": self.every, "evidence": [asdict(e) for e in self.evidence]}
        return atomic_write_bytes(Path(folder) / CALIBRATION_NAME,
                                  json.dumps(data).encode(), overwrite=True)

    def load(self, folder: str | os.PathLike, checkpoint: str) -> bool:
        """Read a stored calibration made for ``checkpoint``; return whether one was read.

        Raises
        ------
        CalibrationError
            As :meth:`Calibration.load` (corrupt, or made for another checkpoint); the
            calibrator then starts anew for ``checkpoint``.
        """
        self._use(checkpoint)
        path = Path(folder) / CALIBRATION_NAME
        if not path.is_file():
            return False
        data = _read_file(path)  # read once: the calibration and its evidence
        try:
            evidence = [CaseEvidence(**e) for e in data.pop("evidence", [])]
        except TypeError as exc:
            raise _corrupt(path, exc) from exc
        self.calibration = Calibration._from_data(data, path, checkpoint)
        self.evidence = evidence
        return True
