"""Comprehensive 3D SR with the TID 1500 Measurement Report, built with highdicom.

Content, all from :class:`inference.findings.Findings`:

* a device observer (the node) and the algorithm identification on every group,
* TID 1501 groups for classifications (qualitative evaluation, probability in
  UCUM ``{probability}``, finding site, source images for per-image groups) and
  one group for study-level measurements,
* TID 1410 planar ROI groups, one per box, as a closed SCOORD POLYLINE,
* TID 1411 volumetric ROI groups, one per SEG segment, with the volume in mm3.

The document is PRELIMINARY, COMPLETE and UNVERIFIED; earlier reports of the
same (study, route) are listed in the Predecessor Documents Sequence.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import highdicom as hd
import numpy as np
from pydicom import Dataset
from pydicom.sr.codedict import codes as dcodes
from pydicom.uid import generate_uid

from dicomnode.errors import ResultWriteError
from dicomnode.results import ResultContext
from dicomnode.results import codes as rc
from dicomnode.results.common import finish, header_for_copy, series_description, series_number, series_uid
from inference.findings import (
    CUBIC_MM,
    PROBABILITY_UNIT,
    Box,
    Classification,
    Code,
    Findings,
    ImageRef,
    Mask,
    Measurement,
)

log = logging.getLogger(__name__)

COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"


def device_observer_uid(context: ResultContext) -> str:
    """The node's device observer UID: from the context, else derived stably from its identity."""
    if context.device_observer_uid:
        return context.device_observer_uid
    return str(generate_uid(entropy_srcs=["dicomnode-device-observer", context.manufacturer, context.model_name]))


def algorithm_id(findings: Findings) -> hd.sr.AlgorithmIdentification:
    """TID 4019 algorithm identification with the "Artificial Intelligence" family code."""
    return hd.sr.AlgorithmIdentification(
        name=findings.algorithm_name[:64],
        version=findings.algorithm_version[:64],
        family=rc.to_hd(rc.ARTIFICIAL_INTELLIGENCE),
    )


def to_scoord(x: float, y: float) -> tuple[float, float]:
    """Findings pixel coordinates (0-based, pixel-centre origin) to SCOORD column/row.

    PS3.3 C.18.6.1.2: the top-left corner of the top-left pixel is (0, 0) and
    its bottom-right corner (1, 1), so the centre of pixel (0, 0) is (0.5, 0.5).
    """
    return float(x) + 0.5, float(y) + 0.5


def _tracking(identifier: str | None, default: str) -> hd.sr.TrackingIdentifier:
    return hd.sr.TrackingIdentifier(uid=str(hd.UID()), identifier=(identifier or default)[:64])


def _finding_sites(site: Code | None, laterality: Code | None = None) -> list[hd.sr.FindingSite] | None:
    if site is None:
        return None
    return [hd.sr.FindingSite(rc.to_hd(site), laterality=rc.to_hd(laterality) if laterality else None)]


def _measurement(m: Measurement, algo: hd.sr.AlgorithmIdentification) -> hd.sr.Measurement:
    return hd.sr.Measurement(
        name=rc.to_hd(m.name),
        value=float(m.value),
        unit=rc.to_hd(m.unit),
        derivation=rc.to_hd(m.derivation) if m.derivation else None,
        finding_sites=_finding_sites(m.finding_site),
        algorithm_id=algo,
    )


def _probability(name: Code, value: float, algo: hd.sr.AlgorithmIdentification) -> hd.sr.Measurement:
    """A probability measurement named after the finding it qualifies."""
    return hd.sr.Measurement(name=rc.to_hd(name), value=float(value), unit=rc.to_hd(PROBABILITY_UNIT), algorithm_id=algo)


def _source_image_refs(images: Sequence[ImageRef], by_uid: dict[str, Dataset]) -> list[hd.sr.SourceImageForMeasurementGroup]:
    return [
        hd.sr.SourceImageForMeasurementGroup(
            referenced_sop_class_uid=str(by_uid[ref.sop_instance_uid].SOPClassUID),
            referenced_sop_instance_uid=ref.sop_instance_uid,
            referenced_frame_numbers=[ref.frame_number] if ref.frame_number else None,
        )
        for ref in images
    ]


