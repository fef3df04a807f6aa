"""Shared by the tests of the shipped demo bundles: evaluate ``models/<task>/current`` on fresh synthetic studies."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from inference.errors import ModelNotFoundError
from inference.registry import ModelRegistry
from training.evaluate import evaluate_bundle

REPO_ROOT = Path(__file__).resolve().parents[2]


def shipped_metrics(task: str, generator: ModuleType, n: int, seed: int, tmp_path: Path, *, workers: int = 1
                    ) -> dict[str, Any]:
    """Metrics of the shipped bundle of ``task`` on ``n`` studies of ``generator`` (seed ``seed``), through
    the ``dicomnode-train evaluate`` code path on CPU; skips the test when no bundle is committed."""
    try:
        bundle_dir = ModelRegistry(REPO_ROOT / "models").current_dir(task)
    except ModelNotFoundError as exc:
        pytest.skip(f"no shipped {task} bundle: {exc}")
    generator.generate(tmp_path / "data", n, seed, workers=workers)
    return evaluate_bundle(bundle_dir, tmp_path / "data", subset="all", device="cpu").result.metrics
