"""The annotation session: one case at a time, nothing lost, the model learning as you go.

A Qt-free core (numpy; torch only when a prediction or a fine-tune runs). The "Scan browser"
dock widget displays an :class:`AnnotationSession` and forwards the user's actions to it;
``benchmarks/annotation_session.py`` drives the very same object headless.

What the session owns:

- **the case list**: the records :func:`busseg.data.discover` finds in one or more folders
  (BUSI, BUS-BRA- or BUS-UCLM-style image/mask folder pairs, plain folders of scans);
- **the current case** (:attr:`AnnotationSession.current`), its automatic prediction (the
  *baseline*) and the mask the user has now;
- **recording what the annotator decided**: leaving a case (:meth:`~AnnotationSession.goto`,
  :meth:`~AnnotationSession.next`, :meth:`~AnnotationSession.previous`,
  :meth:`~AnnotationSession.close`, all with ``record=True``) records it in the corrections
  folder, atomically, with a status (:mod:`busseg.manifest`): an unedited automatic prediction
  is saved as it is, ``"accepted"`` (only when a prediction was made: a case opened and left
  without a mask records nothing); an edited mask is ``"corrected"`` (or ``"brushed"`` when
  :meth:`~AnnotationSession.set_mask` says the annotator drew it by hand); "no lesion" is
  ``"normal"``. A stored case reopened and left unchanged is not written again. ``record=False``
  (:meth:`~AnnotationSession.skip`) leaves a case without recording anything;
- **the manifest**: ``<corrections>/manifest.csv`` has one row per recorded case (status,
  class, source image, mask, regions, area, the checkpoint that predicted it, time, and a
  ``seq`` giving the recording order; :class:`busseg.manifest.CaseManifest`), rewritten
  atomically after the case's mask files. A folder without a manifest (written before
  manifests existed) reads its masks as ``"corrected"`` rows, written into a manifest at the
  first save; a row whose files are missing is reported in :attr:`AnnotationSession.problems`
  and not trusted;
- **versions**: a case saved again keeps its earlier mask as
  ``<corrections>/versions/<class>/<name>_mask.v<k>.png`` (k = 1, 2, ...; never overwritten);
  the current one stays at ``<corrections>/<class>/<name>_mask.png`` beside a copy of the
  image, ``<name>.png`` (the BUSI layout of :class:`busseg.corrections.CorrectionStore`, so
  fine-tuning and ``training/train.py`` read the folder as a dataset and never see the
  versions);
- **class folders**: a case goes to its record's class (``benign``, ``malignant``,
  ``normal``); a scan of no known class goes to ``unknown``, or to ``normal`` when its mask is
  empty (an empty accepted prediction is a normal answer too); "no lesion"
  (:meth:`~AnnotationSession.mark_no_lesion`) always goes to ``normal``;
- **progress**: :meth:`~AnnotationSession.progress` counts the recorded cases of any status,
  read from the manifest, so a session opened later on the same folders shows every case's
  status (:meth:`~AnnotationSession.status_of`) and :meth:`~AnnotationSession.first_unrecorded`
  says where to continue; :meth:`~AnnotationSession.recorded` lists the decisions in the
  order they were made (for hold-outs of the latest ones);
- **prefetch**: :meth:`~AnnotationSession.prefetch_job` computes a case's automatic prediction
  ahead of time (the very call :meth:`~AnnotationSession.predict` makes), so opening that case
  next shows its mask at once; a few cases are kept, keyed by image, checkpoint and settings;
- **learning as you go** (``learn=True``; the Scan browser turns it on by default): after every
  ``learn_every`` new corrections, :meth:`~AnnotationSession.finetune_due` turns True and
  :meth:`~AnnotationSession.finetune_job` fine-tunes the current checkpoint on all corrections so
  far (empty masks included) with :func:`busseg.finetune.finetune_iter`, one run at a time. The
  new checkpoint is adopted only when the simulated annotation cost (:mod:`busseg.annotator`) of
  the held-out corrections is not higher with it than with the current checkpoint, whatever the
  Dice says; :attr:`~AnnotationSession.status` gives both numbers and says what happened. The job
  is a generator (DESIGN practice 2): napari wraps it in ``thread_worker``, scripts drain it with
  :func:`busseg.engine.drain` (or call :meth:`~AnnotationSession.run_due_finetune`).

Example (headless)::

    from busseg.session import AnnotationSession

    s = AnnotationSession(["scans/"], "corrections/")
    case = s.open(s.first_unrecorded() or 0)
    pred = s.predict()            # automatic mask of the current case (the baseline)
    s.set_mask(edited_mask)       # what the annotator made of it
    s.next()                      # records it as "corrected", opens the next case
    s.predict()
    s.next()                      # left unedited: recorded as "accepted"
    print(s.progress_text())      # "2 of 12 recorded"
"""

from __future__ import annotations

import hashlib
import os
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Generator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from busseg.corrections import LABELS, CorrectionPaths, CorrectionStore
from busseg.data.busi import BusiRecord
from busseg.manifest import (
    ACCEPTED,
    BRUSHED,
    CORRECTED,
    CaseManifest,
    ManifestRow,
    check_files,
    mask_stats,
    now_iso,
    spacing_of,
    sweep_temporaries,
)

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
_VERSION_RE = re.compile(r"^(?P<name>.+)_mask\.v(?P<k>\d+)\.png$")
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


def _safe_part(text: str) -> str:
    text = re.sub(r"[\\/\x00-\x1f]", "_", text).strip().lstrip(".")
    return text or "scan"


def case_names(records: Sequence[BusiRecord]) -> list[str]:
    """Names of records in a corrections folder, unique within the list.

    Parameters
    ----------
    records : sequence of BusiRecord
        Scans, possibly from several folders.

    Returns
    -------
    list of str
        The record's ``name`` (file stem) where it is unique; otherwise the stem prefixed
        with its ``rel_path`` folders joined by ``"_"`` (``"a/1.png"`` -> ``"a_1"``), and a
        ``" [k]"`` suffix where that is still taken.
    """
    counts: dict[str, int] = {}
    for r in records:
        counts[r.name] = counts.get(r.name, 0) + 1
    out: list[str] = []
    taken: set[str] = set()
    for r in records:
        name = _safe_part(r.name)
        if counts[r.name] > 1:
            parent = Path(r.rel_path).parent.as_posix()
            if parent not in ("", "."):
                name = _safe_part(parent.replace("/", "_") + "_" + r.name)
        base, k = name, 1
        while name in taken:
            name = f"{base} [{k}]"
            k += 1
        taken.add(name)
        out.append(name)
    return out


