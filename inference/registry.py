"""Versioned model bundles per task, a ``current`` pointer, and a warm model cache with hot swap.

Layout::

    <models_dir>/<task>/<version>/bundle.json, weights.pt, card.md
    <models_dir>/<task>/current        # one line: the current version

The pointer is replaced atomically (write temp file, fsync, ``os.replace``), so
a reader sees either the old or the new version, never a partial one.
:class:`ModelCache` loads the current version lazily, keeps it warm, and looks
at the pointer at most every ``check_interval_s`` seconds (or on
:meth:`ModelCache.reload`). A swap replaces the cache entry; jobs that already
hold the previous :class:`LoadedModel` keep using it until they finish.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from inference.bundle import Bundle, BundleMeta, load_bundle, read_meta
from inference.errors import BundleError, ModelNotFoundError
from inference.fsutil import atomic_write_text, replace_dir

log = logging.getLogger(__name__)

POINTER = "current"

__all__ = ["LoadedModel", "ModelCache", "ModelRegistry", "load_model", "shared_cache"]


class ModelRegistry:
    """Promoted bundles under ``models_dir``, one folder per task and version."""

    def __init__(self, models_dir: str | os.PathLike[str]) -> None:
        self.root = Path(models_dir)

    def task_dir(self, task: str) -> Path:
        """Folder holding every version of ``task``."""
        if not task or "/" in task or task.startswith("."):
            raise ValueError(f"invalid task name {task!r}")
        return self.root / task

    def tasks(self) -> list[str]:
        """Tasks that have at least one version."""
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".") and self.versions(p.name))

    def versions(self, task: str) -> list[str]:
        """Versions of ``task`` ordered by creation time (oldest first)."""
        d = self.task_dir(task)
        if not d.is_dir():
            return []
        found: list[tuple[str, str]] = []
        for p in d.iterdir():
            if p.is_dir() and not p.name.startswith(".") and (p / "bundle.json").exists():
                try:
                    found.append((read_meta(p).created_at, p.name))
                except BundleError as exc:
                    log.warning("ignoring malformed bundle %s: %s", p, exc)
        return [name for _, name in sorted(found)]

    def pointer_path(self, task: str) -> Path:
        """Path of the ``current`` pointer file of ``task``."""
        return self.task_dir(task) / POINTER

    def current(self, task: str) -> str | None:
        """The current version of ``task``, or None if nothing was promoted."""
        try:
            version = self.pointer_path(task).read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            return None
        return version or None

    def current_dir(self, task: str) -> Path:
        """Bundle directory of the current version.

        Raises
        ------
        ModelNotFoundError
            If no version is current or its directory is missing.
        """
        version = self.current(task)
        if version is None:
            raise ModelNotFoundError(f"no model promoted for task {task!r} in {self.root}")
        d = self.task_dir(task) / version
        if not (d / "bundle.json").exists():
            raise ModelNotFoundError(f"current version {version!r} of task {task!r} is missing from {self.root}")
        return d

    def add(self, bundle_dir: str | os.PathLike[str]) -> BundleMeta:
        """Copy a bundle into the registry (atomically) without making it current; return its metadata.

        Raises
        ------
        BundleError
            If the bundle is invalid or holds pretraining weights, or a different bundle already has that version.
        """
        src = Path(bundle_dir)
        load_bundle(src)  # validates metadata and weights hash
        meta = read_meta(src)
        if meta.purpose != "inference":
            raise BundleError(f"bundle {bundle_dir} holds {meta.purpose} weights (a starting point for training), "
                              "not a model to serve")
        dest = self.task_dir(meta.task) / meta.version
        if dest.exists():
            if read_meta(dest).weights_sha256 != meta.weights_sha256:
                raise BundleError(f"registry already holds a different {meta.task} version {meta.version!r}")
            return meta
        if src.resolve() == dest.resolve():
            return meta
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{meta.version}.", suffix=".tmp", dir=dest.parent))
        try:
            shutil.copytree(src, tmp, dirs_exist_ok=True)
            replace_dir(tmp, dest)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return meta

    def set_current(self, task: str, version: str) -> None:
        """Point ``task`` at an existing ``version`` (also used to roll back).

        Raises
        ------
        ModelNotFoundError
            If that version is not in the registry.
        """
        if not (self.task_dir(task) / version / "bundle.json").exists():
            raise ModelNotFoundError(f"task {task!r} has no version {version!r} in {self.root}")
        atomic_write_text(self.pointer_path(task), version + "\n")
        log.info("task %s now uses model version %s", task, version)

    def promote(self, task: str, bundle_dir: str | os.PathLike[str]) -> str:
        """Add ``bundle_dir`` to the registry and make it current; return its version.

        Raises
        ------
        BundleError
            If the bundle belongs to another task or is invalid.
        """
        meta = read_meta(bundle_dir)
        if meta.task != task:
            raise BundleError(f"bundle {bundle_dir} is for task {meta.task!r}, not {task!r}")
        self.add(bundle_dir)
        self.set_current(task, meta.version)
        return meta.version


@dataclass
class LoadedModel:
    """A ready-to-run model with the bundle it came from. Hold on to it for the whole job."""

    bundle: Bundle
    model: torch.nn.Module
    device: torch.device
    loaded_at: float = field(default_factory=time.monotonic)

    @property
    def version(self) -> str:
        """The model's version string."""
        return self.bundle.meta.version

    @property
    def meta(self) -> BundleMeta:
        """The bundle metadata."""
        return self.bundle.meta


