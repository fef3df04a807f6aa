"""The README tells an operator what they need: how the CLIs get onto PATH, the venv's size, every config key."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from dicomnode.config import Config, Destination, TrainingArchiveConfig

REPO = Path(__file__).resolve().parents[2]
README = (REPO / "README.md").read_text(encoding="utf-8")


def _config_table() -> str:
    section = README[README.index("## Configuration reference"):]
    return section[:section.index("\n## ", 3)]


def test_config_table_names_every_top_level_key_and_the_operator_rows() -> None:
    table = _config_table()
    keys = set(re.findall(r"^\| `([^`]+)`", table, re.MULTILINE))
    for name in Config.model_fields:
        assert any(k == name or k.startswith((name + ".", name + "[")) for k in keys), name
    row: dict[str, str] = {}
    for line in table.splitlines():
        if line.startswith("| `"):
            for k in re.findall(r"`([^`]+)`", line.split("|")[1]):
                row[k] = line
    assert "status_http_host" in row["node.status_http_port"]
    assert "destinations.<name>.calling_ae_title" in row
    assert "calling_ae_title" in Destination.model_fields
    for field in TrainingArchiveConfig.model_fields:
        assert f"`{field}`" in row["training_archive"], field


def test_readme_says_how_the_clis_get_onto_path_and_how_big_the_venv_is() -> None:
    assert "source .venv/bin/activate" in README and "make shell" in README
    assert re.search(r"about \*\*6 GB\*\*.*CUDA", README, re.DOTALL)
    dry = subprocess.run(["make", "-n", "-C", str(REPO), "shell"], capture_output=True, text=True, timeout=30)
    assert dry.returncode == 0 and ".venv/bin:" in dry.stdout, dry.stdout + dry.stderr
