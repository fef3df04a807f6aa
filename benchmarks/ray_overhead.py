"""Ray engine vs in-process: studies/min (local, Ray with 1 and 2 worker processes) and Ray's per-job overhead.

One CPU machine, one run: synthetic two-image adult wrist studies are generated and
loaded once (pixel data read: what the node ships), then

* **compute**: the wrist_fracture task with the registry's current bundle (``models/``),
  in-process, torch limited to one thread like a one-CPU Ray actor, median per study;
* **overhead**: the same studies through the real :class:`~dicomnode.execution.ray_engine.RayEngine`
  (the node's driver process, ``ray.put`` of the datasets, an actor call, the findings back)
  to a warm actor whose task does no computation and returns a radiograph job's real
  findings; many jobs one after another, median, minus the same no-op called in-process.
  The pipe hop to the driver process alone (the datasets there and back, no Ray) is shown too;
* **throughput**: studies/min in-process with 1 and 2 worker threads, and on Ray with 1
  and 2 actors (worker processes), each on a one-CPU simulated worker node of a local
  cluster (``ray.cluster_utils.Cluster``, head with no CPUs).

    PYTHONPATH=. nice -n 10 .venv/bin/python benchmarks/ray_overhead.py --studies 8 --overhead-jobs 200
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):  # what a one-CPU Ray actor gets,
    os.environ.setdefault(_var, "1")  # so in-process and actor jobs run with the same threads (before numpy loads)
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
TASK = "wrist_fracture"
NOOP = "bench_noop"


_FINDINGS: dict[str, Any] = {}


def _noop_task(datasets: Sequence[Any], context: Any) -> Any:
    """No computation: a real radiograph job's findings, read once from the file named in the context."""
    path = str((context.extra or {})["findings_file"])
    if path not in _FINDINGS:
        _FINDINGS[path] = pickle.loads(Path(path).read_bytes())
    return _FINDINGS[path]


def register() -> None:
    """Register the no-op task (this module is a plugin of the benchmark's actors)."""
    from inference.tasks import register_task

    register_task(NOOP, _noop_task)


