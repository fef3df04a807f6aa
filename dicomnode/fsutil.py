"""Durability helpers of the spool, the outbox and the receive journal: those of :mod:`inference.fsutil`."""

from __future__ import annotations

from inference.fsutil import atomic_write, atomic_write_bytes, atomic_write_text, fsync_path

__all__ = ["atomic_write", "atomic_write_bytes", "atomic_write_text", "fsync_path"]
