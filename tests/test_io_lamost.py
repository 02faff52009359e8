"""LAMOST FITS readers/writer: real files of every layout, round trips, resampling, bad files."""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
from astropy.io import fits

from mspec.io.lamost import (
    MASK_NODATA,
    META_VARIABLES,
    ON_GRID_TOL,
    BadFileError,
    derived_obsid,
    input_catalog_magnitudes,
    read_lamost,
    read_spectrum,
    write_lamost_fits,
)
from mspec.variables import C_KMS, DLOGLAM, LOGLAM0, NPIX, loglam_grid, validate

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
REAL = sorted(DATA.glob("lamost_*/*.fits*"))
needs_data = pytest.mark.skipif(not REAL, reason="../shared/data not available")


# --------------------------------------------------------------------------- toy surveys


def toy_survey(n: int = 12, seed: int = 0, extras: bool = True) -> xr.Dataset:
    """A small registry-conforming survey built by hand (partial coverage, masks, NaN Z)."""
    rng = np.random.default_rng(seed)
    grid = loglam_grid()
    flux = np.full((n, NPIX), np.nan, np.float32)
    ivar = np.zeros((n, NPIX), np.float32)
    andm = np.full((n, NPIX), MASK_NODATA, np.int32)
    orm = np.full((n, NPIX), MASK_NODATA, np.int32)
    for i in range(n):
        lo = int(rng.integers(0, 12))
        hi = NPIX - int(rng.integers(0, 12))
        m = hi - lo
        f = 100 + 50 * np.sin(grid[lo:hi] * 300 + i) + rng.normal(0, 3, m)
        flux[i, lo:hi] = f
        ivar[i, lo:hi] = rng.uniform(0.05, 0.2, m)
        a = np.where(rng.random(m) < 0.02, rng.choice([1, 2, 4, 8, 16, 32], m), 0)
        o = a | np.where(rng.random(m) < 0.05, 4, 0)
        andm[i, lo:hi] = a
        orm[i, lo:hi] = o
        ivar[i, lo:hi][a > 0] = 0
    z = rng.normal(0, 2e-4, n)
    z[::5] = np.nan
    data = {
        "flux": (("spectra", "pixels"), flux),
        "ivar": (("spectra", "pixels"), ivar),
        "andmask": (("spectra", "pixels"), andm),
        "ormask": (("spectra", "pixels"), orm),
        "ra": ("spectra", rng.uniform(0, 360, n)),
        "dec": ("spectra", rng.uniform(-10, 60, n)),
        "mjd": ("spectra", rng.integers(55800, 58600, n).astype(np.int64)),
        "lamost_class": ("spectra", np.array(["STAR"] * n, dtype="U")),
        "lamost_subclass": ("spectra", np.array([f"M{i % 9}" for i in range(n)], dtype="U")),
        "lamost_z": ("spectra", z),
        "lamost_z_err": ("spectra", np.where(np.isnan(z), np.nan, 1e-5)),
        "lamost_rv": ("spectra", z * C_KMS),
        "file": (
            "spectra",
            np.array([f"spec-56000-TOY{seed}_sp01-{i:03d}.fits" for i in range(n)]),
        ),
        "release": ("spectra", np.array(["LAMOST DR7"] * n, dtype="U")),
        "loglam_offset": ("spectra", np.zeros(n)),
        "resampled": ("spectra", np.zeros(n, bool)),
    }
    for b in "ugriz":
        data[f"snr_{b}"] = ("spectra", np.round(rng.uniform(1, 200, n), 2))
    if extras:
        data["true_teff"] = ("spectra", rng.uniform(2800, 4000, n))
        data["gaia_source_id"] = ("spectra", rng.integers(1, 2**62, n))
    obsid = (seed * 10_000_000 + 1000 + np.arange(n)).astype(np.int64)
    ds = xr.Dataset(data, coords={"obsid": ("spectra", obsid), "loglam": ("pixels", grid)})
    return validate(ds)


