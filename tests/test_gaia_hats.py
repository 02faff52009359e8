"""Survey-scale positional Gaia cross-match against a HATS catalogue with lsdb (issue 14).

A synthetic Gaia-like catalogue is written as HATS (``lsdb.from_dataframe(...)
.write_catalog``) in ``tmp_path`` with spectra's matches injected within 3 arcsec, decoys
beyond it and a match across a partition boundary (found only through the margin cache).
The lsdb path must find exactly the injected matches and agree with the astropy path of
:func:`mspec.cmd.join_gaia` on the same table.
"""

from __future__ import annotations

import subprocess
import sys
import warnings

import numpy as np
import pandas as pd
import pytest
import xarray as xr

from mspec.cmd import GaiaTableWarning, join_gaia
from mspec.testing import raise_if_computes
from mspec.variables import validate

lsdb = pytest.importorskip("lsdb")
# lsdb 0.11 / nested-pandas 0.7 still use pandas' deprecated inplace= internally
pytestmark = pytest.mark.filterwarnings("ignore:The inplace keyword:Warning")

from mspec.io.gaia_hats import (  # noqa: E402
    hats_columns,
    is_hats_catalog,
    join_gaia_hats,
)

N_SPEC = 150
SID0 = 4_000_000_000_000_000_000  # beyond 2**53: ids must not pass through float


def _offset(ra, dec, arcsec, pa_deg):
    from astropy import units as u
    from astropy.coordinates import SkyCoord

    c = SkyCoord(np.asarray(ra) * u.deg, np.asarray(dec) * u.deg)
    o = c.directional_offset_by(np.asarray(pa_deg) * u.deg, np.asarray(arcsec) * u.arcsec)
    return o.ra.deg, o.dec.deg


def _gaia_row(rng, ra, dec, sid):
    return {
        "source_id": sid,
        "ra": ra,
        "dec": dec,
        "phot_g_mean_mag": rng.uniform(10, 18),
        "phot_bp_mean_mag": rng.uniform(11, 20),
        "phot_rp_mean_mag": rng.uniform(9, 17),
        "parallax": rng.uniform(0.1, 20),
        "parallax_over_error": rng.uniform(1, 100),
        "phot_g_mean_flux_over_error": rng.uniform(10, 1000),
        "phot_bp_mean_flux_over_error": rng.uniform(10, 500),
        "phot_rp_mean_flux_over_error": rng.uniform(10, 500),
        "ruwe": rng.uniform(0.8, 2.0),
        "r_med_geo": rng.uniform(10, 3000),
        "ebv": rng.uniform(0, 0.5),
        "designation": f"Gaia DR3 {sid}",  # a string column: not joined
    }


def _partition_of(pixels, ra, dec):
    from hats.pixel_math.healpix_shim import radec2pix

    for p in pixels:
        if radec2pix(p.order, np.atleast_1d(ra), np.atleast_1d(dec))[0] == p.pixel:
            return (p.order, p.pixel)
    return None


