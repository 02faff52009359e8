"""Lazy xarray wrappers for the preprocessing steps (paper steps 1-5).

Recipes (PAPER.md "Preprocessing steps"):

``"cnn"``
    steps 1, 3, 4a, 5 -> ``flux_grid`` on the observed-frame 3900-8899 Angstrom grid (CNN-SPT,
    CNN-WDM, CNN-dMgM inputs).
``"tlma"``
    steps 1, 2, 3, 4a, 5 -> ``flux_grid`` on the rest-frame grid (CNN-TLMA); needs ``rv``.
``"tm"``
    step 1 only, the observed spectrum for template matching -> ``flux_masked`` /
    ``ivar_masked`` on the native ``pixels``.

Every recipe also returns the per-spectrum quality variables ``orp_u`` ... ``orp_z``,
``npix_good`` and ``preprocess_status`` (the grid recipes also ``grid_coverage``). A spectrum
that cannot be preprocessed gets NaN output and a nonzero status, never an exception.

Templates go through the same kernels with :func:`prepare_templates` (steps 3, 4b and a
normalisation).
"""

from __future__ import annotations

import numpy as np
import xarray as xr

from mspec.preprocessing import kernels as K
from mspec.stage import flag_attrs, stage
from mspec.variables import SDSS_BANDS, annotate

__all__ = ["RECIPES", "preprocess", "prepare_templates", "status_attrs"]

#: Recipe name -> paper steps it applies.
RECIPES = {"cnn": (1, 3, "4a", 5), "tlma": (1, 2, 3, "4a", 5), "tm": (1,)}

_INPUTS = ("flux", "ivar", "ormask")
_BAND = "_sdss_band"
#: Every variable some recipe writes (the ``wavelength_grid`` coordinate comes with
#: ``flux_grid``).
_OUTPUTS = (
    "flux_grid",
    "grid_coverage",
    "flux_masked",
    "ivar_masked",
    *(f"orp_{b}" for b in SDSS_BANDS),
    "npix_good",
    "preprocess_status",
)


def status_attrs() -> dict:
    """CF ``flag_values`` / ``flag_meanings`` attrs for ``preprocess_status``."""
    return flag_attrs(K.STATUS_MEANINGS, np.int8)


def _check_pixels_unchunked(ds: xr.Dataset) -> None:
    for name in (*_INPUTS, "loglam"):
        da = ds[name]
        if da.chunks is None:
            continue
        chunks = da.chunks[da.dims.index("pixels")]
        if len(chunks) > 1:
            raise ValueError(
                f"preprocess needs the core dimension 'pixels' of {name!r} in a single chunk, "
                f"got {len(chunks)} chunks; rechunk with ds.chunk({{'pixels': -1}})"
            )


def _check_loglam(loglam: np.ndarray) -> None:
    if loglam.ndim != 1 or not np.all(np.isfinite(loglam)) or not np.all(np.diff(loglam) > 0):
        raise ValueError("coordinate 'loglam' must be finite and strictly increasing")


def _loglam(ds: xr.Dataset) -> xr.DataArray:
    """The ``loglam`` coordinate; checked now if in memory, else inside each block."""
    loglam = ds["loglam"].variable
    if isinstance(loglam.data, np.ndarray):
        _check_loglam(np.asarray(loglam.values, dtype=np.float64))
    return xr.DataArray(loglam)


def _block_wave(loglam) -> tuple[np.ndarray, np.ndarray]:
    """Observed wavelengths (Angstrom) and SDSS band numbers from a block of ``loglam``."""
    loglam = np.asarray(loglam, dtype=np.float64)
    loglam = loglam.reshape(-1, loglam.shape[-1])[0]
    _check_loglam(loglam)
    wave = 10.0**loglam
    return wave, K.band_index(wave)


