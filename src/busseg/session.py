"""The annotation session: one case at a time, nothing lost, the model learning as you go.

A Qt-free core (numpy; torch only when a prediction or a fine-tune runs). The "Scan browser"
dock widget displays an :class:`AnnotationSession` and forwards the user's actions to it;
``benchmarks/annotation_session.py`` drives the very same object headless.

What the session owns:

- **the case list**: the records :func:`busseg.data.discover` finds in one or more folders
  (BUSI, BUS-BRA- or BUS-UCLM-style image/mask folder pairs, plain folders of scans);
- **the current case** (:attr:`AnnotationSession.current`), its automatic prediction (the
  *baseline*) and the mask the user has now;
- **autosave**: moving to another case (:meth:`~AnnotationSession.goto`,
  :meth:`~AnnotationSession.next`, :meth:`~AnnotationSession.previous`) or closing
  (:meth:`~AnnotationSession.close`) saves the current mask to the corrections folder when it
  differs from the baseline, atomically. A mask equal to the automatic prediction is not a
  correction and is not saved;
- **versions**: a case saved again keeps its earlier correction as
  ``<corrections>/versions/<class>/<name>_mask.v<k>.png`` (k = 1, 2, ...; never overwritten);
  the current one stays at ``<corrections>/<class>/<name>_mask.png`` (the BUSI layout of
  :class:`busseg.corrections.CorrectionStore`, so fine-tuning and ``training/train.py`` read
  the folder as a dataset and never see the versions);
- **"no lesion"**: :meth:`~AnnotationSession.mark_no_lesion` records the case as a normal scan
  (an empty mask in ``<corrections>/normal/``), an explicit correction that is always saved;
- **progress**: :meth:`~AnnotationSession.progress` counts the cases with a stored correction,
  read from the corrections folder, so a session opened later on the same folders shows every
  case's status and :meth:`~AnnotationSession.first_uncorrected` says where to continue;
- **learning as you go** (off by default): after every ``learn_every`` new corrections,
  :meth:`~AnnotationSession.finetune_due` turns True and :meth:`~AnnotationSession.finetune_job`
  fine-tunes the current checkpoint on all corrections so far (empty masks included) with
  :func:`busseg.finetune.finetune_iter`, one run at a time. The new checkpoint is adopted
  only when its held-out Dice is not worse than the current checkpoint's on the same held-out
  pairs; :attr:`~AnnotationSession.status` says what happened. The job is a generator
  (DESIGN practice 2): napari wraps it in ``thread_worker``, scripts drain it with
  :func:`busseg.engine.drain` (or call :meth:`~AnnotationSession.run_due_finetune`).

Example (headless)::

    from busseg.session import AnnotationSession

    s = AnnotationSession(["scans/"], "corrections/")
    case = s.open(s.first_uncorrected() or 0)
    pred = s.predict()            # automatic mask of the current case (the baseline)
    s.set_mask(edited_mask)       # what the annotator made of it
    s.next()                      # autosaves (the mask differs from the prediction), opens the next
    print(s.progress_text())      # "1 of 12 corrected"
"""

from __future__ import annotations

import hashlib
import os
import re
import threading
import time
from collections.abc import Generator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from busseg.corrections import LABELS, CorrectionPaths, CorrectionStore
from busseg.data.busi import BusiRecord

