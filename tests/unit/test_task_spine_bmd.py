"""spine_bmd: level finding, detection post-processing, class rules, paper metrics, and a tiny trained bundle end to end."""

from __future__ import annotations

import numpy as np
import pytest

from inference.tasks.spine_bmd_levels import (
    BodyRun,
    SliceDetection,
    aggregate_vertebra,
    body_runs,
    find_levels,
    label_runs,
    patient_class,
    select_slices,
    slice_class_scores,
)
from training.tasks.spine_bmd_eval import SliceEval, level_accuracy, paper_metrics

# --------------------------------------------------------------------------- a numpy lumbar phantom (test double)

TRAB = {"normal": 220.0, "osteopenia": 135.0, "osteoporosis": 70.0}


def lumbar_phantom(classes: dict[str, str], *, slice_mm: float = 2.0, px: float = 0.8, size: int = 160,
                   seed: int = 0, top_partial: bool = True, aorta_hu: float | None = None,
                   specks: bool = False) -> tuple[np.ndarray, np.ndarray, dict[str, float]]:
    """Axial stack (ascending z) with L1-L5 bodies (cortical shell), discs, posterior arches and a sacrum.

    ``aorta_hu``: a contrast-filled aorta (24 mm) just in front of the bodies, across the midline, on every
    slice; ``specks``: bone-bright single voxels far lateral (noise in an enhancing kidney).
    Returns the HU volume, slice positions (mm) and each level's true mid-body z.
    """
    rng = np.random.default_rng(seed)
    body_h, disc_h = 28.0, 10.0
    levels = ["L5", "L4", "L3", "L2", "L1"]  # inferior to superior
    z = 20.0  # sacrum top
    extents: dict[str, tuple[float, float]] = {}
    for lv in levels:
        z0 = z + disc_h
        extents[lv] = (z0, z0 + body_h)
        z = z0 + body_h
    z_top = z + (disc_h + 12.0 if top_partial else 6.0)  # a cut T12 body at the top
    positions = np.arange(0.0, z_top, slice_mm)
    yy, xx = np.mgrid[0:size, 0:size]
    cx, cy = size / 2, size * 0.45
    rx, ry = 24.0 / px, 17.0 / px
    ell = ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2
    body = ell <= 1.0
    shell = body & (ell >= (1 - 2.2 / 17.0) ** 2)
    arch = (((xx - cx) / (14 / px)) ** 2 + ((yy - (cy + 30 / px)) / (10 / px)) ** 2 <= 1.0) & \
           (((xx - cx) / (9 / px)) ** 2 + ((yy - (cy + 30 / px)) / (6 / px)) ** 2 > 1.0)
    soft = ((xx - cx) / (size * 0.48)) ** 2 + ((yy - size / 2) / (size * 0.40)) ** 2 <= 1.0
    aorta = ((xx - cx - 6 / px) ** 2 + (yy - (cy - 17 / px - 4 / px - 12 / px)) ** 2) <= (12 / px) ** 2
    vol = np.full((len(positions), size, size), -1000.0, dtype=np.float32)
    for k, zk in enumerate(positions):
        sl = vol[k]
        sl[soft] = 40.0
        if aorta_hu is not None:
            sl[aorta] = aorta_hu
        if specks:
            sl[int(cy) + int(rng.integers(-5, 6)), int(cx + 70 / px) + int(rng.integers(0, 5))] = 450.0
        kind = None
        for lv, (a, b) in extents.items():
            if a <= zk <= b:
                kind = lv
                near_plate = min(zk - a, b - zk) < 1.5
                sl[body] = 700.0 if near_plate else TRAB[classes.get(lv, "normal")]
                sl[shell] = 700.0
                sl[arch] = 600.0
        if kind is None and zk < 20.0:  # sacrum + ilia: a wide bony block
            sl[body] = 250.0
            sl[shell] = 650.0
            wings = (np.abs(xx - cx) > 30 / px) & (np.abs(xx - cx) < 70 / px) & (np.abs(yy - cy) < 10 / px)
            sl[wings] = 600.0
        elif kind is None and zk > extents["L1"][1] + disc_h:  # T12, cut by the top of the stack
            sl[body] = 200.0
            sl[shell] = 700.0
        elif kind is None:
            sl[body] = 90.0  # disc
    vol += rng.normal(0.0, 20.0, vol.shape).astype(np.float32)
    mids = {lv: (a + b) / 2 for lv, (a, b) in extents.items()}
    return vol, positions, mids


