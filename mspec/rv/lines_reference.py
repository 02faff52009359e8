"""Plain numpy/scipy reference of the line-by-line RVs (slow, readable; used by the tests).

Same recipe as :mod:`mspec.rv.lines_kernels` (window, neighbour masks, starting values,
outlier passes, status order, DSAL I / DSAL II / DSEL rules, Hα equivalent width), written
with numpy array operations. Two optimisers for the profile fit:

* ``optimizer="lm"`` (default): a vectorised numpy Levenberg–Marquardt with the kernel's
  damping schedule, so that it follows the same path through the multi-modal χ² landscapes
  of real M-dwarf windows (molecular bands): the tests hold the kernel to it within
  1e-3 km/s and the same status on real spectra too;
* ``optimizer="curve_fit"``: :func:`scipy.optimize.curve_fit` (MINPACK LM), an independent
  check that the kernel finds the least-squares optimum (synthetic spectra, one minimum).
"""

from __future__ import annotations

import math
import warnings

import numpy as np
from scipy.optimize import OptimizeWarning, curve_fit

from mspec.rv import lines_kernels as K
from mspec.variables import C_KMS

__all__ = [
    "profile",
    "fit_line_ref",
    "halpha_ew_ref",
    "dsal1_ref",
    "clip_1sigma_ref",
    "lines_spectrum_ref",
]

_FWHM = 2.0 * math.sqrt(2.0 * math.log(2.0))


def profile(x, c0, c1, a, mu, s):
    """Gaussian on a linear continuum, ``c0 + c1 x + a exp(-(x - mu)² / 2 s²)``."""
    return c0 + c1 * x + a * np.exp(-0.5 * (x - mu) ** 2 / s**2)


def _good(flux, ivar, ormask):
    return (ormask == 0) & (ivar > 0) & np.isfinite(ivar) & np.isfinite(flux)


def _jacobian(x, p):
    g = np.exp(-0.5 * (x - p[3]) ** 2 / p[4] ** 2)
    return np.stack(
        [
            np.ones_like(x),
            x,
            g,
            p[2] * g * (x - p[3]) / p[4] ** 2,
            p[2] * g * (x - p[3]) ** 2 / p[4] ** 3,
        ],
        axis=1,
    )


def _lm(x, f, w, p0, max_iter):
    """Levenberg–Marquardt (numpy): Marquardt-scaled damping, ×10 / ÷10 schedule, stop when
    χ² falls by ≤ 1e-12 relative or no step lowers it. Returns (ok, params, None, chi2)."""
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        return _lm_steps(x, f, w, p0, max_iter)


def _lm_steps(x, f, w, p0, max_iter):
    p = np.array(p0, dtype=np.float64)

    def chi2_of(q):
        return float(np.sum(w * (f - profile(x, *q)) ** 2))

    chi2 = chi2_of(p)
    if not np.isfinite(chi2):
        return False, p, None, chi2
    lam = 1e-3
    for _ in range(max_iter):
        jac = _jacobian(x, p)
        r = f - profile(x, *p)
        a = jac.T @ (w[:, None] * jac)
        b = jac.T @ (w * r)
        accepted = False
        for _t in range(30):
            m = a + np.diag(np.diag(a) * lam + 1e-300)
            try:
                d = np.linalg.solve(m, b)
            except np.linalg.LinAlgError:
                d = None
            if d is not None and np.all(np.isfinite(d)):
                trial = p + d
                if abs(trial[4]) > 1e-3:
                    c_new = chi2_of(trial)
                    if c_new < chi2:
                        accepted = True
                        break
            lam *= 10.0
        if not accepted:
            p[4] = abs(p[4])
            return True, p, None, chi2
        gain = chi2 - c_new
        p, chi2 = trial, c_new
        lam = max(lam * 0.1, 1e-12)
        if gain <= 1e-12 * chi2:
            p[4] = abs(p[4])
            return True, p, None, chi2
    p[4] = abs(p[4])
    return False, p, None, chi2


