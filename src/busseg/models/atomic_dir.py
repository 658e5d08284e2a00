"""Write a directory atomically: fill a temporary sibling, then rename it into place.

Used by :func:`busseg.models.save_checkpoint`, so a checkpoint directory appears whole or not
at all, and an existing one is replaced only when asked and only if it looks like one.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

__all__ = ["check_replaceable", "fsync_path", "remove_path", "write_dir_atomically"]


def fsync_path(path: Path) -> None:
    """Flush a file or directory to disk; errors (e.g. directories on Windows) are ignored.

    Parameters
    ----------
    path : pathlib.Path
        The file or directory.
    """
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - e.g. directories on some platforms
        pass
    finally:
        os.close(fd)


def remove_path(path: Path) -> None:
    """Delete a directory tree or a file, ignoring errors.

    Parameters
    ----------
    path : pathlib.Path
        What to delete (a symlink is removed, never followed).
    """
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            path.unlink()
        except OSError:  # pragma: no cover
            pass


def check_replaceable(path: Path, overwrite: bool, marker: str) -> None:
    """Check that ``path`` is free, or may be replaced.

    Parameters
    ----------
    path : pathlib.Path
        The directory about to be written.
    overwrite : bool
        Whether an existing directory may be replaced.
    marker : str
        A file name that a replaceable non-empty directory must hold (e.g. ``config.json``),
        so nothing unrelated is ever deleted.

    Raises
    ------
    FileExistsError
        If ``path`` exists and ``overwrite`` is False, or it exists and is not a directory,
        is a symlink, or is a non-empty directory without ``marker``.
    """
    if not (path.exists() or path.is_symlink()):
        return
    if not overwrite:
        raise FileExistsError(
            f"{path} already exists; choose a new checkpoint name or pass overwrite=True "
            "to replace it"
        )
    if (
        not path.is_dir()
        or path.is_symlink()
        or (any(path.iterdir()) and not (path / marker).is_file())
    ):
        raise FileExistsError(
            f"refusing to replace {path}: it is not a busseg checkpoint directory; "
            "choose a new checkpoint name"
        )


def write_dir_atomically(
    path: Path, write: Callable[[Path], None], *, overwrite: bool, marker: str
) -> Path:
    """Create directory ``path`` whole or not at all.

    ``write`` fills a new temporary sibling directory; it is then renamed to ``path``. With
    ``overwrite``, an existing ``path`` is renamed aside, the new one renamed in, and the old
    one deleted (restored if the rename fails). On any error the temporary directory is
    removed and ``path`` is as it was.

    Parameters
    ----------
    path : pathlib.Path
        The directory to create; its parent is created if needed.
    write : callable
        ``write(tmp_dir)`` writes every file into ``tmp_dir`` (and flushes them).
    overwrite : bool
        Whether an existing directory may be replaced.
    marker : str
        A file name that an existing non-empty directory must hold to be replaced.

    Returns
    -------
    pathlib.Path
        ``path``.

    Raises
    ------
    FileExistsError
        See :func:`check_replaceable` (checked before and after writing).
    """
    check_replaceable(path, overwrite, marker)
    parent = path.parent
    parent.mkdir(parents=True, exist_ok=True)
    tag = uuid.uuid4().hex[:12]
    tmp = parent / f".{path.name}.tmp-{tag}"
    tmp.mkdir()
    try:
        write(tmp)
        check_replaceable(path, overwrite, marker)
        if path.exists():
            old = parent / f".{path.name}.old-{tag}"
            os.rename(path, old)
            try:
                os.rename(tmp, path)
            except BaseException:
                os.rename(old, path)
                raise
            remove_path(old)
        else:
            os.rename(tmp, path)
    except BaseException:
        remove_path(tmp)
        raise
    fsync_path(parent)
    return path
