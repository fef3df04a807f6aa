"""Start-up check that ``inference``/``training`` resolve to this distribution.

Another PyPI project is also called ``inference``; if it shadows ours the CLIs
stop with a clear message instead of failing later with an obscure import error.
Both CLIs (``dicomnode`` and ``dicomnode-train``) call it, so it lives here, where both may import it.
"""

from __future__ import annotations

import importlib
import sys

__all__ = ["DISTRIBUTION_MARK", "check_packages"]

DISTRIBUTION_MARK = "bone-dicomnode"


def check_packages(*names: str) -> None:
    """Exit with a clear message if a package is not the one from this distribution."""
    for name in names:
        try:
            mod = importlib.import_module(name)
        except ImportError as exc:  # pragma: no cover - broken install
            sys.exit(f"error: package {name!r} cannot be imported ({exc}); reinstall bone-dicomnode")
        mark = getattr(mod, "DISTRIBUTION", None)
        if mark != DISTRIBUTION_MARK:
            where = getattr(mod, "__file__", "?")
            sys.exit(
                f"error: the package {name!r} at {where} is not part of bone-dicomnode "
                f"(another distribution with that name is installed?). Uninstall it or use a clean venv."
            )
