"""CorrectionStore: BUSI-layout corrections, atomic, never over a correction without overwrite."""

from __future__ import annotations

import numpy as np
import pytest

from busseg.corrections import CORRECTED, NOT_SEGMENTED, PREDICTED, CorrectionStore
from busseg.data.busi import discover_busi
from busseg.data.io import read_image, read_mask


def _pair(h=20, w=30, seed=0):
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (h, w), dtype=np.uint8)
    mask = np.zeros((h, w), np.uint8)
    mask[5:12, 8:20] = 1
    return image, mask


def test_paths_follow_busi_layout(tmp_path, fake_busi):
    store = CorrectionStore(tmp_path / "corr")
    rec = discover_busi(fake_busi).records[0]
    paths = store.path_for(rec)
    assert paths.image == tmp_path / "corr" / rec.label / f"{rec.name}.png"
    assert paths.mask == tmp_path / "corr" / rec.label / f"{rec.name}_mask.png"
    # a name plus a class, with or without the image suffix
    assert store.path_for("benign (4).png", "benign") == store.path_for("benign (4)", "benign")
    with pytest.raises(ValueError, match="class"):
        store.path_for("benign (4)")
    with pytest.raises(ValueError, match="plain name"):
        store.path_for("../evil", "benign")


def test_save_writes_a_busi_dataset_and_refuses_to_overwrite(tmp_path):
    store = CorrectionStore(tmp_path / "corr")
    image, mask = _pair()
    assert store.status("benign (4)", "benign") == NOT_SEGMENTED
    assert store.status("benign (4)", "benign", predicted=True) == PREDICTED
    paths = store.save("benign (4)", "benign", image, mask)
    assert store.status("benign (4)", "benign", predicted=True) == CORRECTED
    np.testing.assert_array_equal(read_image(paths.image), image)
    np.testing.assert_array_equal(read_mask(paths.mask), mask > 0)
    from PIL import Image

    assert set(np.unique(np.asarray(Image.open(paths.mask)))) == {0, 255}

    before = paths.mask.read_bytes()
    with pytest.raises(FileExistsError, match="overwrite=True"):
        store.save("benign (4)", "benign", image, np.zeros_like(mask))
    assert paths.mask.read_bytes() == before
    store.save("benign (4)", "benign", image, np.zeros_like(mask), overwrite=True)
    assert not read_mask(paths.mask).any()
    # no temporary files left behind
    assert sorted(p.name for p in paths.mask.parent.iterdir()) == [
        "benign (4).png",
        "benign (4)_mask.png",
    ]

    index = discover_busi(tmp_path / "corr")
    assert [r.rel_path for r in index.usable] == ["benign/benign (4).png"]


def test_save_keeps_an_identical_image_but_not_a_different_one(tmp_path):
    store = CorrectionStore(tmp_path / "corr")
    image, mask = _pair()
    paths = store.path_for("x", "normal")
    paths.image.parent.mkdir(parents=True)
    from PIL import Image

    Image.fromarray(image).save(paths.image)  # e.g. a save interrupted before the mask
    store.save("x", "normal", image, mask)
    assert paths.mask.exists()
    other = CorrectionStore(tmp_path / "corr2")
    p2 = other.path_for("x", "normal")
    p2.image.parent.mkdir(parents=True)
    Image.fromarray(255 - image).save(p2.image)
    with pytest.raises(FileExistsError, match="another image"):
        other.save("x", "normal", image, mask)
    assert not p2.mask.exists()


def test_save_validates_shapes(tmp_path):
    store = CorrectionStore(tmp_path / "corr")
    image, mask = _pair()
    with pytest.raises(ValueError, match="30x20"):
        store.save("a", "benign", image, mask[:10])
    with pytest.raises(ValueError, match="2D"):
        store.save("a", "benign", image, np.stack([mask, mask]))
    rgb = np.repeat(image[..., None], 3, axis=-1)
    paths = store.save("a", "benign", rgb, mask)  # colour images are stored grey
    np.testing.assert_array_equal(read_image(paths.image), image)


@pytest.mark.parametrize("where", ["equal", "inside", "contains"])
def test_refuses_a_folder_overlapping_the_dataset(tmp_path, fake_busi, where):
    corr = {
        "equal": fake_busi,
        "inside": fake_busi / "benign" / "corrections",
        "contains": fake_busi.parent,
    }[where]
    with pytest.raises(ValueError, match="outside the dataset"):
        CorrectionStore(corr, dataset_root=fake_busi)
    CorrectionStore(tmp_path / "elsewhere", dataset_root=fake_busi)  # fine


def test_load_pairs(tmp_path):
    store = CorrectionStore(tmp_path / "corr")
    assert store.load_pairs() == ([], [], [])  # the folder does not exist yet
    a, ma = _pair(seed=1)
    b, mb = _pair(24, 16, seed=2)
    store.save("malignant (2)", "malignant", b, mb[:24, :16])
    store.save("benign (10)", "benign", a, ma)
    store.save("benign (9)", "benign", a, ma)
    images, masks, names = store.load_pairs()
    assert names == [
        "benign/benign (9).png",
        "benign/benign (10).png",
        "malignant/malignant (2).png",
    ]
    assert [m.dtype for m in masks] == [np.bool_] * 3
    assert [i.shape for i in images] == [(20, 30), (20, 30), (24, 16)]
    assert [m.shape for m in masks] == [i.shape for i in images]
    np.testing.assert_array_equal(masks[0], ma > 0)
    image, mask = store.load("benign (9)", "benign")
    np.testing.assert_array_equal(image, a)


def test_core_module_imports_no_qt():
    import subprocess
    import sys

    code = (
        "import sys, busseg.corrections; "
        "bad = [m for m in ('qtpy', 'PyQt6', 'napari', 'torch') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_store_names_its_manifest(tmp_path):
    from busseg.manifest import MANIFEST_NAME, CaseManifest

    store = CorrectionStore(tmp_path / "corr")
    assert isinstance(store.manifest, CaseManifest)
    assert store.manifest.path == tmp_path / "corr" / MANIFEST_NAME
    assert store.manifest.read() == []  # no manifest yet: no rows, nothing written
    assert not (tmp_path / "corr").exists()
    image, mask = _pair()
    store.save("a", "benign", image, mask)
    # the manifest beside the class folders does not disturb reading the folder as BUSI
    store.manifest.write([])
    assert [r.rel_path for r in store.records()] == ["benign/a.png"]
