"""Box-patch pretraining: a task's own network first learns what the lesion looks like, then where it is.

``dicomnode-train pretrain-patches TASK --data DIR --out DIR`` trains the task's network (the same architecture
and the same pre-processing as ``train``) on small patches of the model inputs: positives centred (with jitter)
on the manifest's lesion boxes, negatives from studies labelled negative, centred at positions drawn from the
positive centres, so a patch's position says nothing about its label. The result is a bundle of the task with
``purpose="pretraining"``: ``train --set init_from=DIR`` starts from it, the registry refuses to serve it.

Why: the source documents start their classifiers from ImageNet weights, which are never downloaded here. From
random weights, the whole-image wrist ResNet18 stayed at chance (validation AUC 0.46-0.52, training loss 0.70)
for 8 epochs / ~320 steps on 1,412 synthetic studies, as in every earlier CPU run: a fracture line of a few pixels
in a whole wrist is a needle for a network that does not yet know what a needle is. After 15 minutes of this
stage on the same training split, one whole-image epoch reached validation study AUC 0.93 (models/README.md).

Only the training split is read for training and the validation split for the logged patch AUC; the bundle
records the hold-out hash, and a warm start from it is refused by a run whose hold-out differs
(:func:`training.warm_start.load_initial_weights`). Tasks opt in with an adapter method
``patch_preprocessor(cfg)`` returning a picklable ``record -> list[PatchSource]``.

A task whose model has several networks (physis: detector trunk, crop classifier, whole-image classifier) names a
*view* per source and gives ``patch_views(model, cfg) -> {view: PatchView}``: each view's network learns patches
of its own input, all in the same steps (summed losses); the kept step is the best mean validation patch AUC.
"""

from __future__ import annotations

import argparse
import copy
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from inference.bundle import BundleMeta, save_bundle
from inference.errors import DicomNodeError
from inference.runtime import select_device, to_channels_last
from training.data import Record, Split, SplitConfig, data_hash, load_records, process_pool, split_records
from training.errors import TrainError
from training.metrics import roc_auc
from training.train_cli import apply_set_items

log = logging.getLogger(__name__)

__all__ = ["PatchPretrainConfig", "PatchSampler", "PatchSource", "add_arguments", "pretrain_patches", "run"]


@dataclass(frozen=True)
class PatchSource:
    """One model input (H, W; normalised, float16) of a study: label 1 with lesion centres (x, y), or label 0.

    ``view`` names the network that reads it (:class:`PatchView`); single-network tasks leave the default.
    """

    image: np.ndarray
    label: int
    centres: tuple[tuple[float, float], ...]
    group: str
    view: str = "default"


@dataclass(frozen=True)
class PatchView:
    """A network that learns one view's patches: (N, 1, P, P) -> logits (N, >= 1), the first column scored.

    ``patch`` is the view's patch side (None: the stage's ``patch`` times ``scale``, for a view whose input has
    another pixel size than the first view's).
    """

    network: torch.nn.Module
    patch: int | None = None
    scale: float = 1.0

    def side(self, stage_patch: int) -> int:
        """The patch side in this view's pixels."""
        return int(self.patch) if self.patch is not None else max(16, round(stage_patch * self.scale))


class PatchPretrainConfig(BaseModel):
    """Settings of the patch stage (the task's own config fixes the network and the pre-processing)."""

    model_config = ConfigDict(extra="forbid")

    patch: int = Field(64, ge=16, description="patch side in model-input pixels")
    jitter: float = Field(0.25, ge=0, le=0.5, description="largest offset of the lesion centre from the patch "
                          "centre, as a fraction of the side")
    batch_size: int = Field(64, ge=2)
    lr: float = Field(1e-3, gt=0)
    steps: int = Field(2000, ge=1)
    time_budget_s: float | None = Field(None, gt=0, description="stop earlier than `steps` after this many seconds")
    eval_every: int = Field(100, ge=1, description="steps between validation patch AUCs (the best one is kept)")
    val_patches: int = Field(512, ge=2)
    hflip_p: float = Field(0.5, ge=0, le=1)
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    workers: int = Field(2, ge=0, description="pre-processing processes")
    split: SplitConfig = Field(default_factory=SplitConfig, description="must equal the later `train` run's split")
    version: str | None = Field(None, pattern=r"^[A-Za-z0-9_.+-]+$")
    fp16_weights: bool = False
    synthetic_only: bool = False


