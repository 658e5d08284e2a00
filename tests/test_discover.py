"""busseg.data.discover: one discovery function for BUSI, image/mask pairs and plain folders."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from busseg.data import discover, read_mask
from busseg.data.discover import (
    dataset_citation,
    default_split,
    detect_layout,
    mask_colour_label,
)

REPO = Path(__file__).resolve().parents[1]


def _png(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def _grey(h=30, w=40, value=90):
    return np.full((h, w), value, np.uint8)


def _colour_mask(h=30, w=40, colour=None):
    m = np.zeros((h, w, 3), np.uint8)
    if colour is not None:
        m[5:15, 10:20] = colour
    return m


@pytest.fixture
def uclm_tree(tmp_path):
    """BUS-UCLM-like: images/ + masks/ (same names, colour-coded), INFO.csv, a size mismatch."""
    root = tmp_path / "uclm"
    _png(root / "images" / "ABCD_000.png", _grey())
    _png(root / "masks" / "ABCD_000.png", _colour_mask(colour=(0, 255, 0)))
    _png(root / "images" / "ABCD_001.png", _grey())
    _png(root / "masks" / "ABCD_001.png", _colour_mask())
    _png(root / "images" / "EFGH_000.png", _grey())
    _png(root / "masks" / "EFGH_000.png", _colour_mask(colour=(255, 0, 0)))
    _png(root / "images" / "EFGH_001.png", _grey(20, 30))  # smaller than its mask
    _png(root / "masks" / "EFGH_001.png", _colour_mask(colour=(0, 255, 0)))
    _png(root / "masks" / "ZZZZ_000.png", _colour_mask())  # a mask without its image
    return root


def test_colour_coded_pairs_get_label_patient_and_report_problems(uclm_tree):
    index = discover(uclm_tree)
    assert index.layout == "pairs" == detect_layout(uclm_tree)
    by_name = {r.name: r for r in index.records}
    assert sorted(by_name) == ["ABCD_000", "ABCD_001", "EFGH_000", "EFGH_001"]
    assert [by_name[n].label for n in sorted(by_name)] == ["benign", "normal", "malignant",
                                                           "benign"]
    assert {r.group for r in index.records} == {"ABCD", "EFGH"}
    assert by_name["ABCD_001"].usable  # a normal scan: all-black mask, trains as empty
    assert not read_mask(by_name["ABCD_001"].mask_paths).any()
    assert read_mask(by_name["ABCD_000"].mask_paths).sum() == 100
    # the size mismatch is reported by name, on the record and in the index, not dropped
    bad = by_name["EFGH_001"]
    assert not bad.usable and "size mismatch" in bad.problems[0]
    assert "images/EFGH_001.png is 30x20 but masks/EFGH_001.png is 40x30" in bad.problems[0]
    assert any("mask without an image" in p and "ZZZZ_000" in p for p in index.problems)
    assert len(index.usable) == 3


def test_info_csv_label_wins_over_the_colour(uclm_tree):
    (uclm_tree / "INFO.csv").write_text(
        "Image;Resolution;Label;Doppler;Marks;Combined\n"
        "ABCD_000.png;40x30;Malignant;No;Yes;No\n"
    )
    labels = {r.name: r.label for r in discover(uclm_tree).records}
    assert labels["ABCD_000"] == "malignant"  # from INFO.csv
    assert labels["EFGH_000"] == "malignant"  # not in INFO.csv: from the red mask


def test_busbra_naming_pairs_bus_and_mask_files(tmp_path):
    root = tmp_path / "busbra"
    for rid in ("bus_0001-l", "bus_0001-r", "bus_0002-s"):
        _png(root / "Images" / f"{rid}.png", _grey())
        m = np.zeros((30, 40), np.uint8)
        m[3:9, 4:12] = 255
        _png(root / "Masks" / f"{rid.replace('bus_', 'mask_')}.png", m)
    (root / "bus_data.csv").write_text(
        "ID,Histology,Pathology,BIRADS,Device,Case\n"
        "bus_0001-l,x,benign,3,A,1\nbus_0001-r,x,malignant,5,A,1\nbus_0002-s,x,benign,2,B,2\n"
    )
    index = discover(root)
    assert index.layout == "busbra" and not index.problems
    assert [(r.name, r.label, r.group) for r in index.records] == [
        ("bus_0001-l", "benign", "1"), ("bus_0001-r", "malignant", "1"),
        ("bus_0002-s", "benign", "2")]
    assert index.records[0].mask_paths[0].name == "mask_0001-l.png"


def test_plain_folder_of_scans_has_no_masks_and_no_problems(tmp_path):
    root = tmp_path / "scans"
    _png(root / "b.png", _grey())
    _png(root / "a.jpg", np.dstack([_grey()] * 3))
    _png(root / "day2" / "c10.png", _grey())
    _png(root / "day2" / "c9.bmp", _grey())
    (root / ".hidden.png").write_bytes(b"")
    (root / "notes.txt").write_text("not a scan")
    index = discover(root)
    assert index.layout == "folder" and index.problems == []
    assert [r.rel_path for r in index.records] == ["a.jpg", "b.png", "day2/c9.bmp",
                                                   "day2/c10.png"]
    assert all(r.mask_paths == () and r.label == "unknown" for r in index.records)
    assert index.records[2].group == "day2"


def test_unreadable_scan_in_a_plain_folder_is_reported(tmp_path):
    root = tmp_path / "scans"
    _png(root / "ok.png", _grey())
    (root / "broken.png").write_bytes(b"not a png")
    index = discover(root)
    assert [r.name for r in index.records] == ["broken", "ok"]
    assert index.problems == [f"unreadable image: {root / 'broken.png'}"]


def test_busi_layout_is_still_read_by_busi_rules(fake_busi):
    index = discover(fake_busi)
    assert index.layout == "busi"
    assert index.counts() == {"benign": 3, "malignant": 2, "normal": 1}
    assert discover(fake_busi.parent).layout == "busi"


def test_errors_say_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such folder"):
        discover(tmp_path / "missing")
    (tmp_path / "f.png").write_bytes(b"")
    with pytest.raises(ValueError, match="is a file"):
        discover(tmp_path / "f.png")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no scans found.*image/mask folder pair"):
        discover(empty)
    with pytest.raises(ValueError, match="unknown layout"):
        discover(empty, layout="dicomdir")


def test_mask_colour_label(tmp_path):
    assert mask_colour_label(_png(tmp_path / "g.png", _colour_mask(colour=(0, 255, 0)))) \
        == "benign"
    assert mask_colour_label(_png(tmp_path / "r.png", _colour_mask(colour=(255, 0, 0)))) \
        == "malignant"
    assert mask_colour_label(_png(tmp_path / "k.png", _colour_mask())) == "normal"
    assert mask_colour_label(_png(tmp_path / "w.png", _colour_mask(colour=(255, 255, 255)))) \
        == "unknown"


def test_citations_and_committed_splits():
    assert "Vallez" in dataset_citation("../shared/data/busuclm-dev")
    assert "research use" in dataset_citation("/x/busuclm-dev")
    assert "Al-Dhabyani" in dataset_citation("/x/busi/Dataset_BUSI_with_GT")
    assert dataset_citation("/x/my_scans") == "folder my_scans"
    assert default_split("/x/busuclm-dev") == REPO / "training/splits/busuclm.csv"
    with pytest.raises(ValueError, match="make_split.py"):
        default_split("/x/my_scans")


BUSUCLM = REPO.parent / "shared" / "data" / "busuclm-dev"


@pytest.mark.realdata
def test_real_busuclm_dev_and_its_committed_split():
    if not BUSUCLM.is_dir():
        pytest.skip(f"BUS-UCLM development data not found at {BUSUCLM}")
    from busseg.data.splits import read_split_csv, select_split

    index = discover(BUSUCLM)
    assert index.layout == "pairs" and len(index.records) == 295
    assert index.counts() == {"benign": 79, "malignant": 36, "normal": 180}
    mismatched = [r.name for r in index.records if r.problems]
    assert len(mismatched) == 13 and all(n.startswith("HESN_") for n in mismatched)
    assert len(index.problems) == 13
    rows = read_split_csv(REPO / "training/splits/busuclm.csv")
    patients = {}
    for row in rows:
        patients.setdefault(row["image"].split("/")[1].split("_")[0], set()).add(row["split"])
    assert len(patients) == 18 and all(len(s) == 1 for s in patients.values())  # by patient
    test = select_split(index, rows, "test")
    assert {r.label for r in test} == {"benign", "malignant", "normal"}
