"""Nothing acknowledged disappears from view: quarantined instances, failed jobs and dead deliveries are flagged
by ``dicomnode status``, the metrics and the status page (which refreshes itself and fits 1400 px)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
from pydicom.uid import generate_uid

from dicomnode.config import Config
from dicomnode.http import REFRESH_S, render_status_page
from dicomnode.jobs import JobQueue
from dicomnode.journal import Journal
from dicomnode.metrics import NodeMetrics
from dicomnode.outbox import Outbox
from dicomnode.scp import start_receivers
from dicomnode.status import status_text
from dicomnode.store import connection as db
from tests.integration.test_scp_dcmtk import _node_config, ct_file

pytestmark = pytest.mark.integration

CHROMIUM = "/usr/bin/chromium"


def _quarantine_one(tmp_path: Path) -> Config:
    """An acknowledged journal record the spool cannot parse (left by a crash), replayed at start-up."""
    cfg = _node_config(tmp_path)
    good = ct_file(tmp_path / "a.dcm").read_bytes()
    bad = good[:400] + b"\x08\x00\x18\x00UI\xff\x7f" + b"\x01" * 200  # valid file meta, broken data set
    journal = Journal(Path(cfg.node.storage_dir) / "journal" / "1.bin", 8 << 20)
    assert journal.append(bad, {"assoc_id": None}) is not None
    del journal  # crash before it was applied
    start_receivers(cfg).stop()
    return cfg


def _study_rows_for(path: Path, queue: JobQueue) -> None:
    """The assembler's study rows for the queue's jobs (what it writes when it enqueues them)."""
    conn = db.connect(path)
    try:
        for j in queue.list():
            conn.execute("INSERT OR IGNORE INTO studies (study_uid, state, generation, completed_at) VALUES"
                         " (?,?,?,?)", (j.study_uid, "complete", 1, 1.0))
    finally:
        conn.close()


def test_quarantined_instance_is_listed_counted_and_flagged_until_removed(tmp_path: Path) -> None:
    cfg = _quarantine_one(tmp_path)
    qfiles = list((Path(cfg.node.storage_dir) / "quarantine").glob("*.dcm"))
    assert len(qfiles) == 1
    text = status_text(cfg)
    assert "QUARANTINED (1 acknowledged" in text and qfiles[0].name in text and "malformed" in text
    assert "sop=1." in text  # the UID of the C-STORE, from the record's file meta
    assert text.index("QUARANTINED") < text.index("SERIES")  # at the top
    metrics = NodeMetrics()
    metrics.attach_database(Path(cfg.node.storage_dir))
    exposition = metrics.exposition().decode()
    assert 'dicomnode_quarantined_instances{reason="invalid_dataset"} 1.0' in exposition
    page = render_status_page(cfg)
    assert 'id="quarantined"' in page and qfiles[0].name in page
    assert page.index('id="alerts"') < page.index('id="studies"')  # flagged at the top
    assert f'http-equiv="refresh" content="{REFRESH_S}"' in page
    qfiles[0].unlink()  # the operator dealt with it
    assert "QUARANTINED" not in status_text(cfg)
    assert 'id="quarantined"' not in render_status_page(cfg)
    assert "dicomnode_quarantined_instances{" not in metrics.exposition().decode()


def test_failed_jobs_and_dead_deliveries_are_flagged_at_the_top(tmp_path: Path) -> None:
    cfg = _node_config(tmp_path)
    start_receivers(cfg).stop()  # creates the database
    path = db.db_path(cfg.node.storage_dir)
    assert 'id="no-alerts"' in render_status_page(cfg)
    queue = JobQueue(path, max_attempts=1)
    queue.enqueue(generate_uid(), "r", "wrist_fracture", [generate_uid()])
    job = queue.claim()
    assert job is not None
    assert queue.mark_failed(job.id, "model crashed: ValueError") == "dead"
    _study_rows_for(path, queue)
    outbox = Outbox(Path(cfg.node.storage_dir))
    conn = db.connect(path)
    try:
        with db.transaction(conn):
            did = outbox.add(conn, [Path(cfg.node.storage_dir) / "r.dcm"], ["pacs"], job_id=job.id,
                             study_uid=job.study_uid, sop_uids=[generate_uid()])
    finally:
        conn.close()
    assert outbox.mark_failed(did, "association rejected", transient=False, max_retries=0, backoff_initial_s=1,
                              backoff_max_s=1) == "dead"
    page = render_status_page(cfg)
    assert 'id="failed-jobs"' in page and "model crashed" in page
    assert 'class="job-state dead"' in page  # and marked in the studies table
    assert 'id="dead-deliveries"' in page and "association rejected" in page
    assert page.index('id="dead-deliveries"') < page.index('id="studies"')
    text = status_text(cfg)
    assert "FAILED JOBS (1)" in text and "DEAD DELIVERIES (1)" in text


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian chromium not installed")
def test_status_page_columns_fit_1400_px(tmp_path: Path) -> None:
    """Rendered by headless Chromium at 1400 px, the page with long UIDs and errors does not scroll sideways."""
    cfg = _quarantine_one(tmp_path)
    path = db.db_path(cfg.node.storage_dir)
    queue = JobQueue(path, max_attempts=1)
    for _ in range(5):
        queue.enqueue(generate_uid(prefix="1.2.826.0.1.3680043.8.498.1234567890123456789012."), "adult-wrist",
                      "wrist_fracture", [generate_uid()])
    job = queue.claim()
    assert job is not None
    queue.mark_failed(job.id, "RuntimeError: " + "a long error message " * 20)
    _study_rows_for(path, queue)
    html = render_status_page(cfg)
    probe = html.replace("</body>", "<script>document.title = 'W=' + document.documentElement.scrollWidth;"
                         "</script></body>")
    page = tmp_path / "status.html"
    page.write_text(probe, encoding="utf-8")
    common = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--hide-scrollbars",
              "--window-size=1400,900", f"--user-data-dir={tmp_path / 'profile'}"]
    out = subprocess.run([*common, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    m = re.search(r"<title>W=(\d+)</title>", out.stdout)
    assert m, out.stdout[:500]
    assert int(m.group(1)) <= 1400, f"page is {m.group(1)} px wide at a 1400 px window"
    shot = tmp_path / "status.png"
    subprocess.run([*common, f"--screenshot={shot}", page.as_uri()], capture_output=True, timeout=120, check=True)
    assert shot.stat().st_size > 10_000
