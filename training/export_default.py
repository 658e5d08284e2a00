"""Turn a training run into the shipped default model, with its model card.

    python training/export_default.py --run runs/default_160 \
        --dest src/busseg/weights/default --eval-out runs/default_160/eval_test

1. On the VALIDATION split only, compare test-time flips off/on (``--no-flips``: off only,
   for when the speed target does not allow two passes) and thresholds 0.3-0.7 at the
   original image size and keep the best setting by the metric the run selected its
   checkpoint on (``select_metric`` in its config: mean per-image Dice over all validation
   images, normal ones included, or over the images with a lesion); the test split plays no
   part in this choice.
2. For a model with a class head, choose the normal-scan gate on the VALIDATION split, at
   the chosen flips and threshold (see :func:`choose_gate`): the gate empties a mask when
   P(normal) >= ``p_normal`` and no pixel's lesion probability reaches
   ``lesion_confidence``. Candidates are every pair of ``GATE_P_NORMAL`` x
   ``GATE_LESION_CONFIDENCE`` (1.0 = the lesion probabilities never protect a mask) plus
   "no gate". **Rule:** among the candidates whose mean validation Dice on images with a
   lesion is at most ``MAX_DICE_DROP`` (0.005) below that without a gate, take the one with
   the lowest validation false-positive rate on normal images; ties go to the smaller Dice
   drop, then the higher ``p_normal``, then the lower ``lesion_confidence`` (the gate that
   empties the fewest masks). If no candidate lowers the FP rate, no gate is stored.
3. Write the checkpoint to ``--dest`` (atomic; never over an existing one without
   ``--overwrite``) with the chosen inference settings (``inference.threshold``,
   ``tta_flips``, ``normal_gate``) and float16 weights (``weights_dtype``; the file must
   stay under ``MAX_WEIGHTS_MB`` = 10 MB).
4. Run ``training/evaluate.py`` on the TEST split once (gate on) and write
   ``model_card.json`` and ``MODEL_CARD.md`` beside the weights (data, split,
   hyper-parameters, hardware, training time, what was tried, the gate candidates, test
   metrics with the gate on and off, class-head AUCs).
5. Then fit the region filter and re-choose the gate by annotation cost on the validation
   patients: ``python training/fit_region_filter.py --checkpoint DEST --write`` (adds
   ``inference.region_filter`` and a section of the model card; a fresh export has none).

The shipped files name no path of the machine that trained the model: every absolute path in
the config and the card (data roots, the ``--init`` checkpoint, paths inside the training
command) is written relative to this repository when it lies inside it
(``runs/v2_main/best``), else as its last two components (``busi/Dataset_BUSI_with_GT``); see
:func:`portable`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "src") not in sys.path:
    sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "training"))

THRESHOLDS = (0.3, 0.4, 0.5, 0.6, 0.7)
#: Candidate P(normal) thresholds of the normal-scan gate.
GATE_P_NORMAL = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)
#: Candidate lesion confidences: a mask with a pixel at or above it is never emptied
#: (1.0: the lesion probabilities never protect a mask).
GATE_LESION_CONFIDENCE = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0)
#: Largest allowed drop of the mean validation lesion Dice caused by the gate.
MAX_DICE_DROP = 0.005
#: The shipped weights file must stay under this size (megabytes, 10 ** 6 bytes).
MAX_WEIGHTS_MB = 10.0


def collect_validation(ckpt: Path, data, split_file, flips=(False, True)) -> dict:
    """One forward pass per validation image and flips setting: what tuning needs.

    ``data`` and ``split_file`` are a dataset folder and its split CSV, or equal-length
    lists of them (the validation images of all, e.g. BUSI and BUS-UCLM, are pooled).

    Returns
    -------
    dict
        ``labels`` (list of str), ``lesion`` (bool array, truth non-empty), and per flips
        setting ``views[tta]`` = {``dice``: {threshold: (N,) Dice}, ``any``: {threshold: (N,)
        bool, mask non-empty}, ``max_proba``: (N,) float, ``p_normal``: (N,) float or None}.
    """
    import numpy as np

    from busseg.data.discover import discover
    from busseg.data.io import read_image, read_mask
    from busseg.data.splits import read_split_csv, select_split
    from busseg.inference import load_model, predict
    from busseg.metrics import dice_score

    model = load_model(ckpt, device="cpu")
    datas = [data] if isinstance(data, (str, Path)) else list(data)
    splits = [split_file] if isinstance(split_file, (str, Path)) else list(split_file)
    if len(datas) != len(splits):
        raise SystemExit(f"{len(datas)} data folder(s) but {len(splits)} split file(s)")
    recs = [r for d, sf in zip(datas, splits, strict=True)
            for r in select_split(discover(d), read_split_csv(sf), "val")]
    if not recs:
        raise SystemExit(f"no validation images in {split_file}: the gate and threshold are "
                         "tuned on the 'val' rows")
    views = {t: {"dice": {th: [] for th in THRESHOLDS}, "any": {th: [] for th in THRESHOLDS},
                 "max_proba": [], "p_normal": []} for t in flips}
    labels, lesion = [], []
    for r in recs:
        image, truth = read_image(r.image_path), read_mask(r.mask_paths)
        labels.append(r.label)
        lesion.append(bool(truth.any()))
        for tta in flips:
            res = predict(image, model, tta=tta, normal_gate=None)
            v = views[tta]
            for th in THRESHOLDS:
                mask = res.proba >= th
                v["dice"][th].append(dice_score(mask, truth))
                v["any"][th].append(bool(mask.any()))
            v["max_proba"].append(float(res.proba.max()))
            v["p_normal"].append(None if res.class_proba is None
                                 else float(res.class_proba["normal"]))
    for v in views.values():
        for key in ("dice", "any"):
            v[key] = {th: np.asarray(x) for th, x in v[key].items()}
        v["max_proba"] = np.asarray(v["max_proba"], dtype=float)
        v["p_normal"] = (None if any(p is None for p in v["p_normal"])
                         else np.asarray(v["p_normal"], dtype=float))
    return {"labels": labels, "lesion": np.asarray(lesion), "views": views}


def tune_on_validation(ckpt: Path, data: str, split_file: str, metric: str = "dice",
                       flips=(False, True), collected: dict | None = None
                       ) -> tuple[list[dict], dict]:
    """Validation metrics for each (flips, threshold); returns the rows and the best one.

    ``metric`` is ``"dice"`` (all validation images) or ``"dice_lesion"`` (images with a
    lesion); ties go to the setting without flips (half the inference time). ``flips``
    lists the flips settings to try; ``collected`` reuses :func:`collect_validation`.
    """
    import numpy as np

    c = collected or collect_validation(ckpt, data, split_file, flips)
    lesion = c["lesion"]
    rows = []
    for t in flips:
        for th in THRESHOLDS:
            d = c["views"][t]["dice"][th]
            rows.append({"tta_flips": t, "threshold": th, "val_dice": float(np.mean(d)),
                         "val_dice_lesion": float(np.mean(d[lesion])) if lesion.any()
                         else float("nan"),
                         "val_fp_rate_normal": float(np.mean(c["views"][t]["any"][th][~lesion]))
                         if (~lesion).any() else float("nan")})
    for r in rows:
        fp = r["val_fp_rate_normal"]
        r["val_lesion_and_normal"] = (r["val_dice_lesion"] + 1.0 - fp) / 2.0 \
            if math.isfinite(fp) else r["val_dice_lesion"]
    key = {"dice": "val_dice", "dice_lesion": "val_dice_lesion",
           "lesion_and_normal": "val_lesion_and_normal"}[metric]
    best = max(rows, key=lambda r: (round(r[key], 4), not r["tta_flips"]))
    return rows, best


def gate_candidates(dice, any_pred, lesion, max_proba, p_normal,
                    p_grid=GATE_P_NORMAL, conf_grid=GATE_LESION_CONFIDENCE) -> list[dict]:
    """Validation FP rate and lesion Dice of every gate candidate (and of no gate).

    Parameters
    ----------
    dice : numpy.ndarray
        (N,) float, per-image Dice of the ungated masks at the chosen threshold.
    any_pred : numpy.ndarray
        (N,) bool, the ungated mask is non-empty.
    lesion : numpy.ndarray
        (N,) bool, the image has a lesion (non-empty truth).
    max_proba : numpy.ndarray
        (N,) float in [0, 1], the largest lesion probability of the image.
    p_normal : numpy.ndarray
        (N,) float in [0, 1], the class head's P(normal).
    p_grid, conf_grid : sequence of float
        Candidate ``p_normal`` and ``lesion_confidence`` values.

    Returns
    -------
    list of dict
        First the no-gate row (``p_normal`` and ``lesion_confidence`` None), then one per
        pair: ``val_fp_rate_normal`` (share of images without a lesion whose mask stays
        non-empty; NaN without such images), ``val_dice_lesion`` (mean Dice over images with
        a lesion; an emptied lesion mask scores 0), ``dice_drop`` (no-gate lesion Dice minus
        this), ``n_gated_lesion`` and ``n_gated_normal`` (masks emptied).

    Notes
    -----
    Exactly the rule of :func:`busseg.inference.predict`: a non-empty mask is emptied when
    ``p_normal >= t`` and ``max_proba < c``.
    """
    import numpy as np

    def row(t, c, gated):
        kept = any_pred & ~gated
        d = np.where(gated, np.where(lesion, 0.0, 1.0), dice)
        return {"p_normal": t, "lesion_confidence": c,
                "val_fp_rate_normal": float(np.mean(kept[~lesion])) if (~lesion).any()
                else float("nan"),
                "val_dice_lesion": float(np.mean(d[lesion])) if lesion.any() else float("nan"),
                "n_gated_lesion": int((gated & lesion).sum()),
                "n_gated_normal": int((gated & ~lesion).sum())}

    none = row(None, None, np.zeros_like(any_pred, dtype=bool))
    rows = [none]
    for t in p_grid:
        for c in conf_grid:
            rows.append(row(t, c, any_pred & (p_normal >= t) & (max_proba < c)))
    for r in rows:
        r["dice_drop"] = none["val_dice_lesion"] - r["val_dice_lesion"]
    return rows


def choose_gate(rows: list[dict], max_drop: float = MAX_DICE_DROP) -> dict:
    """Apply the rule of the module docstring to :func:`gate_candidates` rows.

    Returns
    -------
    dict
        The chosen row; its ``p_normal`` is None when no gate lowers the FP rate within the
        allowed Dice drop (then no gate is stored).
    """
    def fp(r):
        v = r["val_fp_rate_normal"]
        return v if math.isfinite(v) else 1.0

    allowed = [r for r in rows if r["dice_drop"] <= max_drop + 1e-12]
    best = min(allowed, key=lambda r: (
        round(fp(r), 6), round(r["dice_drop"], 6),
        -(r["p_normal"] if r["p_normal"] is not None else 2.0),
        r["lesion_confidence"] if r["lesion_confidence"] is not None else -1.0))
    none = rows[0]
    if fp(best) >= fp(none):
        return none
    return best


#: An absolute POSIX or Windows path inside free text: starts the text or follows a space, '=',
#: a quote or a bracket; ends at whitespace, a quote or a bracket.
_ABS_PATH = re.compile(r"""(?:^|(?<=[\s='"(\[]))(?:/|[A-Za-z]:[\\/])[^\s'"()\[\]]+""")
_WHOLE_ABS = re.compile(r"^(?:/|[A-Za-z]:[\\/])")


def portable_path(text: str, root: Path = ROOT) -> str:
    """Describe an absolute path without the training machine's folders.

    Parameters
    ----------
    text : str
        An absolute path.
    root : pathlib.Path
        The repository root.

    Returns
    -------
    str
        Relative to ``root`` (POSIX separators) when inside it, else its last two components
        (``/work/shared/data/busi/Dataset_BUSI_with_GT`` -> ``busi/Dataset_BUSI_with_GT``).
    """
    if os.path.isabs(text):
        try:
            return Path(text).resolve().relative_to(root.resolve()).as_posix() or "."
        except (ValueError, OSError):
            pass
    parts = [q for q in re.split(r"[\\/]+", text) if q and not re.fullmatch(r"[A-Za-z]:", q)]
    return "/".join(parts[-2:]) if parts else text


def portable(value, root: Path = ROOT):
    """Replace every absolute path in a JSON-like value by :func:`portable_path`.

    Parameters
    ----------
    value : dict, list, str or any JSON value
        A checkpoint config or a model card.
    root : pathlib.Path
        The repository root.

    Returns
    -------
    Same type as ``value``
        A copy; strings that are absolute paths, and absolute paths inside longer strings
        (e.g. a training command), are rewritten; everything else is kept.
    """
    if isinstance(value, dict):
        return {k: portable(v, root) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [portable(v, root) for v in value]
    if isinstance(value, str):
        if _WHOLE_ABS.match(value) and "\n" not in value and not re.search(r"\s-", value):
            return portable_path(value, root)  # the whole string is one path (spaces allowed)
        return _ABS_PATH.sub(lambda m: portable_path(m.group(0), root), value)
    return value


def build_parser() -> argparse.ArgumentParser:
    """Build the command line of this script."""
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--run", required=True, help="training run folder (holds best/ and log.csv)")
    ap.add_argument("--checkpoint", default=None,
                    help="export this checkpoint of the run instead of <run>/best (e.g. one "
                         "chosen by training/select_checkpoint.py from <run>/evals)")
    ap.add_argument("--keep-inference", action="store_true",
                    help="keep the checkpoint's own inference settings (threshold, flips, "
                         "normal-scan gate; a continuation inherits its base's) instead of "
                         "tuning them on the validation split")
    ap.add_argument("--dest", default=str(ROOT / "src/busseg/weights/default"))
    ap.add_argument("--data", nargs="+",
                    default=[str(ROOT.parent / "shared/data/busi/Dataset_BUSI_with_GT")],
                    help="dataset folders whose validation images tune threshold and gate "
                         "(pooled); the FIRST one's test split is evaluated for the card")
    ap.add_argument("--split-file", nargs="+", default=[str(ROOT / "training/splits/busi.csv")],
                    help="one split CSV per --data folder")
    ap.add_argument("--eval-out", required=True, help="folder for the test-split evaluation")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing --dest")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-flips", action="store_true",
                    help="do not consider test-time flips (use when predict_mask with flips "
                    "misses the speed target of benchmarks/speed.py: <= 0.8x a plain base-16 "
                    "U-Net forward at 256x256)")
    ap.add_argument("--no-gate", action="store_true",
                    help="store no normal-scan gate even for a model with a class head")
    ap.add_argument("--max-dice-drop", type=float, default=MAX_DICE_DROP,
                    help=f"largest validation lesion-Dice drop the gate may cause (default "
                    f"{MAX_DICE_DROP}; the rule of the model card)")
    ap.add_argument("--n-boot", type=int, default=2000,
                    help="bootstrap resamples of the test evaluation (default 2000)")
    ap.add_argument("--note", action="append", default=[],
                    help="a line of provenance for the model card (repeatable)")
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)

    import evaluate as evaluate_script
    import torch

    from busseg.data.io import atomic_write_bytes
    from busseg.models import load_checkpoint, save_checkpoint
    from busseg.models.checkpoint import WEIGHTS_NAME

    torch.set_num_threads(args.threads)
    run = Path(args.run)
    source = Path(args.checkpoint) if args.checkpoint else run / "best"
    _, run_cfg = load_checkpoint(source)
    metric = run_cfg.get("training", {}).get("hyperparameters", {}).get("select_metric", "dice")
    if metric == "interactions":  # the threshold grid is scored on Dice: the lesion guard
        metric = "dice_lesion"
    flips = (False,) if args.no_flips else (False, True)
    gate_rows = gate = None
    if args.keep_inference:
        kept = run_cfg.get("inference", {})
        rows, best = [], {"threshold": kept.get("threshold", 0.5),
                          "tta_flips": bool(kept.get("tta_flips", False))}
        stored = kept.get("normal_gate")
        gate = ({"p_normal": stored["p_normal"],
                 "lesion_confidence": stored["lesion_confidence"]} if stored else None)
        print(f"kept the checkpoint's inference settings: threshold {best['threshold']}, "
              f"flips {'on' if best['tta_flips'] else 'off'}, gate {stored}")
    else:
        collected = collect_validation(source, args.data, args.split_file, flips)
        rows, best = tune_on_validation(source, args.data, args.split_file, metric, flips,
                                        collected)
        print("validation split, mean per-image Dice (all / with a lesion):")
        for r in rows:
            print(f"  flips={'on ' if r['tta_flips'] else 'off'} "
                  f"threshold={r['threshold']:.1f}: "
                  f"{r['val_dice']:.4f} / {r['val_dice_lesion']:.4f}")
        print(f"chosen: flips {'on' if best['tta_flips'] else 'off'}, "
              f"threshold {best['threshold']}")
        view = collected["views"][best["tta_flips"]]
    if not args.keep_inference and view["p_normal"] is not None and not args.no_gate:
        th = best["threshold"]
        gate_rows = gate_candidates(view["dice"][th], view["any"][th], collected["lesion"],
                                    view["max_proba"], view["p_normal"])
        gate = choose_gate(gate_rows, args.max_dice_drop)
        print(f"normal-scan gate (validation; rule: lowest FP rate on normal images with the "
              f"lesion Dice at most {args.max_dice_drop} below no gate):")
        none = gate_rows[0]
        print(f"  no gate: FP rate {none['val_fp_rate_normal']:.3f}, lesion Dice "
              f"{none['val_dice_lesion']:.4f}")
        if gate["p_normal"] is None:
            print("  chosen: no gate (none lowers the FP rate within the allowed Dice drop)")
        else:
            print(f"  chosen: P(normal) >= {gate['p_normal']}, lesion confidence "
                  f"{gate['lesion_confidence']}: FP rate {gate['val_fp_rate_normal']:.3f}, "
                  f"lesion Dice {gate['val_dice_lesion']:.4f} (drop {gate['dice_drop']:.4f})")

    model, cfg = load_checkpoint(source)
    inference = {k: v for k, v in cfg.get("inference", {}).items() if k != "normal_gate"}
    inference.update(threshold=best["threshold"], tta_flips=best["tta_flips"])
    if gate is not None and gate["p_normal"] is not None:
        inference["normal_gate"] = {"p_normal": gate["p_normal"],
                                    "lesion_confidence": gate["lesion_confidence"]}
    cfg["inference"] = inference
    cfg["weights_dtype"] = "float16"  # halves the file; loaded into float32 either way
    cfg.setdefault("training", {})["inference_tuning"] = {
        "on": "kept from the checkpoint (a continuation inherits its base's settings)",
        "metric": None, "data": [], "flips_considered": [], "grid": [], "chosen": best,
    } if args.keep_inference else {
        "on": "validation split",
        "metric": {"dice": "mean per-image Dice, all validation images",
                   "dice_lesion": "mean per-image Dice, validation images with a lesion",
                   "lesion_and_normal": "mean of the lesion Dice and of the share of normal "
                                        "validation images predicted empty"}[metric],
        "data": [Path(d).name for d in args.data],
        "flips_considered": list(flips),
        "grid": rows, "chosen": best,
    }
    if gate_rows is not None:
        cfg["training"]["gate_tuning"] = {
            "on": "validation split, at the chosen flips and threshold",
            "rule": f"lowest FP rate on normal images among the gates whose mean lesion Dice "
                    f"is at most {args.max_dice_drop} below no gate; ties: smaller Dice drop, "
                    "higher p_normal, lower lesion_confidence; no gate if none lowers the "
                    "FP rate",
            "max_dice_drop": args.max_dice_drop,
            "grid": gate_rows, "chosen": gate,
        }
    cfg = portable(cfg)  # no path of the training machine in the shipped config
    dest = save_checkpoint(args.dest, model, cfg, overwrite=args.overwrite)
    print(f"wrote {dest}")
    _check_size(dest / WEIGHTS_NAME)

    code = evaluate_script.main(["--checkpoint", str(dest), "--data", args.data[0], "--split",
                                 "test", "--split-file", args.split_file[0], "--out",
                                 args.eval_out, "--no-progress", "--threads", str(args.threads),
                                 "--n-boot", str(args.n_boot)] + (
                                     ["--overwrite"] if args.overwrite else []))
    if code != 0:
        raise SystemExit(f"the test-split evaluation failed (exit status {code}); the "
                         f"checkpoint at {dest} has no model card yet")
    summary = json.loads((Path(args.eval_out) / "summary.json").read_text())
    card = build_card(cfg, summary, run)
    card["notes"] = list(args.note)
    card = portable(card)
    cfg.setdefault("metrics", {})["test"] = card["test_metrics"]
    if card.get("test_class_head"):
        cfg["metrics"]["test_class_head"] = card["test_class_head"]
    save_checkpoint(dest, model, portable(cfg), overwrite=True)
    _check_size(dest / WEIGHTS_NAME)
    atomic_write_bytes(dest / "model_card.json", (json.dumps(card, indent=2) + "\n").encode(),
                       overwrite=True)
    atomic_write_bytes(dest / "MODEL_CARD.md", card_markdown(card).encode(), overwrite=True)
    print(card_markdown(card))
    print(f"next: python training/fit_region_filter.py --checkpoint {portable_path(str(dest))} "
          "--write (the region filter and the gate, chosen by annotation cost)")
    return 0


def _check_size(weights: Path) -> None:
    mb = weights.stat().st_size / 1e6
    if mb >= MAX_WEIGHTS_MB:
        raise SystemExit(f"{weights} is {mb:.1f} MB, over the {MAX_WEIGHTS_MB:.0f} MB limit of "
                         "the shipped model; export a smaller model")
    print(f"weights: {mb:.2f} MB (float16)")


def _ci(entry: dict | None) -> dict | None:
    if not entry:
        return None
    return {"auc": entry.get("auc"), "ci95": [entry.get("ci_low"), entry.get("ci_high")],
            "n_pos": entry.get("n_pos"), "n_neg": entry.get("n_neg")}


def build_card(cfg: dict, summary: dict, run: Path) -> dict:
    tr = cfg.get("training", {})
    test = {}
    for g, s in summary["summary"].items():
        row = {"n": s.get("n"), "fp_rate": s.get("fp_rate")}
        if s.get("fp_rate_ungated") is not None:
            row["fp_rate_ungated"] = s["fp_rate_ungated"]
        for k in ("dice", "iou", "precision", "recall", "hd95"):
            st = s.get("metrics", {}).get(k)
            if st:
                row[k] = st.get("mean")
                row[k + "_ci95"] = [st.get("ci_low"), st.get("ci_high")]
        test[g] = row
    head = summary.get("class_head") or None
    return {
        "name": "busseg default U-Net",
        "model": cfg["model"],
        "preprocessing": cfg["preprocessing"],
        "inference": cfg["inference"],
        "data": tr.get("data"),
        "split": {"file": tr.get("split_file"), "train": tr.get("train_counts"),
                  "val": tr.get("val_counts"),
                  "method": "near-duplicate groups (high-pass thumbnail correlation > 0.4) kept "
                            "on one side; stratified by class; 70/15/15; seed 0"},
        "hyperparameters": tr.get("hyperparameters"),
        "augment": tr.get("augment"),
        "hardware": tr.get("hardware"),
        "training_time_s": tr.get("train_time_s"),
        "best_epoch": tr.get("best_epoch"),
        "tried": tr.get("inference_tuning"),
        "gate_tuning": tr.get("gate_tuning"),
        "validation_metrics": {k: v for k, v in cfg.get("metrics", {}).items()
                               if not k.startswith("test")},
        "test_metrics": test,
        "test_gate": summary.get("gate"),
        "test_class_head": None if head is None else {
            "auc_malignant_vs_benign": _ci(head.get("auc_malignant_vs_benign")),
            "auc_lesion_vs_normal": _ci(head.get("auc_lesion_vs_normal")),
            "ece_p_lesion": head.get("calibration", {}).get("ece"),
            "p_normal": head.get("p_normal"),
        },
        "test_evaluation": {k: summary.get(k) for k in ("n_images", "threshold", "tta", "date",
                                                          "seconds_per_image_median", "device")},
        "command": tr.get("command"),
        "run": str(run),
    }


def _f(x, d=3):
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{d}f}"


