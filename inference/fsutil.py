"""Durable file writes shared by the node, the model runtime and training.

:func:`atomic_write` is the one write-to-temporary-then-rename helper: the data is flushed and ``fsync``ed before
the rename and the folder is ``fsync``ed after it, so a crash leaves either the old or the new file, never a torn
one; on any failure the temporary file is removed and the error propagates (nothing is reported as written).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

__all__ = ["atomic_write", "atomic_write_bytes", "atomic_write_text", "fsync_path", "fsync_tree", "replace_dir",
           "walk_files"]


def fsync_path(path: Path) -> None:
    """``fsync`` a file or a directory by path (a directory: so that entries renamed into it survive a crash)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """``fsync`` every file and folder under ``root`` (a folder about to be renamed into place)."""
    for folder, _, files in os.walk(root):
        for name in files:
            fsync_path(Path(folder) / name)
        fsync_path(Path(folder))


def replace_dir(tmp: Path, dest: Path) -> None:
    """Make the filled folder ``tmp`` appear as ``dest`` (replacing an existing one), durably.

    Everything in ``tmp`` is synced first and the parent folder after the rename; an existing ``dest`` is moved
    aside, replaced, then deleted. Both folders must be on one file system (``tmp`` beside ``dest``).
    """
    fsync_tree(tmp)
    if dest.exists():
        old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
        os.replace(dest, old)
        os.replace(tmp, dest)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, dest)
    fsync_path(dest.parent)


def walk_files(root: str | os.PathLike[str]) -> Iterator[Path]:
    """Every file under the folder ``root``, recursively, in sorted path order; hidden files (``.name``) skipped.

    The one recursive walk over DICOM folders (routing dry-runs, series loading, training data indexing).
    """
    for f in sorted(Path(root).rglob("*")):
        if f.is_file() and not f.name.startswith("."):
            yield f


def atomic_write(path: str | os.PathLike[str], write: Callable[[BinaryIO], object], *, durable: bool = True) -> Path:
    """Have ``write`` fill a temporary file beside ``path``, then rename it into place; return ``path``.

    With ``durable`` (the default) the file and its folder are ``fsync``ed; pass False only for output that is
    cheap to make again (synthetic data sets), where thousands of syncs would dominate the run time.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            if durable:
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if durable:
        fsync_path(path.parent)
    return path


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically and durably."""
    return atomic_write(path, lambda fh: fh.write(data))


def atomic_write_text(path: str | os.PathLike[str], text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically and durably."""
    return atomic_write_bytes(path, text.encode(encoding))