# --------------------------------------------------------------------------- level finding


@pytest.mark.parametrize("slice_mm", [1.0, 2.5])
def test_levels_found_and_named_from_sacrum(slice_mm: float) -> None:
    classes = {"L1": "osteoporosis", "L2": "osteoporosis", "L3": "osteopenia", "L4": "normal", "L5": "osteoporosis"}
    vol, pos, mids = lumbar_phantom(classes, slice_mm=slice_mm)
    geom = find_levels(vol, pos, (0.8, 0.8))
    names = {r.name: r for r in geom.runs}
    assert set(names) == {"L1", "L2", "L3", "L4", "L5"}
    assert geom.anchor == "sacrum" and geom.sacrum is not None and geom.sacrum.center_mm < mids["L5"]
    for lv, z in mids.items():
        assert abs(names[lv].center_mm - z) < 4.0, (lv, names[lv], z)
    assert [r.name for r in geom.runs] == ["L1", "L2", "L3", "L4", "L5"]  # superior first


def test_levels_survive_an_arterial_aorta_and_bright_specks() -> None:
    """A 350 HU aorta in front of the spine (in the midline slab) and lateral specks must not move the levels.

    Before bone components were told apart, the aorta was taken for the anterior cortex on every slice (so the
    discs showed bone and the bodies merged) and a single bright voxel 70 mm lateral made L5 "thoracic".
    """
    classes = {"L1": "osteoporosis", "L2": "normal", "L3": "osteopenia", "L4": "osteoporosis", "L5": "normal"}
    vol, pos, mids = lumbar_phantom(classes, slice_mm=2.5, size=200, aorta_hu=350.0, specks=True)
    geom = find_levels(vol, pos, (0.8, 0.8))
    names = {r.name: r for r in geom.runs}
    assert set(names) == {"L1", "L2", "L3", "L4", "L5"} and geom.anchor == "sacrum"
    for lv, z in mids.items():
        assert abs(names[lv].center_mm - z) < 4.0, (lv, names[lv], z)
    # the anterior cortex is the body's (row 69 at the midline), not the aorta's front (row 39)
    assert 64 <= np.median(geom.anterior_row) <= 80, geom.anterior_row


def test_osteoporotic_bodies_are_not_mistaken_for_discs() -> None:
    """Trabecular HU of osteoporosis (70) is below the disc's (90): the profile uses the cortex, not the mean."""
    vol, pos, mids = lumbar_phantom({lv: "osteoporosis" for lv in ("L1", "L2", "L3", "L4", "L5")})
    geom = find_levels(vol, pos, (0.8, 0.8))
    assert sorted(r.name for r in geom.runs) == ["L1", "L2", "L3", "L4", "L5"]


def test_body_runs_close_gaps_split_long_runs_and_drop_slivers() -> None:
    pos = np.arange(0, 120, 1.0)
    prof = np.zeros_like(pos)
    prof[10:40] = 5  # body 30 mm
    prof[25] = 0  # a 1 mm noise gap inside it: closed
    prof[50:54] = 5  # a 4 mm sliver: dropped
    prof[60:115] = 5  # 55 mm: two bodies whose disc was lost, split at the minimum
    prof[87] = 1
    runs = body_runs(prof, pos)
    spans = sorted((r.i0, r.i1) for r in runs)
    assert spans[0] == (10, 39)
    assert len(spans) == 3 and spans[1][1] < spans[2][0]
    assert all(r.height_mm >= 12 for r in runs)


