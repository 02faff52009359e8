"""The PyHammer template library packaged with mspec (issue 11: a pip-installed mspec needs no
``../shared``): package data, reader, agreement with the original FITS files, defaults.

Measured agreement (see ``mspec/templates/README.md``), with the tolerances used here:

* after the simulator bank's processing (R ~ 1800 + one 1e-4 dex LAMOST pixel, unit mean over
  5000-9000 Å), 3700-9500 Å: M/K5/K7 templates rms <= 5.6e-4 (tol 1e-3), any pixel
  <= 1.25e-2 (tol 2.5e-2); all 47 (L2 the worst) rms <= 2.8e-3 (tol 5e-3), any pixel
  <= 3.0e-2 (tol 6e-2);
* template-matching RVs of the 36 DR7 M dwarfs: median |Δrv| 0.08 km/s (tol 0.3), max 0.73
  km/s (tol 1.5), same best template for all 36.
"""

from __future__ import annotations

import os
import subprocess
import sys
from fnmatch import fnmatch
from pathlib import Path

import numpy as np
import pytest

from mspec import data
from mspec.simulate import bank as sb

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "mspec" / "templates"
SHARED = ROOT.parent / "shared" / "data"
FITS_DIR = SHARED / "templates_pyhammer"
DR7 = SHARED / "lamost_dr7_mdwarfs"
needs_fits = pytest.mark.skipif(
    not FITS_DIR.is_dir(), reason="../shared/data/templates_pyhammer missing"
)


def test_package_data_files():
    npz = PKG / "pyhammer.npz"
    assert npz.is_file()
    assert npz.stat().st_size < 2_000_000
    assert Path(str(data.packaged_templates_path())) == npz
    lic = (PKG / "LICENSE-PyHammer.txt").read_text()
    assert "MIT License" in lic and "Aurora Kesseli" in lic
    readme = (PKG / "README.md").read_text()
    for s in ("mveyette/PyHammer", "Kesseli", "MIT", "scripts/build_template_library.py"):
        assert s in readme, s
    assert (ROOT / "scripts" / "build_template_library.py").is_file()
    # setuptools ships every file of mspec/templates as package data
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())
    pats = cfg["tool"]["setuptools"]["package-data"]["mspec"]
    for f in PKG.iterdir():
        if f.is_file():
            assert any(fnmatch(f"templates/{f.name}", p) for p in pats), f.name


def test_packaged_reader():
    loglam, flux, info = data.packaged_templates()
    assert flux.shape == (47, loglam.size) and flux.dtype == np.float32
    assert loglam.dtype == np.float64 and loglam.size == 17851
    np.testing.assert_allclose(np.diff(loglam), 2.5e-5, rtol=1e-9)
    assert 10 ** loglam[0] < 3651 and 10 ** loglam[-1] > 10199
    assert np.all(np.isfinite(flux))
    assert not flux.flags.writeable and not loglam.flags.writeable
    names = [i["name"] for i in info]
    assert len(set(names)) == 47 and names[0] == "B3" and names[-1] == "L2"
    assert set(info[0]) == {"name", "spt", "subtype", "feh", "lumclass"}
    ll, fm, im = data.packaged_templates("M*")
    assert fm.shape == (33, ll.size) and [i["name"] for i in im][-1] == "M9"
    m3 = [i for i in im if i["name"] == "M3_+0.5_Dwarf"][0]
    assert m3 == data.parse_pyhammer_name("M3_+0.5_Dwarf.fits.gz")
    # callers cannot corrupt the cache
    im[0]["name"] = "x"
    assert data.packaged_templates("M*")[2][0]["name"] == "M0_-0.5_Dwarf"


def test_packaged_reader_bad_arguments():
    with pytest.raises(FileNotFoundError, match="pattern="):
        data.packaged_templates("Q*")
    with pytest.raises(TypeError, match="pattern"):
        data.packaged_templates(3)


@pytest.mark.realdata
@needs_fits
def test_packaged_is_flux_conserving_copy_of_fits():
    """Band integrals of the packaged flux equal those of the original (float32 rounding)."""
    loglam, flux, info = data.packaged_templates()
    step = loglam[1] - loglam[0]
    edges = np.concatenate([loglam - step / 2, [loglam[-1] + step / 2]])
    for j, i in enumerate(info):
        ll, fl = data.read_pyhammer(FITS_DIR / f"{i['name']}.fits.gz")
        d0 = (ll[-1] - ll[0]) / (ll.size - 1)
        e0 = np.concatenate([ll - d0 / 2, [ll[-1] + d0 / 2]])
        cum = np.concatenate([[0.0], np.cumsum(fl * d0)])
        want = np.diff(np.interp(edges, e0, cum)) / step
        scale = np.max(np.abs(want))
        np.testing.assert_allclose(flux[j], want, rtol=7e-5, atol=1e-6 * scale, err_msg=i["name"])


