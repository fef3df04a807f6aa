"""``dicomnode-train validate BUNDLE --data DIR``: validate a bundle on a site's own labelled studies.

Unlike ``evaluate`` (which, by default, scores the bundle's locked hold-out split
of its own training data), ``validate`` treats ``DIR`` as an external test set:

* every manifest row is scored, or listed in the report with the reason it
  was not (no matching DICOM, unreadable image, no usable label, level not
  found); nothing is left out silently;
* it refuses with a one-line reason and the fix when the labels lack what the
  metric needs (no usable label at all, a single class, spine rows without
  per-level classes);
* a wrist bundle trained on box-derived image labels is scored on the study
  label when the site's positive studies carry no boxes (otherwise they would
  all count as negative);
* ``BUNDLE`` is a bundle folder, ``models/<task>/current`` (the registry's
  pointer file), ``models/<task>``, or a task name with ``--models-dir``.

``hrpqct_motion`` is scored with the bundle's own scan grades and rescan decision
(subgroup QWK and rescan sensitivity/specificity, a sweep of the rescan threshold);
``knee_bone_seg`` by the task's evaluation run on one volume at a time
(:mod:`training.validate_seg`: Dice per bone per volume and per subgroup).

The report (``report.md``, ``report.html``, ``validation.json`` and plots) is
written by :mod:`training.validate_report` from the figures of
:mod:`training.validate_stats`.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom

from inference.ages import patient_age
from inference.bundle import BUNDLE_JSON, Bundle, load_bundle
from inference.errors import DicomNodeError
from inference.registry import POINTER, ModelRegistry
from inference.runtime import select_device
from training.adapter import TaskConfig
from training.data import Record, SampleCache, records_from_rows
from training.errors import TrainError
from training.validate_stats import Scores, age_band, binary_figures, multiclass_figures, subgroup_table

log = logging.getLogger(__name__)

__all__ = ["Failure", "Validation", "ValidateError", "add_arguments", "resolve_bundle", "run", "validate"]

BINARY_TASKS = ("wrist_fracture", "physis_fracture")
SUBGROUPS = ("age band", "sex", "manufacturer", "body part", "view")


class ValidateError(TrainError):
    """The data cannot be validated as asked (one line: the reason and the fix)."""


@dataclass
class Failure:
    """A manifest row or study that was not scored (or a unit of it that was not), and why."""

    key: str
    reason: str
    stage: str  # "manifest", "labels", "image", "inference"


@dataclass
class Validation:
    """Everything the report shows."""

    bundle: Bundle
    bundle_dir: Path
    data_dir: Path
    n_rows: int
    scored: list[Record]
    scores: Scores | None
    figures: dict[str, Any]
    adapter_metrics: dict[str, Any]
    subgroups: dict[str, dict[str, dict[str, Any]]]
    baselines: dict[str, dict[str, Any]]
    failures: list[Failure]
    notes: list[str] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)
    per_record: list[dict[str, Any]] = field(default_factory=list)  # knee_bone_seg: Dice per bone of each volume


def resolve_bundle(spec: str | os.PathLike[str], models_dir: str | os.PathLike[str] | None = None) -> Path:
    """The bundle folder meant by ``spec``: a bundle folder, a registry ``current`` pointer file, a task folder
    of a registry, or a task name looked up in ``models_dir``.

    Raises
    ------
    ValidateError
        With what was looked for and how to name a bundle instead.
    """
    p = Path(spec)
    if p.is_dir() and (p / BUNDLE_JSON).is_file():
        return p
    if p.is_file() and p.name == POINTER:
        return _current_of(ModelRegistry(p.parent.parent), p.parent.name)
    if p.is_dir() and (p / POINTER).is_file():
        return _current_of(ModelRegistry(p.parent), p.name)
    if models_dir is not None and not p.exists() and str(spec).isidentifier():
        return _current_of(ModelRegistry(models_dir), str(spec))
    raise ValidateError(f"{spec} is not a bundle: name a bundle folder (with bundle.json), models/<task>/current, "
                        "or a task name with --models-dir")


def _current_of(registry: ModelRegistry, task: str) -> Path:
    try:
        return registry.current_dir(task)
    except DicomNodeError as exc:
        raise ValidateError(f"{exc}; promote a bundle first or name its folder") from exc


def _binary_label(v: Any) -> int | None:
    if isinstance(v, bool):
        return int(v)
    if isinstance(v, int | float) and v in (0, 1):
        return int(v)
    if isinstance(v, str) and v.strip() in ("0", "1"):
        return int(v.strip())
    return None


def check_labels(task: str, tcfg: TaskConfig, records: list[Record]
                 ) -> tuple[TaskConfig, list[Record], list[Failure], list[str]]:
    """Records whose labels carry what the task's metric needs, the refused ones, and the config to score with.

    Raises
    ------
    ValidateError
        If no record (or only one class) is left to compute the metric on.
    """
    notes: list[str] = []
    refused: list[Failure] = []
    ok: list[Record] = []
    if task == "spine_bmd":
        from inference.tasks.spine_bmd_levels import CLASS_NAMES, REPORTED_LEVELS

        for r in records:
            levels = {k: v for k, v in dict(r.row.get("vertebrae") or {}).items()
                      if k in REPORTED_LEVELS and str(v).lower() in CLASS_NAMES}
            if levels:
                ok.append(r)
            else:
                refused.append(Failure(r.key, "no per-level class of L1-L4 ('vertebrae') in the manifest row",
                                       "labels"))
        if not ok:
            raise ValidateError(f"none of the {len(records)} spine studies has per-level classes ('vertebrae'): the "
                                "vertebra metrics need them; import the DXA T-scores with `dicomnode-train "
                                "import-labels --dxa TABLE`")
        return tcfg, ok, refused, notes
    if task not in BINARY_TASKS:
        return tcfg, list(records), refused, notes
    labels: list[int] = []
    for r in records:
        if "label" not in r.row or r.row["label"] is None:
            refused.append(Failure(r.key, "no 'label' in the manifest row", "labels"))
            continue
        y = _binary_label(r.row["label"])
        if y is None:
            refused.append(Failure(r.key, f"label {r.row['label']!r} is not 0/1", "labels"))
            continue
        ok.append(r)
        labels.append(y)
    if not ok:
        raise ValidateError(f"none of the {len(records)} records has a 0/1 'label': map the export's findings to 0/1 "
                            "with `dicomnode-train import-labels --positive ... --negative ...`")
    if len(set(labels)) < 2:
        which = "positive (1)" if labels[0] else "negative (0)"
        raise ValidateError(f"all {len(ok)} usable records are labelled {which}: sensitivity, specificity and AUC "
                            "need both classes; add studies of the other class or check the label column")
    if getattr(tcfg, "image_labels", None) == "boxes":
        unboxed = sum(1 for r, y in zip(ok, labels, strict=True) if y == 1 and not r.row.get("boxes"))
        if unboxed:
            tcfg = tcfg.model_copy(update={"image_labels": "study"})
            notes.append(f"the bundle was trained on box-derived image labels, but {unboxed} of the "
                         f"{sum(labels)} positive studies have no boxes: scored on the study label instead "
                         "(image-level figures then count every image of a positive study as positive)")
    return tcfg, ok, refused, notes


def header_groups(record: Record) -> dict[str, str]:
    """Subgroup values of a record from its first readable DICOM header."""
    for f in record.files:
        try:
            ds = pydicom.dcmread(f, stop_before_pixels=True, force=True)
        except Exception:  # noqa: BLE001 - any unreadable header just gives "unknown"
            continue
        return {"age band": age_band(_age_years(ds)), "sex": str(ds.get("PatientSex") or "unknown"),
                "manufacturer": str(ds.get("Manufacturer") or "unknown"),
                "body part": str(ds.get("BodyPartExamined") or "unknown"),
                "view": str(ds.get("ViewPosition") or "unknown")}
    return dict.fromkeys(SUBGROUPS, "unknown")


def _age_years(ds: pydicom.Dataset) -> float | None:
    return patient_age(ds.get("PatientAge"), ds.get("PatientBirthDate"),
                       (ds.get(k) for k in ("StudyDate", "SeriesDate", "AcquisitionDate", "ContentDate")))


def _read_rows(data_dir: Path, failures: list[Failure]) -> tuple[int, list[Record]]:
    from training.synth.manifest import MANIFEST_NAMES, read_manifest

    if data_dir.is_dir() and not any((data_dir / n).is_file() for n in MANIFEST_NAMES):
        raise ValidateError(f"no labels manifest ({' or '.join(MANIFEST_NAMES)}) in {data_dir}: build one from the RIS "
                            f"export with `dicomnode-train import-labels --dicom {data_dir} --task TASK --table FILE`")
    rows = read_manifest(data_dir)

    def on_error(i: int, row: dict[str, Any], reason: str) -> None:
        key = str(row.get("sop_instance_uid") or row.get("study_uid") or f"row {i}")
        failures.append(Failure(key, f"manifest row {i}: {reason}", "manifest"))

    records = records_from_rows(rows, data_dir, on_error=on_error)
    return len(rows), records


def validate(bundle: str | os.PathLike[str], data_dir: str | os.PathLike[str],
             out_dir: str | os.PathLike[str] | None = None, *, models_dir: str | os.PathLike[str] | None = None,
             device: str = "auto", baseline_train: str | os.PathLike[str] | None = None, n_boot: int = 1000
             ) -> Validation:
    """Score every record of ``data_dir`` with ``bundle`` and write the report into ``out_dir``."""
    from training.tasks import get_adapter

    bundle_dir = resolve_bundle(bundle, models_dir)
    b = load_bundle(bundle_dir)
    adapter = get_adapter(b.meta.task)
    data = Path(data_dir)
    failures: list[Failure] = []
    n_rows, records = _read_rows(data, failures)
    if not records:
        raise ValidateError(f"no manifest row of {data} matches a DICOM study there ({len(failures)} rows listed "
                            "as unmatched): check the folder or re-run import-labels")
    tcfg0 = adapter.config_model.model_validate(b.meta.task_config)
    tcfg, usable, refused, notes = check_labels(b.meta.task, tcfg0, records)
    failures += refused
    dev = select_device(device)
    model = b.load_into(adapter.build_model(tcfg)).to(dev).eval()
    per_record: list[dict[str, Any]] = []
    if b.meta.task == "spine_bmd":
        from training.validate_spine import score_spine

        scores, scored, adapter_metrics = score_spine(adapter, model, usable, tcfg, dev, failures)
    elif b.meta.task == "knee_bone_seg":
        from training.validate_seg import score_knee

        scores = None
        scored, adapter_metrics, per_record = score_knee(adapter, model, usable, tcfg, b, dev, failures)
    else:
        scores, scored, adapter_metrics = _score_generic(adapter, model, usable, tcfg, b, dev, failures)
    if not scored:
        raise ValidateError(f"none of the {n_rows} rows could be scored; see the reasons: "
                            + "; ".join(f"{f.key}: {f.reason}" for f in failures[:3]))
    figures: dict[str, Any] = {}
    if scores is not None:
        scores.notes = notes
        figures = binary_figures(scores, n_boot) if scores.binary else multiclass_figures(scores, n_boot)
    subgroups = _subgroups(b.meta.task, scores, scored, per_record, notes)
    baselines = _baselines(b.meta.task, scored, scores, baseline_train)
    v = Validation(bundle=b, bundle_dir=bundle_dir, data_dir=data, n_rows=n_rows, scored=scored, scores=scores,
                   figures=figures, adapter_metrics=adapter_metrics, subgroups=subgroups, baselines=baselines,
                   failures=failures, notes=notes, per_record=per_record)
    if out_dir is not None:
        from training.validate_report import write_validation_report

        v.files = write_validation_report(v, Path(out_dir))
    return v


def _subgroups(task: str, scores: Scores | None, scored: list[Record], per_record: list[dict[str, Any]],
               notes: list[str]) -> dict[str, dict[str, dict[str, Any]]]:
    """Subgroup tables from the per-unit scores, or from the per-volume Dice of a segmentation (notes appended)."""
    values = [header_groups(r) for r in scored]
    if scores is not None:
        return {g: subgroup_table(scores, [values[int(i)][g] for i in scores.record]) for g in SUBGROUPS}
    if per_record:
        from training.validate_seg import seg_subgroup_table

        patients = [r.patient_id for r in scored]
        notes.append("segmentation: Dice per bone of each volume, mean Dice per subgroup; there is no decision "
                     "threshold to choose, so no threshold sweep")
        return {g: seg_subgroup_table(per_record, [x[g] for x in values], patients) for g in SUBGROUPS}
    notes.append(f"task {task} gives no per-record prediction: subgroup tables and the threshold sweep "
                 "are not available; the task's own figures are shown")
    return {}


def _train_config(b: Bundle, dev: Any) -> Any:
    """The bundle's training config on this machine (no split: validation scores every record)."""
    from training.trainer import TrainConfig

    return TrainConfig.model_validate({**b.meta.train_config, "device": str(dev.type), "num_workers": 0,
                                       "cache_dir": None})


