"""Durability: kill -9 while receiving and while processing, and a PACS that is down when results are ready.

In every case each instance the node acknowledged is processed, and the
results reach Orthanc exactly once (counted in Orthanc).
"""

from __future__ import annotations

import io
import sqlite3
import time
from pathlib import Path

import pydicom
import pytest
from pydicom import Dataset
from pynetdicom import AE
from pynetdicom.sop_class import DigitalXRayImageStorageForPresentation

from tests.integration.conftest import NodeProcess, wait_for
from tests.orthanc import OrthancServer
from tests.plugins.bone_test_task import write_study

pytestmark = pytest.mark.integration

SR_PREFIX = "1.2.840.10008.5.1.4.1.1.88."


def _referenced_uids(ds: Dataset) -> set[str]:
    out: set[str] = set()
    for elem in ds.iterall():
        if elem.keyword == "ReferencedSOPInstanceUID":
            out.add(str(elem.value))
    return out


def _results(pacs: OrthancServer, study_uid: str, sources: set[str]) -> list[dict]:
    return [i for i in pacs.instances_in_study(study_uid) if i["SOPInstanceUID"] not in sources]


def _wait_results_settled(pacs: OrthancServer, node: NodeProcess, study_uid: str, sources: set[str]) -> list[dict]:
    """Wait until the node delivered everything and report the result instances in Orthanc."""
    def delivered() -> bool:
        rows = node.query("SELECT state FROM deliveries")
        jobs = node.query("SELECT state FROM jobs")
        return bool(rows) and all(r["state"] == "sent" for r in rows) and all(j["state"] == "done" for j in jobs)

    wait_for(delivered, 120, "every delivery sent")
    time.sleep(2.0)  # give a duplicate (if any) time to show up
    return _results(pacs, study_uid, sources)


def test_kill9_while_receiving(tmp_path: Path, node_with_orthanc: tuple[NodeProcess, OrthancServer]) -> None:
    node, pacs = node_with_orthanc
    node.start()
    study_uid, paths = write_study(tmp_path / "study", n_series=1, n_images=8)
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(DigitalXRayImageStorageForPresentation)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="BONENODE")
    assert assoc.is_established
    acked: set[str] = set()
    for i, p in enumerate(paths):
        if i == 4:
            node.kill9()  # in the middle of the association
        ds = pydicom.dcmread(p)
        try:
            status = assoc.send_c_store(ds)
        except (RuntimeError, ValueError, OSError):
            break
        if status and status.get("Status") == 0x0000:
            acked.add(str(ds.SOPInstanceUID))
    assoc.abort()
    assert len(acked) == 4

    node.start()
    results = _wait_results_settled(pacs, node, study_uid, set())
    srs = [r for r in results if str(r["SOPClassUID"]).startswith(SR_PREFIX)]
    assert len(srs) == 1 and len(results) == 2  # exactly one SR and one overlay
    sr = pydicom.dcmread(io.BytesIO(pacs.get_file(srs[0]["ID"])))
    assert acked <= _referenced_uids(sr)


def test_kill9_while_processing(tmp_path: Path, node_with_orthanc: tuple[NodeProcess, OrthancServer]) -> None:
    node, pacs = node_with_orthanc
    node.start(env={"BONE_TEST_TASK_SLEEP_S": "30"})
    study_uid, paths = write_study(tmp_path / "study", n_series=2, n_images=2)
    sources = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in paths}
    pacs.upload_dir(tmp_path / "study")
    pacs.store_to_modality("node", [pacs.study_id(study_uid)])
    wait_for(lambda: node.query("SELECT 1 FROM jobs WHERE state='running'"), 60, "a running job")
    node.kill9()
    assert node.query("SELECT state FROM jobs")[0]["state"] == "running"  # left behind by the kill

    node.start(env={"BONE_TEST_TASK_SLEEP_S": "0"})
    results = _wait_results_settled(pacs, node, study_uid, sources)
    assert sorted(r["Modality"] for r in results) == ["OT", "SR"]
    assert len(pacs.instances_in_study(study_uid)) == len(sources) + 2
    job = node.query("SELECT state, attempts FROM jobs")
    assert [(j["state"], j["attempts"]) for j in job] == [("done", 2)]


def test_pacs_down_when_results_are_ready(tmp_path: Path,
                                          node_with_orthanc: tuple[NodeProcess, OrthancServer]) -> None:
    node, pacs = node_with_orthanc
    node.start(env={"BONE_TEST_TASK_SLEEP_S": "4"})  # results become ready after the PACS has gone down
    study_uid, paths = write_study(tmp_path / "study", n_series=2, n_images=2)
    sources = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in paths}
    pacs.upload_dir(tmp_path / "study")
    pacs.store_to_modality("node", [pacs.study_id(study_uid)])
    pacs.stop()
    wait_for(lambda: node.query("SELECT 1 FROM deliveries WHERE state='pending' AND attempts>=1"), 60,
             "a failed delivery attempt while the PACS is down")
    assert not node.query("SELECT 1 FROM deliveries WHERE state!='pending'")
    pacs.start()  # same storage and ports
    results = _wait_results_settled(pacs, node, study_uid, sources)
    assert sorted(r["Modality"] for r in results) == ["OT", "SR"]
    assert len(pacs.instances_in_study(study_uid)) == len(sources) + 2


def test_resend_after_crash_between_store_and_mark_does_not_duplicate(
        tmp_path: Path, node_with_orthanc: tuple[NodeProcess, OrthancServer]) -> None:
    node, pacs = node_with_orthanc
    node.start()
    study_uid, paths = write_study(tmp_path / "study", n_series=1, n_images=2)
    sources = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in paths}
    pacs.upload_dir(tmp_path / "study")
    pacs.store_to_modality("node", [pacs.study_id(study_uid)])
    before = _wait_results_settled(pacs, node, study_uid, sources)
    node.kill9()
    # the state a crash leaves when the PACS stored the objects but the node had not yet recorded it
    conn = sqlite3.connect(node.storage_dir / "node.db")
    with conn:
        conn.execute("UPDATE deliveries SET state='pending', sent_at=NULL")
    conn.close()
    node.start()
    after = _wait_results_settled(pacs, node, study_uid, sources)
    assert sorted(r["SOPInstanceUID"] for r in after) == sorted(r["SOPInstanceUID"] for r in before)
    assert all(r["attempts"] == 2 for r in node.query("SELECT attempts FROM deliveries"))
