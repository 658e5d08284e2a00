"""Speed and memory of our U-Net beside MONAI's BasicUNet and UNet, and of the whole pipeline.

Usage (from the repository root)::

    python benchmarks/speed.py                          # shipped default model, full run
    python benchmarks/speed.py --checkpoint runs/x/best --quick
    git show af83f33:src/busseg/weights/default/config.json ...   # the old default, then
    python benchmarks/speed.py --old-checkpoint /tmp/old_default

Models: ``ours`` (the checkpoint: the new default, e.g. the EfficientNet-Lite0 U-Net with
prompt-guidance channels, fed all-zero guidance as in automatic mode), ``old`` (the previous
default, ``--old-checkpoint``), ``unet16`` (a plain base-16, depth-4 U-Net,
``build_model({})``, random weights: the reference of the speed target) and MONAI
peers at the widths of the plain U-Net (the checkpoint's own when it is a plain U-Net, else
the base-16 reference).

Targets, each measured in one run:

- the whole ``busseg.predict_mask`` with the checkpoint's default settings (flips, gate) on
  real BUSI images, per image, over a plain base-16 U-Net forward at 256x256 (batch 1):
  <= 0.8; the two are timed alternately, image after image, so load swings hit both;
- fine-tuning (``busseg.finetune.finetune``, the widget's settings) on 10 corrected images
  (BUSI test images with their masks), 100 steps, 2 torch threads: <= 30 s wall time,
  checkpoint writing included; the median of ``--finetune-repeats`` runs with the widget's
  default (the whole network), alternating with the same fine-tune with the
  encoder frozen (the widget's option) for comparison.

Measured in one run, on the same inputs and thread count:

- parameters of our U-Net (architecture read from the checkpoint config) and of MONAI peers
  at matched widths (``pip install monai`` or the ``bench`` extra; rows are skipped without):
  ``BasicUNet(features=(b, 2b, 4b, 8b, 16b, b))`` (classic U-Net, double conv per level,
  max-pool, transposed-conv up-sampling; only for depth 4, which BasicUNet fixes) and
  ``UNet(channels=(b, ..., b * 2**depth), strides=(2,) * depth)`` with ``num_res_units`` 0
  and 2 (strided-conv down-sampling); ``b`` is our ``base_channels``; all with batch norm
  like ours;
- inference latency per image (median and IQR over rounds) at 256x256 and at our input size,
  batch 1 and 16; the models are interleaved in shuffled order within each round, since the
  shared host's timings swing several-fold;
- training throughput in images/s (batch 8 at our input size, BCE + Dice loss, AdamW);
- peak memory: on CPU the increase of the peak resident set size (``VmHWM``, else
  ``ru_maxrss``) in a fresh subprocess per model and mode (``tracemalloc`` does not see
  torch's allocations); on CUDA ``max_memory_allocated``;
- our whole ``busseg.predict_mask`` on real BUSI images (decode, preprocess, model, resize
  back), and optionally (``--widget``) the time from clicking Run in the *Segment lesions*
  napari widget to its Labels layer appearing (headless viewer, Xvfb).

Writes ``speed.md``, ``speed.json`` and ``speed.png`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402

NAME = "speed"
OURS = "ours"
OLD = "old"
REF = "unet16"
PEERS = ("monai_basicunet", "monai_unet_r0", "monai_unet_r2")
#: The plain U-Net of the speed target (build_model's defaults).
REF_CONFIG = {"base_channels": 16, "depth": 4}
#: predict_mask / plain base-16 U-Net forward at 256x256 must stay at or below this.
TARGET_PREDICT_RATIO = 0.8
#: Fine-tuning on 10 images, 100 steps, 2 threads must take at most this many seconds.
TARGET_FINETUNE_S = 30.0
_LABELS = {
    OURS: "busseg (checkpoint)",
    OLD: "busseg old default",
    REF: "plain U-Net base 16 (reference)",
    "monai_basicunet": "MONAI BasicUNet",
    "monai_unet_r0": "MONAI UNet (res units 0)",
    "monai_unet_r2": "MONAI UNet (res units 2)",
}


# --------------------------------------------------------------------------- models


def monai_version() -> str | None:
    """MONAI's version, or None when it is not installed."""
    try:
        import monai
    except ImportError:
        return None
    return str(monai.__version__)


def peer_config(model_cfg: dict) -> dict:
    """The plain U-Net whose widths the MONAI peers match: the checkpoint's if it is a plain
    U-Net, else the base-16 reference (an encoder U-Net has no comparable widths)."""
    if model_cfg.get("encoder", "plain") == "plain":
        return dict(model_cfg)
    from busseg.models import normalize_model_config

    return normalize_model_config(REF_CONFIG)


def _describe(model_cfg: dict) -> str:
    enc = model_cfg.get("encoder", "plain")
    extra = (f", in_channels: {model_cfg['in_channels']}" if model_cfg.get("in_channels", 1) > 1
             else "") + (f", num_classes: {model_cfg['num_classes']}"
                         if model_cfg.get("num_classes") else "")
    if enc != "plain":
        return f"build_model({{encoder: {enc}{extra}}})"
    return (f"build_model({{base_channels: {model_cfg.get('base_channels', 16)}, depth: "
            f"{model_cfg.get('depth', 4)}, norm: {model_cfg.get('norm', 'batch')}, upsample: "
            f"{model_cfg.get('upsample', 'transpose')}{extra}}})")


def model_definitions(model_cfg: dict, old_cfg: dict | None = None) -> dict[str, str]:
    """A one-line definition of every model this run can build (for the table)."""
    from busseg.models import normalize_model_config

    peer = peer_config(model_cfg)
    b, d = int(peer.get("base_channels", 16)), int(peer.get("depth", 4))
    widths = tuple(b * 2**i for i in range(d + 1))
    norm = peer.get("norm", "batch")
    defs = {OURS: _describe(model_cfg)}
    if old_cfg is not None:
        defs[OLD] = _describe(old_cfg)
    defs[REF] = _describe(normalize_model_config(REF_CONFIG)) + " (random weights)"
    if monai_version() is not None:
        if d == 4:
            defs["monai_basicunet"] = f"BasicUNet(features={widths + (b,)}, norm={norm})"
        for r in (0, 2):
            defs[f"monai_unet_r{r}"] = (
                f"UNet(channels={widths}, strides={(2,) * d}, num_res_units={r}, norm={norm})"
            )
    return defs


