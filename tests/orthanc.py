"""A real Orthanc PACS for tests: the project's local-Orthanc launcher (:mod:`dicomnode.devpacs`).

Kept as a module so tests import ``tests.orthanc`` as before; the implementation is shared with the demo.
"""

from dicomnode.devpacs import ORTHANC_BIN, OrthancError, OrthancServer, free_port

__all__ = ["ORTHANC_BIN", "OrthancError", "OrthancServer", "free_port"]
