"""The native SCP: journal replay at start-up, protocol abuse on the socket, and the pynetdicom fallback."""

from __future__ import annotations

import socket
import struct
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid

from dicomnode._identity import IMPLEMENTATION_CLASS_UID
from dicomnode.journal import Journal
from dicomnode.scp import start_receivers
from dicomnode.spool import Spool
from tests.integration.test_scp_dcmtk import (  # noqa: F401 - make_node is a fixture
    _node_config,
    ct_file,
    echo,
    make_node,
    stored_path,
    storescu,
)

pytestmark = pytest.mark.integration


def test_instances_acknowledged_before_a_crash_are_replayed_from_the_journal(tmp_path: Path) -> None:
    """Journal records that never reached the spool (the process died) are indexed before receiving starts."""
    cfg = _node_config(tmp_path)
    study, series = generate_uid(), generate_uid()
    files = [ct_file(tmp_path / f"ct{i}.dcm", study=study, series=series) for i in range(3)]
    journal = Journal(Path(cfg.node.storage_dir) / "journal" / "1.bin", 8 << 20)  # a receiver process's journal
    for f in files:
        assert journal.append(f.read_bytes(), {"assoc_id": None}) is not None
    del journal  # crash: never closed, nothing applied
    group = start_receivers(cfg)
    try:
        spool = Spool(cfg.node.storage_dir, 0)
        for f in files:
            assert stored_path(spool, f, timeout_s=0).read_bytes() == f.read_bytes()
        assert echo(group.port).returncode == 0
    finally:
        group.stop()
    group = start_receivers(cfg)  # a second start replays nothing twice
    group.stop()
    assert len(Spool(cfg.node.storage_dir, 0).instances(study)) == 3


def _raw(port: int, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(data)
        try:
            s.shutdown(socket.SHUT_WR)
        except OSError:  # the node already aborted and closed (a race); what it sent is still read below
            pass
        chunks = []
        try:
            while chunk := s.recv(4096):
                chunks.append(chunk)
        except ConnectionResetError:  # the node closed with our garbage unread
            pass
    return b"".join(chunks)


def _associate_rq(app_context: bytes, calling: bytes = b"ECHOSCU") -> bytes:
    item = struct.pack(">BBH", 0x10, 0, len(app_context)) + app_context
    body = struct.pack(">HH", 1, 0) + b"BONENODE".ljust(16) + calling.ljust(16) + b"\x00" * 32 + item
    return struct.pack(">BBI", 1, 0, len(body)) + body


def test_protocol_abuse_is_answered_and_the_node_keeps_running(make_node) -> None:  # noqa: F811
    node = make_node()
    # garbage instead of an A-ASSOCIATE-RQ: the node aborts (PDU type 7) and closes
    assert _raw(node.port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")[:1] in (b"\x07", b"")
    # an unknown application context: A-ASSOCIATE-RJ permanent, "application context name not supported"
    rj = _raw(node.port, _associate_rq(b"1.2.3.4"))
    assert rj[0] == 3 and tuple(rj[7:10]) == (1, 1, 2)
    # a PDU length of 4 GiB is refused, not allocated
    assert _raw(node.port, struct.pack(">BBI", 1, 0, 0xFFFFFFFF))[:1] in (b"\x07", b"")
    # a peer that connects and says nothing is dropped after the ACSE timeout, and C-ECHO works throughout
    with socket.create_connection(("127.0.0.1", node.port)):
        assert echo(node.port).returncode == 0
    assert echo(node.port).returncode == 0


def test_pynetdicom_receiver_remains_available(make_node, tmp_path: Path) -> None:  # noqa: F811
    node = make_node(receiver="pynetdicom")
    f = ct_file(tmp_path / "a.dcm")
    res = storescu(node.port, str(f))
    assert res.returncode == 0, res.stderr
    assert stored_path(node.spool, f).exists()
    assert echo(node.port, "-aet", "NOTALLOWED").returncode != 0


def test_journal_can_be_switched_off(make_node, tmp_path: Path) -> None:  # noqa: F811
    node = make_node(journal_mb=0)
    f = ct_file(tmp_path / "a.dcm")
    assert storescu(node.port, str(f)).returncode == 0
    # stored synchronously: indexed before the success status went out, no journal file
    assert stored_path(node.spool, f, timeout_s=0).exists()
    assert not (Path(node.cfg.node.storage_dir) / "journal" / "0.bin").exists()


def test_spill_file_failure_answers_out_of_resources(make_node, tmp_path: Path,  # noqa: F811
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A data set too large for memory whose spill file cannot be written gets 0xA700; the node goes on."""
    from pynetdicom import AE
    from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

    import dicomnode.native_scp as native

    node = make_node()
    monkeypatch.setattr(native, "INLINE_MAX", 1024)  # every instance spills to a file
    real_open = open

    def full_disk(path: object, mode: str = "r", *args: object, **kw: object) -> object:
        if str(path).endswith(".recv"):
            raise OSError(28, "No space left on device")
        return real_open(path, mode, *args, **kw)  # type: ignore[call-overload]

    monkeypatch.setattr(native, "open", full_disk, raising=False)
    ae = AE(ae_title="PYSCU")
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="BONENODE")
    assert assoc.is_established
    src = ct_file(tmp_path / "a.dcm")
    assert int(assoc.send_c_store(pydicom.dcmread(src)).Status) == 0xA700
    monkeypatch.setattr(native, "open", real_open, raising=False)  # space again: the retry is stored
    assert int(assoc.send_c_store(pydicom.dcmread(src)).Status) == 0
    assoc.release()
    assert stored_path(node.spool, src).exists()
    assert list(node.spool.tmp_dir.iterdir()) == []


def test_spooled_files_with_our_file_meta_pass_dciodvfy(make_node, tmp_path: Path) -> None:  # noqa: F811
    """The receiver writes the Part 10 file meta itself: a spooled scanner image must still validate."""
    from tests.conftest import run_dciodvfy
    from training.synth import wrist_fracture

    wrist_fracture.generate(tmp_path / "src", 1, seed=3, workers=1)
    files = sorted((tmp_path / "src").rglob("*.dcm"))
    node = make_node()
    assert storescu(node.port, *map(str, files)).returncode == 0
    for f in files:
        stored = stored_path(node.spool, f)
        errors, output = run_dciodvfy(stored)
        assert errors == [], output
        meta = pydicom.dcmread(stored, stop_before_pixels=True).file_meta
        assert meta.ImplementationClassUID == IMPLEMENTATION_CLASS_UID
        assert meta.SourceApplicationEntityTitle.strip() == "STORESCU"
