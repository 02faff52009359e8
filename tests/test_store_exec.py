"""Ingest runs on the execution primitives the pipeline runner uses (mspec._exec): the store's
lock is a DirLock (refusal, stale takeover), its write units leave DoneRecords (a missing one
is redone, units marked by earlier versions are redone), tasks go through run_bounded."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
from test_store import _fits_dir, _tree_bytes  # noqa: E402  (tests/ is on sys.path)

import mspec.io.store as st
from mspec._exec import DirLock, DoneRecords, LockError
from mspec.io.store import StoreError, StoreLockedError, ingest, open_store, store_state

ROOT = Path(__file__).resolve().parents[1]

_SLOW_INGEST = """
import sys, time
import mspec.io.store as st
orig = st._write_unit
def slow(*a):
    time.sleep(0.5)
    return orig(*a)
st._write_unit = slow
st.ingest(sys.argv[1], sys.argv[2], chunk_size=2, client="sync")
"""


def test_concurrent_ingest_refused_then_stale_lock_taken_over(tmp_path, caplog):
    """A second ingest is refused with the lock error of a locked run directory (naming the
    store and the live ingest's pid); once that ingest is killed (-9) its lock is stale, the
    next ingest takes it over and finishes the store as if nothing happened."""
    _, d, _ = _fits_dir(tmp_path, n=8, seed=3)
    ref = tmp_path / "ref.zarr"
    ingest(d, ref, chunk_size=2, client="sync")
    store = tmp_path / "s.zarr"
    lock = store / "_mspec" / "lock"
    proc = subprocess.Popen(
        [sys.executable, "-c", _SLOW_INGEST, str(d), str(store)],
        cwd=str(ROOT),
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        t0 = time.time()
        # wait until it holds the lock and has finished a write unit (mid-batch)
        while not (
            lock.exists()
            and f'"pid": {proc.pid}' in lock.read_text()
            and list((store / "_mspec" / "done").glob("batch-*/*.json"))
        ):
            assert proc.poll() is None, "the ingest ended before the test saw its lock"
            assert time.time() - t0 < 120, "the ingest never took its lock"
            time.sleep(0.02)
        with pytest.raises(LockError) as err:
            ingest(d, store, chunk_size=2, client="sync")
        assert isinstance(err.value, StoreError) and isinstance(err.value, StoreLockedError)
        assert str(err.value).startswith(
            f"store {store} is in use by another ingest (pid {proc.pid}"
        )
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert json.loads(lock.read_text())["pid"] == proc.pid  # left by the killed ingest
    with caplog.at_level(logging.WARNING, logger="mspec.exec"):
        summary = ingest(d, store, chunk_size=2, client="sync")
    assert "taking over a stale lock of store" in caplog.text
    assert summary["n_spectra"] == 8 and summary["read"] == 0  # resumed the killed batch
    assert not lock.exists()
    assert _tree_bytes(store) == _tree_bytes(ref)


def _interrupted_batch(tmp_path, monkeypatch, n=7, chunk=2):
    """A store whose only batch is written (every unit has its done record) but not
    committed, as after a kill just before the commit; and a reference store."""
    _, d, _ = _fits_dir(tmp_path, n=n, seed=6)
    ref = tmp_path / "ref.zarr"
    ingest(d, ref, chunk_size=chunk, client="sync")
    store = tmp_path / "s.zarr"

    def killed(*a):
        raise KeyboardInterrupt  # stands in for kill -9 between the writes and the commit

    monkeypatch.setattr(st, "_commit", killed)
    with pytest.raises(KeyboardInterrupt):
        ingest(d, store, chunk_size=chunk, client="sync")
    monkeypatch.undo()
    assert store_state(store)["batches"] == 0
    records = DoneRecords(store / "_mspec" / "done" / "batch-000000")
    assert records.ranges() == [(a, min(a + chunk, n)) for a in range(0, n, chunk)]
    assert all(records.read(a, b)["failed"] == [] for a, b in records.ranges())
    return d, ref, store, records


def _garble(store: Path, a: int, b: int) -> None:
    import zarr

    zarr.open_group(str(store), mode="r+")["flux"][a:b] = -1.0


def _count_units(monkeypatch) -> list:
    written = []
    orig = st._write_unit

    def counting(store, batch, start, stop):
        written.append((start, stop))
        return orig(store, batch, start, stop)

    monkeypatch.setattr(st, "_write_unit", counting)
    return written


def test_unit_without_done_record_is_redone(tmp_path, monkeypatch):
    d, ref, store, records = _interrupted_batch(tmp_path, monkeypatch)
    # unit [2, 4) lost its record (as if killed after writing part of it): it is written
    # again; the others keep theirs and are not
    records.forget(2, 4)
    _garble(store, 2, 4)
    written = _count_units(monkeypatch)
    summary = ingest(d, store, chunk_size=2, client="sync")
    assert written == [(2, 4)]
    assert summary["stored"] == 7 and summary["n_spectra"] == 7
    assert _tree_bytes(store) == _tree_bytes(ref)
    assert not (store / "_mspec" / "done" / "batch-000000").exists()
    xr.testing.assert_identical(
        open_store(store).load(), open_store(ref).load().assign_attrs(path=str(store))
    )


def test_units_marked_by_an_earlier_version_are_redone(tmp_path, monkeypatch):
    """Ingests before the shared done records left ``done/batch-N/<start>`` markers (empty,
    or a JSON list of failures). Such a pending batch resumes: the markers are not trusted,
    every unit is written again (idempotent) and the store ends identical."""
    d, ref, store, records = _interrupted_batch(tmp_path, monkeypatch)
    ranges = records.ranges()
    for a, b in ranges:
        records.forget(a, b)
        (records.directory / f"{a:012d}").write_bytes(b"")
        _garble(store, a, b)
    written = _count_units(monkeypatch)
    ingest(d, store, chunk_size=2, client="sync")
    assert sorted(written) == ranges
    assert _tree_bytes(store) == _tree_bytes(ref)
    assert not (store / "_mspec" / "done" / "batch-000000").exists()
    np.testing.assert_array_equal(open_store(store).flux.values, open_store(ref).flux.values)


def test_failures_are_kept_in_the_done_record(tmp_path, monkeypatch):
    """A file unreadable at write time is recorded, with its reason, in its unit's done
    record; an ingest killed before the re-plan resumes from the records (no unit is read
    again), quarantines the file and rewrites only the units from the failed one on."""
    _, d, paths = _fits_dir(tmp_path, n=5, seed=7)
    store = tmp_path / "s.zarr"
    orig_plan = st._plan

    def plan_then_remove(*a):
        out = orig_plan(*a)
        paths[3].rename(paths[3].with_suffix(".away"))
        return out

    def killed_before_replan(msg, *a, **k):
        if "could not be read again" in msg:
            raise KeyboardInterrupt  # stands in for kill -9 before the re-plan
        return None

    monkeypatch.setattr(st, "_plan", plan_then_remove)
    monkeypatch.setattr(st.log, "warning", killed_before_replan)
    with pytest.raises(KeyboardInterrupt):
        ingest(d, store, chunk_size=2, client="sync")
    monkeypatch.undo()
    records = DoneRecords(store / "_mspec" / "done" / "batch-000000")
    assert records.ranges() == [(0, 2), (2, 4), (4, 5)]
    ((row, reason),) = records.read(2, 4)["failed"]
    assert row == 3 and "not_found" in reason and paths[3].name in reason
    assert records.read(0, 2)["failed"] == records.read(4, 5)["failed"] == []
    written = _count_units(monkeypatch)
    s = ingest(d, store, chunk_size=2, client="sync")
    assert written == [(2, 4)]  # rows 2-3 now hold files 2 and 4
    assert s["stored"] == 4 and s["quarantine_codes"] == {"changed_during_ingest": 1}
    assert [str(f) for f in open_store(store).file.values] == [
        p.name for k, p in enumerate(paths) if k != 3
    ]


def test_store_lock_is_the_run_directory_lock(tmp_path):
    """The lock ingest takes is a DirLock: holding it in-process refuses an ingest, and an
    ingest refused by the store lock leaves nothing behind."""
    _, d, _ = _fits_dir(tmp_path, n=3)
    store = tmp_path / "s.zarr"
    ingest(d, store, chunk_size=2, client="sync")
    before = _tree_bytes(store)
    with DirLock(store, "store", lock_file="_mspec/lock", by="ingest"):
        with pytest.raises(StoreLockedError, match="is in use by another ingest"):
            ingest(d, store, client="sync")
    assert _tree_bytes(store) == before and not (store / "_mspec" / "lock").exists()
