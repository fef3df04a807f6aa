"""Progress of long training work: a tqdm bar on a terminal, plain log lines when the output is piped.

``dicomnode-train synth``, ``train`` and ``evaluate`` (and whatever else loops over many studies) report
through :class:`Progress` or :func:`track`:

* stderr is a terminal: a tqdm bar (count, rate, time left) that disappears when the work is done;
* stderr is a pipe or a file (CI, systemd, ``| tee``): an INFO log line such as
  ``synth spine_bmd: 12/30 studies (40%), 15 s elapsed, about 23 s left`` at most every
  ``DICOMNODE_PROGRESS_EVERY_S`` seconds (default 10), and one at the end when any was printed before.

``announce=True`` (top-level commands) also logs the start, so a pipe shows at once what is being done.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import IO, Any, TypeVar

__all__ = ["EVERY_S_ENV", "Progress", "track"]

log = logging.getLogger(__name__)

#: environment variable: seconds between two progress log lines when not on a terminal
EVERY_S_ENV = "DICOMNODE_PROGRESS_EVERY_S"
_DEFAULT_EVERY_S = 10.0

T = TypeVar("T")


def _every_s() -> float:
    try:
        return max(0.0, float(os.environ.get(EVERY_S_ENV, _DEFAULT_EVERY_S)))
    except ValueError:
        return _DEFAULT_EVERY_S


def _duration(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


class Progress:
    """Counts finished units of one piece of work and shows it (bar on a TTY, log lines otherwise).

    Parameters
    ----------
    total:
        Units expected (None when unknown).
    desc:
        What is being done, e.g. ``"synth spine_bmd"``.
    unit:
        Plural name of a unit, e.g. ``"studies"``.
    logger:
        Logger of the calling module (piped mode); this module's by default.
    announce:
        Log a first line at the start (piped mode).
    stream:
        Where the bar goes and whose ``isatty()`` decides the mode (default ``sys.stderr``).
    """

    def __init__(self, total: int | None, desc: str, unit: str = "items", *, logger: logging.Logger | None = None,
                 announce: bool = False, stream: IO[str] | None = None) -> None:
        self.total, self.desc, self.unit = total, desc, unit
        self.n = 0
        self._log = logger or log
        self._stream = stream or sys.stderr
        self._t0 = self._last = time.monotonic()
        self._every = _every_s()
        self._logged = False
        self._bar: Any = None
        if _isatty(self._stream):
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=desc, unit=" " + unit, file=self._stream, leave=False,
                             dynamic_ncols=True)
        elif announce:
            self._log.info("%s: %s", desc, f"0/{total} {unit}" if total is not None else "started")
            self._logged = True

    def update(self, n: int = 1) -> None:
        """``n`` more units are done."""
        self.n += n
        if self._bar is not None:
            self._bar.update(n)
            return
        now = time.monotonic()
        if now - self._last >= self._every and (self.total is None or self.n < self.total):
            self._last = now
            self._logged = True
            self._log.info("%s", self._line(now))

    def _line(self, now: float) -> str:
        elapsed = now - self._t0
        if self.total is None or self.total <= 0:
            return f"{self.desc}: {self.n} {self.unit}, {_duration(elapsed)} elapsed"
        pct = 100.0 * self.n / self.total
        left = f", about {_duration(elapsed * (self.total - self.n) / self.n)} left" if self.n else ""
        return f"{self.desc}: {self.n}/{self.total} {self.unit} ({pct:.0f}%), {_duration(elapsed)} elapsed{left}"

    def close(self) -> None:
        """Remove the bar, or log the final count when progress lines were logged before."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif self._logged:
            self._logged = False
            self._log.info("%s: %d %s in %s", self.desc, self.n, self.unit,
                           _duration(time.monotonic() - self._t0))

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _isatty(stream: IO[str]) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def track(iterable: Iterable[T], total: int | None = None, desc: str = "", unit: str = "items", *,
          logger: logging.Logger | None = None, announce: bool = False) -> Iterator[T]:
    """Yield from ``iterable`` and count each item as one unit of :class:`Progress`."""
    if total is None:
        try:
            total = len(iterable)  # type: ignore[arg-type]
        except TypeError:
            total = None
    with Progress(total, desc, unit, logger=logger, announce=announce) as p:
        for item in iterable:
            yield item
            p.update()


class TrackedLoader:
    """A data loader whose iteration is tracked; every other attribute (``dataset``, ...) is the loader's."""

    def __init__(self, loader: Any, desc: str, unit: str = "batches", *, logger: logging.Logger | None = None) -> None:
        self._loader, self._desc, self._unit, self._logger = loader, desc, unit, logger

    def __iter__(self) -> Iterator[Any]:
        return track(self._loader, len(self._loader), self._desc, self._unit, logger=self._logger)

    def __len__(self) -> int:
        return len(self._loader)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._loader, name)
