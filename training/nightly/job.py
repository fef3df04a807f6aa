"""One nightly retraining run of one task: intake -> fine-tune (or scratch) -> hold-out evaluation -> gate -> promote.

Everything a run writes goes to ``<registry>/<task>/runs/<stamp>/`` (candidate
bundle, evaluation reports of both models, ``report.json``/``report.md``, plots).
The registry itself changes only in the very last step, by the registry's
atomic promotion, so a failed or interrupted run leaves the current model as it
was. A per-task lock file keeps two runs of one task (the service and a manual
``--once``) from overlapping.
"""

from __future__ import annotations

import fcntl
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from inference.bundle import BundleMeta, load_bundle, read_meta
from inference.errors import ModelNotFoundError
from inference.registry import ModelRegistry
from training.nightly.config import NightlyConfig, SecondaryMetric, TaskSchedule
from training.nightly.intake import ArchiveIndex, IntakeReport, LabelStore, run_intake

log = logging.getLogger(__name__)

__all__ = ["Gate", "RunOutcome", "decide", "last_runs", "run_task"]

WORK = ".nightly"


@dataclass
class Gate:
    """The promotion decision and why."""

    promote: bool
    reason: str
    checks: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class RunOutcome:
    """What one run did: ``status`` is promoted, kept, skipped, failed or interrupted."""

    task: str
    status: str
    reason: str
    run_dir: Path
    version: str | None = None
    metrics: dict[str, dict[str, Any]] = field(default_factory=dict)  # "candidate"/"current" -> metrics


def _num(v: Any) -> float:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return math.nan
    return f


def decide(candidate: dict[str, Any], current: dict[str, Any] | None, primary: str, greater_is_better: bool,
           margin: float, secondary: dict[str, SecondaryMetric]) -> Gate:
    """Promote only if ``primary`` improves by at least ``margin`` and no secondary metric is worse beyond tolerance."""
    c = _num(candidate.get(primary))
    if math.isnan(c):
        return Gate(False, f"candidate has no value for primary metric {primary}")
    if current is None:
        return Gate(True, "no current model")
    k = _num(current.get(primary))
    gain = (c - k) if greater_is_better else (k - c)
    checks = [{"metric": primary, "candidate": c, "current": k, "required": f"improve by > 0 and >= {margin}",
               "ok": math.isnan(k) or (gain > 0 and gain >= margin)}]
    for name, rule in secondary.items():
        cs, ks = _num(candidate.get(name)), _num(current.get(name))
        worse = (ks - cs) if rule.greater_is_better else (cs - ks)
        ok = not math.isnan(cs) and (math.isnan(ks) or worse <= rule.tolerance + 1e-12)
        checks.append({"metric": name, "candidate": cs, "current": ks, "required": f"worse by <= {rule.tolerance}",
                       "ok": ok})
    if not checks[0]["ok"]:
        return Gate(False, f"{primary} {c:.4g} does not improve on current {k:.4g} by the margin {margin}", checks)
    bad = [ch for ch in checks[1:] if not ch["ok"]]
    if bad:
        ch = bad[0]
        return Gate(False, f"secondary metric {ch['metric']} {ch['candidate']:.4g} is worse than current "
                           f"{ch['current']:.4g} beyond its tolerance {secondary[ch['metric']].tolerance}", checks)
    return Gate(True, f"{primary} {c:.4g} improves on current {k:.4g} by >= {margin}; secondary metrics within "
                      "tolerance", checks)


class _FromBundle:
    """Wraps a task adapter so that ``build_model`` starts from the current bundle's weights (fine-tuning)."""

    def __init__(self, inner: Any, bundle_dir: Path) -> None:
        self._inner = inner
        self._bundle = load_bundle(bundle_dir)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def build_model(self, cfg: Any) -> Any:
        """The task's network with the current model's weights loaded."""
        return self._bundle.load_into(self._inner.build_model(cfg))


