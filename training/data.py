"""Training data: labelled DICOM folders -> records -> patient-level splits -> cached torch datasets.

* A :class:`Record` is one labelled unit of the manifest (a study, or one SOP
  instance) with its DICOM files and its manifest row.
* :func:`split_records` assigns every *patient* to train / val / holdout by a
  salted hash of the patient ID. The assignment depends on nothing else, so the
  hold-out set is locked: adding data never moves a patient into or out of it.
  Its hash goes into the bundle so evaluation can prove it used the same set.
* :class:`SampleCache` stores pre-processed samples on disk keyed by the content
  hash of the record plus the adapter's pre-processing signature.
* :class:`RecordDataset` flattens records into samples (one record may give
  several, e.g. slices or anatomic parts) for a torch ``DataLoader``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import zipfile
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from inference.bundle import hash_strings
from inference.errors import DicomNodeError
from inference.fsutil import atomic_write, walk_files
from training.file_index import FILE_INDEX_NAME, DicomUids, FileIndex, dicom_uids, file_digest

log = logging.getLogger(__name__)

SplitName = Literal["train", "val", "holdout"]
Sample = dict[str, Any]
Preprocess = Callable[["Record"], list[Sample]]

__all__ = [
    "DataError", "Record", "RecordDataset", "SampleCache", "Split", "SplitConfig", "assign_split", "index_dicom",
    "load_records", "process_pool", "record_hash", "records_from_rows", "split_records",
]


class DataError(DicomNodeError):
    """Training data is missing, inconsistent or unreadable."""


@dataclass(frozen=True)
class Record:
    """One labelled unit: a study (``level == "study"``) or a single SOP instance."""

    key: str
    patient_id: str
    study_uid: str
    files: tuple[Path, ...]
    row: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)
    level: Literal["study", "instance"] = "study"
    root: Path | None = None

    def resolve(self, rel: str | os.PathLike[str]) -> Path:
        """A path from the manifest (mask, SEG file) resolved against the data folder."""
        p = Path(rel)
        return p if p.is_absolute() or self.root is None else self.root / p


def index_dicom(root: str | os.PathLike[str], index: FileIndex | None = None
                ) -> dict[str, list[tuple[Path, DicomUids]]]:
    """Map StudyInstanceUID and SOPInstanceUID -> [(file, its identifiers)] for every DICOM file under ``root``.

    ``index`` remembers each file's identifiers across processes (:mod:`training.file_index`).
    """
    found: dict[str, list[tuple[Path, DicomUids]]] = {}
    for f in walk_files(root):
        if f.suffix.lower() in {".json", ".jsonl", ".csv", ".md", ".nii", ".gz", ".mha", ".png"}:
            continue
        try:
            uids = dicom_uids(f, index)
        except OSError:
            continue
        if uids is None:
            continue
        for uid in (uids.study_uid, uids.sop_uid):
            if uid:
                found.setdefault(uid, []).append((f, uids))
    return found


def records_from_rows(rows: Iterable[dict[str, Any]], root: str | os.PathLike[str],
                      index: FileIndex | None = None,
                      on_error: Callable[[int, dict[str, Any], str], None] | None = None) -> list[Record]:
    """Join manifest rows with the DICOM files under ``root`` (their identifiers via ``index`` when given).

    A row keyed by ``sop_instance_uid`` becomes an instance record (one file);
    one keyed by ``study_uid`` takes every file of that study. The patient comes
    from the row's ``patient_id`` or else the files' PatientID. With ``on_error``,
    a row that cannot be joined is passed to ``on_error(row number, row, reason)``
    and left out instead of raising (a site validation lists it).

    Raises
    ------
    DataError
        If a row has no key, or no DICOM file matches it.
    """
    root = Path(root)
    by_uid = index_dicom(root, index)
    records: list[Record] = []
    for i, row in enumerate(rows):
        sop = row.get("sop_instance_uid")
        study = row.get("study_uid") or row.get("study_instance_uid")
        key = str(sop or study or "")
        hits = by_uid.get(key) if key else None
        header = hits[0][1] if hits else None
        patient = str(row.get("patient_id") or header.patient_id) if header is not None else ""
        problem = ("has neither sop_instance_uid nor study_uid" if not key
                   else f"no DICOM file under {root} has UID {key}" if not hits
                   else "no patient ID (row or PatientID)" if not patient else None)
        if problem is not None:
            if on_error is None:
                raise DataError(f"manifest row {i}{':' if key else ''} {problem}")
            on_error(i, dict(row), problem)
            continue
        assert hits is not None and header is not None
        files = tuple(sorted({f for f, _ in hits}))
        records.append(Record(
            key=key, patient_id=patient, study_uid=str(study or header.study_uid), files=files,
            row=dict(row), level="instance" if sop else "study", root=root,
        ))
    keys = [r.key for r in records]
    if len(set(keys)) != len(keys):
        raise DataError("manifest has duplicate keys")
    return records


def load_records(root: str | os.PathLike[str], index: FileIndex | None = None) -> list[Record]:
    """Read ``labels.jsonl``/``labels.csv`` under ``root`` and join it with the DICOM files there."""
    from training.synth.manifest import read_manifest

    return records_from_rows(read_manifest(Path(root)), root, index)


# --- splits --------------------------------------------------------------------------------------------


class SplitConfig(BaseModel):
    """Fractions of *patients* per split and the salt of the locking hash."""

    model_config = ConfigDict(extra="forbid")

    train: float = Field(0.7, ge=0, le=1)
    val: float = Field(0.15, ge=0, le=1)
    holdout: float = Field(0.15, ge=0, le=1)
    salt: str = "bone-dicomnode-split-v1"

    @model_validator(mode="after")
    def _sums_to_one(self) -> SplitConfig:
        if abs(self.train + self.val + self.holdout - 1.0) > 1e-6:
            raise ValueError("split fractions must sum to 1")
        return self


def assign_split(patient_id: str, cfg: SplitConfig) -> SplitName:
    """Split of one patient: a function of (salt, patient ID) only."""
    h = hashlib.sha256(f"{cfg.salt}\x00{patient_id}".encode()).digest()
    u = int.from_bytes(h[:8], "big") / 2**64
    if u < cfg.holdout:
        return "holdout"
    if u < cfg.holdout + cfg.val:
        return "val"
    return "train"


@dataclass
class Split:
    """Records per split, with the hashes recorded in a bundle."""

    train: list[Record]
    val: list[Record]
    holdout: list[Record]
    config: SplitConfig

    @property
    def holdout_hash(self) -> str:
        """Hash of the hold-out set's (patient, key) pairs."""
        return hash_strings(f"{r.patient_id}\x00{r.key}" for r in self.holdout)

    def summary(self) -> dict[str, Any]:
        """Counts and config, for ``bundle.json``."""
        return {
            "config": self.config.model_dump(),
            "records": {"train": len(self.train), "val": len(self.val), "holdout": len(self.holdout)},
            "patients": {n: len({r.patient_id for r in getattr(self, n)}) for n in ("train", "val", "holdout")},
        }


