"""The whole pipeline (``mspec.run``) on a simulated store: time, per-stage cost, graph size.

Runs in-process on the threaded scheduler with one thread (so ``peakmem_`` sees all the
memory and core-seconds equal wall seconds). The survey-scale run on a LocalCluster
(100k spectra, RSS per worker) is ``benchmarks/survey_scale.py``.
"""

import shutil
import tempfile
from pathlib import Path

from benchmarks._common import size

N = size(2000, 48)
CHUNK = size(500, 16)


def _config(store, run_dir, models):
    from mspec.config import Config

    return Config.from_dict(
        {
            "store": str(store),
            "run_dir": str(run_dir),
            "chunk_size": CHUNK,
            "cluster": {"scheduler": "sync"},
            "models": {"dir": str(models)},
            "templates": {"set": "real"},
        }
    )


class Pipeline:
    timeout = 3600
    number = 1
    repeat = 1

    def setup_cache(self):
        from mspec.testing import tiny_models, tiny_survey_store

        root = Path(tempfile.mkdtemp(prefix="mspec-bench-pipeline-"))
        store = tiny_survey_store(root, N, seed=3, chunk_size=CHUNK)
        models = tiny_models(root / "models")
        # warm the numba cache so compilation is not timed
        from mspec import run

        run(_config(store, root / "warm", models), stages=["dgcm"])
        return str(store), str(models), str(root)

    def setup(self, cache):
        store, models, root = cache
        self.run_dir = Path(root) / "run"
        shutil.rmtree(self.run_dir, ignore_errors=True)
        self.cfg = _config(store, self.run_dir, models)

    def time_run(self, cache):
        from mspec import run

        run(self.cfg)

    def peakmem_run(self, cache):
        from mspec import run

        run(self.cfg)

    def track_core_ms_per_spectrum(self, cache):
        from mspec import run

        res = run(self.cfg)
        stages = [s for s in res.stages.values() if "computed" in s]
        # CPU time measured by the runner (wall where it could not be read)
        return (
            1000.0
            * sum(
                s["cpu_seconds"] if s.get("cpu_seconds") is not None else s["seconds"]
                for s in stages
            )
            / res.n_spectra
        )

    track_core_ms_per_spectrum.unit = "ms"

    def track_tasks_per_chunk(self, cache):
        import xarray as xr

        from mspec.io.store import open_store
        from mspec.pipeline.runner import _templates
        from mspec.pipeline.stages import PIPELINE, RunContext

        ds = open_store(self.cfg.store)
        ctx = RunContext(config=self.cfg, models_dir=Path(self.cfg.models.dir))
        ctx.templates, _ = _templates(self.cfg)
        total = 0
        for s in PIPELINE:
            if s.prepare is not None:  # population statistics (computed, not counted)
                ctx.stats[s.name] = s.prepare(ctx, ds)
            out = s.build(ctx, ds)
            total += len(xr.Dataset(out.data_vars).__dask_graph__())
            ds = ds.assign(out.data_vars)
        return total / len(ds.chunks["spectra"])

    track_tasks_per_chunk.unit = "tasks"
