"""Calibrated CNN-TLMA errors (issue 18): the calibration table, its use at inference, old models."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import xarray as xr

import mspec
from mspec.ml.calibrate import (
    CalibrationWarning,
    apply_calibration,
    fit_calibration,
    noise_proxy,
    pull_std,
)
from mspec.ml.infer import clear_cache, predict, predict_array
from mspec.ml.io import read_metadata
from mspec.ml.models import TLMA_LABELS
from mspec.ml.train import train_regressor
from mspec.preprocessing.steps import preprocess

TINY = {"channels": (4, 8, 8, 8), "kernels": (5, 5, 3, 3)}
SNR_BINS = ((5, 10), (10, 20), (20, 50), (50, 150))


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_noise_proxy_tracks_the_noise():
    rng = np.random.default_rng(0)
    wl = np.arange(5000.0)
    base = np.sin(wl / 200.0)
    x = np.stack([base + rng.normal(0, s, wl.size) for s in (0.01, 0.1, 0.3, 1.0)])
    nu = noise_proxy(x)
    assert np.all(np.diff(nu) > 0)
    np.testing.assert_allclose(nu[2:], [0.3, 1.0], rtol=0.1)  # white noise: its sigma
    x[1, :2000] = np.nan  # NaN pixels are ignored
    assert abs(noise_proxy(x[1])[0] - nu[1]) < 0.02
    assert np.isnan(noise_proxy(np.full((1, 5000), np.nan))[0])


def test_fit_calibration_makes_pulls_unit_in_every_bin():
    rng = np.random.default_rng(1)
    n = 4000
    nu = np.exp(rng.uniform(np.log(0.01), np.log(1.0), n))
    true_sigma = 20 + 300 * nu  # error grows with the noise
    err_ens = 0.3 * true_sigma * rng.uniform(0.5, 1.5, n)  # ensemble std: 3x too small
    resid = rng.normal(0, true_sigma)
    r = np.stack([resid, 0.5 * resid], 1)
    s = np.stack([err_ens, 5 * err_ens], 1)  # second label: ensemble std too large
    cal = fit_calibration(r, s, nu, ["a", "b"])
    json.dumps(cal)  # JSON-serialisable
    assert len(cal["centers"]["a"]) == 6
    assert cal["pull_std_raw"]["a"] > 2 and cal["pull_std_raw"]["b"] < 0.8
    err = apply_calibration(cal, s, nu, ["a", "b"])
    edges = np.quantile(nu, np.linspace(0, 1, 5))
    for lo, hi in zip(edges[:-1], edges[1:]):
        sel = (nu >= lo) & (nu <= hi)
        for j in range(2):
            assert 0.85 < np.std(r[sel, j] / err[sel, j]) < 1.15
    assert min(cal["scale"]["b"]) < 1 and max(cal["tau"]["a"]) > 0
    # no calibration: unchanged
    np.testing.assert_array_equal(apply_calibration(None, s, nu, ["a", "b"]), s)
    with pytest.raises(ValueError, match="resid"):
        fit_calibration(r[:, :1], s, nu, ["a", "b"])


@pytest.mark.slow
def test_calibrated_errors_on_an_independent_simulated_survey(tmp_path):
    """std((pred - truth) / err) in [0.8, 1.25] in every S/N_i bin for every parameter."""
    train = mspec.simulate_survey(1600, seed=21, mix={"dM": 1.0}, snr=(5.0, 150.0))
    test = mspec.simulate_survey(900, seed=22, mix={"dM": 1.0}, snr=(5.0, 150.0))
    tl = preprocess(train, recipe="tlma", rv="true_rv")
    lab = {k: train[f"true_{k}"].values for k in TLMA_LABELS}
    m = train_regressor(tl, lab, tmp_path / "m", folds=3, epochs=8, seed=0, arch=TINY,
                        lr=3e-3, batch_size=64, threads=1, plots=False,
                        calib_fraction=0.25)  # fmt: skip
    assert m["n_calibration"] >= 400 and m["calibration"]["source"] == "holdout"
    res = predict(preprocess(test, recipe="tlma", rv="true_rv"), tmp_path / "m").compute()
    snr = test["snr_i"].values
    raw_pulls = []
    for k in TLMA_LABELS:
        for lo, hi in SNR_BINS:
            sel = (snr > lo) & (snr <= hi)
            assert sel.sum() > 100
            p = pull_std(res[k].values[sel], test[f"true_{k}"].values[sel],
                         res[f"{k}_err"].values[sel])  # fmt: skip
            assert 0.8 <= p <= 1.25, (k, lo, hi, p)
            raw_pulls.append(pull_std(res[k].values[sel], test[f"true_{k}"].values[sel],
                                      res[f"{k}_err_ens"].values[sel]))  # fmt: skip
    assert max(raw_pulls) > 1.5  # the raw ensemble std alone does not mean what it says


def _tiny_tlma(tmp_path, **kw):
    sim = mspec.simulate_survey(160, seed=3, mix={"dM": 1.0}, snr=(20.0, 80.0))
    tl = preprocess(sim, recipe="tlma", rv="true_rv")
    lab = {k: sim[f"true_{k}"].values for k in TLMA_LABELS}
    train_regressor(tl, lab, tmp_path / "m", folds=2, epochs=2, seed=0, arch=TINY,
                    threads=1, plots=False, **kw)  # fmt: skip
    return tmp_path / "m", tl


def test_model_without_calibration_loads_with_a_warning(tmp_path):
    model, tl = _tiny_tlma(tmp_path)
    meta = read_metadata(model)
    assert meta["calibration"]["source"] == "oof"  # 160 spectra: too few for a hold-out
    assert meta["recipe_training"]["calibration"] == "oof"
    # an old model directory: no calibration entry
    meta.pop("calibration")
    (model / "model.json").write_text(json.dumps(meta))
    clear_cache()
    with pytest.warns(CalibrationWarning, match="no error calibration"):
        res = predict(tl.isel(spectra=slice(0, 20)), model)
    for k in TLMA_LABELS:
        np.testing.assert_array_equal(res[f"{k}_err"].values, res[f"{k}_err_ens"].values)
    out = predict_array(tl["flux_grid"].values[:5], model)
    assert out.shape == (5, 8)


def test_calibration_none_and_bad_arguments(tmp_path):
    model, tl = _tiny_tlma(tmp_path, calibration="none")
    assert read_metadata(model)["calibration"] is None
    lab = {k: np.ones(tl.sizes["spectra"]) for k in TLMA_LABELS}
    with pytest.raises(ValueError, match="calibration"):
        train_regressor(tl, lab, tmp_path / "x", calibration="bogus")
    with pytest.raises(ValueError, match="calib_fraction"):
        train_regressor(tl, lab, tmp_path / "x", calib_fraction=0.9)
    with pytest.raises(ValueError, match="errors"):
        predict_array(tl["flux_grid"].values[:2], model, errors="raw")
    with warnings.catch_warnings():
        warnings.simplefilter("error", CalibrationWarning)
        with pytest.warns(CalibrationWarning):
            predict(tl.isel(spectra=slice(0, 4)), model)


def test_missing_label_is_not_trained(tmp_path):
    sim = mspec.simulate_survey(120, seed=4, mix={"dM": 1.0}, snr=(20.0, 80.0))
    tl = preprocess(sim, recipe="tlma", rv="true_rv")
    lab = {k: sim[f"true_{k}"].values for k in ("teff", "logg")}
    lab["logg"] = np.where(np.arange(120) % 3 == 0, np.nan, lab["logg"])  # partly missing
    train_regressor(tl, lab, tmp_path / "m", folds=2, epochs=1, arch=TINY, plots=False)
    meta = read_metadata(tmp_path / "m")
    assert meta["labels_trained"] == ["teff", "logg"]
    res = predict(tl.isel(spectra=slice(0, 10)), tmp_path / "m")
    assert np.isfinite(res["teff"].values).all() and np.isfinite(res["logg"].values).all()
    assert np.isnan(res["m_h"].values).all() and np.isnan(res["alpha_m_err"].values).all()
    assert isinstance(res, xr.Dataset)
