"""Job handler: spooled study -> task -> outbox files, deliveries, result series and predecessor SR in one commit."""

from __future__ import annotations

import io
import time
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid

import tests.plugins.bone_test_task  # noqa: F401 - registers test_task
from dicomnode.analyze import analyze
from dicomnode.assembler import Assembler
from dicomnode.config import Config
from dicomnode.jobs import JobQueue
from dicomnode.outbox import Outbox
from dicomnode.spool import Spool
from dicomnode.status import status_text
from dicomnode.store import connection as db
from dicomnode.worker import JobHandler, PermanentJobError
from tests.plugins.bone_test_task import dx_dataset

SR_PREFIX = "1.2.840.10008.5.1.4.1.1.88."


@pytest.fixture
def node(tmp_path: Path) -> tuple[Config, Spool, JobQueue, Outbox, Assembler, JobHandler]:
    cfg = Config.model_validate({
        "node": {"storage_dir": str(tmp_path / "var"), "disk_min_free_gb": 0},
        "destinations": {"pacs": {"ae_title": "PACS", "host": "127.0.0.1", "port": 104}},
        "routes": [{"name": "wrist", "task": "test_task", "match": {"modality": ["DX"]}, "complete_after_s": 1,
                    "send_to": ["pacs"]}],
    })
    spool = Spool(cfg.node.storage_dir, 0)
    queue = JobQueue(spool.db_path)
    outbox = Outbox(cfg.node.storage_dir)
    asm = Assembler(cfg, spool, queue)
    return cfg, spool, queue, outbox, asm, JobHandler(cfg, spool, queue, outbox)


def _store(spool: Spool, study: str, series: str, i: int) -> str:
    buf = io.BytesIO()
    ds = dx_dataset(study, series, i)
    ds.save_as(buf, enforce_file_format=True)
    spool.store(buf.getvalue(), assoc_id=None)
    return str(ds.SOPInstanceUID)


def _run_one(queue: JobQueue, handler: JobHandler) -> int:
    job = queue.claim()
    assert job is not None
    handler(job)
    return job.id


def test_job_results_are_committed_and_rerun_supersedes(node, tmp_path: Path) -> None:
    cfg, spool, queue, outbox, asm, handler = node
    study, series = generate_uid(), generate_uid()
    _store(spool, study, series, 0)
    asm.poll_once(time.time() + 2)
    jid = _run_one(queue, handler)
    assert queue.get(jid).state == "done"  # type: ignore[union-attr]
    assert asm.study(study).state == "processed"  # type: ignore[union-attr]
    first = {d.path: pydicom.dcmread(d.path) for d in outbox.list()}
    assert len(first) == 2 and all(d.state == "pending" and d.destination == "pacs" for d in outbox.list())
    sr1 = next(ds for ds in first.values() if ds.SOPClassUID.startswith(SR_PREFIX))
    assert sr1.StudyInstanceUID == study

    time.sleep(0.01)
    _store(spool, study, series, 1)  # late instance
    asm.poll_once()
    asm.poll_once(time.time() + 2)
    _run_one(queue, handler)
    second = [pydicom.dcmread(d.path) for d in outbox.list() if d.path not in first]
    sr2 = next(ds for ds in second if ds.SOPClassUID.startswith(SR_PREFIX))
    assert sr2.SeriesInstanceUID == sr1.SeriesInstanceUID and sr2.SOPInstanceUID != sr1.SOPInstanceUID
    assert sr2.SeriesNumber == sr1.SeriesNumber
    pred = sr2.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
    assert pred.ReferencedSOPInstanceUID == sr1.SOPInstanceUID
    text = status_text(cfg)
    assert study in text and "processed" in text and "TST001" not in text


def test_handler_discards_results_of_a_job_no_longer_running(node) -> None:
    cfg, spool, queue, outbox, asm, handler = node
    study = generate_uid()
    _store(spool, study, generate_uid(), 0)
    asm.poll_once(time.time() + 2)
    job = queue.claim()
    assert job is not None
    db.thread_connection(spool.db_path).execute("UPDATE jobs SET state='dead' WHERE id=?", (job.id,))
    handler(job)
    assert outbox.list() == []


def test_missing_route_is_permanent(node) -> None:
    cfg, spool, queue, outbox, asm, handler = node
    queue.enqueue("1.2.3", "gone", "test_task", ["1.2.3.4"])
    job = queue.claim()
    with pytest.raises(PermanentJobError):
        handler(job)  # type: ignore[arg-type]


def test_analyze_runs_the_same_path(tmp_path: Path) -> None:
    study, series = generate_uid(), generate_uid()
    src = tmp_path / "in"
    src.mkdir()
    for i in range(2):
        dx_dataset(study, series, i).save_as(src / f"{i}.dcm", enforce_file_format=True)
    written = analyze(src, "test_task", tmp_path / "out")
    mods = sorted(pydicom.dcmread(p).Modality for p in written)
    assert mods == ["OT", "SR"]
    assert all(pydicom.dcmread(p).StudyInstanceUID == study for p in written)


def test_delivered_results_are_purged_after_retention(node) -> None:
    cfg, spool, queue, outbox, asm, handler = node
    asm.outbox = outbox
    study = generate_uid()
    _store(spool, study, generate_uid(), 0)
    asm.poll_once(time.time() + 2)
    _run_one(queue, handler)
    folder = outbox.list()[0].path.parent
    assert asm.purge_expired(time.time() + 30 * 86400) == 1  # still pending: files kept, spool purged
    assert folder.exists()
    for d in outbox.list():
        outbox.mark_sent(d.id)
    asm.purge_expired(time.time() + 30 * 86400)
    assert not folder.exists() and {d.state for d in outbox.list()} == {"sent"}
