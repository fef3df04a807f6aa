"""Shared synthetic-study code: patients, UIDs, dataset writing, body parts and the labels manifest."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import SecondaryCaptureImageStorage

from dicomnode.bodypart import canonical_body_part
from training.synth import common, runner
from training.synth.manifest import ManifestError, ManifestWriter, read_manifest


def _dataset(seed: int, out: Path) -> Path:
    rng = np.random.default_rng(seed)
    uids = common.UidSource(f"test:{seed}")
    patient = common.new_patient(rng, (18, 90))
    study = common.new_study(rng, uids, patient, "TEST STUDY")
    series = common.new_series(uids, 1, "OT", common.body_part_string(rng, "WRIST", 1.0))
    eq = common.Equipment(manufacturer="ACME", model="X1")
    ds = common.base_dataset(SecondaryCaptureImageStorage, patient, study, series, eq,
                             sop_instance_uid=uids.make("sop", 1))
    ds.ConversionType = "WSD"
    ds.PatientOrientation = ""
    img = common.to_stored(rng.random((16, 20)), 12, invert=True)
    common.set_pixel_data(ds, img, bits_stored=12, photometric="MONOCHROME1")
    common.set_rescale(ds, 1.0, 0.0)
    common.set_window(ds, 2048, 4096)
    return common.write_dataset(ds, out)


def test_patient_age_matches_birth_and_range() -> None:
    rng = np.random.default_rng(0)
    for _ in range(200):
        p = common.new_patient(rng, (2, 17))
        years = int(p.age_string[:3])
        assert p.age_string.endswith("Y") and 2 <= years <= 17
        exact = (p.exam_date - p.birth_date).days / 365.25
        assert abs(exact - p.age_years) < 1e-9 and int(exact) == years
    infant = common.Patient("A^B", "X", p.birth_date, "F", 0.25, p.exam_date)
    assert infant.age_string == "003M"


def test_written_file_is_deterministic_and_well_formed(tmp_path: Path) -> None:
    a = _dataset(7, tmp_path / "a")
    b = _dataset(7, tmp_path / "b")
    c = _dataset(8, tmp_path / "c")
    assert a.relative_to(tmp_path / "a") == b.relative_to(tmp_path / "b")
    assert a.read_bytes() == b.read_bytes()
    assert a.name != c.name
    ds = pydicom.dcmread(a)
    assert a.parent.name == ds.SeriesInstanceUID and a.parent.parent.name == ds.StudyInstanceUID
    assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    assert ds.BitsStored == 12 and ds.HighBit == 11 and ds.PhotometricInterpretation == "MONOCHROME1"
    assert int(ds.pixel_array.max()) <= 4095
    assert canonical_body_part(ds.BodyPartExamined) == "WRIST" and ds.BodyPartExamined != "WRIST"
    assert not list(a.parent.glob(".tmp-*"))


def test_every_synonym_is_known_to_the_router() -> None:
    for canonical, syns in common.BODY_PART_SYNONYMS.items():
        for s in syns:
            assert len(s) <= 16 and all(c.isupper() or c.isdigit() or c in " _" for c in s), s
            assert canonical_body_part(s) == canonical_body_part(canonical), s


def test_pixel_data_rejects_values_outside_bits(tmp_path: Path) -> None:
    ds = pydicom.Dataset()
    with pytest.raises(common.SynthError):
        common.set_pixel_data(ds, np.full((4, 4), 5000, np.uint16), bits_stored=12)


def test_study_seed_and_uids_are_stable() -> None:
    assert common.study_seed(1, 5) == common.study_seed(1, 5) != common.study_seed(1, 6)
    assert common.study_seed(1, 5) != common.study_seed(2, 5)
    u = common.UidSource("k")
    assert u.make("sop", 1) == common.UidSource("k").make("sop", 1) != u.make("sop", 2)
    assert len(u.make("sop", 1)) <= 64


def test_manifest_round_trip_jsonl_and_csv(tmp_path: Path) -> None:
    rows = [
        {"study_uid": "1.2.3", "label": "fracture", "patient_id": "P1",
         "boxes": [{"sop_instance_uid": "1.2.3.4", "x0": 1, "y0": 2, "x1": 10, "y1": 12, "label": "fracture"}]},
        {"study_uid": "1.2.5", "sop_instance_uid": "1.2.5.1", "label": 0, "split_hint": None},
        {"study_uid": "1.2.6", "mask": "masks/1.2.6.mha", "vertebrae": {"L1": "normal", "L2": "osteopenia"}},
    ]
    with ManifestWriter(tmp_path) as w:
        w.extend(rows)
    got = read_manifest(tmp_path)
    assert [r["study_uid"] for r in got] == ["1.2.3", "1.2.5", "1.2.6"]
    assert got[0]["boxes"][0]["x1"] == 10.0 and got[2]["vertebrae"]["L2"] == "osteopenia"

    csv_dir = tmp_path / "csv"
    csv_dir.mkdir()
    (csv_dir / "labels.csv").write_text(
        'study_uid,sop_instance_uid,label,boxes\n'
        '1.2.3,,1,"[{""sop_instance_uid"": ""1.2.3.4"", ""x0"": 0, ""y0"": 0, ""x1"": 5, ""y1"": 5}]"\n'
        '1.2.4,1.2.4.1,normal,\n')
    got = read_manifest(csv_dir)
    assert got[0]["label"] == 1 and got[0]["boxes"][0]["x1"] == 5.0
    assert got[1]["label"] == "normal" and "boxes" not in got[1]


@pytest.mark.parametrize("line, msg", [
    ('{"label": 1}', "needs 'study_uid'"),
    ('{"study_uid": "1.2", "boxes": [{"x0": 5, "y0": 0, "x1": 1, "y1": 3, "sop_instance_uid": "1.3"}]}', "x0 < x1"),
    ('{"study_uid": "1.2", "boxes": [{"x0": 0, "y0": 0, "x1": 1, "y1": 3}]}', "sop_instance_uid"),
    ('{"study_uid": "abc"}', "not a valid UID"),
    ('{"study_uid": "1.2", "split_hint": "test"}', "split_hint"),
    ('{"study_uid": "1.2"', "invalid JSON"),
])
def test_manifest_errors_name_the_line(tmp_path: Path, line: str, msg: str) -> None:
    (tmp_path / "labels.jsonl").write_text('{"study_uid": "1.1"}\n' + line + "\n")
    with pytest.raises(ManifestError, match=f"line 2.*{msg}"):
        read_manifest(tmp_path)


def test_manifest_writer_is_atomic_and_rejects_duplicates(tmp_path: Path) -> None:
    (tmp_path / "labels.jsonl").write_text(json.dumps({"study_uid": "9.9"}) + "\n")
    with pytest.raises(ManifestError, match="duplicate"), ManifestWriter(tmp_path) as w:
        w.append({"study_uid": "1.1"})
        w.append({"study_uid": "1.1"})
    assert [r["study_uid"] for r in read_manifest(tmp_path)] == ["9.9"]
    assert not list(tmp_path.glob(".*.tmp"))
    with pytest.raises(ManifestError, match="no labels"):
        read_manifest(tmp_path / "missing")


def _toy_study(job: runner.StudyJob) -> list[dict]:
    rng = job.rng()
    return [{"study_uid": common.UidSource(str(job.seed)).make("study"), "label": int(rng.integers(0, 2))}]


def test_generate_studies_same_rows_for_any_worker_count(tmp_path: Path) -> None:
    a = runner.generate_studies(tmp_path / "a", 9, 3, _toy_study, workers=1)
    b = runner.generate_studies(tmp_path / "b", 9, 3, _toy_study, workers=2, chunk_size=2)
    assert a.read_text() == b.read_text() and len(read_manifest(a)) == 9
    with pytest.raises(common.SynthError):
        runner.generate_studies(tmp_path / "c", 1, 3, _toy_study, difficulty=2.0)


def test_slice_series_writer_equals_pydicom_and_varies_per_slice(tmp_path: Path) -> None:
    """The shared-header writer gives the bytes pydicom's save_as gives, with each slice's own values."""
    import io

    from pydicom.uid import CTImageStorage

    from training.synth.volume import VolumeGeometry, write_slice_series

    rng = np.random.default_rng(3)
    uids = common.UidSource("test:series")
    patient = common.new_patient(rng, (18, 90))
    study = common.new_study(rng, uids, patient, "CT TEST")
    series = common.new_series(uids, 2, "CT", "LSPINE")
    eq = common.Equipment(manufacturer="ACME", model="CT1")
    values = rng.normal(40, 300, (4, 12, 10)).round()
    geom = VolumeGeometry("axial", (0.7, 0.8), 1.5, 1.25, (-4.0, -5.0, 12.0))
    sops = write_slice_series(tmp_path, values, geom, modality="CT", patient=patient, study=study, series=series,
                              equipment=eq, uids=uids, intercept=-1024.0, rescale_type="HU",
                              window=(40.0, 400.0), extra={"KVP": "120"})
    files = {pydicom.dcmread(f).SOPInstanceUID: f for f in (tmp_path / study.study_uid / series.series_uid).glob("*")}
    assert sorted(files) == sorted(sops) and len(set(sops)) == 4
    for k, sop in enumerate(sops):
        raw = files[sop].read_bytes()
        ds = pydicom.dcmread(io.BytesIO(raw))
        again = io.BytesIO()
        ds.save_as(again, enforce_file_format=True)
        assert again.getvalue() == raw
        assert ds.SOPClassUID == CTImageStorage and ds.file_meta.MediaStorageSOPInstanceUID == sop
        assert int(ds.InstanceNumber) == k + 1
        assert np.allclose([float(v) for v in ds.ImagePositionPatient], geom.position(k), atol=1e-4)
        assert float(ds.SliceLocation) == pytest.approx(float(geom.position(k) @ geom.normal), abs=1e-4)
        assert np.array_equal(ds.pixel_array.astype(float) - 1024.0, values[k])
        assert ds.KVP == "120" and ds.RescaleType == "HU"
    # odd- and even-length values of every hand-encoded VR (UI pads with NUL, IS/DS with a space)
    from training.synth.volume import SliceSeriesWriter

    writer = SliceSeriesWriter(pydicom.dcmread(files[sops[0]]))
    for uid, number, pos, loc in (("1.2.345", 7, ["1", "2", "3.25"], "-3.5"), ("1.2.34", 12, ["1.5", "-2", "3"], "4")):
        path = writer.write_slice(tmp_path / "odd", study_uid="1.2.9", series_uid="1.2.8", sop_instance_uid=uid,
                                  instance_number=number, position=pos, slice_location=loc,
                                  pixels=np.full((12, 10), -5, np.int32))
        raw = path.read_bytes()
        ds = pydicom.dcmread(io.BytesIO(raw))
        again = io.BytesIO()
        ds.save_as(again, enforce_file_format=True)
        assert again.getvalue() == raw
        assert ds.SOPInstanceUID == uid == ds.file_meta.MediaStorageSOPInstanceUID and ds.InstanceNumber == number
        assert [str(v) for v in ds.ImagePositionPatient] == pos and str(ds.SliceLocation) == loc
        assert (ds.pixel_array == -5).all()


def test_unlateral_series_with_a_synonym_body_part_passes_dciodvfy(tmp_path: Path, dciodvfy) -> None:
    """A non-English term may name a paired part: Laterality (Type 2C) is then present and empty."""
    rng = np.random.default_rng(3)
    uids = common.UidSource("test:laterality")
    patient = common.new_patient(rng, (40, 80))
    study = common.new_study(rng, uids, patient, "CT")
    canonical = "LSPINE"
    for k, part in enumerate([canonical, "COLUMNA LUMBAR", "RODILLA"]):
        series = common.new_series(uids, k + 1, "OT", part)
        ds = common.base_dataset(SecondaryCaptureImageStorage, patient, study, series,
                                 common.Equipment(manufacturer="ACME", model="X1"),
                                 sop_instance_uid=uids.make("sop", k + 1))
        ds.ConversionType = "WSD"
        ds.PatientOrientation = ""
        common.set_pixel_data(ds, common.to_stored(rng.random((8, 8)), 12), bits_stored=12)
        path = common.write_dataset(ds, tmp_path)
        back = pydicom.dcmread(path)
        if part == canonical:
            assert "Laterality" not in back
        else:
            assert back.Laterality == ""
        dciodvfy(path)


def test_standard_normal32_is_deterministic_and_standard_normal() -> None:
    a = common.standard_normal32(np.random.default_rng(5), (601, 333))
    b = common.standard_normal32(np.random.default_rng(5), (601, 333))
    assert a.dtype == np.float32 and a.shape == (601, 333) and np.array_equal(a, b)
    assert common.standard_normal32(np.random.default_rng(5), 7).shape == (7,)  # odd sizes, scalar shape
    x = a.ravel().astype(np.float64)
    assert abs(x.mean()) < 0.01 and abs(x.std() - 1.0) < 0.01
    assert abs((x**3).mean()) < 0.03 and abs((x**4).mean() - 3.0) < 0.06  # skew 0, kurtosis 3
    # quantiles of N(0, 1), i.e. not uniform or truncated noise with matching moments
    q = np.quantile(x, [0.001, 0.0228, 0.1587, 0.5, 0.8413, 0.9772, 0.999])
    assert np.allclose(q, [-3.09, -2.0, -1.0, 0.0, 1.0, 2.0, 3.09], atol=0.06)
    # cos and sin halves are independent of each other
    half = x.size // 2
    assert abs(np.corrcoef(x[:half], x[half:2 * half])[0, 1]) < 0.01


def test_mallopt_takes_effect_on_glibc() -> None:
    import platform

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("mallopt is glibc's")
    assert runner.keep_freed_memory()
