"""Survey-scale positional Gaia cross-match against a HATS catalogue with lsdb (optional).

At survey scale the Gaia table does not fit in memory, so :func:`mspec.cmd.join_gaia`
(astropy, the table in every task) cannot be used. :func:`join_gaia_hats` instead matches
each ``spectra`` chunk of the store against a HATS-partitioned catalogue (Gaia DR3 from
https://data.lsdb.io/hats/gaia_dr3, or one you built with ``hats-import`` /
``lsdb.from_dataframe(...).write_catalog(...)``) with `lsdb <https://docs.lsdb.io>`_: the
chunk's positions become a small lsdb catalogue (:func:`lsdb.from_dataframe`), and
``Catalog.crossmatch`` reads only the HATS partitions (and their margin caches) that the
chunk's sky coverage touches. The nearest source within the radius (default 3 arcsec, as the
paper) is kept and the catalogue's columns that the CMD knows (:data:`mspec.cmd.GAIA_COLUMNS`,
``source_id`` read as ``gaia_source_id``) are joined back per spectrum; spectra without a
match keep NaN (``gaia_source_id`` -1), exactly as :func:`mspec.cmd.join_gaia` with
``on="position"``.

``lsdb`` is an optional dependency (the ``survey`` extra: ``pip install 'mspec[survey]'``);
it is imported only when a HATS catalogue is used.
"""

from __future__ import annotations

import functools
import os
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import xarray as xr

from mspec.cmd import _JOIN_FLOAT, _KEEP_CASE, GaiaTableWarning, check_radius
from mspec.stage import merge_outputs
from mspec.variables import annotate

__all__ = ["EXTRA", "is_hats_catalog", "hats_columns", "join_gaia_hats"]

#: The optional dependency group that provides lsdb.
EXTRA = "survey"
_TABLE_SUFFIXES = (".parquet", ".pq", ".csv", ".csv.gz", ".fits", ".fit", ".fits.gz", ".fts")
# column names of the chunk catalogue; chosen not to collide with a catalogue's columns
_ROW, _RA, _DEC = "_mspec_row", "_mspec_ra", "_mspec_dec"


def _import_lsdb():
    try:
        import lsdb
    except ImportError as err:
        raise ImportError(
            "a HATS catalogue cross-match needs lsdb, which is in mspec's optional extra "
            f"{EXTRA!r}: pip install 'mspec[{EXTRA}]'"
        ) from err
    return lsdb


def is_hats_catalog(path) -> bool:
    """Whether ``path`` names a HATS catalogue or collection rather than a flat table.

    Parameters
    ----------
    path : object
        Anything; only a str or PathLike can be a HATS catalogue.

    Returns
    -------
    bool
        True for a local directory holding ``hats.properties`` (a catalogue) or
        ``collection.properties`` (a collection, e.g. a catalogue with its margin cache), and
        for a URL (``scheme://...``) not ending in a table suffix (``.parquet``, ``.csv``,
        ``.fits``, ...). Nothing is read from a URL.
    """
    if not isinstance(path, (str, os.PathLike)):
        return False
    s = os.fspath(path)
    if "://" in s:
        return not s.rstrip("/").lower().endswith(_TABLE_SUFFIXES)
    p = Path(s).expanduser()
    return p.is_dir() and any(
        (p / f).is_file() for f in ("hats.properties", "collection.properties")
    )


@functools.lru_cache(maxsize=8)
def _open(path: str, columns: tuple[str, ...] | None):
    """The lazy lsdb catalogue (metadata only), once per process and column set."""
    lsdb = _import_lsdb()
    return lsdb.open_catalog(path, columns=list(columns) if columns is not None else None)


def _numeric_type(t) -> str:
    import pyarrow as pa

    if pa.types.is_integer(t):
        return "i"
    if pa.types.is_floating(t) or pa.types.is_decimal(t):
        return "f"
    return ""


