"""Typed configuration, loaded once from YAML and passed down.

Every model uses ``extra="forbid"`` so a typo in the YAML is an error, not a
silently ignored key.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from dicomnode.errors import ConfigError

AETitle = Annotated[str, Field(min_length=1, max_length=16, pattern=r"^[^\\\x00-\x1f]*[^ \\\x00-\x1f][^\\\x00-\x1f]*$")]


#: maximum PDU length announced by default (bytes); finite, so a peer cannot make the node buffer 4 GiB PDUs
DEFAULT_MAX_PDU = 1 << 20
MIN_MAX_PDU, MAX_MAX_PDU = 4096, 16 << 20


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Caller(_Strict):
    """A remote application entity allowed to open associations."""

    ae_title: AETitle
    host: str = Field(description="IP address the association must come from")


class TLSConfig(_Strict):
    """Optional DICOM TLS (PS3.15 Annex B) for the SCP or SCU."""

    cert_file: Path
    key_file: Path
    ca_file: Path | None = None
    require_client_cert: bool = False


class NodeConfig(_Strict):
    """The node's own application entity and storage."""

    ae_title: AETitle = "BONENODE"
    host: str = "127.0.0.1"
    port: int = Field(11112, ge=0, le=65535)
    storage_dir: Path = Path("./var")
    allowed_callers: list[Caller] = Field(default_factory=list)
    max_associations: int = Field(16, ge=1, le=256)
    disk_min_free_gb: float = Field(5.0, ge=0)
    max_pdu: int = Field(DEFAULT_MAX_PDU, ge=MIN_MAX_PDU, le=MAX_MAX_PDU,
                         description="maximum PDU length we receive and announce (bytes); finite")
    max_pending_connections: int = Field(64, ge=1, le=1024, description="connections not yet associated; "
                                         "more are closed at once (native receiver)")
    check_called_ae_title: bool = Field(True, description="reject associations whose called AE title is not "
                                        "ae_title (A-ASSOCIATE-RJ reason 7)")
    resend_policy: Literal["replace", "keep_first"] = Field(
        "replace", description="an instance re-sent with different content under the same SOP Instance UID "
        "replaces the stored copy and reprocesses the study, or is acknowledged and ignored")
    acse_timeout_s: float = Field(30.0, gt=0)
    dimse_timeout_s: float = Field(60.0, gt=0)
    network_timeout_s: float = Field(60.0, gt=0)
    receive_processes: int = Field(1, ge=1, le=32, description="SCP processes sharing the port (SO_REUSEPORT)")
    receiver: Literal["native", "pynetdicom"] = Field(
        "native", description="SCP implementation: the node's own upper layer with the journal, or pynetdicom's")
    journal_mb: int = Field(256, ge=0, le=65536, description="write-ahead journal per receiver process (MiB); "
                            "0 stores every instance synchronously (native receiver only)")
    workers: int = Field(1, ge=1, le=64, description="job worker threads")
    retention_days: float = Field(7.0, ge=0, description="keep spooled instances this long after processing")
    tls: TLSConfig | None = None
    status_http_port: int | None = Field(None, ge=0, le=65535)
    status_http_host: str = "127.0.0.1"

    @field_validator("max_pdu", mode="before")
    @classmethod
    def _finite_pdu(cls, value: object) -> object:
        if value == 0:
            raise ValueError(f"max_pdu 0 (unlimited) is not allowed: give a size in bytes, {MIN_MAX_PDU}.."
                             f"{MAX_MAX_PDU} (default {DEFAULT_MAX_PDU})")
        return value


class Destination(_Strict):
    """A DICOM peer results are sent to."""

    ae_title: AETitle
    host: str
    port: int = Field(ge=1, le=65535)
    calling_ae_title: AETitle | None = None
    max_retries: int = Field(50, ge=0)
    backoff_initial_s: float = Field(2.0, gt=0)
    backoff_max_s: float = Field(300.0, gt=0)
    timeout_s: float = Field(30.0, gt=0)
    tls: TLSConfig | None = None


class Match(_Strict):
    """Rules a series must satisfy; every key given must match (logical AND)."""

    modality: list[str] | None = None
    body_part: list[str] | None = None
    sop_class: list[str] | None = None
    series_description: str | None = Field(None, description="regular expression, searched case-insensitively")
    view_position: list[str] | None = None
    image_type: list[str] | None = Field(None, description="values that must all appear in ImageType")
    manufacturer: str | None = Field(None, description="regular expression on Manufacturer")
    model_name: str | None = Field(None, description="regular expression on ManufacturerModelName")
    min_age_years: float | None = Field(None, ge=0)
    max_age_years: float | None = Field(None, ge=0)
    min_slices: int | None = Field(None, ge=1)
    max_slices: int | None = Field(None, ge=1)

    @field_validator("series_description", "manufacturer", "model_name")
    @classmethod
    def _regex_compiles(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"invalid regular expression {value!r}: {exc}") from exc
        return value


