"""Shared helpers of the benchmark scripts: paths, hardware record, BUS-BRA index, output.

The scripts in this folder are run as ``python benchmarks/NAME.py`` from the repository root
(or imported by ``tests/test_benchmarks.py``). They reuse the ``busseg`` core; when the package
is not installed, ``src/`` of this checkout is put on ``sys.path`` so they run from a clone.
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import json
import math
import os
import platform
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]

try:  # a source checkout without `pip install -e .`
    import busseg  # noqa: F401
except ImportError:  # pragma: no cover - depends on the environment
    sys.path.insert(0, str(REPO_ROOT / "src"))

#: Default data locations, relative to the repository root (see ../shared/data/README.md).
DEFAULT_BUSI = REPO_ROOT / ".." / "shared" / "data" / "busi" / "Dataset_BUSI_with_GT"
DEFAULT_BUSBRA = REPO_ROOT / ".." / "shared" / "data" / "busbra-fold1"
DEFAULT_SPLIT = REPO_ROOT / "training" / "splits" / "busi.csv"
DEFAULT_BUSUCLM = REPO_ROOT / ".." / "shared" / "data" / "busuclm-dev"
DEFAULT_BUSUCLM_SPLIT = REPO_ROOT / "training" / "splits" / "busuclm.csv"
DEFAULT_OUT = REPO_ROOT / "benchmarks" / "results"


# --------------------------------------------------------------------------- arguments


def add_common_args(parser, *, device: bool = True) -> None:
    """Add ``--checkpoint``, ``--out``, ``--threads`` (and ``--device``) to a parser."""
    parser.add_argument(
        "--checkpoint",
        default=None,
        help="checkpoint folder (default: the shipped default model, "
        "busseg.models.default_checkpoint_path())",
    )
    parser.add_argument(
        "--out",
        default=str(DEFAULT_OUT),
        help="folder for NAME.md, NAME.json and NAME.png (default: benchmarks/results)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch intra-op threads (default: torch's default, which honours OMP_NUM_THREADS)",
    )
    if device:
        parser.add_argument(
            "--device",
            default="auto",
            help="'auto' (cuda, then mps, then cpu), 'cuda', 'mps' or 'cpu'",
        )


def set_threads(n: int | None) -> int:
    """Set torch's intra-op thread count (if ``n`` is given) and return the count in use."""
    import torch

    if n is not None:
        if n < 1:
            raise SystemExit(f"--threads must be at least 1, got {n}")
        torch.set_num_threads(int(n))
    return int(torch.get_num_threads())


def argument_parser(doc: str | None) -> argparse.ArgumentParser:
    """A parser described by the first paragraph of a benchmark's docstring, kept as written."""
    return argparse.ArgumentParser(description=(doc or "").split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)


def threads_and_checkpoint(args: argparse.Namespace) -> tuple[int, Path]:
    """Apply ``--threads`` and resolve ``--checkpoint``: (threads in use, checkpoint folder).

    See :func:`set_threads` and :func:`resolve_checkpoint`.
    """
    return set_threads(args.threads), resolve_checkpoint(args.checkpoint)


#: Earlier releases of the shipped default model, by name: the commit whose
#: ``src/busseg/weights/default`` holds them (``--checkpoint v2`` or ``--checkpoint git:REV``).
RELEASES = {"v2": "ed2480a~1"}


