"""Numpy-level template matching: configuration, template preparation, engine dispatch.

No xarray here: :mod:`mspec.rv.matching` (the public :func:`mspec.rv.template_match`) wraps
these functions over the ``spectra`` chunks of a Dataset.

* :func:`make_config` — the :class:`~mspec.rv.chi2_kernels.TMConfig` of a native grid;
* :func:`prepared` — everything derived from (template library, config), cached per process;
* :func:`match_arrays` — the numba engine on ``(n_spectra, npix)`` arrays;
* :func:`match_block` — one block of spectra through the chosen engine (``"numba"`` or
  ``"torch"``, the latter :func:`mspec.rv.chi2_torch.match_arrays_torch`, imported only
  when asked for, so torch stays optional), plus the quality measures;
* :func:`curve_quality`, :func:`noise_variance` — TM quality (issue 13): χ² minimum at the
  grid edge, no clear minimum, and the noise level that turns χ²_min into a reduced χ².
"""

from __future__ import annotations

import importlib
import threading
from collections import OrderedDict

import dask
import numpy as np

from mspec.rv import chi2_kernels as K
from mspec.variables import C_KMS

__all__ = [
    "ENGINES",
    "QUALITY_BITS",
    "check_engine",
    "curve_quality",
    "make_config",
    "match_arrays",
    "match_block",
    "noise_variance",
    "prepared",
    "template_window",
]

#: Engine name -> ``"module:function"`` computing :func:`match_arrays`' outputs.
ENGINES = {
    "numba": "mspec.rv.tm_engine:match_arrays",
    "torch": "mspec.rv.chi2_torch:match_arrays_torch",
}

#: ``<p>_quality`` bits (int8; CF ``flag_masks``): set for any spectrum with a χ² curve.
QUALITY_BITS = {
    1: "edge: chi2 minimum within one trial step of the grid edge, or |RV| there",
    2: "ambiguous: a second chi2 minimum >= 180 km/s away at least half as deep",
}
#: Depth ratio (second / global minimum, below the curve median) that makes a curve ambiguous.
AMBIGUITY_RATIO = 0.5
#: Trial steps between the two minima for :data:`AMBIGUITY_RATIO` to apply (3 = 180 km/s).
AMBIGUITY_SEPARATION = 3

_CACHE: OrderedDict = OrderedDict()
_CACHE_LOCK = threading.Lock()
_CACHE_SIZE = 2


def make_config(
    loglam,
    *,
    wave_max=None,
    weighting="none",
    shifts=None,
    oversample=69,
    fit_halfwidth=2,
    min_pixels=200,
    mask_tellurics=False,
) -> K.TMConfig:
    """Build the :class:`~mspec.rv.chi2_kernels.TMConfig` for a native ``loglam`` grid.

    Parameters
    ----------
    loglam : array_like
        The shared native grid (log10 Angstrom), uniform and increasing.
    wave_max : float, optional
        Upper end of the observed window (Angstrom); default 8899 (the paper's TM). Any
        value above 4700 is accepted here; the xarray wrapper only names ``None`` and 7500.
    weighting, shifts, oversample, fit_halfwidth, min_pixels, mask_tellurics
        See :func:`mspec.rv.template_match`.

    Returns
    -------
    mspec.rv.chi2_kernels.TMConfig

    Raises
    ------
    ValueError
        If ``loglam`` is not uniform or an argument is out of range (the message names it).
    """
    loglam = np.asarray(loglam, dtype=np.float64)
    if loglam.ndim != 1 or loglam.size < 10:
        raise ValueError("loglam must be a 1-D grid of at least 10 pixels")
    d = np.diff(loglam)
    if not np.allclose(d, d[0], rtol=1e-6, atol=1e-9) or d[0] <= 0:
        raise ValueError("loglam must be uniform and increasing (the shared native grid)")
    if wave_max is not None and not (4700.0 < float(wave_max)):
        raise ValueError(f"wave_max={wave_max!r} must be above 4700 A")
    if shifts is None:
        shifts = np.arange(-500.0, 501.0)
    shifts = tuple(float(s) for s in np.atleast_1d(np.asarray(shifts, dtype=np.float64)))
    return K.TMConfig(
        loglam0=float(loglam[0]),
        dloglam=float((loglam[-1] - loglam[0]) / (loglam.size - 1)),
        npix=int(loglam.size),
        wave_max=8899.0 if wave_max is None else float(wave_max),
        oversample=int(oversample),
        shifts=shifts,
        fit_halfwidth=int(fit_halfwidth),
        weighting=weighting,
        min_pixels=int(min_pixels),
        mask_tellurics=bool(mask_tellurics),
    )


