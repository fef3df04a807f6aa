"""Nightly retraining: label intake, scheduled fine-tuning and a promotion gate (``dicomnode-train schedule``).

It runs in its own process, so a training crash never takes the receiving node down. It reads the
node's de-identified training archive as plain DICOM folders plus the mapping file, in the format of
:mod:`inference.archive_format` (it does not import :mod:`dicomnode`; an import-linter contract checks that).
"""
