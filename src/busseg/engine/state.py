"""What a run folder holds: the log, checkpoints, and the state a run is resumed from.

A run folder (``out_dir`` of :func:`busseg.engine.fit_iter`) holds ``log.csv`` (one row per
validation, :func:`append_log`), ``best/`` and ``evals/step_NNNNNN/`` (self-describing
checkpoints, :func:`save_weights`) and ``last/`` (resumable training state: weights, optimiser
moments, weight average and schedule, :func:`save_training_state`, read back by
:func:`load_training_state` and :func:`resume_state`). Tensors go to safetensors and scalars to
JSON: nothing is pickled.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Any

import torch

from busseg.engine.config import LOG_COLUMNS, TrainConfig


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Return detached copies of a model's state dict (weights and buffers).

    Parameters
    ----------
    model : torch.nn.Module
        The model to copy.

    Returns
    -------
    dict of str to torch.Tensor
        Copies on the model's device, unaffected by further training.
    """
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def append_log(path: Path, row: dict) -> None:
    """Append one validation row to a run's CSV log (header first), flushed to disk.

    Parameters
    ----------
    path : pathlib.Path
        The ``log.csv`` file; created with a header row if absent.
    row : dict
        Values by ``busseg.engine.LOG_COLUMNS`` name; missing columns are left empty.
    """
    new = not path.exists()
    with open(path, "a", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=LOG_COLUMNS, lineterminator="\n")
        if new:
            w.writeheader()
        w.writerow({k: row.get(k) for k in LOG_COLUMNS})
        fh.flush()
        os.fsync(fh.fileno())


def save_weights(path: Path, model: torch.nn.Module, weights: dict[str, torch.Tensor],
                 cfg: TrainConfig, checkpoint_config: dict | None, best: float | None,
                 best_step: int, best_epoch: int, elapsed: float, history: list[dict]) -> Path:
    """Write validated weights as a self-describing checkpoint.

    Parameters
    ----------
    path : pathlib.Path
        The checkpoint folder (``best/`` or ``evals/step_NNNNNN/``); replaced if present.
    model : torch.nn.Module
        The trained model; its ``busseg_model_config`` (or ``checkpoint_config["model"]``)
        rebuilds the architecture.
    weights : dict of str to torch.Tensor
        The state dict to save (e.g. the weight average's).
    cfg : TrainConfig
        Saved as ``training.hyperparameters``.
    checkpoint_config : dict or None
        Config sections written as they are (preprocessing, training data, lineage).
    best : float or None
        Selection score of these weights (``metrics.val_dice`` when the history has no row
        of ``best_step``).
    best_step, best_epoch : int
        When these weights were validated.
    elapsed : float
        Training seconds so far (``training.train_time_s``).
    history : list of dict
        The validation rows; the row of ``best_step`` gives ``metrics``.

    Returns
    -------
    pathlib.Path
        The checkpoint folder written (:func:`busseg.models.save_checkpoint`).
    """
    from busseg.models import build_model, save_checkpoint

    config = dict(checkpoint_config or {})
    model_cfg = getattr(model, "busseg_model_config", None) or config.get("model")
    saved = build_model(model_cfg)
    saved.load_state_dict({k: v.cpu() for k, v in weights.items()})
    training = dict(config.get("training", {}))
    training.update(hyperparameters=cfg.to_dict(), best_step=best_step, best_epoch=best_epoch,
                    train_time_s=round(elapsed, 1))
    config["training"] = training
    metrics = dict(config.get("metrics", {}))
    last = next((r for r in reversed(history) if r["step"] == best_step), {})
    metrics.update(val_dice=last.get("val_dice", best), val_dice_lesion=last.get("val_dice_lesion"),
                   val_fp_rate_normal=last.get("val_fp_rate_normal"),
                   val_dice_box=last.get("val_dice_box"),
                   val_auc_normal=last.get("val_auc_normal"),
                   val_interactions=last.get("val_interactions"),
                   selected_on=cfg.select_metric)
    config["metrics"] = metrics
    config["model"] = model_cfg
    return save_checkpoint(path, saved, config, overwrite=True)


