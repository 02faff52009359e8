"""Numba kernels for line-by-line radial velocities (paper: RVMM / DSAL I, DSAL II, DSEL).

Array level only (numpy + numba, no xarray). The plain numpy/scipy reference of the same
algorithm is :mod:`mspec.rv.lines_reference`; the lazy xarray wrapper is
:mod:`mspec.rv.lines`. ``docs/rv_lines.md`` explains every choice; in short:

* **Per line** (:data:`LINES`: 8 absorption lines, 8 emission lines — the Ca II triplet is in
  both lists): the predicted observed centre is ``λc = λ0 (1 + rv_init / c)`` (vacuum Å,
  the convention of ``rv_tm``). The window ``λc ± half_window`` (25 Å) keeps the good native
  pixels (``ormask == 0``, ``ivar > 0``, finite flux and ivar) outside ``±neighbour_mask`` σ
  of any other listed line's predicted centre (the Na I doublet, N II–Hα–N II, S II pair).
* **Profile**: ``F(x) = c0 + c1 x + A exp(-(x - μ)² / (2 s²))`` with ``x = λ - λc`` (Å),
  fitted by weighted (``ivar``) least squares with Levenberg–Marquardt, started at
  ``μ = 0``, ``s = σ_inst = λc / (2.3548 R)``, the continuum through the medians of the
  outer quarters of the window and ``A`` from the mean residual within ``±σ_inst``.
  Then up to ``n_clip`` passes reject pixels whose normalised residual exceeds
  ``clip × max(1, 1.4826 MAD)`` and refit (cosmic rays, unmodelled features).
* **Error**: the covariance ``(Jᵀ W J)⁻¹`` scaled by ``max(1, χ²/(n - 5))`` (model misfit
  inflates it, never deflates); ``rv_line = c (λc + μ - λ0) / λ0``,
  ``rv_line_err = c σ_μ / λ0`` (km/s).
* **Status** (:data:`STATUS_MEANINGS`; order of the checks in ``docs/rv_lines.md``): RVs
  are NaN unless status 0.
* **DSAL I** (:func:`dsal1`): the lines with status 0 whose RV is within
  ``max(k σ_i, tol)`` (3, 15 km/s) of their median are "consistent"; with at least
  ``min_lines`` (3) of them, RV = their mean and error = their standard deviation (ddof=0).
* **DSAL II** (:func:`clip_1sigma`): iterative 1σ clipping of the status-0 RVs until the
  standard deviation (ddof=0) is below ``max_std`` (20 km/s) with more than one value left;
  when a step would leave fewer than two values, the previous iteration's values are used;
  when nothing lies outside 1σ the iteration stops there. One value alone: itself, with its
  fit error. Standard deviations are population ones (ddof=0, numpy's default): with
  ddof=1 the paper's "fewer than two left" case never occurred in 200,000 random trials
  (at least two values always lie within 1σ), so the rule implies ddof=0.
* **Hα emission** (:func:`halpha_ew`): equivalent width (Å, rest frame, negative =
  emission) over 6557.61–6571.61 Å, continuum = the mean of the mean fluxes of
  6500–6550 Å and 6575–6625 Å (West et al. 2011 bands, vacuum, shifted by ``rv_init``).
  Emission is detected when ``EW < -ew_min`` (0.75 Å) and ``EW < -ew_nsigma σ_EW`` (3);
  then, if the Hα line fit has status 0, **DSEL** = :func:`clip_1sigma` on the emission
  lines with status 0 that agree with Hα within ``max(dsal_k √(σ_i² + σ_Hα²), dsal_tol)``.
  The Hα anchor is our addition: the other listed emission lines are usually absent in M
  dwarfs, and their windows hold molecular-band structure that a free fit takes for
  "emission" 100–200 km/s off (N II 6585 on the DR7 M dwarfs).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from mspec._numba import jit
from mspec.rv.chi2_kernels import solve_small_nb
from mspec.variables import C_KMS

__all__ = [
    "LINES",
    "STATUS_OK",
    "STATUS_NO_RV_INIT",
    "STATUS_NO_DATA",
    "STATUS_FEW_PIXELS",
    "STATUS_FIT_FAILED",
    "STATUS_EDGE",
    "STATUS_WRONG_SIGN",
    "STATUS_WIDTH",
    "STATUS_WEAK",
    "STATUS_MEANINGS",
    "HALPHA_BANDS",
    "LineConfig",
    "line_table",
    "fit_line",
    "halpha_ew",
    "dsal1",
    "clip_1sigma",
    "lines_block",
]

#: The paper's lines (Tables 5 and 6): (name, vacuum rest wavelength Å, kind). Absorption
#: lines first (DSAL), then emission lines (DSEL); the Ca II triplet is in both.
LINES = (
    ("KI_7667", 7667.0089, "absorption"),
    ("KI_7701", 7701.0825, "absorption"),
    ("NaI_8186", 8185.5054, "absorption"),
    ("NaI_8197", 8197.0766, "absorption"),
    ("TiI_8437", 8437.26, "absorption"),
    ("CaII_8500", 8500.36, "absorption"),
    ("CaII_8544", 8544.44, "absorption"),
    ("CaII_8665", 8664.52, "absorption"),
    ("NII_6550_em", 6549.86, "emission"),
    ("Halpha_6565_em", 6564.60, "emission"),
    ("NII_6585_em", 6585.27, "emission"),
    ("SII_6718_em", 6718.294, "emission"),
    ("SII_6733_em", 6732.673, "emission"),
    ("CaII_8500_em", 8500.36, "emission"),
    ("CaII_8544_em", 8544.44, "emission"),
    ("CaII_8665_em", 8664.52, "emission"),
)

#: Status codes of ``line_status`` (int8).
STATUS_OK = 0
STATUS_NO_RV_INIT = 1
STATUS_NO_DATA = 2
STATUS_FEW_PIXELS = 3
STATUS_FIT_FAILED = 4
STATUS_EDGE = 5
STATUS_WRONG_SIGN = 6
STATUS_WIDTH = 7
STATUS_WEAK = 8
STATUS_MEANINGS = {
    STATUS_OK: "ok",
    STATUS_NO_RV_INIT: "no initial RV (rv_init NaN)",
    STATUS_NO_DATA: "no data: no good pixel in the window",
    STATUS_FEW_PIXELS: "too few pixels: fewer than min_pixels in the window or 3 in the line core",
    STATUS_FIT_FAILED: "fit failed: no convergence or singular covariance",
    STATUS_EDGE: "centre at window edge: fitted centre in the outer quarter of the window",
    STATUS_WRONG_SIGN: "wrong sign of amplitude: emission for an absorption line or vice versa",
    STATUS_WIDTH: "width out of range: Gaussian sigma outside min_width..max_width x sigma_inst",
    STATUS_WEAK: "too weak: amplitude below min_snr times its error",
}

#: Hα equivalent-width bands (vacuum rest Å): line, blue continuum, red continuum
#: (West et al. 2011).
HALPHA_BANDS = ((6557.61, 6571.61), (6500.0, 6550.0), (6575.0, 6625.0))


@dataclass(frozen=True)
class LineConfig:
    """Settings of one line-RV run.

    Parameters
    ----------
    half_window : float
        Half width (Å) of the fit window around each predicted line centre.
    resolution : float
        Spectral resolving power R; ``σ_inst = λ / (2.3548 R)`` (Å) sets the starting width,
        the width bounds, the line core and the neighbour masks.
    min_pixels : int
        Fewer good pixels in a window gives status 3.
    min_snr : float
        ``|A| / σ_A`` below this gives status 8.
    min_width, max_width : float
        Allowed fitted Gaussian σ, in units of ``σ_inst`` (status 7 outside).
    neighbour_mask : float
        Pixels within this many ``σ_inst`` of another listed line's predicted centre are
        left out of a window.
    clip : float
        Outlier rejection threshold (robust normalised residual), ``n_clip`` passes.
    n_clip : int
        Maximum number of rejection passes (0: none).
    max_iter : int
        Levenberg–Marquardt iterations before status 4.
    dsal_k, dsal_tol : float
        DSAL I consistency: ``|v_i - median| <= max(dsal_k σ_i, dsal_tol)`` (σ_i, tol km/s).
    dsal_min_lines : int
        DSAL I needs at least this many consistent lines.
    max_std : float
        DSAL II / DSEL clipping stops when the standard deviation is below this (km/s).
    ew_min : float
        Hα emission needs ``ew_halpha < -ew_min`` (Å)...
    ew_nsigma : float
        ... and ``ew_halpha < -ew_nsigma σ_EW``.
    """

    half_window: float = 25.0
    resolution: float = 1800.0
    min_pixels: int = 10
    min_snr: float = 3.0
    min_width: float = 0.4
    max_width: float = 4.0
    neighbour_mask: float = 3.0
    clip: float = 5.0
    n_clip: int = 2
    max_iter: int = 200
    dsal_k: float = 3.0
    dsal_tol: float = 15.0
    dsal_min_lines: int = 3
    max_std: float = 20.0
    ew_min: float = 0.75
    ew_nsigma: float = 3.0

    def __post_init__(self):
        pos = (
            "half_window",
            "resolution",
            "min_snr",
            "min_width",
            "clip",
            "dsal_tol",
            "max_std",
        )
        for name in pos:
            v = getattr(self, name)
            if not (isinstance(v, int | float) and math.isfinite(v) and v > 0):
                raise ValueError(f"{name}={v!r} must be a positive number")
        for name in ("neighbour_mask", "dsal_k", "ew_min", "ew_nsigma"):
            v = getattr(self, name)
            if not (isinstance(v, int | float) and math.isfinite(v) and v >= 0):
                raise ValueError(f"{name}={v!r} must be a non-negative number")
        if not self.max_width > self.min_width:
            raise ValueError(f"max_width={self.max_width!r} must exceed min_width")
        for name, lo in (("min_pixels", 6), ("n_clip", 0), ("max_iter", 1), ("dsal_min_lines", 2)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int | np.integer) or v < lo:
                raise ValueError(f"{name}={v!r} must be an integer >= {lo}")


def line_table(lines=None):
    """Names, rest wavelengths (Å) and signs (-1 absorption, +1 emission) of a line list.

    Parameters
    ----------
    lines : sequence of (str, float, str), optional
        ``(name, vacuum wavelength Å, "absorption" | "emission")``; default :data:`LINES`.

    Returns
    -------
    names : numpy.ndarray of str
    wave : numpy.ndarray of float64
    sign : numpy.ndarray of float64
    kind : numpy.ndarray of str

    Raises
    ------
    ValueError
        Empty list, duplicate names, a kind other than absorption/emission or a
        non-positive wavelength.
    """
    lines = LINES if lines is None else tuple(lines)
    if not lines:
        raise ValueError("lines must hold at least one line")
    try:
        names = np.array([str(n) for n, _, _ in lines])
        wave = np.array([float(w) for _, w, _ in lines], dtype=np.float64)
        kind = np.array([str(k) for _, _, k in lines])
    except (TypeError, ValueError):
        raise ValueError("lines must be (name, wavelength, kind) triples") from None
    if len(set(names)) != names.size:
        raise ValueError("lines: names must be unique")
    if not np.all(np.isin(kind, ["absorption", "emission"])):
        raise ValueError("lines: kind must be 'absorption' or 'emission'")
    if not np.all(np.isfinite(wave) & (wave > 0)):
        raise ValueError("lines: wavelengths must be positive")
    sign = np.where(kind == "emission", 1.0, -1.0)
    return names, wave, sign, kind


# --- small dense solver ------------------------------------------------------------------


@jit
def _solve(mat, rhs, out):
    """Solve ``mat @ out = rhs`` (the TM solver); False if singular or not finite."""
    if not solve_small_nb(mat, rhs, out):
        return False
    for k in range(out.size):
        if not math.isfinite(out[k]):
            return False
    return True


# --- the profile fit -----------------------------------------------------------------------


@jit
def _chi2(x, f, w, use, p):
    c = 0.0
    inv2s2 = 0.5 / (p[4] * p[4])
    for i in range(x.size):
        if use[i]:
            d = x[i] - p[3]
            r = f[i] - (p[0] + p[1] * x[i] + p[2] * math.exp(-d * d * inv2s2))
            c += w[i] * r * r
    return c


@jit
def _normal(x, f, w, use, p, jtj, jtr):
    """Fill ``JᵀWJ`` and ``JᵀW r`` at ``p``."""
    jtj[:] = 0.0
    jtr[:] = 0.0
    jac = np.empty(5)
    s = p[4]
    for i in range(x.size):
        if not use[i]:
            continue
        d = x[i] - p[3]
        g = math.exp(-0.5 * d * d / (s * s))
        jac[0] = 1.0
        jac[1] = x[i]
        jac[2] = g
        jac[3] = p[2] * g * d / (s * s)
        jac[4] = p[2] * g * d * d / (s * s * s)
        r = f[i] - (p[0] + p[1] * x[i] + p[2] * g)
        for a in range(5):
            wa = w[i] * jac[a]
            jtr[a] += wa * r
            for b in range(a, 5):
                jtj[a, b] += wa * jac[b]
    for a in range(5):
        for b in range(a):
            jtj[a, b] = jtj[b, a]


@jit
def lm_fit(x, f, w, use, p, max_iter):
    """Levenberg–Marquardt fit of ``c0 + c1 x + A exp(-(x-μ)²/2s²)`` to the ``use`` pixels.

    Parameters
    ----------
    x, f, w : numpy.ndarray
        Abscissa (Å from the predicted centre), flux, weights (ivar).
    use : numpy.ndarray of bool
        Pixels taking part.
    p : numpy.ndarray
        ``[c0, c1, A, μ, s]``: start on input, solution on output (``s > 0``).
    max_iter : int
        Iterations before giving up.

    Returns
    -------
    ok : bool
        Converged (χ² no longer decreases by more than 1e-12 relative, or no step improves).
    chi2 : float
        Weighted χ² at the solution.
    """
    jtj = np.empty((5, 5))
    jtr = np.empty(5)
    mat = np.empty((5, 5))
    delta = np.empty(5)
    trial = np.empty(5)
    lam = 1e-3
    chi2 = _chi2(x, f, w, use, p)
    if not math.isfinite(chi2):
        return False, chi2
    for _ in range(max_iter):
        _normal(x, f, w, use, p, jtj, jtr)
        accepted = False
        for _t in range(30):
            for a in range(5):
                for b in range(5):
                    mat[a, b] = jtj[a, b]
                mat[a, a] = jtj[a, a] * (1.0 + lam) + 1e-300
            if _solve(mat, jtr, delta):
                for a in range(5):
                    trial[a] = p[a] + delta[a]
                if abs(trial[4]) > 1e-3:
                    c_new = _chi2(x, f, w, use, trial)
                    if c_new < chi2:
                        accepted = True
                        break
            lam *= 10.0
        if not accepted:
            p[4] = abs(p[4])
            return True, chi2
        gain = chi2 - c_new
        for a in range(5):
            p[a] = trial[a]
        chi2 = c_new
        lam = max(lam * 0.1, 1e-12)
        if gain <= 1e-12 * chi2:
            p[4] = abs(p[4])
            return True, chi2
    p[4] = abs(p[4])
    return False, chi2


@jit
def _initial(x, f, use, sign, sig_inst, p):
    """Starting values: continuum through the outer-quarter medians, μ = 0, s = σ_inst."""
    n = 0
    for i in range(x.size):
        if use[i]:
            n += 1
    xs = np.empty(n)
    fs = np.empty(n)
    k = 0
    for i in range(x.size):
        if use[i]:
            xs[k] = x[i]
            fs[k] = f[i]
            k += 1
    nq = max(2, n // 4)
    fl = np.median(fs[:nq])
    fr = np.median(fs[n - nq :])
    xl = np.mean(xs[:nq])
    xr = np.mean(xs[n - nq :])
    c1 = (fr - fl) / (xr - xl) if xr > xl else 0.0
    c0 = fl - c1 * xl
    acc = 0.0
    m = 0
    for i in range(n):
        if abs(xs[i]) <= sig_inst:
            acc += fs[i] - (c0 + c1 * xs[i])
            m += 1
    a0 = acc / m if m > 0 else 0.0
    floor = 0.05 * abs(c0) + 1e-30
    if sign * a0 < floor:
        a0 = sign * floor
    p[0] = c0
    p[1] = c1
    p[2] = a0
    p[3] = 0.0
    p[4] = sig_inst


@jit
def fit_line(
    wave,
    flux,
    ivar,
    ormask,
    lam0,
    sign,
    rv_init,
    other,
    half_window,
    resolution,
    min_pixels,
    min_snr,
    min_width,
    max_width,
    neighbour_mask,
    clip,
    n_clip,
    max_iter,
):
    """Fit one line of one spectrum.

    Parameters
    ----------
    wave : numpy.ndarray
        Observed vacuum wavelength of every native pixel (Å, increasing).
    flux, ivar, ormask : numpy.ndarray
        One spectrum.
    lam0 : float
        Rest wavelength (Å, vacuum).
    sign : float
        -1 absorption, +1 emission.
    rv_init : float
        Initial RV (km/s).
    other : numpy.ndarray
        Rest wavelengths (Å) of the other listed lines (masked in the window).
    half_window, resolution, min_pixels, min_snr, min_width, max_width, neighbour_mask, clip,
    n_clip, max_iter
        See :class:`LineConfig`.

    Returns
    -------
    status : int
    rv : float
        km/s, NaN unless status 0.
    err : float
        km/s, NaN unless status 0.
    """
    nan = math.nan
    if not math.isfinite(rv_init) or abs(rv_init) >= C_KMS:
        return STATUS_NO_RV_INIT, nan, nan
    z1 = 1.0 + rv_init / C_KMS
    lam_c = lam0 * z1
    sig_inst = lam_c / (2.3548200450309493 * resolution)
    lo = np.searchsorted(wave, lam_c - half_window, side="left")
    hi = np.searchsorted(wave, lam_c + half_window, side="right")
    nw = hi - lo
    x = np.empty(max(nw, 0))
    f = np.empty(max(nw, 0))
    w = np.empty(max(nw, 0))
    use = np.zeros(max(nw, 0), dtype=np.bool_)
    n = 0
    n_good = 0
    n_core = 0
    for k in range(nw):
        i = lo + k
        x[k] = wave[i] - lam_c
        f[k] = flux[i]
        w[k] = ivar[i]
        if not (ormask[i] == 0 and ivar[i] > 0 and math.isfinite(ivar[i])):
            continue
        if not math.isfinite(flux[i]):
            continue
        n_good += 1
        masked = False
        for j in range(other.size):
            if abs(wave[i] - other[j] * z1) <= neighbour_mask * sig_inst and other[j] != lam0:
                masked = True
        if masked:
            continue
        use[k] = True
        n += 1
        if abs(x[k]) <= 2.0 * sig_inst:
            n_core += 1
    if n_good == 0:
        return STATUS_NO_DATA, nan, nan
    if n < min_pixels or n_core < 3:
        return STATUS_FEW_PIXELS, nan, nan
    p = np.empty(5)
    _initial(x, f, use, sign, sig_inst, p)
    ok, chi2 = lm_fit(x, f, w, use, p, max_iter)
    if not ok:
        return STATUS_FIT_FAILED, nan, nan
    for _ in range(n_clip):
        # robust scale of the normalised residuals
        z = np.empty(n)
        idx = np.empty(n, dtype=np.int64)
        m = 0
        inv2s2 = 0.5 / (p[4] * p[4])
        for k in range(x.size):
            if use[k]:
                d = x[k] - p[3]
                r = f[k] - (p[0] + p[1] * x[k] + p[2] * math.exp(-d * d * inv2s2))
                z[m] = abs(r) * math.sqrt(w[k])
                idx[m] = k
                m += 1
        scale = 1.4826 * np.median(z)
        thr = clip * max(1.0, scale)
        n_rej = 0
        for q in range(m):
            if z[q] > thr:
                n_rej += 1
        if n_rej == 0 or n - n_rej < min_pixels:
            break
        for q in range(m):
            if z[q] > thr:
                use[idx[q]] = False
        n -= n_rej
        ok, chi2 = lm_fit(x, f, w, use, p, max_iter)
        if not ok:
            return STATUS_FIT_FAILED, nan, nan
    if sign * p[2] <= 0:
        return STATUS_WRONG_SIGN, nan, nan
    if abs(p[3]) > 0.5 * half_window:
        return STATUS_EDGE, nan, nan
    if p[4] < min_width * sig_inst or p[4] > max_width * sig_inst:
        return STATUS_WIDTH, nan, nan
    jtj = np.empty((5, 5))
    jtr = np.empty(5)
    _normal(x, f, w, use, p, jtj, jtr)
    e3 = np.zeros(5)
    e3[3] = 1.0
    c3 = np.empty(5)
    if not _solve(jtj, e3, c3):
        return STATUS_FIT_FAILED, nan, nan
    e2 = np.zeros(5)
    e2[2] = 1.0
    c2 = np.empty(5)
    if not _solve(jtj, e2, c2):
        return STATUS_FIT_FAILED, nan, nan
    scale2 = max(1.0, chi2 / (n - 5)) if n > 5 else 1.0
    var_mu = c3[3] * scale2
    var_a = c2[2] * scale2
    if not (var_mu > 0 and var_a > 0):
        return STATUS_FIT_FAILED, nan, nan
    if abs(p[2]) < min_snr * math.sqrt(var_a):
        return STATUS_WEAK, nan, nan
    rv = C_KMS * (lam_c + p[3] - lam0) / lam0
    err = C_KMS * math.sqrt(var_mu) / lam0
    return STATUS_OK, rv, err


# --- Hα equivalent width ---------------------------------------------------------------------


@jit
def _band_mean(wave, flux, ivar, ormask, lo, hi):
    i0 = np.searchsorted(wave, lo, side="left")
    i1 = np.searchsorted(wave, hi, side="left")
    s = 0.0
    n = 0
    for i in range(i0, i1):
        if ormask[i] == 0 and ivar[i] > 0 and math.isfinite(ivar[i]) and math.isfinite(flux[i]):
            s += flux[i]
            n += 1
    return s, n


@jit
def halpha_ew(wave, dlam, flux, ivar, ormask, rv_init, bands):
    """Hα equivalent width (rest-frame Å; negative = emission) and its error.

    Parameters
    ----------
    wave, dlam : numpy.ndarray
        Pixel centres and widths (observed Å).
    flux, ivar, ormask : numpy.ndarray
        One spectrum.
    rv_init : float
        RV (km/s) that shifts the rest-frame bands.
    bands : numpy.ndarray
        ``(3, 2)``: line band, blue and red continuum bands (rest Å), :data:`HALPHA_BANDS`.

    Returns
    -------
    ew, ew_err : float
        NaN when ``rv_init`` is NaN, either continuum band has fewer than 5 good pixels, the
        line band has less than 80 % good pixels, or the continuum is not positive.
        ``EW = Σ (1 - F/Fc) Δλ/(1+z)`` over the good line-band pixels (pixel centre in the
        band), scaled by (all / good) pixels; ``σ_EW² = Σ (Δλ/(1+z))² / (ivar Fc²)``, same
        scaling.
    """
    nan = math.nan
    if not math.isfinite(rv_init) or abs(rv_init) >= C_KMS:
        return nan, nan
    z1 = 1.0 + rv_init / C_KMS
    sb, nb = _band_mean(wave, flux, ivar, ormask, bands[1, 0] * z1, bands[1, 1] * z1)
    sr, nr = _band_mean(wave, flux, ivar, ormask, bands[2, 0] * z1, bands[2, 1] * z1)
    if nb < 5 or nr < 5:
        return nan, nan
    fc = 0.5 * (sb / nb + sr / nr)
    if not fc > 0:
        return nan, nan
    i0 = np.searchsorted(wave, bands[0, 0] * z1, side="left")
    i1 = np.searchsorted(wave, bands[0, 1] * z1, side="left")
    ntot = i1 - i0
    if ntot <= 0:
        return nan, nan
    ew = 0.0
    var = 0.0
    ng = 0
    for i in range(i0, i1):
        if ormask[i] == 0 and ivar[i] > 0 and math.isfinite(ivar[i]) and math.isfinite(flux[i]):
            dl = dlam[i] / z1
            ew += (1.0 - flux[i] / fc) * dl
            var += dl * dl / (ivar[i] * fc * fc)
            ng += 1
    if ng < 0.8 * ntot:
        return nan, nan
    fac = ntot / ng
    return ew * fac, math.sqrt(var) * fac


# --- combining lines -------------------------------------------------------------------------


@jit
def _mean_std(v):
    n = v.size
    m = 0.0
    for i in range(n):
        m += v[i]
    m /= n
    s = 0.0
    for i in range(n):
        s += (v[i] - m) ** 2
    return m, math.sqrt(s / n)


@jit
def dsal1(v, e, k, tol, min_lines):
    """DSAL I: mean and std (ddof=0) of the lines consistent with the median.

    Parameters
    ----------
    v, e : numpy.ndarray
        RVs and errors (km/s) of the usable lines (status 0).
    k, tol : float
        Line ``i`` is consistent when ``|v_i - median(v)| <= max(k e_i, tol)``.
    min_lines : int
        Fewest consistent lines for a result.

    Returns
    -------
    rv, err : float
        km/s; NaN with fewer than ``min_lines`` consistent lines.
    n : int
        Number of consistent lines (0 when ``v`` is empty).
    """
    if v.size == 0:
        return math.nan, math.nan, 0
    med = np.median(v)
    keep = np.empty(v.size)
    n = 0
    for i in range(v.size):
        if abs(v[i] - med) <= max(k * e[i], tol):
            keep[n] = v[i]
            n += 1
    if n < min_lines:
        return math.nan, math.nan, n
    m, s = _mean_std(keep[:n])
    return m, s, n


@jit
def clip_1sigma(v, e, max_std):
    """DSAL II / DSEL: iterative 1σ clipping until std (ddof=0) < ``max_std``.

    Parameters
    ----------
    v, e : numpy.ndarray
        RVs and errors (km/s) of the usable lines.
    max_std : float
        km/s (20 in the paper).

    Returns
    -------
    rv, err : float
        Mean and std (ddof=0) of the values left (km/s). One value: itself and its error.
        None: NaN.
    n : int
        Number of values left.
    """
    if v.size == 0:
        return math.nan, math.nan, 0
    if v.size == 1:
        return v[0], e[0], 1
    cur = v.copy()
    while True:
        m, s = _mean_std(cur)
        if s < max_std:
            return m, s, cur.size
        nk = 0
        for i in range(cur.size):
            if abs(cur[i] - m) <= s:
                nk += 1
        if nk < 2 or nk == cur.size:
            return m, s, cur.size
        nxt = np.empty(nk)
        j = 0
        for i in range(cur.size):
            if abs(cur[i] - m) <= s:
                nxt[j] = cur[i]
                j += 1
        cur = nxt


# --- block kernel -------------------------------------------------------------------------


@jit
def lines_block(
    flux,
    ivar,
    ormask,
    wave,
    dlam,
    rv_init,
    line_wave,
    line_sign,
    ha,
    bands,
    half_window,
    resolution,
    min_pixels,
    min_snr,
    min_width,
    max_width,
    neighbour_mask,
    clip,
    n_clip,
    max_iter,
    dsal_k,
    dsal_tol,
    dsal_min_lines,
    max_std,
    ew_min,
    ew_nsigma,
    rv_line,
    rv_line_err,
    line_status,
    ew_out,
    comb,
    comb_n,
):
    """All lines of a block of spectra ``(n_spectra, npix)``; results written in place.

    ``ha`` is the index of Hα in the line list (-1: none, no DSEL). ``comb`` is
    ``(n_spectra, 6)``: rv_dsal1, rv_dsal1_err, rv_dsal2, rv_dsal2_err, rv_dsel,
    rv_dsel_err; ``comb_n`` ``(n_spectra, 3)``: their line counts.
    """
    ns = flux.shape[0]
    nl = line_wave.size
    for s in range(ns):
        for j in range(nl):
            st, rv, er = fit_line(
                wave,
                flux[s],
                ivar[s],
                ormask[s],
                line_wave[j],
                line_sign[j],
                rv_init[s],
                line_wave,
                half_window,
                resolution,
                min_pixels,
                min_snr,
                min_width,
                max_width,
                neighbour_mask,
                clip,
                n_clip,
                max_iter,
            )
            line_status[s, j] = st
            rv_line[s, j] = rv
            rv_line_err[s, j] = er
        ew, ew_err = halpha_ew(wave, dlam, flux[s], ivar[s], ormask[s], rv_init[s], bands)
        ew_out[s] = ew
        va = np.empty(nl)
        ea = np.empty(nl)
        ve = np.empty(nl)
        ee = np.empty(nl)
        na = 0
        ne = 0
        for j in range(nl):
            if line_status[s, j] != STATUS_OK:
                continue
            if line_sign[j] < 0:
                va[na] = rv_line[s, j]
                ea[na] = rv_line_err[s, j]
                na += 1
            else:
                ve[ne] = rv_line[s, j]
                ee[ne] = rv_line_err[s, j]
                ne += 1
        r1, e1, n1 = dsal1(va[:na], ea[:na], dsal_k, dsal_tol, dsal_min_lines)
        r2, e2, n2 = clip_1sigma(va[:na], ea[:na], max_std)
        r3 = math.nan
        e3 = math.nan
        n3 = 0
        if ha >= 0 and ew < -ew_min and ew < -ew_nsigma * ew_err:
            if line_status[s, ha] == STATUS_OK:
                vh = rv_line[s, ha]
                eh = rv_line_err[s, ha]
                m = 0
                for q in range(ne):
                    if abs(ve[q] - vh) <= max(dsal_k * math.sqrt(ee[q] ** 2 + eh**2), dsal_tol):
                        ve[m] = ve[q]
                        ee[m] = ee[q]
                        m += 1
                r3, e3, n3 = clip_1sigma(ve[:m], ee[:m], max_std)
        comb[s, 0] = r1
        comb[s, 1] = e1
        comb[s, 2] = r2
        comb[s, 3] = e2
        comb[s, 4] = r3
        comb[s, 5] = e3
        comb_n[s, 0] = n1
        comb_n[s, 1] = n2
        comb_n[s, 2] = n3