def preprocess_each(adapter: Any, records: list[Record], tcfg: TaskConfig, cache: SampleCache,
                    failures: list[Failure]) -> list[Record]:
    """Pre-process each record on its own into ``cache``; a failure is listed, not fatal. Returns the good ones."""
    preprocess, signature = adapter.preprocessor(tcfg), adapter.preprocess_signature(tcfg)
    good: list[Record] = []
    for r in records:
        try:
            samples = preprocess(r)
        except Exception as exc:  # noqa: BLE001 - one bad study is listed, the others are scored
            failures.append(Failure(r.key, f"{type(exc).__name__}: {exc}", "image"))
            continue
        if not samples:
            failures.append(Failure(r.key, "no usable image (no pixel data)", "image"))
            continue
        cache.put(cache.key(r, signature), samples)
        good.append(r)
    return good


def _score_generic(adapter: Any, model: Any, records: list[Record], tcfg: TaskConfig, b: Bundle, dev: Any,
                   failures: list[Failure]) -> tuple[Scores | None, list[Record], dict[str, Any]]:
    """Pre-process each record on its own (a failure is listed, not fatal), then the adapter's evaluation."""
    from training.trainer import evaluate_records

    with tempfile.TemporaryDirectory(prefix="validate-cache-") as tmp:
        cache = SampleCache(tmp)
        good = preprocess_each(adapter, records, tcfg, cache, failures)
        if not good:
            return None, [], {}
        result = evaluate_records(adapter, model, good, tcfg, _train_config(b, dev), dev, cache)
    y, p = result.y_true, result.y_prob
    if y is None or p is None or len(y) != len(good):
        return None, good, result.metrics
    p = np.asarray(p, dtype=float)
    p = p[:, 0] if p.ndim == 2 and p.shape[1] == 1 else p
    threshold = float(getattr(tcfg, "threshold", 0.5)) if p.ndim == 1 else None
    pred = (p >= threshold).astype(int) if p.ndim == 1 else p.argmax(axis=1)
    idx = np.arange(len(good))
    scores = Scores(unit="study", class_names=list(result.class_names), y_true=np.asarray(y).astype(int), prob=p,
                    pred=pred, record=idx, patient=np.asarray([r.patient_id for r in good]), threshold=threshold)
    if b.meta.task == "hrpqct_motion":
        _motion_rescan(scores, result, tcfg)
    return scores, good, result.metrics


