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
from dicomnode.results.sr import image_outline, mask_outline, to_scoord
from inference.findings import (
    ABSENT,
    CUBIC_MM,
    FRACTURE,
    HU_UNIT,
    MILLILITER,
    NO_UNITS,
    PERCENT,
    PRESENT,
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


def _conclusions(ds: pydicom.Dataset) -> pydicom.Dataset:
    """The document-level "Qualitative Evaluations" container (TID 1500 row 12)."""
    (container,) = [i for i in ds.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "C0034375"]
    assert container.ValueType == "CONTAINER" and container.RelationshipType == "CONTAINS"
    return container


def _tracking_ids(ds: pydicom.Dataset) -> list[str]:
    """The tracking identifier of every measurement group, in document order."""
    (measurements,) = [i for i in ds.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "126010"]
    return [str(i.TextValue) for g in measurements.ContentSequence for i in g.ContentSequence
            if i.ConceptNameCodeSequence[0].CodeValue == "112039"]


def _conclusion_groups(report: hd.sr.MeasurementReport) -> list[hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations]:
    return [g for g in report.get_planar_roi_measurement_groups() if str(g.tracking_identifier).endswith(" conclusion")]


def _not_conclusions(groups: list) -> list:
    return [g for g in groups if not str(g.tracking_identifier).endswith(" conclusion")]


def assert_ohif_readable(ds: pydicom.Dataset) -> int:
    """Every measurement group carries an image region (SCOORD) on a referenced image, as OHIF 3.x requires: a
    closed POLYLINE, or for a conclusion a POINT; conclusions come first. Returns the number of groups."""
    (measurements,) = [i for i in ds.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "126010"]
    groups = [g for g in measurements.ContentSequence if g.ConceptNameCodeSequence[0].CodeValue == "125007"]
    assert groups and len(groups) == len(measurements.ContentSequence)
    for g in groups:
        scoords = [c for c in g.ContentSequence if c.ValueType == "SCOORD"]
        assert len(scoords) == 1, "group without an image region"
        assert scoords[0].ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID
        tracking = [str(c.TextValue) for c in g.ContentSequence if c.ConceptNameCodeSequence[0].CodeValue == "112039"]
        if tracking[0].endswith(" conclusion"):
            assert scoords[0].GraphicType == "POINT" and len(scoords[0].GraphicData) == 2
        else:
            assert scoords[0].GraphicType == "POLYLINE" and list(scoords[0].GraphicData[:2]) == list(
                scoords[0].GraphicData[-2:])  # closed
    ids = _tracking_ids(ds)
    n = sum(i.endswith(" conclusion") for i in ids)
    assert all(i.endswith(" conclusion") for i in ids[:n]), f"conclusions must come first: {ids}"
    return len(groups)


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
    assert ds.CodingSchemeIdentificationSequence[0].CodingSchemeDesignator == rc.LOCAL  # the private scheme
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
    assert (proc[0].ConceptCodeSequence[0].CodeValue, proc[0].ConceptCodeSequence[0].CodingSchemeDesignator) == (
        "25045-6", "LN")  # CID 100 "CT unspecified body region"
    # device observer
    (observer,) = report.get_observer_contexts()
    assert _codes_in(ds, Code("121012", "DCM", ""))[0].UID  # Device Observer UID
    assert _text_values(ds, "121013") == [ctx.model_name]  # Device Observer Name
    assert observer is not None

    # OHIF reads every group as an annotation: all are TID 1410 with a region, none is TID 1501/1411
    assert report.get_image_measurement_groups() == [] and report.get_volumetric_roi_measurement_groups() == []
    # L1, L2, L4 on their slice; L3's classification is its box; the patient-level class as a conclusion
    assert assert_ohif_readable(ds) == 5
    for i, site in [(0, rc.L1), (1, rc.L2), (3, rc.L4)]:
        (g,) = report.get_planar_roi_measurement_groups(finding_site=rc.to_hd(site))
        assert g.tracking_identifier == f"vertebra {i + 1}"
        assert g.finding_type == rc.to_hd([rc.NORMAL, rc.OSTEOPENIA, rc.OSTEOPOROSIS, rc.OSTEOPOROSIS][i])
        (prob,) = [m for m in g.get_measurements() if m.unit == rc.to_hd(PERCENT)]
        assert prob.value == pytest.approx(100 * (0.6 + 0.1 * i))
        (hu,) = g.get_measurements(name=rc.to_hd(MEAN_HU))
        assert hu.unit == rc.to_hd(HU_UNIT)
        # a per-image classification outlines the whole image it is about
        assert g.roi.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == str(ct[i].SOPInstanceUID)
        np.testing.assert_allclose(g.roi.value, image_outline(ct[i]))
        np.testing.assert_allclose(image_outline(ct[i])[2], [19.5, 23.5])  # 20 columns x 24 rows
    (box,) = report.get_planar_roi_measurement_groups(finding_site=rc.to_hd(rc.L3))
    assert box.finding_type == rc.to_hd(rc.OSTEOPOROSIS)
    # the patient-level class and the summary sit in the document-level "Qualitative Evaluations"
    container = _conclusions(ds)
    (code,) = [i for i in container.ContentSequence if i.ValueType == "CODE"]
    assert code.ConceptNameCodeSequence[0].CodeValue == rc.OSTEOPOROSIS.value
    assert code.ConceptCodeSequence[0].CodeValue == PRESENT.value
    texts = {i.ConceptNameCodeSequence[0].CodeMeaning: str(i.TextValue) for i in container.ContentSequence
             if i.ValueType == "TEXT"}
    assert texts == {"Osteoporosis": "Present: probability 71 %", "Summary": "osteoporosis"}
    # algorithm identification on every measurement group
    containers = [i for i in ds.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "126010"][0].ContentSequence
    assert len(containers) == 5
    for group in containers:
        assert _text_values(group, "111001") and set(_text_values(group, "111001")) == {"SpineBMD ResNet50"}
        assert "1.2" in _text_values(group, "111003")
        family = _codes_in(group, Code("111000", "DCM", ""))
        assert family and family[0].ConceptCodeSequence[0].CodeValue == rc.ARTIFICIAL_INTELLIGENCE.value


def test_box_becomes_closed_scoord_rectangle(ct, tmp_path, dciodvfy):
    f = spine_findings(ct)
    ds = _write_read(_sr_of(build_results(f, ct, ResultContext())), tmp_path, dciodvfy, "sr.dcm")
    report = hd.sr.srread(tmp_path / "sr.dcm").content
    (roi,) = report.get_planar_roi_measurement_groups(finding_site=rc.to_hd(rc.L3))
    region = roi.roi
    assert region.graphic_type == hd.sr.GraphicTypeValues.POLYLINE
    expected = np.array([[3.5, 4.5], [11.0, 4.5], [11.0, 12.5], [3.5, 12.5], [3.5, 4.5]])
    np.testing.assert_allclose(region.value, expected)
    assert region.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == str(ct[2].SOPInstanceUID)
    assert len(_not_conclusions(report.get_planar_roi_measurement_groups(
        referenced_sop_instance_uid=str(ct[2].SOPInstanceUID)))) == 1
    (score,) = roi.get_measurements(name=rc.to_hd(rc.OSTEOPOROSIS))
    assert score.value == pytest.approx(80.0) and score.unit == rc.to_hd(PERCENT)
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
    assert proc[0].ConceptCodeSequence[0].CodeValue == rc.IMAGING_PROCEDURE.value  # in CID 100
    report = hd.sr.srread(tmp_path / "wrist.dcm").content
    assert assert_ohif_readable(ds) == 3  # the study conclusion, then one group per image
    per_image = report.get_planar_roi_measurement_groups(referenced_sop_instance_uid=str(lat.SOPInstanceUID))
    assert len(per_image) == 1
    (prob,) = per_image[0].get_measurements(name=rc.to_hd(FRACTURE))
    assert prob.value == pytest.approx(35.0) and prob.unit == rc.to_hd(PERCENT)
    site = per_image[0].finding_sites[0]
    assert site.value == rc.to_hd(rc.WRIST) and site.laterality == rc.to_hd(rc.LEFT)
    (verdict,) = per_image[0].get_qualitative_evaluations(name=rc.to_hd(FRACTURE))
    assert verdict.value == rc.to_hd(ABSENT)
    # the study-level finding: document-level "Qualitative Evaluations"
    items = _conclusions(ds).ContentSequence
    assert [(i.ValueType, i.ConceptNameCodeSequence[0].CodeValue) for i in items] == [
        ("CODE", FRACTURE.value), ("TEXT", FRACTURE.value)]
    assert items[0].ConceptCodeSequence[0].CodeValue == PRESENT.value
    assert items[1].TextValue == "Present (Wrist): probability 83 %"
    # ... and on its key image, the most probable image that agrees with it (PA, 91 %), where OHIF shows it
    (study,) = _conclusion_groups(report)
    assert study.tracking_identifier == "Study conclusion"
    assert study.roi.graphic_type == hd.sr.GraphicTypeValues.POINT
    assert study.roi.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == str(pa.SOPInstanceUID)
    assert study.finding_type == rc.to_hd(FRACTURE)
    (verdict,) = study.get_qualitative_evaluations(name=rc.to_hd(FRACTURE))
    assert verdict.value == rc.to_hd(PRESENT)
    (p_study,) = study.get_measurements(name=rc.to_hd(FRACTURE))
    assert p_study.value == pytest.approx(83.0) and p_study.unit == rc.to_hd(PERCENT)
    assert study.finding_sites[0].value == rc.to_hd(rc.WRIST)
    assert not study.get_measurements(name=rc.to_hd(rc.OPERATING_POINT))  # no threshold given


def test_conclusion_label_states_probability_and_operating_point(tmp_path, dciodvfy):
    dx = dx_image(rows=200, cols=100)
    ref = ImageRef(str(dx.SOPInstanceUID))
    f = Findings("physis_fracture", "Physis", "1", str(dx.StudyInstanceUID), (ref,), classifications=[
        Classification(rc.GROWTH_PLATE_FRACTURE, ABSENT, 0.73, finding_site=rc.GROWTH_PLATE, threshold=0.81),
        Classification(rc.GROWTH_PLATE_FRACTURE, ABSENT, 0.73, finding_site=rc.GROWTH_PLATE, images=(ref,),
                       threshold=0.81)], summary="p=0.73 < 0.81: no growth-plate fracture detected")
    ds = _write_read(_sr_of(build_results(f, [dx], ResultContext())), tmp_path, dciodvfy, "physis.dcm")
    assert _tracking_ids(ds)[0] == "Study conclusion" and assert_ohif_readable(ds) == 2
    report = hd.sr.srread(tmp_path / "physis.dcm").content
    (study,) = _conclusion_groups(report)
    # OHIF prints the NUM items: "Fracture of growth plate: 73.00 %", "Operating point: 81.00 %"
    names = [(m.name.meaning, round(m.value, 2), m.unit.value) for m in study.get_measurements()]
    assert names == [("Fracture of growth plate", 73.0, "%"), ("Operating point", 81.0, "%")]
    (verdict,) = study.get_qualitative_evaluations(name=rc.to_hd(rc.GROWTH_PLATE_FRACTURE))
    assert verdict.value == rc.to_hd(ABSENT)
    # the point sits near the top-left corner (5 % across, 12 % down), so OHIF draws the label inside the image
    np.testing.assert_allclose(study.roi.value, [[0.05 * 99 + 0.5, 0.12 * 199 + 0.5]])
    texts = [str(i.TextValue) for i in _conclusions(ds).ContentSequence if i.ValueType == "TEXT"]
    assert texts[-1] == f.summary  # the summary text the demo reads is unchanged


def test_patient_class_goes_to_the_most_severe_vertebra(ct, tmp_path, dciodvfy):
    refs = tuple(ImageRef(str(d.SOPInstanceUID)) for d in ct)
    per_level = [Classification(rc.FINDING, cls, probability=p, finding_site=site, images=(refs[i],))
                 for i, (site, cls, p) in enumerate([(rc.L1, rc.OSTEOPOROSIS, 0.6), (rc.L2, rc.NORMAL, 0.99),
                                                     (rc.L3, rc.OSTEOPOROSIS, 0.9), (rc.L4, rc.OSTEOPENIA, 0.95)])]
    patient = Classification(rc.FINDING, rc.OSTEOPOROSIS, probability=0.9, finding_site=rc.LUMBAR_SPINE,
                             tracking_id="patient-level class")
    f = Findings("spine_bmd", "SpineBMD", "1.2", str(ct[0].StudyInstanceUID), refs,
                 classifications=[*per_level, patient])
    _write_read(_sr_of(build_results(f, ct, ResultContext())), tmp_path, dciodvfy, "sr.dcm")
    (group,) = _conclusion_groups(hd.sr.srread(tmp_path / "sr.dcm").content)
    assert group.tracking_identifier == "Patient conclusion"
    # L3: the most probable of the vertebrae classed like the patient
    assert group.roi.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == str(ct[2].SOPInstanceUID)
    assert group.finding_type == rc.to_hd(rc.OSTEOPOROSIS)
    (p,) = group.get_measurements()
    assert (p.name, p.value) == (rc.to_hd(rc.OSTEOPOROSIS), pytest.approx(90.0))  # "Osteoporosis: 90.00 %"
    assert group.finding_sites[0].value == rc.to_hd(rc.LUMBAR_SPINE)


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
                                        images=refs, measurements=[Measurement(MOTION_GRADE, 4.0, NO_UNITS)]),
                         Classification(rescan, PRESENT, probability=0.77), *per_slice],
    )
    ds = _write_read(_sr_of(build_results(f, slices, ResultContext())), tmp_path, dciodvfy, "hr.dcm")
    report = hd.sr.srread(tmp_path / "hr.dcm").content
    assert assert_ohif_readable(ds) == 9  # the scan conclusion, then one per graded slice
    for r in refs:
        (g,) = _not_conclusions(report.get_planar_roi_measurement_groups(referenced_sop_instance_uid=r.sop_instance_uid))
        assert g.get_measurements(name=rc.to_hd(MOTION_GRADE))[0].value == 4.0
        assert g.get_measurements()[0].value == pytest.approx(50.0)
    items = _conclusions(ds).ContentSequence
    codes_ = [(i.ConceptNameCodeSequence[0].CodeValue, i.ConceptCodeSequence[0].CodeValue) for i in items
              if i.ValueType == "CODE"]
    assert codes_ == [(rc.IMAGE_ARTIFACTS.value, grade4.value), (rescan.value, PRESENT.value)]
    texts = [str(i.TextValue) for i in items if i.ValueType == "TEXT"]
    # the scan's grade is about all 8 slices: a conclusion, not a region on one of them
    assert texts == ["Motion grade 4 (Distal Radius): probability 60 % over 8 images", "4", "Present: probability 77 %"]
    # one conclusion group holds the scan grade and the rescan recommendation, on a slice graded like the scan
    (scan,) = _conclusion_groups(report)
    assert scan.tracking_identifier == "Scan conclusion"
    assert scan.roi.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID in {r.sop_instance_uid
                                                                                           for r in refs}
    (grade,) = scan.get_qualitative_evaluations(name=rc.to_hd(rc.IMAGE_ARTIFACTS))
    (again,) = scan.get_qualitative_evaluations(name=rc.to_hd(rescan))
    assert (grade.value, again.value) == (rc.to_hd(grade4), rc.to_hd(PRESENT))
    values = [(m.name.value, round(m.value, 2)) for m in scan.get_measurements()]
    assert values == [(rc.IMAGE_ARTIFACTS.value, 60.0), (MOTION_GRADE.value, 4.0), (rescan.value, 77.0)]


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
    assert assert_ohif_readable(ds) == 2
    femur_g, tibia_g = report.get_planar_roi_measurement_groups()
    # each bone is outlined on its largest slice: femur planes 0-2 are equal (first wins), tibia planes 1-3
    assert femur_g.finding_type == rc.to_hd(rc.FEMUR) and tibia_g.finding_type == rc.to_hd(rc.TIBIA)
    assert femur_g.finding_sites[0].value == rc.to_hd(rc.FEMUR)  # the structure, so OHIF's label names it
    assert femur_g.roi.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == str(mr[0].SOPInstanceUID)
    assert tibia_g.roi.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == str(mr[1].SOPInstanceUID)
    outline = femur_g.roi.value  # SCOORD of the 9 x 7 pixel block at columns 3-11, rows 2-8
    assert outline[:, 0].min() == pytest.approx(3.0, abs=0.51) and outline[:, 0].max() == pytest.approx(12.0, abs=0.51)
    assert outline[:, 1].min() == pytest.approx(2.0, abs=0.51) and outline[:, 1].max() == pytest.approx(9.0, abs=0.51)
    # volumes in mL: computed from the geometry (voxels x 0.7 x 0.8 mm x 2.5 mm slice spacing), or given in mm3
    (vol,) = femur_g.get_measurements(name=rc.to_hd(rc.VOLUME))
    assert vol.unit == rc.to_hd(MILLILITER) and vol.value == pytest.approx(femur.sum() * 0.7 * 0.8 * 2.5 / 1000)
    assert tibia_g.get_measurements(name=rc.to_hd(rc.VOLUME))[0].value == pytest.approx(1.2345)
    # the SEG is part of the evidence
    evidence = {i.ReferencedSOPInstanceUID for s in ds.CurrentRequestedProcedureEvidenceSequence
                for r in s.ReferencedSeriesSequence for i in r.ReferencedSOPSequence}
    assert seg.SOPInstanceUID in evidence


