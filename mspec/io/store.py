"""The chunked Zarr v3 spectrum store: ``ingest`` LAMOST files into it, ``open_store`` it.

Layout of a store directory (details in ``docs/store.md``)::

    store/
      zarr.json, flux/, ivar/, andmask/, ormask/, obsid/, loglam/, ra/, ...   Zarr v3 arrays
      metadata.parquet/part-<batch>.parquet     per-spectrum metadata (dask.dataframe-readable)
      quarantine.parquet/part-<batch>.parquet   skipped files with a reason code
      _mspec/state.json                         committed size, chunk size, string widths
      _mspec/log/batch-<batch>.parquet          every file seen, its status and row (the plan)
      _mspec/done/batch-<batch>/<a>-<b>.json    done records of the pending batch's write units
      _mspec/lock                               held while an ingest writes

An ingest proceeds in *batches* of files. Each batch is (1) scanned in parallel on the dask
cluster (read, validate, metadata), (2) planned on the client (quarantine bad files, drop
duplicate obsids keeping the first, assign store rows in source order) and the plan saved
atomically, (3) written: the arrays are resized, the metadata written, and the spectra read
again and written by parallel *units*, each covering the rows of exactly one Zarr chunk (so
no two tasks touch one chunk) and leaving a done record (with the files that could not be
read again) once its data are written, (4) committed atomically (``state.json``). A rerun
after a crash or ``kill -9`` finishes the pending batch from its saved plan, skipping units
with a done record, then continues with the files not yet seen, so the store is identical
to an uninterrupted one. Files already in the store's log are skipped, which is also how
appending works.

The lock, the done records, the atomic commits and the bounded task runner are the ones the
pipeline runner uses (:mod:`mspec._exec`).
"""

from __future__ import annotations

import contextlib
import glob as globmod
import io
import itertools
import json
import logging
import os
import time
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np

from mspec._exec import (
    LOCAL_SCHEDULERS,
    SYNC_SCHEDULERS,
    DirLock,
    DoneRecords,
    LockError,
    atomic_write,
    clean_partials,
    run_bounded,
)
from mspec.io.lamost import (
    MASK_NODATA,
    META_VARIABLES,
    BadFileError,
    read_spectrum,
)
from mspec.variables import NPIX, VARIABLES, attrs_for, loglam_grid, validate

__all__ = [
    "ingest",
    "open_store",
    "resolve_sources",
    "iter_sources",
    "store_state",
    "StoreError",
    "StoreLockedError",
]

log = logging.getLogger(__name__)

STORE_FORMAT = "mspec-store"
STORE_VERSION = 1
#: Spectra per dask task when scanning files (pass 1).
SCAN_GROUP = 200
#: Minimum chunks per batch (a batch is the unit of planning and commit). A new store uses
#: max(BATCH_CHUNKS, 2 x the cluster's threads), recorded in its state so that resuming or
#: appending on another cluster partitions files the same way. The driver holds one batch's
#: scan records and plan (~10 KB per file): 8 chunks of 1,000 keep it near 100 MB whatever
#: the survey's size.
BATCH_CHUNKS = 8
SPECTRAL = ("flux", "ivar", "andmask", "ormask")
#: Quarantine code of a file that was read when the batch was planned but not when its
#: spectrum was written (moved, truncated or rewritten meanwhile); always retried by a rerun.
CHANGED_CODE = "changed_during_ingest"
#: Bytes one spectrum takes in a write task (flux, ivar, andmask, ormask: 4 bytes each).
_BYTES_PER_SPECTRUM = NPIX * 16
_FITS_SUFFIXES = (".fits", ".fits.gz", ".fit", ".fit.gz", ".fts", ".fts.gz")
_CATALOG_SUFFIXES = (".csv", ".csv.gz", ".parquet", ".pq")
# LAMOST catalogue column names -> registry names
_CATALOG_ALIASES = {
    "class": "lamost_class",
    "subclass": "lamost_subclass",
    "z": "lamost_z",
    "z_err": "lamost_z_err",
    "data_v": "release",
    **{f"snr{b}": f"snr_{b}" for b in "ugriz"},
}
_PATH_COLUMNS = ("path", "file", "filename", "fits", "spec_file", "fits_file")


@contextlib.contextmanager
def _quiet():
    """Silence zarr's warning about the non-Zarr folders (tables, _mspec) inside a store."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Object at .* is not recognized")
        yield


class StoreError(RuntimeError):
    """The store is not an mspec store, is inconsistent, or is locked by another ingest."""


class StoreLockedError(StoreError, LockError):
    """Another live ingest holds the store's lock (a :class:`mspec._exec.LockError` too)."""


# --------------------------------------------------------------------------- sources


def _is_catalog(p: str) -> bool:
    return p.lower().endswith(_CATALOG_SUFFIXES)


def _fits_files_in(directory: Path):
    """FITS files under ``directory`` (recursively), in the sorted order of their full paths.

    Listed one folder at a time, so the survey's file list is never held: a folder's entries
    are sorted with a sub-folder keyed as ``name/``, which orders them as sorting every full
    path would. Symlinked folders are not entered (as ``os.walk``); unreadable ones are
    skipped."""

    def walk(folder: str):
        try:
            with os.scandir(folder) as it:
                entries = list(it)
        except OSError:
            return
        keyed = []
        for e in entries:
            try:
                is_dir = e.is_dir()
            except OSError:
                is_dir = False
            if is_dir:
                if not e.is_symlink():
                    keyed.append((e.name + os.sep, e.path, True))
            elif e.name.lower().endswith(_FITS_SUFFIXES):
                keyed.append((e.name, e.path, False))
        del entries
        keyed.sort()
        for _, path, sub in keyed:
            if sub:
                yield from walk(path)
            else:
                yield path

    yield from walk(os.fspath(directory))


class _PathSet:
    """A set of file paths at 16 bytes each (a survey's millions of paths as strings would
    cost ~170 bytes each in the driver).

    Paths are kept as 128-bit BLAKE2b digests (a false match is as likely as 1 in 10^25 for
    a million paths): recent ones in a Python set, merged every :attr:`MERGE` additions into
    one sorted numpy array searched by bisection.
    """

    MERGE = 65536

    def __init__(self):
        self._sorted = np.empty(0, "S16")
        self._recent: set[bytes] = set()

    @staticmethod
    def _key(path: str) -> bytes:
        import hashlib

        return hashlib.blake2b(path.encode("utf-8", "surrogateescape"), digest_size=16).digest()

    def add(self, path: str) -> bool:
        """Add ``path``; True when it was not in the set yet."""
        key = self._key(path)
        if self._has(key):
            return False
        self._recent.add(key)
        if len(self._recent) >= self.MERGE:
            new = np.array(list(self._recent), dtype="S16")
            self._sorted = np.union1d(self._sorted, new)
            self._recent.clear()
        return True

    def _has(self, key: bytes) -> bool:
        if key in self._recent:
            return True
        i = int(np.searchsorted(self._sorted, key))
        # numpy drops an S16 value's trailing NUL bytes: compare the same way
        return i < self._sorted.size and self._sorted[i] == key.rstrip(b"\0")

    def __contains__(self, path: str) -> bool:
        return self._has(self._key(path))

    def __len__(self) -> int:
        return self._sorted.size + len(self._recent)


#: Key of the catalogue values marking a listed file refused before reading (its reason).
_REFUSED = "__refused__"


def _inside(path: str, root: str) -> bool:
    """Whether ``path`` (symlinks resolved) lies inside directory ``root``."""
    real, base = os.path.realpath(path), os.path.realpath(root)
    return real == base or real.startswith(base.rstrip(os.sep) + os.sep)


#: Catalogue rows read at a time (a LAMOST catalogue of a whole release is millions of rows).
CATALOG_BATCH = 65536


