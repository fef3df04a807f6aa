"""wrist_fracture through a real Orthanc and ``dicomnode serve``: a 2-view adult wrist study comes back with one SR
(study finding + per-image probabilities for both images) and one SC per image; a paediatric wrist is not routed."""

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
from inference.findings import FRACTURE
from tests.conftest import run_dciodvfy
from tests.integration.conftest import NodeProcess, wait_for
from tests.orthanc import OrthancServer
from training.cli import main as train_main

pytestmark = pytest.mark.integration

SR_PREFIX = "1.2.840.10008.5.1.4.1.1.88."
TINY = ["--set", "input_hw=[96,64]", "--set", "stages=3", "--set", "batch_size=8", "--set", "n_boot=10",
        "--set", "max_steps_per_epoch=2"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Six synthetic adult studies and a bundle trained on them for a couple of steps."""
    torch.set_num_threads(2)
    root = tmp_path_factory.mktemp("wrist_int")
    data = root / "data"
    assert train_main(["synth", "wrist_fracture", "--out", str(data), "--n", "6", "--seed", "3",
                       "--workers", "1"]) == 0
    bundle = root / "bundle"
    assert train_main(["train", "wrist_fracture", "--data", str(data), "--out", str(bundle), "--epochs", "1",
                       "--device", "cpu", "--version", "int1", "--fp16", "--synthetic", *TINY]) == 0
    return {"data": data, "bundle": bundle}


def _two_view_study(data: Path) -> Path:
    for row in map(json.loads, (data / "labels.jsonl").read_text().splitlines()):
        d = data / row["study_uid"]
        if len(list(d.rglob("*.dcm"))) == 2:
            return d
    raise AssertionError("no 2-view study in the synthetic set")


def _paediatric_copy(study: Path, out: Path) -> tuple[str, set[str]]:
    """The same images as a new study of a 9-year-old (new UIDs, PatientAge and BirthDate)."""
    out.mkdir(parents=True)
    study_uid, series_uid = generate_uid(), generate_uid()
    sops = set()
    for i, p in enumerate(sorted(study.rglob("*.dcm"))):
        ds = pydicom.dcmread(p)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.PatientID = "PAED0001"
        ds.PatientAge = "009Y"
        date = dt.datetime.strptime(str(ds.StudyDate), "%Y%m%d").date()
        ds.PatientBirthDate = date.replace(year=date.year - 9).strftime("%Y%m%d")
        ds.save_as(out / f"{i}.dcm", enforce_file_format=True)
        sops.add(str(ds.SOPInstanceUID))
    return study_uid, sops


def test_adult_two_view_study_returns_sr_and_scs_paediatric_not_routed(
        tiny: dict[str, Path], tmp_path: Path, node_with_orthanc: tuple[NodeProcess, OrthancServer]) -> None:
    node, pacs = node_with_orthanc
    node.use_example_route("wrist_fracture", tiny["bundle"])
    node.start()
    adult = tmp_path / "adult"
    shutil.copytree(_two_view_study(tiny["data"]), adult)
    sources = [pydicom.dcmread(p) for p in sorted(adult.rglob("*.dcm"))]
    study_uid = str(sources[0].StudyInstanceUID)
    source_uids = {str(d.SOPInstanceUID) for d in sources}
    paed_uid, paed_sops = _paediatric_copy(adult, tmp_path / "paed")

    pacs.upload_dir(adult)
    pacs.upload_dir(tmp_path / "paed")
    pacs.store_to_modality("node", [pacs.study_id(study_uid), pacs.study_id(paed_uid)])

    def results() -> list[dict]:
        found = [i for i in pacs.instances_in_study(study_uid) if i["SOPInstanceUID"] not in source_uids]
        return found if len(found) >= 3 else []

    found = wait_for(results, 150, "wrist SR + 2 SC in Orthanc")
    srs = [r for r in found if str(r["SOPClassUID"]).startswith(SR_PREFIX)]
    scs = [r for r in found if not str(r["SOPClassUID"]).startswith(SR_PREFIX)]
    assert len(srs) == 1 and len(scs) == 2

    sr_path = tmp_path / "sr.dcm"
    sr_path.write_bytes(pacs.get_file(srs[0]["ID"]))
    errors, out = run_dciodvfy(sr_path)
    assert not errors, out
    report = hd.sr.srread(sr_path).content
    # one group per image, outlining it, and the study finding as a conclusion (also document-level)
    groups = report.get_planar_roi_measurement_groups()
    assert [str(g.tracking_identifier) for g in groups].count("Study conclusion") == 1
    assert len(groups) == 3 and not report.get_image_measurement_groups()
    for uid in source_uids:
        (group,) = [g for g in report.get_planar_roi_measurement_groups(referenced_sop_instance_uid=uid)
                    if not str(g.tracking_identifier).endswith(" conclusion")]
        (prob,) = group.get_measurements(name=rc.to_hd(FRACTURE))
        assert 0.0 <= prob.value <= 100.0 and prob.unit.value == "%"
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

    # the paediatric study was received but matched no route, so nothing was run or sent for it
    wait_for(lambda: node.query("SELECT no_route_series FROM studies WHERE study_uid=? AND no_route_series "
                                "IS NOT NULL AND no_route_series NOT IN ('', '[]')", (paed_uid,)),
             60, "the paediatric study to be assembled without a route")
    assert not node.query("SELECT 1 FROM jobs WHERE study_uid=?", (paed_uid,))
    assert [j["task"] for j in node.query("SELECT task FROM jobs")] == ["wrist_fracture"]
    assert {i["SOPInstanceUID"] for i in pacs.instances_in_study(paed_uid)} == paed_sops
