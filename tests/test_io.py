import os

import numpy as np
import pytest
from PIL import Image

from busseg.data import io as bio
from busseg.data.io import ImageReadError, read_image, read_mask, to_grey, write_mask_png

RNG = np.random.default_rng(0)
GREY = RNG.integers(0, 256, size=(5, 7), dtype=np.uint8)
COLOUR = RNG.integers(0, 256, size=(5, 7, 3), dtype=np.uint8)


def _luma(rgb):
    return rgb[..., :3].astype(np.float64) @ np.array([0.299, 0.587, 0.114])


# ---------------------------------------------------------------- to_grey


def test_to_grey_grey_uint8_is_unchanged():
    out = to_grey(GREY)
    assert out.dtype == np.uint8 and out.shape == (5, 7)
    np.testing.assert_array_equal(out, GREY)
    np.testing.assert_array_equal(to_grey(GREY[..., None]), GREY)  # (H, W, 1)


def test_to_grey_rgb_with_equal_channels_keeps_values_exactly():
    rgb = np.repeat(GREY[..., None], 3, axis=-1)
    np.testing.assert_array_equal(to_grey(rgb), GREY)


def test_to_grey_colour_rgb_uses_bt601_luma_like_pillow():
    out = to_grey(COLOUR)
    assert out.dtype == np.uint8 and out.shape == (5, 7)
    np.testing.assert_array_equal(out, np.rint(_luma(COLOUR)).astype(np.uint8))
    pil = np.asarray(Image.fromarray(COLOUR).convert("L"))
    assert np.abs(out.astype(int) - pil).max() <= 1


def test_to_grey_rgba_ignores_alpha():
    for alpha in (0, 128, 255):
        rgba = np.concatenate([COLOUR, np.full((5, 7, 1), alpha, np.uint8)], axis=-1)
        np.testing.assert_array_equal(to_grey(rgba), to_grey(COLOUR))
    transparent = np.zeros((5, 7, 1), np.uint8)
    grey_rgba = np.concatenate([np.repeat(GREY[..., None], 3, -1), transparent], -1)
    np.testing.assert_array_equal(to_grey(grey_rgba), GREY)


def test_to_grey_uint16_scales_full_range_to_uint8():
    a = np.array([[0, 257, 32896], [65535, 65280, 128]], dtype=np.uint16)
    out = to_grey(a)
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, [[0, 1, 128], [255, 254, 0]])


def test_to_grey_uint16_colour_scales_like_uint16_grey():
    # a 16-bit colour image must map like a 16-bit grey one (value / 257), not be stretched
    rgb16 = COLOUR.astype(np.uint16) * 257 // 4  # 0 .. 16383: a dim 16-bit image
    out = to_grey(rgb16)
    expected = np.rint(_luma(rgb16) / 257.0)
    assert out.dtype == np.uint8
    assert np.abs(out.astype(int) - expected).max() <= 1
    assert out.max() <= 64


def test_to_grey_float_unit_range_and_arbitrary_range():
    f = np.array([[0.0, 0.5], [1.0, 0.25]])
    np.testing.assert_array_equal(to_grey(f), [[0, 128], [255, 64]])
    g = np.array([[-10.0, 0.0], [10.0, 5.0]], dtype=np.float32)  # min-max scaled
    np.testing.assert_array_equal(to_grey(g), [[0, 128], [255, 191]])
    const = np.full((3, 3), 7.5)
    np.testing.assert_array_equal(to_grey(const), np.zeros((3, 3), np.uint8))
    nan = np.array([[np.nan, 0.0], [1.0, 0.5]])
    out = to_grey(nan)
    assert out.dtype == np.uint8 and out[0, 0] == 0 and out[1, 0] == 255


def test_to_grey_bool_is_0_or_255():
    b = np.array([[True, False], [False, True]])
    np.testing.assert_array_equal(to_grey(b), [[255, 0], [0, 255]])


@pytest.mark.parametrize("shape", [(4,), (4, 4, 2), (2, 4, 4, 3), (0, 5)])
def test_to_grey_rejects_bad_shapes(shape):
    with pytest.raises(ValueError, match="image"):
        to_grey(np.zeros(shape, np.uint8))


# ---------------------------------------------------------------- read_image / read_mask


