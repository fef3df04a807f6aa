"""Nightly retraining: label intake, scheduled fine-tuning and a promotion gate (``dicomnode-train schedule``).

It runs in its own process, so a training crash never takes the receiving node down. It reads the
node's de-identified training archive as plain DICOM folders plus the mapping file documented in
:mod:`dicomnode.archive` (it does not import :mod:`dicomnode`).
"""
