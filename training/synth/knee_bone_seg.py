"""Synthetic 2-D multi-slice knee MR (coronal or sagittal) with exact femur/tibia/fibula masks.

Anatomy (training.synth.knee_anatomy): femur (shaft, metaphyseal flare, two
condyles, notch), tibia (sloping plateau, metaphysis, shaft), fibula (head and
shaft) and patella (a distractor with bone signal) as smooth implicit shapes
whose dimensions come from 16 independent shape modes on an age-dependent size;
flexion 0-30 deg (femur and patella rotate about the condyles), varus/valgus and
internal/external rotation of a few degrees, and the knee placed centimetres
away from the patient-coordinate origin (x toward the knee's side, y, z), so
neither the joint's patient z nor the bones' patient positions are fixed.

Tissues: cortex, marrow with smooth heterogeneity and red-marrow islands,
cartilage (thickness mode), open growth plates in the young, menisci, cruciate
and collateral ligaments, patellar and quadriceps tendons, popliteal vessels,
subcutaneous fat of varying thickness and muscle with fat septa. Findings drawn
with age-dependent frequencies and never from the labels: effusion, Baker cyst,
osteophytes (bone: inside the label), subchondral cysts and marrow oedema
(inside bone: the label is unchanged) and, rarely, a metal implant's signal void.

Acquisition: scanner (vendor, 1.5 or 3 T: SNR, fat-sat quality), sequence
(T1, PD fat-sat or PD) with tissue-contrast jitter, each slice averaged over
three positions across its thickness, a smooth bias field plus a coil-element
hot spot, Rician noise scaled by field strength and voxel size. The slice slab
is placed on the knee with an in-plane off-centre and a random coverage start.
Masks use the same sub-samples (a voxel belongs to a bone when most of its
thickness does) and are written as an .mha label map (1 femur, 2 tibia, 3 fibula)
in the series' grid.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
from scipy.ndimage import gaussian_filter, zoom

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
from training.synth.knee_anatomy import KneeFindings, KneePose, KneeShape, Points, bone_fields
from training.synth.knee_tissue import Scene, scanner_signals, soft_background, tissue_signal
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
    "variation": Param(int, "1 (default): shape modes, pose, patient offsets, off-centre slab; 0: the mean knee "
                            "at the patient origin (ablations)", (0, 1)),
    "findings": Param(int, "1 (default): effusion, degeneration, oedema, red marrow, metal; 0: none (ablations)",
                      (0, 1)),
}
LABELS = {"femur": 1, "tibia": 2, "fibula": 3}
#: (vendor, model, station, field T)
EQUIPMENT = (
    Equipment("SIEMENS", "MAGNETOM Skyra", station="MR01", extra={"field": 3.0}),
    Equipment("GE MEDICAL SYSTEMS", "SIGNA Artist", station="MR02", extra={"field": 1.5}),
    Equipment("Philips Medical Systems", "Ingenia", station="MR03", extra={"field": 3.0}),
    Equipment("SIEMENS", "MAGNETOM Aera", station="MR04", extra={"field": 1.5}),
    Equipment("GE MEDICAL SYSTEMS", "SIGNA Premier", station="MR05", extra={"field": 3.0}),
    Equipment("Philips Medical Systems", "Achieva", station="MR06", extra={"field": 1.5}),
)
SEQUENCES = ("T1 TSE", "PD FS TSE", "PD TSE")


def sample_anatomy(rng: np.random.Generator, age: float, sex: str, lateral: float, variation: bool = True,
                   findings: bool = True) -> tuple[KneeShape, KneePose, KneeFindings]:
    """Shape, pose and findings of one knee (``variation``/``findings`` off: mean knee at the origin / none)."""
    size = (0.72 + 0.28 * float(np.clip((age - 8.0) / 9.0, 0.0, 1.0))) * float(rng.uniform(0.92, 1.08))
    if variation:
        shape = KneeShape.sample(rng, size, lateral)
        pose = KneePose.sample(rng, shape)
    else:
        shape = KneeShape.from_modes(size, lateral, (0.0,) * 16)
        pose = KneePose.build(shape, 0.0, 0.0, 0.0, 0.0, (0.0, 0.0, 0.0))
    found = KneeFindings.sample(rng, shape, age, sex) if findings else KneeFindings()
    return shape, pose, found


def place_grid(rng: np.random.Generator, pose: KneePose, orientation: str, n: int, px: float, spacing: float,
               thick: float, n_sl: int, variation: bool = True) -> VolumeGeometry:
    """Slice grid on the knee: in-plane off-centre (+-20 mm) and a random coverage start along the normal."""
    probe = VolumeGeometry(orientation, (px, px), spacing, thick, (0.0, 0.0, 0.0))
    joint = np.array([0.0, 2.0, 0.0])
    if variation:
        off = np.clip(rng.normal(0.0, 8.0, size=2), -20.0, 20.0)
        joint = joint + probe.row_dir * off[0] + probe.col_dir * off[1] + probe.normal * rng.uniform(-12.0, 12.0)
    centre = pose.patient_point(joint)
    origin = (centre - probe.row_dir * px * (n // 2) - probe.col_dir * px * (n // 2)
              - probe.normal * spacing * (n_sl - 1) / 2)
    return VolumeGeometry(orientation, (px, px), spacing, thick, tuple(float(v) for v in origin))


def texture(rng: np.random.Generator, shape: tuple[int, int, int], px: float, scale_mm: float) -> np.ndarray:
    """Smooth unit-variance noise on the slice grid (correlation length ``scale_mm`` in plane)."""
    step = max(1, int(round(scale_mm / px / 10)))  # in units of 2 pixels
    small = (shape[0], shape[1] // (2 * step) + 2, shape[2] // (2 * step) + 2)
    z = gaussian_filter(standard_normal32(rng, small), sigma=(0.7, 2.5, 2.5))
    z /= max(float(z.std()), 1e-6)
    half = zoom(z, (1.0, step, step), order=1, prefilter=False)  # at 2-pixel resolution, then repeated
    big = np.repeat(np.repeat(half, 2, axis=1), 2, axis=2)
    return np.ascontiguousarray(big[:, :shape[1], :shape[2]], dtype=np.float32)


def render(scene: Scene, geom: VolumeGeometry, n: int, n_sl: int, tex: tuple[np.ndarray, np.ndarray],
           fat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Noise-free signal and label map (slices, rows, cols), each slice over three sub-positions."""
    px, thick, spacing = geom.pixel_spacing[0], geom.slice_thickness, geom.slice_spacing
    ii = np.arange(n, dtype=np.float32)
    cols, rows = np.meshgrid(ii * px, ii * px)
    signal = np.zeros((n_sl, n, n), dtype=np.float32)
    votes = {k: np.zeros((n_sl, n, n), dtype=np.uint8) for k in LABELS}
    subs = (-thick / 3.0, 0.0, thick / 3.0)
    origin = np.asarray(geom.origin)
    for k in range(n_sl):
        tk = (tex[0][k], tex[1][k])
        background = None
        for off in subs:
            base = origin + geom.normal * (k * spacing + off)
            pts: Points = tuple((base[a] + geom.row_dir[a] * cols + geom.col_dir[a] * rows).astype(np.float32)
                                for a in range(3))  # type: ignore[assignment]
            q = scene.pose.to_knee(pts)
            qf = scene.pose.to_femur(q)
            fields = bone_fields(q, qf, scene.shape, scene.findings)
            if background is None:  # soft tissue once per slice (its first sub-position), bones at each
                background = soft_background(scene, q, qf, fields, tk, fat)
            signal[k] += tissue_signal(scene, q, qf, fields, tk, fat, background) / len(subs)
            for name in LABELS:
                votes[name][k] += fields[name] > 0
    labels = np.zeros((n_sl, n, n), dtype=np.uint8)
    for name, value in LABELS.items():
        labels[votes[name] >= 2] = value
    return signal, labels