def prepared(flux1a: np.ndarray, wave1a: np.ndarray, cfg: K.TMConfig, token: str | None = None):
    """Everything derived from (library, config): window, trial arrays, moments.

    Cached per process (the last few libraries), keyed by ``token`` (default: a dask token
    of the library arrays) and ``cfg``; thread safe.

    Parameters
    ----------
    flux1a : numpy.ndarray
        ``(templates, grid)`` template fluxes on the 1 Angstrom grid.
    wave1a : numpy.ndarray
        ``(grid,)`` template wavelengths (Angstrom).
    cfg : mspec.rv.chi2_kernels.TMConfig
        From :func:`make_config`.
    token : str, optional
        Precomputed library token.

    Returns
    -------
    dict
        Arrays and indices consumed by the numba and torch engines.
    """
    key = (token or dask.base.tokenize(flux1a, wave1a), cfg)
    with _CACHE_LOCK:
        hit = _CACHE.get(key)
        if hit is not None:
            _CACHE.move_to_end(key)
            return hit
    flux1a = np.asarray(flux1a, dtype=np.float64)
    wave1a = np.asarray(wave1a, dtype=np.float64)
    finite = np.isfinite(flux1a).all(axis=0)
    if not finite.any():
        raise ValueError("templates: no wavelength where every template has flux")
    i0, n = cfg.window(wave1a[finite][0], wave1a[finite][-1])
    f1 = np.where(np.isfinite(flux1a), flux1a, 0.0)
    f1 = np.ascontiguousarray(f1)
    trials, lam_lat, jlo = K.trial_arrays(cfg, f1, float(wave1a[0]), i0, n)
    x = cfg.x(i0, n)
    trial_a = np.empty((*trials.shape[:2], 9))
    K.trial_moments(trials, x, trial_a)
    # step-2 template moments, filled lazily per best template by the kernel
    mm = int(np.ceil(np.log10(1.0 + cfg.max_velocity / C_KMS) / cfg.h))
    dense_a = np.zeros((trials.shape[0], 2 * mm + 1, 9))
    dense_ok = np.zeros(trials.shape[0], np.uint8)
    prep = dict(
        dense_a=dense_a,
        dense_ok=dense_ok,
        i0=i0,
        n=n,
        x=x,
        trials=trials,
        trial_a=trial_a,
        flux1a=f1,
        g0=float(wave1a[0]),
        lam_lat=lam_lat,
        jlo=int(jlo),
        mt=cfg.trial_index,
        vt=cfg.trial_velocity,
        ms=cfg.shift_index,
        vs=cfg.shift_velocity,
    )
    with _CACHE_LOCK:
        _CACHE[key] = prep
        while len(_CACHE) > _CACHE_SIZE:
            _CACHE.popitem(last=False)
    return prep


def match_arrays(flux, ivar, ormask, flux1a, wave1a, cfg: K.TMConfig, token=None) -> dict:
    """Run the numba kernel on numpy arrays ``(n_spectra, npix)``.

    Parameters
    ----------
    flux, ivar, ormask : array_like
        ``(n_spectra, npix)`` (or ``(npix,)``) on the native grid of ``cfg``.
    flux1a, wave1a, cfg, token
        See :func:`prepared`.

    Returns
    -------
    dict
        ``rv``, ``err``, ``err_stat`` (km/s, float64), ``template`` (int32 index, -1 none),
        ``chi2_min`` (float64), ``chi2`` (``(n_spectra, 21)``), ``status`` (int8).
    """
    p = prepared(flux1a, wave1a, cfg, token)
    flux = np.atleast_2d(np.asarray(flux))
    ivar = np.atleast_2d(np.asarray(ivar))
    ormask = cfg.apply_mask(np.atleast_2d(np.asarray(ormask)))
    ns = flux.shape[0]
    out = dict(
        rv=np.empty(ns),
        err=np.empty(ns),
        err_stat=np.empty(ns),
        template=np.empty(ns, np.int32),
        chi2_min=np.empty(ns),
        chi2=np.empty((ns, p["mt"].size)),
        status=np.empty(ns, np.int8),
    )
    if ns:
        K.tm_block(
            np.ascontiguousarray(flux, dtype=np.float64),
            np.ascontiguousarray(ivar, dtype=np.float64),
            np.ascontiguousarray(ormask, dtype=np.int64),
            p["x"],
            p["i0"],
            p["n"],
            p["trials"],
            p["trial_a"],
            p["dense_a"],
            p["dense_ok"],
            p["flux1a"],
            p["g0"],
            p["lam_lat"],
            p["jlo"],
            cfg.oversample,
            cfg.h,
            p["mt"],
            p["vt"],
            p["ms"],
            p["vs"],
            cfg.fit_halfwidth,
            cfg.weighting == "ivar",
            cfg.min_pixels,
            int(cfg.dense_step),
            out["rv"],
            out["err"],
            out["err_stat"],
            out["template"],
            out["chi2_min"],
            out["chi2"],
            out["status"],
        )
    return out


