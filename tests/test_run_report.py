"""The HTML run report (issue 16): every figure present and non-blank, stages not run stated,
self-contained (no external resource), bad input never stops it, and a headless-Chromium
check that the page renders with every image decoded.

Runs: a real tiny run (``mspec.run`` on ``tiny_survey_store`` with ``tiny_models``), a
partial run (preprocess and SCM only) and a *complete* run: a copy of the real run whose
catalog is rewritten with the columns of the stages not built yet (SCM/DGCM decisions, RV
reconciliation ``rv``/``rv_from``) and near-truth CNN outputs, so that every figure has data
(the tiny 1-epoch CNNs classify almost nothing as M).
"""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mspec.config import Config
from mspec.pipeline import run
from mspec.run_report import (
    _FIGURES,
    FIGURE_NAMES,
    RV_FROM_VALUES,
    clipped_mean_std,
    write_run_report,
)
from mspec.testing import tiny_models, tiny_survey_store

N, CHUNK = 64, 16
ALL_FIGURES = [name for name, _, _ in _FIGURES]

pytestmark = [pytest.mark.slow]


def _config(store, run_dir, models) -> Config:
    return Config.from_dict(
        {
            "store": str(store),
            "run_dir": str(run_dir),
            "chunk_size": CHUNK,
            "cluster": {"scheduler": "sync"},
            "models": {"dir": str(models)},
            "templates": {"set": "demo"},
            "rv": {"oversample": 23},
        }
    )


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return tiny_models(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return tiny_survey_store(tmp_path_factory.mktemp("survey"), N, seed=7, chunk_size=CHUNK)


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, store, models):
    run_dir = tmp_path_factory.mktemp("full") / "run"
    run(_config(store, run_dir, models))
    return run_dir


@pytest.fixture(scope="module")
def partial_run(tmp_path_factory, store, models):
    run_dir = tmp_path_factory.mktemp("partial") / "run"
    run(_config(store, run_dir, models), stages=["scm"])
    return run_dir


def _complete_catalog(cat: pd.DataFrame, seed: int = 3) -> pd.DataFrame:
    """The real run's catalog plus the outputs of the stages not built yet, near the truth."""
    rng = np.random.default_rng(seed)
    cat = cat.copy()
    n = len(cat)
    tc = cat["true_class"].astype(str).to_numpy()
    tl = cat["true_lumclass"].astype(str).to_numpy()
    is_m = tc == "M"
    cat["spt_class"] = np.where(tc == "WD", "OB", tc)
    cat["wdm_class"] = np.where(tc == "WD", "WD", "M")
    cat["dmgm_class"] = np.where(tl == "gM", "gM", "dM")
    cat["is_m"] = is_m
    cat["scm_class"] = tc
    cat["luminosity_class"] = np.where(is_m, tl, "")
    for p, sd in (("teff", 40.0), ("logg", 0.1), ("m_h", 0.1), ("alpha_m", 0.03)):
        cat[p] = np.where(is_m, cat[f"true_{p}"] + rng.normal(0, sd, n), np.nan)
        cat[f"{p}_err"] = np.where(is_m, sd * (1 + 20 / cat["snr_i"].clip(lower=1)), np.nan)
    true_rv = cat["true_rv"].to_numpy()
    lam = true_rv + rng.normal(0, 5, n)
    bad = rng.random(n) < 0.15  # wrong LAMOST RVs: outside the 3-sigma band
    lam[bad] += rng.choice([-1, 1], bad.sum()) * rng.uniform(80, 200, bad.sum())
    cat["lamost_rv"] = lam
    cat["rv_tm"] = true_rv + rng.normal(0, 4, n)
    cat["rv_dsal1"] = np.where(rng.random(n) < 0.5, true_rv + rng.normal(0, 6, n), np.nan)
    cat["rv_dsal2"] = true_rv + rng.normal(0, 8, n)
    rv_from = np.where(bad, "TM", "LAMOST").astype(object)
    rv_from[:8] = list(RV_FROM_VALUES)  # every value present at least once
    cat["rv_from"] = rv_from
    rv = np.where(rv_from == "LAMOST", lam, cat["rv_tm"])
    cat["rv"] = np.where(np.char.startswith(rv_from.astype(str), "NoRV"), np.nan, rv)
    cat["rv_err"] = 5.0 * (1 + 20 / cat["snr_i"].clip(lower=1))
    cat["rv_inspect"] = np.where(np.abs(cat["rv"]) > 150, "abs_rv_gt_150", "")
    cat["rv_flag"] = (np.isfinite(cat["rv"]) & (cat["mjd"] > 55940)).astype("int8")
    cat["entered"] = True
    cat["scm_reason"] = np.where(is_m, "cnn_m", "cnn_non_m")
    cat["scm_inspect"] = ""
    cat.loc[cat.index[:3], "scm_inspect"] = "cnn_cmd_disagree"
    cat["new_m"] = False
    cat["dgcm_reason"] = np.where(is_m, np.where(tl == "gM", "giant_votes", "dwarf_default"), "")
    cat["dgcm_inspect"] = ""
    cat["parameter_flag"] = np.where(is_m & (cat["snr_i"] > 10), 1, 0).astype("int8")
    cat["parameter_flag_reason"] = np.where(cat["parameter_flag"] == 1, "", "low_snr")
    return cat