def acquire(rng: np.random.Generator, signal: np.ndarray, field_t: float, voxel_mm3: float,
            difficulty: float) -> np.ndarray:
    """In-plane blur, bias field with a coil-element hot spot, Rician noise (SNR by field and voxel), 12-bit."""
    n_sl, n, _ = signal.shape
    signal = gaussian_filter(signal, sigma=(0.0, 0.6, 0.6))
    zz, yy, xx = np.meshgrid(np.linspace(-1, 1, n_sl, dtype=np.float32), np.linspace(-1, 1, n, dtype=np.float32),
                             np.linspace(-1, 1, n, dtype=np.float32), indexing="ij")
    coef = rng.normal(0.0, 0.12 + 0.15 * difficulty, size=6)
    logb = (coef[0] * xx + coef[1] * yy + coef[2] * zz + coef[3] * xx * yy + coef[4] * yy**2 + coef[5] * xx**2)
    bias = np.exp(logb.astype(np.float32))
    if rng.random() < 0.5:  # a surface-coil element close to the skin
        ang = rng.uniform(0, 2 * np.pi)
        x0, y0 = 0.9 * np.cos(ang), 0.9 * np.sin(ang)
        amp = float(rng.uniform(0.2, 0.4 + 0.6 * difficulty))
        bias *= 1.0 + np.float32(amp) * np.exp(-((xx - x0) ** 2 + (yy - y0) ** 2) / np.float32(0.35))
    snr = (2.0 if field_t >= 3.0 else 1.0) * float(np.clip(np.sqrt(voxel_mm3 / 0.56), 0.7, 1.5))
    sigma = float(rng.uniform(0.02, 0.04 + 0.05 * difficulty)) / snr
    re = signal * bias + np.float32(sigma) * standard_normal32(rng, signal.shape)
    im = np.float32(sigma) * standard_normal32(rng, signal.shape)
    mag = np.sqrt(re * re + im * im)
    return np.clip(mag * float(rng.uniform(1200.0, 2600.0)), 0, 4095)


