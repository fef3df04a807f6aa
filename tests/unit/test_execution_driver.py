"""The node's one Ray driver process: shared by many threads, and it dies with the node (no Ray cluster needed)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from dicomnode.execution import driver
from dicomnode.execution.host import DriverProcess

REPO = Path(__file__).resolve().parents[2]


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def test_one_process_serves_many_threads_at_once() -> None:
    host = DriverProcess("127.0.0.1:1", "test", threads=4)
    try:
        pid = host.pid
        assert pid is not None and host.alive
        errors: list[str] = []
        big = np.arange(2**18, dtype=np.uint16)  # 512 KiB, like a radiograph's pixels

        def caller(k: int) -> None:
            for i in range(15):
                payload = (k, i, big if i % 5 == 0 else None)
                back = host.call("echo", payload)
                if back[:2] != (k, i) or (back[2] is not None and not np.array_equal(back[2], big)):
                    errors.append(f"thread {k} call {i} got {back[:2]}")

        threads = [threading.Thread(target=caller, args=(k,)) for k in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not errors and not any(t.is_alive() for t in threads)
        assert host.pid == pid  # every call went through the one child process
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while host.alive and time.monotonic() < deadline:
            time.sleep(0.05)
        with pytest.raises(driver.EngineDown):
            host.call("echo", 1)
    finally:
        host.close()


def test_driver_process_dies_with_the_node() -> None:
    """kill -9 of the process that started the driver takes the driver with it at once: no orphan."""
    code = ("import sys, time; from dicomnode.execution.host import DriverProcess;"
            "h = DriverProcess('127.0.0.1:1', 'test', 2); h.call('echo', 0); print(h.pid, flush=True); time.sleep(600)")
    node = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        line = node.stdout.readline()  # type: ignore[union-attr]
        assert line.strip().isdigit(), line
        child = int(line)
        assert _alive(child)
        node.kill()
        node.wait(10)
        deadline = time.monotonic() + 10
        while _alive(child) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(child), f"driver process {child} outlived the node"
    finally:
        if node.poll() is None:
            node.kill()
