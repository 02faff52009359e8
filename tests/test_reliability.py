"""Reliability of ingest and the store (issue 17): every defect found by trying the store as a
hostile user would, each with a regression test, and a generated bad-input corpus (no binary
blobs). The pipeline faults (killed workers, repeated runs, disk full) are in
``test_reliability_pipeline.py``; the outcomes are tabulated in ``docs/reliability.md``."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import xarray as xr
from astropy.io import fits
from test_io_lamost import make_bad_files, toy_survey  # noqa: E402  (tests/ is on sys.path)
from test_lamost_reliability import _header, _rows, patch_card, write_image, write_table

import mspec
import mspec.io.store as st
from mspec.io import read_lamost, read_metadata, read_quarantine, write_lamost_fits
from mspec.io.store import StoreError, ingest, max_chunk_size, open_store, store_state

ROOT = Path(__file__).resolve().parents[1]


def _fits_dir(tmp_path, n=10, seed=0, name="fits", layout="image"):
    ds = toy_survey(n, seed=seed, extras=False)
    d = tmp_path / name
    paths = write_lamost_fits(ds, d, layout=layout, catalog=None)
    return ds, d, paths


def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.relative_to(root).as_posix() != "_mspec/lock"
    }


def _rows_match_files(store: Path) -> None:
    """Every stored row holds exactly the spectrum of the file it names (no empty rows)."""
    ds = open_store(store).load()
    meta = read_metadata(store).compute()
    assert len(meta) == ds.sizes["spectra"]
    assert (meta["row"].to_numpy() == np.arange(len(meta))).all()
    np.testing.assert_array_equal(meta["obsid"].to_numpy(), ds.obsid.values)
    seen = {os.path.basename(p): p for p in _log(store)["path"]}
    for k in range(ds.sizes["spectra"]):
        ref = read_lamost(seen[str(ds.file.values[k])])
        np.testing.assert_array_equal(ds.flux.values[k], ref.flux.values[0])
        assert int(ds.obsid.values[k]) == int(ref.obsid.values[0])
        assert np.isfinite(ds.flux.values[k]).any()


def _log(store: Path) -> pd.DataFrame:
    return pd.concat(
        [pd.read_parquet(p) for p in sorted((store / "_mspec" / "log").glob("batch-*.parquet"))]
    )


# --------------------------------------------------------------------------- defect 1


@pytest.mark.parametrize("how", ["removed", "truncated"])
def test_file_unreadable_between_plan_and_write_is_quarantined(tmp_path, monkeypatch, how):
    """A file that vanishes (or is cut short) after the scan: quarantined with its reason,
    no empty row, rows re-planned densely, and the next ingest repairs it."""
    _, d, paths = _fits_dir(tmp_path, n=10)
    victims = [paths[1], paths[7]]  # in the first and in a later chunk (chunk_size 3)
    saved = {p: p.read_bytes() for p in victims}
    orig = st._plan

    def plan_then_break(*args):
        out = orig(*args)
        for p in victims:
            if how == "removed":
                p.unlink(missing_ok=True)
            else:
                p.write_bytes(saved[p][:3000])
        return out

    monkeypatch.setattr(st, "_plan", plan_then_break)
    store = tmp_path / "s.zarr"
    s1 = ingest(d, store, chunk_size=3, client="sync")
    assert s1["stored"] == 8 and s1["quarantine_codes"] == {"changed_during_ingest": 2}
    assert store_state(store)["n_spectra"] == 8
    q = read_quarantine(store)
    assert sorted(q["file"]) == sorted(p.name for p in victims)
    assert (q["code"] == "changed_during_ingest").all()
    assert q["reason"].str.contains("not_found" if how == "removed" else "truncated").all()
    _rows_match_files(store)
    assert not (store / "_mspec" / "done").exists() or not any(
        (store / "_mspec" / "done").iterdir()
    )
    # the copy completes: a rerun retries them (whatever their size or mtime) and stores them
    monkeypatch.setattr(st, "_plan", orig)
    for p, raw in saved.items():
        p.write_bytes(raw)
    s2 = ingest(d, store, chunk_size=3, client="sync")
    assert s2["retried"] == 2 and s2["stored"] == 2 and s2["skipped"] == 8
    assert store_state(store)["n_spectra"] == 10
    assert len(read_quarantine(store)) == 0  # superseded by the later, successful read
    _rows_match_files(store)


# --------------------------------------------------------------------------- defect 2


def test_quarantined_file_retried_when_it_changed(tmp_path, caplog):
    _, d, paths = _fits_dir(tmp_path, n=4)
    full = paths[2].read_bytes()
    paths[2].write_bytes(full[: len(full) // 2])  # still being copied
    bad = d / "spec-notfits.fits"
    bad.write_text("not FITS\n")
    store = tmp_path / "s.zarr"
    s1 = ingest(d, store, chunk_size=2, client="sync")
    assert s1["stored"] == 3 and s1["quarantine_codes"] == {"truncated": 1, "not_fits": 1}
    # nothing changed: nothing retried
    s2 = ingest(d, store, client="sync")
    assert s2["retried"] == 0 and s2["skipped"] == 5 and s2["read"] == 0
    # the copy completed (size changed): retried and stored; the unchanged bad file is not
    paths[2].write_bytes(full)
    import logging

    with caplog.at_level(logging.INFO, logger="mspec.io.store"):
        s3 = ingest(d, store, client="sync")
    assert s3["retried"] == 1 and s3["stored"] == 1 and s3["read"] == 1
    assert "retried 1 quarantined file" in caplog.text
    assert store_state(store)["n_spectra"] == 4
    assert list(read_quarantine(store)["code"]) == ["not_fits"]
    # same size, new mtime (rewritten in place): retried too
    os.utime(bad, ns=(time.time_ns(), time.time_ns() + 10**9))
    s4 = ingest(d, store, client="sync")
    assert s4["retried"] == 1 and s4["quarantined"] == 1
    assert list(read_quarantine(store)["code"]) == ["not_fits"]  # latest outcome only


# --------------------------------------------------------------------------- defect 5


def test_open_store_during_a_resize_sees_the_committed_state(tmp_path):
    import zarr

    _, d, _ = _fits_dir(tmp_path, n=7)
    store = tmp_path / "s.zarr"
    ingest(d, store, chunk_size=3, client="sync")
    before = open_store(store).load()
    # what a live ingest (or one killed at that moment) leaves: some arrays grown, rows
    # written past the committed end, state.json unchanged
    g = zarr.open_group(str(store), mode="r+")
    names = sorted(g.array_keys())
    for name in names[: len(names) // 2]:
        a = g[name]
        if a.metadata.dimension_names[0] == "spectra":
            a.resize((20, *a.shape[1:]))
            if a.dtype.kind == "f":
                a[7:20] = 123.0
    with pytest.raises(ValueError, match="conflicting sizes"):
        xr.open_zarr(str(store), consolidated=False)  # what open_store used to do
    after = open_store(store).load()
    xr.testing.assert_identical(after, before)


_RESIZE_KILL = """
import sys, time
import mspec.io.store as st
st.BATCH_CHUNKS = 1
import zarr
orig = zarr.Array.resize
flag = sys.argv[3]
count = {"n": 0}
def slow_resize(self, shape):
    orig(self, shape)
    if st.store_state(sys.argv[2])["batches"] >= 1:
        count["n"] += 1
    if count["n"] == 3:  # half way through the resize of the second batch
        open(flag, "w").close()
        time.sleep(60)
