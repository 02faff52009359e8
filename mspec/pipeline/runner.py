"""``mspec.run``: the whole pipeline, resumable, on any Dask cluster.

Order (the paper's): ingest → preprocess → SCM → DGCM → RVMM → SPMM → catalog. Each stage's
outputs go to ``RUN/stages/<name>.zarr`` by region writes, one ``spectra`` chunk at a time; a
done record (``RUN/stages/<name>.done/<start>-<stop>.json``) is written only after the chunk's
data are on disk. A rerun skips finished chunks, so a run killed at any moment resumes and
gives bitwise-identical outputs. Each stage is stamped (``RUN/stages/<name>.json``) with its
version, the hashes of the config sections it depends on, the models and the template set;
a stage whose stamp changed refuses to resume unless it is redone (``redo=``), which also
redoes everything downstream. One process at a time may run in a run directory (a lock;
a stale lock left by a killed run is taken over).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import sys
import time
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import xarray as xr

from mspec._exec import (
    LOCAL_SCHEDULERS,
    DirLock,
    DoneRecords,
    atomic_write,
    chunk_ranges,
    clean_partials,
    lean_dask_config,
    release_memory,
    run_bounded,
    tidy_dask,
)
from mspec.pipeline.stages import CATALOG_PLANNED, PIPELINE, PipelineStage, RunContext

log = logging.getLogger("mspec.run")

__all__ = ["run", "RunResult", "RunError", "StageChangedError", "run_status", "EXIT_CODES"]

#: CLI exit codes of ``mspec run`` (documented in docs/cli.md).
EXIT_CODES = {
    0: "run complete",
    1: "a stage failed (see the log in the run directory)",
    2: "bad arguments or configuration",
    3: "refused: the run directory or store is locked by another live process",
    4: "refused: a stage's version or configuration changed (use --redo STAGE)",
}


class RunError(RuntimeError):
    """A run could not proceed (the message says why)."""


class StageChangedError(RunError):
    """A stage's version, configuration, models or templates differ from the persisted ones."""


@dataclass
class RunResult:
    """What a run did.

    Attributes
    ----------
    run_dir : str
        The run directory.
    n_spectra : int
        Spectra in the store.
    stages : dict
        Per stage: ``status`` (done / not available), ``chunks``, ``computed``, ``skipped``,
        ``seconds`` (wall), ``cpu_seconds`` (CPU time of this process and every worker
        process during the stage; None if unmeasurable), ``core_seconds_per_spectrum``
        (``cpu_seconds`` per spectrum computed, else wall × worker threads per spectrum) and
        the parts not available.
    not_available : list of str
        Parts of the paper's pipeline not built in this mspec (never faked).
    catalog : str
        Path of the per-spectrum table (Parquet).
    seconds : float
        Wall time.
    ingest : dict
        Ingest summary (empty when no sources were given).
    report : str
        Path of the HTML run report (``RUN/report/index.html``; empty if it failed).
    catalogs : dict
        The paper's catalogs written as Parquet under ``RUN/catalog/`` (name -> path):
        M_Catalog_V0..V3, recommended, non_M_Catalog (:func:`mspec.catalog.build_catalog`).
    """

    run_dir: str
    n_spectra: int = 0
    stages: dict = field(default_factory=dict)
    not_available: list = field(default_factory=list)
    catalog: str = ""
    seconds: float = 0.0
    ingest: dict = field(default_factory=dict)
    report: str = ""
    catalogs: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


# --------------------------------------------------------------------------- helpers


def _sha(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def _templates(cfg) -> tuple[xr.Dataset, str]:
    from mspec.rv.templates import default_templates

    name = cfg.templates.set
    if name == "real":
        lib = default_templates("real")
    elif name == "demo":
        from mspec.simulate import simulated_templates

        lib = simulated_templates()
    else:
        lib = xr.open_zarr(name).load()
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(lib["template_flux"].values, dtype=np.float64).tobytes())
    h.update(np.ascontiguousarray(lib["template_wavelength"].values, dtype=np.float64).tobytes())
    h.update("\n".join(map(str, lib["template_name"].values)).encode())
    return lib, h.hexdigest()


