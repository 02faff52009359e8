"""Zarr store: ingest (round trip, chunking, resume after kill -9, quarantine, duplicates,
append, distributed), open_store, metadata tables, CLI."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import dask
import numpy as np
import pandas as pd
import pytest
import xarray as xr
from test_io_lamost import (  # noqa: E402  (tests/ is on sys.path under pytest)
    DATA,
    EXPECTED_CODE,
    REAL,
    assert_spectra_equal,
    make_bad_files,
    toy_survey,
)

from mspec.io import read_lamost, read_metadata, read_quarantine, write_lamost_fits
from mspec.io.store import StoreError, ingest, open_store, resolve_sources, store_state
from mspec.testing import raise_if_computes
from mspec.variables import NPIX, validate

ROOT = Path(__file__).resolve().parents[1]


def _fits_dir(tmp_path, n=10, seed=0, layout="image", gz=False, name="fits"):
    ds = toy_survey(n, seed=seed)
    d = tmp_path / name
    paths = write_lamost_fits(ds, d, layout=layout, gzip=gz)
    return ds, d, paths


def _tree_bytes(root: Path, skip=()) -> dict[str, bytes]:
    out = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_file() and rel != "_mspec/lock" and rel not in skip:
            out[rel] = p.read_bytes()
    return out


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("layout", ["image", "oldest", "table"])
def test_round_trip_catalog(tmp_path, layout):
    ds, d, paths = _fits_dir(tmp_path, n=9, layout=layout, gz=(layout == "table"))
    summary = ingest(d / "catalog.parquet", tmp_path / "s.zarr", chunk_size=4)
    assert summary["stored"] == 9 and summary["quarantined"] == 0
    out = open_store(tmp_path / "s.zarr")
    assert out.sizes == {"spectra": 9, "pixels": NPIX}
    np.testing.assert_array_equal(out.obsid.values, ds.obsid.values)
    assert_spectra_equal(out, ds, skip=("file",))  # every variable, extras included
    assert [str(f) for f in out.file.values] == [p.name for p in paths]
    np.testing.assert_array_equal(out.loglam.values, ds.loglam.values)


def test_round_trip_directory_matches_read_lamost(tmp_path):
    ds, d, paths = _fits_dir(tmp_path, n=7)
    ingest(d, tmp_path / "s.zarr", chunk_size=3)
    out = open_store(tmp_path / "s.zarr").load()
    ref = xr.concat([read_lamost(p) for p in paths], dim="spectra")
    assert_spectra_equal(out, ref)
    assert "true_teff" not in out  # FITS headers alone carry no truth


@pytest.fixture(scope="module")
def simulated():
    sim = pytest.importorskip("mspec.simulate")
    return sim.simulate_survey(60, seed=5)


@pytest.mark.parametrize(("layout", "gz"), [("image", False), ("oldest", True), ("table", True)])
def test_simulated_survey_round_trip(tmp_path, simulated, layout, gz):
    """simulate -> FITS (+ catalogue) -> ingest -> open_store gives the simulated data back."""
    ds = simulated
    d = tmp_path / layout
    paths = write_lamost_fits(ds, d, layout=layout, gzip=gz)
    summary = ingest(d / "catalog.parquet", tmp_path / "s.zarr", chunk_size=16)
    assert summary["stored"] == ds.sizes["spectra"]
    out = open_store(tmp_path / "s.zarr")
    np.testing.assert_array_equal(out.obsid.values, ds.obsid.values)
    wanted = {v for v in ds.variables if ds[v].dims[:1] == ("spectra",)} - {"obsid"}
    assert wanted <= set(out.variables)  # truth and Gaia/WISE come through the catalogue
    assert_spectra_equal(out, ds, skip=("file",))
    assert [str(f) for f in out.file.values] == [p.name for p in paths]


@pytest.mark.parametrize("chunk", [1, 3, 5, 1000])
def test_chunk_size_gives_identical_data(tmp_path, chunk):
    ds, d, _ = _fits_dir(tmp_path, n=11, seed=4)
    ingest(d / "catalog.parquet", tmp_path / "s.zarr", chunk_size=chunk)
    out = open_store(tmp_path / "s.zarr")
    assert out.flux.data.chunks == (
        (min(chunk, 11),) * (11 // min(chunk, 11)) + ((11 % chunk,) if 11 % min(chunk, 11) else ()),
        (NPIX,),
    )
    assert out.attrs["chunk_size"] == chunk
    assert_spectra_equal(out, ds, skip=("file",))


# --------------------------------------------------------------------------- open_store


def test_open_store_lazy_validated(tmp_path):
    import mspec

    _, d, _ = _fits_dir(tmp_path, n=6)
    mspec.ingest(d, tmp_path / "s.zarr", chunk_size=4)  # the flat public API
    assert mspec.open_store(tmp_path / "s.zarr", chunks={"spectra": 8}).flux.chunks[0] == (6,)
    with raise_if_computes():
        ds = open_store(tmp_path / "s.zarr")
        validate(ds)
        assert ds.flux.chunks == ((4, 2), (NPIX,))
        assert ds.lamost_class.dtype.kind == "U"
        assert "obsid" in ds.coords and "loglam" in ds.coords
        assert ds.flux.attrs["units"] == "" and ds.ra.attrs["units"] == "deg"
        sub = ds.isel(spectra=slice(1, 3)).flux * 2  # still lazy
    assert isinstance(sub.data, dask.array.Array)
    assert ds.obsid.to_index().is_unique
    # Blosc/zstd compression on disk
    import zarr

    arr = zarr.open_group(str(tmp_path / "s.zarr"), mode="r")["flux"]
    (codec,) = arr.compressors
    assert type(codec).__name__ == "BloscCodec" and codec.cname.value == "zstd"


def test_metadata_parquet_dask(tmp_path):
    import dask.dataframe as dd

    ds, d, _ = _fits_dir(tmp_path, n=8)
    ingest(d / "catalog.parquet", tmp_path / "s.zarr", chunk_size=3)
    meta = read_metadata(tmp_path / "s.zarr")
    assert isinstance(meta, dd.DataFrame)
    df = meta.compute()
    np.testing.assert_array_equal(df["obsid"], ds.obsid.values)
    np.testing.assert_array_equal(df["row"], np.arange(8))
    np.testing.assert_allclose(df["true_teff"], ds.true_teff.values)
    direct = dd.read_parquet(str(tmp_path / "s.zarr" / "metadata.parquet")).compute()
    assert list(direct["obsid"]) == list(df["obsid"])


# --------------------------------------------------------------------------- bad input


def test_bad_files_quarantined_good_files_stored(tmp_path):
    ds, d, paths = _fits_dir(tmp_path, n=6)
    bad = make_bad_files(tmp_path)
    sources = [*paths[:3], *bad.values(), *paths[3:]]
    summary = ingest(sources, tmp_path / "s.zarr", chunk_size=4)
    assert summary["stored"] == 6
    assert summary["quarantined"] == len(bad)
    out = open_store(tmp_path / "s.zarr")
    np.testing.assert_array_equal(out.obsid.values, ds.obsid.values)
    assert_spectra_equal(out, ds, names=["flux", "ivar", "andmask", "ormask"])
    q = read_quarantine(tmp_path / "s.zarr")
    assert len(q) == len(bad)
    got = dict(zip(q["path"], q["code"]))
    for kind, path in bad.items():
        assert got[str(path.absolute())] == EXPECTED_CODE[kind], kind
    assert q["reason"].str.len().min() > 0
    assert summary["quarantine_codes"]["truncated"] == 3


def test_duplicates_keep_first_and_recorded(tmp_path):
    ds, d, paths = _fits_dir(tmp_path, n=4)
    shutil.copy(paths[1], d / "zz-copy-of-1.fits")  # sorts last: the later one is dropped
    summary = ingest(d, tmp_path / "s.zarr", chunk_size=2)
    assert summary["stored"] == 4 and summary["duplicates"] == 1
    out = open_store(tmp_path / "s.zarr")
    assert list(out.file.values) == [p.name for p in paths]
    q = read_quarantine(tmp_path / "s.zarr")
    assert list(q["code"]) == ["duplicate_obsid"]
    assert q["file"].iloc[0] == "zz-copy-of-1.fits" and paths[1].name in q["reason"].iloc[0]
    assert int(q["obsid"].iloc[0]) == int(ds.obsid[1])
    # a later ingest bringing the same obsid again: recorded against the stored file
    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(paths[2], other / "again.fits")
    s2 = ingest(other, tmp_path / "s.zarr", chunk_size=2)
    assert s2["duplicates"] == 1 and s2["stored"] == 0
    q = read_quarantine(tmp_path / "s.zarr")
    assert paths[2].name in q["reason"].iloc[-1]
    assert open_store(tmp_path / "s.zarr").sizes["spectra"] == 4


def test_append_equals_single_ingest(tmp_path):
    ds, d, paths = _fits_dir(tmp_path, n=10, seed=5)
    ingest(paths[:4], tmp_path / "a.zarr", chunk_size=3)
    assert open_store(tmp_path / "a.zarr").sizes["spectra"] == 4
    s = ingest(d, tmp_path / "a.zarr", chunk_size=3)  # the directory: 4 known, 6 new
    assert s["skipped"] == 4 and s["stored"] == 6 and s["n_spectra"] == 10
    ingest(d, tmp_path / "b.zarr", chunk_size=3)
    a, b = open_store(tmp_path / "a.zarr").load(), open_store(tmp_path / "b.zarr").load()
    xr.testing.assert_identical(a.drop_attrs(), b.drop_attrs())
    # rerunning with nothing new changes nothing
    before = _tree_bytes(tmp_path / "a.zarr")
    s = ingest(d, tmp_path / "a.zarr", chunk_size=3)
    assert s["read"] == 0 and _tree_bytes(tmp_path / "a.zarr") == before


def test_append_new_catalog_columns(tmp_path):
    ds1, d1, _ = _fits_dir(tmp_path, n=3, seed=6, name="one")
    ingest(d1, tmp_path / "s.zarr", chunk_size=2)  # no catalogue: no true_teff
    ds2, d2, _ = _fits_dir(tmp_path, n=3, seed=7, name="two")
    ingest(d2 / "catalog.parquet", tmp_path / "s.zarr", chunk_size=2)
    out = open_store(tmp_path / "s.zarr")
    assert np.all(np.isnan(out.true_teff.values[:3]))
    np.testing.assert_allclose(out.true_teff.values[3:], ds2.true_teff.values)
    assert list(out.gaia_source_id.values[:3]) == [-1, -1, -1]


def test_bad_arguments(tmp_path):
    _, d, paths = _fits_dir(tmp_path, n=2)
    for bad in (0, -3):
        with pytest.raises(ValueError, match="chunk_size"):
            ingest(d, tmp_path / "s.zarr", chunk_size=bad)
    for bad in (2.5, "10", True):
        with pytest.raises(TypeError, match="chunk_size"):
            ingest(d, tmp_path / "s.zarr", chunk_size=bad)
    with pytest.raises(TypeError, match="client"):
        ingest(d, tmp_path / "s.zarr", client=42)
    with pytest.raises(FileNotFoundError, match="sources"):
        ingest(tmp_path / "nope", tmp_path / "s.zarr")
    with pytest.raises(ValueError, match="sources"):
        ingest([], tmp_path / "s.zarr")
    with pytest.raises(TypeError, match="sources"):
        ingest([1, 2], tmp_path / "s.zarr")
    with pytest.raises(TypeError, match="store"):
        ingest(d, 3)
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "x.txt").write_text("mine")
    with pytest.raises(StoreError, match="not an mspec store"):
        ingest(d, tmp_path / "junk")
    with pytest.raises(StoreError, match="not an mspec store"):
        open_store(tmp_path / "junk")
    with pytest.raises(TypeError, match="path"):
        open_store(None)
    with pytest.raises(TypeError, match="chunks"):
        open_store(tmp_path / "junk", chunks=5)
    with pytest.raises(ValueError, match="sources"):
        import pandas as pd

        pd.DataFrame({"a": [1]}).to_csv(tmp_path / "cat.csv")
        ingest(tmp_path / "cat.csv", tmp_path / "s.zarr")
    # an existing store keeps its chunk size (warns)
    ingest(d, tmp_path / "t.zarr", chunk_size=1)
    with pytest.warns(UserWarning, match="chunk_size"):
        ingest(d, tmp_path / "t.zarr", chunk_size=5)


def test_locked_store(tmp_path):
    import fcntl

    _, d, _ = _fits_dir(tmp_path, n=2)
    ingest(d, tmp_path / "s.zarr", chunk_size=2)
    with open(tmp_path / "s.zarr" / "_mspec" / "lock", "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        with pytest.raises(StoreError, match="another ingest"):
            ingest(d, tmp_path / "s.zarr")


def test_resolve_sources_order(tmp_path):
    _, d, paths = _fits_dir(tmp_path, n=5)
    sub = d / "sub"
    sub.mkdir()
    shutil.copy(paths[0], sub / "a.fits.gz")
    got = [p for p, _ in resolve_sources(d)]
    assert got == sorted(got) and len(got) == 6
    glob = [p for p, _ in resolve_sources(str(d / "spec-*.fits"))]
    assert glob == sorted(str(p.absolute()) for p in paths)
    rev = [p for p, _ in resolve_sources(list(reversed(paths)) + [paths[0]])]
    assert rev == [str(p.absolute()) for p in reversed(paths)]  # given order, deduplicated
    import pandas as pd

    pd.DataFrame({"lmjd": [56000], "planid": ["TOY0"], "spid": [1], "fiberid": [3]}).to_csv(
        d / "lamost.csv", index=False
    )
    ((p, extra),) = resolve_sources(d / "lamost.csv")
    assert p.endswith("spec-56000-TOY0_sp01-003.fits") and extra == {}


def test_catalogue_rows_are_compact_views(tmp_path):
    """Catalogue values per file: nulls absent, Python scalars, a plain dict when pickled
    (tasks carry one row, not the catalogue)."""
    import pickle

    import pandas as pd

    pd.DataFrame(
        {
            "file": ["a.fits", "b.fits", "c.fits"],
            "ra": [10.5, np.nan, 12.0],
            "obsid": pd.array([7, None, 9], dtype="Int64"),
            "subclass": ["M2", None, "K7"],
        }
    ).to_parquet(tmp_path / "cat.parquet")
    rows = [r for _, r in resolve_sources(tmp_path / "cat.parquet")]
    assert rows[0] == {"ra": 10.5, "obsid": 7, "lamost_subclass": "M2"}
    assert dict(rows[1]) == {} and len(rows[1]) == 0 and "ra" not in rows[1]
    assert type(rows[0]["obsid"]) is int and type(rows[0]["ra"]) is float
    with pytest.raises(KeyError):
        rows[1]["ra"]
    back = pickle.loads(pickle.dumps(rows[2]))
    assert type(back) is dict and back == {"ra": 12.0, "obsid": 9, "lamost_subclass": "K7"}
    assert len(pickle.dumps(rows[2])) < 300


def test_sources_are_listed_lazily_in_catalogue_batches(tmp_path, monkeypatch):
    """iter_sources reads catalogues a batch of rows at a time, gives the same files and
    values as one read, drops repeats across sources, and checks every source before the
    first file is listed (a bad last source fails at once, not after batches ingested)."""
    import pandas as pd

    import mspec.io.store as st

    n = 11
    cat = pd.DataFrame(
        {
            "file": [f"f{i:02d}.fits" for i in range(n)],
            "ra": np.where(np.arange(n) % 4 == 1, np.nan, np.arange(n) + 0.5),
            "subclass": [None if i % 3 == 0 else f"M{i % 9}" for i in range(n)],
        }
    )
    cat.to_parquet(tmp_path / "cat.parquet")
    cat.to_csv(tmp_path / "cat.csv", index=False)
    whole = [(p, dict(r)) for p, r in resolve_sources(tmp_path / "cat.parquet")]
    monkeypatch.setattr(st, "CATALOG_BATCH", 3)
    for name in ("cat.parquet", "cat.csv"):
        it = st.iter_sources([tmp_path / name, tmp_path / "cat.parquet"])
        assert not isinstance(it, list)
        got = [(p, dict(r)) for p, r in it]
        assert got == whole  # the second catalogue lists the same files: dropped
    assert whole[1][1] == {"lamost_subclass": "M1"} and whole[0][1] == {"ra": 0.5}
    with pytest.raises(FileNotFoundError, match="nope"):
        st.iter_sources([tmp_path / "cat.parquet", tmp_path / "nope"])
    pd.DataFrame({"a": [1]}).to_csv(tmp_path / "bad.csv")
    with pytest.raises(ValueError, match="no file column"):
        st.iter_sources([tmp_path / "cat.parquet", tmp_path / "bad.csv"])


def test_directory_listed_a_folder_at_a_time_in_full_path_order(tmp_path):
    """A directory source is walked one folder at a time, yet gives the order of sorting all
    full paths (file names that sort beside a folder's name, nested folders, upper-case
    suffixes); symlinked folders are not entered and other files are ignored."""
    import mspec.io.store as st

    names = [
        "b.fits", "b-1.fits", "b/x.fits", "b/a/z.fits.gz", "b0.FITS", "a.fit", "c/d/e.fts",
        "c.fits", "Z.fits", "ab/c.fits", "a b.fits", "notes.txt", "b/readme",
    ]  # fmt: skip
    for n in names:
        (tmp_path / n).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / n).write_bytes(b"")
    (tmp_path / "link").symlink_to(tmp_path / "c", target_is_directory=True)
    (tmp_path / "link.fits").symlink_to(tmp_path / "c", target_is_directory=True)
    got = st._fits_files_in(tmp_path)
    assert not isinstance(got, list)
    want = sorted(str(tmp_path / n) for n in names if n.lower().endswith(st._FITS_SUFFIXES))
    assert list(got) == want
    assert [p for p, _ in resolve_sources(tmp_path)] == want


def test_path_set_is_exact_across_merges(monkeypatch):
    """Paths kept as 16-byte digests: members found before and after the merges into the
    sorted array, non-members not, digests ending in NUL bytes (which numpy strips) too."""
    import hashlib

    import mspec.io.store as st

    monkeypatch.setattr(st._PathSet, "MERGE", 7)
    real = st._PathSet._key

    def key(path):  # every third path's digest ends in NUL bytes
        d = real(path)
        return d[:13] + b"\0\0\0" if hashlib.md5(path.encode()).digest()[0] % 3 == 0 else d

    monkeypatch.setattr(st._PathSet, "_key", staticmethod(key))
    s = st._PathSet()
    members = [f"/survey/{i:05d}.fits" for i in range(0, 200, 2)]
    for p in members:
        assert s.add(p) is True
        assert s.add(p) is False  # a repeat changes nothing
    assert len(s) == len(members) and s._sorted.size > 0 and s._sorted.dtype == "S16"
    assert all(p in s for p in members)
    assert not any(f"/survey/{i:05d}.fits" in s for i in range(1, 200, 2))
    assert "/survey/ünïcode.fits" not in s


def test_store_log_keeps_each_paths_latest_entry():
    import mspec.io.store as st

    log = st._StoreLog()
    log.add("/a.fits", ("quarantined", "not_fits", 10, 5))
    log.add("/b.fits", ("stored", "", 20, 6))
    log.add("/a.fits", ("stored", "", 11, 7))  # fixed and stored by a later ingest
    log.add("/c.fits", ("quarantined", "truncated", 3, 1))
    assert log.get("/a.fits")[0] == "stored" and log.get("/b.fits")[0] == "stored"
    assert log.get("/c.fits") == ("quarantined", "truncated", 3, 1)
    assert log.get("/d.fits") is None and len(log) == 3


def test_scan_results_reach_the_driver_as_frames():
    """A scan task returns its records as one DataFrame (a few buffers, not ~50 objects per
    file, through the driver); the batch's plan from several tasks' frames equals the plan
    from all records at once: the union of keys, 64-bit obsids, missing values."""
    import mspec.io.store as st

    recs = [
        {"path": "/a/0.fits", "file": "0.fits", "status": "stored", "code": "", "reason": "",
         "layout": "image", "obsid": 2**62 + 1, "ra": 1.5},
        {"path": "/a/1.fits", "file": "1.fits", "status": "quarantined", "code": "read_error",
         "reason": "bad", "layout": ""},
        {"path": "/a/2.fits", "file": "2.fits", "status": "stored", "code": "", "reason": "",
         "layout": "image", "obsid": 2**62 + 3, "snr_i": 12.0},
        {"path": "/a/3.fits", "file": "3.fits", "status": "stored", "code": "", "reason": "",
         "layout": "image", "obsid": 2**62 + 1},  # a duplicate of the first
    ]  # fmt: skip
    f = st._records_frame(recs[:2])
    assert isinstance(f, pd.DataFrame) and str(f["obsid"].dtype) == "Int64"
    assert f["obsid"].iloc[0] == 2**62 + 1 and pd.isna(f["obsid"].iloc[1])
    split = st._plan([st._records_frame(recs[:2]), st._records_frame(recs[2:])], 5,
                     np.zeros(0, np.int64), Path("/nonexistent"))  # fmt: skip
    whole = st._plan([st._records_frame(recs)], 5, np.zeros(0, np.int64), Path("/nonexistent"))
    pd.testing.assert_frame_equal(split, whole[list(split.columns)])
    assert set(split.columns) == set(whole.columns)
    assert split["obsid"].tolist()[::3] == [2**62 + 1, 2**62 + 1]
    assert split["row"].tolist() == [5, -1, 6, -1]
    assert split["code"].tolist()[3] == "duplicate_obsid"


def test_scan_tasks_read_their_files_from_a_scan_file(tmp_path):
    """A batch's scan tasks carry (scan file, row group), the file holds the batch's paths
    and catalogue values, and a committed batch leaves no scan file behind."""
    import pyarrow.parquet as pq

    import mspec.io.store as st

    items = [(f"/x/{i}.fits", {"ra": float(i)} if i % 2 else {}) for i in range(7)]
    store = tmp_path / "s.zarr"
    calls = st._scan_calls(store, 0, items, 3)
    assert [k for k, _ in calls] == [0, 3, 6]
    assert all(isinstance(a[0], tuple) for _, a in calls)
    back = [
        it
        for _, ((path, rg),) in calls
        for it in st._ScanGroup.from_table(pq.ParquetFile(path).read_row_group(rg))
    ]
    assert back == items
    mixed = [("/m.fits", {"x": "a"}), ("/n.fits", {"x": 1})]
    (call,) = st._scan_calls(store, 1, mixed, 5)
    assert call[1][0] == mixed  # in memory: no single Arrow type
    _, d, _ = _fits_dir(tmp_path, n=3)
    ingest(d, tmp_path / "t.zarr", chunk_size=2)
    assert not list((tmp_path / "t.zarr" / "_mspec" / "scan").glob("*"))


# --------------------------------------------------------------------------- real data


@pytest.mark.realdata
@pytest.mark.skipif(not REAL, reason="../shared/data not available")
def test_real_files_ingest(tmp_path):
    summary = ingest([str(DATA / "lamost_*" / "*.fits*")], tmp_path / "s.zarr", chunk_size=16)
    assert summary["stored"] == len(REAL) and summary["quarantined"] == 0
    out = open_store(tmp_path / "s.zarr")
    for k in (0, 8, 20, len(REAL) - 1):
        ref = read_lamost(REAL[k])
        xr.testing.assert_equal(
            out.isel(spectra=[k]).drop_attrs().load(), ref.drop_attrs().drop_vars([])
        )


# --------------------------------------------------------------------------- resume after kill -9

_KILL_SCRIPT = """
import sys, time
import mspec.io.store as st
st.BATCH_CHUNKS = 2
phase = sys.argv[3]
orig_w, orig_s = st._write_unit, st._scan_files
def slow_write(*a):
    time.sleep(0.15 if phase == "write" else 0)
    return orig_w(*a)
