"""Duplicate-aware, class-stratified splits of BUSI-layout datasets.

BUSI holds many near-identical frames of one lesion, some filed under two classes
(Pawlowska, Karwat & Zolek, "Letter to the Editor re: Dataset of breast ultrasound images",
Data in Brief 48, 2023, 109247). A split by image leaks near-copies of test images into
training, so images are grouped by pixel similarity and whole groups are assigned to a split.

Similarity: each image is reduced to a 64x64 grey thumbnail, high-pass filtered (minus a
Gaussian blur, sigma 4 thumbnail pixels, which removes the overall brightness layout that all
ultrasound frames share and keeps speckle and edges), z-scored, and compared to every other by
Pearson correlation. On BUSI the per-image maximum correlation is bimodal, unrelated frames
below 0.45 and near-copies (re-captures, frames with and without calipers or a Doppler box)
above 0.45; pairs above ``threshold`` are linked and groups are the connected components.
"""

from __future__ import annotations

import csv
import os
from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from busseg.data.busi import BusiIndex, BusiRecord

SPLITS = ("train", "val", "test")
SPLIT_COLUMNS = ("image", "label", "group", "split")
# Order used to give a group one label for stratification: the most severe member wins.
_SEVERITY = {"malignant": 2, "benign": 1, "normal": 0}


def thumbnail_features(paths: Sequence[str | os.PathLike], size: int = 64) -> np.ndarray:
    """High-pass, z-scored thumbnails used to find near-duplicate frames.

    Parameters
    ----------
    paths : sequence of paths
        Image files (any format :func:`busseg.data.io.read_image` reads).
    size : int
        Thumbnail side in pixels.

    Returns
    -------
    numpy.ndarray
        (N, size * size) float64, each row of unit norm, so ``F @ F.T`` is the Pearson
        correlation matrix with values in [-1, 1].
    """
    from PIL import Image
    from scipy.ndimage import gaussian_filter

    from busseg.data.io import read_image

    rows = []
    for p in paths:
        thumb = Image.fromarray(read_image(p)).resize((size, size), Image.BILINEAR)
        a = np.asarray(thumb, dtype=np.float64)
        a = (a - gaussian_filter(a, sigma=size / 16)).ravel()
        a = (a - a.mean()) / (a.std() + 1e-8)
        rows.append(a / np.sqrt(a.size))
    return np.stack(rows) if rows else np.zeros((0, size * size))


def duplicate_groups(features: np.ndarray, threshold: float = 0.4) -> np.ndarray:
    """Group near-duplicate images by linking pairs whose correlation exceeds ``threshold``.

    Parameters
    ----------
    features : numpy.ndarray
        (N, D) unit-norm rows from :func:`thumbnail_features`.
    threshold : float
        Pearson correlation in (-1, 1) above which two images are linked.

    Returns
    -------
    numpy.ndarray
        (N,) int64 group ids 0..G-1 (connected components of the link graph).
    """
    from scipy.sparse import csr_matrix
    from scipy.sparse.csgraph import connected_components

    corr = features @ features.T
    np.fill_diagonal(corr, 0.0)
    _, labels = connected_components(csr_matrix(corr > threshold), directed=False)
    return labels.astype(np.int64)


def make_split(
    records: Sequence[BusiRecord],
    groups: Sequence[int],
    fractions: tuple[float, float, float] = (0.70, 0.15, 0.15),
    seed: int = 0,
) -> list[dict]:
    """Assign whole duplicate groups to train / val / test, stratified by class.

    Each group takes the label of its most severe member (malignant > benign > normal).
    Within each label the groups are shuffled with ``seed`` and filled into train, then
    val, then test until each split holds its share of that label's images.

    Parameters
    ----------
    records : sequence of BusiRecord
        The images, as from :func:`busseg.data.busi.discover_busi`.
    groups : sequence of int
        (N,) group id per record, as from :func:`duplicate_groups`.
    fractions : tuple of 3 floats
        Shares of images for train, val and test; must sum to 1.
    seed : int
        Seed of the shuffle; the same inputs and seed give the same split.

    Returns
    -------
    list of dict
        One row per record with keys ``image`` (path relative to the dataset root),
        ``label``, ``group`` and ``split``.

    Raises
    ------
    ValueError
        If the lengths differ or the fractions do not sum to 1.
    """
    if len(records) != len(groups):
        raise ValueError(f"{len(records)} records but {len(groups)} group ids")
    if abs(sum(fractions) - 1.0) > 1e-6 or len(fractions) != 3:
        raise ValueError(f"fractions must be three shares summing to 1, got {fractions}")
    members: dict[int, list[int]] = defaultdict(list)
    for i, g in enumerate(groups):
        members[int(g)].append(i)
    group_label = {
        g: max((records[i].label for i in idx), key=lambda lab: _SEVERITY.get(lab, -1))
        for g, idx in members.items()
    }
    rng = np.random.default_rng(seed)
    assignment: dict[int, str] = {}
    for label in sorted(set(group_label.values())):
        gs = sorted(g for g, lab in group_label.items() if lab == label)
        gs = [gs[i] for i in rng.permutation(len(gs))]
        total = sum(len(members[g]) for g in gs)
        bounds = np.cumsum(fractions) * total
        filled = 0
        for g in gs:
            k = int(np.searchsorted(bounds, filled + len(members[g]) / 2.0))
            assignment[g] = SPLITS[min(k, 2)]
            filled += len(members[g])
    return [
        {
            "image": r.rel_path,
            "label": r.label,
            "group": int(groups[i]),
            "split": assignment[int(groups[i])],
        }
        for i, r in enumerate(records)
    ]