@pytest.mark.realdata
@needs_fits
def test_packaged_matches_fits_at_lamost_resolution():
    lam = 10.0 ** sb.fine_grid()
    sel = (lam > 3700) & (lam < 9500)
    for i in data.packaged_templates()[2]:
        a = sb._processed(i["name"], None)
        b = sb._processed(i["name"], str(FITS_DIR))
        d = (a - b)[sel]
        rms, worst = np.sqrt(np.mean(d**2)), np.max(np.abs(d))
        if i["name"].startswith(("M", "K5", "K7")):
            assert rms <= 1e-3 and worst <= 2.5e-2, (i["name"], rms, worst)
        else:
            assert rms <= 5e-3 and worst <= 6e-2, (i["name"], rms, worst)


@pytest.mark.realdata
@needs_fits
def test_bank_directory_option_reads_fits():
    """``Bank(directory)`` still reads the original files, with the same layout."""
    a, b = sb.bank(), sb.Bank(str(FITS_DIR))
    assert a.names == b.names
    np.testing.assert_array_equal(a.mgrid, b.mgrid)
    lam = 10.0 ** sb.fine_grid()
    sel = (lam > 4000) & (lam < 9000)
    d = a.data[:, sel, 0] - b.data[:, sel, 0]
    assert np.sqrt(np.mean(d**2)) < 1e-3


@pytest.mark.realdata
@needs_fits
def test_pyhammer_templates_default_is_packaged():
    from mspec.rv.templates import pyhammer_templates

    lp = pyhammer_templates("M*")
    lo = pyhammer_templates("M*", directory=FITS_DIR)
    assert lp.template_name.values.tolist() == lo.template_name.values.tolist()
    for v in ("template_spt", "template_lumclass", "template_source"):
        assert lp[v].values.tolist() == lo[v].values.tolist()
    np.testing.assert_array_equal(lp.template_m_h.values, lo.template_m_h.values)
    # unsmoothed 1 A grid: the original's pixel-scale co-add noise is box-averaged away
    d = lp.template_flux.values - lo.template_flux.values
    assert np.sqrt(np.nanmean(d**2)) < 1e-2


_CHILD = """
import sys, numpy as np, mspec
from mspec.data import pyhammer_files
from mspec.rv.templates import default_templates
try:
    pyhammer_files("M*")
    raise SystemExit("shared data still visible")
except FileNotFoundError:
    pass
lib = default_templates("real")
ds = mspec.simulate_survey(20, seed=1)
np.save(sys.argv[1] + "/tpl.npy", lib.template_flux.values)
np.save(sys.argv[1] + "/flux.npy", ds.flux.values)
"""


def test_defaults_need_no_shared_data(tmp_path):
    """``default_templates("real")`` and ``simulate_survey`` work without ../shared (a fresh
    process whose $MSPEC_SHARED_DATA is empty) and give what this process gives."""
    import mspec
    from mspec.rv.templates import default_templates

    empty = tmp_path / "empty"
    empty.mkdir()
    env = dict(os.environ, MSPEC_SHARED_DATA=str(empty))
    r = subprocess.run(
        [sys.executable, "-c", _CHILD, str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    tpl = np.load(tmp_path / "tpl.npy")
    assert tpl.shape == (33, 4400)
    np.testing.assert_array_equal(tpl, default_templates("real").template_flux.values)
    np.testing.assert_array_equal(
        np.load(tmp_path / "flux.npy"), mspec.simulate_survey(20, seed=1).flux.values
    )


def test_defaults_need_no_shared_data_monkeypatch(monkeypatch, tmp_path):
    from mspec.rv.templates import default_templates

    monkeypatch.setenv("MSPEC_SHARED_DATA", str(tmp_path))
    lib = default_templates("real")
    assert lib.sizes["templates"] == 33
    assert np.isfinite(lib.template_flux.values).any(axis=1).all()
    bank = sb.Bank()  # a fresh bank, not the cached one
    assert len(bank.names) == 47 - 2  # every template but L0 and L2


@pytest.mark.realdata
@needs_fits
@pytest.mark.skipif(not DR7.is_dir(), reason="../shared/data/lamost_dr7_mdwarfs missing")
def test_tm_rv_packaged_vs_fits_dr7():
    from test_rv_realdata import read_dr7  # tests/ is on sys.path under pytest

    import mspec
    from mspec.rv.templates import pyhammer_templates

    dr7 = read_dr7()
    a = mspec.template_match(dr7, templates=pyhammer_templates("M*"), merge=False).compute()
    b = mspec.template_match(
        dr7, templates=pyhammer_templates("M*", directory=FITS_DIR), merge=False
    ).compute()
    assert (a.tm_status == 0).all() and (b.tm_status == 0).all()
    dv = np.abs(a.rv_tm.values - b.rv_tm.values)
    assert dv.size == 36
    assert np.median(dv) <= 0.3, np.median(dv)
    assert dv.max() <= 1.5, dv.max()
    assert np.mean(a.tm_template.values == b.tm_template.values) >= 0.9
