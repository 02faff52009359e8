"""Inspection queue (issue 13): build_queue, read_decisions, write_queue, `mspec inspect`."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import xarray as xr

from mspec.review import (
    QUEUE_COLUMNS,
    DecisionWarning,
    build_queue,
    plot_rv_candidates,
    read_decisions,
    write_queue,
)


def _results(n=6):
    rv = np.array([10.0, 200.0, np.nan, -30.0, 12.0, -160.0])[:n]
    return xr.Dataset(
        {
            "lamost_rv": ("spectra", np.array([11.0, 199.0, 50.0, 250.0, 13.0, -161.0])[:n]),
            "rv_tm": ("spectra", np.array([10.0, 201.0, np.nan, -30.0, 12.0, -159.0])[:n]),
            "rv_dsal1": ("spectra", np.array([9.0, np.nan, np.nan, -29.0, 12.5, np.nan])[:n]),
            "rv": ("spectra", rv),
            "rv_from": (
                "spectra",
                np.array(["LAMOST", "LAMOST", "NoRV_lowQuality", "TM", "LAMOST", "LAMOST"])[:n],
            ),  # fmt: skip
            "rv_inspect": (
                "spectra",
                np.array(["", "|rv| > 150 km/s", "", "TM not corroborated by DSAL", "", ""])[:n],
            ),  # fmt: skip
            "scm_inspect": (
                "spectra",
                np.array(["", "", "CNN-SPT and CMD disagree", "", "", ""])[:n],
            ),
            "dgcm_inspect": ("spectra", np.array(["", "", "", "", "dMgM vs LAMOST", ""])[:n]),
            "spt_class": ("spectra", np.array(["M", "M", "K", "M", "M", "M"])[:n]),
            "CMD_pos": ("spectra", np.array(["dM", "dM", "dM", "", "gM", "dM"])[:n]),
            "dmgm_class": ("spectra", np.array(["dM"] * 6)[:n]),
        },
        coords={"obsid": ("spectra", np.arange(500, 500 + n))},
    )


def test_build_queue_rows_and_candidates():
    q = build_queue(_results())
    assert list(q.columns) == list(QUEUE_COLUMNS)
    rows = list(zip(q.obsid, q.module, q.reason, strict=True))
    assert rows == [
        ("501", "RVMM", "|rv| > 150 km/s"),
        ("502", "SCM", "CNN-SPT and CMD disagree"),
        ("503", "RVMM", "TM not corroborated by DSAL"),
        ("504", "DGCM", "dMgM vs LAMOST"),
        ("505", "RVMM", "|rv| > 150 km/s"),  # |rv| > 150 without an rv_inspect reason
    ]
    c = json.loads(q.candidates[2])
    assert c == {"LAMOST": 250.0, "TM": -30.0, "DSAL I": -29.0, "rv": -30.0, "rv_from": "TM"}
    scm = json.loads(q.candidates[1])
    assert scm["spt_class"] == "K" and scm["CMD_pos"] == "dM"
    assert json.loads(q.candidates[3])["dmgm_class"] == "dM"


def test_build_queue_without_reconciliation_and_empty():
    ds = _results()[["lamost_rv", "rv_tm"]]
    q = build_queue(ds)  # only |LAMOST RV| > 150 queued
    assert q.obsid.tolist() == ["501", "503", "505"] and set(q.module) == {"RVMM"}
    q = build_queue(ds.isel(spectra=[0]))
    assert len(q) == 0 and list(q.columns) == list(QUEUE_COLUMNS)
    with pytest.raises(ValueError, match="obsid"):
        build_queue(ds.drop_vars("obsid"))
    with pytest.raises(TypeError, match="ds"):
        build_queue(ds.to_dataframe())
    with pytest.raises(ValueError, match="inspect_abs_rv"):
        build_queue(ds, inspect_abs_rv=0)


def test_read_decisions_good_and_bad_rows(tmp_path):
    p = tmp_path / "dec.csv"
    p.write_text(
        "obsid,module,decision,note\n"
        "500,RVMM,TM,looked fine\n"
        "501,RVMM,NoRV_waveErr,lines all over\n"
        "502,SCM,K,not M\n"
        "503,RVMM,TMX,typo\n"  # bad value
        "999,RVMM,TM,unknown obsid\n"  # not in the run
        "504,FOO,TM,bad module\n"
        ",RVMM,TM,no obsid\n"
        "505,RVMM,,empty\n"
        "500,RVMM,DSAL II,changed my mind\n"  # later row wins
    )
    with pytest.warns(DecisionWarning) as rec:
        d = read_decisions(p, known_obsids=np.arange(500, 506))
    assert len(rec) == 5
    assert [ln for ln, _ in d.attrs["skipped"]] == [5, 6, 7, 8, 9]
    assert "TMX" in d.attrs["skipped"][0][1] and "not in the run" in d.attrs["skipped"][1][1]
    got = {(o, m): dec for o, m, dec in zip(d.obsid, d.module, d.decision, strict=True)}
    assert got == {("500", "RVMM"): "DSAL II", ("501", "RVMM"): "NoRV_waveErr", ("502", "SCM"): "K"}
    assert "note" in d.columns
    with pytest.warns(DecisionWarning):
        rv_only = read_decisions(p, module="RVMM")
    assert set(rv_only.module) == {"RVMM"} and "999" in set(rv_only.obsid)  # no known_obsids


def test_read_decisions_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="decisions"):
        read_decisions(tmp_path / "none.csv")
    p = tmp_path / "cols.csv"
    p.write_text("obsid,choice\n1,TM\n")
    with pytest.raises(ValueError, match="module"):
        read_decisions(p)
    p.write_text("")
    with pytest.raises(ValueError, match="readable CSV"):
        read_decisions(p)
    p.write_text("obsid,module,decision\n")
    assert len(read_decisions(p)) == 0
    with pytest.raises(ValueError, match="module"):
        read_decisions(p, module="XYZ")


def test_decisions_roundtrip_into_reconcile(tmp_path):
    """A decisions CSV read by read_decisions is honoured by reconcile_rv."""
    from mspec.rv.reconcile import reconcile_rv
    from tests.test_rv_reconcile import _branches, _dataset, _sigmas

    d, _ = _branches()
    ds = _dataset(d)
    p = tmp_path / "dec.csv"
    p.write_text("obsid,module,decision\n1004,RVMM,TM\n1005,RVMM,DSAL I\n1000,SCM,M\n")
    dec = read_decisions(p, module="RVMM", known_obsids=ds.obsid.values)
    out = reconcile_rv(ds, sigmas=_sigmas(), decisions=dec, merge=False)
    # spectrum 4 has no TM value: the decision cannot give an RV and says so
    assert out.rv_from.values[4] == "NoRV_lowQuality" and "without a value" in str(
        out.rv_inspect.values[4]
    )
    assert out.rv_from.values[5] == "DSAL I" and out.rv.values[5] == d["rv_dsal1"][5]
    assert out.rv_from.values[0] == "LAMOST"  # the SCM decision does not touch RVMM


def test_plot_rv_candidates():
    from mspec.variables import loglam_grid

    loglam = loglam_grid()
    lam = 10**loglam
    flux = 1.0 - 0.5 * np.exp(-0.5 * ((lam - 7668.0) / 2.0) ** 2)
    ivar = np.ones_like(flux)
    mask = np.zeros(flux.size, np.int32)
    mask[100:120] = 1
    fig = plot_rv_candidates(
        loglam, flux, ivar, mask, {"LAMOST": 30.0, "TM": 5.0, "rv_from": "TM", "rv": None}
    )
    assert len(fig.axes) == 8
    ax = fig.axes[0]
    xs = sorted(ln.get_xdata()[0] for ln in ax.lines if ln.get_linestyle() == "--")
    want = sorted(7667.0089 * (1 + v / 299792.458) for v in (30.0, 5.0))
    np.testing.assert_allclose(xs, want)
    full = plot_rv_candidates(loglam, flux, ivar, mask, {}, labels={"spt_class": "K"})
    assert len(full.axes) == 1


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run directory with a store, the rvmm outputs and no reconciliation yet."""
    import mspec
    from mspec.config import Config, save_resolved
    from mspec.io.zarrio import write_results
    from mspec.rv import template_match
    from mspec.rv.lines import line_rvs
    from mspec.testing import tiny_survey_store

    base = tmp_path_factory.mktemp("review")
    store = tiny_survey_store(base, n=24, seed=4, chunk_size=12)
    run = base / "run"
    (run / "stages").mkdir(parents=True)
    save_resolved(Config.from_dict({"store": str(store), "run_dir": str(run)}), run)
    ds = mspec.open_store(store)
    shifts = np.arange(-500.0, 501.0, 100.0)
    tm = template_match(ds, shifts=shifts, quality=True, merge=False)
    tml = template_match(ds, wave_max=7500, shifts=shifts, quality=True, merge=False)
    lr = line_rvs(ds.assign(rv_tm=tm.rv_tm), merge=False)
    res = xr.merge([tm, tml, lr], compat="override").drop_vars(["obsid"], errors="ignore")
    write_results(res.compute().chunk({"spectra": 12}), run / "stages" / "rvmm.zarr")
    return run, ds


