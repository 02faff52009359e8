"""Template-matching RV: numba kernel vs numpy reference, wrapper, laziness, bad input."""

from __future__ import annotations

import dask
import numpy as np
import pytest
import xarray as xr
from scipy.optimize import curve_fit

from mspec.rv import chi2_kernels as K
from mspec.rv import template_match
from mspec.rv.reference import chi2_ref, tm_spectrum_ref
from mspec.rv.templates import (
    load_templates,
    make_library,
    pyhammer_templates,
    replicate_templates,
    save_templates,
)
from mspec.rv.tm_engine import make_config, match_arrays
from mspec.testing import raise_if_computes
from mspec.variables import C_KMS, NPIX, loglam_grid, validate

LOGLAM = loglam_grid()
WAVE = 10.0**LOGLAM


@pytest.fixture(scope="module")
def lib():
    return pyhammer_templates("M[0-4]_+0.0*")


def fake_spectra(lib, rvs, snr=50.0, seed=0, tidx=None):
    """Spectra made from library templates: shifted by ``rvs``, times a smooth continuum,
    plus Gaussian noise of the given S/N, on the native grid."""
    rng = np.random.default_rng(seed)
    w = lib.template_wavelength.values
    n = len(rvs)
    tidx = np.arange(n) % lib.sizes["templates"] if tidx is None else np.asarray(tidx)
    flux = np.full((n, NPIX), np.nan)
    sel = (WAVE > 4610) & (WAVE < 8990)
    cont = 1.0 + 0.3 * ((WAVE - 6500) / 2000) - 0.2 * ((WAVE - 6500) / 2000) ** 2
    for k, (v, t) in enumerate(zip(rvs, tidx)):
        s = np.interp(WAVE[sel] / (1 + v / C_KMS), w, lib.template_flux.values[t])
        flux[k, sel] = 100.0 * cont[sel] * s
    sigma = np.nanmedian(flux, axis=1, keepdims=True) / snr
    ivar = np.where(np.isfinite(flux), 1.0 / sigma**2, 0.0)
    flux = flux + rng.standard_normal(flux.shape) * sigma
    ormask = np.where(np.isfinite(flux), 0, 1).astype(np.int32)
    ormask[:, 2000:2010] = 2  # a masked stretch inside the window
    return flux.astype(np.float32), ivar.astype(np.float32), ormask


def as_dataset(flux, ivar, ormask):
    n = flux.shape[0]
    return xr.Dataset(
        {
            "flux": (("spectra", "pixels"), flux),
            "ivar": (("spectra", "pixels"), ivar),
            "ormask": (("spectra", "pixels"), ormask),
        },
        coords={"obsid": ("spectra", np.arange(n, dtype=np.int64)), "loglam": ("pixels", LOGLAM)},
    )


# --- Gaussian fit and χ² pieces -----------------------------------------------------------


def _gauss(v, c0, a, mu, s):
    return c0 - a * np.exp(-((v - mu) ** 2) / (2 * s * s))


@pytest.mark.parametrize("mu", [13.3, -251.0, 41.0, 0.0])
def test_gauss_fit_matches_scipy(mu):
    rng = np.random.default_rng(int(abs(mu)))
    v = np.arange(-10, 11) * 60.0
    y = _gauss(v, 5.0, 3.0, mu, 110.0) + rng.normal(0, 0.02, v.size)
    j = int(np.argmin(y))
    lo, hi = j - 3, j + 4
    p, _ = curve_fit(_gauss, v[lo:hi], y[lo:hi], p0=[y[lo:hi].max(), 1.0, v[j], 90.0])
    for fit in (K.gauss_fit, K.gauss_fit_nb):
        m, ymin, ok = fit(v, y, lo, hi)
        assert ok
        assert abs(m - p[2]) < 1e-4
        assert abs(ymin - (p[0] - p[1])) < 1e-6


def test_gauss_fit_failures():
    v = np.arange(-10, 11) * 60.0
    # monotonic: the best "centre" would leave the window
    assert not K.gauss_fit(v, v.copy(), 5, 12)[2]
    assert not K.gauss_fit_nb(v, np.ones(21), 5, 12)[2]  # flat
    assert not K.gauss_fit(v, -np.abs(v), 7, 14)[2]  # a maximum, not a minimum


