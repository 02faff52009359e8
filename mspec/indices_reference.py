"""Plain-numpy reference of :mod:`mspec.indices_kernels` (used by the tests only).

Same definitions, written independently with vectorised numpy: good pixels selected with a
boolean mask, interpolation segments as arrays, the continuum from :func:`numpy.polyfit`.
"""

from __future__ import annotations

import numpy as np

from mspec.indices_kernels import (
    N_OUT,
    STATUS_NO_GOOD_PIXELS,
    STATUS_NO_RV,
    STATUS_NONE,
    STATUS_OK,
    STATUS_PARTIAL,
)
from mspec.variables import C_KMS

__all__ = ["window_mean_ref", "feature_ew_ref", "indices_ref"]


def _segments(wg, ig, a, b, max_gap):
    """Overlapping interpolation segments of [a, b], or None when not covered."""
    if wg.size < 2 or not (wg[0] <= a and wg[-1] >= b):
        return None
    x0, x1 = wg[:-1], wg[1:]
    sel = (x0 < b) & (x1 > a)
    if np.any((ig[1:] - ig[:-1] - 1)[sel] > max_gap):
        return None
    return np.flatnonzero(sel)


def window_mean_ref(wg, fg, ig, a, b, max_gap):
    """Mean of the linear interpolant through good pixels ``(wg, fg)`` over ``[a, b]``.

    ``ig`` are the good pixels' indices in the full spectrum (for the gap rule).
    """
    seg = _segments(wg, ig, a, b, max_gap)
    if seg is None:
        return np.nan
    x0, x1 = wg[seg], wg[seg + 1]
    f0, f1 = fg[seg], fg[seg + 1]
    lo, hi = np.maximum(x0, a), np.minimum(x1, b)
    s = (f1 - f0) / (x1 - x0)
    return float(np.sum(0.5 * ((f0 + s * (lo - x0)) + (f0 + s * (hi - x0))) * (hi - lo)) / (b - a))


def feature_ew_ref(wg, fg, ig, lines, conts, max_gap):
    """Equivalent width (Angstrom) with a least-squares linear continuum through ``conts``."""
    mus = np.array([window_mean_ref(wg, fg, ig, a, b, max_gap) for a, b in conts])
    xc = np.array([0.5 * (a + b) for a, b in conts])
    ok = np.isfinite(mus)
    if ok.sum() < 2:
        return np.nan
    mus, xc = mus[ok], xc[ok]
    xm = xc.mean()
    slope, icpt0 = np.polyfit(xc - xm, mus, 1)
    icpt = icpt0 - slope * xm
    ew = 0.0
    for a, b in lines:
        if not (icpt + slope * a > 0 and icpt + slope * b > 0):
            return np.nan
        seg = _segments(wg, ig, a, b, max_gap)
        if seg is None:
            return np.nan
        x0, x1 = wg[seg], wg[seg + 1]
        f0, f1 = fg[seg], fg[seg + 1]
        lo, hi = np.maximum(x0, a), np.minimum(x1, b)
        s = (f1 - f0) / (x1 - x0)

        def ratio(x, x0=x0, f0=f0, s=s):
            return (f0 + s * (x - x0)) / (icpt + slope * x)

        integ = np.sum((hi - lo) * (ratio(lo) + 4 * ratio(0.5 * (lo + hi)) + ratio(hi)) / 6)
        ew += (b - a) - integ
    return float(ew)


def indices_ref(loglam, flux, ivar, ormask, rv, bands, max_gap=2):
    """Reference of :func:`mspec.indices_kernels.indices_spectrum` for one spectrum.

    Parameters
    ----------
    loglam, flux, ivar, ormask : 1-D arrays
        Native spectrum (log10 vacuum Angstrom).
    rv : float
        km/s.
    bands : mapping
        ``{"ratios": [(num, den) x 5], "features": [(lines, conts) x 3], "zeta": (4,)}``
        with windows as ``(lo, hi)`` vacuum Angstrom (see :func:`mspec.indices.band_table`).
    max_gap : int
        Most consecutive bad pixels inside a window.

    Returns
    -------
    (numpy.ndarray, int)
        The 9 outputs and the status code.
    """
    out = np.full(N_OUT, np.nan)
    if not np.isfinite(rv) or not abs(rv) < C_KMS:
        return out, STATUS_NO_RV
    flux = np.asarray(flux, np.float64)
    good = (np.asarray(ormask) == 0) & (np.asarray(ivar) > 0) & np.isfinite(flux)
    if good.sum() < 2:
        return out, STATUS_NO_GOOD_PIXELS
    wave = 10.0 ** np.asarray(loglam, np.float64) / (1.0 + rv / C_KMS)
    ig = np.flatnonzero(good)
    wg, fg = wave[ig], flux[ig]
    nfeat = len(bands["features"])
    for q, (num, den) in enumerate(bands["ratios"]):
        col = q if q < 3 else 4 + nfeat + (q - 3)  # zro, c2 after the EWs
        n_ = window_mean_ref(wg, fg, ig, *num, max_gap)
        d_ = window_mean_ref(wg, fg, ig, *den, max_gap)
        if d_ > 0 and np.isfinite(n_):
            out[col] = n_ / d_
    cah = out[0] + out[1]
    ref = np.polynomial.polynomial.polyval(cah, bands["zeta"])
    if np.isfinite(ref) and np.isfinite(out[2]) and 1 - ref > 0:
        out[3] = (1 - out[2]) / (1 - ref)
    for f, (lines, conts) in enumerate(bands["features"]):
        out[4 + f] = feature_ew_ref(wg, fg, ig, lines, conts, max_gap)
    nfin = int(np.isfinite(out).sum())
    if nfin == N_OUT:
        return out, STATUS_OK
    return out, (STATUS_NONE if nfin == 0 else STATUS_PARTIAL)
