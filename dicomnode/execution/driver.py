"""The Ray driver, run in a child process of the node (see :class:`dicomnode.execution.ray_engine.RayEngine`).

A Ray driver process exits when the cluster it is attached to goes away; running
it in a child keeps the node (receiver, store, sender) alive, and the engine
starts a fresh child once the cluster is back. Errors come back as the small
exception classes below, which pickle without Ray.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from pydicom import Dataset

from inference.findings import Findings

log = logging.getLogger(__name__)

_STATE: dict[str, Any] = {}


class ActorLost(Exception):
    """The actor (or its machine) died during the call; run the job again on another actor."""


class EngineDown(Exception):
    """The Ray cluster cannot be reached; the job waits."""


class RemoteTaskError(Exception):
    """The task itself raised on the actor; ``permanent`` is copied from the original exception."""

    def __init__(self, message: str, permanent: bool = False) -> None:
        super().__init__(message)
        self.permanent = permanent

    def __reduce__(self) -> tuple[Any, ...]:
        return (RemoteTaskError, (str(self), self.permanent))


def _connect(address: str, namespace: str) -> Any:
    import ray

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
