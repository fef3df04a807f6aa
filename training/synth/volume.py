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
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.charset import convert_encodings
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset, validate_file_meta
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset as encode_dataset
from pydicom.tag import Tag
from pydicom.uid import CTImageStorage, MRImageStorage

from training.synth.common import (
    Equipment,
    Patient,
    Series,
    Study,
    SynthError,
    UidSource,
    base_dataset,
    instance_path,
    set_pixel_data,
    set_rescale,
    set_window,
    write_atomic,
)

log = logging.getLogger(__name__)

__all__ = ["ORIENTATIONS", "SliceSeriesWriter", "VolumeGeometry", "write_slice_series"]

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


#: per-slice attributes of a slice series; everything else is shared by its slices
_PER_SLICE = (Tag("SOPInstanceUID"), Tag("InstanceNumber"), Tag("ImagePositionPatient"), Tag("SliceLocation"),
              Tag("PixelData"))
_MEDIA_SOP = Tag("MediaStorageSOPInstanceUID")


def _short_element(tag: int, vr: bytes, value: bytes) -> bytes:
    """One explicit-VR little-endian element with a 2-byte length (UI, IS, DS, UL, ...)."""
    return struct.pack("<HH", tag >> 16, tag & 0xFFFF) + vr + struct.pack("<H", len(value)) + value


def _text(value: str, pad: bytes) -> bytes:
    raw = value.encode("ascii")
    return raw + pad if len(raw) % 2 else raw


class SliceSeriesWriter:
    """Writes the slices of one series, encoding the header elements they share only once.

    pydicom spends a few milliseconds per file encoding ~80 elements; a 170-slice
    series repeats that work for values that never change. The template's shared
    elements (and its file meta) are encoded once by pydicom into byte runs; each
    slice then adds only its :data:`_PER_SLICE` values, encoded here as explicit-VR
    little endian (UI padded with NUL, IS/DS with a space, pixels as OW), and the
    group length of its file meta. The bytes equal those of
    ``save_as(..., enforce_file_format=True)`` (tested).
    """

    def __init__(self, template: FileDataset) -> None:
        self._encoding = convert_encodings(template.get("SpecificCharacterSet") or "ISO_IR 6")
        if template.get("BitsAllocated") != 16:
            raise SynthError("slice series are written with BitsAllocated 16")
        self._pixel_dtype = "<i2" if int(template.PixelRepresentation) else "<u2"
        tags = sorted(template.keys())
        self._runs: list[bytes] = []
        run = Dataset()
        for tag in tags:
            if tag in _PER_SLICE:
                self._runs.append(self._encode(run))
                run = Dataset()
            else:
                run[tag] = template[tag]
        self._runs.append(self._encode(run))
        if [t for t in tags if t in _PER_SLICE] != list(_PER_SLICE):
            raise SynthError("slice template lacks a per-slice attribute")
        # file meta around MediaStorageSOPInstanceUID, without the group length that depends on it
        full_meta = FileMetaDataset(template.file_meta)
        validate_file_meta(full_meta, enforce_standard=True)  # adds what save_as adds (implementation UID, ...)
        meta_before, meta_after = FileMetaDataset(), FileMetaDataset()
        for tag in sorted(full_meta.keys()):
            if tag > _MEDIA_SOP:
                meta_after[tag] = full_meta[tag]
            elif tag != _MEDIA_SOP and tag.element != 0:
                meta_before[tag] = full_meta[tag]
        self._meta_runs = (self._encode(meta_before), self._encode(meta_after))

    def _encode(self, ds: Dataset) -> bytes:
        fp = DicomBytesIO()
        fp.is_little_endian, fp.is_implicit_VR = True, False
        encode_dataset(fp, ds, parent_encoding=self._encoding)
        return fp.getvalue()

    def write_slice(self, out_root: Path, *, study_uid: str, series_uid: str, sop_instance_uid: str,
                    instance_number: int, position: Sequence[str], slice_location: str,
                    pixels: np.ndarray) -> Path:
        """Write one slice: its UID, number, position and location (DS strings) and its stored pixels."""
        uid = _text(sop_instance_uid, b"\x00")
        meta = self._meta_runs[0] + _short_element(_MEDIA_SOP, b"UI", uid) + self._meta_runs[1]
        pixel_bytes = np.ascontiguousarray(pixels, dtype=self._pixel_dtype).tobytes()
        varying = (
            _short_element(0x00080018, b"UI", uid),
            _short_element(0x00200013, b"IS", _text(str(int(instance_number)), b" ")),
            _short_element(0x00200032, b"DS", _text("\\".join(position), b" ")),
            _short_element(0x00201041, b"DS", _text(slice_location, b" ")),
            struct.pack("<HH", 0x7FE0, 0x0010) + b"OW\x00\x00" + struct.pack("<I", len(pixel_bytes)) + pixel_bytes,
        )
        parts = [b"\x00" * 128, b"DICM", _short_element(0x00020000, b"UL", struct.pack("<I", len(meta))), meta]
        for run, elem in zip(self._runs, varying, strict=False):
            parts += [run, elem]
        parts.append(self._runs[-1])
        path = instance_path(out_root, study_uid, series_uid, sop_instance_uid)
        return write_atomic(path, lambda fh: fh.write(b"".join(parts)))


