"""Plain-numpy references for the preprocessing kernels (used by the tests and benchmarks).

Written for clarity, not speed: one spectrum at a time, :func:`numpy.interp` for step 3, an
explicit full 1 Angstrom grid followed by a cut for step 4, :func:`numpy.nanmean` /
:func:`numpy.nanstd` for step 5. Same conventions as :mod:`mspec.preprocessing.kernels`.
"""

from __future__ import annotations

import numpy as np

from mspec.preprocessing.kernels import (
    _ZERO_VAR_RTOL,
    GRID_4A,
    STATUS_BAD_RV,
    STATUS_NO_COVERAGE,
    STATUS_NO_GOOD_PIXELS,
    STATUS_OK,
    STATUS_ZERO_VARIANCE,
    Grid,
    GridResult,
    MaskResult,
)
from mspec.variables import C_KMS, SDSS_BANDS

__all__ = [
    "good_pixels",
    "doppler_shift",
    "interp_to_grid",
    "cut",
    "zscore",
    "mean_normalise",
    "band_fractions",
    "preprocess_grid",
    "mask_spectra",
]


def good_pixels(flux, ivar, ormask):
    """Step 1: boolean mask of usable pixels."""
    flux = np.asarray(flux)
    ivar = np.asarray(ivar)
    with np.errstate(invalid="ignore"):
        return (np.asarray(ormask) == 0) & np.isfinite(flux) & np.isfinite(ivar) & (ivar > 0)


def doppler_shift(wave_obs, rv):
    """Step 2: rest-frame wavelengths ``wave_obs / (1 + rv / c)`` (Angstrom, km/s)."""
    return np.asarray(wave_obs, dtype=np.float64) / (1.0 + rv / C_KMS)


def interp_to_grid(wave, flux, good, grid_wave, max_gap=np.inf):
    """Step 3: ``np.interp`` of the good pixels onto ``grid_wave``; NaN outside their range
    and inside gaps wider than ``max_gap``."""
    wave = np.asarray(wave, dtype=np.float64)
    xp = wave[good]
    fp = np.asarray(flux, dtype=np.float64)[good]
    out = np.full(grid_wave.shape, np.nan)
    if xp.size == 0:
        return out
    inside = (grid_wave >= xp[0]) & (grid_wave <= xp[-1])
    out[inside] = np.interp(grid_wave[inside], xp, fp)
    if np.isfinite(max_gap) and xp.size > 1:
        # right neighbour of each grid point among the good pixels
        r = np.clip(np.searchsorted(xp, grid_wave, side="right"), 1, xp.size - 1)
        wide = (xp[r] - xp[r - 1]) > max_gap
        out[inside & wide & (grid_wave != xp[r - 1]) & (grid_wave != xp[-1])] = np.nan
    return out


def cut(wave, flux, lo, hi):
    """Step 4: keep ``lo <= wave <= hi`` (boolean indexing)."""
    wave = np.asarray(wave)
    keep = (wave >= lo) & (wave <= hi)
    return wave[keep], np.asarray(flux)[..., keep]


def zscore(x):
    """Step 5: ``(x - nanmean) / nanstd``; returns ``(values, status)``."""
    x = np.asarray(x, dtype=np.float64)
    fin = np.isfinite(x)
    if not fin.any():
        return np.full_like(x, np.nan), STATUS_NO_COVERAGE
    mean = np.mean(x[fin])
    std = np.std(x[fin])
    if fin.sum() < 2 or not np.isfinite(std) or std <= _ZERO_VAR_RTOL * abs(mean) or std == 0:
        return np.full_like(x, np.nan), STATUS_ZERO_VARIANCE
    return (x - mean) / std, STATUS_OK


def mean_normalise(x):
    """Template normalisation ``x / nanmean``; returns ``(values, status)``."""
    x = np.asarray(x, dtype=np.float64)
    fin = np.isfinite(x)
    if not fin.any():
        return np.full_like(x, np.nan), STATUS_NO_COVERAGE
    mean = np.mean(x[fin])
    if not mean > 0:
        return np.full_like(x, np.nan), STATUS_ZERO_VARIANCE
    return x / mean, STATUS_OK


