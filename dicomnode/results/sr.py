"""Comprehensive 3D SR with the TID 1500 Measurement Report, built with highdicom.

Content, all from :class:`inference.findings.Findings`:

* a device observer (the node) and the algorithm identification on every group,
* one TID 1410 planar ROI group per image-level finding, each with its image region
  (SCOORD on the referenced image): a box as a closed POLYLINE, a per-image
  classification as the outline of the image it is about, a segmented structure as
  its outline on its largest slice,
* study-, patient- and scan-level conclusions (classifications of no or several
  images) in the document-level "Qualitative Evaluations" container (TID 1500
  row 12), followed by the findings' summary text,
* the same conclusions once more as a TID 1410 group on their key image (the image
  that drove them), tracked as "Study conclusion" / "Patient conclusion" / "Scan
  conclusion": the conclusion as qualitative evaluation, its probability (%), its
  measurements and its operating point as NUM items, which OHIF prints. Its region
  is a POINT near the image's top-left corner, so OHIF draws the label inside the
  image, clear of the whole-image outline's label at the right edge.

Why no TID 1501/1411 groups: OHIF 3.x (up to at least 3.13) reads every measurement
group as an annotation and fails on any group without an image region (``TypeError:
Cannot read properties of undefined (reading 'ReferencedSOPSequence')``), which
blanks the viewport. The volumes of segmented structures therefore sit in the
TID 1410 group that outlines the structure, and the SEG is part of the evidence.

Units are the ones people write: probabilities in %, volumes in mL (OHIF prints
the UCUM code, not its meaning). Mean HU keeps UCUM's ``[hnsf'U]``: UCUM has no
other code for Hounsfield units.

The document is PRELIMINARY, COMPLETE and UNVERIFIED; earlier reports of the
same (study, route) are listed in the Predecessor Documents Sequence.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import contourpy
import highdicom as hd
import numpy as np
from pydicom import Dataset
from pydicom.sr.codedict import codes as dcodes
from pydicom.uid import generate_uid

from dicomnode.errors import ResultWriteError
from dicomnode.results import ResultContext
from dicomnode.results import codes as rc
from dicomnode.results.common import finish, header_for_copy, series_description, series_number, series_uid
from dicomnode.results.sr_conclusions import conclusion_groups
from inference.findings import (
    ABSENT,
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
MAX_OUTLINE_POINTS = 256


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
    value, unit = rc.reported_unit(m.value, m.unit)
    return hd.sr.Measurement(
        name=rc.to_hd(m.name),
        value=value,
        unit=rc.to_hd(unit),
        derivation=rc.to_hd(m.derivation) if m.derivation else None,
        finding_sites=_finding_sites(m.finding_site),
        algorithm_id=algo,
    )


def _probability(name: Code, value: float, algo: hd.sr.AlgorithmIdentification) -> hd.sr.Measurement:
    """A probability measurement named after the finding it qualifies, stated in %."""
    return _measurement(Measurement(name, float(value), PROBABILITY_UNIT), algo)


def _region(graphic: np.ndarray, ref: ImageRef, by_uid: dict[str, Dataset]) -> hd.sr.ImageRegion:
    """A closed POLYLINE (SCOORD) on one referenced source image."""
    return hd.sr.ImageRegion(
        graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
        graphic_data=np.asarray(graphic, dtype=np.float64),
        source_image=hd.sr.SourceImageForRegion(
            referenced_sop_class_uid=str(by_uid[ref.sop_instance_uid].SOPClassUID),
            referenced_sop_instance_uid=ref.sop_instance_uid,
            referenced_frame_numbers=[ref.frame_number] if ref.frame_number else None,
        ),
    )


def _rectangle(x0: float, y0: float, x1: float, y1: float) -> np.ndarray:
    corners = [(x0, y0), (x1, y0), (x1, y1), (x0, y1), (x0, y0)]
    return np.array([to_scoord(x, y) for x, y in corners], dtype=np.float64)


def image_outline(ds: Dataset) -> np.ndarray:
    """The region of a whole image: a closed rectangle through the centres of its outermost pixels."""
    return _rectangle(0, 0, int(ds.Columns) - 1, int(ds.Rows) - 1)


def mask_outline(plane: np.ndarray) -> np.ndarray | None:
    """The longest closed outline of a 2-D binary mask as SCOORD points, or None when the plane is empty."""
    if not plane.any():
        return None
    padded = np.pad(plane.astype(np.float64), 1)  # closes outlines that touch the image border
    lines = contourpy.contour_generator(z=padded).lines(0.5)
    line = max(lines, key=len)
    if len(line) > MAX_OUTLINE_POINTS:
        line = line[np.linspace(0, len(line) - 1, MAX_OUTLINE_POINTS).astype(int)]
    points = [to_scoord(x - 1, y - 1) for x, y in line]
    if points[0] != points[-1]:
        points.append(points[0])
    return np.array(points, dtype=np.float64)


def _evaluations(c: Classification) -> tuple[Code, list[hd.sr.QualitativeEvaluation] | None]:
    """The group's finding type and extra evaluations for a classification."""
    if _is_finding(c.finding):
        # "Finding = <value>" is the group's finding type item itself; repeating it would duplicate it
        return c.value, None
    return c.finding, [hd.sr.QualitativeEvaluation(rc.to_hd(c.finding), rc.to_hd(c.value))]