def _catalog_frames(path: str):
    """The catalogue's rows as pandas DataFrames of at most :data:`CATALOG_BATCH` rows."""
    import pandas as pd

    if path.lower().endswith((".parquet", ".pq")):
        import pyarrow.parquet as pq

        for rb in pq.ParquetFile(path).iter_batches(batch_size=CATALOG_BATCH):
            yield rb.to_pandas()
    else:
        yield from pd.read_csv(path, chunksize=CATALOG_BATCH)


def _catalog_columns(path: str) -> list[str]:
    """The catalogue's column names (lower case), read from its schema or header only."""
    import pandas as pd

    if path.lower().endswith((".parquet", ".pq")):
        import pyarrow.parquet as pq

        names = pq.read_schema(path).names
    else:
        names = list(pd.read_csv(path, nrows=0).columns)
    return [str(c).strip().lower() for c in names]


def _check_catalog(path: str) -> None:
    cols = set(_catalog_columns(path))
    if not any(c in cols for c in _PATH_COLUMNS) and not {"lmjd", "planid", "spid",
                                                           "fiberid"} <= cols:  # fmt: skip
        raise ValueError(
            f"sources: catalogue {path} has no file column ({', '.join(_PATH_COLUMNS)}) "
            "and no lmjd/planid/spid/fiberid columns to build LAMOST file names"
        )


def _read_catalog(path: str, allow_outside: bool = False):
    """Yield ``(absolute path, catalogue values)`` for every row of a catalogue, reading it
    :data:`CATALOG_BATCH` rows at a time."""
    _check_catalog(path)
    base = os.path.dirname(os.path.abspath(path))
    for df in _catalog_frames(path):
        df.columns = [str(c).strip().lower() for c in df.columns]
        pcol = next((c for c in _PATH_COLUMNS if c in df.columns), None)
        if pcol is None:
            names = [
                f"spec-{int(r.lmjd)}-{str(r.planid).strip()}_sp{int(r.spid):02d}-{int(r.fiberid):03d}.fits"
                for r in df.itertuples()
            ]
        else:
            names = [str(v) for v in df[pcol]]
        keep = {}
        for c in df.columns:
            name = _CATALOG_ALIASES.get(c, c)
            if name in VARIABLES and VARIABLES[name].dims == ("spectra",) and name != "file":
                keep[c] = name
        # one shared set of columns per batch; each file gets a row view (not a dict of its own)
        cols = {
            name: df[c].to_numpy() if isinstance(df[c].dtype, np.dtype) else df[c].to_numpy(object)
            for c, name in keep.items()
        }  # extension dtypes (nullable Int64, ...) as objects: 7 stays 7, NA stays missing
        for i, name in enumerate(names):
            p = name if os.path.isabs(name) else os.path.join(base, name)
            if not os.path.exists(p) and os.path.exists(p + ".gz"):
                p = p + ".gz"
            rec = _CatalogRow(cols, i)
            if not allow_outside and not _inside(p, base):
                # a catalogue row must not make the ingest read files elsewhere (../../etc/...)
                rec = {
                    _REFUSED: f"listed in {path} as {name!r}, which lies outside {base} "
                    "(pass allow_outside=True to read files outside the catalogue's folder)"
                }
            yield os.path.abspath(p), rec


class _CatalogRow(Mapping):
    """The non-null catalogue values of one listed file, read on demand from the catalogue's
    shared columns.

    A dict per file cost about 3.8 KB (366 MiB of driver memory for 100,000 files, 3 GiB for
    a survey); a row view costs its index. Values are Python scalars (numpy ones unboxed),
    nulls are absent, and it pickles as a plain dict, so a task never carries the catalogue.
    """

    __slots__ = ("_cols", "_i")

    def __init__(self, cols: dict, i: int):
        self._cols = cols
        self._i = i

    def _value(self, key):
        v = self._cols[key][self._i]
        if isinstance(v, np.generic):
            v = v.item()
        return None if _isnull(v) else v

    def __getitem__(self, key):
        v = self._value(key)
        if v is None:
            raise KeyError(key)
        return v

    def __iter__(self):
        return (k for k in self._cols if self._value(k) is not None)

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def __reduce__(self):
        return (dict, (dict(self),))

    def __repr__(self) -> str:
        return repr(dict(self))


def _isnull(v) -> bool:
    import pandas as pd

    if v is None:
        return True
    try:
        return np.ndim(v) == 0 and bool(pd.isna(v))
    except (TypeError, ValueError):
        return False


def resolve_sources(sources, *, allow_outside: bool = False) -> list[tuple[str, Mapping]]:
    """Expand ``sources`` into an ordered list of ``(absolute path, catalogue values)``.

    Parameters
    ----------
    sources : str, PathLike or sequence of them
        Directories (searched recursively for ``*.fits[.gz]``, sorted), glob patterns
        (sorted matches), single files, or LAMOST catalogues (``.csv``/``.parquet``) with a
        ``file``/``filename``/``path`` column or ``lmjd, planid, spid, fiberid`` columns (paths
        relative to the catalogue; ``.gz`` tried). A sequence is expanded in its order.
    allow_outside : bool
        Let catalogues list files outside their own folder (absolute paths, ``..``, symlinks
        leading out). False (default): such rows are kept but marked refused, and
        :func:`ingest` quarantines them as ``outside_root`` without opening them.

    Returns
    -------
    list of (str, Mapping)
        Unique paths in deterministic order (first occurrence kept) with the catalogue values
        of registered per-spectrum variables for that file (empty without a catalogue; a
        read-only row view of the catalogue's columns, which pickles as a plain dict).

    Raises
    ------
    FileNotFoundError
        A source that is neither an existing path, a glob pattern nor a FITS file name (a
        missing ``*.fits[.gz]`` file is kept and later quarantined as ``not_found``).
    TypeError, ValueError
        ``sources`` of the wrong type, empty, or an unusable catalogue.
    """
    return list(iter_sources(sources, allow_outside=allow_outside))


def _checked_sources(sources, allow_outside) -> list[str]:
    """The sources as strings, every one checked (types, existence, catalogue columns)
    before any file is listed, so a bad source fails before an ingest starts."""
    if not isinstance(allow_outside, bool):
        raise TypeError(f"allow_outside must be True or False, got {allow_outside!r}")
    if isinstance(sources, str | os.PathLike):
        sources = [sources]
    if not isinstance(sources, Iterable):
        raise TypeError(f"sources must be a path, glob or list of them, got {type(sources)}")
    sources = list(sources)
    if not sources:
        raise ValueError("sources is empty")
    out = []
    for src in sources:
        if not isinstance(src, str | os.PathLike):
            raise TypeError(f"sources: entries must be paths, got {type(src).__name__}")
        s = os.path.expanduser(os.fspath(src))
        if _is_catalog(s) and os.path.isfile(s):
            _check_catalog(s)
        elif not (os.path.exists(s) or globmod.has_magic(s) or s.lower().endswith(_FITS_SUFFIXES)):
            raise FileNotFoundError(f"sources: {s!r} does not exist")
        out.append(s)
    return out


def iter_sources(sources, *, allow_outside: bool = False):
    """:func:`resolve_sources` one file at a time (same order, same values).

    Every source is checked first (the same errors as :func:`resolve_sources`, raised by the
    call itself); catalogues are then read :data:`CATALOG_BATCH` rows at a time, so listing
    a survey holds one batch of catalogue rows, one folder's listing and the set of paths
    seen (to drop repeats; 16 bytes per path), not the whole list.

    Parameters
    ----------
    sources, allow_outside
        As for :func:`resolve_sources`.

    Returns
    -------
    iterator of (str, Mapping)
    """
    checked = _checked_sources(sources, allow_outside)
    return _iter_checked(checked, allow_outside)


