"""Training start-up over a data folder: reading every file vs the persistent file index.

A training process joins the manifest with the DICOM files (``load_records``: every header) and keys
each record's cache entry by the SHA-256 of its files (``data_hash``). Before 2026-12-03 every process
read every header and every byte again; now the sample cache keeps a ``FileIndex``
(``training/file_index.py``). In one run over one data folder this times both steps:

* ``cold``: empty index, empty in-process memory: every file read (the old cost of every process,
  plus filling the index),
* ``warm``: a new in-process memory over the filled index (a resumed run, a later ``train`` over the
  same folder and cache).

The files are in the OS page cache in both passes (the cold pass reads them first), so ``cold`` is a
lower bound of the real first start-up.

Usage::

    python benchmarks/file_index.py DATA_DIR
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from training import file_index
from training.data import data_hash, load_records


def main() -> None:
    """Print the timings as a Markdown table row."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("data", type=Path)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        index = file_index.FileIndex(Path(tmp) / file_index.FILE_INDEX_NAME)
        t: dict[str, float] = {}
        hashes = []
        for label in ("cold", "warm"):
            file_index._MEMORY.clear()
            t0 = time.perf_counter()
            records = load_records(args.data, index)
            t[f"load {label}"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            hashes.append(data_hash(records, index))
            t[f"hash {label}"] = time.perf_counter() - t0
    assert hashes[0] == hashes[1], "the index changed the data hash"
    n_files = sum(len(r.files) for r in records)
    n_bytes = sum(f.stat().st_size for r in records for f in r.files)
    cold, warm = t["load cold"] + t["hash cold"], t["load warm"] + t["hash warm"]
    print("| records | files | GB | cold: load_records + hash (s) | warm: index (s) | cold / warm |")
    print("|---|---|---|---|---|---|")
    print(f"| {len(records)} | {n_files} | {n_bytes / 1e9:.2f} | {t['load cold']:.1f} + {t['hash cold']:.1f} | "
          f"{t['load warm']:.1f} + {t['hash warm']:.1f} | {cold / warm:.0f}x |")


if __name__ == "__main__":
    main()
