"""``make demo``: a simulated LAMOST-like survey with known truth through the whole pipeline.

Steps: simulate a survey → write it as LAMOST FITS files of every layout (with a catalogue
carrying the truth and the Gaia/WISE cross-match) → train the CNNs on a separate simulated
training set (``OUT/models``, reusable on real data) → :func:`mspec.run` on a LocalCluster
(ingest, preprocess, SCM, DGCM, RVMM, SPMM, catalog; resumable) → accuracy against the
truth: ``catalog.parquet``, ``accuracy.png``, ``report.md``, ``metrics.json``.

The demo only glues the public API together; stages not built yet are reported as not
available, never faked.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

import numpy as np

log = logging.getLogger("mspec.demo")

__all__ = ["run_demo"]


class _Timer:
    """Each stage's own duration, printed as it finishes and kept for the report."""

    def __init__(self):
        self.stages: list[dict] = []
        self.t0 = time.perf_counter()

    def add(self, stage: str, seconds: float, text: str) -> None:
        self.stages.append({"stage": stage, "seconds": round(float(seconds), 1), "text": text})
        total = time.perf_counter() - self.t0
        print(f"[{total:6.0f} s] {stage}: {seconds:.1f} s — {text}", flush=True)
        log.info("%s (%.1f s): %s", stage, seconds, text)


