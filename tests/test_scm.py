"""SCM decision rules (mspec.scm): every branch on hand-made inputs, decisions, entry,
laziness, chunking, Gaia tables; recovery on a simulated survey with simulator-trained CNNs
is in tests/test_classification_sim.py."""

from __future__ import annotations

import importlib.util

import numpy as np
import pandas as pd
import pytest
import xarray as xr

import mspec
from mspec.scm import (
    SCM_REASONS,
    lamost_is_m,
    new_m_table,
    scm_decide,
    select_m_stars,
)
from mspec.stage import MergeWarning, get_stage
from mspec.testing import raise_if_computes

SPT = ["OB", "A", "F", "G", "K", "M", "GALAXY", "QSO"]
WDM = ["WD", "M"]


def spt(**p):
    """CNN-SPT probabilities: the named classes, the rest shared equally."""
    v = np.zeros(len(SPT))
    for k, x in p.items():
        v[SPT.index(k)] = x
    rest = 1.0 - v.sum()
    free = v == 0
    v[free] = rest / free.sum()
    return v


# name: (spt probs, p_WD, lamost subclass, CMD_pos, bp_rp_0, extra, expected class, reason)
CASES = {
    "m": (spt(M=0.99), 0.001, "dM2", "dM", 2.3, {}, "M", "direct"),
    "k_weak": (spt(K=0.6, M=0.39), 0.001, "M0", "dM", 1.9, {}, "M", "direct"),
    "k": (spt(K=0.97, M=0.02), 0.001, "M0", "dM", 1.6, {}, "K", "k_not_m"),
    "cmd_only": (spt(M=0.99), 0.001, "dM3", "other", 2.3, {}, "M", "m_cmd_only"),
    "overruled": (spt(GALAXY=0.7, M=0.29), 0.01, "dM4", "dM", 2.4, {}, "M", "m_cnn_overruled"),
    "wd": (spt(A=0.9, M=0.02), 0.995, "M2", "other", 0.3, {}, "WD", "wd"),
    "g": (spt(G=0.99, M=0.001), 0.01, "M1", "dM", 0.9, {}, "G", "spt_non_m"),
    "cmd_blue": (spt(M=0.55, K=0.44), 0.001, "M0", "other", 1.5, {}, "K", "cmd_non_m"),
    "s": (spt(M=0.95), 0.001, "gM3", "gM", 2.8, {"zro": 0.6, "snr_r": 60}, "S", "s_star"),
    "c": (spt(M=0.9), 0.001, "gM1", "gM", 2.6, {"c2": 0.4, "snr_g": 40}, "C", "c_star"),
    "nodata": (np.full(8, np.nan), np.nan, "dM1", "", np.nan, {}, "UNKNOWN", "no_data"),
    "not_lamost_m": (spt(G=0.99), 0.001, "G5", "dM", 0.8, {}, "", ""),
}


def make_ds(cases=CASES, chunks=None):
    names = list(cases)
    n = len(names)
    sp = np.stack([cases[k][0] for k in names])
    pwd = np.array([cases[k][1] for k in names])
    wd = np.stack([pwd, 1 - pwd], axis=1)
    extra = {k: np.full(n, np.nan) for k in ("zro", "c2", "snr_r", "snr_g")}
    for i, k in enumerate(names):
        for e, v in cases[k][5].items():
            extra[e][i] = v
    ds = xr.Dataset(
        {
            "spt_prob": (("spectra", "spt_classes"), sp),
            "spt_class": ("spectra", np.array([""] * n)),
            "wdm_prob": (("spectra", "wdm_classes"), wd),
            "lamost_subclass": ("spectra", np.array([cases[k][2] for k in names])),
            "lamost_class": ("spectra", np.array(["STAR"] * n)),
            "CMD_pos": ("spectra", np.array([cases[k][3] for k in names], dtype="<U5")),
            "bp_rp_0": ("spectra", np.array([cases[k][4] for k in names], float)),
            "CMD_flag": ("spectra", np.array([int(cases[k][3] != "") for k in names], np.int8)),
            "idx_zro": ("spectra", extra["zro"]),
            "idx_c2": ("spectra", extra["c2"]),
            "snr_r": ("spectra", extra["snr_r"]),
            "snr_g": ("spectra", extra["snr_g"]),
        },
        coords={
            "obsid": ("spectra", np.arange(100, 100 + n)),
            "spt_classes": SPT,
            "wdm_classes": WDM,
        },
    )
    if chunks is not None:
        ds = ds.chunk({"spectra": chunks})
    return ds, names


