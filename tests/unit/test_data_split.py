"""Patient-level, deterministic, locked splits; manifest join; sample cache."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.unit.toy_adapter import make_toy_data, preprocess, write_ct
from training.data import (
    DataError,
    Record,
    RecordDataset,
    SampleCache,
    SplitConfig,
    assign_split,
    records_from_rows,
    split_records,
)


def _records(n_patients: int, per_patient: int = 3) -> list[Record]:
    return [Record(key=f"{p}-{i}", patient_id=f"P{p}", study_uid=f"{p}-{i}", files=())
            for p in range(n_patients) for i in range(per_patient)]


def test_no_patient_in_two_splits() -> None:
    split = split_records(_records(200))
    sets = [{r.patient_id for r in part} for part in (split.train, split.val, split.holdout)]
    assert not (sets[0] & sets[1]) and not (sets[0] & sets[2]) and not (sets[1] & sets[2])
    assert sum(len(s) for s in sets) == 200
    assert 0.05 < len(sets[2]) / 200 < 0.3  # roughly the requested 15 %


def test_split_is_deterministic_and_locked() -> None:
    a = split_records(_records(200))
    b = split_records(list(reversed(_records(200))))
    assert a.holdout_hash == b.holdout_hash
    more = split_records(_records(300))  # new patients never move old ones
    old_hold = {r.patient_id for r in a.holdout}
    assert old_hold == {r.patient_id for r in more.holdout if int(r.patient_id[1:]) < 200}
    assert assign_split("P1", SplitConfig()) == assign_split("P1", SplitConfig())
    other = split_records(_records(200), SplitConfig(salt="other"))
    assert other.holdout_hash != a.holdout_hash


def test_tiny_data_gets_every_split() -> None:
    split = split_records(_records(5), SplitConfig(train=0.6, val=0.2, holdout=0.2))
    assert split.train and split.val and split.holdout
    pats = [{r.patient_id for r in s} for s in (split.train, split.val, split.holdout)]
    assert sum(map(len, pats)) == 5 and len(set().union(*pats)) == 5


def test_fractions_must_sum_to_one() -> None:
    with pytest.raises(ValueError):
        SplitConfig(train=0.5, val=0.1, holdout=0.1)


def test_records_from_rows_and_cache(tmp_path: Path) -> None:
    rows = make_toy_data(tmp_path / "data", n_patients=4)
    recs = records_from_rows(rows, tmp_path / "data")
    assert [r.patient_id for r in recs] == ["PAT000", "PAT001", "PAT002", "PAT003"]
    assert all(len(r.files) == 1 and r.level == "study" for r in recs)
    with pytest.raises(DataError):
        records_from_rows([{"study_uid": "1.2.3.999", "label": 0}], tmp_path / "data")
    with pytest.raises(DataError):
        records_from_rows([{"label": 0}], tmp_path / "data")

    cache = SampleCache(tmp_path / "cache")
    calls: list[str] = []

    def counting(rec: Record):
        calls.append(rec.key)
        return preprocess(rec)

    ds = RecordDataset(recs, counting, "sig-1", cache=cache)
    assert len(ds) == 4 and len(calls) == 4
    item = ds[1]
    assert item["image"].shape == (1, 16, 16) and int(item["label"]) == 1 and int(item["record_index"]) == 1
    RecordDataset(recs, counting, "sig-1", cache=cache)
    assert len(calls) == 4 + 0  # second pass served from the on-disk cache
    RecordDataset(recs, counting, "sig-2", cache=cache)
    assert len(calls) == 8  # another pre-processing signature misses
    # changing the file content changes the key
    write_ct(recs[0].files[0], patient="PAT000", study_uid=recs[0].key, series_uid="1.2.3",
             pixels=np.zeros((16, 16)))
    RecordDataset(recs, counting, "sig-1", cache=cache)
    assert calls[-1] == recs[0].key and len(calls) == 9
    assert ds.labels() == [0, 1, 0, 1]


def test_worker_processes_preprocess(tmp_path: Path) -> None:
    rows = make_toy_data(tmp_path / "data", n_patients=4)
    recs = records_from_rows(rows, tmp_path / "data")
    ds = RecordDataset(recs, preprocess, "sig", cache=SampleCache(tmp_path / "c"), workers=2)
    serial = RecordDataset(recs, preprocess, "sig", cache=None)
    for i in range(4):
        assert np.array_equal(ds[i]["image"].numpy(), serial[i]["image"].numpy())


def test_split_hint_overrides_and_conflicts() -> None:
    recs = _records(50)
    forced = [Record(key=r.key, patient_id=r.patient_id, study_uid=r.study_uid, files=(),
                     row={"split_hint": "holdout"} if r.patient_id == "P7" else {}) for r in recs]
    split = split_records(forced)
    assert {r.key for r in split.holdout if r.patient_id == "P7"} == {"7-0", "7-1", "7-2"}
    bad = forced + [Record(key="x", patient_id="P7", study_uid="x", files=(), row={"split_hint": "train"})]
    with pytest.raises(DataError):
        split_records(bad)


def test_damaged_cache_entry_is_recomputed(tmp_path: Path) -> None:
    rows = make_toy_data(tmp_path / "data", n_patients=2)
    recs = records_from_rows(rows, tmp_path / "data")
    cache = SampleCache(tmp_path / "cache")
    RecordDataset(recs, preprocess, "sig", cache=cache)
    key = cache.key(recs[0], "sig")
    path = next((tmp_path / "cache").rglob(f"{key}.npz"))
    path.write_bytes(path.read_bytes()[:-20])  # torn write
    assert cache.get(key) is None and not path.exists()
    ds = RecordDataset(recs, preprocess, "sig", cache=cache)
    assert ds[0]["image"].shape == (1, 16, 16) and path.exists()
