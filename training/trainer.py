"""One training loop for every task.

The loop is configured by :class:`TrainConfig` and specialised by a task's
:class:`~training.adapter.TaskAdapter`. It seeds everything, uses AMP on CUDA,
checkpoints every ``checkpoint_every`` epochs and resumes from the checkpoint
after an interruption (:mod:`training.checkpoint`; on CPU with a fixed seed the
result equals an uninterrupted run), stops early, supports LR schedules and class-balanced
sampling, and runs under ``torchrun`` with DistributedDataParallel through the
same code path (world size 1 otherwise). It ends by evaluating the best
checkpoint on the locked hold-out split and writing a bundle.
"""

from __future__ import annotations

import copy
import datetime as _dt
import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from inference.bundle import BundleMeta, save_bundle
from inference.runtime import autocast_context, select_device, to_channels_last
from training.adapter import EvalResult, TaskAdapter, TaskConfig, move_to
from training.checkpoint import CHECKPOINT, fingerprint, read_checkpoint, write_checkpoint, write_train_log
from training.data import RecordDataset, SampleCache, Split, data_hash
from training.errors import TrainError
from training.sampling import EpochSampler, balanced_indices, make_loader, seed_everything
from training.train_config import TrainConfig
from training.warm_start import load_initial_weights

log = logging.getLogger(__name__)

__all__ = [
    "EpochSampler", "TrainConfig", "TrainError", "TrainResult", "balanced_indices", "evaluate_records",
    "cache_dir_of", "load_initial_weights", "make_loader", "model_card", "seed_everything", "train", "work_dir_of",
]

@dataclass
class TrainResult:
    """Outcome of :func:`train`."""

    bundle_dir: Path
    metrics: dict[str, Any]
    history: list[dict[str, Any]]
    best_epoch: int
    epochs_run: int


@dataclass
class _Dist:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def _init_distributed(device_pref: str) -> tuple[_Dist, torch.device]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return _Dist(), select_device(device_pref)
    import torch.distributed as dist

    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and device_pref != "cpu"
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    if use_cuda:
        torch.cuda.set_device(local)
    return _Dist(rank, local, world), torch.device(f"cuda:{local}" if use_cuda else "cpu")


def _make_optimizer(params: Any, cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def _make_scheduler(opt: torch.optim.Optimizer, cfg: TrainConfig, greater: bool) -> Any:
    if cfg.schedule == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(
            opt, mode="max" if greater else "min", factor=cfg.gamma, patience=cfg.plateau_patience, min_lr=cfg.min_lr)
    if cfg.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs, eta_min=cfg.min_lr)
    if cfg.schedule == "step":
        return torch.optim.lr_scheduler.StepLR(opt, step_size=cfg.step_size, gamma=cfg.gamma)
    return None


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "module") else model


def _progress(iterable: Any, total: int, desc: str) -> Any:
    from training.progress import track

    return track(iterable, total, desc, "steps", logger=log)


def evaluate_records(adapter: TaskAdapter, model: torch.nn.Module, records: Sequence[Any], tcfg: TaskConfig,
                     cfg: TrainConfig, device: torch.device, cache: SampleCache | None) -> EvalResult:
    """Evaluate ``model`` on ``records`` with the adapter's metrics (model put in eval mode)."""
    ds = RecordDataset(records, adapter.preprocessor(tcfg), adapter.preprocess_signature(tcfg), cache=cache,
                       workers=cfg.num_workers)
    if len(ds) == 0:
        raise TrainError("evaluation set is empty")
    loader = make_loader(ds, cfg, adapter.collate(tcfg), batch_size=cfg.eval_batch_size or cfg.batch_size,
                         epoch_seed=cfg.seed)
    was_training = model.training
    model.eval()
    from training.progress import TrackedLoader

    with torch.inference_mode():
        result = adapter.evaluate(_unwrap(model), TrackedLoader(loader, f"{adapter.name} evaluation", logger=log),
                                  device, tcfg)
    model.train(was_training)
    if adapter.primary_metric not in result.metrics:
        raise TrainError(f"task {adapter.name} evaluation lacks its primary metric {adapter.primary_metric!r}")
    return result


def _better(a: float, b: float | None, greater: bool) -> bool:
    if b is None or (isinstance(b, float) and math.isnan(b)):
        return not math.isnan(a)
    return a > b if greater else a < b


