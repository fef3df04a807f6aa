"""DS, SE and SK attention modules: shapes, weight ranges and gating as designed."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from inference.nets.attention import DSModule, SEBlock, SKBlock, build_attention

torch.set_num_threads(1)


@pytest.mark.parametrize("cls", [DSModule, SEBlock, SKBlock])
@pytest.mark.parametrize("channels", [64, 256])
def test_shape_preserved_and_weights_in_unit_interval(cls: type[nn.Module], channels: int) -> None:
    torch.manual_seed(0)
    m = cls(channels)
    x = torch.randn(2, channels, 9, 7)
    y = m(x)
    assert y.shape == x.shape
    w = m.last_weights
    ws = w if isinstance(w, tuple) else (w,)
    for t in ws:
        assert t.shape[0] == 2 and t.shape[-1] == channels
        assert float(t.min()) >= 0.0 and float(t.max()) <= 1.0
    y.sum().backward()
    assert all(p.grad is not None for p in m.parameters() if p.requires_grad)


def test_ds_zeroed_fusion_is_identity() -> None:
    torch.manual_seed(1)
    m = DSModule(64, zero_init_residual=False)
    with torch.no_grad():
        m.fuse.weight.zero_()
    m.eval()
    x = torch.randn(2, 64, 8, 8)
    assert torch.equal(m(x), x)


def test_ds_starts_as_identity_by_default_but_not_otherwise() -> None:
    torch.manual_seed(2)
    x = torch.randn(1, 32, 8, 8)
    assert torch.allclose(DSModule(32).eval()(x), x)
    assert not torch.allclose(DSModule(32, zero_init_residual=False).eval()(x), x)


def test_ds_zero_fc_gives_half_weights_and_scales_branches() -> None:
    torch.manual_seed(3)
    m = DSModule(32, zero_init_residual=False).eval()
    for gate in (m.gate3, m.gate5):
        for fc in (gate.fc1, gate.fc2):
            nn.init.zeros_(fc.weight)
            nn.init.zeros_(fc.bias)
    x = torch.randn(2, 32, 8, 8)
    y = m(x)
    w3, w5 = m.last_weights
    assert torch.allclose(w3, torch.full_like(w3, 0.5)) and torch.allclose(w5, torch.full_like(w5, 0.5))
    # With weights 0.5 the module is x + BN(fuse(0.5 * (u3 + u5))).
    v = 0.5 * (m.branch3(x) + m.branch5(x))
    assert torch.allclose(y, x + m.fuse_bn(m.fuse(v)), atol=1e-6)


def test_ds_branches_have_own_weights_and_kernels() -> None:
    m = DSModule(64)
    assert m.branch3[0].kernel_size == (3, 3) and m.branch5[0].kernel_size == (5, 5)
    assert m.fuse.kernel_size == (3, 3) and m.fuse.dilation == (2, 2)
    assert m.gate3.fc1.out_features == 64 // 16 and m.gate3.fc2.out_features == 64
    assert m.gate3 is not m.gate5
    m.eval()
    m(torch.randn(1, 64, 8, 8))
    w3, w5 = m.last_weights
    assert not torch.allclose(w3, w5)


def test_se_zero_fc_gives_half_and_halves_input() -> None:
    m = SEBlock(32)
    nn.init.zeros_(m.gate.fc2.weight)
    nn.init.zeros_(m.gate.fc2.bias)
    x = torch.randn(2, 32, 5, 5)
    assert torch.allclose(m(x), 0.5 * x)
    assert torch.allclose(m.last_weights, torch.full((2, 32), 0.5))


def test_sk_attention_sums_to_one_across_branches() -> None:
    torch.manual_seed(4)
    m = SKBlock(64)
    y = m(torch.randn(3, 64, 6, 6))
    a = m.last_weights
    assert a.shape == (3, 2, 64)
    assert torch.allclose(a.sum(dim=1), torch.ones(3, 64), atol=1e-6)
    assert y.shape == (3, 64, 6, 6)
    assert m.branches[1][0].dilation == (2, 2)


def test_sk_single_image_batch_in_train_mode() -> None:
    m = SKBlock(64).train()
    assert m(torch.randn(1, 64, 4, 4)).shape == (1, 64, 4, 4)


def test_build_attention_kinds() -> None:
    assert isinstance(build_attention("none", 8), nn.Identity)
    assert isinstance(build_attention("ds", 64), DSModule)
    with pytest.raises(ValueError):
        build_attention("cbam", 8)