def _set_image_plane(ds: Dataset, geom: VolumeGeometry, frame_uid: str, modality: str,
                     equipment: Equipment) -> None:
    """Fill the Frame of Reference and Image Plane attributes shared by every slice, and PatientPosition."""
    iop = [*(float(v) for v in geom.row_dir), *(float(v) for v in geom.col_dir)]
    ds.FrameOfReferenceUID = frame_uid
    ds.PositionReferenceIndicator = ""
    ds.ImageOrientationPatient = [_ds_str(v) for v in iop]
    ds.PixelSpacing = [_ds_str(geom.pixel_spacing[0]), _ds_str(geom.pixel_spacing[1])]
    ds.SliceThickness = _ds_str(geom.slice_thickness)
    ds.SpacingBetweenSlices = _ds_str(geom.slice_spacing)
    ds.AcquisitionNumber = 1
    if modality == "MR":
        ds.PatientPosition = "FFS"
    else:
        ds.PatientPosition = "FFS" if "XtremeCT" in equipment.model else "HFS"


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
    if values.shape[0] == 0:
        return []
    sop_uids = [uids.make("sop", series.number, k + 1) for k in range(values.shape[0])]
    ds = base_dataset(sop_class, patient, study, series, equipment, sop_instance_uid=sop_uids[0], instance_number=1,
                      content_time=(dt.datetime.combine(study.date, study.time) + dt.timedelta(seconds=60)).time())
    ds.ImageType = list(image_type)
    _set_image_plane(ds, geom, frame_uid, modality, equipment)
    if modality == "CT":
        set_rescale(ds, slope, intercept, rescale_type)
    if window is not None:
        set_window(ds, window[0], window[1], window_explanation)
    for key, val in (extra or {}).items():
        setattr(ds, key, val)
    # the first slice completes the template; the writer then encodes only what differs per slice
    ds.ImagePositionPatient = [_ds_str(float(v)) for v in geom.position(0)]
    ds.SliceLocation = _ds_str(float(geom.position(0) @ geom.normal))
    set_pixel_data(ds, stored[0], bits_stored=bits_stored, photometric="MONOCHROME2", signed=signed)
    _write_slices(out, ds, stored, sop_uids, geom, study_uid=study.study_uid, series_uid=series.series_uid)
    return sop_uids


def _write_slices(out: Path, template: FileDataset, stored: np.ndarray, sop_uids: list[str], geom: VolumeGeometry, *,
                  study_uid: str, series_uid: str) -> None:
    """Write slice ``k`` of ``stored`` as ``sop_uids[k]`` from the completed first-slice ``template``."""
    writer = SliceSeriesWriter(template)
    for k, sop in enumerate(sop_uids):
        pos = geom.position(k)
        writer.write_slice(out, study_uid=study_uid, series_uid=series_uid, sop_instance_uid=sop,
                           instance_number=k + 1, position=[_ds_str(float(v)) for v in pos],
                           slice_location=_ds_str(float(pos @ geom.normal)), pixels=stored[k])
