"""Metrics, health checks and the status page of a node that processed studies sent by a real Orthanc."""

from __future__ import annotations

import io
import json
import re
import shutil
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import pydicom
import pytest
import yaml
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from dicomnode.config import Config
from dicomnode.http import StatusServer
from dicomnode.metrics import STAGES, NodeMetrics
from tests.conftest import free_port
from tests.integration.conftest import NodeProcess, wait_for
from tests.orthanc import OrthancServer
from tests.plugins.bone_test_task import write_study

pytestmark = pytest.mark.integration

CHROMIUM = "/usr/bin/chromium"
N_STUDIES = 3
N_IMAGES = 2
RESULTS_PER_STUDY = 2  # SR + SC from the test task


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=30) as resp:  # noqa: S310 - loopback test server
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def _answers(url: str) -> bool:
    """True once the status server answers 200 (it starts a moment after the node process)."""
    try:
        return _get(url)[0] == 200
    except urllib.error.URLError:
        return False


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _value(samples: dict, name: str, **labels: str) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


def _enable_http(node: NodeProcess) -> int:
    port = free_port()
    cfg = yaml.safe_load(node.config_path.read_text(encoding="utf-8"))
    cfg["node"]["status_http_port"] = port
    node.config_path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return port


def _dump_dom(url: str, tmp_path: Path) -> str:
    out = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={tmp_path / 'chromium-profile'}", "--dump-dom", url],
        capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_metrics_health_and_status_page(tmp_path: Path,
                                        node_with_orthanc: tuple[NodeProcess, OrthancServer]) -> None:
    node, pacs = node_with_orthanc
    http_port = _enable_http(node)
    node.start()
    base = f"http://127.0.0.1:{http_port}"
    wait_for(lambda: _answers(f"{base}/healthz"), 30, "/healthz")
    status, body = _get(f"{base}/readyz")
    assert status == 200, body
    ready = json.loads(body)
    assert ready["ready"] is True and ready["database"] == "ok" and ready["receivers"] == "ok"

    study_uids = []
    for i in range(N_STUDIES):
        folder = tmp_path / f"study{i}"
        study_uid, _ = write_study(folder, n_series=1, n_images=N_IMAGES, seed=i)
        study_uids.append(study_uid)
        pacs.upload_dir(folder)
        pacs.store_to_modality("node", [pacs.study_id(study_uid)])

    n_results = N_STUDIES * RESULTS_PER_STUDY
    wait_for(lambda: len(node.query("SELECT 1 FROM deliveries WHERE state='sent'")) == n_results, 120,
             "every result delivered")
    for uid in study_uids:
        assert len(pacs.instances_in_study(uid)) == N_IMAGES + RESULTS_PER_STUDY

    status, body = _get(f"{base}/metrics")
    assert status == 200
    s = _samples(body.decode())
    assert _value(s, "dicomnode_instances_received_total", outcome="stored") == N_STUDIES * N_IMAGES
    assert _value(s, "dicomnode_instances_received_total", outcome="duplicate") in (None, 0.0)
    assert _value(s, "dicomnode_jobs_finished_total", task="test_task", outcome="done") == N_STUDIES
    assert _value(s, "dicomnode_studies_completed_total", task="test_task") == N_STUDIES
    assert _value(s, "dicomnode_deliveries_attempted_total", destination="pacs", outcome="sent") == n_results
    assert _value(s, "dicomnode_studies", state="processed") == N_STUDIES
    assert _value(s, "dicomnode_jobs", task="test_task", state="done") == N_STUDIES
    assert _value(s, "dicomnode_deliveries", destination="pacs", state="sent") == n_results
    version = "bone test task 1.0"
    for stage in STAGES:
        labels = {"stage": stage, "task": "test_task", "model_version": version}
        assert _value(s, "dicomnode_stage_latency_seconds_count", **labels) == N_STUDIES, stage
        assert _value(s, "dicomnode_stage_latency_seconds_bucket", le="+Inf", **labels) == N_STUDIES, stage
        total = _value(s, "dicomnode_stage_latency_seconds_sum", **labels)
        assert total is not None and total >= 0.0
    assert _value(s, "dicomnode_stage_latency_seconds_sum", stage="receive_to_complete", task="test_task",
                  model_version=version) > 0.0
    whole = _value(s, "dicomnode_stage_latency_seconds_sum", stage="receive_to_delivered", task="test_task",
                   model_version=version)
    parts = sum(_value(s, "dicomnode_stage_latency_seconds_sum", stage=st, task="test_task", model_version=version)
                for st in ("receive_to_complete", "complete_to_inference", "inference_to_delivered"))
    assert whole == pytest.approx(parts, abs=0.5 * N_STUDIES)

    status, page = _get(f"{base}/")
    assert status == 200
    html_text = page.decode()
    assert "TST001" not in html_text and "TEST^NODE" not in html_text  # no patient identifiers
    hrefs = sorted(set(re.findall(r'href="(/overlay/\d+\.png)"', html_text)))
    assert len(hrefs) == N_STUDIES  # one SC overlay per study (the SR is not rendered)
    status, png = _get(base + hrefs[0])
    assert status == 200
    img = Image.open(io.BytesIO(png))
    assert img.format == "PNG" and img.size[0] > 0
    assert _get(f"{base}/overlay/999999.png")[0] == 404
    assert _get(f"{base}/nope")[0] == 404

    if not Path(CHROMIUM).exists():
        pytest.skip("Debian chromium is not installed (scripts/bootstrap.sh installs it); DOM check skipped")
    dom = _dump_dom(f"{base}/", tmp_path)
    for uid in study_uids:
        assert uid in dom
    assert dom.count('class="job-state">done<') == N_STUDIES
    assert dom.count('class="model">bone test task 1.0<') == N_STUDIES
    assert dom.count('class="overlay"') == N_STUDIES
    assert "processed: 3" in dom


