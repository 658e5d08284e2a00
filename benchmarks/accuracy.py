"""Accuracy of a checkpoint on the BUSI test split and, zero-shot, on BUS-BRA fold 1.

Usage (from the repository root)::

    python benchmarks/accuracy.py                       # shipped default model, full run
    python benchmarks/accuracy.py --checkpoint runs/x/best --quick

BUSI: the test split of ``training/splits/busi.csv`` (duplicate-aware groups, never used for
training or tuning). Per class (benign, malignant, lesion = benign + malignant, normal): mean
Dice, IoU, precision, recall and HD95 (pixels) of the per-image values with 95 % percentile
bootstrap confidence intervals (``busseg.metrics``), and the image-level false-positive rate
on normal images (share with any predicted pixel). BUS-BRA (other scanners, another
hospital, never seen in training): the same metrics overall and per scanner (``Device``).

For a model with an image-level class head (normal / benign / malignant), masks come from
``busseg.inference.predict`` with the shipped default settings, normal-scan gate included;
the same forward pass also gives the ungated mask, so the FP rate on normal images (BUSI)
and the lesion Dice (BUSI and BUS-BRA) are reported with the gate on and off, with the
share of lesion images the gate empties and the median P(normal) on them. The class head
is scored by the AUC of malignant vs benign (lesion images, score P(malignant) /
(P(benign) + P(malignant)); BUSI and BUS-BRA) and of lesion vs normal (score
1 - P(normal); BUSI), with 95 % stratified bootstrap intervals, and by a reliability
diagram of P(lesion) = 1 - P(normal) with its expected calibration error (10 bins).
BUS-UCLM (a third hospital, Siemens scanner, many normal scans): the test patients of the
committed patient split ``training/splits/busuclm.csv`` of ``../shared/data/busuclm-dev``
(records from :func:`busseg.data.discover`), with the default settings (gate on) and gate off
from the same pass: lesion Dice with a 95 % bootstrap CI, separately on the scans without
caliper marks (``INFO.csv`` ``Marks`` = No: the sonographer's crosses burnt into the image
can teach "crosses = lesion"), the FP rate on normal scans (share with any predicted pixel)
and the AUC of lesion vs normal; scans of those patients that cannot be scored (e.g. an
image smaller than its mask) are listed with the reason, never dropped silently. A summary
table at the top compares the headline numbers with their targets (:data:`TARGETS`).
The region filter (``inference.region_filter``, :mod:`busseg.region_filter`) is
applied by default after the gate; the same forward pass gives the masks with the filter off
(gate on) and with gate and filter off, so a section reports per dataset (BUSI test, BUS-UCLM
test patients, BUS-BRA fold 1) the normal scans with a false region and the lesion Dice with
the filter on and off, and the lesion masks the filter empties, against its targets
(:data:`FILTER_TARGETS`).
A second table places published U-Net-family figures on BUSI beside ours, with each
source's protocol. Writes ``accuracy.md``, ``accuracy.json`` (with every per-image row) and
``accuracy.png`` into ``--out``.
"""

from __future__ import annotations

import argparse
import csv
import io
import math
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402

NAME = "accuracy"
METRICS = ("dice", "iou", "precision", "recall", "hd95")
_TITLES = {
    "dice": "Dice",
    "iou": "IoU",
    "precision": "Precision",
    "recall": "Recall",
    "hd95": "HD95 (px)",
}

#: Published U-Net-family results on BUSI. Only numbers read in their source are listed.
#: All come from one source; its protocol is described in ``PUBLISHED_SOURCES``.
PUBLISHED: list[dict[str, Any]] = [
    {
        "model": "U-Net",
        "params_m": 34.52,
        "dice": 76.97,
        "dice_sd": 3.10,
        "iou": 68.61,
        "iou_sd": 2.86,
        "source": "tang2024",
    },
    {
        "model": "Attention U-Net",
        "params_m": 34.87,
        "dice": 76.88,
        "dice_sd": 3.50,
        "iou": 68.55,
        "iou_sd": 3.22,
        "source": "tang2024",
    },
    {
        "model": "U-Net++",
        "params_m": 26.90,
        "dice": 78.06,
        "dice_sd": 3.25,
        "iou": 69.49,
        "iou_sd": 2.94,
        "source": "tang2024",
    },
    {
        "model": "U-Net 3+",
        "params_m": 26.97,
        "dice": 76.88,
        "dice_sd": 3.68,
        "iou": 68.38,
        "iou_sd": 3.35,
        "source": "tang2024",
    },
    {
        "model": "UNeXt",
        "params_m": 1.47,
        "dice": 74.16,
        "dice_sd": 2.84,
        "iou": 65.04,
        "iou_sd": 2.71,
        "source": "tang2024",
    },
    {
        "model": "CMUNeXt",
        "params_m": 3.14,
        "dice": 79.86,
        "dice_sd": 2.58,
        "iou": 71.56,
        "iou_sd": 2.43,
        "source": "tang2024",
    },
]

PUBLISHED_SOURCES: dict[str, dict[str, Any]] = {
    "tang2024": {
        "citation": (
            "Tang F, Ding J, Wang L, Ning C, Zhou SK. CMUNeXt: An efficient medical image "
            "segmentation network based on large kernel and skip fusion. ISBI 2024 "
            "(arXiv:2308.01239); results table 'Results on BUSI' of the authors' benchmark "
            "repository github.com/FengheTan9/Medical-Image-Segmentation-Benchmarks "
            "(README, commit 0f69025e), all models re-trained there by the same authors"
        ),
        "short": "Tang et al. 2024 (CMUNeXt benchmark)",
        "duplicate_aware": False,
        "normal_included": False,
        "protocol_short": "random image-level 70/30 split, x3; best epoch picked on the "
        "reported split; batch-pooled pixels",
        "protocol": (
            "benign + malignant only (647 images, normal excluded); random image-level "
            "70/30 split with sklearn train_test_split (split.py), repeated three times, "
            "mean ± sd over the three; images resized to 256x256; no separate test set: the "
            "epoch with the best IoU on the 30 % split is kept and its figures on that same "
            "split are reported; 'F1-value' (= Dice) and IoU are computed over the pixels of "
            "each validation batch and averaged over batches (src/utils/metrics.py), not per "
            "image"
        ),
    },
}

LEAK_NOTE = (
    "**Not directly comparable.** BUSI holds many near-identical frames of one lesion, some "
    "filed under two classes (Pawlowska, Karwat & Zolek, Data in Brief 48, 2023, 109247). A "
    "random image-level split puts near-copies of test images into training, which inflates "
    "test figures; the published protocol also picks its best epoch on the images it reports "
    "on, drops the normal images, and pools pixels over batches instead of averaging per "
    "image. Our split (training/splits/busi.csv) keeps each near-duplicate group on one side, "
    "includes normal images, never tunes on the test split, and averages per image."
)


# --------------------------------------------------------------------------- evaluation


