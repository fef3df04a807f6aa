"""C-STORE SCU that drains the outbox to the configured destinations.

Each object is offered in its own transfer syntax plus explicit and implicit VR
little endian. Failures are classified: connection refused, timeouts, aborts,
transient association rejections and 0xA7xx / 0x0110 statuses are transient
(retried with backoff up to ``max_retries``); permanent rejections, "SOP class
not supported" (0x0122, or no accepted presentation context) and other
0xCxxx / 0xA9xx statuses are permanent and the delivery goes to ``dead``.
"""

from __future__ import annotations

import logging
import ssl
import threading
from collections.abc import Sequence
from pathlib import Path

import pydicom
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, Association
from pynetdicom.presentation import PresentationContext, build_context
from pynetdicom.sop_class import Verification

from dicomnode.config import Config, Destination, TLSConfig
from dicomnode.errors import DeliveryError
from dicomnode.metrics import delivery_failed, delivery_sent
from dicomnode.outbox import Outbox
from dicomnode.wakeup import Wakeup

log = logging.getLogger(__name__)

__all__ = ["Sender", "classify_status", "client_ssl_context", "send_files"]

_UNCOMPRESSED = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)


def classify_status(status: int) -> tuple[bool, bool]:
    """Map a C-STORE status to ``(ok, transient)``."""
    if status == 0x0000 or (status & 0xF000) == 0xB000:
        return True, False
    if (status & 0xFF00) == 0xA700 or status in (0x0110, 0x0212, 0x0213):
        return False, True
    return False, False


def _reject_reason(assoc: object) -> tuple[str, bool]:
    prim = getattr(getattr(assoc, "acceptor", None), "primitive", None)
    result = getattr(prim, "result", None)
    source = getattr(prim, "result_source", None)
    diag = getattr(prim, "diagnostic", None)
    transient = result == 0x02
    kind = "transient" if transient else "permanent"
    return f"association rejected ({kind}; source {source}, reason {diag})", transient


def client_ssl_context(tls: TLSConfig) -> ssl.SSLContext:
    """TLS context for the SCU: our client certificate, and the peer verified against ``ca_file``.

    Without ``ca_file`` the system's trusted CAs are used. Host names are not checked (DICOM peers are
    usually configured by IP address); the chain must still verify.
    """
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(tls.ca_file) if tls.ca_file else None)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_cert_chain(str(tls.cert_file), str(tls.key_file))
    return ctx


def _requested_contexts(headers: list[tuple[str, str]]) -> list[PresentationContext]:
    """Verification plus, per SOP class, its own transfer syntax and the uncompressed ones (at most 128)."""
    contexts = [build_context(Verification)]  # keeps the association up when no storage context is accepted
    for sop_class, ts in sorted(set(headers)):
        if ts not in _UNCOMPRESSED:
            contexts.append(build_context(sop_class, [ts]))
        contexts.append(build_context(sop_class, list(_UNCOMPRESSED)))
    uniq = {(c.abstract_syntax, tuple(c.transfer_syntax)): c for c in contexts}
    return list(uniq.values())[:128]


def _associate(ae: AE, dest: Destination) -> Association:
    """Open the association to ``dest`` (with TLS when configured); raise DeliveryError unless established."""
    tls_args = None
    if dest.tls is not None:
        try:
            tls_args = (client_ssl_context(dest.tls), None)
        except (OSError, ssl.SSLError) as exc:
            raise DeliveryError(f"TLS set-up for {dest.ae_title} failed (certificate, key or CA file): {exc}",
                                transient=False) from exc
    try:
        assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title, tls_args=tls_args)
    except ssl.SSLError as exc:
        raise DeliveryError(f"TLS handshake with {dest.ae_title}@{dest.host}:{dest.port} failed: {exc}",
                            transient=True) from exc
    except OSError as exc:
        raise DeliveryError(f"cannot connect to {dest.ae_title}@{dest.host}:{dest.port}: {exc}",
                            transient=True) from exc
    if assoc.is_rejected:
        reason, transient = _reject_reason(assoc)
        raise DeliveryError(f"{dest.ae_title}: {reason}", transient=transient)
    if not assoc.is_established:
        raise DeliveryError(f"cannot associate with {dest.ae_title}@{dest.host}:{dest.port} (refused, timed out "
                            "or aborted)", transient=True)
    return assoc


