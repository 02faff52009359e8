"""Numba kernels for χ² template-matching radial velocities (paper: RVMM / TM, TML7500).

This module holds the array-level algorithm (numpy + numba, no xarray). The readable plain
numpy version of the same algorithm is :mod:`mspec.rv.reference`; the xarray/dask wrapper is
:mod:`mspec.rv.template_match`. ``docs/rv.md`` explains every choice; in short:

* The observed spectrum gets preprocessing step 1 only: native pixels whose ``ormask`` is 0
  (and with ``ivar > 0`` and finite flux, i.e. with data) inside the observed-frame window
  ``[wave_min, wave_max]`` (4700–8899 Å; TML7500: up to 7500 Å).
* Velocities live on a lattice in log λ: ``h = dloglam / oversample`` (69 → 1.0005 km/s). A
  lattice index ``m`` means the Doppler factor ``1 + v/c = 10**(m h)``. The template, shifted
  by ``m``, is evaluated at the observed pixels' rest wavelengths ``10**(loglam_i - m h)`` by
  linear interpolation of the template's 1 Å grid (identical in the reference).
* The paper's trial velocities 60n km/s (n = -10..10) and shifts -500..500 km/s are the
  lattice velocities nearest to those values (each within 0.5 km/s); the fits use the exact
  lattice velocities as abscissae, so no bias comes from this.
* χ²(m) = (1/N) Σ w_i (O_i - P4(x_i) S_i)², P4 a degree-4 polynomial in λ (x is λ mapped
  linearly onto [-1, 1] over the window; the same polynomial space), fitted by linear least
  squares. w_i = 1 (the paper's eq. 2, default) or ``ivar`` (option). The fast kernel uses the
  normal equations on 14 float64 moment sums (Σ w x^k O S, k ≤ 4, Σ w x^p S², p ≤ 8):
  χ² = (Σ w O² - bᵀ A⁻¹ b) / N, exact up to rounding.
* The Gaussian fit ``y = c0 - A exp(-(v - μ)² / 2σ²)`` uses the 2W+1 trial points around the
  sampled minimum (W = ``fit_halfwidth`` = 2: 5 points, ±120 km/s), by Levenberg–Marquardt (:func:`gauss_fit`, the
  same code in numba and in the reference).
* Step 2: with the best template, the spectrum minus the initial RV (rounded to the lattice)
  and shifted by s is measured again on the 21-point grid. Because a shift is a lattice
  offset, every re-measurement reads the one χ² curve of the best template sampled at each
  lattice index (≈1 km/s) — the kernel computes that dense curve once.
"""

from __future__ import annotations

import math
import types
from dataclasses import dataclass, field

import numpy as np

from mspec._numba import jit
from mspec.variables import C_KMS

__all__ = [
    "STATUS_OK",
    "STATUS_NO_COVERAGE",
    "STATUS_FLAT_CHI2",
    "STATUS_FIT_FAILED",
    "STATUS_EDGE",
    "STATUS_SHIFT_FAILED",
    "STATUS_MEANINGS",
    "TMConfig",
    "gauss_fit",
    "gauss_fit_nb",
    "lattice_lambda",
    "trial_arrays",
    "trial_moments",
    "tm_block",
]

#: Status codes of ``tm_status`` / ``tml7500_status`` (int8).
STATUS_OK = 0
STATUS_NO_COVERAGE = 1
STATUS_FLAT_CHI2 = 2
STATUS_FIT_FAILED = 3
STATUS_EDGE = 4
STATUS_SHIFT_FAILED = 5
STATUS_MEANINGS = {
    STATUS_OK: "ok",
    STATUS_NO_COVERAGE: "no coverage: fewer than min_pixels usable pixels in the window",
    STATUS_FLAT_CHI2: "flat chi2: the best template's chi2 curve has no minimum",
    STATUS_FIT_FAILED: "fit failed: no template's Gaussian fit converged inside its window",
    STATUS_EDGE: "edge: chi2 minimum at the edge of the +-600 km/s grid (RV outside it)",
    STATUS_SHIFT_FAILED: "shift step failed: fewer than half of the re-measurements succeeded",
}

WEIGHTINGS = ("none", "ivar")
#: Observed-frame (vacuum Å) telluric absorption bands masked with ``mask_tellurics=True``:
#: O2 B band, H2O 7160-7340, O2 A band, H2O 8130-8360 (margins for the heliocentric shift).
TELLURIC_BANDS = ((6860.0, 6960.0), (7160.0, 7340.0), (7590.0, 7700.0), (8130.0, 8360.0))


