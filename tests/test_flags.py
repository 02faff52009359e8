"""mspec.flags: rv_flag and the paper's parameter_flag (fit, Eq. 4 cut, Table-10 ranges)."""

from __future__ import annotations

import dask.dataframe as dd
import numpy as np
import pandas as pd
import pytest
import xarray as xr

from mspec.flags import (
    PARAMETERS,
    SNR_BINS,
    TABLE10_RANGES,
    ParameterFlagFit,
    fit_parameter_errors,
    parameter_flag,
    rv_flag,
    snr_bin,
)
from mspec.testing import raise_if_computes

# known error model per (class, bin, parameter): a0..a5 for 1, snr_i, teff, logg, m_h, alpha_m
NOISE = {"teff": 2.0, "logg": 0.002, "m_h": 0.002, "alpha_m": 0.0005}


def _coef(lc: str, b: int, p: str) -> np.ndarray:
    scale = {"teff": 30.0, "logg": 0.07, "m_h": 0.07, "alpha_m": 0.02}[p]
    k = (0 if lc == "dM" else 1) * 4 + b
    return scale * np.array(
        [2.0 + 0.1 * k, -0.004, 2e-4, -0.05 * (1 + k % 3), 0.3, -0.2 + 0.05 * k]
    )


def _table(n_per_group: int = 400, seed: int = 0) -> tuple[pd.DataFrame, dict]:
    """Spectra in every (class, S/N bin) group whose errors follow known linear models."""
    rng = np.random.default_rng(seed)
    rows = []
    snr_ranges = [(1.0, 20.0), (20.5, 50.0), (50.5, 100.0), (101.0, 400.0)]
    for lc in ("dM", "gM"):
        r = TABLE10_RANGES[lc]
        for b, (lo, hi) in enumerate(snr_ranges):
            n = n_per_group
            d = {
                "luminosity_class": [lc] * n,
                "snr_i": rng.uniform(lo, hi, n),
            }
            for p in PARAMETERS:
                plo, phi = r[p]
                d[p] = rng.uniform(plo, phi, n)  # inside Table 10
            x = np.column_stack([np.ones(n), d["snr_i"], *(d[p] for p in PARAMETERS)])
            for p in PARAMETERS:
                d[f"{p}_err"] = x @ _coef(lc, b, p) + rng.normal(0.0, NOISE[p], n)
            rows.append(pd.DataFrame(d))
    df = pd.concat(rows, ignore_index=True)
    return df, {"n": n_per_group}


def _reference_flags(df: pd.DataFrame, fit: ParameterFlagFit) -> np.ndarray:
    """Brute-force per-row reading of the paper's rule with the given fit."""
    out = np.zeros(len(df), dtype=np.int8)
    for i, row in enumerate(df.itertuples(index=False)):
        s = row.snr_i
        if not (s > 0):
            continue
        lc = row.luminosity_class
        if lc not in ("dM", "gM"):
            continue
        vals = [getattr(row, p) for p in PARAMETERS]
        errs = [getattr(row, f"{p}_err") for p in PARAMETERS]
        if not np.all(np.isfinite(vals + errs)):
            continue
        b = next(k for k, (_, lo, hi) in enumerate(SNR_BINS) if lo < s <= hi)
        ok = True
        for p, v, e in zip(PARAMETERS, vals, errs, strict=True):
            lo, hi = TABLE10_RANGES[lc][p]
            if not (lo <= v <= hi):
                ok = False
            g = fit.group(lc, b, p)
            if g["fitted"]:
                pred = np.dot([1.0, s, *vals], g["coefficients"])
                if not (e - pred < g["mean"] + 3 * g["std"]):
                    ok = False
        out[i] = int(ok)
    return out


# --------------------------------------------------------------------------- rv_flag


def test_rv_flag_rule_numpy_pandas_dask_xarray():
    rv = np.array([10.0, np.nan, -5.0, 3.0, 7.0, 1.0])
    mjd = np.array([55941, 56000, 55940, 55000, np.nan, 59000.0])
    expect = np.array([1, 0, 0, 0, 0, 1], dtype=np.int8)
    got = rv_flag(rv, mjd)
    assert got.dtype == np.int8 and (got == expect).all()
    s = rv_flag(pd.Series(rv), pd.Series(pd.array([55941, 56000, 55940, 55000, None, 59000],
                                                   dtype="Int64")))  # fmt: skip
    assert s.dtype == np.int8 and (s.to_numpy() == expect).all()
    ds = dd.from_pandas(pd.DataFrame({"rv": rv, "mjd": mjd}), npartitions=3)
    with raise_if_computes():
        lazy = rv_flag(ds["rv"], ds["mjd"])
    assert (lazy.compute().to_numpy() == expect).all()
    da = xr.DataArray(rv, dims="spectra").chunk(2)
    with raise_if_computes():
        x = rv_flag(da, xr.DataArray(mjd, dims="spectra").chunk(2))
    assert x.dtype == np.int8 and (x.values == expect).all()
    # a custom date
    assert rv_flag(np.array([1.0]), np.array([55941]), mjd_min=56000)[0] == 0


