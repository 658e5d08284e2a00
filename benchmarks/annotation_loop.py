"""The annotation loop at a new site: segment, correct, fine-tune, and how much it helps.

Usage (from the repository root)::

    python benchmarks/annotation_loop.py                 # shipped default model, full run
    python benchmarks/annotation_loop.py --checkpoint runs/x/best --quick
    python benchmarks/annotation_loop.py --compare-frozen --threads 2   # + frozen encoder
    python benchmarks/annotation_loop.py --ks 0 10 --recipes v2-default replay l2sp

Simulates a user of the *Fine-tune* widget at a site the model has not seen (BUS-BRA fold 1:
other scanners, another hospital). Patients (``Case``) are split at random (``--seed``) into
a correction pool and an evaluation set of other patients (``--pool-fraction``, default
half). For each draw (``--draws``, different random orders of the pool) and each ``k`` in
``--ks``: the first ``k`` pool images of that order are predicted by the base model, the user
"corrects" them to the ground truth, and the base model is fine-tuned on those ``k`` pairs
with the widget's defaults (:data:`busseg.finetune.FINETUNE_DEFAULTS`, one of the named
recipes: 100 steps, batch 4, 20 % of the pairs held out to pick the best step, augmentation
on, the whole network trained, BCE on every pair + Dice on pairs with a lesion; the learning
rate, L2-SP, replay pairs and prompt rounds as the recipe says). The orders are
nested: a draw's 10 images include its 5. ``k = 0`` is the base model. With
``--compare-frozen`` every fine-tune is repeated on the same pairs with the encoder frozen
(the widget's "freeze the encoder" option, the default before model v2), so both modes are
shown side by side; the issue's targets are Dice gains over the base model of >= +0.04 at
k = 10 and >= +0.06 at k = 40 with the widget defaults. With ``--recipes NAME ...`` every
fine-tune is run once per named recipe of :data:`busseg.finetune.FINETUNE_RECIPES` on the same
pairs (the first recipe fills the main table), and a recipe table gives, per k and recipe,
the Dice gain and the box-then-clicks interactions before and after.

Prompt skill: on every lesion scan of the evaluation set, the simulated annotator
of :mod:`busseg.annotator` (one implementation, :func:`busseg.annotator.annotation_cost`)
draws one jittered box per lesion and then clicks until IoU >= 0.85 (the automatic mask is
not offered, so this is the box-then-clicks part of the protocol alone), capped at 20
interactions; the box jitter of scan ``i`` is seeded by ``(--seed, i)``, so every model sees
the same boxes. Reported: interactions per lesion scan before (base model) and after each
fine-tune, and the scans that never reach IoU 0.85. A recipe meets the recipe target at
k = 10 when its Dice gain is >= +0.04 and its interactions are no higher than the base
model's; the rule that picks the default recipe (:func:`choose_recipe`) is printed with the
table.

Reported per ``k`` (mean and standard deviation over draws): Dice and IoU on the evaluation
set; correction effort (``|pred XOR truth| / lesion area``,
:func:`busseg.metrics.correction_effort`) on the evaluation set after fine-tuning, and on the
``k`` pool images before it (what the user had to repaint); fine-tuning wall time (per k
and mode, checkpoint writing included); and Dice on the BUSI test split after fine-tuning
(forgetting). Also box-then-clicks interactions (below). Writes ``annotation_loop.md``,
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
#: Issue 17's target for a recipe (at k = 10): this Dice gain, and box-then-clicks
#: interactions per lesion scan no higher than the base model's.
TARGET_RECIPE_GAIN = 0.04
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


def box_click_cost(model, images: Sequence[np.ndarray], masks: Sequence[np.ndarray],
                   seed: int) -> dict | None:
    """Box-then-clicks interactions of ``model`` on the lesion scans.

    The simulated annotator of :mod:`busseg.annotator` on every scan with a lesion, with an
    empty automatic mask so that nothing is accepted or cleared: one jittered box per
    lesion, then clicks until IoU >= 0.85, capped at 20 interactions (a scan that does not
    get there counts 20 and "never converged"). The jitter of the ``i``-th lesion scan comes
    from ``numpy.random.default_rng([seed, i])``, the same for every model.

    Parameters
    ----------
    model : torch.nn.Module
        A loaded model; one without guidance channels has no prompt skill to measure.
    images, masks : sequence of numpy.ndarray
        (H, W) images and bool ground truths (normal scans, empty masks, are skipped).
    seed : int
        Seed of the box jitter.

    Returns
    -------
    dict or None
        ``per_lesion_scan`` (mean interactions), ``never_converged`` (count), ``n`` (lesion
        scans), ``interactions`` (list, per lesion scan); None for a model without prompts
        or without lesion scans.
    """
    from busseg.annotator import annotation_cost
    from busseg.inference import accepts_prompts

    lesion = [i for i, m in enumerate(masks) if np.any(m)]
    if not lesion or not accepts_prompts(model):
        return None
    truths = [np.asarray(masks[i]) > 0 for i in lesion]
    res = annotation_cost(model, [images[i] for i in lesion], truths, seed=seed,
                          autos=[np.zeros(t.shape, bool) for t in truths])
    return {"per_lesion_scan": res["lesion_per_scan"], "never_converged": res["never_converged"],
            "n": res["n"], "interactions": res["interactions"]}


def _bc(run: dict, key: str = "per_lesion_scan") -> float:
    bc = run.get("box_clicks")
    return math.nan if not bc else float(bc[key])


def recipe_rows(runs: list[dict], ks: Sequence[int], recipes: Sequence[str]) -> list[dict]:
    """Per k > 0 and recipe: Dice and box-then-clicks interactions before and after.

    "Before" is the base model (the k = 0 run) on the same evaluation set, the same for
    every recipe; "after" the mean over draws of the fine-tuned models.

    Returns
    -------
    list of dict
        ``k``, ``recipe``, ``n_models``, ``dice_before``, ``dice_after`` (mean, sd),
        ``gain``, ``inter_before``, ``inter_after`` (mean, sd), ``never_before``,
        ``never_after`` (mean count), ``busi_dice_lesion``, ``finetune_s`` (mean, sd),
        ``meets`` (the recipe target at this k: gain >= +0.04 and interactions no higher
        than the base model's; None where it is not measured).
    """
    base = next((r for r in runs if r["k"] == 0), None)
    if base is None:
        return []
    d0, i0, n0 = base["eval"]["mean_dice"], _bc(base), _bc(base, "never_converged")
    rows = []
    for k in ks:
        if k == 0:
            continue
        for name in recipes:
            rs = [r for r in runs if r["k"] == k and r.get("mode") == name]
            if not rs:
                continue
            dice = _agg([r["eval"]["mean_dice"] for r in rs])
            inter = _agg([_bc(r) for r in rs])
            gain = dice[0] - d0
            meets = None
            if math.isfinite(gain) and math.isfinite(inter[0]) and math.isfinite(i0):
                meets = bool(gain >= TARGET_RECIPE_GAIN and inter[0] <= i0)
            rows.append({
                "k": k, "recipe": name, "n_models": len(rs), "dice_before": d0,
                "dice_after": dice, "gain": gain, "inter_before": i0, "inter_after": inter,
                "never_before": n0,
                "never_after": _agg([_bc(r, "never_converged") for r in rs])[0],
                "busi_dice_lesion": _agg([r["busi"]["mean_dice_lesion"] for r in rs
                                          if r["busi"]]),
                "finetune_s": _agg([r["finetune_s"] for r in rs]), "meets": meets,
            })
    return rows


def choose_recipe(rows: Sequence[dict], k: int = 10) -> dict:
    """Issue 17's rule for the default fine-tune recipe, on the recipe rows of ``k``.

    Among the recipes whose Dice gain is >= +0.04 and whose box-then-clicks interactions
    are no higher than the base model's, the one with the fewest interactions; if none
    meets both, the one with the fewest interactions among those with a positive gain (the
    target then counts as missed); None when no recipe gains.

    Returns
    -------
    dict
        ``recipe`` (str or None), ``met`` (bool), ``k`` and ``reason`` (one sentence).
    """
    at = [r for r in rows if r["k"] == k and math.isfinite(r["inter_after"][0])]
    ok = [r for r in at if r["meets"]]
    if ok:
        best = min(ok, key=lambda r: (r["inter_after"][0], -r["gain"]))
        return {"k": k, "recipe": best["recipe"], "met": True,
                "reason": f"meets the target (gain {best['gain']:+.3f} >= "
                          f"+{TARGET_RECIPE_GAIN:.2f}, {best['inter_after'][0]:.2f} <= "
                          f"{best['inter_before']:.2f} interactions) with the fewest "
                          "interactions of those that do"}
    pos = [r for r in at if math.isfinite(r["gain"]) and r["gain"] > 0]
    if pos:
        best = min(pos, key=lambda r: (r["inter_after"][0], -r["gain"]))
        return {"k": k, "recipe": best["recipe"], "met": False,
                "reason": f"no recipe meets the target; fewest interactions "
                          f"({best['inter_after'][0]:.2f} against "
                          f"{best['inter_before']:.2f} before) among those with a positive "
                          f"Dice gain ({best['gain']:+.3f})"}
    return {"k": k, "recipe": None, "met": False,
            "reason": "no recipe measured at this k has a positive Dice gain"}


def recipe_lines(rows: Sequence[dict], choice: dict | None) -> list[str]:
    """The recipe table and the rule's choice, as Markdown lines."""
    if not rows:
        return []
    md = [
        "### Fine-tune recipes: automatic Dice and box-then-clicks interactions (issue 17)",
        "",
        "Interactions per lesion scan of the evaluation set to IoU >= 0.85 from a jittered box "
        "(boxes count; capped at 20); *never*: scans that do not get there (mean count per "
        "model). *Before* is the base model. Target at k = 10: gain >= "
        f"+{TARGET_RECIPE_GAIN:.2f} and interactions no higher than before.",
        "",
        "| k | recipe | models | Dice before | Dice after | gain | interactions before | "
        "interactions after | never, before / after | BUSI lesion Dice | fine-tune s | "
        "target |",
        "|---:|:---|---:|---:|---:|---:|---:|---:|---:|---:|---:|:---|",
    ]
    for r in rows:
        ia, fs, bu = r["inter_after"], r["finetune_s"], r["busi_dice_lesion"]

        def ms(x, digits=3):
            if not math.isfinite(x[0]):
                return "–"
            return f"{x[0]:.{digits}f}" + (f" ± {x[1]:.{digits}f}" if math.isfinite(x[1])
                                           else "")

        target = {None: "–", True: "met", False: "missed"}[r["meets"]]
        md.append(
            f"| {r['k']} | {r['recipe']} | {r['n_models']} | {r['dice_before']:.3f} | "
            f"{ms(r['dice_after'])} | {r['gain']:+.3f} | {C.fmt(r['inter_before'], 2)} | "
            f"{ms(ia, 2)} | {C.fmt(r['never_before'], 0)} / {C.fmt(r['never_after'], 1)} | "
            f"{ms(bu)} | {ms(fs, 0)} | {target} |")
    md.append("")
    if choice is not None:
        name = choice["recipe"] or "none"
        md += [f"Rule (issue 17) at k = {choice['k']}: **{name}** — {choice['reason']}.", ""]
    return md


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
    if a.get("models_done", 0) < a.get("models_total", 0):
        md += [f"**Partial: {a['models_done']} of {a['models_total']} fine-tunes done "
               "(a stopped run; draws run one after the other).**", ""]
    ft = a["finetune"]
    md += [
        f"BUS-BRA fold 1 patients split at random (seed {a['seed']}): correction pool "
        f"{a['n_pool']} images of {a['n_pool_patients']} patients, evaluation set "
        f"{a['n_eval']} images of {a['n_eval_patients']} other patients. {a['draws']} random "
        "draw(s) of the pool per k (nested: a draw's larger k contains its smaller k). "
        + ("Fine-tuning from the base model with the fine-tune widget's defaults: "
           if not a.get("recipes_order") else
           f"Fine-tuning from the base model; main table: recipe {a['recipes_order'][0]}: ")
        + f"{ft['max_steps']} steps, batch {ft['batch_size']}, lr {ft['lr']}, held-out fraction "
        f"{ft['val_fraction']}, augmentation {'on' if ft['augment'] else 'off'}, "
        f"{'encoder frozen (decoder only)' if ft.get('freeze_encoder') else 'whole network'}, "
        f"loss {ft.get('loss', '?')}, {ft.get('replay', 0)} BUSI replay pairs, L2-SP alpha "
        f"{ft.get('l2sp_alpha', 0.0)}, prompts {ft.get('prompts')}. k = 0 is the base model."
        + (f" Evaluation limited to a fixed random subset of {a['n_eval']} images "
           "(--eval-limit)." if a.get("eval_limit") else "")
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
        "Fine-tune time (s) | Dice (eval, gate off) | eval masks the gate empties | "
        "box then clicks (interactions / lesion scan) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
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
            f"{_cell([r['eval'].get('n_gated_lesion', math.nan) for r in rs], 1)} | "
            f"{_cell([_bc(r) for r in rs], 2)} |"
        )
    md += [""] + target_lines(result["summary"])
    md += recipe_lines(result.get("recipe_rows") or [], result.get("recipe_choice"))
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
    fig, axes = C.new_figure(1, 4, size=(4.6, 3.8))
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
    ax = axes[0][3]
    base = next((r for r in result["runs"] if r["k"] == 0), None)
    modes = result["settings"].get("recipes_order") or [None]
    for name in modes:
        pts = [(r["k"], _bc(r)) for r in result["runs"]
               if r["k"] > 0 and (name is None or r.get("mode") == name)
               and math.isfinite(_bc(r))]
        if base is not None and math.isfinite(_bc(base)):
            pts = [(0, _bc(base))] + pts
        if not pts:
            continue
        ks_ = sorted({k for k, _ in pts})
        ax.plot(ks_, [np.mean([v for k, v in pts if k == kk]) for kk in ks_], "o-",
                label=name or "widget defaults")
    ax.set_xlabel("k corrected images")
    ax.set_ylabel("interactions per lesion scan (eval)")
    ax.set_title("Box then clicks to IoU 0.85", fontsize=9)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
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
        "--recipes",
        nargs="+",
        default=None,
        metavar="NAME",
        help="fine-tune once per named recipe of busseg.finetune.FINETUNE_RECIPES on the same "
        "pairs (the first fills the main table) and print the recipe table; default: the "
        "widget's defaults only; 'site:vote' and 'site:adapted' fine-tune with the site "
        "recipe and make the result a site checkpoint (busseg.site) as learning as you go does",
    )
    p.add_argument(
        "--no-box-clicks",
        action="store_true",
        help="skip the box-then-clicks interactions (faster; no prompt-skill numbers)",
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
    if args.recipes is not None:
        from busseg.finetune import FINETUNE_RECIPES

        unknown = [r for r in args.recipes if r not in FINETUNE_RECIPES
                   and r not in ("site:vote", "site:adapted")]
        if unknown:
            raise SystemExit(f"unknown recipe(s) {', '.join(unknown)}; choose from "
                             f"{', '.join(FINETUNE_RECIPES)}")
        args.recipes = list(dict.fromkeys(args.recipes))
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
    from busseg.finetune import (
        DEFAULT_RECIPE,
        SITE_RECIPE,
        FinetuneSettings,
        finetune,
        prompt_costs,
        prompts_from_adapted,
        recipe_settings,
    )
    from busseg.inference import clear_model_cache, load_model
    from busseg.site import make_site_checkpoint

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
    first = args.recipes[0] if args.recipes else None
    if first is not None and first.startswith("site:"):
        first = SITE_RECIPE
    first_settings = FinetuneSettings.resolve(first, **overrides)
    ft_settings = {k: v for k, v in first_settings.to_dict().items() if k != "recipe"}

    # base model: k = 0, and its predictions on the pool (the user's starting point)
    base = load_model(ckpt, device=device)
    t0 = time.perf_counter()
    base_eval = score(base, eval_images, eval_masks)
    eval_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    base_bc = (None if args.no_box_clicks
               else box_click_cost(base, eval_images, eval_masks, args.seed))
    bc_s = time.perf_counter() - t0
    base_pool = score(base, [pool_images[i] for i in needed], [pool_masks[i] for i in needed])
    pool_effort = dict(zip(needed, base_pool["effort"], strict=True))
    t0 = time.perf_counter()
    base_busi = score(base, busi_images, busi_masks) if busi_images else None
    busi_s = time.perf_counter() - t0
    C.log(
        f"base model: eval Dice {base_eval['mean_dice']:.3f} ({eval_s:.0f} s); BUSI {busi_s:.0f} s"
        + (f"; box then clicks {base_bc['per_lesion_scan']:.2f} interactions per lesion scan, "
           f"{base_bc['never_converged']} never converge ({bc_s:.0f} s)" if base_bc else ""),
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
                "box_clicks": base_bc,
                "pool_effort_before": math.nan,
                "finetune_s": 0.0,
            }
        )
    # a mode: (name, recipe, extra overrides); without --recipes the widget's
    # defaults are the mode "default"
    # "site:vote" / "site:adapted": the site recipe, and the fine-tuned folder made a site
    # checkpoint (busseg.site) as learning as you go writes it
    modes = ([(name, SITE_RECIPE if name.startswith("site:") else name, {})
              for name in args.recipes] if args.recipes else [(DEFAULT, None, {})])
    mode_site = {m: m.split(":", 1)[1] for m, _, _ in modes if m.startswith("site:")}
    main_mode = modes[0][0]
    if args.compare_frozen and not first_settings.train.freeze_encoder:
        modes.append((FROZEN, first, {"freeze_encoder": True}))
    mode_settings = {m: FinetuneSettings.resolve(rec, **{**overrides, **extra})
                     for m, rec, extra in modes}
    n_ft = len([k for k in args.ks if k > 0]) * args.draws * len(modes)
    estimate = time.perf_counter() - t_start
    def report(runs: list[dict], done_models: int) -> dict:
        """Write the results of the runs so far (after every model: a stopped run keeps them)."""
        partial = done_models < n_ft
        seconds = time.perf_counter() - t_start
        base_dice = base_eval["mean_dice"]
        summary = summary_rows(runs, args.ks, main_mode, base_dice=base_dice)
        recipes = [m for m, _, _ in modes if m != FROZEN] if args.recipes else []
        rrows = recipe_rows(runs, args.ks, recipes) if recipes else []
        choice = choose_recipe(rrows, 10) if any(r["k"] == 10 for r in rrows) else None
        frozen_summary = (summary_rows(runs, args.ks, FROZEN, base_dice=base_dice)
                          if any(m == FROZEN for m, _, _ in modes) else [])
        ft_times = [r["finetune_s"] + r.get("score_s", 0.0) + r.get("box_clicks_s", 0.0)
                    for r in runs if r["k"] > 0]
        per_model = float(np.median(ft_times)) if ft_times else 0.0
        result = {
            "benchmark": NAME,
            "hardware": C.hardware_info(device),
            "checkpoint": C.checkpoint_summary(ckpt),
            "seconds": seconds,
            "estimate_s": estimate + per_model * n_ft,
            "settings": {
                "quick": bool(args.quick),
                "models_done": done_models,
                "models_total": n_ft,
                "seed": args.seed,
                "draws": args.draws,
                "ks": args.ks,
                "n_pool": len(pool),
                "n_pool_patients": len({r.case for r in pool}),
                "n_eval": len(evalset),
                "n_eval_patients": len({r.case for r in evalset}),
                "n_busi": len(busi_images) if busi_images else 0,
                "finetune": ft_settings,
                "recipes": {m: recipe_settings(SITE_RECIPE if m.startswith("site:") else m)
                            for m in recipes},
                "recipes_order": recipes,
                "eval_limit": args.eval_limit,
                "box_clicks": not args.no_box_clicks,
                "compare_frozen": any(m == FROZEN for m, _, _ in modes),
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
            "recipe_rows": rrows,
            "recipe_choice": choice,
            "targets": {str(k): {"gain": next((r["gain"] for r in summary if r["k"] == k), None),
                                 "limit": lim} for k, lim in TARGET_GAIN.items()},
            "runs": runs,
        }
        full = {**result, "summary": summary, "frozen_summary": frozen_summary}
        markdown = render(full)
        fig = make_figure(full)
        paths = C.write_results(args.out, NAME, markdown, result, fig)
        import matplotlib.pyplot as plt

        plt.close(fig)
        if not partial:
            print(markdown)
        C.log(f"wrote {', '.join(str(p) for p in paths.values())}"
              + (f" ({done_models} of {n_ft} fine-tunes)" if partial else ""), args.quiet)
        return result


    tmp = None
    work = Path(args.work_dir) if args.work_dir else None
    if work is None:
        tmp = tempfile.TemporaryDirectory(prefix="busseg-annotation-loop-")
        work = Path(tmp.name)
    try:
        done = 0
        for d, order in enumerate(orders):
            for k, (mode, _, _) in [(k, m) for k in args.ks if k > 0 for m in modes]:
                idx = [int(i) for i in order[:k]]
                ids = [pool[i].id for i in idx]
                out_dir = work / (f"draw{d}_k{k}" + ("" if mode == DEFAULT else f"_{mode}"))
                t0 = time.perf_counter()
                res = finetune(
                    [pool_images[i] for i in idx],
                    [pool_masks[i] for i in idx],
                    ckpt,
                    settings=mode_settings[mode],
                    out_dir=out_dir,
                    names=ids,
                    device=str(device),
                )
                ft_s = time.perf_counter() - t0
                if res.checkpoint is None:
                    raise RuntimeError(f"fine-tuning on {k} pairs wrote no checkpoint")
                if mode in mode_site:  # prompts from the cheaper network on the held-out pairs
                    pc = prompt_costs([pool_images[i] for i in idx],
                                      [pool_masks[i] for i in idx],
                                      res.extra["val_indices"],
                                      {"base": ckpt, "adapted": res.checkpoint})
                    ok = prompts_from_adapted(pc, [pool_masks[i] for i in idx],
                                              res.extra["val_indices"])
                    make_site_checkpoint(res.checkpoint, ckpt, automatic=mode_site[mode],
                                         prompts="adapted" if ok else "base")
                model = load_model(res.checkpoint, device=device)
                t0 = time.perf_counter()
                ev = score(model, eval_images, eval_masks)
                bu = score(model, busi_images, busi_masks) if busi_images else None
                sc_s = time.perf_counter() - t0
                t0 = time.perf_counter()
                bc = (None if args.no_box_clicks
                      else box_click_cost(model, eval_images, eval_masks, args.seed))
                bc_s = time.perf_counter() - t0
                runs.append(
                    {
                        "k": k,
                        "draw": d,
                        "mode": mode,
                        "recipe": mode_settings[mode].recipe or DEFAULT_RECIPE,
                        "freeze_encoder": bool(mode_settings[mode].train.freeze_encoder),
                        "ids": ids,
                        "eval": ev,
                        "busi": bu,
                        "box_clicks": bc,
                        "pool_effort_before": float(np.mean([pool_effort[i] for i in idx])),
                        "finetune_s": ft_s,
                        "score_s": sc_s,
                        "box_clicks_s": bc_s,
                        "n_replay": res.extra.get("n_replay", 0),
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
                if done < n_ft:  # a stopped run keeps what is done
                    report(runs, done_models=done)
                C.log(
                    f"draw {d} k {k} {mode}: fine-tune {ft_s:.0f} s, eval Dice "
                    f"{ev['mean_dice']:.3f}"
                    + (f", box then clicks {bc['per_lesion_scan']:.2f} ({bc_s:.0f} s)"
                       if bc else "")
                    + f" ({done}/{n_ft}; about {per * (n_ft - done) / 60:.0f} min left)",
                    args.quiet,
                )
    finally:
        if tmp is not None:
            tmp.cleanup()

    return report(runs, done_models=n_ft)

if __name__ == "__main__":
    main()
