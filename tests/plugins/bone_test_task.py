"""Deterministic test task ``test_task`` (test-only) and a small synthetic study writer.

The task's probability is the mean pixel value of the first image scaled to
[0, 1]; it returns one study-level classification with a measurement and one
overlay panel, so the real result writers produce an SR and an SC. Importing
this module registers the task (config ``plugins: [tests.plugins.bone_test_task]``).
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from inference.findings import (
    FRACTURE,
    PRESENT,
    PROBABILITY_UNIT,
    Classification,
    Findings,
    ImageRef,
    Measurement,
    Overlay,
    Panel,
)
from inference.tasks import TaskContext, register_task

TASK_NAME = "test_task"
DX_CLASS = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Presentation


def run_test_task(datasets: Sequence[Dataset], context: TaskContext) -> Findings:
    """Deterministic findings from the mean pixel value of the first image (sorted by SOP Instance UID).

    ``BONE_TEST_TASK_SLEEP_S`` in the environment makes it slow, so durability
    tests can kill the node while a job runs.
    """
    delay = float(os.environ.get("BONE_TEST_TASK_SLEEP_S", "0") or 0)
    if delay > 0:
        time.sleep(delay)
    ordered = sorted(datasets, key=lambda d: str(d.SOPInstanceUID))
    first = ordered[0]
    arr = first.pixel_array.astype(np.float64)
    bits = int(first.get("BitsStored", 16))
    prob = float(np.clip(arr.mean() / float(2**bits - 1), 0.0, 1.0))
    ref = ImageRef(str(first.SOPInstanceUID))
    return Findings(
        task=TASK_NAME, algorithm_name="bone test task", algorithm_version="1.0",
        study_instance_uid=str(first.StudyInstanceUID),
        source_images=tuple(ImageRef(str(d.SOPInstanceUID)) for d in ordered),
        classifications=[Classification(FRACTURE, PRESENT, probability=round(prob, 4), images=(ref,),
                                        measurements=[Measurement(FRACTURE, round(prob, 4), PROBABILITY_UNIT)])],
        overlays=[Overlay(panels=[Panel(image=ref, caption="test")], title="TEST OVERLAY", derived_from=(ref,))],
        summary=f"test probability {prob:.3f}", synthetic_model=True,
    )


register_task(TASK_NAME, run_test_task)


def dx_dataset(study_uid: str, series_uid: str, index: int, *, seed: int = 0, rows: int = 32, cols: int = 32,
               body_part: str = "WRIST", modality: str = "DX") -> Dataset:
    """A small valid DX image for tests."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    sop = generate_uid()
    ds.file_meta.MediaStorageSOPClassUID = DX_CLASS
    ds.file_meta.MediaStorageSOPInstanceUID = sop
    ds.SOPClassUID, ds.SOPInstanceUID = DX_CLASS, sop
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "TEST^NODE", "TST001", "19800101", "O"
    ds.PatientAge = "045Y"
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = "20250101"
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = "120000"
    ds.AccessionNumber, ds.StudyID, ds.ReferringPhysicianName = "ACC1", "1", ""
    ds.Modality, ds.BodyPartExamined, ds.Manufacturer = modality, body_part, "TEST"
    ds.SeriesNumber, ds.InstanceNumber = 1 + abs(hash(series_uid)) % 100, index + 1
    ds.PresentationIntentType, ds.ImageType = "FOR PRESENTATION", ["ORIGINAL", "PRIMARY"]
    ds.ViewPosition, ds.ImageLaterality, ds.PatientOrientation = "PA", "L", ["A", "F"]
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelSpacing = ds.ImagerPixelSpacing = [0.2, 0.2]
    ds.WindowCenter, ds.WindowWidth = 2048, 4096
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = 0, 1, "US"
    ds.BurnedInAnnotation, ds.LossyImageCompression = "NO", "00"
    ds.DetectorType, ds.KVP = "DIRECT", 60
    rng = np.random.default_rng(seed * 1000 + index)
    ds.PixelData = rng.integers(0, 4096, size=(rows, cols), dtype=np.uint16).tobytes()
    return ds


def write_study(folder: Path, *, n_series: int = 2, n_images: int = 2, seed: int = 0,
                study_uid: str | None = None) -> tuple[str, list[Path]]:
    """Write a study of ``n_series`` DX series with ``n_images`` each; return (study UID, paths)."""
    folder.mkdir(parents=True, exist_ok=True)
    study_uid = study_uid or generate_uid()
    paths: list[Path] = []
    for s in range(n_series):
        series_uid = generate_uid()
        for i in range(n_images):
            ds = dx_dataset(study_uid, series_uid, i, seed=seed * 100 + s)
            p = folder / f"s{s}_i{i}_{ds.SOPInstanceUID}.dcm"
            ds.save_as(p, enforce_file_format=True)
            paths.append(p)
    return study_uid, paths
