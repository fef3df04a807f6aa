"""hrpqct_motion through a real Orthanc and ``dicomnode serve``: an XtremeCT (110 slices) and an XtremeCT II
(168 slices) scan each come back with one SR (scan grade, 8 per-slice grades, rescan finding with P(grade >= 4))
and one SC montage of the 8 graded slices; the same images relabelled as a lumbar CT from a whole-body scanner
are not routed to the task."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import highdicom as hd
import pydicom
import pytest
import torch
from pydicom.uid import generate_uid

from dicomnode.results import codes as rc
from inference import codes
from inference.hrpqct import select_slices
from tests.conftest import run_dciodvfy
from tests.integration.conftest import NodeProcess, wait_for
from tests.orthanc import OrthancServer
from training.cli import main as train_main
from training.synth.hrpqct_motion import generate

pytestmark = pytest.mark.integration

SR_PREFIX = "1.2.840.10008.5.1.4.1.1.88."
SMALL = {"n": 48, "n_views": 48}  # a small reconstruction matrix keeps the simulation fast; slice counts are real
TINY = ["--set", "task.channels=[4,8,8,8,8]", "--set", "task.hidden=8", "--set", "batch_size=8",
        "--set", "max_steps_per_epoch=2"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Synthetic scans from the task's generator and a bundle trained on them for a couple of steps."""
    torch.set_num_threads(2)
    root = tmp_path_factory.mktemp("hrpqct_int")
    data = root / "data"
    generate(data, 4, 11, workers=1, params=SMALL)
    bundle = root / "bundle"
    assert train_main(["train", "hrpqct_motion", "--data", str(data), "--out", str(bundle), "--epochs", "1",
                       "--device", "cpu", "--version", "int1", "--fp16", "--synthetic", *TINY]) == 0
    scans = {}
    for model, seed in (("XtremeCT", 21), ("XtremeCT II", 22)):
        out = root / model.replace(" ", "_")
        generate(out, 1, seed, workers=1, params={**SMALL, "scanner": model})
        (row,) = [json.loads(line) for line in (out / "labels.jsonl").read_text().splitlines()]
        scans[model] = out / row["study_uid"]
    return {"data": data, "bundle": bundle, **scans}


def _lumbar_copy(study: Path, out: Path) -> tuple[str, set[str]]:
    """The same slices as a new study from a whole-body CT scanner, body part lumbar spine."""
    out.mkdir(parents=True)
    study_uid, series_uid = generate_uid(), generate_uid()
    sops = set()
    for i, p in enumerate(sorted(study.rglob("*.dcm"))):
        ds = pydicom.dcmread(p)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.PatientID = "LUMBAR0001"
        ds.Manufacturer, ds.ManufacturerModelName = "SIEMENS", "SOMATOM Definition AS"
        ds.BodyPartExamined, ds.SeriesDescription = "LSPINE", "L-Spine 1.0 Br60"
        ds.save_as(out / f"{i}.dcm", enforce_file_format=True)
        sops.add(str(ds.SOPInstanceUID))
    return study_uid, sops


