import hashlib
from pathlib import Path

import numpy as np
import pytest
import skimage.io
import torch

import busseg.samples
from busseg.models import (
    ResNetUNet,
    UNet,
    build_model,
    default_model_config,
    normalize_model_config,
    required_multiple,
)


def n_params(model):
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(
    ("encoder", "depth", "base", "upsample"),
    [
        ("plain", 1, 4, "transpose"),
        ("plain", 3, 8, "bilinear"),
        ("plain", 4, 4, "transpose"),
        ("resnet34", 1, 4, "transpose"),
        ("resnet34", 3, 8, "bilinear"),
        ("resnet34", 5, 4, "transpose"),
    ],
)
def test_output_shape(encoder, depth, base, upsample):
    torch.manual_seed(0)
    model = build_model(
        {"encoder": encoder, "depth": depth, "base_channels": base, "upsample": upsample}
    )
    assert isinstance(model, UNet if encoder == "plain" else ResNetUNet)
    m = required_multiple(model.busseg_model_config)
    assert m == 2**depth == required_multiple(model)
    x = torch.randn(2, 1, 2 * max(m, 16), 3 * max(m, 16))
    y = model(x)
    assert y.shape == (2, 1, x.shape[2], x.shape[3])
    assert y.dtype == torch.float32
    # logits, not probabilities
    assert y.min() < 0 or y.max() > 1


@pytest.mark.parametrize("encoder", ["plain", "resnet34"])
def test_out_channels_and_eval(encoder):
    model = build_model({"encoder": encoder, "depth": 2, "base_channels": 4, "out_channels": 3})
    model.eval()
    with torch.no_grad():
        y = model(torch.randn(1, 1, 32, 32))
    assert y.shape == (1, 3, 32, 32)


@pytest.mark.parametrize("encoder", ["plain", "resnet34"])
def test_gradients_flow(encoder):
    torch.manual_seed(0)
    model = build_model({"encoder": encoder, "depth": 3, "base_channels": 4, "dropout": 0.2})
    x = torch.randn(2, 1, 32, 32)
    target = (torch.rand(2, 1, 32, 32) > 0.5).float()
    loss = torch.nn.functional.binary_cross_entropy_with_logits(model(x), target)
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
    # first-layer and last-layer weights receive signal
    grads = [p.grad.abs().sum().item() for p in model.parameters()]
    assert grads[0] > 0 and grads[-1] > 0


@pytest.mark.parametrize("encoder", ["plain", "resnet34"])
def test_bad_sizes_raise(encoder):
    model = build_model({"encoder": encoder, "depth": 3, "base_channels": 4})
    with pytest.raises(ValueError, match="multiples of 8.*pad the input to 40x32"):
        model(torch.randn(1, 1, 36, 32))
    with pytest.raises(ValueError, match="input channel"):
        model(torch.randn(1, 3, 32, 32))
    with pytest.raises(ValueError, match="4-D"):
        model(torch.randn(1, 32, 32))


def test_defaults_filled():
    model = build_model({"depth": 2})
    cfg = model.busseg_model_config
    assert cfg == {**default_model_config(), "depth": 2}
    assert build_model().busseg_model_config == default_model_config()
    assert required_multiple(None) == 16
    assert default_model_config() is not default_model_config()


@pytest.mark.parametrize(
    ("config", "match"),
    [
        ({"arch": "segformer"}, "'arch' must be one of 'unet'"),
        ({"encoder": "resnet50"}, "'plain', 'resnet34'"),
        ({"norm": "layer"}, "'batch', 'instance', 'none'"),
        ({"upsample": "nearest"}, "'transpose', 'bilinear'"),
        ({"chanels": 3}, "unknown model config key.*allowed keys: arch, encoder"),
        ({"depth": 0}, "positive integer"),
        ({"depth": 2.0}, "positive integer"),
        ({"base_channels": True}, "positive integer"),
        ({"depth": 8}, "between 1 and 7"),
        ({"encoder": "resnet34", "depth": 6}, "between 1 and 5"),
        ({"dropout": 1.0}, r"\[0, 1\)"),
        ({"dropout": "0.1"}, "number"),
    ],
)
def test_build_model_validation(config, match):
    with pytest.raises(ValueError, match=match):
        build_model(config)