def test_lamost_m_list():
    got = lamost_is_m(["dM2", "gM0", "sdM1", "M3", "K7", "G5", "", "Non", "dm1", " M0"])
    assert got.tolist() == [True, True, True, True, False, False, False, False, True, True]


def test_every_branch():
    ds, names = make_ds()
    out = select_m_stars(ds, merge=False)
    seen = set()
    for i, k in enumerate(names):
        exp_cls, exp_reason = CASES[k][6], CASES[k][7]
        assert out["scm_class"].values[i] == exp_cls, k
        assert out["scm_reason"].values[i] == exp_reason, k
        assert out["is_m"].values[i] == (exp_cls == "M"), k
        seen.add(exp_reason)
    assert not out["entered"].values[names.index("not_lamost_m")]
    assert np.isnan(out["scm_prob"].values[names.index("not_lamost_m")])
    assert np.isnan(out["scm_prob"].values[names.index("nodata")])
    p = out["scm_prob"].values
    live = [i for i, k in enumerate(names) if k not in ("nodata", "not_lamost_m")]
    assert np.all((p[live] > 0.5) & (p[live] <= 1.0))
    assert p[names.index("m")] > 0.999
    # every rule but "human" (test_decisions_honoured) is met here
    assert seen - {""} == set(SCM_REASONS) - {"human"}


def test_inspection_queue():
    cases = {
        # confident CNN-SPT galaxy against an M colour: overruled by colour + LAMOST, queued
        "conflict": (spt(GALAXY=0.95, M=0.04), 0.01, "dM2", "dM", 2.4, {}, "M", ""),
        # evenly balanced evidence: low probability
        "unsure": (spt(M=0.5, K=0.49), 0.001, "M0", "dM", 1.70, {}, "M", ""),
        # ZrO just below its threshold: S, but weak
        "weak_s": (spt(M=0.95), 0.001, "gM3", "gM", 2.8, {"zro": 0.84, "snr_r": 60}, "S", ""),
        "clear": (spt(M=0.99), 0.001, "dM2", "dM", 2.3, {}, "M", ""),
    }
    ds, names = make_ds(cases)
    out = select_m_stars(ds, merge=False)
    insp = dict(zip(names, out["scm_inspect"].values))
    assert insp["conflict"] == "cnn_colour_conflict"
    assert insp["unsure"] == "low_prob"
    assert insp["weak_s"] == "weak_band"
    assert insp["clear"] == ""
    assert out["scm_class"].values[names.index("weak_s")] == "S"


def test_entry_all_and_new_m():
    cases = {
        "m_typed_k": (spt(M=0.98), 0.001, "K7", "dM", 2.0, {}, "M", "direct"),
        "k": (spt(K=0.95, M=0.04), 0.001, "K5", "dM", 1.5, {}, "K", "k_not_m"),
        "g": (spt(G=0.99), 0.001, "G2", "dM", 0.8, {}, "G", "spt_non_m"),
        # CNN-SPT says M but LAMOST typed it F and the colour is blue: not M
        "blue_m": (spt(M=0.6, F=0.3), 0.001, "F5", "dM", 1.1, {}, "F", "cmd_non_m"),
        "lamost_m": (spt(M=0.99), 0.001, "dM2", "dM", 2.3, {}, "M", "direct"),
    }
    ds, names = make_ds(cases)
    lam = select_m_stars(ds, merge=False)
    assert lam["entered"].values.tolist() == [False, False, False, False, True]
    assert not lam["new_m"].values.any()
    assert lam.attrs["scm_entry"] == "lamost"
    al = select_m_stars(ds, entry="all", merge=False)
    assert al["entered"].values.all()
    for i, k in enumerate(names):
        assert al["scm_class"].values[i] == cases[k][6], k
        assert al["scm_reason"].values[i] == cases[k][7], k
    assert al["new_m"].values.tolist() == [True, False, False, False, False]
    merged = select_m_stars(ds, entry="all")
    tab = new_m_table(merged)
    assert tab["obsid"].tolist() == [100]
    assert tab["lamost_subclass"].tolist() == ["K7"]


