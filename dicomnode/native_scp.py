"""The node's own storage SCP: DICOM upper layer on plain sockets, C-STORE acknowledged from the journal.

Why not pynetdicom here: its reactors poll with 1 ms sleeps and decode every PDU
in Python objects, which caps one process near 230 images/s on this machine
whatever the handler does (benchmarks/README.md). This acceptor reads PDUs into
one reusable buffer, appends data fragments to the instance's bytes and, once
the last fragment is in, answers after one durable journal append
(:mod:`dicomnode.journal`): the same fsync-before-success guarantee as the
spool, at a fraction of the cost. The spool is filled from the journal by a
materializer thread, in order; association releases travel through the same
queue so expected instance counts are only derived once every instance of the
association is indexed.

Instances that the journal does not take (larger than ``INLINE_MAX`` bytes,
deflated or big-endian transfer syntaxes, no journal configured) are streamed
to a temp file in the spool and stored synchronously, as before.

Memory is bounded before and after authentication: a PDU body is read into a
buffer that grows only as its bytes arrive; until the association is accepted
no PDU may exceed ``PRE_ASSOCIATION_MAX_PDU`` (64 KiB), afterwards none may
exceed the ``node.max_pdu`` the node announced (A-ABORT otherwise). Connections
without an association count toward ``node.max_pending_connections`` and are
closed by the ARTIM timer (``node.acse_timeout_s``, a deadline for the whole
A-ASSOCIATE-RQ); after A-ASSOCIATE-RJ, A-RELEASE-RP and A-ABORT the node lets
the peer close first, again for at most the ARTIM time.

Success is answered only after the spool's own parse accepted the data set, its
UIDs matched the C-STORE-RQ, and the bytes were durable.

Association policy (allowed callers, called AE title, free disk, association
limit) and the DIMSE statuses are those of :mod:`dicomnode.scp` and
:mod:`dicomnode.dimse_status`.
"""

from __future__ import annotations

import logging
import os
import socket
import ssl
import struct
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydicom import uid as tsuid
from pynetdicom import AllStoragePresentationContexts
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from dicomnode import ul
from dicomnode._identity import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION
from dicomnode.config import NodeConfig
from dicomnode.dimse_status import (
    RJ_APP_CONTEXT,
    RJ_CALLED_AE,
    RJ_PROTOCOL_VERSION,
    STATUS_SOP_CLASS_NOT_SUPPORTED,
    STATUS_SUCCESS,
    STATUS_UNRECOGNIZED_OPERATION,
    DataSetMismatchError,
    store_status,
)
from dicomnode.errors import OutOfResourcesError
from dicomnode.journal import Journal
from dicomnode.metrics import record
from dicomnode.quarantine import quarantine
from dicomnode.spool import Identity, Spool, StoreOutcome

log = logging.getLogger(__name__)

__all__ = ["INLINE_MAX", "PRE_ASSOCIATION_MAX_PDU", "NativeServer", "apply_records", "supported_contexts"]

#: instances up to this size are held in memory while they arrive and go through the journal
INLINE_MAX = 4 << 20
#: largest PDU read before an association is accepted (an A-ASSOCIATE-RQ with 128 contexts is ~40 KiB)
PRE_ASSOCIATION_MAX_PDU = 64 << 10
_COMMAND_MAX = 64 << 10
_PDU_HEADER = struct.Struct(">BBI")
_FAST_SYNTAXES = frozenset({tsuid.ImplicitVRLittleEndian, tsuid.ExplicitVRLittleEndian} | {
    str(u) for u in tsuid.AllTransferSyntaxes if tsuid.UID(u).is_encapsulated})


def supported_contexts(transfer_syntaxes: list[str]) -> dict[str, list[str]]:
    """Abstract syntax -> acceptable transfer syntaxes (Verification and every storage SOP class)."""
    out = {str(cx.abstract_syntax): list(transfer_syntaxes) for cx in AllStoragePresentationContexts}
    out[str(Verification)] = [tsuid.ImplicitVRLittleEndian, tsuid.ExplicitVRLittleEndian]
    return out


def apply_records(spool: Spool, items: list[tuple[bytes, dict[str, Any]]]) -> None:
    """Move journal records into the spool (one sync, one commit); unparseable ones go to quarantine.

    The receiver parsed every record before its success status (the identity travels in the record),
    so a record the spool refuses is one written by an older version or replayed from an old journal;
    its bytes are kept by :func:`dicomnode.quarantine.quarantine`, listed by ``dicomnode status``.
    """
    batch = [(payload, meta.get("assoc_id"), Identity.from_json(meta["ident"]) if meta.get("ident") else None)
             for payload, meta in items]
    results = spool.store_batch(batch)
    for (payload, meta), result in zip(items, results, strict=True):
        if isinstance(result, StoreOutcome):
            record("instance_stored", result.value)
            continue
        quarantine(spool.storage_dir, payload, kind="invalid_dataset", reason=str(result),
                   sop_instance_uid=(meta.get("ident") or {}).get("sop"), assoc_id=meta.get("assoc_id"))
        record("instance_rejected", "quarantined")


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


