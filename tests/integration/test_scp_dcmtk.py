"""The SCP against real peers: dcmtk echoscu/storescu (and pynetdicom for corrupt data) on loopback."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filereader import read_file_meta_info
from pydicom.uid import (
    JPEG2000,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    generate_uid,
)
from pynetdicom import AE, _config
from pynetdicom.sop_class import CTImageStorage, Verification  # type: ignore[attr-defined]

from dicomnode.config import Config
from dicomnode.metrics import NodeMetrics
from dicomnode.scp import ReceiverGroup, start_receivers
from dicomnode.spool import Spool
from tests.conftest import free_port

pytestmark = pytest.mark.integration

ECHOSCU, STORESCU = "/usr/bin/echoscu", "/usr/bin/storescu"
ENV = dict(os.environ, TCP_NODELAY="1")
CALLERS = [{"ae_title": t, "host": "127.0.0.1"} for t in ("ECHOSCU", "STORESCU", "PYSCU")]


@dataclass
class Node:
    cfg: Config
    group: ReceiverGroup
    spool: Spool

    @property
    def port(self) -> int:
        return self.group.port


def _node_config(tmp: Path, **node: object) -> Config:
    base: dict[str, object] = {"port": free_port(), "storage_dir": str(tmp / "var"), "disk_min_free_gb": 0,
                               "allowed_callers": CALLERS}
    base.update(node)
    return Config.model_validate({"node": base})


@pytest.fixture
def make_node(tmp_path: Path) -> Iterator:
    groups: list[ReceiverGroup] = []

    def make(**node: object) -> Node:
        cfg = _node_config(tmp_path, **node)
        group = start_receivers(cfg)
        groups.append(group)
        _GROUPS[group.port] = group
        return Node(cfg, group, Spool(cfg.node.storage_dir, cfg.node.disk_min_free_gb))

    yield make
    for g in groups:
        g.stop()


def echo(port: int, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([ECHOSCU, "-aec", "BONENODE", *args, "127.0.0.1", str(port)], capture_output=True, text=True, env=ENV,
                          timeout=60)


_GROUPS: dict[int, ReceiverGroup] = {}


def storescu(port: int, *files: str, opts: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    """Send with dcmtk's storescu; then wait until the node has indexed what it acknowledged."""
    res = subprocess.run([STORESCU, "-aet", "STORESCU", "-aec", "BONENODE", *opts, "127.0.0.1", str(port), *files],
                         capture_output=True, text=True, env=ENV, timeout=120)
    if port in _GROUPS:
        assert _GROUPS[port].wait_indexed(30), "acknowledged instances were not indexed"
    return res


def ct_file(path: Path, *, bits: int = 16, rows: int = 64, study: str | None = None,
            series: str | None = None) -> Path:
    """Write a small CT image with structured (compressible, non-constant) pixels."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID = study or generate_uid()
    ds.SeriesInstanceUID = series or generate_uid()
    ds.Modality = "CT"
    ds.PatientName = "Test^Patient"
    ds.PatientID = "P1"
    ds.Rows = ds.Columns = rows
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 8 if bits == 8 else 16
    ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = 0
    yy, xx = np.mgrid[0:rows, 0:rows]
    img = ((xx * 7 + yy * 3) % (1 << min(bits, 12))).astype(np.uint8 if bits == 8 else np.uint16)
    ds.PixelData = img.tobytes()
    pydicom.dcmwrite(path, ds, enforce_file_format=True)
    return path


def dataset_bytes(path: Path) -> tuple[str, bytes]:
    """Transfer syntax and the encoded data set after the file meta."""
    meta, start = meta_and_end(path)
    return str(meta.TransferSyntaxUID), path.read_bytes()[start:]


def meta_and_end(path: Path) -> tuple[FileMetaDataset, int]:
    """The file meta of a Part 10 file (pydicom's public reader) and the offset where the data set starts."""
    meta = read_file_meta_info(path)
    # preamble + "DICM" (132 bytes), the (0002,0000) UL element (12 bytes), then the group it counts
    assert "FileMetaInformationGroupLength" in meta, f"{path}: no file meta group length"
    return meta, 132 + 12 + int(meta.FileMetaInformationGroupLength)


def stored_path(spool: Spool, src: Path, timeout_s: float = 15.0) -> Path:
    """Where the spool keeps ``src`` (waits for the journal to index an acknowledged instance)."""
    ds = pydicom.dcmread(src, stop_before_pixels=True)
    deadline = time.monotonic() + timeout_s
    while True:
        found = [i for i in spool.instances(str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID))
                 if i.sop_instance_uid == ds.SOPInstanceUID]
        if found or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    (inst,) = found
    return inst.path