def checkpoint_from_git(rev: str, dest: str | os.PathLike | None = None) -> Path:
    """Extract the default model of an earlier commit (``git show``) into a folder.

    Parameters
    ----------
    rev : str
        A git revision of this repository, or a name in :data:`RELEASES` (``"v2"``).
    dest : path, optional
        Where to write ``model.safetensors`` and ``config.json`` (default
        ``runs/release-<rev>``, git-ignored); an existing complete folder is reused.

    Returns
    -------
    pathlib.Path

    Raises
    ------
    SystemExit
        If git or the revision is not available (e.g. a shallow clone), saying what to do.
    """
    import subprocess

    commit = RELEASES.get(rev, rev)
    safe = "".join(c if c.isalnum() else "-" for c in rev)
    out = Path(dest) if dest is not None else REPO_ROOT / "runs" / f"release-{safe}"
    names = ("model.safetensors", "config.json")
    if all((out / n).is_file() for n in names):
        return out
    out.mkdir(parents=True, exist_ok=True)
    for n in names:
        try:
            data = subprocess.run(["git", "show", f"{commit}:src/busseg/weights/default/{n}"],
                                  cwd=REPO_ROOT, check=True, capture_output=True).stdout
        except (OSError, subprocess.CalledProcessError) as exc:
            raise SystemExit(f"cannot read the default model of {commit} from git ({exc}); "
                             "run from a full clone (not shallow) or pass --checkpoint with a "
                             "folder") from exc
        tmp = out / f".{n}.tmp"
        tmp.write_bytes(data)
        os.replace(tmp, out / n)
    return out


def resolve_checkpoint(path: str | os.PathLike | None) -> Path:
    """The checkpoint folder to benchmark: ``path`` or the shipped default model.

    ``path`` may also be ``git:REV`` or a release name of :data:`RELEASES` (``v2``): the
    default model of that commit, extracted with :func:`checkpoint_from_git`.

    Raises
    ------
    SystemExit
        If the folder does not exist, with a message saying what to pass instead.
    """
    from busseg.models import default_checkpoint_path

    if isinstance(path, str) and (path in RELEASES or path.startswith("git:")):
        return checkpoint_from_git(path[4:] if path.startswith("git:") else path)
    p = Path(path).expanduser() if path is not None else default_checkpoint_path()
    if p.is_file():
        p = p.parent
    if not (p / "config.json").is_file():
        which = "the shipped default model" if path is None else "the checkpoint"
        raise SystemExit(
            f"{which} was not found at {p} (no config.json there). Pass --checkpoint with a "
            "folder holding model.safetensors and config.json (e.g. runs/<name>/best from "
            "training/train.py)."
        )
    return p


def require_dir(path: str | os.PathLike, what: str, flag: str) -> Path:
    """Return ``path`` as a resolved Path, or exit saying which flag points at the data."""
    p = Path(path).expanduser()
    if not p.is_dir():
        raise SystemExit(f"{what} not found at {p}; pass {flag} with its location")
    return p.resolve()