def save_training_state(path: Path, model: torch.nn.Module, optimizer, scheduler, state: dict,
                        ema=None) -> None:
    """Write resumable state: weights and optimiser tensors in safetensors, scalars in JSON.

    Parameters
    ----------
    path : pathlib.Path
        The ``last/`` folder; ``training_state.safetensors`` and ``training_state.json`` are
        replaced atomically.
    model : torch.nn.Module
        The raw (not averaged) trained weights.
    optimizer : torch.optim.Optimizer
        Its moments go to safetensors, its parameter groups and step counts to JSON.
    scheduler : torch.optim.lr_scheduler.LambdaLR
        Its position (the lambdas are code, rebuilt from the config, and not saved).
    state : dict
        JSON-serialisable loop state (step, epoch, selection, history) stored as it is.
    ema : torch.optim.swa_utils.AveragedModel, optional
        The weight average, saved under ``ema.``.
    """
    from safetensors.torch import save_file

    from busseg.data.io import atomic_write_bytes

    tensors: dict[str, torch.Tensor] = {}
    for k, v in model.state_dict().items():
        tensors[f"model.{k}"] = v.detach().cpu().contiguous()
    opt = optimizer.state_dict()
    scalars: dict[str, Any] = {"param_groups": opt["param_groups"], "opt_scalars": {}}
    for pid, st in opt["state"].items():
        for name, val in st.items():
            if torch.is_tensor(val) and val.ndim > 0:
                tensors[f"opt.{pid}.{name}"] = val.detach().cpu().contiguous()
            else:
                scalars["opt_scalars"][f"{pid}.{name}"] = float(val)
    if ema is not None:
        for k, v in ema.state_dict().items():
            tensors[f"ema.{k}"] = v.detach().cpu().contiguous()
    scalars["scheduler"] = scheduler.state_dict()
    scalars["scheduler"].pop("lr_lambdas", None)
    scalars.update(state)
    path.mkdir(parents=True, exist_ok=True)
    tmp = path / ".training_state.safetensors.tmp"
    save_file(tensors, str(tmp))
    os.replace(tmp, path / "training_state.safetensors")
    atomic_write_bytes(path / "training_state.json", json.dumps(scalars, default=float).encode(),
                       overwrite=True)


def load_training_state(path: Path, model: torch.nn.Module, optimizer, scheduler,
                        ema=None) -> dict:
    """Load the state :func:`save_training_state` wrote into a freshly set-up run.

    Parameters
    ----------
    path : pathlib.Path
        The ``last/`` folder of the run.
    model, optimizer, scheduler, ema
        As given to :func:`save_training_state`, built with the same settings; loaded in
        place.

    Returns
    -------
    dict
        The JSON scalars, the loop state saved by the run among them.

    Raises
    ------
    FileNotFoundError
        If the folder holds no resumable state.
    ValueError
        If ``ema`` is given but the run was trained without a weight average.
    """
    from safetensors.torch import load_file

    st_path, js_path = path / "training_state.safetensors", path / "training_state.json"
    if not st_path.is_file() or not js_path.is_file():
        raise FileNotFoundError(
            f"no resumable state in {path}: expected training_state.safetensors and "
            "training_state.json, written by an earlier run with the same out_dir"
        )
    tensors = load_file(str(st_path))
    scalars = json.loads(js_path.read_text())
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    if ema is not None:
        ema_state = {k[4:]: v for k, v in tensors.items() if k.startswith("ema.")}
        if not ema_state:
            raise ValueError(f"{path} holds no weight average: the run was trained without "
                             "ema_decay; resume it with the same settings")
        ema.load_state_dict(ema_state)
    opt_state: dict[int, dict] = {}
    for k, v in tensors.items():
        if k.startswith("opt."):
            _, pid, name = k.split(".", 2)
            opt_state.setdefault(int(pid), {})[name] = v
    for k, v in scalars["opt_scalars"].items():
        pid, name = k.split(".", 1)
        opt_state.setdefault(int(pid), {})[name] = torch.tensor(v)
    optimizer.load_state_dict({"state": opt_state, "param_groups": scalars["param_groups"]})
    sched = dict(scalars["scheduler"])
    # the lambdas are code, not state: they are rebuilt from the TrainConfig, so none is saved
    sched.setdefault("lr_lambdas", [None] * len(optimizer.param_groups))
    scheduler.load_state_dict(sched)
    return scalars


def resume_state(out: Path, model: torch.nn.Module, optimizer, scheduler, ema=None) -> dict:
    """Load a run folder's ``last/`` state and its best weights, to continue the run.

    Parameters
    ----------
    out : pathlib.Path
        The run folder.
    model, optimizer, scheduler, ema
        As :func:`load_training_state` (loaded in place).

    Returns
    -------
    dict
        ``step``, ``epoch`` (the last epoch whose end was reached), ``best``, ``best_step``,
        ``best_epoch``, ``bad`` (validations since the best), ``elapsed`` (seconds),
        ``history`` (validation rows) and ``best_state`` (the weights of ``best/``, or None
        when the run saved none).
    """
    st = load_training_state(out / "last", model, optimizer, scheduler, ema)
    best_state = None
    if (out / "best").is_dir():
        from busseg.models import load_checkpoint

        best_model, _ = load_checkpoint(out / "best")
        best_state = best_model.state_dict()
    return {"step": int(st["step"]), "epoch": int(st["epoch"]), "best": st["best"],
            "best_step": st["best_step"], "best_epoch": st["best_epoch"], "bad": st["bad"],
            "elapsed": float(st.get("elapsed", 0.0)), "history": st.get("history", []),
            "best_state": best_state}
