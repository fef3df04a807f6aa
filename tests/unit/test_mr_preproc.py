"""Tests of knee MR pre-processing (inference.mr): N4, joint centre, crop/resize and its exact inverse."""

from __future__ import annotations

import time

import numpy as np
import pytest

from inference import mr


def knee_volume(n: int = 12, size: int = 160, joint_row: int = 80, seed: int = 0) -> np.ndarray:
    """Coronal-like knee: soft tissue limb, bright femur above a dark joint band, bright tibia below."""
    rng = np.random.default_rng(seed)
    vol = np.zeros((n, size, size), dtype=np.float32)
    vol[:, :, 30:130] = 60.0  # soft tissue of the limb
    vol[:, 10: joint_row - 4, 50:110] = 200.0  # femur marrow
    vol[:, joint_row - 4: joint_row + 5, 50:110] = 30.0  # joint space
    vol[:, joint_row + 5: size - 10, 55:105] = 190.0  # tibia marrow
    return np.maximum(vol + rng.normal(0, 3, vol.shape).astype(np.float32), 0)


# --------------------------------------------------------------------------- N4


def test_n4_reduces_multiplicative_bias() -> None:
    n, size = 16, 128
    zz, yy, xx = np.mgrid[0:n, 0:size, 0:size].astype(np.float32)
    obj = ((yy - 63.5) ** 2 + (xx - 63.5) ** 2) < 50**2
    truth = np.where(obj, 100.0, 0.0).astype(np.float32)
    bias = np.exp(0.5 * (xx - 63.5) / 63.5 + 0.2 * (yy - 63.5) / 63.5).astype(np.float32)  # about x0.55..x1.8
    biased = truth * bias + np.random.default_rng(0).normal(0, 0.5, truth.shape).astype(np.float32) * obj
    inner = obj & (((yy - 63.5) ** 2 + (xx - 63.5) ** 2) < 45**2)

    def cv(v: np.ndarray) -> float:
        return float(v[inner].std() / v[inner].mean())

    start = time.perf_counter()
    corrected, field = mr.n4_correct(biased, (3.0, 0.4, 0.4))
    elapsed = time.perf_counter() - start
    assert corrected.shape == biased.shape and field.shape == biased.shape
    assert cv(biased) > 0.15
    assert cv(corrected) < 0.5 * cv(biased), (cv(biased), cv(corrected))
    # the estimated field follows the true one up to a constant factor
    ratio = field[inner] / bias[inner]
    assert ratio.std() / ratio.mean() < 0.1
    assert elapsed < 30.0
    with_mask, _ = mr.n4_correct(biased, (3.0, 0.4, 0.4), mask=obj)
    assert cv(with_mask) < 0.5 * cv(biased)


# --------------------------------------------------------------------------- joint centre


@pytest.mark.parametrize("joint_row", [60, 80, 100])
def test_joint_centre_from_profile(joint_row: int) -> None:
    vol = knee_volume(joint_row=joint_row)
    row, col = mr.joint_centre(vol)
    assert abs(row - joint_row) <= 4
    assert abs(col - 79.5) <= 5


def test_joint_centre_from_masks() -> None:
    femur = np.zeros((4, 100, 100), dtype=bool)
    tibia = np.zeros_like(femur)
    femur[:, 10:45, 30:70] = True
    tibia[:, 55:90, 40:80] = True
    row, col = mr.joint_centre_from_masks(femur, tibia)
    assert row == pytest.approx((44 + 55) / 2)
    assert col == pytest.approx((49.5 + 59.5) / 2)
    with pytest.raises(ValueError):
        mr.joint_centre_from_masks(np.zeros((10, 10)), tibia[0])


# --------------------------------------------------------------------------- crop/resize and inverse


def test_crop_window_square_in_mm_inside_image() -> None:
    crop = mr.CropResize.around((80, 80), (400, 500), (0.35, 0.35), crop_mm=140.0)
    assert crop.size_r == crop.size_c == 400  # 140 mm / 0.35 mm, clamped to the 400 rows
    assert crop.r0 == 0 and 0 <= crop.c0 <= 100
    aniso = mr.CropResize.around((200, 200), (400, 400), (0.3, 0.5), crop_mm=100.0)
    assert (aniso.size_r, aniso.size_c) == (333, 200)
    edge = mr.CropResize.around((5, 395), (400, 400), (0.5, 0.5), crop_mm=100.0)
    assert (edge.r0, edge.c0) == (0, 200)
    assert mr.CropResize.from_dict(edge.to_dict()) == edge


