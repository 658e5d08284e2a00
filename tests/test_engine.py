import csv
import threading

import numpy as np
import pytest
import torch
from PIL import Image

from busseg.data.dataset import SegmentationDataset
from busseg.engine import (
    LOG_COLUMNS,
    FitResult,
    ProgressEvent,
    TrainConfig,
    drain,
    evaluate_dataset,
    fit,
    fit_iter,
    lr_lambda,
)
from busseg.models import build_model, load_checkpoint

TINY = {"base_channels": 4, "depth": 2}
CKPT_CONFIG = {
    "preprocessing": {"input_size": [32, 32], "grey": True, "normalize": "zscore"},
    "training": {"data": "synthetic"},
    "lineage": {"base_model": None, "pairs": []},
}


@pytest.fixture
def four(synthetic_pairs):
    images, masks = synthetic_pairs(4, size=(32, 32))
    return SegmentationDataset(images, masks, (32, 32))


def _model(seed=0, **extra):
    torch.manual_seed(seed)
    return build_model({**TINY, **extra})


def _cfg(**kw):
    base = dict(batch_size=2, lr=1e-2, warmup_steps=0, early_stopping=None, seed=0)
    return TrainConfig(**{**base, **kw})


def test_tiny_model_overfits_four_images(four):
    model = _model()
    before = evaluate_dataset(model, four)["mean_dice"]
    events = []
    cfg = _cfg(max_steps=40, batch_size=4, lr=2e-2, eval_every_steps=10)  # robust over seeds
    result = fit(model, four, four, cfg, device="cpu", callback=events.append)
    assert isinstance(result, FitResult) and result.steps == 40
    kinds = [e.kind for e in events]
    assert kinds[0] == "start" and kinds[-1] == "end"
    assert kinds.count("step") == 40 and kinds.count("eval") == 4
    losses = [e.loss for e in events if e.kind == "step"]
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5])
    dices = [h["val_dice"] for h in result.history]
    assert dices[-1] > max(0.8, before + 0.3), (before, dices)
    assert result.best_val_dice == max(dices)
    assert [h["step"] for h in result.history] == [10, 20, 30, 40]
    assert not result.model.training  # returned in eval mode with the best weights
    after = evaluate_dataset(result.model, four)["mean_dice"]
    assert after == pytest.approx(result.best_val_dice, abs=1e-6)
    assert all(isinstance(e, ProgressEvent) and e.total_steps == 40 for e in events)


def test_stop_flag_stops_after_the_current_step(four):
    stop = threading.Event()
    gen = fit_iter(_model(), four, four, _cfg(epochs=50), device="cpu", stop=stop)
    seen = []

    def on_event(ev):
        seen.append(ev)
        if ev.kind == "step" and ev.step == 3:
            stop.set()

    result = drain(gen, on_event)
    assert result.stopped and not result.early_stopped
    assert result.steps == 3
    assert [e.step for e in seen if e.kind == "step"] == [1, 2, 3]
    assert seen[-1].kind == "end" and "stopped" in seen[-1].message
    assert result.best_val_dice is not None  # epoch 1 (steps 1-2) was validated
    # the stop request validates the step done since: the result is never older than step 3
    assert [h["step"] for h in result.history] == [2, 3]


def test_stop_before_the_first_step_returns_the_initial_weights(four, tmp_path):
    stop = threading.Event()
    stop.set()
    model = _model()
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    result = fit(model, four, four, _cfg(epochs=3), device="cpu", stop=stop,
                 out_dir=tmp_path / "run", checkpoint_config=CKPT_CONFIG)
    assert result.stopped and result.steps == 0 and result.history == []
    assert result.checkpoint is None
    assert not (tmp_path / "run").exists()  # nothing written: no empty run folder left behind
    kept = tmp_path / "mine"
    kept.mkdir()  # a folder the caller made is the caller's: it stays
    fit(_model(), four, four, _cfg(epochs=3), device="cpu", stop=stop, out_dir=kept)
    assert kept.is_dir()
    for k, v in result.model.state_dict().items():
        torch.testing.assert_close(v, initial[k])