@dataclass(frozen=True)
class TMConfig:
    """Settings of one template-matching run (everything the kernels need besides arrays).

    Parameters
    ----------
    loglam0, dloglam : float
        First value and step of the spectra's native log10(λ/Å) grid.
    npix : int
        Number of native pixels.
    wave_min, wave_max : float
        Observed-frame window (Å, vacuum). The paper: 4700–8899 Å; TML7500: ``wave_max=7500``.
    oversample : int
        Lattice steps per native pixel (69: 1.0005 km/s).
    trial_step : float
        Trial-velocity step (km/s), 60 in the paper.
    n_trial : int
        Trial grid is ``trial_step * n`` for ``n = -n_trial..n_trial`` (10 in the paper).
    shifts : tuple of float
        Step-2 shifts (km/s); ``-500..500`` by 1 in the paper.
    fit_halfwidth : int
        Number of trial points each side of the minimum used in the Gaussian fit.
    weighting : {"none", "ivar"}
        Pixel weights in χ²: ``"none"`` is the paper's eq. 2.
    min_pixels : int
        Fewer usable pixels in the window gives status "no coverage".
    mask_tellurics : bool
        Also drop the pixels of :data:`TELLURIC_BANDS` (observed frame). Not in the paper.
    dense_step : int
        Step 2 computes its dense χ² curve exactly where the re-measurements can use it and
        proves the rest higher from samples every ``dense_step`` lattice points (results
        identical to the full curve; see :func:`_dense_core`); 0 computes every point.
    """

    loglam0: float
    dloglam: float
    npix: int
    wave_min: float = 4700.0
    wave_max: float = 8899.0
    oversample: int = 69
    trial_step: float = 60.0
    n_trial: int = 10
    shifts: tuple = field(default_factory=lambda: tuple(float(s) for s in range(-500, 501)))
    fit_halfwidth: int = 2
    weighting: str = "none"
    min_pixels: int = 200
    mask_tellurics: bool = False
    dense_step: int = 10

    def __post_init__(self):
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"weighting={self.weighting!r} must be one of {WEIGHTINGS}")
        if not (self.wave_max > self.wave_min):
            raise ValueError(f"wave_max={self.wave_max!r} must exceed wave_min={self.wave_min!r}")
        if int(self.oversample) < 1:
            raise ValueError(f"oversample={self.oversample!r} must be a positive integer")
        if int(self.fit_halfwidth) < 2:
            raise ValueError(f"fit_halfwidth={self.fit_halfwidth!r} must be >= 2")
        if len(self.shifts) < 1:
            raise ValueError("shifts must hold at least one velocity")
        if int(self.dense_step) < 0:
            raise ValueError(f"dense_step={self.dense_step!r} must be >= 0")

    # --- lattice ------------------------------------------------------------------------
    @property
    def h(self) -> float:
        """Lattice step in log10 λ."""
        return self.dloglam / self.oversample

    def to_index(self, v) -> np.ndarray:
        """Nearest lattice index of velocity ``v`` (km/s)."""
        return np.rint(np.log10(1.0 + np.asarray(v, dtype=np.float64) / C_KMS) / self.h).astype(
            np.int64
        )

    def to_velocity(self, m) -> np.ndarray:
        """Velocity (km/s) of lattice index ``m``: ``c (10**(m h) - 1)``."""
        return C_KMS * (10.0 ** (np.asarray(m, dtype=np.float64) * self.h) - 1.0)

    @property
    def trial_index(self) -> np.ndarray:
        return self.to_index(self.trial_step * np.arange(-self.n_trial, self.n_trial + 1))

    @property
    def trial_velocity(self) -> np.ndarray:
        """The trial velocities actually used (km/s; lattice values nearest 60n)."""
        return self.to_velocity(self.trial_index)

    @property
    def shift_index(self) -> np.ndarray:
        return self.to_index(np.asarray(self.shifts, dtype=np.float64))

    @property
    def shift_velocity(self) -> np.ndarray:
        return self.to_velocity(self.shift_index)

    @property
    def max_velocity(self) -> float:
        """Largest |velocity| (km/s) at which a template may be evaluated."""
        s = np.abs(np.asarray(self.shifts, dtype=np.float64)).max()
        vt = self.trial_step * self.n_trial
        # initial RV (within the grid + a fit window) + trial grid + shift
        return float(2 * vt + self.trial_step + s + 5.0)

    def window(self, template_lo: float = 0.0, template_hi: float = np.inf) -> tuple[int, int]:
        """Native pixel range ``[i0, i0 + n)`` of the observed window.

        The window is shrunk where the template library (finite between ``template_lo`` and
        ``template_hi``, Å) would not cover every shifted evaluation.
        """
        f = 1.0 + self.max_velocity / C_KMS
        lo = max(self.wave_min, template_lo * f)
        hi = min(self.wave_max, template_hi / f)
        lam = 10.0 ** (self.loglam0 + self.dloglam * np.arange(self.npix))
        idx = np.nonzero((lam >= lo) & (lam <= hi))[0]
        if idx.size == 0:
            raise ValueError(
                f"the window {self.wave_min}-{self.wave_max} A has no native pixel covered by "
                f"the templates ({template_lo:.0f}-{template_hi:.0f} A)"
            )
        return int(idx[0]), int(idx[-1] - idx[0] + 1)

    def extra_mask(self) -> np.ndarray | None:
        """Native pixels dropped besides ``ormask`` (telluric bands), or None."""
        if not self.mask_tellurics:
            return None
        lam = 10.0 ** (self.loglam0 + self.dloglam * np.arange(self.npix))
        bad = np.zeros(self.npix, dtype=bool)
        for lo, hi in TELLURIC_BANDS:
            bad |= (lam >= lo) & (lam <= hi)
        return bad

    def apply_mask(self, ormask: np.ndarray) -> np.ndarray:
        """``ormask`` with the extra masked pixels set (a copy), or ``ormask`` itself."""
        bad = self.extra_mask()
        if bad is None:
            return ormask
        return np.where(bad, 1, ormask)

    def x(self, i0: int, n: int) -> np.ndarray:
        """Polynomial abscissa: λ mapped linearly from the nominal window onto [-1, 1]."""
        lam = 10.0 ** (self.loglam0 + self.dloglam * np.arange(i0, i0 + n))
        return (2.0 * lam - (self.wave_min + self.wave_max)) / (self.wave_max - self.wave_min)


# --- Gaussian fit (one implementation, run as Python by the reference, as numba here) ----


def solve_small(mat, rhs, out):
    """Solve ``mat @ out = rhs`` (small dense system) by Gaussian elimination with partial
    pivoting; returns False (``out`` undefined) if the matrix is singular. Plain Python so the
    reference and numba run the same code."""
    return solve_small_into(mat.copy(), rhs.copy(), out)


