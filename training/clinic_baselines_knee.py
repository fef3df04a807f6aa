"""Knee bone segmentation baselines: a coordinate-only atlas, and threshold plus connected components.

* **Coordinate-only atlas** (leave one out over the scored volumes, no pixel values):
  every other volume of the same side (DICOM Laterality, a header field) has its label map looked up at this volume's voxel positions in
  DICOM patient coordinates (nearest voxel; outside a volume counts as background),
  and each voxel takes the label most of them give it. If the synthetic knees sit at
  the same place in patient space with the same shape, this scores high without
  reading a pixel.
* **Threshold plus components**: marrow is the bone signal (bright on T1, dark but
  not air on fat-saturated PD, told apart by the series description); a threshold at
  the volume's Otsu level (PD fat-sat: between a quarter of it and it), one
  in-plane erosion to cut marrow from fat through the dark cortex, a 6 mm band
  cleared at the joint centre's height (cartilage and partial volume join femur and
  tibia), then 3-D connected components. Components reaching more than 15 mm past the joint on both
  sides (fat, muscle sheets) are dropped; the largest component above the joint
  centre (:func:`inference.mr.joint_centre`, patient z) is the femur, the largest
  below the tibia, the next below the fibula.

Both are scored as the network is (:meth:`training.tasks.knee_bone_seg.KneeBoneSegAdapter.evaluate`):
Dice per bone inside the analysis window around the joint centre, mean over volumes.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import ndimage

from training.data import Record
from training.metrics import dice

log = logging.getLogger(__name__)

__all__ = ["BONES", "KneeVolume", "atlas_baseline", "atlas_predict", "load_knee", "threshold_baseline",
           "threshold_segment"]

BONES = ("femur", "tibia", "fibula")
#: half-width (mm) of the band about the joint centre's patient z that the threshold rule clears
JOINT_GAP_MM = 3.0


class KneeVolume:
    """One scored knee: source volume, label map, index -> LPS affine, pixel spacing and fat-saturation."""

    def __init__(self, volume: np.ndarray, labels: np.ndarray, affine: np.ndarray, spacing: Sequence[float],
                 fat_sat: bool = False, laterality: str = "") -> None:
        self.laterality = laterality
        self.volume, self.labels, self.affine = np.asarray(volume, np.float32), np.asarray(labels), np.asarray(affine)
        self.spacing, self.fat_sat = tuple(float(s) for s in spacing), fat_sat


def load_knee(record: Record) -> KneeVolume:
    """The record's MR series (as the task chooses it) and its label map on that grid."""
    from inference.series import read_datasets
    from inference.task_settings import KneeBoneSegSettings
    from inference.tasks.knee_bone_seg import choose_series
    from training.tasks.knee_bone_seg import load_label_map

    series = choose_series(read_datasets(record.files), KneeBoneSegSettings())
    text = " ".join(str(series.planes[0].ds.get(k, "")) for k in ("SeriesDescription", "ScanOptions", "SequenceName"))
    fat_sat = "FS" in text.upper().split() or "FAT" in text.upper()
    lat = str(series.planes[0].ds.get("Laterality", "") or series.planes[0].ds.get("ImageLaterality", "")).upper()
    return KneeVolume(series.volume(), load_label_map(record, series), series.affine, series.spacing, fat_sat, lat)


def _window(k: KneeVolume) -> tuple[slice, slice, slice]:
    from inference.mr import CropResize, joint_centre
    from inference.task_settings import KneeBoneSegSettings

    p = KneeBoneSegSettings()
    crop = CropResize.around(joint_centre(k.volume), k.volume.shape[1:], (k.spacing[1], k.spacing[2]),
                             crop_mm=p.crop_mm, out=p.size)
    return slice(None), slice(crop.r0, crop.r0 + crop.size_r), slice(crop.c0, crop.c0 + crop.size_c)


def _scores(pred: np.ndarray, k: KneeVolume) -> dict[str, float]:
    win = _window(k)
    out = {f"dice_{b}": dice(pred[win] == i + 1, k.labels[win] == i + 1) for i, b in enumerate(BONES)}
    out.update({f"dice_{b}_full_image": dice(pred == i + 1, k.labels == i + 1) for i, b in enumerate(BONES)})
    return out


def _summary(name: str, protocol: str, rows: list[dict[str, float]]) -> dict[str, Any]:
    out: dict[str, Any] = {"name": name, "protocol": protocol, "n": len(rows), "unit": "volumes"}
    for key in rows[0]:
        out[key] = float(np.mean([r[key] for r in rows]))
    out["dice_mean"] = float(np.mean([out[f"dice_{b}"] for b in BONES]))
    return out


