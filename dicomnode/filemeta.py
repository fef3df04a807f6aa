"""Where a DICOM File Format stream's data set starts, and a digest of it; public pydicom API only."""

from __future__ import annotations

import hashlib
import io
import logging
import os
from typing import BinaryIO

from pydicom.filereader import read_partial
from pydicom.filewriter import write_file_meta_info

from dicomnode.errors import InvalidDatasetError

log = logging.getLogger(__name__)

__all__ = ["dataset_digest", "seek_dataset"]

_COPY_CHUNK = 1 << 20
_PREAMBLE_LEN = 128 + 4  # preamble and "DICM" (PS3.10 7.1)
_GROUP_LENGTH_ELEMENT_LEN = 12  # (0002,0000) UL, explicit VR little endian


def _stop_at_first_element(tag: object, vr: object, length: object) -> bool:
    return True


def seek_dataset(fp: BinaryIO) -> None:
    """Move ``fp`` (a DICOM File Format stream) to the first byte of the data set after the File Meta Information.

    Public pydicom API only: :func:`pydicom.filereader.read_partial` reads the preamble and the file meta,
    and the Type 1 File Meta Information Group Length (PS3.10 7.1) gives the end of the meta group.

    Raises
    ------
    InvalidDatasetError
        The stream has no preamble, no group length, or a group length that disagrees with the meta.
    """
    fp.seek(0)
    try:
        meta = read_partial(fp, stop_when=_stop_at_first_element).file_meta
    except Exception as exc:  # noqa: BLE001 - anything pydicom raises means "cannot parse"
        raise InvalidDatasetError(f"cannot read the File Meta Information: {type(exc).__name__}: {exc}") from exc
    length = meta.get("FileMetaInformationGroupLength")
    if not isinstance(length, int):
        raise InvalidDatasetError("File Meta Information lacks its group length (0002,0000)")
    encoded = io.BytesIO()
    write_file_meta_info(encoded, meta, enforce_standard=False)  # re-encodes the meta elements as read
    if len(encoded.getvalue()) != _GROUP_LENGTH_ELEMENT_LEN + length:
        raise InvalidDatasetError("File Meta Information group length (0002,0000) disagrees with its elements")
    fp.seek(_PREAMBLE_LEN + _GROUP_LENGTH_ELEMENT_LEN + length)


def dataset_digest(source: bytes | bytearray | memoryview | str | os.PathLike[str]) -> bytes:
    """SHA-256 of the data set after the File Meta Information (what the sender sent, not our meta header)."""
    h = hashlib.sha256()
    fp: BinaryIO = io.BytesIO(source) if isinstance(source, bytes | bytearray | memoryview) else open(source, "rb")  # noqa: SIM115
    try:
        seek_dataset(fp)
        while chunk := fp.read(_COPY_CHUNK):
            h.update(chunk)
    except Exception as exc:  # noqa: BLE001 - an unreadable stored copy differs from anything new
        log.warning("cannot read an instance to compare a re-send: %s", type(exc).__name__)
        return b""
    finally:
        fp.close()
    return h.digest()
