"""knee_bone_seg on CPU: N4 + inference on a 24-slice knee MR (target < 20 s), against the thesis's N4 in one run.

The study is one synthetic coronal knee MR of 24 slices (``training.synth.knee_bone_seg``,
320x320 at 0.45 mm). The measured path is the node's task function
(:func:`inference.tasks.knee_bone_seg.run_knee_bone_seg`) with a bundle of the
faithful U-Net (211,011 parameters; weights are freshly initialised, which does
not change the run time), on datasets already in memory: series selection,
joint centre, crop + resize to 224x224, N4 (shrink 4), z-score, the U-Net over
all slices, post-processing and the exact inverse to the source grid. Its
stage timings come from ``Findings.timings_s``.

The peer, measured in the same run: N4 with SimpleITK's default settings
(no shrink, 4 levels x 50 iterations) on the same 24x224x224 stack, which is
what the thesis timed at 60-120 s.

Usage::

    python benchmarks/knee_inference.py [--repeats 3] [--no-peer] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from inference.bundle import BundleMeta, InputSpec, save_bundle
from inference.nets import build_network
from inference.series import read_datasets
from inference.task_settings import KneeBoneSegSettings
from inference.tasks import TaskContext
from inference.tasks.knee_bone_seg import choose_series, prepare_knee, run_knee_bone_seg


def _bundle(root: Path) -> Path:
    torch.manual_seed(0)
    model = build_network("unet2d")
    meta = BundleMeta(task="knee_bone_seg", version="bench", architecture="unet2d", init_args={},
                      input=InputSpec(modality=["MR"], size=[224, 224], normalisation="zscore", mean=0.592,
                                      std=0.382),
                      task_config=KneeBoneSegSettings().model_dump(mode="json"),
                      notes="benchmark: freshly initialised faithful U-Net (timing only)")
    return save_bundle(root / "bundle", meta, model.state_dict(), "# benchmark bundle (untrained)\n")


def _peer_n4(array: np.ndarray, spacing: tuple[float, float, float]) -> float:
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(np.maximum(array, float(array.max()) * 1e-4))
    img.SetSpacing((spacing[2], spacing[1], spacing[0]))
    t0 = time.perf_counter()
    mask = sitk.OtsuThreshold(img, 0, 1, 200)
    sitk.N4BiasFieldCorrectionImageFilter().Execute(img, mask)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print a README row."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-peer", action="store_true", help="skip the default-settings N4 peer")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    from training.synth.knee_bone_seg import generate

    with tempfile.TemporaryDirectory(prefix="knee-bench-") as tmp:
        root = Path(tmp)
        generate(root / "data", 1, 7, workers=1, params={"orientation": "coronal", "n": 320, "n_slices": 24,
                                                          "pixel_spacing": 0.45})
        datasets = [ds for ds in read_datasets([root / "data"]) if "SOPInstanceUID" in ds]
        bundle = _bundle(root)
        ctx = TaskContext(model_dir=bundle, device="cpu")
        run_knee_bone_seg(datasets, ctx)  # warm-up: model load, imports, allocator
        totals, stages = [], []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            findings = run_knee_bone_seg(datasets, ctx)
            totals.append(time.perf_counter() - t0)
            stages.append(dict(findings.timings_s))
        series = choose_series(datasets, KneeBoneSegSettings())
        peer = None
        if not args.no_peer:
            stack = prepare_knee(series.volume(), series.spacing, KneeBoneSegSettings(n4=False)).array
            peer = _peer_n4(stack, (series.spacing[0], 140.0 / 224, 140.0 / 224))
    median = float(np.median(totals))
    stage_med = {k: float(np.median([s.get(k, 0.0) for s in stages])) for k in stages[0]}
    result = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}",
        "torch_threads": torch.get_num_threads(), "volume": "24 x 320 x 320 MR -> 24 x 224 x 224",
        "total_s_median": median, "total_s_all": totals, "stages_s_median": stage_med,
        "peer_default_n4_s": peer, "target_s": 20.0,
    }
    print(json.dumps(result, indent=2))
    ratio = f"{median / peer:.2f}" if peer else "-"
    print(f"| 24 x 320x320 coronal MR | {result['machine']} | {median:.1f} | {stage_med.get('preprocess', 0):.1f} | "
          f"{stage_med.get('forward', 0):.1f} | {stage_med.get('postprocess', 0):.2f} | "
          f"{peer if peer is None else round(peer, 1)} | {ratio} | < 20 |")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return 0 if median < 20.0 else 1


if __name__ == "__main__":
    sys.exit(main())
