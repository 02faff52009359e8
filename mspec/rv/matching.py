"""Template-matching radial velocities over a survey (paper: RVMM / TM and TML7500).

The xarray wrapper of :mod:`mspec.rv.tm_engine`: :func:`template_match` is a stage
(:mod:`mspec.stage`) and lazy: it adds one dask task per ``spectra`` chunk. The template
library enters the graph once, as a single-chunk dask array (one key every task depends on),
so a distributed scheduler ships it to each worker once instead of embedding it in every
task; each worker builds its pre-shifted trial templates once and caches them.

This module is ``mspec.rv.matching``; ``mspec.rv.template_match`` is the function.
"""

from __future__ import annotations

import numbers

import dask
import dask.array as da
import numpy as np
import xarray as xr

from mspec.rv import chi2_kernels as K
from mspec.rv.templates import check_library, default_templates
from mspec.rv.tm_engine import (
    QUALITY_BITS,
    check_engine,
    make_config,
    match_block,
    template_window,
)
from mspec.stage import flag_attrs, stage
from mspec.variables import annotate

__all__ = ["template_match", "output_prefix", "STATUS_FLAGS", "QUALITY_FLAGS", "WAVE_MAX_PREFIX"]

#: Accepted ``wave_max`` values -> prefix of the output variables.
WAVE_MAX_PREFIX = {None: "tm", 7500.0: "tml7500"}

#: ``<p>_status`` code -> one-word CF flag meaning (sentences in ``K.STATUS_MEANINGS``).
STATUS_FLAGS = {k: v.split(":")[0] for k, v in K.STATUS_MEANINGS.items()}

#: ``<p>_quality`` bit -> one-word CF flag meaning (sentences in ``QUALITY_BITS``).
QUALITY_FLAGS = {k: v.split(":")[0] for k, v in QUALITY_BITS.items()}

_SUFFIXES = ("rv_{p}", "rv_{p}_err", "rv_{p}_err_stat", "{p}_template", "{p}_chi2_min")
_OUTPUTS = tuple(
    s.format(p=p)
    for p in WAVE_MAX_PREFIX.values()
    for s in (*_SUFFIXES, "{p}_chi2", "{p}_status", "{p}_quality", "{p}_chi2_red")
)


def output_prefix(wave_max) -> str:
    """Prefix of the output variables for ``wave_max``: ``"tm"`` or ``"tml7500"``.

    Parameters
    ----------
    wave_max : float or None
        ``None`` (the paper's TM, window up to 8899 Angstrom) or ``7500`` (TML7500).

    Returns
    -------
    str

    Raises
    ------
    ValueError
        Any other ``wave_max``: the registry has no variables that would say what was
        computed (use :func:`mspec.rv.tm_engine.match_arrays` for other windows).
    """
    if wave_max is None:
        return "tm"
    ok = isinstance(wave_max, numbers.Real) and not isinstance(wave_max, bool)
    if not ok or float(wave_max) not in WAVE_MAX_PREFIX:
        raise ValueError(
            f"wave_max={wave_max!r}: only None (TM, 4700-8899 A) and 7500 (TML7500) are "
            "supported; other windows have no output variable names"
        )
    return WAVE_MAX_PREFIX[float(wave_max)]


def _coord_values(da_: xr.DataArray) -> np.ndarray:
    # The 31 kB loglam coordinate sets up the window; read it (never the spectra) eagerly,
    # in this thread, even when a store gave it to us as a dask array.
    data = da_.data
    if isinstance(data, da.Array):
        return np.asarray(data.compute(scheduler="synchronous"), dtype=np.float64)
    return np.asarray(da_.values, dtype=np.float64)


