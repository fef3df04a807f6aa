"""``dicomnode serve``: receivers, assembler, workers and sender in one foreground process.

Start-up: load plugins, open the database, return interrupted jobs to pending,
then start the receivers (SCP), the assembler thread, the worker pool and the
sender thread. SIGTERM/SIGINT stop receiving first, let in-flight jobs finish
(or return them to pending), then stop the sender.
"""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType

from dicomnode import store
from dicomnode.assembler import Assembler
from dicomnode.config import Config
from dicomnode.jobs import JobQueue, WorkerPool
from dicomnode.outbox import Outbox
from dicomnode.sender import Sender
from dicomnode.spool import Spool
from dicomnode.worker import JobHandler
from inference.tasks import load_plugins

log = logging.getLogger(__name__)

__all__ = ["Node", "serve"]


class Node:
    """The pipeline stages of a running node (receivers excluded), for ``serve`` and tests."""

    def __init__(self, cfg: Config, *, poll_s: float = 0.5) -> None:
        self.cfg = cfg
        storage = cfg.node.storage_dir
        storage.mkdir(parents=True, exist_ok=True)
        self.spool = Spool(storage, cfg.node.disk_min_free_gb)
        self.queue = JobQueue(store.db_path(storage))
        self.outbox = Outbox(storage)
        self.sender = Sender(cfg, self.outbox, poll_s=poll_s)
        handler = JobHandler(cfg, self.spool, self.queue, self.outbox, on_results=self.sender.wake)
        self.workers = WorkerPool(self.queue, handler, n_workers=cfg.node.workers, poll_s=poll_s)
        self.assembler = Assembler(cfg, self.spool, self.queue, poll_s=poll_s, outbox=self.outbox,
                                   on_enqueue=self.workers.wake)

    def start(self) -> Node:
        """Recover interrupted jobs and start assembler, workers and sender."""
        self.queue.recover()
        self.assembler.start()
        self.workers.start()
        self.sender.start()
        return self

    def stop(self, timeout_s: float = 30.0) -> None:
        """Stop assembling, finish or return in-flight jobs, stop sending."""
        from dicomnode.execution import close_engines, stop_waiting

        self.assembler.stop()
        stop_waiting()  # jobs waiting for a Ray cluster return to pending now instead of holding up the stop
        self.workers.stop(timeout_s)
        self.sender.stop(timeout_s)
        close_engines()


def serve(cfg: Config, *, stop_event: threading.Event | None = None) -> int:
    """Run the node until SIGTERM/SIGINT (or ``stop_event``); returns the exit status."""
    from dicomnode.scp import start_receivers

    load_plugins(cfg.plugins)
    stop = stop_event or threading.Event()
    if threading.current_thread() is threading.main_thread():
        def on_signal(signum: int, frame: FrameType | None) -> None:
            log.info("signal %d received; shutting down", signum)
            stop.set()
        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
    node = Node(cfg).start()
    receivers = start_receivers(cfg, on_release=node.assembler.wake)
    if receivers.receive_counts is not None:  # receiver processes count in shared memory; /metrics exports it
        from dicomnode.metrics import default_metrics

        default_metrics().export_shared(receivers.receive_counts)
    log.info("node %s listening on %s:%d; %d route(s), %d worker(s)", cfg.node.ae_title, cfg.node.host,
             receivers.port, len(cfg.routes), cfg.node.workers)
    status_http = None
    if cfg.node.status_http_port is not None:
        from dicomnode.http import StatusServer

        status_http = StatusServer(cfg, receivers.is_alive).start()
    try:
        while not stop.wait(1.0):
            if not receivers.is_alive():
                log.error("receivers stopped unexpectedly; shutting down")
                return 1
    finally:
        if status_http is not None:
            status_http.stop()
        receivers.stop()
        node.stop()
        log.info("node stopped")
    return 0