def build(name: str, checkpoint: Path) -> Any:
    """Build model ``name`` (``"ours"`` / ``"old"`` load ``checkpoint``; ``"unet16"`` is the
    plain base-16 reference; peers get the widths of :func:`peer_config`).

    Returns
    -------
    torch.nn.Module
        In eval mode, on the CPU.
    """
    from busseg.models import build_model, load_checkpoint, read_checkpoint_config

    if name in (OURS, OLD):
        return load_checkpoint(checkpoint, device="cpu")[0].eval()
    if name == REF:
        import torch

        torch.manual_seed(0)
        return build_model(REF_CONFIG).eval()
    mcfg = peer_config(read_checkpoint_config(checkpoint)["model"])
    b, d = int(mcfg.get("base_channels", 16)), int(mcfg.get("depth", 4))
    widths = tuple(b * 2**i for i in range(d + 1))
    norm = {"batch": "batch", "instance": "instance", "none": None}.get(mcfg.get("norm", "batch"))
    from monai.networks import nets

    if name == "monai_basicunet":
        if d != 4:
            raise ValueError("MONAI BasicUNet has a fixed depth of 4")
        net = nets.BasicUNet(
            spatial_dims=2,
            in_channels=1,
            out_channels=1,
            features=widths + (b,),
            norm=norm or ("instance", {"affine": True}),
        )
    elif name.startswith("monai_unet_r"):
        net = nets.UNet(
            spatial_dims=2,
            in_channels=1,
            out_channels=1,
            channels=widths,
            strides=(2,) * d,
            num_res_units=int(name[-1]),
            norm=norm or "instance",
        )
    else:
        raise ValueError(f"unknown model {name!r}")
    return net.eval()


def n_params(model) -> int:
    return int(sum(p.numel() for p in model.parameters()))


def in_channels(model) -> int:
    """Input channels of a model: image + prompt guidance for ours, 1 for the peers."""
    return int(getattr(model, "in_channels", 1))


def _input(model, x):
    """``x`` (N, 1, h, w) with all-zero guidance channels appended where ``model`` takes
    prompts (automatic mode, as :func:`busseg.inference.predict_logits_batch` does)."""
    import torch

    c = in_channels(model)
    if c == 1:
        return x
    return torch.cat([x, x.new_zeros((x.shape[0], c - 1, *x.shape[-2:]))], dim=1)


# --------------------------------------------------------------------------- timing


def _sync(device) -> None:
    import torch

    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def latency_rounds(
    models: dict[str, Any],
    sizes: Sequence[tuple[int, int]],
    batches: Sequence[int],
    rounds: int,
    warmup: int,
    device,
    seed: int = 0,
    quiet: bool = False,
) -> dict[tuple[str, tuple[int, int], int], list[float]]:
    """Seconds per image of one forward pass, interleaving all configurations in each round.

    Returns
    -------
    dict
        ``{(model, (h, w), batch): [seconds per image, one per measured round]}``.
    """
    import torch

    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    inputs = {
        (s, bt): torch.randn(bt, 1, *s, generator=gen).to(device) for s in sizes for bt in batches
    }
    configs = [(m, s, bt) for m in models for s in sizes for bt in batches]
    model_inputs = {(m, s, bt): _input(models[m], inputs[(s, bt)]) for m, s, bt in configs}
    out: dict = {c: [] for c in configs}
    t0 = time.perf_counter()
    with torch.inference_mode():
        for r in range(warmup + rounds):
            for i in rng.permutation(len(configs)):
                m, s, bt = configs[i]
                x = model_inputs[(m, s, bt)]
                _sync(device)
                t = time.perf_counter()
                models[m](x)
                _sync(device)
                dt = time.perf_counter() - t
                if r >= warmup:
                    out[configs[i]].append(dt / bt)
            C.log(
                f"  latency round {r + 1}/{warmup + rounds} ({time.perf_counter() - t0:.0f} s)",
                quiet,
            )
    return out


def train_rounds(
    models: dict[str, Any],
    size: tuple[int, int],
    batch: int,
    rounds: int,
    warmup: int,
    device,
    seed: int = 0,
    quiet: bool = False,
) -> dict[str, list[float]]:
    """Seconds per training step (forward, BCE + Dice loss, backward, AdamW step), interleaved.

    The models are deep-copied, so the inference models are not changed.
    """
    import copy

    import torch

    from busseg.losses import build_loss

    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 1, *size, generator=gen).to(device)
    y = (torch.rand(batch, 1, *size, generator=gen) > 0.7).float().to(device)
    loss_fn = build_loss("bce_dice")
    nets = {m: copy.deepcopy(net).train() for m, net in models.items()}
    opts = {m: torch.optim.AdamW(net.parameters(), lr=1e-3) for m, net in nets.items()}
    names = list(nets)
    out: dict[str, list[float]] = {m: [] for m in names}
    t0 = time.perf_counter()
    for r in range(warmup + rounds):
        for i in rng.permutation(len(names)):
            m = names[i]
            _sync(device)
            t = time.perf_counter()
            opts[m].zero_grad(set_to_none=True)
            loss = loss_fn(nets[m](_input(nets[m], x)), y)
            loss.backward()
            opts[m].step()
            _sync(device)
            if r >= warmup:
                out[m].append(time.perf_counter() - t)
        C.log(
            f"  training round {r + 1}/{warmup + rounds} ({time.perf_counter() - t0:.0f} s)", quiet
        )
    return out


# --------------------------------------------------------------------------- memory


def _proc_status_mib(key: str) -> float | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return None


def _reset_peak() -> str:
    """Reset the resident-set high-water mark where the OS allows it; name the method.

    ``ru_maxrss`` survives ``fork`` + ``exec`` (a child of a 1 GB process starts at 1 GB), so
    on Linux the per-process ``VmHWM`` of ``/proc/self/status`` is used, reset by writing 5 to
    ``/proc/self/clear_refs``. Elsewhere ``ru_maxrss`` of the fresh process is the fallback.
    """
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        if _proc_status_mib("VmHWM") is not None:
            return "VmHWM"
    except OSError:
        pass
    return "ru_maxrss"


def _peak_mib(method: str) -> float:
    if method == "VmHWM":
        return float(_proc_status_mib("VmHWM"))
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 1024 if sys.platform != "darwin" else rss / 2**20  # KiB on Linux, B on macOS


