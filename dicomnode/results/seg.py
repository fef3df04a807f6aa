"""DICOM SEG (BINARY) from the masks in :class:`inference.findings.Findings`, built with highdicom.

One segment per :class:`~inference.findings.Mask`, coded category and type,
AUTOMATIC with the algorithm identification, and the structure's colour from
:mod:`inference.palette` as its Recommended Display CIELab Value (the colour the
SC overlay and ``dicomnode render`` use). Masks come in the source pixel
grid, so the SEG takes its geometry from the source images themselves and
references the source slice of every frame.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence

import highdicom as hd
import numpy as np
from pydicom import Dataset

from dicomnode.errors import ResultWriteError
from dicomnode.results import ResultContext
from dicomnode.results import codes as rc
from dicomnode.results.common import finish, series_description, series_number, series_uid
from dicomnode.results.sr import device_observer_uid
from inference.findings import Findings, ImageRef, Mask
from inference.palette import colour_for

log = logging.getLogger(__name__)

SEGMENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"


def _content_label(task: str) -> str:
    label = re.sub(r"[^A-Z0-9 _]", "_", task.upper())[:16].strip()
    return label or "AI_RESULT"


def _layout(masks: Sequence[Mask], sources: Sequence[Dataset]) -> tuple[list[Dataset], dict[ImageRef, int]]:
    """Source datasets of the SEG and the frame index of each referenced image, in source order.

    Single-frame sources give one SEG source image per referenced instance;
    a multi-frame source is referenced whole, frame by frame.
    """
    refs = {ref for m in masks for ref in m.images}
    framed = {ref.frame_number is not None for ref in refs}
    if len(framed) > 1:
        raise ResultWriteError("masks mix multi-frame and single-frame image references")
    if framed == {True}:
        uids = {ref.sop_instance_uid for ref in refs}
        if len(uids) != 1:
            raise ResultWriteError("masks on multi-frame sources must all reference one instance")
        (uid,) = uids
        source = next(ds for ds in sources if str(ds.SOPInstanceUID) == uid)
        return [source], {ref: int(ref.frame_number) - 1 for ref in refs}  # type: ignore[arg-type]
    ref_uids = {ref.sop_instance_uid for ref in refs}
    chosen = [ds for ds in sources if str(ds.SOPInstanceUID) in ref_uids]
    index = {str(ds.SOPInstanceUID): i for i, ds in enumerate(chosen)}
    return chosen, {ref: index[ref.sop_instance_uid] for ref in refs}


def _n_frames(ds: Dataset) -> int:
    return max(1, int(ds.get("NumberOfFrames", 1) or 1))


def segment_array(masks: Sequence[Mask], sources: Sequence[Dataset]) -> tuple[list[Dataset], np.ndarray]:
    """Stack masks into highdicom's (frames, rows, columns, segments) layout over the SEG sources."""
    seg_sources, frame_of = _layout(masks, sources)
    rows, cols = int(seg_sources[0].Rows), int(seg_sources[0].Columns)
    for ds in seg_sources:
        if (int(ds.Rows), int(ds.Columns)) != (rows, cols):
            raise ResultWriteError("SEG source images differ in size; one SEG needs one pixel grid")
    n_planes = _n_frames(seg_sources[0]) if len(seg_sources) == 1 and _n_frames(seg_sources[0]) > 1 else len(seg_sources)
    array = np.zeros((n_planes, rows, cols, len(masks)), dtype=bool)
    for s, mask in enumerate(masks):
        if mask.array.shape[1:] != (rows, cols):
            raise ResultWriteError(
                f"mask {mask.label.meaning!r} has plane size {mask.array.shape[1:]}, source is {(rows, cols)}"
            )
        for plane, ref in zip(mask.array, mask.images, strict=True):
            array[frame_of[ref], :, :, s] |= plane
    return seg_sources, array


def _segment_descriptions(findings: Findings) -> list[hd.seg.SegmentDescription]:
    """One automatic segment description per mask of ``findings``, numbered from 1."""
    algo = hd.AlgorithmIdentificationSequence(
        name=findings.algorithm_name[:64],
        family=rc.to_hd(rc.ARTIFICIAL_INTELLIGENCE),
        version=findings.algorithm_version[:64],
    )
    descriptions = []
    for i, mask in enumerate(findings.masks, start=1):
        descriptions.append(hd.seg.SegmentDescription(
            segment_number=i,
            segment_label=mask.label.meaning[:64],
            segmented_property_category=rc.to_hd(mask.category),
            segmented_property_type=rc.to_hd(mask.label),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algo,
            tracking_uid=str(hd.UID()),
            tracking_id=(mask.tracking_id or mask.label.meaning)[:64],
            anatomic_regions=[rc.to_hd(mask.finding_site)] if mask.finding_site else None,
            display_color=hd.color.CIELabColor.from_rgb(*colour_for(mask.label.meaning)),
        ))
    return descriptions


def _fit_projection_seg(seg: Dataset, source: Dataset) -> None:
    """Make a SEG without a frame of reference (projection images) valid and readable."""
    # projection images: the SEG shares the source pixel grid, hence its orientation (Type 2C)
    seg.PatientOrientation = source.get("PatientOrientation") or None
    # Pixel Measures is only required with a frame of reference; highdicom writes it without a
    # Slice Thickness here and then cannot read its own object back
    shared = seg.SharedFunctionalGroupsSequence[0]
    if "PixelMeasuresSequence" in shared and "SliceThickness" not in shared.PixelMeasuresSequence[0]:
        del shared.PixelMeasuresSequence


def build_seg(findings: Findings, sources: Sequence[Dataset], context: ResultContext) -> Dataset:
    """Build one BINARY SEG with a segment per mask of ``findings`` (segment ``i + 1`` = ``masks[i]``).

    Raises
    ------
    ResultWriteError
        If there are no masks, masks do not fit the source grid, or highdicom
        rejects the sources.
    """
    if not findings.masks:
        raise ResultWriteError("no masks to write as SEG")
    seg_sources, array = segment_array(findings.masks, sources)
    descriptions = _segment_descriptions(findings)
    description = series_description(findings.task, "seg", findings.algorithm_version)
    try:
        seg = hd.seg.Segmentation(
            source_images=seg_sources,
            pixel_array=array,
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=descriptions,
            series_instance_uid=series_uid(context, "seg"),
            series_number=series_number(context, "seg"),
            sop_instance_uid=str(hd.UID()),
            instance_number=1,
            manufacturer=context.manufacturer[:64],
            manufacturer_model_name=context.model_name[:64],
            software_versions=context.software_version[:64],
            device_serial_number=device_observer_uid(context)[:64],
            content_label=_content_label(findings.task),
            content_description=f"{findings.algorithm_name} {findings.algorithm_version}"[:64],
            series_description=description,
            omit_empty_frames=bool(array.any()),
        )
    except (ValueError, TypeError, AttributeError) as exc:
        raise ResultWriteError(f"cannot build SEG: {exc}") from exc
    if "FrameOfReferenceUID" not in seg:
        _fit_projection_seg(seg, seg_sources[0])
    return finish(seg, seg_sources[0], context, description)
