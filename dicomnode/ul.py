"""DICOM upper layer (PS3.8) for the acceptor side: PDU codec, association negotiation, DIMSE command sets.

Only what a storage SCP needs: reading and writing the seven PDU types,
negotiating presentation contexts (PS3.8 9.3.2-9.3.3, annex D for the user
information items), and encoding/decoding the command sets of C-ECHO and
C-STORE (PS3.7 9.3 and 9.1.1, implicit VR little endian). Everything is pure
functions over bytes; :mod:`dicomnode.native_scp` owns the sockets.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from dicomnode.errors import DicomNodeError

__all__ = [
    "ABORT_SERVICE_PROVIDER", "ABORT_SERVICE_USER", "APPLICATION_CONTEXT", "ASSOCIATE_AC", "ASSOCIATE_RJ", "ASSOCIATE_RQ", "ABORT", "P_DATA", "RELEASE_RP",
    "RELEASE_RQ", "AssociateRQ", "Command", "DimseError", "PresentationContext", "ProtocolError", "abort_pdu", "associate_ac",
    "associate_rj", "decode_associate_rq", "decode_command", "encode_command", "iter_pdvs", "negotiate",
    "p_data_pdus", "release_pdu",
]

ASSOCIATE_RQ, ASSOCIATE_AC, ASSOCIATE_RJ, P_DATA, RELEASE_RQ, RELEASE_RP, ABORT = 1, 2, 3, 4, 5, 6, 7
APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"

# presentation context results (PS3.8 9.3.3.2)
ACCEPTANCE, ABSTRACT_SYNTAX_NOT_SUPPORTED, TRANSFER_SYNTAXES_NOT_SUPPORTED = 0, 3, 4

# command fields (PS3.7 E.1)
C_STORE_RQ, C_STORE_RSP, C_ECHO_RQ, C_ECHO_RSP = 0x0001, 0x8001, 0x0030, 0x8030
NO_DATA_SET = 0x0101


# A-ABORT source and reason/diag (PS3.8 9.3.8, table 9-26)
ABORT_SERVICE_USER, ABORT_SERVICE_PROVIDER = 0, 2
REASON_NOT_SPECIFIED, UNRECOGNIZED_PDU, UNEXPECTED_PDU = 0, 1, 2
UNRECOGNIZED_PDU_PARAMETER, UNEXPECTED_PDU_PARAMETER, INVALID_PDU_PARAMETER = 4, 5, 6


class ProtocolError(DicomNodeError):
    """The peer sent something that is not valid DICOM upper-layer protocol (answered with A-ABORT).

    ``source`` and ``reason`` are those of the A-ABORT (PS3.8 9.3.8): the upper-layer provider (2) with
    a diagnostic for PDU errors; the service user (0, reason 0) for a DIMSE message that breaks its protocol.
    """

    def __init__(self, message: str, reason: int = INVALID_PDU_PARAMETER,
                 source: int = ABORT_SERVICE_PROVIDER) -> None:
        super().__init__(message)
        self.source = source
        self.reason = reason if source == ABORT_SERVICE_PROVIDER else REASON_NOT_SPECIFIED


class DimseError(ProtocolError):
    """A DIMSE message that breaks the message exchange (A-ABORT by the service user, reason 0)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, REASON_NOT_SPECIFIED, ABORT_SERVICE_USER)


@dataclass(frozen=True)
class PresentationContext:
    """One proposed presentation context."""

    context_id: int
    abstract_syntax: str
    transfer_syntaxes: tuple[str, ...]


@dataclass
class AssociateRQ:
    """The parts of an A-ASSOCIATE-RQ an acceptor needs."""

    protocol_version: int
    called_ae: str
    calling_ae: str
    application_context: str
    contexts: list[PresentationContext] = field(default_factory=list)
    max_pdu: int = 0
    implementation_class_uid: str = ""
    implementation_version: str = ""
    async_ops: tuple[int, int] | None = None
    raw_called: bytes = b" " * 16
    raw_calling: bytes = b" " * 16