def _stage_paths(run_dir: Path, name: str) -> dict[str, Path]:
    base = run_dir / "stages"
    return {
        "group": base / f"{name}.zarr",
        "done": base / f"{name}.done",
        "stamp": base / f"{name}.json",
        "stats": base / f"{name}.stats.json",
    }


def _json_default(o):
    if isinstance(o, np.ndarray):
        return {"__ndarray__": o.tolist(), "dtype": str(o.dtype)}
    if isinstance(o, np.generic):
        return o.item()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def _json_hook(d):
    if "__ndarray__" in d:
        return np.asarray(d["__ndarray__"], dtype=d["dtype"])
    return d


def _stage_stats(stage, ctx, ds_in, paths) -> dict:
    """A stage's population statistics: computed once, then reused when resuming."""
    path = paths["stats"]
    if path.is_file() and paths["stamp"].is_file():
        return json.loads(path.read_text(), object_hook=_json_hook)
    stats = stage.prepare(ctx, ds_in)
    # NaN/inf are valid JSON numbers for Python's json module (allow_nan)
    atomic_write(path, json.dumps(stats, default=_json_default, indent=1))
    stats = json.loads(path.read_text(), object_hook=_json_hook)  # the same on resume
    log.info("stage %s: population statistics computed over %d spectra", stage.name,
             ds_in.sizes["spectra"])  # fmt: skip
    return stats


def _wipe_stage(run_dir: Path, name: str) -> None:
    p = _stage_paths(run_dir, name)
    p["stats"].unlink(missing_ok=True)
    shutil.rmtree(p["group"], ignore_errors=True)
    shutil.rmtree(p["done"], ignore_errors=True)
    p["stamp"].unlink(missing_ok=True)


def _stamp(stage: PipelineStage, ctx: RunContext, chunk: int, upstream: dict) -> dict:
    cfg = ctx.config
    return {
        "stage": stage.name,
        "version": stage.full_version(),
        "chunk_size": int(chunk),
        "config": {s: cfg.section_hash(s) for s in stage.sections},
        "models": {
            k: _sha({p: h for p, h in ctx.model_hashes.items() if p.startswith(f"{k}/")})
            for k in stage.uses_models
        },
        "templates": ctx.templates_hash if stage.uses_templates else "",
        "decisions": ctx.decisions_hash if stage.uses_decisions else "",
        "upstream": {n: upstream[n] for n in stage.needs},
    }


def _differences(old: dict, new: dict) -> list[str]:
    what = []
    if old.get("version") != new["version"]:
        what.append(f"version {old.get('version')!r} -> {new['version']!r}")
    if old.get("chunk_size") != new["chunk_size"]:
        what.append(f"chunk size {old.get('chunk_size')} -> {new['chunk_size']}")
    for sec, h in new["config"].items():
        if old.get("config", {}).get(sec) != h:
            what.append(f"config section [{sec}]")
    for k, h in new["models"].items():
        if old.get("models", {}).get(k) != h:
            what.append(f"model {k!r}")
    if old.get("templates", "") != new["templates"]:
        what.append("template set")
    if old.get("decisions", "") != new.get("decisions", ""):
        what.append("reviewers' decisions (review/decisions.csv)")
    for n, h in new["upstream"].items():
        if old.get("upstream", {}).get(n) != h:
            what.append(f"upstream stage {n!r}")
    return what


def _open_cluster(cfg, client, stack: ExitStack):
    """(client or None, local scheduler name or None)."""
    if client is not None:
        return client, None
    sched = cfg.cluster.scheduler
    if sched in LOCAL_SCHEDULERS:
        return None, sched
    from distributed import Client

    if sched:
        log.info("connecting to the dask scheduler at %s", sched)
        return stack.enter_context(Client(sched)), None
    from distributed import LocalCluster

    n = cfg.cluster.n_workers or (os.cpu_count() or 1)
    mem = cfg.cluster.memory_limit
    cluster = stack.enter_context(
        LocalCluster(
            n_workers=n,
            threads_per_worker=cfg.cluster.threads_per_worker,
            memory_limit=None if mem == "0" else mem,
            dashboard_address="127.0.0.1:0",
            processes=True,
            silence_logs=logging.WARNING,
        )
    )
    c = stack.enter_context(Client(cluster))
    log.info("LocalCluster: %d workers, dashboard %s", n, c.dashboard_link)
    return c, None


