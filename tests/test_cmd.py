"""The Gaia CMD (paper Sect. 3.4.1): extinction, quality cuts, regions, tables, cross-match."""

from __future__ import annotations

import warnings

import dask.dataframe as dd
import numpy as np
import pandas as pd
import pytest
import xarray as xr

import mspec
from mspec.cmd import (
    CV18,
    DM_VERTICES,
    GAIA_COLUMNS,
    GaiaTableWarning,
    cmd_position,
    deredden,
    extinction_coefficients,
    join_gaia,
    load_gaia_table,
    place,
    place_dataset,
    quality_flag,
)
from mspec.stage import MergeWarning
from mspec.testing import raise_if_computes
from mspec.variables import validate

OUT = ["M_G_0", "bp_rp_0", "W1_W2_0", "CMD_flag", "CMD_pos"]


@pytest.fixture(scope="module")
def sim():
    return mspec.simulate_survey(300, seed=3)


def _good_row(**kw):
    row = {
        "phot_g_mean_mag": 14.0,
        "phot_bp_mean_mag": 15.4,
        "phot_rp_mean_mag": 12.9,
        "r_med_geo": 50.0,
        "ebv": 0.05,
        "parallax_over_error": 30.0,
        "phot_g_mean_flux_over_error": 500.0,
        "phot_bp_mean_flux_over_error": 100.0,
        "phot_rp_mean_flux_over_error": 200.0,
        "ruwe": 1.0,
        "w1": 10.0,
        "w2": 9.8,
    }
    row.update(kw)
    return row


# --- regions ----------------------------------------------------------------------------------
def test_dm_vertices_and_edges_are_dm():
    v = np.array(DM_VERTICES)
    assert cmd_position(v[:, 0], v[:, 1]).tolist() == ["dM"] * 4
    mids = 0.5 * (v + np.roll(v, -1, axis=0))
    assert cmd_position(mids[:, 0], mids[:, 1]).tolist() == ["dM"] * 4
    # centre, and just outside each edge (0.02 mag beyond the edge's midpoint)
    assert cmd_position([2.8], [10.75])[0] == "dM"
    centre = v.mean(axis=0)
    for m in mids:
        out = m + 0.02 * (m - centre) / np.linalg.norm(m - centre)
        assert cmd_position([out[0]], [out[1]])[0] != "dM", out


def test_gm_line_sides_and_outside():
    # M_G = 1.8 c - 2.2: at c = 3 the line is at 3.2; brighter (smaller M_G) is gM
    assert cmd_position([3.0], [2.5])[0] == "gM"
    assert cmd_position([3.0], [3.2])[0] == "gM"  # on the line: belongs to gM
    assert cmd_position([3.0], [3.9])[0] == "other"  # fainter than the line, not dM
    assert cmd_position([1.5], [0.0])[0] == "gM"
    assert cmd_position([0.3], [20.0])[0] == "other"  # outside both
    assert cmd_position([6.0], [17.0])[0] == "other"
    assert cmd_position([np.nan], [5.0])[0] == ""
    assert cmd_position([2.8, 2.8], [10.75, 10.75], flag=[0, 1]).tolist() == ["", "dM"]


# --- extinction ------------------------------------------------------------------------------
def test_extinction_coefficients_by_hand():
    # (BP-RP)_0 = 2.45 -> Teff 3430 K (dwarf sequence) -> T4 = 0.343
    r_g, r_bp, r_rp = extinction_coefficients(2.45)
    assert r_g == pytest.approx(1.4013 + 0.343 * (3.1406 - 1.5626 * 0.343), abs=1e-12)
    assert r_g == pytest.approx(2.294688, abs=1e-5)
    assert r_bp == pytest.approx(2.923789, abs=1e-5)
    assert r_rp == pytest.approx(1.975150, abs=1e-5)
    fixed = extinction_coefficients([1.0, 3.0], "cv18_fixed")
    np.testing.assert_array_equal(fixed[0], [2.740, 2.740])
    np.testing.assert_array_equal(fixed[1] - fixed[2], [1.339, 1.339])
    # clamped beyond the table
    assert extinction_coefficients(9.0)[0] == pytest.approx(1.4013 + 0.3 * (3.1406 - 1.5626 * 0.3))
    assert set(CV18) == {"G", "BP", "RP"}