class _Instance:
    """The bytes of one incoming data set: in memory up to ``INLINE_MAX``, then in a temp file."""

    def __init__(self, head: bytes, tmp_dir: Path) -> None:
        self.buf = bytearray(head)
        self.meta_length = len(head)
        self._tmp_dir = tmp_dir
        self.file: Any = None
        self.path: Path | None = None
        self.error: OSError | None = None  # the spill file could not be written (disk full): answer 0xA700

    def add(self, fragment: memoryview) -> None:
        if self.error is not None:
            return  # keep reading the peer's fragments, answer once the data set is complete
        try:
            if self.file is None and len(self.buf) + len(fragment) > INLINE_MAX:
                self.path = self._tmp_dir / f"{uuid.uuid4().hex}.recv"
                self.file = open(self.path, "wb")  # noqa: SIM115 - closed in finish/discard
                self.file.write(self.buf)
                self.buf = bytearray()
            if self.file is not None:
                self.file.write(fragment)
            else:
                self.buf += fragment
        except OSError as exc:
            self.error = exc
            self.discard()

    def finish(self) -> None:
        if self.file is not None:
            try:
                self.file.close()
            except OSError as exc:
                self.error = exc

    def discard(self) -> None:
        if self.file is not None:
            try:
                self.file.close()
            except OSError:
                pass
            self.file = None
        if self.path is not None:
            try:
                self.path.unlink(missing_ok=True)
            except OSError:
                log.warning("cannot remove partial file %s", self.path)


class _Association:
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
        self._set_pending(True)
        self.deadline = time.monotonic() + self.server.node.acse_timeout_s
        scratch = memoryview(bytearray(4096))
        try:
            while True:
                self._recv_into(scratch)
        except (_Closed, OSError):
            pass

    def _set_pending(self, pending: bool) -> None:
        if pending != self.pending:
            self.pending = pending
            self.server.count_pending(+1 if pending else -1)

    # ---------------------------------------------------------------- the association

    def run(self) -> None:
        node = self.server.node
        try:
            self.deadline = time.monotonic() + node.acse_timeout_s
            self.conn.settimeout(node.acse_timeout_s)
            if self.server.ssl_context is not None:
                self.conn = self.server.ssl_context.wrap_socket(self.conn, server_side=True)
            pdu_type, body = self._read_pdu()
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
            if not self.released:
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
            record("instance_rejected", "sop_class_mismatch")
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
            ident = spool.identify(data)
            if ident.sop_class != cmd.sop_class_uid or ident.sop != cmd.sop_instance_uid:
                raise DataSetMismatchError("the data set's SOP Class / Instance UID differ from the C-STORE-RQ's")
            if instance.path is None and server.journal is not None and ts in _FAST_SYNTAXES:
                if server.journal.append(instance.buf, {"assoc_id": self.aid, "ident": ident.to_json()}) is not None:
                    return None
            return spool.store(data if instance.path is not None else bytes(data), assoc_id=self.aid, ident=ident)

        try:
            return store_status(sop, self.aid, store)
        finally:
            instance.discard()


