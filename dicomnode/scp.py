"""The receiving edge: start the configured receiver (native or pynetdicom), in-process or as N processes.

``node.receiver: native`` (the default) runs :mod:`dicomnode.native_scp`, which
acknowledges an instance once it is durable in the receive journal
(:mod:`dicomnode.journal`); journals left by a crash are replayed into the
spool by :func:`start_receivers` before anything listens. ``pynetdicom`` runs
the AE of :mod:`dicomnode.scp_pynetdicom`. Both apply the same association
policy and accept the same transfer syntaxes (:mod:`dicomnode.scp_policy`).

``receive_processes > 1`` starts that many processes, each with a receiver bound to
the same port with ``SO_REUSEPORT``; the kernel spreads connections over them.
The association limit is shared between them.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dicomnode.config import Config
from dicomnode.errors import ConfigError, OutOfResourcesError
from dicomnode.metrics import SharedReceiveCounts, default_metrics
from dicomnode.scp_policy import (
    TRANSFER_SYNTAXES,
    AssociationCounter,
    AssociationPolicy,
    LocalCounter,
    SharedCounter,
    ssl_context,
)
from dicomnode.scp_pynetdicom import PynetdicomReceiver, build_ae, serve_ae
from dicomnode.spool import Spool

log = logging.getLogger(__name__)

__all__ = ["ReceiverGroup", "replay_journals", "start_receivers"]


def _journal_dir(cfg: Config) -> Path:
    return Path(cfg.node.storage_dir) / "journal"


def _start_native(cfg: Config, spool: Spool, counter: AssociationCounter, index: int, *, reuse_port: bool,
                  on_release: Callable[[], None] | None = None) -> Any:
    """Bind and start a :class:`dicomnode.native_scp.NativeServer` (journal ``<index>.bin`` unless disabled)."""
    from dicomnode.journal import Journal
    from dicomnode.native_scp import NativeServer, supported_contexts

    node = cfg.node
    journal = (Journal(_journal_dir(cfg) / f"{index}.bin", node.journal_mb << 20, wait_s=node.dimse_timeout_s)
               if node.journal_mb > 0 else None)
    try:
        server = NativeServer(node, spool, AssociationPolicy(node, spool, counter), supported_contexts(TRANSFER_SYNTAXES),
                              journal=journal, on_release=on_release, reuse_port=reuse_port,
                              ssl_context=ssl_context(node))
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
    receiver = None
    try:
        if cfg.node.receiver == "native":
            server = _start_native(cfg, spool, SharedCounter(counter_value), index, reuse_port=True)
        else:
            receiver = build_ae(cfg, spool, counter=SharedCounter(counter_value))
            server = serve_ae(receiver, cfg, reuse_port=True)
    except OSError as exc:
        ready.put(("error", f"{type(exc).__name__}: {exc}"))
        return
    ready.put(("ok", os.getpid()))
    while not stop.wait(0.5):
        if os.getppid() != parent_pid:  # parent died (kill -9): do not keep the port
            log.error("parent process %d is gone; receiver exiting", parent_pid)
            break
    server.shutdown()
    if receiver is not None:
        receiver.ae.shutdown()


class ReceiverGroup:
    """The running SCP: one in-process server, or N processes sharing the port."""

    def __init__(self, *, port: int, stop: Any, processes: list[Any] | None = None,
                 receiver: PynetdicomReceiver | None = None, server: Any = None,
                 receive_counts: SharedReceiveCounts | None = None, storage_dir: Path | None = None) -> None:
        self.port = port
        self._storage_dir = storage_dir
        #: instance counters of the receiver processes (None for the in-process server)
        self.receive_counts = receive_counts
        self._stop = stop
        self._processes = processes or []
        self._receiver = receiver
        self._server = server
        self._stopped = False
        self._lock = threading.Lock()

    @property
    def spool(self) -> Spool | None:
        """The in-process receiver's spool object (None for receiver processes)."""
        if self._server is not None and hasattr(self._server, "spool"):
            return self._server.spool  # type: ignore[no-any-return]
        if self._receiver is not None:
            return self._receiver.spool
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
        if self._receiver is not None:
            self._receiver.ae.shutdown()
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
        return _start_in_process(cfg, spool, stop, on_release)
    return _start_processes(cfg, n, stop)


def _start_in_process(cfg: Config, spool: Spool, stop: Any | None,
                      on_release: Callable[[], None] | None) -> ReceiverGroup:
    """One receiver in this process (a thread per association)."""
    stop_evt = stop if stop is not None else threading.Event()
    receiver = None
    try:
        if cfg.node.receiver == "native":
            server = _start_native(cfg, spool, LocalCounter(), 0, reuse_port=False, on_release=on_release)
            port = server.port
        else:
            receiver = build_ae(cfg, spool, on_release=on_release)
            server = serve_ae(receiver, cfg)
            port = int(server.server_address[1])
    except OSError as exc:
        raise ConfigError(f"cannot listen on {cfg.node.host}:{cfg.node.port}: {exc}") from exc
    group = ReceiverGroup(port=port, stop=stop_evt, receiver=receiver, server=server)
    if stop is not None:  # setting the caller's event stops the server, as it does the processes
        threading.Thread(target=lambda: (stop_evt.wait(), group.stop()), name="dicomnode-scp-stop",
                         daemon=True).start()
    return group


def _start_processes(cfg: Config, n: int, stop: Any | None) -> ReceiverGroup:
    """``n`` receiver processes sharing the port (``SO_REUSEPORT``) and one association limit."""
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
