"""DICOM SEG: voxel-for-voxel round trip, source geometry, per-frame references, dciodvfy, rendering."""

from __future__ import annotations

import highdicom as hd
import numpy as np
import pydicom
import pytest
from PIL import Image

from dicomnode.cli import main as cli_main
from dicomnode.errors import ResultWriteError
from dicomnode.results import ResultContext
from dicomnode.results import codes as rc
from dicomnode.results.builder import build_results
from dicomnode.results.render import render_file, seg_planes
from inference.findings import ABSENT, PRESENT, Box, Classification, Findings, ImageRef, Mask, Overlay, Panel
from tests.unit._results_sources import dx_image, volume_series


def _knee(mr, rng):
    refs = tuple(ImageRef(str(d.SOPInstanceUID)) for d in mr)
    shape = (len(mr), int(mr[0].Rows), int(mr[0].Columns))
    masks = []
    for label in (rc.FEMUR, rc.TIBIA, rc.FIBULA):
        arr = rng.random(shape) > 0.7
        masks.append(Mask(label, rc.ANATOMICAL_STRUCTURE, arr, refs, finding_site=rc.KNEE))
    masks[2].array[:] = False
    masks[2].array[1, 3:6, 4:8] = True  # a small fibula on one slice only
    return Findings("knee_bone_seg", "KneeUNet", "1.0", str(mr[0].StudyInstanceUID), refs, masks=masks)


def _save(ds, tmp_path, dciodvfy, name="seg.dcm"):
    path = tmp_path / name
    ds.save_as(path, enforce_file_format=True)
    dciodvfy(path)
    return path


