"""Line-by-line radial velocities over a survey (paper: RVMM / DSAL I, DSAL II, DSEL).

:func:`line_rvs` is lazy: one dask task per ``spectra`` chunk runs the numba kernel
:func:`mspec.rv.lines_kernels.lines_block`. The algorithm and its choices are described in
:mod:`mspec.rv.lines_kernels` and ``docs/rv_lines.md``.
"""

from __future__ import annotations

import dask.array as da
import numpy as np
import xarray as xr

from mspec.rv import lines_kernels as K
from mspec.stage import flag_attrs, stage
from mspec.variables import annotate

__all__ = ["line_rvs", "lines_arrays", "OUTPUTS"]

HALPHA = 6564.60  # vacuum Å; the emission line that anchors DSEL

#: Variables written by :func:`line_rvs` (besides the ``lines`` coordinates).
OUTPUTS = (
    "rv_line",
    "rv_line_err",
    "line_status",
    "ew_halpha",
    "rv_dsal1",
    "rv_dsal1_err",
    "rv_dsal1_n",
    "rv_dsal2",
    "rv_dsal2_err",
    "rv_dsal2_n",
    "rv_dsel",
    "rv_dsel_err",
    "rv_dsel_n",
)


def _grid(loglam):
    loglam = np.asarray(loglam, dtype=np.float64)
    if loglam.ndim != 1 or loglam.size < 2 or not np.all(np.diff(loglam) > 0):
        raise ValueError("loglam must be a 1-D increasing grid of at least 2 pixels")
    wave = 10.0**loglam
    dlam = wave * np.log(10.0) * np.gradient(loglam)
    return wave, dlam


def lines_arrays(flux, ivar, ormask, loglam, rv_init, cfg: K.LineConfig | None = None, lines=None):
    """Run the numba kernel on numpy arrays ``(n_spectra, npix)``.

    Parameters
    ----------
    flux, ivar, ormask : array_like
        Spectra on the native grid ``(n_spectra, npix)``.
    loglam : array_like
        log10 vacuum wavelength (Å) of the ``npix`` pixels.
    rv_init : array_like
        Initial RV per spectrum (km/s).
    cfg : LineConfig, optional
        Settings (default :class:`~mspec.rv.lines_kernels.LineConfig`).
    lines : sequence, optional
        Line list (default :data:`~mspec.rv.lines_kernels.LINES`).

    Returns
    -------
    dict
        The :data:`OUTPUTS` as numpy arrays (per-line ones ``(n_spectra, n_lines)``).

    Raises
    ------
    ValueError
        Shapes that do not match (the message names the argument) or a bad ``loglam``.
    """
    cfg = K.LineConfig() if cfg is None else cfg
    if not isinstance(cfg, K.LineConfig):
        raise TypeError(f"cfg must be a LineConfig, got {type(cfg).__name__}")
    wave, dlam = _grid(loglam)
    flux = np.atleast_2d(np.asarray(flux))
    for name, a in (("ivar", ivar), ("ormask", ormask)):
        if np.shape(np.atleast_2d(a)) != flux.shape:
            raise ValueError(f"{name} has shape {np.shape(a)}, flux {flux.shape}")
    if flux.shape[1] != wave.size:
        raise ValueError(f"loglam has {wave.size} pixels, flux {flux.shape[1]}")
    rv_init = np.atleast_1d(np.asarray(rv_init, dtype=np.float64))
    if rv_init.shape != (flux.shape[0],):
        raise ValueError(f"rv_init has shape {rv_init.shape}, expected ({flux.shape[0]},)")
    return _run(flux, ivar, ormask, rv_init, wave=wave, dlam=dlam, cfg=cfg, lines=lines)


