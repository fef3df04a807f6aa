"""Study-, patient- and scan-level conclusions placed on their key image, so that OHIF shows them.

OHIF 3.x displays an SR only through its TID 1410 groups (it ignores TID 1500's "Qualitative Evaluations"
container) and prints, for each group, only its NUM items (``<name>: <value> <unit code>``, at most five lines)
and its finding site; it does not print qualitative evaluations or text. So each conclusion is repeated, beside
the container, as a TID 1410 group on the image that drove it:

* the key image: the most probable image-level classification of the same finding that agrees with the
  conclusion (wrist/physis: the most suspicious image; spine: the most severe vertebra's slice; HR-pQCT: the
  slice graded like the scan), else the middle of the images it is about, else the middle source image;
* the region: a POINT near the image's top-left corner (``POINT_AT``). OHIF draws a point as a short arrow with its label
  beside it, inside the image; a whole-image outline's label would sit at the right edge, on top of the
  image's own probability label;
* the content: the conclusion as the group's finding and qualitative evaluations, then per conclusion its
  probability in %, its measurements (e.g. the motion grade) and its operating point, all NUM items OHIF prints.
"""

from __future__ import annotations

from collections.abc import Sequence

import highdicom as hd
import numpy as np
from pydicom import Dataset

from dicomnode.results import codes as rc
from inference.findings import PROBABILITY_UNIT, Classification, Code, Findings, ImageRef, Measurement

# where the point sits, as fractions of the image's width and height from its top-left corner: OHIF draws the
# label beside an arrow ending there, about 10 % further in, clear of the prompt OHIF shows over the image's top
POINT_AT = (0.05, 0.12)


def _same(a: Code, b: Code) -> bool:
    return (a.value, a.scheme) == (b.value, b.scheme)


def _is_finding(code: Code) -> bool:
    return _same(code, rc.FINDING)


def key_image(c: Classification, findings: Findings, sources: Sequence[Dataset],
              earlier: dict[tuple[ImageRef, ...], ImageRef]) -> ImageRef:
    """The image that drove a study-level classification (see the module docstring)."""
    within = set(c.images)
    candidates = [x for x in findings.classifications
                  if len(x.images) == 1 and _same(x.finding, c.finding) and (not within or x.images[0] in within)]
    agreeing = [x for x in candidates if _same(x.value, c.value)] or candidates
    if agreeing:
        best = max(agreeing, key=lambda x: -1.0 if x.probability is None else float(x.probability))
        return best.images[0]
    # no image-level evidence of its own (e.g. HR-pQCT's rescan recommendation): beside the conclusion placed
    # before it about the same images, or for a study-level one beside the first conclusion
    if c.images in earlier:
        return earlier[c.images]
    if not c.images and earlier:
        return next(iter(earlier.values()))
    if c.images:
        return c.images[len(c.images) // 2]
    return ImageRef(str(sources[len(sources) // 2].SOPInstanceUID))


def level(c: Classification) -> str:
    """"Patient", "Scan" (about several images) or "Study"."""
    if c.tracking_id and "patient" in c.tracking_id.lower():
        return "Patient"
    return "Scan" if c.images else "Study"


def _point(ref: ImageRef, by_uid: dict[str, Dataset]) -> hd.sr.ImageRegion:
    ds = by_uid[ref.sop_instance_uid]
    x, y = POINT_AT[0] * (int(ds.Columns) - 1) + 0.5, POINT_AT[1] * (int(ds.Rows) - 1) + 0.5
    return hd.sr.ImageRegion(
        graphic_type=hd.sr.GraphicTypeValues.POINT,
        graphic_data=np.array([[x, y]], dtype=np.float64),
        source_image=hd.sr.SourceImageForRegion(
            referenced_sop_class_uid=str(ds.SOPClassUID),
            referenced_sop_instance_uid=ref.sop_instance_uid,
            referenced_frame_numbers=[ref.frame_number] if ref.frame_number else None,
        ),
    )


def _measurements(c: Classification) -> list[Measurement]:
    """What OHIF prints for one conclusion: its probability (named after the finding, or after the class for a
    generic "Finding"), its own measurements, and the operating point it was decided at."""
    out = []
    if c.probability is not None:
        out.append(Measurement(c.value if _is_finding(c.finding) else c.finding, float(c.probability), PROBABILITY_UNIT))
    out.extend(c.measurements)
    if c.threshold is not None:
        out.append(Measurement(rc.OPERATING_POINT, float(c.threshold), PROBABILITY_UNIT))
    return out


def conclusion_groups(findings: Findings, study_level: Sequence[Classification], algo: hd.sr.AlgorithmIdentification,
                      by_uid: dict[str, Dataset], sources: Sequence[Dataset]
                      ) -> list[hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations]:
    """One TID 1410 group per key image, holding every study-level conclusion placed on it."""
    from dicomnode.results.sr import _finding_sites, _measurement, _tracking  # sr.py imports this module

    earlier: dict[tuple[ImageRef, ...], ImageRef] = {}
    by_key: dict[ImageRef, list[Classification]] = {}
    for c in study_level:
        key = key_image(c, findings, sources, earlier)
        earlier.setdefault(c.images, key)
        by_key.setdefault(key, []).append(c)
    groups = []
    for key, conclusions in by_key.items():
        first = conclusions[0]
        if _is_finding(first.finding):
            finding_type, qualitative = first.value, []
        else:
            finding_type, qualitative = first.finding, [(first.finding, first.value)]
        qualitative += [(c.finding, c.value) for c in conclusions[1:]]
        groups.append(hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=_tracking(None, f"{level(first)} conclusion"),
            referenced_region=_point(key, by_uid),
            finding_type=rc.to_hd(finding_type),
            algorithm_id=algo,
            finding_sites=_finding_sites(first.finding_site, first.laterality),
            measurements=[_measurement(m, algo) for c in conclusions for m in _measurements(c)] or None,
            qualitative_evaluations=[hd.sr.QualitativeEvaluation(rc.to_hd(n), rc.to_hd(v))
                                     for n, v in qualitative] or None,
        ))
    return groups
