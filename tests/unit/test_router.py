"""Router: every match key, age from PatientAge and from BirthDate + StudyDate, synonyms, explain output."""

from __future__ import annotations

from datetime import date
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from dicomnode.bodypart import canonical_body_part
from dicomnode.config import Config, Route
from dicomnode.router import (
    SeriesInfo,
    age_in_years,
    describe_routes,
    explain,
    explain_paths,
    parse_patient_age,
    route_series,
    routing_meta,
)

DX = "1.2.840.10008.5.1.4.1.1.1.1"
CT = "1.2.840.10008.5.1.4.1.1.2"


def _info(**kw: object) -> SeriesInfo:
    base: dict[str, object] = dict(study_uid="1.2.3", series_uid="1.2.3.4", modality="DX", body_part="WRIST",
                                   sop_class_uid=DX, series_description="Wrist PA", view_positions=frozenset({"PA"}),
                                   image_type=("ORIGINAL", "PRIMARY"), manufacturer="ACME Medical",
                                   model_name="XR-9000", patient_age_years=30.0, n_slices=1)
    base.update(kw)
    return SeriesInfo(**base)  # type: ignore[arg-type]


def _route(name: str = "r", **match: object) -> Route:
    return Route.model_validate({"name": name, "task": "t", "match": match})


def _ok(info: SeriesInfo, **match: object) -> bool:
    route = _route(**match)
    result = route_series(info, [route])
    (exp,) = explain(info, [route])
    assert exp.matched == bool(result)
    return bool(result)


def test_empty_match_accepts_everything() -> None:
    assert _ok(_info())
    assert _ok(SeriesInfo(study_uid="1", series_uid="2"))


def test_modality() -> None:
    assert _ok(_info(), modality=["CR", "dx"])
    assert not _ok(_info(modality="CT"), modality=["DX", "CR"])
    assert not _ok(_info(modality=None), modality=["DX"])
    (exp,) = explain(_info(modality="CT"), [_route(modality=["DX", "CR"])])
    assert exp.reasons == ["modality CT not in [DX, CR]"]


@pytest.mark.parametrize("written,canonical", [
    ("HANDGELENK", "WRIST"), ("muneca", "WRIST"), ("MUÑECA", "WRIST"), ("Poignet", "WRIST"), ("POLSO", "WRIST"),
    ("MANO", "HAND"), ("UNTERARM", "FOREARM"), ("ANTEBRAZO", "FOREARM"), ("LWS", "LSPINE"), ("L-SPINE", "LSPINE"),
    ("lumbar", "LSPINE"), ("KNIE", "KNEE"), ("RODILLA", "KNEE"), ("GENOU", "KNEE"), ("SPRUNGGELENK", "ANKLE"),
    ("ELLENBOGEN", "ELBOW"), ("TIBIA", "TIBIA"), ("RADIUS", "RADIUS"), ("LEG", "LEG"), ("ABDOMEN", "ABDOMEN"),
    ("SPINE", "SPINE"),
])
def test_body_part_synonyms(written: str, canonical: str) -> None:
    assert canonical_body_part(written) == canonical
    assert _ok(_info(body_part=written), body_part=[canonical.lower()])


def test_body_part_mismatch_and_missing() -> None:
    assert not _ok(_info(body_part="KNIE"), body_part=["WRIST", "HAND"])
    assert not _ok(_info(body_part=None), body_part=["WRIST"])
    (exp,) = explain(_info(body_part=None), [_route(body_part=["WRIST"])])
    assert "body part missing" in exp.reasons[0]
    # route terms are canonicalised too, and unknown terms still match themselves
    assert _ok(_info(body_part="HANDGELENK"), body_part=["muñeca"])
    assert _ok(_info(body_part="Pinky Toe"), body_part=["PINKY-TOE"])


def test_sop_class_by_uid_or_keyword() -> None:
    assert _ok(_info(), sop_class=[DX])
    assert _ok(_info(), sop_class=["DigitalXRayImageStorageForPresentation"])
    assert not _ok(_info(sop_class_uid=CT), sop_class=[DX])
    assert not _ok(_info(sop_class_uid=None), sop_class=[DX])


def test_series_description_regex() -> None:
    assert _ok(_info(), series_description=r"wrist\s+pa")
    assert not _ok(_info(series_description="Knee AP"), series_description="wrist")
    assert not _ok(_info(series_description=None), series_description=".*")


def test_view_position_any_of() -> None:
    assert _ok(_info(view_positions=frozenset({"PA", "LAT"})), view_position=["lat"])
    assert not _ok(_info(view_positions=frozenset({"AP"})), view_position=["PA", "LAT"])
    assert not _ok(_info(view_positions=frozenset()), view_position=["PA"])