def test_build_model_not_a_dict():
    with pytest.raises(ValueError, match="dict"):
        build_model([("depth", 2)])


def test_normalize_does_not_mutate():
    cfg = {"depth": 2, "dropout": 0}
    out = normalize_model_config(cfg)
    assert cfg == {"depth": 2, "dropout": 0}
    assert out["dropout"] == 0.0 and isinstance(out["dropout"], float)


@pytest.mark.parametrize("encoder", ["plain", "resnet34"])
def test_params_grow_with_width_and_depth(encoder):
    def count(**kw):
        return n_params(build_model({"encoder": encoder, **kw}))

    assert count(base_channels=4, depth=3) < count(base_channels=8, depth=3)
    assert count(base_channels=8, depth=3) < count(base_channels=16, depth=3)
    assert count(base_channels=4, depth=2) < count(base_channels=4, depth=3)


def test_resnet34_full_width_encoder_size():
    # with base_channels=64 the encoder has the ResNet-34 widths (about 21.3 M parameters
    # without the classifier head); build on the meta device to stay cheap
    with torch.device("meta"):
        model = build_model({"encoder": "resnet34", "base_channels": 64, "depth": 5})
    encoder = sum(p.numel() for p in model.stages.parameters())
    assert 21.0e6 < encoder < 21.5e6
    # [3, 4, 6, 3] basic blocks
    blocks = [len(model.stages[1][1]), *(len(s) for s in model.stages[2:])]
    assert blocks == [3, 4, 6, 3]


def test_norm_variants():
    for norm in ("instance", "none"):
        model = build_model({"depth": 2, "base_channels": 4, "norm": norm})
        assert model(torch.randn(1, 1, 16, 16)).shape == (1, 1, 16, 16)


# --------------------------------------------------------------------------- fixed outputs
# Recorded with the models as they were before the encoder registry and the shared U-Net
# decoder (three separate U-Net classes), on the CPU with one thread: the shipped default
# model and freshly seeded models must give the same logits and the same state-dict keys.


def _key_signature(model):
    state = model.state_dict()
    text = "\n".join(f"{k}:{tuple(v.shape)}" for k, v in state.items())
    return {"n_params": n_params(model), "n_keys": len(state),
            "keys_sha": hashlib.sha256(text.encode()).hexdigest()[:16]}


