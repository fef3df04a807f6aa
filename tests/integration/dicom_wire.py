"""A small, independent DICOM upper-layer client for tests: PDUs built byte by byte (PS3.8 9.3, annex D).

The conformance and fuzz tests need requests that no well-behaved SCU library
sends (a C-STORE whose SOP class differs from its context, streams cut or lied
about). This codec shares no code with ``dicomnode.ul`` on purpose, so a bug in
the node's codec is not mirrored here.
"""

from __future__ import annotations

import socket
import struct
import time
from dataclasses import dataclass, field

APP_CONTEXT = b"1.2.840.10008.3.1.1.1"
IMPLICIT_LE = "1.2.840.10008.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
VERIFICATION = "1.2.840.10008.1.1"
CT_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
TEST_IMPL_UID = b"1.2.826.0.1.3680043.9.7433.99.1"

ASSOCIATE_RQ, ASSOCIATE_AC, ASSOCIATE_RJ, P_DATA, RELEASE_RQ, RELEASE_RP, ABORT = 1, 2, 3, 4, 5, 6, 7
C_STORE_RQ, C_STORE_RSP, C_ECHO_RQ, C_ECHO_RSP = 0x0001, 0x8001, 0x0030, 0x8030


def item(item_type: int, payload: bytes) -> bytes:
    """A variable item: type, reserved byte, two-byte big-endian length, payload."""
    return struct.pack(">BBH", item_type, 0, len(payload)) + payload


def pdu(pdu_type: int, body: bytes) -> bytes:
    """A PDU: type, reserved byte, four-byte big-endian length, body."""
    return struct.pack(">BBI", pdu_type, 0, len(body)) + body


def _uid(value: str | bytes) -> bytes:
    return value.encode() if isinstance(value, str) else value


def presentation_context(context_id: int, abstract: str, transfer_syntaxes: list[str]) -> bytes:
    """Presentation context item (0x20) of an A-ASSOCIATE-RQ."""
    subs = item(0x30, _uid(abstract)) + b"".join(item(0x40, _uid(ts)) for ts in transfer_syntaxes)
    return item(0x20, struct.pack(">BBBB", context_id, 0, 0, 0) + subs)


def user_information(max_pdu: int = 16384, *, async_ops: tuple[int, int] | None = None,
                     roles: list[tuple[str, int, int]] | None = None, ext_neg: list[tuple[str, bytes]] | None = None,
                     identity: tuple[int, bytes, bytes, int] | None = None) -> bytes:
    """User information item (0x50): max PDU, implementation UID, and the optional sub-items of annex D."""
    subs = [item(0x51, struct.pack(">I", max_pdu)), item(0x52, TEST_IMPL_UID)]
    if async_ops is not None:
        subs.append(item(0x53, struct.pack(">HH", *async_ops)))
    for uid, scu, scp in roles or []:
        subs.append(item(0x54, struct.pack(">H", len(uid)) + uid.encode() + bytes([scu, scp])))
    subs.append(item(0x55, b"TESTWIRE"))
    for uid, info in ext_neg or []:
        subs.append(item(0x56, struct.pack(">H", len(uid)) + uid.encode() + info))
    if identity is not None:
        kind, primary, secondary, positive = identity
        subs.append(item(0x58, struct.pack(">BBH", kind, positive, len(primary)) + primary
                         + struct.pack(">H", len(secondary)) + secondary))
    return item(0x50, b"".join(subs))


def associate_rq(called: str, calling: str, contexts: list[tuple[int, str, list[str]]], *,
                 user: bytes | None = None, protocol_version: int = 1) -> bytes:
    """A complete A-ASSOCIATE-RQ PDU."""
    body = (struct.pack(">HH", protocol_version, 0) + called.encode().ljust(16) + calling.encode().ljust(16)
            + b"\x00" * 32 + item(0x10, APP_CONTEXT)
            + b"".join(presentation_context(*cx) for cx in contexts) + (user or user_information()))
    return pdu(ASSOCIATE_RQ, body)


def _element(elem: int, value: bytes) -> bytes:
    if len(value) % 2:
        value += b"\x00"
    return struct.pack("<HHI", 0, elem, len(value)) + value


def command(fields: dict[int, bytes | int | str]) -> bytes:
    """A command set (group 0000, implicit VR little endian) with its group length; ints are US values."""
    body = b""
    for elem in sorted(fields):
        value = fields[elem]
        raw = struct.pack("<H", value) if isinstance(value, int) else _uid(value)
        body += _element(elem, raw)
    return struct.pack("<HHII", 0, 0, 4, len(body)) + body


def c_echo_rq(message_id: int = 1) -> bytes:
    return command({0x0002: VERIFICATION, 0x0100: C_ECHO_RQ, 0x0110: message_id, 0x0800: 0x0101})


def c_store_rq(sop_class: str, sop_instance: str, message_id: int = 1) -> bytes:
    return command({0x0002: sop_class, 0x0100: C_STORE_RQ, 0x0110: message_id, 0x0700: 0, 0x0800: 0x0000,
                    0x1000: sop_instance})


