"""The receiving edge: C-ECHO and C-STORE into the spool, with the node's own upper layer or pynetdicom.

``node.receiver: native`` (the default) runs :mod:`dicomnode.native_scp`, which
acknowledges an instance once it is durable in the receive journal
(:mod:`dicomnode.journal`); journals left by a crash are replayed into the
spool by :func:`start_receivers` before anything listens. ``pynetdicom`` runs
the pynetdicom AE built here; the rest of this docstring describes it, and the
policy and statuses hold for both.

* The C-STORE handler only hands the received file to :meth:`Spool.store` and maps
  the outcome to a DIMSE status; nothing slow runs on the association thread.
* Data sets are streamed to disk by pynetdicom (``STORE_RECV_CHUNKED_DATASET``),
  so memory stays bounded whatever the instance size. In receiver processes the
  temporary files are created inside the spool's file system so they are moved,
  not copied.
* Association control happens before presentation-context negotiation: the
  called AE title must be ``ae_title`` unless ``check_called_ae_title`` is off
  (else rejected-permanent, "called AE title not recognized"), the calling AE
  title and peer IP must be in ``allowed_callers`` (else rejected-
  permanent, "calling AE title not recognised"), the free disk space must be
  above the minimum and the number of open associations below
  ``max_associations`` (else rejected-transient).
* ``receive_processes > 1`` starts that many processes, each with an AE bound to
  the same port with ``SO_REUSEPORT``; the kernel spreads connections over them.
  The association limit is shared between them.

Private pynetdicom API (unavoidable, pynetdicom is pinned in pyproject.toml for it): pynetdicom has no
public hook that rejects an association by a policy evaluated before negotiation, so :class:`_GuardedACSE`
overrides ``ACSE._negotiate_as_acceptor``, the request handler overrides ``_create_association`` to install
it, and :func:`serve_ae` registers its own server class in ``AE._servers`` so that the server's
``shutdown()`` (which removes itself from that list) works. tests/unit/test_scp_private_hooks.py checks
that the installed pynetdicom still has them.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import socket
import ssl
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from pydicom import uid as tsuid
from pynetdicom import AE, AllStoragePresentationContexts, _config, evt
from pynetdicom.acse import ACSE
from pynetdicom.association import Association
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import RequestHandler, ThreadedAssociationServer

from dicomnode.config import Config, NodeConfig
from dicomnode.dimse_status import (
    RJ_CALLED_AE,
    RJ_CALLING_AE,
    RJ_LOCAL_LIMIT,
    RJ_NO_REASON,
    STATUS_CANNOT_UNDERSTAND,
    STATUS_OUT_OF_RESOURCES,
    STATUS_PROCESSING_FAILURE,
    STATUS_SUCCESS,
    store_status,
)
from dicomnode.errors import ConfigError, OutOfResourcesError
from dicomnode.metrics import SharedReceiveCounts, default_metrics
from dicomnode.spool import Spool

log = logging.getLogger(__name__)

__all__ = [
    "STATUS_CANNOT_UNDERSTAND", "STATUS_OUT_OF_RESOURCES", "STATUS_PROCESSING_FAILURE", "STATUS_SUCCESS",
    "TRANSFER_SYNTAXES", "ReceiverGroup", "build_ae", "start_receivers",
]

#: Transfer syntaxes accepted for every storage SOP class, in order of preference (pynetdicom accepts the
#: first one in this list that the requestor offers). Encapsulated syntaxes come first so that a file the
#: sender holds compressed arrives and is stored as it is (senders such as dcmtk's storescu offer the file's
#: own syntax next to the uncompressed ones and fail if asked to convert); lossless before lossy.
TRANSFER_SYNTAXES: list[str] = [
    tsuid.JPEGLosslessSV1, tsuid.JPEGLossless, tsuid.JPEGLSLossless, tsuid.JPEG2000Lossless,
    tsuid.HTJ2KLossless, tsuid.HTJ2KLosslessRPCL, tsuid.RLELossless, tsuid.DeflatedExplicitVRLittleEndian,
    tsuid.JPEGBaseline8Bit, tsuid.JPEGExtended12Bit, tsuid.JPEGLSNearLossless, tsuid.JPEG2000, tsuid.HTJ2K,
    tsuid.ExplicitVRLittleEndian, tsuid.ImplicitVRLittleEndian, tsuid.ExplicitVRBigEndian,
]

class _Counter(Protocol):
    def try_acquire(self, limit: int) -> bool: ...

    def release(self) -> None: ...


class _LocalCounter:
    """Open-association counter for one process."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._n = 0

    def try_acquire(self, limit: int) -> bool:
        with self._lock:
            if self._n >= limit:
                return False
            self._n += 1
            return True

    def release(self) -> None:
        with self._lock:
            self._n = max(self._n - 1, 0)


