"""dicomnode.viewer: static OHIF files with a single-page fallback, our app-config.js, and the DICOMweb proxy
(Host header forwarded) against a small upstream HTTP server on loopback."""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from dicomnode.viewer import ViewerError, ViewerServer, app_config_js


class _Upstream(BaseHTTPRequestHandler):
    """Answers every GET with what it received, as JSON (the test double for Orthanc's DICOMweb)."""

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:  # noqa: N802
        body = json.dumps({"path": self.path, "host": self.headers.get("Host"),
                           "accept": self.headers.get("Accept")}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/dicom+json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def served(tmp_path: Path) -> Iterator[ViewerServer]:
    dist = tmp_path / "dist"
    dist.mkdir()
    (dist / "index.html").write_text("<html>ohif</html>")
    (dist / "app.bundle.js").write_text("console.log(1)")
    (dist / "x.wasm").write_bytes(b"\0asm")
    upstream = ThreadingHTTPServer(("127.0.0.1", 0), _Upstream)
    threading.Thread(target=upstream.serve_forever, daemon=True).start()
    server = ViewerServer(f"http://127.0.0.1:{upstream.server_address[1]}", dist).start()
    try:
        yield server
    finally:
        server.stop()
        upstream.shutdown()
        upstream.server_close()


def _get(url: str, accept: str | None = None) -> tuple[int, str, bytes]:
    req = urllib.request.Request(url, headers={"Accept": accept} if accept else {})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return resp.status, resp.headers.get("Content-Type", ""), resp.read()


def test_static_files_spa_fallback_and_config(served: ViewerServer) -> None:
    assert _get(served.url + "/app.bundle.js")[1].startswith("text/javascript")
    assert _get(served.url + "/x.wasm")[1] == "application/wasm"
    status, ctype, body = _get(served.study_url("1.2.3"))  # /viewer?StudyInstanceUIDs=... is the app's route
    assert status == 200 and body == b"<html>ohif</html>"
    assert _get(served.url + "/../../etc/passwd")[2] == b"<html>ohif</html>"  # never leaves dist
    config = _get(served.url + "/app-config.js")[2].decode()
    assert f'"qidoRoot": "{served.url}/dicom-web"' in config and f'"wadoUriRoot": "{served.url}/wado"' in config


def test_dicomweb_is_proxied_with_host_and_accept(served: ViewerServer) -> None:
    status, ctype, body = _get(served.url + "/dicom-web/studies?limit=1", accept="application/dicom+json")
    seen = json.loads(body)
    assert status == 200 and ctype == "application/dicom+json"
    assert seen == {"path": "/dicom-web/studies?limit=1", "host": served.url.removeprefix("http://"),
                    "accept": "application/dicom+json"}
    assert json.loads(_get(served.url + "/wado?requestType=WADO")[2])["path"] == "/wado?requestType=WADO"


def test_upstream_down_is_a_clear_502(tmp_path: Path) -> None:
    dist = tmp_path / "dist"
    dist.mkdir()
    (dist / "index.html").write_text("x")
    server = ViewerServer("http://127.0.0.1:9", dist).start()  # port 9 (discard): nothing listens
    try:
        with pytest.raises(urllib.error.HTTPError) as err:
            _get(server.url + "/dicom-web/studies")
        assert err.value.code == 502 and b"did not answer" in err.value.read()
    finally:
        server.stop()


def test_missing_ohif_build_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ViewerError, match="bootstrap"):
        ViewerServer("http://127.0.0.1:8042", tmp_path / "nothing")
    assert "window.config" in app_config_js("http://h:1")