def _first_per_label(records: list, limit: int | None) -> list:
    """The first ``limit`` records of each label, in order (all of them when None)."""
    if limit is None:
        return list(records)
    per: dict[str, int] = {}
    kept = []
    for r in records:
        if per.get(r.label, 0) < limit:
            kept.append(r)
            per[r.label] = per.get(r.label, 0) + 1
    return kept


def _select_busi(busi_root: Path, split_csv: Path, split: str, limit: int | None):
    from busseg.data import discover_busi
    from busseg.data.splits import read_split_csv, select_split

    index = discover_busi(busi_root)
    rows = read_split_csv(split_csv)
    records = select_split(index, rows, split)
    records = _first_per_label(records, limit)
    return records


def evaluate(
    items: Sequence[dict],
    predict: Callable[[np.ndarray], Any],
    *,
    quiet: bool = False,
    what: str = "",
    threshold: float | None = None,
) -> list[dict]:
    """Per-image metrics of ``predict`` on ``items``.

    Parameters
    ----------
    items : sequence of dict
        Each with ``name``, ``image_path``, ``mask_paths`` and any grouping keys (kept).
    predict : callable
        (H, W) uint8 image -> (H, W) bool mask, or a :class:`busseg.inference.Prediction`
        (then its class probabilities and gate are recorded too).
    threshold : float, optional
        The probability threshold of ``predict``: with a Prediction, the ungated mask of a
        gated image is ``proba >= threshold`` (no post-processing in this benchmark).

    Returns
    -------
    list of dict
        The item's keys (paths as str) plus :func:`busseg.metrics.segmentation_metrics`
        and ``seconds`` (prediction time); for a Prediction also ``gated``,
        ``dice_ungated``, ``any_pred_ungated`` (the thresholded mask, gate and region filter
        off), ``regions_removed``, ``dice_nofilter``, ``any_pred_nofilter`` (gate on, region
        filter off), ``filter_emptied`` (the filter emptied a non-empty mask) and, with a
        class head, ``p_normal``, ``p_benign``, ``p_malignant``.
    """
    from busseg.data import read_image, read_mask
    from busseg.metrics import segmentation_metrics

    rows = []
    t0 = time.perf_counter()
    for i, item in enumerate(items):
        image = read_image(item["image_path"])
        truth = read_mask(item["mask_paths"])
        t = time.perf_counter()
        res = predict(image)
        dt = time.perf_counter() - t
        pred = getattr(res, "mask", res)
        row = {
            k: (str(v) if isinstance(v, Path) else v)
            for k, v in item.items()
            if k not in ("image_path", "mask_paths")
        }
        row.update(segmentation_metrics(pred, truth))
        row["seconds"] = dt
        if pred is not res:  # a Prediction: class probabilities and the gate
            row["gated"] = bool(res.gated)
            removed = int(getattr(res, "regions_removed", 0))
            row["regions_removed"] = removed
            row["dice_ungated"], row["any_pred_ungated"] = row["dice"], row["any_pred"]
            row["dice_nofilter"], row["any_pred_nofilter"] = row["dice"], row["any_pred"]
            row["filter_emptied"] = False
            if res.gated or removed:
                if threshold is None:
                    raise ValueError("evaluate() needs the threshold to score ungated masks")
                raw = res.proba >= threshold
                um = segmentation_metrics(raw, truth)
                row["dice_ungated"], row["any_pred_ungated"] = um["dice"], um["any_pred"]
                if removed:  # not gated: the mask before the filter is the thresholded one
                    row["dice_nofilter"], row["any_pred_nofilter"] = um["dice"], um["any_pred"]
                    row["filter_emptied"] = not pred.any()
            if res.class_proba is not None:
                for k in ("normal", "benign", "malignant"):
                    row[f"p_{k}"] = float(res.class_proba.get(k, math.nan))
        rows.append(row)
        if not quiet and ((i + 1) % 20 == 0 or i + 1 == len(items)):
            C.log(f"  {what} {i + 1}/{len(items)} ({time.perf_counter() - t0:.0f} s)")
    return rows


def _stats_cell(stats: dict | None, digits: int) -> str:
    if stats is None or stats.get("n", 0) == 0 or math.isnan(stats["mean"]):
        return "–"
    cell = (
        f"{stats['mean']:.{digits}f} [{C.fmt(stats.get('ci_low'), digits)}, "
        f"{C.fmt(stats.get('ci_high'), digits)}]"
    )
    if stats.get("n_nan"):
        cell += f" ({stats['n_nan']} undefined)"
    return cell


def summary_table(
    summary: dict, groups: Sequence[str], *, label_title: str = "Group", fp_ci: dict | None = None
) -> str:
    """Markdown table of mean [95 % CI] per group; FP rate column where defined."""
    header = [label_title, "n"] + [_TITLES[m] for m in METRICS]
    show_fp = any(summary[g]["n_empty_truth"] for g in groups if g in summary)
    if show_fp:
        header.append("FP rate (images)")
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|",
    ]
    for g in groups:
        if g not in summary:
            continue
        s = summary[g]
        all_empty = s["n_empty_truth"] == s["n"]
        cells = [g, str(s["n"])]
        for m in METRICS:
            if all_empty and m in ("recall", "hd95"):
                cells.append("–")  # undefined without a lesion
                continue
            cells.append(_stats_cell(s["metrics"].get(m), 1 if m == "hd95" else 3))
        if show_fp:
            if s["n_empty_truth"]:
                ci = (fp_ci or {}).get(g)
                ci_txt = f" [{C.fmt(ci[0])}, {C.fmt(ci[1])}]" if ci else ""
                cells.append(f"{s['fp_rate']:.3f}{ci_txt} ({s['n_fp']}/{s['n_empty_truth']})")
            else:
                cells.append("–")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def published_table(ours: dict | None) -> str:
    """Markdown table: published BUSI figures beside ours, with each source's protocol."""
    lines = [
        "| Model | Params (M) | Dice (%) | IoU (%) | Source | Duplicate-aware split | "
        "Normal images | Protocol |",
        "|---|---:|---:|---:|---|---|---|---|",
    ]
    if ours is not None:
        lines.append(
            f"| **ours** ({ours['arch']}) | {ours['params_m']:.2f} | "
            f"{100 * ours['dice']:.2f} [{100 * ours['dice_ci'][0]:.1f}, "
            f"{100 * ours['dice_ci'][1]:.1f}] | {100 * ours['iou']:.2f} "
            f"[{100 * ours['iou_ci'][0]:.1f}, {100 * ours['iou_ci'][1]:.1f}] | this run | yes "
            f"| {'excluded from this row' if ours['normal_excluded'] else 'included'} | "
            f"{ours['protocol']} |"
        )
    for p in PUBLISHED:
        src = PUBLISHED_SOURCES[p["source"]]
        proto = src["protocol_short"]
        lines.append(
            f"| {p['model']} | {p['params_m']:.2f} | {p['dice']:.2f} ± {p['dice_sd']:.2f} | "
            f"{p['iou']:.2f} ± {p['iou_sd']:.2f} | {src['short']} | "
            f"{'yes' if src['duplicate_aware'] else 'no'} | "
            f"{'included' if src['normal_included'] else 'excluded'} | {proto} |"
        )
    return "\n".join(lines) + "\n"


