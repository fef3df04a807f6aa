"""Synthetic-study generation rate per task, with 1 and with 2 worker processes, in one run.

Targets (issue "Synthetic studies"): at least 20 radiograph studies/s and 1 CT/MR
volume/s on the 2-core development machine. Each generator writes ``--n``
studies (default sizes, default difficulty) into a fresh temporary folder through
``dicomnode-train synth``'s own code path (``training.synth.cli.load_generator``),
first with one worker process and then with two; the single-worker run is the
same-run reference, so ``2 workers / 1 worker`` is the parallel scaling whatever
the machine's load. CPU seconds per study come from ``resource.getrusage``
(this process plus its worker processes).

Usage::

    python benchmarks/synth.py [--tasks wrist_fracture,...] [--n-radiograph 60] [--n-volume 6] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from training.synth.cli import GENERATORS, load_generator  # noqa: E402

RADIOGRAPH = {"wrist_fracture", "physis_fracture"}
TARGET = {"radiograph": 20.0, "volume": 1.0}


def _cpu_s() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def measure(task: str, n: int, workers: int, seed: int) -> dict[str, float]:
    """Generate ``n`` studies of ``task`` with ``workers`` processes; wall and CPU seconds."""
    module: Any = load_generator(task)
    out = Path(tempfile.mkdtemp(prefix=f"synth-bench-{task}-"))
    try:
        cpu0, t0 = _cpu_s(), time.perf_counter()
        module.generate(out, n, seed, workers=workers)
        wall, cpu = time.perf_counter() - t0, _cpu_s() - cpu0
        size = sum(f.stat().st_size for f in out.rglob("*.dcm"))
    finally:
        shutil.rmtree(out, ignore_errors=True)
    return {"wall_s": wall, "rate": n / wall, "cpu_per_study_s": cpu / n, "mb_per_study": size / n / 1e6}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", default=",".join(GENERATORS), help="comma-separated tasks")
    ap.add_argument("--n-radiograph", type=int, default=60, help="studies per run for radiograph tasks")
    ap.add_argument("--n-volume", type=int, default=6, help="studies per run for volume tasks")
    ap.add_argument("--seed", type=int, default=20261123)
    ap.add_argument("--json", type=Path, default=None, help="also write the figures as JSON")
    args = ap.parse_args(argv)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    unknown = sorted(set(tasks) - set(GENERATORS))
    if unknown:
        ap.error(f"unknown task(s): {', '.join(unknown)}")
    rows = []
    for task in tasks:
        kind = "radiograph" if task in RADIOGRAPH else "volume"
        n = args.n_radiograph if kind == "radiograph" else args.n_volume
        measure(task, 1, 1, args.seed + 99)  # warm-up: imports, caches, fonts
        one = measure(task, n, 1, args.seed)
        two = measure(task, n, 2, args.seed)
        rows.append({"task": task, "kind": kind, "n": n, "one": one, "two": two, "target": TARGET[kind]})
        print(f"{task}: 1 worker {one['rate']:.2f}/s, 2 workers {two['rate']:.2f}/s "
              f"(CPU {two['cpu_per_study_s']:.3f} s/study)", flush=True)
    load = os.getloadavg()[0]
    print(f"\nMachine: {platform.machine()}, {os.cpu_count()} CPUs, load average {load:.1f} at the end\n")
    print("| generator | studies per run | 1 worker (studies/s) | 2 workers (studies/s) | 2 workers / 1 worker "
          "| CPU per study (s) | MB per study | target (studies/s) | met |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---|")
    for r in rows:
        one, two = r["one"], r["two"]
        print(f"| {r['task']} | {r['n']} | {one['rate']:.2f} | {two['rate']:.2f} | {two['rate'] / one['rate']:.2f} "
              f"| {two['cpu_per_study_s']:.3f} | {two['mb_per_study']:.1f} | {r['target']:g} "
              f"| {'yes' if two['rate'] >= r['target'] else 'no'} |")
    if args.json:
        args.json.write_text(json.dumps({"load_average": load, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
