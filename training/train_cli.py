"""``dicomnode-train train TASK --data DIR --out BUNDLE_DIR [--epochs N --device D --config YAML --set k=v]``.

The YAML file has two optional sections, ``train:`` (:class:`~training.trainer.TrainConfig`)
and ``task:`` (the task's typed config). ``--set`` overrides single keys:
``train.lr=0.01``, ``task.input_size=[341,512]``, or a bare key, looked up in
the train config first and then in the task config. Values are parsed as YAML.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from inference.errors import DicomNodeError
from training.distributed_launch import add_distributed_arguments, relaunch_if_distributed

log = logging.getLogger(__name__)

__all__ = ["add_arguments", "apply_set_items", "build_configs", "run"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of ``dicomnode-train train``."""
    p.add_argument("task")
    p.add_argument("--data", required=True, help="labelled data folder (DICOM + labels.jsonl/csv)")
    p.add_argument("--out", required=True, help="bundle directory to write")
    p.add_argument("--epochs", type=int)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"])
    p.add_argument("--config", help="YAML with 'train:' and 'task:' sections")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override one config key")
    p.add_argument("--work-dir", help="checkpoints, training log and cache (default OUT.work)")
    p.add_argument("--no-resume", action="store_true", help="ignore an existing checkpoint")
    p.add_argument("--version", help="bundle version string (default: UTC timestamp)")
    p.add_argument("--fp16", action="store_true", help="store weights in float16 (demo bundles)")
    p.add_argument("--workers", type=int, help="data loading / pre-processing processes")
    p.add_argument("--method", help="shortcut for --set task.method=... (tasks whose config has a 'method' field)")
    p.add_argument("--backbone", help="shortcut for --set task.backbone=... (tasks whose config has a 'backbone' field)")
    add_distributed_arguments(p)
    p.add_argument("--synthetic", action="store_true",
                   help="mark the bundle as trained on synthetic data only (also automatic when every manifest "
                        "row has \"synthetic\": true)")


def _set(tree: dict[str, Any], dotted: str, value: Any) -> None:
    node = tree
    parts = dotted.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value


def apply_set_items(items: list[str], stage: dict[str, Any], task: dict[str, Any], stage_fields: Any,
                    task_fields: Any) -> None:
    """Apply ``--set KEY=VALUE`` items (values parsed as YAML) to a stage's and a task's raw config.

    ``train.KEY`` and ``task.KEY`` name the section; a bare key is looked up in ``stage_fields`` first, then in
    ``task_fields``. Dotted keys (``split.salt``) set nested values.

    Raises
    ------
    DicomNodeError
        If an item has no ``=`` or its key is in neither config.
    """
    for item in items:
        key, sep, text = item.partition("=")
        if not sep:
            raise DicomNodeError(f"--set expects KEY=VALUE, got {item!r}")
        value = yaml.safe_load(text)
        if key.startswith("train."):
            _set(stage, key[6:], value)
        elif key.startswith("task."):
            _set(task, key[5:], value)
        elif key.split(".")[0] in stage_fields:
            _set(stage, key, value)
        elif key.split(".")[0] in task_fields:
            _set(task, key, value)
        else:
            raise DicomNodeError(f"--set: unknown key {key!r}")


def build_configs(adapter: Any, args: argparse.Namespace) -> tuple[Any, Any]:
    """(TrainConfig, task config) from ``--config``, ``--set`` and the shortcut options.

    Raises
    ------
    DicomNodeError
        If the YAML is unreadable or a key is unknown / invalid.
    """
    from training.trainer import TrainConfig

    raw: dict[str, Any] = {}
    if args.config:
        try:
            raw = yaml.safe_load(Path(args.config).read_text(encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise DicomNodeError(f"cannot read config {args.config}: {exc}") from exc
        if not isinstance(raw, dict) or set(raw) - {"train", "task"}:
            raise DicomNodeError(f"config {args.config} must be a mapping with 'train' and/or 'task' sections")
    # a task adapter may declare its faithful TrainConfig values (e.g. batch size, balanced sampling)
    train_raw: dict[str, Any] = {**dict(getattr(adapter, "train_config_defaults", None) or {}),
                                 **dict(raw.get("train") or {})}
    task_raw: dict[str, Any] = dict(raw.get("task") or {})
    apply_set_items(args.set, train_raw, task_raw, TrainConfig.model_fields, adapter.config_model.model_fields)
    for opt, field in (("epochs", "epochs"), ("device", "device"), ("version", "version"), ("workers", "num_workers")):
        if getattr(args, opt, None) is not None:
            train_raw[field] = getattr(args, opt)
    if getattr(args, "method", None) is not None:
        if "method" not in adapter.config_model.model_fields:
            raise DicomNodeError(f"--method: task {adapter.name} has no 'method' option")
        task_raw["method"] = args.method
    if getattr(args, "backbone", None) is not None:
        if "backbone" not in adapter.config_model.model_fields:
            raise DicomNodeError(f"--backbone: task {adapter.name} has no 'backbone' option")
        task_raw["backbone"] = args.backbone
    if getattr(args, "fp16", False):
        train_raw["fp16_weights"] = True
    if getattr(args, "synthetic", False):
        train_raw["synthetic_only"] = True
    try:
        return TrainConfig.model_validate(train_raw), adapter.config_model.model_validate(task_raw)
    except ValidationError as exc:
        raise DicomNodeError(f"invalid training config:\n{exc}") from exc


def run(args: argparse.Namespace) -> int:
    """Train and write the bundle; print its path."""
    relaunched = relaunch_if_distributed(args)
    if relaunched is not None:
        return relaunched
    from training.data import load_records, split_records
    from training.file_index import FILE_INDEX_NAME, FileIndex
    from training.tasks import get_adapter
    from training.trainer import cache_dir_of, train, work_dir_of

    try:
        adapter = get_adapter(args.task)
    except KeyError as exc:
        print(f"error: {exc.args[0]}")
        return 2
    try:
        cfg, tcfg = build_configs(adapter, args)
        work = work_dir_of(args.out, args.work_dir)
        # the sample cache's file index: a resumed or repeated run reads no DICOM header again
        records = load_records(Path(args.data), FileIndex(cache_dir_of(cfg, work) / FILE_INDEX_NAME))
        split = split_records(records, cfg.split)
        log.info("%s: %d train / %d val / %d hold-out records", args.task, len(split.train), len(split.val),
                 len(split.holdout))
        result = train(adapter, split, Path(args.out), cfg, tcfg,
                       work_dir=work, resume=not args.no_resume)
    except DicomNodeError as exc:
        print(f"error: {exc}")
        return 2
    print(result.bundle_dir)
    return 0