#: Default number of new corrections between two fine-tunes.
DEFAULT_LEARN_EVERY = 10
#: Folder (inside the corrections folder) of earlier versions of corrections.
VERSIONS_DIRNAME = "versions"
#: Class folder of scans marked "no lesion".
NORMAL = "normal"
_VERSION_RE = re.compile(r"^(?P<name>.+)_mask\.v(?P<k>\d+)\.png$")


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
    """

    name: str
    label: str
    paths: CorrectionPaths
    version: Path | None = None
    no_lesion: bool = False


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
        Wall-clock time of the run.
    message : str
        One line for a status bar.
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
        (H, W) bool stored correction when the case was corrected before, else None.
    """

    index: int
    record: BusiRecord
    name: str
    correction: np.ndarray | None = None
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

    Raises
    ------
    FileNotFoundError, ValueError
        As :func:`busseg.data.discover` for a root; ValueError when the corrections folder
        overlaps a root or ``learn_every < 1``.

    Notes
    -----
    Not thread-safe except for :meth:`finetune_job`, which may run in a worker thread while
    the GUI thread keeps moving through cases (it reads a snapshot of the corrections folder
    at its start; files are written atomically).
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
        self.store: CorrectionStore | None = None
        self._corrected: dict[str, str] = {}  # case name -> class folder of its correction
        if corrections is not None:
            self.set_corrections(corrections)
        self.checkpoint: Path | None = Path(checkpoint) if checkpoint is not None else None
        self.learn = bool(learn)
        self.learn_every = learn_every
        self.finetune_options = dict(finetune_options or {})
        self.models_dir = Path(models_dir) if models_dir is not None else None
        self.status = ""
        self.history: list[FinetuneOutcome] = []
        self.new_corrections = 0  # saves since the last fine-tune started
        self.current: Case | None = None
        self.last_save: SaveResult | None = None
        self._baseline: str | None = None
        self._mask: np.ndarray | None = None
        self._edited: bool | None = None
        self._no_lesion = False
        self._finetune_lock = threading.Lock()
        self._finetune_running = False
        self._stop = threading.Event()

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
        """Use ``path`` as the corrections folder and read which cases it holds.

        Parameters
        ----------
        path : str or os.PathLike
            The folder (created on the first save).

        Raises
        ------
        ValueError
            If it overlaps one of the roots, is a file or an empty path.
        """
        store = CorrectionStore(path)
        for root in self.roots:
            CorrectionStore(path, dataset_root=root)  # raises on overlap
        self.store = store
        self.refresh()

    def refresh(self) -> None:
        """Read again which cases have a stored correction (e.g. written by another program)."""
        self._corrected = {}
        if self.store is None or not self.store.root.is_dir():
            return
        wanted = set(self.names)
        for label in LABELS:
            folder = self.store.root / label
            if not folder.is_dir():
                continue
            for entry in os.scandir(folder):
                if entry.name.endswith("_mask.png"):
                    name = entry.name[: -len("_mask.png")]
                    if name in wanted and name not in self._corrected:
                        self._corrected[name] = label

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

    def name_of(self, record: BusiRecord | int) -> str:
        """Name of a case in the corrections folder."""
        i = record if isinstance(record, int) else self.index_of(record)
        return self.names[i]

    def is_corrected(self, record: BusiRecord | int) -> bool:
        """Whether a correction of the case is stored in the corrections folder."""
        return self.name_of(record) in self._corrected

    def correction_label(self, record: BusiRecord | int) -> str | None:
        """Class folder of the case's stored correction (``"normal"`` after "no lesion") or None."""
        return self._corrected.get(self.name_of(record))

    def correction_paths(self, record: BusiRecord | int) -> CorrectionPaths | None:
        """Paths of the case's stored correction, or None when it has none."""
        label = self.correction_label(record)
        if label is None or self.store is None:
            return None
        return self.store.path_for(self.name_of(record), label)

    def progress(self) -> tuple[int, int]:
        """Return ``(corrected, total)``: cases with a stored correction, and all cases."""
        return len(self._corrected), len(self.records)

    def progress_text(self) -> str:
        """``"n of N corrected"``."""
        n, total = self.progress()
        return f"{n} of {total} corrected"

    def first_uncorrected(self, start: int = 0) -> int | None:
        """Position of the first case from ``start`` on (wrapping around) without a correction.

        Returns
        -------
        int or None
            None when every case is corrected.
        """
        n = len(self.records)
        for k in range(n):
            i = (start + k) % n
            if self.names[i] not in self._corrected:
                return i
        return None

    def resume(self) -> Case | None:
        """Open the first case without a correction (where the user stopped), or None."""
        i = self.first_uncorrected()
        return None if i is None else self.open(i)

    # ------------------------------------------------------------------ the current case

    def open(self, index: int) -> Case:
        """Make case ``index`` the current case **without** saving the previous one.

        Use :meth:`goto` to move with autosave. A stored correction is loaded as
        :attr:`Case.correction` and becomes the baseline (saving it again unchanged writes
        nothing).

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
        self.current = Case(index, self.records[index], name, correction)
        self._mask = None
        self._edited = None
        self._no_lesion = False
        self._baseline = mask_fingerprint(correction) if correction is not None else None
        return self.current

    def set_prediction(self, mask: Any) -> None:
        """Record the automatic prediction of the current case (the baseline of "edited").

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

    def predict(self, **kwargs: Any) -> np.ndarray:
        """Predict the current case with :attr:`checkpoint` and record it as the baseline.

        Parameters
        ----------
        **kwargs
            Passed to :func:`busseg.inference.predict_mask` (``threshold``, ``device`` ...).

        Returns
        -------
        numpy.ndarray
            (H, W) bool automatic mask.
        """
        from busseg.inference import load_model, predict_mask

        case = self._require_case()
        device = kwargs.pop("device", "auto")
        mask = predict_mask(case.image, load_model(self.checkpoint, device=device), **kwargs)
        self.set_prediction(mask)
        return mask

    def set_mask(self, mask: Any, *, edited: bool | None = None) -> None:
        """Set the current case's mask as the user has it now.

        Parameters
        ----------
        mask : array_like
            (H, W) mask, > 0 = lesion (a Labels layer's data is fine; it is not copied).
        edited : bool, optional
            Whether the user changed it. By default: it differs from the baseline (the
            automatic prediction or the stored correction), or, without a baseline, it has
            a lesion pixel.
        """
        self._require_case()
        self._mask = np.asarray(mask)
        self._edited = edited
        self._no_lesion = False

    def mark_no_lesion(self, *, save: bool = True) -> SaveResult | None:
        """Record the current case as a normal scan: an empty mask in the ``normal`` folder.

        Parameters
        ----------
        save : bool
            Save it now (default); otherwise it is saved when moving on.

        Returns
        -------
        SaveResult or None
            What was written (None with ``save=False`` or without a corrections folder).
        """
        case = self._require_case()
        shape = self._mask.shape if self._mask is not None else case.image.shape[:2]
        self._mask = np.zeros(shape, np.uint8)
        self._edited = True
        self._no_lesion = True
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

    def save(self, *, force: bool = False) -> SaveResult | None:
        """Save the current mask as the case's correction when it is edited (or ``force``).

        An earlier correction of the case is kept under ``versions/`` first. Both files are
        written atomically (image first, mask last).

        Parameters
        ----------
        force : bool
            Save even an unedited mask (an explicit "Save": the user accepts it as correct).

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
        """
        case = self.current
        if case is None or self._mask is None:
            return None
        if not (force or self.is_edited()):
            return None
        if self.store is None:
            raise RuntimeError("choose a corrections folder before saving")
        label = NORMAL if self._no_lesion else case.record.label
        if label not in LABELS:
            label = "unknown"
        name = case.name
        mask = np.asarray(self._mask)
        if mask.ndim != 2:
            raise ValueError(f"a correction must be a 2D (H, W) mask, got shape {mask.shape}")
        old_label = self._corrected.get(name)
        version = None
        if old_label is not None:
            version = self._keep_version(name, old_label)
        paths = self.store.save(name, label, case.image, mask, overwrite=True)
        if old_label is not None and old_label != label:
            old = self.store.path_for(name, old_label)
            for p in (old.mask, old.image):  # the class changed: one current correction only
                try:
                    p.unlink()
                except FileNotFoundError:
                    pass
        self._corrected[name] = label
        self._baseline = mask_fingerprint(mask)
        self._edited = None
        case.correction = mask > 0
        self.new_corrections += 1
        return SaveResult(name, label, paths, version, self._no_lesion)

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

    def goto(self, index: int) -> Case:
        """Save the current case if edited (autosave), then open case ``index``.

        Returns
        -------
        Case
            The newly opened case. The save's result is :attr:`last_save`.
        """
        self.last_save = self.save() if self.current is not None else None
        return self.open(index)

    def next(self) -> Case | None:
        """Autosave and open the next case; None (nothing saved) at the last case."""
        if self.current is None:
            return self.goto(0) if self.records else None
        if self.current.index + 1 >= len(self.records):
            return None
        return self.goto(self.current.index + 1)

    def previous(self) -> Case | None:
        """Autosave and open the previous case; None (nothing saved) at the first case."""
        if self.current is None or self.current.index == 0:
            return None
        return self.goto(self.current.index - 1)

    def close(self) -> SaveResult | None:
        """Save the current case if edited and close it (e.g. when the viewer closes)."""
        result = self.save() if self.current is not None else None
        self.current = None
        self._mask = None
        self._baseline = None
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

    def finetune_due(self) -> bool:
        """Whether learning as you go should start a fine-tune now.

        True when learning is on, no fine-tune is running, a corrections folder is set and
        at least :attr:`learn_every` corrections were saved since the last fine-tune started.
        """
        return (self.learn and not self._finetune_running and self.store is not None
                and self.new_corrections >= self.learn_every)

    def stop_finetune(self) -> None:
        """Ask a running fine-tune to stop after the current step (its best weights count)."""
        self._stop.set()

    def finetune_job(self) -> Generator[Any, None, FinetuneOutcome]:
        """Fine-tune the current checkpoint on every stored correction; adopt it if not worse.

        A generator (run it in a worker thread, or drain it): it yields the progress events of
        :func:`busseg.finetune.finetune_iter` and returns a :class:`FinetuneOutcome`. The
        corrections (normal scans with empty masks included) are read when it starts; the
        new-correction counter restarts then. The held-out pairs are drawn from lesion and
        normal corrections alike (at least one with a lesion when two or more have one). When
        the new checkpoint's held-out Dice is at least the current checkpoint's on the same
        held-out pairs *and* its Dice on the held-out pairs with a lesion is too,
        :attr:`checkpoint` switches to it; without a held-out lesion it is not adopted (a
        model that learned to predict nothing would look perfect on normal scans alone).
        :attr:`status` and :attr:`history` record the outcome.

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
            If fewer than two corrections are stored (one to train on, one to hold out).
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
        base = self.checkpoint
        try:
            from busseg.finetune import default_output_dir, finetune_config, finetune_iter

            images, masks, names = self.store.load_pairs()
            if len(images) < 2:
                raise ValueError(
                    f"learning as you go needs at least 2 corrections (one held out), "
                    f"{len(images)} stored")
            opts = dict(self.finetune_options)
            cfg = opts.pop("cfg", None)
            if isinstance(cfg, dict):
                cfg = finetune_config(**cfg)
            out = opts.pop("out_dir", None) or default_output_dir(self.models_dir)
            self.status = f"Fine-tuning on {len(images)} corrections …"
            result = yield from finetune_iter(images, masks, base, cfg=cfg, out_dir=out,
                                              names=names, stop=self._stop, **opts)
            from busseg.finetune import lesions_kept

            before, after = result.dice_before, result.dice_after
            kept = lesions_kept(result)
            adopted = (result.checkpoint is not None and before is not None
                       and after is not None and after >= before and kept is True)
            where = "the default model" if base is None else Path(base).name
            if adopted:
                self.checkpoint = Path(result.checkpoint)
                msg = (f"New checkpoint adopted: held-out Dice {before:.3f} -> {after:.3f} "
                       f"({result.n_train} trained, {result.n_val} held out); "
                       f"now using {self.checkpoint}")
            elif before is None or after is None:
                msg = f"Fine-tune not adopted: no held-out pairs to compare; kept {where}"
            elif kept is None:
                msg = (f"Fine-tune not adopted: no held-out correction has a lesion, so it "
                       f"cannot show that lesions are still found; kept {where}")
            elif not kept:
                h = result.extra["heldout"]
                msg = (f"Fine-tune not adopted: held-out lesion Dice "
                       f"{h['after']['dice_lesion']:.3f} < {h['before']['dice_lesion']:.3f} of "
                       f"{where}, which is kept")
            else:
                msg = (f"Fine-tune not adopted: held-out Dice {after:.3f} < {before:.3f} of "
                       f"{where}, which is kept")
            outcome = FinetuneOutcome(adopted, result.checkpoint, base, before, after,
                                      result.n_train, result.n_val,
                                      time.perf_counter() - t0, msg)
            self.status = msg
            self.history.append(outcome)
            return outcome
        except Exception as exc:
            self.status = f"Fine-tune failed: {exc}"
            raise
        finally:
            self._finetune_running = False

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


def glob_escape(text: str) -> str:
    """Escape glob metacharacters (``*``, ``?``, ``[``) in a file name."""
    return re.sub(r"([*?\[])", r"[\1]", text)
