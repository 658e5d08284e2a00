"""The annotation loop at a new site: segment, correct, fine-tune, and how much it helps.

Usage (from the repository root)::

    python benchmarks/annotation_loop.py                 # shipped default model, full run
    python benchmarks/annotation_loop.py --checkpoint runs/x/best --quick
    python benchmarks/annotation_loop.py --compare-frozen --threads 2   # + frozen encoder

Simulates a user of the *Fine-tune* widget at a site the model has not seen (BUS-BRA fold 1:
other scanners, another hospital). Patients (``Case``) are split at random (``--seed``) into
a correction pool and an evaluation set of other patients (``--pool-fraction``, default
half). For each draw (``--draws``, different random orders of the pool) and each ``k`` in
``--ks``: the first ``k`` pool images of that order are predicted by the base model, the user
"corrects" them to the ground truth, and the base model is fine-tuned on those ``k`` pairs
with the widget's defaults (:data:`busseg.finetune.FINETUNE_DEFAULTS`: 100 steps, batch 4,
learning rate 3e-4, 20 % of the pairs held out to pick the best step, augmentation on, the
whole network trained, BCE on every pair + Dice on pairs with a lesion). The orders are
nested: a draw's 10 images include its 5. ``k = 0`` is the base model. With
``--compare-frozen`` every fine-tune is repeated on the same pairs with the encoder frozen
(the widget's "freeze the encoder" option, the default before issue 13), so both modes are
shown side by side; the issue's targets are Dice gains over the base model of >= +0.04 at
k = 10 and >= +0.06 at k = 40 with the widget defaults.

Reported per ``k`` (mean and standard deviation over draws): Dice and IoU on the evaluation
set; correction effort (``|pred XOR truth| / lesion area``,
:func:`busseg.metrics.correction_effort`) on the evaluation set after fine-tuning, and on the
``k`` pool images before it (what the user had to repaint); fine-tuning wall time (per k
and mode, checkpoint writing included); and Dice on the BUSI test split after fine-tuning
(forgetting). Writes ``annotation_loop.md``,
``annotation_loop.json`` and ``annotation_loop.png`` into ``--out``.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402

NAME = "annotation_loop"
#: Issue 13's targets: Dice gain over the base model at BUS-BRA fold 1, widget defaults.
TARGET_GAIN = {10: 0.04, 40: 0.06}
DEFAULT, FROZEN = "default", "frozen"


# --------------------------------------------------------------------------- data


def load_pairs(paths: Sequence[tuple[Path, Sequence[Path]]]) -> tuple[list, list]:
    """Decode images (grey uint8) and masks (bool) once, to reuse for every model."""
    from busseg.data import read_image, read_mask

    images, masks = [], []
    for img, mask_paths in paths:
        images.append(read_image(img))
        masks.append(read_mask(list(mask_paths)))
    return images, masks


def score(model, images: Sequence[np.ndarray], masks: Sequence[np.ndarray]) -> dict:
    """Per-image Dice, IoU, correction effort and any-prediction flags of ``model``.

    Masks are those of the default settings (``busseg.inference.predict``, the normal-scan
    gate included, as ``predict_mask``); the same pass gives the ungated Dice and whether
    the gate emptied the mask, so a fine-tune that shifts the class head is seen.

    Returns
    -------
    dict
        ``dice``, ``iou``, ``effort``, ``dice_ungated`` (lists of float), ``any_pred``,
        ``has_lesion``, ``gated`` (lists of bool), their means ``mean_dice``, ``mean_iou``,
        ``mean_effort``, ``mean_dice_ungated``, and ``n_gated_lesion`` (lesion images whose
        mask the gate emptied).
    """
    from busseg.inference import predict
    from busseg.metrics import correction_effort, dice_score, iou_score

    threshold = float(getattr(model, "busseg_config", {}).get("inference", {})
                      .get("threshold", 0.5))
    out: dict[str, list] = {"dice": [], "iou": [], "effort": [], "any_pred": [],
                            "has_lesion": [], "dice_ungated": [], "gated": []}
    for image, truth in zip(images, masks, strict=True):
        res = predict(image, model)
        pred = res.mask
        out["dice"].append(dice_score(pred, truth))
        out["iou"].append(iou_score(pred, truth))
        out["effort"].append(correction_effort(pred, truth))
        out["any_pred"].append(bool(pred.any()))
        out["has_lesion"].append(bool(truth.any()))
        out["gated"].append(bool(res.gated))
        out["dice_ungated"].append(dice_score(res.proba >= threshold, truth) if res.gated
                                   else out["dice"][-1])
    res: dict[str, Any] = dict(out)
    for key in ("dice", "iou", "effort", "dice_ungated"):
        res[f"mean_{key}"] = float(np.mean(out[key])) if out[key] else math.nan
    res["n_gated_lesion"] = sum(g and h for g, h in zip(out["gated"], out["has_lesion"],
                                                         strict=True))
    lesion = [d for d, h in zip(out["dice"], out["has_lesion"], strict=True) if h]
    normal = [a for a, h in zip(out["any_pred"], out["has_lesion"], strict=True) if not h]
    res["mean_dice_lesion"] = float(np.mean(lesion)) if lesion else math.nan
    res["fp_rate_normal"] = float(np.mean(normal)) if normal else math.nan
    return res


def _busi_test(args) -> list[tuple[Path, list[Path]]]:
    from busseg.data import discover_busi
    from busseg.data.splits import read_split_csv, select_split

    recs = select_split(discover_busi(Path(args.busi)), read_split_csv(args.split), "test")
    if args.busi_limit is not None:
        per: dict[str, int] = {}
        kept = []
        for r in recs:
            if per.get(r.label, 0) < args.busi_limit:
                kept.append(r)
                per[r.label] = per.get(r.label, 0) + 1
        recs = kept
    return [(r.image_path, list(r.mask_paths)) for r in recs]


# --------------------------------------------------------------------------- report


def _agg(values: Sequence[float]) -> tuple[float, float]:
    x = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=float)
    if x.size == 0:
        return math.nan, math.nan
    return float(x.mean()), float(x.std(ddof=1)) if x.size > 1 else math.nan


def _cell(values: Sequence[float], digits: int = 3) -> str:
    mean, sd = _agg(values)
    if math.isnan(mean):
        return "–"
    return f"{mean:.{digits}f}" + (f" ± {sd:.{digits}f}" if math.isfinite(sd) else "")


def summary_rows(runs: list[dict], ks: Sequence[int], mode: str = DEFAULT,
                 base_dice: float | None = None) -> list[dict]:
    """One row per k of the runs of ``mode`` (``k = 0``, the base model, belongs to every
    mode); ``gain`` is the mean Dice minus the base model's (``base_dice``, default the
    k = 0 run's)."""
    rows = []
    if base_dice is None:
        base = [r["eval"]["mean_dice"] for r in runs if r["k"] == 0]
        base_dice = float(base[0]) if base else math.nan
    for k in ks:
        rs = [r for r in runs if r["k"] == k and (k == 0 or r.get("mode", DEFAULT) == mode)]
        if not rs:
            continue
        dice = _agg([r["eval"]["mean_dice"] for r in rs])
        rows.append(
            {
                "k": k,
                "mode": mode,
                "gain": dice[0] - base_dice,
                "n_models": len(rs),
                "dice": _agg([r["eval"]["mean_dice"] for r in rs]),
                "iou": _agg([r["eval"]["mean_iou"] for r in rs]),
                "dice_ungated": _agg([r["eval"].get("mean_dice_ungated", math.nan)
                                      for r in rs]),
                "n_gated_lesion": _agg([r["eval"].get("n_gated_lesion", math.nan) for r in rs]),
                "effort_eval_after": _agg([r["eval"]["mean_effort"] for r in rs]),
                "effort_pool_before": _agg([r["pool_effort_before"] for r in rs]),
                "busi_dice_lesion": _agg([r["busi"]["mean_dice_lesion"] for r in rs if r["busi"]]),
                "busi_fp_rate": _agg([r["busi"]["fp_rate_normal"] for r in rs if r["busi"]]),
                "finetune_s": _agg([r["finetune_s"] for r in rs]),
                "finetune_s_median": float(np.median([r["finetune_s"] for r in rs])),
                "raw": rs,
            }
        )
    return rows