def assert_spectra_equal(got: xr.Dataset, want: xr.Dataset, names=None, skip=()):
    names = names or [
        v for v in want.variables if v not in skip and want[v].dims and want[v].dims[0] == "spectra"
    ]
    for name in names:
        g, w = np.asarray(got[name].values), np.asarray(want[name].values)
        if w.dtype.kind in "fc" and w.ndim == 1:
            # header cards hold 20 characters: ~14 significant digits
            np.testing.assert_allclose(g.astype(w.dtype), w, rtol=1e-12, atol=0, err_msg=name)
        elif w.dtype.kind in "fc":
            np.testing.assert_array_equal(g.astype(w.dtype), w, err_msg=name)
        else:
            np.testing.assert_array_equal(g, w, err_msg=name)


# --------------------------------------------------------------------------- real files


def _astropy_rows(path):
    """What astropy shows directly: (wavelength A, flux, ivar, andmask, ormask), header."""
    with fits.open(path) as h:
        hdr = h[0].header
        if h[0].data is None:
            row = h[1].data[0]
            cols = [
                np.asarray(row[c], dtype=np.float64)
                for c in ("WAVELENGTH", "FLUX", "IVAR", "ANDMASK", "ORMASK")
            ]
            return cols, hdr
        d = np.asarray(h[0].data, dtype=np.float64)
        if "Subcontinuum" in hdr.get("EXTEN0", ""):
            wave = 10 ** (hdr["COEFF0"] + hdr["COEFF1"] * np.arange(d.shape[1]))
        else:
            wave = d[2]
        return [wave, d[0], d[1], d[3], d[4]], hdr


@needs_data
@pytest.mark.realdata
@pytest.mark.parametrize("path", REAL, ids=[p.name for p in REAL])
def test_real_file_equals_astropy(path):
    ds = read_lamost(path)
    validate(ds)
    s = ds.isel(spectra=0)
    (wave, flux, ivar, andm, orm), hdr = _astropy_rows(path)
    n = flux.size
    i0 = int(np.rint((np.log10(wave[0]) - LOGLAM0) / DLOGLAM))
    assert i0 == 0  # every shared file starts on 3.5682
    sl = slice(i0, i0 + n)
    # stored wavelengths sit on the grid pixels they were placed at (float32 jitter only)
    assert np.max(np.abs(np.log10(wave) - s.loglam.values[sl])) < ON_GRID_TOL * DLOGLAM
    np.testing.assert_array_equal(s.flux.values[sl], flux.astype(np.float32))
    np.testing.assert_array_equal(s.ivar.values[sl], ivar.astype(np.float32))
    np.testing.assert_array_equal(s.andmask.values[sl], andm.astype(np.int32))
    np.testing.assert_array_equal(s.ormask.values[sl], orm.astype(np.int32))
    # padding beyond the file
    assert np.all(np.isnan(s.flux.values[i0 + n :]))
    assert np.all(s.ivar.values[i0 + n :] == 0)
    assert np.all(s.andmask.values[i0 + n :] == MASK_NODATA)
    assert not bool(s.resampled) and float(s.loglam_offset) == 0.0
    # header metadata
    assert float(s.ra) == hdr["RA"] and float(s.dec) == hdr["DEC"]
    assert int(s.mjd) == hdr["MJD"]
    assert str(s.lamost_class.values) == hdr["CLASS"].strip()
    assert str(s.lamost_subclass.values) == hdr["SUBCLASS"].strip()
    z = hdr["Z"]
    if z == -9999:
        assert np.isnan(float(s.lamost_z)) and np.isnan(float(s.lamost_rv))
    else:
        assert float(s.lamost_z) == z
        assert float(s.lamost_rv) == pytest.approx(z * C_KMS)
    for b in "ugriz":
        key = f"SNR{b.upper()}" if f"SNR{b.upper()}" in hdr else f"SN_{b.upper()}"
        assert float(s[f"snr_{b}"]) == hdr[key]
    assert str(s.file.values) == path.name
    if "OBSID" in hdr:
        assert int(s.obsid) == hdr["OBSID"]
        assert str(s.release.values) == hdr["DATA_V"].strip()
    else:
        assert int(s.obsid) < 0
        assert str(s.release.values) in ("LAMOST DR1", "LAMOST DR2")


