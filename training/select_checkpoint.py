"""Choose among a run's checkpoints by what the annotator pays, with Dice as a guard.

    python training/select_checkpoint.py --run runs/v21a --base src/busseg/weights/default \
        --threads 1 --out runs/v21a/selection

For the base checkpoint and every checkpoint a training run kept (``<run>/evals/step_*``
from ``train.py --save-every-eval``, else ``<run>/best``; ``--extra`` adds others), at the
original image size with each checkpoint's threshold and **the network alone**: the
normal-scan gate and the region filter are off, since they are chosen afterwards for the
chosen network (``training/fit_region_filter.py``) and would otherwise confound the
comparison:

- **the objective**: simulated box-then-clicks interactions per lesion scan on the
  VALIDATION patients (BUSI val + BUS-UCLM val lesion scans; :mod:`busseg.annotator`, the
  protocol of the annotation-session benchmark: accept the automatic mask at IoU >= 0.85,
  else a jittered box per lesion, a clear of false regions outside the boxes, then clicks
  until IoU >= 0.85, capped at 20), and how many never converge;
- **the guards**: automatic lesion Dice on BUSI val and BUS-UCLM val, and zero-shot lesion
  Dice at BUS-BRA fold 1 (the new-site benchmark), each against the base checkpoint's.

Rule: among the checkpoints whose automatic lesion Dice is not below the base's by more
than ``--max-dice-drop`` on either validation set and whose BUS-BRA Dice is not below the
base's (``--busbra-floor``, default: the base's own value), take the one with the fewest
validation interactions per lesion scan; the base wins ties and when no candidate passes.
The test splits take no part. Writes ``selection.{md,json}`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "src") not in sys.path:
    sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

DATA = ROOT.parent / "shared" / "data"


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", required=True, help="training run folder (evals/step_*, best/)")
    ap.add_argument("--base", default=str(ROOT / "src/busseg/weights/default"),
                    help="the checkpoint to beat (default: the shipped model)")
    ap.add_argument("--busi", default=str(DATA / "busi/Dataset_BUSI_with_GT"))
    ap.add_argument("--busi-split", default=str(ROOT / "training/splits/busi.csv"))
    ap.add_argument("--busuclm", default=str(DATA / "busuclm-dev"))
    ap.add_argument("--busuclm-split", default=str(ROOT / "training/splits/busuclm.csv"))
    ap.add_argument("--busbra", default=str(DATA / "busbra-fold1"))
    ap.add_argument("--max-dice-drop", type=float, default=0.01,
                    help="largest allowed drop of validation lesion Dice against the base")
    ap.add_argument("--busbra-floor", type=float, default=None,
                    help="least BUS-BRA lesion Dice (default: the base checkpoint's)")
    ap.add_argument("--extra", nargs="*", default=[],
                    help="more checkpoints to score beside the run's (e.g. an earlier run's)")
    ap.add_argument("--only", nargs="*", default=None,
                    help="score only these checkpoint folder names (e.g. step_000128 best)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the box jitter")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None, help="folder for selection.{md,json}")
    return ap.parse_args(argv)


def _pairs(records):
    from busseg.data import read_image, read_mask

    return ([read_image(r.image_path) for r in records],
            [read_mask(list(r.mask_paths)) for r in records])


#: Automatic predictions of the network alone (see the module docstring).
NETWORK_ONLY = {"normal_gate": None, "region_filter": None}


def _automatic_masks(model, images) -> list[np.ndarray]:
    from busseg.inference import predict

    return [predict(im, model, **NETWORK_ONLY).mask for im in images]


def _mean_dice(masks, truths) -> float:
    from busseg.metrics import dice_score

    return float(np.mean([dice_score(m, t) for m, t in zip(masks, truths, strict=True)]))


def score_checkpoint(path: Path, sets: dict, seed: int) -> dict:
    """Interactions on the validation lesion scans and lesion Dice on each set.

    Each scan's automatic mask is computed once and serves both the Dice and the annotator.
    """
    import _common as C

    from busseg.annotator import annotation_cost
    from busseg.inference import load_model

    model = load_model(path, device="cpu")
    t0 = time.perf_counter()
    row: dict = {"checkpoint": C.repo_relative(path)}
    autos = {key: _automatic_masks(model, sets[key][0]) for key in sets}
    for key in ("busi_val", "busuclm_val", "busbra"):
        row[f"dice_{key}"] = _mean_dice(autos[key], sets[key][1])
    cost = annotation_cost(model, sets["busi_val"][0] + sets["busuclm_val"][0],
                           sets["busi_val"][1] + sets["busuclm_val"][1], seed=seed,
                           autos=autos["busi_val"] + autos["busuclm_val"])
    n_busi = len(sets["busi_val"][0])
    inter = np.asarray(cost["interactions"], float)
    row.update(val_interactions=float(inter.mean()),
               val_interactions_busi=float(inter[:n_busi].mean()),
               val_interactions_busuclm=float(inter[n_busi:].mean()),
               val_never_converged=int(cost["never_converged"]),
               val_accepted=int(cost["kinds"]["accepted"]))
    row["seconds"] = round(time.perf_counter() - t0, 1)
    return row


def choose(rows: list[dict], base: dict, max_drop: float, busbra_floor: float) -> dict:
    """The rule of the module docstring; returns the chosen row (``base`` if none passes)."""
    best = base
    for r in rows:
        r["passes"] = bool(r["dice_busi_val"] >= base["dice_busi_val"] - max_drop
                           and r["dice_busuclm_val"] >= base["dice_busuclm_val"] - max_drop
                           and r["dice_busbra"] >= busbra_floor)
        if r["passes"] and r["val_interactions"] < best["val_interactions"] - 1e-9:
            best = r
    return best


def render(rows: list[dict], base: dict, chosen: dict, args, floor: float) -> str:
    lines = [
        "# Checkpoint selection by simulated interactions",
        "",
        f"Run `{args.run}` against the base `{base['checkpoint']}`. Objective: box-then-clicks "
        "interactions per lesion scan on the validation patients (BUSI val + BUS-UCLM val, "
        "accept at IoU 0.85, cap 20; `busseg.annotator`). Guards: automatic lesion Dice on "
        f"each validation set at most {args.max_dice_drop} below the base's, BUS-BRA fold 1 "
        f"lesion Dice >= {floor:.3f}. Automatic masks of the network alone (gate and region "
        "filter off).",
        "",
        "| checkpoint | interactions / lesion scan (BUSI val, BUS-UCLM val) | never converge "
        "| accepted | lesion Dice BUSI val | BUS-UCLM val | BUS-BRA | passes guards |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in [base] + rows:
        name = "base" if r is base else Path(r["checkpoint"]).name
        mark = " **(chosen)**" if r is chosen else ""
        lines.append(
            f"| {name}{mark} | {r['val_interactions']:.2f} ({r['val_interactions_busi']:.2f}, "
            f"{r['val_interactions_busuclm']:.2f}) | {r['val_never_converged']} | "
            f"{r['val_accepted']} | {r['dice_busi_val']:.3f} | {r['dice_busuclm_val']:.3f} | "
            f"{r['dice_busbra']:.3f} | {'-' if r is base else ('yes' if r['passes'] else 'no')} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    import _common as C
    import torch

    from busseg.data import discover

    torch.set_num_threads(args.threads)
    run = Path(args.run)
    # best/ is one of evals/ when the run kept them all
    cands = sorted((run / "evals").glob("step_*")) or (
        [run / "best"] if (run / "best").is_dir() else [])
    if args.only is not None:
        cands = [c for c in cands if c.name in set(args.only)]
    cands += [Path(p) for p in args.extra]
    if not cands:
        raise SystemExit(f"no checkpoints in {run}/evals or {run}/best; train with "
                         "--save-every-eval")
    lesion = ("benign", "malignant")
    busi, _ = C.split_records(args.busi, args.busi_split, "val", labels=lesion)
    uclm, _ = C.split_records(args.busuclm, args.busuclm_split, "val", labels=lesion)
    bra = [r for r in discover(Path(args.busbra)).records if r.usable]
    sets = {"busi_val": _pairs(busi), "busuclm_val": _pairs(uclm), "busbra": _pairs(bra)}
    print(f"validation lesion scans: BUSI {len(busi)}, BUS-UCLM {len(uclm)}; "
          f"BUS-BRA {len(bra)}", flush=True)
    base = score_checkpoint(Path(args.base), sets, args.seed)
    print(json.dumps({k: v for k, v in base.items()}), flush=True)
    rows = []
    for c in cands:
        rows.append(score_checkpoint(c, sets, args.seed))
        print(json.dumps(rows[-1]), flush=True)
    floor = base["dice_busbra"] if args.busbra_floor is None else args.busbra_floor
    chosen = choose(rows, base, args.max_dice_drop, floor)
    text = render(rows, base, chosen, args, floor)
    print(text)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "selection.md").write_text(text)
        (out / "selection.json").write_text(json.dumps(
            {"base": base, "candidates": rows, "chosen": chosen["checkpoint"],
             "busbra_floor": floor, "max_dice_drop": args.max_dice_drop}, indent=1))
    print(f"chosen: {chosen['checkpoint']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