zarr.Array.resize = slow_resize
st.ingest(sys.argv[1], sys.argv[2], chunk_size=3, client="sync")
"""


@pytest.mark.slow
def test_kill9_during_resize_then_open_and_resume(tmp_path):
    """kill -9 while an ingest is resizing arrays: open_store shows the last commit, and a
    rerun finishes with the bytes of an uninterrupted ingest."""
    _, d, _ = _fits_dir(tmp_path, n=9)
    ref = tmp_path / "ref.zarr"
    st_batch = st.BATCH_CHUNKS
    try:
        st.BATCH_CHUNKS = 1
        ingest(d, ref, chunk_size=3, client="sync")
    finally:
        st.BATCH_CHUNKS = st_batch
    store, flag = tmp_path / "k.zarr", tmp_path / "resizing"
    proc = subprocess.Popen(
        [sys.executable, "-c", _RESIZE_KILL, str(d), str(store), str(flag)],
        cwd=str(ROOT),
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        t0 = time.time()
        while not flag.exists():
            assert proc.poll() is None and time.time() - t0 < 120
            time.sleep(0.01)
        committed = store_state(store)["n_spectra"]
        live = open_store(store)  # while the ingest sleeps half way through its resize
        assert live.sizes["spectra"] == committed
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    ds = open_store(store).load()  # after the kill, at that moment
    assert 0 < ds.sizes["spectra"] == committed < 9
    want = open_store(ref).isel(spectra=slice(0, committed)).load()
    xr.testing.assert_identical(ds.drop_attrs(), want.drop_attrs())
    st.BATCH_CHUNKS = 1
    try:
        ingest(d, store, chunk_size=3, client="sync")
    finally:
        st.BATCH_CHUNKS = st_batch
    assert _tree_bytes(store) == _tree_bytes(ref)


_LIVE = """
import sys, time
import mspec.io.store as st
st.BATCH_CHUNKS = 1
orig = st._write_batch_meta
def slow(*a):  # leave readers time to open the store while arrays are being resized
    time.sleep(0.05)
    return orig(*a)
