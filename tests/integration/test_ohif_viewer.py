"""Every task's results open in OHIF 3.13 in a real (headless) Chromium.

Orthanc with the DICOMweb plugin holds one synthetic study per task plus the SR, SEG and SC the shipped bundles
make of it (tests/task_results.py); :class:`dicomnode.viewer.ViewerServer` serves the pinned OHIF build
same-origin with Orthanc's DICOMweb. For each task the test opens the study, loads every result series into the
viewport and checks what a radiologist would see:

* no React error boundary, no uncaught exception;
* SR: the findings drawn as annotations, with their labels and units (e.g. "Fracture: 6.63 %"); the study-,
  patient- or scan-level conclusion (the SR's first group, tracked as "... conclusion", on its key image) drawn
  with its label wholly inside the image viewport;
* SEG: the segments listed by label;
* SC: a drawn canvas (not blank).

Screenshots go to ``$OHIF_SCREENSHOTS`` when set (else the test's temporary folder).
"""

from __future__ import annotations

import io
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image

from dicomnode.viewer import DicomWebOrthanc, ViewerServer, default_ohif_dist
from tests.cdp import Chromium
from tests.task_results import TASKS, TaskResult, task_results

pytestmark = pytest.mark.integration

# OHIF's onboarding tour would cover the viewport; mark it as already shown
NO_TOUR = "localStorage.setItem('shownTours', JSON.stringify(['basicViewerTour']));"
THUMBNAILS = "Array.from(document.querySelectorAll('[id^=thumbnail-]')).map(e => [e.id, e.innerText])"
SVG_TEXT = "Array.from(document.querySelectorAll('svg text')).map(e => e.textContent).join('\\n')"
VIEWPORT_BOX = ("(() => { const c = Array.from(document.querySelectorAll('canvas')).map(e => e.getBoundingClientRect())"
                ".filter(r => r.width > 200 && r.height > 200).sort((a, b) => b.width * b.height - a.width * a.height)[0];"
                " return c ? {x: c.x, y: c.y, width: c.width, height: c.height} : null; })()")
SEGMENT_LABELS = ("Femur", "Tibia", "Fibula")


@pytest.fixture(scope="module")
def viewer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ViewerServer, Chromium, Path]]:
    if not (default_ohif_dist() / "index.html").is_file():
        pytest.fail(f"OHIF web app missing in {default_ohif_dist()}: run scripts/bootstrap.sh")
    work = tmp_path_factory.mktemp("ohif")
    shots = Path(os.environ.get("OHIF_SCREENSHOTS") or work / "shots")
    shots.mkdir(parents=True, exist_ok=True)
    results = task_results()
    orthanc = DicomWebOrthanc(work / "orthanc").start()
    server = ViewerServer(orthanc.url).start()
    (work / "profile").mkdir()
    browser = Chromium(work / "profile")
    try:
        for result in results.values():
            for path in [*result.sources, *(p for paths in result.results.values() for p in paths)]:
                orthanc.upload(path)
        browser.send("Page.addScriptToEvaluateOnNewDocument", source=NO_TOUR)
        yield server, browser, shots
    finally:
        browser.close()
        server.stop()
        orthanc.stop()


def _group_labels(group: pydicom.Dataset) -> list[str]:
    """What OHIF draws for a TID 1410 group: "<name>: <value .2f> <unit code>" per NUM, then the finding site."""
    labels, sites = [], []
    for item in group.ContentSequence:
        if item.ValueType == "NUM":
            mv = item.MeasuredValueSequence[0]
            unit = mv.MeasurementUnitsCodeSequence[0].CodeValue
            labels.append(f"{item.ConceptNameCodeSequence[0].CodeMeaning}: {float(mv.NumericValue):.2f} {unit}")
        elif item.ConceptNameCodeSequence[0].CodeValue == "363698007":
            sites.append(f"363698007: {item.ConceptCodeSequence[0].CodeMeaning}")
    return (labels + sites[:1])[:5]  # OHIF draws at most five lines per annotation


def _sr_groups(sr: Path) -> list[tuple[str, list[str]]]:
    """(tracking identifier, the lines OHIF draws) of every measurement group, in document order."""
    ds = pydicom.dcmread(sr)
    (measurements,) = [i for i in ds.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "126010"]
    out = []
    for group in measurements.ContentSequence:
        (tracking,) = [str(i.TextValue) for i in group.ContentSequence
                       if i.ConceptNameCodeSequence[0].CodeValue == "112039"]
        out.append((tracking, _group_labels(group)))
    return out


def _text_boxes(browser: Chromium, line: str) -> list[dict[str, float]]:
    """Screen boxes of the SVG texts that contain ``line`` (a text's lines are tspans: its content joins them)."""
    return list(browser.js(f"Array.from(document.querySelectorAll('svg text')).filter(e => e.textContent.includes("
                           f"{json.dumps(line)})).map(e => {{ const r = e.getBoundingClientRect();"
                           " return {x: r.x, y: r.y, width: r.width, height: r.height}; })") or [])


def _inside(box: dict[str, float], outer: dict[str, float]) -> bool:
    return (box["x"] >= outer["x"] and box["y"] >= outer["y"] and box["x"] + box["width"] <= outer["x"] + outer["width"]
            and box["y"] + box["height"] <= outer["y"] + outer["height"])


def _check_no_crash(browser: Chromium, since: tuple[int, int], what: str) -> None:
    console = browser.console[since[0]:]
    boundary = [c for c in console if "Error Boundary" in c]
    assert not boundary, f"{what}: OHIF error boundary:\n" + "\n".join(boundary)
    exceptions = browser.exceptions[since[1]:]
    assert not exceptions, f"{what}: uncaught exception(s):\n" + "\n".join(exceptions)
    assert not browser.js("document.body.innerText.includes('Something went wrong')"), f"{what}: error page shown"


