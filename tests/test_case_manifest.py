"""Every case the annotator leaves is recorded as what they decided (busseg.manifest + session)."""

from __future__ import annotations

import csv
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
from conftest import scan_folder
from PIL import Image

from busseg.data.io import read_image, read_mask
from busseg.manifest import (
    ACCEPTED,
    BRUSHED,
    COLUMNS,
    CORRECTED,
    MANIFEST_NAME,
    NORMAL,
    STATUSES,
    CaseManifest,
    ManifestError,
    ManifestRow,
    mask_stats,
)
from busseg.session import AnnotationSession

REPO_ROOT = Path(__file__).resolve().parents[1]
BUSUCLM_DEV = REPO_ROOT.parent / "shared" / "data" / "busuclm-dev"


def _opened(tmp_path: Path, n: int):
    """A session over ``scan_folder(tmp_path/scans, n)`` recording into ``tmp_path/corr``,
    case 0 open; returns (scans, corr, session, the image shape)."""
    scans = scan_folder(tmp_path / "scans", n=n)
    corr = tmp_path / "corr"
    s = AnnotationSession(scans, corr)
    return scans, corr, s, s.open(0).image.shape


def _mask(shape, k: int = 0) -> np.ndarray:
    m = np.zeros(shape, np.uint8)
    m[2 + k: 8 + k, 3: 10 + k] = 1
    return m