def solve_small_into(a, b, out):
    """:func:`solve_small` that overwrites ``a`` and ``b`` (no copies: for inner loops)."""
    n = b.size
    for c in range(n):
        piv = c
        for r in range(c + 1, n):
            if abs(a[r, c]) > abs(a[piv, c]):
                piv = r
        if not (abs(a[piv, c]) > 1e-300):
            return False
        if piv != c:
            for k in range(n):
                tmp = a[c, k]
                a[c, k] = a[piv, k]
                a[piv, k] = tmp
            tmp = b[c]
            b[c] = b[piv]
            b[piv] = tmp
        for r in range(c + 1, n):
            f = a[r, c] / a[c, c]
            for k in range(c, n):
                a[r, k] -= f * a[c, k]
            b[r] -= f * b[c]
    for r in range(n - 1, -1, -1):
        s = b[r]
        for k in range(r + 1, n):
            s -= a[r, k] * out[k]
        out[r] = s / a[r, r]
    return True


def _with_globals(func, **repl):
    """Copy of ``func`` whose global names in ``repl`` point elsewhere (for numba)."""
    g = dict(func.__globals__)
    g.update(repl)
    return types.FunctionType(func.__code__, g, func.__name__, func.__defaults__)


solve_small_into_nb = jit(solve_small_into)
solve_small_nb = jit(_with_globals(solve_small, solve_small_into=solve_small_into_nb), cache=False)
# gauss_fit calls ``_solve_into``: the plain function in Python, the numba one in the jitted copy
_solve_into = solve_small_into


def gauss_fit(v, y, lo, hi):
    """Fit ``y = c0 - A exp(-(v - mu)**2 / (2 sigma**2))`` to ``v[lo:hi], y[lo:hi]``.

    Levenberg–Marquardt on scaled variables (velocities in units of the mean point spacing
    around the sampled minimum, χ² scaled to [0, 1] over the points), started at the sampled
    minimum with ``sigma`` = 1.5 spacings. Plain Python/numpy code: the reference runs it as
    is, the kernels run the numba compilation :data:`gauss_fit_nb` of the same function.

    Parameters
    ----------
    v, y : numpy.ndarray
        Abscissae (km/s, increasing) and χ² values.
    lo, hi : int
        Slice of points to fit (at least 4 points).

    Returns
    -------
    mu : float
        Centre (km/s); NaN if the fit failed.
    ymin : float
        Fitted minimum ``c0 - A``; NaN if the fit failed.
    ok : bool
        Converged with ``A > 0``, ``sigma > 0`` and ``mu`` inside ``[v[lo], v[hi-1]]``.
    """
    m = hi - lo
    return gauss_fit_ws(v, y, lo, hi, np.empty(6 * m + 24), np.empty((m + 8, 4)))


def gauss_fit_ws(v, y, lo, hi, w1, w2):
    """:func:`gauss_fit` with caller-provided work arrays (no allocation per call).

    ``w1`` has at least ``6 (hi - lo) + 24`` and ``w2`` at least ``(hi - lo) + 8`` rows of 4
    float64 values; both are overwritten. The arithmetic is that of :func:`gauss_fit`.
    """
    m = hi - lo
    jmin = lo
    ymax = y[lo]
    for j in range(lo, hi):
        if y[j] < y[jmin]:
            jmin = j
        if y[j] > ymax:
            ymax = y[j]
    y0 = y[jmin]
    span = ymax - y0
    if m < 4 or not (span > 0.0) or not math.isfinite(span):
        return math.nan, math.nan, False
    v0 = v[jmin]
    dv = (v[hi - 1] - v[lo]) / (m - 1)
    t = w1[0:m]
    z = w1[m : 2 * m]
    r = w1[2 * m : 3 * m]
    rn = w1[3 * m : 4 * m]
    ex = w1[4 * m : 5 * m]  # the Gaussian at the current p, reused by the Jacobian
    exn = w1[5 * m : 6 * m]
    p = w1[6 * m : 6 * m + 4]
    pn = w1[6 * m + 4 : 6 * m + 8]
    step = w1[6 * m + 8 : 6 * m + 12]
    g = w1[6 * m + 12 : 6 * m + 16]
    gw = w1[6 * m + 16 : 6 * m + 20]
    jac = w2[0:m]
    jtj = w2[m : m + 4]
    mat = w2[m + 4 : m + 8]
    for j in range(m):
        t[j] = (v[lo + j] - v0) / dv
        z[j] = (y[lo + j] - y0) / span
    p[0] = 1.0
    p[1] = 1.0
    p[2] = 0.0
    p[3] = 1.5
    cost = 0.0
    for j in range(m):
        d = t[j] - p[2]
        ex[j] = math.exp(-0.5 * d * d / (p[3] * p[3]))
        r[j] = p[0] - p[1] * ex[j] - z[j]
        cost += r[j] * r[j]
    lam = 1e-3
    ok = False
    for _ in range(200):
        s2 = p[3] * p[3]
        for j in range(m):
            d = t[j] - p[2]
            e = ex[j]
            jac[j, 0] = 1.0
            jac[j, 1] = -e
            jac[j, 2] = -p[1] * e * d / s2
            jac[j, 3] = -p[1] * e * d * d / (s2 * p[3])
        for a_ in range(4):
            acc = 0.0
            for j in range(m):
                acc += jac[j, a_] * r[j]
            g[a_] = -acc
            for b_ in range(4):
                acc = 0.0
                for j in range(m):
                    acc += jac[j, a_] * jac[j, b_]
                jtj[a_, b_] = acc
        improved = False
        small = False
        while lam <= 1e12:
            for a_ in range(4):
                for b_ in range(4):
                    mat[a_, b_] = jtj[a_, b_]
                mat[a_, a_] += lam * max(jtj[a_, a_], 1e-12)
            for a_ in range(4):
                gw[a_] = g[a_]
            if _solve_into(mat, gw, step):
                for a_ in range(4):
                    pn[a_] = p[a_] + step[a_]
                if pn[3] > 0.0:
                    cn = 0.0
                    for j in range(m):
                        d = t[j] - pn[2]
                        exn[j] = math.exp(-0.5 * d * d / (pn[3] * pn[3]))
                        rn[j] = pn[0] - pn[1] * exn[j] - z[j]
                        cn += rn[j] * rn[j]
                    if cn <= cost:
                        smax = 0.0
                        for a_ in range(4):
                            smax = max(smax, abs(step[a_]))
                        small = (cost - cn) <= 1e-14 * (cost + 1e-30) or smax < 1e-10
                        for a_ in range(4):
                            p[a_] = pn[a_]
                        for j in range(m):
                            r[j] = rn[j]
                            ex[j] = exn[j]
                        cost = cn
                        lam = max(lam * 0.1, 1e-12)
                        improved = True
                        break
            lam *= 10.0
        if small or not improved:
            # converged, or no step lowers the cost: a (numerical) minimum
            ok = True
            break
    mu = v0 + p[2] * dv
    ymin = y0 + (p[0] - p[1]) * span
    good = (
        ok
        and p[1] > 0.0
        and p[3] > 0.0
        and math.isfinite(mu)
        and math.isfinite(ymin)
        and v[lo] <= mu <= v[hi - 1]
    )
    if not good:
        return math.nan, math.nan, False
    return mu, ymin, True