def test_label_runs_anchors_ribs_then_sacrum_then_top() -> None:
    runs = [BodyRun(120, 140, 120, 140), BodyRun(80, 100, 80, 100), BodyRun(40, 60, 40, 60), BodyRun(5, 25, 5, 25)]
    named, sacrum, anchor = label_runs(runs, widths=[40, 40, 40, 42])
    assert (sacrum, anchor) == (None, "top")
    assert [r.name for r in named] == ["L1", "L2", "L3", "L4"]
    named, sacrum, anchor = label_runs(runs, widths=[40, 40, 40, 120])  # much wider lowest body: S1 with ilia
    assert sacrum is not None and anchor == "sacrum" and [r.name for r in named] == ["L3", "L4", "L5"]
    named, sacrum, anchor = label_runs(runs, widths=[90, 40, 40, 40])  # ribs on the top body: T12
    assert anchor == "ribs" and [r.name for r in named] == ["L1", "L2", "L3"]
    cut = [BodyRun(150, 159, 150, 160, partial=True)] + runs  # a body cut by the top of the stack is skipped
    named, _, anchor = label_runs(cut, widths=[40, 40, 40, 40, 40])
    assert anchor == "top" and [r.name for r in named] == ["L1", "L2", "L3", "L4"] and named[0].i0 == 120
    # a whole body (full height) that merely touches the top of the stack is L1, not a cut T12
    whole = [BodyRun(150, 170, 150, 170, partial=True)] + runs
    named, _, anchor = label_runs(whole, widths=[40, 40, 40, 40, 40])
    assert anchor == "top" and [r.name for r in named] == ["L1", "L2", "L3", "L4", "L5"] and named[0].i0 == 150


def test_select_slices_spreads_within_the_central_part() -> None:
    pos = np.arange(0, 100, 1.0)
    run = BodyRun(20, 49, 19.5, 49.5)
    picks = select_slices(run, pos, central_fraction=0.4, count=3)
    assert len(picks) == 3 and picks == sorted(picks)
    assert all(abs(pos[i] - run.center_mm) <= 0.2 * run.height_mm for i in picks)
    assert picks[-1] - picks[0] >= 8  # spread, not adjacent
    thin = BodyRun(10, 10, 9.9, 10.1)
    assert select_slices(thin, pos) == [10]


# --------------------------------------------------------------------------- detection post-processing and rules


def test_slice_scores_group_class_hypotheses_of_one_body() -> None:
    boxes = np.array([[10, 10, 50, 40], [11, 10, 50, 41], [12, 11, 49, 40], [200, 200, 240, 230]], float)
    labels = np.array([2, 1, 3, 3])
    scores = np.array([0.8, 0.3, 0.1, 0.95])
    det = slice_class_scores(boxes, labels, scores, slice_index=7, region=(0, 0, 100, 100))
    assert det is not None and det.slice_index == 7
    assert det.box == (10.0, 10.0, 50.0, 40.0)  # the out-of-region box is ignored despite its score
    np.testing.assert_allclose(det.probs, np.array([0.3, 0.8, 0.1]) / 1.2)
    assert slice_class_scores(boxes, labels, scores, region=(300, 300, 400, 400)) is None
    assert slice_class_scores(np.zeros((0, 4)), np.zeros(0), np.zeros(0)) is None


def test_vertebra_aggregation_and_patient_is_lowest() -> None:
    run = BodyRun(0, 10, 0, 10, name="L2")
    dets = [SliceDetection(3, (0, 0, 10, 10), np.array([0.6, 0.3, 0.1]), 0.9),
            SliceDetection(5, (1, 1, 11, 11), np.array([0.2, 0.6, 0.2]), 0.95)]
    v = aggregate_vertebra(run, dets)
    assert v is not None and v.level == "L2" and v.slice_index == 5 and v.box == (1, 1, 11, 11)
    np.testing.assert_allclose(v.probs, [0.4, 0.45, 0.15])
    assert v.class_name == "osteopenia"
    assert aggregate_vertebra(run, []) is None
    normal = aggregate_vertebra(BodyRun(0, 1, 0, 1, name="L1"), [SliceDetection(0, (0, 0, 1, 1), np.array([.9, .1, 0]), .9)])
    assert normal is not None
    cls, conf = patient_class([normal, v])
    assert cls == 1  # the lowest (most severe) of the vertebrae
    assert conf == pytest.approx(1 - 0.9 * 0.4)
    with pytest.raises(ValueError):
        patient_class([])