def _classification_group(
    index: int, c: Classification, algo: hd.sr.AlgorithmIdentification, by_uid: dict[str, Dataset]
) -> hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations:
    """An image-level classification as a TID 1410 group outlining the image it is about."""
    (ref,) = c.images
    measurements = [_measurement(m, algo) for m in c.measurements]
    if c.probability is not None:
        measurements.insert(0, _probability(c.finding, c.probability, algo))
    finding_type, qualitative = _evaluations(c)
    return hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=_tracking(c.tracking_id, f"classification {index}"),
        referenced_region=_region(image_outline(by_uid[ref.sop_instance_uid]), ref, by_uid),
        finding_type=rc.to_hd(finding_type),
        algorithm_id=algo,
        finding_sites=_finding_sites(c.finding_site, c.laterality),
        measurements=measurements or None,
        qualitative_evaluations=qualitative,
    )


def _is_finding(code: Code) -> bool:
    return (code.value, code.scheme) == (rc.FINDING.value, rc.FINDING.scheme)


def _same_code(a: Code | None, b: Code | None) -> bool:
    return (a is None and b is None) or (a is not None and b is not None and (a.value, a.scheme) == (b.value, b.scheme))


def _covered_by_box(c: Classification, boxes: Sequence[Box]) -> bool:
    """True when a box on the same image already reports this classification (same site, label = value)."""
    return len(c.images) == 1 and any(
        b.image == c.images[0] and _same_code(b.finding_site, c.finding_site) and _same_code(b.label, c.value)
        for b in boxes
    )


def _box_group(
    index: int, b: Box, algo: hd.sr.AlgorithmIdentification, by_uid: dict[str, Dataset]
) -> hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations:
    # the label is the group's "Finding" (finding type) item; extra evaluations follow it
    qualitative = [hd.sr.QualitativeEvaluation(rc.to_hd(n), rc.to_hd(v)) for n, v in b.qualitative]
    measurements = [_probability(b.label, b.score, algo)] + [_measurement(m, algo) for m in b.measurements]
    return hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=_tracking(b.tracking_id, f"region {index}"),
        referenced_region=_region(_rectangle(b.x0, b.y0, b.x1, b.y1), b.image, by_uid),
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


def _mask_group(
    index: int, mask: Mask, algo: hd.sr.AlgorithmIdentification, by_uid: dict[str, Dataset]
) -> hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations | None:
    """A segmented structure as a TID 1410 group: its outline on its largest slice, with the volume of the
    whole segment (the SEG holds every slice). None when the mask is empty."""
    areas = mask.array.reshape(len(mask.images), -1).sum(axis=1)
    if not areas.any():
        log.info("segment %d is empty: no outline to report", index)
        return None
    k = int(np.argmax(areas))
    measurements = [_measurement(m, algo) for m in mask.measurements]
    if not any(m.unit.value == CUBIC_MM.value for m in mask.measurements):
        volume = mask_volume_mm3(mask, by_uid)
        if volume is not None:
            measurements.insert(0, _measurement(Measurement(rc.VOLUME, volume, CUBIC_MM), algo))
        else:
            log.warning("no geometry to compute the volume of segment %d", index)
    # an anatomical structure is its own finding site: OHIF labels a region by its site, not by its finding
    anatomical = _same_code(mask.category, rc.ANATOMICAL_STRUCTURE)
    return hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=_tracking(mask.tracking_id, f"segment {index}"),
        referenced_region=_region(mask_outline(mask.array[k]), mask.images[k], by_uid),
        finding_type=rc.to_hd(mask.label),
        algorithm_id=algo,
        finding_sites=_finding_sites(mask.label if anatomical else mask.finding_site),
        measurements=measurements or None,
    )


def _conclusions(findings: Findings, study_level: Sequence[Classification]) -> hd.sr.ContainerContentItem | None:
    """TID 1500 row 12 "Qualitative Evaluations": study-level classifications as coded items, then the
    study-level measurements and the findings' summary as text (the same wording as the overlay)."""
    items: list[hd.sr.ContentItem] = []
    contains = hd.sr.RelationshipTypeValues.CONTAINS
    for c in study_level:
        items.append(hd.sr.CodeContentItem(name=rc.to_hd(c.finding), value=rc.to_hd(c.value),
                                           relationship_type=contains))
        if c.probability is not None:
            site = f" ({c.finding_site.meaning})" if c.finding_site else ""
            over = f" over {len(c.images)} images" if c.images else ""
            items.append(hd.sr.TextContentItem(
                name=rc.to_hd(c.finding), relationship_type=contains,
                value=f"{c.value.meaning}{site}: probability {100 * c.probability:.3g} %{over}"))
        items.extend(_measurement_text(m) for m in c.measurements)
    items.extend(_measurement_text(m) for m in findings.measurements)
    if findings.summary.strip():
        items.append(hd.sr.TextContentItem(name=rc.to_hd(rc.SUMMARY), relationship_type=contains,
                                           value=findings.summary.strip()))
    if not items:
        return None
    container = hd.sr.ContainerContentItem(name=rc.to_hd(rc.QUALITATIVE_EVALUATIONS), relationship_type=contains)
    container.ContentSequence = hd.sr.ContentSequence(items)
    return container


