"""Structural check of an encoded data set without decoding it: every element and item must be complete.

Walks tags and lengths only (explicit or implicit VR, either byte order, undefined-length
sequences and encapsulated pixel data; deflated data sets are inflated as a stream), so a
truncated or garbled upload is refused before the node acknowledges it. Used by the spool
and, with ``capture``, by the native receiver to read the identifying UIDs on the way.
"""

from __future__ import annotations

import os
import struct
import zlib
from typing import BinaryIO

from pydicom.uid import UID, DeflatedExplicitVRLittleEndian, ImplicitVRLittleEndian

from dicomnode.errors import InvalidDatasetError

__all__ = ["check_complete"]

_COPY_CHUNK = 1 << 20

_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"UC", b"UN", b"UR", b"UT", b"SV", b"UV"}
_UNDEFINED = 0xFFFFFFFF
_ITEM, _ITEM_END, _SEQ_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD


class _Truncated(Exception):
    pass


def _scan_elements(fp: BinaryIO, end: int, implicit: bool, little: bool, stop_tag: int | None,
                   capture: dict[int, bytes] | None = None) -> None:
    """Walk data elements (tags and lengths only) up to ``end`` or ``stop_tag``; raise _Truncated if short.

    ``capture`` (top level only) maps tags to fill with their raw values when present.
    """
    order = "<" if little else ">"
    while True:
        head = fp.read(8)
        if not head and stop_tag is None:
            return
        if len(head) < 8:
            raise _Truncated("data element header cut off")
        group, elem = struct.unpack(order + "HH", head[:4])
        tag = (group << 16) | elem
        if tag in (_ITEM_END, _SEQ_END) or group == 0xFFFE:
            length = struct.unpack(order + "L", head[4:])[0]
            if tag == stop_tag:
                return
            raise _Truncated(f"unexpected delimiter ({group:04X},{elem:04X})")
        if implicit:
            vr, length = b"", struct.unpack(order + "L", head[4:])[0]
        else:
            vr = head[4:6]
            if vr in _LONG_VRS:
                more = fp.read(4)
                if len(more) < 4:
                    raise _Truncated("data element length cut off")
                length = struct.unpack(order + "L", more)[0]
            else:
                length = struct.unpack(order + "H", head[6:])[0]
        if length == _UNDEFINED:
            if tag == 0x7FE00010:
                _scan_items(fp, end, implicit=False, little=little, encapsulated=True)
            else:
                # SQ (explicit or implicit) or UN of undefined length: implicit VR little endian inside for UN
                _scan_items(fp, end, implicit=implicit or vr == b"UN", little=little if vr != b"UN" else True,
                            encapsulated=False)
        elif capture is not None and tag in capture:
            value = fp.read(length)
            if len(value) < length:
                raise _Truncated(f"value of ({group:04X},{elem:04X}) runs past the end of the data")
            capture[tag] = value
        else:
            fp.seek(length, os.SEEK_CUR)
            if fp.tell() > end:
                raise _Truncated(f"value of ({group:04X},{elem:04X}) runs past the end of the data")
        if stop_tag is None and fp.tell() == end:
            return


def _scan_items(fp: BinaryIO, end: int, *, implicit: bool, little: bool, encapsulated: bool) -> None:
    order = "<" if little else ">"
    while True:
        head = fp.read(8)
        if len(head) < 8:
            raise _Truncated("sequence cut off before its delimiter")
        group, elem = struct.unpack(order + "HH", head[:4])
        tag = (group << 16) | elem
        length = struct.unpack(order + "L", head[4:])[0]
        if tag == _SEQ_END:
            return
        if tag != _ITEM:
            raise _Truncated(f"unexpected tag ({group:04X},{elem:04X}) in a sequence")
        if length == _UNDEFINED:
            if encapsulated:
                raise _Truncated("encapsulated fragment of undefined length")
            _scan_elements(fp, end, implicit, little, stop_tag=_ITEM_END)
        else:
            fp.seek(length, os.SEEK_CUR)
            if fp.tell() > end:
                raise _Truncated("sequence item runs past the end of the data")


def check_complete(fp: BinaryIO, transfer_syntax: str, capture: dict[int, bytes] | None = None) -> None:
    """Verify the data set after the file meta is structurally complete (not cut off mid-element).

    ``capture``: see :func:`_scan_elements` (not filled for deflated data sets).
    """
    start = fp.tell()
    size = fp.seek(0, os.SEEK_END)
    fp.seek(start)
    try:
        if transfer_syntax == DeflatedExplicitVRLittleEndian:
            inflater = zlib.decompressobj(-zlib.MAX_WBITS)
            while chunk := fp.read(_COPY_CHUNK):
                inflater.decompress(chunk, 0)
                while inflater.unconsumed_tail:
                    inflater.decompress(inflater.unconsumed_tail, 0)
            if not inflater.eof:
                raise _Truncated("deflated data set cut off")
            return
        ts = UID(transfer_syntax) if transfer_syntax else ImplicitVRLittleEndian
        implicit, little = (ts.is_implicit_VR, ts.is_little_endian) if ts.is_transfer_syntax else (False, True)
        if start < size:
            _scan_elements(fp, size, implicit, little, stop_tag=None, capture=capture)
    except (_Truncated, struct.error, zlib.error) as exc:
        raise InvalidDatasetError(f"received data set is truncated or malformed: {exc}") from exc
