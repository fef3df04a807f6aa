"""ResNet/MobileNetV2 classifiers, local pretrained weights, Grad-CAM and the motion CNN."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torchvision

from inference.errors import BundleError
from inference.nets.hrpqct import MotionGradeCNN
from inference.nets.resnet import MobileNetV2Classifier, ResNetClassifier, gradcam

torch.set_num_threads(1)


@pytest.mark.parametrize(
    ("backbone", "in_ch", "n_out", "stages"),
    [("resnet18", 1, 1, 4), ("resnet18", 3, 1, 3), ("resnet50", 1, 2, 4), ("resnet34", 1, 1, 3)],
)
def test_resnet_classifier_shapes(backbone: str, in_ch: int, n_out: int, stages: int) -> None:
    m = ResNetClassifier(backbone, in_channels=in_ch, num_outputs=n_out, stages=stages).eval()
    with torch.no_grad():
        assert m(torch.zeros(2, in_ch, 96, 64)).shape == (2, n_out)
        if in_ch == 3:  # grey input is replicated
            assert m(torch.zeros(1, 1, 96, 64)).shape == (1, n_out)


def test_wrist_input_size_and_invalid_args() -> None:
    m = ResNetClassifier().eval()
    assert m.net.conv1.in_channels == 1
    with torch.no_grad():
        assert m(torch.zeros(1, 1, 512, 341)).shape == (1, 1)
    with pytest.raises(ValueError):
        ResNetClassifier("resnet101")
    with pytest.raises(ValueError):
        ResNetClassifier(stages=2)


def test_mobilenet_v2_shapes() -> None:
    m = MobileNetV2Classifier(in_channels=1, num_outputs=1).eval()
    with torch.no_grad():
        assert m(torch.zeros(2, 1, 64, 64)).shape == (2, 1)


def test_pretrained_path_grey_equals_replicated_rgb(tmp_path: Path) -> None:
    torch.manual_seed(0)
    ref = torchvision.models.resnet18(weights=None).eval()
    path = tmp_path / "imagenet_resnet18.pt"
    torch.save(ref.state_dict(), path)
    grey = ResNetClassifier("resnet18", in_channels=1, pretrained_path=str(path)).eval()
    rgb = ResNetClassifier("resnet18", in_channels=3, pretrained_path=str(path)).eval()
    assert torch.allclose(grey.net.layer3[0].conv1.weight, ref.layer3[0].conv1.weight)
    x = torch.rand(1, 1, 64, 64)
    with torch.no_grad():
        feats_grey = torch.nn.Sequential(*list(grey.net.children())[:-1])(x)
        feats_ref = torch.nn.Sequential(*list(ref.children())[:-1])(x.expand(-1, 3, -1, -1))
        assert torch.allclose(feats_grey, feats_ref, atol=1e-4)
        assert rgb(x).shape == (1, 1)


def test_pretrained_path_errors(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="not found"):
        ResNetClassifier(pretrained_path=str(tmp_path / "missing.pt"))
    bad = tmp_path / "r50.pt"
    torch.save(torchvision.models.resnet50(weights=None).state_dict(), bad)
    with pytest.raises(BundleError, match="do not fit"):
        ResNetClassifier("resnet18", pretrained_path=str(bad))
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(BundleError, match="cannot read"):
        ResNetClassifier(pretrained_path=str(junk))


@pytest.mark.parametrize("model_fn", [lambda: ResNetClassifier(), lambda: MobileNetV2Classifier()])
def test_gradcam_map_at_input_size_with_max_one(model_fn) -> None:
    torch.manual_seed(0)
    m = model_fn().eval()
    last = m.net.fc if hasattr(m.net, "fc") else m.net.classifier[-1]
    with torch.no_grad():  # positive evidence, so the map is not all zero
        last.weight.abs_()
    x = torch.rand(2, 1, 96, 64)
    with torch.no_grad():  # Grad-CAM must work from inference code running under no_grad
        cam = gradcam(m, x)
    assert cam.shape == (2, 96, 64)
    assert float(cam.min()) >= 0.0
    for i in range(2):
        assert float(cam[i].max()) == pytest.approx(1.0)
    assert float((cam > 0).float().mean()) > 0.05
    assert not cam.requires_grad
    assert all(p.grad is None for p in m.parameters())


def test_gradcam_localises_evidence() -> None:
    """A hand-built model whose logit is the mean of a bright patch: the CAM peaks there."""

    class Patch(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(1, 1, 1, bias=False)
            torch.nn.init.ones_(self.conv.weight)
            self.last_conv_block = self.conv

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.relu(self.conv(x)).mean(dim=(1, 2, 3))[:, None]

    x = torch.zeros(1, 1, 32, 32)
    x[..., 20:28, 4:12] = 1.0
    cam = gradcam(Patch(), x)
    assert cam[0, 20:28, 4:12].min() == pytest.approx(1.0)
    assert float(cam[0, :16].max()) == 0.0


def test_gradcam_needs_target_layer() -> None:
    with pytest.raises(ValueError):
        gradcam(torch.nn.Linear(4, 1), torch.zeros(1, 4))


def test_motion_cnn_shapes_and_structure() -> None:
    m = MotionGradeCNN().eval()
    x = torch.zeros(8, 1, 256, 256)
    with torch.no_grad():
        assert m(x).shape == (8, 5)
        p = m.predict_proba(torch.rand(2, 1, 64, 64))
    assert torch.allclose(p.sum(dim=1), torch.ones(2))
    convs = [c for c in m.features if isinstance(c, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [32, 64, 128, 256, 256]
    assert all(c.kernel_size == (3, 3) for c in convs)
    assert sum(isinstance(c, torch.nn.LeakyReLU) for c in m.features) == 5
    assert sum(isinstance(c, torch.nn.MaxPool2d) for c in m.features) == 5
    assert not any(isinstance(c, torch.nn.BatchNorm2d) for c in m.features)
    bn = MotionGradeCNN(batch_norm=True)
    assert sum(isinstance(c, torch.nn.BatchNorm2d) for c in bn.features) == 5
    # 256 -> 8 after five pools
    with torch.no_grad():
        assert m.features(torch.zeros(1, 1, 256, 256)).shape == (1, 256, 8, 8)


def test_gradcam_without_positive_evidence_is_zero() -> None:
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 1, 1, bias=False), torch.nn.ReLU(), torch.nn.Flatten(1))
    torch.nn.init.constant_(model[0].weight, -1.0)
    cam = gradcam(lambda t: model(t).mean(dim=1, keepdim=True), torch.rand(1, 1, 8, 8), target_layer=model[1])
    assert cam.shape == (1, 8, 8) and float(cam.abs().max()) == 0.0
