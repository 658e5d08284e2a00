"""Ultrasound DICOM through pydicom (optional extra ``dicom``), on the real files pydicom bundles.

pydicom's wheel ships these ultrasound (Modality US) examples, used here:

- ``examples.rgb_color`` (``examples_rgb_color.dcm``): single frame, 240 x 320, RGB;
- ``examples.palette_color`` (``examples_palette.dcm``): single frame, 350 x 800, PALETTE COLOR;
- ``examples.ybr_color`` (``examples_ybr_color.dcm``): a 30-frame cine loop, 240 x 320,
  YBR_FULL_422, JPEG baseline (decoded by Pillow), with region calibration and frame time.

Every test skips when pydicom is not installed.
"""

from __future__ import annotations

import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom")
examples = pytest.importorskip("pydicom.examples")

from busseg import _reader  # noqa: E402
from busseg.data.io import ImageReadError, frame_count, read_image, read_stack, to_grey  # noqa: E402


@pytest.fixture
def notes(monkeypatch):
    seen: list[tuple[str, str]] = []
    monkeypatch.setattr(_reader, "_notify", lambda kind, msg: seen.append((kind, msg)))
    return seen


def _path(name: str):
    from pathlib import Path

    ds = getattr(examples, name)
    assert ds.Modality == "US"
    return Path(ds.filename)


@pytest.fixture
def us_files(tmp_path):
    """Copies of the bundled ultrasound examples under .dcm names."""
    import shutil

    out = {}
    for name in ("rgb_color", "palette_color", "ybr_color"):
        out[name] = shutil.copy(_path(name), tmp_path / f"{name}.dcm")
    return {k: type(tmp_path)(v) for k, v in out.items()}


def test_single_frame_rgb_ultrasound_reads_as_grey(us_files):
    ds = pydicom.dcmread(us_files["rgb_color"])
    image = read_image(us_files["rgb_color"])
    assert image.shape == (240, 320) and image.dtype == np.uint8
    np.testing.assert_array_equal(image, to_grey(ds.pixel_array))
    assert frame_count(us_files["rgb_color"]) == 1


def test_palette_colour_goes_through_the_lookup_table(us_files):
    from pydicom.pixels import apply_color_lut

    ds = pydicom.dcmread(us_files["palette_color"])
    image = read_image(us_files["palette_color"])
    assert image.shape == (350, 800)
    np.testing.assert_array_equal(image, to_grey(apply_color_lut(ds.pixel_array, ds)))
    assert image.std() > 1  # not the raw palette indices squashed to one grey


def test_multi_frame_cine_is_a_stack(us_files):
    from busseg.data.dicom import read_dicom, read_dicom_header

    path = us_files["ybr_color"]
    assert frame_count(path) == 30
    with pytest.raises(ImageReadError, match="30 pages"):
        read_image(path)
    stack = read_stack(path)
    assert stack.shape == (30, 240, 320) and stack.dtype == np.uint8
    frames, info = read_dicom(path)
    assert frames.shape == (30, 240, 320, 3)  # converted from YBR to RGB
    np.testing.assert_array_equal(stack[7], to_grey(frames[7]))
    assert info["modality"] == "US" and info["n_frames"] == 30
    assert info["photometric"].startswith("YBR")
    assert info["spacing_mm"] is not None and info["frame_time_ms"] == pytest.approx(33.333)
    assert read_dicom_header(path)["n_frames"] == 30


def test_reader_claims_dcm_files_and_opens_cine_as_stack(us_files, notes):
    single, cine = us_files["rgb_color"], us_files["ybr_color"]
    assert _reader.napari_get_reader(str(single)) is _reader.read_frames_file
    [(image, kw, kind)] = _reader.read_frames_file(str(single))
    assert kind == "image" and image.shape == (240, 320)
    assert kw["metadata"]["busseg"]["kind"] == "case"
    [(stack, kw, kind)] = _reader.napari_get_reader(str(cine))(str(cine))
    assert stack.shape == (30, 240, 320)
    meta = kw["metadata"]["busseg"]
    assert meta["kind"] == "frames" and meta["n_frames"] == 30 and meta["modality"] == "US"
    assert not notes


def test_folder_of_dicom_files_is_a_stack(us_files, notes):
    folder = us_files["rgb_color"].parent
    (folder / "ybr_color.dcm").unlink()  # single frames only: one slice each
    assert _reader.napari_get_reader(str(folder)) is _reader.read_folder
    [(stack, kw, _)] = _reader.read_folder(str(folder))
    assert stack.shape == (2, 350, 800)
    slices = kw["metadata"]["busseg"]["slices"]
    assert [s["original_shape"] for s in slices] == [[350, 800], [240, 320]]
    np.testing.assert_array_equal(np.asarray(stack[1])[:240, :320],
                                  read_image(us_files["rgb_color"]))
    assert not notes


def test_without_pydicom_dcm_files_are_left_alone(us_files, monkeypatch):
    from busseg.data.io import IMAGE_SUFFIXES

    monkeypatch.setattr(_reader, "scan_suffixes", lambda: IMAGE_SUFFIXES)
    assert _reader.napari_get_reader(str(us_files["rgb_color"])) is None


def test_missing_pydicom_is_a_clear_error(us_files, monkeypatch):
    import builtins

    real = builtins.__import__

    def no_pydicom(name, *args, **kwargs):
        if name == "pydicom" or name.startswith("pydicom."):
            raise ImportError("No module named 'pydicom'")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_pydicom)
    with pytest.raises(ImageReadError, match=r"napari-busseg\[dicom\]"):
        read_image(us_files["rgb_color"])


def test_not_dicom_and_empty_files(tmp_path):
    bad = tmp_path / "bad.dcm"
    bad.write_bytes(b"\x00" * 10)
    with pytest.raises(ImageReadError, match="bad.dcm"):
        read_image(bad)
    empty = tmp_path / "empty.dcm"
    empty.write_bytes(b"")
    with pytest.raises(ImageReadError, match="empty"):
        read_image(empty)


@pytest.mark.gui
def test_viewer_opens_a_cine_loop_through_the_manifest(make_napari_viewer, us_files,
                                                        busseg_plugin):
    viewer = make_napari_viewer()
    viewer.open(str(us_files["ybr_color"]), plugin="napari-busseg")
    assert [layer.name for layer in viewer.layers] == ["ybr_color"]
    assert viewer.layers[0].data.shape == (30, 240, 320)
