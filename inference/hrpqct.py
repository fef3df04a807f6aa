"""HR-pQCT pre-processing for ``hrpqct_motion`` (Walle et al., Bone 2023: a CNN on 8 slices per scan).

Recorded choices (bundles store them through :func:`input_spec`):

* **Slice rule** - :func:`select_slices`: split the stack (sorted along the
  normal) into 8 equal segments and take the slice at each segment's centre,
  ``floor((i + 0.5) * n / 8)`` for ``i = 0..7``. XtremeCT (110 slices) gives
  6, 20, 34, 48, 61, 75, 89, 103; XtremeCT II (168 slices) gives
  10, 31, 52, 73, 94, 115, 136, 157. The ends, where the stack's first and last
  slices may be partial, are avoided by construction.
* **Size** - each slice is resized to 256 x 256 (:data:`SLICE_SIZE`) with
  pixel-edge alignment and Gaussian anti-aliasing (slices are square; a
  non-square slice is stretched, which is recorded in :func:`input_spec`).
* **Units** - density units from the Modality LUT (HU or mg HA/cm3, whatever
  the scanner's rescale gives), clipped to a fixed range and z-scored with
  constants (:class:`DensityNorm`) that the trainer fits on training scans and
  the bundle stores.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import asdict, dataclass

import numpy as np
from scipy import ndimage

from inference.errors import InvalidDatasetError

log = logging.getLogger(__name__)

N_SLICES = 8
SLICE_SIZE = 256


def select_slices(n: int, count: int = N_SLICES) -> list[int]:
    """Indices of ``count`` equally spaced slices: the centres of ``count`` equal segments of ``n`` slices.

    Raises
    ------
    InvalidDatasetError
        If the stack has fewer than ``count`` slices.
    """
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    if n < count:
        raise InvalidDatasetError(f"an HR-pQCT stack needs at least {count} slices, got {n}")
    return [int(np.floor((i + 0.5) * n / count)) for i in range(count)]


def resize_slice(image: np.ndarray, size: int = SLICE_SIZE) -> np.ndarray:
    """Resize one slice to ``size`` x ``size`` (bilinear, pixel edges aligned, anti-aliased when shrinking)."""
    img = np.asarray(image, dtype=np.float32)
    if img.ndim != 2:
        raise ValueError(f"expected a 2-D slice, got shape {img.shape}")
    factors = (size / img.shape[0], size / img.shape[1])
    sigma = [max(0.0, (1.0 / f - 1.0) / 2.0) for f in factors]
    if any(s > 0 for s in sigma):
        img = ndimage.gaussian_filter(img, sigma=sigma, mode="nearest")
    out = ndimage.zoom(img, factors, order=1, grid_mode=True, mode="grid-constant", cval=float(img.min()))
    if out.shape != (size, size):  # zoom rounds the output shape; guard against off-by-one
        out = out[:size, :size]
        out = np.pad(out, ((0, size - out.shape[0]), (0, size - out.shape[1])), mode="edge")
    return out.astype(np.float32)


@dataclass(frozen=True)
class DensityNorm:
    """Clip density values to [low, high], then z-score with (mean, std). Stored in the bundle."""

    low: float = -500.0
    high: float = 2500.0
    mean: float = 400.0
    std: float = 600.0

    def __post_init__(self) -> None:
        if not self.high > self.low:
            raise ValueError(f"density clip range must have high > low, got {self.low}..{self.high}")
        if not self.std > 0:
            raise ValueError(f"std must be > 0, got {self.std}")

    def apply(self, values: np.ndarray) -> np.ndarray:
        """Normalised float32 copy of ``values``."""
        v = np.clip(np.asarray(values, dtype=np.float32), self.low, self.high)
        return ((v - self.mean) / self.std).astype(np.float32)

    def to_dict(self) -> dict[str, float]:
        """Plain dict for bundle.json."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, float]) -> DensityNorm:
        """Inverse of :meth:`to_dict`."""
        return cls(**{k: float(data[k]) for k in ("low", "high", "mean", "std")})

    @classmethod
    def fit(cls, stacks: Iterable[np.ndarray], low: float = -500.0, high: float = 2500.0) -> DensityNorm:
        """Mean and std of the clipped values of training stacks (each already the 8 resized slices)."""
        total = 0.0
        total_sq = 0.0
        count = 0
        for s in stacks:
            v = np.clip(np.asarray(s, dtype=np.float64), low, high)
            total += float(v.sum())
            total_sq += float((v * v).sum())
            count += v.size
        if count == 0:
            raise ValueError("cannot fit a density normalisation on no data")
        mean = total / count
        std = float(np.sqrt(max(total_sq / count - mean * mean, 0.0))) or 1.0
        return cls(low, high, mean, std)


def prepare_stack(volume: np.ndarray, norm: DensityNorm | None = None, *, count: int = N_SLICES,
                  size: int = SLICE_SIZE) -> tuple[np.ndarray, list[int]]:
    """The model input of one scan: ``count`` selected slices resized and normalised.

    Parameters
    ----------
    volume:
        (slices, rows, cols) density values (from the Modality LUT), sorted along
        the stack normal (:func:`inference.series.load_series` does this).
    norm:
        Normalisation constants; None returns the resized density values unnormalised.

    Returns
    -------
    (numpy.ndarray, list[int])
        float32 array (count, size, size) and the source slice indices used.
    """
    vol = np.asarray(volume)
    if vol.ndim != 3:
        raise ValueError(f"expected a (slices, rows, cols) volume, got shape {vol.shape}")
    idx = select_slices(vol.shape[0], count)
    slices = np.stack([resize_slice(vol[i], size) for i in idx])
    if norm is not None:
        slices = norm.apply(slices)
    return slices, idx


def input_spec(norm: DensityNorm, *, source_shape: tuple[int, int] | None = None) -> dict[str, object]:
    """What a bundle records about this pre-processing."""
    spec: dict[str, object] = {
        "slices": N_SLICES,
        "slice_rule": "centre of each of 8 equal segments: floor((i + 0.5) * n / 8)",
        "size": [SLICE_SIZE, SLICE_SIZE],
        "resize": "bilinear, pixel-edge aligned, gaussian anti-aliasing sigma=(1/scale-1)/2",
        "units": "modality LUT output (density units)",
        "normalisation": norm.to_dict(),
    }
    if source_shape is not None and source_shape[0] != source_shape[1]:
        spec["note"] = f"non-square source slices {source_shape} are stretched to square"
    return spec