class _SharedCounter:
    """Open-association counter shared by the receiver processes (a ``multiprocessing.Value``)."""

    def __init__(self, value: Any) -> None:
        self._value = value

    def try_acquire(self, limit: int) -> bool:
        with self._value.get_lock():
            if self._value.value >= limit:
                return False
            self._value.value += 1
            return True

    def release(self) -> None:
        with self._value.get_lock():
            self._value.value = max(self._value.value - 1, 0)


class _Policy:
    """Who may associate, and the shared limits."""

    def __init__(self, node: NodeConfig, spool: Spool, counter: _Counter) -> None:
        self.allowed = {(c.ae_title.strip(), c.host.strip()) for c in node.allowed_callers}
        self.max_associations = node.max_associations
        self.ae_title = node.ae_title.strip()
        self.check_called = node.check_called_ae_title
        self.spool = spool
        self.counter = counter

    def host_known(self, peer_host: str) -> bool:
        """True when some ``allowed_callers`` entry names this address (checked before reading anything)."""
        if peer_host.lower().startswith("::ffff:"):
            peer_host = peer_host[7:]
        return any(host == peer_host for _, host in self.allowed)

    def decide(self, calling_ae: str, peer_host: str) -> tuple[tuple[int, int, int] | None, str]:
        """Return (reject triple or None, reason); acquires an association slot when accepting."""
        if peer_host.lower().startswith("::ffff:"):  # IPv4 peer on a dual-stack socket
            peer_host = peer_host[7:]
        if (calling_ae.strip(), peer_host) not in self.allowed:
            return RJ_CALLING_AE, "calling AE title / host not in allowed_callers"
        if not self.spool.disk_ok():
            return RJ_NO_REASON, "free disk space below disk_min_free_gb"
        if not self.counter.try_acquire(self.max_associations):
            return RJ_LOCAL_LIMIT, f"max_associations ({self.max_associations}) reached"
        return None, "accepted"


class _GuardedACSE(ACSE):
    """ACSE whose acceptor side applies :class:`_Policy` before negotiating contexts."""

    policy: _Policy

    def _negotiate_as_acceptor(self) -> None:
        rq = self.requestor.primitive
        calling = str(getattr(rq, "calling_ae_title", "") or "").strip()
        host = str(self.assoc.requestor.address or "")
        called = str(getattr(rq, "called_ae_title", "") or "").strip()
        if self.policy.check_called and called != self.policy.ae_title:
            reject, reason = RJ_CALLED_AE, f"called AE title {called!r} not recognized"
        else:
            reject, reason = self.policy.decide(calling, host)
        if reject is not None:
            log.warning("rejecting association from AE %r at %s: %s", calling, host, reason)
            self.requestor.ae_title = calling
            self.send_reject(*reject)
            evt.trigger(self.assoc, evt.EVT_REJECTED, {})
            self.assoc.kill()
            return
        self.assoc._dicomnode_slot = True  # type: ignore[attr-defined]
        super()._negotiate_as_acceptor()


def _make_handler_class(policy: _Policy) -> type[RequestHandler]:
    class _Handler(RequestHandler):
        def _create_association(self) -> Association:
            assoc = super()._create_association()
            acse = _GuardedACSE(assoc)
            acse.policy = policy
            assoc.acse = acse
            return assoc

    return _Handler


class _Server(ThreadedAssociationServer):
    """Association server that may share its port with other processes (``SO_REUSEPORT``)."""

    reuse_port = False

    def server_bind(self) -> None:
        if self.reuse_port:
            assert self.socket is not None
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()


def _ssl_context(node: NodeConfig) -> ssl.SSLContext | None:
    if node.tls is None:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(str(node.tls.cert_file), str(node.tls.key_file))
    if node.tls.ca_file:
        ctx.load_verify_locations(str(node.tls.ca_file))
    ctx.verify_mode = ssl.CERT_REQUIRED if node.tls.require_client_cert else ssl.CERT_NONE
    return ctx


