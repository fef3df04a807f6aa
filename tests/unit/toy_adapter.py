"""A tiny task adapter and synthetic DICOM writer for framework tests (a test double, tests only).

Task "toy_square": a small CT-like image with or without a bright square.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from inference.bundle import InputSpec, LabelSpec
from inference.nets import build_network
from inference.series import load_series
from training.adapter import BaseAdapter, EvalResult, TaskConfig
from training.data import Record, Sample
from training.metrics import classification_report

SIZE = 16


def write_ct(path: Path, *, patient: str, study_uid: str, series_uid: str, pixels: np.ndarray,
             position_z: float = 0.0, instance: int = 1, spacing: float = 0.8,
             orientation: tuple[float, ...] = (1, 0, 0, 0, 1, 0)) -> Path:
    """Write one small CT slice (int16, rescale -1024) with full geometry."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.PatientID = patient
    ds.PatientName = "Toy^Patient"
    ds.Modality = "CT"
    ds.StudyDate = "20240101"
    ds.InstanceNumber = instance
    ds.ImagePositionPatient = [0.0, 0.0, float(position_z)]
    ds.ImageOrientationPatient = [float(v) for v in orientation]
    ds.PixelSpacing = [spacing, spacing]
    ds.SliceThickness = 1.0
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.RescaleIntercept = -1024
    ds.RescaleSlope = 1
    ds.PixelData = (pixels.astype(np.int16) + 1024).astype(np.int16).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def make_toy_data(root: Path, n_patients: int = 12, seed: int = 0) -> list[dict[str, Any]]:
    """One single-slice study per patient; label 1 when a bright square is present. Returns manifest rows."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n_patients):
        label = i % 2
        img = rng.normal(0, 20, (SIZE, SIZE))
        if label:
            y, x = rng.integers(2, SIZE - 8, 2)
            img[y:y + 6, x:x + 6] += 600
        study = generate_uid()
        write_ct(root / f"p{i:02d}" / "img.dcm", patient=f"PAT{i:03d}", study_uid=study, series_uid=generate_uid(),
                 pixels=img)
        rows.append({"study_uid": study, "patient_id": f"PAT{i:03d}", "label": label, "synthetic": True})
    return rows


class ToyConfig(TaskConfig):
    """Typed config of the toy task."""

    channels: int = 4
    dropout: float = 0.1


def preprocess(record: Record) -> list[Sample]:
    """Series -> HU -> scaled image (1, SIZE, SIZE) and its label."""
    vol = load_series(record.files).volume()
    img = np.clip(vol[0] / 1000.0, -1, 1).astype(np.float32)[None]
    return [{"image": img, "label": int(record.row["label"])}]


class ToyAdapter(BaseAdapter):
    """Binary classification adapter of the toy task."""

    name = "toy_square"
    config_model = ToyConfig
    primary_metric = "accuracy"
    greater_is_better = True

    def architecture(self, cfg: ToyConfig) -> tuple[str, dict[str, Any]]:
        # a tiny instance of a real architecture, so bundles rebuild through inference.nets like the real tasks
        return "motion_cnn", {"in_channels": 1, "num_classes": 1, "channels": [cfg.channels, cfg.channels],
                              "hidden": 8, "dropout": cfg.dropout}

    def build_model(self, cfg: ToyConfig) -> torch.nn.Module:
        arch, init_args = self.architecture(cfg)
        return build_network(arch, **init_args)

    def preprocessor(self, cfg: ToyConfig):
        return preprocess

    def loss(self, outputs: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.nn.functional.binary_cross_entropy_with_logits(outputs[:, 0].float(), batch["label"].float())

    def evaluate(self, model, loader, device, cfg) -> EvalResult:
        probs, labels = [], []
        for batch in loader:
            probs.append(torch.sigmoid(model(batch["image"].to(device))[:, 0].float()).cpu())
            labels.append(batch["label"])
        p = torch.cat(probs).numpy()
        y = torch.cat(labels).numpy()
        metrics = classification_report(y, p, ["absent", "present"], n_boot=50)
        return EvalResult(metrics=metrics, y_true=y, y_prob=p, class_names=["absent", "present"])

    def input_spec(self, cfg: ToyConfig) -> InputSpec:
        return InputSpec(modality=["CT"], size=[SIZE, SIZE], normalisation="none", extra={"scale_hu": 1000.0})

    def labels(self, cfg: ToyConfig) -> list[LabelSpec]:
        return [LabelSpec(name="square", index=0)]

    def reference_figures(self) -> dict[str, Any]:
        return {"accuracy": 0.9}


ADAPTER = ToyAdapter()


def build_from_bundle(bundle) -> torch.nn.Module:
    """ModelCache builder for toy bundles (what the default builder does, spelled out)."""
    return bundle.build_model()
