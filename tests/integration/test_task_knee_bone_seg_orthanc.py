"""knee_bone_seg through a real Orthanc and ``dicomnode serve``: SEG + SR + SC land in the source study.

Orthanc C-STOREs a coronal knee MR (and studies that must not produce results) to
the node, whose config routes MR KNEE series with at least 20 slices to
``knee_bone_seg`` with ``model:`` pinned to a tiny trained bundle.
"""

from __future__ import annotations

import io
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
import torch
import yaml

from dicomnode.results import codes as rc
from inference import codes
from inference.series import read_datasets
from inference.task_settings import KneeBoneSegSettings
from inference.tasks import TaskContext, get_task
from inference.tasks.knee_bone_seg import choose_series
from tests.integration.conftest import NodeProcess, wait_for
from tests.orthanc import OrthancServer
from tests.unit.knee_phantom import write_knee_dataset, write_knee_study
from training.data import load_records, records_from_rows, split_records
from training.metrics import dice
from training.tasks import get_adapter
from training.tasks.knee_bone_seg import TRAIN_DEFAULTS, KneeConfig, load_label_map
from training.trainer import TrainConfig, train

pytestmark = pytest.mark.integration

SEG_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
SR_PREFIX = "1.2.840.10008.5.1.4.1.1.88."


@pytest.fixture(scope="module")
def knee_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.set_num_threads(1)
    data = tmp_path_factory.mktemp("knee_train")
    write_knee_dataset(data, 4, seed=21, rows=96, cols=96, pixel_mm=1.3)
    cfg = TrainConfig(**{**TRAIN_DEFAULTS, "epochs": 1, "batch_size": 4, "max_steps_per_epoch": 2, "device": "cpu",
                         "version": "orthanc-1"})
    out = tmp_path_factory.mktemp("knee_bundle") / "bundle"
    return train(get_adapter("knee_bone_seg"), split_records(load_records(data)), out, cfg,
                 KneeConfig(size=64)).bundle_dir


def _route_to_knee(node: NodeProcess, bundle: Path) -> None:
    cfg = yaml.safe_load(node.config_path.read_text(encoding="utf-8"))
    cfg["routes"] = [{"name": "knee-mr", "task": "knee_bone_seg", "complete_after_s": 1.0, "send_to": ["pacs"],
                      "model": str(bundle), "match": {"modality": ["MR"], "body_part": ["KNEE"], "min_slices": 20}}]
    cfg["plugins"] = []
    node.config_path.write_text(yaml.safe_dump(cfg), encoding="utf-8")


def _results(pacs: OrthancServer, study_uid: str, source_uids: set[str]) -> list[dict]:
    return [i for i in pacs.instances_in_study(study_uid) if i["SOPInstanceUID"] not in source_uids]


def _uids(folder: Path) -> set[str]:
    return {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in folder.rglob("*.dcm")}