def test_chi2_kernel_equals_lstsq():
    rng = np.random.default_rng(3)
    n = 500
    o = rng.random(n) + 2
    s = rng.random(n) + 1
    x = np.linspace(-1, 1, n)
    iv = rng.uniform(1, 5, n)
    ormask = (rng.random(n) < 0.05).astype(np.int64)
    for use_ivar in (False, True):
        pw, qw = np.empty((n, 5)), np.empty((n, 9))
        sumo2, nval = K._prep_obs(o, iv, ormask, x, 0, n, use_ivar, pw, qw)
        b, a, c = np.empty(5), np.empty(9), np.empty(5)
        got = K._chi2_slice(s, 0, n, pw, qw, sumo2, nval, b, a, c)
        w = np.where(ormask == 0, iv if use_ivar else 1.0, 0.0)
        want, coef = chi2_ref(o, w, x, s)
        assert got == pytest.approx(want, rel=1e-9)
        np.testing.assert_allclose(c, coef, rtol=1e-7)
        if not use_ivar:
            # precomputed template moments minus the masked pixels: same χ²
            ta = np.empty((1, 1, 9))
            K.trial_moments(s[None, None, :], x, ta)
            midx = np.nonzero(qw[:, 0] == 0)[0]
            fast = K._chi2_premoments(s, n, pw, x, midx, midx.size, ta[0, 0], sumo2, nval, b, a, c)
            assert fast == pytest.approx(want, rel=1e-9)


def test_config_lattice():
    cfg = make_config(LOGLAM)
    assert cfg.h == pytest.approx(1e-4 / 69)
    vt = cfg.trial_velocity
    assert vt.size == 21
    assert np.all(np.abs(vt - 60 * np.arange(-10, 11)) <= 0.51)
    assert np.all(np.abs(cfg.shift_velocity - np.arange(-500, 501)) <= 0.51)
    i0, n = cfg.window()
    assert WAVE[i0] >= 4700 and WAVE[i0 + n - 1] <= 8899
    assert WAVE[i0 - 1] < 4700 and WAVE[i0 + n] > 8899
    i0b, nb = make_config(LOGLAM, wave_max=7500).window()
    assert WAVE[i0b + nb - 1] <= 7500 < WAVE[i0b + nb]


# --- kernel vs reference ------------------------------------------------------------------


def _compare(ref, got, k):
    assert got["status"][k] == ref["status"]
    assert got["template"][k] == ref["template"]
    np.testing.assert_allclose(got["chi2"][k], ref["curve"], rtol=1e-8)
    if ref["status"] == 0:
        assert abs(got["rv"][k] - ref["rv"]) <= 0.1
        assert abs(got["err"][k] - ref["err"]) <= 0.1
        assert got["err_stat"][k] == pytest.approx(ref["err_stat"], rel=1e-4)
        assert got["chi2_min"][k] == pytest.approx(ref["chi2_min"], rel=1e-8)


@pytest.mark.parametrize(
    ("weighting", "tellurics"), [("none", False), ("ivar", False), ("none", True)]
)
def test_kernel_matches_reference_fake(lib, weighting, tellurics):
    flux, ivar, ormask = fake_spectra(lib, [37.2, -143.9, 311.0], snr=30, seed=1)
    cfg = make_config(
        LOGLAM, weighting=weighting, shifts=np.arange(-500, 501, 125), mask_tellurics=tellurics
    )
    w, f1 = lib.template_wavelength.values, lib.template_flux.values
    got = match_arrays(flux, ivar, ormask, f1, w, cfg)
    for k in range(3):
        ref = tm_spectrum_ref(flux[k], ivar[k], ormask[k], LOGLAM, w, f1, cfg)
        _compare(ref, got, k)
        assert abs(got["rv"][k] - [37.2, -143.9, 311.0][k]) < 5


