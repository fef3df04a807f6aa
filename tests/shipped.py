"""Where the repository's shipped model bundles are: ``models/<task>/current`` names the served version."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

__all__ = ["ROOT", "shipped_bundle"]


def shipped_bundle(task: str) -> Path:
    """The directory of ``task``'s shipped bundle (a path that does not exist when none is shipped)."""
    current = ROOT / "models" / task / "current"
    return ROOT / "models" / task / (current.read_text().strip() if current.exists() else "missing")
