"""Uncertainty ranking: choose the image the annotator should correct next.

Qt-free core of the active-learning ranking (the Scan browser and ``busseg rank`` only display
and sort what this module computes). One forward pass per image gives the plain and the
left-right flipped prediction (:func:`busseg.inference.predict_logits_batch` with
``tta=True``); from them :func:`uncertainty_score` derives a scalar score in [0, 1] and its
components, all at the network's input resolution (e.g. 160 x 160):

``entropy``
    Mean binary entropy, in bits, of the (flip-averaged) lesion probability ``p`` over a
    region around the predicted lesion, ``H(p) = -p log2 p - (1 - p) log2 (1 - p)`` in
    [0, 1]. The predictive entropy is the uncertainty measure of Gal & Ghahramani (2016) and
    Kendall & Gal (2017); averaged over test-time augmentations it is the "aleatoric"
    estimate of Wang et al. (2019). The region is the predicted lesion ``p >= t`` (``t`` the
    checkpoint's threshold) dilated by a border band: every pixel within a Euclidean
    distance of ``border`` pixels of it (default 3 % of the shorter side of the network
    input, 5 px at 160 x 160). Averaging over this region, rather than the whole image,
    keeps the confident background of a large image from diluting an unsure lesion edge.
    When nothing is predicted, the region is the pixels with ``p > 0.1`` (a lesion the model
    half-sees but does not call: the likeliest miss); when there are none either, the whole
    image (its mean entropy is then near 0: the model is sure there is nothing).
    ``entropy_region`` says which was used.
``flip_disagreement``
    ``1 - Dice`` between the thresholded plain and flipped-back predictions (0 when both are
    empty). A lesion boundary that moves when the image is mirrored is not a property of the
    image; disagreement between test-time augmentations is the measure of Wang et al.
    (2019), and what MONAI Label's test-time-augmentation active-learning strategy scores
    (Diaz-Pinto et al., 2024). ``None`` with ``tta=False``.
``class_entropy``
    Shannon entropy of the lesion-class head (normal / benign / malignant) divided by
    ``log 3`` (so in [0, 1]), where the model has such a head
    (``busseg.inference.has_class_head``); ``None`` otherwise.

``score`` is the plain mean of the components that are not ``None``; each is in [0, 1] and
none is known to be the better one for ultrasound, so none is weighted up. Images are ranked
by ``score``, highest first.

Whether this beats choosing at random must be measured, not assumed: random selection is a
strong baseline in medical image segmentation (Gaillochet et al., 2023; Lüth et al., nnActive,
2024). ``benchmarks/active_learning.py`` measures it on BUS-BRA.

References
----------
Y. Gal, Z. Ghahramani. Dropout as a Bayesian approximation: representing model uncertainty in
deep learning. ICML 2016.

A. Kendall, Y. Gal. What uncertainties do we need in Bayesian deep learning for computer
vision? NeurIPS 2017.

G. Wang, W. Li, M. Aertsen, J. Deprest, S. Ourselin, T. Vercauteren. Aleatoric uncertainty
estimation with test-time augmentation for medical image segmentation with convolutional
neural networks. Neurocomputing 338 (2019) 34-45.

A. Diaz-Pinto et al. MONAI Label: a framework for AI-assisted interactive labeling of 3D
medical images. Medical Image Analysis 95 (2024) 103207 (its active-learning strategies:
random, first, and test-time-augmentation / dropout "epistemic" scores).

M. Gaillochet, C. Desrosiers, H. Lombaert. Active learning for medical image segmentation with
stochastic batches. Medical Image Analysis (2023).

C. Lüth et al. nnActive: a framework for evaluation of active learning in 3D biomedical
segmentation. arXiv (2024).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import threading
from collections import OrderedDict
from collections.abc import Generator, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "CLASS_NAMES",
    "COMPONENTS",
    "RankEntry",
    "Ranking",
    "UncertaintyCache",
    "checkpoint_key",
    "default_cache",
    "image_key",
    "rank",
    "rank_iter",
    "scores_from_logits",
    "uncertainty_score",
    "write_ranking_csv",
]

#: Components of the score, in CSV column order.
COMPONENTS = ("entropy", "flip_disagreement", "class_entropy")
#: Classes of the optional class head, in the order of ``busseg.classify``'s dict.
CLASS_NAMES = ("normal", "benign", "malignant")
#: Probability above which a pixel counts as "half-seen" when nothing is predicted.
CANDIDATE_PROBABILITY = 0.1
#: Default border band, as a fraction of the shorter side of the network input.
BORDER_FRACTION = 0.03
#: Bumped whenever the score's definition changes, so cached scores are recomputed.
SCORE_VERSION = 1

_EPS = 1e-7


# --------------------------------------------------------------------------- the score


def _binary_entropy(p: np.ndarray) -> np.ndarray:
    """Binary entropy in bits of probabilities ``p`` (any shape), in [0, 1]."""
    q = np.clip(p.astype(np.float64), _EPS, 1.0 - _EPS)
    return -(q * np.log2(q) + (1.0 - q) * np.log2(1.0 - q))


def _border_px(shape: tuple[int, int], border: float | None) -> float:
    if border is None:
        return max(1.0, round(BORDER_FRACTION * min(shape)))
    if isinstance(border, bool) or not isinstance(border, (int, float)) or border < 0:
        raise ValueError(f"border must be a non-negative number of pixels, got {border!r}")
    return float(border)


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    denom = int(np.count_nonzero(a)) + int(np.count_nonzero(b))
    return 1.0 if denom == 0 else 2.0 * int(np.count_nonzero(a & b)) / denom


def scores_from_logits(
    logits: Any, threshold: float = 0.5, *, border: float | None = None
) -> dict[str, Any]:
    """Entropy and flip-disagreement components from the logits of one image.

    Parameters
    ----------
    logits : numpy.ndarray or torch.Tensor
        (V, h, w) or (1, V, h, w) float logits at the network's input size: view 0 the plain
        image, view 1 (optional) the mirrored image's logits mirrored back, as returned by
        :func:`busseg.inference.predict_logits_batch`.
    threshold : float
        Probability threshold in (0, 1) of the predicted lesion.
    border : float or None
        Width in pixels (network input scale) of the band around the predicted lesion;
        ``None``: 3 % of the shorter side (5 px at 160 x 160).

    Returns
    -------
    dict
        ``entropy`` (float in [0, 1], bits), ``entropy_region`` (``"lesion+border"``,
        ``"p>0.1"`` or ``"image"``), ``region_fraction`` (share of the pixels averaged over),
        ``lesion_fraction`` (share predicted lesion), ``flip_disagreement`` (float in [0, 1],
        or None with one view).

    Raises
    ------
    ValueError
        If ``logits`` is not (V, h, w) / (1, V, h, w) with V in {1, 2}, or ``threshold`` is
        outside (0, 1).
    """
    from scipy import ndimage

    if hasattr(logits, "detach"):
        logits = logits.detach().float().cpu().numpy()
    lg = np.asarray(logits, dtype=np.float64)
    if lg.ndim == 4 and lg.shape[0] == 1:
        lg = lg[0]
    if lg.ndim != 3 or lg.shape[0] not in (1, 2) or lg.shape[1] < 1 or lg.shape[2] < 1:
        raise ValueError(f"logits must be (V, h, w) or (1, V, h, w) with V 1 or 2, got "
                         f"{np.shape(logits)}")
    if not 0.0 < float(threshold) < 1.0:
        raise ValueError(f"threshold must be in (0, 1), got {threshold!r}")
    views = 1.0 / (1.0 + np.exp(-np.clip(lg, -60.0, 60.0)))
    proba = views.mean(axis=0)
    lesion = proba >= threshold
    if lesion.any():
        band = _border_px(lesion.shape, border)
        region = ndimage.distance_transform_edt(~lesion) <= band
        where = "lesion+border"
    else:
        region = proba > CANDIDATE_PROBABILITY
        where = f"p>{CANDIDATE_PROBABILITY:g}"
        if not region.any():
            region = np.ones_like(lesion)
            where = "image"
    ent = _binary_entropy(proba)
    out: dict[str, Any] = {
        "entropy": float(ent[region].mean()),
        "entropy_region": where,
        "region_fraction": float(region.mean()),
        "lesion_fraction": float(lesion.mean()),
        "flip_disagreement": None,
    }
    if views.shape[0] == 2:
        out["flip_disagreement"] = 1.0 - _dice(views[0] >= threshold, views[1] >= threshold)
    return out


def class_entropy(probabilities: Mapping[str, float] | None) -> float | None:
    """Normalised entropy of a class head's probabilities.

    Parameters
    ----------
    probabilities : mapping or None
        ``{"normal": p, "benign": p, "malignant": p}`` (as ``busseg.classify`` returns), or
        None for a model without a class head.

    Returns
    -------
    float or None
        ``-sum p log p / log K`` over the K classes, in [0, 1] (1 = uniform, 0 = certain);
        None without probabilities or when they are not finite.
    """
    if probabilities is None:
        return None
    p = np.array([float(v) for v in probabilities.values()], dtype=np.float64)
    if p.size < 2 or not np.isfinite(p).all():
        return None
    p = np.clip(p / max(p.sum(), _EPS), _EPS, 1.0)
    return float(-(p * np.log(p)).sum() / math.log(p.size))


def _combine(components: Mapping[str, Any]) -> float:
    vals = [float(components[k]) for k in COMPONENTS if components.get(k) is not None]
    return float(np.mean(vals)) if vals else math.nan


def uncertainty_score(
    image: Any,
    model: Any = None,
    *,
    tta: bool = True,
    threshold: float | None = None,
    border: float | None = None,
) -> dict[str, Any]:
    """Uncertainty of one image's prediction: a scalar score and its components.

    See the module docstring for the exact definitions and the papers they come from.

    Parameters
    ----------
    image : numpy.ndarray
        (H, W) grey, (H, W, 3) RGB or (H, W, 4) RGBA; uint8, uint16, bool or float (as
        :func:`busseg.inference.predict_proba`).
    model : torch.nn.Module or str or os.PathLike or None
        A model from :func:`busseg.load_model`, a checkpoint path, or None (the shipped
        default model).
    tta : bool
        Run the mirrored image too (in the same forward pass): needed for
        ``flip_disagreement``, and the entropy is then that of the flip-averaged
        probability. False: one view, ``flip_disagreement`` is None.
    threshold : float or None
        Probability threshold in (0, 1) of the predicted lesion; None uses the checkpoint's
        ``inference.threshold``.
    border : float or None
        Border band in pixels at the network's input size; None: 3 % of its shorter side.

    Returns
    -------
    dict
        ``score`` (float in [0, 1], higher = less certain: the mean of the components that
        are not None), ``entropy``, ``flip_disagreement``, ``class_entropy`` (floats in
        [0, 1] or None), ``entropy_region``, ``region_fraction``, ``lesion_fraction``,
        ``class_probabilities`` (dict or None) and ``threshold``.

    Raises
    ------
    ValueError
        If the image is not a valid 2D image (see :func:`busseg.inference.preprocess`) or
        the threshold is outside (0, 1).
    busseg.models.CheckpointError
        If ``model`` is a path (or None) and the checkpoint cannot be loaded.
    """
    from busseg.inference import (
        check_image,
        class_dict,
        forward,
        has_class_head,
        model_config,
        model_multiple,
        preprocess,
        resolve_model,
        resolve_threshold,
    )

    model = resolve_model(model)
    arr = check_image(image)
    cfg = model_config(model)
    t = resolve_threshold(threshold, cfg)
    prep = cfg.get("preprocessing", {})
    x = preprocess(arr, prep, multiple=model_multiple(model, cfg))
    # one forward pass gives both views and, for a model with a head, the class probabilities
    logits, class_proba = forward(x, model, tta=bool(tta), with_class=has_class_head(model))
    if prep.get("input_size") is None:  # native size: drop the reflection padding
        logits = logits[..., : arr.shape[0], : arr.shape[1]]
    out = scores_from_logits(logits, t, border=border)
    probs = class_dict(model, class_proba[0]) if class_proba is not None else None
    out["class_entropy"] = class_entropy(probs)
    out["class_probabilities"] = probs
    out["threshold"] = t
    out["score"] = _combine(out)
    return out


# --------------------------------------------------------------------------- cache keys


def checkpoint_key(model_or_path: Any = None) -> tuple | None:
    """Identify a checkpoint by its folder and its files' modification time, size and inode.

    The checkpoint's identity (:func:`busseg.checkpoint_id.checkpoint_identity`), the key
    :func:`busseg.inference.load_model` caches models by, so a checkpoint rewritten in place
    gets a new key.

    Parameters
    ----------
    model_or_path : torch.nn.Module or str or os.PathLike or None
        A model from :func:`busseg.load_model` (its ``busseg_checkpoint_path``), a checkpoint
        folder (or a file in it), or None for the shipped default model.

    Returns
    -------
    tuple or None
        ``(folder, files_key)`` (:func:`busseg.checkpoint_id.files_key`); None for a model
        that does not come from a checkpoint folder (its scores are then not cached).

    Raises
    ------
    busseg.models.CheckpointError
        If a path is given whose checkpoint files are missing.
    """
    from busseg.checkpoint_id import checkpoint_identity

    if model_or_path is None or isinstance(model_or_path, (str, os.PathLike)):
        path = model_or_path
    else:
        path = getattr(model_or_path, "busseg_checkpoint_path", None)
        if path is None:
            return None
    return checkpoint_identity(path, explain=True)


def image_key(item: Any) -> tuple:
    """Identify an image: a file by (resolved path, mtime, size), an array by its hash.

    Parameters
    ----------
    item : str or os.PathLike or numpy.ndarray
        An image file or an image array.

    Returns
    -------
    tuple
        ``("file", path, mtime_ns, size)`` or ``("array", sha1 of shape, dtype and bytes)``.

    Raises
    ------
    FileNotFoundError
        If the file does not exist.
    """
    if isinstance(item, (str, os.PathLike)):
        p = Path(item).expanduser()
        try:
            p = p.resolve()
        except OSError:  # pragma: no cover - unresolvable: stat reports it
            pass
        st = os.stat(p)
        return ("file", str(p), st.st_mtime_ns, st.st_size)
    arr = np.ascontiguousarray(np.asarray(item))
    h = hashlib.sha1(f"{arr.shape}|{arr.dtype.str}|".encode())
    h.update(memoryview(arr.reshape(-1).view(np.uint8)))
    return ("array", h.hexdigest())


def _settings_key(tta: bool, threshold: float | None, border: float | None) -> tuple:
    return (SCORE_VERSION, bool(tta), threshold, border)


class UncertaintyCache:
    """Scores cached by (checkpoint, image, settings); optionally kept in a JSON file.

    Thread-safe (the napari worker writes while the GUI reads). Keys hold the checkpoint
    folder with its files' modification times and sizes (:func:`checkpoint_key`) and the
    image's path with its modification time and size, or the hash of an array
    (:func:`image_key`): re-ranking with the same checkpoint costs nothing, a new or
    rewritten checkpoint or image is scored again.

    Parameters
    ----------
    path : str or os.PathLike, optional
        A JSON file to load from (when it exists and is valid) and :meth:`save` to,
        atomically. None: in memory only.
    max_entries : int
        Oldest entries are dropped beyond this many.
    """

    def __init__(self, path: str | os.PathLike | None = None, max_entries: int = 100_000):
        self.path = Path(path).expanduser() if path is not None else None
        self.max_entries = int(max_entries)
        self._data: OrderedDict[str, dict] = OrderedDict()
        self._lock = threading.Lock()
        self._dirty = False
        if self.path is not None and self.path.is_file():
            self._load()

    @staticmethod
    def key(checkpoint: tuple, image: tuple, settings: tuple) -> str:
        """Return the string key of one (checkpoint, image, settings) triple."""
        return json.dumps([checkpoint, image, settings], separators=(",", ":"), default=str)

    def _load(self) -> None:
        try:
            raw = json.loads(self.path.read_text(encoding="utf-8"))
            entries = raw["entries"] if raw.get("version") == SCORE_VERSION else {}
        except (OSError, ValueError, KeyError, AttributeError, TypeError):
            entries = {}  # an unreadable cache is only a slower ranking
        if isinstance(entries, dict):
            self._data.update((k, v) for k, v in entries.items() if isinstance(v, dict))

    def get(self, key: str) -> dict | None:
        """Return a copy of the cached result for ``key``, or None."""
        with self._lock:
            value = self._data.get(key)
            return dict(value) if value is not None else None

    def put(self, key: str, value: Mapping[str, Any]) -> None:
        """Store a result (a JSON-serialisable dict)."""
        with self._lock:
            self._data[key] = dict(value)
            self._data.move_to_end(key)
            while len(self._data) > self.max_entries:
                self._data.popitem(last=False)
            self._dirty = True

    def __len__(self) -> int:
        with self._lock:
            return len(self._data)

    def clear(self) -> None:
        """Forget every entry."""
        with self._lock:
            self._data.clear()
            self._dirty = True

    def save(self) -> Path | None:
        """Write the cache to its JSON file atomically (no-op in memory or when unchanged).

        Returns
        -------
        pathlib.Path or None
            The file written, or None.
        """
        from busseg.data.io import atomic_write_bytes

        if self.path is None or not self._dirty:
            return None
        with self._lock:
            payload = {"version": SCORE_VERSION, "entries": dict(self._data)}
            self._dirty = False
        text = json.dumps(payload, separators=(",", ":"))
        return atomic_write_bytes(self.path, text.encode("utf-8"), overwrite=True)


_DEFAULT_CACHE = UncertaintyCache()


def default_cache() -> UncertaintyCache:
    """Return the process-wide in-memory cache (shared by the browser widgets and :func:`rank`)."""
    return _DEFAULT_CACHE


# --------------------------------------------------------------------------- ranking


@dataclass
class RankEntry:
    """One ranked image.

    Attributes
    ----------
    index : int
        Position of the image in the input sequence.
    name : str
        The file path (as given) or ``"image <index>"`` for an array.
    score : float
        In [0, 1], higher = less certain; nan when the image could not be scored.
    components : dict
        ``entropy``, ``flip_disagreement``, ``class_entropy`` and the other keys of
        :func:`uncertainty_score`.
    cached : bool
        Whether the score came from the cache.
    error : str or None
        Why the image could not be scored (unreadable file ...).
    path : pathlib.Path or None
        The image file, when a path was given.
    """

    index: int
    name: str
    score: float
    components: dict = field(default_factory=dict)
    cached: bool = False
    error: str | None = None
    path: Path | None = None


@dataclass
class Ranking:
    """What :func:`rank_iter` returns.

    Attributes
    ----------
    entries : list of RankEntry
        Highest score first; ties and unscored images (nan, errors) in input order, last.
    checkpoint : str or None
        The checkpoint folder used (None for a model without one).
    checkpoint_key : tuple or None
        Its :func:`checkpoint_key`.
    n_cached : int
        How many scores came from the cache.
    complete : bool
        False when ``stop`` ended the ranking early (only the images done are listed).
    """

    entries: list[RankEntry]
    checkpoint: str | None
    checkpoint_key: tuple | None
    n_cached: int = 0
    complete: bool = True

    def order(self) -> list[int]:
        """Input indices, most uncertain first."""
        return [e.index for e in self.entries]


def _sort_entries(entries: Iterable[RankEntry]) -> list[RankEntry]:
    def key(e: RankEntry):
        bad = e.score is None or not math.isfinite(e.score)
        return (bad, 0.0 if bad else -e.score, e.index)

    return sorted(entries, key=key)


def _stopped(stop: Any) -> bool:
    if stop is None:
        return False
    if hasattr(stop, "is_set"):
        return bool(stop.is_set())
    return bool(stop())


def _jsonable(result: Mapping[str, Any]) -> dict:
    out = {}
    for k, v in result.items():
        if isinstance(v, (np.floating, np.integer)):
            v = v.item()
        out[k] = v
    return out


def rank_iter(
    items: Sequence[Any],
    model: Any = None,
    *,
    cache: UncertaintyCache | bool | None = True,
    stop: Any = None,
    tta: bool = True,
    threshold: float | None = None,
    border: float | None = None,
    device: str = "auto",
    names: Sequence[str] | None = None,
) -> Generator[tuple, None, Ranking]:
    """Score images and rank them by uncertainty, yielding progress (a worker job).

    A generator (DESIGN practice 2): napari wraps it in a ``thread_worker``; scripts and the
    CLI drain it with :func:`rank`.

    Parameters
    ----------
    items : sequence of path or numpy.ndarray
        Image files (read with :func:`busseg.data.io.read_image`) or image arrays.
    model : torch.nn.Module or str or os.PathLike or None
        A loaded model, a checkpoint folder, or None (the shipped default model). Paths are
        loaded with :func:`busseg.load_model` on ``device``.
    cache : UncertaintyCache or bool or None
        True (default): the process-wide :func:`default_cache`; an :class:`UncertaintyCache`;
        False or None: no caching.
    stop : threading.Event or callable, optional
        Checked before each image (``is_set()`` or a call); when set, the images scored so
        far are returned with ``complete=False``.
    tta, threshold, border
        As in :func:`uncertainty_score`.
    device : str
        Where to load a model given as a path: ``"auto"``, ``"cuda"``, ``"mps"``, ``"cpu"``.
    names : sequence of str, optional
        Display names, one per item (default: the path, or ``"image <i>"``).

    Yields
    ------
    tuple
        ``("status", message)`` while loading the model, then
        ``("progress", done, total, entry)`` after each image (``entry`` a
        :class:`RankEntry`, so a GUI can show scores as they arrive).

    Returns
    -------
    Ranking

    Raises
    ------
    busseg.models.CheckpointError
        If the checkpoint cannot be loaded.
    ValueError
        If ``names`` has another length than ``items``, or for an unknown device. An image
        that cannot be read or scored does not raise: its entry has ``error`` set and a nan
        score.
    """
    from busseg.data.io import read_image
    from busseg.inference import load_model

    items = list(items)
    if names is not None and len(names) != len(items):
        raise ValueError(f"{len(names)} names for {len(items)} images")
    if cache is True:
        cache = default_cache()
    elif cache is False:
        cache = None
    if model is None or isinstance(model, (str, os.PathLike)):
        where = "the shipped default model" if model is None else str(model)
        yield ("status", f"loading {where} …")
        ckey = checkpoint_key(model)  # before loading: the key of the files that get loaded
        model = load_model(model, device=device)
    else:
        ckey = checkpoint_key(model)
    settings = _settings_key(tta, threshold, border)
    total = len(items)
    entries: list[RankEntry] = []
    n_cached = 0
    complete = True
    yield ("progress", 0, total, None)
    for i, item in enumerate(items):
        if _stopped(stop):
            complete = False
            break
        is_path = isinstance(item, (str, os.PathLike))
        name = names[i] if names is not None else (str(item) if is_path else f"image {i}")
        path = Path(item) if is_path else None
        entry = RankEntry(i, name, math.nan, path=path)
        try:
            key = None
            if cache is not None and ckey is not None:
                key = UncertaintyCache.key(ckey, image_key(item), settings)
                hit = cache.get(key)
                if hit is not None:
                    entry.score, entry.components, entry.cached = hit["score"], hit, True
                    n_cached += 1
            if not entry.cached:
                image = read_image(item) if is_path else item
                result = _jsonable(uncertainty_score(
                    image, model, tta=tta, threshold=threshold, border=border
                ))
                entry.score, entry.components = result["score"], result
                if key is not None:
                    cache.put(key, result)
        except (OSError, ValueError) as exc:
            entry.error = str(exc)
        entries.append(entry)
        yield ("progress", i + 1, total, entry)
    return Ranking(_sort_entries(entries), getattr(model, "busseg_checkpoint_path", None),
                   ckey, n_cached, complete)


def rank(items: Sequence[Any], model: Any = None, **kwargs: Any) -> Ranking:
    """Run :func:`rank_iter` to the end and return its :class:`Ranking`.

    Parameters
    ----------
    items, model, **kwargs
        As in :func:`rank_iter`.

    Returns
    -------
    Ranking
    """
    gen = rank_iter(items, model, **kwargs)
    while True:
        try:
            next(gen)
        except StopIteration as done:
            return done.value


# --------------------------------------------------------------------------- output


def _fmt(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return "" if not math.isfinite(v) else f"{v:.6f}"
    return str(v)


def write_ranking_csv(
    ranking: Ranking,
    path: str | os.PathLike,
    *,
    labels: Mapping[int, str | None] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a ranking as CSV, atomically.

    Columns: ``rank`` (1 = most uncertain; empty for unscored images), ``path``, ``score``,
    ``entropy``, ``flip_disagreement``, ``class_entropy``, ``entropy_region``, ``cached``,
    ``error``, and ``class`` (the BUSI class folder) when ``labels`` is given.

    Parameters
    ----------
    ranking : Ranking
        From :func:`rank_iter` / :func:`rank`.
    path : str or os.PathLike
        The CSV file; its folder is created.
    labels : mapping of int to str, optional
        Class per input index (e.g. ``"benign"``); adds the ``class`` column.
    overwrite : bool
        Replace an existing file. Without it an existing file raises.

    Returns
    -------
    pathlib.Path
        The written file.

    Raises
    ------
    FileExistsError
        If ``path`` exists and ``overwrite`` is False.
    """
    from busseg.data.io import atomic_write_bytes

    columns = ["rank", "path", "score", *COMPONENTS, "entropy_region", "cached", "error"]
    if labels is not None:
        columns.append("class")
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(columns)
    r = 0
    for e in ranking.entries:
        scored = e.score is not None and math.isfinite(e.score)
        r += scored
        row = [r if scored else "", e.name, _fmt(e.score)]
        row += [_fmt(e.components.get(k)) for k in COMPONENTS]
        row += [e.components.get("entropy_region", ""), int(e.cached), e.error or ""]
        if labels is not None:
            row.append(labels.get(e.index) or "")
        w.writerow(row)
    return atomic_write_bytes(path, buf.getvalue().encode("utf-8"), overwrite=overwrite)