@dataclass
class _Dist:
    """torchrun rank info: rank 0 leads the run (intake, evaluation, promotion); the others only train."""

    rank: int = 0
    world: int = 1
    sent: bool = False

    @classmethod
    def start(cls, device: str) -> _Dist:
        """Read RANK/WORLD_SIZE and join the process group when launched by torchrun."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        import torch
        import torch.distributed as tdist

        if not tdist.is_initialized():
            tdist.init_process_group(backend="nccl" if torch.cuda.is_available() and device != "cpu" else "gloo")
        return cls(rank=int(os.environ["RANK"]), world=world)

    def send(self, plan: dict[str, Any] | None) -> None:
        """Rank 0: hand the training plan (or None: nothing to train) to the other ranks, once."""
        if self.world <= 1 or self.sent:
            return
        import torch.distributed as tdist

        self.sent = True
        tdist.broadcast_object_list([plan], src=0)

    def receive(self) -> dict[str, Any] | None:
        """Ranks > 0: wait for rank 0's plan."""
        import torch.distributed as tdist

        box: list[Any] = [None]
        tdist.broadcast_object_list(box, src=0)
        return box[0]


def _follow(dist: _Dist, cfg: NightlyConfig, task: str, adapter: Any, registry: ModelRegistry) -> RunOutcome:
    """A non-zero torchrun rank: train the same split as rank 0 under DDP, then stop."""
    from training.data import SplitConfig, records_from_rows, split_records
    from training.tasks import get_adapter
    from training.trainer import TrainConfig, train

    plan = dist.receive()
    out = RunOutcome(task, "worker", "rank 0 ran no training", registry.task_dir(task) / "runs")
    if plan is None:
        return out
    adapter = adapter or get_adapter(task)
    split = split_records(records_from_rows(plan["rows"], plan["root"]), SplitConfig.model_validate(plan["split"]))
    model_adapter = _FromBundle(adapter, Path(plan["init"])) if plan["init"] else adapter
    train(model_adapter, split, Path(plan["out"]), TrainConfig.model_validate(plan["train"]),
          adapter.config_model.model_validate(plan["task"]), work_dir=Path(plan["work"]), resume=False)
    out.reason = f"trained as rank {dist.rank} of {dist.world}"
    return out


@contextmanager
def _task_lock(path: Path) -> Iterator[bool]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _train_config(adapter: Any, sched: TaskSchedule, cur: BundleMeta | None, device: str, version: str) -> Any:
    from training.trainer import TrainConfig

    base: dict[str, Any] = dict(cur.train_config) if cur is not None else dict(
        getattr(adapter, "train_config_defaults", None) or {})
    base.update({"epochs": sched.epochs, "device": device, "version": version, "cache_dir": None,
                 "fp16_weights": bool(base.get("fp16_weights", False)), "synthetic_only": None})
    if sched.lr is not None:
        base["lr"] = sched.lr
    elif cur is not None and sched.mode == "fine_tune" and "lr" in base:
        base["lr"] = float(base["lr"]) / 10.0
    for k in ("max_steps_per_epoch", "batch_size"):
        if getattr(sched, k) is not None:
            base[k] = getattr(sched, k)
    base.update(sched.train)
    return TrainConfig.model_validate(base)


def run_task(cfg: NightlyConfig, task: str, *, adapter: Any = None,
             callbacks: Sequence[Callable[[int, dict[str, Any]], None]] = (), stamp: str | None = None) -> RunOutcome:
    """Run the nightly job of ``task`` once and write its report; never leaves a half-promoted registry.

    Returns the outcome; an exception inside training or evaluation gives ``status="failed"``
    (a KeyboardInterrupt / SystemExit is recorded as ``interrupted`` and re-raised).
    """
    sched = cfg.tasks.get(task) or TaskSchedule()
    registry = ModelRegistry(cfg.registry_dir)
    stamp = stamp or time.strftime("%Y%m%dT%H%M%S")
    dist = _Dist.start(cfg.device)
    if dist.rank > 0:
        return _follow(dist, cfg, task, adapter, registry)
    try:
        return _lead(cfg, task, sched, registry, stamp, adapter, callbacks, dist)
    finally:
        dist.send(None)  # no-op if the plan was already sent; releases waiting ranks after an early exit


