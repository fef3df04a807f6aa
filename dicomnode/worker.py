"""The job handler: run one job's task on its spooled series and hand the results to the outbox.

Exactly once, one job one commit: result files are written first (atomically,
into a folder named after the job, replaced on a retry); then
:func:`dicomnode.store.commit_finished_job` inserts the deliveries, records the
result series and latest SR, marks the job done and the study processed in one
transaction. A crash before that commit reruns the job and nothing was queued
for sending; a crash after it leaves the deliveries to the sender.
"""

from __future__ import annotations

import logging

from dicomnode import store
from dicomnode.assembler import load_result_context, result_series_of
from dicomnode.config import Config
from dicomnode.errors import TaskError
from dicomnode.execution import engine_for
from dicomnode.jobs import Job, JobQueue
from dicomnode.metrics import job_done, job_failed
from dicomnode.outbox import Outbox
from dicomnode.results import ResultContext
from dicomnode.spool import Spool
from inference.tasks import TaskContext

log = logging.getLogger(__name__)

__all__ = ["JobHandler", "PermanentJobError"]

SR_STORAGE_PREFIX = "1.2.840.10008.5.1.4.1.1.88."


class PermanentJobError(TaskError):
    """A job that cannot succeed on retry (route removed, no instances left)."""

    permanent = True


class JobHandler:
    """Callable ``handler(job)`` used by :class:`dicomnode.jobs.WorkerPool`."""

    def __init__(self, cfg: Config, spool: Spool, queue: JobQueue, outbox: Outbox, *,
                 on_results: object = None) -> None:
        self.cfg = cfg
        self.spool = spool
        self.queue = queue
        self.outbox = outbox
        self.on_results = on_results

    def __call__(self, job: Job) -> None:
        """Process ``job`` and commit its results; raises on failure (the pool records it)."""
        try:
            self._run(job)
        except Exception as exc:
            if getattr(exc, "counts_as_attempt", True):
                job_failed(job.task)
            raise

    def _run(self, job: Job) -> None:
        route = next((r for r in self.cfg.routes if r.name == job.route), None)
        if route is None:
            raise PermanentJobError(f"route {job.route!r} is no longer configured")
        paths = [inst.path for uid in job.series_uids for inst in self.spool.instances(job.study_uid, uid)]
        if not paths:
            raise PermanentJobError(f"no spooled instances left for study {job.study_uid}")
        conn = store.thread_connection(self.outbox.db_path)
        rctx = load_result_context(conn, job.study_uid, job.route, ResultContext(
            institution_name=self.cfg.results.institution_name))
        tctx = TaskContext(models_dir=self.cfg.models_dir, model_dir=route.model, device=self.cfg.device,
                           extra={"route": route.name, "job_id": job.id})
        findings, objects = engine_for(self.cfg).process_study(paths, job.task, tctx, rctx)
        files = self.outbox.write_datasets(job.id, objects)
        sr = next(((str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID), str(ds.SOPClassUID)) for ds in objects
                   if str(ds.SOPClassUID).startswith(SR_STORAGE_PREFIX)), None)
        finished = store.FinishedJob(
            job.id, job.study_uid, job.route, job.generation,
            deliveries=self.outbox.delivery_rows(files, route.send_to, [str(ds.SOPInstanceUID) for ds in objects]),
            result_series=result_series_of(rctx), sr=sr, timings=dict(findings.timings_s),
            model_version=f"{findings.algorithm_name} {findings.algorithm_version}")
        state = store.commit_finished_job(conn, finished)
        if state != "running":
            log.warning("job %d is no longer running (%s); results discarded", job.id, state)
            return
        job_done(conn, job.id)
        if route.archive_for_training:
            _archive_for_training(paths, route, self.cfg)
        if callable(self.on_results):
            self.on_results()


def _archive_for_training(paths: list, route: object, cfg: Config) -> None:
    """Keep a de-identified copy for nightly retraining; a failure here never fails the job."""
    from dicomnode.archive import archive_series

    try:
        archive_series(paths, route, cfg)  # type: ignore[arg-type]
    except Exception as exc:  # noqa: BLE001 - archiving is best effort; the results are already committed
        log.warning("route %s: series not archived for training: %s", getattr(route, "name", "?"), exc)
