"""``dicomnode-train train --nproc-per-node N --nnodes M`` and DDP with two CPU processes (gloo)."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.unit.toy_adapter import make_toy_data
from training.distributed_launch import add_distributed_arguments, relaunch_if_distributed, torchrun_command

ROOT = Path(__file__).resolve().parents[2]


def _args(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_distributed_arguments(p)
    return p.parse_known_args(list(argv))[0]


def test_torchrun_command_single_machine() -> None:
    argv = ["train", "wrist_fracture", "--data", "d", "--out", "o", "--nproc-per-node", "2"]
    cmd = torchrun_command(_args(*argv), argv)
    assert cmd[1:] == ["-m", "torch.distributed.run", "--nproc-per-node=2", "--standalone", "-m", "training.cli",
                       "train", "wrist_fracture", "--data", "d", "--out", "o"]


def test_torchrun_command_several_machines() -> None:
    argv = ["train", "t", "--data", "d", "--out", "o", "--nproc-per-node=4", "--nnodes", "2", "--node-rank", "1",
            "--master-addr", "10.0.0.5"]
    cmd = torchrun_command(_args(*argv), argv)
    assert "--nnodes=2" in cmd and "--node-rank=1" in cmd and "--master-addr=10.0.0.5" in cmd
    assert "--master-port=29500" in cmd and "--standalone" not in cmd
    assert cmd[-7:] == ["training.cli", "train", "t", "--data", "d", "--out", "o"]


def test_no_relaunch_for_one_process_or_inside_torchrun(monkeypatch: pytest.MonkeyPatch) -> None:
    assert relaunch_if_distributed(_args(), ["train"]) is None
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert relaunch_if_distributed(_args("--nproc-per-node", "2"), ["train"]) is None
    monkeypatch.delenv("LOCAL_RANK")
    assert relaunch_if_distributed(_args("--nnodes", "2", "--node-rank", "2"), ["train"]) == 2


@pytest.mark.slow
def test_two_gloo_ranks_agree_after_a_step_and_bundle_written_once(tmp_path: Path) -> None:
    data = tmp_path / "data"
    rows = make_toy_data(data, n_patients=8)
    (data / "rows.json").write_text(json.dumps(rows))
    out = tmp_path / "bundle"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           "-m", "tests.unit.ddp_rank_worker", str(data), str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0 = torch.load(f"{out}.rank0.pt")
    r1 = torch.load(f"{out}.rank1.pt")
    assert r0.keys() == r1.keys() and r0
    for k in r0:
        assert torch.equal(r0[k], r1[k]), k
    assert [p.parent for p in tmp_path.rglob("bundle.json")] == [out]  # one bundle, written by rank 0
