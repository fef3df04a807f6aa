"""The archive's de-identification (deid with the PS3.15 Table E.1-1 recipe) on a PHI-laden dataset.

Every attribute of Table E.1-1 that pydicom's dictionary knows is filled with identifying text, plus private
attributes, free text quoting the patient, an overlay and nested sequences. The expected result of each row is
read from the table's action codes (PS3.15 Table E.1-1a) here, not from the implementation.
"""

from __future__ import annotations

import datetime as dt

import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from dicomnode.archive import ArchiveError, Deidentifier
from dicomnode.deid_profile import ProfileRow, recipe_text, table_e1_1

NAME, PID, BIRTH = "Doe^Janet", "MRN4455667", "19700412"
KEY = b"k" * 32


def _value(row: ProfileRow, i: int) -> object:
    """An identifying value of the row's VR ("PHI" marks text that must not survive unless kept)."""
    vr = row.vr
    if row.patient_chars == "K":  # retained by the option: a realistic, non-identifying value
        return {"CS": "F", "SH": "UNKNOWN", "AS": "049Y", "DS": "61", "US": 1}.get(vr, "N")
    text = {"PN": f"Phi^Person{i}", "CS": f"PHI{i}", "AE": f"PHIAE{i}", "AS": "045Y", "DA": "20200115",
            "TM": "101010", "DT": "20200115101010", "UI": f"1.2.3.{i}", "IS": "7", "DS": "1.5",
            "UR": f"http://phi.example/{i}"}
    if vr in text:
        return text[vr]
    if vr in ("LO", "SH", "LT", "ST", "UT", "UC"):
        return f"PHI {i} {NAME}"[: 16 if vr == "SH" else 64]
    if vr in ("OB", "UN"):
        return b"PHI!"
    if vr in ("US", "SS"):
        return 7
    if vr == "SQ":
        item = Dataset()
        item.PatientName = NAME
        item.CodeMeaning = f"item {i} of {NAME}"  # free text quoting the patient inside a kept sequence
        item.CodeValue = "T-15460"
        item.ReferencedSOPInstanceUID = f"1.2.3.9{i}"
        return Sequence([item])
    return None


def _corpus() -> tuple[Dataset, dict[str, tuple[ProfileRow, object]]]:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    filled: dict[str, tuple[ProfileRow, object]] = {}
    for i, row in enumerate(table_e1_1()):
        value = _value(row, i)
        if not row.keyword or value is None or row.tag.startswith("FFF"):
            continue
        ds.add_new(int(row.tag, 16), row.vr, value)
        filled[row.keyword] = (row, value)
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    for kw in ("PatientName", "PatientID", "PatientBirthDate", "StudyDate", "PatientSex", "PatientAge",
               "PatientWeight", "SOPInstanceUID", "BurnedInAnnotation"):
        filled.pop(kw, None)  # set to realistic values below, checked on their own
    ds.PatientName, ds.PatientID, ds.PatientBirthDate = NAME, PID, BIRTH
    ds.StudyDate = "20200115"
    ds.PatientSex, ds.PatientAge, ds.PatientWeight = "F", "049Y", "61"
    ds.Manufacturer = f"scanner of {NAME}"  # not in the table: free text quoting the patient
    ds.BodyPartExamined = "WRIST"  # not in the table, not identifying: kept
    ds.BurnedInAnnotation = "NO"
    ds.add_new(0x60000010, "US", 8)  # overlay rows (repeating group 60xx)
    ds.add_new(0x60003000, "OW", b"\x00" * 8)
    block = ds.private_block(0x0029, "ACME PHI", create=True)
    block.add_new(0x01, "LO", f"PHI private {NAME}")
    block.add_new(0x02, "UI", generate_uid())
    return ds, filled


def _strings(ds: Dataset) -> list[str]:
    out = []
    for elem in ds.iterall():
        if elem.VR not in ("SQ", "OB", "OW", "UN"):
            out.append(str(elem.value))
    return out


@pytest.fixture(scope="module")
def result() -> tuple[Dataset, Dataset, dict[str, tuple[ProfileRow, object]]]:
    ds, filled = _corpus()
    assert len(filled) > 550  # nearly all of Table E.1-1's rows are in the corpus
    return ds, Deidentifier(KEY).deidentify(ds), filled


def _action(row: ProfileRow) -> str:
    if row.patient_chars:
        return row.patient_chars
    if row.modified_dates and row.vr in ("DA", "DT", "TM"):
        return row.modified_dates
    return row.basic