def _lead(cfg: NightlyConfig, task: str, sched: TaskSchedule, registry: ModelRegistry, stamp: str, adapter: Any,
          callbacks: Sequence[Callable[[int, dict[str, Any]], None]], dist: _Dist) -> RunOutcome:
    run_dir = registry.task_dir(task) / "runs" / stamp
    n = 1
    while run_dir.exists():
        run_dir = run_dir.with_name(f"{stamp}-{n}")
        n += 1
    run_dir.mkdir(parents=True)
    work = cfg.registry_dir / WORK
    outcome = RunOutcome(task, "failed", "", run_dir)
    report: dict[str, Any] = {"task": task, "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                              "schedule": sched.model_dump(mode="json")}
    with _task_lock(work / f"{task}.lock") as got:
        if not got:
            outcome.status, outcome.reason = "skipped", "another run of this task is in progress"
            _write_report(run_dir, report, outcome)
            return outcome
        try:
            _run(cfg, task, sched, registry, run_dir, work, adapter, callbacks, outcome, report, dist)
        except (KeyboardInterrupt, SystemExit):
            outcome.status, outcome.reason = "interrupted", "run interrupted; the registry is unchanged"
            _write_report(run_dir, report, outcome)
            raise
        except Exception as exc:  # noqa: BLE001 - any failure must leave the registry untouched and be reported
            log.exception("nightly run of %s failed", task)
            outcome.status = "failed"
            outcome.reason = f"{type(exc).__name__}: {exc}; the registry is unchanged"
        finally:
            shutil.rmtree(run_dir / "work", ignore_errors=True)
    _write_report(run_dir, report, outcome)
    log.info("nightly %s: %s (%s)", task, outcome.status, outcome.reason)
    return outcome


def _intake_rows(cfg: NightlyConfig, task: str, work: Path, report: dict[str, Any]
                 ) -> tuple[IntakeReport, list[dict[str, Any]]]:
    """Take in new label files; return the intake and the task's labelled rows whose study is archived."""
    intake: IntakeReport = run_intake(cfg.incoming_labels_dir, cfg.archive_dir, cfg.key_dir, work / "labels")
    report["intake"] = intake.as_dict()
    index = ArchiveIndex.read(cfg.archive_dir)
    rows = LabelStore(work / "labels").rows(task)
    usable = [r for r in rows if r.get("study_uid") in index.studies]
    report["data"] = {"labelled_rows": len(rows), "rows_in_archive": len(usable),
                      "rows_evicted_or_missing": len(rows) - len(usable),
                      "new_labels_this_run": intake.new_keys.get(task, 0)}
    return intake, usable


def _current_model(registry: ModelRegistry, task: str) -> tuple[Path | None, BundleMeta | None]:
    """The task's current bundle folder and metadata (both None when no model is promoted yet)."""
    try:
        cur_dir: Path | None = registry.current_dir(task)
    except ModelNotFoundError:
        cur_dir = None
    return cur_dir, read_meta(cur_dir) if cur_dir is not None else None


def _evaluate_on_holdout(cfg: NightlyConfig, adapter: Any, holdout: list[Any], candidate_dir: Path,
                         cur_dir: Path | None, run_dir: Path) -> dict[str, dict[str, Any]]:
    """Metrics of the candidate (and of the current model, if any) on the same hold-out records."""
    from training.evaluate import evaluate_bundle

    cand = evaluate_bundle(candidate_dir, records=holdout, subset="all", device=cfg.device,
                           adapter=adapter, out_dir=run_dir / "eval_candidate")
    metrics: dict[str, dict[str, Any]] = {"candidate": cand.metrics}
    if cur_dir is not None:
        cur = evaluate_bundle(cur_dir, records=holdout, subset="all", device=cfg.device, adapter=adapter,
                              out_dir=run_dir / "eval_current")
        metrics["current"] = cur.metrics
    return metrics


def _promote(registry: ModelRegistry, task: str, bundle_dir: Path, version: str, run_dir: Path,
             cur_meta: BundleMeta | None) -> None:
    """Make the candidate current and append the promotion to the task's ``promotions.jsonl``."""
    registry.promote(task, bundle_dir)
    with open(registry.task_dir(task) / "promotions.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps({"version": version, "promoted_at": time.time(), "run": run_dir.name,
                            "previous": cur_meta.version if cur_meta else None}) + "\n")


