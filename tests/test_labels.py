"""Label transfer (issue 18): label-table joins, training filters, training and fine-tuning on
the real DR7 M dwarfs of ../shared/data with their literature labels.csv."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import xarray as xr

from mspec.ml.labels import (
    join_labels,
    label_columns,
    lumclass_from_aspcap,
    read_label_table,
    training_filters,
)

TINY = {"channels": (4, 8, 8, 8), "kernels": (5, 5, 3, 3)}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _store_like(n=6):
    """Per-spectrum variables of a store (what the joins read)."""
    return xr.Dataset(
        {
            "file": ("spectra", np.array([f"spec-5{i}-X_sp01-00{i}.fits" for i in range(n)])),
            "ra": ("spectra", 10.0 + np.arange(n) * 0.01),
            "dec": ("spectra", np.full(n, 20.0)),
            "snr_u": ("spectra", np.full(n, 1.0)),
            "snr_g": ("spectra", np.full(n, 2.0)),
            "snr_r": ("spectra", np.full(n, 3.0)),
            "snr_i": ("spectra", np.array([30.0, 4.0, 30.0, 30.0, 30.0, np.nan][:n])),
            "snr_z": ("spectra", np.full(n, 1.0)),
            "lamost_class": (
                "spectra",
                np.array(["STAR", "STAR", "STAR", "GALAXY", "STAR", "STAR"][:n]),
            ),  # fmt: skip
            "lamost_subclass": ("spectra", np.array(["M2", "gM1", "K5", "", "dM3", "M0"][:n])),
        },
        coords={"obsid": ("spectra", np.arange(n, dtype=np.int64) + 100)},
    )


def test_join_on_obsid_reports_unmatched_rows():
    ds = _store_like()
    t = pd.DataFrame({"OBSID": [105, 101, 999, 103], "teff": [3000.0, 3100, 3200, 3300]})
    j = join_labels(ds, t)
    assert j.key == "obsid" and j.report["column"] == "OBSID"
    np.testing.assert_array_equal(j.table["_table_row"], [-1, 1, -1, 3, -1, 0])
    np.testing.assert_array_equal(j.table["teff"].to_numpy()[[1, 3, 5]], [3100, 3300, 3000])
    assert np.isnan(j.table["teff"].to_numpy()[[0, 2, 4]]).all()
    assert j.report["n_table_unmatched"] == 1 and j.report["unmatched"] == [{"OBSID": 999}]
    assert list(j.unmatched["OBSID"]) == [999]
    with pytest.raises(ValueError, match="duplicate obsid"):
        join_labels(ds, pd.DataFrame({"obsid": [100, 100]}))
    with pytest.raises(ValueError, match="no obsid"):
        join_labels(ds, pd.DataFrame({"obsid": [1, 2]}))


def test_join_on_file_name_ignores_paths_and_gz():
    ds = _store_like()
    t = pd.DataFrame({"file_name": ["/data/dr7/spec-52-X_sp01-002.fits.gz",
                                    "spec-50-X_sp01-000.fits", "spec-77-nope.fits"],
                      "teff": [1.0, 2.0, 3.0]})  # fmt: skip
    j = join_labels(ds, t)
    assert j.key == "file"
    np.testing.assert_array_equal(j.table["_table_row"], [1, -1, 0, -1, -1, -1])
    assert j.report["n_table_unmatched"] == 1
    assert j.report["unmatched"][0]["file_name"] == "spec-77-nope.fits"
    with pytest.raises(ValueError, match="file-name column"):
        join_labels(ds, pd.DataFrame({"teff": [1.0], "ra": [10.0], "dec": [20.0]}), on="file")


def test_join_by_position_within_radius():
    ds = _store_like()
    arcsec = 1 / 3600
    t = pd.DataFrame({
        "RA": [10.0 + 2 * arcsec, 10.02 + 5 * arcsec, 10.04, 10.04 + 0.5 * arcsec, 50.0],
        "DEC": [20.0, 20.0, 20.0 + 1 * arcsec, 20.0, 20.0],
        "TEFF": [1.0, 2.0, 3.0, 4.0, 5.0],
    })  # fmt: skip
    j = join_labels(ds, t)  # auto: no obsid, no file -> position
    assert j.key == "position" and j.report["radius_arcsec"] == 3.0
    # spectrum 0: 2" away -> row 0; spectrum 2: 5" away -> unmatched; spectrum 4: two rows
    # within 3", the nearest (0.5") wins
    np.testing.assert_array_equal(j.table["_table_row"], [0, -1, -1, -1, 3, -1])
    assert j.table["_sep_arcsec"].to_numpy()[0] == pytest.approx(2.0 * np.cos(np.radians(20)),
                                                                 rel=1e-3)  # fmt: skip
    assert j.report["n_spectra_with_several_rows"] == 1
    assert j.report["n_table_unmatched"] == 3  # rows 1, 2 and 4
    j6 = join_labels(ds, t, radius_arcsec=6.0)
    assert j6.table["_table_row"].to_numpy()[2] == 1
    with pytest.raises(ValueError, match="radius"):
        join_labels(ds, t, radius_arcsec=0)
    with pytest.raises(ValueError, match="within"):
        join_labels(ds, t.assign(RA=200.0))
    with pytest.raises(ValueError, match="join key"):
        join_labels(ds, pd.DataFrame({"teff": [1.0]}))
    with pytest.raises(ValueError, match="on must be"):
        join_labels(ds, t, on="name")


def test_label_columns_aliases_and_mapping():
    apogee = pd.DataFrame(columns=["APOGEE_ID", "TEFF", "LOGG", "M_H", "ALPHA_M", "FE_H",
                                   "ASPCAP_CLASS", "obsid"])  # fmt: skip
    assert label_columns(apogee, "tlma") == {
        "teff": "TEFF",
        "logg": "LOGG",
        "m_h": "M_H",
        "alpha_m": "ALPHA_M",
        "aspcap_class": "ASPCAP_CLASS",
    }
    lit = pd.DataFrame(columns=["file_name", "teff_lit", "logg_lit", "feh_lit"])
    assert label_columns(lit, "tlma") == {"teff": "teff_lit", "logg": "logg_lit",
                                          "m_h": "feh_lit"}  # fmt: skip
    assert label_columns(lit, "tlma", {"m_h": "logg_lit"})["m_h"] == "logg_lit"
    assert label_columns(pd.DataFrame(columns=["obsid", "class"]), "spt") == {"class": "class"}
    assert label_columns(apogee, "dmgm") == {"class": "ASPCAP_CLASS"}
    with pytest.raises(ValueError, match="none of the CNN-TLMA"):
        label_columns(pd.DataFrame(columns=["obsid"]), "tlma")
    with pytest.raises(ValueError, match="no column 'x'"):
        label_columns(lit, "tlma", {"teff": "x"})
    with pytest.raises(ValueError, match="unknown label"):
        label_columns(lit, "tlma", {"vsini": "teff_lit"})
    with pytest.raises(ValueError, match="class column"):
        label_columns(lit, "wdm")
    np.testing.assert_array_equal(lumclass_from_aspcap(["Md_d", "Mg_b", "GKg_c", ""]),
                                  ["dM", "gM", "", ""])  # fmt: skip


def test_training_filters_snr_and_consistency():
    ds = _store_like()
    keep, n = training_filters(ds, None, kind="tlma")
    # S/N_max < 5 (row 1: max 4) and all-NaN... row 5 has snr_i NaN but snr_r 3 -> < 5
    np.testing.assert_array_equal(keep, [True, False, True, True, True, False])
    assert n == {"snr_max": 2}
    lum = np.array(["dM", "gM", "dM", "dM", "gM", ""])
    keep, n = training_filters(ds, lum, kind="tlma", snr_min=None)
    # LAMOST: M2 dwarf ok, gM1 giant ok, K5 not M -> inconsistent, GALAXY -> inconsistent,
    # dM3 vs gM -> inconsistent, no label -> kept
    np.testing.assert_array_equal(keep, [True, True, False, False, False, True])
    assert n == {"inconsistent_class": 3}
    spt = np.array(["M", "M", "K", "GALAXY", "G", ""])
    keep, _ = training_filters(ds, spt, kind="spt", snr_min=None)
    np.testing.assert_array_equal(keep, [True, True, True, True, False, True])
    keep, _ = training_filters(ds, spt, kind="spt", snr_min=None, consistent=False)
    assert keep.all()


def test_read_label_table_formats(tmp_path):
    t = pd.DataFrame({"obsid": [1, 2], "TEFF": [3000.0, 3100.0], "ASPCAP_CLASS": ["Md_d", "Mg_b"]})
    t.to_csv(tmp_path / "a.csv", index=False)
    t.to_parquet(tmp_path / "a.parquet")
    from astropy.table import Table

    Table.from_pandas(t).write(tmp_path / "a.fits")
    for name in ("a.csv", "a.parquet", "a.fits"):
        r = read_label_table(tmp_path / name)
        assert list(r["obsid"]) == [1, 2] and list(r["ASPCAP_CLASS"]) == ["Md_d", "Mg_b"]
    with pytest.raises(ValueError, match="does not exist"):
        read_label_table(tmp_path / "none.csv")
    (tmp_path / "a.txt.xz").write_text("x")
    with pytest.raises(ValueError, match="expected"):
        read_label_table(tmp_path / "a.txt.xz")


# ------------------------------------------------------------------ real spectra, real labels
@pytest.fixture(scope="module")
def real_store(tmp_path_factory):
    from mspec.data import shared_data_dir

    src = shared_data_dir() / "lamost_dr7_mdwarfs"
    if not (src / "labels.csv").is_file():
        pytest.skip("no ../shared/data/lamost_dr7_mdwarfs")
    import mspec

    d = tmp_path_factory.mktemp("dr7")
    mspec.ingest([str(src)], str(d / "s.zarr"), chunk_size=16, client="sync")
    return d / "s.zarr", src / "labels.csv"


def _json_tail(out: str) -> dict:
    """The JSON summary the CLI prints after its per-epoch progress lines."""
    return json.loads(out[out.index("\n{") + 1 :] if not out.startswith("{") else out)


@pytest.mark.realdata
def test_cli_label_transfer_on_real_store(real_store, tmp_path, capsys):
    """mspec train tlma --labels labels.csv (keyed by file name) runs end to end."""
    from mspec.cli import main
    from mspec.ml.infer import predict
    from mspec.ml.io import read_metadata

    store, labels = real_store
    rc = main(["train", "tlma", "--store", str(store), "--labels", str(labels),
               "--out", str(tmp_path / "m"), "--epochs", "2", "--folds", "3",
               "--threads", "1"])  # fmt: skip
    assert rc == 0
    printed = _json_tail(capsys.readouterr().out)
    assert printed["labels"]["join"]["key"] == "file"
    assert printed["labels"]["join"]["n_table_matched"] == 36
    assert printed["labels"]["columns"] == {"teff": "teff_lit", "logg": "logg_lit",
                                            "m_h": "feh_lit"}  # fmt: skip
    assert printed["n"] == 34 and printed["n_no_data"] == 2  # two files have no LAMOST RV
    meta = read_metadata(tmp_path / "m")
    assert meta["labels_trained"] == ["teff", "logg", "m_h"]
    assert meta["calibration"]["source"] == "oof"
    assert meta["provenance"]["join"]["column"] == "file_name"
    assert len(meta["provenance"]["label_table_sha256"]) == 64
    import mspec
    from mspec.preprocessing.steps import preprocess

    ds = mspec.open_store(store)
    res = predict(preprocess(ds, recipe="tlma", rv="lamost_rv"), tmp_path / "m").compute()
    ok = np.isfinite(ds["lamost_rv"].values)
    assert np.isfinite(res["teff"].values[ok]).all() and np.isnan(res["alpha_m"].values).all()
    assert (res["teff_err"].values[ok] > 0).all()
    # position join of the same table, and a column mapping, through the CLI
    rc = main(["train", "tlma", "--store", str(store), "--labels", str(labels), "--on",
               "position", "--columns", "teff=teff_lit", "--out", str(tmp_path / "p"),
               "--epochs", "1", "--folds", "2", "--threads", "1"])  # fmt: skip
    assert rc == 0
    assert _json_tail(capsys.readouterr().out)["labels"]["join"]["n_spectra_matched"] == 36
    assert main(["train", "tlma", "--store", str(store), "--labels", str(labels), "--out",
                 str(tmp_path / "q"), "--columns", "teff"]) == 2  # fmt: skip
    assert "LABEL=COLUMN" in capsys.readouterr().err


@pytest.mark.realdata
def test_finetune_changes_the_model_and_keeps_the_format(real_store, tmp_path):
    """Transfer learning: a simulator-trained ensemble fine-tuned on the real labelled set."""
    import mspec
    from mspec.ml.infer import predict_array
    from mspec.ml.io import FORMAT, FORMAT_VERSION, load_models, read_metadata
    from mspec.ml.models import TLMA_LABELS
    from mspec.ml.train import train_from_store, train_regressor
    from mspec.preprocessing.steps import preprocess

    store, labels = real_store
    sim = mspec.simulate_survey(150, seed=5, mix={"dM": 1.0}, snr=(20.0, 100.0))
    tl = preprocess(sim, recipe="tlma", rv="true_rv")
    lab = {k: sim[f"true_{k}"].values for k in TLMA_LABELS}
    train_regressor(tl, lab, tmp_path / "base", folds=3, epochs=2, arch=TINY, plots=False)
    m = train_from_store(kind="tlma", store=store, labels=labels, out_dir=tmp_path / "ft",
                         finetune=tmp_path / "base", epochs=3, threads=1, plots=False)  # fmt: skip
    base_meta, ft_meta = read_metadata(tmp_path / "base"), read_metadata(tmp_path / "ft")
    assert ft_meta["format"] == FORMAT and ft_meta["format_version"] == FORMAT_VERSION
    assert ft_meta["arch"] == base_meta["arch"] and ft_meta["label_mean"] == base_meta["label_mean"]
    assert [x["file"] for x in ft_meta["members"]] == [f"member_0{i}.safetensors" for i in range(3)]
    assert ft_meta["finetuned_from"]["labels_from_base"] == ["alpha_m"]
    assert ft_meta["labels_trained"] == list(TLMA_LABELS)  # alpha_m kept from the base
    assert m["folds"] == 3 and m["n"] == 34
    base_models, _ = load_models(tmp_path / "base")
    ft_models, _ = load_models(tmp_path / "ft")
    kept = [mm["metrics"]["kept_base"] for mm in ft_meta["members"]]
    assert not all(kept) and ft_meta["finetuned_from"]["members_kept_base"] == [
        i for i, k in enumerate(kept) if k
    ]
    for b, f, k in zip(base_models, ft_models, kept):
        sb, sf = b.state_dict(), f.state_dict()
        assert set(sb) == set(sf)
        # a member whose fine-tuning never beat the base on validation keeps the base weights
        assert k == all(np.array_equal(sb[x].numpy(), sf[x].numpy()) for x in sb)
    x = preprocess(mspec.open_store(store), recipe="tlma", rv="lamost_rv")["flux_grid"].values
    ok = np.isfinite(x).any(axis=1)
    pb, pf = predict_array(x[ok], tmp_path / "base"), predict_array(x[ok], tmp_path / "ft")
    assert np.isfinite(pf).all() and not np.allclose(pb[:, 0], pf[:, 0])
    # the fine-tuned model fits its real training labels better than the base model
    t = pd.read_csv(labels).set_index("file_name")
    files = mspec.open_store(store)["file"].values[ok]
    teff = t.loc[files, "teff_lit"].to_numpy()
    assert np.mean((pf[:, 0] - teff) ** 2) < np.mean((pb[:, 0] - teff) ** 2)
    with pytest.raises(ValueError, match="arch"):
        train_regressor(tl, lab, tmp_path / "x", finetune=tmp_path / "base", arch=TINY)
    from mspec.ml.io import ModelFileError

    with pytest.raises(ModelFileError):
        train_from_store(kind="tlma", store=store, labels=labels, out_dir=tmp_path / "y",
                         finetune=tmp_path / "nothing")  # fmt: skip


@pytest.mark.realdata
def test_cli_zero_point_on_real_store(real_store, tmp_path, capsys):
    """mspec train tlma --finetune BASE --zero-point: the real labels' median offset moves the
    outputs; nothing is trained; the other labels keep the base zero point."""
    import mspec
    from mspec.cli import main
    from mspec.ml.infer import predict_array
    from mspec.ml.io import read_metadata
    from mspec.ml.models import TLMA_LABELS
    from mspec.ml.train import train_regressor
    from mspec.preprocessing.steps import preprocess

    store, labels = real_store
    sim = mspec.simulate_survey(120, seed=5, mix={"dM": 1.0}, snr=(20.0, 100.0))
    tl = preprocess(sim, recipe="tlma", rv="true_rv")
    lab = {k: sim[f"true_{k}"].values for k in TLMA_LABELS}
    train_regressor(tl, lab, tmp_path / "base", folds=2, epochs=1, arch=TINY, plots=False)
    rc = main(["train", "tlma", "--store", str(store), "--labels", str(labels), "--finetune",
               str(tmp_path / "base"), "--zero-point", "--out", str(tmp_path / "zp"),
               "--threads", "1"])  # fmt: skip
    assert rc == 0
    printed = _json_tail(capsys.readouterr().out)
    assert printed["n"] == 34 and printed["zero_point"]["teff"]["n"] == 34
    assert printed["n_no_data"] == 2  # two files have no LAMOST RV
    ds = mspec.open_store(store)
    x = preprocess(ds, recipe="tlma", rv="lamost_rv")["flux_grid"].values
    ok = np.isfinite(x).any(axis=1)
    pb, pz = predict_array(x[ok], tmp_path / "base"), predict_array(x[ok], tmp_path / "zp")
    t = pd.read_csv(labels).set_index("file_name")
    teff = t.loc[ds["file"].values[ok], "teff_lit"].to_numpy()
    assert np.median(teff - pz[:, 0]) == pytest.approx(0.0, abs=1e-6)
    np.testing.assert_allclose(pz[:, 0] - pb[:, 0], np.median(teff - pb[:, 0]), atol=1e-6)
    logg = t.loc[ds["file"].values[ok], "logg_lit"].to_numpy()
    assert np.median(logg - pz[:, 1]) == pytest.approx(0.0, abs=1e-6)  # logg_lit as well
    np.testing.assert_allclose(pz[:, 3], pb[:, 3], atol=1e-9)  # no [alpha/M] labels: unchanged
    np.testing.assert_allclose(pz[:, 4:], pb[:, 4:], atol=1e-9)  # errors unchanged
    assert printed["zero_point"]["alpha_m"]["n"] == 0
    meta = read_metadata(tmp_path / "zp")
    assert meta["provenance"]["join"]["column"] == "file_name"
    assert meta["zero_point"]["labels"]["teff"]["applied"]
    assert main(["train", "spt", "--store", str(store), "--labels", str(labels), "--out",
                 str(tmp_path / "s"), "--zero-point"]) == 2  # fmt: skip
    assert "--zero-point" in capsys.readouterr().err


def test_stratified_folds_span_the_range():
    from mspec.ml.evaluate import stratified_folds

    teff = np.linspace(3000.0, 4200.0, 36)[np.random.default_rng(1).permutation(36)]
    f = stratified_folds(teff, 6, seed=0)
    assert np.bincount(f).tolist() == [6] * 6
    # each run of 6 consecutive Teff values gives one star to every fold
    order = np.argsort(teff)
    for start in range(0, 36, 6):
        assert sorted(f[order[start : start + 6]]) == list(range(6))
    assert not np.array_equal(f, stratified_folds(teff, 6, seed=1))
    g = stratified_folds(teff[:35], 6, seed=0)
    assert sorted(np.bincount(g).tolist()) == [5, 6, 6, 6, 6, 6]
    with pytest.raises(ValueError, match="k must be"):
        stratified_folds(teff, 1, seed=0)


def test_label_noise_ceiling():
    from mspec.ml.evaluate import label_noise_ceiling

    lit = np.random.default_rng(0).normal(3500.0, 250.0, 36)
    c = label_noise_ceiling(lit, 150.0, n_mc=300)
    frac = 1 - 150.0**2 / lit.var(ddof=1)
    assert c["slope"] == pytest.approx(frac) and c["corr"] == pytest.approx(np.sqrt(frac))
    med, lo, hi = c["mc"]["slope_theil_sen"]
    assert lo < c["slope"] < hi and lo < med < hi
    assert c["mc"]["robust_sigma"][1] < 150.0 < c["mc"]["robust_sigma"][2]
    assert label_noise_ceiling(lit, 1000.0)["slope"] is None


def test_three_cornered_hat_recovers_known_noise():
    from mspec.ml.evaluate import three_cornered_hat

    rng = np.random.default_rng(1)
    n = 6000
    true = rng.normal(3600.0, 250.0, n)
    lab = true + rng.normal(0.0, 120.0, n)
    pred = 100.0 + 0.8 * true + rng.normal(0.0, 60.0, n)
    colour = 5.0 - 0.0012 * true + rng.normal(0.0, 0.05, n)
    h = three_cornered_hat(lab, pred, colour, n_boot=200)
    assert h["n"] == n
    assert h["true_std"] == pytest.approx(250.0, rel=0.03)
    assert h["label_sigma"] == pytest.approx(120.0, rel=0.05)
    assert h["slope"] == pytest.approx(0.8, abs=0.02)
    # std(P - T): the scale error (0.2 x 250 K) and the noise (60 K) together, 78 K
    assert h["pred_error_std"] == pytest.approx(np.hypot(0.2 * 250.0, 60.0), rel=0.06)
    assert h["pred_sigma_own"] == pytest.approx(60.0 / 0.8, rel=0.06)
    assert h["tracer_sigma"] == pytest.approx(0.05 / 0.0012, rel=0.1)
    assert h["ceiling_slope"] == pytest.approx(250.0**2 / (250.0**2 + 120.0**2), abs=0.02)
    lo, hi = h["ci"]["label_sigma"][0], h["ci"]["label_sigma"][4]
    assert lo < 120.0 < hi and hi - lo < 15.0
    # the tracer's unit and sign do not matter; the labels' own scale does
    h2 = three_cornered_hat(lab, pred, -3.0 * colour, n_boot=0)
    assert h2["label_sigma"] == pytest.approx(h["label_sigma"]) and h2["ci"] == {}
    # one grossly wrong label: leave-one-out finds it, and without it the noise is the rest's
    lab_bad = lab[:200].copy()
    lab_bad[17] += 3000.0
    hb = three_cornered_hat(lab_bad, pred[:200], colour[:200], n_boot=0)
    assert hb["loo_most_influential"]["index"] == 17
    assert hb["label_sigma"] > 200.0
    assert hb["loo_most_influential"]["label_sigma_without"] == pytest.approx(120.0, rel=0.2)
    lo, hi = hb["loo"]["label_sigma"]
    assert lo == hb["loo_most_influential"]["label_sigma_without"] and hi > 200.0
    # positions refer to the input arrays, NaN rows included
    lab_nan = np.concatenate([[np.nan], lab_bad])
    hn = three_cornered_hat(lab_nan, np.r_[0.0, pred[:200]], np.r_[1.0, colour[:200]], n_boot=0)
    assert hn["loo_most_influential"]["index"] == 18 and hn["n"] == 200
    # a small sample gives wide, but honest, intervals
    s = three_cornered_hat(lab[:30], pred[:30], colour[:30], n_boot=1000)
    assert s["ci"]["slope"][0] < 0.8 < s["ci"]["slope"][4]
    with pytest.raises(ValueError, match="same length"):
        three_cornered_hat(lab, pred[:-1], colour)
    with pytest.raises(ValueError, match="at least 5"):
        three_cornered_hat(lab[:4], pred[:4], colour[:4])


def test_three_cornered_hat_noiseless_labels_and_correlated_tracer():
    from mspec.ml.evaluate import three_cornered_hat

    rng = np.random.default_rng(2)
    true = rng.normal(3500.0, 200.0, 5000)
    pred = true + rng.normal(0.0, 80.0, true.size)
    colour = -0.001 * true + rng.normal(0.0, 0.05, true.size)
    h = three_cornered_hat(true, pred, colour, n_boot=0)
    assert h["label_sigma"] < 15.0 and h["slope"] == pytest.approx(1.0, abs=0.03)
    assert h["pred_error_std"] == pytest.approx(80.0, rel=0.05)
    # a tracer whose errors share the prediction's (read from the same data) inflates the
    # label noise: the documented failure of the method, which photometry avoids
    shared = rng.normal(0.0, 80.0, true.size)
    h = three_cornered_hat(true, true + shared, -0.001 * (true + shared), n_boot=0)
    assert h["label_sigma"] > 50.0


@pytest.mark.realdata
def test_photometric_tracer_real():
    from mspec.ml.evaluate import M_DWARF_R_I, _real_files, photometric_tracer

    files = [f for f in _real_files() if f.parent.name == "lamost_dr7_mdwarfs"]
    ri = photometric_tracer(files)
    ok = np.isfinite(ri)
    assert ok.sum() >= 25 and np.all((ri[ok] >= M_DWARF_R_I[0]) & (ri[ok] <= M_DWARF_R_I[1]))
    lab = pd.read_csv(files[0].parent / "labels.csv").set_index("file_name")
    teff = lab.loc[[f.name for f in files], "teff_lit"].to_numpy()
    # redder M dwarfs are cooler
    assert np.corrcoef(ri[ok], teff[ok])[0, 1] < -0.5


@pytest.mark.realdata
def test_finetune_cross_validation_is_out_of_fold(real_store, tmp_path):
    """finetune_cross_validation: every star predicted once per seed by a model whose
    training never saw its label (checked on the label table given to the trainer and on the
    rows the trainer fitted), with the default-model figures on the same stars."""
    import mspec
    from mspec.ml.evaluate import PLACEHOLDER_FEH, finetune_cross_validation
    from mspec.ml.models import TLMA_LABELS
    from mspec.ml.train import train_regressor
    from mspec.preprocessing.steps import preprocess

    store, labels = real_store
    sim = mspec.simulate_survey(120, seed=5, mix={"dM": 1.0}, snr=(20.0, 100.0))
    tl = preprocess(sim, recipe="tlma", rv="true_rv")
    lab = {k: sim[f"true_{k}"].values for k in TLMA_LABELS}
    train_regressor(tl, lab, tmp_path / "base", folds=2, epochs=1, arch=TINY, plots=False)
    k = 3
    r = finetune_cross_validation(tmp_path / "base", k=k, seeds=(4,), epochs=2, lr=(1e-4, 1e-3),
                                  store=store, work_dir=tmp_path / "cv", threads=1)  # fmt: skip
    stars = pd.DataFrame(r["stars"])
    lit = pd.read_csv(labels)
    # all 36 stars (the two without a LAMOST RV in the rest frame RV = 0), each once
    assert r["protocol"]["n_stars"] == 36 and sorted(stars["file"]) == sorted(lit["file_name"])
    assert r["protocol"]["n_feh_measured"] == int((lit["feh_lit"] != PLACEHOLDER_FEH).sum()) == 14
    assert stars["fold_4"].value_counts().sort_index().tolist() == [12, 12, 12]
    assert np.isfinite(stars[["teff_cv_4", "m_h_cv_4", "teff_base", "m_h_base"]]).all().all()
    assert len(r["folds"]) == k
    held = []
    for f in r["folds"]:
        test_files, test_ids = set(f["test_files"]), set(f["test_obsids"])
        held += f["test_files"]
        # no leakage: neither the table given to the trainer nor the rows it fitted
        # (oof_predictions.csv of the fold model) contain a held-out star
        assert not test_files & set(f["train_table_files"])
        assert not test_ids & set(f["train_obsids"])
        assert len(f["train_obsids"]) == 36 - len(test_files)
        assert set(f["train_table_files"]) | test_files == set(lit["file_name"])
        got = stars.loc[stars["fold_4"] == f["fold"], "file"]
        assert set(got) == test_files
        for rate in ("0.0001", "0.001"):
            fold_dir = tmp_path / "cv" / "seed4" / f"fold{f['fold']}" / f"lr{rate}"
            on_disk = pd.read_csv(fold_dir / "oof_predictions.csv")
            assert set(on_disk["obsid"]) == set(f["train_obsids"])
        # the learning rate is the one with the lowest inner (training-stars-only) rms
        inner = {i["lr"]: i["inner_oof_rms_teff"] for i in f["inner"]}
        assert set(inner) == {1e-4, 1e-3} and f["lr"] == min(inner, key=inner.get)
        assert (stars.loc[stars["fold_4"] == f["fold"], "lr_4"] == f["lr"]).all()
    assert sorted(held) == sorted(lit["file_name"])  # every star held out exactly once
    # each fold spans the Teff range (stratified): one of the k coolest and of the k warmest
    srt = np.sort(stars["teff_lit"].to_numpy())
    for _, g in stars.groupby("fold_4"):
        assert g["teff_lit"].min() <= srt[k - 1] and g["teff_lit"].max() >= srt[-k]
    for part in (r["finetuned"]["all"], r["default"]["all"]):
        assert set(part) == {"teff", "m_h"}
    ft = r["finetuned"]["all"]
    assert ft["teff"]["per_seed"][4]["n"] == 36 and ft["m_h"]["per_seed"][4]["n"] == 14
    assert r["default"]["all"]["teff"]["n"] == 36 and r["default"]["all"]["m_h"]["n"] == 14
    assert {"robust_sigma", "median", "slope_theil_sen", "corr"} <= set(ft["teff"]["over_seeds"])
    assert r["noise_ceiling"]["all"]["label_sigma"] == 153.0
    # zero point only, same protocol: each held-out star = base prediction + the offset its
    # fold's training stars give; nothing trained, nothing leaked
    z = finetune_cross_validation(tmp_path / "base", k=k, seeds=(4,), zero_point=True,
                                  store=store, work_dir=tmp_path / "zp", threads=1)  # fmt: skip
    assert z["protocol"]["mode"] == "zero_point" and z["protocol"]["lr"] == [0.0]
    zs = pd.DataFrame(z["stars"])
    assert (zs["fold_4"] == stars["fold_4"]).all()  # same folds as fine-tuning with seed 4
    for f in z["folds"]:
        off = f["inner"][0]["zero_point"]["teff"]
        held = zs["file"].isin(f["test_files"])
        np.testing.assert_allclose(zs.loc[held, "teff_cv_4"], zs.loc[held, "teff_base"] + off,
                                   atol=1e-6)  # fmt: skip
        assert not set(f["train_obsids"]) & set(f["test_obsids"])
        # every training star but the one LAMOST types G5 (the class-consistency filter)
        assert 36 - len(f["test_files"]) - 1 <= len(f["train_obsids"]) <= 36 - len(f["test_files"])
    # the photometric third tracer: the same stars' r - i, both predictions assessed
    assert np.isfinite(stars["r_i"]).sum() >= 25
    for which in ("default", "finetuned"):
        h = r["three_cornered_hat"]["all"][which]
        assert h["n"] == int(np.isfinite(stars["r_i"]).sum()) and "slope" in h["ci"]
    assert 0 < r["noise_ceiling"]["all"]["slope"] < 1
    assert "called_m" not in r["finetuned"]  # no CNN-SPT next to a bare ensemble
    assert set(r["per_lr"]) == {"0.0001", "0.001"}
    assert r["per_lr"]["0.001"]["all"]["teff"]["n"] == 36
    # the chosen prediction is one of the per-lr ones, star by star
    for rate in (1e-4, 1e-3):
        sel = stars["lr_4"] == rate
        np.testing.assert_array_equal(stars.loc[sel, "teff_cv_4"],
                                      stars.loc[sel, f"teff_cv_4_lr{rate:g}"])  # fmt: skip


@pytest.fixture(scope="module")
def tiny_pair_set(tmp_path_factory):
    """A default-model-set-like directory whose tlma/ is a tiny simulator-trained dM/gM pair."""
    import mspec
    from mspec.ml.models import TLMA_LABELS
    from mspec.ml.train import train_tlma_pair
    from mspec.preprocessing.steps import preprocess

    d = tmp_path_factory.mktemp("models")
    sim = mspec.simulate_survey(60, seed=2, mix={"dM": 0.5, "gM": 0.5}, snr=(20.0, 100.0))
    tl = preprocess(sim, recipe="tlma", rv="true_rv")
    lab = {k: sim[f"true_{k}"].values for k in TLMA_LABELS}
    train_tlma_pair(tl, lab, sim["true_lumclass"].values, d / "tlma", folds=2, epochs=1,
                    arch=TINY, plots=False, threads=1)  # fmt: skip
    return d


def _same_files(a, b) -> bool:
    return sorted(p.name for p in a.iterdir()) == sorted(p.name for p in b.iterdir()) and all(
        (b / p.name).read_bytes() == p.read_bytes() for p in a.iterdir()
    )


@pytest.mark.realdata
def test_cli_finetune_pair_with_labels_without_a_class(real_store, tiny_pair_set, tmp_path,
                                                       capsys):  # fmt: skip
    """docs/ml.md's fine-tune step with labels.csv (no dwarf/giant column) and the default
    model set: the class comes from the labels' logg (all dwarfs), the dM member is
    fine-tuned with the small-set defaults, the gM member is copied; a table without logg
    asks for --part in one line; --part dM then works."""
    from mspec.cli import main
    from mspec.ml.io import read_metadata

    store, labels = real_store
    common = ["--store", str(store), "--threads", "1", "--epochs", "2"]
    rc = main(["train", "tlma", "--labels", str(labels), "--finetune", str(tiny_pair_set),
               "--out", str(tmp_path / "ft"), *common])  # fmt: skip
    assert rc == 0
    printed = _json_tail(capsys.readouterr().out)
    assert set(printed) == {"dM", "labels"}
    lc = printed["labels"]["lumclass"]
    assert lc["source"].startswith("labels log g ('logg_lit' >= 3") and lc["part"] is None
    # LAMOST types one star G5: not an M star, so the logg-derived dM is inconsistent
    assert printed["labels"]["dropped"]["inconsistent_class"] == 1
    assert lc["counts"] == {"dM": 35, "gM": 0} and printed["dM"]["n"] == 33  # 2 without RV
    pair = read_metadata(tmp_path / "ft")
    assert pair["kind"] == "tlma_pair" and pair["parts"] == {"dM": "dM", "gM": "gM"}
    assert pair["finetuned_from"]["parts_finetuned"] == ["dM"]
    assert _same_files(tiny_pair_set / "tlma" / "gM", tmp_path / "ft" / "gM")
    dm = read_metadata(tmp_path / "ft" / "dM")
    assert (dm["recipe_training"]["batch_size"], dm["recipe_training"]["lr"]) == (8, 3e-3)
    assert dm["finetuned_from"]["path"] == str((tiny_pair_set / "tlma" / "dM").resolve())
    assert dm["provenance"]["lumclass"] == lc
    assert all("kept_base" in m["metrics"] for m in dm["members"])
    # explicit values win
    rc = main(["train", "tlma", "--labels", str(labels), "--finetune",
               str(tiny_pair_set / "tlma"), "--out", str(tmp_path / "ft2"), "--batch-size", "4",
               "--lr", "1e-3", *common])  # fmt: skip
    assert rc == 0
    r = read_metadata(tmp_path / "ft2" / "dM")["recipe_training"]
    assert (r["batch_size"], r["lr"]) == (4, 1e-3)
    # no class and no logg: one line naming --part, exit code 2
    pd.read_csv(labels)[["file_name", "teff_lit"]].to_csv(tmp_path / "teff.csv", index=False)
    capsys.readouterr()
    rc = main(["train", "tlma", "--labels", str(tmp_path / "teff.csv"), "--finetune",
               str(tiny_pair_set), "--out", str(tmp_path / "no"), *common])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    line = [x for x in err.splitlines() if x.startswith("mspec: error:")]
    assert len(line) == 1 and "--part dM or --part gM" in line[0]
    assert not (tmp_path / "no").exists()
    rc = main(["train", "tlma", "--labels", str(tmp_path / "teff.csv"), "--finetune",
               str(tiny_pair_set), "--part", "dM", "--out", str(tmp_path / "p"), *common])  # fmt: skip
    assert rc == 0
    lc = _json_tail(capsys.readouterr().out)["labels"]["lumclass"]
    assert lc["part"] == "dM" and lc["counts"] == {"dM": 36, "gM": 0}  # no class: no check
    assert read_metadata(tmp_path / "p")["parts"] == {"dM": "dM", "gM": "gM"}
    rc = main(["train", "tlma", "--labels", str(labels), "--finetune", str(tiny_pair_set),
               "--part", "gM", "--out", str(tmp_path / "g"), *common])  # fmt: skip
    assert rc == 2 and "no labelled spectrum of class gM" in capsys.readouterr().err
    assert main(["train", "spt", "--labels", str(labels), "--part", "dM", "--out",
                 str(tmp_path / "s"), *common]) == 2  # fmt: skip
    assert "--part" in capsys.readouterr().err


@pytest.mark.realdata
def test_cli_finetune_pair_takes_the_class_from_a_run(real_store, tiny_pair_set, tmp_path,
                                                      capsys):  # fmt: skip
    """--store RUN_DIR: a table without a class fine-tunes each member of the pair on the
    spectra the run's DGCM luminosity_class gives it ('' = not an M star: not used)."""
    import mspec
    from mspec.cli import main
    from mspec.config import Config, save_resolved
    from mspec.io.zarrio import write_results
    from mspec.ml.io import read_metadata

    store, labels = real_store
    run = tmp_path / "run"
    (run / "stages").mkdir(parents=True)
    save_resolved(Config.from_dict({"store": str(store), "run_dir": str(run)}), run)
    ds = mspec.open_store(store)
    with_rv = np.flatnonzero(np.isfinite(ds["lamost_rv"].values))
    lum = np.full(ds.sizes["spectra"], "dM", dtype="<U2")
    lum[with_rv[:6]] = "gM"  # a made-up DGCM decision
    lum[with_rv[6:8]] = ""
    write_results(xr.Dataset({"luminosity_class": ("spectra", lum)}).chunk({"spectra": 16}),
                  run / "stages" / "dgcm.zarr")  # fmt: skip
    pd.read_csv(labels)[["file_name", "teff_lit"]].to_csv(tmp_path / "teff.csv", index=False)
    rc = main(["train", "tlma", "--store", str(run), "--labels", str(tmp_path / "teff.csv"),
               "--finetune", str(tiny_pair_set), "--out", str(tmp_path / "ft"), "--threads",
               "1", "--epochs", "1"])  # fmt: skip
    assert rc == 0
    printed = _json_tail(capsys.readouterr().out)
    lc = printed["labels"]["lumclass"]
    assert lc["source"] == "'luminosity_class' of the store/run"
    # the run's own class is not checked against LAMOST's (LAMOST calls these dwarfs)
    assert lc["counts"] == {"dM": 28, "gM": 6} and "inconsistent_class" not in printed[
        "labels"]["dropped"]  # fmt: skip
    assert printed["gM"]["n"] == 6 and printed["dM"]["n"] == 26  # 2 dM without RV
    assert read_metadata(tmp_path / "ft")["finetuned_from"]["parts_finetuned"] == ["dM", "gM"]