def model_card(adapter: TaskAdapter, tcfg: TaskConfig, meta: BundleMeta, split: Split) -> str:
    """The model card (Markdown) of a bundle with ``meta`` trained on ``split``."""
    synth = ("**Trained on synthetic studies only.** It demonstrates the pipeline; it has not been validated on "
             "patient data and must not be used for diagnosis.\n\n" if meta.synthetic_only else "")
    metrics = "\n".join(f"- {k}: {v:.4g}" for k, v in meta.metrics.items() if isinstance(v, (int, float)))
    counts = split.summary()
    return (
        f"# Model card: {meta.task} {meta.version}\n\n{synth}"
        f"- Architecture: `{meta.architecture}` {json.dumps(meta.init_args, sort_keys=True)}\n"
        f"- Training data: {counts['records']['train']} train / {counts['records']['val']} validation records "
        f"({counts['patients']['train']} / {counts['patients']['val']} patients), data hash `{meta.training_data_hash}`\n"
        f"- Locked hold-out: {counts['records']['holdout']} records ({counts['patients']['holdout']} patients), "
        f"hash `{meta.holdout_hash}`\n- Code: {meta.code.package} {meta.code.git_commit or ''}\n"
        f"- Created: {meta.created_at}\n\n## Hold-out metrics\n\n{metrics or '- (no hold-out records)'}\n\n"
        f"## Intended use and limits\n\nDecision support only: every result is marked \"AI RESULT - NOT FOR "
        f"DIAGNOSTIC USE ALONE\". Performance on other scanners, sites or populations is unknown until measured.\n\n"
        f"{adapter.card_notes(tcfg)}\n"
    )


def work_dir_of(out_dir: str | os.PathLike[str], work_dir: str | os.PathLike[str] | None = None) -> Path:
    """The working directory of a run writing ``out_dir``: ``work_dir``, else ``OUT.work`` beside it."""
    out = Path(out_dir)
    return Path(work_dir) if work_dir is not None else out.with_name(out.name + ".work")


def cache_dir_of(cfg: TrainConfig, work: Path) -> Path:
    """The sample cache directory of a run: ``cfg.cache_dir``, else ``WORK/cache``."""
    return Path(cfg.cache_dir) if cfg.cache_dir else work / "cache"


@dataclass
class _Run:
    """What one training run works with (built once by :func:`_setup`)."""

    adapter: TaskAdapter
    split: Split
    cfg: TrainConfig
    tcfg: TaskConfig
    work: Path
    dist: _Dist
    device: torch.device
    amp: bool
    cache: SampleCache
    train_ds: RecordDataset
    sampler: EpochSampler
    model: torch.nn.Module
    opt: torch.optim.Optimizer
    sched: Any
    scaler: torch.amp.GradScaler
    fingerprint: str
    init_note: str = ""

    @property
    def ckpt_path(self) -> Path:
        """The run's checkpoint file."""
        return self.work / CHECKPOINT


@dataclass
class _State:
    """What changes from epoch to epoch (and what a checkpoint restores)."""

    best_state: dict[str, Any]
    start_epoch: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    best_metric: float | None = None
    best_epoch: int = -1
    bad_epochs: int = 0
    best_val: EvalResult | None = None  # the best epoch's validation result, when this process scored it
    last_val: EvalResult | None = None
    stopped_early: bool = False


