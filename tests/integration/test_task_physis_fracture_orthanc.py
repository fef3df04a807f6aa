"""physis_fracture through a real Orthanc and ``dicomnode serve``: a paediatric study comes back with one SR (study
and per-image growth-plate findings, each reported region a TID 1410 planar ROI on its source image) and one SC per
image with the boxes drawn; the same images of an adult are not routed to the task."""

from __future__ import annotations

import datetime as dt
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
from inference.codes import GROWTH_PLATE_FRACTURE
from tests.conftest import run_dciodvfy
from tests.integration.conftest import NodeProcess, wait_for
from tests.orthanc import OrthancServer
from training.cli import main as train_main

pytestmark = pytest.mark.integration

SR_PREFIX = "1.2.840.10008.5.1.4.1.1.88."
# tiny light model; thresholds at 0 (and no tuned operating point) so the barely trained detector's fracture boxes
# are reported: a region is reported only at or above the operating point (the test checks the reporting path, not
# the model's accuracy)
TINY = ["--set", "task.variant=light", "--set", "task.det_long_side=128", "--set", "task.image_size=64",
        "--set", "task.crop_size=32", "--set", "task.crops_per_image=2", "--set", "task.n_boot=10",
        "--set", "task.post={det_score_thresh: 0.0, box_report_thresh: 0.0, threshold: 0.0}",
        "--set", "task.tune_threshold=false", "--set", "batch_size=2",
        "--set", "max_steps_per_epoch=2"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Six synthetic paediatric studies and a bundle trained on them for a couple of steps."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("physis_int")
    data = root / "data"
    assert train_main(["synth", "physis_fracture", "--out", str(data), "--n", "6", "--seed", "3",
                       "--workers", "1"]) == 0
    bundle = root / "bundle"
    assert train_main(["train", "physis_fracture", "--data", str(data), "--out", str(bundle), "--epochs", "1",
                       "--device", "cpu", "--version", "int1", "--fp16", "--synthetic", *TINY]) == 0
    return {"data": data, "bundle": bundle}


def _two_view_study(data: Path) -> Path:
    for row in map(json.loads, (data / "labels.jsonl").read_text().splitlines()):
        d = data / row["study_uid"]
        if len(list(d.rglob("*.dcm"))) == 2:
            return d
    raise AssertionError("no 2-view study in the synthetic set")


def _adult_copy(study: Path, out: Path) -> tuple[str, set[str]]:
    """The same images as a new study of a 30-year-old (new UIDs, PatientAge and BirthDate)."""
    out.mkdir(parents=True)
    study_uid, series_uid = generate_uid(), generate_uid()
    sops = set()
    for i, p in enumerate(sorted(study.rglob("*.dcm"))):
        ds = pydicom.dcmread(p)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.PatientID = "ADULT0001"
        ds.PatientAge = "030Y"
        date = dt.datetime.strptime(str(ds.StudyDate), "%Y%m%d").date()
        ds.PatientBirthDate = date.replace(year=date.year - 30).strftime("%Y%m%d")
        ds.save_as(out / f"{i}.dcm", enforce_file_format=True)
        sops.add(str(ds.SOPInstanceUID))
    return study_uid, sops


def test_paediatric_study_returns_sr_with_rois_and_scs_adult_not_routed(
        tiny: dict[str, Path], tmp_path: Path, node_with_orthanc: tuple[NodeProcess, OrthancServer]) -> None:
    node, pacs = node_with_orthanc
    node.use_example_route("physis_fracture", tiny["bundle"])
    node.start()
    child = tmp_path / "child"
    shutil.copytree(_two_view_study(tiny["data"]), child)
    sources = [pydicom.dcmread(p) for p in sorted(child.rglob("*.dcm"))]
    assert all(int(str(d.PatientAge)[:3]) < 18 for d in sources)
    study_uid = str(sources[0].StudyInstanceUID)
    source_uids = {str(d.SOPInstanceUID) for d in sources}
    adult_uid, adult_sops = _adult_copy(child, tmp_path / "adult")

    pacs.upload_dir(child)
    pacs.upload_dir(tmp_path / "adult")
    pacs.store_to_modality("node", [pacs.study_id(study_uid), pacs.study_id(adult_uid)])

    def results() -> list[dict]:
        found = [i for i in pacs.instances_in_study(study_uid) if i["SOPInstanceUID"] not in source_uids]
        return found if len(found) >= 3 else []

    found = wait_for(results, 180, "physis SR + 2 SC in Orthanc")
    srs = [r for r in found if str(r["SOPClassUID"]).startswith(SR_PREFIX)]
    scs = [r for r in found if not str(r["SOPClassUID"]).startswith(SR_PREFIX)]
    assert len(srs) == 1 and len(scs) == 2

    sr_path = tmp_path / "sr.dcm"
    sr_path.write_bytes(pacs.get_file(srs[0]["ID"]))
    errors, out = run_dciodvfy(sr_path)
    assert not errors, out
    report = hd.sr.srread(sr_path).content
    assert not report.get_image_measurement_groups()  # every group has its region (OHIF needs one)
    for uid in source_uids:
        # the image's own probability outlines the whole image (its region starts at the first pixel's centre)
        (group,) = [g for g in report.get_planar_roi_measurement_groups(referenced_sop_instance_uid=uid)
                    if list(g.roi.value[0]) == [0.5, 0.5]]
        (prob,) = group.get_measurements(name=rc.to_hd(GROWTH_PLATE_FRACTURE))
        assert 0.0 <= prob.value <= 100.0 and prob.unit.value == "%"
    rois = [g for g in report.get_planar_roi_measurement_groups() if not str(g.tracking_identifier).endswith(" conclusion")]  # the study conclusion: a POINT
    assert len(rois) > len(source_uids), "the detected regions are reported as planar ROIs"
    for roi in rois:
        assert roi.finding_type == rc.to_hd(GROWTH_PLATE_FRACTURE)  # never metal or text
        assert roi.roi.graphic_type == hd.sr.GraphicTypeValues.POLYLINE
        ref = roi.roi.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID
        assert ref in source_uids
    referenced = set()
    for i, sc in enumerate(scs):
        path = tmp_path / f"sc{i}.dcm"
        path.write_bytes(pacs.get_file(sc["ID"]))
        errors, out = run_dciodvfy(path)
        assert not errors, out
        ds = pydicom.dcmread(io.BytesIO(path.read_bytes()))
        assert ds.StudyInstanceUID == study_uid and ds.BurnedInAnnotation == "YES"
        referenced.add(str(ds.SourceImageSequence[0].ReferencedSOPInstanceUID))
    assert referenced == source_uids  # one SC per source image

    # the adult study was received but matched no route (age >= 18), so nothing was run or sent for it
    wait_for(lambda: node.query("SELECT no_route_series FROM studies WHERE study_uid=? AND no_route_series "
                                "IS NOT NULL AND no_route_series NOT IN ('', '[]')", (adult_uid,)),
             60, "the adult study to be assembled without a route")
    assert not node.query("SELECT 1 FROM jobs WHERE study_uid=?", (adult_uid,))
    assert [j["task"] for j in node.query("SELECT task FROM jobs")] == ["physis_fracture"]
    assert {i["SOPInstanceUID"] for i in pacs.instances_in_study(adult_uid)} == adult_sops