def _fp_ci(rows: Sequence[dict], key: str, groups: Sequence[str], n_boot: int) -> dict:
    from busseg.metrics import bootstrap_ci

    out = {}
    for g in groups:
        vals = [
            float(r["any_pred"])
            for r in rows
            if r["true_area"] == 0 and (g == "all" or r.get(key) == g)
        ]
        if vals:
            out[g] = bootstrap_ci(vals, n_boot=n_boot, seed=0)
    return out


def make_figure(busi_rows: list[dict], busbra_rows: list[dict], busi_summary: dict | None,
                calibration: dict | None = None, *, busuclm_rows: Sequence[dict] = (),
                busuclm: dict | None = None):
    """Dice and HD95 box plots; with ``calibration`` ({name: reliability curve}) a third
    panel with the reliability diagrams of P(lesion) = 1 - P(normal). BUS-UCLM lesion
    scans (all, and those without caliper marks) get their own boxes."""
    uclm_lesion = [r for r in busuclm_rows if r["true_area"] > 0]
    fig, axes = C.new_figure(1, 3 if calibration else 2, size=(6.5, 4.2))
    # per-image Dice, lesion images only (normal images are scored by the FP rate)
    groups, data = [], []
    for lab in ("benign", "malignant"):
        vals = [r["dice"] for r in busi_rows if r["label"] == lab]
        if vals:
            groups.append(f"BUSI\n{lab}")
            data.append(vals)
    if busbra_rows:
        groups.append("BUS-BRA\nall")
        data.append([r["dice"] for r in busbra_rows])
        for dev in sorted({r["device"] for r in busbra_rows}):
            vals = [r["dice"] for r in busbra_rows if r["device"] == dev]
            groups.append(
                "BUS-BRA\n" + dev.split("@")[0].strip().replace(" ", "\n", 1) + f"\n(n={len(vals)})"
            )
            data.append(vals)
    if uclm_lesion:
        groups.append(f"BUS-UCLM\nlesion\n(n={len(uclm_lesion)})")
        data.append([r["dice"] for r in uclm_lesion])
        vals = [r["dice"] for r in uclm_lesion if r.get("marks") is False]
        if vals:
            groups.append(f"BUS-UCLM\nno marks\n(n={len(vals)})")
            data.append(vals)
    ax = axes[0][0]
    if data:
        ax.boxplot(data, showmeans=True)
        ax.set_xticks(range(1, len(groups) + 1), groups, fontsize=7)
    ax.set_ylabel("Dice per image")
    ax.set_ylim(-0.02, 1.02)
    title = "Dice on images with a lesion"
    if busi_summary and busi_summary.get("normal"):
        title += f"\nBUSI normal: FP rate {busi_summary['normal']['fp_rate']:.2f}"
    if busuclm and busuclm["fp_rate_normal"]["gate_on"]["n"]:
        title += f"; BUS-UCLM normal: {busuclm['fp_rate_normal']['gate_on']['mean']:.2f}"
    ax.set_title(title, fontsize=9)
    ax = axes[0][1]
    hd, hd_groups = [], []
    for name, rows in (
        ("BUSI lesion", [r for r in busi_rows if r["label"] != "normal"]),
        ("BUS-BRA", busbra_rows),
        ("BUS-UCLM", uclm_lesion),
    ):
        vals = [r["hd95"] for r in rows if r["hd95"] is not None and math.isfinite(r["hd95"])]
        if vals:
            hd.append(vals)
            hd_groups.append(name)
    if hd:
        ax.boxplot(hd, showmeans=True)
        ax.set_xticks(range(1, len(hd_groups) + 1), hd_groups, fontsize=8)
        ax.set_yscale("log")
    ax.set_ylabel("HD95 (pixels, log scale)")
    ax.set_title("HD95 where both masks are non-empty", fontsize=9)
    if calibration:
        ax = axes[0][2]
        for k, (name, curve) in enumerate(calibration.items()):
            if k == 0:
                C.plot_reliability(ax, curve, name)
            else:  # further curves without a second count histogram
                filled = np.asarray(curve["count"]) > 0
                ax.plot(np.asarray(curve["predicted"])[filled],
                        np.asarray(curve["observed"])[filled], "-s", ms=3,
                        label=f"{name}: ECE {C.fmt(curve['ece'])}, N={curve['n']}")
                ax.legend(fontsize=7, loc="upper left")
        ax.set_title("Reliability of P(lesion) = 1 - P(normal)", fontsize=9)
    fig.tight_layout()
    return fig


def _head_results(rows: list[dict], head: bool, stored_gate, n_boot: int):
    """(gate summary, class-head summary) of per-image rows, or (None, None) without a head."""
    if not head:
        return None, None
    from busseg.metrics import class_head_summary, gate_summary

    probas = [{k: r[f"p_{k}"] for k in ("normal", "benign", "malignant")} if "p_normal" in r
              else None for r in rows]
    return (gate_summary(rows, stored_gate, on=bool(stored_gate)),
            class_head_summary([r["label"] for r in rows], probas, n_boot=n_boot, seed=0))


def _auc_cell(entry: dict | None) -> str:
    if not entry or not math.isfinite(entry["auc"]):
        return "–"
    return (f"{entry['auc']:.3f} [{entry['ci_low']:.3f}, {entry['ci_high']:.3f}] "
            f"({entry['n_pos']} / {entry['n_neg']})")


def head_markdown(busi_gate, busi_head, busbra_gate, busbra_head, stored_gate,
                  n_boot: int) -> str:
    """The normal-scan gate and class-head section (gate on / off; AUCs; calibration)."""
    cols = [("BUSI", busi_gate)] + ([("BUS-BRA", busbra_gate)] if busbra_gate else [])
    on = bool(stored_gate)
    lines = [
        "## Normal-scan gate and class head (research output, not a diagnosis)", "",
        f"Gate stored in the checkpoint: {stored_gate or 'none (no gate)'}. The tables above "
        "use the shipped default settings" + (", gate on" if on else "") + ". Gate on and off "
        "come from the same forward pass.", "",
        "| | " + " | ".join(f"{n} gate on | {n} gate off" for n, _ in cols) + " |",
        "|---|" + "---:|---:|" * len(cols),
    ]

    def cells(fn):
        return " | ".join(fn(g) for _, g in cols)

    def pair(g, key, digits=3):
        return f"{C.fmt(g[key], digits) if on else '–'} | {C.fmt(g[key + '_ungated'], digits)}"

    lines.append("| FP rate, images without a lesion | " + cells(
        lambda g: pair(g, "fp_rate_normal") if g["n_normal"] else "– | –") + " |")
    lines.append("| mean Dice, images with a lesion | " + cells(
        lambda g: pair(g, "lesion_dice")) + " |")
    lines.append("| lesion images the gate empties | " + cells(
        lambda g: (f"{g['n_lesion_gated']}/{g['n_lesion']} "
                   f"({C.fmt(100 * g['share_lesion_gated'], 1)} %)" if on else "–") + " | –")
                 + " |")
    lines.append("| median P(normal), images with a lesion | " + cells(
        lambda g: f"{C.fmt(g['median_p_normal_lesion'])} | (same pass)") + " |")
    lines += [
        "", f"AUC with a 95 % stratified bootstrap interval ({n_boot} resamples); (positives "
        "/ negatives).", "",
        "| AUC | BUSI | BUS-BRA |", "|---|---|---|",
        "| malignant vs benign (lesion images; P(malignant) / (P(benign) + P(malignant))) | "
        f"{_auc_cell((busi_head or {}).get('auc_malignant_vs_benign'))} | "
        f"{_auc_cell((busbra_head or {}).get('auc_malignant_vs_benign'))} |",
        "| lesion vs normal (1 - P(normal)) | "
        f"{_auc_cell((busi_head or {}).get('auc_lesion_vs_normal'))} | – (no normal images) |",
        "",
    ]
    for name, h in (("BUSI", busi_head), ("BUS-BRA", busbra_head)):
        if h:
            cal = h["calibration"]
            lines.append(f"- {name}: expected calibration error of P(lesion) = 1 - P(normal) "
                         f"{C.fmt(cal['ece'])} over {cal['n']} images (10 bins; reliability "
                         "diagram in accuracy.png)"
                         + ("; every image has a lesion, so this measures how far P(lesion) "
                            "falls short of 1" if name == "BUS-BRA" else "") + ".")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- BUS-UCLM