def _run(cfg: NightlyConfig, task: str, sched: TaskSchedule, registry: ModelRegistry, run_dir: Path, work: Path,
         adapter: Any, callbacks: Sequence[Callable[[int, dict[str, Any]], None]], outcome: RunOutcome,
         report: dict[str, Any], dist: _Dist) -> None:
    """One nightly run of ``task``: intake, train a candidate, compare on the hold-out, promote or keep."""
    from training.data import SplitConfig, records_from_rows, split_records
    from training.evaluate import split_config_of
    from training.tasks import get_adapter
    from training.trainer import train

    adapter = adapter or get_adapter(task)
    intake, usable = _intake_rows(cfg, task, work, report)
    if intake.new_keys.get(task, 0) < sched.min_new_labels:
        outcome.status = "skipped"
        outcome.reason = f"{intake.new_keys.get(task, 0)} new labels, fewer than min_new_labels={sched.min_new_labels}"
        return
    if not usable:
        outcome.status, outcome.reason = "skipped", "no labelled archived studies for this task"
        return
    records = records_from_rows(usable, cfg.archive_dir / "studies")
    cur_dir, cur_meta = _current_model(registry, task)
    split_cfg = split_config_of(cur_meta) if cur_meta is not None else SplitConfig()
    split = split_records(records, split_cfg)
    report["data"]["split"] = split.summary()
    if not split.holdout:
        outcome.status, outcome.reason = "skipped", "no hold-out records yet: cannot compare models fairly"
        return
    fine_tune = sched.mode == "fine_tune" and cur_dir is not None
    version = f"nightly-{run_dir.name}"
    tcfg = adapter.config_model.model_validate(cur_meta.task_config if fine_tune and cur_meta else sched.task)
    train_cfg = _train_config(adapter, sched, cur_meta if fine_tune else None, cfg.device, version)
    report["mode"] = "fine_tune" if fine_tune else "scratch"
    model_adapter = _FromBundle(adapter, cur_dir) if fine_tune and cur_dir is not None else adapter
    dist.send({"rows": usable, "root": str(cfg.archive_dir / "studies"), "split": split_cfg.model_dump(),
               "train": train_cfg.model_dump(mode="json"), "task": tcfg.model_dump(mode="json"),
               "init": str(cur_dir) if fine_tune else None, "out": str(run_dir / "candidate"),
               "work": str(run_dir / "work")})
    result = train(model_adapter, split, run_dir / "candidate", train_cfg, tcfg, work_dir=run_dir / "work",
                   resume=False, callbacks=callbacks)
    report["history"] = result.history
    metrics = _evaluate_on_holdout(cfg, adapter, split.holdout, result.bundle_dir, cur_dir, run_dir)
    current_metrics = metrics.get("current")
    outcome.metrics, outcome.version = metrics, version
    meta = read_meta(result.bundle_dir)
    gate = decide(metrics["candidate"], current_metrics, meta.primary_metric or adapter.primary_metric,
                  meta.greater_is_better, sched.margin, sched.secondary)
    report["gate"] = asdict(gate)
    report["current_version"] = cur_meta.version if cur_meta else None
    _plot(run_dir, metrics, result.history, [c["metric"] for c in gate.checks] or [meta.primary_metric or ""])
    if gate.promote:
        _promote(registry, task, result.bundle_dir, version, run_dir, cur_meta)
        outcome.status = "promoted"
    else:
        outcome.status = "kept"
    outcome.reason = gate.reason