def _uid(raw: bytes) -> str:
    return raw.rstrip(b"\x00 ").decode("ascii", "replace")


def _ae(raw: bytes) -> str:
    return raw.decode("ascii", "replace").strip()


def _items(data: bytes | memoryview, start: int, end: int, what: str) -> Iterable[tuple[int, memoryview]]:
    """Variable items with a one-byte type, one reserved byte and a two-byte length."""
    view = memoryview(data)
    pos = start
    while pos < end:
        if pos + 4 > end:
            raise ProtocolError(f"{what}: item header cut off")
        item_type, length = view[pos], struct.unpack_from(">H", view, pos + 2)[0]
        if pos + 4 + length > end:
            raise ProtocolError(f"{what}: item 0x{item_type:02X} runs past its parent")
        yield item_type, view[pos + 4:pos + 4 + length]
        pos += 4 + length


def decode_associate_rq(body: bytes) -> AssociateRQ:
    """Parse the body (after the 6-byte PDU header) of an A-ASSOCIATE-RQ."""
    if len(body) < 68:
        raise ProtocolError("A-ASSOCIATE-RQ shorter than its fixed fields")
    rq = AssociateRQ(protocol_version=struct.unpack_from(">H", body, 0)[0], called_ae=_ae(body[4:20]),
                     calling_ae=_ae(body[20:36]), application_context="", raw_called=bytes(body[4:20]),
                     raw_calling=bytes(body[20:36]))
    for item_type, item in _items(body, 68, len(body), "A-ASSOCIATE-RQ"):
        if item_type == 0x10:
            rq.application_context = _uid(bytes(item))
        elif item_type == 0x20:
            if len(item) < 4:
                raise ProtocolError("presentation context item too short")
            abstract, transfers = "", []
            for sub_type, sub in _items(item, 4, len(item), "presentation context"):
                if sub_type == 0x30:
                    abstract = _uid(bytes(sub))
                elif sub_type == 0x40:
                    transfers.append(_uid(bytes(sub)))
            rq.contexts.append(PresentationContext(item[0], abstract, tuple(transfers)))
        elif item_type == 0x50:
            for sub_type, sub in _items(item, 0, len(item), "user information"):
                if sub_type == 0x51 and len(sub) == 4:
                    rq.max_pdu = struct.unpack(">I", sub)[0]
                elif sub_type == 0x52:
                    rq.implementation_class_uid = _uid(bytes(sub))
                elif sub_type == 0x55:
                    rq.implementation_version = bytes(sub).decode("ascii", "replace").strip()
                elif sub_type == 0x53 and len(sub) == 4:
                    rq.async_ops = struct.unpack(">HH", sub)
    if not rq.application_context:
        raise ProtocolError("A-ASSOCIATE-RQ without an application context item")
    return rq


def _item(item_type: int, payload: bytes) -> bytes:
    return struct.pack(">BBH", item_type, 0, len(payload)) + payload


def _pdu(pdu_type: int, body: bytes) -> bytes:
    return struct.pack(">BBI", pdu_type, 0, len(body)) + body


def negotiate(rq: AssociateRQ, supported: dict[str, Sequence[str]]
              ) -> list[tuple[PresentationContext, int, str | None]]:
    """Result of every proposed context: (context, result, chosen transfer syntax or None).

    ``supported`` maps abstract syntax -> transfer syntaxes in our order of preference;
    the first one of ours that the requestor offers is chosen.
    """
    out: list[tuple[PresentationContext, int, str | None]] = []
    for cx in rq.contexts:
        ours = supported.get(cx.abstract_syntax)
        if ours is None:
            out.append((cx, ABSTRACT_SYNTAX_NOT_SUPPORTED, None))
            continue
        chosen = next((ts for ts in ours if ts in cx.transfer_syntaxes), None)
        out.append((cx, ACCEPTANCE if chosen else TRANSFER_SYNTAXES_NOT_SUPPORTED, chosen))
    return out


