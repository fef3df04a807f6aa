"""Hand-over of pre-processed series from a worker process: numpy through the result pipe vs torch shared memory.

``inference.runtime.prefetch_map`` returns each worker's result through a ``ProcessPoolExecutor``.
A numpy array is pickled through the pool's result pipe (bytes copied twice and unpickled in the
pool's management thread of the feeding process); a CPU ``torch.Tensor`` is moved to shared memory
by torch's multiprocessing reductions and only a handle crosses the pipe. This measures series/s
received by one feeding process from one worker that returns a ready (slices, 224, 224) float32
series as fast as it can, both variants alternated in one run.

Usage::

    python benchmarks/handover.py [--slices 32] [--series 200] [--repeats 2]
"""

from __future__ import annotations

import argparse
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

import numpy as np
import torch

_BASE: np.ndarray | None = None


def _init(shape: tuple[int, ...]) -> None:
    global _BASE
    _BASE = np.ones(shape, dtype=np.float32)
    torch.set_num_threads(1)


def as_numpy(_: int) -> np.ndarray:
    """A fresh series as a numpy array (pickled through the pipe)."""
    assert _BASE is not None
    return _BASE.copy()


def as_tensor(_: int) -> torch.Tensor:
    """A fresh series as a CPU tensor (handed over through shared memory)."""
    assert _BASE is not None
    return torch.from_numpy(_BASE.copy())


def measure(fn, shape: tuple[int, ...], n: int) -> float:
    """Series/s received by this process from one spawn worker."""
    with ProcessPoolExecutor(1, mp_context=get_context("spawn"), initializer=_init, initargs=(shape,)) as pool:
        list(pool.map(fn, range(4)))  # start-up and first-call costs
        t0 = time.perf_counter()
        received = sum(1 for _ in pool.map(fn, range(n)))  # each result is unpickled/mapped here
        return received / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slices", type=int, default=32)
    ap.add_argument("--series", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    shape = (args.slices, 224, 224)
    rates: dict[str, list[float]] = {"numpy (pipe)": [], "torch (shared memory)": []}
    for _ in range(args.repeats):
        rates["numpy (pipe)"].append(measure(as_numpy, shape, args.series))
        rates["torch (shared memory)"].append(measure(as_tensor, shape, args.series))
    mb = np.prod(shape) * 4 / 1e6
    print(f"| hand-over | series of {args.slices}x224x224 float32 ({mb:.1f} MB) per s, median of {args.repeats} "
          "| slices/s | runs |")
    print("|---|---|---|---|")
    for name, values in rates.items():
        med = statistics.median(values)
        print(f"| {name} | {med:.0f} | {med * args.slices:.0f} | {', '.join(f'{v:.0f}' for v in values)} |")


if __name__ == "__main__":
    main()
