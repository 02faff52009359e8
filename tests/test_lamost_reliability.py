"""Hostile input for the LAMOST reader (issue 17): every bad file is generated here with
astropy (no binary blobs), and each case either reads with documented cleaning or is
quarantined with a named reason."""

from __future__ import annotations

import gzip
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

import mspec.io.lamost as lamost
from mspec.io.lamost import (
    MASK_NODATA,
    MAX_FILE_BYTES,
    QUARANTINE_CODES,
    BadFileError,
    read_lamost,
    read_spectrum,
)
from mspec.variables import DLOGLAM, LOGLAM0, NPIX, loglam_grid

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
OLDEST_REAL = sorted((DATA / "lamost_dr1").glob("*.fits")) + sorted(
    (DATA / "lamost_dr2").glob("spec-55939-*.fits")
)

N = 3900  # pixels in the generated files (real ones: 3897-3909)


# --------------------------------------------------------------------------- file factories


def _header(layout: str = "image") -> fits.Header:
    hdr = fits.Header()
    if layout != "oldest":
        hdr["OBSID"] = 123456789
        hdr["DATA_V"] = "LAMOST DR7"
    hdr["RA"] = 150.25
    hdr["DEC"] = 30.5
    hdr["MJD"] = 56000
    hdr["LMJD"] = 56000
    hdr["PLANID"] = "HOSTILE01"
    hdr["SPID"] = 3
    hdr["FIBERID"] = 42
    hdr["VACUUM"] = True
    hdr["COEFF0"] = LOGLAM0
    hdr["COEFF1"] = DLOGLAM
    hdr["VERSPIPE"] = {"oldest": "v2.6.4", "image": "v2.9.7", "table": "v2.9.8"}[layout]
    hdr["CLASS"] = "STAR"
    hdr["SUBCLASS"] = "M2"
    hdr["Z"] = 1e-4
    hdr["Z_ERR"] = 1e-5
    for b, v in zip("UGRIZ", (1.5, 5.0, 20.0, 35.5, 40.0)):
        hdr[f"SN_{b}" if layout == "oldest" else f"SNR{b}"] = v
    return hdr


def _rows(n: int = N, dtype=np.float32) -> np.ndarray:
    """flux, ivar, wavelength (A), andmask, ormask of a clean on-grid spectrum."""
    grid = loglam_grid(n)
    flux = 100 + 20 * np.sin(grid * 300)
    ivar = np.full(n, 0.1)
    return np.stack([flux, ivar, 10**grid, np.zeros(n), np.zeros(n)]).astype(dtype)


def write_image(path: Path, rows=None, hdr=None, layout: str = "image") -> Path:
    """A 5 x N primary image in the image (DR2-DR8) or oldest (DR1) layout."""
    rows = _rows() if rows is None else rows
    hdr = _header(layout) if hdr is None else hdr
    if layout == "oldest":
        rows = rows.copy()
        rows[2] = rows[0] / np.median(rows[0])  # the "Subcontinuum" row
        hdr.setdefault("EXTEN0", "Flux Inverse Subcontinuum Andmask Ormask")
    else:
        hdr.setdefault("EXTEN0", "Flux, Inverse, Wavelength, Andmask, Ormask")
    fits.PrimaryHDU(rows, hdr).writeto(path, overwrite=True)
    return path


def write_table(path: Path, rows=None, hdr=None, lengths=None) -> Path:
    """The DR9+ layout: header-only primary + one-row COADD table, masks stored as floats."""
    rows = _rows() if rows is None else rows
    hdr = _header("table") if hdr is None else hdr
    names = ("FLUX", "IVAR", "WAVELENGTH", "ANDMASK", "ORMASK")
    cols = []
    for k, name in enumerate(names):
        v = np.asarray(rows[k], dtype=np.float32)
        if lengths and name in lengths:
            v = v[: lengths[name]]
        cols.append(fits.Column(name=name, format=f"{v.size}E", array=v[None, :]))
    fits.HDUList(
        [fits.PrimaryHDU(header=hdr), fits.BinTableHDU.from_columns(cols, name="COADD")]
    ).writeto(path, overwrite=True)
    return path