def test_run_folder_outputs(four, tmp_path):
    out = tmp_path / "run"
    result = fit(
        _model(),
        four,
        four,
        _cfg(epochs=3),
        device="cpu",
        out_dir=out,
        checkpoint_config=CKPT_CONFIG,
    )
    assert result.checkpoint == out / "best"
    assert sorted(p.name for p in out.iterdir()) == ["best", "curves.png", "last", "log.csv"]
    with open(out / "log.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert tuple(rows[0]) == LOG_COLUMNS
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    assert [int(r["step"]) for r in rows] == [2, 4, 6]
    assert float(rows[-1]["best_val_dice"]) == pytest.approx(result.best_val_dice)
    with Image.open(out / "curves.png") as im:
        assert im.format == "PNG" and im.size[0] > 300
    model, config = load_checkpoint(out / "best")
    assert config["preprocessing"]["input_size"] == [32, 32]
    assert config["training"]["data"] == "synthetic"
    assert config["training"]["hyperparameters"]["epochs"] == 3
    assert config["training"]["best_step"] == result.best_step
    assert config["metrics"]["val_dice"] == pytest.approx(result.best_val_dice)
    assert config["model"]["base_channels"] == 4
    x = four[0][0][None]
    with torch.no_grad():
        torch.testing.assert_close(model(x), result.model(x))
    assert sorted(p.name for p in (out / "last").iterdir()) == [
        "training_state.json",
        "training_state.safetensors",
    ]


def test_out_dir_is_never_overwritten(four, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "log.csv").write_text("an earlier run\n")
    with pytest.raises(FileExistsError, match="resume"):
        fit(_model(), four, four, _cfg(epochs=1), device="cpu", out_dir=out)
    assert (out / "log.csv").read_text() == "an earlier run\n"
    assert sorted(p.name for p in out.iterdir()) == ["log.csv"]
    empty = tmp_path / "empty"
    empty.mkdir()  # an empty folder is fine
    fit(
        _model(),
        four,
        four,
        _cfg(epochs=1),
        device="cpu",
        out_dir=empty,
        checkpoint_config=CKPT_CONFIG,
    )
    assert (empty / "best" / "config.json").is_file()


def test_resume_continues_from_last_and_finishes(four, tmp_path):
    cfg = _cfg(epochs=4)  # 2 steps per epoch, 8 steps
    reference = []
    fit(_model(), four, four, cfg, device="cpu", callback=reference.append)
    ref_lr = {e.step: e.lr for e in reference if e.kind == "step"}

    out = tmp_path / "run"
    stop = threading.Event()

    def stop_after_epoch_2(ev):
        if ev.kind == "eval" and ev.epoch == 2:
            stop.set()

    first = fit(
        _model(),
        four,
        four,
        cfg,
        device="cpu",
        out_dir=out,
        stop=stop,
        checkpoint_config=CKPT_CONFIG,
        callback=stop_after_epoch_2,
    )
    assert first.stopped and first.steps == 4
    resumed_events = []
    second = fit(
        _model(seed=1),
        four,
        four,
        cfg,
        device="cpu",
        out_dir=out,
        resume=True,
        checkpoint_config=CKPT_CONFIG,
        callback=resumed_events.append,
    )
    assert not second.stopped and second.steps == 8
    steps = [e.step for e in resumed_events if e.kind == "step"]
    assert steps == [5, 6, 7, 8]  # continues, does not start over
    assert resumed_events[0].kind == "start" and resumed_events[0].step == 4
    for e in resumed_events:  # the learning-rate schedule continues where it stopped
        if e.kind == "step":
            assert e.lr == pytest.approx(ref_lr[e.step])
    assert [h["epoch"] for h in second.history] == [1, 2, 3, 4]
    with open(out / "log.csv", newline="") as fh:
        assert [int(r["epoch"]) for r in csv.DictReader(fh)] == [1, 2, 3, 4]
    assert second.best_val_dice >= first.best_val_dice
    _, config = load_checkpoint(out / "best")
    assert config["metrics"]["val_dice"] == pytest.approx(second.best_val_dice)


def test_resume_without_state_says_what_is_missing(four, tmp_path):
    with pytest.raises(FileNotFoundError, match="training_state"):
        fit(
            _model(),
            four,
            four,
            _cfg(epochs=1),
            device="cpu",
            out_dir=tmp_path / "new",
            resume=True,
        )
    with pytest.raises(ValueError, match="out_dir"):
        fit(_model(), four, four, _cfg(epochs=1), device="cpu", resume=True)


def test_early_stopping(four):
    # no normalisation layer and a negligible learning rate: validation Dice cannot improve
    model = _model(norm="none")
    result = fit(model, four, four, _cfg(epochs=20, lr=1e-12, early_stopping=2), device="cpu")
    assert result.early_stopped and not result.stopped
    assert len(result.history) == 3  # the first validation, then two without improvement
    assert result.steps == 6 and result.best_step == 2 and result.best_epoch == 1


def test_without_validation_the_last_weights_are_kept(four, tmp_path):
    result = fit(
        _model(),
        four,
        None,
        _cfg(epochs=2),
        device="cpu",
        out_dir=tmp_path / "r",
        checkpoint_config=CKPT_CONFIG,
    )
    assert result.best_val_dice is None and result.best_step == 4
    assert np.isnan(result.history[-1]["val_dice"])
    assert result.checkpoint == tmp_path / "r" / "best"


def test_stop_without_validation_keeps_the_last_weights(four, tmp_path):
    stop = threading.Event()
    model = _model()
    initial = {k: v.clone() for k, v in model.state_dict().items()}

    def stop_at_3(ev):
        if ev.kind == "step" and ev.step == 3:
            stop.set()

    out = tmp_path / "r"
    result = fit(model, four, None, _cfg(epochs=10), device="cpu", stop=stop, out_dir=out,
                 checkpoint_config=CKPT_CONFIG, callback=stop_at_3)
    assert result.stopped and result.steps == 3 and result.best_step == 3
    assert any(not torch.equal(v, initial[k]) for k, v in result.model.state_dict().items()
               if v.is_floating_point())
    saved, config = load_checkpoint(out / "best")
    assert config["training"]["best_step"] == 3
    for k, v in saved.state_dict().items():
        torch.testing.assert_close(v, result.model.state_dict()[k])


def test_oversampling_and_max_steps(synthetic_pairs):
    images, masks = synthetic_pairs(6, size=(32, 32))
    ds = SegmentationDataset(images, masks, (32, 32), labels=["a"] * 5 + ["b"])
    result = fit(_model(), ds, None, _cfg(max_steps=5, oversample=True), device="cpu")
    assert result.steps == 5


def test_evaluate_dataset_dice_and_false_positive_rate(synthetic_pairs):
    _, masks = synthetic_pairs(3, size=(32, 32))
    masks.append(np.zeros((32, 32), bool))  # a lesion-free image
    images = [np.where(m, 200, 40).astype(np.uint8) for m in masks]  # bright lesions
    ds = SegmentationDataset(images, masks, (32, 32))

    class Oracle(torch.nn.Module):  # predicts the truth: bright pixels are lesion
        def forward(self, x):
            return (x > 0).float() * 20 - 10

    class Everything(torch.nn.Module):
        def forward(self, x):
            return torch.full_like(x, 10.0)

    ev = evaluate_dataset(Oracle(), ds, batch_size=3)
    assert ev["dice"].shape == (4,) and ev["dice"].dtype == np.float64
    np.testing.assert_array_equal(ev["dice"], 1.0)  # empty prediction on empty truth counts 1
    assert ev["mean_dice"] == ev["mean_dice_lesion"] == 1.0 and ev["fp_rate_normal"] == 0.0
    assert np.isnan(ev["loss"])
    ev = evaluate_dataset(Everything(), ds, loss_fn=torch.nn.BCEWithLogitsLoss())
    assert ev["dice"][3] == 0.0 and ev["fp_rate_normal"] == 1.0
    assert ev["loss"] > 1.0
    fractions = np.array([m.mean() for m in masks[:3]])
    np.testing.assert_allclose(ev["dice"][:3], 2 * fractions / (1 + fractions), atol=1e-6)
    assert ev["mean_dice_lesion"] == pytest.approx(ev["dice"][:3].mean())


def test_train_config_validation_and_schedule():
    for bad in (
        dict(epochs=0),
        dict(max_steps=0),
        dict(batch_size=0),
        dict(lr=0.0),
        dict(amp="fast"),
        dict(select_metric="hd95"),
        dict(ema_decay=1.0),
        dict(ema_decay=0.0),
    ):
        with pytest.raises(ValueError):
            TrainConfig(**bad)
    assert TrainConfig().to_dict()["loss"] == "bce_dice"
    f = lr_lambda(TrainConfig(warmup_steps=10, min_lr_ratio=0.01), 100)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0)
    values = [f(s) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(values, values[1:], strict=False))
    assert f(100) == pytest.approx(0.01)
    g = lr_lambda(TrainConfig(warmup_steps=100), 10)  # warm-up capped at a fifth of the run
    assert g(1) == pytest.approx(1.0)


