"""Level finder (inference/tasks/spine_bmd_levels.py), issue 34: a faint mid-body cortex does not split a body,
while a disc between two endplates still separates two bodies even when partial volume leaves a row there."""

from __future__ import annotations

import numpy as np

from inference.tasks.spine_bmd_levels import body_runs


def _profile(bodies: list[list[float]], disc: list[float]) -> np.ndarray:
    out: list[float] = []
    for i, b in enumerate(bodies):
        out += b
        if i < len(bodies) - 1:
            out += disc
    return np.asarray([0.0, 0.0] + out + [0.0, 0.0])


def test_one_row_dips_at_mid_body_stay_in_the_body() -> None:
    """Seen at 140 kVp with a 0.7 mm cortex: [endplate, 2, 2, 1, 2, 3, 1, 2, endplate] is one body."""
    body = [15.0, 2.0, 2.0, 1.0, 2.0, 3.0, 3.0, 1.0, 2.0, 2.0, 15.0]
    prof = _profile([body, body, body], [0.0, 0.0, 0.0])
    runs = body_runs(prof, np.arange(len(prof)) * 2.5)
    assert len(runs) == 3
    assert all(abs(r.height_mm - 11 * 2.5) < 0.1 for r in runs)
    # without the faint-gap rule (weak_mm=0 closes nothing) the same profile breaks into slivers
    assert len(body_runs(prof, np.arange(len(prof)) * 2.5, weak_mm=0.0)) != 3


def test_a_disc_with_one_row_of_partial_volume_still_separates_bodies() -> None:
    """A thin disc whose slices keep one row (osteophyte or endplate partial volume) next to the endplates."""
    body = [16.0, 3.0, 3.0, 3.0, 3.0, 3.0, 3.0, 3.0, 3.0, 17.0]
    prof = _profile([body, body], [1.0, 1.0])
    runs = body_runs(prof, np.arange(len(prof)) * 3.0)
    assert len(runs) == 2, runs