def patch_card(path: Path, key: str, value: bytes) -> Path:
    """Overwrite the value of a header card with raw bytes astropy would never write."""
    raw = bytearray(path.read_bytes())
    i = raw.find(key.ljust(8).encode() + b"= ")
    assert i >= 0 and i % 80 == 0, key
    raw[i : i + 80] = (key.ljust(8).encode() + b"= " + value.rjust(20)).ljust(80)
    path.write_bytes(bytes(raw))
    return path


def force_astropy_path(path: Path) -> Path:
    """A long string (CONTINUE cards) makes the fast parser hand the file to astropy."""
    with fits.open(path, mode="update") as h:
        h[0].header["COMMENT2"] = "x" * 100
    return path


def code_of(path: Path, **kw) -> str:
    with pytest.raises(BadFileError) as info:
        read_spectrum(path, **kw)
    assert info.value.reason
    return info.value.code


@pytest.fixture
def good_image(tmp_path):
    return write_image(tmp_path / "spec-good.fits")


# --------------------------------------------------------------------------- quarantine codes


def test_new_codes_are_enumerated():
    assert {"too_large", "unknown_layout"} <= set(QUARANTINE_CODES)
    assert "MAX_FILE_BYTES" in lamost.__all__ and MAX_FILE_BYTES == 16 * 2**20


# --------------------------------------------------------------------------- defect 3: masks


BAD_MASK_VALUES = [1e20, -1e20, np.nan, np.inf, -np.inf, 2.0**32, 2.0**31, -1.0, 0.5]


@pytest.fixture
def bad_mask_files(tmp_path):
    """Image and table files whose andmask/ormask hold values no int32 bit mask can."""
    rows = _rows()
    idx = np.arange(len(BAD_MASK_VALUES)) * 10 + 100
    rows[3, idx] = BAD_MASK_VALUES
    rows[4, idx] = BAD_MASK_VALUES
    rows[3, 50] = rows[4, 50] = 2.0**30  # large but valid: kept
    rows[3, 60] = rows[4, 60] = 64  # an ordinary LAMOST bit
    return (
        {
            "image": write_image(tmp_path / "spec-mask-image.fits", rows.copy()),
            "table": write_table(tmp_path / "spec-mask-table.fits", rows.copy()),
        },
        idx,
    )


@pytest.mark.parametrize("layout", ["image", "table"])
def test_invalid_mask_values_are_masked_not_zero(bad_mask_files, layout):
    files, idx = bad_mask_files
    ds = read_lamost(files[layout])
    for name in ("andmask", "ormask"):
        m = ds[name].values[0]
        assert m.dtype == np.int32
        # float32 storage keeps 1e20 etc.; every one of them must count as masked
        assert np.all(m[idx] == MASK_NODATA), (name, m[idx])
        assert m[50] == 2**30 and m[60] == 64
        assert np.count_nonzero(m[:N]) == idx.size + 2
    assert "andmask" in ds.attrs["read_warnings"] and "ormask" in ds.attrs["read_warnings"]


def test_invalid_masks_alone_make_every_pixel_bad(tmp_path):
    rows = _rows()
    rows[3] = 1e20  # the DR9+ float mask that used to become 0 ("good")
    with pytest.raises(BadFileError) as info:
        read_spectrum(write_table(tmp_path / "spec-allbad.fits", rows))
    assert info.value.code == "all_masked"


def test_mask_helper_matches_documented_rule():
    from mspec.io.lamost import _mask

    v = np.array([0, 1, 32, 2.0**31 - 1, *BAD_MASK_VALUES])
    out, n_bad = _mask(v)
    np.testing.assert_array_equal(out[:4], [0, 1, 32, 2**31 - 1])
    assert np.all(out[4:] == MASK_NODATA) and n_bad == len(BAD_MASK_VALUES)


# --------------------------------------------------------------------------- defect 4: layouts