def _rv_array(ds: xr.Dataset, rv) -> xr.DataArray:
    if rv is None:
        raise ValueError("recipe 'tlma' needs rv: a DataArray on 'spectra' or a variable name")
    if isinstance(rv, str):
        if rv not in ds.variables:
            raise ValueError(f"rv={rv!r} is not a variable of the dataset")
        rv = ds[rv]
    elif not isinstance(rv, xr.DataArray):
        arr = np.asarray(rv)
        if arr.ndim != 1:
            raise ValueError(f"rv must be 1-D on 'spectra', got shape {arr.shape}")
        rv = xr.DataArray(arr, dims=("spectra",))
    if rv.dims != ("spectra",):
        raise ValueError(f"rv must have dims ('spectra',), got {rv.dims}")
    if rv.sizes["spectra"] != ds.sizes["spectra"]:
        raise ValueError(
            f"rv has {rv.sizes['spectra']} spectra, the dataset has {ds.sizes['spectra']}"
        )
    if rv.dtype.kind not in "fiu":
        raise ValueError(f"rv must be numeric (km/s), got dtype {rv.dtype}")
    # xarray drops conflicting non-index coordinates silently: compare the ids ourselves
    # (when both are in memory; dask-backed ids are not loaded for this)
    for name in rv.coords:
        if name in ds.coords and ds[name].dims == ("spectra",):
            a, b = rv[name].variable, ds[name].variable
            if isinstance(a.data, np.ndarray) and isinstance(b.data, np.ndarray):
                if not np.array_equal(a.values, b.values):
                    raise ValueError(f"rv coordinate {name!r} does not match the dataset's")
    return rv.reset_coords(drop=True).drop_indexes(list(rv.xindexes)).astype(np.float64)


@stage(
    "preprocess",
    module="preprocess",
    inputs=[*_INPUTS, "loglam"],
    outputs=_OUTPUTS,
    version="1",
    description="paper steps 1-5: flux_grid for the CNNs, or flux_masked for TM",
)
def preprocess(
    ds: xr.Dataset,
    *,
    recipe: str = "cnn",
    rv=None,
    max_gap: float | None = None,
    fill_value: float = np.nan,
) -> xr.Dataset:
    """Preprocess spectra for the CNNs or template matching (lazy).

    A stage (:mod:`mspec.stage`): the inputs are checked against the registry, nothing is
    computed for dask-backed inputs, and the outputs are merged into ``ds`` (``merge=True``,
    a :class:`~mspec.stage.MergeWarning` when they replace variables; the
    ``wavelength_grid`` coordinate is replaced silently, its frame may differ) or returned
    alone (``merge=False``).

    Parameters
    ----------
    ds : xarray.Dataset
        Spectra with registry variables ``flux``, ``ivar``, ``ormask`` on
        ``(spectra, pixels)`` and the ``loglam`` coordinate (log10 Angstrom, vacuum). Dask-
        backed inputs may be chunked along ``spectra`` only.
    recipe : {"cnn", "tlma", "tm"}
        ``"cnn"``: steps 1, 3, 4a, 5 (observed frame). ``"tlma"``: steps 1, 2, 3, 4a, 5 (rest
        frame). ``"tm"``: step 1 only (native pixels).
    rv : xarray.DataArray, str or array_like, optional
        Radial velocity in km/s on ``spectra`` (or the name of such a variable of ``ds``);
        an ``obsid`` coordinate on it must match the dataset's (checked when both are in
        memory). Required by ``"tlma"``, refused by the other recipes. NaN (or
        ``|rv| >= c``) gives status 4 and NaN output for that spectrum.
    max_gap : float, optional
        Widest run of dropped pixels (Angstrom) that the interpolation bridges; grid points in
        wider gaps become NaN. Default: every gap is bridged (the paper's step 1 then 3).
    fill_value : float
        Value of grid points outside a spectrum's good-pixel range (default NaN; 0, the mean
        after z-scoring, is a natural choice for CNN input). Failed spectra stay all-NaN.
    merge : bool
        True (default): ``ds`` with the outputs added. False: only the outputs (with the
        ``spectra`` coordinates).

    Returns
    -------
    xarray.Dataset
        ``"cnn"``/``"tlma"``: ``flux_grid`` (spectra, grid) float32 with coordinate
        ``wavelength_grid`` (Angstrom) and ``grid_coverage``; ``"tm"``: ``flux_masked``,
        ``ivar_masked`` (spectra, pixels); all: ``orp_u`` ... ``orp_z``, ``npix_good``,
        ``preprocess_status`` (codes in :data:`mspec.preprocessing.kernels.STATUS_MEANINGS`,
        CF ``flag_values``/``flag_meanings``). Lazy when the inputs are dask arrays.

    Raises
    ------
    ValueError
        Unknown ``recipe``, missing/invalid ``rv``, bad ``max_gap`` or ``fill_value``,
        ``pixels`` split into several chunks, or a non-monotonic ``loglam``.
    mspec.variables.VariableError
        A required variable is missing or has the wrong dims/dtype.
    """
    if recipe not in RECIPES:
        raise ValueError(f"recipe must be one of {sorted(RECIPES)}, got {recipe!r}")
    _check_pixels_unchunked(ds)
    if max_gap is not None and not (np.isscalar(max_gap) and max_gap > 0):
        raise ValueError(f"max_gap must be a positive number (Angstrom), got {max_gap!r}")
    if not (np.isscalar(fill_value) and np.isreal(fill_value)) or isinstance(fill_value, str):
        raise ValueError(f"fill_value must be a real number, got {fill_value!r}")
    fill_value = float(fill_value)
    if recipe != "tlma" and rv is not None:
        raise ValueError(f"rv is only used by recipe 'tlma', not {recipe!r}")
    # loglam travels as an input (a dask-backed coordinate must not be computed here)
    inputs = [*(ds[n].drop_vars("loglam", errors="ignore") for n in _INPUTS), _loglam(ds)]
    nb = len(SDSS_BANDS)

    if recipe == "tm":
        out = _tm(inputs, nb)
        out = out.assign_coords(loglam=ds["loglam"])
    else:
        rv_da = _rv_array(ds, rv) if recipe == "tlma" else None
        out = _grid(inputs, rv_da, nb, max_gap, fill_value)

    # annotate only what this function made; input coordinates keep their own attrs
    out = annotate(out, [*out.data_vars, *(["wavelength_grid"] if recipe != "tm" else [])])
    out["preprocess_status"].attrs.update(status_attrs())
    steps = ", ".join(str(x) for x in RECIPES[recipe])
    main = "flux_masked" if recipe == "tm" else "flux_grid"
    out[main].attrs.update(preprocess_recipe=recipe, preprocess_steps=steps)
    if recipe != "tm":
        frame = "rest" if recipe == "tlma" else "observed"
        out["wavelength_grid"].attrs["frame"] = frame
        out[main].attrs["frame"] = frame
        if np.isfinite(fill_value):
            out[main].attrs["fill_value_uncovered"] = fill_value
    out.attrs["preprocess_recipe"] = recipe
    return out


