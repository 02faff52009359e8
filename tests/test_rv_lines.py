"""Line-by-line RVs, DSAL I, DSAL II, Hα EW and DSEL (mspec.rv.lines; issue 13)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from mspec.rv import lines_kernels as K
from mspec.rv.lines import line_rvs, lines_arrays
from mspec.rv.lines_reference import clip_1sigma_ref, dsal1_ref, lines_spectrum_ref
from mspec.stage import STAGES, MergeWarning
from mspec.testing import raise_if_computes
from mspec.variables import C_KMS, DLOGLAM, LOGLAM0, NPIX, VariableError, loglam_grid, validate

LOGLAM = loglam_grid()
WAVE = 10.0**LOGLAM
NAMES, LW, SIGN, KIND = K.line_table()
ABS = SIGN < 0
EM = SIGN > 0
IDX = {n: i for i, n in enumerate(NAMES)}

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
DR7 = DATA / "lamost_dr7_mdwarfs"


def _gauss(center, depth):
    sig = center / (2.3548200450309493 * 1800.0)
    return depth * np.exp(-0.5 * ((WAVE - center) / sig) ** 2)


def make_spectra(rv, *, shifts=None, snr=50.0, emission=None, seed=0, depth=40.0):
    """Synthetic spectra: sloped continuum (100 at 7000 Å) with Gaussian absorption lines at
    the DSAL lines (``depth``, R = 1800) shifted by ``rv`` (+ per-line ``shifts``, km/s);
    ``emission[k]`` True adds emission at the DSEL lines below 8000 Å (Hα strongest)."""
    rv = np.atleast_1d(np.asarray(rv, dtype=np.float64))
    n = rv.size
    rng = np.random.default_rng(seed)
    emission = np.zeros(n, bool) if emission is None else np.broadcast_to(emission, (n,))
    flux = np.empty((n, NPIX))
    for k in range(n):
        f = 100.0 * (1.0 + 0.1 * (WAVE - 7000.0) / 2000.0)
        for j in np.flatnonzero(ABS):
            v = rv[k] + (0.0 if shifts is None else shifts[k, j])
            f = f - _gauss(LW[j] * (1 + v / C_KMS), depth)
        if emission[k]:
            for j in np.flatnonzero(EM & (LW < 8000)):
                amp = 120.0 if NAMES[j].startswith("Halpha") else 50.0
                f = f + _gauss(LW[j] * (1 + rv[k] / C_KMS), amp)
        flux[k] = f
    sigma = 100.0 / snr
    ivar = np.full((n, NPIX), 1.0 / sigma**2, np.float32)
    flux = (flux + rng.standard_normal(flux.shape) * sigma).astype(np.float32)
    return flux, ivar, np.zeros((n, NPIX), np.int32)


def as_dataset(flux, ivar, ormask, rv_init):
    n = flux.shape[0]
    return xr.Dataset(
        {
            "flux": (("spectra", "pixels"), flux),
            "ivar": (("spectra", "pixels"), ivar),
            "ormask": (("spectra", "pixels"), ormask),
            "rv_tm": ("spectra", np.asarray(rv_init, dtype=np.float64)),
        },
        coords={"obsid": ("spectra", np.arange(n, dtype=np.int64)), "loglam": ("pixels", LOGLAM)},
    )


@pytest.fixture(scope="module")
def mixed():
    """Eight spectra: various RVs, S/N, initial-RV errors; two with emission; one NaN rv."""
    rv = np.array([37.0, -120.0, 5.0, 250.0, -40.0, 80.0, 0.0, 12.0])
    flux, ivar, om = make_spectra(
        rv, snr=40.0, emission=np.array([0, 0, 1, 0, 0, 1, 0, 0], bool), seed=3
    )
    om[6, 2000:2400] = 1  # a masked stretch (no line there)
    rv_init = rv + np.array([5.0, -8.0, 0.0, 12.0, -3.0, 2.0, 0.0, np.nan])
    return as_dataset(flux, ivar, om, rv_init), rv


# --- kernel vs reference -------------------------------------------------------------------


def _compare(got, ref, k, strict=True):
    st_g, st_r = got["line_status"][k], ref["line_status"]
    if strict:  # same optimiser path: every status equal
        np.testing.assert_array_equal(st_g, st_r)
    # where either fit succeeded, both did and agree (with curve_fit, failure codes of windows
    # without a line may differ: the two optimisers can wander differently)
    either = (st_g == 0) | (st_r == 0)
    np.testing.assert_array_equal(st_g[either], st_r[either])
    np.testing.assert_allclose(got["rv_line"][k][either], ref["rv_line"][either], atol=1e-3)
    np.testing.assert_allclose(
        got["rv_line_err"][k][either], ref["rv_line_err"][either], atol=1e-3, rtol=1e-4
    )
    np.testing.assert_allclose(got["ew_halpha"][k], ref["ew_halpha"], rtol=1e-9, atol=1e-12)
    for key in ("rv_dsal1", "rv_dsal2", "rv_dsel"):
        assert got[f"{key}_n"][k] == ref[f"{key}_n"], key
        np.testing.assert_allclose(got[key][k], ref[key], atol=1e-3)
        np.testing.assert_allclose(got[f"{key}_err"][k], ref[f"{key}_err"], atol=1e-3)


def test_kernel_matches_reference(mixed):
    """|Δrv|, |Δerr| <= 1e-3 km/s and identical status for every successful fit."""
    ds, _ = mixed
    args = [ds[v].values for v in ("flux", "ivar", "ormask")]
    got = lines_arrays(*args, LOGLAM, ds.rv_tm.values)
    n_ok = 0
    for k in range(ds.sizes["spectra"]):
        ref = lines_spectrum_ref(*(a[k] for a in args), LOGLAM, float(ds.rv_tm[k]))
        _compare(got, ref, k)
        n_ok += int((ref["line_status"] == 0).sum())
    assert n_ok >= 7 * 8  # the absorption lines of every spectrum with an rv_init


def test_kernel_finds_the_curve_fit_optimum(mixed):
    """An independent optimiser (scipy curve_fit, MINPACK) reaches the same fits."""
    ds, _ = mixed
    args = [ds[v].values for v in ("flux", "ivar", "ormask")]
    got = lines_arrays(*args, LOGLAM, ds.rv_tm.values)
    for k in range(ds.sizes["spectra"]):
        ref = lines_spectrum_ref(
            *(a[k] for a in args), LOGLAM, float(ds.rv_tm[k]), optimizer="curve_fit"
        )
        _compare(got, ref, k, strict=False)


def test_kernel_matches_reference_low_snr_and_clipping():
    """Noisy spectra and a cosmic-ray spike (outlier passes active) agree too."""
    flux, ivar, om = make_spectra(np.zeros(6), snr=8.0, seed=11)
    j = IDX["CaII_8544"]
    i = np.searchsorted(WAVE, LW[j] + 6.0)
    flux[:, i] += 400.0
    got = lines_arrays(flux, ivar, om, LOGLAM, np.zeros(6))
    for k in range(6):
        _compare(got, lines_spectrum_ref(flux[k], ivar[k], om[k], LOGLAM, 0.0), k)


def test_dsal_rules_kernel_equals_reference_random():
    rng = np.random.default_rng(0)
    for _ in range(300):
        n = int(rng.integers(0, 9))
        v = np.round(rng.standard_cauchy(n) * 30.0, 1)
        e = rng.uniform(1.0, 20.0, n)
        for a, b in ((K.dsal1(v, e, 3.0, 15.0, 3), dsal1_ref(v, e)),):
            assert a[2] == b[2]
            np.testing.assert_allclose(a[:2], b[:2], rtol=1e-12, atol=1e-9)
        a, b = K.clip_1sigma(v, e, 20.0), clip_1sigma_ref(v, e)
        assert a[2] == b[2]
        np.testing.assert_allclose(a[:2], b[:2], rtol=1e-12, atol=1e-9)


# --- DSAL I / DSAL II rules on hand-made values ----------------------------------------------


@pytest.mark.parametrize("impl", ["numba", "numpy"])
def test_dsal2_clipping_rule(impl):
    clip = K.clip_1sigma if impl == "numba" else clip_1sigma_ref

    def run(v, e=None):
        v = np.asarray(v, dtype=np.float64)
        return clip(v, np.full(v.size, 5.0) if e is None else np.asarray(e, float), 20.0)

    # one iteration removes the outlier, then std < 20
    m, s, n = run([10.0, 12.0, 11.0, 100.0])
    assert n == 3 and m == pytest.approx(11.0) and s == pytest.approx(np.std([10, 12, 11]))
    # already tight: no clipping
    assert run([1.0, 2.0, 3.0])[2] == 3
    # two values 50 apart: both within 1σ, nothing to clip -> stop with both (std >= 20)
    m, s, n = run([0.0, 50.0])
    assert (m, s, n) == (25.0, 25.0, 2)
    # one clip step would leave a single value -> previous iteration's values
    m, s, n = run([-87.0, 82.0, 305.0])
    assert n == 3 and m == pytest.approx(100.0) and s == pytest.approx(np.std([-87, 82, 305]))
    # two successful iterations, then "fewer than two left" -> the second iteration's values
    v = [-22.0, 45.0, -644.0, -5.0, 66.0, -24.0, 32.0, -66.0]
    m, s, n = run(v)
    assert n == 3 and m == pytest.approx(np.mean([-22, -5, 32]))
    # a single value: itself, its fit error; none: NaN
    assert run([7.0], [2.5]) == (7.0, 2.5, 1)
    m, s, n = run([])
    assert math.isnan(m) and math.isnan(s) and n == 0


@pytest.mark.parametrize("impl", ["numba", "numpy"])
def test_dsal1_consistency_rule(impl):
    d1 = (lambda v, e: K.dsal1(v, e, 3.0, 15.0, 3)) if impl == "numba" else dsal1_ref
    v = np.array([10.0, 14.0, 8.0, 60.0, -30.0])
    e = np.array([2.0, 2.0, 2.0, 2.0, 20.0])  # -30 is 40 from the median but 3σ = 60
    m, s, n = d1(v, e)
    assert n == 4 and m == pytest.approx(np.mean([10, 14, 8, -30]))
    m, s, n = d1(v[:2], e[:2])  # two lines: no DSAL I
    assert math.isnan(m) and n == 2
    m, s, n = d1(np.array([0.0, 100.0, 200.0]), np.ones(3))  # inconsistent
    assert math.isnan(m) and n == 1


# --- truth recovery --------------------------------------------------------------------------


def test_known_per_line_shifts_recovered():
    """Each absorption line gets its own shift; fits recover it with honest errors."""
    rng = np.random.default_rng(7)
    n = 30
    rv = rng.uniform(-200, 200, n)
    shifts = np.zeros((n, LW.size))
    shifts[:, ABS] = rng.uniform(-40, 40, (n, ABS.sum()))
    flux, ivar, om = make_spectra(rv, shifts=shifts, snr=40.0, seed=8)
    rv_init = rv + rng.normal(0, 10, n)
    out = lines_arrays(flux, ivar, om, LOGLAM, rv_init)
    st = out["line_status"][:, ABS]
    assert (st == 0).all()
    truth = (rv[:, None] + shifts)[:, ABS]
    pull = (out["rv_line"][:, ABS] - truth) / out["rv_line_err"][:, ABS]
    assert abs(pull.mean()) < 0.25
    assert 0.7 < pull.std() < 1.3
    assert np.abs(out["rv_line"][:, ABS] - truth).max() < 6 * out["rv_line_err"][:, ABS].max()


def test_dsal_recovers_rv(mixed):
    ds, rv = mixed
    out = line_rvs(ds, merge=False).compute()
    ok = np.isfinite(ds.rv_tm.values)
    d1 = out.rv_dsal1.values[ok] - rv[ok]
    d2 = out.rv_dsal2.values[ok] - rv[ok]
    assert (out.rv_dsal1_n.values[ok] >= 7).all()
    assert np.abs(d1).max() < 5.0 and np.abs(d2).max() < 5.0
    assert (out.rv_dsal1_err.values[ok] < 10).all()
    # no initial RV: status 1 everywhere, NaN results
    assert (out.line_status.values[~ok] == K.STATUS_NO_RV_INIT).all()
    assert np.isnan(out.rv_dsal1.values[~ok]).all() and np.isnan(out.ew_halpha.values[~ok]).all()
    assert (out.rv_dsal1_n.values[~ok] == 0).all()


def test_emission_spectrum_gives_dsel(mixed):
    ds, rv = mixed
    out = line_rvs(ds, merge=False).compute()
    em = np.array([0, 0, 1, 0, 0, 1, 0, 0], bool)
    ew = out.ew_halpha.values
    assert (ew[em] < -2.0).all()
    assert (np.abs(ew[~em & np.isfinite(ew)]) < 0.5).all()
    assert (np.abs(out.rv_dsel.values[em] - rv[em]) < 5.0).all()
    assert (out.rv_dsel_n.values[em] >= 4).all()
    assert np.isnan(out.rv_dsel.values[~em]).all() and (out.rv_dsel_n.values[~em] == 0).all()
    st = out.line_status.values
    assert (st[np.ix_(em, EM & (LW < 8000))] == 0).all()
    # Ca II in absorption: the emission fits see the wrong sign
    ca_em = [IDX[n] for n in ("CaII_8500_em", "CaII_8544_em", "CaII_8665_em")]
    assert (st[:, ca_em][np.isfinite(ds.rv_tm.values)] == K.STATUS_WRONG_SIGN).all()


# --- bad lines -------------------------------------------------------------------------------


def test_injected_bad_lines_flagged_or_clipped():
    rv = np.full(4, 30.0)
    flux, ivar, om = make_spectra(rv, snr=60.0, seed=21)
    # 0: the whole K I 7667 window masked -> no data; 1: its line core masked -> too few pixels
    lam_c = LW[IDX["KI_7667"]] * (1 + 30.0 / C_KMS)
    om[0, np.abs(WAVE - lam_c) <= 26.0] = 1
    om[1, np.abs(WAVE - lam_c) <= 4.0] = 4
    # 2: a blend: a strong extra line 3.5 Å red of Ti I 8437 pulls its centre
    lam_ti = LW[IDX["TiI_8437"]] * (1 + 30.0 / C_KMS)
    flux[2] -= _gauss(lam_ti + 3.5, 60.0).astype(np.float32)
    # 3: a cosmic-ray spike (not in ormask) 2 pixels from the Ca II 8544 centre
    lam_ca = LW[IDX["CaII_8544"]] * (1 + 30.0 / C_KMS)
    flux[3, np.searchsorted(WAVE, lam_ca) + 2] += 2000.0
    out = lines_arrays(flux, ivar, om, LOGLAM, rv)
    st, v, e = out["line_status"], out["rv_line"], out["rv_line_err"]
    assert st[0, IDX["KI_7667"]] == K.STATUS_NO_DATA
    assert st[1, IDX["KI_7667"]] == K.STATUS_FEW_PIXELS
    # the blended line is off by > 50 km/s (or flagged) and both DSAL methods drop it
    j = IDX["TiI_8437"]
    assert st[2, j] != 0 or abs(v[2, j] - 30.0) > 50.0
    assert out["rv_dsal1_n"][2] == 7 and out["rv_dsal2_n"][2] == 7
    # the spike is rejected by the outlier pass: the Ca II 8544 RV is still right
    j = IDX["CaII_8544"]
    assert st[3, j] != 0 or abs(v[3, j] - 30.0) < 4 * e[3, j]
    for k in range(4):
        assert abs(out["rv_dsal1"][k] - 30.0) < 4.0
        assert abs(out["rv_dsal2"][k] - 30.0) < 4.0
    assert out["rv_dsal1_n"][0] == 7 and out["rv_dsal1_n"][1] == 7


def test_spike_without_clipping_hurts():
    """The outlier pass matters: without it the spike shifts the line."""
    rv = np.zeros(1)
    flux, ivar, om = make_spectra(rv, snr=60.0, seed=22)
    j = IDX["CaII_8544"]
    flux[0, np.searchsorted(WAVE, LW[j]) + 2] += 2000.0
    ds = as_dataset(flux, ivar, om, rv)
    a = line_rvs(ds, merge=False).compute()
    b = line_rvs(ds, n_clip=0, merge=False).compute()
    da_ = abs(float(a.rv_line[0, j]))
    db = abs(float(b.rv_line[0, j])) if int(b.line_status[0, j]) == 0 else np.inf
    assert da_ < 10.0 and db > 2 * da_


# --- the xarray wrapper ----------------------------------------------------------------------


@pytest.mark.parametrize("chunks", [{"spectra": -1}, {"spectra": 3}, {"spectra": 7}])
def test_chunked_equals_unchunked_and_lazy(mixed, chunks):
    ds, _ = mixed
    eager = line_rvs(ds, merge=False)
    with raise_if_computes():
        lazy = line_rvs(ds.chunk(chunks), merge=False)
        # rv_init as a lazy DataArray, chunked differently from the spectra
        lazy2 = line_rvs(ds.chunk(chunks), rv_init=ds.rv_tm.chunk({"spectra": 2}), merge=False)
        # numpy spectra, lazy rv_init: lazy too
        lazy3 = line_rvs(ds, rv_init=ds.rv_tm.chunk({"spectra": 4}), merge=False)
    assert lazy["rv_dsal1"].chunks is not None and lazy["rv_line"].chunks is not None
    assert lazy3["rv_dsal1"].chunks is not None
    xr.testing.assert_identical(eager.drop_attrs(), lazy3.compute().drop_attrs())
    xr.testing.assert_identical(eager, lazy.compute())
    xr.testing.assert_identical(eager.drop_attrs(), lazy2.compute().drop_attrs())


def test_zarr_store_lazy(mixed, tmp_path):
    """A Zarr store opened lazily (dask loglam too) gives the in-memory results."""
    ds, _ = mixed
    ds.chunk({"spectra": 3}).to_zarr(tmp_path / "s.zarr", zarr_format=3, consolidated=False)
    store = xr.open_zarr(tmp_path / "s.zarr", consolidated=False)
    with raise_if_computes():
        lazy = line_rvs(store, merge=False)
    xr.testing.assert_identical(line_rvs(ds, merge=False), lazy.compute())


def test_outputs_registry_and_flags(mixed):
    ds, _ = mixed
    out = line_rvs(ds, merge=False)
    validate(out, check_units=True)
    assert set(out.data_vars) == set(line_rvs.stage.outputs)
    assert out.line_status.dtype == np.int8 and out.rv_dsal1_n.dtype == np.int8
    assert out.rv_line.dims == ("spectra", "lines")
    assert list(out.lines.values[:2]) == ["KI_7667", "KI_7701"]
    assert out.line_wavelength.attrs["units"] == "Angstrom"
    assert out.line_wavelength.values[0] == 7667.0089
    fl = out.line_status.attrs
    np.testing.assert_array_equal(fl["flag_values"], np.arange(9, dtype=np.int8))
    assert fl["flag_meanings"].split()[0] == "ok" and len(fl["flag_meanings"].split()) == 9
    assert STAGES["line_rvs"].module == "RVMM"
    assert "obsid" in out.coords


def test_merge_true_false(mixed):
    ds, _ = mixed
    merged = line_rvs(ds)
    assert "flux" in merged and "rv_dsal2" in merged and "lines" in merged.coords
    alone = line_rvs(ds, merge=False)
    assert "flux" not in alone and "rv_dsal2" in alone
    with pytest.warns(MergeWarning):
        line_rvs(merged)
    with pytest.raises(TypeError, match="merge"):
        line_rvs(ds, merge="yes")


@pytest.mark.parametrize("lazy", [False, True])
def test_empty_input(mixed, lazy):
    ds, _ = mixed
    empty = ds.isel(spectra=slice(0, 0))
    if lazy:
        empty = empty.chunk({"spectra": 1})
    out = line_rvs(empty, merge=False).compute()
    assert out.sizes["spectra"] == 0 and out.sizes["lines"] == LW.size
    assert out.rv_line.shape == (0, LW.size) and out.rv_dsel.shape == (0,)


def test_bad_arguments(mixed):
    ds, _ = mixed
    with pytest.raises(ValueError, match="rv_init"):
        line_rvs(ds, rv_init="rv_nope")
    with pytest.raises(TypeError, match="rv_init"):
        line_rvs(ds, rv_init=np.zeros(ds.sizes["spectra"]))
    with pytest.raises(ValueError, match="rv_init"):
        line_rvs(ds, rv_init=ds.rv_tm.isel(spectra=slice(0, 3)))
    with pytest.raises(ValueError, match="rv_init"):
        line_rvs(ds, rv_init=ds.flux)
    with pytest.raises(ValueError, match="half_window"):
        line_rvs(ds, half_window=-1.0)
    with pytest.raises(ValueError, match="min_pixels"):
        line_rvs(ds, min_pixels=2)
    with pytest.raises(ValueError, match="n_clip"):
        line_rvs(ds, n_clip=1.5)
    with pytest.raises(ValueError, match="pixels"):
        line_rvs(ds.chunk({"pixels": 1000}))
    with pytest.raises(VariableError, match="ivar"):
        line_rvs(ds.drop_vars("ivar"))
    with pytest.raises(TypeError, match="ds"):
        line_rvs(ds.flux)
    with pytest.raises(ValueError, match="lines"):
        K.line_table([("a", 5000.0, "absorption"), ("a", 6000.0, "emission")])
    f, iv, om = (ds[v].values for v in ("flux", "ivar", "ormask"))
    with pytest.raises(ValueError, match="rv_init"):
        lines_arrays(f, iv, om, LOGLAM, np.zeros(3))
    with pytest.raises(ValueError, match="ivar"):
        lines_arrays(f, iv[:2], om, LOGLAM, ds.rv_tm.values)
    with pytest.raises(ValueError, match="loglam"):
        lines_arrays(f, iv, om, LOGLAM[:-1], ds.rv_tm.values)


# --- real LAMOST DR7 M dwarfs ------------------------------------------------------------------


def read_dr7() -> xr.Dataset:
    """The DR7 image-layout files on the shared grid (as tests/test_rv_realdata.py)."""
    from astropy.io import fits

    files = sorted(DR7.glob("spec-*.fits"))
    n = len(files)
    flux = np.full((n, NPIX), np.nan, np.float32)
    ivar = np.zeros((n, NPIX), np.float32)
    ormask = np.ones((n, NPIX), np.int32)
    rv = np.full(n, np.nan)
    obsid = np.zeros(n, np.int64)
    for k, f in enumerate(files):
        with fits.open(f) as h:
            d = np.asarray(h[0].data, dtype=np.float64)
            hdr = h[0].header
        i0 = int(round((np.log10(d[2, 0]) - LOGLAM0) / DLOGLAM))
        m = d.shape[1]
        flux[k, i0 : i0 + m] = d[0]
        ivar[k, i0 : i0 + m] = d[1]
        ormask[k, i0 : i0 + m] = d[4]
        rv[k] = np.nan if hdr["Z"] == -9999 else hdr["Z"] * C_KMS
        obsid[k] = hdr["OBSID"]
    return xr.Dataset(
        {
            "flux": (("spectra", "pixels"), flux),
            "ivar": (("spectra", "pixels"), ivar),
            "ormask": (("spectra", "pixels"), ormask),
            "lamost_rv": ("spectra", rv),
        },
        coords={"obsid": ("spectra", obsid), "loglam": ("pixels", LOGLAM)},
    )


def _robust(d):
    d = d[np.isfinite(d)]
    med = np.median(d)
    return med, 1.4826 * np.median(np.abs(d - med)), d.size


@pytest.fixture(scope="module")
def dr7_tm():
    from mspec.rv import pyhammer_templates, template_match

    ds = read_dr7()
    tm = template_match(ds, templates=pyhammer_templates("M*"), shifts=np.arange(-500, 501, 50))
    return ds.assign(rv_tm=tm["rv_tm"].compute())


@pytest.mark.realdata
@pytest.mark.skipif(not DR7.is_dir(), reason="../shared/data/lamost_dr7_mdwarfs missing")
def test_dsal_vs_tm_real(dr7_tm, capsys):
    """DR7 M dwarfs: DSAL I against TM, robust σ (1.4826 MAD) <= 7 km/s."""
    out = line_rvs(dr7_tm, merge=False).compute()
    tm, lam = dr7_tm.rv_tm.values, dr7_tm.lamost_rv.values
    med1, sig1, n1 = _robust(out.rv_dsal1.values - tm)
    med2, sig2, n2 = _robust(out.rv_dsal2.values - tm)
    _, sig1l, _ = _robust(out.rv_dsal1.values - lam)
    with capsys.disabled():
        print(
            f"\nDR7: DSAL I - TM median {med1:.2f} robust sigma {sig1:.2f} km/s (n={n1}); "
            f"DSAL II - TM {med2:.2f} / {sig2:.2f} (n={n2}); DSAL I - LAMOST sigma {sig1l:.2f}"
        )
    assert n1 >= 0.85 * dr7_tm.sizes["spectra"]
    assert sig1 <= 7.0 and abs(med1) <= 5.0
    assert sig2 <= 7.0 and n2 >= n1
    # active stars: DSEL near TM (Hα systematically ~-10 km/s here)
    em = np.isfinite(out.rv_dsel.values)
    assert em.sum() >= 5
    assert (out.ew_halpha.values[em] < -0.75).all()
    assert np.abs(out.rv_dsel.values[em] - tm[em]).max() < 30.0


@pytest.mark.realdata
@pytest.mark.skipif(not DR7.is_dir(), reason="../shared/data/lamost_dr7_mdwarfs missing")
def test_kernel_matches_reference_real(dr7_tm):
    """Every DR7 spectrum: same statuses, |Δrv|, |Δerr| <= 1e-3 km/s, same DSAL/DSEL."""
    ds = dr7_tm
    args = [ds[v].values for v in ("flux", "ivar", "ormask")]
    got = lines_arrays(*args, LOGLAM, ds.rv_tm.values)
    for k in range(ds.sizes["spectra"]):
        ref = lines_spectrum_ref(*(a[k] for a in args), LOGLAM, float(ds.rv_tm[k]))
        _compare(got, ref, k)
