"""TID 1500 Comprehensive 3D SR: write, read back strictly, check with highdicom, validate with dciodvfy."""

from __future__ import annotations

from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.sr.codedict import codes as dcodes

from dicomnode.errors import ResultWriteError
from dicomnode.results import PriorDocument, ResultContext
from dicomnode.results import codes as rc
from dicomnode.results.builder import build_results
from dicomnode.results.sr import to_scoord
from inference.findings import (
    ABSENT,
    CUBIC_MM,
    FRACTURE,
    HU_UNIT,
    NO_UNITS,
    PRESENT,
    PROBABILITY_UNIT,
    Box,
    Classification,
    Code,
    Findings,
    ImageRef,
    Mask,
    Measurement,
)
from tests.unit._results_sources import dx_image, volume_series

COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"
MEAN_HU = Code("112031", "DCM", "Attenuation Coefficient")
MOTION_GRADE = Code("111029", "DCM", "Image Quality Rating")


def _write_read(ds: pydicom.Dataset, tmp_path: Path, dciodvfy, name: str) -> pydicom.Dataset:
    path = tmp_path / name
    ds.save_as(path, enforce_file_format=True)
    dciodvfy(path)
    return pydicom.dcmread(path)


def _sr_of(objects: list[pydicom.Dataset]) -> pydicom.Dataset:
    (sr,) = [o for o in objects if o.Modality == "SR"]
    return sr


def _codes_in(item: pydicom.Dataset, concept: Code) -> list[pydicom.Dataset]:
    """Every content item below ``item`` whose concept name is ``concept``."""
    found = []
    for child in item.get("ContentSequence", []):
        name = child.ConceptNameCodeSequence[0]
        if name.CodeValue == concept.value and name.CodingSchemeDesignator == concept.scheme:
            found.append(child)
        found.extend(_codes_in(child, concept))
    return found


def _text_values(item: pydicom.Dataset, value: str, scheme: str = "DCM") -> list[str]:
    return [str(i.TextValue) for i in _codes_in(item, Code(value, scheme, ""))]


@pytest.fixture
def ct():
    return volume_series("CT", n=5)


def spine_findings(ct) -> Findings:
    refs = tuple(ImageRef(str(d.SOPInstanceUID)) for d in ct)
    classes = []
    for i, (site, cls, hu) in enumerate([(rc.L1, rc.NORMAL, 180.0), (rc.L2, rc.OSTEOPENIA, 130.0),
                                         (rc.L3, rc.OSTEOPOROSIS, 80.0), (rc.L4, rc.OSTEOPOROSIS, 70.0)]):
        classes.append(Classification(
            rc.FINDING, cls, probability=0.6 + 0.1 * i, finding_site=site, images=(refs[i],),
            measurements=[Measurement(MEAN_HU, hu, HU_UNIT, finding_site=site)], tracking_id=f"vertebra {i + 1}",
        ))
    classes.append(Classification(rc.OSTEOPOROSIS, PRESENT, probability=0.71))
    boxes = [Box(refs[2], 3, 4, 10.5, 12, rc.OSTEOPOROSIS, 0.8, finding_site=rc.L3)]
    return Findings("spine_bmd", "SpineBMD ResNet50", "1.2", str(ct[0].StudyInstanceUID), refs,
                    classifications=classes, boxes=boxes, summary="osteoporosis")