def _motion_rescan(scores: Scores, result: Any, tcfg: TaskConfig) -> None:
    """The bundle's own scan grades (its aggregation and cut points, not the argmax) and rescan decision, as
    :meth:`training.tasks.hrpqct_motion.HrpqctMotionAdapter.evaluate` computed them."""
    from inference.tasks.hrpqct_motion import recommends_rescan

    min_grade = int(getattr(tcfg, "rescan_min_grade", 4))
    threshold = getattr(tcfg, "rescan_threshold", None)
    grade = np.asarray(result.pred_grade, dtype=int)
    scores.pred = grade - 1
    scores.p_rescan = scores.prob[:, min_grade - 1:].sum(axis=1)
    scores.rescan_pred = recommends_rescan(grade, scores.p_rescan, rescan_min_grade=min_grade,
                                           rescan_threshold=threshold).astype(int)
    scores.rescan_min_class = min_grade - 1
    scores.rescan_threshold = threshold


def _baselines(task: str, scored: list[Record], scores: Scores | None,
               fit_dir: str | os.PathLike[str] | None) -> dict[str, dict[str, Any]]:
    """The histogram baseline of :mod:`training.baseline` and the majority-class floor, on the scored studies."""
    from training import baseline as hb

    out: dict[str, dict[str, Any]] = {}
    if scores is not None:
        counts = np.bincount(scores.y_true, minlength=len(scores.class_names) or 2)
        out["majority class"] = {"protocol": f"always '{_class_name(scores, int(counts.argmax()))}' "
                                 f"(per {scores.unit})", "n": int(counts.sum()),
                                 "accuracy": float(counts.max() / max(counts.sum(), 1)), "auc": 0.5}
    out.update(_clinic_baselines(task, scored, fit_dir))
    if task not in hb.TASKS:
        out["histogram"] = {"error": f"no histogram baseline for {task}"}
        return out
    patients = len({r.patient_id for r in scored})
    try:
        if fit_dir is not None:
            out["histogram"] = hb.run_baseline(task, scored, fit_root=Path(fit_dir))
        else:
            out["histogram"] = hb.run_baseline(task, scored, folds=min(5, patients)) if patients >= 2 else {
                "error": "cross-validation needs at least 2 patients; pass --baseline-train DIR"}
    except (hb.BaselineError, DicomNodeError, ValueError) as exc:
        out["histogram"] = {"error": str(exc)}
    return out