def _setup(adapter: TaskAdapter, split: Split, cfg: TrainConfig, tcfg: TaskConfig, work: Path) -> _Run:
    """Seed, data set, sampler, model (initial weights, device, DDP), optimiser, scheduler and scaler."""
    dist_info, device = _init_distributed(cfg.device)
    seed_everything(cfg.seed + dist_info.rank)
    amp = cfg.amp and device.type == "cuda"
    cache = SampleCache(cache_dir_of(cfg, work))
    preprocess, signature = adapter.preprocessor(tcfg), adapter.preprocess_signature(tcfg)
    train_ds = RecordDataset(split.train, preprocess, signature, cache=cache, transform=adapter.train_transform(tcfg),
                             workers=cfg.num_workers)
    sampler = EpochSampler(len(train_ds), seed=cfg.seed, labels=train_ds.labels() if cfg.balanced_sampling else None,
                           rank=dist_info.rank, world_size=dist_info.world_size)
    model: torch.nn.Module = adapter.build_model(tcfg)
    init_note = ""
    if cfg.init_from is not None:
        init_note = load_initial_weights(model, cfg.init_from, adapter, tcfg, mode=cfg.init_mode, skip=cfg.init_skip,
                                         holdout_hash=split.holdout_hash)
    model = model.to(device)
    if cfg.channels_last:
        model = to_channels_last(model)
    if dist_info.world_size > 1:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[dist_info.local_rank] if device.type == "cuda" else None)
    opt = _make_optimizer(model.parameters(), cfg)
    sched = _make_scheduler(opt, cfg, adapter.greater_is_better)
    scaler = torch.amp.GradScaler("cuda", enabled=amp)
    return _Run(adapter=adapter, split=split, cfg=cfg, tcfg=tcfg, work=work, dist=dist_info, device=device, amp=amp,
                cache=cache, train_ds=train_ds, sampler=sampler, model=model, opt=opt, sched=sched, scaler=scaler,
                fingerprint=fingerprint(adapter, tcfg, cfg, split), init_note=init_note)


def _resume(run: _Run, state: _State) -> None:
    """Restore model, optimiser, scheduler, scaler, progress and RNG from the run's checkpoint.

    Raises
    ------
    TrainError
        If the checkpoint cannot be read or belongs to another run.
    """
    ck = read_checkpoint(run.ckpt_path, run.fingerprint)
    _unwrap(run.model).load_state_dict(ck["model"])
    run.opt.load_state_dict(ck["optimizer"])
    if run.sched is not None and ck.get("scheduler") is not None:
        run.sched.load_state_dict(ck["scheduler"])
    run.scaler.load_state_dict(ck["scaler"])
    state.start_epoch, state.history = int(ck["epoch"]) + 1, list(ck["history"])
    state.best_metric, state.best_epoch, state.bad_epochs = ck["best_metric"], ck["best_epoch"], ck["bad_epochs"]
    state.best_state = ck["best_state"]
    log.info("resumed %s training from epoch %d", run.adapter.name, state.start_epoch)


def _train_epoch(run: _Run, epoch: int, collate: Callable | None) -> float:
    """One pass over the training data; returns the mean training loss.

    Raises
    ------
    TrainError
        If the loss stops being finite.
    """
    cfg, adapter, model, opt, scaler = run.cfg, run.adapter, run.model, run.opt, run.scaler
    run.sampler.set_epoch(epoch)
    loader = make_loader(run.train_ds, cfg, collate, sampler=run.sampler, epoch_seed=cfg.seed * 100003 + epoch)
    model.train()
    total, steps = 0.0, 0
    n_steps = len(loader) if cfg.max_steps_per_epoch is None else min(len(loader), cfg.max_steps_per_epoch)
    for batch in _progress(loader, n_steps, f"{adapter.name} epoch {epoch + 1}/{cfg.epochs}"):
        if steps >= n_steps:
            break
        batch = move_to(batch, run.device)
        opt.zero_grad(set_to_none=True)
        with autocast_context(run.device, run.amp):
            loss = adapter.loss(adapter.forward(model, batch, run.device), batch)
        if not torch.isfinite(loss):
            raise TrainError(f"loss became {loss.item()} at epoch {epoch + 1} step {steps + 1}")
        scaler.scale(loss).backward()
        if cfg.grad_clip is not None:
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        scaler.step(opt)
        scaler.update()
        total += float(loss.detach())
        steps += 1
        if not sys.stderr.isatty() and steps % cfg.log_every_steps == 0:
            log.info("%s epoch %d step %d/%d loss %.4f", adapter.name, epoch + 1, steps, n_steps, total / steps)
    return total / max(steps, 1)