def _with_upstream(ds: xr.Dataset, run_dir: Path, names, n: int) -> xr.Dataset:
    from mspec.io.zarrio import read_results

    for name in names:
        up = read_results(_stage_paths(run_dir, name)["group"]).isel(spectra=slice(0, n))
        up = up.drop_vars([c for c in ("obsid",) if c in up.variables])
        # sorted: a Zarr group lists its arrays in directory order, which on a small ext4 or
        # xfs directory is creation order (random: arrays are created concurrently); the
        # catalog's columns must not depend on it (issue 17, identical catalogs)
        ds = ds.assign({v: up[v] for v in sorted(up.data_vars) if v not in ds})
        extra = {c: up[c] for c in up.coords if c not in ds.coords and c not in up.dims}
        if extra:
            ds = ds.assign_coords(extra)
    return ds


def _prepare_group(path: Path, out: xr.Dataset, n: int) -> None:
    """Create the stage's Zarr group (metadata and non-spectra variables) or grow it to n."""
    import zarr

    from mspec.io.zarrio import encode_strings

    if path.exists():
        group = zarr.open_group(str(path), mode="r+")
        for _name, arr in group.arrays():
            dims = tuple(arr.metadata.dimension_names or ())
            if "spectra" in dims:
                ax = dims.index("spectra")
                if arr.shape[ax] != n:
                    shape = list(arr.shape)
                    shape[ax] = n
                    arr.resize(tuple(shape))
        return
    tmp = path.with_name(path.name + ".init")
    shutil.rmtree(tmp, ignore_errors=True)
    enc = encode_strings(out)
    for var in enc.variables.values():
        var.encoding.pop("chunks", None)
        var.encoding.pop("preferred_chunks", None)
    enc.to_zarr(str(tmp), mode="w", compute=False, consolidated=False, zarr_format=3)
    os.replace(tmp, path)  # the group appears complete or not at all


def _region_job(out: xr.Dataset, path: Path, start: int, stop: int):
    from mspec.io.zarrio import encode_strings

    piece = out.isel(spectra=slice(start, stop))
    piece = piece.drop_vars([v for v in piece.variables if "spectra" not in piece[v].dims])
    piece = encode_strings(piece)
    for var in piece.variables.values():
        var.encoding.pop("chunks", None)
        var.encoding.pop("preferred_chunks", None)
    return piece.to_zarr(
        str(path),
        region={"spectra": slice(start, stop)},
        compute=False,
        consolidated=False,
        zarr_format=3,
    )


def _fault_delay() -> float:
    # test hook (fault-injection tests): seconds to pause after each committed chunk
    try:
        return float(os.environ.get("MSPEC_TEST_CHUNK_DELAY", "0"))
    except ValueError:
        return 0.0


def _peak_rss() -> float | None:
    """Peak RSS of the calling process so far (MiB; a high-water mark: recorded after each
    stage for the driver and every worker, it shows which phase raised a process's memory),
    None where the OS does not say."""
    try:
        import resource
    except ImportError:  # pragma: no cover - not on POSIX
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (2**20 if sys.platform == "darwin" else 1024), 1)  # bytes / KiB


def _workers_peak_rss(client) -> dict[str, float] | None:
    """Peak RSS so far of every worker process of ``client`` (MiB by worker address; high-
    water marks, :func:`_peak_rss`), None without a client or an answer."""
    if client is None:
        return None
    try:
        return {str(k): v for k, v in sorted(client.run(_peak_rss).items())}
    except Exception:  # noqa: BLE001 - a memory figure must never fail a run
        return None


def _memory_marks(client) -> dict:
    """The memory marks recorded in run.json after a phase: the driver's and every worker's
    peak RSS so far, and the driver's RSS now, i.e. what the next phase starts from (MiB)."""
    return {
        "driver_peak_rss_MiB": _peak_rss(),
        "driver_rss_MiB": _rss(),
        "workers_peak_rss_MiB": _workers_peak_rss(client),
    }


def _rss() -> float | None:
    """RSS of the calling process now (MiB), None where psutil cannot say."""
    try:
        import psutil

        return round(psutil.Process().memory_info().rss / 2**20, 1)
    except Exception:  # noqa: BLE001 - a diagnostic only
        return None


def _process_cpu() -> tuple[int, float]:
    """(pid, CPU seconds used so far) of the calling process; run on every worker."""
    t = os.times()
    return os.getpid(), t.user + t.system


