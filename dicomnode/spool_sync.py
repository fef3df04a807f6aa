"""Durability of a batch of new spool files with one device flush, scoped to those files (Linux).

Used by :meth:`dicomnode.spool.Spool.store_batch`.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path
from typing import Any

from dicomnode.fsutil import fsync_path

__all__ = ["sync_files"]

_SFR_WAIT_BEFORE, _SFR_WRITE, _SFR_WAIT_AFTER = 1, 2, 4


def _load_libc() -> Any:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:  # pragma: no cover - not Linux
        return None
    if not hasattr(libc, "sync_file_range"):
        return None
    libc.sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    return libc


_LIBC = _load_libc()


def sync_files(root: Path, files: list[Path]) -> None:
    """Make ``files`` (written, renamed into place) and their directory entries durable, touching nothing else.

    The data of every file is sent to the disk with ``sync_file_range`` (all started, then each waited for,
    which includes ext4's conversion of its unwritten extents). A change of the spool root's times followed by
    its ``fsync`` then commits the file-system journal's running transaction, and with it every earlier one
    (journals commit in order: the files' sizes, extents, renames and new directories), behind a flush of the
    device cache that covers all the data written before. The directories are fsynced as well (POSIX asks
    for it). One commit per batch, like ``syncfs``, but ``syncfs`` also writes every other process's dirty
    pages on the file system (gigabytes on a host whose trainings write checkpoints) and held batches for
    seconds (issue #33). Where ``sync_file_range`` is not available, every file and directory is fsynced.
    """
    dirs: set[Path] = set()
    for f in files:
        dirs.update((f.parent, f.parent.parent))
    if _LIBC is not None and files:
        fds = [os.open(f, os.O_RDONLY) for f in files]
        try:
            for fd in fds:
                _LIBC.sync_file_range(fd, 0, 0, _SFR_WRITE)
            for fd in fds:
                if _LIBC.sync_file_range(fd, 0, 0, _SFR_WAIT_BEFORE | _SFR_WRITE | _SFR_WAIT_AFTER) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"sync_file_range: {os.strerror(err)}")
        finally:
            for fd in fds:
                os.close(fd)
        os.utime(root)  # a change in the running transaction: the root's fsync must commit it
        fsync_path(root)
    else:
        for f in files:
            fsync_path(f)
    for d in sorted(dirs) + [root]:
        fsync_path(d)
