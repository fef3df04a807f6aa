"""Integration fixtures: a real Orthanc started per test on free loopback ports.

Use ``orthanc_factory(modalities={"node": ("BONENODE", "127.0.0.1", port)})``
to register the node under test, or the ``orthanc`` fixture (no modalities, or
parametrize it indirectly with such a dict). Tests are skipped only when the
Orthanc binary is missing; CI installs it. On failure the Orthanc log is
printed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.orthanc import ORTHANC_BIN, OrthancServer

Modalities = dict[str, tuple[str, str, int]]


def _require_orthanc() -> None:
    if not Path(ORTHANC_BIN).exists():
        pytest.skip(f"Orthanc binary not found at {ORTHANC_BIN} (install the Debian package 'orthanc')")


@pytest.fixture
def orthanc_factory(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Callable[..., OrthancServer]]:
    """Factory ``(modalities=None, aet="ORTHANC", start=True) -> OrthancServer``; all are stopped at teardown."""
    _require_orthanc()
    servers: list[OrthancServer] = []

    def make(modalities: Modalities | None = None, aet: str = "ORTHANC", start: bool = True) -> OrthancServer:
        srv = OrthancServer(tmp_path / f"orthanc{len(servers)}", modalities, aet=aet)
        servers.append(srv)
        if start:
            srv.start()
        return srv

    yield make
    failed = getattr(request.node, "rep_call", None)
    for srv in servers:
        srv.stop()
        if failed is not None and failed.failed:
            print(f"\n----- Orthanc log {srv.log_path} -----\n{srv.log_tail()}")


@pytest.fixture
def orthanc(orthanc_factory: Callable[..., OrthancServer], request: pytest.FixtureRequest) -> OrthancServer:
    """A started Orthanc; ``request.param`` (indirect parametrization) may give its modalities."""
    modalities: Modalities | None = getattr(request, "param", None)
    return orthanc_factory(modalities=modalities)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """Remember each phase's report on the item so fixtures can tell whether the test failed."""
    outcome = yield
    rep = outcome.get_result()
    setattr(item, f"rep_{rep.when}", rep)
