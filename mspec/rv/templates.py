"""Template libraries for χ² template matching (paper: RVMM / TM).

A library is an :class:`xarray.Dataset` with dims ``templates`` and ``grid``:

* ``template_name`` (templates): unique name, the ``templates`` coordinate;
* ``template_wavelength`` (grid): 1 Å rest-frame vacuum grid, Å (coordinate);
* ``template_flux`` (templates, grid): flux after the paper's steps 3 (linear interpolation
  onto the 1 Å grid) and 4b (cut), then normalised; NaN outside a template's coverage;
* ``template_spt``, ``template_teff``, ``template_logg``, ``template_m_h``,
  ``template_lumclass``, ``template_source`` (templates): what is known (NaN / ``""`` else).

The grid is 4600–8999 Å: the paper's 4b window 4700–8899 Å plus 100 Å each side, because a
template shifted by up to ±1800 km/s must still cover the observed window (the observed
spectrum is not interpolated). The normalisation statistic is computed over 4700–8899 Å only.

Normalisation: ``"mean"`` (divide by the mean, default) or ``"zscore"`` (the paper's step 5).
A zero-mean template times a polynomial cannot represent a positive spectrum's continuum, and
on the real LAMOST M dwarfs z-scored templates give RVs off by tens of km/s (see
``docs/rv.md``), so mspec divides by the mean — a documented deviation.

Loaders: :func:`pyhammer_templates` (real SDSS M templates, default for real data),
:func:`load_templates` (user FITS/CSV/Zarr) and :func:`make_library` (arrays). Any number of
templates works. The simulator's own grid (the demo's templates) is
:func:`mspec.simulate.simulated_templates`: this module does not import the simulator.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import xarray as xr

from mspec.variables import annotate

__all__ = [
    "GRID_START",
    "GRID_STEP",
    "GRID_SIZE",
    "NORM_WINDOW",
    "template_wavelength",
    "make_library",
    "pyhammer_templates",
    "load_templates",
    "save_templates",
    "replicate_templates",
    "default_templates",
    "check_library",
]

GRID_START = 4600.0
GRID_STEP = 1.0
GRID_SIZE = 4400
#: Window of the paper's step 4b; normalisation statistics are taken over it.
NORM_WINDOW = (4700.0, 8899.0)
NORMALISATIONS = ("mean", "zscore")


def template_wavelength() -> np.ndarray:
    """The library grid: 4600..8999 Å by 1 Å (float64, vacuum, rest frame)."""
    return GRID_START + GRID_STEP * np.arange(GRID_SIZE, dtype=np.float64)


def _normalise(flux: np.ndarray, wave: np.ndarray, how: str) -> np.ndarray:
    sel = (wave >= NORM_WINDOW[0]) & (wave <= NORM_WINDOW[1])
    part = flux[:, sel]
    with np.errstate(invalid="ignore", divide="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN template: flagged below
        mean = np.nanmean(part, axis=1, keepdims=True) if part.size else np.nan
        if how == "mean":
            out = flux / mean
            bad = ~(mean[:, 0] > 0)
        else:
            std = np.nanstd(part, axis=1, keepdims=True)
            out = (flux - mean) / std
            bad = ~(std[:, 0] > 0)
    out[bad] = np.nan
    return out


def _as_list(x, n, fill, name):
    if x is None:
        return [fill] * n
    x = list(np.atleast_1d(x))
    if len(x) == 1 and n > 1:
        x = x * n
    if len(x) != n:
        raise ValueError(f"{name} has {len(x)} values for {n} templates")
    return x


def make_library(
    loglam,
    flux,
    names: Sequence[str],
    *,
    spt=None,
    teff=None,
    logg=None,
    m_h=None,
    lumclass=None,
    source: str | Sequence[str] = "user",
    normalise: str = "mean",
) -> xr.Dataset:
    """Build a template library from rest-frame spectra.

    Applies the paper's steps 3 (linear interpolation onto the 1 Å grid) and 4b (cut; grid
    4600–8999 Å, see the module notes) with :func:`mspec.preprocessing.steps.prepare_templates`,
    then the normalisation.

    Parameters
    ----------
    loglam : array_like, shape ``(p,)`` or ``(n, p)``
        log10(vacuum rest wavelength / Å), increasing.
    flux : array_like, shape ``(n, p)`` or ``(p,)``
        Template fluxes (any units; non-finite values are ignored).
    names : sequence of str
        One unique name per template.
    spt, teff, logg, m_h, lumclass : sequence, optional
        Spectral type, Teff (K), log g (dex), [M/H] (dex), luminosity class per template.
    source : str or sequence of str
        Where each template comes from.
    normalise : {"mean", "zscore"}
        ``"mean"`` (default, see module notes) or the paper's z-score.

    Returns
    -------
    xarray.Dataset
        The library (dims ``templates``, ``grid``).

    Raises
    ------
    ValueError
        Bad ``normalise``, shapes, duplicate names, or a template with no usable flux.
    """
    from mspec.preprocessing.kernels import Grid
    from mspec.preprocessing.steps import prepare_templates

    if normalise not in NORMALISATIONS:
        raise ValueError(f"normalise={normalise!r} must be one of {NORMALISATIONS}")
    flux = np.atleast_2d(np.asarray(flux, dtype=np.float64))
    n = flux.shape[0]
    names = [str(s) for s in _as_list(names, n, "", "names")]
    if len(set(names)) != n:
        raise ValueError("names must be unique")
    if n == 0:
        raise ValueError("flux holds no template")
    wave, grid = prepare_templates(
        loglam, flux, normalise=None, grid=Grid(GRID_START, GRID_STEP, GRID_SIZE)
    )
    grid = _normalise(np.atleast_2d(np.asarray(grid, dtype=np.float64)), wave, normalise)
    empty = ~np.isfinite(grid).any(axis=1)
    if empty.any():
        raise ValueError(
            f"templates without usable flux on {GRID_START:.0f}-{wave[-1]:.0f} A: "
            f"{[names[i] for i in np.nonzero(empty)[0]]}"
        )
    ds = xr.Dataset(
        {
            "template_flux": (("templates", "grid"), grid),
            "template_spt": ("templates", np.array(_as_list(spt, n, "", "spt"), dtype=str)),
            "template_teff": ("templates", np.array(_as_list(teff, n, np.nan, "teff"), float)),
            "template_logg": ("templates", np.array(_as_list(logg, n, np.nan, "logg"), float)),
            "template_m_h": ("templates", np.array(_as_list(m_h, n, np.nan, "m_h"), float)),
            "template_lumclass": (
                "templates",
                np.array(_as_list(lumclass, n, "", "lumclass"), dtype=str),
            ),
            "template_source": (
                "templates",
                np.array(_as_list(source, n, "user", "source"), dtype=str),
            ),
        },
        coords={
            "template_name": ("templates", np.array(names, dtype=str)),
            "template_wavelength": ("grid", wave),
        },
        attrs={"normalisation": normalise, "norm_window_A": list(NORM_WINDOW)},
    )
    return annotate(ds)


def check_library(lib: xr.Dataset, name: str = "templates") -> xr.Dataset:
    """Check that ``lib`` is a template library; raise a ValueError naming ``name`` if not."""
    if not isinstance(lib, xr.Dataset):
        raise ValueError(f"{name} must be a template library xarray.Dataset, got {type(lib)}")
    for v in ("template_flux", "template_wavelength", "template_name"):
        if v not in lib.variables:
            raise ValueError(f"{name} lacks {v!r}: build it with mspec.rv.templates")
    if lib.sizes.get("templates", 0) < 1:
        raise ValueError(f"{name} holds no template")
    w = np.asarray(lib["template_wavelength"].values, dtype=np.float64)
    if w.size < 2 or not np.allclose(np.diff(w), w[1] - w[0]) or not w[1] > w[0]:
        raise ValueError(f"{name}: template_wavelength must be a uniform increasing grid")
    return lib


def pyhammer_templates(
    pattern: str = "M*", *, normalise: str = "mean", directory=None
) -> xr.Dataset:
    """The real SDSS/BOSS empirical templates of PyHammer (Kesseli et al. 2017).

    By default the library packaged with mspec (:func:`mspec.data.packaged_templates`: all
    47 templates on one log10-λ grid of step 2.5e-5 dex), so the result does not depend on
    whether ``../shared/data`` exists; ``directory`` reads the original FITS files instead.

    Parameters
    ----------
    pattern : str
        Glob on the template name (``"M*"``: the 33 M dwarf templates, the default for real
        data; ``"*"``: all 47).
    normalise : {"mean", "zscore"}
        See :func:`make_library`.
    directory : path-like, optional
        Directory of the original ``*.fits[.gz]`` files (e.g.
        ``../shared/data/templates_pyhammer``). Default: the packaged library.

    Returns
    -------
    xarray.Dataset
        Library with spectral type, [Fe/H] (as ``template_m_h``) and luminosity class from
        the names; Teff/logg unknown (NaN).

    Raises
    ------
    FileNotFoundError
        No template matches ``pattern``, or ``directory`` does not exist.
    ValueError
        Bad ``normalise``.
    """
    from mspec.data import (
        packaged_templates,
        parse_pyhammer_name,
        pyhammer_files,
        read_pyhammer,
    )

    if normalise not in NORMALISATIONS:
        raise ValueError(f"normalise={normalise!r} must be one of {NORMALISATIONS}")
    source = "PyHammer (Kesseli et al. 2017)"
    if directory is None:
        loglam, flux, info = packaged_templates(pattern)
        return make_library(
            loglam,
            flux,
            [i["name"] for i in info],
            spt=[i["spt"] for i in info],
            m_h=[i["feh"] for i in info],
            lumclass=[i["lumclass"] for i in info],
            source=source,
            normalise=normalise,
        )
    files = pyhammer_files(pattern, directory)
    loglam, flux, info = [], [], []
    for f in files:
        ll, fl = read_pyhammer(f)
        loglam.append(ll)
        flux.append(fl)
        info.append(parse_pyhammer_name(f))
    same = all(ll.shape == loglam[0].shape and np.array_equal(ll, loglam[0]) for ll in loglam)
    if same:
        return make_library(
            loglam[0],
            np.vstack(flux),
            [i["name"] for i in info],
            spt=[i["spt"] for i in info],
            m_h=[i["feh"] for i in info],
            lumclass=[i["lumclass"] for i in info],
            source=source,
            normalise=normalise,
        )
    libs = [
        make_library(
            ll,
            fl,
            [i["name"]],
            spt=[i["spt"]],
            m_h=[i["feh"]],
            lumclass=[i["lumclass"]],
            source=source,
            normalise=normalise,
        )
        for ll, fl, i in zip(loglam, flux, info)
    ]
    return xr.concat(libs, dim="templates")


def _read_fits_templates(path: Path):
    from astropy.io import fits

    with fits.open(path, memmap=False) as hdul:
        for hdu in hdul:
            if isinstance(hdu, fits.BinTableHDU | fits.TableHDU) and hdu.data is not None:
                cols = {c.lower(): c for c in hdu.columns.names}
                if "flux" not in cols:
                    continue
                flux = np.asarray(hdu.data[cols["flux"]], dtype=np.float64)
                if "loglam" in cols:
                    loglam = np.asarray(hdu.data[cols["loglam"]], dtype=np.float64)
                elif "wavelength" in cols:
                    loglam = np.log10(np.asarray(hdu.data[cols["wavelength"]], dtype=np.float64))
                else:
                    raise ValueError(f"{path}: table has FLUX but no LOGLAM/WAVELENGTH column")
                if flux.ndim == 2 and loglam.ndim == 2 and flux.shape[0] == 1:
                    flux, loglam = flux[0], loglam[0]
                if flux.ndim == 2 and loglam.ndim == 1:
                    # one row per template
                    names = (
                        [str(s).strip() for s in hdu.data[cols["name"]]]
                        if "name" in cols
                        else [f"{_stem(path)}_{i}" for i in range(flux.shape[0])]
                    )
                    return loglam, flux, names
                if flux.ndim == 2:
                    # one row per wavelength (a column per template is not FITS-typical)
                    flux = flux.T
                    return loglam, flux, [f"{_stem(path)}_{i}" for i in range(flux.shape[0])]
                return loglam, flux[None, :], [_stem(path)]
    raise ValueError(f"{path}: no table with a FLUX column")


def _stem(path) -> str:
    name = Path(path).name
    for suffix in (".fits.gz", ".fits", ".fit.gz", ".fit", ".csv", ".zarr"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem


def load_templates(paths, *, normalise: str = "mean", meta=None) -> xr.Dataset:
    """Load a user template set.

    Parameters
    ----------
    paths : path-like or sequence of path-like
        * ``*.zarr``: a library saved by :func:`save_templates` (returned as is unless
          ``normalise`` differs — then re-normalised), or a Dataset with ``wavelength`` (Å)
          or ``loglam`` (dim ``pixels``) and ``flux`` (``templates``, ``pixels``).
        * ``*.csv``: first column ``wavelength`` (Å, vacuum, rest frame) or ``loglam``, then
          one column per template (the header gives the names).
        * ``*.fits[.gz]``: a binary table with ``FLUX`` and ``LOGLAM`` or ``WAVELENGTH``
          columns (PyHammer layout works), one template per file, or 2-D ``FLUX`` with one row
          per template (optional ``NAME`` column).
        Several paths are concatenated.
    normalise : {"mean", "zscore"}
        See :func:`make_library`.
    meta : pandas.DataFrame, optional
        Per-template metadata indexed by name with any of the columns ``spt``, ``teff``,
        ``logg``, ``m_h``, ``lumclass``.

    Returns
    -------
    xarray.Dataset
        The library.

    Raises
    ------
    ValueError
        Unknown format or unreadable content (the message names the path).
    FileNotFoundError
        A path does not exist.
    """
    if isinstance(paths, str | os.PathLike):
        paths = [paths]
    libs = []
    for p in map(Path, paths):
        if not p.exists():
            raise FileNotFoundError(f"template path {str(p)!r} does not exist")
        name = p.name.lower()
        if name.endswith(".zarr"):
            ds = xr.open_zarr(p).load()
            if "template_flux" in ds:
                lib = check_library(ds, str(p))
                if lib.attrs.get("normalisation") != normalise:
                    w = np.asarray(lib["template_wavelength"].values)
                    lib = lib.copy()
                    lib["template_flux"] = (
                        ("templates", "grid"),
                        _normalise(np.asarray(lib["template_flux"].values, float), w, normalise),
                    )
                    lib.attrs["normalisation"] = normalise
                libs.append(lib)
                continue
            if "flux" not in ds:
                raise ValueError(f"{p}: Zarr store has neither template_flux nor flux")
            flux = np.asarray(ds["flux"].values, dtype=np.float64)
            if "loglam" in ds.variables:
                loglam = np.asarray(ds["loglam"].values, dtype=np.float64)
            elif "wavelength" in ds.variables:
                loglam = np.log10(np.asarray(ds["wavelength"].values, dtype=np.float64))
            else:
                raise ValueError(f"{p}: Zarr store has flux but no loglam/wavelength")
            flux = np.atleast_2d(flux)
            tdim = ds["flux"].dims[0] if ds["flux"].ndim == 2 else None
            names = (
                [str(s) for s in ds[tdim].values]
                if tdim is not None and tdim in ds.coords
                else [f"{_stem(p)}_{i}" for i in range(flux.shape[0])]
            )
        elif name.endswith(".csv"):
            import pandas as pd

            df = pd.read_csv(p)
            first = df.columns[0]
            if first.lower() == "loglam":
                loglam = df[first].to_numpy(np.float64)
            elif first.lower() in ("wavelength", "wave", "lambda"):
                loglam = np.log10(df[first].to_numpy(np.float64))
            else:
                raise ValueError(f"{p}: first CSV column must be 'wavelength' or 'loglam'")
            names = [str(c) for c in df.columns[1:]]
            if not names:
                raise ValueError(f"{p}: CSV has no template column")
            flux = df[names].to_numpy(np.float64).T
        elif name.endswith((".fits", ".fits.gz", ".fit", ".fit.gz")):
            loglam, flux, names = _read_fits_templates(p)
        else:
            raise ValueError(f"{p}: unknown template format (use .zarr, .csv or .fits[.gz])")
        order = np.argsort(loglam)
        kw = {}
        if meta is not None:
            m = meta.reindex(names)
            for col in ("spt", "teff", "logg", "m_h", "lumclass"):
                if col in m:
                    vals = m[col].to_numpy()
                    kw[col] = (
                        [("" if v is None or v != v else v) for v in vals]
                        if col
                        in (
                            "spt",
                            "lumclass",
                        )
                        else vals.astype(float)
                    )
        libs.append(
            make_library(
                loglam[order], flux[:, order], names, source=str(p.name), normalise=normalise, **kw
            )
        )
    lib = libs[0] if len(libs) == 1 else xr.concat(libs, dim="templates")
    if len(set(lib["template_name"].values.tolist())) != lib.sizes["templates"]:
        raise ValueError("template names must be unique across the loaded files")
    return lib


def save_templates(lib: xr.Dataset, path) -> Path:
    """Write a library to Zarr (readable by :func:`load_templates`)."""
    check_library(lib, "lib")
    path = Path(path)
    lib.to_zarr(path, mode="w")
    return path


def replicate_templates(lib: xr.Dataset, n: int) -> xr.Dataset:
    """A library of ``n`` templates made by cycling through ``lib`` (names get ``#k``).

    Used to time the paper's 233-template configuration with the templates we have.
    """
    check_library(lib, "lib")
    if int(n) < 1:
        raise ValueError(f"n={n!r} must be >= 1")
    idx = np.arange(int(n)) % lib.sizes["templates"]
    out = lib.isel(templates=idx)
    names = [f"{nm}#{k // lib.sizes['templates']}" for k, nm in enumerate(out.template_name.values)]
    return out.assign_coords(template_name=("templates", np.array(names, dtype=str)))


def default_templates(kind: str = "real") -> xr.Dataset:
    """Default template library for real spectra.

    Parameters
    ----------
    kind : {"real"}
        ``"real"``: the 33 PyHammer M templates packaged with mspec
        (:func:`pyhammer_templates`; needs no ``../shared`` data). The simulator's grid is
        :func:`mspec.simulate.simulated_templates`.

    Returns
    -------
    xarray.Dataset
        The library.

    Raises
    ------
    ValueError
        Unknown ``kind``.
    """
    if kind == "real":
        return pyhammer_templates("M*")
    if kind == "demo":
        raise ValueError(
            "kind='demo': the simulator's template grid is mspec.simulate.simulated_templates()"
        )
    raise ValueError(f"kind={kind!r} must be 'real'")
