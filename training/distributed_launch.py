"""``dicomnode-train train ... --nproc-per-node N --nnodes M``: run the same command under torchrun.

The trainer already speaks DDP (rank 0 writes the bundle); this only starts the
processes. One machine: ``--nproc-per-node 2`` (torchrun ``--standalone``).
Several machines: the same command on each with ``--nnodes M --node-rank R
--master-addr HEAD --master-port 29500``. The equivalent torchrun line is::

    torchrun --nnodes M --node-rank R --master-addr HEAD --master-port 29500 \\
        --nproc-per-node N -m training.cli train TASK --data D --out OUT ...
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys

log = logging.getLogger(__name__)

__all__ = ["add_distributed_arguments", "relaunch_if_distributed", "torchrun_command", "torchrun_prefix"]

_FLAGS = ("--nproc-per-node", "--nnodes", "--node-rank", "--master-addr", "--master-port")


def add_distributed_arguments(p: argparse.ArgumentParser) -> None:
    """The torchrun options of ``train``."""
    p.add_argument("--nproc-per-node", type=int, default=1, help="training processes on this machine (DDP)")
    p.add_argument("--nnodes", type=int, default=1, help="machines taking part (run the command on each)")
    p.add_argument("--node-rank", type=int, default=0, help="this machine's rank, 0..nnodes-1")
    p.add_argument("--master-addr", default="127.0.0.1", help="address of the rank-0 machine")
    p.add_argument("--master-port", type=int, default=29500, help="rendezvous port on the rank-0 machine")


def _strip(argv: list[str]) -> list[str]:
    out: list[str] = []
    skip = False
    for a in argv:
        if skip:
            skip = False
            continue
        if a in _FLAGS:
            skip = True
            continue
        if a.split("=", 1)[0] in _FLAGS:
            continue
        out.append(a)
    return out


def torchrun_prefix(nproc_per_node: int, nnodes: int = 1, node_rank: int = 0, master_addr: str = "127.0.0.1",
                    master_port: int = 29500) -> list[str]:
    """``python -m torch.distributed.run ...`` up to the module to run (one machine: ``--standalone``)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc_per_node}"]
    if nnodes == 1:
        return [*cmd, "--standalone"]
    return [*cmd, f"--nnodes={nnodes}", f"--node-rank={node_rank}", f"--master-addr={master_addr}",
            f"--master-port={master_port}"]


def torchrun_command(args: argparse.Namespace, train_argv: list[str]) -> list[str]:
    """The torchrun command line running ``training.cli train_argv`` with the requested processes."""
    cmd = torchrun_prefix(args.nproc_per_node, args.nnodes, args.node_rank, args.master_addr, args.master_port)
    return [*cmd, "-m", "training.cli", *_strip(train_argv)]


def relaunch_if_distributed(args: argparse.Namespace, argv: list[str] | None = None) -> int | None:
    """Run the command under torchrun when more than one process is asked for; its exit status, else None.

    ``argv`` is the ``dicomnode-train`` argument list (default ``sys.argv[1:]``). Inside torchrun's
    processes (``LOCAL_RANK`` set) nothing is relaunched.
    """
    if "LOCAL_RANK" in os.environ or (args.nproc_per_node <= 1 and args.nnodes <= 1):
        return None
    if args.nproc_per_node < 1 or args.nnodes < 1 or not 0 <= args.node_rank < args.nnodes:
        print("error: --nproc-per-node and --nnodes must be >= 1 and --node-rank in 0..nnodes-1")
        return 2
    cmd = torchrun_command(args, list(sys.argv[1:] if argv is None else argv))
    log.info("running under torchrun: %s", " ".join(cmd))
    return subprocess.run(cmd, check=False).returncode