def test_paper_metrics_follow_their_definitions() -> None:
    gt = np.array([[0, 0, 10, 10], [20, 20, 30, 30]], float)
    s = SliceEval("a", pred_boxes=np.array([[0, 0, 10, 10], [20, 20, 30, 30], [50, 50, 60, 60]], float),
                  pred_labels=np.array([1, 3, 2]), pred_scores=np.array([0.9, 0.8, 0.7]),
                  gt_boxes=gt, gt_labels=np.array([1, 2]))
    m = paper_metrics([s])
    # class1: TP1 FP0 FN0 TN1; class2: TP0 FP1 (stray box) FN1 TN1; class3: TP0 FP1 FN0 TN1
    assert m["paper_map"] == pytest.approx(100 * (1 + 0 + 0) / 3)
    assert m["paper_recall"] == pytest.approx(100 * (1 + 0) / 2)  # class 3 has no positives: left out
    assert m["paper_acc"] == pytest.approx(100 * (0.5 + 0 + 0) / 3)


def test_level_accuracy_needs_every_level_right() -> None:
    truth = [{"L1": 100.0, "L2": 70.0}, {"L1": 100.0, "L2": 70.0}]
    pred = [{"L1": 103.0, "L2": 69.0}, {"L1": 70.0, "L2": 40.0}]
    assert level_accuracy(pred, truth) == 0.5


# --------------------------------------------------------------------------- synthetic studies, oracle detector, tiny bundle

SYNTH = {"n": 192, "pixel_spacing": 0.9, "thickness": 3.0}  # realistic in-plane spacing, small matrix


@pytest.fixture(scope="module")
def spine_data(tmp_path_factory: pytest.TempPathFactory):
    """Four small synthetic lumbar CT studies (128x128, 3 mm) and their records."""
    from training.data import load_records
    from training.synth import spine_bmd as synth

    root = tmp_path_factory.mktemp("spine_synth")
    synth.generate(root, 4, seed=5, workers=1, params=SYNTH)
    return root, load_records(root)


class OracleDetector:
    """Test double of the detector: for a prepared slice it knows, returns that level's true box and class."""

    def __init__(self, table: list[tuple[np.ndarray, tuple[float, float, float, float], int]]) -> None:
        self.table = table

    def __call__(self, images):  # noqa: ANN001, ANN204 - torchvision detector call convention
        import torch

        outs = []
        for img in images:
            arr = img[0].numpy()
            hits = [(box, cls) for ref, box, cls in self.table if ref.shape == arr.shape and np.allclose(ref, arr)]
            boxes = [h[0] for h in hits[:1]]
            outs.append({"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
                         "labels": torch.tensor([h[1] + 1 for h in hits[:1]], dtype=torch.int64),
                         "scores": torch.tensor([0.9] * len(boxes), dtype=torch.float32)})
        return outs


