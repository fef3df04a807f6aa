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
no PDU may exceed ``PRE_ASSOCIATION_MAX_PDU`` (256 KiB), afterwards none may
exceed the ``node.max_pdu`` the node announced (A-ABORT otherwise). Connections
without an association count toward ``node.max_pending_connections`` (when all
are taken, a lingering, silent or stalled one is closed to make room, see
:meth:`NativeServer._admit`) and are closed by the ARTIM timer (``node.acse_timeout_s``, a deadline for the whole
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
import selectors
import socket
import ssl
import struct
import threading
import time
import uuid
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydicom import uid as tsuid
from pynetdicom import AllStoragePresentationContexts
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from dicomnode import ul
from dicomnode.config import NodeConfig
from dicomnode.dimse_status import RJ_CALLING_AE, RJ_LOCAL_LIMIT
from dicomnode.journal import Journal, JournalPayload
from dicomnode.metrics import instance_rejected, instance_stored
from dicomnode.quarantine import quarantine
from dicomnode.spool import Identity, Spool, StoreOutcome

log = logging.getLogger(__name__)

__all__ = ["INLINE_MAX", "PRE_ASSOCIATION_MAX_PDU", "NativeServer", "apply_records", "supported_contexts"]

#: instances up to this size are held in memory while they arrive and go through the journal
INLINE_MAX = 4 << 20
#: largest PDU read before an association is accepted: 128 contexts x 38 transfer syntaxes (dcmtk's
#: ``--propose-pc 128 --propose-ts 38``) is ~130 KiB; read as it arrives, so 64 pending connections stay < 16 MiB
PRE_ASSOCIATION_MAX_PDU = 256 << 10
_MAX_REFUSED = 1024  # connections above max_pending_connections waiting to read their A-ASSOCIATE-RJ
_PDU_HEADER = struct.Struct(">BBI")
_FAST_SYNTAXES = frozenset({tsuid.ImplicitVRLittleEndian, tsuid.ExplicitVRLittleEndian} | {
    str(u) for u in tsuid.AllTransferSyntaxes if tsuid.UID(u).is_encapsulated})


def supported_contexts(transfer_syntaxes: list[str]) -> dict[str, list[str]]:
    """Abstract syntax -> acceptable transfer syntaxes (Verification and every storage SOP class)."""
    out = {str(cx.abstract_syntax): list(transfer_syntaxes) for cx in AllStoragePresentationContexts}
    out[str(Verification)] = [tsuid.ImplicitVRLittleEndian, tsuid.ExplicitVRLittleEndian]
    return out


def apply_records(spool: Spool, items: list[tuple[bytes | JournalPayload, dict[str, Any]]]) -> None:
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
            instance_stored(result.value)
            continue
        quarantine(spool.storage_dir, bytes(payload), kind="invalid_dataset", reason=str(result),
                   sop_instance_uid=(meta.get("ident") or {}).get("sop"), assoc_id=meta.get("assoc_id"))
        instance_rejected("quarantined")


class _Instance:
    """The bytes of one incoming data set: in memory up to ``INLINE_MAX``, then in a temp file."""

    def __init__(self, head: bytes, tmp_dir: Path) -> None:
        self.buf = bytearray(head)
        self.meta_length = len(head)
        self.adler = zlib.adler32(head)  # of the bytes in memory, kept as fragments arrive (the journal's checksum)
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
                self.adler = zlib.adler32(fragment, self.adler)
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


class NativeServer:
    """Listening socket plus one thread per association; optional journal with its materializer thread.

    Parameters
    ----------
    node:
        The node configuration (AE title, timeouts, PDU size, TLS).
    spool:
        Where instances end up.
    policy:
        :class:`dicomnode.scp_policy.AssociationPolicy` (allowed callers, disk, association limit).
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
        self._selector = selectors.DefaultSelector()  # registered before any shutdown() can close the socket
        self._selector.register(self.sock, selectors.EVENT_READ)
        # connections without an association: waiting for their A-ASSOCIATE-RQ, or lingering after RJ/RP/abort
        self._pending: dict[Any, tuple[float, bool]] = {}  # association -> (since, lingering)
        self.pending_lock = threading.Lock()  # also orders an eviction against the request being read
        self._last_refusal_log = 0.0

    @property
    def stopping(self) -> bool:
        """True once :meth:`shutdown` was called (lingering connections close at once)."""
        return self._stop.is_set()

    def pending_enter(self, assoc: Any, *, lingering: bool) -> None:
        """Count ``assoc`` as a connection without an association (again, or now lingering)."""
        with self.pending_lock:
            self._pending[assoc] = (time.monotonic(), lingering)

    def pending_leave(self, assoc: Any) -> None:
        """``assoc`` was accepted or closed."""
        with self.pending_lock:
            self._pending.pop(assoc, None)

    def _admit(self, assoc: Any) -> bool:
        """Count a new connection as pending; when ``max_pending_connections`` are open, make room or refuse.

        Room is made by closing a lingering connection (already answered), else the oldest one that has not
        completed its A-ASSOCIATE-RQ 2 s after connecting while nothing it sent waits unread
        (:meth:`dicomnode.native_assoc.Association.evictable`): a sender's request follows its connect within
        milliseconds, so silent or stalling peers cannot keep senders out.
        """
        now = time.monotonic()
        with self.pending_lock:
            if len(self._pending) >= self.node.max_pending_connections:
                by_age = sorted(self._pending.items(), key=lambda kv: kv[1][0])
                victim = next((a for a, (_, lingering) in by_age if lingering), None)
                lingering = victim is not None
                if victim is None:
                    victim = next((a for a, (since, _) in by_age if a.evictable(now - since)), None)
                if victim is None:
                    return False
                del self._pending[victim]
                victim.evict(lingering=lingering)
            self._pending[assoc] = (now, False)
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

    def _apply(self, items: list[tuple[bytes | JournalPayload, dict[str, Any]]]) -> None:
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
                                   kwargs={"lazy_payloads": True}, name="dicomnode-materializer", daemon=True)
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
        """Accept connections; above ``max_pending_connections`` answer A-ASSOCIATE-RJ (transient, local limit).

        Refused connections stay in this thread's selector until the peer closes (its unread request is
        drained, so the close does not reset the connection before the peer read the rejection) or the
        ARTIM time passes.
        """
        from dicomnode.native_assoc import Association

        assoc_threads: list[threading.Thread] = []
        sel = self._selector
        refused: dict[socket.socket, float] = {}
        while not self._stop.is_set():
            try:
                events = sel.select(0.5)
            except OSError:
                break
            for key, _ in events:
                if key.fileobj is not self.sock:
                    self._drain_refused(sel, refused, key.fileobj)  # type: ignore[arg-type]
                    continue
                try:
                    conn, peer = self.sock.accept()
                except (BlockingIOError, TimeoutError):
                    continue
                except OSError:
                    if self._stop.is_set():
                        break
                    log.exception("accept failed")
                    time.sleep(0.1)
                    continue
                if not self.policy.host_known(str(peer[0])):  # a stranger never holds a pending slot
                    self._refuse(sel, refused, conn, peer, RJ_CALLING_AE, "address not in allowed_callers")
                    continue
                assoc = Association(self, conn, peer)
                if not self._admit(assoc):
                    self._refuse(sel, refused, conn, peer, RJ_LOCAL_LIMIT,
                                 f"{self.node.max_pending_connections} connections without an association are open"
                                 " (max_pending_connections), none of them idle or stalled")
                    continue
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                conn.settimeout(None)
                t = threading.Thread(target=assoc.run, name="dicomnode-assoc", daemon=True)
                t.start()
                assoc_threads = [a for a in assoc_threads if a.is_alive()] + [t]
            now = time.monotonic()
            for conn in [c for c, deadline in refused.items() if deadline < now]:
                self._drop_refused(sel, refused, conn)
        for conn in list(refused):
            self._drop_refused(sel, refused, conn)
        sel.close()
        for t in assoc_threads:
            t.join(5.0)

    def _refuse(self, sel: selectors.BaseSelector, refused: dict[socket.socket, float], conn: socket.socket,
                peer: tuple[Any, ...], reject: tuple[int, int, int], why: str) -> None:
        """Answer A-ASSOCIATE-RJ ``reject`` without reading the request (plain TCP) or just close (TLS)."""
        now = time.monotonic()
        if now - self._last_refusal_log > 10.0:  # at most one line per 10 s: a flood must not flood the log
            self._last_refusal_log = now
            log.warning("rejecting connections from %s at once: %s", peer[0], why)
        if len(refused) >= _MAX_REFUSED or self.ssl_context is not None:
            conn.close()
            return
        try:
            conn.setblocking(False)
            conn.send(ul.associate_rj(*reject))
        except OSError:
            conn.close()
            return
        refused[conn] = now + self.node.acse_timeout_s
        sel.register(conn, selectors.EVENT_READ)

    def _drain_refused(self, sel: selectors.BaseSelector, refused: dict[socket.socket, float],
                       conn: socket.socket) -> None:
        try:
            if conn.recv(1 << 16):
                return
        except BlockingIOError:
            return
        except OSError:
            pass
        self._drop_refused(sel, refused, conn)

    @staticmethod
    def _drop_refused(sel: selectors.BaseSelector, refused: dict[socket.socket, float], conn: socket.socket) -> None:
        refused.pop(conn, None)
        try:
            sel.unregister(conn)
        except (KeyError, ValueError):
            pass
        conn.close()

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