@pytest.fixture(scope="module")
def complete_run(tmp_path_factory, full_run):
    run_dir = tmp_path_factory.mktemp("complete") / "run"
    shutil.copytree(full_run, run_dir)
    shutil.rmtree(run_dir / "report", ignore_errors=True)
    cat = pd.read_parquet(full_run / "catalog" / "catalog.parquet")
    out = run_dir / "catalog" / "catalog.parquet"
    shutil.rmtree(out)
    out.mkdir()
    _complete_catalog(cat).to_parquet(out / "part.0.parquet", index=False)
    return run_dir


@pytest.fixture(scope="module")
def full_report(full_run):
    return _check_report(full_run)


@pytest.fixture(scope="module")
def complete_report(complete_run):
    return _check_report(complete_run)


# --------------------------------------------------------------------------- helpers


def _png_array(data: bytes) -> np.ndarray:
    from matplotlib.image import imread

    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    return imread(io.BytesIO(data), format="png")


def _assert_not_blank(data: bytes, what: str) -> None:
    """Fails for a blank (one-colour or almost all white) image."""
    img = _png_array(data)[..., :3]
    assert img.shape[0] > 100 and img.shape[1] > 100, f"{what}: tiny image {img.shape}"
    assert float(img.std()) > 0.02, f"{what}: blank (one colour)"
    inked = np.mean(np.any(img < 0.9, axis=-1))
    assert inked > 0.005, f"{what}: blank (only {inked:.4f} of the pixels are not white)"


def _embedded(html: str) -> list[bytes]:
    return [base64.b64decode(b) for b in re.findall(r'src="data:image/png;base64,([^"]+)"', html)]


def _check_report(run_dir: Path, **kw) -> tuple[str, dict]:
    path = write_run_report(run_dir, **kw)
    assert path == run_dir / "report" / "index.html"
    html = path.read_text(encoding="utf-8")
    manifest = json.loads((path.parent / "manifest.json").read_text())
    # self-contained: every <img> is embedded, nothing loads from elsewhere
    srcs = re.findall(r'\bsrc="([^"]*)"', html)
    assert all(s.startswith("data:image/png;base64,") for s in srcs)
    assert len(srcs) == len(manifest["figures"])
    assert not re.search(r'\b(href|src)="(https?:)?//', html)
    assert "<link" not in html
    imgs = _embedded(html)
    assert len(imgs) == len(manifest["figures"]) == html.count("<img ")
    for f, data in zip(manifest["figures"], imgs):
        png = (path.parent / f["file"]).read_bytes()
        assert png == data, f["file"]  # the PNG file is the embedded image
        _assert_not_blank(data, f["file"])
    # every figure is drawn or stated with its reason, and the statement is on the page
    drawn = {f["name"] for f in manifest["figures"]}
    stated = {f["name"]: f["reason"] for f in manifest["not_drawn"]}
    assert drawn | set(stated) == set(ALL_FIGURES) == set(FIGURE_NAMES)
    assert not drawn & set(stated)
    for reason in stated.values():
        assert reason and f"Not drawn: {_esc(reason)}" in html
    assert sorted(p.name for p in path.parent.glob("*.png")) == sorted(
        f["file"] for f in manifest["figures"]
    )
    return html, manifest


def _esc(s: str) -> str:
    import html

    return html.escape(s, quote=True)


# --------------------------------------------------------------------------- tests


