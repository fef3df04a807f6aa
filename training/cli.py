"""Command line interface ``dicomnode-train``.

Sub-commands import their implementation lazily; each module owns its options
through a ``add_arguments(parser)`` / ``run(args)`` pair.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from inference.identity import check_packages

# sub-command -> module implementing add_arguments(parser) and run(args) -> int
COMMANDS: dict[str, tuple[str, str]] = {
    "synth": ("training.synth.cli", "write synthetic DICOM studies plus a labels manifest"),
    "pretrain-patches": ("training.patch_pretrain", "pretrain a task's network on lesion-box patches (init_from)"),
    "train": ("training.train_cli", "train a task and write a model bundle"),
    "evaluate": ("training.evaluate_cli", "evaluate a bundle on a labelled data folder"),
    "validate": ("training.validate", "validate a bundle on a site's own labelled studies (every study, full report)"),
    "import-labels": ("training.import_labels", "build a labels manifest from a hospital export (CSV/Excel, DXA, SEG, SR)"),
    "finetune": ("training.finetune", "fine-tune a shipped bundle on site data and promote it if it wins on the site hold-out"),
    "baseline": ("training.baseline", "cross-validated histogram baseline on a labelled folder"),
    "retune": ("training.retune", "choose a bundle's operating points again on its validation split (same weights)"),
    "compare": ("training.compare", "one table from several evaluations of a task (e.g. backbones) on the same data"),
    "promote": ("training.promote", "promote a bundle into a registry if it beats the current one"),
    "schedule": ("training.nightly.scheduler", "run the nightly retraining scheduler"),
}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """Build the parser; with ``only``, import just that sub-command's module (the others stay listed)."""
    p = argparse.ArgumentParser(prog="dicomnode-train", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    for name, (module, help_text) in COMMANDS.items():
        sp = sub.add_parser(name, help=help_text)
        if only is not None and name != only:
            continue
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name is None or not module.startswith(exc.name):
                raise
            sp.set_defaults(func=lambda a, n=name: _missing(n))
            continue
        mod.add_arguments(sp)
        sp.set_defaults(func=mod.run)
    return p


def _missing(name: str) -> int:
    print(f"error: 'dicomnode-train {name}' is not available in this installation", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``dicomnode-train``."""
    check_packages("inference", "training")
    level = logging.INFO
    logging.basicConfig(level=level, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    argv = sys.argv[1:] if argv is None else argv
    only = argv[0] if argv and argv[0] in COMMANDS else None
    args = build_parser(only).parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