def test_read_image_modes(tmp_path):
    Image.fromarray(GREY).save(tmp_path / "l.png")
    Image.fromarray(np.repeat(GREY[..., None], 3, -1)).save(tmp_path / "rgb.png")
    Image.fromarray(np.dstack([GREY] * 3 + [np.zeros_like(GREY)])).save(tmp_path / "rgba.png")
    Image.fromarray(GREY).convert("P").save(tmp_path / "p.png")
    Image.fromarray(GREY.astype(np.uint16) * 257).save(tmp_path / "i16.png")
    Image.fromarray(GREY).save(tmp_path / "l.tif")
    for name in ("l.png", "rgb.png", "rgba.png", "p.png", "i16.png", "l.tif"):
        out = read_image(tmp_path / name)
        assert out.dtype == np.uint8 and out.shape == GREY.shape, name
        np.testing.assert_array_equal(out, GREY, err_msg=name)


def test_read_image_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.png"):
        read_image(tmp_path / "nope.png")
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
    with pytest.raises(ImageReadError, match="broken.png"):
        read_image(bad)
    assert issubclass(ImageReadError, ValueError)


def test_read_mask_union_and_any_channel(tmp_path):
    a = np.zeros((6, 8), np.uint8)
    a[1:3, 1:3] = 255
    b = np.zeros((6, 8), bool)
    b[4, 6] = True
    Image.fromarray(a).save(tmp_path / "x_mask.png")
    Image.fromarray(b).save(tmp_path / "x_mask_1.png")  # 1-bit PNG
    rgba = np.zeros((6, 8, 4), np.uint8)
    rgba[..., 3] = 255  # opaque everywhere: alpha must not count as lesion
    rgba[0, 7, 1] = 3  # any value > 0 in a colour channel is lesion
    Image.fromarray(rgba).save(tmp_path / "x_mask_2.png")
    m = read_mask([tmp_path / "x_mask.png", tmp_path / "x_mask_1.png", tmp_path / "x_mask_2.png"])
    expected = (a > 0) | b
    expected[0, 7] = True
    assert m.dtype == bool
    np.testing.assert_array_equal(m, expected)
    np.testing.assert_array_equal(read_mask(str(tmp_path / "x_mask.png")), a > 0)  # one path


def test_read_mask_errors(tmp_path):
    with pytest.raises(ValueError, match="at least one"):
        read_mask([])
    Image.fromarray(np.zeros((6, 8), np.uint8)).save(tmp_path / "a.png")
    Image.fromarray(np.zeros((8, 6), np.uint8)).save(tmp_path / "b.png")
    with pytest.raises(ValueError, match="size"):
        read_mask([tmp_path / "a.png", tmp_path / "b.png"])


@pytest.mark.realdata
def test_read_image_rgb_originals_equal_grey_copies(busi_root, busi_originals):
    originals = sorted(p for p in busi_originals.glob("*/*.png") if "_mask" not in p.stem)
    assert len(originals) == 6
    for orig in originals:
        with Image.open(orig) as im:
            assert im.mode == "RGB", orig  # as distributed
        copy = busi_root / orig.parent.name / orig.name
        a, b = read_image(orig), read_image(copy)
        assert a.dtype == np.uint8 and a.ndim == 2, orig
        np.testing.assert_array_equal(a, b, err_msg=orig.name)


@pytest.mark.realdata
def test_read_mask_three_mask_case_is_the_union(busi_root, busi_originals):
    paths = [busi_root / "benign" / f"benign (195)_mask{s}.png" for s in ("", "_1", "_2")]
    parts = [read_mask(p) for p in paths]
    union = read_mask(paths)
    assert union.shape == (611, 729) and union.dtype == bool
    np.testing.assert_array_equal(union, parts[0] | parts[1] | parts[2])
    assert all(p.any() for p in parts)
    assert union.sum() > max(p.sum() for p in parts)  # three separate lesions
    originals = sorted(busi_originals.glob("benign/benign (195)_mask*"))
    np.testing.assert_array_equal(union, read_mask(originals))