@needs_data
@pytest.mark.realdata
def test_layouts_detected_from_content(tmp_path):
    layouts = {p.name: read_lamost(p).attrs["layout"] for p in REAL}
    assert {layouts[p.name] for p in (DATA / "lamost_dr1").glob("*.fits")} == {"oldest"}
    assert layouts["spec-55939-B5593905_sp01-018.fits"] == "oldest"
    assert layouts["spec-55916-B5591606_sp01-001.fits"] == "image"  # float64
    assert {layouts[p.name] for p in (DATA / "lamost_dr7_mdwarfs").glob("*.fits")} == {"image"}
    assert layouts["spec-55859-F5902_sp01-013_dr8.fits.gz"] == "table"
    # a misleading name changes nothing
    src = DATA / "lamost_dr1" / "spec-55862-B6212_sp06-003.fits"
    shutil.copy(src, tmp_path / "spec-dr9-table.fits")
    assert read_lamost(tmp_path / "spec-dr9-table.fits").attrs["layout"] == "oldest"


@needs_data
@pytest.mark.realdata
def test_release_and_failed_pipeline():
    ds = read_lamost(DATA / "lamost_dr2" / "spec-55919-B5591903_sp01-001.fits")
    assert str(ds.lamost_class.values[0]) == "Unknown"
    assert np.isnan(ds.lamost_z.values[0]) and np.isnan(ds.lamost_z_err.values[0])
    assert np.isnan(ds.lamost_rv.values[0])
    assert ds.release.values[0] == "LAMOST DR2"
    ds9 = read_lamost(DATA / "lamost_dr9plus" / "spec-55859-F5902_sp01-013_dr8.fits.gz")
    assert ds9.release.values[0] == "LAMOST DR9" and int(ds9.obsid[0]) == 101013


@needs_data
@pytest.mark.realdata
def test_derived_obsid_stable_unique(tmp_path):
    old = sorted((DATA / "lamost_dr1").glob("*.fits")) + [
        DATA / "lamost_dr2" / "spec-55939-B5593905_sp01-018.fits",
        DATA / "lamost_dr2" / "spec-55916-B5591606_sp01-001.fits",
        DATA / "lamost_dr2" / "spec-55919-B5591903_sp01-001.fits",
    ]
    ids = [int(read_lamost(p).obsid[0]) for p in old]
    assert len(set(ids)) == len(ids) and all(i < 0 for i in ids)
    # independent of the directory and of the process: the same file elsewhere, same id
    dst = tmp_path / "elsewhere" / old[0].name
    dst.parent.mkdir()
    shutil.copy(old[0], dst)
    assert int(read_lamost(dst).obsid[0]) == ids[0]
    hdr = fits.getheader(old[0])
    assert derived_obsid(hdr, "x") == ids[0]
    assert ids[0] == -335271258162900468  # pinned: must never change between versions
    # a catalogue obsid wins over the derived one
    assert int(read_lamost(old[0], defaults={"obsid": 906003}).obsid[0]) == 906003


@needs_data
@pytest.mark.realdata
def test_gzipped_equals_plain(tmp_path):
    src = DATA / "lamost_dr7_mdwarfs" / "spec-56596-HD215229N284736V01_sp06-187.fits"
    gz = tmp_path / (src.name + ".gz")
    gz.write_bytes(gzip.compress(src.read_bytes()))
    a, b = read_lamost(src), read_lamost(gz)
    xr.testing.assert_identical(a.drop_vars("file"), b.drop_vars("file"))
    assert b.file.values[0] == gz.name


