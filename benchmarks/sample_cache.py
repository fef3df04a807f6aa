"""Shuffled reads from the training sample cache: a whole cache entry per sample vs that sample alone.

``training.data.SampleCache`` stores the pre-processed samples of one record (a knee volume's
slices, a CT study's vertebra slices) in one ``.npz`` entry. A shuffled training loader asks for
one sample of a record at a time. Before 2026-12-02 every such request read the whole entry and
hashed the record's files again; now ``RecordDataset`` keeps the keys from start-up and reads only
the sample's members (``SampleCache.get_one``). This builds a cache of records shaped like the knee
task's (``--slices`` samples of a 224x224 float32 image and a 4-channel uint8 mask, plus a label),
then times, alternated in one run:

* ``whole``: ``cache.get(key)[j]`` per shuffled sample (the old read),
* ``one``: ``cache.get_one(key, j)`` per shuffled sample (the new read),
* the label pass of balanced sampling, whole entries vs ``get(key, fields=("label",))``.

The file-hashing part of the old per-sample cost is not included (it depends on the record's
file count), so the old path was slower than ``whole`` here.

Usage::

    python benchmarks/sample_cache.py [--records 24] [--slices 35] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from training.data import SampleCache


def build(root: Path, records: int, slices: int) -> tuple[SampleCache, list[str]]:
    """A cache of ``records`` entries with ``slices`` knee-like samples each."""
    cache = SampleCache(root)
    rng = np.random.default_rng(0)
    keys = []
    for r in range(records):
        key = f"{r:064x}"
        cache.put(key, [{"image": rng.random((1, 224, 224), dtype=np.float32),
                         "mask": (rng.random((4, 224, 224)) > 0.5).astype(np.uint8),
                         "label": int(rng.integers(2))} for _ in range(slices)])
        keys.append(key)
    return cache, keys


def shuffled_ms(cache: SampleCache, keys: list[str], slices: int, *, whole: bool, seed: int) -> float:
    """Mean milliseconds per sample over one shuffled epoch."""
    order = np.random.default_rng(seed).permutation(len(keys) * slices)
    t0 = time.perf_counter()
    for i in order:
        key, j = keys[i // slices], int(i % slices)
        got = cache.get(key)[j] if whole else cache.get_one(key, j)  # type: ignore[index]
        assert got is not None and "image" in got
    return 1000.0 * (time.perf_counter() - t0) / len(order)


def labels_s(cache: SampleCache, keys: list[str], *, whole: bool) -> float:
    """Seconds to collect every sample's label."""
    t0 = time.perf_counter()
    for key in keys:
        samples = cache.get(key) if whole else cache.get(key, fields=("label",))
        assert samples is not None
        [int(s["label"]) for s in samples]
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=int, default=24)
    ap.add_argument("--slices", type=int, default=35)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cache, keys = build(Path(tmp), args.records, args.slices)
        runs: dict[str, list[float]] = {"whole": [], "one": [], "labels_whole": [], "labels_field": []}
        for rep in range(args.repeats):
            runs["whole"].append(shuffled_ms(cache, keys, args.slices, whole=True, seed=rep))
            runs["one"].append(shuffled_ms(cache, keys, args.slices, whole=False, seed=rep))
            runs["labels_whole"].append(labels_s(cache, keys, whole=True))
            runs["labels_field"].append(labels_s(cache, keys, whole=False))
    med = {k: statistics.median(v) for k, v in runs.items()}
    n = args.records * args.slices
    print(f"{args.records} records x {args.slices} samples ({n} samples), median of {args.repeats} alternated runs")
    print(f"shuffled read, whole entry : {med['whole']:7.2f} ms/sample")
    print(f"shuffled read, one sample  : {med['one']:7.2f} ms/sample  ({med['whole'] / med['one']:.1f}x faster)")
    print(f"label pass, whole entries  : {med['labels_whole']:7.3f} s")
    print(f"label pass, label field    : {med['labels_field']:7.3f} s  "
          f"({med['labels_whole'] / med['labels_field']:.1f}x faster)")


if __name__ == "__main__":
    main()
