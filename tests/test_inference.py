import os
import statistics
import time

import numpy as np
import pytest
import torch

import busseg
from busseg.data.dataset import SegmentationDataset
from busseg.inference import (
    clear_model_cache,
    load_model,
    predict_logits_batch,
    predict_mask,
    predict_proba,
    predict_stack_iter,
    preprocess,
)
from busseg.models import CheckpointError, build_model, default_checkpoint_path, save_checkpoint
from busseg.postprocess import postprocess_mask

TINY = {"base_channels": 4, "depth": 2}


def _save(path, *, input_size=(32, 32), threshold=0.5, tta=False, seed=0, model_cfg=TINY):
    torch.manual_seed(seed)
    model = build_model(model_cfg).eval()
    config = {
        "preprocessing": {
            "input_size": None if input_size is None else list(input_size),
            "grey": True,
            "normalize": "zscore",
        },
        "inference": {"threshold": threshold, "tta_flips": tta},
    }
    return save_checkpoint(path, model, config, overwrite=True)


@pytest.fixture
def model(tiny_checkpoint):
    return load_model(tiny_checkpoint, device="cpu")


def _image(shape, seed=0, dtype=np.uint8):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=shape).astype(dtype)


# --------------------------------------------------------------------------- preprocessing


def test_preprocess_is_the_training_preprocessing():
    img = _image((45, 61))
    ds = SegmentationDataset([img], [np.zeros_like(img, bool)], input_size=(32, 40))
    x = preprocess(img, {"input_size": [32, 40], "grey": True, "normalize": "zscore"})
    assert x.shape == (1, 1, 32, 40) and x.dtype == torch.float32
    assert torch.equal(x, ds[0][0][None])
    assert abs(float(x.mean())) < 1e-5 and abs(float(x.std()) - 1) < 1e-4


def test_preprocess_native_size_pads_to_the_multiple():
    img = _image((37, 53))
    prep = {"input_size": None, "grey": True, "normalize": "zscore"}
    x = preprocess(img, prep, multiple=16)
    assert x.shape == (1, 1, 48, 64)
    # the image itself is unchanged and z-scored over its own pixels; padding reflects it
    core = x[0, 0, :37, :53]
    assert abs(float(core.mean())) < 1e-5
    assert torch.allclose(x[0, 0, 37, :53], x[0, 0, 35, :53])  # reflect: row 37 mirrors row 35
    tiny = preprocess(_image((3, 5)), prep, multiple=16)  # too small to reflect: replicate
    assert tiny.shape == (1, 1, 16, 16)
    assert torch.equal(tiny[0, 0, 15, :5], tiny[0, 0, 2, :5])


def test_preprocess_rejects_unknown_preprocessing():
    with pytest.raises(ValueError, match="zscore"):
        preprocess(_image((8, 8)), {"input_size": [8, 8], "normalize": "minmax"})
    with pytest.raises(ValueError, match="grey"):
        preprocess(_image((8, 8)), {"input_size": [8, 8], "grey": False})


# --------------------------------------------------------------------------- outputs


@pytest.mark.parametrize("shape", [(37, 53), (32, 32), (1, 1), (200, 7), (64, 31)])
def test_proba_and_mask_at_original_size(model, shape):
    img = _image(shape)
    p = predict_proba(img, model)
    assert p.shape == shape and p.dtype == np.float32
    assert np.isfinite(p).all() and p.min() >= 0.0 and p.max() <= 1.0
    m = predict_mask(img, model)
    assert m.shape == shape and m.dtype == bool
    np.testing.assert_array_equal(m, p >= 0.5)


def test_colour_and_dtype_variants_agree(model):
    grey = _image((41, 57))
    ref = predict_proba(grey, model)
    rgb = np.repeat(grey[..., None], 3, axis=-1)
    rgba = np.concatenate([rgb, np.full((*grey.shape, 1), 255, np.uint8)], axis=-1)
    np.testing.assert_array_equal(predict_proba(rgb, model), ref)
    np.testing.assert_array_equal(predict_proba(rgba, model), ref)
    np.testing.assert_array_equal(predict_proba(grey[..., None], model), ref)
    np.testing.assert_array_equal(predict_proba(grey.astype(np.uint16) * 257, model), ref)
    np.testing.assert_allclose(predict_proba(grey / 255.0, model), ref, atol=1e-6)
    np.testing.assert_allclose(predict_proba(grey.astype(np.float32), model), ref, atol=1e-6)
    np.testing.assert_allclose(predict_proba(torch.from_numpy(grey), model), ref, atol=1e-6)
    # a real colour image goes through the luma conversion and still gives a valid map
    colour = _image((41, 57, 3), seed=3)
    p = predict_proba(colour, model)
    assert p.shape == (41, 57) and p.dtype == np.float32


