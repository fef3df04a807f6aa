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


def _dead_address() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"  # nothing listens here


def _job_failures() -> float:
    value = default_metrics().registry.get_sample_value("dicomnode_jobs_finished_total",
                                                        {"task": "test_task", "outcome": "failed"})
    return value or 0.0


def test_waiting_and_shutdown_never_use_up_attempts(tmp_path: Path) -> None:
    """A job that only waits for the cluster keeps its attempts, across more node restarts than max_attempts."""
    import io

    import tests.plugins.bone_test_task  # noqa: F401 - registers test_task
    from dicomnode.execution.ray_engine import read_state
    from dicomnode.service import Node

    storage = tmp_path / "var"
    cfg = Config.model_validate({
        "node": {"storage_dir": str(storage), "disk_min_free_gb": 0, "workers": 1},
        "destinations": {"pacs": {"ae_title": "PACS", "host": "127.0.0.1", "port": 1}},
        "routes": [{"name": "wrist", "task": "test_task", "match": {"modality": ["DX"]}, "complete_after_s": 0.5,
                    "send_to": ["pacs"]}],
        "execution": {"engine": "ray", "address": _dead_address(), "retry_wait_s": 0.3}})
    node = Node(cfg, poll_s=0.1)
    for i in range(2):
        buf = io.BytesIO()
        dx_dataset("1.2.826.0.1.3", "1.2.826.0.1.3.1", i).save_as(buf, enforce_file_format=True)
        node.spool.store(buf.getvalue(), assoc_id=None)
    failures = _job_failures()
    for cycle in range(node.queue.max_attempts + 2):
        node = Node(cfg, poll_s=0.1).start()
        try:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and read_state(storage).get("waiting_jobs") != 1:
                time.sleep(0.1)
            [job] = node.queue.list()
            # waiting: still running, its claim's attempt given back (a kill -9 now recovers it with 0 attempts)
            assert (job.state, job.attempts) == ("running", 0), (cycle, job)
        finally:
            t0 = time.monotonic()
            node.stop(timeout_s=30)
        assert time.monotonic() - t0 < 10, "shutdown waited for the waiting job"
        [job] = node.queue.list()
        assert (job.state, job.attempts, job.last_error) == ("pending", 0, None), (cycle, job)
    assert _job_failures() == failures  # neither the wait nor the shutdown counted as a failed job
