"""Property-based robustness of everything that reads or writes user files (hypothesis).

The reader (``busseg._reader``), ``read_image`` / ``read_mask``, the writer (``busseg._writer``)
and ``CorrectionStore`` get random bytes, truncated and zero-length PNG/TIFF/BMP/JPEG files,
unusual dtypes and shapes (uint16, float, bool, 1x1, 4-channel, stacks) and names with spaces
and unicode. Each call either works (and returns what the file holds) or raises the documented
error with a message naming the file; nothing else escapes, and no existing file is changed
(bytes and modification time are compared before and after).
"""

from __future__ import annotations

import io
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from busseg import _reader, _writer
from busseg.corrections import CorrectionStore
from busseg.data.io import ImageReadError, read_image, read_mask, to_grey

SETTINGS = settings(max_examples=30, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
SUFFIXES = [".png", ".tif", ".tiff", ".bmp", ".jpg", ".jpeg"]

#: Names with spaces, brackets and non-ASCII letters (all valid file names).
name_text = st.text(
    alphabet=st.sampled_from(list("abcXYZ019 ()-_,+") + list("éüßø中文ي") + ["🙂"]),
    min_size=1, max_size=24,
).map(str.strip).filter(lambda s: s and not s.startswith(".") and "_mask" not in s)


@contextmanager
def scratch():
    """A fresh folder per hypothesis example (pytest's tmp_path is per test)."""
    d = Path(tempfile.mkdtemp(prefix="busseg robust é "))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def snapshot(folder: Path) -> dict:
    """Bytes and mtime of every file under ``folder``."""
    return {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in folder.rglob("*") if p.is_file()}


class Notes:
    """Records the reader's notifications instead of showing them."""

    def __init__(self):
        self.seen: list[tuple[str, str]] = []

    def __call__(self, kind, message):
        self.seen.append((kind, message))


def encode(arr: np.ndarray, suffix: str) -> bytes:
    """Encode an array losslessly (PNG/TIFF/BMP) or as JPEG."""
    buf = io.BytesIO()
    if suffix in (".tif", ".tiff"):
        import tifffile

        photometric = "rgb" if arr.ndim == 3 and arr.shape[-1] in (3, 4) else "minisblack"
        extra = {"extrasamples": ["unassalpha"]} if arr.ndim == 3 and arr.shape[-1] == 4 else {}
        tifffile.imwrite(buf, arr, photometric=photometric, **extra)
    else:
        from PIL import Image

        fmt = {".png": "PNG", ".bmp": "BMP", ".jpg": "JPEG", ".jpeg": "JPEG"}[suffix]
        im = Image.fromarray(arr)
        if fmt == "JPEG" and im.mode == "RGBA":
            im = im.convert("RGB")
        im.save(buf, format=fmt)
    return buf.getvalue()


def check_read(path: Path, notes: Notes):
    """Read ``path`` every way; each works or raises the documented error; returns results."""
    results = {}
    for fn in (read_image, read_mask):
        try:
            out = fn(path)
        except ImageReadError as exc:
            assert path.name in str(exc), str(exc)  # the message names the file
            results[fn.__name__] = exc
        else:
            assert out.ndim == 2 and out.size > 0
            assert out.dtype == (np.uint8 if fn is read_image else bool)
            results[fn.__name__] = out
    reader = _reader.napari_get_reader(str(path))
    if reader is not None:
        n_errors = sum(k == "error" for k, _ in notes.seen)
        layers = reader(str(path))
        assert isinstance(layers, list) and layers
        if len(layers) == 1 and layers[0][0] is None:  # napari's "nothing to add"
            assert sum(k == "error" for k, _ in notes.seen) == n_errors + 1
            assert path.name in notes.seen[-1][1]
        else:
            for data, _kwargs, kind in layers:
                assert kind in ("image", "labels") and np.asarray(data).ndim == 2
    results["reader"] = reader
    return results


# --------------------------------------------------------------------------- reading


@SETTINGS
@given(data=st.binary(max_size=600), suffix=st.sampled_from(SUFFIXES), name=name_text,
       magic=st.sampled_from([b"", b"\x89PNG\r\n\x1a\n", b"II*\x00", b"MM\x00*", b"BM",
                              b"\xff\xd8\xff"]))
@example(data=b"", suffix=".png", name="empty", magic=b"")
@example(data=b"", suffix=".tif", name="empty tiff", magic=b"")
def test_random_bytes_are_refused_cleanly(data, suffix, name, magic):
    notes = Notes()
    with scratch() as d, mock.patch.object(_reader, "_notify", notes):
        path = d / f"{name}{suffix}"
        path.write_bytes(magic + data)
        before = snapshot(d)
        check_read(path, notes)
        assert snapshot(d) == before


grey = hnp.arrays(
    dtype=st.sampled_from([np.uint8, np.uint16, np.float32, np.float64, np.bool_, np.int16]),
    shape=st.tuples(st.integers(1, 12), st.integers(1, 12)),
)
colour = hnp.arrays(
    dtype=st.sampled_from([np.uint8, np.uint16]),
    shape=st.tuples(st.integers(1, 10), st.integers(1, 10), st.sampled_from([3, 4])),
)


def _writable(arr: np.ndarray, suffix: str) -> bool:
    """Whether Pillow/tifffile can store this array in this format at all."""
    if suffix in (".tif", ".tiff"):
        return not (arr.ndim == 3 and arr.dtype == np.bool_)
    if arr.dtype == np.bool_:
        return arr.ndim == 2 and suffix == ".png"
    if suffix == ".png":
        return arr.dtype == np.uint8 or (arr.dtype == np.uint16 and arr.ndim == 2)
    return arr.dtype == np.uint8 and (arr.ndim == 2 or arr.shape[-1] == 3 or suffix == ".bmp")


@SETTINGS
@given(arr=st.one_of(grey, colour), suffix=st.sampled_from([".png", ".tif", ".bmp"]),
       name=name_text, cut=st.floats(0, 1))
@example(arr=np.array([[7]], np.uint8), suffix=".png", name="one pixel", cut=1.0)
@example(arr=np.full((2, 3), 65535, np.uint16), suffix=".png", name="u16 é", cut=1.0)
@example(arr=np.array([[0.5, np.nan]], np.float64), suffix=".tif", name="nan float", cut=1.0)
def test_valid_and_truncated_images(arr, suffix, name, cut):
    assume(_writable(arr, suffix))
    if np.issubdtype(arr.dtype, np.floating) and suffix != ".tif":
        return
    blob = encode(arr, suffix)
    notes = Notes()
    with scratch() as d, mock.patch.object(_reader, "_notify", notes):
        path = d / f"{name}{suffix}"
        whole = cut == 1.0
        path.write_bytes(blob if whole else blob[: int(len(blob) * cut)])
        before = snapshot(d)
        res = check_read(path, notes)
        assert snapshot(d) == before
        if whole:  # a complete lossless file reads back exactly what was written
            expected = to_grey(arr.astype(np.uint8) * 255 if arr.dtype == np.bool_ else arr)
            assert isinstance(res["read_image"], np.ndarray), res["read_image"]
            np.testing.assert_array_equal(res["read_image"], expected)
            lesion = arr[..., :3].max(axis=-1) if arr.ndim == 3 else arr
            np.testing.assert_array_equal(res["read_mask"], np.nan_to_num(lesion) > 0)
            assert res["reader"] is _reader.read_image_file
        elif isinstance(res["read_image"], np.ndarray):  # only trailing metadata was cut
            assert res["read_image"].shape == arr.shape[:2]


@SETTINGS
@given(n=st.integers(2, 5), h=st.integers(1, 8), w=st.integers(1, 8),
       dtype=st.sampled_from([np.uint8, np.uint16, np.float32, np.float64]), name=name_text)
def test_stacks_are_refused_by_read_image_and_read_by_the_stack_reader(n, h, w, dtype, name):
    import tifffile

    with scratch() as d:
        path = d / f"{name}.tif"
        tifffile.imwrite(path, np.zeros((n, h, w), dtype), photometric="minisblack")
        with tifffile.TiffFile(path) as tif:  # (n, h, 1) is one n x h page with 1 sample
            assume(len(tif.pages) == n)
        before = snapshot(d)
        for fn in (read_image, read_mask):
            with pytest.raises(ImageReadError, match=f"{n} pages"):
                fn(path)
        assert _reader.napari_get_reader(str(path)) is _reader.read_frames_file  # a stack
        assert snapshot(d) == before


def test_huge_header_and_odd_channels_are_clear_errors(tmp_path):
    import struct
    import zlib

    import tifffile

    def chunk(kind, payload):
        return (struct.pack(">I", len(payload)) + kind + payload
                + struct.pack(">I", zlib.crc32(kind + payload) & 0xFFFFFFFF))

    bomb = tmp_path / "bomb é.png"  # a 30000 x 30000 header and no pixel data
    header = struct.pack(">IIBBBBB", 30000, 30000, 8, 0, 0, 0, 0)
    bomb.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b""))
    with pytest.raises(ImageReadError, match="safety limit"):
        read_image(bomb)
    notes = Notes()
    with mock.patch.object(_reader, "_notify", notes):
        assert _reader.napari_get_reader(str(bomb))(str(bomb)) == [(None,)]
    assert notes.seen[-1][0] == "error" and bomb.name in notes.seen[-1][1]
    five = tmp_path / "five channels.tif"
    tifffile.imwrite(five, np.zeros((4, 4, 5), np.uint8), planarconfig="contig",
                     photometric="minisblack")
    with pytest.raises(ImageReadError, match="shape"):
        read_image(five)
    cplx = tmp_path / "complex.tif"
    tifffile.imwrite(cplx, np.zeros((4, 4), np.complex64))
    with pytest.raises(ImageReadError, match="complex"):
        read_image(cplx)
    with pytest.raises(IsADirectoryError):
        read_image(tmp_path)