def test_report_of_a_real_run(full_run, full_report):
    html, manifest = full_report
    drawn = {f["name"] for f in manifest["figures"]}
    # a simulated run with Gaia photometry and a store: these always have data
    assert {"confusion", "cmd", "errors_snr", "spectra", "truth_tlma", "truth_rv"} <= drawn
    files = {f["file"] for f in manifest["figures"]}
    assert {"confusion_spt.png", "confusion_wdm.png", "confusion_dmgm.png"} <= files
    # the reconciliation is a stage of every run: its rv_from breakdown is drawn
    assert "rv_from" in drawn
    # stage table: every stage of run.json with its time and cost
    info = json.loads((full_run / "run.json").read_text())
    for name, st in info["stages"].items():
        assert f"<td>{name}</td>" in html
        if st.get("core_seconds_per_spectrum"):
            assert f"{1000 * st['core_seconds_per_spectrum']:.2f}" in html
    for line in info["not_available"]:
        assert _esc(line) in html
    for head in ("paper Table 1", "paper Table 4", "paper Table 7", "Quarantine"):
        assert head in html
    assert "Stages not run" not in html
    assert html.count("<img ") >= 9  # 3 confusion matrices, CMD, errors, spectra, 2 truth


def test_rerun_leaves_no_stale_figures(tmp_path, full_run, full_report):
    run_dir = tmp_path / "run"
    shutil.copytree(full_run, run_dir)  # with the full report in RUN/report
    html, manifest = _check_report(run_dir, figures=["cmd"])  # checks the PNG set too
    assert [f["file"] for f in manifest["figures"]] == ["cmd.png"]
    assert "Not drawn: not requested" in html
    with pytest.raises(ValueError, match="figures"):
        write_run_report(run_dir, figures=["nope"])


def test_complete_run_draws_every_figure(complete_run, complete_report):
    html, manifest = complete_report
    assert manifest["not_drawn"] == []
    files = {f["file"] for f in manifest["figures"]}
    assert {"confusion_scm.png", "confusion_dgcm.png", "rv_lamost.png", "rv_from.png",
            "kiel.png"} <= files  # fmt: skip
    cat = pd.read_parquet(complete_run / "catalog" / "catalog.parquet")
    # Table 7 counts: rv_from of M spectra, every value of the paper
    m = cat["is_m"].to_numpy()
    t7 = manifest["counts"]["RVMM: where the RV comes from (paper Table 7)"]["rv_from"]
    assert list(t7) == list(RV_FROM_VALUES)  # the paper's order, every value
    for v in RV_FROM_VALUES:
        assert t7[v] == int((cat["rv_from"][m] == v).sum())
    # rendered like the paper: the values as columns, one row of counts
    head = "".join(f"<th>{_esc(v)}</th>" for v in RV_FROM_VALUES)
    cells = "".join(f'<td class="num">{t7[v]:,}</td>' for v in RV_FROM_VALUES)
    assert f"<th>rv_from</th>{head}</tr></thead><tbody><tr><td>spectra</td>{cells}" in html
    counts = {src: v for sec in manifest["counts"].values() for src, v in sec.items()}
    for label, value, count in (
        ("SCM rule (scm_reason)", "cnn_m", int(m.sum())),
        ("SCM inspection queue (scm_inspect)", "cnn_cmd_disagree", 3),
        ("entered SCM (M_Catalog_V0)", "entered", len(cat)),
        ("DGCM rule (dgcm_reason)", "giant_votes", int((cat["luminosity_class"] == "gM").sum())),
        ("parameter_flag = 0 (reason)", "low_snr", int((m & (cat["snr_i"] <= 10)).sum())),
        ("rv_flag = 1", "", int(cat["rv_flag"].sum())),
    ):
        assert counts[label].get(value, 0) == count, (label, value)
    cap = next(f["caption"] for f in manifest["figures"] if f["name"] == "rv_lamost")
    assert "3σ band" in cap and "2σ band" in cap
    # the band of the figure is the clipped TM - LAMOST statistic of the M spectra
    d = (cat["rv_tm"] - cat["lamost_rv"])[m]
    mu, sd, _ = clipped_mean_std(d, 3.0)
    band = manifest["stats"]["rv_bands"]["TM"]
    assert band["k"] == 3.0 and band["n"] == int(np.isfinite(d).sum())
    assert band["mean_kms"] == pytest.approx(mu) and band["sigma_kms"] == pytest.approx(sd)
    assert abs(mu) < 3 and 3 < sd < 10  # 4 and 5 km/s errors: sqrt(41) ~ 6.4 km/s
    # the wrong LAMOST RVs (80-200 km/s off) are outside the band, the others inside
    assert band["n_kept"] < band["n"]
    assert manifest["stats"]["rv_bands"]["DSAL I"]["k"] == 2.0


