"""Shared DICOM writing for every synthetic-study generator.

What each generator needs, in one place:

* deterministic randomness: :func:`study_seed` derives a per-study seed from the
  run seed and the study index, :class:`UidSource` makes UIDs from it, so the
  same ``(seed, index)`` always gives the same pixels and UIDs whatever the
  number of workers;
* the patient / study / series / equipment modules (:func:`new_patient`,
  :func:`new_study`, :func:`new_series`, :class:`Equipment`) and
  :func:`base_dataset`, which fills them plus SOP Common and General Image;
* pixel helpers: :func:`set_pixel_data`, :func:`set_rescale`,
  :func:`set_window`, :func:`choose_photometric`, :func:`choose_bits_stored`,
  :func:`to_stored`;
* :func:`body_part_string` (canonical term, sometimes a non-English synonym);
* :func:`write_dataset` writing ``<out>/<study_uid>/<series_uid>/<sop>.dcm``
  (explicit VR little endian, file meta, atomic rename);
* the multiprocessing driver (:func:`training.synth.runner.generate_studies`) lives in
  :mod:`training.synth.runner`.

The generator interface (every ``training/synth/<task>.py``)::

    generate(out: Path, n: int, seed: int, *, workers: int = 2, difficulty: float = DEFAULT_DIFFICULTY,
             label_noise: float = 0.02) -> Path      # returns the manifest path
    preview(out_png: Path, n: int, seed: int) -> Path

A generator whose realistic difficulty was measured against a trained model gives ``generate`` its own default
(wrist_fracture); the others use this module's ``DEFAULT_DIFFICULTY``. ``synth`` without ``--difficulty`` takes
the default of the task's ``generate``.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian, generate_uid

from inference.ages import age_string
from inference.errors import DicomNodeError
from inference.fsutil import atomic_write

#: difficulty of a generator that sets none of its own (0 obvious .. 1 subtle)
DEFAULT_DIFFICULTY = 0.5

log = logging.getLogger(__name__)

__all__ = [
    "BODY_PART_SYNONYMS", "DEFAULT_DIFFICULTY", "Equipment", "Patient", "Series", "Study", "SynthError",
    "UidSource",
    "base_dataset", "body_part_string", "choose_bits_stored", "choose_photometric", "new_patient", "new_series",
    "new_study", "set_pixel_data", "set_rescale", "set_window", "study_seed",
    "to_stored", "write_dataset",
]

#: UID root of the synthetic objects (pydicom's registered root; objects are clearly synthetic)
UID_PREFIX = "1.2.826.0.1.3680043.8.498."


class SynthError(DicomNodeError):
    """A synthetic-study generator got invalid arguments or failed to write its output."""


# --- deterministic randomness ----------------------------------------------------------------------------


def study_seed(seed: int, index: int) -> int:
    """Per-study seed: a hash of (run seed, study index), independent of worker layout."""
    h = hashlib.sha256(f"bone-dicomnode-synth\x00{int(seed)}\x00{int(index)}".encode()).digest()
    return int.from_bytes(h[:8], "big") & ((1 << 63) - 1)


@dataclass(frozen=True)
class UidSource:
    """Deterministic UIDs: ``make(*parts)`` hashes the source key and the parts.

    Parameters
    ----------
    key:
        Something unique to the study, e.g. ``f"{task}:{study_seed}"``.
    """

    key: str

    def make(self, *parts: object) -> str:
        """Return a UID that depends only on ``key`` and ``parts``."""
        return str(generate_uid(prefix=UID_PREFIX, entropy_srcs=[self.key, *(str(p) for p in parts)]))


# --- patient / study / series / equipment ---------------------------------------------------------------

_FAMILY = ("MUSTERMANN", "GARCIA", "DUBOIS", "ROSSI", "SMITH", "HUBER", "MARTINEZ", "LEROY", "BIANCHI", "JONES",
           "WAGNER", "LOPEZ", "MOREAU", "RUSSO", "BROWN", "GRUBER", "FERNANDEZ", "LAMBERT", "COLOMBO", "TAYLOR",
           "NOVAK", "KOWALSKI", "JANSEN", "SILVA", "NIELSEN", "BAUER", "SANCHEZ", "FONTAINE", "RICCI", "WILSON")
_GIVEN_F = ("ANNA", "MARIA", "SOPHIE", "LUCIA", "CLAIRE", "GIULIA", "EMMA", "ELENA", "JULIA", "SARA", "LENA",
            "CARMEN", "CHLOE", "CHIARA", "OLIVIA")
_GIVEN_M = ("THOMAS", "JOSE", "PIERRE", "MARCO", "JAMES", "LUKAS", "JAVIER", "LOUIS", "LUCA", "DAVID", "FELIX",
            "PABLO", "HUGO", "MATTEO", "NOAH")

_DATE_LO = dt.date(2018, 1, 1)
_DATE_DAYS = (dt.date(2025, 12, 31) - _DATE_LO).days


@dataclass(frozen=True)
class Patient:
    """Patient module values plus the exam date the age refers to."""

    name: str
    patient_id: str
    birth_date: dt.date
    sex: str
    age_years: float
    exam_date: dt.date

    @property
    def age_string(self) -> str:
        """PatientAge as DICOM AS: ``"045Y"``, or months/weeks/days for infants."""
        return age_string(self.age_years)


def new_patient(rng: np.random.Generator, age_range_years: tuple[float, float], *,
                exam_date: dt.date | None = None, sex: str | None = None) -> Patient:
    """Draw a synthetic patient whose age at ``exam_date`` lies in ``age_range_years`` (years, inclusive).

    The exam date is drawn in 2018-2025 unless given; the birth date follows from it.
    """
    lo, hi = float(age_range_years[0]), float(age_range_years[1])
    if not 0 <= lo <= hi:
        raise SynthError(f"invalid age range {age_range_years!r}")
    exam = exam_date or (_DATE_LO + dt.timedelta(days=int(rng.integers(0, _DATE_DAYS + 1))))
    # stay strictly inside [lo, hi + 1) whole years so that the AS string is within the range
    age = float(rng.uniform(lo, hi + 0.999))
    birth = exam - dt.timedelta(days=int(age * 365.25))
    age = (exam - birth).days / 365.25
    sex = sex or str(rng.choice(["F", "M"]))
    given = _GIVEN_F if sex == "F" else _GIVEN_M
    name = f"{rng.choice(_FAMILY)}^{rng.choice(given)}"
    pid = "SYN" + "".join(rng.choice(list("0123456789ABCDEF"), size=12))
    return Patient(name=name, patient_id=pid, birth_date=birth, sex=sex, age_years=age, exam_date=exam)


@dataclass(frozen=True)
class Study:
    """General Study module values."""

    study_uid: str
    date: dt.date
    time: dt.time
    accession: str
    study_id: str
    description: str
    referring_physician: str = ""


def new_study(rng: np.random.Generator, uids: UidSource, patient: Patient, description: str) -> Study:
    """A study on the patient's exam date at a random working-hours time."""
    secs = int(rng.integers(7 * 3600, 19 * 3600))
    return Study(
        study_uid=uids.make("study"), date=patient.exam_date,
        time=dt.time(secs // 3600, (secs // 60) % 60, secs % 60),
        accession="A" + "".join(rng.choice(list("0123456789"), size=9)),
        study_id=str(int(rng.integers(1, 99999))), description=description,
        referring_physician=str(rng.choice(["", "DR^HOUSE", "WELBY^MARCUS", "MEDICO^ANA"])),
    )


@dataclass(frozen=True)
class Series:
    """General Series module values (modality, body part, laterality, numbering)."""

    series_uid: str
    number: int
    modality: str
    body_part: str
    description: str = ""
    laterality: str = ""  # "L"/"R" or "" (series laterality; DX images also carry ImageLaterality)
    protocol: str = ""


def new_series(uids: UidSource, number: int, modality: str, body_part: str, *, description: str = "",
               laterality: str = "", protocol: str = "") -> Series:
    """A series with a deterministic UID derived from its number."""
    return Series(series_uid=uids.make("series", number), number=number, modality=modality, body_part=body_part,
                  description=description, laterality=laterality, protocol=protocol)


@dataclass(frozen=True)
class Equipment:
    """General Equipment module values."""

    manufacturer: str
    model: str
    station: str = "SYNTH01"
    serial: str = "0001"
    software: str = "bone-dicomnode synth 1"
    institution: str = "SYNTHETIC HOSPITAL"
    extra: dict[str, Any] = field(default_factory=dict, compare=False)


# --- body parts ------------------------------------------------------------------------------------------

#: canonical -> non-English/abbreviated synonyms a modality might write (all valid CS values)
BODY_PART_SYNONYMS: dict[str, tuple[str, ...]] = {
    "WRIST": ("HANDGELENK", "MUNECA", "POIGNET", "POLSO"),
    "HAND": ("MANO", "MAIN"),
    "FOREARM": ("UNTERARM", "ANTEBRAZO"),
    "ELBOW": ("ELLENBOGEN", "CODO"),
    "ANKLE": ("SPRUNGGELENK", "TOBILLO"),
    "LEG": ("UNTERSCHENKEL", "PIERNA"),
    "LSPINE": ("LWS", "LUMBAR SPINE", "COLUMNA LUMBAR"),
    "SPINE": ("WIRBELSAULE",),
    "ABDOMEN": ("BAUCH",),
    "KNEE": ("KNIE", "RODILLA", "GENOU"),
    "RADIUS": ("SPEICHE",),
    "TIBIA": ("SCHIENBEIN",),
}


def body_part_string(rng: np.random.Generator, canonical: str, synonym_rate: float = 0.25) -> str:
    """BodyPartExamined for ``canonical``: with probability ``synonym_rate`` a non-English synonym."""
    syn = BODY_PART_SYNONYMS.get(canonical, ())
    if syn and rng.random() < synonym_rate:
        return str(rng.choice(syn))
    return canonical


# --- datasets --------------------------------------------------------------------------------------------


def _da(d: dt.date) -> str:
    return d.strftime("%Y%m%d")


def _tm(t: dt.time) -> str:
    return t.strftime("%H%M%S")


def _file_dataset(sop_class_uid: str, sop_instance_uid: str) -> FileDataset:
    """An empty dataset with its file meta (Explicit VR Little Endian) and a blank preamble."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class_uid
    meta.MediaStorageSOPInstanceUID = sop_instance_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = "BONEDICOMNODE1"
    return FileDataset("", Dataset(), file_meta=meta, preamble=b"\x00" * 128)


def _set_patient_study(ds: Dataset, patient: Patient, study: Study) -> None:
    """Fill the Patient, General Study and Patient Study modules."""
    # Patient
    ds.PatientName = patient.name
    ds.PatientID = patient.patient_id
    ds.IssuerOfPatientID = "SYNTH"
    ds.PatientBirthDate = _da(patient.birth_date)
    ds.PatientSex = patient.sex
    ds.PatientIdentityRemoved = "NO"
    # General Study / Patient Study
    ds.StudyInstanceUID = study.study_uid
    ds.StudyDate = _da(study.date)
    ds.StudyTime = _tm(study.time)
    ds.ReferringPhysicianName = study.referring_physician
    ds.StudyID = study.study_id
    ds.AccessionNumber = study.accession
    ds.StudyDescription = study.description
    ds.PatientAge = patient.age_string


def _set_series_equipment(ds: Dataset, study: Study, series: Series, equipment: Equipment,
                          image_laterality: bool) -> None:
    """Fill the General Series and General Equipment modules (series Laterality as :func:`base_dataset` says)."""
    # General Series
    ds.Modality = series.modality
    ds.SeriesInstanceUID = series.series_uid
    ds.SeriesNumber = series.number
    ds.SeriesDate = _da(study.date)
    ds.SeriesTime = _tm(study.time)
    if series.description:
        ds.SeriesDescription = series.description
    if series.protocol:
        ds.ProtocolName = series.protocol
    ds.BodyPartExamined = series.body_part
    if series.laterality and not image_laterality:
        ds.Laterality = series.laterality
    elif series.body_part not in BODY_PART_SYNONYMS and not image_laterality:
        # Type 2C, required for paired parts: whether a non-English term is paired is unknown to a reader,
        # so the attribute is present and empty (as scanners send it) rather than absent
        ds.Laterality = ""
    # General Equipment
    ds.Manufacturer = equipment.manufacturer
    ds.ManufacturerModelName = equipment.model
    ds.InstitutionName = equipment.institution
    ds.StationName = equipment.station
    ds.DeviceSerialNumber = equipment.serial
    ds.SoftwareVersions = equipment.software


def base_dataset(sop_class_uid: str, patient: Patient, study: Study, series: Series, equipment: Equipment, *,
                 sop_instance_uid: str, instance_number: int = 1,
                 content_time: dt.time | None = None, image_laterality: bool = False) -> FileDataset:
    """A dataset with file meta and the Patient, General Study, Patient Study, General Series,
    General Equipment, General Image (numbering, dates) and SOP Common modules filled.

    The caller adds the modality-specific modules and the pixel data. ``image_laterality``:
    the caller writes ImageLaterality (DX), so series Laterality (Type 2C) stays absent.
    """
    ds = _file_dataset(sop_class_uid, sop_instance_uid)
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = sop_class_uid
    ds.SOPInstanceUID = sop_instance_uid
    ds.InstanceCreationDate = _da(study.date)
    ds.InstanceCreationTime = _tm(study.time)
    _set_patient_study(ds, patient, study)
    _set_series_equipment(ds, study, series, equipment, image_laterality)
    # General Image
    ds.InstanceNumber = instance_number
    ds.ContentDate = _da(study.date)
    ds.ContentTime = _tm(content_time or study.time)
    ds.AcquisitionDate = _da(study.date)
    ds.AcquisitionTime = _tm(content_time or study.time)
    return ds


# --- pixels ----------------------------------------------------------------------------------------------


def standard_normal32(rng: np.random.Generator, shape: int | tuple[int, ...]) -> np.ndarray:
    """Standard normal float32 samples by the Box-Muller transform, deterministic from ``rng``.

    About 1.6x faster than ``Generator.standard_normal(dtype=float32)`` for
    image-sized arrays (the ziggurat's per-sample branches dominate there).
    Each pair of 24-bit uniforms ``u1`` in (0, 1) and ``u2`` gives
    ``sqrt(-2 ln u1) * (cos 2 pi u2, sin 2 pi u2)``; the smallest ``u1``,
    2**-25, bounds the samples at about 5.9 standard deviations.
    """
    dims = (int(shape),) if np.isscalar(shape) else tuple(int(d) for d in shape)  # type: ignore[arg-type]
    n = int(np.prod(dims, dtype=np.int64))
    half = (n + 1) // 2
    words = rng.bit_generator.random_raw(half).view(np.uint32)  # 2 * half independent 32-bit words
    np.right_shift(words, 8, out=words)
    u = words.astype(np.float32)  # exact: 24-bit integers
    u *= np.float32(2.0**-24)
    u += np.float32(2.0**-25)  # midpoints of the 2**24 bins: never 0 or 1
    radius, angle = u[:half], u[half:]
    np.log(radius, out=radius)
    radius *= np.float32(-2.0)
    np.sqrt(radius, out=radius)
    angle *= np.float32(2.0 * np.pi)
    out = np.empty(2 * half, np.float32)
    np.cos(angle, out=out[:half])
    np.sin(angle, out=out[half:])
    out[:half] *= radius
    out[half:] *= radius
    return out[:n].reshape(dims)


def choose_photometric(rng: np.random.Generator, p_monochrome1: float = 0.3) -> str:
    """``"MONOCHROME1"`` with probability ``p_monochrome1``, else ``"MONOCHROME2"``."""
    return "MONOCHROME1" if rng.random() < p_monochrome1 else "MONOCHROME2"


def choose_bits_stored(rng: np.random.Generator, options: Sequence[int] = (12, 14, 16)) -> int:
    """One of ``options`` (BitsStored of a detector)."""
    return int(rng.choice(list(options)))


def to_stored(values: np.ndarray, bits_stored: int, *, invert: bool = False, lo: float | None = None,
              hi: float | None = None) -> np.ndarray:
    """Map float ``values`` linearly from ``[lo, hi]`` (default: their range) onto ``0 .. 2**bits - 1``.

    ``invert=True`` writes the MONOCHROME1 convention (high signal -> low value).
    Returns ``uint16``.
    """
    v = np.asarray(values, dtype=np.float32)  # exact for every 16-bit level, half the memory traffic
    lo = float(v.min()) if lo is None else float(lo)
    hi = float(v.max()) if hi is None else float(hi)
    top = (1 << int(bits_stored)) - 1
    gain = top / max(hi - lo, 1e-12)
    scaled = v - np.float32(lo)
    scaled *= np.float32(-gain if invert else gain)
    if invert:
        scaled += np.float32(top)
    np.rint(scaled, out=scaled)
    np.clip(scaled, 0, top, out=scaled)
    return scaled.astype(np.uint16)


def set_pixel_data(ds: Dataset, pixels: np.ndarray, *, bits_stored: int, photometric: str = "MONOCHROME2",
                   signed: bool = False) -> None:
    """Write the Image Pixel module for a greyscale 2D (rows, cols) or multi-frame (frames, rows, cols) array.

    Values must already fit ``bits_stored`` (see :func:`to_stored`); ``BitsAllocated`` is 16.
    """
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise SynthError(f"unsupported PhotometricInterpretation {photometric!r}")
    if not 8 <= bits_stored <= 16:
        raise SynthError(f"BitsStored must be 8..16, got {bits_stored}")
    arr = np.asarray(pixels)
    if arr.ndim not in (2, 3):
        raise SynthError(f"pixel array must be 2D or 3D, got shape {arr.shape}")
    lo, hi = (-(1 << (bits_stored - 1)), (1 << (bits_stored - 1)) - 1) if signed else (0, (1 << bits_stored) - 1)
    if arr.size and (int(arr.min()) < lo or int(arr.max()) > hi):
        raise SynthError(f"pixel values {int(arr.min())}..{int(arr.max())} do not fit BitsStored {bits_stored}")
    arr = arr.astype("<i2" if signed else "<u2", copy=False)
    if arr.ndim == 3:
        ds.NumberOfFrames = arr.shape[0]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.Rows, ds.Columns = int(arr.shape[-2]), int(arr.shape[-1])
    ds.BitsAllocated = 16
    ds.BitsStored = int(bits_stored)
    ds.HighBit = int(bits_stored) - 1
    ds.PixelRepresentation = 1 if signed else 0
    ds.PixelData = np.ascontiguousarray(arr).tobytes()


def set_rescale(ds: Dataset, slope: float = 1.0, intercept: float = 0.0, rescale_type: str | None = None) -> None:
    """Modality LUT as RescaleSlope/Intercept (and RescaleType, e.g. "HU" or "US", when given)."""
    ds.RescaleIntercept = f"{intercept:.6g}"
    ds.RescaleSlope = f"{slope:.6g}"
    if rescale_type:
        ds.RescaleType = rescale_type


def set_window(ds: Dataset, center: float | Sequence[float], width: float | Sequence[float],
               explanation: str | Sequence[str] | None = None) -> None:
    """VOI LUT window(s): WindowCenter/WindowWidth (multi-valued when sequences are given)."""
    def fmt(v: float | Sequence[float]) -> str | list[str]:
        if isinstance(v, Iterable):
            return [f"{float(x):.6g}" for x in v]
        return f"{float(v):.6g}"
    ds.WindowCenter = fmt(center)
    ds.WindowWidth = fmt(width)
    if explanation is not None:
        ds.WindowCenterWidthExplanation = explanation if isinstance(explanation, str) else list(explanation)


# --- writing ---------------------------------------------------------------------------------------------


def instance_path(out_root: Path, study_uid: str, series_uid: str, sop_instance_uid: str) -> Path:
    """``<out_root>/<study_uid>/<series_uid>/<sop_instance_uid>.dcm``, its folder created."""
    folder = Path(out_root) / study_uid / series_uid
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"{sop_instance_uid}.dcm"


def write_atomic(path: Path, write: Callable[[BinaryIO], None]) -> Path:
    """Have ``write`` fill a temporary file beside ``path``, then rename it into place; returns ``path``.

    Not fsynced (:func:`inference.fsutil.atomic_write` with ``durable=False``): a synthetic set is made again
    in minutes, and a sync per file would dominate generating thousands of files.
    """
    return atomic_write(path, write, durable=False)


def write_dataset(ds: FileDataset, out_root: Path, study_uid: str | None = None,
                  series_uid: str | None = None) -> Path:
    """Write ``ds`` to ``<out_root>/<study_uid>/<series_uid>/<SOPInstanceUID>.dcm`` atomically.

    The UIDs default to the dataset's own. Returns the file path.
    """
    path = instance_path(out_root, study_uid or str(ds.StudyInstanceUID), series_uid or str(ds.SeriesInstanceUID),
                         str(ds.SOPInstanceUID))
    return write_atomic(path, lambda fh: ds.save_as(fh, enforce_file_format=True))
