"""Plain numpy reference of χ² template matching (slow, readable; used by the tests).

It follows the paper's recipe literally, with the documented choices of
:mod:`mspec.rv.chi2_kernels` (window, lattice velocities, Gaussian fit): every χ² is an
explicit weighted linear least-squares fit (:func:`numpy.linalg.lstsq`) of ``P4(x) S`` to the
observed pixels, the template being linearly interpolated (:func:`numpy.interp`) at the
pixels' rest wavelengths; step 2 really re-measures each of the shifted spectra on its own
21-point grid. The fast kernel must agree with it within 0.1 km/s.
"""

from __future__ import annotations

import math

import numpy as np

from mspec.rv import chi2_kernels as K
from mspec.variables import C_KMS

__all__ = ["chi2_ref", "measure_ref", "tm_spectrum_ref"]


def chi2_ref(o, w, x, s):
    """χ² = (1/N) Σ w (o - P4(x) s)² minimised over the 5 polynomial coefficients.

    Parameters
    ----------
    o, w, x, s : numpy.ndarray
        Observed flux, weights (0 = excluded), polynomial abscissa, template values.

    Returns
    -------
    chi2 : float
    coef : numpy.ndarray
        The 5 polynomial coefficients (in powers of ``x``).
    """
    good = w > 0
    sw = np.sqrt(w[good])
    design = np.vander(x[good], 5, increasing=True) * s[good, None]
    coef, *_ = np.linalg.lstsq(design * sw[:, None], o[good] * sw, rcond=None)
    r = o[good] - design @ coef
    return float(np.sum(w[good] * r * r) / good.sum()), coef


def measure_ref(v, chi2, halfwidth):
    """Argmin + Gaussian fit of a χ² curve: ``(mu, chi2_min, status)``."""
    j = int(np.argmin(chi2))
    if not np.isfinite(chi2[j]):
        return math.nan, math.nan, K.STATUS_FIT_FAILED
    if j in (0, chi2.size - 1):
        return math.nan, float(chi2[j]), K.STATUS_EDGE
    lo, hi = max(0, j - halfwidth), min(chi2.size, j + halfwidth + 1)
    mu, ymin, ok = K.gauss_fit(np.asarray(v, float), np.asarray(chi2, float), lo, hi)
    if not ok:
        return math.nan, float(chi2[j]), K.STATUS_FIT_FAILED
    return float(mu), float(ymin), K.STATUS_OK