def _cpu_seconds(client) -> float | None:
    """CPU seconds used so far by this process and every worker process of ``client``.

    Differences of this give a stage's cost in core-seconds whatever else runs on the
    machine (wall time × workers counts the waiting too). None when a worker cannot be
    asked."""
    pids = dict([_process_cpu()])
    if client is not None:
        try:
            pids.update(dict(client.run(_process_cpu).values()))
        except Exception:  # noqa: BLE001 - a cost figure must never fail a run
            return None
    return float(sum(pids.values()))


def _n_threads(client) -> int:
    """Worker threads of ``client`` (1 without one)."""
    if client is None:
        return 1
    return max(1, sum(client.nthreads().values()))


def _core_seconds(cpu0, cpu1, secs, workers, n) -> dict:
    """``cpu_seconds`` and ``core_seconds_per_spectrum`` of a stage over ``n`` spectra:
    measured CPU time where both readings exist (and a worker did not restart in between),
    else wall time × workers."""
    cpu = cpu1 - cpu0 if cpu0 is not None and cpu1 is not None and cpu1 >= cpu0 else None
    total = cpu if cpu is not None else secs * workers
    return {
        "cpu_seconds": None if cpu is None else round(cpu, 2),
        "core_seconds_per_spectrum": round(total / n, 5) if n else None,
    }


def _run_stage(stage, ctx, run_dir, ds_store, n, chunk, client, scheduler, progress, upstream):
    paths = _stage_paths(run_dir, stage.name)
    stamp = _stamp(stage, ctx, chunk, upstream)
    if paths["stamp"].is_file():
        old = json.loads(paths["stamp"].read_text())
        diff = _differences(old, stamp)
        if diff:
            raise StageChangedError(
                f"stage {stage.name!r} ({stage.module}) was computed with a different "
                f"{', '.join(diff)}; refusing to resume. Rerun with --redo {stage.name} "
                f"(recomputes it and every stage that needs it)"
            )
    else:
        # no stamp: any group or records are leftovers of an interrupted first start
        _wipe_stage(run_dir, stage.name)
    ds_in = _with_upstream(ds_store, run_dir, stage.needs, n)
    if stage.prepare is not None:
        ctx.stats[stage.name] = _stage_stats(stage, ctx, ds_in, paths)
    out = stage.build(ctx, ds_in)
    out = out.drop_vars([c for c in ("loglam",) if c in out.coords])
    _prepare_group(paths["group"], out, n)
    atomic_write(paths["stamp"], json.dumps(stamp, indent=1, sort_keys=True))
    records = DoneRecords(paths["done"])
    ranges = chunk_ranges(n, chunk)
    todo = [(a, b) for a, b in ranges if not records.is_done(a, b)]
    # records of ranges that no longer exist (the last chunk grew after an append) go
    for a, b in records.ranges():
        if (a, b) not in ranges:
            (paths["done"] / f"{a:012d}-{b:012d}.json").unlink(missing_ok=True)
    # built as they are submitted: holding every chunk's region-write graph at once grew
    # the driver with the survey
    jobs = (((a, b), _region_job(out, paths["group"], a, b)) for a, b in todo)
    cpu0 = _cpu_seconds(client) if todo else None
    t0 = time.perf_counter()
    bar = None
    if progress and todo:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(todo), desc=f"{stage.name:<10}", unit="chunk", leave=True)
    delay = _fault_delay()

    def done(key, _result):
        a, b = key
        records.mark(a, b, {"stage": stage.name, "time": time.time()})
        if delay:
            time.sleep(delay)

    workers = _n_threads(client)
    try:
        run_bounded(
            jobs,
            done,
            client=client,
            scheduler=scheduler,
            max_in_flight=2 * workers,
            progress=bar,
            span=f"mspec-{stage.name}",
        )
    finally:
        if bar is not None:
            bar.close()
    secs = time.perf_counter() - t0
    cost = _core_seconds(
        cpu0, _cpu_seconds(client) if todo else None, secs, workers, sum(b - a for a, b in todo)
    )
    info = {
        "module": stage.module,
        "status": "done",
        "steps": list(stage.steps),
        "version": stage.full_version(),
        "chunks": len(ranges),
        "computed": len(todo),
        "skipped": len(ranges) - len(todo),
        "seconds": round(secs, 2),
        **cost,
        "not_available": stage.unavailable(),
        **_memory_marks(client),
    }
    return info, _sha(stamp)


