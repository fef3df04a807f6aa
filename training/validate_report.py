"""The report of a site validation: ``report.md``, ``report.html``, ``validation.json`` and PNG plots.

Both documents are rendered from one list of sections (text, tables, images), so they say the same thing.
"""

from __future__ import annotations

import html
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from training.evaluate import _json_safe
from training.validate_stats import calibration, ordinal_collapses, rescan_sweep, threshold_sweep

if TYPE_CHECKING:
    from training.validate import Validation

__all__ = ["write_validation_report"]

Table = tuple[list[str], list[list[Any]]]


@dataclass
class Section:
    """A titled part of the report."""

    title: str
    text: list[str] = field(default_factory=list)
    tables: list[tuple[str, Table]] = field(default_factory=list)
    images: list[str] = field(default_factory=list)


def _f(v: Any) -> str:
    if isinstance(v, bool) or v is None:
        return str(v)
    if isinstance(v, float | np.floating):
        return "n/a" if math.isnan(float(v)) else f"{float(v):.3f}"
    return str(v)


def _ci(d: dict[str, Any]) -> list[str]:
    lo, hi = d.get("ci95", [math.nan, math.nan])
    counts = f" ({d['k']}/{d['n']})" if "k" in d else ""
    return [_f(d["value"]) + counts, f"{_f(lo)} - {_f(hi)}"]


def _metric_rows(fig: dict[str, Any]) -> list[list[Any]]:
    return [[k, *_ci(v)] for k, v in fig.items() if isinstance(v, dict) and "value" in v]


def _sections(v: Validation, plots: list[str]) -> list[Section]:
    meta, s, fig = v.bundle.meta, v.scores, v.figures
    head = Section(f"Validation: {meta.task} {meta.version}", text=[
        f"Bundle: `{v.bundle_dir}` (trained on synthetic data only: {meta.synthetic_only}).",
        f"Data: `{v.data_dir}`: {v.n_rows} manifest rows, {len(v.scored)} studies scored, "
        f"{len({f.key for f in v.failures})} studies or rows with something not scored (listed at the end).",
    ] + ([f"Unit: {s.unit} ({len(s.y_true)} units, {len(np.unique(s.patient))} patients); operating point: "
          + (f"probability >= {s.threshold}" if s.threshold is not None else "the bundle's class rule")
          + (f"; rescan when {_rescan_rule(s)}" if s.rescan_true is not None else "") + "."]
         if s is not None else []) + [f"Note: {n}" for n in v.notes])
    out = [head]
    if s is None:
        out.append(Section("Task figures", tables=[("", (["metric", "value"], [
            [k, _f(x)] for k, x in v.adapter_metrics.items() if isinstance(x, int | float)]))]))
        if v.per_record:
            out += _segmentation(v)
        return out + [_baselines(v), _failures(v)]
    metrics = Section("Metrics with 95% confidence intervals", text=[
        "Rates: Wilson intervals; AUC, macro-F1 and kappa: bootstrap over patients."],
        tables=[("", (["metric", "value", "95% CI"], _metric_rows(fig)))])
    if "brier" in fig:
        metrics.text.append(f"Brier score: {_f(fig['brier'])}; prevalence {_f(fig['prevalence'])} "
                            f"({fig['positives']}/{fig['n']}).")
    out.append(metrics)
    names = s.class_names or ["0", "1"]
    cm = fig["confusion_matrix"]
    conf = Section("Confusion matrix at the bundle's operating point", text=["Rows: truth; columns: prediction."],
                   tables=[("", (["truth \\ prediction", *names], [[names[i], *row] for i, row in enumerate(cm)]))],
                   images=[p for p in plots if p == "confusion_matrix.png"])
    if "rescan_confusion_matrix" in fig:
        (tn, fp), (fn, tp) = fig["rescan_confusion_matrix"]
        conf.tables.append((f"rescan ({_rescan_rule(s)})", (["truth \\ decision", "no rescan", "rescan"], [
            [f"{names[0]}-{names[s.rescan_min_class - 1]}", tn, fp], [f"{names[s.rescan_min_class]} or worse", fn, tp]])))
    out.append(conf)
    cal = Section("Calibration", images=[p for p in plots if p == "calibration.png"])
    for name, score, truth in _binary_views(v):
        rows = [[_f(r["predicted"]), _f(r["observed"])] for r in calibration(truth, score)]
        if rows:
            cal.tables.append((name, (["mean predicted", "observed frequency"], rows)))
        else:
            cal.text.append(f"{name}: not available, the scored units hold one class only.")
    out.append(cal)
    sweep = Section("Threshold sweep", text=["Sensitivity and specificity at each threshold, so the site can choose "
                                             "its own operating point (score >= threshold is positive)."])
    if s.rescan_true is not None:
        sweep.text.append(f"Rescan decision: {_rescan_rule(s, 'threshold')}; the bundle's operating point is "
                          f"{_f(s.rescan_threshold)}. A scan graded {names[s.rescan_min_class]} or worse is a rescan at "
                          "every threshold.")
        sweep.tables.append((f"rescan: P({names[s.rescan_min_class]} or worse) >= threshold",
                             _sweep_table(rescan_sweep(s))))
    else:
        for name, score, truth in _binary_views(v):
            sweep.tables.append((name, _sweep_table(threshold_sweep(truth, score))))
    out.append(sweep)
    out += [_subgroups(v, f"Per {s.unit}, grouped by the DICOM header of the study."), _baselines(v), _failures(v)]
    others = [p for p in plots if p not in ("confusion_matrix.png", "calibration.png")]
    if others:
        out.append(Section("Plots", images=others))
    return out