def _handlers(spool: Spool, policy: _Policy,
              on_release: Callable[[], None] | None = None) -> list[tuple[Any, Callable[..., Any]]]:
    def assoc_id(event: evt.Event) -> str | None:
        return getattr(event.assoc, "_dicomnode_id", None)

    def on_accepted(event: evt.Event) -> None:
        aid = uuid.uuid4().hex
        event.assoc._dicomnode_id = aid  # type: ignore[attr-defined]
        calling = str(event.assoc.requestor.ae_title).strip()
        host = str(event.assoc.requestor.address)
        try:
            spool.open_association(aid, calling, host)
        except Exception:  # noqa: BLE001 - bookkeeping must not break the association
            log.exception("cannot record association %s", aid)
        log.info("association %s accepted from AE %r at %s", aid, calling, host)

    def on_released(event: evt.Event) -> None:
        aid = assoc_id(event)
        if aid:
            try:
                spool.release_association(aid)
            except Exception:  # noqa: BLE001
                log.exception("cannot record release of association %s", aid)
            log.info("association %s released", aid)
            if on_release is not None:  # a study may now be complete: let the assembler look at once
                on_release()

    def on_aborted(event: evt.Event) -> None:
        aid = assoc_id(event)
        if aid:
            try:
                spool.abort_association(aid)
            except Exception:  # noqa: BLE001
                log.exception("cannot record abort of association %s", aid)
            log.warning("association %s aborted", aid)

    def on_closed(event: evt.Event) -> None:
        if getattr(event.assoc, "_dicomnode_slot", False):
            event.assoc._dicomnode_slot = False  # type: ignore[attr-defined]
            policy.counter.release()

    def on_echo(event: evt.Event) -> int:
        return STATUS_SUCCESS

    def on_store(event: evt.Event) -> int:
        aid = assoc_id(event)
        sop = str(getattr(event.request, "AffectedSOPInstanceUID", "") or "?")
        try:
            path = event.dataset_path
        except AttributeError:
            data: Any = event.encoded_dataset(include_meta=True)
        else:
            data = path
        return store_status(sop, aid, lambda: spool.store(data, assoc_id=aid))

    return [
        (evt.EVT_ACCEPTED, on_accepted), (evt.EVT_RELEASED, on_released), (evt.EVT_ABORTED, on_aborted),
        (evt.EVT_CONN_CLOSE, on_closed), (evt.EVT_C_ECHO, on_echo), (evt.EVT_C_STORE, on_store),
    ]


def build_ae(cfg: Config, spool: Spool, *, _counter: _Counter | None = None,
             on_release: Callable[[], None] | None = None) -> AE:
    """Build the node's AE (contexts, timeouts, association policy) without starting it.

    Start it with :func:`serve_ae` (or ``ae.start_server`` using ``ae.dicomnode_server_kwargs``).
    Turns on pynetdicom's ``STORE_RECV_CHUNKED_DATASET`` (process-wide).
    """
    node = cfg.node
    _config.STORE_RECV_CHUNKED_DATASET = True
    ae = AE(ae_title=node.ae_title)
    ae.maximum_associations = node.max_associations + 1  # our policy enforces the limit, shared across processes
    ae.maximum_pdu_size = node.max_pdu
    ae.acse_timeout = node.acse_timeout_s
    ae.dimse_timeout = node.dimse_timeout_s
    ae.network_timeout = node.network_timeout_s
    ae.require_called_aet = node.check_called_ae_title  # pynetdicom rejects (1, 1, 7) as the native receiver does
    ae.add_supported_context(Verification)
    for cx in AllStoragePresentationContexts:
        ae.add_supported_context(cx.abstract_syntax, TRANSFER_SYNTAXES)
    policy = _Policy(node, spool, _counter or _LocalCounter())
    ae.dicomnode_policy = policy  # type: ignore[attr-defined]
    ae.dicomnode_handlers = _handlers(spool, policy, on_release)  # type: ignore[attr-defined]
    return ae


def serve_ae(ae: AE, cfg: Config, *, reuse_port: bool = False) -> ThreadedAssociationServer:
    """Bind and start ``ae`` (from :func:`build_ae`) in a background thread; returns the server.

    ``server.server_address[1]`` is the bound port (useful with port 0). Stop it with ``server.shutdown()``.
    """
    policy: _Policy = ae.dicomnode_policy  # type: ignore[attr-defined]
    server_cls = type("_BoundServer", (_Server,), {"reuse_port": reuse_port})
    server = server_cls(ae, (cfg.node.host, cfg.node.port), ae.ae_title, ae.supported_contexts,
                        ssl_context=_ssl_context(cfg.node), evt_handlers=ae.dicomnode_handlers,  # type: ignore[attr-defined]
                        request_handler=_make_handler_class(policy))
    thread = threading.Thread(target=server.serve_forever, name=f"dicomnode-scp:{server.server_address[1]}",
                              daemon=True)
    thread.start()
    ae._servers.append(server)
    log.info("SCP %s listening on %s:%d (pid %d)", ae.ae_title, cfg.node.host, server.server_address[1], os.getpid())
    return server


