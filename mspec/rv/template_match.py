"""Template-matching radial velocities over a survey (paper: RVMM / TM and TML7500).

:func:`template_match` is lazy: it adds one dask task per ``spectra`` chunk. The template
library enters the graph once, as a single-chunk dask array (one key every task depends on),
so a distributed scheduler ships it to each worker once instead of embedding it in every
task; each worker builds its pre-shifted trial templates once and caches them.
"""

from __future__ import annotations

import functools
import threading
from collections import OrderedDict

import dask
import dask.array as da
import numpy as np
import xarray as xr

from mspec.rv import chi2_kernels as K
from mspec.rv.templates import check_library, default_templates
from mspec.variables import C_KMS, annotate

__all__ = ["template_match", "match_arrays", "make_config", "prepared"]

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
    """Per-process cache of everything derived from (library, config): window, trial arrays."""
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
            out["rv"],
            out["err"],
            out["err_stat"],
            out["template"],
            out["chi2_min"],
            out["chi2"],
            out["status"],
        )
    return out


def _block(flux, ivar, ormask, flux1a, *, wave1a, cfg, token, engine="numba", device=None):
    # apply_ufunc hands core dims last: flux (..., pixels), flux1a (templates, grid)
    shape = flux.shape[:-1]
    if engine == "torch":
        from mspec.rv.chi2_torch import match_arrays_torch

        run = functools.partial(match_arrays_torch, device=device)
    else:
        run = match_arrays
    r = run(
        flux.reshape(-1, flux.shape[-1]),
        ivar.reshape(-1, flux.shape[-1]),
        ormask.reshape(-1, flux.shape[-1]),
        flux1a,
        wave1a,
        cfg,
        token=token,
    )
    return (
        r["rv"].reshape(shape),
        r["err"].reshape(shape),
        r["err_stat"].reshape(shape),
        r["template"].reshape(shape),
        r["chi2_min"].reshape(shape),
        r["chi2"].reshape((*shape, -1)),
        r["status"].reshape(shape),
    )


def _coord_values(da_: xr.DataArray) -> np.ndarray:
    # The 31 kB loglam coordinate sets up the window; read it (never the spectra) eagerly,
    # in this thread, even when a store gave it to us as a dask array.
    data = da_.data
    if isinstance(data, da.Array):
        return np.asarray(data.compute(scheduler="synchronous"), dtype=np.float64)
    return np.asarray(da_.values, dtype=np.float64)


