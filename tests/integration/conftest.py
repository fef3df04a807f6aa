"""Integration fixtures: a real Orthanc started per test on free loopback ports.

Use ``orthanc_factory(modalities={"node": ("BONENODE", "127.0.0.1", port)})``
to register the node under test, or the ``orthanc`` fixture (no modalities, or
parametrize it indirectly with such a dict). Tests are skipped only when the
Orthanc binary is missing; CI installs it. On failure the Orthanc log is
printed.
"""

from __future__ import annotations

import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import free_port
from tests.orthanc import ORTHANC_BIN, OrthancServer

REPO_ROOT = Path(__file__).resolve().parents[2]

Modalities = dict[str, tuple[str, str, int]]


def _require_orthanc() -> None:
    if not Path(ORTHANC_BIN).exists():
        pytest.skip(f"Orthanc binary not found at {ORTHANC_BIN} (install the Debian package 'orthanc')")


@pytest.fixture
def orthanc_factory(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Callable[..., OrthancServer]]:
    """Factory ``(modalities=None, aet="ORTHANC", start=True) -> OrthancServer``; all are stopped at teardown."""
    _require_orthanc()
    servers: list[OrthancServer] = []

    def make(modalities: Modalities | None = None, aet: str = "ORTHANC", start: bool = True) -> OrthancServer:
        srv = OrthancServer(tmp_path / f"orthanc{len(servers)}", modalities, aet=aet)
        servers.append(srv)
        if start:
            srv.start()
        return srv

    yield make
    failed = getattr(request.node, "rep_call", None)
    for srv in servers:
        srv.stop()
        if failed is not None and failed.failed:
            print(f"\n----- Orthanc log {srv.log_path} -----\n{srv.log_tail()}")


@pytest.fixture
def orthanc(orthanc_factory: Callable[..., OrthancServer], request: pytest.FixtureRequest) -> OrthancServer:
    """A started Orthanc; ``request.param`` (indirect parametrization) may give its modalities."""
    modalities: Modalities | None = getattr(request, "param", None)
    return orthanc_factory(modalities=modalities)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """Remember each phase's report on the item so fixtures can tell whether the test failed."""
    outcome = yield
    rep = outcome.get_result()
    setattr(item, f"rep_{rep.when}", rep)


class NodeProcess:
    """``dicomnode serve`` as a subprocess (cwd = repo root, the test task plugin loaded).

    The config routes DX series to ``test_task`` (quiet period 1 s) and sends
    results to ``pacs`` (the given Orthanc). ``start``/``kill9``/``stop`` may be
    called repeatedly; storage and port stay the same.
    """

    def __init__(self, workdir: Path, pacs_port: int, *, env: dict[str, str] | None = None) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.storage_dir = self.workdir / "var"
        self.config_path = self.workdir / "node.yaml"
        self.log_path = self.workdir / "node.log"
        self.env = dict(env or {})
        self.proc: subprocess.Popen[bytes] | None = None
        cfg: dict[str, Any] = {
            "node": {"ae_title": "BONENODE", "host": "127.0.0.1", "port": self.port,
                     "storage_dir": str(self.storage_dir), "disk_min_free_gb": 0, "workers": 1,
                     "allowed_callers": [{"ae_title": "ORTHANC", "host": "127.0.0.1"},
                                         {"ae_title": "TESTSCU", "host": "127.0.0.1"}]},
            "destinations": {"pacs": {"ae_title": "ORTHANC", "host": "127.0.0.1", "port": pacs_port,
                                      "backoff_initial_s": 0.5, "backoff_max_s": 2.0, "max_retries": 1000,
                                      "timeout_s": 10}},
            "models_dir": str(self.workdir / "models"),
            "device": "cpu",
            "routes": [{"name": "test-route", "task": "test_task", "match": {"modality": ["DX"]},
                        "complete_after_s": 1.0, "send_to": ["pacs"]}],
            "plugins": ["tests.plugins.bone_test_task"],
            "log_level": "INFO",
        }
        self.config_path.write_text(yaml.safe_dump(cfg), encoding="utf-8")

    def use_example_route(self, task: str, bundle: Path, *, complete_after_s: float = 1.0) -> None:
        """Route only with config/node.yaml's rule for ``task`` (quiet period shortened), the model pinned."""
        example = yaml.safe_load((REPO_ROOT / "config" / "node.yaml").read_text(encoding="utf-8"))
        route = next(r for r in example["routes"] if r["task"] == task)
        route.update({"complete_after_s": complete_after_s, "model": str(bundle), "send_to": ["pacs"]})
        cfg = yaml.safe_load(self.config_path.read_text(encoding="utf-8"))
        cfg["routes"] = [route]
        cfg["plugins"] = []
        self.config_path.write_text(yaml.safe_dump(cfg), encoding="utf-8")

    def start(self, timeout_s: float = 60.0, env: dict[str, str] | None = None) -> NodeProcess:
        """Start the node and wait until its port accepts connections."""
        full_env = {**os.environ, **self.env, **(env or {}),
                    "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
        log = open(self.log_path, "ab")  # noqa: SIM115 - owned by the subprocess
        self.proc = subprocess.Popen([sys.executable, "-m", "dicomnode.cli", "serve", "--config",
                                      str(self.config_path)], cwd=REPO_ROOT, env=full_env, stdout=log,
                                     stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"node exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return self
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(f"node did not listen within {timeout_s} s:\n{self.log_tail()}")

    def kill9(self) -> None:
        """SIGKILL the node (no clean-up at all)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> int | None:
        """SIGTERM and wait; returns the exit status."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode

    def query(self, sql: str, args: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
        """Read the node database (tables may not exist yet: returns [])."""
        db = self.storage_dir / "node.db"
        if not db.exists():
            return []
        conn = sqlite3.connect(db, timeout=30)
        conn.row_factory = sqlite3.Row
        try:
            return conn.execute(sql, args).fetchall()
        except sqlite3.OperationalError:
            return []
        finally:
            conn.close()

    def log_tail(self, n_chars: int = 8000) -> str:
        """The end of the node's log."""
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")[-n_chars:]
        except OSError:
            return "(no log)"


@pytest.fixture
def node_with_orthanc(tmp_path: Path, orthanc_factory: Callable[..., OrthancServer],
                      request: pytest.FixtureRequest) -> Iterator[tuple[NodeProcess, OrthancServer]]:
    """An Orthanc with the node registered as modality ``node``, and a node (not started) sending to it."""
    pacs = orthanc_factory(start=False)
    node = NodeProcess(tmp_path / "node", pacs.dicom_port)
    pacs.modalities["node"] = ("BONENODE", "127.0.0.1", node.port)
    pacs.start()
    yield node, pacs
    node.stop()
    rep = getattr(request.node, "rep_call", None)
    if rep is not None and rep.failed:
        print(f"\n----- node log {node.log_path} -----\n{node.log_tail()}")


def wait_for(predicate: Callable[[], Any], timeout_s: float, what: str, interval_s: float = 0.25) -> Any:
    """Poll ``predicate`` until it returns something truthy; fail the test after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval_s)
    pytest.fail(f"timed out after {timeout_s} s waiting for {what}")
