"""RV reconciliation (issue 13): TM quality, the rules (every rv_from branch), decisions,
rv_flag, laziness, and the whole chain on a simulated survey with failure modes."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pandas as pd
import pytest
import xarray as xr

from mspec.rv.lines_kernels import line_table
from mspec.rv.reconcile import (
    INPUTS,
    OUTPUTS,
    RV_FROM,
    SNR_EDGES,
    reconcile_rv,
    rv_residual_sigmas,
)
from mspec.rv.tm_engine import curve_quality
from mspec.stage import STAGES
from mspec.testing import raise_if_computes
from mspec.variables import VARIABLES, VariableError

NB = len(SNR_EDGES) - 1
NAMES, WAVE, _, KIND = line_table()
ABS = np.asarray(KIND) == "absorption"


def _sigmas(**over):
    flat = {"snr_edges": list(SNR_EDGES), "median": [0.0] * NB, "sigma": [0.1] * NB}
    s = {
        "n_spectra": 1000,
        "tm": {"mean": 0.0, "sigma": 10.0, "n": 1000, "n_used": 950},
        "dsal1": {"mean": 0.0, "sigma": 8.0, "n": 800, "n_used": 700},
        "dsal2": {"mean": 0.0, "sigma": 12.0, "n": 900, "n_used": 800},
        "lamost_err": {"snr_edges": list(SNR_EDGES), "sigma": [6.0] * NB},
        "err_scale": {"dsal1": 1.0, "dsal2": 1.0, "dsel": 1.0},
        "chi2_tm": dict(flat),
        "chi2_tml7500": dict(flat),
        "red_ratio": dict(flat),
        "line_offsets": {
            str(n): 0.0 for n, k in zip(NAMES, KIND, strict=True) if k == "absorption"
        },
        "line_scatter": {
            str(n): 8.0 for n, k in zip(NAMES, KIND, strict=True) if k == "absorption"
        },
    }
    s.update(over)
    return s


def _base(n, rv=20.0):
    """n spectra where every method measures ``rv`` well (S/N 30, observed 2015)."""
    nl = len(NAMES)
    line = np.full((n, nl), rv)
    line[:, ~ABS] = np.nan
    status = np.where(ABS, 0, 9).astype(np.int8)[None, :].repeat(n, 0)
    d = {
        "lamost_rv": np.full(n, rv + 2.0),
        "mjd": np.full(n, 57000, np.int32),
        "snr_i": np.full(n, 30.0),
        "rv_tm": np.full(n, rv),
        "rv_tm_err_stat": np.full(n, 2.0),
        "tm_status": np.zeros(n, np.int8),
        "tm_quality": np.zeros(n, np.int8),
        "tm_chi2_red": np.ones(n),
        "rv_tml7500": np.full(n, rv + 1.0),
        "rv_tml7500_err_stat": np.full(n, 3.0),
        "tml7500_status": np.zeros(n, np.int8),
        "tml7500_quality": np.zeros(n, np.int8),
        "tml7500_chi2_red": np.ones(n),
        "rv_line": line,
        "rv_line_err": np.full((n, nl), 3.0),
        "line_status": status,
        "rv_dsal1": np.full(n, rv + 1.0),
        "rv_dsal1_err": np.full(n, 4.0),
        "rv_dsal1_n": np.full(n, 6, np.int8),
        "rv_dsal2": np.full(n, rv + 1.0),
        "rv_dsal2_err": np.full(n, 4.0),
        "rv_dsal2_n": np.full(n, 6, np.int8),
        "rv_dsel": np.full(n, np.nan),
        "rv_dsel_err": np.full(n, np.nan),
        "rv_dsel_n": np.zeros(n, np.int8),
        "ew_halpha": np.full(n, 0.1),
    }
    return d


def _dataset(d):
    data = {}
    for k, v in d.items():
        dims = ("spectra", "lines") if np.ndim(v) == 2 else ("spectra",)
        data[k] = (dims, v)
    n = len(d["lamost_rv"])
    return xr.Dataset(
        data,
        coords={
            "obsid": ("spectra", np.arange(1000, 1000 + n)),
            "lines": ("lines", np.asarray(NAMES)),
            "line_wavelength": ("lines", np.asarray(WAVE)),
            "line_kind": ("lines", np.asarray(KIND)),
        },
    )


# one spectrum per branch --------------------------------------------------------------------
def _branches():
    cases = {}
    d = _base(12)
    # 0: LAMOST accepted by TM (default values)
    cases[0] = "LAMOST"
    # 1: TM unusable (quality), DSAL agrees with LAMOST
    d["tm_quality"][1] = 2
    cases[1] = "LAMOST"
    # 2: LAMOST catastrophically wrong; TM and DSAL agree -> TM
    d["lamost_rv"][2] = 320.0
    cases[2] = "TM"
    # 3: LAMOST wrong, TM at the grid edge, DSAL I -> DSAL I
    d["lamost_rv"][3] = -200.0
    d["tm_quality"][3] = 1
    cases[3] = "DSAL I"
    # 4: LAMOST wrong, TM failed, no DSAL I, DSAL II from 3 lines -> DSAL II (queued)
    d["lamost_rv"][4] = -200.0
    d["tm_status"][4] = 5
    d["rv_tm"][4] = np.nan
    d["rv_dsal1"][4] = np.nan
    d["rv_dsal2_n"][4] = 3
    cases[4] = "DSAL II"
    # 5: red-end anomaly: TM chi2 far above TML7500's; DSAL corrupted -> TML7500
    d["lamost_rv"][5] = 150.0
    d["tm_chi2_red"][5] = 30.0
    d["rv_tm"][5] = 90.0
    d["rv_dsal1"][5] = 140.0
    d["rv_dsal2"][5] = 140.0
    cases[5] = "TML7500"
    # 6: flaring dwarf: absorption methods fail, Halpha emission -> DSEL
    d["lamost_rv"][6] = 250.0
    d["tm_chi2_red"][6] = d["tml7500_chi2_red"][6] = 100.0  # chi2 excess: TM unusable
    for k in ("rv_dsal1", "rv_dsal2"):
        d[k][6] = np.nan
    d["rv_dsal1_n"][6] = d["rv_dsal2_n"][6] = 0
    d["line_status"][6, :] = 8
    d["rv_dsel"][6], d["rv_dsel_err"][6], d["rv_dsel_n"][6] = 21.0, 3.0, 4
    d["ew_halpha"][6] = -40.0
    cases[6] = "DSEL"
    # 7: nothing reliable -> NoRV_lowQuality
    d["lamost_rv"][7] = 99.0
    d["tm_status"][7] = 5
    d["rv_tm"][7] = np.nan
    d["tml7500_status"][7] = 5
    d["rv_tml7500"][7] = np.nan
    for k in ("rv_dsal1", "rv_dsal2"):
        d[k][7] = np.nan
    d["rv_dsal1_n"][7] = d["rv_dsal2_n"][7] = 0
    d["line_status"][7, :] = 3
    cases[7] = "NoRV_lowQuality"
    # 8: wavelength-calibration error: line RVs drift by 120 km/s over 1000 A, LAMOST and
    # TM share the error
    drift = 20.0 + 120.0 * (np.asarray(WAVE) - 8000.0) / 1000.0
    d["rv_line"][8, ABS] = drift[ABS]
    d["rv_tm"][8] = 40.0
    d["lamost_rv"][8] = 42.0
    cases[8] = "NoRV_waveErr"
    # 9: TM alone (no DSAL at all), LAMOST wrong -> TM, queued
    d["lamost_rv"][9] = 200.0
    for k in ("rv_dsal1", "rv_dsal2"):
        d[k][9] = np.nan
    d["rv_dsal1_n"][9] = d["rv_dsal2_n"][9] = 0
    d["line_status"][9, :] = 2
    cases[9] = "TM"
    # 10: LAMOST accepted, |rv| > 150 -> queued; observed before 2012-01-14 -> rv_flag 0
    for k in ("lamost_rv", "rv_tm", "rv_tml7500", "rv_dsal1", "rv_dsal2"):
        d[k][10] = 180.0
    d["rv_line"][10, ABS] = 180.0
    d["mjd"][10] = 55900
    cases[10] = "LAMOST"
    # 11: TM and TML7500 disagree by far more than their errors, no red-end excess
    d["rv_tml7500"][11] = 90.0
    cases[11] = "NoRV_waveErr"
    return d, cases


@pytest.fixture(scope="module")
def branches():
    d, cases = _branches()
    ds = _dataset(d)
    out = reconcile_rv(ds, sigmas=_sigmas(), merge=False)
    return d, cases, ds, out


def test_every_rv_from_branch(branches):
    d, cases, _, out = branches
    got = out.rv_from.values
    for i, want in cases.items():
        assert got[i] == want, (i, got[i], want)
    assert set(cases.values()) == set(RV_FROM)
    assert set(np.unique(got)) <= set(RV_FROM)


def test_values_errors_and_inspection(branches):
    d, cases, _, out = branches
    rv, err, ins = out.rv.values, out.rv_err.values, out.rv_inspect.values
    assert rv[0] == d["lamost_rv"][0] and err[0] == 6.0  # LAMOST error of the S/N bin
    assert rv[2] == d["rv_tm"][2] and err[2] == 2.0
    assert rv[3] == d["rv_dsal1"][3]
    assert err[3] == pytest.approx(4.0 / np.sqrt(6))  # std / sqrt(n), scale 1
    assert rv[5] == d["rv_tml7500"][5] and rv[6] == 21.0
    for i in (7, 8, 11):
        assert np.isnan(rv[i]) and np.isnan(err[i])
    assert "DSAL II only" in ins[4] and "not corroborated" in ins[9]
    assert ins[10] == "|rv| > 150 km/s"
    assert ins[0] == ins[2] == ins[3] == ""
    assert out.red_end_excess.values[5] > 4 and out.tm_chi2_excess.values[6] > 4
    assert abs(out.line_rv_slope.values[8] - 120.0) < 1.0
    assert abs(out.line_rv_slope.values[0]) < 1e-6


def test_rv_flag_rule(branches):
    d, _, _, out = branches
    flag = out.rv_flag.values
    want = (np.isfinite(out.rv.values) & (d["mjd"] > 55940)).astype(np.int8)
    np.testing.assert_array_equal(flag, want)
    assert flag[10] == 0 and np.isfinite(out.rv.values[10])  # observed before 2012-01-14
    assert flag[7] == 0 and flag[0] == 1
    # exactly MJD 55940 is not "after"
    d2 = _base(2)
    d2["mjd"][:] = [55940, 55941]
    o = reconcile_rv(_dataset(d2), sigmas=_sigmas(), merge=False)
    assert o.rv_flag.values.tolist() == [0, 1]


def test_paper_single_sigma_option():
    """per_snr=False: the paper's one σ for all S/N (wider band at high S/N)."""
    d = _base(1)
    d["lamost_rv"][0] = d["rv_tm"][0] + 25.0  # 2.5 σ of the global 10 km/s
    d["rv_dsal1"][0] = d["rv_dsal2"][0] = np.nan
    d["rv_dsal1_n"][0] = d["rv_dsal2_n"][0] = 0
    bins = {"snr_edges": list(SNR_EDGES), "mean": [0.0] * NB, "sigma": [4.0] * NB}
    s = _sigmas(tm_bins=bins)
    ds = _dataset(d)
    assert reconcile_rv(ds, sigmas=s, merge=False).rv_from.values[0] == "TM"
    assert reconcile_rv(ds, sigmas=s, per_snr=False, merge=False).rv_from.values[0] == "LAMOST"


