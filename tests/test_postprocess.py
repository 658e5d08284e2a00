import numpy as np
import pytest

from busseg.postprocess import KEEP_CHOICES, postprocess_mask


def _square(mask, y, x, s):
    mask[y : y + s, x : x + s] = True
    return mask


def test_defaults_return_a_bool_copy():
    m = np.zeros((10, 12), np.uint8)
    m[2:5, 3:7] = 255
    out = postprocess_mask(m)
    assert out.dtype == bool and out.shape == m.shape
    np.testing.assert_array_equal(out, m > 0)
    b = m > 0
    out_b = postprocess_mask(b)
    assert out_b is not b
    out_b[0, 0] = True
    assert not b[0, 0]  # the input is never modified


def test_fill_holes():
    m = np.zeros((9, 9), bool)
    m[1:8, 1:8] = True
    m[3:6, 3:6] = False  # a hole
    before = m.copy()
    out = postprocess_mask(m, fill_holes=True)
    assert out[1:8, 1:8].all()
    np.testing.assert_array_equal(m, before)
    # an open "U" touching the border is background connected to the outside: not filled
    u = np.zeros((6, 6), bool)
    u[:, 1] = u[:, 4] = u[5, 1:5] = True
    np.testing.assert_array_equal(postprocess_mask(u, fill_holes=True), u)
    assert not postprocess_mask(m).all()  # without the flag the hole stays


def test_min_area_drops_small_components():
    m = np.zeros((20, 20), bool)
    _square(m, 1, 1, 4)  # 16 px
    _square(m, 10, 10, 3)  # 9 px
    m[18, 18] = True  # 1 px
    out = postprocess_mask(m, min_area=9)
    assert out[1:5, 1:5].all() and out[10:13, 10:13].all() and not out[18, 18]
    out = postprocess_mask(m, min_area=10)
    assert out.sum() == 16
    assert postprocess_mask(m, min_area=17).sum() == 0


def test_keep_largest_and_eight_connectivity():
    m = np.zeros((20, 20), bool)
    _square(m, 1, 1, 3)  # 9 px
    _square(m, 10, 10, 4)  # 16 px
    out = postprocess_mask(m, keep="largest")
    assert out.sum() == 16 and out[10:14, 10:14].all()
    # diagonal neighbours form one component (8-connectivity)
    d = np.zeros((10, 10), bool)
    d[np.arange(5), np.arange(5)] = True  # 5 px diagonal line
    _square(d, 7, 7, 2)  # 4 px
    assert postprocess_mask(d, keep="largest").sum() == 5


def test_keep_largest_after_min_area_and_empty():
    m = np.zeros((10, 10), bool)
    _square(m, 0, 0, 2)
    _square(m, 5, 5, 2)
    assert postprocess_mask(m, keep="largest", min_area=5).sum() == 0
    assert postprocess_mask(np.zeros((4, 4), bool), keep="largest", fill_holes=True).sum() == 0
    # a tie keeps exactly one component
    assert postprocess_mask(m, keep="largest").sum() == 4


@pytest.mark.parametrize(
    "kwargs, shape, match",
    [
        ({"keep": "biggest"}, (4, 4), "keep must be one of"),
        ({"min_area": -1}, (4, 4), "min_area"),
        ({"min_area": 2.5}, (4, 4), "min_area"),
        ({}, (2, 4, 4), "2D"),
        ({}, (0, 4), "2D"),
    ],
)
def test_errors(kwargs, shape, match):
    with pytest.raises(ValueError, match=match):
        postprocess_mask(np.zeros(shape, bool), **kwargs)


def test_keep_choices():
    assert KEEP_CHOICES == ("all", "largest")
