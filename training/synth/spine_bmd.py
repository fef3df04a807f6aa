"""Synthetic axial lumbar/abdominal CT with per-vertebra bone-density classes.

Anatomy in patient coordinates (LPS, mm): L1-L5 (:mod:`training.synth.spine_anatomy`: bodies with a
concave posterior margin, waist, cortical shell and endplates, pedicles, laminae, spinous, transverse and
articular processes, the canal; shape modes for size, width/depth, height, canal and posterior
elements; scoliosis with axial rotation, lordosis), intervertebral discs, the sacrum's top below L5, psoas
and back muscles, aorta, IVC, kidneys, abdominal organs and fat (:mod:`training.synth.spine_organs`),
air outside. The patient lies off-centre in the field of view and the DICOM patient origin is random.

Partial volume is exact along z for the column (each structure contributes the overlap of its z extent
with the slice thickness, per pixel where an endplate is depressed), sampled at three depths of the slab
for the organs, and linear over one pixel in-plane. Trabecular bone carries an anisotropic (vertically
elongated) band-pass texture. The image is blurred by the kernel's PSF and gets correlated noise whose
strength and grain follow the kernel (sharp bone kernels: more, finer noise).

Confounders, as in opportunistic screening on routine abdominal CT: contrast phases (which also raise
trabecular HU a little), tube voltage (100-140 kVp scales bone HU), a per-scanner calibration offset,
degenerative endplate sclerosis, diffuse sclerosis and osteophytes (more with age, raising HU but not the
T-score), compression fractures (more likely at a low T-score; compaction raises HU), Schmorl nodes,
vacuum discs, oral contrast and calcified aortic plaque.

Ground truth (:mod:`training.synth.spine_truth`): a DXA-like patient T-score (age and sex dependent), a
per-vertebra T-score around it, WHO classes from that (normal T >= -1, osteopenia -2.5 < T < -1,
osteoporosis T <= -2.5). Trabecular HU follows the T-score as loosely as in clinics (r ~ 0.55 at the
default difficulty), so no single measurable number determines the class.
The manifest row holds per level the class, T-score, true and measured trabecular HU, findings, slice
range, mid-body slices and their SOP UIDs, boxes of the body on the mid-body slices, and the study's
contrast and scanner description.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import scipy.fft as sfft
from scipy.ndimage import gaussian_filter

from training.synth.common import (
    DEFAULT_DIFFICULTY,
    Equipment,
    UidSource,
    body_part_string,
    new_patient,
    new_series,
    new_study,
    standard_normal32,
)
from training.synth.params import Param
from training.synth.runner import StudyJob, generate_studies
from training.synth.spine_anatomy import (
    ShapeModes,
    Vertebra,
    VertebraRaster,
    draw_column,
    ellipse,
    mix,
    sclerosis_hu,
    z_overlap,
)
from training.synth.spine_organs import PHASES, draw_organs, mix_ellipsoid
from training.synth.spine_truth import (
    BONE_ENHANCEMENT,
    CLASSES,
    LEVELS,
    Scanner,
    degeneration_grade,
    draw_scanner,
    draw_t_scores,
    measured_bone_hu,
    true_trabecular_hu,
    who_class,
)
from training.synth.volume import VolumeGeometry, write_slice_series

log = logging.getLogger(__name__)

__all__ = ["CLASSES", "LEVELS", "PARAMS", "PHASES", "TASK", "draw_t_scores", "generate", "make_study", "preview",
           "render", "who_class"]

TASK = "spine_bmd"
AGE_RANGE = (40.0, 90.0)
EQUIPMENT = (
    Equipment("SIEMENS", "SOMATOM Definition AS+", station="CT01"),
    Equipment("GE MEDICAL SYSTEMS", "Revolution CT", station="CT02"),
    Equipment("Philips", "iCT 256", station="CT03"),
    Equipment("Canon Medical Systems", "Aquilion ONE", station="CT04"),
)
#: ``params`` this generator takes (training.synth.params); the ``no_*`` switches exist for ablations only
PARAMS = {
    "n": Param(int, "in-plane matrix (default 256 or 320)"),
    "pixel_spacing": Param(float, "in-plane pixel spacing in mm (default 0.6-0.9)"),
    "thickness": Param(float, "slice thickness in mm (default 1.5, 2.0, 2.5 or 3.0)"),
    "t_shift": Param(float, "patient mean T-score (the per-vertebra scatter stays)"),
    "phase": Param(str, "contrast phase (default: drawn, a third native)", tuple(PHASES)),
    "degeneration": Param(float, "force the degenerative grade 0..1 (default: drawn from age)"),
    "no_fractures": Param(int, "1: ablation, no compression fractures (default 0)", (0, 1)),
    "no_degeneration": Param(int, "1: ablation, no sclerosis, osteophytes or vacuum discs (default 0)", (0, 1)),
}


@dataclass(frozen=True)
class Acquisition:
    """Matrix, pixel spacing, slice thickness and scanner of one study."""

    n: int
    px: float
    thick: float
    scanner: Scanner


def _texture(rng: np.random.Generator, shape: tuple[int, int, int], px: float, thick: float) -> np.ndarray:
    """Trabecular texture: band-pass noise elongated along z (vertical trabeculae), study-specific grain."""
    tex = standard_normal32(rng, shape)
    spec = sfft.rfftn(tex, workers=1)
    peak, width = rng.uniform(0.3, 0.5), rng.uniform(0.12, 0.2)
    fz, fy, fx = ((2.0 * sfft.fftfreq(shape[0], thick)) ** 2, sfft.fftfreq(shape[1], px) ** 2,
                  sfft.rfftfreq(shape[2], px) ** 2)
    f = np.sqrt(fz.astype(np.float32)[:, None, None] + (fy[:, None] + fx[None, :]).astype(np.float32)[None])
    spec *= np.exp(-0.5 * ((f - np.float32(peak)) / np.float32(width)) ** 2)
    tex = sfft.irfftn(spec, s=shape, workers=1)
    tex *= float(rng.uniform(20.0, 40.0)) / (tex.std() + 1e-9)
    return tex


def _background(rng: np.random.Generator, x: np.ndarray, y: np.ndarray, px: float, fat_shift: float
                ) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float, float]]:
    """Body outline, subcutaneous fat, muscle and mesentery (constant along z); the body lies off-centre."""
    body_a, body_b = rng.uniform(140.0, 190.0), rng.uniform(110.0, 150.0)
    body_cy, body_cx = 95.0 - body_b, float(rng.normal(0.0, 6.0))
    bg = np.full(x.shape, -1000.0, dtype=np.float32)
    mix(bg, ellipse(x, y, body_cx, body_cy, body_a, body_b, px), -100.0 + fat_shift + rng.normal(0, 8))
    fat = rng.uniform(10.0, 35.0)
    inner_body = ellipse(x, y, body_cx, body_cy, body_a - fat, body_b - fat, px)
    mix(bg, inner_body, 35.0)
    mix(bg, ellipse(x, y, body_cx, -70.0, body_a * 0.6, 45.0, px), rng.uniform(-60.0, 20.0) + fat_shift)
    for side in (-1, 1):
        mix(bg, ellipse(x, y, side * rng.uniform(29.0, 35.0), 55.0, rng.uniform(19.0, 25.0), 24.0, px), 50.0)
        mix(bg, ellipse(x, y, side * 70.0, 20.0, 28.0, 45.0, px), 10.0 + fat_shift)
    return bg, inner_body, (body_cy, body_a, body_b, fat)


def _coverage(rng: np.random.Generator, column: list[Vertebra], thick: float) -> np.ndarray:
    """Slice centres (inferior -> superior): from above L1 to somewhere in L5 or the sacrum, <= 120 slices."""
    sacrum_top = column[-1].disc0
    z_hi = rng.uniform(3.0, 15.0)
    z_lo = max(rng.uniform(sacrum_top - 15.0, column[-1].zc), z_hi - 119 * thick)
    n_sl = int(np.floor((z_hi - z_lo) / thick)) + 1
    return z_hi - (n_sl - 1) * thick + np.arange(n_sl) * thick


def render(rng: np.random.Generator, acq: Acquisition, t_scores: np.ndarray, difficulty: float,
           age: float = 65.0, phase: str | None = None, *, degeneration: float | None = None,
           fractures: bool = True, degenerative: bool = True) -> tuple[np.ndarray, np.ndarray, list[Vertebra], tuple[float, float],
                                            dict[str, Any], dict[str, Any]]:
    """Render the HU volume (slices from inferior to superior).

    Returns the ``(S, n, n)`` float32 HU volume, slice centre z (mm), the vertebrae L1-L5 (geometry,
    measured trabecular HU and findings), the grid's in-plane origin (x, y of pixel 0,0 in the anatomy
    frame), the contrast description (:func:`draw_organs`) and the per-level truth extras.
    """
    n, px, thick, sc = acq.n, acq.px, acq.thick, acq.scanner
    modes, cortex_z = ShapeModes.draw(rng), float(np.clip(rng.normal(), -2.5, 2.5))
    grade = degeneration_grade(rng, age) if degeneration is None else float(degeneration)
    true_hu = true_trabecular_hu(rng, t_scores, difficulty, size_z=modes.size, cortex_z=cortex_z,
                                 degeneration=grade)
    column = draw_column(rng, LEVELS, modes, cortex_z, grade, t_scores)
    extras: dict[str, Any] = {}
    if not fractures:
        for v in column:
            v.fracture, v.height_loss = "", 0.0
    z = _coverage(rng, column, thick)
    cx0, cy0 = float(rng.normal(0.0, 12.0)), float(rng.uniform(-5.0, 30.0))
    c = (np.arange(n) - n // 2) * px
    x, y = (g.astype(np.float32) for g in np.meshgrid(c + cx0, c + cy0))  # float32: half the memory traffic
    bg, inner_body, body = _background(rng, x, y, px, sc.fat_shift)
    levels = {v.name: {"z0": v.z0, "z1": v.z1, "zc": v.zc} for v in column}
    organs, vessels, contrast = draw_organs(rng, levels, age, body, phase)
    lo, hi = BONE_ENHANCEMENT[contrast["phase"]]
    enhancement = lo + (hi - lo) * float(rng.random())
    contrast["bone_enhancement_hu"] = round(enhancement * sc.iodine_factor, 1)
    for i, v in enumerate(column):
        diffuse, compaction = sclerosis_hu(rng, v, grade, i)
        if not degenerative:  # ablation: the same draws, no degenerative change in the image
            diffuse, v.band_mm, v.band_hu, v.osteophytes, v.vacuum = 0.0, 0.0, 0.0, [], False
        extra = diffuse + compaction
        v.trab_hu = measured_bone_hu(float(true_hu[i]), extra, sc, enhancement)
        v.cort_hu *= sc.bone_factor
        extras[v.name] = {"true_trabecular_hu": round(float(true_hu[i]), 1), "sclerosis_hu": round(extra, 1)}
    extras["_degeneration"] = round(grade, 3)
    vol = np.repeat(bg[None], len(z), axis=0)
    by_z = sorted(column, key=lambda v: v.zc)
    zcs = [v.zc for v in by_z]
    body_cx = np.interp(z, zcs, [v.cx for v in by_z])
    body_front = np.interp(z, zcs, [v.cy - v.b for v in by_z])
    for k in range(len(z)):
        for organ in organs:
            mix_ellipsoid(vol[k], x, y, px, organ, float(z[k]), thick, inner_body)
        vessels.draw(vol[k], x, y, px, float(z[k]), thick, float(body_cx[k]), float(body_front[k]))
        grow = np.clip((column[0].z1 - z[k]) / 150.0, 0.15, 1.0)  # psoas grows going down
        for side in (-1, 1):
            mix(vol[k], ellipse(x, y, side * (30.0 + 12 * grow), 2.0, 8 + 14 * grow, 8 + 10 * grow, px), 50.0)
    tex = _texture(rng, vol.shape, px, thick)
    post_hu = float(rng.uniform(380.0, 480.0)) * sc.bone_factor
    for v in column:
        raster = VertebraRaster(v, x, y, px)
        for k in np.nonzero((z > v.disc0 - thick) & (z < v.z1 + thick))[0]:
            raster.draw(vol[k], float(z[k]), thick, tex[k], post_hu)
    _sacrum(vol, x, y, px, z, thick, column[-1])
    return vol, z, column, (float(c[0] + cx0), float(c[0] + cy0)), contrast, extras


def _sacrum(vol: np.ndarray, x: np.ndarray, y: np.ndarray, px: float, z: np.ndarray, thick: float,
            l5: Vertebra) -> None:
    """S1 body (wide) and the sacral alae below L5's disc, where covered."""
    top = l5.disc0
    fz_s = z_overlap(z, thick, top - 40.0, top)
    for k in np.nonzero(fz_s > 0)[0]:
        mix(vol[k], fz_s[k] * ellipse(x, y, l5.cx, l5.cy + 8, 26.0, 17.0, px), l5.trab_hu + 20.0)
        for side in (-1, 1):
            mix(vol[k], fz_s[k] * ellipse(x, y, l5.cx + side * 45.0, l5.cy + 25.0, 22.0, 16.0, px), 250.0)


