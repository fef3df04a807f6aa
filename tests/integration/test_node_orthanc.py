"""End to end with a real Orthanc: Orthanc C-STOREs a study to the node, the node's results appear in Orthanc."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest

from tests.integration.conftest import REPO_ROOT, NodeProcess, wait_for
from tests.orthanc import OrthancServer
from tests.plugins.bone_test_task import dx_dataset, write_study

pytestmark = pytest.mark.integration

SR_PREFIX = "1.2.840.10008.5.1.4.1.1.88."


def _results(pacs: OrthancServer, study_uid: str, source_uids: set[str]) -> list[dict]:
    return [i for i in pacs.instances_in_study(study_uid) if i["SOPInstanceUID"] not in source_uids]


def test_study_from_orthanc_comes_back_with_results(tmp_path: Path,
                                                    node_with_orthanc: tuple[NodeProcess, OrthancServer]) -> None:
    node, pacs = node_with_orthanc
    node.start()
    assert pacs.echo_modality("node")  # Orthanc's C-ECHO reaches the node
    study_uid, paths = write_study(tmp_path / "study", n_series=2, n_images=2)
    source_uids = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in paths}
    pacs.upload_dir(tmp_path / "study")
    pacs.store_to_modality("node", [pacs.study_id(study_uid)])

    def results_arrived() -> list[dict]:
        found = _results(pacs, study_uid, source_uids)
        return found if len(found) >= 2 else []

    results = wait_for(results_arrived, 90, "SR and SC in Orthanc")
    assert sorted(r["Modality"] for r in results) == ["OT", "SR"]  # one SR + one secondary capture overlay
    assert len(pacs.instances_in_study(study_uid)) == len(source_uids) + 2
    sr = next(r for r in results if str(r["SOPClassUID"]).startswith(SR_PREFIX))
    ds = pydicom.dcmread(io.BytesIO(pacs.get_file(sr["ID"])))
    assert ds.StudyInstanceUID == study_uid
    jobs = node.query("SELECT state, series_uids FROM jobs")
    assert [j["state"] for j in jobs] == ["done"] and len(json.loads(jobs[0]["series_uids"])) == 2
    wait_for(lambda: {r["state"] for r in node.query("SELECT state FROM deliveries")} == {"sent"}, 30,
             "every delivery marked sent")
    assert len(node.query("SELECT 1 FROM deliveries")) == 2

    out = subprocess.run([sys.executable, "-m", "dicomnode.cli", "status", "--config", str(node.config_path)],
                         cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert study_uid in out.stdout and "done" in out.stdout and "sent" in out.stdout
    assert "TST001" not in out.stdout  # no patient IDs
    assert node.stop() == 0  # SIGTERM: clean shutdown
    log = node.log_tail(10**7)
    assert "node stopped" in log and "TST001" not in log and "TEST^NODE" not in log


def test_late_instance_replaces_results(tmp_path: Path, node_with_orthanc: tuple[NodeProcess, OrthancServer]) -> None:
    node, pacs = node_with_orthanc
    node.start()
    study_uid, paths = write_study(tmp_path / "study", n_series=1, n_images=2)
    pacs.upload_dir(tmp_path / "study")
    pacs.store_to_modality("node", [pacs.study_id(study_uid)])
    wait_for(lambda: node.query("SELECT 1 FROM deliveries WHERE state='sent'") and not node.query(
        "SELECT 1 FROM deliveries WHERE state!='sent'"), 90, "first results sent")
    first = pacs.instances_in_study(study_uid)
    first_sr = [i for i in first if str(i["SOPClassUID"]).startswith(SR_PREFIX)]
    assert len(first_sr) == 1

    series_uid = str(pydicom.dcmread(paths[0], stop_before_pixels=True).SeriesInstanceUID)
    late = dx_dataset(study_uid, series_uid, 7)
    late.save_as(tmp_path / "late.dcm", enforce_file_format=True)
    late_id = pacs.upload(tmp_path / "late.dcm")
    pacs.store_to_modality("node", [late_id])

    def two_srs() -> list[dict]:
        srs = [i for i in pacs.instances_in_study(study_uid) if str(i["SOPClassUID"]).startswith(SR_PREFIX)]
        return srs if len(srs) == 2 else []

    srs = two_srs() or wait_for(two_srs, 90, "the replacing SR")
    new = next(s for s in srs if s["SOPInstanceUID"] != first_sr[0]["SOPInstanceUID"])
    assert new["SeriesInstanceUID"] == first_sr[0]["SeriesInstanceUID"]  # same result series, new instance
    ds = pydicom.dcmread(io.BytesIO(pacs.get_file(new["ID"])))
    prior = [ref.ReferencedSOPInstanceUID for study in ds.PredecessorDocumentsSequence
             for series in study.ReferencedSeriesSequence for ref in series.ReferencedSOPSequence]
    assert prior == [first_sr[0]["SOPInstanceUID"]]
    gens = sorted(r["generation"] for r in node.query("SELECT generation FROM jobs WHERE state='done'"))
    assert gens == [1, 2]


@pytest.mark.parametrize("orthanc", [{"peer": ("PEER", "127.0.0.1", 11112)}], indirect=True)
def test_orthanc_fixture_registers_modalities(orthanc: OrthancServer) -> None:
    assert orthanc.get("/modalities") == ["peer"]
    assert orthanc.statistics()["CountInstances"] == 0
