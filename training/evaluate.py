"""Evaluate a bundle on labelled data: ``metrics.json``, PNG plots and ``report.md``.

The evaluation uses the bundle's own split config, so on the data it was
trained from it scores exactly the locked hold-out set (the hold-out hash is
checked and reported). Plots use matplotlib's Agg backend.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from inference.bundle import Bundle, BundleMeta, load_bundle
from inference.runtime import select_device
from training.adapter import EvalResult, TaskAdapter
from training.data import Record, SampleCache, Split, SplitConfig, load_records, split_records
from training.file_index import FILE_INDEX_NAME, FileIndex
from training.metrics import roc_curve
from training.trainer import TrainConfig, TrainError, evaluate_records

log = logging.getLogger(__name__)

__all__ = ["Evaluation", "as_trained", "evaluate_bundle", "split_config_of", "write_report"]


@dataclass
class Evaluation:
    """Result of :func:`evaluate_bundle`."""

    bundle: Bundle
    result: EvalResult
    n_records: int
    holdout_hash: str | None
    holdout_matches: bool | None
    files: list[Path]
    baseline: dict[str, Any] | None = None
    n_total: int | None = None
    baselines: dict[str, dict[str, Any]] | None = None
    comparison: dict[str, Any] | None = None

    @property
    def metrics(self) -> dict[str, Any]:
        """The task metrics."""
        return self.result.metrics

    @property
    def primary(self) -> float:
        """Value of the bundle's primary metric (NaN if missing)."""
        name = self.bundle.meta.primary_metric
        return float(self.result.metrics.get(name, math.nan)) if name else math.nan


def _json_safe(v: Any) -> Any:
    if isinstance(v, dict):
        return {str(k): _json_safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_json_safe(x) for x in v]
    if isinstance(v, np.ndarray):
        return _json_safe(v.tolist())
    if isinstance(v, (np.floating, float)):
        f = float(v)
        return None if math.isnan(f) else ("inf" if math.isinf(f) else f)
    if isinstance(v, np.integer):
        return int(v)
    return v


def split_config_of(meta: BundleMeta) -> SplitConfig:
    """How a bundle's training split its records: the recorded split config, else the one in its training
    config, else the default. Evaluation, re-tuning, promotion and the nightly job all split this way, so
    they agree on which patients are the locked hold-out."""
    if meta.split.get("config"):
        return SplitConfig.model_validate(meta.split["config"])
    if isinstance(meta.train_config.get("split"), dict):
        return SplitConfig.model_validate(meta.train_config["split"])
    return SplitConfig()


def as_trained(meta: BundleMeta, records: list[Record], *, device: str = "auto", num_workers: int = 0
               ) -> tuple[TrainConfig, Split]:
    """A bundle's training config for use on this machine (``device``, ``num_workers``, no cache dir) and
    ``records`` split the way the bundle's training split them (its recorded split config)."""
    train_cfg = TrainConfig.model_validate({**meta.train_config, "device": device, "num_workers": num_workers,
                                            "cache_dir": None})
    return train_cfg, split_records(records, split_config_of(meta))


def _load_eval_records(records: list[Record] | None, data_dir: str | os.PathLike[str] | None,
                       cache_dir: str | os.PathLike[str] | None) -> list[Record]:
    """``records`` as given, or the manifest of ``data_dir`` (read through the file index in ``cache_dir``)."""
    if records is not None:
        return records
    if data_dir is None:
        raise TrainError("evaluate needs a data folder or records")
    return load_records(data_dir, FileIndex(Path(cache_dir) / FILE_INDEX_NAME) if cache_dir else None)


def _score_network(bundle: Bundle, adapter: TaskAdapter, tcfg: Any, records: list[Record],
                   subset: Literal["holdout", "all"], device: str, num_workers: int,
                   cache_dir: str | os.PathLike[str] | None) -> tuple[Evaluation, list[Record]]:
    """Run the bundle's network on the chosen subset; return its Evaluation and the records scored."""
    meta = bundle.meta
    train_cfg, split = as_trained(meta, records, device=device, num_workers=num_workers)
    chosen = split.holdout if subset == "holdout" else list(records)
    matches = None if subset == "all" or meta.holdout_hash is None else split.holdout_hash == meta.holdout_hash
    if matches is False:
        log.warning("hold-out set differs from the one recorded in the bundle (different data folder?)")
    if not chosen:
        raise TrainError(f"no records in the {subset} subset")
    dev = select_device(device)
    model = bundle.load_into(adapter.build_model(tcfg)).to(dev)
    with tempfile.TemporaryDirectory(prefix="eval-cache-") as tmp:
        cache = SampleCache(cache_dir or tmp)
        result = evaluate_records(adapter, model, chosen, tcfg, train_cfg, dev, cache)
    ev = Evaluation(bundle=bundle, result=result, n_records=len(chosen),
                    holdout_hash=split.holdout_hash if subset == "holdout" else None, holdout_matches=matches, files=[],
                    n_total=len(records))
    return ev, chosen