# rebound globals make a new function object that numba cannot cache on disk
gauss_fit_ws_nb = jit(_with_globals(gauss_fit_ws, _solve_into=solve_small_into_nb), cache=False)
gauss_fit_nb = jit(_with_globals(gauss_fit, gauss_fit_ws=gauss_fit_ws_nb), cache=False)


@jit
def _fit_curve(v, y, halfwidth):
    """Argmin + Gaussian fit of one χ² curve; returns (mu, ymin, code)."""
    m = 2 * halfwidth + 1
    return _fit_curve_ws(v, y, halfwidth, np.empty(6 * m + 24), np.empty((m + 8, 4)))


@jit
def _fit_curve_ws(v, y, halfwidth, w1, w2):
    """:func:`_fit_curve` with the work arrays of :func:`gauss_fit_ws`."""
    n = y.size
    j = 0
    for k in range(n):
        if y[k] < y[j]:
            j = k
    if not math.isfinite(y[j]):
        return math.nan, math.nan, STATUS_FIT_FAILED
    if j == 0 or j == n - 1:
        return math.nan, y[j], STATUS_EDGE
    lo = max(0, j - halfwidth)
    hi = min(n, j + halfwidth + 1)
    mu, ymin, ok = gauss_fit_ws_nb(v, y, lo, hi, w1, w2)
    if not ok:
        return math.nan, y[j], STATUS_FIT_FAILED
    return mu, ymin, STATUS_OK


# --- template lattice ----------------------------------------------------------------------


def lattice_lambda(cfg: TMConfig, i0: int, n: int) -> tuple[np.ndarray, int]:
    """Wavelengths (Å) of every lattice point the run can touch, and the first index.

    Lattice point ``j`` (from ``loglam0``) has log10 λ = loglam0 + j h; the observed pixel
    ``i`` is point ``i * oversample``.
    """
    mmax = int(np.ceil(np.log10(1.0 + cfg.max_velocity / C_KMS) / cfg.h)) + 2
    k = cfg.oversample
    jlo = i0 * k - mmax
    jhi = (i0 + n - 1) * k + mmax
    j = np.arange(jlo, jhi + 1, dtype=np.float64)
    return 10.0 ** (cfg.loglam0 + j * cfg.h), jlo


@jit
def _interp_uniform(lam, g0, flux):
    """Linear interpolation of ``flux`` on the uniform 1 Å grid starting at ``g0``."""
    u = lam - g0
    k = int(math.floor(u))
    if k < 0:
        k = 0
    if k > flux.size - 2:
        k = flux.size - 2
    f = u - k
    return flux[k] * (1.0 - f) + flux[k + 1] * f


@jit
def _shifted(flux, g0, lam_lat, jlo, i0, n, k, m, out):
    """Template shifted by lattice index ``m`` at the window pixels."""
    for i in range(n):
        out[i] = _interp_uniform(lam_lat[(i0 + i) * k - m - jlo], g0, flux)


@jit
def _polyphase(flux, g0, lam_lat, jlo, jbase, k, npoly):
    """``out[r, p]`` = template at lattice point ``jbase + p k + r`` (0 outside ``lam_lat``)."""
    out = np.zeros((k, npoly))
    for r in range(k):
        for p in range(npoly):
            j = jbase + p * k + r - jlo
            if 0 <= j < lam_lat.size:
                out[r, p] = _interp_uniform(lam_lat[j], g0, flux)
    return out


def trial_arrays(cfg: TMConfig, flux1a: np.ndarray, g0: float, i0: int, n: int):
    """Pre-shifted templates for the 21-point trial grid: ``(T, n_trial_points, n)`` float64."""
    lam_lat, jlo = lattice_lambda(cfg, i0, n)
    mt = cfg.trial_index
    out = np.empty((flux1a.shape[0], mt.size, n))
    _trial_fill(flux1a, g0, lam_lat, jlo, i0, n, cfg.oversample, mt, out)
    return out, lam_lat, jlo