def slow_scan(*a):
    time.sleep(0.15 if phase == "scan" else 0)
    return orig_s(*a)
st._write_unit, st._scan_files = slow_write, slow_scan
st.ingest(sys.argv[1], sys.argv[2], chunk_size=3, client="sync")
"""


def _run_and_kill(src, store, phase, until):
    proc = subprocess.Popen(
        [sys.executable, "-c", _KILL_SCRIPT, str(src), str(store), phase],
        cwd=str(ROOT),
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    t0 = time.time()
    try:
        while time.time() - t0 < 120:
            if proc.poll() is not None:
                pytest.fail("the ingest finished before it could be killed")
            if until(store):
                break
            time.sleep(0.01)
        else:
            pytest.fail("kill condition never met")
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()


def _markers(store):
    return len(list((store / "_mspec" / "done").glob("batch-*/*")))


def _batches(store):
    try:
        return store_state(store)["batches"]
    except Exception:
        return 0


@pytest.mark.slow
@pytest.mark.parametrize(
    "phase,until",
    [
        ("write", lambda s: _batches(s) == 0 and _markers(s) >= 1),  # mid-way through batch 0
        ("write", lambda s: _batches(s) >= 1 and _markers(s) >= 1),  # inside batch 1
        ("scan", lambda s: (s / "_mspec" / "state.json").exists()),  # before any plan
    ],
    ids=["write-batch0", "write-batch1", "scan"],
)
def test_resume_after_kill9_identical(tmp_path, monkeypatch, phase, until):
    import mspec.io.store as st

    monkeypatch.setattr(st, "BATCH_CHUNKS", 2)
    _, d, paths = _fits_dir(tmp_path, n=20, seed=8)
    bad = make_bad_files(tmp_path)
    for p in list(bad.values())[:3]:
        if p.exists():
            shutil.copy(p, d / ("spec-zz-" + p.name))
    shutil.copy(paths[0], d / "spec-zz-dup.fits")
    ref = tmp_path / "ref.zarr"
    ingest(d, ref, chunk_size=3, client="sync")
    store = tmp_path / "killed.zarr"
    _run_and_kill(d, store, phase, until)
    assert not (store / "_mspec" / "state.json").exists() or _tree_bytes(store) != _tree_bytes(ref)
    ingest(d, store, chunk_size=3, client="threads")
    assert _tree_bytes(store) == _tree_bytes(ref)
    xr.testing.assert_identical(
        open_store(store).load().drop_attrs(), open_store(ref).load().drop_attrs()
    )


# --------------------------------------------------------------------------- distributed / CLI


@pytest.mark.distributed
def test_distributed_client_equals_threads(tmp_path):
    from distributed import Client, LocalCluster

    _, d, _ = _fits_dir(tmp_path, n=9)
    ingest(d, tmp_path / "t.zarr", chunk_size=4, client="threads")
    with (
        LocalCluster(
            n_workers=2, threads_per_worker=1, processes=False, dashboard_address=":0"
        ) as cluster,
        Client(cluster) as client,
    ):
        ingest(d, tmp_path / "d.zarr", chunk_size=4, client=client)
        # client=None picks up the active default client
        ingest(d, tmp_path / "n.zarr", chunk_size=4)
    # identical bytes; state.json records the batch size chosen from the cluster's threads
    skip = {"_mspec/state.json"}
    ref = _tree_bytes(tmp_path / "t.zarr", skip)
    assert _tree_bytes(tmp_path / "d.zarr", skip) == ref
    assert _tree_bytes(tmp_path / "n.zarr", skip) == ref
    states = [store_state(tmp_path / n) for n in ("t.zarr", "d.zarr", "n.zarr")]
    for st in states:
        st.pop("batch_chunks")
    assert states[0] == states[1] == states[2]


def test_cli_ingest(tmp_path, capsys):
    from mspec.cli import main

    _, d, _ = _fits_dir(tmp_path, n=5)
    rc = main(
        ["ingest", str(d), str(tmp_path / "s.zarr"), "--chunk-size", "2", "--scheduler", "threads"]
    )
    assert rc == 0
    out = capsys.readouterr()
    assert '"stored": 5' in out.out
    assert open_store(tmp_path / "s.zarr").sizes["spectra"] == 5


@pytest.mark.slow
@pytest.mark.distributed
def test_cli_ingest_local_cluster(tmp_path):
    _, d, _ = _fits_dir(tmp_path, n=5)
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "mspec.cli",
            "ingest",
            str(d),
            str(tmp_path / "s.zarr"),
            "--chunk-size",
            "2",
        ],
        cwd=str(ROOT),
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert res.returncode == 0, res.stderr
    assert "scan batch 0" in res.stderr  # the progress bar
    assert open_store(tmp_path / "s.zarr").sizes["spectra"] == 5


def test_scan_group_round_trip():
    """A scan task's files travel as columns; every file gets back exactly its catalogue
    values (keys the first row lacks included, nulls absent, types kept)."""
    from mspec.io.store import _ScanGroup

    items = [
        ("/a.fits", {"obsid": 7, "snr_i": 3.5}),
        ("/b.fits", {"obsid": 8, "snr_i": 1.0, "phot_g_mean_mag": 12.25, "lamost_class": "STAR"}),
        ("/c.fits", {}),
        ("/d.fits", {"gaia_source_id": 2**62 + 3, "true_active": True}),
    ]
    back = list(_ScanGroup(items))
    assert back == items
    assert [type(v) for v in back[1][1].values()] == [int, float, float, str]
    assert list(_ScanGroup([("/x.fits", {}), ("/y.fits", {})])) == [
        ("/x.fits", {}),
        ("/y.fits", {}),
    ]
    mixed = [("/m.fits", {"x": "a"}), ("/n.fits", {"x": 1})]  # not one Arrow type: as is
    assert list(_ScanGroup(mixed)) == mixed
    assert len(_ScanGroup(items)) == 4