def _fat_sat_map(rng: np.random.Generator, n: int, seq: int, field_t: float) -> np.ndarray:
    """Fraction of fat signal that escapes suppression (PD fat-sat only): a smooth ramp toward one edge."""
    if seq != 1 or rng.random() > (0.35 if field_t < 3.0 else 0.15):
        return np.zeros((n, n), dtype=np.float32)
    ang = rng.uniform(0, 2 * np.pi)
    u = np.linspace(-1, 1, n, dtype=np.float32)
    yy, xx = np.meshgrid(u, u, indexing="ij")
    ramp = np.clip((np.cos(ang) * xx + np.sin(ang) * yy - 0.3) / 0.6, 0.0, 1.0)
    return (ramp * np.float32(rng.uniform(0.3, 0.8))).astype(np.float32)


def make_study(job: StudyJob) -> list[dict[str, Any]]:
    """Write one knee MR series and its label map; return the manifest row."""
    rng_a, rng_n = job.rng("anatomy"), job.rng("noise")
    prm = job.params
    uids = UidSource(f"{TASK}:{job.seed}")
    patient = new_patient(rng_a, AGE_RANGE)
    age = patient.age_years
    physis_open = age < float(rng_a.normal(15.0 if patient.sex == "F" else 16.5, 0.8))
    side = str(rng_a.choice(["L", "R"]))
    variation = bool(prm.get("variation", 1))
    shape, pose, found = sample_anatomy(rng_a, age, patient.sex, 1.0 if side == "L" else -1.0, variation,
                                        bool(prm.get("findings", 1)))
    orientation = str(prm.get("orientation", rng_a.choice(["coronal", "sagittal"], p=[0.6, 0.4])))
    n = int(prm.get("n", rng_a.choice([256, 320, 384], p=[0.4, 0.4, 0.2])))
    px = float(prm.get("pixel_spacing", np.clip(rng_a.uniform(120.0, 170.0) / n, 0.3, 0.5)))
    thick = float(prm.get("thickness", rng_a.choice([3.0, 3.5, 4.0])))
    spacing = thick + float(rng_a.choice([0.0, 0.3, 0.5]))
    n_sl = int(prm.get("n_slices", rng_a.integers(24, 41)))
    eq = EQUIPMENT[int(rng_a.integers(len(EQUIPMENT)))]
    field_t = float(eq.extra["field"])
    seq = int(rng_a.choice(3, p=[0.4, 0.4, 0.2]))
    geom = place_grid(rng_a, pose, orientation, n, px, spacing, thick, n_sl, variation)
    limb = (float(rng_a.uniform(55, 75) * shape.size), float(rng_a.uniform(4, 14)), float(rng_a.normal(5, 3)),
            float(rng_a.uniform(0, np.pi)))
    scene = Scene(shape, pose, found, scanner_signals(rng_a, seq, field_t, eq.manufacturer), age, physis_open, limb)
    tex = (texture(rng_a, (n_sl, n, n), px, 6.0), texture(rng_a, (n_sl, n, n), px, 14.0))
    signal, labels = render(scene, geom, n, n_sl, tex, _fat_sat_map(rng_a, n, seq, field_t))
    values = acquire(rng_n, signal, field_t, px * px * thick, job.difficulty)
    return [_write(job, rng_a, uids, patient, side, values, labels, geom, eq, seq, orientation,
                   {"physis_open": bool(physis_open), "field_strength": field_t,
                    "shape_modes": [round(v, 4) for v in shape.modes],
                    "pose": {"flexion": round(pose.flexion, 2), "varus": round(pose.varus, 2),
                             "rotation": round(pose.rotation, 2),
                             "joint_lps": [round(float(v), 2) for v in pose.patient_point(np.zeros(3))]},
                    "findings": {"effusion": round(found.effusion, 3), "osteophytes": len(found.osteophytes),
                                 "cysts": len(found.cysts), "oedema": len(found.oedema),
                                 "baker_cyst": found.baker is not None, "metal": found.metal is not None}})]


def _write(job: StudyJob, rng: np.random.Generator, uids: UidSource, patient: Any, side: str, values: np.ndarray,
           labels: np.ndarray, geom: VolumeGeometry, eq: Equipment, seq: int, orientation: str,
           info: dict[str, Any]) -> dict[str, Any]:
    """Write the DICOM series and the label map; the manifest row."""
    study = new_study(rng, uids, patient, str(rng.choice(["MRT KNIE", "MR KNEE", "RM RODILLA"])))
    seq_name = SEQUENCES[seq]
    series = new_series(uids, int(rng.integers(2, 8)), "MR", body_part_string(rng, "KNEE", 0.3),
                        laterality=side, description=f"{seq_name} {orientation[:3]}", protocol="Knie")
    tr, te = ((600.0, 12.0), (3000.0, 35.0), (2800.0, 30.0))[seq]
    extra = {"ScanningSequence": "SE", "SequenceVariant": ["SK", "SP"], "ScanOptions": "FS" if seq == 1 else "",
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
    return {"study_uid": study.study_uid, "patient_id": patient.patient_id, "task": TASK,
            "mask": mask_rel.as_posix(), "labels": dict(LABELS), "series_uid": series.series_uid,
            "orientation": orientation, "sequence": seq_name, "n_slices": len(sops),
            "voxels": {k: int((labels == v).sum()) for k, v in LABELS.items()}, **info}


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
