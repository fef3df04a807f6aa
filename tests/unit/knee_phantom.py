"""Test double: small knee MR phantom studies (femur, tibia, fibula, patella) with exact label maps.

Used by the knee task tests until/besides ``training.synth.knee_bone_seg``. Each
study is one MR slice series written with :func:`training.synth.volume.write_slice_series`
plus an ``.mha`` label map (1 femur, 2 tibia, 3 fibula) carrying the series
geometry, and a ``labels.jsonl`` row.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from training.synth.common import Equipment, UidSource, new_patient, new_series, new_study, study_seed
from training.synth.manifest import ManifestWriter
from training.synth.volume import VolumeGeometry, write_slice_series


def phantom(n_slices: int, rows: int, cols: int, pixel_mm: float, slice_mm: float, seed: int,
            orientation: str = "coronal") -> tuple[np.ndarray, np.ndarray]:
    """(signal, labels) of shape (n_slices, rows, cols); rows run head to feet.

    Slices step through the knee (A-P for coronal, L-R for sagittal); in-plane the
    columns run across the limb. Bones are tapered cylinders along the rows.
    """
    rng = np.random.default_rng(seed)
    k = (np.arange(n_slices) - (n_slices - 1) / 2.0) * slice_mm
    r = (np.arange(rows) - rows / 2.0) * pixel_mm + rng.uniform(-8, 8)
    c = (np.arange(cols) - (cols - 1) / 2.0) * pixel_mm + rng.uniform(-6, 6)
    kk, rr, cc = np.meshgrid(k, r, c, indexing="ij")
    jz = 0.0  # joint line (row coordinate, mm)
    scale = rng.uniform(0.9, 1.1)
    limb = (cc / (62 * scale)) ** 2 + (kk / (58 * scale)) ** 2 < 1
    fat = limb & ((cc / (56 * scale)) ** 2 + (kk / (52 * scale)) ** 2 >= 1)
    widen_f = np.clip((rr - (jz - 45)) / 45, 0, 1)
    femur = (rr < jz - 2.5) & ((cc / ((14 + 20 * widen_f) * scale)) ** 2 + (kk / ((13 + 9 * widen_f) * scale)) ** 2 < 1)
    widen_t = np.clip(((jz + 40) - rr) / 40, 0, 1)
    tibia = (rr > jz + 2.5) & ((cc / ((14 + 18 * widen_t) * scale)) ** 2 + (kk / ((13 + 8 * widen_t) * scale)) ** 2 < 1)
    side = 1.0 if orientation == "coronal" else -1.0
    fibula = (rr > jz + 14) & (((cc - side * 31 * scale) / 6.5) ** 2 + ((kk - 6) / 6.5) ** 2 < 1)
    fibula &= ~tibia
    patella = ((cc / 16) ** 2 + ((kk + 36 * scale) / 7) ** 2 + ((rr - (jz - 18)) / 20) ** 2) < 1
    signal = np.zeros(kk.shape, dtype=np.float32)
    signal[limb] = 0.35  # muscle
    signal[fat] = 0.9
    joint = limb & (np.abs(rr - jz) < 6) & (np.abs(cc) < 40 * scale)
    signal[joint] = 0.45  # cartilage, menisci
    for bone in (femur, tibia, fibula, patella):
        signal[bone] = 0.82
        cortex = bone & ~_erode(bone)
        signal[cortex] = 0.08
    bias = np.exp(0.25 * np.sin(rr / 60.0 + rng.uniform(0, 3)) + 0.2 * cc / 80.0).astype(np.float32)
    noisy = np.hypot(signal * bias + rng.normal(0, 0.02, signal.shape), rng.normal(0, 0.02, signal.shape))
    labels = np.zeros(kk.shape, dtype=np.uint8)
    labels[femur], labels[tibia], labels[fibula] = 1, 2, 3
    return (noisy * 1000.0).astype(np.float32), labels


def _erode(m: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    return ndimage.binary_erosion(m, iterations=1, structure=np.ones((1, 3, 3), bool))


def write_knee_study(out: Path, index: int, seed: int, *, n_slices: int = 20, rows: int = 128, cols: int = 128,
                     pixel_mm: float = 1.0, slice_mm: float = 3.5, orientation: str = "coronal",
                     modality: str = "MR", body_part: str = "KNEE") -> dict[str, object]:
    """Write one phantom study under ``out``; return its manifest row (mask path relative to ``out``)."""
    import SimpleITK as sitk

    s = study_seed(seed, index)
    rng = np.random.default_rng(s)
    uids = UidSource(f"knee-test:{s}")
    patient = new_patient(rng, (20, 70))
    study = new_study(rng, uids, patient, "MR KNEE")
    series = new_series(uids, 3, modality, body_part, description=f"PD {orientation}")
    equipment = Equipment(manufacturer="SYNTHETIC", model="PHANTOM MR")
    signal, labels = phantom(n_slices, rows, cols, pixel_mm, slice_mm, s, orientation)
    geom = VolumeGeometry(orientation, (pixel_mm, pixel_mm), slice_mm, slice_mm, (-60.0, 20.0, 40.0))
    extra = {"ScanningSequence": "SE", "SequenceVariant": "NONE", "ScanOptions": "", "MRAcquisitionType": "2D",
             "RepetitionTime": "3000", "EchoTime": "30", "EchoTrainLength": 8, "MagneticFieldStrength": "3",
             "ImagedNucleus": "1H"} if modality == "MR" else {}
    write_slice_series(out, signal, geom, modality=modality, patient=patient, study=study, series=series,
                       equipment=equipment, uids=uids, signed=False, bits_stored=12,
                       image_type=("ORIGINAL", "PRIMARY", "M"), extra=extra)
    img = sitk.GetImageFromArray(labels)
    img.SetSpacing((pixel_mm, pixel_mm, slice_mm))
    img.SetOrigin(tuple(float(v) for v in geom.position(0)))
    img.SetDirection(tuple(float(v) for v in geom.direction_matrix().ravel()))
    mask_rel = Path("masks") / f"{study.study_uid}.mha"
    (out / "masks").mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(img, str(out / mask_rel))
    return {"study_uid": study.study_uid, "patient_id": patient.patient_id, "mask": str(mask_rel),
            "synthetic": True}


def write_knee_dataset(out: Path, n: int, seed: int, **kwargs: object) -> Path:
    """``n`` phantom studies plus ``labels.jsonl``; returns the manifest path."""
    out.mkdir(parents=True, exist_ok=True)
    with ManifestWriter(out) as writer:
        for i in range(n):
            writer.append(write_knee_study(out, i, seed, **kwargs))  # type: ignore[arg-type]
        path = writer.finalize()
    return path