@SETTINGS
@given(names=st.lists(name_text, min_size=1, max_size=4, unique_by=str.lower),
       corrupt=st.lists(st.booleans(), min_size=4, max_size=4))
def test_folders_with_unicode_names_and_corrupt_files_open_lazily(names, corrupt):
    notes = Notes()
    with scratch() as d, mock.patch.object(_reader, "_notify", notes):
        folder = d / "scans é"
        folder.mkdir()
        value = {}
        for i, name in enumerate(names):
            p = folder / f"{name}.png"
            value[name] = 0 if corrupt[i] else i + 1
            p.write_bytes(b"junk" if corrupt[i] else encode(np.full((3, 4), i + 1, np.uint8),
                                                            ".png"))
        before = snapshot(d)
        reader = _reader.napari_get_reader(str(folder))
        assert reader is _reader.read_folder
        ((data, kwargs, kind),) = reader(str(folder))
        slices = kwargs["metadata"]["busseg"]["slices"]
        assert kind == "image" and sorted(s["name"] for s in slices) == sorted(names)
        stack = np.asarray(data)  # decoding every slice never raises; corrupt ones are zeros
        for k, info in enumerate(slices):
            assert (stack[k][:3, :4] == value[info["name"]]).all()
        if any(corrupt[: len(names)]):
            assert any(kind == "warning" for kind, _ in notes.seen)
        assert snapshot(d) == before


