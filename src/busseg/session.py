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

Where the code is: this module holds :class:`AnnotationSession` (the case list, the current
case, moving between cases) and assembles it from three mixins, parts of the one class:
:mod:`busseg.session_records` (statuses, progress, saving, versions, the manifest),
:mod:`busseg.session_predict` (the automatic prediction and the prefetch cache) and
:mod:`busseg.session_learning` (learning as you go, site calibration). Constants and result
types live in :mod:`busseg.session_types`; every name is importable from here.

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

import os
import re
import threading
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from busseg.corrections import LABELS, CorrectionStore
from busseg.data.busi import BusiRecord
from busseg.manifest import (
    ACCEPTED,
    CORRECTED,
    CaseManifest,
    ManifestRow,
    check_files,
)
from busseg.session_learning import SessionLearning
from busseg.session_predict import SessionPredictions
from busseg.session_records import SessionRecords
from busseg.session_types import (
    DEFAULT_CALIBRATE,
    DEFAULT_CALIBRATE_EVERY,
    DEFAULT_LEARN_EVERY,
    DEFAULT_SITE_MODE,
    LEARN_GROWTH,
    LEARN_MAX_EVERY,
    MASK_STATUSES,
    NORMAL,
    PREFETCH_CASES,
    SITE_MODES,
    VERSIONS_DIRNAME,
    Case,
    FinetuneOutcome,
    SaveResult,
    checkpoint_text,
    glob_escape,
    mask_fingerprint,
)

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
    "AnnotationSession",
    "Case",
    "FinetuneOutcome",
    "SaveResult",
    "case_names",
    "checkpoint_text",
    "glob_escape",
    "mask_fingerprint",
]


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


class AnnotationSession(SessionRecords, SessionPredictions, SessionLearning):
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
        :meth:`busseg.finetune.FinetuneSettings.resolve` overrides, and ``settings`` a
        whole :class:`busseg.finetune.FinetuneSettings`. The settings are resolved once per
        fine-tune (``recipe`` default ``"site"`` unless ``site`` is ``"whole"``).
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
        # (corrections folder, case name) -> class of the image copy this session wrote there
        self._image_copies: dict[tuple[Path, str], str] = {}
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
        self._answers_at_finetune = 0  # answers the last fine-tune was trained on
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
        self._reset_case_state(mask_fingerprint(correction) if correction is not None else None)
        self._edited = None
        self._no_lesion = False
        return self.current

    def _reset_case_state(self, baseline: str | None = None) -> None:
        """Forget the current answer's mask, prediction and status hint; set the baseline."""
        self._mask = None
        self._baseline = baseline
        self._predicted = False
        self._predicted_by = None
        self._status_hint = None

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
        self._reset_case_state()
        return result

    def _require_case(self) -> Case:
        if self.current is None:
            raise RuntimeError("no case is open; call open(index) or goto(index) first")
        return self.current
