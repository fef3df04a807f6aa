"""Nightly scheduler: fires on a seconds schedule, never overlaps, coalesces missed runs into one catch-up run."""

from __future__ import annotations

import datetime as dt
import threading
import time
from pathlib import Path

import pytest

from training.nightly.config import NightlyConfig, NightlyConfigError, TaskSchedule, load_nightly_config
from training.nightly.scheduler import NightlyScheduler, cron_trigger, missed_runs


def _cfg(tmp_path: Path, cron: str = "* * * * * *", grace: int = 3600, **tasks: TaskSchedule) -> NightlyConfig:
    return NightlyConfig(registry_dir=tmp_path / "models", archive_dir=tmp_path / "archive", key_dir=tmp_path / "keys",
                         incoming_labels_dir=tmp_path / "incoming", misfire_grace_time_s=grace,
                         tasks=tasks or {"toy_square": TaskSchedule(cron=cron)})


def test_fires_on_short_schedule_without_overlap(tmp_path: Path) -> None:
    starts: list[float] = []
    active, peak = [0], [0]
    lock = threading.Lock()

    def runner(cfg: NightlyConfig, task: str) -> None:
        with lock:
            starts.append(time.monotonic())
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        time.sleep(1.6)  # longer than the 1 s period: the next firings must not start a second instance
        with lock:
            active[0] -= 1

    ns = NightlyScheduler(_cfg(tmp_path), runner=runner)
    job = ns.scheduler.get_job("toy_square")
    assert job.coalesce is True and job.max_instances == 1 and job.misfire_grace_time == 3600
    ns.start()
    try:
        time.sleep(4.2)
    finally:
        ns.shutdown(wait=True)
    assert 2 <= len(starts) <= 3, starts  # fired repeatedly, but each run waited for the previous one
    assert peak[0] == 1
    assert all(b - a >= 1.5 for a, b in zip(starts, starts[1:], strict=False))
    assert (tmp_path / "models" / ".nightly" / "state.json").exists()


def test_two_tasks_share_one_worker(tmp_path: Path) -> None:
    active, peak = [0], [0]
    lock = threading.Lock()
    ran: list[str] = []

    def runner(cfg: NightlyConfig, task: str) -> None:
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
            ran.append(task)
        time.sleep(0.6)
        with lock:
            active[0] -= 1

    cfg = _cfg(tmp_path, a=TaskSchedule(cron="*/2 * * * * *"), b=TaskSchedule(cron="*/2 * * * * *"))
    ns = NightlyScheduler(cfg, runner=runner)
    ns.start()
    try:
        time.sleep(2.5)
    finally:
        ns.shutdown(wait=True)
    assert {"a", "b"} <= set(ran) and peak[0] == 1


def test_missed_runs_coalesce_into_one_catch_up(tmp_path: Path) -> None:
    tz = dt.UTC
    trig = cron_trigger("0 2 * * *", tz)
    last = dt.datetime(2026, 1, 1, 2, 0, 5, tzinfo=tz)
    now = dt.datetime(2026, 1, 4, 3, 0, tzinfo=tz)
    assert missed_runs(trig, last, now) == 3  # the machine was off for three nightly runs
    calls: list[str] = []
    cfg = _cfg(tmp_path, cron="0 2 * * *")
    ns = NightlyScheduler(cfg, runner=lambda c, t: calls.append(t))
    ns._save_state("toy_square", last.timestamp())
    ns.scheduler.configure(timezone=tz)
    due = ns.catch_up(now=now)
    assert due == ["toy_square"]
    catch = [j for j in ns.scheduler.get_jobs() if j.id.endswith("catch-up")]
    assert len(catch) == 1  # one run for the three missed ones
    # beyond the misfire grace time nothing is caught up; without missed runs nothing either
    assert NightlyScheduler(cfg, runner=lambda c, t: None).catch_up(now=now + dt.timedelta(days=1, hours=5)) == []
    assert ns.catch_up(now=last + dt.timedelta(hours=1)) == []


def test_catch_up_runs_once_when_started(tmp_path: Path) -> None:
    calls: list[str] = []
    cfg = _cfg(tmp_path, cron="0 2 * * *", grace=2 * 86400)
    ns = NightlyScheduler(cfg, runner=lambda c, t: calls.append(t))
    ns._save_state("toy_square", (dt.datetime.now() - dt.timedelta(days=2)).timestamp())
    ns.start()
    try:
        deadline = time.monotonic() + 5
        while not calls and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        ns.shutdown(wait=True)
    assert calls == ["toy_square"]


def test_config_validation(tmp_path: Path) -> None:
    (tmp_path / "n.yaml").write_text("registry_dir: m\narchive_dir: a\nkey_dir: k\nincoming_labels_dir: i\n"
                                     "tasks:\n  toy_square: {cron: '0 2 * * *', margin: 0.01}\n")
    cfg = load_nightly_config(tmp_path / "n.yaml")
    assert cfg.registry_dir == (tmp_path / "m").resolve() and cfg.tasks["toy_square"].mode == "fine_tune"
    assert TaskSchedule().cron == "0 2 * * *"
    for bad in ("tasks: {x: {cron: 'every night'}}", "tasks: {x: {epoch: 3}}", "bogus: 1"):
        (tmp_path / "b.yaml").write_text("registry_dir: m\narchive_dir: a\nkey_dir: k\nincoming_labels_dir: i\n" + bad)
        with pytest.raises(NightlyConfigError):
            load_nightly_config(tmp_path / "b.yaml")


def test_schedule_cli_list_and_bad_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from training.cli import main

    (tmp_path / "n.yaml").write_text("registry_dir: m\narchive_dir: a\nkey_dir: k\nincoming_labels_dir: i\n"
                                     "tasks:\n  toy_square: {cron: '30 3 * * *'}\n")
    assert main(["schedule", "--config", str(tmp_path / "n.yaml"), "--list"]) == 0
    out = capsys.readouterr().out
    assert "toy_square: next run" in out and "03:30:00" in out
    (tmp_path / "bad.yaml").write_text("registry_dir: m\n")
    assert main(["schedule", "--config", str(tmp_path / "bad.yaml")]) == 2
