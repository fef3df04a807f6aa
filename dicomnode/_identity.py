"""Start-up check that ``inference``/``training`` resolve to this distribution.

Another PyPI project is also called ``inference``; if it shadows ours the CLIs
stop with a clear message instead of failing later with an obscure import error.
"""

from __future__ import annotations

import importlib
import sys

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


#: DICOM Implementation Class UID of the node's own network code (a 2.25 UUID-derived UID, fixed forever)
IMPLEMENTATION_CLASS_UID = "2.25.141769052427146504992507550177741938864"
#: Implementation Version Name (SH, at most 16 characters)
IMPLEMENTATION_VERSION = "BONENODE_010"
