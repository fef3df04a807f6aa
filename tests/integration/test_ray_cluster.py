"""The Ray engine end to end: Orthanc -> node -> Ray actors on two simulated worker machines -> Orthanc.

A real local Ray cluster (``ray.cluster_utils.Cluster``: a head with no CPUs beside
the node, two worker nodes with one CPU each, small object stores). Studies of two
tasks go through it exactly once; then an actor is killed mid-job, a worker node is
removed mid-job, and the whole cluster is stopped and started again, each time
with every job completing exactly once. A newer bundle promoted while jobs run is
used by the later jobs, the running ones finish on theirs. kill -9 of the node
while Ray runs its jobs loses and duplicates nothing, and takes the node's one
Ray driver process with it.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
import yaml

from tests.integration.conftest import REPO_ROOT, NodeProcess, wait_for
from tests.orthanc import OrthancServer
from tests.plugins.bone_test_task import dx_dataset

ray_cluster_utils = pytest.importorskip("ray.cluster_utils", reason="the [cluster] extra (ray) is not installed")

pytestmark = pytest.mark.integration

SLEEP_S = 4.0  # each job sleeps this long on its actor, so it can be interrupted mid-job
NODE_ARGS: dict[str, Any] = {"num_cpus": 1, "object_store_memory": 80 * 2**20, "node_ip_address": "127.0.0.1"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LocalCluster:
    """A head (no CPUs) and two one-CPU worker nodes on loopback, restartable on the same GCS port."""

    def __init__(self) -> None:
        self.port = _free_port()
        self.cluster: Any = None
        self.workers: list[Any] = []

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> LocalCluster:
        head = {"num_cpus": 0, "object_store_memory": 80 * 2**20, "node_ip_address": "127.0.0.1",
                "include_dashboard": False, "gcs_server_port": self.port}
        self.cluster = ray_cluster_utils.Cluster(initialize_head=True, head_node_args=head)
        self.workers = [self.cluster.add_node(**NODE_ARGS) for _ in range(2)]
        return self

    def stop(self) -> None:
        if self.cluster is not None:
            self.cluster.shutdown()
            self.cluster = None

    def actor_pids(self) -> dict[int, Any]:
        """PID of each TaskActor process -> the worker node (raylet) it runs under."""
        found: dict[int, Any] = {}
        children = _children()
        for node in self.workers:
            raylet = node.all_processes["raylet"][0].process.pid
            stack = list(children.get(raylet, []))
            while stack:
                pid = stack.pop()
                try:
                    cmd = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
                except OSError:
                    continue
                if "TaskActor" in cmd:
                    found[pid] = node
                stack.extend(children.get(pid, []))
        return found


def _cluster_env(monkeypatch: pytest.MonkeyPatch, marks: Path) -> None:
    """Environment the cluster's processes (and so the actors) inherit: a slow test task, loopback only."""
    monkeypatch.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # every Ray process uses 127.0.0.1
    monkeypatch.setenv("BONE_TEST_TASK_SLEEP_S", str(SLEEP_S))
    marks.mkdir(exist_ok=True)
    monkeypatch.setenv("BONE_TEST_TASK_MARK_DIR", str(marks))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(Path(__file__).resolve().parents[2]),
                                                      os.environ.get("PYTHONPATH", "")]))