#: Targets on the headline numbers: (key, description, ">=" or "<=", limit).
TARGETS: list[tuple[str, str, str, float]] = [
    ("busi_lesion_dice", "BUSI test lesion Dice", ">=", 0.72),
    ("busi_fp_normal", "BUSI test normal scans with any predicted lesion", "<=", 0.15),
    ("uclm_fp_normal", "BUS-UCLM test patients: normal scans with any predicted lesion", "<=",
     0.10),
    ("uclm_lesion_dice", "BUS-UCLM test patients: lesion Dice", ">=", 0.78),
    ("busbra_lesion_dice", "BUS-BRA fold 1 zero-shot lesion Dice (never below 0.77)", ">=",
     0.78),
    ("busi_auc_lesion_normal", "AUC lesion vs normal, BUSI test", ">=", 0.97),
    ("uclm_auc_lesion_normal", "AUC lesion vs normal, BUS-UCLM test patients", ">=", 0.97),
]


#: Targets for the region filter: ((dataset, "fp" | "emptied"), title, op, limit).
FILTER_TARGETS = [
    (("BUS-UCLM test", "fp"), "BUS-UCLM test normal scans with a false region", "<=", 0.25),
    (("BUSI test", "fp"), "BUSI test normal scans with a false region", "<=", 0.35),
    (("BUS-BRA fold 1", "emptied"), "BUS-BRA fold 1 lesion masks the filter empties (share)",
     "<=", 0.03),
]


def _yes_no(value: str | None) -> bool | None:
    v = (value or "").strip().lower()
    if v in ("yes", "y", "1", "true"):
        return True
    if v in ("no", "n", "0", "false"):
        return False
    return None


def read_info_flags(root: str | Path) -> dict[str, dict[str, bool | None]]:
    """Per-scan yes/no flags of a BUS-UCLM ``INFO.csv`` beside ``images/`` and ``masks/``.

    Parameters
    ----------
    root : path
        The dataset folder (e.g. ``../shared/data/busuclm-dev``); ``INFO.csv`` is
        ``;``-separated with columns ``Image;Resolution;Label;Doppler;Marks;Combined``
        (Vallez et al., Scientific Data 12, 2025).

    Returns
    -------
    dict
        ``{image stem: {"marks": bool or None, "doppler": ..., "combined": ...}}``; None
        where the cell is neither yes nor no; ``{}`` without an ``INFO.csv``. The scans
        themselves come from :func:`busseg.data.discover`; this only adds the flags.
    """
    root = Path(root)
    table = next((root / n for n in ("INFO.csv", "info.csv") if (root / n).is_file()), None)
    if table is None:
        return {}
    text = table.read_text(encoding="utf-8-sig")
    head = text.splitlines()[:1]
    delim = ";" if head and head[0].count(";") > head[0].count(",") else ","
    out: dict[str, dict[str, bool | None]] = {}
    for raw in csv.DictReader(io.StringIO(text), delimiter=delim):
        row = {(k or "").strip(): (v or "").strip() for k, v in raw.items() if k}
        name = row.get("Image")
        if name:
            out[Path(name).stem] = {k.lower(): _yes_no(row.get(k))
                                    for k in ("Marks", "Doppler", "Combined")}
    return out


def busuclm_items(root: Path, split_csv: Path, split: str, limit: int | None
                  ) -> tuple[list[dict], list[dict]]:
    """Items of one split of BUS-UCLM for :func:`evaluate`, and the scans that were skipped.

    Returns
    -------
    items : list of dict
        ``dataset``, ``name``, ``label``, ``patient`` (the file prefix), ``marks`` and
        ``doppler`` (bool or None, from ``INFO.csv``), ``image_path``, ``mask_paths``; at
        most ``limit`` per label when given.
    skipped : list of dict
        ``{"image", "label", "problems"}`` of the split's scans that cannot be scored
        (:func:`_common.split_records`).
    """
    records, skipped = C.split_records(root, split_csv, split)
    flags = read_info_flags(root)
    records = _first_per_label(records, limit)
    items = []
    for r in records:
        f = flags.get(r.name, {})
        items.append({
            "dataset": "BUS-UCLM",
            "name": r.name,
            "label": r.label,
            "patient": r.group,
            "marks": f.get("marks"),
            "doppler": f.get("doppler"),
            "image_path": r.image_path,
            "mask_paths": list(r.mask_paths),
        })
    return items, skipped


def _reason(problem: str) -> str:
    """The kind of a discovery problem: ``"size mismatch: a is ..."`` -> ``"size mismatch"``."""
    return problem.split(":", 1)[0].strip() or problem


def _mean_ci(values: Sequence[float], n_boot: int) -> dict:
    from busseg.metrics import bootstrap_ci

    vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    lo, hi = bootstrap_ci(vals, n_boot=n_boot, seed=0) if vals else (math.nan, math.nan)
    return {"n": len(vals), "mean": float(np.mean(vals)) if vals else math.nan,
            "ci_low": lo, "ci_high": hi, "sum": float(np.sum(vals)) if vals else 0.0}


