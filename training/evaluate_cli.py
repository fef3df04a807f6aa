"""``dicomnode-train evaluate BUNDLE_DIR --data DIR [--out DIR]``."""

from __future__ import annotations

import argparse
from pathlib import Path

from inference.errors import DicomNodeError

__all__ = ["add_arguments", "run"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of ``dicomnode-train evaluate``."""
    p.add_argument("bundle", metavar="BUNDLE", help="bundle folder, models/<task>/current, or a task name with "
                   "--models-dir")
    p.add_argument("--models-dir", help="registry to look a task name up in")
    p.add_argument("--data", required=True, help="labelled data folder (DICOM + labels.jsonl/csv)")
    p.add_argument("--out", help="output folder (default: BUNDLE_DIR/../<bundle>-eval)")
    p.add_argument("--subset", choices=["holdout", "all"], default="holdout",
                   help="the bundle's locked hold-out split of DATA (its training data), or every record; for a "
                        "site's external test set prefer `dicomnode-train validate`")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--workers", type=int, default=0, help="pre-processing worker processes")
    p.add_argument("--baseline", action="store_true",
                   help="also score the histogram + logistic-regression baseline on the same patients")
    p.add_argument("--baseline-train", metavar="DIR", default=None,
                   help="with --subset all: fit the baseline on this labelled folder (the training data)")
    p.add_argument("--no-clinic-baselines", action="store_true",
                   help="skip the task's simple clinical baselines (scored beside the network by default)")


def run(args: argparse.Namespace) -> int:
    """Evaluate and print where the report went."""
    from training.evaluate import evaluate_bundle
    from training.validate import resolve_bundle

    try:
        bundle = resolve_bundle(args.bundle, args.models_dir)
        out = Path(args.out) if args.out else bundle.parent / f"{bundle.name}-eval"
        ev = evaluate_bundle(bundle, args.data, out, subset=args.subset, device=args.device, num_workers=args.workers,
                             baseline=args.baseline or args.baseline_train is not None,
                             baseline_fit_dir=args.baseline_train, clinic_baselines=not args.no_clinic_baselines)
    except DicomNodeError as exc:
        print(f"error: {exc}")
        return 2
    name = ev.bundle.meta.primary_metric
    print(f"{ev.bundle.meta.task} {ev.bundle.meta.version}: {name} = {ev.primary:.4g} on {ev.n_records} of "
          f"{ev.n_total} records ({args.subset})")
    if args.subset == "holdout" and ev.holdout_matches is False:
        print(f"warning: scored only the {ev.n_records} records that fall in the bundle's hold-out split, and they are "
              "not the bundle's hold-out (another folder?): to score every study of an external test set run "
              "`dicomnode-train validate BUNDLE --data DIR`")
    if ev.baseline and "error" not in ev.baseline:
        shown = {k: round(float(v), 4) for k, v in ev.baseline.items() if k in ("auc", "kappa_quadratic", "macro_f1")}
        print(f"histogram baseline ({ev.baseline['protocol']}): {shown}")
    c = ev.comparison
    if c:
        flag = f"  BELOW THE REQUIRED {c['required_margin']:.2f}" if c["below_margin"] else ""
        print(f"strongest simple baseline ({c['baseline']}): {c['metric']} {c['baseline_value']:.4g}, network "
              f"{c['network']:.4g}, margin {c['margin']:+.3f}{flag}")
    for f in ev.files:
        print(f)
    return 0
