"""Parallel-beam tomography: projection of moving objects and filtered back-projection.

Both directions work in Fourier space (Fourier slice theorem) so that a whole
stack of slices that shares one acquisition trajectory is projected and
reconstructed with a few FFTs and one interpolation pattern:

* projection: real 2-D FFT of each (zero-padded) slice, keeping the half
  spectrum ``ky >= 0``; bilinear sampling of it along the half radial line
  (``rho >= 0``) of every view, and a real inverse FFT (the ``rho < 0`` half is
  the complex conjugate; a view whose angle leaves ``[0, pi]`` after the object's
  rotation is the conjugate of the view ``pi`` away). The image is pre-divided by
  the Fourier transform of the bilinear kernel (sinc^2), the usual gridding
  "deapodisation", so the projections match line integrals.
* reconstruction (FBP): real FFT of every projection, ramp filter with a
  Shepp-Logan (or plain ramp) window, bilinear "splatting" of the filtered half
  radial lines onto the half spectrum, a real inverse 2-D FFT and
  deapodisation. This is the adjoint of the projector applied to ramp-filtered
  data, i.e. filtered back-projection evaluated in Fourier space. The detector's
  Nyquist bin is not used.

Rigid in-plane motion during the scan is modelled per view: an object rotated
by ``phi`` and translated by ``T`` projects at nominal angle ``theta`` like the
static object at ``theta - phi``, shifted on the detector by ``T . e_theta``
(applied exactly as a phase ramp). Reconstructing with the nominal angles gives
the streaks and double contours of real motion artefacts.

Coordinates: pixel units, ``x`` = column, ``y`` = row, rotation centre at
pixel ``(n // 2, n // 2)``. Detector bins have the pixel pitch; a sinogram has
shape ``(slices, views, m)`` with ``m`` the padded size and ``t = 0`` at bin
``m // 2``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import scipy.fft as sfft
import scipy.sparse as sp

log = logging.getLogger(__name__)

__all__ = ["ParallelBeam", "fbp", "forward_project", "opposed_projection_ssd"]


@dataclass
class ParallelBeam:
    """Geometry of a parallel-beam acquisition over 180 degrees (both ends included).

    Parameters
    ----------
    n:
        Reconstruction matrix (``n x n`` pixels).
    n_views:
        Number of projections; views are equally spaced over ``[0, pi]`` with
        both 0 and 180 degrees acquired, as HR-pQCT scanners do.
    pad:
        Zero-padding factor of the Fourier grids (2 keeps gridding errors small).
    """

    n: int
    n_views: int
    pad: float = 2.0
    m: int = field(init=False)
    angles: np.ndarray = field(init=False, repr=False)
    _apod: np.ndarray = field(init=False, repr=False)
    _splat: sp.csr_matrix | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.n < 8 or self.n_views < 4:
            raise ValueError("ParallelBeam needs n >= 8 and n_views >= 4")
        m = int(np.ceil(self.n * self.pad / 2.0)) * 2
        self.m = max(m, self.n + 2)
        self.angles = np.linspace(0.0, np.pi, self.n_views)
        x = (np.arange(self.n) - self.n // 2) / self.m
        s = np.sinc(x) ** 2
        self._apod = (s[:, None] * s[None, :]).astype(np.float32)

    @property
    def center(self) -> int:
        """Detector bin (and padded-grid index) of ``t = 0``."""
        return self.m // 2

    def _blocks(self) -> tuple[tuple[slice, slice], tuple[slice, slice]]:
        """(grid slice, image slice) pairs mapping image index i to grid index (i - n // 2) mod m."""
        h, n, m = self.n // 2, self.n, self.m
        return ((slice(0, n - h), slice(h, n)), (slice(m - h, m), slice(0, h)))

    def half_spectrum(self, images: np.ndarray) -> np.ndarray:
        """``rfftn`` over (x, y) of ``(S, n, n)`` images deapodised and zero-padded to the ``m x m`` grid.

        Equal to ``rfftn(embed(images), axes=(2, 1))`` with the rotation centre at grid index 0, but
        the real transform along y runs only over the ``n`` non-zero columns (of ``m``), a quarter of
        the two-dimensional transform's work. Returns ``(S, m // 2 + 1, m)`` complex64 (ky >= 0 rows).
        """
        k = images.shape[0]
        rows = np.zeros((k, self.m, self.n), dtype=np.float32)  # y padded and centred, x still compact
        img = images / self._apod
        for gr, ir in self._blocks():
            rows[:, gr, :] = img[:, ir, :]
        cols = sfft.rfft(rows, axis=1, workers=1)  # (k, half, n)
        spec = np.zeros((k, self.half, self.m), dtype=np.complex64)
        for gc, ic in self._blocks():
            spec[:, :, gc] = cols[:, :, ic]
        return sfft.fft(spec, axis=2, overwrite_x=True, workers=1)

    def image_from_half_spectrum(self, spec: np.ndarray) -> np.ndarray:
        """Inverse of :meth:`half_spectrum` (``irfftn``, crop to ``n x n``, deapodise) for ``(S, half, m)``.

        The real transform along y is computed only for the ``n`` columns the crop keeps.
        """
        lines = sfft.ifft(spec, axis=2, workers=1)  # (k, half, m): x back in space
        cols = np.empty((spec.shape[0], self.half, self.n), dtype=lines.dtype)
        for gc, ic in self._blocks():
            cols[:, :, ic] = lines[:, :, gc]
        grid = sfft.irfft(cols, n=self.m, axis=1, workers=1)  # (k, m, n)
        out = np.empty((spec.shape[0], self.n, self.n), dtype=np.float32)
        for gr, ir in self._blocks():
            out[:, ir, :] = grid[:, gr, :]
        out /= self._apod
        return out

    @property
    def half(self) -> int:
        """Rows of the half spectrum (``m // 2 + 1``) and one more than the radial samples per view."""
        return self.m // 2 + 1

    def radial_samples(self, angles: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Bilinear interpolation pattern of the half radial lines (``rho = 0 .. m/2 - 1``) at ``angles``.

        The spectrum of a real slice is Hermitian, so only the half with ``ky >= 0`` is stored
        (``rfft`` along y) and only ``rho >= 0`` is sampled: a line at an angle outside ``[0, pi]``
        is the complex conjugate of the line at the angle ``pi`` away.

        Returns
        -------
        idx, w, conj:
            ``idx`` and ``w`` of shape ``(4, len(angles) * m // 2)``: flat indices into the
            ``(m // 2 + 1) x m`` half spectrum and their weights; ``conj`` ``(len(angles),)``
            marks the views whose samples must be conjugated.
        """
        theta = np.asarray(angles, dtype=np.float64)
        if np.any(np.abs(theta - np.pi / 2) > 1.5 * np.pi):
            raise ValueError("view angles must lie within 180 degrees of [0, pi]")
        conj = (theta < 0) | (theta > np.pi)
        theta = np.where(theta < 0, theta + np.pi, np.where(theta > np.pi, theta - np.pi, theta))
        rho = np.arange(self.m // 2, dtype=np.float64)
        ky = np.maximum(np.sin(theta)[:, None] * rho[None, :], 0.0)
        kx = np.cos(theta)[:, None] * rho[None, :]
        y0 = np.floor(ky)
        x0 = np.floor(kx)
        wy = (ky - y0).ravel()
        wx = (kx - x0).ravel()
        y0 = y0.astype(np.int64).ravel()
        x0 = x0.astype(np.int64).ravel()
        m = self.m
        y1 = y0 + 1  # <= m // 2: ky < m / 2
        x1 = (x0 + 1) % m
        x0 %= m
        idx = np.stack([y0 * m + x0, y0 * m + x1, y1 * m + x0, y1 * m + x1])
        w = np.stack([(1 - wy) * (1 - wx), (1 - wy) * wx, wy * (1 - wx), wy * wx]).astype(np.float32)
        return idx, w, conj

    def interp_matrix(self, angles: np.ndarray) -> tuple[sp.csr_matrix, np.ndarray]:
        """Sparse ``(views * m / 2, half * m)`` sampling of the half spectrum, plus the views to conjugate."""
        idx, w, conj = self.radial_samples(angles)
        rows = np.broadcast_to(np.arange(idx.shape[1]), idx.shape)
        mat = sp.csr_matrix((w.ravel(), (rows.ravel(), idx.ravel())), shape=(idx.shape[1], self.half * self.m))
        return mat, conj

    def splat_matrix(self) -> sp.csr_matrix:
        """Adjoint of the sampling at the nominal angles, ``(half * m, views * m / 2)`` (cached)."""
        if self._splat is None:
            mat, _ = self.interp_matrix(self.angles)
            self._splat = mat.T.tocsr()
        return self._splat


#: slices transformed together (bounds the size of the complex intermediates)
_CHUNK = 16


def forward_project(
    images: np.ndarray,
    geom: ParallelBeam,
    angle_offsets: np.ndarray | None = None,
    shifts: np.ndarray | None = None,
) -> np.ndarray:
    """Line integrals of a stack of slices over the geometry's views, with optional rigid motion.

    Parameters
    ----------
    images:
        ``(S, n, n)`` or ``(n, n)`` attenuation per pixel (line integrals are in
        pixel-length units).
    geom:
        The acquisition geometry.
    angle_offsets:
        ``(views,)`` in-plane rotation of the object (radians) at each view.
    shifts:
        ``(views, 2)`` in-plane translation ``(tx, ty)`` of the object in pixels at each view.

    Returns
    -------
    numpy.ndarray
        Sinogram ``(S, views, m)`` (float32); ``(views, m)`` for a single slice.
    """
    single = images.ndim == 2
    stack = np.asarray(images, dtype=np.float32)[None] if single else np.asarray(images, dtype=np.float32)
    if stack.shape[1:] != (geom.n, geom.n):
        raise ValueError(f"images must be {geom.n}x{geom.n}, got {stack.shape[1:]}")
    m, r = geom.m, geom.m // 2
    if angle_offsets is None:
        interp, conj = geom.splat_matrix().T, np.zeros(geom.n_views, bool)
    else:
        interp, conj = geom.interp_matrix(geom.angles - np.asarray(angle_offsets))
    ramp = None
    if shifts is not None:
        shifts = np.asarray(shifts, dtype=np.float64)
        d = shifts[:, 0] * np.cos(geom.angles) + shifts[:, 1] * np.sin(geom.angles)
        ramp = np.exp(-2j * np.pi * d[:, None] * (np.arange(r) / m)[None, :]).astype(np.complex64)
    lines = np.zeros((_CHUNK, geom.n_views, r + 1), np.complex64)  # Nyquist bin stays 0
    sino = np.empty((stack.shape[0], geom.n_views, m), np.float32)
    for s0 in range(0, stack.shape[0], _CHUNK):
        chunk = stack[s0:s0 + _CHUNK]
        k = chunk.shape[0]
        spec = geom.half_spectrum(chunk)  # (k, half, m): ky >= 0 rows
        for i in range(k):
            lines[i, :, :r] = (interp @ spec[i].ravel()).reshape(geom.n_views, r)
        part = lines[:k]
        part[:, conj] = np.conj(part[:, conj])
        if ramp is not None:
            part[:, :, :r] *= ramp[None]
        sino[s0:s0 + k] = sfft.fftshift(sfft.irfft(part, n=m, axis=2, workers=1), axes=2)
    return sino[0] if single else sino


def fbp(
    sinogram: np.ndarray,
    geom: ParallelBeam,
    window: Literal["shepp-logan", "ramp"] = "shepp-logan",
) -> np.ndarray:
    """Filtered back-projection of ``(S, views, m)`` (or ``(views, m)``) with the nominal angles.

    Returns
    -------
    numpy.ndarray
        ``(S, n, n)`` (or ``(n, n)``) float32 reconstruction in the units of the projected image.
    """
    single = sinogram.ndim == 2
    sino = np.asarray(sinogram, dtype=np.float32)[None] if single else np.asarray(sinogram, dtype=np.float32)
    if sino.shape[1:] != (geom.n_views, geom.m):
        raise ValueError(f"sinogram must be (S, {geom.n_views}, {geom.m}), got {sino.shape}")
    m, r = geom.m, geom.m // 2
    rho = np.arange(r) / m
    filt = np.abs(rho)
    if window == "shepp-logan":
        filt = filt * np.sinc(rho)
    elif window != "ramp":
        raise ValueError(f"unknown FBP window {window!r}")
    # trapezoid weights over [0, pi]: the two end views share one angular step
    dtheta = np.full(geom.n_views, np.pi / (geom.n_views - 1))
    dtheta[[0, -1]] *= 0.5
    weight = (filt[None, :] * dtheta[:, None] * m).astype(np.float32)
    weight[:, 0] *= 0.5  # rho = 0 is its own mirror image
    splat = geom.splat_matrix()
    out = np.empty((sino.shape[0], geom.n, geom.n), np.float32)
    for s0 in range(0, sino.shape[0], _CHUNK):
        part = sino[s0:s0 + _CHUNK]
        k = part.shape[0]
        lines = sfft.rfft(sfft.ifftshift(part, axes=2), axis=2, workers=1)[:, :, :r] * weight[None]
        grid = np.empty((k, r + 1, m), np.complex64)
        for i in range(k):
            grid[i] = (splat @ lines[i].ravel()).reshape(r + 1, m)
        # rows ky = 0 and ky = m/2 are their own mirror: the c2r transform keeps their Hermitian
        # part, which is half of what the omitted rho < 0 samples would have added
        grid[:, 0] *= 2.0
        grid[:, r] *= 2.0
        out[s0:s0 + k] = geom.image_from_half_spectrum(grid)
    return out[0] if single else out


def opposed_projection_ssd(sinogram: np.ndarray) -> float:
    """Quantitative motion estimate after Sode et al. (2011).

    Sum of squared differences between the 0-degree projection and the mirrored
    180-degree projection (identical without motion), summed over slices and
    normalised by the energy of the 0-degree projection, so it does not depend
    on the bone size.

    Parameters
    ----------
    sinogram:
        ``(S, views, m)`` or ``(views, m)`` sinogram whose first and last views are 0 and 180 degrees.
    """
    sino = sinogram[None] if sinogram.ndim == 2 else sinogram
    m = sino.shape[2]
    p0 = sino[:, 0, :].astype(np.float64)
    p180 = sino[:, -1, (-np.arange(m)) % m].astype(np.float64)  # t -> -t around bin m // 2
    return float(np.sum((p0 - p180) ** 2) / max(np.sum(p0**2), 1e-12))