@stage(
    "template_match",
    module="RVMM",
    inputs=["flux", "ivar", "ormask", "loglam"],
    outputs=_OUTPUTS,
    version="2",
    description="chi2 template-matching radial velocities (TM, or TML7500 with wave_max=7500)",
)
def template_match(
    ds: xr.Dataset,
    *,
    templates: xr.Dataset | None = None,
    wave_max: float | None = None,
    weighting: str = "none",
    shifts=None,
    oversample: int = 69,
    fit_halfwidth: int = 2,
    min_pixels: int = 200,
    mask_tellurics: bool = False,
    engine: str = "numba",
    device: str | None = None,
    quality: bool = False,
) -> xr.Dataset:
    """Radial velocities by χ² template matching (the paper's TM; TML7500 with ``wave_max``).

    Per spectrum: the observed flux after step 1 (``ormask == 0`` pixels with data, native
    pixels, 4700–8899 Å observed frame) is compared with every template shifted to the trial
    RVs 60n km/s (n = -10..10): χ²(RV) = (1/N) Σ (O - P4·S)², P4 a degree-4 polynomial fitted
    by linear least squares. A Gaussian fitted to each template's χ² curve near its minimum
    gives its RV and minimum χ²; the best template has the smallest. Step 2 removes that
    initial RV, applies shifts -500..500 km/s, re-measures each with the best template:
    RV = initial + mean(residuals), error = std(residuals). See ``docs/rv.md``.

    A stage (:mod:`mspec.stage`): the inputs are checked against the registry, the result is
    lazy for dask-backed inputs (only the small ``loglam`` coordinate is read), and the
    outputs are merged into ``ds`` (``merge=True``, a :class:`~mspec.stage.MergeWarning`
    when they replace variables) or returned alone (``merge=False``).

    Parameters
    ----------
    ds : xarray.Dataset
        Spectra with ``flux``, ``ivar``, ``ormask`` (``spectra``, ``pixels``) and the
        ``loglam`` coordinate; numpy- or dask-backed (``pixels`` must be one chunk).
    templates : xarray.Dataset, optional
        Template library (:mod:`mspec.rv.templates`); default the real PyHammer M templates.
    wave_max : {None, 7500}
        Upper end of the observed window (Å): ``None`` gives the paper's TM (variables
        ``rv_tm`` ...), ``7500`` TML7500 (``rv_tml7500`` ...). Other values raise
        ``ValueError`` (no variable names say what they would compute; the numpy-level
        :func:`mspec.rv.tm_engine.match_arrays` accepts any window).
    weighting : {"none", "ivar"}
        ``"none"``: the paper's unweighted χ² (default); ``"ivar"``: inverse-variance weights.
    shifts : array_like, optional
        Step-2 shifts in km/s (default -500..500 by 1, the paper's 1001 values).
    oversample : int
        Velocity-lattice steps per native pixel (69 → 1.0005 km/s).
    fit_halfwidth : int
        Trial points each side of the minimum in the Gaussian fit (2 → 5 points, ±120 km/s;
        chosen on simulations, see docs/rv.md).
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
    quality : bool
        Also return ``<p>_quality`` and ``<p>_chi2_red`` (below); the RV reconciliation
        (:func:`mspec.rv.reconcile.reconcile_rv`) uses them to decide whether TM can be
        trusted. Off by default only so that the output set of existing callers is
        unchanged; the pipeline's rvmm stage should turn it on.
    merge : bool
        True (default): ``ds`` with the outputs added; False: the outputs alone.

    Returns
    -------
    xarray.Dataset
        ``rv_<p>``, ``rv_<p>_err``, ``rv_<p>_err_stat`` (km/s), ``<p>_template`` (name),
        ``<p>_chi2_min``, ``<p>_chi2`` (``spectra``, ``velocities``), ``<p>_status`` (int8,
        CF ``flag_values``/``flag_meanings``) with ``<p>`` = ``tm`` or ``tml7500``;
        coordinate ``velocities`` (km/s). With ``quality=True`` also ``<p>_quality`` (int8
        bits, CF ``flag_masks``: 1 χ² minimum at the grid edge, 2 ambiguous — a second
        minimum ≥ 180 km/s away at least half as deep; see
        :func:`mspec.rv.tm_engine.curve_quality`) and ``<p>_chi2_red`` (``<p>_chi2_min``
        over the mean noise variance of the window pixels: ≈ 1 for a perfect template).
        Failures give NaN and a nonzero status, never an exception.

    Raises
    ------
    mspec.variables.VariableError
        A required variable is missing or has the wrong dims/dtype.
    ValueError
        Chunked ``pixels``, or a bad argument (named in the message).
    """
    prefix = output_prefix(wave_max)
    if not isinstance(quality, bool):
        raise TypeError(f"quality must be True or False, got {quality!r}")
    if ds["flux"].chunks is not None:
        pix_chunks = ds["flux"].chunksizes.get("pixels", ())
        if len(pix_chunks) > 1:
            raise ValueError("ds: the 'pixels' dimension must be a single chunk (rechunk it)")
    check_engine(engine)
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
    wave1a = np.asarray(templates["template_wavelength"].values, dtype=np.float64)
    flux1a = np.ascontiguousarray(templates["template_flux"].values, dtype=np.float64)
    token = dask.base.tokenize(flux1a, wave1a)
    template_window(flux1a, wave1a, cfg)  # a bad library/window fails here, not in a task

    lazy = ds["flux"].chunks is not None
    if lazy:
        tpl = da.from_array(flux1a, chunks=flux1a.shape, name=f"tm-templates-{token}")
    else:
        tpl = flux1a
    tpl = xr.DataArray(tpl, dims=("templates", "grid"))
    outs = xr.apply_ufunc(
        match_block,
        ds["flux"],
        ds["ivar"],
        ds["ormask"],
        tpl,
        input_core_dims=[["pixels"], ["pixels"], ["pixels"], ["templates", "grid"]],
        output_core_dims=[[], [], [], [], [], ["velocities"], [], [], []],
        dask="parallelized",
        output_dtypes=[
            np.float64,
            np.float64,
            np.float64,
            np.int32,
            np.float64,
            np.float64,
            np.int8,
            np.int8,
            np.float64,
        ],
        dask_gufunc_kwargs={"output_sizes": {"velocities": 2 * cfg.n_trial + 1}},
        kwargs=dict(wave1a=wave1a, cfg=cfg, token=token, engine=engine, device=device),
    )
    rv, err, err_stat, tidx, chi2min, curve, status, qual, chi2_red = outs
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
    out[f"{prefix}_status"].attrs.update(
        flag_attrs(STATUS_FLAGS, np.int8),
        comment="; ".join(f"{k}: {v}" for k, v in K.STATUS_MEANINGS.items()),
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
    if quality:
        out = out.assign({f"{prefix}_quality": qual, f"{prefix}_chi2_red": chi2_red})
        out = annotate(out, [f"{prefix}_quality", f"{prefix}_chi2_red"])
        qflags = flag_attrs(QUALITY_FLAGS, np.int8)
        out[f"{prefix}_quality"].attrs.update(
            flag_masks=qflags["flag_values"],
            flag_meanings=qflags["flag_meanings"],
            comment="bits; " + "; ".join(f"{k}: {v}" for k, v in QUALITY_BITS.items()),
        )
    return out
