"""Readable demo results (issue 11): mspec.report metrics and report.md, mspec.plots figures.

Synthetic catalogs with known answers: perfect classes give 100%, predictions = 0.5 * truth +
const give slope 0.5, injected RV outliers give a known outlier fraction.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from mspec import report
from mspec.plots import accuracy_figure, confusion_figure
from mspec.report import (
    accuracy_metrics,
    confusion_matrix,
    residual_stats,
    robust_sigma,
    theil_sen,
    write_report,
)

TRUE_CLASSES = ["OB", "A", "F", "G", "K", "M", "WD", "GALAXY", "QSO"]
RANGES = {"teff": (3000.0, 4000.0), "logg": (0.0, 5.5), "m_h": (-1.0, 0.5), "alpha_m": (-0.1, 0.3)}


def make_catalog(n: int = 2000, seed: int = 0) -> pd.DataFrame:
    """Perfect classes, TM RV = truth + N(0, 5 km/s), TLMA = 0.5 * truth + 1 with err 1."""
    rng = np.random.default_rng(seed)
    tc = rng.choice(TRUE_CLASSES, n, p=[0.05, 0.05, 0.05, 0.05, 0.1, 0.5, 0.1, 0.05, 0.05])
    tl = np.where(tc == "M", rng.choice(["dM", "gM"], n, p=[0.7, 0.3]), "")
    cat = pd.DataFrame(
        {
            "obsid": np.arange(n),
            "snr_i": rng.uniform(1.0, 150.0, n),
            "true_class": tc,
            "true_lumclass": tl,
            "spt_class": np.where(tc == "WD", "OB", tc),
            "wdm_class": np.where(tc == "WD", "WD", "M"),
            "dmgm_class": np.where(tl == "", "dM", tl),
            "true_rv": rng.normal(0.0, 50.0, n),
        }
    )
    cat["rv_tm"] = cat["true_rv"] + rng.normal(0.0, 5.0, n)
    cat["rv_tm_err"] = 5.0
    cat["lamost_rv"] = cat["true_rv"] + rng.normal(-5.0, 10.0, n)
    for p, (lo, hi) in RANGES.items():
        t = rng.uniform(lo, hi, n)
        cat[f"true_{p}"] = t
        cat[p] = 0.5 * t + 1.0
        cat[f"{p}_err"] = 1.0
    return cat


@pytest.fixture(scope="module")
def cat() -> pd.DataFrame:
    return make_catalog()


@pytest.fixture(scope="module")
def metrics(cat) -> dict:
    return accuracy_metrics(cat)


def test_class_lists_match_the_cnns():
    models = pytest.importorskip("mspec.ml.models")
    assert models.CLASSES == {
        "spt": report.SPT_CLASSES,
        "wdm": report.WDM_CLASSES,
        "dmgm": report.DMGM_CLASSES,
    }
    assert tuple(report.TLMA_PARAMS) == models.TLMA_LABELS


def test_library_imports_neither_pyplot_nor_torch():
    code = (
        "import sys, mspec.report, mspec.plots; "
        "print([m for m in ('matplotlib.pyplot', 'torch') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# ------------------------------------------------------------------ statistics


def test_robust_sigma_and_theil_sen():
    rng = np.random.default_rng(1)
    x = rng.normal(0.0, 3.0, 20000)
    assert robust_sigma(x) == pytest.approx(3.0, rel=0.03)
    assert np.isnan(robust_sigma([np.nan]))
    t = np.linspace(0.0, 10.0, 200)
    y = 0.5 * t + 2.0
    y[::20] += 100.0  # 5% wild outliers barely move Theil-Sen
    slope, icpt = theil_sen(t, y)
    assert slope == pytest.approx(0.5, abs=0.01)
    assert icpt == pytest.approx(2.0, abs=0.1)
    # subsampled pairs for large samples: same answer on an exact line
    t = rng.uniform(0, 1, 5000)
    assert theil_sen(t, 3 * t - 1, max_pairs=1000)[0] == pytest.approx(3.0)
    assert np.isnan(theil_sen([1.0, 1.0], [2.0, 3.0])[0])
    with pytest.raises(ValueError, match="same length"):
        theil_sen([1, 2], [1])


def test_residual_stats_known_answers():
    rng = np.random.default_rng(2)
    t = rng.uniform(-100, 100, 5000)
    p = t + 3.0 + rng.normal(0.0, 2.0, t.size)
    p[:50] += 500.0  # 1% outliers
    s = residual_stats(p, t, np.full(t.size, 1.0), outlier=50.0)
    assert s["n"] == 5000
    assert s["bias"] == pytest.approx(3.0, abs=0.15)
    assert s["sigma"] == pytest.approx(2.0, rel=0.05)
    assert s["outlier_frac"] == pytest.approx(0.01)
    assert s["err_calibration_robust"] == pytest.approx(2.0, rel=0.05)
    assert s["median_err"] == 1.0
    empty = residual_stats([np.nan], [1.0], outlier=50.0)
    assert empty["n"] == 0 and empty["bias"] is None and empty["outlier_frac"] is None


def test_confusion_matrix_rows_true_columns_predicted():
    cm = confusion_matrix(["M", "M", "WD", "K"], ["M", "WD", "", "M"], ["WD", "M"])
    assert list(cm.index) == ["WD", "M"]
    assert list(cm.columns) == ["WD", "M", "(none)"]  # unpredicted WD; K row ignored
    assert cm.loc["M", "WD"] == 1 and cm.loc["M", "M"] == 1 and cm.loc["WD", "(none)"] == 1
    assert cm.to_numpy().sum() == 3


# ------------------------------------------------------------------ accuracy_metrics


def test_perfect_classes_give_100_percent(metrics, cat):
    cls = metrics["classification"]
    for key in ("spt", "wdm", "dmgm"):
        assert cls[key]["accuracy"] == 1.0
        assert all(b["accuracy"] in (1.0, None) for b in cls[key]["by_snr"].values())
    # every spectrum is scored by CNN-SPT (a true WD counts as OB)
    assert cls["spt"]["n"] == len(cat)
    n_wd = int((cat["true_class"] == "WD").sum())
    n_ob = int((cat["true_class"] == "OB").sum())
    assert cls["spt"]["confusion"]["OB"]["OB"] == n_wd + n_ob
    assert cls["wdm"]["n"] == int(cat["true_class"].isin(["WD", "M"]).sum())
    assert cls["dmgm"]["n"] == int((cat["true_class"] == "M").sum())
    assert cls["dmgm"]["confusion"]["gM"] == {
        "dM": 0,
        "gM": int((cat["true_lumclass"] == "gM").sum()),
    }


def test_wrong_and_missing_predictions_count_as_wrong(cat):
    bad = cat.copy()
    m_rows = np.flatnonzero(bad["true_class"].to_numpy() == "M")
    bad.loc[m_rows[:10], "spt_class"] = "K"
    bad.loc[m_rows[10:15], "spt_class"] = None
    m = accuracy_metrics(bad)["classification"]["spt"]
    assert m["n_correct"] == len(bad) - 15
    assert m["accuracy"] == pytest.approx((len(bad) - 15) / len(bad))
    assert m["n_unpredicted"] == 5
    assert m["confusion"]["M"]["K"] == 10 and m["confusion"]["M"]["(none)"] == 5
    assert m["recall"]["M"] == pytest.approx(1 - 15 / len(m_rows))


def test_snr_bins(metrics, cat):
    assert metrics["snr_bins"] == ["(0,20]", "(20,50]", "(50,100]", ">100"]
    by = metrics["classification"]["spt"]["by_snr"]
    snr = cat["snr_i"]
    assert by["(20,50]"]["n"] == int(((snr > 20) & (snr <= 50)).sum())
    assert by[">100"]["n"] == int((snr > 100).sum())
    assert sum(b["n"] for b in by.values()) == len(cat)  # all S/N here are > 0
    tm = metrics["rv"]["tm"]
    assert set(tm["by_snr"]) == set(metrics["snr_bins"])
    assert tm["selected"]["n"] == int(((cat["true_class"] == "M") & (snr > 20)).sum())


def test_tlma_slope_bias_and_error_calibration(metrics, cat):
    tl = metrics["tlma"]
    for lum in ("dM", "gM"):
        sel = (cat["true_class"] == "M") & (cat["true_lumclass"] == lum) & (cat["snr_i"] > 20)
        for p in RANGES:
            s = tl[lum][p]
            assert s["n"] == int(sel.sum())
            assert s["slope"] == pytest.approx(0.5)
            assert s["slope_ols"] == pytest.approx(0.5)
            assert s["intercept"] == pytest.approx(1.0)
            d = 0.5 * cat.loc[sel, f"true_{p}"] + 1.0 - cat.loc[sel, f"true_{p}"]
            assert s["bias"] == pytest.approx(float(np.median(d)))
            assert s["err_calibration"] == pytest.approx(float(np.std(d, ddof=1)))  # err = 1
            assert s["median_err"] == 1.0


def test_rv_statistics(metrics):
    tm, la = metrics["rv"]["tm"]["selected"], metrics["rv"]["lamost"]["selected"]
    assert abs(tm["bias"]) < 1.0 and tm["sigma"] == pytest.approx(5.0, rel=0.15)
    assert tm["err_calibration"] == pytest.approx(1.0, rel=0.1)
    assert la["bias"] == pytest.approx(-5.0, abs=1.5) and la["sigma"] == pytest.approx(10, rel=0.15)
    assert tm["outlier_frac"] == 0.0
    assert "tml7500" not in metrics["rv"]
    assert any("rv_tml7500" in s for s in metrics["skipped"])


def test_reconciled_rv_is_scored_and_compared_with_the_paper(tmp_path):
    cat = make_catalog(600, seed=4)
    rng = np.random.default_rng(4)
    cat["rv"] = cat["true_rv"] + rng.normal(0.0, 3.0, len(cat))
    cat["rv_err"] = 3.0
    m = accuracy_metrics(cat)
    r = m["rv"]["rv"]["selected"]
    assert m["rv"]["rv"]["name"] == "reconciled" and m["rv"]["rv"]["column"] == "rv"
    assert r["sigma"] == pytest.approx(3.0, rel=0.2)
    assert r["err_calibration"] == pytest.approx(1.0, rel=0.15)
    text = write_report(tmp_path, cat, stages=[], metrics=m).read_text()
    rows = [ln for ln in text.splitlines() if "robust σ (true M, S/N_i > 20)" in ln]
    # the paper's RV-vs-Gaia figures go with the reconciled RV, no longer with TM
    assert any(ln.startswith("| reconciled RV") and "vs Gaia" in ln for ln in rows)
    assert not any(ln.startswith("| TM RV") and "vs Gaia" in ln for ln in rows)
    # without rv they stay with TM, and the missing column is said
    m2 = accuracy_metrics(cat.drop(columns=["rv", "rv_err"]))
    assert "rv" not in m2["rv"] and any("column rv" in s for s in m2["skipped"])


def test_json_round_trip(metrics):
    text = json.dumps(metrics, allow_nan=False)
    assert json.loads(text) == metrics


def test_nan_values_become_none_and_stay_json():
    cat = make_catalog(300)
    cat.loc[cat["true_lumclass"] == "gM", "teff"] = np.nan
    m = accuracy_metrics(cat)
    assert m["tlma"]["gM"]["teff"]["n"] == 0
    assert m["tlma"]["gM"]["teff"]["sigma"] is None
    assert json.loads(json.dumps(m, allow_nan=False)) == m


@pytest.mark.parametrize(
    ("drop", "skipped_word"),
    [
        (["spt_class"], "spt_class"),
        (["dmgm_class", "wdm_class"], "dmgm_class"),
        (["rv_tm", "rv_tm_err", "lamost_rv"], "rv_tm"),
        (["true_rv"], "true_rv"),
        (["m_h", "alpha_m_err"], "m_h"),
        (["true_lumclass"], "true_lumclass"),
        (["snr_i"], "snr_i"),
        (["true_class"], "true_class"),
    ],
)
def test_missing_columns_are_skipped_and_said(drop, skipped_word, tmp_path):
    cat = make_catalog(300).drop(columns=drop)
    m = accuracy_metrics(cat)
    assert any(skipped_word in s for s in m["skipped"]), m["skipped"]
    json.dumps(m, allow_nan=False)
    path = write_report(tmp_path, cat, stages=[{"stage": "x", "seconds": 1.0, "text": ""}])
    assert skipped_word in path.read_text()
    accuracy_figure(cat, tmp_path / "acc.png")


def test_missing_snr_uses_all_spectra():
    cat = make_catalog(300)
    m = accuracy_metrics(cat.drop(columns=["snr_i"]))
    assert m["rv"]["tm"]["selected"]["n"] == int((cat["true_class"] == "M").sum())
    assert m["classification"]["spt"]["by_snr"] == {}
    assert "snr_i missing" in m["tlma"]["selection"]


def test_bad_arguments_name_the_argument(cat):
    with pytest.raises(TypeError, match="cat"):
        accuracy_metrics(cat.to_dict())
    with pytest.raises(ValueError, match="snr_edges"):
        accuracy_metrics(cat, snr_edges=(0, 50, 20))
    with pytest.raises(ValueError, match="snr_min"):
        accuracy_metrics(cat, snr_min=float("nan"))
    with pytest.raises(ValueError, match="rv_outlier_kms"):
        accuracy_metrics(cat, rv_outlier_kms=0)


# ------------------------------------------------------------------ write_report

STAGES = [
    {"stage": "simulate", "seconds": 12.25, "text": "3000 spectra"},
    {"stage": "ingest", "seconds": 30.0, "text": "a | b"},
    {"stage": "train CNNs", "seconds": 250.0, "text": "5 folds"},
]


def test_write_report_layout(tmp_path, cat, metrics):
    extra = {**metrics, "training": {"spt": {"val_accuracy": 0.99}}}
    path = write_report(tmp_path / "out", cat, stages=STAGES, metrics=extra, notes=["a note"])
    assert path == tmp_path / "out" / "report.md"
    text = path.read_text()
    lines = text.splitlines()
    assert lines[0] == "# mspec demo report"
    body = [ln for ln in lines[1:] if ln.strip()]
    assert body[0].startswith("| metric | value | paper")  # the summary table comes first
    summary = body[: next(i for i, ln in enumerate(body) if not ln.startswith("|"))]
    joined = "\n".join(summary)
    for figure in ("99.18%", "99.68%", "99.85%", "30 K", "17 K", "7 km/s", "11 km/s"):
        assert figure in joined
    assert "100.00%" in joined
    assert "0.50" in joined  # the TLMA slope

    # stage table: each stage's own seconds and the total
    i = lines.index("## Stage timings")
    assert i > lines.index(summary[-1])
    stage_rows = [ln for ln in lines[i:] if ln.startswith("| ")][1:5]
    assert stage_rows[0] == "| simulate | 12.2 | 3000 spectra |"
    assert stage_rows[1] == "| ingest | 30.0 | a \\| b |"
    assert stage_rows[2] == "| train CNNs | 250 | 5 folds |"
    assert stage_rows[3].startswith("| **total** | **292**")

    order = ["## Stage timings", "## Confusion matrices", "## By S/N_i", "## Notes"]
    pos = [text.index(h) for h in order]
    assert pos == sorted(pos)
    assert "| true \\ predicted | OB | A | F | G | K | M | GALAXY | QSO | recall |" in text
    assert "| **gM** | 0 |" in text
    assert "a note" in text and "training" in text

    doc = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert doc["metrics"] == json.loads(json.dumps(extra))
    assert doc["total_seconds"] == pytest.approx(292.25)
    assert [s["seconds"] for s in doc["stages"]] == [12.25, 30.0, 250.0]


def test_write_report_computes_metrics_from_cat(tmp_path, cat, metrics):
    write_report(tmp_path, cat, stages=[], title="T")
    doc = json.loads((tmp_path / "metrics.json").read_text())
    assert doc["metrics"] == metrics and doc["title"] == "T"
    assert (tmp_path / "report.md").read_text().startswith("# T\n\n| metric |")


@pytest.mark.parametrize(
    ("kwargs", "exc", "word"),
    [
        ({"stages": [{"stage": "a", "seconds": -1.0, "text": ""}]}, ValueError, "seconds"),
        ({"stages": [{"stage": "a", "text": ""}]}, ValueError, "stages"),
        ({"stages": "simulate"}, TypeError, "stages"),
        ({"stages": [], "metrics": [1]}, TypeError, "metrics"),
        ({"stages": [], "notes": "x"}, TypeError, "notes"),
    ],
)
def test_write_report_bad_arguments(tmp_path, cat, kwargs, exc, word):
    with pytest.raises(exc, match=word):
        write_report(tmp_path, cat, **kwargs)


def test_write_report_needs_cat_or_metrics(tmp_path):
    with pytest.raises(ValueError, match="cat or metrics"):
        write_report(tmp_path, None, stages=[])


# ------------------------------------------------------------------ plots


def _not_blank(path) -> None:
    from matplotlib.image import imread

    img = imread(path)
    assert img.ndim == 3 and img.shape[0] > 500
    assert float(img[..., :3].var()) > 1e-3


def test_accuracy_figure(tmp_path, cat):
    out = accuracy_figure(cat, tmp_path)
    assert out == tmp_path / "accuracy.png"
    _not_blank(out)


def test_accuracy_figure_missing_columns(tmp_path, cat):
    out = accuracy_figure(cat.drop(columns=["teff", "lamost_rv", "snr_i"]), tmp_path / "a.png")
    assert out.name == "a.png"
    _not_blank(out)
    out = accuracy_figure(pd.DataFrame({"obsid": [1, 2]}), tmp_path / "empty.png")
    assert out.exists()


def test_accuracy_figure_bad_arguments(tmp_path, cat):
    with pytest.raises(TypeError, match="cat"):
        accuracy_figure(cat.to_numpy(), tmp_path)
    with pytest.raises(TypeError, match="path"):
        accuracy_figure(cat, 3)
    with pytest.raises(ValueError, match="dpi"):
        accuracy_figure(cat, tmp_path, dpi=0)


def test_confusion_figure(tmp_path, metrics):
    conf = metrics["classification"]["spt"]["confusion"]
    out = confusion_figure(conf, None, tmp_path, title="CNN-SPT")
    assert out == tmp_path / "confusion.png"
    _not_blank(out)
    out = confusion_figure(np.array([[5, 1], [0, 7]]), ["WD", "M"], tmp_path / "wdm.png")
    assert out.exists()
    with pytest.raises(ValueError, match="cm"):
        confusion_figure(np.ones((3, 3)), ["WD", "M"], tmp_path / "x.png")
    with pytest.raises(ValueError, match="classes"):
        confusion_figure(np.ones((2, 2)), None, tmp_path / "x.png")


def test_parquet_round_trip_with_arrow_strings(tmp_path, cat, metrics):
    """The demo reads its catalog back from Parquet: arrow-backed strings and nullable
    numbers give the same metrics."""
    cat.to_parquet(tmp_path / "c.parquet", index=False)
    back = pd.read_parquet(tmp_path / "c.parquet", dtype_backend="pyarrow")
    assert accuracy_metrics(back) == metrics
