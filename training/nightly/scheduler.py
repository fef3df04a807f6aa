"""``dicomnode-train schedule --config FILE [--once TASK | --list]``: the nightly retraining scheduler.

One apscheduler job per configured task, on its cron expression (local time;
5 fields, or 6 with seconds first). Jobs run on a single worker thread, so runs
never overlap (not even of different tasks: they share the GPU), and each job
has ``max_instances=1``, ``coalesce=True`` and a ``misfire_grace_time``.

apscheduler's memory job store forgets runs missed while the process was down,
so the scheduler keeps the start time of each task's last run in
``<registry>/.nightly/state.json``; at start-up a task whose cron fired (once
or many times) since then, within the misfire grace time, gets exactly one
catch-up run.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable
from typing import Any

from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.schedulers.base import BaseScheduler
from apscheduler.schedulers.blocking import BlockingScheduler
from apscheduler.triggers.cron import CronTrigger

from inference.errors import DicomNodeError
from inference.fsutil import atomic_write_text
from training.nightly.config import NightlyConfig, NightlyConfigError, cron_trigger, load_nightly_config
from training.nightly.distributed import inside_torchrun, launch, terminate_all

log = logging.getLogger(__name__)

__all__ = ["NightlyScheduler", "add_arguments", "cron_trigger", "load_plugins", "missed_runs", "run", "run_once"]

Runner = Callable[[NightlyConfig, str], Any]
STATE = "state.json"


def missed_runs(trigger: CronTrigger, last: _dt.datetime, now: _dt.datetime, limit: int = 1000) -> int:
    """How many times ``trigger`` fired in (last, now] (capped at ``limit``)."""
    n, t = 0, trigger.get_next_fire_time(None, last + _dt.timedelta(microseconds=1))
    while t is not None and t <= now and n < limit:
        n += 1
        t = trigger.get_next_fire_time(t, t + _dt.timedelta(microseconds=1))
    return n


def load_plugins(cfg: NightlyConfig) -> None:
    """Import ``cfg.plugins`` (modules registering site task adapters)."""
    import importlib

    for name in cfg.plugins:
        try:
            importlib.import_module(name)
        except ImportError as exc:
            raise NightlyConfigError(f"plugin module {name!r} cannot be imported: {exc}; fix 'plugins' in the "
                                     "nightly config or PYTHONPATH") from exc


def run_once(cfg: NightlyConfig, task: str, stamp: str | None = None) -> Any:
    """One nightly run of ``task``: in this process, or under torchrun when ``distributed`` asks for more."""
    load_plugins(cfg)
    if cfg.distributed_for(task).enabled and not inside_torchrun():
        return launch(cfg, task, stamp=stamp)
    from training.nightly.job import run_task

    return run_task(cfg, task, stamp=stamp)


def _default_runner(cfg: NightlyConfig, task: str) -> Any:
    return run_once(cfg, task)


class NightlyScheduler:
    """apscheduler set-up for every task in a :class:`NightlyConfig`.

    Parameters
    ----------
    runner:
        ``runner(cfg, task)`` runs one job (default :func:`training.nightly.job.run_task`).
    blocking:
        BlockingScheduler (the CLI) or BackgroundScheduler (tests, embedding).
    """

    def __init__(self, cfg: NightlyConfig, *, runner: Runner | None = None, blocking: bool = False) -> None:
        self.cfg = cfg
        self.runner = runner or _default_runner
        self.state_path = cfg.registry_dir / ".nightly" / STATE
        self._state_lock = threading.Lock()
        kind = BlockingScheduler if blocking else BackgroundScheduler
        self.scheduler: BaseScheduler = kind(executors={"default": ThreadPoolExecutor(max_workers=1)},
                                             job_defaults={"coalesce": True, "max_instances": 1,
                                                           "misfire_grace_time": cfg.misfire_grace_time_s})
        self.running = 0
        for task, sched in cfg.tasks.items():
            self.scheduler.add_job(self._job, cron_trigger(sched.cron), args=[task], id=task, name=f"nightly {task}",
                                   coalesce=True, max_instances=1, misfire_grace_time=cfg.misfire_grace_time_s,
                                   replace_existing=True)

    def _load_state(self) -> dict[str, float]:
        try:
            return {k: float(v) for k, v in json.loads(self.state_path.read_text(encoding="utf-8")).items()}
        except (OSError, ValueError, AttributeError):
            return {}

    def _save_state(self, task: str, when: float) -> None:
        with self._state_lock:
            state = self._load_state()
            state[task] = when
            self.state_path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.state_path, json.dumps(state))

    def _job(self, task: str) -> Any:
        self.running += 1
        try:
            self._save_state(task, _dt.datetime.now().timestamp())
            return self.runner(self.cfg, task)
        except Exception:  # noqa: BLE001 - one failed run must not stop the scheduler
            log.exception("nightly job %s failed", task)
            return None
        finally:
            self.running -= 1

    def catch_up(self, now: _dt.datetime | None = None) -> list[str]:
        """Schedule one immediate run for each task that missed runs while the scheduler was down."""
        state = self._load_state()
        tz = self.scheduler.timezone
        now = now or _dt.datetime.now(tz)
        due = []
        for task, sched in self.cfg.tasks.items():
            if task not in state:
                continue
            trigger = cron_trigger(sched.cron, tz)
            last = _dt.datetime.fromtimestamp(state[task], tz)
            n = missed_runs(trigger, last, now)
            if n == 0:
                continue
            latest = last
            t = trigger.get_next_fire_time(None, last + _dt.timedelta(microseconds=1))
            while t is not None and t <= now:
                latest, t = t, trigger.get_next_fire_time(t, t + _dt.timedelta(microseconds=1))
            if (now - latest).total_seconds() > self.cfg.misfire_grace_time_s:
                log.warning("task %s missed %d run(s), the last beyond the misfire grace time; waiting for the next",
                            task, n)
                continue
            log.info("task %s missed %d run(s) while down: one catch-up run (coalesced)", task, n)
            self.scheduler.add_job(self._job, args=[task], id=f"{task}-catch-up", replace_existing=True,
                                   next_run_time=now)
            due.append(task)
        return due

    def start(self) -> None:
        """Start the scheduler (blocks for a BlockingScheduler); catch-up runs are queued first."""
        if not self.scheduler.running and isinstance(self.scheduler, BackgroundScheduler):
            self.scheduler.start()
            self.catch_up()
            return
        self.catch_up()
        self.scheduler.start()

    def shutdown(self, wait: bool = False) -> None:
        """Stop scheduling (a running job is abandoned if ``wait`` is False)."""
        if self.scheduler.running:
            self.scheduler.shutdown(wait=wait)

    def next_runs(self) -> dict[str, str]:
        """Task -> next fire time (ISO) of each scheduled job."""
        out = {}
        now = _dt.datetime.now(self.scheduler.timezone)
        for task, sched in self.cfg.tasks.items():
            t = cron_trigger(sched.cron, self.scheduler.timezone).get_next_fire_time(None, now)
            out[task] = t.isoformat() if t else "never"
        return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of ``dicomnode-train schedule``."""
    p.add_argument("--config", required=True, help="nightly YAML (see training/nightly/config.py)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--once", metavar="TASK", help="run TASK's job now, print the decision and exit")
    g.add_argument("--list", action="store_true", help="print each task's next run time and exit")
    p.add_argument("--stamp", help="with --once: the run folder's name (default: the start time)")


