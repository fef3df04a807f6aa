"""Command line interface ``dicomnode``.

Each sub-command imports its implementation lazily so that ``--help`` and
``check-config`` start fast and do not import torch.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from dicomnode._identity import check_packages
from dicomnode.errors import DicomNodeError


def _setup_logging(level: str = "INFO") -> None:
    # under systemd (JOURNAL_STREAM set) journald adds the time stamp; log lines stay one line each
    stamp = "" if os.environ.get("JOURNAL_STREAM") else "%(asctime)s "
    logging.basicConfig(
        level=getattr(logging, level),
        stream=sys.stderr,
        format=stamp + "%(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("pynetdicom").setLevel(logging.WARNING if level != "DEBUG" else logging.INFO)


def _cmd_serve(args: argparse.Namespace) -> int:
    from dicomnode.config import load_config
    from dicomnode.service import serve

    cfg = load_config(args.config)
    _setup_logging(cfg.log_level)
    return serve(cfg)


def _cmd_check_config(args: argparse.Namespace) -> int:
    from dicomnode.checks import check_routes
    from dicomnode.config import load_config
    from dicomnode.router import describe_routes

    cfg = load_config(args.file)
    problems = check_routes(cfg)
    for line in problems:
        print(f"error: {args.file}: {line}", file=sys.stderr)
    if problems:
        return 2
    print(f"config OK: {args.file}")
    print(describe_routes(cfg))
    return 0


def _cmd_route_explain(args: argparse.Namespace) -> int:
    from dicomnode.config import load_config
    from dicomnode.router import explain_paths

    cfg = load_config(args.config)
    print(explain_paths([Path(p) for p in args.paths], cfg))
    return 0


def _cmd_analyze(args: argparse.Namespace) -> int:
    from dicomnode.analyze import analyze

    _setup_logging("INFO")
    written = analyze(
        Path(args.path), task=args.task, out_dir=Path(args.out),
        model_dir=Path(args.model) if args.model else None,
        models_dir=Path(args.models_dir) if args.models_dir else None, device=args.device,
    )
    for p in written:
        print(p)
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    from dicomnode.config import load_config
    from dicomnode.status import print_status

    cfg = load_config(args.config)
    return print_status(cfg, limit=args.limit)


def _cmd_render(args: argparse.Namespace) -> int:
    from dicomnode.results.render import render_file

    render_file(Path(args.file), Path(args.out))
    print(args.out)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """Build the argument parser (exposed for documentation and tests)."""
    p = argparse.ArgumentParser(prog="dicomnode", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="run the node in the foreground")
    s.add_argument("--config", required=True)
    s.set_defaults(func=_cmd_serve)

    s = sub.add_parser("check-config", help="validate a config file (task names, promoted models) and print its routes")
    s.add_argument("file")
    s.set_defaults(func=_cmd_check_config)

    s = sub.add_parser("route", help="routing tools")
    rsub = s.add_subparsers(dest="route_command", required=True)
    e = rsub.add_parser("explain", help="explain which route each series under PATH matches")
    e.add_argument("paths", nargs="+", metavar="PATH")
    e.add_argument("--config", required=True)
    e.set_defaults(func=_cmd_route_explain)

    s = sub.add_parser("analyze", help="run one task offline on a folder of DICOM files")
    s.add_argument("path")
    s.add_argument("--task", required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--model", help="bundle directory (default: the registry's current version)")
    s.add_argument("--models-dir", help="model registry directory (default ./models)")
    s.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    s.set_defaults(func=_cmd_analyze)

    s = sub.add_parser("status", help="list studies, jobs and deliveries from the node database")
    s.add_argument("--config", required=True)
    s.add_argument("--limit", type=int, default=50)
    s.set_defaults(func=_cmd_status)

    s = sub.add_parser("render", help="render an SC or SEG result object to PNG")
    s.add_argument("file")
    s.add_argument("--out", required=True)
    s.set_defaults(func=_cmd_render)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``dicomnode``."""
    check_packages("inference")
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except DicomNodeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
