"""Typed generator parameters: the ``params=`` of every generator's ``generate`` and ``synth --param KEY=VALUE``.

Each generator module declares ``PARAMS``, a mapping from name to :class:`Param`;
:func:`check_params` rejects an unknown name (a typo must not silently give the
default studies) and converts each value to its declared type, so the command
line's strings and Python's numbers give the same studies.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from training.synth.common import SynthError

__all__ = ["FORCE_LABEL", "Param", "check_params", "describe", "parse_assignments"]


@dataclass(frozen=True)
class Param:
    """One generator parameter: its type, what it does and, optionally, its allowed values."""

    kind: type[int] | type[float] | type[str]
    help: str
    choices: tuple[Any, ...] = ()

    def coerce(self, name: str, value: Any) -> int | float | str:
        """``value`` as this parameter's type; SynthError if it is not one."""
        try:
            if self.kind is str:
                if not isinstance(value, str):
                    raise TypeError
                out: int | float | str = value
            elif isinstance(value, bool):
                raise TypeError
            elif self.kind is int:
                number = float(value)
                if not number.is_integer():
                    raise ValueError
                out = int(number)
            else:
                out = float(value)
        except (TypeError, ValueError):
            raise SynthError(f"parameter {name!r} must be {self.kind.__name__}, got {value!r}") from None
        if self.choices and out not in self.choices:
            raise SynthError(f"parameter {name!r} must be one of {', '.join(map(str, self.choices))}, got {out!r}")
        return out


#: radiograph generators: draw every study with (1) or without (0) its fracture, same anatomy, view and noise
FORCE_LABEL = Param(int, "1: every study fractured, 0: none (same anatomy, views and noise per seed)", (0, 1))


def describe(spec: Mapping[str, Param]) -> str:
    """One line per parameter: ``name (type): help``."""
    return "\n".join(f"  {k} ({p.kind.__name__}): {p.help}" for k, p in sorted(spec.items())) or "  (none)"


def check_params(task: str, params: Mapping[str, Any] | None, spec: Mapping[str, Param]) -> dict[str, Any]:
    """Validated, typed copy of ``params`` for a generator whose parameters are ``spec``.

    Raises
    ------
    SynthError
        An unknown name (the message lists the known ones) or a value of the wrong type or not allowed.
    """
    params = dict(params or {})
    unknown = sorted(set(params) - set(spec))
    if unknown:
        raise SynthError(f"unknown parameter(s) {', '.join(map(repr, unknown))} for {task}; it takes:\n"
                         + describe(spec))
    return {k: spec[k].coerce(k, v) for k, v in params.items()}


def parse_assignments(items: Iterable[str]) -> dict[str, str]:
    """``["KEY=VALUE", ...]`` (the ``--param`` options) as a dict of strings; a repeated key is an error."""
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise SynthError(f"--param takes KEY=VALUE, got {item!r}")
        if key in out:
            raise SynthError(f"--param {key} is given twice")
        out[key] = value.strip()
    return out
