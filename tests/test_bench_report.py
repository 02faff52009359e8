"""benchmarks/report.py: asv results -> the generated section of docs/benchmarks.md."""

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import report  # noqa: E402

COLS = ["result", "params", "version", "started_at", "duration"]


def _bench(name, kind, unit, param_names):
    return {"name": name, "type": kind, "unit": unit, "param_names": param_names}


@pytest.fixture
def results(tmp_path):
    d = tmp_path / "results"
    (d / "box").mkdir(parents=True)
    (d / "box" / "machine.json").write_text(
        json.dumps(
            {
                "machine": "box",
                "num_cpu": "2",
                "arch": "x86_64",
                "ram": str(8 * 2**30),
                "os": "Linux",
                "cpu": "test",
                "version": 1,
            }
        )  # fmt: skip
    )
    benches = {
        "bench_scaling.PipelineWorkers.track_seconds": _bench(
            "bench_scaling.PipelineWorkers.track_seconds",
            "track",
            "seconds",
            ["n_spectra", "n_workers"],
        ),  # fmt: skip
        "bench_scaling.PipelineWorkers.track_spectra_per_second": _bench(
            "bench_scaling.PipelineWorkers.track_spectra_per_second",
            "track",
            "spectra/s",
            ["n_spectra", "n_workers"],
        ),  # fmt: skip
        "bench_rv.TMPerSpectrum.time_tm_one_spectrum": _bench(
            "bench_rv.TMPerSpectrum.time_tm_one_spectrum",
            "time",
            "seconds",
            ["n_templates", "impl"],
        ),  # fmt: skip
        "bench_simulate.Simulate.time_simulate_survey": _bench(
            "bench_simulate.Simulate.time_simulate_survey", "time", "seconds", ["n_spectra"]
        ),
        "bench_ingest.Ingest.peakmem_ingest": _bench(
            "bench_ingest.Ingest.peakmem_ingest", "peakmemory", "bytes", ["n_files"]
        ),
        "version": 2,
    }
    (d / "benchmarks.json").write_text(json.dumps(benches))
    res = {
        # cartesian order: (400,1), (400,2), (1600,1), (1600,2)
        "bench_scaling.PipelineWorkers.track_seconds": [
            [40.0, 25.0, 160.0, 85.0], [["400", "1600"], ["1", "2"]], "v", 1, 1.0],
        "bench_scaling.PipelineWorkers.track_spectra_per_second": [
            [10.0, 16.0, 10.0, 18.8], [["400", "1600"], ["1", "2"]], "v", 1, 1.0],
        "bench_rv.TMPerSpectrum.time_tm_one_spectrum": [
            [0.01, 5.0, 0.03, 6.0], [["10", "233"], ["'numba'", "'numpy'"]], "v", 1, 1.0],
        "bench_simulate.Simulate.time_simulate_survey": [
            [1.0, None], [["1000", "10000"]], "v", 1, 1.0],
        "bench_ingest.Ingest.peakmem_ingest": [
            [300e6, 310e6], [["250", "4000"]], "v", 1, 1.0],
    }  # fmt: skip
    run = {"commit_hash": "abcdef0123456789", "date": 1_700_000_000_000, "params": {},
           "result_columns": COLS, "results": res, "version": 2}  # fmt: skip
    (d / "box" / "abcdef01-existing.json").write_text(json.dumps(run))
    old = dict(run, date=1, results={})
    (d / "box" / "0000-old.json").write_text(json.dumps(old))
    return d


def test_load_results_reads_params_and_failures(results):
    data = report.load_results(results)
    assert data["machine"]["machine"] == "box"
    cases = data["results"]["bench_rv.TMPerSpectrum.time_tm_one_spectrum"]
    assert cases[1] == ({"n_templates": 10, "impl": "numpy"}, 5.0)
    sim = data["results"]["bench_simulate.Simulate.time_simulate_survey"]
    assert sim[1] == ({"n_spectra": 10000}, None)


def test_workers_efficiency(results):
    rows, eff = report.scaling_with_workers(report.load_results(results))
    assert eff[400] == pytest.approx(40 / 50)
    assert eff[1600] == pytest.approx(160 / 170)
    assert len(rows) == 2 and "80%" in rows[0] and "94%" in rows[1]


def test_templates_and_size_scaling(results):
    data = report.load_results(results)
    rows = report.scaling_with_templates(data)
    numba = next(r for r in rows if "impl=numba" in r)
    # (0.03 - 0.01) / 223 s per template = 89.7 µs
    assert "90 µs per template" in numba
    size_rows = report.scaling_with_size(data)
    mem = next(r for r in size_rows if "peakmem_ingest" in r)
    assert "(flat)" in mem
    assert not any("Simulate" in r for r in size_rows)  # one size failed: no slope