def memory_probe(
    name: str, checkpoint: Path, mode: str, size: tuple[int, int], batch: int, threads: int | None
) -> dict:
    """Run in a fresh process: peak RSS increase of building ``name`` and one infer/train step.

    Imports, the input tensors and the loss are in place before the baseline is read, so the
    increase is the model's parameters plus the activations (and gradients and optimiser state
    when training) of one step, as seen by the operating system.
    """
    import torch

    if threads:
        torch.set_num_threads(threads)
    if name in PEERS:
        from monai.networks import nets  # noqa: F401  (imported before the baseline)

    from busseg.losses import build_loss
    from busseg.models import load_checkpoint  # noqa: F401

    x = torch.randn(batch, 1, *size)
    y = (torch.rand(batch, 1, *size) > 0.7).float()
    loss_fn = build_loss("bce_dice")
    method = _reset_peak()
    base = _peak_mib(method)
    net = build(name, checkpoint)
    x = _input(net, x)
    if mode == "infer":
        with torch.inference_mode():
            net(x)
            net(x)
    else:
        net.train()
        opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
        for _ in range(2):
            opt.zero_grad(set_to_none=True)
            loss_fn(net(x), y).backward()
            opt.step()
    peak = _peak_mib(method)
    return {
        "model": name,
        "mode": mode,
        "size": list(size),
        "batch": batch,
        "baseline_mib": base,
        "peak_mib": peak,
        "increase_mib": peak - base,
        "method": f"peak resident memory increase ({method}) in a fresh subprocess",
    }


def measure_memory(
    names: Sequence[str],
    checkpoint: Path,
    size: tuple[int, int],
    train_batch: int,
    threads: int,
    device,
    quiet: bool,
    modes: Sequence[str] = ("infer", "train"),
    checkpoints: dict | None = None,
) -> list[dict]:
    """Peak memory per model and mode (subprocesses on CPU, CUDA counters on a GPU).

    ``checkpoints`` maps a model name to its checkpoint where it is not ``checkpoint``
    (``{"old": path}``).
    """
    checkpoints = dict(checkpoints or {})
    rows = []
    plan = [(m, b) for m, b in (("infer", 1), ("train", train_batch)) if m in modes]
    if str(device).startswith("cuda"):
        import torch

        from busseg.losses import build_loss

        for name in names:
            for mode, batch in plan:
                net = build(name, checkpoints.get(name, checkpoint)).to(device)
                x = _input(net, torch.randn(batch, 1, *size, device=device))
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats(device)
                base = torch.cuda.memory_allocated(device)
                if mode == "infer":
                    with torch.inference_mode():
                        net(x)
                else:
                    net.train()
                    y = (torch.rand_like(x[:, :1]) > 0.7).float()
                    build_loss("bce_dice")(net(x), y).backward()
                torch.cuda.synchronize()
                peak = torch.cuda.max_memory_allocated(device)
                rows.append(
                    {
                        "model": name,
                        "mode": mode,
                        "size": list(size),
                        "batch": batch,
                        "increase_mib": (peak - base) / 2**20,
                        "peak_mib": peak / 2**20,
                        "method": "torch.cuda.max_memory_allocated (model already on the GPU)",
                    }
                )
                del net, x
        return rows
    for name in names:
        for mode, batch in plan:
            res = _run_probe(
                "--probe-memory",
                name,
                "--probe-mode",
                mode,
                "--probe-size",
                str(size[0]),
                str(size[1]),
                "--probe-batch",
                str(batch),
                "--checkpoint",
                str(checkpoints.get(name, checkpoint)),
                "--threads",
                str(threads),
            )
            if res.returncode != 0:
                raise RuntimeError(f"memory probe {name}/{mode} failed:\n{res.stderr[-2000:]}")
            row = json.loads(res.stdout.strip().splitlines()[-1])
            rows.append(row)
            C.log(f"  memory {name} {mode}: +{row['increase_mib']:.0f} MiB", quiet)
    return rows


# --------------------------------------------------------------------------- pipeline


def e2e_predict(checkpoint: Path, paths: Sequence[Path], rounds: int, device, quiet: bool) -> dict:
    """Time ``read_image`` + ``predict_mask`` per real image, in ``rounds`` passes."""
    from busseg.data import read_image
    from busseg.inference import load_model, predict_mask

    model = load_model(checkpoint, device=device)
    img0 = read_image(paths[0])
    predict_mask(img0, model)  # warm-up
    decode, predict, total, shapes = [], [], [], []
    for _ in range(rounds):
        for p in paths:
            t0 = time.perf_counter()
            image = read_image(p)
            t1 = time.perf_counter()
            mask = predict_mask(image, model)
            t2 = time.perf_counter()
            if mask.shape != image.shape[:2]:
                raise RuntimeError(
                    f"predict_mask returned {mask.shape} for an image of {image.shape}"
                )
            decode.append(t1 - t0)
            predict.append(t2 - t1)
            total.append(t2 - t0)
            shapes.append(image.shape[:2])
    C.log(f"  predict_mask: {len(total)} calls", quiet)
    hs, ws = zip(*shapes, strict=True)
    return {
        "n_images": len(paths),
        "rounds": rounds,
        "decode_s": decode,
        "predict_s": predict,
        "total_s": total,
        "median_height": float(np.median(hs)),
        "median_width": float(np.median(ws)),
        "images": [str(p) for p in paths],
    }


def target_predict_ratio(checkpoint: Path, paths: Sequence[Path], rounds: int, device,
                         quiet: bool, seed: int = 0) -> dict:
    """The speed target: ``predict_mask`` (default settings) over a plain U-Net forward.

    For each real image (decoded once), ``predict_mask(image, model)`` with the checkpoint's
    defaults (flips, normal-scan gate; preprocessing, model, resize back) and one forward of
    the plain base-16, depth-4 U-Net (:data:`REF_CONFIG`) on a (1, 1, 256, 256) tensor are
    timed one right after the other, in random order, ``rounds`` times.

    Returns
    -------
    dict
        ``predict_s`` and ``reference_s`` (seconds per call, lists), ``ratio`` (median of
        predict_s / median of reference_s), ``pair_ratio_median`` (median of the per-pair
        ratios), ``target`` (0.8), ``passed`` (bool).
    """
    import torch

    from busseg.data import read_image
    from busseg.inference import load_model, predict_mask

    model = load_model(checkpoint, device=device)
    ref = build(REF, checkpoint).to(device)
    if torch.device(device).type in ("cpu", "cuda"):
        ref = ref.to(memory_format=torch.channels_last)  # as load_model does for ours
    x = torch.randn(1, 1, 256, 256, generator=torch.Generator().manual_seed(seed)).to(device)
    if torch.device(device).type in ("cpu", "cuda"):
        x = x.contiguous(memory_format=torch.channels_last)
    images = [read_image(p) for p in paths]
    rng = np.random.default_rng(seed)

    def run_ref():
        with torch.inference_mode():
            ref(x)
        _sync(device)

    predict_mask(images[0], model)  # warm-up
    run_ref()
    pred_s, ref_s = [], []
    for _ in range(rounds):
        for image in images:
            order = rng.permutation(2)
            times = [0.0, 0.0]
            for k in order:
                t = time.perf_counter()
                if k == 0:
                    predict_mask(image, model)
                    _sync(device)
                else:
                    run_ref()
                times[k] = time.perf_counter() - t
            pred_s.append(times[0])
            ref_s.append(times[1])
    ratio = float(np.median(pred_s) / np.median(ref_s))
    C.log(f"  predict_mask / plain U-Net 256x256: {ratio:.2f} (target <= "
          f"{TARGET_PREDICT_RATIO})", quiet)
    return {"predict_s": pred_s, "reference_s": ref_s, "ratio": ratio,
            "pair_ratio_median": float(np.median(np.asarray(pred_s) / np.asarray(ref_s))),
            "n_images": len(images), "rounds": rounds, "target": TARGET_PREDICT_RATIO,
            "passed": bool(ratio <= TARGET_PREDICT_RATIO)}


