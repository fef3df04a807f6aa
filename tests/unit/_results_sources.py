"""Source images for the result-writer tests, built with pydicom: a CT and an MR series with
geometry, and a DX radiograph without it. Patient names use Latin-1 characters so the
character-set handling is exercised."""

from __future__ import annotations

import numpy as np
from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4"
DX_IMAGE = "1.2.840.10008.5.1.4.1.1.1.1"


def _patient_study(ds: Dataset, study_uid: str) -> None:
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.PatientName = "Müller^Jörg"
    ds.PatientID = "PID-0042"
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "M"
    ds.PatientAge = "054Y"
    ds.StudyInstanceUID = study_uid
    ds.StudyDate = "20240102"
    ds.StudyTime = "101500"
    ds.StudyID = "S1"
    ds.AccessionNumber = "ACC123"
    ds.ReferringPhysicianName = "Doe^Jane"
    ds.StudyDescription = "Bone imaging"


def _file_meta(ds: Dataset) -> None:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta


def volume_series(
    modality: str = "CT", n: int = 5, rows: int = 24, cols: int = 20, study_uid: str | None = None, seed: int = 0
) -> list[Dataset]:
    """An axial CT or MR series (IPP along z, 2.5 mm apart), in slice order."""
    rng = np.random.default_rng(seed)
    study_uid = study_uid or generate_uid()
    series_uid, for_uid = generate_uid(), generate_uid()
    out = []
    for i in range(n):
        ds = Dataset()
        _patient_study(ds, study_uid)
        ds.SOPClassUID = CT_IMAGE if modality == "CT" else MR_IMAGE
        ds.SOPInstanceUID = generate_uid()
        ds.Modality = modality
        ds.SeriesInstanceUID = series_uid
        ds.SeriesNumber = 3
        ds.InstanceNumber = i + 1
        ds.FrameOfReferenceUID = for_uid
        ds.PositionReferenceIndicator = ""
        ds.Manufacturer = "Test"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.ImagePositionPatient = [-10.0, -12.0, 30.0 + 2.5 * i]
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        ds.PixelSpacing = [0.7, 0.8]
        ds.SliceThickness = 2.5
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows, ds.Columns = rows, cols
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
        if modality == "CT":
            ds.PixelRepresentation = 1
            ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = -1024, 1, "HU"
            ds.WindowCenter, ds.WindowWidth = 400, 1800
            ds.KVP = 120
            ds.AcquisitionNumber = 1
            arr = rng.integers(0, 2000, size=(rows, cols), dtype=np.int16)
        else:
            ds.PixelRepresentation = 0
            ds.ScanningSequence, ds.SequenceVariant, ds.ScanOptions = "SE", "NONE", ""
            ds.MRAcquisitionType = "2D"
            ds.EchoTime, ds.RepetitionTime, ds.EchoTrainLength = 20, 500, 1
            arr = rng.integers(0, 1000, size=(rows, cols), dtype=np.uint16)
        ds.PixelData = arr.tobytes()
        _file_meta(ds)
        out.append(ds)
    return out


def dx_image(rows: int = 64, cols: int = 48, study_uid: str | None = None) -> Dataset:
    """A MONOCHROME1 DX radiograph of a wrist without patient geometry."""
    yy, xx = np.mgrid[0:rows, 0:cols]
    arr = (1000 + 2000 * np.exp(-((xx - cols / 2) ** 2 + (yy - rows / 2) ** 2) / (2 * (rows / 5) ** 2))).astype(np.uint16)
    ds = Dataset()
    _patient_study(ds, study_uid or generate_uid())
    ds.SOPClassUID = DX_IMAGE
    ds.SOPInstanceUID = generate_uid()
    ds.Modality = "DX"
    ds.SeriesInstanceUID = generate_uid()
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.BodyPartExamined = "WRIST"
    ds.ImageLaterality = "L"
    ds.PatientOrientation = ["A", "F"]
    ds.Manufacturer = "Test"
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.PixelSpacing = [0.15, 0.15]
    ds.ImagerPixelSpacing = [0.15, 0.15]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME1"
    ds.Rows, ds.Columns = rows, cols
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PresentationLUTShape = "INVERSE"
    ds.PixelData = (4095 - np.clip(arr, 0, 4095)).astype(np.uint16).tobytes()
    _file_meta(ds)
    return ds
