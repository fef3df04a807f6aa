"""Durable job queue: idempotent enqueue, atomic claim, retry with backoff, dead, crash recovery, worker pool."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from dicomnode.jobs import Job, JobQueue, WorkerPool


def _queue(tmp_path: Path, **kw: float) -> JobQueue:
    return JobQueue(tmp_path / "node.db", **kw)


def test_enqueue_is_idempotent_per_generation(tmp_path: Path) -> None:
    q = _queue(tmp_path)
    assert q.enqueue("1.2.3", "r", "t", ["1.2.3.4"]) is not None
    assert q.enqueue("1.2.3", "r", "t", ["1.2.3.4"]) is None
    assert q.enqueue("1.2.3", "r", "t", ["1.2.3.4"], generation=2) is not None
    assert q.counts() == {"pending": 2}


def test_claim_is_exclusive_across_threads(tmp_path: Path) -> None:
    q = _queue(tmp_path)
    for i in range(20):
        q.enqueue(f"1.2.{i}", "r", "t", ["9"])
    claimed: list[int] = []
    lock = threading.Lock()

    def grab() -> None:
        while (job := q.claim()) is not None:
            with lock:
                claimed.append(job.id)

    threads = [threading.Thread(target=grab) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(claimed) == sorted(set(claimed)) and len(claimed) == 20
    assert q.counts() == {"running": 20}


def test_failure_backs_off_then_dies_with_reason(tmp_path: Path) -> None:
    q = _queue(tmp_path, max_attempts=3, backoff_initial_s=10.0, backoff_max_s=15.0)
    jid = q.enqueue("1.2.3", "r", "t", ["4"])
    job = q.claim()
    assert job is not None and job.attempts == 1
    before = time.time()
    assert q.mark_failed(jid, "boom 1") == "pending"
    assert q.claim() is None  # not due yet
    j = q.get(jid)
    assert j is not None and j.next_attempt_at >= before + 10.0 and j.last_error == "boom 1"
    assert q.claim(now=time.time() + 11) is not None
    assert q.mark_failed(jid, "boom 2") == "pending"
    j = q.get(jid)
    assert j is not None and j.next_attempt_at <= time.time() + 15.0 + 1  # capped at backoff_max_s
    assert q.claim(now=time.time() + 16) is not None
    assert q.mark_failed(jid, "boom 3") == "dead"
    j = q.get(jid)
    assert j is not None and j.state == "dead" and j.attempts == 3 and j.last_error == "boom 3"


def test_permanent_failure_is_dead_at_once(tmp_path: Path) -> None:
    q = _queue(tmp_path)
    jid = q.enqueue("1.2.3", "r", "t", ["4"])
    q.claim()
    assert q.mark_failed(jid, "route gone", permanent=True) == "dead"


def test_recover_returns_running_jobs_after_a_crash(tmp_path: Path) -> None:
    q = _queue(tmp_path)
    q.enqueue("1.2.3", "r", "t", ["4"])
    assert q.claim() is not None
    # a new process opens the same database
    q2 = JobQueue(tmp_path / "node.db")
    assert q2.claim() is None
    assert q2.recover() == 1
    job = q2.claim()
    assert job is not None and job.attempts == 2


def test_worker_pool_runs_marks_done_and_records_failures(tmp_path: Path) -> None:
    q = _queue(tmp_path, max_attempts=1)
    ok = q.enqueue("1.2.1", "r", "t", ["4"])
    bad = q.enqueue("1.2.2", "r", "t", ["4"])
    seen: list[str] = []

    def handler(job: Job) -> None:
        seen.append(threading.current_thread().name)
        if job.study_uid == "1.2.2":
            raise RuntimeError("model exploded")
        q.mark_done(job.id, timings={"task": 0.1})

    pool = WorkerPool(q, handler, n_workers=2, poll_s=0.05).start()
    deadline = time.time() + 10
    while time.time() < deadline and q.counts().get("pending", 0) + q.counts().get("running", 0):
        time.sleep(0.05)
    pool.stop()
    assert q.get(ok).state == "done"  # type: ignore[union-attr]
    dead = q.get(bad)
    assert dead is not None and dead.state == "dead" and "model exploded" in (dead.last_error or "")
    assert all(n.startswith("worker-") for n in seen)


def test_stop_returns_in_flight_job_to_pending(tmp_path: Path) -> None:
    q = _queue(tmp_path)
    jid = q.enqueue("1.2.1", "r", "t", ["4"])
    started, release = threading.Event(), threading.Event()

    def handler(job: Job) -> None:
        started.set()
        release.wait(5)

    pool = WorkerPool(q, handler, poll_s=0.05).start()
    assert started.wait(5)
    pool.stop(timeout_s=0.2)
    j = q.get(jid)
    assert j is not None and j.state == "pending" and j.attempts == 0
    release.set()


def test_wake_starts_an_idle_worker_before_its_next_poll(tmp_path: Path) -> None:
    """With a 30 s poll, a job enqueued after the workers went idle runs as soon as wake() is called."""
    q = _queue(tmp_path)
    done = threading.Event()

    def handler(job: Job) -> None:
        q.mark_done(job.id, timings={})
        done.set()

    pool = WorkerPool(q, handler, n_workers=2, poll_s=30.0).start()
    try:
        time.sleep(0.3)  # both workers found nothing and are waiting
        q.enqueue("1.2.9", "r", "t", ["4"])
        assert not done.wait(0.5)  # no wake: the job waits for the next poll
        t0 = time.monotonic()
        pool.wake()
        assert done.wait(5) and time.monotonic() - t0 < 2.0
    finally:
        t0 = time.monotonic()
        pool.stop()
        assert time.monotonic() - t0 < 5.0  # stop wakes idle workers too