st._write_batch_meta = slow
st.ingest(sys.argv[1], sys.argv[2], chunk_size=2, client="sync")
"""


@pytest.mark.slow
def test_open_store_during_a_live_ingest_never_fails(tmp_path):
    _, d, _ = _fits_dir(tmp_path, n=60)
    store = tmp_path / "s.zarr"
    proc = subprocess.Popen(
        [sys.executable, "-c", _LIVE, str(d), str(store)],
        cwd=str(ROOT),
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    opens, sizes, errors = 0, set(), []
    try:
        while proc.poll() is None:
            if not (store / "_mspec" / "state.json").exists():
                time.sleep(0.005)
                continue
            try:
                ds = open_store(store)
                n = ds.sizes["spectra"]
                if n:
                    assert np.isfinite(ds.flux[n - 1].values).any()
            except Exception as exc:  # noqa: BLE001 - collected and reported below
                errors.append(f"{type(exc).__name__}: {exc}")
                continue
            sizes.add(n)
            opens += 1
    finally:
        proc.wait()
    assert proc.returncode == 0
    assert errors == []
    assert opens >= 30 and len(sizes) >= 3, (opens, sizes)
    assert all(n % 2 == 0 for n in sizes)  # only committed batches (2 spectra each)


# --------------------------------------------------------------------------- defect 6


def test_chunk_size_bounded_by_memory_before_anything_is_written(tmp_path):
    _, d, _ = _fits_dir(tmp_path, n=3)
    store = tmp_path / "s.zarr"
    with pytest.raises(ValueError, match="chunk_size=1000000000000 is too large"):
        ingest(d, store, chunk_size=10**12)
    assert not store.exists()
    ingest(d, store, chunk_size=2, client="sync")
    before = _tree_bytes(store)
    with pytest.raises(ValueError, match="chunk_size"):
        ingest(d, store, chunk_size=10**12)
    assert _tree_bytes(store) == before  # nothing persisted
    assert ingest(d, store, client="sync")["skipped"] == 3  # the store still works
    assert 1000 <= max_chunk_size() and max_chunk_size(2**30) == 2**30 // 4 // (3 * 3909 * 16)
    # a store bricked by an older version: a clear error, not a MemoryError
    state = json.loads((store / "_mspec" / "state.json").read_text())
    state["chunk_size"] = 10**12
    (store / "_mspec" / "state.json").write_text(json.dumps(state))
    with pytest.raises(StoreError, match="chunk_size 1000000000000"):
        ingest(d, store)


# --------------------------------------------------------------------------- defect 8


def test_ingest_of_nothing_says_so_and_creates_nothing(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("no spectra here")
    store = tmp_path / "s.zarr"
    with pytest.raises(ValueError, match="matched no FITS file"):
        ingest(empty, store)
    with pytest.raises(ValueError, match="matched no FITS file"):
        ingest(str(tmp_path / "nothing-*.fits"), store)
    assert not store.exists()


def test_every_stage_on_zero_spectra_gives_empty_outputs(tmp_path):
    from mspec.ml.infer import predict
    from mspec.testing import raise_if_computes, tiny_models, tiny_survey_store

    store = tiny_survey_store(tmp_path / "s", 8, seed=1, chunk_size=4)
    models = Path(tiny_models(tmp_path / "m"))
    ds = open_store(store).isel(spectra=slice(0, 0))
    with raise_if_computes():
        pre = mspec.preprocess(ds)
        tm = mspec.template_match(pre)
        lines = mspec.line_rvs(tm)
        idx = mspec.spectral_indices(tm)
        preds = [predict(pre, models / k) for k in ("spt", "wdm", "dmgm")]
        tlma = predict(pre, models / "tlma", lumclass=np.array([], dtype="U2"))
    for out in (pre, tm, lines, idx, *preds, tlma):
        got = out.compute()
        assert got.sizes["spectra"] == 0
        new = [v for v in got.data_vars if "spectra" in got[v].dims]
        assert new and all(got[v].shape[got[v].dims.index("spectra")] == 0 for v in new)
    assert {"rv_tm", "tm_status"} <= set(tm.data_vars)


# --------------------------------------------------------------------------- defect 10


def test_refused_ingest_leaves_no_lock(tmp_path):
    import fcntl

    _, d, _ = _fits_dir(tmp_path, n=3)
    before = sorted(p.name for p in d.iterdir())
    # the source folder given as the store: refused, nothing created in it
    with pytest.raises(StoreError, match="not an mspec store"):
        ingest(d, d)
    assert sorted(p.name for p in d.iterdir()) == before
    store = tmp_path / "s.zarr"
    ingest(d, store, chunk_size=2, client="sync")
    assert not (store / "_mspec" / "lock").exists()  # released and removed
    with open(store / "_mspec" / "lock", "a") as fh:  # another ingest holds it
        fcntl.flock(fh, fcntl.LOCK_EX)
        with pytest.raises(StoreError, match="another ingest"):
            ingest(d, store)
    (store / "_mspec" / "lock").unlink()
    assert ingest(d, store, client="sync")["skipped"] == 3
    assert not (store / "_mspec" / "lock").exists()


def test_store_path_that_is_a_file(tmp_path):
    _, d, _ = _fits_dir(tmp_path, n=2)
    f = tmp_path / "file.zarr"
    f.write_text("x")
    with pytest.raises(StoreError, match="is a file"):
        ingest(d, f)
    with pytest.raises(StoreError, match="is a file"):
        open_store(f)
    with pytest.raises(StoreError, match="is a file"):
        store_state(f)


def test_bad_arguments_name_themselves(tmp_path):
    _, d, _ = _fits_dir(tmp_path, n=2)
    with pytest.raises(ValueError, match="client"):
        ingest(d, tmp_path / "s.zarr", client="bogus")
    with pytest.raises(TypeError, match="client"):
        ingest(d, tmp_path / "s.zarr", client=3)
    with pytest.raises(TypeError, match="allow_outside"):
        ingest(d, tmp_path / "s.zarr", allow_outside="yes")
    with pytest.raises(TypeError, match="progress"):
        ingest(d, tmp_path / "s.zarr", progress="yes")
    assert not (tmp_path / "s.zarr").exists()


def test_predict_bad_batch_size_and_non_safetensors_weights(tmp_path):
    from mspec.ml.infer import predict
    from mspec.ml.io import ModelFileError, sha256_bytes
    from mspec.testing import tiny_models, tiny_survey_store

    models = Path(tiny_models(tmp_path / "m"))
    pre = mspec.preprocess(open_store(tiny_survey_store(tmp_path / "s", 4, seed=2)))
    with pytest.raises(TypeError, match="batch_size"):
        predict(pre, models / "spt", batch_size="x")
    bad = tmp_path / "bad_spt"
    shutil.copytree(models / "spt", bad)
    meta = json.loads((bad / "model.json").read_text())
    junk = b"\x10\x00\x00\x00\x00\x00\x00\x00" + b"{not json at all}" + bytes(100)
    (bad / meta["members"][0]["file"]).write_bytes(junk)
    meta["members"][0]["sha256"] = sha256_bytes(junk)  # the hash matches: only the format is bad
    (bad / "model.json").write_text(json.dumps(meta))
    with pytest.raises(ModelFileError, match="not a valid safetensors"):
        predict(pre, bad)  # at call time, not at compute time
    # valid safetensors of the wrong network
    other = (models / "wdm" / json.loads((models / "wdm" / "model.json").read_text())["members"][0]["file"]).read_bytes()  # fmt: skip
    (bad / meta["members"][0]["file"]).write_bytes(other)
    meta["members"][0]["sha256"] = sha256_bytes(other)
    (bad / "model.json").write_text(json.dumps(meta))
    with pytest.raises(ModelFileError, match="does not fit the architecture"):
        predict(pre, bad)


def test_partial_chunk_files_cleaned_on_resume(tmp_path):
    """A kill inside a zarr chunk write leaves ``<chunk>.<uuid>.partial``: the next ingest
    (and the run directory's cleanup) removes it."""
    from mspec._exec import clean_partials

    _, d, paths = _fits_dir(tmp_path, n=4)
    store = tmp_path / "s.zarr"
    ingest(d, store, chunk_size=2, client="sync")
    left = [
        store / "flux" / "c" / "1" / "0.3f2a9c0d4e5b6a7c8d9e0f1a2b3c4d5e.partial",
        store / "obsid" / "c" / "1.0123456789abcdef0123456789abcdef.partial",
        store / "zarr.0123456789abcdef0123456789abcdef.partial",
    ]
    for p in left:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"half a chunk")
    ingest(d, store, client="sync")
    assert not any(p.exists() for p in left)
    run_dir = tmp_path / "run" / "stages" / "x.zarr" / "flux" / "c" / "0"
    run_dir.mkdir(parents=True)
    (run_dir / "0.abcdef.partial").write_bytes(b"x")
    (tmp_path / "run" / ".run.json.123.partial").write_bytes(b"x")
    assert clean_partials(tmp_path / "run") == 2


