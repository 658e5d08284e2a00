"""The region filter: drop regions of the automatic mask that are likely not lesions.

Qt-free; numpy and :mod:`scipy.ndimage` only (no torch), a few milliseconds per scan.

The automatic mask of a scan (thresholded probabilities, after the normal-scan gate) is cut
into its 8-connected components; each component gets the features of :data:`FEATURE_NAMES`
(:func:`component_features`) and a small classifier, a logistic regression whose parameters are
plain numbers stored in the checkpoint's ``config.json`` (``inference.region_filter``; never a
pickle), gives each component a probability of being a lesion. Components below the filter's
threshold are removed (:meth:`RegionFilter.apply`). It is applied in automatic mode only, never
to a mask that prompts (boxes, clicks) produced.

Why after the network and not in it: teaching the network normal scans traded lesion Dice at
other sites for fewer false regions; the filter decides per region, with features the network
does not see together (size, shape, place, echogenicity against the surroundings, the class
head's view of the whole image), and its threshold is chosen by the simulated annotation cost
(:mod:`busseg.annotator`), not by Dice (``training/fit_region_filter.py``).

A one-feature filter is a threshold rule: ``feature_names=["max_proba"]``, ``mean=[x0]``,
``scale=[1]``, ``coef=[1]``, ``intercept=0``, ``threshold=0.5`` keeps the components whose
``max_proba >= x0`` (``sigmoid(x - x0) >= 0.5``), so the simple rules compared with the
logistic regression (minimum area, minimum peak probability) use the same format.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = [
    "FEATURE_NAMES", "FilterResult", "RegionFilter", "component_features", "describe_filter",
    "label_components",
]

#: Component features, in the order of the rows of :func:`component_features`.
#: Each is documented in :func:`component_features`.
FEATURE_NAMES: tuple[str, ...] = (
    "log_area", "area_share", "mean_proba", "max_proba", "p90_proba", "share_095",
    "p_normal", "p_benign", "p_malignant", "n_components", "rank",
    "centroid_row", "centroid_col_offset", "log_aspect", "extent",
    "mean_inside", "mean_ring", "contrast", "std_inside",
)

#: 8-connectivity, as the annotator counts lesions (:func:`busseg.prompts.mask_to_boxes`).
_STRUCTURE = np.ones((3, 3), bool)
#: Width of the ring around a component, share of the image's shorter side (>= 2 pixels).
RING_SHARE = 0.02


def label_components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """8-connected components of a mask.

    Parameters
    ----------
    mask : numpy.ndarray
        (H, W) mask, any value > 0 is lesion.

    Returns
    -------
    labels : numpy.ndarray
        (H, W) int32, 0 background, 1..n the components (row-major order of first pixel).
    n : int
        Number of components.
    """
    from scipy import ndimage

    labels, n = ndimage.label(np.asarray(mask) > 0, structure=_STRUCTURE)
    return labels.astype(np.int32, copy=False), int(n)


def _grey(image: Any, shape: tuple[int, int]) -> np.ndarray:
    """Image as float32 z-scores over the image (the network's own normalisation)."""
    from busseg.data.io import to_grey

    g = to_grey(np.asarray(image)).astype(np.float32)
    if g.shape != shape:
        raise ValueError(f"image {g.shape} and mask {shape} differ in size; give the image "
                         "the mask was predicted from")
    sd = float(g.std())
    return (g - float(g.mean())) / (sd if sd > 1e-6 else 1.0)


def component_features(
    mask: np.ndarray, proba: np.ndarray, image: Any, class_proba: Mapping[str, float] | None,
    labels: tuple[np.ndarray, int] | None = None,
) -> np.ndarray:
    """Features of each connected component of an automatic mask.

    Parameters
    ----------
    mask : numpy.ndarray
        (H, W) automatic mask (> 0 = lesion).
    proba : numpy.ndarray
        (H, W) float lesion probabilities in [0, 1] the mask was thresholded from.
    image : numpy.ndarray
        (H, W) grey or (H, W, 3|4) colour image, any dtype :func:`busseg.data.io.to_grey`
        takes; intensities are z-scored over the whole image, so they compare across scanners.
    class_proba : mapping or None
        The class head's ``{"normal": p, "benign": p, "malignant": p}``; None (a model
        without a head) gives 1/3 each.
    labels : tuple, optional
        ``(labels, n)`` from :func:`label_components` when already computed.

    Returns
    -------
    numpy.ndarray
        (n, 19) float64, one row per component (label 1..n), columns :data:`FEATURE_NAMES`:

        - ``log_area``: log10 of the component's area as a share of the image area;
        - ``area_share``: its share of the whole mask's area, in (0, 1];
        - ``mean_proba``, ``max_proba``, ``p90_proba``: mean, maximum and 90th percentile of
          the lesion probability over the component;
        - ``share_095``: share of its pixels with probability >= 0.95;
        - ``p_normal``, ``p_benign``, ``p_malignant``: the class head's image probabilities;
        - ``n_components``: components in the mask; ``rank``: 1 for the largest, 2 ...;
        - ``centroid_row``: row of the centroid as a share of the height (0 top, 1 bottom:
          skin and shadows sit at the edges); ``centroid_col_offset``: distance of the
          centroid's column from the middle, share of the width, in [0, 0.5];
        - ``log_aspect``: log10 of bounding-box height over width (lesions tend to be wider
          than tall); ``extent``: area over bounding-box area, in (0, 1];
        - ``mean_inside``: mean z-scored intensity inside; ``mean_ring``: outside it within a
          ring of ``max(2, 0.02 * min(H, W))`` pixels (the 8-connected dilation, clipped to
          the image); ``contrast``: ring minus inside (lesions are mostly hypoechoic);
          ``std_inside``: intensity standard deviation inside.

        (0, 19) when the mask is empty.

    Raises
    ------
    ValueError
        If ``mask``, ``proba`` and ``image`` differ in size.
    """
    from scipy import ndimage

    mask = np.asarray(mask) > 0
    proba = np.asarray(proba, dtype=np.float32)
    if proba.shape != mask.shape:
        raise ValueError(f"proba {proba.shape} and mask {mask.shape} differ in size")
    lab, n = labels if labels is not None else label_components(mask)
    out = np.zeros((n, len(FEATURE_NAMES)), np.float64)
    if n == 0:
        return out
    H, W = mask.shape
    grey = _grey(image, mask.shape)
    cp = class_proba or {}
    classes = [float(cp.get(k, 1.0 / 3.0)) for k in ("normal", "benign", "malignant")]
    ring = max(2, int(round(RING_SHARE * min(H, W))))
    slices = ndimage.find_objects(lab)
    areas = np.bincount(lab.ravel(), minlength=n + 1)[1:].astype(np.float64)
    ranks = np.empty(n, np.int64)
    ranks[np.argsort(-areas, kind="stable")] = np.arange(1, n + 1)
    total = float(areas.sum())
    for k, sl in enumerate(slices):
        r0, r1 = max(sl[0].start - ring, 0), min(sl[0].stop + ring, H)
        c0, c1 = max(sl[1].start - ring, 0), min(sl[1].stop + ring, W)
        comp = lab[r0:r1, c0:c1] == k + 1
        p = proba[r0:r1, c0:c1][comp]
        g_crop = grey[r0:r1, c0:c1]
        g = g_crop[comp]
        around = ndimage.binary_dilation(comp, _STRUCTURE, iterations=ring) & ~comp
        g_ring = g_crop[around]
        rows, cols = np.nonzero(comp)
        h = sl[0].stop - sl[0].start
        w = sl[1].stop - sl[1].start
        inside = float(g.mean())
        outside = float(g_ring.mean()) if g_ring.size else inside
        out[k] = (
            math.log10(areas[k] / (H * W)), areas[k] / total,
            float(p.mean()), float(p.max()), float(np.percentile(p, 90)),
            float(np.count_nonzero(p >= 0.95)) / p.size,
            *classes, float(n), float(ranks[k]),
            (rows.mean() + r0 + 0.5) / H, abs((cols.mean() + c0 + 0.5) / W - 0.5),
            math.log10(h / w), areas[k] / (h * w),
            inside, outside, outside - inside, float(g.std()),
        )
    return out


@dataclass
class FilterResult:
    """What :meth:`RegionFilter.apply` did to one mask.

    Attributes
    ----------
    mask : numpy.ndarray
        (H, W) bool, the mask without the removed components.
    removed : int
        Number of components removed.
    kept : int
        Number of components kept.
    scores : numpy.ndarray
        (n,) float64 lesion probability of each component (label order).
    removed_mask : numpy.ndarray
        (H, W) bool, the pixels removed.
    """

    mask: np.ndarray
    removed: int
    kept: int
    scores: np.ndarray = field(repr=False)
    removed_mask: np.ndarray = field(repr=False)


def _number(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"region filter: {what} must be a number, got {value!r}; re-fit it "
                         "with training/fit_region_filter.py --write")
    v = float(value)
    if not math.isfinite(v):
        raise ValueError(f"region filter: {what} must be finite, got {value!r}; re-fit it "
                         "with training/fit_region_filter.py --write")
    return v


@dataclass
class RegionFilter:
    """A logistic regression on component features and a threshold on its output.

    ``P(lesion | component) = sigmoid(intercept + sum_j coef_j * (x_j - mean_j) / scale_j)``
    over the features ``feature_names`` (a subset of :data:`FEATURE_NAMES`, any order);
    components with ``P < threshold`` are removed (Cox, J. R. Stat. Soc. B 20, 1958, for the
    model; class-balanced fit in ``training/fit_region_filter.py``).

    Attributes
    ----------
    feature_names : list of str
        Features used, each in :data:`FEATURE_NAMES`.
    mean, scale : list of float
        Standardisation of each feature (``scale`` > 0).
    coef : list of float
        Coefficient of each standardised feature.
    intercept : float
    threshold : float
        In [0, 1]: components whose lesion probability is below it are removed (0 keeps all).
    kind : str
        ``"logistic"`` or the name of a simple rule (``"min_area"``, ``"max_proba"``), for
        descriptions only.
    info : dict
        Free-form provenance (plain JSON: data, date, command, chosen-by figures).
    """

    feature_names: list[str]
    mean: list[float]
    scale: list[float]
    coef: list[float]
    intercept: float
    threshold: float
    kind: str = "logistic"
    info: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        names = list(self.feature_names)
        if not names:
            raise ValueError("region filter: feature_names is empty; re-fit it with "
                             "training/fit_region_filter.py --write")
        unknown = [f for f in names if f not in FEATURE_NAMES]
        if unknown:
            raise ValueError(f"region filter: unknown feature(s) {unknown}; this version knows "
                             f"{', '.join(FEATURE_NAMES)} (upgrade busseg or re-fit the filter)")
        if len(set(names)) != len(names):
            raise ValueError(f"region filter: repeated feature names in {names}")
        for key in ("mean", "scale", "coef"):
            values = getattr(self, key)
            if not isinstance(values, (list, tuple)) or len(values) != len(names):
                raise ValueError(f"region filter: {key} must be a list of {len(names)} numbers "
                                 f"(one per feature), got {values!r}")
            setattr(self, key, [_number(v, f"{key}[{i}]") for i, v in enumerate(values)])
        if any(s <= 0 for s in self.scale):
            raise ValueError(f"region filter: scale must be > 0, got {self.scale}")
        self.feature_names = names
        self.intercept = _number(self.intercept, "intercept")
        self.threshold = _number(self.threshold, "threshold")
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"region filter: threshold must be in [0, 1] (a probability), "
                             f"got {self.threshold}")
        self._cols = np.array([FEATURE_NAMES.index(f) for f in names])
        self._mean = np.asarray(self.mean)
        self._scale = np.asarray(self.scale)
        self._coef = np.asarray(self.coef)

    # ------------------------------------------------------------------ (de)serialisation

    def to_dict(self) -> dict:
        """Plain-JSON form (lists of floats, strings), as stored in ``config.json``.

        Returns
        -------
        dict
            ``{"kind", "features", "mean", "scale", "coef", "intercept", "threshold",
            "info"}``.
        """
        return {"kind": self.kind, "features": list(self.feature_names),
                "mean": [float(v) for v in self.mean], "scale": [float(v) for v in self.scale],
                "coef": [float(v) for v in self.coef], "intercept": float(self.intercept),
                "threshold": float(self.threshold), "info": dict(self.info)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RegionFilter:
        """Rebuild a filter from :meth:`to_dict`'s output (a checkpoint's config).

        Parameters
        ----------
        data : mapping
            As written by :meth:`to_dict`.

        Returns
        -------
        RegionFilter

        Raises
        ------
        ValueError
            If a key is missing, a value is not a finite number, the lengths differ, a scale
            is not positive, the threshold is outside [0, 1] or a feature is unknown; the
            message names the field and says to re-fit the filter.
        """
        if not isinstance(data, Mapping):
            raise ValueError(f"region filter: expected a JSON object, got {type(data).__name__}"
                             "; re-fit it with training/fit_region_filter.py --write")
        missing = [k for k in ("features", "mean", "scale", "coef", "intercept", "threshold")
                   if k not in data]
        if missing:
            raise ValueError(f"region filter: missing key(s) {missing} in "
                             "inference.region_filter; re-fit it with "
                             "training/fit_region_filter.py --write")
        feats = data["features"]
        if not isinstance(feats, (list, tuple)) or not all(isinstance(f, str) for f in feats):
            raise ValueError(f"region filter: features must be a list of names, got {feats!r}")
        return cls(list(feats), data["mean"], data["scale"], data["coef"], data["intercept"],
                   data["threshold"], kind=str(data.get("kind", "logistic")),
                   info=dict(data.get("info") or {}))

    @classmethod
    def rule(cls, feature: str, minimum: float, **info: Any) -> RegionFilter:
        """Make a threshold rule in the filter's format: keep ``feature >= minimum``.

        Parameters
        ----------
        feature : str
            One of :data:`FEATURE_NAMES` (e.g. ``"log_area"``, ``"max_proba"``).
        minimum : float
            Components whose feature is below it are removed.
        **info
            Stored in :attr:`info`.

        Returns
        -------
        RegionFilter
        """
        kind = {"log_area": "min_area", "max_proba": "max_proba"}.get(feature, feature)
        return cls([feature], [float(minimum)], [1e-6], [1.0], 0.0, 0.5, kind=kind, info=info)

    # ------------------------------------------------------------------ inference

    def scores(self, features: np.ndarray) -> np.ndarray:
        """Lesion probability of each component.

        Parameters
        ----------
        features : numpy.ndarray
            (n, 19) from :func:`component_features` (all columns of :data:`FEATURE_NAMES`).

        Returns
        -------
        numpy.ndarray
            (n,) float64 in [0, 1].
        """
        x = np.asarray(features, np.float64)
        if x.ndim != 2 or x.shape[1] != len(FEATURE_NAMES):
            raise ValueError(f"features must be (n, {len(FEATURE_NAMES)}), got {x.shape}")
        z = self.intercept + ((x[:, self._cols] - self._mean) / self._scale) @ self._coef
        return 1.0 / (1.0 + np.exp(-np.clip(z, -500, 500)))

    def apply(self, mask: np.ndarray, proba: np.ndarray, image: Any,
              class_proba: Mapping[str, float] | None = None) -> FilterResult:
        """Remove the components whose lesion probability is below the threshold.

        Parameters
        ----------
        mask : numpy.ndarray
            (H, W) automatic mask (> 0 = lesion).
        proba : numpy.ndarray
            (H, W) float lesion probabilities the mask came from.
        image : numpy.ndarray
            (H, W) grey or (H, W, 3|4) colour image of the same size.
        class_proba : mapping or None
            The class head's probabilities (None: 1/3 each).

        Returns
        -------
        FilterResult
            The filtered mask (a new array) and what was removed.

        Raises
        ------
        ValueError
            If the arrays differ in size.
        """
        mask = np.asarray(mask) > 0
        lab, n = label_components(mask)
        if n == 0:
            empty = np.zeros_like(mask)
            return FilterResult(mask.copy(), 0, 0, np.zeros(0), empty)
        s = self.scores(component_features(mask, proba, image, class_proba, (lab, n)))
        drop = s < self.threshold
        removed = np.concatenate([[False], drop])[lab]
        return FilterResult(mask & ~removed, int(drop.sum()), int(n - drop.sum()), s, removed)

    def describe(self) -> str:
        """Say in one line what the filter does (``busseg info``, model cards)."""
        return describe_filter(self)

    def refit(self, features: np.ndarray, labels: np.ndarray, *, strength: float = 10.0,
              balanced: bool = True) -> RegionFilter:
        """Adapt the coefficients to a site's own decisions (milliseconds).

        Maximum a posteriori logistic regression with a Gaussian prior centred on this
        filter's coefficients and intercept: minimises the (class-balanced) log-loss of the
        site's components plus ``strength / 2 * ||theta - theta_0||^2`` in the standardised
        feature space (the standardisation, the features and the threshold are kept). With
        few site components the result stays near the shipped filter; with many it follows
        the site (a prior-regularised refit in the sense of Chelba & Acero, Computer Speech
        and Language 20, 2006).

        Parameters
        ----------
        features : numpy.ndarray
            (n, 19) component features (:func:`component_features`) of the site's automatic
            masks, before the filter.
        labels : numpy.ndarray
            (n,) bool or {0, 1}: 1 where the annotator kept the region (it overlaps the
            accepted or corrected mask), 0 where it was cleared or left out.
        strength : float
            Weight of the prior (> 0); larger stays closer to this filter.
        balanced : bool
            Weigh both classes equally, as the shipped fit does.

        Returns
        -------
        RegionFilter
            A new filter (this one is not changed); ``info["refit"]`` records n and strength.
            This filter itself when ``labels`` hold a single class or nothing.

        Raises
        ------
        ValueError
            If the shapes disagree or ``strength`` is not positive.
        """
        from scipy.optimize import minimize

        x = np.asarray(features, np.float64)
        y = np.asarray(labels).astype(np.float64).ravel()
        if x.ndim != 2 or x.shape[1] != len(FEATURE_NAMES) or len(y) != len(x):
            raise ValueError(f"features must be (n, {len(FEATURE_NAMES)}) with n labels, got "
                             f"{x.shape} and {y.shape}")
        if not strength > 0:
            raise ValueError(f"strength must be > 0, got {strength!r}")
        if len(y) == 0 or y.min() == y.max():
            return self
        z = (x[:, self._cols] - self._mean) / self._scale
        z = np.hstack([z, np.ones((len(z), 1))])
        theta0 = np.append(self._coef, self.intercept)
        n_pos = y.sum()
        w = (np.where(y > 0, len(y) / (2 * n_pos), len(y) / (2 * (len(y) - n_pos)))
             if balanced else np.ones_like(y))

        def loss(theta):
            t = z @ theta
            # log(1 + exp(-t)) for y = 1, log(1 + exp(t)) for y = 0, stably
            ll = np.logaddexp(0.0, np.where(y > 0, -t, t))
            p = 1.0 / (1.0 + np.exp(-np.clip(t, -500, 500)))
            d = theta - theta0
            grad = z.T @ (w * (p - y)) + strength * d
            return float(w @ ll + 0.5 * strength * d @ d), grad

        res = minimize(loss, theta0, jac=True, method="L-BFGS-B")
        theta = res.x
        info = {**self.info, "refit": {"n": int(len(y)), "n_lesion": int(n_pos),
                                       "strength": float(strength)}}
        return RegionFilter(list(self.feature_names), list(self.mean), list(self.scale),
                            theta[:-1].tolist(), float(theta[-1]), self.threshold,
                            kind=self.kind, info=info)


def describe_filter(spec: RegionFilter | Mapping[str, Any] | None) -> str:
    """Say in words what a region filter does.

    Parameters
    ----------
    spec : RegionFilter or mapping or None
        A filter, a checkpoint's ``inference.region_filter`` or None.

    Returns
    -------
    str
        E.g. ``"removes mask regions whose lesion probability (logistic regression on 19
        component features) is below 0.3"``; ``"none"`` without a filter.
    """
    if not spec:
        return "none"
    f = spec if isinstance(spec, RegionFilter) else RegionFilter.from_dict(spec)
    if len(f.feature_names) == 1 and f.threshold == 0.5 and f.intercept == 0.0 and f.coef[0] > 0:
        return f"removes mask regions whose {f.feature_names[0]} is below {f.mean[0]:.4g}"
    return (f"removes mask regions whose lesion probability ({f.kind} regression on "
            f"{len(f.feature_names)} component features) is below {f.threshold:.3g}")


def resolve_filter(region_filter: Any, config: Mapping[str, Any]) -> RegionFilter | None:
    """Return the filter a prediction applies (the inference API's ``region_filter``).

    Parameters
    ----------
    region_filter : "auto", None, False, RegionFilter or mapping
        ``"auto"``: the checkpoint's ``inference.region_filter`` (none stored: no filter);
        None or False: off; a :class:`RegionFilter` or its :meth:`~RegionFilter.to_dict`.
    config : mapping
        The checkpoint config.

    Returns
    -------
    RegionFilter or None

    Raises
    ------
    ValueError
        For any other value, or a stored filter that does not validate.
    """
    if region_filter is None or region_filter is False:
        return None
    if isinstance(region_filter, RegionFilter):
        return region_filter
    if isinstance(region_filter, str):
        if region_filter != "auto":
            raise ValueError(f"region_filter must be 'auto', None, False or a RegionFilter, "
                             f"got {region_filter!r}")
        stored = (config.get("inference") or {}).get("region_filter")
        return _cached_from_config(stored) if stored else None
    if isinstance(region_filter, Mapping):
        return RegionFilter.from_dict(region_filter)
    raise ValueError(f"region_filter must be 'auto', None, False or a RegionFilter, got "
                     f"{type(region_filter).__name__}")


_CACHE: dict[int, tuple[Any, RegionFilter]] = {}


def _cached_from_config(stored: Mapping[str, Any]) -> RegionFilter:
    """Parse a stored filter once per config object (predictions call this per scan)."""
    hit = _CACHE.get(id(stored))
    if hit is not None and hit[0] is stored:
        return hit[1]
    f = RegionFilter.from_dict(stored)
    if len(_CACHE) > 32:
        _CACHE.clear()
    _CACHE[id(stored)] = (stored, f)
    return f


def feature_table(rows: Sequence[np.ndarray]) -> np.ndarray:
    """Stack per-scan feature arrays into one (N, 19) array (empty scans add nothing)."""
    rows = [np.asarray(r, np.float64).reshape(-1, len(FEATURE_NAMES)) for r in rows]
    return np.concatenate(rows) if rows else np.zeros((0, len(FEATURE_NAMES)))