def _finetune_pairs(args, n: int) -> tuple[list, list, list[str]]:
    """``n`` corrected pairs: BUSI test-split lesion images with their ground-truth masks."""
    from busseg.data import discover_busi, read_image, read_mask
    from busseg.data.splits import read_split_csv, select_split

    recs = select_split(discover_busi(Path(args.busi)), read_split_csv(args.split), "test")
    recs = [r for r in recs if r.label != "normal"][:n]
    return ([read_image(r.image_path) for r in recs], [read_mask(r.mask_paths) for r in recs],
            [r.rel_path for r in recs])


def _finetune_once(checkpoint: Path, images, masks, names, steps: int, threads: int, device,
                   freeze_encoder: bool | None) -> tuple[float, float, Any]:
    import shutil
    import tempfile

    import torch

    from busseg.finetune import FinetuneSettings, finetune

    overrides: dict[str, Any] = {"max_steps": steps}
    if freeze_encoder is not None:
        overrides["freeze_encoder"] = bool(freeze_encoder)
    before = torch.get_num_threads()
    tmp = Path(tempfile.mkdtemp(prefix="busseg_speed_ft_"))
    try:
        torch.set_num_threads(threads)
        t, c = time.perf_counter(), time.process_time()
        res = finetune(images, masks, checkpoint, settings=FinetuneSettings.resolve(**overrides),
                       out_dir=tmp / "run", names=names, device=str(device))
        seconds, cpu = time.perf_counter() - t, time.process_time() - c
    finally:
        torch.set_num_threads(before)
        shutil.rmtree(tmp, ignore_errors=True)
    return seconds, cpu, res


def finetune_times(checkpoint: Path, images, masks, names, steps: int, threads: int,
                   device, quiet: bool, *, frozen: bool = True, repeats: int = 1
                   ) -> dict[str, dict]:
    """Wall time of :func:`busseg.finetune.finetune` with the widget's defaults and, with
    ``frozen``, with the encoder frozen (the widget's option), ``repeats`` times each,
    the two modes alternating so that load swings of a shared host hit both.

    Each run uses ``threads`` torch threads (restored afterwards) and writes its checkpoint
    into a temporary folder, deleted afterwards; the time includes building the datasets,
    the held-out Dice before and after, and writing the checkpoint, as a user waits for it.

    Returns
    -------
    dict
        ``{"default": row, "frozen": row}`` (``frozen`` only when asked and the default
        does not freeze already). A row: ``seconds`` (median over repeats), ``seconds_all``,
        ``repeats``, ``cpu_seconds`` (median process CPU time, all threads: on a busy
        shared host, CPU time / threads bounds the wall time of an idle machine from below),
        ``cpu_seconds_all``, ``freeze_encoder``, ``steps`` (taken), ``steps_asked``, ``n_images``,
        ``n_train``, ``n_val``, ``threads``, ``target`` (30 s; meaningful for 10 images, 100
        steps, 2 threads, the default mode) and ``passed``.
    """
    from busseg.finetune import FINETUNE_DEFAULTS

    default_frozen = bool(FINETUNE_DEFAULTS.get("freeze_encoder", False))
    modes = {"default": None}
    if frozen and not default_frozen:
        modes["frozen"] = True
    times: dict[str, list[float]] = {m: [] for m in modes}
    cpu_times: dict[str, list[float]] = {m: [] for m in modes}
    last: dict[str, Any] = {}
    for rep in range(max(1, int(repeats))):
        for mode, freeze in modes.items():
            seconds, cpu, res = _finetune_once(checkpoint, images, masks, names, steps,
                                               threads, device, freeze)
            times[mode].append(seconds)
            cpu_times[mode].append(cpu)
            last[mode] = res
            C.log(f"  fine-tune ({mode}) {len(images)} images, {steps} steps, {threads} "
                  f"threads, run {rep + 1}: {seconds:.1f} s wall, {cpu:.1f} s CPU (target <= "
                  f"{TARGET_FINETUNE_S:.0f} s wall)", quiet)
    out = {}
    for mode, freeze in modes.items():
        res = last[mode]
        med = float(np.median(times[mode]))
        steps_taken = getattr(res.fit, "steps", None)
        out[mode] = {
            "seconds": med, "seconds_all": times[mode], "repeats": len(times[mode]),
            "cpu_seconds": float(np.median(cpu_times[mode])), "cpu_seconds_all": cpu_times[mode],
            "freeze_encoder": default_frozen if freeze is None else bool(freeze),
            "steps": steps_taken if steps_taken is not None else steps, "steps_asked": steps,
            "n_images": len(images), "n_train": res.n_train, "n_val": res.n_val,
            "threads": threads, "target": TARGET_FINETUNE_S,
            "passed": bool(med <= TARGET_FINETUNE_S)}
    return out


def finetune_time(checkpoint: Path, images, masks, names, steps: int, threads: int,
                  device, quiet: bool) -> dict:
    """One fine-tune with the widget's defaults (:func:`finetune_times`'s ``default`` row)."""
    return finetune_times(checkpoint, images, masks, names, steps, threads, device, quiet,
                          frozen=False)["default"]


def _find_run_button(widget):
    """The Run push button of a magicgui Container or Qt widget (by text or name)."""
    try:
        from magicgui.widgets import PushButton

        stack = [widget]
        while stack:
            w = stack.pop()
            if isinstance(w, PushButton) and str(w.text).strip().lower() in ("run", "segment"):
                return w.native
            if hasattr(w, "__iter__") and not isinstance(w, (str, bytes)):
                try:
                    stack.extend(list(w))
                except TypeError:
                    pass
    except ImportError:  # pragma: no cover
        pass
    from qtpy.QtWidgets import QPushButton, QWidget

    native = getattr(widget, "native", widget)
    if isinstance(native, QWidget):
        for b in native.findChildren(QPushButton):
            if b.text().replace("&", "").strip().lower() in ("run", "segment"):
                return b
    raise RuntimeError("no Run button found in the Segment lesions widget")


