"""``dicomnode status``: studies, series, jobs and deliveries read from the node database.

Reads through :class:`dicomnode.store.StoreView` (read-only); no SQL here.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

from dicomnode import store
from dicomnode.config import Config
from dicomnode.execution import status_lines
from dicomnode.quarantine import QuarantinedInstance, quarantined_from_rows
from dicomnode.store import StoreView

__all__ = ["attention", "print_status", "status_text"]


def _ts(value: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(value)) if value else "-"


def status_text(cfg: Config, limit: int = 50) -> str:
    """Render the node's state as text (no patient identifiers, UIDs only)."""
    path = store.db_path(cfg.node.storage_dir)
    models = _models_text(cfg)
    if not path.exists():
        return f"no node database at {path} (the node has not run yet)" + models
    out: list[str] = [f"database: {path}", *status_lines(cfg)]
    with StoreView(path) as view:
        out += _attention_text(view, cfg)
        rows = view.journal_backlog()
        if rows:
            out.append("\nRECEIVE JOURNALS (acknowledged, not yet in the spool)")
            out += [f"  {r['journal']}  pending={r['pending']} reported={_ts(r['updated_at'])}" for r in rows]
        if view.has_table("studies"):
            out.append("\nSTUDIES (state, generation, routes, completed, processed)")
            for r in view.recent_studies(limit):
                routes = ",".join(json.loads(r["routes"] or "[]")) or "-"
                nr = len(json.loads(r["no_route_series"] or "[]"))
                out.append(f"  {r['study_uid']}  {r['state']:<9} gen={r['generation']} routes={routes}"
                           f" no_route_series={nr} completed={_ts(r['completed_at'])}"
                           f" processed={_ts(r['processed_at'])}")
        if view.has_table("series"):
            out.append("\nSERIES (study, instances, expected, last received)")
            for r in view.recent_series(limit):
                meta = json.loads(r["meta_json"])
                out.append(f"  {r['series_uid']}  study={r['study_uid']} modality={meta.get('modality') or '-'}"
                           f" n={r['n_instances']} expected={r['expected_count'] or '-'}"
                           f" last={_ts(r['last_received'])}")
        if view.has_table("jobs"):
            out.append("\nJOBS (id, state, attempts, task, route, study, last error)")
            for r in view.recent_jobs(limit):
                err = f"  error: {r['last_error']}" if r["last_error"] else ""
                out.append(f"  #{r['id']:<5} {r['state']:<7} attempts={r['attempts']} task={r['task']}"
                           f" route={r['route']} gen={r['generation']} study={r['study_uid']}{err}")
        if view.has_table("deliveries"):
            out.append("\nDELIVERIES (id, state, attempts, destination, SOP instance, last error)")
            for r in view.recent_deliveries(limit):
                err = f"  error: {r['last_error']}" if r["last_error"] else ""
                out.append(f"  #{r['id']:<5} {r['state']:<7} attempts={r['attempts']} dest={r['destination']}"
                           f" sop={r['sop_instance_uid']}{err}")
    return "\n".join(out) + models


def attention(view: StoreView, cfg: Config) -> dict[str, list[Any] | list[QuarantinedInstance]]:
    """What needs the operator: dead deliveries, dead or failing jobs, quarantined instances (files present)."""
    return {"deliveries": view.dead_deliveries(), "jobs": view.failing_jobs(),
            "quarantined": quarantined_from_rows(view.quarantine_rows(), cfg.node.storage_dir)}


def _attention_text(view: StoreView, cfg: Config) -> list[str]:
    found = attention(view, cfg)
    out: list[str] = []
    if found["quarantined"]:
        out.append(f"\nQUARANTINED ({len(found['quarantined'])} acknowledged instance(s) not indexed; "
                   "see README 'Quarantined instances')")
        out += [f"  #{q.id:<5} {q.kind} sop={q.sop_instance_uid or '-'} at={_ts(q.quarantined_at)} file={q.path}"
                f"\n         reason: {q.reason}" for q in found["quarantined"]]  # type: ignore[union-attr]
    if found["jobs"]:
        out.append(f"\nFAILED JOBS ({len(found['jobs'])})")
        out += [f"  #{r['id']:<5} {r['state']:<7} attempts={r['attempts']} task={r['task']} study={r['study_uid']}"
                f"  error: {r['last_error']}" for r in found["jobs"]]  # type: ignore[index]
    if found["deliveries"]:
        out.append(f"\nDEAD DELIVERIES ({len(found['deliveries'])})")
        out += [f"  #{r['id']:<5} dest={r['destination']} sop={r['sop_instance_uid']}  error: {r['last_error']}"
                for r in found["deliveries"]]  # type: ignore[index]
    return out


def _models_text(cfg: Config) -> str:
    """Current model version of each task in the registry and when it was promoted (the pointer's mtime)."""
    from inference.registry import ModelRegistry

    reg = ModelRegistry(cfg.models_dir)
    lines = []
    for task in reg.tasks():
        version = reg.current(task)
        when = reg.pointer_path(task).stat().st_mtime if version else None
        lines.append(f"  {task:<20} version={version or '-'} promoted={_ts(when)}")
    return ("\n\nMODELS (task, current version, promoted)\n" + "\n".join(lines)) if lines else ""


def print_status(cfg: Config, limit: int = 50) -> int:
    """Print :func:`status_text`; returns 0."""
    try:
        print(status_text(cfg, limit))
    except BrokenPipeError:  # piped into head: not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0
