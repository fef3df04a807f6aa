"""Routing: a pure function from series metadata and route rules to the routes that apply.

Stage boundary: the spool stores :func:`routing_meta` of each series' first
instance; the assembler builds :class:`SeriesInfo` with :meth:`SeriesInfo.from_meta`
and calls :func:`route_series`. Nothing here touches the network, the database
or the file system except :func:`explain_paths`, which only reads headers.

Every key of :class:`dicomnode.config.Match` given in a route must match
(logical AND). A missing attribute never matches the key that needs it.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pydicom
from pydicom import Dataset
from pydicom.uid import UID

from dicomnode.bodypart import canonical_body_part
from dicomnode.config import Config, Match, Route
from inference.ages import age_in_years, parse_patient_age, patient_age
from inference.fsutil import walk_files

log = logging.getLogger(__name__)

__all__ = [
    "KeyCheck", "RouteExplanation", "SeriesInfo", "age_in_years", "describe_routes", "explain", "explain_paths",
    "parse_patient_age", "route_series", "routing_meta",
]

# --------------------------------------------------------------------------------------------- metadata


def _text(ds: Dataset, keyword: str) -> str | None:
    """A single-valued string attribute, or None when absent, empty or unreadable."""
    try:
        value = ds.get(keyword)
    except Exception:  # noqa: BLE001 - a malformed value is treated as missing
        return None
    if value is None:
        return None
    if isinstance(value, pydicom.multival.MultiValue):
        value = "\\".join(str(v) for v in value)
    text = str(value).strip()
    return text or None


def _multi(ds: Dataset, keyword: str) -> list[str]:
    try:
        value = ds.get(keyword)
    except Exception:  # noqa: BLE001
        return []
    if value is None or value == "":
        return []
    if isinstance(value, str | bytes):
        value = [value]
    return [str(v).strip() for v in value if str(v).strip()]


def _int(ds: Dataset, keyword: str) -> int | None:
    try:
        value = ds.get(keyword)
        return int(value) if value is not None and value != "" else None
    except Exception:  # noqa: BLE001
        return None


def routing_meta(ds: Dataset) -> dict[str, Any]:
    """Extract the JSON-safe attributes routing needs from one instance's header.

    No patient name or ID is kept; birth date and age only serve age rules.
    """
    meta: dict[str, Any] = {
        "study_uid": _text(ds, "StudyInstanceUID"),
        "series_uid": _text(ds, "SeriesInstanceUID"),
        "sop_class_uid": _text(ds, "SOPClassUID"),
        "modality": _text(ds, "Modality"),
        "body_part": _text(ds, "BodyPartExamined"),
        "series_description": _text(ds, "SeriesDescription"),
        "study_description": _text(ds, "StudyDescription"),
        "series_number": _int(ds, "SeriesNumber"),
        "view_positions": sorted({v.upper() for v in _multi(ds, "ViewPosition")}),
        "image_type": [v.upper() for v in _multi(ds, "ImageType")],
        "manufacturer": _text(ds, "Manufacturer"),
        "model_name": _text(ds, "ManufacturerModelName"),
        "patient_age": _text(ds, "PatientAge"),
        "birth_date": _text(ds, "PatientBirthDate"),
        "study_date": _text(ds, "StudyDate"),
        "series_date": _text(ds, "SeriesDate"),
        "acquisition_date": _text(ds, "AcquisitionDate"),
        "content_date": _text(ds, "ContentDate"),
        "number_of_frames": _int(ds, "NumberOfFrames"),
        "images_in_acquisition": _int(ds, "ImagesInAcquisition"),
    }
    return meta


def _age_from_meta(meta: dict[str, Any]) -> float | None:
    dates = (meta.get(k) for k in ("study_date", "series_date", "acquisition_date", "content_date"))
    return patient_age(meta.get("patient_age"), meta.get("birth_date"), dates)


@dataclass(frozen=True)
class SeriesInfo:
    """What the router knows about one series (no pixel data, no patient identity)."""

    study_uid: str
    series_uid: str
    modality: str | None = None
    body_part: str | None = None
    sop_class_uid: str | None = None
    series_description: str | None = None
    view_positions: frozenset[str] = field(default_factory=frozenset)
    image_type: tuple[str, ...] = ()
    manufacturer: str | None = None
    model_name: str | None = None
    patient_age_years: float | None = None
    n_slices: int = 0

    @classmethod
    def from_meta(cls, meta: dict[str, Any], n_instances: int) -> SeriesInfo:
        """Build from :func:`routing_meta` output (as stored by the spool) and the instance count.

        ``n_slices`` counts frames: instances times NumberOfFrames for multi-frame objects.
        """
        frames = meta.get("number_of_frames") or 1
        return cls(
            study_uid=str(meta.get("study_uid") or ""),
            series_uid=str(meta.get("series_uid") or ""),
            modality=(meta.get("modality") or None) and str(meta["modality"]).upper(),
            body_part=meta.get("body_part") or None,
            sop_class_uid=meta.get("sop_class_uid") or None,
            series_description=meta.get("series_description") or None,
            view_positions=frozenset(str(v).upper() for v in meta.get("view_positions") or ()),
            image_type=tuple(str(v).upper() for v in meta.get("image_type") or ()),
            manufacturer=meta.get("manufacturer") or None,
            model_name=meta.get("model_name") or None,
            patient_age_years=_age_from_meta(meta),
            n_slices=int(n_instances) * max(int(frames), 1),
        )

    @classmethod
    def from_datasets(cls, datasets: Sequence[Dataset]) -> SeriesInfo:
        """Build from the headers of one series' instances (the first gives the attributes)."""
        if not datasets:
            raise ValueError("SeriesInfo.from_datasets needs at least one dataset")
        meta = routing_meta(datasets[0])
        views: set[str] = set(meta["view_positions"])
        frames = 0
        for ds in datasets:
            views.update(v.upper() for v in _multi(ds, "ViewPosition"))
            frames += max(_int(ds, "NumberOfFrames") or 1, 1)
        meta["view_positions"] = sorted(views)
        meta["number_of_frames"] = None
        return replace(cls.from_meta(meta, len(datasets)), n_slices=frames)


