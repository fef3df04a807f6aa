"""Synthetic paediatric wrist/forearm radiographs with growth-plate fractures and distractors.

Children aged 2-17 (:func:`training.synth.wrist_phantom.wrist_anatomy` with open
physes whose width shrinks with age, later-ossifying carpals and epiphyses).
A fractured study has one of:

* ``widened``: the distal radial epiphysis slipped off the metaphysis
  (Salter-Harris I): the physis widens and steps;
* ``corner``: an oblique metaphyseal cut reaching the physis moves with the
  epiphysis (Salter-Harris II, the metaphyseal corner fragment);
* ``metaphyseal``: a lucent line or step-off 6-20 mm proximal to the physis.

Distractors: a lead laterality marker, burnt-in text, and in some studies
metal (a K-wire or a plate with screws) in both classes. Labels are per image
(``label`` 1 when the fracture shows in that view), with boxes labelled
``fracture``, ``metal`` and ``text``. Images are 1024 x 768.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import numpy as np

from training.synth import radiograph as rg
from training.synth import wrist_phantom as wp
from training.synth.common import (
    DEFAULT_DIFFICULTY,
    UidSource,
    body_part_string,
    choose_bits_stored,
    choose_photometric,
    new_patient,
    new_series,
    new_study,
    write_dataset,
)
from training.synth.params import FORCE_LABEL
from training.synth.runner import StudyJob, generate_studies
from training.synth.wrist_fracture import EQUIPMENT, WRIST_CODE, acquire, fracture_visible, lerp

TASK = "physis_fracture"
PREVALENCE = 0.47
AGE_RANGE = (2.0, 17.0)
#: ``params`` this generator takes (training.synth.params)
PARAMS = {"force_label": FORCE_LABEL}
KINDS = ("widened", "corner", "metaphyseal")
ROWS, COLS = 1024, 768
_TEXTS = ("STEHEND", "GIPS", "IN GIPS", "PA", "LAT", "SEITL", "NACH REP", "POST OP", "DORSOVOLAR")


def physis_fracture(rng: np.random.Generator, w: wp.Wrist, difficulty: float) -> dict[str, Any]:
    """Draw a fracture at or next to the distal radial physis: kind, plane, gap, displacement, mm."""
    if w.physis_y is None:
        raise ValueError("physis fractures need a phantom with open physes (age < 18)")
    s = w.scale
    kind = str(rng.choice(KINDS, p=[0.3, 0.45, 0.25]))
    mag = float(lerp(2.2, 0.4, difficulty) * rng.uniform(0.4, 1.2))
    d = rng.normal(size=3)
    d[1] = -abs(d[1]) * 0.5 if kind == "widened" else d[1] * 0.3
    delta = mag * d / np.linalg.norm(d)
    y_p = w.physis_y
    if kind == "metaphyseal":
        n = rg.rot("z", rng.normal(0, 12)) @ rg.rot("x", rng.normal(0, 15)) @ np.array([0.0, 1.0, 0.0])
        y = y_p + rng.uniform(6, 20) * s
        gap = float(lerp(0.9, 0.2, difficulty) * rng.uniform(0.6, 1.4))
    elif kind == "corner":
        # oblique plane from the physis on one side up into the metaphysis on the other
        ang = rng.uniform(35, 60) * rng.choice([-1, 1])
        n = rg.rot("z", ang) @ rg.rot("x", rng.normal(0, 12)) @ np.array([0.0, 1.0, 0.0])
        y = y_p + rng.uniform(3, 7) * s
        gap = float(lerp(0.7, 0.15, difficulty) * rng.uniform(0.6, 1.4))
    else:
        n = np.array([0.0, 1.0, 0.0])
        y = y_p
        gap = 0.0
    n = n / np.linalg.norm(n)
    center = np.array([w.radius_x, y, 0.0])
    return {"kind": kind, "n": n, "h": float(n @ center), "gap": gap, "delta": delta, "center": center}


def apply_fracture(w: wp.Wrist, fx: dict[str, Any]) -> tuple[list[rg.Part], np.ndarray]:
    """Fractured radius parts (metaphysis + epiphysis) and scene points on the fracture, for boxes."""
    delta = fx["delta"]
    if fx["kind"] == "widened":
        parts = [*w.radius, *[p.moved(delta) for p in w.epiphyses]]
        y_p, half = float(w.physis_y or 0.0), w.physis_width / 2 + 0.3
        pts = np.concatenate([wp.plane_points(np.array([0.0, 1.0, 0.0]), y, fx["center"], parts, extent=20 * w.scale)
                              for y in (y_p - half + delta[1], y_p + half)])
        if not len(pts):
            pts = np.array([fx["center"]])
        return parts, np.concatenate([pts, pts + delta])
    # the distal side (n.x < h) of the metaphysis moves with the epiphysis
    parts = wp.split_parts(w.radius, fx["n"], fx["h"], fx["gap"], delta) + [p.moved(delta) for p in w.epiphyses]
    pts = wp.plane_points(fx["n"], fx["h"], fx["center"], w.radius, extent=25 * w.scale)
    if fx["kind"] == "corner" and w.physis_y is not None:
        keep = pts[:, 1] >= w.physis_y - 1.0
        pts = pts[keep] if keep.any() else pts
    if not len(pts):
        pts = np.array([fx["center"]])
    return parts, np.concatenate([pts, pts + delta])


def metal(rng: np.random.Generator, w: wp.Wrist) -> tuple[list[rg.Part], np.ndarray]:
    """A K-wire crossing the distal radius, or a small plate with screws on the shaft; and its extent points."""
    s = w.scale
    if rng.random() < 0.5:
        ang = float(rng.uniform(25, 50))
        c = np.array([w.radius_x + 2 * s, (w.physis_y or 0.0) + rng.uniform(4, 14) * s, rng.normal(0, 2)])
        wire = rg.Part(c, rg.rot("z", ang), (0.8, 40.0 * s, 0.8), rg.MU_STEEL, 1,
                       ((rg.rot("z", ang) @ np.array([0.0, 1.0, 0.0]), float(rg.rot("z", ang)[:, 1] @ c) + 30 * s),
                        (-(rg.rot("z", ang) @ np.array([0.0, 1.0, 0.0])), -float(rg.rot("z", ang)[:, 1] @ c) + 30 * s)),
                       "metal")
        u = rg.rot("z", ang)[:, 1]
        return [wire], np.array([c - u * 30 * s, c + u * 30 * s])
    y0 = (w.physis_y or 0.0) + rng.uniform(18, 30) * s
    c = np.array([w.radius_x, y0 + 18 * s, 7.0 * s])
    plate = rg.Part(c, np.eye(3), (5.0 * s, 20 * s, 1.2), rg.MU_STEEL, -1, (), "metal")
    screws = [rg.Part(np.array([w.radius_x, y0 + k * 12 * s + 6 * s, 0.0]), np.eye(3) @ rg.rot("x", 90),
                      (1.5, 8 * s, 1.5), rg.MU_STEEL, -1, (), "metal") for k in range(3)]
    pts = np.array([c + [sx * 5 * s, sy * 20 * s, sz] for sx in (-1, 1) for sy in (-1, 1) for sz in (-8 * s, 2)])
    return [plate, *screws], pts


def burn_text(rng: np.random.Generator, img: np.ndarray) -> dict[str, float]:
    """Burn an annotation into the processed image (saturated white); return its box."""
    text = str(rng.choice(_TEXTS))
    m = rg.text_mask(text, int(rng.integers(22, 40)))
    h, w = m.shape
    r = int(rng.integers(10, img.shape[0] - h - 10))
    cols = img.shape[1]
    if rng.random() < 0.5:  # near the left or the right edge, as annotations usually are
        c = int(rng.integers(10, max(11, cols // 4 - w)))
    else:
        c = int(rng.integers(min(3 * cols // 4, cols - w - 11), cols - w - 10))
    top = float(np.percentile(img[::2, ::2], 99.95))  # a saturation level; every 4th pixel is plenty
    region = img[r:r + h, c:c + w]
    region[m] = top
    return {"x0": float(c), "y0": float(r), "x1": float(c + w - 1), "y1": float(r + h - 1)}


def make_study(job: StudyJob) -> list[dict[str, Any]]:
    """Write one paediatric study (PA + lateral, sometimes one view) and return one row per image."""
    rng_a, rng_i, rng_l = job.rng("anatomy"), job.rng("image"), job.rng("labels")
    uids = UidSource(f"{TASK}:{job.seed}")
    patient = new_patient(rng_a, AGE_RANGE)
    region = str(rng_a.choice(["WRIST", "WRIST", "FOREARM", "HAND"]))
    study = new_study(rng_a, uids, patient, str(rng_a.choice(["XR WRIST CHILD", "HANDGELENK 2 EBENEN KIND",
                                                               "RX ANTEBRAZO", "FOREARM 2 VIEWS"])))
    side = str(rng_a.choice(["L", "R"]))
    force = job.params.get("force_label")
    fractured = bool(rng_l.random() < PREVALENCE) if force is None else bool(force)
    w = wp.wrist_anatomy(rng_a, patient.age_years)
    fx = physis_fracture(rng_a, w, job.difficulty)
    radius, fpts = apply_fracture(w, fx) if fractured else ([*w.radius, *w.epiphyses], None)
    has_metal = rng_a.random() < 0.12
    metal_parts, mpts = metal(rng_a, w) if has_metal else ([], None)
    mirror = rg.rot("y", 180.0) if side == "L" else np.eye(3)
    bones = [*w.other, *radius, *metal_parts]
    eq = EQUIPMENT[int(rng_a.integers(len(EQUIPMENT)))]
    modality = "CR" if eq.model.startswith("FCR") else "DX"
    series = new_series(uids, 1, modality, body_part_string(rng_a, region), description="PAED WRIST")
    photometric = choose_photometric(rng_a, 0.3)
    bits = choose_bits_stored(rng_a, (12, 14, 16))
    pix = float(rng_a.uniform(0.16, 0.2)) * (0.75 + 0.25 * w.scale)
    views = [("PA", rg.view_matrix(False, rng_a.normal(0, 8), rng_a.normal(0, 5))),
             ("LL", rg.view_matrix(True, rng_a.normal(0, 8), rng_a.normal(0, 8)))]
    if rng_a.random() < 0.15:
        views = [views[int(rng_a.integers(2))]]
    rows_out = []
    for k, (vp, view0) in enumerate(views):
        view = view0 @ mirror
        det = rg.Detector(ROWS, COLS, pix, cx=rng_a.normal(0, 5), cy=(10 if region == "FOREARM" else -4) * w.scale
                          + rng_a.normal(0, 6))
        li = rg.project(bones, view, det, smooth=w.soft)
        img, mbox = acquire(rng_i, li, det, job.difficulty, side)
        boxes = []
        if mbox is not None:
            boxes.append({**mbox, "label": "text"})
        if rng_a.random() < 0.5:
            boxes.append({**burn_text(rng_a, img), "label": "text"})
        if mpts is not None:
            b = rg.box_of_points(mpts, view, det, pad_px=6)
            if b is not None:
                boxes.append({**b, "label": "metal"})
        visible = False
        if fractured and fpts is not None and (fx["kind"] != "metaphyseal" or fracture_visible(fx, view)):
            b = rg.box_of_points(fpts, view, det, pad_px=6)
            if b is not None:
                boxes.append({**b, "label": "fracture"})
                visible = True
        sop = uids.make("sop", 1, k + 1)
        ds = rg.xray_dataset(modality=modality, patient=patient, study=study, series=series, equipment=eq,
                             sop_instance_uid=sop, instance_number=k + 1, image=img, bits_stored=bits,
                             photometric=photometric, pixel_mm=pix, view_position=vp, laterality=side,
                             body_part_code=WRIST_CODE, burned_in=any(b["label"] == "text" for b in boxes),
                             content_time=(dt.datetime.combine(study.date, study.time)
                                           + dt.timedelta(seconds=45 * k)).time())
        write_dataset(ds, job.out)
        label = int(visible)
        if rng_l.random() < job.label_noise:
            label = 1 - label
        rows_out.append({"study_uid": study.study_uid, "sop_instance_uid": sop, "patient_id": patient.patient_id,
                         "label": label, "label_true": int(visible), "study_fracture": int(fractured),
                         "fracture_kind": fx["kind"] if fractured else None, "boxes": boxes, "task": TASK})
    return rows_out


def generate(out: Path, n: int, seed: int, *, workers: int = 2, difficulty: float = DEFAULT_DIFFICULTY,
             label_noise: float = 0.02, params: dict[str, Any] | None = None) -> Path:
    """Write ``n`` synthetic paediatric studies under ``out``; return the manifest path."""
    return generate_studies(Path(out), n, seed, make_study, workers=workers, difficulty=difficulty,
                            label_noise=label_noise, params=params, param_spec=PARAMS)


def preview(out_png: Path, n: int, seed: int) -> Path:
    """Contact sheet of ``n`` studies with labels and boxes."""
    from training.synth.preview import contact_sheet

    return contact_sheet(TASK, Path(out_png), n, seed)
