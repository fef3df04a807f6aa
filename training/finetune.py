"""``dicomnode-train finetune BUNDLE --data SITE_DIR``: fine-tune a shipped bundle on a site's data, then promote
it through the registry only if it beats the current version on the site's own locked hold-out.

1. The site's studies are split by patient with a site salt (``--salt``): the hold-out is a function of the
   patient ID alone, so it stays locked as the site adds studies (a manifest's ``split_hint`` overrides it).
2. Training starts from the bundle's weights (``init_from``, same network) with its training and task config;
   labels the site lacks are handled as weak labels: a wrist bundle trained on box labels uses study labels when
   positive studies have no boxes, spine rows without boxes get level-finder pseudo-boxes.
3. ``dicomnode-train promote`` logic compares the candidate with the registry's current version on that
   hold-out (both scored on the same studies) and moves the ``current`` pointer only if the candidate wins.

Exit status: 0 promoted, 1 trained but not promoted, 2 error.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import logging
from pathlib import Path
from typing import Any

from inference.bundle import read_meta
from inference.errors import DicomNodeError

log = logging.getLogger(__name__)

__all__ = ["add_arguments", "finetune", "run", "site_configs"]


def site_configs(meta: Any, adapter: Any, records: list[Any], *, epochs: int, holdout: float, salt: str,
                 bundle_dir: Path, device: str, version: str, sets: list[str]) -> tuple[Any, Any, list[str]]:
    """(TrainConfig, task config, notes) of a fine-tuning run: the bundle's own, started from its weights, split
    by the site salt, with weak-label settings for what the site's rows lack."""
    from training.train_cli import apply_set_items
    from training.trainer import TrainConfig

    notes: list[str] = []
    val = min(0.15, (1.0 - holdout) / 2)
    train_raw = {**meta.train_config, "epochs": epochs, "init_from": str(bundle_dir), "init_mode": "exact",
                 "init_skip": [], "version": version, "device": device, "cache_dir": None, "num_workers": 0,
                 "split": {"train": round(1.0 - holdout - val, 6), "val": val, "holdout": holdout,
                           "salt": f"site:{salt}"},
                 "synthetic_only": None}
    task_raw = dict(meta.task_config)
    rows = [r.row for r in records]
    positives_unboxed = [r for r in rows if str(r.get("label")) in ("1", "True", "true") and not r.get("boxes")]
    if task_raw.get("image_labels") == "boxes" and positives_unboxed:
        task_raw["image_labels"] = "study"
        notes.append(f"{len(positives_unboxed)} positive studies have no boxes: image labels from the study label")
    if meta.task == "spine_bmd" and any(r.get("vertebrae") and not r.get("boxes") for r in rows):
        task_raw["pseudo_boxes"] = True
        notes.append("spine rows with per-level classes but no boxes: level-finder pseudo-boxes")
    apply_set_items(sets, train_raw, task_raw, TrainConfig.model_fields, adapter.config_model.model_fields)
    return TrainConfig.model_validate(train_raw), adapter.config_model.model_validate(task_raw), notes


def finetune(bundle: str, data: str, *, models_dir: str | None = None, out: str | None = None, epochs: int = 3,
             holdout: float = 0.2, salt: str = "site", device: str = "auto", margin: float = 0.0,
             version: str | None = None, sets: list[str] | None = None) -> tuple[Path, Any, list[str]]:
    """Train the candidate and run the promotion; return (candidate folder, promotion decision, notes)."""
    from training.data import load_records, split_records
    from training.promote import promote_if_better
    from training.tasks import get_adapter
    from training.trainer import train
    from training.validate import ValidateError, resolve_bundle

    bundle_dir = resolve_bundle(bundle, models_dir)
    if models_dir is None and not (bundle_dir.parent / "current").is_file():
        raise ValidateError(f"{bundle_dir} is not in a model registry (no current pointer beside it): pass "
                            "--models-dir to say where the candidate is promoted")
    registry = Path(models_dir) if models_dir else bundle_dir.parent.parent
    meta = read_meta(bundle_dir)
    adapter = get_adapter(meta.task)
    version = version or f"site-{_dt.datetime.now(_dt.UTC).strftime('%Y%m%dT%H%M%SZ')}"
    records = load_records(Path(data))
    cfg, tcfg, notes = site_configs(meta, adapter, records, epochs=epochs, holdout=holdout, salt=salt,
                                    bundle_dir=bundle_dir, device=device, version=version, sets=list(sets or []))
    split = split_records(records, cfg.split)
    if not split.holdout or not split.train:
        raise ValidateError(f"the site split has {len(split.train)} training and {len(split.holdout)} hold-out "
                            "studies: fine-tuning needs both; add studies or change --holdout")
    log.info("%s fine-tuning: %d train / %d val / %d site hold-out studies (%d hold-out patients)", meta.task,
             len(split.train), len(split.val), len(split.holdout), len({r.patient_id for r in split.holdout}))
    target = Path(out) if out else Path.cwd() / f"finetune-{meta.task}-{version}"
    result = train(adapter, split, target, cfg, tcfg)
    decision = promote_if_better(result.bundle_dir, registry, data_dir=data, margin=margin, device=device)
    return result.bundle_dir, decision, notes


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of ``dicomnode-train finetune``."""
    p.add_argument("bundle", metavar="BUNDLE", help="models/<task>/current, a bundle folder, or a task name "
                   "with --models-dir")
    p.add_argument("--data", required=True, help="the site's labelled folder (see import-labels)")
    p.add_argument("--models-dir", help="registry to promote into (default: the one holding BUNDLE)")
    p.add_argument("--out", help="candidate bundle folder (default ./finetune-<task>-<version>)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--holdout", type=float, default=0.2, help="share of the site's patients held out (locked)")
    p.add_argument("--salt", default="site", help="salt of the site's patient split (keep it to keep the hold-out)")
    p.add_argument("--margin", type=float, default=0.0, help="improvement needed on the site hold-out to promote")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--version", help="candidate version (default site-<UTC time>)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override one config key")


def run(args: argparse.Namespace) -> int:
    """Fine-tune, promote if better, print the decision."""
    try:
        cand, d, notes = finetune(args.bundle, args.data, models_dir=args.models_dir, out=args.out,
                                  epochs=args.epochs, holdout=args.holdout, salt=args.salt, device=args.device,
                                  margin=args.margin, version=args.version, sets=args.set)
    except DicomNodeError as exc:
        print(f"error: {exc}")
        return 2
    for n in notes:
        print(f"note: {n}")
    print(cand)
    print(f"{'promoted' if d.promoted else 'not promoted'}: {d.version} ({d.reason}; site hold-out)")
    return 0 if d.promoted else 1