# --------------------------------------------------------------------------- writer round trip


@pytest.mark.parametrize("layout", ["image", "oldest", "table"])
@pytest.mark.parametrize("gz", [False, True])
def test_write_read_round_trip(tmp_path, layout, gz):
    ds = toy_survey(4, seed=1, extras=False)
    paths = write_lamost_fits(ds, tmp_path, layout=layout, gzip=gz, catalog=None)
    assert [p.name.endswith(".fits.gz" if gz else ".fits") for p in paths] == [True] * 4
    back = xr.concat([read_lamost(p) for p in paths], dim="spectra")
    assert [read_lamost(p).attrs["layout"] for p in paths[:1]] == [layout]
    skip = ("file",) + (("release", "obsid") if layout == "oldest" else ())
    assert_spectra_equal(back, ds, skip=skip)
    if layout == "oldest":  # no OBSID card: derived ids, release from VERSPIPE
        assert np.all(back.obsid.values < 0)
        assert set(back.release.values) == {"LAMOST DR1"}
    else:
        np.testing.assert_array_equal(back.obsid.values, ds.obsid.values)
    assert [str(f) for f in back.file.values] == [p.name for p in paths]
    # the real-layout structure, as astropy shows it
    with fits.open(paths[0]) as h:
        if layout == "table":
            assert h[0].data is None and h[1].name == "COADD"
            assert set(h[1].columns.names) >= {"FLUX", "IVAR", "WAVELENGTH", "ANDMASK", "ORMASK"}
        else:
            assert h[0].data.shape[0] == 5
            assert ("OBSID" in h[0].header) == (layout == "image")


def test_write_catalog_restores_everything(tmp_path):
    ds = toy_survey(3, seed=2)
    write_lamost_fits(ds, tmp_path, layout="oldest", catalog="cat.csv")
    import pandas as pd

    cat = pd.read_csv(tmp_path / "cat.csv")
    assert list(cat["obsid"]) == list(ds.obsid.values)
    assert {"true_teff", "gaia_source_id", "release", "file"} <= set(cat.columns)
    row = cat.iloc[0].to_dict()
    back = read_lamost(tmp_path / row["file"], defaults=row)
    assert int(back.obsid[0]) == int(ds.obsid[0])
    assert back.release.values[0] == "LAMOST DR7"
    assert float(back.true_teff[0]) == pytest.approx(float(ds.true_teff[0]))


def test_read_bad_arguments(tmp_path):
    with pytest.raises(TypeError, match="path"):
        read_lamost(3)
    with pytest.raises(TypeError, match="defaults"):
        read_lamost(tmp_path / "x.fits", defaults=[1, 2])
    with pytest.raises(BadFileError, match="not_found"):
        read_lamost(tmp_path / "missing.fits")


def test_write_bad_arguments(tmp_path):
    ds = toy_survey(2)
    with pytest.raises(TypeError, match="ds"):
        write_lamost_fits(ds.flux, tmp_path)
    with pytest.raises(TypeError, match="directory"):
        write_lamost_fits(ds, 5)
    with pytest.raises(TypeError, match="gzip"):
        write_lamost_fits(ds, tmp_path, gzip="yes")
    with pytest.raises(ValueError, match="dims"):
        write_lamost_fits(ds.rename_dims(pixels="grid"), tmp_path)
    with pytest.raises(ValueError, match="layout"):
        write_lamost_fits(ds, tmp_path, layout="dr12")
    with pytest.raises(ValueError, match="ivar"):
        write_lamost_fits(ds.drop_vars("ivar"), tmp_path)
    with pytest.raises(ValueError, match="catalog"):
        write_lamost_fits(ds, tmp_path, catalog="cat.txt")
    dup = ds.copy()
    dup["file"] = ("spectra", np.array(["same.fits", "same.fits"]))
    with pytest.raises(ValueError, match="unique"):
        write_lamost_fits(dup, tmp_path)
    write_lamost_fits(ds, tmp_path / "a", catalog=None)
    with pytest.raises(FileExistsError):
        write_lamost_fits(ds, tmp_path / "a", catalog=None)
    write_lamost_fits(ds, tmp_path / "a", catalog=None, overwrite=True)


