"""Active learning at a new site: correct the most uncertain images first, or random ones?

Usage (from the repository root)::

    python benchmarks/active_learning.py --threads 2          # full run (16 fine-tunes)
    python benchmarks/active_learning.py --checkpoint runs/x/best --quick --out /tmp/bench

The annotation loop of ``benchmarks/annotation_loop.py`` (same BUS-BRA fold 1 patient split
into a correction pool and an evaluation set of other patients, same data loading, scoring
and fine-tuning with the Fine-tune widget's defaults through :func:`busseg.finetune.finetune`,
i.e. :func:`busseg.engine.fit`), with two ways of choosing the k pool images the user
corrects:

- **uncertainty**: the k pool images the base model is least sure about, by
  :func:`busseg.uncertainty.rank` (what the BUSI browser's "Next suggested" and
  ``busseg rank`` offer). Deterministic: one fine-tune per k.
- **random**: the first k images of a random order of the pool, ``--draws`` orders (the
  orders of ``annotation_loop.py``, so with the same seed its random rows are these).

Reported per k: Dice and IoU on the evaluation set after fine-tuning, the correction effort
the user spent (``|pred XOR truth| / lesion area`` of the base model on the k chosen images,
:func:`busseg.metrics.correction_effort`) and the effort left on the evaluation set. The
outcome is stated as measured, per k: uncertainty above every random draw, below every
random draw, or within their range. Random selection is a strong baseline (Gaillochet et al.,
Medical Image Analysis 2023; Lüth et al., nnActive, 2024); a single benchmark on one site is
no proof either way. Writes ``active_learning.md``, ``.json`` and ``.png`` into ``--out``.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402
import annotation_loop as AL  # noqa: E402

NAME = "active_learning"
UNCERTAINTY, RANDOM = "uncertainty", "random"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = C.argument_parser(__doc__)
    p.add_argument("--busbra", default=str(C.DEFAULT_BUSBRA),
                   help="BUS-BRA folder (default ../shared/data/busbra-fold1)")
    p.add_argument("--ks", type=int, nargs="+", default=[5, 10, 20, 40],
                   help="numbers of corrected images (default 5 10 20 40)")
    p.add_argument("--draws", type=int, default=3, help="random draws per k (default 3)")
    p.add_argument("--seed", type=int, default=0, help="seed of the patient split and draws")
    p.add_argument("--pool-fraction", type=float, default=0.5,
                   help="share of patients in the correction pool (default 0.5)")
    p.add_argument("--eval-limit", type=int, default=None,
                   help="score at most N evaluation images (a fixed random subset)")
    p.add_argument("--max-steps", type=int, default=None,
                   help="override the widget's fine-tuning steps (quick checks only)")
    p.add_argument("--work-dir", default=None,
                   help="keep the fine-tuned checkpoints here (default: a temporary folder)")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: --ks 2 --draws 1 --eval-limit 6 --max-steps 3 unless given")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    C.add_common_args(p)
    args = p.parse_args(argv)
    if args.quick:
        args.ks = [2] if args.ks == [5, 10, 20, 40] else args.ks
        args.draws = 1 if args.draws == 3 else args.draws
        args.eval_limit = 6 if args.eval_limit is None else args.eval_limit
        args.max_steps = 3 if args.max_steps is None else args.max_steps
    if any(k < 1 for k in args.ks) or args.draws < 1:
        raise SystemExit("--ks must be >= 1 and --draws >= 1")
    args.ks = sorted(set(args.ks))
    return args


# --------------------------------------------------------------------------- report


def verdict(unc: float, rnd: Sequence[float]) -> str:
    """Where the uncertainty arm's Dice lies relative to the random draws."""
    vals = [v for v in rnd if v is not None and math.isfinite(v)]
    if unc is None or not math.isfinite(unc) or not vals:
        return "–"
    if unc > max(vals):
        return "uncertainty better than every random draw"
    if unc < min(vals):
        return "random better: every draw beat uncertainty"
    return "within the random draws' range"


