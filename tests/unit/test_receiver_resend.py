"""Re-sends: the same data set is stored once; different content under a stored SOP Instance UID replaces it
(or is ignored with ``resend_policy: keep_first``) and re-opens the study for reprocessing."""

from __future__ import annotations

import io
import logging
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid

from dicomnode.assembler import Assembler
from dicomnode.config import Config
from dicomnode.jobs import JobQueue
from dicomnode.spool import Spool, StoreOutcome
from tests.unit.test_spool import make_instance


def _renamed(data: bytes, name: str) -> bytes:
    ds = pydicom.dcmread(io.BytesIO(data))
    ds.PatientName = name
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _name_of(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).PatientName)


@pytest.mark.parametrize("batch", [False, True])
def test_corrected_resend_replaces_the_stored_copy(tmp_path: Path, batch: bool,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    spool = Spool(tmp_path / "var", 0)
    study, series, sop = generate_uid(), generate_uid(), generate_uid()
    first = make_instance(study, series, sop=sop)
    fixed = _renamed(first, "Corrected^Name")

    def store(data: bytes) -> StoreOutcome:
        if batch:
            (out,) = spool.store_batch([(data, "a1")])
            assert isinstance(out, StoreOutcome)
            return out
        return spool.store(data, assoc_id="a1")

    assert store(first) is StoreOutcome.STORED
    (old,) = spool.instances(study)
    assert store(first) is StoreOutcome.DUPLICATE  # same content: stored once
    with caplog.at_level(logging.INFO, logger="dicomnode.spool"):
        assert store(fixed) is StoreOutcome.REPLACED
    (new,) = spool.instances(study)
    assert new.sop_instance_uid == sop and _name_of(new.path) == "Corrected^Name"
    assert not old.path.exists() and new.path.exists()
    (rec,) = spool.series_records(study)
    assert rec.n_instances == 1 and rec.last_received >= new.received_at
    assert "re-sent with different content" in caplog.text
    assert "Corrected" not in caplog.text and "Doe" not in caplog.text  # no PHI in the log
    assert store(fixed) is StoreOutcome.DUPLICATE  # the corrected copy again: nothing to do


def test_keep_first_policy_ignores_a_different_resend(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "var", 0, resend_policy="keep_first")
    study, series, sop = generate_uid(), generate_uid(), generate_uid()
    first = make_instance(study, series, sop=sop)
    assert spool.store(first, assoc_id=None) is StoreOutcome.STORED
    assert spool.store(_renamed(first, "Other^Name"), assoc_id=None) is StoreOutcome.RESEND_IGNORED
    (inst,) = spool.instances(study)
    assert _name_of(inst.path) == "Doe^Jane"


def test_resend_moving_the_instance_to_another_series(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "var", 0)
    study, s1, s2, sop = generate_uid(), generate_uid(), generate_uid(), generate_uid()
    spool.store(make_instance(study, s1, sop=sop), assoc_id=None)
    spool.store(make_instance(study, s1), assoc_id=None)
    assert spool.store(make_instance(study, s2, sop=sop), assoc_id=None) is StoreOutcome.REPLACED
    counts = {r.series_uid: r.n_instances for r in spool.series_records(study)}
    assert counts == {s1: 1, s2: 1}
    spool.store(make_instance(study, s1, sop=sop), assoc_id=None)  # and back: s2 is now empty and gone
    assert {r.series_uid: r.n_instances for r in spool.series_records(study)} == {s1: 2}


def test_replacement_reopens_a_processed_study(tmp_path: Path) -> None:
    """The assembler treats a replaced instance like a late one: next generation, new jobs."""
    cfg = Config.model_validate({"node": {"storage_dir": str(tmp_path / "var")},
                                 "routes": [{"name": "r", "task": "t", "match": {"modality": ["CT"]},
                                             "complete_after_s": 0}]})
    spool = Spool(cfg.node.storage_dir, 0)
    queue = JobQueue(spool.db_path)
    asm = Assembler(cfg, spool, queue)
    study, series, sop = generate_uid(), generate_uid(), generate_uid()
    first = make_instance(study, series, sop=sop)
    spool.store(first, assoc_id=None)
    assert asm.poll_once() == [study]
    state = asm.study(study)
    assert state is not None and state.generation == 1
    assert spool.store(first, assoc_id=None) is StoreOutcome.DUPLICATE
    assert asm.poll_once() == []  # a duplicate does not reprocess
    assert spool.store(_renamed(first, "Fixed^Name"), assoc_id=None) is StoreOutcome.REPLACED
    assert asm.poll_once() == [study]
    state = asm.study(study)
    assert state is not None and state.generation == 2
    assert sorted(j.generation for j in queue.list(study_uid=study)) == [1, 2]
