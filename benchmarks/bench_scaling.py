"""How the whole pipeline (``mspec.run``) scales with spectra and with dask workers.

``setup_cache`` simulates one survey, writes it as LAMOST FITS and ingests the first
``n_spectra`` files into one store per size (chunks of ``CHUNK`` spectra), trains a model set
with the paper's ensemble size (10 CNN-TLMA members per class; one epoch: inference cost does
not depend on training) and warms the numba cache. It then runs ``mspec.run`` for every
(``n_spectra``, ``n_workers``) case on a fresh ``LocalCluster`` of ``n_workers``
single-threaded worker processes (the real PyHammer template set) and keeps the wall time of
the run and of each stage. A case takes minutes, so each runs once there and the ``track_*``
methods report what was measured (asv ``track`` benchmarks); ``benchmarks/report.py`` turns
them into the workers table of ``docs/benchmarks.md`` (scaling efficiency
t(1 worker) / (2 × t(2 workers))). ``bench_pipeline.Pipeline`` times one in-process run;
``benchmarks/survey_scale.py`` is the survey-scale run.
"""

import os
import shutil
import tempfile
import time
from pathlib import Path

from benchmarks._common import size

N_SPECTRA = size([200, 800], [12])
N_WORKERS = size([1, 2], [1])
CHUNK = size(100, 6)
STAGES = ("preprocess", "scm", "rvmm", "dgcm", "spmm", "catalog")


def _config(store, run_dir, models, cluster):
    from mspec.config import Config

    return Config.from_dict(
        {
            "store": str(store),
            "run_dir": str(run_dir),
            "chunk_size": CHUNK,
            "cluster": cluster,
            "models": {"dir": str(models)},
            "templates": {"set": "real"},
        }
    )


def _run_case(store: Path, models: Path, n_workers: int, work: Path) -> dict:
    import mspec

    run_dir = work / f"run-{n_workers}"
    shutil.rmtree(run_dir, ignore_errors=True)
    cfg = _config(store, run_dir, models, {"n_workers": n_workers, "threads_per_worker": 1})
    t0 = time.perf_counter()
    res = mspec.run(cfg)
    out = {"wall": time.perf_counter() - t0, "n_spectra": res.n_spectra}
    for name in STAGES:
        out[name] = float(res.stages.get(name, {}).get("seconds", float("nan")))
    shutil.rmtree(run_dir, ignore_errors=True)
    return out


class PipelineWorkers:
    """``mspec.run`` end to end on a LocalCluster: seconds and spectra/s per (spectra, workers)."""

    params = [N_SPECTRA, N_WORKERS]
    param_names = ["n_spectra", "n_workers"]
    timeout = 3600
    number = 1
    repeat = 1

    def setup_cache(self):
        import mspec
        from mspec.io import write_lamost_fits
        from mspec.io.store import ingest
        from mspec.pipeline.models import build_default_models
        from mspec.simulate import simulate_survey

        work = Path(tempfile.mkdtemp(prefix="mspec-bench-scaling-"))
        try:
            survey = simulate_survey(max(N_SPECTRA), seed=21)
            write_lamost_fits(survey, work / "fits", layout="image")
            files = sorted(str(p) for p in (work / "fits").glob("*.fits"))
            models = build_default_models(
                work / "models", n_train=size(1200, 200), epochs=1, folds=size(10, 2), seed=0
            )
            stores = {}
            for n in N_SPECTRA:
                stores[n] = work / f"s{n}.zarr"
                ingest(files[:n], str(stores[n]), chunk_size=CHUNK, client="sync")
            # compile / load the numba kernels once, outside the timed runs
            warm = _config(stores[min(N_SPECTRA)], work / "warm", models, {"scheduler": "sync"})
            mspec.run(warm, stages=["dgcm"])
            results = {"cpu_count": os.cpu_count()}
            for n in N_SPECTRA:
                for w in N_WORKERS:
                    results[f"{n}-{w}"] = _run_case(stores[n], models, w, work)
            return results
        finally:
            shutil.rmtree(work, ignore_errors=True)

    def track_seconds(self, results, n_spectra, n_workers):
        return results[f"{n_spectra}-{n_workers}"]["wall"]

    track_seconds.unit = "seconds"

    def track_spectra_per_second(self, results, n_spectra, n_workers):
        r = results[f"{n_spectra}-{n_workers}"]
        return r["n_spectra"] / r["wall"]

    track_spectra_per_second.unit = "spectra/s"

    def track_rvmm_seconds(self, results, n_spectra, n_workers):
        return results[f"{n_spectra}-{n_workers}"]["rvmm"]

    track_rvmm_seconds.unit = "seconds"