# --------------------------------------------------------------------------- hardware


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux, else ``platform.processor()``)."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def hardware_info(device: Any = "cpu") -> dict[str, Any]:
    """Where a benchmark ran: CPU, threads, memory, torch, device, versions.

    Parameters
    ----------
    device : str or torch.device
        The device the models ran on.

    Returns
    -------
    dict
        JSON-serialisable: ``cpu``, ``cpu_count`` (logical CPUs of the machine),
        ``cpus_available`` (those this process may use), ``torch_threads``, ``memory_gib``,
        ``device``, ``gpu`` (name or None), ``torch``, ``numpy``, ``python``, ``platform``,
        ``busseg``, ``omp_num_threads`` (the environment variable or None), ``date`` (UTC).
    """
    import torch

    import busseg

    dev = str(device)
    gpu = None
    if dev.startswith("cuda") and torch.cuda.is_available():
        gpu = torch.cuda.get_device_name(torch.device(dev))
    try:
        avail = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        avail = os.cpu_count()
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):  # pragma: no cover
        mem = float("nan")
    return {
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpus_available": avail,
        "torch_threads": int(torch.get_num_threads()),
        "memory_gib": round(mem, 1),
        "device": dev,
        "gpu": gpu,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "busseg": busseg.__version__,
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def hardware_markdown(info: Mapping[str, Any]) -> str:
    """One Markdown line describing :func:`hardware_info`."""
    dev = info["device"] + (f" ({info['gpu']})" if info.get("gpu") else "")
    return (
        f"Hardware: {info['cpu']}, {info['cpus_available']} of {info['cpu_count']} CPUs "
        f"available, {info['torch_threads']} torch thread(s), {info['memory_gib']} GiB RAM; "
        f"device {dev}; torch {info['torch']}, numpy {info['numpy']}, Python {info['python']}, "
        f"busseg {info['busseg']}; {info['date']}."
    )


def checkpoint_summary(path: Path) -> dict[str, Any]:
    """Path, architecture, input size and threshold of a checkpoint (for the record)."""
    from busseg.models import read_checkpoint_config

    cfg = read_checkpoint_config(path)
    return {
        "path": repo_relative(path),
        "model": cfg.get("model", {}),
        "input_size": cfg.get("preprocessing", {}).get("input_size"),
        "threshold": cfg.get("inference", {}).get("threshold"),
        "tta_flips": cfg.get("inference", {}).get("tta_flips"),
        "lineage": cfg.get("lineage", {}),
    }


def repo_relative(path: str | os.PathLike) -> str:
    """``path`` relative to the repository when inside it (no machine path in the results)."""
    p = Path(path).resolve()
    try:
        return p.relative_to(REPO_ROOT).as_posix()
    except ValueError:
        return str(p)


def report_head(title: str, result: Mapping[str, Any], model: str = "") -> list[str]:
    """First lines of a benchmark's Markdown report: the title, the hardware and the checkpoint.

    ``model`` prefixes the checkpoint line (e.g. ``"Prompt model: "``).
    """
    return [f"# {title}", "", hardware_markdown(result["hardware"]), "",
            model + checkpoint_markdown(result["checkpoint"])]


def checkpoint_markdown(summary: Mapping[str, Any]) -> str:
    """One Markdown line describing :func:`checkpoint_summary`."""
    m = summary["model"]
    size = summary.get("input_size") or ["?", "?"]
    return (
        f"Checkpoint: `{summary['path']}` ({m.get('arch', '?')}/{m.get('encoder', '?')}, base "
        f"{m.get('base_channels', '?')}, depth {m.get('depth', '?')}, input "
        f"{size[0]}x{size[1]}, threshold {summary.get('threshold')})."
    )


# --------------------------------------------------------------------------- BUS-BRA


@dataclass(frozen=True)
class BusbraRecord:
    """One image of BUS-BRA (Gomez-Flores et al., Medical Physics 51(4), 2024).

    Attributes
    ----------
    id : str
        E.g. ``"bus_0007-l"``.
    case : str
        Patient; images of one patient must stay on one side of a split.
    pathology : str
        ``"benign"`` or ``"malignant"``.
    device : str
        Scanner, e.g. ``"GE Logiq 7 @10-14MHz"``.
    image_path, mask_path : pathlib.Path
        ``Images/<id>.png`` and ``Masks/mask_<number>.png``.
    """

    id: str
    case: str
    pathology: str
    device: str
    image_path: Path
    mask_path: Path


def read_busbra(root: str | os.PathLike) -> list[BusbraRecord]:
    """Index a BUS-BRA folder (``Images/``, ``Masks/``, ``bus_data.csv``).

    Parameters
    ----------
    root : path
        The folder, e.g. ``../shared/data/busbra-fold1``.

    Returns
    -------
    list of BusbraRecord
        In ``bus_data.csv`` order, only rows whose image and mask files exist.

    Raises
    ------
    SystemExit
        If ``bus_data.csv`` is missing or lacks a column, or no listed image exists.
    """
    root = Path(root)
    table = root / "bus_data.csv"
    if not table.is_file():
        raise SystemExit(f"{table} not found; pass --busbra with a BUS-BRA folder")
    with open(table, newline="") as fh:
        reader = csv.DictReader(fh)
        need = {"ID", "Case", "Pathology", "Device"}
        missing = need - set(reader.fieldnames or ())
        if missing:
            raise SystemExit(f"{table} lacks the column(s) {sorted(missing)}")
        rows = list(reader)
    out = []
    for r in rows:
        rid = r["ID"].strip()
        img = root / "Images" / f"{rid}.png"
        mask = root / "Masks" / f"{rid.replace('bus_', 'mask_', 1)}.png"
        if img.is_file() and mask.is_file():
            out.append(
                BusbraRecord(
                    rid,
                    r["Case"].strip(),
                    r["Pathology"].strip().lower(),
                    r["Device"].strip(),
                    img,
                    mask,
                )
            )
    if not out:
        raise SystemExit(f"none of the {len(rows)} images listed in {table} exist under {root}")
    return out


def patient_split(
    records: Sequence[BusbraRecord], fraction: float = 0.5, seed: int = 0
) -> tuple[list[BusbraRecord], list[BusbraRecord]]:
    """Split records by patient (``case``) into two disjoint sets.

    Parameters
    ----------
    records : sequence of BusbraRecord
    fraction : float
        Share of patients in the first set, in (0, 1).
    seed : int
        Seed of the patient permutation.

    Returns
    -------
    first, second : list of BusbraRecord
        No patient has images in both; each keeps the input order.
    """
    if not 0 < fraction < 1:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    cases = sorted({r.case for r in records})
    perm = np.random.default_rng(seed).permutation(len(cases))
    n_first = int(round(len(cases) * fraction))
    first_cases = {cases[i] for i in perm[:n_first]}
    first = [r for r in records if r.case in first_cases]
    second = [r for r in records if r.case not in first_cases]
    return first, second


def split_records(root: str | os.PathLike, split_csv: str | os.PathLike, split: str = "test",
                  *, labels: Sequence[str] | None = None) -> tuple[list, list[dict]]:
    """Records of one split of a dataset read by :func:`busseg.data.discover`.

    Parameters
    ----------
    root : path
        The dataset folder (e.g. ``../shared/data/busuclm-dev``).
    split_csv : path
        A split CSV (columns ``image,label,group,split``; ``image`` is the record's
        ``rel_path``), e.g. ``training/splits/busuclm.csv``.
    split : str
        ``"train"``, ``"val"`` or ``"test"``.
    labels : sequence of str, optional
        Keep only records with these labels (e.g. ``("benign", "malignant")``).

    Returns
    -------
    records : list of busseg.data.BusiRecord
        The usable records of the split, in split-file order.
    skipped : list of dict
        ``{"image": rel_path, "label": ..., "problems": [...]}`` for each record of the
        split (and of ``labels``) that cannot be used (size mismatch, no mask), so a report
        can name them instead of dropping them silently.

    Raises
    ------
    SystemExit
        If the folder or the split file is missing, naming the flag to pass.
    """
    from busseg.data import discover
    from busseg.data.splits import read_split_csv, select_split

    root, split_csv = Path(root), Path(split_csv)
    if not root.is_dir():
        raise SystemExit(f"{root} not found; pass its location")
    if not split_csv.is_file():
        raise SystemExit(f"split file {split_csv} not found; pass it (e.g. --busuclm-split)")
    index = discover(root)
    rows = read_split_csv(split_csv)
    wanted = set(labels) if labels is not None else None
    in_split = {r["image"] for r in rows if r["split"] == split}
    records = [r for r in select_split(index, rows, split)
               if wanted is None or r.label in wanted]
    skipped = [{"image": r.rel_path, "label": r.label, "problems": list(r.problems)
                or ["no mask"]}
               for r in index.records
               if r.rel_path in in_split and not r.usable
               and (wanted is None or r.label in wanted)]
    return records, skipped


# --------------------------------------------------------------------------- statistics


def median_iqr(values: Iterable[float]) -> tuple[float, float, float]:
    """Median and the 25th and 75th percentiles of the finite values (nan if none)."""
    x = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=float)
    if x.size == 0:
        return (math.nan, math.nan, math.nan)
    q25, q50, q75 = np.percentile(x, [25, 50, 75])
    return float(q50), float(q25), float(q75)


