"""Writing and reading result Datasets as Zarr v3 groups, chunked like the spectra.

Every store mspec writes keeps one chunking along ``spectra`` for all its variables and holds
no object-dtype arrays: strings are written as Zarr v3 variable-length UTF-8 (``string``,
numpy ``StringDType``), converted chunk by chunk so a dask-backed variable is never gathered
into one chunk, and read back as fixed-width numpy unicode (the width is kept in the
variable's ``mspec_str_width`` attribute).
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import numpy as np
import xarray as xr

__all__ = [
    "STR_WIDTH_ATTR",
    "encode_strings",
    "decode_strings",
    "spectra_chunks",
    "check_uniform_chunks",
    "write_results",
    "read_results",
]

#: Attribute holding the fixed width (characters) of a string variable written to Zarr.
STR_WIDTH_ATTR = "mspec_str_width"
_VLEN = np.dtypes.StringDType()


def _is_text(dtype) -> bool:
    return np.dtype(dtype).kind in "USOT"


def encode_strings(ds: xr.Dataset) -> xr.Dataset:
    """Turn every string variable into variable-length ``StringDType`` (lazily, per chunk).

    Parameters
    ----------
    ds : xarray.Dataset
        Dataset about to be written to Zarr.

    Returns
    -------
    xarray.Dataset
        Same chunks; string variables (numpy ``U``/``S``/``O``) become ``StringDType`` with
        their fixed width in ``attrs["mspec_str_width"]``. Object arrays of width unknown
        without computing get width 0 (read back at the width of their longest value).
    """
    out = {}
    for name, var in ds.variables.items():
        if not _is_text(var.dtype) or var.dtype == _VLEN:
            continue
        width = var.dtype.itemsize // 4 if var.dtype.kind == "U" else var.dtype.itemsize
        if var.dtype.kind == "O":
            width = 0
        new = var.copy(data=var.data.astype(_VLEN))
        new.attrs = {**var.attrs, STR_WIDTH_ATTR: int(width)}
        new.encoding = {k: v for k, v in var.encoding.items() if k in ("chunks",)}
        out[name] = new
    if not out:
        return ds
    coords = {k: v for k, v in out.items() if k in ds.coords}
    data = {k: v for k, v in out.items() if k not in ds.coords}
    return ds.assign_coords(coords).assign(data)


def decode_strings(ds: xr.Dataset) -> xr.Dataset:
    """Inverse of :func:`encode_strings`: variable-length strings to fixed-width unicode.

    Lazy for dask-backed variables whose width was recorded; others are read to find it.
    """
    out = {}
    for name, var in ds.variables.items():
        if var.dtype.kind not in "OT":
            continue
        attrs = dict(var.attrs)
        width = int(attrs.pop(STR_WIDTH_ATTR, 0) or 0)
        if width <= 0:
            vals = np.asarray(var.values).astype(str)
            width = max(1, int(np.char.str_len(vals).max(initial=1)))
        new = var.copy(data=var.data.astype(f"<U{width}"))
        new.attrs = attrs
        out[name] = new
    if not out:
        return ds
    coords = {k: v for k, v in out.items() if k in ds.coords}
    data = {k: v for k, v in out.items() if k not in ds.coords}
    return ds.assign_coords(coords).assign(data)


def spectra_chunks(ds: xr.Dataset, dim: str = "spectra") -> dict[str, tuple[int, ...]]:
    """Chunk sizes along ``dim`` of every dask-backed variable that has it.

    Returns
    -------
    dict
        variable name -> tuple of chunk lengths (numpy-backed variables are left out).
    """
    res = {}
    for name, var in ds.variables.items():
        if dim in var.dims and var.chunks is not None:
            res[name] = tuple(var.chunks[var.dims.index(dim)])
    return res


def check_uniform_chunks(target, dim: str = "spectra") -> tuple[int, ...]:
    """Check that every variable has one and the same chunking along ``dim``.

    Parameters
    ----------
    target : xarray.Dataset or path-like
        A Dataset, or the path of a Zarr group (its stored chunk shapes are checked).
    dim : str
        Dimension name.

    Returns
    -------
    tuple of int
        The common chunk lengths along ``dim`` (empty when nothing has ``dim``).

    Raises
    ------
    ValueError
        Naming the variables whose chunking differs.
    """
    if isinstance(target, str | os.PathLike):
        import warnings

        import zarr

        found: dict[str, tuple[int, ...]] = {}
        with warnings.catch_warnings():
            # mspec's own side files (_mspec/, metadata.parquet) are not Zarr nodes
            warnings.simplefilter("ignore")
            group = zarr.open_group(str(target), mode="r")
            arrays = list(group.arrays())
        for name, arr in arrays:
            dims = tuple(arr.metadata.dimension_names or ())
            if dim in dims:
                ax = dims.index(dim)
                size, c = arr.shape[ax], arr.chunks[ax]
                found[name] = tuple(min(c, size - s) for s in range(0, size, c))
    else:
        found = spectra_chunks(target, dim)
    distinct = set(found.values())
    if len(distinct) > 1:
        groups: dict[tuple[int, ...], list[str]] = {}
        for name, ch in found.items():
            groups.setdefault(ch, []).append(name)
        desc = "; ".join(
            f"{sorted(v)[:6]}{'...' if len(v) > 6 else ''}: {len(k)} chunks of {k[0]}"
            for k, v in groups.items()
        )
        raise ValueError(f"variables are chunked differently along {dim!r}: {desc}")
    return next(iter(distinct)) if distinct else ()


def write_results(
    ds: xr.Dataset,
    path,
    *,
    mode: str = "w",
    compute: bool = True,
    variables: Iterable[str] | None = None,
):
    """Write a (lazy) Dataset to a Zarr v3 group, one chunking along ``spectra``.

    Parameters
    ----------
    ds : xarray.Dataset
        Results; dask-backed variables keep their chunks (checked to agree along
        ``spectra`` first), numpy-backed ones get the same chunks.
    path : path-like
        Zarr group to create (``mode="w"`` replaces it).
    mode : str
        Passed to :meth:`xarray.Dataset.to_zarr`.
    compute : bool
        False returns the dask delayed write.
    variables : iterable of str, optional
        Subset to write (default all).

    Returns
    -------
    The result of :meth:`xarray.Dataset.to_zarr`.
    """
    if variables is not None:
        ds = ds[list(variables)]
    chunks = check_uniform_chunks(ds)
    if chunks and "spectra" in ds.dims:
        # numpy-backed variables along spectra follow the dask ones
        ds = ds.chunk({"spectra": chunks})
    ds = encode_strings(ds)
    for var in ds.variables.values():
        var.encoding.pop("chunks", None)
        var.encoding.pop("preferred_chunks", None)
    return ds.to_zarr(str(path), mode=mode, consolidated=False, compute=compute, zarr_format=3)


def read_results(path, *, chunks="auto-store") -> xr.Dataset:
    """Open a group written by :func:`write_results` lazily, strings as numpy unicode.

    Parameters
    ----------
    path : path-like
        Zarr group.
    chunks : "auto-store" or mapping
        ``"auto-store"``: the stored chunks.

    Returns
    -------
    xarray.Dataset
    """
    ds = xr.open_zarr(
        str(path), consolidated=False, chunks={} if chunks == "auto-store" else chunks
    )
    return decode_strings(ds)