class AnnotationSession:
    """Cases from one or more folders, their corrections, progress and background fine-tunes.

    Parameters
    ----------
    roots : path or sequence of paths
        Folders of scans, each read by :func:`busseg.data.discover` (BUSI layout, an
        image/mask folder pair, or a plain folder of scans).
    corrections : path
        The corrections folder (created on the first save); it may not overlap any root.
    checkpoint : path, optional
        The model that predicts and that learning-as-you-go fine-tunes from; None for the
        shipped default model.
    learn : bool
        Learning as you go (default off).
    learn_every : int
        Fine-tune after this many new corrections (>= 1).
    finetune_options : dict, optional
        Keyword arguments of :func:`busseg.finetune.finetune_iter` (``cfg``,
        ``val_fraction``, ``device`` ...); ``cfg`` may also be a dict of
        :func:`busseg.finetune.finetune_config` overrides.
    models_dir : path, optional
        Where fine-tuned checkpoints go (default :func:`busseg.finetune.default_output_dir`'s
        ``~/.busseg/finetuned``).
    records : sequence of BusiRecord, optional
        Use these cases instead of discovering ``roots`` (e.g. a benchmark's stream).
    calibrate : bool, optional
        Site calibration (:mod:`busseg.calibration`): every ``calibrate_every`` answers, the
        region filter's threshold and the normal-scan gate of the automatic masks are
        re-chosen on the answers so far by their simulated annotation cost, and stored in
        the corrections folder (``calibration.json``, for the checkpoint in use). None:
        :data:`DEFAULT_CALIBRATE`.
    calibrate_every : int
        Answers between two calibrations (>= 1).

    Raises
    ------
    FileNotFoundError, ValueError
        As :func:`busseg.data.discover` for a root; ValueError when the corrections folder
        overlaps a root or ``learn_every < 1``.
    busseg.manifest.ManifestError
        (a ValueError) When the corrections folder's manifest is corrupt or records the
        cases of another folder of scans (see :meth:`set_corrections`).

    Notes
    -----
    Not thread-safe except for :meth:`finetune_job`, which may run in a worker thread while
    the GUI thread keeps moving through cases (it reads a snapshot of the corrections folder
    at its start; files are written atomically), and :meth:`prefetch_job`, which may run in a
    worker thread while the GUI thread moves through cases and calls :meth:`predict` or
    :meth:`cached_prediction` (forward passes are serialised by a lock; the cache by another).
    """

    def __init__(
        self,
        roots: str | os.PathLike | Sequence[str | os.PathLike] = (),
        corrections: str | os.PathLike | None = None,
        *,
        checkpoint: str | os.PathLike | None = None,
        learn: bool = False,
        learn_every: int = DEFAULT_LEARN_EVERY,
        finetune_options: dict | None = None,
        models_dir: str | os.PathLike | None = None,
        records: Sequence[BusiRecord] | None = None,
        calibrate: bool | None = None,
        calibrate_every: int = DEFAULT_CALIBRATE_EVERY,
    ) -> None:
        if isinstance(roots, (str, os.PathLike)):
            roots = [roots]
        self.roots: list[Path] = []
        self.problems: list[str] = []
        self.layouts: list[str] = []
        recs: list[BusiRecord] = []
        if records is not None:
            recs = list(records)
            self.roots = [Path(r).expanduser() for r in roots]
        else:
            from busseg.data.discover import discover

            for root in roots:
                index = discover(root, check_sizes=False)
                self.roots.append(Path(index.root))
                self.layouts.append(index.layout)
                self.problems += index.problems
                recs += index.records
        self.records: list[BusiRecord] = recs
        self.names: list[str] = case_names(recs)
        self._by_name = {n: i for i, n in enumerate(self.names)}
        self._found_problems = list(self.problems)  # what discovery reported
        self.store: CorrectionStore | None = None
        self._corrected: dict[str, str] = {}  # case name -> class folder of its stored mask
        self._rows: dict[str, ManifestRow] = {}  # trusted rows of the folder, by case name
        self._pending: list[ManifestRow] = []  # masks without a row: written at the next save
        self._predicted = False  # an automatic prediction was made for the current case
        self._predicted_by: str | None = None  # the checkpoint that made it
        self._status_hint: str | None = None  # BRUSHED when set_mask said so
        self._swept: Path | None = None  # the folder whose stale temporary files were removed
        if corrections is not None:
            self.set_corrections(corrections)
        self.checkpoint: Path | None = Path(checkpoint) if checkpoint is not None else None
        self.learn = bool(learn)
        self.learn_every = learn_every
        self.finetune_options = dict(finetune_options or {})
        self.models_dir = Path(models_dir) if models_dir is not None else None
        self.status = ""
        self.history: list[FinetuneOutcome] = []
        self.new_corrections = 0  # answers recorded since the last fine-tune started
        self.current: Case | None = None
        self.last_save: SaveResult | None = None
        self._baseline: str | None = None
        self._mask: np.ndarray | None = None
        self._edited: bool | None = None
        self._no_lesion = False
        # prefetch: automatic masks by (image, checkpoint, settings), most recent last; one
        # forward pass at a time (a worker prefetches while the GUI thread may predict)
        self.prefetch_limit = PREFETCH_CASES
        self._predictions: OrderedDict[tuple, np.ndarray] = OrderedDict()
        self._predictions_lock = threading.Lock()
        self._forward_lock = threading.Lock()
        self._prefetch_epoch = 0
        self._finetune_lock = threading.Lock()
        self._finetune_running = False
        self._stop = threading.Event()
        from busseg.calibration import SiteCalibrator

        calibrate = DEFAULT_CALIBRATE if calibrate is None else bool(calibrate)
        self.calibrator = SiteCalibrator(calibrate_every) if calibrate else None
        self._load_calibration()

    # ------------------------------------------------------------------ setup

    def __repr__(self) -> str:
        where = self.store.root if self.store is not None else None
        return (f"AnnotationSession({len(self.records)} cases, corrections={str(where)!r}, "
                f"{self.progress_text()})")

    def __len__(self) -> int:
        return len(self.records)

    @property
    def learn_every(self) -> int:
        """New corrections between two fine-tunes (>= 1)."""
        return self._learn_every

    @learn_every.setter
    def learn_every(self, value: int) -> None:
        value = int(value)
        if value < 1:
            raise ValueError(f"learn_every must be at least 1, got {value}")
        self._learn_every = value

    def set_corrections(self, path: str | os.PathLike) -> None:
        """Use ``path`` as the corrections folder and read which cases it records.

        Parameters
        ----------
        path : str or os.PathLike
            The folder (created on the first save).

        Raises
        ------
        ValueError
            If it overlaps one of the roots, is a file or an empty path.
        busseg.manifest.ManifestError
            (a ValueError) If its ``manifest.csv`` is corrupt (unreadable, missing columns,
            a bad status), or has rows none of which is a case of this session (it records
            another folder of scans: choose another corrections folder). The session keeps
            its previous corrections folder then.
        """
        store = CorrectionStore(path)
        for root in self.roots:
            CorrectionStore(path, dataset_root=root)  # raises on overlap
        state = self._read_folder(store)  # raises ManifestError before anything changes
        self.store = store
        self._apply_folder_state(*state)
        if getattr(self, "calibrator", None) is not None:
            self._load_calibration()

    @property
    def manifest(self) -> CaseManifest | None:
        """The corrections folder's manifest (:class:`busseg.manifest.CaseManifest`), or None."""
        return None if self.store is None else CaseManifest(self.store.root)

    def refresh(self) -> None:
        """Read the corrections folder again (e.g. after another program wrote to it).

        Raises
        ------
        busseg.manifest.ManifestError
            If the manifest has become corrupt (see :meth:`set_corrections`); the statuses
            read before stay.
        """
        if self.store is None:
            self._apply_folder_state({}, [], [])
            return
        self._apply_folder_state(*self._read_folder(self.store))

    def _read_folder(self, store: CorrectionStore
                     ) -> tuple[dict[str, ManifestRow], list[ManifestRow], list[str]]:
        """Trusted rows by name, rows to migrate (masks without a row) and problems."""
        if not store.root.is_dir():
            return {}, [], []
        manifest = CaseManifest(store.root)
        rows = manifest.read()
        images = {n: str(r.image_path) for n, r in zip(self.names, self.records, strict=True)}
        manifest.check_belongs(rows, self.names, images.values())
        trusted, problems = check_files(store.root, rows)
        by_name = {r.name: r for r in trusted}
        pending = manifest.legacy_rows([r.name for r in rows], images=images, labels=LABELS)
        masks = manifest.scan_masks(LABELS)
        for r in pending:
            by_name.setdefault(r.name, r)
        migrated = {r.name for r in pending}
        known = {r.name for r in rows}
        for name, (label, mask) in masks.items():
            if name not in known and name not in migrated:
                problems.append(f"{mask} has no image copy ({label}/{name}.png) or cannot be "
                                "read; it is not counted as recorded")
        for row in trusted:  # a save cut short while moving a case to another class folder
            for label in LABELS:
                other = store.root / label / f"{row.name}_mask.png"
                if label != row.label and other.is_file():
                    problems.append(
                        f"{other} is a stale copy of {row.name!r} (the manifest records it in "
                        f"{row.label}/); delete it so fine-tuning does not read the case twice")
        return by_name, pending, problems

    def _report(self, problem: str) -> None:
        if problem not in self.problems:
            self.problems.append(problem)

    def _apply_folder_state(self, rows: dict[str, ManifestRow], pending: list[ManifestRow],
                            problems: list[str]) -> None:
        self._rows = rows
        self._pending = pending
        self._corrected = {n: r.label for n, r in rows.items() if n in self._by_name}
        self.problems = self._found_problems + problems

    # ------------------------------------------------------------------ status and progress

    def index_of(self, record: BusiRecord | str) -> int:
        """Position of a record (or of a case name) in :attr:`records`.

        Raises
        ------
        ValueError
            If the session has no such case.
        """
        if isinstance(record, str):
            if record in self._by_name:
                return self._by_name[record]
            raise ValueError(f"no case named {record!r} in this session")
        for i, r in enumerate(self.records):
            if r == record:
                return i
        raise ValueError(f"{record.rel_path} is not a case of this session")

    def name_of(self, record: BusiRecord | int | str) -> str:
        """Name of a case in the corrections folder (a position, a record or a name)."""
        if isinstance(record, (int, np.integer)):
            return self.names[int(record)]
        return self.names[self.index_of(record)]

    def is_corrected(self, record: BusiRecord | int) -> bool:
        """Whether the case is recorded (a stored mask of any status; see :meth:`status_of`)."""
        return self.name_of(record) in self._corrected

    is_recorded = is_corrected

    def status_of(self, record: BusiRecord | int | str) -> str | None:
        """Return the recorded status of a case.

        Parameters
        ----------
        record : BusiRecord, int or str
            A record, a position in :attr:`records` or a case name.

        Returns
        -------
        str or None
            ``"accepted"``, ``"corrected"``, ``"normal"`` or ``"brushed"``
            (:data:`busseg.manifest.STATUSES`); None when the case is not recorded (or its
            row's files are missing: see :attr:`problems`).

        Raises
        ------
        ValueError, IndexError
            If the session has no such case.
        """
        name = self.name_of(record)
        row = self._rows.get(name) if name in self._corrected else None
        return None if row is None else row.status

    def correction_label(self, record: BusiRecord | int) -> str | None:
        """Class folder of the case's stored mask (``"normal"`` after "no lesion") or None."""
        return self._corrected.get(self.name_of(record))

    def correction_paths(self, record: BusiRecord | int) -> CorrectionPaths | None:
        """Paths of the case's stored image copy and mask, or None when it is not recorded."""
        label = self.correction_label(record)
        if label is None or self.store is None:
            return None
        return self.store.path_for(self.name_of(record), label)

    def progress(self) -> tuple[int, int]:
        """Return ``(recorded, total)``: cases recorded with any status, and all cases."""
        return len(self._corrected), len(self.records)

    def progress_text(self) -> str:
        """``"n of N recorded"``."""
        n, total = self.progress()
        return f"{n} of {total} recorded"

    def first_unrecorded(self, start: int = 0) -> int | None:
        """Position of the first case from ``start`` on (wrapping around) not yet recorded.

        Returns
        -------
        int or None
            None when every case is recorded (or the session has no case).
        """
        n = len(self.records)
        for k in range(n):
            i = (start + k) % n
            if self.names[i] not in self._corrected:
                return i
        return None

    first_uncorrected = first_unrecorded

    def resume(self) -> Case | None:
        """Open the first case not yet recorded (where the user stopped), or None."""
        i = self.first_unrecorded()
        return None if i is None else self.open(i)

    def recorded(self, order: str = "time") -> list[ManifestRow]:
        """List the recorded cases of the corrections folder, as manifest rows.

        Every case the folder records is listed (also cases of other folders of scans that
        share it: fine-tuning reads the whole folder), except rows whose files are missing
        (those are in :attr:`problems`). Masks found without a row (a folder from before
        manifests, a save cut short) are listed as ``"corrected"`` after the others, by their
        files' modification time (``seq``, ``regions`` and ``area_px`` 0 until the next save
        writes and measures them).

        Parameters
        ----------
        order : {"time", "name"}
            ``"time"``: the order the decisions were recorded in (``seq``: the latest last,
            for leave-later-out hold-outs); ``"name"``: by case name.

        Returns
        -------
        list of ManifestRow

        Raises
        ------
        ValueError
            If ``order`` is neither.
        """
        if order not in ("time", "name"):
            raise ValueError(f"order must be 'time' or 'name', got {order!r}")
        rows = list(self._rows.values())  # snapshots: a fine-tune thread may call this
        if order == "name":
            return sorted(rows, key=lambda r: r.name)
        pending = {r.name: k for k, r in enumerate(list(self._pending))}
        return sorted(rows, key=lambda r: (1, 0, pending.get(r.name, len(pending)))
                      if r.seq == 0 else (0, r.seq, 0))

    def recorded_pairs(self, order: str = "time"
                       ) -> tuple[list[np.ndarray], list[np.ndarray], list[str], list[str]]:
        """Read the recorded cases as training pairs from the corrections folder's copies.

        Parameters
        ----------
        order : {"time", "name"}
            As in :meth:`recorded`.

        Returns
        -------
        images : list of numpy.ndarray
            (H, W) uint8 grey copies (``<corrections>/<class>/<name>.png``).
        masks : list of numpy.ndarray
            (H, W) bool masks (``<name>_mask.png``), each the size of its image; empty masks
            (accepted empty predictions, "no lesion") included.
        names : list of str
            ``"<class>/<name>.png"`` (as :meth:`busseg.corrections.CorrectionStore.load_pairs`).
        statuses : list of str
            Each case's status. All four lists are in :meth:`recorded`'s order; a case whose
            files cannot be read (gone, corrupt, sizes differ) is left out and reported in
            :attr:`problems`.
        """
        from busseg.data.io import read_image, read_mask

        images, masks, names, statuses = [], [], [], []
        if self.store is None:
            return images, masks, names, statuses
        for row in self.recorded(order):
            try:
                image = read_image(row.image_copy_path(self.store.root))
                mask = read_mask(row.mask_path(self.store.root))
            except (OSError, ValueError) as exc:
                self._report(f"recorded case {row.name!r} left out: {exc}")
                continue
            if mask.shape != image.shape[:2]:
                self._report(
                    f"recorded case {row.name!r} left out: its mask is {mask.shape} but its "
                    f"image copy is {image.shape[:2]}; record the case again")
                continue
            images.append(image)
            masks.append(mask)
            names.append(row.image_copy)
            statuses.append(row.status)
        return images, masks, names, statuses

    # ------------------------------------------------------------------ the current case

    def open(self, index: int) -> Case:
        """Make case ``index`` the current case **without** recording the previous one.

        Use :meth:`goto` to move and record. A stored mask is loaded as
        :attr:`Case.correction` (its status as :attr:`Case.status`) and becomes the baseline
        (leaving it unchanged writes nothing).

        Parameters
        ----------
        index : int
            Position in :attr:`records` (negative counts from the end).

        Returns
        -------
        Case

        Raises
        ------
        IndexError
            If there is no such case.
        """
        n = len(self.records)
        if not -n <= index < n:
            raise IndexError(f"case {index} out of range: the session has {n} cases")
        index %= n
        name = self.names[index]
        correction = None
        paths = self.correction_paths(index)
        if paths is not None:
            from busseg.data.io import read_mask

            try:
                correction = read_mask(paths.mask)
            except (OSError, ValueError):
                correction = None
        self.current = Case(index, self.records[index], name, correction,
                            self.status_of(index))
        self._mask = None
        self._edited = None
        self._no_lesion = False
        self._predicted = False
        self._predicted_by = None
        self._status_hint = None
        self._baseline = mask_fingerprint(correction) if correction is not None else None
        return self.current

    def set_prediction(self, mask: Any) -> None:
        """Record the automatic prediction of the current case (the baseline of "edited").

        Leaving the case with this mask unedited records it as ``"accepted"``; the manifest
        names :attr:`checkpoint` (as it is now) as the model that predicted it.

        Parameters
        ----------
        mask : array_like
            (H, W) mask, > 0 = lesion. The current mask becomes this prediction.
        """
        self._require_case()
        self._baseline = mask_fingerprint(mask)
        self._mask = np.asarray(mask)
        self._edited = None
        self._no_lesion = False
        self._predicted = True
        self._predicted_by = _checkpoint_text(self.checkpoint)
        self._status_hint = None

    def predict(self, **kwargs: Any) -> np.ndarray:
        """Predict the current case with :attr:`checkpoint` and record it as the baseline.

        A prediction prefetched with the same checkpoint and settings (:meth:`prefetch_job`)
        is returned at once; otherwise the model runs here (after a prefetch's forward pass
        in progress, if any: one at a time) and the result is kept for the case.

        Parameters
        ----------
        **kwargs
            Passed to :func:`busseg.inference.predict_mask` (``threshold``, ``device`` ...).

        Returns
        -------
        numpy.ndarray
            (H, W) bool automatic mask (a copy: the cached one is read-only).
        """
        case = self._require_case()
        checkpoint = self.checkpoint
        mask = self._automatic_mask(case.index, checkpoint, kwargs, image=case.image)
        mask = mask.copy()
        self.set_prediction(mask)
        self._predicted_by = _checkpoint_text(checkpoint)
        return mask

    # ------------------------------------------------------------------ prefetch

    def prediction_key(self, index: int, **kwargs: Any) -> tuple | None:
        """Key of case ``index``'s automatic prediction in the prefetch cache.

        Parameters
        ----------
        index : int
            Position in :attr:`records`.
        **kwargs
            The settings :meth:`predict` would get.

        Returns
        -------
        tuple or None
            ``(image, checkpoint, settings)``: the image file with its modification time and
            size, :attr:`checkpoint`'s folder with its files' modification time, size and
            inode (the key :func:`busseg.inference.load_model` caches models by, so a
            checkpoint rewritten in place gets a new key; computed without importing torch)
            and the sorted settings. None when the prediction cannot be cached (prompt
            arrays among the settings, an image or checkpoint that cannot be read:
            predicting then says why).
        """
        return self._key(index, self.checkpoint, kwargs)

    def _key(self, index: int, checkpoint: Path | None, kwargs: dict) -> tuple | None:
        path = Path(self.records[index].image_path)
        try:
            st = path.stat()
            ck = _checkpoint_identity(checkpoint)
        except (OSError, ValueError):
            return None
        settings = tuple(sorted((k, str(v) if isinstance(v, os.PathLike) else v)
                                for k, v in kwargs.items()))
        key = ((str(path), st.st_mtime_ns, st.st_size), ck, settings)
        if self.calibrator is not None:  # a new calibration predicts again
            key += (self.calibrator.settings_key(),)
        try:
            hash(key)
        except TypeError:
            return None
        return key

    def cached_prediction(self, index: int, **kwargs: Any) -> np.ndarray | None:
        """Return the prefetched automatic mask of case ``index`` for these settings, or None.

        Cheap (three ``stat`` calls, no model, no torch import): the browser calls it on the
        GUI thread.

        Parameters
        ----------
        index : int
            Position in :attr:`records`.
        **kwargs
            The settings :meth:`predict` would get.

        Returns
        -------
        numpy.ndarray or None
            (H, W) bool mask (read-only), exactly what :meth:`predict` returns for the case
            with the current :attr:`checkpoint` and these settings; None when not cached.
        """
        return self._cached(self.prediction_key(index, **kwargs))

    def prefetch_job(self, index: int, *, cancellable: bool = True,
                     **kwargs: Any) -> Generator[tuple, None, np.ndarray | None]:
        """Compute case ``index``'s automatic prediction ahead of time (a worker's generator).

        The checkpoint (:attr:`checkpoint`) and settings are taken when the job is made (on
        the GUI thread); the generator may then run in a worker thread.

        Runs the very call :meth:`predict` makes (same checkpoint, settings, defaults of
        :func:`busseg.inference.predict_mask`, normal-scan gate included) and keeps the mask
        in the prefetch cache, so :meth:`predict` and :meth:`cached_prediction` return it at
        once when the case is opened. Forward passes are serialised: a second job waits for
        the first and then finds its result cached if it was for the same case and settings.
        The cache holds :attr:`prefetch_limit` cases (least recently used dropped) and only
        those of one checkpoint and settings: storing a prediction of another checkpoint or
        settings drops the others.

        Parameters
        ----------
        index : int
            Position in :attr:`records`.
        cancellable : bool
            Whether :meth:`cancel_prefetch` may skip it (True: a guess ahead of the user; False:
            the case the user has open).
        **kwargs
            As for :meth:`predict`.

        Yields
        ------
        tuple
            ``("prefetch", index)`` once, before waiting for the model (a worker can be quit
            there).

        Returns
        -------
        numpy.ndarray or None
            (H, W) bool mask; None when :meth:`cancel_prefetch` was called after the job was
            made and before its forward pass started.

        Raises
        ------
        IndexError
            If there is no such case.
        busseg.data.io.ImageReadError, OSError, ValueError, busseg.models.CheckpointError
            As :func:`busseg.data.io.read_image` and :func:`busseg.inference.predict_mask`.
        """
        if not -len(self.records) <= index < len(self.records):
            raise IndexError(f"case {index} out of range: the session has {len(self)} cases")
        index %= len(self.records)
        epoch = self._prefetch_epoch if cancellable else None
        return self._prefetch(index, self.checkpoint, dict(kwargs), epoch)

    def _prefetch(self, index: int, checkpoint: Path | None, kwargs: dict,
                  epoch: int | None) -> Generator[tuple, None, np.ndarray | None]:
        yield ("prefetch", index)
        if epoch is not None and epoch != self._prefetch_epoch:
            return None
        return self._automatic_mask(index, checkpoint, kwargs, epoch=epoch)

    def prefetch(self, index: int, **kwargs: Any) -> np.ndarray:
        """Run :meth:`prefetch_job` to the end in this thread (scripts, benchmarks, tests).

        Returns
        -------
        numpy.ndarray
            (H, W) bool automatic mask of case ``index``, now cached.
        """
        from busseg.engine import drain

        return drain(self.prefetch_job(index, cancellable=False, **kwargs))

    def cancel_prefetch(self) -> None:
        """Make prefetch jobs made before now skip their forward pass if it has not started.

        For a user moving faster than the model: the guesses queued for cases left behind
        give up, so the case the user opens next is predicted without waiting behind them.
        """
        self._prefetch_epoch += 1

    def clear_predictions(self) -> None:
        """Forget every cached automatic prediction."""
        with self._predictions_lock:
            self._predictions.clear()

    @property
    def prefetched(self) -> int:
        """Number of automatic predictions cached (at most :attr:`prefetch_limit`)."""
        return len(self._predictions)

    def _automatic_mask(self, index: int, checkpoint: Path | None, kwargs: dict, *,
                        image: np.ndarray | None = None,
                        epoch: int | None = None) -> np.ndarray | None:
        """Make an automatic prediction (the one place): cache, else model (one at a time).

        :meth:`predict` and :meth:`prefetch_job` both come here, so a prefetched mask is the
        mask :meth:`predict` would compute. Returns the cached (read-only) array.
        """
        key = self._key(index, checkpoint, kwargs)
        mask = self._cached(key)
        if mask is not None:
            return mask
        if image is None:
            from busseg.data.io import read_image

            image = read_image(self.records[index].image_path)
        with self._forward_lock:  # one forward pass at a time (2 cores: no gain in two)
            mask = self._cached(key)  # computed meanwhile by the job we waited for
            if mask is not None:
                return mask
            if epoch is not None and epoch != self._prefetch_epoch:
                return None  # cancelled while waiting for the model
            from busseg.inference import load_model, predict_mask

            kw = dict(kwargs)
            device = kw.pop("device", "auto")
            model = load_model(checkpoint, device=device)
            if self.calibrator is not None:
                mask = self.calibrator.predict(index, image, model,
                                               _checkpoint_text(checkpoint), **kw)
            else:
                mask = predict_mask(image, model, **kw)
        mask = np.asarray(mask, dtype=bool)
        mask.setflags(write=False)
        if key is not None:
            self._remember(key, mask)
        return mask

    def _cached(self, key: tuple | None) -> np.ndarray | None:
        if key is None:
            return None
        with self._predictions_lock:
            mask = self._predictions.get(key)
            if mask is not None:
                self._predictions.move_to_end(key)
            return mask

    def _remember(self, key: tuple, mask: np.ndarray) -> None:
        with self._predictions_lock:
            for old in [k for k in self._predictions if k[1:] != key[1:]]:
                del self._predictions[old]  # another checkpoint or settings: stale
            self._predictions[key] = mask
            self._predictions.move_to_end(key)
            while len(self._predictions) > max(int(self.prefetch_limit), 1):
                self._predictions.popitem(last=False)

    def set_mask(self, mask: Any, *, edited: bool | None = None,
                 status: str | None = None) -> None:
        """Set the current case's mask as the user has it now.

        Parameters
        ----------
        mask : array_like
            (H, W) mask, > 0 = lesion (a Labels layer's data is fine; it is not copied).
        edited : bool, optional
            Whether the user changed it. By default: it differs from the baseline (the
            automatic prediction or the stored mask), or, without a baseline, it has a lesion
            pixel.
        status : {None, "corrected", "brushed"}
            How an edited mask is recorded: None or ``"corrected"`` (edited, with prompts or
            otherwise), ``"brushed"`` (drawn by hand). An unedited prediction is recorded as
            ``"accepted"`` whatever this says.

        Raises
        ------
        RuntimeError
            If no case is open.
        ValueError
            If ``status`` is another value (use :meth:`accept` for ``"accepted"`` and
            :meth:`mark_no_lesion` for ``"normal"``).
        """
        if status is not None and status not in MASK_STATUSES:
            raise ValueError(
                f"status {status!r} cannot be given with a mask; pass 'corrected' or "
                "'brushed' (use accept() to accept the prediction, mark_no_lesion() for "
                "'no lesion')")
        self._require_case()
        self._mask = np.asarray(mask)
        self._edited = edited
        self._no_lesion = False
        self._status_hint = status

    def mark_no_lesion(self, *, save: bool = True) -> SaveResult | None:
        """Record the current case as a normal scan: an empty mask in the ``normal`` folder.

        Its status is ``"normal"``.

        Parameters
        ----------
        save : bool
            Save it now (default); otherwise it is recorded when moving on.

        Returns
        -------
        SaveResult or None
            What was written (None with ``save=False``, or when it was recorded so already).

        Raises
        ------
        RuntimeError
            If no case is open, or (with ``save``) no corrections folder is set.
        """
        case = self._require_case()
        shape = self._mask.shape if self._mask is not None else case.image.shape[:2]
        self._mask = np.zeros(shape, np.uint8)
        self._edited = True
        self._no_lesion = True
        self._status_hint = None
        return self.save() if save else None

    @property
    def mask(self) -> np.ndarray | None:
        """The current case's mask (None when neither a prediction nor a mask was given)."""
        return self._mask

    def is_edited(self) -> bool:
        """Whether the current mask is a correction to save (see :meth:`set_mask`)."""
        if self.current is None or self._mask is None:
            return False
        if self._no_lesion:
            return not (self.correction_label(self.current.index) == NORMAL
                        and self._baseline == mask_fingerprint(self._mask))
        if self._edited is not None:
            return self._edited
        if self._baseline is None:
            return bool(np.any(self._mask))
        return mask_fingerprint(self._mask) != self._baseline

    def decision(self) -> str | None:
        """Say what leaving the current case now would record it as.

        Returns
        -------
        str or None
            ``"normal"`` after :meth:`mark_no_lesion`; ``"corrected"`` (or ``"brushed"``,
            see :meth:`set_mask`) for an edited mask; ``"accepted"`` for an unedited
            automatic prediction (:meth:`set_prediction`, :meth:`predict`); None when there
            is nothing to record (no case, no mask, or an unedited stored mask). A decision
            equal to the stored one (same status, class and lesion pixels) is not written
            again (:meth:`record` returns None).
        """
        if self.current is None or self._mask is None:
            return None
        if self._no_lesion:
            return NORMAL
        if self.is_edited():
            return self._status_hint or CORRECTED
        if self._predicted:
            return ACCEPTED
        return None

    def record(self) -> SaveResult | None:
        """Record the current case as what the annotator decided (:meth:`decision`).

        What leaving a case with ``record=True`` does (:meth:`goto`, :meth:`next`,
        :meth:`previous`, :meth:`close`). An earlier mask of the case is kept under
        ``versions/``; the image copy and the mask are written atomically (image first,
        mask last), then the manifest row.

        Returns
        -------
        SaveResult or None
            None when there is nothing to record, or the stored decision is the same.

        Raises
        ------
        RuntimeError
            If there is something to record and no corrections folder is set.
        ValueError, OSError
            If the mask does not fit the image, or a file cannot be written.
        busseg.manifest.ManifestError
            If the manifest on disk became corrupt meanwhile (the mask files are written).
        """
        status = self.decision()
        if status is None or self._unchanged(status):
            return None
        return self._write(status)

    def accept(self) -> SaveResult | None:
        """Record the current automatic prediction as ``"accepted"`` now.

        Returns
        -------
        SaveResult or None
            None when it was recorded as accepted already.

        Raises
        ------
        RuntimeError
            If no case is open, no prediction was made (call :meth:`predict` or
            :meth:`set_prediction` first) or no corrections folder is set.
        ValueError
            If the mask was edited or marked "no lesion" since the prediction (leave the
            case, or :meth:`save`, to record the edit; or set the prediction again).
        """
        self._require_case()
        if not self._predicted or self._mask is None:
            raise RuntimeError("no automatic prediction to accept; call predict() or "
                               "set_prediction() first")
        if self._no_lesion or self.is_edited():
            raise ValueError(
                "the mask was edited since the prediction, so it is not the prediction to "
                "accept; leave the case or call save() to record the edit, or "
                "set_prediction() again to accept the prediction")
        if self._unchanged(ACCEPTED):
            return None
        return self._write(ACCEPTED)

    def save(self, *, force: bool = False) -> SaveResult | None:
        """Save the current mask when it is edited (or ``force``), with its status.

        An earlier mask of the case is kept under ``versions/`` first. Both files are
        written atomically (image first, mask last), then the manifest row. Leaving a case
        (:meth:`record`) also records an unedited prediction (``"accepted"``); this does not.

        Parameters
        ----------
        force : bool
            Save even an unedited mask (an explicit "Save": an unedited prediction is
            recorded as ``"accepted"``, a reopened stored mask again with its status).

        Returns
        -------
        SaveResult or None
            None when there was nothing to save (no mask, or unedited without ``force``).

        Raises
        ------
        RuntimeError
            If no corrections folder is set.
        ValueError, OSError
            If the mask does not fit the image, or a file cannot be written.
        busseg.manifest.ManifestError
            If the manifest on disk became corrupt meanwhile (the mask files are written).
        """
        case = self.current
        if case is None or self._mask is None:
            return None
        if not (force or self.is_edited()):
            return None
        return self._write(self.decision() or case.status or CORRECTED)

    def _label_for(self, case: Case, mask: np.ndarray, status: str) -> str:
        """Class folder of a recorded mask (see the module docstring: class folders)."""
        if status == NORMAL:
            return NORMAL
        label = case.record.label
        if label in LABELS and label != "unknown":
            return label
        return "unknown" if np.any(mask > 0) else NORMAL

    def _unchanged(self, status: str) -> bool:
        """Whether ``status`` with the current mask is what the case has stored already.

        The same pixels in the same class folder with the same status, or "edited" back to
        the stored pixels (an edit that restores them decides nothing new).
        """
        case = self.current
        if case is None or case.correction is None or case.status is None:
            return False
        if status != case.status and status not in MASK_STATUSES:
            return False
        mask = np.asarray(self._mask)
        return (self._corrected.get(case.name) == self._label_for(case, mask, status)
                and mask_fingerprint(mask) == mask_fingerprint(case.correction))

    def _write(self, status: str) -> SaveResult:
        """Write the current mask with ``status``: version, image copy, mask, manifest row."""
        case = self._require_case()
        if self.store is None or self.manifest is None:
            raise RuntimeError("choose a corrections folder before saving")
        mask = np.asarray(self._mask)
        if mask.ndim != 2:
            raise ValueError(f"a correction must be a 2D (H, W) mask, got shape {mask.shape}")
        label = self._label_for(case, mask, status)
        name = case.name
        old_label = self._corrected.get(name)
        version = self._keep_version(name, old_label) if old_label is not None else None
        if old_label != label:  # a mask not in the manifest where this one goes: keep it too
            self._keep_version(name, label)
        paths = self.store.save(name, label, case.image, mask, overwrite=True)
        regions, area, mm2 = mask_stats(mask, spacing_of(case.record.image_path))
        old = self._rows.get(name)
        predicted_by = self._predicted_by or (old.checkpoint if old is not None else "")
        row = ManifestRow(name, status, label, str(case.record.image_path),
                          f"{label}/{name}_mask.png", regions, area, mm2, predicted_by,
                          now_iso())
        migrating = bool(self._pending)
        manifest = self.manifest
        row = manifest.record(row, pending=self._pending)
        if self._swept != self.store.root:  # once per folder: what killed saves left
            self._swept = self.store.root
            sweep_temporaries(self.store.root)
        if migrating:  # the masks without a row were written with this one: take their seq
            self._pending = []
            written = {r.name: r for r in manifest.read()}
            for n, r in list(self._rows.items()):
                if r.seq == 0 and n in written:
                    self._rows[n] = written[n]
        if old_label is not None and old_label != label:
            stale = self.store.path_for(name, old_label)
            for p in (stale.mask, stale.image):  # the class changed: one current mask only
                try:
                    p.unlink()
                except FileNotFoundError:
                    pass
        self._rows[name] = row
        self._corrected[name] = label
        self._observe_answer(case, mask)
        self._baseline = mask_fingerprint(mask)
        self._edited = None
        case.correction = mask > 0
        case.status = status
        self.new_corrections += 1
        return SaveResult(name, label, paths, version, status == NORMAL, status, row)

    def _version_entries(self, name: str) -> list[tuple[int, Path]]:
        out = []
        for label in LABELS:
            folder = self.store.root / VERSIONS_DIRNAME / label
            if folder.is_dir():
                for p in folder.glob(f"{glob_escape(name)}_mask.v*.png"):
                    m = _VERSION_RE.match(p.name)
                    if m and m.group("name") == name:
                        out.append((int(m.group("k")), p))
        return sorted(out)

    def _keep_version(self, name: str, label: str) -> Path | None:
        from busseg.data.io import atomic_write_bytes

        src = self.store.path_for(name, label).mask
        try:
            data = src.read_bytes()
        except FileNotFoundError:
            return None
        entries = self._version_entries(name)
        k = (entries[-1][0] if entries else 0) + 1
        folder = self.store.root / VERSIONS_DIRNAME / label
        while True:
            try:
                return atomic_write_bytes(folder / f"{name}_mask.v{k}.png", data, overwrite=False)
            except FileExistsError:
                k += 1

    def versions(self, record: BusiRecord | int) -> list[Path]:
        """Earlier corrections of a case kept under ``versions/<class>/``, oldest first.

        Returns
        -------
        list of pathlib.Path
            ``<corrections>/versions/<class>/<name>_mask.v<k>.png`` files, by ``k``.
        """
        if self.store is None:
            return []
        return [p for _, p in self._version_entries(self.name_of(record))]

    def goto(self, index: int, *, record: bool = True) -> Case:
        """Leave the current case, then open case ``index``.

        Parameters
        ----------
        index : int
            Position in :attr:`records` (negative counts from the end).
        record : bool
            Record the case being left as what the annotator decided (:meth:`record`:
            accepted, corrected, brushed or normal; nothing when there is nothing new).
            False leaves it without writing anything.

        Returns
        -------
        Case
            The newly opened case. What was written is :attr:`last_save` (None: nothing).

        Raises
        ------
        IndexError
            If there is no such case (checked before anything is recorded).
        RuntimeError, ValueError, OSError, busseg.manifest.ManifestError
            As :meth:`record`; the current case then stays open.
        """
        n = len(self.records)
        if not -n <= index < n:
            raise IndexError(f"case {index} out of range: the session has {n} cases")
        self.last_save = self.record() if record and self.current is not None else None
        return self.open(index)

    def next(self, *, record: bool = True) -> Case | None:
        """Leave the current case (recording it, see :meth:`goto`) and open the next one.

        Returns
        -------
        Case or None
            The next case; None at the last case, which stays open (and is recorded with
            ``record=True``, so a folder worked to the end is recorded to the end).
        """
        if self.current is None:
            return self.goto(0, record=record) if self.records else None
        if self.current.index + 1 >= len(self.records):
            self.last_save = self.record() if record else None
            return None
        return self.goto(self.current.index + 1, record=record)

    def previous(self, *, record: bool = True) -> Case | None:
        """Leave the current case (recording it, see :meth:`goto`) and open the previous one.

        Returns
        -------
        Case or None
            The previous case; None at the first case, which stays open (and is recorded
            with ``record=True``).
        """
        if self.current is None:
            return None
        if self.current.index == 0:
            self.last_save = self.record() if record else None
            return None
        return self.goto(self.current.index - 1, record=record)

    def skip(self) -> Case | None:
        """Leave the current case without recording it and open the next one.

        ``next(record=False)``: nothing is written for the case left.
        """
        return self.next(record=False)

    def close(self, *, record: bool = True) -> SaveResult | None:
        """Leave the current case and close it (e.g. when the viewer closes).

        Parameters
        ----------
        record : bool
            Record it first, as leaving with :meth:`goto` does.

        Returns
        -------
        SaveResult or None
            What was written (None: nothing).
        """
        result = self.record() if record and self.current is not None else None
        self.current = None
        self._mask = None
        self._baseline = None
        self._predicted = False
        self._predicted_by = None
        self._status_hint = None
        return result

    def _require_case(self) -> Case:
        if self.current is None:
            raise RuntimeError("no case is open; call open(index) or goto(index) first")
        return self.current

    # ------------------------------------------------------------------ learning as you go

    @property
    def finetune_running(self) -> bool:
        """Whether a fine-tune job is running."""
        return self._finetune_running

    # ------------------------------------------------------------------ site calibration

    def _load_calibration(self) -> None:
        """Read the corrections folder's calibration for the checkpoint in use, if any."""
        from busseg.calibration import CalibrationError

        if self.calibrator is None or self.store is None:
            return
        try:
            self.calibrator.load(self.store.root, _checkpoint_text(self.checkpoint))
        except CalibrationError as exc:
            self.problems.append(f"site calibration not used: {exc}")

    def _observe_answer(self, case: Case, mask: np.ndarray) -> None:
        """Give an answer to the site calibration; refit, store and re-predict when due."""
        if self.calibrator is None or self.store is None:
            return
        from busseg.inference import load_model

        ck = _checkpoint_text(self.checkpoint)
        try:
            model = load_model(self.checkpoint)
            refitted = self.calibrator.observe(case.index, case.image, mask, ck, model)
        except (OSError, ValueError) as exc:  # a checkpoint that cannot load: no calibration
            self.problems.append(f"site calibration skipped for {case.name}: {exc}")
            return
        if refitted:  # cached masks of the previous settings no longer match a key; the
            # calibrator re-applies the new settings to its raw predictions without the model
            self.calibrator.save(self.store.root)

    def calibration_text(self) -> str:
        """Describe the site calibration in one line ("" when off or before the first one).

        E.g. ``"site calibration: 14 answers, false regions 9 -> 3 on them, interactions
        12 -> 6"``: the region filter's threshold and the normal-scan gate re-chosen on the
        answers so far by their simulated annotation cost (:mod:`busseg.calibration`).
        """
        return "" if self.calibrator is None else self.calibrator.text()

    def learn_interval(self) -> int:
        """Return how many new answers the next fine-tune waits for.

        :attr:`learn_every` for the first fine-tunes, then half the answers the previous
        fine-tune was trained on, at most :data:`LEARN_MAX_EVERY`: with the defaults
        fine-tunes start after 10, 20, 30, 45, 67, 100, 140 ... answers, so the first 20
        scans already benefit and a long session does not spend its compute on retraining
        after every few scans once many answers are in.

        Returns
        -------
        int
            >= :attr:`learn_every`.
        """
        grown = int(getattr(self, "_answers_at_finetune", 0) * LEARN_GROWTH)
        return max(self.learn_every, min(LEARN_MAX_EVERY, grown))

    def finetune_due(self) -> bool:
        """Whether learning as you go should start a fine-tune now.

        True when learning is on, no fine-tune is running, a corrections folder is set and
        at least :meth:`learn_interval` answers were recorded since the last fine-tune
        started.
        """
        return (self.learn and not self._finetune_running and self.store is not None
                and self.new_corrections >= self.learn_interval())

    def stop_finetune(self) -> None:
        """Ask a running fine-tune to stop after the current step (its best weights count)."""
        self._stop.set()

    def finetune_job(self) -> Generator[Any, None, FinetuneOutcome]:
        """Fine-tune on every recorded answer; adopt the result only if it costs less to annotate.

        A generator (run it in a worker thread, or drain it): it yields the progress events of
        :func:`busseg.finetune.finetune_iter` and returns a :class:`FinetuneOutcome`. The
        recorded cases (accepted, corrected, brushed and normal answers, empty masks
        included) are read in the order they were recorded when it starts; the new-answer
        counter restarts then.

        - **Held out: the latest answers** (leave-later-out, :func:`busseg.finetune.later_split`),
          so the fine-tune is judged on the scans that came after the ones it learned from,
          as the annotator will use it.
        - **A site checkpoint** (:mod:`busseg.site`; ``finetune_options["site"]``, default
          :data:`DEFAULT_SITE_MODE`): the network the session started from (never an earlier
          fine-tune: adapting twice never stacks) is fine-tuned on all answers, and the new
          folder keeps both networks: ``"vote"`` lets the adapted network decide which
          regions of the base's automatic mask stay; ``"adapted"`` lets it draw the automatic
          mask. Box and click prompts come from whichever network costs fewer interactions on
          the held-out lesion answers (:func:`busseg.finetune.prompt_costs`; ties: the base).
          ``"whole"`` keeps the fine-tuned network alone for everything (fine-tuned from the
          current checkpoint, as before site checkpoints existed).
        - **Adoption**: the simulated annotator (:mod:`busseg.annotator`: accept, clear, box
          then clicks) annotates the held-out answers with the current and with the new
          checkpoint, same box jitter; the new one is adopted when its interactions per
          held-out scan are not higher, whatever the Dice says. Without a held-out lesion it
          is not adopted (a model that learned to predict nothing would cost nothing on
          normal scans alone). :attr:`status` and :attr:`history` record the outcome.

        Yields
        ------
        busseg.engine.ProgressEvent

        Returns
        -------
        FinetuneOutcome

        Raises
        ------
        RuntimeError
            If another fine-tune is running or no corrections folder is set.
        ValueError
            If fewer than two answers are recorded (one to train on, one to hold out), or
            ``finetune_options["site"]`` is unknown.
        """
        with self._finetune_lock:
            if self._finetune_running:
                raise RuntimeError("a fine-tune is running already; one at a time")
            if self.store is None:
                raise RuntimeError("choose a corrections folder before fine-tuning")
            self._finetune_running = True
        self._stop.clear()
        self.new_corrections = 0
        t0 = time.perf_counter()
        current = self.checkpoint
        try:
            from busseg.finetune import (
                SITE_RECIPE,
                default_output_dir,
                finetune_config,
                finetune_iter,
                later_split,
            )
            from busseg.site import drawing_base

            images, masks, names, _ = self.recorded_pairs()
            self._answers_at_finetune = len(images)
            if len(images) < 2:
                raise ValueError(
                    f"learning as you go needs at least 2 recorded answers (one held out), "
                    f"{len(images)} recorded")
            opts = dict(self.finetune_options)
            site = opts.pop("site", DEFAULT_SITE_MODE)
            if site not in SITE_MODES:
                raise ValueError(f"finetune_options['site'] must be one of {SITE_MODES}, "
                                 f"got {site!r}")
            if site != "whole":
                opts.setdefault("recipe", SITE_RECIPE)
            cfg = opts.pop("cfg", None)
            if isinstance(cfg, dict):
                cfg = finetune_config(**{"recipe": opts.get("recipe"), **cfg})
            out = opts.pop("out_dir", None) or default_output_dir(self.models_dir)
            if "val_indices" not in opts and "val_fraction" not in opts:
                _, opts["val_indices"] = later_split([bool(np.any(m)) for m in masks])
            start = current if site == "whole" else drawing_base(current)
            self.status = f"Fine-tuning on {len(images)} recorded answers …"
            result = yield from finetune_iter(images, masks, start, cfg=cfg, out_dir=out,
                                              names=names, stop=self._stop, **opts)
            if site != "whole" and result.checkpoint is not None:
                self._make_site(result, images, masks, start, site)
            outcome = self._adoption(result, images, masks, current, t0)
            self.status = outcome.message
            self.history.append(outcome)
            return outcome
        except Exception as exc:
            self.status = f"Fine-tune failed: {exc}"
            raise
        finally:
            self._finetune_running = False

    def _make_site(self, result: Any, images: Sequence[np.ndarray],
                   masks: Sequence[np.ndarray], start: Path | None, site: str) -> None:
        """Make a fine-tune's checkpoint a site checkpoint, prompts from the cheaper network."""
        from busseg.finetune import prompt_costs, prompts_from_adapted
        from busseg.inference import accepts_prompts, load_model
        from busseg.site import make_site_checkpoint

        val = list(result.extra.get("val_indices") or [])
        costs = {"base": float("nan"), "adapted": float("nan")}
        if accepts_prompts(load_model(start)):  # else prompts never reach the model
            self.status = "Choosing the network that answers prompts …"
            costs = prompt_costs(images, masks, val,
                                 {"base": start, "adapted": result.checkpoint})
        adapted_ok = prompts_from_adapted(costs, images, masks, val)
        make_site_checkpoint(result.checkpoint, start, automatic=site,
                             prompts="adapted" if adapted_ok else "base",
                             info={"prompt_costs": {k: (float(v) if np.isfinite(v) else None)
                                                    for k, v in costs.items()},
                                   "heldout": "latest answers"})

    def _adoption(self, result: Any, images: Sequence[np.ndarray], masks: Sequence[np.ndarray],
                  base: Path | None, t0: float) -> FinetuneOutcome:
        """Decide on a fine-tune's checkpoint by the simulated annotation cost (issue 17).

        The held-out corrections are annotated by the simulated annotator
        (:func:`busseg.finetune.heldout_costs`, :mod:`busseg.annotator`: accept, clear, box
        then clicks) with the current and the new checkpoint, with the same box jitter. The
        new checkpoint is adopted when its interactions per held-out scan are not higher,
        whatever the Dice says; never without a held-out correction that has a lesion (on
        normal scans alone a model that predicts nothing would cost nothing). Switches
        :attr:`checkpoint` when adopted and returns the outcome (both numbers in its
        message). ``t0``: the job's start (``time.perf_counter``).
        """
        from busseg.finetune import heldout_costs

        before, after = result.dice_before, result.dice_after
        val = list(result.extra.get("val_indices") or [])
        n_lesion = sum(bool(np.asarray(masks[i]).any()) for i in val)
        where = "the default model" if base is None else Path(base).name
        costs, why = None, ""
        if result.checkpoint is not None and val and n_lesion:
            self.status = f"Simulating the annotator on {len(val)} held-out corrections …"
            try:
                costs = heldout_costs(images, masks, val, base, result.checkpoint, seed=0)
            except ValueError as exc:  # a checkpoint without prompts
                why = str(exc)
        ib = costs["before"]["per_scan"] if costs else None
        ia = costs["after"]["per_scan"] if costs else None
        adopted = costs is not None and ia <= ib

        def dice() -> str:
            if before is None or after is None:
                return "held-out Dice –"
            return f"held-out Dice {before:.3f} -> {after:.3f}"

        numbers = (f"{ib:.2f} -> {ia:.2f} interactions per held-out scan, {dice()}"
                   if costs else "")
        if adopted:
            self.checkpoint = Path(result.checkpoint)
            msg = (f"New checkpoint adopted: {numbers} ({result.n_train} trained, "
                   f"{result.n_val} held out); now using {self.checkpoint}")
        elif result.checkpoint is None:
            msg = f"Fine-tune not adopted: no checkpoint was written; kept {where}"
        elif not val:
            msg = f"Fine-tune not adopted: no held-out pairs to compare; kept {where}"
        elif not n_lesion:
            msg = (f"Fine-tune not adopted: no held-out correction has a lesion, so it "
                   f"cannot show that lesions are still found; kept {where}")
        elif costs is None:
            msg = f"Fine-tune not adopted: {why}; kept {where}"
        else:
            msg = (f"Fine-tune not adopted: it would cost more to annotate: {numbers}; "
                   f"kept {where}")
        return FinetuneOutcome(adopted, result.checkpoint, base, before, after,
                               result.n_train, result.n_val, time.perf_counter() - t0, msg,
                               interactions_before=ib, interactions_after=ia, costs=costs)

    def run_due_finetune(self, callback: Any = None) -> FinetuneOutcome | None:
        """Run a due fine-tune synchronously (benchmarks, scripts); None when none is due.

        Parameters
        ----------
        callback : callable, optional
            Called with each progress event.

        Returns
        -------
        FinetuneOutcome or None
        """
        if not self.finetune_due():
            return None
        from busseg.engine import drain

        return drain(self.finetune_job(), callback)


