"""A local Orthanc PACS for the demo and the tests: Debian's ``/usr/sbin/Orthanc`` on loopback.

:class:`OrthancServer` writes a JSON config into its own directory, starts the
binary, waits for the REST API and offers small helpers over REST (urllib only).
Stopping and starting again with the same object keeps storage and ports, which
the "PACS down" tests rely on.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

ORTHANC_BIN = shutil.which("Orthanc") or "/usr/sbin/Orthanc"


def free_port() -> int:
    """A free TCP port on loopback."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class OrthancError(RuntimeError):
    """Orthanc did not start or a REST call failed."""


class OrthancServer:
    """One Orthanc instance with a generated configuration.

    Parameters
    ----------
    workdir:
        Directory for config, storage, index and log.
    modalities:
        ``{name: (ae_title, host, port)}`` registered as ``DicomModalities``.
    aet:
        Orthanc's own AE title.
    """

    def __init__(self, workdir: Path, modalities: dict[str, tuple[str, str, int]] | None = None,
                 aet: str = "ORTHANC", *, dicom_port: int | None = None, http_port: int | None = None,
                 name: str = "test-orthanc") -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.aet = aet
        self.name = name
        self.dicom_port = dicom_port or free_port()
        self.http_port = http_port or free_port()
        self.modalities = dict(modalities or {})
        self.log_path = self.workdir / "orthanc.log"
        self.config_path = self.workdir / "orthanc.json"
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_file: Any = None

    # ------------------------------------------------------------------ lifecycle

    @property
    def url(self) -> str:
        """Base URL of the REST API."""
        return f"http://127.0.0.1:{self.http_port}"

    def write_config(self) -> None:
        """Write the JSON configuration (called by :meth:`start`)."""
        cfg = {
            "Name": self.name,
            "StorageDirectory": str(self.workdir / "storage"),
            "IndexDirectory": str(self.workdir / "index"),
            "DicomAet": self.aet,
            "DicomPort": self.dicom_port,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomCheckCalledAeTitle": False,
            "DicomAlwaysAllowStore": True,
            "DicomAlwaysAllowEcho": True,
            "DicomModalities": {name: [ae, host, port] for name, (ae, host, port) in self.modalities.items()},
            "StableAge": 1,
            "OverwriteInstances": True,
            "Plugins": [],
            "HttpServerEnabled": True,
            "DicomServerEnabled": True,
            "StorageCompression": False,
            "ConcurrentJobs": 2,
            "DicomScuTimeout": 10,
            "LoadPrivateDictionary": False,
        }
        self.config_path.write_text(json.dumps(cfg, indent=2), encoding="utf-8")

    def start(self, timeout_s: float = 30.0) -> OrthancServer:
        """Start Orthanc and wait until ``/system`` answers."""
        if self._proc is not None and self._proc.poll() is None:
            return self
        self.write_config()
        self._log_file = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self._proc = subprocess.Popen([ORTHANC_BIN, "--verbose", str(self.config_path)], stdout=self._log_file,
                                      stderr=subprocess.STDOUT, cwd=self.workdir,
                                      env={**os.environ, "LANG": "C"})
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise OrthancError(f"Orthanc exited with {self._proc.returncode}:\n{self.log_tail()}")
            try:
                self.get("/system")
                return self
            except (OSError, OrthancError):
                time.sleep(0.1)
        self.stop()
        raise OrthancError(f"Orthanc did not answer within {timeout_s} s:\n{self.log_tail()}")

    def stop(self) -> None:
        """Stop Orthanc (SIGTERM, then SIGKILL); storage and ports are kept for a later :meth:`start`."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    @property
    def running(self) -> bool:
        """True while the Orthanc process is alive."""
        return self._proc is not None and self._proc.poll() is None

    def log_tail(self, n_chars: int = 6000) -> str:
        """The end of Orthanc's log file."""
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")[-n_chars:]
        except OSError:
            return "(no log)"

    # ------------------------------------------------------------------ REST

    def _request(self, method: str, path: str, body: bytes | None = None,
                 content_type: str = "application/json", timeout_s: float = 60.0) -> bytes:
        req = urllib.request.Request(self.url + path, data=body, method=method)
        if body is not None:
            req.add_header("Content-Type", content_type)
        try:
            with urllib.request.urlopen(req, timeout=timeout_s) as resp:
                return resp.read()
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode("utf-8", errors="replace")
            raise OrthancError(f"{method} {path} -> HTTP {exc.code}: {detail}") from exc

    def get(self, path: str) -> Any:
        """GET ``path`` and decode JSON."""
        return json.loads(self._request("GET", path))

    def post(self, path: str, payload: Any, timeout_s: float = 120.0) -> Any:
        """POST JSON to ``path`` and decode the JSON answer."""
        out = self._request("POST", path, json.dumps(payload).encode(), timeout_s=timeout_s)
        return json.loads(out) if out else None

    def upload(self, path: Path) -> str:
        """Upload one DICOM file (POST /instances); return its Orthanc instance id."""
        out = json.loads(self._request("POST", "/instances", Path(path).read_bytes(), "application/dicom"))
        return str(out["ID"])

    def upload_dir(self, folder: Path) -> list[str]:
        """Upload every ``*.dcm`` below ``folder``; return Orthanc instance ids."""
        return [self.upload(p) for p in sorted(Path(folder).rglob("*.dcm"))]

    def store_to_modality(self, modality: str, resources: list[str], timeout_s: float = 120.0) -> Any:
        """C-STORE Orthanc resources (ids of studies/series/instances) to a registered modality, synchronously."""
        return self.post(f"/modalities/{modality}/store",
                         {"Resources": list(resources), "Synchronous": True, "Timeout": int(timeout_s)},
                         timeout_s=timeout_s + 10)

    def echo_modality(self, modality: str) -> bool:
        """C-ECHO a registered modality; True when it answers."""
        try:
            self._request("POST", f"/modalities/{modality}/echo", b"{}")
            return True
        except OrthancError:
            return False

    def find(self, level: str, query: dict[str, str]) -> list[dict[str, Any]]:
        """/tools/find with ``Expand``; returns Orthanc's resource descriptions."""
        return list(self.post("/tools/find", {"Level": level, "Query": query, "Expand": True}))

    def instances_in_study(self, study_uid: str) -> list[dict[str, Any]]:
        """Instances of a study with their main tags (SOPClassUID, Modality, UIDs, SeriesNumber).

        Each item has ``ID`` (Orthanc id) plus tag keywords as keys.
        """
        out: list[dict[str, Any]] = []
        for inst in self.find("Instance", {"StudyInstanceUID": study_uid}):
            tags = self.get(f"/instances/{inst['ID']}/simplified-tags")
            item = {"ID": inst["ID"]}
            for key in ("SOPClassUID", "SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID", "Modality",
                        "SeriesNumber", "SeriesDescription", "InstanceNumber"):
                item[key] = tags.get(key)
            out.append(item)
        return out

    def study_id(self, study_uid: str) -> str | None:
        """Orthanc id of a study, or None."""
        found = self.post("/tools/find", {"Level": "Study", "Query": {"StudyInstanceUID": study_uid}})
        return str(found[0]) if found else None

    def get_file(self, instance_id: str) -> bytes:
        """The DICOM file of an instance."""
        return self._request("GET", f"/instances/{instance_id}/file")

    def statistics(self) -> dict[str, Any]:
        """Orthanc's /statistics (CountInstances, CountStudies, ...)."""
        return dict(self.get("/statistics"))