def _grid(inputs, rv_da, nb, max_gap, fill_value) -> xr.Dataset:
    grid = K.GRID_4A
    shift = rv_da is not None
    gap = np.inf if max_gap is None else float(max_gap)

    def block(flux, ivar, ormask, loglam, *rv):
        wave, band = _block_wave(loglam)
        n = flux.shape[0]
        res = (
            np.empty((n, grid.size), np.float32),
            np.empty((n, nb), np.float32),
            np.empty(n, np.float32),
            np.empty(n, np.int8),
            np.empty(n, np.int32),
        )
        rv1 = np.ascontiguousarray(rv[0], dtype=np.float64) if shift else np.zeros(n)
        K.grid_block(
            K._native(flux),
            K._native(ivar),
            K._native(ormask),
            wave[None, :],
            band,
            rv1,
            shift,
            grid.start,
            grid.step,
            gap,
            1,
            fill_value,
            *res,
        )
        return res

    args = [*inputs, rv_da] if shift else inputs
    res = xr.apply_ufunc(
        block,
        *args,
        input_core_dims=[["pixels"]] * 4 + ([[]] if shift else []),
        output_core_dims=[["grid"], [_BAND], [], [], []],
        dask="parallelized",
        output_dtypes=[np.float32, np.float32, np.float32, np.int8, np.int32],
        dask_gufunc_kwargs={"output_sizes": {"grid": grid.size, _BAND: nb}},
    )
    flux_grid, orp, coverage, status, ngood = res
    out = xr.Dataset(
        {
            "flux_grid": flux_grid.assign_coords(wavelength_grid=("grid", K.wavelength_grid(grid))),
            "grid_coverage": coverage,
            "npix_good": ngood,
            "preprocess_status": status,
        }
    )
    return _add_orp(out, orp)