#: Leading columns of the run catalog, in this order; every other per-spectrum variable
#: follows in store / stage order (truth columns of simulated surveys last).
CATALOG_ORDER = (
    "obsid", "ra", "dec", "mjd", "lmjd", "snr_u", "snr_g", "snr_r", "snr_i", "snr_z",
    "orp_u", "orp_g", "orp_r", "orp_i", "orp_z", "lamost_class", "lamost_subclass",
    "lamost_rv", "spt_class", "wdm_class", "is_m", "scm_class", "scm_prob", "scm_reason",
    "dmgm_class", "luminosity_class", "dgcm_prob", "dgcm_reason", "M_G_0", "bp_rp_0", "W1_W2_0",
    "CMD_flag", "CMD_pos", "rv_tm", "rv_tm_err",
    "rv_tm_err_stat", "tm_template", "tm_status", "rv_tml7500", "rv_tml7500_err",
    "tml7500_status", "rv", "rv_err", "rv_from", "rv_flag", "rv_inspect", "rv_dsal1", "rv_dsal1_err", "rv_dsal2", "rv_dsal2_err", "rv_dsel",
    "rv_dsel_err", "teff", "teff_err", "logg", "logg_err", "m_h", "m_h_err", "alpha_m",
    "alpha_m_err",
)  # fmt: skip
_TLMA = ("teff", "teff_err", "logg", "logg_err", "m_h", "m_h_err", "alpha_m", "alpha_m_err")


def catalog_columns(names) -> list[str]:
    """Order per-spectrum columns: :data:`CATALOG_ORDER`, then the rest, ``true_*`` last."""
    names = list(dict.fromkeys(names))
    head = [c for c in CATALOG_ORDER if c in names]
    rest = [c for c in names if c not in head and not c.startswith("true_")]
    truth = [c for c in names if c.startswith("true_")]
    return [*head, *rest, *truth]


def _catalog(run_dir: Path, ds_store: xr.Dataset, n: int) -> Path:
    """Per-spectrum table of the store metadata and every stage's per-spectrum outputs.

    CNN-TLMA parameters are kept only for spectra SCM decides are M (``is_m``; without SCM's
    decision: CNN-SPT says M and CNN-WDM not WD); elsewhere they are NaN. Units go to the Parquet metadata
    (key ``mspec_units``: column -> unit).
    """
    from mspec.catalog import per_spectrum_table

    names = [s.name for s in PIPELINE if _stage_paths(run_dir, s.name)["group"].exists()]
    # names and units only (lazy); the values come from per_spectrum_table: one task per
    # chunk, not one per variable and chunk
    ds = _with_upstream(ds_store, run_dir, names, n)
    cols = [
        str(v)
        for v in ds.variables
        if ds[v].dims == ("spectra",) and v not in ("flux", "ivar", "andmask", "ormask")
    ]
    table, _notes = per_spectrum_table(run_dir)
    have = set(table.columns)
    if "teff" in have and ("is_m" in have or "spt_class" in have):
        if "is_m" in have:  # SCM's decision
            is_m = table["is_m"].fillna(False).astype(bool)
        else:
            is_m = table["spt_class"] == "M"
            if "wdm_class" in have:
                is_m = is_m & (table["wdm_class"] != "WD")
        table = table.assign(**{v: table[v].where(is_m) for v in _TLMA if v in have})
    order = [c for c in catalog_columns(cols) if c in have]
    units = {c: str(ds[c].attrs.get("units", "")) for c in order if c in ds.variables}
    df = table[order]
    out = run_dir / "catalog" / "catalog.parquet"
    shutil.rmtree(out, ignore_errors=True)
    df.to_parquet(
        str(out),
        write_index=False,
        custom_metadata={"mspec_units": json.dumps(units), "mspec_columns": json.dumps(order)},
    )
    return out


# --------------------------------------------------------------------------- public


