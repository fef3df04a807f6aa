"""A small read-only HTTP server: ``/metrics``, ``/healthz``, ``/readyz`` and a status page.

Enabled when ``node.status_http_port`` is set; it binds ``node.status_http_host``
(loopback by default). It runs stdlib :mod:`http.server` in a daemon thread and
only reads the node database and the outbox. The status page ``/`` lists recent
studies with their route, job state, latency and model version, and links to
``/overlay/<delivery id>.png`` (secondary captures and SEGs rendered on demand
with :mod:`dicomnode.results.render`). At its top it flags what needs the
operator (:func:`dicomnode.status.attention`): quarantined instances with their
reason, failed jobs and dead deliveries. It reloads itself every ``REFRESH_S``
seconds and wraps long UIDs so that its columns fit a 1400 px window. It shows
UIDs only, never patient names or IDs, and HTML-escapes every value.
"""

from __future__ import annotations

import html
import io
import json
import logging
import re
import sqlite3
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pydicom
from PIL import Image

from dicomnode import store
from dicomnode.config import Config
from dicomnode.errors import DicomNodeError
from dicomnode.metrics import NodeMetrics, default_metrics
from dicomnode.spool import Spool
from dicomnode.status import attention
from dicomnode.store import StoreView

log = logging.getLogger(__name__)

__all__ = ["StatusServer", "readiness", "render_status_page"]

RENDERABLE_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.7": "SC",
    "1.2.840.10008.5.1.4.1.1.7.4": "SC",  # multi-frame true colour SC
    "1.2.840.10008.5.1.4.1.1.66.4": "SEG",
}
_OVERLAY_RE = re.compile(r"^/overlay/(\d+)\.png$")
_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
#: the status page reloads itself this often (seconds)
REFRESH_S = 15


def _e(value: object) -> str:
    return html.escape("-" if value is None else str(value), quote=True)


def _ts(value: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(value)) if value else "-"


def _dur(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} s"


def readiness(cfg: Config, receivers_alive: Callable[[], bool] | None = None) -> tuple[bool, dict[str, Any]]:
    """Check the database, the receivers and the free disk space; returns ``(ready, details)``."""
    checks: dict[str, Any] = {}
    try:
        with StoreView(store.db_path(cfg.node.storage_dir)) as view:
            view.ping()
        checks["database"] = "ok"
    except (sqlite3.Error, OSError) as exc:
        checks["database"] = f"error: {exc}"
    alive = receivers_alive() if receivers_alive is not None else True
    checks["receivers"] = "ok" if alive else "stopped"
    try:
        free = Spool(cfg.node.storage_dir, cfg.node.disk_min_free_gb).free_gb()
        checks["disk_free_gb"] = round(free, 2)
        checks["disk"] = "ok" if free >= cfg.node.disk_min_free_gb else "low"
    except (OSError, DicomNodeError, sqlite3.Error) as exc:
        checks["disk"] = f"error: {exc}"
    ready = checks["database"] == "ok" and checks["receivers"] == "ok" and checks["disk"] == "ok"
    return ready, checks


def _result_kind(path: Path) -> str | None:
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPClassUID"])
    except Exception:  # noqa: BLE001 - a missing or unreadable file has no link
        return None
    return RENDERABLE_SOP_CLASSES.get(str(ds.get("SOPClassUID", "")))


