"""Conformance against dcmtk as the SCU: every ``storescu --propose-*`` option, ``echoscu``, the called AE check.

One node (the native receiver, default configuration apart from the allowed
callers and a small journal) serves the whole module. For every transfer
syntax option of storescu the test reads storescu's own debug dump of the
A-ASSOCIATE-AC: syntaxes the node accepts must be accepted on the first
proposed context and the instance stored byte for byte; syntaxes it does not
accept (MPEG-2, H.264, HEVC) must come back as a presentation context result
"transfer syntaxes not supported", never as an abort, and the node goes on.
"""

from __future__ import annotations

import re
import subprocess
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from pydicom.uid import JPEG2000, JPEG2000Lossless

from dicomnode.scp import ReceiverGroup, start_receivers
from dicomnode.spool import Spool
from tests.integration.test_scp_dcmtk import (
    _GROUPS,
    CALLERS,
    ECHOSCU,
    ENV,
    STORESCU,
    _convert,
    _node_config,
    _pydicom_compress,
    ct_file,
    dataset_bytes,
    stored_path,
)

pytestmark = pytest.mark.integration
AE_TITLE = "BONENODE"  # the node's default AE title


class _Node:
    def __init__(self, group: ReceiverGroup, spool: Spool) -> None:
        self.group, self.spool, self.port = group, spool, group.port


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[_Node]:
    tmp = tmp_path_factory.mktemp("conformance-dcmtk")
    cfg = _node_config(tmp, journal_mb=16, allowed_callers=CALLERS)
    group = start_receivers(cfg)
    _GROUPS[group.port] = group
    try:
        yield _Node(group, Spool(cfg.node.storage_dir, cfg.node.disk_min_free_gb))
    finally:
        group.stop()


def _same(s: Path, d: Path) -> Path:
    d.write_bytes(s.read_bytes())
    return d


Converter = Callable[[Path, Path], Path]

#: storescu option -> (bits stored, converter, transfer syntax the node must accept on the first context)
ACCEPTED: dict[str, tuple[int, Converter, str]] = {
    "--propose-uncompr": (16, _same, "1.2.840.10008.1.2.1"),
    "--propose-little": (16, _same, "1.2.840.10008.1.2.1"),
    "--propose-big": (16, lambda s, d: _convert("dcmconv", ["+tb"], s, d), "1.2.840.10008.1.2.2"),
    "--propose-implicit": (16, lambda s, d: _convert("dcmconv", ["+ti"], s, d), "1.2.840.10008.1.2"),
    "--propose-lossless": (16, lambda s, d: _convert("dcmcjpeg", ["+e1"], s, d), "1.2.840.10008.1.2.4.70"),
    "--propose-jpeg8": (8, lambda s, d: _convert("dcmcjpeg", ["+eb"], s, d), "1.2.840.10008.1.2.4.50"),
    "--propose-jpeg12": (12, lambda s, d: _convert("dcmcjpeg", ["+ee"], s, d), "1.2.840.10008.1.2.4.51"),
    "--propose-j2k-lossless": (16, lambda s, d: _pydicom_compress(s, d, JPEG2000Lossless), "1.2.840.10008.1.2.4.90"),
    "--propose-j2k-lossy": (16, lambda s, d: _pydicom_compress(s, d, JPEG2000), "1.2.840.10008.1.2.4.91"),
    "--propose-jls-lossless": (16, lambda s, d: _convert("dcmcjpls", ["+el"], s, d), "1.2.840.10008.1.2.4.80"),
    "--propose-jls-lossy": (16, lambda s, d: _convert("dcmcjpls", ["+en"], s, d), "1.2.840.10008.1.2.4.81"),
    "--propose-rle": (16, lambda s, d: _convert("dcmcrle", [], s, d), "1.2.840.10008.1.2.5"),
    "--propose-deflated": (16, lambda s, d: _convert("dcmconv", ["+td"], s, d), "1.2.840.10008.1.2.1.99"),
}

#: video transfer syntaxes the node does not accept: storescu proposes them alone
REJECTED = ["--propose-mpeg2", "--propose-mpeg2-high", "--propose-mpeg4", "--propose-mpeg4-bd",
            "--propose-mpeg4-2-2d", "--propose-mpeg4-2-3d", "--propose-mpeg4-2-st", "--propose-hevc",
            "--propose-hevc10"]

_CONTEXT_LINE = re.compile(r"Context ID:\s+(\d+) \(([^)]+)\)")


def _ac_contexts(debug: str) -> list[tuple[int, str, str | None]]:
    """(id, result, accepted syntax name) of each context in storescu's dump of the A-ASSOCIATE-AC."""
    if "BEGIN A-ASSOCIATE-AC" not in debug:
        return []
    section = debug.split("BEGIN A-ASSOCIATE-AC", 1)[1].split("END A-ASSOCIATE-AC", 1)[0]
    out: list[tuple[int, str, str | None]] = []
    for line in section.splitlines():
        if m := _CONTEXT_LINE.search(line):
            out.append((int(m[1]), m[2], None))
        elif "Accepted Transfer Syntax: =" in line and out:
            out[-1] = (out[-1][0], out[-1][1], line.split("=", 1)[1].strip())
    return out


