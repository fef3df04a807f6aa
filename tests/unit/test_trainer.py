"""The one training loop: tiny model on synthetic DICOMs -> bundle -> registry; determinism; resume."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
import torch

from inference.bundle import load_bundle
from inference.registry import ModelCache, ModelRegistry
from tests.unit.toy_adapter import ADAPTER, ToyConfig, build_from_bundle, make_toy_data, preprocess
from training.data import SplitConfig, records_from_rows, split_records
from training.trainer import (
    EpochSampler,
    TrainConfig,
    TrainError,
    balanced_indices,
    load_initial_weights,
    train,
)

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def toy_split(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("toydata")
    rows = make_toy_data(root, n_patients=12)
    records = records_from_rows(rows, root)
    return split_records(records, SplitConfig(train=0.5, val=0.25, holdout=0.25))


def _cfg(**kw) -> TrainConfig:
    base = dict(epochs=4, batch_size=2, lr=5e-2, seed=3, device="cpu", schedule="cosine", amp=False)
    base.update(kw)
    return TrainConfig(**base)


def test_train_bundle_registry_deterministic(toy_split, tmp_path: Path) -> None:
    cfg = _cfg(version="v1")
    r1 = train(ADAPTER, toy_split, tmp_path / "b1", cfg, ToyConfig())
    r2 = train(ADAPTER, toy_split, tmp_path / "b2", cfg, ToyConfig())
    b1, b2 = load_bundle(r1.bundle_dir), load_bundle(r2.bundle_dir)
    assert b1.meta.task == "toy_square" and b1.meta.version == "v1"
    assert b1.meta.synthetic_only is True
    assert b1.meta.holdout_hash == toy_split.holdout_hash
    assert b1.meta.training_data_hash and len(b1.meta.training_log) == r1.epochs_run == 4
    assert "accuracy" in b1.meta.metrics and 0.0 <= b1.meta.metrics["accuracy"] <= 1.0
    assert "synthetic" in b1.card.lower()
    for k in b1.state_dict:
        assert torch.equal(b1.state_dict[k], b2.state_dict[k]), k
    # the loss went down on this separable toy problem
    assert r1.history[-1]["train_loss"] < r1.history[0]["train_loss"]

    reg = ModelRegistry(tmp_path / "models")
    assert reg.promote("toy_square", r1.bundle_dir) == "v1"
    cache = ModelCache(reg, device="cpu", builder=build_from_bundle, check_interval_s=0)
    loaded = cache.get("toy_square")
    assert loaded.version == "v1" and not loaded.model.training
    x = torch.from_numpy(preprocess(toy_split.holdout[0])[0]["image"][None])
    with torch.inference_mode():
        out1 = loaded.model(x)
        out2 = build_from_bundle(load_bundle(r2.bundle_dir))(x)
    assert torch.equal(out1, out2)


def test_init_from_bundle_starts_from_its_weights(toy_split, tmp_path: Path) -> None:
    first = train(ADAPTER, toy_split, tmp_path / "b1", _cfg(epochs=2, version="v1"), ToyConfig())
    src = load_bundle(first.bundle_dir)
    fresh = ADAPTER.build_model(ToyConfig())
    assert any(not torch.equal(v, src.state_dict[k]) for k, v in fresh.state_dict().items())
    note = load_initial_weights(fresh, first.bundle_dir, ADAPTER, ToyConfig())
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, src.state_dict[k].float()), k
    assert "toy_square/v1" in note and src.meta.weights_sha256 in note
    # a run warm-started from v1 records where it began, and its first epoch starts below a fresh run's loss
    warm = train(ADAPTER, toy_split, tmp_path / "b2", _cfg(epochs=1, init_from=first.bundle_dir), ToyConfig())
    cold = train(ADAPTER, toy_split, tmp_path / "b3", _cfg(epochs=1), ToyConfig())
    assert "initialised from bundle toy_square/v1" in load_bundle(warm.bundle_dir).meta.notes
    assert warm.history[0]["train_loss"] < cold.history[0]["train_loss"]
    # another network's bundle is refused with a clear error, not loaded partially
    with pytest.raises(TrainError, match="holds"):
        load_initial_weights(fresh, first.bundle_dir, ADAPTER, ToyConfig(channels=6))
    with pytest.raises(TrainError, match="init_from"):
        load_initial_weights(fresh, tmp_path / "missing", ADAPTER, ToyConfig())
    # a setting tuned after training that the architecture's init args carry (as physis carries its threshold in
    # its post-processing rules) is no other network: the bundle's own value is compared, and the weights load
    with pytest.raises(TrainError, match="holds"):
        load_initial_weights(fresh, first.bundle_dir, ADAPTER, ToyConfig(dropout=0.3))
    load_initial_weights(fresh, first.bundle_dir, ADAPTER, _TunedToyConfig(dropout=0.3))
    with pytest.raises(TrainError, match="holds"):
        load_initial_weights(fresh, first.bundle_dir, ADAPTER, _TunedToyConfig(dropout=0.3, channels=6))


class _TunedToyConfig(ToyConfig):
    """The toy config with its dropout declared an after-training setting."""

    after_training: ClassVar[frozenset[str]] = frozenset({"dropout"})


def test_init_matching_copies_the_shared_tensors_and_starts_the_rest_fresh(toy_split, tmp_path: Path) -> None:
    first = train(ADAPTER, toy_split, tmp_path / "b1", _cfg(epochs=1, version="v1"), ToyConfig())
    src = load_bundle(first.bundle_dir).state_dict
    torch.manual_seed(0)
    wider = ADAPTER.build_model(ToyConfig(channels=6))  # another variant of the task: only the head's tail fits
    before = {k: v.clone() for k, v in wider.state_dict().items()}
    note = load_initial_weights(wider, first.bundle_dir, ADAPTER, ToyConfig(channels=6), mode="matching",
                                skip=["head.4.*"])
    after = wider.state_dict()
    assert torch.equal(after["head.1.bias"], src["head.1.bias"].float())  # same name and shape: copied
    for k in ("features.0.weight", "head.1.weight", "head.4.weight", "head.4.bias"):  # other shape or skipped
        assert torch.equal(after[k], before[k]), k
    assert "initialised 1 of 8 tensors from bundle toy_square/v1" in note and "7 started fresh" in note
    assert "head.4.*" in note
    # the same network with a pattern: the named module starts fresh, everything else is the bundle's
    same = ADAPTER.build_model(ToyConfig())
    fresh_head = same.state_dict()["head.4.weight"].clone()
    load_initial_weights(same, first.bundle_dir, ADAPTER, ToyConfig(), mode="matching", skip=["head.4.*"])
    assert torch.equal(same.state_dict()["head.4.weight"], fresh_head)
    assert torch.equal(same.state_dict()["features.0.weight"], src["features.0.weight"].float())
    # nothing to copy, a pattern in exact mode, and a config asking for that, are refused
    with pytest.raises(TrainError, match="no weight"):
        load_initial_weights(same, first.bundle_dir, ADAPTER, ToyConfig(), mode="matching", skip=["*"])
    with pytest.raises(TrainError, match="init_skip"):
        load_initial_weights(same, first.bundle_dir, ADAPTER, ToyConfig(), skip=["head.*"])
    with pytest.raises(ValueError, match="init_skip needs init_mode=matching"):
        TrainConfig(init_from=first.bundle_dir, init_skip=["head.*"])
    # a matching-mode run records the partial start in its bundle
    run = train(ADAPTER, toy_split, tmp_path / "b2", _cfg(epochs=1, init_from=first.bundle_dir, init_mode="matching",
                                                           init_skip=["head.4.*"]), ToyConfig(channels=6))
    assert "initialised 1 of 8 tensors" in load_bundle(run.bundle_dir).meta.notes


class _LayoutSpy(type(ADAPTER)):  # type: ignore[misc]
    """The toy adapter, recording the memory layout of the conv weights at every training step."""

    def __init__(self) -> None:
        self.layouts: list[bool] = []

    def forward(self, model, batch, device):
        convs = [p for p in model.parameters() if p.ndim == 4]
        self.layouts.append(all(p.is_contiguous(memory_format=torch.channels_last) for p in convs))
        return super().forward(model, batch, device)


@pytest.mark.parametrize("channels_last", [True, False])
def test_trainer_channels_last_switch(toy_split, tmp_path: Path, channels_last: bool) -> None:
    spy = _LayoutSpy()
    result = train(spy, toy_split, tmp_path / "b", _cfg(epochs=1, channels_last=channels_last), ToyConfig())
    assert spy.layouts and all(v is channels_last for v in spy.layouts)
    # the saved weights are an ordinary state dict either way (the bundle rebuilds and runs)
    x = torch.from_numpy(preprocess(toy_split.holdout[0])[0]["image"][None])
    with torch.inference_mode():
        assert torch.isfinite(build_from_bundle(load_bundle(result.bundle_dir))(x)).all()


def test_resume_equals_uninterrupted(toy_split, tmp_path: Path) -> None:
    cfg = _cfg(version="r", epochs=5, checkpoint_every=1, balanced_sampling=True)
    full = train(ADAPTER, toy_split, tmp_path / "full", cfg, ToyConfig(), work_dir=tmp_path / "w_full")

    class Interrupt(Exception):
        pass

    def stop_after_2(epoch: int, _entry: dict) -> None:
        if epoch == 1:
            raise Interrupt

    with pytest.raises(Interrupt):
        train(ADAPTER, toy_split, tmp_path / "part", cfg, ToyConfig(), work_dir=tmp_path / "w_part",
              callbacks=[stop_after_2])
    assert not (tmp_path / "part").exists()
    seen: list[int] = []
    resumed = train(ADAPTER, toy_split, tmp_path / "part", cfg, ToyConfig(), work_dir=tmp_path / "w_part",
                    callbacks=[lambda epoch, _e: seen.append(epoch)])
    assert seen == [2, 3, 4]  # it continued from the checkpoint instead of starting over
    a, b = load_bundle(full.bundle_dir), load_bundle(resumed.bundle_dir)
    for k in a.state_dict:
        assert torch.equal(a.state_dict[k], b.state_dict[k]), k
    assert [h["train_loss"] for h in full.history] == [h["train_loss"] for h in resumed.history]


def test_early_stopping_stops(toy_split, tmp_path: Path) -> None:
    cfg = _cfg(epochs=30, lr=1e-9, early_stopping_patience=2, version="es")
    res = train(ADAPTER, toy_split, tmp_path / "es", cfg, ToyConfig())
    assert res.epochs_run < 30


def test_time_budget_stops_after_the_epoch_that_crosses_it(toy_split, tmp_path: Path) -> None:
    cfg = _cfg(epochs=4, time_budget_s=1e-6, version="tb")
    res = train(ADAPTER, toy_split, tmp_path / "tb", cfg, ToyConfig())
    assert res.epochs_run == 1
    assert res.history[-1]["stopped_by_time_budget"] is True
    assert (tmp_path / "tb" / "bundle.json").exists()
    # the next lease resumes from the checkpoint under a new budget and trains the remaining epochs
    more = train(ADAPTER, toy_split, tmp_path / "tb", _cfg(epochs=4, version="tb"), ToyConfig())
    assert more.epochs_run == 4 and not more.history[-1].get("stopped_by_time_budget")


def test_balanced_indices_without_replacement() -> None:
    labels = [0] * 10 + [1] * 3
    idx = balanced_indices(labels, np.random.default_rng(0))
    assert len(idx) == 6 and len(set(idx)) == 6
    assert sum(labels[i] for i in idx) == 3


def test_epoch_sampler_shards_and_repeats() -> None:
    s0 = EpochSampler(10, seed=1, rank=0, world_size=2)
    s1 = EpochSampler(10, seed=1, rank=1, world_size=2)
    s0.set_epoch(3)
    s1.set_epoch(3)
    assert sorted(list(s0) + list(s1)) == list(range(10))
    again = EpochSampler(10, seed=1)
    again.set_epoch(3)
    first = list(again)
    again.set_epoch(4)
    assert first != list(again)
    again.set_epoch(3)
    assert first == list(again)


def test_cli_train_evaluate_promote(tmp_path: Path) -> None:
    import json

    from training.cli import main
    from training.tasks import register_adapter

    register_adapter(ADAPTER)
    data = tmp_path / "data"
    rows = make_toy_data(data, n_patients=12, seed=5)
    (data / "labels.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "cfg.yaml").write_text("train:\n  lr: 0.005\n  schedule: step\n  step_size: 1\ntask:\n  channels: 3\n")
    common = ["--data", str(data), "--device", "cpu", "--config", str(tmp_path / "cfg.yaml"), "--set", "batch_size=4"]
    assert main(["train", "toy_square", "--out", str(tmp_path / "b1"), "--epochs", "2", "--version", "c1",
                 "--set", "seed=1", *common]) == 0
    meta = load_bundle(tmp_path / "b1").meta
    assert meta.init_args["channels"] == [3, 3] and meta.train_config["lr"] == 0.005 and meta.train_config["epochs"] == 2

    assert main(["evaluate", str(tmp_path / "b1"), "--data", str(data), "--out", str(tmp_path / "ev"),
                 "--device", "cpu"]) == 0
    report = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert report["holdout_matches_bundle"] is True and report["metrics"]["accuracy"] == meta.metrics["accuracy"]
    for name in ("report.md", "confusion_matrix.png", "calibration.png", "learning_curves.png"):
        assert (tmp_path / "ev" / name).stat().st_size > 0, name
    md = (tmp_path / "ev" / "report.md").read_text()
    assert "| accuracy |" in md and "0.9" in md  # our figure beside the reference figure

    reg = tmp_path / "models"
    assert main(["promote", str(tmp_path / "b1"), "--registry", str(reg)]) == 0
    assert ModelRegistry(reg).current("toy_square") == "c1"
    # a candidate must beat the current one by the margin on the same hold-out: impossible with margin 2
    assert main(["train", "toy_square", "--out", str(tmp_path / "b2"), "--epochs", "2", "--version", "c2",
                 "--set", "seed=2", *common]) == 0
    assert main(["promote", str(tmp_path / "b2"), "--registry", str(reg), "--data", str(data),
                 "--margin", "2", "--device", "cpu"]) == 1
    assert ModelRegistry(reg).current("toy_square") == "c1"
    assert main(["promote", str(tmp_path / "b2"), "--registry", str(reg), "--margin", "-2"]) == 0
    assert ModelRegistry(reg).current("toy_square") == "c2"
    assert main(["train", "toy_square", "--out", str(tmp_path / "b3"), "--set", "nonsense=1", *common]) == 2


def test_dataloader_workers_same_result(toy_split, tmp_path: Path) -> None:
    cfg = _cfg(version="w", epochs=2)
    serial = train(ADAPTER, toy_split, tmp_path / "w0", cfg, ToyConfig())
    parallel = train(ADAPTER, toy_split, tmp_path / "w2", cfg.model_copy(update={"num_workers": 2}), ToyConfig())
    a, b = load_bundle(serial.bundle_dir), load_bundle(parallel.bundle_dir)
    for k in a.state_dict:
        assert torch.equal(a.state_dict[k], b.state_dict[k]), k


@pytest.mark.slow
def test_torchrun_ddp_world_size_2(tmp_path: Path) -> None:
    """The same train() under torchrun with two CPU processes (gloo) writes one bundle."""
    import json
    import os
    import subprocess
    import sys

    data = tmp_path / "data"
    rows = make_toy_data(data, n_patients=8)
    (data / "rows.json").write_text(json.dumps(rows))
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "-m", "tests.unit.ddp_worker", str(data), str(tmp_path / "bundle")],
        cwd=root, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    b = load_bundle(tmp_path / "bundle")
    assert b.meta.version == "ddp" and len(b.meta.training_log) == 2
    assert not any(k.startswith("module.") for k in b.state_dict)  # saved unwrapped from DDP


def test_task_uses_promoted_bundle_and_hot_swaps(toy_split, tmp_path: Path) -> None:
    """Train -> bundle -> registry -> task run through inference.tasks; deterministic; swap on promotion."""
    import pydicom

    from inference.tasks import TaskContext, get_task
    from tests.unit import toy_task  # noqa: F401 - registers the task

    r1 = train(ADAPTER, toy_split, tmp_path / "v1", _cfg(version="v1"), ToyConfig())
    r2 = train(ADAPTER, toy_split, tmp_path / "v2", _cfg(version="v2", seed=11, epochs=1), ToyConfig())
    reg = ModelRegistry(tmp_path / "models")
    reg.promote("toy_square", r1.bundle_dir)
    datasets = [pydicom.dcmread(f) for f in toy_split.holdout[0].files]
    ctx = TaskContext(models_dir=tmp_path / "models", device="cpu")
    task = get_task("toy_square")
    f1, f1b = task(datasets, ctx), task(datasets, ctx)
    assert f1.algorithm_version == "v1" and f1.synthetic_model
    assert f1.classifications[0].probability == f1b.classifications[0].probability  # deterministic on CPU
    assert {"load", "preprocess", "forward", "postprocess"} <= set(f1.timings_s)
    reg.promote("toy_square", r2.bundle_dir)
    from inference.tasks.base import model_cache

    model_cache(tmp_path / "models", "cpu").reload("toy_square")
    f2 = task(datasets, ctx)
    assert f2.algorithm_version == "v2"
    assert f2.classifications[0].probability != f1.classifications[0].probability
    pinned = task(datasets, TaskContext(models_dir=tmp_path / "models", model_dir=r1.bundle_dir, device="cpu"))
    assert pinned.algorithm_version == "v1"


def _sr_values(path: Path) -> tuple[str, list[float]]:
    """(all text in an SR, its numeric values) for assertions independent of the tree layout."""
    import pydicom

    ds = pydicom.dcmread(path)
    texts: list[str] = []
    nums: list[float] = []

    def walk(seq) -> None:
        for item in seq:
            for kw in ("TextValue", "UID", "PersonName"):
                if kw in item:
                    texts.append(str(item.get(kw)))
            if "MeasuredValueSequence" in item:
                nums.extend(float(m.NumericValue) for m in item.MeasuredValueSequence)
            if "ContentSequence" in item:
                walk(item.ContentSequence)

    walk(ds.get("ContentSequence", []))
    return " ".join(texts) + " " + str(ds.get("SoftwareVersions", "")), nums


def test_dicomnode_analyze_end_to_end(toy_split, tmp_path: Path) -> None:
    """Tiny trained bundle -> registry -> `dicomnode analyze` writes an SR; deterministic; a promotion swaps it."""
    pytest.importorskip("dicomnode.analyze")
    import shutil

    from dicomnode.cli import main
    from inference.tasks.base import model_cache
    from tests.unit import toy_task  # noqa: F401 - registers the task

    reg = tmp_path / "models"
    for version, seed in (("toyver-first", 3), ("toyver-second", 11)):
        res = train(ADAPTER, toy_split, tmp_path / version, _cfg(version=version, seed=seed), ToyConfig())
        if version == "toyver-first":
            ModelRegistry(reg).promote("toy_square", res.bundle_dir)
    study = tmp_path / "study"
    study.mkdir()
    for f in toy_split.holdout[0].files:
        shutil.copy(f, study / f.name)
    args = ["analyze", str(study), "--task", "toy_square", "--models-dir", str(reg), "--device", "cpu"]
    assert main([*args, "--out", str(tmp_path / "out1")]) == 0
    assert main([*args, "--out", str(tmp_path / "out2")]) == 0
    sr1 = sorted((tmp_path / "out1").glob("SR_*.dcm"))
    sr2 = sorted((tmp_path / "out2").glob("SR_*.dcm"))
    assert len(sr1) == len(sr2) == 1
    text1, nums1 = _sr_values(sr1[0])
    _, nums2 = _sr_values(sr2[0])
    assert "toyver-first" in text1 and nums1 and nums1 == nums2  # deterministic on CPU

    ModelRegistry(reg).promote("toy_square", tmp_path / "toyver-second")
    model_cache(reg, "cpu").reload("toy_square")
    assert main([*args, "--out", str(tmp_path / "out3")]) == 0
    text3, _ = _sr_values(next((tmp_path / "out3").glob("SR_*.dcm")))
    assert "toyver-second" in text3 and "toyver-first" not in text3


class _CutoffConfig(ToyConfig):
    """The toy task with an operating point chosen after training."""

    cutoff: float | None = None
    after_training = frozenset({"cutoff"})


class _CutoffAdapter(type(ADAPTER)):  # type: ignore[misc]
    config_model = _CutoffConfig

    def __init__(self) -> None:
        self.tuned_on: list[int] = []
        self.evaluated: list[int] = []

    def evaluate(self, model, loader, device, cfg):
        res = super().evaluate(model, loader, device, cfg)
        self.evaluated.append(int(res.y_true.size))
        res.metrics["cutoff_used"] = cfg.cutoff
        return res

    def tune(self, result, cfg):
        self.tuned_on.append(int(result.y_true.size))
        value = float(np.median(result.y_prob))
        return cfg.model_copy(update={"cutoff": value}), f"cutoff {value:.4f} from validation"


def test_tune_sets_operating_point_on_validation_before_holdout(toy_split, tmp_path: Path) -> None:
    adapter = _CutoffAdapter()
    res = train(adapter, toy_split, tmp_path / "b", _cfg(epochs=2, version="t"), _CutoffConfig())
    bundle = load_bundle(res.bundle_dir)
    assert adapter.tuned_on == [len(toy_split.val)]  # once, on the validation split
    # tuning reuses the best epoch's validation result: validation once per epoch, then the hold-out
    assert adapter.evaluated == [len(toy_split.val)] * 2 + [len(toy_split.holdout)]
    cutoff = bundle.meta.task_config["cutoff"]
    assert cutoff is not None and res.metrics["cutoff_used"] == cutoff  # the hold-out figures use it
    assert all(h.get("val_cutoff_used") is None for h in res.history)  # epochs were scored without it
    assert f"cutoff {cutoff:.4f} from validation" in bundle.meta.notes


def test_after_training_fields_do_not_block_resume(toy_split, tmp_path: Path) -> None:
    class Interrupt(Exception):
        pass

    def stop(epoch: int, _entry: dict) -> None:
        if epoch == 0:
            raise Interrupt

    cfg = _cfg(epochs=3, version="r")
    with pytest.raises(Interrupt):
        train(ADAPTER, toy_split, tmp_path / "p", cfg, _CutoffConfig(), work_dir=tmp_path / "w", callbacks=[stop])
    seen: list[int] = []
    train(ADAPTER, toy_split, tmp_path / "p", cfg, _CutoffConfig(cutoff=0.3), work_dir=tmp_path / "w",
          callbacks=[lambda epoch, _e: seen.append(epoch)])
    assert seen == [1, 2]  # another operating point: the run continued from its checkpoint
    with pytest.raises(TrainError, match="different run"):  # a field that shapes training still counts
        train(ADAPTER, toy_split, tmp_path / "p2", cfg, _CutoffConfig(channels=6), work_dir=tmp_path / "w")


class _NanAdapter(type(ADAPTER)):  # type: ignore[misc]
    def evaluate(self, model, loader, device, cfg):
        res = super().evaluate(model, loader, device, cfg)
        res.metrics["accuracy"] = float("nan")  # e.g. a kappa on a one-class validation split
        return res


def test_no_finite_validation_metric_keeps_the_trained_weights(toy_split, tmp_path: Path) -> None:
    torch.manual_seed(3)
    initial = {k: v.clone() for k, v in ADAPTER.build_model(ToyConfig()).state_dict().items()}
    res = train(_NanAdapter(), toy_split, tmp_path / "b", _cfg(epochs=2, version="nan"), ToyConfig())
    bundle = load_bundle(res.bundle_dir)
    assert res.best_epoch == 2 and "no epoch had a finite validation accuracy" in bundle.meta.notes
    assert any(not torch.equal(bundle.state_dict[k], v) for k, v in initial.items())  # not the untrained weights
    ckpt = torch.load(tmp_path / "b.work" / "checkpoint.pt", map_location="cpu", weights_only=False)
    for k, v in ckpt["model"].items():
        assert torch.equal(bundle.state_dict[k], v), k  # the last epoch's weights
