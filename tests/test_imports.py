"""The core never imports Qt or napari, and ``import busseg`` stays light (no torch).

Each check runs in a fresh interpreter, since this test process has napari and Qt loaded.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
GUI_PREFIXES = ("qtpy", "PyQt5", "PyQt6", "PySide2", "PySide6", "napari", "magicgui", "vispy",
                "superqt", "app_model")
#: The napari side of the package: the only modules allowed to import Qt / napari.
NAPARI_SIDE = ("busseg._reader", "busseg._writer", "busseg._sample_data", "busseg._widgets")

_PROBE = r"""
import importlib, json, pkgutil, sys
import busseg
light = sorted(m for m in sys.modules if m.split(".")[0] == "torch")
core = []
for info in pkgutil.walk_packages(busseg.__path__, "busseg."):
    if info.name.startswith(tuple(NAPARI_SIDE)):
        continue
    importlib.import_module(info.name)
    core.append(info.name)
gui = sorted(m for m in sys.modules if m.split(".")[0] in GUI_PREFIXES)
print(json.dumps({"torch_after_import_busseg": light, "core": core, "gui": gui}))
"""


def _probe():
    code = f"NAPARI_SIDE = {NAPARI_SIDE!r}\nGUI_PREFIXES = {GUI_PREFIXES!r}\n" + _PROBE
    env = dict(os.environ, PYTHONPATH=str(SRC) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("QT_API", None)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=env, timeout=300, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def probe():
    return _probe()


def test_import_busseg_does_not_import_torch(probe):
    assert probe["torch_after_import_busseg"] == []


def test_core_modules_import_no_qt_or_napari(probe):
    core = set(probe["core"])
    expected = {"busseg.data", "busseg.data.io", "busseg.data.busi", "busseg.data.dataset",
                "busseg.data.splits", "busseg.data.transforms", "busseg.models",
                "busseg.engine", "busseg.finetune", "busseg.losses", "busseg.metrics",
                "busseg.devices", "busseg.jobs", "busseg.data.dicom"}
    assert expected <= core, f"core modules not found: {sorted(expected - core)}"
    assert probe["gui"] == [], (
        f"importing the core ({', '.join(sorted(core))}) pulled in {probe['gui'][:10]}; "
        "only the napari side (_reader, _writer, _sample_data, _widgets) may import Qt or napari"
    )


def test_public_api_is_lazy():
    import busseg

    assert isinstance(busseg.__version__, str)
    assert {"load_model", "predict_mask", "predict_proba"} <= set(dir(busseg))
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        busseg.nope  # noqa: B018