def test_kernel_matches_reference_full_shift_grid(lib):
    """The paper's configuration (1001 shifts) on one spectrum, TM and TML7500."""
    flux, ivar, ormask = fake_spectra(lib, [-21.7], snr=40, seed=2)
    w, f1 = lib.template_wavelength.values, lib.template_flux.values
    for wave_max in (None, 7500):
        cfg = make_config(LOGLAM, wave_max=wave_max)
        got = match_arrays(flux, ivar, ormask, f1, w, cfg)
        ref = tm_spectrum_ref(flux[0], ivar[0], ormask[0], LOGLAM, w, f1, cfg)
        assert ref["residuals"].size == 1001
        _compare(ref, got, 0)


def test_dense_shortcut_identical_to_full_curve(lib):
    """Step 2's core-plus-samples dense curve gives bit-for-bit the full curve's results,
    on clean, noisy, noise-only and edge-of-grid spectra (both of its paths)."""
    import dataclasses

    rng = np.random.default_rng(7)
    parts = []
    for snr in (1.5, 4.0, 15.0, 80.0):
        rvs = rng.uniform(-560, 560, 6)
        parts.append(fake_spectra(lib, rvs, snr=snr, seed=int(snr * 10)))
    flux = np.concatenate([p[0] for p in parts])
    ivar = np.concatenate([p[1] for p in parts])
    ormask = np.concatenate([p[2] for p in parts])
    noise = rng.standard_normal((3, NPIX)).astype(np.float32) + 10.0  # no template at all
    flux = np.concatenate([flux, noise])
    ivar = np.concatenate([ivar, np.ones_like(noise)])
    ormask = np.concatenate([ormask, np.zeros(noise.shape, np.int32)])
    w, f1 = lib.template_wavelength.values, lib.template_flux.values
    for wave_max in (None, 7500):
        cfg = make_config(LOGLAM, wave_max=wave_max)
        assert cfg.dense_step > 0  # the shortcut is the default
        fast = match_arrays(flux, ivar, ormask, f1, w, cfg)
        full = match_arrays(flux, ivar, ormask, f1, w, dataclasses.replace(cfg, dense_step=0))
        for key in fast:
            np.testing.assert_array_equal(fast[key], full[key], err_msg=key)
        assert (fast["status"] == 0).sum() >= 12
    with pytest.raises(ValueError, match="dense_step"):
        dataclasses.replace(make_config(LOGLAM), dense_step=-1)


# --- status codes / bad input ---------------------------------------------------------------


def test_status_codes(lib):
    flux, ivar, ormask = fake_spectra(lib, [0.0, 0.0, 900.0, 0.0], snr=50, seed=4)
    flux[0] = np.nan  # no data
    ivar[0] = 0
    flux[1] = 0.0  # zero flux: χ² = 0 at every RV
    ormask[3, 1000:3700] = 1  # almost everything masked
    cfg = make_config(LOGLAM, shifts=[-100.0, 0.0, 100.0])
    got = match_arrays(
        flux, ivar, ormask, lib.template_flux.values, lib.template_wavelength.values, cfg
    )
    assert got["status"].tolist() == [
        K.STATUS_NO_COVERAGE,
        K.STATUS_FLAT_CHI2,
        K.STATUS_EDGE,
        K.STATUS_NO_COVERAGE,
    ]
    assert np.isnan(got["rv"]).all()
    assert np.isnan(got["err"]).all()


def test_featureless_spectra_fail_cleanly(lib):
    """Constant or pure-noise flux: no stable RV, status 5 and NaN, no exception."""
    rng = np.random.default_rng(0)
    flux = np.vstack([np.ones(NPIX), 1 + 0.01 * rng.standard_normal(NPIX)])
    cfg = make_config(LOGLAM, shifts=[-100.0, 0.0, 100.0])
    got = match_arrays(
        flux,
        np.ones_like(flux),
        np.zeros(flux.shape, np.int32),
        lib.template_flux.values,
        lib.template_wavelength.values,
        cfg,
    )
    assert got["status"].tolist() == [K.STATUS_SHIFT_FAILED] * 2
    assert np.isnan(got["rv"]).all()