def widget_probe(
    checkpoint: Path, image_path: Path, repeats: int, timeout: float, viewer: Any = None
) -> dict:
    """Run in a fresh process: click Run in *Segment lesions*, time until a Labels layer appears.

    The first click includes loading the model; later clicks reuse the widget's cached model.
    Before each click the widget's output layer is removed, so "appears" always means a new
    Labels layer inserted into the viewer (the viewer is not shown, so drawing is not timed).
    A ``viewer`` passed in (tests) is left open; otherwise one is made and closed.
    """
    import napari
    from qtpy.QtWidgets import QApplication

    from busseg.data import read_image

    image = read_image(image_path)
    _ensure_plugin()
    own = viewer is None
    viewer = napari.Viewer(show=False) if own else viewer
    try:
        viewer.add_image(image, name=image_path.stem)
        _dock, widget = viewer.window.add_plugin_dock_widget("napari-busseg", "Segment lesions")
        _set_widget_checkpoint(widget, checkpoint)
        button = _find_run_button(widget)
        app = QApplication.instance()
        times = []
        for _ in range(repeats):
            for lyr in [lyr for lyr in viewer.layers if isinstance(lyr, napari.layers.Labels)]:
                viewer.layers.remove(lyr)
            app.processEvents()
            seen: dict[str, float] = {}

            def _inserted(event, seen=seen):
                if isinstance(event.value, napari.layers.Labels) and "t" not in seen:
                    seen["t"] = time.perf_counter()

            viewer.layers.events.inserted.connect(_inserted)
            t0 = time.perf_counter()
            button.click()
            while "t" not in seen and time.perf_counter() - t0 < timeout:
                app.processEvents()
                time.sleep(0.001)
            viewer.layers.events.inserted.disconnect(_inserted)
            if "t" not in seen:
                raise RuntimeError(f"no Labels layer appeared within {timeout} s of clicking Run")
            times.append(seen["t"] - t0)
        return {"seconds": times, "image": str(image_path), "image_shape": list(image.shape)}
    finally:
        if own:
            viewer.close()


def _set_widget_checkpoint(widget, checkpoint: Path) -> None:
    """Point the widget at ``checkpoint`` (its public ``use_checkpoint``)."""
    if not hasattr(widget, "use_checkpoint"):
        raise RuntimeError("the Segment lesions widget has no use_checkpoint(path) method")
    widget.use_checkpoint(checkpoint)


def _ensure_plugin() -> None:
    """Make napari find the plugin in a source checkout (not pip-installed)."""
    from npe2 import PluginManager, PluginManifest

    import busseg

    pm = PluginManager.instance()
    if "napari-busseg" not in pm:
        pm.discover()
    if "napari-busseg" not in pm:
        pm.register(PluginManifest.from_file(Path(busseg.__file__).parent / "napari.yaml"))


def measure_widget(checkpoint: Path, image_path: Path, repeats: int, quiet: bool) -> dict:
    """Run :func:`widget_probe` in a subprocess under Xvfb (pytest-xvfb's PyVirtualDisplay)."""
    res = _run_probe("--probe-widget", "--probe-image", str(image_path),
                     "--checkpoint", str(checkpoint), "--widget-repeats", str(repeats))
    lines = [ln for ln in res.stdout.strip().splitlines() if ln.startswith("{")]
    if res.returncode != 0 or not lines:
        return {"error": (res.stderr.strip().splitlines() or ["no output"])[-1][:500]}
    out = json.loads(lines[-1])
    C.log(f"  widget: {', '.join(f'{t:.2f}' for t in out['seconds'])} s", quiet)
    return out


def _run_probe(*args: str) -> subprocess.CompletedProcess:
    """Run this script in a fresh interpreter with ``args`` (a probe), ``src`` first on the path.

    Returns the finished process: stdout and stderr captured as text, 900 s limit.
    """
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(C.REPO_ROOT / "src")] + [p for p in [env.get("PYTHONPATH")] if p]
    )
    return subprocess.run([sys.executable, str(Path(__file__).resolve()), *args],
                          capture_output=True, text=True, env=env, timeout=900)


def _with_display(fn):
    """Call ``fn`` with a display: the current one, else a virtual X server (Xvfb)."""
    if os.environ.get("DISPLAY") or os.environ.get("QT_QPA_PLATFORM"):
        return fn()
    from pyvirtualdisplay import Display

    with Display(visible=False, size=(1280, 1024)):
        return fn()


# --------------------------------------------------------------------------- report


def _ms(x: float) -> str:
    return C.fmt(1000 * x, 1) if x is not None and math.isfinite(x) else "–"


def _ratio(peer: float, ours: float) -> str:
    if not (math.isfinite(peer) and math.isfinite(ours)) or ours <= 0:
        return "–"
    return f"{peer / ours:.2f}"


def target_markdown(target: dict | None, ft: dict | None,
                    ft_frozen: dict | None = None) -> list[str]:
    """The two targets as Markdown lines (empty when neither was measured)."""
    if target is None and ft is None:
        return []
    md = ["", "## Issue targets (measured in this run)", "",
          "| Target | Measured | Limit | Met |", "|---|---:|---:|---|"]
    if target is not None:
        q50 = C.median_iqr(target["predict_s"])[0]
        r50 = C.median_iqr(target["reference_s"])[0]
        md.append(
            f"| whole `predict_mask` (default settings; {target['n_images']} BUSI images x "
            f"{target['rounds']}) / plain base-16 U-Net forward at 256x256, batch 1 "
            f"({_ms(q50)} ms / {_ms(r50)} ms; per-pair median "
            f"{target['pair_ratio_median']:.2f}) | {target['ratio']:.2f} | "
            f"<= {target['target']} | {'yes' if target['passed'] else '**no**'} |")
    def reps(row):
        n = row.get("repeats", 1)
        if n <= 1:
            return ""
        return (f"; median of {n} runs: "
                + ", ".join(f"{v:.1f}" for v in row.get("seconds_all", [])) + " s")

    def cpu(row):
        return (f"; CPU time {row['cpu_seconds']:.1f} s" if row.get("cpu_seconds") is not None
                else "")

    if ft is not None:
        whole = "encoder frozen" if ft.get("freeze_encoder") else "whole network"
        md.append(
            f"| fine-tune (`busseg.finetune`, widget settings: {whole}) on {ft['n_images']} "
            f"corrected images ({ft['n_train']} train / {ft['n_val']} held out), "
            f"{ft['steps_asked']} steps, {ft['threads']} threads, checkpoint written"
            f"{reps(ft)}{cpu(ft)} | {ft['seconds']:.1f} s | "
            f"<= {ft['target']:.0f} s | {'yes' if ft['passed'] else '**no**'}"
            + ("" if (ft["n_images"], ft["steps_asked"], ft["threads"]) == (10, 100, 2)
               else " (not the target's setting)") + " |")
    if ft_frozen is not None:
        md.append(
            "| for comparison: the same with the encoder frozen (the widget's option)"
            f"{reps(ft_frozen)}{cpu(ft_frozen)} | {ft_frozen['seconds']:.1f} s | (none) | – |")
    return md