def check_engine(engine: str) -> str:
    """Return ``engine`` if it is a known engine name.

    Raises
    ------
    ValueError
        Naming ``engine`` and the known engines.
    """
    if engine not in ENGINES:
        raise ValueError(f"engine={engine!r} must be one of {sorted(ENGINES)}")
    return engine


def _engine_function(engine: str):
    module, name = ENGINES[check_engine(engine)].split(":")
    return getattr(importlib.import_module(module), name)


def template_window(flux1a, wave1a, cfg: K.TMConfig) -> tuple[int, int]:
    """First pixel and pixel count of the observed window the library covers.

    Checked eagerly by the xarray wrapper so that a bad library or window fails at call
    time, not inside a task.

    Raises
    ------
    ValueError
        No wavelength where every template has flux, or a window too small.
    """
    flux1a = np.asarray(flux1a, dtype=np.float64)
    wave1a = np.asarray(wave1a, dtype=np.float64)
    finite = np.isfinite(flux1a).all(axis=0)
    if not finite.any():
        raise ValueError("templates: no wavelength where every template has flux")
    return cfg.window(wave1a[finite][0], wave1a[finite][-1])


def curve_quality(
    curve,
    velocities,
    rv,
    *,
    ratio: float = AMBIGUITY_RATIO,
    separation: int = AMBIGUITY_SEPARATION,
) -> np.ndarray:
    """Quality bits (:data:`QUALITY_BITS`) of χ² curves on the trial grid.

    Parameters
    ----------
    curve : array_like
        ``(n_spectra, n_trial)`` χ² of the best template at the trial RVs.
    velocities : array_like
        ``(n_trial,)`` trial RVs (km/s), increasing.
    rv : array_like
        ``(n_spectra,)`` measured RV (km/s; NaN allowed).
    ratio : float
        Depth ratio of a second minimum (depths below the curve's median) that makes the
        curve ambiguous (bit 2).
    separation : int
        Fewest trial steps between the global and the second minimum; the end points of the
        grid count as minima when lower than their neighbour.

    Returns
    -------
    numpy.ndarray
        int8 ``(n_spectra,)``: bit 1 edge (argmin at the first/last two trial points, or
        ``|rv|`` beyond the last-but-one trial RV), bit 2 ambiguous. 0 for an all-NaN curve.
    """
    curve = np.atleast_2d(np.asarray(curve, dtype=np.float64))
    v = np.asarray(velocities, dtype=np.float64)
    rv = np.atleast_1d(np.asarray(rv, dtype=np.float64))
    ns, nt = curve.shape
    q = np.zeros(ns, np.int8)
    ok = np.isfinite(curve).all(axis=1)
    if nt < 3 or not ok.any():
        return q
    c = np.where(ok[:, None], curve, 0.0)
    j = np.argmin(c, axis=1)
    edge = (j <= 1) | (j >= nt - 2)
    with np.errstate(invalid="ignore"):
        edge |= np.abs(rv) > max(abs(v[1]), abs(v[-2]))
    med = np.median(c, axis=1)
    depth = med - c[np.arange(ns), j]
    # local minima (end points: lower than their one neighbour)
    left = np.concatenate([np.full((ns, 1), np.inf), c[:, :-1]], axis=1)
    right = np.concatenate([c[:, 1:], np.full((ns, 1), np.inf)], axis=1)
    local = (c < left) & (c < right)
    far = np.abs(np.arange(nt)[None, :] - j[:, None]) >= separation
    with np.errstate(invalid="ignore", divide="ignore"):
        rel = np.where(local & far, (med[:, None] - c) / depth[:, None], -np.inf)
    amb = (rel.max(axis=1) >= ratio) & (depth > 0)
    q[ok & edge] |= 1
    q[ok & amb] |= 2
    return q