def _rank_key(patient_id: str, cfg: SplitConfig) -> str:
    return hashlib.sha256(f"{cfg.salt}\x00{patient_id}".encode()).hexdigest()


def _split_hints(records: Sequence[Record]) -> dict[str, str]:
    """Patient -> split from the manifest's ``split_hint`` (a site's own locked hold-out).

    Raises
    ------
    DataError
        If the rows of one patient name different splits.
    """
    hints: dict[str, str] = {}
    for r in records:
        hint = r.row.get("split_hint")
        if hint is None:
            continue
        if hint not in ("train", "val", "holdout"):
            raise DataError(f"record {r.key}: split_hint must be train, val or holdout, got {hint!r}")
        if hints.setdefault(r.patient_id, hint) != hint:
            raise DataError(f"patient of record {r.key} has rows in different split_hint splits")
    return hints


def split_records(records: Sequence[Record], cfg: SplitConfig | None = None) -> Split:
    """Patient-level split by :func:`assign_split`; a row's ``split_hint`` overrides it for its patient.

    Tiny data sets (where the hash leaves a split with a nonzero fraction empty)
    fall back to ranking the patients by the same hash and cutting by the
    fractions, with at least one patient per split. That is deterministic too,
    but adding patients may then move some; a warning says so.
    """
    cfg = cfg or SplitConfig()
    patients = sorted({r.patient_id for r in records})
    assign: dict[str, str] = {p: assign_split(p, cfg) for p in patients}
    wanted = [n for n in ("holdout", "val", "train") if getattr(cfg, n) > 0]
    if len(patients) >= len(wanted) and not set(wanted) <= set(assign.values()):
        log.warning("only %d patients: split by hash rank; the hold-out set is not locked against new data",
                    len(patients))
        ranked = sorted(patients, key=lambda p: _rank_key(p, cfg))
        n = len(ranked)
        counts = {name: max(1, round(getattr(cfg, name) * n)) for name in wanted}
        while sum(counts.values()) > n:  # shrink the largest split that can give one up
            big = max((k for k in counts if counts[k] > 1), key=lambda k: counts[k])
            counts[big] -= 1
        counts[wanted[-1]] += n - sum(counts.values())
        start = 0
        for name in wanted:
            for p in ranked[start:start + counts[name]]:
                assign[p] = name
            start += counts[name]
    hints = _split_hints(records)
    for patient, hint in hints.items():
        assign[patient] = hint
    parts: dict[str, list[Record]] = {"train": [], "val": [], "holdout": []}
    for r in records:
        parts[assign[r.patient_id]].append(r)
    return Split(train=parts["train"], val=parts["val"], holdout=parts["holdout"], config=cfg)


