"""Turn a training run into the shipped default model, with its model card.

    python training/export_default.py --run runs/default_160 \
        --dest src/busseg/weights/default --eval-out runs/default_160/eval_test

1. On the VALIDATION split only, compare test-time flips off/on and thresholds 0.3-0.7 at
   the original image size and keep the best setting by the metric the run selected its
   checkpoint on (``select_metric`` in its config: mean per-image Dice over all validation
   images, normal ones included, or over the images with a lesion); the test split plays no
   part in this choice.
2. Write the checkpoint to ``--dest`` (atomic; never over an existing one without
   ``--overwrite``) with the chosen inference settings.
3. Run ``training/evaluate.py`` on the TEST split once and write ``model_card.json`` and
   ``MODEL_CARD.md`` beside the weights (data, split, hyper-parameters, hardware, training
   time, what was tried, test metrics).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "src") not in sys.path:
    sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "training"))

THRESHOLDS = (0.3, 0.4, 0.5, 0.6, 0.7)


def tune_on_validation(ckpt: Path, data: str, split_file: str,
                       metric: str = "dice") -> tuple[list[dict], dict]:
    """Validation metrics for each (flips, threshold); returns the rows and the best one.

    ``metric`` is ``"dice"`` (all validation images) or ``"dice_lesion"`` (images with a
    lesion); ties go to the setting without flips (half the inference time).
    """
    import numpy as np

    from busseg.data.busi import discover_busi
    from busseg.data.io import read_image, read_mask
    from busseg.data.splits import read_split_csv, select_split
    from busseg.inference import load_model, predict_proba
    from busseg.metrics import dice_score

    model = load_model(ckpt, device="cpu")
    recs = select_split(discover_busi(data), read_split_csv(split_file), "val")
    scores = {(t, th): [] for t in (False, True) for th in THRESHOLDS}
    lesion = []
    for r in recs:
        image, truth = read_image(r.image_path), read_mask(r.mask_paths)
        lesion.append(r.label != "normal")
        for tta in (False, True):
            p = predict_proba(image, model, tta=tta)
            for th in THRESHOLDS:
                scores[(tta, th)].append(dice_score(p >= th, truth))
    lesion = np.array(lesion)
    rows = [{"tta_flips": t, "threshold": th, "val_dice": float(np.mean(v)),
             "val_dice_lesion": float(np.mean(np.array(v)[lesion])),
             "val_fp_rate_normal": float(np.mean(np.array(v)[~lesion] < 1.0))
             if (~lesion).any() else float("nan")}
            for (t, th), v in scores.items()]
    key = {"dice": "val_dice", "dice_lesion": "val_dice_lesion"}[metric]
    best = max(rows, key=lambda r: (round(r[key], 4), not r["tta_flips"]))
    return rows, best


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--run", required=True, help="training run folder (holds best/ and log.csv)")
    ap.add_argument("--dest", default=str(ROOT / "src/busseg/weights/default"))
    ap.add_argument("--data", default=str(ROOT.parent / "shared/data/busi/Dataset_BUSI_with_GT"))
    ap.add_argument("--split-file", default=str(ROOT / "training/splits/busi.csv"))
    ap.add_argument("--eval-out", required=True, help="folder for the test-split evaluation")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing --dest")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--note", action="append", default=[],
                    help="a line of provenance for the model card (repeatable)")
    args = ap.parse_args(argv)

    import evaluate as evaluate_script
    import torch

    from busseg.data.io import atomic_write_bytes
    from busseg.models import load_checkpoint, save_checkpoint

    torch.set_num_threads(args.threads)
    run = Path(args.run)
    _, run_cfg = load_checkpoint(run / "best")
    metric = run_cfg.get("training", {}).get("hyperparameters", {}).get("select_metric", "dice")
    rows, best = tune_on_validation(run / "best", args.data, args.split_file, metric)
    print("validation split, mean per-image Dice (all / with a lesion):")
    for r in rows:
        print(f"  flips={'on ' if r['tta_flips'] else 'off'} threshold={r['threshold']:.1f}: "
              f"{r['val_dice']:.4f} / {r['val_dice_lesion']:.4f}")
    print(f"chosen: flips {'on' if best['tta_flips'] else 'off'}, threshold {best['threshold']}")

    model, cfg = load_checkpoint(run / "best")
    cfg["inference"] = {"threshold": best["threshold"], "tta_flips": best["tta_flips"]}
    cfg.setdefault("training", {})["inference_tuning"] = {
        "on": "validation split",
        "metric": {"dice": "mean per-image Dice, all validation images",
                   "dice_lesion": "mean per-image Dice, validation images with a lesion"}[metric],
        "grid": rows, "chosen": best,
    }
    dest = save_checkpoint(args.dest, model, cfg, overwrite=args.overwrite)
    print(f"wrote {dest}")

    evaluate_script.main(["--checkpoint", str(dest), "--data", args.data, "--split", "test",
                          "--split-file", args.split_file, "--out", args.eval_out,
                          "--no-progress", "--threads", str(args.threads)])
    summary = json.loads((Path(args.eval_out) / "summary.json").read_text())
    card = build_card(cfg, summary, run)
    card["notes"] = list(args.note)
    cfg["metrics"]["test"] = card["test_metrics"]
    save_checkpoint(dest, model, cfg, overwrite=True)
    atomic_write_bytes(dest / "model_card.json", (json.dumps(card, indent=2) + "\n").encode(),
                       overwrite=True)
    atomic_write_bytes(dest / "MODEL_CARD.md", card_markdown(card).encode(), overwrite=True)
    print(card_markdown(card))
    return 0


def build_card(cfg: dict, summary: dict, run: Path) -> dict:
    tr = cfg.get("training", {})
    test = {}
    for g, s in summary["summary"].items():
        row = {"n": s.get("n"), "fp_rate": s.get("fp_rate")}
        for k in ("dice", "iou", "precision", "recall", "hd95"):
            st = s.get("metrics", {}).get(k)
            if st:
                row[k] = st.get("mean")
                row[k + "_ci95"] = [st.get("ci_low"), st.get("ci_high")]
        test[g] = row
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
        "validation_metrics": {k: v for k, v in cfg.get("metrics", {}).items() if k != "test"},
        "test_metrics": test,
        "test_evaluation": {k: summary.get(k) for k in ("n_images", "threshold", "tta", "date",
                                                          "seconds_per_image_median", "device")},
        "command": tr.get("command"),
        "run": str(run),
    }


def _f(x, d=3):
    return "n/a" if x is None else f"{x:.{d}f}"


def card_markdown(card: dict) -> str:
    hp = card.get("hyperparameters") or {}
    m = card["model"]
    hw = card.get("hardware") or {}
    sp = card["split"]
    lines = [
        "# Model card: busseg default U-Net", "",
        f"- Architecture: U-Net ({m.get('encoder')} encoder), base {m.get('base_channels')} "
        f"channels, depth {m.get('depth')}, input {card['preprocessing'].get('input_size')} "
        f"(grey, per-image z-score)",
        f"- Data: {card.get('data')}; split `{sp['file']}` ({sp['method']}); "
        f"train {sp['train']}, validation {sp['val']}",
        f"- Training: {hp.get('loss')} loss, AdamW lr {hp.get('lr')}, "
        f"batch {hp.get('batch_size')}, "
        f"{hp.get('epochs')} epochs planned (cosine schedule, early stopping patience "
        f"{hp.get('early_stopping')}), best epoch {card.get('best_epoch')}, "
        f"{_f((card.get('training_time_s') or 0) / 60, 0)} min on {hw.get('device')} "
        f"({hw.get('cpu_threads')} threads, torch {hw.get('torch')})",
        f"- Inference: threshold {card['inference']['threshold']}, test-time flips "
        f"{'on' if card['inference']['tta_flips'] else 'off'} (chosen on the validation split)",
        "", "## Test split (never used for training or tuning)", "",
        "| group | n | Dice | IoU | precision | recall | HD95 (px) | FP rate |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for g, s in card["test_metrics"].items():
        lines.append(f"| {g} | {s.get('n')} | {_f(s.get('dice'))} | {_f(s.get('iou'))} | "
                     f"{_f(s.get('precision'))} | {_f(s.get('recall'))} | {_f(s.get('hd95'), 1)} | "
                     f"{_f(s.get('fp_rate'), 2)} |")
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
    if card.get("notes"):
        lines += ["", "## Notes", ""] + [f"- {n}" for n in card["notes"]]
    lines += ["", f"Produced by `python training/export_default.py --run {card['run']}`.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