# --------------------------------------------------------------------------------------------- matching


@dataclass(frozen=True)
class KeyCheck:
    """Outcome of one match key for one series."""

    key: str
    ok: bool
    reason: str


@dataclass(frozen=True)
class RouteExplanation:
    """Why a route did or did not match a series."""

    route: str
    task: str
    matched: bool
    checks: tuple[KeyCheck, ...]

    @property
    def reasons(self) -> list[str]:
        """Reasons of the failing keys (empty when the route matched)."""
        return [c.reason for c in self.checks if not c.ok]


def _fmt(values: Iterable[str]) -> str:
    return "[" + ", ".join(values) + "]"


def _check_in(key: str, actual: str | None, wanted: list[str], *, label: str) -> KeyCheck:
    if actual is None:
        return KeyCheck(key, False, f"{label} missing (route wants {_fmt(wanted)})")
    ok = actual.upper() in {w.upper() for w in wanted}
    verb = "in" if ok else "not in"
    return KeyCheck(key, ok, f"{label} {actual} {verb} {_fmt(wanted)}")


def _check_regex(key: str, actual: str | None, pattern: str, *, label: str) -> KeyCheck:
    if actual is None:
        return KeyCheck(key, False, f"{label} missing (route wants /{pattern}/)")
    ok = re.search(pattern, actual, flags=re.IGNORECASE) is not None
    return KeyCheck(key, ok, f"{label} {actual!r} {'matches' if ok else 'does not match'} /{pattern}/")


def _sop_class_names(uid: str) -> set[str]:
    u = UID(uid)
    names = {uid.upper()}
    for attr in ("keyword", "name"):
        try:
            value = getattr(u, attr)
        except Exception:  # noqa: BLE001
            value = ""
        if value:
            names.add(str(value).upper())
    return names


