"""Conformance against pynetdicom (and a raw upper-layer client) as the SCU.

Association negotiation items of PS3.7 annex D (role selection, SOP class
(common) extended negotiation, user identity, asynchronous operations window),
the sender's maximum PDU, DIMSE statuses of PS3.4/PS3.7 for a C-STORE that
contradicts its context, A-ABORT sources and reasons, and the association limit
answered with A-ASSOCIATE-RJ under concurrency. The standard lets an acceptor
ignore most of these items; the node may ignore them but must never abort or
crash, and what it does answer must be well formed.
"""

from __future__ import annotations

import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid
from pynetdicom import AE, build_role, evt
from pynetdicom.pdu_primitives import (
    AsynchronousOperationsWindowNegotiation,
    SOPClassCommonExtendedNegotiation,
    SOPClassExtendedNegotiation,
    UserIdentityNegotiation,
)
from pynetdicom.sop_class import CTImageStorage, Verification  # type: ignore[attr-defined]

from dicomnode.scp import ReceiverGroup, start_receivers
from dicomnode.spool import Spool
from tests.integration import dicom_wire as w
from tests.integration.test_scp_dcmtk import CALLERS, _node_config, ct_file, dataset_bytes, stored_path

pytestmark = pytest.mark.integration
AE_TITLE = "BONENODE"


class _Node:
    def __init__(self, group: ReceiverGroup, spool: Spool) -> None:
        self.group, self.spool, self.port = group, spool, group.port


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[_Node]:
    cfg = _node_config(tmp_path_factory.mktemp("conformance-pynetdicom"), journal_mb=16, allowed_callers=CALLERS)
    group = start_receivers(cfg)
    try:
        yield _Node(group, Spool(cfg.node.storage_dir, cfg.node.disk_min_free_gb))
    finally:
        group.stop()