class Route(_Strict):
    """Series matching ``match`` go to ``task``; results go to ``send_to``."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    task: str
    match: Match = Field(default_factory=Match)
    complete_after_s: float = Field(10.0, ge=0)
    send_to: list[str] = Field(default_factory=list)
    archive_for_training: bool = False
    model: Path | None = Field(None, description="pin a bundle directory instead of the registry's current")


class ResultsConfig(_Strict):
    """How result series are named and numbered."""

    series_number_start: int = Field(9000, ge=1)
    series_number_end: int = Field(9999, ge=1)
    institution_name: str | None = None


class TrainingArchiveConfig(_Strict):
    """Where routes with ``archive_for_training`` keep de-identified copies (see :mod:`dicomnode.archive`)."""

    dir: Path | None = Field(None, description="default: <storage_dir>/training-archive")
    key_dir: Path | None = Field(None, description="pseudonymisation key + UID map; default <storage_dir>/training-archive-keys")
    max_gb: float = Field(50.0, gt=0, description="size cap; the oldest series are evicted first")


class ActorSpec(_Strict):
    """Ray actors of one task: how many, and what each reserves on a worker machine."""

    replicas: int = Field(1, ge=1, le=64, description="actors of this task, each holding its model warm")
    num_gpus: float = Field(0.0, ge=0, le=16, description="GPUs per actor; 0.25 packs four actors on one GPU")
    num_cpus: float = Field(1.0, ge=0, le=256, description="CPUs per actor")


class ExecutionConfig(_Strict):
    """Where tasks run: in the node's worker threads (``local``) or on Ray actors (``ray``, extra [cluster])."""

    engine: Literal["local", "ray"] = "local"
    address: str | None = Field(None, description="Ray head as host:port (the GCS port, 6379 by default)")
    namespace: str = Field("dicomnode", pattern=r"^[A-Za-z0-9_.-]+$", description="Ray namespace of the actors")
    actors: dict[str, ActorSpec] = Field(default_factory=dict, description="task -> actor spec; tasks not "
                                         "listed get one replica with 1 CPU")
    retry_wait_s: float = Field(5.0, gt=0, le=300, description="pause between reconnects while the cluster "
                                "is unreachable (jobs wait, they do not fail)")
    actor_retries: int = Field(3, ge=0, le=100, description="re-runs on another actor when one dies mid-job")

    @model_validator(mode="after")
    def _ray_needs_address(self) -> ExecutionConfig:
        if self.engine == "ray" and not self.address:
            raise ValueError("execution.engine 'ray' needs execution.address (the head's host:port, "
                             "e.g. 127.0.0.1:6379)")
        if self.engine == "local" and self.actors:
            raise ValueError("execution.actors is only used with execution.engine 'ray'; remove it or set "
                             "engine: ray")
        return self


class Config(_Strict):
    """The whole node configuration."""

    node: NodeConfig = Field(default_factory=NodeConfig)
    destinations: dict[str, Destination] = Field(default_factory=dict)
    models_dir: Path = Path("./models")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    routes: list[Route] = Field(default_factory=list)
    results: ResultsConfig = Field(default_factory=ResultsConfig)
    plugins: list[str] = Field(
        default_factory=list, description="extra Python modules imported at start-up to register site tasks"
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    training_archive: TrainingArchiveConfig = Field(default_factory=TrainingArchiveConfig)
    execution: ExecutionConfig = Field(default_factory=ExecutionConfig)

    @model_validator(mode="after")
    def _consistent(self) -> Config:
        names = [r.name for r in self.routes]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"route names must be unique; repeated: {', '.join(dupes)}")
        for route in self.routes:
            for dest in route.send_to:
                if dest not in self.destinations:
                    raise ValueError(f"route {route.name!r} sends to unknown destination {dest!r}")
            m = route.match
            if m.min_age_years is not None and m.max_age_years is not None and m.min_age_years > m.max_age_years:
                raise ValueError(f"route {route.name!r}: min_age_years > max_age_years")
            if m.min_slices is not None and m.max_slices is not None and m.min_slices > m.max_slices:
                raise ValueError(f"route {route.name!r}: min_slices > max_slices")
        unrouted = sorted(set(self.execution.actors) - {r.task for r in self.routes})
        if unrouted:
            raise ValueError(f"execution.actors names task(s) no route uses: {', '.join(unrouted)}; "
                             "fix the task name or remove the entry")
        if self.results.series_number_start > self.results.series_number_end:
            raise ValueError("results.series_number_start > results.series_number_end")
        return self

    def resolve_paths(self, base: Path) -> Config:
        """Return a copy whose relative paths are resolved against ``base`` (the YAML's folder)."""

        def fix(p: Path) -> Path:
            return p if p.is_absolute() else (base / p).resolve()

        node = self.node.model_copy(update={"storage_dir": fix(self.node.storage_dir)})
        routes = [r.model_copy(update={"model": fix(r.model)}) if r.model else r for r in self.routes]
        ta = self.training_archive.model_copy(update={k: fix(v) for k, v in (
            ("dir", self.training_archive.dir), ("key_dir", self.training_archive.key_dir)) if v is not None})
        return self.model_copy(update={"node": node, "models_dir": fix(self.models_dir), "routes": routes,
                                       "training_archive": ta})


def load_config(path: str | Path) -> Config:
    """Load and validate a YAML config file; relative paths are resolved against its folder.

    Raises
    ------
    ConfigError
        If the file is missing, is not YAML, or fails validation.
    """
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"config {path} is not valid YAML: {exc}") from exc
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"config {path}: top level must be a mapping")
    try:
        cfg = Config.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"config {path} is invalid:\n{exc}") from exc
    return cfg.resolve_paths(path.parent.resolve())
