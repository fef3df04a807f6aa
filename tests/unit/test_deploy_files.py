"""deploy/ agrees with itself: the paths the docs and configs write lie inside the units' ReadWritePaths, and the
production install path installs run-time dependencies only."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path, PurePosixPath

import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"


def _unit(name: str) -> dict[str, list[str]]:
    """``key -> values`` of a systemd unit's [Service] section (repeated keys and space-separated lists joined)."""
    values: dict[str, list[str]] = {}
    section = ""
    for raw in (DEPLOY / name).read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
        elif section == "Service" and "=" in line:
            key, value = line.split("=", 1)
            values.setdefault(key.strip(), []).extend(value.split() if key.endswith("Paths") else [value])
    return values


def _rw_paths(unit: str) -> list[PurePosixPath]:
    return [PurePosixPath(p.lstrip("-+")) for p in _unit(unit).get("ReadWritePaths", [])]


def _inside(path: str | Path, roots: list[PurePosixPath]) -> bool:
    p = PurePosixPath(str(path))
    return p.is_absolute() and any(p == r or r in p.parents for r in roots)


def _yaml_blocks(md: str) -> list[dict]:
    text = (DEPLOY / md).read_text(encoding="utf-8")
    return [yaml.safe_load(b) for b in re.findall(r"```yaml\n(.*?)```", text, re.DOTALL)]


def _shell_blocks(md: str) -> str:
    text = (DEPLOY / md).read_text(encoding="utf-8")
    return "\n".join(re.findall(r"```(?:bash|sh)\n(.*?)```", text, re.DOTALL))


def test_nightly_paths_lie_inside_the_units_read_write_paths() -> None:
    node_rw, train_rw = _rw_paths("dicomnode.service"), _rw_paths("dicomnode-train.service")
    assert node_rw and train_rw
    blocks = _yaml_blocks("nightly.md")
    node_side = next(b for b in blocks if "training_archive" in b)["training_archive"]
    scheduler = next(b for b in blocks if "registry_dir" in b)
    # the node (dicomnode.service) writes the archive and its key folder
    for key in ("dir", "key_dir"):
        assert _inside(node_side[key], node_rw), (key, node_side[key], node_rw)
    assert not _inside(node_side["key_dir"], [PurePosixPath(node_side["dir"])]), "key_dir must not lie in dir"
    # the scheduler (dicomnode-train.service) writes the registry and moves label files; it reads the node's archive
    for key in ("registry_dir", "incoming_labels_dir"):
        assert _inside(scheduler[key], train_rw), (key, scheduler[key], train_rw)
    assert scheduler["archive_dir"] == node_side["dir"] and scheduler["key_dir"] == node_side["key_dir"]
    assert "/home" not in scheduler["key_dir"] and "/root" not in scheduler["key_dir"]  # ProtectHome=yes


def test_node_configs_write_inside_the_units_read_write_paths() -> None:
    node_rw = _rw_paths("dicomnode.service")
    container = yaml.safe_load((DEPLOY / "node.container.yaml").read_text(encoding="utf-8"))
    storage = container["node"]["storage_dir"]
    assert _inside(storage, node_rw), (storage, node_rw)
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text(encoding="utf-8"))
    mounts = compose["services"]["dicomnode"]["volumes"]
    assert f"node-var:{storage}" in mounts  # the container's storage_dir is its persistent volume
    assert f'VOLUME ["{storage}"]' in (DEPLOY / "Dockerfile").read_text(encoding="utf-8")
    # INSTALL.md's storage_dir and the units' working directory
    install = (DEPLOY / "INSTALL.md").read_text(encoding="utf-8")
    for path in re.findall(r"storage_dir: (/[^\s,]+)", install):
        assert _inside(path, node_rw), path
    for unit in ("dicomnode.service", "dicomnode-train.service"):
        workdir = _unit(unit)["WorkingDirectory"][0]
        assert _inside(workdir, _rw_paths(unit)), (unit, workdir)
        for exe in re.findall(r"(/opt/dicomnode/\S+)", " ".join(_unit(unit)["ExecStart"])):
            assert exe.startswith("/opt/dicomnode/.venv/bin/"), exe  # what scripts/install.sh creates


def test_production_install_has_its_own_run_time_path() -> None:
    commands = _shell_blocks("INSTALL.md")
    assert "scripts/install.sh" in commands
    assert "bootstrap.sh" not in commands  # the developer set-up (Orthanc, Chromium, pytest, ruff) stays off servers
    script = (REPO / "scripts" / "install.sh").read_text(encoding="utf-8")
    code = "\n".join(line for line in script.splitlines() if not line.lstrip().startswith("#"))
    assert re.search(r"apt-get install [^\n]*python3-venv", code)  # stock Debian lacks it
    for dev in ("chromium", "pytest", "ruff", "[dev]", "pip install -e", "orthanc"):
        assert dev not in code.lower(), dev
    assert re.search(r"pip install -q \.$", code, re.MULTILINE)
    assert "torch==$TORCH_VERSION" in code and 'TORCH_VERSION=2.14.1' in code
    assert subprocess.run(["bash", "-n", str(REPO / "scripts" / "install.sh")]).returncode == 0