def fmt(x: Any, digits: int = 3) -> str:
    """A number for a Markdown cell; ``–`` for None or nan."""
    if x is None:
        return "–"
    try:
        xf = float(x)
    except (TypeError, ValueError):
        return str(x)
    if math.isnan(xf):
        return "–"
    return f"{xf:.{digits}f}"


class Stopwatch:
    """``with Stopwatch() as sw: ...`` then ``sw.seconds`` (``time.perf_counter``)."""

    def __enter__(self) -> Stopwatch:
        self.start = time.perf_counter()
        self.seconds = math.nan
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self.start


# --------------------------------------------------------------------------- output


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def _nan_to_none(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, np.floating) and not np.isfinite(obj):
        return None
    if isinstance(obj, Mapping):
        return {str(k): _nan_to_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_nan_to_none(v) for v in obj]
    return obj


def to_json(payload: Any) -> str:
    """Strict JSON (nan and inf become null) with numpy scalars, arrays and paths converted."""
    return json.dumps(_nan_to_none(payload), indent=2, default=_json_default, allow_nan=False)


def write_results(
    out_dir: str | os.PathLike,
    name: str,
    markdown: str,
    payload: Mapping[str, Any],
    figure: Any | None = None,
) -> dict[str, Path]:
    """Write ``NAME.md``, ``NAME.json`` (and ``NAME.png``) into ``out_dir``, atomically.

    Benchmark results are regenerated outputs, so existing files of the same name are
    replaced (each write is atomic: a reader sees the old or the new file, never half).

    Returns
    -------
    dict
        ``{"md": path, "json": path, "png": path}`` (``png`` only with a figure).
    """
    from busseg.data.io import atomic_write_bytes

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "md": atomic_write_bytes(out / f"{name}.md", markdown.encode(), overwrite=True),
        "json": atomic_write_bytes(
            out / f"{name}.json", to_json(payload).encode() + b"\n", overwrite=True
        ),
    }
    if figure is not None:
        import io

        buf = io.BytesIO()
        figure.savefig(buf, format="png", dpi=120, bbox_inches="tight")
        paths["png"] = atomic_write_bytes(out / f"{name}.png", buf.getvalue(), overwrite=True)
        import matplotlib.pyplot as plt

        plt.close(figure)
    return paths