register()


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_studies(work: Path, n: int) -> list[list]:
    """``n`` synthetic wrist studies, loaded (pixel data read)."""
    from inference.series import read_datasets

    data = work / "data"
    subprocess.run([sys.executable, "-m", "training.cli", "synth", TASK, "--out", str(data), "--n", str(n),
                    "--seed", "7", "--workers", "1"], cwd=ROOT, check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    folders = sorted({p.parent for p in data.rglob("*.dcm")})
    studies = [read_datasets(sorted(f.glob("*.dcm"))) for f in folders]
    for s in studies:
        for ds in s:
            _ = ds.PixelData
    return studies


def run_jobs(fn: Callable[[list], Any], studies: list[list], threads: int) -> tuple[float, list[float]]:
    """Wall time of all jobs and each job's time."""
    times: list[float] = []

    def one(s: list) -> None:
        t = time.perf_counter()
        fn(s)
        times.append(time.perf_counter() - t)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(threads) as ex:
        list(ex.map(one, studies))
    return time.perf_counter() - t0, times


def _engine(port: int, tmp: str, replicas: int, namespace: str) -> Any:
    from dicomnode.config import Config
    from dicomnode.execution.ray_engine import RayEngine

    cfg = Config.model_validate({
        "models_dir": str(ROOT / "models"), "device": "cpu", "plugins": ["benchmarks.ray_overhead"],
        "node": {"workers": replicas, "storage_dir": tmp + "/var"},
        "routes": [{"name": "w", "task": TASK}, {"name": "n", "task": NOOP}],
        "execution": {"engine": "ray", "address": f"127.0.0.1:{port}", "namespace": namespace,
                      "actors": {TASK: {"replicas": replicas, "num_cpus": 1}, NOOP: {"replicas": 1, "num_cpus": 0}}}})
    return RayEngine(cfg)


def measure_overhead(engine: Any, studies: list[list], findings: Any, jobs: int, tmp: str) -> dict[str, float]:
    """Medians (s) of the no-op job through Ray, in-process, and of the pipe echo alone.

    The no-op job moves exactly what a real one does: the study's datasets to the actor, a real
    radiograph job's findings back.
    """
    from inference.tasks import TaskContext

    path = Path(tmp) / "findings.pickle"
    path.write_bytes(pickle.dumps(findings))
    ctx = TaskContext(device="cpu", extra={"findings_file": str(path)})
    for s in studies[:3]:  # start the driver and the actor, warm both
        engine.run_task(s, NOOP, ctx)
    ray_t, local_t, echo_t = [], [], []
    for i in range(jobs):
        s = studies[i % len(studies)]
        t = time.perf_counter()
        engine.run_task(s, NOOP, ctx)
        ray_t.append(time.perf_counter() - t)
        t = time.perf_counter()
        _noop_task(s, ctx)
        local_t.append(time.perf_counter() - t)
        t = time.perf_counter()
        engine.echo(list(s))
        echo_t.append(time.perf_counter() - t)
    q = statistics.quantiles(ray_t, n=10)
    return {"ray_noop_median_s": statistics.median(ray_t), "ray_noop_p10_s": q[0], "ray_noop_p90_s": q[-1],
            "local_noop_median_s": statistics.median(local_t), "pipe_echo_median_s": statistics.median(echo_t)}


def local_rows(studies: list[list], ctx: Any) -> tuple[list[dict[str, Any]], Any]:
    """In-process rows (1 and 2 worker threads, torch one thread per job) and one study's findings."""
    import torch

    from inference.tasks import get_task

    torch.set_num_threads(1)  # what a one-CPU actor gets (Ray sets OMP_NUM_THREADS=1)
    task = get_task(TASK)
    findings = task(studies[0], ctx)  # warm: model loaded, first-call imports done
    rows = []
    for threads in (1, 2):
        wall, times = run_jobs(lambda s: task(s, ctx), studies, threads)
        rows.append({"engine": f"local, {threads} worker thread(s)", "wall_s": wall, "times": times})
    return rows, findings


def ray_rows(studies: list[list], ctx: Any, tmp: str, jobs: int, findings: Any) -> tuple[list[dict], dict]:
    """Ray rows with 1 and 2 actors (one per one-CPU worker node), and the overhead figures."""
    from ray.cluster_utils import Cluster

    port = _port()
    head = {"num_cpus": 0, "object_store_memory": 200 * 2**20, "node_ip_address": "127.0.0.1",
            "include_dashboard": False, "gcs_server_port": port}
    cluster = Cluster(initialize_head=True, head_node_args=head)
    rows: list[dict[str, Any]] = []
    overhead: dict[str, float] = {}
    try:
        for workers in (1, 2):
            cluster.add_node(num_cpus=1, object_store_memory=200 * 2**20, node_ip_address="127.0.0.1")
            engine = _engine(port, tmp, workers, "bench")  # actor #0 (detached) carries over to the 2-actor run
            try:
                for _ in range(2):  # start and warm every actor
                    run_jobs(lambda s, e=engine: e.run_task(s, TASK, ctx), studies[:workers], workers)
                wall, times = run_jobs(lambda s, e=engine: e.run_task(s, TASK, ctx), studies, workers)
                rows.append({"engine": f"ray, {workers} actor(s) on {workers} one-CPU worker node(s)",
                             "wall_s": wall, "times": times})
                if workers == 1:
                    overhead = measure_overhead(engine, studies, findings, jobs, tmp)
            finally:
                engine.close()
    finally:
        cluster.shutdown()
    return rows, overhead


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--studies", type=int, default=8)
    ap.add_argument("--overhead-jobs", type=int, default=200)
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args()
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # loopback only
    os.environ["PYTHONPATH"] = str(ROOT)
    from inference.tasks import TaskContext

    ctx = TaskContext(models_dir=ROOT / "models", device="cpu")
    with tempfile.TemporaryDirectory() as tmp:
        studies = make_studies(Path(tmp), args.studies)
        rows, findings = local_rows(studies, ctx)
        more, overhead = ray_rows(studies, ctx, tmp, args.overhead_jobs, findings)
        rows += more
    report(args, rows, overhead, studies)
    return 0


def report(args: argparse.Namespace, rows: list[dict[str, Any]], ov: dict[str, float], studies: list[list]) -> None:
    """Print the table and the overhead lines (and write ``--json``)."""
    payload = sum(len(ds.PixelData) for ds in studies[0])
    compute = statistics.median(rows[0]["times"])
    print(f"{args.studies} two-image wrist studies ({payload / 2**20:.1f} MiB of pixels each), CPU "
          f"({os.cpu_count()} cores), load average at the end {os.getloadavg()[0]:.1f}")
    print("| engine | studies/min | median job s |\n|---|---|---|")
    for r in rows:
        print(f"| {r['engine']} | {60 * len(r['times']) / r['wall_s']:.1f} | {statistics.median(r['times']):.3f} |")
    extra = ov["ray_noop_median_s"] - ov["local_noop_median_s"]
    print(f"Ray per-job overhead (no-op task, warm actor, {args.overhead_jobs} jobs, median): {1000 * extra:.1f} ms "
          f"(p10-p90 {1000 * ov['ray_noop_p10_s']:.1f}-{1000 * ov['ray_noop_p90_s']:.1f} ms); the datasets "
          f"through the pipe to the driver process and back alone: {1000 * ov['pipe_echo_median_s']:.1f} ms")
    print(f"= {100 * extra / compute:.1f} % of the in-process radiograph job's compute ({compute:.3f} s, one thread)")
    if args.json:
        args.json.write_text(json.dumps({"rows": [{"engine": r["engine"], "wall_s": r["wall_s"], "times_s": r["times"]}
                                                  for r in rows], "overhead": ov, "compute_median_s": compute,
                                         "payload_bytes": payload, "loadavg_end": os.getloadavg()}, indent=1))


if __name__ == "__main__":
    sys.exit(main())
