"""One job, one commit: a finished job's deliveries, result context, job state and study state together."""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass, field

from dicomnode.store.assembly import AssemblyRepo
from dicomnode.store.connection import transaction
from dicomnode.store.jobs import JobsRepo
from dicomnode.store.outbox import OutboxRepo

__all__ = ["FinishedJob", "commit_finished_job"]


@dataclass(frozen=True)
class FinishedJob:
    """Everything a finished job records.

    ``deliveries`` are ``(path relative to the storage folder, SOP Instance UID, destination)``;
    ``result_series`` maps a result kind to ``(series UID, series number or None)``; ``sr`` is the
    latest SR ``(series, SOP instance, SOP class)`` or None.
    """

    job_id: int
    study_uid: str
    route: str
    generation: int
    deliveries: list[tuple[str, str, str]]
    result_series: dict[str, tuple[str, int | None]] = field(default_factory=dict)
    sr: tuple[str, str, str] | None = None
    timings: dict[str, float] = field(default_factory=dict)
    model_version: str | None = None


def commit_finished_job(conn: sqlite3.Connection, job: FinishedJob) -> str | None:
    """Record ``job`` in one transaction, only while it is still ``running``.

    Returns the state the job had: ``"running"`` when everything was committed; otherwise (another
    worker or a recovery took it, or it is gone) nothing was written.
    """
    with transaction(conn):
        state = JobsRepo(conn).state(job.job_id)
        if state != "running":
            return state
        OutboxRepo(conn).add(job.deliveries, job_id=job.job_id, study_uid=job.study_uid)
        assembly = AssemblyRepo(conn)
        for kind, (uid, number) in job.result_series.items():
            assembly.save_result_series(job.study_uid, job.route, kind, uid, number)
        if job.sr is not None:
            assembly.save_result_document(job.study_uid, job.route, job.sr)
        JobsRepo(conn).mark_done(job.job_id, job.timings, job.model_version)
        assembly.mark_processed_if_done(job.study_uid, job.generation)
    return state