def test_missing_header_values_are_nan_or_empty(tmp_path):
    ds = toy_survey(1, extras=False)
    (path,) = write_lamost_fits(ds, tmp_path, catalog=None)
    with fits.open(path, mode="update") as h:
        for key in ("RA", "MJD", "CLASS", "SNRG", "DATA_V", "Z", "Z_ERR"):
            del h[0].header[key]
    s = read_lamost(path).isel(spectra=0)
    assert np.isnan(float(s.ra)) and int(s.mjd) == -1 and str(s.lamost_class.values) == ""
    assert np.isnan(float(s.snr_g)) and np.isnan(float(s.lamost_z))
    assert str(s.release.values) == ""  # VERSPIPE v2.9.7 maps to no release
    assert float(s.dec) == float(ds.dec[0])
    assert set(META_VARIABLES) <= set(s.variables)


def test_input_catalog_magnitudes():
    hdr = {"MAGTYPE": "ugrizFuvUv", "MAG1": 16.04, "MAG2": 13.38, "MAG3": 11.85, "MAG4": 99.0,
           "MAG5": 0.0, "MAG6": "nan", "MAG7": 18.21}  # fmt: skip
    assert input_catalog_magnitudes(hdr) == {"u": 16.04, "g": 13.38, "r": 11.85, "Uv": 18.21}
    hdr = {"MAGTYPE": "gribvjh", **{f"MAG{k}": 10.0 + k for k in range(1, 8)}}
    assert list(input_catalog_magnitudes(hdr)) == ["g", "r", "i", "b", "v", "j", "h"]
    assert input_catalog_magnitudes({"MAGTYPE": "Kp", "MAG1": 12.74, "MAG2": 99.0}) == {"Kp": 12.74}
    assert input_catalog_magnitudes({"MAG1": 12.0}) == {}
    assert input_catalog_magnitudes({"MAGTYPE": "gri", "MAG1": 12.0}) == {"g": 12.0}


@needs_data
def test_input_catalog_magnitudes_real():
    seen = set()
    for path in REAL:
        hdr = fits.getheader(path)
        mags = input_catalog_magnitudes(hdr)
        assert all(2.0 <= m <= 19.9 for m in mags.values())
        seen |= set(mags)
        if hdr.get("DESIG", "").strip() == "LAMOST J020228.24+103453.4":  # LiuChao, "gribvjh"
            assert mags == {"g": 13.07, "r": 11.66, "i": 10.5, "b": 13.79, "v": 12.2, "j": 8.4,
                            "h": 7.85}  # fmt: skip
    assert {"g", "r", "i"} <= seen


# --------------------------------------------------------------------------- off-grid files


def _shifted_file(tmp_path, shift_pix, step=DLOGLAM, layout="image"):
    ds = toy_survey(1, extras=False)
    n = NPIX
    loglam = LOGLAM0 + shift_pix * DLOGLAM + step * np.arange(n)
    # a spectrum linear in loglam: linear interpolation must reproduce it exactly
    flux = (50 + 1e4 * (loglam - LOGLAM0)).astype(np.float32)
    ds = ds.assign(flux=(("spectra", "pixels"), flux[None, :]))
    ds = ds.assign(ivar=(("spectra", "pixels"), np.full((1, n), 4.0, np.float32)))
    ds = ds.assign(andmask=(("spectra", "pixels"), np.zeros((1, n), np.int32)))
    orm = np.zeros((1, n), np.int32)
    orm[0, 100] = 8
    ds = ds.assign(ormask=(("spectra", "pixels"), orm))
    ds = ds.assign_coords(loglam=("pixels", loglam))
    (path,) = write_lamost_fits(ds, tmp_path, layout=layout, catalog=None)
    return path, loglam


