"""Spool: atomic, idempotent, header-only store with its SQLite index."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, RLELossless, generate_uid

from dicomnode.errors import InvalidDatasetError, OutOfResourcesError
from dicomnode.spool import Spool, StoreOutcome

CT = "1.2.840.10008.5.1.4.1.1.2"


def make_instance(study: str, series: str, *, rows: int = 16, frames: int | None = None,
                  images_in_acquisition: int | None = None, view: str | None = None, sop: str | None = None) -> bytes:
    """Encode a small CT instance in the DICOM File Format."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = CT
    ds.SOPInstanceUID = sop or generate_uid()
    ds.file_meta.MediaStorageSOPClassUID = CT
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = series
    ds.Modality = "CT"
    ds.BodyPartExamined = "KNEE"
    ds.PatientName = "Doe^Jane"
    ds.PatientID = "ID42"
    if view:
        ds.ViewPosition = view
    if images_in_acquisition:
        ds.ImagesInAcquisition = images_in_acquisition
    ds.Rows = ds.Columns = rows
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    n = 1
    if frames:
        ds.NumberOfFrames = frames
        n = frames
    ds.PixelData = bytes(range(256)) * (rows * rows * 2 * n // 256)
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()


@pytest.fixture
def spool(tmp_path: Path) -> Spool:
    return Spool(tmp_path / "var", disk_min_free_gb=0)


def test_store_is_atomic_and_byte_identical(spool: Spool) -> None:
    study, series = generate_uid(), generate_uid()
    data = make_instance(study, series)
    spool.open_association("a1", "PACS", "127.0.0.1")
    assert spool.store(data, assoc_id="a1") is StoreOutcome.STORED
    (inst,) = spool.instances(study)
    sop = pydicom.dcmread(io.BytesIO(data)).SOPInstanceUID
    assert inst.path == spool.root / study / series / f"{sop}.dcm"
    assert inst.path.read_bytes() == data
    assert inst.sop_class_uid == CT and inst.series_uid == series
    assert list(spool.tmp_dir.iterdir()) == []
    (rec,) = spool.series_records()
    assert rec.n_instances == 1 and rec.meta["modality"] == "CT" and rec.expected_count is None
    assert "ID42" not in str(rec.meta) and "Doe" not in str(rec.meta)
    assert rec.info().body_part == "KNEE"


def test_store_from_path_moves_the_file(spool: Spool, tmp_path: Path) -> None:
    study, series = generate_uid(), generate_uid()
    data = make_instance(study, series)
    src = spool.tmp_dir.parent / "incoming.dcm"  # same file system as the spool
    src.write_bytes(data)
    assert spool.store(src, assoc_id=None) is StoreOutcome.STORED
    assert not src.exists()
    (inst,) = spool.instances(study)
    assert inst.path.read_bytes() == data


def test_duplicate_sop_instance_is_stored_once(spool: Spool) -> None:
    study, series = generate_uid(), generate_uid()
    data = make_instance(study, series)
    assert spool.store(data, assoc_id=None) is StoreOutcome.STORED
    assert spool.store(data, assoc_id=None) is StoreOutcome.DUPLICATE
    assert len(spool.instances(study)) == 1
    assert spool.series_records()[0].n_instances == 1


def test_out_of_resources_when_disk_minimum_is_huge(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "var", disk_min_free_gb=1e9)
    assert not spool.disk_ok()
    with pytest.raises(OutOfResourcesError):
        spool.store(make_instance(generate_uid(), generate_uid()), assoc_id=None)
    assert spool.series_records() == []


def test_write_failure_is_out_of_resources_and_leaves_nothing(spool: Spool, monkeypatch: pytest.MonkeyPatch) -> None:
    def failing_replace(src: object, dst: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", failing_replace)
    study = generate_uid()
    with pytest.raises(OutOfResourcesError):
        spool.store(make_instance(study, generate_uid()), assoc_id=None)
    assert spool.instances(study) == [] and list(spool.tmp_dir.iterdir()) == []


@pytest.mark.parametrize("data", [b"", b"garbage" * 100, b"\x00" * 128 + b"DICM" + b"\xff" * 50])
def test_garbage_is_invalid(spool: Spool, data: bytes) -> None:
    with pytest.raises(InvalidDatasetError):
        spool.store(data, assoc_id=None)
    assert spool.series_records() == []


def test_truncated_pixel_data_is_invalid(spool: Spool) -> None:
    data = make_instance(generate_uid(), generate_uid(), rows=64)
    with pytest.raises(InvalidDatasetError, match="truncated"):
        spool.store(data[:-1000], assoc_id=None)


def test_truncated_encapsulated_pixel_data_is_invalid(spool: Spool) -> None:
    ds = pydicom.dcmread(io.BytesIO(make_instance(generate_uid(), generate_uid(), rows=32)))
    ds.compress(RLELossless, encoding_plugin="pydicom")
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    data = buf.getvalue()
    with pytest.raises(InvalidDatasetError, match="truncated"):
        spool.store(data[:-20], assoc_id=None)
    assert spool.store(data, assoc_id=None) is StoreOutcome.STORED


def test_missing_or_unsafe_uids_are_invalid(spool: Spool) -> None:
    with pydicom.config.disable_value_validation():
        unsafe = make_instance("../../etc", generate_uid())
    with pytest.raises(InvalidDatasetError):
        spool.store(unsafe, assoc_id=None)
    ds = pydicom.dcmread(io.BytesIO(make_instance(generate_uid(), generate_uid())))
    del ds.SeriesInstanceUID
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    with pytest.raises(InvalidDatasetError, match="SeriesInstanceUID"):
        spool.store(buf.getvalue(), assoc_id=None)
    assert not any(p for p in spool.root.iterdir() if p.name != ".tmp")


def test_expected_count_from_header_and_from_release(spool: Spool) -> None:
    study = generate_uid()
    announced, counted, aborted = generate_uid(), generate_uid(), generate_uid()
    spool.open_association("a1", "PACS", "127.0.0.1")
    spool.store(make_instance(study, announced, images_in_acquisition=3), assoc_id="a1")
    for _ in range(2):
        spool.store(make_instance(study, counted), assoc_id="a1")
    spool.open_association("a2", "PACS", "127.0.0.1")
    spool.store(make_instance(study, aborted), assoc_id="a2")
    assert spool.last_association_release(study) is None
    spool.release_association("a1")
    spool.abort_association("a2")
    recs = {r.series_uid: r for r in spool.series_records(study)}
    assert recs[announced].expected_count == 3
    assert recs[counted].expected_count == 2
    assert recs[aborted].expected_count is None
    released = spool.last_association_release(study)
    assert released is not None and released <= recs[counted].last_received + 60


def test_expected_count_waits_for_parallel_associations_and_follows_later_ones(spool: Spool) -> None:
    study, series = generate_uid(), generate_uid()
    spool.open_association("a1", "PACS", "127.0.0.1")
    spool.open_association("a2", "PACS", "127.0.0.1")
    spool.store(make_instance(study, series), assoc_id="a1")
    spool.store(make_instance(study, series), assoc_id="a2")
    spool.release_association("a1")
    assert spool.series_records(study)[0].expected_count is None  # a2 still sends this series
    spool.store(make_instance(study, series), assoc_id="a2")
    spool.release_association("a2")
    assert spool.series_records(study)[0].expected_count == 3
    spool.open_association("a3", "PACS", "127.0.0.1")  # a late association adds one more
    spool.store(make_instance(study, series), assoc_id="a3")
    spool.release_association("a3")
    assert spool.series_records(study)[0].expected_count == 4


def test_stale_associations_are_closed_at_start_up(spool: Spool) -> None:
    study, series = generate_uid(), generate_uid()
    spool.open_association("dead", "PACS", "127.0.0.1")  # its process was killed mid-association
    spool.store(make_instance(study, series), assoc_id="dead")
    assert spool.close_stale_associations() == 1
    spool.open_association("new", "PACS", "127.0.0.1")
    spool.store(make_instance(study, series), assoc_id="new")
    spool.release_association("new")
    assert spool.series_records(study)[0].expected_count == 2
    assert spool.close_stale_associations() == 0
    (spool.tmp_dir / "tmpabc.dcm").write_bytes(b"partial")
    assert spool.clean_tmp() == 1 and list(spool.tmp_dir.iterdir()) == []


def test_multiframe_expects_one_instance_and_counts_frames(spool: Spool) -> None:
    study, series = generate_uid(), generate_uid()
    spool.store(make_instance(study, series, frames=5), assoc_id=None)
    (rec,) = spool.series_records(study)
    assert rec.expected_count == 1 and rec.info().n_slices == 5


def test_view_positions_merge_across_instances(spool: Spool) -> None:
    study, series = generate_uid(), generate_uid()
    spool.store(make_instance(study, series, view="PA"), assoc_id=None)
    spool.store(make_instance(study, series, view="LAT"), assoc_id=None)
    (rec,) = spool.series_records(study)
    assert rec.n_instances == 2 and rec.info().view_positions == {"PA", "LAT"}


def test_queries_and_retention_delete(spool: Spool) -> None:
    import time

    s1, s2 = generate_uid(), generate_uid()
    spool.store(make_instance(s1, generate_uid()), assoc_id=None)
    mark = time.time()
    time.sleep(0.01)
    series2 = generate_uid()
    spool.store(make_instance(s2, series2), assoc_id=None)
    spool.store(make_instance(s2, generate_uid()), assoc_id=None)
    assert spool.studies_received_since(mark) == [s2]
    assert set(spool.studies_received_since(0)) == {s1, s2}
    assert len(spool.instances(s2)) == 2 and len(spool.instances(s2, series2)) == 1
    paths = [i.path for i in spool.instances(s2)]
    assert spool.delete_study(s2) == 2
    assert not any(p.exists() for p in paths) and not (spool.root / s2).exists()
    assert spool.instances(s2) == [] and [r.study_uid for r in spool.series_records()] == [s1]
    # a fresh Spool on the same directory sees the same index (schema is idempotent)
    again = Spool(spool.storage_dir, 0)
    assert [r.study_uid for r in again.series_records()] == [s1]


def test_store_batch_syncs_once_and_indexes_all(spool: Spool, monkeypatch: pytest.MonkeyPatch) -> None:
    """A batch: one file-system sync before one commit; duplicates (earlier or within) and garbage are reported."""
    import dicomnode.spool as spool_mod

    study, series = generate_uid(), generate_uid()
    first = make_instance(study, series)
    assert spool.store(first, assoc_id=None) is StoreOutcome.STORED
    fresh = [make_instance(study, series) for _ in range(3)]
    syncs: list[int] = []
    real = spool_mod._sync_filesystem

    def counting(root: Path, files: list[Path]) -> None:
        assert len(spool.instances(study)) == 1  # nothing of the batch is indexed before the sync
        syncs.append(len(files))
        real(root, files)

    monkeypatch.setattr(spool_mod, "_sync_filesystem", counting)
    spool.open_association("a1", "PACS", "127.0.0.1")
    out = spool.store_batch([(fresh[0], "a1"), (first, "a1"), (b"garbage", "a1"), (fresh[1], "a1"),
                             (fresh[1], "a1"), (fresh[2], None)])
    assert out[0] is StoreOutcome.STORED and out[1] is StoreOutcome.DUPLICATE
    assert isinstance(out[2], InvalidDatasetError)
    assert out[3:] == [StoreOutcome.STORED, StoreOutcome.DUPLICATE, StoreOutcome.STORED]
    assert syncs == [3]
    stored = {i.path.read_bytes() for i in spool.instances(study)}
    assert stored == {first, *fresh}
    assert spool.series_records()[0].n_instances == 4
    assert list(spool.tmp_dir.iterdir()) == []


def test_store_batch_sync_falls_back_to_fsync(spool: Spool, monkeypatch: pytest.MonkeyPatch) -> None:
    import dicomnode.spool as spool_mod
    import dicomnode.spool_sync as sync_mod

    monkeypatch.setattr(sync_mod, "_LIBC", None)  # no sync_file_range: every file and directory is fsynced
    fsynced: list[int] = []
    real_fsync = os.fsync
    monkeypatch.setattr(spool_mod.os, "fsync", lambda fd: (fsynced.append(fd), real_fsync(fd)))
    study, series = generate_uid(), generate_uid()
    out = spool.store_batch([(make_instance(study, series), None) for _ in range(2)])
    assert out == [StoreOutcome.STORED, StoreOutcome.STORED]
    assert len(fsynced) >= 2 + 2  # two files, their series and study directories, the spool root


def test_journal_backlog_reports_hold_quiet_completion_and_show_in_status(tmp_path: Path) -> None:
    from dicomnode.config import Config
    from dicomnode.status import status_text

    spool = Spool(tmp_path / "var", disk_min_free_gb=0)
    assert not spool.journal_busy()
    spool.set_journal_backlog("0.bin", 5)
    assert spool.journal_busy()
    assert not spool.journal_busy(now=__import__("time").time() + 60)  # a receiver that stopped reporting
    text = status_text(Config.model_validate({"node": {"storage_dir": str(tmp_path / "var")}}))
    assert "RECEIVE JOURNALS" in text and "0.bin  pending=5" in text
    spool.set_journal_backlog("0.bin", 0)
    assert not spool.journal_busy()
    spool.set_journal_backlog("1.bin", 2)
    spool.clear_journal_backlog()
    assert not spool.journal_busy()


def test_store_batch_sync_writes_only_its_files_and_commits_once(spool: Spool, monkeypatch: pytest.MonkeyPatch
                                                                ) -> None:
    """The batch sync writes its own files' data (sync_file_range: start all, then wait for each), then one
    commit through the spool root (changed, then fsynced); never syncfs, which writes every process's dirty pages."""
    import dicomnode.spool_sync as sync_mod

    real = sync_mod._LIBC
    assert real is not None  # Linux
    calls: list[tuple[str, int]] = []

    class Libc:
        def sync_file_range(self, fd: int, off: int, n: int, flags: int) -> int:
            calls.append(("sfr", flags))
            return real.sync_file_range(fd, off, n, flags)

        def syncfs(self, fd: int) -> int:  # pragma: no cover - must not be called
            calls.append(("syncfs", 0))
            return 0

    monkeypatch.setattr(sync_mod, "_LIBC", Libc())
    fsynced: list[str] = []
    real_fsync_path = sync_mod.fsync_path
    monkeypatch.setattr(sync_mod, "fsync_path", lambda p: (fsynced.append(str(p)), real_fsync_path(p)))
    study, series = generate_uid(), generate_uid()
    out = spool.store_batch([(make_instance(study, series), None) for _ in range(3)])
    assert out == [StoreOutcome.STORED] * 3
    assert calls == [("sfr", 2)] * 3 + [("sfr", 7)] * 3  # started for all, then waited for each
    assert fsynced[0] == str(spool.root)  # the commit, before the directories
    assert str(spool.root / study / series) in fsynced
    assert all(not f.endswith(".dcm") for f in fsynced)  # no per-file fsync
