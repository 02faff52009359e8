"""Chunk execution for resumable work: locks, atomic commits, done records, a bounded runner.

Used by the pipeline runner (:mod:`mspec.pipeline.runner`); the pieces are generic:

* :func:`atomic_write` — write a file so a reader sees the old or the new content, never a
  part (temporary file in the same directory, fsync, ``os.replace``);
* :class:`DirLock` — one writer per directory (``fcntl.flock``: the kernel drops the lock of
  a killed process, so a lock file left by ``kill -9`` is detected as stale and taken over);
* :class:`DoneRecords` — one small record per finished chunk, written only after the chunk's
  data are on disk, so a partly written chunk is never taken as done;
* :func:`run_bounded` — compute many per-chunk dask graphs with at most a few in flight,
  reporting each as it finishes.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

log = logging.getLogger("mspec.exec")

__all__ = [
    "LockError",
    "atomic_write",
    "DirLock",
    "DoneRecords",
    "run_bounded",
]


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
        Directory to lock (created); the lock file is ``<directory>/.lock``.
    what : str
        Named in the refusal message (``"run directory"``, ``"store"``).

    Raises
    ------
    LockError
        On :meth:`acquire` when a live process holds the lock (its pid, host and start time
        are in the message).
    """

    def __init__(self, directory, what: str = "run directory"):
        self.directory = Path(directory)
        self.path = self.directory / ".lock"
        self.what = what
        self._fh = None
        self.stale: dict | None = None

    def acquire(self) -> DirLock:
        import fcntl

        self.directory.mkdir(parents=True, exist_ok=True)
        fh = open(self.path, "a+")
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            fh.seek(0)
            holder = fh.read().strip() or "unknown process"
            fh.close()
            raise LockError(
                f"{self.what} {self.directory} is in use by another mspec process ({holder}); "
                "wait for it to finish or stop it"
            ) from None
        fh.seek(0)
        old = fh.read().strip()
        if old:
            # the previous holder died without releasing (kill -9): its lock is stale
            try:
                self.stale = json.loads(old)
            except ValueError:
                self.stale = {"holder": old}
            log.warning("taking over a stale lock of %s left by %s", self.directory, old)
        fh.seek(0)
        fh.truncate()
        fh.write(
            json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()})
        )
        fh.flush()
        self._fh = fh
        return self

    def release(self) -> None:
        if self._fh is None:
            return
        try:
            self._fh.seek(0)
            self._fh.truncate()
            self._fh.flush()
        finally:
            self._fh.close()
            self._fh = None
        try:
            self.path.unlink()
        except OSError:
            pass

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
        """Whether chunk ``[start, stop)`` finished (exactly that range)."""
        return self._path(start, stop).is_file()

    def mark(self, start: int, stop: int, info: dict | None = None) -> None:
        """Record chunk ``[start, stop)`` as finished (call only after its data are written)."""
        atomic_write(
            self._path(start, stop),
            json.dumps({"start": int(start), "stop": int(stop), **(info or {})}),
        )

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
    jobs: Sequence[tuple[object, object]],
    on_done: Callable[[object], None],
    *,
    client=None,
    scheduler: str | None = None,
    max_in_flight: int = 4,
    progress: Iterable | None = None,
) -> int:
    """Compute ``(key, dask collection)`` jobs with at most ``max_in_flight`` at a time.

    Parameters
    ----------
    jobs : sequence of (key, dask collection)
        One per chunk, e.g. a delayed region write.
    on_done : callable
        Called with ``key`` in the calling process after the job finished (write the done
        record here).
    client : distributed.Client, optional
        Cluster to run on; without one, jobs run one after another on ``scheduler``.
    scheduler : str, optional
        Local dask scheduler (``"threads"``, ``"sync"``, ``"processes"``) when no client.
    max_in_flight : int
        Jobs submitted at once (bounds memory: each holds about one chunk).
    progress : tqdm-like, optional
        ``update(1)`` is called per finished job.

    Returns
    -------
    int
        Jobs completed.
    """
    import dask

    done = 0
    if client is None:
        for key, job in jobs:
            dask.compute(job, scheduler=scheduler or "threads")
            on_done(key)
            done += 1
            if progress is not None:
                progress.update(1)
        return done

    from distributed import as_completed

    pending = list(jobs)[::-1]
    keys = {}
    ac = as_completed()

    def submit():
        key, job = pending.pop()
        fut = client.compute(job)
        keys[fut.key] = key
        ac.add(fut)

    for _ in range(min(max_in_flight, len(pending))):
        submit()
    for fut in ac:
        fut.result()  # re-raise a task's error here
        on_done(keys.pop(fut.key))
        fut.release()
        done += 1
        if progress is not None:
            progress.update(1)
        if pending:
            submit()
    return done