def busuclm_results(rows: list[dict], skipped: list[dict], head: bool, stored_gate,
                    n_boot: int) -> dict:
    """Summary of the BUS-UCLM rows: lesion Dice (all, without / with caliper marks) and
    the FP rate on normal scans, each with the gate on and off, with 95 % bootstrap CIs;
    per-class table; class-head AUCs; the skipped scans by reason."""
    from busseg.metrics import summarize

    lesion = [r for r in rows if r["true_area"] > 0]
    normal = [r for r in rows if r["true_area"] == 0]
    ungated = bool(rows) and "dice_ungated" in rows[0]
    d_off, a_off = ("dice_ungated", "any_pred_ungated") if ungated else ("dice", "any_pred")

    def both(rs, on_key, off_key):
        return {"gate_on": _mean_ci([r[on_key] for r in rs], n_boot),
                "gate_off": _mean_ci([r[off_key] for r in rs], n_boot)}

    no_marks = [r for r in lesion if r.get("marks") is False]
    marks = [r for r in lesion if r.get("marks") is True]
    gate, class_head = _head_results(rows, head, stored_gate, n_boot)
    return {
        "n": len(rows),
        "n_lesion": len(lesion),
        "n_normal": len(normal),
        "patients": sorted({str(r.get("patient")) for r in rows}),
        "n_lesion_marks_unknown": len(lesion) - len(no_marks) - len(marks),
        "n_normal_with_marks": sum(r.get("marks") is True for r in normal),
        "lesion_dice": both(lesion, "dice", d_off),
        "lesion_dice_no_marks": both(no_marks, "dice", d_off),
        "lesion_dice_marks": both(marks, "dice", d_off),
        "fp_rate_normal": both(normal, "any_pred", a_off),
        "summary": summarize(rows, by="label", metrics=METRICS, ci=0.95, n_boot=n_boot,
                             seed=0) if rows else {},
        "gate": gate,
        "class_head": class_head,
        "skipped": skipped,
        "skipped_by_reason": dict(Counter(_reason(p) for s in skipped
                                          for p in (s["problems"][:1] or ["unknown"]))),
    }


def _ci_cell(st: dict, digits: int = 3, count: bool = False) -> str:
    if not st or st["n"] == 0 or not math.isfinite(st["mean"]):
        return "–"
    cell = (f"{st['mean']:.{digits}f} [{C.fmt(st['ci_low'], digits)}, "
            f"{C.fmt(st['ci_high'], digits)}]")
    if count:
        cell += f" ({int(round(st['sum']))}/{st['n']})"
    return cell


def busuclm_markdown(res: dict, split_name: str, gate_on: bool, n_boot: int) -> str:
    """The BUS-UCLM section of accuracy.md."""
    on = "gate on (default)" if gate_on else "default (no gate stored)"
    lines = [
        f"## BUS-UCLM {split_name} patients (third hospital, Siemens scanner; never used for "
        "training or tuning)", "",
        f"busuclm-dev, patients {', '.join(res['patients']) or '–'} of the committed patient "
        f"split (training/splits/busuclm.csv): {res['n_lesion']} lesion and {res['n_normal']} "
        "normal scans scored. Caliper marks from INFO.csv `Marks` (the sonographer's crosses "
        "burnt into the image); 'without marks' is the honest lesion figure for a model that "
        f"may have learnt crosses = lesion ({res['n_normal_with_marks']} of the normal scans "
        "carry marks). Mean [95 % bootstrap CI, "
        f"{n_boot} resamples]; FP rate = share of normal scans with any predicted pixel "
        "(count). Gate on and off come from the same forward pass.", "",
        f"| BUS-UCLM {split_name} | n | {on} | gate off |",
        "|---|---:|---:|---:|",
    ]
    for key, title in (("lesion_dice", "lesion Dice, all lesion scans"),
                       ("lesion_dice_no_marks", "lesion Dice, scans without caliper marks"),
                       ("lesion_dice_marks", "lesion Dice, scans with caliper marks")):
        st = res[key]
        lines.append(f"| {title} | {st['gate_on']['n']} | {_ci_cell(st['gate_on'])} | "
                     f"{_ci_cell(st['gate_off']) if gate_on else '(same)'} |")
    fp = res["fp_rate_normal"]
    lines.append(f"| FP rate, normal scans | {fp['gate_on']['n']} | "
                 f"{_ci_cell(fp['gate_on'], count=True)} | "
                 f"{_ci_cell(fp['gate_off'], count=True) if gate_on else '(same)'} |")
    g = res.get("gate")
    if g:
        lines.append(f"| lesion masks the gate empties | {g['n_lesion']} | "
                     f"{g['n_lesion_gated']} ({C.fmt(100 * g['share_lesion_gated'], 1)} %) "
                     "| – |" if gate_on else f"| lesion masks the gate empties | "
                     f"{g['n_lesion']} | – | – |")
    h = res.get("class_head")
    lines.append("")
    if h:
        lines += [
            "Class head (research output, not a diagnosis): AUC lesion vs normal "
            f"(1 - P(normal)) {_auc_cell(h.get('auc_lesion_vs_normal'))}; malignant vs benign "
            f"{_auc_cell(h.get('auc_malignant_vs_benign'))}; expected calibration error of "
            f"P(lesion) {C.fmt(h['calibration']['ece'])} over {h['calibration']['n']} scans.",
            "",
        ]
    if res["skipped"]:
        reasons = "; ".join(f"{n} x {k}" for k, n in res["skipped_by_reason"].items())
        lines += [f"Skipped (not scored, reported): {len(res['skipped'])} scan(s) of these "
                  f"patients: {reasons}: "
                  + ", ".join(s["image"] for s in res["skipped"]) + ".", ""]
    else:
        lines += ["Skipped: none (every scan of these patients has an image and a mask of "
                  "the same size, as discovery reports).", ""]
    lines += ["Per class, default settings:", "",
              summary_table(res["summary"], ["benign", "malignant", "lesion", "normal"],
                            label_title="Class"), ""]
    return "\n".join(lines) + "\n"


def filter_results(rows: Sequence[dict], n_boot: int) -> dict | None:
    """Region filter on vs off on one dataset's rows (None without the per-row keys).

    Returns the normal-scan FP rate and the lesion Dice with the filter on (the default),
    off (gate still on) and with gate and filter off, with 95 % bootstrap CIs; the lesion
    masks the filter emptied (count and share of lesion scans) and the regions removed.
    """
    if not rows or "dice_nofilter" not in rows[0]:
        return None
    lesion = [r for r in rows if r["true_area"] > 0]
    normal = [r for r in rows if r["true_area"] == 0]

    def three(rs, on, off, raw):
        return {"filter_on": _mean_ci([r[on] for r in rs], n_boot) if rs else None,
                "filter_off": _mean_ci([r[off] for r in rs], n_boot) if rs else None,
                "gate_and_filter_off": _mean_ci([r[raw] for r in rs], n_boot) if rs else None}

    emptied = sum(bool(r["filter_emptied"]) for r in lesion)
    return {"n_lesion": len(lesion), "n_normal": len(normal),
            "fp_rate_normal": three(normal, "any_pred", "any_pred_nofilter",
                                    "any_pred_ungated"),
            "lesion_dice": three(lesion, "dice", "dice_nofilter", "dice_ungated"),
            "lesion_emptied": emptied,
            "lesion_emptied_share": emptied / len(lesion) if lesion else None,
            "regions_removed_lesion": sum(int(r["regions_removed"]) for r in lesion),
            "regions_removed_normal": sum(int(r["regions_removed"]) for r in normal)}


