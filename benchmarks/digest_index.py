"""Start-up cost of keying a data set's cache entries: hashing every file vs the persistent digest index.

A training or evaluation process keys each record's cache entry by the SHA-256 of its DICOM files
(``training.data.record_hash``). Before 2026-12-03 every process read every byte again; now the
sample cache keeps a ``DigestIndex`` (``training/digests.py``). In one run over one data folder this
times ``data_hash`` of all records:

* ``cold``: empty index, empty in-process memory: every file read and hashed (the old cost of
  every process, plus writing the index),
* ``warm``: a new in-process memory over the filled index (a resumed run, an evaluation, a later
  ``train`` over the same folder and cache),

and, for scale, ``load_records`` (reading the manifest and every DICOM header), which both pay.
The files are in the OS page cache in both passes (the cold pass reads them first), so ``cold``
is a lower bound of the real first start-up.

Usage::

    python benchmarks/digest_index.py DATA_DIR
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from training import digests
from training.data import data_hash, load_records


def main() -> None:
    """Print the timings as a Markdown table row."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("data", type=Path)
    args = ap.parse_args()
    t0 = time.perf_counter()
    records = load_records(args.data)
    t_load = time.perf_counter() - t0
    n_files = sum(len(r.files) for r in records)
    n_bytes = sum(f.stat().st_size for r in records for f in r.files)
    with tempfile.TemporaryDirectory() as tmp:
        index = digests.DigestIndex(Path(tmp) / "file_digests.sqlite")
        timings = {}
        for label in ("cold", "warm"):
            digests._MEMORY.clear()
            t0 = time.perf_counter()
            h = data_hash(records, index)
            timings[label] = (time.perf_counter() - t0, h)
    assert timings["cold"][1] == timings["warm"][1], "the index changed the data hash"
    cold, warm = timings["cold"][0], timings["warm"][0]
    print("| records | files | GB | load_records (s) | cold: hash every file (s) | warm: index (s) | cold / warm |")
    print("|---|---|---|---|---|---|---|")
    print(f"| {len(records)} | {n_files} | {n_bytes / 1e9:.2f} | {t_load:.1f} | {cold:.1f} | {warm:.2f} | "
          f"{cold / warm:.0f}x |")


if __name__ == "__main__":
    main()