def template_match(
    ds: xr.Dataset,
    templates: xr.Dataset | None = None,
    wave_max: float | None = None,
    *,
    weighting: str = "none",
    shifts=None,
    oversample: int = 69,
    fit_halfwidth: int = 2,
    min_pixels: int = 200,
    mask_tellurics: bool = False,
    engine: str = "numba",
    device: str | None = None,
) -> xr.Dataset:
    """Radial velocities by χ² template matching (the paper's TM; TML7500 with ``wave_max``).

    Per spectrum: the observed flux after step 1 (``ormask == 0`` pixels with data, native
    pixels, 4700–8899 Å observed frame) is compared with every template shifted to the trial
    RVs 60n km/s (n = -10..10): χ²(RV) = (1/N) Σ (O - P4·S)², P4 a degree-4 polynomial fitted
    by linear least squares. A Gaussian fitted to each template's χ² curve near its minimum
    gives its RV and minimum χ²; the best template has the smallest. Step 2 removes that
    initial RV, applies shifts -500..500 km/s, re-measures each with the best template:
    RV = initial + mean(residuals), error = std(residuals). See ``docs/rv.md``.

    Parameters
    ----------
    ds : xarray.Dataset
        Spectra with ``flux``, ``ivar``, ``ormask`` (``spectra``, ``pixels``) and the
        ``loglam`` coordinate; numpy- or dask-backed (``pixels`` must be one chunk).
    templates : xarray.Dataset, optional
        Template library (:mod:`mspec.rv.templates`); default the real PyHammer M templates.
    wave_max : float, optional
        Upper end of the observed window (Å). ``7500`` gives TML7500 (variables
        ``rv_tml7500`` ...); ``None`` the paper's TM (``rv_tm`` ...).
    weighting : {"none", "ivar"}
        ``"none"``: the paper's unweighted χ² (default); ``"ivar"``: inverse-variance weights.
    shifts : array_like, optional
        Step-2 shifts in km/s (default -500..500 by 1, the paper's 1001 values).
    oversample : int
        Velocity-lattice steps per native pixel (69 → 1.0005 km/s).
    fit_halfwidth : int
        Trial points each side of the minimum in the Gaussian fit (2 → 5 points, ±120 km/s; chosen on simulations, see docs/rv.md).
    min_pixels : int
        Fewer usable window pixels → status 1 (no coverage).
    mask_tellurics : bool
        Also drop the telluric bands (:data:`~mspec.rv.chi2_kernels.TELLURIC_BANDS`); not in
        the paper, off by default (see ``docs/accuracy.md``).
    engine : {"numba", "torch"}
        ``"torch"`` computes the χ² sums with :mod:`mspec.rv.chi2_torch` (GPU when
        available; same results to rounding).
    device : str, optional
        torch device for ``engine="torch"`` (default CUDA if available, else CPU).

    Returns
    -------
    xarray.Dataset
        ``rv_<p>``, ``rv_<p>_err``, ``rv_<p>_err_stat`` (km/s), ``<p>_template`` (name),
        ``<p>_chi2_min``, ``<p>_chi2`` (``spectra``, ``velocities``), ``<p>_status`` (int8)
        with ``<p>`` = ``tm`` or ``tml7500``; coordinate ``velocities`` (km/s). Failures
        give NaN and a nonzero status, never an exception.

    Raises
    ------
    ValueError
        Missing variables, chunked ``pixels``, or a bad argument (named in the message).
    """
    for v in ("flux", "ivar", "ormask"):
        if v not in ds:
            raise ValueError(f"ds lacks the variable {v!r}")
    if "loglam" not in ds.coords and "loglam" not in ds:
        raise ValueError("ds lacks the 'loglam' coordinate")
    if ds["flux"].chunks is not None:
        pix_chunks = ds["flux"].chunksizes.get("pixels", ())
        if len(pix_chunks) > 1:
            raise ValueError("ds: the 'pixels' dimension must be a single chunk (rechunk it)")
    if engine not in ("numba", "torch"):
        raise ValueError(f"engine={engine!r} must be 'numba' or 'torch'")
    if templates is None:
        templates = default_templates("real")
    check_library(templates, "templates")
    cfg = make_config(
        _coord_values(ds["loglam"]),
        wave_max=wave_max,
        weighting=weighting,
        shifts=shifts,
        oversample=oversample,
        fit_halfwidth=fit_halfwidth,
        min_pixels=min_pixels,
        mask_tellurics=mask_tellurics,
    )
    prefix = "tm" if wave_max is None else "tml7500"
    wave1a = np.asarray(templates["template_wavelength"].values, dtype=np.float64)
    flux1a = np.ascontiguousarray(templates["template_flux"].values, dtype=np.float64)
    token = dask.base.tokenize(flux1a, wave1a)
    # validate the window eagerly so a bad library/window fails here, not inside a task
    finite = np.isfinite(flux1a).all(axis=0)
    if not finite.any():
        raise ValueError("templates: no wavelength where every template has flux")
    cfg.window(wave1a[finite][0], wave1a[finite][-1])

    lazy = ds["flux"].chunks is not None
    if lazy:
        tpl = da.from_array(flux1a, chunks=flux1a.shape, name=f"tm-templates-{token}")
    else:
        tpl = flux1a
    tpl = xr.DataArray(tpl, dims=("templates", "grid"))
    outs = xr.apply_ufunc(
        _block,
        ds["flux"],
        ds["ivar"],
        ds["ormask"],
        tpl,
        input_core_dims=[["pixels"], ["pixels"], ["pixels"], ["templates", "grid"]],
        output_core_dims=[[], [], [], [], [], ["velocities"], []],
        dask="parallelized",
        output_dtypes=[
            np.float64,
            np.float64,
            np.float64,
            np.int32,
            np.float64,
            np.float64,
            np.int8,
        ],
        dask_gufunc_kwargs={"output_sizes": {"velocities": 2 * cfg.n_trial + 1}},
        kwargs=dict(wave1a=wave1a, cfg=cfg, token=token, engine=engine, device=device),
    )
    rv, err, err_stat, tidx, chi2min, curve, status = outs
    names = np.asarray(templates["template_name"].values).astype(str)
    names_ext = np.append(names, "")  # index -1 -> ""
    tname = xr.apply_ufunc(
        lambda i: names_ext[i],
        tidx,
        dask="parallelized",
        output_dtypes=[names_ext.dtype],
    )
    out = xr.Dataset(
        {
            f"rv_{prefix}": rv,
            f"rv_{prefix}_err": err,
            f"rv_{prefix}_err_stat": err_stat,
            f"{prefix}_template": tname,
            f"{prefix}_chi2_min": chi2min,
            f"{prefix}_chi2": curve,
            f"{prefix}_status": status,
        },
        coords={"velocities": ("velocities", cfg.trial_velocity)},
    )
    out = annotate(out)
    out[f"{prefix}_status"].attrs["flag_meanings"] = "; ".join(
        f"{k}: {v}" for k, v in K.STATUS_MEANINGS.items()
    )
    out.attrs.update(
        {
            f"{prefix}_wave_window_A": [cfg.wave_min, cfg.wave_max],
            f"{prefix}_weighting": cfg.weighting,
            f"{prefix}_mask_tellurics": int(cfg.mask_tellurics),
            f"{prefix}_templates": int(templates.sizes["templates"]),
            f"{prefix}_normalisation": str(templates.attrs.get("normalisation", "")),
        }
    )
    return out