def test_empty_training_set_is_refused():
    class Empty(torch.utils.data.Dataset):
        def __len__(self):
            return 0

    with pytest.raises(ValueError, match="empty"):
        fit(_model(), Empty(), None, _cfg(), device="cpu")


@pytest.mark.parametrize("metric, best_eval", [("dice", 2), ("dice_lesion", 1)])
def test_select_metric_picks_the_best_checkpoint(four, tmp_path, monkeypatch, metric, best_eval):
    from busseg import engine

    # scripted validations: the all-image Dice and the lesion Dice disagree on the best one
    script = iter([(0.5, 0.9), (0.8, 0.6), (0.7, 0.7)])

    def scripted(*args, **kwargs):
        dice, lesion = next(script)
        return {"loss": 0.1, "mean_dice": dice, "mean_dice_lesion": lesion,
                "fp_rate_normal": 0.0, "dice": np.array([dice])}

    monkeypatch.setattr(engine, "evaluate_dataset", scripted)
    out = tmp_path / metric
    result = fit(_model(), four, four, _cfg(epochs=3, select_metric=metric), device="cpu",
                 out_dir=out, checkpoint_config=CKPT_CONFIG)
    assert result.best_epoch == best_eval and result.best_step == 2 * best_eval
    assert result.best_val_dice == {"dice": 0.8, "dice_lesion": 0.9}[metric]
    _, config = load_checkpoint(out / "best")
    dice, lesion = [(0.5, 0.9), (0.8, 0.6)][best_eval - 1]
    assert config["metrics"]["val_dice"] == dice and config["metrics"]["val_dice_lesion"] == lesion
    assert config["metrics"]["selected_on"] == metric