@pytest.mark.realdata
def test_read_mask_rgba_mask_of_benign_4(busi_root):
    path = busi_root / "benign" / "benign (4)_mask_1.png"
    with Image.open(path) as im:
        assert im.mode == "RGBA"
        rgba = np.asarray(im)
    m = read_mask(path)
    assert m.shape == rgba.shape[:2] and m.dtype == bool
    np.testing.assert_array_equal(m, rgba[..., :3].max(-1) > 0)
    assert 0 < m.sum() < 0.5 * m.size  # a lesion, not the opaque alpha plane
    both = read_mask([busi_root / "benign" / "benign (4)_mask.png", path])
    assert both.sum() >= m.sum() and (both | m).sum() == both.sum()


# ---------------------------------------------------------------- write_mask_png


def test_write_mask_png_round_trip_values_0_255(tmp_path):
    mask = np.zeros((9, 11), np.int32)
    mask[2:5, 3:8] = 1
    mask[7, 1] = 3  # napari Labels value > 1 is lesion too
    p = write_mask_png(tmp_path / "sub" / "m.png", mask)
    assert p == tmp_path / "sub" / "m.png"
    with Image.open(p) as im:
        assert im.mode == "L"
        arr = np.asarray(im)
    assert set(np.unique(arr)) == {0, 255}
    np.testing.assert_array_equal(arr > 0, mask > 0)
    np.testing.assert_array_equal(read_mask(p), mask > 0)
    assert os.listdir(tmp_path / "sub") == ["m.png"]  # no temporary file left


def test_write_mask_png_never_overwrites_without_asking(tmp_path):
    p = tmp_path / "m.png"
    first = np.eye(4, dtype=bool)
    write_mask_png(p, first)
    before = p.read_bytes()
    with pytest.raises(FileExistsError, match="overwrite"):
        write_mask_png(p, ~first)
    assert p.read_bytes() == before
    write_mask_png(p, ~first, overwrite=True)
    np.testing.assert_array_equal(read_mask(p), ~first)
    assert sorted(os.listdir(tmp_path)) == ["m.png"]


def test_write_mask_png_rejects_non_2d(tmp_path):
    with pytest.raises(ValueError, match="2D"):
        write_mask_png(tmp_path / "m.png", np.zeros((2, 3, 3)))
    assert not (tmp_path / "m.png").exists()


def test_write_mask_png_is_atomic_when_the_final_rename_fails(tmp_path, monkeypatch):
    p = tmp_path / "m.png"
    write_mask_png(p, np.eye(5, dtype=bool))
    before = p.read_bytes()

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(bio.os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        write_mask_png(p, np.ones((5, 5), bool), overwrite=True)
    assert p.read_bytes() == before  # the old mask is intact
    monkeypatch.setattr(bio.os, "link", boom)  # a file system without hard links
    with pytest.raises(OSError, match="disk full"):
        write_mask_png(tmp_path / "new.png", np.ones((5, 5), bool))
    assert sorted(os.listdir(tmp_path)) == ["m.png"]  # nothing half-written, no temporary file


# ---------------------------------------------------------------- empty files, stacks


def test_empty_file_is_called_empty_and_named_once(tmp_path):
    path = tmp_path / "scan.png"
    path.write_bytes(b"")
    for fn in (read_image, read_mask, bio.read_stack):
        with pytest.raises(ImageReadError) as info:
            fn(path)
        msg = str(info.value)
        assert "empty (0 bytes)" in msg and msg.count(str(path)) == 1, msg


def test_corrupt_file_message_names_the_file_once(tmp_path):
    path = tmp_path / "scan.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    with pytest.raises(ImageReadError) as info:
        read_image(path)
    assert str(info.value).count(str(path)) == 1


def test_read_stack_of_a_multipage_tiff_and_of_a_single_image(tmp_path):
    import tifffile

    pages = RNG.integers(0, 256, size=(4, 6, 5), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "pages.tif", pages, photometric="minisblack")
    assert bio.frame_count(tmp_path / "pages.tif") == 4
    np.testing.assert_array_equal(bio.read_stack(tmp_path / "pages.tif"), pages)
    with pytest.raises(ImageReadError, match="4 pages.*read_stack"):
        read_image(tmp_path / "pages.tif")
    Image.fromarray(GREY).save(tmp_path / "one.png")
    assert bio.frame_count(tmp_path / "one.png") == 1
    np.testing.assert_array_equal(bio.read_stack(tmp_path / "one.png"), GREY[None])
    assert bio.frame_count(tmp_path / "missing.png") == 0