def _measurement_text(m: Measurement) -> hd.sr.TextContentItem:
    """A study-level measurement as text: row 12's container holds only CODE and TEXT items."""
    value, unit = rc.reported_unit(m.value, m.unit)
    text = f"{value:.4g}" if unit.value == "1" else f"{value:.4g} {unit.value}"
    return hd.sr.TextContentItem(name=rc.to_hd(m.name), relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
                                 value=text)


def _groups(findings: Findings, algo: hd.sr.AlgorithmIdentification, by_uid: dict[str, Dataset]
            ) -> tuple[list[hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations], list[Classification]]:
    """Every image-level TID 1410 group, and the study-level classifications left for the conclusions."""
    groups = []
    study_level = []
    for i, c in enumerate(findings.classifications, start=1):
        if len(c.images) != 1:
            # about the study, or a whole series or scan: a conclusion, not a region on one image
            study_level.append(c)
        elif not _covered_by_box(c, findings.boxes):
            groups.append(_classification_group(i, c, algo, by_uid))
    for i, b in enumerate(findings.boxes, start=1):
        groups.append(_box_group(i, b, algo, by_uid))
    for i, mask in enumerate(findings.masks, start=1):
        group = _mask_group(i, mask, algo, by_uid)
        if group is not None:
            groups.append(group)
        else:  # nothing segmented: no region to show, so the report says the structure was not found
            study_level.append(Classification(mask.label, ABSENT, finding_site=mask.finding_site))
    return groups, study_level


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


def _report_content(
    findings: Findings, sources: Sequence[Dataset], by_uid: dict[str, Dataset], context: ResultContext,
) -> hd.sr.ContainerContentItem:
    """The TID 1500 root container: conclusion groups first, then the findings' groups, then conclusions.

    Raises ResultWriteError if there is nothing to report.
    """
    algo = algorithm_id(findings)
    groups, study_level = _groups(findings, algo, by_uid)
    # conclusions first: OHIF opens an SR on its first group's image, so the reader starts at the conclusion
    groups[:0] = conclusion_groups(findings, study_level, algo, by_uid, sources)
    if not groups:
        raise ResultWriteError("findings contain no classification, measurement, box or mask to report")
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=_observer(findings, context)),
        procedure_reported=rc.to_hd(rc.procedure_for(sources[0].get("Modality"))),
        imaging_measurements=groups,
    )
    root = report[0]
    conclusions = _conclusions(findings, study_level)
    if conclusions is not None:
        root.ContentSequence.append(conclusions)
    return root


def build_sr(
    findings: Findings,
    sources: Sequence[Dataset],
    by_uid: dict[str, Dataset],
    context: ResultContext,
    seg: Dataset | None = None,
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
        The SEG built from ``findings.masks`` (needed when there are masks; it is listed as evidence).

    Raises
    ------
    ResultWriteError
        If masks are given without their SEG, there is nothing to report, or highdicom rejects the content.
    """
    if findings.masks and seg is None:
        raise ResultWriteError("findings have masks but no SEG was built to reference")
    root = _report_content(findings, sources, by_uid, context)
    evidence = [header_for_copy(ds) for ds in sources]
    if seg is not None:
        evidence.append(header_for_copy(seg))
    description = series_description(findings.task, "sr", findings.algorithm_version)
    sr = hd.sr.Comprehensive3DSR(
        evidence=evidence,
        content=root,
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
    out = finish(sr, sources[0], context, description)
    out.CodingSchemeIdentificationSequence = [_local_coding_scheme(context)]
    return out


def _local_coding_scheme(context: ResultContext) -> Dataset:
    """Declares the project's private coding scheme (PS3.16 Section 8: designators starting with "99")."""
    item = Dataset()
    item.CodingSchemeDesignator = rc.LOCAL
    item.CodingSchemeName = "bone-dicomnode local concepts"
    item.CodingSchemeResponsibleOrganization = context.manufacturer[:64]
    return item


def _observer(findings: Findings, context: ResultContext) -> hd.sr.ObserverContext:
    return hd.sr.ObserverContext(
        observer_type=dcodes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=device_observer_uid(context),
            name=context.model_name[:64],
            manufacturer_name=context.manufacturer[:64],
            model_name=f"{findings.algorithm_name} {findings.algorithm_version}"[:64],
        ),
    )