def run(args: argparse.Namespace) -> int:
    """Run the scheduler in the foreground (SIGTERM/SIGINT stop it); ``--once`` exits 0 unless the run failed."""
    try:
        cfg = load_nightly_config(args.config)
        load_plugins(cfg)
    except DicomNodeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.once:
        if args.once not in cfg.tasks:
            log.warning("task %s has no schedule in %s; using the defaults", args.once, args.config)
        outcome = run_once(cfg, args.once, args.stamp)
        if outcome.status == "worker":  # a non-zero torchrun rank; rank 0 prints the decision
            print(f"{args.once}: {outcome.reason}")
            return 0
        print(f"{args.once}: {outcome.status} ({outcome.reason}); report: {outcome.run_dir / 'report.md'}")
        return 1 if outcome.status in ("failed", "interrupted") else 0
    ns = NightlyScheduler(cfg, blocking=True)
    if args.list:
        for task, when in ns.next_runs().items():
            print(f"{task}: next run {when}")
        return 0
    if not cfg.tasks:
        print("error: no tasks configured", file=sys.stderr)
        return 2

    def _stop(signum: int, _frame: Any) -> None:
        log.info("signal %d: stopping the scheduler", signum)
        ns.shutdown(wait=False)
        terminate_all()  # a torchrun run ends with it (it promotes nothing unless it finished)

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    for task, when in ns.next_runs().items():
        log.info("task %s: next run %s", task, when)
    ns.start()
    if ns.running:
        # a training run is still going: abandon it; it promotes nothing, so the registry stays as it was
        log.warning("abandoning a running nightly job; the registry is unchanged")
        logging.shutdown()
        os._exit(0)
    return 0