def _tm(inputs, nb) -> xr.Dataset:
    def block(flux, ivar, ormask, loglam):
        _, band = _block_wave(loglam)
        flux = K._native(flux)
        ivar = K._native(ivar)
        n = flux.shape[0]
        res = (
            np.empty_like(flux),
            np.empty_like(ivar),
            np.empty((n, nb), np.float32),
            np.empty(n, np.int8),
            np.empty(n, np.int32),
        )
        K.mask_block(flux, ivar, K._native(ormask), band, *res)
        return res

    res = xr.apply_ufunc(
        block,
        *inputs,
        input_core_dims=[["pixels"]] * 4,
        output_core_dims=[["pixels"], ["pixels"], [_BAND], [], []],
        dask="parallelized",
        output_dtypes=[inputs[0].dtype, inputs[1].dtype, np.float32, np.int8, np.int32],
        dask_gufunc_kwargs={"output_sizes": {_BAND: nb}},
    )
    flux_m, ivar_m, orp, status, ngood = res
    out = xr.Dataset(
        {
            "flux_masked": flux_m,
            "ivar_masked": ivar_m,
            "npix_good": ngood,
            "preprocess_status": status,
        }
    )
    return _add_orp(out, orp)


def _add_orp(out: xr.Dataset, orp: xr.DataArray) -> xr.Dataset:
    for k, b in enumerate(SDSS_BANDS):
        out[f"orp_{b}"] = orp.isel({_BAND: k}, drop=True)
    return out


def prepare_templates(
    loglam,
    flux,
    normalise: str | None = "mean",
    *,
    grid: K.Grid = K.GRID_4B,
    max_gap: float | None = None,
    dtype=np.float64,
):
    """Put rest-frame templates on the 1 Angstrom grid (steps 3, 4b and a normalisation).

    Same kernels as :func:`preprocess`; template pixels with non-finite flux are dropped
    (step 1 has no mask to apply), nothing is Doppler shifted.

    Parameters
    ----------
    loglam : array_like, shape ``(p,)`` or ``flux.shape``
        log10 of the vacuum rest-frame wavelength (Angstrom), increasing.
    flux : array_like, shape ``(p,)`` or ``(n, p)``
        Template fluxes (any units).
    normalise : {"mean", "zscore", None}
        ``"mean"``: divide by the mean over the grid; ``"zscore"``: step 5; ``None``: raw.
    grid : mspec.preprocessing.kernels.Grid
        Output grid; default :data:`~mspec.preprocessing.kernels.GRID_4B` (4700-8899 Angstrom, 1
        Angstrom, 4200 px). E.g. ``Grid(4700.0, 1.0, 2800)`` stops at 7499 Angstrom.
    max_gap : float, optional
        See :func:`preprocess`.
    dtype : numpy dtype
        Output dtype (float64 by default; templates are few).

    Returns
    -------
    wavelength : numpy.ndarray
        ``(ngrid,)`` float64 grid wavelengths (Angstrom, vacuum, rest frame).
    flux_grid : numpy.ndarray
        ``(ngrid,)`` or ``(n, ngrid)``; NaN outside a template's coverage, all-NaN for a
        template that cannot be normalised (no coverage, non-positive mean, constant flux).

    Raises
    ------
    ValueError
        Bad ``normalise``, ``max_gap``, mismatched shapes or non-increasing ``loglam``.
    """
    if normalise not in ("mean", "zscore", None):
        raise ValueError(f"normalise must be 'mean', 'zscore' or None, got {normalise!r}")
    if not isinstance(grid, K.Grid):
        raise ValueError(f"grid must be a mspec.preprocessing.kernels.Grid, got {grid!r}")
    flux = np.asarray(flux)
    loglam = np.asarray(loglam, dtype=np.float64)
    if flux.ndim not in (1, 2):
        raise ValueError(f"flux must be 1-D or 2-D, got shape {flux.shape}")
    if loglam.shape not in (flux.shape[-1:], flux.shape):
        raise ValueError(f"loglam shape {loglam.shape} does not match flux shape {flux.shape}")
    if not np.all(np.diff(loglam, axis=-1) > 0):
        raise ValueError("loglam must be strictly increasing along the pixel axis")
    wave = 10.0**loglam
    res = K.preprocess_grid(
        flux,
        None,
        None,
        wave,
        grid=grid,
        normalise=normalise,
        max_gap=max_gap,
        out_dtype=dtype,
        band_wave=wave.reshape(-1, wave.shape[-1])[0],
    )
    return K.wavelength_grid(grid), res.flux