def make_study(job: StudyJob) -> list[dict[str, Any]]:
    """Write one axial lumbar CT series and return its manifest row."""
    rng_a, rng_n, rng_l = job.rng("anatomy"), job.rng("noise"), job.rng("labels")
    p = job.params
    uids = UidSource(f"{TASK}:{job.seed}")
    patient = new_patient(rng_a, AGE_RANGE, sex="F" if rng_a.random() < 0.6 else "M")
    n = int(p.get("n", int(rng_a.choice([256, 320], p=[0.7, 0.3]))))
    px = float(p.get("pixel_spacing", rng_a.uniform(0.6, 0.9)))
    thick = float(p.get("thickness", rng_a.choice([1.5, 2.0, 2.5, 3.0])))
    eq = EQUIPMENT[int(rng_a.integers(len(EQUIPMENT)))]
    scanner = draw_scanner(rng_a, eq.manufacturer)
    t_scores = draw_t_scores(rng_l, patient.age_years, patient.sex)
    if "t_shift" in p:
        t_scores = t_scores - t_scores.mean() + float(p["t_shift"])
    hu, z, column, grid0, contrast, extras = render(
        rng_a, Acquisition(n, px, thick, scanner), t_scores, job.difficulty, patient.age_years, p.get("phase"),
        degeneration=p.get("degeneration"), fractures=not p.get("no_fractures", False),
        degenerative=not p.get("no_degeneration", False))
    hu = gaussian_filter(hu, sigma=(0.0, scanner.psf_mm / px, scanner.psf_mm / px))
    noise = gaussian_filter(standard_normal32(rng_n, hu.shape), sigma=(0.0, scanner.noise_corr, scanner.noise_corr))
    hu += noise * (scanner.noise_hu / (noise.std() + 1e-9))
    # the patient coordinate system's origin is wherever the scanner put it (table height and position)
    shift = (float(rng_a.normal(0.0, 15.0)), float(rng_a.uniform(-40.0, 80.0)), float(rng_a.uniform(-900.0, 300.0)))
    origin = (grid0[0] + shift[0], grid0[1] + shift[1], float(z[0]) + shift[2])
    sops, study, series = _write(job, rng_a, uids, patient, eq, hu, (px, thick, origin), scanner, contrast)
    row = _truth(job, rng_l, column, t_scores, z, sops, grid0, px, n, extras)
    return [{"study_uid": study.study_uid, "patient_id": patient.patient_id, "task": TASK, **row,
             "series_uid": series.series_uid, "n_slices": len(sops), "contrast": contrast,
             "scanner": {"kvp": scanner.kvp, "kernel": scanner.kernel, "calibration_offset_hu": round(scanner.offset, 1)},
             "degeneration": extras["_degeneration"]}]


