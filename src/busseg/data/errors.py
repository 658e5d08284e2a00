"""Errors raised by the image readers.

A module of their own, so that every reader (:mod:`busseg.data.io`, :mod:`busseg.data.dicom`)
raises them without importing another reader. ``ImageReadError`` is re-exported as
``busseg.data.io.ImageReadError``, where callers catch it.
"""

from __future__ import annotations

__all__ = ["ImageReadError"]


class ImageReadError(ValueError):
    """A file could not be decoded as an image; the message names the file."""