def test_write_queue_and_cli(run_dir, tmp_path):
    from mspec.cli import main

    run, ds = run_dir
    q = write_queue(run, max_plots=3)
    assert (run / "review" / "queue.parquet").is_file()
    back = pd.read_parquet(run / "review" / "queue.parquet")
    assert back.obsid.tolist() == q.obsid.tolist() and len(q) >= 1
    assert set(q.module) <= {"RVMM", "SCM", "DGCM"}
    pngs = sorted((run / "review" / "plots").glob("*.png"))
    assert 1 <= len(pngs) <= 3
    assert (q["png"] != "").sum() == len(pngs)
    assert all((run / "review" / p).is_file() for p in q["png"] if p)
    # a decision removes the spectrum from the queue
    first = q.obsid.iloc[0]
    dec = tmp_path / "dec.csv"
    dec.write_text(f"obsid,module,decision\n{first},RVMM,NoRV_lowQuality\n123,RVMM,TM\n")
    assert main(["inspect", str(run), "--decisions", str(dec), "--max-plots", "1"]) == 0
    q2 = pd.read_parquet(run / "review" / "queue.parquet")
    assert first not in set(q2.obsid[q2.module == "RVMM"])
    assert len(q2) == len(q) - 1
    # errors: not a run directory, bad decisions file -> one line, exit 2
    assert main(["inspect", str(tmp_path)]) == 2
    bad = tmp_path / "bad.csv"
    bad.write_text("obsid,decision\n1,TM\n")
    assert main(["inspect", str(run), "--decisions", str(bad)]) == 2
