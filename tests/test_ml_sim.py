"""CNNs on simulated surveys: learning, the store/CLI training path, and predict on a store."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

import mspec
from mspec.ml.infer import predict
from mspec.ml.io import read_metadata
from mspec.ml.train import train_classifier, train_regressor
from mspec.preprocessing.steps import preprocess

TINY = {"channels": (4, 8, 8, 8), "kernels": (5, 5, 3, 3)}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def wdm_survey():
    return mspec.simulate_survey(360, seed=11, mix={"WD": 0.5, "M": 0.5}, snr=(15, 60))


@pytest.fixture(scope="module")
def wdm_model(wdm_survey, tmp_path_factory):
    out = tmp_path_factory.mktemp("wdm")
    ds = preprocess(wdm_survey.chunk({"spectra": 120}), recipe="cnn")
    m = train_classifier(
        ds, ds["true_class"], "wdm", out, epochs=8, seed=0, arch=TINY, lr=3e-3, batch_size=32
    )
    return out, m, ds


def test_classifier_learns_on_simulated_spectra(wdm_survey, wdm_model):
    out, m, ds = wdm_model
    assert m["val_accuracy"] > 0.85  # chance 0.5
    h = m["history"]
    assert min(h["val_loss"]) < 0.7 * h["val_loss"][0]
    res = predict(ds, out)
    acc = (res["wdm_class"].values == wdm_survey["true_class"].values).mean()
    assert acc > 0.85


@pytest.mark.realdata
def test_predict_on_real_lamost_files(wdm_model):
    """Every real file (all layouts/releases) goes through preprocess + predict."""
    import xarray as xr

    from mspec.data import shared_data_dir
    from mspec.io import read_lamost

    files = sorted(shared_data_dir().glob("lamost_*/*.fits*"))
    if not files:
        pytest.skip("no real data in ../shared/data")
    ds = xr.concat([read_lamost(f) for f in files], dim="spectra", coords="minimal",
                   compat="override")  # fmt: skip
    res = predict(preprocess(ds.chunk({"spectra": 16}), recipe="cnn"), wdm_model[0]).compute()
    prob = res["wdm_prob"].values
    assert prob.shape == (len(files), 2)
    assert np.isfinite(prob).all()
    assert set(res["wdm_class"].values) <= {"WD", "M"}
    dr7 = np.array(["dr7_mdwarfs" in str(f) for f in files])
    # a tiny net on 270 simulated spectra already calls most real M dwarfs M
    assert (res["wdm_class"].values[dr7] == "M").mean() > 0.7


def test_regressor_learns_on_simulated_dwarfs(tmp_path):
    sim = mspec.simulate_survey(300, seed=12, mix={"dM": 1.0}, snr=(30, 100))
    ds = preprocess(sim, recipe="tlma", rv="true_rv")
    lab = {k: sim[f"true_{k}"].values for k in ("teff", "logg", "m_h", "alpha_m")}
    m = train_regressor(
        ds, lab, tmp_path / "t", folds=2, epochs=10, seed=0, arch=TINY, lr=1e-2, batch_size=32
    )
    assert m["rms"]["teff"] < 0.6 * np.std(lab["teff"])


@pytest.fixture(scope="module")
def store(tmp_path_factory, wdm_survey):
    from mspec.io import write_lamost_fits
    from mspec.io.store import ingest

    d = tmp_path_factory.mktemp("store")
    sim = wdm_survey.isel(spectra=slice(0, 200))
    write_lamost_fits(sim, d / "fits")
    ingest([str(d / "fits")], str(d / "s.zarr"), chunk_size=64)
    return d / "s.zarr", sim


def test_cli_train_and_predict_from_store(store, tmp_path):
    from mspec.cli import main

    path, sim = store
    table = pd.DataFrame({"obsid": sim["obsid"].values, "class": sim["true_class"].values})
    table = table.iloc[::-1].iloc[:-20]  # any order; some store spectra unlabelled
    table.to_csv(tmp_path / "labels.csv", index=False)
    rc = main(
        ["train", "wdm", "--store", str(path), "--labels", str(tmp_path / "labels.csv"),
         "--out", str(tmp_path / "m"), "--epochs", "2", "--seed", "1"]
    )  # fmt: skip
    assert rc == 0
    meta = read_metadata(tmp_path / "m")
    # 180 labelled; the paper's filters drop those LAMOST failed to classify (Unknown)
    dropped = meta["provenance"]["dropped"]
    assert 0 < dropped["total"] == dropped["inconsistent_class"] <= 6
    assert meta["metrics"]["n_train"] + meta["metrics"]["n_val"] == 180 - dropped["total"]
    ds = preprocess(mspec.open_store(path), recipe="cnn")
    res = predict(ds, tmp_path / "m")
    assert res["wdm_prob"].chunks[0][0] == 64  # one task per store chunk
    assert res["wdm_class"].compute().shape == (200,)


def test_cli_train_tlma_pair_from_store(store, tmp_path):
    from mspec.ml.train import train_from_store

    path, sim = store
    m = sim["true_class"].values == "M"
    table = pd.DataFrame(
        {
            "obsid": sim["obsid"].values[m],
            "teff": sim["true_teff"].values[m],
            "logg": sim["true_logg"].values[m],
            "m_h": sim["true_m_h"].values[m],
            "alpha_m": sim["true_alpha_m"].values[m],
            "rv": sim["true_rv"].values[m],
            "lumclass": np.where(np.arange(m.sum()) % 2 == 0, "dM", "gM"),
        }
    )
    table.to_parquet(tmp_path / "labels.parquet")
    res = train_from_store(
        kind="tlma", store=path, labels=tmp_path / "labels.parquet", out_dir=tmp_path / "p",
        epochs=1, seed=0, folds=2, arch=TINY, plots=False,
    )  # fmt: skip
    assert set(res) == {"dM", "gM", "labels"}
    assert res["labels"]["join"]["key"] == "obsid"
    assert read_metadata(tmp_path / "p")["kind"] == "tlma_pair"
    assert len(read_metadata(tmp_path / "p" / "dM")["members"]) == 2


def test_train_from_store_bad_labels(store, tmp_path):
    from mspec.ml.train import train_from_store

    path, sim = store
    pd.DataFrame({"id": [1]}).to_csv(tmp_path / "a.csv", index=False)
    with pytest.raises(ValueError, match="obsid"):
        train_from_store(kind="wdm", store=path, labels=tmp_path / "a.csv", out_dir=tmp_path)
    pd.DataFrame({"obsid": [1, 2], "class": ["M", "WD"]}).to_csv(tmp_path / "b.csv", index=False)
    with pytest.raises(ValueError, match="no obsid"):
        train_from_store(kind="wdm", store=path, labels=tmp_path / "b.csv", out_dir=tmp_path)
    pd.DataFrame({"obsid": sim["obsid"].values, "x": 1}).to_csv(tmp_path / "c.csv", index=False)
    with pytest.raises(ValueError, match="class column"):
        train_from_store(kind="wdm", store=path, labels=tmp_path / "c.csv", out_dir=tmp_path)
    with pytest.raises(ValueError, match="labels file"):
        train_from_store(kind="wdm", store=path, labels=tmp_path / "zz.csv", out_dir=tmp_path)
    with pytest.raises(ValueError, match="kind"):
        train_from_store(kind="abc", store=path, labels=tmp_path / "c.csv", out_dir=tmp_path)
