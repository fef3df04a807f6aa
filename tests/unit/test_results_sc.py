"""RGB secondary-capture overlays: DICOM content, dciodvfy, burned-in drawing, golden-image rendering."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from scipy import ndimage

from dicomnode.cli import main as cli_main
from dicomnode.results import ResultContext
from dicomnode.results import codes as rc
from dicomnode.results.builder import build_results
from dicomnode.results.layout import font as layout_font
from dicomnode.results.layout import inside, overlaps, place_labels
from dicomnode.results.render import render_file
from dicomnode.results.sc import compose, compose_layout, header_lines
from inference.findings import FRACTURE, PRESENT, Box, Classification, Findings, ImageRef, Overlay, Panel
from inference.palette import colour_for
from tests.unit._results_sources import dx_image, volume_series

GOLDEN = Path(__file__).parent / "golden"
SC_IMAGE = "1.2.840.10008.5.1.4.1.1.7"


def _save(ds, tmp_path, dciodvfy, name):
    path = tmp_path / name
    ds.save_as(path, enforce_file_format=True)
    dciodvfy(path)
    return path


def _scs(objects):
    return [o for o in objects if o.SOPClassUID == SC_IMAGE]


def _ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Mean structural similarity of two greyscale images in [0, 1] (7x7 windows)."""
    c1, c2 = 0.01**2, 0.03**2
    mu_a, mu_b = ndimage.uniform_filter(a, 7), ndimage.uniform_filter(b, 7)
    var_a = ndimage.uniform_filter(a * a, 7) - mu_a**2
    var_b = ndimage.uniform_filter(b * b, 7) - mu_b**2
    cov = ndimage.uniform_filter(a * b, 7) - mu_a * mu_b
    ssim = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return float(ssim.mean())


def _wrist():
    dx = dx_image(rows=96, cols=72)
    ref = ImageRef(str(dx.SOPInstanceUID))
    heat = np.zeros((12, 9), np.float32)
    heat[2:5, 5:8] = 1.0  # upper right, away from the centre
    f = Findings(
        "wrist_fracture", "WristNet", "0.3", str(dx.StudyInstanceUID), (ref,),
        classifications=[Classification(FRACTURE, PRESENT, 0.83, images=(ref,))],
        overlays=[Overlay([Panel(image=ref, heatmap=heat, caption="P(fracture) = 0.83")], "fracture probability 0.83",
                          derived_from=(ref,))],
    )
    return dx, f


