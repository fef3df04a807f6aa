"""The Ray engine: tasks run on warm Ray actors; the node reads, writes and sends.

Per job the node loads the spooled instances (pixel data included), ships the
datasets through Ray's object store to an actor of the job's task, gets
:class:`~inference.findings.Findings` back and builds the result objects
itself. The job's state never leaves the node's store:

* an actor or worker machine dying mid-job raises ``ActorLost``: the call is
  made again on the next replica (Ray restarts the dead actor elsewhere);
* the cluster unreachable (head down, driver process gone): the job *waits*,
  still ``running`` in the store, and the engine reconnects every
  ``retry_wait_s``; the wait shows as ``dicomnode_execution_waiting`` in the
  metrics, in ``<storage_dir>/execution-state.json`` and in ``dicomnode status``. It
  never counts as a failed attempt.

Waiting never uses up the job's attempts: while the job only waits, the
attempt its claim counted is given back in the store (and counted again when
the job is next sent to an actor), so neither a long outage, nor node restarts
during it, nor a shutdown while waiting (``counts_as_attempt = False``: the
worker pool returns the job to pending) can make it dead.

The Ray driver runs in one child process per node (:class:`~dicomnode.execution.host.DriverProcess`),
shared by every worker thread, so a cluster going away can never take the node
down with it, and the driver dies with the node.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from collections.abc import Sequence
from os import PathLike
from pathlib import Path

from pydicom import Dataset

from dicomnode import store
from dicomnode.config import ActorSpec, Config
from dicomnode.errors import TaskError
from dicomnode.execution import driver
from dicomnode.execution.host import DriverProcess
from dicomnode.processing import load_builder
from dicomnode.results import ResultContext
from inference.findings import Findings
from inference.fsutil import atomic_write_text
from inference.series import read_datasets
from inference.tasks import TaskContext

log = logging.getLogger(__name__)

__all__ = ["EngineStopped", "RayEngine", "STATE_FILE", "WAITING", "read_state"]

STATE_FILE = "execution-state.json"
WAITING = "waiting for execution engine"


class EngineStopped(TaskError):
    """The node is shutting down while the job waited for the cluster: back to pending, no attempt counted."""

    counts_as_attempt = False


class RemoteJobError(TaskError):
    """The task failed on the actor (the job's ordinary failure path)."""

    def __init__(self, message: str, permanent: bool = False) -> None:
        super().__init__(message)
        self.permanent = permanent


def read_state(storage_dir: Path) -> dict[str, object]:
    """The engine state the node last wrote under ``storage_dir`` ({} when it never wrote one)."""
    try:
        return dict(json.loads((Path(storage_dir) / STATE_FILE).read_text(encoding="utf-8")))
    except (OSError, ValueError):
        return {}


class RayEngine:
    """Runs tasks on Ray actors named ``<task>#<replica>`` in ``execution.namespace``."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.ex = cfg.execution
        self._lock = threading.Lock()
        self._host: DriverProcess | None = None
        self._next: dict[str, int] = {}
        self._waiting = 0
        self._stopped = threading.Event()
        self._gauge = _waiting_gauge()
        self._write_state()

    # ------------------------------------------------------------------ public
    def process_study(self, sources: Sequence[Dataset | str | PathLike[str]], task_name: str,
                      task_context: TaskContext, result_context: ResultContext) -> tuple[Findings, list[Dataset]]:
        """Load on the node, run the task on an actor, build the result objects on the node."""
        t0 = time.monotonic()
        loaded = [s for s in sources if isinstance(s, Dataset)]
        paths = [Path(s) for s in sources if not isinstance(s, Dataset)]
        loaded += read_datasets(paths) if paths else []
        if not loaded:
            raise TaskError("no DICOM datasets to process")
        for ds in loaded:
            _ = ds.PixelData if "PixelData" in ds else None  # ship the pixels, never a path to them
        t_load = time.monotonic()
        findings = self.run_task(loaded, task_name, task_context)
        t_task = time.monotonic()
        objects = load_builder()(findings, loaded, result_context)
        t_write = time.monotonic()
        findings.timings_s.update({"load": t_load - t0, "task": t_task - t_load, "write": t_write - t_task})
        log.info("task %s (ray) on study %s: %d result object(s) in %.2f s", task_name,
                 findings.study_instance_uid, len(objects), t_write - t0)
        return findings, objects

    def run_task(self, datasets: Sequence[Dataset], task_name: str, task_context: TaskContext) -> Findings:
        """Findings of ``task_name`` from an actor; retries lost actors, waits out a lost cluster."""
        spec = self.ex.actors.get(task_name, ActorSpec())
        payload = {"num_cpus": spec.num_cpus, "num_gpus": spec.num_gpus, "plugins": list(self.cfg.plugins),
                   "models_dir": str(self.cfg.models_dir), "device": self.cfg.device}
        context = {"models_dir": str(task_context.models_dir) if task_context.models_dir else None,
                   "model_dir": str(task_context.model_dir) if task_context.model_dir else None,
                   "device": task_context.device, "extra": dict(task_context.extra)}
        ledger = _Attempts(self.cfg.node.storage_dir, task_context.extra.get("job_id"))
        lost = 0
        waiting = False
        try:
            while True:
                if self._stopped.is_set():
                    ledger.charge()  # the worker pool's release gives the claim's attempt back
                    raise EngineStopped("node stopping while the job waited for the execution engine")
                if self._waiting:  # the cluster is believed down: this job is not an attempt (yet)
                    ledger.refund()
                replica = self._replica(task_name, spec.replicas)
                host: DriverProcess | None = None
                try:
                    _reachable(self.ex.address or "")
                    host = self._driver()
                    ledger.charge()
                    return host.call("run", task_name, replica, payload, list(datasets), context)  # type: ignore[no-any-return]
                except driver.RemoteTaskError as exc:
                    raise RemoteJobError(str(exc), exc.permanent) from None
                except driver.ActorLost as exc:
                    lost += 1
                    log.warning("task %s: actor #%d lost mid-job (%s); retry %d on another actor", task_name,
                                replica, exc, lost)
                    if lost <= self.ex.actor_retries:
                        continue
                    reason = f"actors keep dying ({exc})"
                except (driver.EngineDown, OSError) as exc:
                    reason = f"{type(exc).__name__}: {exc}"
                    self._reset_driver(host)
                ledger.refund()
                if not waiting:
                    waiting = True
                    self._set_waiting(+1, reason)
                lost = 0
                self._stopped.wait(self.ex.retry_wait_s)
        finally:
            if waiting:
                self._set_waiting(-1, "")

    def stop_waiting(self) -> None:
        """Node shutdown: jobs waiting for the cluster return at once (EngineStopped); calls in flight go on."""
        self._stopped.set()

    def close(self) -> None:
        """Stop waiting jobs and the driver process (the detached actors stay warm on the cluster)."""
        self._stopped.set()
        self._reset_driver(None)

    def echo(self, payload: object) -> object:
        """``payload`` sent to the node's driver process and back, without Ray (what the pipe hop costs)."""
        return self._driver().call("echo", payload)

    @property
    def driver_pid(self) -> int | None:
        """Process id of the node's Ray driver process, if one runs."""
        with self._lock:
            host = self._host
        return host.pid if host is not None and host.alive else None

    # ------------------------------------------------------------------ internals
    def _replica(self, task: str, replicas: int) -> int:
        with self._lock:
            n = self._next.get(task, 0)
            self._next[task] = n + 1
        return n % replicas

    def _driver(self) -> DriverProcess:
        """The node's one driver process, started (again) when there is none alive."""
        with self._lock:
            if self._host is None or not self._host.alive:
                old, self._host = self._host, None
                if old is not None:
                    old.close(0.5)
                self._host = DriverProcess(self.ex.address or "", self.ex.namespace, self.cfg.node.workers + 1)
            return self._host

    def _reset_driver(self, host: DriverProcess | None) -> None:
        """End ``host`` if it is still the current driver (``None``: whichever is current)."""
        with self._lock:
            current = self._host
            if current is None or (host is not None and host is not current):
                return
            self._host = None
        current.close()

    def _set_waiting(self, delta: int, reason: str) -> None:
        with self._lock:
            self._waiting += delta
            n = self._waiting
        if delta > 0:
            log.warning("execution engine unreachable (%s); job waits and retries every %.0f s", reason,
                        self.ex.retry_wait_s)
        else:
            log.info("execution engine reachable again")
        if self._gauge is not None:
            self._gauge.set(n)  # type: ignore[attr-defined]
        self._write_state(reason if n else "")

    def _write_state(self, reason: str = "") -> None:
        state = {"engine": "ray", "address": self.ex.address, "waiting_jobs": self._waiting,
                 "state": WAITING if self._waiting else "connected", "reason": reason, "updated_at": time.time()}
        try:
            storage = Path(self.cfg.node.storage_dir)
            storage.mkdir(parents=True, exist_ok=True)
            atomic_write_text(storage / STATE_FILE, json.dumps(state))
        except OSError as exc:
            log.warning("cannot write %s: %s", STATE_FILE, exc)


class _Attempts:
    """The job's attempt counter while it waits: given back on entering a wait, counted again on the next send.

    ``job_id`` None (no job behind the call, e.g. the benchmark) makes both no-ops.
    """

    def __init__(self, storage_dir: Path, job_id: object) -> None:
        self.db = store.db_path(Path(storage_dir)) if isinstance(job_id, int) else None
        self.job_id = job_id if isinstance(job_id, int) else -1
        self.refunded = False

    def _add(self, delta: int) -> bool:
        if self.db is None:
            return False
        try:
            store.JobsRepo(store.thread_connection(self.db)).add_attempts(self.job_id, delta)
        except sqlite3.Error as exc:
            log.warning("job %d: attempt count not adjusted (%+d): %s", self.job_id, delta, exc)
            return False
        return True

    def refund(self) -> None:
        """The job only waits for the cluster: its claim's attempt does not count."""
        if not self.refunded and self._add(-1):
            self.refunded = True

    def charge(self) -> None:
        """The job is sent to an actor (or handed back to the pool): count its attempt again."""
        if self.refunded and self._add(+1):
            self.refunded = False


def _reachable(address: str) -> None:
    """Raise :class:`driver.EngineDown` unless the head's GCS port accepts a TCP connection (2 s).

    ``ray.init`` against a dead address retries for minutes; this makes the wait visible at once.
    """
    import socket

    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=2.0):
            return
    except (OSError, ValueError) as exc:
        raise driver.EngineDown(f"Ray head {address} not reachable: {exc}") from None


_GAUGE: list[object] = []


def _waiting_gauge() -> object | None:
    """``dicomnode_execution_waiting`` in the node's metrics registry (jobs waiting for the cluster)."""
    from prometheus_client import Gauge

    from dicomnode.metrics import default_metrics

    with _GAUGE_LOCK:
        if not _GAUGE:
            try:
                _GAUGE.append(Gauge("dicomnode_execution_waiting", "Jobs waiting for the execution engine "
                                    "(Ray cluster unreachable)", registry=default_metrics().registry))
            except ValueError:
                log.warning("metric dicomnode_execution_waiting already registered; not exported")
                return None
        return _GAUGE[0]


_GAUGE_LOCK = threading.Lock()