def test_decisions_honoured(branches):
    d, _, ds, _ = branches
    dec = pd.DataFrame(
        {
            "obsid": ["1000", "1007", "1002", "99999"],  # 99999: not in the run, ignored
            "decision": ["DSAL II", "NoRV_waveErr", "LAMOST", "TM"],
        }
    )
    out = reconcile_rv(ds, sigmas=_sigmas(), decisions=dec, merge=False)
    assert out.rv_from.values[0] == "DSAL II" and out.rv.values[0] == d["rv_dsal2"][0]
    assert out.rv_from.values[7] == "NoRV_waveErr" and np.isnan(out.rv.values[7])
    assert out.rv_from.values[2] == "LAMOST" and out.rv.values[2] == 320.0
    assert out.rv_inspect.values[2] == ""  # a decided spectrum is settled
    # a decision naming a method without a value: no RV, and the reason says so
    dec = pd.DataFrame({"obsid": ["1006"], "decision": ["TM"]})
    d6 = reconcile_rv(ds, sigmas=_sigmas(), decisions=dec, merge=False)
    assert d6.rv_from.values[6] == "TM"  # TM had a value (unusable, but chosen by a person)
    dec = pd.DataFrame({"obsid": ["1007"], "decision": ["DSEL"]})
    d7 = reconcile_rv(ds, sigmas=_sigmas(), decisions=dec, merge=False)
    assert d7.rv_from.values[7] == "NoRV_lowQuality"
    assert "without a value" in d7.rv_inspect.values[7]
    with pytest.raises(ValueError, match="unknown decision"):
        reconcile_rv(ds, sigmas=_sigmas(), decisions=dec.assign(decision="XX"), merge=False)
    with pytest.raises(TypeError, match="decisions"):
        reconcile_rv(ds, sigmas=_sigmas(), decisions={"obsid": 1}, merge=False)
    with pytest.raises(ValueError, match="no obsid"):
        reconcile_rv(ds.drop_vars("obsid"), sigmas=_sigmas(), decisions=dec, merge=False)