def _rescan_rule(s: Any, threshold: str | None = None) -> str:
    t = threshold or _f(s.rescan_threshold)
    grade = s.class_names[s.rescan_min_class]
    return f"{grade} or worse predicted, or P({grade} or worse) >= {t}"


def _sweep_table(sweep: list[dict[str, Any]]) -> Table:
    rows = [[_f(r["threshold"]), _f(r["sensitivity"]), _f(r["specificity"]), _f(r["ppv"]), _f(r["npv"]),
             r["tp"], r["fp"], r["tn"], r["fn"]] for r in sweep]
    return ["threshold", "sensitivity", "specificity", "PPV", "NPV", "TP", "FP", "TN", "FN"], rows


def _subgroups(v: Validation, text: str) -> Section:
    sub = Section("Subgroups", text=[text])
    for g, table in v.subgroups.items():
        cols = list(next(iter(table.values())).keys()) if table else []
        sub.tables.append((g, (["value", *cols], [[k, *(_f(r[c]) for c in cols)] for k, r in table.items()])))
    return sub


def _segmentation(v: Validation) -> list[Section]:
    """Knee segmentation: Dice per bone of each volume and the subgroup tables of mean Dice (no sweep)."""
    from training.validate_seg import DICE_KEYS

    per = Section("Dice per volume", text=["The task's own evaluation run on each volume alone (post-processing as "
                                           "the node does, Dice per bone on the source grid)."],
                  tables=[("", (["study", *DICE_KEYS], [[r["study"], *(_f(r.get(k, math.nan)) for k in DICE_KEYS)]
                                                        for r in v.per_record]))])
    sub = _subgroups(v, "Mean Dice per bone over the volumes of each subgroup (n volumes), grouped by the DICOM "
                        "header of the study.")
    sweep = Section("Threshold sweep", text=["Not applicable: a segmentation has no decision threshold to choose; "
                                             "the subgroup tables give the Dice per bone instead."])
    return [per, sub, sweep]


def _binary_views(v: Validation) -> list[tuple[str, np.ndarray, np.ndarray]]:
    s = v.scores
    assert s is not None
    if s.binary:
        return [(f"P({s.class_names[-1] if s.class_names else 'positive'})", s.prob, s.y_true)]
    return [(f"P({name})", score, truth) for name, score, truth in ordinal_collapses(s)]


def _baselines(v: Validation) -> Section:
    sec = Section("Simple baselines beside the network", text=[
        "The histogram baseline (training/baseline.py: logistic regression on intensity histograms), the "
        "clinic's simple rules (training/clinic_baselines.py: spine 160/110 HU ROI rule, HR-pQCT soft-tissue "
        "ordinal fit, knee coordinate atlas and threshold + components) and the majority-class floor. The network "
        "should stay well above all of them (by 0.10 in its primary metric)."])
    keys = ["auc", "accuracy"] if v.scores is not None and v.scores.binary else ["macro_f1", "kappa_quadratic",
                                                                                 "accuracy"]
    net = {k: (v.figures[k]["value"] if isinstance(v.figures.get(k), dict) else math.nan) for k in keys}
    if v.bundle.meta.task == "knee_bone_seg":  # segmentation: Dice per bone, the task's own figures
        keys = ["dice_femur", "dice_tibia", "dice_fibula", "dice_mean"]
        net = {k: v.adapter_metrics.get(k, math.nan) for k in keys}
    net_unit = v.scores.unit if v.scores else (f"volume; n={len(v.per_record)}" if v.per_record else "?")
    rows: list[list[Any]] = [["network (this bundle)", f"per {net_unit}",
                              *(_f(net[k]) for k in keys)]]
    for name, b in v.baselines.items():
        if "error" in b:
            rows.append([name, f"not scored: {b['error']}", *(["-"] * len(keys))])
        else:
            unit = "per patient" if v.bundle.meta.task == "spine_bmd" and name in ("histogram", "roi_hu_rule") else ""
            rows.append([name, f"{b.get('protocol', '')} {unit}".strip() + f"; n={b.get('n', '?')}",
                         *(_f(b.get(k, math.nan)) for k in keys)])
    sec.tables.append(("", (["model", "protocol", *keys], rows)))
    return sec


