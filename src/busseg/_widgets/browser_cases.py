"""The case list of the Scan browser: folder, class filter, statuses, progress, recording.

Folders are read by :func:`busseg.data.discover` through :class:`busseg.session.AnnotationSession`
(the session is the viewer's, :class:`busseg.state.ViewerState`). Each case of the list shows
what the annotator decided (the session's status: ``[accepted]``, ``[corrected]``,
``[normal]``, ``[brushed]``), else ``[predicted]`` while its prediction layer is open, and its
uncertainty when ranked. Leaving a case (Next, Previous, Open, a double-click, Next suggested,
closing napari) records it: an edited mask as corrected, an unedited automatic prediction as
accepted (nothing when there is nothing new); Skip (key K) leaves it without recording. The
progress row says "n of N recorded". :class:`CaseListMixin` is that part of the browser.
"""

from __future__ import annotations

import hashlib
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from busseg._widgets.browser_learning import path_or_none
from busseg._widgets.browser_ranking import SORT_UNCERTAINTY
from busseg.corrections import NOT_SEGMENTED, PREDICTED
from busseg.layers import busseg_metadata, find_layer, prediction_name
from busseg.session import AnnotationSession, mask_fingerprint

__all__ = ["ALL", "CaseListMixin", "default_corrections_dir", "layer_edited", "mark_saved",
           "status_mark"]

#: Class-filter choice showing every case.
ALL = "all"


def status_mark(status: str) -> str:
    """Mark of a case in the list: ``"  [accepted]"``, ``"  [predicted]"``, ``""`` ..."""
    return "" if status == NOT_SEGMENTED else f"  [{status}]"


def default_corrections_dir(root: str | os.PathLike) -> Path:
    """Corrections folder used for a dataset when none is chosen.

    Parameters
    ----------
    root : str or os.PathLike
        The dataset folder.

    Returns
    -------
    pathlib.Path
        ``~/.busseg/corrections/<folder name>-<8 hex digits of its absolute path>``
        (``BUSSEG_HOME`` overrides ``~/.busseg``): the same folder every time the same
        dataset is opened, so the status of its cases survives a restart.
    """
    root = Path(root).expanduser().resolve()
    home = Path(os.environ.get("BUSSEG_HOME", Path.home() / ".busseg"))
    digest = hashlib.sha1(str(root).encode()).hexdigest()[:8]
    return home / "corrections" / f"{root.name}-{digest}"


def layer_edited(layer: Any) -> bool | None:
    """Whether a prediction layer's data differs from what the plugin last wrote into it.

    Parameters
    ----------
    layer : napari.layers.Labels
        A ``"<case> prediction"`` layer.

    Returns
    -------
    bool or None
        Compared with the browser's fingerprint (``session_fp``: a loaded correction, a
        prediction on open, a save) or else Segment lesions' ``written_sha1`` (an automatic
        segmentation; a prompt edit changes the data, so it counts as an edit). None when the
        layer carries neither (a layer the user made: then any lesion pixel is an edit).
    """
    from busseg.layers import data_sha1

    meta = busseg_metadata(layer)
    if meta.get("session_fp"):
        return mask_fingerprint(layer.data) != meta["session_fp"]
    if meta.get("written_sha1"):
        return data_sha1(layer.data) != meta["written_sha1"]
    return None


def mark_saved(layer: Any, case_name: str, written_by: str = "scan browser") -> None:
    """Record in a prediction layer's metadata that its data is what is stored now."""
    meta = dict(busseg_metadata(layer))
    meta.update(session_fp=mask_fingerprint(layer.data), kind="prediction", name=case_name)
    meta.setdefault("written_by", written_by)
    layer.metadata = {**layer.metadata, "busseg": meta}