def test_spine_sr_content(ct, tmp_path, dciodvfy):
    prior = PriorDocument(str(ct[0].StudyInstanceUID), "1.2.826.0.1.3680043.8.498.1", "1.2.826.0.1.3680043.8.498.2",
                          COMPREHENSIVE_3D_SR)
    ctx = ResultContext(series_numbers={"sr": 9100}, predecessors=[prior], institution_name="Bone Clinic")
    objects = build_results(spine_findings(ct), list(reversed(ct)), ctx)
    assert [o.Modality for o in objects] == ["SR"]
    ds = _write_read(_sr_of(objects), tmp_path, dciodvfy, "sr.dcm")

    assert ds.SOPClassUID == COMPREHENSIVE_3D_SR
    assert (ds.PreliminaryFlag, ds.CompletionFlag, ds.VerificationFlag) == ("PRELIMINARY", "COMPLETE", "UNVERIFIED")
    # patient and study copied, including the character set and non-ASCII names
    assert ds.SpecificCharacterSet == "ISO_IR 100"
    assert str(ds.PatientName) == "Müller^Jörg"
    for kw in ("PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID", "AccessionNumber", "StudyID",
               "StudyDate", "StudyTime"):
        assert ds[kw].value == ct[0][kw].value, kw
    assert ds.SeriesDescription == "AI spine_bmd SR v1.2"
    assert ds.SeriesNumber == 9100
    assert ds.SeriesInstanceUID == ctx.series_uids["sr"]
    assert (ds.Manufacturer, ds.ManufacturerModelName, ds.SoftwareVersions) == (
        ctx.manufacturer, ctx.model_name, ctx.software_version)
    assert ds.InstitutionName == "Bone Clinic"
    assert ds.ContentDate != ct[0].StudyDate  # creation date, not copied
    pre = ds.PredecessorDocumentsSequence[0]
    assert pre.StudyInstanceUID == prior.study_instance_uid
    assert pre.ReferencedSeriesSequence[0].SeriesInstanceUID == prior.series_instance_uid
    assert pre.ReferencedSeriesSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == prior.sop_instance_uid
    # evidence lists every source image
    evidence = {
        item.ReferencedSOPInstanceUID
        for s in ds.CurrentRequestedProcedureEvidenceSequence
        for r in s.ReferencedSeriesSequence
        for item in r.ReferencedSOPSequence
    }
    assert evidence == {str(d.SOPInstanceUID) for d in ct}

    sr = hd.sr.srread(tmp_path / "sr.dcm")
    report = sr.content
    assert isinstance(report, hd.sr.MeasurementReport)
    # procedure reported from the modality
    proc = _codes_in(ds, Code("121058", "DCM", "Procedure reported"))
    assert proc[0].ConceptCodeSequence[0].CodeValue == rc.COMPUTED_TOMOGRAPHY.value
    # device observer
    (observer,) = report.get_observer_contexts()
    assert _codes_in(ds, Code("121012", "DCM", ""))[0].UID  # Device Observer UID
    assert _text_values(ds, "121013") == [ctx.model_name]  # Device Observer Name
    assert observer is not None

    groups = report.get_image_measurement_groups()
    assert len(groups) == 5
    for i, site in enumerate([rc.L1, rc.L2, rc.L3, rc.L4]):
        (g,) = report.get_image_measurement_groups(finding_site=rc.to_hd(site))
        assert g.tracking_identifier == f"vertebra {i + 1}"
        assert g.finding_type == rc.to_hd([rc.NORMAL, rc.OSTEOPENIA, rc.OSTEOPOROSIS, rc.OSTEOPOROSIS][i])
        (prob,) = [m for m in g.get_measurements() if m.unit == rc.to_hd(PROBABILITY_UNIT)]
        assert prob.value == pytest.approx(0.6 + 0.1 * i)
        (hu,) = g.get_measurements(name=rc.to_hd(MEAN_HU))
        assert hu.unit == rc.to_hd(HU_UNIT)
        assert [s.referenced_sop_instance_uid for s in g.source_images] == [str(ct[i].SOPInstanceUID)]
    # the patient-level group has no source images and no site, and a qualitative evaluation
    study = [g for g in groups if not g.source_images]
    assert len(study) == 1 and not study[0].finding_sites
    (qual,) = study[0].get_qualitative_evaluations(name=rc.to_hd(rc.OSTEOPOROSIS))
    assert qual.value == rc.to_hd(PRESENT)
    assert study[0].get_measurements(name=rc.to_hd(rc.OSTEOPOROSIS))[0].value == pytest.approx(0.71)
    # algorithm identification on every measurement group
    containers = ds.ContentSequence[-1].ContentSequence
    assert len(containers) == 6
    for group in containers:
        assert _text_values(group, "111001") and set(_text_values(group, "111001")) == {"SpineBMD ResNet50"}
        assert "1.2" in _text_values(group, "111003")
        family = _codes_in(group, Code("111000", "DCM", ""))
        assert family and family[0].ConceptCodeSequence[0].CodeValue == rc.ARTIFICIAL_INTELLIGENCE.value


