"""Numba kernels for the dwarf/giant spectral indices (no xarray here).

Every measurement is an integral of the *linear interpolant through the good pixels* of one
native (log-linear) spectrum, taken in the rest frame:

* good pixels: ``ormask == 0``, ``ivar > 0`` and finite flux (preprocessing step 1);
* rest-frame wavelength of pixel ``i``: ``10**loglam[i] / (1 + rv / c)`` (preprocessing
  step 2, :func:`mspec.preprocessing.kernels.doppler_shift`);
* the mean flux in a window ``[a, b]`` (Angstrom) is ``(1 / (b - a)) * integral_a^b F`` of
  the piecewise-linear interpolant ``F`` through consecutive good pixels, integrated exactly
  (window edges fall anywhere inside a pixel). A window is *covered* when good pixels
  bracket it on both sides (no extrapolation) and no stretch of more than ``max_gap``
  consecutive bad pixels lies inside it; otherwise its mean is NaN;
* band-ratio indices (CaH2, CaH3, TiO5) are ratios of two window means;
* equivalent widths (Angstrom, positive for absorption) are
  ``sum over line bands of integral (1 - F / C) dlambda`` with ``C`` the straight line
  fitted by least squares through the (centre, mean flux) points of the feature's
  continuum windows. ``F / C`` is integrated with Simpson's rule on each interpolation
  segment (``F`` and ``C`` are linear there, so the error is far below the noise).

The band definitions (vacuum Angstrom, already converted from air) and the feature layout
come from :mod:`mspec.indices`; the plain-numpy reference is :mod:`mspec.indices_reference`.
Compiled kernels are cached on disk as configured in :mod:`mspec._numba`.
"""

from __future__ import annotations

import math

import numpy as np

from mspec._numba import jit
from mspec.variables import C_KMS

__all__ = [
    "STATUS_OK",
    "STATUS_NO_RV",
    "STATUS_NO_GOOD_PIXELS",
    "STATUS_PARTIAL",
    "STATUS_NONE",
    "STATUS_MEANINGS",
    "N_OUT",
    "window_mean",
    "feature_ew",
    "indices_spectrum",
    "indices_block",
]

STATUS_OK = 0
STATUS_NO_RV = 1
STATUS_NO_GOOD_PIXELS = 2
STATUS_PARTIAL = 3
STATUS_NONE = 4
#: status code -> meaning (CF ``flag_meanings`` words are made from these)
STATUS_MEANINGS = {
    STATUS_OK: "ok",
    STATUS_NO_RV: "no rv",
    STATUS_NO_GOOD_PIXELS: "no good pixels",
    STATUS_PARTIAL: "some indices not measurable",
    STATUS_NONE: "no index measurable",
}
#: outputs per spectrum: cah2, cah3, tio5, zeta, ew_ki, ew_nai, ew_caii, zro, c2
N_OUT = 9


@jit
def window_mean(wave, flux, good, a, b, max_gap):
    """Mean of the good-pixel linear interpolant over ``[a, b]`` (NaN when not covered).

    Parameters
    ----------
    wave : 1-D float64 array
        Rest-frame pixel wavelengths (Angstrom), increasing.
    flux : 1-D float array
        Flux.
    good : 1-D bool array
        Good-pixel mask.
    a, b : float
        Window edges (Angstrom), ``a < b``.
    max_gap : int
        Most consecutive bad pixels allowed inside the window.

    Returns
    -------
    float
        Mean flux (flux units) or NaN.
    """
    n = wave.shape[0]
    if n == 0 or not (b > a):
        return np.nan
    # last good pixel at or below a
    j = -1
    for i in range(n):
        if wave[i] > a:
            break
        if good[i]:
            j = i
    if j < 0:
        return np.nan
    total = 0.0
    prev = j
    k = j + 1
    while k < n:
        if good[k]:
            if k - prev - 1 > max_gap:
                return np.nan
            x0 = wave[prev]
            x1 = wave[k]
            lo = max(x0, a)
            hi = min(x1, b)
            if hi > lo:
                f0 = np.float64(flux[prev])
                slope = (np.float64(flux[k]) - f0) / (x1 - x0)
                total += 0.5 * ((f0 + slope * (lo - x0)) + (f0 + slope * (hi - x0))) * (hi - lo)
            if x1 >= b:
                return total / (b - a)
            prev = k
        k += 1
    return np.nan  # no good pixel at or above b


