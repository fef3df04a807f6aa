"""Synthetic paediatric wrist/forearm radiographs with distal radius fractures and distractors.

Children aged 2-17 (:func:`training.synth.wrist_phantom.wrist_anatomy` with open physes whose width
shrinks with age, later-ossifying carpals and epiphyses, shape modes including the physis position, hand
pose, soft-tissue layers), seen through a drawn scanner with trabecular texture
(:mod:`training.synth.radiograph_texture`). A fractured study has one kind from
:data:`training.synth.fractures.PAED_KINDS` (buckle/torus, greenstick, complete metaphyseal,
Salter-Harris I-IV, in the proportions of emergency practice).

Per-view visibility: each image records whether its view shows the fracture (``fracture_visible``,
:func:`training.synth.fractures.visible_in`); the image ``label`` and the ``fracture`` box follow it (an
undisplaced Salter-Harris I is a negative image in every view, a dorsal buckle is seen on the lateral
only), while ``study_fracture`` keeps the study's truth.

Distractors, drawn without the label: a lead laterality marker, burnt-in text, metal (a K-wire or a plate
with screws), casts and splints, overlapping soft tissue. Boxes are labelled ``fracture``, ``metal`` and
``text``. Images are 1024 x 768.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import numpy as np

from training.synth import fractures as fr
from training.synth import radiograph as rg
from training.synth import radiograph_texture as rt
from training.synth import wrist_phantom as wp
from training.synth.common import (
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
from training.synth.wrist_fracture import EQUIPMENT, P_CAST, P_OVERLAP, WRIST_CODE, render, views

TASK = "physis_fracture"
PREVALENCE = 0.47
AGE_RANGE = (2.0, 17.0)
#: ``params`` this generator takes (training.synth.params)
PARAMS = {"force_label": FORCE_LABEL}
#: displacement, gaps and bulges at mid-range: a mix of obvious and subtle fractures as a paediatric
#: emergency department sees them, chosen from that mix, not from a model (training/README.md)
DEFAULT_DIFFICULTY = 0.5
KINDS = fr.PAED_KINDS
P_METAL = 0.08
ROWS, COLS = 1024, 768
_TEXTS = ("STEHEND", "GIPS", "IN GIPS", "PA", "LAT", "SEITL", "NACH REP", "POST OP", "DORSOVOLAR")


def metal(rng: np.random.Generator, w: wp.Wrist) -> tuple[list[rg.Part], np.ndarray]:
    """K-wires or a plate with screws on the distal radius (:func:`radiograph_texture.implant_parts`); extent points."""
    parts = rt.implant_parts(rng, w.radius_x, float(w.physis_y if w.physis_y is not None else w.articular_y),
                             w.scale)
    pts = []
    for p in parts:
        ext = np.array(p.semi) * np.array([1.0 if i != p.infinite else 0.75 for i in range(3)])
        pts.extend(p.center + p.axes @ (ext * np.array(c)) for c in
                   ((1, 1, 1), (-1, -1, -1), (1, -1, 1), (-1, 1, -1)))
    return parts, np.array(pts)


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


def _view_boxes(rng_a: np.random.Generator, img: np.ndarray, mbox: dict[str, float] | None,
                mpts: np.ndarray | None, view: np.ndarray, det: rg.Detector, fx: fr.Fracture | None,
                sites: dict[str, np.ndarray]) -> tuple[list[dict[str, Any]], bool]:
    """Boxes of one rendered view (text, burned-in text drawn here, metal, fracture); does the fracture show?

    ``fx`` is None for a study without a fracture. Burned-in text is drawn onto ``img`` in place.
    """
    boxes = [] if mbox is None else [{**mbox, "label": "text"}]
    if rng_a.random() < 0.5:
        boxes.append({**burn_text(rng_a, img), "label": "text"})
    if mpts is not None:
        b = rg.box_of_points(mpts, view, det, pad_px=6)
        if b is not None:
            boxes.append({**b, "label": "metal"})
    visible = False
    if fx is not None and fr.visible_in(fx, view):
        b = rg.box_of_points(sites["radius"], view, det, pad_px=6) if "radius" in sites else None
        if b is not None:
            boxes.append({**b, "label": "fracture"})
            visible = True
    return boxes, visible


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
    fx = fr.paediatric_fracture(rng_a, w, job.difficulty)
    if fractured:
        radius, other, sites = fr.apply(fx, w.radius, w.epiphyses, w.other)
    else:
        radius, other, sites = [*w.radius, *w.epiphyses], w.other, {}
    metal_parts, mpts = metal(rng_a, w) if rng_a.random() < P_METAL else ([], None)
    cast, cast_kind = rt.cast_parts(rng_a, w.scale, 1.28) if rng_a.random() < P_CAST else ([], None)
    soft = [*w.soft, *(rt.overlap_parts(rng_a, w.scale) if rng_a.random() < P_OVERLAP else [])]
    mirror = rg.rot("y", 180.0) if side == "L" else np.eye(3)
    bones = [*other, *radius, *metal_parts]
    vendor = int(rng_a.integers(len(EQUIPMENT)))
    eq = EQUIPMENT[vendor]
    modality = "CR" if eq.model.startswith("FCR") else "DX"
    sc = rt.draw_scanner(rng_a, modality, job.difficulty, vendor)
    series = new_series(uids, 1, modality, body_part_string(rng_a, region), description="PAED WRIST")
    photometric = choose_photometric(rng_a, 0.3)
    bits = choose_bits_stored(rng_a, (12, 14, 16))
    pix = float(rng_a.uniform(0.16, 0.2)) * (0.75 + 0.25 * w.scale)
    vws = views(rng_a, sd_tilt=8.0)
    if len(vws) == 2 and rng_a.random() < 0.08:
        vws = [vws[int(rng_a.integers(2))]]
    rows_out = []
    for k, (vp, view0) in enumerate(vws):
        view = view0 @ mirror
        det = rg.Detector(ROWS, COLS, pix, cx=rng_a.normal(0, 6), cy=(10 if region == "FOREARM" else -4) * w.scale
                          + rng_a.normal(0, 7))
        img, mbox = render(rng_a, rng_i, bones, soft, cast, cast_kind, view, det, sc, side)
        boxes, visible = _view_boxes(rng_a, img, mbox, mpts, view, det,
                                     fx if fractured else None, sites)
        sop = uids.make("sop", 1, k + 1)
        ds = rg.xray_dataset(modality=modality, patient=patient, study=study, series=series, equipment=eq,
                             sop_instance_uid=sop, instance_number=k + 1, image=img, bits_stored=bits,
                             photometric=photometric, pixel_mm=pix, view_position=vp, laterality=side,
                             body_part_code=WRIST_CODE, burned_in=any(b["label"] == "text" for b in boxes),
                             kvp=sc.kvp, exposure_mas=sc.mas,
                             content_time=(dt.datetime.combine(study.date, study.time)
                                           + dt.timedelta(seconds=45 * k)).time())
        write_dataset(ds, job.out)
        label = int(visible)
        if rng_l.random() < job.label_noise:
            label = 1 - label
        rows_out.append({"study_uid": study.study_uid, "sop_instance_uid": sop, "patient_id": patient.patient_id,
                         "label": label, "label_true": int(visible), "fracture_visible": int(visible),
                         "view_position": vp, "study_fracture": int(fractured),
                         "fracture_kind": fx.kind if fractured else None, "cast": cast_kind,
                         "implant": bool(metal_parts), "boxes": boxes, "task": TASK})
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
