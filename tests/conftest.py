"""Shared fixtures: paths to the real data in ../shared, tiny synthetic BUSI trees and checkpoints.

Fixtures for other test modules:

- ``repo_root``: the checkout (``Path``).
- ``busi_root``, ``busi_originals``, ``busbra_root``: the real datasets in ``../shared/data``
  relative to the repository root; the test is skipped, with the reason, where absent.
  ``busi_index``: ``discover_busi(busi_root)``, once per session.
- ``make_fake_busi(root=None, *, edge_cases=False, size=(40, 48))``: factory writing a tiny
  BUSI-layout tree and returning its ``Dataset_BUSI_with_GT`` folder; ``fake_busi`` is the
  tree without edge cases (see ``FAKE_BUSI_*`` below for what it holds).
- ``synthetic_pairs(n, size=(32, 32), seed=0)``: factory of (images, masks) lists: speckled
  uint8 images with one dark elliptical "lesion" each, bool masks (an easy task a tiny U-Net
  learns in a few dozen steps).
- ``tiny_checkpoint``: a checkpoint folder of ``build_model({"base_channels": 4, "depth": 2})``
  with preprocessing input size [32, 32] (untrained, seeded).
- ``busseg_plugin``: napari's plugin manager with napari-busseg registered (discovered when
  installed, else from ``src/busseg/napari.yaml``); ``viewer``: a napari viewer with it;
  ``open_segment(checkpoint)``: the "Segment lesions" widget docked in ``viewer``;
  ``segment``: ``open_segment(tiny_checkpoint)``.
- ``tiny_model``, ``prompt_model``: ``tiny_checkpoint`` and ``tiny_prompt_checkpoint`` loaded
  on the CPU.
- ``fake_split``: a split CSV putting every image of ``fake_busi`` in the test split.

Helpers to import (``from conftest import ...``): ``load_benchmark``, ``save_png``,
``write_split_csv``, ``write_busbra``, ``scan_folder`` and ``answered_session``.

Every test runs with one torch thread (the tensors are tiny; more threads only add overhead)
and with ``BUSSEG_HOME`` pointing into a temporary folder so nothing lands in the real home.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
BUSI_ROOT = SHARED_DATA / "busi" / "Dataset_BUSI_with_GT"
BUSI_ORIGINALS = SHARED_DATA / "busi-originals"
BUSBRA_ROOT = SHARED_DATA / "busbra-fold1"

#: What ``fake_busi`` holds, per class: image stem -> number of mask files.
FAKE_BUSI_MASKS = {
    "benign": {"benign (1)": 1, "benign (2)": 2, "benign (3)": 1},
    "malignant": {"malignant (1)": 1, "malignant (2)": 1},
    "normal": {"normal (1)": 1},
}
#: ``benign (2)`` is stored as an RGB image (R = G = B plus a coloured caliper mark), and
#: ``malignant (1)_mask.png`` as an RGBA mask; the others are L images and L masks.
FAKE_BUSI_RGB_IMAGE = "benign (2)"
FAKE_BUSI_RGBA_MASK = "malignant (1)"
#: Added by ``make_fake_busi(edge_cases=True)``: an image without a mask, a mask without an
#: image, and an image whose mask has another size.
FAKE_BUSI_EDGE = {
    "no_mask": "benign/benign (7).png",
    "orphan_mask": "benign/benign (8)_mask.png",
    "size_mismatch": "malignant/malignant (3).png",
}


@pytest.fixture(autouse=True, scope="session")
def _torch_one_thread():
    """Use one torch thread for the whole session (tiny tensors; the CI box has 2 cores)."""
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a hard dependency
        yield
        return
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True, scope="session")
def _busseg_home(tmp_path_factory):
    """Point ``BUSSEG_HOME`` (fine-tuned checkpoints, caches) into a temporary folder."""
    mp = pytest.MonkeyPatch()
    mp.setenv("BUSSEG_HOME", str(tmp_path_factory.mktemp("busseg_home")))
    yield
    mp.undo()


def _require(path: Path, what: str) -> Path:
    if not path.is_dir():
        pytest.skip(
            f"{what} not found at {path} (the real data lives in ../shared/data beside "
            "the checkout; see ../shared/data/README.md)"
        )
    return path


@pytest.fixture(scope="session")
def repo_root() -> Path:
    """The repository root."""
    return REPO_ROOT


@pytest.fixture(scope="session")
def busi_root() -> Path:
    """The full BUSI dataset (``Dataset_BUSI_with_GT``); skips where absent."""
    return _require(BUSI_ROOT, "BUSI (Dataset_BUSI_with_GT)")


@pytest.fixture(scope="session")
def busi_index(busi_root):
    """``discover_busi(busi_root)`` of the real BUSI, computed once per session."""
    from busseg.data.busi import discover_busi

    return discover_busi(busi_root)


@pytest.fixture(scope="session")
def busi_originals() -> Path:
    """The 8 BUSI cases byte-for-byte as distributed (RGB images); skips where absent."""
    return _require(BUSI_ORIGINALS, "the BUSI originals (busi-originals)")


@pytest.fixture(scope="session")
def busbra_root() -> Path:
    """BUS-BRA fold 1 (``Images/``, ``Masks/``, ``bus_data.csv``); skips where absent."""
    return _require(BUSBRA_ROOT, "BUS-BRA fold 1 (busbra-fold1)")


def _ellipse(size: tuple[int, int], cy: float, cx: float, ry: float, rx: float) -> np.ndarray:
    yy, xx = np.mgrid[: size[0], : size[1]]
    return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0


def _synthetic_pair(rng: np.random.Generator, size: tuple[int, int], lesion: bool = True):
    """A speckled grey uint8 image (H, W) and its bool mask with one dark ellipse."""
    h, w = size
    base = 150.0 + 30.0 * np.linspace(-1, 1, h)[:, None]  # brighter with depth, like a TGC ramp
    image = base * rng.gamma(4.0, 0.25, size=size)  # multiplicative speckle, mean 1
    mask = np.zeros(size, dtype=bool)
    if lesion:
        ry, rx = rng.uniform(0.15, 0.3) * h, rng.uniform(0.15, 0.3) * w
        cy, cx = rng.uniform(ry + 1, h - ry - 1), rng.uniform(rx + 1, w - rx - 1)
        mask = _ellipse(size, cy, cx, ry, rx)
        image[mask] *= 0.25  # hypoechoic lesion
    return np.clip(image, 0, 255).astype(np.uint8), mask


@pytest.fixture
def synthetic_pairs():
    """Factory ``(n, size=(32, 32), seed=0, lesion=True) -> (images, masks)``.

    Images are (H, W) uint8 with multiplicative speckle, masks (H, W) bool with one ellipse.
    """

    def make(n: int, size: tuple[int, int] = (32, 32), seed: int = 0, lesion: bool = True):
        rng = np.random.default_rng(seed)
        pairs = [_synthetic_pair(rng, size, lesion) for _ in range(n)]
        return [p[0] for p in pairs], [p[1] for p in pairs]

    return make


BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_benchmark(name: str):
    """Import ``benchmarks/<name>.py`` once (as ``bench_<name>``); ``_common`` by its own name.

    The scripts are not a package: their folder goes on ``sys.path`` so that their
    ``import _common`` works, and each module is registered in ``sys.modules`` before it runs
    (dataclasses look their module up while it executes).
    """
    import importlib
    import importlib.util
    import sys

    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    if name == "_common":
        return importlib.import_module("_common")
    key = f"bench_{name}"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, BENCHMARKS / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[key] = mod
        spec.loader.exec_module(mod)
    return sys.modules[key]


def save_png(path: Path, array: np.ndarray) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def write_split_csv(path: Path, rows) -> Path:
    """Write a split CSV (header ``image, label, group, split``) of ``rows``; return ``path``."""
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["image", "label", "group", "split"])
        w.writerows(rows)
    return path


def write_busbra(root: Path, images, masks, rows: list[dict]) -> Path:
    """Write a BUS-BRA-like folder at ``root`` and return it.

    ``Images/<ID>.png``, ``Masks/mask_<...>.png`` (0/255; ``bus_`` of the ID replaced by
    ``mask_``) of each image, mask and row, and ``bus_data.csv`` holding ``rows`` (dicts with
    at least ``"ID"``; the first row's keys are the columns).
    """
    for row, image, mask in zip(rows, images, masks, strict=True):
        rid = row["ID"]
        save_png(root / "Images" / f"{rid}.png", image)
        save_png(root / "Masks" / f"{rid.replace('bus_', 'mask_')}.png",
                 mask.astype(np.uint8) * 255)
    with open(root / "bus_data.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return root


def scan_folder(root: Path, n: int = 5, size=(24, 32), seed: int = 0) -> Path:
    """A plain folder of n unlabeled grey scans ``scan<i>.png``; returns ``root``."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        save_png(root / f"scan{i}.png", rng.integers(0, 255, size, dtype=np.uint8))
    root.mkdir(parents=True, exist_ok=True)  # also for n = 0
    return root


def answered_session(tmp_path: Path, images, masks, *, empty_every: int, **kwargs):
    """An ``AnnotationSession`` over ``images`` (``tmp_path/scans/s<ii>.png``), all answered.

    Case ``i`` is saved as an edited correction: ``masks[i]``, or an empty mask (a normal
    scan) where ``i % empty_every == 0``. Corrections go to ``tmp_path/corr``, checkpoints to
    ``tmp_path/models``; ``kwargs`` go to ``AnnotationSession``.
    """
    from busseg.session import AnnotationSession

    scans = tmp_path / "scans"
    for i, image in enumerate(images):
        save_png(scans / f"s{i:02d}.png", image)
    s = AnnotationSession(scans, tmp_path / "corr", models_dir=tmp_path / "models", **kwargs)
    s.open(0)
    for i, mask in enumerate(masks):
        s.set_prediction(np.zeros_like(mask))
        s.set_mask(mask if i % empty_every else np.zeros_like(mask), edited=True)
        if i + 1 < len(masks):
            s.next()
    s.save()
    return s


def _write_fake_busi(root: Path, edge_cases: bool, size: tuple[int, int]) -> Path:
    data = root / "Dataset_BUSI_with_GT"
    rng = np.random.default_rng(1234)
    for label, stems in FAKE_BUSI_MASKS.items():
        folder = data / label
        for stem, n_masks in stems.items():
            image, mask = _synthetic_pair(rng, size, lesion=label != "normal")
            if stem == FAKE_BUSI_RGB_IMAGE:
                rgb = np.repeat(image[..., None], 3, axis=-1)
                rgb[2:4, 2:6] = (255, 255, 0)  # a yellow caliper mark, as on some BUSI frames
                save_png(folder / f"{stem}.png", rgb)
            else:
                save_png(folder / f"{stem}.png", image)
            m8 = mask.astype(np.uint8) * 255
            if stem == FAKE_BUSI_RGBA_MASK:
                rgba = np.zeros((*size, 4), np.uint8)
                rgba[..., :3] = m8[..., None]
                rgba[..., 3] = 255
                save_png(folder / f"{stem}_mask.png", rgba)
            else:
                save_png(folder / f"{stem}_mask.png", m8)
            for k in range(1, n_masks):  # a second lesion, away from the first
                second = _ellipse(size, size[0] * 0.8, size[1] * 0.15, 3, 3) & ~mask
                save_png(folder / f"{stem}_mask_{k}.png", second.astype(np.uint8) * 255)
    if edge_cases:
        image, mask = _synthetic_pair(rng, size)
        save_png(data / FAKE_BUSI_EDGE["no_mask"], image)
        save_png(data / FAKE_BUSI_EDGE["orphan_mask"], mask.astype(np.uint8) * 255)
        save_png(data / FAKE_BUSI_EDGE["size_mismatch"], image)
        small = mask[: size[0] // 2, : size[1] // 2].astype(np.uint8) * 255
        save_png(data / FAKE_BUSI_EDGE["size_mismatch"].replace(".png", "_mask.png"), small)
    return data


@pytest.fixture
def make_fake_busi(tmp_path):
    """Factory ``(root=None, *, edge_cases=False, size=(40, 48)) -> Dataset_BUSI_with_GT path``.

    Writes a tiny BUSI-layout tree (``FAKE_BUSI_MASKS``: 3 benign, 2 malignant, 1 normal;
    one RGB image, one RGBA mask, one image with a second mask ``_mask_1``; images
    ``size`` = (H, W) pixels). ``edge_cases`` adds the files in ``FAKE_BUSI_EDGE``.
    """

    def make(root: Path | None = None, *, edge_cases: bool = False, size=(40, 48)) -> Path:
        root = Path(root) if root is not None else tmp_path / "fake_busi"
        return _write_fake_busi(root, edge_cases, tuple(size))

    return make


@pytest.fixture
def fake_busi(make_fake_busi) -> Path:
    """A tiny BUSI-layout tree without edge cases; the ``Dataset_BUSI_with_GT`` folder."""
    return make_fake_busi()


@pytest.fixture
def fake_split(fake_busi, tmp_path) -> Path:
    """A split CSV putting every image of ``fake_busi`` in the test split."""
    from busseg.data import discover_busi

    records = discover_busi(fake_busi).records
    return write_split_csv(tmp_path / "split.csv",
                           [[r.rel_path, r.label, i, "test"] for i, r in enumerate(records)])


@pytest.fixture
def tiny_checkpoint(tmp_path) -> Path:
    """An untrained checkpoint folder: base 4 channels, depth 2, input size 32x32."""
    import torch

    from busseg.models import build_model, save_checkpoint

    torch.manual_seed(0)
    model = build_model({"base_channels": 4, "depth": 2})
    config = {"preprocessing": {"input_size": [32, 32], "grey": True, "normalize": "zscore"}}
    return save_checkpoint(tmp_path / "tiny_checkpoint", model, config)


@pytest.fixture
def busseg_plugin():
    """Make sure napari knows the plugin (discovered when installed, else from the manifest)."""
    from npe2 import PluginManager, PluginManifest

    import busseg

    pm = PluginManager.instance()
    if "napari-busseg" not in pm:
        pm.discover()
    if "napari-busseg" not in pm:
        pm.register(PluginManifest.from_file(Path(busseg.__file__).parent / "napari.yaml"))
    return pm


@pytest.fixture
def viewer(make_napari_viewer, busseg_plugin):
    """A napari viewer that knows the plugin (needs napari's pytest plugin and a display)."""
    return make_napari_viewer()


@pytest.fixture
def open_segment(viewer):
    """Factory ``(checkpoint)``: dock "Segment lesions" in ``viewer`` using ``checkpoint``."""

    def open_(checkpoint: Path):
        _, w = viewer.window.add_plugin_dock_widget("napari-busseg", "Segment lesions")
        w.use_checkpoint(checkpoint)
        return w

    return open_


@pytest.fixture
def segment(open_segment, tiny_checkpoint):
    """"Segment lesions" docked in ``viewer``, using ``tiny_checkpoint``."""
    return open_segment(tiny_checkpoint)


@pytest.fixture
def tiny_model(tiny_checkpoint):
    """``tiny_checkpoint`` loaded on the CPU (cached by ``busseg.inference.load_model``)."""
    from busseg.inference import load_model

    return load_model(tiny_checkpoint, device="cpu")


@pytest.fixture
def prompt_model(tiny_prompt_checkpoint):
    """``tiny_prompt_checkpoint`` loaded on the CPU (cached by ``load_model``)."""
    from busseg.inference import load_model

    return load_model(tiny_prompt_checkpoint, device="cpu")


@pytest.fixture
def make_head_checkpoint(tmp_path):
    """Factory ``(normal_gate={"p_normal": 0.5, "lesion_confidence": 0.9}, name="head_ck")``.

    Writes an untrained (seeded) EfficientNet-Lite0 U-Net checkpoint with the class head
    (normal / benign / malignant) and 4 prompt-guidance channels, input 64x64, threshold 0.5,
    float16 weights, and the given ``inference.normal_gate`` (None: the default above;
    ``{}``: no gate stored); extra keyword arguments go into ``inference``. Returns its
    folder. The untrained head gives P(normal) = 1/3 for every image and the lesion
    probabilities stay near 0.5, so a gate at ``p_normal`` 0.3 with ``lesion_confidence``
    0.9 empties every non-empty mask.
    """
    import torch

    from busseg.models import build_model, save_checkpoint

    def make(normal_gate=None, name: str = "head_ck", **inference):
        if normal_gate is None:
            normal_gate = {"p_normal": 0.5, "lesion_confidence": 0.9}
        torch.manual_seed(0)
        model = build_model({"encoder": "efficientnet_lite0", "in_channels": 5, "num_classes": 3})
        inf = {"threshold": 0.5, **inference}
        if normal_gate:
            inf["normal_gate"] = dict(normal_gate)
        config = {"preprocessing": {"input_size": [64, 64]}, "inference": inf,
                  "weights_dtype": "float16"}
        return save_checkpoint(tmp_path / name, model, config)

    return make


@pytest.fixture
def head_checkpoint(make_head_checkpoint) -> Path:
    """``make_head_checkpoint()``: a class-head, prompt-taking checkpoint with a stored gate."""
    return make_head_checkpoint()


# --------------------------------------------------------------------------- prompt model


@pytest.fixture(scope="session")
def tiny_prompt_checkpoint(tmp_path_factory) -> Path:
    """An untrained prompt checkpoint: EfficientNet-Lite0 U-Net, 4 guidance channels, class
    head (normal / benign / malignant), input 64x64, click radius 3 (seeded)."""
    import torch

    from busseg.models import build_model, save_checkpoint

    torch.manual_seed(0)
    model = build_model({"encoder": "efficientnet_lite0", "in_channels": 5, "num_classes": 3})
    with torch.no_grad():  # guidance weights start at zero; make prompts change the output
        for m in model.modules():
            if isinstance(m, torch.nn.Conv2d) and m.in_channels == 5:
                m.weight[:, 1:] = 3 * torch.randn_like(m.weight[:, 1:]) * m.weight[:, :1].std()
    config = {"preprocessing": {"input_size": [64, 64]}, "prompts": {"click_radius": 3}}
    return save_checkpoint(tmp_path_factory.mktemp("prompt") / "ck", model, config)
