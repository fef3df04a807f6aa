"""The network registry: every architecture builds from JSON-style init args."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from inference.errors import BundleError, DicomNodeError
from inference.nets import NETWORKS, build_network, count_parameters, fp16_size_bytes
from inference.nets.detection import PHYSIS_LIGHT_ARGS
from inference.nets.spine_detector import SPINE_LIGHT_ARGS

torch.set_num_threads(1)

CASES: list[tuple[str, dict[str, object], tuple[int, ...], tuple[int, ...]]] = [
    ("resnet_classifier", {"backbone": "resnet18", "in_channels": 1, "num_outputs": 1}, (1, 1, 64, 48), (1, 1)),
    ("resnet_classifier", {"backbone": "resnet50", "num_outputs": 1}, (1, 1, 64, 64), (1, 1)),
    ("mobilenet_v2_classifier", {"num_outputs": 1}, (1, 1, 64, 64), (1, 1)),
    ("motion_cnn", {}, (2, 1, 64, 64), (2, 5)),
    ("unet2d", {}, (1, 1, 32, 32), (1, 3, 32, 32)),
]


@pytest.mark.parametrize(("arch", "args", "in_shape", "out_shape"), CASES)
def test_build_network_roundtrip_through_json(arch: str, args: dict, in_shape: tuple, out_shape: tuple) -> None:
    args = json.loads(json.dumps(args))  # as stored in bundle.json
    m = build_network(arch, **args).eval()
    with torch.no_grad():
        assert m(torch.zeros(in_shape)).shape == out_shape
    again = build_network(arch, **args)
    missing, unexpected = again.load_state_dict(m.state_dict())
    assert not missing and not unexpected


@pytest.mark.parametrize(("arch", "args"), [("physis_detector", PHYSIS_LIGHT_ARGS),
                                            ("spine_detector", dict(SPINE_LIGHT_ARGS, backbone="resnet50_ds"))])
def test_detectors_in_registry(arch: str, args: dict) -> None:
    m = build_network(arch, **json.loads(json.dumps(args)))
    assert isinstance(m, nn.Module) and count_parameters(m) > 1_000_000


def test_registry_keys_and_errors() -> None:
    # test plugins register their own tiny networks under "bone_test_*" when a test imports them
    assert {k for k in NETWORKS if not k.startswith("bone_test_")} == {
        "resnet_classifier", "mobilenet_v2_classifier", "physis_detector", "physis_two_stage", "spine_detector",
        "motion_cnn", "unet2d",
    }
    with pytest.raises(BundleError, match="unknown network"):
        build_network("vgg16")
    with pytest.raises(BundleError, match="invalid init args"):
        build_network("unet2d", widht=3)
    with pytest.raises(DicomNodeError):
        build_network("resnet_classifier", backbone="resnet152")


def test_count_parameters_and_fp16_size() -> None:
    m = nn.Sequential(nn.Linear(10, 5), nn.BatchNorm1d(5))
    assert count_parameters(m) == 55 + 10
    m[0].weight.requires_grad_(False)
    assert count_parameters(m, trainable_only=True) == 15
    # 65 params + 10 float buffers in fp16, plus the int64 num_batches_tracked
    assert fp16_size_bytes(m) == (65 + 10) * 2 + 8