def test_bad_arguments(lib):
    ds = as_dataset(*fake_spectra(lib, [0.0], snr=20))
    with pytest.raises(ValueError, match="weighting"):
        template_match(ds, templates=lib, weighting="chi")
    with pytest.raises(ValueError, match="wave_max"):
        template_match(ds, templates=lib, wave_max=3000)
    with pytest.raises(ValueError, match="ivar"):
        template_match(ds.drop_vars("ivar"), templates=lib)
    with pytest.raises(ValueError, match="templates"):
        template_match(ds, templates=ds)
    with pytest.raises(ValueError, match="pixels"):
        template_match(ds.chunk({"pixels": 1000}), templates=lib)
    with pytest.raises(ValueError, match="fit_halfwidth"):
        template_match(ds, templates=lib, fit_halfwidth=1)


# --- wrapper ------------------------------------------------------------------------------------


def test_wrapper_lazy_chunked_equals_unchunked(lib):
    ds = as_dataset(*fake_spectra(lib, [5.0, -60.0, 120.0, 33.0, -7.0], snr=25, seed=5))
    shifts = np.arange(-500, 501, 250)
    eager = template_match(ds, templates=lib, merge=False, shifts=shifts)
    with raise_if_computes():
        lazy = template_match(ds.chunk({"spectra": 2}), templates=lib, merge=False, shifts=shifts)
        lazy7 = template_match(
            ds.chunk({"spectra": -1}), templates=lib, merge=False, wave_max=7500, shifts=shifts
        )
    assert lazy["rv_tm"].chunks is not None
    validate(eager)
    validate(lazy7)
    lazy = lazy.compute()
    for v in eager.data_vars:
        xr.testing.assert_identical(eager[v], lazy[v])
    assert set(lazy7.data_vars) == {
        "rv_tml7500",
        "rv_tml7500_err",
        "rv_tml7500_err_stat",
        "tml7500_template",
        "tml7500_chi2_min",
        "tml7500_chi2",
        "tml7500_status",
    }
    assert eager["tm_template"].values[0] == lib.template_name.values[0]
    assert (eager["tm_status"] == 0).all()
    assert eager["velocities"].attrs["units"] == "km/s"
    masked = template_match(ds, templates=lib, merge=False, shifts=shifts, mask_tellurics=True)
    assert masked.attrs["tm_mask_tellurics"] == 1
    assert (masked["tm_status"] == 0).all()
    assert not np.array_equal(masked["rv_tm"].values, eager["rv_tm"].values)


def test_templates_enter_graph_once(lib):
    ds = as_dataset(*fake_spectra(lib, [5.0] * 6, snr=25)).chunk({"spectra": 2})
    out = template_match(ds, templates=lib, merge=False, shifts=[0.0])
    graph = dict(out["rv_tm"].data.__dask_graph__())
    keys = [k for k in graph if "tm-templates" in str(k)]
    assert len(keys) == 1  # one key, a dependency of every chunk's task


# --- templates ------------------------------------------------------------------------------------


def test_pyhammer_library(lib):
    full = pyhammer_templates()
    assert full.sizes["templates"] == 33
    assert full.template_flux.shape == (33, 4400)
    w = full.template_wavelength.values
    core = (w >= 4700) & (w <= 8899)
    np.testing.assert_allclose(full.template_flux.values[:, core].mean(axis=1), 1.0)
    assert set(full.template_lumclass.values) == {"dV", ""}
    assert full.template_spt.values[0] == "M0"
    z = pyhammer_templates("M0*", normalise="zscore").template_flux.values[:, core]
    np.testing.assert_allclose(z.mean(axis=1), 0.0, atol=1e-12)
    np.testing.assert_allclose(z.std(axis=1), 1.0)
    validate(full)