@pytest.fixture(scope="module")
def sky(tmp_path_factory):
    """Spectra, the Gaia-like table, its HATS catalogue (with margin) and the truth."""
    rng = np.random.default_rng(42)
    ra = rng.uniform(10.0, 14.0, N_SPEC)
    dec = rng.uniform(0.0, 4.0, N_SPEC)
    truth = np.full(N_SPEC, -1, np.int64)
    true_sep = np.full(N_SPEC, np.nan)
    rows = []
    # background sources (never within 10" of a spectrum: checked below)
    for k in range(2500):
        rows.append(_gaia_row(rng, rng.uniform(9.5, 14.5), rng.uniform(-0.5, 4.5), 10 + k))
    # kinds: 0 match only, 1 decoy only (3.3-8"), 2 match + farther decoy, 3 nothing,
    # 4 two sources within 3" (the nearer one is the match)
    kinds = np.arange(N_SPEC) % 5
    sid = SID0
    for i in range(N_SPEC):
        if kinds[i] in (0, 2, 4):
            s = rng.uniform(0.05, 2.9)
            r, d = _offset(ra[i], dec[i], s, rng.uniform(0, 360))
            sid += 1
            rows.append(_gaia_row(rng, float(r), float(d), sid))
            truth[i], true_sep[i] = sid, s
            if kinds[i] == 4:
                r, d = _offset(ra[i], dec[i], min(s + 0.05, 2.99), rng.uniform(0, 360))
                sid += 1
                rows.append(_gaia_row(rng, float(r), float(d), sid))
        if kinds[i] in (1, 2):
            r, d = _offset(ra[i], dec[i], rng.uniform(3.3, 8.0), rng.uniform(0, 360))
            sid += 1
            rows.append(_gaia_row(rng, float(r), float(d), sid))
    gaia = pd.DataFrame(rows)
    gaia["source_id"] = gaia["source_id"].astype(np.int64)
    # drop background sources within 10" of a spectrum: the truth is then unambiguous
    from astropy import units as u
    from astropy.coordinates import SkyCoord, search_around_sky

    bg = np.flatnonzero(gaia["source_id"].to_numpy() < SID0)
    _, j, _, _ = search_around_sky(
        SkyCoord(ra * u.deg, dec * u.deg),
        SkyCoord(gaia["ra"].values[bg] * u.deg, gaia["dec"].values[bg] * u.deg),
        10 * u.arcsec,
    )
    gaia = gaia.drop(index=bg[np.unique(j)]).reset_index(drop=True)
    base = tmp_path_factory.mktemp("hats")
    hats_dir = base / "gaia"
    cat = lsdb.from_dataframe(gaia, catalog_name="gaia", partition_rows=120, margin_threshold=10.0)
    assert cat.npartitions > 10 and cat.margin is not None
    pixels = cat.get_healpix_pixels()
    # one more spectrum whose match lies across a partition boundary (only the margin has it)
    a_ra, a_dec, b_ra, b_dec = 11.0, 1.0, 12.5, 2.5
    pa, pb = _partition_of(pixels, a_ra, a_dec), _partition_of(pixels, b_ra, b_dec)
    assert pa != pb
    A, B = SkyCoord(a_ra * u.deg, a_dec * u.deg), SkyCoord(b_ra * u.deg, b_dec * u.deg)
    lo, hi = 0.0, A.separation(B).arcsec
    pa_ab = A.position_angle(B).deg
    while hi - lo > 0.5:  # bisection to the boundary along A -> B
        mid = 0.5 * (lo + hi)
        m = A.directional_offset_by(pa_ab * u.deg, mid * u.arcsec)
        if _partition_of(pixels, m.ra.deg, m.dec.deg) == pa:
            lo = mid
        else:
            hi = mid
    s_pt = A.directional_offset_by(pa_ab * u.deg, (lo - 1.0) * u.arcsec)
    m_pt = A.directional_offset_by(pa_ab * u.deg, (hi + 1.0) * u.arcsec)
    assert _partition_of(pixels, s_pt.ra.deg, s_pt.dec.deg) != _partition_of(
        pixels, m_pt.ra.deg, m_pt.dec.deg
    )
    edge_sid = SID0 + 999_999
    gaia = pd.concat(
        [gaia, pd.DataFrame([_gaia_row(rng, m_pt.ra.deg, m_pt.dec.deg, edge_sid)])],
        ignore_index=True,
    )
    gaia["source_id"] = gaia["source_id"].astype(np.int64)
    ra = np.append(ra, s_pt.ra.deg)
    dec = np.append(dec, s_pt.dec.deg)
    truth = np.append(truth, edge_sid)
    true_sep = np.append(true_sep, s_pt.separation(m_pt).arcsec)
    # the catalogue must be partitioned as `pixels` for the edge case: same rows -> same tree
    cat = lsdb.from_dataframe(gaia, catalog_name="gaia", partition_rows=120, margin_threshold=10.0)
    assert cat.get_healpix_pixels() == pixels
    cat.write_catalog(hats_dir, progress_bar=False)
    no_margin = base / "gaia_no_margin"
    lsdb.from_dataframe(
        gaia, catalog_name="gaia", partition_rows=120, margin_threshold=None
    ).write_catalog(no_margin, progress_bar=False)
    # still no background source within 10" of any spectrum (the edge one included)
    bg = gaia["source_id"].to_numpy() < SID0
    near, _, _, _ = search_around_sky(
        SkyCoord(ra * u.deg, dec * u.deg),
        SkyCoord(gaia["ra"].values[bg] * u.deg, gaia["dec"].values[bg] * u.deg),
        10 * u.arcsec,
    )
    assert near.size == 0
    n = ra.size
    ds = xr.Dataset(
        {"ra": ("spectra", ra), "dec": ("spectra", dec)},
        coords={"obsid": ("spectra", np.arange(5000, 5000 + n, dtype=np.int64))},
    )
    return {
        "ds": ds,
        "gaia": gaia,
        "hats": hats_dir,
        "no_margin": no_margin,
        "truth": truth,
        "sep": true_sep,
        "edge": n - 1,
    }