def hats_columns(catalog) -> dict[str, str]:
    """The known numeric columns a HATS catalogue provides, as registry name -> its column.

    Parameters
    ----------
    catalog : str or PathLike
        HATS catalogue or collection: a local directory or a URL.

    Returns
    -------
    dict
        Registry name (:data:`mspec.cmd.GAIA_COLUMNS` and ``bp_rp_0``, ``M_G_0``,
        ``W1_W2_0``) -> the catalogue's column. Names match case-insensitively;
        ``source_id`` provides ``gaia_source_id`` when the latter is absent. Known columns
        that are not numeric are left out with a :class:`mspec.cmd.GaiaTableWarning`.

    Raises
    ------
    ImportError
        lsdb is not installed (names the ``survey`` extra).
    """
    cat = _open(os.fspath(catalog), None)
    schema = cat.original_schema if cat.hc_structure.original_schema is not None else None
    types = {f.name: f.type for f in schema} if schema is not None else {}
    by_name: dict[str, str] = {}
    for col in cat.all_columns:
        by_name.setdefault(_KEEP_CASE.get(str(col).lower(), str(col).lower()), str(col))
    if "gaia_source_id" not in by_name and "source_id" in by_name:
        by_name["gaia_source_id"] = by_name["source_id"]
    found: dict[str, str] = {}
    for name, col in by_name.items():
        if name not in (*_JOIN_FLOAT, "gaia_source_id"):
            continue
        kind = _numeric_type(types[col]) if col in types else "f"
        if not kind or (name == "gaia_source_id" and kind != "i"):
            warnings.warn(
                f"catalog: column {col!r} ({types.get(col)}) is not "
                f"{'an integer' if name == 'gaia_source_id' else 'numeric'}; not joined",
                GaiaTableWarning,
                stacklevel=2,
            )
            continue
        found[name] = col
    return found


def _as_float(s: pd.Series) -> np.ndarray:
    try:
        return s.to_numpy(dtype=np.float64, na_value=np.nan)
    except (TypeError, ValueError):
        return pd.to_numeric(s, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)


def _match_hats_block(ra, dec, *, path, columns, names, radius):
    """Per-chunk cross-match: one output array per name, then the separation (arcsec)."""
    ra = np.asarray(ra, np.float64)
    dec = np.asarray(dec, np.float64)
    cols = dict(names)
    outs = {n: np.full(ra.shape, np.nan) for n in cols}
    if "gaia_source_id" in cols:
        outs["gaia_source_id"] = np.full(ra.shape, -1, np.int64)
    sep = np.full(ra.shape, np.nan)
    ok = np.isfinite(ra) & np.isfinite(dec) & (np.abs(dec) <= 90)
    if ok.any():
        lsdb = _import_lsdb()
        right = _open(path, columns)
        flat_ok = np.flatnonzero(ok.ravel())
        left = pd.DataFrame(
            {_ROW: flat_ok, _RA: np.mod(ra.ravel()[flat_ok], 360.0), _DEC: dec.ravel()[flat_ok]}
        )
        lcat = lsdb.from_dataframe(
            left, catalog_name="spectra", ra_column=_RA, dec_column=_DEC, margin_threshold=None
        )
        # how="left": a chunk outside the catalogue's coverage gives unmatched rows, not an
        # error; n_neighbors=1: the nearest source, as astropy's match_to_catalog_sky
        xm = lcat.crossmatch(
            right,
            n_neighbors=1,
            radius_arcsec=radius,
            how="left",
            suffixes=("_spectra", "_hats"),
            suffix_method="overlapping_columns",
            log_changes=False,
        )
        df = xm.to_dask_dataframe(divisions=False).compute(scheduler="sync")
        dist = _as_float(df["_dist_arcsec"])
        keep = np.isfinite(dist) & (dist <= radius)
        df = df.loc[keep].assign(_d=dist[keep]).sort_values("_d", kind="stable")
        df = df.drop_duplicates(_ROW, keep="first")  # one source per spectrum, the nearest
        rows = df[_ROW].to_numpy(np.int64)
        for n, col in cols.items():
            src = df[col]
            if n == "gaia_source_id":
                outs[n].ravel()[rows] = src.to_numpy(dtype=np.int64, na_value=-1)
            else:
                outs[n].ravel()[rows] = _as_float(src)
        sep.ravel()[rows] = df["_d"].to_numpy(np.float64)
    return (*(outs[n] for n in cols), sep)


