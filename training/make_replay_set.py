"""Build the replay set shipped in ``src/busseg/replay/``: BUSI training pairs, downsized.

Usage (from the repository root)::

    python training/make_replay_set.py                      # 15 benign + 15 malignant, seed 0
    python training/make_replay_set.py --out /tmp/replay --per-class 10 --longest 224

A fine-tune on a handful of corrections from a new hospital forgets what the base model
learned about prompts (boxes and clicks): replaying a few of the base model's own training pairs
beside the corrections keeps it. This script draws them reproducibly: lesion images (benign
and malignant, never normal) of the **train** split of ``training/splits/busi.csv`` only (never
validation or test images), at most one per duplicate group of the split, in a random order
seeded by ``--seed``. Each image is stored as an 8-bit grey PNG with its longest side
``--longest`` pixels (area resampling); its mask is the union of the BUSI mask files, resized
the same way and thresholded at half, stored as 0/255 grey PNG. Names and layout are BUSI's
(``benign/benign (12).png`` and ``benign/benign (12)_mask.png``), so
:func:`busseg.data.discover_busi` reads the folder. A ``manifest.csv`` lists the pairs with their
original sizes; the README (citation, licence) is kept when the folder is rebuilt.

The output folder's PNGs and manifest are replaced atomically per file; files of an earlier
draw that are not in the new one are removed (the folder is this script's output only).
"""

from __future__ import annotations

import argparse
import csv
import io
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_BUSI = ROOT.parent / "shared" / "data" / "busi"
DEFAULT_SPLIT = ROOT / "training" / "splits" / "busi.csv"
DEFAULT_OUT = ROOT / "src" / "busseg" / "replay"
LIMIT_BYTES = 1_000_000


def choose(records, rows, per_class: int, seed: int) -> list:
    """The replay records: ``per_class`` benign and malignant train-split images, seeded.

    Parameters
    ----------
    records : busseg.data.BusiIndex or sequence of BusiRecord
        The discovered BUSI dataset.
    rows : list of dict
        Rows of the split CSV (``image``, ``label``, ``group``, ``split``).
    per_class : int
        Images per lesion class (>= 1).
    seed : int
        Seed of the draw.

    Returns
    -------
    list of BusiRecord
        Benign first, then malignant, each in the drawn order.

    Raises
    ------
    ValueError
        If a class has fewer usable train-split groups than ``per_class``.
    """
    from busseg.data.splits import select_split

    train = [r for r in select_split(records, rows, "train") if not r.problems]
    group_of = {row["image"]: str(row.get("group", "")) for row in rows}
    rng = np.random.default_rng(seed)
    out = []
    for label in ("benign", "malignant"):
        recs = sorted((r for r in train if r.label == label), key=lambda r: r.rel_path)
        picked, groups = [], set()
        for i in rng.permutation(len(recs)):
            r = recs[int(i)]
            g = group_of.get(r.rel_path, r.rel_path)
            if g in groups or not r.mask_paths:
                continue
            groups.add(g)
            picked.append(r)
            if len(picked) == per_class:
                break
        if len(picked) < per_class:
            raise ValueError(f"only {len(picked)} usable {label} train-split groups, "
                             f"{per_class} asked")
        out += picked
    return out


def downsize(image: np.ndarray, mask: np.ndarray, longest: int) -> tuple[np.ndarray, np.ndarray]:
    """Resize a grey image (area resampling) and its mask (area, then >= 0.5) to ``longest``.

    Parameters
    ----------
    image : numpy.ndarray
        (H, W) uint8 grey image.
    mask : numpy.ndarray
        (H, W) bool lesion mask.
    longest : int
        Longest side of the result in pixels; images already smaller are kept as they are.

    Returns
    -------
    image, mask : numpy.ndarray
        (h, w) uint8 image and (h, w) uint8 mask in {0, 255}.
    """
    from PIL import Image

    h, w = image.shape
    scale = min(1.0, longest / max(h, w))
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    img = np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BOX))
    m = np.asarray(Image.fromarray(mask.astype(np.float32)).resize(size, Image.Resampling.BOX))
    return img.astype(np.uint8), np.where(m >= 0.5, 255, 0).astype(np.uint8)


def png_bytes(array: np.ndarray) -> bytes:
    """8-bit grey PNG of an (H, W) uint8 array, maximally compressed."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array, mode="L").save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--busi", default=str(DEFAULT_BUSI), help="BUSI folder")
    p.add_argument("--split", default=str(DEFAULT_SPLIT), help="BUSI split CSV")
    p.add_argument("--out", default=str(DEFAULT_OUT), help="output folder (default the package's)")
    p.add_argument("--per-class", type=int, default=15, help="pairs per lesion class (15)")
    p.add_argument("--longest", type=int, default=224, help="longest side in pixels (224)")
    p.add_argument("--seed", type=int, default=0, help="seed of the draw (0)")
    args = p.parse_args(argv)
    if args.per_class < 1 or args.longest < 32:
        p.error("--per-class must be >= 1 and --longest >= 32")

    sys.path.insert(0, str(ROOT / "src"))
    from busseg.data import discover_busi, read_image, read_mask
    from busseg.data.io import atomic_write_bytes
    from busseg.data.splits import read_split_csv

    busi = Path(args.busi)
    if not busi.is_dir():
        p.error(f"BUSI not found at {busi}; pass --busi")
    rows = read_split_csv(args.split)
    recs = choose(discover_busi(busi), rows, args.per_class, args.seed)
    out = Path(args.out)
    files: dict[Path, bytes] = {}
    manifest = [["image", "label", "source", "source_size", "size"]]
    for r in recs:
        image, mask = read_image(r.image_path), read_mask(list(r.mask_paths))
        img, m = downsize(image, mask, args.longest)
        rel = Path(r.label) / f"{r.name}.png"
        files[rel] = png_bytes(img)
        files[rel.with_name(f"{r.name}_mask.png")] = png_bytes(m)
        manifest.append([rel.as_posix(), r.label, r.rel_path,
                         f"{image.shape[1]}x{image.shape[0]}", f"{img.shape[1]}x{img.shape[0]}"])
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(manifest)
    files[Path("manifest.csv")] = buf.getvalue().encode()
    total = sum(len(b) for b in files.values())
    if total > LIMIT_BYTES:
        raise SystemExit(f"the replay set would take {total / 1e6:.2f} MB (> 1 MB); "
                         "lower --longest or --per-class")
    for rel, data in files.items():
        atomic_write_bytes(out / rel, data, overwrite=True)
    for old in out.glob("*/*.png"):
        if old.relative_to(out) not in files:
            old.unlink()
    print(f"wrote {len(recs)} pairs ({total / 1e3:.0f} kB) to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
