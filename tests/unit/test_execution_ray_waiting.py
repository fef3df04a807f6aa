"""The Ray engine with no cluster: the job waits (metric + state file), never fails, and stops cleanly."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import pytest

from dicomnode.config import Config
from dicomnode.metrics import default_metrics
from inference.tasks import TaskContext
from tests.plugins.bone_test_task import dx_dataset

pytest.importorskip("ray", reason="the [cluster] extra (ray) is not installed")


def test_unreachable_cluster_makes_the_job_wait(tmp_path: Path) -> None:
    from dicomnode.execution.ray_engine import EngineStopped, RayEngine, read_state

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here
    cfg = Config.model_validate({"node": {"storage_dir": str(tmp_path)}, "routes": [{"name": "r", "task": "t"}],
                                 "execution": {"engine": "ray", "address": f"127.0.0.1:{port}",
                                               "retry_wait_s": 0.5}})
    engine = RayEngine(cfg)
    outcome: list[BaseException] = []

    def job() -> None:
        try:
            engine.run_task([dx_dataset("1.2", "1.2.3", 0)], "t", TaskContext(device="cpu"))
        except BaseException as exc:  # noqa: BLE001 - recorded for the assertion
            outcome.append(exc)

    t = threading.Thread(target=job, daemon=True)
    t.start()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and read_state(tmp_path).get("waiting_jobs") != 1:
        time.sleep(0.2)
    state = read_state(tmp_path)
    assert state["state"] == "waiting for execution engine" and state["waiting_jobs"] == 1
    assert b"dicomnode_execution_waiting 1.0" in default_metrics().exposition()
    assert t.is_alive() and not outcome  # waiting, not failed
    engine.close()
    t.join(60)
    assert len(outcome) == 1 and isinstance(outcome[0], EngineStopped)
    assert not getattr(outcome[0], "permanent", False)
    assert read_state(tmp_path)["waiting_jobs"] == 0
    assert b"dicomnode_execution_waiting 0.0" in default_metrics().exposition()