def test_threshold_from_checkpoint_and_override(tmp_path):
    ckpt = _save(tmp_path / "t", threshold=0.7)
    m = load_model(ckpt, device="cpu")
    img = _image((30, 34), seed=2)
    p = predict_proba(img, m)
    assert 0.0 < (p >= 0.5).mean() and (p >= 0.7).mean() < (p >= 0.5).mean()  # a real difference
    np.testing.assert_array_equal(predict_mask(img, m), p >= 0.7)
    np.testing.assert_array_equal(predict_mask(img, m, threshold=0.5), p >= 0.5)
    for bad in (0.0, 1.0, -0.1, "x"):
        with pytest.raises(ValueError, match="threshold"):
            predict_mask(img, m, threshold=bad)


def test_tta_is_flip_symmetric(model):
    img = _image((36, 50), seed=5)
    flip = img[:, ::-1]
    plain = predict_proba(img, model, tta=False)
    plain_flip = predict_proba(flip, model, tta=False)
    # the untrained network is not symmetric by itself ...
    assert np.abs(plain - plain_flip[:, ::-1]).max() > 1e-3
    # ... but TTA is the mean of both views, hence exactly mirror-symmetric
    tta = predict_proba(img, model, tta=True)
    np.testing.assert_allclose(tta, (plain + plain_flip[:, ::-1]) / 2, atol=1e-6)
    np.testing.assert_allclose(predict_proba(flip, model, tta=True), tta[:, ::-1], atol=1e-6)


def test_tta_default_comes_from_the_checkpoint(tmp_path):
    m = load_model(_save(tmp_path / "tta", tta=True), device="cpu")
    img = _image((33, 40), seed=1)
    np.testing.assert_array_equal(predict_proba(img, m), predict_proba(img, m, tta=True))
    assert not np.array_equal(predict_proba(img, m), predict_proba(img, m, tta=False))


def test_native_size_checkpoint(tmp_path):
    m = load_model(_save(tmp_path / "native", input_size=None), device="cpu")
    img = _image((37, 53), seed=4)
    p = predict_proba(img, m)
    assert p.shape == (37, 53)
    x = preprocess(img, m.busseg_config["preprocessing"], multiple=4)
    with torch.inference_mode():
        expected = torch.sigmoid(m(x))[0, 0, :37, :53].numpy()
    np.testing.assert_allclose(p, expected, atol=1e-5)


def test_logits_batch_views(model):
    x = torch.randn(3, 1, 32, 32)
    one = predict_logits_batch(x, model)
    two = predict_logits_batch(x, model, tta=True)
    assert one.shape == (3, 1, 32, 32) and two.shape == (3, 2, 32, 32)
    torch.testing.assert_close(two[:, :1], one)
    torch.testing.assert_close(two[:, 1:], predict_logits_batch(x.flip(-1), model).flip(-1))


def test_postprocessing_is_passed_through(model):
    img = _image((40, 44), seed=6)
    raw = predict_mask(img, model, threshold=0.45)
    out = predict_mask(img, model, threshold=0.45, fill_holes=True, keep="largest", min_area=3)
    np.testing.assert_array_equal(
        out, postprocess_mask(raw, fill_holes=True, keep="largest", min_area=3)
    )
    with pytest.raises(ValueError, match="keep"):
        predict_mask(img, model, keep="one")


# --------------------------------------------------------------------------- loading and cache