# --------------------------------------------------------------------------------------------- processes


def _journal_dir(cfg: Config) -> Path:
    return Path(cfg.node.storage_dir) / "journal"


def _start_native(cfg: Config, spool: Spool, counter: _Counter, index: int, *, reuse_port: bool,
                  on_release: Callable[[], None] | None = None) -> Any:
    """Bind and start a :class:`dicomnode.native_scp.NativeServer` (journal ``<index>.bin`` unless disabled)."""
    from dicomnode.journal import Journal
    from dicomnode.native_scp import NativeServer, supported_contexts

    node = cfg.node
    journal = (Journal(_journal_dir(cfg) / f"{index}.bin", node.journal_mb << 20, wait_s=node.dimse_timeout_s)
               if node.journal_mb > 0 else None)
    try:
        server = NativeServer(node, spool, _Policy(node, spool, counter), supported_contexts(TRANSFER_SYNTAXES),
                              journal=journal, on_release=on_release, reuse_port=reuse_port,
                              ssl_context=_ssl_context(node))
    except OSError:
        if journal is not None:
            journal.close()
        raise
    server.start()
    return server


def _receiver_main(cfg: Config, port: int, stop: Any, counter_value: Any, ready: Any, parent_pid: int,
                   receive_counts: SharedReceiveCounts | None = None, index: int = 0) -> None:
    """Body of one receiver process."""
    logging.basicConfig(level=getattr(logging, cfg.log_level), stream=sys.stderr,
                        format=f"%(asctime)s %(levelname)s %(name)s[{os.getpid()}]: %(message)s")
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    cfg = cfg.model_copy(update={"node": cfg.node.model_copy(update={"port": port})})
    if receive_counts is not None:
        default_metrics().count_into(receive_counts)
    spool = Spool(cfg.node.storage_dir, cfg.node.disk_min_free_gb, resend_policy=cfg.node.resend_policy)
    tempfile.tempdir = str(spool.tmp_dir)  # pynetdicom's chunked temp files land on the spool's file system
    ae = None
    try:
        if cfg.node.receiver == "native":
            server = _start_native(cfg, spool, _SharedCounter(counter_value), index, reuse_port=True)
        else:
            ae = build_ae(cfg, spool, _counter=_SharedCounter(counter_value))
            server = serve_ae(ae, cfg, reuse_port=True)
    except OSError as exc:
        ready.put(("error", f"{type(exc).__name__}: {exc}"))
        return
    ready.put(("ok", os.getpid()))
    while not stop.wait(0.5):
        if os.getppid() != parent_pid:  # parent died (kill -9): do not keep the port
            log.error("parent process %d is gone; receiver exiting", parent_pid)
            break
    server.shutdown()
    if ae is not None:
        ae.shutdown()