def tm_spectrum_ref(flux, ivar, ormask, loglam, wave1a, flux1a, cfg: K.TMConfig):
    """Template-match one spectrum (the paper's TM), plain numpy.

    Parameters
    ----------
    flux, ivar, ormask : numpy.ndarray
        One observed spectrum on the native grid ``loglam`` (step 1 only: no interpolation).
    loglam : numpy.ndarray
        Native log10(λ/Å), uniform with step ``cfg.dloglam``.
    wave1a : numpy.ndarray
        Template grid (Å, uniform 1 Å).
    flux1a : numpy.ndarray
        ``(T, grid)`` normalised templates (finite over the window + shift margin).
    cfg : TMConfig
        Settings.

    Returns
    -------
    dict
        ``rv``, ``err``, ``err_stat`` (km/s), ``template`` (index, -1 if none), ``chi2_min``,
        ``curve`` (χ² of the best template on the trial grid), ``status``, ``residuals``
        (step-2 residuals, km/s).
    """
    finite = np.isfinite(flux1a).all(axis=0)
    i0, n = cfg.window(wave1a[finite][0], wave1a[finite][-1])
    sl = slice(i0, i0 + n)
    ll = np.asarray(loglam, np.float64)[sl]
    x = cfg.x(i0, n)
    o = np.asarray(flux, np.float64)[sl]
    iv = np.asarray(ivar, np.float64)[sl]
    # step 1 of the preprocessing: drop ormask != 0 (and pixels without data)
    good = (np.asarray(ormask)[sl] == 0) & (iv > 0) & np.isfinite(o) & np.isfinite(iv)
    if cfg.mask_tellurics:  # optional, not in the paper
        lam = 10.0**ll
        for lo, hi in K.TELLURIC_BANDS:
            good &= ~((lam >= lo) & (lam <= hi))
    w = np.where(good, iv if cfg.weighting == "ivar" else 1.0, 0.0)
    o = np.where(good, o, 0.0)
    nan = math.nan
    ntr = 2 * cfg.n_trial + 1
    out = dict(
        rv=nan,
        err=nan,
        err_stat=nan,
        template=-1,
        chi2_min=nan,
        curve=np.full(ntr, nan),
        status=K.STATUS_OK,
        residuals=np.array([]),
    )
    if good.sum() < cfg.min_pixels:
        out["status"] = K.STATUS_NO_COVERAGE
        return out
    mt, vt = cfg.trial_index, cfg.trial_velocity
    h = cfg.h

    def template_at(t, m):
        # template shifted by lattice index m, at the observed pixels
        return np.interp(10.0 ** (ll - m * h), wave1a, flux1a[t])

    def curve_of(t, m0=0, mshift=0):
        return np.array([chi2_ref(o, w, x, template_at(t, m0 + m - mshift))[0] for m in mt])

    # step 1: best template and initial RV
    fits = []
    curves = []
    for t in range(flux1a.shape[0]):
        c = curve_of(t)
        curves.append(c)
        fits.append(measure_ref(vt, c, cfg.fit_halfwidth))
    ok = [t for t, f in enumerate(fits) if f[2] == K.STATUS_OK]
    best = min(ok, key=lambda t: fits[t][1]) if ok else int(np.argmin([c.min() for c in curves]))
    out["template"] = best
    out["curve"] = curves[best]
    c = curves[best]
    if not (c.max() - c.min() > 1e-12 * abs(c.max())):
        out["status"] = K.STATUS_FLAT_CHI2
        out["chi2_min"] = float(c.min())
        return out
    if not ok:
        out["status"] = (
            K.STATUS_EDGE if any(f[2] == K.STATUS_EDGE for f in fits) else K.STATUS_FIT_FAILED
        )
        out["chi2_min"] = float(c.min())
        return out
    out["chi2_min"] = fits[best][1]
    # step 2: remove the initial RV (on the lattice), shift by s, measure again
    m0 = int(cfg.to_index(fits[best][0]))
    res = []
    for m_s, v_s in zip(cfg.shift_index, cfg.shift_velocity):
        mu, _, code = measure_ref(vt, curve_of(best, m0, m_s), cfg.fit_halfwidth)
        if code == K.STATUS_OK:
            res.append(C_KMS * ((1 + mu / C_KMS) / (1 + v_s / C_KMS) - 1))
    res = np.array(res)
    out["residuals"] = res
    if 2 * res.size < len(cfg.shifts):
        out["status"] = K.STATUS_SHIFT_FAILED
        return out
    v0 = float(cfg.to_velocity(m0))
    rv = C_KMS * ((1 + v0 / C_KMS) * (1 + res.mean() / C_KMS) - 1)
    out["rv"] = rv
    out["err"] = float(res.std())
    # statistical error: linearised LS fit, pixel variance from the squared residuals
    # (HC0 sandwich), at the final RV (nearest lattice point)
    mf = int(cfg.to_index(rv))
    s_mid = template_at(best, mf)
    _, coef = chi2_ref(o, w, x, s_mid)
    poly = np.vander(x, 5, increasing=True) @ coef
    dv = float(cfg.to_velocity(mf + 1) - cfg.to_velocity(mf - 1))
    g = poly * (template_at(best, mf + 1) - template_at(best, mf - 1)) / dv
    cols = np.vander(x, 5, increasing=True) * s_mid[:, None]
    sw = np.sqrt(w)
    beta, *_ = np.linalg.lstsq(cols * sw[:, None], g * sw, rcond=None)
    gp = np.where(good, g - cols @ beta, 0.0)
    resid = np.where(good, o - poly * s_mid, 0.0)
    out["err_stat"] = float(math.sqrt(np.sum(w**2 * resid**2 * gp**2)) / np.sum(w * gp**2))
    return out
