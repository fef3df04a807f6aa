"""CPU inference time of ``spine_bmd`` on a 300-slice lumbar CT (target: < 60 s).

``python benchmarks/spine_inference.py [--backbones resnet50_ds,light] [--threads 2]``

A synthetic lumbar CT (512x512, 0.75 mm pixels) is rendered by the task's generator at 3 mm and resampled
along z to 300 slices of 0.6 mm, written as one DICOM file per slice. For each network variant (the
faithful ResNet50-DS Faster R-CNN and the light demo variant, randomly initialised: the time does not
depend on the weights) the whole task runs as the node runs it (read the files, HU, profile pass, detector
on the mid-body slices, post-processing, findings). The peer, measured in the same run, is the naive
alternative the profile pass avoids: the detector on every slice, extrapolated from the measured
per-slice forward time.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from inference.bundle import BundleMeta, save_bundle  # noqa: E402
from inference.errors import TaskError  # noqa: E402
from inference.series import read_datasets  # noqa: E402
from inference.tasks import TaskContext  # noqa: E402
from inference.tasks.spine_bmd import NAME, spine_bmd  # noqa: E402
from training.synth import spine_bmd as synth  # noqa: E402
from training.synth.common import UidSource, new_patient, new_series, new_study  # noqa: E402
from training.synth.volume import VolumeGeometry, write_slice_series  # noqa: E402
from training.tasks.spine_bmd import SpineBmdAdapter  # noqa: E402


def make_ct(out: Path, n_slices: int = 300, n: int = 512, px: float = 0.75) -> None:
    """Write a synthetic 300-slice lumbar CT under ``out``."""
    rng = np.random.default_rng(7)
    t = synth.draw_t_scores(rng, 70.0, "F")
    hu, z, _, origin, _ = synth.render(rng, n, px, 3.0, t, 0.5)
    hu = ndimage.zoom(hu, (n_slices / hu.shape[0], 1, 1), order=1)
    thick = (z[-1] - z[0]) / (n_slices - 1)
    hu += rng.normal(0, 15, hu.shape).astype(np.float32)
    uids = UidSource("spine-bench")
    patient = new_patient(rng, (60, 80), sex="F")
    study = new_study(rng, uids, patient, "CT LWS")
    series = new_series(uids, 2, "CT", "LSPINE", description="bench")
    job_eq = synth.EQUIPMENT[0]
    geom = VolumeGeometry("axial", (px, px), float(thick), float(thick), origin)
    write_slice_series(out, hu, geom, modality="CT", patient=patient, study=study, series=series, equipment=job_eq,
                       uids=uids, slope=1.0, intercept=-1024.0, rescale_type="HU", signed=False, bits_stored=12)


def make_bundle(out: Path, variant: str) -> Path:
    """A randomly initialised bundle of the faithful or light variant."""
    adapter = SpineBmdAdapter()
    cfg = adapter.config({"variant": "light" if variant == "light" else "faithful",
                          "backbone": "resnet50_ds" if variant == "light" else variant,
                          "box_score_thresh": 0.0})  # random weights: keep every box so post-processing runs fully
    arch, args = adapter.architecture(cfg)
    model = adapter.build_model(cfg)
    meta = BundleMeta(task=NAME, version=f"bench-{variant}", architecture=arch, init_args=args,
                      input=adapter.input_spec(cfg), labels=adapter.labels(cfg), task_config=cfg.model_dump())
    return save_bundle(out / variant, meta, model.state_dict(), "benchmark bundle (random weights)\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", default="resnet50_ds,light")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--slices", type=int, default=300)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory(prefix="spine-bench-") as tmp:
        root = Path(tmp)
        make_ct(root / "ct", args.slices)
        files = sorted((root / "ct").rglob("*.dcm"))
        for variant in args.variants.split(","):
            bundle = make_bundle(root / "bundles", variant)
            ctx = TaskContext(model_dir=bundle, device="cpu")
            try:  # warm-up: model load and first-call overhead
                spine_bmd(read_datasets(files), ctx)
            except TaskError:
                pass
            t0 = time.perf_counter()
            try:
                findings = spine_bmd(read_datasets(files), ctx)
            except TaskError as exc:  # random weights may leave no box in the body region: time is still valid
                print(json.dumps({"variant": variant, "total_s": round(time.perf_counter() - t0, 2),
                                  "note": str(exc)}), flush=True)
                continue
            total = time.perf_counter() - t0
            n_det = findings.timings_s.get("forward", 0.0)
            slices = sum(len(c.images) for c in findings.classifications if c.images)
            per_slice = n_det / max(1, 3 * max(1, slices))
            rows.append({"variant": variant, "slices": len(files), "total_s": round(total, 2),
                         "timings_s": {k: round(v, 2) for k, v in findings.timings_s.items()},
                         "vertebrae": slices, "naive_all_slices_forward_s": round(per_slice * len(files), 1)})
            print(json.dumps(rows[-1]), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