def p_data(context_id: int, data: bytes, *, is_command: bool, max_pdu: int = 16384) -> list[bytes]:
    """``data`` split into P-DATA-TF PDUs of at most ``max_pdu`` bytes, one PDV each."""
    room = max(max_pdu - 6, 1)
    out = []
    for start in range(0, max(len(data), 1), room):
        chunk = data[start:start + room]
        last = start + room >= len(data)
        mch = (1 if is_command else 0) | (2 if last else 0)
        out.append(pdu(P_DATA, struct.pack(">IBB", len(chunk) + 2, context_id, mch) + chunk))
    return out


def parse_command(data: bytes) -> dict[int, bytes]:
    """Element number -> raw value of a command set."""
    out, pos = {}, 0
    while pos + 8 <= len(data):
        _, elem, length = struct.unpack_from("<HHI", data, pos)
        out[elem] = data[pos + 8:pos + 8 + length]
        pos += 8 + length
    return out


def us(raw: bytes) -> int:
    return int(struct.unpack("<H", raw[:2])[0])


def uid_text(raw: bytes) -> str:
    return raw.rstrip(b"\x00 ").decode("ascii", "replace")


@dataclass
class AssociateAC:
    """What an A-ASSOCIATE-AC said."""

    contexts: dict[int, tuple[int, str]] = field(default_factory=dict)  # id -> (result, transfer syntax)
    max_pdu: int | None = None
    async_ops: tuple[int, int] | None = None
    roles: dict[str, tuple[int, int]] = field(default_factory=dict)
    ext_neg: dict[str, bytes] = field(default_factory=dict)
    identity_rsp: bytes | None = None
    sub_items: list[int] = field(default_factory=list)


def _items(data: bytes, start: int) -> list[tuple[int, bytes]]:
    out, pos = [], start
    while pos + 4 <= len(data):
        kind, length = data[pos], struct.unpack_from(">H", data, pos + 2)[0]
        out.append((kind, data[pos + 4:pos + 4 + length]))
        pos += 4 + length
    return out


def decode_ac(body: bytes) -> AssociateAC:
    """Parse the body of an A-ASSOCIATE-AC (after the 6-byte header)."""
    ac = AssociateAC()
    for kind, value in _items(body, 68):
        if kind == 0x21:
            ts = next((uid_text(v) for k, v in _items(value, 4) if k == 0x40), "")
            ac.contexts[value[0]] = (value[2], ts)
        elif kind == 0x50:
            for sub, v in _items(value, 0):
                ac.sub_items.append(sub)
                if sub == 0x51:
                    ac.max_pdu = struct.unpack(">I", v)[0]
                elif sub == 0x53:
                    ac.async_ops = struct.unpack(">HH", v)
                elif sub == 0x54:
                    n = struct.unpack_from(">H", v)[0]
                    ac.roles[v[2:2 + n].decode()] = (v[2 + n], v[3 + n])
                elif sub == 0x56:
                    n = struct.unpack_from(">H", v)[0]
                    ac.ext_neg[v[2:2 + n].decode()] = v[2 + n:]
                elif sub == 0x59:
                    ac.identity_rsp = v
    return ac


class Wire:
    """One TCP connection speaking raw PDUs."""

    def __init__(self, port: int, timeout_s: float = 10.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout_s)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._buf = b""

    def send(self, *pdus: bytes) -> None:
        self.sock.sendall(b"".join(pdus))

    def recv_pdu(self, timeout_s: float | None = None) -> tuple[int, bytes] | None:
        """The next PDU, or None when the peer closed the connection."""
        deadline = time.monotonic() + (timeout_s if timeout_s is not None else 1e9)
        while True:
            if len(self._buf) >= 6:
                kind, _, length = struct.unpack_from(">BBI", self._buf)
                if len(self._buf) >= 6 + length:
                    body = self._buf[6:6 + length]
                    self._buf = self._buf[6 + length:]
                    return kind, body
            self.sock.settimeout(max(deadline - time.monotonic(), 0.001))
            try:
                chunk = self.sock.recv(1 << 16)
            except ConnectionResetError:
                return None
            if not chunk:
                return None
            self._buf += chunk

    def recv_message(self, timeout_s: float = 10.0) -> tuple[int, dict[int, bytes]]:
        """Read P-DATA until one complete command set arrives: (context id, elements)."""
        data = b""
        while True:
            got = self.recv_pdu(timeout_s)
            assert got is not None, "connection closed while waiting for a DIMSE response"
            kind, body = got
            assert kind == P_DATA, f"expected P-DATA-TF, got PDU type {kind}: {body[:16].hex()}"
            pos = 0
            while pos < len(body):
                length = struct.unpack_from(">I", body, pos)[0]
                cid, mch = body[pos + 4], body[pos + 5]
                data += body[pos + 6:pos + 4 + length]
                pos += 4 + length
                if mch & 3 == 3:
                    return cid, parse_command(data)

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def __enter__(self) -> Wire:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def associate(port: int, contexts: list[tuple[int, str, list[str]]], *, called: str = "BONENODE",
              calling: str = "PYSCU", user: bytes | None = None) -> tuple[Wire, int, bytes]:
    """Open a connection and send an A-ASSOCIATE-RQ; returns (wire, answer PDU type, answer body)."""
    w = Wire(port)
    w.send(associate_rq(called, calling, contexts, user=user))
    got = w.recv_pdu(30)
    assert got is not None, "the node closed the connection without answering the A-ASSOCIATE-RQ"
    return w, got[0], got[1]
