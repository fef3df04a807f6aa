"""The node's DICOM implementation identity; the package check is :func:`inference.identity.check_packages`."""

from __future__ import annotations

from inference.identity import DISTRIBUTION_MARK, check_packages

__all__ = ["DISTRIBUTION_MARK", "IMPLEMENTATION_CLASS_UID", "IMPLEMENTATION_VERSION", "check_packages"]

#: DICOM Implementation Class UID of the node's own network code (a 2.25 UUID-derived UID, fixed forever)
IMPLEMENTATION_CLASS_UID = "2.25.141769052427146504992507550177741938864"
#: Implementation Version Name (SH, at most 16 characters)
IMPLEMENTATION_VERSION = "BONENODE_010"
