"""Assembler: quiet period, early completion on release, late arrivals re-open, no-route studies, retention."""

from __future__ import annotations

import io
import time
from pathlib import Path

from pydicom.uid import generate_uid

from dicomnode.assembler import Assembler
from dicomnode.config import Config
from dicomnode.jobs import JobQueue
from dicomnode.spool import Spool
from tests.plugins.bone_test_task import dx_dataset


def _cfg(tmp_path: Path, quiet: float = 1.0) -> Config:
    return Config.model_validate({
        "node": {"storage_dir": str(tmp_path / "var"), "disk_min_free_gb": 0, "retention_days": 1},
        "routes": [
            {"name": "wrist", "task": "test_task", "match": {"modality": ["DX"], "body_part": ["WRIST"]},
             "complete_after_s": quiet},
            {"name": "wrist-slow", "task": "test_task", "match": {"body_part": ["WRIST"]}, "complete_after_s": 30},
        ],
    })


def _setup(tmp_path: Path, quiet: float = 1.0) -> tuple[Spool, JobQueue, Assembler]:
    cfg = _cfg(tmp_path, quiet)
    spool = Spool(cfg.node.storage_dir, 0)
    queue = JobQueue(spool.db_path)
    return spool, queue, Assembler(cfg, spool, queue, poll_s=0.1)


def _store(spool: Spool, study: str, series: str, i: int, assoc: str | None = None, **kw: str) -> None:
    buf = io.BytesIO()
    dx_dataset(study, series, i, **kw).save_as(buf, enforce_file_format=True)
    spool.store(buf.getvalue(), assoc_id=assoc)


def test_quiet_period_uses_smallest_matching_route(tmp_path: Path) -> None:
    spool, queue, asm = _setup(tmp_path)
    study, s1, s2 = generate_uid(), generate_uid(), generate_uid()
    for i in range(2):
        _store(spool, study, s1, i)
        _store(spool, study, s2, i)
    now = time.time()
    assert asm.poll_once(now) == []
    assert asm.study(study).state == "receiving"  # type: ignore[union-attr]
    assert asm.poll_once(now + 1.5) == [study]  # 1 s route wins over the 30 s one
    jobs = {j.route: j for j in queue.list()}
    assert set(jobs) == {"wrist", "wrist-slow"}
    assert set(jobs["wrist"].series_uids) == {s1, s2} and jobs["wrist"].generation == 1
    assert asm.study(study).state == "complete"  # type: ignore[union-attr]
    assert asm.poll_once(now + 5) == []  # nothing new: no second enqueue
    assert len(queue.list()) == 2


def test_completing_a_study_tells_the_workers(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path)
    spool = Spool(cfg.node.storage_dir, 0)
    queue = JobQueue(spool.db_path)
    calls: list[int] = []
    asm = Assembler(cfg, spool, queue, poll_s=0.1, on_enqueue=lambda: calls.append(len(queue.list())))
    study = generate_uid()
    _store(spool, study, generate_uid(), 0)
    now = time.time()
    assert asm.poll_once(now) == [] and calls == []
    assert asm.poll_once(now + 1.5) == [study]
    assert calls == [2]  # called once, after both routes' jobs were committed


def test_release_with_expected_counts_completes_early(tmp_path: Path) -> None:
    spool, queue, asm = _setup(tmp_path, quiet=60.0)
    study, s1 = generate_uid(), generate_uid()
    spool.open_association("a1", "ORTHANC", "127.0.0.1")
    _store(spool, study, s1, 0, assoc="a1")
    _store(spool, study, s1, 1, assoc="a1")
    assert asm.poll_once() == []  # association still open, quiet period 60 s
    spool.release_association("a1")
    assert asm.poll_once() == [study]
    assert len(queue.list()) == 2


def test_wake_runs_a_pass_before_the_next_poll(tmp_path: Path) -> None:
    """The in-process SCP wakes the assembler on release: with a 30 s poll the study still completes at once."""
    cfg = _cfg(tmp_path, quiet=60.0)
    spool = Spool(cfg.node.storage_dir, 0)
    queue = JobQueue(spool.db_path)
    asm = Assembler(cfg, spool, queue, poll_s=30.0).start()
    try:
        time.sleep(0.5)  # the thread's first pass (empty spool) is done; it now waits for its 30 s poll
        study, s1 = generate_uid(), generate_uid()
        spool.open_association("a1", "ORTHANC", "127.0.0.1")
        _store(spool, study, s1, 0, assoc="a1")
        _store(spool, study, s1, 1, assoc="a1")
        spool.release_association("a1")
        time.sleep(0.3)
        assert not queue.list()  # nobody looked yet
        asm.wake()
        deadline = time.monotonic() + 5
        while not queue.list() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(queue.list()) == 2
    finally:
        t0 = time.monotonic()
        asm.stop()
        assert time.monotonic() - t0 < 5  # stop does not wait for the poll either


def test_aborted_association_waits_for_quiet_period(tmp_path: Path) -> None:
    spool, queue, asm = _setup(tmp_path, quiet=60.0)
    study = generate_uid()
    spool.open_association("a1", "ORTHANC", "127.0.0.1")
    _store(spool, study, generate_uid(), 0, assoc="a1")
    spool.abort_association("a1")
    assert asm.poll_once() == []
    assert queue.list() == []


def test_late_instance_reopens_with_next_generation(tmp_path: Path) -> None:
    spool, queue, asm = _setup(tmp_path)
    study, s1 = generate_uid(), generate_uid()
    _store(spool, study, s1, 0)
    assert asm.poll_once(time.time() + 2) == [study]
    time.sleep(0.01)
    _store(spool, study, s1, 1)
    assert asm.poll_once(time.time()) == []
    st = asm.study(study)
    assert st is not None and st.state == "receiving" and st.generation == 2
    assert asm.poll_once(time.time() + 2) == [study]
    gens = sorted(j.generation for j in queue.list() if j.route == "wrist")
    assert gens == [1, 2]


def test_unrouted_study_is_recorded_and_purged_after_retention(tmp_path: Path) -> None:
    spool, queue, asm = _setup(tmp_path, quiet=1.0)
    study, s1 = generate_uid(), generate_uid()
    _store(spool, study, s1, 0, body_part="SKULL", modality="CR")
    now = time.time()
    assert asm.poll_once(now) == []
    assert asm.poll_once(now + 1.5) == [study]  # unrouted series wait for the smallest quiet period (1 s)
    st = asm.study(study)
    assert st is not None and st.state == "no_route" and st.no_route_series == [s1]
    assert queue.list() == []
    assert asm.purge_expired(now + 3600) == 0  # retention is one day
    assert asm.purge_expired(now + 2 * 86400) == 1
    assert spool.series_records(study) == [] and not (spool.root / study).exists()


def test_quiet_period_waits_while_a_journal_holds_acknowledged_instances(tmp_path: Path) -> None:
    """Instances acknowledged but still in a receiver's journal keep a quiet study open."""
    spool, queue, asm = _setup(tmp_path)
    study, series = generate_uid(), generate_uid()
    _store(spool, study, series, 0)
    spool.set_journal_backlog("0.bin", 3)
    later = time.time() + 2.0
    assert asm.poll_once(later) == []
    assert asm.study(study).state == "receiving"  # type: ignore[union-attr]
    spool.set_journal_backlog("0.bin", 0)
    assert asm.poll_once(later) == [study]
