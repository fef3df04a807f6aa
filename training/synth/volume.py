"""Writing synthetic CT/MR volumes as classic single-frame slice series.

:func:`write_slice_series` turns a ``(slices, rows, cols)`` array of modality
values (HU, mg HA/cm3, MR signal) into one DICOM file per slice with a
consistent Image Plane module: ``ImagePositionPatient`` of slice ``k`` is
``origin + k * spacing * normal`` where ``normal`` is the cross product of the
row and column direction cosines of ``ImageOrientationPatient``.

Orientation conventions (LPS patient coordinates):

* ``axial``: rows along +x (patient left), columns along +y (posterior); slices
  step along +z (head) or -z,
* ``coronal``: rows along +x, columns along -z (feet); the normal is +y, so
  slices step from anterior to posterior,
* ``sagittal``: rows along +y, columns along -z; normal is -x.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.uid import CTImageStorage, MRImageStorage

from training.synth.common import (
    Equipment,
    Patient,
    Series,
    Study,
    SynthError,
    UidSource,
    base_dataset,
    set_pixel_data,
    set_rescale,
    set_window,
    write_dataset,
)

log = logging.getLogger(__name__)

__all__ = ["ORIENTATIONS", "VolumeGeometry", "write_slice_series"]

#: row direction, column direction (LPS) per orientation
ORIENTATIONS: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    "axial": ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0)),
    "coronal": ((1.0, 0.0, 0.0), (0.0, 0.0, -1.0)),
    "sagittal": ((0.0, 1.0, 0.0), (0.0, 0.0, -1.0)),
}


@dataclass(frozen=True)
class VolumeGeometry:
    """Voxel grid of a slice series.

    ``pixel_spacing`` is (row spacing, column spacing) in mm as DICOM orders it;
    ``origin`` is the centre of the first pixel of the first slice (LPS, mm).
    """

    orientation: str
    pixel_spacing: tuple[float, float]
    slice_spacing: float
    slice_thickness: float
    origin: tuple[float, float, float]

    def __post_init__(self) -> None:
        if self.orientation not in ORIENTATIONS:
            raise SynthError(f"unknown orientation {self.orientation!r}")

    @property
    def row_dir(self) -> np.ndarray:
        """Direction of increasing column index (along a row)."""
        return np.asarray(ORIENTATIONS[self.orientation][0])

    @property
    def col_dir(self) -> np.ndarray:
        """Direction of increasing row index (down a column)."""
        return np.asarray(ORIENTATIONS[self.orientation][1])

    @property
    def normal(self) -> np.ndarray:
        """Slice normal (row_dir x col_dir); slices step along it."""
        return np.cross(self.row_dir, self.col_dir)

    def position(self, k: int) -> np.ndarray:
        """ImagePositionPatient of slice ``k``."""
        return np.asarray(self.origin) + k * self.slice_spacing * self.normal

    def direction_matrix(self) -> np.ndarray:
        """3x3 matrix with columns (row_dir, col_dir, normal), as SimpleITK's direction (x=col, y=row, z=slice)."""
        return np.stack([self.row_dir, self.col_dir, self.normal], axis=1)


def _ds_str(v: float) -> str:
    s = f"{v:.6g}"
    return s if len(s) <= 16 else f"{v:.8f}"[:16]


def write_slice_series(
    out: Path,
    values: np.ndarray,
    geom: VolumeGeometry,
    *,
    modality: str,
    patient: Patient,
    study: Study,
    series: Series,
    equipment: Equipment,
    uids: UidSource,
    slope: float = 1.0,
    intercept: float = 0.0,
    rescale_type: str | None = None,
    window: tuple[float | Sequence[float], float | Sequence[float]] | None = None,
    window_explanation: str | Sequence[str] | None = None,
    signed: bool = True,
    bits_stored: int = 16,
    image_type: tuple[str, ...] = ("ORIGINAL", "PRIMARY", "AXIAL"),
    extra: Mapping[str, Any] | None = None,
) -> list[str]:
    """Write ``values`` (modality units, shape (slices, rows, cols)) as one file per slice.

    Stored values are ``round((values - intercept) / slope)``, clipped to the
    stored range. CT series get the CT Image module (rescale, KVP, etc. from
    ``extra``); MR series get no rescale and the MR Image module attributes from
    ``extra`` (ScanningSequence, RepetitionTime, ...).

    Returns
    -------
    list[str]
        SOP Instance UIDs in slice order (index ``k`` is slice ``k``).
    """
    if values.ndim != 3:
        raise SynthError(f"volume must be 3-D, got shape {values.shape}")
    if modality not in ("CT", "MR"):
        raise SynthError(f"write_slice_series supports CT and MR, got {modality!r}")
    sop_class = CTImageStorage if modality == "CT" else MRImageStorage
    lo, hi = (-(1 << (bits_stored - 1)), (1 << (bits_stored - 1)) - 1) if signed else (0, (1 << bits_stored) - 1)
    stored = np.clip(np.rint((values.astype(np.float64) - intercept) / slope), lo, hi).astype(np.int32)
    frame_uid = uids.make("frame-of-reference", series.number)
    t0 = dt.datetime.combine(study.date, study.time)
    iop = [*(float(v) for v in geom.row_dir), *(float(v) for v in geom.col_dir)]
    sop_uids: list[str] = []
    for k in range(values.shape[0]):
        sop = uids.make("sop", series.number, k + 1)
        ds = base_dataset(sop_class, patient, study, series, equipment, sop_instance_uid=sop,
                          instance_number=k + 1, content_time=(t0 + dt.timedelta(seconds=60)).time())
        ds.ImageType = list(image_type)
        ds.FrameOfReferenceUID = frame_uid
        ds.PositionReferenceIndicator = ""
        ds.ImageOrientationPatient = [_ds_str(v) for v in iop]
        ds.ImagePositionPatient = [_ds_str(float(v)) for v in geom.position(k)]
        ds.SliceLocation = _ds_str(float(geom.position(k) @ geom.normal))
        ds.PixelSpacing = [_ds_str(geom.pixel_spacing[0]), _ds_str(geom.pixel_spacing[1])]
        ds.SliceThickness = _ds_str(geom.slice_thickness)
        ds.SpacingBetweenSlices = _ds_str(geom.slice_spacing)
        ds.AcquisitionNumber = 1
        if modality == "MR":
            ds.PatientPosition = "FFS"
        else:
            ds.PatientPosition = "FFS" if "XtremeCT" in equipment.model else "HFS"
        set_pixel_data(ds, stored[k], bits_stored=bits_stored, photometric="MONOCHROME2", signed=signed)
        if modality == "CT":
            set_rescale(ds, slope, intercept, rescale_type)
        if window is not None:
            set_window(ds, window[0], window[1], window_explanation)
        for key, val in (extra or {}).items():
            setattr(ds, key, val)
        write_dataset(ds, out)
        sop_uids.append(sop)
    return sop_uids
