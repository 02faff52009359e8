"""Ingest throughput (files/s) and peak memory against the number of files.

``setup_cache`` writes one simulated LAMOST FITS "survey" (image layout, one file per spectrum)
once; each case ingests the first ``n_files`` of it into a fresh store. ``Ingest`` uses dask's
threaded scheduler on every core (the ``client=None`` default); ``IngestOneCore`` uses the
synchronous scheduler, so its rate is the per-core rate (goal: >= 200 files/s per core).
Peak memory should stay flat as ``n_files`` grows: the store is written chunk by chunk.
"""

import os
import shutil
import tempfile
import time
import uuid
from pathlib import Path

from benchmarks._common import size
from mspec.io import write_lamost_fits
from mspec.io.store import ingest

N_FILES = size([250, 1000, 4000], [8])
CHUNK = size(500, 4)


def _make_survey(directory: Path, n: int) -> None:
    from mspec.simulate import simulate_survey

    ds = simulate_survey(n, seed=11)
    write_lamost_fits(ds, directory, layout="image", catalog=None, overwrite=True)


class _Base:
    params = [N_FILES]
    param_names = ["n_files"]
    timeout = 1200
    number = 1
    repeat = 3
    scheduler = "threads"

    def setup_cache(self):
        d = Path(tempfile.gettempdir()) / f"mspec-bench-ingest-{max(N_FILES)}"
        marker = d / ".complete"
        if not marker.exists():
            shutil.rmtree(d, ignore_errors=True)
            _make_survey(d, max(N_FILES))
            marker.touch()
        return str(d)

    def setup(self, directory, n_files):
        files = sorted(str(p) for p in Path(directory).glob("*.fits"))
        self.sources = files[:n_files]
        self.tmp = Path(tempfile.mkdtemp(prefix="mspec-bench-store-"))

    def teardown(self, directory, n_files):
        shutil.rmtree(self.tmp, ignore_errors=True)

    def _ingest(self):
        store = self.tmp / f"{uuid.uuid4().hex}.zarr"
        return ingest(self.sources, store, chunk_size=CHUNK, client=self.scheduler)

    def time_ingest(self, directory, n_files):
        self._ingest()

    def peakmem_ingest(self, directory, n_files):
        self._ingest()

    def track_files_per_s(self, directory, n_files):
        t0 = time.perf_counter()
        summary = self._ingest()
        return summary["stored"] / (time.perf_counter() - t0)

    track_files_per_s.unit = "files/s"

    def track_files_per_s_per_core(self, directory, n_files):
        cores = 1 if self.scheduler == "sync" else (os.cpu_count() or 1)
        return self.track_files_per_s(directory, n_files) / cores

    track_files_per_s_per_core.unit = "files/s/core"


class Ingest(_Base):
    scheduler = "threads"


class IngestOneCore(_Base):
    scheduler = "sync"
