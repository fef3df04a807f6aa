"""Checks of a loaded config that pydantic cannot make: task names and the models the routes need.

``dicomnode check-config`` runs them after :func:`dicomnode.config.load_config`. Each problem is one line that
names the route, says what is wrong and how to fix it. The common case (built-in tasks, bundles in
``models_dir``) reads only the registry's ``current`` pointers and ``bundle.json`` files, so it stays fast
and does not import torch; the task modules (and the config's ``plugins``) are imported only when a route
names a task that is not built in.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from dicomnode.config import Config, Route

__all__ = ["check_execution", "check_routes", "known_task_names", "model_problem"]

#: the ``current`` pointer file of a task in the model registry (``inference.registry.POINTER``)
POINTER = "current"


def _builtin_task_names() -> set[str]:
    """Names of the built-in tasks present in this installation (module name = task name), without importing them."""
    from inference.tasks import BUILTIN_TASK_MODULES

    return {m.rsplit(".", 1)[-1] for m in BUILTIN_TASK_MODULES if importlib.util.find_spec(m) is not None}


def known_task_names(cfg: Config, wanted: set[str]) -> set[str]:
    """Task names the node will know at start-up; imports the tasks and ``plugins`` only when ``wanted`` needs it."""
    names = _builtin_task_names()
    if wanted <= names:
        return names
    from inference.tasks import known_tasks, load_plugins

    try:
        load_plugins(cfg.plugins)
    except ImportError as exc:
        raise ImportError(f"plugin module cannot be imported ({exc}); fix or remove it under 'plugins'") from exc
    return names | set(known_tasks())


def _bundle_task(bundle_dir: Path) -> str | None:
    """The ``task`` recorded in a bundle's ``bundle.json``; None when it is missing or unreadable."""
    try:
        meta = json.loads((bundle_dir / "bundle.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return str(meta.get("task")) if isinstance(meta, dict) and meta.get("task") else None


def model_problem(route: Route, models_dir: Path) -> str | None:
    """Why ``route`` has no usable model (pinned ``model`` or the registry's current version), or None."""
    if route.model is not None:
        task = _bundle_task(route.model)
        if task is None:
            return (f"route {route.name!r}: pinned model {route.model} is not a model bundle (no readable "
                    "bundle.json); point 'model' at a bundle folder or remove it to use the registry")
        if task != route.task:
            return (f"route {route.name!r}: pinned model {route.model} is a {task} bundle, not {route.task}; "
                    "pin a bundle of the route's task")
        return None
    fix = (f"promote one with `dicomnode-train promote BUNDLE_DIR --registry {models_dir}`, point models_dir at "
           "the registry that has it, or pin a bundle with the route's 'model'")
    try:
        version = (models_dir / route.task / POINTER).read_text(encoding="utf-8").strip()
    except OSError:
        version = ""
    if not version:
        return f"route {route.name!r}: task {route.task} has no promoted model in {models_dir}; {fix}"
    if _bundle_task(models_dir / route.task / version) is None:
        return (f"route {route.name!r}: the current {route.task} model {version!r} is missing from "
                f"{models_dir / route.task} (no readable bundle.json); {fix}")
    return None


def check_routes(cfg: Config) -> list[str]:
    """One line per problem with the routes' tasks and models; empty when the node can run every route.

    Every built-in task needs a model bundle (the registry's current version, or the route's pinned
    ``model``); a plugin task's model is checked only when the route pins one.
    """
    problems: list[str] = []
    wanted = {r.task for r in cfg.routes}
    try:
        known = known_task_names(cfg, wanted)
    except ImportError as exc:
        return [str(exc)]
    builtin = _builtin_task_names()
    for route in cfg.routes:
        if route.task not in known:
            problems.append(f"route {route.name!r}: unknown task {route.task!r}; known tasks: "
                            f"{', '.join(sorted(known))} (fix the task name, or list the module that registers "
                            "it under 'plugins')")
            continue
        if route.task not in builtin and route.model is None:
            continue  # a site plugin's task may need no model bundle (rule-based); only built-ins surely do
        problem = model_problem(route, cfg.models_dir)
        if problem:
            problems.append(problem)
    return problems + check_execution(cfg)


def check_execution(cfg: Config) -> list[str]:
    """Problems with ``execution`` that pydantic cannot see: Ray not installed, an address without a port."""
    ex = cfg.execution
    if ex.engine != "ray":
        return []
    problems: list[str] = []
    if importlib.util.find_spec("ray") is None:
        problems.append("execution.engine is 'ray' but Ray is not installed; install it with "
                        "`pip install 'bone-dicomnode[cluster]'` or set execution.engine: local")
    host, _, port = (ex.address or "").rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        problems.append(f"execution.address {ex.address!r} is not host:port; give the Ray head's GCS address, "
                        "e.g. 10.0.0.5:6379")
    return problems
