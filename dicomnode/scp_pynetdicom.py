"""The pynetdicom receiver (``node.receiver: pynetdicom``): C-ECHO and C-STORE into the spool.

* The C-STORE handler only hands the received file to :meth:`Spool.store` and maps
  the outcome to a DIMSE status; nothing slow runs on the association thread.
* Data sets are streamed to disk by pynetdicom (``STORE_RECV_CHUNKED_DATASET``),
  so memory stays bounded whatever the instance size. In receiver processes the
  temporary files are created inside the spool's file system so they are moved,
  not copied.
* Association control (:class:`dicomnode.scp_policy.AssociationPolicy`) happens before
  presentation-context negotiation: the called AE title must be ``ae_title`` unless
  ``check_called_ae_title`` is off (else rejected-permanent, "called AE title not recognized"),
  then the policy's callers, disk and association limit.
* What the node keeps per association (its id in the spool, whether it holds a slot of the
  association limit) lives in :class:`_Associations`, a table of our own keyed by pynetdicom's
  ``Association`` object; nothing is set on pynetdicom's objects.

Private pynetdicom API (unavoidable, pynetdicom is pinned in pyproject.toml for it): pynetdicom has no
public hook that rejects an association by a policy evaluated before negotiation, so :class:`_GuardedACSE`
overrides ``ACSE._negotiate_as_acceptor``, the request handler overrides ``_create_association`` to install
it, and :func:`serve_ae` registers its own server class in ``AE._servers`` so that the server's
``shutdown()`` (which removes itself from that list) works. ``pynetdicom._config`` is pynetdicom's documented
configuration module despite its name. tests/unit/test_scp_private_hooks.py checks that the installed
pynetdicom still has them.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import uuid
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pynetdicom import AE, AllStoragePresentationContexts, _config, evt
from pynetdicom.acse import ACSE
from pynetdicom.association import Association
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import RequestHandler, ThreadedAssociationServer

from dicomnode.config import Config
from dicomnode.dimse_status import RJ_CALLED_AE, STATUS_SUCCESS, store_status
from dicomnode.scp_policy import (
    TRANSFER_SYNTAXES,
    AssociationCounter,
    AssociationPolicy,
    LocalCounter,
    ssl_context,
)
from dicomnode.spool import Spool

log = logging.getLogger(__name__)

__all__ = ["PynetdicomReceiver", "build_ae", "serve_ae"]


class _Associations:
    """Per-association state of the node, keyed by pynetdicom's ``Association`` (weakly: never leaks one)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._ids: weakref.WeakKeyDictionary[Association, str] = weakref.WeakKeyDictionary()
        self._slots: weakref.WeakSet[Association] = weakref.WeakSet()

    def hold_slot(self, assoc: Association) -> None:
        """Record that ``assoc`` holds one slot of the association limit."""
        with self._lock:
            self._slots.add(assoc)

    def drop_slot(self, assoc: Association) -> bool:
        """Forget ``assoc``'s slot; True if it held one (the caller then releases it, once)."""
        with self._lock:
            held = assoc in self._slots
            self._slots.discard(assoc)
            self._ids.pop(assoc, None)
            return held

    def set_id(self, assoc: Association, aid: str) -> None:
        """Name ``assoc`` in the spool's association table."""
        with self._lock:
            self._ids[assoc] = aid

    def id_of(self, assoc: Association) -> str | None:
        """The spool's id of ``assoc`` (None before it was accepted)."""
        with self._lock:
            return self._ids.get(assoc)


class _GuardedACSE(ACSE):
    """ACSE whose acceptor side applies the :class:`AssociationPolicy` before negotiating contexts."""

    policy: AssociationPolicy
    table: _Associations

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
        self.table.hold_slot(self.assoc)
        super()._negotiate_as_acceptor()


def _make_handler_class(policy: AssociationPolicy, table: _Associations) -> type[RequestHandler]:
    class _Handler(RequestHandler):
        def _create_association(self) -> Association:
            assoc = super()._create_association()
            acse = _GuardedACSE(assoc)
            acse.policy = policy
            acse.table = table
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


def _record(what: str, aid: str, call: Callable[[], None]) -> None:
    """Spool bookkeeping of an association event; a failure is logged, never breaks the association."""
    try:
        call()
    except Exception:  # noqa: BLE001 - bookkeeping must not break the association
        log.exception("cannot record %s of association %s", what, aid)


def _handlers(spool: Spool, policy: AssociationPolicy, table: _Associations,
              on_release: Callable[[], None] | None = None) -> list[tuple[Any, Callable[..., Any]]]:
    def on_accepted(event: evt.Event) -> None:
        aid = uuid.uuid4().hex
        table.set_id(event.assoc, aid)
        calling = str(event.assoc.requestor.ae_title).strip()
        host = str(event.assoc.requestor.address)
        _record("opening", aid, lambda: spool.open_association(aid, calling, host))
        log.info("association %s accepted from AE %r at %s", aid, calling, host)

    def on_released(event: evt.Event) -> None:
        aid = table.id_of(event.assoc)
        if aid:
            _record("release", aid, lambda: spool.release_association(aid))
            log.info("association %s released", aid)
            if on_release is not None:  # a study may now be complete: let the assembler look at once
                on_release()

    def on_aborted(event: evt.Event) -> None:
        aid = table.id_of(event.assoc)
        if aid:
            _record("abort", aid, lambda: spool.abort_association(aid))
            log.warning("association %s aborted", aid)

    def on_closed(event: evt.Event) -> None:
        if table.drop_slot(event.assoc):
            policy.counter.release()

    def on_echo(event: evt.Event) -> int:
        return STATUS_SUCCESS

    def on_store(event: evt.Event) -> int:
        aid = table.id_of(event.assoc)
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


@dataclass(frozen=True)
class PynetdicomReceiver:
    """A configured pynetdicom AE with the node's policy and event handlers (from :func:`build_ae`)."""

    ae: AE
    policy: AssociationPolicy
    handlers: list[tuple[Any, Callable[..., Any]]]
    table: _Associations

    @property
    def spool(self) -> Spool:
        """Where this receiver stores instances."""
        return self.policy.spool


def build_ae(cfg: Config, spool: Spool, *, counter: AssociationCounter | None = None,
             on_release: Callable[[], None] | None = None) -> PynetdicomReceiver:
    """Build the node's AE (contexts, timeouts, association policy) without starting it (see :func:`serve_ae`).

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
    policy = AssociationPolicy(node, spool, counter or LocalCounter())
    table = _Associations()
    return PynetdicomReceiver(ae, policy, _handlers(spool, policy, table, on_release), table)


def serve_ae(receiver: PynetdicomReceiver, cfg: Config, *, reuse_port: bool = False) -> ThreadedAssociationServer:
    """Bind and start the receiver's AE in a background thread; returns the server.

    ``server.server_address[1]`` is the bound port (useful with port 0). Stop it with ``server.shutdown()``.
    """
    ae = receiver.ae
    server_cls = type("_BoundServer", (_Server,), {"reuse_port": reuse_port})
    server = server_cls(ae, (cfg.node.host, cfg.node.port), ae.ae_title, ae.supported_contexts,
                        ssl_context=ssl_context(cfg.node), evt_handlers=receiver.handlers,
                        request_handler=_make_handler_class(receiver.policy, receiver.table))
    thread = threading.Thread(target=server.serve_forever, name=f"dicomnode-scp:{server.server_address[1]}",
                              daemon=True)
    thread.start()
    ae._servers.append(server)
    log.info("SCP %s listening on %s:%d (pid %d)", ae.ae_title, cfg.node.host, server.server_address[1], os.getpid())
    return server
