"""Make the duplicate-aware, class-stratified split of a BUSI-layout dataset.

    python training/make_split.py --data ../shared/data/busi/Dataset_BUSI_with_GT \
        --out training/splits/busi.csv
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from busseg.data.busi import discover_busi  # noqa: E402
from busseg.data.splits import (  # noqa: E402
    duplicate_groups,
    make_split,
    split_summary,
    thumbnail_features,
    write_split_csv,
)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(ROOT.parent / "shared/data/busi/Dataset_BUSI_with_GT"),
                    help="BUSI dataset root (Dataset_BUSI_with_GT)")
    ap.add_argument("--out", default=str(ROOT / "training/splits/busi.csv"), help="split CSV")
    ap.add_argument("--threshold", type=float, default=0.4,
                    help="correlation linking near-duplicates")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    index = discover_busi(args.data)
    feats = thumbnail_features([r.image_path for r in index.records])
    groups = duplicate_groups(feats, args.threshold)
    rows = make_split(index.records, groups, seed=args.seed)
    write_split_csv(args.out, rows)
    sizes = np.bincount(groups)
    print(f"{len(rows)} images, {len(sizes)} groups, {int((sizes > 1).sum())} groups of "
          f"near-duplicates holding {int(sizes[sizes > 1].sum())} images "
          f"(largest {int(sizes.max())})")
    cross = sum(1 for g in np.flatnonzero(sizes > 1)
                if len({index.records[i].label for i in np.flatnonzero(groups == g)}) > 1)
    print(f"{cross} groups span two classes")
    print(json.dumps(split_summary(rows), indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