def _score_histogram_baseline(ev: Evaluation, records: list[Record], chosen: list[Record],
                              subset: Literal["holdout", "all"],
                              baseline_fit_dir: str | os.PathLike[str] | None) -> None:
    """The non-deep histogram baseline on the same data, into ``ev.baseline`` (its error there if it fails)."""
    from training import baseline as histogram_baseline

    task = ev.bundle.meta.task
    if task not in histogram_baseline.TASKS:
        log.info("no histogram baseline for %s", task)
        return
    holdout = {r.patient_id for r in chosen} if subset == "holdout" else None
    try:
        fit_dir = Path(baseline_fit_dir) if baseline_fit_dir is not None and holdout is None else None
        ev.baseline = histogram_baseline.run_baseline(task, records, holdout_patients=holdout, fit_root=fit_dir)
    except histogram_baseline.BaselineError as exc:  # the model's evaluation stands without it
        log.warning("histogram baseline not scored: %s", exc)
        ev.baseline = {"error": str(exc)}


def evaluate_bundle(
    bundle_dir: str | os.PathLike[str], data_dir: str | os.PathLike[str] | None = None,
    out_dir: str | os.PathLike[str] | None = None, *, records: list[Record] | None = None,
    subset: Literal["holdout", "all"] = "holdout", device: str = "auto", adapter: TaskAdapter | None = None,
    num_workers: int = 0, cache_dir: str | os.PathLike[str] | None = None, baseline: bool = False,
    baseline_fit_dir: str | os.PathLike[str] | None = None, task_overrides: dict[str, Any] | None = None,
    clinic_baselines: bool = False,
) -> Evaluation:
    """Evaluate a bundle on the hold-out split (or all records) of a labelled data folder.

    Parameters
    ----------
    records:
        Records to use instead of reading ``data_dir``'s manifest.
    subset:
        ``"holdout"``: the split the bundle's split config assigns to hold-out; ``"all"``: every record (e.g.
        an external test set).
    adapter:
        Task adapter; by default the registered one for the bundle's task.
    out_dir:
        Where ``metrics.json``, plots and ``report.md`` go (nothing written if None).
    baseline:
        Also score the non-deep histogram baseline (:mod:`training.baseline`) on the same data: fitted on the
        patients outside the hold-out and scored on it, or cross-validated by patient with ``subset="all"``.
        Tasks without a baseline are skipped.
    baseline_fit_dir:
        With ``subset="all"``: fit the baseline on this folder (the network's training data) instead of
        cross-validating on the evaluated one.
    clinic_baselines:
        Score the task's simple clinical baselines (:mod:`training.clinic_baselines`) on the same records and
        compare the strongest with the network (``baselines`` and ``baseline_comparison`` in metrics.json, a
        table in report.md). Off for library callers (the nightly comparison and promotion do not need them);
        ``dicomnode-train evaluate`` turns it on unless ``--no-clinic-baselines``. Fitted baselines follow
        the protocol of ``baseline`` above.
    task_overrides:
        Task-config values to evaluate with instead of the bundle's (labelling fields such as
        ``image_labels``, so that two bundles compared on the same records use the same truth).

    Raises
    ------
    TrainError
        If the selected subset is empty.
    """
    from training.tasks import get_adapter

    bundle = load_bundle(bundle_dir)
    adapter = adapter or get_adapter(bundle.meta.task)
    tcfg = adapter.config_model.model_validate({**bundle.meta.task_config, **(task_overrides or {})})
    records = _load_eval_records(records, data_dir, cache_dir)
    _refuse_box_labels_without_boxes(tcfg, records)
    ev, chosen = _score_network(bundle, adapter, tcfg, records, subset, device, num_workers, cache_dir)
    if baseline:
        _score_histogram_baseline(ev, records, chosen, subset, baseline_fit_dir)
    if clinic_baselines:
        _score_clinic_baselines(ev, records, chosen, subset, baseline_fit_dir)
    if out_dir is not None:
        ev.files = write_report(ev, Path(out_dir), adapter.reference_figures(),
                                plotter=getattr(adapter, "report_plots", None))
    return ev