def test_readyz_reports_low_disk_and_escapes_html(tmp_path: Path) -> None:
    from dicomnode.spool import Spool

    storage = tmp_path / "var"
    Spool(storage, 0)  # creates the database
    cfg = Config.model_validate({"node": {"storage_dir": str(storage), "disk_min_free_gb": 1e9,
                                          "ae_title": "A<B>&", "status_http_port": 0}})
    server = StatusServer(cfg, receivers_alive=lambda: False, metrics=NodeMetrics()).start()
    try:
        base = f"http://127.0.0.1:{server.port}"
        status, body = _get(f"{base}/readyz")
        assert status == 503
        checks = json.loads(body)
        assert checks["ready"] is False and checks["disk"] == "low" and checks["receivers"] == "stopped"
        assert checks["database"] == "ok"
        status, page = _get(f"{base}/")
        assert status == 200 and b"A&lt;B&gt;&amp;" in page and b"A<B>" not in page
        status, metrics = _get(f"{base}/metrics")
        assert status == 200 and b"dicomnode_stage_latency_seconds" in metrics
    finally:
        server.stop()


def test_overlay_route_refuses_files_outside_storage(tmp_path: Path) -> None:
    from dicomnode.http import render_overlay_png
    from dicomnode.outbox import Outbox
    from dicomnode.store import connection as db

    storage = tmp_path / "var"
    outbox = Outbox(storage)
    cfg = Config.model_validate({"node": {"storage_dir": str(storage)}})
    outside = tmp_path / "outside.dcm"
    ds = pydicom.Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.SOPInstanceUID = "1.2.3"
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    ds.save_as(outside, enforce_file_format=True)
    conn = db.connect(outbox.db_path)
    conn.execute("INSERT INTO deliveries (job_id, sop_instance_uid, path, destination, created_at)"
                 " VALUES (1, '1.2.3', '../outside.dcm', 'pacs', 0)")
    conn.close()
    shutil.copy(outside, storage / "inside-copy.dcm")
    with pytest.raises(KeyError):
        render_overlay_png(cfg, 1)
