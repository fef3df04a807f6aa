"""The upper-layer codec of the native SCP, checked against pynetdicom's and pydicom's encoders."""

from __future__ import annotations

import io
import struct

import pydicom
import pytest
from pydicom.filereader import read_dataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEG2000Lossless
from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    AsynchronousOperationsWindowNegotiation,
    ImplementationClassUIDNotification,
    ImplementationVersionNameNotification,
    MaximumLengthNotification,
)
from pynetdicom.presentation import PresentationContext as PynetContext
from pynetdicom.transport import AddressInformation

from dicomnode import ul
from dicomnode.native_scp import supported_contexts
from dicomnode.scp_policy import TRANSFER_SYNTAXES


def _rq_bytes(*, async_ops: bool = False) -> bytes:
    prim = A_ASSOCIATE()
    prim.application_context_name = ul.APPLICATION_CONTEXT
    prim.calling_ae_title = "STORESCU"
    prim.called_ae_title = "BONENODE"
    prim.calling_presentation_address = AddressInformation("127.0.0.1", 0)
    prim.called_presentation_address = AddressInformation("127.0.0.1", 104)
    contexts = []
    for cid, (abstract, syntaxes) in enumerate([(CTImageStorage, [ImplicitVRLittleEndian, JPEG2000Lossless]),
                                                ("1.2.3.4.5.6", [ExplicitVRLittleEndian]),
                                                (CTImageStorage, ["1.2.3.999"])]):
        cx = PynetContext()
        cx.context_id = 2 * cid + 1
        cx.abstract_syntax = abstract
        cx.transfer_syntax = syntaxes
        contexts.append(cx)
    prim.presentation_context_definition_list = contexts
    items = []
    ml = MaximumLengthNotification()
    ml.maximum_length_received = 32768
    items.append(ml)
    ic = ImplementationClassUIDNotification()
    ic.implementation_class_uid = "1.2.826.0.1.3680043.9.3811.2"
    items.append(ic)
    iv = ImplementationVersionNameNotification()
    iv.implementation_version_name = "PEER_1"
    items.append(iv)
    if async_ops:
        aw = AsynchronousOperationsWindowNegotiation()
        aw.maximum_number_operations_invoked = 5
        aw.maximum_number_operations_performed = 5
        items.append(aw)
    prim.user_information = items
    pdu = A_ASSOCIATE_RQ()
    pdu.from_primitive(prim)
    return bytes(pdu.encode())


def test_associate_rq_decodes_and_negotiates_our_preferred_syntax() -> None:
    raw = _rq_bytes(async_ops=True)
    assert raw[0] == ul.ASSOCIATE_RQ and struct.unpack(">I", raw[2:6])[0] == len(raw) - 6
    rq = ul.decode_associate_rq(raw[6:])
    assert (rq.calling_ae, rq.called_ae, rq.max_pdu) == ("STORESCU", "BONENODE", 32768)
    assert rq.implementation_class_uid == "1.2.826.0.1.3680043.9.3811.2" and rq.async_ops == (5, 5)
    results = ul.negotiate(rq, supported_contexts(TRANSFER_SYNTAXES))
    got = [(cx.context_id, result, ts) for cx, result, ts in results]
    # CT: JPEG 2000 lossless comes before implicit VR in our preference; unknown SOP class; unknown syntax
    assert got == [(1, ul.ACCEPTANCE, JPEG2000Lossless), (3, ul.ABSTRACT_SYNTAX_NOT_SUPPORTED, None),
                   (5, ul.TRANSFER_SYNTAXES_NOT_SUPPORTED, None)]

    ac = ul.associate_ac(rq, results, max_pdu=65536, implementation_class_uid="2.25.1", implementation_version="X")
    decoded = A_ASSOCIATE_AC()
    decoded.decode(ac)
    prim = decoded.to_primitive()
    assert prim.result == 0 and prim.maximum_length_received == 65536
    cxs = {c.context_id: c for c in prim.presentation_context_definition_results_list}
    assert cxs[1].result == 0 and cxs[1].transfer_syntax[0] == JPEG2000Lossless
    assert cxs[3].result == ul.ABSTRACT_SYNTAX_NOT_SUPPORTED and cxs[5].result == ul.TRANSFER_SYNTAXES_NOT_SUPPORTED
    assert prim.implementation_class_uid == "2.25.1"