# --------------------------------------------------------------------------- writing


labels = st.tuples(
    hnp.arrays(
        dtype=np.uint8, elements=st.integers(0, 3),
        shape=st.one_of(st.tuples(st.integers(1, 9), st.integers(1, 9)),
                        st.tuples(st.integers(1, 3), st.integers(1, 6), st.integers(1, 6))),
    ),
    st.sampled_from([np.uint8, np.uint16, np.int32, np.int64, np.bool_, np.float32]),
).map(lambda t: t[0].astype(t[1]))


@SETTINGS
@given(data=labels, suffix=st.sampled_from([".png", ".tif", ".tiff", ".jpg", ".PNG"]),
       name=name_text, existing=st.booleans())
def test_writer_round_trips_and_touches_no_other_file(data, suffix, name, existing):
    import tifffile

    with scratch() as d:
        (d / "other.png").write_bytes(b"someone else's file")
        path = d / f"{name}{suffix}"
        stack_dir = path.with_suffix("")
        if existing and data.ndim == 3 and suffix.lower() == ".png":
            # a per-slice file of the stack exists: refused before anything is written
            stack_dir.mkdir()
            (stack_dir / f"{stack_dir.name}_0000.png").write_bytes(b"old")
            before = snapshot(d)
            with pytest.raises(FileExistsError, match="already exist"):
                _writer.write_labels(str(path), data, {})
            assert snapshot(d) == before
            return
        if existing:
            path.write_bytes(b"old")  # napari's save dialog confirmed replacing this one file
        before = {p: v for p, v in snapshot(d).items() if p != path}
        written = [Path(p) for p in _writer.write_labels(str(path), data, {})]
        after = snapshot(d)
        assert {p: v for p, v in after.items() if p in before} == before  # nothing else changed
        assert set(after) - set(before) - {path} == set(written) - {path}
        if suffix == ".jpg":
            assert written == [] and (path.read_bytes() == b"old" if existing
                                      else not path.exists())
        elif suffix.lower() == ".png" and data.ndim == 2:
            assert written == [path]
            np.testing.assert_array_equal(read_mask(path), data > 0)
        elif suffix.lower() == ".png":
            assert len(written) == data.shape[0]
            for i, p in enumerate(written):
                assert p.parent == stack_dir
                np.testing.assert_array_equal(read_mask(p), data[i] > 0)
        else:
            assert written == [path]
            back = tifffile.imread(path)
            if back.ndim < data.ndim:  # tifffile squeezes a one-page stack to one 2D page
                assert data.shape[0] == 1 and back.shape == data.shape[1:]
                back = back[None]
            np.testing.assert_array_equal(back, data.astype(np.uint8) if data.dtype == bool
                                          else data)