def echo(port: int, *args: str) -> subprocess.CompletedProcess[str]:
    """dcmtk echoscu calling as ECHOSCU, the node's AE title as called AE unless ``args`` give another."""
    called = () if "-aec" in args else ("-aec", AE_TITLE)
    return subprocess.run([ECHOSCU, *called, *args, "127.0.0.1", str(port)], capture_output=True, text=True,
                          env=ENV, timeout=60)


def _storescu_debug(port: int, flag: str, path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([STORESCU, "-d", "-aet", "STORESCU", "-aec", AE_TITLE, "-R", flag, "127.0.0.1", str(port), str(path)],
                          capture_output=True, text=True, env=ENV, timeout=120)


# dcmtk names in its dump for the first transfer syntax each option proposes
_TS_NAMES = {"1.2.840.10008.1.2.1": "LittleEndianExplicit", "1.2.840.10008.1.2.2": "BigEndianExplicit",
             "1.2.840.10008.1.2": "LittleEndianImplicit", "1.2.840.10008.1.2.4.70": "JPEGLossless:Non-hierarchical-1stOrderPrediction",
             "1.2.840.10008.1.2.4.50": "JPEGBaseline", "1.2.840.10008.1.2.4.51": "JPEGExtended:Process2+4",
             "1.2.840.10008.1.2.4.90": "JPEG2000LosslessOnly", "1.2.840.10008.1.2.4.91": "JPEG2000",
             "1.2.840.10008.1.2.4.80": "JPEGLSLossless", "1.2.840.10008.1.2.4.81": "JPEGLSLossy",
             "1.2.840.10008.1.2.5": "RLELossless", "1.2.840.10008.1.2.1.99": "DeflatedLittleEndianExplicit"}


@pytest.mark.parametrize("flag", sorted(ACCEPTED))
def test_storescu_proposal_is_accepted_and_stored_unchanged(node: _Node, tmp_path: Path, flag: str) -> None:
    """The syntax an option proposes first is accepted on the first context; the data set arrives as sent."""
    bits, convert, ts = ACCEPTED[flag]
    src = convert(ct_file(tmp_path / "src.dcm", bits=bits), tmp_path / "sent.dcm")
    assert dataset_bytes(src)[0] == ts
    res = _storescu_debug(node.port, flag, src)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-3000:]
    contexts = _ac_contexts(out)
    assert contexts, out[-3000:]
    first = min(contexts)
    assert first[1] == "Accepted" and first[2] == _TS_NAMES[ts], contexts
    assert node.group.wait_indexed(30)
    got_ts, got = dataset_bytes(stored_path(node.spool, src))
    want_ts, want = dataset_bytes(src)
    assert got_ts == want_ts
    if ts == "1.2.840.10008.1.2.1.99":  # dcmtk re-deflates on the wire; the inflated data set must be identical
        got, want = zlib.decompress(got, -15), zlib.decompress(want, -15)
    assert got == want


@pytest.mark.parametrize("flag", REJECTED)
def test_storescu_unsupported_proposal_is_rejected_per_context(node: _Node, tmp_path: Path, flag: str) -> None:
    """Video syntaxes get "transfer syntaxes not supported" on every context: an A-ASSOCIATE-AC, no abort."""
    src = ct_file(tmp_path / "src.dcm")
    res = _storescu_debug(node.port, flag, src)
    out = res.stdout + res.stderr
    contexts = _ac_contexts(out)
    assert contexts, f"no A-ASSOCIATE-AC: {out[-3000:]}"
    assert {result for _, result, _ in contexts} == {"Transfer Syntaxes Not Supported"}, contexts
    assert "No Acceptable Presentation Contexts" in out  # storescu's own verdict, then it aborts itself
    assert "Abort" not in out.split("No Acceptable Presentation Contexts")[0]
    assert echo(node.port).returncode == 0


def test_echoscu(node: _Node) -> None:
    """C-ECHO with one context and syntax, with all 38 syntaxes dcmtk knows, and with 128 contexts."""
    for opts in ((), ("--propose-ts", "38"), ("--propose-pc", "128"), ("--propose-pc", "128", "--propose-ts", "38")):
        res = echo(node.port, "-d", *opts)
        out = res.stdout + res.stderr
        assert res.returncode == 0, out[-2000:]
        contexts = _ac_contexts(out)
        n = int(opts[opts.index("--propose-pc") + 1]) if "--propose-pc" in opts else 1
        assert len(contexts) == n, contexts
        assert all(r == "Accepted" and ts in ("LittleEndianImplicit", "LittleEndianExplicit")
                   for _, r, ts in contexts), contexts
        assert "Received Echo Response (Success)" in out


def test_wrong_called_ae_title_is_rejected(node: _Node) -> None:
    """A called AE title other than the node's: A-ASSOCIATE-RJ permanent, "called AE title not recognized"."""
    res = echo(node.port, "-aec", "NOTTHENODE")
    assert res.returncode != 0
    assert "Rejected Permanent" in res.stderr and "Called AE Title Not Recognized" in res.stderr, res.stderr
    assert echo(node.port, "-aec", "BONENODE").returncode == 0


def test_called_ae_check_can_be_switched_off(tmp_path: Path) -> None:
    """With the check off (``node.check_called_ae_title: false``) any called AE title is accepted."""
    cfg = _node_config(tmp_path, journal_mb=16, check_called_ae_title=False)
    group = start_receivers(cfg)
    try:
        assert echo(group.port, "-aec", "ANYTHING").returncode == 0
    finally:
        group.stop()