ModelBuilder = Callable[[Bundle], torch.nn.Module]


def _default_builder(bundle: Bundle) -> torch.nn.Module:
    return bundle.build_model()


@dataclass
class _Entry:
    loaded: LoadedModel
    pointer_state: tuple[str, int] | None  # (version, mtime_ns) of the pointer when loaded
    checked_at: float


class ModelCache:
    """Loads the current model of each task lazily and swaps in promoted versions without a restart.

    Parameters
    ----------
    registry:
        Where promoted bundles live.
    device:
        ``"auto"``, ``"cpu"``, ``"cuda"`` or a :class:`torch.device`.
    check_interval_s:
        Look at the ``current`` pointer at most this often per task (0: every call).
    builder:
        Turns a bundle into a module with its weights loaded; by default
        :meth:`Bundle.build_model` (the architectures in :mod:`inference.nets`).
    """

    def __init__(
        self,
        registry: ModelRegistry,
        *,
        device: str | torch.device = "auto",
        check_interval_s: float = 5.0,
        builder: ModelBuilder | None = None,
    ) -> None:
        from inference.runtime import select_device

        self.registry = registry
        self.device = select_device(device)
        self.check_interval_s = float(check_interval_s)
        self.builder = builder or _default_builder
        self._entries: dict[str, _Entry] = {}
        self._pinned: dict[tuple[str, str | None], LoadedModel] = {}
        self._lock = threading.RLock()
        self._task_locks: dict[str, threading.Lock] = {}

    def _pointer_state(self, task: str) -> tuple[str, int] | None:
        p = self.registry.pointer_path(task)
        try:
            st = p.stat()
            version = p.read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            return None
        return version, st.st_mtime_ns

    def _load(self, bundle_dir: Path) -> LoadedModel:
        from inference.runtime import prepare_model

        bundle = load_bundle(bundle_dir)
        model = prepare_model(self.builder(bundle), self.device)
        log.info("loaded %s model version %s on %s", bundle.meta.task, bundle.meta.version, self.device)
        return LoadedModel(bundle=bundle, model=model, device=self.device)

    def get(self, task: str) -> LoadedModel:
        """The current model of ``task``, loading or swapping it if the pointer changed.

        Raises
        ------
        ModelNotFoundError
            If nothing is promoted for ``task``.
        """
        with self._lock:
            task_lock = self._task_locks.setdefault(task, threading.Lock())
        with task_lock:
            now = time.monotonic()
            entry = self._entries.get(task)
            if entry is not None and now - entry.checked_at < self.check_interval_s:
                return entry.loaded
            state = self._pointer_state(task)
            if entry is not None and state == entry.pointer_state:
                entry.checked_at = now
                return entry.loaded
            if state is None:
                if entry is not None:  # pointer removed: keep serving the last good model
                    log.warning("pointer for task %s disappeared; keeping version %s", task, entry.loaded.version)
                    entry.checked_at = now
                    return entry.loaded
                raise ModelNotFoundError(f"no model promoted for task {task!r} in {self.registry.root}")
            if entry is not None and state[0] == entry.loaded.version:
                entry.pointer_state, entry.checked_at = state, now
                return entry.loaded
            try:
                loaded = self._load(self.registry.current_dir(task))
            except (BundleError, ModelNotFoundError) as exc:
                if entry is None:
                    raise
                # a broken promotion must not take the task down: keep the last good model until the pointer moves
                log.error("task %s: cannot load version %s (%s); keeping version %s", task, state[0], exc,
                          entry.loaded.version)
                entry.pointer_state, entry.checked_at = state, now
                return entry.loaded
            if entry is not None:
                log.info("task %s: swapped model version %s -> %s", task, entry.loaded.version, loaded.version)
            self._entries[task] = _Entry(loaded=loaded, pointer_state=state, checked_at=now)
            return loaded

    def get_pinned(self, bundle_dir: str | os.PathLike[str]) -> LoadedModel:
        """A model from an explicit bundle directory (a route's ``model:`` or ``analyze --model``), kept warm.

        Kept per directory and metadata content: new weights or an edited ``bundle.json`` (an operating
        point in ``task_config``) load afresh.
        """
        d = Path(bundle_dir).resolve()
        meta = read_meta(d)
        key = (str(d), hashlib.sha256(meta.model_dump_json().encode()).hexdigest())
        with self._lock:
            if key not in self._pinned:
                self._pinned[key] = self._load(d)
            return self._pinned[key]

    def reload(self, task: str | None = None) -> None:
        """Force the next :meth:`get` to look at the pointer (all tasks if ``task`` is None)."""
        with self._lock:
            for name, entry in self._entries.items():
                if task is None or name == task:
                    entry.checked_at = float("-inf")

    def loaded_versions(self) -> dict[str, str]:
        """Task -> version of every model currently warm."""
        with self._lock:
            return {t: e.loaded.version for t, e in self._entries.items()}