def _fit(x, f, w, p0, max_iter, optimizer="lm"):
    """Fit the profile to the pixels given; returns (ok, params, cov, chi2)."""
    if optimizer == "lm":
        return _lm(x, f, w, p0, max_iter)
    if optimizer != "curve_fit":
        raise ValueError(f"optimizer={optimizer!r} must be 'lm' or 'curve_fit'")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", OptimizeWarning)
        return _fit_quiet(x, f, w, p0, max_iter)


def _fit_quiet(x, f, w, p0, max_iter):
    try:
        p, cov = curve_fit(
            profile,
            x,
            f,
            p0=p0,
            sigma=1.0 / np.sqrt(w),
            absolute_sigma=True,
            method="lm",
            maxfev=max_iter * 20,
            xtol=1e-12,
            ftol=1e-14,
        )
    except (RuntimeError, ValueError):
        return False, p0, None, math.nan
    p = np.array(p, dtype=np.float64)
    p[4] = abs(p[4])
    chi2 = float(np.sum(w * (f - profile(x, *p)) ** 2))
    return bool(np.all(np.isfinite(p))), p, cov, chi2


def fit_line_ref(
    wave,
    flux,
    ivar,
    ormask,
    lam0,
    sign,
    rv_init,
    other,
    cfg: K.LineConfig,
    params=None,
    optimizer="lm",
):
    """One line of one spectrum; see :func:`mspec.rv.lines_kernels.fit_line`.

    ``optimizer``: ``"lm"`` (numpy Levenberg–Marquardt) or ``"curve_fit"`` (scipy).

    ``params``, a dict if given, receives the fitted ``c0, c1, a, mu, s`` (``mu`` in Å from
    the predicted centre, ``s`` in units of the instrumental σ), for inspection.

    Returns
    -------
    status : int
    rv, err : float
        km/s (NaN unless status 0).
    """
    nan = math.nan
    if not np.isfinite(rv_init) or abs(rv_init) >= C_KMS:
        return K.STATUS_NO_RV_INIT, nan, nan
    z1 = 1.0 + rv_init / C_KMS
    lam_c = lam0 * z1
    sig_inst = lam_c / (_FWHM * cfg.resolution)
    inwin = (wave >= lam_c - cfg.half_window) & (wave <= lam_c + cfg.half_window)
    good = inwin & _good(flux, ivar, ormask)
    if not good.any():
        return K.STATUS_NO_DATA, nan, nan
    other = np.asarray(other, dtype=np.float64)
    other = other[other != lam0]
    near = (np.abs(wave[:, None] - other[None, :] * z1) <= cfg.neighbour_mask * sig_inst).any(1)
    use = good & ~near
    x = wave[use] - lam_c
    f = flux[use].astype(np.float64)
    w = ivar[use].astype(np.float64)
    if x.size < cfg.min_pixels or np.sum(np.abs(x) <= 2.0 * sig_inst) < 3:
        return K.STATUS_FEW_PIXELS, nan, nan
    # starting values
    nq = max(2, x.size // 4)
    fl, fr = np.median(f[:nq]), np.median(f[-nq:])
    xl, xr = np.mean(x[:nq]), np.mean(x[-nq:])
    c1 = (fr - fl) / (xr - xl) if xr > xl else 0.0
    c0 = fl - c1 * xl
    core = np.abs(x) <= sig_inst
    a0 = float(np.mean(f[core] - c0 - c1 * x[core])) if core.any() else 0.0
    floor = 0.05 * abs(c0) + 1e-30
    if sign * a0 < floor:
        a0 = sign * floor
    ok, p, cov, chi2 = _fit(x, f, w, np.array([c0, c1, a0, 0.0, sig_inst]), cfg.max_iter, optimizer)
    if not ok:
        return K.STATUS_FIT_FAILED, nan, nan
    keep = np.ones(x.size, dtype=bool)
    for _ in range(cfg.n_clip):
        z = np.abs(f - profile(x, *p)) * np.sqrt(w)
        thr = cfg.clip * max(1.0, 1.4826 * np.median(z[keep]))
        rej = keep & (z > thr)
        if not rej.any() or keep.sum() - rej.sum() < cfg.min_pixels:
            break
        keep &= ~rej
        ok, p, cov, chi2 = _fit(x[keep], f[keep], w[keep], p, cfg.max_iter, optimizer)
        if not ok:
            return K.STATUS_FIT_FAILED, nan, nan
    if params is not None:
        params.update(zip(("c0", "c1", "a", "mu", "s"), p, strict=True))
        params["s"] /= sig_inst
    if sign * p[2] <= 0:
        return K.STATUS_WRONG_SIGN, nan, nan
    if abs(p[3]) > 0.5 * cfg.half_window:
        return K.STATUS_EDGE, nan, nan
    if not (cfg.min_width * sig_inst <= p[4] <= cfg.max_width * sig_inst):
        return K.STATUS_WIDTH, nan, nan
    n = int(keep.sum())
    # covariance at the solution from the analytic Jacobian (curve_fit's is the same matrix
    # up to MINPACK's finite differences)
    xk, wk = x[keep], w[keep]
    jac = _jacobian(xk, p)
    try:
        cov = np.linalg.inv(jac.T @ (wk[:, None] * jac))
    except np.linalg.LinAlgError:
        return K.STATUS_FIT_FAILED, nan, nan
    scale2 = max(1.0, chi2 / (n - 5)) if n > 5 else 1.0
    var_mu, var_a = cov[3, 3] * scale2, cov[2, 2] * scale2
    if params is not None:
        params["snr"] = abs(p[2]) / math.sqrt(var_a) if var_a > 0 else math.nan
    if not (var_mu > 0 and var_a > 0):
        return K.STATUS_FIT_FAILED, nan, nan
    if abs(p[2]) < cfg.min_snr * math.sqrt(var_a):
        return K.STATUS_WEAK, nan, nan
    return K.STATUS_OK, C_KMS * (lam_c + p[3] - lam0) / lam0, C_KMS * math.sqrt(var_mu) / lam0


def halpha_ew_ref(wave, dlam, flux, ivar, ormask, rv_init, bands=K.HALPHA_BANDS):
    """Hα equivalent width (rest Å, negative = emission) and error; see
    :func:`mspec.rv.lines_kernels.halpha_ew`."""
    if not np.isfinite(rv_init) or abs(rv_init) >= C_KMS:
        return math.nan, math.nan
    z1 = 1.0 + rv_init / C_KMS
    bands = np.asarray(bands, dtype=np.float64) * z1
    good = _good(flux, ivar, ormask)
    means = []
    for lo, hi in bands[1:]:
        sel = good & (wave >= lo) & (wave < hi)
        if sel.sum() < 5:
            return math.nan, math.nan
        means.append(flux[sel].astype(np.float64).mean())
    fc = 0.5 * (means[0] + means[1])
    if not fc > 0:
        return math.nan, math.nan
    band = (wave >= bands[0, 0]) & (wave < bands[0, 1])
    sel = band & good
    if band.sum() == 0 or sel.sum() < 0.8 * band.sum():
        return math.nan, math.nan
    dl = dlam[sel] / z1
    fac = band.sum() / sel.sum()
    ew = np.sum((1.0 - flux[sel] / fc) * dl) * fac
    err = math.sqrt(np.sum(dl**2 / (ivar[sel].astype(np.float64) * fc**2))) * fac
    return float(ew), float(err)


def dsal1_ref(v, e, k=3.0, tol=15.0, min_lines=3):
    """DSAL I on usable line RVs ``v`` with errors ``e`` (km/s): (rv, err, n_consistent)."""
    v, e = np.asarray(v, dtype=np.float64), np.asarray(e, dtype=np.float64)
    if v.size == 0:
        return math.nan, math.nan, 0
    cons = np.abs(v - np.median(v)) <= np.maximum(k * e, tol)
    n = int(cons.sum())
    if n < min_lines:
        return math.nan, math.nan, n
    return float(np.mean(v[cons])), float(np.std(v[cons], ddof=0)), n


def clip_1sigma_ref(v, e, max_std=20.0):
    """DSAL II / DSEL rule on usable line RVs (km/s): (rv, err, n_left)."""
    v, e = np.asarray(v, dtype=np.float64), np.asarray(e, dtype=np.float64)
    if v.size == 0:
        return math.nan, math.nan, 0
    if v.size == 1:
        return float(v[0]), float(e[0]), 1
    cur = v
    while True:
        m, s = cur.mean(), cur.std(ddof=0)
        if s < max_std:
            return float(m), float(s), cur.size
        nxt = cur[np.abs(cur - m) <= s]
        if nxt.size < 2 or nxt.size == cur.size:
            return float(m), float(s), cur.size
        cur = nxt


def lines_spectrum_ref(
    flux, ivar, ormask, loglam, rv_init, cfg=None, lines=None, optimizer="lm"
) -> dict:
    """Every output of the line-RV stage for one spectrum.

    Parameters
    ----------
    flux, ivar, ormask : numpy.ndarray
        One spectrum on the native grid.
    loglam : numpy.ndarray
        log10 vacuum wavelength (Å) of the pixels.
    rv_init : float
        Initial RV (km/s).
    cfg : LineConfig, optional
    lines : sequence, optional
        Line list (default :data:`mspec.rv.lines_kernels.LINES`).
    optimizer : {"lm", "curve_fit"}
        Profile-fit optimiser (module docstring).

    Returns
    -------
    dict
        ``rv_line``, ``rv_line_err``, ``line_status`` (per line), ``ew_halpha``, ``rv_dsal1``,
        ``rv_dsal1_err``, ``rv_dsal1_n``, ``rv_dsal2``, ``rv_dsal2_err``, ``rv_dsal2_n``,
        ``rv_dsel``, ``rv_dsel_err``, ``rv_dsel_n``.
    """
    cfg = K.LineConfig() if cfg is None else cfg
    _, lw, sign, _ = K.line_table(lines)
    loglam = np.asarray(loglam, dtype=np.float64)
    wave = 10.0**loglam
    dlam = wave * np.log(10.0) * np.gradient(loglam)
    flux = np.asarray(flux)
    ivar = np.asarray(ivar)
    ormask = np.asarray(ormask)
    res = [
        fit_line_ref(wave, flux, ivar, ormask, w0, sg, rv_init, lw, cfg, optimizer=optimizer)
        for w0, sg in zip(lw, sign)
    ]
    st = np.array([r[0] for r in res], dtype=np.int8)
    rv = np.array([r[1] for r in res])
    er = np.array([r[2] for r in res])
    ok_a = (st == 0) & (sign < 0)
    ok_e = (st == 0) & (sign > 0)
    ew, ew_err = halpha_ew_ref(wave, dlam, flux, ivar, ormask, rv_init)
    d1 = dsal1_ref(rv[ok_a], er[ok_a], cfg.dsal_k, cfg.dsal_tol, cfg.dsal_min_lines)
    d2 = clip_1sigma_ref(rv[ok_a], er[ok_a], cfg.max_std)
    ha = np.flatnonzero((sign > 0) & (np.abs(lw - 6564.60) < 1.0))
    detected = ew < -cfg.ew_min and ew < -cfg.ew_nsigma * ew_err
    if detected and ha.size and st[ha[0]] == 0:
        vh, eh = rv[ha[0]], er[ha[0]]
        near = np.abs(rv - vh) <= np.maximum(cfg.dsal_k * np.hypot(er, eh), cfg.dsal_tol)
        sel = ok_e & near
        d3 = clip_1sigma_ref(rv[sel], er[sel], cfg.max_std)
    else:
        d3 = (math.nan, math.nan, 0)
    out = dict(rv_line=rv, rv_line_err=er, line_status=st, ew_halpha=ew)
    for key, d in (("rv_dsal1", d1), ("rv_dsal2", d2), ("rv_dsel", d3)):
        out[key], out[f"{key}_err"], out[f"{key}_n"] = d
    return out