def _check_body_part(info: SeriesInfo, wanted_raw: list[str]) -> KeyCheck:
    """Body part (canonicalised on both sides) against the route's list."""
    wanted = [canonical_body_part(b) or b for b in wanted_raw]
    actual = canonical_body_part(info.body_part)
    if actual is None:
        return KeyCheck("body_part", False, f"body part missing (route wants {_fmt(wanted_raw)})")
    ok = actual in wanted
    shown = info.body_part if actual == (info.body_part or "").upper() else f"{info.body_part} (= {actual})"
    return KeyCheck("body_part", ok, f"body part {shown} {'in' if ok else 'not in'} {_fmt(wanted_raw)}")


def _check_sop_class(info: SeriesInfo, wanted: list[str]) -> KeyCheck:
    """SOP Class UID (by UID or keyword) against the route's list."""
    if info.sop_class_uid is None:
        return KeyCheck("sop_class", False, f"SOP class missing (route wants {_fmt(wanted)})")
    ok = bool(_sop_class_names(info.sop_class_uid) & {s.upper() for s in wanted})
    name = UID(info.sop_class_uid).name or info.sop_class_uid
    return KeyCheck("sop_class", ok, f"SOP class {name} {'in' if ok else 'not in'} {_fmt(wanted)}")


def _check_view_position(info: SeriesInfo, wanted_raw: list[str]) -> KeyCheck:
    """Any of the series' view positions in the route's list."""
    wanted = {v.upper() for v in wanted_raw}
    if not info.view_positions:
        return KeyCheck("view_position", False, f"view position missing (route wants {_fmt(wanted_raw)})")
    ok = bool(info.view_positions & wanted)
    return KeyCheck("view_position", ok, f"view positions {_fmt(sorted(info.view_positions))} "
                    f"{'intersect' if ok else 'do not intersect'} {_fmt(wanted_raw)}")


def _check_image_type(info: SeriesInfo, wanted: list[str]) -> KeyCheck:
    """Image Type contains every value the route asks for."""
    if not info.image_type:
        return KeyCheck("image_type", False, f"image type missing (route wants {_fmt(wanted)})")
    missing = [v for v in wanted if v.upper() not in set(info.image_type)]
    ok = not missing
    why = "image type " + "\\".join(info.image_type) + " "
    why += "contains all of " + _fmt(wanted) if ok else "lacks " + _fmt(missing)
    return KeyCheck("image_type", ok, why)


def _check_bounds(info: SeriesInfo, m: Match) -> list[KeyCheck]:
    """Patient age and slice count against the route's min/max bounds (only those set)."""
    out: list[KeyCheck] = []
    age = info.patient_age_years
    for key, bound, below in (("min_age_years", m.min_age_years, True), ("max_age_years", m.max_age_years, False)):
        if bound is None:
            continue
        if age is None or math.isnan(age):
            out.append(KeyCheck(key, False, f"patient age unknown (no PatientAge, or BirthDate without a study date; "
                                            f"route wants {'>=' if below else '<='} {bound:g} y)"))
            continue
        ok = age >= bound if below else age <= bound
        op = (">=" if ok else "<") if below else ("<=" if ok else ">")
        out.append(KeyCheck(key, ok, f"age {age:.2f} y {op} {bound:g} y"))
    for key, bound, below in (("min_slices", m.min_slices, True), ("max_slices", m.max_slices, False)):
        if bound is None:
            continue
        n = info.n_slices
        ok = n >= bound if below else n <= bound
        op = (">=" if ok else "<") if below else ("<=" if ok else ">")
        out.append(KeyCheck(key, ok, f"{n} slices {op} {bound}"))
    return out


def _checks(info: SeriesInfo, m: Match) -> list[KeyCheck]:
    """One check per key the route's match sets, in a fixed order."""
    out: list[KeyCheck] = []
    if m.modality is not None:
        out.append(_check_in("modality", info.modality, m.modality, label="modality"))
    if m.body_part is not None:
        out.append(_check_body_part(info, m.body_part))
    if m.sop_class is not None:
        out.append(_check_sop_class(info, m.sop_class))
    if m.series_description is not None:
        out.append(_check_regex("series_description", info.series_description, m.series_description,
                                label="series description"))
    if m.view_position is not None:
        out.append(_check_view_position(info, m.view_position))
    if m.image_type is not None:
        out.append(_check_image_type(info, m.image_type))
    if m.manufacturer is not None:
        out.append(_check_regex("manufacturer", info.manufacturer, m.manufacturer, label="manufacturer"))
    if m.model_name is not None:
        out.append(_check_regex("model_name", info.model_name, m.model_name, label="model name"))
    out.extend(_check_bounds(info, m))
    return out


