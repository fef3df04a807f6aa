"""inference.fsutil.atomic_write (the one atomic-write helper) and a failed promotion write in the registry."""

from __future__ import annotations

import errno
import logging
from pathlib import Path

import pytest

from inference import fsutil
from inference.fsutil import atomic_write, atomic_write_bytes, atomic_write_text
from inference.registry import ModelRegistry
from tests.unit.test_registry import _bundle


def test_atomic_write_replaces_and_leaves_no_temporary(tmp_path: Path) -> None:
    p = tmp_path / "state.json"
    atomic_write_text(p, "one")
    atomic_write_bytes(p, b"two")
    assert p.read_text() == "two" and [x.name for x in tmp_path.iterdir()] == ["state.json"]


def test_failed_write_keeps_the_old_file_and_raises(tmp_path: Path) -> None:
    p = tmp_path / "labels.jsonl"
    atomic_write_text(p, "old\n")

    def half(fh) -> None:
        fh.write(b"new, torn")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError, match="No space"):
        atomic_write(p, half)
    assert p.read_text() == "old\n" and [x.name for x in tmp_path.iterdir()] == ["labels.jsonl"]


def test_durable_write_syncs_file_and_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[int] = []
    real = fsutil.os.fsync
    monkeypatch.setattr(fsutil.os, "fsync", lambda fd: (synced.append(fd), real(fd)))
    atomic_write_text(tmp_path / "a", "x")
    assert len(synced) == 2  # the data, then the folder entry
    synced.clear()
    atomic_write(tmp_path / "b", lambda fh: fh.write(b"x"), durable=False)
    assert synced == []


def test_failed_promotion_write_is_raised_not_logged_as_done(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    reg = ModelRegistry(tmp_path / "models")
    reg.promote("toy", _bundle(tmp_path, "1", 1.0))
    real_replace = fsutil.os.replace

    def full_disk(src, dst) -> None:
        if Path(dst).name == "current":
            raise OSError(errno.ENOSPC, "No space left on device")
        real_replace(src, dst)

    monkeypatch.setattr(fsutil.os, "replace", full_disk)
    caplog.set_level(logging.INFO, logger="inference.registry")
    with pytest.raises(OSError, match="No space"):
        reg.promote("toy", _bundle(tmp_path, "2", 2.0))
    assert reg.current("toy") == "1"
    assert not any("now uses model version 2" in r.getMessage() for r in caplog.records)
    assert not [p for p in (tmp_path / "models" / "toy").iterdir() if p.name.startswith(".current")]


def test_walk_files_sorted_recursive_without_hidden(tmp_path: Path) -> None:
    from inference.fsutil import walk_files

    for rel in ("b/2.dcm", "a/1.dcm", "a/.hidden", "c/d/3.dcm", ".DS_Store"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    assert [p.relative_to(tmp_path).as_posix() for p in walk_files(tmp_path)] == ["a/1.dcm", "b/2.dcm", "c/d/3.dcm"]


def test_ages() -> None:
    from datetime import date

    from inference.ages import age_in_years, age_string

    assert age_in_years(date(2000, 2, 29), date(2018, 3, 1)) == 18.0
    assert age_in_years(date(2010, 1, 1), date(2009, 1, 1)) is None
    assert [age_string(y) for y in (62.9, 1.0, 0.25, 0.05, 0.002, 1200)] == ["062Y", "001Y", "003M", "002W", "001D",
                                                                              "999Y"]


def test_replace_dir_swaps_a_folder_durably(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from inference.fsutil import replace_dir

    dest = tmp_path / "series"
    dest.mkdir()
    (dest / "old.dcm").write_bytes(b"old")
    tmp = tmp_path / ".series.tmp"
    (tmp / "sub").mkdir(parents=True)
    (tmp / "new.dcm").write_bytes(b"new")
    (tmp / "sub" / "x").write_bytes(b"x")
    synced: list[str] = []
    real = fsutil.fsync_path
    monkeypatch.setattr(fsutil, "fsync_path", lambda p: (synced.append(Path(p).name), real(p)))
    replace_dir(tmp, dest)
    assert sorted(p.name for p in dest.iterdir()) == ["new.dcm", "sub"]
    assert [p.name for p in tmp_path.iterdir()] == ["series"]  # no temporary or moved-aside folder left
    assert {"new.dcm", "x", ".series.tmp", "sub"} <= set(synced) and synced[-1] == tmp_path.name
