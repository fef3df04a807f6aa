"""Inference overhead: the pipeline's images/s against bare ``model(x)`` at the same batch size, in one run.

Two cases, each through the project's own loader and pre-processing:

* 2-D ("radiograph"): DX files -> ``pydicom.dcmread`` -> ``inference.radiograph.prepare_dataset``
  (polarity, part splitter, alignment, 2:3 letterbox to 512x341) -> ``resnet_classifier``
  (ResNet18, 1 channel) -> sigmoid and threshold.
* 3-D ("volume"): a CT series per job -> ``inference.series.load_series`` (sort, modality LUT)
  -> z-score and per-slice resize to 224x224 -> ``unet2d`` over all slices
  -> sigmoid, threshold and resize of the masks back to the source grid.

Pre-processing runs in worker processes (:func:`inference.runtime.prefetch_map`) while the
network runs micro-batches (:func:`inference.runtime.run_batched`), as in the node.
The bare figure is ``model(x)`` on a ready tensor already on the device, with the same
batch size, autocast and channels-last settings.

Usage::

    python benchmarks/inference_overhead.py [--device auto] [--images 96] [--batch 16]
                                            [--workers N] [--json OUT] [--readme benchmarks/README.md]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    CTImageStorage,
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    generate_uid,
)

from inference.nets import build_network
from inference.runtime import (
    autocast_context,
    device_prefetch,
    prefetch_map,
    prepare_model,
    run_batched,
    select_device,
)

SECTION = "## Inference overhead"


# ---------------------------------------------------------------------------------------------- data


def _base(sop_class: str, modality: str, pixels: np.ndarray) -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = generate_uid()
    ds.PatientID = "BENCH"
    ds.Modality = modality
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16 if pixels.dtype == np.int16 else 12
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 1 if pixels.dtype == np.int16 else 0
    ds.PixelData = pixels.tobytes()
    return ds


def write_radiographs(out: Path, n: int, rng: np.random.Generator) -> list[Path]:
    """DX images 768x512 with one bright 'forearm' blob (12-bit)."""
    paths = []
    yy, xx = np.mgrid[0:768, 0:512]
    for i in range(n):
        img = rng.normal(300, 40, (768, 512))
        cx, cy = 256 + rng.integers(-40, 40), 384 + rng.integers(-60, 60)
        blob = ((xx - cx) / 110.0) ** 2 + ((yy - cy) / 300.0) ** 2 < 1
        img[blob] += 2500
        ds = _base(DigitalXRayImageStorageForPresentation, "DX", np.clip(img, 0, 4095).astype(np.uint16))
        ds.SeriesInstanceUID = generate_uid()
        ds.ImagerPixelSpacing = [0.15, 0.15]
        ds.PresentationIntentType = "FOR PRESENTATION"
        ds.InstanceNumber = 1
        p = out / f"dx{i:04d}.dcm"
        ds.save_as(p, enforce_file_format=True)
        paths.append(p)
    return paths


def write_volumes(out: Path, n_series: int, slices: int, rng: np.random.Generator) -> list[list[Path]]:
    """CT series of ``slices`` 256x256 slices each, written in shuffled order."""
    series = []
    for s in range(n_series):
        uid, study = generate_uid(), generate_uid()
        files = []
        for k in rng.permutation(slices):
            img = rng.normal(40, 30, (256, 256)).astype(np.int16)
            img[80:180, 90:170] += 900
            ds = _base(CTImageStorage, "CT", (img + 1024).astype(np.int16))
            ds.StudyInstanceUID, ds.SeriesInstanceUID = study, uid
            ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
            ds.ImagePositionPatient = [0.0, 0.0, float(k) * 2.0]
            ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
            ds.PixelSpacing = [0.5, 0.5]
            ds.SliceThickness = 2.0
            ds.InstanceNumber = int(k) + 1
            p = out / f"ct{s:03d}_{k:03d}.dcm"
            ds.save_as(p, enforce_file_format=True)
            files.append(p)
        series.append(files)
    return series


# ----------------------------------------------------------------------------- pre/post-processing


def prep_radiograph(path: Path) -> list[torch.Tensor]:
    """Load + pre-process one radiograph: one (1, 512, 341) tensor per anatomic part."""
    import pydicom

    from inference.radiograph import prepare_dataset

    ds = pydicom.dcmread(path)
    return [p.tensor for p in prepare_dataset(ds)]


def prep_volume(paths: list[Path]) -> tuple[torch.Tensor, tuple[int, int]]:
    """Load + pre-process one series: (slices, 1, 224, 224) z-scored tensor and the source size."""
    from inference.series import load_series

    vol = load_series(paths).volume()
    t = torch.from_numpy((vol - vol.mean()) / (vol.std() + 1e-6)).unsqueeze(1)
    t = torch.nn.functional.interpolate(t, size=(224, 224), mode="bilinear", align_corners=False)
    return t, vol.shape[1:]


def _worker_init() -> None:
    """One intra-op thread per pre-processing process (the processes are the parallelism)."""
    torch.set_num_threads(1)


def _warm(_: int) -> int:
    import pydicom  # noqa: F401

    import inference.radiograph  # noqa: F401
    import inference.series  # noqa: F401

    return os.getpid()


# --------------------------------------------------------------------------------------- measuring


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def bare_throughput(model: torch.nn.Module, shape: tuple[int, ...], batch: int, device: torch.device,
                    seconds: float = 3.0) -> float:
    """Items/s of ``model(x)`` on a ready device tensor of ``batch`` items."""
    x = torch.randn(batch, *shape, device=device)
    if device.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode(), autocast_context(device):
        for _ in range(3):
            model(x)
        _sync(device)
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds or n < 3:
            model(x)
            n += 1
        _sync(device)
        dt = time.perf_counter() - t0
    return n * batch / dt


def pipeline_radiograph(model: torch.nn.Module, paths: list[Path], batch: int, device: torch.device,
                        pool: ProcessPoolExecutor | None) -> tuple[float, int]:
    """Images/s of load + preprocess + forward + postprocess; returns (rate, number of parts)."""
    t0 = time.perf_counter()
    pending: list[torch.Tensor] = []
    results: list[bool] = []

    def flush() -> None:
        logits = run_batched(model, pending, batch, device)
        results.extend((torch.sigmoid(logits.reshape(len(pending), -1)[:, 0]) >= 0.5).tolist())
        pending.clear()

    for parts in device_prefetch(prefetch_map(prep_radiograph, paths, executor=pool), device):
        pending.extend(parts)
        if len(pending) >= batch:
            flush()
    if pending:
        flush()
    _sync(device)
    return len(paths) / (time.perf_counter() - t0), len(results)


def pipeline_volume(model: torch.nn.Module, series: list[list[Path]], batch: int, device: torch.device,
                    pool: ProcessPoolExecutor | None) -> float:
    """Slices/s of load + preprocess + forward + postprocess over whole series."""
    t0 = time.perf_counter()
    n = 0
    stream = device_prefetch(prefetch_map(prep_volume, series, executor=pool), device)
    for x, src_hw in stream:
        logits = run_batched(model, x, batch, device, output_device=device)  # post-process where the logits are
        masks = torch.nn.functional.interpolate((torch.sigmoid(logits) >= 0.5).half(), size=tuple(src_hw),
                                                mode="nearest").bool().cpu().numpy()
        n += masks.shape[0]
    _sync(device)
    return n / (time.perf_counter() - t0)


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = select_device(args.device)
    rng = np.random.default_rng(0)
    workers = args.workers if args.workers is not None else max(1, (os.cpu_count() or 2) - 1)
    # on a GPU the main process only feeds the device: leave the cores to the pre-processing workers
    default_threads = 2 if device.type == "cuda" else (os.cpu_count() or 2)
    torch.set_num_threads(max(1, args.torch_threads or default_threads))
    out: dict[str, Any] = {"device": str(device), "gpu": torch.cuda.get_device_name(0) if device.type == "cuda" else None,
                           "cpu_count": len(os.sched_getaffinity(0)), "workers": workers, "batch": args.batch,
                           "torch": torch.__version__, "python": platform.python_version(), "cases": {}}
    with tempfile.TemporaryDirectory(prefix="bench-overhead-") as tmp:
        tmpd = Path(tmp)
        dx = write_radiographs(tmpd, args.images, rng)
        vols = write_volumes(tmpd, args.series, args.slices, rng)
        pool = (ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn"), initializer=_worker_init)
                if workers > 0 else None)
        try:
            if pool is not None:
                list(pool.map(_warm, range(workers * 2)))
            prep_radiograph(dx[-1])  # warm-up: lazy imports and first-call set-up are not per-image costs
            t0 = time.perf_counter()
            for p in dx[:4]:
                prep_radiograph(p)
            prep2 = (time.perf_counter() - t0) / 4
            t0 = time.perf_counter()
            prep_volume(vols[0])
            prep3 = (time.perf_counter() - t0) / args.slices
            # 2-D
            net2 = prepare_model(build_network("resnet_classifier", backbone="resnet18", in_channels=1, num_outputs=1),
                                 device)
            bare2 = bare_throughput(net2, (1, 512, 341), args.batch, device, args.seconds)
            pipeline_radiograph(net2, dx[: max(2, args.batch)], args.batch, device, pool)  # warm-up
            pipe2, n_parts = pipeline_radiograph(net2, dx, args.batch, device, pool)
            out["cases"]["2d_radiograph_resnet18"] = {
                "input": "1x512x341", "items": len(dx), "parts": n_parts, "bare_images_per_s": bare2,
                "pipeline_images_per_s": pipe2, "ratio": pipe2 / bare2,
                "preprocess_s_per_image": prep2, "cpu_bound_images_per_s": max(workers, 1) / prep2}
            # 3-D
            net3 = prepare_model(build_network("unet2d"), device)
            bare3 = bare_throughput(net3, (1, 224, 224), args.batch, device, args.seconds)
            pipeline_volume(net3, vols[:1], args.batch, device, pool)  # warm-up
            pipe3 = pipeline_volume(net3, vols, args.batch, device, pool)
            out["cases"]["3d_volume_unet2d"] = {
                "input": f"{args.series} series x {args.slices} slices, 256x256 -> 224x224",
                "items": args.series * args.slices, "bare_images_per_s": bare3, "pipeline_images_per_s": pipe3,
                "ratio": pipe3 / bare3, "preprocess_s_per_image": prep3, "cpu_bound_images_per_s": max(workers, 1) / prep3}
        finally:
            if pool is not None:
                pool.shutdown()
    return out


def _table(res: dict[str, Any]) -> str:
    dev = res["gpu"] or f"CPU ({res['cpu_count']} cores)"
    note = f" {res['note']}." if res.get("note") else ""
    rows = []
    for name, c in res["cases"].items():
        ceiling = min(c["bare_images_per_s"], c["cpu_bound_images_per_s"])
        rows.append(
            f"| {name} | {c['input']} | {c['bare_images_per_s']:.1f} | {c['pipeline_images_per_s']:.1f} | "
            f"{100 * c['ratio']:.1f}% | {1000 * c['preprocess_s_per_image']:.1f} ms | "
            f"{c['cpu_bound_images_per_s']:.1f} | {100 * c['pipeline_images_per_s'] / ceiling:.0f}% |")
    return "\n".join([
        f"Device: {dev}, batch {res['batch']}, {res['workers']} pre-processing worker processes, "
        f"torch {res['torch']}.{note}",
        "",
        "| case | input | bare model(x) images/s | pipeline images/s | pipeline / bare | pre-process per image "
        "(one process) | pre-processing limit (workers / per-image time) | pipeline / min(bare, pre-processing limit) |",
        "|---|---|---|---|---|---|---|---|",
        *rows,
    ])


def update_readme(readme: Path, results: list[dict[str, Any]]) -> None:
    """Replace (or append) the '## Inference overhead' section of the benchmarks README."""
    text = readme.read_text(encoding="utf-8") if readme.exists() else "# Benchmarks\n"
    body = "\n\n".join(_table(r) for r in results)
    notes = Path(__file__).with_name("results") / "inference_overhead_notes.md"
    if notes.exists():
        body += "\n\n" + notes.read_text(encoding="utf-8").strip()
    section = (
        f"{SECTION}\n\n`python benchmarks/inference_overhead.py` compares the pipeline (load + pre-process + forward "
        "+ post-process, pre-processing in worker processes) with bare `model(x)` on a ready device tensor at the "
        "same batch size, in one run. Targets: pipeline >= 80% of bare on a GPU, >= 60% on CPU.\n\n" + body + "\n"
    )
    if SECTION in text:
        start = text.index(SECTION)
        nxt = text.find("\n## ", start + len(SECTION))
        text = text[:start] + section + ("\n" + text[nxt + 1:] if nxt != -1 else "")
    else:
        text = text.rstrip("\n") + "\n\n" + section
    readme.write_text(text, encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--images", type=int, default=96, help="radiographs in the 2-D case")
    p.add_argument("--series", type=int, default=6, help="series in the 3-D case")
    p.add_argument("--slices", type=int, default=32, help="slices per series")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--workers", type=int, help="pre-processing processes (default: cores - 1)")
    p.add_argument("--torch-threads", type=int, help="intra-op threads of the main process")
    p.add_argument("--seconds", type=float, default=3.0, help="duration of each bare measurement")
    p.add_argument("--json", help="write the results as JSON here")
    p.add_argument("--readme", help="update this README's 'Inference overhead' section (with --merge-json files)")
    p.add_argument("--merge-json", nargs="*", default=[], help="earlier result files to list in the README too")
    p.add_argument("--render-only", action="store_true", help="only rewrite the README from --merge-json files")
    args = p.parse_args(argv)
    if args.render_only:
        if not args.readme:
            p.error("--render-only needs --readme")
        update_readme(Path(args.readme), [json.loads(Path(f).read_text(encoding="utf-8")) for f in args.merge_json])
        return 0
    res = run(args)
    print(json.dumps(res, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n", encoding="utf-8")
    if args.readme:
        others = [json.loads(Path(f).read_text(encoding="utf-8")) for f in args.merge_json]
        update_readme(Path(args.readme), [*others, res])
    return 0


if __name__ == "__main__":
    sys.exit(main())