def test_box_becomes_closed_scoord_rectangle(ct, tmp_path, dciodvfy):
    f = spine_findings(ct)
    ds = _write_read(_sr_of(build_results(f, ct, ResultContext())), tmp_path, dciodvfy, "sr.dcm")
    report = hd.sr.srread(tmp_path / "sr.dcm").content
    (roi,) = report.get_planar_roi_measurement_groups()
    region = roi.roi
    assert region.graphic_type == hd.sr.GraphicTypeValues.POLYLINE
    expected = np.array([[3.5, 4.5], [11.0, 4.5], [11.0, 12.5], [3.5, 12.5], [3.5, 4.5]])
    np.testing.assert_allclose(region.value, expected)
    assert region.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == str(ct[2].SOPInstanceUID)
    assert len(report.get_planar_roi_measurement_groups(referenced_sop_instance_uid=str(ct[2].SOPInstanceUID))) == 1
    (score,) = roi.get_measurements(name=rc.to_hd(rc.OSTEOPOROSIS))
    assert score.value == pytest.approx(0.8) and score.unit == rc.to_hd(PROBABILITY_UNIT)
    assert roi.finding_type == rc.to_hd(rc.OSTEOPOROSIS)
    assert roi.finding_sites[0].value == rc.to_hd(rc.L3)
    assert ds.SOPInstanceUID


def test_scoord_convention():
    assert to_scoord(0, 0) == (0.5, 0.5)
    assert to_scoord(9.25, 3) == (9.75, 3.5)


def test_wrist_study_and_per_image_probabilities(tmp_path, dciodvfy):
    pa = dx_image()
    lat = dx_image(study_uid=str(pa.StudyInstanceUID))
    lat.SeriesInstanceUID = pa.SeriesInstanceUID
    lat.InstanceNumber = 2
    refs = (ImageRef(str(pa.SOPInstanceUID)), ImageRef(str(lat.SOPInstanceUID)))
    f = Findings(
        "wrist_fracture", "WristNet", "0.3", str(pa.StudyInstanceUID), refs,
        classifications=[
            Classification(FRACTURE, PRESENT, 0.83, finding_site=rc.WRIST, laterality=rc.LEFT),
            Classification(FRACTURE, PRESENT, 0.91, finding_site=rc.WRIST, laterality=rc.LEFT, images=refs[:1]),
            Classification(FRACTURE, ABSENT, 0.35, finding_site=rc.WRIST, laterality=rc.LEFT, images=refs[1:]),
        ],
    )
    ds = _write_read(_sr_of(build_results(f, [pa, lat], ResultContext())), tmp_path, dciodvfy, "wrist.dcm")
    proc = _codes_in(ds, Code("121058", "DCM", "Procedure reported"))
    assert proc[0].ConceptCodeSequence[0].CodeValue == rc.PLAIN_RADIOGRAPHY.value
    report = hd.sr.srread(tmp_path / "wrist.dcm").content
    per_image = report.get_image_measurement_groups(referenced_sop_instance_uid=str(lat.SOPInstanceUID))
    assert len(per_image) == 1
    (prob,) = per_image[0].get_measurements(name=rc.to_hd(FRACTURE))
    assert prob.value == pytest.approx(0.35)
    site = per_image[0].finding_sites[0]
    assert site.value == rc.to_hd(rc.WRIST) and site.laterality == rc.to_hd(rc.LEFT)
    assert len(report.get_image_measurement_groups()) == 3


def test_hrpqct_grades_and_rescan(tmp_path, dciodvfy):
    slices = volume_series("CT", n=8, rows=16, cols=16)
    refs = tuple(ImageRef(str(d.SOPInstanceUID)) for d in slices)
    grade4 = Code("grade-4", "99BONE", "Motion grade 4")
    rescan = Code("rescan", "99BONE", "Rescan recommended")
    per_slice = [Classification(rc.IMAGE_ARTIFACTS, grade4, probability=0.5, images=(r,),
                                measurements=[Measurement(MOTION_GRADE, 4.0, NO_UNITS)]) for r in refs]
    f = Findings(
        "hrpqct_motion", "MotionGrader", "2.0", str(slices[0].StudyInstanceUID), refs,
        classifications=[Classification(rc.IMAGE_ARTIFACTS, grade4, probability=0.6, finding_site=rc.DISTAL_RADIUS,
                                        measurements=[Measurement(MOTION_GRADE, 4.0, NO_UNITS)]),
                         Classification(rescan, PRESENT, probability=0.77), *per_slice],
    )
    _write_read(_sr_of(build_results(f, slices, ResultContext())), tmp_path, dciodvfy, "hr.dcm")
    report = hd.sr.srread(tmp_path / "hr.dcm").content
    assert len(report.get_image_measurement_groups()) == 10
    (g,) = report.get_image_measurement_groups(finding_type=rc.to_hd(rescan))
    assert g.get_measurements()[0].value == pytest.approx(0.77)
    (grade,) = report.get_image_measurement_groups(finding_site=rc.to_hd(rc.DISTAL_RADIUS))[0].get_measurements(
        name=rc.to_hd(MOTION_GRADE))
    assert grade.value == 4.0


