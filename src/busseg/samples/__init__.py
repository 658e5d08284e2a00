"""Three shipped BUSI test-split cases (benign, malignant, normal) with their masks.

See ``README.md`` in this folder for the source, the citation (Al-Dhabyani et al., Data in
Brief 28, 2020, 104863) and the licence.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["sample_cases", "samples_dir"]


def samples_dir() -> Path:
    """Return the folder of the shipped sample cases.

    Returns
    -------
    pathlib.Path
        ``<busseg package>/samples``, laid out like ``Dataset_BUSI_with_GT``: class folders
        ``benign/``, ``malignant/``, ``normal/`` holding ``<name>.png`` images and
        ``<name>_mask*.png`` masks.
    """
    return Path(__file__).resolve().parent


def sample_cases() -> list:
    """List the shipped sample cases.

    Returns
    -------
    list of busseg.data.BusiRecord
        One record per image (benign, malignant, normal, in that order), each with its image
        path and mask paths (the ground truth is the union of the masks; all zero for the
        normal case).

    Raises
    ------
    FileNotFoundError
        If the sample files are missing from the installation (a broken install; reinstall
        napari-busseg).
    """
    from busseg.data.busi import discover_busi

    root = samples_dir()
    if not any((root / c).is_dir() for c in ("benign", "malignant", "normal")):
        raise FileNotFoundError(
            f"the busseg sample cases are missing from {root}; reinstall napari-busseg"
        )
    return list(discover_busi(root).records)