def render_status_page(cfg: Config, limit: int = 50) -> str:
    """HTML of the status page (recent studies, one row per job; UIDs only)."""
    path = store.db_path(cfg.node.storage_dir)
    rows_html: list[str] = []
    counts: dict[str, int] = {}
    alerts = ""
    if path.exists():
        with StoreView(path) as view:
            alerts = _alerts_html(attention(view, cfg))
            if view.has_table("studies") and view.has_table("jobs"):
                counts = view.study_counts()
                rows_html = _study_rows(view, cfg.node.storage_dir, limit)
    summary = ", ".join(f"{_e(k)}: {v}" for k, v in sorted(counts.items())) or "no studies yet"
    head = ("<tr><th>Study Instance UID</th><th>Study state</th><th>Route</th><th>Task</th><th>Job state</th>"
            "<th>Model version</th><th>Received</th><th>Receive&rarr;complete</th><th>Inference</th>"
            "<th>Delivered</th><th>Overlays</th></tr>")
    body = "\n".join(rows_html) or '<tr><td colspan="11">no studies received yet</td></tr>'
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta http-equiv="refresh" content="{REFRESH_S}">
<meta name="viewport" content="width=device-width"><title>{_e(cfg.node.ae_title)} status</title>
<style>body{{font-family:sans-serif;margin:1em}}table{{border-collapse:collapse;width:100%;table-layout:auto}}
td,th{{border:1px solid #999;padding:3px 5px;font-size:85%;vertical-align:top}}th{{background:#eee}}
td.study,td.uid{{font-family:monospace;font-size:75%;word-break:break-all;min-width:12em;max-width:22em}}
td.err{{max-width:28em;word-break:break-word}}
.alert{{border:2px solid #b00020;background:#fdecea;padding:.4em .8em;margin:.5em 0}}
.alert h2{{font-size:105%;margin:.2em 0;color:#b00020}}td.dead{{background:#fdecea;color:#b00020;font-weight:bold}}.ok{{color:#1b5e20}}</style></head>
<body><h1>Node {_e(cfg.node.ae_title)}</h1>
<div id="alerts">{alerts}</div>
{_engine_html(cfg)}<p id="summary">Studies: {summary}. Page generated {_e(_ts(time.time()))}; refreshes every {REFRESH_S} s.
Results are AI outputs, not for diagnostic use alone.</p>
<table id="studies">{head}
{body}
</table>
<p><a href="/metrics">metrics</a> &middot; <a href="/healthz">healthz</a> &middot; <a href="/readyz">readyz</a></p>
</body></html>
"""


def _engine_html(cfg: Config) -> str:
    """The execution engine's state (Ray only); an alert while jobs wait for the cluster."""
    from dicomnode.execution import status_lines

    return "".join(f'<p id="engine" class="{"alert" if "waiting" in line else "ok"}">{_e(line)}</p>\n'
                   for line in status_lines(cfg))


def _alerts_html(found: dict[str, Any]) -> str:
    """The boxes at the top of the page: quarantined instances, failed jobs, dead deliveries (empty: one line)."""
    parts: list[str] = []
    if found["quarantined"]:
        rows = "".join(f'<tr><td>{q.id}</td><td class="uid">{_e(q.sop_instance_uid)}</td><td>{_e(q.kind)}</td>'
                       f'<td class="err">{_e(q.reason)}</td><td class="uid">{_e(q.path.name)}</td>'
                       f"<td>{_e(_ts(q.quarantined_at))}</td></tr>" for q in found["quarantined"])
        parts.append(f'<div class="alert" id="quarantined"><h2>{len(found["quarantined"])} acknowledged instance(s)'
                     " quarantined: the sender was told &ldquo;stored&rdquo; but the node could not index them"
                     " (see README, Quarantined instances)</h2><table><tr><th>#</th><th>SOP Instance UID</th>"
                     f"<th>Kind</th><th>Reason</th><th>File (storage_dir/quarantine)</th><th>When</th></tr>{rows}"
                     "</table></div>")
    if found["jobs"]:
        rows = "".join(f'<tr><td>{r["id"]}</td><td>{_e(r["state"])}</td><td>{r["attempts"]}</td>'
                       f'<td>{_e(r["task"])}</td><td class="uid">{_e(r["study_uid"])}</td>'
                       f'<td class="err">{_e(r["last_error"])}</td></tr>' for r in found["jobs"])
        parts.append(f'<div class="alert" id="failed-jobs"><h2>{len(found["jobs"])} failed job(s)</h2><table><tr>'
                     "<th>#</th><th>State</th><th>Attempts</th><th>Task</th><th>Study</th><th>Last error</th></tr>"
                     f"{rows}</table></div>")
    if found["deliveries"]:
        rows = "".join(f'<tr><td>{r["id"]}</td><td>{_e(r["destination"])}</td>'
                       f'<td class="uid">{_e(r["sop_instance_uid"])}</td><td class="err">{_e(r["last_error"])}</td>'
                       "</tr>" for r in found["deliveries"])
        parts.append(f'<div class="alert" id="dead-deliveries"><h2>{len(found["deliveries"])} dead deliver'
                     f'{"y" if len(found["deliveries"]) == 1 else "ies"}: results that will not be sent again'
                     "</h2><table><tr><th>#</th><th>Destination</th><th>SOP Instance UID</th><th>Last error</th></tr>"
                     f"{rows}</table></div>")
    return "".join(parts) or '<p class="ok" id="no-alerts">No failed jobs, dead deliveries or quarantined instances.</p>'


def _study_rows(view: StoreView, storage_dir: Path, limit: int) -> list[str]:
    out: list[str] = []
    has_deliveries = view.has_table("deliveries")
    for st in view.study_overview(limit):
        jobs: list[Any] = view.study_jobs(st["study_uid"]) or [None]
        for job in jobs:
            rtc = (st["completed_at"] - st["first"]) if st["completed_at"] and st["first"] else None
            cells = [f'<td class="study">{_e(st["study_uid"])}</td>', f'<td class="study-state">{_e(st["state"])}</td>']
            if job is None:
                cells += ["<td>-</td>", "<td>-</td>", '<td class="job-state">-</td>', "<td>-</td>",
                          f"<td>{_e(_ts(st['first']))}</td>", f"<td>{_e(_dur(rtc))}</td>", "<td>-</td>",
                          "<td>-</td>", "<td>-</td>"]
            else:
                inference = (job["updated_at"] - st["completed_at"]) if job["state"] == "done" and \
                    st["completed_at"] else None
                delivered, links = "-", []
                if has_deliveries:
                    dels = view.job_deliveries(job["id"])
                    if dels:
                        n_sent = sum(d["state"] == "sent" for d in dels)
                        last = max((d["sent_at"] or 0) for d in dels)
                        delivered = f"{n_sent}/{len(dels)}"
                        if n_sent == len(dels) and st["first"]:
                            delivered += f" ({_dur(last - st['first'])} after receipt)"
                    seen: set[str] = set()
                    for d in dels:
                        kind = _result_kind(storage_dir / d["path"])
                        if kind and d["path"] not in seen:
                            seen.add(d["path"])
                            links.append(f'<a class="overlay" href="/overlay/{int(d["id"])}.png">{_e(kind)}</a>')
                err = f' title="{_e(job["last_error"])}"' if job["last_error"] else ""
                cells += [f'<td class="route">{_e(job["route"])}</td>', f'<td class="task">{_e(job["task"])}</td>',
                          f'<td class="job-state{" dead" if job["state"] == "dead" else ""}"{err}>'
                          f'{_e(job["state"])}</td>',
                          f'<td class="model">{_e(job["model_version"])}</td>', f"<td>{_e(_ts(st['first']))}</td>",
                          f"<td>{_e(_dur(rtc))}</td>", f"<td>{_e(_dur(inference))}</td>",
                          f'<td class="delivered">{_e(delivered)}</td>', f"<td>{' '.join(links) or '-'}</td>"]
            out.append("<tr>" + "".join(cells) + "</tr>")
    return out


def render_overlay_png(cfg: Config, delivery_id: int) -> bytes:
    """PNG bytes of the SC or SEG result behind ``delivery_id``.

    Raises
    ------
    KeyError
        Unknown delivery, or a result kind that is not rendered (SR).
    """
    from dicomnode.results.render import render_dataset

    with StoreView(store.db_path(cfg.node.storage_dir)) as view:
        rel = view.delivery_path(delivery_id)
    if rel is None:
        raise KeyError(delivery_id)
    root = cfg.node.storage_dir.resolve()
    path = (root / rel).resolve()
    if root not in path.parents or _result_kind(path) is None:
        raise KeyError(delivery_id)
    rgb = render_dataset(pydicom.dcmread(path))
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        log.debug("http %s: " + format, self.address_string(), *args)

    def _send(self, code: int, body: bytes, content_type: str) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:  # noqa: N802 - stdlib name
        owner = self.server.owner
        path = self.path.split("?", 1)[0]
        try:
            if path == "/metrics":
                self._send(200, owner.metrics.exposition(), _CONTENT_TYPE)
            elif path == "/healthz":
                self._send(200, b"ok\n", "text/plain; charset=utf-8")
            elif path == "/readyz":
                ready, checks = readiness(owner.cfg, owner.receivers_alive)
                self._send(200 if ready else 503, json.dumps({"ready": ready, **checks}).encode(),
                           "application/json")
            elif path in ("/", "/index.html"):
                self._send(200, render_status_page(owner.cfg).encode("utf-8"), "text/html; charset=utf-8")
            elif (m := _OVERLAY_RE.match(path)) is not None:
                try:
                    png = render_overlay_png(owner.cfg, int(m.group(1)))
                except KeyError:
                    self._send(404, b"no such overlay\n", "text/plain; charset=utf-8")
                else:
                    self._send(200, png, "image/png")
            else:
                self._send(404, b"not found\n", "text/plain; charset=utf-8")
        except Exception:  # noqa: BLE001 - one bad request must not stop the server
            log.exception("status page request %s failed", path)
            self._send(500, b"internal error\n", "text/plain; charset=utf-8")

    def do_HEAD(self) -> None:  # noqa: N802 - stdlib name
        self._send(405, b"", "text/plain")

    do_POST = do_PUT = do_DELETE = do_HEAD  # noqa: N815 - read-only server


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    owner: StatusServer


class StatusServer:
    """The status HTTP server of one node.

    Parameters
    ----------
    cfg:
        Node configuration (``node.status_http_host`` / ``status_http_port``; port 0 picks a free one).
    receivers_alive:
        Callable telling ``/readyz`` whether the DICOM receivers run.
    metrics:
        Registry to export; default :func:`dicomnode.metrics.default_metrics`.
    """

    def __init__(self, cfg: Config, receivers_alive: Callable[[], bool] | None = None,
                 metrics: NodeMetrics | None = None) -> None:
        self.cfg = cfg
        self.receivers_alive = receivers_alive
        self.metrics = metrics or default_metrics()
        self.metrics.attach_database(cfg.node.storage_dir)
        self._httpd: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        """The bound port."""
        assert self._httpd is not None
        return int(self._httpd.server_address[1])

    def start(self) -> StatusServer:
        """Bind and serve in a daemon thread."""
        port = self.cfg.node.status_http_port or 0
        self._httpd = _Server((self.cfg.node.status_http_host, port), _Handler)
        self._httpd.owner = self
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="status-http", daemon=True)
        self._thread.start()
        log.info("status page on http://%s:%d/", self.cfg.node.status_http_host, self.port)
        return self

    def stop(self) -> None:
        """Stop serving."""
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