class PatchSampler:
    """Balanced batches of patches: half around lesion centres, half from negative images at lesion positions."""

    def __init__(self, sources: list[PatchSource], cfg: PatchPretrainConfig, rng: np.random.Generator,
                 patch: int | None = None) -> None:
        self.pos = [(s.image, c) for s in sources if s.label == 1 for c in s.centres]
        self.neg = [s.image for s in sources if s.label == 0]
        if not self.pos or not self.neg:
            raise TrainError(f"patch pretraining needs lesion boxes and negative studies; got {len(self.pos)} "
                             f"boxed lesions and {len(self.neg)} negative images")
        self.centres = np.array([c for _, c in self.pos], dtype=float)
        self.cfg, self.rng = cfg, rng
        self.patch = int(patch or cfg.patch)

    def crop(self, image: np.ndarray, centre: tuple[float, float] | np.ndarray) -> np.ndarray:
        """A ``patch`` x ``patch`` window around ``centre`` plus jitter; outside the image reads as its minimum."""
        p = self.patch
        h, w = image.shape
        dx, dy = self.rng.uniform(-self.cfg.jitter * p, self.cfg.jitter * p, 2)
        x0 = int(round(float(centre[0]) + dx - p / 2))
        y0 = int(round(float(centre[1]) + dy - p / 2))
        out = np.full((p, p), float(image.min()), dtype=np.float32)
        ys, xs = slice(max(y0, 0), min(y0 + p, h)), slice(max(x0, 0), min(x0 + p, w))
        if ys.start < ys.stop and xs.start < xs.stop:
            out[ys.start - y0:ys.stop - y0, xs.start - x0:xs.stop - x0] = image[ys, xs]
        if self.rng.random() < self.cfg.hflip_p:
            out = out[:, ::-1]
        return out

    def batch(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``n`` patches (N, 1, P, P) float32 and their labels, alternating positive and negative."""
        xs, ys = [], []
        for k in range(n):
            if k % 2 == 0:
                image, centre = self.pos[int(self.rng.integers(len(self.pos)))]
                ys.append(1.0)
            else:
                image = self.neg[int(self.rng.integers(len(self.neg)))]
                centre = self.centres[int(self.rng.integers(len(self.centres)))]
                ys.append(0.0)
            xs.append(np.ascontiguousarray(self.crop(image, centre)))
        return torch.from_numpy(np.stack(xs))[:, None], torch.tensor(ys)


def _sources(records: list[Record], fn: Any, workers: int) -> list[PatchSource]:
    if workers <= 1 or len(records) < 2:
        return [s for r in records for s in fn(r)]
    with process_pool(workers) as pool:
        return [s for chunk in pool.map(fn, records, chunksize=4) for s in chunk]


def _val_auc(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, device: torch.device) -> float:
    model.eval()
    with torch.inference_mode():
        logits = torch.cat([model(x[i:i + 128].to(device))[:, 0].float().cpu() for i in range(0, len(x), 128)])
    model.train()
    return roc_auc(y.numpy().astype(int), logits.numpy())


def _views(adapter: Any, model: torch.nn.Module, tcfg: Any, device: torch.device) -> dict[str, PatchView]:
    views = adapter.patch_views(model, tcfg) if hasattr(adapter, "patch_views") else {"default": PatchView(model)}
    for view in views.values():
        view.network.to(device)  # a view's own head (not part of the model) is created on the CPU
    return views


def _samplers(views: dict[str, PatchView], sources: list[PatchSource], cfg: PatchPretrainConfig, seed: int,
              what: str) -> dict[str, PatchSampler]:
    unknown = sorted({s.view for s in sources} - set(views))
    if unknown:
        raise TrainError(f"patch sources name views {unknown} that the network has not ({sorted(views)})")
    out = {}
    for k, (name, view) in enumerate(sorted(views.items())):
        try:
            out[name] = PatchSampler([s for s in sources if s.view == name], cfg, np.random.default_rng(seed + k),
                                     patch=view.side(cfg.patch))
        except TrainError as exc:
            raise TrainError(f"{what} split, view {name!r}: {exc}") from exc
    return out


@dataclass
class _PretrainRun:
    """What the training loop leaves: its log, the best validation step and its weights."""

    history: list[dict[str, Any]]
    best_auc: float
    best_step: int
    best_state: dict[str, torch.Tensor]
    steps: int


def _val_batches(name: str, views: dict[str, PatchView], val_src: list[PatchSource], cfg: PatchPretrainConfig
                 ) -> dict[str, tuple[torch.Tensor, torch.Tensor]] | None:
    """One fixed validation batch per view, or None (with a warning) when the validation split has none."""
    try:
        return {view: s.batch(cfg.val_patches)
                for view, s in _samplers(views, val_src, cfg, cfg.seed + 100, "validation").items()}
    except TrainError as exc:
        log.warning("%s: %s; keeping the last step's weights", name, exc)
        return None


def _train_step(views: dict[str, PatchView], samplers: dict[str, PatchSampler], opt: torch.optim.Optimizer,
                cfg: PatchPretrainConfig, device: torch.device) -> float:
    """One optimiser step on a fresh batch per view (the loss summed over views); returns the loss."""
    amp = device.type == "cuda"
    loss = torch.zeros((), device=device)
    for name, sampler in samplers.items():
        x, y = sampler.batch(cfg.batch_size)
        x = x.to(device).contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            logits = views[name].network(x)[:, 0].float()
        loss = loss + F.binary_cross_entropy_with_logits(logits, y.to(device))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return float(loss.detach())


def _eval_row(step: int, losses: list[float], views: dict[str, PatchView], samplers: dict[str, PatchSampler],
              val: dict[str, tuple[torch.Tensor, torch.Tensor]] | None, cfg: PatchPretrainConfig,
              device: torch.device, seconds: float) -> dict[str, Any]:
    """The training-log row at ``step``: mean recent loss and validation patch AUC (per view when several)."""
    row: dict[str, Any] = {"step": step, "train_loss": float(np.mean(losses[-cfg.eval_every:]))}
    if val is not None:
        aucs = {name: _val_auc(views[name].network, *val[name], device) for name in samplers}
        if len(aucs) > 1:
            row.update({f"val_patch_auc_{name}": a for name, a in aucs.items()})
        auc = float(np.mean(list(aucs.values())))
    else:
        auc = float("nan")
    row.update(val_patch_auc=auc, seconds=round(seconds, 1))
    return row


def _train_patches(name: str, model: torch.nn.Module, views: dict[str, PatchView],
                   samplers: dict[str, PatchSampler],
                   val: dict[str, tuple[torch.Tensor, torch.Tensor]] | None, cfg: PatchPretrainConfig,
                   device: torch.device) -> _PretrainRun:
    """Train until ``cfg.steps`` or the time budget, keeping the weights of the best validation AUC."""
    params = list({id(p): p for v in views.values() for p in v.network.parameters() if p.requires_grad}.values())
    opt = torch.optim.Adam(params, lr=cfg.lr)
    run = _PretrainRun([], -1.0, 0, copy.deepcopy(model.state_dict()), 0)
    losses: list[float] = []
    start = time.monotonic()
    for view in views.values():
        view.network.train()
    for step in range(1, cfg.steps + 1):
        run.steps = step
        losses.append(_train_step(views, samplers, opt, cfg, device))
        over = cfg.time_budget_s is not None and time.monotonic() - start > cfg.time_budget_s
        if step % cfg.eval_every == 0 or step == cfg.steps or over:
            row = _eval_row(step, losses, views, samplers, val, cfg, device, time.monotonic() - start)
            run.history.append(row)
            auc = row["val_patch_auc"]
            log.info("%s: patch step %d loss %.4f val patch AUC %.4f", name, step, row["train_loss"], auc)
            if val is not None and auc > run.best_auc:
                run.best_auc, run.best_step, run.best_state = auc, step, copy.deepcopy(model.state_dict())
        if over:
            break
    if val is None:
        run.best_auc, run.best_step, run.best_state = float("nan"), run.steps, copy.deepcopy(model.state_dict())
    return run


def _save_pretrain_bundle(adapter: Any, tcfg: Any, cfg: PatchPretrainConfig, split: Split,
                          samplers: dict[str, PatchSampler], run: _PretrainRun, out_dir: str | Path) -> Path:
    """Write the best weights as a ``purpose="pretraining"`` bundle with its model card."""
    best_row = next((r for r in run.history if r["step"] == run.best_step), {})
    metrics = ({k: v for k, v in best_row.items() if k.startswith("val_patch_auc")}
               or {"val_patch_auc": run.best_auc})
    patches = ", ".join(f"{name} {s.patch}x{s.patch}" for name, s in samplers.items())
    n_pos, n_neg = sum(len(s.pos) for s in samplers.values()), sum(len(s.neg) for s in samplers.values())
    arch, init_args = adapter.architecture(tcfg)
    best_auc, best_step, step = run.best_auc, run.best_step, run.steps
    meta = BundleMeta(
        task=adapter.name, version=cfg.version or time.strftime("pretrain-%Y%m%d-%H%M%S", time.gmtime()),
        architecture=arch, init_args=init_args, input=adapter.input_spec(tcfg), labels=adapter.labels(tcfg),
        training_data_hash=data_hash(split.train), holdout_hash=split.holdout_hash, split=split.summary(),
        metrics=metrics, primary_metric=None,
        train_config={"stage": "patch_pretrain", **cfg.model_dump(mode="json")},
        task_config=tcfg.model_dump(mode="json"), training_log=run.history, synthetic_only=cfg.synthetic_only,
        purpose="pretraining",
        notes=(f"box-patch pretraining, best validation patch AUC {best_auc:.3f} at step {best_step} of {step} "
               f"({n_pos} lesion centres, {n_neg} negative images; patches {patches}); not a study classifier"),
    )
    card = (f"# {adapter.name} {meta.version}: pretraining weights, not a model\n\n"
            f"The task's network ({arch} {init_args}) trained for {step} steps on patches of its own model inputs "
            f"({patches}): lesion boxes against negative studies at the same positions. Start a "
            "`dicomnode-train train` run from it with `--set init_from=<this directory>`; the registry refuses to "
            f"serve it. Best validation patch AUC {best_auc:.3f}."
            + (" Trained on synthetic data only." if cfg.synthetic_only else "") + "\n")
    return save_bundle(out_dir, meta, {k: v.detach().cpu() for k, v in run.best_state.items()}, card,
                       fp16=cfg.fp16_weights, overwrite=True)


def pretrain_patches(adapter: Any, records: list[Record], out_dir: str | Path, cfg: PatchPretrainConfig,
                     task_cfg: Any | None = None) -> Path:
    """Train ``adapter``'s network(s) on lesion patches of the training split and write a pretraining bundle.

    Raises
    ------
    TrainError
        If the task has no patch sources, a split is empty, or the data hold no boxed lesion or no negative.
    """
    tcfg = task_cfg if task_cfg is not None else adapter.config_model()
    if not hasattr(adapter, "patch_preprocessor"):
        raise TrainError(f"task {adapter.name} does not support box-patch pretraining")
    split = split_records(records, cfg.split)
    if not split.train or not split.val:
        raise TrainError("patch pretraining needs a training and a validation split")
    fn = adapter.patch_preprocessor(tcfg)
    t0 = time.monotonic()
    train_src, val_src = _sources(split.train, fn, cfg.workers), _sources(split.val, fn, cfg.workers)
    log.info("%s: patch sources from %d train / %d val studies in %.0f s", adapter.name, len(split.train),
             len(split.val), time.monotonic() - t0)
    torch.manual_seed(cfg.seed)
    device = select_device(cfg.device)
    model = to_channels_last(adapter.build_model(tcfg).to(device))
    views = _views(adapter, model, tcfg, device)
    samplers = _samplers(views, train_src, cfg, cfg.seed, "training")
    val = _val_batches(adapter.name, views, val_src, cfg)
    run = _train_patches(adapter.name, model, views, samplers, val, cfg, device)
    return _save_pretrain_bundle(adapter, tcfg, cfg, split, samplers, run, out_dir)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of ``dicomnode-train pretrain-patches``."""
    p.add_argument("task")
    p.add_argument("--data", required=True, help="labelled data folder with lesion boxes in the manifest")
    p.add_argument("--out", required=True, help="pretraining bundle directory to write")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a patch-stage key (steps, patch, time_budget_s, ...) or a task key (input_hw, ...)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"])
    p.add_argument("--version")
    p.add_argument("--workers", type=int)
    p.add_argument("--fp16", action="store_true", help="store the weights in float16")
    p.add_argument("--synthetic", action="store_true", help="the data are synthetic")


def build_configs(adapter: Any, args: argparse.Namespace) -> tuple[PatchPretrainConfig, Any]:
    """(patch-stage config, task config) from ``--set`` (as ``train``'s; ``train.KEY`` names a patch-stage key)
    and the options.

    Raises
    ------
    DicomNodeError
        If a key is unknown or a value invalid.
    """
    stage: dict[str, Any] = {}
    task: dict[str, Any] = {}
    apply_set_items(args.set, stage, task, PatchPretrainConfig.model_fields, adapter.config_model.model_fields)
    for opt, field in (("device", "device"), ("version", "version"), ("workers", "workers")):
        if getattr(args, opt, None) is not None:
            stage[field] = getattr(args, opt)
    stage["fp16_weights"] = bool(args.fp16) or bool(stage.get("fp16_weights", False))
    stage["synthetic_only"] = bool(args.synthetic) or bool(stage.get("synthetic_only", False))
    try:
        return PatchPretrainConfig.model_validate(stage), adapter.config_model.model_validate(task)
    except ValidationError as exc:
        raise DicomNodeError(f"invalid patch pretraining config:\n{exc}") from exc


def run(args: argparse.Namespace) -> int:
    """Pretrain and print the bundle's path."""
    from training.tasks import get_adapter

    try:
        adapter = get_adapter(args.task)
    except KeyError as exc:
        print(f"error: {exc.args[0]}")
        return 2
    try:
        cfg, tcfg = build_configs(adapter, args)
        out = pretrain_patches(adapter, load_records(Path(args.data)), args.out, cfg, tcfg)
    except DicomNodeError as exc:
        print(f"error: {exc}")
        return 2
    print(out)
    return 0
