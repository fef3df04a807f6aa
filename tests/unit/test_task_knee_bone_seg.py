"""knee_bone_seg end to end on small phantom studies: geometry, post-processing, training, analyze, results."""

from __future__ import annotations

import json
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
import torch

from dicomnode.results import ResultContext
from dicomnode.results import codes as rc
from dicomnode.results.builder import build_results
from inference import codes
from inference.bundle import read_meta
from inference.errors import TaskError
from inference.mr import CropResize
from inference.series import group_by_series, read_datasets
from inference.task_settings import KneeBoneSegSettings, settings_of
from inference.tasks import TaskContext, get_task
from inference.tasks.knee_bone_seg import (
    BONES,
    bone_masks_to_source,
    choose_series,
    make_findings,
    plane_of,
    postprocess,
)
from tests.unit.knee_phantom import write_knee_dataset, write_knee_study
from training.data import load_records, split_records
from training.metrics import dice
from training.tasks import get_adapter
from training.tasks.knee_bone_seg import (
    TRAIN_DEFAULTS,
    KneeConfig,
    collate_knee,
    load_label_map,
    prepare_record,
    score_volume,
)
from training.trainer import TrainConfig, train

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module", autouse=True)
def _threads() -> None:
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def knee_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("knee_data")
    write_knee_dataset(root, 4, seed=1, rows=96, cols=96, pixel_mm=1.3)
    return root