def test_hats_finds_exactly_the_injected_matches(sky):
    ds = sky["ds"]
    out = join_gaia_hats(ds, sky["hats"], merge=False)
    sid = out["gaia_source_id"].values
    np.testing.assert_array_equal(sid, sky["truth"])  # matches, decoys and the nearer one
    hit = sky["truth"] >= 0
    assert hit.sum() > 80 and (~hit).sum() > 50
    np.testing.assert_allclose(out["gaia_match_sep"].values[hit], sky["sep"][hit], atol=1e-6)
    assert np.all(np.isnan(out["gaia_match_sep"].values[~hit]))
    # joined values belong to the matched source; no match -> NaN
    g = sky["gaia"].set_index("source_id")
    np.testing.assert_array_equal(out["ruwe"].values[hit], g.loc[sid[hit], "ruwe"].to_numpy())
    assert np.all(np.isnan(out["ruwe"].values[~hit]))
    assert out["gaia_source_id"].dtype == np.int64
    assert "designation" not in out  # strings are not joined
    validate(out, ["gaia_source_id", "ruwe", "gaia_match_sep", "phot_g_mean_mag"])


def test_boundary_match_needs_the_margin(sky):
    """The edge spectrum's match sits in the neighbouring partition: the margin finds it."""
    ds = sky["ds"].isel(spectra=[sky["edge"]])
    assert (
        join_gaia_hats(ds, sky["hats"], merge=False)["gaia_source_id"].values[0]
        == sky["truth"][sky["edge"]]
    )
    with pytest.warns(GaiaTableWarning, match="no margin"):
        out = join_gaia_hats(ds, sky["no_margin"], merge=False)
    assert out["gaia_source_id"].values[0] == -1


def test_hats_equals_astropy_on_the_same_table(sky):
    ds = sky["ds"]
    ref = join_gaia(ds, sky["gaia"], on="position", merge=False)
    got = join_gaia_hats(ds, sky["hats"], merge=False)
    assert set(ref.data_vars) == set(got.data_vars)
    for c in ref.data_vars:
        if c == "gaia_match_sep":  # astropy and lsdb's chord distance: round-off only
            np.testing.assert_allclose(got[c].values, ref[c].values, rtol=0, atol=1e-6)
        else:
            np.testing.assert_array_equal(got[c].values, ref[c].values, err_msg=c)
    # the radius is honoured the same way
    ref4 = join_gaia(ds, sky["gaia"], on="position", radius_arcsec=5.0, merge=False)
    got4 = join_gaia_hats(ds, sky["hats"], radius_arcsec=5.0, merge=False)
    np.testing.assert_array_equal(got4["gaia_source_id"].values, ref4["gaia_source_id"].values)
    assert (got4["gaia_source_id"].values >= 0).sum() > (got["gaia_source_id"].values >= 0).sum()


def test_lazy_chunked_equals_eager(sky):
    ds = sky["ds"]
    ref = join_gaia_hats(ds, sky["hats"], merge=False)
    lazy_ds = ds.chunk({"spectra": 37})
    with raise_if_computes():
        lazy = join_gaia_hats(lazy_ds, sky["hats"])  # merge=True keeps ra/dec
    assert lazy["ruwe"].chunks == lazy_ds["ra"].chunks
    got = lazy.compute(scheduler="threads", num_workers=4)  # chunks matched concurrently
    for c in ref.data_vars:
        np.testing.assert_array_equal(got[c].values, ref[c].values, err_msg=c)
    np.testing.assert_array_equal(got["ra"].values, ds["ra"].values)