def _gain(row: dict) -> str:
    g = row.get("gain")
    return "–" if g is None or not math.isfinite(g) else f"{g:+.3f}"


def target_lines(summary: Sequence[dict]) -> list[str]:
    """Issue 13's gain targets (k = 10, 40) against the rows measured, as Markdown lines."""
    rows = {r["k"]: r for r in summary}
    out = []
    for k, limit in TARGET_GAIN.items():
        if k in rows and math.isfinite(rows[k]["gain"]):
            g = rows[k]["gain"]
            met = "yes" if g >= limit else "**no**"
            out.append(f"- Target: Dice gain over the base model at k = {k} >= +{limit:.2f} "
                       f"(widget defaults): {g:+.3f} measured, met: {met} "
                       f"({rows[k]['n_models']} draw(s)).")
    return out + ([""] if out else [])


def compare_lines(summary: Sequence[dict], frozen: Sequence[dict]) -> list[str]:
    """Side-by-side table of the default fine-tune and the frozen-encoder one."""
    fz = {r["k"]: r for r in frozen}
    md = [
        "### Widget default vs frozen encoder (same pairs, same steps)",
        "",
        "| k | Dice, default | gain | Dice, frozen encoder | gain | BUSI lesion Dice, default "
        "/ frozen | Fine-tune time (s), default | Fine-tune time (s), frozen | Dice gate off, "
        "default / frozen |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in summary:
        k = row["k"]
        if k == 0 or k not in fz:
            continue
        f = fz[k]
        rd, rf = row["raw"], f["raw"]
        md.append(
            f"| {k} | {_cell([r['eval']['mean_dice'] for r in rd])} | {_gain(row)} | "
            f"{_cell([r['eval']['mean_dice'] for r in rf])} | {_gain(f)} | "
            f"{_cell([r['busi']['mean_dice_lesion'] for r in rd if r['busi']])} / "
            f"{_cell([r['busi']['mean_dice_lesion'] for r in rf if r['busi']])} | "
            f"{_cell([r['finetune_s'] for r in rd], 1)} | "
            f"{_cell([r['finetune_s'] for r in rf], 1)} | "
            f"{_cell([r['eval'].get('mean_dice_ungated', math.nan) for r in rd])} / "
            f"{_cell([r['eval'].get('mean_dice_ungated', math.nan) for r in rf])} |"
        )
    return md + [""]


def render(result: dict) -> str:
    a = result["settings"]
    md = [
        "# Annotation loop: fine-tuning on k corrected images at a new site (BUS-BRA)",
        "",
        C.hardware_markdown(result["hardware"]),
        "",
        C.checkpoint_markdown(result["checkpoint"]),
        f"Wall time {result['seconds'] / 60:.1f} min.",
        "",
    ]
    if a["quick"]:
        md += ["**Quick run: few images and steps; not a result.**", ""]
    ft = a["finetune"]
    md += [
        f"BUS-BRA fold 1 patients split at random (seed {a['seed']}): correction pool "
        f"{a['n_pool']} images of {a['n_pool_patients']} patients, evaluation set "
        f"{a['n_eval']} images of {a['n_eval_patients']} other patients. {a['draws']} random "
        "draw(s) of the pool per k (nested: a draw's larger k contains its smaller k). "
        f"Fine-tuning from the base model with the fine-tune widget's defaults: "
        f"{ft['max_steps']} steps, batch {ft['batch_size']}, lr {ft['lr']}, held-out fraction "
        f"{ft['val_fraction']}, augmentation {'on' if ft['augment'] else 'off'}, "
        f"{'encoder frozen (decoder only)' if ft.get('freeze_encoder') else 'whole network'}, "
        f"loss {ft.get('loss', '?')}. k = 0 is the base model."
        + (" Frozen-encoder fine-tunes on the same pairs are compared below."
           if result.get("frozen_summary") else ""),
        "",
        "Cells: mean ± sd over draws of the per-image means. Correction effort = "
        "|pred XOR truth| / lesion area (0 = nothing to repaint). *Pool, before*: the base "
        "model's effort on the k images the user corrected. BUSI: test split after "
        "fine-tuning (forgetting).",
        "",
        "| k | models | Dice (eval) | gain over base | IoU (eval) | Effort (eval, after) | "
        "Effort (pool, before) | BUSI Dice (lesion) | BUSI FP rate (normal) | "
        "Fine-tune time (s) | Dice (eval, gate off) | eval masks the gate empties |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in result["summary"]:
        rs = row["raw"]
        md.append(
            f"| {row['k']} | {row['n_models']} | {_cell([r['eval']['mean_dice'] for r in rs])} | "
            f"{_gain(row) if row['k'] else '–'} | "
            f"{_cell([r['eval']['mean_iou'] for r in rs])} | "
            f"{_cell([r['eval']['mean_effort'] for r in rs], 2)} | "
            f"{_cell([r['pool_effort_before'] for r in rs], 2) if row['k'] else '–'} | "
            f"{_cell([r['busi']['mean_dice_lesion'] for r in rs if r['busi']])} | "
            f"{_cell([r['busi']['fp_rate_normal'] for r in rs if r['busi']], 2)} | "
            f"{_cell([r['finetune_s'] for r in rs], 0) if row['k'] else '–'} | "
            f"{_cell([r['eval'].get('mean_dice_ungated', math.nan) for r in rs])} | "
            f"{_cell([r['eval'].get('n_gated_lesion', math.nan) for r in rs], 1)} |"
        )
    md += [""] + target_lines(result["summary"])
    if result.get("frozen_summary"):
        md += compare_lines(result["summary"], result["frozen_summary"])
    md += [
        "",
        f"Estimated time of this configuration on this machine: "
        f"{result['estimate_s'] / 60:.0f} min (measured {result['seconds'] / 60:.1f} min).",
        "",
    ]
    return "\n".join(md) + "\n"


def make_figure(result: dict):
    fig, axes = C.new_figure(1, 3, size=(4.6, 3.8))
    summ = result["summary"]
    ks = [r["k"] for r in summ]

    def line(ax, key_fn, label, fmt="o-"):
        means, sds = [], []
        for row in summ:
            vals = [key_fn(r) for r in row["raw"]]
            vals = [v for v in vals if v is not None and math.isfinite(v)]
            m, s = _agg(vals)
            means.append(m)
            sds.append(0.0 if math.isnan(s) else s)
            ax.scatter([row["k"]] * len(vals), vals, s=8, alpha=0.4)
        ax.errorbar(ks, means, yerr=sds, fmt=fmt, capsize=3, label=label)

    ax = axes[0][0]
    line(ax, lambda r: r["eval"]["mean_dice"], "Dice")
    line(ax, lambda r: r["eval"]["mean_iou"], "IoU", "s--")
    frozen = result.get("frozen_summary") or []
    if frozen:
        ax.errorbar([r["k"] for r in frozen], [r["dice"][0] for r in frozen],
                    yerr=[0.0 if math.isnan(r["dice"][1]) else r["dice"][1] for r in frozen],
                    fmt="v:", capsize=3, label="Dice, frozen encoder")
    ax.set_xlabel("k corrected images")
    ax.set_ylabel("evaluation set (other patients)")
    ax.set_title("BUS-BRA: accuracy vs k", fontsize=9)
    ax.legend(fontsize=7)
    ax = axes[0][1]
    line(ax, lambda r: r["eval"]["mean_effort"], "eval set, after fine-tuning")
    pk = [row for row in summ if row["k"] > 0]
    if pk:
        ax.errorbar(
            [row["k"] for row in pk],
            [row["effort_pool_before"][0] for row in pk],
            yerr=[
                0.0 if math.isnan(row["effort_pool_before"][1]) else row["effort_pool_before"][1]
                for row in pk
            ],
            fmt="^:",
            capsize=3,
            label="the k pool images, before (base model)",
        )
    ax.set_xlabel("k corrected images")
    ax.set_ylabel("|pred XOR truth| / lesion area")
    ax.set_title("Correction effort", fontsize=9)
    ax.legend(fontsize=7)
    ax = axes[0][2]
    if any(r["busi"] for row in summ for r in row["raw"]):
        line(
            ax,
            lambda r: r["busi"]["mean_dice_lesion"] if r["busi"] else math.nan,
            "BUSI test, lesion Dice",
        )
        ax.legend(fontsize=7)
    ax.set_xlabel("k corrected images")
    ax.set_title("Forgetting: BUSI after fine-tuning", fontsize=9)
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--busbra",
        default=str(C.DEFAULT_BUSBRA),
        help="BUS-BRA folder (default ../shared/data/busbra-fold1)",
    )
    p.add_argument(
        "--busi",
        default=str(C.DEFAULT_BUSI),
        help="BUSI folder for the forgetting check (default ../shared/data/...)",
    )
    p.add_argument("--split", default=str(C.DEFAULT_SPLIT), help="BUSI split CSV")
    p.add_argument(
        "--ks",
        type=int,
        nargs="+",
        default=[0, 5, 10, 20, 40],
        help="numbers of corrected images (default 0 5 10 20 40)",
    )
    p.add_argument("--draws", type=int, default=3, help="random draws per k (default 3)")
    p.add_argument("--seed", type=int, default=0, help="seed of the patient split and draws")
    p.add_argument(
        "--pool-fraction",
        type=float,
        default=0.5,
        help="share of patients in the correction pool (default 0.5)",
    )
    p.add_argument(
        "--eval-limit",
        type=int,
        default=None,
        help="score at most N evaluation images (a fixed random subset)",
    )
    p.add_argument(
        "--busi-limit",
        type=int,
        default=None,
        help="at most N BUSI test images per class for the forgetting check",
    )
    p.add_argument("--no-busi", action="store_true", help="skip the forgetting check")
    p.add_argument(
        "--compare-frozen",
        action="store_true",
        help="also fine-tune with the encoder frozen (the widget's option) on the same pairs "
        "at every k, reported side by side with the default",
    )
    p.add_argument(
        "--max-steps",
        type=int,
        default=None,
        help="override the widget's fine-tuning steps (quick checks only)",
    )
    p.add_argument(
        "--work-dir",
        default=None,
        help="keep the fine-tuned checkpoints here (default: a temporary folder, "
        "deleted at the end)",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: --ks 0 2 --draws 1 --eval-limit 6 --busi-limit 2 "
        "--max-steps 3 unless given",
    )
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    C.add_common_args(p)
    args = p.parse_args(argv)
    if args.quick:
        if args.ks == [0, 5, 10, 20, 40]:
            args.ks = [0, 2]
        args.draws = 1 if args.draws == 3 else args.draws
        args.eval_limit = 6 if args.eval_limit is None else args.eval_limit
        args.busi_limit = 2 if args.busi_limit is None else args.busi_limit
        args.max_steps = 3 if args.max_steps is None else args.max_steps
    if any(k < 0 for k in args.ks) or args.draws < 1:
        raise SystemExit("--ks must be >= 0 and --draws >= 1")
    args.ks = sorted(set(args.ks))
    return args


def pool_and_evalset(busbra: Path, args: argparse.Namespace) -> tuple[list, list]:
    """BUS-BRA split by patient into the correction pool and the evaluation set.

    Uses ``args.pool_fraction``, ``args.seed``, ``args.eval_limit`` (a fixed random subset
    of the evaluation set) and ``args.ks`` (the pool must hold ``max(ks)`` images); shared
    with ``active_learning.py`` so both benchmarks score the same images.

    Raises
    ------
    SystemExit
        If the pool is smaller than the largest k.
    """
    pool, evalset = C.patient_split(C.read_busbra(busbra), args.pool_fraction, args.seed)
    if args.eval_limit is not None and args.eval_limit < len(evalset):
        pick = np.sort(
            np.random.default_rng(args.seed + 1).permutation(len(evalset))[: args.eval_limit]
        )
        evalset = [evalset[i] for i in pick]
    if max(args.ks) > len(pool):
        raise SystemExit(f"the correction pool has {len(pool)} images; lower --ks")
    return pool, evalset


def random_orders(n_pool: int, seed: int, draws: int) -> list[np.ndarray]:
    """The ``draws`` random orders of the pool (a draw's first k images are its k corrections)."""
    return [np.random.default_rng([seed, d]).permutation(n_pool) for d in range(draws)]


def main(argv: Sequence[str] | None = None) -> dict:
    """Run the benchmark; return the JSON payload (also written to ``--out``)."""
    args = parse_args(argv)
    threads = C.set_threads(args.threads)
    ckpt = C.resolve_checkpoint(args.checkpoint)
    busbra = C.require_dir(args.busbra, "BUS-BRA", "--busbra")

    from busseg.devices import get_device
    from busseg.finetune import FINETUNE_DEFAULTS, finetune, finetune_config
    from busseg.inference import clear_model_cache, load_model

    device = get_device(args.device)
    t_start = time.perf_counter()
    pool, evalset = pool_and_evalset(busbra, args)
    C.log(f"threads {threads}; pool {len(pool)} images, eval {len(evalset)} images", args.quiet)

    eval_images, eval_masks = load_pairs([(r.image_path, [r.mask_path]) for r in evalset])
    kmax = max(args.ks)
    orders = random_orders(len(pool), args.seed, args.draws)
    needed = sorted({int(i) for o in orders for i in o[:kmax]})  # pool images ever drawn
    loaded = load_pairs([(pool[i].image_path, [pool[i].mask_path]) for i in needed])
    pool_images = dict(zip(needed, loaded[0], strict=True))
    pool_masks = dict(zip(needed, loaded[1], strict=True))
    busi_images = busi_masks = None
    if not args.no_busi:
        if Path(args.busi).is_dir() and Path(args.split).is_file():
            busi_images, busi_masks = load_pairs(_busi_test(args))
        else:
            C.log("BUSI not found: forgetting check skipped (pass --busi or --no-busi)", args.quiet)

    overrides = {} if args.max_steps is None else {"max_steps": args.max_steps}
    cfg = finetune_config(**overrides)
    ft_settings = {**FINETUNE_DEFAULTS, **cfg.to_dict()}

    # base model: k = 0, and its predictions on the pool (the user's starting point)
    base = load_model(ckpt, device=device)
    t0 = time.perf_counter()
    base_eval = score(base, eval_images, eval_masks)
    eval_s = time.perf_counter() - t0
    base_pool = score(base, [pool_images[i] for i in needed], [pool_masks[i] for i in needed])
    pool_effort = dict(zip(needed, base_pool["effort"], strict=True))
    t0 = time.perf_counter()
    base_busi = score(base, busi_images, busi_masks) if busi_images else None
    busi_s = time.perf_counter() - t0
    C.log(
        f"base model: eval Dice {base_eval['mean_dice']:.3f} ({eval_s:.0f} s); BUSI {busi_s:.0f} s",
        args.quiet,
    )

    runs: list[dict] = []
    if 0 in args.ks:
        runs.append(
            {
                "k": 0,
                "draw": None,
                "ids": [],
                "eval": base_eval,
                "busi": base_busi,
                "pool_effort_before": math.nan,
                "finetune_s": 0.0,
            }
        )
    modes = [(DEFAULT, {})]
    if args.compare_frozen and not cfg.freeze_encoder:
        modes.append((FROZEN, {"freeze_encoder": True}))
    mode_cfgs = {m: finetune_config(**{**overrides, **extra}) for m, extra in modes}
    n_ft = len([k for k in args.ks if k > 0]) * args.draws * len(modes)
    estimate = time.perf_counter() - t_start
    tmp = None
    work = Path(args.work_dir) if args.work_dir else None
    if work is None:
        tmp = tempfile.TemporaryDirectory(prefix="busseg-annotation-loop-")
        work = Path(tmp.name)
    try:
        done = 0
        for d, order in enumerate(orders):
            for k, (mode, _) in [(k, m) for k in args.ks if k > 0 for m in modes]:
                idx = [int(i) for i in order[:k]]
                ids = [pool[i].id for i in idx]
                out_dir = work / (f"draw{d}_k{k}" + ("" if mode == DEFAULT else f"_{mode}"))
                t0 = time.perf_counter()
                res = finetune(
                    [pool_images[i] for i in idx],
                    [pool_masks[i] for i in idx],
                    ckpt,
                    cfg=mode_cfgs[mode],
                    out_dir=out_dir,
                    names=ids,
                    device=str(device),
                )
                ft_s = time.perf_counter() - t0
                if res.checkpoint is None:
                    raise RuntimeError(f"fine-tuning on {k} pairs wrote no checkpoint")
                model = load_model(res.checkpoint, device=device)
                t0 = time.perf_counter()
                ev = score(model, eval_images, eval_masks)
                bu = score(model, busi_images, busi_masks) if busi_images else None
                sc_s = time.perf_counter() - t0
                runs.append(
                    {
                        "k": k,
                        "draw": d,
                        "mode": mode,
                        "freeze_encoder": bool(mode_cfgs[mode].freeze_encoder),
                        "ids": ids,
                        "eval": ev,
                        "busi": bu,
                        "pool_effort_before": float(np.mean([pool_effort[i] for i in idx])),
                        "finetune_s": ft_s,
                        "score_s": sc_s,
                        "steps": res.fit.steps,
                        "n_train": res.n_train,
                        "n_val": res.n_val,
                        "heldout_dice_before": res.dice_before,
                        "heldout_dice_after": res.dice_after,
                    }
                )
                clear_model_cache()
                done += 1
                per = (time.perf_counter() - t_start - estimate) / done
                C.log(
                    f"draw {d} k {k} {mode}: fine-tune {ft_s:.0f} s, eval Dice "
                    f"{ev['mean_dice']:.3f}"
                    f" ({done}/{n_ft}; about {per * (n_ft - done) / 60:.0f} min left)",
                    args.quiet,
                )
    finally:
        if tmp is not None:
            tmp.cleanup()

    seconds = time.perf_counter() - t_start
    base_dice = base_eval["mean_dice"]
    summary = summary_rows(runs, args.ks, base_dice=base_dice)
    frozen_summary = (summary_rows(runs, args.ks, FROZEN, base_dice=base_dice)
                      if len(modes) > 1 else [])
    ft_times = [r["finetune_s"] + r.get("score_s", 0.0) for r in runs if r["k"] > 0]
    per_model = float(np.median(ft_times)) if ft_times else 0.0
    result = {
        "benchmark": NAME,
        "hardware": C.hardware_info(device),
        "checkpoint": C.checkpoint_summary(ckpt),
        "seconds": seconds,
        "estimate_s": estimate + per_model * n_ft,
        "settings": {
            "quick": bool(args.quick),
            "seed": args.seed,
            "draws": args.draws,
            "ks": args.ks,
            "n_pool": len(pool),
            "n_pool_patients": len({r.case for r in pool}),
            "n_eval": len(evalset),
            "n_eval_patients": len({r.case for r in evalset}),
            "n_busi": len(busi_images) if busi_images else 0,
            "finetune": ft_settings,
            "compare_frozen": len(modes) > 1,
            "device": str(device),
            "threads": threads,
        },
        "eval_ids": [r.id for r in evalset],
        "pool_ids": [r.id for r in pool],
        "base_pool_effort": {pool[i].id: pool_effort[i] for i in needed},
        "base_dice": base_dice,
        "summary": [{k: v for k, v in row.items() if k != "raw"} for row in summary],
        "frozen_summary": [{k: v for k, v in row.items() if k != "raw"}
                           for row in frozen_summary],
        "targets": {str(k): {"gain": next((r["gain"] for r in summary if r["k"] == k), None),
                             "limit": lim} for k, lim in TARGET_GAIN.items()},
        "runs": runs,
    }
    full = {**result, "summary": summary, "frozen_summary": frozen_summary}
    markdown = render(full)
    fig = make_figure(full)
    paths = C.write_results(args.out, NAME, markdown, result, fig)
    print(markdown)
    C.log(f"wrote {', '.join(str(p) for p in paths.values())}", args.quiet)
    return result


if __name__ == "__main__":
    main()
