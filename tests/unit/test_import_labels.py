"""``dicomnode-train import-labels`` on studies exported "as a hospital would": a RIS table keyed by accession
number with free-text findings, an Excel table keyed by Study UID, DXA T-score tables (wide CSV, long Excel),
a DICOM SEG and a TID 1500 SR written by "another tool" (highdicom). Every input row lands in the manifest or in
rejects.csv with its reason."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from highdicom.sr.coding import CodedConcept
from pydicom.sr.codedict import codes

from training.cli import main as train_main
from training.import_readers import dxa_levels, read_table, who_class
from training.synth.manifest import read_manifest

FRACTURE = CodedConcept("72704001", "SCT", "Fracture")


@pytest.fixture(scope="module")
def export(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """Six synthetic wrist studies without their manifest, and their truth by accession number."""
    root = tmp_path_factory.mktemp("hospital")
    data = root / "studies"
    assert train_main(["synth", "wrist_fracture", "--out", str(data), "--n", "6", "--seed", "2", "--workers", "1"]) == 0
    truth = {r["study_uid"]: int(r["label"]) for r in read_manifest(data)}
    (data / "labels.jsonl").unlink()
    studies: dict[str, dict[str, object]] = {}
    for f in sorted(data.rglob("*.dcm")):
        ds = pydicom.dcmread(f)
        st = studies.setdefault(ds.StudyInstanceUID, {"accession": ds.AccessionNumber, "files": []})
        st["files"].append(f)  # type: ignore[union-attr]
    return {"root": root, "data": data, "truth": truth, "studies": studies}


def _fresh(export: dict[str, object], tmp_path: Path) -> Path:
    data = tmp_path / "studies"
    shutil.copytree(export["data"], data)  # type: ignore[arg-type]
    return data


def _rejects(path: Path) -> list[dict[str, str]]:
    with open(path, encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def _seg(source: pydicom.Dataset, out: Path, *, thickness: bool) -> None:
    mask = np.zeros((source.Rows, source.Columns), dtype=bool)
    mask[100:120, 50:90] = True
    desc = hd.seg.SegmentDescription(
        segment_number=1, segment_label="fracture", segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=FRACTURE, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL)
    extra = {"pixel_measures": hd.PixelMeasuresSequence(pixel_spacing=[0.3, 0.3], slice_thickness=1.0)} if thickness \
        else {}
    seg = hd.seg.Segmentation(
        source_images=[source], pixel_array=mask, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[desc], series_instance_uid=hd.UID(), series_number=90, sop_instance_uid=hd.UID(),
        instance_number=1, manufacturer="OtherVendor", manufacturer_model_name="Annotator", software_versions="1",
        device_serial_number="1", **extra)
    seg.save_as(out)


def _sr(source: pydicom.Dataset, out: Path) -> None:
    ref = hd.sr.SourceImageForRegion(referenced_sop_class_uid=source.SOPClassUID,
                                     referenced_sop_instance_uid=source.SOPInstanceUID)
    region = hd.sr.ImageRegion(graphic_type=hd.sr.GraphicTypeValues.POLYLINE, source_image=ref, graphic_data=np.array(
        [[10.0, 20.0], [60.0, 20.0], [60.0, 45.0], [10.0, 45.0], [10.0, 20.0]]))
    group = hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier="ROI 1"), referenced_region=region,
        finding_type=FRACTURE)
    report = hd.sr.MeasurementReport(observation_context=hd.sr.ObservationContext(),
                                     procedure_reported=CodedConcept("36228007", "SCT", "Radiography of wrist"),
                                     imaging_measurements=[group])
    hd.sr.Comprehensive3DSR(evidence=[source], content=report, series_instance_uid=hd.UID(), series_number=91,
                            sop_instance_uid=hd.UID(), instance_number=1, manufacturer="OtherVendor").save_as(out)


def test_who_cut_offs_and_table_parsing(tmp_path: Path) -> None:
    assert [who_class(t) for t in (-0.9, -1.0, -2.4, -2.5, -3.1)] == [
        "normal", "osteopenia", "osteopenia", "osteoporosis", "osteoporosis"]
    assert dxa_levels({"Acc": "A1", "L1 T-score": "\u22122,7", "L2": "-1.0", "L3": ""}, None, None) == {
        "L1": -2.7, "L2": -1.0}
    with pytest.raises(ValueError, match="not a number"):
        dxa_levels({"L1": "n/a"}, None, None)
    (tmp_path / "semi.csv").write_text("\ufeffAccession;Finding\nA1;fracture\n", encoding="utf-8")
    assert read_table(tmp_path / "semi.csv") == [{"Accession": "A1", "Finding": "fracture"}]


def test_ris_csv_by_accession_every_row_accounted(export: dict[str, object], tmp_path: Path) -> None:
    data = _fresh(export, tmp_path)
    studies, truth = export["studies"], export["truth"]
    uids = sorted(studies)  # type: ignore[arg-type]
    rows = [[studies[u]["accession"], "Fracture" if truth[u] else "no fracture"] for u in uids]  # type: ignore[index]
    rows += [["A000000000", "fracture"],             # accession not in the export
             [studies[uids[0]]["accession"], "fracture" if not truth[uids[0]] else "no fracture"],  # type: ignore[index]
             [studies[uids[1]]["accession"], "Fracture" if truth[uids[1]] else "no fracture"],  # type: ignore[index]
             ["", "fracture"]]
    rows[2][1] = "unclear"                          # a finding that maps to no class
    table = tmp_path / "ris_export.csv"
    with open(table, "w", encoding="utf-8", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["Accession Number", "Finding"])
        w.writerows(rows)
    assert train_main(["import-labels", "--dicom", str(data), "--task", "wrist_fracture", "--table", str(table),
                       "--positive", "fracture", "--negative", "no fracture"]) == 0
    manifest = read_manifest(data)
    rejects = _rejects(data / "rejects.csv")
    assert len(manifest) + len(rejects) == len(rows)
    assert {r["study_uid"]: r["label"] for r in manifest} == {u: truth[u] for u in uids if u != uids[2]}  # type: ignore[index]
    reasons = sorted(r["reason"] for r in rejects)
    assert any("no study with accession number A000000000" in r for r in reasons)
    assert any("label 'unclear' is neither a --positive nor a --negative value" in r for r in reasons)
    assert any(r.startswith("conflicts with label") for r in reasons)
    assert any(r.startswith("duplicate of ris_export.csv row") for r in reasons)
    assert any("no accession number or Study UID" in r for r in reasons)
    # the manifest is the one training and validation read
    from training.data import load_records

    assert len(load_records(data)) == len(manifest)
    # a second import does not overwrite the manifest silently
    assert train_main(["import-labels", "--dicom", str(data), "--task", "wrist_fracture", "--table",
                       str(table)]) == 2
    # a key column with the site's own name, holding accession numbers
    other = tmp_path / "ris_named.csv"
    other.write_text("RIS Acc,Finding\n" + "".join(f"{studies[u]['accession']},{truth[u]}\n" for u in uids),  # type: ignore[index]
                     encoding="utf-8")
    assert train_main(["import-labels", "--dicom", str(data), "--task", "wrist_fracture", "--table", str(other),
                       "--key-column", "RIS Acc", "--force"]) == 0
    assert {r["study_uid"]: r["label"] for r in read_manifest(data)} == truth
    assert _rejects(data / "rejects.csv") == []


def test_excel_by_study_uid_with_seg_and_sr(export: dict[str, object], tmp_path: Path) -> None:
    from openpyxl import Workbook

    data = _fresh(export, tmp_path)
    studies, truth = export["studies"], export["truth"]
    uids = sorted(studies)  # type: ignore[arg-type]
    wb = Workbook()
    ws = wb.active
    ws.append(["StudyInstanceUID", "Result"])
    for u in uids[:-1]:  # the last study has annotations but no label
        ws.append([u, truth[u]])  # type: ignore[index]
    wb.save(tmp_path / "labels.xlsx")
    first = pydicom.dcmread(studies[uids[0]]["files"][0])  # type: ignore[index]
    last = pydicom.dcmread(studies[uids[-1]]["files"][0])  # type: ignore[index]
    ann = tmp_path / "annotations"
    ann.mkdir()
    _seg(first, ann / "seg_hd.dcm", thickness=True)     # indexable by highdicom
    _seg(first, ann / "seg_2d.dcm", thickness=False)    # pixel measures without a slice thickness
    _sr(first, tmp_path / "sr.dcm")
    _seg(last, ann / "seg_unlabelled.dcm", thickness=True)
    (ann / "notes.txt").write_text("not DICOM")
    _sr(first, data / "inside_sr.dcm")                   # an annotation object inside the image folder
    assert train_main(["import-labels", "--dicom", str(data), "--task", "wrist_fracture", "--table",
                       str(tmp_path / "labels.xlsx"), "--seg", str(ann), "--sr", str(tmp_path / "sr.dcm")]) == 0
    manifest = {r["study_uid"]: r for r in read_manifest(data)}
    assert set(manifest) == set(uids[:-1])
    boxes = manifest[uids[0]]["boxes"]
    seg_box = {"sop_instance_uid": first.SOPInstanceUID, "x0": 50.0, "y0": 100.0, "x1": 90.0, "y1": 120.0,
               "label": "fracture"}
    sr_box = {"sop_instance_uid": first.SOPInstanceUID, "x0": 10.0, "y0": 20.0, "x1": 60.0, "y1": 45.0,
              "label": "Fracture"}
    assert boxes.count(seg_box) == 2 and boxes.count(sr_box) == 1
    reasons = {Path(r["source"].split(", ")[0].split(" ")[-1]).name: r["reason"] for r in
               _rejects(data / "rejects.csv")}
    assert "move it out" in reasons["inside_sr.dcm"]
    assert "not a readable DICOM SEG" in reasons["notes.txt"]
    assert "no table labels" in reasons["seg_unlabelled.dcm"]


def _ct_study(folder: Path, accession: str, n: int = 2) -> str:
    """A tiny CT study (headers are all the importer reads)."""
    study = pydicom.uid.generate_uid()
    series = pydicom.uid.generate_uid()
    for i in range(n):
        ds = pydicom.Dataset()
        ds.SOPClassUID = pydicom.uid.CTImageStorage
        ds.SOPInstanceUID = pydicom.uid.generate_uid()
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.AccessionNumber, ds.Modality, ds.PatientID = accession, "CT", f"P{accession}"
        ds.file_meta = pydicom.dataset.FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        (folder / study).mkdir(parents=True, exist_ok=True)
        ds.save_as(folder / study / f"{i}.dcm", enforce_file_format=True)
    return study


def test_dxa_tables_wide_and_long(tmp_path: Path) -> None:
    from openpyxl import Workbook

    data = tmp_path / "ct"
    uids = {acc: _ct_study(data, acc) for acc in ("D1", "D2", "D3", "D4")}
    wide = tmp_path / "dxa.csv"
    wide.write_text("Accession;L1 T-score;L2 T-score;L3 T-score;L4 T-score\n"
                    "D1;-0.5;-0.9;-1.0;-0.2\n"
                    "D2;\u22122,7;-1,5;-2.4;\n"          # decimal commas, Unicode minus, L4 not measured
                    "D3;-1.2;n/a;-1.1;-1.3\n"          # a value that is not a number
                    "D9;-1;-1;-1;-1\n", encoding="utf-8")  # an accession that is not in the export
    wb = Workbook()
    ws = wb.active
    ws.append(["AccessionNumber", "Level", "T-Score"])
    for level, t in (("L1", -2.5), ("L2", -2.6), ("L3", -3.0), ("L5", -1.0)):
        ws.append(["D4", level, t])
    wb.save(tmp_path / "dxa_long.xlsx")
    assert train_main(["import-labels", "--dicom", str(data), "--task", "spine_bmd", "--dxa", str(wide),
                       "--dxa", str(tmp_path / "dxa_long.xlsx")]) == 0
    rows = {r["study_uid"]: r for r in read_manifest(data)}
    assert rows[uids["D1"]]["vertebrae"] == {"L1": "normal", "L2": "normal", "L3": "osteopenia", "L4": "normal"}
    assert rows[uids["D1"]]["label"] == "osteopenia"
    assert rows[uids["D2"]]["vertebrae"] == {"L1": "osteoporosis", "L2": "osteopenia", "L3": "osteopenia"}
    assert rows[uids["D2"]]["t_scores"]["L1"] == -2.7 and rows[uids["D2"]]["label"] == "osteoporosis"
    assert rows[uids["D4"]]["vertebrae"] == {"L1": "osteoporosis", "L2": "osteoporosis", "L3": "osteoporosis"}
    assert uids["D3"] not in rows
    reasons = [r["reason"] for r in _rejects(data / "rejects.csv")]
    assert len(reasons) == 3
    assert any("T-score 'n/a' of L2 is not a number" in r for r in reasons)
    assert any("no study with accession number D9" in r for r in reasons)
    assert any("level 'L5' is not one of L1-L4" in r for r in reasons)
    json.dumps(rows)  # plain JSON types only