def test_image_type_all_of() -> None:
    assert _ok(_info(), image_type=["original", "PRIMARY"])
    assert not _ok(_info(image_type=("DERIVED", "PRIMARY")), image_type=["ORIGINAL", "PRIMARY"])
    assert not _ok(_info(image_type=()), image_type=["ORIGINAL"])
    (exp,) = explain(_info(image_type=("DERIVED", "PRIMARY")), [_route(image_type=["ORIGINAL"])])
    assert "lacks [ORIGINAL]" in exp.reasons[0]


def test_manufacturer_and_model_regex() -> None:
    assert _ok(_info(), manufacturer="^acme", model_name=r"XR-\d+")
    assert not _ok(_info(), manufacturer="siemens")
    assert not _ok(_info(), model_name="^9000")
    assert not _ok(_info(manufacturer=None), manufacturer=".")


def test_age_bounds() -> None:
    assert _ok(_info(patient_age_years=18.0), min_age_years=18)
    assert not _ok(_info(patient_age_years=17.99), min_age_years=18)
    assert _ok(_info(patient_age_years=10.0), max_age_years=17)
    assert not _ok(_info(patient_age_years=17.5), max_age_years=17)
    assert not _ok(_info(patient_age_years=None), min_age_years=0)
    (exp,) = explain(_info(patient_age_years=12.0), [_route(min_age_years=18)])
    assert exp.reasons == ["age 12.00 y < 18 y"]


def test_slice_bounds() -> None:
    assert _ok(_info(n_slices=120), min_slices=20, max_slices=500)
    assert not _ok(_info(n_slices=1), min_slices=20)
    assert not _ok(_info(n_slices=600), max_slices=500)


def test_all_keys_are_anded_and_every_failure_reported() -> None:
    route = _route(modality=["CT"], body_part=["KNEE"], min_age_years=40)
    (exp,) = explain(_info(), [route])
    assert not exp.matched
    assert [c.key for c in exp.checks if not c.ok] == ["modality", "body_part", "min_age_years"]
    assert route_series(_info(), [route]) == []


def test_route_order_and_multiple_matches() -> None:
    routes = [_route("a", modality=["DX"]), _route("b", modality=["CT"]), _route("c", body_part=["HANDGELENK"])]
    assert [r.name for r in route_series(_info(), routes)] == ["a", "c"]


@pytest.mark.parametrize("text,years", [("045Y", 45.0), ("006M", 0.5), ("010W", 70 / 365.2425),
                                        ("003D", 3 / 365.2425), ("", None), ("45", None), ("0XXY", None)])
def test_parse_patient_age(text: str, years: float | None) -> None:
    got = parse_patient_age(text)
    assert got == pytest.approx(years) if years is not None else got is None


def test_age_in_years_is_calendar_exact() -> None:
    assert age_in_years(date(2000, 6, 15), date(2018, 6, 15)) == 18.0
    assert age_in_years(date(2000, 6, 15), date(2018, 6, 14)) < 18.0
    assert age_in_years(date(2000, 2, 29), date(2018, 3, 1)) == 18.0
    assert age_in_years(date(2010, 1, 1), date(2009, 1, 1)) is None


def _meta(**kw: object) -> dict[str, object]:
    meta: dict[str, object] = {"study_uid": "1.2", "series_uid": "1.2.3", "modality": "DX"}
    meta.update(kw)
    return meta


def test_from_meta_age_from_birth_and_study_date() -> None:
    adult = SeriesInfo.from_meta(_meta(birth_date="20000615", study_date="20180615"), 1)
    minor = SeriesInfo.from_meta(_meta(birth_date="20000615", study_date="20180614"), 1)
    assert adult.patient_age_years == 18.0
    assert minor.patient_age_years is not None and minor.patient_age_years < 18
    route = _route(min_age_years=18)
    assert route_series(adult, [route]) == [route]
    assert route_series(minor, [route]) == []
    # PatientAge wins over dates; series date is the fallback for a missing study date
    assert SeriesInfo.from_meta(_meta(patient_age="030Y", birth_date="20000615", study_date="20180615"),
                                1).patient_age_years == 30.0
    assert SeriesInfo.from_meta(_meta(birth_date="20000615", series_date="20100615"), 1).patient_age_years == 10.0
    assert SeriesInfo.from_meta(_meta(birth_date="20000615"), 1).patient_age_years is None
    assert SeriesInfo.from_meta(_meta(birth_date="garbage", study_date="20180615"), 1).patient_age_years is None