def test_user_template_formats_roundtrip(lib, tmp_path):
    import pandas as pd
    from astropy.io import fits

    w = np.arange(4500.0, 9100.0, 0.5)
    f = np.vstack(
        [np.interp(w, lib.template_wavelength.values, r) for r in lib.template_flux.values]
    )
    names = [str(n) for n in lib.template_name.values]
    # CSV
    pd.DataFrame({"wavelength": w, **{n: r for n, r in zip(names, f)}}).to_csv(
        tmp_path / "t.csv", index=False
    )
    a = load_templates(tmp_path / "t.csv")
    # FITS: one file per template
    paths = []
    for n, r in zip(names, f):
        p = tmp_path / f"{n}.fits"
        fits.BinTableHDU.from_columns(
            [fits.Column("WAVELENGTH", "D", array=w), fits.Column("FLUX", "D", array=r)]
        ).writeto(p)
        paths.append(p)
    b = load_templates(paths, meta=pd.DataFrame({"teff": [3800.0] * len(names)}, index=names))
    # Zarr
    save_templates(a, tmp_path / "t.zarr")
    c = load_templates(tmp_path / "t.zarr")
    for x in (a, b, c):
        assert x.sizes["templates"] == len(names)
        assert list(x.template_name.values) == names
        np.testing.assert_allclose(x.template_flux.values, a.template_flux.values, rtol=1e-12)
    assert (b.template_teff.values == 3800.0).all()
    (tmp_path / "t.txt").write_text("x")
    with pytest.raises(ValueError, match="unknown template format"):
        load_templates(tmp_path / "t.txt")


def test_library_errors_and_replicate(lib):
    with pytest.raises(ValueError, match="normalise"):
        make_library(LOGLAM, np.ones((1, NPIX)), ["a"], normalise="max")
    with pytest.raises(ValueError, match="unique"):
        make_library(LOGLAM, np.ones((2, NPIX)), ["a", "a"])
    with pytest.raises(ValueError, match="without usable flux"):
        make_library(LOGLAM, np.full((1, NPIX), np.nan), ["a"])
    r = replicate_templates(lib, 12)
    assert r.sizes["templates"] == 12
    assert len(set(r.template_name.values)) == 12


@pytest.mark.distributed
def test_template_match_on_distributed_cluster(lib):
    from distributed import Client, LocalCluster

    ds = as_dataset(*fake_spectra(lib, [12.0, -40.0, 250.0, 3.0], snr=25, seed=9))
    shifts = np.arange(-500, 501, 250)
    eager = template_match(ds, templates=lib, merge=False, shifts=shifts)
    with (
        LocalCluster(
            n_workers=2, threads_per_worker=1, processes=False, dashboard_address=":0"
        ) as cluster,
        Client(cluster),
    ):
        got = template_match(
            ds.chunk({"spectra": 1}), templates=lib, merge=False, shifts=shifts
        ).compute()
    for v in eager.data_vars:
        xr.testing.assert_identical(eager[v], got[v])


def test_threaded_chunks_identical(lib):
    """Worker threads share the per-library caches: results must not depend on timing."""
    ds = as_dataset(*fake_spectra(lib, [3.0, -77.0, 150.0, 20.0, -5.0, 61.0], snr=40, seed=12))
    eager = template_match(ds, templates=lib, merge=False)
    from mspec.rv import tm_engine

    tm_engine._CACHE.clear()  # threads race to build the caches again
    with dask.config.set(scheduler="threads", num_workers=4):
        got = template_match(ds.chunk({"spectra": 1}), templates=lib, merge=False).compute()
    for v in eager.data_vars:
        xr.testing.assert_identical(eager[v], got[v])


def test_invariances_and_step1_mask(lib):
    """RV does not change when the flux is scaled, nor when masked pixels hold garbage."""
    flux, ivar, ormask = fake_spectra(lib, [42.0], snr=30, seed=13)
    cfg = make_config(LOGLAM, shifts=np.arange(-500, 501, 100))
    w, f1 = lib.template_wavelength.values, lib.template_flux.values
    base = match_arrays(flux, ivar, ormask, f1, w, cfg)
    scaled = match_arrays(flux * 1e3, ivar * 1e-6, ormask, f1, w, cfg)
    assert abs(scaled["rv"][0] - base["rv"][0]) < 1e-6
    assert scaled["template"][0] == base["template"][0]
    assert scaled["err_stat"][0] == pytest.approx(base["err_stat"][0], rel=1e-6)
    junk = flux.copy()
    junk[0, 2000:2010] = 1e6  # these pixels have ormask != 0 (step 1 removes them)
    assert (ormask[0, 2000:2010] != 0).all()
    again = match_arrays(junk, ivar, ormask, f1, w, cfg)
    assert again["rv"][0] == pytest.approx(base["rv"][0], abs=1e-9)
