"""Association policy shared by both receivers (native and pynetdicom): who may associate, and the limits.

* the calling AE title and peer IP must be in ``allowed_callers`` (else rejected-permanent,
  "calling AE title not recognised");
* the free disk space must be above the minimum and the number of open associations below
  ``max_associations`` (else rejected-transient). The association count is shared between
  receiver processes through a :class:`SharedCounter`.

Also the transfer syntaxes both receivers accept and the TLS context both build.
"""

from __future__ import annotations

import ssl
import threading
from typing import Any, Protocol

from pydicom import uid as tsuid

from dicomnode.config import NodeConfig
from dicomnode.dimse_status import RJ_CALLING_AE, RJ_LOCAL_LIMIT, RJ_NO_REASON
from dicomnode.spool import Spool

__all__ = ["TRANSFER_SYNTAXES", "AssociationCounter", "AssociationPolicy", "LocalCounter", "SharedCounter",
           "ssl_context"]

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


class AssociationCounter(Protocol):
    """Open-association counter: one process's (:class:`LocalCounter`) or all receivers' (:class:`SharedCounter`)."""

    def try_acquire(self, limit: int) -> bool:
        """Take a slot unless ``limit`` are taken; True when taken."""
        ...

    def release(self) -> None:
        """Give a slot back."""
        ...


class LocalCounter:
    """Open-association counter for one process."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._n = 0

    def try_acquire(self, limit: int) -> bool:
        """Take a slot unless ``limit`` are taken."""
        with self._lock:
            if self._n >= limit:
                return False
            self._n += 1
            return True

    def release(self) -> None:
        """Give a slot back."""
        with self._lock:
            self._n = max(self._n - 1, 0)


class SharedCounter:
    """Open-association counter shared by the receiver processes (a ``multiprocessing.Value``)."""

    def __init__(self, value: Any) -> None:
        self._value = value

    def try_acquire(self, limit: int) -> bool:
        """Take a slot unless ``limit`` are taken (across processes)."""
        with self._value.get_lock():
            if self._value.value >= limit:
                return False
            self._value.value += 1
            return True

    def release(self) -> None:
        """Give a slot back."""
        with self._value.get_lock():
            self._value.value = max(self._value.value - 1, 0)


def _unmapped(peer_host: str) -> str:
    """An IPv4 peer on a dual-stack socket without its ``::ffff:`` prefix."""
    return peer_host[7:] if peer_host.lower().startswith("::ffff:") else peer_host


class AssociationPolicy:
    """Who may associate, and the shared limits."""

    def __init__(self, node: NodeConfig, spool: Spool, counter: AssociationCounter) -> None:
        self.allowed = {(c.ae_title.strip(), c.host.strip()) for c in node.allowed_callers}
        self.max_associations = node.max_associations
        self.ae_title = node.ae_title.strip()
        self.check_called = node.check_called_ae_title
        self.spool = spool
        self.counter = counter

    def host_known(self, peer_host: str) -> bool:
        """True when some ``allowed_callers`` entry names this address (checked before reading anything)."""
        peer_host = _unmapped(peer_host)
        return any(host == peer_host for _, host in self.allowed)

    def decide(self, calling_ae: str, peer_host: str) -> tuple[tuple[int, int, int] | None, str]:
        """Return (reject triple or None, reason); acquires an association slot when accepting."""
        if (calling_ae.strip(), _unmapped(peer_host)) not in self.allowed:
            return RJ_CALLING_AE, "calling AE title / host not in allowed_callers"
        if not self.spool.disk_ok():
            return RJ_NO_REASON, "free disk space below disk_min_free_gb"
        if not self.counter.try_acquire(self.max_associations):
            return RJ_LOCAL_LIMIT, f"max_associations ({self.max_associations}) reached"
        return None, "accepted"


def ssl_context(node: NodeConfig) -> ssl.SSLContext | None:
    """The server-side TLS context of ``node.tls`` (None without TLS)."""
    if node.tls is None:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(str(node.tls.cert_file), str(node.tls.key_file))
    if node.tls.ca_file:
        ctx.load_verify_locations(str(node.tls.ca_file))
    ctx.verify_mode = ssl.CERT_REQUIRED if node.tls.require_client_cert else ssl.CERT_NONE
    return ctx
