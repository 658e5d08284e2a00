"""The README's headline table: the annotation-session runs at two new sites, side by side.

Usage (from the repository root, after the runs listed in ``RUNS`` have written their JSON)::

    python benchmarks/session_headline.py            # prints the Markdown table

Reads ``benchmarks/results/<run>/annotation_session.json`` (written by
``benchmarks/annotation_session.py``; the command of each run is in its Markdown file) and
prints one row per arm: interactions per scan, the ratio to the same stream without learning or
calibration, lesion and normal scans, the share of scans whose automatic mask was accepted as it
stood, and the false-region rate on the normal scans after 20 answers (the starting model's in
brackets). Runs that are missing are named and skipped.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402

RESULTS = C.REPO_ROOT / "benchmarks" / "results"
#: (stream title, run folders in ``benchmarks/results``; the first holds the "off" arm).
RUNS = [
    ("v2 (BUSI only) over all of busuclm-dev, patient order",
     ["session_busuclm_v2", "session_busuclm_v2_combined", "session_busuclm_v2_adapted_cal"]),
    ("v2.1 over BUS-BRA fold 1, first 200 scans",
     ["session_busbra_v21", "session_busbra_v21_calonly", "session_busbra_v21_vote_cal",
      "session_busbra_v21_adapted", "session_busbra_v21_adapted_cal"]),
]


def _num(x) -> float:
    return math.nan if x is None else float(x)


def _arm_label(arm: dict) -> str:
    label = arm["label"].replace("file order, ", "")
    if label == "learning on":
        return "learning on (vote)"
    return label


def rows() -> list[str]:
    """The Markdown table, one row per arm of every run found."""
    out = ["| stream | arm | scans | interactions / scan | x off | lesion scans | normal scans "
           "| accepted as predicted | false regions after 20 answers (start) |",
           "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for title, runs in RUNS:
        found = {}
        for run in runs:
            path = RESULTS / run / "annotation_session.json"
            found[run] = json.loads(path.read_text()) if path.is_file() else None
        arms = [a for r in found.values() if r for a in r["arms"]]
        off = next((a["summary"] for a in arms
                    if not a["learn"] and not a.get("calibrations")), None)
        shown: set[str] = set()  # an arm run again in a later run (same protocol) once
        for run, result in found.items():
            if result is None:
                out.append(f"| {title} | *{run}: not run* | | | | | | | |")
                continue
            for arm in result["arms"]:
                if arm["label"] in shown:
                    continue
                shown.add(arm["label"])
                s = arm["summary"]
                ratio = (f"{_num(s['per_scan']) / _num(off['per_scan']):.2f}"
                         if off is not None else "–")
                acc = s["kinds"]["accepted"] / max(1, s["n"])
                fr = arm.get("false_regions", {}).get("20")
                out.append(
                    f"| {title} | {_arm_label(arm)} | {s['n']} | {C.fmt(s['per_scan'], 2)} | "
                    f"{ratio} | {C.fmt(s['lesion_per_scan'], 2)} | "
                    f"{C.fmt(s['normal_per_scan'], 2)} | {100 * acc:.0f} % | "
                    f"{C.fmt(fr, 2)} ({C.fmt(arm.get('false_regions_start_after'), 2)}) |")
    return out


def main() -> int:
    print("\n".join(rows()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