@contextmanager
def _no_space_is_run_error(what: str, where):
    """A full disk (ENOSPC/EDQUOT, also from a dask worker or pyarrow) becomes a one-line
    :class:`RunError` (issue 17); finished chunks keep their done records, so a rerun after
    freeing space resumes and gives identical outputs."""
    import errno

    try:
        yield
    except OSError as exc:
        full = exc.errno in (errno.ENOSPC, errno.EDQUOT) or "No space left" in str(exc)
        if not full:
            raise
        raise RunError(
            f"{what}: no space left on the device holding {where}; free some space and "
            "rerun the same command (finished chunks are kept)"
        ) from None


def run(
    config,
    *,
    redo=(),
    client=None,
    progress: bool = False,
    stages=None,
) -> RunResult:
    """Run the pipeline described by ``config`` (resumable).

    Parameters
    ----------
    config : mspec.config.Config or path-like
        The run configuration, or the path of its TOML file.
    redo : iterable of str
        Stages to recompute from scratch, with every stage that needs them.
    client : distributed.Client, optional
        Use this cluster (otherwise the config's ``[cluster]``: a scheduler address, a local
        scheduler name ``threads``/``sync``/``processes``, or a new LocalCluster).
    progress : bool
        Show a progress bar per stage.
    stages : iterable of str, optional
        Run only up to and including these stages (default all).

    Returns
    -------
    RunResult

    Raises
    ------
    mspec.config.ConfigError
        Bad configuration.
    mspec._exec.LockError
        Another live run holds the run directory.
    StageChangedError
        A persisted stage differs in version/config/models/templates (use ``redo``).
    RunError
        Nothing to process (no store and no sources, or sources that match nothing).
    """
    from mspec.config import Config, load_config, save_resolved

    cfg = config if isinstance(config, Config) else load_config(config)
    cfg.check_complete()
    # relative paths mean "from here": make them absolute so the saved config, the report
    # and the catalogs (which reload it from the run directory) see the same files
    cfg = Config.from_dict(cfg.to_dict(), source="<run>", base_dir=Path.cwd())
    known = [s.name for s in PIPELINE]
    redo = [redo] if isinstance(redo, str) else list(redo)
    for r in redo:
        if r not in known:
            raise ValueError(f"redo: unknown stage {r!r}; stages are {known}")
    if stages is not None:
        stages = [stages] if isinstance(stages, str) else list(stages)
        for s in stages:
            if s not in known:
                raise ValueError(f"stages: unknown stage {s!r}; stages are {known}")
    run_dir = Path(cfg.run_dir)
    t_start = time.perf_counter()
    with ExitStack() as stack:
        stack.enter_context(DirLock(run_dir, "run directory"))
        handler = logging.FileHandler(run_dir / "run.log")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logging.getLogger("mspec").addHandler(handler)
        stack.callback(logging.getLogger("mspec").removeHandler, handler)
        stack.callback(handler.close)
        clean_partials(run_dir)
        save_resolved(cfg, run_dir)
        if not cfg.numba.cache:
            os.environ["MSPEC_NUMBA_CACHE"] = "0"
        if cfg.numba.cache_dir:
            os.environ["MSPEC_NUMBA_CACHE_DIR"] = cfg.numba.cache_dir
        result = RunResult(run_dir=str(run_dir))
        stack.enter_context(lean_dask_config())  # before any cluster or client starts
        client, scheduler = _open_cluster(cfg, client, stack)
        if cfg.sources:
            from mspec.io.store import ingest

            cpu0 = _cpu_seconds(client)
            t0 = time.perf_counter()
            with _no_space_is_run_error("ingest", cfg.store):
                summary = ingest(
                    list(cfg.sources),
                    cfg.store,
                    chunk_size=cfg.chunk_size,
                    client=client if client is not None else scheduler,
                    progress=progress,
                )
            result.ingest = {k: v for k, v in summary.items()}
            result.stages["ingest"] = {
                "module": "ingest",
                "status": "done",
                "seconds": round(time.perf_counter() - t0, 2),
                **_core_seconds(
                    cpu0,
                    _cpu_seconds(client),
                    time.perf_counter() - t0,
                    _n_threads(client),
                    summary.get("stored") or 0,
                ),  # fmt: skip
                "stored": summary.get("stored"),
                "quarantined": summary.get("quarantined"),
                **_memory_marks(client),
            }
            log.info("ingest: %s", summary)
            release_memory()
        elif not Path(cfg.store).exists():
            raise RunError(f"store {cfg.store} does not exist and the config gives no sources")
        from mspec.io.store import open_store, store_state

        ds = open_store(cfg.store)
        n = int(ds.sizes["spectra"])
        if n == 0:
            raise RunError(f"store {cfg.store} holds no spectra (did the sources match files?)")
        chunk = int(store_state(cfg.store)["chunk_size"])
        if chunk != cfg.chunk_size:
            log.info("store %s has chunks of %d spectra (config: %d); using the store's",
                     cfg.store, chunk, cfg.chunk_size)  # fmt: skip
        result.n_spectra = n
        ctx = RunContext(config=cfg)
        selected = PIPELINE
        if stages is not None:
            last = max(known.index(s) for s in stages)
            selected = PIPELINE[: last + 1]
        if any(s.uses_models for s in selected):
            ctx.models_dir = _models(cfg)
            from mspec.pipeline.models import model_hashes

            ctx.model_hashes = model_hashes(ctx.models_dir)
        if any(s.uses_templates for s in selected):
            ctx.templates, ctx.templates_hash = _templates(cfg)
        ctx.decisions, ctx.decisions_hash = _decisions(run_dir, ds)
        _record_inputs(run_dir, ctx)
        # --redo: the named stages and every stage that needs them
        if redo:
            from mspec.pipeline.stages import downstream

            for name in downstream(redo):
                log.info("redo: removing the outputs of stage %s", name)
                _wipe_stage(run_dir, name)
        upstream: dict[str, str] = {}
        for stage in selected:
            log.info("stage %s (%s): %s", stage.name, stage.module, ", ".join(stage.steps))
            with _no_space_is_run_error(f"stage {stage.name}", run_dir):
                info, stamp_hash = _run_stage(
                    stage, ctx, run_dir, ds, n, chunk, client, scheduler, progress, upstream
                )
            upstream[stage.name] = stamp_hash
            result.stages[stage.name] = info
            release_memory()  # each phase starts from what the run holds, not the last peak
            for part in info["not_available"]:
                result.not_available.append(f"{stage.module}: {part}")
            log.info(
                "stage %s: %d chunks computed, %d already done, %.1f s",
                stage.name, info["computed"], info["skipped"], info["seconds"],
            )  # fmt: skip
        from mspec.pipeline.stages import has_gaia

        if not has_gaia(ctx, ds):
            result.not_available.append(
                "CMD: no Gaia data (no Gaia columns in the store and no [gaia] table or hats catalogue): "
                "SCM/DGCM use the CNNs only"
            )
        cpu0 = _cpu_seconds(client)
        t0 = time.perf_counter()
        # not in a dask span: dask-expr DataFrames ignore annotations, with a warning
        with _no_space_is_run_error("catalog", run_dir):
            result.catalog = str(_catalog(run_dir, ds, n))
            result.catalogs = _catalogs(run_dir)
        tidy_dask(client)  # the catalogs' dataframe graphs were not run through run_bounded
        result.stages["catalog"] = {
            "module": "catalog",
            "status": "done",
            "seconds": round(time.perf_counter() - t0, 2),
            **_core_seconds(
                cpu0, _cpu_seconds(client), time.perf_counter() - t0, _n_threads(client), n
            ),
            "catalogs": sorted(result.catalogs),
            "not_available": list(CATALOG_PLANNED),
            **_memory_marks(client),
        }
        for part in CATALOG_PLANNED:
            result.not_available.append(f"catalog: {part}")
        result.seconds = round(time.perf_counter() - t_start, 2)
        atomic_write(run_dir / "run.json", json.dumps(result.to_dict(), indent=1, default=str))
        release_memory()
        result.report = _report(run_dir, cfg)
        release_memory()
        for line in result.not_available:
            log.info("not available: %s", line)
    return result


