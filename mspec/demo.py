"""``make demo``: a simulated LAMOST-like survey with known truth, end to end on a LocalCluster.

Steps: simulate a survey -> write it as LAMOST FITS files of every layout -> ingest them into
a Zarr store on the cluster -> preprocess -> train the CNNs on a separate simulated training
set -> classify and parametrise the survey -> measure RVs by template matching -> write a
catalog (Parquet), plots and an accuracy report against the truth.

Each stage reports what it did; a stage whose module is not available is reported as skipped,
never faked.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np

log = logging.getLogger("mspec.demo")

#: Per-spectrum variables copied into the demo catalog when present.
CATALOG_COLUMNS = [
    "obsid", "ra", "dec", "mjd", "snr_u", "snr_g", "snr_r", "snr_i", "snr_z",
    "orp_u", "orp_g", "orp_r", "orp_i", "orp_z", "lamost_class", "lamost_subclass",
    "lamost_rv", "spt_class", "wdm_class", "dmgm_class", "rv_tm", "rv_tm_err",
    "rv_tm_err_stat", "rv_tml7500", "rv_tml7500_err", "tm_template", "tm_status", "teff", "teff_err", "logg",
    "logg_err", "m_h", "m_h_err", "alpha_m", "alpha_m_err",
    "true_class", "true_lumclass", "true_teff", "true_logg", "true_m_h", "true_alpha_m",
    "true_rv", "true_active",
]  # fmt: skip


class _Report:
    """Collects what each stage did, for the terminal and for report.md."""

    def __init__(self, out: Path):
        self.out = out
        self.lines: list[str] = []
        self.metrics: dict = {}
        self.t0 = time.perf_counter()

    def stage(self, name: str, text: str) -> None:
        msg = f"[{time.perf_counter() - self.t0:7.1f} s] {name}: {text}"
        print(msg, flush=True)
        self.lines.append(f"- **{name}** ({time.perf_counter() - self.t0:.0f} s): {text}")

    def write(self) -> Path:
        path = self.out / "report.md"
        body = [
            "# mspec demo report",
            "",
            *self.lines,
            "",
            "## Metrics",
            "",
            "```json",
            json.dumps(self.metrics, indent=2, default=float),
            "```",
            "",
        ]
        path.write_text("\n".join(body))
        (self.out / "metrics.json").write_text(json.dumps(self.metrics, indent=2, default=float))
        return path


def _robust_sigma(x: np.ndarray) -> float:
    x = np.asarray(x, float)
    x = x[np.isfinite(x)]
    if x.size == 0:
        return float("nan")
    return float(1.4826 * np.median(np.abs(x - np.median(x))))


def run_demo(
    out: str | Path = "demo_output",
    *,
    n_spectra: int = 3000,
    seed: int = 42,
    n_workers: int = 2,
    n_train: int | None = None,
    epochs: int = 8,
    chunk_size: int = 500,
) -> Path:
    """Run the demo and return the path of its report.

    Parameters
    ----------
    out : path-like
        Output directory (created; an existing store in it is reused by ingest's resume).
    n_spectra : int
        Number of spectra in the simulated survey.
    seed : int
        Random seed of the survey (the training set uses ``seed + 1``).
    n_workers : int
        Workers of the LocalCluster (one thread each).
    n_train : int, optional
        Size of the simulated CNN training set (default ``2 * n_spectra``).
    epochs : int
        Maximum training epochs per CNN.
    chunk_size : int
        Spectra per store chunk.

    Returns
    -------
    pathlib.Path
        The Markdown accuracy report.
    """
    if n_spectra < 10:
        raise ValueError(f"n_spectra must be at least 10, got {n_spectra}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rep = _Report(out)
    n_train = n_train or 2 * n_spectra

    from distributed import Client, LocalCluster

    with (
        LocalCluster(
            n_workers=n_workers,
            threads_per_worker=1,
            dashboard_address="127.0.0.1:0",
            processes=True,
        ) as cluster,
        Client(cluster) as client,
    ):
        rep.stage(
            "cluster", f"LocalCluster with {n_workers} workers, dashboard {client.dashboard_link}"
        )
        ds = _stage_survey(rep, out, n_spectra, seed, client, chunk_size)
        ds = _stage_preprocess(rep, ds)
        ds = _stage_cnn(rep, out, ds, n_train, seed, epochs)
        ds = _stage_rv(rep, ds)
        ds = _stage_tlma(rep, out, ds)
        _stage_catalog(rep, out, ds)
    path = rep.write()
    print(f"report: {path}")
    return path


def _stage_survey(rep: _Report, out: Path, n: int, seed: int, client, chunk_size: int):
    import mspec
    from mspec.io import write_lamost_fits

    truth = mspec.simulate_survey(n, seed=seed)
    classes, counts = np.unique(truth["true_class"].values, return_counts=True)
    rep.stage("simulate", f"{n} spectra: " + ", ".join(f"{c} {k}" for c, k in zip(classes, counts)))
    fits_dir = out / "fits"
    layouts = ["image", "table", "oldest"]
    parts = np.array_split(np.arange(n), len(layouts))
    nfiles = 0
    for layout, idx in zip(layouts, parts):
        nfiles += len(write_lamost_fits(truth.isel(spectra=idx), fits_dir / layout, layout=layout))
    rep.stage("write FITS", f"{nfiles} LAMOST FITS files in layouts {layouts} under {fits_dir}")
    store = out / "spectra.zarr"
    # the catalogues written beside the FITS files carry obsids, truth and the Gaia/WISE
    # cross-match into the store, like a LAMOST catalogue joined with external tables
    summary = mspec.ingest(
        [str(fits_dir / lay / "catalog.parquet") for lay in layouts],
        str(store),
        chunk_size=chunk_size,
        client=client,
    )
    rep.stage(
        "ingest",
        ", ".join(
            f"{k} {summary[k]}" for k in ("stored", "quarantined", "duplicates", "files_per_second")
        ),
    )
    ds = mspec.open_store(str(store))
    missing = [v for v in truth.data_vars if v.startswith("true_") and v not in ds]
    if missing:
        raise RuntimeError(f"truth columns {missing} did not reach the store")
    rep.metrics["n_spectra"] = int(ds.sizes["spectra"])
    return ds


def _stage_preprocess(rep, ds):
    from mspec import preprocess

    ds = preprocess(ds, recipe="cnn")
    rep.stage("preprocess", "steps 1,3,4a,5 (cnn recipe) added lazily: flux_grid, orp_*, status")
    return ds


def _stage_cnn(rep, out: Path, ds, n_train: int, seed: int, epochs: int):
    import mspec
    from mspec import ml
    from mspec.preprocess import preprocess  # noqa: F401  (callable package)

    model_root = out / "models"
    train = mspec.simulate_survey(n_train, seed=seed + 1)
    # one torch thread per process: with 2 threads on 2 busy cores training crawls
    metrics = ml.train_all_demo(train, model_root, epochs=epochs, folds=5, seed=seed, threads=1)
    rep.metrics["training"] = metrics
    summary = {k: v.get("val_accuracy") for k, v in metrics.items() if k in ("spt", "wdm", "dmgm")}
    rep.stage(
        "train CNNs",
        f"on {n_train} separate simulated spectra in "
        f"{sum(metrics['seconds'].values()):.0f} s; validation accuracy {summary}",
    )
    for kind in ("spt", "wdm", "dmgm"):
        ds = ml.predict(ds, model_root / kind)
    rep.stage(
        "CNN inference", "spt/wdm/dmgm probabilities and classes (lazy, batched, map over chunks)"
    )
    return ds


def _stage_tlma(rep, out: Path, ds):
    from mspec import ml
    from mspec.preprocess import preprocess  # noqa: F401  (callable package)

    # rest frame from the TM radial velocity (paper step 2), then the dM/gM ensemble chosen
    # by CNN-dMgM's class
    rest = preprocess(ds[["flux", "ivar", "ormask", "andmask"]], recipe="tlma", rv=ds["rv_tm"])
    res = ml.predict(rest, out / "models" / "tlma", lumclass=ds["dmgm_class"])
    names = ("teff", "teff_err", "logg", "logg_err", "m_h", "m_h_err", "alpha_m", "alpha_m_err")
    ds = ds.assign({v: res[v] for v in names})
    rep.stage(
        "CNN-TLMA", "Teff, logg, [M/H], [alpha/M] (ensemble mean and std) in the TM rest frame"
    )
    return ds


def _stage_rv(rep, ds):
    from mspec import template_match
    from mspec.rv.templates import default_templates

    tpl = default_templates("demo")
    tm = template_match(ds, templates=tpl)
    tml = template_match(ds, templates=tpl, wave_max=7500.0)
    ds = ds.assign(
        {k: tm[k] for k in ("rv_tm", "rv_tm_err", "rv_tm_err_stat", "tm_template", "tm_status")}
    )
    ds = ds.assign({k: tml[k] for k in tml.data_vars if k.startswith(("rv_tml7500", "tml7500"))})
    rep.stage("RV", f"TM and TML7500 against {tpl.sizes['templates']} simulator templates (lazy)")
    return ds


def _stage_catalog(rep, out: Path, ds):
    import dask.dataframe as dd

    from mspec.io.zarrio import read_results, write_results

    cols = [c for c in CATALOG_COLUMNS if c in ds.variables and ds[c].dims == ("spectra",)]
    # One compute for every stage: the per-spectrum results go to a Zarr group chunk by chunk
    # (building the DataFrame straight from the lazy graph would recompute it per column).
    results = out / "results.zarr"
    write_results(ds[cols].reset_coords(), results)
    rep.stage(
        "compute",
        f"all stages computed on the cluster; {len(cols)} per-spectrum results in {results}",
    )
    df = read_results(results).to_dask_dataframe()
    path = out / "catalog.parquet"
    df.to_parquet(str(path), write_index=False, overwrite=True)
    rep.stage("catalog", f"{len(cols)} columns written to {path} (dask DataFrame)")
    cat = dd.read_parquet(str(path)).compute()
    _accuracy(rep, out, cat)


def _accuracy(rep, out: Path, cat) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = rep.metrics
    if "spt_class" in cat:
        spt_truth = cat["true_class"].replace({"WD": "OB"})  # SPT has no WD class
        m["spt_accuracy"] = float((cat["spt_class"] == spt_truth).mean())
    isM = cat["true_class"] == "M"
    if "dmgm_class" in cat:
        m["dmgm_accuracy_on_M"] = float(
            (cat.loc[isM, "dmgm_class"] == cat.loc[isM, "true_lumclass"]).mean()
        )
    good = isM & (cat["snr_i"] > 20)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    if "rv_tm" in cat:
        d = (cat["rv_tm"] - cat["true_rv"])[good]
        m["rv_tm_bias_kms"] = float(np.nanmedian(d))
        m["rv_tm_robust_sigma_kms"] = _robust_sigma(d)
        axes[0].scatter(cat.loc[good, "true_rv"], d, s=4)
        axes[0].set(
            xlabel="true RV (km/s)",
            ylabel="rv_tm - true (km/s)",
            title="TM RV, M stars, S/N_i > 20",
        )
    if "teff" in cat:
        d = (cat["teff"] - cat["true_teff"])[good]
        m["teff_bias_K"] = float(np.nanmedian(d))
        m["teff_robust_sigma_K"] = _robust_sigma(d)
        axes[1].scatter(cat.loc[good, "true_teff"], cat.loc[good, "teff"], s=4)
        axes[1].set(xlabel="true Teff (K)", ylabel="CNN-TLMA Teff (K)", title="TLMA Teff")
    fig.tight_layout()
    fig.savefig(out / "accuracy.png", dpi=110)
    plt.close(fig)
    rep.stage("accuracy", ", ".join(f"{k} = {v:.3g}" for k, v in m.items() if isinstance(v, float)))
