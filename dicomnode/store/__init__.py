"""The node database: the only package that holds SQL.

- :mod:`~dicomnode.store.connection`: connections (WAL, per thread) and transactions;
- :mod:`~dicomnode.store.schema`: the schema and its versioned migrations, run at start-up by :func:`ensure`;
- one repository per stage, the only code that writes its tables: :class:`ReceiveRepo` (spool index and
  associations), :class:`AssemblyRepo` (studies and result context), :class:`JobsRepo`, :class:`OutboxRepo`
  (deliveries), :class:`QuarantineRepo`; :func:`commit_finished_job` records a finished job in one transaction;
- :class:`StoreView`: read-only queries for status, HTTP and metrics.
"""

from __future__ import annotations

from dicomnode.store.assembly import AssemblyRepo
from dicomnode.store.connection import connect, db_path, read_only, thread_connection, transaction
from dicomnode.store.finish import FinishedJob, commit_finished_job
from dicomnode.store.jobs import JobsRepo
from dicomnode.store.outbox import OutboxRepo
from dicomnode.store.quarantine import QuarantineRepo
from dicomnode.store.receive import ReceiveRepo
from dicomnode.store.schema import SCHEMA_VERSION, StoreVersionError, ensure, migrate, schema_version
from dicomnode.store.views import StoreView

__all__ = ["SCHEMA_VERSION", "AssemblyRepo", "FinishedJob", "JobsRepo", "OutboxRepo", "QuarantineRepo",
           "ReceiveRepo", "StoreVersionError", "StoreView", "commit_finished_job", "connect", "db_path", "ensure",
           "migrate", "read_only", "schema_version", "thread_connection", "transaction"]
