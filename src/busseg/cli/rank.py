"""``busseg rank``: score images by the model's uncertainty and write a ranking CSV."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from busseg.cli.common import (
    EXIT_OK,
    EXIT_PARTIAL,
    UsageError,
    load_cli_model,
    no_progress_bar,
    print_error,
)
from busseg.cli.inputs import file_job, folder_records


def add_rank_parser(sub) -> None:
    """Add the ``rank`` sub-command to the ``busseg`` parser's sub-parsers ``sub``."""
    r = sub.add_parser(
        "rank",
        help="rank images by the model's uncertainty (most uncertain first) into a CSV",
        description="Score each image's prediction uncertainty with a checkpoint (see "
        "busseg.uncertainty) and write a CSV, most uncertain first: the images whose "
        "correction should teach the model most. Columns: rank, path, score, entropy, "
        "flip_disagreement, class_entropy, entropy_region, cached, error, and class for "
        "images of a BUSI folder. Scores are cached per (checkpoint, image), so ranking again "
        "with the same checkpoint is immediate. Exit status: 0 all scored, 1 some images "
        "unreadable, 2 usage error (including an existing CSV without --overwrite).",
    )
    r.add_argument("paths", nargs="+", metavar="PATH",
                   help="image files or folders (BUSI or plain; *_mask*.png files are skipped)")
    r.add_argument("--out", "-o", required=True, metavar="CSV", help="the ranking CSV to write")
    r.add_argument("--checkpoint", metavar="CKPT", default=None,
                   help="checkpoint directory (default: the shipped default model)")
    r.add_argument("--device", default="auto", help="auto (default), cuda, cuda:N, mps or cpu")
    r.add_argument("--cache", metavar="FILE", default=None,
                   help="JSON file of cached scores (default: $BUSSEG_HOME/cache/"
                   "uncertainty.json, BUSSEG_HOME defaulting to ~/.busseg)")
    r.add_argument("--no-cache", action="store_true", help="neither read nor write the cache")
    r.add_argument("--overwrite", action="store_true", help="replace an existing CSV")
    r.add_argument("--no-progress", action="store_true", help="no progress bar")


def _rank_inputs(paths: list[str]) -> tuple[list[Path], dict[int, str]]:
    """Expand files and folders into image paths (deduplicated) and BUSI classes by index."""
    found: list[tuple[Path, str | None]] = []
    pairs: dict = {}
    for text in paths:
        path = Path(text).expanduser()
        if path.is_dir():
            found += [(r.image_path, r.label if r.label != "unknown" else None)
                      for r in folder_records(path)]
        elif path.is_file():
            found.append((file_job(path, path.parent, pairs).image, None))
        else:
            raise UsageError(f"no such file or folder: {path}")
    images: list[Path] = []
    labels: dict[int, str] = {}
    seen: set[Path] = set()
    for image, label in found:
        key = image.resolve()
        if key in seen:
            continue
        seen.add(key)
        if label is not None:
            labels[len(images)] = label
        images.append(image)
    return images, labels


def run_rank(args: argparse.Namespace) -> int:
    """Run ``busseg rank`` with parsed arguments; return the exit status.

    Raises
    ------
    UsageError
        If the inputs, the output CSV, the checkpoint or the device are unusable.
    """
    from busseg.uncertainty import UncertaintyCache, rank_iter, write_ranking_csv

    out = Path(args.out).expanduser()
    if out.is_dir():
        raise UsageError(f"--out {out} is a folder; give a file name such as ranking.csv")
    if out.exists() and not args.overwrite:
        raise UsageError(f"{out} exists; pass --overwrite to replace it, or choose another --out")
    images, labels = _rank_inputs(args.paths)

    model = load_cli_model(args.checkpoint, args.device)
    cache = None
    if not args.no_cache:
        home = Path(os.environ.get("BUSSEG_HOME", Path.home() / ".busseg"))
        cache = UncertaintyCache(args.cache or home / "cache" / "uncertainty.json")

    from tqdm import tqdm

    print(f"model {model.busseg_checkpoint_path}; ranking {len(images)} image(s)")
    bar = tqdm(total=len(images), unit="image", disable=no_progress_bar(args), dynamic_ncols=True)
    gen = rank_iter(images, model, cache=cache if cache is not None else False)
    try:
        while True:
            event = next(gen)
            if event[0] == "progress" and event[3] is not None:
                bar.update(1)
    except StopIteration as done:
        ranking = done.value
    finally:
        bar.close()
        if cache is not None:
            try:
                cache.save()
            except OSError as exc:
                print_error(f"could not save the score cache {cache.path}: {exc}")
    try:
        write_ranking_csv(ranking, out, labels=labels or None, overwrite=args.overwrite)
    except FileExistsError:
        raise UsageError(f"{out} appeared while ranking; pass --overwrite to replace it") from None
    failed = [e for e in ranking.entries if e.error]
    print(f"wrote {out}: {len(ranking.entries) - len(failed)} image(s) ranked "
          f"({ranking.n_cached} from the cache); most uncertain first:")
    for e in ranking.entries[: min(5, len(ranking.entries) - len(failed))]:
        print(f"  {e.score:.3f}  {e.name}")
    if failed:
        print(f"could not score {len(failed)} image(s):", file=sys.stderr)
        for e in failed[:10]:
            print(f"  {e.name}: {e.error}", file=sys.stderr)
        return EXIT_PARTIAL
    return EXIT_OK
