"""Issue 34: anatomical and scanner variation, label-independent confounders, fracture types and the per-view
visibility flag of the wrist and physis radiograph generators."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest

from training.synth import fractures as fr
from training.synth import physis_fracture, wrist_fracture
from training.synth import radiograph as rg
from training.synth import radiograph_texture as rt
from training.synth import wrist_phantom as wp
from training.synth.manifest import read_manifest

PA, LAT = rg.view_matrix(False, 0.0), rg.view_matrix(True, 0.0)


def test_shape_modes_and_pose_vary_between_subjects() -> None:
    rng = np.random.default_rng(1)
    shapes = [wp.draw_shape(rng, 40.0) for _ in range(200)]
    for name in ("radius_width", "radius_length", "ulna_width", "carpal_size", "ulnar_variance", "flexion",
                 "deviation"):
        assert np.std([getattr(s, name) for s in shapes]) > 0.03, name
    assert all(s.physis_offset == 0 for s in shapes)
    assert np.std([wp.draw_shape(rng, 10.0).physis_offset for _ in range(50)]) > 0.3
    old = [wp.draw_shape(rng, 85.0).degeneration for _ in range(200)]
    young = [wp.draw_shape(rng, 25.0).degeneration for _ in range(200)]
    assert np.mean(np.array(old) > 0) > 0.4 and not any(young)

    def capitate(shape: wp.Shape) -> np.ndarray:
        w = wp.wrist_anatomy(np.random.default_rng(5), 40.0, shape)
        return next(p.center for p in w.other if p.tag == "capitate")

    base = wp.Shape(1, 1, 1, 1, 0, 0, 0, 0, 0)
    flexed = wp.Shape(1, 1, 1, 1, 0, 0, 25, 0, 0)
    deviated = wp.Shape(1, 1, 1, 1, 0, 0, 0, 15, 0)
    assert abs(capitate(flexed)[2] - capitate(base)[2]) > 2  # palmar flexion moves the carpus out of the plane
    assert abs(capitate(deviated)[0] - capitate(base)[0]) > 2
    long_ulna = wp.wrist_anatomy(np.random.default_rng(5), 40.0, wp.Shape(1, 1, 1, 1, 2.5, 0, 0, 0, 0))
    styloid = next(p.center[1] for p in long_ulna.other if p.tag == "ulna_styloid")
    ref = next(p.center[1] for p in wp.wrist_anatomy(np.random.default_rng(5), 40.0, base).other
               if p.tag == "ulna_styloid")
    assert styloid == pytest.approx(ref - 2.5)  # positive ulnar variance: the ulna reaches further distally
    degenerate = wp.wrist_anatomy(np.random.default_rng(5), 70.0, wp.Shape(1, 1, 1, 1, 0, 0, 0, 0, 1.0))
    assert any(p.tag.startswith("osteophyte") for p in degenerate.other)


def test_cancellous_bone_carries_a_trabecular_texture_only_inside_bone() -> None:
    w = wp.wrist_anatomy(np.random.default_rng(2), 50.0)
    assert any(p.texture > 0 for p in w.radius) and all(p.texture == 0 for p in w.soft)
    det = rg.Detector(200, 400, 0.35, cx=0.0, cy=10.0)  # 140 mm wide: air at both sides
    bones = [*w.radius, *w.other]
    trab = rt.trabecular_map(bones, PA, det)
    assert trab is not None and trab.max() > 0.3 and trab[:, :5].max() == 0  # air beside the forearm: none
    bone_li = rg.project(bones, PA, det)
    soft_li = rg.project([], PA, det, smooth=w.soft)
    sc = rt.Scanner(55, 2, "DX", 1e7, 0.5, 0.0, 6.0, 0.0, 0.0)  # near noise-free, no processing
    with_tex, _ = rt.acquire(np.random.default_rng(3), bone_li, soft_li, det, sc, trabecular=trab)
    plain, _ = rt.acquire(np.random.default_rng(3), bone_li, soft_li, det, sc, trabecular=trab * 0)
    diff = np.abs(with_tex - plain)
    inside, outside = trab > 0.5, trab == 0
    assert diff[inside].mean() > 0.02 and diff[inside].mean() > 20 * diff[outside].mean()


def test_scanner_variation_kvp_detector_and_processing() -> None:
    rng = np.random.default_rng(4)
    dx = [rt.draw_scanner(rng, "DX", 0.5, v % 5) for v in range(50)]
    cr = [rt.draw_scanner(rng, "CR", 0.5, 3) for _ in range(20)]
    assert np.ptp([s.kvp for s in dx]) > 10 and np.ptp([s.photons for s in dx]) > 3000
    assert min(s.blur_px for s in cr) > max(s.blur_px for s in dx) and all(s.grain > 0 for s in cr)
    assert all(s.grain == 0 for s in dx) and len({round(s.unsharp_sigma) for s in dx}) >= 4
    assert dx[0].bone_contrast != dx[1].bone_contrast  # kVp changes bone contrast
    hi = rt.Scanner(66, 2, "DX", 5000, 0.5, 0.5, 6, 0.5, 0)
    lo = rt.Scanner(48, 2, "DX", 5000, 0.5, 0.5, 6, 0.5, 0)
    assert lo.bone_contrast / lo.soft_contrast > hi.bone_contrast / hi.soft_contrast


@pytest.fixture(scope="module")
def forced(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[dict], list[dict], Path]:
    root = tmp_path_factory.mktemp("forced")
    neg = wrist_fracture.generate(root / "neg", 40, 31, workers=1, label_noise=0.0, params={"force_label": 0})
    pos = wrist_fracture.generate(root / "pos", 40, 31, workers=1, label_noise=0.0, params={"force_label": 1})
    return read_manifest(neg.parent), read_manifest(pos.parent), root


def test_confounders_and_scanner_do_not_depend_on_the_label(forced: tuple[list[dict], list[dict], Path]) -> None:
    neg, pos, root = forced
    for a, b in zip(neg, pos, strict=True):  # the same seed with the other label: the same confounders and views
        assert (a["cast"], a["implant"], len(a["views"])) == (b["cast"], b["implant"], len(b["views"]))
        assert a["label"] == 0 and b["label"] == 1
    assert any(r["cast"] for r in neg) and any(r["implant"] for r in neg)
    kvps = {str(pydicom.dcmread(f, stop_before_pixels=True).KVP) for f in sorted((root / "neg").rglob("*.dcm"))}
    assert len(kvps) > 5


def test_wrist_fracture_types_and_findings() -> None:
    rng = np.random.default_rng(6)
    w = wp.wrist_anatomy(rng, 60.0)
    draws = [fr.wrist_fracture(rng, w, 0.3) for _ in range(300)]
    findings = {f for d in draws for f in d.findings}
    assert {"line", "impaction", "dorsal_tilt", "volar_tilt", "comminution", "ulnar_styloid"} <= findings
    undisplaced = np.mean([d.kind == "undisplaced" for d in draws])
    assert 0.2 < undisplaced < 0.5  # default: about a third undisplaced
    assert np.mean([fr.wrist_fracture(rng, w, 0.9).kind == "undisplaced" for _ in range(200)]) > 0.6
    distances = [d.cuts[0].center[1] - w.articular_y for d in draws]
    assert min(distances) < 10 and max(distances) > 28
    tilt = next(d for d in draws if "dorsal_tilt" in d.findings and "comminution" not in d.findings
                and "ulnar_styloid" not in d.findings)
    cut = tilt.cuts[0]
    assert abs(cut.angle) >= 5
    cut.gap, cut.delta = 0.0, np.zeros(3)  # the tilt alone: seen on the lateral, not on the PA
    assert fr.visible_sites(tilt, LAT)["radius"] and not fr.visible_sites(tilt, PA)["radius"]
    bones, other, sites = fr.apply(tilt, w.radius, w.epiphyses, w.other)
    assert len(bones) > len(w.radius) and "radius" in sites
    styl = next(d for d in draws if "ulnar_styloid" in d.findings)
    _, other, sites = fr.apply(styl, w.radius, w.epiphyses, w.other)
    assert "ulna_styloid" in sites and sum(p.tag == "ulna_styloid" for p in other) == 4  # two fragments


def _paed(kind: str, seed: int = 8) -> tuple[wp.Wrist, fr.Fracture]:
    rng = np.random.default_rng(seed)
    for _ in range(500):
        w = wp.wrist_anatomy(rng, 10.0)
        fx = fr.paediatric_fracture(rng, w, 0.5)
        if fx.kind == kind:
            return w, fx
    raise AssertionError(kind)


def test_paediatric_kinds_follow_the_emergency_mix() -> None:
    rng = np.random.default_rng(9)
    w = wp.wrist_anatomy(rng, 9.0)
    kinds = [fr.paediatric_fracture(rng, w, 0.5).kind for _ in range(600)]
    assert set(kinds) == set(fr.PAED_KINDS)
    assert 0.3 < kinds.count("buckle") / 600 < 0.5 and kinds.count("sh2") > kinds.count("sh1")


def test_visibility_is_per_view() -> None:
    w, fx = _paed("buckle")
    fx.bulges = [fr.Bulge(np.zeros(3), np.array([0.0, 0.0, 1.0]), 1.0)]  # a dorsal bulge only
    assert fr.visible_in(fx, LAT) and not fr.visible_in(fx, PA)
    fx.bulges = [fr.Bulge(np.zeros(3), np.array([1.0, 0.0, 0.0]), 1.0)]  # a radial bulge only
    assert fr.visible_in(fx, PA) and not fr.visible_in(fx, LAT)
    w, sh1 = _paed("sh1")
    sh1.widening, sh1.cuts[0].delta = 0.0, np.array([0.0, 0.0, 1.5])  # dorsal slip without widening
    assert fr.visible_in(sh1, LAT) and not fr.visible_in(sh1, PA)
    sh1.cuts[0].delta = np.array([0.0, -0.2, 0.2])  # undisplaced: invisible in both views
    sh1.widening = 0.2
    assert not fr.visible_in(sh1, LAT) and not fr.visible_in(sh1, PA)
    sh1.widening = 1.0  # a widened physis shows everywhere
    assert fr.visible_in(sh1, LAT) and fr.visible_in(sh1, PA)


@pytest.fixture(scope="module")
def physis_forced(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    root = tmp_path_factory.mktemp("physis_forced")
    return read_manifest(physis_fracture.generate(root, 40, 17, workers=1, label_noise=0.0,
                                                  params={"force_label": 1}).parent)


def test_physis_image_labels_follow_per_view_visibility(physis_forced: list[dict]) -> None:
    rows = physis_forced
    assert all(r["study_fracture"] == 1 for r in rows)
    hidden = [r for r in rows if not r["fracture_visible"]]
    assert hidden, "some fractures must be invisible in some views"
    assert all(r["label"] == 0 and not any(b["label"] == "fracture" for b in r["boxes"]) for r in hidden)
    shown = [r for r in rows if r["fracture_visible"]]
    assert len(shown) > len(rows) / 3
    assert all(r["label"] == 1 and any(b["label"] == "fracture" for b in r["boxes"]) for r in shown)
    by_study: dict[str, set[int]] = {}
    for r in rows:
        by_study.setdefault(r["study_uid"], set()).add(r["fracture_visible"])
    assert any(v == {0, 1} for v in by_study.values()), "a fracture seen in one view only"
    assert len({r["fracture_kind"] for r in rows}) >= 4