def test_lazy_chunked_equals_unchunked(branches):
    _, _, ds, out = branches
    dec = pd.DataFrame({"obsid": ["1003"], "decision": ["TML7500"]})
    ref = reconcile_rv(ds, sigmas=_sigmas(), decisions=dec, merge=False)
    for chunks in (1, 5):
        dk = ds.chunk({"spectra": chunks})
        with raise_if_computes():
            lazy = reconcile_rv(dk, sigmas=_sigmas(), decisions=dec, merge=False)
        assert lazy.rv.chunks is not None
        got = lazy.compute()
        for v in OUTPUTS:
            a, b = got[v].values, ref[v].values
            if a.dtype.kind in "fc":
                np.testing.assert_array_equal(a, b)
            else:
                assert a.tolist() == b.tolist(), v


def test_stage_contract(branches):
    _, _, ds, out = branches
    spec = STAGES["reconcile_rv"]
    assert spec.module == "RVMM" and set(spec.outputs) == set(OUTPUTS)
    for v in (*OUTPUTS, *INPUTS, "tm_quality", "tm_chi2_red", "true_failure"):
        assert v in VARIABLES, v
    assert set(out.data_vars) == set(OUTPUTS)
    merged = reconcile_rv(ds, sigmas=_sigmas())
    assert "rv_tm" in merged and "rv" in merged
    s = json.loads(out.attrs["rv_sigmas"])
    assert s["tm"]["sigma"] == 10.0
    with pytest.raises(VariableError, match="rv_dsal2"):
        reconcile_rv(ds.drop_vars("rv_dsal2"), sigmas=_sigmas())


