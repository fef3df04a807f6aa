"""The de-identified training archive's on-disk format, shared by its writer and its readers.

The node writes the archive (:mod:`dicomnode.archive`); nightly retraining reads it
(:mod:`training.nightly.intake`) without importing the node. Both take the layout from here::

    <archive_dir>/studies/<study>/<series>/<sop>.dcm    pseudonymised files
    <archive_dir>/studies/<study>/<series>/series.json  {"format": 1, "study_uid", "series_uid",
        "patient_id", "task", "route", "modality", "archived_at" (UNIX s), "bytes", "files": [names]}
    <key_dir>/secret.key        32 random bytes (hex), mode 0600
    <key_dir>/uid_map.jsonl     mode 0600; one JSON object per line:
        {"kind": "StudyInstanceUID"|"SeriesInstanceUID"|"SOPInstanceUID"|"PatientID",
         "original": "...", "pseudo": "..."}
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["FORMAT", "KEY_FILE", "MAPPED_KINDS", "SIDECAR", "STUDIES", "UID_MAP", "read_uid_map", "sidecars"]

FORMAT = 1
STUDIES = "studies"
SIDECAR = "series.json"
KEY_FILE = "secret.key"
UID_MAP = "uid_map.jsonl"
MAPPED_KINDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")


def read_uid_map(key_dir: str | os.PathLike[str]) -> dict[tuple[str, str], str]:
    """(kind, original) -> pseudonym from the mapping file (empty if none yet; torn lines skipped)."""
    path = Path(key_dir) / UID_MAP
    out: dict[tuple[str, str], str] = {}
    if not path.exists():
        return out
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            obj = json.loads(line)
            out[(str(obj["kind"]), str(obj["original"]))] = str(obj["pseudo"])
        except (ValueError, KeyError, TypeError):
            continue  # a torn last line after a crash of the writer; the entry is written again on next use
    return out


def sidecars(archive_dir: str | os.PathLike[str]) -> Iterator[tuple[Path, dict[str, Any]]]:
    """(series folder, parsed ``series.json``) of every readable sidecar, in path order."""
    for side in sorted(Path(archive_dir).glob(f"{STUDIES}/*/*/{SIDECAR}")):
        try:
            obj = json.loads(side.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(obj, dict):
            yield side.parent, obj