def _score_clinic_baselines(ev: Evaluation, records: list[Record], chosen: list[Record],
                            subset: Literal["holdout", "all"], fit_dir: str | os.PathLike[str] | None) -> None:
    """The task's simple baselines on the evaluated records, and the network's margin over the strongest."""
    from training.clinic_baselines import compare, run_clinic_baselines

    task = ev.bundle.meta.task
    holdout = {r.patient_id for r in chosen} if subset == "holdout" else None
    if holdout is not None and len({r.patient_id for r in records}) == len(holdout):
        holdout = None  # every patient is in the hold-out: nothing to fit on but the scored records
    pre = {"histogram": ev.baseline} if ev.baseline and "error" not in ev.baseline else None
    ev.baselines = run_clinic_baselines(task, records if holdout else chosen, holdout_patients=holdout,
                                        fit_dir=fit_dir if holdout is None else None, precomputed=pre)
    ev.comparison = compare(task, ev.result.metrics, ev.baselines)
    if ev.comparison and ev.comparison["below_margin"]:
        log.warning("%s: the network's margin over its strongest simple baseline (%s) is %+.3f in %s (< %.2f)", task,
                    ev.comparison["baseline"], ev.comparison["margin"], ev.comparison["metric"],
                    ev.comparison["required_margin"])


def _refuse_box_labels_without_boxes(tcfg: Any, records: list[Record]) -> None:
    """A bundle whose truth comes from boxes scores a folder whose positive studies have no boxes at prevalence 0.

    Refused when no positive study has a box (study labels only); a few positives without boxes (label noise of
    the synthetic studies, where the box is the truth) only get a warning.
    """
    if getattr(tcfg, "image_labels", None) != "boxes":
        return
    positives = [r for r in records if str(r.row.get("label")) in ("1", "True", "true")]
    unboxed = sum(1 for r in positives if not r.row.get("boxes"))
    if positives and unboxed == len(positives):
        raise TrainError(f"this bundle takes its truth from fracture boxes, but none of the {unboxed} positive studies "
                         "has any, so all would count as negative: use `dicomnode-train validate` (study labels) or "
                         "add boxes")
    if unboxed:
        log.warning("%d of %d positive studies have no fracture box: this bundle scores them as negative",
                    unboxed, len(positives))


def _plot_roc(ax: Any, y: np.ndarray, p: np.ndarray, names: list[str]) -> bool:
    from training.metrics import roc_auc

    drawn = False
    if p.ndim == 1:
        curves = [(names[-1] if names else "positive", y, p)]
    else:
        curves = [(n, (y == i).astype(int), p[:, i]) for i, n in enumerate(names)]
    for name, yt, score in curves:
        if len(np.unique(yt)) < 2:
            continue
        fpr, tpr, _ = roc_curve(yt, score)
        ax.plot(fpr, tpr, label=f"{name} (AUC {roc_auc(yt, score):.3f})")
        drawn = True
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    ax.set_xlabel("1 - specificity")
    ax.set_ylabel("sensitivity")
    if drawn:
        ax.legend(loc="lower right", fontsize=8)
    return drawn


def _plot_calibration(ax: Any, y: np.ndarray, p: np.ndarray, bins: int = 10) -> None:
    if p.ndim == 1:
        conf, hit = p, (y == 1).astype(float)
        ax.set_xlabel("predicted probability")
        ax.set_ylabel("observed frequency")
    else:
        conf, hit = p.max(1), (p.argmax(1) == y).astype(float)
        ax.set_xlabel("confidence (max probability)")
        ax.set_ylabel("accuracy")
    edges = np.linspace(0, 1, bins + 1)
    idx = np.clip(np.digitize(conf, edges) - 1, 0, bins - 1)
    xs, ys, ns = [], [], []
    for b in range(bins):
        sel = idx == b
        if sel.any():
            xs.append(conf[sel].mean())
            ys.append(hit[sel].mean())
            ns.append(int(sel.sum()))
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    ax.plot(xs, ys, "o-")
    for x, yv, n in zip(xs, ys, ns, strict=True):
        ax.annotate(str(n), (x, yv), fontsize=7, xytext=(2, 2), textcoords="offset points")