def summary_rows(runs: list[dict], ks: Sequence[int]) -> list[dict]:
    rows = []
    for k in ks:
        unc = [r for r in runs if r["k"] == k and r["strategy"] == UNCERTAINTY]
        rnd = [r for r in runs if r["k"] == k and r["strategy"] == RANDOM]
        u = unc[0]["eval"]["mean_dice"] if unc else math.nan
        rows.append({
            "k": k,
            "uncertainty_dice": u,
            "random_dice": AL._agg([r["eval"]["mean_dice"] for r in rnd]),
            "random_dice_range": ([min(r["eval"]["mean_dice"] for r in rnd),
                                   max(r["eval"]["mean_dice"] for r in rnd)] if rnd else None),
            "uncertainty_effort_before": unc[0]["pool_effort_before"] if unc else math.nan,
            "random_effort_before": AL._agg([r["pool_effort_before"] for r in rnd]),
            "uncertainty_effort_after": unc[0]["eval"]["mean_effort"] if unc else math.nan,
            "random_effort_after": AL._agg([r["eval"]["mean_effort"] for r in rnd]),
            "verdict": verdict(u, [r["eval"]["mean_dice"] for r in rnd]),
        })
    return rows


def outcome(rows: list[dict]) -> str:
    """One sentence on the whole comparison, as measured."""
    better = [r["k"] for r in rows if r["verdict"].startswith("uncertainty better")]
    worse = [r["k"] for r in rows if r["verdict"].startswith("random better")]
    within = [r["k"] for r in rows if r["verdict"].startswith("within")]
    parts = []
    if better:
        parts.append(f"uncertainty beat every random draw at k = {', '.join(map(str, better))}")
    if worse:
        parts.append(f"every random draw beat uncertainty at k = {', '.join(map(str, worse))}")
    if within:
        parts.append(f"uncertainty fell within the random draws at k = "
                     f"{', '.join(map(str, within))}")
    if not parts:
        return "No comparison could be made."
    text = "; ".join(parts) + "."
    if not better:
        text += (" On this data, choosing by uncertainty did not beat choosing at random, "
                 "as the active-learning literature warns it may not.")
    return text[0].upper() + text[1:]


