"""The series loader shared by the node and the training package.

A :class:`Series` is the datasets of one DICOM series sorted along the slice
normal (cross-sectional images) or by InstanceNumber (radiographs), with its
geometry as a 4x4 LPS affine and helpers to and from SimpleITK for resampling.

Conventions
-----------
* ``volume()`` has shape ``(n, rows, cols)`` (one plane per image or frame).
* ``spacing`` is in the same array order: ``(slice, row, column)`` in mm.
* ``affine`` maps array indices ``(k, r, c, 1)`` (slice, row, column) to LPS
  patient coordinates in mm. Without geometry (plain radiographs) it is the
  pixel spacing on the diagonal with the origin at 0.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path

import numpy as np
import pydicom
from pydicom import Dataset

from inference.errors import InvalidDatasetError
from inference.fsutil import walk_files

log = logging.getLogger(__name__)

__all__ = ["Series", "from_sitk", "group_by_series", "load_series", "read_datasets"]


def read_datasets(paths: Iterable[str | PathLike[str]], *, stop_before_pixels: bool = False) -> list[Dataset]:
    """Read DICOM files; folders are searched recursively (hidden files and non-DICOM files skipped).

    Raises
    ------
    InvalidDatasetError
        If a file given explicitly cannot be parsed as DICOM.
    """
    out: list[Dataset] = []
    for p in paths:
        path = Path(p)
        if path.is_dir():
            for f in walk_files(path):
                try:
                    out.append(pydicom.dcmread(f, stop_before_pixels=stop_before_pixels))
                except (pydicom.errors.InvalidDicomError, OSError, ValueError, AttributeError):
                    log.debug("skipping non-DICOM file %s", f)
            continue
        try:
            out.append(pydicom.dcmread(path, stop_before_pixels=stop_before_pixels))
        except (pydicom.errors.InvalidDicomError, OSError, ValueError, AttributeError) as exc:
            raise InvalidDatasetError(f"cannot read DICOM file {path}: {exc}") from exc
    return out


def _floats(ds: Dataset, keyword: str) -> list[float] | None:
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    try:
        return [float(v) for v in (value if isinstance(value, Sequence) and not isinstance(value, str) else [value])]
    except (TypeError, ValueError):
        return None


def _pixel_spacing(ds: Dataset) -> tuple[float, float]:
    """Row and column spacing in mm (PixelSpacing, else ImagerPixelSpacing, else 1)."""
    for kw in ("PixelSpacing", "ImagerPixelSpacing", "NominalScannedPixelSpacing"):
        v = _floats(ds, kw)
        if v and len(v) == 2 and v[0] > 0 and v[1] > 0:
            return v[0], v[1]
    sfg = ds.get("SharedFunctionalGroupsSequence")
    if sfg:
        pms = sfg[0].get("PixelMeasuresSequence")
        if pms:
            v = _floats(pms[0], "PixelSpacing")
            if v and len(v) == 2:
                return v[0], v[1]
    return 1.0, 1.0


def _frame_geometry(ds: Dataset, frame: int) -> tuple[list[float] | None, list[float] | None]:
    """(ImagePositionPatient, ImageOrientationPatient) of a 0-based frame of an enhanced multi-frame image."""
    pos = ori = None
    pffg = ds.get("PerFrameFunctionalGroupsSequence")
    if pffg and frame < len(pffg):
        item = pffg[frame]
        if "PlanePositionSequence" in item:
            pos = _floats(item.PlanePositionSequence[0], "ImagePositionPatient")
        if "PlaneOrientationSequence" in item:
            ori = _floats(item.PlaneOrientationSequence[0], "ImageOrientationPatient")
    sfg = ds.get("SharedFunctionalGroupsSequence")
    if ori is None and sfg and "PlaneOrientationSequence" in sfg[0]:
        ori = _floats(sfg[0].PlaneOrientationSequence[0], "ImageOrientationPatient")
    return pos, ori


@dataclass(frozen=True)
class _Plane:
    """One image plane: a dataset and, for multi-frame images, a 0-based frame index."""

    ds: Dataset
    frame: int | None
    position: np.ndarray | None
    orientation: np.ndarray | None


def _planes(ds: Dataset) -> list[_Plane]:
    nframes = int(ds.get("NumberOfFrames", 1) or 1)
    if nframes > 1:
        planes = []
        for f in range(nframes):
            pos, ori = _frame_geometry(ds, f)
            planes.append(_Plane(ds, f, None if pos is None else np.asarray(pos), None if ori is None else np.asarray(ori)))
        return planes
    pos = _floats(ds, "ImagePositionPatient")
    ori = _floats(ds, "ImageOrientationPatient")
    return [_Plane(ds, None, None if pos is None else np.asarray(pos), None if ori is None else np.asarray(ori))]


@dataclass
class Series:
    """The sorted images of one series with geometry.

    Build with :func:`load_series`; do not sort ``planes`` yourself.
    """

    planes: list[_Plane]
    affine: np.ndarray
    spacing: tuple[float, float, float]
    has_geometry: bool
    _volume: np.ndarray | None = field(default=None, repr=False)

    @property
    def datasets(self) -> list[Dataset]:
        """Distinct datasets in plane order (a multi-frame image appears once)."""
        seen: list[Dataset] = []
        for p in self.planes:
            if not any(p.ds is d for d in seen):
                seen.append(p.ds)
        return seen

    @property
    def frames(self) -> list[int | None]:
        """0-based frame index of each plane (None for single-frame images)."""
        return [p.frame for p in self.planes]

    @property
    def series_instance_uid(self) -> str:
        """SeriesInstanceUID of the first image ('' if absent)."""
        return str(self.planes[0].ds.get("SeriesInstanceUID", ""))

    @property
    def modality(self) -> str:
        """Modality of the first image ('' if absent)."""
        return str(self.planes[0].ds.get("Modality", ""))

    def __len__(self) -> int:
        return len(self.planes)

    def volume(self) -> np.ndarray:
        """Float32 modality values (e.g. HU) of every plane, shape ``(n, rows, cols)``; cached.

        Raises
        ------
        InvalidDatasetError
            If the planes have different sizes or no pixel data.
        """
        if self._volume is None:
            from inference.pixels import modality_values

            arrays = []
            for p in self.planes:
                try:
                    arrays.append(np.asarray(modality_values(p.ds, frame=p.frame), dtype=np.float32))
                except AttributeError as exc:
                    raise InvalidDatasetError(f"image has no pixel data: {exc}") from exc
            shapes = {a.shape for a in arrays}
            if len(shapes) != 1:
                raise InvalidDatasetError(f"images of one series differ in size: {sorted(shapes)}")
            self._volume = np.stack(arrays).astype(np.float32, copy=False)
        return self._volume

    def to_sitk(self, array: np.ndarray | None = None):  # -> SimpleITK.Image
        """A SimpleITK image of ``array`` (default: :meth:`volume`) carrying this series' geometry."""
        import SimpleITK as sitk

        arr = self.volume() if array is None else np.asarray(array)
        if arr.ndim != 3 or arr.shape[0] != len(self.planes):
            raise ValueError(f"array must have shape (n_planes={len(self.planes)}, rows, cols), got {arr.shape}")
        img = sitk.GetImageFromArray(arr)
        origin, direction, spacing_xyz = _affine_to_sitk(self.affine)
        img.SetOrigin(origin)
        img.SetSpacing(spacing_xyz)
        img.SetDirection(direction)
        return img