@pytest.mark.parametrize("size", [150, 223, 224, 225, 300, 467])
def test_model_mask_round_trip_when_downsampling_or_equal(size: int) -> None:
    """mask_to_model(mask_to_source(m)) == m for every 224x224 mask when the window is >= 224 px."""
    crop = mr.CropResize(r0=7, c0=11, size_r=size, size_c=size, source_shape=(size + 20, size + 30))
    m = np.random.default_rng(size).random((3, 224, 224)) > 0.5
    src = crop.mask_to_source(m)
    assert src.shape == (3, size + 20, size + 30) and src.dtype == bool
    assert not src[:, :7].any() and not src[:, :, :11].any()  # nothing outside the window
    if size >= 224:
        np.testing.assert_array_equal(crop.mask_to_model(src), m)


@pytest.mark.parametrize("size", [100, 150, 223, 224])
def test_source_mask_round_trip_when_upsampling_or_equal(size: int) -> None:
    """mask_to_source(mask_to_model(m)) == m for every source mask inside a window of <= 224 px."""
    crop = mr.CropResize(r0=5, c0=0, size_r=size, size_c=size, source_shape=(size + 10, size))
    m = np.zeros((2, size + 10, size), dtype=bool)
    m[:, 5: 5 + size] = np.random.default_rng(size).random((2, size, size)) > 0.5
    np.testing.assert_array_equal(crop.mask_to_source(crop.mask_to_model(m)), m)


def test_cell_constant_source_mask_round_trips_when_downsampling() -> None:
    crop = mr.CropResize(r0=0, c0=0, size_r=467, size_c=300, source_shape=(467, 300))
    cells = crop.mask_to_source(np.random.default_rng(1).random((224, 224)) > 0.5)
    np.testing.assert_array_equal(crop.mask_to_source(crop.mask_to_model(cells)), cells)


def test_mask_to_source_keeps_geometry_of_shapes() -> None:
    """A disk drawn at 224 resolution lands where the same disk is in source coordinates (within one cell)."""
    crop = mr.CropResize(r0=40, c0=60, size_r=448, size_c=448, source_shape=(512, 512))
    yy, xx = np.mgrid[0:224, 0:224]
    disk = (yy - 100) ** 2 + (xx - 120) ** 2 < 30**2
    src = crop.mask_to_source(disk)
    ys, xs = np.nonzero(src)
    # model (100, 120) -> source row 40 + (100 + 0.5) * 2 - 0.5 = 240.5, col 60 + 240.5 = 300.5
    assert ys.mean() == pytest.approx(240.5, abs=0.6) and xs.mean() == pytest.approx(300.5, abs=0.6)
    assert src.sum() == pytest.approx(disk.sum() * 4)


def test_image_to_model_shapes_and_alignment() -> None:
    vol = knee_volume(n=5, size=300)
    crop = mr.CropResize(r0=10, c0=20, size_r=280, size_c=280, source_shape=(300, 300))
    img = crop.image_to_model(vol)
    assert img.shape == (5, 224, 224) and img.dtype == np.float32
    probs = crop.probabilities_to_source((img > 100).astype(np.float32))
    assert probs.shape == (5, 300, 300)
    back = probs > 0.5
    truth = vol[:, :, :] > 100
    win = (slice(None), slice(10, 290), slice(20, 300))
    assert np.mean(back[win] == truth[win]) > 0.98


def test_zscore_round_trip_and_fit() -> None:
    norm = mr.ZScore(mean=100.0, std=50.0)
    assert mr.ZScore.from_dict(norm.to_dict()) == norm
    np.testing.assert_allclose(norm.apply(np.array([100.0, 150.0])), [0.0, 1.0])
    fitted = mr.ZScore.fit([np.array([1.0, 3.0]), np.array([5.0, 7.0])])
    assert fitted.mean == pytest.approx(4.0) and fitted.std == pytest.approx(np.sqrt(5.0))


def test_n4_runs_in_seconds() -> None:
    vol = knee_volume(n=12, size=192)
    start = time.perf_counter()
    corrected, bias = mr.n4_correct(vol, (3.5, 0.45, 0.45))
    assert time.perf_counter() - start < 30.0
    assert bias is not None and corrected.shape == vol.shape
    assert np.isfinite(corrected).all()