def test_bad_arguments(branches):
    _, _, ds, _ = branches
    with pytest.raises(ValueError, match="tm_sigma"):
        reconcile_rv(ds, sigmas=_sigmas(), tm_sigma=0)
    with pytest.raises(ValueError, match="inspect_abs_rv"):
        reconcile_rv(ds, sigmas=_sigmas(), inspect_abs_rv=-1.0)
    with pytest.raises(TypeError, match="sigmas"):
        reconcile_rv(ds, sigmas={"a": 1})
    with pytest.raises(TypeError, match="per_snr"):
        reconcile_rv(ds, sigmas=_sigmas(), per_snr="yes")
    with pytest.raises(TypeError, match="ds"):
        reconcile_rv(ds.to_dataframe(), sigmas=_sigmas())
    with pytest.raises(ValueError, match="where"):
        rv_residual_sigmas(ds, where=np.ones(3, bool))
    with pytest.raises(ValueError, match="tm_clip"):
        rv_residual_sigmas(ds, tm_clip=0)


def test_bad_rows_never_crash(branches):
    """NaN everywhere, infinite values, empty input: outputs, never an exception."""
    d = _base(3)
    for k, v in d.items():
        if np.asarray(v).dtype.kind == "f":
            d[k] = np.full_like(v, np.nan)
    d["rv_tm"][1] = np.inf
    out = reconcile_rv(_dataset(d), sigmas=_sigmas(), merge=False)
    assert out.rv_from.values.tolist() == ["NoRV_lowQuality"] * 3
    assert (out.rv_flag.values == 0).all()
    empty = _dataset(_base(0))
    assert reconcile_rv(empty, sigmas=_sigmas(), merge=False).sizes["spectra"] == 0