def _run(flux, ivar, ormask, rv_init, *, wave, dlam, cfg, lines):
    _, lw, sign, _ = K.line_table(lines)
    flux = np.atleast_2d(np.asarray(flux))
    ivar = np.atleast_2d(np.asarray(ivar))
    ormask = np.atleast_2d(np.asarray(ormask))
    rv_init = np.atleast_1d(np.asarray(rv_init, dtype=np.float64))
    ns, nl = flux.shape[0], lw.size
    out = dict(
        rv_line=np.full((ns, nl), np.nan),
        rv_line_err=np.full((ns, nl), np.nan),
        line_status=np.zeros((ns, nl), np.int8),
        ew_halpha=np.full(ns, np.nan),
    )
    ha = np.flatnonzero((sign > 0) & (np.abs(lw - HALPHA) < 1.0))
    comb = np.full((ns, 6), np.nan)
    comb_n = np.zeros((ns, 3), np.int8)
    if ns:
        K.lines_block(
            np.ascontiguousarray(flux),
            np.ascontiguousarray(ivar),
            np.ascontiguousarray(ormask),
            wave,
            dlam,
            np.ascontiguousarray(rv_init),
            lw,
            sign,
            int(ha[0]) if ha.size else -1,
            np.asarray(K.HALPHA_BANDS, dtype=np.float64),
            float(cfg.half_window),
            float(cfg.resolution),
            int(cfg.min_pixels),
            float(cfg.min_snr),
            float(cfg.min_width),
            float(cfg.max_width),
            float(cfg.neighbour_mask),
            float(cfg.clip),
            int(cfg.n_clip),
            int(cfg.max_iter),
            float(cfg.dsal_k),
            float(cfg.dsal_tol),
            int(cfg.dsal_min_lines),
            float(cfg.max_std),
            float(cfg.ew_min),
            float(cfg.ew_nsigma),
            out["rv_line"],
            out["rv_line_err"],
            out["line_status"],
            out["ew_halpha"],
            comb,
            comb_n,
        )
    for k, key in enumerate(("rv_dsal1", "rv_dsal2", "rv_dsel")):
        out[key] = comb[:, 2 * k]
        out[f"{key}_err"] = comb[:, 2 * k + 1]
        out[f"{key}_n"] = comb_n[:, k]
    return out


def _block(flux, ivar, ormask, rv_init, *, wave, dlam, cfg, lines):
    # apply_ufunc hands core dims last: flux (..., pixels), rv_init (...)
    shape = flux.shape[:-1]
    npix = flux.shape[-1]
    r = _run(
        flux.reshape(-1, npix),
        ivar.reshape(-1, npix),
        ormask.reshape(-1, npix),
        np.asarray(rv_init, dtype=np.float64).reshape(-1),
        wave=wave,
        dlam=dlam,
        cfg=cfg,
        lines=lines,
    )
    return tuple(
        r[k].reshape((*shape, r[k].shape[1])) if r[k].ndim == 2 else r[k].reshape(shape)
        for k in OUTPUTS
    )


def _coord_values(da_: xr.DataArray) -> np.ndarray:
    # the small loglam coordinate sets up the windows; read it eagerly (never the spectra)
    data = da_.data
    if isinstance(data, da.Array):
        return np.asarray(data.compute(scheduler="synchronous"), dtype=np.float64)
    return np.asarray(da_.values, dtype=np.float64)


def _rv_init_array(ds: xr.Dataset, rv_init) -> xr.DataArray:
    if isinstance(rv_init, str):
        if rv_init not in ds.variables:
            raise ValueError(f"rv_init={rv_init!r} is not a variable of ds")
        arr = ds[rv_init]
    elif isinstance(rv_init, xr.DataArray):
        arr = rv_init
    else:
        raise TypeError(
            f"rv_init must be a variable name or an xarray.DataArray, got {type(rv_init).__name__}"
        )
    if arr.dims != ("spectra",):
        raise ValueError(f"rv_init must have dims ('spectra',), got {arr.dims}")
    if arr.sizes["spectra"] != ds.sizes["spectra"]:
        raise ValueError(
            f"rv_init has {arr.sizes['spectra']} spectra, ds has {ds.sizes['spectra']}"
        )
    if arr.dtype.kind not in "fiu":
        raise ValueError(f"rv_init must be numeric (km/s), got dtype {arr.dtype}")
    return arr.drop_vars([c for c in arr.coords if c not in ("spectra",)], errors="ignore")


