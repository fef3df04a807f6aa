"""The training package's error type."""

from __future__ import annotations

from inference.errors import DicomNodeError

__all__ = ["TrainError"]


class TrainError(DicomNodeError):
    """Training cannot start or continue (bad config, empty split, corrupt checkpoint)."""