@jit
def _trial_fill(flux1a, g0, lam_lat, jlo, i0, n, k, mt, out):
    for t in range(flux1a.shape[0]):
        for q in range(mt.size):
            _shifted(flux1a[t], g0, lam_lat, jlo, i0, n, k, mt[q], out[t, q])


# --- χ² from moment sums ---------------------------------------------------------------------


@jit
def _prep_obs(flux, ivar, ormask, x, i0, n, use_ivar, pw, qw):
    """Per-spectrum moment weights: pw[i, k] = w x^k O, qw[i, p] = w x^p; returns ΣwO², N."""
    sumo2 = 0.0
    nval = 0
    for i in range(n):
        o = flux[i0 + i]
        iv = ivar[i0 + i]
        good = ormask[i0 + i] == 0 and iv > 0.0 and math.isfinite(o) and math.isfinite(iv)
        if good:
            w = iv if use_ivar else 1.0
            nval += 1
        else:
            w = 0.0
            o = 0.0
        xp = 1.0
        for p in range(9):
            qw[i, p] = w * xp
            if p < 5:
                pw[i, p] = w * xp * o
            xp *= x[i]
        sumo2 += w * o * o
    return sumo2, nval


@jit
def _solve_chi2(b, a, sumo2, nval, coef):
    """χ² = (ΣwO² - bᵀA⁻¹b)/N with A the 5×5 Hankel matrix of a; Cholesky, float64."""
    mat = np.empty((5, 5))
    for r in range(5):
        for c in range(5):
            mat[r, c] = a[r + c]
    # Cholesky (in place, lower)
    for j in range(5):
        d = mat[j, j]
        for k in range(j):
            d -= mat[j, k] * mat[j, k]
        if not (d > 1e-300):
            return math.nan
        d = math.sqrt(d)
        mat[j, j] = d
        for i in range(j + 1, 5):
            s = mat[i, j]
            for k in range(j):
                s -= mat[i, k] * mat[j, k]
            mat[i, j] = s / d
    y = np.empty(5)
    for i in range(5):
        s = b[i]
        for k in range(i):
            s -= mat[i, k] * y[k]
        y[i] = s / mat[i, i]
    for i in range(4, -1, -1):
        s = y[i]
        for k in range(i + 1, 5):
            s -= mat[k, i] * coef[k]
        coef[i] = s / mat[i, i]
    btc = 0.0
    for i in range(5):
        btc += b[i] * coef[i]
    return (sumo2 - btc) / nval


@jit
def _chi2_slice(s, off, n, pw, qw, sumo2, nval, b, a, coef):
    """χ² of the observed spectrum against template values ``s[off:off+n]``."""
    b0 = b1 = b2 = b3 = b4 = 0.0
    a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = a8 = 0.0
    for i in range(n):
        v = s[off + i]
        v2 = v * v
        b0 += pw[i, 0] * v
        b1 += pw[i, 1] * v
        b2 += pw[i, 2] * v
        b3 += pw[i, 3] * v
        b4 += pw[i, 4] * v
        a0 += qw[i, 0] * v2
        a1 += qw[i, 1] * v2
        a2 += qw[i, 2] * v2
        a3 += qw[i, 3] * v2
        a4 += qw[i, 4] * v2
        a5 += qw[i, 5] * v2
        a6 += qw[i, 6] * v2
        a7 += qw[i, 7] * v2
        a8 += qw[i, 8] * v2
    b[0] = b0
    b[1] = b1
    b[2] = b2
    b[3] = b3
    b[4] = b4
    a[0] = a0
    a[1] = a1
    a[2] = a2
    a[3] = a3
    a[4] = a4
    a[5] = a5
    a[6] = a6
    a[7] = a7
    a[8] = a8
    return _solve_chi2(b, a, sumo2, nval, coef)


@jit
def trial_moments(trials, x, out):
    """``out[t, q, p]`` = Σ_i x_i^p S_tq,i² over every window pixel (p = 0..8)."""
    n = x.size
    for t in range(trials.shape[0]):
        for q in range(trials.shape[1]):
            s = trials[t, q]
            a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = a8 = 0.0
            for i in range(n):
                v2 = s[i] * s[i]
                xi = x[i]
                x2 = xi * xi
                x4 = x2 * x2
                a0 += v2
                a1 += v2 * xi
                a2 += v2 * x2
                a3 += v2 * x2 * xi
                a4 += v2 * x4
                a5 += v2 * x4 * xi
                a6 += v2 * x4 * x2
                a7 += v2 * x4 * x2 * xi
                a8 += v2 * x4 * x4
            out[t, q, 0] = a0
            out[t, q, 1] = a1
            out[t, q, 2] = a2
            out[t, q, 3] = a3
            out[t, q, 4] = a4
            out[t, q, 5] = a5
            out[t, q, 6] = a6
            out[t, q, 7] = a7
            out[t, q, 8] = a8


@jit
def _fill_dense_moments(flux, g0, lam_lat, jlo, i0, n, k, x, out):
    """``out[m + mm, p]`` = Σ_i x_i^p S_m,i² for every lattice shift |m| <= mm, over all
    window pixels (``mm = (len(out) - 1) // 2``)."""
    mm = (out.shape[0] - 1) // 2
    npoly = n + (2 * mm) // k + 1
    poly = _polyphase(flux, g0, lam_lat, jlo, i0 * k - mm, k, npoly)
    # accumulate privately, then store: another thread may be reading ``out`` (filled with
    # these same values by a concurrent call), so it must never see partial sums
    tmp = np.zeros((out.shape[0], 9))
    for m in range(-mm, mm + 1):
        d = mm - m
        row = poly[d % k]
        off = d // k
        for i in range(n):
            v2 = row[off + i] * row[off + i]
            xp = 1.0
            for p in range(9):
                tmp[m + mm, p] += xp * v2
                xp *= x[i]
    out[:, :] = tmp


