"""spine_bmd through a real Orthanc and ``dicomnode serve``: a lumbar CT comes back with an SR (a group per
vertebra with site, class, mean trabecular HU and probability, plus the patient-level class) and an SC (sagittal
reformat + mid-vertebra slices); a CT with fewer than 20 slices and a knee CT are not routed."""

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

from inference.codes import LUMBAR_SPINE, LUMBAR_VERTEBRAE
from tests.conftest import run_dciodvfy
from tests.integration.conftest import NodeProcess, wait_for
from tests.orthanc import OrthancServer
from training.cli import main as train_main
from training.synth import spine_bmd as synth

pytestmark = pytest.mark.integration

SR_PREFIX = "1.2.840.10008.5.1.4.1.1.88."
TINY = ["--set", "variant=light", "--set", "image_size=128", "--set", "box_score_thresh=0.0", "--set",
        "batch_size=2", "--set", "max_steps_per_epoch=2"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Four small synthetic lumbar CTs and a light DSNet trained on them for two steps."""
    torch.set_num_threads(2)
    root = tmp_path_factory.mktemp("spine_int")
    data = root / "data"
    synth.generate(data, 4, seed=11, workers=1, params={"n": 192, "pixel_spacing": 0.9, "thickness": 3.0})
    bundle = root / "bundle"
    assert train_main(["train", "spine_bmd", "--data", str(data), "--out", str(bundle), "--epochs", "1",
                       "--device", "cpu", "--version", "int1", "--fp16", "--synthetic", *TINY]) == 0
    return {"data": data, "bundle": bundle}


def _copy_as_new_study(src: list[Path], out: Path, *, body_part: str | None = None) -> tuple[str, set[str]]:
    """Copies of ``src`` under new study/series/instance UIDs (optionally another body part)."""
    out.mkdir(parents=True)
    study_uid, series_uid = generate_uid(), generate_uid()
    sops = set()
    for i, p in enumerate(src):
        ds = pydicom.dcmread(p)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        if body_part is not None:
            ds.BodyPartExamined = body_part
        ds.save_as(out / f"{i}.dcm", enforce_file_format=True)
        sops.add(str(ds.SOPInstanceUID))
    return study_uid, sops


def test_lumbar_ct_returns_sr_and_sc_short_and_knee_ct_not_routed(
        tiny: dict[str, Path], tmp_path: Path, node_with_orthanc: tuple[NodeProcess, OrthancServer]) -> None:
    node, pacs = node_with_orthanc
    node.use_example_route("spine_bmd", tiny["bundle"], complete_after_s=2.0)
    node.start()
    row = json.loads((tiny["data"] / "labels.jsonl").read_text().splitlines()[0])
    study_dir = tmp_path / "lumbar"
    shutil.copytree(tiny["data"] / row["study_uid"], study_dir)
    files = sorted(study_dir.rglob("*.dcm"))
    sources = [pydicom.dcmread(p, stop_before_pixels=True) for p in files]
    study_uid = row["study_uid"]
    source_uids = {str(d.SOPInstanceUID) for d in sources}
    short_uid, short_sops = _copy_as_new_study(files[:15], tmp_path / "short")
    knee_uid, knee_sops = _copy_as_new_study(files, tmp_path / "knee", body_part="KNEE")

    for d in (study_dir, tmp_path / "short", tmp_path / "knee"):
        pacs.upload_dir(d)
    pacs.store_to_modality("node", [pacs.study_id(u) for u in (study_uid, short_uid, knee_uid)])

    def results() -> list[dict]:
        found = [i for i in pacs.instances_in_study(study_uid) if i["SOPInstanceUID"] not in source_uids]
        return found if len(found) >= 2 else []

    found = wait_for(results, 240, "spine SR + SC in Orthanc")
    srs = [r for r in found if str(r["SOPClassUID"]).startswith(SR_PREFIX)]
    scs = [r for r in found if not str(r["SOPClassUID"]).startswith(SR_PREFIX)]
    assert len(srs) == 1 and len(scs) == 1

    sr_path = tmp_path / "sr.dcm"
    sr_path.write_bytes(pacs.get_file(srs[0]["ID"]))
    errors, out = run_dciodvfy(sr_path)
    assert not errors, out
    report = hd.sr.srread(sr_path).content
    groups = report.get_planar_roi_measurement_groups()
    assert not report.get_image_measurement_groups()  # every group has its region (OHIF needs one)
    sites = [fs.value.value for g in groups for fs in (g.finding_sites or [])]
    levels = {c.value for c in LUMBAR_VERTEBRAE.values()} & set(sites)
    assert levels
    # the patient-level class is a document-level conclusion naming the lumbar spine
    sr_ds = pydicom.dcmread(sr_path)
    (container,) = [i for i in sr_ds.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "C0034375"]
    assert any(f"({LUMBAR_SPINE.meaning})" in str(i.get("TextValue", "")) for i in container.ContentSequence)
    vertebrae = [g for g in report.get_planar_roi_measurement_groups() if not str(g.tracking_identifier).endswith(" conclusion")]
    for g in vertebrae:  # one box group per classified vertebra (the patient conclusion is placed on one too)
        names = {m.name.value for m in g.get_measurements()}
        assert "112031" in names  # mean trabecular HU
        assert g.finding_type.meaning in {"Normal", "Osteopenia", "Osteoporosis"}
    sc_path = tmp_path / "sc.dcm"
    sc_path.write_bytes(pacs.get_file(scs[0]["ID"]))
    errors, out = run_dciodvfy(sc_path)
    assert not errors, out
    sc = pydicom.dcmread(io.BytesIO(sc_path.read_bytes()))
    assert sc.StudyInstanceUID == study_uid and sc.BurnedInAnnotation == "YES"

    # the short series and the knee CT were received but matched no route: nothing run or sent for them
    for uid in (short_uid, knee_uid):
        wait_for(lambda u=uid: node.query("SELECT no_route_series FROM studies WHERE study_uid=? AND no_route_series "
                                          "IS NOT NULL AND no_route_series NOT IN ('', '[]')", (u,)),
                 60, "the unrouted study to be assembled without a route")
        assert not node.query("SELECT 1 FROM jobs WHERE study_uid=?", (uid,))
    assert [j["task"] for j in node.query("SELECT task FROM jobs")] == ["spine_bmd"]
    assert {i["SOPInstanceUID"] for i in pacs.instances_in_study(short_uid)} == short_sops
    assert {i["SOPInstanceUID"] for i in pacs.instances_in_study(knee_uid)} == knee_sops
