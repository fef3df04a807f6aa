"""dicomnode.filemeta: the data set's start after the File Meta Information, through public pydicom API."""

from __future__ import annotations

import io
import struct

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset

from dicomnode.errors import InvalidDatasetError
from dicomnode.filemeta import dataset_digest, seek_dataset


@pytest.mark.parametrize("name", ["CT_small.dcm", "image_dfl.dcm"])  # explicit VR LE, deflated
def test_seek_lands_on_the_first_data_set_element(name: str) -> None:
    path = get_testdata_file(name)
    assert path is not None
    data = open(path, "rb").read()  # noqa: SIM115
    fp = io.BytesIO(data)
    seek_dataset(fp)
    offset = fp.tell()
    group_length = pydicom.dcmread(path, stop_before_pixels=True).file_meta.FileMetaInformationGroupLength
    assert offset == 132 + 12 + group_length
    assert struct.unpack("<H", data[offset:offset + 2])[0] != 0x0002  # past the meta group


def _file_bytes(source_ae: str | None = None) -> bytes:
    ds = Dataset()
    ds.SOPInstanceUID = "1.2.3"
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.ensure_file_meta()
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.1"
    ds.file_meta.MediaStorageSOPInstanceUID = "1.2.3"
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    if source_ae is not None:
        ds.file_meta.SourceApplicationEntityTitle = source_ae
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def test_same_data_set_under_another_meta_has_the_same_digest() -> None:
    data = _file_bytes()
    meta_changed = _file_bytes(source_ae="OTHER_NODE")
    assert len(meta_changed) > len(data)
    assert dataset_digest(data) == dataset_digest(meta_changed) != b""
    assert dataset_digest(data) != dataset_digest(data[:-2] + b"4\x00")  # the data set differs


def test_wrong_group_length_or_no_preamble_is_an_invalid_dataset() -> None:
    data = bytearray(_file_bytes())
    assert data[132:136] == b"\x02\x00\x00\x00"  # (0002,0000) first
    right = struct.unpack_from("<I", data, 140)[0]
    for wrong in (right - 10, right + 4):
        struct.pack_into("<I", data, 140, wrong)
        with pytest.raises(InvalidDatasetError, match="group length"):
            seek_dataset(io.BytesIO(bytes(data)))
    with pytest.raises(InvalidDatasetError, match="File Meta Information"):
        seek_dataset(io.BytesIO(_file_bytes()[132:]))
