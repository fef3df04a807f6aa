"""The persistent file index (digests, DICOM identifiers): reused across processes, never stale, harmless when damaged."""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest

from training import file_index as digests
from training.file_index import FileIndex, dicom_uids, file_digest


@pytest.fixture()
def counted(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Every file read to compute a digest (the in-memory digests are emptied first)."""
    reads: list[Path] = []
    real = digests._hash_file

    def spy(path: Path) -> str:
        reads.append(path)
        return real(path)

    monkeypatch.setattr(digests, "_MEMORY", {})
    monkeypatch.setattr(digests, "_hash_file", spy)
    return reads


def test_digest_is_sha256_and_the_index_answers_a_new_process(tmp_path, counted):
    f = tmp_path / "a.dcm"
    f.write_bytes(b"DICM" * 1000)
    index = FileIndex(tmp_path / "cache" / "d.sqlite")
    assert file_digest(f, index) == hashlib.sha256(b"DICM" * 1000).hexdigest()
    assert counted == [f] and index.count() == 1
    # another process with its own memory reads the digest from the index, not the file
    code = ("import sys; from training import file_index as digests\n"
            "digests._hash_file = lambda p: sys.exit('read the file')\n"
            f"print(digests.file_digest({str(f)!r}, digests.FileIndex({str(index.path)!r})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).parents[2])
    assert out.stdout.strip() == hashlib.sha256(b"DICM" * 1000).hexdigest()


def test_rewritten_file_gets_a_new_digest_even_with_the_old_size_and_mtime(tmp_path, counted):
    f = tmp_path / "a.dcm"
    f.write_bytes(b"A" * 64)
    index = FileIndex(tmp_path / "d.sqlite")
    old = file_digest(f, index)
    st = f.stat()
    f.write_bytes(b"B" * 64)  # same size
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))  # same mtime: only ctime tells
    digests._MEMORY.clear()
    new = file_digest(f, index)
    assert new == hashlib.sha256(b"B" * 64).hexdigest() != old
    assert index.count() == 1  # the stale entry of that path was replaced


def test_damaged_index_falls_back_to_reading_files(tmp_path, counted, caplog):
    f = tmp_path / "a.dcm"
    f.write_bytes(b"x" * 10)
    bad = tmp_path / "d.sqlite"
    bad.write_bytes(b"this is not an sqlite database" * 100)
    index = FileIndex(bad)
    with caplog.at_level(logging.WARNING, logger="training.file_index"):
        assert file_digest(f, index) == hashlib.sha256(b"x" * 10).hexdigest()
    assert "unusable" in caplog.text and counted == [f]
    assert bad.read_bytes().startswith(b"this is not")  # nothing overwritten


def test_index_pickles_without_its_connection(tmp_path, counted):
    f = tmp_path / "a.dcm"
    f.write_bytes(b"y")
    index = FileIndex(tmp_path / "d.sqlite")
    file_digest(f, index)
    clone = pickle.loads(pickle.dumps(index))
    digests._MEMORY.clear()
    assert file_digest(f, clone) == hashlib.sha256(b"y").hexdigest() and counted == [f]


def test_sample_cache_keys_record_their_file_digests(tmp_path, counted):
    from training.data import Record, SampleCache

    files = []
    for i in range(3):
        files.append(tmp_path / f"{i}.dcm")
        files[-1].write_bytes(bytes([i]) * 100)
    rec = Record(key="s1", patient_id="P1", study_uid="1.2.3", files=tuple(files), row={"label": 1})
    key = SampleCache(tmp_path / "cache").key(rec, "sig")
    assert len(counted) == 3
    digests._MEMORY.clear()
    again = SampleCache(tmp_path / "cache")  # a later run over the same cache: no file is read again
    assert again.key(rec, "sig") == key and len(counted) == 3 and again.file_index.count() == 3


def test_load_records_reads_no_header_twice_with_an_index(tmp_path, monkeypatch):
    """The second start-up over the same folder and index takes every file's identifiers from the index."""
    from training.data import load_records
    from training.synth.wrist_fracture import generate

    data = tmp_path / "data"
    generate(data, 3, 4, workers=1)
    (data / "notes.txt").write_text("not DICOM")
    reads: list[Path] = []
    real = digests._read_uids
    monkeypatch.setattr(digests, "_read_uids", lambda p: reads.append(p) or real(p))
    index = FileIndex(tmp_path / "cache" / "file_index.sqlite")
    first = load_records(data, index)
    n_files = len(reads)
    assert n_files >= 7 and index.count("uids") == n_files  # every DICOM file and the text file
    second = load_records(data, FileIndex(index.path))
    assert len(reads) == n_files  # nothing read again
    assert [(r.key, r.patient_id, r.study_uid, r.files) for r in second] == \
        [(r.key, r.patient_id, r.study_uid, r.files) for r in first]
    assert [(r.key, r.files) for r in load_records(data)] == [(r.key, r.files) for r in first]  # same without
    assert dicom_uids(data / "notes.txt", index) is None