def test_rv_flag_bad_arguments():
    with pytest.raises(ValueError, match="same shape"):
        rv_flag(np.zeros(3), np.zeros(2))
    with pytest.raises(TypeError, match="mjd_min"):
        rv_flag(np.zeros(1), np.zeros(1), mjd_min="2012-01-14")


def test_snr_bins_are_the_papers():
    s = np.array([-1.0, 0.0, 1e-9, 20.0, 20.0001, 50.0, 50.1, 100.0, 100.01, 1e4, np.nan])
    assert snr_bin(s).tolist() == [-1, -1, 0, 0, 1, 1, 2, 2, 3, 3, -1]
    assert [b[0] for b in SNR_BINS] == ["(0,20]", "(20,50]", "(50,100]", ">100"]


# --------------------------------------------------------------------------- the fit


def test_fit_recovers_known_coefficients_and_matches_lstsq():
    df, _ = _table()
    fit = fit_parameter_errors(df)
    assert len(fit.groups) == 2 * 4 * 4
    for lc in ("dM", "gM"):
        for b in range(4):
            sel = (df.luminosity_class == lc) & (snr_bin(df.snr_i) == b)
            x = np.column_stack(
                [np.ones(sel.sum()), df.snr_i[sel], *(df[p][sel] for p in PARAMETERS)]
            )
            for p in PARAMETERS:
                g = fit.group(lc, b, p)
                assert g["fitted"] and g["n"] == sel.sum()
                y = df[f"{p}_err"][sel].to_numpy()
                ref, *_ = np.linalg.lstsq(x, y, rcond=None)
                # the one-pass moment solution is the least-squares solution
                np.testing.assert_allclose(g["coefficients"], ref, rtol=1e-6, atol=1e-9)
                resid = y - x @ ref
                assert g["std"] == pytest.approx(resid.std(ddof=0), rel=1e-6)
                assert abs(g["mean"]) < 1e-9 * max(1.0, abs(y).max())
                assert g["threshold"] == pytest.approx(g["mean"] + 3 * g["std"])
                # and close to the generating model (noise NOISE[p])
                assert g["std"] == pytest.approx(NOISE[p], rel=0.15)
                pred_true = x @ _coef(lc, b, p)
                pred_fit = x @ np.asarray(g["coefficients"])
                assert np.abs(pred_fit - pred_true).max() < 1.0 * NOISE[p]


def test_parameter_flag_constructed_case():
    df, _ = _table()
    n0 = len(df)
    # outliers in the error: +20 noise sigma on teff_err of 5 dM spectra in bin (20, 50]
    idx_err = df.index[(df.luminosity_class == "dM") & (snr_bin(df.snr_i) == 1)][:5]
    df.loc[idx_err, "teff_err"] += 20 * NOISE["teff"]
    # a value outside Table 10 (logg of a giant at dwarf gravity)
    idx_rng = df.index[df.luminosity_class == "gM"][:3]
    df.loc[idx_rng, "logg"] = 4.0
    # S/N_i <= 0, missing parameter, no class
    extra = df.iloc[:4].copy()
    extra["snr_i"] = [0.0, -3.0, 10.0, 10.0]
    extra.loc[extra.index[2], "m_h"] = np.nan
    extra.loc[extra.index[3], "luminosity_class"] = ""
    df = pd.concat([df, extra], ignore_index=True)
    flag, reason, fit = parameter_flag(df)
    assert flag.dtype == np.int8 and str(reason.dtype) == "string"
    assert (flag.iloc[idx_err] == 0).all()
    assert reason.iloc[idx_err].str.contains("teff_err outlier").all()
    assert (flag.iloc[idx_rng] == 0).all()
    assert reason.iloc[idx_rng].str.contains("logg outside Table 10").all()
    tail = reason.iloc[n0:].tolist()
    assert flag.iloc[n0:].tolist() == [0, 0, 0, 0]
    assert "snr_i <= 0" in tail[0] and "snr_i <= 0" in tail[1]
    assert "missing" in tail[2] and "luminosity class" in tail[3]
    assert (reason[flag == 1] == "").all()
    # everything else passes: only gaussian noise (3 sigma: ~0.1 % one-sided per parameter)
    clean = np.setdiff1d(np.arange(n0), np.r_[idx_err, idx_rng])
    assert flag.iloc[clean].mean() > 0.98
    # exactly the rule, row by row
    np.testing.assert_array_equal(flag.to_numpy(), _reference_flags(df, fit))


