"""DGCM decision rules (mspec.dgcm): every branch on hand-made inputs, decisions, the
index score, laziness and chunking; recovery on a simulated survey with simulator-trained
CNNs is in tests/test_classification_sim.py."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import xarray as xr

import mspec
from mspec.dgcm import (
    DGCM_REASONS,
    giant_log_odds,
    index_score,
    lamost_luminosity,
    split_dwarfs_giants,
)
from mspec.indices import spectral_indices
from mspec.stage import MergeWarning, get_stage
from mspec.testing import raise_if_computes

# index values of a typical dwarf / giant at TiO5 = 0.6 (cah3, tio5, nai, caii)
DWARF_IDX = (0.78, 0.6, 2.5, 5.0)
GIANT_IDX = (0.97, 0.6, 0.3, 9.0)
NO_IDX = (np.nan,) * 4

# name: (p_gM, CMD_pos, LAMOST subclass, indices, is_m, expected class, reason)
CASES = {
    "direct": (0.01, "dM", "dM2", DWARF_IDX, True, "dM", "direct"),
    "agree": (0.99, "gM", "gM2", GIANT_IDX, True, "gM", "all_agree"),
    "cmd": (0.9, "dM", "dM1", NO_IDX, True, "dM", "cmd"),
    "over_cmd": (0.999, "dM", "gM3", GIANT_IDX, True, "gM", "spectra_over_cmd"),
    "cnn": (0.99, "", "dM2", NO_IDX, True, "gM", "cnn"),
    "indices": (0.2, "", "gM1", DWARF_IDX, True, "dM", "indices"),
    "lamost": (0.3, "", "gM1", NO_IDX, True, "gM", "lamost"),
    "no_data": (np.nan, "", "", NO_IDX, True, "dM", "no_data"),
    "not_m": (0.99, "gM", "gM1", GIANT_IDX, False, "", ""),
}


def make_ds(cases=CASES, chunks=None, with_is_m=True):
    names = list(cases)
    n = len(names)
    pg = np.array([cases[k][0] for k in names], float)
    idx = np.array([cases[k][3] for k in names], float)
    ds = xr.Dataset(
        {
            "dmgm_prob": (("spectra", "dmgm_classes"), np.stack([1 - pg, pg], axis=1)),
            "CMD_pos": ("spectra", np.array([cases[k][1] for k in names], dtype="<U5")),
            "bp_rp_0": ("spectra", np.full(n, 2.5)),
            "lamost_subclass": ("spectra", np.array([cases[k][2] for k in names])),
            "idx_cah3": ("spectra", idx[:, 0]),
            "idx_tio5": ("spectra", idx[:, 1]),
            "ew_nai": ("spectra", idx[:, 2]),
            "ew_caii": ("spectra", idx[:, 3]),
            "snr_i": ("spectra", np.full(n, 50.0)),
        },
        coords={"obsid": ("spectra", np.arange(10, 10 + n)), "dmgm_classes": ["dM", "gM"]},
    )
    if with_is_m:
        ds["is_m"] = ("spectra", np.array([cases[k][4] for k in names]))
    if chunks is not None:
        ds = ds.chunk({"spectra": chunks})
    return ds, names


def test_lamost_luminosity():
    got = lamost_luminosity(["gM3", "dM1", "sdM2", "M0", "K7", "G2", "", "Non", "GM1"])
    assert got.tolist() == [1, -1, -1, -1, -1, 0, 0, 0, 1]


def test_index_score_directions():
    d = index_score(*DWARF_IDX)
    g = index_score(*GIANT_IDX)
    assert d < -2 and g > 2
    assert np.isnan(index_score(*NO_IDX))
    # one term is enough; low S/N shrinks the score
    assert index_score(np.nan, np.nan, np.nan, 9.5) > 1
    assert abs(index_score(*GIANT_IDX, snr_i=6.0)) < abs(g) / 4
    assert -4 <= index_score(0.5, 0.3, 8.0, 1.0) <= 4  # clipped


def test_index_score_on_simulated_m_stars():
    """Table 3 on simulated spectra: the score separates dwarfs from giants."""
    sim = mspec.simulate_survey(300, seed=21, mix={"dM": 0.5, "gM": 0.5})
    ind = spectral_indices(sim, rv="lamost_rv", merge=False)
    sc = index_score(ind["idx_cah3"], ind["idx_tio5"], ind["ew_nai"], ind["ew_caii"],
                     sim["snr_i"])  # fmt: skip
    lum = sim["true_lumclass"].values
    ok = np.isfinite(sc) & (sim["snr_i"].values > 20)
    assert ok.sum() > 100
    right = np.where(lum[ok] == "gM", sc[ok] > 0, sc[ok] < 0)
    assert right.mean() > 0.9


def test_every_branch():
    ds, names = make_ds()
    out = split_dwarfs_giants(ds, merge=False)
    for i, k in enumerate(names):
        assert out["luminosity_class"].values[i] == CASES[k][5], k
        assert out["dgcm_reason"].values[i] == CASES[k][6], k
    seen = set(out["dgcm_reason"].values) - {""}
    assert seen == set(DGCM_REASONS) - {"human"}
    p = out["dgcm_prob"].values
    i_not, i_nod = names.index("not_m"), names.index("no_data")
    assert np.isnan(p[i_not]) and np.isnan(p[i_nod])
    live = [i for i in range(len(names)) if i not in (i_not, i_nod)]
    assert np.all((p[live] > 0.5) & (p[live] <= 1))
    insp = dict(zip(names, out["dgcm_inspect"].values))
    assert insp["over_cmd"] == "cnn_cmd_conflict"
    assert insp["no_data"] == "no_data"
    assert insp["agree"] == "" and insp["direct"] == ""
    assert np.isnan(out["dgcm_idx_score"].values[i_not])
    assert out["dgcm_idx_score"].values[names.index("agree")] > 2


def test_inspection_queue():
    cases = {
        # not a candidate (LAMOST dwarf, CNN below 0.5, CMD not gM) but the indices say giant
        "giant_like": (0.45, "", "dM2", GIANT_IDX, True, "dM", "direct"),
        # balanced: CNN 0.7 giant against LAMOST dwarf -> low probability
        "unsure": (0.7, "", "dM2", NO_IDX, True, "dM", "lamost"),
    }
    ds, names = make_ds(cases)
    out = split_dwarfs_giants(ds, merge=False)
    for i, k in enumerate(names):
        assert out["luminosity_class"].values[i] == cases[k][5], k
        assert out["dgcm_reason"].values[i] == cases[k][6], k
    insp = dict(zip(names, out["dgcm_inspect"].values))
    assert insp == {"giant_like": "direct_giant_like", "unsure": "low_prob"}


def test_log_odds_parts():
    parts = giant_log_odds([0.5, 0.999, np.nan], ["gM", "", "dM"], [1, -1, 0], [np.nan, 1.0, 0])
    np.testing.assert_allclose(parts["cnn"], [0.0, np.log(999), 0.0])
    np.testing.assert_allclose(parts["cmd"], [8.0, 0.0, -8.0])
    np.testing.assert_allclose(parts["lamost"], [2.0, -2.0, 0.0])
    np.testing.assert_allclose(parts["total"], parts["cnn"] + parts["cmd"] + parts["lamost"]
                               + parts["idx"])  # fmt: skip


def test_decisions_honoured(tmp_path):
    ds, names = make_ds()
    dec = pd.DataFrame(
        {"obsid": [10 + names.index("agree"), 10 + names.index("not_m")], "decision": ["dm", "gM"]}
    )
    out = split_dwarfs_giants(ds, decisions=dec, merge=False)
    i = names.index("agree")
    assert out["luminosity_class"].values[i] == "dM"
    assert out["dgcm_reason"].values[i] == "human" and out["dgcm_prob"].values[i] == 1.0
    # a non-M spectrum stays non-M: its verdict belongs to SCM's decisions
    assert out["luminosity_class"].values[names.index("not_m")] == ""
    p = tmp_path / "dgcm.csv"
    dec.to_csv(p, index=False)
    again = split_dwarfs_giants(ds, decisions=str(p), merge=False)
    np.testing.assert_array_equal(again["luminosity_class"].values, out["luminosity_class"].values)
    with pytest.raises(ValueError, match="decision 'S'"):
        split_dwarfs_giants(ds, decisions=pd.DataFrame({"obsid": [10], "decision": ["S"]}))


def test_without_is_m_every_spectrum_counts():
    ds, names = make_ds(with_is_m=False)
    out = split_dwarfs_giants(ds, merge=False)
    assert out["luminosity_class"].values[names.index("not_m")] == "gM"


def test_bad_arguments_and_contract():
    ds, _ = make_ds()
    with pytest.raises(mspec.variables.VariableError, match="dmgm_prob"):
        split_dwarfs_giants(ds.drop_vars("dmgm_prob"))
    with pytest.raises(ValueError, match="is_m"):
        split_dwarfs_giants(ds.assign(is_m=("spectra", np.ones(ds.sizes["spectra"], int))))
    with pytest.raises(ValueError, match="dmgm_classes"):
        split_dwarfs_giants(ds.assign_coords(dmgm_classes=["a", "b"]))
    spec = get_stage("split_dwarfs_giants")
    assert spec.module == "DGCM"
    merged = split_dwarfs_giants(ds)
    mspec.validate(merged, list(spec.outputs))
    with pytest.warns(MergeWarning):
        split_dwarfs_giants(merged)


@pytest.mark.parametrize("chunks", [1, 4])
def test_lazy_and_chunked_equals_unchunked(chunks):
    ref = split_dwarfs_giants(make_ds()[0], merge=False)
    with raise_if_computes():
        lazy = split_dwarfs_giants(make_ds(chunks=chunks)[0], merge=False)
    got = lazy.compute()
    for v in ref.data_vars:
        np.testing.assert_array_equal(got[v].values, ref[v].values, err_msg=v)


def test_measures_indices_from_flux_lazily():
    sim = mspec.simulate_survey(20, seed=5, mix={"dM": 0.5, "gM": 0.5})
    n = sim.sizes["spectra"]
    ds = sim.assign(
        dmgm_prob=(("spectra", "dmgm_classes"), np.tile([0.5, 0.5], (n, 1)))
    ).assign_coords(dmgm_classes=["dM", "gM"])
    with raise_if_computes():
        out = split_dwarfs_giants(ds.chunk({"spectra": 7}), merge=False)
    assert out.attrs["dgcm_indices_source"].startswith("measured")
    assert out.attrs["dgcm_cmd_source"] == "gaia columns"
    out = out.compute()
    assert set(out["luminosity_class"].values) <= {"dM", "gM"}


def test_review_decisions_file_with_modules(tmp_path):
    ds, names = make_ds()
    i = names.index("agree")
    p = tmp_path / "decisions.csv"
    p.write_text(f"obsid,module,decision\n{10 + i},DGCM,dM\n{10 + i},SCM,M\n")
    out = split_dwarfs_giants(ds, decisions=p, merge=False)
    assert out["luminosity_class"].values[i] == "dM"
    assert out.attrs["dgcm_decisions"] == 1
