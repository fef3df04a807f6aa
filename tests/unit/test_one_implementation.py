"""Solved once: the age calculation (inference.ages) and the recursive folder walk (inference.fsutil.walk_files)."""

from __future__ import annotations

import re
from datetime import date
from pathlib import Path

import pydicom
import pytest

from inference.ages import age_in_years, parse_da, parse_patient_age, patient_age

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("dicomnode", "inference", "training")


@pytest.mark.parametrize(("age", "birth", "dates", "years"), [
    ("045Y", "19000101", ["20240101"], 45.0),  # Patient's Age wins
    ("006M", None, [], 0.5),
    ("bad", "20000229", ["", "2018.03.01"], 18.0),  # malformed AS: from the birth date to the first valid date
    (None, "20100615", ["20200614"], age_in_years(date(2010, 6, 15), date(2020, 6, 14))),
    (None, "20100615", ["20090101"], None),  # a date before birth
    (None, "2010-06-15", ["20200101"], None),
    (None, None, ["20200101"], None),
])
def test_patient_age(age: str | None, birth: str | None, dates: list[str], years: float | None) -> None:
    assert patient_age(age, birth, dates) == (pytest.approx(years) if years is not None else None)


def test_as_and_da_parsing() -> None:
    assert parse_patient_age("010W") == pytest.approx(70 / 365.2425)
    assert parse_patient_age("1234Y") is None and parse_patient_age("") is None
    assert parse_da("20240230") is None and parse_da("20240229") == date(2024, 2, 29)


def test_validation_subgroups_use_the_exact_age() -> None:
    """training.validate's age band comes from the one implementation (it used to approximate from digits)."""
    from training.validate import _age_years

    ds = pydicom.Dataset()
    ds.PatientBirthDate, ds.StudyDate = "20101231", "20201230"
    assert _age_years(ds) == pytest.approx(age_in_years(date(2010, 12, 31), date(2020, 12, 30)))
    assert _age_years(ds) < 10.0  # one day before the tenth birthday


def _sources() -> list[tuple[str, str]]:
    return [(p.relative_to(ROOT).as_posix(), p.read_text(encoding="utf-8"))
            for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))]


def test_one_recursive_folder_walk() -> None:
    walks = [name for name, text in _sources() if re.search(r"""rglob\(["']\*["']\)|os\.walk\(""", text)]
    assert walks == ["inference/fsutil.py"], f"walk folders with inference.fsutil.walk_files, not in {walks}"


def test_one_age_calculation() -> None:
    # training/synth draws a birth date for a random age (data generation, not an age calculation of a study)
    ages = [name for name, text in _sources() if re.search(r"\[DWMY\]|365\.2|52\.18", text)
            and not name.startswith("training/synth/")]
    assert ages == ["inference/ages.py"], f"compute ages with inference.ages, not in {ages}"
