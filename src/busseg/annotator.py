"""The simulated annotator: what a scan costs a person, in interactions.

One implementation of the annotation protocol, used by everything that chooses something on
the annotator's cost: the annotation-session benchmark, the interactive benchmark, the
adoption rule of learning as you go (:mod:`busseg.session`), the choice of the region filter
and of the normal-scan gate, and checkpoint selection. Qt-free; imports torch only through
:func:`busseg.inference.predict` when a model is asked.

The protocol, per scan (ground truth = an expert mask):

1. **Accept** the automatic mask when its IoU with the truth is >= ``accept_iou`` (0.85); a
   normal scan (empty truth) when the automatic mask is empty. 0 interactions.
2. **Normal scan with a false region**: "no lesion" (clear), 1 interaction.
3. **Otherwise** one box per lesion (8-connected component of the truth, each side moved by
   up to ``jitter`` of its side; one interaction each). The mask becomes the prompt model's
   prediction for the boxes (restricted to the boxes grown by ``box_margin``); when the
   automatic mask has false regions outside the grown boxes, the annotator clears them first
   (one interaction, however many regions). Then clicks from :func:`next_click` (deepest point
   of the larger error region inside the grown boxes), each given with the boxes kept, all
   clicks so far and the current mask as ``previous_mask`` (RITM's iterative protocol, Sofiiuk
   et al., ICIP 2022), until IoU >= ``accept_iou``. When ``max_interactions`` (boxes and the
   clear included) do not get there, the scan counts ``max_interactions`` and is brushed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

__all__ = [
    "ACCEPT_IOU", "BOX_MARGIN", "MAX_INTERACTIONS", "annotate_scan", "annotation_cost",
    "model_prompt", "next_click", "prompt_path", "scan_cost",
]

ACCEPT_IOU = 0.85
MAX_INTERACTIONS = 20
BOX_MARGIN = 0.1
JITTER = 0.1

#: ``prompt(boxes (B, 4), points (P, 2), labels (P,), previous_mask or None) -> (H, W) bool``
PromptFn = Callable[[np.ndarray, np.ndarray, np.ndarray, "np.ndarray | None"], np.ndarray]


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = int(np.count_nonzero(a | b))
    return 1.0 if union == 0 else int(np.count_nonzero(a & b)) / union


def _box_then_clicks(truth: np.ndarray, boxes: np.ndarray, region: np.ndarray,
                     prompt: PromptFn, accept_iou: float, max_clicks: int) -> dict[str, Any]:
    """Prompt the boxes, then clicks inside ``region`` until IoU >= ``accept_iou``.

    The one prompted loop of :func:`annotate_scan` and :func:`prompt_path`. Returns ``pred``
    (the last mask), ``iou``, ``ious`` (after each prompt call), ``points``, ``labels`` and
    ``calls``.
    """
    pred = np.asarray(prompt(boxes, np.zeros((0, 2)), np.zeros(0, np.int8), None)) > 0
    ious = [_iou(pred, truth)]
    points: list[tuple[int, int]] = []
    labels: list[int] = []
    inside = truth & region
    while ious[-1] < accept_iou and len(points) < max_clicks:
        click = next_click(pred & region, inside)
        if click is None:  # nothing left to click inside the boxes
            break
        points.append(click[:2])
        labels.append(click[2])
        pred = np.asarray(prompt(boxes, np.asarray(points, np.float64),
                                 np.asarray(labels, np.int8), pred)) > 0
        ious.append(_iou(pred, truth))
    return {"pred": pred, "iou": ious[-1], "ious": ious, "points": points, "labels": labels,
            "calls": len(ious)}


def next_click(pred: np.ndarray, truth: np.ndarray) -> tuple[int, int, int] | None:
    """Return :func:`busseg.prompts.next_click` (imported on use: this module imports no torch).

    Raises
    ------
    ValueError
        If the shapes differ.
    """
    from busseg.prompts import next_click as _next_click

    return _next_click(pred, truth)


def annotate_scan(auto: np.ndarray, truth: np.ndarray, prompt: PromptFn,
                  rng: np.random.Generator, *, accept_iou: float = ACCEPT_IOU,
                  max_interactions: int = MAX_INTERACTIONS, jitter: float = JITTER,
                  box_margin: float = BOX_MARGIN) -> dict[str, Any]:
    """Simulate the annotator on one scan (the protocol of the module docstring).

    Parameters
    ----------
    auto : numpy.ndarray
        (H, W) bool automatic mask.
    truth : numpy.ndarray
        (H, W) bool ground truth; empty for a normal scan.
    prompt : callable
        ``prompt(boxes, points, labels, previous_mask) -> (H, W) bool``: the prompt model's
        mask for (B, 4) boxes, (P, 2) clicks ``(row, col)``, (P,) labels (1 lesion, 0
        background) and the previous mask (None for the first, box-only call).
    rng : numpy.random.Generator
        Source of the box jitter.
    accept_iou : float
        IoU at which a mask is good enough, in (0, 1].
    max_interactions : int
        Cap; a scan not good enough by then counts this many and is brushed to the truth.
    jitter : float
        Largest move of a box side, share of the side (:func:`busseg.prompts.jitter_box`).
    box_margin : float
        Share of a box's side by which the prompt model's mask may extend past it (the
        model's ``box_margin``); clicks are taken inside the grown boxes.

    Returns
    -------
    dict
        ``kind`` (``"accepted"``, ``"cleared"``, ``"prompted"`` or ``"brushed"``),
        ``interactions``, ``boxes``, ``erases`` (0 or 1: the clear of false regions outside
        the boxes before drawing them), ``clicks``, ``auto_iou``, ``final_iou``
        (of the mask before brushing), ``ious`` (after each box-and-click step), ``mask``
        (the saved correction, None when accepted) and ``prompt_calls``.
    """
    from busseg.prompts import box_mask, jitter_box, mask_to_boxes

    auto, truth = np.asarray(auto) > 0, np.asarray(truth) > 0
    out: dict[str, Any] = {"boxes": 0, "erases": 0, "clicks": 0, "auto_iou": _iou(auto, truth),
                           "ious": [], "prompt_calls": 0}
    if not truth.any():
        if not auto.any():
            return {**out, "kind": "accepted", "interactions": 0, "final_iou": 1.0,
                    "mask": None}
        return {**out, "kind": "cleared", "interactions": 1, "final_iou": 1.0,
                "mask": np.zeros_like(truth)}
    if out["auto_iou"] >= accept_iou:
        return {**out, "kind": "accepted", "interactions": 0, "final_iou": out["auto_iou"],
                "mask": None}
    boxes = np.stack([jitter_box(b, truth.shape, rng, jitter) for b in mask_to_boxes(truth)])
    region = box_mask(boxes, truth.shape, box_margin)
    out["boxes"], out["erases"] = len(boxes), int(bool((auto & ~region).any()))
    n = len(boxes) + out["erases"]
    run = _box_then_clicks(truth, boxes, region, prompt, accept_iou, max_interactions - n)
    pred, iou = run["pred"], run["iou"]
    n += len(run["points"])
    out["prompt_calls"], out["ious"] = run["calls"], run["ious"]
    out["clicks"] = len(run["points"])
    out["final_iou"] = iou
    if iou >= accept_iou:
        return {**out, "kind": "prompted", "interactions": n, "mask": pred}
    return {**out, "kind": "brushed", "interactions": max_interactions, "mask": truth.copy()}


def model_prompt(image: np.ndarray, model: Any, box_margin: float = BOX_MARGIN) -> PromptFn:
    """Return the prompt function of :func:`annotate_scan` for a model.

    Parameters
    ----------
    image : numpy.ndarray
        (H, W) grey or (H, W, 3|4) colour image.
    model : torch.nn.Module, str, os.PathLike or None
        A prompt model (guidance channels), a checkpoint path, or None for the default.
    box_margin : float
        Passed to :func:`busseg.inference.predict`.

    Returns
    -------
    callable
        ``prompt(boxes, points, labels, previous_mask) -> (H, W) bool``.
    """
    from busseg.inference import predict

    def run(boxes, points, labels, previous):
        prev = previous if previous is not None and np.any(previous) else None
        return predict(image, model, boxes=boxes, points=points if len(points) else None,
                       point_labels=labels if len(points) else None, previous_mask=prev,
                       box_margin=box_margin).mask

    return run


def annotation_cost(model: Any, images: Sequence[np.ndarray], truths: Sequence[np.ndarray],
                    *, autos: Sequence[np.ndarray] | None = None, seed: int = 0,
                    accept_iou: float = ACCEPT_IOU, max_interactions: int = MAX_INTERACTIONS,
                    jitter: float = JITTER, box_margin: float = BOX_MARGIN,
                    predict_kwargs: dict | None = None) -> dict[str, Any]:
    """Return the simulated annotation cost of a model on labelled scans (per scan).

    The automatic mask of each scan is the model's default automatic prediction
    (:func:`busseg.inference.predict` with ``predict_kwargs``) unless ``autos`` are given;
    then :func:`annotate_scan` counts the interactions. The box jitter of scan ``i`` is drawn
    from ``numpy.random.default_rng([seed, i])``, so two models compared on the same scans see
    the same boxes.

    Parameters
    ----------
    model : torch.nn.Module, str, os.PathLike or None
        The model (a prompt model: its prompted masks are used after the boxes).
    images : sequence of numpy.ndarray
        (H, W) grey or colour images.
    truths : sequence of numpy.ndarray
        (H, W) bool expert masks, empty for normal scans; same shapes as the images.
    autos : sequence of numpy.ndarray, optional
        (H, W) bool automatic masks to use instead of the model's.
    seed : int
        Seed of the box jitter.
    accept_iou, max_interactions, jitter, box_margin
        As :func:`annotate_scan`.
    predict_kwargs : dict, optional
        Extra arguments of the automatic :func:`busseg.inference.predict` call (for example
        ``normal_gate=None``).

    Returns
    -------
    dict
        ``per_scan`` (mean interactions per scan), ``lesion_per_scan``, ``normal_per_scan``
        (NaN without such scans), ``interactions`` (list, per scan), ``kinds`` (count per
        kind), ``never_converged`` (scans brushed after ``max_interactions``), ``n``.

    Raises
    ------
    ValueError
        If images and truths differ in number, or ``autos`` does not match them.
    """
    from busseg.inference import predict

    if len(images) != len(truths):
        raise ValueError(f"{len(images)} images but {len(truths)} masks")
    if autos is not None and len(autos) != len(images):
        raise ValueError(f"{len(autos)} automatic masks for {len(images)} images")
    kw = dict(predict_kwargs or {})
    inter: list[int] = []
    lesion: list[bool] = []
    kinds = {k: 0 for k in ("accepted", "cleared", "prompted", "brushed")}
    for i, (image, truth) in enumerate(zip(images, truths, strict=True)):
        truth = np.asarray(truth) > 0
        auto = (np.asarray(autos[i]) > 0 if autos is not None
                else predict(image, model, **kw).mask)
        res = annotate_scan(auto, truth, model_prompt(image, model, box_margin),
                            np.random.default_rng([seed, i]), accept_iou=accept_iou,
                            max_interactions=max_interactions, jitter=jitter,
                            box_margin=box_margin)
        inter.append(int(res["interactions"]))
        lesion.append(bool(truth.any()))
        kinds[res["kind"]] += 1
    arr, les = np.asarray(inter, float), np.asarray(lesion, bool)

    def mean(sel):
        return float(arr[sel].mean()) if sel.any() else float("nan")

    return {"n": len(inter), "per_scan": mean(np.ones(len(arr), bool)),
            "lesion_per_scan": mean(les), "normal_per_scan": mean(~les),
            "interactions": inter, "kinds": kinds, "never_converged": kinds["brushed"]}


def prompt_path(truth: np.ndarray, prompt: PromptFn, rng: np.random.Generator, *,
                accept_iou: float = ACCEPT_IOU, max_interactions: int = MAX_INTERACTIONS,
                jitter: float = JITTER, box_margin: float = BOX_MARGIN) -> dict[str, Any]:
    """Run the box-then-clicks part of :func:`annotate_scan` once for a lesion scan.

    On a lesion scan the prompt calls of :func:`annotate_scan` depend only on the truth and
    the jittered boxes, never on the automatic mask: the automatic mask decides only whether
    the scan is accepted and whether one "erase" interaction clears false regions outside the
    grown boxes (which also leaves one click fewer before ``max_interactions``). So the
    prompted path is run once here and :func:`scan_cost` then scores any number of automatic
    masks (a filter threshold, a gate, a rule) in microseconds each, with exactly the
    interactions :func:`annotate_scan` would count (a test checks it). ``rng`` is used as
    :func:`annotate_scan` uses it (the same boxes for the same generator state).

    Parameters
    ----------
    truth : numpy.ndarray
        (H, W) bool ground truth with at least one lesion pixel.
    prompt, rng, accept_iou, max_interactions, jitter, box_margin
        As :func:`annotate_scan`.

    Returns
    -------
    dict
        ``boxes`` (int), ``region`` ((H, W) bool: the boxes grown by ``box_margin``),
        ``clicks_to_accept`` (clicks after the boxes to reach ``accept_iou``, 0 when the boxes
        suffice; None when ``max_interactions - boxes`` clicks do not get there),
        ``prompt_calls``, ``accept_iou``, ``max_interactions``.

    Raises
    ------
    ValueError
        If the truth is empty (a normal scan needs no prompted path).
    """
    from busseg.prompts import box_mask, jitter_box, mask_to_boxes

    truth = np.asarray(truth) > 0
    if not truth.any():
        raise ValueError("prompt_path needs a lesion scan (the truth is empty)")
    boxes = np.stack([jitter_box(b, truth.shape, rng, jitter) for b in mask_to_boxes(truth)])
    region = box_mask(boxes, truth.shape, box_margin)
    run = _box_then_clicks(truth, boxes, region, prompt, accept_iou,
                           max_interactions - len(boxes))
    return {"boxes": len(boxes), "region": region,
            "clicks_to_accept": len(run["points"]) if run["iou"] >= accept_iou else None,
            "prompt_calls": run["calls"], "accept_iou": accept_iou,
            "max_interactions": max_interactions}


def scan_cost(auto: np.ndarray, truth: np.ndarray, path: dict[str, Any] | None) -> int:
    """Interactions :func:`annotate_scan` counts for an automatic mask, from a prompted path.

    Parameters
    ----------
    auto : numpy.ndarray
        (H, W) bool automatic mask.
    truth : numpy.ndarray
        (H, W) bool ground truth (empty for a normal scan).
    path : dict or None
        :func:`prompt_path` of this lesion scan (its ``accept_iou`` and ``max_interactions``
        are used); None for a normal scan.

    Returns
    -------
    int
        0 (accepted), 1 (a normal scan cleared), or boxes + erase + clicks, or
        ``max_interactions`` when the scan would be brushed.

    Raises
    ------
    ValueError
        If a lesion scan comes without its path.
    """
    auto, truth = np.asarray(auto) > 0, np.asarray(truth) > 0
    if not truth.any():
        return int(auto.any())
    if path is None:
        raise ValueError("a lesion scan needs its prompt_path")
    if _iou(auto, truth) >= path["accept_iou"]:
        return 0
    erase = int(bool((auto & ~path["region"]).any()))
    k = path["clicks_to_accept"]
    cap = path["max_interactions"]
    if k == 0:  # the boxes alone suffice: no click, so the cap is never reached
        return int(path["boxes"] + erase)
    if k is None or path["boxes"] + erase + k > cap:
        return int(cap)
    return int(path["boxes"] + erase + k)