def _iter_checked(sources: list[str], allow_outside: bool):
    seen = _PathSet()
    for s in sources:
        if os.path.isdir(s):
            items = ((os.path.abspath(p), {}) for p in _fits_files_in(Path(s)))
        elif _is_catalog(s) and os.path.isfile(s):
            items = _read_catalog(s, allow_outside)
        elif os.path.exists(s):
            items = iter([(os.path.abspath(s), {})])
        elif globmod.has_magic(s):
            items = (
                (os.path.abspath(p), {})
                for p in sorted(globmod.glob(s, recursive=True))
                if os.path.isfile(p)
            )
        else:  # a missing FITS file: quarantined, not fatal
            items = iter([(os.path.abspath(s), {})])
        for p, d in items:
            if seen.add(p):
                yield p, d


# --------------------------------------------------------------------------- store state


def _meta_dir(store: Path) -> Path:
    return store / "_mspec"


def _atomic_parquet(df, path: Path) -> None:
    buf = io.BytesIO()
    df.to_parquet(buf, index=False)
    atomic_write(path, buf.getvalue())


def store_state(store: str | os.PathLike) -> dict:
    """Return the committed state of a store (``n_spectra``, ``chunk_size``, ``batches``...).

    Raises
    ------
    StoreError
        If ``store`` is not an mspec store.
    """
    if os.path.exists(store) and not os.path.isdir(store):
        raise StoreError(f"store: {store} is a file, not a store directory")
    p = _meta_dir(Path(store)) / "state.json"
    try:
        state = json.loads(p.read_text())
    except (FileNotFoundError, NotADirectoryError):
        raise StoreError(f"store: {store} is not an mspec store (no _mspec/state.json)") from None
    except (OSError, ValueError) as exc:
        raise StoreError(f"store: cannot read {p}: {exc}") from None
    if not isinstance(state, dict):
        raise StoreError(f"store: {p} is not a store state")
    if state.get("format") != STORE_FORMAT:
        raise StoreError(f"store: {store} has an unknown format {state.get('format')!r}")
    return state


def _write_state(store: Path, state: dict) -> None:
    atomic_write(_meta_dir(store) / "state.json", json.dumps(state, indent=1, sort_keys=True))


def _storage_dtype(name: str):
    """(numpy dtype or 'str', fill value) of a variable in the store."""
    if name in SPECTRAL:
        return {"flux": ("float32", np.nan), "ivar": ("float32", 0.0)}.get(
            name, ("int32", int(MASK_NODATA))
        )
    if name == "obsid":
        return "int64", 0
    if name in META_VARIABLES:
        kind, missing = META_VARIABLES[name]
        return kind, missing
    var = VARIABLES[name]
    if len(var.dtype) > 1:
        dt = np.dtype(var.dtype)
        return dt.name, {"f": np.nan, "b": False}.get(dt.kind, -1)
    return {
        "f": ("float64", np.nan),
        "i": ("int64", -1),
        "u": ("uint64", 0),
        "b": ("bool", False),
        "S": ("str", ""),
    }[var.dtype]


def _compressor(kind: str):
    from zarr.codecs import BloscCodec

    shuffle = "noshuffle" if kind in ("str", "bool") else "shuffle"
    return BloscCodec(cname="zstd", clevel=5, shuffle=shuffle)


def _create_array(group, name: str, n: int, chunk: int):
    kind, fill = _storage_dtype(name)
    two_d = name in SPECTRAL
    shape = (n, NPIX) if two_d else (n,)
    chunks = (chunk, NPIX) if two_d else (chunk,)
    dims = ("spectra", "pixels") if two_d else ("spectra",)
    attrs = dict(attrs_for(name))
    if name != "obsid":
        attrs["coordinates"] = "obsid loglam" if two_d else "obsid"
    group.create_array(
        name,
        shape=shape,
        chunks=chunks,
        dtype=str if kind == "str" else kind,
        fill_value=fill,
        dimension_names=dims,
        attributes=attrs,
        compressors=_compressor(kind),
        overwrite=True,
    )


def _ensure_store(store: Path, chunk_size: int, batch_chunks: int = BATCH_CHUNKS) -> dict:
    """Create the store if needed; return its state."""
    with _quiet():
        return _ensure_store_impl(store, chunk_size, batch_chunks)


def _ensure_store_impl(store: Path, chunk_size: int, batch_chunks: int) -> dict:
    import zarr

    mdir = _meta_dir(store)
    fresh = not (mdir / "state.json").exists()
    if fresh:
        # state.json is written last: a store without it is empty or our own interrupted
        # creation (root attrs carry mspec_store), which is safe to redo
        others = [p for p in store.iterdir() if p.name != "_mspec"] if store.exists() else []
        if others and not _is_own_skeleton(store):
            raise StoreError(f"store: {store} exists and is not an mspec store")
        (mdir / "log").mkdir(parents=True, exist_ok=True)
        state = {
            "format": STORE_FORMAT,
            "version": STORE_VERSION,
            "chunk_size": int(chunk_size),
            "batch_chunks": int(batch_chunks),
            "npix": NPIX,
            "n_spectra": 0,
            "batches": 0,
            "variables": [],
            "str_len": {},
        }
    else:
        state = store_state(store)
    group = zarr.open_group(
        str(store),
        mode="a",
        zarr_format=3,
        attributes={"mspec_store": STORE_VERSION, "chunk_size": int(state["chunk_size"])},
    )
    if fresh or "loglam" not in group:
        group.create_array(
            "loglam",
            shape=(NPIX,),
            chunks=(NPIX,),
            dtype="float64",
            fill_value=np.nan,
            dimension_names=("pixels",),
            attributes=attrs_for("loglam"),
            overwrite=True,
        )
    if not np.array_equal(group["loglam"][:], loglam_grid()):
        group["loglam"][:] = loglam_grid()
    if fresh:
        for name in ["obsid", *SPECTRAL, *META_VARIABLES]:
            _create_array(group, name, 0, int(state["chunk_size"]))
            state["variables"].append(name)
        _write_state(store, state)
    _ensure_arrays(store, state, ["obsid", *SPECTRAL, *META_VARIABLES], group=group)
    return state


def _is_own_skeleton(store: Path) -> bool:
    try:
        attrs = json.loads((store / "zarr.json").read_text()).get("attributes", {})
    except (OSError, ValueError):
        return False
    return attrs.get("mspec_store") == STORE_VERSION


def _ensure_arrays(store: Path, state: dict, names, group=None) -> None:
    """Create missing arrays (length = committed rows, read as fill values)."""
    import zarr

    group = group if group is not None else zarr.open_group(str(store), mode="a")
    with _quiet():
        existing = set(group.array_keys())
    for name in names:
        if name not in existing:
            _create_array(group, name, int(state["n_spectra"]), int(state["chunk_size"]))
        if name not in state["variables"]:
            state["variables"].append(name)


def _check_store_path(store: Path) -> None:
    """Refuse, before anything is created, a store path that is a file or a folder that is
    not an mspec store (e.g. a folder of FITS files given by mistake)."""
    if store.exists() and not store.is_dir():
        raise StoreError(f"store: {store} is a file, not a store directory")
    if store.is_dir() and not (_meta_dir(store) / "state.json").exists():
        others = [p for p in store.iterdir() if p.name != "_mspec"]
        if others and not _is_own_skeleton(store):
            raise StoreError(f"store: {store} exists and is not an mspec store")