def test_deredden_by_hand():
    g, bp, rp, d, e = 12.0, 13.5, 11.0, 100.0, 0.1
    r = deredden(g, bp, rp, d, e, 10.0, 9.9, coefficients="cv18_fixed")
    assert r["M_G_0"] == pytest.approx(12.0 - 10.0 + 5.0 - 0.274, abs=1e-12)
    assert r["bp_rp_0"] == pytest.approx(2.5 - 0.1339, abs=1e-12)
    assert r["W1_W2_0"] == pytest.approx(0.1 - 0.04 * 0.1, abs=1e-12)
    # colour-dependent: a self-consistent fixed point
    r = deredden(g, bp, rp, d, e)
    c0 = float(r["bp_rp_0"])
    rg, rbp, rrp = extinction_coefficients(c0)
    assert c0 == pytest.approx(2.5 - (rbp - rrp) * 0.1, abs=1e-9)
    assert float(r["M_G_0"]) == pytest.approx(7.0 - float(rg) * 0.1, abs=1e-9)
    assert float(r["A_G"]) == pytest.approx(float(rg) * 0.1, abs=1e-12)
    # big reddening still converges
    r = deredden(20.0, 22.0, 18.5, 1000.0, 1.5)
    rg, rbp, rrp = extinction_coefficients(r["bp_rp_0"])
    assert float(r["bp_rp_0"]) == pytest.approx(3.5 - (rbp - rrp) * 1.5, abs=1e-10)
    # missing distance / reddening / WISE
    r = deredden([12.0, 12.0, 12.0], 13.5, 11.0, [np.nan, -5.0, 100.0], [0.1, 0.1, np.nan])
    assert np.all(np.isnan(r["M_G_0"])) and np.isnan(r["bp_rp_0"][2])
    assert np.all(np.isnan(r["W1_W2_0"]))


@pytest.mark.parametrize("ebv", [0.0, 0.05, 0.3, 0.8, 1.5, 2.5, -0.04])
def test_redden_deredden_round_trip(ebv):
    """Reddening with extinction_coefficients at the true colour is undone by deredden.

    Bisection halves a 0.55 |E(B-V)| bracket N_ITER = 45 times, so (BP-RP)_0 is exact to
    ~1e-14 mag per unit E(B-V), plus float64 rounding of the magnitudes (~1e-14): 1e-10 mag
    is a tolerance with margin. This includes blue stars beyond E(B-V) 0.6, where a
    fixed-point iteration oscillates (|d(R_BP - R_RP)/d(BP-RP)_0| reaches 1.6 there).
    """
    c0 = np.linspace(-0.6, 5.2, 5801)  # OB stars to late M, across every kink of the sequence
    mg = np.linspace(-2.0, 16.0, c0.size)
    d = np.geomspace(3.0, 1e5, c0.size)
    e = np.full(c0.size, ebv)
    r_g, r_bp, r_rp = extinction_coefficients(c0)
    g = mg + 5 * np.log10(d) - 5 + r_g * e
    rp = g - 0.7
    bp = rp + c0 + (r_bp - r_rp) * e
    w1, w12 = g - 2.0, 0.2
    w2 = w1 - w12 - (mspec.cmd.R_W1 - mspec.cmd.R_W2) * e
    out = deredden(g, bp, rp, d, e, w1, w2)
    np.testing.assert_allclose(out["bp_rp_0"], c0, rtol=0, atol=1e-10)
    np.testing.assert_allclose(out["M_G_0"], mg, rtol=0, atol=1e-10)
    np.testing.assert_allclose(out["W1_W2_0"], w12, rtol=0, atol=1e-10)
    np.testing.assert_allclose(out["A_G"], r_g * e, rtol=0, atol=1e-10)


