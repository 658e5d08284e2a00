"""benchmarks/browser_latency.py runs end to end (it drives the Scan browser's private API,
so a change there must not break it unnoticed)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("napari")

pytestmark = [pytest.mark.gui, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]


def test_quick_run_with_a_background_finetune(fake_busi, tiny_checkpoint, tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "BUSSEG_HOME": str(tmp_path / "home"), "OMP_NUM_THREADS": "1"}
    env.pop("QT_QPA_PLATFORM", None)  # the Xvfb display pytest-xvfb started
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "browser_latency.py"), "--root",
         str(fake_busi), "--checkpoint", str(tiny_checkpoint), "--cases", "2",
         "--no-baseline", "--during-finetune", "3", "--timeout", "60", "--threads", "1",
         "--out", str(out), "--quiet"],
        env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    payload = json.loads((out / "browser_latency.json").read_text())
    assert len(payload["prefetched"]) == 2
    assert payload["summary"]["prefetched"]["median_s"] > 0
    assert "error" not in payload.get("finetune", {})
    assert (out / "browser_latency.md").read_text().startswith("# Scan browser latency")
