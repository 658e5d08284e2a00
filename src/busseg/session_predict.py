"""Automatic predictions of an annotation session: the current case's, and prefetched ones.

A mixin of :class:`busseg.session.AnnotationSession`: :meth:`~SessionPredictions.predict`
makes the current case's automatic mask (the baseline), :meth:`~SessionPredictions.prefetch_job`
computes other cases' ahead of time into a small cache keyed by image, checkpoint identity
(:mod:`busseg.checkpoint_id`) and settings. Forward passes are serialised by a lock.
"""

from __future__ import annotations

import os
from collections.abc import Generator
from pathlib import Path
from typing import Any

import numpy as np

from busseg.checkpoint_id import checkpoint_identity
from busseg.session_types import checkpoint_text, mask_fingerprint
from busseg.settings import InferenceSettings

__all__ = ["SessionPredictions"]


class SessionPredictions:
    """The prediction and prefetch part of :class:`busseg.session.AnnotationSession` (a mixin)."""

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
        self._predicted_by = checkpoint_text(self.checkpoint)
        self._status_hint = None

    def predict(self, settings: InferenceSettings | None = None, **kwargs: Any) -> np.ndarray:
        """Predict the current case with :attr:`checkpoint` and record it as the baseline.

        A prediction prefetched with the same checkpoint and settings (:meth:`prefetch_job`)
        is returned at once; otherwise the model runs here (after a prefetch's forward pass
        in progress, if any: one at a time) and the result is kept for the case.

        Parameters
        ----------
        settings : busseg.settings.InferenceSettings or None
            Threshold, flips, gate, region filter, post-processing and device (the model is
            loaded there; None: ``"auto"``); None: the defaults (the checkpoint's).
        **kwargs
            Fields of ``InferenceSettings`` overriding those of ``settings``, and any other
            keyword of :func:`busseg.inference.predict_mask` (prompts: never cached).

        Returns
        -------
        numpy.ndarray
            (H, W) bool automatic mask (a copy: the cached one is read-only).
        """
        case = self._require_case()
        checkpoint = self.checkpoint
        request = InferenceSettings.from_call(settings, kwargs)
        mask = self._automatic_mask(case.index, checkpoint, request, image=case.image)
        mask = mask.copy()
        self.set_prediction(mask)
        self._predicted_by = checkpoint_text(checkpoint)
        return mask

    # ------------------------------------------------------------------ prefetch

    def prediction_key(self, index: int, settings: InferenceSettings | None = None,
                       **kwargs: Any) -> tuple | None:
        """Key of case ``index``'s automatic prediction in the prefetch cache.

        Parameters
        ----------
        index : int
            Position in :attr:`records`.
        settings, **kwargs
            What :meth:`predict` would get.

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
        return self._key(index, self.checkpoint, InferenceSettings.from_call(settings, kwargs))

    def _key(self, index: int, checkpoint: Path | None, request: tuple) -> tuple | None:
        path = Path(self.records[index].image_path)
        try:
            st = path.stat()
            ck = checkpoint_identity(checkpoint)
        except (OSError, ValueError):
            return None
        settings, extra = request
        rest = tuple(sorted((k, str(v) if isinstance(v, os.PathLike) else v)
                            for k, v in extra.items()))
        key = ((str(path), st.st_mtime_ns, st.st_size), ck, settings.key(), rest)
        if self.calibrator is not None:  # a new calibration predicts again
            key += (self.calibrator.settings_key(),)
        try:
            hash(key)
        except TypeError:
            return None
        return key

    def cached_prediction(self, index: int, settings: InferenceSettings | None = None,
                          **kwargs: Any) -> np.ndarray | None:
        """Return the prefetched automatic mask of case ``index`` for these settings, or None.

        Cheap (three ``stat`` calls, no model, no torch import): the browser calls it on the
        GUI thread.

        Parameters
        ----------
        index, settings, **kwargs
            As for :meth:`prediction_key`.

        Returns
        -------
        numpy.ndarray or None
            (H, W) bool mask (read-only), exactly what :meth:`predict` returns for the case
            with the current :attr:`checkpoint` and these settings; None when not cached.
        """
        return self._cached(self.prediction_key(index, settings, **kwargs))

    def prefetch_job(self, index: int, settings: InferenceSettings | None = None, *,
                     cancellable: bool = True,
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
        settings : busseg.settings.InferenceSettings or None
            As for :meth:`predict`.
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
        request = InferenceSettings.from_call(settings, kwargs)
        return self._prefetch(index, self.checkpoint, request, epoch)

    def _prefetch(self, index: int, checkpoint: Path | None, request: tuple,
                  epoch: int | None) -> Generator[tuple, None, np.ndarray | None]:
        yield ("prefetch", index)
        if epoch is not None and epoch != self._prefetch_epoch:
            return None
        return self._automatic_mask(index, checkpoint, request, epoch=epoch)

    def prefetch(self, index: int, settings: InferenceSettings | None = None,
                 **kwargs: Any) -> np.ndarray:
        """Run :meth:`prefetch_job` to the end in this thread (scripts, benchmarks, tests).

        Returns
        -------
        numpy.ndarray
            (H, W) bool automatic mask of case ``index``, now cached.
        """
        from busseg.engine import drain

        return drain(self.prefetch_job(index, settings, cancellable=False, **kwargs))

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

    def _automatic_mask(self, index: int, checkpoint: Path | None, request: tuple, *,
                        image: np.ndarray | None = None,
                        epoch: int | None = None) -> np.ndarray | None:
        """Make an automatic prediction (the one place): cache, else model (one at a time).

        :meth:`predict` and :meth:`prefetch_job` both come here, so a prefetched mask is the
        mask :meth:`predict` would compute. Returns the cached (read-only) array.
        """
        key = self._key(index, checkpoint, request)
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

            settings, extra = request
            model = load_model(checkpoint, device=settings.device or "auto")
            settings = settings.replace(device=None)  # the model is there now
            if self.calibrator is not None:
                mask = self.calibrator.predict(index, image, model,
                                               checkpoint_text(checkpoint), settings, **extra)
            else:
                mask = predict_mask(image, model, settings, **extra)
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