def render(result: dict) -> str:
    hw = result["hardware"]
    md = [
        "# Speed: our U-Net beside MONAI peers, and the whole pipeline",
        "",
        C.hardware_markdown(hw),
        "",
        C.checkpoint_markdown(result["checkpoint"]),
        f"MONAI {result['monai'] or 'not installed (peer rows skipped)'}. "
        f"Wall time {result['seconds']:.0f} s.",
        "",
    ]
    if result["quick"]:
        md += ["**Quick run: too few rounds for a result.**", ""]
    md += [
        "Ratios are peer / ours of the time per image (> 1: ours is faster) and of the "
        "parameter count and memory (> 1: ours is smaller). Medians with the "
        "interquartile range [25th, 75th percentile] over rounds; within each round the "
        "models run in shuffled order, so load swings on the shared host hit all alike.",
        "",
        "MONAI BasicUNet is the like-for-like peer (two 3x3 conv + norm + activation per "
        "level, max-pool, transposed-conv up-sampling, same widths). MONAI UNet is a lighter "
        "design at the same widths: one strided 3x3 conv per encoder level instead of two "
        "convs and a max-pool (plus a residual unit each with num_res_units=2), so it "
        "computes much less per image.",
        "",
        "## Models",
        "",
        "| Model | Definition | Parameters | Peer / ours |",
        "|---|---|---:|---:|",
    ]
    p_ours = result["params"][OURS]
    for m, d in result["definitions"].items():
        p = result["params"][m]
        md.append(f"| {_LABELS[m]} | `{d}` | {p:,} | {_ratio(p, p_ours)} |")
    lat = result["latency"]
    md += [
        "",
        f"## Inference latency per image ({lat['rounds']} rounds, {lat['warmup']} warm-up)",
        "",
        "| Input | Batch | Model | ms / image (median) | IQR (ms) | Peer / ours |",
        "|---|---:|---|---:|---:|---:|",
    ]
    for row in lat["rows"]:
        md.append(
            f"| {row['size'][0]}x{row['size'][1]} | {row['batch']} | {_LABELS[row['model']]}"
            f" | {_ms(row['median'])} | {_ms(row['q25'])}–{_ms(row['q75'])} | "
            f"{row['ratio']} |"
        )
    tr = result.get("training")
    if tr:
        md += [
            "",
            f"## Training throughput (batch {tr['batch']}, {tr['size'][0]}x"
            f"{tr['size'][1]}, BCE + Dice, AdamW; {tr['rounds']} rounds)",
            "",
            "| Model | Images / s (median) | Step time IQR (s) | Peer / ours (time) |",
            "|---|---:|---:|---:|",
        ]
        for row in tr["rows"]:
            md.append(
                f"| {_LABELS[row['model']]} | {C.fmt(row['images_per_s'], 1)} | "
                f"{C.fmt(row['q25'], 2)}–{C.fmt(row['q75'], 2)} | {row['ratio']} |"
            )
    mem = result.get("memory")
    if mem:
        md += [
            "",
            f"## Peak memory ({mem[0]['method']})",
            "",
            "| Model | Mode | Input | Batch | Peak increase (MiB) | Peer / ours |",
            "|---|---|---|---:|---:|---:|",
        ]
        ours_mem = {r["mode"]: r["increase_mib"] for r in mem if r["model"] == OURS}
        for r in mem:
            md.append(
                f"| {_LABELS[r['model']]} | {r['mode']} | {r['size'][0]}x{r['size'][1]} | "
                f"{r['batch']} | {C.fmt(r['increase_mib'], 1)} | "
                f"{_ratio(r['increase_mib'], ours_mem.get(r['mode'], math.nan))} |"
            )
    e2e = result.get("e2e")
    if e2e:
        md += [
            "",
            f"## Whole `predict_mask` on real BUSI images ({e2e['n_images']} images x "
            f"{e2e['rounds']} rounds, median size {e2e['median_width']:.0f}x"
            f"{e2e['median_height']:.0f} px)",
            "",
            "| Stage | ms / image (median) | IQR (ms) |",
            "|---|---:|---:|",
        ]
        for key, label in (
            ("decode_s", "decode PNG (read_image)"),
            ("predict_s", "predict_mask (preprocess, model, resize back)"),
            ("total_s", "total"),
        ):
            q50, q25, q75 = C.median_iqr(e2e[key])
            md.append(f"| {label} | {_ms(q50)} | {_ms(q25)}–{_ms(q75)} |")
    md += target_markdown(result.get("target"), result.get("finetune"),
                          result.get("finetune_frozen"))
    w = result.get("widget")
    md += ["", "## Segment lesions widget: click Run -> Labels layer appears", ""]
    if w is None:
        md += ["Not measured (pass `--widget`; needs napari, the plugin manifest and Xvfb)."]
    elif "error" in w:
        md += [f"Not measured: {w['error']}"]
    else:
        s = w["seconds"]
        warm = C.median_iqr(s[1:]) if len(s) > 1 else (math.nan,) * 3
        md += [
            "| Click | seconds |",
            "|---|---:|",
            f"| first (includes loading the model) | {C.fmt(s[0], 2)} |",
            f"| later, median of {len(s) - 1} | {C.fmt(warm[0], 2)} "
            f"[{C.fmt(warm[1], 2)}, {C.fmt(warm[2], 2)}] |",
        ]
    return "\n".join(md) + "\n"