def test_echo_and_rejections(make_node) -> None:
    node = make_node(allowed_callers=CALLERS + [{"ae_title": "FARAWAY", "host": "10.9.9.9"}])
    assert echo(node.port).returncode == 0
    wrong = echo(node.port, "-aet", "WRONG")
    assert wrong.returncode != 0
    assert "Rejected Permanent" in wrong.stderr and "Calling AE Title Not Recognized" in wrong.stderr
    wrong_host = echo(node.port, "-aet", "FARAWAY")  # right AE title, wrong IP
    assert wrong_host.returncode != 0 and "Calling AE Title Not Recognized" in wrong_host.stderr
    assert echo(node.port).returncode == 0


def test_empty_allowed_callers_rejects_all(make_node) -> None:
    node = make_node(allowed_callers=[])
    assert "Rejected Permanent" in echo(node.port).stderr


def test_low_disk_refuses_associations(make_node) -> None:
    node = make_node(disk_min_free_gb=1e9)
    res = echo(node.port)
    assert res.returncode != 0 and "Rejected Transient" in res.stderr


def test_store_uncompressed_and_duplicate(make_node, tmp_path: Path) -> None:
    node = make_node()
    study, series = generate_uid(), generate_uid()
    files = [ct_file(tmp_path / f"ct{i}.dcm", study=study, series=series) for i in range(3)]
    res = storescu(node.port, *map(str, files))
    assert res.returncode == 0, res.stderr
    for f in files:
        assert dataset_bytes(stored_path(node.spool, f)) == dataset_bytes(f)
    again = storescu(node.port, str(files[0]))
    assert again.returncode == 0, again.stderr
    assert len(node.spool.instances(study)) == 3
    wait_for(lambda: node.spool._conn.execute(
        "SELECT COUNT(*) FROM associations WHERE released_at IS NOT NULL").fetchone()[0] == 2)
    assert node.spool.last_association_release(study) is not None
    (rec,) = node.spool.series_records(study)
    assert rec.expected_count == 3  # learnt from the released association


