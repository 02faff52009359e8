"""Chunk execution for resumable work: locks, atomic commits, done records, a bounded runner.

Used by ingest (:mod:`mspec.io.store`) and the pipeline runner (:mod:`mspec.pipeline.runner`);
the pieces are generic:

* :func:`atomic_write` — write a file so a reader sees the old or the new content, never a
  part (temporary file in the same directory, fsync, ``os.replace``);
* :class:`DirLock` — one writer per directory (``fcntl.flock``: the kernel drops the lock of
  a killed process, so a lock file left by ``kill -9`` is detected as stale and taken over);
* :class:`DoneRecords` — one small record per finished chunk (with what the caller wants to
  keep, e.g. the failures of the chunk), written only after the chunk's data are on disk, so
  a partly written chunk is never taken as done;
* :func:`run_bounded` — compute many per-chunk dask graphs with at most a few in flight,
  handing each result to the caller as it finishes (in one dashboard span, whose finished
  task groups :func:`forget_finished_groups` drops from the scheduler's history, and
  whose key names :func:`forget_key_names` drops from dask's cache);
* :func:`release_memory` — hand the driver's freed memory back to the OS between phases;
* :func:`lean_dask_config` — shorter dask debug logs, which held task specs in the driver.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import socket
import time
from collections.abc import Callable, Iterable
from pathlib import Path

log = logging.getLogger("mspec.exec")

__all__ = [
    "LockError",
    "atomic_write",
    "DirLock",
    "DoneRecords",
    "chunk_ranges",
    "clean_partials",
    "run_bounded",
    "forget_finished_groups",
    "forget_key_names",
    "tidy_dask",
    "release_memory",
    "lean_dask_config",
    "DASK_LOG_LENGTH",
]


#: Names of dask's local schedulers (anything else is a scheduler address or a client).
LOCAL_SCHEDULERS = frozenset(
    {"threads", "threading", "sync", "synchronous", "single-threaded", "processes"}
)
#: Names of dask's synchronous scheduler.
SYNC_SCHEDULERS = frozenset({"sync", "synchronous", "single-threaded"})


class LockError(RuntimeError):
    """Another live process holds the lock of a run directory or store."""


def atomic_write(path, data: bytes | str) -> Path:
    """Write ``data`` to ``path`` atomically (readers never see a partial file).

    Parameters
    ----------
    path : path-like
        Target file; its directory is created.
    data : bytes or str
        Content (str is UTF-8 encoded).

    Returns
    -------
    pathlib.Path
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # e.g. the disk filled up: leave no partial file behind
        raise
    return path


def clean_partials(directory) -> int:
    """Remove ``*.partial`` files a killed writer left in ``directory`` (recursively).

    Both kinds are removed: :func:`atomic_write`'s ``.<name>.<pid>.partial`` and zarr's
    ``<chunk>.<uuid>.partial`` (a chunk being written when the process was killed). Call it
    only while holding the directory's lock: a live writer's temporary files would go too.

    Returns
    -------
    int
        Number of files removed.
    """
    n = 0
    for p in Path(directory).rglob("*.partial"):
        if not p.is_file():
            continue
        try:
            p.unlink()
            n += 1
        except OSError:
            pass
    return n


