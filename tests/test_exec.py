"""mspec._exec: the lock, done records and bounded runner shared by ingest and the pipeline."""

from __future__ import annotations

import fcntl
import json
import logging
import os
import platform
import signal
import subprocess
import sys
import time

import dask
import pytest

import mspec._exec as ex
from mspec._exec import DirLock, DoneRecords, LockError, chunk_ranges, run_bounded

# --------------------------------------------------------------------------- DirLock


def _flock_free(path) -> bool:
    """Whether another open file description could lock ``path`` now."""
    with open(path, "a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return False
        fcntl.flock(fh, fcntl.LOCK_UN)
        return True


def test_dirlock_refusal_names_directory_and_holder(tmp_path):
    with DirLock(tmp_path / "s", "store", lock_file="_mspec/lock", by="ingest") as held:
        assert held.path == tmp_path / "s" / "_mspec" / "lock"
        with pytest.raises(LockError) as err:
            DirLock(tmp_path / "s", "store", lock_file="_mspec/lock", by="ingest").acquire()
        msg = str(err.value)
        assert msg.startswith(f"store {tmp_path / 's'} is in use by another ingest")
        assert f"pid {os.getpid()} on " in msg and "started 20" in msg
    assert not held.path.exists()  # removed on release
    # the default names: a run directory and its .lock
    with DirLock(tmp_path / "r"), pytest.raises(LockError, match="run directory .* mspec process"):
        DirLock(tmp_path / "r").acquire()


def test_dirlock_stale_lock_of_a_killed_process_is_taken_over(tmp_path, caplog):
    code = (
        "import os, signal, sys\n"
        "from mspec._exec import DirLock\n"
        "DirLock(sys.argv[1], 'store', lock_file='_mspec/lock').acquire()\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "s")])
    assert proc.returncode == -signal.SIGKILL
    path = tmp_path / "s" / "_mspec" / "lock"
    assert json.loads(path.read_text())["pid"]  # left behind, but nobody holds the flock
    lock = DirLock(tmp_path / "s", "store", lock_file="_mspec/lock")
    with caplog.at_level(logging.WARNING, logger="mspec.exec"), lock:
        assert lock.stale is not None and lock.stale["pid"] > 0
        assert json.loads(path.read_text())["pid"] == os.getpid()
        assert not _flock_free(path)
    assert "taking over a stale lock of store" in caplog.text
    assert not path.exists()


def test_dirlock_does_not_settle_for_a_released_lock_file(tmp_path, monkeypatch):
    """A holder releasing between our open() and flock() removed the file we opened: the
    lock we then get is on a file nobody else sees, so acquire() must lock the new one."""
    first = DirLock(tmp_path)
    first.acquire()
    orphan = open(first.path, "a+")  # opened just before the holder releases
    first.release()
    assert not first.path.exists()
    real_open, calls = open, []

    def racing_open(path, mode="r", *a, **k):
        calls.append(path)
        return orphan if len(calls) == 1 else real_open(path, mode, *a, **k)

    monkeypatch.setattr(ex, "open", racing_open, raising=False)
    with DirLock(tmp_path) as second:
        assert len(calls) == 2  # retried after seeing the orphaned inode
        assert second.path.exists() and not _flock_free(second.path)
    assert orphan.closed


# --------------------------------------------------------------------------- DoneRecords


def test_done_records_keep_info_and_forget(tmp_path):
    rec = DoneRecords(tmp_path / "done")
    assert rec.ranges() == [] and rec.read(0, 3) is None and not rec.is_done(0, 3)
    rec.mark(0, 3, {"failed": [[1, "not_found: gone"]]})
    rec.mark(3, 5)
    assert rec.read(0, 3) == {"start": 0, "stop": 3, "failed": [[1, "not_found: gone"]]}
    assert rec.is_done(0, 3) and not rec.is_done(0, 5)  # exactly that range
    assert rec.ranges() == [(0, 3), (3, 5)]
    rec.forget(0, 3)
    rec.forget(7, 9)  # nothing to forget: fine
    assert rec.ranges() == [(3, 5)]
    # a damaged record (not written by mark) does not count as done
    (tmp_path / "done" / f"{3:012d}-{5:012d}.json").write_text("{trunc")
    assert rec.read(3, 5) is None and not rec.is_done(3, 5)
    assert not list((tmp_path / "done").glob("*.partial"))
    rec.clear()
    assert not (tmp_path / "done").exists()


def test_chunk_ranges():
    assert chunk_ranges(7, 3) == [(0, 3), (3, 6), (6, 7)]
    assert chunk_ranges(0, 3) == []
    with pytest.raises(ValueError, match="chunk"):
        chunk_ranges(5, 0)


# --------------------------------------------------------------------------- run_bounded


class _Bar:
    def __init__(self):
        self.n = 0

    def update(self, k):
        self.n += k


@pytest.mark.parametrize("local_batch", [1, 3, 10])
def test_run_bounded_local_hands_results_in_order(local_batch, monkeypatch):
    calls = []
    orig = dask.compute

    def counting(*args, **kw):
        calls.append(len(args))
        return orig(*args, **kw)

    monkeypatch.setattr(dask, "compute", counting)
    jobs = [((i, i + 1), dask.delayed(lambda x: x * x, pure=False)(i)) for i in range(7)]
    got, bar = [], _Bar()
    n = run_bounded(
        jobs,
        lambda k, r: got.append((k, r)),
        scheduler="sync",
        local_batch=local_batch,
        progress=bar,
    )
    assert n == 7 and bar.n == 7
    assert got == [((i, i + 1), i * i) for i in range(7)]
    assert calls == [min(local_batch, 7 - s) for s in range(0, 7, local_batch)]


def test_run_bounded_processes_scheduler_and_errors():
    jobs = [(i, dask.delayed(abs, pure=False)(-i)) for i in range(5)]
    got = {}
    assert run_bounded(jobs, got.__setitem__, scheduler="processes", local_batch=2) == 5
    assert got == {i: i for i in range(5)}
    with pytest.raises(ValueError, match="local_batch"):
        run_bounded(jobs, got.__setitem__, local_batch=0)
    with pytest.raises(ValueError, match="max_in_flight"):
        run_bounded(jobs, got.__setitem__, max_in_flight=True)
    # a job's error reaches the caller; no on_done for it
    seen = []
    bad = [(0, dask.delayed(int, pure=False)("x"))]
    with pytest.raises(ValueError, match="invalid literal"):
        run_bounded(bad, lambda k, r: seen.append(k), scheduler="sync")
    assert seen == []


@pytest.mark.distributed
def test_run_bounded_distributed_keeps_at_most_max_in_flight():
    from distributed import Client, LocalCluster

    with (
        LocalCluster(n_workers=1, threads_per_worker=2, processes=False, dashboard_address=":0")
        as cluster,
        Client(cluster) as client,
    ):  # fmt: skip
        submitted = []
        orig = client.compute

        def tracking(job):
            submitted.append(job)
            return orig(job)

        client.compute = tracking
        in_flight = []
        jobs = [(i, dask.delayed(pow, pure=False)(i, 2)) for i in range(9)]
        got = {}

        def done(k, r):
            in_flight.append(len(submitted) - len(got))
            got[k] = r

        assert run_bounded(jobs, done, client=client, max_in_flight=3) == 9
        assert got == {i: i * i for i in range(9)}
        assert max(in_flight) <= 3


def test_run_bounded_one_span_and_no_finished_groups_left(monkeypatch):
    """Each call runs its jobs in one named span, and the scheduler keeps no task group of a
    finished job (spans and computations would hold them for the scheduler's life)."""
    import dask.array as da
    from distributed import Client, LocalCluster

    monkeypatch.setattr(ex, "FORGET_EVERY", 4)
    forget = ex.forget_finished_groups

    def counting(dask_scheduler=None):  # pickled by value: counts on the scheduler itself
        n = forget(dask_scheduler)
        dask_scheduler.mspec_test_drops = [*getattr(dask_scheduler, "mspec_test_drops", []), n]
        return n

    monkeypatch.setattr(ex, "forget_finished_groups", counting)
    with (
        LocalCluster(n_workers=1, threads_per_worker=2, processes=False, dashboard_address=":0")
        as cluster,
        Client(cluster) as client,
    ):  # fmt: skip
        sched = cluster.scheduler
        spans = sched.extensions["spans"]
        for call in range(2):
            jobs = (
                (i, (da.random.RandomState(i).random((40, 5), chunks=(10, 5)) * 2).sum())
                for i in range(10)
            )
            assert run_bounded(jobs, lambda k, r: None, client=client, span=f"t{call}") == 10
        names = [sp.name for sp in spans.spans.values()]
        assert names.count(("t0",)) == 1 and names.count(("t1",)) == 1
        assert all("default" not in n for n in names)  # no span per job
        # finished jobs' groups were dropped as the calls went (every 4 jobs and at the end)
        dropped = sched.mspec_test_drops
        assert len(dropped) == 2 * 3 and sum(dropped) > 0
        # once the scheduler has forgotten the last jobs' tasks (released asynchronously),
        # one more pass leaves only live groups: nothing of the 20 jobs stays
        deadline = time.monotonic() + 10
        while sched.tasks and time.monotonic() < deadline:
            time.sleep(0.05)
        forget(sched)
        held = [tg for sp in spans.spans.values() for tg in sp.groups]
        held += [tg for c in sched.computations for tg in c.groups]
        assert held == []


@pytest.mark.parametrize("where", ["local", "distributed"])
def test_run_bounded_empties_the_key_name_cache(where, monkeypatch):
    """dask's key_split cache (100,000 entries, one per task key) would grow with every chunk
    graph built and scheduled in the driver; run_bounded empties it as jobs finish."""
    import dask
    import dask.array as da
    from dask.utils import key_split

    monkeypatch.setattr(ex, "FORGET_EVERY", 4)
    sizes = []
    real = ex.forget_key_names

    def recording():
        sizes.append(key_split.cache_info().currsize)
        return real()

    monkeypatch.setattr(ex, "forget_key_names", recording)

    def jobs(n=40):
        for i in range(n):
            x = da.random.RandomState(i).random((40, 5), chunks=(10, 5))
            yield i, ((x * 2 + 1).mean(axis=1) - x.std(axis=1)).sum()

    key_split.cache_clear()
    if where == "local":
        assert run_bounded(jobs(), lambda k, r: None, scheduler="sync") == 40
    else:
        from distributed import Client, LocalCluster

        with (
            LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=":0")
            as cluster,
            Client(cluster) as client,
        ):  # fmt: skip
            assert run_bounded(jobs(), lambda k, r: None, client=client) == 40
    # emptied every 4 jobs and at the end; each time it held the names of a few jobs only
    assert len(sizes) >= 3 and max(sizes) > 0
    if where == "local":  # (a closing cluster may name keys as it tears down)
        assert key_split.cache_info().currsize == 0
    # without emptying, the cache would hold all 40 jobs' names
    dask.compute(*(job for _, job in jobs()), scheduler="sync")
    assert max(sizes) < key_split.cache_info().currsize


def test_forget_key_names_returns_what_it_dropped():
    from dask.utils import key_split

    key_split.cache_clear()
    key_split("x-0123456789abcdef0123456789abcdef")
    key_split("y-0123456789abcdef0123456789abcdef")
    assert ex.forget_key_names() == 2
    assert key_split.cache_info().currsize == 0 and ex.forget_key_names() == 0


def test_forget_finished_groups_keeps_live_groups():
    class Group:
        def __init__(self, name):
            self.name = name

    class Holder:
        def __init__(self, groups):
            self.groups = set(groups)

    live, dead, renamed = Group("a"), Group("b"), Group("c")
    span, comp = Holder([live, dead]), Holder([dead, renamed])

    class Spans:
        spans = {"x": span}

    class Scheduler:
        task_groups = {"a": live, "c": Group("c")}  # "c" reused by a newer group
        computations = [comp]
        extensions = {"spans": Spans()}

    assert ex.forget_finished_groups(Scheduler()) == 3
    assert span.groups == {live} and comp.groups == set()
    assert ex.forget_finished_groups(object()) == 0  # a scheduler without this state


@pytest.mark.skipif(
    not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
    reason="malloc_trim is glibc's",
)
def test_release_memory_returns_freed_heap_to_the_os():
    """Freed blocks below the top of glibc's heap stay in the process (RSS) until trimmed:
    release_memory hands them back and says how much."""
    import ctypes
    import ctypes.util

    import psutil

    from mspec._exec import release_memory

    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    size = 64 * 1024  # below the mmap threshold: served from the heap
    blocks = [libc.malloc(size) for _ in range(2000)]  # 125 MiB
    try:
        for b in blocks:
            ctypes.memset(b, 1, size)
        for b in blocks[:-1]:  # the last block pins the heap's top: no automatic trim
            libc.free(b)
        rss = psutil.Process().memory_info().rss
        freed = release_memory()
        assert freed is not None and freed > 64 * 2**20
        assert psutil.Process().memory_info().rss < rss - 64 * 2**20
        assert isinstance(release_memory(), int)  # nothing left to give: still fine
    finally:
        libc.free(blocks[-1])


def test_lean_dask_config_shortens_the_debug_logs_unless_the_user_set_them():
    """Clusters mspec starts keep 32 messages per connection in dask's developer logs (1,000
    held task specs in the driver); a value the user chose is kept; the setting reaches the
    workers through their nannies."""
    from distributed import Client, LocalCluster

    from mspec._exec import DASK_LOG_LENGTH, lean_dask_config

    key = "distributed.admin.low-level-log-length"
    assert dask.config.get(key) == 1000  # dask's default
    with lean_dask_config():
        assert dask.config.get(key) == DASK_LOG_LENGTH
        with (
            LocalCluster(n_workers=1, threads_per_worker=1, processes=True,
                         dashboard_address="127.0.0.1:0") as cluster,
            Client(cluster) as client,
        ):  # fmt: skip
            assert set(client.run(lambda: dask.config.get(key)).values()) == {DASK_LOG_LENGTH}
            assert cluster.scheduler.transition_log.maxlen == DASK_LOG_LENGTH
    assert dask.config.get(key) == 1000
    with dask.config.set({key: 5000}), lean_dask_config():
        assert dask.config.get(key) == 5000
