"""HR-pQCT motion generator: headers, geometry, dciodvfy, determinism, grades vs measured motion."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import CTImageStorage

from training.synth import hrpqct_motion as hr
from training.synth.common import SynthError
from training.synth.tomo import ParallelBeam, fbp, forward_project, opposed_projection_ssd

SMALL = {"n": 64, "n_views": 64, "n_slices": 12}


def _rows(manifest: Path) -> list[dict]:
    return [json.loads(line) for line in manifest.read_text().splitlines() if line.strip()]


def _series(root: Path, study_uid: str) -> list[pydicom.Dataset]:
    files = sorted((root / study_uid).glob("*/*.dcm"))
    dss = [pydicom.dcmread(f) for f in files]
    return sorted(dss, key=lambda d: int(d.InstanceNumber))


@pytest.mark.parametrize("n", [16, 17])
def test_pruned_transforms_equal_the_padded_grid_ffts(n: int) -> None:
    """half_spectrum / image_from_half_spectrum skip zero columns but equal rfftn / irfftn of the padded grid."""
    from scipy import fft as sfft

    from training.synth.tomo import ParallelBeam

    geom = ParallelBeam(n, 12)
    img = np.random.default_rng(n).random((3, n, n)).astype(np.float32)
    grid = np.zeros((3, geom.m, geom.m), np.float32)
    h = n // 2
    idx = (np.arange(n) - h) % geom.m  # image index i sits at grid index (i - n // 2) mod m
    grid[:, idx[:, None], idx[None, :]] = img / geom._apod
    spec = sfft.rfftn(grid, axes=(2, 1))
    np.testing.assert_allclose(geom.half_spectrum(img), spec, rtol=0, atol=1e-4 * np.abs(spec).max())
    back = sfft.irfftn(spec, s=(geom.m, geom.m), axes=(2, 1))[:, idx[:, None], idx[None, :]] / geom._apod
    np.testing.assert_allclose(geom.image_from_half_spectrum(spec.astype(np.complex64)), back, atol=1e-5)
    # both directions deapodise (the gridding's sinc^2 weighting), so the round trip divides twice
    np.testing.assert_allclose(geom.image_from_half_spectrum(geom.half_spectrum(img)), img / geom._apod**2, atol=1e-4)


def test_fbp_reconstructs_disk_and_motion_raises_ssd() -> None:
    geom = ParallelBeam(64, 64)
    yy, xx = np.mgrid[:64, :64] - 32
    img = ((xx - 5) ** 2 + yy**2 < 20**2).astype(np.float32)
    sino = forward_project(img, geom)
    rec = fbp(sino, geom)
    assert abs(float(rec[32, 37]) - 1.0) < 0.08
    assert abs(float(rec[2, 2])) < 0.1
    assert opposed_projection_ssd(sino) < 1e-8
    shifts = np.zeros((geom.n_views, 2))
    shifts[40:, 0] = 2.0
    moved = forward_project(img, geom, shifts=shifts)
    assert opposed_projection_ssd(moved) > 1e-3
    assert np.abs(fbp(moved, geom) - img).mean() > np.abs(rec - img).mean()


@pytest.mark.parametrize("offset", [0.0, 0.3, -0.3])
def test_projections_of_a_rotated_ellipse_match_the_analytic_line_integrals(offset: float) -> None:
    """The Fourier projector against exact line integrals, including views whose rotated angle leaves
    [0, pi] (computed from the conjugate half line)."""
    n, ss, a, b, cx, cy = 64, 4, 18.0, 9.0, 6.0, -4.0  # off-centre: the mirrored projection differs
    geom = ParallelBeam(n, 48)
    sy, sx = (np.mgrid[: n * ss, : n * ss] + 0.5) / ss - 0.5 - n // 2
    img = (((sx - cx) / a) ** 2 + ((sy - cy) / b) ** 2 <= 1).reshape(n, ss, n, ss).mean(axis=(1, 3)).astype(np.float32)
    sino = forward_project(img, geom, angle_offsets=np.full(geom.n_views, offset))
    for v in (0, 13, 31, geom.n_views - 1):
        theta = geom.angles[v] - offset
        centre = cx * np.cos(theta) + cy * np.sin(theta)  # the object turns about the rotation centre
        t = np.arange(geom.m) - geom.center - centre
        s2 = a * a * np.cos(theta) ** 2 + b * b * np.sin(theta) ** 2
        exact = 2 * a * b * np.sqrt(np.clip(s2 - t * t, 0, None)) / s2
        assert np.abs(sino[v] - exact).sum() / exact.sum() < 0.05, v  # ~0.035: pixelated vs continuous


def test_headers_geometry_and_dciodvfy(tmp_path: Path, dciodvfy) -> None:
    manifest = hr.generate(tmp_path, 1, 3, workers=1, params={**SMALL, "scanner": "XtremeCT II"})
    (row,) = _rows(manifest)
    dss = _series(tmp_path, row["study_uid"])
    assert len(dss) == row["n_slices"] == 12
    first = dss[0]
    assert first.SOPClassUID == CTImageStorage and first.Modality == "CT"
    assert first.Manufacturer == "Scanco Medical AG" and first.ManufacturerModelName == "XtremeCT II"
    assert float(first.SliceThickness) == pytest.approx(0.0607)
    iop = np.array(first.ImageOrientationPatient, dtype=float)
    normal = np.cross(iop[:3], iop[3:])
    pos = np.array([d.ImagePositionPatient for d in dss], dtype=float)
    steps = np.diff(pos, axis=0)
    assert np.allclose(steps, 0.0607 * normal, atol=1e-4)
    assert len({d.SOPInstanceUID for d in dss}) == len(dss)
    assert first.BodyPartExamined in {"RADIUS", "TIBIA", "WRIST", "ANKLE", "LEG", "FOREARM", "SPEICHE",
                                      "SCHIENBEIN", "UNTERSCHENKEL", "PIERNA", "SPRUNGGELENK", "TOBILLO",
                                      "UNTERARM", "ANTEBRAZO", "HANDGELENK", "MUNECA", "POIGNET", "POLSO"}
    assert 1 <= row["label"] <= 5
    dciodvfy(sorted((tmp_path / row["study_uid"]).glob("*/*.dcm"))[0])


def test_deterministic(tmp_path: Path) -> None:
    a = _rows(hr.generate(tmp_path / "a", 1, 11, workers=1, params=SMALL))
    b = _rows(hr.generate(tmp_path / "b", 1, 11, workers=1, params=SMALL))
    assert a == b
    pa = _series(tmp_path / "a", a[0]["study_uid"])[5].pixel_array
    pb = _series(tmp_path / "b", b[0]["study_uid"])[5].pixel_array
    assert np.array_equal(pa, pb)
    c = _rows(hr.generate(tmp_path / "c", 1, 12, workers=1, params=SMALL))
    assert c[0]["study_uid"] != a[0]["study_uid"]


def test_higher_grade_means_more_measured_motion(tmp_path: Path) -> None:
    ssd: dict[int, list[float]] = {}
    for grade in (1, 2, 4, 5):
        rows = _rows(hr.generate(tmp_path / f"g{grade}", 2, 100 + grade, workers=1,
                                 params={**SMALL, "grade": grade, "site": "radius"}))
        ssd[grade] = [r["motion_ssd"] for r in rows]
        assert all(r["grade_true"] == grade for r in rows)
    assert np.mean(ssd[5]) > np.mean(ssd[4]) > np.mean(ssd[1])
    assert np.mean(ssd[2]) > np.mean(ssd[1])
    assert min(ssd[5]) > max(ssd[1])


def test_grade_distribution_spans_all_classes_and_is_skewed() -> None:
    rng = np.random.default_rng(0)
    for site in ("radius", "tibia"):
        counts = Counter(hr.draw_grade(rng, site, 0.5)[2] for _ in range(3000))
        assert set(counts) == {1, 2, 3, 4, 5}
        assert counts[5] < counts[4] < max(counts[1], counts[3])
    # neighbouring grades are ambiguous for the rater, distant ones are not
    sev = 0.5 * (hr.SEVERITY_EDGES[2] + hr.SEVERITY_EDGES[3])
    seen = Counter(hr.rater_grade(rng, sev, 0.5) for _ in range(2000))
    assert seen[3] > seen[2] > 0 and seen[3] > seen[4] > 0
    assert seen[1] == 0 and seen[5] == 0


def test_muscle_texture_has_its_own_stream_and_stays_out_of_the_bone(tmp_path: Path) -> None:
    """The same seed with and without texture: same anatomy, motion and grade; the reconstructions differ in
    the muscle by about the drawn SD, and hardly in the cortex."""
    params = {"n": 96, "n_views": 72, "n_slices": 8, "grade": 1, "site": "tibia", "photons": 4e5}
    (a,) = _rows(hr.generate(tmp_path / "a", 1, 21, workers=1, params={**params, "texture_sd": 60.0}))
    (b,) = _rows(hr.generate(tmp_path / "b", 1, 21, workers=1, params={**params, "texture_sd": 0.0}))
    same = ("study_uid", "label", "grade_true", "motion_severity", "site", "scanner", "photons", "tilt_deg")
    assert {k: a[k] for k in same} == {k: b[k] for k in same}
    assert (a["texture_sd"], b["texture_sd"]) == (60.0, 0.0)
    va = np.stack([d.pixel_array for d in _series(tmp_path / "a", a["study_uid"])]).astype(float)
    vb = np.stack([d.pixel_array for d in _series(tmp_path / "b", b["study_uid"])]).astype(float)
    diff = np.abs(va - vb)
    muscle = (vb > 0) & (vb < 80)
    cortex = vb > 500  # the cortex and its partial volume (0.9 mm pixels here)
    assert muscle.sum() > 1000 and cortex.sum() > 100
    assert diff[muscle].mean() > 20 and diff[cortex].mean() < 0.5 * diff[muscle].mean()
    # on by default (issue 34): every scan draws its SD from TEXTURE_SD_RANGE and says so in the manifest
    drawn = [r["texture_sd"] for r in _rows(hr.generate(tmp_path / "d", 4, 5, workers=2, params=SMALL))]
    lo, hi = hr.anat.TEXTURE_SD_RANGE
    assert len(set(drawn)) == 4 and all(lo <= s <= hi for s in drawn)
    with pytest.raises(SynthError, match="texture SD"):
        hr.generate(tmp_path / "e", 1, 5, workers=1, params={**SMALL, "texture_sd": -5.0})