def test_simulator_photometry_deredden_to_truth(sim):
    """The simulator reddens with mspec.cmd's coefficients: its true distance and E(B-V)
    take every star back to its intrinsic colour and absolute magnitude.

    (1) Re-reddening the recovered (BP-RP)_0 with extinction_coefficients gives the
    observed BP-RP for every star; (2) the recovered (BP-RP)_0 of an M dwarf is the
    simulator's intrinsic colour at its true Teff (its dwarf sequence, which has no
    scatter in colour; M_G has scatter and is not stored, so (1) covers it through A_G).
    """
    from mspec.simulate import survey as sv

    has = np.isfinite(sim["phot_bp_mean_mag"].values)
    cls = sim["true_class"].values
    stars = has & ~np.isin(cls, ["GALAXY", "QSO"])
    g, bp, rp = (sim[c].values[stars] for c in _PHOT_COLS)
    dist, ebv = sim["true_distance"].values[stars], sim["true_ebv"].values[stars]
    out = deredden(g, bp, rp, dist, ebv)
    r_g, r_bp, r_rp = extinction_coefficients(out["bp_rp_0"])
    np.testing.assert_allclose(out["bp_rp_0"] + (r_bp - r_rp) * ebv, bp - rp, atol=1e-10)
    # intrinsic colours of M dwarfs: the simulator's dwarf sequence at the true Teff
    lum = sim["true_lumclass"].values[stars]
    teff = sim["true_teff"].values[stars]
    dm = lum == "dM"
    assert dm.sum() > 50
    c_true = np.interp(sv.sm.dwarf_subtype(teff[dm]), sv._DM_ST, sv._DM_C)
    np.testing.assert_allclose(out["bp_rp_0"][dm], c_true, rtol=0, atol=1e-10)
    # and with the old single coefficients they would be off by up to ~0.1 mag
    fixed = deredden(g, bp, rp, dist, ebv, coefficients="cv18_fixed")
    assert np.max(np.abs(fixed["bp_rp_0"][dm] - c_true)) > 0.01


_PHOT_COLS = ("phot_g_mean_mag", "phot_bp_mean_mag", "phot_rp_mean_mag")


# --- quality cuts -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "col, bad",
    [
        ("parallax_over_error", 5.0),
        ("phot_g_mean_flux_over_error", 20.0),
        ("phot_bp_mean_flux_over_error", 19.0),
        ("phot_rp_mean_flux_over_error", 20.0),
        ("ruwe", 1.4),
        ("ruwe", np.nan),
        ("parallax_over_error", np.nan),
    ],
)
def test_each_quality_cut(col, bad):
    df = pd.DataFrame([_good_row(), _good_row(**{col: bad})])
    out = place(df)
    assert out["CMD_flag"].tolist() == [1, 0]
    assert out["CMD_pos"].iloc[1] == ""
    assert out["CMD_pos"].iloc[0] == "dM"
    assert out["CMD_flag"].dtype == np.int8
    qcols = ["parallax_over_error", *(f"phot_{b}_mean_flux_over_error" for b in ("g", "bp", "rp"))]
    np.testing.assert_array_equal(quality_flag(*(df[c] for c in [*qcols, "ruwe"])), [1, 0])


def test_quality_thresholds_pass_just_inside():
    row = _good_row(
        parallax_over_error=5.0001,
        phot_g_mean_flux_over_error=20.01,
        phot_bp_mean_flux_over_error=20.01,
        phot_rp_mean_flux_over_error=20.01,
        ruwe=1.3999,
    )
    assert place(pd.DataFrame([row]))["CMD_flag"].tolist() == [1]


