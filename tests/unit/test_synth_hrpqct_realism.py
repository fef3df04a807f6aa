"""HR-pQCT generator realism (issue 34): soft-tissue texture, anatomy and scanner variation are on by default,
vary from scan to scan, and none of it depends on the motion grade."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pydicom
import pytest

from training.synth import hrpqct_anatomy as anat
from training.synth import hrpqct_motion as hr
from training.synth import hrpqct_scan as scan
from training.synth.tomo import ParallelBeam

SMALL = {"n": 64, "n_views": 48, "n_slices": 8}
NUISANCE = ("texture_sd", "photons", "calibration_slope", "calibration_offset", "tilt_deg", "offset_mm", "fov_mm",
            "site", "scanner")


def _rows(manifest: Path) -> list[dict]:
    return [json.loads(line) for line in manifest.read_text().splitlines() if line.strip()]


def _volume(root: Path, study_uid: str) -> tuple[np.ndarray, list[pydicom.Dataset]]:
    dss = sorted((pydicom.dcmread(f) for f in (root / study_uid).glob("*/*.dcm")), key=lambda d: int(d.InstanceNumber))
    return np.stack([d.pixel_array.astype(float) * float(d.RescaleSlope) + float(d.RescaleIntercept) for d in dss]), dss


def test_soft_tissue_has_fascicles_septa_and_vessels() -> None:
    """Septa push the muscle map far below the fascicle texture's Gaussian tail, strands lift the fat, vessels
    exist; switching septa off or the SD to 0 removes them."""
    rng = np.random.default_rng(0)
    soft = anat.soft_tissue(rng, 128, 0.25, 16.0, 25.0)
    assert soft.sd == 25.0
    assert 0.8 * 25 < float(np.median([np.percentile(m, 75) - np.percentile(m, 25) for m in soft.muscle])) / 1.35 < 40
    plain = anat.soft_tissue(np.random.default_rng(0), 128, 0.25, 16.0, 25.0, septa=False)
    septa = plain.muscle - soft.muscle  # the fat septa alone: >= 0, a network of thin lines
    assert septa.min() >= -1e-3 and 0.03 < (septa > 20).mean() < 0.4 and septa.max() > 35
    assert (soft.fat > 10).mean() > 0.02 and not plain.fat.any()  # fibrous strands in the subcutaneous fat
    assert soft.vessels.max() == 1.0 and 0.002 < (soft.vessels > 0.5).mean() < 0.2
    assert not np.allclose(soft.muscle[0], soft.muscle[1])  # the pattern changes along the limb
    off = anat.soft_tissue(np.random.default_rng(0), 128, 0.25, 16.0, 0.0)
    assert not off.muscle.any() and not off.vessels.any()


@pytest.mark.parametrize("site", ["radius", "tibia"])
def test_shape_modes_vary_independently(site: str) -> None:
    """Bone size, aspect, cortex, ulna/fibula position and fat layer vary between subjects (several modes)."""
    rng = np.random.default_rng(1)
    shapes = [anat.draw_shape(rng, site, "F", 0.3) for _ in range(40)]
    th = np.linspace(0, 2 * np.pi, 360, endpoint=False)
    area = np.array([0.5 * np.mean(s.bones[0].outer(th) ** 2) * 2 * np.pi for s in shapes])
    cort = np.array([s.bones[0].cort for s in shapes])
    aspect = np.array([s.bones[0].outer(np.array([0.0]))[0] / s.bones[0].outer(np.array([np.pi / 2]))[0]
                       for s in shapes])
    angle = np.array([np.arctan2(s.bones[1].cy - s.bones[0].cy, s.bones[1].cx - s.bones[0].cx) for s in shapes])
    fat = np.array([s.fat_mm for s in shapes])
    assert area.std() / area.mean() > 0.12
    assert cort.std() / cort.mean() > 0.2
    assert aspect.std() > 0.05 and angle.std() > 0.12 and fat.std() > 1.0
    assert abs(np.corrcoef(area, cort)[0, 1]) < 0.5  # separate modes, not one size knob
    assert np.ptp([s.bones[0].cort_swing for s in shapes]) > 0.2


def test_tissue_marrow_and_trabecular_pattern_vary() -> None:
    rng = np.random.default_rng(2)
    ts = [anat.draw_tissue(rng, 0.3, age) for age in np.linspace(25, 85, 40)]
    assert np.ptp([t.marrow for t in ts]) > 30 and min(t.marrow_sd for t in ts) >= 5
    assert np.ptp([t.spacing_mm for t in ts]) > 0.5 and np.ptp([t.aniso for t in ts]) > 0.3
    assert np.ptp([t.z_stretch for t in ts]) > 0.3 and np.ptp([t.trab_density for t in ts]) > 100
    assert np.ptp([t.muscle for t in ts]) > 10
    # the pattern follows its spacing: a coarse network has fewer edges per voxel than a fine one
    fine, coarse = (anat.trabecular_fraction(np.random.default_rng(3), (8, 96, 96), 0.1, 0.08,
                                             ts[0].__class__(**{**ts[0].__dict__, "spacing_mm": sp}))
                    for sp in (0.8, 1.6))
    edges = [float(np.abs(np.diff(f > 0.5, axis=2)).mean()) for f in (fine, coarse)]
    assert edges[0] > 1.4 * edges[1]


def test_marrow_is_heterogeneous_inside_the_bone() -> None:
    """In a phantom with a very sparse network, the marrow between trabeculae varies by the drawn field."""
    rng = np.random.default_rng(4)
    shape = anat.draw_shape(rng, "radius", "F", 0.0)
    soft = anat.soft_tissue(rng, 160, 0.4, 32.0, 0.0)
    vol, _ = anat.phantom(rng, 160, 6, 0.4, 0.082, 30.0, "F", soft, anat.Pose(0.0, (0.0, 0.0)), shape, scan.D_AIR)
    b = shape.bones[0]
    c = (np.arange(160) - 80) * 0.4
    x, y = np.meshgrid(c, c)
    core = np.hypot(x - b.cx, y - b.cy) < 0.5 * min(b.outer(np.linspace(0, 6.3, 90)))
    marrow = vol[:, core][vol[:, core] < 100]  # between the trabeculae
    assert marrow.size > 200 and marrow.std() > 3.0


def test_pose_rotates_and_shifts_within_the_field_of_view() -> None:
    rng = np.random.default_rng(5)
    poses = [anat.draw_pose(rng, 10.0) for _ in range(50)]
    assert np.degrees(np.std([p.tilt for p in poses])) > 5
    assert np.std([p.offset[0] for p in poses]) > 0.5
    assert all(np.hypot(*p.offset) <= anat.MAX_OFFSET_MM + 1e-9 for p in poses)
    assert all(np.hypot(*anat.draw_pose(rng, 0.4).offset) <= 0.4 + 1e-9 for _ in range(20))
    p = poses[0]
    ax, ay = p.to_anatomy(np.array([3.0]), np.array([-2.0]))
    assert np.allclose(p.to_image(float(ax[0]), float(ay[0])), (3.0, -2.0), atol=1e-5)


def test_scanner_settings_vary_dose_calibration_fov_and_origin() -> None:
    rng = np.random.default_rng(6)
    sets = {m: [scan.draw_settings(rng, m, "radius") for _ in range(200)] for m in scan.SCANNERS}
    photons = np.array([s.photons for v in sets.values() for s in v])
    assert photons.max() / photons.min() > 6 and photons.min() >= scan.PHOTON_RANGE[0]
    offsets = {m: np.mean([s.offset for s in v]) for m, v in sets.items()}
    assert offsets["XtremeCT"] - offsets["XtremeCT II"] > 6  # the generations differ systematically
    assert np.std([s.slope for s in sets["XtremeCT"]]) > 0.01
    assert np.ptp([s.fov_mm for s in sets["XtremeCT"]]) > 4
    assert np.std([s.origin[0] for s in sets["XtremeCT"]]) > 20
    assert scan.draw_settings(rng, "XtremeCT", "radius", min_fov_mm=90.0).fov_mm == 90.0
    assert scan.SCANNERS["XtremeCT"].slice_mm == 0.082 and scan.SCANNERS["XtremeCT II"].slice_mm == 0.0607


def test_nuisance_is_on_by_default_and_independent_of_the_grade(tmp_path: Path) -> None:
    """The same seeds with grade 1 and grade 5: every nuisance value is the same; they vary between seeds."""
    low = _rows(hr.generate(tmp_path / "g1", 3, 40, workers=1, params={**SMALL, "grade": 1}))
    high = _rows(hr.generate(tmp_path / "g5", 3, 40, workers=1, params={**SMALL, "grade": 5}))
    for a, b in zip(low, high, strict=True):
        assert {k: a[k] for k in NUISANCE} == {k: b[k] for k in NUISANCE}
        assert a["grade_true"] == 1 and b["grade_true"] == 5
    for key in ("texture_sd", "photons", "calibration_offset", "tilt_deg", "fov_mm"):
        assert len({json.dumps(r[key]) for r in low}) >= 2, key  # (rounded in the manifest: two may coincide)
    assert all(r["texture_sd"] > 0 for r in low)
    # the patient origin is random: the first slice's position is not the centred grid's
    xs = [float(_volume(tmp_path / "g1", r["study_uid"])[1][0].ImagePositionPatient[0]) for r in low]
    centred = [-(SMALL["n"] // 2) * r["fov_mm"] / SMALL["n"] for r in low]
    assert max(abs(x - c) for x, c in zip(xs, centred, strict=True)) > 5


def test_calibration_and_dose_act_on_the_reconstruction() -> None:
    """Same phantom, motion and noise stream: the calibration maps the density linearly (slope, offset), and a
    tenth of the photons gives about sqrt(10) times the noise."""
    geom = ParallelBeam(48, 36)
    c = np.arange(48) - 24
    disk = (np.hypot(*np.meshgrid(c, c)) < 15).astype(np.float32) * (35.0 - scan.D_AIR) + scan.D_AIR
    dens = np.repeat(disk[None], 6, axis=0)
    still = hr.Motion(np.zeros((36, 2)), np.zeros(36), np.zeros(36))
    scanner = scan.SCANNERS["XtremeCT"]

    def rec(photons: float, slope: float, offset: float) -> np.ndarray:
        settings = scan.ScanSettings(photons, slope, offset, 48.0, (0.0, 0.0, 0.0))
        return scan.acquire(np.random.default_rng(7), dens, still, geom, 1.0, 2, scanner, settings)[0]

    plain, calibrated = rec(2e5, 1.0, 0.0), rec(2e5, 1.03, -12.0)
    assert plain.shape == (2, 48, 48)
    np.testing.assert_allclose(calibrated, plain * 1.03 - 12.0, rtol=1e-4, atol=1e-2)
    inner = np.hypot(*np.meshgrid(c, c)) < 10
    sd_high, sd_low = (float(rec(p, 1.0, 0.0)[:, inner].std()) for p in (4e5, 4e4))
    assert 2.2 < sd_low / sd_high < 4.5
