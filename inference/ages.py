"""Patient age: exact age in years from two dates, and DICOM Age String (AS) from it.

One implementation for routing (age rules), the training archive (Patient's Age kept when the birth date goes)
and the synthetic studies.
"""

from __future__ import annotations

from datetime import date

__all__ = ["age_in_years", "age_string"]


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