class DirLock:
    """Exclusive lock on a directory for one writer process.

    Parameters
    ----------
    directory : path-like
        Directory to lock (created); named in the refusal message.
    what : str
        What the directory is, for the refusal message (``"run directory"``, ``"store"``).
    lock_file : str
        Lock file, relative to ``directory`` (parent folders are created).
    by : str
        Who holds such locks, for the refusal message (``"mspec process"``, ``"ingest"``).

    Raises
    ------
    LockError
        On :meth:`acquire` when a live process holds the lock (its pid, host and start time
        are in the message).

    Notes
    -----
    A lock file that still holds its writer's pid but is not ``flock``-ed belongs to a
    killed process: it is taken over (logged, and kept in :attr:`stale`). The file is removed
    on release while still locked, and :meth:`acquire` checks that the file it locked is
    still the one at the path, so two processes racing a release never both hold it.
    """

    def __init__(
        self,
        directory,
        what: str = "run directory",
        *,
        lock_file: str = ".lock",
        by: str = "mspec process",
    ):
        self.directory = Path(directory)
        self.path = self.directory / lock_file
        self.what = what
        self.by = by
        self._fh = None
        self.stale: dict | None = None

    @staticmethod
    def _describe(text: str) -> str:
        try:
            h = json.loads(text)
            when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(float(h["started"])))
            return f"pid {h['pid']} on {h['host']}, started {when}"
        except (ValueError, TypeError, KeyError):
            return text or "unknown process"

    def acquire(self) -> DirLock:
        """Take the lock (non-blocking); returns ``self``."""
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fh = open(self.path, "a+")
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                fh.seek(0)
                holder = self._describe(fh.read().strip())
                fh.close()
                raise LockError(
                    f"{self.what} {self.directory} is in use by another {self.by} ({holder}); "
                    "wait for it to finish or stop it"
                ) from None
            # a holder that just released removed the file we opened: lock the new one
            try:
                same = os.fstat(fh.fileno()).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            fh.close()
        fh.seek(0)
        old = fh.read().strip()
        if old:
            # the previous holder died without releasing (kill -9): its lock is stale
            try:
                self.stale = json.loads(old)
            except ValueError:
                self.stale = {"holder": old}
            log.warning(
                "taking over a stale lock of %s %s left by %s",
                self.what,
                self.directory,
                self._describe(old),
            )
        fh.seek(0)
        fh.truncate()
        fh.write(
            json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()})
        )
        fh.flush()
        self._fh = fh
        return self

    def release(self) -> None:
        """Give the lock up and remove the lock file (a no-op when not held)."""
        if self._fh is None:
            return
        try:
            self._fh.seek(0)
            self._fh.truncate()
            self._fh.flush()
            # removed while still held: see the inode check in acquire
            self.path.unlink(missing_ok=True)
        except OSError:
            pass
        finally:
            self._fh.close()
            self._fh = None

    def __enter__(self) -> DirLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


class DoneRecords:
    """Records of finished chunks of one stage: ``<directory>/<start>-<stop>.json``.

    Parameters
    ----------
    directory : path-like
        Directory of the records (created on first :meth:`mark`).
    """

    def __init__(self, directory):
        self.directory = Path(directory)

    def _path(self, start: int, stop: int) -> Path:
        return self.directory / f"{int(start):012d}-{int(stop):012d}.json"

    def is_done(self, start: int, stop: int) -> bool:
        """Whether chunk ``[start, stop)`` finished (exactly that range, readable record)."""
        return self.read(start, stop) is not None

    def read(self, start: int, stop: int) -> dict | None:
        """The record of chunk ``[start, stop)`` (with the ``info`` given to :meth:`mark`).

        Returns
        -------
        dict or None
            None when the chunk has no record, or one that cannot be read (damaged): either
            way the chunk is not done.
        """
        try:
            rec = json.loads(self._path(start, stop).read_text())
        except (OSError, ValueError):
            return None
        return rec if isinstance(rec, dict) else None

    def mark(self, start: int, stop: int, info: dict | None = None) -> None:
        """Record chunk ``[start, stop)`` as finished (call only after its data are written).

        Parameters
        ----------
        start, stop : int
            The chunk's range.
        info : dict, optional
            JSON-serialisable values kept in the record (e.g. the items of the chunk that
            failed, with reasons); read back with :meth:`read`.
        """
        atomic_write(
            self._path(start, stop),
            json.dumps({"start": int(start), "stop": int(stop), **(info or {})}),
        )

    def forget(self, start: int, stop: int) -> None:
        """Remove the record of chunk ``[start, stop)`` (it will be done again)."""
        self._path(start, stop).unlink(missing_ok=True)

    def ranges(self) -> list[tuple[int, int]]:
        """Finished ranges, sorted."""
        if not self.directory.is_dir():
            return []
        out = []
        for p in self.directory.glob("*.json"):
            try:
                a, b = p.stem.split("-")
                out.append((int(a), int(b)))
            except ValueError:
                continue
        return sorted(out)

    def clear(self) -> None:
        """Forget every record."""
        import shutil

        shutil.rmtree(self.directory, ignore_errors=True)


def chunk_ranges(n: int, chunk: int) -> list[tuple[int, int]]:
    """``[start, stop)`` of every chunk of ``n`` items in chunks of ``chunk``."""
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    return [(s, min(s + chunk, n)) for s in range(0, n, chunk)]