_COMMIT_KILL = """
import os, signal, sys
import mspec.io.store as st
st.BATCH_CHUNKS = 1
orig = st._write_state
calls = {"n": 0}
def write_state(store, state):
    calls["n"] += 1
    if state["batches"] == 2:  # the second commit: its tables are staged, not committed
        os.kill(os.getpid(), signal.SIGKILL)
    orig(store, state)
st._write_state = write_state
st.ingest(sys.argv[1], sys.argv[2], chunk_size=2, client="sync")
"""


def test_metadata_parquet_never_shows_uncommitted_rows_after_a_kill(tmp_path):
    import dask.dataframe as dd

    _, d, _ = _fits_dir(tmp_path, n=6)
    (d / "spec-bad.fits").write_text("junk")
    store = tmp_path / "s.zarr"
    proc = subprocess.run(
        [sys.executable, "-c", _COMMIT_KILL, str(d), str(store)],
        cwd=str(ROOT),
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.returncode == -signal.SIGKILL
    n = store_state(store)["n_spectra"]
    assert n == 4  # the first batch (4 files on one thread) is committed, the second not
    assert len(dd.read_parquet(str(store / "metadata.parquet")).compute()) == n
    assert len(read_metadata(store).compute()) == n
    ingest(d, store, client="sync")
    assert store_state(store)["n_spectra"] == 6
    assert len(dd.read_parquet(str(store / "metadata.parquet")).compute()) == 6
    assert len(read_quarantine(store)) == 1
    assert not list((store / "_mspec").rglob("*-part-*"))  # staged parts published


def _hdr(layout: str = "image", **cards) -> fits.Header:
    hdr = _header(layout)
    for k, v in cards.items():
        hdr[k] = v
    return hdr


def _oldest_without_ids(path: Path, seed: int) -> Path:
    hdr = _header("oldest")
    for k in ("LMJD", "PLANID", "SPID", "FIBERID"):
        del hdr[k]
    rows = _rows()
    rows[0] *= 1 + seed
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_image(path, rows=rows, hdr=hdr, layout="oldest")


def test_same_name_without_ids_do_not_collide(tmp_path):
    a = _oldest_without_ids(tmp_path / "a" / "spec-same.fits", 0)
    b = _oldest_without_ids(tmp_path / "b" / "spec-same.fits", 1)
    ia, ib = int(read_lamost(a).obsid[0]), int(read_lamost(b).obsid[0])
    assert ia != ib and ia < 0 and ib < 0
    c = tmp_path / "c" / "spec-same.fits"
    c.parent.mkdir()
    shutil.copy(a, c)
    assert int(read_lamost(c).obsid[0]) == ia  # the same file elsewhere: the same id
    s = ingest([a, b, c], tmp_path / "s.zarr", client="sync")
    assert s["stored"] == 2 and s["duplicates"] == 1


# --------------------------------------------------------------------------- safe loading


def test_catalogue_paths_cannot_escape_their_folder(tmp_path):
    _, d, paths = _fits_dir(tmp_path, n=3, name="inside")
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    shutil.copy(paths[0], outside / "spec-out.fits")
    (d / "link.fits").symlink_to(outside / "spec-out.fits")
    cat = d / "cat.csv"
    pd.DataFrame(
        {
            "file": [
                paths[1].name,
                "../elsewhere/spec-out.fits",
                str(outside / "spec-out.fits"),
                "link.fits",
            ]
        }
    ).to_csv(cat, index=False)
    s = ingest(cat, tmp_path / "s.zarr", client="sync")
    # ../ and the absolute path name the same file (listed once): 2 refused, not opened
    assert s["stored"] == 1 and s["quarantine_codes"] == {"outside_root": 2}
    q = read_quarantine(tmp_path / "s.zarr")
    assert q["reason"].str.contains("allow_outside=True").all()
    s = ingest(cat, tmp_path / "t.zarr", client="sync", allow_outside=True)
    assert s["stored"] == 2 and s["duplicates"] == 1  # the link is the same spectrum


def test_config_file_cannot_execute_code(tmp_path, monkeypatch):
    import builtins

    from mspec.config import ConfigError, load_config

    marker = tmp_path / "pwned"
    cfg = tmp_path / "run.toml"
    cfg.write_text(
        f"store = \"__import__('os').system('touch {marker}')\"\n"
        f'run_dir = "{tmp_path / "run"}"\n'
        "chunk_size = 8\n"
    )

    def refuse(*a, **k):
        raise AssertionError("the config loader evaluated code")

    for name in ("eval", "exec", "compile", "__import__"):
        if name != "__import__":
            monkeypatch.setattr(builtins, name, refuse)
    c = load_config(cfg)
    assert "__import__" in str(c.store) and not marker.exists()  # a string, nothing more
    monkeypatch.undo()
    import pickle

    cfg.write_bytes(pickle.dumps({"store": "x"}))  # a pickle is not a configuration
    with pytest.raises((ConfigError, ValueError)):  # (UnicodeDecodeError: see reliability.md)
        load_config(cfg)
    cfg.write_text('[cluster]\nscheduler = {__class__ = "os.system"}\n')
    with pytest.raises(ConfigError):
        load_config(cfg)
    assert not marker.exists()


# --------------------------------------------------------------------------- bad-input corpus


@pytest.fixture
def corpus(tmp_path):
    """Good files plus one file per bad case, all generated here. Returns (folder, expected
    code per bad file name, number of good files)."""
    _, d, good = _fits_dir(tmp_path, n=12, seed=3, name="corpus")
    n_good = len(good)
    expect: dict[str, str] = {}
    for key, p in make_bad_files(tmp_path).items():
        code = {"empty": "truncated", "truncated_gz": "truncated"}.get(key, key)
        code = "unknown_layout" if key.startswith("unknown_layout") else code
        if p.exists():
            shutil.copy(p, d / ("spec-bad-" + p.name))
            expect["spec-bad-" + p.name] = code
    # stored with cleaning (these count as good)
    rows = _rows()
    rows[0, :100] = np.nan
    rows[0, 100:120] = np.inf
    write_image(d / "spec-nanflux.fits", rows=rows)
    hdr = _header()
    hdr["OBSID"] = 900001
    hdr["SNRR"] = 1e30
    hdr["SNRI"] = -5.0
    write_image(d / "spec-snr.fits", hdr=hdr)
    hdr = fits.Header()  # only what a spectrum strictly needs
    hdr["OBSID"] = 900002
    write_table(d / "spec-bare.fits", hdr=hdr)
    p = write_image(d / "spec-badcard.fits", hdr=_hdr(OBSID=900003))
    patch_card(p, "SNRI", b"12.5.3")
    n_good += 4
    # quarantined
    rows = _rows()
    rows[1] = 0
    write_image(d / "spec-ivar0.fits", rows=rows, hdr=_hdr(OBSID=900004))
    expect["spec-ivar0.fits"] = "all_masked"
    rows = _rows()
    rows[3] = 4
    write_image(d / "spec-andmask.fits", rows=rows, hdr=_hdr(OBSID=900005))
    expect["spec-andmask.fits"] = "all_masked"
    rows = _rows()
    rows[2, 500:510] = rows[2, 500:510][::-1]
    write_table(d / "spec-nonmono.fits", rows=rows, hdr=_hdr("table", OBSID=900006))
    expect["spec-nonmono.fits"] = "wavelength_not_increasing"
    rows = _rows()
    rows[2] = np.linspace(10000, 12000, rows.shape[1])
    write_image(d / "spec-outofrange.fits", rows=rows, hdr=_hdr(OBSID=900007))
    expect["spec-outofrange.fits"] = "no_grid_overlap"
    shutil.copy(good[0], d / "spec-zz-duplicate.fits")
    expect["spec-zz-duplicate.fits"] = "duplicate_obsid"
    junk = np.random.default_rng(0).normal(size=(5, 2000)).astype(np.float32)
    jh = fits.Header()
    jh["COEFF0"], jh["COEFF1"] = 3.0, 0.5
    fits.PrimaryHDU(junk, jh).writeto(d / "spec-junk-dr1.fits")
    expect["spec-junk-dr1.fits"] = "unknown_layout"
    fits.PrimaryHDU(np.ones((3, 100), np.float32)).writeto(d / "spec-3rows.fits")
    expect["spec-3rows.fits"] = "unknown_layout"
    return d, expect, n_good


def test_bad_input_corpus_exact_counts_and_reasons(tmp_path, corpus):
    d, expect, n_good = corpus
    missing = d / "spec-listed-but-missing.fits"
    expect = {**expect, missing.name: "not_found"}
    assert (n_good, len(expect)) == (16, 18)
    store = tmp_path / "s.zarr"
    s = ingest([d, missing], store, chunk_size=4, client="sync")
    assert s["stored"] == n_good and store_state(store)["n_spectra"] == n_good
    assert s["quarantined"] + s["duplicates"] == len(expect)
    q = read_quarantine(store)
    got = dict(zip(q["file"], q["code"]))
    assert got == expect
    assert q["reason"].str.len().gt(0).all()
    ds = open_store(store).load()
    assert ds.obsid.to_index().is_unique
    row = {str(f): k for k, f in enumerate(ds.file.values)}
    assert "SNRI" in str(ds.read_warnings.values[row["spec-badcard.fits"]])
    assert np.isnan(ds.snr_i.values[row["spec-badcard.fits"]])
    k = row["spec-snr.fits"]
    assert ds.snr_r.values[k] == 1e30 and ds.snr_i.values[k] == -5.0  # kept as given
    k = row["spec-nanflux.fits"]
    assert (ds.ivar.values[k][~np.isfinite(ds.flux.values[k])] == 0).all()
    assert np.isnan(ds.ra.values[row["spec-bare.fits"]])  # missing keys: missing values
    # a rerun with nothing changed reads nothing and changes nothing
    s2 = ingest([d, missing], store, client="sync")
    assert s2["read"] == 0 and s2["retried"] == 0 and store_state(store)["n_spectra"] == n_good


def test_gaia_table_with_missing_rows_and_strings(tmp_path):
    from mspec.cmd import GaiaTableWarning, join_gaia

    ds = toy_survey(6, seed=1, extras=False)
    obs = ds.obsid.values
    table = pd.DataFrame(
        {
            "obsid": [obs[0], obs[2], obs[3], 12345],  # rows 1, 4, 5 missing; one unknown
            "parallax": ["1.5", "n/a", 2.0, 3.0],
            "phot_g_mean_mag": [12.0, 13.0, "bright", 14.0],
        }
    )
    with pytest.warns(GaiaTableWarning):
        out = join_gaia(ds, table, merge=False)
    par = out["parallax"].values
    assert par[0] == 1.5 and np.isnan(par[2]) and par[3] == 2.0
    assert np.isnan(par[[1, 4, 5]]).all()
    g = out["phot_g_mean_mag"].values
    assert g[0] == 12.0 and g[2] == 13.0 and np.isnan(g[3])


def test_decisions_csv_with_unknown_obsids_and_bad_values(tmp_path):
    review = pytest.importorskip("mspec.review")
    p = tmp_path / "decisions.csv"
    p.write_text(
        "obsid,module,decision\n"
        "101,RVMM,TM\n"  # good
        "999,RVMM,TM\n"  # unknown obsid
        "102,RVMM,banana\n"  # bad RVMM value
        "103,XYZ,TM\n"  # unknown module
        ",SCM,M\n"  # empty obsid
        "104,SCM,\n"  # empty decision
        "105,DGCM,dM\n"  # good
    )
    with pytest.warns(review.DecisionWarning):
        out = review.read_decisions(p, known_obsids=["101", "102", "103", "104", "105"])
    assert sorted(out["obsid"]) == ["101", "105"]  # the exact count of good rows
    reasons = dict(out.attrs["skipped"])
    assert "not in the run" in reasons[3] and "banana" in reasons[4]
    assert "unknown module" in reasons[5] and "empty obsid" in reasons[6]
    assert "empty decision" in reasons[7]
    bad = tmp_path / "bad.csv"
    bad.write_text("obsid;decision\n1;x\n")
    with pytest.raises(ValueError, match="module"):
        review.read_decisions(bad)