def _store_one(assoc: Association, accepted: set[tuple[str, str]], path: Path, sop_class: str, ts: str,
               dest: Destination) -> DeliveryError | None:
    """C-STORE one file, decompressing it when only an uncompressed context was accepted."""
    if not assoc.is_established:
        return DeliveryError("association aborted during sending", transient=True)
    ds = pydicom.dcmread(path)
    if (sop_class, ts) not in accepted:
        target = next((t for t in _UNCOMPRESSED if (sop_class, t) in accepted), None)
        if target is None:
            return DeliveryError(f"{dest.ae_title} does not support SOP class {sop_class} "
                                 "(no presentation context accepted)", transient=False)
        if ds.file_meta.TransferSyntaxUID.is_compressed:
            ds.decompress()
        ds.file_meta.TransferSyntaxUID = target
    try:
        status = assoc.send_c_store(ds)
    except (ValueError, RuntimeError) as exc:
        return DeliveryError(f"cannot send: {exc}", transient=False)
    code = int(status.Status) if status and "Status" in status else None
    if code is None:
        return DeliveryError("no C-STORE response (timeout or abort)", transient=True)
    ok, transient = classify_status(code)
    return None if ok else DeliveryError(f"{dest.ae_title} answered C-STORE status 0x{code:04X}", transient=transient)


def send_files(paths: Sequence[Path], dest: Destination, calling_ae: str) -> list[DeliveryError | None]:
    """Send files over one association; return per-file ``None`` (stored) or the error.

    Raises
    ------
    DeliveryError
        When no association could be established (every file failed the same way).
    """
    headers = []
    for p in paths:
        ds = pydicom.dcmread(p, stop_before_pixels=True)
        headers.append((str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID)))
    ae = AE(ae_title=dest.calling_ae_title or calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = dest.timeout_s
    ae.requested_contexts = _requested_contexts(headers)
    assoc = _associate(ae, dest)
    try:
        accepted = {(c.abstract_syntax, c.transfer_syntax[0]) for c in assoc.accepted_contexts}
        return [_store_one(assoc, accepted, path, sop_class, ts, dest)
                for path, (sop_class, ts) in zip(paths, headers, strict=True)]
    finally:
        if assoc.is_established:
            assoc.release()


class Sender:
    """Background thread sending due outbox deliveries to their destinations."""

    def __init__(self, cfg: Config, outbox: Outbox, *, poll_s: float = 0.5) -> None:
        self.cfg = cfg
        self.outbox = outbox
        self.poll_s = poll_s
        self._stop = threading.Event()
        self._wakeup = Wakeup()
        self._thread = threading.Thread(target=self._run, name="sender", daemon=True)

    def start(self) -> Sender:
        """Start the thread."""
        self._thread.start()
        return self

    def wake(self) -> None:
        """Look for due deliveries now."""
        self._wakeup.wake()

    def stop(self, timeout_s: float = 30.0) -> None:
        """Stop after the current batch."""
        self._stop.set()
        self._wakeup.wake()
        self._thread.join(timeout_s)

    def run_once(self) -> int:
        """Attempt every due delivery once; returns how many were attempted."""
        n = 0
        for dest_name, deliveries in self.outbox.due().items():
            if self._stop.is_set():
                break
            dest = self.cfg.destinations.get(dest_name)
            if dest is None:
                for d in deliveries:
                    self.outbox.mark_failed(d.id, f"destination {dest_name!r} is not configured", transient=False,
                                            max_retries=0, backoff_initial_s=1, backoff_max_s=1)
                continue
            n += len(deliveries)
            self._send_batch(dest_name, dest, deliveries)
        return n

    def _send_batch(self, dest_name: str, dest: Destination, deliveries: list) -> None:
        existing = [d for d in deliveries if d.path.exists()]
        for d in deliveries:
            if not d.path.exists():
                self.outbox.mark_failed(d.id, f"result file {d.path} is missing", transient=False, max_retries=0,
                                        backoff_initial_s=1, backoff_max_s=1)
        if not existing:
            return
        try:
            results: list[DeliveryError | None] = send_files([d.path for d in existing], dest, self.cfg.node.ae_title)
        except DeliveryError as exc:
            results = [exc] * len(existing)
        except Exception as exc:  # noqa: BLE001 - unreadable file or library error: permanent, recorded
            results = [DeliveryError(f"{type(exc).__name__}: {exc}", transient=False)] * len(existing)
        for d, err in zip(existing, results, strict=True):
            if err is None:
                self.outbox.mark_sent(d.id)
                delivery_sent(self.outbox.conn, dest_name, d.job_id)
                log.info("sent %s to %s", d.sop_instance_uid, dest_name)
            else:
                state = self.outbox.mark_failed(d.id, str(err), transient=err.transient, max_retries=dest.max_retries,
                                                backoff_initial_s=dest.backoff_initial_s,
                                                backoff_max_s=dest.backoff_max_s)
                delivery_failed(dest_name, state)
                log.warning("delivery %d to %s failed: %s -> %s", d.id, dest_name, err, state)

    def _run(self) -> None:
        while not self._stop.is_set():
            token = self._wakeup.token()
            try:
                self.run_once()
            except Exception:  # noqa: BLE001 - the sender thread must survive database hiccups
                log.exception("sender loop error")
            self._wakeup.wait(token, self.poll_s)
