"""One exception hierarchy for the node.

Exceptions are mapped to DIMSE status codes only at the network edge (the SCP
handlers); everything behind that raises these classes.
"""


from inference.errors import BundleError, DicomNodeError, InvalidDatasetError, ModelNotFoundError, TaskError

__all__ = [
    "BundleError", "ConfigError", "DeliveryError", "DicomNodeError", "InvalidDatasetError", "ModelNotFoundError",
    "OutOfResourcesError", "ResultWriteError", "RoutingError", "TaskError",
]


class ConfigError(DicomNodeError):
    """The YAML configuration is invalid or inconsistent."""


class OutOfResourcesError(DicomNodeError):
    """Disk full, free space below the configured minimum, or the spool cannot persist."""



class RoutingError(DicomNodeError):
    """A route or its rules cannot be evaluated."""




class ResultWriteError(DicomNodeError):
    """A result object (SR/SEG/SC) cannot be built from the findings."""


class DeliveryError(DicomNodeError):
    """Sending to a destination failed.

    Parameters
    ----------
    message:
        Human-readable reason.
    transient:
        True when a retry may succeed (connection refused, timeout, 0xA7xx).
    """

    def __init__(self, message: str, *, transient: bool) -> None:
        super().__init__(message)
        self.transient = transient