def test_ema_weights_are_the_moving_average_of_the_steps(four):
    model = _model()
    raw = []

    def snapshot(ev):
        if ev.kind == "step":
            raw.append({k: v.detach().clone() for k, v in model.state_dict().items()})

    result = fit(model, four, None, _cfg(max_steps=3, ema_decay=0.25), device="cpu",
                 callback=snapshot)
    assert len(raw) == 3
    # torch's AveragedModel copies the first step, then ema = d * ema + (1 - d) * weights
    for k, v in result.model.state_dict().items():
        if not v.is_floating_point():
            continue
        expected = 0.25 * (0.25 * raw[0][k] + 0.75 * raw[1][k]) + 0.75 * raw[2][k]
        torch.testing.assert_close(v, expected, msg=k)
    assert any(not torch.equal(result.model.state_dict()[k], raw[2][k])
               for k in raw[2] if raw[2][k].is_floating_point()), "the raw weights were returned"


def test_ema_state_is_saved_and_resumed(four, tmp_path):
    out = tmp_path / "ema"
    stop = threading.Event()

    def stop_after_epoch_1(ev):
        if ev.kind == "eval" and ev.epoch == 1:
            stop.set()

    cfg = _cfg(epochs=3, ema_decay=0.9)
    first = fit(_model(), four, four, cfg, device="cpu", out_dir=out, stop=stop,
                checkpoint_config=CKPT_CONFIG, callback=stop_after_epoch_1)
    assert first.stopped and first.steps == 2
    from safetensors.torch import load_file

    saved = load_file(str(out / "last" / "training_state.safetensors"))
    assert any(k.startswith("ema.") for k in saved)
    second = fit(_model(seed=1), four, four, cfg, device="cpu", out_dir=out, resume=True,
                 checkpoint_config=CKPT_CONFIG)
    assert second.steps == 6
    _, config = load_checkpoint(out / "best")
    assert config["training"]["hyperparameters"]["ema_decay"] == 0.9
    plain = tmp_path / "plain"
    fit(_model(), four, four, _cfg(epochs=1), device="cpu", out_dir=plain,
        checkpoint_config=CKPT_CONFIG)
    with pytest.raises(ValueError, match="ema_decay"):
        fit(_model(), four, four, _cfg(epochs=2, ema_decay=0.9), device="cpu", out_dir=plain,
            resume=True, checkpoint_config=CKPT_CONFIG)


def test_lesion_and_normal_selection_weighs_misses_and_false_lesions_alike():
    import math

    from busseg.engine import TrainConfig, selection_score

    ev = {"mean_dice": 0.9, "mean_dice_lesion": 0.7, "fp_rate_normal": 0.4}
    assert selection_score("lesion_and_normal", ev) == pytest.approx((0.7 + 0.6) / 2)
    assert selection_score("dice_lesion", ev) == 0.7
    assert selection_score("dice", ev) == 0.9
    no_normals = {**ev, "fp_rate_normal": math.nan}
    assert selection_score("lesion_and_normal", no_normals) == 0.7
    no_lesions = {**ev, "mean_dice_lesion": math.nan}
    assert selection_score("lesion_and_normal", no_lesions) == 0.9
    TrainConfig(select_metric="lesion_and_normal")
    with pytest.raises(ValueError, match="select_metric"):
        TrainConfig(select_metric="auc")


# --------------------------------------------------------------------------- interactions


