"""The Ray driver process of a node (child side; the node side is :class:`dicomnode.execution.host.DriverProcess`).

One such process per node process is attached to the cluster and serves every
worker thread of the node: requests ``(id, op, args)`` arrive on a pipe, each
runs on a thread of its own here (``ray.get`` is thread-safe), and the reply
``(id, ok, value)`` goes back on the same pipe.

A Ray driver process exits when the cluster it is attached to goes away, which
is why it is not the node itself; the node starts a fresh one once the cluster
is back. It dies with the node: it exits when the pipe to the node closes (the
node exited or was killed), and on Linux the kernel also kills it when the node
does (``PR_SET_PDEATHSIG``). Errors come back as the small exception classes
below, which pickle without Ray.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.connection import Connection
from typing import Any

from pydicom import Dataset

from inference.findings import Findings

log = logging.getLogger(__name__)

__all__ = ["ActorLost", "EngineDown", "RemoteTaskError", "serve"]

_STATE: dict[str, Any] = {}
_CONNECT_LOCK = threading.Lock()
PR_SET_PDEATHSIG = 1


class ActorLost(Exception):
    """The actor (or its machine) died during the call; run the job again on another actor."""


class EngineDown(Exception):
    """The Ray cluster (or the node's driver process) cannot be reached; the job waits."""


class RemoteTaskError(Exception):
    """The task itself raised on the actor; ``permanent`` is copied from the original exception."""

    def __init__(self, message: str, permanent: bool = False) -> None:
        super().__init__(message)
        self.permanent = permanent

    def __reduce__(self) -> tuple[Any, ...]:
        return (RemoteTaskError, (str(self), self.permanent))


def _connect(address: str, namespace: str) -> Any:
    import ray

    with _CONNECT_LOCK:
        if not ray.is_initialized():
            try:
                host = address.rsplit(":", 1)[0]
                local = host in ("127.0.0.1", "localhost", "::1")
                ray.init(address=address, namespace=namespace, log_to_driver=False, include_dashboard=False,
                         configure_logging=False, _node_ip_address="127.0.0.1" if local else None)
            except Exception as exc:  # noqa: BLE001 - any failure to attach means "not reachable now"
                raise EngineDown(f"Ray cluster at {address} unreachable: {type(exc).__name__}: {exc}") from None
    return ray


def _actor(ray: Any, task: str, replica: int, spec: dict[str, Any]) -> Any:
    """The named, detached actor ``<task>#<replica>``, created if it does not exist yet."""
    from dicomnode.execution.actor import TaskActor

    cls = _STATE.get("cls")
    if cls is None:
        cls = _STATE["cls"] = ray.remote(TaskActor)
    return cls.options(name=f"{task}#{replica}", lifetime="detached", get_if_exists=True, max_restarts=-1,
                       max_task_retries=0, num_cpus=spec["num_cpus"], num_gpus=spec["num_gpus"],
                       max_concurrency=1).remote(task, spec["plugins"], spec["models_dir"], spec["device"])


def run_remote(address: str, namespace: str, task: str, replica: int, spec: dict[str, Any],
               datasets: Sequence[Dataset], context: dict[str, Any]) -> Findings:
    """Put ``datasets`` in the object store and run ``task`` on actor ``replica``; returns its Findings."""
    ray = _connect(address, namespace)
    from ray import exceptions as rex

    try:
        actor = _actor(ray, task, replica, spec)
        ref = ray.put(list(datasets))
        return ray.get(actor.run.remote(ref, context))
    except rex.RayTaskError as exc:
        cause = exc.cause if isinstance(exc.cause, BaseException) else exc
        raise RemoteTaskError(f"{type(cause).__name__}: {cause}", bool(getattr(cause, "permanent", False))) from None
    except (rex.RayActorError, rex.ActorUnavailableError, rex.ObjectLostError, rex.OwnerDiedError) as exc:
        raise ActorLost(f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from None
    except (rex.RaySystemError, rex.GetTimeoutError, ConnectionError) as exc:
        raise EngineDown(f"{type(exc).__name__}: {exc}") from None


def ping(address: str, namespace: str) -> int:
    """Attach to the cluster; the number of alive nodes."""
    ray = _connect(address, namespace)
    return sum(1 for n in ray.nodes() if n.get("Alive"))


def echo(address: str, namespace: str, payload: object) -> object:
    """``payload`` back, without Ray (the pipe's own cost, for the benchmark)."""
    return payload


OPS = {"run": run_remote, "ping": ping, "echo": echo}


def _die_with_parent(parent_pid: int) -> None:
    """Exit when the node does: the kernel's parent-death signal (Linux), and a check that it is still there."""
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        except (OSError, AttributeError):  # pragma: no cover - no prctl: the pipe's EOF still ends us
            log.debug("prctl(PR_SET_PDEATHSIG) unavailable")
    if os.getppid() != parent_pid:  # the node died before the signal was armed
        os._exit(0)


def serve(conn: Connection, address: str, namespace: str, parent_pid: int, threads: int) -> None:
    """The driver's loop (the child process's target): answer requests until the node goes away."""
    _die_with_parent(parent_pid)
    pool = ThreadPoolExecutor(max(1, threads), thread_name_prefix="ray-call")
    send_lock = threading.Lock()

    def handle(req_id: int, op: str, args: tuple[Any, ...]) -> None:
        try:
            reply: tuple[int, bool, Any] = (req_id, True, OPS[op](address, namespace, *args))
        except (ActorLost, EngineDown, RemoteTaskError) as exc:
            reply = (req_id, False, exc)
        except Exception as exc:  # noqa: BLE001 - an unexpected error fails the job (it is retried), never the driver
            reply = (req_id, False, RemoteTaskError(f"{type(exc).__name__}: {exc}"))
        with send_lock:
            try:
                conn.send(reply)
            except (OSError, ValueError):  # the node is gone
                os._exit(0)
            except Exception as exc:  # noqa: BLE001 - e.g. a result that does not pickle: fail that job only
                conn.send((req_id, False, RemoteTaskError(f"result not sendable: {type(exc).__name__}: {exc}")))

    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):  # the node exited or was killed
            os._exit(0)
        if msg is None:  # the node closes the engine
            os._exit(0)
        pool.submit(handle, *msg)
