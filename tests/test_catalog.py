"""mspec.catalog on a real (tiny) pipeline run: the V0-V3 cascade, the recommended catalog
(Table 9), Parquet/FITS round trips, provenance, diff between runs, the CLI; and
mspec.compare on an injected offset and scatter.

The run comes from ``mspec.run`` on ``tiny_survey_store`` + ``tiny_models``. Where the run
lacks the SCM / DGCM decisions or the RV reconciliation (stages built in parallel with the
catalog), the test writes synthetic stage groups into ``RUN/stages/`` itself
(``test_scm.zarr``, ``test_dgcm.zarr``, ``test_reconcile.zarr``, with the variables and
dtypes those stages publish: ``entered``/``is_m``/``scm_class``/``scm_prob``/``scm_reason``,
``luminosity_class``/``dgcm_prob``/``dgcm_reason``, ``rv``/``rv_err``/``rv_from``/
``rv_inspect``); once those stages are in the pipeline, their own outputs are used and the
invariants are checked on them.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import dask.dataframe as dd
import numpy as np
import pandas as pd
import pytest
import xarray as xr

import mspec
from mspec.catalog import (
    CATALOG_KEYS,
    PROVENANCE_COLUMNS,
    TABLE9,
    CatalogError,
    build_catalog,
    catalog_summary,
    diff_catalogs,
    diff_runs,
    read_catalog,
    write,
)
from mspec.compare import compare_catalogs, comparison_figure, internal_error_figure
from mspec.config import Config
from mspec.flags import ParameterFlagFit
from mspec.io.zarrio import read_results, write_results
from mspec.testing import raise_if_computes, tiny_models, tiny_survey_store

N, CHUNK = 32, 16

pytestmark = [pytest.mark.slow]

TABLE9_DTYPES = {
    "obsid": "int64", "ra": "float64", "dec": "float64",
    **{f"snr_{b}": "float64" for b in "ugriz"}, **{f"orp_{b}": "float64" for b in "ugriz"},
    "subclass": "string", "luminosity_class": "string", "rv": "float64", "rv_err": "float64",
    "rv_from": "string", "teff": "float64", "teff_err": "float64", "logg": "float64",
    "logg_err": "float64", "m_h": "float64", "m_h_err": "float64", "alpha_m": "float64",
    "alpha_m_err": "float64", "rv_flag": "int8", "parameter_flag": "int8",
    "source_id": "Int64", "r_med_geo": "float64", "ebv": "float64", "bp_rp_0": "float64",
    "M_G_0": "float64", "CMD_flag": "Int8", "CMD_pos": "string", "W1_W2_0": "float64",
    "e_W1": "float64", "e_W2": "float64",
}  # fmt: skip
TABLE9_UNITS = {"ra": "deg", "dec": "deg", "rv": "km/s", "rv_err": "km/s", "teff": "K",
                "teff_err": "K", "logg": "dex", "m_h": "dex", "alpha_m_err": "dex",
                "r_med_geo": "pc", "ebv": "mag", "bp_rp_0": "mag", "M_G_0": "mag",
                "W1_W2_0": "mag", "e_W1": "mag", "e_W2": "mag", "obsid": "", "rv_flag": ""}  # fmt: skip


def _lamost_m(sub) -> np.ndarray:
    return pd.Series(np.asarray(sub, dtype=str)).str.match(r"(?i)^\s*(dM|gM|sdM|M)").to_numpy()


def _synthetic_groups(run_dir: Path) -> dict:
    """Known SCM / DGCM / reconciliation outputs for every spectrum.

    A variable no stage of the run gives is written to ``RUN/stages/test_decisions.zarr``;
    one the run has (once those stages are in the pipeline) is overwritten in place, so the
    test knows the cascade whatever the tiny CNNs decide.
    """
    ds = mspec.open_store(_store_of(run_dir))
    n = ds.sizes["spectra"]
    sub = ds["lamost_subclass"].values
    true_cls = ds["true_class"].values
    true_lum = ds["true_lumclass"].values
    entered = _lamost_m(sub)
    ent_idx = np.flatnonzero(entered)
    is_m = entered & (true_cls == "M")
    is_m[ent_idx[:2]] = False  # two more rejects, whatever the truth
    cls = np.where(entered, np.where(is_m, "M", np.where(true_cls == "M", "K", true_cls)), "")
    lum = np.where(is_m, np.where(true_lum == "gM", "gM", "dM"), "")
    lum[np.flatnonzero(is_m)[0]] = ""  # a DGCM reject
    rng = np.random.default_rng(5)
    rv = ds["true_rv"].values + rng.normal(0, 3, n)
    rv_from = np.array(["LAMOST", "TM", "DSAL I", "DSAL II", "TML7500", "DSEL"])[np.arange(n) % 6]
    rv_from[3] = "NoRV_lowQuality"
    rv[3] = np.nan
    values = {
        "entered": entered,
        "is_m": is_m,
        "scm_class": cls.astype("U8"),
        "scm_prob": np.where(entered, 0.95, np.nan),
        "scm_reason": np.where(entered, np.where(is_m, "direct", "spt_non_m"), "").astype("U16"),
        "luminosity_class": lum.astype("U2"),
        "dgcm_prob": np.where(lum != "", 0.9, np.nan),
        "dgcm_reason": np.where(lum != "", "all_agree", "").astype("U16"),
        "rv": rv,
        "rv_err": np.where(np.isfinite(rv), 3.0, np.nan),
        "rv_from": rv_from.astype("U16"),
        "rv_inspect": np.where(np.arange(n) % 7 == 0, "abs_rv_gt_150", "").astype("U16"),
    }
    have = {}
    for g in sorted((run_dir / "stages").glob("*.zarr")):
        for v in read_results(g).data_vars:
            have.setdefault(v, g)
    if "rv_flag" in have:  # the run's own rv_flag must follow the rv written here
        mjd = ds["mjd"].values.astype(float)
        values["rv_flag"] = (np.isfinite(rv) & (mjd > 55940)).astype(np.int8)
    new = {}
    for name, v in values.items():
        if name in have:
            _edit(run_dir, name, range(n), list(v))
        else:
            new[name] = ("spectra", v)
    if new:
        write_results(
            xr.Dataset(new).chunk({"spectra": CHUNK}), run_dir / "stages" / "test_decisions.zarr"
        )
    return {"values": values, "overwritten": sorted(set(values) & set(have))}


def _store_of(run_dir: Path) -> str:
    return mspec.load_config(run_dir / "config.resolved.toml").store


def _read_var(run_dir: Path, name: str) -> np.ndarray:
    for g in sorted((run_dir / "stages").glob("*.zarr")):
        grp = read_results(g)
        if name in grp:
            return grp[name].values
    raise KeyError(name)


def _edit(run_dir: Path, name: str, idx, values) -> None:
    """Change a persisted stage output in place (to make a known difference between runs)."""
    import zarr

    for g in sorted((run_dir / "stages").glob("*.zarr")):
        grp = zarr.open_group(str(g), mode="r+")
        if name in dict(grp.arrays()):
            arr = grp[name]
            for i, v in zip(idx, values, strict=True):
                arr[int(i)] = v
            return
    raise KeyError(name)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    base = tmp_path_factory.mktemp("catalog_run")
    models = tiny_models(base / "models")
    store = tiny_survey_store(base / "survey", N, seed=3, chunk_size=CHUNK)
    cfg = Config.from_dict(
        {
            "store": str(store),
            "run_dir": str(base / "run"),
            "chunk_size": CHUNK,
            "cluster": {"scheduler": "sync"},
            "models": {"dir": str(models)},
            "templates": {"set": "demo"},
            "rv": {"oversample": 3},  # coarse velocity lattice: fast, same plumbing
        }
    )
    mspec.run(cfg)
    run = base / "run"
    synthetic = _synthetic_groups(run)
    return run, synthetic


@pytest.fixture(scope="module")
def cats(run_dir):
    return build_catalog(run_dir[0])


@pytest.fixture(scope="module")
def frames(cats):
    import dask

    return dict(zip(cats, dask.compute(*cats.values()), strict=True))


# --------------------------------------------------------------------------- cascade


def test_cascade_counts_are_consistent(run_dir, cats, frames):
    _, synthetic = run_dir
    assert list(cats) == list(CATALOG_KEYS)
    assert all(isinstance(df, dd.DataFrame) for df in cats.values())
    v0, v1, v2, v3 = (frames[f"M_Catalog_V{i}"] for i in range(4))
    rec, nonm = frames["recommended"], frames["non_M_Catalog"]
    o = {k: set(df["obsid"]) for k, df in frames.items()}
    rej1 = set(nonm.obsid[nonm.catalog == "non-M_Catalog_V1"])
    rej2 = set(nonm.obsid[nonm.catalog == "non-M_Catalog_V2"])
    # V0 = V1 + non-M from V1; V1 = V2 + non-M from V2; V3 subset of V2; recommended = V3
    assert len(v0) == len(v1) + len(rej1) and o["M_Catalog_V0"] == o["M_Catalog_V1"] | rej1
    assert not (o["M_Catalog_V1"] & rej1)
    assert len(v1) == len(v2) + len(rej2) and o["M_Catalog_V1"] == o["M_Catalog_V2"] | rej2
    assert o["M_Catalog_V3"] <= o["M_Catalog_V2"]
    assert o["recommended"] == o["M_Catalog_V3"] and len(rec) == len(v3)
    assert len(nonm) == len(rej1) + len(rej2)
    assert v0.obsid.is_unique and rec.obsid.is_unique
    val = synthetic["values"]
    assert len(v0) == int(val["entered"].sum())
    assert len(rej1) == int((val["entered"] & ~val["is_m"]).sum()) >= 2
    assert (nonm.type[nonm.catalog == "non-M_Catalog_V1"] != "").all()
    assert set(nonm.reason[nonm.catalog == "non-M_Catalog_V1"]) == {"spt_non_m"}
    assert len(rej2) == 1
    assert nonm.type[nonm.catalog == "non-M_Catalog_V2"].tolist() == ["UNKNOWN"]
    assert set(v2.luminosity_class) <= {"dM", "gM"}
    # the summary says the same
    summ = catalog_summary(cats)
    get = summ.set_index(["section", "item"])["count"]
    assert get[("M_Catalog_V0", "spectra")] == len(v0)
    assert get[("SCM (Table 1)", "M_Catalog_V1")] == len(v1)
    assert get[("SCM (Table 1)", "non-M_Catalog_V1")] == len(rej1)
    assert get[("DGCM (Table 4)", "M_Catalog_V2")] == len(v2)
    assert get[("DGCM (Table 4)", "non-M_Catalog_V2")] == len(rej2)
    assert get[("RVMM (Table 7)", "M_Catalog_V3")] == len(v3)
    n_from = sum(
        int(get[("RVMM (Table 7)", f"rv_from {v}")])
        for v in ("LAMOST", "TM", "DSAL I", "DSAL II", "TML7500", "DSEL", "NoRV_lowQuality",
                  "NoRV_waveErr")
    )  # fmt: skip
    assert n_from == int((v3.rv_from != "").sum())
    assert get[("RVMM (Table 7)", "rv_flag = 1")] == int(v3.rv_flag.sum())
    assert get[("recommended", "parameter_flag = 1")] == int(rec.parameter_flag.sum())


def test_recommended_has_every_table9_column_with_dtype_and_units(cats, frames):
    rec = frames["recommended"]
    names = [c.name for c in TABLE9]
    assert list(rec.columns[: len(names)]) == names
    assert len(names) == 38 and set(names) == set(TABLE9_DTYPES)
    for c, dt in TABLE9_DTYPES.items():
        got = str(rec[c].dtype)
        assert (got == dt) or (dt == "string" and isinstance(rec[c].dtype, pd.StringDtype)), c
    for c, u in TABLE9_UNITS.items():
        assert cats.columns[c].unit == u, c
        assert cats.columns[c].description, c
    # rv_flag is the paper's rule on rv and mjd (no reconciliation rv_flag in this run)
    v3 = frames["M_Catalog_V3"].set_index("obsid")
    mjd = v3.loc[rec.obsid, "mjd"].to_numpy()
    expect = (np.isfinite(rec.rv.to_numpy()) & (mjd > 55940)).astype(np.int8)
    np.testing.assert_array_equal(rec.rv_flag.to_numpy(), expect)
    # parameter_flag 0 comes with a reason, 1 without
    assert (rec.parameter_flag_reason[rec.parameter_flag == 1] == "").all()
    assert (rec.parameter_flag_reason[rec.parameter_flag == 0] != "").all()
    assert set(rec.parameter_flag.unique()) <= {0, 1}
    # Gaia source_id: null where no match (never -1)
    assert (rec.source_id.dropna() > 0).all()


def test_provenance_columns_and_fit_saved(run_dir, cats, frames):
    run = run_dir[0]
    inputs = json.loads((run / "inputs.json").read_text())
    for df in frames.values():
        for c in PROVENANCE_COLUMNS:
            assert c in df.columns and df[c].nunique() <= 1
    rec = frames["recommended"]
    assert rec.prov_mspec_version.iloc[0] == mspec.__version__
    assert rec.prov_templates.iloc[0] == inputs["templates_sha256"][:16]
    assert cats.provenance["templates_sha256"] == inputs["templates_sha256"]
    assert len(cats.provenance["models_sha256"]) == 64
    assert rec.prov_models.iloc[0] == cats.provenance["models_sha256"][:16]
    assert rec.prov_config.iloc[0] == cats.provenance["config_sha256"][:16]
    saved = ParameterFlagFit.from_json(run / "catalog" / "parameter_flag.json")
    assert saved.to_dict() == cats.parameter_fit.to_dict()


def test_build_is_lazy_given_a_fit(run_dir, cats):
    with raise_if_computes():
        again = build_catalog(run_dir[0], parameter_fit=cats.parameter_fit, save_fit=False)
    assert list(again) == list(CATALOG_KEYS)


# --------------------------------------------------------------------------- writers


def test_parquet_and_fits_round_trip(tmp_path, cats, frames):
    written = write(cats, tmp_path / "out")
    assert set(written) == set(CATALOG_KEYS)
    for key, df in frames.items():
        orig = df.reset_index(drop=True)
        for fmt in ("parquet", "fits"):
            back = read_catalog(written[key][fmt])
            pd.testing.assert_frame_equal(orig, back, check_dtype=True, obj=f"{key} {fmt}")
    # Parquet: several files (partitioned), units and descriptions in the schema
    import pyarrow.parquet as pq

    files = sorted(Path(written["M_Catalog_V0"]["parquet"]).glob("*.parquet"))
    assert len(files) == cats["M_Catalog_V0"].npartitions >= 2
    schema = pq.read_schema(files[0] if files else written["recommended"]["parquet"])
    rschema = pq.read_schema(next(Path(written["recommended"]["parquet"]).glob("*.parquet")))
    assert rschema.field("teff").metadata[b"unit"] == b"K"
    assert rschema.field("rv").metadata[b"unit"] == b"km/s"
    assert b"Effective temperature" in rschema.field("teff").metadata[b"description"]
    meta = json.loads(rschema.metadata[b"mspec"])
    assert meta["columns"]["logg"]["unit"] == "dex"
    assert meta["provenance"]["templates_sha256"] == cats.provenance["templates_sha256"]
    assert schema.metadata is not None
    # FITS: TUNITn, column descriptions and provenance cards
    from astropy.io import fits

    with fits.open(written["recommended"]["fits"]) as hl:
        h = hl[1].header
        cols = {h[f"TTYPE{i}"]: i for i in range(1, h["TFIELDS"] + 1)}
        assert h[f"TUNIT{cols['teff']}"] == "K" and h[f"TUNIT{cols['logg']}"] == "dex"
        assert h[f"TUNIT{cols['ra']}"] == "deg"
        assert h["TEMPLSHA"] == cats.provenance["templates_sha256"]
        assert h["MSPECVER"] == mspec.__version__
    assert (tmp_path / "out" / "parameter_flag.json").is_file()


def test_write_bad_arguments(tmp_path, cats):
    with pytest.raises(ValueError, match="formats"):
        write(cats, tmp_path, formats=("csv",))
    with pytest.raises(KeyError, match="keys"):
        write(cats, tmp_path, keys=["M_Catalog_V9"])
    with pytest.raises(CatalogError, match="does not exist"):
        read_catalog(tmp_path / "nope.fits")


# --------------------------------------------------------------------------- robustness


def test_absent_and_unfinished_stages_never_crash(tmp_path, run_dir):
    run = tmp_path / "run"
    shutil.copytree(run_dir[0], run)
    # reconciliation and SPMM absent; one DGCM chunk unfinished
    shutil.rmtree(run / "stages" / "spmm.zarr")
    for name in ("rv", "rv_err", "rv_from", "rv_flag", "rv_inspect"):
        for g in (run / "stages").glob("*.zarr"):
            shutil.rmtree(g / name, ignore_errors=True)
    done = sorted((run / "stages" / "preprocess.done").glob("*.json"))
    done[-1].unlink()
    cats = build_catalog(run)
    text = " ".join(cats.notes)
    assert "SPMM" in text and "unfinished" in text and "preprocess" in text
    rec = cats["recommended"].compute()
    assert rec.teff.isna().all() and (rec.parameter_flag == 0).all()
    assert rec.rv.isna().all() and (rec.rv_flag == 0).all() and (rec.rv_from == "").all()
    assert "RVMM reconciliation" in text
    # rows of the unfinished preprocess chunk have null orp_*
    v1 = cats["M_Catalog_V1"].compute()
    a, b = (int(x) for x in done[-1].stem.split("-"))
    ids = mspec.open_store(_store_of(run))["obsid"].values[a:b]
    assert v1.set_index("obsid").loc[v1.obsid[v1.obsid.isin(ids)], "orp_i"].isna().all()
    summ = catalog_summary(cats)
    assert (summ.section == "notes").sum() == len(cats.notes)


def test_group_of_another_store_is_skipped(tmp_path, run_dir):
    run = tmp_path / "run"
    shutil.copytree(run_dir[0], run)
    ids = mspec.open_store(_store_of(run))["obsid"].values
    g = xr.Dataset(
        {"bogus_var": ("spectra", np.arange(len(ids), dtype=np.float64))},
        coords={"obsid": ("spectra", ids[::-1].copy())},
    ).chunk({"spectra": CHUNK})
    write_results(g, run / "stages" / "zz_other.zarr")
    cats = build_catalog(run, save_fit=False)
    assert any("zz_other" in t and "differ" in t for t in cats.notes)
    assert "bogus_var" not in cats["M_Catalog_V3"].columns


def test_not_a_run_directory(tmp_path):
    with pytest.raises(CatalogError, match="not an mspec run directory"):
        build_catalog(tmp_path)


# --------------------------------------------------------------------------- diff


def test_diff_two_runs_with_known_changes(tmp_path, run_dir, frames):
    run_a = run_dir[0]
    run_b = tmp_path / "run_b"
    shutil.copytree(run_a, run_b)
    rec = frames["recommended"]
    store_ids = mspec.open_store(_store_of(run_a))["obsid"].values
    pos = {int(o): i for i, o in enumerate(store_ids)}
    dm = rec[rec.luminosity_class == "dM"].obsid.to_numpy()
    have_rv = rec[np.isfinite(rec.rv) & (rec.luminosity_class == "dM")].obsid.to_numpy()
    flip = [pos[int(o)] for o in dm[:2]]
    _edit(run_b, "luminosity_class", flip, ["gM", "gM"])
    moved = [pos[int(o)] for o in have_rv[2:5]]
    old_rv = _read_var(run_a, "rv")
    _edit(run_b, "rv", moved, [float(old_rv[i]) + 200.0 for i in moved])
    hot = [pos[int(o)] for o in have_rv[5:7]]
    old_t = _read_var(run_a, "teff")
    _edit(run_b, "teff", hot, [float(old_t[i]) + 3000.0 for i in hot])
    d = diff_runs(run_a, run_b)
    c = d.attrs["counts"]
    assert c["added"] == 0 and c["removed"] == 0
    assert c["reclassified"] == 2 and set(d.obsid[d.change.str.contains("reclassified")]) == set(
        dm[:2]
    )
    assert c["rv"] == 3 and set(d.obsid[d.change.str.contains("rv")]) == set(have_rv[2:5])
    assert c["parameters"] >= 2
    assert set(have_rv[5:7]) <= set(d.obsid[d.parameters_changed.str.contains("teff")])
    row = d.set_index("obsid").loc[have_rv[2]]
    assert row.rv_b - row.rv_a == pytest.approx(200.0)
    assert set(d.class_b[d.change.str.contains("reclassified")]) == {"gM"}
    # identical runs: nothing
    assert len(diff_runs(run_a, run_a)) == 0


def test_diff_added_and_removed(cats):
    drop = cats["M_Catalog_V0"]["obsid"].compute().iloc[:3].tolist()
    smaller = {k: df[~df["obsid"].isin(drop)] for k, df in cats.items()}
    d = diff_catalogs(cats, smaller)
    assert d.attrs["counts"]["removed"] == 3 and set(d.obsid) == set(drop)
    assert (d.change == "removed").all()
    d2 = diff_catalogs(smaller, cats)
    assert d2.attrs["counts"]["added"] == 3 and (d2.change == "added").all()
    with pytest.raises(ValueError, match="n_sigma"):
        diff_catalogs(cats, cats, n_sigma=-1)


# --------------------------------------------------------------------------- CLI


def test_cli_catalog_diff_and_compare(tmp_path, run_dir, capsys):
    from mspec.cli import main

    out = tmp_path / "cat"
    assert main(["catalog", str(run_dir[0]), "--out", str(out)]) == 0
    for key in CATALOG_KEYS:
        assert (out / f"{key}.parquet").is_dir() and (out / f"{key}.fits").is_file()
    summ = pd.read_csv(out / "catalog_summary.csv")
    assert "RVMM (Table 7)" in set(summ.section)
    assert main(["catalog", "diff", str(run_dir[0]), str(run_dir[0]), "--out",
                 str(tmp_path / "d.csv")]) == 0  # fmt: skip
    assert pd.read_csv(tmp_path / "d.csv").empty
    assert main(["catalog", str(run_dir[0])]) == 2  # --out missing
    assert main(["catalog", "diff", str(run_dir[0])]) == 2
    assert main(["catalog", str(tmp_path / "nothing"), "--out", str(out)]) == 2
    # compare the written catalog with an external table made from it
    rec = read_catalog(out / "recommended.fits")
    rng = np.random.default_rng(1)
    ext = pd.DataFrame(
        {
            "RA": rec.ra + 0.5 / 3600,
            "DEC": rec.dec,
            "TEFF": rec.teff - 40.0 + rng.normal(0, 1e-6, len(rec)),
        }
    )
    ext.to_csv(tmp_path / "ext.csv", index=False)
    capsys.readouterr()
    rc = main(["compare", str(out / "recommended.parquet"), str(tmp_path / "ext.csv"),
               "--no-quality-cuts", "--no-flags", "--out", str(tmp_path / "cmp")])  # fmt: skip
    assert rc == 0
    stats = pd.read_csv(tmp_path / "cmp" / "comparison_stats.csv")
    row = stats[(stats.quantity == "teff") & (stats.lumclass == "all") & (stats.snr_bin == "all")]
    n_ok = int(np.isfinite(rec.teff).sum())
    assert int(row.n.iloc[0]) == n_ok
    if n_ok:
        assert row.offset.iloc[0] == pytest.approx(40.0, abs=1e-4)
    assert (tmp_path / "cmp" / "comparison.png").stat().st_size > 0
    assert main(["compare", str(out / "recommended.parquet"), str(tmp_path / "ext.csv"),
                 "--columns", "teff=NOPE"]) == 2  # fmt: skip


# --------------------------------------------------------------------------- compare


def _injected(n=4000, seed=0):
    rng = np.random.default_rng(seed)
    cat = pd.DataFrame(
        {
            "ra": rng.uniform(0, 360, n),
            "dec": np.degrees(np.arcsin(rng.uniform(-0.99, 0.99, n))),
            "snr_u": 2.0, "snr_g": 30.0, "snr_r": 60.0, "snr_i": rng.uniform(5, 250, n),
            "snr_z": 60.0, **{f"orp_{b}": 0.0 for b in "ugriz"},
            "luminosity_class": np.where(rng.random(n) < 0.7, "dM", "gM"),
            "teff": rng.normal(3600, 200, n), "logg": rng.normal(4.8, 0.2, n),
            "m_h": rng.normal(-0.1, 0.2, n), "rv": rng.normal(0, 40, n),
            "parameter_flag": 1, "rv_flag": 1,
        }
    )  # fmt: skip
    cat.loc[:99, "orp_r"] = 0.05  # fail the orp < 1 % cut
    cat.loc[100:149, "parameter_flag"] = 0
    k = min(400, n // 10)
    m = n - k
    jitter = rng.normal(0, 0.7, (m, 2)) / 3600
    ext = pd.DataFrame(
        {
            "RAJ2000": cat.ra[:m] + jitter[:, 0] / np.cos(np.radians(cat.dec[:m])),
            "DEJ2000": cat.dec[:m] + jitter[:, 1],
            "Teff": cat.teff[:m] - 35.0 + rng.normal(0, 25.0, m),
            "LOGG": cat.logg[:m] + 0.12 + rng.normal(0, 0.08, m),
            "FE_H": cat.m_h[:m] - 0.05 + rng.normal(0, 0.04, m),
            "radial_velocity": cat.rv[:m] + 5.0 + rng.normal(0, 7.0, m),
        }
    )
    # decoys 4-10 arcsec from the unmatched spectra: never matched
    off = rng.uniform(4, 10, k) / 3600
    decoys = pd.DataFrame({"RAJ2000": cat.ra[m:].to_numpy(), "DEJ2000": cat.dec[m:] + off,
                           "Teff": 0.0, "LOGG": 0.0, "FE_H": 0.0, "radial_velocity": 0.0})  # fmt: skip
    return cat, pd.concat([ext, decoys], ignore_index=True), m


def test_compare_recovers_injected_offset_and_scatter(tmp_path):
    cat, ext, m = _injected()
    res = compare_catalogs(dd.from_pandas(cat, npartitions=3), ext)
    assert res.columns["teff"] == "Teff" and res.columns["m_h"] == "FE_H"
    assert res.columns["ra"] == "RAJ2000"
    # every true pair within 3" (0.7" jitter) found, no decoy
    assert (res.matched.sep_arcsec < 3).all()
    assert len(res.matched) >= 0.99 * m and len(res.matched) <= m
    s = res.stats.set_index(["quantity", "lumclass", "snr_bin"])
    for q, off, sig in (("teff", 35.0, 25.0), ("logg", -0.12, 0.08), ("m_h", 0.05, 0.04),
                        ("rv", -5.0, 7.0)):  # fmt: skip
        r = s.loc[(q, "all", "all")]
        assert r.offset == pytest.approx(off, abs=4 * sig / np.sqrt(r.n)), q
        assert r.sigma == pytest.approx(sig, rel=0.06), q
        assert r.robust_sigma == pytest.approx(sig, rel=0.1), q
        for b in ("(0,20]", "(20,50]", "(50,100]", ">100"):
            rb = s.loc[(q, "dM", b)]
            if rb.n > 30:
                assert rb.offset == pytest.approx(off, abs=5 * sig / np.sqrt(rb.n)), (q, b)
    # the quality cuts: snr_i <= 20 and orp >= 1 % excluded; flags: parameter_flag 0
    used = res.matched[np.isfinite(res.matched.diff_teff)]
    assert (used.snr_i > 20).all() and (used.orp_r < 0.01).all()
    assert (used.parameter_flag == 1).all()
    # rv uses rv_flag, not parameter_flag
    assert np.isfinite(res.matched.diff_rv).sum() > np.isfinite(res.matched.diff_teff).sum()
    fig = comparison_figure(res, name="APOGEE")
    assert len(fig.axes) == 2 * 4
    fig.savefig(tmp_path / "c.png")
    fig2 = internal_error_figure(cat.assign(teff_err=30.0, logg_err=0.07, rv_err=rng_err(len(cat))))
    fig2.savefig(tmp_path / "i.png")
    assert (tmp_path / "i.png").stat().st_size > 0


def rng_err(n):
    return np.random.default_rng(9).uniform(2, 10, n)


def test_compare_bad_input():
    cat, ext, _ = _injected(n=300)
    with pytest.raises(KeyError, match="no ra column"):
        compare_catalogs(cat, ext.drop(columns=["RAJ2000"]))
    with pytest.raises(KeyError, match="unknown quantities"):
        compare_catalogs(cat, ext, columns={"vsini": "x"})
    with pytest.raises(ValueError, match="radius_arcsec"):
        compare_catalogs(cat, ext, radius_arcsec=0)
    # rows with bad coordinates are skipped, not fatal
    bad = ext.copy()
    bad.loc[:10, "DEJ2000"] = np.nan
    res = compare_catalogs(cat, bad)
    assert len(res.matched) > 0


def test_per_spectrum_table_is_one_task_per_chunk(run_dir, cats):
    """The run's per-spectrum table is read by one task per store chunk (not one per
    variable and chunk: the scheduler's memory at survey scale), in store order, and
    build_catalog's catalogs come from it."""
    from mspec.catalog import per_spectrum_table

    frame, _notes = per_spectrum_table(run_dir[0])
    assert frame.npartitions == -(-N // CHUNK) >= 2
    assert len(frame.optimize().__dask_graph__()) == frame.npartitions
    pdf = frame.compute(scheduler="sync")
    assert list(pdf.index) == list(range(N))
    from mspec.config import load_config

    store = mspec.open_store(load_config(run_dir[0] / "config.resolved.toml").store)
    np.testing.assert_array_equal(pdf["obsid"].to_numpy(), store["obsid"].values)
    v0 = cats["M_Catalog_V0"].compute(scheduler="sync")
    np.testing.assert_array_equal(v0["snr_i"].to_numpy(), pdf.loc[v0.index, "snr_i"].to_numpy())