@jit
def _chi2_premoments(s, n, pw, x, midx, nmask, ta, sumo2, nval, b, a, coef):
    """χ² for unit weights from precomputed template moments ``ta`` (all window pixels):
    only the 5 data sums run over the pixels; the masked pixels' S² moments are subtracted.
    Exact up to rounding (same normal equations as :func:`_chi2_slice`)."""
    b0 = b1 = b2 = b3 = b4 = 0.0
    for i in range(n):
        v = s[i]
        b0 += pw[i, 0] * v
        b1 += pw[i, 1] * v
        b2 += pw[i, 2] * v
        b3 += pw[i, 3] * v
        b4 += pw[i, 4] * v
    b[0] = b0
    b[1] = b1
    b[2] = b2
    b[3] = b3
    b[4] = b4
    for p in range(9):
        a[p] = ta[p]
    for j in range(nmask):
        i = midx[j]
        v2 = s[i] * s[i]
        xp = 1.0
        for p in range(9):
            a[p] -= xp * v2
            xp *= x[i]
    return _solve_chi2(b, a, sumo2, nval, coef)


@jit
def _dense_point(m, mhi, k, n, dc):
    """χ² of the best template at lattice index ``m`` from its polyphase lattice.

    ``dc`` = ``(poly, use_mom, mom, mm, pw, qw, x, midx, nmask, sumo2, nval, b, a, coef)``:
    the polyphase lattice, whether the precomputed template moments ``mom`` (rows offset by
    ``mm``) apply, and the spectrum's χ² pieces (see :func:`_chi2_premoments`)."""
    poly, use_mom, mom, mm, pw, qw, x, midx, nmask, sumo2, nval, b, a, coef = dc
    d = mhi - m
    off = d // k
    if use_mom:
        return _chi2_premoments(
            poly[d % k, off : off + n], n, pw, x, midx, nmask, mom[m + mm], sumo2, nval, b, a, coef
        )
    return _chi2_slice(poly[d % k], off, n, pw, qw, sumo2, nval, b, a, coef)


@jit
def _dense_fill(dense, mlo, mhi, k, n, dc):
    """Compute every point of the dense curve still at +inf; returns True."""
    for m in range(mlo, mhi + 1):
        if dense[m - mlo] == np.inf:
            dense[m - mlo] = _dense_point(m, mhi, k, n, dc)
    return True


@jit
def _dense_core(dense, mlo, mhi, m0, mt, ms, halfwidth, step, k, n, dc):
    """Fill the part of step 2's dense curve that the re-measurements can use.

    Every re-measurement's minimum and fit window lie within (halfwidth + 1.5) trial steps
    of the initial RV ``m0``: that core is computed exactly. The rest of the curve (about
    80% of the paper's 2,201 points) only has to be proven higher than every
    re-measurement's lowest core point; it is sampled every ``step`` lattice points, and
    when the lowest sample, less twice the largest change between neighbouring samples (a
    bound on what the curve can do between them), stays above that level the unsampled
    points are left at +inf. Otherwise (a curve without one clear minimum) every point is
    computed. Either way each re-measurement sees exactly the values of the full curve
    where they matter, so the results are identical to computing all points. Returns
    whether every point was computed.
    """
    tstep = mt[1] - mt[0]
    w = (halfwidth + 1) * tstep + tstep // 2 + 2
    clo = max(mlo, m0 - w)
    chi = min(mhi, m0 + w)
    ok = True
    for m in range(clo, chi + 1):
        v = _dense_point(m, mhi, k, n, dc)
        dense[m - mlo] = v
        if not math.isfinite(v):
            ok = False
    # the level to beat: the highest, over re-measurements, of its lowest core point
    level = -np.inf
    if ok:
        for si in range(ms.size):
            low = np.inf
            for q in range(mt.size):
                m = m0 + mt[q] - ms[si]
                if clo <= m <= chi and dense[m - mlo] < low:
                    low = dense[m - mlo]
            if low > level:
                level = low
        ok = level < np.inf
    # samples of the far parts, walking outwards from each end of the core
    far_min = np.inf
    max_step = 0.0
    for side in range(2):
        if not ok:
            break
        edge = clo if side == 0 else chi
        end = mlo if side == 0 else mhi
        sgn = -1 if side == 0 else 1
        prev = dense[edge - mlo]
        m = edge + sgn
        while ok and sgn * (m - end) <= 0:
            v = _dense_point(m, mhi, k, n, dc)
            dense[m - mlo] = v
            if not math.isfinite(v):
                ok = False
                break
            far_min = min(far_min, v)
            max_step = max(max_step, abs(v - prev))
            prev = v
            if m == end:
                break
            m += sgn * step
            if sgn * (m - end) > 0:
                m = end
    if ok and far_min - 2.0 * max_step > level:
        return False
    return _dense_fill(dense, mlo, mhi, k, n, dc)


