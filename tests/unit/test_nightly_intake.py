"""Label intake: original UIDs -> archive pseudonyms, per-row error report, nothing deleted, AI feedback as labels."""

from __future__ import annotations

import json
from pathlib import Path

import pydicom
import pytest
import torch

from dicomnode.archive import TrainingArchive
from dicomnode.config import Route
from tests.unit.toy_adapter import ADAPTER, make_toy_data
from training.nightly.config import NightlyConfig, TaskSchedule
from training.nightly.intake import LabelStore, read_uid_map, run_intake
from training.nightly.job import run_task
from training.tasks import register_adapter

torch.set_num_threads(1)
register_adapter(ADAPTER)
TASK = "toy_square"


@pytest.fixture
def site(tmp_path: Path) -> dict:
    src = tmp_path / "pacs"
    rows = make_toy_data(src, n_patients=8, seed=2)
    arch = TrainingArchive(tmp_path / "archive", tmp_path / "keys", max_bytes=10**9)
    route = Route(name="toy", task=TASK, archive_for_training=True)
    sops = []
    for i in range(8):
        files = sorted((src / f"p{i:02d}").glob("*.dcm"))
        arch.archive_series(files, route)
        sops.append(str(pydicom.dcmread(files[0]).SOPInstanceUID))
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    return {"tmp": tmp_path, "rows": rows, "sops": sops, "incoming": incoming, "archive": arch}


def _lines(*objs: object) -> str:
    return "".join((o if isinstance(o, str) else json.dumps(o)) + "\n" for o in objs)


def test_rows_mapped_errors_reported_nothing_lost(site: dict) -> None:
    rows, sops, inc, t = site["rows"], site["sops"], site["incoming"], site["tmp"]
    (inc / "a.jsonl").write_text(_lines(
        {"study_uid": rows[0]["study_uid"], "patient_id": rows[0]["patient_id"], "label": 1},
        "{not json",
        {"study_uid": "1.2.3.999999", "label": 0},                                   # unknown study
        {"sop_instance_uid": sops[1], "label": 0,
         "boxes": [{"x0": 1, "y0": 1, "x1": 4, "y1": 4, "sop_instance_uid": sops[1]}]},
        {"kind": "ai_feedback", "study_uid": rows[2]["study_uid"], "decision": "accept", "ai_label": 1},
        {"kind": "ai_feedback", "study_uid": rows[3]["study_uid"], "decision": "reject", "ai_label": 1},
        {"kind": "ai_feedback", "study_uid": rows[4]["study_uid"], "decision": "reject", "ai_label": "grade 2"},
        {"label": 1},                                                                # no key
        {"study_uid": rows[5]["study_uid"], "label": 1, "split_hint": "sometimes"},   # invalid field
    ))
    (inc / "b.csv").write_text(f"study_uid,label\n{rows[6]['study_uid']},0\n{rows[7]['study_uid']},1,extra\n")
    (inc / "broken.csv").write_bytes(b"study_uid,label\n\xff\xfe\x00bad")
    (inc / "nokey.csv").write_text("accession,label\nA1,1\n")
    labels = t / "labels"
    rep = run_intake(inc, t / "archive", t / "keys", labels)

    errs = {(e["file"], e["row"]): e["error"] for e in rep.errors}
    assert set(errs) == {("a.jsonl", 2), ("a.jsonl", 3), ("a.jsonl", 7), ("a.jsonl", 8), ("a.jsonl", 9),
                         ("b.csv", 3)}
    assert "invalid JSON" in errs[("a.jsonl", 2)] and "unknown study UID" in errs[("a.jsonl", 3)]
    assert "corrected_label" in errs[("a.jsonl", 7)] and "split_hint" in errs[("a.jsonl", 9)]
    assert rep.accepted == {TASK: 5} and rep.feedback == {"accept": 1, "reject": 1}
    assert sorted(rep.files_processed) == ["a.jsonl", "b.csv"]
    assert {k["file"] for k in rep.files_kept} == {"broken.csv", "nokey.csv"}
    # unreadable files stay where they were; processed ones moved; rejected rows kept verbatim with the reason
    assert (inc / "broken.csv").exists() and (inc / "nokey.csv").exists() and not (inc / "a.jsonl").exists()
    assert len(list((inc / "processed").glob("*-a.jsonl"))) == 1
    rejected = [json.loads(x) for x in next((inc / "rejected").glob("a.jsonl.*")).read_text().splitlines()]
    assert [r["line"] for r in rejected] == [2, 3, 7, 8, 9] and rejected[0]["raw"] == "{not json"

    stored = {r["study_uid"]: r for r in LabelStore(labels).rows(TASK)}
    uid_map = read_uid_map(t / "keys")
    s0 = uid_map[("StudyInstanceUID", rows[0]["study_uid"])]
    assert stored[s0]["label"] == 1 and stored[s0]["patient_id"].startswith("PSN")
    assert stored[uid_map[("StudyInstanceUID", rows[2]["study_uid"])]]["label"] == 1
    assert stored[uid_map[("StudyInstanceUID", rows[3]["study_uid"])]]["label"] == 0  # rejected positive -> negative
    sop_row = next(r for r in stored.values() if r.get("sop_instance_uid"))
    assert sop_row["sop_instance_uid"] == uid_map[("SOPInstanceUID", sops[1])]
    assert sop_row["boxes"][0]["sop_instance_uid"] == sop_row["sop_instance_uid"]
    text = (labels / f"{TASK}.jsonl").read_text()
    assert not any(r["study_uid"] in text or r["patient_id"] in text for r in rows)

    # a corrected label later replaces the stored one instead of duplicating it
    (inc / "fix.jsonl").write_text(_lines({"study_uid": rows[0]["study_uid"], "label": 0}))
    rep2 = run_intake(inc, t / "archive", t / "keys", labels)
    assert rep2.accepted == {TASK: 1} and rep2.new_keys == {TASK: 0}
    assert {r["study_uid"]: r for r in LabelStore(labels).rows(TASK)}[s0]["label"] == 0


def test_bad_rows_do_not_stop_the_run(site: dict) -> None:
    rows, inc, t = site["rows"], site["incoming"], site["tmp"]
    (inc / "labels.jsonl").write_text(_lines(*[{"study_uid": r["study_uid"], "label": r["label"]} for r in rows],
                                             "garbage", {"study_uid": "1.2.3.4.5", "label": 1}))
    cfg = NightlyConfig(registry_dir=t / "models", archive_dir=t / "archive", key_dir=t / "keys",
                        incoming_labels_dir=inc, device="cpu",
                        tasks={TASK: TaskSchedule(mode="scratch", epochs=1, max_steps_per_epoch=2, batch_size=2,
                                                  train={"amp": False})})
    out = run_task(cfg, TASK, adapter=ADAPTER, stamp="r")
    assert out.status == "promoted" and out.reason == "no current model"
    report = json.loads((out.run_dir / "report.json").read_text())
    assert len(report["intake"]["errors"]) == 2 and report["data"]["rows_in_archive"] == 8
    assert "rejected rows: 2" in (out.run_dir / "report.md").read_text()
    # nothing new the next night: with min_new_labels the run is skipped, the registry untouched
    cfg2 = cfg.model_copy(update={"tasks": {TASK: TaskSchedule(min_new_labels=1)}})
    again = run_task(cfg2, TASK, adapter=ADAPTER, stamp="r2")
    assert again.status == "skipped" and "min_new_labels" in again.reason