def test_pipeline_with_oracle_detector_measures_hu_and_classes(spine_data) -> None:
    """Levels, slice choice, box grouping, ROI HU and the patient rule on generator studies with a perfect detector."""
    from inference.tasks.spine_bmd import SpineParams, analyze_volume, anterior_is_up, prepare_slice
    from training.tasks.spine_bmd import _load, study_truth

    _, records = spine_data
    params = SpineParams(image_size=192)
    for rec in records:
        series, vol, pos, sop = _load(rec)
        truth = study_truth(rec.row, sop, pos)
        levels = rec.row["levels"]
        table = []
        for lv, info in levels.items():
            a, b = info["slices"]
            box = next(tuple(bx for bx in (x["x0"], x["y0"], x["x1"], x["y1"])) for x in rec.row["boxes"]
                       if x["level"] == lv)
            for i in range(a, b + 1):
                img, scale = prepare_slice(vol[i], params)
                table.append((img, tuple(v * scale for v in box), truth["classes"][lv]))
        res = analyze_volume(OracleDetector(table), "cpu", vol, pos, (series.spacing[1], series.spacing[2]), params,
                             anterior_up=anterior_is_up(series))
        got = {v.level: v for v in res.vertebrae}
        assert set(got) == set(truth["classes"]) & {"L1", "L2", "L3", "L4"}, (rec.key, res.geometry.runs)
        for lv, v in got.items():
            assert v.class_index == truth["classes"][lv]
            assert v.probability == pytest.approx(1.0)
            assert abs(v.mean_hu - levels[lv]["trabecular_hu"]) < 30.0, (lv, v.mean_hu, levels[lv]["trabecular_hu"])
            assert abs(pos[v.slice_index] - truth["mid_mm"][lv]) < 0.25 * v.run.height_mm + 3.0
        worst = max(truth["classes"][lv] for lv in got)
        assert res.patient == (worst, pytest.approx(1.0))
        assert len(res.detector_slices) <= 3 * 4  # only the mid-body slices went through the detector


@pytest.fixture(scope="module")
def tiny_bundle(spine_data, tmp_path_factory: pytest.TempPathFactory):
    """A light DSNet trained for two steps on the synthetic studies (hold-out: one study)."""
    import torch

    from training.data import SplitConfig, split_records
    from training.tasks.spine_bmd import SpineBmdAdapter
    from training.trainer import TrainConfig, train

    torch.set_num_threads(2)
    _, records = spine_data
    adapter = SpineBmdAdapter()
    tcfg = adapter.config({"variant": "light", "image_size": 128, "box_score_thresh": 0.0})
    cfg = TrainConfig(epochs=1, batch_size=2, max_steps_per_epoch=2, optimizer="sgd", lr=0.01, device="cpu",
                      version="spine-tiny", split=SplitConfig(train=0.75, val=0.0, holdout=0.25))
    out = tmp_path_factory.mktemp("spine_bundle") / "bundle"
    result = train(adapter, split_records(records, cfg.split), out, cfg, tcfg)
    return result, split_records(records, cfg.split)


def test_tiny_bundle_metrics_and_card(tiny_bundle) -> None:
    result, _ = tiny_bundle
    m = result.metrics
    for key in ("map50", "paper_map", "paper_recall", "paper_acc", "vertebra_macro_f1", "vertebra_kappa",
                "sensitivity_per_class", "level_accuracy", "confusion_matrix", "patient_macro_f1",
                "patient_kappa_quadratic"):
        assert key in m, key
    assert m["level_accuracy"] == 1.0  # levels come from the profile pass, not from the barely trained detector
    meta = __import__("inference.bundle", fromlist=["read_meta"]).read_meta(result.bundle_dir)
    assert meta.architecture == "spine_detector" and meta.init_args["trunk"] == "resnet18"
    assert meta.input.window == (500.0, 2000.0) and meta.train_config["optimizer"] == "sgd"
    assert "dice loss" in (result.bundle_dir / "card.md").read_text()