def _check_scan(pacs: OrthancServer, study: Path, tmp_path: Path) -> None:
    sources = sorted((pydicom.dcmread(p, stop_before_pixels=True) for p in study.rglob("*.dcm")),
                     key=lambda d: float(d.ImagePositionPatient[2]))
    study_uid = str(sources[0].StudyInstanceUID)
    source_uids = {str(d.SOPInstanceUID) for d in sources}
    graded = [str(sources[i].SOPInstanceUID) for i in select_slices(len(sources))]

    def results() -> list[dict]:
        found = [i for i in pacs.instances_in_study(study_uid) if i["SOPInstanceUID"] not in source_uids]
        return found if len(found) >= 2 else []

    found = wait_for(results, 180, f"motion SR + SC montage of a {len(sources)}-slice scan in Orthanc")
    srs = [r for r in found if str(r["SOPClassUID"]).startswith(SR_PREFIX)]
    scs = [r for r in found if not str(r["SOPClassUID"]).startswith(SR_PREFIX)]
    assert len(srs) == 1 and len(scs) == 1

    sr_path = tmp_path / f"sr_{len(sources)}.dcm"
    sr_path.write_bytes(pacs.get_file(srs[0]["ID"]))
    errors, out = run_dciodvfy(sr_path)
    assert not errors, out
    report = hd.sr.srread(sr_path).content
    # one TID 1410 group per graded slice (outlining it); the scan's grade and the rescan recommendation, about
    # all 8 slices, are conclusions in the document-level "Qualitative Evaluations"
    assert not report.get_image_measurement_groups()
    groups = [g for g in report.get_planar_roi_measurement_groups(finding_type=rc.to_hd(codes.MOTION_ARTIFACT_GRADE))
              if not str(g.tracking_identifier).endswith(" conclusion")]  # the scan's conclusion is placed on one slice too
    assert len(groups) == 8
    for uid in graded:
        (per_slice,) = [g for g in report.get_planar_roi_measurement_groups(referenced_sop_instance_uid=uid)
                        if not str(g.tracking_identifier).endswith(" conclusion")]
        assert str(per_slice.tracking_identifier).startswith("scan slice")
        (p_grade,) = per_slice.get_measurements(name=rc.to_hd(codes.MOTION_ARTIFACT_GRADE))
        assert 0.0 < p_grade.value <= 100.0 and p_grade.unit.value == "%"
    sr_ds = pydicom.dcmread(sr_path)
    (container,) = [i for i in sr_ds.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "C0034375"]
    coded = {i.ConceptNameCodeSequence[0].CodeValue: i.ConceptCodeSequence[0].CodeValue
             for i in container.ContentSequence if i.ValueType == "CODE"}
    grade = int(coded[codes.MOTION_ARTIFACT_GRADE.value][-1])
    assert coded[codes.RESCAN_RECOMMENDED.value] == (codes.YES.value if grade >= 4 else codes.NO.value)
    texts = [str(i.TextValue) for i in container.ContentSequence if i.ValueType == "TEXT"]
    assert any("probability" in t and t.endswith("over 8 images") for t in texts), texts

    sc_path = tmp_path / f"sc_{len(sources)}.dcm"
    sc_path.write_bytes(pacs.get_file(scs[0]["ID"]))
    errors, out = run_dciodvfy(sc_path)
    assert not errors, out
    sc = pydicom.dcmread(io.BytesIO(sc_path.read_bytes()))
    assert sc.StudyInstanceUID == study_uid and sc.BurnedInAnnotation == "YES"
    assert [str(s.ReferencedSOPInstanceUID) for s in sc.SourceImageSequence] == graded


def test_both_hrpqct_geometries_return_sr_and_montage_lumbar_ct_not_routed(
        tiny: dict[str, Path], tmp_path: Path, node_with_orthanc: tuple[NodeProcess, OrthancServer]) -> None:
    node, pacs = node_with_orthanc
    node.use_example_route("hrpqct_motion", tiny["bundle"])
    node.start()
    xct, xct2 = tmp_path / "xct", tmp_path / "xct2"
    shutil.copytree(tiny["XtremeCT"], xct)
    shutil.copytree(tiny["XtremeCT II"], xct2)
    assert len(list(xct.rglob("*.dcm"))) == 110 and len(list(xct2.rglob("*.dcm"))) == 168
    lumbar_uid, lumbar_sops = _lumbar_copy(xct, tmp_path / "lumbar")
    uids = [str(pydicom.dcmread(next(d.rglob("*.dcm")), stop_before_pixels=True).StudyInstanceUID)
            for d in (xct, xct2)]
    for d in (xct, xct2, tmp_path / "lumbar"):
        pacs.upload_dir(d)
    pacs.store_to_modality("node", [pacs.study_id(u) for u in (*uids, lumbar_uid)])

    _check_scan(pacs, xct, tmp_path)
    _check_scan(pacs, xct2, tmp_path)

    # the lumbar CT was received but matched no route, so nothing was run or sent for it
    wait_for(lambda: node.query("SELECT no_route_series FROM studies WHERE study_uid=? AND no_route_series "
                                "IS NOT NULL AND no_route_series NOT IN ('', '[]')", (lumbar_uid,)),
             90, "the lumbar CT to be assembled without a route")
    assert not node.query("SELECT 1 FROM jobs WHERE study_uid=?", (lumbar_uid,))
    assert sorted(j["task"] for j in node.query("SELECT task FROM jobs")) == ["hrpqct_motion"] * 2
    assert {i["SOPInstanceUID"] for i in pacs.instances_in_study(lumbar_uid)} == lumbar_sops