def test_cache_returns_the_same_object_and_reloads_on_change(tmp_path):
    ckpt = _save(tmp_path / "c", seed=0)
    a = load_model(ckpt, device="cpu")
    assert load_model(ckpt, device="cpu") is a
    assert load_model(ckpt / "config.json", device="cpu") is a
    assert load_model(str(ckpt / "model.safetensors"), device="auto") is a  # auto is cpu here
    assert a.busseg_config["preprocessing"]["input_size"] == [32, 32]
    assert not any(p.requires_grad for p in a.parameters())
    img = _image((32, 32))
    before = predict_proba(img, a)

    _save(ckpt, seed=1)  # new weights written to the same path
    b = load_model(ckpt, device="cpu")
    assert b is not a
    assert not np.allclose(predict_proba(img, b), before)
    assert load_model(ckpt, device="cpu") is b

    # a changed modification time alone also reloads
    st = os.stat(ckpt / "config.json")
    os.utime(ckpt / "config.json", ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    assert load_model(ckpt, device="cpu") is not b

    clear_model_cache()
    assert load_model(ckpt, device="cpu") is not b


def test_model_may_be_a_path_or_none(tiny_checkpoint, model):
    img = _image((20, 24))
    by_path = predict_proba(img, str(tiny_checkpoint))
    np.testing.assert_array_equal(by_path, predict_proba(img, model))
    if (default_checkpoint_path() / "config.json").is_file():
        assert predict_mask(img).shape == (20, 24)  # None = the shipped default model
    else:
        with pytest.raises(CheckpointError, match="default busseg model is missing"):
            predict_mask(img)


def test_load_errors(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(tmp_path / "nope")
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="incomplete"):
        load_model(tmp_path / "half")
    with pytest.raises(ValueError, match="not available|Unknown device"):
        load_model(_save(tmp_path / "ok"), device="tpu")


def test_lazy_public_api(tiny_checkpoint):
    m = busseg.load_model(tiny_checkpoint, device="cpu")
    assert m is load_model(tiny_checkpoint, device="cpu")
    assert busseg.predict_mask(_image((10, 12)), m).shape == (10, 12)


def test_training_mode_model_is_left_as_it_was():
    model = build_model(TINY)  # training mode, like a model being fine-tuned
    model.busseg_config = {
        "preprocessing": {"input_size": [16, 16], "grey": True, "normalize": "zscore"},
        "inference": {"threshold": 0.5, "tta_flips": False},
    }
    stats = {k: v.clone() for k, v in model.state_dict().items()}
    predict_mask(_image((20, 20)), model)
    assert model.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, stats[k]), k  # batch-norm running statistics untouched


# --------------------------------------------------------------------------- input validation


@pytest.mark.parametrize(
    "image, match",
    [
        (np.zeros((5, 32, 32), np.uint8), "stack of 5 slices"),
        (np.zeros((2, 3, 32, 32), np.uint8), "2D grey"),
        (np.zeros((0, 10), np.uint8), "empty"),
        (np.zeros(7, np.uint8), "2D grey"),
        (np.full((8, 8), np.nan), "NaN"),
        (np.array([[np.inf, 1.0], [0.0, 1.0]]), "NaN or infinite"),
        (np.zeros((8, 8), np.complex64), "numeric"),
        (np.array([["a", "b"]]), "numeric"),
    ],
)
def test_bad_images_raise_clear_errors(model, image, match):
    with pytest.raises(ValueError, match=match):
        predict_proba(image, model)
    with pytest.raises(ValueError, match=match):
        predict_mask(image, model)


def test_model_without_config_and_wrong_device(model):
    bare = build_model(TINY).eval()
    with pytest.raises(ValueError, match="busseg_config"):
        predict_proba(_image((8, 8)), bare)
    with pytest.raises(TypeError, match="torch.nn.Module"):
        predict_proba(_image((8, 8)), 42)
    assert predict_proba(_image((8, 8)), model, device="cpu").shape == (8, 8)
    with pytest.raises(ValueError):
        predict_proba(_image((8, 8)), model, device="cuda:7")


# --------------------------------------------------------------------------- stacks


