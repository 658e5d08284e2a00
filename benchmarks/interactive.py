"""Interactive segmentation: box prompts, click prompts (NoC) and time per prompt.

Usage (from the repository root)::

    python benchmarks/interactive.py --baseline-checkpoint /tmp/old_default
    python benchmarks/interactive.py --checkpoint runs/x/best --limit 20 --widget-images 0 \
        --out /tmp/bench
    # a candidate checkpoint, quickly: BUSI test only, box then clicks only, no widget, no
    # baseline, set against an earlier run of the shipped model (its interactive.json)
    python benchmarks/interactive.py --checkpoint runs/cand/best --datasets busi \
        --protocols box-clicks --widget-images 0 --threads 1 \
        --compare benchmarks/results/interactive.json --out /tmp/cand
    # the full run on 2 cores, images shared by two 1-thread workers:
    xvfb-run -a python benchmarks/interactive.py --checkpoint runs/v3/best \
        --baseline-checkpoint runs/old_default --jobs 2 --threads 1

Two models on the BUSI test-split lesion images (benign and malignant; normal images have no
lesion to prompt), on BUS-BRA fold 1 (every image has one lesion) and on the lesion scans of
the BUS-UCLM test patients (``--busuclm``, split ``--busuclm-split`` =
``training/splits/busuclm.csv``; scans whose image and mask differ in size are skipped and
listed):

- the **prompt model** (``--checkpoint``, default the shipped default model), a network with
  guidance channels (:func:`busseg.inference.accepts_prompts`), given boxes or clicks;
- the **crop-to-box baseline** (``--baseline-checkpoint``): an automatic (no-prompt) model run
  on the box grown by 30 % of its side on every side, its mask kept inside the box. The old
  default model (before prompts) is the natural baseline; commit ``af83f33`` shipped it:
  extract it with ``git archive af83f33 src/busseg/weights/default | tar -x -C /tmp/old`` and pass
  ``--baseline-checkpoint /tmp/old/src/busseg/weights/default``. Without the flag the row is
  left out. It takes no clicks, so only its box rows are filled.

Measures, per dataset:

- **box Dice**: one box per lesion (each 8-connected component of the ground truth), tight
  (:func:`busseg.prompts.mask_to_boxes`) and jittered (each side moved by up to ``--jitter``
  = 10 % of the box's side, :func:`busseg.prompts.jitter_box`, seed ``--seed``);
- **NoC@85 / NoC@90**: the RITM protocol (Sofiiuk et al., ICIP 2022): the first click and every
  next one from :func:`busseg.prompts.next_click` (deepest point of the larger error region of
  the current prediction vs the truth), the previous prediction fed back as
  ``previous_mask``, at most ``--max-clicks`` = 20 clicks; the number of clicks to reach IoU
  0.85 (0.90), counted as 20 when never reached;
- **mIoU after 1..5 clicks**, and the mean IoU curve up to 20 clicks (plotted);
- **box then clicks** (the annotator's sequence; ``--protocols``): the jittered boxes above
  (one per lesion, each one interaction), then RITM clicks from
  :func:`busseg.prompts.next_click` on the current prediction's errors inside the boxes
  grown by 10 % (the mask stays inside them; the widget ignores clicks outside), every click
  given with the boxes kept and the current prediction as ``previous_mask``, at most
  ``--max-interactions``
  = 20 interactions (boxes included). **NoC@85 / NoC@90** count the boxes as interactions
  (one box: the box is interaction 1, the first click interaction 2), 20 when never reached;
  also the number and share of lesion images that never reach IoU 0.85 / 0.90 within the
  cap, and NoC@85 / NoC@90 per **lesion-size tertile** (the truth's area as a share of the
  image; tertile edges computed per dataset: :func:`size_tertiles`). As in RITM's
  evaluation, an image stops at IoU 0.90 (``--stop-at``; its curve then carries the last IoU
  forward). The box-then-clicks targets (``TARGETS_BOX_CLICKS``) are printed as met / missed lines;
- **time per prompt**: median wall time of one :func:`busseg.inference.predict` call with a
  prompt, on ``--threads`` = 2 CPU threads (the image's preprocessing included, model loading
  excluded);
- **click to updated Labels layer** (``--widget-images``, default 10; needs napari, Qt and a
  display: run under ``xvfb-run -a`` on a headless machine): the "Segment lesions" widget's
  own latency from the click event to the edited Labels layer
  (:attr:`SegmentWidget.last_prompt_latency`), median over clicks.

``--datasets`` picks the rows (``busi``, ``busbra``, ``busuclm``); ``--compare`` adds a table
of this run against an earlier ``interactive.json`` (another checkpoint), per dataset.

Writes ``interactive.md``, ``interactive.json`` and ``interactive.png`` into ``--out``
(default ``benchmarks/results``: write trial runs elsewhere, e.g. ``--out /tmp/bench``).
Clicks are simulated by :func:`busseg.prompts.next_click` (computed on the crop around the
errors: the same click, faster on large scans).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402

NAME = "interactive"
#: Targets of the first prompt model (box Dice, NoC, widget latency).
TARGETS = {
    "busi_box_jittered_dice": 0.90,
    "busbra_box_jittered_dice": 0.88,
    "busi_noc85": 5.0,
    "busi_noc90": 8.0,
    "widget_latency_ms": 150.0,
}
#: Targets of model v3 (jittered box Dice, NoC after a box).
TARGETS_V3 = {
    "busi_box_jittered_dice": 0.90,
    "busbra_box_jittered_dice": 0.91,
    "busi_box_clicks_noc85": 3.0,
    "busi_box_clicks_noc90": 6.0,
}
#: Box-then-clicks targets (dataset rows of the prompt model). "never_share":
#: the largest share of lesion scans that never reach the IoU within the interaction cap.
TARGETS_BOX_CLICKS = {
    "noc": {("BUSI test", "NoC@85"): 3.0, ("BUSI test", "NoC@90"): 6.0,
            ("BUS-UCLM test", "NoC@85"): 2.5},
    "never_share": 0.02,
}
#: Datasets this script can run (``--datasets``) and their row names.
DATASETS = {"busi": "BUSI test", "busbra": "BUS-BRA", "busuclm": "BUS-UCLM test"}
#: Protocols this script can run (``--protocols``).
PROTOCOLS = ("box", "clicks", "box-clicks")
LESION_LABELS = ("benign", "malignant")
#: Share of the box's side added on every side before cropping (the baseline).
CROP_MARGIN = 0.3


# --------------------------------------------------------------------------- data


def busi_test_lesions(busi: Path, split: Path, limit: int | None) -> list[tuple[str, Path, list]]:
    """(name, image path, mask paths) of the BUSI test-split images with a lesion."""
    from busseg.data import discover_busi
    from busseg.data.splits import read_split_csv, select_split

    recs = select_split(discover_busi(busi), read_split_csv(split), "test")
    recs = [r for r in recs if r.label in ("benign", "malignant")]
    if limit is not None:
        recs = recs[:limit]
    return [(r.rel_path, r.image_path, list(r.mask_paths)) for r in recs]


def busbra_items(root: Path, limit: int | None) -> list[tuple[str, Path, list]]:
    """(id, image path, [mask path]) of BUS-BRA, in ``bus_data.csv`` order."""
    recs = C.read_busbra(root)
    if limit is not None:
        recs = recs[:limit]
    return [(r.id, r.image_path, [r.mask_path]) for r in recs]


def busuclm_test_lesions(root: Path, split: Path, limit: int | None
                         ) -> tuple[list[tuple[str, Path, list]], list[dict]]:
    """(name, image path, mask paths) of the BUS-UCLM test-patient lesion scans, and the
    lesion scans of those patients that were skipped (image and mask sizes differ)."""
    recs, skipped = C.split_records(root, split, "test", labels=LESION_LABELS)
    if limit is not None:
        recs = recs[:limit]
    return [(r.rel_path, r.image_path, list(r.mask_paths)) for r in recs], skipped


def load(items: Sequence[tuple[str, Path, list]]) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """Decode (name, grey uint8 image, bool mask); images without lesion pixels are dropped."""
    from busseg.data import read_image, read_mask

    out = []
    for name, img, masks in items:
        truth = read_mask(list(masks))
        if truth.any():
            out.append((name, read_image(img), truth))
    return out


# --------------------------------------------------------------------------- protocols


def crop_to_box_mask(image: np.ndarray, boxes: np.ndarray, model: Any,
                     margin: float = CROP_MARGIN) -> np.ndarray:
    """The crop-to-box baseline: an automatic model on each box's neighbourhood.

    Parameters
    ----------
    image : numpy.ndarray
        (H, W) grey or (H, W, 3|4) colour.
    boxes : numpy.ndarray
        (B, 4) ``(row_min, col_min, row_max, col_max)`` inclusive, in pixels.
    model : torch.nn.Module
        An automatic model (:func:`busseg.inference.load_model`).
    margin : float, optional
        Share of the box's height (width) added above and below (left and right) before
        cropping.

    Returns
    -------
    numpy.ndarray
        (H, W) bool: per box, :func:`busseg.inference.predict_mask` of the crop, kept inside
        the box; the union over boxes.
    """
    from busseg.inference import predict_mask

    h, w = image.shape[:2]
    out = np.zeros((h, w), bool)
    for r0, c0, r1, c1 in np.asarray(boxes, np.float64).reshape(-1, 4):
        dr, dc = margin * (r1 - r0 + 1), margin * (c1 - c0 + 1)
        a0, a1 = max(0, int(np.floor(r0 - dr))), min(h, int(np.ceil(r1 + dr)) + 1)
        b0, b1 = max(0, int(np.floor(c0 - dc))), min(w, int(np.ceil(c1 + dc)) + 1)
        crop = predict_mask(image[a0:a1, b0:b1], model)
        inside = np.zeros((h, w), bool)
        inside[int(r0):int(r1) + 1, int(c0):int(c1) + 1] = True
        full = np.zeros((h, w), bool)
        full[a0:a1, b0:b1] = crop
        out |= full & inside
    return out


def draw_jitter(truth: np.ndarray, rng: np.random.Generator, jitter: float) -> np.ndarray:
    """The jittered boxes of one image: (B, 4), one per lesion, drawn from ``rng``."""
    from busseg.prompts import jitter_box, mask_to_boxes

    return np.stack([jitter_box(b, truth.shape, rng, jitter) for b in mask_to_boxes(truth)])


def box_scores(image: np.ndarray, truth: np.ndarray, model: Any, *, prompt: bool,
               rng: np.random.Generator | None = None, jitter: float = 0.1,
               jittered: np.ndarray | None = None) -> dict:
    """Dice with tight and jittered boxes, and the time of each call (seconds).

    ``jittered`` (B, 4) gives the jittered boxes; None draws them from ``rng``
    (:func:`draw_jitter`).
    """
    from busseg.inference import predict
    from busseg.metrics import dice_score
    from busseg.prompts import mask_to_boxes

    tight = mask_to_boxes(truth)
    if jittered is None:
        jittered = draw_jitter(truth, rng, jitter)
    jittered = np.asarray(jittered, np.float64).reshape(-1, 4)
    out: dict[str, Any] = {"n_boxes": len(tight)}
    times = []
    for key, boxes in (("tight", tight), ("jittered", jittered)):
        t0 = time.perf_counter()
        if prompt:
            mask = predict(image, model, boxes=boxes).mask
        else:
            mask = crop_to_box_mask(image, boxes, model)
        times.append(time.perf_counter() - t0)
        out[f"dice_{key}"] = dice_score(mask, truth)
    out["seconds"] = times
    out["jittered_boxes"] = jittered
    return out


def click_curve(image: np.ndarray, truth: np.ndarray, model: Any, max_clicks: int = 20
                ) -> tuple[list[float], list[float]]:
    """IoU after each of up to ``max_clicks`` simulated clicks (RITM protocol) and times.

    The first click is :func:`busseg.prompts.next_click` on an empty prediction (the deepest
    lesion point); each next one on the current prediction; all clicks so far are given with
    the current prediction as ``previous_mask``. Stops early when the prediction equals the
    truth (the remaining IoUs are 1).

    Returns
    -------
    ious : list of float
        ``max_clicks`` values: IoU after click 1, 2, ...
    seconds : list of float
        Wall time of each prediction.
    """
    from busseg.inference import predict
    from busseg.metrics import iou_score
    from busseg.prompts import next_click

    pred = np.zeros_like(truth, dtype=bool)
    points: list[tuple[int, int]] = []
    labels: list[int] = []
    ious: list[float] = []
    seconds: list[float] = []
    for _ in range(max_clicks):
        click = next_click(pred, truth)
        if click is None:
            ious.append(1.0)
            continue
        points.append(click[:2])
        labels.append(click[2])
        t0 = time.perf_counter()
        pred = predict(image, model, points=np.asarray(points, float), point_labels=labels,
                       previous_mask=pred if pred.any() else None).mask
        seconds.append(time.perf_counter() - t0)
        ious.append(iou_score(pred, truth))
    return ious, seconds


def box_click_curve(image: np.ndarray, truth: np.ndarray, model: Any, boxes: np.ndarray,
                    max_interactions: int = 20, stop_at: float | None = 0.90,
                    box_margin: float = 0.1) -> tuple[list[float], list[float], int]:
    """IoU after each interaction of the box-then-clicks protocol, and times.

    Interactions 1..B draw the B boxes (one per lesion; after box j the prediction is
    given boxes 1..j); every next one is a click from :func:`busseg.prompts.next_click` on
    the current prediction, given with all boxes, all clicks so far and the current
    prediction as ``previous_mask`` (RITM's iterative protocol with the box kept as
    context). With boxes the mask stays inside them (grown by ``box_margin``, as
    :func:`busseg.inference.predict` restricts it), and the widget ignores clicks outside
    them, so clicks are simulated on the errors inside the grown boxes. When no error is
    left there the remaining IoUs repeat the last one.

    Parameters
    ----------
    image : numpy.ndarray
        (H, W) grey or (H, W, 3|4) colour.
    truth : numpy.ndarray
        (H, W) bool, at least one lesion pixel.
    model : torch.nn.Module
        A prompt model.
    boxes : numpy.ndarray
        (B, 4) ``(row_min, col_min, row_max, col_max)`` inclusive (e.g. jittered), B >= 1.
    max_interactions : int
        Boxes and clicks together.
    stop_at : float or None
        Stop once IoU reaches this (RITM's evaluation stops at its highest NoC target);
        later entries repeat the last IoU. None: run all ``max_interactions``.
    box_margin : float
        The model's ``box_margin`` (share of a box's side the mask may extend past it).

    Returns
    -------
    ious : list of float
        ``max_interactions`` values: IoU after interaction 1, 2, ...
    seconds : list of float
        Wall time of each prediction.
    n_run : int
        Interactions actually simulated (the rest were filled in).
    """
    from busseg.inference import predict
    from busseg.metrics import iou_score
    from busseg.prompts import box_mask, next_click

    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    if not len(boxes):
        raise ValueError("box_click_curve needs at least one box")
    ious: list[float] = []
    seconds: list[float] = []
    pred = np.zeros_like(truth, dtype=bool)
    for j in range(min(len(boxes), max_interactions)):
        t0 = time.perf_counter()
        pred = predict(image, model, boxes=boxes[: j + 1], box_margin=box_margin).mask
        seconds.append(time.perf_counter() - t0)
        ious.append(iou_score(pred, truth))
    points: list[tuple[int, int]] = []
    labels: list[int] = []
    region = box_mask(boxes, truth.shape, box_margin)
    inside = truth & region
    while len(ious) < max_interactions:
        if stop_at is not None and ious[-1] >= stop_at:
            break
        click = next_click(pred & region, inside)
        if click is None:  # no error left inside the boxes
            break
        points.append(click[:2])
        labels.append(click[2])
        t0 = time.perf_counter()
        pred = predict(image, model, boxes=boxes, points=np.asarray(points, float),
                       point_labels=labels, previous_mask=pred if pred.any() else None,
                       box_margin=box_margin).mask
        seconds.append(time.perf_counter() - t0)
        ious.append(iou_score(pred, truth))
    n_run = len(ious)
    ious += [ious[-1]] * (max_interactions - len(ious))
    return ious, seconds, n_run


def noc(ious: Sequence[float], target: float, max_clicks: int) -> int:
    """Clicks needed to reach IoU ``target`` (``max_clicks`` when never reached)."""
    for k, v in enumerate(ious, start=1):
        if v >= target:
            return k
    return max_clicks


# --------------------------------------------------------------------------- widget latency


def widget_latency(images: Sequence[tuple[str, np.ndarray, np.ndarray]], checkpoint: Path,
                   clicks_per_image: int = 3, timeout_s: float = 60.0) -> list[float] | None:
    """Click-to-Labels latency of the napari widget (seconds per click).

    Opens a hidden viewer (a display is needed: napari draws with OpenGL), docks "Segment
    lesions" with ``checkpoint``, and for each image
    adds ``clicks_per_image`` simulated clicks (:func:`busseg.prompts.next_click`) one after
    the other to ``"<image> clicks"``, waiting for each update, and reads the widget's
    :attr:`last_prompt_latency`. Returns None (and logs why) when there is no display or
    napari cannot start.
    """
    if sys.platform.startswith("linux") and not (os.environ.get("DISPLAY")
                                                   or os.environ.get("WAYLAND_DISPLAY")):
        C.log("widget latency skipped: no display (napari needs OpenGL; run under xvfb-run)")
        return None
    try:
        return _widget_latency(images, checkpoint, clicks_per_image, timeout_s)
    except Exception as exc:  # pragma: no cover - depends on the environment
        C.log(f"widget latency skipped: {type(exc).__name__}: {exc}")
        return None


def _widget_latency(images, checkpoint, clicks_per_image, timeout_s):
    import napari
    from qtpy.QtWidgets import QApplication

    from busseg.prompts import next_click

    viewer = napari.Viewer(show=False)
    try:
        _, w = viewer.window.add_plugin_dock_widget("napari-busseg", "Segment lesions")
        w.use_checkpoint(checkpoint)
        w._device.value = "cpu"
        out = []
        app = QApplication.instance()
        for _name, image, truth in images:
            viewer.layers.clear()
            viewer.add_image(image, name="img")
            clicks = viewer.layers["img clicks"]
            pred = np.zeros_like(truth)
            for _ in range(clicks_per_image):
                click = next_click(pred, truth)
                if click is None:
                    break
                w._click_label.value = w._click_label.choices[0 if click[2] else 1]
                w.last_prompt_latency = None
                clicks.add([click[0], click[1]])
                t_end = time.perf_counter() + timeout_s
                while (w.prompt_busy or w.last_prompt_latency is None) and \
                        time.perf_counter() < t_end:
                    app.processEvents()
                    time.sleep(0.001)
                if w.last_prompt_latency is None:
                    break
                out.append(w.last_prompt_latency)
                pred = viewer.layers["img prediction"].data > 0
        return out
    finally:
        viewer.close()


# --------------------------------------------------------------------------- report


def summarise(per_image: list[dict], max_clicks: int, prompt: bool,
              max_interactions: int = 20) -> dict:
    """Means over images of a model on a dataset (keys of protocols not run are absent)."""
    def mean(key):
        vals = [r[key] for r in per_image if r.get(key) is not None]
        return float(np.mean(vals)) if vals else math.nan

    s: dict[str, Any] = {
        "n": len(per_image),
        "dice_tight": mean("dice_tight"),
        "dice_jittered": mean("dice_jittered"),
        "box_seconds_median": C.median_iqr(
            [t for r in per_image for t in r["box_seconds"]])[0],
    }
    clicked = [r for r in per_image if "ious" in r]
    if prompt and clicked:
        curves = np.asarray([r["ious"] for r in clicked], float).reshape(-1, max_clicks)
        s["noc85"] = mean("noc85")
        s["noc90"] = mean("noc90")
        s["miou_curve"] = curves.mean(axis=0).tolist() if len(curves) else []
        s["click_seconds_median"] = C.median_iqr(
            [t for r in clicked for t in r["click_seconds"]])[0]
    bc = [r for r in per_image if "bc_ious" in r]
    if prompt and bc:
        curves = np.asarray([r["bc_ious"] for r in bc], float).reshape(-1, max_interactions)
        s["bc_n"] = len(bc)
        s["bc_noc85"] = mean("bc_noc85")
        s["bc_noc90"] = mean("bc_noc90")
        s["bc_noc85_median"] = C.median_iqr([r["bc_noc85"] for r in bc])[0]
        s["bc_noc90_median"] = C.median_iqr([r["bc_noc90"] for r in bc])[0]
        s["bc_never90"] = int(sum(max(r["bc_ious"]) < 0.90 for r in bc))
        s["bc_never85"] = int(sum(max(r["bc_ious"]) < 0.85 for r in bc))
        s["bc_box_iou"] = float(np.mean([r["bc_ious"][r["n_boxes"] - 1] for r in bc]))
        s["bc_miou_curve"] = curves.mean(axis=0).tolist()
        s["bc_interactions_run"] = float(np.mean([r["bc_run"] for r in bc]))
        s["bc_seconds_median"] = C.median_iqr([t for r in bc for t in r["bc_seconds"]])[0]
        s["bc_cap"] = max_interactions
        s["bc_never85_share"] = s["bc_never85"] / len(bc)
        s["bc_never90_share"] = s["bc_never90"] / len(bc)
        if all("lesion_share" in r for r in bc):
            s["bc_tertiles"] = size_tertiles(bc)
    times = [t for r in per_image for t in r["box_seconds"] + r.get("click_seconds", [])
             + r.get("bc_seconds", [])] if prompt else []
    s["prompt_seconds_median"] = (C.median_iqr(times)[0] if times
                                  else s["box_seconds_median"])
    return s


def size_tertiles(per_image: Sequence[dict]) -> list[dict]:
    """Box-then-clicks results per tertile of the lesion's share of the image.

    The lesion size is the ground truth's area as a share of the image's pixels
    (``lesion_share``: BUSI's images differ in size, so pixels would partly sort by scan
    size), and the tertile edges are the 1/3 and 2/3 quantiles (numpy's linear
    interpolation) over the given images, i.e. computed per dataset. An image whose share
    equals an edge goes to the lower tertile.

    Parameters
    ----------
    per_image : sequence of dict
        Per-image records with ``lesion_share``, ``lesion_px``, ``bc_ious``, ``bc_noc85``
        and ``bc_noc90`` (:func:`image_record` with the box-clicks protocol).

    Returns
    -------
    list of dict
        Three entries (``"small"``, ``"medium"``, ``"large"``), each with ``n``, the share
        range ``share_min`` / ``share_max`` (fraction of the image) and ``px_min`` /
        ``px_max`` of its images, ``noc85`` / ``noc90`` (mean interactions, NaN when
        empty), ``never85`` / ``never90`` (images that never reach IoU 0.85 / 0.90 within
        the cap) and the edges ``edges`` (the two quantiles, shares).
    """
    shares = np.asarray([r["lesion_share"] for r in per_image], float)
    edges = np.quantile(shares, [1 / 3, 2 / 3]) if len(shares) else np.array([np.nan] * 2)
    which = np.digitize(shares, edges, right=True)  # 0: <= q1, 1: (q1, q2], 2: > q2
    out = []
    for k, name in enumerate(("small", "medium", "large")):
        sel = [r for r, w in zip(per_image, which, strict=True) if w == k]
        px = [r["lesion_px"] for r in sel]
        sh = [r["lesion_share"] for r in sel]
        out.append({
            "tertile": name, "n": len(sel), "edges": [float(e) for e in edges],
            "share_min": float(min(sh)) if sh else math.nan,
            "share_max": float(max(sh)) if sh else math.nan,
            "px_min": int(min(px)) if px else None, "px_max": int(max(px)) if px else None,
            "noc85": float(np.mean([r["bc_noc85"] for r in sel])) if sel else math.nan,
            "noc90": float(np.mean([r["bc_noc90"] for r in sel])) if sel else math.nan,
            "never85": int(sum(max(r["bc_ious"]) < 0.85 for r in sel)),
            "never90": int(sum(max(r["bc_ious"]) < 0.90 for r in sel)),
        })
    return out


def target_checks(rows: Sequence[dict]) -> list[dict]:
    """The box-then-clicks targets, checked on the prompt model's rows.

    ``TARGETS_BOX_CLICKS``: NoC@85 <= 3.0 and NoC@90 <= 6.0 on BUSI test, NoC@85 <= 2.5 on BUS-UCLM
    test, and on every dataset at most 2 % of the lesion scans never reaching IoU 0.85
    (the annotator's acceptance, :data:`busseg.annotator.ACCEPT_IOU`) and, stricter, 0.90,
    within the interaction cap. Datasets or protocols not run are left out.

    Returns
    -------
    list of dict
        ``dataset``, ``what``, ``value``, ``target``, ``met`` (value <= target) and ``line``
        (the sentence printed with the report).
    """
    checks = []
    for row in rows:
        s = row["summary"]
        if row.get("model") != "prompt model" or not s.get("bc_n"):
            continue
        d = row["dataset"]
        items = []
        for key, what in (("bc_noc85", "NoC@85"), ("bc_noc90", "NoC@90")):
            target = TARGETS_BOX_CLICKS["noc"].get((d, what))
            if target is not None:
                items.append((f"box then clicks {what}", s[key], target,
                              f"{s[key]:.2f} interactions"))
        for thr in ("85", "90"):
            share = s[f"bc_never{thr}_share"]
            items.append((f"lesion scans never at IoU 0.{thr} in {s.get('bc_cap', 20)}", share,
                          TARGETS_BOX_CLICKS["never_share"],
                          f"{s[f'bc_never{thr}']} of {s['bc_n']} ({100 * share:.1f} %)"))
        for what, value, target, shown in items:
            met = bool(value <= target)
            pct = what.startswith("lesion scans")
            tshown = f"{100 * target:.0f} %" if pct else f"{target:g}"
            checks.append({
                "dataset": d, "what": what, "value": float(value), "target": float(target),
                "met": met,
                "line": f"{d}: {what}: {shown}; target <= {tshown}: "
                        f"{'met' if met else 'missed'}"})
    return checks


def _count_share(s: dict, thr: str) -> str:
    """``"5 (5.2 %)"``: images never reaching IoU 0.<thr> and their share."""
    share = s.get(f"bc_never{thr}_share")
    return f"{s[f'bc_never{thr}']}" + (f" ({100 * share:.1f} %)" if share is not None else "")


def _by_tertile(s: dict, key: str) -> str:
    """``"2.10 / 3.40 / 4.00"``: a box-then-clicks mean per size tertile (small first)."""
    t = s.get("bc_tertiles")
    return " / ".join(C.fmt(x[key], 2) for x in t) if t else "–"


def _tertile_table(bc_rows: Sequence[dict], cap: int) -> list[str]:
    """The per-size-tertile table of the box-then-clicks rows (empty without tertiles)."""
    rows = [r for r in bc_rows if r["summary"].get("bc_tertiles")]
    if not rows:
        return []
    md = [
        "Box then clicks by lesion size: tertiles of the ground truth's area **as a share of "
        "the image** (BUSI's images differ in size), edges at the 1/3 and 2/3 quantiles "
        "computed per dataset (an image on an edge goes to the lower tertile); pixel ranges "
        "for reference.",
        "",
        "| Data | Lesion size | Images | share of image | pixels | NoC@85 | NoC@90 | "
        f"never IoU 0.85 | never IoU 0.90 (in {cap}) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        for t in row["summary"]["bc_tertiles"]:
            share = (f"{100 * t['share_min']:.2f}-{100 * t['share_max']:.2f} %" if t["n"]
                     else "–")
            px = f"{t['px_min']}-{t['px_max']}" if t["n"] else "–"
            md.append(
                f"| {row['dataset']} | {t['tertile']} | {t['n']} | {share} | {px} | "
                f"{C.fmt(t['noc85'], 2)} | {C.fmt(t['noc90'], 2)} | {t['never85']} | "
                f"{t['never90']} |")
    return [*md, ""]


#: Summary keys compared by ``--compare`` (lower is better except the Dice and IoU).
COMPARE_KEYS = ("dice_jittered", "bc_box_iou", "bc_noc85", "bc_noc90", "bc_never85",
                "bc_never90")


def compare_rows(rows: Sequence[dict], previous: dict) -> list[dict]:
    """This run's prompt-model rows against an earlier run's (``--compare``), per dataset.

    Parameters
    ----------
    rows : sequence of dict
        This run's ``rows``.
    previous : dict
        An earlier ``interactive.json`` payload (another checkpoint, typically).

    Returns
    -------
    list of dict
        Per dataset in both runs: ``dataset``, ``n`` and ``n_previous``, ``same_images``
        (the same image names in the same order: only then are the numbers paired),
        ``previous_checkpoint`` and, per key of :data:`COMPARE_KEYS` present in both,
        ``{"previous": x, "this": y, "delta": y - x}``.
    """
    prev = {r["dataset"]: r for r in previous.get("rows", []) if r.get("model") == "prompt model"}
    ck = (previous.get("checkpoint") or {}).get("path")
    out = []
    for row in rows:
        if row.get("model") != "prompt model" or row["dataset"] not in prev:
            continue
        old = prev[row["dataset"]]
        names = [r["name"] for r in row.get("per_image", [])]
        old_names = [r["name"] for r in old.get("per_image", [])]
        entry: dict[str, Any] = {"dataset": row["dataset"], "n": row["summary"]["n"],
                                 "n_previous": old["summary"]["n"],
                                 "same_images": bool(names) and names == old_names,
                                 "previous_checkpoint": ck}
        for key in COMPARE_KEYS:
            a, b = old["summary"].get(key), row["summary"].get(key)
            if a is not None and b is not None:
                entry[key] = {"previous": float(a), "this": float(b),
                              "delta": float(b) - float(a)}
        out.append(entry)
    return out


def _comparison_table(comparison: Sequence[dict]) -> list[str]:
    if not comparison:
        return []
    ck = comparison[0].get("previous_checkpoint") or "the earlier run"
    labels = {"dice_jittered": "Box Dice (jittered)", "bc_box_iou": "IoU after the box(es)",
              "bc_noc85": "NoC@85", "bc_noc90": "NoC@90", "bc_never85": "never 0.85",
              "bc_never90": "never 0.90"}
    md = [f"## Against `{ck}` (`--compare`)", "",
          "Earlier run -> this run (difference); box then clicks except the box Dice. "
          "Differences mean something only where the images are the same.", "",
          "| Data | Images | same images | " + " | ".join(labels.values()) + " |",
          "|---|---:|---|" + "---:|" * len(labels)]
    for c in comparison:
        cells = []
        for key in labels:
            v = c.get(key)
            digits = 0 if key.startswith("bc_never") else (2 if "noc" in key else 3)
            cells.append("–" if v is None else
                         f"{C.fmt(v['previous'], digits)} -> {C.fmt(v['this'], digits)} "
                         f"({v['delta']:+.{digits}f})")
        n = f"{c['n_previous']} / {c['n']}"
        md.append(f"| {c['dataset']} | {n} | {'yes' if c['same_images'] else '**no**'} | "
                  + " | ".join(cells) + " |")
    return [*md, ""]


def render(result: dict) -> str:
    a = result["settings"]
    md = C.report_head("Interactive segmentation: boxes and clicks", result, "Prompt model: ")
    if result.get("baseline_checkpoint"):
        md.append("Crop-to-box baseline: " + C.checkpoint_markdown(result["baseline_checkpoint"]))
    md += [f"Wall time {result['seconds'] / 60:.1f} min.", ""]
    if a["limit"] is not None:
        md += [f"**Limited run: at most {a['limit']} images per dataset; not a result.**", ""]
    protocols = a.get("protocols") or list(PROTOCOLS)
    md += [
        f"Boxes: one per lesion (8-connected component of the truth), tight or each side moved "
        f"by up to {100 * a['jitter']:.0f} % of the box's side (seed {a['seed']}). Clicks: RITM "
        f"protocol (next click at the deepest point of the larger error region, previous mask "
        f"fed back, at most {a['max_clicks']} clicks, NoC counted as {a['max_clicks']} when "
        "never reached). Baseline: automatic model on the box grown by "
        f"{100 * CROP_MARGIN:.0f} %, mask kept inside the box. Times: median of one prompted "
        f"prediction on {result['hardware']['torch_threads']} CPU thread(s), model loaded"
        + (f", {a['jobs']} worker processes side by side" if a.get("jobs", 1) > 1 else "")
        + ".",
        "",
    ]
    data_lines = [f"- {name}: {info['n']} lesion images" + (
        f"; skipped {len(info['skipped'])} (" + "; ".join(
            f"{d['image']}: {', '.join(d['problems'])}" for d in info["skipped"]) + ")"
        if info.get("skipped") else "") + (f". {info['note']}" if info.get("note") else "")
        for name, info in result.get("datasets", {}).items()]
    if data_lines:
        md += ["Data:", "", *data_lines, ""]
    if "box" in protocols or "clicks" in protocols:
        md += [
            "| Model | Data | Images | Box Dice (tight) | Box Dice (jittered) | NoC@85 | NoC@90 | "
            "mIoU@1 | mIoU@2 | mIoU@3 | mIoU@4 | mIoU@5 | ms / prompt |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for row in result["rows"]:
            s = row["summary"]
            curve = s.get("miou_curve") or []
            cells = [C.fmt(curve[k]) if k < len(curve) else "–" for k in range(5)]
            md.append(
                f"| {row['model']} | {row['dataset']} | {s['n']} | {C.fmt(s['dice_tight'])} | "
                f"{C.fmt(s['dice_jittered'])} | {C.fmt(s.get('noc85'), 2)} | "
                f"{C.fmt(s.get('noc90'), 2)} | {' | '.join(cells)} | "
                f"{C.fmt(1000 * s['prompt_seconds_median'], 0)} |"
            )
        md.append("")
    bc_rows = [r for r in result["rows"] if r["summary"].get("bc_n")]
    if bc_rows:
        mi = a["max_interactions"]
        stop = a.get("stop_at")
        md += [
            "## Box then clicks",
            "",
            f"The annotator's sequence: the jittered boxes above (one per lesion, each counted "
            f"as one interaction), then RITM clicks (`busseg.prompts.next_click` on the current "
            f"prediction's errors inside the boxes grown by 10 %, where the mask may change and "
            f"the widget takes clicks), each click given with the boxes kept and the current "
            f"prediction as the previous mask; at most {mi} interactions, boxes included. "
            f"NoC@85 / NoC@90: interactions until IoU >= 0.85 / 0.90 (a one-box image that "
            f"the box alone brings there counts 1), {mi} when never reached. "
            + (f"An image stops once IoU >= {stop:g} (RITM's evaluation); its curve carries the "
               "last IoU forward. " if stop else "")
            + "IoU after 1 + k: the mean IoU after the box(es) and k clicks (one-box images "
            "exactly; a several-box image's entries are shifted by its extra boxes).",
            "",
            "| Data | Images | IoU after the box(es) | NoC@85 | NoC@90 | median NoC@85 / @90 | "
            f"never IoU 0.85 | never IoU 0.90 (in {mi}) | IoU@1+1 | IoU@1+2 | IoU@1+4 | "
            "interactions simulated | ms / prompt | NoC@85 by size (S / M / L) | "
            "NoC@90 by size (S / M / L) |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for row in bc_rows:
            s = row["summary"]
            c = s["bc_miou_curve"]
            md.append(
                f"| {row['dataset']} | {s['bc_n']} | {C.fmt(s['bc_box_iou'])} | "
                f"{C.fmt(s['bc_noc85'], 2)} | {C.fmt(s['bc_noc90'], 2)} | "
                f"{C.fmt(s['bc_noc85_median'], 0)} / {C.fmt(s['bc_noc90_median'], 0)} | "
                f"{_count_share(s, '85')} | {_count_share(s, '90')} | "
                f"{C.fmt(c[1] if len(c) > 1 else None)} | "
                f"{C.fmt(c[2] if len(c) > 2 else None)} | {C.fmt(c[4] if len(c) > 4 else None)} | "
                f"{C.fmt(s['bc_interactions_run'], 2)} | "
                f"{C.fmt(1000 * s['bc_seconds_median'], 0)} | "
                f"{_by_tertile(s, 'noc85')} | {_by_tertile(s, 'noc90')} |"
            )
        md.append("")
        md += _tertile_table(bc_rows, mi)
        checks = result.get("target_checks_17") or target_checks(result["rows"])
        if checks:
            md += ["Targets (issue 17, box then clicks)" + (
                f" (**limited run, at most {a['limit']} images per dataset: not a result**)"
                if a["limit"] is not None else "") + ":", ""]
            md += [f"- {c['line']}" for c in checks]
            md.append("")
    md += _comparison_table(result.get("comparison") or [])
    lat = result.get("widget_latency")
    if lat and lat.get("n"):
        md.append(
            f"Click to updated Labels layer in the napari widget (hidden viewer, {lat['n']} clicks "
            f"on {lat['images']} BUSI test images): median {1000 * lat['median_s']:.0f} ms "
            f"(IQR {1000 * lat['q25_s']:.0f}-{1000 * lat['q75_s']:.0f} ms)"
            + (f", {lat['torch_threads']} torch thread(s)." if lat.get("torch_threads")
               else "."))
    else:
        md.append("Click to updated Labels layer in the widget: not measured (--widget-images 0 "
                  "or napari unavailable).")
    md += ["", "Targets (issue 9): box prompt (jittered) Dice >= 0.90 on BUSI test lesions and "
           ">= 0.88 on BUS-BRA; NoC@85 <= 5 and NoC@90 <= 8 on BUSI test; click to updated "
           "Labels layer <= 150 ms on 2 CPU threads. Targets (issue 13, model v3): jittered box "
           "Dice >= 0.90 on BUSI test and >= 0.91 on BUS-BRA fold 1; box then clicks on BUSI "
           "test NoC@85 <= 3.0 and NoC@90 <= 6.0 interactions.", ""]
    return "\n".join(md) + "\n"


def make_figure(result: dict):
    click_rows = [r for r in result["rows"] if r["summary"].get("miou_curve")]
    bc_rows = [r for r in result["rows"] if r["summary"].get("bc_miou_curve")]
    n_panels = int(bool(click_rows)) + int(bool(bc_rows)) or 1
    fig, axes = C.new_figure(1, n_panels, size=(6.0, 4.2))
    panels = list(axes[0])
    if click_rows or not bc_rows:
        ax = panels.pop(0)
        for row in click_rows:
            k = np.arange(1, len(row["summary"]["miou_curve"]) + 1)
            ax.plot(k, row["summary"]["miou_curve"], "o-", ms=3,
                    label=f"{row['model']}, {row['dataset']}")
        for row in result["rows"]:  # box prompts as reference lines (Dice -> IoU = D / (2 - D))
            d = row["summary"]["dice_jittered"]
            if math.isfinite(d):
                ax.axhline(d / (2 - d), ls="--", lw=0.8, color="grey"
                           if row["model"] == "baseline" else "black", alpha=0.6)
        ax.axhline(0.85, color="red", lw=0.5)
        ax.axhline(0.90, color="red", lw=0.5)
        ax.set_xlabel("clicks")
        ax.set_ylabel("mean IoU")
        ax.set_title("IoU against clicks (dashed: jittered box, as IoU)", fontsize=9)
        ax.set_ylim(0, 1)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    if bc_rows:
        ax = panels.pop(0)
        for row in bc_rows:
            c = row["summary"]["bc_miou_curve"]
            ax.plot(np.arange(1, len(c) + 1), c, "o-", ms=3, label=row["dataset"])
        ax.axhline(0.85, color="red", lw=0.5)
        ax.axhline(0.90, color="red", lw=0.5)
        ax.set_xlabel("interactions (1 = the box)")
        ax.set_ylabel("mean IoU")
        stop = result["settings"].get("stop_at")
        ax.set_title("box then clicks" + (f" (stopped at IoU {stop:g}, carried forward)"
                                          if stop else ""), fontsize=9)
        ax.set_ylim(0, 1)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = C.argument_parser(__doc__)
    p.add_argument("--baseline-checkpoint", default=None,
                   help="automatic model for the crop-to-box baseline (the old default: "
                        "git revision af83f33:src/busseg/weights/default, before prompts); "
                        "omitted: no baseline row")
    p.add_argument("--busi", default=str(C.DEFAULT_BUSI), help="BUSI Dataset_BUSI_with_GT")
    p.add_argument("--split", default=str(C.DEFAULT_SPLIT), help="BUSI split CSV")
    p.add_argument("--busbra", default=str(C.DEFAULT_BUSBRA), help="BUS-BRA fold 1 folder")
    p.add_argument("--no-busbra", action="store_true", help="no BUS-BRA row")
    p.add_argument("--busuclm", default=str(C.DEFAULT_BUSUCLM),
                   help="BUS-UCLM folder (images/ + masks/; default ../shared/data/busuclm-dev)")
    p.add_argument("--busuclm-split", default=str(C.DEFAULT_BUSUCLM_SPLIT),
                   help="patient split of it (its 'test' patients are used; default "
                        "training/splits/busuclm.csv)")
    p.add_argument("--no-busuclm", action="store_true", help="no BUS-UCLM row")
    p.add_argument("--datasets", default=",".join(DATASETS),
                   help="comma-separated subset of busi,busbra,busuclm (default all; "
                        "--no-busbra / --no-busuclm also drop a row)")
    p.add_argument("--compare", default=None, metavar="JSON",
                   help="an earlier interactive.json (e.g. of the shipped model): add a table "
                        "of this run's box-then-clicks numbers against it, per dataset")
    p.add_argument("--protocols", default=",".join(PROTOCOLS),
                   help="comma-separated subset of box,clicks,box-clicks (default all; 'box' "
                        "is always run: box-clicks starts from its jittered boxes)")
    p.add_argument("--limit", type=int, default=None,
                   help="at most N images per dataset (checks, not results)")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: --limit 3 --max-clicks 5 --max-interactions 5 "
                        "--widget-images 0 unless given")
    p.add_argument("--max-clicks", type=int, default=20, help="clicks per image (default 20)")
    p.add_argument("--max-interactions", type=int, default=20,
                   help="box then clicks: most interactions, boxes included (default 20)")
    p.add_argument("--stop-at", type=float, default=0.90,
                   help="box then clicks: stop an image once IoU reaches this (RITM; default "
                        "0.90; 0: never stop)")
    p.add_argument("--jitter", type=float, default=0.1,
                   help="largest move of a box side, share of the side (default 0.1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the box jitter")
    p.add_argument("--widget-images", type=int, default=None,
                   help="BUSI test images for the widget's click latency (default 10; 0: skip)")
    p.add_argument("--jobs", type=int, default=1,
                   help="worker processes sharing the images (default 1; on 2 cores "
                        "--jobs 2 --threads 1 halves the wall time, and the times per prompt "
                        "are then one thread's with the other core busy)")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    C.add_common_args(p)
    p.set_defaults(threads=2, device="cpu")
    args = p.parse_args(argv)
    if args.quick:
        args.limit = 3 if args.limit is None else args.limit
        args.max_clicks = 5 if args.max_clicks == 20 else args.max_clicks
        args.max_interactions = 5 if args.max_interactions == 20 else args.max_interactions
        args.widget_images = 0 if args.widget_images is None else args.widget_images
    if args.widget_images is None:
        args.widget_images = 10
    protocols = [x.strip() for x in str(args.protocols).split(",") if x.strip()]
    bad = [x for x in protocols if x not in PROTOCOLS]
    if bad or not protocols:
        raise SystemExit(f"--protocols: unknown {bad}; choose from {','.join(PROTOCOLS)}")
    args.protocols = [x for x in PROTOCOLS if x in protocols or x == "box"]
    datasets = [x.strip() for x in str(args.datasets).split(",") if x.strip()]
    bad = [x for x in datasets if x not in DATASETS]
    if bad or not datasets:
        raise SystemExit(f"--datasets: unknown {bad}; choose from {','.join(DATASETS)}")
    args.datasets = [x for x in DATASETS if x in datasets
                     and not (x == "busbra" and args.no_busbra)
                     and not (x == "busuclm" and args.no_busuclm)]
    if not args.datasets:
        raise SystemExit("no dataset left to run (--datasets, --no-busbra, --no-busuclm)")
    if args.compare is not None and not Path(args.compare).is_file():
        raise SystemExit(f"--compare: {args.compare} not found (an interactive.json)")
    if args.max_clicks < 5:
        raise SystemExit("--max-clicks must be at least 5 (mIoU after 1..5 clicks)")
    if args.max_interactions < 2:
        raise SystemExit("--max-interactions must be at least 2 (a box and a click)")
    if args.stop_at <= 0:
        args.stop_at = None
    if args.limit is not None and args.limit < 1:
        raise SystemExit("--limit must be at least 1")
    if args.jobs < 1:
        raise SystemExit("--jobs must be at least 1")
    return args


def image_record(name: str, image: np.ndarray, truth: np.ndarray, jittered: np.ndarray,
                 model: Any, prompt: bool, settings: dict) -> dict:
    """Every protocol on one image: the per-image record of the JSON."""
    protocols = settings["protocols"]
    max_inter = settings["max_interactions"]
    box = box_scores(image, truth, model, prompt=prompt, jittered=jittered)
    area = int(np.count_nonzero(truth))
    rec = {"name": name, "n_boxes": box["n_boxes"], "dice_tight": box["dice_tight"],
           "dice_jittered": box["dice_jittered"], "box_seconds": box["seconds"],
           "lesion_px": area, "lesion_share": area / float(truth.shape[0] * truth.shape[1])}
    if prompt and "clicks" in protocols:
        mc = settings["max_clicks"]
        ious, secs = click_curve(image, truth, model, mc)
        rec.update(ious=ious, click_seconds=secs, noc85=noc(ious, 0.85, mc),
                   noc90=noc(ious, 0.90, mc))
    if prompt and "box-clicks" in protocols:
        ious, secs, n_run = box_click_curve(image, truth, model, box["jittered_boxes"],
                                            max_inter, settings["stop_at"])
        rec.update(bc_ious=ious, bc_seconds=secs, bc_run=n_run,
                   bc_noc85=noc(ious, 0.85, max_inter), bc_noc90=noc(ious, 0.90, max_inter),
                   jittered_boxes=box["jittered_boxes"].tolist())
    return rec


_WORKER_MODELS: dict[str, Any] = {}


def _init_worker(checkpoints: dict, device: str, threads: int) -> None:
    import torch

    from busseg.inference import load_model

    torch.set_num_threads(int(threads))
    for key, path in checkpoints.items():
        _WORKER_MODELS[key] = load_model(path, device=device)


def _work(task: tuple) -> dict:
    which, name, image, truth, jittered, prompt, settings = task
    return image_record(name, image, truth, jittered, _WORKER_MODELS[which], prompt, settings)


def evaluate(model: Any, data: list, *, prompt: bool, args, label: str,
             pool: Any = None, which: str = "prompt") -> tuple[list, dict]:
    """Run the protocols on a dataset; with ``pool`` the images are spread over its workers.

    The box jitter is drawn in image order from ``--seed`` before any prediction, so a run
    with ``--jobs`` gives the same boxes (and results) as one without.
    """
    rng = np.random.default_rng(args.seed)
    jitters = [draw_jitter(truth, rng, args.jitter) for _, _, truth in data]
    settings = {"protocols": list(getattr(args, "protocols", PROTOCOLS)),
                "max_interactions": getattr(args, "max_interactions", 20),
                "max_clicks": args.max_clicks, "stop_at": getattr(args, "stop_at", 0.90)}
    if pool is not None:
        tasks = [(which, name, image, truth, jit, prompt, settings)
                 for (name, image, truth), jit in zip(data, jitters, strict=True)]
        results = pool.imap(_work, tasks, chunksize=1)
    else:
        results = (image_record(name, image, truth, jit, model, prompt, settings)
                   for (name, image, truth), jit in zip(data, jitters, strict=True))
    per_image = []
    for k, rec in enumerate(results):
        per_image.append(rec)
        if (k + 1) % 20 == 0:
            C.log(f"{label}: {k + 1}/{len(data)}", args.quiet)
    return per_image, summarise(per_image, args.max_clicks, prompt,
                                settings["max_interactions"])


def _evaluate_all(datasets: dict, model: Any, baseline: Any, args, rows: list,
                  pool: Any) -> None:
    for dname, data in datasets.items():
        if baseline is not None:
            per, summ = evaluate(baseline, data, prompt=False, args=args,
                                 label=f"baseline {dname}", pool=pool, which="baseline")
            rows.append({"model": "baseline", "dataset": dname, "summary": summ,
                         "per_image": per})
        per, summ = evaluate(model, data, prompt=True, args=args, label=f"prompt {dname}",
                             pool=pool)
        rows.append({"model": "prompt model", "dataset": dname, "summary": summ,
                     "per_image": per})
        msg = f"{dname}: box Dice {summ['dice_jittered']:.3f} (jittered)"
        if "noc85" in summ:
            msg += f", NoC@85 {summ['noc85']:.2f}, NoC@90 {summ['noc90']:.2f}"
        if "bc_noc85" in summ:
            msg += (f", box then clicks NoC@85 {summ['bc_noc85']:.2f}, NoC@90 "
                    f"{summ['bc_noc90']:.2f}, never 0.85 / 0.90: {summ['bc_never85']} / "
                    f"{summ['bc_never90']} of {summ['bc_n']}")
            if summ.get("bc_tertiles"):
                msg += ", NoC@90 by size (S / M / L) " + _by_tertile(summ, "noc90")
        C.log(msg, args.quiet)


def main(argv: Sequence[str] | None = None) -> dict:
    """Run the benchmark; return the JSON payload (also written to ``--out``)."""
    args = parse_args(argv)
    threads, ckpt = C.threads_and_checkpoint(args)
    base_ckpt = (C.resolve_checkpoint(args.baseline_checkpoint)
                 if args.baseline_checkpoint else None)

    from busseg.inference import accepts_prompts, load_model

    t_start = time.perf_counter()
    model = load_model(ckpt, device=args.device)
    if not accepts_prompts(model):
        raise SystemExit(f"{ckpt} takes no prompts (no guidance channels); pass --checkpoint "
                         "with a prompt model (the old model goes to --baseline-checkpoint)")
    baseline = load_model(base_ckpt, device=args.device) if base_ckpt else None
    if baseline is not None and accepts_prompts(baseline):
        C.log("note: the baseline takes prompts; it is run without them (automatic mode)",
              args.quiet)

    datasets: dict[str, list] = {}
    info: dict[str, dict] = {}
    if "busi" in args.datasets:
        busi = C.require_dir(args.busi, "BUSI", "--busi")
        datasets["BUSI test"] = load(busi_test_lesions(busi, Path(args.split), args.limit))
        info["BUSI test"] = {"n": len(datasets["BUSI test"]), "source": str(busi),
                             "split": str(args.split)}
    if "busbra" in args.datasets:
        bra = C.require_dir(args.busbra, "BUS-BRA", "--busbra")
        datasets["BUS-BRA"] = load(busbra_items(bra, args.limit))
        info["BUS-BRA"] = {"n": len(datasets["BUS-BRA"]), "source": str(bra)}
    if "busuclm" in args.datasets:
        uclm, usplit = Path(args.busuclm), Path(args.busuclm_split)
        if not uclm.is_dir() or not usplit.is_file():
            what = uclm if not uclm.is_dir() else usplit
            C.log(f"BUS-UCLM row skipped: {what} not found (--busuclm, --busuclm-split; "
                  "--no-busuclm to silence)", args.quiet)
        else:
            items, skipped = busuclm_test_lesions(uclm, usplit, args.limit)
            datasets["BUS-UCLM test"] = load(items)
            info["BUS-UCLM test"] = {
                "n": len(datasets["BUS-UCLM test"]), "source": str(uclm), "split": str(usplit),
                "skipped": skipped,
                "note": "Test patients of the split, lesion scans (benign, malignant) only."}
            for d in skipped:
                C.log(f"BUS-UCLM: skipped {d['image']}: {', '.join(d['problems'])}", args.quiet)
    C.log(f"threads {threads}; " + ", ".join(f"{k}: {len(v)} images"
                                              for k, v in datasets.items()), args.quiet)

    pool = None
    if args.jobs > 1:
        import multiprocessing as mp

        ckpts = {"prompt": str(ckpt), **({"baseline": str(base_ckpt)} if base_ckpt else {})}
        pool = mp.get_context("spawn").Pool(args.jobs, initializer=_init_worker,
                                            initargs=(ckpts, args.device, threads))
    rows = []
    try:
        _evaluate_all(datasets, model, baseline, args, rows, pool)
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    latency = None
    if args.widget_images > 0 and "BUSI test" not in datasets:
        C.log("widget latency skipped: it is measured on BUSI test images (--datasets busi)",
              args.quiet)
    elif args.widget_images > 0:
        # the workers are gone: the widget gets the threads they shared (2 x 1 -> 2)
        widget_threads = C.set_threads(threads * args.jobs) if args.jobs > 1 else threads
        lat = widget_latency(datasets["BUSI test"][: args.widget_images], ckpt)
        if lat:
            med, q25, q75 = C.median_iqr(lat)
            latency = {"n": len(lat), "images": min(args.widget_images,
                                                    len(datasets["BUSI test"])),
                       "median_s": med, "q25_s": q25, "q75_s": q75, "seconds": lat,
                       "torch_threads": widget_threads}

    result = {
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "hardware": C.hardware_info(args.device),
        "checkpoint": C.checkpoint_summary(ckpt),
        "baseline_checkpoint": C.checkpoint_summary(base_ckpt) if base_ckpt else None,
        "targets": TARGETS,
        "targets_v3": TARGETS_V3,
        "targets_17": {"noc": [{"dataset": d, "noc": w, "target": v}
                               for (d, w), v in TARGETS_BOX_CLICKS["noc"].items()],
                       "never_share": TARGETS_BOX_CLICKS["never_share"]},
        "datasets": info,
        "rows": rows,
        "widget_latency": latency,
        "seconds": time.perf_counter() - t_start,
    }
    result["target_checks_17"] = target_checks(rows)
    if args.compare:
        import json

        previous = json.loads(Path(args.compare).read_text())
        result["comparison"] = compare_rows(rows, previous)
        result["compare_with"] = str(args.compare)
    md = render(result)
    limited = " (limited run)" if args.limit is not None else ""
    for c in result["target_checks_17"]:
        C.log(f"target{limited}: {c['line']}", args.quiet)
    C.write_results(args.out, NAME, md, result, make_figure(result))
    print(md)
    return result


if __name__ == "__main__":
    main()
