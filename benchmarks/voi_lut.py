"""VOI stage of ``inference.pixels`` against pydicom's own functions over the whole image.

``inference.pixels.apply_window`` is the float32 numpy form of :func:`pydicom.pixels.apply_windowing` (the tests
check they agree); ``_voi_lut_sequence`` takes the table from :func:`pydicom.pixels.apply_voi` and looks the
pixels up with numpy. This times each against calling the pydicom function on the whole image (float64 with
boolean masks for windowing). Median of ``--repeat`` runs each.

Usage::

    python benchmarks/voi_lut.py [--repeat 5]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import numpy as np
from pydicom import Dataset
from pydicom.pixels import apply_voi, apply_windowing
from pydicom.sequence import Sequence

from inference.pixels import _voi_lut_sequence, apply_window


def _window_ds(center: float, width: float, function: str = "LINEAR") -> Dataset:
    """Window attributes whose pydicom output range is [0, 1] (1-bit unsigned, no rescale)."""
    ds = Dataset()
    ds.PhotometricInterpretation, ds.BitsStored, ds.PixelRepresentation = "MONOCHROME2", 1, 0
    ds.WindowCenter, ds.WindowWidth, ds.VOILUTFunction = center, width, function
    return ds


def _time(fn: Callable[[], object], repeat: int) -> float:
    runs = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - t0)
    return statistics.median(runs)


def main() -> None:
    """Print one Markdown table row per case."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    radiograph = rng.integers(0, 4096, (3000, 2500)).astype(np.float32)
    ct = rng.integers(-1024, 3000, (64, 512, 512)).astype(np.float32)
    table = (np.sqrt(np.arange(4096)) * 1000).astype(np.uint16)
    lut_ds = Dataset()
    item = Dataset()
    item.LUTDescriptor, item.LUTData = [4096, 0, 16], table.tolist()
    lut_ds.VOILUTSequence = Sequence([item])
    cases = [
        ("LINEAR window, radiograph 3000x2500", lambda: apply_windowing(radiograph, _window_ds(2048, 4096)),
         lambda: apply_window(radiograph, 2048, 4096)),
        ("LINEAR window, CT 64x512x512", lambda: apply_windowing(ct, _window_ds(400, 1800)),
         lambda: apply_window(ct, 400, 1800)),
        ("SIGMOID window, radiograph 3000x2500", lambda: apply_windowing(radiograph, _window_ds(2048, 4096, "SIGMOID")),
         lambda: apply_window(radiograph, 2048, 4096, "SIGMOID")),
        ("VOI LUT Sequence, radiograph 3000x2500", lambda: apply_voi(radiograph.astype(np.int64), lut_ds),
         lambda: _voi_lut_sequence(radiograph, lut_ds)),
    ]
    print("| case | pydicom on the whole image (ms) | inference.pixels (ms) | pydicom / inference.pixels |")
    print("|---|---|---|---|")
    for name, lib, own in cases:
        a, b = _time(lib, args.repeat), _time(own, args.repeat)
        print(f"| {name} | {a * 1e3:.0f} | {b * 1e3:.0f} | {a / b:.2f} |")


if __name__ == "__main__":
    main()