@pytest.fixture(scope="module")
def tiny_bundle(knee_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real bundle trained for a few steps (weights are poor; the pipeline is what is tested)."""
    out = tmp_path_factory.mktemp("bundle") / "knee"
    split = split_records(load_records(knee_data))
    cfg = TrainConfig(**{**TRAIN_DEFAULTS, "epochs": 2, "batch_size": 4, "max_steps_per_epoch": 2, "device": "cpu",
                         "version": "tiny-1", "seed": 0})
    # 64x64 network input keeps the CPU test short; the code path is the one of the faithful 224x224
    result = train(get_adapter("knee_bone_seg"), split, out, cfg, KneeConfig(size=64))
    return result.bundle_dir


def _study_datasets(root: Path) -> list[pydicom.Dataset]:
    return read_datasets([root])


# --------------------------------------------------------------------------- network, config, bundle meta


def test_faithful_unet_has_211k_parameters() -> None:
    adapter = get_adapter("knee_bone_seg")
    model = adapter.build_model(KneeConfig())
    assert sum(p.numel() for p in model.parameters()) == 211_011
    assert adapter.architecture(KneeConfig()) == ("unet2d", {})
    out = model.eval()(torch.zeros(2, 1, 224, 224))
    assert out.shape == (2, 3, 224, 224)
    assert adapter.architecture(KneeConfig(base_channels=16)) == ("unet2d", {"base_channels": 16})


def test_faithful_training_schedule_is_the_default() -> None:
    adapter = get_adapter("knee_bone_seg")
    defaults = adapter.train_config_defaults  # type: ignore[attr-defined]
    cfg = TrainConfig(**defaults)
    assert (cfg.optimizer, cfg.lr, cfg.schedule, cfg.min_lr, cfg.early_stopping_patience) == (
        "adam", 1e-3, "plateau", 1e-4, 10)
    assert cfg.lr * cfg.gamma == pytest.approx(1e-4)
    assert cfg.balanced_sampling  # slices balanced on "shows fibula" (the addition that lets it be learned)


def test_the_settings_are_the_one_serving_model() -> None:
    """Training's config is serving's settings class; the input spec carries no second copy of them."""
    cfg = KneeConfig(crop_mm=120.0, threshold=0.4)
    assert isinstance(cfg, KneeBoneSegSettings)
    assert cfg.planes == ("coronal", "sagittal") and cfg.size == 224 and cfg.batch_size == 8
    spec = get_adapter("knee_bone_seg").input_spec(cfg)
    assert not {"crop_mm", "threshold", "n4_shrink", "planes"} & set(spec.extra)
    assert spec.normalisation == "zscore" and (spec.mean, spec.std) == (cfg.norm_mean, cfg.norm_std)
    labels = get_adapter("knee_bone_seg").labels(KneeConfig())
    assert [(lab.name, lab.code.value) for lab in labels] == [  # type: ignore[union-attr]
        ("femur", codes.FEMUR.value), ("tibia", codes.TIBIA.value), ("fibula", codes.FIBULA.value)]


# --------------------------------------------------------------------------- series selection


def test_series_selection_rules(tmp_path: Path) -> None:
    write_knee_study(tmp_path / "cor", 0, 5, orientation="coronal", n_slices=20, rows=48, cols=48)
    write_knee_study(tmp_path / "sag", 0, 6, orientation="sagittal", n_slices=22, rows=48, cols=48)
    write_knee_study(tmp_path / "ax", 0, 7, orientation="axial", n_slices=24, rows=48, cols=48)
    write_knee_study(tmp_path / "few", 0, 8, n_slices=12, rows=48, cols=48)
    write_knee_study(tmp_path / "ct", 0, 9, modality="CT", n_slices=24, rows=48, cols=48)
    params = KneeBoneSegSettings()
    cor = choose_series(_study_datasets(tmp_path / "cor"), params)
    assert plane_of(cor) == "coronal" and len(cor) == 20
    assert plane_of(choose_series(_study_datasets(tmp_path / "sag"), params)) == "sagittal"
    for name, why in (("ax", "axial"), ("few", "12 slices < 20"), ("ct", "not MR")):
        with pytest.raises(TaskError, match=why):
            choose_series(_study_datasets(tmp_path / name), params)
    # a study with both: the usable coronal series is chosen
    mixed = _study_datasets(tmp_path / "ax") + _study_datasets(tmp_path / "cor")
    assert choose_series(mixed, params).series_instance_uid == cor.series_instance_uid


# --------------------------------------------------------------------------- post-processing and geometry


def test_postprocess_keeps_largest_component_and_fills_holes() -> None:
    probs = np.zeros((4, 3, 32, 32), np.float32)
    probs[:, 0, 4:20, 4:20] = 0.9
    probs[:, 0, 10:12, 10:12] = 0.1  # hole
    probs[1, 0, 26:29, 26:29] = 0.95  # small island
    probs[:, 2, 0:2, 0:2] = 0.49  # below threshold
    masks = postprocess(probs, KneeBoneSegSettings())
    assert masks.shape == (3, 4, 32, 32)
    assert masks[0, :, 4:20, 4:20].all() and not masks[0, 1, 26:29, 26:29].any()
    assert not masks[1].any() and not masks[2].any()
    raw = postprocess(probs, KneeBoneSegSettings(largest_component=False, fill_holes=False))
    assert raw[0, 1, 27, 27] and not raw[0, 0, 10, 10]


@pytest.mark.parametrize("rows,pixel_mm", [(128, 1.0), (224, 0.625), (320, 0.4)])
def test_ground_truth_through_forward_and_inverse_mapping(tmp_path: Path, rows: int, pixel_mm: float) -> None:
    """GT label map -> crop/resize -> post-processing -> inverse: exact when the window is <= 224 px."""
    row = write_knee_study(tmp_path, 0, 11, n_slices=20, rows=rows, cols=rows, pixel_mm=pixel_mm)
    (record,) = [r for r in load_records_from_row(tmp_path, row)]
    series = choose_series(read_datasets(record.files), KneeBoneSegSettings())
    labels = load_label_map(record, series)
    crop = CropResize.around((rows / 2 + 3, rows / 2 - 2), (rows, rows), (pixel_mm, pixel_mm), crop_mm=100.0)
    model = np.stack([crop.mask_to_model(labels == b + 1) for b in range(3)], axis=1).astype(np.float32)
    back = bone_masks_to_source(postprocess(model, KneeBoneSegSettings()), crop)
    assert back.shape == (3, *labels.shape)
    inside = np.zeros(labels.shape, bool)
    inside[:, crop.r0:crop.r0 + crop.size_r, crop.c0:crop.c0 + crop.size_c] = True
    for b in range(3):
        truth = (labels == b + 1) & inside
        assert not back[b][~inside].any()
        if crop.size_r <= 224:
            np.testing.assert_array_equal(back[b], truth)
        else:  # cells of several pixels: boundary pixels may flip, the model-grid mask is reproduced exactly
            np.testing.assert_array_equal(crop.mask_to_model(back[b]), model[:, b] > 0.5)
            assert dice(back[b], truth) > 0.97


def load_records_from_row(root: Path, row: dict) -> list:
    from training.data import records_from_rows

    return records_from_rows([row], root)


def test_label_map_is_resampled_when_stored_in_another_slice_order(tmp_path: Path) -> None:
    import SimpleITK as sitk

    row = write_knee_study(tmp_path, 0, 12, n_slices=20, rows=48, cols=48)
    (record,) = load_records_from_row(tmp_path, row)
    series = choose_series(read_datasets(record.files), KneeBoneSegSettings())
    direct = load_label_map(record, series)
    img = sitk.ReadImage(str(tmp_path / row["mask"]))
    flipped = sitk.Flip(img, [False, False, True])  # reversed slice order, geometry kept consistent
    assert not np.array_equal(sitk.GetArrayFromImage(flipped), direct)
    sitk.WriteImage(flipped, str(tmp_path / row["mask"]))
    np.testing.assert_array_equal(load_label_map(record, series), direct)


def test_known_mask_round_trips_voxel_for_voxel_through_seg(tmp_path: Path, dciodvfy) -> None:
    row = write_knee_study(tmp_path, 0, 13, n_slices=20, rows=64, cols=64)
    (record,) = load_records_from_row(tmp_path, row)
    datasets = read_datasets(record.files)
    series = choose_series(datasets, KneeBoneSegSettings())
    labels = load_label_map(record, series)
    masks = np.stack([labels == b + 1 for b in range(3)])
    findings = make_findings(masks, series, algorithm_name="bone-dicomnode/knee_bone_seg/unet2d",
                             algorithm_version="t1", synthetic_model=True)
    objects = build_results(findings, datasets, ResultContext())
    assert [o.Modality for o in objects] == ["SEG", "SR", "OT"] or [o.Modality for o in objects][:2] == ["SEG", "SR"]
    seg_path = tmp_path / "seg.dcm"
    objects[0].save_as(seg_path, enforce_file_format=True)
    dciodvfy(seg_path)
    seg = hd.seg.segread(seg_path)
    uids = [str(p.ds.SOPInstanceUID) for p in series.planes]
    pixels = seg.get_pixels_by_source_instance(uids, segment_numbers=[1, 2, 3], combine_segments=False)
    for b in range(3):
        np.testing.assert_array_equal(pixels[..., b].astype(bool), masks[b])
    # frame geometry equals the source slices exactly
    raw = pydicom.dcmread(seg_path)
    src = {str(p.ds.SOPInstanceUID): p.ds for p in series.planes}
    for frame in raw.PerFrameFunctionalGroupsSequence:
        ref = frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        pos = [float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient]
        assert np.allclose(pos, [float(v) for v in src[ref].ImagePositionPatient], atol=1e-4)
    # volumes: voxel count x voxel volume
    voxel = float(np.prod(series.spacing))
    for b, m in enumerate(findings.masks):
        assert m.measurements[0].value == pytest.approx(masks[b].sum() * voxel, rel=1e-6)
        assert m.measurements[0].unit.value == "mm3"


# --------------------------------------------------------------------------- training, evaluation, analyze


def test_samples_and_collate(knee_data: Path) -> None:
    record = load_records(knee_data)[0]
    samples = prepare_record(record, KneeConfig())
    assert len(samples) == 20
    s = samples[10]
    assert s["image"].shape == (1, 224, 224) and s["target"].shape == (3, 224, 224)  # the faithful input size
    assert s["target"][0].any() and s["target"][1].any()
    # the balanced-sampling label says whether the slice shows fibula, and some slices do and some do not
    shows = [bool(x["target"][2].any()) for x in samples]
    assert [x["label"] for x in samples] == [int(v) for v in shows] and 0 < sum(shows) < len(samples)
    batch = collate_knee([{k: torch.as_tensor(v) for k, v in x.items()} for x in samples[:3]], mean=1.0, std=2.0)
    assert batch["image"].shape == (3, 1, 224, 224) and batch["source_label"].shape == (3, 96, 96)
    np.testing.assert_allclose(batch["image"][0].numpy(), (samples[0]["image"] - 1.0) / 2.0, rtol=1e-6)


def test_score_volume_perfect_and_shifted() -> None:
    labels = np.zeros((6, 40, 40), np.uint8)
    labels[1:5, 5:20, 5:20] = 1
    labels[1:5, 22:35, 8:18] = 2
    labels[2:4, 25:30, 25:30] = 3
    pred = np.stack([labels == b + 1 for b in range(3)])
    perfect = score_volume(pred, labels, (3.0, 0.5, 0.5))
    assert all(perfect[f"dice_{b}"] == 1.0 and perfect[f"hd95_{b}"] == 0.0 for b in BONES)
    shifted = pred.copy()
    shifted[0] = np.roll(shifted[0], 4, axis=1)
    s = score_volume(shifted, labels, (3.0, 0.5, 0.5))
    assert s["dice_femur"] < 0.9 and s["hd95_femur"] == pytest.approx(2.0, abs=0.01)
    assert s["iou_merged"] < s["dice_merged"] < 1.0


def test_tiny_bundle_meta_evaluate_and_report(tiny_bundle: Path, knee_data: Path, tmp_path: Path) -> None:
    meta = json.loads((tiny_bundle / "bundle.json").read_text())
    assert meta["task"] == "knee_bone_seg" and meta["architecture"] == "unet2d" and meta["init_args"] == {}
    assert meta["input"]["normalisation"] == "zscore" and "n4_shrink" not in meta["input"]["extra"]
    # the settings the bundle was trained with are its task_config, read back typed by serving
    settings = settings_of(read_meta(tiny_bundle), KneeBoneSegSettings)
    assert settings == KneeConfig(size=64, norm_mean=settings.norm_mean, norm_std=settings.norm_std)
    assert meta["synthetic_only"] is True
    assert {"dice_femur", "dice_tibia", "dice_fibula", "hd95_femur", "hd95_fibula", "dice_merged", "iou_merged",
            "dice_mean", "dice_femur_full_image"} <= set(meta["metrics"])
    from training.evaluate import evaluate_bundle

    ev = evaluate_bundle(tiny_bundle, knee_data, tmp_path / "eval", device="cpu")
    assert ev.holdout_matches is True and ev.n_records >= 1
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["reference"]["dice_merged"] == 0.98 and metrics["reference"]["iou_merged"] == 0.96
    assert 0.0 <= metrics["metrics"]["dice_fibula"] <= 1.0
    report = (tmp_path / "eval" / "report.md").read_text()
    assert "| dice_merged |" in report and "0.98" in report and "fibula" in report


def test_analyze_writes_valid_seg_sr_sc(tiny_bundle: Path, knee_data: Path, tmp_path: Path, dciodvfy) -> None:
    record = load_records(knee_data)[0]
    study_dir = tmp_path / "study"
    study_dir.mkdir()
    for f in record.files:
        (study_dir / f.name).write_bytes(f.read_bytes())
    from dicomnode.analyze import analyze

    analyze(study_dir, "knee_bone_seg", tmp_path / "out", model_dir=tiny_bundle, device="cpu")
    files = sorted((tmp_path / "out").glob("*.dcm"))
    kinds = {pydicom.dcmread(f, stop_before_pixels=True).Modality: f for f in files}
    assert set(kinds) == {"SEG", "SR", "OT"} or set(kinds) >= {"SEG", "SR"}
    assert len(files) == 3
    for f in files:
        dciodvfy(f)
    datasets = read_datasets(record.files)
    (series,) = group_by_series(datasets).values()
    seg = hd.seg.segread(kinds["SEG"])
    assert seg.StudyInstanceUID == series.planes[0].ds.StudyInstanceUID
    assert seg.number_of_segments == 3
    types = [seg.get_segment_description(i).segmented_property_type for i in (1, 2, 3)]
    assert [t.value for t in types] == [codes.FEMUR.value, codes.TIBIA.value, codes.FIBULA.value]
    cats = {seg.get_segment_description(i).segmented_property_category.value for i in (1, 2, 3)}
    assert cats == {codes.ANATOMICAL_STRUCTURE.value}
    uids = [str(p.ds.SOPInstanceUID) for p in series.planes]
    pixels = seg.get_pixels_by_source_instance(uids, segment_numbers=[1, 2, 3], combine_segments=False)
    assert pixels.shape == (20, 96, 96, 3)
    sr = hd.sr.srread(kinds["SR"])
    report = sr.content
    # one TID 1410 group per bone found: its outline on its largest slice, with the whole segment's volume in mL
    groups = report.get_planar_roi_measurement_groups()
    bones = [codes.FEMUR.value, codes.TIBIA.value, codes.FIBULA.value]
    found = [b for i, b in enumerate(bones) if pixels[..., i].any()]
    assert [g.finding_type.value for g in groups] == found
    voxel = float(np.prod(series.spacing))
    for group in groups:
        number = bones.index(group.finding_type.value) + 1
        (vol,) = group.get_measurements(name=rc.to_hd(rc.VOLUME))
        assert vol.unit.value == "mL"
        assert vol.value == pytest.approx(pixels[..., number - 1].astype(bool).sum() * voxel / 1000, rel=1e-6, abs=1e-6)
    evidence = {i.ReferencedSOPInstanceUID for s in sr.CurrentRequestedProcedureEvidenceSequence
                for r in s.ReferencedSeriesSequence for i in r.ReferencedSOPSequence}
    assert seg.SOPInstanceUID in evidence
    sc = pydicom.dcmread(kinds["OT"])
    assert sc.StudyInstanceUID == series.planes[0].ds.StudyInstanceUID and sc.SamplesPerPixel == 3


def test_task_is_deterministic_and_times_its_stages(tiny_bundle: Path, knee_data: Path) -> None:
    datasets = read_datasets(load_records(knee_data)[1].files)
    task = get_task("knee_bone_seg")
    ctx = TaskContext(model_dir=tiny_bundle, device="cpu")
    a, b = task(datasets, ctx), task(datasets, ctx)
    assert [m.label for m in a.masks] == [codes.FEMUR, codes.TIBIA, codes.FIBULA]
    for ma, mb in zip(a.masks, b.masks, strict=True):
        np.testing.assert_array_equal(ma.array, mb.array)
        assert ma.array.shape == (20, 96, 96)
    assert {"load", "preprocess", "forward", "postprocess"} <= set(a.timings_s)
    assert a.algorithm_version == "tiny-1" and a.synthetic_model
    assert a.overlays and 1 <= len(a.overlays[0].panels) <= 6


def test_generator_label_maps_load_on_the_series_grid(tmp_path: Path) -> None:
    """The synthetic generator's .mha label maps line up with its DICOM series (both orientations)."""
    from training.synth.knee_bone_seg import generate

    for orientation in ("coronal", "sagittal"):
        root = tmp_path / orientation
        generate(root, 1, 3, workers=1, params={"orientation": orientation, "n": 96, "n_slices": 20,
                                                  "pixel_spacing": 1.2})
        (record,) = load_records(root)
        series = choose_series(read_datasets(record.files), KneeBoneSegSettings())
        assert plane_of(series) == orientation
        labels = load_label_map(record, series)
        assert labels.shape == (20, 96, 96)
        voxels = record.row["voxels"]
        assert [int((labels == b + 1).sum()) for b in range(3)] == [voxels[b] for b in BONES]


def test_norm_command_prints_the_fitted_zscore(knee_data: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from training.tasks.knee_bone_seg import main

    assert main(["norm", "--data", str(knee_data), "--max-records", "2"]) == 0
    text = capsys.readouterr().out.split()
    assert text[0] == "--set" and text[1].startswith("task.norm_mean=") and text[3].startswith("task.norm_std=")
    mean, std = float(text[1].split("=")[1]), float(text[3].split("=")[1])
    assert 0.1 < mean < 2.0 and 0.05 < std < 2.0


def test_montage_draws_contours_not_filled_panels(tmp_path: Path) -> None:
    """A large source (panel shrunk below 2x) gets thin contours: colour covers a small part of each panel."""
    row = write_knee_study(tmp_path, 0, 14, n_slices=20, rows=384, cols=384, pixel_mm=0.4)
    (record,) = load_records_from_row(tmp_path, row)
    datasets = read_datasets(record.files)
    series = choose_series(datasets, KneeBoneSegSettings())
    labels = load_label_map(record, series)
    findings = make_findings(np.stack([labels == b + 1 for b in range(3)]), series, algorithm_name="a",
                             algorithm_version="1", synthetic_model=True)
    assert len(findings.overlays[0].panels) == 6
    sc = build_results(findings, datasets, ResultContext())[-1]
    rgb = sc.pixel_array.astype(int)
    coloured = (np.abs(rgb[..., 0] - rgb[..., 1]) > 40) | (np.abs(rgb[..., 1] - rgb[..., 2]) > 40)
    assert 0.0005 < coloured.mean() < 0.05
    # volumes as people write them (mL), one statement shown on the overlay and in ImageComments
    vol = {m.label.meaning.lower(): m.measurements[0].value / 1000.0 for m in findings.masks}
    assert findings.summary == ("Bone volumes: " + ", ".join(f"{b} {vol[b]:.1f} mL" for b in ("femur", "tibia", "fibula")))
    assert findings.summary in sc.ImageComments


def test_batch_dice_does_not_reward_empty_predictions() -> None:
    adapter = get_adapter("knee_bone_seg")
    target = torch.zeros(2, 3, 16, 16)
    target[0, 0, 4:12, 4:12] = 1  # femur on one slice only; no tibia/fibula anywhere
    empty = torch.full((2, 3, 16, 16), -20.0)
    perfect = torch.where(target > 0, 20.0, -20.0)
    for flag in (True, False):
        batch = {"target": target, "dice_over_batch": torch.tensor([flag])}
        assert float(adapter.loss(perfect, batch)) < 1e-3
    by_slice = float(adapter.loss(empty, {"target": target, "dice_over_batch": torch.tensor([False])}))
    by_batch = float(adapter.loss(empty, {"target": target, "dice_over_batch": torch.tensor([True])}))
    assert by_slice == pytest.approx(1 - (5 + 1 / 65) / 6, abs=1e-3)  # 5 of 6 slice-channels are empty-on-empty
    assert by_batch == pytest.approx(1 - (2 + 1 / 65) / 3, abs=1e-3) and by_batch > by_slice
