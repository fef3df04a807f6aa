"""``dicomnode-train synth TASK --out DIR --n N --seed S``: write synthetic studies plus a labels manifest."""

from __future__ import annotations

import argparse
import importlib
import inspect
import logging
import shutil
import time
from pathlib import Path

from training.synth.common import SynthError
from training.synth.manifest import MANIFEST_NAMES
from training.synth.params import check_params, describe, parse_assignments

log = logging.getLogger(__name__)

#: task name -> generator module (each has generate(...) and preview(...))
GENERATORS: dict[str, str] = {
    "wrist_fracture": "training.synth.wrist_fracture",
    "physis_fracture": "training.synth.physis_fracture",
    "spine_bmd": "training.synth.spine_bmd",
    "hrpqct_motion": "training.synth.hrpqct_motion",
    "knee_bone_seg": "training.synth.knee_bone_seg",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of the ``synth`` sub-command."""
    parser.add_argument("task", choices=sorted(GENERATORS), help="task whose studies to generate")
    parser.add_argument("--out", type=Path, help="output folder (study/series/instance.dcm); required")
    parser.add_argument("--n", type=int, help="number of studies; required")
    parser.add_argument("--seed", type=int, default=0, help="seed; the same seed gives identical output")
    parser.add_argument("--difficulty", type=float, default=None,
                        help="0 (obvious) .. 1 (subtle); default the task generator's own (training/README.md)")
    parser.add_argument("--label-noise", type=float, default=0.02, help="fraction of flipped labels")
    parser.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    parser.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                        help="a generator parameter (repeatable), e.g. texture_sd_max=60 for hrpqct_motion; "
                             "--param help lists the task's")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the synthetic set already in --out (a folder with a labels manifest)")
    parser.add_argument("--preview", type=Path, default=None,
                        help="also write a PNG contact sheet of some of the generated studies here")


def load_generator(task: str) -> object:
    """Import the generator module of ``task``."""
    if task not in GENERATORS:
        raise SynthError(f"no synthetic generator for task {task!r}; known: {', '.join(sorted(GENERATORS))}")
    try:
        return importlib.import_module(GENERATORS[task])
    except ModuleNotFoundError as exc:
        if exc.name == GENERATORS[task]:
            raise SynthError(f"the generator for {task!r} is not available in this installation") from None
        raise


def default_difficulty(mod: object) -> float:
    """The default of the ``difficulty`` argument of the generator module's ``generate``."""
    return float(inspect.signature(mod.generate).parameters["difficulty"].default)  # type: ignore[attr-defined]


def _remove_previous_set(out: Path) -> None:
    """Delete ``out`` if it holds an earlier synthetic set; refuse any other non-empty folder."""
    if not out.is_dir() or not any(out.iterdir()):
        return
    if not any((out / name).is_file() for name in MANIFEST_NAMES):
        raise SynthError(f"--overwrite replaces only a synthetic set (a folder with a labels manifest); {out} has none")
    log.info("--overwrite: removing the earlier synthetic set in %s", out)
    shutil.rmtree(out)


def run(args: argparse.Namespace) -> int:
    """Generate the studies (and the preview); return the exit status."""
    try:
        mod = load_generator(args.task)
        spec = getattr(mod, "PARAMS", {})
        if args.param == ["help"]:
            print(f"parameters of {args.task} (--param KEY=VALUE):\n{describe(spec)}")
            return 0
        if args.out is None or args.n is None:
            raise SynthError("synth needs --out DIR and --n N")
        params = check_params(args.task, parse_assignments(args.param), spec)  # before any work
        if args.preview is not None and args.n == 0:
            raise SynthError("--preview needs at least one study (--n 0)")
        if args.overwrite:
            _remove_previous_set(Path(args.out))
        difficulty = args.difficulty if args.difficulty is not None else default_difficulty(mod)
        t0 = time.perf_counter()
        manifest = mod.generate(args.out, args.n, args.seed, workers=args.workers,  # type: ignore[attr-defined]
                                difficulty=difficulty, label_noise=args.label_noise, params=params)
        dt = time.perf_counter() - t0
        log.info("%s: %d studies in %.1f s (%.1f studies/s); manifest %s", args.task, args.n, dt,
                 args.n / max(dt, 1e-9), manifest)
        if args.preview is not None:
            from training.synth.preview import sheet_from_folder

            # the studies just written, with the difficulty, label noise and parameters asked for
            shown = min(args.n, 8)
            png = sheet_from_folder(args.out, args.preview, max_images=max(4, 2 * shown), per_series=2)
            log.info("preview written to %s", png)
    except SynthError as exc:
        log.error("%s", exc)
        return 2
    print(manifest)
    return 0