def test_analyze_writes_valid_sr_and_sc(tiny_bundle, tmp_path, dciodvfy) -> None:
    """`dicomnode analyze` with the tiny bundle: SR with per-vertebra groups (site, class, HU, probability), SC."""
    import highdicom as hd
    import pydicom

    from dicomnode.cli import main

    result, split = tiny_bundle
    study = split.holdout[0]
    out = tmp_path / "out"
    src = tmp_path / "study"
    src.mkdir()
    for f in study.files:
        (src / f.name).write_bytes(f.read_bytes())
    assert main(["analyze", str(src), "--task", "spine_bmd", "--out", str(out), "--model", str(result.bundle_dir),
                 "--device", "cpu"]) == 0
    srs, scs = sorted(out.glob("SR_*.dcm")), sorted(out.glob("*.dcm"))
    assert len(srs) == 1 and len(scs) >= 2
    for f in scs:
        dciodvfy(f)
    sr = hd.sr.Comprehensive3DSR.from_dataset(pydicom.dcmread(srs[0]))
    groups = sr.content.get_planar_roi_measurement_groups()
    assert sr.content.get_image_measurement_groups() == []  # every group has its region (OHIF needs one)
    sites = {fs.value.value for g in groups for fs in (g.finding_sites or [])}
    found = {"66794005", "14293000", "36470004", "11994002"} & sites
    assert found, sites  # L1..L4 codes
    # the patient-level class (lumbar spine) is a conclusion in the document-level "Qualitative Evaluations"
    (conclusions,) = [i for i in sr.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "C0034375"]
    assert any("(Lumbar spine): probability" in str(i.get("TextValue", "")) for i in conclusions.ContentSequence)
    units = {m.unit.value for g in groups for m in g.get_measurements()}
    assert any(m.name.value == "112031" and m.unit.value == "[hnsf'U]" for g in groups for m in g.get_measurements())
    assert "[hnsf'U]" in units and "%" in units
    values = {g.finding_type.meaning for g in groups}
    assert values & {"Normal", "Osteopenia", "Osteoporosis"}
    sc = [pydicom.dcmread(f) for f in scs if f not in srs]
    assert any(ds.Modality == "OT" or "SecondaryCapture" in str(ds.SOPClassUID.name).replace(" ", "") for ds in sc)


def test_backbone_shortcut_and_faithful_defaults() -> None:
    """`train spine_bmd --backbone X` picks the variant; the paper's SGD/lr/batch/epochs are the defaults."""
    import argparse

    from dicomnode.errors import DicomNodeError
    from training.tasks.spine_bmd import SpineBmdAdapter
    from training.train_cli import add_arguments, build_configs

    p = argparse.ArgumentParser()
    add_arguments(p)
    adapter = SpineBmdAdapter()
    cfg, tcfg = build_configs(adapter, p.parse_args(["spine_bmd", "--data", "d", "--out", "o", "--backbone",
                                                     "resnet50_sk"]))
    assert tcfg.backbone == "resnet50_sk" and tcfg.variant == "faithful"
    assert (cfg.optimizer, cfg.lr, cfg.batch_size, cfg.epochs) == ("sgd", 0.01, 9, 100)
    assert adapter.architecture(tcfg)[1]["backbone"] == "resnet50_sk"
    with pytest.raises(DicomNodeError):
        build_configs(adapter, p.parse_args(["spine_bmd", "--data", "d", "--out", "o", "--backbone", "vgg"]))


def test_default_augmentation_keeps_the_hu_that_is_the_label() -> None:
    """The class is the trabecular HU: the default training transform may flip, never change intensities."""
    import torch

    from training.tasks.spine_bmd import SpineBmdAdapter, SpineBmdConfig, augment

    img = torch.linspace(0.0, 1.0, 64 * 48).reshape(1, 64, 48)
    sample = {"image": img, "boxes": torch.tensor([[4.0, 5.0, 20.0, 30.0]]), "labels": torch.tensor([2])}
    transform = SpineBmdAdapter().train_transform(SpineBmdConfig())
    torch.manual_seed(0)
    for _ in range(8):
        out = transform(sample)
        assert torch.equal(torch.sort(out["image"].ravel()).values, torch.sort(img.ravel()).values)
    # with jitter switched on the values do change (the test above can fail)
    torch.manual_seed(0)
    jittered = [augment(sample, hflip=False, jitter=0.05)["image"] for _ in range(8)]
    assert any(not torch.equal(j, img) for j in jittered)