def _classification_group(
    index: int, c: Classification, algo: hd.sr.AlgorithmIdentification, by_uid: dict[str, Dataset]
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    measurements = [_measurement(m, algo) for m in c.measurements]
    if c.probability is not None:
        measurements.insert(0, _probability(c.finding, c.probability, algo))
    if _is_finding(c.finding):
        # "Finding = <value>" is the group's finding type item itself; repeating it would duplicate it
        finding_type, qualitative = c.value, None
    else:
        finding_type = c.finding
        qualitative = [hd.sr.QualitativeEvaluation(rc.to_hd(c.finding), rc.to_hd(c.value))]
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=_tracking(c.tracking_id, f"classification {index}"),
        finding_type=rc.to_hd(finding_type),
        algorithm_id=algo,
        finding_sites=_finding_sites(c.finding_site, c.laterality),
        measurements=measurements or None,
        qualitative_evaluations=qualitative,
        source_images=_source_image_refs(c.images, by_uid) or None,
    )


def _is_finding(code: Code) -> bool:
    return (code.value, code.scheme) == (rc.FINDING.value, rc.FINDING.scheme)


def _box_group(
    index: int, b: Box, algo: hd.sr.AlgorithmIdentification, by_uid: dict[str, Dataset]
) -> hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations:
    corners = [(b.x0, b.y0), (b.x1, b.y0), (b.x1, b.y1), (b.x0, b.y1), (b.x0, b.y0)]
    graphic = np.array([to_scoord(x, y) for x, y in corners], dtype=np.float64)
    src = by_uid[b.image.sop_instance_uid]
    region = hd.sr.ImageRegion(
        graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
        graphic_data=graphic,
        source_image=hd.sr.SourceImageForRegion(
            referenced_sop_class_uid=str(src.SOPClassUID),
            referenced_sop_instance_uid=b.image.sop_instance_uid,
            referenced_frame_numbers=[b.image.frame_number] if b.image.frame_number else None,
        ),
    )
    # the label is the group's "Finding" (finding type) item; extra evaluations follow it
    qualitative = [hd.sr.QualitativeEvaluation(rc.to_hd(n), rc.to_hd(v)) for n, v in b.qualitative]
    measurements = [_probability(b.label, b.score, algo)] + [_measurement(m, algo) for m in b.measurements]
    return hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=_tracking(b.tracking_id, f"region {index}"),
        referenced_region=region,
        finding_type=rc.to_hd(b.label),
        algorithm_id=algo,
        finding_sites=_finding_sites(b.finding_site),
        measurements=measurements,
        qualitative_evaluations=qualitative or None,
    )


def mask_volume_mm3(mask: Mask, by_uid: dict[str, Dataset]) -> float | None:
    """Volume of a mask from the source geometry (pixel spacing x slice spacing), or None if unknown."""
    first = by_uid[mask.images[0].sop_instance_uid]
    spacing = first.get("PixelSpacing")
    if spacing is None:
        return None
    thickness = _slice_spacing(mask, by_uid)
    if thickness is None:
        return None
    voxel = float(spacing[0]) * float(spacing[1]) * thickness
    return float(mask.array.sum()) * voxel


def _slice_spacing(mask: Mask, by_uid: dict[str, Dataset]) -> float | None:
    datasets = [by_uid[ref.sop_instance_uid] for ref in mask.images]
    positions = [ds.get("ImagePositionPatient") for ds in datasets]
    iop = datasets[0].get("ImageOrientationPatient")
    if len(datasets) > 1 and iop is not None and all(p is not None for p in positions):
        row, col = np.array(iop[:3], float), np.array(iop[3:], float)
        normal = np.cross(row, col)
        along = np.sort([float(np.dot(normal, np.array(p, float))) for p in positions])
        steps = np.diff(along)
        if len(steps) and np.all(steps > 1e-6):
            return float(np.median(steps))
    for kw in ("SpacingBetweenSlices", "SliceThickness"):
        value = datasets[0].get(kw)
        if value not in (None, ""):
            return float(value)
    return None


