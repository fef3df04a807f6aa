"""Patient age: exact age in years from two dates, DICOM Age String (AS) to and from years.

One implementation for routing (age rules), validation subgroups, the training archive (Patient's Age kept
when the birth date goes) and the synthetic studies.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from datetime import date

__all__ = ["age_in_years", "age_string", "parse_da", "parse_patient_age", "patient_age"]

_DAYS_PER_YEAR = 365.2425


def age_in_years(birth: date, on: date) -> float | None:
    """Exact age in years: whole birthdays passed plus the fraction of the current year of life; None if ``on``
    is before ``birth``."""
    if on < birth:
        return None

    def anniversary(year: int) -> date:
        try:
            return birth.replace(year=year)
        except ValueError:  # 29 February in a common year
            return date(year, 3, 1)

    years = on.year - birth.year
    if anniversary(on.year) > on:
        years -= 1
    last = anniversary(birth.year + years)
    following = anniversary(birth.year + years + 1)
    return years + (on - last).days / max((following - last).days, 1)


def age_string(years: float) -> str:
    """DICOM AS (PS3.5 6.2): ``"045Y"`` from one year on (at most 999), else months, weeks or days for infants."""
    if years >= 1.0:
        return f"{min(int(years), 999):03d}Y"
    days = int(round(max(years, 0.0) * 365.25))
    if days >= 31:
        return f"{max(1, days // 30):03d}M"
    if days >= 7:
        return f"{days // 7:03d}W"
    return f"{days:03d}D"


def parse_patient_age(value: object) -> float | None:
    """Convert a DICOM AS value (``045Y``, ``006M``, ``010W``, ``003D``) to years; None if absent or malformed."""
    if not value:
        return None
    m = re.fullmatch(r"\s*(\d{1,3})\s*([DWMY])\s*", str(value).upper())
    if not m:
        return None
    n, unit = int(m.group(1)), m.group(2)
    return {"Y": float(n), "M": n / 12.0, "W": n * 7 / _DAYS_PER_YEAR, "D": n / _DAYS_PER_YEAR}[unit]


def parse_da(value: object) -> date | None:
    """A DICOM DA value (``YYYYMMDD``, also the old ``YYYY.MM.DD``) as a date; None if absent or malformed."""
    if not value:
        return None
    m = re.fullmatch(r"\s*(\d{4})\.?(\d{2})\.?(\d{2})\s*", str(value))
    if not m:
        return None
    try:
        return date(int(m.group(1)), int(m.group(2)), int(m.group(3)))
    except ValueError:
        return None


def patient_age(age: object, birth_date: object, dates: Iterable[object]) -> float | None:
    """Age in years: Patient's Age (AS) if valid, else from the birth date to the first valid of ``dates`` (DA)."""
    years = parse_patient_age(age)
    if years is not None:
        return years
    birth = parse_da(birth_date)
    if birth is None:
        return None
    for value in dates:
        on = parse_da(value)
        if on is not None:
            return age_in_years(birth, on)
    return None