def render(result: dict) -> str:
    a = result["settings"]
    ft = a["finetune"]
    md = [
        *C.report_head("Active learning: correcting the most uncertain images vs random ones "
                       "(BUS-BRA)", result),
        f"Wall time {result['seconds'] / 60:.1f} min.",
        "",
    ]
    if a["quick"]:
        md += ["**Quick run: few images and steps; not a result.**", ""]
    md += [
        f"BUS-BRA fold 1 patients split at random (seed {a['seed']}, as "
        f"`annotation_loop.py`): correction pool {a['n_pool']} images of "
        f"{a['n_pool_patients']} patients, evaluation set {a['n_eval']} images of "
        f"{a['n_eval_patients']} other patients. Base model evaluation Dice "
        f"{result['base']['eval']['mean_dice']:.3f}. For each k the base model is fine-tuned on "
        f"k corrected pool images (ground truth standing in for the user's corrections) with "
        f"the fine-tune widget's defaults: {ft['max_steps']} steps, batch {ft['batch_size']}, "
        f"lr {ft['lr']}, held-out fraction {ft['val_fraction']}, augmentation "
        f"{'on' if ft['augment'] else 'off'}, "
        f"{'encoder frozen' if ft.get('freeze_encoder') else 'whole network'}, loss "
        f"{ft.get('loss', '?')}. *Uncertainty*: the k pool images ranked most "
        f"uncertain by `busseg.uncertainty.rank` with the base model (ranking the pool took "
        f"{result['rank_seconds']:.1f} s; one fine-tune per k). *Random*: {a['draws']} random "
        "orders of the pool (nested over k; mean ± sd over draws).",
        "",
        "Correction effort = |pred XOR truth| / lesion area of the base model's prediction "
        "(0 = nothing to repaint). *Before*: on the k images the user corrected (the work "
        "spent). *After*: on the evaluation set with the fine-tuned model (the work left).",
        "",
        "| k | Dice, uncertainty | Dice, random | random range | effort before, uncertainty "
        "| effort before, random | effort after, uncertainty | effort after, random | outcome |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for row in result["summary"]:
        rng = row["random_dice_range"]
        md.append(
            f"| {row['k']} | {C.fmt(row['uncertainty_dice'])} | {_pm(row['random_dice'])} | "
            f"{(C.fmt(rng[0]) + '–' + C.fmt(rng[1])) if rng else '–'} | "
            f"{C.fmt(row['uncertainty_effort_before'], 2)} | "
            f"{_pm(row['random_effort_before'], 2)} | "
            f"{C.fmt(row['uncertainty_effort_after'], 2)} | "
            f"{_pm(row['random_effort_after'], 2)} | {row['verdict']} |"
        )
    md += ["", f"**Outcome:** {result['outcome']}", ""]
    return "\n".join(md) + "\n"


def _pm(stat, digits: int = 3) -> str:
    mean, sd = stat
    if mean is None or not math.isfinite(mean):
        return "–"
    return f"{mean:.{digits}f}" + (f" ± {sd:.{digits}f}" if sd is not None and
                                   math.isfinite(sd) else "")


def make_figure(result: dict):
    fig, axes = C.new_figure(1, 2, size=(4.8, 3.8))
    runs, ks = result["runs"], [r["k"] for r in result["summary"]]
    for ax, key, ylabel, title in (
        (axes[0][0], lambda r: r["eval"]["mean_dice"], "Dice, evaluation set",
         "Accuracy after fine-tuning on k images"),
        (axes[0][1], lambda r: r["pool_effort_before"], "|pred XOR truth| / lesion area",
         "Correction effort spent on the k images"),
    ):
        for strategy, fmt in ((RANDOM, "s--"), (UNCERTAINTY, "o-")):
            means, sds = [], []
            for k in ks:
                vals = [key(r) for r in runs if r["k"] == k and r["strategy"] == strategy]
                ax.scatter([k] * len(vals), vals, s=10, alpha=0.4)
                m, s = AL._agg(vals)
                means.append(m)
                sds.append(0.0 if not math.isfinite(s) else s)
            ax.errorbar(ks, means, yerr=sds, fmt=fmt, capsize=3, label=strategy)
        if "Dice" in ylabel:
            ax.axhline(result["base"]["eval"]["mean_dice"], color="grey", lw=0.8, ls=":",
                       label="base model")
        ax.set_xlabel("k corrected images")
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> dict:
    """Run the benchmark; return the JSON payload (also written to ``--out``)."""
    args = parse_args(argv)
    threads, ckpt = C.threads_and_checkpoint(args)
    busbra = C.require_dir(args.busbra, "BUS-BRA", "--busbra")

    from busseg.devices import get_device
    from busseg.finetune import FinetuneSettings, finetune
    from busseg.inference import clear_model_cache, load_model
    from busseg.uncertainty import rank

    device = get_device(args.device)
    t_start = time.perf_counter()
    pool, evalset = AL.pool_and_evalset(busbra, args)
    C.log(f"threads {threads}; pool {len(pool)} images, eval {len(evalset)} images", args.quiet)

    eval_images, eval_masks = AL.load_pairs([(r.image_path, [r.mask_path]) for r in evalset])
    pool_images, pool_masks = AL.load_pairs([(r.image_path, [r.mask_path]) for r in pool])
    overrides = {} if args.max_steps is None else {"max_steps": args.max_steps}
    settings = FinetuneSettings.resolve(None, **overrides)
    ft_settings = {k: v for k, v in settings.to_dict().items() if k != "recipe"}

    base = load_model(ckpt, device=device)
    base_eval = AL.score(base, eval_images, eval_masks)
    base_pool = AL.score(base, pool_images, pool_masks)
    t0 = time.perf_counter()
    ranking = rank(pool_images, base, cache=False, names=[r.id for r in pool])
    rank_s = time.perf_counter() - t0
    C.log(f"base model: eval Dice {base_eval['mean_dice']:.3f}; ranked the pool in "
          f"{rank_s:.1f} s", args.quiet)
    orders = {(UNCERTAINTY, None): ranking.order()}
    for d, order in enumerate(AL.random_orders(len(pool), args.seed, args.draws)):
        orders[(RANDOM, d)] = [int(i) for i in order]
    uncertainty_of = {e.index: e.score for e in ranking.entries}

    runs: list[dict] = []
    n_ft = len(orders) * len(args.ks)
    tmp = None
    work = Path(args.work_dir) if args.work_dir else None
    if work is None:
        tmp = tempfile.TemporaryDirectory(prefix="busseg-active-learning-")
        work = Path(tmp.name)
    t_loop = time.perf_counter()
    try:
        for (strategy, draw), order in orders.items():
            for k in args.ks:
                idx = order[:k]
                ids = [pool[i].id for i in idx]
                t0 = time.perf_counter()
                res = finetune([pool_images[i] for i in idx], [pool_masks[i] for i in idx],
                               ckpt, settings=settings, out_dir=work / f"{strategy}_d{draw}_k{k}",
                               names=ids, device=str(device))
                ft_s = time.perf_counter() - t0
                if res.checkpoint is None:
                    raise RuntimeError(f"fine-tuning on {k} pairs wrote no checkpoint")
                ev = AL.score(load_model(res.checkpoint, device=device), eval_images, eval_masks)
                clear_model_cache()
                runs.append({
                    "strategy": strategy, "draw": draw, "k": k, "ids": ids, "eval": ev,
                    "pool_effort_before": float(np.mean([base_pool["effort"][i] for i in idx])),
                    "pool_dice_before": float(np.mean([base_pool["dice"][i] for i in idx])),
                    "mean_uncertainty": float(np.mean([uncertainty_of[i] for i in idx])),
                    "finetune_s": ft_s, "steps": res.fit.steps,
                    "n_train": res.n_train, "n_val": res.n_val,
                })
                done = len(runs)
                left = (time.perf_counter() - t_loop) / done * (n_ft - done)
                C.log(f"{strategy}{'' if draw is None else f' draw {draw}'} k {k}: eval Dice "
                      f"{ev['mean_dice']:.3f} ({done}/{n_ft}; about {left / 60:.0f} min left)",
                      args.quiet)
    finally:
        if tmp is not None:
            tmp.cleanup()

    summary = summary_rows(runs, args.ks)
    result = {
        "benchmark": NAME,
        "hardware": C.hardware_info(device),
        "checkpoint": C.checkpoint_summary(ckpt),
        "seconds": time.perf_counter() - t_start,
        "rank_seconds": rank_s,
        "settings": {
            "quick": bool(args.quick), "seed": args.seed, "draws": args.draws, "ks": args.ks,
            "n_pool": len(pool), "n_pool_patients": len({r.case for r in pool}),
            "n_eval": len(evalset), "n_eval_patients": len({r.case for r in evalset}),
            "finetune": ft_settings, "device": str(device), "threads": threads,
        },
        "base": {"eval": base_eval},
        "eval_ids": [r.id for r in evalset],
        "pool_ids": [r.id for r in pool],
        "pool_uncertainty": {pool[e.index].id: e.components for e in ranking.entries},
        "pool_effort_before": dict(zip([r.id for r in pool], base_pool["effort"], strict=True)),
        "summary": summary,
        "outcome": outcome(summary),
        "runs": runs,
    }
    markdown = render(result)
    paths = C.write_results(args.out, NAME, markdown, result, make_figure(result))
    print(markdown)
    C.log(f"wrote {', '.join(str(p) for p in paths.values())}", args.quiet)
    return result


if __name__ == "__main__":
    main()
