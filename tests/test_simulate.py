"""Tests of the LAMOST-like survey simulator (mspec.simulate)."""

import numpy as np
import pytest
import xarray as xr

from mspec import simulate as sim
from mspec.variables import (
    LOGLAM0,
    NPIX,
    VARIABLES,
    loglam_grid,
    validate,
)

pytestmark = pytest.mark.realdata  # the stellar models are built from ../shared/data templates

STORE_VARS = [
    name
    for name in VARIABLES
    if VARIABLES[name].dims[0] in ("spectra", "pixels") and not name.startswith("true_")
]


@pytest.fixture(scope="module")
def survey():
    return sim.simulate_survey(400, seed=7)


@pytest.fixture(scope="module")
def survey_noiseless():
    return sim.simulate_survey(400, seed=7, noiseless=True)


# -- data model ------------------------------------------------------------------------------
def test_variables_match_registry(survey):
    names = list(survey.data_vars) + ["obsid", "loglam"]
    validate(survey, names, check_units=True)
    assert set(survey.data_vars) == set(sim.SIMULATED_VARIABLES)
    assert survey.flux.dtype == np.float32 and survey.ivar.dtype == np.float32
    assert survey.ormask.dtype == np.int32 and survey.andmask.dtype == np.int32
    assert survey.obsid.dtype == np.int64
    assert survey.sizes == {"spectra": 400, "pixels": NPIX}
    np.testing.assert_array_equal(survey.loglam.values, loglam_grid())
    assert survey.loglam.values[0] == LOGLAM0
    assert np.unique(survey.obsid.values).size == 400
    for v in survey.data_vars:
        assert survey[v].attrs["units"] == VARIABLES[v].units


def test_store_variables_complete(survey):
    # everything the store holds (registry store + metadata + cross-match sections)
    store = {
        "flux", "ivar", "andmask", "ormask", "ra", "dec", "mjd", "lamost_class",
        "lamost_subclass", "lamost_z", "lamost_z_err", "lamost_rv", "file", "release",
        "loglam_offset", "resampled", "gaia_source_id", "parallax", "r_med_geo", "ebv", "w1",
        "w2", "w1_err", "w2_err", "ruwe", "phot_g_mean_mag", "phot_bp_mean_mag",
        "phot_rp_mean_mag", "parallax_error", "parallax_over_error",
        "phot_g_mean_flux_over_error", "phot_bp_mean_flux_over_error",
        "phot_rp_mean_flux_over_error", "snr_u", "snr_g", "snr_r", "snr_i", "snr_z",
    }  # fmt: skip
    assert store <= set(survey.data_vars)
    truth = {n for n in VARIABLES if n.startswith("true_")}
    assert truth <= set(survey.data_vars)


def test_padding_and_lengths(survey):
    nodata = sim.MASK_BITS["NODATA"]
    pad = (survey.andmask.values & nodata) != 0
    npix = NPIX - pad.sum(axis=1)
    assert npix.min() >= 3820 and npix.max() == NPIX
    assert (npix < NPIX).any()
    # padding is a contiguous tail: NaN flux, ivar 0, both masks set
    for i in range(survey.sizes["spectra"]):
        assert not pad[i, : npix[i]].any() and pad[i, npix[i] :].all()
    assert np.all(np.isnan(survey.flux.values[pad]))
    assert np.all(survey.ivar.values[pad] == 0)
    assert np.all((survey.ormask.values[pad] & nodata) != 0)
    assert np.all(np.isfinite(survey.flux.values[~pad]))
    assert np.all(survey.ivar.values >= 0)
    # andmask is a subset of ormask, and bad-in-every-exposure pixels have no weight
    assert np.all((survey.andmask.values & ~survey.ormask.values) == 0)
    assert np.all(survey.ivar.values[survey.andmask.values != 0] == 0)


def test_masks_realistic(survey):
    lam = 10**survey.loglam.values
    om = survey.ormask.values & ~sim.MASK_BITS["NODATA"]
    frac_clean = np.mean((om == 0).all(axis=1))
    assert 0.2 < frac_clean < 0.9  # most real files are clean or nearly so
    sky = (om & sim.MASK_BITS["BRIGHTSKY"]) != 0
    i5578 = np.argmin(np.abs(lam - 5578.9))
    assert sky[:, i5578].mean() > 0.1  # the [O I] 5577 line is flagged most often
    dich = (om & sim.MASK_BITS["BADPROFILE"]) != 0
    assert dich.any()
    assert np.all((lam[dich.any(axis=0)] > 5550) & (lam[dich.any(axis=0)] < 5930))


def test_metadata_realistic(survey):
    assert (survey.mjd < sim.MJD_RV_RELIABLE).any()
    assert (survey.mjd >= sim.MJD_RV_RELIABLE).mean() > 0.8
    assert survey.dec.min() >= -10 and survey.dec.max() <= 65
    assert set(np.unique(survey.release.values)) <= {f"LAMOST DR{i}" for i in range(1, 11)}
    assert all(f.startswith("spec-") and f.endswith(".fits") for f in survey.file.values)
    med = np.nanmedian(survey.flux.values, axis=1)
    assert 1 < np.median(med) < 1e5  # LAMOST-like count-ish units
    assert set(np.unique(survey.lamost_class.values)) <= {"STAR", "GALAXY", "QSO", "Unknown"}
    assert np.all(survey.loglam_offset.values == 0) and not survey.resampled.values.any()


def test_snr_distribution_and_request(survey):
    snr_i = survey.snr_i.values
    assert np.mean(snr_i < 10) > 0.05  # realistic low-S/N tail
    assert np.median(snr_i) > 10
    # M stars are faint in the blue: u-band S/N far below i-band
    m = survey.true_class.values == "M"
    assert np.median(survey.snr_u.values[m]) < 0.3 * np.median(snr_i[m])
    ds = sim.simulate_survey(30, seed=2, snr=50.0, noiseless=True, missing={"gaia": 0})
    np.testing.assert_allclose(np.median(ds.snr_i.values), 50.0, rtol=0.05)


# -- determinism -----------------------------------------------------------------------------
def test_deterministic(survey):
    again = sim.simulate_survey(400, seed=7)
    xr.testing.assert_identical(survey, again)
    other = sim.simulate_survey(400, seed=8)
    assert not np.array_equal(other.true_teff.values, survey.true_teff.values, equal_nan=True)


def test_chunk_size_does_not_matter(survey):
    chunked = sim.simulate_survey(400, seed=7, chunk_size=37)
    xr.testing.assert_identical(survey, chunked)


def test_noiseless_twin(survey, survey_noiseless):
    a, b = survey, survey_noiseless
    for v in sim.SIMULATED_VARIABLES:
        if v != "flux":
            xr.testing.assert_identical(a[v], b[v])
    good = (a.ivar.values > 0) & (a.ormask.values == 0)
    resid = (a.flux.values - b.flux.values)[good] * np.sqrt(a.ivar.values[good])
    assert abs(np.mean(resid)) < 0.01
    assert 0.97 < np.std(resid) < 1.03  # ivar is the true inverse variance
    np.testing.assert_array_equal(np.isnan(a.flux.values), np.isnan(b.flux.values))