# --- tables ----------------------------------------------------------------------------------
def test_table_with_placed_columns():
    df = pd.DataFrame(
        {
            "bp_rp_0": [2.8, 3.0, 0.3],
            "M_G_0": [10.75, 2.0, 20.0],
            "parallax_over_error": [10.0, 10.0, 10.0],
            "phot_g_mean_flux_over_error": [50.0] * 3,
            "phot_bp_mean_flux_over_error": [50.0] * 3,
            "phot_rp_mean_flux_over_error": [50.0] * 3,
            "ruwe": [1.0, 1.0, 1.0],
        }
    )
    out = place(df)
    assert out["CMD_pos"].tolist() == ["dM", "gM", "other"]
    np.testing.assert_array_equal(out["M_G_0"], df["M_G_0"])
    assert out["W1_W2_0"].isna().all()
    # no quality columns: a warning, flag 0; require_flag=False still places them
    bare = df[["bp_rp_0", "M_G_0"]]
    with pytest.warns(GaiaTableWarning, match="quality"):
        out = place(bare)
    assert out["CMD_pos"].tolist() == ["", "", ""]
    with pytest.warns(GaiaTableWarning):
        out = place(bare, require_flag=False)
    assert out["CMD_pos"].tolist() == ["dM", "gM", "other"]
    # a given CMD_flag is used when the quality columns are absent
    out = place(bare.assign(CMD_flag=[1, 0, 1]))
    assert out["CMD_pos"].tolist() == ["dM", "", "other"]


def test_strings_in_numeric_columns():
    df = pd.DataFrame([_good_row(), _good_row(), _good_row()])
    df["ruwe"] = ["1.0", "bad", ""]
    df["ebv"] = df["ebv"].astype(object)
    df.loc[2, "ebv"] = "n/a"
    with pytest.warns(GaiaTableWarning) as rec:
        out = place(df)
    assert {"ruwe", "ebv"} <= {c for w in rec for c in ("ruwe", "ebv") if c in str(w.message)}
    assert out["CMD_flag"].tolist() == [1, 0, 0]
    assert np.isnan(out["M_G_0"].iloc[2]) and out["CMD_pos"].iloc[2] == ""


def test_dask_dataframe_equals_pandas(sim):
    cols = [c for c in GAIA_COLUMNS if c in sim]
    pdf = sim[cols].to_dataframe().reset_index(drop=True)
    ref = place(pdf)
    ddf = dd.from_pandas(pdf, npartitions=4)
    lazy = place(ddf)
    assert isinstance(lazy, dd.DataFrame)
    got = lazy.compute()
    pd.testing.assert_frame_equal(
        got.reset_index(drop=True), ref.reset_index(drop=True), check_dtype=False
    )
    assert got["CMD_flag"].dtype == np.int8


def test_place_bad_arguments():
    with pytest.raises(TypeError, match="table"):
        place({"a": 1})
    with pytest.raises(ValueError, match="coefficients"):
        place(pd.DataFrame([_good_row()]), coefficients="sfd")
    with pytest.raises(ValueError, match="r_med_geo"):
        place(pd.DataFrame([_good_row()]).drop(columns="r_med_geo"))


# --- the Dataset stage ------------------------------------------------------------------------
def test_place_dataset_equals_place(sim):
    out = place_dataset(sim, merge=False)
    validate(out, OUT)
    cols = [c for c in GAIA_COLUMNS if c in sim]
    ref = place(sim[cols].to_dataframe().reset_index(drop=True))
    for c in OUT[:3]:
        np.testing.assert_array_equal(out[c].values, ref[c].to_numpy())
    np.testing.assert_array_equal(out["CMD_flag"].values, ref["CMD_flag"].to_numpy())
    assert out["CMD_pos"].values.tolist() == ref["CMD_pos"].tolist()
    assert out["M_G_0"].attrs["units"] == "mag"


def test_place_dataset_lazy(sim):
    lazy = sim.chunk({"spectra": 64})
    with raise_if_computes():
        out = place_dataset(lazy)
        validate(out, OUT)
    assert out["CMD_pos"].chunks is not None
    ref = place_dataset(sim, merge=False)
    got = out[OUT].compute()
    for c in OUT:
        np.testing.assert_array_equal(got[c].values, ref[c].values)
    with pytest.warns(MergeWarning):
        place_dataset(out)