def _catalogs(run_dir: Path) -> dict:
    """M_Catalog_V0..V3, recommended and non_M_Catalog as Parquet, plus the count summary."""
    from mspec.catalog import build_catalog, catalog_summary, write

    cats = build_catalog(run_dir)
    out = run_dir / "catalog"
    written = write(cats, out, formats=("parquet",))
    atomic_write(out / "summary.csv", catalog_summary(cats).to_csv(index=False))
    for note in getattr(cats, "notes", []) or []:
        log.info("catalog: %s", note)
    return {
        k: (v.get("parquet", "") if isinstance(v, dict) else str(v)) for k, v in written.items()
    }


def _report(run_dir: Path, cfg) -> str:
    """Write the HTML run report; a failure is logged, never fatal to the run."""
    from mspec.run_report import write_run_report

    t0 = time.perf_counter()
    try:
        path = write_run_report(
            run_dir, tm_sigma=cfg.thresholds.tm_sigma, dsal_sigma=cfg.thresholds.dsal_sigma
        )
    except Exception:  # noqa: BLE001 - the run's results are complete without the report
        log.warning("could not write the run report", exc_info=True)
        return ""
    log.info("run report: %s (%.1f s; driver RSS %s MiB, peak %s MiB)", path,
             time.perf_counter() - t0, _rss(), _peak_rss())  # fmt: skip
    return str(path)