def _volume_group(
    index: int,
    mask: Mask,
    segment_number: int,
    seg: Dataset,
    algo: hd.sr.AlgorithmIdentification,
    by_uid: dict[str, Dataset],
) -> hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations:
    measurements = [_measurement(m, algo) for m in mask.measurements]
    has_volume = any(m.unit.value == CUBIC_MM.value for m in mask.measurements)
    if not has_volume:
        volume = mask_volume_mm3(mask, by_uid)
        if volume is not None:
            measurements.insert(0, hd.sr.Measurement(
                name=rc.to_hd(rc.VOLUME), value=volume, unit=rc.to_hd(CUBIC_MM), algorithm_id=algo,
            ))
        else:
            log.warning("no geometry to compute the volume of segment %d", segment_number)
    segment = hd.sr.ReferencedSegment(
        sop_class_uid=str(seg.SOPClassUID),
        sop_instance_uid=str(seg.SOPInstanceUID),
        segment_number=segment_number,
        source_series=hd.sr.SourceSeriesForSegmentation(str(by_uid[mask.images[0].sop_instance_uid].SeriesInstanceUID)),
    )
    return hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=_tracking(mask.tracking_id, f"segment {index}"),
        referenced_segment=segment,
        finding_type=rc.to_hd(mask.label),
        algorithm_id=algo,
        finding_sites=_finding_sites(mask.finding_site),
        measurements=measurements or None,
    )


def _predecessor_datasets(context: ResultContext) -> list[Dataset] | None:
    if not context.predecessors:
        return None
    out = []
    for p in context.predecessors:
        ds = Dataset()
        ds.StudyInstanceUID = p.study_instance_uid
        ds.SeriesInstanceUID = p.series_instance_uid
        ds.SOPInstanceUID = p.sop_instance_uid
        ds.SOPClassUID = p.sop_class_uid
        out.append(ds)
    return out


def build_sr(
    findings: Findings,
    sources: Sequence[Dataset],
    by_uid: dict[str, Dataset],
    context: ResultContext,
    seg: Dataset | None = None,
    segment_numbers: dict[int, int] | None = None,
) -> Dataset:
    """Build the TID 1500 Comprehensive 3D SR for one task run.

    Parameters
    ----------
    findings:
        What the task found.
    sources:
        Source datasets in sorted order; every one is listed as evidence.
    by_uid:
        The same datasets indexed by SOP Instance UID.
    context:
        Series identity, predecessors and equipment.
    seg:
        The SEG built from ``findings.masks`` (needed when there are masks).
    segment_numbers:
        Index in ``findings.masks`` -> segment number in ``seg`` (1-based).

    Raises
    ------
    ResultWriteError
        If masks are given without their SEG, or highdicom rejects the content.
    """
    if findings.masks and seg is None:
        raise ResultWriteError("findings have masks but no SEG was built to reference")
    algo = algorithm_id(findings)
    groups: list = []
    for i, c in enumerate(findings.classifications, start=1):
        groups.append(_classification_group(i, c, algo, by_uid))
    if findings.measurements:
        groups.append(hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=_tracking(None, "study measurements"),
            algorithm_id=algo,
            measurements=[_measurement(m, algo) for m in findings.measurements],
        ))
    for i, b in enumerate(findings.boxes, start=1):
        groups.append(_box_group(i, b, algo, by_uid))
    if not groups and seg is None:
        raise ResultWriteError("findings contain no classification, measurement, box or mask to report")
    evidence = [header_for_copy(ds) for ds in sources]
    if seg is not None:
        numbers = segment_numbers or {i: i + 1 for i in range(len(findings.masks))}
        for i, mask in enumerate(findings.masks):
            if i in numbers:
                groups.append(_volume_group(i + 1, mask, numbers[i], seg, algo, by_uid))
        evidence.append(header_for_copy(seg))

    observer = hd.sr.ObserverContext(
        observer_type=dcodes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=device_observer_uid(context),
            name=context.model_name[:64],
            manufacturer_name=context.manufacturer[:64],
            model_name=f"{findings.algorithm_name} {findings.algorithm_version}"[:64],
        ),
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=rc.to_hd(rc.procedure_for(sources[0].get("Modality"))),
        imaging_measurements=groups or None,
    )
    description = series_description(findings.task, "sr", findings.algorithm_version)
    sr = hd.sr.Comprehensive3DSR(
        evidence=evidence,
        content=report[0],
        series_instance_uid=series_uid(context, "sr"),
        series_number=series_number(context, "sr"),
        sop_instance_uid=str(hd.UID()),
        instance_number=1,
        manufacturer=context.manufacturer[:64],
        is_complete=True,
        is_final=False,
        is_verified=False,
        institution_name=context.institution_name,
        previous_versions=_predecessor_datasets(context),
        series_description=description,
    )
    return finish(sr, sources[0], context, description)
