"""One association of the native SCP (:mod:`dicomnode.native_scp`): the acceptor's upper-layer state machine.

PS3.8 acceptor states in the order a connection passes them: wait for the
A-ASSOCIATE-RQ under the ARTIM deadline with PDUs capped at
``PRE_ASSOCIATION_MAX_PDU``; reject (A-ASSOCIATE-RJ, then ARTIM) or accept; DIMSE
(C-ECHO, C-STORE) with PDUs capped at the ``max_pdu`` announced; A-RELEASE-RP
or A-ABORT, then ARTIM again while the peer closes. Protocol errors become
A-ABORTs with the source and reason of PS3.8 9.3.8 (:class:`dicomnode.ul.ProtocolError`).
"""

from __future__ import annotations

import logging
import select
import socket
import time
import uuid
from typing import TYPE_CHECKING, Any

from dicomnode import ul
from dicomnode._identity import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION
from dicomnode.dimse_status import (
    RJ_APP_CONTEXT,
    RJ_CALLED_AE,
    RJ_LOCAL_LIMIT,
    RJ_PROTOCOL_VERSION,
    STATUS_SOP_CLASS_NOT_SUPPORTED,
    STATUS_SUCCESS,
    STATUS_UNRECOGNIZED_OPERATION,
    DataSetMismatchError,
    store_status,
)
from dicomnode.errors import OutOfResourcesError
from dicomnode.metrics import instance_rejected
from dicomnode.native_scp import _FAST_SYNTAXES, _PDU_HEADER, PRE_ASSOCIATION_MAX_PDU, _Instance
from dicomnode.spool import StoreOutcome

if TYPE_CHECKING:
    from dicomnode.native_scp import NativeServer

log = logging.getLogger(__name__)

__all__ = ["Association"]

_COMMAND_MAX = 64 << 10
#: a connection that has not completed its A-ASSOCIATE-RQ this long after connecting (seconds), with nothing it sent
#: waiting unread, may be closed to make room when the pending table is full (senders need milliseconds; a busy
#: client process may need a good part of a second)
EVICT_AFTER_S = 2.0


class _Closed(Exception):
    """The peer closed the connection."""


class _Discard:
    """The data set of a request the node refuses: read and dropped, then answered with ``status``."""

    path = None
    error = None

    def __init__(self, status: int, response_field: int) -> None:
        self.status = status
        self.response_field = response_field

    def add(self, fragment: memoryview) -> None:
        pass

    def finish(self) -> None:
        pass

    def discard(self) -> None:
        pass


