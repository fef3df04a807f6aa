"""The nightly scheduler runs a task's training under torchrun (2 CPU processes, gloo) from its own config."""

from __future__ import annotations

import datetime as _dt
import json
import time
from pathlib import Path

import pytest
import yaml

from inference.registry import ModelRegistry
from tests.unit.test_nightly_job import TASK, site  # noqa: F401 - the toy site fixture
from training.nightly.config import NightlyConfigError, load_nightly_config
from training.nightly.distributed import command
from training.nightly.scheduler import NightlyScheduler


def _config(t: Path, **extra: object) -> Path:
    raw = {"registry_dir": str(t / "models"), "archive_dir": str(t / "archive"), "key_dir": str(t / "keys"),
           "incoming_labels_dir": str(t / "incoming"), "device": "cpu", "plugins": ["tests.plugins.toy_training"],
           "tasks": {TASK: {"mode": "scratch", "epochs": 4, "lr": 0.05, "batch_size": 2, "margin": 0.1,
                            "train": {"amp": False, "seed": 3}}}, **extra}
    (t / "n.yaml").write_text(yaml.safe_dump(raw), encoding="utf-8")
    return t / "n.yaml"


def test_distributed_config_and_command(tmp_path: Path) -> None:
    cfg = load_nightly_config(_config(tmp_path, distributed={"nproc_per_node": 4, "nnodes": 2, "node_rank": 1,
                                                             "rdzv_endpoint": "10.0.0.5:29400"}))
    spec = cfg.distributed_for(TASK)
    cmd = command(spec, tmp_path / "c.yaml", TASK, "s1")
    assert cmd[1:3] == ["-m", "torch.distributed.run"] and "--nproc-per-node=4" in cmd and "--nnodes=2" in cmd
    assert "--node-rank=1" in cmd and "--master-addr=10.0.0.5" in cmd and "--master-port=29400" in cmd
    assert cmd[-9:] == ["-m", "training.cli", "schedule", "--config", str(tmp_path / "c.yaml"), "--once", TASK,
                        "--stamp", "s1"]
    one = load_nightly_config(_config(tmp_path, distributed={"nproc_per_node": 2}))
    assert "--standalone" in command(one.distributed_for(TASK), tmp_path / "c.yaml", TASK, "s")
    assert not load_nightly_config(_config(tmp_path)).distributed_for(TASK).enabled
    for bad, message in (({"nnodes": 2}, "needs rdzv_endpoint"), ({"nnodes": 2, "node_rank": 2, "rdzv_endpoint":
                                                                    "h:1"}, "node_rank 2 must be below")):
        with pytest.raises(NightlyConfigError, match=message):
            load_nightly_config(_config(tmp_path, distributed=bad))


@pytest.mark.slow
def test_scheduled_run_trains_on_two_processes(site: dict, capfd: pytest.CaptureFixture[str]) -> None:  # noqa: F811
    """The cron fires, the scheduler starts torchrun itself; both ranks train, rank 0 alone gates and promotes."""
    t = site["tmp"]
    fire = _dt.datetime.now() + _dt.timedelta(seconds=3)
    path = _config(t, distributed={"nproc_per_node": 2})
    raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    raw["tasks"][TASK]["cron"] = f"{fire.second} {fire.minute} {fire.hour} * * *"  # once, in 3 s
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    ns = NightlyScheduler(load_nightly_config(path))
    ns.start()
    runs = t / "models" / TASK / "runs"
    try:
        deadline = time.monotonic() + 400
        while time.monotonic() < deadline and not (list(runs.glob("*/report.json")) and ns.running == 0):
            time.sleep(0.5)
    finally:
        ns.shutdown(wait=True)
    out = capfd.readouterr()
    reports = [json.loads(p.read_text()) for p in runs.glob("*/report.json")]
    assert len(reports) == 1, out.err[-4000:]
    assert reports[0]["status"] == "promoted", (reports, out.err[-4000:])
    assert "trained as rank 1 of 2" in out.out and out.out.count("promoted") == 1, out.out
    reg: ModelRegistry = site["registry"]
    assert reg.current(TASK) == reports[0]["version"] and reg.current(TASK).startswith("nightly-")
    assert [p.name for p in runs.iterdir() if p.is_dir()] == [p.parent.name for p in runs.glob("*/report.json")]
    assert not list((t / "models" / ".nightly").glob("torchrun-*.yaml"))  # the launch config is cleaned up
