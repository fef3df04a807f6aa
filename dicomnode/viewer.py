"""A small same-origin web server for looking at results in OHIF.

It serves the pinned OHIF web app (the ``dist/`` folder of the npm package
``@ohif/app``, fetched by ``scripts/bootstrap.sh``) with our own
``app-config.js``, and proxies ``/dicom-web`` and ``/wado`` to an Orthanc that
runs the DICOMweb plugin. Browser and DICOMweb share one origin, so no CORS set-up
is needed. The Host header is forwarded, so the URLs Orthanc writes into its
DICOMweb answers point back at this server.

Run ``python -m dicomnode.viewer --orthanc http://127.0.0.1:8042 --port 3000``
and open ``http://127.0.0.1:3000/viewer?StudyInstanceUIDs=<uid>``.
"""

from __future__ import annotations

import argparse
import http.client
import json
import logging
import mimetypes
import os
import posixpath
import shutil
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from dicomnode.devpacs import OrthancServer

log = logging.getLogger(__name__)

OHIF_VERSION = "3.13.2"
DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"
PROXIED = ("/dicom-web", "/wado")
_FORWARDED_HEADERS = ("Accept", "Range", "Content-Type", "If-None-Match", "If-Modified-Since")
_RETURNED_HEADERS = ("Content-Type", "Content-Length", "Content-Range", "Accept-Ranges", "ETag", "Last-Modified",
                     "Content-Encoding", "Cache-Control")
mimetypes.add_type("application/wasm", ".wasm")
mimetypes.add_type("text/javascript", ".js")


class ViewerError(RuntimeError):
    """The OHIF web app or the DICOMweb plugin is missing."""


def default_ohif_dist() -> Path:
    """Where bootstrap puts the OHIF web app: ``$DICOMNODE_OHIF_DIST``, else ``$XDG_CACHE_HOME`` (``~/.cache``)."""
    env = os.environ.get("DICOMNODE_OHIF_DIST")
    if env:
        return Path(env)
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "bone-dicomnode" / f"ohif-{OHIF_VERSION}" / "dist"


def app_config_js(origin: str) -> str:
    """OHIF's ``window.config`` for one DICOMweb data source at ``origin`` (e.g. ``http://127.0.0.1:3000``)."""
    source = {
        "namespace": "@ohif/extension-default.dataSourcesModule.dicomweb",
        "sourceName": "dicomweb",
        "configuration": {
            "friendlyName": "bone-dicomnode Orthanc",
            "name": "orthanc",
            "qidoRoot": f"{origin}/dicom-web",
            "wadoRoot": f"{origin}/dicom-web",
            "wadoUriRoot": f"{origin}/wado",
            "qidoSupportsIncludeField": False,  # Orthanc's plugin rejects comma-joined includefield values
            "imageRendering": "wadors",
            "thumbnailRendering": "wadors",
            "enableStudyLazyLoad": True,
            "supportsFuzzyMatching": False,
            "supportsWildcard": True,
            "omitQuotationForMultipartRequest": True,
            "bulkDataURI": {"enabled": True},
        },
    }
    config = {
        "routerBasename": "/",
        "extensions": [],
        "modes": [],
        "showStudyList": True,
        "maxNumberOfWebWorkers": 2,
        "showWarningMessageForCrossOrigin": False,
        "showCPUFallbackMessage": False,
        "showLoadingIndicator": True,
        "showErrorDetails": "always",
        "investigationalUseDialog": {"option": "never"},
        "defaultDataSourceName": "dicomweb",
        "dataSources": [source],
    }
    return "window.config = " + json.dumps(config, indent=2) + ";\n"


class DicomWebOrthanc(OrthancServer):
    """An :class:`OrthancServer` with Debian's DICOMweb plugin (``orthanc-dicomweb``) at ``/dicom-web/``."""

    def write_config(self) -> None:
        """Write the base configuration, then enable the DICOMweb plugin and WADO-URI."""
        if not Path(DICOMWEB_PLUGIN).exists():
            raise ViewerError(f"{DICOMWEB_PLUGIN} is missing: install the Debian package orthanc-dicomweb "
                              "(scripts/bootstrap.sh does)")
        super().write_config()
        cfg = json.loads(self.config_path.read_text(encoding="utf-8"))
        cfg["Plugins"] = [DICOMWEB_PLUGIN]
        cfg["DicomWeb"] = {"Enable": True, "Root": "/dicom-web/", "EnableWado": True, "WadoRoot": "/wado",
                           "StudiesMetadata": "Full", "SeriesMetadata": "Full"}
        self.config_path.write_text(json.dumps(cfg, indent=2), encoding="utf-8")


