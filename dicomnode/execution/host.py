"""The node's side of its Ray driver process: one child process per node, shared by every worker thread.

:class:`DriverProcess` starts :func:`dicomnode.execution.driver.serve` in a
spawned child and multiplexes calls over one pipe: each call gets an id, the
child runs it on a thread of its own, and a reader thread here hands each reply
to the waiting caller. Calls from many threads run at the same time. When the
child exits (the cluster went away and Ray ended it, or it was killed), every
call still waiting fails with :class:`~dicomnode.execution.driver.EngineDown`
and the engine starts a new child.

The child is started from this object's own reader thread, which lives exactly
as long as the child: on Linux the child's parent-death signal is tied to the
thread that started it, so it fires when the node dies, not when some worker
thread ends.
"""

from __future__ import annotations

import itertools
import logging
import multiprocessing
import os
import threading
from concurrent.futures import Future
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any

from dicomnode.execution import driver

log = logging.getLogger(__name__)

__all__ = ["DriverProcess"]


class DriverProcess:
    """A Ray driver child process for ``address``/``namespace`` that serves up to ``threads`` calls at once."""

    def __init__(self, address: str, namespace: str, threads: int) -> None:
        self._lock = threading.Lock()
        self._pending: dict[int, Future[Any]] = {}
        self._ids = itertools.count()
        self._conn: Connection | None = None
        self._proc: BaseProcess | None = None
        self._dead = False
        started = threading.Event()
        failure: list[BaseException] = []
        self._thread = threading.Thread(target=self._main, args=(address, namespace, threads, started, failure),
                                        name="ray-driver", daemon=True)
        self._thread.start()
        started.wait()
        if failure:
            raise driver.EngineDown(f"cannot start the Ray driver process: {failure[0]}")

    @property
    def pid(self) -> int | None:
        """Process id of the child (None before it started)."""
        return None if self._proc is None else self._proc.pid

    @property
    def alive(self) -> bool:
        """Whether the child still serves calls."""
        return not self._dead and self._proc is not None and self._proc.is_alive()

    def call(self, op: str, *args: Any) -> Any:
        """Run ``op`` (see :data:`driver.OPS`) in the child and return its value or raise its error."""
        fut: Future[Any] = Future()
        with self._lock:
            if self._dead or self._conn is None:
                raise driver.EngineDown("the Ray driver process has exited")
            req_id = next(self._ids)
            self._pending[req_id] = fut
            try:
                self._conn.send((req_id, op, args))
            except (OSError, ValueError) as exc:
                self._pending.pop(req_id, None)
                raise driver.EngineDown(f"the Ray driver process is gone: {exc}") from None
            except BaseException:
                self._pending.pop(req_id, None)
                raise
        return fut.result()

    def close(self, timeout_s: float = 5.0) -> None:
        """End the child (calls still waiting fail with EngineDown) and wait for it."""
        with self._lock:
            self._dead = True
            conn, proc = self._conn, self._proc
            if conn is not None:
                try:
                    conn.send(None)
                except (OSError, ValueError):
                    pass
        if proc is not None:
            proc.join(timeout_s)
            if proc.is_alive():
                proc.kill()
                proc.join(timeout_s)
        self._thread.join(timeout_s)

    # ------------------------------------------------------------------ the reader thread
    def _main(self, address: str, namespace: str, threads: int, started: threading.Event,
              failure: list[BaseException]) -> None:
        ctx = multiprocessing.get_context("spawn")
        try:
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=driver.serve, args=(child, address, namespace, os.getpid(), threads),
                               name="dicomnode-ray-driver", daemon=True)
            proc.start()
            child.close()
        except Exception as exc:  # noqa: BLE001 - reported to the constructor's caller
            self._dead = True
            failure.append(exc)
            started.set()
            return
        self._conn, self._proc = parent, proc
        log.info("Ray driver process %d started for %s", proc.pid, address)
        started.set()
        try:
            self._read(parent)
        finally:
            self._finish(proc)

    def _read(self, conn: Connection) -> None:
        while True:
            try:
                req_id, ok, value = conn.recv()
            except (EOFError, OSError):
                return
            except Exception as exc:  # noqa: BLE001 - an unreadable reply: start afresh rather than guess
                log.error("unreadable reply from the Ray driver process: %s", exc)
                return
            with self._lock:
                fut = self._pending.pop(req_id, None)
            if fut is None:
                continue
            if ok:
                fut.set_result(value)
            else:
                fut.set_exception(value if isinstance(value, BaseException) else driver.EngineDown(str(value)))

    def _finish(self, proc: BaseProcess) -> None:
        with self._lock:
            self._dead = True
            pending, self._pending = self._pending, {}
            conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()
        proc.join(5.0)
        code = proc.exitcode
        for fut in pending.values():
            fut.set_exception(driver.EngineDown(f"the Ray driver process exited (code {code})"))
        log.info("Ray driver process %s ended (code %s)", proc.pid, code)