def _write(job: StudyJob, rng: np.random.Generator, uids: UidSource, patient: Any, eq: Equipment, hu: np.ndarray,
           geometry: tuple[float, float, tuple[float, float, float]], scanner: Scanner, contrast: dict[str, Any]
           ) -> tuple[list[str], Any, Any]:
    """Write the series; return its SOP Instance UIDs (slice order), study and series."""
    px, thick, origin = geometry
    canonical = str(rng.choice(["LSPINE", "SPINE", "ABDOMEN"], p=[0.45, 0.2, 0.35]))
    study = new_study(rng, uids, patient, "CT ABDOMEN" if canonical == "ABDOMEN" else "CT LWS")
    enhanced = contrast["phase"] != "native"
    region = "Abdomen" if canonical == "ABDOMEN" else "LWS"
    series = new_series(uids, int(rng.integers(2, 6)), "CT", body_part_string(rng, canonical, 0.3),
                        description=f"{region} {'KM ' if enhanced else ''}{thick:g}mm Knochen",
                        protocol=f"{region} {'KM ' + contrast['phase'] if enhanced else 'nativ'}")
    geom = VolumeGeometry("axial", (px, px), thick, thick, origin)
    extra: dict[str, Any] = {"KVP": str(scanner.kvp), "XRayTubeCurrent": int(rng.integers(120, 350)),
                             "ExposureTime": 500, "ConvolutionKernel": scanner.kernel,
                             "ReconstructionDiameter": f"{px * hu.shape[1]:.4g}", "ScanOptions": "HELICAL"}
    if enhanced or contrast["oral_contrast"]:  # Contrast/Bolus module
        agents = (["Iomeprol 350"] if enhanced else []) + (["Gastrografin"] if contrast["oral_contrast"] else [])
        extra["ContrastBolusAgent"] = " + ".join(agents)
        extra["ContrastBolusRoute"] = "IV" if enhanced else "ORAL"
    sops = write_slice_series(job.out, hu, geom, modality="CT", patient=patient, study=study, series=series,
                              equipment=eq, uids=uids, slope=1.0, intercept=-1024.0, rescale_type="HU",
                              window=((500.0, 40.0), (2000.0, 400.0)),
                              window_explanation=["BONE", "ABDOMEN"], signed=False, bits_stored=12,
                              extra=extra)
    return sops, study, series