def test_partial_run_states_the_stages_not_run(partial_run):
    html, manifest = _check_report(partial_run)
    stated = {f["name"]: f["reason"] for f in manifest["not_drawn"]}
    assert "Stages not run" in html
    for s in ("dgcm", "rvmm", "spmm"):
        assert f"<code>{s}</code>" in html
    assert "stage 'spmm'" in stated["kiel"] and "was not run" in stated["kiel"]
    assert "stage 'rvmm'" in stated["rv_lamost"]
    assert "stage 'rvmm'" in stated["rv_from"]
    assert "cmd" not in stated  # the CMD comes with SCM (or the catalog's Gaia columns)


def test_cmd_is_placed_from_gaia_columns_when_the_run_has_no_cmd(tmp_path, full_run):
    run_dir = tmp_path / "run"
    shutil.copytree(full_run, run_dir)
    cat = pd.read_parquet(full_run / "catalog" / "catalog.parquet")
    cat = cat.drop(columns=["M_G_0", "bp_rp_0", "W1_W2_0", "CMD_flag", "CMD_pos"])
    out = run_dir / "catalog" / "catalog.parquet"
    shutil.rmtree(out)
    out.mkdir()
    cat.to_parquet(out / "part.0.parquet", index=False)
    html, manifest = _check_report(run_dir, figures=["cmd", "kiel"])
    cap = next(f["caption"] for f in manifest["figures"] if f["name"] == "cmd")
    assert "mspec.cmd.place" in cap
    # without Gaia photometry either: stated
    cat.drop(columns=["phot_g_mean_mag"]).to_parquet(out / "part.0.parquet", index=False)
    html, manifest = _check_report(run_dir, figures=["cmd"])
    stated = {f["name"]: f["reason"] for f in manifest["not_drawn"]}
    assert "phot_g_mean_mag" in stated["cmd"]


def test_bad_input_never_stops_the_report(tmp_path, full_run):
    run_dir = tmp_path / "run"
    shutil.copytree(full_run, run_dir)
    out = run_dir / "catalog" / "catalog.parquet"
    shutil.rmtree(out)
    out.mkdir()
    (out / "part.0.parquet").write_bytes(b"not a parquet file")
    (run_dir / "run.json").write_text("{broken")
    html, manifest = _check_report(run_dir)
    assert "run.json could not be read" in html
    assert "Catalog:" in html
    assert manifest["figures"] == []
    # a run.json of the wrong shape
    (run_dir / "run.json").write_text(
        json.dumps({"stages": {"scm": "oops", "rvmm": {"seconds": "n/a", "steps": 5}},
                    "seconds": "?", "not_available": "x"})
    )  # fmt: skip
    html, manifest = _check_report(run_dir, figures=["cmd"])
    assert "stage table could not be computed" in html
    (run_dir / "run.json").write_text(json.dumps({"stages": ["scm"]}))
    html, manifest = _check_report(run_dir, figures=["cmd"])
    assert "&#x27;stages&#x27; is not a mapping" in html
    # bad values in columns: strings in numeric columns, all-NaN columns
    cat = pd.read_parquet(full_run / "catalog" / "catalog.parquet")
    cat["snr_i"] = "garbage"
    cat["rv_tm"] = np.nan
    cat.to_parquet(out / "part.0.parquet", index=False)
    html, manifest = _check_report(run_dir, figures=["confusion", "cmd", "errors_snr", "truth_rv"])
    assert {f["name"] for f in manifest["figures"]} >= {"confusion", "cmd", "truth_rv"}


def test_bad_arguments(tmp_path, full_run):
    with pytest.raises(FileNotFoundError, match="run_dir"):
        write_run_report(tmp_path / "nope")
    with pytest.raises(ValueError, match="not an mspec run directory"):
        write_run_report(tmp_path)
    with pytest.raises(TypeError, match="run_dir"):
        write_run_report(3)
    for kw, name in (
        ({"n_examples": -1}, "n_examples"),
        ({"n_examples": 2.5}, "n_examples"),
        ({"max_points": 10}, "max_points"),
        ({"dpi": 10_000}, "dpi"),
        ({"snr_min": float("nan")}, "snr_min"),
        ({"tm_sigma": 0.0}, "tm_sigma"),
    ):
        with pytest.raises(ValueError, match=name):
            write_run_report(full_run, **kw)


