"""The npe2 manifest: valid, complete, importable, and cheap to load (no torch at startup)."""

from __future__ import annotations

import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

import busseg

MANIFEST = Path(busseg.__file__).parent / "napari.yaml"


@pytest.fixture(scope="module")
def manifest():
    from npe2 import PluginManifest

    return PluginManifest.from_file(MANIFEST)


def test_npe2_validate_passes():
    result = subprocess.run(
        [sys.executable, "-m", "npe2", "validate", str(MANIFEST)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "valid" in result.stdout


def test_contributions(manifest):
    assert manifest.name == "napari-busseg"
    commands = {c.id: c.python_name for c in manifest.contributions.commands}
    assert commands == {
        "napari-busseg.get_reader": "busseg._reader:napari_get_reader",
        "napari-busseg.write_labels": "busseg._writer:write_labels",
        "napari-busseg.make_busi_samples": "busseg._sample_data:make_busi_samples",
        "napari-busseg.segment_widget": "busseg._widgets.segment:SegmentWidget",
        "napari-busseg.finetune_widget": "busseg._widgets.finetune:FineTuneWidget",
        "napari-busseg.browser_widget": "busseg._widgets.browser:ScanBrowserWidget",
    }
    (reader,) = manifest.contributions.readers
    assert reader.accepts_directories
    # exactly the image types the reader reads: no catch-all '*' (folders go by
    # accepts_directories), so napari does not offer the plugin for CSVs and the like
    from busseg.data.io import IMAGE_SUFFIXES

    # (DICOM too: napari_get_reader declines .dcm files when pydicom is not installed)
    assert set(reader.filename_patterns) == {f"*{s}" for s in IMAGE_SUFFIXES} | {"*.dcm"}
    (writer,) = manifest.contributions.writers
    assert set(writer.filename_extensions) == {".png", ".tif", ".tiff"}
    assert [str(t) for t in writer.layer_types] == ["labels"]
    widgets = {w.display_name: w.command for w in manifest.contributions.widgets}
    assert widgets == {
        "Segment lesions": "napari-busseg.segment_widget",
        "Fine-tune": "napari-busseg.finetune_widget",
        "Scan browser": "napari-busseg.browser_widget",
    }
    assert [s.key for s in manifest.contributions.sample_data] == ["busi_samples"]


def test_every_python_name_imports(manifest):
    manifest.validate_imports()  # raises naming the entry that does not resolve


def test_napari_side_modules_do_not_import_torch():
    code = (
        "import sys\n"
        "import busseg._reader, busseg._writer, busseg._sample_data, busseg._widgets.browser\n"
        "from busseg._reader import napari_get_reader\n"
        "import busseg._widgets\n"
        "assert 'torch' not in sys.modules, 'torch imported at napari startup'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_installed_plugin_is_discovered():
    try:
        eps = metadata.distribution("napari-busseg").entry_points
    except metadata.PackageNotFoundError:
        pytest.skip("napari-busseg is not installed (pip install -e .); napari cannot find it")
    (ep,) = [e for e in eps if e.group == "napari.manifest"]
    assert ep.value == "busseg:napari.yaml"
    from npe2 import PluginManager

    pm = PluginManager()
    pm.discover()
    assert "napari-busseg" in pm


def test_reader_is_offered_for_images_and_folders_only(busseg_plugin, tmp_path):
    def offered(path):
        return "napari-busseg" in {
            r.plugin_name for r in busseg_plugin.iter_compatible_readers([str(path)])
        }

    folder = tmp_path / "scans"
    folder.mkdir()
    for name in ("a.png", "B.PNG", "c d é.jpeg", "x.tif", "y.TIFF", "z.bmp", "w.jpg"):
        assert offered(folder / name), name
    assert offered(folder)
    for name in ("table.csv", "notes.txt", "volume.nii.gz", "model.safetensors", "noext"):
        assert not offered(folder / name), name