def test_knee_volumes_reference_seg_segments(tmp_path, dciodvfy):
    mr = volume_series("MR", n=4, rows=20, cols=16)
    refs = tuple(ImageRef(str(d.SOPInstanceUID)) for d in mr)
    femur = np.zeros((4, 20, 16), bool)
    femur[0:3, 2:9, 3:12] = True
    tibia = np.zeros((4, 20, 16), bool)
    tibia[1:4, 11:18, 4:10] = True
    f = Findings("knee_bone_seg", "KneeUNet", "1.0", str(mr[0].StudyInstanceUID), refs, masks=[
        Mask(rc.FEMUR, rc.ANATOMICAL_STRUCTURE, femur, refs, finding_site=rc.KNEE),
        Mask(rc.TIBIA, rc.ANATOMICAL_STRUCTURE, tibia, refs,
             measurements=[Measurement(rc.VOLUME, 1234.5, CUBIC_MM)]),
    ])
    objects = build_results(f, mr, ResultContext())
    assert [o.Modality for o in objects] == ["SEG", "SR"]
    seg = objects[0]
    _write_read(seg, tmp_path, dciodvfy, "seg.dcm")
    ds = _write_read(objects[1], tmp_path, dciodvfy, "sr.dcm")
    report = hd.sr.srread(tmp_path / "sr.dcm").content
    groups = report.get_volumetric_roi_measurement_groups()
    assert len(groups) == 2
    for number, group in enumerate(groups, start=1):
        ref = group.referenced_segment
        assert ref.referenced_sop_instance_uid == seg.SOPInstanceUID
        assert list(ref.referenced_segment_numbers) == [number]
        assert ref.source_series_for_segmentation.value == mr[0].SeriesInstanceUID
        (vol,) = group.get_measurements(name=rc.to_hd(rc.VOLUME))
        assert vol.unit == rc.to_hd(CUBIC_MM)
    # computed from the geometry: voxels x 0.7 x 0.8 mm x 2.5 mm slice spacing
    assert groups[0].get_measurements(name=rc.to_hd(rc.VOLUME))[0].value == pytest.approx(femur.sum() * 0.7 * 0.8 * 2.5)
    assert groups[1].get_measurements(name=rc.to_hd(rc.VOLUME))[0].value == pytest.approx(1234.5)
    # the SEG is part of the evidence
    evidence = {i.ReferencedSOPInstanceUID for s in ds.CurrentRequestedProcedureEvidenceSequence
                for r in s.ReferencedSeriesSequence for i in r.ReferencedSOPSequence}
    assert seg.SOPInstanceUID in evidence


def test_rebuild_keeps_series_and_gets_new_instance_uid(ct):
    ctx = ResultContext()
    first = _sr_of(build_results(spine_findings(ct), ct, ctx))
    second = _sr_of(build_results(spine_findings(ct), ct, ctx))
    assert first.SeriesInstanceUID == second.SeriesInstanceUID == ctx.series_uids["sr"]
    assert first.SOPInstanceUID != second.SOPInstanceUID
    assert first.SeriesNumber == second.SeriesNumber


def test_sources_must_cover_findings_and_share_a_study(ct):
    f = spine_findings(ct)
    with pytest.raises(ResultWriteError, match="not among the sources"):
        build_results(f, ct[:2], ResultContext())
    other = volume_series("CT", n=1)
    with pytest.raises(ResultWriteError, match="studies"):
        build_results(f, [*ct, *other], ResultContext())
    with pytest.raises(ResultWriteError):
        build_results(f, [], ResultContext())
    empty = Findings("spine_bmd", "SpineBMD", "1.2", str(ct[0].StudyInstanceUID), f.source_images)
    with pytest.raises(ResultWriteError, match="nothing|no classification"):
        build_results(empty, ct, ResultContext())


def test_missing_type2_patient_attributes_stay_empty(ct, tmp_path, dciodvfy):
    for d in ct:
        del d.PatientBirthDate
        del d.AccessionNumber
    ds = _write_read(_sr_of(build_results(spine_findings(ct), ct, ResultContext())), tmp_path, dciodvfy, "sr.dcm")
    assert ds.PatientBirthDate == "" and ds.AccessionNumber == ""
    assert ds.PatientID == ct[0].PatientID
    assert dcodes.DCM.Device  # the observer type code exists in this pydicom
