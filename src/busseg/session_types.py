"""What the parts of an annotation session share: its constants, dataclasses and helpers.

:class:`busseg.session.AnnotationSession` is assembled from mixins (:mod:`busseg.session_records`,
:mod:`busseg.session_predict`, :mod:`busseg.session_learning`); they all import their
constants and result types from here, and :mod:`busseg.session` re-exports every name.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from busseg.corrections import CorrectionPaths
from busseg.data.busi import BusiRecord
from busseg.manifest import BRUSHED, CORRECTED, ManifestRow

__all__ = [
    "DEFAULT_CALIBRATE",
    "DEFAULT_CALIBRATE_EVERY",
    "DEFAULT_LEARN_EVERY",
    "DEFAULT_SITE_MODE",
    "LEARN_GROWTH",
    "LEARN_MAX_EVERY",
    "MASK_STATUSES",
    "NORMAL",
    "PREFETCH_CASES",
    "SITE_MODES",
    "VERSIONS_DIRNAME",
    "Case",
    "FinetuneOutcome",
    "SaveResult",
    "checkpoint_text",
    "glob_escape",
    "mask_fingerprint",
]

#: Default number of new corrections between two fine-tunes.
DEFAULT_LEARN_EVERY = 10
#: What learning as you go writes (:meth:`AnnotationSession.finetune_job`): a site checkpoint
#: whose adapted network votes on the base's regions ("vote") or draws the automatic mask
#: ("adapted"), or the fine-tuned network alone ("whole").
SITE_MODES = ("vote", "adapted", "whole")
DEFAULT_SITE_MODE = "vote"
#: Site calibration (:mod:`busseg.calibration`) of the automatic masks from the answers.
DEFAULT_CALIBRATE = True
DEFAULT_CALIBRATE_EVERY = 5
#: Learning as you go waits for ``LEARN_GROWTH`` x the answers of the previous fine-tune
#: (at least ``learn_every``, at most ``LEARN_MAX_EVERY``) before the next one.
LEARN_GROWTH = 0.5
LEARN_MAX_EVERY = 40
#: Folder (inside the corrections folder) of earlier versions of corrections.
VERSIONS_DIRNAME = "versions"
#: Class folder of scans marked "no lesion", and their status in the manifest.
NORMAL = "normal"
#: Statuses :meth:`AnnotationSession.set_mask` accepts (the others have their own calls:
#: :meth:`AnnotationSession.accept`, :meth:`AnnotationSession.mark_no_lesion`).
MASK_STATUSES = (CORRECTED, BRUSHED)
#: Automatic predictions a session keeps for prefetched and recently seen cases (a few masks:
#: memory stays flat over hundreds of cases).
PREFETCH_CASES = 4


def mask_fingerprint(mask: Any) -> str:
    """Fingerprint a mask's lesion pixels (shape and which pixels are > 0).

    Parameters
    ----------
    mask : array_like
        (H, W) mask, any dtype; values > 0 are lesion.

    Returns
    -------
    str
        A hex digest; equal for masks with the same shape and the same lesion pixels
        (``bool``, 0/1 ``uint8`` and 0/255 masks of one lesion compare equal).
    """
    arr = np.ascontiguousarray(np.asarray(mask) > 0)
    h = hashlib.sha1(f"{arr.shape}|".encode())
    h.update(np.packbits(arr, axis=None).tobytes())
    return h.hexdigest()


@dataclass
class SaveResult:
    """What saving one case wrote.

    Attributes
    ----------
    name : str
        The case name in the corrections folder.
    label : str
        The class folder the correction went to.
    paths : CorrectionPaths
        The written image and mask.
    version : pathlib.Path or None
        Where the earlier correction of this case was kept, None when there was none.
    no_lesion : bool
        Whether the case was recorded as a normal scan (empty mask).
    status : str
        The recorded status (:data:`busseg.manifest.STATUSES`).
    row : ManifestRow or None
        The case's manifest row as written.
    """

    name: str
    label: str
    paths: CorrectionPaths
    version: Path | None = None
    no_lesion: bool = False
    status: str = CORRECTED
    row: ManifestRow | None = None


@dataclass
class FinetuneOutcome:
    """What a learning-as-you-go fine-tune did.

    Attributes
    ----------
    adopted : bool
        Whether the session switched to the new checkpoint.
    checkpoint : pathlib.Path or None
        The new checkpoint folder (None when nothing was written).
    previous : pathlib.Path or None
        The checkpoint fine-tuned from (None: the shipped default model).
    dice_before, dice_after : float or None
        Mean held-out Dice of the previous and of the new checkpoint on the same held-out
        pairs (None without held-out pairs).
    n_train, n_val : int
        Corrected pairs trained on and held out.
    seconds : float
        Wall-clock time of the run (the annotation-cost simulation included).
    message : str
        One line for a status bar.
    interactions_before, interactions_after : float or None
        Simulated annotation cost (:mod:`busseg.annotator`: interactions per scan) of the
        previous and of the new checkpoint on the held-out pairs, the adoption criterion
        (None when it was not simulated: no checkpoint, no held-out lesion).
    costs : dict or None
        :func:`busseg.finetune.heldout_costs`'s result (per-scan interactions, kinds).
    """

    adopted: bool
    checkpoint: Path | None
    previous: Path | None
    dice_before: float | None
    dice_after: float | None
    n_train: int
    n_val: int
    seconds: float
    message: str
    interactions_before: float | None = None
    interactions_after: float | None = None
    costs: dict | None = None


@dataclass
class Case:
    """The case open in a session.

    Attributes
    ----------
    index : int
        Position in :attr:`AnnotationSession.records`.
    record : BusiRecord
        The scan (image path, ground-truth mask paths or none, label).
    name : str
        Its name in the corrections folder (the file stem; made unique within the session).
    correction : numpy.ndarray or None
        (H, W) bool stored mask when the case was recorded before, else None.
    status : str or None
        The stored mask's status (:data:`busseg.manifest.STATUSES`), None when not recorded.
    """

    index: int
    record: BusiRecord
    name: str
    correction: np.ndarray | None = None
    status: str | None = None
    _image: np.ndarray | None = field(default=None, repr=False)
    _ground_truth: Any = field(default=None, repr=False)

    @property
    def image(self) -> np.ndarray:
        """(H, W) uint8 grey image, read on first use (:func:`busseg.data.io.read_image`)."""
        if self._image is None:
            from busseg.data.io import read_image

            self._image = read_image(self.record.image_path)
        return self._image

    @property
    def ground_truth(self) -> np.ndarray | None:
        """(H, W) bool union of the scan's expert masks, or None when it has none."""
        if self._ground_truth is None:
            if not self.record.mask_paths:
                self._ground_truth = False
            else:
                from busseg.data.io import read_mask

                self._ground_truth = read_mask(self.record.mask_paths)
        return None if self._ground_truth is False else self._ground_truth


def checkpoint_text(checkpoint: str | os.PathLike | None) -> str:
    """Name a checkpoint as the manifest does: its path, or ``"default"`` (the shipped one)."""
    return "default" if checkpoint is None else str(checkpoint)


def glob_escape(text: str) -> str:
    """Escape glob metacharacters (``*``, ``?``, ``[``) in a file name."""
    return re.sub(r"([*?\[])", r"[\1]", text)
