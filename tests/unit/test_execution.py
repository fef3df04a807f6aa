"""The ``execution`` config key, its checks, and the local engine (today's in-process behaviour)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dicomnode.checks import check_execution
from dicomnode.config import Config, load_config
from dicomnode.errors import ConfigError
from dicomnode.execution import LocalEngine, close_engines, engine_for
from dicomnode.processing import process_study
from dicomnode.results import ResultContext
from inference.tasks import TaskContext
from tests.plugins.bone_test_task import dx_dataset

REPO = Path(__file__).resolve().parents[2]
ROUTE = {"name": "r", "task": "test_task"}


def _write(tmp_path: Path, execution: dict) -> Path:
    p = tmp_path / "node.yaml"
    p.write_text(yaml.safe_dump({"routes": [ROUTE], "plugins": ["tests.plugins.bone_test_task"],
                                 "execution": execution}), encoding="utf-8")
    return p


def test_default_is_local_and_imports_no_ray() -> None:
    cfg = Config()
    assert cfg.execution.engine == "local"
    code = ("import sys; from dicomnode.config import Config; from dicomnode.execution import engine_for;"
            "e = engine_for(Config()); print(type(e).__name__, 'ray' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["LocalEngine", "False"], out.stderr


def test_ray_config_parsed(tmp_path: Path) -> None:
    cfg = load_config(_write(tmp_path, {"engine": "ray", "address": "10.0.0.5:6379",
                                        "actors": {"test_task": {"replicas": 4, "num_gpus": 0.25}}}))
    spec = cfg.execution.actors["test_task"]
    assert (spec.replicas, spec.num_gpus, spec.num_cpus) == (4, 0.25, 1.0)


@pytest.mark.parametrize(("execution", "message"), [
    ({"engine": "ray"}, "needs execution.address"),
    ({"engine": "local", "actors": {"test_task": {}}}, "only used with execution.engine 'ray'"),
    ({"engine": "ray", "address": "h:1", "actors": {"nope": {}}}, "no route uses: nope"),
    ({"engine": "ray", "address": "h:1", "actors": {"test_task": {"replica": 2}}}, "replica"),
    ({"engine": "ray", "address": "h:1", "actors": {"test_task": {"num_gpus": -1}}}, "num_gpus"),
    ({"engine": "spark"}, "engine"),
])
def test_bad_execution_config_is_one_clear_error(tmp_path: Path, execution: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(_write(tmp_path, execution))


def test_check_execution_address_and_ray(tmp_path: Path) -> None:
    bad = load_config(_write(tmp_path, {"engine": "ray", "address": "headnode"}))
    assert any("not host:port" in p for p in check_execution(bad))
    good = load_config(_write(tmp_path, {"engine": "ray", "address": "127.0.0.1:6379"}))
    pytest.importorskip("ray")
    assert check_execution(good) == []
    assert check_execution(Config()) == []


def test_check_config_cli_reports_bad_address(tmp_path: Path) -> None:
    p = _write(tmp_path, {"engine": "ray", "address": "headnode:port"})
    out = subprocess.run([sys.executable, "-m", "dicomnode.cli", "check-config", str(p)], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120, env={**__import__("os").environ,
                                                                          "PYTHONPATH": str(REPO)})
    assert out.returncode == 2 and "execution.address 'headnode:port' is not host:port" in out.stderr


def test_local_engine_equals_process_study() -> None:
    import tests.plugins.bone_test_task  # noqa: F401 - registers test_task

    ds = [dx_dataset("1.2.3", "1.2.3.4", i, seed=3) for i in range(2)]
    ctx = TaskContext(device="cpu")
    f1, o1 = LocalEngine().process_study(ds, "test_task", ctx, ResultContext())
    f2, o2 = process_study(ds, "test_task", ctx, ResultContext())
    assert f1.summary == f2.summary and [str(o.SOPClassUID) for o in o1] == [str(o.SOPClassUID) for o in o2]


def test_engine_for_is_one_per_config() -> None:
    cfg = Config()
    assert engine_for(cfg) is engine_for(cfg)
    close_engines()