def _clinic_baselines(task: str, scored: list[Record], fit_dir: str | os.PathLike[str] | None
                      ) -> dict[str, dict[str, Any]]:
    """The clinic's simple rules (:mod:`training.clinic_baselines`) other than the histogram, on the scored studies.

    Spine figures are per patient here (``macro_f1``/``kappa_quadratic`` of the lowest-of-L1-L4 class, the unit
    this report scores the network on) beside the vertebra figures.
    """
    from training.clinic_baselines import run_clinic_baselines

    if task not in ("spine_bmd", "hrpqct_motion", "knee_bone_seg"):
        return {}
    fit = None
    if fit_dir is not None and task == "hrpqct_motion":
        from training.data import load_records

        fit = load_records(fit_dir)
    out = run_clinic_baselines(task, scored, fit_records=fit)
    for name, b in out.items():
        if task == "spine_bmd" and "patient_macro_f1" in b:
            out[name] = {**b, "macro_f1": b["patient_macro_f1"], "kappa_quadratic": b["patient_kappa_quadratic"],
                         "accuracy": b["patient_accuracy"], "n": b["n_patients_scored"], "n_vertebrae": b["n"]}
    return out


def _class_name(s: Scores, i: int) -> str:
    return s.class_names[i] if i < len(s.class_names) else str(i)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of ``dicomnode-train validate``."""
    p.add_argument("bundle", metavar="BUNDLE",
                   help="bundle folder, models/<task>/current, models/<task>, or a task name with --models-dir")
    p.add_argument("--data", required=True, help="the site's labelled folder (DICOM + labels.jsonl/csv)")
    p.add_argument("--models-dir", help="registry to look a task name up in")
    p.add_argument("--out", help="report folder (default ./validation-<task>-<version>)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--baseline-train", metavar="DIR",
                   help="fit the histogram baseline on this labelled folder (default: cross-validated on DATA)")
    p.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples of the confidence intervals")


def run(args: argparse.Namespace) -> int:
    """Validate and print a summary; exit 2 with a one-line reason when the data cannot be validated."""
    try:
        bundle_dir = resolve_bundle(args.bundle, args.models_dir)
        meta = load_bundle(bundle_dir, verify=False).meta
        out = Path(args.out) if args.out else Path.cwd() / f"validation-{meta.task}-{meta.version}"
        v = validate(bundle_dir, args.data, out, device=args.device, baseline_train=args.baseline_train,
                     n_boot=args.n_boot)
    except DicomNodeError as exc:
        print(f"error: {exc}")
        return 2
    head = _headline(v)
    print(f"{meta.task} {meta.version}: {len(v.scored)} of {v.n_rows} rows scored{head}; "
          f"{len(v.failures)} listed as not scored")
    for note in v.notes:
        print(f"note: {note}")
    print(out / "report.html")
    return 0


def _headline(v: Validation) -> str:
    f = v.figures
    for key in ("auc", "macro_f1"):
        if key in f and not math.isnan(f[key]["value"]):
            lo, hi = f[key]["ci95"]
            return f", {key} {f[key]['value']:.3f} (95% CI {lo:.3f}-{hi:.3f})"
    return ""