def test_clipped_mean_std():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(5.0, 10.0, 20_000), np.full(1000, 400.0), [np.nan]])
    mu, sd, n = clipped_mean_std(x, 3.0)
    assert abs(mu - 5.0) < 0.3 and 9.3 < sd < 10.2 and 19_000 < n <= 20_000
    assert np.isnan(clipped_mean_std([np.nan], 2.0)[0])
    with pytest.raises(ValueError, match="k"):
        clipped_mean_std(x, 0)


def test_cli_report(full_run, tmp_path, capsys):
    from mspec.cli import main

    out = tmp_path / "rep"
    assert main(["report", str(full_run), "--out", str(out), "--examples", "0"]) == 0
    assert capsys.readouterr().out.strip() == str(out / "index.html")
    assert (out / "cmd.png").is_file() and not (out / "spectra.png").exists()
    assert "Not drawn: n_examples = 0" in (out / "index.html").read_text()
    assert main(["report", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "run_dir" in err[0]


def test_library_does_not_use_pyplot():
    code = (
        "import sys, mspec.run_report, mspec.report; "
        "assert 'matplotlib.pyplot' not in sys.modules, 'pyplot imported'"
    )
    subprocess.run([_python(), "-c", code], check=True)


def _python() -> str:
    import sys

    return sys.executable


# --------------------------------------------------------------------------- browser


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    return None


def _browser(exe: str, profile: Path, *args: str, timeout: int = 180):
    cmd = [
        exe,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--hide-scrollbars",
        f"--user-data-dir={profile}",
        *args,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def test_browser_renders_every_image(complete_run, complete_report, tmp_path):
    exe = _chromium()
    if exe is None:
        pytest.skip("chromium not found (Debian package 'chromium'; .ci/run installs it)")
    html, manifest = complete_report
    page = (complete_run / "report" / "index.html").resolve()
    n_img = html.count("<img ")
    assert n_img == len(manifest["figures"]) > 5
    # 1. the DOM after load: the page's own script marks every decoded <img>
    res = _browser(
        exe, tmp_path / "profile-dom", "--virtual-time-budget=10000", "--dump-dom",
        page.as_uri(),
    )  # fmt: skip
    dom = res.stdout
    assert "<body" in dom, f"no DOM from chromium (rc {res.returncode}): {res.stderr[-2000:]}"
    body = re.search(r"<body([^>]*)>", dom).group(1)
    total = re.search(r'data-images-total="(\d+)"', body)
    decoded = re.search(r'data-images-decoded="(\d+)"', body)
    assert total and decoded, f"the load handler did not run: {body}"
    assert int(total.group(1)) == n_img
    assert int(decoded.group(1)) == n_img, re.search(r'data-images-broken="([^"]*)"', body)
    widths = [int(w) for w in re.findall(r'data-natural-width="(\d+)"', dom)]
    assert len(widths) == n_img and min(widths) > 100
    # 2. a screenshot of the whole page, kept beside the report
    shot = complete_run / "report" / "screenshot.png"
    res = _browser(
        exe, tmp_path / "profile-shot", f"--screenshot={shot}", "--window-size=1400,6000",
        "--virtual-time-budget=10000", page.as_uri(),
    )  # fmt: skip
    assert shot.is_file(), f"no screenshot (rc {res.returncode}): {res.stderr[-2000:]}"
    img = _png_array(shot.read_bytes())
    assert img.shape[1] == 1400
    _assert_not_blank(shot.read_bytes(), "screenshot")
    # the figures show in the screenshot: many distinct colours, not just text
    rgb = (img[..., :3] * 255).astype(np.uint8).reshape(-1, 3)
    colours = np.unique(rgb[:: max(1, rgb.shape[0] // 200_000)], axis=0)
    assert len(colours) > 200, f"only {len(colours)} colours: images did not render"
    # a broken image in the page makes the DOM check fail (the check can fail)
    broken = complete_run / "report" / "broken.html"
    broken.write_text(html.replace("base64,iVBOR", "base64,AAAA", 1), encoding="utf-8")
    res = _browser(
        exe, tmp_path / "profile-broken", "--virtual-time-budget=10000", "--dump-dom",
        broken.resolve().as_uri(),
    )  # fmt: skip
    dec = re.search(r'data-images-decoded="(\d+)"', res.stdout)
    assert dec and int(dec.group(1)) == n_img - 1
    broken.unlink()


def test_report_reads_only_the_columns_it_uses(full_run, full_report, tmp_path, monkeypatch):
    """The catalog is read column by column on demand (the driver's memory at survey scale):
    a report reads fewer columns than the catalog holds, each value equal to the file's."""
    import pandas as pd

    from mspec import run_report as rr

    r = rr._load_run(full_run)
    assert r.cat is not None and len(r.cat) == N
    whole = pd.read_parquet(full_run / "catalog" / "catalog.parquet")
    assert r.cat.columns == list(whole.columns)
    assert not r.cat._cache  # nothing read yet
    pd.testing.assert_series_equal(r.cat["snr_i"], whole["snr_i"], check_names=False)
    sub = r.cat[["obsid", "rv_tm"]]
    pd.testing.assert_frame_equal(sub, whole[["obsid", "rv_tm"]])
    row = r.cat.row(3)
    assert row["obsid"] == whole["obsid"].iat[3]
    assert "nope" not in r.cat
    with pytest.raises(KeyError):
        r.cat["nope"]
    # a whole report touches only part of the catalog
    read: set[str] = set()
    orig = rr._Catalog._column

    def spy(self, col):
        read.add(col)
        return orig(self, col)

    monkeypatch.setattr(rr._Catalog, "_column", spy)
    rr.write_run_report(full_run, out_dir=tmp_path / "report")
    assert {"snr_i", "rv_tm", "spt_class"} <= read
    assert len(read) < len(whole.columns)


def test_report_with_bounded_caches_is_the_same(
    complete_run, complete_report, tmp_path, monkeypatch
):
    """The report keeps at most a budget of catalog columns and conversions (its memory does
    not grow with the survey): with budgets so small that nearly every column is read again
    when asked for, the figures, counts and statistics are identical."""
    from mspec import run_report as rr

    reads: list[str] = []
    sizes: list[int] = []
    orig = rr._Catalog._read

    def spy(self, col):
        reads.append(col)
        sizes.append(len(self._cache))
        return orig(self, col)

    monkeypatch.setattr(rr._Catalog, "_read", spy)
    monkeypatch.setattr(rr._Catalog, "CACHE_BYTES", 1)
    monkeypatch.setattr(rr._MEMO, "max_bytes", 1)
    out = tmp_path / "small"
    rr.write_run_report(complete_run, out_dir=out)
    assert len(reads) > len(set(reads))  # columns were dropped and read again
    assert max(sizes) <= 1  # the newest entry only
    ref = json.loads((complete_run / "report" / "manifest.json").read_text())
    got = json.loads((out / "manifest.json").read_text())
    for key in ("figures", "not_drawn", "counts", "stats"):
        assert got[key] == ref[key], key
    for f in ref["figures"]:
        assert (out / f["file"]).read_bytes() == (complete_run / "report" / f["file"]).read_bytes()


def test_accuracy_metrics_from_the_column_reader(complete_run):
    """The report hands its on-demand column reader to accuracy_metrics (no whole-frame
    copy of the survey): the metrics equal those of the DataFrame; other objects are
    refused by name."""
    from mspec import run_report as rr
    from mspec.report import accuracy_columns, accuracy_metrics

    r = rr._load_run(complete_run)
    whole = pd.read_parquet(complete_run / "catalog" / "catalog.parquet")
    ref = accuracy_metrics(whole[accuracy_columns(whole.columns)], snr_min=20.0)
    assert accuracy_metrics(r.cat, snr_min=20.0) == ref
    with pytest.raises(TypeError, match="cat must be a pandas DataFrame"):
        accuracy_metrics({"snr_i": [1.0]}.items(), snr_min=20.0)


def test_lru_keeps_the_newest_within_its_budget():
    from mspec.run_report import _LRU

    made = []

    def make(k, n):
        made.append(k)
        return np.zeros(n, np.uint8)

    c = _LRU(100, lambda v: v.nbytes)
    c.get_or("a", lambda: make("a", 60))
    c.get_or("b", lambda: make("b", 30))
    assert list(c) == ["a", "b"]
    c.get_or("a", lambda: make("a", 60))  # hit: now the most recent
    assert made == ["a", "b"] and list(c) == ["b", "a"]
    c.get_or("c", lambda: make("c", 30))  # 120 bytes: the least recent (b) goes
    assert list(c) == ["a", "c"]
    c.get_or("d", lambda: make("d", 500))  # larger than the budget: kept alone
    assert list(c) == ["d"]
    c.clear()
    assert not c and not c._bytes