def test_compare_table_from_a_real_evaluation(tiny_bundle, spine_data, tmp_path) -> None:
    """`evaluate` records backbone and variant, so `compare` names the row and puts the paper's Table 1 beside it."""
    from training.compare import compare, load_evaluation, table_md
    from training.evaluate import evaluate_bundle

    result, _ = tiny_bundle
    root, _ = spine_data
    ev = evaluate_bundle(result.bundle_dir, root, tmp_path / "eval", device="cpu")
    table = compare([load_evaluation(tmp_path / "eval")])
    ours = [r for r in table["rows"] if r["source"] == "ours"]
    assert [r["name"] for r in ours] == ["resnet50_ds (light) spine-tiny"]
    assert ours[0]["values"]["vertebra_macro_f1"] == pytest.approx(ev.result.metrics["vertebra_macro_f1"])
    assert ours[0]["values"]["level_accuracy"] == 1.0
    assert len(table["rows"]) == 1 + 4 and "paper resnet50_se (source document)" in table_md(table)


def test_choose_class_offsets_corrects_an_under_called_class() -> None:
    """A reader that under-calls osteopenia gets a positive osteopenia offset and a higher macro-F1."""
    from inference.tasks.spine_bmd_levels import decide_class
    from training.metrics import macro_f1
    from training.tasks.spine_bmd import choose_class_offsets

    rng = np.random.default_rng(0)
    y = np.repeat([0, 1, 2], [40, 30, 15])
    p = np.full((y.size, 3), 0.1)
    p[np.arange(y.size), y] = rng.uniform(0.45, 0.8, y.size)
    p[y == 1, 0] += 0.5  # osteopenia looks "normal" to this reader
    p /= p.sum(1, keepdims=True)
    before = macro_f1(y, decide_class(p), 3)
    off = choose_class_offsets(y, p)
    assert off[0] == 0.0 and off[1] > 0.0
    assert macro_f1(y, decide_class(p, off), 3) > before + 0.2
    clean = np.eye(3)[y] * 0.8 + 0.2 / 3
    assert choose_class_offsets(y, clean) == (0.0, 0.0, 0.0)  # nothing to correct: no shift
    # the adapter's tune step (after training, and `dicomnode-train retune`) records them only when asked
    from training.adapter import EvalResult
    from training.tasks.spine_bmd import SpineBmdAdapter, SpineBmdConfig

    val = EvalResult(metrics={}, y_true=y, y_prob=p)
    assert SpineBmdAdapter().tune(val, SpineBmdConfig()) == (SpineBmdConfig(), "")
    tuned, note = SpineBmdAdapter().tune(val, SpineBmdConfig(tune_class_offsets=True))
    assert tuned.class_log_offsets == off and "macro-F1" in note and "85 vertebrae" in note
    assert {"class_log_offsets", "tune_class_offsets"} <= SpineBmdConfig.after_training


def test_bundle_class_offsets_reach_the_decision(spine_data) -> None:
    """task_config.class_log_offsets -> SpineParams -> every vertebra's class; bad offsets are a BundleError."""
    from inference.bundle import BundleMeta, InputSpec
    from inference.errors import BundleError
    from inference.tasks.spine_bmd import SpineParams, analyze_volume, anterior_is_up, prepare_slice
    from training.tasks.spine_bmd import _load, study_truth

    meta = BundleMeta(task="spine_bmd", version="v", architecture="spine_detector",
                      input=InputSpec(window=(500.0, 2000.0), extra={"image_size": 999, "min_slices": 999}),
                      task_config={"class_log_offsets": [0.0, 0.0, 60.0], "image_size": 192})
    params = SpineParams.from_meta(meta)  # the settings are task_config's; input.extra (an old copy) is not read
    assert params.class_log_offsets == (0.0, 0.0, 60.0) and params.image_size == 192 and params.min_slices == 20
    for bad in ([0.0, 1.0], [0.0, "x", 1.0], [0.0, float("nan"), 0.0]):
        with pytest.raises(BundleError, match="class_log_offsets"):
            SpineParams.from_meta(meta.model_copy(update={"task_config": {"class_log_offsets": bad}}))
    _, records = spine_data
    rec = records[0]
    series, vol, pos, sop = _load(rec)
    truth = study_truth(rec.row, sop, pos)
    table = []
    for lv, info in rec.row["levels"].items():
        a, b = info["slices"]
        box = next((x["x0"], x["y0"], x["x1"], x["y1"]) for x in rec.row["boxes"] if x["level"] == lv)
        for i in range(a, b + 1):
            img, scale = prepare_slice(vol[i], params)
            table.append((img, tuple(v * scale for v in box), truth["classes"][lv]))
    spacing = (series.spacing[1], series.spacing[2])
    plain = analyze_volume(OracleDetector(table), "cpu", vol, pos, spacing, SpineParams(image_size=192),
                           anterior_up=anterior_is_up(series))
    shifted = analyze_volume(OracleDetector(table), "cpu", vol, pos, spacing, params, anterior_up=anterior_is_up(series))
    assert [v.class_index for v in plain.vertebrae] == [truth["classes"][v.level] for v in plain.vertebrae]
    assert shifted.vertebrae and all(v.class_name == "osteoporosis" for v in shifted.vertebrae)
    assert shifted.patient is not None and shifted.patient[0] == 2


