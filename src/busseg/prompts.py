"""Box and click prompts: validation, guidance channels, and click simulation (Qt-free).

A prompt-conditioned network (DeepEdit, Diaz-Pinto et al., "DeepEdit: Deep Editable Learning
for Interactive Segmentation of 3D Medical Images", MICCAI DALI 2022, arXiv:2204.01295; RITM,
Sofiiuk, Petrov and Konushin, "Reviving Iterative Training with Mask Guidance for Interactive
Segmentation", ICIP 2022, arXiv:2102.06583) takes, besides the grey image, one channel per kind
of guidance, at the network's input scale:

0. ``positive_clicks``: disks of radius ``click_radius`` (input pixels) at lesion clicks;
1. ``negative_clicks``: the same at background clicks;
2. ``box``: 1 inside each box (one box per lesion), 0 elsewhere;
3. ``previous_mask``: the mask the clicks correct (0/1).

All four are zero in automatic mode, so one network segments with and without prompts.

Coordinates are pixels of the original image in napari's (row, column) order; boxes are
``(row_min, col_min, row_max, col_max)``, inclusive. Clicks are simulated with one
implementation for training and for ``benchmarks/interactive.py``: :func:`next_click` puts the
next click at the deepest point of the larger error region (Xu et al., "Deep Interactive
Object Selection", CVPR 2016; the protocol of RITM and of NoC@85/NoC@90).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

__all__ = [
    "GUIDANCE_CHANNELS",
    "PromptSimulator",
    "Prompts",
    "box_mask",
    "jitter_box",
    "mask_to_boxes",
    "next_click",
    "render_guidance",
    "validate_prompts",
]

#: Names and order of the guidance channels after the image channel.
GUIDANCE_CHANNELS: tuple[str, ...] = ("positive_clicks", "negative_clicks", "box",
                                      "previous_mask")
#: Click disk radius in network-input pixels (RITM uses 5 px at 320-480 px inputs).
DEFAULT_CLICK_RADIUS = 3


@dataclass(frozen=True)
class Prompts:
    """Validated prompts for one image.

    Attributes
    ----------
    boxes : numpy.ndarray
        (B, 4) float64, ``(row_min, col_min, row_max, col_max)`` inclusive, in image pixels.
    points : numpy.ndarray
        (P, 2) float64 ``(row, col)`` in image pixels.
    point_labels : numpy.ndarray
        (P,) int8: 1 = lesion (positive click), 0 = background (negative click).
    previous_mask : numpy.ndarray or None
        (H, W) bool, the mask the clicks correct.
    """

    boxes: np.ndarray
    points: np.ndarray
    point_labels: np.ndarray
    previous_mask: np.ndarray | None = None

    @property
    def empty(self) -> bool:
        """True when there is no box, no click and no previous mask (automatic mode)."""
        return len(self.boxes) == 0 and len(self.points) == 0 and self.previous_mask is None


def _as_float_array(value: Any, what: str, width: int) -> np.ndarray:
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be numbers, got {value!r}") from None
    if arr.size == 0:
        return np.zeros((0, width))
    if arr.ndim == 1 and arr.shape[0] == width:
        arr = arr[None]
    if arr.ndim != 2 or arr.shape[1] != width:
        raise ValueError(f"{what} must have shape (n, {width}), got {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{what} contain NaN or infinite coordinates")
    return arr


def validate_prompts(
    image_shape: Sequence[int],
    boxes: Any = None,
    points: Any = None,
    point_labels: Any = None,
    previous_mask: Any = None,
) -> Prompts:
    """Check prompts against an image and return them as arrays.

    Parameters
    ----------
    image_shape : sequence of int
        (H, W) of the image (extra trailing dimensions, e.g. colour, are ignored).
    boxes : array-like or None
        (B, 4) or one (4,) box ``(row_min, col_min, row_max, col_max)``, inclusive, in image
        pixels; one box per lesion.
    points : array-like or None
        (P, 2) or one (2,) click ``(row, col)`` in image pixels.
    point_labels : array-like or None
        (P,) 1 (lesion) or 0 (background); ``None`` means every click is positive.
    previous_mask : array-like or None
        (H, W) mask (any value > 0 is lesion) that the clicks correct.

    Returns
    -------
    Prompts

    Raises
    ------
    ValueError
        If a box or click lies outside the image, a box is empty (``row_max < row_min`` or
        ``col_max < col_min``), shapes are wrong, ``point_labels`` and ``points`` differ in
        length, a label is not 0 or 1, coordinates are not finite, or ``previous_mask`` does
        not have the image's size. The message says which prompt is wrong.
    """
    h, w = int(image_shape[0]), int(image_shape[1])
    b = _as_float_array([] if boxes is None else boxes, "boxes", 4)
    for i, (r0, c0, r1, c1) in enumerate(b):
        shown = f"({r0:g}, {c0:g}, {r1:g}, {c1:g})"
        if r1 < r0 or c1 < c0:
            raise ValueError(f"box {i} {shown} is empty: give (row_min, col_min, row_max, "
                             "col_max) with row_max >= row_min and col_max >= col_min")
        if r0 < -0.5 or c0 < -0.5 or r1 > h - 0.5 or c1 > w - 0.5:
            raise ValueError(f"box {i} {shown} lies outside the {h}x{w} image; draw it "
                             "on the image")
    p = _as_float_array([] if points is None else points, "points", 2)
    for i, (r, c) in enumerate(p):
        if not (-0.5 <= r <= h - 0.5 and -0.5 <= c <= w - 0.5):
            raise ValueError(f"click {i} at (row {r:g}, col {c:g}) lies outside the {h}x{w} "
                             "image; click on the image")
    if point_labels is None:
        labels = np.ones(len(p), np.int8)
    else:
        raw = np.atleast_1d(np.asarray(point_labels))
        if raw.ndim != 1 or len(raw) != len(p):
            raise ValueError(f"point_labels has {raw.size} value(s) for {len(p)} click(s); give "
                             "one label (1 lesion, 0 background) per click")
        if len(raw) and not np.isin(raw, (0, 1)).all():
            raise ValueError(f"point_labels must be 1 (lesion) or 0 (background), got "
                             f"{sorted(set(raw.tolist()))}")
        labels = raw.astype(np.int8)
    prev = None
    if previous_mask is not None:
        prev = np.asarray(previous_mask)
        if prev.shape != (h, w):
            raise ValueError(f"previous_mask has shape {prev.shape}, the image is {h}x{w}; "
                             "give the mask of this image")
        prev = prev > 0
    return Prompts(b, p, labels, prev)


def _scale(image_shape: Sequence[int], input_size: Sequence[int]) -> tuple[float, float]:
    return input_size[0] / image_shape[0], input_size[1] / image_shape[1]


def render_guidance(
    prompts: Prompts,
    image_shape: Sequence[int],
    input_size: Sequence[int],
    *,
    click_radius: float = DEFAULT_CLICK_RADIUS,
) -> torch.Tensor:
    """Draw prompts as the network's guidance channels at its input size.

    Parameters
    ----------
    prompts : Prompts
        From :func:`validate_prompts` (image-pixel coordinates).
    image_shape : sequence of int
        (H, W) of the image the prompts refer to.
    input_size : sequence of int
        (h, w) of the network input, in pixels.
    click_radius : float, optional
        Radius of a click disk in input pixels.

    Returns
    -------
    torch.Tensor
        (4, h, w) float32 in {0, 1}, channels :data:`GUIDANCE_CHANNELS`. Pixel centres map
        as ``x_in = (x + 0.5) * h / H - 0.5``.
    """
    from busseg.data.transforms import resize_mask

    h, w = int(input_size[0]), int(input_size[1])
    sy, sx = _scale(image_shape, input_size)
    out = torch.zeros((len(GUIDANCE_CHANNELS), h, w), dtype=torch.float32)
    rows = torch.arange(h, dtype=torch.float32)[:, None]
    cols = torch.arange(w, dtype=torch.float32)[None, :]
    for (r, c), lab in zip(prompts.points, prompts.point_labels, strict=True):
        rr, cc = (r + 0.5) * sy - 0.5, (c + 0.5) * sx - 0.5
        disk = (rows - rr) ** 2 + (cols - cc) ** 2 <= click_radius**2
        ch = 0 if lab == 1 else 1
        out[ch] = torch.maximum(out[ch], disk.float())
    for r0, c0, r1, c1 in prompts.boxes:
        # the box covers pixels r0..r1 inclusive, i.e. [r0 - 0.5, r1 + 0.5] in image
        # coordinates; fill the input pixels whose centres fall inside it (at least one)
        a0 = min(max(int(np.ceil(r0 * sy - 0.5)), 0), h - 1)
        b0 = min(max(int(np.ceil(c0 * sx - 0.5)), 0), w - 1)
        a1 = max(min(int(np.floor((r1 + 1) * sy - 0.5)), h - 1), a0) + 1
        b1 = max(min(int(np.floor((c1 + 1) * sx - 0.5)), w - 1), b0) + 1
        out[2, a0:a1, b0:b1] = 1.0
    if prompts.previous_mask is not None and prompts.previous_mask.any():
        m = prompts.previous_mask
        if m.shape != (h, w):
            m = resize_mask(m, (h, w))
        out[3] = torch.from_numpy(np.ascontiguousarray(m)).float()
    return out


def box_mask(boxes: np.ndarray, shape: Sequence[int], margin: float = 0.0) -> np.ndarray:
    """Union of boxes as a mask, each box grown by ``margin`` of its side on every side.

    Parameters
    ----------
    boxes : numpy.ndarray
        (B, 4) ``(row_min, col_min, row_max, col_max)`` inclusive, in pixels of ``shape``.
    shape : sequence of int
        (H, W) of the output.
    margin : float, optional
        Share of the box height (width) added above and below (left and right), >= 0.

    Returns
    -------
    numpy.ndarray
        (H, W) bool.
    """
    h, w = int(shape[0]), int(shape[1])
    out = np.zeros((h, w), bool)
    for r0, c0, r1, c1 in np.asarray(boxes, np.float64).reshape(-1, 4):
        dr, dc = margin * (r1 - r0 + 1), margin * (c1 - c0 + 1)
        a0, a1 = max(0, int(np.floor(r0 - dr))), min(h, int(np.ceil(r1 + dr)) + 1)
        b0, b1 = max(0, int(np.floor(c0 - dc))), min(w, int(np.ceil(c1 + dc)) + 1)
        out[a0:a1, b0:b1] = True
    return out


def mask_to_boxes(mask: np.ndarray, min_area: int = 1) -> np.ndarray:
    """One tight box per connected lesion (8-connectivity).

    Parameters
    ----------
    mask : numpy.ndarray
        (H, W), > 0 = lesion.
    min_area : int, optional
        Components smaller than this (pixels) get no box.

    Returns
    -------
    numpy.ndarray
        (B, 4) float64 ``(row_min, col_min, row_max, col_max)`` inclusive; (0, 4) for an
        empty mask.
    """
    from scipy import ndimage

    lab, n = ndimage.label(np.asarray(mask) > 0, structure=np.ones((3, 3), bool))
    boxes = []
    for i, sl in enumerate(ndimage.find_objects(lab), start=1):
        if sl is None or (lab[sl] == i).sum() < min_area:
            continue
        boxes.append((sl[0].start, sl[1].start, sl[0].stop - 1, sl[1].stop - 1))
    return np.asarray(boxes, np.float64).reshape(-1, 4)


def jitter_box(box: Sequence[float], shape: Sequence[int], rng: np.random.Generator,
               max_jitter: float = 0.1) -> np.ndarray:
    """Move each side of a box by up to ``max_jitter`` of the box's size, inside the image.

    The protocol of the box-prompt benchmarks (MedSAM, Ma et al., Nat. Commun. 2024: up to
    20 pixels; here relative, as sides of ultrasound lesions vary from 10 to 400 pixels).

    Parameters
    ----------
    box : sequence of float
        ``(row_min, col_min, row_max, col_max)`` inclusive.
    shape : sequence of int
        (H, W) of the image; the result is clipped to it.
    rng : numpy.random.Generator
        Source of randomness.
    max_jitter : float, optional
        Largest move of a side, as a share of the box height (rows) or width (columns).

    Returns
    -------
    numpy.ndarray
        (4,) float64, a valid (non-empty) box.
    """
    r0, c0, r1, c1 = (float(v) for v in box)
    bh, bw = r1 - r0 + 1, c1 - c0 + 1
    d = rng.uniform(-max_jitter, max_jitter, size=4) * np.array([bh, bw, bh, bw])
    r0n, c0n = np.clip(r0 + d[0], 0, shape[0] - 1), np.clip(c0 + d[1], 0, shape[1] - 1)
    r1n, c1n = np.clip(r1 + d[2], r0n, shape[0] - 1), np.clip(c1 + d[3], c0n, shape[1] - 1)
    return np.round(np.array([r0n, c0n, r1n, c1n]))


def next_click(pred: np.ndarray, truth: np.ndarray) -> tuple[int, int, int] | None:
    """Simulate the next click: the deepest point of the larger error region.

    Xu et al., CVPR 2016; RITM (Sofiiuk et al., ICIP 2022) and the NoC protocol: compute the
    false-negative (missed lesion) and false-positive regions, take the Euclidean distance
    of each pixel to the nearest pixel outside its region (the image border counts as
    outside), and click at the largest distance, positive in the false-negative region,
    negative in the false-positive one; ties go to the false negative, then to the first
    pixel in row-major order. Computed on the bounding box of the errors grown by one pixel
    (a ring of correct pixels, or the image border, which counts as outside, so every
    distance is the same as on the whole image): several times faster on 600x800 scans
    whose errors cover a small part of the image.

    Parameters
    ----------
    pred : numpy.ndarray
        (H, W) bool, the current prediction (any value > 0 is lesion).
    truth : numpy.ndarray
        (H, W) bool, the ground truth.

    Returns
    -------
    tuple of int or None
        ``(row, col, label)`` with label 1 (lesion) or 0 (background); ``None`` when the
        prediction equals the truth.

    Raises
    ------
    ValueError
        If the shapes differ.
    """
    pred, truth = np.asarray(pred) > 0, np.asarray(truth) > 0
    if pred.shape != truth.shape:
        raise ValueError(f"pred {pred.shape} and truth {truth.shape} differ in shape")
    err = pred ^ truth
    rows = np.flatnonzero(err.any(axis=1))
    if not len(rows):
        return None
    cols = np.flatnonzero(err.any(axis=0))
    r0, r1 = max(int(rows[0]) - 1, 0), min(int(rows[-1]) + 2, pred.shape[0])
    c0, c1 = max(int(cols[0]) - 1, 0), min(int(cols[-1]) + 2, pred.shape[1])
    r, c, label = deepest_error_click(pred[r0:r1, c0:c1], truth[r0:r1, c0:c1])
    return r + r0, c + c0, label


def deepest_error_click(pred: np.ndarray, truth: np.ndarray) -> tuple[int, int, int] | None:
    """Apply :func:`next_click`'s rule on the whole arrays, without cropping to the errors.

    The reference the cropped :func:`next_click` is checked against; slower on large images.

    Parameters
    ----------
    pred, truth : numpy.ndarray
        (H, W) bool arrays of the same shape: the prediction and the ground truth.

    Returns
    -------
    tuple of int or None
        ``(row, col, label)`` with label 1 (a missed lesion pixel) or 0 (a false-positive
        pixel); None when the two agree.
    """
    from scipy import ndimage

    fn, fp = truth & ~pred, pred & ~truth
    if not fn.any() and not fp.any():
        return None
    best = None
    for region, label in ((fn, 1), (fp, 0)):
        if not region.any():
            continue
        dist = ndimage.distance_transform_edt(np.pad(region, 1))[1:-1, 1:-1]
        idx = int(np.argmax(dist))
        if best is None or dist.flat[idx] > best[0]:
            best = (float(dist.flat[idx]), idx, label)
    _, idx, label = best
    r, c = divmod(idx, pred.shape[1])
    return int(r), int(c), int(label)


@dataclass
class PromptSimulator:
    """Simulated prompts for training a prompt-conditioned network (one batch at a time).

    Per image with a lesion, one of three modes is drawn: automatic (no guidance, so the
    same network segments on its own; DeepEdit's automatic mode), box (one box per lesion,
    each side jittered by up to ``box_jitter``), or clicks (RITM's iterative training: a
    first positive click deep inside a lesion, or, with probability ``from_auto``, a
    correction click on the network's own automatic prediction, then 0 to ``max_rounds``
    further rounds in which the network's current prediction (without gradients, in eval
    mode) is fed back as the previous mask and :func:`next_click` adds the next click; with
    probability ``click_box`` a box is given too). Lesion-free images always get automatic
    mode, so the class head and the empty prediction are learned on them.

    Attributes
    ----------
    p_auto, p_box : float
        Probabilities of automatic and box mode; clicks get the rest.
    box_jitter : float
        Largest move of a box side, as a share of the box size.
    max_rounds : int
        Most correction rounds after the first click.
    from_auto : float
        Probability that click mode starts from the automatic prediction.
    click_box : float
        Probability that click mode also gets the box.
    click_radius : float
        Disk radius in input pixels.
    """

    p_auto: float = 0.4
    p_box: float = 0.3
    box_jitter: float = 0.1
    max_rounds: int = 2
    from_auto: float = 0.5
    click_box: float = 0.3
    click_radius: float = DEFAULT_CLICK_RADIUS

    def to_dict(self) -> dict:
        """Return the settings as a JSON-serialisable dict."""
        from dataclasses import asdict

        return asdict(self)

    def __call__(self, model, images: torch.Tensor, masks: torch.Tensor,
                 rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Guidance channels for a batch.

        Parameters
        ----------
        model : callable
            Maps (N, 1 + 4, h, w) input to (N, 1, h, w) logits (run without gradients).
        images : torch.Tensor
            (N, 1, h, w) float, the preprocessed images.
        masks : torch.Tensor
            (N, 1, h, w) float in {0, 1}.
        rng : numpy.random.Generator
            Source of randomness.

        Returns
        -------
        guidance : torch.Tensor
            (N, 4, h, w) float32 on the images' device (:data:`GUIDANCE_CHANNELS`).
        prompted : torch.Tensor
            (N,) bool, True for images that got any guidance.
        """
        n, _, h, w = images.shape
        truth = masks[:, 0].detach().cpu().numpy() >= 0.5
        guidance = torch.zeros((n, len(GUIDANCE_CHANNELS), h, w))
        states: dict[int, dict] = {}
        for i in range(n):
            if not truth[i].any():
                continue
            u = rng.random()
            if u < self.p_auto:
                continue
            boxes = mask_to_boxes(truth[i])
            boxes = np.stack([jitter_box(b, (h, w), rng, self.box_jitter) for b in boxes])
            if u < self.p_auto + self.p_box:
                states[i] = {"boxes": boxes, "points": [], "labels": [], "prev": None,
                             "clicks": False}
            else:
                states[i] = {"boxes": boxes if rng.random() < self.click_box else
                             np.zeros((0, 4)), "points": [], "labels": [], "prev": None,
                             "clicks": True, "auto_start": rng.random() < self.from_auto}
        clickers = [i for i, st in states.items() if st["clicks"]]
        starters = [i for i in clickers if not states[i]["auto_start"]]
        for i in starters:
            states[i]["points"].append(_inner_click(truth[i], rng))
            states[i]["labels"].append(1)
        rounds = int(rng.integers(0, self.max_rounds + 1)) if clickers else 0
        auto = [i for i in clickers if states[i]["auto_start"]]
        for r in range(rounds + 1 if auto else rounds):
            active = clickers if r > 0 or not auto else auto
            # round 0 with automatic starters: their prediction has no guidance yet
            batch = torch.stack([self._render(states[i], (h, w)) for i in active])
            preds = _predict(model, images[active], batch.to(images.device))
            for j, i in enumerate(active):
                st = states[i]
                st["prev"] = preds[j]
                click = next_click(preds[j], truth[i])
                if click is not None:
                    st["points"].append(click[:2])
                    st["labels"].append(click[2])
        for i, st in states.items():
            guidance[i] = self._render(st, (h, w))
        prompted = torch.zeros(n, dtype=torch.bool)
        prompted[list(states)] = True
        return guidance.to(images.device), prompted

    def _render(self, st: dict, shape: tuple[int, int]) -> torch.Tensor:
        pr = Prompts(np.asarray(st["boxes"], np.float64).reshape(-1, 4),
                     np.asarray(st["points"], np.float64).reshape(-1, 2),
                     np.asarray(st["labels"], np.int8), st["prev"])
        return render_guidance(pr, shape, shape, click_radius=self.click_radius)


def _inner_click(truth: np.ndarray, rng: np.random.Generator) -> tuple[int, int]:
    """Draw a first positive click inside a random lesion, away from its boundary.

    A random pixel at least half as deep as the lesion's deepest pixel (RITM samples first
    clicks away from the boundary).
    """
    from scipy import ndimage

    lab, n = ndimage.label(truth, structure=np.ones((3, 3), bool))
    comp = lab == int(rng.integers(1, n + 1))
    dist = ndimage.distance_transform_edt(np.pad(comp, 1))[1:-1, 1:-1]
    rows, cols = np.nonzero(dist >= 0.5 * dist.max())
    k = int(rng.integers(len(rows)))
    return int(rows[k]), int(cols[k])


def _predict(model, images: torch.Tensor, guidance: torch.Tensor) -> list[np.ndarray]:
    was_training = getattr(model, "training", False)
    if was_training:
        model.eval()
    try:
        with torch.no_grad():
            x = torch.cat([images, guidance], dim=1)
            if images.is_contiguous(memory_format=torch.channels_last):
                x = x.contiguous(memory_format=torch.channels_last)
            logits = model(x)
    finally:
        if was_training:
            model.train()
    return list((logits[:, 0] >= 0).cpu().numpy())