def run_bounded(
    jobs: Iterable[tuple[object, object]],
    on_done: Callable[[object, object], None],
    *,
    client=None,
    scheduler: str | None = None,
    max_in_flight: int = 4,
    local_batch: int = 1,
    progress: Iterable | None = None,
    span: str = "mspec",
) -> int:
    """Compute ``(key, dask collection)`` jobs with at most a few in flight.

    Parameters
    ----------
    jobs : iterable of (key, dask collection)
        One per chunk, e.g. a delayed region write. Taken one at a time as they are
        submitted: a generator builds each job's graph only when it is about to run, so
        the caller never holds a survey's worth of graphs.
    on_done : callable
        Called as ``on_done(key, result)`` in the calling process after the job finished
        (write the done record here; ``result`` is the computed value of the collection).
    client : distributed.Client, optional
        Cluster to run on, with at most ``max_in_flight`` jobs submitted at once.
    scheduler : str, optional
        Local dask scheduler (``"threads"``, ``"sync"``, ``"processes"``) when no client.
    max_in_flight : int
        Jobs submitted to the cluster at once (bounds memory: each holds about one chunk).
    local_batch : int
        Without a client: jobs computed together by one ``dask.compute`` call, their
        ``on_done`` called when all of them finished. 1 (default) runs jobs one after
        another, each using all of the scheduler's workers (jobs of many tasks); jobs of one
        task each need about 2 x the workers to keep them busy.
    progress : tqdm-like, optional
        ``update(1)`` is called per finished job.
    span : str
        Name of the one ``distributed.span`` every job of the call runs in (on the
        dashboard; with a client only). The scheduler keeps a span and its task groups for
        its whole life, so each job would otherwise leave its own span behind (~40 kB on
        the scheduler per job); the finished jobs' groups are dropped from it as jobs
        complete (:func:`forget_finished_groups`).

    Returns
    -------
    int
        Jobs completed.

    Raises
    ------
    ValueError
        ``max_in_flight`` or ``local_batch`` below 1.
    """
    import dask

    for name, v in (("max_in_flight", max_in_flight), ("local_batch", local_batch)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be an int >= 1, got {v!r}")
    done = 0
    sched = client  # None once the scheduler refuses to be tidied

    def finished(key, result):
        nonlocal done, sched
        on_done(key, result)
        done += 1
        if progress is not None:
            progress.update(1)
        if done % FORGET_EVERY == 0 and not tidy_dask(sched):
            sched = None

    jobs = iter(jobs)
    if client is None:
        scheduler = scheduler or "threads"
        with contextlib.ExitStack() as stack:
            kwargs = {}
            first = list(itertools.islice(jobs, local_batch + 1))
            jobs = itertools.chain(first, jobs)
            if scheduler in ("processes", "multiprocessing") and len(first) > local_batch:
                # one process pool for every call (dask would start a new one per call)
                from concurrent.futures import ProcessPoolExecutor

                from dask.multiprocessing import get_context

                kwargs["pool"] = stack.enter_context(
                    ProcessPoolExecutor(os.cpu_count(), mp_context=get_context())
                )
            while part := list(itertools.islice(jobs, local_batch)):
                results = dask.compute(*(job for _, job in part), scheduler=scheduler, **kwargs)
                for (key, _), result in zip(part, results):
                    finished(key, result)
        tidy_dask()
        return done

    from distributed import as_completed
    from distributed import span as dask_span

    keys = {}
    ac = as_completed()

    def submit() -> bool:
        nxt = next(jobs, None)
        if nxt is None:
            return False
        key, job = nxt
        fut = client.compute(job)
        keys[fut.key] = key
        ac.add(fut)
        return True

    with dask_span(span):
        for _ in range(max_in_flight):
            if not submit():
                break
        for fut in ac:
            result = fut.result()  # re-raise a task's error here
            fut.release()
            finished(keys.pop(fut.key), result)
            submit()
    tidy_dask(sched)
    return done


#: Jobs between two calls of :func:`tidy_dask` in :func:`run_bounded`.
FORGET_EVERY = 16


def tidy_dask(client=None) -> bool:
    """Drop the dask state finished work leaves behind: :func:`forget_key_names` in this
    process and, with a ``client``, :func:`forget_finished_groups` on its scheduler.

    Returns
    -------
    bool
        False (with a debug log) when the scheduler refused, so a caller can stop asking.
    """
    forget_key_names()
    if client is None:
        return True
    try:
        client.run_on_scheduler(forget_finished_groups)
    except Exception:  # noqa: BLE001 - housekeeping only; the run goes on without it
        log.debug("could not tidy the scheduler's task groups", exc_info=True)
        return False
    return True


def forget_key_names() -> int:
    """Empty dask's cache of task-key names in this process; returns the entries dropped.

    ``dask.utils.key_split`` (the name a key is grouped and fused under) keeps its last
    100,000 answers, keyed by the task key. Every chunk graph has new keys, so in a driver
    that builds and schedules one graph per chunk (client and, with a local cluster,
    scheduler) the cache grows by ~11 kB per chunk graph up to ~17 MiB: memory that grew
    with the survey. Emptying it between jobs costs only recomputing a few names.
    """
    from dask.utils import key_split

    clear = getattr(key_split, "cache_clear", None)
    if clear is None:  # a dask without the cache
        return 0
    n = key_split.cache_info().currsize
    clear()
    return n


def forget_finished_groups(dask_scheduler=None) -> int:
    """Drop a dask scheduler's references to task groups whose tasks are all forgotten.

    The scheduler forgets finished tasks, but its spans (and its last 100 computations)
    keep every task group they ever held, for the scheduler's life (dask/distributed
    #7977). A pipeline that submits one graph per chunk makes new groups per chunk, so
    that history grows with the survey; dropping the finished groups keeps it flat. Only
    the dashboard's history of finished work is lost. The scheduler's process also
    empties its cache of key names (:func:`forget_key_names`). Run it on the scheduler:
    ``client.run_on_scheduler(forget_finished_groups)``.

    Parameters
    ----------
    dask_scheduler : distributed.Scheduler
        Passed in by ``Client.run_on_scheduler``.

    Returns
    -------
    int
        Task-group references dropped (0 where the scheduler has no such state).
    """
    forget_key_names()
    live = getattr(dask_scheduler, "task_groups", None)
    if live is None:
        return 0

    def alive(groups: set) -> set:
        return {tg for tg in groups if live.get(tg.name) is tg}

    holders = list(getattr(dask_scheduler, "computations", ()))
    spans = getattr(dask_scheduler, "extensions", {}).get("spans")
    holders += list(getattr(spans, "spans", {}).values())
    dropped = 0
    for h in holders:
        groups = getattr(h, "groups", None)
        if isinstance(groups, set):
            kept = alive(groups)
            dropped += len(groups) - len(kept)
            h.groups = kept
    return dropped


def release_memory() -> int | None:
    """Return the memory this process has freed to the operating system (between phases).

    A long run's driver frees many arrays of a few MB (column reads, statistics, figures);
    glibc keeps such freed blocks in its heap once its dynamic mmap threshold has risen, and
    Arrow's allocator keeps its own pages, so the process's RSS stays at the high-water mark
    of every earlier phase and stacks up. This collects garbage, asks Arrow's default memory
    pool to release unused pages (when pyarrow is loaded) and calls glibc's
    ``malloc_trim(0)``; elsewhere (macOS, musl, Windows) only the first two happen.

    Returns
    -------
    int or None
        RSS released, in bytes (negative if it grew meanwhile), or None where psutil is
        not importable.
    """
    import ctypes
    import ctypes.util
    import gc
    import sys

    try:
        import psutil

        proc = psutil.Process()
        before = proc.memory_info().rss
    except Exception:  # noqa: BLE001 - the figure is informative only
        proc = before = None
    gc.collect()
    pa = sys.modules.get("pyarrow")
    if pa is not None:
        with contextlib.suppress(Exception):
            pa.default_memory_pool().release_unused()
    if sys.platform.startswith("linux"):
        with contextlib.suppress(Exception):
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            if hasattr(libc, "malloc_trim"):  # glibc only
                libc.malloc_trim(0)
    if proc is None:
        return None
    return int(before - proc.memory_info().rss)


#: Messages kept per connection in dask's developer logs (``distributed.admin.low-level-
#: log-length``, default 1,000) in the clusters mspec starts. Each logged scheduler-to-
#: worker message holds the task specs it carried (with their arguments: templates, model
#: references), so 1,000 of them per worker held ~0.5 MB per computed chunk in the driver
#: until they filled: ~70 MiB more at 100 chunks than at 10, ~120 MiB at 300.
DASK_LOG_LENGTH = 32


def lean_dask_config():
    """A ``dask.config.set`` context with :data:`DASK_LOG_LENGTH` (only when the setting is
    dask's default: a user's own value is kept).

    Enter it before starting a cluster: its scheduler, workers (their nannies pass the
    configuration on) and client read the length when they open their connections.
    """
    import dask

    key = "distributed.admin.low-level-log-length"
    if dask.config.get(key, 1000) != 1000:
        return contextlib.nullcontext()
    return dask.config.set({key: DASK_LOG_LENGTH})