def test_unmatched_positions_and_outside_coverage(sky):
    ds = xr.Dataset(
        {
            "ra": ("spectra", [np.nan, 200.0, 11.0, 360.0 + sky["ds"]["ra"].values[0]]),
            "dec": ("spectra", [1.0, -60.0, 95.0, sky["ds"]["dec"].values[0]]),
        }
    )
    out = join_gaia_hats(ds, sky["hats"], merge=False)
    np.testing.assert_array_equal(out["gaia_source_id"].values[:3], [-1, -1, -1])
    assert np.all(np.isnan(out["ruwe"].values[:3]))
    # ra beyond 360 wraps like astropy's (spectrum 0 has an injected match)
    assert out["gaia_source_id"].values[3] == sky["truth"][0] >= 0
    ref = join_gaia(ds, sky["gaia"], on="position", merge=False)
    np.testing.assert_array_equal(out["gaia_source_id"].values, ref["gaia_source_id"].values)


def test_hats_columns_and_detection(sky, tmp_path):
    cols = hats_columns(sky["hats"])
    assert cols["gaia_source_id"] == "source_id" and cols["ruwe"] == "ruwe"
    assert "designation" not in cols.values()
    assert is_hats_catalog(sky["hats"]) and is_hats_catalog(str(sky["hats"]))
    assert is_hats_catalog("https://data.lsdb.io/hats/gaia_dr3")
    assert not is_hats_catalog("https://example.org/xmatch.parquet")
    assert not is_hats_catalog(sky["gaia"])
    p = tmp_path / "t.parquet"
    sky["gaia"].to_parquet(p)
    assert not is_hats_catalog(p) and not is_hats_catalog(tmp_path)


def test_bad_arguments(sky, tmp_path):
    ds = sky["ds"]
    with pytest.raises(ValueError, match="radius_arcsec"):
        join_gaia_hats(ds, sky["hats"], radius_arcsec=0)
    with pytest.raises(ValueError, match="radius_arcsec"):
        join_gaia_hats(ds, sky["hats"], radius_arcsec="far")
    with pytest.raises(ValueError, match="'dec'"):
        join_gaia_hats(ds.drop_vars("dec"), sky["hats"])
    with pytest.raises(FileNotFoundError, match="catalog"):
        join_gaia_hats(ds, tmp_path / "nowhere")
    with pytest.raises(TypeError, match="catalog"):
        join_gaia_hats(ds, sky["gaia"])
    with pytest.raises(TypeError, match="ds"):
        join_gaia_hats(ds["ra"], sky["hats"])
    # a catalogue with none of the known columns
    other = tmp_path / "other"
    df = pd.DataFrame({"ra": [11.0, 12.0], "dec": [1.0, 2.0], "flux_x": [1.0, 2.0]})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lsdb.from_dataframe(df, catalog_name="other").write_catalog(other, progress_bar=False)
    with pytest.raises(ValueError, match="none of the known columns"):
        join_gaia_hats(ds, other)


def test_missing_lsdb_names_the_extra(sky, monkeypatch):
    from mspec.io import gaia_hats

    monkeypatch.setitem(sys.modules, "lsdb", None)  # import lsdb -> ImportError
    gaia_hats._open.cache_clear()
    try:
        with pytest.raises(ImportError, match=r"mspec\[survey\]"):
            join_gaia_hats(sky["ds"], sky["hats"])
    finally:
        gaia_hats._open.cache_clear()


