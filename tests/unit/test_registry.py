"""Registry layout, atomic pointer, and hot swap in ModelCache."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest
import torch

from inference.bundle import BundleMeta, save_bundle
from inference.errors import BundleError, ModelNotFoundError
from inference.registry import ModelCache, ModelRegistry


class Scale(torch.nn.Module):
    """y = w * x; the weight identifies the version."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w * x


def _bundle(root: Path, version: str, w: float, task: str = "toy", created: str | None = None) -> Path:
    m = Scale()
    with torch.no_grad():
        m.w.fill_(w)
    meta = BundleMeta(task=task, version=version, architecture="scale")
    if created:
        meta = meta.model_copy(update={"created_at": created})
    return save_bundle(root / f"cand-{task}-{version}", meta, m.state_dict(), "")


def _builder(bundle) -> torch.nn.Module:
    return bundle.load_into(Scale())


def test_promote_layout_and_versions(tmp_path: Path) -> None:
    reg = ModelRegistry(tmp_path / "models")
    assert reg.current("toy") is None and reg.versions("toy") == []
    with pytest.raises(ModelNotFoundError):
        reg.current_dir("toy")
    reg.promote("toy", _bundle(tmp_path, "1", 1.0, created="2024-01-01T00:00:00+00:00"))
    reg.promote("toy", _bundle(tmp_path, "2", 2.0, created="2024-02-01T00:00:00+00:00"))
    assert reg.versions("toy") == ["1", "2"] and reg.current("toy") == "2"
    assert (tmp_path / "models" / "toy" / "2" / "weights.pt").exists()
    assert (tmp_path / "models" / "toy" / "current").read_text().strip() == "2"
    assert reg.tasks() == ["toy"]
    reg.set_current("toy", "1")  # roll back
    assert reg.current("toy") == "1"
    with pytest.raises(ModelNotFoundError):
        reg.set_current("toy", "9")
    with pytest.raises(BundleError):
        reg.promote("other", _bundle(tmp_path, "3", 3.0))
    with pytest.raises(BundleError):  # same version, different weights
        reg.promote("toy", _bundle(tmp_path / "x", "2", 5.0))
    assert not [p for p in (tmp_path / "models" / "toy").iterdir() if p.name.startswith(".")]


def test_hot_swap_keeps_inflight_model(tmp_path: Path) -> None:
    reg = ModelRegistry(tmp_path / "models")
    reg.promote("toy", _bundle(tmp_path, "1", 1.0))
    cache = ModelCache(reg, device="cpu", builder=_builder, check_interval_s=3600)
    x = torch.tensor([3.0])
    job_a = cache.get("toy")
    assert job_a.version == "1" and cache.get("toy") is job_a  # warm
    reg.promote("toy", _bundle(tmp_path, "2", 2.0))
    assert cache.get("toy").version == "1"  # not re-checked yet (interval)
    cache.reload("toy")
    job_b = cache.get("toy")
    assert job_b.version == "2"
    with torch.inference_mode():
        assert float(job_a.model(x)) == 3.0  # the in-flight job still has the old model
        assert float(job_b.model(x)) == 6.0
    assert cache.loaded_versions() == {"toy": "2"}


def test_swap_detected_by_pointer_check(tmp_path: Path) -> None:
    reg = ModelRegistry(tmp_path / "models")
    reg.promote("toy", _bundle(tmp_path, "1", 1.0))
    cache = ModelCache(reg, device="cpu", builder=_builder, check_interval_s=0)
    assert cache.get("toy").version == "1"
    reg.promote("toy", _bundle(tmp_path, "2", 2.0))
    assert cache.get("toy").version == "2"
    os.unlink(reg.pointer_path("toy"))  # pointer vanished: keep serving the last good model
    assert cache.get("toy").version == "2"
    with pytest.raises(ModelNotFoundError):
        cache.get("absent")


def test_concurrent_gets_load_once(tmp_path: Path) -> None:
    reg = ModelRegistry(tmp_path / "models")
    reg.promote("toy", _bundle(tmp_path, "1", 1.0))
    calls = []

    def counting(bundle):
        calls.append(bundle.version)
        return _builder(bundle)

    cache = ModelCache(reg, device="cpu", builder=counting, check_interval_s=60)
    got = []
    threads = [threading.Thread(target=lambda: got.append(cache.get("toy"))) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert calls == ["1"] and len({id(g) for g in got}) == 1


def test_pinned_bundle(tmp_path: Path) -> None:
    cache = ModelCache(ModelRegistry(tmp_path / "models"), device="cpu", builder=_builder)
    b = _bundle(tmp_path, "7", 7.0)
    assert cache.get_pinned(b).version == "7"
    assert cache.get_pinned(b) is cache.get_pinned(b)


def test_load_model_and_shared_cache(tmp_path: Path) -> None:
    from inference.registry import load_model, shared_cache

    reg = ModelRegistry(tmp_path / "models")
    b = _bundle(tmp_path, "1", 1.0)
    reg.promote("toy", b)
    assert load_model("toy", models_dir=tmp_path / "models", device="cpu", builder=_builder).version == "1"
    assert load_model("toy", model_dir=b, device="cpu", builder=_builder).version == "1"
    with pytest.raises(BundleError):
        load_model("other", model_dir=b, device="cpu", builder=_builder)
    with pytest.raises(ModelNotFoundError):
        load_model("toy", device="cpu")
    assert shared_cache(tmp_path / "models", "cpu") is shared_cache(tmp_path / "models", "cpu")


def test_broken_promotion_keeps_last_good_model(tmp_path: Path) -> None:
    reg = ModelRegistry(tmp_path / "models")
    reg.promote("toy", _bundle(tmp_path, "1", 1.0))
    cache = ModelCache(reg, device="cpu", builder=_builder, check_interval_s=0)
    assert cache.get("toy").version == "1"
    reg.promote("toy", _bundle(tmp_path, "2", 2.0))
    (tmp_path / "models" / "toy" / "2" / "weights.pt").write_bytes(b"garbage")  # damaged after promotion
    assert cache.get("toy").version == "1"
    reg.promote("toy", _bundle(tmp_path, "3", 3.0))
    assert cache.get("toy").version == "3"
    fresh = ModelCache(reg, device="cpu", builder=_builder)
    reg.set_current("toy", "2")
    with pytest.raises(BundleError):
        fresh.get("toy")