def make_figure(result: dict):
    fig, axes = C.new_figure(1, 3, size=(5.0, 3.8))
    lat = result["latency"]["rows"]
    models = list(result["definitions"])
    confs = sorted({(tuple(r["size"]), r["batch"]) for r in lat})
    ax = axes[0][0]
    width = 0.8 / max(1, len(models))
    for j, m in enumerate(models):
        rows = [
            next(r for r in lat if r["model"] == m and tuple(r["size"]) == s and r["batch"] == b)
            for s, b in confs
        ]
        med = np.array([1000 * r["median"] for r in rows])
        err = np.array(
            [
                [1000 * (r["median"] - r["q25"]) for r in rows],
                [1000 * (r["q75"] - r["median"]) for r in rows],
            ]
        )
        ax.bar(np.arange(len(confs)) + j * width, med, width, yerr=err, label=_LABELS[m], capsize=2)
    ax.set_xticks(
        np.arange(len(confs)) + width * (len(models) - 1) / 2,
        [f"{s[0]}x{s[1]}\nbatch {b}" for s, b in confs],
        fontsize=8,
    )
    ax.set_ylabel("ms per image (median, IQR)")
    ax.set_title("Inference latency", fontsize=9)
    ax.legend(fontsize=7)
    ax = axes[0][1]
    tr = result.get("training")
    if tr:
        ax.bar(
            [_LABELS[r["model"]].replace(" (", "\n(") for r in tr["rows"]],
            [r["images_per_s"] for r in tr["rows"]],
        )
        ax.tick_params(axis="x", labelsize=7)
        ax.set_ylabel("images / s")
        ax.set_title(f"Training throughput (batch {tr['batch']})", fontsize=9)
    ax = axes[0][2]
    mem = result.get("memory")
    if mem:
        for k, mode in enumerate(("infer", "train")):
            rows = [r for r in mem if r["mode"] == mode]
            ax.bar(
                np.arange(len(rows)) + 0.4 * k,
                [r["increase_mib"] for r in rows],
                0.4,
                label=f"{mode} (batch {rows[0]['batch']})" if rows else mode,
            )
        names = [r["model"] for r in mem if r["mode"] == "infer"]
        ax.set_xticks(
            np.arange(len(names)) + 0.2,
            [_LABELS[n].replace(" (", "\n(") for n in names],
            fontsize=7,
        )
        ax.set_ylabel("peak memory increase (MiB)")
        ax.set_title("Peak memory", fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = C.argument_parser(__doc__)
    p.add_argument(
        "--busi",
        default=str(C.DEFAULT_BUSI),
        help="BUSI folder for the predict_mask timing (default ../shared/data/...)",
    )
    p.add_argument(
        "--split",
        default=str(C.DEFAULT_SPLIT),
        help="split CSV; predict_mask is timed on test-split images",
    )
    p.add_argument(
        "--sizes",
        type=int,
        nargs="+",
        default=None,
        help="square input sides for the latency table (default: 256 and the "
        "checkpoint's input size)",
    )
    p.add_argument(
        "--batches",
        type=int,
        nargs="+",
        default=[1, 16],
        help="batch sizes for the latency table (default 1 16)",
    )
    p.add_argument("--rounds", type=int, default=15, help="measured latency rounds (default 15)")
    p.add_argument("--warmup", type=int, default=2, help="unmeasured warm-up rounds (default 2)")
    p.add_argument("--train-batch", type=int, default=8, help="training batch (default 8)")
    p.add_argument("--train-rounds", type=int, default=8, help="measured training rounds")
    p.add_argument(
        "--e2e-images",
        type=int,
        default=20,
        help="BUSI test images for the predict_mask timing (default 20; 0 skips)",
    )
    p.add_argument("--e2e-rounds", type=int, default=3, help="passes over those images")
    p.add_argument("--no-monai", action="store_true", help="no MONAI peers")
    p.add_argument("--old-checkpoint", default=None, metavar="DIR",
                   help="the previous default model, measured beside the checkpoint (e.g. "
                   "extracted from git at af83f33:src/busseg/weights/default)")
    p.add_argument("--target-rounds", type=int, default=3,
                   help="passes over the images for the predict_mask / plain U-Net target "
                   "(default 3; 0 skips)")
    p.add_argument("--no-finetune", action="store_true", help="skip the fine-tune timing")
    p.add_argument("--finetune-images", type=int, default=10,
                   help="corrected images to fine-tune on (default 10, as in the target)")
    p.add_argument("--finetune-steps", type=int, default=100, help="fine-tune steps (100)")
    p.add_argument("--finetune-threads", type=int, default=2, help="torch threads (2)")
    p.add_argument("--finetune-repeats", type=int, default=3,
                   help="fine-tunes per mode; the median is reported (default 3)")
    p.add_argument("--no-finetune-frozen", action="store_true",
                   help="skip the frozen-encoder fine-tune timing (for comparison)")
    p.add_argument("--no-train", action="store_true", help="skip training throughput")
    p.add_argument("--no-memory", action="store_true", help="skip peak memory")
    p.add_argument(
        "--memory-models",
        nargs="+",
        default=None,
        help="measure peak memory only for these models (default: all)",
    )
    p.add_argument(
        "--memory-modes",
        nargs="+",
        default=["infer", "train"],
        choices=["infer", "train"],
        help="memory for inference and/or training",
    )
    p.add_argument(
        "--widget",
        action="store_true",
        help="also time the Segment lesions widget (napari, manifest, Xvfb)",
    )
    p.add_argument("--widget-repeats", type=int, default=4, help="clicks (first is cold)")
    p.add_argument("--widget-timeout", type=float, default=120.0, help="seconds per click")
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: 2 rounds, 1 warm-up, batches 1 2, train batch 2, 2 images",
    )
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    C.add_common_args(p)
    # internal: the subprocess probes
    p.add_argument("--probe-memory", default=None, help=argparse.SUPPRESS)
    p.add_argument("--probe-mode", default="infer", help=argparse.SUPPRESS)
    p.add_argument("--probe-size", type=int, nargs=2, default=None, help=argparse.SUPPRESS)
    p.add_argument("--probe-batch", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--probe-widget", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--probe-image", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.rounds, args.warmup, args.train_rounds = 2, 1, 2
        args.batches, args.train_batch = [1, 2], 2
        args.e2e_images, args.e2e_rounds = min(args.e2e_images, 2), 1
        args.widget_repeats = min(args.widget_repeats, 2)
        args.target_rounds = min(args.target_rounds, 1)
        args.finetune_images, args.finetune_steps = min(args.finetune_images, 2), 2
        args.finetune_repeats = 1
    return args


def _e2e_paths(args, n: int) -> list[Path]:
    busi = Path(args.busi)
    if n <= 0 or not busi.is_dir() or not Path(args.split).is_file():
        return []
    from busseg.data import discover_busi
    from busseg.data.splits import read_split_csv, select_split

    recs = select_split(discover_busi(busi), read_split_csv(args.split), "test")
    # lesion and normal images alternately, in split order
    lesion = [r for r in recs if r.label != "normal"]
    normal = [r for r in recs if r.label == "normal"]
    picked = lesion[: n - n // 4] + normal[: n // 4]
    return [r.image_path for r in picked][:n]


def _probe_mode(args) -> bool:
    """Run a memory or widget probe when asked to (``--probe-memory``, ``--probe-widget``).

    Prints its JSON row for the parent process; returns False when neither was asked for.
    """
    if args.probe_memory:  # subprocess mode
        ckpt = C.resolve_checkpoint(args.checkpoint)
        row = memory_probe(
            args.probe_memory,
            ckpt,
            args.probe_mode,
            tuple(args.probe_size),
            args.probe_batch,
            args.threads,
        )
        print(json.dumps(row))
        return True
    if args.probe_widget:  # subprocess mode
        ckpt = C.resolve_checkpoint(args.checkpoint)
        out = _with_display(
            lambda: widget_probe(
                ckpt, Path(args.probe_image), args.widget_repeats, args.widget_timeout
            )
        )
        print(json.dumps(out))
        return True
    return False


def _latency_rows(lat: dict, sizes, batches, models) -> list[dict]:
    """Median, quartiles and ratio to ours of the latency of each (model, size, batch)."""
    lat_rows = []
    for s in sizes:
        for bt in batches:
            ours_med = C.median_iqr(lat[(OURS, s, bt)])[0]
            for m in models:
                q50, q25, q75 = C.median_iqr(lat[(m, s, bt)])
                lat_rows.append(
                    {
                        "model": m,
                        "size": list(s),
                        "batch": bt,
                        "median": q50,
                        "q25": q25,
                        "q75": q75,
                        "ratio": _ratio(q50, ours_med),
                        "seconds_per_image": lat[(m, s, bt)],
                    }
                )
    return lat_rows


def _training_speed(args, models: dict, in_size, device) -> dict:
    """Time training steps of every model at the checkpoint's input size."""
    steps = train_rounds(
        models,
        in_size,
        args.train_batch,
        args.train_rounds,
        max(1, args.warmup // 2),
        device,
        quiet=args.quiet,
    )
    ours_step = C.median_iqr(steps[OURS])[0]
    rows = []
    for m, st in steps.items():
        q50, q25, q75 = C.median_iqr(st)
        rows.append(
            {
                "model": m,
                "images_per_s": args.train_batch / q50,
                "median": q50,
                "q25": q25,
                "q75": q75,
                "ratio": _ratio(q50, ours_step),
                "step_seconds": st,
            }
        )
    return {
        "batch": args.train_batch,
        "size": list(in_size),
        "rounds": args.train_rounds,
        "rows": rows,
    }


def _widget_latency(args, ckpt: Path, paths) -> dict:
    """Time the Segment lesions widget on the first BUSI image (or a shipped sample)."""
    image = (
        paths[0]
        if paths
        else next(
            (C.REPO_ROOT / "src" / "busseg" / "samples" / "benign").glob("* (*).png"), None
        )
    )
    if image is None:
        return {"error": "no image to segment (pass --busi)"}
    return measure_widget(ckpt, Path(image), args.widget_repeats, args.quiet)


def main(argv: Sequence[str] | None = None) -> dict | None:
    """Run the benchmark; return the JSON payload (also written to ``--out``)."""
    args = parse_args(argv)
    if _probe_mode(args):  # a subprocess of measure_memory or measure_widget
        return None

    import torch

    from busseg.devices import get_device
    from busseg.models import read_checkpoint_config

    threads, ckpt = C.threads_and_checkpoint(args)
    device = get_device(args.device)
    cfg = read_checkpoint_config(ckpt)
    in_size = tuple(int(v) for v in cfg["preprocessing"]["input_size"])
    sizes = sorted(
        {(s, s) for s in args.sizes} if args.sizes else {(256, 256), in_size}, reverse=True
    )
    t_start = time.perf_counter()

    old = C.resolve_checkpoint(args.old_checkpoint) if args.old_checkpoint else None
    ckpts = {OLD: old} if old is not None else {}
    old_cfg = read_checkpoint_config(old)["model"] if old is not None else None
    definitions = model_definitions(cfg["model"], old_cfg)
    if args.no_monai:
        definitions = {k: v for k, v in definitions.items() if k not in PEERS}
    mv = monai_version()
    if mv is None and not args.no_monai:
        C.log("MONAI is not installed (pip install monai): MONAI rows skipped", args.quiet)
    models = {m: build(m, ckpts.get(m, ckpt)).to(device) for m in definitions}
    params = {m: n_params(net) for m, net in models.items()}
    C.log(f"threads {threads}; device {device}; models {list(models)}; sizes {sizes}", args.quiet)

    lat = latency_rounds(
        models, sizes, args.batches, args.rounds, args.warmup, device, quiet=args.quiet
    )
    lat_rows = _latency_rows(lat, sizes, args.batches, models)

    training = None if args.no_train else _training_speed(args, models, in_size, device)

    memory = None
    if not args.no_memory:
        names = [m for m in models if args.memory_models is None or m in args.memory_models]
        memory = measure_memory(
            names, ckpt, in_size, args.train_batch, threads, device, args.quiet, args.memory_modes,
            checkpoints=ckpts,
        )

    e2e = None
    paths = _e2e_paths(args, args.e2e_images)
    if paths:
        e2e = e2e_predict(ckpt, paths, args.e2e_rounds, device, args.quiet)
    elif args.e2e_images > 0:
        C.log("BUSI not found: predict_mask timing skipped (pass --busi)", args.quiet)

    target = None
    if paths and args.target_rounds > 0:
        target = target_predict_ratio(ckpt, paths, args.target_rounds, device, args.quiet)
    finetune_row = finetune_frozen = None
    if not args.no_finetune:
        if Path(args.busi).is_dir() and Path(args.split).is_file():
            images, masks, names = _finetune_pairs(args, args.finetune_images)
            ft_rows = finetune_times(ckpt, images, masks, names, args.finetune_steps,
                                     args.finetune_threads, device, args.quiet,
                                     frozen=not args.no_finetune_frozen,
                                     repeats=args.finetune_repeats)
            finetune_row, finetune_frozen = ft_rows["default"], ft_rows.get("frozen")
        else:
            C.log("BUSI not found: fine-tune timing skipped (pass --busi)", args.quiet)

    widget = _widget_latency(args, ckpt, paths) if args.widget else None

    result = {
        "benchmark": NAME,
        "hardware": C.hardware_info(device),
        "checkpoint": C.checkpoint_summary(ckpt),
        "monai": mv if not args.no_monai else None,
        "torch": torch.__version__,
        "quick": bool(args.quick),
        "args": vars(args),
        "seconds": time.perf_counter() - t_start,
        "definitions": definitions,
        "params": params,
        "latency": {"rounds": args.rounds, "warmup": args.warmup, "rows": lat_rows},
        "training": training,
        "memory": memory,
        "e2e": e2e,
        "target": target,
        "finetune": finetune_row,
        "finetune_frozen": finetune_frozen,
        "old_checkpoint": C.checkpoint_summary(old) if old is not None else None,
        "widget": widget,
    }
    markdown = render(result)
    fig = make_figure(result)
    written = C.write_results(args.out, NAME, markdown, result, fig)
    print(markdown)
    C.log(f"wrote {', '.join(str(p) for p in written.values())}", args.quiet)
    return result


if __name__ == "__main__":
    main()
