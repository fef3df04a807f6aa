"""The multiprocessing driver of every synthetic-study generator.

:func:`generate_studies` runs a generator's per-study function (a :class:`StudyJob` each) over chunks of study
indices in worker processes and writes the labels manifest in index order, so a set is the same whatever the
number of workers.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from training.synth.common import DEFAULT_DIFFICULTY, SynthError, study_seed

if TYPE_CHECKING:
    from training.synth.params import Param

log = logging.getLogger(__name__)

__all__ = ["StudyFn", "StudyJob", "generate_studies", "keep_freed_memory"]


# --- parallel driver -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StudyJob:
    """What a per-study function gets: where to write, which study, its seed and the run's knobs."""

    out: Path
    index: int
    seed: int
    difficulty: float = DEFAULT_DIFFICULTY
    label_noise: float = 0.02
    params: dict[str, Any] = field(default_factory=dict)

    def rng(self, stream: str = "main") -> np.random.Generator:
        """An independent generator per named stream (e.g. "anatomy", "noise", "labels")."""
        h = hashlib.sha256(f"{self.seed}\x00{stream}".encode()).digest()
        return np.random.default_rng(int.from_bytes(h[:8], "big"))


StudyFn = Callable[[StudyJob], list[dict[str, Any]]]


#: glibc ``mallopt`` parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
#: image-sized temporaries (a 1024 x 768 float32 frame is 3 MiB; a 256 x 256 x 168 volume slab ~40 MiB)
_KEEP_BYTES = 64 * 1024 * 1024


def _mallopt(trim: int, mmap: int) -> bool:
    """Set glibc's trim and mmap thresholds; False where the C library has no ``mallopt`` (musl, macOS)."""
    try:
        libc = ctypes.CDLL(None)
        fn = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(fn(_M_MMAP_THRESHOLD, mmap)) and bool(fn(_M_TRIM_THRESHOLD, trim))


def keep_freed_memory() -> bool:
    """Let this process reuse freed image-sized buffers instead of returning them to the kernel.

    The generators allocate many frame-sized numpy temporaries. With glibc's
    defaults each one above the mmap threshold is a fresh mapping whose pages
    are faulted in and zeroed on first touch, which was about a third of a
    radiograph's simulation time. Raising the mmap and trim thresholds keeps
    such buffers in the heap. The setting is process-wide and stays: freed memory up
    to the trim threshold (256 MiB) is kept for reuse rather than returned to the
    system, and glibc stops adapting the mmap threshold (it would otherwise grow it
    the same way, one freed block at a time). Returns whether the setting took effect.
    """
    return _mallopt(4 * _KEEP_BYTES, _KEEP_BYTES)


def _run_chunk(fn: StudyFn, jobs: list[StudyJob]) -> list[list[dict[str, Any]]]:
    return [fn(job) for job in jobs]


def _check_ranges(n: int, difficulty: float, label_noise: float) -> None:
    """Raise :class:`SynthError` when ``n``, ``difficulty`` or ``label_noise`` is out of range."""
    if n < 0:
        raise SynthError(f"n must be >= 0, got {n}")
    if not 0.0 <= difficulty <= 1.0:
        raise SynthError(f"difficulty must be in [0, 1], got {difficulty}")
    if not 0.0 <= label_noise <= 0.5:
        raise SynthError(f"label_noise must be in [0, 0.5], got {label_noise}")


def _chunk_results(make_study: StudyFn, chunks: list[list[StudyJob]],
                   workers: int) -> Iterator[list[list[dict[str, Any]]]]:
    """Each chunk's rows in chunk order: in this process (one worker or one chunk) or over a process pool."""
    if workers == 1 or len(chunks) <= 1:
        keep_freed_memory()  # process-wide; see its docstring
        for c in chunks:
            yield _run_chunk(make_study, c)
    else:
        with ProcessPoolExecutor(max_workers=workers, initializer=keep_freed_memory) as pool:
            yield from pool.map(_run_chunk, [make_study] * len(chunks), chunks)


def generate_studies(out: Path, n: int, seed: int, make_study: StudyFn, *, workers: int = 2,
                     difficulty: float = DEFAULT_DIFFICULTY, label_noise: float = 0.02, params: dict[str, Any] | None = None,
                     param_spec: Mapping[str, Param] | None = None, manifest_name: str = "labels.jsonl",
                     chunk_size: int | None = None) -> Path:
    """Run ``make_study`` for study indices ``0..n-1`` over ``workers`` processes and write the manifest.

    ``make_study`` must be a module-level function (picklable) that writes its
    files under ``job.out`` and returns its manifest rows. The generating
    processes (this one when ``workers`` is 1) keep freed buffers for reuse
    (:func:`keep_freed_memory`). Rows are written in
    index order, so the manifest is identical whatever ``workers`` is. ``out`` must
    be empty or new: studies left from an earlier set would sit beside a manifest
    that does not list them.
    ``params`` are checked and typed against ``param_spec`` (the module's
    ``PARAMS``, :mod:`training.synth.params`; none accepted without it).

    Returns
    -------
    Path
        The manifest path (``out / manifest_name``).
    """
    from training.synth.manifest import ManifestWriter

    _check_ranges(n, difficulty, label_noise)
    from training.synth.params import check_params  # imports this module

    params = check_params(make_study.__module__.rsplit(".", 1)[-1], params, param_spec or {})
    out = Path(out)
    if out.is_dir() and any(out.iterdir()):
        raise SynthError(f"{out} is not empty: write a synthetic set into a new or empty folder "
                         "(synth --overwrite replaces an earlier set)")
    out.mkdir(parents=True, exist_ok=True)
    jobs = [StudyJob(out=out, index=i, seed=study_seed(seed, i), difficulty=difficulty, label_noise=label_noise,
                     params=dict(params)) for i in range(n)]
    workers = max(1, int(workers))
    if chunk_size is None:
        chunk_size = max(1, min(32, -(-n // (workers * 4)) if n else 1))
    chunks = [jobs[i:i + chunk_size] for i in range(0, n, chunk_size)]
    writer = ManifestWriter(out, manifest_name)
    from training.progress import Progress

    progress = Progress(n, f"synth {make_study.__module__.rsplit('.', 1)[-1]}", "studies", logger=log, announce=True)
    try:
        for chunk_rows in _chunk_results(make_study, chunks, workers):
            for rows in chunk_rows:
                writer.extend(rows)
            progress.update(len(chunk_rows))
        path = writer.finalize()
    except BaseException:
        writer.abort()
        raise
    finally:
        progress.close()
    log.info("wrote %d synthetic studies and %d manifest rows under %s", n, writer.count, out)
    return path
