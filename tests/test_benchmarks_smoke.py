"""Run every asv benchmark once at tiny sizes so the benchmark suite cannot rot."""

import importlib
import inspect
import itertools
import os
import pkgutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ["MSPEC_BENCH_SMOKE"] = "1"
sys.path.insert(0, str(ROOT))

PREFIXES = ("time_", "peakmem_", "mem_", "track_")


def _modules():
    import benchmarks

    return sorted(
        m.name for m in pkgutil.iter_modules(benchmarks.__path__) if not m.name.startswith("_")
    )


def _cases():
    for modname in _modules():
        mod = importlib.import_module(f"benchmarks.{modname}")
        for cname, cls in inspect.getmembers(mod, inspect.isclass):
            if cls.__module__ != mod.__name__:
                continue
            methods = [m for m in dir(cls) if m.startswith(PREFIXES)]
            if methods:
                yield pytest.param(mod, cls, methods, id=f"{modname}.{cname}")


@pytest.mark.slow
@pytest.mark.parametrize(("mod", "cls", "methods"), list(_cases()))
def test_benchmark_runs(mod, cls, methods, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    params = getattr(cls, "params", None)
    if params is None:
        combos = [()]
    else:
        if not isinstance(params[0], list | tuple):
            params = [params]
        # the first value of every parameter: the smallest case by convention
        combos = [tuple(p[0] for p in params)]
    for args in itertools.islice(combos, 1):
        obj = cls()
        if hasattr(obj, "setup_cache"):
            cache = obj.setup_cache()
            args = (cache, *args)
        if hasattr(obj, "setup"):
            obj.setup(*args)
        for m in methods:
            getattr(obj, m)(*args)
        if hasattr(obj, "teardown"):
            obj.teardown(*args)


def test_benchmarks_exist():
    assert _modules(), "no asv benchmark modules in benchmarks/"


@pytest.mark.slow
def test_survey_scale_script(tmp_path, capsys):
    """benchmarks/survey_scale.py end to end at a tiny size: every stage's CPU cost, the
    memory of every process and the graph size are measured, and --table renders them."""
    import json

    from benchmarks import survey_scale
    from mspec.testing import tiny_models

    models = tiny_models(tmp_path / "models")
    out = tmp_path / "run"
    res = survey_scale.main(
        ["--n", "90", "--chunk", "30", "--workers", "1", "--models", str(models),
         "--out", str(out), "--batch", "45"]
    )  # fmt: skip
    assert res["n_spectra"] == 90
    saved = json.loads((out / "survey_scale.json").read_text())
    assert saved["stages"].keys() == res["stages"].keys()
    for name in ("preprocess", "scm", "rvmm", "dgcm", "reconcile", "spmm"):
        st = res["stages"][name]
        assert st["cpu_seconds"] > 0, name  # measured CPU time, not wall x workers
        assert st["core_seconds_per_spectrum"] == pytest.approx(st["cpu_seconds"] / 90, rel=0.01)
        assert res["tasks_per_chunk"][name] > 0
    assert res["pipeline_core_seconds_per_spectrum"] > 0
    # the driver's high-water mark after each stage (run.json): never falls, below the peak
    marks = [st["driver_peak_rss_MiB"] for st in res["stages"].values()]
    assert all(m > 50 for m in marks) and marks == sorted(marks)
    # and the RSS each next phase starts from: at most the high-water mark
    for st in res["stages"].values():
        assert 50 < st["driver_rss_MiB"] <= st["driver_peak_rss_MiB"] + 1
    # and every worker's (one worker here), so a worker's peak can be placed too
    for name in ("preprocess", "scm", "rvmm", "dgcm", "reconcile", "spmm"):
        (w,) = res["stages"][name]["workers_peak_rss_MiB"].values()
        assert w > 50
    w = [next(iter(st["workers_peak_rss_MiB"].values())) for st in res["stages"].values()]
    assert w == sorted(w)  # high-water marks
    procs = res["peak_rss_per_process_MB"]
    assert "driver" in procs and len(procs) == 2 and min(procs.values()) > 50
    assert res["peak_rss_total_MB"] >= max(procs.values())
    capsys.readouterr()
    table = survey_scale.main(["--out", str(out), "--table", str(out / "survey_scale.json")])
    assert "90 spectra" in table["table"] and "rvmm: core-ms / spectrum" in table["table"]