def _canvas_pixels(browser: Chromium, path: Path) -> np.ndarray:
    box = browser.wait_js(VIEWPORT_BOX, 30, "the viewport canvas")
    png = browser.screenshot(path, clip=box)
    return np.asarray(Image.open(io.BytesIO(png)).convert("L"), dtype=np.float64)


def _load(browser: Chromium, thumbnail_id: str) -> None:
    browser.click(f"[id='{thumbnail_id}']", count=2)


def _open_study(server: ViewerServer, browser: Chromium, result: TaskResult) -> dict[str, str]:
    """Open the study; return {series description: thumbnail id} once every series is listed."""
    n_series = len({str(pydicom.dcmread(p, stop_before_pixels=True).SeriesInstanceUID)
                    for p in [*result.sources, *(p for ps in result.results.values() for p in ps)]})
    browser.navigate(server.study_url(result.study_uid))
    browser.wait_js(f"document.querySelectorAll('[id^=thumbnail-]').length >= {n_series}", 120,
                    f"{n_series} series thumbnails of the {result.task} study")
    thumbs = browser.js(THUMBNAILS)
    return {text.split("\n")[1]: tid for tid, text in thumbs}


def _check_sr(browser: Chromium, result: TaskResult, tid: str, shots: Path) -> None:
    groups = _sr_groups(result.sr)
    tracking, expected = groups[0]  # OHIF opens the SR on its first group's image
    assert expected, "the SR's first group has no measurement to show"
    conclusions = [g for g in groups if g[0].endswith(" conclusion")]
    if result.task != "knee_bone_seg":  # knee states only segment volumes, which its outlines carry
        assert conclusions, f"the {result.task} SR places no study conclusion on an image: {[g[0] for g in groups]}"
        assert tracking.endswith(" conclusion"), f"the {result.task} SR does not open on its conclusion: {tracking}"
    since = (len(browser.console), len(browser.exceptions))
    _load(browser, tid)
    try:
        text = browser.wait_js(f"(() => {{ const t = {SVG_TEXT}; return t.includes({json.dumps(expected[0])}) ? t : '';"
                               " })()", 60, f"the {result.task} SR's annotation {expected[0]!r}")
    finally:
        browser.screenshot(shots / f"{result.task}_sr.png")
        _check_no_crash(browser, since, f"{result.task} SR")
    for label in expected:
        assert label in text, f"{label!r} not drawn; OHIF drew:\n{text}"
    assert "{probability}" not in text and "mm3" not in text, text
    if conclusions:  # the conclusion's label is readable: wholly inside the image viewport, not cut at its edge
        viewport = browser.wait_js(VIEWPORT_BOX, 30, "the viewport canvas")
        boxes = _text_boxes(browser, "".join(expected))  # the text box with all its lines, not a look-alike
        assert boxes and all(_inside(b, viewport) for b in boxes), f"{tracking} label {boxes} outside {viewport}"


def _check_seg(browser: Chromium, result: TaskResult, tid: str, shots: Path) -> None:
    since = (len(browser.console), len(browser.exceptions))
    _load(browser, tid)
    browser.wait_js("!!document.querySelector('[data-cy=yes-hydrate-btn]')", 60, "the SEG's load prompt")
    browser.click("[data-cy=yes-hydrate-btn]")
    listed = " && ".join(f"document.body.innerText.includes({json.dumps(s)})" for s in SEGMENT_LABELS)
    browser.wait_js("!!document.querySelector('[data-cy=panelSegmentation-btn]')", 30, "the segmentation panel button")
    time.sleep(1)
    if not browser.js(listed):
        browser.click("[data-cy=panelSegmentation-btn]")
    try:
        browser.wait_js(listed, 60, f"segments {', '.join(SEGMENT_LABELS)} listed")
    finally:
        browser.screenshot(shots / f"{result.task}_seg.png")
        _check_no_crash(browser, since, f"{result.task} SEG")


def _check_sc(browser: Chromium, result: TaskResult, tid: str, shots: Path) -> None:
    since = (len(browser.console), len(browser.exceptions))
    _load(browser, tid)
    deadline = time.monotonic() + 60
    pixels = np.zeros((1, 1))
    while time.monotonic() < deadline:
        time.sleep(1.0)
        pixels = _canvas_pixels(browser, shots / f"{result.task}_sc.png")
        if pixels.std() > 20 and (pixels > 40).mean() > 0.05:
            break
    _check_no_crash(browser, since, f"{result.task} SC")
    assert pixels.std() > 20 and (pixels > 40).mean() > 0.05, f"the {result.task} SC canvas looks blank"


@pytest.mark.parametrize("task", TASKS)
def test_results_display_in_ohif(viewer: tuple[ViewerServer, Chromium, Path], task: str) -> None:
    server, browser, shots = viewer
    result = task_results()[task]
    since = (len(browser.console), len(browser.exceptions))
    series = _open_study(server, browser, result)
    time.sleep(2)
    browser.screenshot(shots / f"{task}_study.png")
    _check_no_crash(browser, since, f"{task} study")
    kinds = {"SR": _check_sr, "SEG": _check_seg, "SC": _check_sc}
    checked = []
    for description, tid in series.items():
        kind = description.split()[2] if description.startswith(f"AI {task} ") else None
        if kind in kinds:
            kinds[kind](browser, result, tid, shots)
            checked.append(kind)
    expected = {"SR", "SC"} | ({"SEG"} if "SEG" in result.results else set())
    assert set(checked) == expected, f"result series found in OHIF: {series}"