class _FakePromptModel(torch.nn.Module):
    """in_channels 5: answers every prompt with the box channel, or with a stored truth."""

    in_channels = 5

    def __init__(self, truth=None):
        super().__init__()
        self.truth = truth
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        if self.truth is not None:
            out = self.truth[: x.shape[0]]
        else:
            out = x[:, 3:4]  # the box channel
        return (out.float() * 2 - 1) * 10


def _diamonds(n=3, size=32):
    yy, xx = np.mgrid[:size, :size]
    masks = []
    for i in range(n):
        c, r = 12 + 2 * i, 6 + i
        masks.append((np.abs(yy - c) + np.abs(xx - c) <= r).astype(np.float32))
    m = torch.from_numpy(np.stack(masks))[:, None]
    return torch.randn(n, 1, size, size), m


def test_box_click_interactions_counts_boxes_and_the_cap():
    from busseg.engine import box_click_interactions

    images, masks = _diamonds()
    # an oracle converges on the box: one interaction per lesion
    counts, conv = box_click_interactions(_FakePromptModel(masks), images, masks)
    assert counts.tolist() == [1, 1, 1] and conv.all()
    # a model that fills the box never reaches IoU 0.85 on a diamond (area ~ half the box)
    # and ignores the clicks: the cap, not converged
    counts, conv = box_click_interactions(_FakePromptModel(), images, masks, max_interactions=6)
    assert counts.tolist() == [6, 6, 6] and not conv.any()
    with pytest.raises(ValueError, match="lesion in every mask"):
        box_click_interactions(_FakePromptModel(), images, torch.zeros_like(masks))
    with pytest.raises(ValueError, match="guidance channels"):
        box_click_interactions(_model(), images, masks)


def test_box_click_interactions_same_boxes_every_call():
    from busseg.engine import box_click_interactions

    images, masks = _diamonds()
    a = box_click_interactions(_FakePromptModel(), images, masks, max_interactions=4, seed=3)
    b = box_click_interactions(_FakePromptModel(), images, masks, max_interactions=4, seed=3)
    assert (a[0] == b[0]).all()


def test_select_on_interactions_with_a_lesion_dice_guard(four, tmp_path, monkeypatch):
    from busseg import engine

    # (lesion Dice, interactions): the second has the fewest interactions but fails the guard
    script = iter([(0.80, 5.0), (0.60, 2.0), (0.78, 3.0), (0.79, 4.0)])

    def scripted(*args, **kwargs):
        lesion, inter = next(script)
        return {"loss": 0.1, "mean_dice": lesion, "mean_dice_lesion": lesion,
                "fp_rate_normal": 0.0, "dice": np.array([lesion]),
                "mean_interactions": inter, "never_converged": 0}

    monkeypatch.setattr(engine, "evaluate_dataset", scripted)
    out = tmp_path / "run"
    cfg = _cfg(epochs=4, select_metric="interactions", eval_interactions=True,
               select_min_dice_lesion=0.75, save_every_eval=True)
    result = fit(_model(), four, four, cfg, device="cpu", out_dir=out,
                 checkpoint_config=CKPT_CONFIG)
    assert result.best_epoch == 3 and result.best_val_dice == -3.0
    _, config = load_checkpoint(out / "best")
    assert config["metrics"]["val_interactions"] == 3.0
    assert config["metrics"]["selected_on"] == "interactions"
    assert sorted(p.name for p in (out / "evals").iterdir()) == [
        f"step_{s:06d}" for s in (2, 4, 6, 8)]
    _, first = load_checkpoint(out / "evals" / "step_000002")
    assert first["metrics"]["val_interactions"] == 5.0
    rows = list(csv.DictReader(open(out / "log.csv")))
    assert [float(r["val_interactions"]) for r in rows] == [5.0, 2.0, 3.0, 4.0]
    with pytest.raises(ValueError, match="eval_interactions"):
        TrainConfig(select_metric="interactions")


def test_evaluate_dataset_reports_interactions_for_prompt_models(monkeypatch):
    from torch.utils.data import TensorDataset

    images, masks = _diamonds()
    model = _FakePromptModel(masks)
    ev = evaluate_dataset(model, TensorDataset(images, masks), box_prompts=False,
                          interactions=True, batch_size=8)
    assert ev["mean_interactions"] == 1.0 and ev["never_converged"] == 0
    plain = evaluate_dataset(_model(), TensorDataset(images, masks), interactions=True)
    assert np.isnan(plain["mean_interactions"])


class _StopAfter:
    """A stop flag that turns on at its ``n``-th ``is_set()`` call (a race made repeatable)."""

    def __init__(self, n):
        self.n, self.calls = n, 0

    def is_set(self):
        self.calls += 1
        return self.calls >= self.n