class _Handler(BaseHTTPRequestHandler):
    server: ViewerServer
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt: str, *args: Any) -> None:  # noqa: D102 - route http.server's log to logging
        log.debug("viewer: " + fmt, *args)

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self._dispatch()

    def do_HEAD(self) -> None:  # noqa: N802
        self._dispatch()

    def do_POST(self) -> None:  # noqa: N802
        self._dispatch()

    def _dispatch(self) -> None:
        path = urllib.parse.urlsplit(self.path).path
        try:
            if path.startswith(PROXIED):
                self._proxy()
            elif path == "/app-config.js":
                host = self.headers.get("Host") or f"{self.server.server_address[0]}:{self.server.server_address[1]}"
                self._send(200, app_config_js(f"http://{host}").encode(), "text/javascript")
            else:
                self._static(path)
        except (BrokenPipeError, ConnectionResetError):
            log.debug("viewer: client went away during %s", self.path)

    def _send(self, status: int, body: bytes, content_type: str, extra: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (extra or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _static(self, path: str) -> None:
        root = self.server.dist
        rel = posixpath.normpath(urllib.parse.unquote(path)).lstrip("/")
        target = (root / rel).resolve() if rel not in ("", ".") else root / "index.html"
        if not target.is_relative_to(root.resolve()):
            self._send(404, b"not found", "text/plain")
            return
        if not target.is_file():
            # single-page app: every unknown route (/viewer, /segmentation, ...) is index.html
            target = root / "index.html"
        ctype = mimetypes.guess_type(target.name)[0] or "application/octet-stream"
        size = target.stat().st_size
        self.send_response(200)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(size))
        self.send_header("Cache-Control", "no-cache" if target.name == "index.html" else "max-age=3600")
        self.end_headers()
        if self.command != "HEAD":
            with target.open("rb") as fh:
                shutil.copyfileobj(fh, self.wfile)

    def _proxy(self) -> None:
        up = urllib.parse.urlsplit(self.server.orthanc_url)
        body = None
        if self.command == "POST":
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        headers = {k: v for k in _FORWARDED_HEADERS if (v := self.headers.get(k))}
        headers["Host"] = self.headers.get("Host") or up.netloc
        conn = http.client.HTTPConnection(up.hostname or "127.0.0.1", up.port or 80, timeout=120)
        try:
            conn.request(self.command, self.path, body=body, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
        except OSError as exc:
            log.warning("viewer: Orthanc at %s did not answer: %s", self.server.orthanc_url, exc)
            self._send(502, f"Orthanc at {self.server.orthanc_url} did not answer: {exc}".encode(), "text/plain")
            return
        finally:
            conn.close()
        extra = {k: v for k in _RETURNED_HEADERS if k not in ("Content-Type", "Content-Length")
                 and (v := resp.getheader(k))}
        self._send(resp.status, data, resp.getheader("Content-Type") or "application/octet-stream", extra)


class ViewerServer(ThreadingHTTPServer):
    """Serves OHIF from ``dist`` and proxies DICOMweb to ``orthanc_url``; ``port=0`` picks a free port."""

    daemon_threads = True

    def __init__(self, orthanc_url: str, dist: Path | None = None, host: str = "127.0.0.1", port: int = 0) -> None:
        self.dist = Path(dist) if dist else default_ohif_dist()
        if not (self.dist / "index.html").is_file():
            raise ViewerError(f"OHIF web app not found in {self.dist}: run scripts/bootstrap.sh (it fetches "
                              f"@ohif/app@{OHIF_VERSION}) or set DICOMNODE_OHIF_DIST")
        self.orthanc_url = orthanc_url.rstrip("/")
        self._thread: threading.Thread | None = None
        super().__init__((host, port), _Handler)

    @property
    def url(self) -> str:
        """Base URL of the viewer."""
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def study_url(self, study_uid: str) -> str:
        """Address that opens one study in OHIF's basic viewer."""
        return f"{self.url}/viewer?StudyInstanceUIDs={urllib.parse.quote(study_uid)}"

    def start(self) -> ViewerServer:
        """Serve in a background thread."""
        self._thread = threading.Thread(target=self.serve_forever, name="ohif-viewer", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the socket."""
        self.shutdown()
        self.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)


def main(argv: list[str] | None = None) -> int:
    """``python -m dicomnode.viewer``: serve OHIF for an Orthanc with DICOMweb until interrupted."""
    ap = argparse.ArgumentParser(prog="python -m dicomnode.viewer", description=__doc__.split("\n\n")[0])
    ap.add_argument("--orthanc", required=True, help="Orthanc base URL with the DICOMweb plugin, e.g. "
                                                     "http://127.0.0.1:8042")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=3000)
    ap.add_argument("--dist", type=Path, default=None, help="OHIF dist folder (default: bootstrap's cache)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        server = ViewerServer(args.orthanc, args.dist, args.host, args.port)
    except (ViewerError, OSError) as exc:
        print(f"error: {exc}")
        return 2
    log.info("OHIF %s at %s (DICOMweb from %s)", OHIF_VERSION, server.url, server.orthanc_url)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