@pytest.mark.parametrize("shift", [0.3, -0.02, 0.02, 0.5])
def test_off_grid_resampled_not_snapped(tmp_path, shift):
    path, loglam = _shifted_file(tmp_path, shift)
    s = read_lamost(path).isel(spectra=0)
    assert bool(s.resampled)
    assert float(s.loglam_offset) == pytest.approx(
        shift if abs(shift) < 0.5 else -0.5, abs=2e-3
    ) or (abs(float(s.loglam_offset)) == pytest.approx(0.5, abs=2e-3))
    grid = s.loglam.values
    inside = (grid >= loglam[0] - 1e-12) & (grid <= np.log10(10 ** loglam[-1]))
    good = np.isfinite(s.flux.values)
    want = 50 + 1e4 * (grid - LOGLAM0)
    np.testing.assert_allclose(s.flux.values[good], want[good], rtol=5e-6, atol=1e-3)
    assert good.sum() >= inside.sum() - 2
    # ivar: two equal-variance neighbours with weights (1-t, t): var = ((1-t)^2 + t^2) / 4
    t = (shift % 1.0) if shift > 0 else 1 + shift
    t = 1 - t
    expect = 4.0 / ((1 - t) ** 2 + t**2)
    mid = slice(200, 300)
    np.testing.assert_allclose(s.ivar.values[mid], expect, rtol=2e-3)
    # the masked file pixel 100 contaminates the grid pixels it contributes to
    assert np.count_nonzero(s.ormask.values[95:106] & 8) in (1, 2)


def test_tiny_float32_offset_stays_on_grid(tmp_path):
    path, _ = _shifted_file(tmp_path, 0.0011)  # like real DR7 files
    s = read_lamost(path).isel(spectra=0)
    assert not bool(s.resampled) and float(s.loglam_offset) == 0.0


def test_other_dispersion_resampled(tmp_path):
    path, loglam = _shifted_file(tmp_path, 0.0, step=1.0001e-4)
    s = read_lamost(path).isel(spectra=0)
    assert bool(s.resampled)
    good = np.isfinite(s.flux.values)
    np.testing.assert_allclose(
        s.flux.values[good], 50 + 1e4 * (s.loglam.values[good] - LOGLAM0), rtol=5e-6, atol=1e-3
    )


def test_resample_matches_numpy_interp(tmp_path):
    rng = np.random.default_rng(3)
    from mspec.io.lamost import _interp_to_grid

    x = np.cumsum(rng.uniform(0.5, 1.5, 50))
    f = rng.normal(size=50)
    iv = rng.uniform(0.5, 2, 50)
    m = np.zeros(50, np.int32)
    g = np.linspace(x[0], x[-1], 80)
    out_f, out_i, out_a, _ = _interp_to_grid(x, f, iv, m, m, g)
    np.testing.assert_allclose(out_f, np.interp(g, x, f), rtol=1e-5, atol=1e-6)
    # variance propagation, reference loop
    for k, gk in enumerate(g):
        j = min(np.searchsorted(x, gk, side="right") - 1, 48)
        t = (gk - x[j]) / (x[j + 1] - x[j])
        var = (1 - t) ** 2 / iv[j] + t**2 / iv[j + 1]
        assert out_i[k] == pytest.approx(1 / var, rel=1e-5)


# --------------------------------------------------------------------------- bad files


def _good_file(tmp_path, layout="image", gz=False):
    (p,) = write_lamost_fits(
        toy_survey(1, extras=False),
        tmp_path / layout,
        layout=layout,
        gzip=gz,
        catalog=None,
        overwrite=True,
    )
    return p