def _affine_to_sitk(affine: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...], tuple[float, ...]]:
    """Array-order affine -> SimpleITK (origin, direction row-major, spacing) in x=col, y=row, z=slice order."""
    cols = [affine[:3, 2], affine[:3, 1], affine[:3, 0]]  # x (col), y (row), z (slice)
    spacing = [float(np.linalg.norm(c)) or 1.0 for c in cols]
    dirs = np.stack([c / s for c, s in zip(cols, spacing, strict=True)], axis=1)
    return tuple(float(v) for v in affine[:3, 3]), tuple(float(v) for v in dirs.ravel()), tuple(spacing)


def from_sitk(image) -> tuple[np.ndarray, np.ndarray]:  # image: SimpleITK.Image
    """Array ``(n, rows, cols)`` and array-order LPS affine of a SimpleITK image."""
    import SimpleITK as sitk

    arr = sitk.GetArrayFromImage(image)
    d = np.asarray(image.GetDirection(), dtype=float).reshape(3, 3)
    sx, sy, sz = image.GetSpacing()
    affine = np.eye(4)
    affine[:3, 2] = d[:, 0] * sx
    affine[:3, 1] = d[:, 1] * sy
    affine[:3, 0] = d[:, 2] * sz
    affine[:3, 3] = image.GetOrigin()
    return arr, affine