@contextlib.contextmanager
def _store_lock(store: Path):
    """One ingest per store: :class:`mspec._exec.DirLock` on ``_mspec/lock`` (the file the
    ingests of earlier versions lock too); a lock left by a killed ingest is taken over."""
    lock = DirLock(store, "store", lock_file="_mspec/lock", by="ingest")
    try:
        lock.acquire()
    except LockError as exc:
        raise StoreLockedError(str(exc)) from None
    try:
        yield lock
    finally:
        lock.release()


def _log_path(store: Path, batch: int) -> Path:
    return _meta_dir(store) / "log" / f"batch-{batch:06d}.parquet"


class _StoreLog:
    """What the store's logs say of each file ingested so far, at ~16 bytes per stored file.

    :meth:`get` gives ``(status, code, size, mtime_ns)`` of a path's latest entry, or None
    for a path never listed. Stored files (almost all) are kept in a :class:`_PathSet` (an
    ingest only needs to know they are stored); the others (quarantined) with their entry.
    """

    _STORED = ("stored", "", None, None)

    def __init__(self):
        self.stored = _PathSet()
        self.other: dict[str, tuple] = {}

    def add(self, path: str, entry: tuple) -> None:
        if entry[0] == "stored":
            self.stored.add(path)
            self.other.pop(path, None)
        else:
            self.other[path] = entry

    def get(self, path: str) -> tuple | None:
        entry = self.other.get(path)
        if entry is not None:
            return entry
        return self._STORED if path in self.stored else None

    def __len__(self) -> int:
        return len(self.stored) + len(self.other)


def _seen(store: Path) -> _StoreLog:
    """Each listed path's latest entry in the store's logs (a file stored after being
    quarantined is stored; a path is never stored twice, an ingest skips stored files)."""
    import pyarrow.parquet as pq

    seen = _StoreLog()
    for p in sorted((_meta_dir(store) / "log").glob("batch-*.parquet")):
        names = pq.read_schema(p).names
        cols = [c for c in ("path", "status", "code", "size", "mtime_ns") if c in names]
        t = pq.read_table(p, columns=cols).to_pydict()
        for i in range(len(t["path"])):
            seen.add(
                t["path"][i],
                tuple(t[c][i] if c in t else None for c in ("status", "code", "size", "mtime_ns")),
            )
    return seen


def _stat(path: str) -> tuple[int, int]:
    """(size, mtime_ns) of a file, (-1, -1) when it cannot be stat'ed."""
    try:
        st = os.stat(path)
    except OSError:
        return -1, -1
    return int(st.st_size), int(st.st_mtime_ns)


def _to_retry(entry: tuple, path: str) -> bool:
    """Whether a quarantined file is worth reading again: it changed since it was quarantined
    (size or mtime, appeared or vanished), or it changed while an ingest was writing it."""
    status, code, size, mtime = entry
    if status == "stored":
        return False
    if code == CHANGED_CODE:
        return True
    if size is None or mtime is None:  # a log written before sizes were recorded
        return False
    return _stat(path) != (int(size), int(mtime))


# --------------------------------------------------------------------------- dask execution


class _Compute:
    """Where ingest's tasks run (a ``distributed`` client or a local dask scheduler); they
    run through :func:`mspec._exec.run_bounded`, as the pipeline's chunks do."""

    def __init__(self, client):
        self.client = None
        self.scheduler = None
        self._own = False
        if client is None:
            try:
                from distributed import default_client

                self.client = default_client()
            except (ImportError, ValueError):
                self.scheduler = "threads"
        elif isinstance(client, str):
            if client in LOCAL_SCHEDULERS:
                self.scheduler = client
            elif "://" in client or ":" in client:
                from distributed import Client

                try:
                    self.client = Client(client, timeout="20s")
                except (OSError, TimeoutError, ValueError) as exc:
                    raise ValueError(
                        f"client: cannot connect to the dask scheduler at {client!r} ({exc})"
                    ) from None
                self._own = True
            else:
                raise ValueError(
                    f"client must be None, a distributed.Client, a scheduler address "
                    f"(tcp://host:port) or one of {sorted(LOCAL_SCHEDULERS)}; got {client!r}"
                )
        else:
            try:
                from distributed import Client
            except ImportError:  # pragma: no cover
                Client = ()
            if not isinstance(client, Client):
                raise TypeError(
                    "client must be None, a distributed.Client, a scheduler address or one of "
                    f"{sorted(LOCAL_SCHEDULERS)}; got {type(client).__name__}"
                )
            self.client = client

    def nthreads(self) -> int:
        """Threads that run tasks at once."""
        if self.client is not None:
            try:
                workers = self.client.scheduler_info().get("workers", {})
                return max(1, sum(int(w.get("nthreads", 1)) for w in workers.values()))
            except Exception:  # pragma: no cover - an unusual scheduler
                return 1
        if self.scheduler in SYNC_SCHEDULERS:
            return 1
        return os.cpu_count() or 1

    def close(self):
        if self._own:
            self.client.close()

    def run(self, fn, calls: list[tuple], on_done, desc: str, progress: bool) -> None:
        """``fn(*args)`` for every ``(key, args)`` of ``calls``; ``on_done(key, result)`` in
        this process as each finishes. Each call is one task, so about two per thread are
        kept in flight (and computed together on a local scheduler)."""
        import dask
        from tqdm.auto import tqdm

        if not calls:
            return
        jobs = [(key, dask.delayed(fn, pure=False, traverse=False)(*args)) for key, args in calls]
        width = 2 * self.nthreads()
        # a synchronous scheduler gains nothing from computing several jobs per call, and
        # one at a time records each unit done as soon as it is written
        batch = 1 if self.client is None and self.scheduler in SYNC_SCHEDULERS else width
        bar = tqdm(total=len(jobs), desc=desc, disable=not progress, unit="task")
        try:
            run_bounded(
                jobs,
                on_done,
                client=self.client,
                scheduler=self.scheduler,
                max_in_flight=width,
                local_batch=batch,
                progress=bar,
                span="mspec-ingest",
            )
        finally:
            bar.close()


# --------------------------------------------------------------------------- tasks


class _ScanGroup:
    """The files of one scan task: their paths and catalogue values as one Arrow table.

    A task's arguments travel through the scheduler, which unpickles them and keeps the
    last 1,000 messages per worker in a debug log (``distributed.admin.low-level-log-
    length``): as one dict per file (~45 Python objects, ~2.8 KB) they made the driver grow
    by ~3 KB per file ingested, up to ~1 GB; as columns they cost the values' bytes.
    """

    def __init__(self, items: list[tuple[str, Mapping]]):
        import pyarrow as pa

        self.paths = pa.array([p for p, _ in items], type=pa.string())
        rows = [dict(d) for _, d in items]
        self.values, self.rows = None, None
        if any(rows):
            keys = list(dict.fromkeys(k for r in rows for k in r))  # not just the first row's
            try:
                self.values = pa.table({k: pa.array([r.get(k) for r in rows]) for k in keys})
            except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
                self.rows = rows  # a column of mixed types: sent as they are

    @classmethod
    def from_table(cls, table) -> _ScanGroup:
        """The group of a :meth:`table` (or a slice of one)."""
        g = cls([])
        g.paths = table.column(_SCAN_PATH)
        g.values = table.drop_columns([_SCAN_PATH]) if table.num_columns > 1 else None
        return g

    def table(self):
        """Paths and values as one Arrow table, or None when a column mixes types."""
        import pyarrow as pa

        if self.rows is not None:
            return None
        t = pa.table({_SCAN_PATH: self.paths})
        for name in self.values.column_names if self.values is not None else ():
            t = t.append_column(name, self.values.column(name))
        return t

    def __iter__(self):
        paths = self.paths.to_pylist()
        if self.values is None:
            return iter(zip(paths, self.rows or [{}] * len(paths), strict=True))
        rows = self.values.to_pylist()
        # nulls absent, as in the catalogue's row views (a missing key = no default)
        return iter(
            [(p, {k: v for k, v in r.items() if v is not None}) for p, r in zip(paths, rows)]
        )

    def __len__(self) -> int:
        return len(self.paths)