class NativeServer:
    """Listening socket plus one thread per association; optional journal with its materializer thread.

    Parameters
    ----------
    node:
        The node configuration (AE title, timeouts, PDU size, TLS).
    spool:
        Where instances end up.
    policy:
        :class:`dicomnode.scp._Policy` (allowed callers, disk, association limit).
    contexts:
        Abstract syntax -> accepted transfer syntaxes in order of preference.
    journal:
        The journal acknowledged instances go through, or None to store synchronously.
    on_release:
        Called after a released association's instances are all in the spool.
    """

    def __init__(self, node: NodeConfig, spool: Spool, policy: Any, contexts: dict[str, list[str]], *,
                 journal: Journal | None, on_release: Callable[[], None] | None = None, reuse_port: bool = False,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        self.node = node
        self.spool = spool
        self.policy = policy
        self.contexts = contexts
        self.journal = journal
        self.on_release = on_release
        self.ssl_context = ssl_context
        self._stop = threading.Event()
        family = socket.AF_INET6 if ":" in node.host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        try:
            self.sock.bind((node.host, node.port))
            self.sock.listen(128)
        except OSError:
            self.sock.close()
            raise
        self.sock.settimeout(0.5)
        self.port = int(self.sock.getsockname()[1])
        self._threads: list[threading.Thread] = []
        self._pending = 0  # connections without an association (before A-ASSOCIATE-AC, or lingering after)
        self._pending_lock = threading.Lock()
        self._last_refusal_log = 0.0

    def count_pending(self, delta: int) -> None:
        """Add ``delta`` to the connections without an association."""
        with self._pending_lock:
            self._pending += delta

    def _admit(self) -> bool:
        """Count a new connection as pending, or refuse it when ``max_pending_connections`` are open."""
        with self._pending_lock:
            if self._pending >= self.node.max_pending_connections:
                return False
            self._pending += 1
            return True

    # ---------------------------------------------------------------- bookkeeping (association threads)

    def association_opened(self, aid: str, calling: str, host: str) -> None:
        try:
            self.spool.open_association(aid, calling, host)
        except Exception:  # noqa: BLE001 - bookkeeping must not break the association
            log.exception("cannot record association %s", aid)
        log.info("association %s accepted from AE %r at %s", aid, calling, host)

    def association_released(self, aid: str) -> None:
        log.info("association %s released", aid)
        if self.journal is not None:
            self.journal.post("release", aid)
        else:
            self._on_event("release", aid)

    def association_aborted(self, aid: str) -> None:
        if self.journal is not None:
            self.journal.post("abort", aid)
        else:
            self._on_event("abort", aid)

    def _on_event(self, kind: str, aid: str) -> None:
        if kind == "release":
            self.spool.release_association(aid)
            if self.on_release is not None:
                self.on_release()
        elif kind == "abort":
            self.spool.abort_association(aid)

    def _apply(self, items: list[tuple[bytes, dict[str, Any]]]) -> None:
        apply_records(self.spool, items)

    def _report_backlog(self) -> None:
        """Tell the assembler (through the index) while acknowledged instances wait in the journal."""
        assert self.journal is not None
        name, last = self.journal.path.name, -1
        while not self._stop.wait(0.25):
            n = self.journal.backlog()
            if n or last:
                try:
                    self.spool.set_journal_backlog(name, n)
                except Exception:  # noqa: BLE001 - a busy database must not stop the reports
                    log.exception("cannot report the journal backlog")
                    continue
            last = n
        try:
            self.spool.set_journal_backlog(name, 0)
        except Exception:  # noqa: BLE001
            log.exception("cannot report the journal backlog")

    # ---------------------------------------------------------------- threads

    def start(self) -> None:
        """Start the accept loop (and the materializer) in daemon threads."""
        accept = threading.Thread(target=self._accept_loop, name=f"dicomnode-scp:{self.port}", daemon=True)
        accept.start()
        self._threads.append(accept)
        if self.journal is not None:
            journal = self.journal
            mat = threading.Thread(target=journal.run_materializer, args=(self._apply, self._on_event, self._stop),
                                   name="dicomnode-materializer", daemon=True)
            mat.start()
            self._threads.append(mat)
            rep = threading.Thread(target=self._report_backlog, name="dicomnode-journal-backlog", daemon=True)
            rep.start()
            self._threads.append(rep)
            fill = threading.Thread(target=journal.run_prefill, args=(self._stop,), name="dicomnode-journal-prefill",
                                    daemon=True)
            fill.start()
            self._threads.append(fill)
        log.info("SCP %s listening on %s:%d (pid %d, native, journal %s)", self.node.ae_title, self.node.host,
                 self.port, os.getpid(), "on" if self.journal is not None else "off")

    def _accept_loop(self) -> None:
        assoc_threads: list[threading.Thread] = []
        while not self._stop.is_set():
            try:
                conn, peer = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                if self._stop.is_set():
                    break
                log.exception("accept failed")
                time.sleep(0.1)
                continue
            if not self._admit():
                now = time.monotonic()
                if now - self._last_refusal_log > 10.0:
                    self._last_refusal_log = now
                    log.warning("%d connections without an association are open (max_pending_connections); "
                                "closing a new one from %s", self.node.max_pending_connections, peer[0])
                conn.close()
                continue
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn.settimeout(None)
            t = threading.Thread(target=_Association(self, conn, peer).run, name="dicomnode-assoc", daemon=True)
            t.start()
            assoc_threads = [a for a in assoc_threads if a.is_alive()] + [t]
        for t in assoc_threads:
            t.join(5.0)

    def shutdown(self, timeout_s: float = 10.0) -> None:
        """Stop accepting, let open associations end, drain the journal into the spool."""
        self._stop.set()
        try:
            self.sock.close()
        except OSError:
            pass
        deadline = time.monotonic() + timeout_s
        for t in self._threads:
            t.join(max(deadline - time.monotonic(), 0.1))
        if self.journal is not None:
            self.journal.close()