def write_split_csv(path: str | os.PathLike, rows: Sequence[dict]) -> Path:
    """Write split rows (columns ``image,label,group,split``) as CSV.

    Parameters
    ----------
    path : str or os.PathLike
        Destination CSV; replaced atomically.
    rows : sequence of dict
        Rows as from :func:`make_split`.

    Returns
    -------
    pathlib.Path
        The written path.
    """
    import io

    from busseg.data.io import atomic_write_bytes

    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=SPLIT_COLUMNS, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: r[k] for k in SPLIT_COLUMNS})
    return atomic_write_bytes(path, buf.getvalue().encode(), overwrite=True)


def read_split_csv(path: str | os.PathLike) -> list[dict]:
    """Read a split CSV.

    Parameters
    ----------
    path : str or os.PathLike
        A CSV with columns ``image,label,group,split``.

    Returns
    -------
    list of dict
        Rows with ``group`` as int.

    Raises
    ------
    ValueError
        If a column is missing or a split name is not train/val/test.
    """
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        missing = set(SPLIT_COLUMNS) - set(reader.fieldnames or ())
        if missing:
            raise ValueError(
                f"{path} lacks the column(s) {sorted(missing)}; expected {SPLIT_COLUMNS}"
            )
        rows = []
        for r in reader:
            if r["split"] not in SPLITS:
                raise ValueError(
                    f"{path}: split {r['split']!r} for {r['image']} is not one of {SPLITS}"
                )
            rows.append({**r, "group": int(r["group"])})
    return rows


def select_split(
    index: BusiIndex, rows: Sequence[dict], split: str | Sequence[str]
) -> list[BusiRecord]:
    """Return the usable records of ``index`` that the split file puts in ``split``.

    Parameters
    ----------
    index : BusiIndex
        The dataset, from :func:`busseg.data.busi.discover_busi`.
    rows : sequence of dict
        Split rows from :func:`read_split_csv`.
    split : str or sequence of str
        ``"train"``, ``"val"``, ``"test"`` or several of them.

    Returns
    -------
    list of BusiRecord
        In split-file order.

    Raises
    ------
    ValueError
        If the split file names images the dataset lacks, or the dataset has images the
        split file does not list (the split was made for another copy of the data).
    """
    wanted = {split} if isinstance(split, str) else set(split)
    by_rel = index.by_rel_path()
    unknown = [r["image"] for r in rows if r["image"] not in by_rel]
    if unknown:
        raise ValueError(
            f"the split file lists {len(unknown)} image(s) missing from {index.root}, e.g. "
            f"{unknown[:3]}; point --data at the Dataset_BUSI_with_GT folder the split was made for"
        )
    listed = {r["image"] for r in rows}
    extra = [k for k in by_rel if k not in listed]
    if extra:
        raise ValueError(
            f"{len(extra)} image(s) of {index.root} are not in the split file, e.g. {extra[:3]}; "
            "make a split for this copy with training/make_split.py"
        )
    return [by_rel[r["image"]] for r in rows if r["split"] in wanted and by_rel[r["image"]].usable]


def split_summary(rows: Sequence[dict]) -> dict[str, dict[str, int]]:
    """Images per split and class, e.g. ``{"train": {"benign": 306, ...}, ...}``."""
    out: dict[str, dict[str, int]] = {}
    for s in SPLITS:
        out[s] = dict(sorted(Counter(r["label"] for r in rows if r["split"] == s).items()))
    return out