@pytest.mark.parametrize("turns_on_at", [5, 6])
def test_a_stop_between_steps_still_returns_validated_weights(four, tmp_path, turns_on_at):
    # calls: before each step and after it (no validation due for 50 steps); the 5th call is
    # the epoch-end check after step 2, the 6th the check before step 3: either way the
    # steps done were never validated, so one more step runs and is validated
    out = tmp_path / f"run{turns_on_at}"
    cfg = _cfg(max_steps=100, eval_every_steps=50, batch_size=2)
    result = fit(_model(), four, four, cfg, device="cpu", stop=_StopAfter(turns_on_at),
                 out_dir=out, checkpoint_config=CKPT_CONFIG)
    assert result.stopped and result.steps == 3
    assert result.history and result.history[-1]["step"] == 3 and result.best_step == 3
    assert result.checkpoint == out / "best" and (out / "best" / "model.safetensors").is_file()


# --------------------------------------------------------------------------- refactor guard
# The engine was split from one module into a package (config, loop, trainer, hooks,
# evaluation, state, curves, guidance). These runs pin what the one-module engine produced,
# bit for bit: the loss of every step, the events in order, every history row (``elapsed_s``
# aside), the selection, and SHA-256 digests of the returned weights, of the best
# checkpoint's weights and of the resumable state (optimiser moments, weight average). The
# scenarios cover oversampling, L2-SP, early stopping, EMA with stop and resume, simulated
# prompts with interaction-based selection and ``save_every_eval``, a class head with a frozen
# encoder and no validation set, and a one-process DistributedDataParallel run. The starting
# weights are redrawn by ``_reinit`` so the numbers do not depend on how ``busseg.models``
# initialises its layers. Captured with the one-module engine on CPU (one torch thread,
# torch 2.13); another torch version may change the last bits, so the test is skipped there
# rather than failing on a rounding difference.
REFERENCE_TORCH = "2.13."
REFERENCE = {
    "plain": {
        "losses": [
            1.8507847785949707, 1.843904733657837, 1.922041654586792, 1.6806834936141968,
            1.7275248765945435, 1.5907726287841797,
        ],
        "kinds": "SsssvsssvE",
        "history": "e27c55c5132ce8f725c38b1a",
        "selection": (0.13684716924641305, 3, 1, 6, False, True),
        "weights": "ab06671106913b850658aa06",
        "best": "ab06671106913b850658aa06",
        "last": "3a853b8770d867548406bce3",
    },
    "ema_resume": {
        "losses": [
            1.6308529376983643, 1.5126234292984009, 1.5334841012954712, 1.5658353567123413,
            1.6124811172485352, 1.4604564905166626, 1.489936113357544, 1.553980827331543,
        ],
        "kinds": "SssvssvESssvssvE",
        "history": "ffb29cbf0f0d99baf3948516",
        "selection": (0.22904451485847047, 2, 1, 8, False, False),
        "weights": "acd103ca0a577b3aca66d965",
        "best": "acd103ca0a577b3aca66d965",
        "last": "4d990beb90bce1ec0cf68983",
    },
    "prompts": {
        "losses": [
            1.4663066864013672, 1.4255579710006714, 1.4490973949432373, 1.4222956895828247,
        ],
        "kinds": "SssvssvE",
        "history": "9ddecbe37c46e4dbbe5f8bf9",
        "selection": (-20.0, 2, 1, 4, False, False),
        "weights": "2a319cce4756b5d68851c617",
        "best": "2a319cce4756b5d68851c617",
        "last": "344ecfa5988336847f5edd89",
    },
    "class_head": {
        "losses": [
            1.465423583984375, 2.1877317428588867, 2.065778970718384,
        ],
        "kinds": "SssvsvE",
        "history": "67972815c27da513e6e4d155",
        "selection": (None, 3, 2, 3, False, False),
        "weights": "cfe46175655612c46249469f",
    },
    "ddp": {
        "losses": [
            1.5589573383331299, 1.5182188749313354, 1.5098024606704712, 1.572615623474121,
            1.5668270587921143, 1.49413001537323,
        ],
        "kinds": "SssvssvssvE",
        "history": "d24810d3057902ae9d6c1be2",
        "selection": (0.2825931963963186, 2, 1, 6, False, False),
        "weights": "126a898656681a9c85222f39",
        "best": "126a898656681a9c85222f39",
        "last": "a68da92e3887f055d61f30b4",
    },
}


def _digest(tensors):
    import hashlib

    h = hashlib.sha256()
    for k in sorted(tensors):
        v = tensors[k].detach().cpu().contiguous()
        h.update(k.encode())
        h.update(str(v.dtype).encode())
        h.update(v.float().numpy().tobytes() if v.dtype == torch.bfloat16 else v.numpy().tobytes())
    return h.hexdigest()[:24]


