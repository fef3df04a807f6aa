"""Bundle format: atomic write, round trip, fp16, corruption detection."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from inference.bundle import BundleMeta, InputSpec, LabelSpec, load_bundle, read_meta, save_bundle
from inference.errors import BundleError


def _meta(version: str = "1.0") -> BundleMeta:
    return BundleMeta(
        task="wrist_fracture", version=version, architecture="resnet_classifier", init_args={"depth": 18},
        input=InputSpec(modality=["DX", "CR"], size=[512, 341], window=(2048.0, 4096.0), normalisation="zscore",
                        mean=0.5, std=0.25),
        labels=[LabelSpec(name="fracture", index=0, code={"value": "72704001", "scheme": "SCT", "meaning": "Fracture"})],
        training_data_hash="abc", holdout_hash="def", metrics={"auc": 0.9}, synthetic_only=True,
    )


def _sd() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    return m.state_dict()


def test_round_trip(tmp_path: Path) -> None:
    sd = _sd()
    d = save_bundle(tmp_path / "b", _meta(), sd, "# card\nsynthetic")
    assert sorted(p.name for p in d.iterdir()) == ["bundle.json", "card.md", "weights.pt"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dir left behind
    b = load_bundle(d)
    assert b.meta.task == "wrist_fracture" and b.meta.input.window == (2048.0, 4096.0)
    assert b.meta.code.package and b.meta.created_at and b.meta.weights_sha256
    assert b.meta.labels[0].code.value == "72704001"
    for k, v in sd.items():
        assert torch.equal(b.state_dict[k], v)
    assert b.card.startswith("# card")
    raw = json.loads((d / "bundle.json").read_text())
    assert raw["synthetic_only"] is True and raw["init_args"] == {"depth": 18}


def test_fp16_and_load_into(tmp_path: Path) -> None:
    sd = _sd()
    d = save_bundle(tmp_path / "b", _meta(), sd, "", fp16=True)
    b = load_bundle(d)
    assert b.meta.weights_dtype == "float16"
    assert b.state_dict["0.weight"].dtype == torch.float16
    assert b.state_dict["1.num_batches_tracked"].dtype == torch.int64
    model = b.load_into(torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4)))
    assert model.training is False and model[0].weight.dtype == torch.float32
    assert torch.allclose(model[0].weight, sd["0.weight"], atol=1e-3)
    with pytest.raises(BundleError):
        b.load_into(torch.nn.Linear(3, 5))


def test_existing_and_overwrite(tmp_path: Path) -> None:
    save_bundle(tmp_path / "b", _meta("1"), _sd(), "")
    with pytest.raises(BundleError):
        save_bundle(tmp_path / "b", _meta("2"), _sd(), "")
    save_bundle(tmp_path / "b", _meta("2"), _sd(), "", overwrite=True)
    assert read_meta(tmp_path / "b").version == "2"


def test_failed_write_leaves_nothing(tmp_path: Path) -> None:
    bad = _meta().model_copy(update={"version": "not a version!"})  # fails validation after weights are written
    with pytest.raises(ValueError):
        save_bundle(tmp_path / "b", bad, _sd(), "")
    assert list(tmp_path.iterdir()) == []


def test_corruption_and_bad_meta(tmp_path: Path) -> None:
    d = save_bundle(tmp_path / "b", _meta(), _sd(), "")
    w = d / "weights.pt"
    data = bytearray(w.read_bytes())
    data[-10] ^= 0xFF
    w.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="SHA-256"):
        load_bundle(d)
    (d / "bundle.json").write_text('{"task": "x"}')
    with pytest.raises(BundleError, match="invalid"):
        load_bundle(d)
    with pytest.raises(BundleError):
        load_bundle(tmp_path / "missing")


def test_meta_rejects_unknown_keys() -> None:
    with pytest.raises(ValueError):
        BundleMeta.model_validate({**_meta().model_dump(), "surprise": 1})


def test_build_model_through_nets(tmp_path: Path) -> None:
    nets = pytest.importorskip("inference.nets")
    model = nets.build_network("unet2d")
    meta = _meta().model_copy(update={"architecture": "unet2d", "init_args": {}})
    b = load_bundle(save_bundle(tmp_path / "b", meta, model.state_dict(), ""))
    rebuilt = b.build_model()
    for k, v in model.state_dict().items():
        assert torch.equal(rebuilt.state_dict()[k], v)


def test_split_config_of_prefers_the_recorded_split() -> None:
    """Evaluation, retune, promotion and the nightly job take a bundle's split from one place, in this order."""
    from training.data import SplitConfig
    from training.evaluate import split_config_of

    recorded = {"train": 0.7, "val": 0.25, "holdout": 0.05, "salt": "s1"}
    trained = {"train": 0.6, "val": 0.2, "holdout": 0.2, "salt": "s2"}
    meta = BundleMeta(task="t", version="v", architecture="a", split={"config": recorded},
                      train_config={"split": trained})
    assert split_config_of(meta) == SplitConfig(**recorded)
    assert split_config_of(meta.model_copy(update={"split": {}})) == SplitConfig(**trained)
    assert split_config_of(meta.model_copy(update={"split": {}, "train_config": {}})) == SplitConfig()
