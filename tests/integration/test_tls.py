"""DICOM TLS with real peers: dcmtk ``storescu +tls`` to the node, the node's SCU to dcmtk ``storescp +tls``,
and clients whose certificate was not issued by the trusted CA are refused. Certificates are made with openssl.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest

from dicomnode.config import Config, Destination, TLSConfig
from dicomnode.errors import DeliveryError
from dicomnode.scp import ReceiverGroup, start_receivers
from dicomnode.sender import send_files
from dicomnode.spool import Spool
from tests.conftest import free_port
from tests.plugins.bone_test_task import write_study

pytestmark = pytest.mark.integration

OPENSSL, STORESCU, STORESCP = "/usr/bin/openssl", "/usr/bin/storescu", "/usr/bin/storescp"
ENV = dict(os.environ, TCP_NODELAY="1")


def _run(*args: str) -> None:
    subprocess.run(list(args), check=True, capture_output=True, timeout=60)


def _make_ca(folder: Path, name: str) -> tuple[Path, Path]:
    key, cert = folder / f"{name}.key", folder / f"{name}.pem"
    _run(OPENSSL, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
         "-days", "2", "-subj", f"/CN={name}", "-addext", "basicConstraints=critical,CA:TRUE",
         "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    return key, cert


def _make_leaf(folder: Path, name: str, ca: tuple[Path, Path]) -> TLSConfig:
    key, csr, cert, ext = (folder / f"{name}{s}" for s in (".key", ".csr", ".pem", ".ext"))
    _run(OPENSSL, "req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(csr), "-subj",
         f"/CN={name}")
    ext.write_text("basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n"
                   "extendedKeyUsage=serverAuth,clientAuth\nsubjectAltName=IP:127.0.0.1\n", encoding="utf-8")
    _run(OPENSSL, "x509", "-req", "-in", str(csr), "-CA", str(ca[1]), "-CAkey", str(ca[0]), "-CAcreateserial",
         "-out", str(cert), "-days", "2", "-extfile", str(ext))
    return TLSConfig(cert_file=cert, key_file=key, ca_file=ca[1])


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, TLSConfig]:
    """A site CA with server and client certificates, and a rogue CA with its own client certificate."""
    if not Path(OPENSSL).exists():
        pytest.skip("openssl is not installed")
    folder = tmp_path_factory.mktemp("pki")
    ca = _make_ca(folder, "site-ca")
    rogue_ca = _make_ca(folder, "rogue-ca")
    return {"server": _make_leaf(folder, "server", ca), "client": _make_leaf(folder, "client", ca),
            "rogue": _make_leaf(folder, "rogue", rogue_ca)}


@pytest.fixture
def study(tmp_path: Path) -> list[Path]:
    _, paths = write_study(tmp_path / "study", n_series=1, n_images=2)
    return sorted(paths)


def _wait_port(port: int, proc: subprocess.Popen[bytes], timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, "peer exited early"
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    pytest.fail(f"peer did not listen on {port}")


@pytest.fixture
def tls_storescp(tmp_path: Path, pki: dict[str, TLSConfig]) -> Iterator[tuple[int, Path]]:
    """dcmtk storescp with TLS that requires a client certificate issued by the site CA."""
    port, out = free_port(), tmp_path / "storescp-out"
    out.mkdir()
    srv = pki["server"]
    proc = subprocess.Popen([STORESCP, "-aet", "TLSPEER", "+tls", str(srv.key_file), str(srv.cert_file), "+cf",
                             str(srv.ca_file), "-rc", "-od", str(out), str(port)], env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_port(port, proc)
        yield port, out
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture
def tls_node(tmp_path: Path, pki: dict[str, TLSConfig]) -> Iterator[tuple[Config, Spool]]:
    """The node's SCP with TLS, requiring client certificates from the site CA."""
    srv = pki["server"]
    cfg = Config.model_validate({"node": {
        "port": free_port(), "storage_dir": str(tmp_path / "var"), "disk_min_free_gb": 0,
        "allowed_callers": [{"ae_title": "STORESCU", "host": "127.0.0.1"}],
        "tls": {"cert_file": str(srv.cert_file), "key_file": str(srv.key_file), "ca_file": str(srv.ca_file),
                "require_client_cert": True}}})
    group = start_receivers(cfg)
    _GROUPS[group.port] = group
    try:
        yield cfg, Spool(cfg.node.storage_dir, 0)
    finally:
        group.stop()
        _GROUPS.pop(group.port, None)