def associate_ac(rq: AssociateRQ, results: list[tuple[PresentationContext, int, str | None]], *, max_pdu: int,
                 implementation_class_uid: str, implementation_version: str) -> bytes:
    """Encode the A-ASSOCIATE-AC answering ``rq`` with the negotiated ``results``."""
    parts = [struct.pack(">HH", 1, 0), rq.raw_called, rq.raw_calling, b"\x00" * 32,
             _item(0x10, APPLICATION_CONTEXT.encode())]
    for cx, result, ts in results:
        sub = _item(0x40, (ts or "").encode()) if ts else _item(0x40, b"")
        parts.append(_item(0x21, struct.pack(">BBBB", cx.context_id, 0, result, 0) + sub))
    version = implementation_version.encode()[:16]
    user = [_item(0x51, struct.pack(">I", max_pdu)), _item(0x52, implementation_class_uid.encode()),
            _item(0x55, version)]
    if rq.async_ops is not None:
        user.insert(2, _item(0x53, struct.pack(">HH", 1, 1)))  # one operation at a time either way
    parts.append(_item(0x50, b"".join(user)))
    return _pdu(ASSOCIATE_AC, b"".join(parts))


def associate_rj(result: int, source: int, reason: int) -> bytes:
    """Encode an A-ASSOCIATE-RJ."""
    return _pdu(ASSOCIATE_RJ, struct.pack(">BBBB", 0, result, source, reason))


def release_pdu(pdu_type: int) -> bytes:
    """Encode an A-RELEASE-RQ or A-RELEASE-RP."""
    return _pdu(pdu_type, b"\x00" * 4)


def abort_pdu(source: int = ABORT_SERVICE_PROVIDER, reason: int = REASON_NOT_SPECIFIED) -> bytes:
    """Encode an A-ABORT (PS3.8 9.3.8); the reason is 0 unless the source is the service provider (2)."""
    return _pdu(ABORT, struct.pack(">BBBB", 0, 0, source, reason if source == ABORT_SERVICE_PROVIDER else 0))


def iter_pdvs(body: memoryview) -> Iterable[tuple[int, int, memoryview]]:
    """(context id, message control header, fragment) of every PDV item in a P-DATA-TF body."""
    pos, end = 0, len(body)
    while pos < end:
        if pos + 6 > end:
            raise ProtocolError("P-DATA-TF: PDV header cut off")
        length = struct.unpack_from(">I", body, pos)[0]
        if length < 2 or pos + 4 + length > end:
            raise ProtocolError("P-DATA-TF: PDV length inconsistent with the PDU")
        yield body[pos + 4], body[pos + 5], body[pos + 6:pos + 4 + length]
        pos += 4 + length


def p_data_pdus(context_id: int, data: bytes, *, command: bool, max_pdu: int) -> list[bytes]:
    """Fragment ``data`` into P-DATA-TF PDUs of at most ``max_pdu`` bytes (0 = unlimited), one PDV each."""
    room = len(data) if max_pdu == 0 else max(max_pdu - 6, 1)
    pdus = []
    for start in range(0, max(len(data), 1), room):
        chunk = data[start:start + room]
        last = start + room >= len(data)
        mch = (1 if command else 0) | (2 if last else 0)
        pdv = struct.pack(">IBB", len(chunk) + 2, context_id, mch) + chunk
        pdus.append(_pdu(P_DATA, pdv))
    return pdus


# ------------------------------------------------------------------------------------------ DIMSE commands


@dataclass
class Command:
    """The command elements of C-ECHO and C-STORE requests and responses."""

    command_field: int
    message_id: int | None = None
    responded_to: int | None = None
    sop_class_uid: str = ""
    sop_instance_uid: str = ""
    priority: int = 0
    data_set_type: int = NO_DATA_SET
    status: int | None = None
    move_originator_ae: str = ""
    move_originator_id: int | None = None
    error_comment: str = ""


