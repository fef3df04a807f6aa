"""Shared test fixtures: pydicom strict mode, dciodvfy validation, free ports."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pydicom
import pytest

DCIODVFY = shutil.which("dciodvfy") or "/usr/bin/dciodvfy"


@pytest.fixture(autouse=True, scope="session")
def _pydicom_strict() -> None:
    """Read and write everything in strict mode, as highdicom's tests do."""
    pydicom.config.settings.reading_validation_mode = pydicom.config.RAISE
    pydicom.config.settings.writing_validation_mode = pydicom.config.RAISE


from dicomnode.devpacs import free_port  # noqa: E402,F401  (re-exported for the tests)


def run_dciodvfy(path: Path) -> tuple[list[str], str]:
    """Run dciodvfy on ``path``; return (error lines, full output)."""
    if not Path(DCIODVFY).exists():
        raise RuntimeError("dciodvfy (Debian package dicom3tools) is not installed")
    proc = subprocess.run([DCIODVFY, "-new", str(path)], capture_output=True, text=True, timeout=120)
    out = proc.stdout + proc.stderr
    errors = [line for line in out.splitlines() if line.startswith("Error") or "Error -" in line]
    return errors, out


@pytest.fixture
def dciodvfy() -> Callable[[Path], None]:
    """Fixture that validates a DICOM file and fails the test on any 'Error' line."""

    def check(path: Path) -> None:
        errors, out = run_dciodvfy(Path(path))
        if errors:
            pytest.fail(f"dciodvfy reported errors for {path}:\n{out}")

    return check