def test_the_backbone_comparison_shares_every_weight_but_the_attention() -> None:
    """The recipe's ``init_skip=[backbone.body.attn_*]`` names exactly the weights the four variants do not share."""
    import fnmatch

    from training.tasks import get_adapter

    adapter = get_adapter("spine_bmd")
    keys = {bb: set(adapter.build_model(adapter.config_model(variant="light", backbone=bb, image_size=128))
                    .state_dict())
            for bb in ("resnet50", "resnet50_se", "resnet50_sk", "resnet50_ds")}
    plain = keys.pop("resnet50")
    assert not any(fnmatch.fnmatchcase(k, "backbone.body.attn_*") for k in plain)
    for bb, names in keys.items():
        extra = names - plain
        assert extra and plain <= names, bb
        assert all(fnmatch.fnmatchcase(k, "backbone.body.attn_*") for k in extra), bb


def test_patient_metrics_score_the_lowest_class_against_the_manifest() -> None:
    from training.tasks.spine_bmd import _patient_metrics

    # normal, osteopenia, osteoporosis = 0, 1, 2; one osteopenia patient called osteoporotic
    m = _patient_metrics([0, 0, 1, 1, 2, 2], [0, 0, 1, 2, 2, 2], 3)
    # F1: normal 1.0, osteopenia 2/3 (1 TP, 1 FN), osteoporosis 0.8 (2 TP, 1 FP)
    assert m["patient_macro_f1"] == pytest.approx((1.0 + 2 / 3 + 0.8) / 3)
    # quadratic weights (i-j)^2/4: observed 1 x 1/4, expected (marginals 2,2,2 x 2,1,3 / 6) 2.25 -> 1 - 0.25/2.25
    assert m["patient_kappa_quadratic"] == pytest.approx(1 - 1 / 9)
    perfect = _patient_metrics([0, 1, 2], [0, 1, 2], 3)
    assert perfect == {"patient_macro_f1": 1.0, "patient_kappa_quadratic": 1.0}
    assert all(np.isnan(v) for v in _patient_metrics([], [], 3).values())


def test_level_wording_names_the_most_probable_class_when_the_operating_point_chose_another() -> None:
    from inference.tasks.spine_bmd import level_statement
    from inference.tasks.spine_bmd_levels import VertebraResult

    plain = VertebraResult("L1", np.array([0.83, 0.15, 0.02]), 3, (0, 0, 1, 1), [3], None, mean_hu=169.4)
    assert level_statement(plain) == "L1 normal (p=0.83; 169 HU)"
    shifted = VertebraResult("L2", np.array([0.70, 0.27, 0.03]), 5, (0, 0, 1, 1), [5], None, mean_hu=None,
                             log_offsets=(0.0, 1.35, 2.25))
    assert shifted.class_name == "osteopenia"
    assert level_statement(shifted) == "L2 osteopenia (p=0.27, normal p=0.70)"
