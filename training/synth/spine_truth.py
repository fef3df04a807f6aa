"""Ground truth and measurement model of the synthetic lumbar CT (``spine_bmd``), issue 34.

The class of a vertebra is the WHO class of a DXA-like T-score; what the CT shows is linked to it as
loosely as in clinics. Published correlations of lumbar trabecular CT attenuation (HU) with DXA are moderate:
r = 0.56 between the lowest L1-L4 HU and DXA BMD in 114 women (Radiography 2015, "Hounsfield unit for the
diagnosis of bone mineral density disease"), similar figures in Schreiber et al. (J Bone Joint Surg Am
2011;93:1057-63) and Hendrickson, Pickhardt et al. (Iowa Orthop J 2018;38:25-31), and an L1 160/110 HU
rule reaches an AUC of about 0.83 for DXA osteoporosis (Pickhardt et al., Ann Intern Med 2013;158:588-95).
DXA and trabecular CT disagree for reasons that are partly invisible on the CT (DXA is areal and includes
the cortex, posterior elements and facet degeneration, which raise it falsely; Lee et al., Nerve 2021) and
partly visible confounders of the HU measurement itself:

* **true trabecular HU** (native, 120 kVp, calibrated scanner): ``193 + 33 T`` (the old generator's mean
  relation, so the 160/110 HU rule is calibrated on average) plus a patient-level DXA-CT discordance and a
  per-vertebra term (:func:`true_trabecular_hu`);
* **measured HU** (:func:`measured_bone_hu`): degenerative sclerosis and fracture compaction add density
  that DXA's T-score does not reflect; the tube voltage scales bone HU (about +15 % at 100 kVp, -8 % at
  140 kVp); IV contrast raises trabecular HU (portal venous about +10-20 HU, arterial less; Pickhardt et
  al., AJR 2011;196:W556-61 report ~+11 HU portal venous); each scanner carries a calibration offset.

At the default difficulty (0.5) the mid-body ROI HU of the generated vertebrae correlates with their
T-score at r ~ 0.55 (``tests/unit/test_synth_spine_truth.py`` bounds it to 0.40-0.70), inside the
published range; the correlation without the visible confounders (true trabecular HU) is ~ 0.7.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

LEVELS = ("L1", "L2", "L3", "L4", "L5")
CLASSES = ("normal", "osteopenia", "osteoporosis")

#: tube voltage -> (probability, bone HU factor range, iodine enhancement factor, fat HU shift)
KVP: dict[int, tuple[float, tuple[float, float], float, float]] = {
    100: (0.30, (1.12, 1.18), 1.25, -12.0),
    120: (0.50, (1.0, 1.0), 1.0, 0.0),
    140: (0.20, (0.90, 0.94), 0.85, 6.0),
}
#: contrast phase -> trabecular enhancement range (HU, at 120 kVp)
BONE_ENHANCEMENT: dict[str, tuple[float, float]] = {
    "native": (0.0, 0.0), "arterial": (2.0, 12.0), "portal_venous": (8.0, 25.0),
}
#: vendor -> scanner calibration offset of bone HU (mean, study-to-study SD)
VENDOR_OFFSET = {"SIEMENS": (0.0, 5.0), "GE MEDICAL SYSTEMS": (6.0, 5.0), "Philips": (-5.0, 5.0),
                 "Canon Medical Systems": (3.0, 5.0)}


def who_class(t_score: float) -> str:
    """WHO class of a T-score: normal T >= -1, osteopenia -2.5 < T < -1, osteoporosis T <= -2.5."""
    if t_score >= -1.0:
        return "normal"
    if t_score > -2.5:
        return "osteopenia"
    return "osteoporosis"


def trabecular_hu(t_score: float) -> float:
    """Mean true trabecular HU of a T-score (native, 120 kVp): the population relation, before any scatter."""
    return 193.0 + 33.0 * t_score


def draw_t_scores(rng: np.random.Generator, age: float, sex: str) -> np.ndarray:
    """Patient-level DXA-like T-score with per-vertebra variation (L1..L5)."""
    loss = 0.045 if sex == "F" else 0.028
    t_patient = rng.normal(0.3 - loss * max(age - 35.0, 0.0), 1.1)
    return t_patient + rng.normal(0.0, 0.3, size=len(LEVELS))


def discordance_sd(difficulty: float) -> float:
    """SD (HU) of the part of the DXA-CT discordance that no image feature explains: 36 HU at difficulty 0.5."""
    return 14.0 + 44.0 * float(difficulty)


def true_trabecular_hu(rng: np.random.Generator, t_scores: np.ndarray, difficulty: float, *,
                       size_z: float = 0.0, cortex_z: float = 0.0, degeneration: float = 0.5) -> np.ndarray:
    """True trabecular HU per level for DXA-like T-scores.

    DXA measures areal BMD through the whole vertebra, so at a given T-score a larger body
    (``size_z``, SDs of the shape mode), a thicker cortex (``cortex_z``) and degenerated posterior elements
    (``degeneration`` 0..1, falsely raising DXA) leave less trabecular density; these are visible on the
    CT. The rest of the discordance is a patient term of :func:`discordance_sd` and a per-vertebra term.
    """
    visible = -(28.0 * size_z + 20.0 * cortex_z + 80.0 * (degeneration - 0.5))
    patient = visible + rng.normal(0.0, discordance_sd(difficulty))
    out = np.array([trabecular_hu(float(t)) for t in t_scores]) + patient + rng.normal(0.0, 10.0, len(t_scores))
    return np.clip(out, 25.0, 400.0)


def fracture_probability(t_score: float) -> float:
    """Chance that a vertebra has an osteoporotic compression fracture: rises with falling T, never certain."""
    return float(min(0.25, 0.012 * np.exp(-0.8 * t_score)))


def degeneration_grade(rng: np.random.Generator, age: float) -> float:
    """Patient's degenerative grade 0..1 (endplate sclerosis, osteophytes): grows with age, not with BMD."""
    return float(np.clip((age - 40.0) / 50.0 + rng.normal(0.0, 0.25), 0.0, 1.0))