@jit
def _stat_error(flux, i0, n, x, qw, smid, slo, shi, dv, coef):
    """Statistical RV error (km/s) from the χ² curvature, with residual (sandwich) variance.

    Model M = P4(x) S(v); g = dM/dv with P4 fixed, projected orthogonal (w-metric) to the 5
    columns x^k S (the polynomial is refitted with v); linearising the fit gives
    δv = Σ w g⊥ ε / Σ w g⊥², so var(v) = Σ w² var(ε_i) g⊥² / (Σ w g⊥²)². The pixel variance is
    estimated by the squared residual r_i² = (O - M)² (heteroscedasticity-consistent "HC0"
    sandwich): it includes template mismatch and any wrong ivar, which is why it is
    calibrated on simulations where an ivar-propagated error is not (``docs/rv.md``).
    """
    g = np.empty(n)
    cols = np.empty((n, 5))
    for i in range(n):
        pv = 0.0
        xp = 1.0
        for k in range(5):
            pv += coef[k] * xp
            cols[i, k] = xp * smid[i]
            xp *= x[i]
        g[i] = pv * (shi[i] - slo[i]) / dv
    # project g: solve (Xᵀ W X) β = Xᵀ W g
    xtx = np.zeros((5, 5))
    xtg = np.zeros(5)
    for i in range(n):
        w = qw[i, 0]
        if w == 0.0:
            continue
        for r in range(5):
            xtg[r] += w * cols[i, r] * g[i]
            for c in range(5):
                xtx[r, c] += w * cols[i, r] * cols[i, c]
    beta = np.empty(5)
    if not solve_small_nb(xtx, xtg, beta):
        return math.nan
    num = 0.0
    den = 0.0
    for i in range(n):
        w = qw[i, 0]
        if w == 0.0:
            continue
        model = 0.0
        gp = g[i]
        for k in range(5):
            model += coef[k] * cols[i, k]
            gp -= cols[i, k] * beta[k]
        res = flux[i0 + i] - model
        den += w * gp * gp
        num += w * w * gp * gp * res * res
    if not (den > 0.0):
        return math.nan
    return math.sqrt(num) / den