@pytest.fixture
def junk_images(tmp_path):
    """Images with COEFF0/COEFF1 that are not DR1 files (code -> path, all unknown_layout)."""
    rng = np.random.default_rng(17)
    d = tmp_path / "junk"
    d.mkdir()
    out = {}

    def oldest_like(name, rows=None, **cards):
        hdr = _header("oldest")
        for k, v in cards.items():
            if v is None:
                del hdr[k]
            else:
                hdr[k] = v
        out[name] = write_image(d / f"{name}.fits", rows, hdr, layout="oldest")

    # the case: a random 2048 x 2048 image with COEFF keys, "wavelength" row 15% NaN
    big = rng.normal(size=(2048, 2048)).astype(np.float32)
    big[2] = np.where(rng.random(2048) < 0.15, np.nan, 4000 + np.arange(2048))
    hdr = fits.Header({"COEFF0": LOGLAM0, "COEFF1": DLOGLAM})
    fits.PrimaryHDU(big, hdr).writeto(d / "big.fits")
    out["big"] = d / "big.fits"
    # 5 x N noise with the right keys: no integer masks, negative ivar
    noise = rng.normal(size=(5, N)).astype(np.float32)
    fits.PrimaryHDU(noise, fits.Header({"COEFF0": LOGLAM0, "COEFF1": DLOGLAM})).writeto(
        d / "noise.fits"
    )
    out["noise"] = d / "noise.fits"
    oldest_like("coeff1", COEFF1=2e-4)
    oldest_like("coeff0", COEFF0=3.0)
    oldest_like("coeff_missing", COEFF0=None)
    oldest_like("coeff_text", COEFF1="fast")
    oldest_like("exten0", EXTEN0="Flux Error Sky Andmask Ormask")
    oldest_like("short", rows=_rows(200))
    oldest_like("long", rows=_rows(3 * NPIX))
    rows = _rows()
    rows[1, 10] = -1.0
    oldest_like("negative_ivar", rows=rows)
    rows = _rows()
    rows[3, :5] = 0.25
    oldest_like("fractional_mask", rows=rows)
    rows = _rows()
    rows[4, 7] = -4
    oldest_like("negative_mask", rows=rows)
    return out


def test_junk_is_not_read_as_dr1(junk_images):
    for name, path in junk_images.items():
        kw = {"max_bytes": 64 * 2**20} if name == "big" else {}
        assert code_of(path, **kw) == "unknown_layout", name


def test_big_junk_image_is_too_large_by_default(junk_images):
    assert code_of(junk_images["big"]) == "too_large"  # 16 MiB of pixels + header


def test_generated_dr1_file_passes_positive_checks(tmp_path):
    ds = read_lamost(write_image(tmp_path / "spec-dr1.fits", layout="oldest"))
    assert ds.attrs["layout"] == "oldest"
    np.testing.assert_allclose(ds.flux.values[0, :N], _rows()[0], rtol=1e-6)
    # written files are trimmed, so COEFF0 may sit a few pixels above 3.5682; no EXTEN0 is fine
    hdr = _header("oldest")
    hdr["COEFF0"] = LOGLAM0 + 7 * DLOGLAM
    path = write_image(tmp_path / "spec-dr1-trim.fits", hdr=hdr, layout="oldest")
    with fits.open(path, mode="update") as h:
        del h[0].header["EXTEN0"]
    s = read_lamost(path)
    assert s.attrs["layout"] == "oldest" and np.all(np.isnan(s.flux.values[0, :7]))


@pytest.mark.realdata
@pytest.mark.skipif(not OLDEST_REAL, reason="../shared/data not available")
def test_real_oldest_files_still_read():
    assert len(OLDEST_REAL) == 7
    for path in OLDEST_REAL:
        ds = read_lamost(path)
        assert ds.attrs["layout"] == "oldest" and ds.attrs["read_warnings"] == ""


def test_broken_wavelength_row_is_a_wavelength_error_not_dr1(tmp_path):
    rng = np.random.default_rng(3)
    rows = _rows()
    rows[2, rng.random(N) < 0.15] = np.nan  # 15% NaN: not "looks like wavelengths"
    assert code_of(write_image(tmp_path / "a.fits", rows.copy())) == "wavelength_not_increasing"
    hdr = _header()  # no EXTEN0 either: the row is still mostly wavelengths
    path = tmp_path / "b.fits"
    fits.PrimaryHDU(rows, hdr).writeto(path)
    assert code_of(path) == "wavelength_not_increasing"


