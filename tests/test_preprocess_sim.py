"""Preprocessing on simulated spectra (mspec.simulate): references, chunking, rest-frame truth."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr

from mspec.preprocessing import kernels as K
from mspec.preprocessing import reference as R
from mspec.preprocessing.steps import preprocess
from mspec.simulate import model_spectrum, simulate_survey
from mspec.testing import raise_if_computes
from mspec.variables import SDSS_BANDS, loglam_grid

WAVE = 10.0 ** loglam_grid()


@pytest.fixture(scope="module")
def survey():
    return simulate_survey(40, seed=3)


@pytest.mark.parametrize("recipe", ["cnn", "tlma", "tm"])
def test_simulated_survey_matches_reference(survey, recipe):
    rv = "true_rv" if recipe == "tlma" else None
    with raise_if_computes():
        lazy = preprocess(survey.chunk({"spectra": 7}), recipe=recipe, rv=rv, merge=False)
    out = lazy.compute(scheduler="sync")
    xr.testing.assert_identical(out, preprocess(survey, recipe=recipe, rv=rv, merge=False))
    args = (survey.flux.values, survey.ivar.values, survey.ormask.values, WAVE)
    if recipe == "tm":
        ref = R.mask_spectra(*args)
        np.testing.assert_array_equal(out.flux_masked.values, ref.flux)
    else:
        ref = R.preprocess_grid(*args, survey.true_rv.values if rv else None)
        np.testing.assert_allclose(out.flux_grid.values, ref.flux, rtol=1e-6, atol=1e-6)
        np.testing.assert_array_equal(out.grid_coverage.values, ref.coverage)
    np.testing.assert_array_equal(out.preprocess_status.values, ref.status)
    for k, b in enumerate(SDSS_BANDS):
        np.testing.assert_array_equal(out[f"orp_{b}"].values, ref.orp[:, k])
    # every simulated spectrum has data, so every one preprocesses, except in the rest
    # frame of a high-z QSO whose c z >= c (the shift 1 / (1 + v/c) needs |v| < c)
    expect = np.zeros(survey.sizes["spectra"], np.int8)
    if recipe == "tlma":
        expect[np.abs(survey.true_rv.values) >= 299792.458] = K.STATUS_BAD_RV
    np.testing.assert_array_equal(out.preprocess_status.values, expect)


def test_simulated_orp_direct_count(survey):
    out = preprocess(survey, recipe="cnn", merge=False)
    flux, ormask = survey.flux.values, survey.ormask.values
    for b, (lo, hi) in SDSS_BANDS.items():
        band = (WAVE >= lo) & (WAVE < hi)
        have = np.isfinite(flux) & band
        expect = ((ormask != 0) & have).sum(axis=1) / have.sum(axis=1)
        np.testing.assert_allclose(out[f"orp_{b}"].values, expect, rtol=1e-6)


@pytest.mark.parametrize("teff", [3200.0, 3800.0])
def test_tlma_recovers_rest_frame(teff):
    """Step 2: one model star observed at three RVs lands on its rv = 0 spectrum."""
    loglam = loglam_grid()
    rvs = np.array([-1000.0, -250.0, 80.0, 400.0, 1000.0])
    obs = model_spectrum(teff, 4.8, 0.0, 0.0, loglam, rv=rvs).astype(np.float32)
    rest = model_spectrum(teff, 4.8, 0.0, 0.0, loglam).astype(np.float32)
    tlma = K.preprocess_grid(obs, None, None, WAVE, rvs).flux
    cnn = K.preprocess_grid(obs, None, None, WAVE).flux
    ref = K.preprocess_grid(rest, None, None, WAVE).flux
    for k in range(rvs.size):
        shifted = np.sqrt(np.nanmean((tlma[k] - ref) ** 2))
        unshifted = np.sqrt(np.nanmean((cnn[k] - ref) ** 2))
        assert shifted < 0.01, (rvs[k], shifted)
        assert unshifted > 10 * shifted, (rvs[k], shifted, unshifted)
