"""The encoder registry, the one U-Net decoder and the encoder interface."""

import pytest
import torch
from torch import nn

from busseg.models import (
    ENCODERS,
    EfficientNetLite0UNet,
    Encoder,
    EncoderInfo,
    EncoderUNet,
    ResNetUNet,
    UNet,
    build_model,
    encoder_names,
    get_encoder,
    load_checkpoint,
    normalize_model_config,
    register_encoder,
    required_multiple,
    save_checkpoint,
)
from busseg.models.decoder import ClassHead, UNetDecoder
from busseg.models.efficientnet import EfficientNetLite0Encoder
from busseg.models.layers import ConvBlock
from busseg.models.resnet import ResNet34Encoder
from busseg.models.unet import PlainEncoder

SMALL = {
    "plain": {"base_channels": 4, "depth": 3},
    "resnet34": {"encoder": "resnet34", "base_channels": 4, "depth": 3},
    "efficientnet_lite0": {"encoder": "efficientnet_lite0"},
}



def test_registry_holds_the_three_encoders():
    assert encoder_names() == ("plain", "resnet34", "efficientnet_lite0")
    expected = {"plain": (PlainEncoder, UNet), "resnet34": (ResNet34Encoder, ResNetUNet),
                "efficientnet_lite0": (EfficientNetLite0Encoder, EfficientNetLite0UNet)}
    for name, (encoder, model) in expected.items():
        info = get_encoder(name)
        assert info.name == name and info.encoder is encoder and info.model is model
        assert issubclass(model, EncoderUNet) and issubclass(model, encoder)
        assert info.reference
    assert [n for n, i in ENCODERS.items() if i.class_head] == ["efficientnet_lite0"]
    assert get_encoder("efficientnet_lite0").fixed == {"depth": 5, "norm": "batch"}


def test_unknown_encoder_lists_the_known_ones():
    with pytest.raises(ValueError, match="unknown encoder 'vit'; known encoders: 'plain', "
                                         "'resnet34', 'efficientnet_lite0'"):
        get_encoder("vit")
    with pytest.raises(ValueError, match="unknown encoder"):
        get_encoder(["plain"])
    with pytest.raises(ValueError, match="'encoder' must be one of 'plain', 'resnet34', "
                                         "'efficientnet_lite0', got 'vit'"):
        build_model({"encoder": "vit"})


