"""Bone-imaging DICOM decision-support node: receive, route, infer, send results back."""

__version__ = "0.1.0"
MANUFACTURER = "bone-dicomnode project"
MODEL_NAME = "dicomnode"
