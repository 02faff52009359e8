"""Template-matching RV on a simulated survey: bias, Cramér–Rao efficiency, error calibration."""

from __future__ import annotations

import numpy as np
import pytest

from mspec.rv import template_match
from mspec.rv.reference import tm_spectrum_ref
from mspec.rv.tm_engine import make_config, match_arrays
from mspec.simulate import simulated_templates
from mspec.variables import C_KMS

KW = dict(seed=11, mix={"dM": 0.8, "gM": 0.2}, snr=(10.0, 150.0))
N = 300


@pytest.fixture(scope="module")
def survey():
    from mspec.simulate import simulate_survey

    return simulate_survey(N, **KW), simulate_survey(N, noiseless=True, **KW)


@pytest.fixture(scope="module")
def simlib():
    return simulated_templates()


def cramer_rao(ds, noiseless, wave_min=4700.0, wave_max=8899.0):
    """Per-spectrum σ_CR = c / sqrt(Σ ivar (λ dF/dλ)²) over the TM pixels (noise-free F)."""
    lam = 10.0**ds.loglam.values
    f = np.nan_to_num(noiseless.flux.values.astype(np.float64))
    iv = ds.ivar.values.astype(np.float64)
    good = (ds.ormask.values == 0) & (iv > 0) & (lam >= wave_min) & (lam <= wave_max)
    df = np.gradient(f, lam, axis=1)
    return C_KMS / np.sqrt(np.sum(np.where(good, iv * (lam * df) ** 2, 0.0), axis=1))


@pytest.fixture(scope="module")
def result(survey, simlib):
    ds, dn = survey
    out = template_match(ds, templates=simlib, merge=False).compute()
    return out, cramer_rao(ds, dn)


@pytest.mark.slow
def test_simulated_bias_and_efficiency(survey, result):
    ds, _ = survey
    out, cr = result
    assert (out.tm_status.values == 0).mean() >= 0.98
    d = out.rv_tm.values - ds.true_rv.values
    snr = ds.snr_i.values
    ok = np.isfinite(d) & (snr > 20)
    assert ok.sum() > 150
    assert abs(np.mean(d[ok])) < 1.0
    # scatter vs the Cramér–Rao bound, all M stars at S/N > 20 (measured 1.50x with the
    # packaged templates, 1.49x with the original FITS: the bound is not reachable exactly).
    # Simulator version 2 adds instrument systematics TM does not model (dichroic splice,
    # P4-P6 flux-calibration wiggles, sky residuals) and [M/H]-dependent TiO depths that the
    # 0.3-dex template grid samples coarsely: measured 1.70x, so the bound is 1.8x (was 1.6x)
    assert np.std(d[ok]) <= 1.8 * np.sqrt(np.mean(cr[ok] ** 2))
    # per S/N bin, stars without chromospheric emission (the templates have none): within
    # 1.5x at 20 < S/N <= 50; above, a ~1.5 km/s systematic floor of the method (template
    # mismatch, Gaussian fit to a coarse chi2 curve; see docs/accuracy.md) dominates
    # (simulator version 2: 1.62x measured at 20 < S/N <= 50, the [M/H]/[alpha/M] band depths
    # between the template grid's nodes; the bound there is 1.7x, was 1.5x)
    quiet = ok & ~ds.true_active.values
    for lo, hi, factor in ((20, 50, 1.7), (50, 1e9, 2.0)):
        s = quiet & (snr > lo) & (snr <= hi)
        assert np.std(d[s]) <= factor * np.sqrt(np.mean(cr[s] ** 2)), (lo, hi)


@pytest.mark.slow
def test_error_calibration(survey, result):
    """rv_tm_err_stat is calibrated; the paper's rv_tm_err (shift scatter) is not."""
    ds, _ = survey
    out, _ = result
    d = out.rv_tm.values - ds.true_rv.values
    snr = ds.snr_i.values
    for lo, hi in ((10, 20), (20, 50), (50, 1e9)):
        s = np.isfinite(d) & (snr > lo) & (snr <= hi)
        pull = np.std(d[s] / out.rv_tm_err_stat.values[s])
        assert 0.7 <= pull <= 1.4, (lo, hi, pull)
        assert np.std(d[s] / out.rv_tm_err.values[s]) > 3.0  # the paper's error is far too small


def test_kernel_matches_reference_simulated(survey, simlib):
    ds, _ = survey
    sub = simlib.isel(templates=slice(20, 40))
    cfg = make_config(ds.loglam.values, shifts=np.arange(-500, 501, 100))
    w, f1 = sub.template_wavelength.values, sub.template_flux.values
    idx = [0, 1, 2]
    got = match_arrays(ds.flux.values[idx], ds.ivar.values[idx], ds.ormask.values[idx], f1, w, cfg)
    for k, i in enumerate(idx):
        ref = tm_spectrum_ref(
            ds.flux.values[i], ds.ivar.values[i], ds.ormask.values[i], ds.loglam.values, w, f1, cfg
        )
        assert got["status"][k] == ref["status"]
        assert got["template"][k] == ref["template"]
        if ref["status"] == 0:
            assert abs(got["rv"][k] - ref["rv"]) <= 0.1
            assert abs(got["err"][k] - ref["err"]) <= 0.1