def resample(image, spacing_xyz: Sequence[float], *, interpolator: str = "linear", default: float = 0.0):
    """Resample a SimpleITK image to new spacing (x, y, z) keeping origin, direction and extent.

    ``interpolator`` is ``"linear"``, ``"bspline"`` or ``"nearest"`` (use nearest for label maps).
    """
    import SimpleITK as sitk

    interp = {"linear": sitk.sitkLinear, "bspline": sitk.sitkBSpline, "nearest": sitk.sitkNearestNeighbor}[interpolator]
    old_sp = np.asarray(image.GetSpacing(), dtype=float)
    new_sp = np.asarray(spacing_xyz, dtype=float)
    size = np.maximum(1, np.round(np.asarray(image.GetSize()) * old_sp / new_sp)).astype(int)
    return sitk.Resample(
        image, [int(s) for s in size], sitk.Transform(), interp, image.GetOrigin(), [float(s) for s in new_sp],
        image.GetDirection(), default, image.GetPixelID(),
    )


def _sort_key_instance(p: _Plane) -> tuple[int, int]:
    try:
        inst = int(p.ds.get("InstanceNumber", 0) or 0)
    except (TypeError, ValueError):
        inst = 0
    return inst, p.frame or 0


def _build(planes: list[_Plane]) -> Series:
    if not planes:
        raise InvalidDatasetError("a series needs at least one image")
    row_sp, col_sp = _pixel_spacing(planes[0].ds)
    oriented = all(p.position is not None and p.orientation is not None and len(p.orientation) == 6 for p in planes)
    if oriented:
        ori = planes[0].orientation
        assert ori is not None
        row_dir = ori[:3] / (np.linalg.norm(ori[:3]) or 1.0)  # direction of increasing column index
        col_dir = ori[3:] / (np.linalg.norm(ori[3:]) or 1.0)  # direction of increasing row index
        normal = np.cross(row_dir, col_dir)
        planes = sorted(planes, key=lambda p: (float(np.dot(p.position, normal)), _sort_key_instance(p)))
        first = np.asarray(planes[0].position, dtype=float)
        if len(planes) > 1:
            step = (np.asarray(planes[-1].position, dtype=float) - first) / (len(planes) - 1)
            slice_sp = float(np.linalg.norm(step))
            if slice_sp < 1e-6:  # stacked planes at one position (e.g. a time series)
                slice_sp = float(_floats(planes[0].ds, "SpacingBetweenSlices") or _floats(planes[0].ds, "SliceThickness") or [1.0])[0]
                step = normal * slice_sp
        else:
            slice_sp = float((_floats(planes[0].ds, "SpacingBetweenSlices") or _floats(planes[0].ds, "SliceThickness") or [1.0])[0])
            step = normal * slice_sp
        affine = np.eye(4)
        affine[:3, 0] = step
        affine[:3, 1] = col_dir * row_sp
        affine[:3, 2] = row_dir * col_sp
        affine[:3, 3] = first
    else:
        planes = sorted(planes, key=_sort_key_instance)
        slice_sp = float((_floats(planes[0].ds, "SliceThickness") or [1.0])[0]) if len(planes) > 1 else 1.0
        affine = np.diag([slice_sp, row_sp, col_sp, 1.0])
    return Series(planes=planes, affine=affine, spacing=(slice_sp, row_sp, col_sp), has_geometry=oriented)


def load_series(items: Iterable[Dataset | str | PathLike[str]]) -> Series:
    """Load one series from datasets and/or file paths, sorted along the slice normal.

    Images without ImagePositionPatient/ImageOrientationPatient (radiographs) are
    sorted by InstanceNumber. Multi-frame images contribute one plane per frame.

    Raises
    ------
    InvalidDatasetError
        If nothing is given, a file cannot be read, or the items span several series.
    """
    items = list(items)
    datasets = [it for it in items if isinstance(it, Dataset)]
    paths = [it for it in items if not isinstance(it, Dataset)]
    datasets += read_datasets(paths)
    uids = {str(ds.get("SeriesInstanceUID", "")) for ds in datasets}
    if len(uids) > 1:
        raise InvalidDatasetError(f"load_series got images of {len(uids)} series; use group_by_series")
    return _build([p for ds in datasets for p in _planes(ds)])


def group_by_series(datasets: Iterable[Dataset]) -> dict[str, Series]:
    """Split datasets by SeriesInstanceUID into sorted :class:`Series` (insertion order of first appearance)."""
    groups: dict[str, list[Dataset]] = {}
    for ds in datasets:
        groups.setdefault(str(ds.get("SeriesInstanceUID", "")), []).append(ds)
    return {uid: _build([p for ds in dss for p in _planes(ds)]) for uid, dss in groups.items()}
