"""Receiver settings: a finite maximum PDU everywhere, and the new keys' defaults."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from dicomnode.config import DEFAULT_MAX_PDU, Config, load_config
from dicomnode.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
SHIPPED = [REPO / "config" / "node.yaml", REPO / "deploy" / "node.container.yaml"]


def test_defaults_are_hardened() -> None:
    node = Config().node
    assert node.max_pdu == DEFAULT_MAX_PDU == 1 << 20
    assert node.check_called_ae_title is True
    assert node.resend_policy == "replace"
    assert node.max_pending_connections == 64


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_configs_announce_a_finite_max_pdu(path: Path) -> None:
    raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    assert 4096 <= raw["node"]["max_pdu"] <= 16 << 20
    assert load_config(path).node.max_pdu == raw["node"]["max_pdu"]


@pytest.mark.parametrize("value", [0, 100, (16 << 20) + 1])
def test_unlimited_or_out_of_range_max_pdu_is_a_clear_error(tmp_path: Path, value: int) -> None:
    cfg = tmp_path / "node.yaml"
    cfg.write_text(yaml.safe_dump({"node": {"max_pdu": value}}), encoding="utf-8")
    with pytest.raises(ConfigError, match="max_pdu"):
        load_config(cfg)


def test_resend_policy_is_validated(tmp_path: Path) -> None:
    cfg = tmp_path / "node.yaml"
    cfg.write_text(yaml.safe_dump({"node": {"resend_policy": "newest"}}), encoding="utf-8")
    with pytest.raises(ConfigError, match="resend_policy"):
        load_config(cfg)
