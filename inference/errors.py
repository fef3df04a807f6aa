"""The project's one exception base class and the errors raised by the model runtime.

The base lives here because ``inference`` must not import ``dicomnode``;
:mod:`dicomnode.errors` re-exports it as ``DicomNodeError`` and adds the node's
own subclasses. ``training`` raises these too.
"""


class DicomNodeError(Exception):
    """Base class of every error raised by this project."""


class InvalidDatasetError(DicomNodeError):
    """A received or loaded dataset cannot be parsed or lacks required attributes."""


class TaskError(DicomNodeError):
    """A task failed on its input (unsupported series, model failure)."""


class ModelNotFoundError(TaskError):
    """No usable model bundle exists for a task."""


class BundleError(DicomNodeError):
    """A model bundle is malformed or incompatible."""
