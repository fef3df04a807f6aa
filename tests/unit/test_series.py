"""Series loader: sorting along the normal, LPS affine, SimpleITK round trip, grouping."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from inference.errors import InvalidDatasetError
from inference.series import from_sitk, group_by_series, load_series, resample
from tests.unit.toy_adapter import write_ct


def _stack(tmp_path: Path, zs=(4.0, 0.0, 2.0), orientation=(1, 0, 0, 0, 1, 0), series="1.2.826.0.1.1") -> list[Path]:
    paths = []
    for i, z in enumerate(zs):
        img = np.full((4, 5), 100 * (i + 1), dtype=np.int16)
        paths.append(write_ct(tmp_path / f"{series}-{i}.dcm", patient="P", study_uid="1.2.826.0.1", series_uid=series,
                              pixels=img, position_z=z, instance=10 - i, spacing=0.5, orientation=orientation))
    return paths


def test_sorted_along_normal_with_affine(tmp_path: Path) -> None:
    s = load_series(_stack(tmp_path))
    vol = s.volume()
    assert vol.shape == (3, 4, 5) and vol.dtype == np.float32
    assert [float(v) for v in vol[:, 0, 0]] == [200.0, 300.0, 100.0]  # z = 0, 2, 4
    assert s.spacing == (2.0, 0.5, 0.5)
    expected = np.array([[0, 0, 0.5, 0], [0, 0.5, 0, 0], [2, 0, 0, 0], [0, 0, 0, 1]], dtype=float)
    assert np.allclose(s.affine, expected)
    assert s.has_geometry and s.modality == "CT" and len(s) == 3
    # pixel (k=1, r=2, c=3) -> LPS
    assert np.allclose(s.affine @ [1, 2, 3, 1], [1.5, 1.0, 2.0, 1])


def test_oblique_normal_sorting(tmp_path: Path) -> None:
    # sagittal slices: row direction +Y, column direction -Z, so the normal is Y x -Z = -X
    paths = []
    for i, x in enumerate((3.0, 1.0, 2.0)):
        p = write_ct(tmp_path / f"s{i}.dcm", patient="P", study_uid="1.2.3", series_uid="1.2.3.4",
                     pixels=np.full((4, 4), i, dtype=np.int16), orientation=(0, 1, 0, 0, 0, -1))
        ds = pydicom.dcmread(p)
        ds.ImagePositionPatient = [x, 0.0, 0.0]
        ds.save_as(p)
        paths.append(p)
    s = load_series(paths)
    assert [float(v) for v in s.volume()[:, 0, 0]] == [0.0, 2.0, 1.0]  # x = 3, 2, 1 (ascending along -X)
    assert np.allclose(s.affine[:3, 0], [-1, 0, 0]) and np.allclose(s.affine[:3, 3], [3, 0, 0])


def test_radiographs_sorted_by_instance_number(tmp_path: Path) -> None:
    dss = []
    for inst in (3, 1, 2):
        p = write_ct(tmp_path / f"r{inst}.dcm", patient="P", study_uid="1.2.3", series_uid="1.2.3.9",
                     pixels=np.full((4, 4), inst, dtype=np.int16), instance=inst)
        ds = pydicom.dcmread(p)
        del ds.ImagePositionPatient
        del ds.ImageOrientationPatient
        dss.append(ds)
    s = load_series(dss)
    assert not s.has_geometry
    assert [int(d.InstanceNumber) for d in s.datasets] == [1, 2, 3]


def test_sitk_round_trip_and_resample(tmp_path: Path) -> None:
    s = load_series(_stack(tmp_path))
    img = s.to_sitk()
    assert img.GetSize() == (5, 4, 3) and np.allclose(img.GetSpacing(), (0.5, 0.5, 2.0))
    arr, aff = from_sitk(img)
    assert np.array_equal(arr, s.volume()) and np.allclose(aff, s.affine)
    r = resample(img, (1.0, 1.0, 1.0), interpolator="nearest")
    assert r.GetSize() == (2, 2, 6) and r.GetOrigin() == img.GetOrigin()
    assert isinstance(r, sitk.Image)
    with pytest.raises(ValueError):
        s.to_sitk(np.zeros((2, 4, 5)))


def test_group_and_errors(tmp_path: Path) -> None:
    a = _stack(tmp_path / "a", series="1.2.826.0.1.1")
    b = _stack(tmp_path / "b", zs=(0.0, 1.0), series="1.2.826.0.1.2")
    dss = [pydicom.dcmread(p) for p in a + b]
    groups = group_by_series(dss)
    assert {k: len(v) for k, v in groups.items()} == {"1.2.826.0.1.1": 3, "1.2.826.0.1.2": 2}
    with pytest.raises(InvalidDatasetError):
        load_series(dss)
    with pytest.raises(InvalidDatasetError):
        load_series([])
    bad = tmp_path / "bad.dcm"
    bad.write_bytes(b"not dicom")
    with pytest.raises(InvalidDatasetError):
        load_series([bad])