def wait_for(cond: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


def _convert(tool: str, flags: list[str], src: Path, dst: Path) -> Path:
    subprocess.run([f"/usr/bin/{tool}", *flags, str(src), str(dst)], check=True, capture_output=True, timeout=60)
    return dst


def _pydicom_compress(src: Path, dst: Path, ts: str) -> Path:
    ds = pydicom.dcmread(src)
    kwargs = {"j2k_cr": [5]} if ts == JPEG2000 else {}
    ds.compress(ts, **kwargs)
    pydicom.dcmwrite(dst, ds, enforce_file_format=True)
    return dst


CASES = [
    # (name, bits, converter, expected transfer syntax, storescu proposal flag; None: send with pynetdicom)
    ("implicit", 16, lambda s, d: _convert("dcmconv", ["+ti"], s, d), "1.2.840.10008.1.2", "-xi"),
    ("big-endian", 16, lambda s, d: _convert("dcmconv", ["+tb"], s, d), "1.2.840.10008.1.2.2", "-xb"),
    ("deflate", 16, lambda s, d: _convert("dcmconv", ["+td"], s, d), "1.2.840.10008.1.2.1.99", "-xd"),
    ("jpeg-baseline", 8, lambda s, d: _convert("dcmcjpeg", ["+eb"], s, d), "1.2.840.10008.1.2.4.50", "-xy"),
    ("jpeg-extended", 12, lambda s, d: _convert("dcmcjpeg", ["+ee"], s, d), "1.2.840.10008.1.2.4.51", "-xx"),
    ("jpeg-lossless", 16, lambda s, d: _convert("dcmcjpeg", ["+el"], s, d), "1.2.840.10008.1.2.4.57", None),
    ("jpeg-lossless-sv1", 16, lambda s, d: _convert("dcmcjpeg", ["+e1"], s, d), "1.2.840.10008.1.2.4.70", "-xs"),
    ("jpeg-ls-lossless", 16, lambda s, d: _convert("dcmcjpls", ["+el"], s, d), "1.2.840.10008.1.2.4.80", "-xt"),
    ("jpeg-ls-near", 16, lambda s, d: _convert("dcmcjpls", ["+en"], s, d), "1.2.840.10008.1.2.4.81", "-xu"),
    ("j2k-lossless", 16, lambda s, d: _pydicom_compress(s, d, JPEG2000Lossless), "1.2.840.10008.1.2.4.90", "-xv"),
    ("j2k-lossy", 16, lambda s, d: _pydicom_compress(s, d, JPEG2000), "1.2.840.10008.1.2.4.91", "-xw"),
    ("rle", 16, lambda s, d: _convert("dcmcrle", [], s, d), "1.2.840.10008.1.2.5", "-xr"),
]


def test_store_transfer_syntaxes_without_reencoding(make_node, tmp_path: Path) -> None:
    node = make_node()
    sent: dict[str, Path] = {}
    for name, bits, convert, ts, flag in CASES:
        src = ct_file(tmp_path / f"{name}-src.dcm", bits=bits)
        dst = convert(src, tmp_path / f"{name}.dcm")
        assert dataset_bytes(dst)[0] == ts, name
        sent[name] = dst
        if flag is None:  # storescu has no proposal option for this syntax
            assert _send_raw(node.port, dst, ts) == 0, name
        else:
            res = storescu(node.port, str(dst), opts=("-R", flag))
            assert res.returncode == 0, f"{name}: {res.stderr}"
    for name, path in sent.items():
        got = stored_path(node.spool, path)
        got_ts, got_bytes = dataset_bytes(got)
        want_ts, want_bytes = dataset_bytes(path)
        assert got_ts == want_ts, name
        if name == "deflate":  # dcmtk re-deflates on the wire; the inflated data set must be identical
            import zlib

            assert zlib.decompress(got_bytes, -15) == zlib.decompress(want_bytes, -15)
        else:
            assert got_bytes == want_bytes, name


def _send_raw(port: int, path: Path, ts: str = ExplicitVRLittleEndian) -> int:
    """Send a file's bytes as they are (chunked send: no decode), return the C-STORE status."""
    ae = AE(ae_title="PYSCU")
    ae.add_requested_context(CTImageStorage, ts)
    ae.add_requested_context(Verification)
    old = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        assoc = ae.associate("127.0.0.1", port, ae_title="BONENODE")
        assert assoc.is_established
        status = assoc.send_c_store(path)
        assoc.release()
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = old
    return int(status.Status)


def _corrupt(src: Path, dst: Path, how: str) -> Path:
    raw = src.read_bytes()
    _, start = meta_and_end(src)
    body = raw[:start] + (b"\x08\x00\x18\x00UI\xff\x7f" + os.urandom(300) if how == "garbage" else
                          raw[start:-3000])
    dst.write_bytes(body)
    return dst


@pytest.mark.parametrize("how", ["garbage", "truncated"])
def test_corrupt_data_fails_and_node_keeps_running(make_node, tmp_path: Path, how: str) -> None:
    node = make_node()
    src = ct_file(tmp_path / "good.dcm", rows=128)
    bad = _corrupt(src, tmp_path / "bad.dcm", how)
    assert _send_raw(node.port, bad) == 0xC210
    assert node.spool.series_records() == []
    assert echo(node.port).returncode == 0
    assert storescu(node.port, str(src)).returncode == 0
    assert stored_path(node.spool, src).exists()


def test_truncated_file_via_storescu_is_not_stored(make_node, tmp_path: Path) -> None:
    node = make_node()
    src = ct_file(tmp_path / "good.dcm", rows=128)
    bad = _corrupt(src, tmp_path / "bad.dcm", "truncated")
    storescu(node.port, str(bad), opts=("-nh",))  # dcmtk may refuse to read it or send it; either way nothing is stored
    assert node.spool.series_records() == []
    assert echo(node.port).returncode == 0


def test_out_of_resources_during_association(make_node, tmp_path: Path) -> None:
    node = make_node()
    ae = AE(ae_title="PYSCU")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="BONENODE")
    assert assoc.is_established
    spool = node.group.spool
    assert spool is not None
    spool.disk_min_free_gb = 1e9  # the disk "fills up" after the association was accepted
    try:
        status = assoc.send_c_store(pydicom.dcmread(ct_file(tmp_path / "a.dcm")))
        assert int(status.Status) == 0xA700
    finally:
        spool.disk_min_free_gb = 0
        assoc.release()
    assert node.spool.series_records() == []


def test_max_associations(make_node) -> None:
    node = make_node(max_associations=2)
    ae = AE(ae_title="PYSCU")
    ae.add_requested_context(Verification)
    held = [ae.associate("127.0.0.1", node.port, ae_title="BONENODE") for _ in range(2)]
    assert all(a.is_established for a in held)
    res = echo(node.port)
    assert res.returncode != 0 and "Rejected Transient" in res.stderr and "Local Limit Exceeded" in res.stderr
    held[0].release()
    wait_for(lambda: echo(node.port).returncode == 0)
    held[1].release()


def test_stop_event_stops_the_in_process_server(tmp_path: Path) -> None:
    import threading

    stop = threading.Event()
    group = start_receivers(_node_config(tmp_path), stop)
    try:
        assert echo(group.port).returncode == 0
        stop.set()
        wait_for(lambda: not group.is_alive())
        wait_for(lambda: echo(group.port).returncode != 0)
    finally:
        group.stop()


