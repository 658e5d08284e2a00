"""Probe: a zoom-in prompt mode (FocalClick / RITM zoom-in) against whole-image prompts.

Usage (from the repository root)::

    python benchmarks/zoom_probe.py --context 0.4 --threads 1

Zoom-in: the union of the boxes, grown by ``--context`` of its longer side on every side, is
cropped from the scan, the prompts are shifted into the crop, the network predicts on the
crop (so the lesion fills more of its input) and the mask is pasted back. Measured with the
box-then-clicks part of the simulated annotator (:func:`busseg.annotator.annotate_scan` with an
empty automatic mask, so every scan is prompted) on the VALIDATION lesion scans of BUSI and
BUS-UCLM, per lesion-size half. The shipped network was never trained on such crops; this
measures whether zoom-in alone, at inference, pays.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402


def zoom_prompt(image, model, context: float = 0.4, box_margin: float = 0.1):
    """The prompt function of ``annotate_scan`` that predicts on the crop around the boxes."""
    from busseg.inference import predict

    H, W = image.shape[:2]

    def run(boxes, points, labels, previous):
        b = np.asarray(boxes, float)
        r0, c0, r1, c1 = b[:, 0].min(), b[:, 1].min(), b[:, 2].max(), b[:, 3].max()
        side = max(r1 - r0 + 1, c1 - c0 + 1) * (1 + 2 * context)
        cr, cc = (r0 + r1) / 2, (c0 + c1) / 2
        R0, R1 = int(max(0, np.floor(cr - side / 2))), int(min(H, np.ceil(cr + side / 2)))
        C0, C1 = int(max(0, np.floor(cc - side / 2))), int(min(W, np.ceil(cc + side / 2)))
        pts = (np.asarray(points, float).reshape(-1, 2) - [R0, C0]) if len(points) else None
        prev = (previous[R0:R1, C0:C1] if previous is not None and np.any(previous)
                else None)
        m = predict(image[R0:R1, C0:C1], model, boxes=b - [R0, C0, R0, C0], points=pts,
                    point_labels=labels if len(points) else None, previous_mask=prev,
                    box_margin=box_margin).mask
        out = np.zeros((H, W), bool)
        out[R0:R1, C0:C1] = m
        return out

    return run


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    C.add_common_args(ap)
    ap.add_argument("--context", type=float, default=0.4)
    ap.add_argument("--seed", type=int, default=0, help="seed of the box jitter")
    ap.add_argument("--busi", default=str(C.DEFAULT_BUSI))
    ap.add_argument("--busuclm", default=str(C.DEFAULT_BUSUCLM))
    args = ap.parse_args(argv)
    C.set_threads(args.threads)
    from busseg.annotator import annotate_scan, model_prompt
    from busseg.data import read_image, read_mask
    from busseg.inference import load_model

    model = load_model(C.resolve_checkpoint(args.checkpoint), device="cpu")
    lesion = ("benign", "malignant")
    recs = (C.split_records(args.busi, C.DEFAULT_SPLIT, "val",
                            labels=lesion)[0]
            + C.split_records(args.busuclm, C.DEFAULT_BUSUCLM_SPLIT, "val",
                              labels=lesion)[0])
    res: dict[str, list[int]] = {"whole image": [], "zoom-in": []}
    areas = []
    t0 = time.perf_counter()
    for i, r in enumerate(recs):
        im, tr = read_image(r.image_path), read_mask(list(r.mask_paths))
        areas.append(tr.mean())
        auto = np.zeros_like(tr)
        for name, fn in (("whole image", model_prompt(im, model)),
                         ("zoom-in", zoom_prompt(im, model, args.context))):
            out = annotate_scan(auto, tr, fn, np.random.default_rng([args.seed, i]))
            res[name].append(out["interactions"])
    big = np.asarray(areas) >= np.median(areas)
    print(f"{len(recs)} validation lesion scans (BUSI + BUS-UCLM), context {args.context}, "
          f"box then clicks to IoU 0.85 (cap 20):")
    print("| prompts | interactions / scan | larger half | smaller half | never converge |")
    print("|---|---:|---:|---:|---:|")
    for name, v in res.items():
        v = np.asarray(v)
        print(f"| {name} | {v.mean():.2f} | {v[big].mean():.2f} | {v[~big].mean():.2f} | "
              f"{int(np.sum(v >= 20))} |")
    print(f"{time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
