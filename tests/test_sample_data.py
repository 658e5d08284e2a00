"""Sample data: the shipped BUSI cases as image + ground-truth layers."""

from __future__ import annotations

import numpy as np
import pytest

from busseg._sample_data import make_busi_samples
from busseg.data.io import read_image, read_mask


def test_shipped_samples_are_image_and_ground_truth_pairs():
    from busseg.samples import sample_cases

    cases = sample_cases()
    layers = make_busi_samples()
    assert len(layers) == 2 * len(cases) >= 6
    assert {c.label for c in cases} == {"benign", "malignant", "normal"}
    for k, case in enumerate(cases):
        (image, ikw, ikind), (gt, gkw, gkind) = layers[2 * k], layers[2 * k + 1]
        assert (ikind, gkind) == ("image", "labels")
        assert ikw["name"] == case.name and gkw["name"] == f"{case.name} ground truth"
        assert image.dtype == np.uint8 and image.ndim == 2 and gt.shape == image.shape
        np.testing.assert_array_equal(image, read_image(case.image_path))
        np.testing.assert_array_equal(gt, read_mask(case.mask_paths).astype(np.uint8))
        assert ikw["metadata"]["busseg"]["label"] == case.label
        assert ikw.get("visible", True) is (k == 0)  # only the first case is shown
        assert bool(gt.any()) is (case.label != "normal")


def test_samples_from_another_folder_and_missing_folder(fake_busi, tmp_path):
    layers = make_busi_samples(fake_busi)
    names = [kw["name"] for _, kw, _ in layers]
    assert names[:2] == ["benign (1)", "benign (1) ground truth"]
    assert len(layers) == 12
    with pytest.raises(FileNotFoundError, match="reinstall"):
        make_busi_samples(tmp_path / "nothing here")


def test_napari_lists_and_opens_the_sample(busseg_plugin):
    import napari

    viewer = napari.components.ViewerModel()
    viewer.open_sample("napari-busseg", "busi_samples")
    kinds = [type(layer).__name__ for layer in viewer.layers]
    assert kinds[:2] == ["Image", "Labels"] and len(kinds) >= 6
    assert viewer.layers[1].name.endswith(" ground truth")