# --- hashing and cache ---------------------------------------------------------------------------------


def record_hash(record: Record, index: FileIndex | None = None) -> str:
    """Content hash of a record: its DICOM file bytes, its manifest row and referenced mask files.

    ``index`` remembers the file digests across processes (:mod:`training.file_index`).
    """
    h = hashlib.sha256()
    for f in record.files:
        h.update(file_digest(f, index).encode())
    h.update(json.dumps(record.row, sort_keys=True, default=str).encode())
    for k in ("mask", "masks", "seg"):
        v = record.row.get(k)
        for rel in (v.values() if isinstance(v, dict) else [v] if isinstance(v, str) else []):
            p = record.resolve(rel)
            if p.is_file():
                h.update(file_digest(p, index).encode())
    return h.hexdigest()


def data_hash(records: Iterable[Record], index: FileIndex | None = None) -> str:
    """Hash of the content of a set of records (training-data hash in the bundle)."""
    return hash_strings(record_hash(r, index) for r in records)


class SampleCache:
    """Pre-processed samples on disk, one ``.npz`` per (record content, pre-processing signature)."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        #: digests and identifiers of the data files, so that a later process need not read every file again
        self.file_index = FileIndex(self.root / FILE_INDEX_NAME)

    def key(self, record: Record, signature: str) -> str:
        """Cache key of ``record`` under a pre-processing ``signature``."""
        return hashlib.sha256(f"{record_hash(record, self.file_index)}\x00{signature}".encode()).hexdigest()

    def _path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.npz"

    def get(self, key: str, fields: Sequence[str] | None = None) -> list[Sample] | None:
        """The cached samples (only ``fields`` when given), or None (also for a damaged file, which is removed).

        ``fields=()`` gives empty samples: their count, without reading any array.
        """
        return self._read(key, None, fields)

    def get_one(self, key: str, index: int, fields: Sequence[str] | None = None) -> Sample | None:
        """Sample ``index`` of an entry (only ``fields`` when given), reading only its members; None if absent.

        A shuffled loader reads one sample of a record at a time: reading the whole entry for it costs
        as many image reads as the record has samples (a knee volume: ~35).
        """
        return self._read(key, index, fields)

    def _read(self, key: str, index: int | None, fields: Sequence[str] | None) -> Any:
        p = self._path(key)
        if not p.exists():
            return None
        try:
            with np.load(p, allow_pickle=False) as z:
                if index is None:
                    samples: list[Sample] = [{} for _ in range(int(z["__n__"]))]
                    for name in z.files:
                        if name != "__n__":
                            idx, field_name = name.split("__", 1)
                            if fields is None or field_name in fields:
                                samples[int(idx)][field_name] = _unbox(z[name])
                    return samples
                prefix = f"{index}__"
                names = [n for n in z.files if n.startswith(prefix)]
                if not names:
                    raise KeyError(f"no sample {index}")
                return {n[len(prefix):]: _unbox(z[n]) for n in names
                        if fields is None or n[len(prefix):] in fields}
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
            log.warning("dropping damaged cache entry %s: %s", p, exc)
            p.unlink(missing_ok=True)
            return None

    def put(self, key: str, samples: list[Sample]) -> None:
        """Store samples atomically (values must be numpy arrays or numbers)."""
        p = self._path(key)
        p.parent.mkdir(parents=True, exist_ok=True)
        arrays = {f"{i}__{k}": np.asarray(v) for i, s in enumerate(samples) for k, v in s.items()}
        arrays["__n__"] = np.asarray(len(samples))
        atomic_write(p, lambda f: np.savez(f, **arrays))


def _unbox(arr: np.ndarray) -> Any:
    return arr.item() if arr.ndim == 0 else arr


def _single_threaded_torch() -> None:
    torch.set_num_threads(1)


def process_pool(workers: int) -> ProcessPoolExecutor:
    """Forked pre-processing processes that are safe after torch has run in this process.

    A forked child inherits the parent's OpenMP thread-pool state; its first parallel torch kernel (e.g. the
    ``grid_sample`` of the radiograph warp) then waits forever for threads that do not exist. That hung a wrist
    run at its first validation, after one epoch of training. One torch thread per child never enters a parallel
    region (as torch's own DataLoader workers do); the pool runs ``workers`` children in parallel anyway.
    """
    return ProcessPoolExecutor(max_workers=workers, initializer=_single_threaded_torch)


def _prep_one(args: tuple[Preprocess, Record, SampleCache | None, str]) -> tuple[str, int, list[Sample] | None]:
    """(cache key or "", sample count, the samples when there is no cache) of one record."""
    fn, record, cache, signature = args
    if cache is None:
        samples = fn(record)
        return "", len(samples), samples
    key = cache.key(record, signature)
    hit = cache.get(key, fields=())  # the count only, without reading an array
    if hit is not None:
        return key, len(hit), None
    samples = fn(record)
    cache.put(key, samples)
    return key, len(samples), None


def _to_tensor(v: Any) -> Any:
    if isinstance(v, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(v))
    if isinstance(v, (bool, int, float, np.integer, np.floating)):
        return torch.as_tensor(v)
    return v


class RecordDataset(torch.utils.data.Dataset):
    """Samples of a list of records, pre-processed once (in worker processes) and cached.

    Parameters
    ----------
    records:
        The records of one split.
    preprocess:
        The adapter's picklable ``record -> list of samples`` (dicts of numpy arrays/numbers).
    signature:
        Identifies the pre-processing and its parameters; part of the cache key.
    cache:
        On-disk cache, or None to keep samples in memory.
    transform:
        Optional augmentation applied to each sample (as tensors) at load time.
    workers:
        Processes for the initial pre-processing pass (0: in this process).

    Each item gets ``record_index`` so evaluation can aggregate per study.
    """

    def __init__(self, records: Sequence[Record], preprocess: Preprocess, signature: str, *,
                 cache: SampleCache | None = None, transform: Callable[[Sample], Sample] | None = None,
                 workers: int = 0) -> None:
        self.records = list(records)
        self.preprocess = preprocess
        self.signature = signature
        self.cache = cache
        self.transform = transform
        self._memory: dict[int, list[Sample]] = {}
        jobs = [(preprocess, r, cache, signature) for r in self.records]
        from training.progress import track

        desc = "pre-processing"
        if workers > 0 and len(jobs) > 1:
            with process_pool(workers) as pool:
                results = list(track(pool.map(_prep_one, jobs, chunksize=max(1, len(jobs) // (4 * workers))),
                                     len(jobs), desc, "records", logger=log))
        else:
            results = [_prep_one(j) for j in track(jobs, len(jobs), desc, "records", logger=log)]
        # keys are kept: a key hashes every file of the record (its digest is remembered per process only)
        self._keys = [key for key, _, _ in results]
        self.index: list[tuple[int, int]] = []
        for ri, (_, n, samples) in enumerate(results):
            if samples is not None:
                self._memory[ri] = samples
            self.index.extend((ri, j) for j in range(n))
        self._last: tuple[int, list[Sample]] | None = None
        self._prev = (-1, -1)

    def __len__(self) -> int:
        return len(self.index)

    def _held(self, ri: int) -> list[Sample] | None:
        """Record ``ri``'s samples when already in memory (kept in RAM, or the last record read), else None."""
        if ri in self._memory:
            return self._memory[ri]
        if self._last is not None and self._last[0] == ri:
            return self._last[1]
        return None

    def _record_samples(self, ri: int) -> list[Sample]:
        held = self._held(ri)
        if held is not None:
            return held
        assert self.cache is not None
        samples = self.cache.get(self._keys[ri])
        if samples is None:
            samples = self.preprocess(self.records[ri])
            self.cache.put(self._keys[ri], samples)
        self._last = (ri, samples)
        return samples

    def raw(self, i: int) -> Sample:
        """Sample ``i`` as stored (numpy), without transform.

        A record's samples requested one after the other (evaluation) are read as one entry; a sample
        on its own (shuffled training) is read alone.
        """
        ri, j = self.index[i]
        sequential, self._prev = self._prev == (ri, j - 1), (ri, j)
        if not sequential and self._held(ri) is None:
            assert self.cache is not None
            hit = self.cache.get_one(self._keys[ri], j)
            if hit is not None:
                return hit
        return self._record_samples(ri)[j]  # also an entry gone since start-up: pre-process again

    def __getitem__(self, i: int) -> Sample:
        ri, _ = self.index[i]
        sample = {k: _to_tensor(v) for k, v in self.raw(i).items()}
        sample["record_index"] = torch.as_tensor(ri)
        return self.transform(sample) if self.transform is not None else sample

    def labels(self, field_name: str = "label") -> list[int]:
        """Integer class of every sample (for balanced sampling); reads only that field from the cache."""
        out: list[int] = []
        for ri in range(len(self.records)):
            stored = None
            if self._held(ri) is None and self.cache is not None:
                stored = self.cache.get(self._keys[ri], (field_name,))
            samples = stored if stored is not None else self._record_samples(ri)
            out.extend(int(np.asarray(s[field_name]).ravel()[0]) for s in samples)
        return out