def explain(info: SeriesInfo, routes: Sequence[Route]) -> list[RouteExplanation]:
    """Evaluate every route against ``info`` and say, key by key, why it matched or not."""
    result = []
    for route in routes:
        checks = tuple(_checks(info, route.match))
        result.append(RouteExplanation(route.name, route.task, all(c.ok for c in checks), checks))
    return result


def route_series(info: SeriesInfo, routes: Sequence[Route]) -> list[Route]:
    """Return the routes whose every match key accepts ``info``, in configuration order."""
    return [r for r, e in zip(routes, explain(info, routes), strict=True) if e.matched]


# --------------------------------------------------------------------------------------------- CLI text


def describe_routes(cfg: Config) -> str:
    """Human-readable summary of the configured routes (``dicomnode check-config``)."""
    if not cfg.routes:
        return "no routes configured: every series will be recorded as 'no route'"
    lines = [f"{len(cfg.routes)} route(s):"]
    for r in cfg.routes:
        keys = r.match.model_dump(exclude_none=True)
        rules = ", ".join(f"{k}={v}" for k, v in keys.items()) or "(matches every series)"
        send = ", ".join(r.send_to) or "(nowhere)"
        lines.append(f"  {r.name}: task {r.task}; match {rules}; complete after {r.complete_after_s:g} s; "
                     f"send to {send}" + ("; archived for training" if r.archive_for_training else "")
                     + (f"; model pinned to {r.model}" if r.model else ""))
    return "\n".join(lines)


def _iter_files(paths: Iterable[Path]) -> Iterable[Path]:
    for p in paths:
        if p.is_dir():
            yield from walk_files(p)
        elif p.exists():
            yield p
        else:
            log.warning("path does not exist: %s", p)


def explain_paths(paths: Sequence[Path], cfg: Config) -> str:
    """Group the DICOM files under ``paths`` by series (header-only reads) and explain routing for each.

    Read-only: nothing is written, sent or stored.
    """
    by_series: dict[str, list[Dataset]] = {}
    skipped = 0
    for f in _iter_files(paths):
        try:
            ds = pydicom.dcmread(f, stop_before_pixels=True)
            uid = str(ds.SeriesInstanceUID)
            str(ds.StudyInstanceUID)
        except Exception:  # noqa: BLE001 - any unreadable file is skipped and counted
            skipped += 1
            continue
        by_series.setdefault(uid, []).append(ds)
    lines: list[str] = []
    for uid, datasets in by_series.items():
        info = SeriesInfo.from_datasets(datasets)
        age = "unknown" if info.patient_age_years is None else f"{info.patient_age_years:.2f} y"
        lines.append(f"series {uid} (study {info.study_uid}): {len(datasets)} file(s), modality "
                     f"{info.modality or '-'}, body part {info.body_part or '-'}, views "
                     f"{','.join(sorted(info.view_positions)) or '-'}, age {age}, {info.n_slices} slice(s)")
        explanations = explain(info, cfg.routes)
        matched = [e.route for e in explanations if e.matched]
        lines.append("  -> " + (", ".join(matched) if matched else "no route"))
        for e in explanations:
            if e.matched:
                passed = "; ".join(c.reason for c in e.checks) or "no rules"
                lines.append(f"  [match] {e.route} (task {e.task}): {passed}")
            else:
                lines.append(f"  [no]    {e.route} (task {e.task}): {'; '.join(e.reasons)}")
    if not by_series:
        lines.append("no DICOM series found")
    if skipped:
        lines.append(f"{skipped} file(s) skipped: not readable as DICOM or without study/series UIDs")
    return "\n".join(lines)