def test_every_table_e1_1_attribute_follows_its_action(result) -> None:
    src, out, filled = result
    shift = Deidentifier(KEY).date_shift_days(PID)
    own = {"PatientName", "PatientID", "PatientBirthDate", "PatientAge"}
    for kw, (row, original) in filled.items():
        if kw in own:
            continue
        code = _action(row)
        present = kw in out
        value = out[kw].value if present else None
        where = f"{kw} ({row.tag}, {code})"
        if code == "X":
            assert not present, where
        elif code == "Z":
            assert present and value in (None, "", []), where
        elif code in ("X/Z", "Z/D", "X/Z/D") and row.vr != "SQ":
            assert not present or value in (None, "", []) or value != original, where
        elif code in ("D", "X/D"):
            assert not present or not value or value != original, where
        elif code == "U":
            assert present and str(value).startswith("2.25."), where
        elif code == "K":
            assert present and value == original, where
        elif code == "C" and row.vr == "DA":
            expected = (dt.date(2020, 1, 15) - dt.timedelta(days=shift)).strftime("%Y%m%d")
            assert value == expected, where
        elif code == "C" and row.vr == "DT":
            assert str(value).startswith((dt.date(2020, 1, 15) - dt.timedelta(days=shift)).strftime("%Y%m%d")), where
        elif code == "C" and row.vr == "TM":
            assert value == original, where  # modified dates: the time of day is kept
        elif code == "C":
            assert not present or value != original, where
    for seq in ("ReferencedImageSequence", "SourceImageSequence"):  # X/Z/U*: kept, the references pseudonymised
        if seq in out and out[seq].value:
            assert str(out[seq].value[0].ReferencedSOPInstanceUID).startswith("2.25."), seq


def test_issue_attributes_and_characteristics(result) -> None:
    _, out, _ = result
    assert "AccessionNumber" in out and not out.AccessionNumber  # Type 2: emptied, not deleted
    for kw in ("PlacerOrderNumberImagingServiceRequest", "FillerOrderNumberImagingServiceRequest"):
        assert kw in out and not out[kw].value, kw
    assert "ScheduledProcedureStepID" not in out
    assert (out.PatientSex, out.PatientAge, str(out.PatientWeight)) == ("F", "049Y", "61")  # Retain Patient Characteristics
    assert out.PatientBirthDate == "" and out.PatientName == out.PatientID != PID
    assert out.PatientIdentityRemoved == "YES" and out.LongitudinalTemporalInformationModified == "MODIFIED"
    assert [i.CodeValue for i in out.DeidentificationMethodCodeSequence] == ["113100", "113107", "113108"]


def test_no_phi_survives_private_free_text_overlays_or_nesting(result) -> None:
    src, out, _ = result
    assert not any(e.tag.is_private for e in out.iterall())
    assert not any(e.tag.group & 0xFF00 in (0x5000, 0x6000) for e in out.iterall())
    assert "Manufacturer" not in out and out.BodyPartExamined == "WRIST"
    texts = _strings(out) + _strings(out.file_meta)
    for needle in (NAME, "Janet", PID, BIRTH, "PHI", "Phi^", "phi.example"):
        hits = [t for t in texts if needle in t]
        assert not hits, (needle, hits[:5])
    originals = {str(e.value) for e in src.iterall() if e.VR == "UI" and not str(e.value).startswith("1.2.840.10008.")}
    assert not originals & set(texts)
    assert out.file_meta.MediaStorageSOPInstanceUID == out.SOPInstanceUID
    pydicom.dcmread(_roundtrip(out))  # still a valid file


def _roundtrip(ds: Dataset):
    import io

    buf = io.BytesIO()
    for group in (0x0000, 0x0002):  # command-set and file-meta rows of the table, put in the body by _corpus
        for elem in list(ds.group_dataset(group)):
            del ds[elem.tag]
    ds.save_as(buf, enforce_file_format=True)
    buf.seek(0)
    return buf


def test_burned_in_annotation_flag_refused() -> None:
    ds, _ = _corpus()
    ds.BurnedInAnnotation = "YES"
    with pytest.raises(ArchiveError, match="burned-in annotation"):
        Deidentifier(KEY).deidentify(ds)


def test_recipe_covers_the_table() -> None:
    recipe = recipe_text()
    for kw in ("AccessionNumber", "PlacerOrderNumberImagingServiceRequest", "FillerOrderNumberImagingServiceRequest",
               "ScheduledProcedureStepID", "PatientAge", "StudyDate"):
        assert f" {kw}" in recipe, kw
    assert "BLANK AccessionNumber" in recipe and "REMOVE ScheduledProcedureStepID" in recipe
    assert "KEEP PatientSex" in recipe and "JITTER StudyDate func:date_shift" in recipe
