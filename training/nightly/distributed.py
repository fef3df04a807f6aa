"""A nightly run under torchrun: DDP on several processes of this machine, or on several machines.

With ``distributed`` configured (more than one process), the scheduler does not
train in its own process: it writes the resolved config next to the registry
and starts ``torchrun ... -m training.cli schedule --config <it> --once TASK``.
Inside torchrun every rank runs :func:`training.nightly.job.run_task`: rank 0
leads (intake, split, evaluation, gate, promotion) and hands the training plan
to the other ranks, which train with it under DDP and write nothing. Rank 0's
``report.json`` becomes this run's outcome.

On several machines each one runs the scheduler with the same config except
``distributed.node_rank``; the same cron fires on all of them and torchrun's
rendezvous at ``rdzv_endpoint`` (the rank-0 machine) joins them.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import threading
import time
from pathlib import Path

import yaml

from training.distributed_launch import torchrun_prefix
from training.nightly.config import DistributedSpec, NightlyConfig
from training.nightly.job import RunOutcome

log = logging.getLogger(__name__)

__all__ = ["inside_torchrun", "launch", "terminate_all"]

_ACTIVE: set[subprocess.Popen[bytes]] = set()
_ACTIVE_LOCK = threading.Lock()


def inside_torchrun() -> bool:
    """Whether this process is one of torchrun's ranks (then it never launches torchrun again)."""
    return "LOCAL_RANK" in os.environ


def command(spec: DistributedSpec, config_path: Path, task: str, stamp: str) -> list[str]:
    """The torchrun command line of one nightly run."""
    host, _, port = (spec.rdzv_endpoint or "127.0.0.1:29500").rpartition(":")
    return [*torchrun_prefix(spec.nproc_per_node, spec.nnodes, spec.node_rank, host, int(port)),
            "-m", "training.cli", "schedule", "--config", str(config_path), "--once", task, "--stamp", stamp]


def launch(cfg: NightlyConfig, task: str, *, stamp: str | None = None) -> RunOutcome:
    """Run ``task``'s nightly job under torchrun and return rank 0's outcome (``worker`` on other machines)."""
    spec = cfg.distributed_for(task)
    stamp = stamp or time.strftime("%Y%m%dT%H%M%S")
    work = cfg.registry_dir / ".nightly"
    work.mkdir(parents=True, exist_ok=True)
    config_path = work / f"torchrun-{task}-{stamp}.yaml"
    config_path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")), encoding="utf-8")
    cmd = command(spec, config_path, task, stamp)
    log.info("nightly %s: %d process(es) x %d machine(s) under torchrun: %s", task, spec.nproc_per_node,
             spec.nnodes, " ".join(cmd))
    try:
        proc = subprocess.Popen(cmd)
        with _ACTIVE_LOCK:
            _ACTIVE.add(proc)
        try:
            code = proc.wait()
        finally:
            with _ACTIVE_LOCK:
                _ACTIVE.discard(proc)
    finally:
        config_path.unlink(missing_ok=True)
    runs = cfg.registry_dir / task / "runs"
    if spec.node_rank > 0:
        return RunOutcome(task, "worker", f"machine {spec.node_rank} of {spec.nnodes}: torchrun exited {code}", runs)
    return _outcome(task, runs / stamp, code)


def _outcome(task: str, run_dir: Path, code: int) -> RunOutcome:
    """Rank 0's outcome from its report (``failed`` when torchrun ended without one)."""
    try:
        report = json.loads((run_dir / "report.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return RunOutcome(task, "failed", f"torchrun exited {code} without a report; the registry is unchanged",
                          run_dir)
    outcome = RunOutcome(task, str(report.get("status")), str(report.get("reason")), run_dir, report.get("version"))
    if code != 0 and outcome.status not in ("failed", "interrupted"):
        outcome.status, outcome.reason = "failed", f"torchrun exited {code} after: {outcome.reason}"
    return outcome


def terminate_all(timeout_s: float = 30.0) -> None:
    """SIGTERM every torchrun started here (it passes the signal to its ranks) and wait for them."""
    with _ACTIVE_LOCK:
        procs = list(_ACTIVE)
    for p in procs:
        if p.poll() is None:
            p.terminate()
    for p in procs:
        try:
            p.wait(timeout_s)
        except subprocess.TimeoutExpired:
            p.kill()
