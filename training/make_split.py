"""Make a class-stratified split of a dataset: by patient where it names patients, else by
near-duplicate group.

    python training/make_split.py --data ../shared/data/busi/Dataset_BUSI_with_GT \
        --out training/splits/busi.csv
    python training/make_split.py --data ../shared/data/busuclm-dev \
        --out training/splits/busuclm.csv --fractions 0.6 0.2 0.2 --seed 2

BUSI names no patients, so its images are grouped by pixel similarity
(:func:`busseg.data.splits.duplicate_groups`). BUS-UCLM's patient is the file prefix
(``ALWI_000`` -> ``ALWI``): whole patients go to one split, stratified by their most severe
label (a patient with a malignant lesion counts as malignant).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from busseg.data.discover import discover  # noqa: E402
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
                    help="dataset folder (any layout busseg.data.discover reads)")
    ap.add_argument("--out", default=str(ROOT / "training/splits/busi.csv"), help="split CSV")
    ap.add_argument("--threshold", type=float, default=0.4,
                    help="correlation linking near-duplicates")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--fractions", type=float, nargs=3, default=[0.70, 0.15, 0.15],
                    metavar=("TRAIN", "VAL", "TEST"), help="shares of images per split")
    args = ap.parse_args(argv)
    index = discover(args.data)
    if all(r.group for r in index.records):
        names = sorted({r.group for r in index.records})
        groups = np.array([names.index(r.group) for r in index.records], dtype=np.int64)
        print(f"split by patient: {len(names)} patients ({index.layout} layout)")
    else:
        feats = thumbnail_features([r.image_path for r in index.records])
        groups = duplicate_groups(feats, args.threshold)
    rows = make_split(index.records, groups, tuple(args.fractions), seed=args.seed)
    write_split_csv(args.out, rows)
    sizes = np.bincount(groups)
    print(f"{len(rows)} images, {len(sizes)} groups, {int((sizes > 1).sum())} groups of "
          "several images "
          f"holding {int(sizes[sizes > 1].sum())} images "
          f"(largest {int(sizes.max())})")
    cross = sum(1 for g in np.flatnonzero(sizes > 1)
                if len({index.records[i].label for i in np.flatnonzero(groups == g)}) > 1)
    print(f"{cross} groups span two classes")
    print(json.dumps(split_summary(rows), indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
