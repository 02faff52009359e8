"""Survey-scale run: N simulated spectra through every pipeline stage that exists.

Measures, on the machine it runs on: wall time and core-seconds per spectrum per stage, peak
RSS per worker (sampled every 0.2 s), and graph tasks per chunk per stage. Training is
excluded (the models are built once beforehand, or taken from ``--models``).

    python benchmarks/survey_scale.py --n 10000 --out /tmp/survey-10k

writes ``OUT/survey_scale.json`` and prints a Markdown table for docs/benchmarks.md;
``python benchmarks/survey_scale.py --table A/survey_scale.json B/survey_scale.json`` prints
one table comparing several runs (e.g. 10k and 100k: is memory flat, is cost linear?).
Core-seconds are CPU time (the runner reads it from the driver and every worker process), so
they hold on a machine shared with other jobs; wall times do not.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path


def _simulate_fits(out: Path, n: int, batch: int, seed: int) -> list[str]:
    import numpy as np

    import mspec
    from mspec.io import write_lamost_fits

    cats = []
    for b, start in enumerate(range(0, n, batch)):
        d = out / "fits" / f"batch{b:04d}"
        cats.append(str(d / "catalog.parquet"))
        if (d / "catalog.parquet").is_file():
            continue
        m = min(batch, n - start)
        ds = mspec.simulate_survey(m, seed=seed + b)
        # unique obsids and file names across batches
        ds = ds.assign_coords(
            obsid=("spectra", np.arange(start, start + m, dtype=np.int64) + 10**9)
        )
        if "file" in ds:
            ds["file"] = ds["file"].astype(str).str.replace("spec-", f"spec-b{b:04d}-", n=1)
        write_lamost_fits(ds, d, layout="image")
    return cats


class _RSSSampler:
    """Peak RSS of every worker process and of this (driver + scheduler) process, and the
    peak of their sum (psutil), sampled in a thread."""

    def __init__(self, client, every: float = 0.2):
        import psutil

        self.procs = {addr: psutil.Process(pid) for addr, pid in client.run(os.getpid).items()}
        self.procs["driver"] = psutil.Process(os.getpid())
        self.peak = {a: 0 for a in self.procs}
        self.peak_total = 0
        self.every = every
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._loop, daemon=True)

    def _loop(self):
        while not self._stop.is_set():
            total = 0
            for a, p in self.procs.items():
                try:
                    rss = p.memory_info().rss
                except Exception:  # noqa: BLE001 - a restarted worker: keep what we have
                    continue
                self.peak[a] = max(self.peak[a], rss)
                total += rss
            self.peak_total = max(self.peak_total, total)
            time.sleep(self.every)

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()


def _tasks_per_chunk(cfg, models) -> dict:
    """Graph tasks per chunk of every stage, built (not computed) on the whole store."""
    import xarray as xr

    from mspec.io.store import open_store
    from mspec.pipeline.runner import _json_hook, _templates
    from mspec.pipeline.stages import PIPELINE, RunContext

    ds = open_store(cfg.store)
    nchunks = len(ds.chunks["spectra"])
    ctx = RunContext(config=cfg, models_dir=Path(models))
    ctx.templates, _ = _templates(cfg)
    full = ds
    out = {}
    for s in PIPELINE:
        stats = Path(cfg.run_dir) / "stages" / f"{s.name}.stats.json"
        if s.prepare is not None:  # the run's own population statistics
            ctx.stats[s.name] = json.loads(stats.read_text(), object_hook=_json_hook)
        res = s.build(ctx, full)
        graph = xr.Dataset(res.data_vars).__dask_graph__()
        out[s.name] = round(len(graph) / nchunks, 1)
        full = full.assign(res.data_vars)
    return out


def _total_memory() -> int:
    import psutil

    return psutil.virtual_memory().total


def markdown(results: list[dict]) -> str:
    """A Markdown table of one or more ``survey_scale.json`` results (one column each)."""
    results = sorted(results, key=lambda r: r["n_spectra"])
    head = "| | " + " | ".join(f"{r['n_spectra']:,} spectra" for r in results) + " |"
    lines = [head, "|---" * (len(results) + 1) + "|"]

    def row(label, fmt):
        lines.append(f"| {label} | " + " | ".join(fmt(r) for r in results) + " |")

    row("chunks of", lambda r: f"{r['chunk_size']:,}")
    row("simulate + write FITS (s)", lambda r: f"{r['simulate_and_write_fits_seconds']:,.0f}")
    row("`mspec.run` wall (s)", lambda r: f"{r['run_wall_seconds']:,.0f}")
    names = [k for k in results[-1]["stages"]]
    for name in names:

        def cell(r, name=name):
            st = r["stages"].get(name) or {}
            cs = st.get("core_seconds_per_spectrum")
            wall = st.get("seconds")
            if cs is None:
                return "—"
            return f"{1000 * cs:.1f} ({wall:,.0f} s wall)"

        row(f"{name}: core-ms / spectrum", cell)
    row(
        "**pipeline** (preprocess → SPMM): core-ms / spectrum",
        lambda r: f"**{1000 * r['pipeline_core_seconds_per_spectrum']:.1f}**",
    )
    row(
        "peak RSS per worker (MiB)",
        lambda r: ", ".join(
            str(v) for k, v in r["peak_rss_per_process_MB"].items() if k != "driver"
        ),
    )
    row("peak RSS driver + scheduler (MiB)", lambda r: str(r["peak_rss_per_process_MB"]["driver"]))
    row("peak RSS all processes together (MiB)", lambda r: f"{r['peak_rss_total_MB']:,}")
    for name in results[-1]["tasks_per_chunk"]:
        row(f"graph tasks per chunk: {name}", lambda r, name=name: str(r["tasks_per_chunk"][name]))
    row(
        "load average at the end",
        lambda r: " / ".join(map(str, r["machine"]["load_average_at_end"])),
    )
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=10000, help="spectra")
    p.add_argument("--out", required=True, help="working directory")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--chunk", type=int, default=1000, help="spectra per chunk")
    p.add_argument("--models", default="", help="model directory (default: build the default)")
    p.add_argument("--templates", default="real", help="template set: real or demo")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--batch", type=int, default=5000, help="spectra simulated at a time")
    p.add_argument("--table", nargs="+", metavar="JSON", help="only print a table of results")
    p.add_argument(
        "--save",
        default="",
        metavar="DIR",
        help="also copy the result to DIR/survey_scale_<n>.json (benchmarks/report.py reads "
        "benchmarks/results/survey_scale/)",
    )
    args = p.parse_args(argv)
    if args.table:
        text = markdown([json.loads(Path(f).read_text()) for f in args.table])
        print(text)
        return {"table": text}

    from distributed import Client, LocalCluster

    import mspec
    from mspec.config import Config
    from mspec.pipeline.models import build_default_models

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    # in a child process, so the driver's memory measured below is the run's alone
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        cats = pool.submit(_simulate_fits, out, args.n, min(5000, args.batch), args.seed).result()
    t_sim = time.perf_counter() - t0
    models = args.models or str(build_default_models())
    cfg = Config.from_dict(
        {
            "sources": cats,
            "store": str(out / "spectra.zarr"),
            "run_dir": str(out / "run"),
            "chunk_size": args.chunk,
            "models": {"dir": models},
            "templates": {"set": args.templates},
        }
    )
    from mspec._exec import lean_dask_config

    with (
        lean_dask_config(),  # as mspec.run and the CLI start their clusters
        LocalCluster(
            n_workers=args.workers,
            threads_per_worker=1,
            dashboard_address="127.0.0.1:0",
            memory_limit="auto",
        ) as cluster,
        Client(cluster) as client,
        _RSSSampler(client) as rss,
    ):
        t0 = time.perf_counter()
        res = mspec.run(cfg, client=client, progress=True)
        wall = time.perf_counter() - t0
    n = res.n_spectra
    # the runner measures each stage's CPU time over the driver and every worker process
    stages = {
        name: {
            k: info.get(k)
            for k in (
                "seconds",
                "cpu_seconds",
                "core_seconds_per_spectrum",
                "driver_peak_rss_MiB",
                "driver_rss_MiB",
                "workers_peak_rss_MiB",
            )
        }
        for name, info in res.stages.items()
    }
    result = {
        "n_spectra": n,
        "workers": args.workers,
        "chunk_size": args.chunk,
        "templates": args.templates,
        "simulate_and_write_fits_seconds": round(t_sim, 1),
        "run_wall_seconds": round(wall, 1),
        "stages": stages,
        "pipeline_core_seconds_per_spectrum": sum(
            v["core_seconds_per_spectrum"] or 0.0
            for k, v in stages.items()
            if k not in ("ingest", "catalog")
        ),
        "peak_rss_per_process_MB": {a: round(v / 2**20) for a, v in rss.peak.items()},
        "peak_rss_total_MB": round(rss.peak_total / 2**20),
        "tasks_per_chunk": _tasks_per_chunk(cfg, models),
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "memory_GiB": round(_total_memory() / 2**30, 1),
            "python": platform.python_version(),
            "mspec": mspec.__version__,
            "load_average_at_end": [round(x, 1) for x in os.getloadavg()],
        },
    }
    (out / "survey_scale.json").write_text(json.dumps(result, indent=1))
    if args.save:
        Path(args.save).mkdir(parents=True, exist_ok=True)
        (Path(args.save) / f"survey_scale_{n}.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    print(markdown([result]))
    return result


if __name__ == "__main__":
    main()