# --------------------------------------------------------------------------- defect 7: size cap


def _gzip_bomb(path: Path, n_bytes: int) -> Path:
    """A gzipped FITS whose header promises ``n_bytes`` of zeros (compresses ~200:1)."""
    npix = n_bytes // 20
    hdr = fits.Header()
    hdr["SIMPLE"] = True
    hdr["BITPIX"] = -32
    hdr["NAXIS"] = 2
    hdr["NAXIS1"] = npix
    hdr["NAXIS2"] = 5
    head = hdr.tostring().encode()
    comp = zlib.compressobj(1, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    zeros = bytes(1 << 20)
    with open(path, "wb") as fh:
        fh.write(comp.compress(head))
        for _ in range(-(-npix * 20 // len(zeros))):
            fh.write(comp.compress(zeros))
        fh.write(comp.flush())
    return path


@pytest.fixture
def gzip_bomb(tmp_path):
    return _gzip_bomb(tmp_path / "spec-bomb.fits.gz", 256 * 2**20)


def test_gzip_bomb_rejected_without_decompressing_it(gzip_bomb):
    assert gzip_bomb.stat().st_size < 2 * 2**20
    tracemalloc.start()
    try:
        with pytest.raises(BadFileError) as info:
            read_spectrum(gzip_bomb)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert info.value.code == "too_large"
    assert peak < 3 * MAX_FILE_BYTES, peak  # the whole thing would be 256 MiB


def test_size_cap_is_adjustable(tmp_path, good_image, monkeypatch):
    size = good_image.stat().st_size
    gz = tmp_path / "spec-good.fits.gz"
    gz.write_bytes(gzip.compress(good_image.read_bytes()))
    for path in (good_image, gz):  # plain and gzipped alike
        assert code_of(path, max_bytes=size - 1) == "too_large"
        assert read_lamost(path, max_bytes=size).sizes["spectra"] == 1
    monkeypatch.setattr(lamost, "MAX_FILE_BYTES", size - 1)
    assert code_of(good_image) == "too_large"
    with pytest.raises(ValueError, match="max_bytes"):
        read_spectrum(good_image, max_bytes=0)
    with pytest.raises(TypeError, match="max_bytes"):
        read_spectrum(good_image, max_bytes=1.5e6)


def test_streaming_gunzip_keeps_gzip_semantics(tmp_path, good_image):
    raw = good_image.read_bytes()
    ref = read_lamost(good_image)
    # two members and trailing NUL padding: as gzip.decompress reads them
    multi = tmp_path / "multi.fits.gz"
    multi.write_bytes(gzip.compress(raw[:5000]) + gzip.compress(raw[5000:]) + b"\0" * 10)
    np.testing.assert_array_equal(read_lamost(multi).flux.values, ref.flux.values)
    gz = gzip.compress(raw)
    cases = {
        "cut": gz[: len(gz) // 2],
        "bad_crc": gz[:-8] + bytes(8),
        "garbage_after": gz + b"not gzip",
    }
    for name, data in cases.items():
        (tmp_path / f"{name}.fits.gz").write_bytes(data)
        assert code_of(tmp_path / f"{name}.fits.gz") == "truncated", name
    # endless empty members decompress to nothing: bounded by the compressed size instead
    empty = tmp_path / "empty-members.fits.gz"
    empty.write_bytes(gzip.compress(raw[:2880]) + gzip.compress(b"") * 500)
    assert code_of(empty, max_bytes=4000) == "too_large"


# --------------------------------------------------------------------------- defect 9: headers


@pytest.fixture(params=["fast", "astropy"])
def bad_card_file(request, tmp_path):
    """SNRI = 12.5.3 and non-ASCII bytes in OBSID, read by the fast parser or by astropy."""
    path = write_image(tmp_path / "spec-badcard.fits")
    if request.param == "astropy":
        force_astropy_path(path)
    patch_card(path, "SNRI", b"12.5.3")
    patch_card(path, "OBSID", b"1234\xff5678")
    patch_card(path, "SUBCLASS", b"'M\xe92'")
    return path


def test_unparsable_cards_keep_the_spectrum(bad_card_file):
    ds = read_lamost(bad_card_file)
    s = ds.isel(spectra=0)
    assert np.isnan(float(s.snr_i)) and float(s.snr_r) == 20.0
    assert int(s.obsid) < 0  # no usable OBSID: the documented derived id
    assert str(s.lamost_class.values) == "STAR" and int(s.mjd) == 56000
    assert str(s.lamost_subclass.values) == "M?2"  # a non-ASCII byte in a string, as astropy
    assert np.isfinite(s.flux.values).sum() == N
    warn = ds.attrs["read_warnings"]
    assert "SNRI" in warn and "OBSID" in warn
    # registered: the store keeps it per spectrum
    assert "SNRI" in str(ds["read_warnings"].values[0])
    meta, _, _ = read_spectrum(bad_card_file)
    assert meta["read_warnings"] == warn
    # a catalogue obsid still wins over the derived one
    back = read_lamost(bad_card_file, defaults={"obsid": 906003})
    assert int(back.obsid[0]) == 906003


def test_unparsable_card_is_stored_not_quarantined(bad_card_file):
    from mspec.io.store import _scan_files

    (rec,) = _scan_files([(str(bad_card_file), {})])
    assert rec["status"] == "stored" and rec["code"] == ""
    assert "SNRI" in rec["read_warnings"]


def test_non_numeric_and_out_of_range_cards(tmp_path):
    hdr = _header()
    hdr["RA"] = "abc"  # a valid FITS string where a number belongs
    hdr["MJD"] = 1e30  # does not fit int64
    hdr["Z"] = "n/a"
    path = write_image(tmp_path / "spec-text.fits", hdr=hdr)
    patch_card(path, "SNRU", b"inf")
    ds = read_lamost(path)
    s = ds.isel(spectra=0)
    assert np.isnan(float(s.ra)) and int(s.mjd) == -1 and np.isnan(float(s.lamost_z))
    assert np.isnan(float(s.snr_u)) and float(s.dec) == 30.5
    for key in ("RA", "MJD", "Z", "SNRU"):
        assert key in ds.attrs["read_warnings"], key


def test_huge_and_negative_snr_kept_as_given(tmp_path):
    hdr = _header()
    hdr["SNRU"] = -9999.0
    hdr["SNRG"] = -3.5
    hdr["SNRR"] = 1e30
    ds = read_lamost(write_image(tmp_path / "spec-snr.fits", hdr=hdr))
    s = ds.isel(spectra=0)
    assert float(s.snr_u) == -9999.0 and float(s.snr_g) == -3.5 and float(s.snr_r) == 1e30
    assert ds.attrs["read_warnings"] == ""


def test_missing_header_keys_keep_the_spectrum(tmp_path):
    hdr = fits.Header()  # not a single optional card, only the wavelength row
    path = write_image(tmp_path / "spec-bare.fits", hdr=hdr)
    with fits.open(path, mode="update") as h:
        del h[0].header["EXTEN0"]
    ds = read_lamost(path)
    s = ds.isel(spectra=0)
    assert ds.attrs["layout"] == "image" and ds.attrs["read_warnings"] == ""
    assert int(s.obsid) < 0 and int(s.mjd) == -1
    for key in ("ra", "dec", "snr_u", "snr_z", "lamost_z", "lamost_z_err", "lamost_rv"):
        assert np.isnan(float(s[key])), key
    for key in ("lamost_class", "lamost_subclass", "release"):
        assert str(s[key].values) == "", key
    np.testing.assert_allclose(s.flux.values[:N], _rows()[0], rtol=1e-6)
    # the oldest layout cannot place its pixels without COEFF0/COEFF1
    hdr = _header("oldest")
    del hdr["COEFF1"]
    path = write_image(tmp_path / "b.fits", hdr=hdr, layout="oldest")
    assert code_of(path) == "unknown_layout"


# --------------------------------------------------------------------------- pixel values


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_non_finite_flux_is_nan_with_ivar_zero(tmp_path, dtype):
    rows = _rows(dtype=dtype)
    bad = {10: np.nan, 20: np.inf, 30: -np.inf}
    for i, v in bad.items():
        rows[0, i] = v
    if dtype == np.float64:  # beyond float32: would be stored as inf
        rows[0, 40] = 1e300
        rows[1, 50] = 1e300
        bad[40] = bad[50] = None
    rows[1, 60] = np.nan
    rows[1, 70] = -2.0
    s = read_lamost(write_image(tmp_path / "spec-nan.fits", rows)).isel(spectra=0)
    flux, ivar = s.flux.values, s.ivar.values
    for i in (10, 20, 30, 40) if dtype == np.float64 else (10, 20, 30):
        assert np.isnan(flux[i]) and ivar[i] == 0, i
    if dtype == np.float64:
        assert ivar[50] == 0 and np.isfinite(flux[50])
    assert ivar[60] == 0 and ivar[70] == 0
    assert np.all(np.isfinite(ivar)) and np.all(ivar >= 0)
    assert np.array_equal(np.isfinite(flux[:N]), ~np.isin(np.arange(N), list(bad)[:4]))
    rows[0] = np.inf  # nothing finite left
    assert code_of(write_image(tmp_path / "spec-inf.fits", rows)) == "no_finite_flux"


@pytest.mark.parametrize("layout", ["image", "table"])
def test_non_monotonic_wavelengths_rejected(tmp_path, layout):
    write = write_image if layout == "image" else write_table
    cases = {}
    rows = _rows()
    rows[2, [100, 101]] = rows[2, [101, 100]]  # two pixels swapped
    cases["swapped"] = rows
    rows = _rows()
    rows[2, 200] = rows[2, 199]  # a repeated wavelength
    cases["repeated"] = rows
    rows = _rows()
    rows[2, 300] = np.nan
    cases["nan"] = rows
    rows = _rows()
    rows[2, :10] = -rows[2, :10]
    cases["negative"] = rows
    for name, r in cases.items():
        path = write(tmp_path / f"spec-{name}.fits", r)
        assert code_of(path) == "wavelength_not_increasing", name


def test_out_of_range_wavelengths(tmp_path):
    rows = _rows()
    rows[2] = 20000 * 10 ** (DLOGLAM * np.arange(N))  # infrared: beyond the grid
    assert code_of(write_image(tmp_path / "ir.fits", rows)) == "no_grid_overlap"
    rows = _rows()
    rows[2] /= 10  # nanometres, not Angstrom
    assert code_of(write_image(tmp_path / "nm.fits", rows)) == "no_grid_overlap"
    rows = _rows()
    rows[2] *= 1000  # far beyond 1e5 A: not even wavelength-like
    assert code_of(write_image(tmp_path / "huge.fits", rows)) == "no_grid_overlap"
    # a partial overlap is kept: the pixels beyond the grid are dropped, the rest padded
    start = NPIX - 100
    rows = _rows()
    rows[2] = 10 ** (LOGLAM0 + DLOGLAM * (start + np.arange(N)))
    s = read_lamost(write_image(tmp_path / "red.fits", rows)).isel(spectra=0)
    assert np.all(np.isnan(s.flux.values[:start])) and np.all(s.andmask.values[:start] == 32)
    np.testing.assert_allclose(s.flux.values[start:], rows[0, :100], rtol=1e-6)


def test_wrong_hdu_shapes(tmp_path):
    shapes = {
        "four_rows": _rows()[:4],
        "six_rows": np.vstack([_rows(), _rows()[:1]]),
        "three_d": _rows()[None],
        "one_column": _rows()[:, :1],
        "transposed": _rows().T.copy(),
    }
    for name, data in shapes.items():
        path = tmp_path / f"{name}.fits"
        fits.PrimaryHDU(data, _header()).writeto(path)
        assert code_of(path) == "unknown_layout", name
    # table columns of different lengths
    path = write_table(tmp_path / "ragged.fits", lengths={"IVAR": N - 5})
    assert code_of(path) == "unknown_layout"
    # a spectrum table without rows
    cols = [fits.Column(name=c, format="10E") for c in ("FLUX", "IVAR", "WAVELENGTH")]
    fits.HDUList([fits.PrimaryHDU(), fits.BinTableHDU.from_columns(cols, nrows=0)]).writeto(
        tmp_path / "norows.fits"
    )
    assert code_of(tmp_path / "norows.fits") == "truncated"
