"""Model bundles: a self-describing directory with ``bundle.json``, ``weights.pt`` and ``card.md``.

Writing is atomic: everything goes into a temporary sibling directory that is
then renamed into place, so a reader never sees half a bundle.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from inference.errors import BundleError
from inference.fsutil import replace_dir
from inference.task_settings import validate_settings

log = logging.getLogger(__name__)

BUNDLE_JSON = "bundle.json"
WEIGHTS = "weights.pt"
CARD = "card.md"
FORMAT_VERSION = 1

__all__ = [
    "Bundle", "BundleMeta", "CodeVersion", "InputSpec", "LabelSpec", "code_version", "hash_strings",
    "load_bundle", "save_bundle",
]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class CodedConcept(_Strict):
    """A code triple (value, scheme, meaning), mirroring :class:`inference.findings.Code`."""

    value: str
    scheme: str
    meaning: str


class LabelSpec(_Strict):
    """One output class or structure of the model."""

    name: str
    index: int = Field(ge=0)
    code: CodedConcept | None = None
    category: CodedConcept | None = None


class InputSpec(_Strict):
    """What the network expects: enough to reproduce the pre-processing exactly."""

    modality: list[str] = Field(default_factory=list)
    spacing_mm: list[float] | None = Field(None, description="target spacing in array order (slice, row, col)")
    size: list[int] | None = Field(None, description="network input size in array order (e.g. [rows, cols])")
    channels: int = Field(1, ge=1)
    window: tuple[float, float] | None = Field(None, description="(center, width) applied before normalisation")
    normalisation: Literal["none", "minmax", "zscore", "window"] = "none"
    mean: float | list[float] | None = None
    std: float | list[float] | None = None
    extra: dict[str, Any] = Field(default_factory=dict, description="task-specific pre-processing parameters")


class CodeVersion(_Strict):
    """Package version and, when available, the git commit the bundle was built from."""

    package: str
    git_commit: str | None = None
    git_dirty: bool | None = None


class BundleMeta(_Strict):
    """Contents of ``bundle.json``."""

    format_version: int = FORMAT_VERSION
    task: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    version: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.+-]+$")
    architecture: str
    init_args: dict[str, Any] = Field(default_factory=dict)
    input: InputSpec = Field(default_factory=InputSpec)
    labels: list[LabelSpec] = Field(default_factory=list)
    training_data_hash: str | None = None
    holdout_hash: str | None = None
    split: dict[str, Any] = Field(default_factory=dict, description="how the split was made (seed, fractions, counts)")
    metrics: dict[str, Any] = Field(default_factory=dict, description="metrics on the locked hold-out set")
    primary_metric: str | None = None
    greater_is_better: bool = True
    train_config: dict[str, Any] = Field(default_factory=dict)
    task_config: dict[str, Any] = Field(default_factory=dict)
    code: CodeVersion = Field(default_factory=lambda: code_version())
    created_at: str = Field(default_factory=lambda: _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"))
    training_log: list[dict[str, Any]] = Field(default_factory=list, description="per-epoch losses and metrics")
    synthetic_only: bool = False
    weights_dtype: Literal["float32", "float16"] = "float32"
    weights_sha256: str | None = None
    notes: str = ""
    purpose: Literal["inference", "pretraining"] = Field(
        "inference", description="pretraining: starting weights for `train --set init_from=...`, never served")

    @property
    def algorithm_name(self) -> str:
        """Name written into result objects: ``bone-dicomnode/<task>/<architecture>``."""
        return f"bone-dicomnode/{self.task}/{self.architecture}"


def code_version() -> CodeVersion:
    """Installed package version plus the git commit of the source tree, if it is a git checkout."""
    from importlib import metadata

    try:
        pkg = metadata.version("bone-dicomnode")
    except metadata.PackageNotFoundError:
        pkg = "unknown"
    commit: str | None = None
    dirty: bool | None = None
    root = Path(__file__).resolve().parent.parent
    if (root / ".git").exists():
        try:
            commit = subprocess.run(
                ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True
            ).stdout.strip() or None
            status = subprocess.run(
                ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                capture_output=True, text=True, timeout=10, check=True,
            ).stdout
            dirty = bool(status.strip())
        except (OSError, subprocess.SubprocessError):
            commit = None
    return CodeVersion(package=pkg, git_commit=commit, git_dirty=dirty)


def hash_strings(items: Iterable[str]) -> str:
    """Order-independent SHA-256 of a set of strings (used for data and hold-out hashes)."""
    h = hashlib.sha256()
    for s in sorted(set(items)):
        h.update(s.encode("utf-8"))
        h.update(b"\n")
    return h.hexdigest()


@dataclass
class Bundle:
    """A loaded bundle: its directory, metadata, weights and model card."""

    path: Path
    meta: BundleMeta
    state_dict: dict[str, torch.Tensor]
    card: str

    @property
    def version(self) -> str:
        """The bundle's version string."""
        return self.meta.version

    def build_model(self, *, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
        """Instantiate the architecture through :func:`inference.nets.build_network` and load the weights.

        Raises
        ------
        BundleError
            If the architecture is unknown or the weights do not fit it.
        """
        from inference.nets import build_network

        try:
            model = build_network(self.meta.architecture, **self.meta.init_args)
        except (KeyError, TypeError, ValueError) as exc:
            raise BundleError(f"bundle {self.path}: cannot build {self.meta.architecture!r}: {exc}") from exc
        return self.load_into(model, dtype=dtype)

    def load_into(self, model: torch.nn.Module, *, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
        """Load the weights (cast to ``dtype`` where floating point) into ``model`` and return it in eval mode."""
        sd = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in self.state_dict.items()}
        try:
            model.load_state_dict(sd, strict=True)
        except RuntimeError as exc:
            raise BundleError(f"bundle {self.path}: weights do not match {self.meta.architecture!r}: {exc}") from exc
        return model.to(dtype).eval()


def save_bundle(
    directory: str | os.PathLike[str],
    meta: BundleMeta,
    state_dict: Mapping[str, torch.Tensor],
    card_md: str,
    *,
    fp16: bool = False,
    overwrite: bool = False,
) -> Path:
    """Write a bundle atomically (temporary sibling directory, then rename) and return its path.

    Parameters
    ----------
    directory:
        Final bundle directory. Its parent is created if needed.
    meta:
        Metadata; ``weights_dtype`` and ``weights_sha256`` are filled in here.
    state_dict:
        Model weights (tensors are moved to CPU).
    card_md:
        The model card (Markdown).
    fp16:
        Store floating-point weights as float16 (demo bundles, halves the size).
    overwrite:
        Replace an existing bundle at ``directory``; otherwise that is an error.

    Raises
    ------
    BundleError
        If ``directory`` exists and ``overwrite`` is false, or ``meta.task_config`` does not validate
        against the task's settings model.
    """
    final = Path(directory)
    if final.exists() and not overwrite:
        raise BundleError(f"bundle directory {final} already exists")
    validate_settings(meta.task, meta.task_config, where=f"bundle {final}")  # never write one that cannot load
    final.parent.mkdir(parents=True, exist_ok=True)
    sd = {
        k: (v.detach().cpu().half() if fp16 and v.is_floating_point() else v.detach().cpu()).contiguous()
        for k, v in state_dict.items()
    }
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    try:
        weights_path = tmp / WEIGHTS
        torch.save(sd, weights_path)
        with open(weights_path, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()
        meta = meta.model_copy(update={"weights_dtype": "float16" if fp16 else "float32", "weights_sha256": digest})
        BundleMeta.model_validate(meta.model_dump())  # fail fast before anything becomes visible
        (tmp / BUNDLE_JSON).write_bytes((meta.model_dump_json(indent=2) + "\n").encode("utf-8"))
        (tmp / CARD).write_bytes(card_md.encode("utf-8"))
        replace_dir(tmp, final)  # every file synced, then renamed into place
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("wrote bundle %s (task %s, version %s)", final, meta.task, meta.version)
    return final


def read_meta(directory: str | os.PathLike[str]) -> BundleMeta:
    """Read and validate only ``bundle.json`` (cheap; no weights), the task's settings included.

    Raises
    ------
    BundleError
        If the file is missing or invalid, or a ``task_config`` setting is unknown or invalid for its task
        (:mod:`inference.task_settings`).
    """
    path = Path(directory) / BUNDLE_JSON
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise BundleError(f"not a bundle: cannot read {path}: {exc}") from exc
    except json.JSONDecodeError as exc:
        raise BundleError(f"bundle metadata {path} is not valid JSON: {exc}") from exc
    try:
        meta = BundleMeta.model_validate(raw)
    except ValidationError as exc:
        raise BundleError(f"bundle metadata {path} is invalid:\n{exc}") from exc
    if meta.format_version > FORMAT_VERSION:
        raise BundleError(f"bundle {directory} has format {meta.format_version}; this code reads <= {FORMAT_VERSION}")
    validate_settings(meta.task, meta.task_config, where=f"bundle {directory}")
    return meta


def load_bundle(directory: str | os.PathLike[str], *, verify: bool = True) -> Bundle:
    """Load a bundle's metadata, weights (on CPU) and card.

    Parameters
    ----------
    verify:
        Check the weights file against ``weights_sha256``.

    Raises
    ------
    BundleError
        If the bundle is incomplete, corrupted or invalid.
    """
    d = Path(directory)
    meta = read_meta(d)
    wpath = d / WEIGHTS
    try:
        data = wpath.read_bytes()
    except OSError as exc:
        raise BundleError(f"bundle {d}: cannot read weights: {exc}") from exc
    if verify and meta.weights_sha256 and hashlib.sha256(data).hexdigest() != meta.weights_sha256:
        raise BundleError(f"bundle {d}: weights.pt does not match its recorded SHA-256 (corrupted?)")
    try:
        import io

        sd = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a damaged file
        raise BundleError(f"bundle {d}: cannot load weights: {exc}") from exc
    if not isinstance(sd, dict):
        raise BundleError(f"bundle {d}: weights.pt is not a state_dict")
    card = (d / CARD).read_text(encoding="utf-8") if (d / CARD).exists() else ""
    return Bundle(path=d, meta=meta, state_dict=sd, card=card)
