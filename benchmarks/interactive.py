"""Interactive segmentation: box prompts, click prompts (NoC) and time per prompt.

Usage (from the repository root)::

    python benchmarks/interactive.py --baseline-checkpoint /tmp/old_default
    python benchmarks/interactive.py --checkpoint runs/x/best --limit 20 --no-widget

Two models on the BUSI test-split lesion images (benign and malignant; normal images have no
lesion to prompt) and on BUS-BRA fold 1 (every image has one lesion):

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
- **time per prompt**: median wall time of one :func:`busseg.inference.predict` call with a
  prompt, on ``--threads`` = 2 CPU threads (the image's preprocessing included, model loading
  excluded);
- **click to updated Labels layer** (``--widget-images``, default 10; needs napari, Qt and a
  display: run under ``xvfb-run -a`` on a headless machine): the "Segment lesions" widget's
  own latency from the click event to the edited Labels layer
  (:attr:`SegmentWidget.last_prompt_latency`), median over clicks.

Writes ``interactive.md``, ``interactive.json`` and ``interactive.png`` into ``--out``.
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
#: Issue 9's targets.
TARGETS = {
    "busi_box_jittered_dice": 0.90,
    "busbra_box_jittered_dice": 0.88,
    "busi_noc85": 5.0,
    "busi_noc90": 8.0,
    "widget_latency_ms": 150.0,
}
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


def box_scores(image: np.ndarray, truth: np.ndarray, model: Any, *, prompt: bool,
               rng: np.random.Generator, jitter: float) -> dict:
    """Dice with tight and jittered boxes, and the time of each call (seconds)."""
    from busseg.inference import predict
    from busseg.metrics import dice_score
    from busseg.prompts import jitter_box, mask_to_boxes

    tight = mask_to_boxes(truth)
    jittered = np.stack([jitter_box(b, truth.shape, rng, jitter) for b in tight])
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


def summarise(per_image: list[dict], max_clicks: int, prompt: bool) -> dict:
    """Means over images of a model on a dataset."""
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
    if prompt:
        curves = np.asarray([r["ious"] for r in per_image], float).reshape(-1, max_clicks)
        s["noc85"] = mean("noc85")
        s["noc90"] = mean("noc90")
        s["miou_curve"] = curves.mean(axis=0).tolist() if len(curves) else []
        s["click_seconds_median"] = C.median_iqr(
            [t for r in per_image for t in r["click_seconds"]])[0]
        s["prompt_seconds_median"] = C.median_iqr(
            [t for r in per_image for t in r["click_seconds"] + r["box_seconds"]])[0]
    else:
        s["prompt_seconds_median"] = s["box_seconds_median"]
    return s


def render(result: dict) -> str:
    a = result["settings"]
    md = [
        "# Interactive segmentation: boxes and clicks",
        "",
        C.hardware_markdown(result["hardware"]),
        "",
        "Prompt model: " + C.checkpoint_markdown(result["checkpoint"]),
    ]
    if result.get("baseline_checkpoint"):
        md.append("Crop-to-box baseline: " + C.checkpoint_markdown(result["baseline_checkpoint"]))
    md += [f"Wall time {result['seconds'] / 60:.1f} min.", ""]
    if a["limit"] is not None:
        md += [f"**Limited run: at most {a['limit']} images per dataset; not a result.**", ""]
    md += [
        f"Boxes: one per lesion (8-connected component of the truth), tight or each side moved "
        f"by up to {100 * a['jitter']:.0f} % of the box's side (seed {a['seed']}). Clicks: RITM "
        f"protocol (next click at the deepest point of the larger error region, previous mask "
        f"fed back, at most {a['max_clicks']} clicks, NoC counted as {a['max_clicks']} when "
        "never reached). Baseline: automatic model on the box grown by "
        f"{100 * CROP_MARGIN:.0f} %, mask kept inside the box. Times: median of one prompted "
        f"prediction on {result['hardware']['torch_threads']} CPU thread(s), model loaded.",
        "",
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
    lat = result.get("widget_latency")
    md += [""]
    if lat and lat.get("n"):
        md.append(
            f"Click to updated Labels layer in the napari widget (hidden viewer, {lat['n']} clicks "
            f"on {lat['images']} BUSI test images): median {1000 * lat['median_s']:.0f} ms "
            f"(IQR {1000 * lat['q25_s']:.0f}-{1000 * lat['q75_s']:.0f} ms).")
    else:
        md.append("Click to updated Labels layer in the widget: not measured (--widget-images 0 "
                  "or napari unavailable).")
    md += ["", "Targets (issue 9): box prompt (jittered) Dice >= 0.90 on BUSI test lesions and "
           ">= 0.88 on BUS-BRA; NoC@85 <= 5 and NoC@90 <= 8 on BUSI test; click to updated "
           "Labels layer <= 150 ms on 2 CPU threads.", ""]
    return "\n".join(md) + "\n"


def make_figure(result: dict):
    fig, axes = C.new_figure(1, 1, size=(6.0, 4.2))
    ax = axes[0][0]
    for row in result["rows"]:
        s = row["summary"]
        if s.get("miou_curve"):
            k = np.arange(1, len(s["miou_curve"]) + 1)
            ax.plot(k, s["miou_curve"], "o-", ms=3, label=f"{row['model']}, {row['dataset']}")
    for row in result["rows"]:  # box prompts as reference lines (Dice -> IoU = D / (2 - D))
        d = row["summary"]["dice_jittered"]
        if math.isfinite(d):
            ax.axhline(d / (2 - d), ls="--", lw=0.8, color="grey" if row["model"] == "baseline"
                       else "black", alpha=0.6)
    ax.axhline(0.85, color="red", lw=0.5)
    ax.axhline(0.90, color="red", lw=0.5)
    ax.set_xlabel("clicks")
    ax.set_ylabel("mean IoU")
    ax.set_title("IoU against clicks (dashed: jittered box, as IoU)", fontsize=9)
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--baseline-checkpoint", default=None,
                   help="automatic model for the crop-to-box baseline (the old default: "
                        "git revision af83f33:src/busseg/weights/default, before prompts); "
                        "omitted: no baseline row")
    p.add_argument("--busi", default=str(C.DEFAULT_BUSI), help="BUSI Dataset_BUSI_with_GT")
    p.add_argument("--split", default=str(C.DEFAULT_SPLIT), help="BUSI split CSV")
    p.add_argument("--busbra", default=str(C.DEFAULT_BUSBRA), help="BUS-BRA fold 1 folder")
    p.add_argument("--no-busbra", action="store_true", help="BUSI only")
    p.add_argument("--limit", type=int, default=None,
                   help="at most N images per dataset (checks, not results)")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: --limit 3 --max-clicks 5 --widget-images 0 unless given")
    p.add_argument("--max-clicks", type=int, default=20, help="clicks per image (default 20)")
    p.add_argument("--jitter", type=float, default=0.1,
                   help="largest move of a box side, share of the side (default 0.1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the box jitter")
    p.add_argument("--widget-images", type=int, default=None,
                   help="BUSI test images for the widget's click latency (default 10; 0: skip)")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    C.add_common_args(p)
    p.set_defaults(threads=2, device="cpu")
    args = p.parse_args(argv)
    if args.quick:
        args.limit = 3 if args.limit is None else args.limit
        args.max_clicks = 5 if args.max_clicks == 20 else args.max_clicks
        args.widget_images = 0 if args.widget_images is None else args.widget_images
    if args.widget_images is None:
        args.widget_images = 10
    if args.max_clicks < 5:
        raise SystemExit("--max-clicks must be at least 5 (mIoU after 1..5 clicks)")
    if args.limit is not None and args.limit < 1:
        raise SystemExit("--limit must be at least 1")
    return args


def evaluate(model: Any, data: list, *, prompt: bool, args, label: str) -> tuple[list, dict]:
    rng = np.random.default_rng(args.seed)
    per_image = []
    for k, (name, image, truth) in enumerate(data):
        box = box_scores(image, truth, model, prompt=prompt, rng=rng, jitter=args.jitter)
        rec = {"name": name, "dice_tight": box["dice_tight"],
               "dice_jittered": box["dice_jittered"], "box_seconds": box["seconds"]}
        if prompt:
            ious, secs = click_curve(image, truth, model, args.max_clicks)
            rec.update(ious=ious, click_seconds=secs, noc85=noc(ious, 0.85, args.max_clicks),
                       noc90=noc(ious, 0.90, args.max_clicks))
        per_image.append(rec)
        if (k + 1) % 20 == 0:
            C.log(f"{label}: {k + 1}/{len(data)}", args.quiet)
    return per_image, summarise(per_image, args.max_clicks, prompt)


def main(argv: Sequence[str] | None = None) -> dict:
    """Run the benchmark; return the JSON payload (also written to ``--out``)."""
    args = parse_args(argv)
    threads = C.set_threads(args.threads)
    ckpt = C.resolve_checkpoint(args.checkpoint)
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

    datasets = {}
    busi = C.require_dir(args.busi, "BUSI", "--busi")
    datasets["BUSI test"] = load(busi_test_lesions(busi, Path(args.split), args.limit))
    if not args.no_busbra:
        bra = C.require_dir(args.busbra, "BUS-BRA", "--busbra")
        datasets["BUS-BRA"] = load(busbra_items(bra, args.limit))
    C.log(f"threads {threads}; " + ", ".join(f"{k}: {len(v)} images"
                                              for k, v in datasets.items()), args.quiet)

    rows = []
    for dname, data in datasets.items():
        if baseline is not None:
            per, summ = evaluate(baseline, data, prompt=False, args=args,
                                 label=f"baseline {dname}")
            rows.append({"model": "baseline", "dataset": dname, "summary": summ,
                         "per_image": per})
        per, summ = evaluate(model, data, prompt=True, args=args, label=f"prompt {dname}")
        rows.append({"model": "prompt model", "dataset": dname, "summary": summ,
                     "per_image": per})
        C.log(f"{dname}: box Dice {summ['dice_jittered']:.3f} (jittered), NoC@85 "
              f"{summ['noc85']:.2f}, NoC@90 {summ['noc90']:.2f}", args.quiet)

    latency = None
    if args.widget_images > 0:
        lat = widget_latency(datasets["BUSI test"][: args.widget_images], ckpt)
        if lat:
            med, q25, q75 = C.median_iqr(lat)
            latency = {"n": len(lat), "images": min(args.widget_images,
                                                    len(datasets["BUSI test"])),
                       "median_s": med, "q25_s": q25, "q75_s": q75, "seconds": lat}

    result = {
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "hardware": C.hardware_info(args.device),
        "checkpoint": C.checkpoint_summary(ckpt),
        "baseline_checkpoint": C.checkpoint_summary(base_ckpt) if base_ckpt else None,
        "targets": TARGETS,
        "rows": rows,
        "widget_latency": latency,
        "seconds": time.perf_counter() - t_start,
    }
    md = render(result)
    C.write_results(args.out, NAME, md, result, make_figure(result))
    print(md)
    return result


if __name__ == "__main__":
    main()