def test_receive_processes_share_the_port_and_the_limit(make_node, tmp_path: Path) -> None:
    node = make_node(receive_processes=2, max_associations=2)
    assert len(node.group.pids) == 2 and node.group.is_alive()
    ae = AE(ae_title="PYSCU")
    ae.add_requested_context(Verification)
    held = [ae.associate("127.0.0.1", node.port, ae_title="BONENODE") for _ in range(2)]
    assert all(a.is_established for a in held)
    res = echo(node.port)  # whichever process gets it, the limit is shared
    assert res.returncode != 0 and "Local Limit Exceeded" in res.stderr
    for a in held:
        a.release()
    wait_for(lambda: echo(node.port).returncode == 0)
    study = generate_uid()
    files = [ct_file(tmp_path / f"m{i}.dcm", study=study) for i in range(8)]
    for pair in (files[i:i + 2] for i in range(0, 8, 2)):
        procs = [subprocess.Popen([STORESCU, "-aet", "STORESCU", "-aec", "BONENODE", "127.0.0.1", str(node.port), str(f)], env=ENV,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for f in pair]
        assert [p.wait(timeout=120) for p in procs] == [0, 0]
        wait_for(lambda: node.spool._conn.execute(  # noqa: B023 - evaluated inside the loop
            "SELECT COUNT(*) FROM associations WHERE released_at IS NULL AND aborted=0").fetchone()[0] == 0)
    assert len(node.spool.instances(study)) == 8
    for f in files:
        assert dataset_bytes(stored_path(node.spool, f)) == dataset_bytes(f)
    # the receiver processes' instance counters reach the parent's /metrics
    assert node.group.receive_counts.snapshot()[("received", "stored")] == 8
    parent = NodeMetrics()
    parent.export_shared(node.group.receive_counts)
    text = parent.exposition().decode()
    assert 'dicomnode_instances_received_total{outcome="stored"} 8.0' in text
    node.group.stop()
    assert not node.group.is_alive()
    assert echo(node.port).returncode != 0


def test_memory_is_bounded_for_large_instances(make_node, tmp_path: Path) -> None:
    """A 32 MiB instance is streamed to disk: Python allocations while receiving stay far below its size."""
    import tracemalloc

    node = make_node()
    src = ct_file(tmp_path / "big.dcm", rows=4096)  # 4096*4096*2 = 32 MiB of pixel data
    tracemalloc.start()
    try:
        res = storescu(node.port, str(src))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert res.returncode == 0, res.stderr
    assert peak < 8 * 1024**2, f"peak traced allocation {peak / 1024**2:.1f} MiB"
    got = stored_path(node.spool, src)
    assert dataset_bytes(got) == dataset_bytes(src)
    assert list(node.spool.tmp_dir.iterdir()) == []


def test_tls_echo_and_store(make_node, tmp_path: Path) -> None:
    """DICOM TLS: the SCP wraps accepted sockets; a TLS client stores, a plain-TCP client gets nothing."""
    import ssl

    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["/usr/bin/openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key),
                    "-out", str(cert), "-days", "1", "-subj", "/CN=127.0.0.1"], check=True, capture_output=True,
                   timeout=60)
    node = make_node(tls={"cert_file": str(cert), "key_file": str(key)})
    client = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(cert))
    client.check_hostname = False
    ae = AE(ae_title="PYSCU")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="BONENODE", tls_args=(client, None))
    assert assoc.is_established
    src = ct_file(tmp_path / "tls.dcm")
    assert int(assoc.send_c_store(pydicom.dcmread(src)).Status) == 0
    assoc.release()
    assert stored_path(node.spool, src).exists()
    assert echo(node.port).returncode != 0  # plain DICOM on a TLS port fails
    again = ae.associate("127.0.0.1", node.port, ae_title="BONENODE", tls_args=(client, None))  # and the node keeps serving
    assert again.is_established
    again.release()


def test_release_calls_on_release_after_the_release_is_recorded(tmp_path: Path) -> None:
    """In-process receivers tell the caller (the node wires the assembler's wake) when a sender releases."""
    cfg = _node_config(tmp_path)
    spool = Spool(cfg.node.storage_dir, cfg.node.disk_min_free_gb)
    study = generate_uid()
    released: list[float | None] = []

    def on_release() -> None:  # the association's release is already in the index when this runs
        released.append(spool.last_association_release(study))

    group = start_receivers(cfg, on_release=on_release)
    try:
        f = ct_file(tmp_path / "a.dcm", study=study)
        assert storescu(group.port, str(f)).returncode == 0
        deadline = time.monotonic() + 10
        while not released and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(released) == 1 and released[0] is not None
    finally:
        group.stop()
