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