def _truth(job: StudyJob, rng: np.random.Generator, column: list[Vertebra], t_scores: np.ndarray, z: np.ndarray,
           sops: list[str], grid0: tuple[float, float], px: float, n: int, extras: dict[str, Any]
           ) -> dict[str, Any]:
    """Per-level classes (with label noise), detail and the body boxes on the mid-body slices."""
    vertebrae: dict[str, str] = {}
    detail: dict[str, dict[str, Any]] = {}
    boxes: list[dict[str, Any]] = []
    worst = 0
    for i, v in enumerate(column[:4]):
        cls = who_class(float(t_scores[i]))
        noisy = cls
        if rng.random() < job.label_noise:
            noisy = CLASSES[int(np.clip(CLASSES.index(cls) + rng.choice([-1, 1]), 0, 2))]
        inside = np.nonzero((z >= v.z0) & (z <= v.z1))[0]
        if not len(inside):
            continue
        mid = [int(k) for k in inside if abs(z[k] - v.zc) <= 0.25 * v.height] or [int(inside[len(inside) // 2])]
        vertebrae[v.name] = noisy
        worst = max(worst, CLASSES.index(noisy))
        detail[v.name] = {"class": noisy, "class_true": cls, "t_score": round(float(t_scores[i]), 3),
                          "trabecular_hu": round(v.trab_hu, 1), **extras[v.name], **v.findings(),
                          "slices": [int(inside[0]), int(inside[-1])], "mid_slices": mid,
                          "mid_sops": [sops[k] for k in mid]}
        for k in mid:
            waist = 1.0 - 0.06 * (1.0 - ((z[k] - v.zc) / (0.5 * v.height)) ** 2)
            col, row = (v.cx - grid0[0]) / px, (v.cy - grid0[1]) / px
            ha, hb = (e / px for e in v.half_extent(waist))
            boxes.append({"sop_instance_uid": sops[k], "x0": round(max(col - ha, 0.0), 2),
                          "y0": round(max(row - hb, 0.0), 2), "x1": round(min(col + ha, n - 1.0), 2),
                          "y1": round(min(row + hb, n - 1.0), 2), "label": noisy, "level": v.name})
    return {"label": CLASSES[worst], "vertebrae": vertebrae, "levels": detail, "boxes": boxes}


def generate(out: Path, n: int, seed: int, *, workers: int = 2, difficulty: float = DEFAULT_DIFFICULTY,
             label_noise: float = 0.02, params: dict[str, Any] | None = None) -> Path:
    """Write ``n`` synthetic lumbar CT studies under ``out``; return the manifest path.

    ``params``: the names of :data:`PARAMS`.
    """
    return generate_studies(Path(out), n, seed, make_study, workers=workers, difficulty=difficulty,
                            label_noise=label_noise, params=params, param_spec=PARAMS)


def preview(out_png: Path, n: int, seed: int) -> Path:
    """Contact sheet of ``n`` studies with their per-vertebra boxes and classes."""
    from training.synth.preview import contact_sheet

    return contact_sheet(TASK, Path(out_png), n, seed)
