"""Tests of HR-pQCT pre-processing (inference.hrpqct)."""

from __future__ import annotations

import numpy as np
import pytest

from inference import hrpqct
from inference.errors import InvalidDatasetError


def test_selection_for_xtremect_110_slices() -> None:
    assert hrpqct.select_slices(110) == [6, 20, 34, 48, 61, 75, 89, 103]


def test_selection_for_xtremect2_168_slices() -> None:
    assert hrpqct.select_slices(168) == [10, 31, 52, 73, 94, 115, 136, 157]


@pytest.mark.parametrize("n", [8, 9, 50, 110, 168, 1000])
def test_selection_properties(n: int) -> None:
    idx = hrpqct.select_slices(n)
    assert len(idx) == 8 and len(set(idx)) == 8
    assert idx == sorted(idx) and 0 <= idx[0] and idx[-1] < n
    gaps = np.diff(idx)
    assert gaps.max() - gaps.min() <= 1  # equally spaced up to rounding
    assert abs(idx[0] - (n - 1 - idx[-1])) <= 1  # symmetric margins


def test_too_few_slices() -> None:
    with pytest.raises(InvalidDatasetError):
        hrpqct.select_slices(7)


def test_resize_slice_shape_and_content() -> None:
    img = np.zeros((768, 768), dtype=np.float32)
    img[:, 384:] = 1000.0  # right half dense
    out = hrpqct.resize_slice(img)
    assert out.shape == (256, 256)
    assert out[:, :120].max() < 1.0 and out[:, 136:].min() > 999.0
    # the edge stays between output pixels 127 and 128 (pixel edges aligned): symmetric blur around it
    assert out[128, 127] + out[128, 128] == pytest.approx(1000.0, abs=1.0)
    assert out[128, 127] < 500.0 < out[128, 128]
    small = hrpqct.resize_slice(np.ones((100, 100), dtype=np.float32) * 7)
    np.testing.assert_allclose(small, 7.0)


def test_prepare_stack_and_norm() -> None:
    vol = np.stack([np.full((64, 64), float(k), dtype=np.float32) for k in range(110)])
    slices, idx = hrpqct.prepare_stack(vol)
    assert slices.shape == (8, 256, 256)
    np.testing.assert_allclose(slices[:, 0, 0], idx)
    norm = hrpqct.DensityNorm(low=0.0, high=100.0, mean=50.0, std=10.0)
    normed, _ = hrpqct.prepare_stack(vol, norm)
    np.testing.assert_allclose(normed[:, 5, 5], (np.clip(idx, 0, 100) - 50.0) / 10.0, rtol=1e-6)


def test_density_norm_fit_and_roundtrip() -> None:
    rng = np.random.default_rng(0)
    stacks = [rng.normal(300, 50, (8, 16, 16)) for _ in range(3)]
    norm = hrpqct.DensityNorm.fit(stacks)
    assert norm.mean == pytest.approx(300, abs=3) and norm.std == pytest.approx(50, abs=3)
    assert hrpqct.DensityNorm.from_dict(norm.to_dict()) == norm
    spec = hrpqct.input_spec(norm)
    assert spec["size"] == [256, 256] and spec["slices"] == 8
    with pytest.raises(ValueError):
        hrpqct.DensityNorm(low=1.0, high=0.0)
