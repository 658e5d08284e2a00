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
from collections import OrderedDict
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
        mask = self._automatic_mask(case.index, self.checkpoint, kwargs, image=case.image)
        mask = mask.copy()
        self.set_prediction(mask)
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
            mask = predict_mask(image, load_model(checkpoint, device=device), **kw)
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
        """Fine-tune the current checkpoint on every stored correction; adopt it if it costs less.

        A generator (run it in a worker thread, or drain it): it yields the progress events of
        :func:`busseg.finetune.finetune_iter` and returns a :class:`FinetuneOutcome`. The
        corrections (normal scans with empty masks included) are read when it starts; the
        new-correction counter restarts then. The held-out pairs are drawn from lesion and
        normal corrections alike (at least one with a lesion when two or more have one).
        Adoption (issue 17): the simulated annotator (:mod:`busseg.annotator`: accept, clear,
        box then clicks, as the annotation-session benchmark counts) annotates the held-out
        pairs with the current and with the new checkpoint, same box jitter; when the new
        one's interactions per held-out scan are not higher, :attr:`checkpoint` switches to
        it, whatever the Dice says. Without a held-out lesion it is not adopted (a model that
        learned to predict nothing would cost nothing on normal scans alone). :attr:`status`
        (interactions and held-out Dice, before -> after) and :attr:`history` record the
        outcome.

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
            outcome = self._adoption(result, images, masks, base, t0)
            self.status = outcome.message
            self.history.append(outcome)
            return outcome
        except Exception as exc:
            self.status = f"Fine-tune failed: {exc}"
            raise
        finally:
            self._finetune_running = False

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


def glob_escape(text: str) -> str:
    """Escape glob metacharacters (``*``, ``?``, ``[``) in a file name."""
    return re.sub(r"([*?\[])", r"[\1]", text)