_GROUPS: dict[int, ReceiverGroup] = {}


def _storescu_tls(port: int, creds: TLSConfig, files: list[Path]) -> subprocess.CompletedProcess[str]:
    """storescu over TLS; then wait until a node on ``port`` has indexed what it acknowledged."""
    res = subprocess.run([STORESCU, "-aet", "STORESCU", "-aec", "BONENODE", "+tls", str(creds.key_file),
                          str(creds.cert_file), "+cf", str(creds.ca_file), "127.0.0.1", str(port),
                          *map(str, files)], capture_output=True, text=True, env=ENV, timeout=120)
    if port in _GROUPS:
        assert _GROUPS[port].wait_indexed(30)
    return res


def _uids(paths: list[Path]) -> set[str]:
    return {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in paths}


def test_dcmtk_storescu_tls_to_node(tls_node: tuple[Config, Spool], pki: dict[str, TLSConfig],
                                    study: list[Path]) -> None:
    cfg, spool = tls_node
    out = _storescu_tls(cfg.node.port, pki["client"], study)
    assert out.returncode == 0, out.stdout + out.stderr
    study_uid = str(pydicom.dcmread(study[0], stop_before_pixels=True).StudyInstanceUID)
    stored = {i.sop_instance_uid for i in spool.instances(study_uid)}
    assert stored == _uids(study)


def test_node_refuses_client_with_wrong_certificate(tls_node: tuple[Config, Spool], pki: dict[str, TLSConfig],
                                                    study: list[Path]) -> None:
    cfg, spool = tls_node
    rogue = pki["rogue"].model_copy(update={"ca_file": pki["client"].ca_file})  # trusts the node, not trusted by it
    out = _storescu_tls(cfg.node.port, rogue, study)
    assert out.returncode != 0
    study_uid = str(pydicom.dcmread(study[0], stop_before_pixels=True).StudyInstanceUID)
    assert spool.instances(study_uid) == []
    # the node keeps serving the right client afterwards
    assert _storescu_tls(cfg.node.port, pki["client"], study).returncode == 0
    assert {i.sop_instance_uid for i in spool.instances(study_uid)} == _uids(study)


def test_scu_sends_over_tls_to_dcmtk_peer(tls_storescp: tuple[int, Path], pki: dict[str, TLSConfig],
                                          study: list[Path]) -> None:
    port, out = tls_storescp
    dest = Destination(ae_title="TLSPEER", host="127.0.0.1", port=port, timeout_s=20, tls=pki["client"])
    assert send_files(study, dest, "BONENODE") == [None, None]
    received = list(out.iterdir())
    assert _uids(received) == _uids(study)


def test_scu_with_wrong_certificate_is_refused_by_peer(tls_storescp: tuple[int, Path], pki: dict[str, TLSConfig],
                                                       study: list[Path]) -> None:
    port, out = tls_storescp
    rogue = pki["rogue"].model_copy(update={"ca_file": pki["client"].ca_file})
    dest = Destination(ae_title="TLSPEER", host="127.0.0.1", port=port, timeout_s=10, tls=rogue)
    with pytest.raises(DeliveryError):
        send_files(study, dest, "BONENODE")
    assert list(out.iterdir()) == []


def test_scu_refuses_peer_not_signed_by_trusted_ca(tls_storescp: tuple[int, Path], pki: dict[str, TLSConfig],
                                                   study: list[Path]) -> None:
    port, out = tls_storescp
    distrustful = pki["client"].model_copy(update={"ca_file": pki["rogue"].ca_file})
    dest = Destination(ae_title="TLSPEER", host="127.0.0.1", port=port, timeout_s=10, tls=distrustful)
    with pytest.raises(DeliveryError):
        send_files(study, dest, "BONENODE")
    assert list(out.iterdir()) == []
