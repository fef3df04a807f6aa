"""dciodvfy over many header variants of every generator, not only a test's first file.

Each generator draws its header variants per study (DX or CR, MONOCHROME1/2, bit
depth, BodyPartExamined synonyms, laterality, scanner model, orientation). A test
that validates one file of one study misses most of them: a Type 2C Laterality
error on non-English spine body parts went unnoticed that way. Here 12-24 studies
per generator are generated at small sizes (the headers do not depend on the
matrix size) and the first file of every series goes through dciodvfy.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pydicom
import pytest

from tests.conftest import run_dciodvfy
from training.synth.cli import load_generator

CASES: dict[str, tuple[int, dict[str, Any]]] = {
    "wrist_fracture": (24, {}),
    "physis_fracture": (16, {}),
    "spine_bmd": (12, {"n": 96, "pixel_spacing": 2.0, "thickness": 3.0}),
    "hrpqct_motion": (12, {"n": 64, "n_views": 64, "n_slices": 12}),
    "knee_bone_seg": (12, {"n": 72, "pixel_spacing": 2.0, "thickness": 4.0, "n_slices": 20}),
}


@pytest.mark.slow
@pytest.mark.parametrize("task", sorted(CASES))
def test_every_series_variant_passes_dciodvfy(task: str, tmp_path: Path) -> None:
    n, params = CASES[task]
    load_generator(task).generate(tmp_path, n, 31, workers=2, params=params)  # type: ignore[attr-defined]
    first: dict[str, Path] = {}
    variants: set[tuple[str, ...]] = set()
    for f in sorted(tmp_path.rglob("*.dcm")):
        first.setdefault(f.parent.name, f)
    failures = []
    for f in first.values():
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        variants.add(tuple(str(ds.get(k, "")) for k in ("SOPClassUID", "PhotometricInterpretation", "BitsStored",
                                                         "BodyPartExamined", "Laterality", "ManufacturerModelName")))
        errors, _ = run_dciodvfy(f)
        if errors:
            failures.append(f"{f.name}: {errors}")
    assert not failures, "\n".join(failures)
    assert len(first) >= n and len(variants) >= min(n, 6)  # the sweep did see many different headers