def _plot_confusion(fig: Any, ax: Any, cm: np.ndarray, names: list[str]) -> None:
    im = ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            ax.text(j, i, str(int(cm[i, j])), ha="center", va="center",
                    color="white" if cm[i, j] > cm.max() / 2 else "black")
    fig.colorbar(im, ax=ax)


def _plot_learning(ax: Any, log_rows: list[dict[str, Any]], primary: str | None) -> None:
    ep = [r["epoch"] for r in log_rows]
    ax.plot(ep, [r.get("train_loss", np.nan) for r in log_rows], label="train loss")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    key = f"val_{primary}" if primary else None
    if key and any(key in r for r in log_rows):
        ax2 = ax.twinx()
        ax2.plot(ep, [r.get(key, np.nan) for r in log_rows], "C1", label=key)
        ax2.set_ylabel(key)
        ax2.legend(loc="upper right", fontsize=8)
    ax.legend(loc="upper left", fontsize=8)


def _save_plots(ev: Evaluation, out: Path) -> list[Path]:
    """ROC, calibration, confusion matrix and learning curves (those the result has) as PNGs in ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    meta, res = ev.bundle.meta, ev.result
    files: list[Path] = []
    names = res.class_names or [str(i) for i in range(2)]

    def save(fig: Any, name: str) -> None:
        fig.tight_layout()
        fig.savefig(out / name, dpi=100)
        plt.close(fig)
        files.append(out / name)

    if res.y_true is not None and res.y_prob is not None:
        y, p = np.asarray(res.y_true).astype(int), np.asarray(res.y_prob, dtype=float)
        if p.ndim == 2 and p.shape[1] == 1:
            p = p[:, 0]
        fig, ax = plt.subplots(figsize=(5, 5))
        ax.set_title(f"ROC - {meta.task} {meta.version}")
        if _plot_roc(ax, y, p, names):
            save(fig, "roc.png")
        else:
            plt.close(fig)
        fig, ax = plt.subplots(figsize=(5, 5))
        ax.set_title("calibration")
        _plot_calibration(ax, y, p)
        save(fig, "calibration.png")
    cm = res.metrics.get("confusion_matrix")
    if cm is not None:
        cm_arr = np.asarray(cm)
        fig, ax = plt.subplots(figsize=(5, 4.5))
        ax.set_title("confusion matrix")
        _plot_confusion(fig, ax, cm_arr, names if len(names) == cm_arr.shape[0] else [str(i) for i in range(len(cm_arr))])
        save(fig, "confusion_matrix.png")
    if meta.training_log:
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.set_title("learning curves")
        _plot_learning(ax, meta.training_log, meta.primary_metric)
        save(fig, "learning_curves.png")
    return files


def write_report(ev: Evaluation, out: Path, reference: dict[str, Any],
                 plotter: Callable[[EvalResult, Path], list[Path]] | None = None) -> list[Path]:
    """Write ``metrics.json``, plots and ``report.md`` into ``out``; return the files written.

    ``plotter`` (an adapter's optional ``report_plots``) draws task-specific PNGs into ``out``.
    """
    out.mkdir(parents=True, exist_ok=True)
    meta = ev.bundle.meta
    res = ev.result
    payload = {"task": meta.task, "version": meta.version, "n_records": ev.n_records,
               "holdout_hash": ev.holdout_hash, "holdout_matches_bundle": ev.holdout_matches,
               "primary_metric": meta.primary_metric, "architecture": meta.architecture,
               "task_config": meta.task_config, "metrics": res.metrics, "tables": res.tables,
               "reference": reference, "baseline": ev.baseline, "baselines": ev.baselines,
               "baseline_comparison": ev.comparison}
    (out / "metrics.json").write_text(json.dumps(_json_safe(payload), indent=2) + "\n", encoding="utf-8")
    files = [out / "metrics.json", *_save_plots(ev, out)]
    if plotter is not None:
        files.extend(plotter(res, out))
    (out / "report.md").write_text(_report_md(ev, reference, [f.name for f in files if f.suffix == ".png"]),
                                   encoding="utf-8")
    files.append(out / "report.md")
    return files


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "n/a" if math.isnan(v) else f"{v:.4g}"
    if isinstance(v, (list, tuple)) and len(v) == 2 and all(isinstance(x, float) for x in v):
        return f"[{_fmt(v[0])}, {_fmt(v[1])}]"
    return str(v)


def _clinic_md(ev: Evaluation) -> list[str]:
    """The "network vs strongest simple baseline" section of report.md (empty without baselines)."""
    from training.clinic_baselines import REPORTED

    if not ev.baselines:
        return []
    m, c = ev.result.metrics, ev.comparison
    lines = ["", "## Network vs strongest simple baseline", ""]
    if c:
        verdict = (f"**below the required margin of {c['required_margin']:.2f}**" if c["below_margin"]
                   else f"at least the required {c['required_margin']:.2f}")
        lines += [f"{c['metric']}: network {_fmt(c['network'])}, strongest baseline `{c['baseline']}` "
                  f"{_fmt(c['baseline_value'])}, margin **{c['margin']:+.3f}** ({verdict}).", ""]
    else:
        lines += ["No comparison: the network's or every baseline's figure is missing.", ""]
    pairs = REPORTED.get(ev.bundle.meta.task, ())
    lines += ["| model | protocol | n | " + " | ".join(k for k, _ in pairs) + " |", "|---" * (len(pairs) + 3) + "|",
              f"| network (this bundle) | - | {ev.n_records} records | "
              + " | ".join(_fmt(m.get(k, "-")) for k, _ in pairs) + " |"]
    for name, b in ev.baselines.items():
        if "error" in b:
            lines.append(f"| {name} | not scored: {b['error']} | - | " + " | ".join("-" for _ in pairs) + " |")
        else:
            lines.append(f"| {name} | {b.get('protocol', '')} | {b.get('n', '?')} {b.get('unit', 'units')} | "
                         + " | ".join(_fmt(b.get(bk, "-")) for _, bk in pairs) + " |")
    return lines


def _report_md(ev: Evaluation, reference: dict[str, Any], plots: list[str]) -> str:
    meta = ev.bundle.meta
    m = ev.result.metrics
    scalar = {k: v for k, v in m.items() if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "n"}
    for k, v in m.items():
        if k.endswith("_ci95"):
            scalar[k] = v
    keys = list(scalar) + [k for k in reference if k not in scalar and not k.startswith("_")]
    lines = [
        f"# Evaluation: {meta.task} {meta.version}", "",
        f"- Records evaluated: {ev.n_records}",
        f"- Hold-out hash: `{ev.holdout_hash}` "
        + ("(matches the bundle)" if ev.holdout_matches else "(differs from the bundle's)" if ev.holdout_matches is False
           else ""),
        f"- Architecture: `{meta.architecture}`; trained on synthetic data only: {meta.synthetic_only}", "",
        "| metric | ours | source document |", "|---|---|---|",
    ]
    for k in keys:
        lines.append(f"| {k} | {_fmt(scalar.get(k, '-'))} | {_fmt(reference.get(k, '-'))} |")
    for name, table in ev.result.tables.items():
        lines += ["", f"## {name}", ""]
        if isinstance(table, dict) and table and all(isinstance(v, dict) for v in table.values()):
            cols = sorted({c for v in table.values() for c in v})
            lines += ["| | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
            lines += [f"| {r} | " + " | ".join(_fmt(v.get(c, "-")) for c in cols) + " |" for r, v in table.items()]
        else:
            lines.append(f"```\n{json.dumps(_json_safe(table), indent=2)}\n```")
    if ev.baseline and "error" in ev.baseline:
        lines += ["", "## Non-deep baseline", "", f"Not scored: {ev.baseline['error']}"]
    elif ev.baseline:
        b = ev.baseline
        figures = [k for k in ("auc", "kappa_quadratic", "macro_f1", "accuracy") if k in b]
        lines += ["", "## Non-deep baseline", "",
                  f"Logistic regression on {b['bins']}-bin intensity histograms ({b['protocol']}; {b['n']} units). "
                  "The network should stay well above it.", "",
                  "| metric | baseline | this model (same name, if reported) |", "|---|---|---|"]
        lines += [f"| {k} | {_fmt(b[k])} | {_fmt(m.get(k, '-'))} |" for k in figures]
    lines += _clinic_md(ev)
    if plots:
        lines += ["", "## Plots", ""] + [f"![{p}]({p})" for p in plots]
    notes = reference.get("_notes") if isinstance(reference, dict) else None
    if notes:
        lines += ["", "## Notes on the source figures", "", str(notes)]
    return "\n".join(lines) + "\n"

