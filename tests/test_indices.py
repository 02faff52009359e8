"""Spectral indices (paper Table 3): kernel vs numpy reference, laziness, chunking, physics."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import xarray as xr

import mspec
from mspec import indices_kernels as K
from mspec.indices import (
    INDEX_NAMES,
    air_to_vacuum,
    band_table,
    measure_indices,
    spectral_indices,
)
from mspec.indices_reference import indices_ref, window_mean_ref
from mspec.stage import MergeWarning
from mspec.testing import raise_if_computes
from mspec.variables import C_KMS, DLOGLAM, LOGLAM0, NPIX, loglam_grid, validate

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
DR7 = DATA / "lamost_dr7_mdwarfs"


@pytest.fixture(scope="module")
def sim():
    ds = mspec.simulate_survey(240, seed=11)
    ds["rv_tm"] = ds["true_rv"]
    return ds


@pytest.fixture(scope="module")
def sim_m():
    """M stars only, 60 giants + 120 dwarfs, for the direction checks."""
    ds = mspec.simulate_survey(180, seed=5, mix={"dM": 2 / 3, "gM": 1 / 3})
    ds["rv_tm"] = ds["true_rv"]
    return ds


def _random_block(rng, n=25, npix=900):
    loglam = np.log10(6700.0) + DLOGLAM * np.arange(npix)  # 6700-~9740 A
    flux = rng.normal(100, 15, (n, npix)).astype(np.float32)
    ivar = np.where(rng.random((n, npix)) < 0.08, 0.0, 1.0).astype(np.float32)
    ormask = np.where(rng.random((n, npix)) < 0.05, 4, 0).astype(np.int32)
    flux[rng.random((n, npix)) < 0.02] = np.nan
    rv = rng.normal(0, 80, n)
    rv[0] = np.nan
    ormask[1] = 1  # no good pixels
    ormask[2, :450] = 1  # blue half gone: partial
    return loglam, flux, ivar, ormask, rv


def _compare(loglam, flux, ivar, ormask, rv, max_gap=2):
    out, status = measure_indices(loglam, flux, ivar, ormask, rv, max_gap=max_gap)
    bt = band_table()
    for i in range(flux.shape[0]):
        ref, st = indices_ref(loglam, flux[i], ivar[i], ormask[i], rv[i], bt, max_gap=max_gap)
        assert st == status[i], i
        np.testing.assert_array_equal(np.isnan(ref), np.isnan(out[i]))
        np.testing.assert_allclose(out[i], ref, rtol=1e-10, atol=1e-10, equal_nan=True)
    return out, status


def test_air_to_vacuum():
    # Morton (2000): Halpha 6562.80 air -> 6564.61 vacuum; Ca II 8542.09 -> 8544.44
    assert air_to_vacuum(6562.80) == pytest.approx(6564.61, abs=0.01)
    assert air_to_vacuum(8542.09) == pytest.approx(8544.44, abs=0.01)
    np.testing.assert_allclose(air_to_vacuum([7664.90, 7698.96]), [7667.01, 7701.08], atol=0.01)
    with pytest.raises(ValueError, match="wave_air"):
        air_to_vacuum(1000.0)


def test_band_table_layout():
    bt = band_table()
    assert bt["ratio_lo"].shape == (10,)
    assert list(bt["line_ptr"]) == [0, 2, 3, 6]
    assert list(bt["cont_ptr"]) == [0, 2, 4, 8]
    assert np.all(bt["ratio_hi"] > bt["ratio_lo"])
    # the air 7042-7046 continuum moves ~1.9 A to the red in vacuum
    assert bt["ratio_lo"][1] == pytest.approx(7043.94, abs=0.02)


def test_window_mean_exact_on_linear_flux():
    wave = np.linspace(7000.0, 7100.0, 101)
    flux = 3.0 + 0.01 * (wave - 7000.0)
    good = np.ones(wave.size, bool)
    good[50:52] = False  # two bad pixels: interpolated across (linear anyway)
    got = K.window_mean(wave, flux, good, 7040.3, 7061.7, 2)
    assert got == pytest.approx(3.0 + 0.01 * (0.5 * (7040.3 + 7061.7) - 7000.0), rel=1e-13)
    ig = np.flatnonzero(good)
    assert window_mean_ref(wave[ig], flux[ig], ig, 7040.3, 7061.7, 2) == pytest.approx(got)
    # three bad in a row > max_gap -> not covered; outside the spectrum -> not covered
    good[50:53] = False
    assert np.isnan(K.window_mean(wave, flux, good, 7040.3, 7061.7, 2))
    assert np.isnan(K.window_mean(wave, flux, np.ones(101, bool), 6990.0, 7010.0, 2))


def test_ew_of_a_box_line():
    """A box absorption of depth 0.4 over 10 A on a flat continuum: EW = 4 A (+ edges)."""
    loglam = np.log10(6500.0) + DLOGLAM * np.arange(2000)
    wave = 10**loglam
    flux = np.full(wave.size, 50.0)
    lo, hi = air_to_vacuum(8185.0), air_to_vacuum(8195.0)
    flux[(wave > lo) & (wave < hi)] *= 0.6
    out, status = measure_indices(
        loglam, flux[None], np.ones((1, wave.size)), np.zeros((1, wave.size), int), [0.0]
    )
    # the linear interpolant adds one half-pixel ramp at each edge: |EW - 4| < 0.4 * 1.9 A
    assert abs(out[0, 5] - 4.0) < 0.4 * 1.9
    assert out[0, 4] == pytest.approx(0.0, abs=1e-12)  # K I: flat
    np.testing.assert_allclose(out[0, :3], 1.0, rtol=1e-13)  # flat bands: ratios 1
    assert status[0] == K.STATUS_PARTIAL  # zeta undefined at CaH = 2 (no band at all)


def test_kernel_equals_reference_random():
    rng = np.random.default_rng(0)
    block = _random_block(rng)
    out, status = _compare(*block)
    assert status[0] == K.STATUS_NO_RV and np.all(np.isnan(out[0]))
    assert status[1] == K.STATUS_NO_GOOD_PIXELS
    assert status[2] in (K.STATUS_PARTIAL, K.STATUS_NONE)
    assert np.isfinite(out).sum() > 50
    _compare(*block, max_gap=0)


def test_kernel_equals_reference_simulated(sim):
    out, status = _compare(
        sim["loglam"].values,
        sim["flux"].values,
        sim["ivar"].values,
        sim["ormask"].values,
        sim["rv_tm"].values,
    )
    m = sim["true_class"].values == "M"
    # the Table-3 indices (first 7 columns) of most M stars are measurable; the C2 window
    # (5130-5200 A) is where M dwarfs have little flux, so it alone may be NaN (status 3)
    assert np.mean(np.all(np.isfinite(out[m, :7]), axis=1)) > 0.8
    assert np.mean(status[m] == K.STATUS_OK) > 0.7


@pytest.mark.parametrize("chunks", [-1, 7, 100])
def test_chunked_equals_unchunked(sim, chunks):
    ref = spectral_indices(sim, merge=False)
    got = spectral_indices(sim.chunk({"spectra": chunks, "pixels": -1}), merge=False).compute()
    for name in (*INDEX_NAMES, "idx_status"):
        np.testing.assert_array_equal(got[name].values, ref[name].values)


def test_lazy_no_compute(sim):
    lazy = sim.chunk({"spectra": 50, "pixels": -1})
    with raise_if_computes():
        out = spectral_indices(lazy)
    assert out["idx_tio5"].chunks is not None
    validate(out, [*INDEX_NAMES, "idx_status"])
    assert out["idx_status"].attrs["flag_values"].dtype == np.int8
    assert "no_rv" in out["idx_status"].attrs["flag_meanings"]
    assert out["ew_nai"].attrs["units"] == "Angstrom"


def test_rv_shift_and_missing_rv(sim):
    """Indices follow the star: the observed-frame shift is undone by the rv."""
    ds = sim.isel(spectra=np.flatnonzero(sim["true_class"].values == "M")[:10])
    a = spectral_indices(ds, merge=False)
    b = spectral_indices(ds, rv=None, merge=False)
    big = np.abs(ds["true_rv"].values) > 100
    assert not np.allclose(a["ew_nai"].values[big], b["ew_nai"].values[big]) or not big.any()
    ds2 = ds.copy()
    ds2["rv_tm"] = ds2["rv_tm"].where(np.arange(ds2.sizes["spectra"]) != 3)
    c = spectral_indices(ds2, merge=False)
    assert c["idx_status"].values[3] == K.STATUS_NO_RV
    assert np.all(np.isnan([c[n].values[3] for n in INDEX_NAMES]))
    np.testing.assert_array_equal(c["idx_tio5"].values[:3], a["idx_tio5"].values[:3])


def test_merge_and_bad_arguments(sim):
    small = sim.isel(spectra=slice(0, 5))
    merged = spectral_indices(small)
    assert "flux" in merged and "idx_cah2" in merged
    with pytest.warns(MergeWarning):
        spectral_indices(merged)
    with pytest.raises(ValueError, match="rv"):
        spectral_indices(small, rv="nope")
    with pytest.raises(ValueError, match="rv"):
        spectral_indices(small, rv=3.0)
    with pytest.raises(ValueError, match="max_gap"):
        spectral_indices(small, max_gap=-1)
    with pytest.raises(ValueError, match="zeta_coef"):
        spectral_indices(small, zeta_coef=[1, 2])
    with pytest.raises(ValueError, match="pixels"):
        spectral_indices(small.chunk({"pixels": 100}))
    with pytest.raises(TypeError, match="ds"):
        spectral_indices(small["flux"])
    with pytest.raises(ValueError, match="flux"):
        measure_indices(np.arange(5.0), np.ones((2, 4)), np.ones((2, 4)), np.zeros((2, 4)), 0)


def test_direction_dwarfs_vs_giants(sim_m):
    out = spectral_indices(sim_m, merge=False)
    df = out[list(INDEX_NAMES)].to_dataframe()
    df["lum"] = sim_m["true_lumclass"].values
    df["teff"] = sim_m["true_teff"].values
    df = df[out["idx_status"].values == 0]
    # compare at overlapping temperatures
    df = df[(df.teff > 3300) & (df.teff < 3900)]
    med = df.groupby("lum").median()
    assert (df.lum == "dM").sum() > 20 and (df.lum == "gM").sum() > 10
    # Table 3: CaH dip in dwarfs (smaller CaH3), K I / Na I deep in dwarfs, Ca II deep in giants
    assert med.loc["dM", "idx_cah3"] < med.loc["gM", "idx_cah3"]
    assert med.loc["dM", "ew_ki"] > med.loc["gM", "ew_ki"]
    assert med.loc["dM", "ew_nai"] > med.loc["gM", "ew_nai"]
    assert med.loc["dM", "ew_caii"] < med.loc["gM", "ew_caii"]


def test_tio5_decreases_toward_later_types(sim_m):
    out = spectral_indices(sim_m, merge=False)
    dm = (sim_m["true_lumclass"].values == "dM") & (out["idx_status"].values == 0)
    teff = sim_m["true_teff"].values[dm]
    tio5 = out["idx_tio5"].values[dm]
    rho = pd.Series(tio5).corr(pd.Series(teff), method="spearman")
    assert rho > 0.7  # cooler (later) -> smaller TiO5


# --- real LAMOST DR7 M dwarfs ---------------------------------------------------------------
def _read_dr7() -> xr.Dataset:
    from astropy.io import fits

    files = sorted(DR7.glob("spec-*.fits"))
    n = len(files)
    flux = np.full((n, NPIX), np.nan, np.float32)
    ivar = np.zeros((n, NPIX), np.float32)
    ormask = np.ones((n, NPIX), np.int32)
    rv = np.zeros(n)
    for k, f in enumerate(files):
        with fits.open(f) as h:
            d = np.asarray(h[0].data, dtype=np.float64)
            z = h[0].header["Z"]
        i0 = int(round((np.log10(d[2, 0]) - LOGLAM0) / DLOGLAM))
        flux[k, i0 : i0 + d.shape[1]] = d[0]
        ivar[k, i0 : i0 + d.shape[1]] = d[1]
        ormask[k, i0 : i0 + d.shape[1]] = d[4]
        rv[k] = 0.0 if z == -9999 else z * C_KMS
    return xr.Dataset(
        {
            "flux": (("spectra", "pixels"), flux),
            "ivar": (("spectra", "pixels"), ivar),
            "ormask": (("spectra", "pixels"), ormask),
            "rv_lamost": ("spectra", rv),
            "file": ("spectra", np.array([f.name for f in files])),
        },
        coords={"loglam": ("pixels", loglam_grid())},
    )


@pytest.mark.realdata
@pytest.mark.skipif(not DR7.is_dir(), reason="../shared/data/lamost_dr7_mdwarfs missing")
def test_real_dr7_mdwarfs():
    ds = _read_dr7()
    out = spectral_indices(ds, rv="rv_lamost", merge=False)
    ok = out["idx_status"].values == 0
    assert ok.sum() >= 28
    lab = pd.read_csv(DR7 / "labels.csv").set_index("file_name")
    teff = lab.loc[ds["file"].values, "teff_lit"].to_numpy()
    m = ok & (teff < 4000) & (out["idx_cah2"].values < 0.85)  # M dwarfs (drop the G5/K7)
    assert m.sum() >= 25
    v = {n: out[n].values[m] for n in INDEX_NAMES}
    assert np.all((v["idx_cah2"] > 0.3) & (v["idx_cah2"] < 0.85))
    assert np.all((v["idx_cah3"] > 0.55) & (v["idx_cah3"] < 0.95))
    assert np.all((v["idx_tio5"] > 0.3) & (v["idx_tio5"] < 0.9))
    assert np.all((v["idx_zeta"] > 0.7) & (v["idx_zeta"] < 2.0))  # near-solar dwarfs
    assert np.all((v["ew_ki"] > 0.5) & (v["ew_ki"] < 8))
    assert np.all((v["ew_nai"] > 0.5) & (v["ew_nai"] < 6))
    assert np.all((v["ew_caii"] > 0) & (v["ew_caii"] < 10))
    rho = pd.Series(v["idx_tio5"]).corr(pd.Series(teff[m]), method="spearman")
    assert rho > 0.3


def _band_spectrum(head_air, depth, width, *, to_red):
    """Flat spectrum with a molecular band: sharp head, absorption fading over ``width`` A."""
    loglam = np.log10(4900.0) + DLOGLAM * np.arange(3000)  # 4900-~9800 A
    wave = 10**loglam
    head = air_to_vacuum(head_air)
    x = (wave - head) if to_red else (head - wave)
    absorb = np.where(x >= 0, depth * np.exp(-x / width), 0.0)
    flux = 100.0 * (1.0 - absorb)
    n = wave.size
    return loglam, flux[None], np.ones((1, n)), np.zeros((1, n), int)


def test_zro_and_c2_bandheads():
    """S stars (ZrO 6474, red-degraded) and carbon stars (C2 5165, violet-degraded)."""
    names = list(INDEX_NAMES)
    iz, ic = names.index("idx_zro"), names.index("idx_c2")
    flat = _band_spectrum(6474.0, 0.0, 30.0, to_red=True)
    out, _ = measure_indices(*flat, [0.0])
    assert out[0, iz] == pytest.approx(1.0) and out[0, ic] == pytest.approx(1.0)
    s_star = _band_spectrum(6474.0, 0.4, 40.0, to_red=True)
    out, _ = measure_indices(*s_star, [0.0])
    assert out[0, iz] < 0.8
    assert out[0, ic] == pytest.approx(1.0)
    c_star = _band_spectrum(5165.0, 0.6, 60.0, to_red=False)
    out, _ = measure_indices(*c_star, [0.0])
    assert out[0, ic] < 0.7
    # a red-degraded band at 5167 (TiO in M stars) pushes the C2 index the other way
    tio = _band_spectrum(5167.0, 0.4, 60.0, to_red=True)
    out, _ = measure_indices(*tio, [0.0])
    assert out[0, ic] > 1.1
    # the same through the reference
    bt = band_table()
    for spec in (s_star, c_star, tio):
        ref, _ = indices_ref(spec[0], spec[1][0], spec[2][0], spec[3][0], 0.0, bt)
        got, _ = measure_indices(*spec, [0.0])
        np.testing.assert_allclose(got[0], ref, rtol=1e-10, atol=1e-10, equal_nan=True)


def test_zro_c2_of_simulated_m_stars(sim_m):
    """Normal M stars sit well above the S / C thresholds of mspec.scm at useful S/N."""
    from mspec.scm import C2_MAX, C2_MIN_SNR, ZRO_MAX, ZRO_MIN_SNR

    out = spectral_indices(sim_m, merge=False)
    zro, c2 = out["idx_zro"].values, out["idx_c2"].values
    okz = sim_m["snr_r"].values >= ZRO_MIN_SNR
    okc = sim_m["snr_g"].values >= C2_MIN_SNR
    assert okz.sum() > 50 and okc.sum() > 20
    assert np.all(zro[okz][np.isfinite(zro[okz])] > ZRO_MAX)
    assert np.all(c2[okc][np.isfinite(c2[okc])] > C2_MAX)
    assert np.nanmedian(c2) > 1.0  # TiO / Mg b redward of 5165