@pytest.mark.parametrize("data, match", [
    (np.zeros((2, 2, 2, 2), np.uint8), "2D"), (np.zeros(5, np.uint8), "2D"),
    (np.zeros((0, 4), np.uint8), "no pixels"), (np.zeros((3, 3), np.complex64), "dtype"),
])
def test_writer_refuses_what_it_cannot_save(tmp_path, data, match):
    for suffix in (".png", ".tif"):
        with pytest.raises(ValueError, match=match):
            _writer.write_labels(str(tmp_path / f"x{suffix}"), data, {})
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("bad", ["../escape", "a/b", "..", "", "x\ny"])
def test_writer_never_writes_outside_the_stack_folder(tmp_path, bad):
    meta = {"metadata": {"busseg": {"slices": [{"name": bad, "label": "benign",
                                                 "original_shape": [2, 2]}]}}}
    target = tmp_path / "out" / "stack.png"
    with pytest.raises(ValueError, match="name"):
        _writer.write_labels(str(target), np.ones((1, 2, 2), np.uint8), meta)
    meta["metadata"]["busseg"]["slices"][0].update(name="ok", label="../..")
    with pytest.raises(ValueError, match="class"):
        _writer.write_labels(str(target), np.ones((1, 2, 2), np.uint8), meta)
    assert not any(p.is_file() for p in tmp_path.rglob("*"))