def test_from_meta_counts_frames() -> None:
    assert SeriesInfo.from_meta(_meta(number_of_frames=110), 1).n_slices == 110
    assert SeriesInfo.from_meta(_meta(), 40).n_slices == 40


def _dataset(study: str, series: str, **kw: object) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = DX
    ds.SOPClassUID = DX
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = series
    ds.PatientName = "Doe^Jane"
    ds.PatientID = "SECRET-ID-42"
    for k, v in kw.items():
        setattr(ds, k, v)
    return ds


def test_routing_meta_is_json_safe_and_has_no_identity() -> None:
    import json

    ds = _dataset("1.2", "1.2.3", Modality="DX", BodyPartExamined="HANDGELENK", ViewPosition="PA",
                  ImageType=["ORIGINAL", "PRIMARY"], PatientBirthDate="20000615", StudyDate="20180615")
    meta = routing_meta(ds)
    text = json.dumps(meta)
    assert "SECRET-ID-42" not in text and "Doe" not in text
    info = SeriesInfo.from_meta(json.loads(text), 1)
    assert info.body_part == "HANDGELENK" and info.view_positions == {"PA"} and info.patient_age_years == 18.0


def test_from_datasets_merges_views_and_counts() -> None:
    study, series = generate_uid(), generate_uid()
    dss = [_dataset(study, series, Modality="DX", ViewPosition="PA"),
           _dataset(study, series, Modality="DX", ViewPosition="LAT")]
    info = SeriesInfo.from_datasets(dss)
    assert info.view_positions == {"PA", "LAT"} and info.n_slices == 2 and info.modality == "DX"


def test_explain_paths_and_describe_routes(tmp_path: Path) -> None:
    cfg = Config.model_validate({"routes": [
        {"name": "adult-wrist", "task": "wrist_fracture",
         "match": {"modality": ["DX", "CR"], "body_part": ["WRIST"], "min_age_years": 18}},
        {"name": "knee-ct", "task": "knee_bone_seg", "match": {"modality": ["CT"], "body_part": ["KNEE"]}},
    ]})
    study = generate_uid()
    wrist, knee = generate_uid(), generate_uid()
    for i in range(2):
        pydicom.dcmwrite(tmp_path / f"w{i}.dcm", _dataset(study, wrist, Modality="DX", BodyPartExamined="MUNECA",
                                                          PatientAge="040Y"), enforce_file_format=True)
    pydicom.dcmwrite(tmp_path / "sub_k.dcm", _dataset(study, knee, Modality="CT", BodyPartExamined="KNIE"),
                     enforce_file_format=True)
    (tmp_path / "notes.txt").write_text("not dicom")
    before = sorted(p.name for p in tmp_path.iterdir())
    text = explain_paths([tmp_path], cfg)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no side effects
    assert f"series {wrist}" in text and f"series {knee}" in text
    wrist_block = text.split(f"series {knee}")[0] if text.index(wrist) < text.index(knee) else text.split(
        f"series {wrist}")[1]
    assert "-> adult-wrist" in wrist_block
    assert "modality DX not in [CT]" in wrist_block
    assert "1 file(s) skipped" in text
    assert "SECRET-ID-42" not in text
    desc = describe_routes(cfg)
    assert "adult-wrist: task wrist_fracture" in desc and "knee-ct" in desc
    assert "no routes configured" in describe_routes(Config())


def test_cli_route_explain_and_check_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from dicomnode.cli import main

    cfg_file = tmp_path / "node.yaml"
    models = Path(__file__).resolve().parents[2] / "models"  # check-config needs the route's promoted model
    cfg_file.write_text(f"models_dir: {models}\nroutes:\n  - name: paed\n    task: physis_fracture\n"
                        "    match: {modality: [DX], body_part: [WRIST], max_age_years: 17.999}\n")
    data = tmp_path / "data"
    data.mkdir()
    series = generate_uid()
    pydicom.dcmwrite(data / "a.dcm", _dataset(generate_uid(), series, Modality="DX", BodyPartExamined="POIGNET",
                                              PatientBirthDate="20100301", StudyDate="20200229"),
                     enforce_file_format=True)
    assert main(["route", "explain", str(data), "--config", str(cfg_file)]) == 0
    out = capsys.readouterr().out
    assert f"series {series}" in out and "-> paed" in out and "POIGNET (= WRIST)" in out
    assert main(["check-config", str(cfg_file)]) == 0
    assert "paed: task physis_fracture" in capsys.readouterr().out