def noise_variance(flux, ivar, ormask, i0: int, n: int) -> np.ndarray:
    """Mean noise variance (1/ivar) over the pixels TM uses in its window.

    The pixels are those of the χ² sums: ``ormask == 0`` (after
    :meth:`~mspec.rv.chi2_kernels.TMConfig.apply_mask`), ``ivar > 0``, finite flux and ivar,
    native pixels ``i0 .. i0 + n - 1``. ``tm_chi2_min / noise_variance`` is the reduced χ²
    of the unweighted fit (≈ 1 for a perfect template and Gaussian noise).

    Parameters
    ----------
    flux, ivar, ormask : numpy.ndarray
        ``(n_spectra, npix)``.
    i0, n : int
        Window start and length (pixels).

    Returns
    -------
    numpy.ndarray
        ``(n_spectra,)`` float64 (flux units squared); NaN without usable pixels.
    """
    f = np.asarray(flux)[:, i0 : i0 + n]
    iv = np.asarray(ivar, dtype=np.float64)[:, i0 : i0 + n]
    m = np.asarray(ormask)[:, i0 : i0 + n]
    good = (m == 0) & (iv > 0) & np.isfinite(f) & np.isfinite(iv)
    var = np.where(good, 1.0 / np.where(good, iv, 1.0), 0.0)
    cnt = good.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(cnt > 0, var.sum(axis=1) / cnt, np.nan)


def match_block(flux, ivar, ormask, flux1a, *, wave1a, cfg, token, engine="numba", device=None):
    """Template matching of one block of spectra with any leading shape.

    Parameters
    ----------
    flux, ivar, ormask : numpy.ndarray
        ``(..., npix)`` on the native grid of ``cfg``.
    flux1a : numpy.ndarray
        ``(templates, grid)`` template fluxes on the 1 Angstrom grid ``wave1a``.
    wave1a : numpy.ndarray
        Template wavelengths (Angstrom).
    cfg : mspec.rv.chi2_kernels.TMConfig
        From :func:`make_config`.
    token : str
        Library token (cache key of :func:`prepared`).
    engine : {"numba", "torch"}
        See :data:`ENGINES`.
    device : str, optional
        torch device (``engine="torch"`` only).

    Returns
    -------
    tuple of numpy.ndarray
        ``rv, err, err_stat, template, chi2_min, chi2, status, quality, chi2_red`` shaped
        like ``flux[..., 0]`` (``chi2`` with a trailing velocity axis): ``quality`` from
        :func:`curve_quality`, ``chi2_red`` = ``chi2_min`` / :func:`noise_variance`.
    """
    shape = flux.shape[:-1]
    if not int(np.prod(shape)):  # zero spectra (issue 17): empty outputs, the usual dtypes
        e = [np.zeros(shape, dt) for dt in (np.float64,) * 3 + (np.int32, np.float64)]
        st = [np.zeros(shape, np.int8), np.zeros(shape, np.int8), np.zeros(shape)]
        return (*e, np.zeros((*shape, 2 * cfg.n_trial + 1)), *st)
    run = _engine_function(engine)
    kw = {"device": device} if engine == "torch" else {}
    f2 = flux.reshape(-1, flux.shape[-1])
    iv2 = ivar.reshape(-1, flux.shape[-1])
    om2 = ormask.reshape(-1, flux.shape[-1])
    r = run(
        f2,
        iv2,
        om2,
        flux1a,
        wave1a,
        cfg,
        token=token,
        **kw,
    )
    p = prepared(flux1a, wave1a, cfg, token)
    quality = curve_quality(r["chi2"], cfg.trial_velocity, r["rv"])
    noise = noise_variance(f2, iv2, cfg.apply_mask(np.asarray(om2)), p["i0"], p["n"])
    with np.errstate(invalid="ignore", divide="ignore"):
        chi2_red = np.asarray(r["chi2_min"], dtype=np.float64) / noise
    return (
        r["rv"].reshape(shape),
        r["err"].reshape(shape),
        r["err_stat"].reshape(shape),
        r["template"].reshape(shape),
        r["chi2_min"].reshape(shape),
        r["chi2"].reshape((*shape, -1)),
        r["status"].reshape(shape),
        quality.reshape(shape),
        chi2_red.reshape(shape),
    )