def test_decisions_honoured(tmp_path):
    ds, names = make_ds()
    dec = pd.DataFrame(
        {
            "obsid": [100 + names.index("m"), 100 + names.index("wd"), 100 + names.index("g")],
            "decision": ["binary", "M", "non-M"],
        }
    )
    out = select_m_stars(ds, decisions=dec, merge=False)
    i_m, i_wd, i_g = names.index("m"), names.index("wd"), names.index("g")
    assert out["scm_class"].values[i_m] == "BINARY" and not out["is_m"].values[i_m]
    assert out["scm_class"].values[i_wd] == "M" and out["is_m"].values[i_wd]
    assert out["scm_class"].values[i_g] == "UNKNOWN"
    for i in (i_m, i_wd, i_g):
        assert out["scm_reason"].values[i] == "human"
        assert out["scm_prob"].values[i] == 1.0
        assert out["scm_inspect"].values[i] == ""
    assert out.attrs["scm_decisions"] == 3
    # the same from a CSV file (the review queue's format)
    p = tmp_path / "decisions.csv"
    dec.to_csv(p, index=False)
    again = select_m_stars(ds, decisions=p, merge=False)
    np.testing.assert_array_equal(again["scm_class"].values, out["scm_class"].values)
    # unknown obsid: warned and ignored; duplicated obsid: the last wins
    extra = pd.concat([dec, pd.DataFrame({"obsid": [999, 100], "decision": ["G", "A"]})])
    with pytest.warns(UserWarning, match="not in the dataset|duplicated"):
        w = select_m_stars(ds, decisions=extra, merge=False)
    assert w["scm_class"].values[names.index("m")] == "A"


def test_bad_arguments():
    ds, _ = make_ds()
    with pytest.raises(ValueError, match="entry"):
        select_m_stars(ds, entry="some")
    with pytest.raises(ValueError, match="decision 'purple'"):
        select_m_stars(ds, decisions=pd.DataFrame({"obsid": [100], "decision": ["purple"]}))
    with pytest.raises(ValueError, match="obsid"):
        select_m_stars(ds, decisions=pd.DataFrame({"id": [100], "decision": ["M"]}))
    with pytest.raises(TypeError, match="decisions"):
        select_m_stars(ds, decisions=[("100", "M")])
    with pytest.raises(mspec.variables.VariableError, match="spt_prob"):
        select_m_stars(ds.drop_vars("spt_prob"))
    with pytest.raises(ValueError, match="gaia"):
        select_m_stars(ds.drop_vars(["CMD_pos"]), gaia=pd.DataFrame({"obsid": [100], "ra": [1.0]}))


def test_stage_contract_merge_and_flags():
    ds, _ = make_ds()
    spec = get_stage("select_m_stars")
    assert spec.module == "SCM"
    merged = select_m_stars(ds)
    assert "spt_prob" in merged and "is_m" in merged
    assert set(spec.outputs) <= set(merged.data_vars)
    mspec.validate(merged, list(spec.outputs))
    with pytest.warns(MergeWarning):
        select_m_stars(merged)
    assert merged["scm_prob"].attrs["long_name"]


@pytest.mark.parametrize("chunks", [1, 3, 5])
def test_lazy_and_chunked_equals_unchunked(chunks):
    ref = select_m_stars(make_ds()[0], merge=False)
    lazy_in = make_ds(chunks=chunks)[0]
    with raise_if_computes():
        lazy = select_m_stars(lazy_in, merge=False)
    assert lazy["is_m"].chunks is not None
    got = lazy.compute()
    for v in ref.data_vars:
        np.testing.assert_array_equal(got[v].values, ref[v].values, err_msg=v)


def test_simulated_store_without_cnn_columns_measures_cmd_and_indices():
    """CMD from the store's Gaia columns, ZrO/C2 measured from the flux, all lazily."""
    sim = mspec.simulate_survey(30, seed=3)
    n = sim.sizes["spectra"]
    rng = np.random.default_rng(0)
    sp = rng.dirichlet(np.ones(8), n)
    ds = sim.assign(
        spt_prob=(("spectra", "spt_classes"), sp),
        wdm_prob=(("spectra", "wdm_classes"), np.tile([0.1, 0.9], (n, 1))),
    ).assign_coords(spt_classes=SPT, wdm_classes=WDM)
    with raise_if_computes():
        out = select_m_stars(ds.chunk({"spectra": 10}), entry="all", merge=False)
    assert out.attrs["scm_cmd_source"] == "gaia columns"
    assert out.attrs["scm_indices_source"].startswith("measured")
    out = out.compute()
    assert out["entered"].values.all()
    assert set(out["scm_reason"].values) <= set(SCM_REASONS)