@pytest.fixture
def ray_cluster(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[LocalCluster]:
    """A cluster of the test's own (it is stopped, restarted and loses a worker node)."""
    _cluster_env(monkeypatch, tmp_path / "marks")
    c = LocalCluster().start()
    try:
        yield c
    finally:
        c.stop()


@pytest.fixture(scope="module")
def shared_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """A cluster kept for several tests (each uses its own Ray namespace); saves a start and a stop."""
    with pytest.MonkeyPatch.context() as mp:
        _cluster_env(mp, tmp_path_factory.mktemp("ray") / "marks")
        c = LocalCluster().start()
        try:
            yield c
        finally:
            c.stop()


def _configure(node: NodeProcess, address: str, namespace: str | None = None,
               edit: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Route two test tasks to the Ray engine at ``address`` (in ``namespace``), then ``edit`` the config."""
    cfg = yaml.safe_load(node.config_path.read_text(encoding="utf-8"))
    cfg["plugins"] = ["tests.plugins.bone_test_task", "tests.plugins.second_test_task"]
    cfg["routes"] = [
        {"name": "wrist", "task": "test_task", "match": {"modality": ["DX"], "body_part": ["WRIST"]},
         "complete_after_s": 1.0, "send_to": ["pacs"]},
        {"name": "hand", "task": "test_task_b", "match": {"modality": ["DX"], "body_part": ["HAND"]},
         "complete_after_s": 1.0, "send_to": ["pacs"]},
    ]
    cfg["node"]["workers"] = 2
    cfg["node"]["status_http_port"] = _free_port()
    cfg["execution"] = {"engine": "ray", "address": address, "retry_wait_s": 1.0,
                        "actors": {"test_task": {"replicas": 1, "num_cpus": 0.5},
                                   "test_task_b": {"replicas": 1, "num_cpus": 0.5}}}
    if namespace:
        cfg["execution"]["namespace"] = namespace
    if edit:
        edit(cfg)
    node.config_path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return cfg


def _send_study(pacs: OrthancServer, folder: Path, body_part: str) -> tuple[str, set[str]]:
    folder.mkdir(parents=True)
    study_uid = pydicom.uid.generate_uid()
    series_uid = pydicom.uid.generate_uid()
    uids = set()
    for i in range(2):
        ds = dx_dataset(study_uid, series_uid, i, body_part=body_part)
        ds.save_as(folder / f"{i}.dcm", enforce_file_format=True)
        uids.add(str(ds.SOPInstanceUID))
    pacs.upload_dir(folder)
    pacs.store_to_modality("node", [pacs.study_id(study_uid)])
    return study_uid, uids


def _exactly_once(pacs: OrthancServer, study_uid: str, sources: set[str], timeout_s: float = 90) -> None:
    """The study's SR and SC arrive in Orthanc, and nothing more (no duplicate results)."""
    def arrived() -> bool:
        return len(pacs.instances_in_study(study_uid)) >= len(sources) + 2

    wait_for(arrived, timeout_s, f"results of {study_uid} in Orthanc")
    time.sleep(1.0)
    results = [i for i in pacs.instances_in_study(study_uid) if i["SOPInstanceUID"] not in sources]
    assert sorted(r["Modality"] for r in results) == ["OT", "SR"]


def _running(node: NodeProcess, study_uid: str) -> bool:
    return bool(node.query("SELECT 1 FROM jobs WHERE study_uid=? AND state='running'", (study_uid,)))


def test_two_tasks_actor_and_node_loss_and_cluster_restart(
        tmp_path: Path, ray_cluster: LocalCluster, node_with_orthanc: tuple[NodeProcess, OrthancServer]) -> None:
    node, pacs = node_with_orthanc
    _configure(node, ray_cluster.address)
    node.start()

    # 1. two tasks, each on its own warm actor, results exactly once
    wrist = _send_study(pacs, tmp_path / "wrist", "WRIST")
    hand = _send_study(pacs, tmp_path / "hand", "HAND")
    _exactly_once(pacs, *wrist)
    _exactly_once(pacs, *hand)
    jobs = node.query("SELECT task, state, attempts FROM jobs ORDER BY task")
    assert [(j["task"], j["state"], j["attempts"]) for j in jobs] == [("test_task", "done", 1),
                                                                       ("test_task_b", "done", 1)]
    assert len(ray_cluster.actor_pids()) == 2  # one actor per task, on the worker nodes

    # 2. an actor killed mid-job: the job runs again on a (restarted) actor, results once
    study = _send_study(pacs, tmp_path / "kill-actor", "WRIST")
    wait_for(lambda: _running(node, study[0]), 30, "job running")
    time.sleep(1.0)
    victims = ray_cluster.actor_pids()
    for pid in victims:
        os.kill(pid, signal.SIGKILL)
    _exactly_once(pacs, *study)
    assert "lost mid-job" in node.log_tail(10**6)

    # 3. a worker node removed mid-job: the actor is restarted on the other node, results once
    study = _send_study(pacs, tmp_path / "kill-node", "HAND")
    wait_for(lambda: _running(node, study[0]), 30, "job running")
    time.sleep(1.0)
    busy = next(iter(ray_cluster.actor_pids().values()))
    ray_cluster.cluster.remove_node(busy, allow_graceful=False)
    ray_cluster.workers.remove(busy)
    _exactly_once(pacs, *study)

    # 4. the cluster stopped: the job waits (state file, not failed), and completes once it is back
    ray_cluster.stop()
    study = _send_study(pacs, tmp_path / "outage", "WRIST")
    state_file = node.storage_dir / "execution-state.json"
    wait_for(lambda: "waiting for execution engine" in state_file.read_text(encoding="utf-8"), 60,
             "engine state 'waiting for execution engine'")
    time.sleep(3.0)
    status = subprocess.run([sys.executable, "-m", "dicomnode.cli", "status", "--config", str(node.config_path)],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert "execution engine: ray at" in status.stdout and "waiting for execution engine" in status.stdout
    http = f"http://127.0.0.1:{yaml.safe_load(node.config_path.read_text(encoding='utf-8'))['node']['status_http_port']}"
    with urllib.request.urlopen(http + "/", timeout=10) as page:  # the status page shows the wait
        assert "waiting for execution engine" in page.read().decode()
    with urllib.request.urlopen(http + "/metrics", timeout=10) as metrics:
        assert "dicomnode_execution_waiting 1.0" in metrics.read().decode()
    assert [j["state"] for j in node.query("SELECT state FROM jobs WHERE study_uid=?", (study[0],))] == ["running"]
    ray_cluster.start()
    _exactly_once(pacs, *study, timeout_s=120)
    wait_for(lambda: '"state": "connected"' in state_file.read_text(encoding="utf-8"), 30, "engine connected")
    assert {j["state"] for j in node.query("SELECT state FROM jobs")} == {"done"}
    assert node.query("SELECT COUNT(*) AS n FROM jobs WHERE state='failed'")[0]["n"] == 0
    # the wait through the outage did not use up attempts: the job counts the one run that produced results
    assert [j["attempts"] for j in node.query("SELECT attempts FROM jobs WHERE study_uid=?", (study[0],))] == [1]


def _children() -> dict[int, list[int]]:
    """Parent PID -> child PIDs of every process in /proc."""
    out: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            out.setdefault(ppid, []).append(int(d.name))
    return out


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def ray_drivers(root: int) -> list[int]:
    """Processes under ``root`` (the node) that have Ray's core worker loaded: the node's Ray drivers."""
    children, found, stack = _children(), [], [root]
    while stack:
        pid = stack.pop()
        try:
            if "_raylet" in Path(f"/proc/{pid}/maps").read_text(errors="replace"):
                found.append(pid)
        except OSError:
            pass
        stack.extend(children.get(pid, []))
    return sorted(found)


def _versions(node: NodeProcess, pacs: OrthancServer, study_uid: str) -> tuple[str, str]:
    """The job's recorded model version and the version in its SR's series description."""
    [job] = node.query("SELECT model_version FROM jobs WHERE study_uid=?", (study_uid,))
    [sr] = [i for i in pacs.instances_in_study(study_uid) if i["Modality"] == "SR"]
    return str(job["model_version"]).rsplit(" ", 1)[-1], str(sr["SeriesDescription"]).rsplit(" v", 1)[-1]


def test_promotion_while_jobs_run(
        tmp_path: Path, shared_cluster: LocalCluster, node_with_orthanc: tuple[NodeProcess, OrthancServer]) -> None:
    """Promote v2 while v1 jobs run on the actors: those finish on v1, jobs after the swap use v2, all once."""
    from inference.registry import ModelRegistry
    from tests.plugins.versioned_test_task import make_bundle

    node, pacs = node_with_orthanc

    def versioned(cfg: dict[str, Any]) -> None:
        cfg["plugins"].append("tests.plugins.versioned_test_task")
        cfg["routes"][0]["task"] = "test_task_v"
        cfg["execution"]["actors"] = {"test_task_v": {"replicas": 2, "num_cpus": 0.5}}

    cfg = _configure(node, shared_cluster.address, "promotion", versioned)
    registry = ModelRegistry(cfg["models_dir"])
    registry.promote("test_task_v", make_bundle(tmp_path / "b1", "v1", 1.0))
    node.start()

    before = [_send_study(pacs, tmp_path / f"before{i}", "WRIST") for i in range(2)]
    marks = Path(os.environ["BONE_TEST_TASK_MARK_DIR"])
    wait_for(lambda: all((marks / s[0]).exists() for s in before), 90, "both jobs running on their actors")
    assert all(_running(node, s[0]) for s in before)
    registry.promote("test_task_v", make_bundle(tmp_path / "b2", "v2", 2.0))
    time.sleep(6.0)  # the actors' model cache looks at the registry pointer every 5 s
    after = [_send_study(pacs, tmp_path / f"after{i}", "WRIST") for i in range(2)]
    for s in before + after:
        _exactly_once(pacs, *s)
    assert [_versions(node, pacs, s[0]) for s in before] == [("v1", "v1")] * 2  # in flight: kept their model
    assert [_versions(node, pacs, s[0]) for s in after] == [("v2", "v2")] * 2   # later jobs: the new version
    jobs = node.query("SELECT state, attempts FROM jobs")
    assert [(j["state"], j["attempts"]) for j in jobs] == [("done", 1)] * 4  # none lost, none run twice


def test_kill9_of_the_node_with_ray_jobs_in_flight(
        tmp_path: Path, shared_cluster: LocalCluster, node_with_orthanc: tuple[NodeProcess, OrthancServer]) -> None:
    """One driver process serves both worker threads; kill -9 takes it along; after restart, results exactly once."""
    node, pacs = node_with_orthanc
    _configure(node, shared_cluster.address, "kill9",
               lambda cfg: cfg["execution"]["actors"]["test_task"].update(replicas=2))
    node.start()
    studies = [_send_study(pacs, tmp_path / f"s{i}", "WRIST") for i in range(3)]
    wait_for(lambda: sum(_running(node, s[0]) for s in studies) == 2, 60, "two jobs running at once")
    time.sleep(1.0)
    assert node.proc is not None
    drivers = ray_drivers(node.proc.pid)
    assert len(drivers) == 1, f"one Ray driver process per node, found {drivers}"
    node.kill9()
    wait_for(lambda: not _alive(drivers[0]), 10, f"driver process {drivers[0]} gone with the node")

    node.start()
    for s in studies:
        _exactly_once(pacs, *s)
    assert {j["state"] for j in node.query("SELECT state FROM jobs")} == {"done"}
    assert node.proc is not None and len(ray_drivers(node.proc.pid)) == 1
    assert not _alive(drivers[0])