def _score_epoch(run: _Run, state: _State, epoch: int, train_loss: float) -> tuple[dict[str, Any], float]:
    """Validate (when there is a validation split), keep the best weights, step the scheduler.

    Returns the epoch's log entry (without its duration) and the selection metric.
    """
    adapter = run.adapter
    entry: dict[str, Any] = {"epoch": epoch + 1, "train_loss": train_loss, "lr": run.opt.param_groups[0]["lr"]}
    if run.split.val:
        res = state.last_val = evaluate_records(adapter, run.model, run.split.val, run.tcfg, run.cfg, run.device,
                                                run.cache)
        metric = float(res.metrics[adapter.primary_metric])
        entry.update({f"val_{k}": v for k, v in res.metrics.items() if isinstance(v, (int, float))})
    else:
        metric = -train_loss if adapter.greater_is_better else train_loss
    if _better(metric, state.best_metric, adapter.greater_is_better):
        state.best_metric, state.best_epoch, state.bad_epochs = metric, epoch + 1, 0
        state.best_state, state.best_val = copy.deepcopy(_unwrap(run.model).state_dict()), state.last_val
    else:
        state.bad_epochs += 1
    if run.sched is not None:
        run.sched.step(metric) if run.cfg.schedule == "plateau" else run.sched.step()
    return entry, metric


def _save_checkpoint(run: _Run, state: _State, epoch: int) -> None:
    """Write the training log and, when due, the checkpoint (main process only)."""
    cfg = run.cfg
    write_train_log(run.work, state.history)
    if (epoch + 1) % cfg.checkpoint_every == 0 or epoch + 1 == cfg.epochs or state.stopped_early:
        write_checkpoint(run.ckpt_path, run.fingerprint, {
            "epoch": epoch, "model": _unwrap(run.model).state_dict(),
            "optimizer": run.opt.state_dict(), "scheduler": run.sched.state_dict() if run.sched is not None else None,
            "scaler": run.scaler.state_dict(), "history": state.history, "best_metric": state.best_metric,
            "best_epoch": state.best_epoch, "bad_epochs": state.bad_epochs, "best_state": state.best_state,
        })


def _run_epochs(run: _Run, state: _State, callbacks: Sequence[Callable[[int, dict[str, Any]], None]]) -> None:
    """The epoch loop: train, score, log, stop early or on the time budget, checkpoint, call back."""
    cfg, adapter = run.cfg, run.adapter
    collate = adapter.collate(run.tcfg)
    t_start = time.perf_counter()
    state.stopped_early = (state.start_epoch > 0 and cfg.early_stopping_patience is not None
                           and state.bad_epochs >= cfg.early_stopping_patience)
    for epoch in range(state.start_epoch, cfg.epochs):
        if state.stopped_early:
            break
        t0 = time.perf_counter()
        train_loss = _train_epoch(run, epoch, collate)
        entry, metric = _score_epoch(run, state, epoch, train_loss)
        entry["seconds"] = round(time.perf_counter() - t0, 3)
        state.history.append(entry)
        log.info("%s epoch %d/%d train_loss %.4f %s %.4f lr %.2e", adapter.name, epoch + 1, cfg.epochs, train_loss,
                 adapter.primary_metric, metric, entry["lr"])
        state.stopped_early = cfg.early_stopping_patience is not None and state.bad_epochs >= cfg.early_stopping_patience
        # stop when another epoch like this one would overrun the budget (evaluation must still fit after it)
        now = time.perf_counter()
        if cfg.time_budget_s is not None and (now - t_start) + (now - t0) >= cfg.time_budget_s:
            entry["stopped_by_time_budget"] = True
            state.stopped_early = True
        if run.dist.main:
            _save_checkpoint(run, state, epoch)
        for cb in callbacks:
            cb(epoch, entry)
        if state.stopped_early:
            why = "time budget" if entry.get("stopped_by_time_budget") else "early stop"
            log.info("%s: %s after epoch %d (best epoch %d)", adapter.name, why, epoch + 1, state.best_epoch)