class CaseListMixin:
    """Folder and corrections folder, the list and its statuses, progress, and recording."""

    # ---------------------------------------------------------------- folder and list

    def _root_from_layers(self) -> Path | None:
        layers = list(self._viewer.layers)
        active = self._viewer.layers.selection.active
        if active is not None:
            layers.insert(0, active)
        for layer in layers:
            root = busseg_metadata(layer).get("root")
            if root and Path(root).is_dir():
                return Path(root)
        return None

    def _on_from_layer(self, *_: Any) -> None:
        root = self._root_from_layers()
        if root is None:
            self._notify_warning("No opened layer comes from a folder of scans; choose the folder.")
            return
        self.set_root(root)

    def _on_predict_changed(self, on: Any = None) -> None:
        """Predict the open case when switched on; drop queued prefetches when switched off."""
        if self._session is None:
            return
        if not self._predict_check.value:
            self._prefetch_wanted = None
            self._session.cancel_prefetch()
            return
        rec = self.open_record
        if rec is not None and find_layer(self._viewer, prediction_name(rec.name)) is None:
            self._start_prediction(self._open_index)
        elif rec is not None:
            self._schedule_prefetch()

    def _on_root_changed(self, value: Any) -> None:
        path = path_or_none(value)
        self._leave_open_case()
        self._all, self._root, self._session = [], None, None
        self._state.session = None
        self._prefetch_wanted = None  # indices of the previous folder
        self._scores.clear()  # keyed by path; a ranking of another folder does not apply
        if path is None or not path.is_dir():
            self._status.value = "Choose a folder of scans."
            self._set_class_choices([])
            self._refresh_list()
            return
        try:
            session = AnnotationSession(path, None, learn=bool(self._learn_check.value),
                                        learn_every=int(self._learn_spin.value),
                                        finetune_options=self.finetune_options)
        except (OSError, ValueError) as exc:
            # shown in the widget, not as a notification: the line edit reports every keystroke
            self._status.value = f"No scans to browse: {exc}"
            self._set_class_choices([])
            self._refresh_list()
            return
        self._session = self._state.session = session
        self._all, self._root = list(session.records), session.roots[0]
        labels = [r.label for r in self._all]
        self._set_class_choices(labels)
        counts = ", ".join(f"{labels.count(c)} {c}" for c in dict.fromkeys(labels))
        layout = session.layouts[0] if session.layouts else "?"
        self._status.value = f"{len(self._all)} scans ({counts}; layout: {layout})"
        if session.problems:
            self._notify_warning(f"{len(session.problems)} problem(s), e.g. {session.problems[0]}")
        corr = path_or_none(self._corr_edit.value)
        if corr is None:
            # emits changed -> _on_corrections_changed
            self._corr_edit.value = default_corrections_dir(self._root)
        else:
            self._apply_corrections(corr)
        self._refresh_list()
        if self._shown:
            first = session.first_uncorrected() if session.store is not None else None
            pos = self._shown.index(first) if first in self._shown else 0
            self.select(pos)
            # predict the selected case now: the model is loaded before the first Open
            self._schedule_prefetch(self._shown[pos])
            self._warm_up()

    def _class_choices(self, _widget: Any = None) -> list[str]:
        """``"all"`` and the labels present in the folder (a callable: survives reset_choices)."""
        order = ["benign", "malignant", "normal", "unknown"]
        present = sorted({r.label for r in self._all},
                         key=lambda c: (order.index(c) if c in order else 9, c))
        return [ALL, *present]

    def _set_class_choices(self, _labels: Any = None) -> None:
        current = self._class_combo.value
        with self._class_combo.changed.blocked():
            self._class_combo.reset_choices()
            self._class_combo.value = current if current in self._class_combo.choices else ALL

    def _apply_corrections(self, path: Path | None) -> None:
        s = self._session
        if s is None:
            return
        self._store_error = None
        if path is None:
            s.store = None
            self._store_error = "Choose a corrections folder (outside the dataset) first."
            return
        try:
            s.set_corrections(path)
        except ValueError as exc:
            s.store = None
            self._store_error = str(exc)
            self._status.value = f"Corrections folder refused: {exc}"

    def _on_filter_changed(self, *_: Any) -> None:
        self._refresh_list()
        if self._shown and self.current_record() is None:
            self.select(0)

    def _on_corrections_changed(self, value: Any = None) -> None:
        self._apply_corrections(path_or_none(self._corr_edit.value))
        self._refresh_list()

    def _on_layers_changed(self, *_: Any) -> None:
        if not self._closing_case:
            self._refresh_list()

    def _on_layer_removed(self, event: Any) -> None:
        """Save a removed prediction layer of the open case (also when the viewer closes)."""
        if self._closing_case:
            return
        layer = getattr(event, "value", None)
        rec = self.open_record
        if (layer is not None and rec is not None and self._session is not None
                and layer.name == prediction_name(rec.name)):
            from napari.layers import Labels

            if isinstance(layer, Labels) and self._session.store is not None:
                try:
                    if self._save_layer(self._open_index, layer, force=False) is not None:
                        self._notify_info(f"Saved the edits of {rec.name} (its prediction layer "
                                    "was removed).")
                except (OSError, ValueError, RuntimeError) as exc:
                    self._notify_error(f"The edits of {rec.name} could not be saved: {exc}")
        try:
            self._refresh_list()
        except RuntimeError:  # the Qt widget is gone (the viewer is closing)
            pass

    def _refresh_list(self) -> None:
        """Rebuild the list (filter and status marks) and the progress, keeping the selection."""
        if self._refreshing:
            return
        self._refreshing = True
        try:
            current = self._cases.value
            label = self._class_combo.value
            self._shown = [i for i, r in enumerate(self._all) if label == ALL or r.label == label]
            if self._sort_combo.value == SORT_UNCERTAINTY:
                self._shown.sort(key=self._uncertainty_order)
            s = self._session
            has_store = s is not None and s.store is not None
            predicted = {
                layer.name for layer in self._viewer.layers
                if layer.name.endswith(" prediction") and not self._is_doomed(layer)
            }
            choices = []
            for i in self._shown:
                rec = self._all[i]
                status = s.status_of(i) if has_store and s.is_recorded(i) else None
                if status is None:
                    status = PREDICTED if prediction_name(rec.name) in predicted else NOT_SEGMENTED
                score = self.score_of(rec)
                shown = "" if score is None else (
                    "  u=?" if not math.isfinite(score) else f"  u={score:.2f}"
                )
                name = s.names[i] if s is not None else rec.name  # unique: items need it
                choices.append((f"{name}{status_mark(status)}{shown}", i))
            self._cases.choices = []  # clear first: keeps the order when marks change
            self._cases.choices = choices
            self._fit_list_height()
            keep = [i for i in current if i in self._shown]
            if keep:
                self._cases.value = keep
            n, total = s.progress() if has_store else (0, len(self._all))
            self._progress_label.value = (s.progress_text() if has_store
                                          else f"0 of {total} recorded")
            self._progress.max = max(total, 1)
            self._progress.value = n
            self._show_calibration()
        finally:
            self._refreshing = False

    def _show_calibration(self) -> None:
        """Show the session's one-line site calibration, when it has one (else hide the row)."""
        text = ""
        method = getattr(self._session, "calibration_text", None)
        if callable(method):
            try:
                text = str(method() or "")
            except Exception:  # noqa: BLE001 - a display line never breaks the list
                text = ""
        self._calibration.value = text
        self._calibration.visible = bool(text)

    def _uncertainty_order(self, i: int) -> tuple:
        """Sort key: highest score first, unscored cases last, then dataset order."""
        score = self.score_of(self._all[i])
        if score is None or not math.isfinite(score):
            return (1, 0.0, i)
        return (0, -score, i)

    def _step(self, delta: int, *, record: bool = True) -> None:
        """Open the case ``delta`` places away in the list; ``record``: record the one left."""
        if not self._shown:
            self._notify_warning("No case to show: choose a folder of scans (and class).")
            return
        if self._open_index is not None and self._open_index in self._shown:
            pos = self._shown.index(self._open_index)
        else:
            value = self._cases.value
            pos = self._shown.index(value[0]) if value and value[0] in self._shown else -1
        new = pos + delta if pos >= 0 else 0
        if not 0 <= new < len(self._shown):
            path = self._autosave()[1] if record else None  # the last case is recorded too
            end = "last" if delta > 0 else "first"
            note = f"; it is recorded in {path}" if path is not None else ""
            self._notify_info(f"That was the {end} case{note}.")
            return
        self.select(new)
        self._record_on_leave = record
        try:
            self.open_current()
        finally:
            self._record_on_leave = True


    # ---------------------------------------------------------------- recording

    def _has_store(self, *, quiet: bool) -> bool:
        if self._session is None:
            if not quiet:
                self._notify_error("Choose a folder of scans first.")
            return False
        if self._session.store is None:
            if not quiet:
                self._notify_error(self._store_error
                             or "Choose a corrections folder (outside the dataset) first.")
            return False
        return True

    def _ensure_session_case(self, index: int) -> AnnotationSession:
        s = self._session
        if s.current is None or s.current.index != index:
            s.open(index)
        return s

    def _save_layer(self, index: int, layer: Any, *, force: bool = False,
                    record: bool = False) -> Any:
        """Hand a prediction layer's data to the session and save it (raises on failure).

        ``record``: record the case as the annotator leaves it (an unedited automatic
        prediction as accepted); else save only an edited mask (or any, with ``force``).
        """
        s = self._ensure_session_case(index)
        data = np.asarray(layer.data)
        edited = layer_edited(layer)
        s.set_mask(data, edited=edited)
        if record:
            if edited is False and s.decision() is None and s.current.correction is None:
                s.set_prediction(data)  # an unedited automatic prediction: accepted
            result = s.record()
        else:
            result = s.save(force=force)
        if result is not None:
            mark_saved(layer, self._all[index].name)
        return result

    def _autosave(self) -> tuple[bool, Path | None]:
        """Record the open case as it is left: ``(ok, written mask or None)``."""
        if self._open_index is None or self._session is None:
            return True, None
        rec = self._all[self._open_index]
        layer = find_layer(self._viewer, prediction_name(rec.name), "labels")
        if layer is None:
            return True, None
        if self._session.store is None:
            edited = layer_edited(layer)
            if edited is False or (edited is None and not np.any(np.asarray(layer.data))):
                return True, None
            self._notify_error(f"The edits of {rec.name} are not saved: "
                         f"{self._store_error or 'choose a corrections folder'}. "
                         "Its layers stay open.")
            return False, None
        try:
            result = self._save_layer(self._open_index, layer, record=True)
        except (OSError, ValueError, RuntimeError) as exc:
            self._notify_error(f"The edits of {rec.name} are not saved: {exc}. "
                               "Its layers stay open.")
            return False, None
        if result is None:
            return True, None
        self._after_save()
        return True, result.paths.mask

    def _after_save(self) -> None:
        self._refresh_list()
        self._maybe_finetune()
