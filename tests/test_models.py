import pytest
import torch

from busseg.models import (
    ResNetUNet,
    UNet,
    build_model,
    default_model_config,
    normalize_model_config,
    required_multiple,
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # tiny tensors: OpenMP threads only add overhead (and spin badly on a shared 2-core box)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


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