def band_fractions(flux, ormask, wave, bands=None):
    """Masked-pixel fraction per band by direct counting over finite-flux pixels."""
    bands = SDSS_BANDS if bands is None else bands
    wave = np.asarray(wave, dtype=np.float64)
    have = np.isfinite(np.asarray(flux))
    bad = np.asarray(ormask) != 0
    out = np.full(len(bands), np.nan, dtype=np.float64)
    for k, (lo, hi) in enumerate(bands.values()):
        inband = have & (wave >= lo) & (wave < hi)
        if inband.sum():
            out[k] = (bad & inband).sum() / inband.sum()
    return out


def preprocess_grid(
    flux,
    ivar,
    ormask,
    wave,
    rv=None,
    *,
    grid: Grid = GRID_4A,
    normalise="zscore",
    max_gap=None,
    fill_value=np.nan,
    out_dtype=np.float32,
    band_wave=None,
) -> GridResult:
    """Reference for :func:`mspec.preprocessing.kernels.preprocess_grid` (2-D ``flux`` only).

    Interpolates onto a full 1 Angstrom-step grid spanning every pixel, then cuts (unfused
    steps 3 and 4).
    """
    flux = np.asarray(flux)
    n, p = flux.shape
    ivar = np.ones_like(flux) if ivar is None else np.broadcast_to(ivar, flux.shape)
    ormask = (
        np.zeros(flux.shape, np.int8) if ormask is None else np.broadcast_to(ormask, flux.shape)
    )
    wave = np.asarray(wave, dtype=np.float64)
    wave2 = np.broadcast_to(wave.reshape(-1, p), (n, p))
    bw = wave2[0] if band_wave is None else np.asarray(band_wave, dtype=np.float64)
    gap = np.inf if max_gap is None else max_gap
    out = np.full((n, grid.size), np.nan, dtype=out_dtype)
    orp = np.empty((n, len(SDSS_BANDS)), dtype=np.float32)
    coverage = np.zeros(n, dtype=np.float32)
    status = np.zeros(n, dtype=np.int8)
    ngood = np.zeros(n, dtype=np.int32)
    # full grid on the same lattice as `grid`, wide enough for any spectrum and shift
    j0 = int(np.floor((min(wave2.min() / 1.01, grid.start) - grid.start) / grid.step))
    j1 = int(np.ceil((max(wave2.max() / 0.99, grid.stop) - grid.start) / grid.step))
    full = grid.start + grid.step * np.arange(j0, j1 + 1, dtype=np.float64)
    for s in range(n):
        orp[s] = band_fractions(flux[s], ormask[s], bw)
        good = good_pixels(flux[s], ivar[s], ormask[s])
        ngood[s] = good.sum()
        w = wave2[s]
        if rv is not None:
            v = float(np.asarray(rv, dtype=np.float64).reshape(-1)[s])
            if not (np.isfinite(v) and abs(v) < C_KMS):
                status[s] = STATUS_BAD_RV
                continue
            w = doppler_shift(w, v)
        if not good.any():
            status[s] = STATUS_NO_GOOD_PIXELS
            continue
        g = interp_to_grid(w, flux[s], good, full, gap)
        _, g = cut(full, g, grid.start, grid.stop)
        ncov = np.isfinite(g).sum()
        coverage[s] = ncov / grid.size
        if ncov == 0:
            status[s] = STATUS_NO_COVERAGE
            continue
        st = STATUS_OK
        if normalise == "zscore":
            g, st = zscore(g)
        elif normalise == "mean":
            g, st = mean_normalise(g)
        status[s] = st
        if st == STATUS_OK:
            out[s] = np.where(np.isfinite(g), g, fill_value)
    return GridResult(out, orp, coverage, status, ngood)


def mask_spectra(flux, ivar, ormask, wave) -> MaskResult:
    """Reference for :func:`mspec.preprocessing.kernels.mask_spectra` (2-D arrays)."""
    flux = np.asarray(flux)
    ivar = np.asarray(ivar)
    good = good_pixels(flux, ivar, ormask)
    orp = np.stack([band_fractions(f, m, wave) for f, m in zip(flux, ormask)]).astype(np.float32)
    ngood = good.sum(axis=1).astype(np.int32)
    status = np.where(ngood > 0, STATUS_OK, STATUS_NO_GOOD_PIXELS).astype(np.int8)
    return MaskResult(
        np.where(good, flux, np.nan).astype(flux.dtype),
        np.where(good, ivar, 0).astype(ivar.dtype),
        orp,
        status,
        ngood,
    )
