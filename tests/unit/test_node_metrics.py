"""dicomnode.metrics: retries, rejections and failures, the database gauges, and hooks that never raise."""

from __future__ import annotations

import time
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from dicomnode import metrics
from dicomnode.jobs import JobQueue
from dicomnode.metrics import NodeMetrics
from dicomnode.outbox import Outbox
from dicomnode.spool import Spool
from dicomnode.store import connection as db


def _samples(m: NodeMetrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(m.exposition().decode()) for s in f.samples}


def test_failures_retries_and_rejections_are_counted() -> None:
    m = NodeMetrics()
    m.delivery_failed("pacs", "pending")
    m.delivery_failed("pacs", "pending")
    m.delivery_failed("pacs", "dead")
    m.instance_rejected("invalid_dataset")
    m.instance_stored(duplicate=True)
    m.job_failed("wrist_fracture")
    s = _samples(m)
    assert s[("dicomnode_deliveries_attempted_total", (("destination", "pacs"), ("outcome", "failed")))] == 3
    assert s[("dicomnode_delivery_retries_total", (("destination", "pacs"),))] == 2  # the dead one is not retried
    assert s[("dicomnode_instances_rejected_total", (("reason", "invalid_dataset"),))] == 1
    assert s[("dicomnode_instances_received_total", (("outcome", "duplicate"),))] == 1
    assert s[("dicomnode_jobs_finished_total", (("outcome", "failed"), ("task", "wrist_fracture")))] == 1


def test_database_gauges_and_latencies(tmp_path: Path) -> None:
    storage = tmp_path / "var"
    m = NodeMetrics()
    m.attach_database(storage)
    assert not any(k[0] == "dicomnode_studies" for k in _samples(m))  # no database yet: no gauge samples, no error
    Spool(storage, 0)
    queue = JobQueue(db.db_path(storage))
    outbox = Outbox(storage)
    conn = db.connect(db.db_path(storage))
    now = time.time()
    conn.execute("INSERT INTO series (series_uid, study_uid, meta_json, n_instances, first_received, last_received)"
                 " VALUES ('1.2.3.1', '1.2.3', '{}', 1, ?, ?)", (now - 10, now - 8))
    conn.execute("INSERT INTO studies (study_uid, state, completed_at) VALUES ('1.2.3', 'processed', ?)", (now - 6,))
    job_id = queue.enqueue("1.2.3", "r", "wrist_fracture", ["1.2.3.1"], conn=conn)
    job = queue.claim()
    assert job is not None and job.id == job_id
    queue.mark_done(job_id, timings={}, model_version="wrist 1.0", conn=conn)
    outbox.add(conn, [storage / "outbox" / "a.dcm"], ["pacs"], job_id=job_id, study_uid="1.2.3", sop_uids=["9.9"])
    m.job_done(conn, job_id)
    m.delivery_sent(conn, "pacs", job_id)  # the delivery is still pending: no delivery latency yet
    s = _samples(m)
    lbl = (("model_version", "wrist 1.0"),)
    key = lambda stage: ("dicomnode_stage_latency_seconds_count",  # noqa: E731
                         (*lbl, ("stage", stage), ("task", "wrist_fracture")))
    assert s[key("receive_to_complete")] == 1 and s[key("complete_to_inference")] == 1
    assert key("receive_to_delivered") not in s or s[key("receive_to_delivered")] == 0
    rtc = s[("dicomnode_stage_latency_seconds_sum", (*lbl, ("stage", "receive_to_complete"), ("task", "wrist_fracture")))]
    assert 3.5 < rtc < 4.5  # completed 4 s after the first instance
    conn.execute("UPDATE deliveries SET state='sent'")
    m.delivery_sent(conn, "pacs", job_id)
    s = _samples(m)
    assert s[key("receive_to_delivered")] == 1 and s[key("inference_to_delivered")] == 1
    assert s[("dicomnode_studies", (("state", "processed"),))] == 1
    assert s[("dicomnode_jobs", (("state", "done"), ("task", "wrist_fracture")))] == 1
    assert s[("dicomnode_deliveries", (("destination", "pacs"), ("state", "sent")))] == 1
    conn.close()


def test_hooks_never_raise() -> None:
    """A broken call is logged at debug level, never raised into the pipeline."""
    metrics.job_done(None, 1)  # type: ignore[arg-type]
    metrics.delivery_sent(None, "pacs", 1)  # type: ignore[arg-type]
    metrics.instance_stored(None)  # type: ignore[arg-type]


def test_hooks_reach_the_process_metrics() -> None:
    """Each hook function updates the process's metrics (no dispatch by name)."""
    m = metrics.default_metrics()
    before = _samples(m).get(("dicomnode_instances_rejected_total", (("reason", "hook_test"),)), 0.0)
    metrics.instance_rejected("hook_test")
    metrics.delivery_failed("hook_dest", "pending")
    metrics.job_failed("hook_task")
    s = _samples(m)
    assert s[("dicomnode_instances_rejected_total", (("reason", "hook_test"),))] == before + 1
    assert s[("dicomnode_delivery_retries_total", (("destination", "hook_dest"),))] >= 1
    assert s[("dicomnode_jobs_finished_total", (("outcome", "failed"), ("task", "hook_task")))] >= 1