def test_residual_sigmas_iterative_clipping():
    """σ by iterative clipping: a Gaussian core with 10 % outliers gives the core's σ."""
    rng = np.random.default_rng(3)
    n = 4000
    d = _base(n, rv=0.0)
    truth = rng.normal(0, 30, n)
    d["rv_tm"] = truth + rng.normal(0, 3, n)
    d["lamost_rv"] = truth + 5.0 + rng.normal(0, 8, n)
    bad = rng.random(n) < 0.1
    d["lamost_rv"][bad] += rng.uniform(100, 400, bad.sum()) * rng.choice([-1, 1], bad.sum())
    d["rv_dsal1"] = truth + rng.normal(0, 6, n)
    d["rv_dsal2"] = truth + rng.normal(0, 6, n)
    d["rv_line"] = truth[:, None] + rng.normal(0, 6, (n, len(NAMES)))
    d["snr_i"] = rng.uniform(5, 200, n)
    ds = _dataset(d)
    s = rv_residual_sigmas(ds)
    want = np.sqrt(8**2 + 3**2)
    assert s["tm"]["mean"] == pytest.approx(-5.0, abs=0.5)
    assert s["tm"]["sigma"] == pytest.approx(want, rel=0.08)  # 3σ clipping trims ~1 %
    assert s["tm"]["n_used"] < 0.92 * s["tm"]["n"]
    # 2σ clipping of a Gaussian keeps its core (σ ~ 0.88 of the true σ at convergence)
    assert 0.6 * np.hypot(8, 6) < s["dsal1"]["sigma"] < np.hypot(8, 6)
    # LAMOST error per S/N bin: sqrt(σ(TM - LAMOST)² - err_TM²) ~ 8
    le = np.asarray(s["lamost_err"]["sigma"])
    assert np.all(np.abs(le[1:] - 8.0) < 2.0), le
    # error scale of DSAL: (DSAL - TM) has σ sqrt(6² + 3²); reported errors std/sqrt(n)
    json.dumps(s)  # JSON-serialisable
    # where= restricts the population
    s2 = rv_residual_sigmas(ds, where=~bad)
    assert s2["tm"]["n"] == int((~bad).sum())


def test_residual_sigmas_chunked_in_one_task(monkeypatch):
    """Dask-backed input (several chunks): the same statistics, bit for bit; the chunks'
    populations are selected a few chunks per graph and one final task gathers them (on a
    worker under a client): the driver never holds the population or a graph of it all."""
    import dask

    from mspec.rv import reconcile as rc

    monkeypatch.setattr(rc, "_GATHER_CHUNKS", 2)

    rng = np.random.default_rng(5)
    n = 3000
    d = _base(n, rv=0.0)
    truth = rng.normal(0, 30, n)
    d["rv_tm"] = truth + rng.normal(0, 3, n)
    d["lamost_rv"] = truth + rng.normal(0, 8, n)
    d["rv_dsal1"] = truth + rng.normal(0, 6, n)
    d["rv_dsal2"] = truth + rng.normal(0, 6, n)
    d["rv_line"] = truth[:, None] + rng.normal(0, 6, (n, len(NAMES)))
    d["snr_i"] = rng.uniform(5, 200, n)
    ds = _dataset(d)
    where = rng.random(n) < 0.7
    want = rv_residual_sigmas(ds, where=where)
    lazy = ds.chunk({"spectra": 700})
    calls = []

    def counting(dsk, keys, **kwargs):
        calls.append(keys)
        return dask.get(dsk, keys, **kwargs)

    with dask.config.set(scheduler=counting):
        got = rv_residual_sigmas(lazy, where=xr.DataArray(where, dims="spectra"))
    # 5 chunks: 3 graphs of at most 2 chunk selections, then one key: the statistics
    assert [len(k) for k in calls] == [2, 2, 1, 1]
    assert all(str(k).startswith("_select_rows") for keys in calls[:3] for k in keys)
    assert calls[-1][0].startswith("_sigmas_of_parts")
    assert json.dumps(got, sort_keys=True) == json.dumps(want, sort_keys=True)
    assert got["n_spectra"] == int(where.sum())
    # a lazy population on in-memory data, and no population: the same as in memory
    lazy_where = xr.DataArray(where, dims="spectra").chunk({"spectra": 500})
    assert json.dumps(rv_residual_sigmas(ds, where=lazy_where), sort_keys=True) == json.dumps(
        want, sort_keys=True
    )
    assert json.dumps(rv_residual_sigmas(lazy), sort_keys=True) == json.dumps(
        rv_residual_sigmas(ds), sort_keys=True
    )


