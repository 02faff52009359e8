"""Numba kernels for the paper's preprocessing steps 1-5 (no xarray here).

Steps (PAPER.md "Preprocessing steps"):

1. drop pixels with ``ormask != 0``, ``ivar <= 0`` (or non-finite) or non-finite flux
   (:func:`good_pixels`);
2. Doppler shift to the rest frame, ``lambda_rest = lambda_obs / (1 + v / c)``
   (:func:`doppler_shift`);
3. linear interpolation onto a 1 Angstrom grid, across masked gaps but never extrapolating
   (:func:`interp_to_grid`);
4. cut to (a) 3900-8899 Angstrom (:data:`GRID_4A`, 5000 px) or (b) 4700-8899 Angstrom
   (:data:`GRID_4B`, 4200 px). Steps 3 and 4 are fused: linear interpolation is local, so
   interpolating straight onto the cut grid equals interpolating onto a full 1 Angstrom grid
   and cutting (tested against the unfused numpy reference);
5. z-score (:func:`zscore`), or division by the mean for templates (:func:`mean_normalise`).

The 1-D kernels work on one spectrum; the block drivers (:func:`grid_block`, :func:`mask_block`)
loop over a 2-D block of spectra and are what the xarray wrappers in
:mod:`mspec.preprocessing.steps` call. :func:`preprocess_grid` and :func:`mask_spectra` are thin
numpy-facing entry points that allocate the outputs. Every kernel has a plain-numpy
reference in :mod:`mspec.preprocessing.reference`.

Compiled kernels are cached on disk (see :mod:`mspec._numba`).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from mspec._numba import jit
from mspec.variables import C_KMS, SDSS_BANDS

__all__ = [
    "STATUS_OK",
    "STATUS_NO_GOOD_PIXELS",
    "STATUS_NO_COVERAGE",
    "STATUS_ZERO_VARIANCE",
    "STATUS_BAD_RV",
    "STATUS_MEANINGS",
    "Grid",
    "GRID_4A",
    "GRID_4B",
    "wavelength_grid",
    "band_index",
    "good_pixels",
    "doppler_shift",
    "interp_to_grid",
    "cut",
    "zscore",
    "mean_normalise",
    "band_fractions",
    "grid_block",
    "mask_block",
    "preprocess_grid",
    "mask_spectra",
    "GridResult",
    "MaskResult",
]


#: ``preprocess_status`` codes (int8). A spectrum with a nonzero code has an all-NaN
#: ``flux_grid``; the first failing check (in this order) sets the code.
STATUS_OK = 0
STATUS_BAD_RV = 4
STATUS_NO_GOOD_PIXELS = 1
STATUS_NO_COVERAGE = 2
STATUS_ZERO_VARIANCE = 3
STATUS_MEANINGS = {
    STATUS_OK: "ok",
    STATUS_NO_GOOD_PIXELS: "no_good_pixels",
    STATUS_NO_COVERAGE: "no_grid_coverage",
    STATUS_ZERO_VARIANCE: "zero_variance",
    STATUS_BAD_RV: "bad_rv",
}

# Relative std below which a flux is treated as constant: sums of float32-derived values in
# float64 leave ~1e-16 relative noise on a constant spectrum, which z-scoring would blow up.
_ZERO_VAR_RTOL = 1e-10


class Grid(NamedTuple):
    """A linear wavelength grid ``start + step * arange(size)`` (Angstrom, vacuum)."""

    start: float
    step: float
    size: int

    @property
    def stop(self) -> float:
        """Last grid wavelength (Angstrom)."""
        return self.start + self.step * (self.size - 1)


#: Step 4a grid: 3900-8899 Angstrom, 1 Angstrom, 5000 pixels (CNN inputs).
GRID_4A = Grid(3900.0, 1.0, 5000)
#: Step 4b grid: 4700-8899 Angstrom, 1 Angstrom, 4200 pixels (templates).
GRID_4B = Grid(4700.0, 1.0, 4200)


def wavelength_grid(grid: Grid = GRID_4A) -> np.ndarray:
    """Wavelengths of a linear grid.

    Parameters
    ----------
    grid : Grid
        ``(start, step, size)`` in Angstrom; default :data:`GRID_4A`.

    Returns
    -------
    numpy.ndarray
        float64 wavelengths (Angstrom, vacuum), ``start + step * arange(size)``.
    """
    return grid.start + grid.step * np.arange(grid.size, dtype=np.float64)


def band_index(wave: np.ndarray, bands=None) -> np.ndarray:
    """SDSS band of each pixel.

    Parameters
    ----------
    wave : numpy.ndarray
        Observed wavelengths (Angstrom).
    bands : dict, optional
        ``name -> (lo, hi)`` edges in Angstrom (half-open ``[lo, hi)``); default
        :data:`mspec.variables.SDSS_BANDS` (order u, g, r, i, z).

    Returns
    -------
    numpy.ndarray
        int8 band number per pixel, -1 outside every band.
    """
    bands = SDSS_BANDS if bands is None else bands
    wave = np.asarray(wave, dtype=np.float64)
    idx = np.full(wave.shape, -1, dtype=np.int8)
    for k, (lo, hi) in enumerate(bands.values()):
        idx[(wave >= lo) & (wave < hi)] = k
    return idx


# --- 1-D kernels (one spectrum) -------------------------------------------------------------


@jit
def good_pixels(flux, ivar, ormask, good):
    """Step 1: flag the usable pixels of one spectrum.

    Parameters
    ----------
    flux : 1-D float array
        Flux (any units).
    ivar : 1-D float array
        Inverse variance (1/flux**2).
    ormask : 1-D int array
        LAMOST OR mask (nonzero = bad).
    good : 1-D bool array, output
        Set True where ``ormask == 0``, ``ivar > 0`` (finite) and ``flux`` is finite.

    Returns
    -------
    int
        Number of good pixels.
    """
    n = 0
    for i in range(flux.shape[0]):
        f = flux[i]
        w = ivar[i]
        ok = ormask[i] == 0 and math.isfinite(f) and math.isfinite(w) and w > 0
        good[i] = ok
        n += ok
    return n


@jit
def doppler_shift(wave_obs, rv, out):
    """Step 2: shift wavelengths to the rest frame, ``out = wave_obs / (1 + rv / c)``.

    Parameters
    ----------
    wave_obs : 1-D float64 array
        Observed wavelengths (Angstrom).
    rv : float
        Radial velocity (km/s, positive = receding); the caller ensures ``|rv| < c``.
    out : 1-D float64 array, output
        Rest-frame wavelengths (Angstrom).
    """
    fac = 1.0 + rv / C_KMS
    for i in range(wave_obs.shape[0]):
        out[i] = wave_obs[i] / fac


@jit
def interp_to_grid(wave, flux, good, start, step, max_gap, out):
    """Steps 3+4: linear interpolation of the good pixels onto ``start + step * j``.

    Same arithmetic as :func:`numpy.interp` (float64). Grid points outside
    ``[wave[first good], wave[last good]]`` are NaN (no extrapolation). Grid points inside a
    gap between consecutive good pixels wider than ``max_gap`` are NaN (a grid point exactly
    on a good pixel keeps that pixel's value); narrower gaps are bridged linearly (``inf``,
    the wrappers' default, bridges every gap: the paper's behaviour). O(pixels + grid).

    Parameters
    ----------
    wave : 1-D float64 array
        Pixel wavelengths (Angstrom), increasing.
    flux : 1-D float array
        Pixel fluxes; only the ``good`` ones are read.
    good : 1-D bool array
        Usable pixels (step 1).
    start, step : float
        Grid ``start + step * j`` (Angstrom), ``j = 0 .. len(out) - 1``.
    max_gap : float
        Widest gap between good pixels that is bridged (Angstrom).
    out : 1-D float array, output
        Interpolated flux, NaN where not covered.

    Returns
    -------
    int
        Number of grid points filled.
    """
    ngrid = out.shape[0]
    for j in range(ngrid):
        out[j] = np.nan
    ncov = 0
    j = 0
    a = -1
    for b in range(wave.shape[0]):
        if not good[b]:
            continue
        if a < 0:
            a = b
            continue
        xa = wave[a]
        xb = wave[b]
        fa = np.float64(flux[a])
        slope = (np.float64(flux[b]) - fa) / (xb - xa)
        bridge = xb - xa <= max_gap
        while j < ngrid:
            g = start + step * j
            if g >= xb:
                break
            if g >= xa and (bridge or g == xa):
                out[j] = slope * (g - xa) + fa
                ncov += 1
            j += 1
        a = b
    if a >= 0:
        # the last good pixel itself (np.interp returns fp[-1] at x == xp[-1])
        xl = wave[a]
        while j < ngrid and start + step * j < xl:
            j += 1
        if j < ngrid and start + step * j == xl:
            out[j] = np.float64(flux[a])
            ncov += 1
    return ncov


def cut(wave: np.ndarray, flux: np.ndarray, lo: float, hi: float):
    """Step 4 on an already gridded spectrum: keep ``lo <= wave <= hi``.

    The drivers never call this (they interpolate straight onto the cut grid); it is here for
    gridded data that exist already, e.g. a full 1 Angstrom grid.

    Parameters
    ----------
    wave : numpy.ndarray
        Grid wavelengths (Angstrom), shape ``(n,)``.
    flux : numpy.ndarray
        Flux on that grid, shape ``(..., n)``.
    lo, hi : float
        Inclusive wavelength limits (Angstrom).

    Returns
    -------
    tuple of numpy.ndarray
        ``(wave[keep], flux[..., keep])``.
    """
    wave = np.asarray(wave)
    keep = np.flatnonzero((wave >= lo) & (wave <= hi))
    if keep.size == 0:
        return wave[:0], np.asarray(flux)[..., :0]
    sl = slice(keep[0], keep[-1] + 1)  # contiguous on a monotonic grid: a view, no copy
    return wave[sl], np.asarray(flux)[..., sl]


@jit
def _finite_sum(x):
    """Number and float64 sum of the finite values of ``x``."""
    n = 0
    s = 0.0
    for j in range(x.shape[0]):
        v = x[j]
        if math.isfinite(v):
            s += v
            n += 1
    return n, s


@jit
def _fail(x, status):
    """Set every value of ``x`` to NaN and return ``status`` (a failed normalisation)."""
    for j in range(x.shape[0]):
        x[j] = np.nan
    return status


@jit
def zscore(x):
    """Step 5 in place: ``(x - mean) / std`` over the finite values (float64 sums, ddof=0).

    Parameters
    ----------
    x : 1-D float array, modified
        Gridded flux; NaNs stay NaN.

    Returns
    -------
    int
        ``STATUS_OK``, ``STATUS_NO_COVERAGE`` (no finite value) or ``STATUS_ZERO_VARIANCE``
        (fewer than 2 values, or std <= 1e-10 |mean|); on failure every value is set to NaN.
    """
    n, s = _finite_sum(x)
    if n == 0:
        return _fail(x, STATUS_NO_COVERAGE)
    mean = s / n
    ss = 0.0
    for j in range(x.shape[0]):
        v = x[j]
        if math.isfinite(v):
            d = v - mean
            ss += d * d
    std = math.sqrt(ss / n)
    if n < 2 or not math.isfinite(std) or std <= _ZERO_VAR_RTOL * abs(mean) or std == 0.0:
        return _fail(x, STATUS_ZERO_VARIANCE)
    for j in range(x.shape[0]):
        x[j] = (x[j] - mean) / std
    return STATUS_OK


@jit
def mean_normalise(x):
    """Template normalisation in place: ``x / mean`` over the finite values (float64 sum).

    Parameters
    ----------
    x : 1-D float array, modified
        Gridded flux; NaNs stay NaN.

    Returns
    -------
    int
        ``STATUS_OK``, ``STATUS_NO_COVERAGE`` (no finite value) or ``STATUS_ZERO_VARIANCE``
        (mean not positive); on failure every value is set to NaN.
    """
    n, s = _finite_sum(x)
    if n == 0:
        return _fail(x, STATUS_NO_COVERAGE)
    if not s / n > 0.0:
        return _fail(x, STATUS_ZERO_VARIANCE)
    mean = s / n
    for j in range(x.shape[0]):
        x[j] = x[j] / mean
    return STATUS_OK


@jit
def band_fractions(flux, ormask, band, out):
    """``orp``: fraction of ``ormask != 0`` pixels per band, over the pixels the spectrum has.

    A pixel is "had" when its flux is finite (the store pads missing pixels with NaN flux).

    Parameters
    ----------
    flux : 1-D float array
        Flux.
    ormask : 1-D int array
        LAMOST OR mask.
    band : 1-D int8 array
        Band number of each pixel (-1: none), see :func:`band_index`.
    out : 1-D float array, output
        Fraction per band; NaN when band ``k`` holds no pixel of the spectrum.
    """
    nb = out.shape[0]
    have = np.zeros(nb, dtype=np.int64)
    bad = np.zeros(nb, dtype=np.int64)
    for i in range(flux.shape[0]):
        k = band[i]
        if k < 0 or not math.isfinite(flux[i]):
            continue
        have[k] += 1
        if ormask[i] != 0:
            bad[k] += 1
    for k in range(nb):
        out[k] = bad[k] / have[k] if have[k] > 0 else np.nan


# --- block drivers (2-D blocks of spectra) --------------------------------------------------


@jit
def grid_block(
    flux,
    ivar,
    ormask,
    wave,
    band,
    rv,
    shift,
    start,
    step,
    max_gap,
    norm,
    fill_value,
    out,
    orp,
    coverage,
    status,
    ngood,
):
    """Steps 1, (2), 3+4, (5) plus quality outputs for a block of spectra.

    Parameters
    ----------
    flux, ivar, ormask : 2-D arrays, shape ``(n, p)``
        Flux, inverse variance (1/flux**2) and OR mask of ``n`` spectra.
    wave : 2-D float64 array, shape ``(1, p)`` (shared) or ``(n, p)``
        Observed wavelengths (Angstrom), increasing.
    band : 1-D int8 array, shape ``(p,)``
        SDSS band number of each pixel for ``orp`` (:func:`band_index`).
    rv : 1-D float64 array, shape ``(n,)``
        Radial velocities (km/s), read only when ``shift`` is True.
    shift : bool
        Apply step 2.
    start, step : float
        Output grid (Angstrom).
    max_gap : float
        See :func:`interp_to_grid` (Angstrom, ``inf``: bridge every gap).
    norm : int
        0 none, 1 z-score (step 5), 2 divide by the mean.
    fill_value : float
        Written into uncovered grid points of successful spectra.
    out : 2-D float array, shape ``(n, ngrid)``, output
        Gridded flux (float32 or float64); all-NaN where status is not ``STATUS_OK``.
    orp : 2-D float array, shape ``(n, nbands)``, output
        Masked-pixel fraction per band (:func:`band_fractions`).
    coverage : 1-D float array, shape ``(n,)``, output
        Fraction of grid points covered by the good-pixel range.
    status : 1-D int8 array, shape ``(n,)``, output
        ``STATUS_*`` code.
    ngood : 1-D int32 array, shape ``(n,)``, output
        Good pixels after step 1.
    """
    n, p = flux.shape
    ngrid = out.shape[1]
    good = np.empty(p, dtype=np.bool_)
    wrest = np.empty(p, dtype=np.float64)
    buf = np.empty(ngrid, dtype=np.float64)
    shared = wave.shape[0] == 1
    for s in range(n):
        w = wave[0] if shared else wave[s]
        band_fractions(flux[s], ormask[s], band, orp[s])
        ng = good_pixels(flux[s], ivar[s], ormask[s], good)
        ngood[s] = ng
        st = STATUS_OK
        ncov = 0
        if shift:
            v = rv[s]
            if not (math.isfinite(v) and abs(v) < C_KMS):
                st = STATUS_BAD_RV
            else:
                doppler_shift(w, v, wrest)
                w = wrest
        if st == STATUS_OK and ng == 0:
            st = STATUS_NO_GOOD_PIXELS
        if st == STATUS_OK:
            ncov = interp_to_grid(w, flux[s], good, start, step, max_gap, buf)
            if ncov == 0:
                st = STATUS_NO_COVERAGE
        if st == STATUS_OK and norm == 1:
            st = zscore(buf)
        elif st == STATUS_OK and norm == 2:
            st = mean_normalise(buf)
        coverage[s] = ncov / ngrid
        status[s] = st
        row = out[s]
        if st == STATUS_OK:
            for j in range(ngrid):
                v = buf[j]
                row[j] = v if math.isfinite(v) else fill_value
        else:
            for j in range(ngrid):
                row[j] = np.nan


@jit
def mask_block(flux, ivar, ormask, band, out_flux, out_ivar, orp, status, ngood):
    """Step 1 only (template-matching recipe) for a block of spectra.

    Parameters
    ----------
    flux, ivar, ormask : 2-D arrays, shape ``(n, p)``
        Flux, inverse variance and OR mask.
    band : 1-D int8 array, shape ``(p,)``
        SDSS band number of each pixel (:func:`band_index`).
    out_flux, out_ivar : 2-D arrays, shape ``(n, p)``, output
        Flux with NaN and ivar with 0 at the dropped pixels.
    orp : 2-D float array, shape ``(n, nbands)``, output
        Masked-pixel fraction per band.
    status : 1-D int8 array, output
        ``STATUS_OK`` or ``STATUS_NO_GOOD_PIXELS`` when nothing is left.
    ngood : 1-D int32 array, output
        Good pixels after step 1.
    """
    n, p = flux.shape
    good = np.empty(p, dtype=np.bool_)
    for s in range(n):
        band_fractions(flux[s], ormask[s], band, orp[s])
        ng = good_pixels(flux[s], ivar[s], ormask[s], good)
        ngood[s] = ng
        status[s] = STATUS_OK if ng > 0 else STATUS_NO_GOOD_PIXELS
        for i in range(p):
            if good[i]:
                out_flux[s, i] = flux[s, i]
                out_ivar[s, i] = ivar[s, i]
            else:
                out_flux[s, i] = np.nan
                out_ivar[s, i] = 0


# --- numpy-facing entry points --------------------------------------------------------------


class GridResult(NamedTuple):
    """Outputs of :func:`preprocess_grid` (leading dims of the input flux kept)."""

    flux: np.ndarray  #: gridded flux ``(..., ngrid)``
    orp: np.ndarray  #: masked fraction per SDSS band ``(..., 5)``, float32
    coverage: np.ndarray  #: fraction of grid points covered ``(...)``, float32
    status: np.ndarray  #: ``STATUS_*`` code ``(...)``, int8
    ngood: np.ndarray  #: good native pixels ``(...)``, int32


class MaskResult(NamedTuple):
    """Outputs of :func:`mask_spectra` (leading dims of the input flux kept)."""

    flux: np.ndarray  #: flux with NaN at dropped pixels ``(..., p)``
    ivar: np.ndarray  #: ivar with 0 at dropped pixels ``(..., p)``
    orp: np.ndarray  #: masked fraction per SDSS band ``(..., 5)``, float32
    status: np.ndarray  #: ``STATUS_*`` code ``(...)``, int8
    ngood: np.ndarray  #: good native pixels ``(...)``, int32


def _native(a, dtype=None) -> np.ndarray:
    """C-contiguous, native byte order (FITS data are big-endian; numba refuses those)."""
    a = np.asarray(a, dtype=dtype)
    if not a.dtype.isnative:
        a = a.astype(a.dtype.newbyteorder("="))
    return np.ascontiguousarray(a)


def _as_2d(flux, ivar, ormask, name="flux"):
    flux = _native(flux)
    if flux.ndim < 1:
        raise ValueError(f"{name} must have a pixel axis, got a scalar")
    lead = flux.shape[:-1]
    p = flux.shape[-1]
    ivar = _native(np.broadcast_to(ivar, flux.shape)) if ivar is not None else None
    ormask = _native(np.broadcast_to(ormask, flux.shape)) if ormask is not None else None
    f2 = flux.reshape(-1, p)
    i2 = ivar.reshape(-1, p) if ivar is not None else np.ones_like(f2)
    m2 = ormask.reshape(-1, p) if ormask is not None else np.zeros(f2.shape, dtype=np.int8)
    return f2, i2, m2, lead


def _wave_2d(wave, n, p, name):
    wave = _native(wave, np.float64)
    if wave.shape[-1] != p:
        raise ValueError(f"{name} has {wave.shape[-1]} pixels, the flux has {p}")
    w2 = wave.reshape(-1, p)
    if w2.shape[0] not in (1, n):
        raise ValueError(f"{name} must be 1-D or have the flux's shape, got {wave.shape}")
    return w2


def preprocess_grid(
    flux,
    ivar,
    ormask,
    wave,
    rv=None,
    *,
    grid: Grid = GRID_4A,
    normalise: str | None = "zscore",
    max_gap: float | None = None,
    fill_value: float = np.nan,
    out_dtype=np.float32,
    band_wave=None,
) -> GridResult:
    """Run steps 1, (2), 3+4, (5) on numpy arrays of spectra.

    Parameters
    ----------
    flux : array_like, shape ``(..., p)``
        Flux (any units).
    ivar : array_like or None
        Inverse variance, broadcastable to ``flux``; ``None``: all pixels usable.
    ormask : array_like or None
        OR mask, broadcastable to ``flux``; ``None``: nothing masked.
    wave : array_like, shape ``(p,)`` or ``flux.shape``
        Observed vacuum wavelengths (Angstrom), increasing along the pixel axis.
    rv : array_like, optional
        Radial velocity (km/s) per spectrum, shape ``flux.shape[:-1]``; given: step 2 shifts to
        the rest frame. NaN or ``|rv| >= c`` gives ``STATUS_BAD_RV``.
    grid : Grid
        Output grid (Angstrom); default :data:`GRID_4A`.
    normalise : {"zscore", "mean", None}
        Step 5 (z-score), division by the mean (templates) or nothing.
    max_gap : float, optional
        Widest gap of dropped pixels (Angstrom, in the frame of ``wave``) bridged by the
        interpolation; default: all gaps.
    fill_value : float
        Value for grid points outside the good-pixel range of a successful spectrum.
    out_dtype : numpy dtype
        dtype of the gridded flux (float32 for the store, float64 for templates).
    band_wave : array_like, optional
        Wavelengths (Angstrom, shape ``(p,)``) that assign pixels to SDSS bands for ``orp``;
        default ``wave`` when it is 1-D, else its first row.

    Returns
    -------
    GridResult
    """
    f2, i2, m2, lead = _as_2d(flux, ivar, ormask)
    n, p = f2.shape
    w2 = _wave_2d(wave, n, p, "wave")
    norm = {None: 0, "zscore": 1, "mean": 2}.get(normalise, -1)
    if norm < 0:
        raise ValueError(f"normalise must be 'zscore', 'mean' or None, got {normalise!r}")
    shift = rv is not None
    if shift:
        rv1 = _native(np.broadcast_to(np.asarray(rv, dtype=np.float64), lead)).reshape(-1)
    else:
        rv1 = np.zeros(n, dtype=np.float64)
    gap = np.inf if max_gap is None else float(max_gap)
    if not gap > 0:
        raise ValueError(f"max_gap must be positive, got {max_gap!r}")
    bw = w2[0] if band_wave is None else _native(band_wave, np.float64)
    band = band_index(bw)
    out = np.empty((n, grid.size), dtype=out_dtype)
    orp = np.empty((n, len(SDSS_BANDS)), dtype=np.float32)
    coverage = np.empty(n, dtype=np.float32)
    status = np.empty(n, dtype=np.int8)
    ngood = np.empty(n, dtype=np.int32)
    grid_block(
        f2,
        i2,
        m2,
        w2,
        band,
        rv1,
        shift,
        float(grid.start),
        float(grid.step),
        gap,
        norm,
        fill_value,
        out,
        orp,
        coverage,
        status,
        ngood,
    )
    return GridResult(
        out.reshape(*lead, grid.size),
        orp.reshape(*lead, orp.shape[1]),
        coverage.reshape(lead),
        status.reshape(lead),
        ngood.reshape(lead),
    )


def mask_spectra(flux, ivar, ormask, wave) -> MaskResult:
    """Run step 1 (drop bad pixels) on numpy arrays of spectra.

    Parameters
    ----------
    flux, ivar, ormask : array_like, shape ``(..., p)``
        Flux, inverse variance and OR mask.
    wave : array_like, shape ``(p,)``
        Observed wavelengths (Angstrom), only used to assign pixels to SDSS bands for ``orp``.

    Returns
    -------
    MaskResult
        Flux (NaN where dropped) and ivar (0 where dropped) in the input dtypes, plus quality.
    """
    f2, i2, m2, lead = _as_2d(flux, ivar, ormask)
    n, p = f2.shape
    band = band_index(_wave_2d(wave, 1, p, "wave")[0])
    out_f = np.empty_like(f2)
    out_i = np.empty_like(i2)
    orp = np.empty((n, len(SDSS_BANDS)), dtype=np.float32)
    status = np.empty(n, dtype=np.int8)
    ngood = np.empty(n, dtype=np.int32)
    mask_block(f2, i2, m2, band, out_f, out_i, orp, status, ngood)
    return MaskResult(
        out_f.reshape(*lead, p),
        out_i.reshape(*lead, p),
        orp.reshape(*lead, orp.shape[1]),
        status.reshape(lead),
        ngood.reshape(lead),
    )