def test_writer_path_is_a_folder_or_stack_name_a_file(tmp_path):
    (tmp_path / "dir.png").mkdir()
    with pytest.raises(IsADirectoryError, match="folder"):
        _writer.write_labels(str(tmp_path / "dir.png"), np.ones((2, 2), np.uint8), {})
    (tmp_path / "stack").write_bytes(b"keep")
    with pytest.raises(FileExistsError, match="is a file"):
        _writer.write_labels(str(tmp_path / "stack.png"), np.ones((2, 2, 2), np.uint8), {})
    assert (tmp_path / "stack").read_bytes() == b"keep"


# --------------------------------------------------------------------------- CorrectionStore


images = st.one_of(
    grey, colour,
    hnp.arrays(np.float64, st.tuples(st.integers(1, 8), st.integers(1, 8)),
               elements=st.floats(allow_nan=True, allow_infinity=True, width=32)),
)


@SETTINGS
@given(image=images, name=name_text,
       label=st.sampled_from(["benign", "malignant", "normal", "unknown"]),
       mask_dtype=st.sampled_from([np.bool_, np.uint8, np.int64, np.float32]),
       seed=st.integers(0, 9))
def test_correction_store_saves_loads_and_never_overwrites(image, name, label, mask_dtype, seed):
    mask = (np.random.default_rng(seed).random(image.shape[:2]) > 0.5).astype(mask_dtype)
    with scratch() as d:
        store = CorrectionStore(d / "corrections ü")
        paths = store.save(name, label, image, mask)
        assert paths.mask.name == f"{name}_mask.png" and paths.mask.parent.name == label
        got_image, got_mask = store.load(name, label)
        np.testing.assert_array_equal(got_image, to_grey(image))
        np.testing.assert_array_equal(got_mask, mask > 0)
        assert store.is_corrected(name, label)
        assert [r.name for r in store.records()] == [name]
        before = snapshot(d)
        with pytest.raises(FileExistsError, match="overwrite=True"):
            store.save(name, label, image, 1 - np.asarray(mask, np.uint8))
        assert snapshot(d) == before
        with pytest.raises(ValueError, match="mask is"):
            store.save(name + " 2", label, image, mask[:, :0] if mask.shape[1] > 1 else
                       np.zeros((mask.shape[0] + 1, 1)))
        assert snapshot(d) == before


@SETTINGS
@given(bad=st.one_of(
    st.sampled_from(["", ".", "..", "a/b", " lead", "trail ", ".hidden", "tab\there",
                     "nul\x00", "x" * 300, "bin\\ary", "klasse ü"]),
    st.text(min_size=1, max_size=5).map(lambda s: f"a/{s}")),
    which=st.sampled_from(["name", "class"]))
def test_correction_store_refuses_unusable_names(bad, which):
    # a unicode name with a space is a valid case name, only an invalid class
    assume(not (which == "name" and bad == "klasse ü"))
    with scratch() as d:
        store = CorrectionStore(d / "c")
        name, label = (bad, "benign") if which == "name" else ("case 1", bad)
        with pytest.raises(ValueError, match="name|class") as err:
            store.save(name, label, np.zeros((2, 2), np.uint8), np.zeros((2, 2), bool))
        msg = str(err.value)
        assert any(s in msg for s in ("use a plain name", "bytes", "is not one of", "pass label"))
        assert not (d / "c").exists()  # nothing written anywhere


@pytest.mark.parametrize("image, match", [
    (np.zeros((3, 3), np.complex64), "real numbers"), (np.zeros((3, 3, 2), np.uint8), "shape"),
    (np.zeros((0, 3), np.uint8), "empty"), (np.array([["a"]]), "real numbers"),
    (np.zeros((2, 3, 3, 3), np.uint8), "shape"),
])
def test_correction_store_refuses_unusable_images(tmp_path, image, match):
    store = CorrectionStore(tmp_path / "c")
    with pytest.raises(ValueError, match=match):
        store.save("case", "benign", image, np.zeros(image.shape[:2], bool))
    with pytest.raises(ValueError, match="dtype"):
        store.save("case", "benign", np.zeros((2, 2), np.uint8), np.array([["a", "b"]] * 2))
    assert not (tmp_path / "c").exists()