# TM quality -------------------------------------------------------------------------------
def test_curve_quality_edge_and_ambiguous():
    v = np.arange(-600.0, 601.0, 60.0)
    good = 10.0 - 5.0 * np.exp(-0.5 * (v / 100.0) ** 2)
    edge = 10.0 - 5.0 * np.exp(-0.5 * ((v - 590.0) / 100.0) ** 2)
    two = good - 4.0 * np.exp(-0.5 * ((v + 400.0) / 80.0) ** 2)
    flat_dip = good.copy()
    q = curve_quality(np.stack([good, edge, two, flat_dip]), v, [0.0, 590.0, 0.0, 560.0])
    assert q.tolist() == [0, 1, 2, 1]
    assert curve_quality(np.full((1, 21), np.nan), v, [np.nan]).tolist() == [0]


@pytest.fixture(scope="module")
def a_stars():
    """M dwarfs and A stars at S/N 9 through TM (the issue's A2 star at S/N 9: 489 km/s)."""
    from mspec.rv import template_match
    from mspec.simulate import simulate_survey

    ds = simulate_survey(160, seed=21, mix={"dM": 0.75, "A": 0.25}, snr=(7.0, 11.0))
    tm = template_match(ds, shifts=np.arange(-500.0, 501.0, 50.0), quality=True, merge=False)
    return ds, tm


def test_template_match_quality_option(a_stars):
    from mspec.rv import template_match

    ds, tm = a_stars
    sub = ds.isel(spectra=slice(0, 3))
    kw = dict(shifts=np.arange(-500.0, 501.0, 250.0), merge=False)
    plain = template_match(sub, **kw)
    assert "tm_quality" not in plain and "tm_chi2_red" not in plain
    with_q = template_match(sub.chunk({"spectra": 1}), quality=True, wave_max=7500, **kw)
    assert {"tml7500_quality", "tml7500_chi2_red"} <= set(with_q.data_vars)
    np.testing.assert_array_equal(with_q.rv_tml7500.values, template_match(
        sub, wave_max=7500, **kw).rv_tml7500.values)  # fmt: skip
    assert (with_q.tml7500_chi2_red.values > 0.5).all()
    with pytest.raises(TypeError, match="quality"):
        template_match(sub, quality="yes", **kw)


def test_tm_quality_catches_a_stars(a_stars):
    ds, tm = a_stars
    assert {"tm_quality", "tm_chi2_red"} <= set(tm.data_vars)
    assert tm.tm_quality.attrs["flag_meanings"].split() == ["edge", "ambiguous"]
    assert tm.tm_quality.attrs["flag_masks"].tolist() == [1, 2]
    m = ds.true_class.values == "M"
    lr = np.log10(tm.tm_chi2_red.values)
    med, mad = np.median(lr[m]), 1.4826 * np.median(np.abs(lr[m] - np.median(lr[m])))
    excess = (lr - med) / mad
    usable = (tm.tm_status.values == 0) & (tm.tm_quality.values == 0) & (excess <= 5.0)
    a = ~m
    wrong = a & (np.abs(tm.rv_tm.values - ds.true_rv.values) > 100)
    assert wrong.sum() >= 3  # TM does go wrong on A stars at S/N 9
    assert not (usable & wrong).any()
    # A stars are unusable, M dwarfs mostly not (measured: 100 % / 12 %, of which the
    # paper's status codes 7 %)
    assert (~usable[a]).mean() >= 0.9
    assert (~usable[m]).mean() <= 0.2
    assert ((tm.tm_quality.values != 0) & m).mean() <= 0.05
    # and the reconciliation does the same with the run's statistic
    mini = ds[["lamost_rv", "mjd", "snr_i"]].assign(tm.data_vars)
    sig = {"snr_edges": list(SNR_EDGES), "median": [med] * NB, "sigma": [mad] * NB}
    from mspec.rv.reconcile import _excess

    np.testing.assert_allclose(_excess(lr, sig, mini.snr_i.values), excess)


