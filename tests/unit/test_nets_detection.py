"""Physis and spine detectors: train-mode loss dicts and eval-mode boxes on tiny inputs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from inference.nets import count_parameters, fp16_size_bytes
from inference.nets.attention import DSModule, SEBlock, SKBlock
from inference.nets.detection import DETECTION_CLASSES, PHYSIS_LIGHT_ARGS, build_physis_detector
from inference.nets.spine_detector import (
    SPINE_BACKBONES,
    SPINE_LIGHT_ARGS,
    build_spine_detector,
    format_table,
    main,
    param_table,
)

torch.set_num_threads(1)
CAP_BYTES = 25 * 10**6


def _targets(n_classes: int) -> list[dict[str, torch.Tensor]]:
    boxes = torch.tensor([[40.0, 50.0, 120.0, 140.0], [150.0, 30.0, 220.0, 90.0]])
    labels = torch.tensor([1, n_classes - 1])
    return [{"boxes": boxes, "labels": labels}]


def _train_and_eval(model: nn.Module, n_classes: int) -> None:
    torch.manual_seed(0)
    images = [torch.rand(3, 256, 256)]
    model.train()
    losses = model(images, _targets(n_classes))
    assert isinstance(losses, dict) and losses
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    assert any(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in model.backbone.parameters())
    model.eval()
    with torch.no_grad():
        (out,) = model(images)
    assert set(out) >= {"boxes", "labels", "scores"}
    assert out["boxes"].ndim == 2 and out["boxes"].shape[1] == 4
    assert out["labels"].shape == out["scores"].shape == (out["boxes"].shape[0],)
    if len(out["labels"]):
        assert int(out["labels"].min()) >= 1 and int(out["labels"].max()) < n_classes


@pytest.mark.parametrize("kind", ["faster_rcnn", "retinanet"])
@pytest.mark.parametrize("light", [False, True])
def test_physis_detector_train_and_eval(kind: str, light: bool) -> None:
    args = dict(PHYSIS_LIGHT_ARGS) if light else {}
    model = build_physis_detector(kind, min_size=256, max_size=256, box_score_thresh=0.0, **args)
    assert model.transform.min_size == (256,)
    _train_and_eval(model, len(DETECTION_CLASSES) + 1)


def test_physis_defaults_are_faithful_and_light_fits_cap() -> None:
    m = build_physis_detector()
    assert m.transform.min_size == (1024,) and m.transform.max_size >= 1024
    assert m.roi_heads.box_predictor.cls_score.out_features == 4
    assert m.backbone.body.layer4[0].conv1.in_channels == 1024  # ResNet50 bottleneck
    light = build_physis_detector(**PHYSIS_LIGHT_ARGS)
    assert fp16_size_bytes(light) < CAP_BYTES / 2  # leaves room for the crop classifier
    assert count_parameters(light) < count_parameters(m) / 5


def test_physis_grey_input() -> None:
    m = build_physis_detector(in_channels=1, min_size=128, max_size=128, **PHYSIS_LIGHT_ARGS).eval()
    with torch.no_grad():
        (out,) = m([torch.rand(1, 128, 160)])
    assert out["boxes"].shape[1] == 4


def test_physis_rejects_unknown_kind() -> None:
    with pytest.raises(ValueError):
        build_physis_detector("yolo")


@pytest.mark.parametrize("backbone", sorted(SPINE_BACKBONES))
def test_spine_detector_light_train_and_eval(backbone: str) -> None:
    model = build_spine_detector(backbone, min_size=256, max_size=256, box_score_thresh=0.0, **SPINE_LIGHT_ARGS)
    _train_and_eval(model, 4)
    assert fp16_size_bytes(model) < CAP_BYTES


@pytest.mark.parametrize("backbone", ["resnet50", "resnet50_ds"])
def test_spine_detector_faithful_train_and_eval(backbone: str) -> None:
    _train_and_eval(build_spine_detector(backbone, min_size=256, max_size=256, box_score_thresh=0.0), 4)


@pytest.mark.parametrize(("backbone", "cls"), [("resnet50_ds", DSModule), ("resnet50_se", SEBlock),
                                               ("resnet50_sk", SKBlock)])
def test_spine_attention_inserted_after_stem_and_stage5(backbone: str, cls: type) -> None:
    m = build_spine_detector(backbone)
    names = [n for n, _ in m.backbone.body.named_children()]
    assert names == ["conv1", "bn1", "relu", "maxpool", "attn_stem", "layer1", "layer2", "layer3", "layer4",
                     "attn_last"]
    body = m.backbone.body
    assert isinstance(body.attn_stem, cls) and isinstance(body.attn_last, cls)
    assert "attn_last" in body.return_layers and "layer4" not in body.return_layers
    seen: dict[str, tuple[int, ...]] = {}

    def record(key: str):  # a forward hook must return None, or it replaces the output
        def hook(_m: nn.Module, _i: object, out: torch.Tensor) -> None:
            seen[key] = tuple(out.shape)

        return hook

    body.attn_stem.register_forward_hook(record("stem"))
    body.attn_last.register_forward_hook(record("last"))
    with torch.no_grad():
        body(torch.zeros(1, 3, 128, 128))
    assert seen == {"stem": (1, 64, 32, 32), "last": (1, 2048, 4, 4)}


def test_spine_plain_has_no_attention_and_4_classes() -> None:
    m = build_spine_detector("resnet50")
    assert not any(n.startswith("attn") for n, _ in m.backbone.body.named_children())
    assert m.roi_heads.box_predictor.cls_score.out_features == 4
    with pytest.raises(ValueError):
        build_spine_detector("resnet50_cbam")


def test_param_table_orders_variants(capsys: pytest.CaptureFixture[str]) -> None:
    rows = param_table()
    by = {r["backbone"]: r for r in rows}
    assert by["resnet50"]["attention_params"] == 0
    assert 0 < by["resnet50_se"]["attention_params"] < by["resnet50_sk"]["attention_params"]
    assert by["resnet50_sk"]["attention_params"] < by["resnet50_ds"]["attention_params"]
    for r in rows:
        assert r["detector_params"] == by["resnet50"]["detector_params"] + r["attention_params"]
    assert "| resnet50_ds |" in format_table(rows)
    assert main(["--param-table"]) == 0
    assert "resnet50_sk" in capsys.readouterr().out


def test_backbone_freezing_frozen_bn_and_local_weights(tmp_path) -> None:
    import torchvision
    from torchvision.ops.misc import FrozenBatchNorm2d

    from inference.nets.detection import resnet_fpn_backbone

    torch.manual_seed(0)
    ref = torchvision.models.resnet18(weights=None)
    path = tmp_path / "r18.pt"
    torch.save(ref.state_dict(), path)
    bb = resnet_fpn_backbone("resnet18", stages=3, frozen_bn=True, trainable_stages=2, pretrained_path=path)
    body = bb.body
    assert isinstance(body.bn1, FrozenBatchNorm2d)
    assert not any(p.requires_grad for p in body.conv1.parameters())
    assert not any(p.requires_grad for p in body.layer1.parameters())
    assert all(p.requires_grad for p in body.layer2.parameters())
    assert torch.equal(body.layer3[0].conv1.weight, ref.layer3[0].conv1.weight)
    assert "layer4" not in dict(body.named_children())
    feats = bb(torch.zeros(1, 3, 64, 64))
    assert list(feats) == ["0", "1", "2", "pool"]
    assert {t.shape[1] for t in feats.values()} == {bb.out_channels}
    with pytest.raises(ValueError):
        resnet_fpn_backbone("resnet18", stages=5)
    with pytest.raises(ValueError):
        resnet_fpn_backbone("resnet18", extra="p3")
    with pytest.raises(ValueError):
        resnet_fpn_backbone("vgg16")