def test_update_page_keeps_hand_written_text(results, tmp_path):
    data = report.load_results(results)
    page = tmp_path / "benchmarks.md"
    page.write_text("# Benchmarks\n\nIntro.\n\n## Ingest\n\nHand-written.\n")
    report.update_page(page, report.render(data, figure=None))
    first = page.read_text()
    assert first.startswith("# Benchmarks\n\nIntro.\n\n" + report.START)
    assert first.endswith("## Ingest\n\nHand-written.\n")
    assert "failed / skipped" in first and "`box`" in first and "abcdef0123" in first
    # a second run replaces the section, nothing else
    report.update_page(page, "new section\n")
    second = page.read_text()
    assert second.count(report.START) == 1 and "new section" in second
    assert "Intro." in second and second.endswith("Hand-written.\n") and "abcdef0123" not in second


def test_main_writes_page_and_figure(results, tmp_path):
    page = tmp_path / "docs" / "benchmarks.md"
    page.parent.mkdir()
    page.write_text("# Benchmarks\n")
    assert report.main(["--results", str(results), "--out", str(page)]) == 0
    assert (tmp_path / "docs" / report.FIGURE).stat().st_size > 10_000
    assert f"]({report.FIGURE})" in page.read_text()


def test_missing_results_are_a_clear_error(tmp_path, capsys):
    with pytest.raises(report.ReportError, match="run asv first"):
        report.load_results(tmp_path / "nowhere")
    assert (
        report.main(["--results", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x.md")]) == 2
    )
    assert "run asv first" in capsys.readouterr().err


def test_subset_runs_keep_older_results(results):
    """A newer results file with a subset updates those benchmarks and keeps the others."""
    box = results / "box"
    newer = json.loads((box / "abcdef01-existing.json").read_text())
    newer.update(commit_hash="fedcba9876543210", date=newer["date"] + 1000)
    newer["results"] = {
        "bench_simulate.Simulate.time_simulate_survey": [
            [2.0, 20.0],
            [["1000", "10000"]],
            "v",
            9,
            1.0,
        ]
    }
    (box / "fedcba98-existing.json").write_text(json.dumps(newer))
    data = report.load_results(results)
    sim = data["results"]["bench_simulate.Simulate.time_simulate_survey"]
    assert [v for _, v in sim] == [2.0, 20.0]
    assert "bench_rv.TMPerSpectrum.time_tm_one_spectrum" in data["results"]
    assert data["commits"]["fedcba9876"] == ["bench_simulate.Simulate.time_simulate_survey"]
    assert len(data["commits"]["abcdef0123"]) == 4
    assert "`fedcba9876` (1 benchmarks)" in report.render(data, figure=None)


def _survey(n, worker_mb, core_s, tasks):
    return {
        "n_spectra": n,
        "workers": 2,
        "chunk_size": 1000,
        "templates": "real",
        "simulate_and_write_fits_seconds": 1.0,
        "run_wall_seconds": 10.0,
        "stages": {
            "preprocess": {"seconds": 1.0, "cpu_seconds": 2.0, "core_seconds_per_spectrum": 0.001},
            "rvmm": {"seconds": 5.0, "cpu_seconds": 9.0, "core_seconds_per_spectrum": core_s},
        },
        "pipeline_core_seconds_per_spectrum": core_s + 0.001,
        "peak_rss_per_process_MB": {"tcp://a": worker_mb, "tcp://b": worker_mb - 5, "driver": 700},
        "peak_rss_total_MB": 2 * worker_mb + 700,
        "tasks_per_chunk": tasks,
        "machine": {"cpu": "x86_64", "cores": 2, "memory_GiB": 23.5, "python": "3.11",
                    "mspec": "0", "load_average_at_end": [1.0, 1.0, 1.0]},
    }  # fmt: skip


def test_survey_scale_section_checks_the_goals(tmp_path):
    d = tmp_path / "survey"
    d.mkdir()
    tasks = {"preprocess": 20.0, "rvmm": 75.5}
    (d / "a.json").write_text(json.dumps(_survey(10_000, 1000, 0.030, tasks)))
    (d / "b.json").write_text(json.dumps(_survey(100_000, 1050, 0.031, tasks)))
    text = "\n".join(report.survey_scale_section(d))
    assert "| | 10,000 spectra | 100,000 spectra |" in text
    assert "rvmm: core-ms / spectrum | 30.0 (5 s wall) | 31.0 (5 s wall)" in text
    assert "32.0 core-ms per spectrum at 100,000 spectra (goal ≤ 50: met" in text
    assert "(+5%; goal flat within ±10%: met)" in text
    assert "the same at both sizes within 0%" in text
    assert "700 → 700 MiB (+0%; goal flat within ±10%: met; 0.0 KiB per added spectrum)" in text
    assert "all processes together 2,700 → 2,800 MiB (+4%; goal flat within ±10%: met)" in text
    (d / "b.json").write_text(json.dumps(_survey(100_000, 1500, 0.060, {"rvmm": 80.0})))
    text = "\n".join(report.survey_scale_section(d))
    assert "goal ≤ 50: not met" in text and "(+50%; goal flat within ±10%: not met)" in text
    assert "differ by up to 6% between the sizes" in text
    assert report.survey_scale_section(tmp_path / "none") == []
