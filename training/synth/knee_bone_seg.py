"""Synthetic 2-D multi-slice knee MR (coronal or sagittal) with exact femur/tibia/fibula masks.

Anatomy (LPS, mm, joint line at z = 0) from smooth implicit shapes (inside-
positive approximate signed distances joined by smooth unions): the femur
(shaft, metaphyseal flare, two condyles, intercondylar notch), the tibia
(plateau, metaphysis, shaft), the fibula (head and shaft, lateral and
posterior) and the patella (a distractor with the same bone signal). Each bone
has a cortex (dark) around marrow; articular cartilage covers the condyles, the
plateau and the patella's back; growth plates are open (cartilage-signal bands
in the distal femur and proximal tibia) in children and adolescents; muscle,
subcutaneous, popliteal and Hoffa fat fill the limb.

Acquisition: tissue signals of a T1 or proton-density fat-saturated sequence,
each slice averaged over three positions across its thickness (partial volume
across thick slices), a smooth multiplicative bias field, Rician noise
(magnitude of complex Gaussian noise) and anisotropic voxels (0.3-0.5 mm in
plane, 3-4 mm slices). Masks use the same sub-samples (a voxel belongs to a
bone when most of its thickness does) and are written in the source grid as an
.mha label map (1 femur, 2 tibia, 3 fibula) with the series' origin, spacing
and direction.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
from scipy.ndimage import gaussian_filter

from training.synth.common import (
    DEFAULT_DIFFICULTY,
    Equipment,
    UidSource,
    body_part_string,
    new_patient,
    new_series,
    new_study,
    standard_normal32,
)
from training.synth.params import Param
from training.synth.runner import StudyJob, generate_studies
from training.synth.volume import VolumeGeometry, write_slice_series

log = logging.getLogger(__name__)

TASK = "knee_bone_seg"
AGE_RANGE = (8.0, 70.0)
#: ``params`` this generator takes (training.synth.params)
PARAMS = {
    "orientation": Param(str, "slice plane (default: coronal 60 %, sagittal 40 %)", ("coronal", "sagittal")),
    "n": Param(int, "in-plane matrix (default 256, 320 or 384)"),
    "pixel_spacing": Param(float, "in-plane pixel spacing in mm (default: a 120-170 mm field of view)"),
    "thickness": Param(float, "slice thickness in mm (default 3.0, 3.5 or 4.0)"),
    "n_slices": Param(int, "slices (default 24-40)"),
}
LABELS = {"femur": 1, "tibia": 2, "fibula": 3}
EQUIPMENT = (
    Equipment("SIEMENS", "MAGNETOM Skyra", station="MR01", extra={"field": 3.0}),
    Equipment("GE MEDICAL SYSTEMS", "SIGNA Artist", station="MR02", extra={"field": 1.5}),
    Equipment("Philips Medical Systems", "Ingenia", station="MR03", extra={"field": 3.0}),
)
#: tissue -> (T1, PD fat-sat) relative signal
SIGNAL = {
    "air": (0.0, 0.0), "fat": (1.0, 0.12), "muscle": (0.33, 0.32), "cortex": (0.04, 0.04),
    "marrow": (0.88, 0.14), "red_marrow": (0.6, 0.32), "cartilage": (0.42, 0.68), "physis": (0.38, 0.78),
}


def _smax(a: np.ndarray, b: np.ndarray, k: float) -> np.ndarray:
    """Smooth union of two inside-positive distance fields."""
    h = np.maximum(k - np.abs(a - b), 0.0) / k
    return np.maximum(a, b) + h * h * k * 0.25


def _ellipsoid(p: tuple[np.ndarray, ...], c: tuple[float, float, float], s: tuple[float, float, float]) -> np.ndarray:
    r = np.sqrt(((p[0] - c[0]) / s[0]) ** 2 + ((p[1] - c[1]) / s[1]) ** 2 + ((p[2] - c[2]) / s[2]) ** 2)
    return (1.0 - r) * min(s)


def _rod(p: tuple[np.ndarray, ...], c: tuple[float, float], r: float, z0: float, z1: float,
         tilt: tuple[float, float] = (0.0, 0.0)) -> np.ndarray:
    dx = p[0] - c[0] - tilt[0] * p[2]
    dy = p[1] - c[1] - tilt[1] * p[2]
    return np.minimum(r - np.sqrt(dx * dx + dy * dy), np.minimum(p[2] - z0, z1 - p[2]))


def bone_fields(rng: np.random.Generator, p: tuple[np.ndarray, ...], size: float,
                lateral: float) -> dict[str, np.ndarray]:
    """Inside-positive distance fields (mm) of femur, tibia, fibula and patella at points ``p``."""
    s = size
    j = lambda lo, hi: float(rng.uniform(lo, hi))  # noqa: E731
    fem = _rod(p, (0.0, j(0, 6) * s), 13.5 * s, 25 * s, 400.0)
    fem = _smax(fem, _ellipsoid(p, (0.0, 4 * s, 32 * s), (34 * s, 24 * s, 28 * s)), 8.0)
    for side in (-1, 1):
        fem = _smax(fem, _ellipsoid(p, (side * j(19, 23) * s, 8 * s, 16 * s), (17 * s, 26 * s, 18 * s)), 6.0)
    fem = np.minimum(fem, -_ellipsoid(p, (0.0, 20 * s, 2 * s), (7 * s, 14 * s, 14 * s)))
    tib = np.minimum(_ellipsoid(p, (0.0, 5 * s, -14 * s), (j(36, 40) * s, 26 * s, 12 * s)), -6 * s - p[2])
    tib = _smax(tib, _ellipsoid(p, (0.0, 6 * s, -36 * s), (28 * s, 22 * s, 30 * s)), 8.0)
    tib = _smax(tib, _rod(p, (0.0, 8 * s), 15 * s, -400.0, -25 * s), 8.0)
    fib_c = (lateral * j(29, 33) * s, j(18, 24) * s)
    fib = _ellipsoid(p, (fib_c[0], fib_c[1], -27 * s), (9 * s, 9 * s, 10 * s))
    fib = _smax(fib, _rod(p, fib_c, 6 * s, -400.0, -30 * s, tilt=(-lateral * 0.03, 0.0)), 4.0)
    fib = np.minimum(fib, -(tib - 1.5))  # a thin gap to the tibia
    pat = _ellipsoid(p, (lateral * j(0, 4) * s, -j(38, 44) * s, j(18, 28) * s), (21 * s, 9 * s, 23 * s))
    return {"femur": fem, "tibia": tib, "fibula": fib, "patella": pat}


def tissue_signal(fields: dict[str, np.ndarray], p: tuple[np.ndarray, ...], seq: int, age: float,
                  physis_open: bool, size: float, limb: tuple[float, float, float]) -> np.ndarray:
    """Signal of the tissues at points ``p`` for sequence ``seq`` (0 T1, 1 PD fat-sat)."""
    sig = {k: v[seq] for k, v in SIGNAL.items()}
    r_limb, fat, yc = limb
    rr = np.sqrt(p[0] ** 2 + (p[1] - yc) ** 2)
    out = np.where(rr < r_limb, sig["fat"], sig["air"]).astype(np.float32)
    out = np.where(rr < r_limb - fat, sig["muscle"], out)
    popliteal = _ellipsoid(p, (0.0, 38 * size, 0.0), (24 * size, 14 * size, 45 * size)) > 0
    hoffa = _ellipsoid(p, (0.0, -26 * size, -8 * size), (18 * size, 9 * size, 11 * size)) > 0
    out = np.where((popliteal | hoffa) & (rr < r_limb - fat), sig["fat"], out)
    marrow = sig["red_marrow"] if age < 14 else sig["marrow"]
    near_joint = np.abs(p[2]) < 45 * size
    zones = {"femur": p[2] < 14 * size, "tibia": p[2] > -11 * size, "patella": p[1] > -40 * size}
    for name, zone in zones.items():
        d = fields[name]
        out = np.where((d < 0) & (d > -2.4 * size) & zone, sig["cartilage"], out)
    for name in ("femur", "tibia", "fibula", "patella"):
        d = fields[name]
        cort = np.where(near_joint, 0.9, 2.6) * (1.0 if name != "fibula" else 0.8)
        out = np.where(d > 0, sig["cortex"], out)
        out = np.where(d > cort, marrow, out)
    if physis_open:
        fz = 27 * size + 2.5 * np.cos(p[0] / (12 * size))
        tz = -21 * size - 2.0 * np.cos(p[0] / (12 * size))
        band = ((fields["femur"] > 1.0) & (np.abs(p[2] - fz) < 1.1)) | ((fields["tibia"] > 1.0)
                                                                         & (np.abs(p[2] - tz) < 1.1))
        out = np.where(band, sig["physis"], out)
    return out


def make_study(job: StudyJob) -> list[dict[str, Any]]:
    """Write one knee MR series and its label map; return the manifest row."""
    rng_a, rng_n = job.rng("anatomy"), job.rng("noise")
    prm = job.params
    uids = UidSource(f"{TASK}:{job.seed}")
    patient = new_patient(rng_a, AGE_RANGE)
    age = patient.age_years
    physis_open = age < float(rng_a.normal(15.0 if patient.sex == "F" else 16.5, 0.8))
    size = (0.72 + 0.28 * float(np.clip((age - 8.0) / 9.0, 0.0, 1.0))) * float(rng_a.uniform(0.92, 1.08))
    side = str(rng_a.choice(["L", "R"]))
    lateral = 1.0 if side == "L" else -1.0  # +x is the patient's left
    orientation = str(prm.get("orientation", rng_a.choice(["coronal", "sagittal"], p=[0.6, 0.4])))
    n = int(prm.get("n", rng_a.choice([256, 320, 384], p=[0.4, 0.4, 0.2])))
    px = float(prm.get("pixel_spacing", np.clip(rng_a.uniform(120.0, 170.0) / n, 0.3, 0.5)))
    thick = float(prm.get("thickness", rng_a.choice([3.0, 3.5, 4.0])))
    gap = float(rng_a.choice([0.0, 0.3, 0.5]))
    spacing = thick + gap
    n_sl = int(prm.get("n_slices", rng_a.integers(24, 41)))
    seq = int(rng_a.random() < 0.5)
    # grid: centre near the joint, slices centred on the knee
    centre = np.array([rng_a.normal(0, 5), rng_a.normal(2, 5), rng_a.normal(0, 8)])
    probe = VolumeGeometry(orientation, (px, px), spacing, thick, (0.0, 0.0, 0.0))
    origin = (centre - probe.row_dir * px * (n // 2) - probe.col_dir * px * (n // 2)
              - probe.normal * spacing * (n_sl - 1) / 2)
    geom = VolumeGeometry(orientation, (px, px), spacing, thick, tuple(float(v) for v in origin))
    ii = np.arange(n, dtype=np.float32)
    cols, rows = np.meshgrid(ii * px, ii * px)
    limb = (float(rng_a.uniform(55, 75) * size), float(rng_a.uniform(4, 14)), float(rng_a.normal(5, 3)))
    shape_seed = int(rng_a.integers(1 << 62))  # the same shapes for every sub-sample
    signal = np.zeros((n_sl, n, n), dtype=np.float32)
    votes = {k: np.zeros((n_sl, n, n), dtype=np.uint8) for k in LABELS}
    subs = (-thick / 3.0, 0.0, thick / 3.0)
    for k in range(n_sl):
        for off in subs:
            base = np.asarray(origin) + geom.normal * (k * spacing + off)
            pts = tuple((base[a] + geom.row_dir[a] * cols + geom.col_dir[a] * rows).astype(np.float32)
                        for a in range(3))
            fields = bone_fields(np.random.default_rng(shape_seed), pts, size, lateral)
            signal[k] += tissue_signal(fields, pts, seq, age, physis_open, size, limb) / len(subs)
            for name in LABELS:
                votes[name][k] += fields[name] > 0
    labels = np.zeros((n_sl, n, n), dtype=np.uint8)
    for name, value in LABELS.items():
        labels[votes[name] >= 2] = value
    # acquisition: in-plane blur, bias field, Rician noise
    signal = gaussian_filter(signal, sigma=(0.0, 0.6, 0.6))
    zz, yy, xx = np.meshgrid(np.linspace(-1, 1, n_sl), np.linspace(-1, 1, n), np.linspace(-1, 1, n), indexing="ij")
    coef = rng_n.normal(0.0, 0.12 + 0.15 * job.difficulty, size=6)
    bias = np.exp(coef[0] * xx + coef[1] * yy + coef[2] * zz + coef[3] * xx * yy + coef[4] * yy**2
                  + coef[5] * xx**2).astype(np.float32)
    sigma = float(rng_n.uniform(0.015, 0.03 + 0.03 * job.difficulty))
    re = signal * bias + np.float32(sigma) * standard_normal32(rng_n, signal.shape)
    im = np.float32(sigma) * standard_normal32(rng_n, signal.shape)
    mag = np.sqrt(re * re + im * im)
    scale = float(rng_n.uniform(1200.0, 2600.0))
    values = np.clip(mag * scale, 0, 4095)

    eq = EQUIPMENT[int(rng_a.integers(len(EQUIPMENT)))]
    study = new_study(rng_a, uids, patient, str(rng_a.choice(["MRT KNIE", "MR KNEE", "RM RODILLA"])))
    seq_name = ("T1 TSE", "PD FS TSE")[seq]
    series = new_series(uids, int(rng_a.integers(2, 8)), "MR", body_part_string(rng_a, "KNEE", 0.3),
                        laterality=side, description=f"{seq_name} {orientation[:3]}", protocol="Knie")
    tr, te = ((600.0, 12.0), (3000.0, 35.0))[seq]
    extra = {"ScanningSequence": "SE", "SequenceVariant": ["SK", "SP"], "ScanOptions": "FS" if seq else "",
             "MRAcquisitionType": "2D", "RepetitionTime": f"{tr:g}", "EchoTime": f"{te:g}",
             "EchoTrainLength": 4 if seq == 0 else 12, "MagneticFieldStrength": f"{eq.extra['field']:g}",
             "ImagingFrequency": f"{42.577 * eq.extra['field']:.4f}", "ImagedNucleus": "1H",
             "SequenceName": "*tse2d1_4" if seq == 0 else "*tse2d1_12", "FlipAngle": "150",
             "NumberOfAverages": "1"}
    sops = write_slice_series(job.out, values, geom, modality="MR", patient=patient, study=study, series=series,
                              equipment=eq, uids=uids, window=(float(np.percentile(values, 99) / 2),
                                                                float(np.percentile(values, 99))),
                              signed=False, bits_stored=12,
                              image_type=("ORIGINAL", "PRIMARY", "OTHER"), extra=extra)
    mask_rel = Path("masks") / f"{study.study_uid}.mha"
    write_label_map(job.out / mask_rel, labels, geom)
    return [{"study_uid": study.study_uid, "patient_id": patient.patient_id, "task": TASK,
             "mask": mask_rel.as_posix(), "labels": dict(LABELS), "series_uid": series.series_uid,
             "orientation": orientation, "sequence": seq_name, "physis_open": bool(physis_open),
             "n_slices": len(sops), "voxels": {k: int((labels == v).sum()) for k, v in LABELS.items()}}]


def write_label_map(path: Path, labels: np.ndarray, geom: VolumeGeometry) -> Path:
    """Write ``labels`` (slices, rows, cols) as .mha in the series' physical grid (atomic rename)."""
    img = sitk.GetImageFromArray(labels)
    img.SetSpacing((geom.pixel_spacing[1], geom.pixel_spacing[0], geom.slice_spacing))
    img.SetOrigin(tuple(float(v) for v in geom.origin))
    img.SetDirection(tuple(float(v) for v in geom.direction_matrix().ravel()))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}")
    sitk.WriteImage(img, str(tmp), useCompression=True)
    tmp.replace(path)
    return path


def generate(out: Path, n: int, seed: int, *, workers: int = 2, difficulty: float = DEFAULT_DIFFICULTY,
             label_noise: float = 0.02, params: dict[str, Any] | None = None) -> Path:
    """Write ``n`` synthetic knee MR studies with label maps under ``out``; return the manifest path.

    ``label_noise`` does not apply (masks are exact). ``params``: the names of :data:`PARAMS`.
    """
    return generate_studies(Path(out), n, seed, make_study, workers=workers, difficulty=difficulty,
                            label_noise=label_noise, params=params, param_spec=PARAMS)


def preview(out_png: Path, n: int, seed: int) -> Path:
    """Contact sheet of ``n`` studies."""
    from training.synth.preview import contact_sheet

    return contact_sheet(TASK, Path(out_png), n, seed)