def _checkpoint_identity(checkpoint: str | os.PathLike | None) -> tuple:
    """Folder and ``(mtime_ns, size, inode)`` of a checkpoint's two files, without torch.

    The key :func:`busseg.inference.load_model` caches models by (``_checkpoint_dir`` and
    ``_files_key`` there), computed here without importing :mod:`busseg.models` (which
    imports torch), so the GUI thread can look up the prefetch cache before torch is loaded.

    Raises
    ------
    OSError
        If ``config.json`` or ``model.safetensors`` is missing (predicting then says why).
    """
    names = ("config.json", "model.safetensors")  # busseg.models.checkpoint's file names
    if checkpoint is None:
        p = Path(__file__).parent / "weights" / "default"  # default_checkpoint_path()
    else:
        p = Path(checkpoint).expanduser()
        if p.name in names and not p.is_dir():
            p = p.parent
    p = p.resolve()
    stats = [os.stat(p / n) for n in names]
    return (str(p), tuple((st.st_mtime_ns, st.st_size, st.st_ino) for st in stats))


def _checkpoint_text(checkpoint: str | os.PathLike | None) -> str:
    """Name a checkpoint as the manifest does: its path, or ``"default"`` (the shipped one)."""
    return "default" if checkpoint is None else str(checkpoint)


def glob_escape(text: str) -> str:
    """Escape glob metacharacters (``*``, ``?``, ``[``) in a file name."""
    return re.sub(r"([*?\[])", r"[\1]", text)