def make_bad_files(tmp_path: Path) -> dict[str, Path]:
    """One file per quarantine reason (code -> path)."""
    d = tmp_path / "bad"
    d.mkdir(parents=True, exist_ok=True)
    good = _good_file(tmp_path)
    out = {}
    raw = good.read_bytes()
    out["truncated"] = d / "spec-trunc.fits"
    out["truncated"].write_bytes(raw[: len(raw) // 2])
    gzgood = _good_file(tmp_path, "table", gz=True).read_bytes()
    out["truncated_gz"] = d / "spec-trunc.fits.gz"
    out["truncated_gz"].write_bytes(gzgood[: len(gzgood) // 2])
    out["not_fits"] = d / "spec-text.fits"
    out["not_fits"].write_text("this is not a FITS file\n" * 200)
    out["empty"] = d / "spec-empty.fits"
    out["empty"].write_bytes(b"")
    out["unknown_layout"] = d / "spec-1d.fits"
    fits.PrimaryHDU(np.ones(100, np.float32)).writeto(out["unknown_layout"])
    out["unknown_layout_table"] = d / "spec-tab.fits"
    fits.HDUList(
        [
            fits.PrimaryHDU(),
            fits.BinTableHDU.from_columns([fits.Column(name="X", format="E", array=np.ones(3))]),
        ]
    ).writeto(out["unknown_layout_table"])
    with fits.open(good) as h:
        data = h[0].data.copy()
        hdr = h[0].header
        w = data.copy()
        w[2] = w[2][::-1]
        out["wavelength_not_increasing"] = d / "spec-wave.fits"
        fits.PrimaryHDU(w, hdr).writeto(out["wavelength_not_increasing"])
        w = data.copy()
        w[1] = 0
        out["all_masked"] = d / "spec-masked.fits"
        fits.PrimaryHDU(w, hdr).writeto(out["all_masked"])
        w = data.copy()
        w[0] = np.nan
        out["no_finite_flux"] = d / "spec-nan.fits"
        fits.PrimaryHDU(w, hdr).writeto(out["no_finite_flux"])
        w = data.copy()
        w[2] = 20000 + np.arange(w.shape[1], dtype=np.float32)
        out["no_grid_overlap"] = d / "spec-ir.fits"
        fits.PrimaryHDU(w, hdr).writeto(out["no_grid_overlap"])
    out["not_found"] = d / "spec-missing.fits"
    return out


EXPECTED_CODE = {
    "truncated": "truncated",
    "truncated_gz": "truncated",
    "not_fits": "not_fits",
    "empty": "truncated",
    "unknown_layout": "unknown_layout",
    "unknown_layout_table": "unknown_layout",
    "wavelength_not_increasing": "wavelength_not_increasing",
    "all_masked": "all_masked",
    "no_finite_flux": "no_finite_flux",
    "no_grid_overlap": "no_grid_overlap",
    "not_found": "not_found",
}


def test_bad_files_raise_with_code(tmp_path):
    bad = make_bad_files(tmp_path)
    assert set(bad) == set(EXPECTED_CODE)
    for kind, path in bad.items():
        with pytest.raises(BadFileError) as info:
            read_spectrum(path)
        assert info.value.code == EXPECTED_CODE[kind], (kind, info.value)
        assert info.value.reason


# --------------------------------------------------------------------------- fast path vs astropy


@needs_data
@pytest.mark.realdata
def test_fast_parser_equals_astropy_on_real_files():
    from mspec.io.lamost import _astropy_view, _fast_view, _read_bytes

    for path in REAL:
        raw = _read_bytes(path)
        fast, ref = _fast_view(raw), _astropy_view(raw)
        assert fast.n_hdus == ref.n_hdus
        if ref.image is not None:
            np.testing.assert_array_equal(fast.image, ref.image)
        else:
            assert fast.image is None
            assert set(fast.table) == set(ref.table)
            for k in ref.table:
                np.testing.assert_array_equal(fast.table[k], ref.table[k])
        for key, val in ref.header.items():
            if key in ("COMMENT", "HISTORY", ""):
                continue
            assert fast.header[key] == val, (path.name, key)


def test_scaled_file_uses_astropy_path(tmp_path):
    good = _good_file(tmp_path)
    with fits.open(good) as h:
        data = h[0].data.astype(np.float64)
        hdu = fits.PrimaryHDU(data, h[0].header)
    # integer data with BSCALE/BZERO: not the plain layout the fast parser reads
    hdu.scale("int32", bscale=1e-3, bzero=0.0)
    hdu.writeto(tmp_path / "scaled.fits")
    a = read_lamost(good)
    b = read_lamost(tmp_path / "scaled.fits")
    np.testing.assert_allclose(b.flux.values, a.flux.values, atol=1e-3, rtol=0)


@pytest.mark.parametrize("shift", [5, -3])
def test_integer_offset_placement(tmp_path, shift):
    path, loglam = _shifted_file(tmp_path, float(shift))
    s = read_lamost(path).isel(spectra=0)
    assert not bool(s.resampled) and float(s.loglam_offset) == 0.0
    with fits.open(path) as h:
        flux = h[0].data[0]
    if shift > 0:  # starts later: padding in front, the file's pixels copied unchanged
        assert np.all(np.isnan(s.flux.values[:shift]))
        assert np.all(s.andmask.values[:shift] == MASK_NODATA)
        np.testing.assert_array_equal(s.flux.values[shift:], flux[: NPIX - shift])
    else:  # starts before the grid: the pixels outside it are dropped
        np.testing.assert_array_equal(s.flux.values[: NPIX + shift], flux[-shift:])


# --------------------------------------------------------------------------- header parser property


def test_fast_header_parser_matches_astropy(tmp_path):
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from mspec.io.lamost import _astropy_view, _fast_view

    text = st.text(
        alphabet=st.characters(min_codepoint=32, max_codepoint=126), min_size=0, max_size=40
    )
    value = st.one_of(
        st.integers(-(2**62), 2**62),
        st.floats(allow_nan=False, allow_infinity=False, width=64),
        st.booleans(),
        text,
    )

    @settings(
        max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
    )
    @given(st.dictionaries(st.sampled_from([f"KEY{i}" for i in range(12)]), value, max_size=8))
    def check(cards):
        hdu = fits.PrimaryHDU(np.ones((5, 4), np.float32))
        for k, v in cards.items():
            hdu.header[k] = v
        path = tmp_path / "h.fits"
        hdu.writeto(path, overwrite=True)
        raw = path.read_bytes()
        fast, ref = _fast_view(raw), _astropy_view(raw)
        for k in cards:
            assert fast.header[k] == ref.header[k], (k, cards[k])
            assert type(fast.header[k]) is type(ref.header[k]) or isinstance(ref.header[k], float)

    check()


def test_detect_layout_on_hdulist_and_long_strings(tmp_path):
    from mspec.io.lamost import _fast_view, _NotPlain, _read_bytes, detect_layout

    for layout in ("image", "oldest", "table"):
        with fits.open(_good_file(tmp_path, layout)) as h:
            assert detect_layout(h) == layout
    # a long string (CONTINUE cards) makes the fast parser hand over to astropy
    good = _good_file(tmp_path)
    with fits.open(good) as h:
        hdr = h[0].header.copy()
        hdr["CLASS"] = "STAR " + "x" * 100
        fits.PrimaryHDU(h[0].data, hdr).writeto(tmp_path / "long.fits")
    with pytest.raises(_NotPlain):
        _fast_view(_read_bytes(tmp_path / "long.fits"))
    assert read_lamost(tmp_path / "long.fits").lamost_class.values[0] == "STAR " + "x" * 100
