"""The knee U-Net: faithful parameter count (~211k), shapes and structure."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from inference.nets import count_parameters
from inference.nets.unet import FAITHFUL_PARAMS, UNet2D

torch.set_num_threads(1)


def _expected_params(in_ch: int, n_classes: int, c: int, depth: int) -> int:
    """Closed form: encoder double convs, bottleneck, decoder (2x2 up-conv + double conv), 1x1 head."""
    conv3 = lambda cin, cout: 9 * cin * cout + cout  # noqa: E731
    enc = conv3(in_ch, c) + conv3(c, c) + (depth - 1) * 2 * conv3(c, c)
    bott = 2 * conv3(c, c)
    dec = depth * ((4 * c * c + c) + conv3(2 * c, c) + conv3(c, c))
    return enc + bott + dec + (c * n_classes + n_classes)


def test_faithful_parameter_count() -> None:
    m = UNet2D()
    n = count_parameters(m)
    assert n == FAITHFUL_PARAMS == _expected_params(1, 3, 32, 4) == 211_011
    assert 205_000 <= n <= 215_000  # "about 211k parameters"


def test_faithful_structure_and_shapes() -> None:
    m = UNet2D().eval()
    convs = [mod for mod in m.modules() if isinstance(mod, nn.Conv2d)]
    assert {c.out_channels for c in convs[:-1]} == {32}
    assert sum(isinstance(mod, nn.Dropout) and mod.p == 0.5 for mod in m.modules()) == 1
    assert any(isinstance(mod, nn.ELU) for mod in m.modules())
    assert not any(isinstance(mod, (nn.ReLU, nn.BatchNorm2d)) for mod in m.modules())
    seen: list[tuple[int, ...]] = []
    m.bottleneck.register_forward_hook(lambda _m, _i, out: seen.append(tuple(out.shape)))
    with torch.no_grad():
        y = m(torch.randn(1, 1, 224, 224))
    assert y.shape == (1, 3, 224, 224)
    assert seen == [(1, 32, 14, 14)]


def test_configurable_variants() -> None:
    m = UNet2D(in_channels=1, n_classes=1, base_channels=8, depth=2, channel_growth=2.0, dropout=0.0).eval()
    with torch.no_grad():
        assert m(torch.randn(2, 1, 32, 48)).shape == (2, 1, 32, 48)
    assert count_parameters(UNet2D(base_channels=16, depth=3)) == _expected_params(1, 3, 16, 3)
    with pytest.raises(ValueError, match="divisible"):
        UNet2D()(torch.zeros(1, 1, 100, 100))


def test_dropout_only_in_train_mode() -> None:
    torch.manual_seed(0)
    m = UNet2D(base_channels=8, depth=2)
    x = torch.randn(1, 1, 16, 16)
    m.eval()
    with torch.no_grad():
        assert torch.equal(m(x), m(x))
        m.train()
        assert not torch.equal(m(x), m(x))


def test_default_init_is_keras_glorot_uniform_with_zero_biases() -> None:
    torch.manual_seed(0)
    m = UNet2D()
    convs = [mod for mod in m.modules() if isinstance(mod, nn.Conv2d)]
    for conv in convs:
        rf = conv.kernel_size[0] * conv.kernel_size[1]
        bound = (6.0 / (conv.in_channels * rf + conv.out_channels * rf)) ** 0.5
        w = conv.weight.detach()
        assert float(w.abs().max()) <= bound + 1e-7
        assert abs(float(w.std()) - bound / 3**0.5) < 0.15 * bound  # uniform(-b, b) has std b / sqrt(3)
        assert conv.bias is not None and not conv.bias.detach().any()
    torch_init = UNet2D(init="torch")
    assert any(mod.bias.detach().any() for mod in torch_init.modules() if isinstance(mod, nn.Conv2d))
    with pytest.raises(ValueError, match="init"):
        UNet2D(init="he")
