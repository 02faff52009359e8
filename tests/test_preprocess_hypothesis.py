"""Property tests: odd inputs never raise, kernels equal the numpy references, status is coherent."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from mspec.preprocessing import kernels as K
from mspec.preprocessing import reference as R
from mspec.preprocessing.steps import preprocess
from mspec.variables import NPIX, loglam_grid

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

finite32 = st.floats(-(2.0**100), 2.0**100, width=32, allow_nan=False, allow_infinity=False)
any32 = st.one_of(finite32, st.sampled_from([np.nan, np.inf, -np.inf, 0.0]))


def _check_result(res, normalise):
    ok = res.status == K.STATUS_OK
    assert np.all(np.isnan(res.flux[~ok]))
    assert np.all((res.coverage >= 0) & (res.coverage <= 1))
    assert np.all(res.coverage[ok] > 0)
    assert np.all(np.isin(res.status, list(K.STATUS_MEANINGS)))
    orp = res.orp[np.isfinite(res.orp)]
    assert np.all((orp >= 0) & (orp <= 1))
    if normalise == "zscore":
        for row in res.flux[ok]:
            v = row[np.isfinite(row)].astype(np.float64)
            assert v.size >= 2
            assert abs(v.mean()) < 1e-4 and abs(v.std() - 1) < 1e-4


@st.composite
def small_spectra(draw):
    n = draw(st.integers(1, 4))
    p = draw(st.integers(1, 40))
    flux = draw(hnp.arrays(np.float32, (n, p), elements=any32))
    ivar = draw(hnp.arrays(np.float32, (n, p), elements=st.sampled_from([0.0, 1.0, 4.0, np.nan])))
    ormask = draw(hnp.arrays(np.int32, (n, p), elements=st.sampled_from([0, 0, 0, 1, 1 << 20])))
    # increasing wavelengths, spacing 0.3-3 A, somewhere around a 20-px grid at 100 A
    steps = draw(hnp.arrays(np.float64, p, elements=st.floats(0.3, 3.0)))
    wave = draw(st.floats(90.0, 120.0)) + np.cumsum(steps)
    rv = draw(
        st.one_of(
            st.none(),
            hnp.arrays(
                np.float64,
                n,
                elements=st.one_of(
                    st.floats(-1000, 1000), st.sampled_from([np.nan, 1000.0, -1000.0, 3e5])
                ),
            ),
        )
    )
    return flux, ivar, ormask, wave, rv


@SETTINGS
@given(small_spectra(), st.sampled_from(["zscore", "mean", None]), st.sampled_from([None, 2.0]))
def test_small_spectra_match_reference(data, normalise, max_gap):
    flux, ivar, ormask, wave, rv = data
    grid = K.Grid(100.0, 1.0, 20)
    kw = dict(grid=grid, normalise=normalise, max_gap=max_gap)
    got = K.preprocess_grid(flux, ivar, ormask, wave, rv, **kw)
    ref = R.preprocess_grid(flux, ivar, ormask, wave, rv, **kw)
    for name, a, b in zip(got._fields, got, ref):
        if a.dtype.kind == "f":
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5, equal_nan=True, err_msg=name)
        else:
            np.testing.assert_array_equal(a, b, err_msg=name)
    _check_result(got, normalise)
    m = K.mask_spectra(flux, ivar, ormask, wave)
    mr = R.mask_spectra(flux, ivar, ormask, wave)
    for name, a, b in zip(m._fields, m, mr):
        np.testing.assert_array_equal(a, b, err_msg=name)


def _base(seed=0):
    rng = np.random.default_rng(seed)
    wave = 10.0 ** loglam_grid()
    flux = (1 + 0.3 * np.sin(wave / 70) + 0.05 * rng.standard_normal(NPIX)).astype(np.float32)
    return wave, flux, np.full(NPIX, 25.0, np.float32), np.zeros(NPIX, np.int32)


BASE = _base()


@st.composite
def corrupted(draw):
    """A full-size spectrum with some of: all masked, one good pixel, NaN/inf runs, big RV."""
    wave, flux, ivar, ormask = (a.copy() for a in BASE)
    kind = draw(st.sampled_from(["all_masked", "single", "runs", "none", "all_nan", "ivar0"]))
    if kind == "all_masked":
        ormask[:] = draw(st.integers(1, 2**30))
    elif kind == "single":
        i = draw(st.integers(0, NPIX - 1))
        ormask[:] = 1
        ormask[i] = 0
    elif kind == "all_nan":
        flux[:] = np.nan
    elif kind == "ivar0":
        ivar[:] = 0
    elif kind == "runs":
        for _ in range(draw(st.integers(1, 5))):
            a = draw(st.integers(0, NPIX - 1))
            b = draw(st.integers(a, min(NPIX, a + 800)))
            what = draw(st.sampled_from(["nan", "inf", "-inf", "mask", "ivar"]))
            if what == "mask":
                ormask[a:b] = 3
            elif what == "ivar":
                ivar[a:b] = 0
            else:
                flux[a:b] = float(what)
    rv = draw(st.one_of(st.sampled_from([1000.0, -1000.0, 0.0, np.nan]), st.floats(-1000, 1000)))
    return flux, ivar, ormask, rv


@SETTINGS
@given(corrupted(), st.sampled_from(["cnn", "tlma", "tm"]))
def test_odd_full_spectra_never_raise(case, recipe):
    flux, ivar, ormask, rv = case
    ds = xr.Dataset(
        {
            "flux": (("spectra", "pixels"), flux[None]),
            "ivar": (("spectra", "pixels"), ivar[None]),
            "ormask": (("spectra", "pixels"), ormask[None]),
            "rv": ("spectra", [rv]),
        },
        coords={"obsid": ("spectra", [1]), "loglam": ("pixels", loglam_grid())},
    )
    out = preprocess(ds, recipe=recipe, rv="rv" if recipe == "tlma" else None, merge=False)
    status = int(out.preprocess_status.values[0])
    good = R.good_pixels(flux, ivar, ormask)
    assert int(out.npix_good.values[0]) == good.sum()
    if recipe == "tm":
        assert status == (K.STATUS_OK if good.any() else K.STATUS_NO_GOOD_PIXELS)
        np.testing.assert_array_equal(np.isfinite(out.flux_masked.values[0]), good)
        return
    fg = out.flux_grid.values[0]
    ref = R.preprocess_grid(
        flux[None], ivar[None], ormask[None], BASE[0], [rv] if recipe == "tlma" else None
    )
    assert status == ref.status[0]
    np.testing.assert_allclose(fg, ref.flux[0], rtol=1e-5, atol=1e-5, equal_nan=True)
    if recipe == "tlma" and not np.isfinite(rv):
        assert status == K.STATUS_BAD_RV
    elif not good.any():
        assert status == K.STATUS_NO_GOOD_PIXELS
    if status != K.STATUS_OK:
        assert np.isnan(fg).all()
    else:
        assert np.isfinite(fg).sum() >= 2


@pytest.mark.parametrize("rv", [-1000.0, 1000.0])
def test_large_rv_moves_features(rv):
    """A line at 6564.6 A observed at rv lands back at its rest wavelength."""
    wave = 10.0 ** loglam_grid()
    obs = 6564.61 * (1 + rv / 299792.458)
    flux = (1 - 0.8 * np.exp(-0.5 * ((wave - obs) / 3.0) ** 2)).astype(np.float32)
    res = K.preprocess_grid(flux, None, None, wave, np.array(rv))
    grid = K.wavelength_grid()
    assert abs(grid[np.nanargmin(res.flux)] - 6564.61) <= 1.0
    res0 = K.preprocess_grid(flux, None, None, wave)
    assert abs(grid[np.nanargmin(res0.flux)] - obs) <= 1.0
