"""Prometheus metrics of a running node (``/metrics`` on the status HTTP server).

Two kinds of series:

* Event counters and latency histograms, updated in-process by the pipeline
  stages (``scp`` for instances, ``worker`` for jobs, ``sender`` for
  deliveries). With ``receive_processes > 1`` the receivers run in child
  processes; their instance counters live in shared memory
  (:class:`SharedReceiveCounts`) and the parent exports them.
* Gauges read from the node database at scrape time (:class:`DatabaseCollector`):
  studies by state, jobs by task and state, deliveries by destination and state.
  They survive restarts because the database does.

Stage latencies (seconds) are observed once per job, labelled by task and model
version: ``receive_to_complete`` (first instance received -> study complete),
``complete_to_inference`` (study complete -> results committed),
``inference_to_delivered`` (results committed -> last delivery confirmed) and
``receive_to_delivered`` (the whole path).
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from dicomnode import store
from dicomnode.store import StoreView

log = logging.getLogger(__name__)

__all__ = ["LATENCY_BUCKETS", "DatabaseCollector", "NodeMetrics", "SharedReceiveCounts", "default_metrics",
           "delivery_failed", "delivery_sent", "instance_rejected", "instance_stored", "job_done", "job_failed"]

LATENCY_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)
STAGES = ("receive_to_complete", "complete_to_inference", "inference_to_delivered", "receive_to_delivered")


#: (name, help) of the instance counters, shared by the in-process counters and the multi-process collector
RECEIVED_METRIC = ("dicomnode_instances_received", "Instances accepted by C-STORE")
REJECTED_METRIC = ("dicomnode_instances_rejected", "Instances refused by C-STORE")
RECEIVED_OUTCOMES = ("stored", "duplicate", "replaced", "resend_ignored")
REJECT_REASONS = ("out_of_resources", "invalid_dataset", "processing_failure", "unexpected_error", "sop_class_mismatch",
                  "quarantined", "other")


class SharedReceiveCounts:
    """Instance counters in shared memory: receiver processes add, the parent process exports.

    Parameters
    ----------
    ctx:
        The ``multiprocessing`` context the receiver processes are started with; the object is
        handed to them as a process argument (inheritance), never through a queue.
    """

    def __init__(self, ctx: Any) -> None:
        self._slots = [("received", o) for o in RECEIVED_OUTCOMES] + [("rejected", r) for r in REJECT_REASONS]
        self._array = ctx.Array("q", len(self._slots))

    def add(self, kind: str, label: str) -> None:
        """Count one instance (``kind`` "received" or "rejected"; unknown reasons count as "other")."""
        key = (kind, label) if (kind, label) in self._slots else (kind, "other")
        i = self._slots.index(key)
        with self._array.get_lock():
            self._array[i] += 1

    def snapshot(self) -> dict[tuple[str, str], int]:
        """Current totals by (kind, label)."""
        with self._array.get_lock():
            return {slot: int(v) for slot, v in zip(self._slots, self._array[:], strict=True)}


class _SharedReceiveCollector(Collector):
    def __init__(self, shared: SharedReceiveCounts) -> None:
        self.shared = shared

    def collect(self) -> Iterator[CounterMetricFamily]:
        received = CounterMetricFamily(*RECEIVED_METRIC, labels=["outcome"])
        rejected = CounterMetricFamily(*REJECTED_METRIC, labels=["reason"])
        for (kind, label), value in self.shared.snapshot().items():
            if value:
                (received if kind == "received" else rejected).add_metric([label], float(value))
        yield from (received, rejected)


class DatabaseCollector(Collector):
    """Gauges computed from the node database on every scrape (through a read-only :class:`StoreView`)."""

    def __init__(self, storage_dir: Path) -> None:
        self.path = store.db_path(storage_dir)

    def collect(self) -> Iterator[GaugeMetricFamily]:
        """Yield studies, jobs and deliveries gauges (nothing while the database does not exist)."""
        families = {
            "studies": GaugeMetricFamily("dicomnode_studies", "Studies in the node database by state",
                                         labels=["state"]),
            "jobs": GaugeMetricFamily("dicomnode_jobs", "Jobs by task and state", labels=["task", "state"]),
            "deliveries": GaugeMetricFamily("dicomnode_deliveries", "Result deliveries by destination and state",
                                            labels=["destination", "state"]),
            "instances": GaugeMetricFamily("dicomnode_spooled_instances", "Instances currently held in the spool")}
        quarantined = GaugeMetricFamily(
            "dicomnode_quarantined_instances", "Acknowledged instances that could not be indexed and wait in "
            "<storage_dir>/quarantine for the operator (files still present), by reason", labels=["reason"])
        if self.path.exists():
            try:
                with StoreView(self.path) as view:
                    for name, rows in view.gauges().items():
                        for values in rows:
                            families[name].add_metric([str(v) for v in values[:-1]], float(values[-1]))  # type: ignore[arg-type]
                    by_reason: dict[str, int] = {}
                    for row in view.quarantine_rows():
                        if (self.path.parent / row["path"]).exists():
                            by_reason[row["kind"]] = by_reason.get(row["kind"], 0) + 1
                    for reason, n in sorted(by_reason.items()):
                        quarantined.add_metric([reason], float(n))
            except sqlite3.Error as exc:
                log.warning("metrics: cannot read the node database: %s", exc)
        yield from (*families.values(), quarantined)


class NodeMetrics:
    """The node's metric objects in their own registry (never the process-global default one)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.instances_received = Counter(*RECEIVED_METRIC, ["outcome"], registry=r)
        self.instances_rejected = Counter(*REJECTED_METRIC, ["reason"], registry=r)
        self.studies_completed = Counter("dicomnode_studies_completed", "Studies whose jobs finished (per job)",
                                         ["task"], registry=r)
        self.jobs_finished = Counter("dicomnode_jobs_finished", "Job attempts by task and outcome",
                                     ["task", "outcome"], registry=r)
        self.deliveries = Counter("dicomnode_deliveries_attempted", "Delivery attempts by destination and outcome",
                                  ["destination", "outcome"], registry=r)
        self.delivery_retries = Counter("dicomnode_delivery_retries", "Failed delivery attempts that will be retried",
                                        ["destination"], registry=r)
        self.stage_latency = Histogram("dicomnode_stage_latency_seconds", "Latency of each pipeline stage",
                                       ["stage", "task", "model_version"], buckets=LATENCY_BUCKETS, registry=r)
        self._collector: DatabaseCollector | None = None
        self._shared: SharedReceiveCounts | None = None
        self._lock = threading.Lock()

    def count_into(self, shared: SharedReceiveCounts) -> None:
        """In a receiver process: also add every received/rejected instance to ``shared``."""
        self._shared = shared

    def export_shared(self, shared: SharedReceiveCounts) -> None:
        """In the parent process: export the receiver processes' counts instead of the local counters."""
        with self._lock:
            self.registry.unregister(self.instances_received)
            self.registry.unregister(self.instances_rejected)
            self.registry.register(_SharedReceiveCollector(shared))

    def attach_database(self, storage_dir: Path) -> None:
        """Export the database gauges of ``storage_dir`` (once; later calls replace the folder)."""
        with self._lock:
            if self._collector is not None:
                self.registry.unregister(self._collector)
            self._collector = DatabaseCollector(storage_dir)
            self.registry.register(self._collector)

    def exposition(self) -> bytes:
        """The registry in the Prometheus text format."""
        return generate_latest(self.registry)

    # ------------------------------------------------------------------ hooks called by the stages

    def instance_stored(self, duplicate: bool | str) -> None:
        """C-STORE accepted an instance: ``True`` a duplicate, ``False`` stored, or the outcome's name.

        Outcomes: ``stored``, ``duplicate`` (same content again), ``replaced`` (different content under the
        same SOP Instance UID replaced the stored copy), ``resend_ignored`` (the same, kept the first).
        """
        outcome = duplicate if isinstance(duplicate, str) else ("duplicate" if duplicate else "stored")
        self.instances_received.labels(outcome).inc()
        if self._shared is not None:
            self._shared.add("received", outcome)

    def instance_rejected(self, reason: str) -> None:
        """C-STORE refused an instance; ``reason`` is a short fixed word (never a tag value)."""
        self.instances_rejected.labels(reason).inc()
        if self._shared is not None:
            self._shared.add("rejected", reason)

    def job_failed(self, task: str) -> None:
        """A job attempt raised."""
        self.jobs_finished.labels(task, "failed").inc()

    def job_done(self, conn: sqlite3.Connection, job_id: int) -> None:
        """A job committed its results: observe receive->complete and complete->inference."""
        view = StoreView.on(conn)
        row = view.job_timing(job_id)
        if row is None:
            return
        task, version = row["task"], row["model_version"] or "unknown"
        self.jobs_finished.labels(task, "done").inc()
        self.studies_completed.labels(task).inc()
        first = view.first_received(row["series_uids"])
        if first is not None and row["completed_at"] is not None:
            self.stage_latency.labels("receive_to_complete", task, version).observe(
                max(row["completed_at"] - first, 0.0))
        if row["completed_at"] is not None:
            self.stage_latency.labels("complete_to_inference", task, version).observe(
                max(row["updated_at"] - row["completed_at"], 0.0))

    def delivery_sent(self, conn: sqlite3.Connection, destination: str, job_id: int | None) -> None:
        """A delivery was confirmed; once every delivery of the job is sent, observe the delivery latencies."""
        self.deliveries.labels(destination, "sent").inc()
        if job_id is None:
            return
        view = StoreView.on(conn)
        if view.undelivered(job_id):
            return
        row = view.job_timing(job_id)
        if row is None or row["state"] != "done":
            return
        now = time.time()
        version = row["model_version"] or "unknown"
        self.stage_latency.labels("inference_to_delivered", row["task"], version).observe(
            max(now - row["updated_at"], 0.0))
        first = view.first_received(row["series_uids"])
        if first is not None:
            self.stage_latency.labels("receive_to_delivered", row["task"], version).observe(max(now - first, 0.0))

    def delivery_failed(self, destination: str, state: str) -> None:
        """A delivery attempt failed; ``state`` is the new outbox state (``pending`` means it will be retried)."""
        self.deliveries.labels(destination, "failed").inc()
        if state == "pending":
            self.delivery_retries.labels(destination).inc()