def join_gaia_hats(ds, catalog, *, radius_arcsec: float = 3.0, merge: bool = True):
    """Cross-match the spectra with a HATS catalogue (e.g. Gaia DR3) by position, with lsdb.

    Parameters
    ----------
    ds : xarray.Dataset
        Spectra with ``ra``/``dec`` (deg, ICRS) on ``spectra``; numpy or dask-backed.
    catalog : str or PathLike
        HATS catalogue or collection (local directory or URL such as
        ``"https://data.lsdb.io/hats/gaia_dr3"``). A collection's default margin cache is
        used; without a margin, spectra within the radius of a partition boundary may miss
        their match (warned).
    radius_arcsec : float
        Match radius (arcsec, > 0; default 3, as the paper). The nearest source within it is
        kept.
    merge : bool
        Return ``ds`` with the columns added (replacing, with a warning, existing ones) or
        only the joined variables.

    Returns
    -------
    xarray.Dataset
        The known columns the catalogue has (:func:`hats_columns`: float64, NaN where no
        match; ``gaia_source_id`` int64, -1 where no match) and ``gaia_match_sep``
        (arcsec), along ``spectra``: the same variables as :func:`mspec.cmd.join_gaia` with
        ``on="position"``. Lazy on a dask-backed ``ds``: each ``spectra`` chunk is matched in
        its own task, which reads only the HATS partitions the chunk's positions fall in
        (the catalogue's path, not its data, travels with the graph). Spectra with NaN or
        out-of-range positions are not matched.

    Raises
    ------
    ImportError
        lsdb is not installed (names the ``survey`` extra).
    ValueError
        Bad ``radius_arcsec``; ``ds`` without ``ra``/``dec``; a catalogue without any known
        column.
    """
    if not isinstance(ds, xr.Dataset):
        raise TypeError(f"ds must be an xarray.Dataset, got {type(ds).__name__}")
    if not isinstance(catalog, (str, os.PathLike)):
        raise TypeError(
            f"catalog must be a path or URL of a HATS catalogue, got {type(catalog).__name__}"
        )
    radius = check_radius(radius_arcsec)
    for c in ("ra", "dec"):
        if c not in ds.variables:
            raise ValueError(f"ds: the HATS cross-match needs the {c!r} variable (deg)")
    _import_lsdb()
    path = os.fspath(catalog)
    if "://" not in path:
        path = os.fspath(Path(path).expanduser())
        if not Path(path).exists():
            raise FileNotFoundError(f"catalog: {path!r} does not exist")
    mapping = hats_columns(path)
    if not mapping:
        raise ValueError(
            f"catalog: {path!r} has none of the known columns {['source_id', *_JOIN_FLOAT]}"
        )
    cat = _open(path, None)
    if cat.margin is None:
        warnings.warn(
            f"catalog: {path!r} has no margin cache: spectra within {radius:g} arcsec of a "
            "partition boundary may miss their match",
            GaiaTableWarning,
            stacklevel=2,
        )
    info = cat.hc_structure.catalog_info
    columns = tuple(dict.fromkeys([info.ra_column, info.dec_column, *mapping.values()]))
    names = tuple(mapping.items())
    dtypes = [np.int64 if n == "gaia_source_id" else np.float64 for n in mapping]
    outs = xr.apply_ufunc(
        _match_hats_block,
        ds["ra"],
        ds["dec"],
        output_core_dims=[[]] * (len(names) + 1),
        dask="parallelized",
        output_dtypes=[*dtypes, np.float64],
        kwargs={"path": path, "columns": columns, "names": names, "radius": radius},
    )
    res = xr.Dataset({n: o for n, o in zip([*mapping, "gaia_match_sep"], outs)})
    if "obsid" in ds.coords:
        res = res.assign_coords(obsid=ds["obsid"])
    res = annotate(res)
    res.attrs["gaia_join"] = f"position, {radius:g} arcsec, HATS {path}"
    if not merge:
        return res
    return merge_outputs(ds, res, merge=True, stage_name="join_gaia_hats")