def _finish(run: _Run, state: _State) -> tuple[TaskConfig, dict[str, Any], str]:
    """Settle the kept weights; return the (tuned) task settings, the hold-out metrics and the notes for the bundle."""
    adapter, split = run.adapter, run.split
    selection_note = ""
    if state.best_epoch == -1 and state.history:  # no epoch scored a finite metric: keep the trained weights
        state.best_state = copy.deepcopy(_unwrap(run.model).state_dict())
        state.best_epoch, state.best_val = len(state.history), state.last_val
        selection_note = f"no epoch had a finite validation {adapter.primary_metric}; the last epoch's weights are kept"
        log.warning("%s: %s", adapter.name, selection_note)
    tcfg = run.tcfg
    final_model = adapter.build_model(tcfg)
    final_model.load_state_dict(state.best_state)
    final_model.to(run.device)
    tune = getattr(adapter, "tune", None)
    tune_note = ""
    if tune is not None and split.val:
        # the kept weights' validation result: from the epoch loop, or scored again after a resume
        val_res = state.best_val or evaluate_records(adapter, final_model, split.val, tcfg, run.cfg, run.device,
                                                     run.cache)
        tcfg, tune_note = tune(val_res, tcfg)
        if tune_note:
            log.info("%s: %s", adapter.name, tune_note)
    metrics: dict[str, Any] = {}
    if split.holdout:
        metrics = evaluate_records(adapter, final_model, split.holdout, tcfg, run.cfg, run.device, run.cache).metrics
    notes = "; ".join(n for n in (f"best epoch {state.best_epoch} of {len(state.history)}", selection_note,
                                  run.init_note, tune_note) if n)
    return tcfg, metrics, notes


def _bundle_meta(run: _Run, state: _State, tcfg: TaskConfig, metrics: dict[str, Any], notes: str) -> BundleMeta:
    """The bundle's metadata for the kept weights."""
    adapter, split, cfg = run.adapter, run.split, run.cfg
    arch, init_args = adapter.architecture(tcfg)
    rows = [r.row for r in split.train + split.val + split.holdout]
    synthetic = cfg.synthetic_only if cfg.synthetic_only is not None else bool(rows) and all(
        bool(r.get("synthetic")) for r in rows)
    return BundleMeta(
        task=adapter.name, version=cfg.version or _dt.datetime.now(_dt.UTC).strftime("%Y%m%dT%H%M%SZ"),
        architecture=arch, init_args=init_args, input=adapter.input_spec(tcfg), labels=adapter.labels(tcfg),
        training_data_hash=data_hash(split.train + split.val, run.cache.file_index), holdout_hash=split.holdout_hash,
        split=split.summary(), metrics=metrics, primary_metric=adapter.primary_metric,
        greater_is_better=adapter.greater_is_better, train_config=cfg.model_dump(mode="json"),
        task_config=tcfg.model_dump(mode="json"), synthetic_only=synthetic, training_log=state.history, notes=notes,
    )


def train(
    adapter: TaskAdapter,
    split: Split,
    out_dir: str | os.PathLike[str],
    cfg: TrainConfig,
    task_cfg: TaskConfig | None = None,
    *,
    work_dir: str | os.PathLike[str] | None = None,
    resume: bool = True,
    callbacks: Sequence[Callable[[int, dict[str, Any]], None]] = (),
) -> TrainResult:
    """Train ``adapter``'s network on ``split`` and write a bundle to ``out_dir``.

    Parameters
    ----------
    work_dir:
        Checkpoint, training log and (default) sample cache; default ``<out_dir>.work``.
    resume:
        Continue from ``work_dir/checkpoint.pt`` when it exists and matches this run.
    callbacks:
        Called as ``cb(epoch, record)`` after each epoch's checkpoint (tests use this to
        simulate an interruption).

    Raises
    ------
    TrainError
        If the training split is empty or a checkpoint belongs to another run.
    """
    tcfg = task_cfg if task_cfg is not None else adapter.config_model()
    out = Path(out_dir)
    work = work_dir_of(out, work_dir)
    work.mkdir(parents=True, exist_ok=True)
    if not split.train:
        raise TrainError("training split is empty")
    run = _setup(adapter, split, cfg, tcfg, work)
    state = _State(best_state=copy.deepcopy(_unwrap(run.model).state_dict()))
    if resume and run.ckpt_path.exists():
        _resume(run, state)
    _run_epochs(run, state, callbacks)
    tcfg, metrics, notes = _finish(run, state)
    meta = _bundle_meta(run, state, tcfg, metrics, notes)
    bundle_dir = out
    if run.dist.main:
        bundle_dir = save_bundle(out, meta, state.best_state, model_card(adapter, tcfg, meta, split),
                                 fp16=cfg.fp16_weights, overwrite=True)
    if run.dist.world_size > 1:
        import torch.distributed as dist

        dist.barrier()
    return TrainResult(bundle_dir=bundle_dir, metrics=metrics, history=state.history, best_epoch=state.best_epoch,
                       epochs_run=len(state.history))
