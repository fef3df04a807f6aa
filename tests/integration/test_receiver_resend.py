"""Corrected re-sends end to end: over the wire, through the journal, reprocessed, results superseding the old."""

from __future__ import annotations

import io
import re
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, DigitalXRayImageStorageForPresentation  # type: ignore[attr-defined]

from dicomnode.metrics import default_metrics
from tests.integration.conftest import NodeProcess, wait_for
from tests.integration.test_scp_dcmtk import ct_file, make_node, stored_path  # noqa: F401 - make_node: fixture
from tests.orthanc import OrthancServer
from tests.plugins.bone_test_task import write_study

pytestmark = pytest.mark.integration

SR_PREFIX = "1.2.840.10008.5.1.4.1.1.88."


def _replaced_count() -> float:
    text = default_metrics().exposition().decode()
    m = re.search(r'dicomnode_instances_received_total\{outcome="replaced"\} ([0-9.e+]+)', text)
    return float(m.group(1)) if m else 0.0


def _send(port: int, ds: pydicom.Dataset, calling: str = "PYSCU", sop_class: str = CTImageStorage) -> int:
    ae = AE(ae_title=calling)
    ae.add_requested_context(sop_class, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title="BONENODE")
    assert assoc.is_established
    status = int(assoc.send_c_store(ds).Status)
    assoc.release()
    return status


@pytest.mark.parametrize("journal_mb", [256, 0])
def test_corrected_resend_over_the_wire_replaces_and_is_counted(make_node, tmp_path: Path,  # noqa: F811
                                                                 journal_mb: int) -> None:
    node = make_node(journal_mb=journal_mb)
    src = ct_file(tmp_path / "a.dcm")
    ds = pydicom.dcmread(src)
    assert _send(node.port, ds) == 0
    assert node.group.wait_indexed(10)
    first = stored_path(node.spool, src)
    before = _replaced_count()
    ds.PatientName = "Corrected^Name"
    assert _send(node.port, ds) == 0
    assert node.group.wait_indexed(10)
    wait_for(lambda: _replaced_count() == before + 1, 10, "replacement counted")
    now = stored_path(node.spool, src)
    assert str(pydicom.dcmread(now).PatientName) == "Corrected^Name" and not first.exists()
    assert _send(node.port, ds) == 0  # the corrected copy again: a duplicate, not counted as a replacement
    assert node.group.wait_indexed(10)
    assert _replaced_count() == before + 1


def test_keep_first_acknowledges_and_keeps_the_first_copy(make_node, tmp_path: Path) -> None:  # noqa: F811
    node = make_node(resend_policy="keep_first")
    src = ct_file(tmp_path / "a.dcm")
    ds = pydicom.dcmread(src)
    assert _send(node.port, ds) == 0
    ds.PatientName = "Other^Name"
    assert _send(node.port, ds) == 0
    assert node.group.wait_indexed(10)
    assert str(pydicom.dcmread(stored_path(node.spool, src)).PatientName) == "Test^Patient"


def test_corrected_resend_reprocesses_and_supersedes_results(
        tmp_path: Path, node_with_orthanc: tuple[NodeProcess, OrthancServer]) -> None:
    """Orthanc sends a study, results go back; a corrected copy of one image is re-sent by a modality: the
    node reprocesses and the new SR names the first one in its Predecessor Documents Sequence."""
    node, pacs = node_with_orthanc
    node.start()
    study_uid, paths = write_study(tmp_path / "study", n_series=1, n_images=2)
    pacs.upload_dir(tmp_path / "study")
    pacs.store_to_modality("node", [pacs.study_id(study_uid)])
    wait_for(lambda: node.query("SELECT 1 FROM deliveries WHERE state='sent'") and not node.query(
        "SELECT 1 FROM deliveries WHERE state!='sent'"), 90, "first results sent")
    (first_sr,) = [i for i in pacs.instances_in_study(study_uid) if str(i["SOPClassUID"]).startswith(SR_PREFIX)]

    fixed = pydicom.dcmread(paths[0])
    fixed.PatientName = "TEST^CORRECTED"
    assert _send(node.port, fixed, calling="TESTSCU", sop_class=DigitalXRayImageStorageForPresentation) == 0

    def two_srs() -> list[dict]:
        srs = [i for i in pacs.instances_in_study(study_uid) if str(i["SOPClassUID"]).startswith(SR_PREFIX)]
        return srs if len(srs) == 2 else []

    srs = wait_for(two_srs, 90, "the superseding SR")
    new = next(s for s in srs if s["SOPInstanceUID"] != first_sr["SOPInstanceUID"])
    ds = pydicom.dcmread(io.BytesIO(pacs.get_file(new["ID"])))
    prior = [ref.ReferencedSOPInstanceUID for study in ds.PredecessorDocumentsSequence
             for series in study.ReferencedSeriesSequence for ref in series.ReferencedSOPSequence]
    assert prior == [first_sr["SOPInstanceUID"]]
    assert str(ds.PatientName) == "TEST^CORRECTED"  # the new results carry the corrected demographics
    assert sorted(r["generation"] for r in node.query("SELECT generation FROM jobs WHERE state='done'")) == [1, 2]
    log = node.log_tail(10**7)
    assert "re-sent with different content" in log
    assert "TEST^CORRECTED" not in log and "TST001" not in log