def _models(cfg) -> Path:
    from mspec.pipeline.models import (
        ModelsMissingError,
        build_default_models,
        default_models_dir,
        missing_models,
    )

    if cfg.models.dir:
        d = Path(cfg.models.dir)
        miss = missing_models(d)
        if miss:
            raise ModelsMissingError(
                f"models.dir {d} lacks the models {miss} (each needs <kind>/model.json); "
                "train them with `mspec train` or leave models.dir empty for the defaults"
            )
        return d
    d = default_models_dir()
    if missing_models(d):
        log.warning(
            "no default models in %s: training them on the simulator now (once; about 6 "
            "CPU-minutes; `mspec models build` does this ahead of time)",
            d,
        )
        build_default_models(d)
    return d


#: Reviewers' decisions a run honours (written by hand or from ``mspec inspect``).
DECISIONS_FILE = Path("review") / "decisions.csv"


def _decisions(run_dir: Path, ds: xr.Dataset):
    """(decisions DataFrame or None, sha256 of the file or "")."""
    path = run_dir / DECISIONS_FILE
    if not path.is_file():
        return None, ""
    from mspec.review import read_decisions

    table = read_decisions(path, known_obsids=np.asarray(ds["obsid"].values))
    log.info("honouring %d reviewers' decisions from %s", len(table), path)
    return table, hashlib.sha256(path.read_bytes()).hexdigest()


def _record_inputs(run_dir: Path, ctx: RunContext) -> None:
    info = {
        "models_dir": str(ctx.models_dir or ""),
        "models_sha256": ctx.model_hashes,
        "templates_set": ctx.config.templates.set,
        "templates_sha256": ctx.templates_hash,
        "decisions_sha256": ctx.decisions_hash,
    }
    atomic_write(run_dir / "inputs.json", json.dumps(info, indent=1, sort_keys=True))


def run_status(path) -> dict:
    """Per-stage progress of a run directory (for ``mspec info``).

    Parameters
    ----------
    path : path-like
        Run directory.

    Returns
    -------
    dict
        ``{"run_dir", "n_spectra", "stages": {name: {"done": k, "chunks": m, ...}}}``.
    """
    run_dir = Path(path)
    if not (run_dir / "config.resolved.toml").is_file():
        raise RunError(f"{run_dir} is not an mspec run directory (no config.resolved.toml)")
    from mspec.config import load_config
    from mspec.io.store import store_state

    cfg = load_config(run_dir / "config.resolved.toml")
    try:
        st = store_state(cfg.store)
        n, chunk = int(st["n_spectra"]), int(st["chunk_size"])
    except Exception:  # noqa: BLE001 - the store may have moved; report what is known
        n, chunk = 0, cfg.chunk_size
    ranges = chunk_ranges(n, chunk) if n else []
    stages = {}
    for s in PIPELINE:
        p = _stage_paths(run_dir, s.name)
        done = set(DoneRecords(p["done"]).ranges())
        stages[s.name] = {
            "module": s.module,
            "chunks": len(ranges),
            "done": sum(1 for r in ranges if r in done),
            "pending": sum(1 for r in ranges if r not in done),
            "stamped": p["stamp"].is_file(),
            "not_available": s.unavailable(),
        }
    locked = (run_dir / ".lock").is_file()
    return {
        "run_dir": str(run_dir),
        "store": cfg.store,
        "n_spectra": n,
        "chunk_size": chunk,
        "stages": stages,
        "lock_file_present": locked,
    }
