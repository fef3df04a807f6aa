"""Registers the toy training task ``toy_square`` (test-only) when imported, e.g. as a nightly ``plugins`` entry."""

from __future__ import annotations

from tests.unit.toy_adapter import ADAPTER
from training.tasks import register_adapter

register_adapter(ADAPTER)
