"""Ideal-observer detectability of the synthetic fractures, per difficulty (wrist and physis generators).

For each study seed the generator renders the same study twice, once with and once
without its fracture (``force_label``): same anatomy, same view, same photon-noise
draws. The difference of the two images is the fracture's signal ``s``. With the
local quantum noise ``sigma`` (robust standard deviation of the image minus its
3x3 mean inside the fracture's box, corrected for that filter), the detectability
of an observer that knows the signal exactly in white noise is
``d' = ||s|| / sigma``. It bounds what any model can see: a view with ``d' < 3``
carries no usable fracture signal; a CNN, which must learn the signal's many shapes
and positions, needs far more. Figures are given at the stored resolution and after
block-averaging to the model's input scale (about 512 pixels on the long side).

Usage::

    python benchmarks/synth_detectability.py [--tasks wrist_fracture,physis_fracture]
                                              [--difficulties 0.1,0.3,0.5] [--n 30] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from scipy import ndimage

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from training.synth.common import study_seed  # noqa: E402
from training.synth.manifest import read_manifest  # noqa: E402
from training.synth.runner import StudyJob  # noqa: E402

MODEL_LONG_SIDE = 512
#: the 3x3 box-mean residual keeps sqrt(1 - 2/9 + 1/9) = sqrt(8/9) of white noise's standard deviation
_RESIDUAL_GAIN = float(np.sqrt(8.0 / 9.0))


def _images(out: Path) -> dict[str, np.ndarray]:
    """SOP position key (instance number) -> float image in stored units, bone bright."""
    imgs = {}
    for f in sorted(out.rglob("*.dcm")):
        ds = pydicom.dcmread(f)
        a = ds.pixel_array.astype(np.float64)
        if ds.PhotometricInterpretation == "MONOCHROME1":
            a = float((1 << int(ds.BitsStored)) - 1) - a
        imgs[str(ds.InstanceNumber)] = a
    return imgs


def _boxes(out: Path) -> dict[str, dict[str, float]]:
    """Instance number -> fracture box of the fractured rendering."""
    found: dict[str, dict[str, float]] = {}
    sop_to_number = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID):
                     str(pydicom.dcmread(f, stop_before_pixels=True).InstanceNumber) for f in out.rglob("*.dcm")}
    for row in read_manifest(out):
        for b in row.get("boxes") or []:
            if b.get("label") == "fracture":
                sop = b.get("sop_instance_uid") or row.get("sop_instance_uid")
                found[sop_to_number[sop]] = b
    return found


def _dprime(signal: np.ndarray, image: np.ndarray, box: dict[str, float], factor: int) -> float:
    """``||s|| / sigma`` inside the box (grown by 8 pixels) after ``factor`` x ``factor`` block averaging."""
    r0, r1 = max(int(box["y0"]) - 8, 0), min(int(box["y1"]) + 9, image.shape[0])
    c0, c1 = max(int(box["x0"]) - 8, 0), min(int(box["x1"]) + 9, image.shape[1])
    s, img = signal[r0:r1, c0:c1], image[r0:r1, c0:c1]
    if factor > 1:
        h, w = (s.shape[0] // factor) * factor, (s.shape[1] // factor) * factor
        s = s[:h, :w].reshape(h // factor, factor, w // factor, factor).mean(axis=(1, 3))
        img = img[:h, :w].reshape(h // factor, factor, w // factor, factor).mean(axis=(1, 3))
    resid = img - ndimage.uniform_filter(img, 3, mode="nearest")
    sigma = 1.4826 * float(np.median(np.abs(resid - np.median(resid)))) / _RESIDUAL_GAIN
    return float(np.sqrt(np.sum(s**2)) / max(sigma, 1e-9))


def measure(task: str, difficulty: float, n: int, seed: int) -> dict[str, Any]:
    """d' of every view where the generator reports the fracture visible, over ``n`` study seeds."""
    from training.synth.cli import load_generator

    module: Any = load_generator(task)
    values_full: list[float] = []
    values_model: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(n):
            runs = {}
            for label in (1, 0):
                out = Path(tmp) / f"{i}-{label}"
                job = StudyJob(out=out, index=i, seed=study_seed(seed, i), difficulty=difficulty, label_noise=0.0,
                               params={"force_label": label})
                rows = module.make_study(job)
                from training.synth.manifest import ManifestWriter

                writer = ManifestWriter(out, "labels.jsonl")
                writer.extend(rows)
                writer.finalize()
                runs[label] = out
            with_fx, without = _images(runs[1]), _images(runs[0])
            for number, box in _boxes(runs[1]).items():
                img, ref = with_fx[number], without[number]
                factor = max(1, int(round(max(img.shape) / MODEL_LONG_SIDE)))
                values_full.append(_dprime(img - ref, img, box, 1))
                values_model.append(_dprime(img - ref, img, box, factor))
    def summary(v: list[float]) -> dict[str, float]:
        a = np.array(v)
        return {"views": int(a.size), "median": float(np.median(a)), "p10": float(np.percentile(a, 10)),
                "p90": float(np.percentile(a, 90)), "below_3": float(np.mean(a < 3)), "below_10": float(np.mean(a < 10))}
    return {"task": task, "difficulty": difficulty, "studies": n, "stored": summary(values_full),
            "model_scale": summary(values_model)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", default="wrist_fracture,physis_fracture")
    ap.add_argument("--difficulties", default="0.1,0.3,0.5")
    ap.add_argument("--n", type=int, default=30, help="study seeds per task and difficulty")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    rows = []
    print("| task | difficulty | fractured views | d' median (stored) | d' median (model scale) | p10-p90 (model scale) "
          "| views with d' < 3 | views with d' < 10 |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for task in [t.strip() for t in args.tasks.split(",") if t.strip()]:
        for d in [float(x) for x in args.difficulties.split(",")]:
            r = measure(task, d, args.n, args.seed)
            rows.append(r)
            m = r["model_scale"]
            print(f"| {task} | {d:g} | {m['views']} | {r['stored']['median']:.1f} | {m['median']:.1f} | "
                  f"{m['p10']:.1f}-{m['p90']:.1f} | {m['below_3']:.0%} | {m['below_10']:.0%} |", flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