class ReceiverGroup:
    """The running SCP: one in-process server, or N processes sharing the port."""

    def __init__(self, *, port: int, stop: Any, processes: list[Any] | None = None,
                 ae: AE | None = None, server: Any = None,
                 receive_counts: SharedReceiveCounts | None = None, storage_dir: Path | None = None) -> None:
        self.port = port
        self._storage_dir = storage_dir
        #: instance counters of the receiver processes (None for the in-process server)
        self.receive_counts = receive_counts
        self._stop = stop
        self._processes = processes or []
        self._ae = ae
        self._server = server
        self._stopped = False
        self._lock = threading.Lock()

    @property
    def spool(self) -> Spool | None:
        """The in-process receiver's spool object (None for receiver processes)."""
        if self._server is not None and hasattr(self._server, "spool"):
            return self._server.spool  # type: ignore[no-any-return]
        if self._ae is not None:
            return self._ae.dicomnode_policy.spool  # type: ignore[attr-defined,no-any-return]
        return None

    @property
    def pids(self) -> list[int]:
        """Process ids of receiver processes (empty for the in-process server)."""
        return [p.pid for p in self._processes]

    def is_alive(self) -> bool:
        """True while every receiver is running."""
        if self._server is not None:
            return not self._stopped
        return bool(self._processes) and all(p.is_alive() for p in self._processes)

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop accepting associations and wait for the receivers to end."""
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
        self._stop.set()
        if self._server is not None:
            self._server.shutdown()
        if self._ae is not None:
            self._ae.shutdown()
        deadline = time.monotonic() + timeout_s
        for p in self._processes:
            p.join(max(deadline - time.monotonic(), 0.1))
            if p.is_alive():
                log.warning("receiver process %d did not stop in time; terminating", p.pid)
                p.terminate()
                p.join(2.0)

    def wait_indexed(self, timeout_s: float = 30.0) -> bool:
        """Block until instances acknowledged so far are in the spool index (the journal is drained).

        Returns False on timeout. For receiver processes this relies on their backlog reports, so it
        first waits one report interval.
        """
        deadline = time.monotonic() + timeout_s
        if self._server is not None:
            journal = getattr(self._server, "journal", None)
            busy: Callable[[], bool] = (lambda: not journal.idle()) if journal is not None else (lambda: False)
        elif self._processes and self._storage_dir is not None:
            time.sleep(0.3)
            busy = Spool(self._storage_dir, 0.0).journal_busy
        else:
            return True
        while busy():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)
        return True

    def wait(self) -> None:
        """Block until the group is stopped (or every receiver process has ended)."""
        if self._processes:
            for p in self._processes:
                p.join()
        else:
            self._stop.wait()


def replay_journals(cfg: Config, spool: Spool) -> int:
    """Move instances acknowledged before a crash from the journals into the spool (before receiving).

    Raises
    ------
    OutOfResourcesError
        An acknowledged instance cannot be stored; the node must not start without it.
    """
    from dicomnode.journal import replay
    from dicomnode.native_scp import apply_records

    try:
        n = replay(_journal_dir(cfg), lambda items: apply_records(spool, items))
        spool.clear_journal_backlog()
        return n
    except OSError as exc:
        raise OutOfResourcesError(f"cannot replay the receive journal: {exc}") from exc


def start_receivers(cfg: Config, stop: Any | None = None, *,
                    on_release: Callable[[], None] | None = None) -> ReceiverGroup:
    """Start the SCP as configured: in-process for ``receive_processes == 1``, else N processes.

    Parameters
    ----------
    cfg:
        The node configuration.
    stop:
        Optional ``multiprocessing.Event``; setting it stops the receivers.
    on_release:
        Called after an association is released, in-process receivers only (receiver
        processes leave it to the assembler's poll).

    Raises
    ------
    ConfigError
        Port 0 with several processes, or a receiver process failed to bind.
    """
    n = cfg.node.receive_processes
    if n > 1 and cfg.node.port == 0:
        raise ConfigError("node.port must be a fixed port when receive_processes > 1")
    spool = Spool(cfg.node.storage_dir, cfg.node.disk_min_free_gb, resend_policy=cfg.node.resend_policy)  # schema once, before any child races
    spool.close_stale_associations()
    spool.clean_tmp()
    replay_journals(cfg, spool)
    if n == 1:
        stop_evt = stop if stop is not None else threading.Event()
        ae = None
        try:
            if cfg.node.receiver == "native":
                server = _start_native(cfg, spool, _LocalCounter(), 0, reuse_port=False, on_release=on_release)
                port = server.port
            else:
                ae = build_ae(cfg, spool, on_release=on_release)
                server = serve_ae(ae, cfg)
                port = int(server.server_address[1])
        except OSError as exc:
            raise ConfigError(f"cannot listen on {cfg.node.host}:{cfg.node.port}: {exc}") from exc
        group = ReceiverGroup(port=port, stop=stop_evt, ae=ae, server=server)
        if stop is not None:  # setting the caller's event stops the server, as it does the processes
            threading.Thread(target=lambda: (stop_evt.wait(), group.stop()), name="dicomnode-scp-stop",
                             daemon=True).start()
        return group
    ctx = mp.get_context("spawn")
    stop_evt = stop if stop is not None else ctx.Event()
    counter = ctx.Value("i", 0)
    counts = SharedReceiveCounts(ctx)
    ready = ctx.Queue()
    procs = [ctx.Process(target=_receiver_main, name=f"dicomnode-receiver-{i}", daemon=True,
                         args=(cfg, cfg.node.port, stop_evt, counter, ready, os.getpid(), counts, i))
             for i in range(n)]
    for p in procs:
        p.start()
    group = ReceiverGroup(port=cfg.node.port, stop=stop_evt, processes=procs, receive_counts=counts,
                          storage_dir=Path(cfg.node.storage_dir))
    errors = []
    for _ in procs:
        try:
            status, detail = ready.get(timeout=60)
        except Exception:  # noqa: BLE001 - queue.Empty
            status, detail = "error", "receiver process did not start within 60 s"
        if status != "ok":
            errors.append(str(detail))
    if errors:
        group.stop()
        raise ConfigError(f"cannot start receivers on {cfg.node.host}:{cfg.node.port}: {'; '.join(errors)}")
    log.info("%d receiver processes listening on %s:%d", n, cfg.node.host, cfg.node.port)
    return group