_SHARED: dict[tuple[str, str], ModelCache] = {}
_SHARED_LOCK = threading.Lock()


def shared_cache(models_dir: str | os.PathLike[str], device: str | torch.device = "auto", *,
                 check_interval_s: float = 5.0) -> ModelCache:
    """The process-wide :class:`ModelCache` for ``(models_dir, device)``, created on first use.

    The node's workers and ``dicomnode analyze`` share it, so a model is loaded once per
    process and hot-swapped for everyone.
    """
    from inference.runtime import select_device

    key = (str(Path(models_dir).resolve()), str(select_device(device)))
    with _SHARED_LOCK:
        cache = _SHARED.get(key)
        if cache is None:
            cache = _SHARED[key] = ModelCache(ModelRegistry(models_dir), device=device,
                                              check_interval_s=check_interval_s)
        return cache


def load_model(task: str, *, models_dir: str | os.PathLike[str] | None = None,
               model_dir: str | os.PathLike[str] | None = None, device: str | torch.device = "auto",
               builder: ModelBuilder | None = None) -> LoadedModel:
    """The model a task run should use: an explicit bundle (``model_dir``) or the registry's current version.

    This is what a task calls with the fields of its ``TaskContext``. Hold on to the
    returned :class:`LoadedModel` for the whole job.

    Raises
    ------
    ModelNotFoundError
        If neither a bundle directory nor a models directory with a promoted version is given.
    BundleError
        If the bundle belongs to another task or is malformed.
    """
    if model_dir is not None:
        meta = read_meta(model_dir)
        if meta.task != task:
            raise BundleError(f"bundle {model_dir} is for task {meta.task!r}, not {task!r}")
        if builder is not None:
            cache = ModelCache(ModelRegistry(Path(model_dir).parent), device=device, builder=builder)
        else:
            cache = shared_cache(Path(model_dir).resolve().parent, device)
        return cache.get_pinned(model_dir)
    if models_dir is None:
        raise ModelNotFoundError(f"no model for task {task!r}: give a bundle directory or a models directory")
    if builder is not None:
        return ModelCache(ModelRegistry(models_dir), device=device, builder=builder).get(task)
    return shared_cache(models_dir, device).get(task)