def test_mask_outline_is_closed_and_encloses_the_mask():
    plane = np.zeros((10, 12), bool)
    plane[0:4, 5:12] = True  # touches the top and right border
    outline = mask_outline(plane)
    assert tuple(outline[0]) == tuple(outline[-1])
    assert outline[:, 0].min() == pytest.approx(5.0, abs=0.51) and outline[:, 0].max() == pytest.approx(12.0, abs=0.51)
    assert outline[:, 1].min() == pytest.approx(0.0, abs=0.51) and outline[:, 1].max() == pytest.approx(4.0, abs=0.51)
    assert mask_outline(np.zeros((4, 4), bool)) is None


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


def test_study_level_only_is_shown_on_the_middle_image(ct, tmp_path, dciodvfy):
    f = Findings("spine_bmd", "SpineBMD", "1.2", str(ct[0].StudyInstanceUID), tuple(ImageRef(str(d.SOPInstanceUID))
                 for d in ct), classifications=[Classification(rc.OSTEOPOROSIS, ABSENT, 0.2)])
    ds = _write_read(_sr_of(build_results(f, ct, ResultContext())), tmp_path, dciodvfy, "sr.dcm")
    assert assert_ohif_readable(ds) == 1
    assert _conclusions(ds).ContentSequence[0].ConceptCodeSequence[0].CodeValue == ABSENT.value
    (group,) = _conclusion_groups(hd.sr.srread(tmp_path / "sr.dcm").content)
    # no image-level classification drove it: the middle source image
    assert group.roi.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == str(ct[2].SOPInstanceUID)


def test_missing_type2_patient_attributes_stay_empty(ct, tmp_path, dciodvfy):
    for d in ct:
        del d.PatientBirthDate
        del d.AccessionNumber
    ds = _write_read(_sr_of(build_results(spine_findings(ct), ct, ResultContext())), tmp_path, dciodvfy, "sr.dcm")
    assert ds.PatientBirthDate == "" and ds.AccessionNumber == ""
    assert ds.PatientID == ct[0].PatientID
    assert dcodes.DCM.Device  # the observer type code exists in this pydicom
