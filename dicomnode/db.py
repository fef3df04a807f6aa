"""Compatibility alias: the connection helpers now live in :mod:`dicomnode.store.connection`.

New code imports :mod:`dicomnode.store`; tables are created only by the store's migrations.
"""

from __future__ import annotations

from dicomnode.store.connection import connect, db_path, read_only, thread_connection, transaction

__all__ = ["connect", "db_path", "read_only", "thread_connection", "transaction"]
