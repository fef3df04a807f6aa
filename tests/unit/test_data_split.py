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


def _three_slices(rec: Record) -> list[dict[str, object]]:
    base = preprocess(rec)[0]
    return [{"image": base["image"] + k, "label": (int(base["label"]) + k) % 2, "slice": k} for k in range(3)]


class CountingCache(SampleCache):
    """Records which reads the dataset makes: (whole entry or sample index, fields)."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.reads: list[tuple[int | None, tuple[str, ...] | None]] = []

    def _read(self, key: str, index: int | None, fields: object) -> object:
        self.reads.append((index, None if fields is None else tuple(fields)))  # type: ignore[arg-type]
        return super()._read(key, index, fields)  # type: ignore[arg-type]


def test_cache_reads_one_sample_or_one_field(tmp_path: Path) -> None:
    recs = records_from_rows(make_toy_data(tmp_path / "data", n_patients=3), tmp_path / "data")
    cache = CountingCache(tmp_path / "cache")
    key = cache.key(recs[0], "s")
    cache.put(key, _three_slices(recs[0]))
    whole = cache.get(key)
    assert whole is not None and len(whole) == 3
    one = cache.get_one(key, 2)
    assert one is not None and set(one) == {"image", "label", "slice"} and one["slice"] == 2
    assert np.array_equal(one["image"], whole[2]["image"])
    assert cache.get_one(key, 1, ("label",)) == {"label": whole[1]["label"]}
    assert cache.get(key, fields=()) == [{}, {}, {}]
    # a sample index the entry does not hold means the entry is not what the index expects: dropped
    assert cache.get_one(key, 7) is None and cache.get(key) is None

    ds = RecordDataset(recs, _three_slices, "s", cache=cache)
    assert len(ds) == 9 and all(fields == () for _, fields in cache.reads[-3:])  # start-up reads counts only
    cache.reads.clear()
    assert ds.labels() == [s["label"] for r in recs for s in _three_slices(r)]
    assert cache.reads == [(None, ("label",))] * 3  # one read per record, the label field only
    cache.reads.clear()
    shuffled = [4, 0, 8, 3, 7, 1]
    items = [ds[i] for i in shuffled]
    assert cache.reads == [(i % 3, None) for i in [1, 0, 2, 0, 1, 1]]  # one sample each, never a whole entry
    assert [int(it["slice"]) for it in items] == [i % 3 for i in shuffled]
    assert [int(it["record_index"]) for it in items] == [i // 3 for i in shuffled]
    cache.reads.clear()
    for i in range(len(ds)):  # evaluation order: each record's entry is read once, as a whole
        assert int(ds[i]["slice"]) == i % 3
    assert [index for index, _ in cache.reads] == [0, None, 0, None, 0, None]


def test_cache_entry_removed_after_start_up_is_recomputed(tmp_path: Path) -> None:
    recs = records_from_rows(make_toy_data(tmp_path / "data", n_patients=2), tmp_path / "data")
    cache = SampleCache(tmp_path / "cache")
    ds = RecordDataset(recs, _three_slices, "s", cache=cache)
    for p in (tmp_path / "cache").rglob("*.npz"):
        p.unlink()
    assert int(ds[4]["slice"]) == 1 and ds.labels() == [s["label"] for r in recs for s in _three_slices(r)]
    assert len(list((tmp_path / "cache").rglob("*.npz"))) == 2


_AFTER_TORCH = """
import torch, torch.nn.functional as F
from training.data import Record, RecordDataset

def warp(record):  # a pre-processing step with a parallel torch kernel, like the radiograph warp
    x = torch.rand(1, 1, 384, 384)
    g = torch.rand(1, 384, 384, 2) * 2 - 1
    return [{"image": F.grid_sample(x, g, align_corners=False).numpy(), "label": 0}]

if __name__ == "__main__":
    torch.set_num_threads(2)
    warp(None)  # the parent has run a parallel region (one training epoch, in the hung run)
    recs = [Record(key=str(i), patient_id=str(i), study_uid=str(i), files=()) for i in range(6)]
    ds = RecordDataset(recs, warp, "sig", workers=2)
    print("prepared", len(ds))
"""


def test_preprocessing_processes_do_not_hang_after_torch_ran_in_the_parent(tmp_path: Path) -> None:
    """Forked children inherit OpenMP state; without the single-thread initializer this deadlocks."""
    import subprocess
    import sys

    script = tmp_path / "after_torch.py"
    script.write_text(_AFTER_TORCH)
    root = Path(__file__).resolve().parents[2]
    run = subprocess.run([sys.executable, str(script)], cwd=root, capture_output=True, text=True, timeout=120,
                         env={**__import__("os").environ, "PYTHONPATH": str(root)})
    assert run.returncode == 0 and "prepared 6" in run.stdout, run.stderr[-2000:]