def test_gaia_table_joined_and_missing_rows():
    """A Gaia table (obsid-keyed) supplies the CMD where the store has none; rows it lacks
    simply get no CMD evidence."""
    sim = mspec.simulate_survey(12, seed=4, mix={"dM": 1.0})
    cols = [
        "phot_g_mean_mag",
        "phot_bp_mean_mag",
        "phot_rp_mean_mag",
        "parallax_over_error",
        "phot_g_mean_flux_over_error",
        "phot_bp_mean_flux_over_error",
        "phot_rp_mean_flux_over_error",
        "ruwe",
        "r_med_geo",
        "ebv",
    ]
    table = pd.DataFrame({c: sim[c].values for c in cols})
    table.insert(0, "obsid", sim["obsid"].values)
    table = table.iloc[:8]  # four spectra have no row
    n = sim.sizes["spectra"]
    base = sim.drop_vars([c for c in sim.data_vars if c.startswith(("phot_", "parallax"))])
    base = base.drop_vars(["ruwe", "r_med_geo", "ebv"])
    ds = base.assign(
        spt_prob=(("spectra", "spt_classes"), np.tile(spt(M=0.6, K=0.39), (n, 1))),
        wdm_prob=(("spectra", "wdm_classes"), np.tile([0.01, 0.99], (n, 1))),
        lamost_subclass=("spectra", np.array(["M1"] * n)),
    ).assign_coords(spt_classes=SPT, wdm_classes=WDM)
    ds = ds.drop_vars(["flux", "ivar", "ormask", "andmask"])
    out = select_m_stars(ds, gaia=table, merge=False)
    assert out.attrs["scm_cmd_source"] == "gaia table"
    nocmd = select_m_stars(ds, merge=False)
    assert nocmd.attrs["scm_cmd_source"] == "none"
    # rows 8.. have no Gaia row: same probability as without any table
    np.testing.assert_allclose(out["scm_prob"].values[8:], nocmd["scm_prob"].values[8:])
    # matched M dwarfs with a reliable colour gain the colour evidence (red): a higher M
    # probability; faint ones (BP/RP flux over error <= 20) gain nothing
    a, b = out["scm_prob"].values[:8], nocmd["scm_prob"].values[:8]
    ok = (table["phot_bp_mean_flux_over_error"] > 20) & (table["phot_rp_mean_flux_over_error"] > 20)
    assert ok.sum() >= 4
    assert np.all(a[ok.to_numpy()] > b[ok.to_numpy()])
    np.testing.assert_allclose(a[~ok.to_numpy()], b[~ok.to_numpy()])


def test_scm_decide_numpy_direct():
    """The numpy core works without xarray (one block) and handles an empty block."""
    r = scm_decide(np.zeros((0, 8)), SPT, np.zeros((0, 2)), WDM, np.array([], str),
                   np.array([], str), np.array([]))  # fmt: skip
    assert r["is_m"].shape == (0,)
    r = scm_decide(spt(M=0.99)[None], SPT, np.array([[0.0, 1.0]]), WDM, ["dM1"], [""], [np.nan])
    assert r["is_m"].tolist() == [True] and r["scm_reason"].tolist() == ["direct"]


def test_review_decisions_file_with_modules(tmp_path):
    """The review queue's decisions CSV (obsid,module,decision): only SCM rows count."""
    ds, names = make_ds()
    i_m, i_g = names.index("m"), names.index("g")
    p = tmp_path / "decisions.csv"
    p.write_text(
        f"obsid,module,decision\n{100 + i_m},SCM,WD\n{100 + i_g},RVMM,TM\n{100 + i_g},DGCM,gM\n"
    )
    out = select_m_stars(ds, decisions=p, merge=False)
    assert out["scm_class"].values[i_m] == "WD" and out["scm_reason"].values[i_m] == "human"
    assert out["scm_reason"].values[i_g] == "spt_non_m"  # RVMM/DGCM rows ignored
    assert out.attrs["scm_decisions"] == 1
    if importlib.util.find_spec("mspec.review") is not None:
        from mspec.review import read_decisions

        df = read_decisions(p)
        again = select_m_stars(ds, decisions=df, merge=False)
        np.testing.assert_array_equal(again["scm_class"].values, out["scm_class"].values)
