"""The receive journal: durable append, ring reuse, replay after a crash, torn records."""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from dicomnode.errors import OutOfResourcesError
from dicomnode.journal import Journal, pending_records, replay


def _payloads(n: int, seed: int = 0) -> list[bytes]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, int(rng.integers(1, 300_000)), dtype=np.uint8).tobytes() for _ in range(n)]


def _drain(journal: Journal, got: list[bytes], events: list[tuple[str, object]] | None = None,
           delay_s: float = 0.0, apply_s: float = 0.0) -> tuple[threading.Thread, threading.Event]:
    stop = threading.Event()

    def apply(items: list[tuple[bytes, dict]]) -> None:
        time.sleep(apply_s)  # a spool slower than the receivers
        got.extend(payload for payload, _ in items)

    def run() -> None:
        time.sleep(delay_s)
        journal.run_materializer(apply,
                                 lambda kind, value: (events if events is not None else []).append((kind, value)),
                                 stop)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, stop


def _wait_idle(journal: Journal, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not journal.idle():
        assert time.monotonic() < deadline, "materializer did not drain the journal"
        time.sleep(0.01)


def test_records_are_applied_in_order_with_events_behind_them(tmp_path: Path) -> None:
    j = Journal(tmp_path / "0.bin", 8 << 20, defer_s=0.0)
    data = _payloads(20)
    got: list[bytes] = []
    events: list[tuple[str, object]] = []
    t, stop = _drain(j, got, events)
    for i, p in enumerate(data):
        assert j.append(p, {"i": i}) is not None
        if i == 9:
            j.post("release", "a1")
    _wait_idle(j)
    stop.set()
    t.join(5)
    j.close()
    assert got == data
    assert events == [("release", "a1")]


@pytest.mark.parametrize("sizes", ["equal", "random"])
def test_ring_wraps_without_overwriting_live_records(tmp_path: Path, sizes: str) -> None:
    """The materializer starts late, the ring fills and wraps: every payload still arrives intact, in order.

    Equal sizes make the wrapped write position meet the oldest live record exactly (a full ring
    that must not be mistaken for an empty one).
    """
    j = Journal(tmp_path / "0.bin", 2 << 20, wait_s=30, defer_s=0.0)
    rng = np.random.default_rng(1)
    data = ([rng.integers(0, 256, 100_000, dtype=np.uint8).tobytes() for _ in range(60)] if sizes == "equal"
            else _payloads(60, seed=1))
    got: list[bytes] = []
    t, stop = _drain(j, got, delay_s=0.3, apply_s=0.01)
    for p in data:
        j.append(p, {})
    _wait_idle(j)
    stop.set()
    t.join(5)
    j.close()
    assert [hashlib.sha1(p).hexdigest() for p in got] == [hashlib.sha1(p).hexdigest() for p in data]
    assert (tmp_path / "0.bin").stat().st_size <= 2 << 20


def test_replay_after_crash_applies_each_acknowledged_record_once(tmp_path: Path) -> None:
    data = _payloads(8, seed=2)
    j = Journal(tmp_path / "0.bin", 8 << 20)
    for i, p in enumerate(data):
        j.append(p, {"i": i})
    # crash: no materializer ran, nothing was closed
    got: list[tuple[bytes, int]] = []
    assert replay(tmp_path, lambda items: got.extend((p, m["i"]) for p, m in items), batch=3) == 8
    assert got == [(p, i) for i, p in enumerate(data)]
    assert replay(tmp_path, lambda items: got.extend((p, -1) for p, _ in items)) == 0
    # a journal opened afterwards continues the numbering and does not replay the old records
    j2 = Journal(tmp_path / "0.bin", 8 << 20)
    rec = j2.append(b"new", {"i": 99})
    assert rec is not None and rec.seq == 9
    records, top = pending_records(tmp_path / "0.bin")
    assert [r.meta["i"] for r in records] == [99] and top == 9


def test_torn_record_is_not_replayed(tmp_path: Path) -> None:
    j = Journal(tmp_path / "0.bin", 8 << 20)
    recs = [j.append(p, {"i": i}) for i, p in enumerate(_payloads(3, seed=3))]
    assert all(r is not None for r in recs)
    torn = recs[1]
    assert torn is not None
    with open(tmp_path / "0.bin", "r+b") as f:  # the payload of record 2 never reached the disk completely
        f.seek(torn.payload_offset + torn.payload_length // 2)
        f.write(b"\x00" * 4096)
    records, _ = pending_records(tmp_path / "0.bin")
    assert [r.meta["i"] for r in records] == [0, 2]


def test_oversized_record_is_refused_and_full_ring_times_out(tmp_path: Path) -> None:
    j = Journal(tmp_path / "0.bin", 1 << 20, wait_s=0.3)
    assert j.append(b"x" * (600 << 10), {}) is None  # more than half the ring: the caller stores it directly
    for _ in range(3):
        assert j.append(b"y" * (300 << 10), {}) is not None
    with pytest.raises(OutOfResourcesError, match="journal full"):
        j.append(b"z" * (300 << 10), {})  # nothing drains the ring
    j.close()


def test_prefill_allocates_the_ring_without_touching_records(tmp_path: Path) -> None:
    j = Journal(tmp_path / "0.bin", 4 << 20, defer_s=0.0)
    data = _payloads(3, seed=4)
    for p in data:
        j.append(p, {})
    stop = threading.Event()
    j.run_prefill(stop, idle_s=0.0, sync_every=1 << 20)
    assert j.prefilled() and (tmp_path / "0.bin").stat().st_size == 4 << 20
    records, _ = pending_records(tmp_path / "0.bin")
    assert [j.payload(r) for r in records] == data
    got: list[bytes] = []
    t, stop_m = _drain(j, got)
    _wait_idle(j)
    stop_m.set()
    t.join(5)
    assert got == data


def test_concurrent_writers_waiting_for_room_get_distinct_sequence_numbers(tmp_path: Path) -> None:
    """Several associations append into a full ring: each record keeps its own number and arrives once."""
    j = Journal(tmp_path / "0.bin", 1 << 20, wait_s=30, defer_s=0.0)
    got: list[bytes] = []
    t, stop = _drain(j, got, delay_s=0.2, apply_s=0.005)
    seqs: list[int] = []
    lock = threading.Lock()
    data = {w: [bytes([w]) * 100_000 + i.to_bytes(4, "big") for i in range(15)] for w in range(4)}

    def writer(w: int) -> None:
        for p in data[w]:
            rec = j.append(p, {"w": w})
            assert rec is not None
            with lock:
                seqs.append(rec.seq)

    _run_writers(j, writer, list(data), t, stop)
    assert len(seqs) == len(set(seqs)) == 60
    assert sorted(got) == sorted(p for ps in data.values() for p in ps)



def _run_writers(j: Journal, writer: Callable[[Any], None], args: list[Any], drain: threading.Thread,
                 stop: threading.Event) -> None:
    """Run ``writer(arg)`` in one thread per argument, wait for the journal to drain, then stop the drain."""
    threads = [threading.Thread(target=writer, args=(a,)) for a in args]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    _wait_idle(j)
    stop.set()
    drain.join(5)


def test_concurrent_appends_share_flushes_and_each_follows_one_started_after_its_write(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Group commit: fewer fdatasyncs than appends, yet every append returns only after a flush that began
    after its own write ended (so its record is durable before the caller answers success)."""
    import os

    j = Journal(tmp_path / "0.bin", 32 << 20, defer_s=0.0)
    syncs: list[tuple[float, float]] = []
    writes: dict[int, float] = {}
    real_sync, real_pwritev = os.fdatasync, os.pwritev

    def slow_sync(fd: int) -> None:
        t0 = time.monotonic()
        time.sleep(0.02)  # a device flush
        real_sync(fd)
        syncs.append((t0, time.monotonic()))

    def pwritev(fd: int, bufs: list, offset: int) -> int:
        n = real_pwritev(fd, bufs, offset)
        writes[threading.get_ident()] = time.monotonic()
        return n

    monkeypatch.setattr(os, "fdatasync", slow_sync)
    monkeypatch.setattr(os, "pwritev", pwritev)
    got: list[bytes] = []
    t, stop = _drain(j, got)
    checked: list[bool] = []
    lock = threading.Lock()

    def writer(seed: int) -> None:
        for p in _payloads(10, seed):
            assert j.append(p, {}) is not None
            done, wrote = time.monotonic(), writes[threading.get_ident()]
            ok = any(wrote <= s0 and s1 <= done for s0, s1 in list(syncs))
            with lock:
                checked.append(ok)

    _run_writers(j, writer, list(range(8)), t, stop)
    j.close()
    assert len(checked) == 80 and all(checked)
    assert len(syncs) < 60, len(syncs)  # 8 writers: flushes are shared (about 80 / 7 expected)
    assert len(got) == 80


def test_a_failed_group_flush_fails_the_appends_it_covered_and_later_ones_succeed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    j = Journal(tmp_path / "0.bin", 8 << 20, defer_s=0.0)
    real_sync = os.fdatasync
    calls = {"n": 0}

    def failing_once(fd: int) -> None:
        calls["n"] += 1
        if calls["n"] == 1:
            raise OSError(5, "Input/output error")
        real_sync(fd)

    monkeypatch.setattr(os, "fdatasync", failing_once)
    with pytest.raises(OutOfResourcesError, match="cannot write the journal"):
        j.append(b"x" * 1000, {"i": 0})
    assert j.backlog() == 0  # the failed record is not live (not replayed, not applied)
    assert j.append(b"y" * 1000, {"i": 1}) is not None
    j.close()
    records, _ = pending_records(tmp_path / "0.bin")
    # the acknowledged record is replayable (the refused one may be too: its sender was told to retry, and a
    # replayed copy of it is at worst a duplicate)
    assert 1 in [r.meta["i"] for r in records]


def test_lazy_payloads_are_copied_by_the_kernel_and_read_on_demand(tmp_path: Path) -> None:
    """``lazy_payloads``: the materializer hands JournalPayload objects; copy_to and bytes() give the record."""
    import os

    from dicomnode.journal import JournalPayload

    j = Journal(tmp_path / "0.bin", 8 << 20, defer_s=0.0)
    data = _payloads(12, seed=3)
    copied: list[bytes] = []
    stop = threading.Event()

    def apply(items: list[tuple[JournalPayload, dict]]) -> None:
        for payload, _ in items:
            assert isinstance(payload, JournalPayload) and len(payload) == payload.length
            out = tmp_path / f"out{len(copied)}"
            with open(out, "wb") as f:
                f.write(b"")  # the copy goes at the file's position
                payload.copy_to(f.fileno())
            assert out.read_bytes() == bytes(payload)
            copied.append(out.read_bytes())
            os.unlink(out)

    t = threading.Thread(target=j.run_materializer, args=(apply, lambda *_: None, stop),
                         kwargs={"lazy_payloads": True}, daemon=True)
    t.start()
    for p in data:
        assert j.append(p, {}) is not None
    _wait_idle(j)
    stop.set()
    t.join(5)
    j.close()
    assert copied == data
