import shutil

import numpy as np
import pytest
from conftest import FAKE_BUSI_EDGE, FAKE_BUSI_MASKS, FAKE_BUSI_RGB_IMAGE, FAKE_BUSI_RGBA_MASK
from PIL import Image

from busseg.data.busi import DATASET_DIRNAME, discover_busi, is_busi_image, resolve_busi_root
from busseg.data.io import read_image, read_mask

# ---------------------------------------------------------------- real BUSI


@pytest.mark.realdata
def test_discover_real_busi(busi_index, busi_root):
    index = busi_index
    assert index.root == busi_root
    assert len(index) == 780
    assert index.counts() == {"benign": 437, "malignant": 210, "normal": 133}
    assert index.problems == []
    assert len(index.usable) == 780
    assert sum(len(r.mask_paths) for r in index) == 798
    multi = [r for r in index if len(r.mask_paths) > 1]
    assert len(multi) == 17
    rec = index.by_rel_path()["benign/benign (195).png"]
    assert [p.name for p in rec.mask_paths] == [
        "benign (195)_mask.png",
        "benign (195)_mask_1.png",
        "benign (195)_mask_2.png",
    ]
    assert rec.size == (729, 611) and rec.label == "benign" and rec.name == "benign (195)"
    # natural order inside each class: 1, 2, ..., 10, not 1, 10, 100
    benign = [r.name for r in index if r.label == "benign"]
    assert benign[:3] == ["benign (1)", "benign (2)", "benign (3)"] and benign[-1] == "benign (437)"
    assert all(r.rel_path == f"{r.label}/{r.name}.png" for r in index)


@pytest.mark.realdata
def test_discover_real_busi_from_a_class_folder_and_the_parent(busi_root):
    index = discover_busi(busi_root / "malignant")
    assert len(index) == 210 and index.counts() == {"malignant": 210}
    assert index.root == busi_root  # rel paths stay those of the split file
    assert index.records[0].rel_path == "malignant/malignant (1).png"
    assert len(discover_busi(busi_root.parent)) == 780  # the folder holding Dataset_BUSI_with_GT


# ---------------------------------------------------------------- fake trees


def test_discover_fake_busi(fake_busi):
    index = discover_busi(fake_busi)
    assert index.problems == []
    expected = {label: len(stems) for label, stems in FAKE_BUSI_MASKS.items()}
    assert index.counts() == expected
    by_name = {r.name: r for r in index}
    for stems in FAKE_BUSI_MASKS.values():
        for stem, n_masks in stems.items():
            assert len(by_name[stem].mask_paths) == n_masks
            assert by_name[stem].usable and by_name[stem].size == (48, 40)
    assert [p.name for p in by_name["benign (2)"].mask_paths] == [
        "benign (2)_mask.png",
        "benign (2)_mask_1.png",
    ]
    # the RGB image reads as grey and the RGBA mask as a bool lesion
    img = read_image(by_name[FAKE_BUSI_RGB_IMAGE].image_path)
    assert img.shape == (40, 48) and img.dtype == np.uint8
    m = read_mask(by_name[FAKE_BUSI_RGBA_MASK].mask_paths)
    assert m.dtype == bool and 0 < m.sum() < m.size


def test_discover_reports_edge_cases_in_problems(make_fake_busi):
    root = make_fake_busi(edge_cases=True)
    index = discover_busi(root)
    text = "\n".join(index.problems)
    assert len(index.problems) == 3, text
    no_mask = next(p for p in index.problems if "without a mask" in p)
    assert "benign (7).png" in no_mask
    orphan = next(p for p in index.problems if "mask without an image" in p)
    assert "benign (8)_mask.png" in orphan
    mismatch = next(p for p in index.problems if "size mismatch" in p)
    assert "malignant (3)" in mismatch and "48x40" in mismatch and "24x20" in mismatch
    by_rel = index.by_rel_path()
    assert not by_rel[FAKE_BUSI_EDGE["no_mask"]].usable
    assert not by_rel[FAKE_BUSI_EDGE["size_mismatch"]].usable
    assert by_rel[FAKE_BUSI_EDGE["size_mismatch"]].problems == (mismatch,)
    assert len(index) == 8  # problems are reported, never dropped
    assert len(index.usable) == 6
    # without the size check the mismatch is not seen, the missing mask still is
    quick = discover_busi(root, check_sizes=False)
    assert len(quick.problems) == 2 and all(r.size is None for r in quick)


def test_discover_unreadable_image_is_a_problem(fake_busi):
    (fake_busi / "normal" / "normal (2).png").write_bytes(b"not a png")
    Image.fromarray(np.zeros((40, 48), np.uint8)).save(fake_busi / "normal" / "normal (2)_mask.png")
    index = discover_busi(fake_busi)
    assert any("unreadable image" in p and "normal (2).png" in p for p in index.problems)


def test_discover_natural_order_and_hidden_files(fake_busi):
    folder = fake_busi / "benign"
    for stem in ("benign (10)", ".benign (11)"):
        shutil.copy(folder / "benign (1).png", folder / f"{stem}.png")
        shutil.copy(folder / "benign (1)_mask.png", folder / f"{stem}_mask.png")
    (folder / "notes.txt").write_text("not an image")
    names = [r.name for r in discover_busi(fake_busi) if r.label == "benign"]
    assert names == ["benign (1)", "benign (2)", "benign (3)", "benign (10)"]


def test_discover_a_plain_folder_of_pairs(tmp_path):
    folder = tmp_path / "cases"
    folder.mkdir()
    a = np.zeros((10, 12), np.uint8)
    for stem in ("case_b", "case_a"):
        Image.fromarray(a).save(folder / f"{stem}.png")
        Image.fromarray(a).save(folder / f"{stem}_mask.png")
    index = discover_busi(folder)
    assert [r.name for r in index] == ["case_a", "case_b"]
    assert {r.label for r in index} == {"unknown"}
    assert index.records[0].rel_path == "cases/case_a.png"


def test_not_busi_folders_raise_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such folder"):
        discover_busi(tmp_path / "missing")
    plain = tmp_path / "photos"
    plain.mkdir()
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(plain / "cat.png")
    with pytest.raises(ValueError, match=f"not a BUSI-like folder.*{DATASET_DIRNAME}.*_mask.png"):
        discover_busi(plain)
    with pytest.raises(ValueError, match="is a file"):
        discover_busi(plain / "cat.png")
    empty = tmp_path / "empty" / DATASET_DIRNAME / "benign"
    empty.mkdir(parents=True)
    with pytest.raises(ValueError, match="no images found"):
        discover_busi(tmp_path / "empty")


def test_resolve_busi_root(fake_busi):
    root, folders = resolve_busi_root(fake_busi.parent)
    assert root == fake_busi
    assert [f.name for f in folders] == ["benign", "malignant", "normal"]
    root, folders = resolve_busi_root(fake_busi / "normal")
    assert root == fake_busi and folders == [fake_busi / "normal"]


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("benign (1).png", True),
        ("benign (1)_mask.png", False),
        ("benign (1)_mask_1.png", False),
        ("Benign (1)_MASK.PNG", False),
        ("scan.JPG", True),
        ("scan.tiff", True),
        ("notes.txt", False),
        ("mask.png", True),  # only the _mask suffix marks a mask
    ],
)
def test_is_busi_image(name, expected):
    assert is_busi_image(name) is expected