def _failures(v: Validation) -> Section:
    sec = Section("Not scored (failed or refused)")
    if not v.failures:
        sec.text.append("Every manifest row was scored.")
        return sec
    sec.tables.append(("", (["study / row", "stage", "reason"], [[f.key, f.stage, f.reason] for f in v.failures])))
    return sec


def _md(sections: list[Section]) -> str:
    lines: list[str] = []
    for i, sec in enumerate(sections):
        lines += [("# " if i == 0 else "## ") + sec.title, ""]
        for t in sec.text:
            lines += [t, ""]
        for name, (cols, rows) in sec.tables:
            if name:
                lines += [f"**{name}**", ""]
            lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
            lines += ["| " + " | ".join(str(c).replace("|", "/") for c in r) + " |" for r in rows] + [""]
        lines += [f"![{p}]({p})" for p in sec.images] + ([""] if sec.images else [])
    return "\n".join(lines)


_CSS = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}"
        "table{border-collapse:collapse;margin:.5em 0 1.2em}td,th{border:1px solid #bbb;padding:3px 8px;"
        "font-size:13px;text-align:left}th{background:#eef}img{max-width:560px;margin:4px}"
        "code{background:#f3f3f3}h2{border-bottom:1px solid #ccc;margin-top:1.6em}")


def _html(sections: list[Section]) -> str:
    e = html.escape
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{e(sections[0].title)}</title>"
             f"<style>{_CSS}</style></head><body>"]
    for i, sec in enumerate(sections):
        parts.append(f"<h{1 if i == 0 else 2}>{e(sec.title)}</h{1 if i == 0 else 2}>")
        for t in sec.text:
            parts.append("<p>" + e(t).replace("`", "") + "</p>")
        for name, (cols, rows) in sec.tables:
            if name:
                parts.append(f"<h3>{e(name)}</h3>")
            parts.append("<table><tr>" + "".join(f"<th>{e(str(c))}</th>" for c in cols) + "</tr>")
            parts += ["<tr>" + "".join(f"<td>{e(str(c))}</td>" for c in r) + "</tr>" for r in rows]
            parts.append("</table>")
        parts += [f"<img src='{e(p)}' alt='{e(p)}'>" for p in sec.images]
    return "".join(parts) + "</body></html>\n"


def _plots(v: Validation, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from training.evaluate import _plot_confusion, _plot_roc

    s = v.scores
    if s is None:
        return []
    written = []
    fig, ax = plt.subplots(figsize=(4.5, 4))
    names = s.class_names or ["0", "1"]
    _plot_confusion(fig, ax, np.asarray(v.figures["confusion_matrix"]), names)
    ax.set_title("confusion matrix (operating point)")
    fig.tight_layout()
    fig.savefig(out / "confusion_matrix.png", dpi=90)
    plt.close(fig)
    written.append("confusion_matrix.png")
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 4))
    drawn = False
    for name, score, truth in _binary_views(v):
        rows = calibration(truth, score)
        if rows:
            ax2.plot([r["predicted"] for r in rows], [r["observed"] for r in rows], "o-", label=name)
            drawn = True
        if len(np.unique(truth)) == 2:
            _plot_roc(ax1, truth, score, [name])
    ax2.plot([0, 1], [0, 1], "k--", lw=0.8)
    ax2.set_xlabel("mean predicted probability")
    ax2.set_ylabel("observed frequency")
    if drawn:
        ax2.legend(fontsize=8)
    ax1.set_title("ROC")
    ax2.set_title("calibration")
    fig.tight_layout()
    fig.savefig(out / "calibration.png", dpi=90)
    plt.close(fig)
    written.append("calibration.png")
    return written


def write_validation_report(v: Validation, out: Path) -> list[Path]:
    """Write the report files into ``out``; return them."""
    out.mkdir(parents=True, exist_ok=True)
    plots = _plots(v, out)
    sections = _sections(v, plots)
    (out / "report.md").write_text(_md(sections), encoding="utf-8")
    (out / "report.html").write_text(_html(sections), encoding="utf-8")
    payload = {"task": v.bundle.meta.task, "version": v.bundle.meta.version, "bundle": str(v.bundle_dir),
               "data": str(v.data_dir), "manifest_rows": v.n_rows, "studies_scored": len(v.scored),
               "unit": v.scores.unit if v.scores else None, "figures": v.figures, "subgroups": v.subgroups,
               "baselines": v.baselines, "task_metrics": v.adapter_metrics, "notes": v.notes, "per_record": v.per_record,
               "not_scored": [{"key": f.key, "stage": f.stage, "reason": f.reason} for f in v.failures]}
    (out / "validation.json").write_text(json.dumps(_json_safe(payload), indent=2) + "\n", encoding="utf-8")
    return [out / "report.md", out / "report.html", out / "validation.json", *(out / p for p in plots)]