def card_markdown(card: dict) -> str:
    from busseg.inference import describe_gate

    hp = card.get("hyperparameters") or {}
    m = card["model"]
    hw = card.get("hardware") or {}
    sp = card["split"]
    inf = card["inference"]
    head = bool(m.get("num_classes"))
    lines = [
        "# Model card: busseg default U-Net", "",
        f"- Architecture: U-Net ({m.get('encoder')} encoder"
        + (f", base {m.get('base_channels')} channels, depth {m.get('depth')}"
           if m.get("encoder", "plain") == "plain" else "")
        + f"), input {card['preprocessing'].get('input_size')} (grey, per-image z-score)"
        + (f"; {int(m['in_channels']) - 1} prompt-guidance channels (boxes, clicks, previous "
           "mask)" if int(m.get("in_channels", 1)) > 1 else "")
        + ("; image-level class head (normal / benign / malignant; research output, not a "
           "diagnosis)" if head else ""),
        f"- Data: {card.get('data')}; split `{sp['file']}` ({sp['method']}); "
        f"train {sp['train']}, validation {sp['val']}",
        f"- Training: {hp.get('loss')} loss, AdamW lr {hp.get('lr')}, "
        f"batch {hp.get('batch_size')}, "
        f"{hp.get('epochs')} epochs planned (cosine schedule, early stopping patience "
        f"{hp.get('early_stopping')}), best epoch {card.get('best_epoch')}, "
        f"{_f((card.get('training_time_s') or 0) / 60, 0)} min on {hw.get('device')} "
        f"({hw.get('cpu_threads')} threads, torch {hw.get('torch')})",
        f"- Inference: threshold {inf['threshold']}, test-time flips "
        f"{'on' if inf['tta_flips'] else 'off'} (chosen on the validation split)"
        + (f"; normal-scan gate: {describe_gate(inf.get('normal_gate'))} (chosen on the "
           "validation split, see below)" if head else ""),
        "", "## Test split (never used for training or tuning)", "",
    ]
    gate_on = head and bool(inf.get("normal_gate"))
    if gate_on:
        lines += ["With the normal-scan gate on (the default); the last column is the FP rate "
                  "with the gate off.", ""]
    lines += [
        "| group | n | Dice | IoU | precision | recall | HD95 (px) | FP rate |"
        + (" FP rate, gate off |" if gate_on else ""),
        "|---|---|---|---|---|---|---|---|" + ("---|" if gate_on else ""),
    ]
    for g, s in card["test_metrics"].items():
        lines.append(f"| {g} | {s.get('n')} | {_f(s.get('dice'))} | {_f(s.get('iou'))} | "
                     f"{_f(s.get('precision'))} | {_f(s.get('recall'))} | {_f(s.get('hd95'), 1)} | "
                     f"{_f(s.get('fp_rate'), 2)} |"
                     + (f" {_f(s.get('fp_rate_ungated'), 2)} |" if gate_on else ""))
    tg = card.get("test_gate")
    if gate_on and tg:
        lines += ["", f"Gate on the test split: lesion Dice {_f(tg.get('lesion_dice'))} "
                  f"(gate off {_f(tg.get('lesion_dice_ungated'))}); "
                  f"{tg.get('n_lesion_gated')}/{tg.get('n_lesion')} lesion images emptied; "
                  f"FP rate on normal images {_f(tg.get('fp_rate_normal'), 2)} (gate off "
                  f"{_f(tg.get('fp_rate_normal_ungated'), 2)})."]
    ch = card.get("test_class_head")
    if ch:
        def auc(e):
            if not e or e.get("auc") is None:
                return "n/a"
            lo, hi = e["ci95"]
            return f"{_f(e['auc'])} [{_f(lo)}, {_f(hi)}] (n+ {e['n_pos']}, n- {e['n_neg']})"

        lines += ["", "## Class head on the test split (research output, not a diagnosis)", "",
                  "| AUC (95 % stratified bootstrap CI) | |", "|---|---|",
                  "| malignant vs benign (lesion images; P(malignant) / (P(benign) + "
                  f"P(malignant))) | {auc(ch.get('auc_malignant_vs_benign'))} |",
                  "| lesion vs normal (1 - P(normal)) | "
                  f"{auc(ch.get('auc_lesion_vs_normal'))} |", "",
                  f"Expected calibration error of P(lesion) = 1 - P(normal), 10 bins: "
                  f"{_f(ch.get('ece_p_lesion'))}."]
    tried = card.get("tried") or {}
    if tried.get("grid"):
        lines += ["", "## What was tried (validation split)", "",
                  f"Chosen by {tried.get('metric')}.", "",
                  "| test-time flips | threshold | val Dice (all) | val Dice (lesion) | "
                  "val FP rate (normal) |",
                  "|---|---|---|---|---|"]
        for r in tried["grid"]:
            fp = r.get("val_fp_rate_normal")
            lines.append(f"| {'on' if r['tta_flips'] else 'off'} | {r['threshold']} | "
                         f"{r['val_dice']:.4f} | {r['val_dice_lesion']:.4f} | {_f(fp, 2)} |")
    gt = card.get("gate_tuning") or {}
    if gt.get("grid"):
        ch_gate = gt.get("chosen") or {}
        lines += ["", "## Normal-scan gate candidates (validation split)", "",
                  f"Rule: {gt.get('rule')}. Evaluated {gt.get('on')}. A mask is emptied when "
                  "P(normal) >= p_normal and its largest lesion probability is below the lesion "
                  "confidence (1.0: never protected). Chosen: "
                  + ("no gate" if ch_gate.get("p_normal") is None else
                     f"p_normal {ch_gate['p_normal']}, lesion confidence "
                     f"{ch_gate['lesion_confidence']}") + ".", "",
                  "| p_normal | lesion confidence | val FP rate (normal) | val Dice (lesion) | "
                  "Dice drop | lesion masks emptied | normal masks emptied |",
                  "|---|---|---|---|---|---|---|"]
        for r in gt["grid"]:
            mark = " **(chosen)**" if (r["p_normal"], r["lesion_confidence"]) == (
                ch_gate.get("p_normal"), ch_gate.get("lesion_confidence")) else ""
            lines.append(
                f"| {'no gate' if r['p_normal'] is None else r['p_normal']}{mark} | "
                f"{'–' if r['lesion_confidence'] is None else r['lesion_confidence']} | "
                f"{_f(r['val_fp_rate_normal'])} | {_f(r['val_dice_lesion'], 4)} | "
                f"{_f(r['dice_drop'], 4)} | {r['n_gated_lesion']} | {r['n_gated_normal']} |")
    if card.get("notes"):
        lines += ["", "## Notes", ""] + [f"- {n}" for n in card["notes"]]
    lines += ["", f"Produced by `python training/export_default.py --run {card['run']}`.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