def test_mspec_imports_without_lsdb():
    code = (
        "import sys; sys.modules['lsdb'] = None\n"
        "import mspec, mspec.cmd, mspec.scm, mspec.dgcm, mspec.io.gaia_hats, "
        "mspec.pipeline.stages, mspec.config\n"
        "assert mspec.io.gaia_hats.is_hats_catalog('https://x/y')\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    code = "import sys, mspec, mspec.cmd, mspec.scm; assert 'lsdb' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.slow
def test_pipeline_scm_with_hats_equals_table(tmp_path):
    """The SCM stage of `mspec.run` with `[gaia] hats` gives the outputs of `[gaia] table`
    (astropy, positional) on the same sources, over several chunks; the joined columns (not
    the store's own) reach the CMD."""
    import mspec
    from mspec.config import Config
    from mspec.io.store import open_store
    from mspec.pipeline import run
    from mspec.testing import tiny_models, tiny_survey_store, zarr_arrays_equal

    n, chunk = 48, 16
    store = tiny_survey_store(tmp_path / "survey", n, seed=11, chunk_size=chunk)
    models = tiny_models(tmp_path / "models")
    ds = open_store(store).compute()
    rng = np.random.default_rng(3)
    has = ds["gaia_source_id"].values >= 0
    perm = rng.permutation(n)  # another spectrum's Gaia values: the join must be visible
    cols = [c for c in mspec.cmd.GAIA_COLUMNS if c != "gaia_source_id"]
    rows = []
    for i in np.flatnonzero(has)[: n - 8]:  # the last few spectra get no source
        r, d = _offset(ds["ra"].values[i], ds["dec"].values[i], rng.uniform(0.2, 2.8), 40.0 * i)
        row = {c: float(ds[c].values[perm[i]]) for c in cols}
        rows.append({"source_id": SID0 + i, "ra": float(r), "dec": float(d), **row})
        r, d = _offset(ds["ra"].values[i], ds["dec"].values[i], rng.uniform(3.5, 6.0), 200.0)
        rows.append({"source_id": SID0 + 1000 + i, "ra": float(r), "dec": float(d), **row})
    table = pd.DataFrame(rows)
    table["source_id"] = table["source_id"].astype(np.int64)
    table.to_parquet(tmp_path / "gaia.parquet")
    lsdb.from_dataframe(table, catalog_name="gaia", partition_rows=10).write_catalog(
        tmp_path / "gaia_hats", progress_bar=False
    )

    def config(run_dir, **gaia):
        return Config.from_dict(
            {
                "store": str(store),
                "run_dir": str(run_dir),
                "chunk_size": chunk,
                "cluster": {"scheduler": "sync"},
                "models": {"dir": str(models)},
                "gaia": gaia,
            }
        )

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res_t = run(
            config(tmp_path / "run_t", table=str(tmp_path / "gaia.parquet")), stages=["scm"]
        )
        res_h = run(config(tmp_path / "run_h", hats=str(tmp_path / "gaia_hats")), stages=["scm"])
    for res in (res_t, res_h):
        assert res.stages["scm"]["computed"] == n // chunk
    a, b = tmp_path / "run_t" / "stages" / "scm.zarr", tmp_path / "run_h" / "stages" / "scm.zarr"
    import zarr

    arrays = set(zarr.open_group(str(b), mode="r").array_keys())
    assert {"CMD_pos", "is_m", "gaia_match_sep"} <= arrays
    sep = zarr.open_group(str(b), mode="r")["gaia_match_sep"][:]
    assert np.isfinite(sep).sum() == min(has.sum(), n - 8) and np.nanmax(sep) < 3.0
    diff = zarr_arrays_equal(a, b)
    # the separation differs by round-off only (astropy vs lsdb's chord distance)
    assert set(diff) <= {"gaia_match_sep"}, diff
    if diff:
        sep_t = zarr.open_group(str(a), mode="r")["gaia_match_sep"][:]
        np.testing.assert_allclose(sep, sep_t, atol=1e-6)
    # the CMD used the joined values, not the store's
    pos = zarr.open_group(str(b), mode="r")["CMD_pos"][:]
    own = mspec.cmd.place_dataset(ds, merge=False)["CMD_pos"].values
    assert np.any(pos != own)


def test_non_numeric_known_column_is_skipped_with_warning(sky, tmp_path):
    path = tmp_path / "strings"
    df = sky["gaia"][["source_id", "ra", "dec", "ruwe"]].copy()
    df["ruwe"] = df["ruwe"].map(lambda v: f"{v:.3f}")
    lsdb.from_dataframe(df, catalog_name="strings").write_catalog(path, progress_bar=False)
    with pytest.warns(GaiaTableWarning, match="'ruwe'.*not numeric"):
        out = join_gaia_hats(sky["ds"], path, merge=False)
    assert "ruwe" not in out and "gaia_source_id" in out
    np.testing.assert_array_equal(out["gaia_source_id"].values, sky["truth"])