_US = {0x0100: "command_field", 0x0110: "message_id", 0x0120: "responded_to", 0x0700: "priority",
       0x0800: "data_set_type", 0x0900: "status", 0x1031: "move_originator_id"}


def decode_command(data: bytes) -> Command:
    """Parse a command set (group 0000, implicit VR little endian)."""
    cmd = Command(command_field=-1)
    pos, end = 0, len(data)
    while pos < end:
        if pos + 8 > end:
            raise DimseError("command set: element header cut off")
        group, elem, length = struct.unpack_from("<HHI", data, pos)
        pos += 8
        if group != 0 or pos + length > end:
            raise DimseError(f"command set: bad element ({group:04X},{elem:04X})")
        value = data[pos:pos + length]
        pos += length
        if elem in _US and length == 2:
            setattr(cmd, _US[elem], struct.unpack("<H", value)[0])
        elif elem == 0x0002:
            cmd.sop_class_uid = _uid(value)
        elif elem == 0x1000:
            cmd.sop_instance_uid = _uid(value)
        elif elem == 0x1030:
            cmd.move_originator_ae = value.decode("ascii", "replace").strip()
    if cmd.command_field < 0:
        raise DimseError("command set without a Command Field")
    return cmd


def _element(elem: int, value: bytes) -> bytes:
    if len(value) % 2:
        value += b"\x00"
    return struct.pack("<HHI", 0, elem, len(value)) + value


def encode_command(cmd: Command) -> bytes:
    """Encode a response command set, elements in tag order, with its group length."""
    elems: list[bytes] = []
    if cmd.sop_class_uid:
        elems.append(_element(0x0002, cmd.sop_class_uid.encode()))
    elems.append(_element(0x0100, struct.pack("<H", cmd.command_field)))
    if cmd.message_id is not None:
        elems.append(_element(0x0110, struct.pack("<H", cmd.message_id)))
    if cmd.responded_to is not None:
        elems.append(_element(0x0120, struct.pack("<H", cmd.responded_to)))
    elems.append(_element(0x0800, struct.pack("<H", cmd.data_set_type)))
    if cmd.status is not None:
        elems.append(_element(0x0900, struct.pack("<H", cmd.status)))
    if cmd.error_comment:
        text = cmd.error_comment.encode("ascii", "replace")[:64]
        elems.append(_element(0x0902, text + (b" " if len(text) % 2 else b"")))
    if cmd.sop_instance_uid:
        elems.append(_element(0x1000, cmd.sop_instance_uid.encode()))
    body = b"".join(elems)
    return struct.pack("<HHI", 0, 0, 4) + struct.pack("<I", len(body)) + body


def file_meta(sop_class_uid: str, sop_instance_uid: str, transfer_syntax: str, *, implementation_class_uid: str,
              implementation_version: str, source_ae: str) -> bytes:
    """Preamble, ``DICM`` and the File Meta Information group (PS3.10 7.1) for a received data set."""

    def el(elem: int, vr: bytes, value: bytes, pad: bytes) -> bytes:
        if len(value) % 2:
            value += pad
        if vr == b"OB":
            return struct.pack("<HH2sHI", 2, elem, vr, 0, len(value)) + value
        return struct.pack("<HH2sH", 2, elem, vr, len(value)) + value

    body = b"".join([
        el(0x0001, b"OB", b"\x00\x01", b"\x00"),
        el(0x0002, b"UI", sop_class_uid.encode(), b"\x00"),
        el(0x0003, b"UI", sop_instance_uid.encode(), b"\x00"),
        el(0x0010, b"UI", transfer_syntax.encode(), b"\x00"),
        el(0x0012, b"UI", implementation_class_uid.encode(), b"\x00"),
        el(0x0013, b"SH", implementation_version.encode()[:16], b" "),
        el(0x0016, b"AE", source_ae.encode("ascii", "replace")[:16], b" "),
    ])
    return b"\x00" * 128 + b"DICM" + struct.pack("<HH2sHI", 2, 0, b"UL", 4, len(body)) + body