def _check_logits(t, expected, atol=1e-4):
    flat = t.detach().double().flatten()
    picks = [0, 1000, flat.numel() // 2, flat.numel() - 1]
    assert flat.sum().item() == pytest.approx(expected["sum"], rel=1e-5)
    assert flat.abs().sum().item() == pytest.approx(expected["abs_sum"], rel=1e-5)
    got = [flat[i].item() for i in picks]
    assert got == pytest.approx(expected["vals"], abs=atol)


def _check_with_class(model, x, expected, class_logits):
    """Run ``model(x, with_class=True)``; check the logits (:func:`_check_logits`) and the
    class logits (flattened, to 1e-4)."""
    with torch.no_grad():
        seg, cls = model(x, with_class=True)
    _check_logits(seg, expected)
    assert cls.flatten().tolist() == pytest.approx(class_logits, abs=1e-4)


SEEDED = {  # name: (config, key signature, eval-mode logits on a seeded 64x64 input)
    "plain": ({}, {"n_params": 1942289, "n_keys": 118, "keys_sha": "aec158c6b6947c4a"},
              {"sum": -1935.3338547479361, "abs_sum": 3950.0247427430004,
               "vals": [-0.6909927129745483, 0.28390979766845703, -0.8238838315010071,
                        0.08739295601844788]}),
    "plain_b8d3_instance_bilinear": (
        {"base_channels": 8, "depth": 3, "norm": "instance", "upsample": "bilinear"},
        {"n_params": 112969, "n_keys": 50, "keys_sha": "7d366db4790f4c63"},
        {"sum": -11415.124569447711, "abs_sum": 11441.66140458174,
         "vals": [-2.058134078979492, -3.9122884273529053, -0.8251804113388062,
                  -1.2202961444854736]}),
    "resnet34": ({"encoder": "resnet34"},
                 {"n_params": 568713, "n_keys": 244, "keys_sha": "0213f047fc7baaac"},
                 {"sum": -29625.05110964179, "abs_sum": 35948.63208642602,
                  "vals": [-2.165905237197876, -3.9860730171203613, 2.7246570587158203,
                           1.0020546913146973]}),
    "resnet34_b8d5_bilinear": (
        {"encoder": "resnet34", "base_channels": 8, "depth": 5, "upsample": "bilinear"},
        {"n_params": 376453, "n_keys": 300, "keys_sha": "36071c08a4e7999b"},
        {"sum": -301535.4949371617, "abs_sum": 301547.06612036633,
         "vals": [-104.53536987304688, -34.90546417236328, -362.6268005371094,
                  5.7855916023254395]}),
    "efficientnet_lite0_prompts_class_head": (
        {"encoder": "efficientnet_lite0", "in_channels": 5, "num_classes": 3},
        {"n_params": 3779124, "n_keys": 362, "keys_sha": "aa3106e38ee4f935"},
        {"sum": -102.71103350515477, "abs_sum": 251.5749629054335,
         "vals": [-3.171898424625397e-05, 0.12389551848173141, -0.026667732745409012,
                  -0.046029090881347656]}),
    "efficientnet_lite0": (
        {"encoder": "efficientnet_lite0"},
        {"n_params": 3777009, "n_keys": 360, "keys_sha": "6a72f0e6db69b817"},
        {"sum": 22.848272093455307, "abs_sum": 381.6831965694437,
         "vals": [-0.0560329370200634, 0.05649784207344055, -0.08950968086719513,
                  0.028827257454395294]}),
}


@pytest.mark.parametrize("name", list(SEEDED))
def test_seeded_models_unchanged(name):
    """Same keys, shapes, parameter count and seed-initialised logits as before the registry."""
    config, signature, logits = SEEDED[name]
    torch.manual_seed(0)
    model = build_model(config).eval()
    assert _key_signature(model) == signature
    x = torch.randn(1, model.in_channels, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        _check_logits(model(x), logits)


def test_shipped_default_model_predicts_as_before():
    """The shipped weights load strictly with their config.json and give the same logits."""
    from busseg.models import default_checkpoint_path, load_checkpoint

    model, _ = load_checkpoint(default_checkpoint_path())
    assert _key_signature(model) == SEEDED["efficientnet_lite0_prompts_class_head"][1]
    # seeded random input; guidance channels binary (noise above 1.5)
    x = torch.randn(2, 5, 256, 256, generator=torch.Generator().manual_seed(0))
    x[:, 1:] = (x[:, 1:] > 1.5).float()
    _check_with_class(model, x, {"sum": -288911.0352596799, "abs_sum": 382099.8789414698,
                                 "vals": [-5.111860275268555, -5.240578651428223,
                                          -4.971089839935303, -5.571702003479004]},
                      [1.1000937223434448, -1.9731965065002441, 0.7325046062469482,
                       1.0668517351150513, -1.9793109893798828, 0.7388315200805664])
    # a real BUSI scan (z-scored top-left 256x256 crop), no prompts
    path = Path(busseg.samples.__file__).parent / "benign" / "benign (100).png"
    image = skimage.io.imread(path).astype(np.float32)[:256, :256]
    xs = torch.zeros(1, 5, 256, 256)
    xs[0, 0] = torch.from_numpy((image - image.mean()) / image.std())
    _check_with_class(model, xs, {"sum": -486763.7219271995, "abs_sum": 521228.810677778,
                                  "vals": [-5.214500904083252, -8.166609764099121,
                                           -6.365567684173584, -6.0016770362854]},
                      [0.11243735253810883, 1.4734714031219482, -1.7416412830352783])