def test_malformed_pdus_raise_protocol_errors() -> None:
    raw = _rq_bytes()
    with pytest.raises(ul.ProtocolError):
        ul.decode_associate_rq(raw[6:40])  # shorter than the fixed fields
    body = bytearray(raw[6:])
    struct.pack_into(">H", body, 70, 0xFFFF)  # application context item claims to run past the PDU
    with pytest.raises(ul.ProtocolError):
        ul.decode_associate_rq(bytes(body))
    with pytest.raises(ul.ProtocolError):
        list(ul.iter_pdvs(memoryview(struct.pack(">IBB", 100, 1, 3) + b"x")))
    with pytest.raises(ul.ProtocolError):
        ul.decode_command(b"\x00\x00\x00\x01\x04\x00")


def test_pdv_fragmentation_respects_the_peer_maximum() -> None:
    data = bytes(range(256)) * 40
    pdus = ul.p_data_pdus(3, data, command=False, max_pdu=1000)
    assert all(len(p) - 6 <= 1000 for p in pdus)
    frags = []
    for i, p in enumerate(pdus):
        ((cid, mch, frag),) = list(ul.iter_pdvs(memoryview(p[6:])))
        assert cid == 3 and mch & 1 == 0 and bool(mch & 2) == (i == len(pdus) - 1)
        frags.append(bytes(frag))
    assert b"".join(frags) == data


def test_command_sets_round_trip_and_parse_as_dicom() -> None:
    rsp = ul.Command(command_field=ul.C_STORE_RSP, responded_to=7, sop_class_uid=CTImageStorage,
                     sop_instance_uid="1.2.3.45", status=0xA700, error_comment="disk full")
    raw = ul.encode_command(rsp)
    ds = read_dataset(io.BytesIO(raw), is_implicit_VR=True, is_little_endian=True)
    assert ds.CommandGroupLength == len(raw) - 12
    assert (ds.CommandField, ds.MessageIDBeingRespondedTo, ds.Status) == (0x8001, 7, 0xA700)
    assert ds.AffectedSOPInstanceUID == "1.2.3.45" and ds.CommandDataSetType == 0x0101
    back = ul.decode_command(raw)
    assert (back.command_field, back.responded_to, back.status, back.sop_class_uid) == (
        0x8001, 7, 0xA700, CTImageStorage)


def test_file_meta_is_valid_part10() -> None:
    head = ul.file_meta(CTImageStorage, "1.2.3.4", ExplicitVRLittleEndian, implementation_class_uid="2.25.1",
                        implementation_version="BONENODE_010", source_ae="SCANNER")
    fp = io.BytesIO(head)
    ds = pydicom.dcmread(fp)  # strict Part 10 read: preamble, DICM, meta group, then an empty data set
    meta = ds.file_meta
    assert len(ds) == 0 and fp.tell() == len(head)
    assert meta.MediaStorageSOPInstanceUID == "1.2.3.4" and meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert meta.SourceApplicationEntityTitle.strip() == "SCANNER"
    assert meta.FileMetaInformationGroupLength == len(head) - 132 - 12


def test_abort_source_and_reason_encoding() -> None:
    """PS3.8 9.3.8: the reason is meaningful only for the service provider (source 2); otherwise it is 0."""
    assert ul.abort_pdu(2, 6) == b"\x07\x00\x00\x00\x00\x04\x00\x00\x02\x06"
    assert ul.abort_pdu(0, 6)[-2:] == b"\x00\x00"
    err = ul.ProtocolError("too long", ul.INVALID_PDU_PARAMETER)
    assert (err.source, err.reason) == (2, 6)
    dimse = ul.DimseError("command mid data set")
    assert (dimse.source, dimse.reason) == (0, 0)
    with pytest.raises(ul.DimseError):
        ul.decode_command(b"\x00\x00\x00\x01")