def test_simulated_truth_regions(sim):
    """With the default coefficients (the simulator's), flagged M dwarfs/giants land in
    their regions."""
    out = place_dataset(sim, merge=False)
    lum = sim["true_lumclass"].values
    flag = out["CMD_flag"].values == 1
    pos = out["CMD_pos"].values
    assert np.mean(pos[(lum == "dM") & flag] == "dM") > 0.95
    if ((lum == "gM") & flag).sum():
        assert np.mean(pos[(lum == "gM") & flag] == "gM") > 0.8
    # Gaia-less spectra are never placed
    assert np.all(pos[sim["gaia_source_id"].values == -1] == "")


# --- Gaia/WISE input --------------------------------------------------------------------------
def _ds_positions(n=40, seed=0):
    rng = np.random.default_rng(seed)
    ra = rng.uniform(0, 360, n)
    dec = rng.uniform(-30, 80, n)
    return xr.Dataset(
        {"ra": ("spectra", ra), "dec": ("spectra", dec)},
        coords={"obsid": ("spectra", np.arange(1000, 1000 + n, dtype=np.int64))},
    )


def _offset(ra, dec, arcsec, pa_deg):
    from astropy import units as u
    from astropy.coordinates import SkyCoord

    c = SkyCoord(ra * u.deg, dec * u.deg).directional_offset_by(pa_deg * u.deg, arcsec * u.arcsec)
    return c.ra.deg, c.dec.deg


def _pos_table(ds):
    ra, dec = ds["ra"].values, ds["dec"].values
    rows = []
    offsets = {0: 0.5, 1: 1.9, 2: 2.95, 3: 3.5, 4: 10.0}  # arcsec
    for i, sep in offsets.items():
        r, d = _offset(ra[i], dec[i], sep, 37.0 * i)
        rows.append(
            {"ra": r, "dec": d, "gaia_source_id": 4_000_000_000_000_000_000 + i, "ruwe": 1.0 + i}
        )
    for i in range(10, 20):  # exact positions
        rows.append(
            {
                "ra": ra[i],
                "dec": dec[i],
                "gaia_source_id": 5_000_000_000_000_000_000 + i,
                "ruwe": 2.0,
            }
        )
    rows.append({"ra": np.nan, "dec": 0.0, "gaia_source_id": 7, "ruwe": 9.0})  # unusable row
    return pd.DataFrame(rows)


def test_crossmatch_by_position():
    ds = _ds_positions()
    tab = _pos_table(ds)
    out = join_gaia(ds, tab, on="position", merge=False)
    sid = out["gaia_source_id"].values
    assert sid[0] == 4_000_000_000_000_000_000  # exact int64, no float round trip
    assert sid[1] == 4_000_000_000_000_000_001 and sid[2] == 4_000_000_000_000_000_002
    assert sid[3] == -1 and sid[4] == -1  # 3.5" and 10" are not matches
    assert np.all(sid[10:20] == 5_000_000_000_000_000_000 + np.arange(10, 20))
    unmatched = np.r_[3:10, 20:40]
    assert np.all(sid[unmatched] == -1)
    assert np.all(np.isnan(out["ruwe"].values[unmatched]))
    np.testing.assert_allclose(out["gaia_match_sep"].values[:3], [0.5, 1.9, 2.95], atol=1e-6)
    assert np.isnan(out["gaia_match_sep"].values[3])
    validate(out, ["gaia_source_id", "ruwe", "gaia_match_sep"])
    # the radius is honoured
    wide = join_gaia(ds, tab, on="position", radius_arcsec=4.0, merge=False)
    assert wide["gaia_source_id"].values[3] == 4_000_000_000_000_000_003


def test_crossmatch_lazy_equals_eager():
    ds = _ds_positions(60, seed=1)
    tab = _pos_table(ds)
    ref = join_gaia(ds, tab, on="position", merge=False)
    lazy_ds = ds.chunk({"spectra": 7})
    with raise_if_computes():
        lazy = join_gaia(lazy_ds, tab, on="position")
    assert lazy["ruwe"].chunks is not None
    got = lazy.compute()
    for c in ("gaia_source_id", "ruwe", "gaia_match_sep"):
        np.testing.assert_array_equal(got[c].values, ref[c].values)


