"""De-identified training archive: PS3.15 basic profile, consistent pseudonyms, key file mode, size cap, worker hook."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import generate_uid

from dicomnode.archive import KEY_FILE, UID_MAP, ArchiveError, TrainingArchive, archive_series
from dicomnode.config import Config, Route
from tests.unit.toy_adapter import write_ct

NAME, PID, BIRTH = "Doe^Johnathan", "MRN7788991", "19611023"
PRIVATE_SECRET = "SECRET-PRIVATE-PAYLOAD"


def _study(root: Path, *, pid: str = PID, name: str = NAME, n: int = 2, study_date: str = "20240315") -> list[Path]:
    study, series = generate_uid(), generate_uid()
    paths = []
    for i in range(n):
        p = write_ct(root / study / f"{i}.dcm", patient=pid, study_uid=study, series_uid=series,
                     pixels=np.zeros((8, 8)), instance=i + 1, position_z=float(i))
        ds = pydicom.dcmread(p)
        ds.PatientName = name
        ds.PatientBirthDate = BIRTH
        ds.StudyDate = ds.SeriesDate = study_date
        ds.AcquisitionDateTime = study_date + "101500"
        ds.AccessionNumber = "ACC123456"
        ds.InstitutionName = "St Example Hospital"
        ds.ReferringPhysicianName = "Who^Doctor"
        ds.OtherPatientIDs = "OTHER-" + pid
        ds.ImageComments = f"patient {name} id {pid}"
        ds.SeriesDescription = f"wrist {pid}"
        ds.BodyPartExamined = "WRIST"
        ds.FrameOfReferenceUID = generate_uid()
        # free text quoting a UID (Comments on the Performed Procedure Step, ST: in no removal list)
        ds.add_new(0x00400280, "ST", f"see {ds.SOPInstanceUID}")
        ref = Dataset()
        ref.ReferencedSOPClassUID = ds.SOPClassUID
        ref.ReferencedSOPInstanceUID = generate_uid()
        nested = Dataset()
        nested.PatientID = pid
        nested.PersonName = name
        ref.ReferencedPatientSequence = Sequence([nested])
        ds.ReferencedImageSequence = Sequence([ref])
        block = ds.private_block(0x0011, "ACME 1.0", create=True)
        block.add_new(0x01, "LO", PRIVATE_SECRET)
        block.add_new(0x02, "UI", generate_uid())
        ds.save_as(p, enforce_file_format=True)
        paths.append(p)
    return paths


def _originals(paths: list[Path]) -> set[str]:
    """Every non-standard UID plus the identifying strings of the source files."""
    found: set[str] = {NAME, PID, BIRTH, "ACC123456", "St Example Hospital", PRIVATE_SECRET, "Johnathan"}

    def walk(ds: Dataset) -> None:
        for elem in ds:
            if elem.VR == "SQ":
                for item in elem.value:
                    walk(item)
            elif elem.VR == "UI" and elem.value and not str(elem.value).startswith("1.2.840.10008."):
                if elem.keyword != "ImplementationClassUID":
                    found.add(str(elem.value))

    for p in paths:
        ds = pydicom.dcmread(p)
        walk(ds)
        walk(ds.file_meta)
    return found


def _all_values(ds: Dataset) -> list[str]:
    out = []
    for elem in ds:
        if elem.VR == "SQ":
            for item in elem.value:
                out.extend(_all_values(item))
        else:
            out.append(str(elem.value))
    return out


@pytest.fixture
def archive(tmp_path: Path) -> TrainingArchive:
    return TrainingArchive(tmp_path / "archive", tmp_path / "keys", max_bytes=10**9)


ROUTE = Route(name="wrist", task="toy_square", archive_for_training=True)


def test_no_identifier_survives_anywhere(tmp_path: Path, archive: TrainingArchive) -> None:
    src = _study(tmp_path / "in")
    originals = _originals(src)
    [entry] = archive.archive_series(src, ROUTE)
    files = sorted(entry.directory.glob("*.dcm"))
    assert len(files) == 2
    for f in files:
        raw = f.read_bytes()
        for o in originals:
            assert o.encode() not in raw, f"{o!r} survived in {f.name}"
        ds = pydicom.dcmread(f)
        values = _all_values(ds) + _all_values(ds.file_meta)
        for o in originals:
            assert not any(o in v for v in values), o
        assert not any(e.tag.is_private for e in ds.iterall())
        assert ds.PatientIdentityRemoved == "YES" and ds.PatientBirthDate == ""
        assert ds.PatientAge == "062Y"  # kept from BirthDate/StudyDate before the birth date was removed
        assert ds.StudyDate != "20240315" and len(ds.StudyDate) == 8
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert ds.SOPClassUID == pydicom.dcmread(src[0]).SOPClassUID  # standard UIDs kept
        assert ds.BodyPartExamined == "WRIST" and "SeriesDescription" not in ds  # descriptor naming the patient dropped
        assert ds.pixel_array.shape == (8, 8)
        assert (0x0040, 0x0280) not in ds
    # nothing under the archive folder holds an original identifier, sidecars included
    for f in archive.root.rglob("*"):
        if f.is_file():
            raw = f.read_bytes()
            assert not any(o.encode() in raw for o in originals), f
    side = json.loads((entry.directory / "series.json").read_text())
    assert side["task"] == "toy_square" and side["patient_id"] == entry.patient_id and side["bytes"] > 0


def test_same_patient_same_pseudonym_and_date_shift(tmp_path: Path, archive: TrainingArchive) -> None:
    a = archive.archive_series(_study(tmp_path / "a", study_date="20240101"), ROUTE)[0]
    b = archive.archive_series(_study(tmp_path / "b", study_date="20240111"), ROUTE)[0]
    other = archive.archive_series(_study(tmp_path / "c", pid="MRN000002", name="Roe^Richard"), ROUTE)[0]
    assert a.patient_id == b.patient_id != other.patient_id
    assert a.study_uid != b.study_uid
    da = pydicom.dcmread(next(a.directory.glob("*.dcm"))).StudyDate
    db = pydicom.dcmread(next(b.directory.glob("*.dcm"))).StudyDate
    import datetime as dt

    delta = dt.datetime.strptime(db, "%Y%m%d") - dt.datetime.strptime(da, "%Y%m%d")
    assert delta.days == 10  # the interval between one patient's studies survives the shift
    # a second archive instance with the same key gives the same pseudonyms (consistent across restarts)
    again = TrainingArchive(archive.root, archive.key_dir, max_bytes=10**9)
    c = again.archive_series(_study(tmp_path / "d"), ROUTE)[0]
    assert c.patient_id == a.patient_id


def test_key_mapping_is_private_and_maps_originals(tmp_path: Path, archive: TrainingArchive) -> None:
    src = _study(tmp_path / "in")
    entry = archive.archive_series(src, ROUTE)[0]
    for name in (KEY_FILE, UID_MAP):
        mode = stat.S_IMODE((archive.key_dir / name).stat().st_mode)
        assert mode == 0o600, (name, oct(mode))
    assert stat.S_IMODE(archive.key_dir.stat().st_mode) == 0o700
    rows = [json.loads(line) for line in (archive.key_dir / UID_MAP).read_text().splitlines()]
    study = str(pydicom.dcmread(src[0]).StudyInstanceUID)
    assert {"kind": "StudyInstanceUID", "original": study, "pseudo": entry.study_uid} in rows
    assert {"kind": "PatientID", "original": PID, "pseudo": entry.patient_id} in rows
    # archiving again does not duplicate mapping lines
    archive.archive_series(src, ROUTE)
    rows2 = (archive.key_dir / UID_MAP).read_text().splitlines()
    assert len(rows2) == len(rows)
    with pytest.raises(ArchiveError):
        TrainingArchive(tmp_path / "x", tmp_path / "x" / "keys", max_bytes=1)


def test_size_cap_evicts_oldest_first(tmp_path: Path) -> None:
    arch = TrainingArchive(tmp_path / "archive", tmp_path / "keys", max_bytes=10**9)
    first = arch.archive_series(_study(tmp_path / "1", pid="P1XYZ"), ROUTE)[0]
    per = first.bytes
    arch.max_bytes = int(per * 2.5)
    second = arch.archive_series(_study(tmp_path / "2", pid="P2XYZ"), ROUTE)[0]
    third = arch.archive_series(_study(tmp_path / "3", pid="P3XYZ"), ROUTE)[0]
    assert not first.directory.exists() and second.directory.exists() and third.directory.exists()
    assert arch.total_bytes() <= arch.max_bytes


def test_burned_in_annotation_refused_and_opt_in(tmp_path: Path) -> None:
    src = _study(tmp_path / "in", n=1)
    ds = pydicom.dcmread(src[0])
    ds.BurnedInAnnotation = "YES"
    ds.save_as(src[0], enforce_file_format=True)
    cfg = Config.model_validate({"node": {"storage_dir": str(tmp_path / "var")}})
    with pytest.raises(ArchiveError):
        archive_series(src, ROUTE, cfg)
    off = Route(name="off", task="toy_square")
    assert archive_series(_study(tmp_path / "in2", n=1), off, cfg) == []
    assert not (tmp_path / "var" / "training-archive" / "studies").exists() or not any(
        (tmp_path / "var" / "training-archive" / "studies").iterdir())


def test_worker_archives_processed_series_of_opted_in_route(tmp_path: Path) -> None:
    import io
    import time as _time

    import tests.plugins.bone_test_task  # noqa: F401 - registers test_task
    from dicomnode.assembler import Assembler
    from dicomnode.jobs import JobQueue
    from dicomnode.outbox import Outbox
    from dicomnode.spool import Spool
    from dicomnode.worker import JobHandler
    from tests.plugins.bone_test_task import dx_dataset

    cfg = Config.model_validate({
        "node": {"storage_dir": str(tmp_path / "var"), "disk_min_free_gb": 0},
        "destinations": {"pacs": {"ae_title": "PACS", "host": "127.0.0.1", "port": 104}},
        "routes": [{"name": "wrist", "task": "test_task", "match": {"modality": ["DX"]}, "complete_after_s": 1,
                    "send_to": ["pacs"], "archive_for_training": True}],
        "training_archive": {"dir": str(tmp_path / "arch"), "key_dir": str(tmp_path / "keys")},
    })
    spool = Spool(cfg.node.storage_dir, 0)
    queue = JobQueue(spool.db_path)
    outbox = Outbox(cfg.node.storage_dir)
    asm = Assembler(cfg, spool, queue)
    handler = JobHandler(cfg, spool, queue, outbox)
    study, series = generate_uid(), generate_uid()
    buf = io.BytesIO()
    dx_dataset(study, series, 0).save_as(buf, enforce_file_format=True)
    spool.store(buf.getvalue(), assoc_id=None)
    asm.poll_once(_time.time() + 2)
    job = queue.claim()
    assert job is not None
    handler(job)
    assert queue.get(job.id).state == "done"  # type: ignore[union-attr]
    [side] = list((tmp_path / "arch" / "studies").glob("*/*/series.json"))
    meta = json.loads(side.read_text())
    assert meta["task"] == "test_task" and meta["route"] == "wrist" and meta["study_uid"] != study
    assert len(list(side.parent.glob("*.dcm"))) == 1
    rows = (tmp_path / "keys" / UID_MAP).read_text()
    assert study in rows  # the mapping back lives only in the key folder
