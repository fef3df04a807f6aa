"""Coded concepts shared by the tasks (which produce Findings) and the result writers.

Every code here was taken from pydicom's code dictionary (``pydicom.sr.codedict``,
generated from PS3.16) or is a well-known SNOMED CT concept whose value and
meaning were checked against published references (osteoporosis, osteopenia,
magnetic resonance imaging). Task modules use these constants instead of
defining their own; :mod:`dicomnode.results.codes` re-exports them.
"""

from __future__ import annotations

from inference.findings import DCM, SCT, Code

# --- anatomy (CID 4031 / 7304 style SNOMED CT body structures) -----------------------------------
WRIST = Code("8205005", SCT, "Wrist")
WRIST_JOINT = Code("74670003", SCT, "Wrist joint")
FOREARM = Code("14975008", SCT, "Forearm")
HAND = Code("85562004", SCT, "Hand")
RADIUS = Code("131190003", SCT, "Radius")
ULNA = Code("23416004", SCT, "Ulna")
DISTAL_RADIUS = Code("75129005", SCT, "Distal Radius")
DISTAL_ULNA = Code("91238003", SCT, "Distal Ulna")
DISTAL_TIBIA = Code("64605006", SCT, "Distal Tibia")
FEMUR = Code("71341001", SCT, "Femur")
TIBIA = Code("12611008", SCT, "Tibia")
FIBULA = Code("87342007", SCT, "Fibula")
PATELLA = Code("64234005", SCT, "Patella")
KNEE = Code("72696002", SCT, "Knee")
LUMBAR_SPINE = Code("122496007", SCT, "Lumbar spine")
L1 = Code("66794005", SCT, "L1 vertebra")
L2 = Code("14293000", SCT, "L2 vertebra")
L3 = Code("36470004", SCT, "L3 vertebra")
L4 = Code("11994002", SCT, "L4 vertebra")
L5 = Code("49668003", SCT, "L5 vertebra")
LUMBAR_VERTEBRAE = {"L1": L1, "L2": L2, "L3": L3, "L4": L4, "L5": L5}
BONE = Code("272673000", SCT, "Bone")

# --- laterality (CID 244) ---------------------------------------------------------------------------
LEFT = Code("7771000", SCT, "Left")
RIGHT = Code("24028007", SCT, "Right")
BILATERAL = Code("51440002", SCT, "Bilateral")

# --- segmentation property categories (CID 7150) ----------------------------------------------------
ANATOMICAL_STRUCTURE = Code("91723000", SCT, "Anatomical Structure")
TISSUE = Code("85756007", SCT, "Tissue")

# --- findings and values ---------------------------------------------------------------------------
FINDING = Code("121071", DCM, "Finding")
NORMAL = Code("17621005", SCT, "Normal")
ABNORMAL = Code("263654008", SCT, "Abnormal")
OSTEOPENIA = Code("312894000", SCT, "Osteopenia")
OSTEOPOROSIS = Code("64859006", SCT, "Osteoporosis")
IMAGE_ARTIFACTS = Code("111207", DCM, "Image artifact(s)")
IMAGE_QUALITY_RATING = Code("111029", DCM, "Image Quality Rating")
VOLUME = Code("118565006", SCT, "Volume")
ATTENUATION_COEFFICIENT = Code("112031", DCM, "Attenuation Coefficient")  # e.g. mean trabecular HU
MEAN = Code("373098007", SCT, "Mean")  # measurement derivation

# --- algorithm and procedure -------------------------------------------------------------------------
ARTIFICIAL_INTELLIGENCE = Code("123110", DCM, "Artificial Intelligence")
IMAGING_PROCEDURE = Code("363679005", SCT, "Imaging procedure")
COMPUTED_TOMOGRAPHY = Code("77477000", SCT, "Computed tomography")
MAGNETIC_RESONANCE_IMAGING = Code("113091000", SCT, "Magnetic resonance imaging")
PLAIN_RADIOGRAPHY = Code("168537006", SCT, "Plain radiography")

# --- HR-pQCT motion grading (hrpqct_motion) ----------------------------------------------------------
# No standard code exists for the manufacturer's 1-5 visual motion scale, so the grade concepts use the
# project's local coding scheme (PS3.16 Section 8: private coding scheme designators start with "99").
LOCAL = "99BDN"
YES = Code("373066001", SCT, "Yes")
NO = Code("373067005", SCT, "No")
PATIENT_MOTION = Code("128553", DCM, "Patient motion")
MOTION_ARTIFACT_GRADE = Code("MOTION-GRADE", LOCAL, "Motion artifact grade")
MOTION_ARTIFACT_SCORE = Code("MOTION-SCORE", LOCAL, "Motion artifact score")  # the grade as a number 1-5
EXPECTED_MOTION_ARTIFACT_GRADE = Code("MOTION-GRADE-EXP", LOCAL, "Expected motion artifact grade")
RESCAN_RECOMMENDED = Code("RESCAN", LOCAL, "Rescan recommended")
GRADE_UNIT = Code("{grade}", "UCUM", "grade")
MOTION_GRADES = {
    1: Code("MOTION-GRADE-1", LOCAL, "Motion grade 1 (no visible motion)"),
    2: Code("MOTION-GRADE-2", LOCAL, "Motion grade 2 (slight motion)"),
    3: Code("MOTION-GRADE-3", LOCAL, "Motion grade 3 (moderate motion)"),
    4: Code("MOTION-GRADE-4", LOCAL, "Motion grade 4 (severe motion)"),
    5: Code("MOTION-GRADE-5", LOCAL, "Motion grade 5 (very severe motion)"),
}

# --- Paediatric growth-plate fractures (physis_fracture) ----------------------------------------------
# No SNOMED concept for "fracture of the growth plate" is used here without a licensed browser to check
# it, so the finding and its site use the local scheme; the generic Fracture concept stays SCT 72704001.
GROWTH_PLATE = Code("GROWTH-PLATE", LOCAL, "Growth plate (physis)")
GROWTH_PLATE_FRACTURE = Code("PHYSIS-FX", LOCAL, "Fracture of growth plate")
SALTER_HARRIS_TYPE = Code("SALTER-HARRIS", LOCAL, "Salter-Harris type")