def test_join_by_obsid_with_bad_values():
    ds = _ds_positions(8)
    tab = pd.DataFrame(
        {
            "obsid": [1005, 1001, 1001, 9999, 1003],
            "source_id": [11, 22, 33, 44, 55],  # Gaia archive name
            "ruwe": ["1.1", "x", "1.3", "1.4", "1.5"],
            "r_med_geo": [10.0, 20.0, 30.0, 40.0, 50.0],
        }
    )
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        out = join_gaia(ds, tab, on="obsid", merge=False)
    msgs = " ".join(str(w.message) for w in rec)
    assert "ruwe" in msgs and "duplicated" in msgs
    assert out["gaia_source_id"].values.tolist() == [-1, 22, -1, 55, -1, 11, -1, -1]
    np.testing.assert_array_equal(
        out["r_med_geo"].values, [np.nan, 20.0, np.nan, 50.0, np.nan, 10.0, np.nan, np.nan]
    )
    assert np.isnan(out["ruwe"].values[1])  # the string became NaN
    assert out["ruwe"].values[3] == 1.5
    tab = tab.drop(columns="ruwe").drop_duplicates("obsid")
    merged = join_gaia(ds.chunk({"spectra": 3}), tab, on="obsid")
    assert merged["r_med_geo"].chunks is not None
    np.testing.assert_array_equal(merged["r_med_geo"].values, out["r_med_geo"].values)
    with pytest.warns(MergeWarning):
        join_gaia(merged, tab, on="obsid")


def test_join_bad_arguments():
    ds = _ds_positions(4)
    tab = pd.DataFrame({"obsid": [1000], "ruwe": [1.0]})
    with pytest.raises(ValueError, match="on"):
        join_gaia(ds, tab, on="name")
    with pytest.raises(ValueError, match="radius_arcsec"):
        join_gaia(ds, tab, on="position", radius_arcsec=-1)
    with pytest.raises(ValueError, match="ra"):
        join_gaia(ds, tab, on="position")
    with pytest.raises(ValueError, match="known columns"):
        join_gaia(ds, pd.DataFrame({"obsid": [1000]}))
    with pytest.raises(TypeError, match="table"):
        join_gaia(ds, [1, 2])


def test_load_gaia_table_formats(tmp_path):
    from astropy.table import Table

    df = pd.DataFrame(
        {
            "OBSID": [1000, 1001],
            "SOURCE_ID": [4_000_000_000_000_000_001, 4_000_000_000_000_000_002],
            "RA": [10.0, 11.0],
            "DEC": [1.0, 2.0],
            "ruwe": [1.1, 1.2],
            "M_G_0": [9.0, 10.0],
        }
    )
    df.to_parquet(tmp_path / "t.parquet")
    Table.from_pandas(df).write(tmp_path / "t.fits")
    csv = df.copy().astype({"ruwe": object})
    csv.loc[1, "ruwe"] = "oops"
    csv.to_csv(tmp_path / "t.csv", index=False)
    for name in ("t.parquet", "t.fits"):
        got = load_gaia_table(tmp_path / name)
        assert list(got.columns) == ["obsid", "gaia_source_id", "ra", "dec", "ruwe", "M_G_0"]
        assert got["gaia_source_id"].tolist() == [
            4_000_000_000_000_000_001,
            4_000_000_000_000_000_002,
        ]
        np.testing.assert_array_equal(got["ruwe"], [1.1, 1.2])
    with pytest.warns(GaiaTableWarning, match="ruwe"):
        got = load_gaia_table(tmp_path / "t.csv")
    assert np.isnan(got["ruwe"].iloc[1])
    assert got["gaia_source_id"].iloc[1] == 4_000_000_000_000_000_002
    ds = _ds_positions(3)
    out = join_gaia(ds, str(tmp_path / "t.parquet"), merge=False)
    assert out["M_G_0"].values[:2].tolist() == [9.0, 10.0]
    with pytest.raises(FileNotFoundError, match="path"):
        load_gaia_table(tmp_path / "missing.parquet")
    (tmp_path / "t.xlsx").write_text("x")
    with pytest.raises(ValueError, match="path"):
        load_gaia_table(tmp_path / "t.xlsx")