def _rows(corr: Path) -> list[dict]:
    with open(corr / MANIFEST_NAME, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def _by_name(corr: Path) -> dict[str, dict]:
    return {r["name"]: r for r in _rows(corr)}


# --------------------------------------------------------------------------- statuses


def test_statuses_are_the_four_decisions():
    assert (ACCEPTED, CORRECTED, NORMAL, BRUSHED) == (
        "accepted", "corrected", "normal", "brushed")
    assert set(STATUSES) == {ACCEPTED, CORRECTED, NORMAL, BRUSHED}
    for col in ("seq", "name", "status", "label", "image", "mask", "regions", "area_px",
                "area_mm2", "checkpoint", "time"):
        assert col in COLUMNS


def test_leaving_records_each_decision(tmp_path):
    scans, corr, s, shape = _opened(tmp_path, 6)

    s.set_prediction(_mask(shape))  # 0: left as predicted -> accepted, saved as it is
    assert s.decision() == ACCEPTED
    s.next()
    assert s.last_save.status == ACCEPTED and s.last_save.label == "unknown"
    np.testing.assert_array_equal(read_mask(corr / "unknown" / "scan0_mask.png"),
                                  _mask(shape) > 0)
    np.testing.assert_array_equal(read_image(corr / "unknown" / "scan0.png"),
                                  read_image(scans / "scan0.png"))

    s.set_prediction(np.zeros(shape, bool))  # 1: an empty prediction accepted: a normal answer
    s.next()
    assert s.last_save.status == ACCEPTED and s.last_save.label == "normal"
    assert not read_mask(corr / "normal" / "scan1_mask.png").any()

    s.set_prediction(_mask(shape))  # 2: edited -> corrected
    s.set_mask(_mask(shape, 3))
    s.next()
    assert s.last_save.status == CORRECTED

    s.set_mask(_mask(shape, 1), status=BRUSHED)  # 3: drawn by hand -> brushed
    assert s.decision() == BRUSHED
    s.next()
    assert s.last_save.status == BRUSHED

    s.set_prediction(_mask(shape))  # 4: "no lesion" -> normal
    s.mark_no_lesion(save=False)
    s.next()
    assert s.last_save.status == NORMAL and s.last_save.no_lesion

    assert s.current.index == 5  # 5: opened and left without any mask: nothing
    assert s.decision() is None
    assert s.next() is None and s.last_save is None  # the last case: recorded in place

    assert s.progress() == (5, 6) and s.progress_text() == "5 of 6 recorded"
    assert [s.status_of(i) for i in range(6)] == [
        ACCEPTED, ACCEPTED, CORRECTED, BRUSHED, NORMAL, None]
    assert s.status_of("scan3") == BRUSHED and s.status_of(s.records[2]) == CORRECTED
    rows = _by_name(corr)
    assert [rows[f"scan{i}"]["status"] for i in range(5)] == [
        "accepted", "accepted", "corrected", "brushed", "normal"]
    assert [int(rows[f"scan{i}"]["seq"]) for i in range(5)] == [1, 2, 3, 4, 5]
    assert rows["scan4"]["label"] == "normal" and rows["scan4"]["mask"] == "normal/scan4_mask.png"
    assert rows["scan0"]["image"] == str(scans / "scan0.png")
    assert rows["scan0"]["checkpoint"] == "default"  # predicted with the shipped model
    assert rows["scan3"]["checkpoint"] == ""  # drawn by hand: no prediction made it
    # the folder is still a BUSI-style dataset that fine-tuning reads
    assert sorted(r.rel_path for r in s.store.records()) == [
        "normal/scan1.png", "normal/scan4.png", "unknown/scan0.png", "unknown/scan2.png",
        "unknown/scan3.png"]


def test_last_case_is_recorded_by_next_and_close(tmp_path):
    scans = scan_folder(tmp_path / "scans", n=2)
    s = AnnotationSession(scans, tmp_path / "corr")
    shape = s.open(1).image.shape
    s.set_prediction(_mask(shape))
    assert s.next() is None and s.last_save.status == ACCEPTED  # stays open, recorded
    assert s.current.index == 1 and s.next() is None and s.last_save is None  # once
    s.previous()
    s.set_prediction(_mask(shape, 2))
    assert s.previous() is None and s.last_save.status == ACCEPTED
    s.set_mask(_mask(shape, 4))
    assert s.close().status == CORRECTED
    assert s.progress_text() == "2 of 2 recorded" and s.first_unrecorded() is None
    assert s.resume() is None


def test_leaving_without_recording(tmp_path):
    scans, corr, s, shape = _opened(tmp_path, 4)
    s.set_prediction(_mask(shape))
    s.goto(2, record=False)
    assert s.last_save is None and not corr.exists()
    s.set_prediction(_mask(shape))
    s.set_mask(_mask(shape, 2))
    assert s.skip().index == 3 and s.last_save is None
    s.set_prediction(_mask(shape))
    s.previous(record=False)
    s.set_prediction(_mask(shape))
    assert s.close(record=False) is None
    assert not corr.exists() and s.progress() == (0, 4)


def test_unchanged_stored_case_is_not_written_again(tmp_path):
    scans, corr, s, shape = _opened(tmp_path, 3)
    s.set_prediction(_mask(shape))
    s.set_mask(_mask(shape, 1))
    s.next()
    s.set_prediction(_mask(shape))
    s.next()
    before = (corr / MANIFEST_NAME).read_bytes()

    again = AnnotationSession(scans, corr)
    for i in (0, 1):  # reopened and left: nothing new
        case = again.open(i)
        assert case.status == (CORRECTED if i == 0 else ACCEPTED)
        again.set_mask(case.correction)
        assert again.decision() is None
        again.next()
        assert again.last_save is None
    again.goto(1)
    again.set_mask(again.current.correction, edited=True)  # "edited" to the same pixels
    again.goto(0)
    assert again.last_save is None
    assert (corr / MANIFEST_NAME).read_bytes() == before and again.versions(0) == []

    # a changed decision is recorded: a new version, the row moves to the end
    again.set_mask(_mask(shape, 3))
    again.goto(1)
    assert again.last_save.version == corr / "versions" / "unknown" / "scan0_mask.v1.png"
    assert [r.name for r in again.recorded()] == ["scan1", "scan0"]


def test_accept(tmp_path):
    scans = scan_folder(tmp_path / "scans", n=2)
    s = AnnotationSession(scans, tmp_path / "corr")
    shape = s.open(0).image.shape
    with pytest.raises(RuntimeError, match="predict"):
        s.accept()
    s.set_prediction(_mask(shape))
    res = s.accept()
    assert res.status == ACCEPTED and s.status_of(0) == ACCEPTED
    assert s.accept() is None  # recorded already
    s.goto(1)
    assert s.last_save is None  # nothing new when leaving
    s.set_prediction(_mask(shape))
    s.set_mask(_mask(shape, 2))
    with pytest.raises(ValueError, match="edited"):
        s.accept()
    with pytest.raises(ValueError, match="mark_no_lesion"):
        s.set_mask(_mask(shape), status=NORMAL)
    with pytest.raises(ValueError, match="accept"):
        s.set_mask(_mask(shape), status=ACCEPTED)


def test_accepted_busi_case_keeps_its_class(fake_busi, tmp_path):
    corr = tmp_path / "corr"
    s = AnnotationSession(fake_busi, corr)
    case = s.open(0)
    assert case.record.label == "benign"
    s.set_prediction(np.zeros(case.image.shape, bool))  # an empty prediction of a benign scan
    s.next()
    assert s.last_save.label == "benign" and s.last_save.status == ACCEPTED
    assert not read_mask(corr / "benign" / f"{case.name}_mask.png").any()


def test_manifest_columns_regions_area_checkpoint_time(tmp_path, tiny_checkpoint):
    scans = scan_folder(tmp_path / "scans", n=3, size=(40, 48))
    corr = tmp_path / "corr"
    s = AnnotationSession(scans, corr, checkpoint=tiny_checkpoint)
    shape = s.open(0).image.shape
    two = np.zeros(shape, np.uint8)
    two[2:6, 2:6] = 1  # 16 px
    two[20:23, 30:33] = 1  # 9 px, apart
    two[6, 6] = 1  # touches the first only diagonally: 8-connected, the same region
    s.set_prediction(np.zeros(shape, bool))
    s.set_mask(two)
    s.next()
    auto = s.predict()
    s.next()
    t_end = datetime.now().astimezone()
    rows = _by_name(corr)
    assert rows["scan0"]["regions"] == "2" and rows["scan0"]["area_px"] == "26"
    assert rows["scan0"]["area_mm2"] == ""  # a PNG has no pixel spacing
    assert rows["scan0"]["checkpoint"] == str(tiny_checkpoint)
    assert rows["scan1"]["status"] == "accepted"
    assert int(rows["scan1"]["area_px"]) == int(auto.sum())
    for r in rows.values():
        when = datetime.fromisoformat(r["time"])
        assert when.utcoffset().total_seconds() == 0 and when <= t_end
    assert s.recorded()[0].regions == 2 and s.recorded()[0].area_mm2 is None

    pd = pytest.importorskip("pandas")
    table = pd.read_csv(corr / MANIFEST_NAME)
    assert list(table.columns[: len(COLUMNS)]) == list(COLUMNS)
    assert table["seq"].is_monotonic_increasing and table["seq"].tolist() == [1, 2]
    assert table["status"].tolist() == ["corrected", "accepted"]
    assert pd.to_datetime(table["time"], utc=True).notna().all()


def test_mask_stats():
    m = np.zeros((10, 10), bool)
    assert mask_stats(m) == (0, 0, None)
    m[1, 1] = m[2, 2] = m[7, 7] = True
    assert mask_stats(m, (0.5, 0.2)) == (2, 3, pytest.approx(0.3))
    with pytest.raises(ValueError, match="2D"):
        mask_stats(np.zeros((2, 2, 2)))


def test_area_in_mm2_from_dicom_spacing(tmp_path):
    examples = pytest.importorskip("pydicom.examples")
    import shutil

    from busseg.data.dicom import read_dicom_header

    scans = tmp_path / "scans"
    scans.mkdir()
    src = Path(examples.palette_color.filename)
    shutil.copy(src, scans / "us.dcm")
    dy, dx = read_dicom_header(scans / "us.dcm")["spacing_mm"]
    s = AnnotationSession(scans, tmp_path / "corr")
    assert len(s) == 1
    shape = s.open(0).image.shape
    m = np.zeros(shape, np.uint8)
    m[10:20, 10:30] = 1
    s.set_mask(m)
    s.close()
    row = _by_name(tmp_path / "corr")["us"]
    assert row["area_px"] == "200"
    assert float(row["area_mm2"]) == pytest.approx(200 * dy * dx, rel=1e-3)


# --------------------------------------------------------------------------- reopening


def test_reopening_resumes_from_the_manifest(tmp_path):
    scans, corr, s, shape = _opened(tmp_path, 5)
    for k in range(3):
        s.set_prediction(_mask(shape, k))
        if k == 1:
            s.set_mask(_mask(shape, 4), status=BRUSHED)
        s.next()
    again = AnnotationSession(scans, corr)
    assert again.progress() == (3, 5) and again.progress_text() == "3 of 5 recorded"
    assert [again.status_of(i) for i in range(5)] == [ACCEPTED, BRUSHED, ACCEPTED, None, None]
    assert again.first_unrecorded() == 3 and again.first_uncorrected() == 3
    assert again.first_unrecorded(4) == 4
    assert again.resume().index == 3
    assert [(r.name, r.status, r.seq) for r in again.recorded()] == [
        ("scan0", ACCEPTED, 1), ("scan1", BRUSHED, 2), ("scan2", ACCEPTED, 3)]
    assert [r.name for r in again.recorded(order="name")] == ["scan0", "scan1", "scan2"]
    with pytest.raises(ValueError, match="order"):
        again.recorded(order="size")
    images, masks, names, statuses = again.recorded_pairs()
    assert names == ["unknown/scan0.png", "unknown/scan1.png", "unknown/scan2.png"]
    assert statuses == [ACCEPTED, BRUSHED, ACCEPTED]
    np.testing.assert_array_equal(masks[1], _mask(shape, 4) > 0)
    np.testing.assert_array_equal(images[0], read_image(scans / "scan0.png"))
    assert again.problems == []


def test_rows_with_missing_files_are_reported_not_trusted(tmp_path):
    scans, corr, s, shape = _opened(tmp_path, 3)
    for k in range(3):
        s.set_prediction(_mask(shape, k))
        s.next()
    (corr / "unknown" / "scan1_mask.png").unlink()
    (corr / "unknown" / "scan2.png").unlink()
    again = AnnotationSession(scans, corr)
    assert again.progress() == (1, 3) and again.status_of(1) is None
    assert [r.name for r in again.recorded()] == ["scan0"]
    assert len(again.problems) == 2
    assert "scan1_mask.png missing" in again.problems[0]
    assert "scan2.png missing" in again.problems[1] and "not recorded" in again.problems[1]
    assert again.recorded_pairs()[2] == ["unknown/scan0.png"]
    # recording the case again repairs it; the row of the other stays in the file
    again.open(1)
    again.set_prediction(_mask(shape))
    again.next()
    assert again.status_of(1) == ACCEPTED
    assert {r["name"] for r in _rows(corr)} == {"scan0", "scan1", "scan2"}


def test_legacy_folder_without_manifest_is_migrated(tmp_path):
    scans = scan_folder(tmp_path / "scans", n=4)
    corr = tmp_path / "corr"
    from busseg.corrections import CorrectionStore

    store = CorrectionStore(corr)
    shape = read_image(scans / "scan0.png").shape
    for i in (2, 0):  # written before manifests existed, scan2 first
        store.save(f"scan{i}", "unknown", read_image(scans / f"scan{i}.png"), _mask(shape, i))
        time.sleep(0.02)
    store.save("other", "benign", np.zeros(shape, np.uint8), _mask(shape))  # not a case here
    os.utime(corr / "unknown" / "scan2_mask.png", (1_000_000, 1_000_000))
    s = AnnotationSession(scans, corr)
    assert not (corr / MANIFEST_NAME).exists()  # reading writes nothing
    assert s.progress() == (2, 4) and s.status_of(0) == s.status_of(2) == CORRECTED
    assert s.first_unrecorded() == 1
    assert [r.name for r in s.recorded()] == ["scan2", "scan0", "other"]
    assert all(r.seq == 0 for r in s.recorded())
    s.open(1)
    s.set_prediction(_mask(shape))
    s.next()  # the first write migrates the folder
    rows = _rows(corr)
    assert [(r["name"], r["status"], r["seq"]) for r in rows] == [
        ("scan2", "corrected", "1"), ("scan0", "corrected", "2"), ("other", "corrected", "3"),
        ("scan1", "accepted", "4")]
    assert rows[0]["image"] == str(scans / "scan2.png") and rows[2]["image"] == ""
    assert rows[0]["area_px"] == str(int(_mask(shape, 2).sum()))  # measured when migrated
    assert rows[0]["regions"] == "1" and rows[0]["checkpoint"] == ""
    assert [r.seq for r in s.recorded()] == [1, 2, 3, 4]
    again = AnnotationSession(scans, corr)
    assert again.progress() == (3, 4) and again.problems == []


def test_store_of_a_stray_mask_is_kept_as_a_version(tmp_path):
    """A mask file the manifest does not trust is never overwritten without a copy."""
    scans, corr, s, shape = _opened(tmp_path, 2)
    s.set_prediction(_mask(shape))
    s.next()
    stray = corr / "unknown" / "scan1_mask.png"
    Image.fromarray((_mask(shape, 3) * 255).astype(np.uint8)).save(stray)  # no image copy
    again = AnnotationSession(scans, corr)
    assert any("scan1_mask.png has no image copy" in p for p in again.problems)
    again.open(1)
    again.set_prediction(_mask(shape, 1))
    again.next()
    assert [p.name for p in again.versions(1)] == ["scan1_mask.v1.png"]
    np.testing.assert_array_equal(read_mask(again.versions(1)[0]), _mask(shape, 3) > 0)


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("content, match", [
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00", "not a text file"),
    (b"", "empty"),
    (b"name,status\nscan0,accepted\n", "lacks the column"),
    ((b"seq,name,status,label,image,mask,regions,area_px,area_mm2,checkpoint,time\n"
      b"1,scan0,maybe,unknown,,unknown/scan0_mask.png,1,4,,default,t\n"), "status"),
    ((b"seq,name,status,label,image,mask,regions,area_px,area_mm2,checkpoint,time\n"
      b"x,scan0,accepted,unknown,,unknown/scan0_mask.png,1,4,,default,t\n"), "whole"),
    ((b"seq,name,status,label,image,mask,regions,area_px,area_mm2,checkpoint,time\n"
      b"1,scan0,accepted,unknown,,../x_mask.png,1,4,,default,t\n"), "inside"),
    ((b"seq,name,status,label,image,mask,regions,area_px,area_mm2,checkpoint,time\n"
      b"1,scan0,accepted,unknown\n"), "number of fields"),
    ((b"seq,name,status,label,image,mask,regions,area_px,area_mm2,checkpoint,time\n"
      b"1,scan0,accepted,unknown,,benign/scan0_mask.png,1,4,,default,t\n"), "layout"),
    (b'seq,name,status,label,image,mask,regions,area_px,area_mm2,checkpoint,time\n1,"a', "CSV"),
])
def test_corrupt_manifest_is_a_clear_error(tmp_path, content, match):
    scans = scan_folder(tmp_path / "scans", n=2)
    corr = tmp_path / "corr"
    corr.mkdir()
    (corr / MANIFEST_NAME).write_bytes(content)
    with pytest.raises(ManifestError, match=match) as info:
        AnnotationSession(scans, corr)
    assert isinstance(info.value, ValueError)
    assert "manifest.csv" in str(info.value)
    assert "aside" in str(info.value) or "fix" in str(info.value)
    # the session keeps the folder it had
    s = AnnotationSession(scans, tmp_path / "good")
    with pytest.raises(ManifestError):
        s.set_corrections(corr)
    assert s.store.root == tmp_path / "good"


def test_manifest_of_another_folder_of_scans_is_refused(tmp_path):
    a = scan_folder(tmp_path / "site_a", n=2)
    b = scan_folder(tmp_path / "site_b", n=2, seed=3)
    for p in b.iterdir():
        p.rename(p.with_name("b_" + p.name))
    corr = tmp_path / "corr"
    s = AnnotationSession(a, corr)
    shape = s.open(0).image.shape
    s.set_prediction(_mask(shape))
    s.next()
    with pytest.raises(ManifestError, match="another") as info:
        AnnotationSession(b, corr)
    assert str(a) in str(info.value)
    AnnotationSession([a, b], corr)  # a session with some of its cases is fine


def test_manifest_writers_keep_each_others_rows(tmp_path):
    m1, m2 = CaseManifest(tmp_path), CaseManifest(tmp_path)

    def row(name):
        return ManifestRow(name, ACCEPTED, "unknown", "", f"unknown/{name}_mask.png", 0, 0,
                           None, "default", "t")

    assert m1.record(row("a")).seq == 1
    assert m2.record(row("b")).seq == 2
    assert m1.record(row("a")).seq == 3
    assert [(r.name, r.seq) for r in m2.read()] == [("b", 2), ("a", 3)]
    # columns a later version adds are kept when rewriting
    text = (tmp_path / MANIFEST_NAME).read_text().splitlines()
    text = [text[0] + ",note"] + [line + ",hello" for line in text[1:]]
    (tmp_path / MANIFEST_NAME).write_text("\n".join(text) + "\n")
    m1.record(row("c"))
    assert [r.get("note") for r in _rows(tmp_path)] == ["hello", "hello", ""]


def test_core_modules_import_no_qt_or_torch():
    code = ("import sys, busseg.manifest, busseg.session; "
            "bad = [m for m in ('qtpy', 'PyQt5', 'PyQt6', 'PySide2', 'PySide6', 'napari', "
            "'magicgui', 'torch') if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


# --------------------------------------------------------------------------- nothing lost

_CHILD = textwrap.dedent("""
    import sys
    import numpy as np
    from busseg.session import AnnotationSession

    scans, corr, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
    rng = np.random.default_rng(seed)
    s = AnnotationSession(scans, corr)
    n = len(s)
    k = 0
    while True:
        case = s.open(int(rng.integers(n)))
        shape = case.image.shape
        m = np.zeros(shape, np.uint8)
        r, c = rng.integers(0, shape[0] - 6), rng.integers(0, shape[1] - 6)
        m[r:r + 6, c:c + 6] = 1
        kind = k % 4
        if kind == 0:
            s.set_prediction(m)
        elif kind == 1:
            s.set_prediction(np.zeros(shape, bool))
            s.set_mask(m, status="brushed")
        elif kind == 2:
            s.set_prediction(m)
            s.mark_no_lesion(save=False)
        else:
            s.set_prediction(m)
            s.set_mask(np.roll(m, 3, axis=1))
        s.record()
        if k == 0:
            print("ready", flush=True)  # one case recorded
        k += 1
""")


def test_a_kill_during_saves_loses_nothing(tmp_path):
    scans = scan_folder(tmp_path / "scans", n=6, size=(64, 80))
    corr = tmp_path / "corr"
    child = tmp_path / "child.py"
    child.write_text(_CHILD)
    rng = random.Random(0)
    for attempt in range(5):
        proc = subprocess.Popen([sys.executable, str(child), str(scans), str(corr),
                                 str(attempt)], stdout=subprocess.PIPE, text=True)
        try:
            assert proc.stdout.readline().strip() == "ready"
            time.sleep(rng.uniform(0.05, 0.6))
            assert proc.poll() is None, "the saving child stopped by itself"
        finally:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
            proc.stdout.close()
        assert proc.returncode == -signal.SIGKILL

        # the folder opens, the manifest parses, every row's files exist or are reported
        s = AnnotationSession(scans, corr)
        rows = CaseManifest(corr).read()
        assert rows, "nothing was recorded before the kill"
        with open(corr / MANIFEST_NAME, newline="", encoding="utf-8") as fh:
            assert len(list(csv.DictReader(fh))) == len(rows)
        for row in rows:
            mask, image = row.mask_path(corr), row.image_copy_path(corr)
            if mask.is_file() and image.is_file():
                assert read_mask(mask).shape == read_image(image).shape
            else:
                assert any(f"({row.name!r}" in p for p in s.problems), (row, s.problems)
        for p in (corr / "versions").rglob("*.png"):
            read_mask(p)  # every kept version is a whole PNG
        images, masks, names, statuses = s.recorded_pairs()
        assert len(images) == len(masks) == len(names) == len(statuses) > 0
        assert set(statuses) <= set(STATUSES)
        assert s.progress()[0] == sum(s.status_of(i) is not None for i in range(len(s)))


def test_temporary_files_of_killed_saves_are_swept(tmp_path):
    scans = scan_folder(tmp_path / "scans", n=2)
    corr = tmp_path / "corr"
    (corr / "unknown").mkdir(parents=True)
    old = corr / "unknown" / ".scan0_mask.png.abc123.tmp"
    young = corr / ".manifest.csv.def456.tmp"
    keep = corr / "unknown" / "notes.tmp"  # not one of ours
    for p in (old, young, keep):
        p.write_bytes(b"x")
    os.utime(old, (1_000_000, 1_000_000))
    os.utime(keep, (1_000_000, 1_000_000))
    s = AnnotationSession(scans, corr)
    assert old.exists()  # opening writes and removes nothing
    s.open(0)
    s.set_prediction(_mask(s.current.image.shape))
    s.next()
    assert not old.exists() and young.exists() and keep.exists()


# --------------------------------------------------------------------------- real data


def test_real_scans_are_recorded_and_resumed(tmp_path):
    if not BUSUCLM_DEV.is_dir():
        pytest.skip(f"real data not found: {BUSUCLM_DEV} (BUS-UCLM dev subset)")
    corr = tmp_path / "corr"
    s = AnnotationSession(BUSUCLM_DEV, corr)
    assert len(s) > 3
    decided = []
    for i in range(3):
        case = s.goto(i)
        truth = case.ground_truth
        truth = np.zeros(case.image.shape, bool) if truth is None else truth
        s.set_prediction(truth)  # the expert's mask stands in for a perfect prediction
        if i == 1:
            drawn = np.zeros(truth.shape, np.uint8)
            drawn[10:30, 10:30] = 1
            s.set_mask(drawn, edited=True, status=BRUSHED)
        decided.append((case.name, truth))
    s.next()
    rows = _by_name(corr)
    assert [rows[n]["status"] for n, _ in decided] == ["accepted", "brushed", "accepted"]
    name, truth = decided[0]
    assert int(rows[name]["area_px"]) == int(truth.sum())
    from scipy import ndimage

    assert int(rows[name]["regions"]) == ndimage.label(truth, np.ones((3, 3)))[1]
    again = AnnotationSession(BUSUCLM_DEV, corr)
    assert again.progress() == (3, len(s)) and again.first_unrecorded() == 3
    assert again.problems == s.problems  # nothing new reported
