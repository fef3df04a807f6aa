"""Sender: transient vs permanent failures against a real in-process pynetdicom SCP, outbox state changes."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid
from pynetdicom import AE, evt
from pynetdicom.sop_class import DigitalXRayImageStorageForPresentation, Verification

from dicomnode.config import Config, Destination
from dicomnode.errors import DeliveryError
from dicomnode.outbox import Outbox
from dicomnode.sender import Sender, classify_status, send_files
from dicomnode.store import connection as db
from tests.conftest import free_port
from tests.plugins.bone_test_task import dx_dataset


class _Scp:
    """A pynetdicom SCP whose C-STORE status (and acceptance) the test controls."""

    def __init__(self, status: int = 0x0000, *, reject: int | None = None, support_dx: bool = True,
                 port: int | None = None) -> None:
        self.status = status
        self.received: list[str] = []
        self.port = port or free_port()
        self.ae = AE(ae_title="PACS")
        if support_dx:
            self.ae.add_supported_context(DigitalXRayImageStorageForPresentation,
                                          [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        self.ae.add_supported_context(Verification)
        if reject is not None:
            self.ae.require_calling_aet = ["SOMEONEELSE"]
            self._reject = reject
        handlers = [(evt.EVT_C_STORE, self._on_store)]
        self.server = self.ae.start_server(("127.0.0.1", self.port), block=False, evt_handlers=handlers)

    def _on_store(self, event: evt.Event) -> int:
        self.received.append(str(event.request.AffectedSOPInstanceUID))
        return self.status

    def stop(self) -> None:
        self.server.shutdown()


@pytest.fixture
def files(tmp_path: Path) -> list[Path]:
    study, series = generate_uid(), generate_uid()
    out = []
    for i in range(2):
        p = tmp_path / f"{i}.dcm"
        dx_dataset(study, series, i).save_as(p, enforce_file_format=True)
        out.append(p)
    return out


@pytest.fixture
def scp_factory() -> Iterator[type[_Scp]]:
    made: list[_Scp] = []

    def make(*a: object, **kw: object) -> _Scp:
        s = _Scp(*a, **kw)  # type: ignore[arg-type]
        made.append(s)
        return s

    yield make  # type: ignore[misc]
    for s in made:
        s.stop()


def _dest(port: int, **kw: object) -> Destination:
    return Destination(ae_title="PACS", host="127.0.0.1", port=port, timeout_s=5, **kw)  # type: ignore[arg-type]


def test_classify_status() -> None:
    assert classify_status(0x0000) == (True, False)
    assert classify_status(0xB000) == (True, False)
    assert classify_status(0xA700) == (False, True)
    assert classify_status(0xA7FF) == (False, True)
    assert classify_status(0x0122) == (False, False)
    assert classify_status(0xC000) == (False, False)
    assert classify_status(0xA900) == (False, False)


def test_success_stores_every_file(scp_factory, files: list[Path]) -> None:
    scp = scp_factory()
    assert send_files(files, _dest(scp.port), "BONENODE") == [None, None]
    assert len(scp.received) == 2


def test_out_of_resources_is_transient(scp_factory, files: list[Path]) -> None:
    scp = scp_factory(0xA700)
    errs = send_files(files, _dest(scp.port), "BONENODE")
    assert all(isinstance(e, DeliveryError) and e.transient and "0xA700" in str(e) for e in errs)


def test_sop_class_not_supported_status_is_permanent(scp_factory, files: list[Path]) -> None:
    scp = scp_factory(0x0122)
    errs = send_files(files, _dest(scp.port), "BONENODE")
    assert all(isinstance(e, DeliveryError) and not e.transient and "0x0122" in str(e) for e in errs)


def test_no_accepted_context_is_permanent(scp_factory, files: list[Path]) -> None:
    scp = scp_factory(support_dx=False)
    errs = send_files(files, _dest(scp.port), "BONENODE")
    assert all(isinstance(e, DeliveryError) and not e.transient and "does not support" in str(e) for e in errs)
    assert scp.received == []


def test_association_rejected_permanent(scp_factory, files: list[Path]) -> None:
    scp = scp_factory(reject=1)
    with pytest.raises(DeliveryError) as info:
        send_files(files, _dest(scp.port), "BONENODE")
    assert not info.value.transient and "rejected (permanent" in str(info.value)


def test_connection_refused_is_transient(files: list[Path]) -> None:
    with pytest.raises(DeliveryError) as info:
        send_files(files, _dest(free_port()), "BONENODE")
    assert info.value.transient


def _outbox_with(tmp_path: Path, files: list[Path], port: int, **dest_kw: object) -> tuple[Sender, Outbox]:
    cfg = Config.model_validate({
        "node": {"storage_dir": str(tmp_path / "var")},
        "destinations": {"pacs": {"ae_title": "PACS", "host": "127.0.0.1", "port": port, "timeout_s": 5,
                                  **dest_kw}},
    })
    outbox = Outbox(cfg.node.storage_dir)
    written = outbox.write_datasets(1, [pydicom.dcmread(p) for p in files])
    conn = db.thread_connection(outbox.db_path)
    with db.transaction(conn):
        outbox.add(conn, written, ["pacs"], job_id=1, study_uid="1.2",
                   sop_uids=[pydicom.dcmread(p).SOPInstanceUID for p in written])
    return Sender(cfg, outbox, poll_s=0.05), outbox


def test_sender_retries_transient_then_dead(tmp_path: Path, scp_factory, files: list[Path]) -> None:
    scp = scp_factory(0xA700)
    sender, outbox = _outbox_with(tmp_path, files, scp.port, max_retries=1, backoff_initial_s=0.01)
    assert sender.run_once() == 2
    assert outbox.counts() == {"pending": 2}
    time.sleep(0.05)
    assert sender.run_once() == 2
    assert outbox.counts() == {"dead": 2}
    assert all("0xA700" in (d.last_error or "") for d in outbox.list())


def test_sender_marks_sent_after_pacs_returns(tmp_path: Path, scp_factory, files: list[Path]) -> None:
    port = free_port()
    sender, outbox = _outbox_with(tmp_path, files, port, backoff_initial_s=0.01)
    assert sender.run_once() == 2  # nobody listening: transient
    assert outbox.counts() == {"pending": 2}
    assert all(d.attempts == 1 for d in outbox.list())
    scp = scp_factory(port=port)  # the PACS comes back on the same port
    time.sleep(0.05)
    sender.run_once()
    assert outbox.counts() == {"sent": 2}
    assert sorted(scp.received) == sorted(d.sop_instance_uid for d in outbox.list())


def test_permanent_rejection_goes_dead_at_once(tmp_path: Path, scp_factory, files: list[Path]) -> None:
    scp = scp_factory(0xC000)
    sender, outbox = _outbox_with(tmp_path, files, scp.port, max_retries=10)
    sender.run_once()
    assert outbox.counts() == {"dead": 2}


def test_compressed_object_falls_back_to_uncompressed(tmp_path: Path) -> None:
    from pydicom.uid import RLELossless

    ds = dx_dataset(generate_uid(), generate_uid(), 0)
    ds.compress(RLELossless)
    path = tmp_path / "rle.dcm"
    ds.save_as(path, enforce_file_format=True)
    received: list[str] = []

    def on_store(event: evt.Event) -> int:
        received.append(str(event.context.transfer_syntax))
        return 0x0000

    for supported, expected in (([ExplicitVRLittleEndian], ExplicitVRLittleEndian), ([RLELossless], RLELossless)):
        ae = AE(ae_title="PACS")
        ae.add_supported_context(DigitalXRayImageStorageForPresentation, supported)
        port = free_port()
        server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])
        try:
            assert send_files([path], _dest(port), "BONENODE") == [None]
        finally:
            server.shutdown()
        assert received[-1] == expected
