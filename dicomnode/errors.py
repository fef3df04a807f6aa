"""One exception hierarchy for the node.

Exceptions are mapped to DIMSE status codes only at the network edge (the SCP
handlers); everything behind that raises these classes.
"""


class DicomNodeError(Exception):
    """Base class of every error raised by this project."""


class ConfigError(DicomNodeError):
    """The YAML configuration is invalid or inconsistent."""


class OutOfResourcesError(DicomNodeError):
    """Disk full, free space below the configured minimum, or the spool cannot persist."""


class InvalidDatasetError(DicomNodeError):
    """A received or loaded dataset cannot be parsed or lacks required attributes."""


class RoutingError(DicomNodeError):
    """A route or its rules cannot be evaluated."""


class TaskError(DicomNodeError):
    """A task failed on its input (unsupported series, model failure)."""


class ModelNotFoundError(TaskError):
    """No usable model bundle exists for a task."""


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
