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

Association policy (allowed callers, free disk, association limit) and the
DIMSE statuses are those of :mod:`dicomnode.scp`.
"""

from __future__ import annotations

import io
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
from dicomnode.dicomscan import check_complete
from dicomnode.dimse_status import RJ_APP_CONTEXT, RJ_PROTOCOL_VERSION, STATUS_SUCCESS, store_status
from dicomnode.errors import InvalidDatasetError, OutOfResourcesError
from dicomnode.journal import Journal
from dicomnode.metrics import record
from dicomnode.spool import Spool, StoreOutcome, _valid_uid

log = logging.getLogger(__name__)

__all__ = ["INLINE_MAX", "NativeServer", "apply_records", "supported_contexts", "validate"]

#: instances up to this size are held in memory while they arrive and go through the journal
INLINE_MAX = 4 << 20
_PDU_HEADER = struct.Struct(">BBI")
_MAX_PDU_BODY = 256 << 20
_FAST_SYNTAXES = frozenset({tsuid.ImplicitVRLittleEndian, tsuid.ExplicitVRLittleEndian} | {
    str(u) for u in tsuid.AllTransferSyntaxes if tsuid.UID(u).is_encapsulated})
_UID_TAGS = (0x00080016, 0x00080018, 0x0020000D, 0x0020000E)

def supported_contexts(transfer_syntaxes: list[str]) -> dict[str, list[str]]:
    """Abstract syntax -> acceptable transfer syntaxes (Verification and every storage SOP class)."""
    out = {str(cx.abstract_syntax): list(transfer_syntaxes) for cx in AllStoragePresentationContexts}
    out[str(Verification)] = [tsuid.ImplicitVRLittleEndian, tsuid.ExplicitVRLittleEndian]
    return out


def validate(payload: bytes | bytearray, meta_length: int, transfer_syntax: str) -> None:
    """Structural check of a received data set, and that it names its SOP class, instance, study and series.

    Raises
    ------
    InvalidDatasetError
        Truncated or malformed, or a UID missing or invalid.
    """
    fp = io.BytesIO(payload)
    fp.seek(meta_length)
    capture = dict.fromkeys(_UID_TAGS, b"")
    check_complete(fp, transfer_syntax, capture)
    uids = [_valid_uid(capture[t].decode("ascii", "replace")) for t in _UID_TAGS]
    missing = [n for n, v in zip(("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"), uids,
                                 strict=True) if v is None]
    if missing:
        raise InvalidDatasetError(f"received dataset lacks valid {', '.join(missing)}")


def apply_records(spool: Spool, items: list[tuple[bytes, dict[str, Any]]]) -> None:
    """Move journal records into the spool (one sync, one commit); unparseable ones go to quarantine.

    The quick check before the success status passed them, so a data set the spool rejects is rare
    (a value pydicom refuses); its bytes are kept under ``<storage_dir>/quarantine`` with an error line.
    """
    results = spool.store_batch([(payload, meta.get("assoc_id")) for payload, meta in items])
    for (payload, _), result in zip(items, results, strict=True):
        if isinstance(result, StoreOutcome):
            record("instance_stored", result is StoreOutcome.DUPLICATE)
            continue
        qdir = spool.storage_dir / "quarantine"
        qdir.mkdir(parents=True, exist_ok=True)
        target = qdir / f"{uuid.uuid4().hex}.dcm"
        with open(target, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        log.error("acknowledged instance cannot be indexed (%s); kept as %s", result, target)
        record("instance_rejected", "quarantined")


class _Closed(Exception):
    """The peer closed the connection."""


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
    """One accepted connection: negotiation, then DIMSE until release or abort."""

    def __init__(self, server: NativeServer, conn: socket.socket, peer: tuple[Any, ...]) -> None:
        self.server = server
        self.conn = conn
        self.peer_host = str(peer[0])
        self.aid = uuid.uuid4().hex
        self.buf = bytearray(1 << 17)
        self.peer_max_pdu = 0
        self.contexts: dict[int, str] = {}  # accepted context id -> transfer syntax
        self.calling = ""
        self.slot = False
        self.released = False

    # ---------------------------------------------------------------- socket helpers

    def _read_exact(self, n: int) -> memoryview:
        if len(self.buf) < n:
            self.buf = bytearray(n)
        view = memoryview(self.buf)[:n]
        got = 0
        while got < n:
            k = self.conn.recv_into(view[got:], n - got)
            if k == 0:
                raise _Closed
            got += k
        return view

    def _read_pdu(self) -> tuple[int, memoryview]:
        pdu_type, _, length = _PDU_HEADER.unpack(bytes(self._read_exact(6)))
        limit = self.server.node.max_pdu or _MAX_PDU_BODY  # what we announced (0: unlimited, within reason)
        if length > max(limit, 1 << 16):
            raise ul.ProtocolError(f"PDU of {length} bytes (maximum {limit})")
        return pdu_type, self._read_exact(length)

    def _send(self, data: bytes) -> None:
        self.conn.sendall(data)

    # ---------------------------------------------------------------- the association

    def run(self) -> None:
        node = self.server.node
        try:
            self.conn.settimeout(node.acse_timeout_s)
            if self.server.ssl_context is not None:
                self.conn = self.server.ssl_context.wrap_socket(self.conn, server_side=True)
            pdu_type, body = self._read_pdu()
            if pdu_type != ul.ASSOCIATE_RQ:
                raise ul.ProtocolError(f"expected A-ASSOCIATE-RQ, got PDU type {pdu_type}")
            if not self._accept(ul.decode_associate_rq(bytes(body))):
                return
            self.conn.settimeout(node.network_timeout_s)
            self._serve()
        except (_Closed, ConnectionError, TimeoutError, ssl.SSLError, OSError) as exc:
            if not self.released:
                log.warning("association %s from %s ended without release: %s", self.aid, self.peer_host,
                            type(exc).__name__)
        except ul.ProtocolError as exc:
            log.error("association %s from %s: protocol error, aborting: %s", self.aid, self.peer_host, exc)
            try:
                self._send(ul.abort_pdu(2, 0))
            except OSError:
                pass
        finally:
            if self.slot:
                if not self.released:
                    self.server.association_aborted(self.aid)
                self.server.policy.counter.release()
            try:
                self.conn.close()
            except OSError:
                pass

    def _accept(self, rq: ul.AssociateRQ) -> bool:
        self.calling = rq.calling_ae
        if not rq.protocol_version & 1:
            reject, reason = RJ_PROTOCOL_VERSION, f"protocol version {rq.protocol_version} not supported"
        elif rq.application_context != ul.APPLICATION_CONTEXT:
            reject, reason = RJ_APP_CONTEXT, f"application context {rq.application_context} not supported"
        else:
            reject, reason = self.server.policy.decide(rq.calling_ae, self.peer_host)
        if reject is not None:
            log.warning("rejecting association from AE %r at %s: %s", rq.calling_ae, self.peer_host, reason)
            self._send(ul.associate_rj(*reject))
            return False
        self.slot = True
        results = ul.negotiate(rq, self.server.contexts)
        self.contexts = {cx.context_id: ts for cx, result, ts in results if result == ul.ACCEPTANCE and ts}
        self.peer_max_pdu = rq.max_pdu
        self._send(ul.associate_ac(rq, results, max_pdu=self.server.node.max_pdu,
                                   implementation_class_uid=IMPLEMENTATION_CLASS_UID,
                                   implementation_version=IMPLEMENTATION_VERSION))
        self.server.association_opened(self.aid, rq.calling_ae, self.peer_host)
        return True

    def _serve(self) -> None:
        command = bytearray()
        cmd: ul.Command | None = None
        cmd_context = 0
        instance: _Instance | None = None
        try:
            while True:
                pdu_type, body = self._read_pdu()
                if pdu_type == ul.RELEASE_RQ:
                    self._send(ul.release_pdu(ul.RELEASE_RP))
                    self.released = True
                    self.server.association_released(self.aid)
                    return
                if pdu_type == ul.ABORT:
                    log.warning("association %s aborted by the peer", self.aid)
                    return
                if pdu_type != ul.P_DATA:
                    raise ul.ProtocolError(f"unexpected PDU type {pdu_type} during the association")
                for context_id, mch, fragment in ul.iter_pdvs(body):
                    if context_id not in self.contexts:
                        raise ul.ProtocolError(f"PDV on presentation context {context_id}, which was not accepted")
                    if mch & 1:
                        command += fragment
                        if mch & 2:
                            cmd, cmd_context = ul.decode_command(bytes(command)), context_id
                            command.clear()
                            instance = self._on_command(cmd, context_id)
                        continue
                    if cmd is None or instance is None or context_id != cmd_context:
                        raise ul.ProtocolError("data set fragment without a C-STORE request")
                    instance.add(fragment)
                    if mch & 2:
                        instance.finish()
                        status = self._store(cmd, self.contexts[context_id], instance)
                        self._respond(cmd, context_id, ul.C_STORE_RSP, status)
                        cmd, instance = None, None
        finally:
            if instance is not None:
                instance.discard()

    def _on_command(self, cmd: ul.Command, context_id: int) -> _Instance | None:
        if cmd.command_field == ul.C_ECHO_RQ:
            self._respond(cmd, context_id, ul.C_ECHO_RSP, STATUS_SUCCESS)
            return None
        if cmd.command_field != ul.C_STORE_RQ:
            raise ul.ProtocolError(f"unsupported DIMSE command 0x{cmd.command_field:04X}")
        if cmd.data_set_type == ul.NO_DATA_SET:
            raise ul.ProtocolError("C-STORE-RQ without a data set")
        head = ul.file_meta(cmd.sop_class_uid, cmd.sop_instance_uid, self.contexts[context_id],
                            implementation_class_uid=IMPLEMENTATION_CLASS_UID,
                            implementation_version=IMPLEMENTATION_VERSION, source_ae=self.calling)
        return _Instance(head, self.server.spool.tmp_dir)

    def _respond(self, cmd: ul.Command, context_id: int, field: int, status: int) -> None:
        rsp = ul.Command(command_field=field, responded_to=cmd.message_id, sop_class_uid=cmd.sop_class_uid,
                         sop_instance_uid=cmd.sop_instance_uid, status=status)
        for pdu in ul.p_data_pdus(context_id, ul.encode_command(rsp), command=True, max_pdu=self.peer_max_pdu):
            self._send(pdu)

    def _store(self, cmd: ul.Command, ts: str, instance: _Instance) -> int:
        sop = cmd.sop_instance_uid or "?"
        server = self.server
        if instance.error is not None:
            instance.discard()
            err = instance.error

            def spill_failed() -> None:
                raise OutOfResourcesError(f"cannot spool the data set: {err}")

            return store_status(sop, self.aid, spill_failed)
        if instance.path is not None or server.journal is None or ts not in _FAST_SYNTAXES:
            data: Any = instance.path if instance.path is not None else bytes(instance.buf)
            try:
                return store_status(sop, self.aid, lambda: server.spool.store(data, assoc_id=self.aid))
            finally:
                instance.discard()

        def fast() -> StoreOutcome | None:
            if not server.spool.disk_ok():
                raise OutOfResourcesError(f"free disk space below {server.spool.disk_min_free_gb:g} GiB")
            validate(instance.buf, instance.meta_length, ts)
            assert server.journal is not None
            if server.journal.append(instance.buf, {"assoc_id": self.aid}) is None:
                return server.spool.store(bytes(instance.buf), assoc_id=self.aid)
            return None

        return store_status(sop, self.aid, fast)


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
            self.sock.listen(64)
        except OSError:
            self.sock.close()
            raise
        self.sock.settimeout(0.5)
        self.port = int(self.sock.getsockname()[1])
        self._threads: list[threading.Thread] = []

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