def test_wrist_heatmap_sc(tmp_path, dciodvfy):
    dx, f = _wrist()
    ctx = ResultContext(series_numbers={"sc": 9302})
    (sc,) = _scs(build_results(f, [dx], ctx))
    path = _save(sc, tmp_path, dciodvfy, "sc.dcm")
    ds = pydicom.dcmread(path)
    assert ds.SOPClassUID == SC_IMAGE
    assert (ds.PhotometricInterpretation, ds.SamplesPerPixel, ds.BitsAllocated) == ("RGB", 3, 8)
    assert ds.BurnedInAnnotation == "YES"
    assert ds.SeriesDescription == "AI wrist_fracture SC v0.3"
    assert ds.SeriesNumber == 9302 and ds.SeriesInstanceUID == ctx.series_uids["sc"]
    assert ds.SeriesInstanceUID != dx.SeriesInstanceUID
    assert ds.StudyInstanceUID == dx.StudyInstanceUID
    assert str(ds.PatientName) == "Müller^Jörg" and ds.SpecificCharacterSet == "ISO_IR 100"
    assert ds.PatientID == dx.PatientID and ds.AccessionNumber == dx.AccessionNumber
    assert list(ds.PatientOrientation) == ["A", "F"]
    assert ds.SourceImageSequence[0].ReferencedSOPInstanceUID == dx.SOPInstanceUID
    assert ds.Manufacturer == ctx.manufacturer and ds.SoftwareVersions == ctx.software_version

    rgb = ds.pixel_array
    assert rgb.ndim == 3 and rgb.shape[2] == 3
    # banner: yellow text on black at the top
    top = rgb[:20]
    assert ((top[..., 0] > 200) & (top[..., 1] > 150) & (top[..., 2] < 80)).sum() > 30
    # the panel: MONOCHROME1 source inverted from the header, so the dense centre is bright
    h, w = 384, 288  # 96 x 72 source scaled to the minimum overlay size, centred under the banner
    x0 = (rgb.shape[1] - w) // 2
    body = rgb[rgb.shape[0] - h:, x0:x0 + w]
    grey = body.astype(float).mean(axis=2)
    centre = grey[h // 2 - 5:h // 2 + 5, w // 2 - 5:w // 2 + 5].mean()
    corner = grey[h - 40:h - 30, 5:15].mean()
    assert centre > corner + 60
    # heat map region is coloured (yellow from cividis at 1.0: red well above blue), the rest stays grey
    hot = body[int(h * 3 / 12):int(h * 4 / 12), int(w * 6 / 9):int(w * 7 / 9)].astype(int)
    assert (hot[..., 0] - hot[..., 2]).mean() > 40
    assert (hot[..., 1] - hot[..., 2]).mean() > 40  # cividis's yellow, not jet's dark red (green ~0)
    calm = body[h // 2 - 5:h // 2 + 5, w // 2 - 5:w // 2 + 5].astype(int)
    assert np.abs(calm[..., 0] - calm[..., 2]).mean() < 3


def test_box_and_render_round_trip(tmp_path, dciodvfy):
    dx = dx_image(rows=128, cols=96)
    ref = ImageRef(str(dx.SOPInstanceUID))
    box = Box(ref, 20, 30, 60, 90, FRACTURE, 0.91, finding_site=rc.DISTAL_RADIUS)
    f = Findings("physis_fracture", "PhysisNet", "0.1", str(dx.StudyInstanceUID), (ref,), boxes=[box],
                 overlays=[Overlay([Panel(image=ref, boxes=[box])], "growth plate fracture")])
    objects = build_results(f, [dx], ResultContext())
    (sc,) = _scs(objects)
    path = _save(sc, tmp_path, dciodvfy, "box.dcm")
    rgb = pydicom.dcmread(path).pixel_array
    colour = np.all(rgb == np.array(colour_for("Fracture"), np.uint8), axis=2)
    assert colour.sum() > 200  # outline and its label
    out = render_file(path, tmp_path / "box.png")
    np.testing.assert_array_equal(np.asarray(Image.open(out).convert("RGB")), rgb)


def _block_diff(a: np.ndarray, b: np.ndarray, block: int = 32) -> float:
    """Largest mean absolute difference (0-1) over ``block`` x ``block`` tiles: catches local changes."""
    d = np.abs(a.astype(float) - b.astype(float)).mean(axis=2) / 255.0
    h, w = (d.shape[0] // block) * block, (d.shape[1] // block) * block
    return float(d[:h, :w].reshape(h // block, block, w // block, block).mean(axis=(1, 3)).max())


def _looks_same(expected: np.ndarray, actual: np.ndarray) -> bool:
    """Perceptual tolerance: small mean difference, high SSIM, and no tile that changed visibly."""
    mean = np.abs(expected.astype(float) - actual.astype(float)).mean() / 255.0
    ssim = _ssim(expected.mean(axis=2) / 255.0, actual.mean(axis=2) / 255.0)
    return mean < 2 / 255 and ssim > 0.97 and _block_diff(expected, actual) < 6 / 255


def _montage_findings():
    ct = volume_series("CT", n=8, rows=40, cols=40, seed=11)
    refs = [ImageRef(str(d.SOPInstanceUID)) for d in ct]
    yy, xx = np.mgrid[0:40, 0:40]
    disc = (xx - 20) ** 2 + (yy - 20) ** 2 < 12**2
    ring = (xx - 20) ** 2 + (yy - 20) ** 2 < 6**2
    panels = []
    for i, ref in enumerate(refs):
        boxes = [Box(ref, 8, 8, 31, 31, FRACTURE, 0.5 + 0.05 * i)] if i % 3 == 0 else []
        panels.append(Panel(image=ref, caption=f"slice {i + 1}: grade {1 + i % 5}", boxes=boxes,
                            contours={"tibia": disc, "marrow": ring} if i % 2 else {}))
    sagittal = np.tile(np.linspace(0, 1, 40, dtype=np.float32), (20, 1))
    panels.append(Panel(pixels=sagittal, caption="reformat", heatmap=np.outer(np.hanning(20), np.hanning(40))))
    f = Findings("hrpqct_motion", "MotionGrader", "2.0", str(ct[0].StudyInstanceUID), tuple(refs),
                 classifications=[Classification(rc.IMAGE_ARTIFACTS, PRESENT, 0.4)],
                 overlays=[Overlay(panels, "motion grade 3", derived_from=tuple(refs))], synthetic_model=True)
    return ct, f


def test_montage_sc_matches_golden_image(tmp_path, dciodvfy):
    ct, f = _montage_findings()
    (sc,) = _scs(build_results(f, ct, ResultContext()))
    path = _save(sc, tmp_path, dciodvfy, "montage.dcm")
    ds = pydicom.dcmread(path)
    assert len(ds.SourceImageSequence) == 8
    assert ds.FrameOfReferenceUID == ct[0].FrameOfReferenceUID
    assert ds.PatientOrientation == ""  # unknown for a montage (Type 2)
    rgb = ds.pixel_array
    by_uid = {str(d.SOPInstanceUID): d for d in ct}
    np.testing.assert_array_equal(rgb, compose(f.overlays[0], f, by_uid))

    golden = GOLDEN / "sc_montage.png"
    if os.environ.get("UPDATE_GOLDEN") == "1":
        golden.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rgb).save(golden)
    if not golden.exists():
        pytest.fail(f"golden image {golden} missing; run with UPDATE_GOLDEN=1 and review it")
    expected = np.asarray(Image.open(golden).convert("RGB"))
    assert expected.shape == rgb.shape
    assert _looks_same(expected, rgb), (
        f"rendering differs from {golden}: block diff {_block_diff(expected, rgb) * 255:.1f}/255")


def test_golden_comparison_detects_a_changed_rendering():
    ct, f = _montage_findings()
    by_uid = {str(d.SOPInstanceUID): d for d in ct}
    good = compose(f.overlays[0], f, by_uid)
    assert _looks_same(good, compose(f.overlays[0], f, by_uid))
    # slight noise is tolerated ...
    noisy = np.clip(good.astype(int) + np.random.default_rng(0).integers(-2, 3, good.shape), 0, 255)
    assert _looks_same(good, noisy.astype(np.uint8))
    # ... a missing contour or a moved box is not
    f.overlays[0].panels[1].contours = {}
    assert not _looks_same(good, compose(f.overlays[0], f, by_uid))
    ct2, f2 = _montage_findings()  # same pixels, new UIDs
    assert _looks_same(good, compose(f2.overlays[0], f2, {str(d.SOPInstanceUID): d for d in ct2}))
    f2.overlays[0].panels[0].boxes[0].x1 = 20
    assert not _looks_same(good, compose(f2.overlays[0], f2, {str(d.SOPInstanceUID): d for d in ct2}))


def test_one_sc_per_overlay_numbered(tmp_path, dciodvfy):
    dx, f = _wrist()
    f.overlays.append(Overlay([Panel(image=f.source_images[0])], "plain"))
    scs = _scs(build_results(f, [dx], ResultContext()))
    assert [int(s.InstanceNumber) for s in scs] == [1, 2]
    assert len({s.SOPInstanceUID for s in scs}) == 2 and len({s.SeriesInstanceUID for s in scs}) == 1
    for i, s in enumerate(scs):
        _save(s, tmp_path, dciodvfy, f"sc{i}.dcm")


def test_single_ct_slice_orientation_and_cli_render(tmp_path, dciodvfy, capsys):
    ct = volume_series("CT", n=2, rows=32, cols=32)
    ref = ImageRef(str(ct[1].SOPInstanceUID))
    f = Findings("spine_bmd", "SpineBMD", "1.2", str(ct[0].StudyInstanceUID), (ref,),
                 classifications=[Classification(rc.OSTEOPOROSIS, PRESENT, 0.7, images=(ref,))],
                 overlays=[Overlay([Panel(image=ref, contours={"L1": np.ones((32, 32), bool)})], "L1")])
    objects = build_results(f, ct, ResultContext())
    (sc,) = _scs(objects)
    path = _save(sc, tmp_path, dciodvfy, "ct.dcm")
    assert list(pydicom.dcmread(path).PatientOrientation) == ["L", "P"]  # rows run to the left, columns posterior
    out = tmp_path / "ct.png"
    assert cli_main(["render", str(path), "--out", str(out)]) == 0
    assert np.asarray(Image.open(out)).shape == sc.pixel_array.shape
    (sr,) = [o for o in objects if o.Modality == "SR"]
    sr_path = tmp_path / "sr.dcm"
    sr.save_as(sr_path, enforce_file_format=True)
    assert cli_main(["render", str(sr_path), "--out", str(tmp_path / "sr.png")]) == 2
    assert "no pixel data" in capsys.readouterr().err
    assert not (tmp_path / "sr.png").exists()


# --------------------------------------------------------------------------- text layout

LONG_SUMMARY = ("p=0.73 < 0.81: no growth-plate fracture detected; 0 of 2 images positive, no region marked; "
                "a deliberately long statement that cannot fit on one header line of any overlay")


def _crowded(rows: int, cols: int, n_boxes: int = 6):
    """A dark panel of ``rows`` x ``cols`` with boxes stacked at the right edge, where labels used to run off."""
    ct = volume_series("CT", n=1, rows=8, cols=8)
    ref = ImageRef(str(ct[0].SOPInstanceUID))
    h = rows / (n_boxes + 1)
    boxes = [Box(ref, cols * 0.82, i * h + 2, cols - 2, i * h + h * 0.7, FRACTURE, 0.5 + 0.07 * i,
                 text=f"L{i + 1} osteoporosis {0.5 + 0.07 * i:.2f}") for i in range(n_boxes)]
    panel = Panel(pixels=np.zeros((rows, cols), np.float32), boxes=boxes,
                  caption="Sagittal reformat: " + ", ".join(f"L{i + 1} osteoporosis" for i in range(n_boxes)),
                  contours={"Femur": np.pad(np.ones((rows // 2, cols // 2), bool), ((0, rows - rows // 2),
                                                                                  (0, cols - cols // 2)))})
    f = Findings("spine_bmd", "bone-dicomnode/spine_bmd/spine_detector_with_a_long_name", "demo-20261203b",
                 str(ct[0].StudyInstanceUID), (ref,), overlays=[Overlay([panel], "Lumbar spine BMD class per vertebra")],
                 summary=LONG_SUMMARY, synthetic_model=True)
    return f, {str(ct[0].SOPInstanceUID): ct[0]}


@pytest.mark.parametrize("rows,cols", [(48, 40), (2000, 1600)])
def test_text_stays_inside_and_labels_do_not_overlap(rows, cols):
    f, by_uid = _crowded(rows, cols)
    drawn = compose_layout(f.overlays[0], f, by_uid)
    width, height = drawn.image.size
    assert len(drawn.labels) == 6  # every box label found a place on the picture
    for r in drawn.text:
        assert inside(r, width, height), (r, width, height)
    for i, a in enumerate(drawn.text):
        for b in drawn.text[i + 1:]:
            assert not overlaps(a, b), (a, b)
    rgb = np.asarray(drawn.image)
    # nothing is drawn in the last column: the header, the labels and the caption all wrap or move inside
    assert rgb[:, -1].max() == 0
    # every piece of text sits on a dark backing
    for x0, y0, x1, y1 in drawn.text:
        patch = rgb[y0:y1, x0:x1]
        assert (patch.max(axis=2) < 40).mean() > 0.5


def test_header_wraps_the_findings_statement_in_full():
    f, by_uid = _crowded(48, 40)
    drawn = compose_layout(f.overlays[0], f, by_uid)
    lines = [t for t, _ in header_lines(f.overlays[0], f, layout_font(14), drawn.image.width - 16)]
    assert " ".join(lines).endswith(LONG_SUMMARY.split()[-1])
    assert " ".join(" ".join(lines).split()).count("p=0.73 < 0.81: no growth-plate fracture detected") == 1


@pytest.mark.parametrize("width,height", [(120, 90), (1024, 1024)])
def test_greedy_placement_is_inside_and_disjoint(width, height):
    f = layout_font(12)
    rng = np.random.default_rng(3)
    anchors = []
    for _ in range(8):  # boxes crowded into one corner and against the edges
        x0, y0 = int(rng.integers(0, width // 3)), int(rng.integers(0, height // 3))
        anchors.append((f"L{len(anchors) + 1} osteo", (x0, y0, x0 + 10, y0 + 8)))
    rects = place_labels(anchors, f, width, height, reserved=[(0, 0, 30, 20)])
    placed = [r for r in rects if r is not None]
    assert len(placed) >= (8 if width > 500 else 4)
    for i, a in enumerate(placed):
        assert inside(a, width, height) and not overlaps(a, (0, 0, 30, 20))
        for b in placed[i + 1:]:
            assert not overlaps(a, b)


def test_image_comments_state_the_findings_not_a_bare_label(tmp_path, dciodvfy):
    dx, f = _wrist()
    f.summary = "p=0.83 >= 0.50: fracture suspected"
    (sc,) = _scs(build_results(f, [dx], ResultContext()))
    _save(sc, tmp_path, dciodvfy, "comments.dcm")
    assert sc.ImageComments == "fracture probability 0.83. p=0.83 >= 0.50: fracture suspected"


@pytest.mark.parametrize("grow", [True, False])
def test_labels_without_room_join_the_caption_inside_the_tile(grow):
    from dicomnode.results.sc import render_panel

    ct = volume_series("CT", n=1, rows=8, cols=8)
    ref = ImageRef(str(ct[0].SOPInstanceUID))
    boxes = [Box(ref, 2 * i, 2 * i, 2 * i + 4, 2 * i + 4, FRACTURE, 0.9, text=f"a label far wider than the tile {i}")
             for i in range(3)]
    panel = Panel(pixels=np.zeros((24, 24), np.float32), boxes=boxes, caption="slice 1")
    drawn = render_panel(panel, {}, (90, 90), grow=grow)
    assert drawn.labels == []  # nothing fits on a 90 px picture ...
    for r in drawn.text:  # ... so the labels went into the caption, which stays inside the tile
        assert inside(r, *drawn.image.size)
    if grow:
        assert drawn.image.height > 90
    else:
        assert drawn.image.size == (90, 90)