@pytest.mark.parametrize("name", list(SMALL))
def test_features_match_the_registered_channels_and_strides(name):
    cfg = normalize_model_config(SMALL[name])
    info = get_encoder(name)
    model = build_model(cfg).eval()
    channels, strides = info.feature_channels(cfg), info.feature_strides(cfg)
    assert (model.feature_channels, model.feature_strides) == (channels, strides)
    assert required_multiple(cfg) == max(strides) == model.required_multiple
    x = torch.randn(1, 1, 64, 96)
    with torch.no_grad():
        feats = model.features(x)
    assert [tuple(f.shape) for f in feats] == [
        (1, c, 64 // s, 96 // s) for c, s in zip(channels, strides, strict=True)]


@pytest.mark.parametrize("name", list(SMALL))
def test_every_encoder_uses_the_one_decoder(name):
    model = build_model(SMALL[name]).eval()
    assert isinstance(model, EncoderUNet)
    assert type(model.decoders) is UNetDecoder
    assert len(model.decoders) == model.required_multiple.bit_length() - 1
    assert model.head.in_channels == model.decoders.out_channels
    with torch.no_grad():
        assert model(torch.randn(2, 1, 64, 32)).shape == (2, 1, 64, 32)
    assert not hasattr(model, "class_head") and model.num_classes == 0


def test_encoder_on_its_own():
    enc = PlainEncoder(in_channels=1, base_channels=4, depth=2).eval()
    assert isinstance(enc, Encoder) and not isinstance(enc, EncoderUNet)
    with torch.no_grad():
        feats = enc(torch.randn(1, 1, 16, 16))
    assert [f.shape[1] for f in feats] == [4, 8, 16]
    assert [k.split(".")[0] for k in enc.state_dict()][0] == "encoders"


def test_decoder_steps_and_skips():
    dec = UNetDecoder((16, 24, 40), (2, 4, 8), decoder_channels=(32, 16, 8))
    # deepest first: 8 -> 4 (skip 24), 4 -> 2 (skip 16), 2 -> 1 (no skip)
    assert dec.skip_index == [1, 0, None]
    assert [b.conv[0].in_channels for b in dec] == [32 + 24, 16 + 16, 8]
    feats = [torch.randn(1, c, 32 // s, 32 // s) for c, s in ((16, 2), (24, 4), (40, 8))]
    assert dec(feats).shape == (1, 8, 32, 32) and dec.out_channels == 8
    mirrored = UNetDecoder((4, 8, 16), (1, 2, 4))
    assert [b.conv[0].out_channels for b in mirrored] == [8, 4]
    assert mirrored.out_channels == 4


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (((4, 8), (1,)), "one stride per encoder feature"),
        (((4, 8), (1, 3)), "powers of two"),
        (((4, 8), (2, 1)), "powers of two"),
        (((16, 24), (2, 4)), "decoder_channels is needed"),
        (((16, 24), (2, 4), (8,)), "needs 2 entries"),
    ],
)
def test_decoder_errors(args, match):
    with pytest.raises(ValueError, match=match):
        UNetDecoder(*args)


def test_class_head_layout():
    head = ClassHead(320, 3, dropout=0.2)
    assert [k for k in head.state_dict()] == ["3.weight", "3.bias"]
    assert head(torch.randn(2, 320, 2, 2)).shape == (2, 3)


@pytest.mark.parametrize("name", ["plain", "resnet34"])
def test_guidance_channels_start_silent_for_every_encoder(name):
    torch.manual_seed(0)
    model = build_model({**SMALL[name], "in_channels": 3}).eval()
    assert all(not c.weight[:, 1:].any() for c in model.input_convs())
    x = torch.randn(1, 3, 32, 32)
    y = x.clone()
    y[:, 1:] = torch.rand(1, 2, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), model(y))
    # one-channel models keep every input weight
    assert model.input_convs()[0].weight[:, :1].any()


class _TinyEncoder(Encoder):
    """Two strided convolutions: features at strides 2 and 4."""

    def __init__(self, in_channels=1, base_channels=4):
        super().__init__()
        self.in_channels = in_channels
        self.feature_channels, self.feature_strides = self.channels_and_strides(
            {"base_channels": base_channels})
        self.down1 = nn.Conv2d(in_channels, base_channels, 3, 2, 1)
        self.down2 = ConvBlock(base_channels, 2 * base_channels)
        self.pool = nn.MaxPool2d(2)

    @classmethod
    def channels_and_strides(cls, config):
        b = int(config["base_channels"])
        return (b, 2 * b), (2, 4)

    def features(self, x):
        a = self.down1(x)
        return [a, self.down2(self.pool(a))]

    def input_convs(self):
        return [self.down1]


class _TinyUNet(EncoderUNet, _TinyEncoder):
    def __init__(self, in_channels=1, out_channels=1, base_channels=4, num_classes=0,
                 upsample="transpose"):
        _TinyEncoder.__init__(self, in_channels, base_channels)
        self.init_unet(out_channels, upsample=upsample, decoder_channels=(8, 4),
                       num_classes=num_classes)


def test_register_a_new_encoder(tmp_path):
    info = EncoderInfo("tiny", _TinyEncoder, _TinyUNet, max_depth=2, fixed={"depth": 2},
                       class_head=True, reference="a test")
    register_encoder(info)
    try:
        assert "tiny" in encoder_names()
        with pytest.raises(ValueError, match="already registered"):
            register_encoder(info)
        cfg = {"encoder": "tiny", "in_channels": 2, "num_classes": 3}
        assert required_multiple(cfg) == 4
        with pytest.raises(ValueError, match="'depth' must be 2 for encoder 'tiny'"):
            build_model({"encoder": "tiny", "depth": 3})
        torch.manual_seed(0)
        model = build_model(cfg).eval()
        assert isinstance(model, _TinyUNet) and model.busseg_model_config["depth"] == 2
        assert not model.down1.weight[:, 1:].any()
        with torch.no_grad():
            seg, cls = model(torch.randn(2, 2, 16, 12), with_class=True)
        assert seg.shape == (2, 1, 16, 12) and cls.shape == (2, 3)
        # a class head for an encoder registered with one; the message names both
        with pytest.raises(ValueError, match="needs encoder 'efficientnet_lite0' or 'tiny'"):
            build_model({"num_classes": 3})
        path = save_checkpoint(tmp_path / "tiny", model)
        loaded, _ = load_checkpoint(path)
        assert isinstance(loaded, _TinyUNet)
    finally:
        ENCODERS.pop("tiny", None)
    assert "tiny" not in encoder_names()


def test_register_checks_the_model_class():
    with pytest.raises(ValueError, match="must subclass EncoderUNet and _TinyEncoder"):
        register_encoder(EncoderInfo("bad", _TinyEncoder, UNet, max_depth=2))
    assert "bad" not in encoder_names()


def test_from_config_passes_only_the_model_arguments():
    cfg = normalize_model_config({"encoder": "efficientnet_lite0", "in_channels": 5,
                                  "num_classes": 3, "dropout": 0.3})
    model = EfficientNetLite0UNet.from_config(cfg)
    assert model.in_channels == 5 and model.num_classes == 3
    assert model.class_head[2].p == 0.3
    plain = UNet.from_config(normalize_model_config({"depth": 2, "dropout": 0.1}))
    assert plain.depth == 2 and plain.dropout.p == 0.1
