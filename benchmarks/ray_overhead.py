"""Ray engine vs in-process: studies/min (local, Ray with 1 and 2 workers) and Ray's per-job overhead.

Runs on one CPU machine in one process tree: a local Ray cluster (``ray.cluster_utils.Cluster``,
head with no CPUs, then one or two one-CPU worker nodes) and the wrist_fracture task with the
registry's current bundle (``models/``) on synthetic two-image adult wrist studies. The task
step alone is timed (the node's loading and result writing are the same for both engines).
Overhead = median Ray job time - median in-process job time (warm model both sides).

    PYTHONPATH=. nice -n 10 .venv/bin/python benchmarks/ray_overhead.py --studies 8
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
TASK = "wrist_fracture"


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
            _ = ds.pixel_array
    return studies


def run_jobs(fn, studies: list[list], threads: int) -> tuple[float, list[float]]:  # noqa: ANN001
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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--studies", type=int, default=8)
    args = ap.parse_args()
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # loopback only
    os.environ["PYTHONPATH"] = str(ROOT)
    from ray.cluster_utils import Cluster

    from dicomnode.config import Config
    from dicomnode.execution.ray_engine import RayEngine
    from inference.tasks import TaskContext, get_task

    with tempfile.TemporaryDirectory() as tmp:
        studies = make_studies(Path(tmp), args.studies)
        ctx = TaskContext(models_dir=ROOT / "models", device="cpu")
        task = get_task(TASK)
        task(studies[0], ctx)  # warm
        wall, times = run_jobs(lambda s: task(s, ctx), studies, 1)
        rows = [("local (in-process, 1 worker thread)", wall, times)]
        port = _port()
        head = {"num_cpus": 0, "object_store_memory": 200 * 2**20, "node_ip_address": "127.0.0.1",
                "include_dashboard": False, "gcs_server_port": port}
        cluster = Cluster(initialize_head=True, head_node_args=head)
        engine = None
        try:
            for workers in (1, 2):
                cluster.add_node(num_cpus=1, object_store_memory=200 * 2**20, node_ip_address="127.0.0.1")
                cfg = Config.model_validate({
                    "models_dir": str(ROOT / "models"), "device": "cpu", "node": {"workers": workers,
                                                                                 "storage_dir": tmp + "/var"},
                    "routes": [{"name": "w", "task": TASK}],
                    "execution": {"engine": "ray", "address": f"127.0.0.1:{port}",
                                  "actors": {TASK: {"replicas": workers, "num_cpus": 1}}}})
                engine = RayEngine(cfg)
                for _ in range(2 * workers):  # start + warm every actor
                    run_jobs(lambda s, e=engine: e.run_task(s, TASK, ctx), studies[:workers], workers)
                wall, times = run_jobs(lambda s, e=engine: e.run_task(s, TASK, ctx), studies, workers)
                rows.append((f"ray, {workers} worker node(s) x 1 actor", wall, times))
                engine.close()
                engine = None
        finally:
            if engine is not None:
                engine.close()
            cluster.shutdown()
    local_med = statistics.median(rows[0][2])
    print(f"{args.studies} two-image wrist studies, task step only, CPU ({os.cpu_count()} cores)")
    print("| engine | studies/min | median job s |")
    print("|---|---|---|")
    for name, wall, times in rows:
        print(f"| {name} | {60 * len(times) / wall:.1f} | {statistics.median(times):.3f} |")
    ray_med = statistics.median(rows[1][2])
    print(f"Ray job minus in-process job (1 worker, medians): {ray_med - local_med:+.3f} s = "
          f"{100 * (ray_med - local_med) / local_med:+.1f} % of the in-process job ({local_med:.3f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