def _plot(run_dir: Path, metrics: dict[str, dict[str, Any]], history: list[dict[str, Any]], names: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    names = [n for n in names if n]
    for i, who in enumerate(("current", "candidate")):
        vals = [_num(metrics.get(who, {}).get(n)) for n in names]
        a.bar([x + i * 0.4 for x in range(len(names))], vals, width=0.4, label=who)
    a.set_xticks([x + 0.2 for x in range(len(names))], names, rotation=20)
    a.set_title("hold-out metrics")
    a.legend()
    if history:
        b.plot([h["epoch"] for h in history], [h["train_loss"] for h in history], "o-", label="train loss")
        b.set_xlabel("epoch")
        b.legend()
    b.set_title("training")
    fig.tight_layout()
    fig.savefig(run_dir / "comparison.png", dpi=80)
    plt.close(fig)


def _fmt(v: Any) -> str:
    f = _num(v)
    return "-" if math.isnan(f) else f"{f:.4g}"


def _write_report(run_dir: Path, report: dict[str, Any], outcome: RunOutcome) -> None:
    report.update({"finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "status": outcome.status,
                   "reason": outcome.reason, "version": outcome.version})
    (run_dir / "report.json").write_text(json.dumps(report, indent=1, default=str), encoding="utf-8")
    m = outcome.metrics
    names = sorted({k for d in m.values() for k, v in d.items() if isinstance(v, (int, float))})
    lines = [f"# Nightly run: {outcome.task} {run_dir.name}", "", f"**Decision: {outcome.status}** - {outcome.reason}",
             "", f"Mode: {report.get('mode', '-')}; candidate version: {outcome.version or '-'}; "
                 f"current version: {report.get('current_version') or '-'}", "", "## Data", ""]
    for k, v in (report.get("data") or {}).items():
        lines.append(f"- {k}: {json.dumps(v, default=str)}")
    intake = report.get("intake") or {}
    lines += ["", "## Label intake", "", f"- files processed: {len(intake.get('files_processed', []))}",
              f"- files kept in place (unreadable): {json.dumps(intake.get('files_kept', []))}",
              f"- rows accepted per task: {json.dumps(intake.get('accepted', {}))}",
              f"- AI feedback: {json.dumps(intake.get('feedback', {}))}",
              f"- rejected rows: {len(intake.get('errors', []))}"]
    lines += [f"  - {e['file']} row {e['row']}: {e['error']}" for e in intake.get("errors", [])[:200]]
    if names:
        lines += ["", "## Hold-out metrics", "", "| metric | current | candidate |", "|---|---|---|"]
        lines += [f"| {n} | {_fmt(m.get('current', {}).get(n))} | {_fmt(m.get('candidate', {}).get(n))} |"
                  for n in names]
    gate = report.get("gate")
    if gate:
        lines += ["", "## Gate", "", "| metric | current | candidate | rule | ok |", "|---|---|---|---|---|"]
        lines += [f"| {c['metric']} | {_fmt(c['current'])} | {_fmt(c['candidate'])} | {c['required']} | {c['ok']} |"
                  for c in gate["checks"]]
    plots = sorted(p.relative_to(run_dir) for p in run_dir.rglob("*.png"))
    if plots:
        lines += ["", "## Plots", ""] + [f"![{p.stem}]({p})" for p in plots]
    (run_dir / "report.md").write_text("\n".join(lines) + "\n", encoding="utf-8")


def last_runs(registry_dir: str | Path, task: str) -> list[dict[str, Any]]:
    """``report.json`` of every run of ``task``, oldest first."""
    out = []
    for p in sorted((Path(registry_dir) / task / "runs").glob("*/report.json")):
        try:
            out.append(json.loads(p.read_text(encoding="utf-8")))
        except (OSError, ValueError):
            continue
    return out

