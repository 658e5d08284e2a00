"""The Labels writer: PNG 0/255 masks, PNG folders for stacks, TIFF that keeps label values."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from busseg import _reader
from busseg._writer import write_labels
from busseg.data.io import read_mask


def _labels(shape=(12, 16), seed=0, n=3):
    rng = np.random.default_rng(seed)
    return rng.integers(0, n, shape).astype(np.uint8)


def test_png_round_trip_through_the_reader(tmp_path):
    data = _labels()
    path = tmp_path / "benign (4)_mask.png"
    assert write_labels(str(path), data, {"name": "x"}) == [str(path)]
    raw = np.asarray(Image.open(path))
    assert raw.dtype == np.uint8 and set(np.unique(raw)) == {0, 255}
    np.testing.assert_array_equal(read_mask(path), data > 0)
    # the reader opens it back as a 0/1 Labels layer
    ((back, kw, kind),) = _reader.read_mask_file(str(path))
    assert kind == "labels"
    np.testing.assert_array_equal(back, (data > 0).astype(np.uint8))
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # no temporary file left


def test_png_replaces_the_file_napari_confirmed(tmp_path):
    path = tmp_path / "m.png"
    write_labels(str(path), np.ones((4, 4), np.uint8), {})
    write_labels(str(path), np.zeros((4, 4), np.uint8), {})
    assert not read_mask(path).any()


def test_tiff_keeps_values_2d_and_3d(tmp_path):
    import dask.array as da

    d2 = _labels(n=300).astype(np.uint16)
    write_labels(str(tmp_path / "a.tif"), d2, {})
    back = tifffile.imread(tmp_path / "a.tif")
    assert back.dtype == np.uint16
    np.testing.assert_array_equal(back, d2)

    d3 = _labels((5, 12, 16), n=4)
    lazy = da.from_array(d3, chunks=(1, 12, 16))
    assert write_labels(str(tmp_path / "s.tiff"), lazy, {}) == [str(tmp_path / "s.tiff")]
    back = tifffile.imread(tmp_path / "s.tiff")
    assert back.shape == (5, 12, 16)
    np.testing.assert_array_equal(back, d3)

    write_labels(str(tmp_path / "b.tif"), d2 > 0, {})  # bool -> uint8 0/1
    assert tifffile.imread(tmp_path / "b.tif").dtype == np.uint8


def test_png_stack_from_the_folder_reader_is_busi_named_and_cropped(tmp_path):
    root = tmp_path / "data" / "Dataset_BUSI_with_GT"
    sizes = {"benign/benign (1)": (10, 14), "malignant/malignant (3)": (16, 8)}
    for stem, (h, w) in sizes.items():
        (root / stem).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((h, w), 100, np.uint8)).save(root / f"{stem}.png")
        m = np.zeros((h, w), np.uint8)
        m[1:4, 1:5] = 255
        Image.fromarray(m).save(root / f"{stem}_mask.png")
    layers = _reader.read_folder(str(root))
    gt, kwargs, _ = layers[1]
    out = tmp_path / "saved.png"
    written = write_labels(str(out), gt, kwargs)
    folder = tmp_path / "saved"
    assert written == [
        str(folder / "benign" / "benign (1)_mask.png"),
        str(folder / "malignant" / "malignant (3)_mask.png"),
    ]
    for stem, shape in sizes.items():
        saved = read_mask(folder / f"{Path(stem).parent}/{Path(stem).name}_mask.png")
        assert saved.shape == shape  # cropped back to the original size
        np.testing.assert_array_equal(saved, read_mask(root / f"{stem}_mask.png"))
    # the per-slice files were never shown in napari's dialog: no silent overwrite
    with pytest.raises(FileExistsError, match="already exist"):
        write_labels(str(out), gt, kwargs)


def test_png_stack_without_metadata_and_bad_input(tmp_path):
    data = _labels((3, 6, 7))
    written = write_labels(str(tmp_path / "stack.png"), data, {})
    assert [Path(p).name for p in written] == [f"stack_{i:04d}.png" for i in range(3)]
    np.testing.assert_array_equal(read_mask(written[2]), data[2] > 0)
    with pytest.raises(ValueError, match="2D"):
        write_labels(str(tmp_path / "x.png"), np.zeros((2, 2, 2, 2)), {})
    assert write_labels(str(tmp_path / "x.jpg"), data[0], {}) == []


def test_napari_saves_a_labels_layer_with_the_plugin(tmp_path):
    import napari
    import napari.layers
    from npe2 import PluginManager, PluginManifest

    import busseg

    pm = PluginManager.instance()
    if "napari-busseg" not in pm:
        pm.discover()
    if "napari-busseg" not in pm:
        pm.register(PluginManifest.from_file(Path(busseg.__file__).parent / "napari.yaml"))
    data = _labels()
    layer = napari.layers.Labels(data, name="benign (4) prediction")
    path = tmp_path / "benign (4)_mask.png"
    written = napari.save_layers(str(path), [layer], plugin="napari-busseg")
    assert written == [str(path)]
    np.testing.assert_array_equal(read_mask(path), data > 0)