def _fingerprint(result, events, out=None):
    import hashlib

    from safetensors.torch import load_file

    rows = [{k: v for k, v in r.items() if k != "elapsed_s"} for r in result.history]
    fp = {
        "losses": [e.loss for e in events if e.kind == "step"],
        "kinds": "".join({"start": "S", "step": "s", "eval": "v", "end": "E"}[e.kind]
                         for e in events),
        "history": hashlib.sha256(repr(rows).encode()).hexdigest()[:24],
        "selection": (result.best_val_dice, result.best_step, result.best_epoch, result.steps,
                      result.stopped, result.early_stopped),
        "weights": _digest(result.model.state_dict()),
    }
    if out is not None:
        fp["best"] = _digest(load_checkpoint(out / "best")[0].state_dict())
        fp["last"] = _digest(load_file(str(out / "last" / "training_state.safetensors")))
    return fp


def _reinit(model, seed=0):
    """Give every weight and buffer a value drawn from ``seed`` (so the reference runs do not
    depend on the order in which ``busseg.models`` creates its layers)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for k, v in sorted(model.state_dict().items()):
            if k.endswith("running_var"):
                v.copy_(1.0 + 0.1 * torch.rand(v.shape, generator=g))
            elif v.is_floating_point():
                v.copy_(0.2 * torch.randn(v.shape, generator=g))
    return model


def _reference_run(name, synthetic_pairs, tmp_path):
    """Run the reference scenario ``name``; return its fingerprint."""
    events = []
    out = tmp_path / name
    if name == "plain":
        images, masks = synthetic_pairs(4, size=(32, 32), seed=5)
        normal, empty = synthetic_pairs(2, size=(32, 32), seed=4, lesion=False)
        train = SegmentationDataset(images + normal, masks + empty, (32, 32),
                                    labels=["benign"] * 4 + ["normal"] * 2)
        cfg = _cfg(max_steps=30, eval_every_steps=3, warmup_steps=2, l2sp_alpha=0.5,
                   oversample=True, early_stopping=1, lr=2e-2, select_metric="lesion_and_normal")
        result = fit(_reinit(_model()), train, train, cfg, device="cpu", out_dir=out,
                     checkpoint_config=CKPT_CONFIG, callback=events.append)
    elif name == "ema_resume":
        from busseg.data.transforms import Augment

        images, masks = synthetic_pairs(5, size=(32, 32), seed=6)
        train = SegmentationDataset(images, masks, (32, 32), augment=Augment(), seed=2)
        val = SegmentationDataset(images[:3], masks[:3], (32, 32))
        cfg = _cfg(epochs=4, ema_decay=0.7, select_metric="dice_lesion", grad_clip=0.5)
        stop = threading.Event()

        def stop_after_epoch_2(ev):
            events.append(ev)
            if ev.kind == "eval" and ev.epoch == 2:
                stop.set()

        fit(_reinit(_model()), train, val, cfg, device="cpu", out_dir=out, stop=stop,
            checkpoint_config=CKPT_CONFIG, callback=stop_after_epoch_2)
        result = fit(_reinit(_model(), 3), train, val, cfg, device="cpu", out_dir=out, resume=True,
                     checkpoint_config=CKPT_CONFIG, callback=events.append)
    elif name == "prompts":
        images, masks = synthetic_pairs(4, size=(32, 32), seed=7)
        train = SegmentationDataset(images, masks, (32, 32))
        cfg = _cfg(max_steps=4, eval_every_steps=2, eval_interactions=True,
                   select_metric="interactions", save_every_eval=True,
                   select_min_dice_lesion=0.0, prompts={"max_rounds": 2})
        result = fit(_reinit(_model(in_channels=5)), train, train, cfg, device="cpu", out_dir=out,
                     checkpoint_config=CKPT_CONFIG, callback=events.append)
    elif name == "class_head":
        images, masks = synthetic_pairs(4, size=(64, 64), seed=8)
        normal, empty = synthetic_pairs(2, size=(64, 64), seed=9, lesion=False)
        train = SegmentationDataset(images + normal, masks + empty, (64, 64),
                                    labels=["benign", "malignant"] * 2 + ["normal", "unknown"])
        torch.manual_seed(0)
        model = _reinit(build_model({"encoder": "efficientnet_lite0", "in_channels": 5,
                                     "num_classes": 3}))
        cfg = TrainConfig(max_steps=3, batch_size=3, lr=1e-3, warmup_steps=0, freeze_encoder=True,
                          channels_last=False, prompts={"p_auto": 0.5, "max_rounds": 1})
        result = fit(model, train, None, cfg, device="cpu", callback=events.append)
        out = None
    elif name == "ddp":
        # one-process gloo group: the DistributedDataParallel wrapper and DistributedSampler
        if not torch.distributed.is_available():
            pytest.skip("this torch build has no torch.distributed")
        images, masks = synthetic_pairs(5, size=(32, 32), seed=10)
        train = SegmentationDataset(images, masks, (32, 32))
        torch.distributed.init_process_group(
            "gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
        try:
            result = fit(_reinit(_model()), train, train, _cfg(epochs=3), device="cpu", out_dir=out,
                         checkpoint_config=CKPT_CONFIG, callback=events.append)
        finally:
            torch.distributed.destroy_process_group()
    else:
        raise KeyError(name)
    return _fingerprint(result, events, out)


@pytest.mark.skipif(not torch.__version__.startswith(REFERENCE_TORCH),
                    reason=f"reference numbers captured with torch {REFERENCE_TORCH}x")
@pytest.mark.parametrize("name", list(REFERENCE))
def test_same_run_gives_bit_identical_results_to_the_one_module_engine(
        name, synthetic_pairs, tmp_path):
    fp = _reference_run(name, synthetic_pairs, tmp_path)
    ref = REFERENCE[name]
    assert fp["losses"] == ref["losses"]
    assert fp["kinds"] == ref["kinds"]  # the same events in the same order
    assert tuple(fp["selection"]) == ref["selection"]
    assert fp["history"] == ref["history"]
    for key in ("weights", "best", "last"):
        assert fp.get(key) == ref.get(key), key


# --------------------------------------------------------------------------- package layout


def test_engine_package_keeps_every_name_of_the_one_module_engine():
    import busseg.engine as engine

    for name in ("LOG_COLUMNS", "CURVES_EVERY_S", "SELECT_METRICS", "TrainConfig",
                 "ProgressEvent", "FitResult", "selection_score", "evaluate_dataset",
                 "box_click_interactions", "with_guidance", "fit_iter", "fit", "drain",
                 "iter_batches", "lr_lambda", "WithClass"):
        assert hasattr(engine, name), name
    assert sorted(engine.__all__) == sorted(set(engine.__all__))
    assert all(hasattr(engine, name) for name in engine.__all__)


def test_engine_functions_and_modules_stay_short():
    import ast
    from pathlib import Path

    import busseg.engine as engine

    folder = Path(engine.__file__).parent
    for path in sorted(folder.glob("*.py")):
        text = path.read_text()
        assert text.count("\n") <= 500, f"{path.name} has {text.count(chr(10))} lines"
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = node.end_lineno - node.lineno + 1
                assert length <= 120, f"{path.name}: {node.name} is {length} lines"


def test_early_stopping_and_best_selection_hooks():
    from busseg.engine import BestSelection, EarlyStopping

    stopping = EarlyStopping(2)
    for improved, stop in [(False, False), (True, False), (False, False), (False, True)]:
        stopping.record(improved)
        assert stopping.should_stop is stop
    never = EarlyStopping(None)
    for _ in range(5):
        never.record(False)
    assert never.bad == 5 and not never.should_stop

    model = _model()
    best = BestSelection(model, min_dice_lesion=0.5)
    ev = {"mean_dice_lesion": 0.6}
    assert best.consider(ev, 0.3, step=2, epoch=1, model=model)
    assert not best.consider(ev, 0.30005, step=4, epoch=2, model=model)  # within 1e-4
    assert not best.consider({"mean_dice_lesion": 0.4}, 0.9, step=6, epoch=3, model=model)
    assert best.consider({"mean_dice_lesion": float("nan")}, 0.8, step=8, epoch=4, model=model)
    assert (best.score, best.step, best.epoch) == (0.8, 8, 4)
    with torch.no_grad():
        next(model.parameters()).add_(1.0)  # the kept copy is not the live weights
    k, v = next(iter(model.state_dict().items()))
    assert not torch.equal(best.state[k], v)


def test_run_writer_refuses_to_overwrite_a_run(tmp_path):
    from busseg.engine import RunWriter

    out = tmp_path / "run"
    assert RunWriter.prepare(out, resume=False) is True and out.is_dir()
    assert RunWriter.prepare(out, resume=False) is False  # empty: reused
    (out / "log.csv").write_text("x")
    with pytest.raises(FileExistsError, match="resume"):
        RunWriter.prepare(out, resume=False)
    assert RunWriter.prepare(out, resume=True) is False
