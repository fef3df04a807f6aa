"""Channels-last vs contiguous (NCHW) memory for the project's 2-D conv nets, in one run.

``python benchmarks/channels_last.py [--threads N] [--repeats R]`` times one training step
(forward, backward, Adam) and one inference forward per network and layout, alternating the
layouts so that both see the same machine load, and prints a Markdown table (median seconds,
speed-up of channels-last over NCHW). ``inference.runtime.to_channels_last`` applies the layout
on every device because of these figures.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch

from inference.nets import build_network

CASES: tuple[tuple[str, dict[str, Any], tuple[int, ...]], ...] = (
    ("unet2d", {}, (16, 1, 224, 224)),
    ("motion_cnn", {}, (16, 1, 256, 256)),
    ("resnet_classifier", {"backbone": "resnet18"}, (8, 1, 512, 341)),
    ("resnet_classifier", {"backbone": "resnet50"}, (4, 1, 512, 341)),
)


def _step(model: torch.nn.Module, x: torch.Tensor, opt: torch.optim.Optimizer) -> float:
    model.train()
    t = time.perf_counter()
    out = model(x)
    out = out[0] if isinstance(out, (tuple, list)) else out
    out.float().mean().backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return time.perf_counter() - t


def _infer(model: torch.nn.Module, x: torch.Tensor) -> float:
    model.eval()
    t = time.perf_counter()
    with torch.inference_mode():
        model(x)
    return time.perf_counter() - t


def main() -> None:
    """Run every case and print the table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, CPU, {args.threads} threads, median of {args.repeats}\n")
    print("| network | batch | train step NCHW (s) | train step channels-last (s) | speed-up | inference NCHW (s) "
          "| inference channels-last (s) | speed-up |")
    print("|---|---|---|---|---|---|---|---|")
    for arch, kwargs, shape in CASES:
        model = build_network(arch, **kwargs)
        x = torch.randn(*shape)
        times: dict[str, list[float]] = {k: [] for k in ("tn", "tc", "in", "ic")}
        for layout in ["nchw", "cl"] * (args.repeats + 1):  # the first pair warms up
            fmt = torch.channels_last if layout == "cl" else torch.contiguous_format
            model = model.to(memory_format=fmt)
            opt = torch.optim.Adam(model.parameters(), 1e-5)
            key = "c" if layout == "cl" else "n"
            times["t" + key].append(_step(model, x, opt))
            times["i" + key].append(_infer(model, x))
        med = {k: statistics.median(v[1:]) for k, v in times.items()}
        name = arch + (f" ({kwargs['backbone']})" if "backbone" in kwargs else "")
        print(f"| {name} | {shape[0]}x{'x'.join(map(str, shape[1:]))} | {med['tn']:.2f} | {med['tc']:.2f} | "
              f"{med['tn'] / med['tc']:.2f}x | {med['in']:.2f} | {med['ic']:.2f} | {med['in'] / med['ic']:.2f}x |")


if __name__ == "__main__":
    main()