@jit
def _one_spectrum(
    flux,
    ivar,
    ormask,
    x,
    i0,
    n,
    trials,
    trial_a,
    dense_a,
    dense_ok,
    flux1a,
    g0,
    lam_lat,
    jlo,
    k,
    h,
    mt,
    vt,
    ms,
    vs,
    halfwidth,
    use_ivar,
    min_pixels,
    dense_step,
    pw,
    qw,
    curve_out,
):
    """Full TM for one spectrum; returns (rv, err, err_stat, template, chi2_min, status)."""
    nan = math.nan
    ntpl = trials.shape[0]
    ntr = mt.size
    for q in range(ntr):
        curve_out[q] = nan
    sumo2, nval = _prep_obs(flux, ivar, ormask, x, i0, n, use_ivar, pw, qw)
    if nval < min_pixels:
        return nan, nan, nan, -1, nan, STATUS_NO_COVERAGE
    b = np.empty(5)
    a = np.empty(9)
    coef = np.empty(5)
    curve = np.empty(ntr)
    fw1 = np.empty(6 * (2 * halfwidth + 1) + 24)  # Gaussian-fit work arrays, one allocation
    fw2 = np.empty((2 * halfwidth + 9, 4))
    best = -1
    best_chi = np.inf
    best_mu = nan
    best_code = STATUS_FIT_FAILED
    best_sampled = np.inf
    best_sampled_t = 0
    # --- step 1: every template on the 21-point grid. Unit weights and few masked pixels:
    # the template-only moments come precomputed (5 sums per pixel instead of 14)
    midx = np.empty(n, np.int64)
    nmask = 0
    for i in range(n):
        if qw[i, 0] == 0.0:
            midx[nmask] = i
            nmask += 1
    fast = (not use_ivar) and 4 * nmask < n
    for t in range(ntpl):
        for q in range(ntr):
            if fast:
                curve[q] = _chi2_premoments(
                    trials[t, q], n, pw, x, midx, nmask, trial_a[t, q], sumo2, nval, b, a, coef
                )
            else:
                curve[q] = _chi2_slice(trials[t, q], 0, n, pw, qw, sumo2, nval, b, a, coef)
        mu, ymin, code = _fit_curve_ws(vt, curve, halfwidth, fw1, fw2)
        smin = np.inf
        for q in range(ntr):
            if curve[q] < smin:
                smin = curve[q]
        if smin < best_sampled:
            best_sampled = smin
            best_sampled_t = t
        if code == STATUS_OK and ymin < best_chi:
            best_chi = ymin
            best = t
            best_mu = mu
        elif code == STATUS_EDGE and best < 0:
            best_code = STATUS_EDGE
    tshow = best if best >= 0 else best_sampled_t
    for q in range(ntr):
        curve_out[q] = _chi2_slice(trials[tshow, q], 0, n, pw, qw, sumo2, nval, b, a, coef)
    cmax = -np.inf
    cmin = np.inf
    for q in range(ntr):
        cmax = max(cmax, curve_out[q])
        cmin = min(cmin, curve_out[q])
    if not (cmax - cmin > 1e-12 * abs(cmax)):
        return nan, nan, nan, tshow, cmin, STATUS_FLAT_CHI2
    if best < 0:
        return nan, nan, nan, tshow, cmin, best_code
    # --- step 2: dense χ² curve of the best template at every lattice index needed
    m0 = int(np.rint(math.log10(1.0 + best_mu / 299792.458) / h))
    mlo = m0 + mt.min() - ms.max()
    mhi = m0 + mt.max() - ms.min()
    dense = np.empty(mhi - mlo + 1)
    many = ms.size * ntr * 4 >= mhi - mlo + 1
    poly = np.zeros((1, 1))
    mm = (dense_a.shape[1] - 1) // 2
    use_mom = False
    if many:
        # many shifts (the paper's 1001): the curve from a polyphase lattice of the best
        # template: the value for pixel i at shift m is poly[r, i + q] with mhi - m = q k + r,
        # so each shift reads one contiguous row and the template is interpolated once per
        # lattice point, not once per (shift, pixel)
        qmax = (mhi - mlo) // k
        npoly = n + qmax + 1
        poly = _polyphase(flux1a[best], g0, lam_lat, jlo, i0 * k - mhi, k, npoly)
        # template-only moments of every lattice shift, cached per template and worker
        use_mom = fast and -mm <= mlo and mhi <= mm
        if use_mom and dense_ok[best] == 0:
            _fill_dense_moments(flux1a[best], g0, lam_lat, jlo, i0, n, k, x, dense_a[best])
            dense_ok[best] = 1
    dc = (poly, use_mom, dense_a[best], mm, pw, qw, x, midx, nmask, sumo2, nval, b, a, coef)
    complete = True
    if many:
        dense[:] = np.inf
        if dense_step > 0:
            complete = _dense_core(dense, mlo, mhi, m0, mt, ms, halfwidth, dense_step, k, n, dc)
        else:
            _dense_fill(dense, mlo, mhi, k, n, dc)
    else:
        # few shifts: only the lattice points they need
        dense[:] = nan
        sbuf = np.empty(n)
        for si in range(ms.size):
            for q in range(ntr):
                m = m0 + mt[q] - ms[si]
                if math.isnan(dense[m - mlo]):
                    _shifted(flux1a[best], g0, lam_lat, jlo, i0, n, k, m, sbuf)
                    dense[m - mlo] = _chi2_slice(sbuf, 0, n, pw, qw, sumo2, nval, b, a, coef)
    acc = 0.0
    acc2 = 0.0
    nok = 0
    res = np.empty(ms.size)
    for si in range(ms.size):
        for q in range(ntr):
            curve[q] = dense[m0 + mt[q] - ms[si] - mlo]
        if not complete:
            # fit-window points outside the computed core of the curve are computed now
            j = 0
            for q in range(ntr):
                if curve[q] < curve[j]:
                    j = q
            for q in range(max(0, j - halfwidth), min(ntr, j + halfwidth + 1)):
                if curve[q] == np.inf:
                    mq = m0 + mt[q] - ms[si]
                    dense[mq - mlo] = _dense_point(mq, mhi, k, n, dc)
                    curve[q] = dense[mq - mlo]
        mu, ymin, code = _fit_curve_ws(vt, curve, halfwidth, fw1, fw2)
        if code == STATUS_OK:
            # residual of the shifted measurement, Doppler factors composed exactly
            e = 299792.458 * ((1.0 + mu / 299792.458) / (1.0 + vs[si] / 299792.458) - 1.0)
            res[nok] = e
            acc += e
            nok += 1
    if 2 * nok < ms.size:
        return nan, nan, nan, best, best_chi, STATUS_SHIFT_FAILED
    mean = acc / nok
    for i in range(nok):
        acc2 += (res[i] - mean) ** 2
    err = math.sqrt(acc2 / nok)
    v0 = 299792.458 * (10.0 ** (m0 * h) - 1.0)
    rv = 299792.458 * ((1.0 + v0 / 299792.458) * (1.0 + mean / 299792.458) - 1.0)
    # --- statistical error at the final RV (nearest lattice point)
    mf = int(np.rint(math.log10(1.0 + rv / 299792.458) / h))
    smid = np.empty(n)
    slo = np.empty(n)
    shi = np.empty(n)
    _shifted(flux1a[best], g0, lam_lat, jlo, i0, n, k, mf, smid)
    _shifted(flux1a[best], g0, lam_lat, jlo, i0, n, k, mf - 1, slo)
    _shifted(flux1a[best], g0, lam_lat, jlo, i0, n, k, mf + 1, shi)
    _chi2_slice(smid, 0, n, pw, qw, sumo2, nval, b, a, coef)
    dv = 299792.458 * (10.0 ** ((mf + 1) * h) - 10.0 ** ((mf - 1) * h))
    err_stat = _stat_error(flux, i0, n, x, qw, smid, slo, shi, dv, coef)
    return rv, err, err_stat, best, best_chi, STATUS_OK


@jit
def tm_block(
    flux,
    ivar,
    ormask,
    x,
    i0,
    n,
    trials,
    trial_a,
    dense_a,
    dense_ok,
    flux1a,
    g0,
    lam_lat,
    jlo,
    k,
    h,
    mt,
    vt,
    ms,
    vs,
    halfwidth,
    use_ivar,
    min_pixels,
    dense_step,
    rv,
    err,
    err_stat,
    tidx,
    chi2min,
    curves,
    status,
):
    """Template matching for a block of spectra (rows of ``flux``/``ivar``/``ormask``).

    Outputs are written into the last seven arrays (one row per spectrum).
    """
    pw = np.empty((n, 5))
    qw = np.empty((n, 9))
    for s in range(flux.shape[0]):
        r = _one_spectrum(
            flux[s],
            ivar[s],
            ormask[s],
            x,
            i0,
            n,
            trials,
            trial_a,
            dense_a,
            dense_ok,
            flux1a,
            g0,
            lam_lat,
            jlo,
            k,
            h,
            mt,
            vt,
            ms,
            vs,
            halfwidth,
            use_ivar,
            min_pixels,
            dense_step,
            pw,
            qw,
            curves[s],
        )
        rv[s] = r[0]
        err[s] = r[1]
        err_stat[s] = r[2]
        tidx[s] = r[3]
        chi2min[s] = r[4]
        status[s] = r[5]