def atlas_predict(target: KneeVolume, others: Sequence[KneeVolume]) -> np.ndarray:
    """Label map of ``target`` from the majority label of ``others`` at its voxels' patient positions."""
    counts = np.zeros((len(BONES) + 1, *target.labels.shape), dtype=np.uint16)
    s, r, c = target.labels.shape
    rr, cc = np.mgrid[0:r, 0:c]
    for o in others:
        m = np.linalg.inv(o.affine) @ target.affine
        for k in range(s):
            idx = [np.rint(m[a, 0] * k + m[a, 1] * rr + m[a, 2] * cc + m[a, 3]).astype(np.int64) for a in range(3)]
            inside = np.ones((r, c), dtype=bool)
            for a, n in enumerate(o.labels.shape):
                inside &= (idx[a] >= 0) & (idx[a] < n)
            lab = np.zeros((r, c), dtype=np.int64)
            lab[inside] = o.labels[idx[0][inside], idx[1][inside], idx[2][inside]]
            for v in range(len(BONES) + 1):
                counts[v, k] += lab == v
    return counts.argmax(axis=0).astype(np.uint8)


def atlas_baseline(records: Sequence[Record]) -> dict[str, Any]:
    """Leave-one-out coordinate atlas over ``records``: mean Dice per bone."""
    knees = [load_knee(r) for r in records]
    if len(knees) < 2:
        raise ValueError("the leave-one-out atlas needs at least 2 volumes")
    rows = []
    for i, k in enumerate(knees):
        others = knees[:i] + knees[i + 1:]
        same_side = [o for o in others if k.laterality and o.laterality == k.laterality]
        rows.append(_scores(atlas_predict(k, same_side or others), k))
    return _summary("coordinate-only atlas (patient LPS, majority label)",
                    "leave one out over the scored volumes (same laterality tag where one exists), no pixel values",
                    rows)


def _patient_z(k: KneeVolume, idx: np.ndarray) -> np.ndarray:
    return k.affine[2, :3] @ idx + k.affine[2, 3]


def threshold_segment(k: KneeVolume) -> np.ndarray:
    """Label map from a marrow threshold, components and their position about the joint."""
    from inference.mr import joint_centre
    from inference.radiograph_parts import otsu_threshold

    vol = k.volume
    t = otsu_threshold(vol)
    marrow = (vol < t) & (vol > 0.25 * t) if k.fat_sat else vol > t
    marrow = ndimage.binary_erosion(marrow, structure=np.array([[[0, 0, 0], [0, 1, 0], [0, 0, 0]],
                                                                [[0, 1, 0], [1, 1, 1], [0, 1, 0]],
                                                                [[0, 0, 0], [0, 1, 0], [0, 0, 0]]], bool))
    jr, jc = joint_centre(vol)
    jz = float(_patient_z(k, np.array([vol.shape[0] / 2.0, jr, jc])))
    kk, rr, cc = np.ogrid[0:vol.shape[0], 0:vol.shape[1], 0:vol.shape[2]]
    a = k.affine[2]
    marrow &= np.abs(a[0] * kk + a[1] * rr + a[2] * cc + a[3] - jz) > JOINT_GAP_MM  # cut femur from tibia
    comp, n = ndimage.label(marrow)
    above, below = [], []
    sizes = np.bincount(comp.ravel())
    for lab in np.argsort(sizes)[::-1]:
        if lab == 0 or sizes[lab] < 200:
            continue
        z = _patient_z(k, np.array(np.nonzero(comp == lab), dtype=np.float64))
        if z.max() > jz + 15.0 and z.min() < jz - 15.0:
            continue  # crosses the joint: not a bone
        (above if np.median(z) > jz else below).append(lab)
        if len(above) >= 1 and len(below) >= 2:
            break
    out = np.zeros(vol.shape, dtype=np.uint8)
    for value, lab in ((1, above[:1]), (2, below[:1]), (3, below[1:2])):
        for x in lab:
            out[ndimage.binary_dilation(comp == x)] = value
    return out


def threshold_baseline(records: Sequence[Record]) -> dict[str, Any]:
    """Threshold plus connected components on every record: mean Dice per bone (no fitting)."""
    rows = [_scores(threshold_segment(k), k) for k in (load_knee(r) for r in records)]
    if not rows:
        raise ValueError("no knee volumes to score")
    return _summary("threshold + connected components", "no fitting, same records", rows)