@pytest.mark.parametrize("nparts", [1, 7])
def test_dask_one_pass_equals_pandas(nparts):
    df, _ = _table(n_per_group=150, seed=2)
    flag_pd, reason_pd, fit_pd = parameter_flag(df)
    ddf = dd.from_pandas(df, npartitions=nparts)
    fit_dd = fit_parameter_errors(ddf)
    for a, b in zip(fit_pd.groups, fit_dd.groups, strict=True):
        np.testing.assert_allclose(a["coefficients"], b["coefficients"], rtol=1e-8, atol=1e-12)
        assert a["std"] == pytest.approx(b["std"], rel=1e-8)
    with raise_if_computes():
        flag_dd, reason_dd, _ = parameter_flag(ddf, fit=fit_dd)
    np.testing.assert_array_equal(flag_dd.compute().to_numpy(), flag_pd.to_numpy())
    assert reason_dd.compute().tolist() == reason_pd.tolist()


def test_fit_json_round_trip_and_reuse(tmp_path):
    df, _ = _table(n_per_group=100, seed=3)
    flag, _, fit = parameter_flag(df)
    path = tmp_path / "catalog" / "parameter_flag.json"
    fit.to_json(path)
    back = ParameterFlagFit.from_json(path)
    assert back.to_dict() == fit.to_dict()
    coeffs = back.coefficients()
    assert list(coeffs.columns[:5]) == ["lumclass", "snr_bin", "parameter", "n", "fitted"]
    assert len(coeffs) == 32 and coeffs.fitted.all()
    for f in (back, fit.to_dict(), path):
        np.testing.assert_array_equal(parameter_flag(df, fit=f).flag.to_numpy(), flag.to_numpy())


def test_small_groups_not_fitted_but_ranges_applied():
    df, _ = _table(n_per_group=100, seed=4)
    # only 10 gM spectra at S/N_i > 100: below min_rows
    gm_hi = df.index[(df.luminosity_class == "gM") & (snr_bin(df.snr_i) == 3)]
    df = df.drop(gm_hi[10:]).reset_index(drop=True)
    flag, reason, fit = parameter_flag(df, min_rows=20)
    g = fit.group("gM", 3, "teff")
    assert not g["fitted"] and g["n"] == 10 and "min_rows" in g["note"]
    sel = (df.luminosity_class == "gM") & (snr_bin(df.snr_i) == 3)
    assert (flag[sel] == 1).all()  # no error cut, all inside Table 10
    df.loc[df.index[sel][0], "teff"] = 5000.0
    assert parameter_flag(df, fit=fit).flag[df.index[sel][0]] == 0


def test_bad_arguments_name_the_problem():
    df, _ = _table(n_per_group=30, seed=5)
    with pytest.raises(KeyError, match="alpha_m_err"):
        parameter_flag(df.drop(columns=["alpha_m_err"]))
    with pytest.raises(KeyError, match="lumcls"):
        parameter_flag(df, lumclass="lumcls")
    with pytest.raises(ValueError, match="min_rows"):
        fit_parameter_errors(df, min_rows=3)
    with pytest.raises(ValueError, match="n_sigma"):
        fit_parameter_errors(df, n_sigma=0)
    with pytest.raises(ValueError, match="ranges"):
        fit_parameter_errors(df, ranges={"dM": TABLE10_RANGES["dM"]})
    with pytest.raises(TypeError, match="fit must be"):
        parameter_flag(df, fit=42)


def test_empty_and_all_bad_tables_do_not_crash():
    df, _ = _table(n_per_group=30, seed=6)
    empty = df.iloc[:0]
    flag, reason, fit = parameter_flag(empty)
    assert len(flag) == 0 and not any(g["fitted"] for g in fit.groups)
    bad = df.copy()
    bad["teff"] = np.nan
    flag, reason, _ = parameter_flag(dd.from_pandas(bad, npartitions=2))
    assert (flag.compute() == 0).all()