# the whole chain on a simulated survey ----------------------------------------------------
FAILURES = {
    "red_end_anomaly": 0.05,
    "wave_calibration": 0.05,
    "emission_dwarf": 0.05,
    "very_low_snr": 0.04,
    "lamost_rv_catastrophic": 0.04,
    "lamost_rv_modest": 0.04,
}


@pytest.fixture(scope="module")
def chain():
    from mspec.rv import template_match
    from mspec.rv.lines import line_rvs
    from mspec.simulate import simulate_survey

    ds = simulate_survey(
        900, seed=5, mix={"dM": 0.9, "gM": 0.1}, failures=FAILURES, pipeline_errors={"rv": 0.0}
    )
    shifts = np.arange(-500.0, 501.0, 25.0)
    dk = ds.chunk({"spectra": 300})
    tm = template_match(dk, shifts=shifts, quality=True, merge=False)
    tml = template_match(dk, wave_max=7500, shifts=shifts, quality=True, merge=False)
    tm, tml = tm.compute(), tml.compute()
    lr = line_rvs(ds.assign(rv_tm=tm.rv_tm), merge=False)
    small = ds.drop_vars(["flux", "ivar", "ormask", "andmask"])
    res = xr.merge([small, tm, tml, lr], compat="override")
    sig = rv_residual_sigmas(res)
    out = reconcile_rv(res, sigmas=sig, merge=False)
    return res, sig, out


def _robust(x):
    x = x[np.isfinite(x)]
    return 1.4826 * np.median(np.abs(x - np.median(x)))


@pytest.mark.slow
def test_chain_failure_modes(chain):
    res, sig, out = chain
    f = res.true_failure.values
    fr = out.rv_from.values
    err = np.abs(out.rv.values - res.true_rv.values)

    def frac(mode, names):
        s = f == mode
        return np.isin(fr[s], names).mean()

    # measured on this survey: red-end 42/45 TML7500; emission 23/45 DSEL (the rest TM,
    # DSAL I within 30 km/s, or NoRV); wave 24/45 NoRV_waveErr + 3 NoRV_lowQuality (13 keep
    # the LAMOST RV, which shares the error); catastrophic 34/36 TM; clean: 2/657 waveErr
    assert frac("red_end_anomaly", ["TML7500"]) >= 0.8
    assert frac("emission_dwarf", ["DSEL"]) >= 0.4
    em = f == "emission_dwarf"
    assert (np.isnan(err[em]) | (err[em] < 30)).mean() >= 0.9  # whatever is chosen is right
    assert frac("wave_calibration", ["NoRV_waveErr"]) >= 0.4
    assert frac("wave_calibration", ["NoRV_waveErr", "NoRV_lowQuality"]) >= 0.5
    assert frac("very_low_snr", ["NoRV_lowQuality", "LAMOST", "TM"]) == 1.0
    # wrong LAMOST RVs corrected: catastrophic ones never kept, and what replaces them is right
    cat = f == "lamost_rv_catastrophic"
    assert not np.isin(fr[cat], ["LAMOST"]).any()
    assert (err[cat][np.isfinite(err[cat])] < 30).mean() >= 0.9
    mod = f == "lamost_rv_modest"
    lam_err = np.abs(res.lamost_rv.values - res.true_rv.values)
    assert np.nanmedian(err[mod]) < 0.5 * np.median(lam_err[mod])
    # clean spectra: (almost) never a wavelength-calibration error, mostly LAMOST
    clean = f == ""
    assert (fr[clean] == "NoRV_waveErr").mean() <= 0.01
    assert (fr[clean] == "LAMOST").mean() >= 0.85
    assert json.loads(out.attrs["rv_sigmas"])["tm"]["sigma"] == pytest.approx(sig["tm"]["sigma"])