@dataclass(frozen=True)
class Scanner:
    """Acquisition and reconstruction of one study."""

    kvp: int
    bone_factor: float
    iodine_factor: float
    fat_shift: float
    offset: float
    psf_mm: float
    noise_hu: float
    noise_corr: float
    kernel: str


#: vendor -> (soft kernel, sharp kernel) names
KERNELS = {"SIEMENS": ("B30f", "B60f"), "GE MEDICAL SYSTEMS": ("STANDARD", "BONE"), "Philips": ("B", "YB"),
           "Canon Medical Systems": ("FC18", "FC30")}


def draw_scanner(rng: np.random.Generator, manufacturer: str) -> Scanner:
    """Tube voltage, calibration offset and kernel (sharp: finer, stronger noise and a narrower PSF)."""
    kvps = list(KVP)
    kvp = int(rng.choice(kvps, p=[KVP[k][0] for k in kvps]))
    _, factor, iodine, fat = KVP[kvp]
    mean, sd = VENDOR_OFFSET.get(manufacturer, (0.0, 5.0))
    sharp = bool(rng.random() < 0.6)
    soft_name, sharp_name = KERNELS.get(manufacturer, ("SOFT", "BONE"))
    low_kv_noise = 1.2 if kvp == 100 else 1.0
    return Scanner(kvp, float(rng.uniform(*factor)), iodine, fat, float(rng.normal(mean, sd)),
                   psf_mm=float(rng.uniform(0.35, 0.55) if sharp else rng.uniform(0.6, 0.9)),
                   noise_hu=float((rng.uniform(18.0, 32.0) if sharp else rng.uniform(8.0, 16.0)) * low_kv_noise),
                   noise_corr=float(rng.uniform(0.5, 0.8) if sharp else rng.uniform(0.9, 1.4)),
                   kernel=sharp_name if sharp else soft_name)


def measured_bone_hu(true_hu: float, extra: float, scanner: Scanner, enhancement: float) -> float:
    """HU the scanner shows for trabecular bone of ``true_hu`` plus ``extra`` (sclerosis, compaction).

    ``enhancement`` is the study's trabecular contrast enhancement at 120 kVp (0 for native).
    """
    return (true_hu + extra) * scanner.bone_factor + enhancement * scanner.iodine_factor + scanner.offset
