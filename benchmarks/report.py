"""Turn the asv results into the generated section of ``docs/benchmarks.md``.

``make bench`` runs the asv suite (``benchmarks/``, results in ``.asv/results/``) and then this
script, which reads the newest results file of a machine and rewrites the part of
``docs/benchmarks.md`` between the markers ``<!-- asv-report:start -->`` and
``<!-- asv-report:end -->`` (inserted before the first ``##`` heading when absent); the
hand-written sections around it are kept as they are. It also draws
``docs/img/benchmarks_scaling.png``. The section holds:

* the machine (asv's machine file, CPU model, memory, Python and package versions), the
  commit and the date of the run;
* how cost grows with the number of spectra (log-log slope between the smallest and the
  largest size of every size-parametrised benchmark, and the cost per item), with the number
  of templates (template-matching core-seconds per spectrum, marginal cost per template) and
  with the number of dask workers (``PipelineWorkers``: 1 vs 2 workers, scaling efficiency
  t(1) / (2 t(2)));
* the survey-scale runs (``benchmarks/survey_scale.py --save``, JSON files in
  ``benchmarks/results/survey_scale/``; ``make bench-survey`` makes one): per-stage CPU cost,
  memory of every process and graph size at each size, checked against the goals;
* every benchmark result, one table per benchmark.

Usage::

    python benchmarks/report.py [--results .asv/results] [--machine NAME] [--out docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
import datetime as _dt
import itertools
import json
import math
import os
import platform
import sys
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
START = "<!-- asv-report:start -->"
END = "<!-- asv-report:end -->"
FIGURE = "img/benchmarks_scaling.png"
SURVEY_DIR = ROOT / "benchmarks" / "results" / "survey_scale"
#: Goals of the survey-scale run (issue 12).
SURVEY_GOALS = {"core_ms": 50.0, "total_GiB": 4.0, "flat": 0.10}
SIZE_PARAMS = ("n_spectra", "n_files", "n_models")
PACKAGES = ("numpy", "numba", "dask", "distributed", "xarray", "zarr", "torch", "astropy")

__all__ = ["load_results", "render", "survey_scale_section", "update_page", "main"]


class ReportError(RuntimeError):
    """The asv results cannot be read (the message says what is missing)."""


# ------------------------------------------------------------------------------ reading


def load_results(results_dir, machine: str | None = None) -> dict:
    """Read the newest asv results of one machine.

    Every benchmark comes from the newest results file that holds it (so a run of a subset,
    ``make bench BENCH=...``, updates those benchmarks and keeps the others); ``commits``
    says which commit each came from.

    Parameters
    ----------
    results_dir : path-like
        asv's ``results_dir`` (``.asv/results``): one folder per machine plus
        ``benchmarks.json``.
    machine : str, optional
        Machine name (a folder of ``results_dir``); default the machine whose newest results
        file is the most recent.

    Returns
    -------
    dict
        ``machine`` (asv's machine.json), ``run`` (the results file: commit, date, params),
        ``benchmarks`` (``benchmarks.json``: type, unit, param names per benchmark),
        ``finished`` (when the last benchmark started, ms since the epoch) and
        ``results``: benchmark name -> list of ``(params dict, value)`` with ``value`` a float
        (seconds for ``time_``, bytes for ``peakmem_``/``mem_``, the benchmark's unit for
        ``track_``) or None where the case failed or was skipped.

    Raises
    ------
    ReportError
        No results directory, no machine, no results file or no ``benchmarks.json``.
    """
    results_dir = Path(results_dir)
    if not results_dir.is_dir():
        raise ReportError(f"results_dir {str(results_dir)!r} does not exist: run asv first")
    bench_file = results_dir / "benchmarks.json"
    if not bench_file.exists():
        raise ReportError(f"{bench_file} is missing: run asv first")
    machines = {p.name: p for p in results_dir.iterdir() if p.is_dir()}
    if machine is not None and machine not in machines:
        raise ReportError(
            f"machine {machine!r} has no results in {results_dir} ({sorted(machines)})"
        )

    def all_runs(folder: Path):
        runs = []
        for f in folder.glob("*.json"):
            if f.name == "machine.json":
                continue
            try:
                d = json.loads(f.read_text())
            except (OSError, ValueError):
                continue
            if isinstance(d, dict) and "results" in d:
                runs.append((d.get("date") or 0, f.stat().st_mtime, f, d))
        return sorted(runs, key=lambda r: r[:2], reverse=True)

    candidates = {m: all_runs(p) for m, p in machines.items() if machine in (None, m)}
    candidates = {m: r for m, r in candidates.items() if r}
    if not candidates:
        raise ReportError(f"no asv results file in {results_dir}")
    name = max(candidates, key=lambda m: candidates[m][0][:2])
    _, _, path, run = candidates[name][0]
    mfile = machines[name] / "machine.json"
    mach = json.loads(mfile.read_text()) if mfile.exists() else {"machine": name}
    benches = json.loads(bench_file.read_text())
    benches.pop("version", None)

    results, finished, commits = {}, 0, {}
    for _, _, _, older in candidates[name]:
        cols = older.get("result_columns", ["result", "params"])
        for bname, row in older["results"].items():
            if bname in results or bname not in benches:
                continue  # a newer results file has it, or it left the suite
            rec = dict(zip(cols, row))
            commits.setdefault(str(older.get("commit_hash", "?"))[:10], []).append(bname)
            finished = max(finished, rec.get("started_at") or 0)
            results[bname] = _cases(rec, benches.get(bname, {}).get("param_names", []))
    return {
        "machine": mach,
        "run": run,
        "path": str(path),
        "benchmarks": benches,
        "results": results,
        "commits": commits,
        "finished": finished or None,
    }


def _cases(rec: dict, names) -> list:
    """One asv result record -> [(params dict, value or None)] over the parameter grid."""
    values = rec.get("result")
    params = rec.get("params") or []
    combos = list(itertools.product(*params)) if params else [()]
    if not isinstance(values, list):
        values = [values] * len(combos)
    return [
        ({n: _literal(v) for n, v in zip(names, combo)}, _number(value))
        for combo, value in zip(combos, values)
    ]


def _literal(text):
    """asv stores parameter values as their repr: '100' -> 100, "'cnn'" -> 'cnn'."""
    import ast

    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _number(value):
    if value is None:
        return None
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


# ---------------------------------------------------------------------------- formatting


def _fmt(value, kind: str, unit: str = "") -> str:
    if value is None:
        return "failed / skipped"
    if kind == "time":
        if value >= 60:
            return f"{value / 60:.1f} min"
        if value >= 1:
            return f"{value:.2f} s"
        if value >= 1e-3:
            return f"{value * 1e3:.1f} ms"
        return f"{value * 1e6:.0f} µs"
    if kind in ("peakmemory", "memory"):
        return f"{value / 2**20:,.0f} MiB"
    if abs(value) >= 1000:
        text = f"{value:,.0f}"
    elif abs(value) >= 10:
        text = f"{value:.1f}"
    else:
        text = f"{value:.3g}"
    return f"{text} {unit}".strip() if unit and unit != "unit" else text


def _kind(benches: dict, name: str) -> tuple[str, str]:
    info = benches.get(name, {})
    return info.get("type", "track"), info.get("unit", "")


def _utc(ms) -> str:
    if not ms:
        return "unknown"
    return _dt.datetime.fromtimestamp(ms / 1000, tz=_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def _load() -> str:
    try:
        return " / ".join(f"{x:.1f}" for x in os.getloadavg()) + " (1 / 5 / 15 min)"
    except (AttributeError, OSError):
        return "unknown"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _versions() -> str:
    out = []
    for pkg in PACKAGES:
        try:
            out.append(f"{pkg} {metadata.version(pkg)}")
        except metadata.PackageNotFoundError:
            continue
    return ", ".join(out)


# ------------------------------------------------------------------------------ analyses


def _size_param(cases) -> str | None:
    names = cases[0][0].keys() if cases else ()
    return next((n for n in SIZE_PARAMS if n in names), None)


def _by_size(cases, size: str):
    """Group cases by their other parameters: {other params tuple: [(size, value)]}."""
    groups: dict[tuple, list] = {}
    for p, v in cases:
        key = tuple((k, p[k]) for k in p if k != size)
        groups.setdefault(key, []).append((p[size], v))
    return {k: sorted(v) for k, v in groups.items()}


def _slope(points) -> float | None:
    pts = [(x, y) for x, y in points if y is not None and y > 0 and x > 0]
    if len(pts) < 2 or pts[0][0] == pts[-1][0]:
        return None
    (x0, y0), (x1, y1) = pts[0], pts[-1]
    return math.log(y1 / y0) / math.log(x1 / x0)


def scaling_with_size(data: dict) -> list[str]:
    """Markdown rows: per size-parametrised time/memory benchmark, cost vs size."""
    rows = []
    for name, cases in sorted(data["results"].items()):
        kind, unit = _kind(data["benchmarks"], name)
        size = _size_param(cases)
        if size is None or kind == "track" and not unit.startswith("second"):
            continue
        for other, pts in _by_size(cases, size).items():
            k = _slope(pts)
            if k is None:
                continue
            label = name + (" (" + ", ".join(f"{a}={b}" for a, b in other) + ")" if other else "")
            vals = ", ".join(f"{x:,}: {_fmt(y, kind, unit)}" for x, y in pts)
            per = ""
            if kind in ("time",) or unit.startswith("second"):
                (xl, yl) = pts[-1]
                if yl is not None:
                    per = _fmt(yl / xl, "time")
            growth = "flat" if abs(k) < 0.15 else ("linear" if 0.85 <= k <= 1.15 else f"n^{k:.2f}")
            rows.append(f"| `{label}` | {size} | {vals} | {k:.2f} ({growth}) | {per} |")
    return rows


def scaling_with_templates(data: dict) -> list[str]:
    rows = []
    for name, cases in sorted(data["results"].items()):
        if not cases or "n_templates" not in cases[0][0]:
            continue
        kind, unit = _kind(data["benchmarks"], name)
        groups: dict[tuple, list] = {}
        for p, v in cases:
            key = tuple((k, p[k]) for k in p if k != "n_templates")
            groups.setdefault(key, []).append((p["n_templates"], v))
        for other, pts in groups.items():
            pts = sorted((x, y) for x, y in pts if y is not None)
            if len(pts) < 2:
                continue
            (x0, y0), (x1, y1) = pts[0], pts[-1]
            marginal = (y1 - y0) / (x1 - x0)
            label = name + (" (" + ", ".join(f"{a}={b}" for a, b in other) + ")" if other else "")
            vals = ", ".join(f"{x}: {_fmt(y, kind, unit)}" for x, y in pts)
            fixed = y0 - marginal * x0
            rows.append(
                f"| `{label}` | {vals} | {_fmt(marginal, kind, unit)} per template | "
                f"{_fmt(max(fixed, 0.0), kind, unit)} |"
            )
    return rows


def scaling_with_workers(data: dict) -> tuple[list[str], dict]:
    """Rows for the 1 vs 2 workers table and {n_spectra: efficiency}."""
    rows, eff = [], {}
    cases = data["results"].get("bench_scaling.PipelineWorkers.track_seconds", [])
    per_n: dict = {}
    for p, v in cases:
        per_n.setdefault(p["n_spectra"], {})[p["n_workers"]] = v
    rates = {
        (p["n_spectra"], p["n_workers"]): v
        for p, v in data["results"].get(
            "bench_scaling.PipelineWorkers.track_spectra_per_second", []
        )
    }
    for n in sorted(per_n):
        t = per_n[n]
        t1, t2 = t.get(1), t.get(2)
        e = t1 / (2 * t2) if t1 and t2 else None
        eff[n] = e
        rows.append(
            f"| {n:,} | {_fmt(t1, 'time')} | {_fmt(t2, 'time')} | "
            f"{_fmt(rates.get((n, 1)), 'track', 'spectra/s')} | "
            f"{_fmt(rates.get((n, 2)), 'track', 'spectra/s')} | "
            f"{'n/a' if e is None else f'{e:.0%}'} |"
        )
    return rows, eff


# ------------------------------------------------------------------------------ figure


def draw_figure(data: dict, path) -> bool:
    """Draw cost vs spectra, templates and workers into ``path`` (PNG); False if no data."""
    from matplotlib.figure import Figure

    res = data["results"]
    fig = Figure(figsize=(13, 4), layout="constrained")
    axes = fig.subplots(1, 3)
    colours = ["#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000"]
    drawn = False

    ax = axes[0]
    c = iter(colours)
    for name in sorted(res):
        kind, unit = _kind(data["benchmarks"], name)
        size = _size_param(res[name])
        if kind != "time" or size is None:
            continue
        for other, pts in _by_size(res[name], size).items():
            pts = [(x, y) for x, y in pts if y is not None]
            if len(pts) < 2:
                continue
            short = name.split(".", 1)[1].replace(".time_", ".")
            label = short + (" " + ",".join(str(b) for _, b in other) if other else "")
            ax.loglog(*zip(*pts), marker="o", color=next(c, "#000000"), label=label)
            drawn = True
    ax.set_xlabel("spectra (or files) per call")
    ax.set_ylabel("wall time [s]")
    ax.set_title("cost vs number of spectra")
    if ax.lines:
        ax.legend(fontsize=7)

    ax = axes[1]
    c = iter(colours)
    for name in sorted(res):
        if not res[name] or "n_templates" not in res[name][0][0]:
            continue
        groups: dict = {}
        for p, v in res[name]:
            key = ",".join(str(p[k]) for k in p if k != "n_templates")
            groups.setdefault(key, []).append((p["n_templates"], v))
        for key, pts in groups.items():
            pts = sorted((x, y) for x, y in pts if y is not None)
            if pts:
                ax.loglog(*zip(*pts), marker="o", color=next(c, "#000000"), label=key or name)
                drawn = True
    ax.set_xlabel("templates")
    ax.set_ylabel("core-seconds per spectrum")
    ax.set_title("template matching vs library size")
    if ax.lines:
        ax.legend(fontsize=7)

    ax = axes[2]
    c = iter(colours)
    per_n: dict = {}
    for p, v in res.get("bench_scaling.PipelineWorkers.track_spectra_per_second", []):
        per_n.setdefault(p["n_spectra"], []).append((p["n_workers"], v))
    for n, pts in sorted(per_n.items()):
        pts = sorted((x, y) for x, y in pts if y is not None)
        if pts:
            ax.plot(*zip(*pts), marker="o", color=next(c, "#000000"), label=f"{n:,} spectra")
            drawn = True
            w1 = dict(pts).get(1)
            if w1:
                ax.plot([1, 2], [w1, 2 * w1], ls=":", color="#999999", lw=1)
    ax.set_xlabel("dask workers (1 thread each)")
    ax.set_ylabel("spectra per second (mspec.run)")
    ax.set_title("pipeline vs workers (dotted: ideal)")
    ax.set_xticks([1, 2])
    if ax.lines:
        ax.legend(fontsize=7)
    if drawn:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110)
    return drawn


# ------------------------------------------------------------------------------ the page


def render(data: dict, *, figure: str | None = FIGURE, survey_dir=SURVEY_DIR) -> str:
    """The generated Markdown section (without the markers).

    Parameters
    ----------
    data : dict
        What :func:`load_results` returns.
    figure : str or None
        Path of the scaling figure relative to the page, or None for no figure.
    survey_dir : path-like
        Saved survey-scale runs (:func:`survey_scale_section`).

    Returns
    -------
    str
        Markdown.
    """
    mach, run = data["machine"], data["run"]
    when = _utc(data.get("finished") or run.get("date"))
    ram = mach.get("ram", "")
    try:
        ram = f"{int(ram) / 2**30:.0f} GiB"
    except (TypeError, ValueError):
        pass
    lines = [
        "## Latest asv run (generated)",
        "",
        "This section is written by `make bench` (`benchmarks/report.py` from the asv results);",
        "do not edit it by hand. Figures are single samples (`asv run --quick`): on a machine",
        "shared with other jobs (see the load average) they are pessimistic, by the ratio of",
        "the load to the core count or more.",
        "",
        "| | |",
        "|---|---|",
        f"| machine | `{mach.get('machine', '?')}`: {mach.get('num_cpu', '?')} cores "
        f"({_cpu_model()}, {mach.get('arch', '?')}), {ram} RAM, {mach.get('os', '?')} |",
        f"| software | Python {platform.python_version()}, {_versions()} |",
        "| commit | "
        + "; ".join(f"`{c}` ({len(b)} benchmarks)" for c, b in (data.get("commits") or {}).items())
        + " |",
        f"| benchmarks | {len(data['results'])} of the {len(data['benchmarks'])} in the suite "
        "(`make bench` runs them all, `make bench BENCH=regex` the matching ones) |",
        f"| run | {when} (commit date {_utc(run.get('date'))}) |",
        f"| load average when reported | {_load()} (other jobs on the machine slow every figure) |",
        "",
    ]
    if figure:
        lines += [f"![cost against spectra, templates and workers]({figure})", ""]

    rows, eff = scaling_with_workers(data)
    ncpu = int(mach.get("num_cpu") or os.cpu_count() or 1)
    try:
        load = os.getloadavg()[1]
    except (AttributeError, OSError):
        load = None
    lines += ["### Scaling with workers: 1 vs 2", ""]
    if rows:
        lines += [
            "`bench_scaling.PipelineWorkers`: `mspec.run` end to end (ingested store → catalog, "
            "real PyHammer templates, 10-member CNN-TLMA ensembles) on a fresh `LocalCluster` of "
            "single-threaded workers; scaling efficiency = t(1 worker) / (2 × t(2 workers)), "
            "100 % = perfect.",
            "",
            "| spectra | 1 worker | 2 workers | spectra/s, 1 worker | spectra/s, 2 workers | efficiency |",
            "|---|---|---|---|---|---|",
            *rows,
            "",
        ]
        good = [e for e in eff.values() if e is not None]
        if good:
            lines += [
                f"Efficiency {min(good):.0%}–{max(good):.0%}. "
                + (
                    f"The machine was busier than its {ncpu} cores while this was written "
                    f"(load {load:.1f}): a second worker then competes with the other jobs "
                    "instead of using an idle core, so these efficiencies are lower bounds; "
                    "measure scaling on a quiet machine."
                    if load is not None and load > ncpu
                    else "Below 100 %: starting the cluster, the workers' first imports and "
                    "numba/torch warm-up are paid per run; the chunks themselves are independent."
                ),
                "",
            ]
    else:
        lines += ["No `PipelineWorkers` results in this run.", ""]

    rows = scaling_with_size(data)
    lines += ["### Scaling with the number of spectra", ""]
    if rows:
        lines += [
            "Exponent k of cost ∝ n^k between the smallest and the largest size (1 = linear; "
            "below 1 where fixed start-up costs dominate small sizes; about 0 for memory that "
            "stays flat because the work is chunked).",
            "",
            "| benchmark | size | results | k | per item (largest) |",
            "|---|---|---|---|---|",
            *rows,
            "",
        ]
    else:
        lines += ["No size-parametrised results in this run.", ""]

    rows = scaling_with_templates(data)
    lines += ["### Scaling with the number of templates", ""]
    if rows:
        lines += [
            "Template matching of one spectrum (`TMPerSpectrum`, one thread): a linear fit "
            "through the smallest and the largest library.",
            "",
            "| benchmark | results | marginal cost | fixed cost |",
            "|---|---|---|---|",
            *rows,
            "",
        ]
    else:
        lines += ["No template-parametrised results in this run.", ""]

    lines += survey_scale_section(survey_dir)
    lines += ["### All results", ""]
    for name, cases in sorted(data["results"].items()):
        kind, unit = _kind(data["benchmarks"], name)
        names = list(cases[0][0]) if cases else []
        lines.append(f"`{name}` ({kind}{', ' + unit if unit and kind == 'track' else ''})")
        lines.append("")
        header = names + ["result"]
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|" + "---|" * len(header))
        for p, v in cases:
            cells = [str(p[n]) for n in names] + [_fmt(v, kind, unit)]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def survey_scale_section(directory=SURVEY_DIR) -> list[str]:
    """Markdown lines for the survey-scale runs saved in ``directory`` (empty if none).

    One column per run (:func:`benchmarks.survey_scale.markdown`), then the goals: pipeline
    CPU cost per spectrum ≤ 50 ms, all processes together ≤ 4 GiB, peak memory per worker
    flat (±10 %) from the smallest to the largest run and graph tasks per chunk the same.
    """
    files = sorted(Path(directory).glob("*.json")) if Path(directory).is_dir() else []
    if not files:
        return []
    sys.path.insert(0, str(ROOT))
    from benchmarks.survey_scale import markdown

    runs = sorted((json.loads(f.read_text()) for f in files), key=lambda r: r["n_spectra"])
    small, big = runs[0], runs[-1]
    m = big.get("machine", {})
    lines = [
        "### Survey scale (`benchmarks/survey_scale.py`)",
        "",
        f"Simulated surveys through ingest and every pipeline stage on a `LocalCluster` of "
        f"{big['workers']} single-threaded workers (chunks of {big['chunk_size']:,}, "
        f"`{big['templates']}` templates); saved runs in `benchmarks/results/survey_scale/` "
        f"(`make bench-survey SURVEY_N=...`). Machine: {m.get('cores', '?')} cores "
        f"({m.get('cpu', '?')}), {m.get('memory_GiB', '?')} GiB, Python {m.get('python', '?')}, "
        f"mspec {m.get('mspec', '?')}. Core-ms are CPU time of the driver and every worker "
        "process (valid on a shared machine); wall times include waiting for other jobs "
        "(load average in the last row).",
        "",
        markdown(runs).rstrip(),
        "",
    ]
    cost = 1000 * big["pipeline_core_seconds_per_spectrum"]
    total = big["peak_rss_total_MB"] / 1024
    goal = SURVEY_GOALS
    checks = [
        f"pipeline cost {cost:.1f} core-ms per spectrum at {big['n_spectra']:,} spectra "
        f"(goal ≤ {goal['core_ms']:.0f}: {'met' if cost <= goal['core_ms'] else 'not met'}; "
        f"{0.87e6 * cost / 1000 / 3600:.1f} core-hours for 870k spectra)",
        f"all processes together {total:.2f} GiB at the peak (goal ≤ {goal['total_GiB']:.0f}: "
        f"{'met' if total <= goal['total_GiB'] else 'not met'})",
    ]
    if len(runs) > 1:

        def workers(r):
            return [v for k, v in r["peak_rss_per_process_MB"].items() if k != "driver"]

        w0, w1 = max(workers(small)), max(workers(big))
        growth = w1 / w0 - 1
        checks.append(
            f"peak memory per worker {w0:,} → {w1:,} MiB from {small['n_spectra']:,} to "
            f"{big['n_spectra']:,} spectra ({growth:+.0%}; goal flat within "
            f"±{goal['flat']:.0%}: {'met' if abs(growth) <= goal['flat'] else 'not met'})"
        )

        def flat(a, b):
            g = b / a - 1
            return f"{g:+.0%}; goal flat within ±{goal['flat']:.0%}: " + (
                "met" if abs(g) <= goal["flat"] else "not met"
            )

        T0, T1 = small["peak_rss_total_MB"], big["peak_rss_total_MB"]
        checks.append(f"all processes together {T0:,} → {T1:,} MiB ({flat(T0, T1)})")
        d0, d1 = small["peak_rss_per_process_MB"], big["peak_rss_per_process_MB"]
        if "driver" in d0 and "driver" in d1:
            per = (d1["driver"] - d0["driver"]) * 1024 / (big["n_spectra"] - small["n_spectra"])
            checks.append(
                f"the driver (client, scheduler, ingest planning, catalogs, report) "
                f"{d0['driver']:,} → {d1['driver']:,} MiB ({flat(d0['driver'], d1['driver'])}; "
                f"{per:.1f} KiB per added spectrum)"
            )
        t0, t1 = small["tasks_per_chunk"], big["tasks_per_chunk"]
        diff = max((abs(t1[k] / t0[k] - 1) for k in t0 if k in t1 and t0[k]), default=float("inf"))
        checks.append(
            "graph tasks per chunk "
            + (f"the same at both sizes within {diff:.0%} (tasks shared by all chunks spread "
               "over more of them): graph size linear in chunks" if diff <= 0.05 else
               f"differ by up to {diff:.0%} between the sizes (see the table)")
        )  # fmt: skip
    lines += ["Against the goals: " + "; ".join(checks) + ".", ""]
    return lines


def update_page(page, section: str) -> str:
    """Replace (or insert) the generated section of ``page``; return the new text.

    The section goes between :data:`START` and :data:`END`; without the markers it is
    inserted before the first ``## `` heading (or appended). Text outside the markers is kept
    byte for byte.
    """
    page = Path(page)
    text = page.read_text() if page.exists() else "# Benchmarks\n"
    block = f"{START}\n{section.rstrip()}\n{END}"
    if START in text and END in text:
        head, rest = text.split(START, 1)
        _, tail = rest.split(END, 1)
        new = head + block + tail
    else:
        lines = text.splitlines(keepends=True)
        at = next((i for i, ln in enumerate(lines) if ln.startswith("## ")), len(lines))
        head = "".join(lines[:at]).rstrip("\n") + "\n\n"
        new = head + block + "\n\n" + "".join(lines[at:])
    page.write_text(new)
    return new


def main(argv=None) -> int:
    """Command line: read the asv results and rewrite the page's generated section."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--results", default=str(ROOT / ".asv" / "results"), help="asv results_dir")
    ap.add_argument("--machine", default=None, help="asv machine name (default: newest)")
    ap.add_argument("--out", default=str(ROOT / "docs" / "benchmarks.md"), help="page to update")
    args = ap.parse_args(argv)
    try:
        data = load_results(args.results, args.machine)
    except ReportError as exc:
        print(f"benchmarks/report.py: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out)
    fig_ok = draw_figure(data, out.parent / FIGURE)
    update_page(out, render(data, figure=FIGURE if fig_ok else None))
    print(f"wrote {out} from {data['path']}" + (f" and {out.parent / FIGURE}" if fig_ok else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
