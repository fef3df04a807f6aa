"""``dicomnode-train compare EVAL_DIR [EVAL_DIR ...] --out DIR``: one table from several evaluations.

Each ``EVAL_DIR`` is the output of ``dicomnode-train evaluate`` (its ``metrics.json``). The bundles must
belong to one task and must have been evaluated on the same records (equal hold-out hash), otherwise the
rows would not be comparable and the command refuses; ``--allow-different-data`` lists them anyway and
says so in the table. Rows are named by what distinguishes the bundles (the task adapter's
``variant_of``: the backbone for ``spine_bmd``), columns are the adapter's ``comparison_columns``
(dotted paths into ``metrics``), and the source document's rows (``reference_rows``) follow ours.
Writes ``compare.md`` and ``compare.json`` into ``DIR``.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

from inference.errors import DicomNodeError

__all__ = ["CompareError", "add_arguments", "compare", "load_evaluation", "metric_at", "run"]


class CompareError(DicomNodeError):
    """The evaluations cannot be put in one table."""


def load_evaluation(path: str | Path) -> dict[str, Any]:
    """The ``metrics.json`` of an evaluation folder (or the file itself), checked for the needed keys."""
    p = Path(path)
    f = p / "metrics.json" if p.is_dir() else p
    try:
        payload = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CompareError(f"{f}: not a readable evaluation ({exc})") from exc
    if not isinstance(payload, dict):
        raise CompareError(f"{f}: not an evaluation's metrics.json (a JSON {type(payload).__name__})")
    missing = [k for k in ("task", "version", "metrics", "holdout_hash") if k not in payload]
    if missing:
        raise CompareError(f"{f}: not an evaluation's metrics.json (missing {missing})")
    payload["_source"] = str(f)
    return payload


def metric_at(metrics: dict[str, Any], path: str) -> Any:
    """Value of a dotted path (``sensitivity_per_class.osteopenia``) in a metrics dict, or None."""
    value: Any = metrics
    for part in path.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return "n/a" if math.isnan(v) else f"{v:.3f}"
    return str(v)


def compare(evaluations: list[dict[str, Any]], *, allow_different_data: bool = False) -> dict[str, Any]:
    """Rows (ours, then the source document's) and columns of one comparison table.

    Raises
    ------
    CompareError
        Fewer than one evaluation, several tasks, an unknown task, or different evaluated records
        (unless ``allow_different_data``).
    """
    from training.tasks import get_adapter

    if not evaluations:
        raise CompareError("no evaluation to compare")
    tasks = sorted({e["task"] for e in evaluations})
    if len(tasks) != 1:
        raise CompareError(f"evaluations of several tasks cannot share a table: {tasks}")
    try:
        adapter = get_adapter(tasks[0])
    except DicomNodeError as exc:
        raise CompareError(str(exc)) from exc
    hashes = sorted({str(e["holdout_hash"]) for e in evaluations})
    if len(hashes) > 1 and not allow_different_data:
        raise CompareError("the evaluations scored different records (hold-out hashes "
                           + ", ".join(h[:12] for h in hashes) + "); evaluate every bundle on the same data, "
                           "or pass --allow-different-data")
    columns = list(adapter.comparison_columns())
    rows: list[dict[str, Any]] = []
    names: set[str] = set()
    for e in evaluations:
        variant = adapter.variant_of(e.get("task_config") or {})
        name = f"{variant} {e['version']}".strip() if variant else str(e["version"])
        if name in names:
            raise CompareError(f"{e['_source']}: a second evaluation of {name!r}")
        names.add(name)
        rows.append({"name": name, "source": "ours", "n_records": e.get("n_records"),
                     "holdout_hash": e["holdout_hash"], "evaluation": e["_source"],
                     "values": {c: metric_at(e["metrics"], c) for c in columns}})
    for name, values in adapter.reference_rows().items():
        rows.append({"name": name, "source": "reference", "values": {c: values.get(c) for c in columns}})
    return {"task": tasks[0], "columns": columns, "rows": rows, "same_data": len(hashes) == 1,
            "reference_notes": adapter.reference_figures().get("_notes")}


def table_md(table: dict[str, Any]) -> str:
    """The comparison as a Markdown page."""
    cols = table["columns"]
    lines = [f"# Comparison: {table['task']}", ""]
    ours = [r for r in table["rows"] if r["source"] == "ours"]
    if table["same_data"]:
        lines.append(f"All {len(ours)} bundles were evaluated on the same {ours[0]['n_records']} records "
                     f"(hold-out hash `{str(ours[0]['holdout_hash'])[:16]}`).")
    else:
        lines.append("**The bundles were evaluated on different records**; their rows are not directly comparable.")
    lines += ["", "| | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for r in table["rows"]:
        label = r["name"] if r["source"] == "ours" else f"{r['name']} (source document)"
        lines.append(f"| {label} | " + " | ".join(_fmt(r["values"].get(c)) for c in cols) + " |")
    if table.get("reference_notes"):
        lines += ["", "## Notes on the source figures", "", str(table["reference_notes"])]
    return "\n".join(lines) + "\n"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of ``dicomnode-train compare``."""
    p.add_argument("evaluations", nargs="+", metavar="EVAL_DIR", help="outputs of `dicomnode-train evaluate`")
    p.add_argument("--out", required=True, help="folder for compare.md and compare.json")
    p.add_argument("--allow-different-data", action="store_true",
                   help="list evaluations of different records anyway (marked as not comparable)")


def run(args: argparse.Namespace) -> int:
    """Write the table and print it."""
    try:
        table = compare([load_evaluation(p) for p in args.evaluations],
                        allow_different_data=args.allow_different_data)
    except CompareError as exc:
        print(f"error: {exc}")
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    md = table_md(table)
    (out / "compare.md").write_text(md, encoding="utf-8")
    (out / "compare.json").write_text(json.dumps(table, indent=2, default=str) + "\n", encoding="utf-8")
    print(md)
    return 0
