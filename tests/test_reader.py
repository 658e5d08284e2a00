"""The napari reader: single cases, mask files, lazy folder stacks, corrupt files, real BUSI."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from busseg import _reader
from busseg._reader import napari_get_reader
from busseg.data.io import read_image, read_mask


@pytest.fixture
def notes(monkeypatch):
    """Collect the reader's notifications instead of showing them."""
    seen: list[tuple[str, str]] = []
    monkeypatch.setattr(_reader, "_notify", lambda kind, msg: seen.append((kind, msg)))
    return seen


def _png(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


@pytest.fixture
def mixed_tree(tmp_path):
    """BUSI layout with three sizes; ``benign (2)`` has two masks, ``normal (1)`` an empty one."""
    root = tmp_path / "Dataset_BUSI_with_GT"
    rng = np.random.default_rng(0)
    spec = {
        "benign/benign (1)": (30, 40),
        "benign/benign (2)": (50, 20),
        "malignant/malignant (1)": (25, 60),
        "normal/normal (1)": (30, 40),
    }
    for stem, (h, w) in spec.items():
        _png(root / f"{stem}.png", rng.integers(1, 256, (h, w), dtype=np.uint8))
        m = np.zeros((h, w), np.uint8)
        if not stem.startswith("normal"):
            m[2:10, 3:12] = 255
        _png(root / f"{stem}_mask.png", m)
    m1 = np.zeros((50, 20), np.uint8)
    m1[30:40, 5:15] = 255
    _png(root / "benign/benign (2)_mask_1.png", m1)
    return root


# ------------------------------------------------------------------ get_reader


def test_get_reader_declines_what_it_does_not_handle(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "empty").mkdir()
    assert napari_get_reader(str(tmp_path / "notes.txt")) is None
    assert napari_get_reader(str(tmp_path / "missing.png")) is None
    assert napari_get_reader(str(tmp_path / "empty")) is None
    assert napari_get_reader([str(tmp_path / "notes.txt"), str(tmp_path / "x.png")]) is None


def test_multipage_tiff_opens_as_a_stack(tmp_path, notes):
    import tifffile

    pages = np.random.default_rng(0).integers(0, 256, (3, 8, 9), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "stack.tif", pages, photometric="minisblack")
    tifffile.imwrite(tmp_path / "one.tif", np.zeros((8, 8), np.uint8))
    reader = napari_get_reader(str(tmp_path / "stack.tif"))
    assert reader is _reader.read_frames_file
    [(data, kwargs, kind)] = reader(str(tmp_path / "stack.tif"))
    assert kind == "image" and kwargs["name"] == "stack"
    np.testing.assert_array_equal(data, pages)
    meta = kwargs["metadata"]["busseg"]
    assert meta["kind"] == "frames" and meta["n_frames"] == 3 and meta["original_shape"] == [8, 9]
    assert napari_get_reader(str(tmp_path / "one.tif")) is _reader.read_image_file
    assert not notes


def test_get_reader_decodes_no_pixels(mixed_tree, monkeypatch):
    def boom(*_, **__):
        raise AssertionError("get_reader must not open image files")

    monkeypatch.setattr(Image, "open", boom)
    img = mixed_tree / "benign" / "benign (2).png"
    assert napari_get_reader(str(img)) is _reader.read_image_file
    assert napari_get_reader([str(img)]) is _reader.read_image_file
    assert napari_get_reader(str(mixed_tree / "benign" / "benign (2)_mask_1.png")) is (
        _reader.read_mask_file
    )
    for folder in (mixed_tree, mixed_tree.parent, mixed_tree / "normal"):
        assert napari_get_reader(str(folder)) is _reader.read_folder
    two = [str(img), str(mixed_tree / "benign" / "benign (1).png")]
    assert napari_get_reader(two) is _reader.read_files_as_stack


# ------------------------------------------------------------------ one case


def test_read_case_with_union_ground_truth(mixed_tree, notes):
    path = mixed_tree / "benign" / "benign (2).png"
    layers = napari_get_reader(str(path))(str(path))
    assert [(kw["name"], kind) for _, kw, kind in layers] == [
        ("benign (2)", "image"),
        ("benign (2) ground truth", "labels"),
    ]
    (image, ikw, _), (gt, gkw, _) = layers
    np.testing.assert_array_equal(image, read_image(path))
    assert image.dtype == np.uint8 and image.shape == (50, 20)
    assert gt.dtype == np.uint8 and set(np.unique(gt)) == {0, 1}
    assert gt[5, 5] == 1 and gt[35, 10] == 1  # both masks
    meta = ikw["metadata"]["busseg"]
    assert meta["label"] == "benign"
    assert meta["original_shape"] == [50, 20]
    assert meta["source"] == str(path)
    assert meta["root"] == str(mixed_tree)
    assert len(meta["mask_paths"]) == 2
    assert ikw["colormap"] == "gray"
    assert not notes


def test_image_without_masks_and_mask_file(tmp_path, notes):
    img = _png(tmp_path / "scan.png", np.full((8, 9, 3), 60, np.uint8))
    layers = napari_get_reader(str(img))(str(img))
    assert len(layers) == 1 and layers[0][0].shape == (8, 9)
    assert layers[0][1]["metadata"]["busseg"]["label"] == "unknown"

    m = np.zeros((8, 9, 4), np.uint8)
    m[2:4, 2:4] = (255, 255, 255, 255)
    mpath = _png(tmp_path / "scan_mask.png", m)
    ((data, kw, kind),) = napari_get_reader(str(mpath))(str(mpath))
    assert kind == "labels" and kw["name"] == "scan_mask"
    assert data.sum() == 4 and data.max() == 1


def test_corrupt_file_is_a_notification_not_a_traceback(tmp_path, notes):
    bad = tmp_path / "benign (9).png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    assert napari_get_reader(str(bad))(str(bad)) == [(None,)]
    assert notes and notes[0][0] == "error" and "benign (9).png" in notes[0][1]


def test_corrupt_mask_keeps_the_image(mixed_tree, notes):
    (mixed_tree / "benign" / "benign (1)_mask.png").write_bytes(b"not a png")
    path = mixed_tree / "benign" / "benign (1).png"
    layers = _reader.read_image_file(str(path))
    assert [kind for _, _, kind in layers] == ["image"]
    assert notes[0][0] == "warning" and "benign (1).png" in notes[0][1]


# ------------------------------------------------------------------ lazy stacks


def test_folder_opens_as_padded_lazy_stacks(mixed_tree, notes, monkeypatch):
    import dask.array as da

    decoded = []
    real = _reader._SliceLoader.image
    monkeypatch.setattr(
        _reader._SliceLoader, "image", lambda self, p: decoded.append(p) or real(self, p)
    )
    layers = _reader.read_folder(str(mixed_tree.parent))
    assert decoded == []  # nothing decoded until a slice is asked for
    (images, ikw, ikind), (masks, mkw, mkind) = layers
    assert (ikind, mkind) == ("image", "labels")
    assert isinstance(images, da.Array) and isinstance(masks, da.Array)
    assert images.shape == masks.shape == (4, 50, 60)  # max H, max W
    assert images.dtype == masks.dtype == np.uint8
    meta = ikw["metadata"]["busseg"]
    assert meta["kind"] == "stack" and meta["root"] == str(mixed_tree)
    slices = meta["slices"]
    assert [s["name"] for s in slices] == [
        "benign (1)",
        "benign (2)",
        "malignant (1)",
        "normal (1)",
    ]
    assert [s["label"] for s in slices] == ["benign", "benign", "malignant", "normal"]
    assert slices[1]["original_shape"] == [50, 20]
    assert mkw["name"] == f"{ikw['name']} ground truth"

    s1 = np.asarray(images[1])
    assert len(decoded) == 1
    truth = read_image(slices[1]["image_path"])
    np.testing.assert_array_equal(s1[:50, :20], truth)
    assert not s1[:, 20:].any()  # zero padding at the right
    m1 = np.asarray(masks[1])
    np.testing.assert_array_equal(m1[:50, :20], read_mask(slices[1]["mask_paths"]))
    assert not np.asarray(masks[3]).any()  # the normal case
    assert not notes


def test_class_folder_and_corrupt_slice(mixed_tree, notes):
    (mixed_tree / "benign" / "benign (1).png").write_bytes(b"broken")
    layers = _reader.read_folder(str(mixed_tree / "benign"))
    images = layers[0][0]
    assert images.shape == (2, 50, 20)
    assert layers[0][1]["metadata"]["busseg"]["root"] == str(mixed_tree)
    notes.clear()
    assert not np.asarray(images[0]).any()  # the corrupt slice is zeros
    np.asarray(images[0])
    warnings = [m for k, m in notes if k == "warning"]
    assert len(warnings) == 1 and "benign (1).png" in warnings[0]  # warned once
    assert np.asarray(images[1]).any()


def test_plain_folder_and_file_list(tmp_path, notes):
    a = _png(tmp_path / "imgs" / "a 2.png", np.full((5, 6), 7, np.uint8))
    b = _png(tmp_path / "imgs" / "a 10.png", np.full((9, 4), 9, np.uint8))
    layers = _reader.read_folder(str(tmp_path / "imgs"))
    assert len(layers) == 1  # no masks, no Labels layer
    stack = layers[0][0]
    assert stack.shape == (2, 9, 6)
    assert [s["name"] for s in layers[0][1]["metadata"]["busseg"]["slices"]] == ["a 2", "a 10"]
    layers = _reader.read_files_as_stack([str(b), str(a)])
    assert np.asarray(layers[0][0][0])[:9, :4].min() == 9


# ------------------------------------------------------------------ real data


@pytest.mark.realdata
def test_real_rgb_originals_and_grey_copies_agree(busi_originals, busi_root, notes):
    for stem in ("benign/benign (195)", "malignant/malignant (65)", "normal/normal (1)"):
        orig = _reader.read_image_file(str(busi_originals / f"{stem}.png"))
        grey = _reader.read_image_file(str(busi_root / f"{stem}.png"))
        assert Image.open(busi_originals / f"{stem}.png").mode == "RGB"
        assert len(orig) == len(grey) == 2
        for (a, _, ka), (b, _, kb) in zip(orig, grey, strict=True):
            assert ka == kb and a.dtype == np.uint8 and a.ndim == 2
            np.testing.assert_array_equal(a, b)
    three = _reader.read_image_file(str(busi_originals / "benign/benign (195).png"))
    assert len(three[0][1]["metadata"]["busseg"]["mask_paths"]) == 3
    assert not notes


@pytest.mark.realdata
@pytest.mark.slow
def test_full_busi_root_opens_lazily_and_fast(busi_root, notes):
    t0 = time.perf_counter()
    reader = napari_get_reader(str(busi_root.parent))
    layers = reader(str(busi_root.parent))
    elapsed = time.perf_counter() - t0
    images, masks = layers[0][0], layers[1][0]
    assert images.shape == masks.shape == (780, 719, 1048)
    assert elapsed < 15, f"opening BUSI took {elapsed:.1f} s (about 1 s expected)"
    slices = layers[0][1]["metadata"]["busseg"]["slices"]
    assert len(slices) == 780
    i = next(k for k, s in enumerate(slices) if s["name"] == "benign (195)")
    h, w = slices[i]["original_shape"]
    np.testing.assert_array_equal(
        np.asarray(images[i])[:h, :w], read_image(slices[i]["image_path"])
    )
    assert np.asarray(masks[i])[:h, :w].sum() == read_mask(slices[i]["mask_paths"]).sum()


# ------------------------------------------------------------------ through napari


@pytest.mark.gui
def test_viewer_opens_a_folder_through_the_manifest(make_napari_viewer, mixed_tree, busseg_plugin):
    viewer = make_napari_viewer()
    viewer.open(str(mixed_tree), plugin="napari-busseg")
    assert [layer.name for layer in viewer.layers] == [
        "Dataset_BUSI_with_GT",
        "Dataset_BUSI_with_GT ground truth",
    ]
    assert viewer.layers[0].data.shape == (4, 50, 60)
    assert viewer.dims.nsteps[0] == 4


# ------------------------------------------------------------------ any folder, via discover


def test_reader_indexes_folders_through_discover(tmp_path, notes, monkeypatch):
    """The reader takes its records from busseg.data.discover, not from its own globbing."""
    import importlib

    disc = importlib.import_module("busseg.data.discover")  # (busseg.data.discover: the function)

    _png(tmp_path / "scans" / "a.png", np.full((5, 6), 7, np.uint8))
    calls = []
    real = disc.discover
    monkeypatch.setattr(disc, "discover", lambda *a, **k: calls.append(a) or real(*a, **k))
    layers = _reader.read_folder(str(tmp_path / "scans"))
    assert calls and len(layers) == 1
    assert layers[0][1]["metadata"]["busseg"]["layout"] == "folder"


def test_plain_folder_with_sub_folders_opens_recursively(tmp_path, notes):
    _png(tmp_path / "site" / "day1" / "scan 1.png", np.full((6, 5), 10, np.uint8))
    _png(tmp_path / "site" / "day2" / "scan 2.jpg", np.full((4, 8, 3), 90, np.uint8))
    (tmp_path / "site" / "notes.txt").write_text("not a scan")
    assert napari_get_reader(str(tmp_path / "site")) is _reader.read_folder
    [(stack, kw, kind)] = _reader.read_folder(str(tmp_path / "site"))
    assert kind == "image" and stack.shape == (2, 6, 8)
    slices = kw["metadata"]["busseg"]["slices"]
    assert [s["rel_path"] for s in slices] == ["day1/scan 1.png", "day2/scan 2.jpg"]
    assert all(s["label"] == "unknown" and s["mask_paths"] == [] for s in slices)
    assert not notes


def _busbra_tree(root: Path) -> Path:
    rng = np.random.default_rng(3)
    for i, (h, w) in enumerate([(20, 30), (24, 18)], start=1):
        _png(root / "Images" / f"bus_000{i}-l.png", rng.integers(1, 255, (h, w), np.uint8))
        m = np.zeros((h, w), np.uint8)
        m[3:9, 4:12] = 255
        _png(root / "Masks" / f"mask_000{i}-l.png", m)
    (root / "bus_data.csv").write_text(
        "ID,Case,Pathology\nbus_0001-l,1,benign\nbus_0002-l,2,malignant\n")
    return root


def _uclm_tree(root: Path) -> Path:
    img = np.full((16, 20), 50, np.uint8)
    _png(root / "images" / "ALWI_000.png", img)
    _png(root / "images" / "ALWI_001.png", img)
    green = np.zeros((16, 20, 3), np.uint8)
    green[2:6, 3:9, 1] = 255  # benign lesion, colour-coded
    _png(root / "masks" / "ALWI_000.png", green)
    _png(root / "masks" / "ALWI_001.png", np.zeros((16, 20, 3), np.uint8))  # normal
    return root


def test_busbra_folder_opens_with_its_ground_truth(tmp_path, notes):
    root = _busbra_tree(tmp_path / "BUS-BRA")
    assert napari_get_reader(str(root)) is _reader.read_folder
    (images, ikw, _), (masks, mkw, mkind) = _reader.read_folder(str(root))
    assert mkind == "labels" and mkw["name"] == "BUS-BRA ground truth"
    assert images.shape == masks.shape == (2, 24, 30)
    meta = ikw["metadata"]["busseg"]
    assert meta["layout"] == "busbra"
    assert [s["label"] for s in meta["slices"]] == ["benign", "malignant"]
    m0 = np.asarray(masks[0])
    assert m0[3:9, 4:12].all() and m0.sum() == 48
    assert not notes


def test_busuclm_folder_colour_masks_become_ground_truth(tmp_path, notes):
    root = _uclm_tree(tmp_path / "BUS-UCLM")
    (images, ikw, _), (masks, _, _) = _reader.read_folder(str(root))
    assert ikw["metadata"]["busseg"]["layout"] == "pairs"
    assert [s["label"] for s in ikw["metadata"]["busseg"]["slices"]] == ["benign", "normal"]
    assert np.asarray(masks[0]).sum() == 24 and not np.asarray(masks[1]).any()


def test_single_image_of_a_folder_pair_gets_its_ground_truth(tmp_path, notes):
    root = _busbra_tree(tmp_path / "BUS-BRA")
    path = root / "Images" / "bus_0002-l.png"
    layers = napari_get_reader(str(path))(str(path))
    assert [(kw["name"], kind) for _, kw, kind in layers] == [
        ("bus_0002-l", "image"), ("bus_0002-l ground truth", "labels")]
    meta = layers[0][1]["metadata"]["busseg"]
    assert meta["label"] == "malignant" and meta["root"] == str(root)
    assert meta["mask_paths"] == [str(root / "Masks" / "mask_0002-l.png")]
    assert layers[1][0][3:9, 4:12].all()
    # an image in an ordinary folder named "Images" without a mask folder: no ground truth
    _png(tmp_path / "other" / "Images" / "x.png", np.zeros((4, 4), np.uint8))
    assert len(_reader.read_image_file(str(tmp_path / "other" / "Images" / "x.png"))) == 1


@pytest.mark.realdata
def test_real_busbra_and_busuclm_open_with_ground_truth(busbra_root, notes):
    layers = _reader.read_folder(str(busbra_root))
    assert [kind for _, _, kind in layers] == ["image", "labels"]
    images, masks = layers[0][0], layers[1][0]
    slices = layers[0][1]["metadata"]["busseg"]["slices"]
    assert images.shape[0] == len(slices) == len(list((busbra_root / "Images").iterdir()))
    h, w = slices[0]["original_shape"]
    np.testing.assert_array_equal(np.asarray(images[0])[:h, :w],
                                  read_image(slices[0]["image_path"]))
    assert np.asarray(masks[0])[:h, :w].sum() == read_mask(slices[0]["mask_paths"]).sum() > 0
    uclm = busbra_root.parent / "busuclm-dev"
    if uclm.is_dir():
        layers = _reader.read_folder(str(uclm))
        assert layers[1][1]["name"] == "busuclm-dev ground truth"
        assert layers[0][1]["metadata"]["busseg"]["layout"] == "pairs"


@pytest.mark.gui
def test_viewer_opens_a_busbra_folder_through_the_manifest(make_napari_viewer, tmp_path,
                                                           busseg_plugin):
    root = _busbra_tree(tmp_path / "BUS-BRA")
    viewer = make_napari_viewer()
    viewer.open(str(root), plugin="napari-busseg")
    assert [layer.name for layer in viewer.layers] == ["BUS-BRA", "BUS-BRA ground truth"]
    assert viewer.layers[0].data.shape == (2, 24, 30)
