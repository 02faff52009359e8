"""Preprocessing kernels vs numpy references, xarray wrappers, laziness, chunking, errors."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr

from mspec.preprocessing import kernels as K
from mspec.preprocessing import reference as R
from mspec.preprocessing.steps import prepare_templates, preprocess
from mspec.stage import MergeWarning
from mspec.testing import raise_if_computes
from mspec.variables import C_KMS, NPIX, SDSS_BANDS, VariableError, loglam_grid, validate

WAVE = 10.0 ** loglam_grid()


def _assert_result_equal(a, b, rtol=1e-6, atol=1e-6):
    for name, x, y in zip(a._fields, a, b):
        assert x.shape == y.shape, name
        assert x.dtype == y.dtype, name
        if x.dtype.kind == "f":
            np.testing.assert_allclose(x, y, rtol=rtol, atol=atol, equal_nan=True, err_msg=name)
        else:
            np.testing.assert_array_equal(x, y, err_msg=name)


def make_spectra(n=24, seed=0, pad=True):
    """Random smooth spectra with masks, padding and a few pathological rows."""
    rng = np.random.default_rng(seed)
    cont = 1.0 + 0.5 * np.sin(WAVE / 300.0)[None] + 0.2 * rng.random((n, 1))
    lines = -0.3 * np.exp(-0.5 * ((WAVE[None] - rng.uniform(4000, 8800, (n, 1))) / 5.0) ** 2)
    flux = (cont + lines + 0.02 * rng.standard_normal((n, NPIX))).astype(np.float32)
    ivar = rng.uniform(50, 150, (n, NPIX)).astype(np.float32)
    ormask = np.where(rng.random((n, NPIX)) < 0.03, 1 << rng.integers(0, 20, (n, NPIX)), 0)
    ormask = ormask.astype(np.int32)
    ivar[rng.random((n, NPIX)) < 0.02] = 0
    # a masked gap of 80 pixels
    ormask[12, 1500:1580] = 4
    if pad:
        # shorter spectra padded like the store: NaN flux, ivar 0, mask set
        for s, (lo, hi) in enumerate([(0, 12), (5, 0), (0, 300)]):
            flux[s, :lo] = np.nan
            flux[s, NPIX - hi :] = np.nan
            ivar[s, :lo] = 0
            ivar[s, NPIX - hi :] = 0
            ormask[s, :lo] = 1 << 30
            ormask[s, NPIX - hi :] = 1 << 30
    flux[3] = np.nan  # no data at all
    ivar[3] = 0
    ormask[4] = 1  # every pixel masked
    flux[5] = 2.5  # constant: zero variance
    flux[6, 100] = np.inf  # a non-finite pixel
    flux[7, 200] = np.nan
    ivar[8, 300] = np.nan
    # only red pixels survive: no coverage of 3900-8899 A
    ormask[9, WAVE < 8950] = 2
    # one good pixel
    ormask[10] = 1
    ormask[10, 2000] = 0
    return flux, ivar, ormask


def make_dataset(n=24, seed=0):
    flux, ivar, ormask = make_spectra(n, seed)
    rng = np.random.default_rng(seed + 1)
    rv = rng.uniform(-500, 500, n)
    rv[11] = np.nan
    return xr.Dataset(
        {
            "flux": (("spectra", "pixels"), flux),
            "ivar": (("spectra", "pixels"), ivar),
            "ormask": (("spectra", "pixels"), ormask),
            "lamost_rv": ("spectra", rv),
        },
        coords={
            "obsid": ("spectra", np.arange(1000, 1000 + n, dtype=np.int64)),
            "loglam": ("pixels", loglam_grid()),
        },
    )


@pytest.fixture(scope="module")
def spectra():
    return make_spectra()


@pytest.fixture(scope="module")
def dataset():
    return make_dataset()


# --- single-step kernels -------------------------------------------------------------------


def test_good_pixels_matches_reference(spectra):
    flux, ivar, ormask = spectra
    for s in range(flux.shape[0]):
        good = np.empty(NPIX, dtype=bool)
        n = K.good_pixels(flux[s], ivar[s], ormask[s], good)
        ref = R.good_pixels(flux[s], ivar[s], ormask[s])
        np.testing.assert_array_equal(good, ref)
        assert n == ref.sum()


@pytest.mark.parametrize("rv", [-1000.0, -37.5, 0.0, 250.0, 1000.0])
def test_doppler_shift_matches_reference(rv):
    out = np.empty_like(WAVE)
    K.doppler_shift(WAVE, rv, out)
    np.testing.assert_array_equal(out, R.doppler_shift(WAVE, rv))
    # rest frame is bluer for a receding star
    assert (out[0] < WAVE[0]) == (rv > 0) or rv == 0


@pytest.mark.parametrize("max_gap", [np.inf, 5.0, 1.0])
def test_interp_matches_np_interp(spectra, max_gap):
    flux, ivar, ormask = spectra
    grid = K.wavelength_grid(K.GRID_4A)
    for s in range(flux.shape[0]):
        good = R.good_pixels(flux[s], ivar[s], ormask[s])
        out = np.empty(grid.size)
        ncov = K.interp_to_grid(WAVE, flux[s], good, 3900.0, 1.0, max_gap, out)
        ref = R.interp_to_grid(WAVE, flux[s], good, grid, max_gap)
        np.testing.assert_array_equal(out, ref)
        assert ncov == np.isfinite(ref).sum()


def test_interp_hits_pixels_exactly():
    wave = np.array([10.0, 12.0, 13.0, 16.0])
    flux = np.array([1.0, 3.0, np.nan, 9.0])
    good = np.isfinite(flux)
    out = np.empty(8)
    n = K.interp_to_grid(wave, flux, good, 9.0, 1.0, np.inf, out)
    # 9: outside; 13..15 interpolated across the dropped pixel at 13; 16 = last pixel exactly
    expect = [np.nan, 1.0, 2.0, 3.0, 4.5, 6.0, 7.5, 9.0]
    np.testing.assert_array_equal(out, expect)
    assert n == 7
    # gap 12 -> 16 wider than max_gap: left empty; the last pixel itself is still hit
    n = K.interp_to_grid(wave, flux, good, 9.0, 1.0, 2.5, out)
    np.testing.assert_array_equal(out, [np.nan, 1.0, 2.0, 3.0, np.nan, np.nan, np.nan, 9.0])
    assert n == 4


def test_cut_matches_reference():
    wave = np.arange(3700.0, 9100.0)
    flux = np.random.default_rng(1).random((3, wave.size))
    for lo, hi in [(3900.0, 8899.0), (4700.0, 8899.0), (1.0, 2.0)]:
        w, f = K.cut(wave, flux, lo, hi)
        wr, fr = R.cut(wave, flux, lo, hi)
        np.testing.assert_array_equal(w, wr)
        np.testing.assert_array_equal(f, fr)
    w, _ = K.cut(wave, flux, 3900.0, 8899.0)
    np.testing.assert_array_equal(w, K.wavelength_grid(K.GRID_4A))
    w, _ = K.cut(wave, flux, 4700.0, 8899.0)
    np.testing.assert_array_equal(w, K.wavelength_grid(K.GRID_4B))


def test_grids():
    assert K.GRID_4A.size == 5000 and K.GRID_4A.stop == 8899.0
    assert K.GRID_4B.size == 4200 and K.GRID_4B.stop == 8899.0 and K.GRID_4B.start == 4700.0


@pytest.mark.parametrize("kind", ["normal", "nan", "const", "single", "empty", "big"])
def test_zscore_and_mean_match_reference(kind):
    rng = np.random.default_rng(2)
    x = rng.normal(3.0, 2.0, 500)
    if kind == "nan":
        x[:100] = np.nan
    elif kind == "const":
        x[:] = 0.1
    elif kind == "single":
        x[:] = np.nan
        x[7] = 1.0
    elif kind == "empty":
        x[:] = np.nan
    elif kind == "big":
        x *= 1e30
    for kern, ref in [(K.zscore, R.zscore), (K.mean_normalise, R.mean_normalise)]:
        y = x.copy()
        st = kern(y)
        yr, str_ = ref(x)
        assert st == str_, (kind, kern.__name__)
        np.testing.assert_allclose(y, yr, rtol=1e-12, atol=1e-12, equal_nan=True)
    y = x.copy()
    if K.zscore(y) == K.STATUS_OK:
        assert abs(np.nanmean(y)) < 1e-12 and abs(np.nanstd(y) - 1) < 1e-12


def test_band_fractions_direct_count(spectra):
    flux, _, ormask = spectra
    band = K.band_index(WAVE)
    for s in range(flux.shape[0]):
        out = np.empty(len(SDSS_BANDS))
        K.band_fractions(flux[s], ormask[s], band, out)
        # direct count, written independently of both implementations
        expect = []
        for lo, hi in SDSS_BANDS.values():
            sel = [i for i in range(NPIX) if lo <= WAVE[i] < hi and np.isfinite(flux[s, i])]
            expect.append(np.mean([ormask[s, i] != 0 for i in sel]) if sel else np.nan)
        np.testing.assert_allclose(out, expect, rtol=1e-12, equal_nan=True)
        np.testing.assert_allclose(out, R.band_fractions(flux[s], ormask[s], WAVE), equal_nan=True)


# --- drivers vs unfused reference ------------------------------------------------------------


@pytest.mark.parametrize("shift", [False, True])
@pytest.mark.parametrize("normalise", ["zscore", "mean", None])
def test_preprocess_grid_matches_reference(spectra, shift, normalise):
    flux, ivar, ormask = spectra
    rv = np.random.default_rng(3).uniform(-1000, 1000, flux.shape[0]) if shift else None
    if shift:
        rv[0] = np.nan
        rv[1] = C_KMS
    got = K.preprocess_grid(flux, ivar, ormask, WAVE, rv, normalise=normalise)
    ref = R.preprocess_grid(flux, ivar, ormask, WAVE, rv, normalise=normalise)
    _assert_result_equal(got, ref)
    if shift:
        assert got.status[0] == K.STATUS_BAD_RV and got.status[1] == K.STATUS_BAD_RV


def test_status_codes(spectra):
    flux, ivar, ormask = spectra
    res = K.preprocess_grid(flux, ivar, ormask, WAVE)
    assert res.status[3] == K.STATUS_NO_GOOD_PIXELS
    assert res.status[4] == K.STATUS_NO_GOOD_PIXELS
    assert res.status[5] == K.STATUS_ZERO_VARIANCE
    assert res.status[9] == K.STATUS_NO_COVERAGE
    assert res.status[10] == K.STATUS_NO_COVERAGE  # one good pixel, not on the grid
    ok = res.status == K.STATUS_OK
    assert ok.sum() == flux.shape[0] - 5
    assert np.all(np.isnan(res.flux[~ok]))
    full = ok.copy()
    full[2] = False  # red end padded
    assert np.all(np.isfinite(res.flux[full]))
    assert res.coverage[0] == 1.0 and res.coverage[3] == 0.0
    assert res.coverage[12] == 1.0  # the masked gap is bridged
    # 300 padded red pixels: grid points beyond the last good pixel are uncovered
    last = WAVE[R.good_pixels(flux[2], ivar[2], ormask[2])][-1]
    assert res.coverage[2] == np.float32((K.wavelength_grid() <= last).mean())
    assert np.isnan(res.flux[2, -1]) and np.isfinite(res.flux[2, 0])


def test_max_gap_leaves_gap_uncovered(spectra):
    flux, ivar, ormask = spectra
    res = K.preprocess_grid(flux, ivar, ormask, WAVE, max_gap=10.0)
    gap = (K.wavelength_grid() > WAVE[1501]) & (K.wavelength_grid() < WAVE[1578])
    assert gap.sum() > 80
    assert np.all(np.isnan(res.flux[12, gap]))
    assert res.coverage[12] < 1


def test_fill_value(spectra):
    flux, ivar, ormask = spectra
    res = K.preprocess_grid(flux, ivar, ormask, WAVE, fill_value=0.0)
    ok = res.status == K.STATUS_OK
    assert np.all(np.isfinite(res.flux[ok]))
    assert np.all(np.isnan(res.flux[~ok]))


def test_fused_cut_equals_full_grid_then_cut(spectra):
    flux, ivar, ormask = spectra
    full = K.Grid(3600.0, 1.0, 5600)
    a = K.preprocess_grid(flux, ivar, ormask, WAVE, grid=full, normalise=None)
    b = K.preprocess_grid(flux, ivar, ormask, WAVE, grid=K.GRID_4A, normalise=None)
    _, cutflux = K.cut(K.wavelength_grid(full), a.flux, 3900.0, 8899.0)
    ok = b.status == K.STATUS_OK
    np.testing.assert_array_equal(cutflux[ok], b.flux[ok])


def test_mask_spectra_matches_reference(spectra):
    flux, ivar, ormask = spectra
    _assert_result_equal(
        K.mask_spectra(flux, ivar, ormask, WAVE), R.mask_spectra(flux, ivar, ormask, WAVE)
    )


def test_big_endian_and_1d_inputs(spectra):
    flux, ivar, ormask = spectra
    a = K.preprocess_grid(flux[0], ivar[0], ormask[0], WAVE)
    b = K.preprocess_grid(
        flux[:1].astype(">f4"), ivar[:1].astype(">f4"), ormask[:1].astype(">i4"), WAVE
    )
    assert a.flux.shape == (5000,) and a.status.shape == ()
    np.testing.assert_array_equal(a.flux, b.flux[0])


def test_kernel_argument_errors(spectra):
    flux, ivar, ormask = spectra
    with pytest.raises(ValueError, match="normalise"):
        K.preprocess_grid(flux, ivar, ormask, WAVE, normalise="median")
    with pytest.raises(ValueError, match="max_gap"):
        K.preprocess_grid(flux, ivar, ormask, WAVE, max_gap=-1)
    with pytest.raises(ValueError, match="wave"):
        K.preprocess_grid(flux, ivar, ormask, WAVE[:-1])


# --- xarray wrappers ------------------------------------------------------------------------


@pytest.mark.parametrize("recipe", ["cnn", "tlma", "tm"])
def test_wrapper_matches_kernels(dataset, recipe):
    rv = "lamost_rv" if recipe == "tlma" else None
    out = preprocess(dataset, recipe=recipe, rv=rv, merge=False)
    args = (dataset.flux.values, dataset.ivar.values, dataset.ormask.values, WAVE)
    if recipe == "tm":
        ref = R.mask_spectra(*args)
        np.testing.assert_array_equal(out.flux_masked.values, ref.flux)
        np.testing.assert_array_equal(out.ivar_masked.values, ref.ivar)
        validate(out, ["flux_masked", "ivar_masked"])
    else:
        ref = R.preprocess_grid(*args, dataset.lamost_rv.values if rv else None)
        np.testing.assert_allclose(out.flux_grid.values, ref.flux, rtol=1e-6, equal_nan=True)
        np.testing.assert_array_equal(out.grid_coverage.values, ref.coverage)
        np.testing.assert_array_equal(out.wavelength_grid.values, K.wavelength_grid())
        assert out.flux_grid.dims == ("spectra", "grid")
        validate(out, ["flux_grid", "wavelength_grid", "grid_coverage"], check_units=True)
    for k, b in enumerate(SDSS_BANDS):
        np.testing.assert_array_equal(out[f"orp_{b}"].values, ref.orp[:, k])
    np.testing.assert_array_equal(out.preprocess_status.values, ref.status)
    np.testing.assert_array_equal(out.npix_good.values, ref.ngood)
    validate(out, ["preprocess_status", "npix_good", *[f"orp_{b}" for b in SDSS_BANDS]])
    np.testing.assert_array_equal(out.obsid.values, dataset.obsid.values)
    assert out.attrs["preprocess_recipe"] == recipe
    main = out["flux_masked" if recipe == "tm" else "flux_grid"]
    assert main.attrs["preprocess_recipe"] == recipe
    if recipe != "tm":
        frame = "rest" if recipe == "tlma" else "observed"
        assert out.wavelength_grid.attrs["frame"] == frame == main.attrs["frame"]
    assert "flag_meanings" in out.preprocess_status.attrs
    if recipe == "tlma":
        assert out.preprocess_status.values[11] == K.STATUS_BAD_RV


@pytest.mark.parametrize("recipe", ["cnn", "tlma", "tm"])
@pytest.mark.parametrize("chunks", [-1, 7, 1000])
def test_chunked_identical_and_lazy(dataset, recipe, chunks):
    rv = "lamost_rv" if recipe == "tlma" else None
    eager = preprocess(dataset, recipe=recipe, rv=rv, merge=False)
    lazy_in = dataset.chunk({"spectra": chunks, "pixels": -1})
    with raise_if_computes():
        lazy = preprocess(lazy_in, recipe=recipe, rv=rv)
    main = "flux_masked" if recipe == "tm" else "flux_grid"
    assert lazy[main].chunks is not None
    assert lazy[main].chunks[0] == lazy_in.flux.chunks[0]
    got = lazy.compute(scheduler="sync")
    xr.testing.assert_identical(got[list(eager.data_vars)], eager)
    # merge keeps the inputs
    xr.testing.assert_identical(got.flux, dataset.flux)


def test_rv_as_dataarray_and_array(dataset):
    a = preprocess(dataset, recipe="tlma", rv="lamost_rv", merge=False)
    b = preprocess(dataset, recipe="tlma", rv=dataset.lamost_rv, merge=False)
    c = preprocess(dataset, recipe="tlma", rv=dataset.lamost_rv.values, merge=False)
    xr.testing.assert_identical(a, b)
    xr.testing.assert_identical(a, c)
    # the rest frame moves lines: tlma differs from cnn for a spectrum with rv != 0
    cnn = preprocess(dataset, recipe="cnn", merge=False)
    assert not np.allclose(cnn.flux_grid[0], a.flux_grid[0], equal_nan=True)
    zero = preprocess(dataset, recipe="tlma", rv=np.zeros(dataset.sizes["spectra"]), merge=False)
    xr.testing.assert_allclose(zero.flux_grid, cnn.flux_grid)


def test_wrapper_argument_errors(dataset):
    with pytest.raises(ValueError, match="recipe"):
        preprocess(dataset, recipe="cnnn")
    with pytest.raises(ValueError, match="rv"):
        preprocess(dataset, recipe="tlma")
    with pytest.raises(ValueError, match="rv"):
        preprocess(dataset, recipe="tlma", rv="nope")
    with pytest.raises(ValueError, match="rv"):
        preprocess(dataset, recipe="tlma", rv=np.zeros(3))
    with pytest.raises(ValueError, match="rv"):
        preprocess(dataset, recipe="tlma", rv=dataset.flux)
    with pytest.raises(ValueError, match="rv"):
        preprocess(dataset, recipe="cnn", rv="lamost_rv")
    with pytest.raises(ValueError, match="max_gap"):
        preprocess(dataset, recipe="cnn", max_gap=0)
    with pytest.raises(ValueError, match="fill_value"):
        preprocess(dataset, recipe="cnn", fill_value="zero")
    # an rv for other spectra (ids in another order) is refused, not silently misapplied
    shuffled = dataset.lamost_rv.assign_coords(obsid=("spectra", dataset.obsid.values[::-1]))
    with pytest.raises(ValueError, match="rv coordinate 'obsid'"):
        preprocess(dataset, recipe="tlma", rv=shuffled)
    with pytest.raises(ValueError, match="pixels"):
        preprocess(dataset.chunk({"pixels": 1000}), recipe="cnn")
    with pytest.raises(VariableError, match="ormask"):
        preprocess(dataset.drop_vars("ormask"), recipe="cnn")
    with pytest.raises(VariableError, match="flux"):
        preprocess(dataset.assign(flux=dataset.flux.astype("f8")), recipe="cnn")
    with pytest.raises(ValueError, match="loglam"):
        preprocess(dataset.assign_coords(loglam=dataset.loglam[::-1].values), recipe="cnn")
    with pytest.raises(TypeError, match="ds"):
        preprocess(dataset.flux, recipe="cnn")


# --- templates ------------------------------------------------------------------------------


@pytest.mark.parametrize("normalise", ["mean", "zscore", None])
def test_prepare_templates_matches_reference(normalise):
    rng = np.random.default_rng(4)
    loglam = np.linspace(np.log10(3650.0), np.log10(10200.0), 20000)
    flux = 1.0 + rng.random((3, loglam.size))
    flux[1, 5000:5100] = np.nan
    wave, out = prepare_templates(loglam, flux, normalise)
    np.testing.assert_array_equal(wave, K.wavelength_grid(K.GRID_4B))
    assert out.shape == (3, 4200) and out.dtype == np.float64
    ref = R.preprocess_grid(
        flux, None, None, 10.0**loglam, grid=K.GRID_4B, normalise=normalise, out_dtype=np.float64
    )
    np.testing.assert_allclose(out, ref.flux, rtol=1e-12, atol=1e-12)
    if normalise == "mean":
        np.testing.assert_allclose(out.mean(axis=1), 1.0)
    w1, o1 = prepare_templates(loglam, flux[0], normalise)
    np.testing.assert_array_equal(o1, out[0])
    # per-template wavelengths
    _, o2 = prepare_templates(np.broadcast_to(loglam, flux.shape), flux, normalise)
    np.testing.assert_array_equal(o2, out)


def test_prepare_templates_partial_coverage_and_errors():
    loglam = np.log10(np.linspace(5000.0, 8000.0, 4000))
    wave, out = prepare_templates(loglam, np.ones(4000) + np.linspace(0, 1, 4000), "zscore")
    assert np.isnan(out[wave < 5000]).all() and np.isnan(out[wave > 8000]).all()
    assert np.isfinite(out[(wave >= 5000) & (wave <= 7999)]).all()
    _, bad = prepare_templates(loglam, -np.ones(4000), "mean")
    assert np.isnan(bad).all()
    with pytest.raises(ValueError, match="normalise"):
        prepare_templates(loglam, np.ones(4000), "max")
    with pytest.raises(ValueError, match="loglam"):
        prepare_templates(loglam[::-1], np.ones(4000))
    with pytest.raises(ValueError, match="loglam"):
        prepare_templates(loglam[:-1], np.ones(4000))
    with pytest.raises(ValueError, match="grid"):
        prepare_templates(loglam, np.ones(4000), grid=(4700, 1, 10))
    _, short = prepare_templates(loglam, np.ones(4000) * 2, None, grid=K.Grid(4700.0, 1.0, 2800))
    assert short.shape == (2800,)


def test_empty_dataset(dataset):
    empty = dataset.isel(spectra=slice(0, 0))
    for recipe in ("cnn", "tlma", "tm"):
        rv = "lamost_rv" if recipe == "tlma" else None
        out = preprocess(empty.chunk(), recipe=recipe, rv=rv, merge=False).compute()
        assert out.sizes["spectra"] == 0


@pytest.mark.slow
@pytest.mark.distributed
def test_distributed_process_workers_equal_local(dataset):
    """The kernels ship to a separate worker process and give the same numbers."""
    from distributed import Client, LocalCluster

    lazy = preprocess(dataset.chunk({"spectra": 7}), recipe="tlma", rv="lamost_rv", merge=False)
    local = lazy.compute(scheduler="sync")
    with (
        LocalCluster(
            n_workers=1, threads_per_worker=2, processes=True, dashboard_address=None
        ) as cluster,
        Client(cluster) as client,
    ):
        remote = client.compute(lazy).result()
    xr.testing.assert_identical(remote, local)


def test_merge_and_fill_value_in_wrapper(dataset):
    cnn = preprocess(dataset, recipe="cnn")
    assert set(dataset.data_vars) < set(cnn.data_vars)
    with pytest.warns(MergeWarning, match="flux_grid"):  # replaces flux_grid, keeps the rest
        again = preprocess(cnn, recipe="tlma", rv="lamost_rv")
    assert again.wavelength_grid.attrs["frame"] == "rest"
    alone = preprocess(dataset, recipe="tlma", rv="lamost_rv", merge=False)
    xr.testing.assert_identical(again.flux_grid, alone.flux_grid)
    xr.testing.assert_identical(again.flux, dataset.flux)
    filled = preprocess(dataset, recipe="cnn", fill_value=0.0, merge=False)
    ok = filled.preprocess_status.values == K.STATUS_OK
    assert np.isfinite(filled.flux_grid.values[ok]).all()
    np.testing.assert_array_equal(
        filled.flux_grid.values[ok], np.nan_to_num(cnn.flux_grid.values[ok], nan=0.0)
    )
    assert filled.flux_grid.attrs["fill_value_uncovered"] == 0.0