@stage(
    "line_rvs",
    module="RVMM",
    inputs=["flux", "ivar", "ormask", "loglam"],
    outputs=list(OUTPUTS),
    version="1",
    description="per-line RVs (Gaussian fits), DSAL I, DSAL II, Halpha EW and DSEL",
)
def line_rvs(
    ds: xr.Dataset,
    *,
    rv_init="rv_tm",
    half_window: float = 25.0,
    resolution: float = 1800.0,
    min_pixels: int = 10,
    min_snr: float = 3.0,
    clip: float = 5.0,
    n_clip: int = 2,
    dsal_tol: float = 15.0,
    dsal_k: float = 3.0,
    max_std: float = 20.0,
    ew_min: float = 0.75,
    ew_nsigma: float = 3.0,
) -> xr.Dataset:
    """Radial velocities from single lines: per line, DSAL I, DSAL II and DSEL (lazy).

    Per spectrum and line (:data:`~mspec.rv.lines_kernels.LINES`: K I 7667, 7701, Na I 8186,
    8197, Ti I 8437, Ca II 8500, 8544, 8665 in absorption; N II 6550, Hα, N II 6585, S II
    6718, 6733 and the Ca II triplet in emission) a Gaussian on a linear continuum is fitted
    (ivar-weighted Levenberg–Marquardt, good pixels only) within ``±half_window`` of the
    position implied by ``rv_init``. DSAL I: mean / std of at least 3 mutually consistent
    absorption-line RVs; DSAL II: iterative 1σ clipping until std < ``max_std``; DSEL: the
    DSAL II rule on the emission lines, given only when Hα emission is detected
    (``ew_halpha < -ew_min`` and ``< -ew_nsigma σ``). See ``docs/rv_lines.md``.

    Parameters
    ----------
    ds : xarray.Dataset
        ``flux``, ``ivar``, ``ormask`` (``spectra``, ``pixels``), the ``loglam`` coordinate
        and the initial RV; numpy- or dask-backed (``pixels`` must be one chunk).
    rv_init : str or xarray.DataArray
        Initial RV (km/s) on ``spectra``: a variable of ``ds`` (default ``"rv_tm"``) or an
        array. NaN gives line status 1 and NaN results for that spectrum.
    half_window : float
        Half width of each fit window (Å).
    resolution : float
        Resolving power R (instrumental σ = λ / 2.3548 R).
    min_pixels : int
        Fewest good pixels in a window (else status 3).
    min_snr : float
        Fewest σ of the fitted amplitude (else status 8).
    clip : float
        Outlier rejection threshold in robust normalised residuals.
    n_clip : int
        Rejection passes per line (0: none).
    dsal_tol, dsal_k : float
        DSAL I consistency: within ``max(dsal_k σ_line, dsal_tol)`` of the median (km/s).
    max_std : float
        DSAL II / DSEL clipping target (km/s).
    ew_min : float
        Hα emission needs ``ew_halpha < -ew_min`` (Å) ...
    ew_nsigma : float
        ... and ``ew_halpha < -ew_nsigma`` times its error.
    merge : bool
        Added by the stage contract: return ``ds`` with the outputs (True) or the outputs
        alone (False).

    Returns
    -------
    xarray.Dataset
        ``rv_line``, ``rv_line_err`` (km/s), ``line_status`` (int8, CF flags) on
        (``spectra``, ``lines``) with coordinates ``lines`` (names), ``line_wavelength`` (Å)
        and ``line_kind``; ``ew_halpha`` (Å), ``rv_dsal1``, ``rv_dsal1_err``, ``rv_dsal2``,
        ``rv_dsal2_err``, ``rv_dsel``, ``rv_dsel_err`` (km/s, NaN when not available) and
        ``rv_dsal1_n``, ``rv_dsal2_n``, ``rv_dsel_n`` (int8 line counts) on ``spectra``.

    Raises
    ------
    ValueError
        Missing variables, a chunked ``pixels`` dimension, a bad ``rv_init`` or a bad
        option (named in the message).
    TypeError
        ``rv_init`` neither a name nor a DataArray.
    """
    cfg = K.LineConfig(
        half_window=half_window,
        resolution=resolution,
        min_pixels=min_pixels,
        min_snr=min_snr,
        clip=clip,
        n_clip=n_clip,
        dsal_tol=dsal_tol,
        dsal_k=dsal_k,
        max_std=max_std,
        ew_min=ew_min,
        ew_nsigma=ew_nsigma,
    )
    if ds["flux"].chunks is not None:
        if len(ds["flux"].chunksizes.get("pixels", ())) > 1:
            raise ValueError("ds: the 'pixels' dimension must be a single chunk (rechunk it)")
    rv = _rv_init_array(ds, rv_init)
    wave, dlam = _grid(_coord_values(ds["loglam"]))
    names, lw, _, kind = K.line_table()
    if ds["flux"].chunks is not None and rv.chunks is None:
        rv = rv.chunk({"spectra": ds["flux"].chunksizes["spectra"]})
    outs = xr.apply_ufunc(
        _block,
        ds["flux"],
        ds["ivar"],
        ds["ormask"],
        rv,
        input_core_dims=[["pixels"], ["pixels"], ["pixels"], []],
        output_core_dims=[["lines"], ["lines"], ["lines"]] + [[]] * 10,
        dask="parallelized",
        output_dtypes=[np.float64, np.float64, np.int8, np.float64]
        + [np.float64, np.float64, np.int8] * 3,
        dask_gufunc_kwargs={"output_sizes": {"lines": lw.size}},
        kwargs=dict(wave=wave, dlam=dlam, cfg=cfg, lines=None),
    )
    out = xr.Dataset(
        dict(zip(OUTPUTS, outs, strict=True)),
        coords={
            "lines": ("lines", names),
            "line_wavelength": ("lines", lw),
            "line_kind": ("lines", kind),
        },
    )
    out = annotate(out)
    out["line_status"].attrs.update(flag_attrs(K.STATUS_MEANINGS, np.int8))
    out.attrs.update(
        {
            "line_rvs_rv_init": rv_init if isinstance(rv_init, str) else str(rv.name or ""),
            "line_rvs_half_window_A": cfg.half_window,
            "line_rvs_resolution": cfg.resolution,
        }
    )
    return out