_DEFAULT: NodeMetrics | None = None
_DEFAULT_LOCK = threading.Lock()


def default_metrics() -> NodeMetrics:
    """The process's node metrics (created on first use)."""
    global _DEFAULT
    with _DEFAULT_LOCK:
        if _DEFAULT is None:
            _DEFAULT = NodeMetrics()
        return _DEFAULT


def _best_effort(hook: Callable[[NodeMetrics], None], name: str) -> None:
    """Run ``hook`` on the process's metrics; a metrics failure is logged and never breaks the pipeline."""
    try:
        hook(default_metrics())
    except Exception:  # noqa: BLE001 - metrics are best effort
        log.debug("metrics hook %s failed", name, exc_info=True)


def instance_stored(outcome: str) -> None:
    """C-STORE accepted an instance (``stored``, ``duplicate``, ``replaced`` or ``resend_ignored``)."""
    _best_effort(lambda m: m.instance_stored(outcome), "instance_stored")


def instance_rejected(reason: str) -> None:
    """C-STORE refused an instance; ``reason`` is a short fixed word."""
    _best_effort(lambda m: m.instance_rejected(reason), "instance_rejected")


def job_failed(task: str) -> None:
    """A job attempt raised."""
    _best_effort(lambda m: m.job_failed(task), "job_failed")


def job_done(conn: sqlite3.Connection, job_id: int) -> None:
    """A job committed its results (latencies read from the database over ``conn``)."""
    _best_effort(lambda m: m.job_done(conn, job_id), "job_done")


def delivery_sent(conn: sqlite3.Connection, destination: str, job_id: int | None) -> None:
    """A delivery was confirmed."""
    _best_effort(lambda m: m.delivery_sent(conn, destination, job_id), "delivery_sent")


def delivery_failed(destination: str, state: str) -> None:
    """A delivery attempt failed; ``state`` is the new outbox state."""
    _best_effort(lambda m: m.delivery_failed(destination, state), "delivery_failed")
