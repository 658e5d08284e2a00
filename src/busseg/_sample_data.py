"""napari sample data: the BUSI cases shipped in ``busseg/samples`` (see its README for the source).

``File > Open Sample > BUS Seg > BUSI samples`` adds, per case, the grey image (named after the
case, e.g. ``"benign (100)"``) and its expert ground truth as a Labels layer
(``"benign (100) ground truth"``). The cases differ in size, so only the first case is visible;
toggle the others in the layer list.
"""

from __future__ import annotations

import os
from pathlib import Path

from busseg._reader import LayerData, read_case


def _samples_root() -> Path:
    try:
        from busseg.samples import samples_dir
    except ImportError:  # pragma: no cover - the samples helper ships with the package
        return Path(__file__).resolve().parent / "samples"
    return samples_dir()


def make_busi_samples(root: str | os.PathLike | None = None) -> list[LayerData]:
    """Load the shipped BUSI sample cases as napari layer data.

    Parameters
    ----------
    root : str or os.PathLike, optional
        A BUSI-layout folder to load instead of the shipped samples (used by tests).

    Returns
    -------
    list of (data, kwargs, layer_type)
        For each case, in class order (benign, malignant, normal):
        ``(image (H, W) uint8, {"name": "<case>", ...}, "image")`` and
        ``(ground truth (H, W) uint8 in {0, 1}, {"name": "<case> ground truth", ...}, "labels")``
        (the union of the case's masks; all zero for a normal case). Layers after the first
        case's are added hidden (``visible=False``). ``metadata["busseg"]`` as in
        :func:`busseg._reader.read_case`, with ``source`` the sample file.

    Raises
    ------
    FileNotFoundError
        If the sample files are missing (a broken installation: reinstall napari-busseg).
    """
    from busseg.data.busi import discover_busi

    folder = Path(root) if root is not None else _samples_root()
    try:
        records = discover_busi(folder, check_sizes=False).records
    except (FileNotFoundError, ValueError) as exc:
        raise FileNotFoundError(
            f"no BUSI sample cases found in {folder} ({exc}); reinstall napari-busseg"
        ) from exc
    layers: list[LayerData] = []
    for i, rec in enumerate(records):
        case = read_case(rec.image_path, rec.mask_paths, label=rec.label, root=folder)
        if i > 0:
            case = [(data, {**kwargs, "visible": False}, kind) for data, kwargs, kind in case]
        layers.extend(case)
    return layers