def test_stack_iter_matches_single_predictions(model):
    stack = np.stack([_image((30, 26), seed=s) for s in range(5)])
    got = list(predict_stack_iter(stack, model, batch_size=2, threshold=0.5))
    assert [i for i, _, _ in got] == list(range(5))
    for i, mask, proba in got:
        assert mask.shape == (30, 26) and mask.dtype == bool and proba.dtype == np.float32
        np.testing.assert_allclose(proba, predict_proba(stack[i], model), atol=1e-6)
        np.testing.assert_array_equal(mask, proba >= 0.5)


def test_stack_iter_mixed_sizes_rgb_and_laziness(model):
    images = [_image((20, 30)), _image((33, 17, 3), seed=1), _image((8, 8), seed=2)]
    gen = predict_stack_iter(images, model, batch_size=3, tta=True, keep="largest")
    i, mask, proba = next(gen)
    assert i == 0 and mask.shape == (20, 30)
    rest = list(gen)
    assert [r[1].shape for r in rest] == [(33, 17), (8, 8)]
    # a generator: a bad slice raises only when reached
    bad = predict_stack_iter([_image((8, 8)), np.full((8, 8), np.nan)], model, batch_size=1)
    assert next(bad)[0] == 0
    with pytest.raises(ValueError, match="slice 1"):
        next(bad)


@pytest.mark.parametrize(
    "images, kwargs, match",
    [
        (np.zeros((20, 20, 3), np.uint8), {}, "ambiguous"),
        (np.zeros((20, 20), np.uint8), {}, "not a stack"),
        (np.zeros((2, 8, 8), np.uint8), {"batch_size": 0}, "batch_size"),
        (np.zeros((2, 8, 8), np.uint8), {"threshold": 2.0}, "threshold"),
    ],
)
def test_stack_iter_errors(model, images, kwargs, match):
    with pytest.raises(ValueError, match=match):
        next(predict_stack_iter(images, model, **kwargs))


# --------------------------------------------------------------------------- real data


@pytest.mark.realdata
def test_rgb_original_and_grey_copy_give_the_same_mask(busi_root, busi_originals, model):
    from busseg.data.io import read_image

    orig = busi_originals / "benign" / "benign (4).png"
    copy = busi_root / "benign" / "benign (4).png"
    from PIL import Image

    with Image.open(orig) as im:
        assert im.mode == "RGB"
    rgb = np.asarray(Image.open(orig))
    np.testing.assert_array_equal(predict_proba(rgb, model), predict_proba(read_image(copy), model))


@pytest.mark.realdata
@pytest.mark.slow
def test_speed_against_a_plain_unet_forward_at_256(busi_root, tmp_path):
    """Whole predict_mask at 160x160 costs under 2x one base-16 U-Net forward at 256x256.

    Both models are base 16, depth 4, loaded the same way and timed interleaved in one
    process with one torch thread (the session fixture); medians of 7 runs.
    """
    from busseg.data.io import read_image

    assert torch.get_num_threads() == 1
    cfg = {"base_channels": 16, "depth": 4}
    m160 = load_model(_save(tmp_path / "m160", input_size=(160, 160), model_cfg=cfg), "cpu")
    m256 = load_model(_save(tmp_path / "m256", input_size=(256, 256), model_cfg=cfg), "cpu")
    path = busi_root / "malignant" / "malignant (181).png"
    image = read_image(path)
    x = torch.randn(1, 1, 256, 256).contiguous(memory_format=torch.channels_last)

    def timed(fn):
        t = time.perf_counter()
        fn()
        return time.perf_counter() - t

    def forward_256():
        with torch.inference_mode():
            m256(x)

    def whole():
        predict_mask(image, m160)

    def whole_with_decode():
        predict_mask(read_image(path), m160)

    for fn in (forward_256, whole, whole_with_decode):
        fn()  # warm-up
    runs = {f: [] for f in (forward_256, whole, whole_with_decode)}
    for _ in range(7):
        for fn, ts in runs.items():
            ts.append(timed(fn))
    ref = statistics.median(runs[forward_256])
    ratio = statistics.median(runs[whole]) / ref
    ratio_decode = statistics.median(runs[whole_with_decode]) / ref
    assert image.shape == (488, 497)
    assert ratio < 2.0, f"predict_mask takes {ratio:.2f}x a 256x256 forward"
    assert ratio_decode < 2.0, f"decode + predict_mask takes {ratio_decode:.2f}x a 256 forward"
