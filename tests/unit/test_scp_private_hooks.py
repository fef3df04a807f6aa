"""The private pynetdicom hooks dicomnode/scp_pynetdicom.py relies on exist in the pinned pynetdicom (see pyproject.toml)."""

from __future__ import annotations

import inspect
import re
from importlib.metadata import version
from pathlib import Path

from pynetdicom import AE
from pynetdicom.acse import ACSE
from pynetdicom.transport import AssociationServer, RequestHandler

ROOT = Path(__file__).resolve().parents[2]


def test_installed_pynetdicom_is_the_pinned_one() -> None:
    pin = re.search(r'"pynetdicom==([0-9.]+)"', (ROOT / "pyproject.toml").read_text())
    assert pin is not None, "pynetdicom must stay pinned while scp_pynetdicom.py uses its private hooks"
    assert version("pynetdicom") == pin.group(1)


def test_private_hooks_scp_overrides_exist() -> None:
    assert callable(ACSE._negotiate_as_acceptor)
    assert callable(RequestHandler._create_association)
    assert isinstance(AE()._servers, list)
    assert "_servers.remove" in inspect.getsource(AssociationServer.shutdown)  # why serve_ae registers its server
