"""Recording what the annotator decided: statuses, progress, saving, versions, the manifest.

A mixin of :class:`busseg.session.AnnotationSession` (see :mod:`busseg.session` for what a
session records and where); it uses the session's attributes (``store``, ``current``, the
manifest rows) and is not meant to be used alone.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from busseg.corrections import LABELS, CorrectionPaths
from busseg.data.busi import BusiRecord
from busseg.manifest import (
    ACCEPTED,
    CORRECTED,
    ManifestRow,
    mask_stats,
    now_iso,
    spacing_of,
    sweep_temporaries,
)
from busseg.session_types import (
    MASK_STATUSES,
    NORMAL,
    VERSIONS_DIRNAME,
    Case,
    SaveResult,
    glob_escape,
    mask_fingerprint,
)

_VERSION_RE = re.compile(r"^(?P<name>.+)_mask\.v(?P<k>\d+)\.png$")

__all__ = ["SessionRecords"]


class SessionRecords:
    """The recording part of :class:`busseg.session.AnnotationSession` (a mixin)."""

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
        copy_key = (self.store.root, name)
        paths = self.store.save(name, label, case.image, mask, overwrite=True,
                                image_known=self._image_copies.get(copy_key) == label)
        self._image_copies[copy_key] = label  # the image copy is written once per case
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