def filter_markdown(results: dict, spec: dict | None) -> str:
    """Markdown section: the region filter on vs off per dataset, against FILTER_TARGETS."""
    from busseg.region_filter import describe_filter

    lines = ["## Region filter on vs off (issue 18)", "",
             f"Filter: {describe_filter(spec)} (`inference.region_filter`, chosen on the "
             "validation patients by the simulated annotation cost, "
             "`training/fit_region_filter.py`). All three columns come from the same forward "
             "pass: filter on (the default, after the normal-scan gate), filter off (gate "
             "still on), gate and filter off (the thresholded mask). Mean [95 % bootstrap CI].",
             "", "| dataset | | filter on | filter off | gate and filter off |",
             "|---|---|---:|---:|---:|"]

    def cell(e, digits=3, count=False):
        return "–" if not e else _ci_cell(e, digits, count=count)

    for name, r in results.items():
        if r is None:
            continue
        if r["n_normal"]:
            fp = r["fp_rate_normal"]
            lines.append(f"| {name} | normal scans with a false region (n {r['n_normal']}) | "
                         f"{cell(fp['filter_on'], count=True)} | "
                         f"{cell(fp['filter_off'], count=True)} | "
                         f"{cell(fp['gate_and_filter_off'], count=True)} |")
        if r["n_lesion"]:
            d = r["lesion_dice"]
            lines.append(f"| {name} | lesion Dice (n {r['n_lesion']}) | "
                         f"{cell(d['filter_on'])} | {cell(d['filter_off'])} | "
                         f"{cell(d['gate_and_filter_off'])} |")
            lines.append(f"| {name} | lesion masks the filter empties | "
                         f"{r['lesion_emptied']} ({100 * r['lesion_emptied_share']:.1f} %) | – "
                         "| – |")
    lines += ["", "| target (issue 18) | measured | target | met |", "|---|---:|---:|---|"]
    for key, title, op, limit in FILTER_TARGETS:
        name, what = key
        r = results.get(name)
        if r is None:
            lines.append(f"| {title} | – | {op} {limit} | not measured |")
            continue
        v = (r["fp_rate_normal"]["filter_on"] or {}).get("mean") if what == "fp" else \
            r["lesion_emptied_share"]
        if v is None:
            lines.append(f"| {title} | – | {op} {limit} | not measured |")
            continue
        lines.append(f"| {title} | {v:.3f} | {op} {limit} | "
                     f"{'yes' if v <= limit else '**no**'} |")
    return "\n".join(lines) + "\n"


def headline(busi_summary: dict | None, busi_head: dict | None, busbra_summary: dict | None,
             busbra_gate: dict | None, uclm: dict | None) -> dict:
    """The headline numbers (default settings) that :data:`TARGETS` refers to."""
    def mean(summary, group):
        try:
            return summary[group]["metrics"]["dice"]["mean"]
        except (KeyError, TypeError):
            return None

    def auc(h):
        e = (h or {}).get("auc_lesion_vs_normal")
        return e["auc"] if e and e.get("auc") is not None and math.isfinite(e["auc"]) else None

    out = {
        "busi_lesion_dice": mean(busi_summary, "lesion"),
        "busi_fp_normal": (busi_summary or {}).get("normal", {}).get("fp_rate"),
        "busbra_lesion_dice": mean(busbra_summary, "all"),
        "busi_auc_lesion_normal": auc(busi_head),
        "busbra_gate_emptied": (busbra_gate or {}).get("n_lesion_gated"),
        "busbra_gate_emptied_share": (busbra_gate or {}).get("share_lesion_gated"),
    }
    if uclm:
        out.update({
            "uclm_lesion_dice": uclm["lesion_dice"]["gate_on"]["mean"],
            "uclm_lesion_dice_no_marks": uclm["lesion_dice_no_marks"]["gate_on"]["mean"],
            "uclm_fp_normal": uclm["fp_rate_normal"]["gate_on"]["mean"],
            "uclm_auc_lesion_normal": auc(uclm.get("class_head")),
        })
    return out