_SCAN_PATH = "__path__"


def _scan_path(store: Path, batch: int) -> Path:
    return _meta_dir(store) / "scan" / f"batch-{batch:06d}.parquet"


def _scan_calls(store: Path, batch: int, part: list, group: int) -> list[tuple]:
    """``(key, args)`` of the scan tasks of a batch.

    The batch's files and catalogue values are written to ``_mspec/scan/batch-N.parquet``
    in row groups of ``group`` files and each task reads one, so a task carries a path and
    a number through the scheduler (whose message logs keep the last 1,000 messages per
    connection); when a catalogue column mixes types, the files travel with the tasks."""
    import pyarrow.parquet as pq

    table = _ScanGroup(part).table()
    if table is None:
        return [(i, (part[i : i + group],)) for i in range(0, len(part), group)]
    path = _scan_path(store, batch)
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    pq.write_table(table, buf, row_group_size=group)
    atomic_write(path, buf.getvalue())
    n_groups = -(-len(part) // group)
    return [(i * group, ((str(path), i),)) for i in range(n_groups)]


def _scan_task(src):
    """:func:`_scan_files` of ``src`` (a list of ``(path, values)``, or ``(scan file, row
    group)`` of :func:`_scan_calls`) as a DataFrame (:func:`_records_frame`)."""
    if isinstance(src, tuple):
        import pyarrow.parquet as pq

        path, i = src
        src = _ScanGroup.from_table(pq.ParquetFile(path).read_row_group(i))
    return _records_frame(_scan_files(src))


def _records_frame(records: list[dict]):
    """Scan records as one DataFrame (one column per key, ``obsid`` nullable int64).

    Built where the files were read: a task's result reaches the driver as a few column
    buffers instead of ~50 Python objects per file, whose churn (one batch after another)
    left the driver's small-object arenas fragmented (~75 MiB more at 100k files)."""
    import pandas as pd

    df = pd.DataFrame.from_records(records)
    # nullable int64: derived obsids need all 64 bits (a float column would round them)
    df["obsid"] = pd.array([r.get("obsid") for r in records], dtype="Int64")
    return df


def _scan_files(items) -> list[dict]:
    """Pass 1: read and validate files; return one record (metadata or reason) per file.

    ``items``: ``(path, catalogue values)`` pairs, or a :class:`_ScanGroup` of them."""
    out = []
    for path, defaults in items:
        size, mtime = _stat(path)  # before reading: a change during the read shows next time
        rec = {"path": path, "file": os.path.basename(path), "size": size, "mtime_ns": mtime}
        if _REFUSED in defaults:
            rec.update(status="quarantined", code="outside_root", reason=defaults[_REFUSED])
            rec["layout"] = ""
            out.append(rec)
            continue
        try:
            meta, _, layout = read_spectrum(path, defaults)
        except BadFileError as exc:
            rec.update(status="quarantined", code=exc.code, reason=exc.reason, layout="")
        except Exception as exc:  # never let one file stop an ingest
            rec.update(
                status="quarantined",
                code="read_error",
                reason=f"{type(exc).__name__}: {exc}",
                layout="",
            )
        else:
            rec.update(meta)
            rec.update(status="stored", code="", reason="", layout=layout)
        out.append(rec)
    return out


def _unit_paths(store: str, batch: int, start: int, stop: int) -> list[str]:
    """Files of rows [start, stop) of a planned batch, read from the batch's log (the task
    carries four numbers, not a thousand paths through the scheduler)."""
    import pyarrow.parquet as pq

    t = pq.read_table(_log_path(Path(store), batch), columns=["path", "row"])
    rows = t.column("row").to_numpy()
    sel = np.flatnonzero((rows >= start) & (rows < stop))
    sel = sel[np.argsort(rows[sel], kind="stable")]
    paths = t.column("path").take(sel).to_pylist()
    if len(paths) != stop - start:
        raise StoreError(
            f"store: {store}: the log of batch {batch} plans {len(paths)} files for rows "
            f"{start}-{stop}; run the ingest again"
        )
    return paths


def _write_unit(store: str, batch: int, start: int, stop: int) -> list:
    """Pass 2: read the files of rows [start, stop) of ``batch`` (its log says which) and
    write their spectra.

    Returns ``[row, reason]`` of every file that could not be read again (the caller keeps
    them in the unit's done record, quarantines them and re-plans the batch)."""
    import zarr

    paths = _unit_paths(store, batch, start, stop)
    n = len(paths)
    flux = np.full((n, NPIX), np.nan, np.float32)
    ivar = np.zeros((n, NPIX), np.float32)
    andm = np.full((n, NPIX), MASK_NODATA, np.int32)
    orm = np.full((n, NPIX), MASK_NODATA, np.int32)
    failed = []
    for k, path in enumerate(paths):
        try:
            _, arrays, _ = read_spectrum(path, with_meta=False)
        except Exception as exc:  # the file changed since it was scanned
            code = getattr(exc, "code", type(exc).__name__)
            failed.append([start + k, f"read at planning but not when written ({code}: {exc})"])
            continue
        flux[k], ivar[k], andm[k], orm[k] = arrays
    with _quiet():
        group = zarr.open_group(store, mode="r+")
        sl = slice(start, start + n)
        for name, arr in zip(SPECTRAL, (flux, ivar, andm, orm)):
            group[name][sl] = arr
    return failed


# --------------------------------------------------------------------------- planning


def _plan(frames: list, n_old: int, store_obsid: np.ndarray, store: Path):
    """Assign rows, mark duplicates; return the log DataFrame of the batch.

    ``frames``: the :func:`_records_frame` of each scan task, in file order (a batch has at
    least one file: :func:`_todo_batches` yields no empty batch)."""
    import pandas as pd
    import zarr

    df = pd.concat(frames, ignore_index=True, sort=False)
    stored = (df["status"] == "stored").to_numpy()
    obs = df["obsid"].to_numpy(dtype=np.int64, na_value=0)
    # duplicates against the store
    dup_store = np.zeros(len(df), bool)
    first_file: dict[int, str] = {}
    if store_obsid.size and stored.any():
        order = np.argsort(store_obsid, kind="stable")
        sorted_ids = store_obsid[order]
        ids = obs[stored].astype(np.int64)
        pos = np.searchsorted(sorted_ids, ids)
        hit = (pos < sorted_ids.size) & (sorted_ids[np.minimum(pos, sorted_ids.size - 1)] == ids)
        if hit.any():
            rows = order[pos[hit]]
            with _quiet():
                grp = zarr.open_group(str(store), mode="r")
                files = grp["file"].get_coordinate_selection(rows)
            for i, f in zip(ids[hit], files):
                first_file[int(i)] = str(f)
        dup_store[np.flatnonzero(stored)[hit]] = True
    # duplicates within the batch (keep the first)
    cand = stored & ~dup_store
    dup_batch = np.zeros(len(df), bool)
    idx = np.flatnonzero(cand)
    dup_batch[idx] = pd.Series(obs[idx]).duplicated(keep="first").to_numpy()
    for i in np.flatnonzero(stored & ~dup_store & ~dup_batch):
        first_file.setdefault(int(obs[i]), df["file"].iat[i])
    dup = dup_store | dup_batch
    df.loc[dup, "status"] = "quarantined"
    df.loc[dup, "code"] = "duplicate_obsid"
    df.loc[dup, "reason"] = [
        f"obsid {int(o)} already stored from {first_file.get(int(o), '?')}" for o in obs[dup]
    ]
    keep = (df["status"] == "stored").to_numpy()
    df["row"] = -1
    df.loc[keep, "row"] = n_old + np.arange(int(keep.sum()))
    df["row"] = df["row"].astype("int64")
    return df


def _units(n_old: int, n_new: int, chunk: int) -> list[tuple[int, int]]:
    """Row ranges [a, b) each inside one chunk."""
    out, a = [], n_old
    while a < n_new:
        b = min((a // chunk + 1) * chunk, n_new)
        out.append((a, b))
        a = b
    return out


def _meta_columns(df) -> list[str]:
    skip = {"path", "status", "code", "reason", "layout", "row", "obsid"}
    return [c for c in df.columns if c not in skip and c in VARIABLES]


def _done_records(store: Path, batch: int) -> DoneRecords:
    """Done records of the write units of ``batch`` (one per unit, ``[start, stop)`` rows).

    Units marked by ingests of earlier versions (``done/batch-N/<start>``, no ``.json``) are
    not read: their units are written again, which is idempotent."""
    return DoneRecords(_meta_dir(store) / "done" / f"batch-{batch:06d}")


def _write_batch(store: Path, state: dict, batch: int, df, compute: _Compute, progress: bool):
    """Resize, write metadata and spectra of a planned batch (idempotent, resumable).

    Units with a done record are skipped; a unit's record is written (by this process)
    only after its spectra are, so a unit cut short by a kill is written again. A file that
    cannot be read again when its spectrum is written (moved, truncated, being rewritten) is
    quarantined as :data:`CHANGED_CODE` and the batch re-planned without it (the later rows
    move up and their units are written again), so no row is ever stored empty. Returns the
    final plan."""
    n_old = int(state["n_spectra"])
    chunk = int(state["chunk_size"])
    records = _done_records(store, batch)
    while True:
        good = df[df["status"] == "stored"].sort_values("row")
        n_new = n_old + len(good)
        meta_cols = _meta_columns(df)
        with _quiet():
            _write_batch_meta(store, state, df, meta_cols, n_old, n_new, good)
        units = _units(n_old, n_new, chunk)
        calls = [((a, b), (str(store), batch, a, b)) for a, b in units if not records.is_done(a, b)]
        compute.run(
            _write_unit,
            calls,
            lambda key, failed: records.mark(*key, {"failed": failed}),
            desc=f"write batch {batch}",
            progress=progress,
        )
        failed = {}
        for a, b in units:
            rec = records.read(a, b)
            if rec is None:
                raise StoreError(
                    f"store: {store}: the done record of rows {a}-{b} of batch {batch} "
                    "vanished while the ingest was running; run the ingest again"
                )
            for row, reason in rec.get("failed", []):
                failed[int(row)] = str(reason)
        if not failed:
            return df
        first = min(failed)
        log.warning(
            "batch %d: %d file(s) could not be read again while writing; quarantined as %s "
            "and the batch re-planned: %s",
            batch, len(failed), CHANGED_CODE,
            "; ".join(f"{df.loc[df['row'] == r, 'path'].iat[0]}: {m}" for r, m in failed.items()),
        )  # fmt: skip
        hit = df["row"].isin(list(failed)).to_numpy() & (df["status"] == "stored").to_numpy()
        df = df.copy()
        df.loc[hit, "reason"] = [failed[int(r)] for r in df.loc[hit, "row"]]
        df.loc[hit, "status"] = "quarantined"
        df.loc[hit, "code"] = CHANGED_CODE
        keep = (df["status"] == "stored").to_numpy()
        df["row"] = -1
        df.loc[keep, "row"] = n_old + np.arange(int(keep.sum()))
        df["row"] = df["row"].astype("int64")
        # units from the one holding the first failed row on must be written again: forget
        # their records first, then save the new plan (a kill in between redoes them anyway)
        redo_from = max(n_old, first // chunk * chunk)
        for a, b in records.ranges():
            if a >= redo_from:
                records.forget(a, b)
        _atomic_parquet(df, _log_path(store, batch))
        df = _read_log(store, batch)


def _write_batch_meta(store, state, df, meta_cols, n_old, n_new, good):
    import zarr

    _ensure_arrays(store, state, meta_cols)
    group = zarr.open_group(str(store), mode="r+")
    for name in state["variables"]:
        arr = group[name]
        if arr.shape[0] != n_new:
            arr.resize((n_new, *arr.shape[1:]))
    if len(good):
        sl = slice(n_old, n_new)
        group["obsid"][sl] = good["obsid"].to_numpy(np.int64)
        for name in state["variables"]:
            if name in ("obsid", *SPECTRAL):
                continue
            kind, fill = _storage_dtype(name)
            if name in good:
                col = good[name]
                if kind == "str":
                    vals = np.array(["" if _isnull(v) else str(v) for v in col], dtype=object)
                    group[name][sl] = vals.astype(str)
                else:
                    vals = col.to_numpy(dtype=object)
                    vals = np.array([fill if _isnull(v) else v for v in vals], dtype=kind)
                    group[name][sl] = vals
            else:
                group[name][sl] = np.full(len(good), fill, dtype=None if kind == "str" else kind)


_TABLES = ("metadata", "quarantine")


def _staged(store: Path) -> Path:
    return _meta_dir(store) / "staged"


def _publish(store: Path, batches: int) -> None:
    """Move the staged table parts of committed batches into ``metadata.parquet`` /
    ``quarantine.parquet``; drop those of uncommitted ones. The tables are written to
    ``_mspec/staged`` first, so a reader of the table folders (``dask.dataframe``, pyarrow)
    never sees the rows of a batch that is not committed, even after a kill."""
    sdir = _staged(store)
    if not sdir.exists():
        return
    for p in sorted(sdir.glob("*-part-*.parquet")):
        table, _, rest = p.name.partition("-part-")
        b = int(rest.split(".")[0])
        if b < batches and table in _TABLES:
            dest = store / f"{table}.parquet"
            dest.mkdir(exist_ok=True)
            os.replace(p, dest / f"part-{b:06d}.parquet")
        else:
            p.unlink(missing_ok=True)


def _commit(store: Path, state: dict, batch: int, df) -> dict:
    good = df[df["status"] == "stored"].sort_values("row")
    meta_cols = ["obsid", "row", *_meta_columns(df)]
    sdir = _staged(store)
    sdir.mkdir(parents=True, exist_ok=True)
    if len(good):
        _atomic_parquet(
            good[meta_cols].reset_index(drop=True), sdir / f"metadata-part-{batch:06d}.parquet"
        )
    bad = df[df["status"] != "stored"]
    if len(bad):
        q = bad[["path", "file", "obsid", "code", "reason"]].copy()
        q["obsid"] = q["obsid"].astype("Int64")
        q["batch"] = batch
        _atomic_parquet(q.reset_index(drop=True), sdir / f"quarantine-part-{batch:06d}.parquet")
    str_len = dict(state.get("str_len", {}))
    for name in state["variables"]:
        if _storage_dtype(name)[0] == "str" and name in good:
            n = int(good[name].astype(str).str.len().max()) if len(good) else 0
            str_len[name] = max(str_len.get(name, 1), n, 1)
    state = dict(
        state, n_spectra=int(state["n_spectra"]) + len(good), batches=batch + 1, str_len=str_len
    )
    _write_state(store, state)  # the commit
    _publish(store, batch + 1)
    _done_records(store, batch).clear()
    _scan_path(store, batch).unlink(missing_ok=True)
    return state


def _cleanup(store: Path, batches: int) -> None:
    """Remove what a killed ingest can leave behind: temporary files (``*.partial`` of
    :func:`mspec._exec.atomic_write` and of zarr, a kill inside a chunk write; ``*.tmp*`` of
    earlier versions), done records of committed batches (killed between the commit and their
    removal); publish the staged tables of committed batches. Called holding the lock."""
    import shutil

    for folder in (
        _meta_dir(store),
        _meta_dir(store) / "log",
        _meta_dir(store) / "done",
        _staged(store),
        store / "metadata.parquet",
        store / "quarantine.parquet",
    ):
        if folder.exists():
            for p in folder.rglob("*.tmp*"):
                p.unlink(missing_ok=True)
    n_partial = clean_partials(store)
    if n_partial:
        log.warning("removed %d partly written file(s) left by a killed ingest", n_partial)
    _publish(store, batches)
    for table in _TABLES:  # parts of uncommitted batches (stores written before staging)
        d = store / f"{table}.parquet"
        if d.exists():
            for p in d.glob("part-*.parquet"):
                if int(p.stem.split("-")[1]) >= batches:
                    p.unlink(missing_ok=True)
    done = _meta_dir(store) / "done"
    if done.exists():
        for p in done.glob("batch-*"):
            if int(p.name.split("-")[1]) < batches:
                shutil.rmtree(p, ignore_errors=True)
    for p in (_meta_dir(store) / "scan").glob("batch-*.parquet"):  # of committed batches
        if int(p.name.split("-")[1].split(".")[0]) < batches:
            p.unlink(missing_ok=True)


def _read_log(store: Path, batch: int):
    import pandas as pd

    return pd.read_parquet(_log_path(store, batch))


def _store_obsids(store: Path, n: int) -> np.ndarray:
    import zarr

    if n == 0:
        return np.zeros(0, np.int64)
    with _quiet():
        return np.asarray(zarr.open_group(str(store), mode="r")["obsid"][:n], dtype=np.int64)


# --------------------------------------------------------------------------- public API


def _memory_bytes() -> int:
    """Memory this process may use (cgroup limits included, as dask sees it)."""
    try:
        from distributed.system import MEMORY_LIMIT

        return int(MEMORY_LIMIT)
    except ImportError:  # pragma: no cover - distributed is a dependency
        try:
            return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
        except (ValueError, OSError, AttributeError):
            return 8 * 2**30


def max_chunk_size(memory_bytes: int | None = None) -> int:
    """Largest ``chunk_size`` an ingest accepts on this machine.

    A write task holds one chunk of flux, ivar and both masks (``NPIX * 16`` bytes per
    spectrum, 62.5 kB) plus the compressor's copies (counted 3x in all); that must fit in a
    quarter of the memory, so several tasks fit at once.

    Parameters
    ----------
    memory_bytes : int, optional
        Memory to plan for (default: this machine's, cgroup limits included).

    Returns
    -------
    int
        Spectra per chunk.
    """
    mem = _memory_bytes() if memory_bytes is None else int(memory_bytes)
    return max(1, mem // 4 // (3 * _BYTES_PER_SPECTRUM))


def _check_chunk_size(chunk_size, what: str = "chunk_size") -> int:
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int | np.integer):
        raise TypeError(f"{what} must be an int, got {type(chunk_size).__name__}")
    if chunk_size < 1:
        raise ValueError(f"{what} must be >= 1, got {chunk_size}")
    top = max_chunk_size()
    if chunk_size > top:
        raise ValueError(
            f"{what}={chunk_size} is too large for this machine: a chunk of {chunk_size} spectra "
            f"holds {chunk_size * _BYTES_PER_SPECTRUM / 2**30:.1f} GiB in memory per write task "
            f"({_memory_bytes() / 2**30:.1f} GiB available); use at most {top} "
            "(about 1000 is typical)"
        )
    return int(chunk_size)


def _todo_batches(items, seen: _StoreLog, per_batch: int, tally: dict):
    """Batches of at most ``per_batch`` listed files still to read: new ones, and quarantined
    ones worth another try (:func:`_to_retry`); ``tally`` counts sources, skipped, retried."""
    part = []
    for it in items:
        tally["sources"] += 1
        entry = seen.get(it[0])
        if entry is not None:
            if not _to_retry(entry, it[0]):
                tally["skipped"] += 1
                continue
            tally["retried"] += 1
        part.append(it)
        if len(part) == per_batch:
            yield part
            part = []
    if part:
        yield part


def ingest(
    sources,
    store,
    chunk_size: int = 1000,
    client=None,
    progress: bool = False,
    *,
    allow_outside: bool = False,
) -> dict:
    """Ingest LAMOST FITS files into a chunked Zarr v3 store (create, resume or append).

    Parameters
    ----------
    sources : str, PathLike or sequence
        Directories (recursive), glob patterns, files, or LAMOST catalogues (CSV/Parquet
        listing files); see :func:`resolve_sources`. Order is deterministic: sorted within a
        directory or glob, catalogue row order, then the order given.
    store : str or PathLike
        Store directory; created if missing, resumed if a previous ingest was interrupted,
        appended to otherwise (files already ingested, by absolute path, are skipped).
    chunk_size : int
        Spectra per Zarr chunk (and per write task) of a new store, at most
        :func:`max_chunk_size` (checked before anything is written). An existing store keeps
        its own chunk size (a different value warns).
    client : None, distributed.Client, str
        Where files are read and written: a ``distributed.Client`` (or a scheduler address);
        ``None`` uses the current default ``distributed`` client if one exists, else dask's
        local threaded scheduler; ``"threads"``, ``"processes"`` or ``"sync"`` pick a local
        dask scheduler.
    progress : bool
        Show tqdm progress bars.
    allow_outside : bool
        Let catalogues list files outside their own folder (see :func:`resolve_sources`);
        by default such rows are quarantined as ``outside_root`` without being opened.

    Returns
    -------
    dict
        Counts: ``sources`` (files given), ``skipped`` (already in the store), ``retried``
        (quarantined earlier and read again because they changed), ``read``,
        ``stored``, ``quarantined`` (bad files), ``duplicates`` (obsid already present),
        ``resampled``, ``n_spectra`` (store size afterwards), ``batches``, ``seconds``,
        ``files_per_second`` and ``quarantine_codes`` (code -> count).

    Raises
    ------
    TypeError, ValueError
        Bad ``chunk_size``, ``client`` or ``sources``; ``sources`` that match no file at all
        (a ``ValueError`` saying so; no store is created).
    FileNotFoundError
        A source that does not exist.
    StoreError
        ``store`` is a file or exists but is not an mspec store. Nothing is created or left
        behind (no lock file) when an ingest is refused.
    StoreLockedError
        Another live ingest holds the store's lock (a ``StoreError`` and a
        :class:`mspec._exec.LockError`, the error of a locked run directory; the message
        names the store and the holder's pid, host and start time). A lock left by a killed
        ingest is taken over (logged).

    Notes
    -----
    Bad files (missing, not FITS, truncated, unknown layout, wavelengths not increasing, no
    overlap with the grid, no finite flux, all pixels masked) and repeated obsids are skipped
    and recorded in ``<store>/quarantine.parquet`` with a reason code; they never stop an
    ingest. Each spectrum is read twice (scan, then write) so that rows are assigned before
    any data is written; the second read mostly hits the OS page cache. A file that cannot be
    read the second time is quarantined as ``changed_during_ingest`` (its row is not stored);
    it, and every quarantined file whose size or modification time changed since, is read
    again by the next ingest of the same sources (``retried`` in the summary, and the log).
    """
    t0 = time.perf_counter()
    chunk_size = _check_chunk_size(chunk_size)
    if not isinstance(store, str | os.PathLike):
        raise TypeError(f"store must be a path, got {type(store).__name__}")
    if not isinstance(progress, bool):
        raise TypeError(f"progress must be True or False, got {progress!r}")
    # listed lazily, a batch at a time: the driver never holds the survey's file list
    items = iter_sources(sources, allow_outside=allow_outside)
    first = next(items, None)
    if first is None:
        raise ValueError(
            f"sources: {sources!r} matched no FITS file; nothing to ingest (no store created)"
        )
    store = Path(store).expanduser().absolute()
    _check_store_path(store)
    if (_meta_dir(store) / "state.json").exists():
        have = int(store_state(store).get("chunk_size", 0))
        if have > max_chunk_size():
            raise StoreError(
                f"store: {store} has chunk_size {have}, more than this machine can write "
                f"(at most {max_chunk_size()}); ingest into a new store"
            )
    compute = _Compute(client)
    counts = {"stored": 0, "quarantined": 0, "duplicates": 0, "resampled": 0, "read": 0}
    tally_src = {"sources": 0, "skipped": 0, "retried": 0}
    codes: dict[str, int] = {}

    def tally(df):
        st = df["status"] == "stored"
        counts["stored"] += int(st.sum())
        counts["duplicates"] += int((df["code"] == "duplicate_obsid").sum())
        counts["quarantined"] += int(((~st) & (df["code"] != "duplicate_obsid")).sum())
        if "resampled" in df:
            counts["resampled"] += int(df.loc[st, "resampled"].fillna(False).astype(bool).sum())
        for c in df.loc[~st, "code"]:
            codes[c] = codes.get(c, 0) + 1

    try:
        with _store_lock(store):
            batch_chunks = max(BATCH_CHUNKS, 2 * compute.nthreads())
            state = _ensure_store(store, int(chunk_size), batch_chunks)
            if int(state["chunk_size"]) != int(chunk_size):
                warnings.warn(
                    f"store {store} has chunk_size {state['chunk_size']}; "
                    f"chunk_size={chunk_size} is ignored",
                    stacklevel=2,
                )
            chunk = int(state["chunk_size"])
            batch = int(state["batches"])
            _cleanup(store, batch)
            if _log_path(store, batch).exists():  # an interrupted ingest: finish its plan
                log.info("resuming batch %d of %s", batch, store)
                df = _read_log(store, batch)
                df = _write_batch(store, state, batch, df, compute, progress)
                state = _commit(store, state, batch, df)
                tally(df)
                batch += 1
            seen = _seen(store)
            obsids = _store_obsids(store, int(state["n_spectra"]))
            per_batch = chunk * int(state.get("batch_chunks", BATCH_CHUNKS))
            for part in _todo_batches(itertools.chain([first], items), seen, per_batch, tally_src):
                group = max(1, min(SCAN_GROUP, chunk))
                scanned: dict[int, list] = {}
                compute.run(
                    _scan_task,
                    _scan_calls(store, batch, part, group),
                    scanned.__setitem__,
                    desc=f"scan batch {batch}",
                    progress=progress,
                )
                frames = [scanned.pop(i) for i in sorted(scanned)]
                df = _plan(frames, int(state["n_spectra"]), obsids, store)
                del frames
                _atomic_parquet(df, _log_path(store, batch))
                df = _read_log(store, batch)  # same dtypes as a resumed run sees
                df = _write_batch(store, state, batch, df, compute, progress)
                state = _commit(store, state, batch, df)
                counts["read"] += len(part)
                tally(df)
                bad = df[df["status"] != "stored"]
                log.info(
                    "batch %d: %d files, %d stored, %d skipped (%s)",
                    batch,
                    len(df),
                    len(df) - len(bad),
                    len(bad),
                    ", ".join(f"{k}: {v}" for k, v in bad["code"].value_counts().items()) or "-",
                )
                new = df.loc[df["status"] == "stored", "obsid"].to_numpy(np.int64)
                obsids = np.concatenate([obsids, new])
                batch += 1
    finally:
        compute.close()
    if tally_src["retried"]:
        log.info(
            "retried %d quarantined file(s) that changed since (size or modification time) "
            "or changed during an earlier ingest",
            tally_src["retried"],
        )
    seconds = time.perf_counter() - t0
    summary = {
        "store": str(store),
        **tally_src,
        **counts,
        "n_spectra": int(state["n_spectra"]),
        "batches": int(state["batches"]),
        "seconds": round(seconds, 3),
        "files_per_second": round(counts["read"] / seconds, 1) if seconds > 0 else float("nan"),
        "quarantine_codes": codes,
    }
    log.info("ingest %s: %s", store, summary)
    return summary


def open_store(path, *, chunks: Mapping | None = None):
    """Open a store lazily (dask-backed), validated against the registry.

    Parameters
    ----------
    path : str or PathLike
        Store written by :func:`ingest`.
    chunks : Mapping, optional
        Dask chunks; default ``{"spectra": <store chunk size>, "pixels": -1}``.

    Returns
    -------
    xarray.Dataset
        dims ``spectra`` (coordinate ``obsid``, int64, unique) and ``pixels`` (coordinate
        ``loglam``); ``flux``, ``ivar`` (float32), ``andmask``, ``ormask`` (int32) and the
        per-spectrum metadata. Only committed spectra are shown (an ingest in progress or
        interrupted adds nothing until its batch commits): every array is cut to the
        committed length on its own, so a store whose arrays are being resized by a live
        ingest (or were left mid-resize by a killed one) opens as its last committed state.
        Strings are numpy unicode.

    Raises
    ------
    StoreError
        Not an mspec store.
    mspec.variables.VariableError
        A variable does not match the registry.
    """
    import dask.array as da
    import xarray as xr
    import zarr

    if not isinstance(path, str | os.PathLike):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    if chunks is not None and not isinstance(chunks, Mapping):
        raise TypeError(f"chunks must be a mapping of dimension to size, got {chunks!r}")
    path = Path(path).expanduser()
    state = store_state(path)
    n = int(state["n_spectra"])
    chunk = int(state["chunk_size"])
    want = {"spectra": chunk, "pixels": -1, **dict(chunks or {})}
    # Each array is opened and cut to the committed length on its own: during an ingest's
    # resize (or after a kill in it) arrays can differ in length, which xarray.open_zarr
    # refuses ("conflicting sizes"); the committed rows never change.
    with _quiet():
        group = zarr.open_group(str(path), mode="r")
        arrays = sorted(group.arrays())
    data, coords = {}, {}
    for name, arr in arrays:
        dims = tuple(arr.metadata.dimension_names or ())
        if len(dims) != arr.ndim:
            continue
        if "spectra" in dims and arr.shape[dims.index("spectra")] < n:
            raise StoreError(
                f"store: {path}: array {name!r} has {arr.shape[dims.index('spectra')]} rows, "
                f"fewer than the {n} committed (damaged store)"
            )
        shape = tuple(n if d == "spectra" else s for d, s in zip(dims, arr.shape))
        ch = tuple(
            s if want.get(d, c) in (-1, None) else min(int(want.get(d, c)), max(s, 1))
            for d, s, c in zip(dims, shape, arr.chunks)
        )
        x = da.from_zarr(arr, chunks=tuple(max(1, c) for c in ch))
        x = x[tuple(slice(0, s) for s in shape)]
        if x.dtype.kind in "TO":  # zarr variable-length strings -> numpy unicode
            x = x.astype(f"U{int(state.get('str_len', {}).get(name, 1))}")
        attrs = {k: v for k, v in arr.attrs.asdict().items() if k != "coordinates"}
        var = xr.Variable(dims, x, attrs)
        (coords if name in ("obsid", "loglam") else data)[name] = var
    ds = xr.Dataset(data, coords=coords)
    for name in ds.variables:
        if name in VARIABLES:
            ds[name].attrs.update(attrs_for(name))
    ds.attrs = {"mspec_store": STORE_VERSION, "chunk_size": chunk, "path": str(path)}
    validate(ds)
    return ds