def run_demo(
    out: str | Path = "demo_output",
    *,
    n_spectra: int = 3000,
    seed: int = 42,
    n_workers: int = 2,
    n_train: int | None = None,
    epochs: int = 8,
    chunk_size: int = 250,
) -> Path:
    """Run the demo and return the path of its report.

    Parameters
    ----------
    out : path-like
        Output directory (created; a rerun resumes the pipeline run in ``OUT/run``).
    n_spectra : int
        Spectra in the simulated survey.
    seed : int
        Random seed of the survey (the training set uses ``seed + 1``).
    n_workers : int
        Workers of the LocalCluster (one thread each).
    n_train : int, optional
        Size of the simulated class-balanced classifier training set (default
        ``2 * n_spectra``); CNN-TLMA trains on a dwarf + giant set of ``3 * n_train // 4``
        (the default models' recipe, :func:`mspec.ml.recipe.train_default_models`).
    epochs : int
        Maximum training epochs per CNN.
    chunk_size : int
        Spectra per store chunk.

    Returns
    -------
    pathlib.Path
        The Markdown accuracy report.
    """
    for name, value, lo in (
        ("n_spectra", n_spectra, 10),
        ("n_workers", n_workers, 1),
        ("epochs", epochs, 1),
        ("chunk_size", chunk_size, 1),
    ):
        if not isinstance(value, int | np.integer) or isinstance(value, bool) or value < lo:
            raise ValueError(f"{name} must be an integer >= {lo}, got {value!r}")
    if n_train is not None and (not isinstance(n_train, int) or n_train < 50):
        raise ValueError(f"n_train must be an integer >= 50, got {n_train!r}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    timer = _Timer()
    n_train = n_train or 2 * n_spectra

    catalogs = _simulate(timer, out, n_spectra, seed)
    models = _train(timer, out, n_train, seed, epochs)
    result = _pipeline(timer, out, catalogs, models, n_workers, chunk_size)
    return _evaluate(timer, out, result)


def _simulate(timer: _Timer, out: Path, n: int, seed: int) -> list[str]:
    import mspec
    from mspec.io import write_lamost_fits

    t0 = time.perf_counter()
    truth = mspec.simulate_survey(n, seed=seed)
    classes, counts = np.unique(truth["true_class"].values, return_counts=True)
    timer.add(
        "simulate",
        time.perf_counter() - t0,
        f"{n} spectra: " + ", ".join(f"{c} {k}" for c, k in zip(classes, counts)),
    )
    t0 = time.perf_counter()
    fits_dir = out / "fits"
    layouts = ["image", "table", "oldest"]
    parts = np.array_split(np.arange(n), len(layouts))
    nfiles = 0
    for layout, idx in zip(layouts, parts):
        target = fits_dir / layout
        if (target / "catalog.parquet").is_file():
            nfiles += len(list(target.glob("*.fits*")))
            continue  # a rerun reuses the files (same seed, same survey)
        nfiles += len(
            write_lamost_fits(truth.isel(spectra=idx), target, layout=layout, progress=True)
        )
    timer.add(
        "write FITS",
        time.perf_counter() - t0,
        f"{nfiles} LAMOST FITS files in the layouts {layouts} under {fits_dir}",
    )
    # the catalogues beside the FITS files carry obsids, truth and the Gaia/WISE cross-match
    # into the store, like a LAMOST catalogue joined with external tables
    return [str(fits_dir / lay / "catalog.parquet") for lay in layouts]


def _train(timer: _Timer, out: Path, n_train: int, seed: int, epochs: int) -> Path:
    from mspec.pipeline.models import build_default_models, models_ready

    t0 = time.perf_counter()
    models = out / "models"
    reused = models_ready(models)
    build_default_models(
        models, n_train=n_train, epochs=epochs, folds=5, seed=seed, threads=1, progress=True
    )
    info = json.loads((models / "models.json").read_text()) if not reused else {}
    acc = info.get("val_accuracy", {})
    text = (
        f"reused the models in {models}"
        if reused
        else f"CNN-SPT/WDM/dMgM on {n_train} class-balanced and the CNN-TLMA dM/gM "
        f"ensembles on {info.get('n_tlma')} dwarf + giant separate simulated spectra "
        f"(recipe {info.get('model_recipe_version')}) into {models}; validation accuracy "
        + ", ".join(f"{k} {v:.3f}" for k, v in acc.items() if v is not None)
    )
    timer.add("train CNNs", time.perf_counter() - t0, text)
    return models


def _pipeline(timer: _Timer, out: Path, catalogs, models: Path, n_workers: int, chunk: int):
    import mspec
    from mspec.config import Config

    cfg = Config.from_dict(
        {
            "sources": catalogs,
            "store": str(out / "spectra.zarr"),
            "run_dir": str(out / "run"),
            "chunk_size": chunk,
            "cluster": {"n_workers": n_workers, "threads_per_worker": 1},
            "models": {"dir": str(models)},
            # the simulator's own template grid: TM on simulated spectra
            "templates": {"set": "demo"},
        }
    )
    t0 = time.perf_counter()
    try:
        result = mspec.run(cfg, progress=True)
    except mspec.StageChangedError:
        # an older demo output: start the run over rather than refuse
        log.warning("the run in %s is from another configuration; redoing it", out / "run")
        result = mspec.run(cfg, progress=True, redo=["preprocess"])
    for name, info in result.stages.items():
        text = ", ".join(
            f"{k} {info[k]}" for k in ("computed", "skipped", "stored", "quarantined") if k in info
        )
        if info.get("core_seconds_per_spectrum"):
            text += f", {info['core_seconds_per_spectrum'] * 1000:.1f} core-ms per spectrum"
        timer.add(f"run: {name}", info.get("seconds", 0.0), text or info.get("status", ""))
    log.info("pipeline run took %.1f s in all", time.perf_counter() - t0)
    return result


def _evaluate(timer: _Timer, out: Path, result) -> Path:
    import pandas as pd

    from mspec.plots import accuracy_figure, confusion_figure
    from mspec.report import accuracy_metrics, write_report

    t0 = time.perf_counter()
    cat_path = out / "catalog.parquet"
    src = Path(result.catalog)
    if cat_path.exists():
        shutil.rmtree(cat_path) if cat_path.is_dir() else cat_path.unlink()
    shutil.copytree(src, cat_path) if src.is_dir() else shutil.copy(src, cat_path)
    cat = pd.read_parquet(cat_path)
    metrics = accuracy_metrics(cat)
    accuracy_figure(cat, out / "accuracy.png")
    spt = metrics.get("classification", {}).get("spt", {})
    if spt.get("confusion"):
        confusion_figure(spt["confusion"], None, out / "confusion_spt.png", title="CNN-SPT")
    timer.add("evaluate", time.perf_counter() - t0, "metrics against the truth, figures")
    notes = [
        "Simulated survey with known truth; the CNNs are trained on a separate simulated set.",
        *(f"not available: {x}" for x in result.not_available),
        f"pipeline run directory: {result.run_dir} (resumable; `mspec info {result.run_dir}`)",
        f"HTML run report with figures: {result.report or '(not written: see demo.log)'}",
    ]
    report = write_report(out, cat, stages=timer.stages, metrics=metrics, notes=notes)
    print(f"report: {report}")
    if result.report:
        print(f"HTML run report: {result.report}")
    return report
