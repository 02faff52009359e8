import numpy as np
import pytest
from astropy.io import fits

from mspec import data


def test_shared_data_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("MSPEC_SHARED_DATA", str(tmp_path))
    assert data.shared_data_dir() == tmp_path.resolve()


@pytest.mark.realdata
def test_pyhammer_files_sorted_and_complete():
    m = data.pyhammer_files("M*")
    assert len(m) == 33
    names = [p.name for p in m]
    assert names[0].startswith("M0_-0.5") and names[-1] == "M9.fits.gz"
    assert len(data.pyhammer_files("*")) == 47


@pytest.mark.realdata
def test_read_pyhammer_matches_astropy():
    path = data.pyhammer_files("M3_+0.5*")[0]
    loglam, flux = data.read_pyhammer(path)
    raw = fits.getdata(path, 1)
    np.testing.assert_array_equal(flux, raw["Flux"].astype(np.float64))
    # regularised grid stays within float32 rounding of the stored column
    assert np.max(np.abs(loglam - raw["LogLam"].astype(np.float64))) < 3e-7
    assert np.all(np.diff(loglam) > 0)
    assert not loglam.flags.writeable


@pytest.mark.parametrize(
    ("name", "spt", "sub", "feh", "lum"),
    [
        ("M3_+0.5_Dwarf.fits.gz", "M3", 3.0, 0.5, "dV"),
        ("M9.fits.gz", "M9", 9.0, np.nan, ""),
        ("B3.fits", "B3", 3.0, np.nan, ""),
        ("K7_-1.0_Dwarf.fits.gz", "K7", 7.0, -1.0, "dV"),
    ],
)
def test_parse_name(name, spt, sub, feh, lum):
    info = data.parse_pyhammer_name(name)
    assert info["spt"] == spt and info["subtype"] == sub and info["lumclass"] == lum
    np.testing.assert_equal(info["feh"], feh)


def test_bad_arguments():
    with pytest.raises(ValueError, match="path="):
        data.parse_pyhammer_name("notatemplate.fits")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        data.read_pyhammer("/nonexistent/M3.fits.gz")
    with pytest.raises(FileNotFoundError, match="pattern="):
        data.pyhammer_files("Q*")