class Association:
    """One accepted connection: negotiation, then DIMSE until release or abort (PS3.8 state machine, acceptor)."""

    def __init__(self, server: NativeServer, conn: socket.socket, peer: tuple[Any, ...]) -> None:
        self.server = server
        self.conn = conn
        self.peer_host = str(peer[0])
        self.aid = uuid.uuid4().hex
        self.buf = bytearray(4096)
        self.max_body = PRE_ASSOCIATION_MAX_PDU  # the negotiated maximum once the association is accepted
        self.deadline: float | None = None  # ARTIM: the whole request must arrive before this
        self.peer_max_pdu = 0
        self.contexts: dict[int, tuple[str, str]] = {}  # accepted context id -> (abstract syntax, transfer syntax)
        self.calling = ""
        self.slot = False
        self.pending = True  # counted in the server's connections without an association
        self.evicted = False  # refused by the accept loop to make room (max_pending_connections)
        self.rq_read = False  # the whole A-ASSOCIATE-RQ was read: never evicted from then on
        self.released = False

    # ---------------------------------------------------------------- socket helpers

    def _recv_into(self, view: memoryview) -> int:
        if self.deadline is not None:
            remaining = self.deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("ARTIM timer expired")
            self.conn.settimeout(remaining)
        k = self.conn.recv_into(view, len(view))
        if k == 0:
            raise _Closed
        return k

    def _read(self, n: int) -> memoryview:
        """``n`` bytes into the reusable buffer, which grows only as bytes arrive (never by what a header claims)."""
        got = 0
        while got < n:
            if got == len(self.buf):
                grown = bytearray(min(n, max(2 * len(self.buf), 1 << 16)))
                grown[:got] = self.buf[:got]
                self.buf = grown
            got += self._recv_into(memoryview(self.buf)[got:min(n, len(self.buf))])
        return memoryview(self.buf)[:n]

    def _read_pdu(self) -> tuple[int, memoryview]:
        pdu_type, _, length = _PDU_HEADER.unpack(bytes(self._read(6)))
        if not ul.ASSOCIATE_RQ <= pdu_type <= ul.ABORT:
            raise ul.ProtocolError(f"unrecognized PDU type 0x{pdu_type:02X}", ul.UNRECOGNIZED_PDU)
        if length > self.max_body:
            raise ul.ProtocolError(f"PDU of {length} bytes exceeds the maximum of {self.max_body}",
                                   ul.INVALID_PDU_PARAMETER)
        return pdu_type, self._read(length)

    def _send(self, data: bytes) -> None:
        self.conn.sendall(data)

    def _linger(self) -> None:
        """ARTIM after A-ASSOCIATE-RJ, A-RELEASE-RP or A-ABORT: let the peer close first (at most acse_timeout_s).

        Closing at once could reset the connection before the peer has read our last PDU.
        """
        self._set_pending(True, lingering=True)
        self.deadline = None
        end = time.monotonic() + self.server.node.acse_timeout_s
        scratch = memoryview(bytearray(4096))
        try:
            while (left := end - time.monotonic()) > 0 and not self.server.stopping:
                self.conn.settimeout(min(left, 0.5))
                try:
                    if self.conn.recv_into(scratch) == 0:
                        return
                except TimeoutError:
                    continue
        except OSError:
            pass

    def _set_pending(self, pending: bool, *, lingering: bool = False) -> None:
        if self.evicted:
            return
        self.pending = pending
        if pending:
            self.server.pending_enter(self, lingering=lingering)
        else:
            self.server.pending_leave(self)

    def evictable(self, age_s: float) -> bool:
        """May be closed to make room (still waiting for its A-ASSOCIATE-RQ, ``age_s`` after connecting).

        True when the peer has not completed its request ``EVICT_AFTER_S`` after connecting (silent, or
        stalled part way); never while bytes it sent wait unread (then the node is the slow one).
        """
        if age_s < EVICT_AFTER_S or self.rq_read or self.released or self.slot:
            return False
        try:
            readable, _, _ = select.select([self.conn], [], [], 0)
        except (OSError, ValueError):
            return True
        return not readable

    def evict(self, *, lingering: bool) -> None:
        """Refuse this connection to make room for a new one (called by the accept loop under its pending lock).

        One that waits for its A-ASSOCIATE-RQ gets an A-ASSOCIATE-RJ (transient, local limit) followed by
        our FIN, on plain TCP: a slow but honest sender learns it was refused, never sees a bare close. Its
        thread goes on draining what the peer sends until the peer closes or the ARTIM deadline passes, so
        the close never resets the connection before the peer read the rejection. One that lingers after
        its answer (and a TLS connection, where no plain PDU may be sent) is shut down at once.
        """
        self.evicted = True
        try:
            if lingering or self.server.ssl_context is not None:
                self.conn.shutdown(socket.SHUT_RDWR)
                return
            self.conn.send(ul.associate_rj(*RJ_LOCAL_LIMIT))  # 10 bytes into an empty send buffer
            self.conn.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def _request_read(self) -> bool:
        """Mark the A-ASSOCIATE-RQ as read; False when the accept loop refused this connection first."""
        with self.server.pending_lock:
            if self.evicted:
                return False
            self.rq_read = True
            return True

    def _drain_until_closed(self) -> None:
        """Read and drop what the peer sends until it closes or the ARTIM deadline passes."""
        scratch = memoryview(bytearray(4096))
        try:
            while not self.server.stopping:
                self._recv_into(scratch)
        except (_Closed, OSError):
            pass

    # ---------------------------------------------------------------- the association

    def run(self) -> None:
        node = self.server.node
        try:
            self.deadline = time.monotonic() + node.acse_timeout_s
            self.conn.settimeout(node.acse_timeout_s)
            if self.server.ssl_context is not None:
                self.conn = self.server.ssl_context.wrap_socket(self.conn, server_side=True)
            pdu_type, body = self._read_pdu()
            if not self._request_read():  # refused to make room while its request arrived: it has the RJ
                self._drain_until_closed()
                return
            if pdu_type != ul.ASSOCIATE_RQ:
                raise ul.ProtocolError(f"expected A-ASSOCIATE-RQ, got PDU type {pdu_type}", ul.UNEXPECTED_PDU)
            if not self._accept(ul.decode_associate_rq(bytes(body))):
                self._linger()
                return
            self._set_pending(False)
            self.deadline, self.max_body = None, node.max_pdu
            self.buf = bytearray(4096)
            self.conn.settimeout(node.network_timeout_s)
            if self._serve():
                self._release_slot()
                self._linger()
        except (_Closed, ConnectionError, TimeoutError, OSError) as exc:
            if self.evicted and not self.slot:
                log.warning("connection from %s refused while waiting for its A-ASSOCIATE-RQ, to make room for a"
                            " new one (max_pending_connections)", self.peer_host)
                if not isinstance(exc, _Closed | TimeoutError):
                    self._drain_until_closed()
            elif not self.released:
                log.warning("association %s from %s ended without release: %s", self.aid, self.peer_host,
                            type(exc).__name__)
        except ul.ProtocolError as exc:
            log.error("association %s from %s: protocol error, aborting (source %d, reason %d): %s", self.aid,
                      self.peer_host, exc.source, exc.reason, exc)
            try:
                self._send(ul.abort_pdu(exc.source, exc.reason))
                self._release_slot()
                self._linger()
            except OSError:
                pass
        finally:
            self._release_slot()
            self._set_pending(False)
            try:
                self.conn.close()
            except OSError:
                pass

    def _release_slot(self) -> None:
        if self.slot:
            self.slot = False
            if not self.released:
                self.server.association_aborted(self.aid)
            self.server.policy.counter.release()

    def _accept(self, rq: ul.AssociateRQ) -> bool:
        self.calling = rq.calling_ae
        node = self.server.node
        if not rq.protocol_version & 1:
            reject, reason = RJ_PROTOCOL_VERSION, f"protocol version {rq.protocol_version} not supported"
        elif rq.application_context != ul.APPLICATION_CONTEXT:
            reject, reason = RJ_APP_CONTEXT, f"application context {rq.application_context} not supported"
        elif node.check_called_ae_title and rq.called_ae != node.ae_title.strip():
            reject, reason = RJ_CALLED_AE, f"called AE title {rq.called_ae!r} not recognized"
        else:
            reject, reason = self.server.policy.decide(rq.calling_ae, self.peer_host)
        if reject is not None:
            log.warning("rejecting association from AE %r at %s: %s", rq.calling_ae, self.peer_host, reason)
            self._send(ul.associate_rj(*reject))
            return False
        self.slot = True
        results = ul.negotiate(rq, self.server.contexts)
        self.contexts = {cx.context_id: (cx.abstract_syntax, ts) for cx, result, ts in results
                         if result == ul.ACCEPTANCE and ts}
        self.peer_max_pdu = rq.max_pdu
        self._send(ul.associate_ac(rq, results, max_pdu=node.max_pdu,
                                   implementation_class_uid=IMPLEMENTATION_CLASS_UID,
                                   implementation_version=IMPLEMENTATION_VERSION))
        self.server.association_opened(self.aid, rq.calling_ae, self.peer_host)
        return True

    def _serve(self) -> bool:
        """DIMSE until A-RELEASE-RQ (returns True) or A-ABORT (False); a pending data set is never left behind."""
        command = bytearray()
        cmd: ul.Command | None = None
        cmd_context = 0
        sink: _Instance | _Discard | None = None
        try:
            while True:
                pdu_type, body = self._read_pdu()
                if pdu_type == ul.RELEASE_RQ:
                    if sink is not None or command:
                        raise ul.DimseError("A-RELEASE-RQ in the middle of a DIMSE message")
                    self._send(ul.release_pdu(ul.RELEASE_RP))
                    self.released = True
                    self.server.association_released(self.aid)
                    return True
                if pdu_type == ul.ABORT:
                    log.warning("association %s aborted by the peer", self.aid)
                    return False
                if pdu_type != ul.P_DATA:
                    raise ul.ProtocolError(f"unexpected PDU type {pdu_type} during the association", ul.UNEXPECTED_PDU)
                for context_id, mch, fragment in ul.iter_pdvs(body):
                    if context_id not in self.contexts:
                        raise ul.ProtocolError(f"PDV on presentation context {context_id}, which was not accepted")
                    if mch & 1:
                        if sink is not None:
                            raise ul.DimseError("a command arrived before the previous data set was complete")
                        command += fragment
                        if len(command) > _COMMAND_MAX:
                            raise ul.DimseError(f"command set longer than {_COMMAND_MAX} bytes")
                        if mch & 2:
                            cmd, cmd_context = ul.decode_command(bytes(command)), context_id
                            command.clear()
                            sink = self._on_command(cmd, context_id)
                        continue
                    if cmd is None or sink is None or context_id != cmd_context:
                        raise ul.DimseError("data set fragment without a C-STORE request")
                    sink.add(fragment)
                    if mch & 2:
                        sink.finish()
                        if isinstance(sink, _Discard):
                            self._respond(cmd, context_id, sink.response_field, sink.status)
                        else:
                            status = self._store(cmd, self.contexts[context_id][1], sink)
                            self._respond(cmd, context_id, ul.C_STORE_RSP, status)
                        cmd, sink = None, None
        finally:
            if sink is not None:
                sink.discard()

    def _on_command(self, cmd: ul.Command, context_id: int) -> _Instance | _Discard | None:
        """Answer C-ECHO; return where a request's data set goes (refused requests: dropped, then answered)."""
        has_data = cmd.data_set_type != ul.NO_DATA_SET
        if cmd.command_field & 0x8000:
            raise ul.DimseError(f"unexpected DIMSE response 0x{cmd.command_field:04X}")
        if cmd.command_field == ul.C_ECHO_RQ and not has_data:
            self._respond(cmd, context_id, ul.C_ECHO_RSP, STATUS_SUCCESS)
            return None
        if cmd.command_field != ul.C_STORE_RQ:
            log.warning("association %s: DIMSE command 0x%04X is not provided", self.aid, cmd.command_field)
            if has_data:
                return _Discard(STATUS_UNRECOGNIZED_OPERATION, cmd.command_field | 0x8000)
            self._respond(cmd, context_id, cmd.command_field | 0x8000, STATUS_UNRECOGNIZED_OPERATION)
            return None
        if not has_data:
            raise ul.DimseError("C-STORE-RQ without a data set")
        abstract, ts = self.contexts[context_id]
        if cmd.sop_class_uid != abstract:
            log.warning("association %s: C-STORE of SOP class %s on a presentation context for %s", self.aid,
                        cmd.sop_class_uid, abstract)
            instance_rejected("sop_class_mismatch")
            return _Discard(STATUS_SOP_CLASS_NOT_SUPPORTED, ul.C_STORE_RSP)
        head = ul.file_meta(cmd.sop_class_uid, cmd.sop_instance_uid, ts,
                            implementation_class_uid=IMPLEMENTATION_CLASS_UID,
                            implementation_version=IMPLEMENTATION_VERSION, source_ae=self.calling)
        return _Instance(head, self.server.spool.tmp_dir)

    def _respond(self, cmd: ul.Command, context_id: int, field: int, status: int) -> None:
        rsp = ul.Command(command_field=field, responded_to=cmd.message_id, sop_class_uid=cmd.sop_class_uid,
                         sop_instance_uid=cmd.sop_instance_uid, status=status)
        for pdu in ul.p_data_pdus(context_id, ul.encode_command(rsp), command=True, max_pdu=self.peer_max_pdu):
            self._send(pdu)

    def _store(self, cmd: ul.Command, ts: str, instance: _Instance) -> int:
        """Parse the data set, check it against its request, make it durable; the DIMSE status.

        Success goes out only after the spool's own parse accepted the data set (so it is never
        quarantined later) and the bytes are in the fsynced journal or the spool.
        """
        sop = cmd.sop_instance_uid or "?"
        server = self.server
        spool = server.spool

        def store() -> StoreOutcome | None:
            if instance.error is not None:
                raise OutOfResourcesError(f"cannot spool the data set: {instance.error}")
            if not spool.disk_ok():
                raise OutOfResourcesError(f"free disk space below {spool.disk_min_free_gb:g} GiB")
            data: Any = instance.path if instance.path is not None else instance.buf
            ident = spool.identify(data, dataset_offset=instance.meta_length)  # the meta is ours
            if ident.sop_class != cmd.sop_class_uid or ident.sop != cmd.sop_instance_uid:
                raise DataSetMismatchError("the data set's SOP Class / Instance UID differ from the C-STORE-RQ's")
            if instance.path is None and server.journal is not None and ts in _FAST_SYNTAXES:
                if server.journal.append(instance.buf, {"assoc_id": self.aid, "ident": ident.to_json()},
                                         adler32=instance.adler) is not None:
                    return None
            return spool.store(data if instance.path is not None else bytes(data), assoc_id=self.aid, ident=ident)

        try:
            return store_status(sop, self.aid, store)
        finally:
            instance.discard()