def _ae(*contexts: str, max_pdu: int = 16382) -> AE:
    ae = AE(ae_title="PYSCU")
    ae.maximum_pdu_size = max_pdu
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    for cx in contexts or (CTImageStorage, Verification):
        ae.add_requested_context(cx, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    return ae


def _store(assoc: object, path: Path) -> int:
    status = assoc.send_c_store(pydicom.dcmread(path))  # type: ignore[attr-defined]
    return int(status.Status)


def _ct_context(assoc: object) -> object:
    return next(cx for cx in assoc.accepted_contexts if cx.abstract_syntax == CTImageStorage)  # type: ignore[attr-defined]


# ------------------------------------------------------------------------------------------ role selection


def test_role_selection_requestor_as_scu_is_accepted(node: _Node, tmp_path: Path) -> None:
    ae = _ae()
    assoc = ae.associate("127.0.0.1", node.port, ae_title=AE_TITLE,
                         ext_neg=[build_role(CTImageStorage, scu_role=True, scp_role=False)])
    assert assoc.is_established
    cx = _ct_context(assoc)
    assert cx.as_scu and not cx.as_scp
    src = ct_file(tmp_path / "a.dcm")
    assert _store(assoc, src) == 0
    assoc.release()
    assert stored_path(node.spool, src).exists()


def test_role_selection_requestor_as_scp_is_not_granted(node: _Node, tmp_path: Path) -> None:
    """The node never sends C-STOREs on an inbound association: it must not grant the requestor the SCP role."""
    ae = _ae()
    assoc = ae.associate("127.0.0.1", node.port, ae_title=AE_TITLE,
                         ext_neg=[build_role(CTImageStorage, scu_role=True, scp_role=True)])
    assert assoc.is_established
    cx = _ct_context(assoc)
    assert cx.as_scu and not cx.as_scp
    assert _store(assoc, ct_file(tmp_path / "a.dcm")) == 0
    assoc.release()
    # the AC's own role item, read raw: absent (default roles) or SCU yes / SCP no
    wire, kind, body = w.associate(node.port, [(1, w.CT_STORAGE, [w.EXPLICIT_LE])], calling="PYSCU",
                                   user=w.user_information(roles=[(w.CT_STORAGE, 1, 1)]))
    with wire:
        assert kind == w.ASSOCIATE_AC
        roles = w.decode_ac(body).roles
        assert roles.get(w.CT_STORAGE, (1, 0))[1] == 0, roles
        assert set(roles) <= {w.CT_STORAGE}


def test_role_selection_scp_only_never_aborts(node: _Node) -> None:
    """A requestor that offers only the SCP role: accepted without that role, or the context refused; no abort."""
    ae = _ae(CTImageStorage, Verification)
    assoc = ae.associate("127.0.0.1", node.port, ae_title=AE_TITLE,
                         ext_neg=[build_role(CTImageStorage, scu_role=False, scp_role=True)])
    assert assoc.is_established and not assoc.is_aborted
    assert all(not cx.as_scp for cx in assoc.accepted_contexts if cx.abstract_syntax == CTImageStorage)
    assert int(assoc.send_c_echo().Status) == 0
    assoc.release()


# ------------------------------------------------------------------------------------------ extended negotiation


def test_sop_class_extended_negotiation(node: _Node, tmp_path: Path) -> None:
    """Storage extended negotiation (PS3.4 B.3.1) and common extended negotiation: answered well or ignored."""
    ext = SOPClassExtendedNegotiation()
    ext.sop_class_uid = CTImageStorage
    ext.service_class_application_information = b"\x02\x00\x03\x00\x01\x00"  # level 2, full signatures, coercion
    common = SOPClassCommonExtendedNegotiation()
    common.sop_class_uid = CTImageStorage
    common.service_class_uid = "1.2.840.10008.4.2"
    ae = _ae()
    assoc = ae.associate("127.0.0.1", node.port, ae_title=AE_TITLE, ext_neg=[ext, common])
    assert assoc.is_established
    reply = assoc.acceptor.sop_class_extended
    assert set(reply) <= {CTImageStorage}
    if reply:  # an acceptor that answers gives the six bytes of PS3.4 B.3.1.1 with values it supports
        info = reply[CTImageStorage]
        assert len(info) == 6 and info[0] in (0, 1, 2) and info[2] in (0, 1, 2, 3) and info[4] in (0, 1), info
    src = ct_file(tmp_path / "a.dcm")
    assert _store(assoc, src) == 0
    assoc.release()
    assert dataset_bytes(stored_path(node.spool, src)) == dataset_bytes(src)
    # raw: no reply item for common extended negotiation (PS3.7 D.3.3.6 has none), none for classes not asked
    wire, kind, body = w.associate(node.port, [(1, w.CT_STORAGE, [w.EXPLICIT_LE]), (3, w.MR_STORAGE, [w.EXPLICIT_LE])],
                                   user=w.user_information(ext_neg=[(w.CT_STORAGE, b"\x02\x00\x03\x00\x01\x00")]))
    with wire:
        assert kind == w.ASSOCIATE_AC
        ac = w.decode_ac(body)
        assert 0x57 not in ac.sub_items and set(ac.ext_neg) <= {w.CT_STORAGE}


# ------------------------------------------------------------------------------------------ user identity


def _identity(kind: int, primary: bytes, secondary: bytes, positive: bool) -> UserIdentityNegotiation:
    item = UserIdentityNegotiation()
    item.user_identity_type = kind
    item.primary_field = primary
    if kind == 2:
        item.secondary_field = secondary
    item.positive_response_requested = positive
    return item


@pytest.mark.parametrize(("kind", "primary", "secondary", "positive"), [
    (1, b"radiographer", b"", False),
    (1, b"radiographer", b"", True),
    (2, b"radiographer", b"secret", True),
    (3, b"\x60\x82\x01\x00kerberos-ticket", b"", True),
    (4, b"<saml:Assertion/>", b"", True),
    (5, b"eyJhbGciOiJub25lIn0.e30.", b"", True),
])
def test_user_identity_is_accepted_or_ignored(node: _Node, kind: int, primary: bytes, secondary: bytes,
                                              positive: bool) -> None:
    """PS3.7 D.3.3.7: an acceptor may ignore the item; a response (0x59) only when one was requested."""
    ae = _ae()
    assoc = ae.associate("127.0.0.1", node.port, ae_title=AE_TITLE,
                         ext_neg=[_identity(kind, primary, secondary, positive)])
    assert assoc.is_established and not assoc.is_aborted
    assert int(assoc.send_c_echo().Status) == 0
    assoc.release()
    wire, answer, body = w.associate(node.port, [(1, w.VERIFICATION, [w.IMPLICIT_LE])],
                                     user=w.user_information(identity=(kind, primary, secondary, int(positive))))
    with wire:
        assert answer == w.ASSOCIATE_AC
        rsp = w.decode_ac(body).identity_rsp
        assert rsp is None or positive, "a user identity response the requestor did not ask for"


@pytest.mark.parametrize("raw", [
    struct.pack(">BBH", 9, 1, 4) + b"user" + struct.pack(">H", 0),  # unknown identity type
    struct.pack(">BBH", 1, 0, 0) + struct.pack(">H", 0),  # empty user name
    struct.pack(">BBH", 2, 1, 4) + b"user",  # secondary length missing
])
def test_malformed_user_identity_is_ignored_or_rejected_never_aborted(node: _Node, raw: bytes) -> None:
    user = w.item(0x50, w.user_information()[4:] + w.item(0x58, raw))
    wire, answer, _ = w.associate(node.port, [(1, w.VERIFICATION, [w.IMPLICIT_LE])], user=user)
    wire.close()
    assert answer in (w.ASSOCIATE_AC, w.ASSOCIATE_RJ), f"answered PDU type {answer}"
    assoc = _ae(Verification).associate("127.0.0.1", node.port, ae_title=AE_TITLE)
    assert assoc.is_established
    assoc.release()


# ------------------------------------------------------------------------------------------ async window


@pytest.mark.parametrize("proposed", [(5, 5), (1, 1), (0, 0), (65535, 1)])
def test_asynchronous_operations_window(node: _Node, tmp_path: Path, proposed: tuple[int, int]) -> None:
    """The reply (or the default 1/1 when absent) never exceeds what was proposed (0: unlimited), and works."""
    ae = _ae()
    item = AsynchronousOperationsWindowNegotiation()
    item.maximum_number_operations_invoked, item.maximum_number_operations_performed = proposed
    assoc = ae.associate("127.0.0.1", node.port, ae_title=AE_TITLE, ext_neg=[item])
    assert assoc.is_established
    invoked, performed = assoc.acceptor.asynchronous_operations
    for got, asked in zip((invoked, performed), proposed, strict=True):
        assert got >= 1 and (asked == 0 or got <= asked), (invoked, performed)
    assert _store(assoc, ct_file(tmp_path / "a.dcm")) == 0
    assoc.release()


def test_pipelined_requests_within_the_granted_window(node: _Node) -> None:
    """As many C-ECHO-RQs as the node grants are sent back to back; each gets its response, in order."""
    wire, kind, body = w.associate(node.port, [(1, w.VERIFICATION, [w.IMPLICIT_LE])],
                                   user=w.user_information(async_ops=(8, 8)))
    with wire:
        assert kind == w.ASSOCIATE_AC
        window = w.decode_ac(body).async_ops or (1, 1)
        n = min(window[1] or 8, 8)  # requests the node may have outstanding: its "performed" value
        wire.send(*[p for i in range(n) for p in w.p_data(1, w.c_echo_rq(i + 1), is_command=True)])
        for i in range(n):
            _, rsp = wire.recv_message()
            assert w.us(rsp[0x0100]) == w.C_ECHO_RSP and w.us(rsp[0x0120]) == i + 1 and w.us(rsp[0x0900]) == 0
        wire.send(w.pdu(w.RELEASE_RQ, b"\x00" * 4))
        assert wire.recv_pdu(10) == (w.RELEASE_RP, b"\x00" * 4)


# ------------------------------------------------------------------------------------------ maximum PDU


@pytest.mark.parametrize("max_pdu", [0, 4096])
def test_sender_max_pdu(node: _Node, tmp_path: Path, max_pdu: int) -> None:
    """Unlimited (0) and 4 KiB on the sender's side; the node announces a finite maximum and stores intact."""
    ae = _ae(max_pdu=max_pdu)
    assoc = ae.associate("127.0.0.1", node.port, ae_title=AE_TITLE, max_pdu=max_pdu)
    assert assoc.is_established
    announced = assoc.acceptor.maximum_length
    assert announced is not None and 4096 <= announced <= 16 << 20, announced
    src = ct_file(tmp_path / "a.dcm", rows=256)  # 128 KiB of pixels: many PDUs either way
    assert _store(assoc, src) == 0
    assert int(assoc.send_c_echo().Status) == 0
    assoc.release()
    assert dataset_bytes(stored_path(node.spool, src)) == dataset_bytes(src)


@pytest.mark.parametrize("max_pdu", [4096, 64])
def test_node_respects_the_senders_max_pdu(node: _Node, max_pdu: int) -> None:
    """Every P-DATA-TF the node sends fits the requestor's maximum (a 64-byte one forces the response apart)."""
    wire, kind, _ = w.associate(node.port, [(1, w.VERIFICATION, [w.IMPLICIT_LE])],
                                user=w.user_information(max_pdu=max_pdu))
    with wire:
        assert kind == w.ASSOCIATE_AC
        wire.send(*w.p_data(1, w.c_echo_rq(7), is_command=True))
        data, done = b"", False
        while not done:
            got = wire.recv_pdu(10)
            assert got is not None and got[0] == w.P_DATA, got
            assert len(got[1]) <= max_pdu, f"P-DATA-TF of {len(got[1])} bytes, the requestor takes {max_pdu}"
            pos = 0
            while pos < len(got[1]):
                length = struct.unpack_from(">I", got[1], pos)[0]
                data += got[1][pos + 6:pos + 4 + length]
                done = got[1][pos + 5] & 2 == 2
                pos += 4 + length
        rsp = w.parse_command(data)
        assert w.us(rsp[0x0120]) == 7 and w.us(rsp[0x0900]) == 0


def test_pdu_above_the_announced_maximum_is_aborted(node: _Node) -> None:
    """A P-DATA-TF longer than the node announced: A-ABORT, service provider, invalid PDU parameter value."""
    wire, kind, body = w.associate(node.port, [(1, w.VERIFICATION, [w.IMPLICIT_LE])])
    with wire:
        assert kind == w.ASSOCIATE_AC
        announced = w.decode_ac(body).max_pdu
        assert announced, "the node announced no finite maximum PDU length"
        wire.send(w.pdu(w.P_DATA, struct.pack(">IBB", announced + 2, 1, 2) + b"\x00" * (announced + 8)))
        got = wire.recv_pdu(10)
        assert got is not None and got[0] == w.ABORT and tuple(got[1][2:4]) == (2, 6), got


# ------------------------------------------------------------------------------------------ statuses and aborts


def _store_raw(port: int, cx_abstract: str, cmd_class: str, cmd_instance: str, data: bytes) -> int:
    wire, kind, body = w.associate(port, [(1, cx_abstract, [w.EXPLICIT_LE])])
    with wire:
        assert kind == w.ASSOCIATE_AC and w.decode_ac(body).contexts[1][0] == 0
        wire.send(*w.p_data(1, w.c_store_rq(cmd_class, cmd_instance), is_command=True),
                  *w.p_data(1, data, is_command=False))
        _, rsp = wire.recv_message(30)
        assert w.us(rsp[0x0100]) == w.C_STORE_RSP
        wire.send(w.pdu(w.RELEASE_RQ, b"\x00" * 4))
        assert wire.recv_pdu(10) == (w.RELEASE_RP, b"\x00" * 4)
        return w.us(rsp[0x0900])


def test_sop_class_mismatch_with_the_context(node: _Node, tmp_path: Path) -> None:
    """Command SOP class not the context's: 0x0122 (PS3.7 C.5); data set not the command's: 0xA900 (PS3.4 B.2.3)."""
    src = ct_file(tmp_path / "ct.dcm")
    ds = pydicom.dcmread(src)
    _, data = dataset_bytes(src)
    assert _store_raw(node.port, w.CT_STORAGE, w.MR_STORAGE, ds.SOPInstanceUID, data) == 0x0122
    assert _store_raw(node.port, w.MR_STORAGE, w.MR_STORAGE, ds.SOPInstanceUID, data) == 0xA900
    assert _store_raw(node.port, w.CT_STORAGE, w.CT_STORAGE, generate_uid(), data) == 0xA900
    assert node.group.wait_indexed(30)
    assert node.spool.instances(str(ds.StudyInstanceUID)) == []
    assert _store_raw(node.port, w.CT_STORAGE, w.CT_STORAGE, ds.SOPInstanceUID, data) == 0  # the control
    assert stored_path(node.spool, src).exists()


@pytest.mark.parametrize(("stream", "reason"), [
    (w.pdu(0x09, b"\x00" * 4), 1),  # unrecognized PDU type before the association
    (w.pdu(w.P_DATA, struct.pack(">IBB", 2, 1, 3)), 2),  # P-DATA-TF before any association: unexpected
])
def test_abort_source_and_reason(node: _Node, stream: bytes, reason: int) -> None:
    """A-ABORT from the node names itself (source 2, service provider) and the PS3.8 9.3.8 reason."""
    with w.Wire(node.port) as wire:
        wire.send(stream)
        got = wire.recv_pdu(10)
    assert got is not None and got[0] == w.ABORT and tuple(got[1][2:4]) == (2, reason), got


def test_mr_context_rejected_for_unknown_abstract_syntax(node: _Node) -> None:
    """An abstract syntax the node does not know: context result 3 (abstract syntax not supported)."""
    wire, kind, body = w.associate(node.port, [(1, "1.2.3.4.5.6", [w.EXPLICIT_LE]), (3, w.VERIFICATION,
                                                                                     [w.IMPLICIT_LE])])
    with wire:
        assert kind == w.ASSOCIATE_AC
        contexts = w.decode_ac(body).contexts
        assert contexts[1][0] == 3 and contexts[3][0] == 0, contexts


# ------------------------------------------------------------------------------------------ association limit


def test_associations_beyond_the_limit_are_rejected_not_aborted(tmp_path: Path) -> None:
    """With max_associations held, every further concurrent request gets A-ASSOCIATE-RJ (2, 3, 2), never an abort."""
    cfg = _node_config(tmp_path, journal_mb=16, max_associations=4, allowed_callers=CALLERS)
    group = start_receivers(cfg)
    try:
        held = [_ae(Verification).associate("127.0.0.1", group.port, ae_title=AE_TITLE) for _ in range(4)]
        assert all(a.is_established for a in held)
        outcomes: list[str] = []
        wire_events: list[list[str]] = []
        lock = threading.Lock()

        def attempt() -> None:
            trail: list[str] = []
            a = _ae(Verification).associate("127.0.0.1", group.port, ae_title=AE_TITLE, evt_handlers=[
                (evt.EVT_FSM_TRANSITION, lambda e: trail.append(e.fsm_event))])
            if a.is_established:
                a.release()
            else:
                a.dul.join(10)  # its state machine has handled everything it received
            with lock:
                outcomes.append("established" if a.is_established else "rejected" if a.is_rejected
                                else "aborted" if a.is_aborted else "other")
                wire_events.append(trail)

        for _ in range(5):
            threads = [threading.Thread(target=attempt) for _ in range(24)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(60)
        counts = {o: outcomes.count(o) for o in set(outcomes)}
        assert len(outcomes) == 120 and set(counts) <= {"rejected", "aborted"}, counts  # never accepted over the limit
        # On the wire every one of them got an A-ASSOCIATE-RJ (Evt4), no A-ABORT (Evt16), no bare close (Evt17).
        # The few that pynetdicom 3.0.4 reports as aborted under CPU load are its own race: its DUL thread closes
        # the socket on the RJ before its ACSE thread checks ``socket._is_connected`` and calls ``abort()``
        # (see test_receiver_protocol.test_too_many_associations_are_rejected_never_aborted).
        bad = [ev for ev in wire_events if "Evt4" not in ev or {"Evt16", "Evt17"} & set(ev)]
        assert not bad, bad
        assert counts.get("rejected", 0) >= 114, counts
        # the reject is the right one: transient, service provider (presentation), local limit exceeded
        wire, kind, body = w.associate(group.port, [(1, w.VERIFICATION, [w.IMPLICIT_LE])])
        wire.close()
        assert kind == w.ASSOCIATE_RJ and tuple(body[1:4]) == (2, 3, 2), body.hex()
        for a in held:
            a.release()
        for _ in range(50):  # the slots come free as the releases are processed
            again = _ae(Verification).associate("127.0.0.1", group.port, ae_title=AE_TITLE)
            if again.is_established:
                again.release()
                break
            time.sleep(0.1)
        else:
            pytest.fail("no association accepted after the held ones were released")
    finally:
        group.stop()