@pytest.mark.slow
def test_chain_beats_lamost(chain):
    res, _, out = chain
    t = res.true_rv.values
    d_rv = out.rv.values - t
    d_l = res.lamost_rv.values - t
    s_rv, s_l = _robust(d_rv), _robust(d_l)
    assert s_rv < s_l  # measured 9.6 vs 13.8 km/s on the 1500-spectrum survey

    def outliers(d, s):
        d = d[np.isfinite(d)]
        return np.mean(np.abs(d - np.median(d)) > 3 * s)

    # > 3σ outliers, each against its own robust σ and against LAMOST's
    assert outliers(d_rv, s_rv) < outliers(d_l, s_l)
    assert outliers(d_rv, s_l) < 0.6 * outliers(d_l, s_l)


@pytest.mark.slow
def test_chain_rv_err_calibrated(chain):
    """std of (rv - truth)/rv_err in [0.8, 1.25] per S/N bin, spectra without injected
    failures (those have outliers by construction; the DSAL/DSEL/TM choices for them are
    checked above)."""
    res, _, out = chain
    t = res.true_rv.values
    pull = (out.rv.values - t) / out.rv_err.values
    snr = res.snr_i.values
    clean = res.true_failure.values == ""
    stds = {}
    for lo, hi in ((0, 10), (10, 20), (20, 50), (50, np.inf)):
        s = clean & (snr > lo) & (snr <= hi) & np.isfinite(pull)
        assert s.sum() >= 60, (lo, hi)
        stds[(lo, hi)] = np.std(pull[s])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        print("pull std per S/N bin:", {k: round(v, 2) for k, v in stds.items()})
    for k, v in stds.items():
        assert 0.8 <= v <= 1.25, (k, v)


# simulator failure modes --------------------------------------------------------------------
def test_simulated_failure_modes():
    from mspec.simulate import simulate_survey
    from mspec.simulate.failures import FAILURE_MODES

    kw = dict(seed=8, mix={"dM": 0.9, "gM": 0.1}, pipeline_errors={"rv": 0.0})
    base = simulate_survey(120, **kw)
    fr = dict.fromkeys(FAILURE_MODES, 0.1)
    ds = simulate_survey(120, failures=fr, **kw)
    f = ds.true_failure.values
    assert (base.true_failure.values == "").all()
    for mode in FAILURE_MODES:
        assert (f == mode).sum() == 12  # 0.1 of the 120 M stars each, disjoint
    clean = f == ""
    np.testing.assert_array_equal(ds.flux.values[clean], base.flux.values[clean])
    np.testing.assert_array_equal(ds.lamost_rv.values[clean], base.lamost_rv.values[clean])
    lam = 10**ds.loglam.values
    d_flux = ~np.isclose(ds.flux.values, base.flux.values, equal_nan=True)
    red = f == "red_end_anomaly"
    assert not d_flux[red][:, lam < 7500].any() and d_flux[red][:, lam > 7800].any(axis=1).all()
    wav = f == "wave_calibration"
    assert not d_flux[wav][:, lam < 5890].any()
    em = f == "emission_dwarf"
    assert (ds.true_lumclass.values[em] == "dM").all()
    assert (ds.snr_i.values[f == "very_low_snr"] < 3.5).all()
    dl = np.abs(ds.lamost_rv.values - base.lamost_rv.values)
    cat, mod = f == "lamost_rv_catastrophic", f == "lamost_rv_modest"
    assert ((dl[cat] >= 100) & (dl[cat] <= 500)).all() and ((dl[mod] >= 30) & (dl[mod] <= 90)).all()
    np.testing.assert_allclose(ds.lamost_z.values * 299792.458, ds.lamost_rv.values)
    # same seed, same failures, any chunk size
    again = simulate_survey(120, failures=fr, chunk_size=50, **kw)
    np.testing.assert_array_equal(again.flux.values, ds.flux.values)
    assert again.true_failure.values.tolist() == f.tolist()
    for bad, exc, match in (
        ({"solar_flare": 0.1}, ValueError, "unknown mode"),
        ({"very_low_snr": 1.5}, ValueError, "very_low_snr"),
        (dict.fromkeys(FAILURE_MODES, 0.2), ValueError, "at most 1"),
        (["very_low_snr"], TypeError, "failures"),
    ):
        with pytest.raises(exc, match=match):
            simulate_survey(10, failures=bad)