@jit
def _continuum_line(wave, flux, good, cont_lo, cont_hi, c0, c1, max_gap):
    # least-squares straight line through (window centre, window mean) of the covered
    # windows; NaN if fewer than 2 are covered
    sx = 0.0
    sy = 0.0
    sxx = 0.0
    sxy = 0.0
    m = 0
    for w in range(c0, c1):
        mu = window_mean(wave, flux, good, cont_lo[w], cont_hi[w], max_gap)
        if math.isnan(mu):
            continue  # an uncovered window is left out; >= 2 must remain
        x = 0.5 * (cont_lo[w] + cont_hi[w])
        sx += x
        sy += mu
        sxx += x * x
        sxy += x * mu
        m += 1
    if m < 2:
        return np.nan, np.nan
    xm = sx / m
    ym = sy / m
    den = sxx - m * xm * xm
    if not (den > 0.0):
        return np.nan, np.nan
    slope = (sxy - m * xm * ym) / den
    return ym - slope * xm, slope


@jit
def feature_ew(wave, flux, good, line_lo, line_hi, l0, l1, cont_lo, cont_hi, c0, c1, max_gap):
    """Equivalent width (Angstrom) of one feature: line bands ``l0:l1``, continua ``c0:c1``.

    Parameters
    ----------
    wave, flux, good
        As in :func:`window_mean`.
    line_lo, line_hi : 1-D float64 arrays
        Line-band edges (Angstrom) of every feature.
    l0, l1 : int
        This feature's line bands are ``line_lo[l0:l1]``.
    cont_lo, cont_hi : 1-D float64 arrays
        Continuum-window edges (Angstrom) of every feature.
    c0, c1 : int
        This feature's continuum windows are ``cont_lo[c0:c1]`` (at least two).
    max_gap : int
        As in :func:`window_mean`.

    Returns
    -------
    float
        ``sum integral (1 - F / C) dlambda`` (Angstrom); NaN when a window is not covered or
        the continuum is not positive over a line band. Continuum windows that are not
        covered are left out of the fit as long as two remain.
    """
    icpt, slope = _continuum_line(wave, flux, good, cont_lo, cont_hi, c0, c1, max_gap)
    if math.isnan(icpt):
        return np.nan
    n = wave.shape[0]
    ew = 0.0
    for band in range(l0, l1):
        a = line_lo[band]
        b = line_hi[band]
        if not (icpt + slope * a > 0.0 and icpt + slope * b > 0.0):
            return np.nan
        # covered? (the same rule as window_mean)
        if math.isnan(window_mean(wave, flux, good, a, b, max_gap)):
            return np.nan
        j = -1
        for i in range(n):
            if wave[i] > a:
                break
            if good[i]:
                j = i
        integ = 0.0
        prev = j
        for k in range(j + 1, n):
            if not good[k]:
                continue
            x0 = wave[prev]
            x1 = wave[k]
            lo = max(x0, a)
            hi = min(x1, b)
            if hi > lo:
                f0 = np.float64(flux[prev])
                fs = (np.float64(flux[k]) - f0) / (x1 - x0)
                xm = 0.5 * (lo + hi)
                r_lo = (f0 + fs * (lo - x0)) / (icpt + slope * lo)
                r_mid = (f0 + fs * (xm - x0)) / (icpt + slope * xm)
                r_hi = (f0 + fs * (hi - x0)) / (icpt + slope * hi)
                integ += (hi - lo) * (r_lo + 4.0 * r_mid + r_hi) / 6.0
            if x1 >= b:
                break
            prev = k
        ew += (b - a) - integ
    return ew