def test_seg_round_trip_voxel_for_voxel(tmp_path, dciodvfy):
    mr = volume_series("MR", n=6, rows=20, cols=18, seed=3)
    findings = _knee(mr, np.random.default_rng(1))
    shuffled = [mr[i] for i in (3, 0, 5, 1, 4, 2)]
    ctx = ResultContext(series_numbers={"seg": 9201})
    (seg, _sr) = build_results(findings, shuffled, ctx)
    path = _save(seg, tmp_path, dciodvfy)

    back = hd.seg.segread(path)
    assert back.segmentation_type == hd.seg.SegmentationTypeValues.BINARY
    assert back.number_of_segments == 3
    uids = [str(d.SOPInstanceUID) for d in mr]
    pixels = back.get_pixels_by_source_instance(uids, segment_numbers=[1, 2, 3], combine_segments=False)
    assert pixels.shape == (6, 20, 18, 3)
    for s, mask in enumerate(findings.masks):
        np.testing.assert_array_equal(pixels[..., s].astype(bool), mask.array)

    raw = pydicom.dcmread(path)
    assert raw.SeriesDescription == "AI knee_bone_seg SEG v1.0"
    assert raw.SeriesNumber == 9201 and raw.SeriesInstanceUID == ctx.series_uids["seg"]
    assert str(raw.PatientName) == "Müller^Jörg" and raw.SpecificCharacterSet == "ISO_IR 100"
    assert raw.StudyInstanceUID == mr[0].StudyInstanceUID
    assert raw.FrameOfReferenceUID == mr[0].FrameOfReferenceUID
    for number, (desc, label) in enumerate(zip(raw.SegmentSequence, (rc.FEMUR, rc.TIBIA, rc.FIBULA), strict=True), 1):
        assert desc.SegmentNumber == number
        assert desc.SegmentAlgorithmType == "AUTOMATIC"
        assert desc.SegmentedPropertyTypeCodeSequence[0].CodeValue == label.value
        assert desc.SegmentedPropertyCategoryCodeSequence[0].CodeValue == rc.ANATOMICAL_STRUCTURE.value
        algo = desc.SegmentationAlgorithmIdentificationSequence[0]
        assert (algo.AlgorithmName, algo.AlgorithmVersion) == ("KneeUNet", "1.0")
        assert algo.AlgorithmFamilyCodeSequence[0].CodeValue == rc.ARTIFICIAL_INTELLIGENCE.value
    # geometry copied from the sources, each frame referencing its source slice
    shared = raw.SharedFunctionalGroupsSequence[0]
    assert [float(v) for v in shared.PixelMeasuresSequence[0].PixelSpacing] == [0.7, 0.8]
    assert [float(v) for v in shared.PlaneOrientationSequence[0].ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
    by_uid = {str(d.SOPInstanceUID): d for d in mr}
    for fg in raw.PerFrameFunctionalGroupsSequence:
        src_uid = fg.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        pos = [float(v) for v in fg.PlanePositionSequence[0].ImagePositionPatient]
        assert pos == [float(v) for v in by_uid[src_uid].ImagePositionPatient]


def test_masks_on_different_slices_share_one_seg(tmp_path, dciodvfy):
    ct = volume_series("CT", n=6, rows=16, cols=16)
    refs = [ImageRef(str(d.SOPInstanceUID)) for d in ct]
    masks = []
    for i, level in enumerate((rc.L1, rc.L2, rc.L3)):
        arr = np.zeros((2, 16, 16), bool)
        arr[:, 2 + i:8 + i, 3:10] = True
        masks.append(Mask(level, rc.ANATOMICAL_STRUCTURE, arr, (refs[2 * i], refs[2 * i + 1]), finding_site=level))
    f = Findings("spine_bmd", "SpineBMD", "1.2", str(ct[0].StudyInstanceUID), tuple(refs), masks=masks)
    seg = build_results(f, ct, ResultContext())[0]
    path = _save(seg, tmp_path, dciodvfy)
    back = hd.seg.segread(path)
    pixels = back.get_pixels_by_source_instance([r.sop_instance_uid for r in refs], combine_segments=False)
    for s, mask in enumerate(masks):
        expected = np.zeros((6, 16, 16), bool)
        expected[2 * s:2 * s + 2] = mask.array
        np.testing.assert_array_equal(pixels[..., s].astype(bool), expected)


def test_seg_on_radiograph_without_geometry(tmp_path, dciodvfy):
    dx = dx_image(rows=40, cols=30)
    arr = np.zeros((1, 40, 30), bool)
    arr[0, 10:25, 5:20] = True
    ref = ImageRef(str(dx.SOPInstanceUID))
    f = Findings("physis_fracture", "PhysisNet", "0.1", str(dx.StudyInstanceUID), (ref,),
                 masks=[Mask(rc.DISTAL_RADIUS, rc.ANATOMICAL_STRUCTURE, arr, (ref,))])
    seg = build_results(f, [dx], ResultContext())[0]
    path = _save(seg, tmp_path, dciodvfy)
    back = hd.seg.segread(path)
    pixels = back.get_pixels_by_source_instance([ref.sop_instance_uid], combine_segments=False)
    np.testing.assert_array_equal(pixels[..., 0].astype(bool), arr)


def test_all_empty_masks_still_reference_every_slice(tmp_path, dciodvfy):
    mr = volume_series("MR", n=3, rows=12, cols=12)
    refs = tuple(ImageRef(str(d.SOPInstanceUID)) for d in mr)
    f = Findings("knee_bone_seg", "KneeUNet", "1.0", str(mr[0].StudyInstanceUID), refs,
                 masks=[Mask(rc.FIBULA, rc.ANATOMICAL_STRUCTURE, np.zeros((3, 12, 12), bool), refs)])
    seg, sr = build_results(f, mr, ResultContext())
    path = _save(seg, tmp_path, dciodvfy)
    assert int(pydicom.dcmread(path).NumberOfFrames) == 3
    # the SR says the fibula was not found (and shows that on the first image, as OHIF needs one region)
    _save(sr, tmp_path, dciodvfy, "sr.dcm")
    (conclusions,) = [i for i in sr.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "C0034375"]
    item = conclusions.ContentSequence[0]
    assert (item.ConceptNameCodeSequence[0].CodeValue, item.ConceptCodeSequence[0].CodeValue) == (
        rc.FIBULA.value, ABSENT.value)
    (roi,) = hd.sr.srread(tmp_path / "sr.dcm").content.get_planar_roi_measurement_groups()
    assert roi.finding_type == rc.to_hd(rc.FIBULA)
    assert roi.get_qualitative_evaluations(name=rc.to_hd(rc.FIBULA))[0].value == rc.to_hd(ABSENT)


def test_mask_must_match_the_source_grid():
    mr = volume_series("MR", n=2, rows=12, cols=12)
    refs = tuple(ImageRef(str(d.SOPInstanceUID)) for d in mr)
    f = Findings("knee_bone_seg", "KneeUNet", "1.0", str(mr[0].StudyInstanceUID), refs,
                 masks=[Mask(rc.FEMUR, rc.ANATOMICAL_STRUCTURE, np.ones((2, 10, 12), bool), refs)])
    with pytest.raises(ResultWriteError, match="plane size"):
        build_results(f, mr, ResultContext())


def test_render_seg_without_and_with_sources(tmp_path, dciodvfy):
    mr = volume_series("MR", n=4, rows=16, cols=16)
    findings = _knee(mr, np.random.default_rng(5))
    seg = build_results(findings, mr, ResultContext())[0]
    path = _save(seg, tmp_path, dciodvfy)
    planes, masks, labels = seg_planes(pydicom.dcmread(path))
    assert [p[0] for p in planes] == [str(d.SOPInstanceUID) for d in mr]
    assert labels == {1: "Femur", 2: "Tibia", 3: "Fibula"}
    for s, mask in enumerate(findings.masks):
        np.testing.assert_array_equal(masks[..., s], mask.array)

    out = tmp_path / "seg.png"
    assert cli_main(["render", str(path), "--out", str(out)]) == 0
    plain = np.asarray(Image.open(out).convert("RGB"))
    assert plain.shape[0] > 256 and plain.std() > 0
    over = np.asarray(Image.open(render_file(path, tmp_path / "over.png", sources=mr)).convert("RGB"))
    assert over.shape == plain.shape
    assert not np.array_equal(over, plain)  # the source pixels show through


def test_seg_and_sc_on_a_multiframe_source(tmp_path, dciodvfy):
    ct = volume_series("CT", n=4, rows=16, cols=16)
    mf = hd.legacy.LegacyConvertedEnhancedCTImage(ct, series_instance_uid=hd.UID(), series_number=5,
                                                   sop_instance_uid=hd.UID(), instance_number=1)
    refs = tuple(ImageRef(str(mf.SOPInstanceUID), frame) for frame in range(1, 5))
    arr = np.zeros((4, 16, 16), bool)
    arr[1:3, 4:9, 3:12] = True
    f = Findings("knee_bone_seg", "KneeUNet", "1.0", str(mf.StudyInstanceUID), refs,
                 masks=[Mask(rc.FEMUR, rc.ANATOMICAL_STRUCTURE, arr, refs)],
                 boxes=[Box(refs[2], 3, 4, 11, 8, rc.FEMUR, 0.9)],
                 classifications=[Classification(rc.FEMUR, PRESENT, 0.8, images=refs[1:3])],
                 overlays=[Overlay([Panel(image=r) for r in refs], "frames")])
    objects = build_results(f, [mf], ResultContext())
    assert [o.Modality for o in objects] == ["SEG", "SR", "OT"]
    paths = [_save(o, tmp_path, dciodvfy, f"mf{i}.dcm") for i, o in enumerate(objects)]
    back = hd.seg.segread(paths[0])
    pixels = back.get_pixels_by_source_frame(str(mf.SOPInstanceUID), [1, 2, 3, 4], combine_segments=False,
                                             assert_missing_frames_are_empty=True)
    np.testing.assert_array_equal(pixels[..., 0].astype(bool), arr)
    report = hd.sr.srread(paths[1]).content
    rois = [g for g in report.get_planar_roi_measurement_groups() if not str(g.tracking_identifier).endswith(" conclusion")]
    frames = sorted(int(r.roi.ContentSequence[0].ReferencedSOPSequence[0].ReferencedFrameNumber) for r in rois)
    assert frames == [2, 3]  # the femur outlined on its largest frame (2), the box on frame 3
    # the classification of frames 2-3 is about several images: a conclusion, not a region
    assert report.get_image_measurement_groups() == []


def test_each_structure_has_one_colour_in_seg_render_and_sc(tmp_path, dciodvfy):
    """Femur/tibia/fibula: the SEG's Recommended Display CIELab Value, the SEG render and the SC contours agree."""
    from dicomnode.results.render import render_seg
    from dicomnode.results.sc import compose
    from inference.palette import OKABE_ITO, colour_for

    mr = volume_series("MR", n=3, rows=48, cols=48, seed=2)
    refs = tuple(ImageRef(str(d.SOPInstanceUID)) for d in mr)
    masks = []
    regions = {}
    for k, label in enumerate((rc.FEMUR, rc.TIBIA, rc.FIBULA)):
        arr = np.zeros((3, 48, 48), bool)
        arr[:, 4 + 14 * k:14 + 14 * k, 10:40] = True  # three bands, one per bone
        masks.append(Mask(label, rc.ANATOMICAL_STRUCTURE, arr, refs, finding_site=rc.KNEE))
        regions[label.meaning] = arr[1]
    # the SC lists the bones in another order than the SEG: the colour must follow the bone, not the order
    panel = Panel(image=refs[1], contours={m: regions[m] for m in ("Fibula", "Tibia", "Femur")})
    findings = Findings("knee_bone_seg", "KneeUNet", "1.0", str(mr[0].StudyInstanceUID), refs, masks=masks,
                        overlays=[Overlay([panel], "knee")])
    expected = {"Femur": colour_for("Femur"), "Tibia": colour_for("Tibia"), "Fibula": colour_for("Fibula")}
    assert len(set(expected.values())) == 3 and set(expected.values()) <= set(OKABE_ITO)

    seg = next(o for o in build_results(findings, mr, ResultContext()) if o.Modality == "SEG")
    path = _save(seg, tmp_path, dciodvfy)
    raw = pydicom.dcmread(path)
    for item in raw.SegmentSequence:
        rgb = hd.color.CIELabColor.from_dicom_value([int(v) for v in item.RecommendedDisplayCIELabValue]).to_rgb()
        assert np.abs(np.subtract(rgb, expected[item.SegmentLabel])).max() <= 1, item.SegmentLabel

    rendered = render_seg(raw)  # filled segments on black
    for name, colour in expected.items():
        assert np.all(rendered == np.array(colour, np.uint8), axis=2).sum() > 100, name

    sc = compose(findings.overlays[0], findings, {str(d.SOPInstanceUID): d for d in mr})
    for name, colour in expected.items():
        assert np.all(sc == np.array(colour, np.uint8), axis=2).sum() > 100, name