def new_figure(nrows: int = 1, ncols: int = 1, size: tuple[float, float] = (6.0, 4.0)):
    """A matplotlib figure on the non-interactive Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt.subplots(nrows, ncols, figsize=(size[0] * ncols, size[1] * nrows), squeeze=False)


def log(msg: str, quiet: bool = False) -> None:
    """Progress line on stderr (stdout carries the Markdown table)."""
    if not quiet:
        print(msg, file=sys.stderr, flush=True)


def plot_reliability(ax, curve: Mapping[str, Any], label: str = "") -> None:
    """Draw a reliability diagram of :func:`busseg.metrics.reliability_curve` on ``ax``.

    Observed share of positives against the mean predicted probability per bin (dots sized
    by the bin's count, joined by a line), the diagonal of perfect calibration, and the
    bin counts as a bar histogram on a twin axis. The legend gives the ECE and N.
    """
    pred = np.asarray(curve["predicted"], dtype=float)
    obs = np.asarray(curve["observed"], dtype=float)
    count = np.asarray(curve["count"], dtype=float)
    edges = np.asarray(curve["bin_edges"], dtype=float)
    filled = count > 0
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1, label="perfect calibration")
    ax.plot(pred[filled], obs[filled], "-o", ms=3,
            label=f"{label + ': ' if label else ''}ECE {fmt(curve.get('ece'))}, "
            f"N={curve.get('n', int(count.sum()))}")
    hist = ax.twinx()
    hist.bar((edges[:-1] + edges[1:]) / 2, count, width=np.diff(edges) * 0.9, alpha=0.15,
             color="tab:blue")
    hist.set_ylabel("images per bin", fontsize=7)
    hist.tick_params(labelsize=7)
    ax.set_xlim(0, 1)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("predicted probability (bin mean)")
    ax.set_ylabel("observed share")
    ax.legend(fontsize=7, loc="upper left")