@jit
def indices_spectrum(
    loglam,
    flux,
    ivar,
    ormask,
    rv,
    ratio_lo,
    ratio_hi,
    line_lo,
    line_hi,
    line_ptr,
    cont_lo,
    cont_hi,
    cont_ptr,
    zeta_coef,
    max_gap,
    out,
):
    """All indices of one spectrum; returns the status code and fills ``out`` (9,).

    Parameters
    ----------
    loglam : 1-D float64 array
        log10 observed vacuum wavelength (Angstrom) of each pixel.
    flux, ivar, ormask : 1-D arrays
        The native spectrum.
    rv : float
        Radial velocity (km/s); NaN -> status :data:`STATUS_NO_RV`, all NaN.
    ratio_lo, ratio_hi : float64 arrays, shape ``(10,)``
        Window edges (vacuum Angstrom) for CaH2 num/den, CaH3 num/den, TiO5 num/den,
        ZrO num/den, C2 num/den.
    line_lo, line_hi, line_ptr, cont_lo, cont_hi, cont_ptr
        Equivalent-width features (K I, Na I, Ca II): feature ``f`` uses line bands
        ``line_ptr[f]:line_ptr[f+1]`` and continuum windows ``cont_ptr[f]:cont_ptr[f+1]``.
    zeta_coef : float64 array, shape ``(4,)``
        ``[TiO5]_Zsun = c0 + c1 CaH + c2 CaH**2 + c3 CaH**3`` with ``CaH = CaH2 + CaH3``.
    max_gap : int
        Most consecutive bad pixels allowed inside a window.
    out : float64 array, shape ``(9,)``
        Output: cah2, cah3, tio5, zeta, ew_ki, ew_nai, ew_caii, zro, c2.

    Returns
    -------
    int
        Status code (:data:`STATUS_MEANINGS`).
    """
    for q in range(N_OUT):
        out[q] = np.nan
    if math.isnan(rv) or not (abs(rv) < C_KMS):
        return STATUS_NO_RV
    n = loglam.shape[0]
    good = np.empty(n, np.bool_)
    ngood = 0
    for i in range(n):
        g = ormask[i] == 0 and ivar[i] > 0 and math.isfinite(flux[i])
        good[i] = g
        if g:
            ngood += 1
    if ngood < 2:
        return STATUS_NO_GOOD_PIXELS
    fac = 1.0 + rv / C_KMS
    wave = np.empty(n, np.float64)
    for i in range(n):
        wave[i] = 10.0 ** loglam[i] / fac
    nfeat = line_ptr.shape[0] - 1
    for q in range(ratio_lo.shape[0] // 2):
        # cah2, cah3, tio5 -> columns 0..2; further ratios (zro, c2) after the EWs
        col = q if q < 3 else 4 + nfeat + (q - 3)
        num = window_mean(wave, flux, good, ratio_lo[2 * q], ratio_hi[2 * q], max_gap)
        den = window_mean(wave, flux, good, ratio_lo[2 * q + 1], ratio_hi[2 * q + 1], max_gap)
        if den > 0.0 and math.isfinite(num):
            out[col] = num / den
    cah = out[0] + out[1]
    ref = zeta_coef[0] + cah * (zeta_coef[1] + cah * (zeta_coef[2] + cah * zeta_coef[3]))
    if math.isfinite(ref) and math.isfinite(out[2]) and (1.0 - ref) > 0.0:
        out[3] = (1.0 - out[2]) / (1.0 - ref)
    for f in range(nfeat):
        out[4 + f] = feature_ew(
            wave,
            flux,
            good,
            line_lo,
            line_hi,
            line_ptr[f],
            line_ptr[f + 1],
            cont_lo,
            cont_hi,
            cont_ptr[f],
            cont_ptr[f + 1],
            max_gap,
        )
    nfin = 0
    for q in range(N_OUT):
        if math.isfinite(out[q]):
            nfin += 1
    if nfin == N_OUT:
        return STATUS_OK
    if nfin == 0:
        return STATUS_NONE
    return STATUS_PARTIAL


@jit
def indices_block(
    loglam,
    flux,
    ivar,
    ormask,
    rv,
    ratio_lo,
    ratio_hi,
    line_lo,
    line_hi,
    line_ptr,
    cont_lo,
    cont_hi,
    cont_ptr,
    zeta_coef,
    max_gap,
    out,
    status,
):
    """Loop :func:`indices_spectrum` over a 2-D block ``flux (n, npix)``.

    ``out`` is ``(n, 9)`` float64 and ``status`` ``(n,)`` int8, filled in place; ``rv`` is
    ``(n,)`` km/s. Other arguments as in :func:`indices_spectrum`.
    """
    row = np.empty(N_OUT, np.float64)
    for s in range(flux.shape[0]):
        st = indices_spectrum(
            loglam,
            flux[s],
            ivar[s],
            ormask[s],
            rv[s],
            ratio_lo,
            ratio_hi,
            line_lo,
            line_hi,
            line_ptr,
            cont_lo,
            cont_hi,
            cont_ptr,
            zeta_coef,
            max_gap,
            row,
        )
        status[s] = st
        for q in range(N_OUT):
            out[s, q] = row[q]