def targets_markdown(values: dict) -> str:
    """Headline numbers against TARGETS (default settings)."""
    lines = ["## Summary against the targets of issue 13 (default settings)", "",
             "| | measured | target | met |", "|---|---:|---:|---|"]
    for key, title, op, limit in TARGETS:
        v = values.get(key)
        if v is None or (isinstance(v, float) and not math.isfinite(v)):
            lines.append(f"| {title} | – | {op} {limit:.2f} | not measured |")
            continue
        met = v >= limit if op == ">=" else v <= limit
        if key == "busbra_lesion_dice" and not met and v >= 0.77:
            verdict = "**no** (above the 0.77 floor)"
        else:
            verdict = "yes" if met else "**no**"
        lines.append(f"| {title} | {v:.3f} | {op} {limit:.2f} | {verdict} |")
    if values.get("uclm_lesion_dice_no_marks") is not None:
        lines.append(f"| BUS-UCLM test lesion Dice, scans without caliper marks | "
                     f"{C.fmt(values['uclm_lesion_dice_no_marks'])} | (reported) | – |")
    if values.get("busbra_gate_emptied") is not None:
        lines.append(f"| BUS-BRA fold 1 lesion masks the normal-scan gate empties | "
                     f"{values['busbra_gate_emptied']} "
                     f"({C.fmt(100 * values['busbra_gate_emptied_share'], 1)} %) | "
                     "(reported; must not empty real lesions) | – |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = C.argument_parser(__doc__)
    p.add_argument(
        "--busi",
        default=str(C.DEFAULT_BUSI),
        help="BUSI Dataset_BUSI_with_GT folder (default ../shared/data/busi/...)",
    )
    p.add_argument(
        "--split", default=str(C.DEFAULT_SPLIT), help="split CSV (default training/splits/busi.csv)"
    )
    p.add_argument("--split-name", default="test", help="split to score (default test)")
    p.add_argument(
        "--busbra",
        default=str(C.DEFAULT_BUSBRA),
        help="BUS-BRA folder (default ../shared/data/busbra-fold1)",
    )
    p.add_argument("--no-busbra", action="store_true", help="skip the BUS-BRA evaluation")
    p.add_argument(
        "--busuclm",
        default=str(C.DEFAULT_BUSUCLM),
        help="BUS-UCLM folder (default ../shared/data/busuclm-dev; skipped with a note when "
        "the default is absent)",
    )
    p.add_argument(
        "--busuclm-split",
        default=str(C.DEFAULT_BUSUCLM_SPLIT),
        help="BUS-UCLM patient split CSV (default training/splits/busuclm.csv); its "
        "--split-name patients are scored",
    )
    p.add_argument("--no-busuclm", action="store_true", help="skip the BUS-UCLM evaluation")
    p.add_argument(
        "--limit",
        type=int,
        default=None,
        help="at most N images per BUSI class, N BUS-BRA images and N BUS-UCLM images per "
        "class (quick checks)",
    )
    p.add_argument("--n-boot", type=int, default=2000, help="bootstrap resamples (default 2000)")
    p.add_argument(
        "--tta",
        choices=("auto", "on", "off"),
        default="auto",
        help="flip test-time augmentation (auto: as the checkpoint says)",
    )
    p.add_argument(
        "--quick", action="store_true", help="smoke run: --limit 3 --n-boot 200 unless given"
    )
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    C.add_common_args(p)
    args = p.parse_args(argv)
    if args.quick:
        args.limit = 3 if args.limit is None else args.limit
        args.n_boot = 200 if args.n_boot == 2000 else args.n_boot
    return args


def _run_busbra(args, predict, threshold: float, head: bool, stored_gate):
    """Score BUS-BRA fold 1 (zero-shot) unless --no-busbra.

    Returns ``(rows, summary, root, gate, class_head, devices)``: per-image rows, the summary
    by scanner and pathology, the folder, the gate and class-head results, the scanners.
    """
    from busseg.metrics import summarize

    busbra_rows: list[dict] = []
    busbra_summary = busbra_path = busbra_gate = busbra_head = None
    devices: list[str] = []
    if args.no_busbra:
        return busbra_rows, busbra_summary, busbra_path, busbra_gate, busbra_head, devices
    busbra_path = C.require_dir(args.busbra, "BUS-BRA", "--busbra (or give --no-busbra)")
    recs = C.read_busbra(busbra_path)
    if args.limit is not None:
        recs = recs[: args.limit]
    items = [
        {
            "dataset": "BUS-BRA",
            "name": r.id,
            "label": r.pathology,
            "device": r.device,
            "case": r.case,
            "image_path": r.image_path,
            "mask_paths": [r.mask_path],
        }
        for r in recs
    ]
    C.log(f"BUS-BRA: {len(items)} images", args.quiet)
    busbra_rows = evaluate(items, predict, quiet=args.quiet, what="BUS-BRA",
                           threshold=threshold)
    busbra_gate, busbra_head = _head_results(busbra_rows, head, stored_gate, args.n_boot)
    busbra_summary = summarize(
        busbra_rows, by="device", metrics=METRICS, ci=0.95, n_boot=args.n_boot, seed=0
    )
    busbra_by_label = summarize(
        busbra_rows, by="label", metrics=METRICS, ci=0.95, n_boot=args.n_boot, seed=0
    )
    devices = sorted({r["device"] for r in busbra_rows})
    for g in ("benign", "malignant"):
        if g in busbra_by_label:
            busbra_summary[f"pathology: {g}"] = busbra_by_label[g]
    return busbra_rows, busbra_summary, busbra_path, busbra_gate, busbra_head, devices


def _run_busuclm(args, predict, threshold: float, head: bool, stored_gate):
    """Score the BUS-UCLM split's patients unless --no-busuclm (or the default folder is absent).

    Returns ``(rows, results)``; ``results`` (of :func:`busuclm_results`, with the folder,
    split file and split) is None when the section is skipped.
    """
    busuclm_rows: list[dict] = []
    busuclm = None
    if not args.no_busuclm:
        root = Path(args.busuclm).expanduser()
        if not root.is_dir() and Path(args.busuclm) == Path(str(C.DEFAULT_BUSUCLM)):
            C.log(f"BUS-UCLM not found at {root}: section skipped (pass --busuclm)", args.quiet)
        else:
            busuclm_path = C.require_dir(root, "BUS-UCLM", "--busuclm (or give --no-busuclm)")
            items, skipped = busuclm_items(busuclm_path, Path(args.busuclm_split),
                                           args.split_name, args.limit)
            C.log(f"BUS-UCLM {args.split_name}: {len(items)} images ({len(skipped)} skipped)",
                  args.quiet)
            busuclm_rows = evaluate(items, predict, quiet=args.quiet, what="BUS-UCLM",
                                    threshold=threshold)
            busuclm = busuclm_results(busuclm_rows, skipped, head, stored_gate, args.n_boot)
            busuclm.update({"root": str(busuclm_path),
                            "split_file": str(Path(args.busuclm_split).resolve()),
                            "split": args.split_name})
    return busuclm_rows, busuclm


def _our_row(ck: dict, n_params: int, lesion: dict | None, split_name: str) -> dict | None:
    """Our row of the published-results table: BUSI lesion Dice and IoU with CIs (or None)."""
    if lesion is None:
        return None
    enc = ck["model"].get("encoder", "plain")
    return {
        "arch": (f"U-Net base {ck['model'].get('base_channels')}, depth "
                 f"{ck['model'].get('depth')}" if enc == "plain" else f"U-Net, {enc} encoder")
        + f", {ck['input_size'][0]}x{ck['input_size'][1]}",
        "params_m": n_params / 1e6,
        "dice": lesion["metrics"]["dice"]["mean"],
        "dice_ci": (lesion["metrics"]["dice"]["ci_low"], lesion["metrics"]["dice"]["ci_high"]),
        "iou": lesion["metrics"]["iou"]["mean"],
        "iou_ci": (lesion["metrics"]["iou"]["ci_low"], lesion["metrics"]["iou"]["ci_high"]),
        "normal_excluded": True,
        "protocol": (
            f"duplicate-aware {split_name} split, lesion images "
            f"(n={lesion['n']}), per-image mean [95 % CI]; normal images: FP rate "
            "above"
        ),
    }


def _run_busi(args, busi_root: Path, split_csv: Path, predict, threshold: float, head: bool,
              stored_gate):
    """Score BUSI's --split-name split.

    Returns ``(rows, summary by label, FP-rate CIs, gate results, class-head results)``.
    """
    from busseg.metrics import summarize

    records = _select_busi(busi_root, split_csv, args.split_name, args.limit)
    items = [
        {
            "dataset": "BUSI",
            "name": r.name,
            "label": r.label,
            "image_path": r.image_path,
            "mask_paths": list(r.mask_paths),
        }
        for r in records
    ]
    C.log(f"BUSI {args.split_name}: {len(items)} images", args.quiet)
    busi_rows = evaluate(items, predict, quiet=args.quiet, what="BUSI", threshold=threshold)
    busi_summary = summarize(
        busi_rows, by="label", metrics=METRICS, ci=0.95, n_boot=args.n_boot, seed=0
    )
    busi_fp_ci = _fp_ci(busi_rows, "label", ["normal", "all"], args.n_boot)
    busi_gate, busi_head = _head_results(busi_rows, head, stored_gate, args.n_boot)
    return busi_rows, busi_summary, busi_fp_ci, busi_gate, busi_head


def _filter_sections(split_name: str, busi_rows: list, busuclm_rows: list, busbra_rows: list,
                     n_boot: int) -> dict:
    """The region filter on vs off (:func:`filter_results`) per dataset that was scored."""
    rfilter = {"BUSI test" if split_name == "test" else f"BUSI {split_name}":
               filter_results(busi_rows, n_boot)}
    if busuclm_rows:
        rfilter[f"BUS-UCLM {split_name}"] = filter_results(busuclm_rows, n_boot)
    if busbra_rows:
        rfilter["BUS-BRA fold 1"] = filter_results(busbra_rows, n_boot)
    return rfilter


def _published_markdown(ours: dict | None) -> list[str]:
    """Markdown lines: published U-Net-family results on BUSI beside ours, with their sources."""
    md = [
        "## Published U-Net-family results on BUSI",
        "",
        LEAK_NOTE,
        "",
        published_table(ours),
        "",
    ]
    for src in PUBLISHED_SOURCES.values():
        md += [f"- {src['short']}: {src['citation']}. Protocol: {src['protocol']}."]
    md += [
        "",
        "Dice (%) of published rows is their 'F1-value'; ± is the sd over their three "
        "random splits. Our row gives the mean and 95 % CI on one duplicate-aware split.",
        "",
    ]
    return md


def _busi_busbra_markdown(split_name: str, n_boot: int, busi_summary: dict, busi_fp_ci: dict,
                          busbra_summary: dict | None, devices: list[str]) -> list[str]:
    """Markdown lines: the BUSI split's table by class, then BUS-BRA's by scanner (if scored)."""
    busi_groups = ["benign", "malignant", "lesion", "normal"]
    md = [
        f"## BUSI {split_name} split (duplicate-aware, never used for training or tuning)",
        "",
        "Mean of per-image values with a 95 % percentile bootstrap CI "
        f"({n_boot} resamples). HD95 in pixels of the original image, over images where "
        "both masks are non-empty ('undefined' counts the other images). FP rate: share of "
        "images without a lesion (normal) that "
        "get any predicted pixel. For normal images Dice, IoU and precision are 1 for an "
        "empty prediction and 0 otherwise.",
        "",
        summary_table(busi_summary, busi_groups, label_title="Class", fp_ci=busi_fp_ci),
        "",
    ]
    if busbra_summary is not None:
        md += [
            "## BUS-BRA fold 1, zero-shot (other scanners and hospital, not seen in training)",
            "",
            "Every image has one lesion. Rows: all images, per scanner (Device column), per "
            "pathology.",
            "",
            summary_table(
                busbra_summary,
                ["all"] + devices + ["pathology: benign", "pathology: malignant"],
                label_title="Images",
            ),
            "",
        ]
    return md


def main(argv: Sequence[str] | None = None) -> dict:
    """Run the benchmark; return the JSON payload (also written to ``--out``)."""
    args = parse_args(argv)
    threads, ckpt = C.threads_and_checkpoint(args)
    busi_root = C.require_dir(args.busi, "BUSI", "--busi")
    split_csv = Path(args.split)
    if not split_csv.is_file():
        raise SystemExit(f"split file {split_csv} not found; pass --split")

    from busseg.inference import has_class_head, load_model
    from busseg.inference import predict as busseg_predict

    t_start = time.perf_counter()
    model = load_model(ckpt, device=args.device)
    device = next(model.parameters()).device
    tta = None if args.tta == "auto" else args.tta == "on"
    n_params = sum(p.numel() for p in model.parameters())

    head = has_class_head(model)
    threshold = float(model.busseg_config.get("inference", {}).get("threshold", 0.5))
    stored_gate = model.busseg_config.get("inference", {}).get("normal_gate") if head else None

    def predict(image):  # the shipped default settings, the normal-scan gate included
        return busseg_predict(image, model, tta=tta)

    ck = C.checkpoint_summary(ckpt)
    hw = C.hardware_info(device)
    C.log(f"threads {threads}; checkpoint {ckpt}", args.quiet)

    busi_rows, busi_summary, busi_fp_ci, busi_gate, busi_head = _run_busi(
        args, busi_root, split_csv, predict, threshold, head, stored_gate)

    (busbra_rows, busbra_summary, busbra_path, busbra_gate, busbra_head,
     devices) = _run_busbra(args, predict, threshold, head, stored_gate)

    busuclm_rows, busuclm = _run_busuclm(args, predict, threshold, head, stored_gate)

    rfilter = _filter_sections(args.split_name, busi_rows, busuclm_rows, busbra_rows,
                               args.n_boot)
    filter_spec = model.busseg_config.get("inference", {}).get("region_filter")
    seconds = time.perf_counter() - t_start
    lesion = busi_summary.get("lesion")
    ours = _our_row(ck, n_params, lesion, args.split_name)

    md = [
        f"# Accuracy: BUSI {args.split_name} split, BUS-BRA (zero-shot)"
        + (f" and BUS-UCLM {args.split_name} patients" if busuclm is not None else ""),
        "",
        C.hardware_markdown(hw),
        "",
        C.checkpoint_markdown(ck),
        f"TTA: {args.tta}. Wall time {seconds:.0f} s.",
        "",
    ]
    if args.limit is not None:
        md += [f"**Quick run: at most {args.limit} images per group; not a result.**", ""]
    values = headline(busi_summary, busi_head, busbra_summary, busbra_gate, busuclm)
    md += [targets_markdown(values), ""]
    if any(v is not None for v in rfilter.values()):
        md += [filter_markdown(rfilter, filter_spec), ""]
    md += _busi_busbra_markdown(args.split_name, args.n_boot, busi_summary, busi_fp_ci,
                                busbra_summary, devices)
    if busuclm is not None:
        md += [busuclm_markdown(busuclm, args.split_name, bool(stored_gate), args.n_boot), ""]
    if head:
        md += [head_markdown(busi_gate, busi_head, busbra_gate, busbra_head, stored_gate,
                             args.n_boot), ""]
    md += _published_markdown(ours)
    markdown = "\n".join(md)

    payload = {
        "benchmark": NAME,
        "hardware": hw,
        "checkpoint": ck,
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "seconds": seconds,
        "n_params": n_params,
        "busi": {
            "root": str(busi_root),
            "split_file": str(split_csv.resolve()),
            "split": args.split_name,
            "summary": busi_summary,
            "fp_rate_ci": busi_fp_ci,
            "gate": busi_gate,
            "class_head": busi_head,
        },
        "busbra": (
            {"root": str(busbra_path), "summary": busbra_summary, "gate": busbra_gate,
             "class_head": busbra_head}
            if busbra_summary is not None
            else None
        ),
        "busuclm": busuclm,
        "headline": values,
        "class_head": head,
        "normal_gate": stored_gate,
        "region_filter": {"spec": filter_spec, "results": rfilter},
        "published": {"rows": PUBLISHED, "sources": PUBLISHED_SOURCES, "note": LEAK_NOTE},
        "per_image": busi_rows + busbra_rows + busuclm_rows,
    }
    curves = {name: h["calibration"] for name, h in (
        ("BUSI", busi_head), ("BUS-BRA", busbra_head),
        ("BUS-UCLM", (busuclm or {}).get("class_head"))) if h}
    fig = make_figure(busi_rows, busbra_rows, busi_summary, curves, busuclm_rows=busuclm_rows,
                      busuclm=busuclm)
    paths = C.write_results(args.out, NAME, markdown, payload, fig)
    print(markdown)
    C.log(f"wrote {', '.join(str(p) for p in paths.values())}", args.quiet)
    return payload


if __name__ == "__main__":
    main()
