"""``dicomnode-train retune BUNDLE --data DIR --out NEW_BUNDLE --set KEY=VALUE``: new operating points, same weights.

A site may want another operating point than the one a bundle was trained with:
a higher rescan sensitivity for ``hrpqct_motion``, say. The operating points are
the task config's ``after_training`` fields, which the adapter's ``tune`` chooses
on the validation split after training (:meth:`training.adapter.BaseAdapter.tune`).
This command repeats exactly that step for a finished bundle:

1. the task config is the bundle's with the ``--set`` overrides, which may only
   name ``after_training`` fields (anything else would change what the weights
   were trained for);
2. the data folder must be the bundle's training data: its train + validation
   records must hash to the bundle's ``training_data_hash`` and its hold-out to
   the ``holdout_hash`` (otherwise the "validation split" would be another set);
3. the bundle's weights score the validation split, ``tune`` chooses the
   operating points, and the locked hold-out is scored again with them;
4. a new bundle is written (atomically) with the same weights, the new
   ``task_config``, hold-out metrics and version, and a note naming the source
   bundle, its weights' SHA-256 and what was re-tuned. Promote it as usual.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import logging
import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from inference.bundle import load_bundle, save_bundle
from inference.errors import DicomNodeError
from inference.runtime import select_device
from training.data import SampleCache, data_hash, load_records
from training.evaluate import as_trained
from training.tasks import get_adapter
from training.trainer import TrainError, evaluate_records, model_card, work_dir_of

log = logging.getLogger(__name__)

__all__ = ["add_arguments", "retune_bundle", "run"]


def retune_bundle(bundle_dir: str | os.PathLike[str], data_dir: str | os.PathLike[str],
                  out_dir: str | os.PathLike[str], overrides: dict[str, Any], *, version: str | None = None,
                  device: str = "auto", cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Choose a bundle's operating points again on its validation split and write them as a new bundle.

    Returns the new bundle's directory.

    Raises
    ------
    TrainError
        If an override is not an operating point of the task, the task has no tuning step, the data folder
        is not the bundle's training data, or there are no validation records.
    """
    bundle = load_bundle(bundle_dir)
    meta = bundle.meta
    adapter = get_adapter(meta.task)
    cfg_model = adapter.config_model
    tunable = getattr(cfg_model, "after_training", frozenset())
    bad = sorted(set(overrides) - set(tunable))
    if bad:
        raise TrainError(f"retune can only set the operating points of {meta.task} ({', '.join(sorted(tunable)) or 'none'}); "
                         f"not {', '.join(bad)}")
    try:
        tcfg = cfg_model.model_validate({**meta.task_config, **overrides})
    except ValidationError as exc:
        raise TrainError(f"invalid task config:\n{exc}") from exc
    cache = SampleCache(cache_dir or work_dir_of(out_dir) / "cache")
    train_cfg, split = as_trained(meta, load_records(data_dir, cache.file_index), device=device)
    if data_hash(split.train + split.val, cache.file_index) != meta.training_data_hash or (
            meta.holdout_hash is not None and split.holdout_hash != meta.holdout_hash):
        raise TrainError(f"{data_dir} is not the training data of bundle {meta.version} (its train/validation or "
                         "hold-out records hash differently), so its validation split cannot be rebuilt")
    if not split.val:
        raise TrainError(f"bundle {meta.version} has no validation records to tune on")
    dev = select_device(device)
    model = bundle.load_into(adapter.build_model(tcfg)).to(dev)
    val = evaluate_records(adapter, model, split.val, tcfg, train_cfg, dev, cache)
    tuned, note = adapter.tune(val, tcfg)
    metrics = (evaluate_records(adapter, model, split.holdout, tuned, train_cfg, dev, cache).metrics
               if split.holdout else {})
    source = f"operating points re-tuned from bundle {meta.version} (weights sha256 {meta.weights_sha256})"
    changes = ", ".join(f"{k}={v!r}" for k, v in sorted(overrides.items()))
    new_meta = meta.model_copy(update={
        "version": version or f"{meta.version}-retuned",
        "created_at": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "task_config": tuned.model_dump(mode="json"), "metrics": metrics,
        "notes": "; ".join(n for n in (meta.notes, f"{source} with {changes or 'its own settings'}", note) if n),
    })
    out = save_bundle(out_dir, new_meta, bundle.state_dict, model_card(adapter, tuned, new_meta, split),
                      fp16=meta.weights_dtype == "float16")
    log.info("%s: %s; %s", meta.task, source, note)
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of ``retune``."""
    p.add_argument("bundle", metavar="BUNDLE_DIR")
    p.add_argument("--data", required=True, help="the bundle's training data folder (its validation split is used)")
    p.add_argument("--out", required=True, help="new bundle directory")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="operating-point field of the task config (task.KEY or KEY)")
    p.add_argument("--version", help="new bundle version (default: SOURCE-retuned)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--cache-dir", help="sample cache (default: OUT.work/cache)")


def run(args: argparse.Namespace) -> int:
    """Re-tune and print the new bundle's path."""
    overrides: dict[str, Any] = {}
    for item in args.set:
        key, sep, text = item.partition("=")
        if not sep:
            print(f"error: --set expects KEY=VALUE, got {item!r}")
            return 2
        overrides[key.removeprefix("task.")] = yaml.safe_load(text)
    try:
        out = retune_bundle(args.bundle, args.data, args.out, overrides, version=args.version, device=args.device,
                            cache_dir=args.cache_dir)
    except DicomNodeError as exc:
        print(f"error: {exc}")
        return 2
    print(out)
    return 0