def test_knee_mr_through_orthanc_gives_seg_sr_sc_in_the_source_study(
        tmp_path: Path, knee_bundle: Path, node_with_orthanc: tuple[NodeProcess, OrthancServer]) -> None:
    node, pacs = node_with_orthanc
    _route_to_knee(node, knee_bundle)
    node.start()
    knee_dir = tmp_path / "knee"
    row = write_knee_study(knee_dir, 0, 77, n_slices=20, rows=96, cols=96, pixel_mm=1.3)
    negatives = {
        "few": write_knee_study(tmp_path / "few", 0, 78, n_slices=12, rows=48, cols=48),  # < 20 slices: no route
        "ct": write_knee_study(tmp_path / "ct", 0, 79, modality="CT", n_slices=24, rows=48, cols=48),  # CT: no route
        "axial": write_knee_study(tmp_path / "axial", 0, 80, orientation="axial", n_slices=24, rows=48, cols=48),
    }
    study_uid = str(row["study_uid"])
    source_uids = _uids(knee_dir)
    for name in ("knee", *negatives):
        pacs.upload_dir(tmp_path / name)
    for uid in [study_uid, *(str(r["study_uid"]) for r in negatives.values())]:
        pacs.store_to_modality("node", [pacs.study_id(uid)])

    def three() -> list[dict]:
        res = _results(pacs, study_uid, source_uids)
        return res if len(res) >= 3 else []

    results = wait_for(three, 180, "SEG, SR and SC of the knee study in Orthanc")
    assert len(results) == 3
    by_kind = {("SEG" if r["SOPClassUID"] == SEG_CLASS else "SR" if str(r["SOPClassUID"]).startswith(SR_PREFIX)
                else "SC"): r for r in results}
    assert set(by_kind) == {"SEG", "SR", "SC"}
    seg_ds = pydicom.dcmread(io.BytesIO(pacs.get_file(by_kind["SEG"]["ID"])))
    sr_ds = pydicom.dcmread(io.BytesIO(pacs.get_file(by_kind["SR"]["ID"])))
    for ds in (seg_ds, sr_ds):
        assert ds.StudyInstanceUID == study_uid

    # the SEG read back: one segment per bone, frames on the source slices, equal to the task's own masks
    seg = hd.seg.Segmentation.from_dataset(seg_ds)
    assert seg.number_of_segments == 3
    assert [seg.get_segment_description(i).segmented_property_type.value for i in (1, 2, 3)] == [
        codes.FEMUR.value, codes.TIBIA.value, codes.FIBULA.value]
    datasets = read_datasets([knee_dir])
    series = choose_series(datasets, KneeBoneSegSettings())
    uids = [str(p.ds.SOPInstanceUID) for p in series.planes]
    src = {str(p.ds.SOPInstanceUID): p.ds for p in series.planes}
    for frame in seg_ds.PerFrameFunctionalGroupsSequence:
        ref = frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        assert np.allclose([float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient],
                           [float(v) for v in src[ref].ImagePositionPatient], atol=1e-4)
    pixels = seg.get_pixels_by_source_instance(uids, segment_numbers=[1, 2, 3], combine_segments=False).astype(bool)
    local = get_task("knee_bone_seg")(datasets, TaskContext(model_dir=knee_bundle, device="cpu"))
    for b, mask in enumerate(local.masks):
        np.testing.assert_array_equal(pixels[..., b], mask.array)
    # against the ground truth in source space (a few training steps: only a sanity bound)
    (record,) = records_from_rows([row], knee_dir)
    labels = load_label_map(record, series)
    assert pixels.shape[:3] == labels.shape
    scores = [dice(pixels[..., b], labels == b + 1) for b in range(3)]
    assert all(0.0 <= s <= 1.0 for s in scores)

    # the SR: per bone found, its outline on its largest slice (TID 1410) with the segment's volume in mL
    groups = hd.sr.Comprehensive3DSR.from_dataset(sr_ds).content.get_planar_roi_measurement_groups()
    bones = [rc.FEMUR.value, rc.TIBIA.value, rc.FIBULA.value]
    assert [g.finding_type.value for g in groups] == [b for i, b in enumerate(bones) if pixels[..., i].any()]
    voxel = float(np.prod(series.spacing))
    for group in groups:
        number = bones.index(group.finding_type.value) + 1
        (vol,) = group.get_measurements(name=rc.to_hd(rc.VOLUME))
        assert vol.unit.value == "mL"
        assert vol.value == pytest.approx(pixels[..., number - 1].sum() * voxel / 1000, rel=1e-6, abs=1e-6)
    evidence = {i.ReferencedSOPInstanceUID for s in sr_ds.CurrentRequestedProcedureEvidenceSequence
                for r in s.ReferencedSeriesSequence for i in r.ReferencedSOPSequence}
    assert seg_ds.SOPInstanceUID in evidence

    # routing negatives: no job for the short series or the CT; the axial MR is refused by the task
    jobs = {r["study_uid"]: r for r in node.query("SELECT study_uid, state, last_error FROM jobs")}
    assert jobs[study_uid]["state"] == "done"
    assert str(negatives["few"]["study_uid"]) not in jobs and str(negatives["ct"]["study_uid"]) not in jobs
    axial_uid = str(negatives["axial"]["study_uid"])
    axial = wait_for(lambda: [r for r in node.query("SELECT state, last_error FROM jobs WHERE study_uid=?", (axial_uid,))
                              if r["last_error"]], 60, "the axial job's failure")[0]
    assert axial["state"] in ("pending", "dead") and "axial" in axial["last_error"]
    for name, neg in negatives.items():
        assert _results(pacs, str(neg["study_uid"]), _uids(tmp_path / name)) == [], name
