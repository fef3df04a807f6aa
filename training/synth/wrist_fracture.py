"""Synthetic adult wrist radiographs (PA + lateral) with and without distal radius fractures.

A study is one phantom (:func:`training.synth.wrist_phantom.wrist_anatomy`: shape modes, hand pose,
soft-tissue layers, degenerative change with age) seen in a PA and a lateral view through a drawn scanner
(:mod:`training.synth.radiograph_texture`: kVp, dose, DX or CR detector, vendor processing, trabecular
texture), with label-independent confounders: casts and splints, implants, overlapping soft tissue.
A fracture (:func:`training.synth.fractures.wrist_fracture`) is an undisplaced hairline or a displaced
fracture with tilt, impaction, comminution and in about half an ulnar styloid fracture; whether it shows in
a view follows from the geometry (:func:`training.synth.fractures.visible_sites`). The manifest row holds
the study label, a fracture box on each image and site where it is visible, and per image
``views[].fracture_visible``.

``difficulty`` in [0, 1] is about the share of undisplaced fractures and lowers the dose
(training/README.md gives the reasoning behind the default).
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
    Equipment,
    UidSource,
    body_part_string,
    choose_bits_stored,
    choose_photometric,
    new_patient,
    new_series,
    new_study,
    write_dataset,
)
from training.synth.params import FORCE_LABEL, Param
from training.synth.runner import StudyJob, generate_studies

TASK = "wrist_fracture"
PREVALENCE = 0.31
#: about a third of the fractures undisplaced (hairline), two thirds displaced/angulated, as in an adult
#: emergency department's distal radius fractures; chosen from that mix, not from a model (training/README.md)
DEFAULT_DIFFICULTY = 0.3
AGE_RANGE = (18.0, 90.0)
#: ``params`` this generator takes (training.synth.params)
PARAMS = {"force_label": FORCE_LABEL,
          "confounders": Param(int, "1 (default): casts, implants and overlapping soft tissue drawn as usual; "
                                    "0: none (an ablation)", (0, 1))}
#: share of studies with each label-independent confounder
P_CAST, P_IMPLANT, P_OVERLAP = 0.10, 0.05, 0.25
EQUIPMENT = (
    Equipment("SIEMENS", "Ysio Max", station="RAD01"), Equipment("Philips Medical Systems", "DigitalDiagnost"),
    Equipment("Carestream Health", "DRX-Evolution"), Equipment("FUJIFILM Corporation", "FCR Profect CS"),
    Equipment("AGFA", "DX-D 600"),
)
WRIST_CODE = ("74670003", "Wrist joint")
ROWS, COLS = 576, 448  # long side >= 512; the classifier input is 341 x 512


def lerp(a: float, b: float, t: float) -> float:
    """Linear interpolation from ``a`` (t=0) to ``b`` (t=1)."""
    return a + (b - a) * t


def views(rng: np.random.Generator, sd_tilt: float = 6.0) -> list[tuple[str, np.ndarray]]:
    """PA and lateral with positioning error (in-plane tilt, pronation/supination roll); ~8 % one view only."""
    out = [("PA", rg.view_matrix(False, rng.normal(0, sd_tilt), rng.normal(0, 7))),
           ("LL", rg.view_matrix(True, rng.normal(0, sd_tilt), rng.normal(0, 10)))]
    if rng.random() < 0.08:
        out = out[:1] if rng.random() < 0.5 else out[1:]
    return out


def confounders(rng: np.random.Generator, w: wp.Wrist) -> tuple[list[rg.Part], list[rg.Part], str | None]:
    """(metal parts, cast parts, cast kind) drawn without the label: casts, implants; see :data:`P_CAST`."""
    metal = rt.implant_parts(rng, w.radius_x, w.articular_y, w.scale) if rng.random() < P_IMPLANT else []
    cast, kind = rt.cast_parts(rng, w.scale, 1.28) if rng.random() < P_CAST else ([], None)
    return metal, cast, kind


def render(rng_a: np.random.Generator, rng_i: np.random.Generator, bones: list[rg.Part], soft: list[rg.Part],
           cast: list[rg.Part], cast_kind: str | None, view: np.ndarray, det: rg.Detector, sc: rt.Scanner,
           marker: str | None) -> tuple[np.ndarray, dict[str, float] | None]:
    """Project bones, soft tissue, cancellous bone and cast through ``view``; form the processed image."""
    bone_li = rg.project(bones, view, det)
    soft_li = rg.project([], view, det, smooth=soft)
    trab = rt.trabecular_map(bones, view, det)
    cast_li = (rg.project([], view, det, smooth=cast), str(cast_kind)) if cast else None
    return rt.acquire(rng_i, bone_li, soft_li, det, sc, trabecular=trab, cast=cast_li, marker=marker,
                      collimation_tight=float(rng_a.random()))


def _fracture_boxes(fx: fr.Fracture, sites: dict[str, np.ndarray], view: np.ndarray, det: rg.Detector,
                    sop: str) -> list[dict[str, Any]]:
    """The fracture boxes of one view: one per fracture site that shows in it and projects onto the detector."""
    boxes = []
    for site, shows in fr.visible_sites(fx, view).items():
        box = rg.box_of_points(sites[site], view, det) if shows and site in sites else None
        if box is not None:
            boxes.append({"sop_instance_uid": sop, **box, "label": "fracture"})
    return boxes


def make_study(job: StudyJob) -> list[dict[str, Any]]:
    """Write one adult wrist study (1-2 images) and return its manifest row."""
    rng_a, rng_i, rng_l = job.rng("anatomy"), job.rng("image"), job.rng("labels")
    uids = UidSource(f"{TASK}:{job.seed}")
    patient = new_patient(rng_a, AGE_RANGE)
    study = new_study(rng_a, uids, patient, str(rng_a.choice(["XR WRIST 2 VIEWS", "RX MUNECA", "HANDGELENK 2 EBENEN",
                                                               "WRIST"])))
    side = str(rng_a.choice(["L", "R"]))
    force = job.params.get("force_label")
    fractured = bool(rng_l.random() < PREVALENCE) if force is None else bool(force)
    w = wp.wrist_anatomy(rng_a, patient.age_years)
    fx = fr.wrist_fracture(rng_a, w, job.difficulty)
    if fractured:
        radius, other, sites = fr.apply(fx, w.radius, w.epiphyses, w.other)
    else:
        radius, other, sites = [*w.radius, *w.epiphyses], w.other, {}
    metal, cast, cast_kind = confounders(rng_a, w)
    soft = [*w.soft, *(rt.overlap_parts(rng_a, w.scale) if rng_a.random() < P_OVERLAP else [])]
    if not job.params.get("confounders", 1):
        metal, cast, cast_kind, soft = [], [], None, w.soft
    mirror = rg.rot("y", 180.0) if side == "L" else np.eye(3)
    bones = [*other, *radius, *metal]
    vendor = int(rng_a.integers(len(EQUIPMENT)))
    eq = EQUIPMENT[vendor]
    modality = "CR" if eq.model.startswith("FCR") else "DX"
    sc = rt.draw_scanner(rng_a, modality, job.difficulty, vendor)
    series = new_series(uids, 1, modality, body_part_string(rng_a, str(rng_a.choice(["WRIST", "WRIST", "HAND"]))),
                        description="WRIST PA/LAT")
    photometric = choose_photometric(rng_a, 0.3)
    bits = choose_bits_stored(rng_a, (12, 14, 16))
    pix = float(rng_a.uniform(0.29, 0.36))
    boxes, view_rows = [], []
    for k, (vp, view0) in enumerate(views(rng_a)):
        view = view0 @ mirror
        det = rg.Detector(ROWS, COLS, pix, cx=rng_a.normal(0, 8), cy=-8 + rng_a.normal(0, 10))
        img, _ = render(rng_a, rng_i, bones, soft, cast, cast_kind, view, det, sc,
                        side if rng_a.random() < 0.9 else None)
        sop = uids.make("sop", 1, k + 1)
        ds = rg.xray_dataset(modality=modality, patient=patient, study=study, series=series, equipment=eq,
                             sop_instance_uid=sop, instance_number=k + 1, image=img, bits_stored=bits,
                             photometric=photometric, pixel_mm=pix, view_position=vp, laterality=side,
                             body_part_code=WRIST_CODE, burned_in=False, kvp=sc.kvp, exposure_mas=sc.mas,
                             content_time=(dt.datetime.combine(study.date, study.time)
                                           + dt.timedelta(seconds=40 * k)).time())
        write_dataset(ds, job.out)
        view_boxes = _fracture_boxes(fx, sites, view, det, sop) if fractured else []
        boxes.extend(view_boxes)
        visible = bool(view_boxes)
        view_rows.append({"sop_instance_uid": sop, "view_position": vp, "fracture_visible": int(visible)})
    label = int(fractured)
    if rng_l.random() < job.label_noise:
        label = 1 - label
    return [{"study_uid": study.study_uid, "patient_id": patient.patient_id, "label": label,
             "label_true": int(fractured), "boxes": boxes, "views": view_rows,
             "fracture_kind": fx.kind if fractured else None,
             "findings": list(fx.findings) if fractured else [], "cast": cast_kind,
             "implant": bool(metal), "task": TASK}]


def generate(out: Path, n: int, seed: int, *, workers: int = 2, difficulty: float = DEFAULT_DIFFICULTY,
             label_noise: float = 0.02, params: dict[str, Any] | None = None) -> Path:
    """Write ``n`` synthetic adult wrist studies under ``out``; return the manifest path."""
    return generate_studies(Path(out), n, seed, make_study, workers=workers, difficulty=difficulty,
                            label_noise=label_noise, params=params, param_spec=PARAMS)


def preview(out_png: Path, n: int, seed: int) -> Path:
    """Contact sheet of ``n`` studies with labels and boxes."""
    from training.synth.preview import contact_sheet

    return contact_sheet(TASK, Path(out_png), n, seed)
