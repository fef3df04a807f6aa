"""Where a sustained C-STORE stream's time goes: CPU per instance (node vs dcmtk storescp) and the disk's flush latency.

Companion of ``ingest.py --sustained-only`` (issue #33): on a shared machine the node / storescp ratio is set
either by CPU (both starved: the ratio tends to storescp's CPU per instance over the node's) or by the
latency of one device flush (the node waits for one per acknowledged instance on each association; storescp
never flushes). This prints both, measured in one run:

- CPU per instance: user + system time of the node's receiver processes (journal, parse, materializer,
  spool, index) and of storescp (``--fork``; its children's time included) for the same N images of 512 KiB
  over one association;
- ``fdatasync`` latency of an overwrite of 4 KiB and of 512 KiB in a pre-allocated file (what a journal
  record costs), median of 50.

Usage::

    nice -n 10 .venv/bin/python benchmarks/receiver_cpu.py [--n 1000]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ingest  # noqa: E402


def _cpu_s(pid: int, children: bool = False) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = int(fields[11]) + int(fields[12]) + ((int(fields[13]) + int(fields[14])) if children else 0)
    return ticks / os.sysconf("SC_CLK_TCK")


def flush_latency_ms(directory: Path, size: int, n: int = 50) -> float:
    """Median ``fdatasync`` time of an overwrite of ``size`` bytes in a pre-allocated file."""
    path = directory / "flush.bin"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.pwrite(fd, bytes(64 << 20), 0)
        os.fsync(fd)
        data, times = os.urandom(size), []
        for i in range(n):
            os.pwrite(fd, data, (i * size) % (64 << 20))
            t0 = time.perf_counter()
            os.fdatasync(fd)
            times.append(time.perf_counter() - t0)
        return statistics.median(times) * 1e3
    finally:
        os.close(fd)
        path.unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1000)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="receiver-cpu-") as tmp:
        work = Path(tmp)
        files = ingest.make_images(work / "images", args.n)
        with ingest.node_target(work / "node", 2) as (port, aet, pids, drained):
            c0 = sum(_cpu_s(p) for p in pids())
            dt = ingest.send(port, files, 1, aet)
            drained()
            node_cpu = (sum(_cpu_s(p) for p in pids()) - c0) / args.n * 1e3
        with ingest.storescp_target(work / "scp") as (port, aet, pids, _):
            pid = pids()[0]
            c0 = _cpu_s(pid, children=True)
            dt_scp = ingest.send(port, files, 1, aet)
            time.sleep(0.5)  # the association's child has exited and been reaped
            scp_cpu = (_cpu_s(pid, children=True) - c0) / args.n * 1e3
        f4k, f512k = flush_latency_ms(work, 4096), flush_latency_ms(work, 512 << 10)
    print(f"load average at the end {os.getloadavg()[0]:.1f}")
    print(f"node:     {args.n / dt:6.0f} images/s, CPU {node_cpu:.2f} ms/instance")
    print(f"storescp: {args.n / dt_scp:6.0f} images/s, CPU {scp_cpu:.2f} ms/instance")
    print(f"CPU bound ratio (storescp CPU / node CPU): {scp_cpu / node_cpu:.2f}")
    print(f"fdatasync of an overwrite: 4 KiB {f4k:.2f} ms, 512 KiB {f512k:.2f} ms "
          f"(one association can be acknowledged at most {1000 / f512k:.0f} times/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
