"""The pipeline runner: end to end, resume after kill -9, refusals, locks, append, clusters."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import mspec
from mspec._exec import DirLock, LockError
from mspec.config import Config
from mspec.io.zarrio import check_uniform_chunks
from mspec.pipeline import PIPELINE, StageChangedError, run, run_status
from mspec.testing import tiny_models, tiny_survey_store, zarr_arrays_equal

N, CHUNK = 64, 16  # 4 chunks per variable

pytestmark = [pytest.mark.slow]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return tiny_models(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return tiny_survey_store(tmp_path_factory.mktemp("survey"), N, seed=7, chunk_size=CHUNK)


def _config(store, run_dir, models, **extra) -> Config:
    d = {
        "store": str(store),
        "run_dir": str(run_dir),
        "chunk_size": CHUNK,
        "cluster": {"scheduler": "sync"},
        "models": {"dir": str(models)},
        "templates": {"set": "demo"},
        "rv": {"oversample": 23},  # coarser velocity lattice: faster, same plumbing
    }
    for k, v in extra.items():
        if isinstance(v, dict):
            d.setdefault(k, {}).update(v)
        else:
            d[k] = v
    return Config.from_dict(d)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, store, models):
    """An uninterrupted run: the outputs every other run must reproduce bitwise."""
    run_dir = tmp_path_factory.mktemp("ref") / "run"
    res = run(_config(store, run_dir, models))
    return run_dir, res


def _same_outputs(a: Path, b: Path) -> None:
    for s in PIPELINE:
        ga, gb = a / "stages" / f"{s.name}.zarr", b / "stages" / f"{s.name}.zarr"
        assert ga.exists() and gb.exists(), s.name
        assert zarr_arrays_equal(ga, gb) == [], s.name


def test_run_end_to_end(reference):
    run_dir, res = reference
    assert res.n_spectra == N
    for s in PIPELINE:
        info = res.stages[s.name]
        assert info["status"] == "done" and info["chunks"] == N // CHUNK
        assert info["computed"] == N // CHUNK and info["skipped"] == 0
        # one chunking along spectra for every variable of every stage group
        assert len(check_uniform_chunks(run_dir / "stages" / f"{s.name}.zarr")) == N // CHUNK
    cat = pd.read_parquet(res.catalog)
    assert len(cat) == N and cat["obsid"].is_unique
    for col in ("spt_class", "wdm_class", "dmgm_class", "rv_tm", "rv_tml7500", "teff"):
        assert col in cat, col
    assert "spectra" not in cat.columns
    # TLMA only for spectra classified M
    notm = ~cat["is_m"].astype(bool)
    assert cat.loc[notm, "teff"].isna().all()
    # what is not built is said, not faked
    assert not any("reconcile" in x for x in res.not_available)
    assert cat["rv_from"].isin(["LAMOST", "TM", "DSAL I", "DSAL II", "TML7500", "DSEL",
                                "NoRV_lowQuality", "NoRV_waveErr"]).all()  # fmt: skip
    assert (run_dir / "stages" / "reconcile.stats.json").is_file()
    # the simulated store carries Gaia/WISE columns: the CMD is placed
    assert not any("Gaia" in x for x in res.not_available)
    assert cat["CMD_pos"].isin(["dM", "gM", "other", ""]).all() and (cat["CMD_pos"] == "dM").any()
    assert "idx_tio5" in cat and cat["idx_tio5"].notna().any()
    # the paper's catalogs, with the cascade V0 >= V1 >= V2 >= V3
    assert set(res.catalogs) >= {"M_Catalog_V0", "M_Catalog_V1", "M_Catalog_V2", "M_Catalog_V3",
                                 "recommended", "non_M_Catalog"}  # fmt: skip
    sizes = {k: len(pd.read_parquet(p)) for k, p in res.catalogs.items()}
    assert sizes["M_Catalog_V0"] >= sizes["M_Catalog_V1"] >= sizes["M_Catalog_V2"]
    assert sizes["M_Catalog_V2"] >= sizes["M_Catalog_V3"]
    assert (run_dir / "catalog" / "summary.csv").is_file()
    assert res.report and Path(res.report).is_file()
    saved = json.loads((run_dir / "run.json").read_text())
    assert saved["n_spectra"] == N
    assert (run_dir / "config.resolved.toml").is_file() and (run_dir / "run.log").is_file()
    inputs = json.loads((run_dir / "inputs.json").read_text())
    assert inputs["templates_sha256"] and any(k.startswith("spt/") for k in inputs["models_sha256"])
    st = run_status(run_dir)
    assert all(v["done"] == N // CHUNK and v["pending"] == 0 for v in st["stages"].values())


def test_rerun_skips_everything(tmp_path, store, models, reference):
    cfg = _config(store, tmp_path / "run", models)
    run(cfg)
    res = run(cfg)
    assert all(res.stages[s.name]["computed"] == 0 for s in PIPELINE)
    _same_outputs(reference[0], tmp_path / "run")


def _cli(cfg_path: Path, *extra, env=None, **kw):
    cmd = [sys.executable, "-m", "mspec.cli", "--debug", "run", str(cfg_path), "--quiet", *extra]
    return subprocess.Popen(
        cmd, env={**os.environ, **(env or {})}, start_new_session=True,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **kw,
    )  # fmt: skip


@pytest.mark.parametrize("stage", ["preprocess", "scm", "rvmm"])
def test_kill9_then_resume_is_identical(tmp_path, store, models, reference, stage):
    """kill -9 during preprocess, CNN inference (SCM) and RV; the rerun gives the same bytes."""
    run_dir = tmp_path / "run"
    cfg = _config(store, run_dir, models)
    cfg_path = tmp_path / "run.toml"
    cfg_path.write_text(cfg.to_toml())
    proc = _cli(cfg_path, env={"MSPEC_TEST_CHUNK_DELAY": "0.4"})
    done_dir = run_dir / "stages" / f"{stage}.done"
    t0 = time.time()
    while time.time() - t0 < 240:
        if done_dir.is_dir() and len(list(done_dir.glob("*.json"))) >= 1:
            break
        if proc.poll() is not None:
            pytest.fail(f"run ended before the kill: {proc.stdout.read().decode()[-2000:]}")
        time.sleep(0.05)
    else:
        pytest.fail("stage never started")
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    n_done = len(list(done_dir.glob("*.json")))
    assert 1 <= n_done < N // CHUNK, n_done
    # the stale lock of the killed run is taken over
    res = run(cfg)
    assert res.stages[stage]["skipped"] == n_done
    _same_outputs(reference[0], run_dir)


def test_changed_config_refuses_naming_the_stage(tmp_path, store, models, reference):
    cfg = _config(store, tmp_path / "run", models)
    run(cfg, stages=["rvmm"])
    changed = cfg.replace(rv={"min_pixels": 150})
    with pytest.raises(StageChangedError, match=r"rvmm.*\[rv\].*--redo rvmm"):
        run(changed)
    res = run(changed, redo=["rvmm"])
    assert res.stages["rvmm"]["computed"] == N // CHUNK
    assert res.stages["preprocess"]["computed"] == 0  # upstream untouched


def test_redo_unknown_stage(tmp_path, store, models):
    with pytest.raises(ValueError, match="redo"):
        run(_config(store, tmp_path / "run", models), redo=["nope"])


def test_lock_refusal_and_stale_takeover(tmp_path, store, models):
    run_dir = tmp_path / "run"
    cfg = _config(store, run_dir, models)
    with DirLock(run_dir), pytest.raises(LockError, match="in use"):
        run(cfg, stages=["preprocess"])
    # a lock file left by a dead process (nobody holds the flock) is stale
    (run_dir / ".lock").write_text(json.dumps({"pid": 999999, "host": "x", "started": 0}))
    res = run(cfg, stages=["preprocess"])
    assert res.stages["preprocess"]["computed"] == N // CHUNK
    assert not (run_dir / ".lock").exists()


def test_cli_lock_refusal_exit_code(tmp_path, store, models):
    run_dir = tmp_path / "run"
    cfg_path = tmp_path / "run.toml"
    cfg_path.write_text(_config(store, run_dir, models).to_toml())
    with DirLock(run_dir):
        out = subprocess.run(
            [sys.executable, "-m", "mspec.cli", "run", str(cfg_path)],
            capture_output=True, text=True,
        )  # fmt: skip
    assert out.returncode == 3
    assert "in use" in out.stderr and "Traceback" not in out.stderr


def test_cli_config_error_names_key(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('store = "s.zarr"\nrun_dir = "r"\n[rv]\noversample = "69"\n')
    out = subprocess.run(
        [sys.executable, "-m", "mspec.cli", "run", str(bad)], capture_output=True, text=True
    )
    assert out.returncode == 2
    assert "rv.oversample" in out.stderr and "bad.toml" in out.stderr
    assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1


def test_append_then_rerun_processes_only_new_chunks(tmp_path, models):
    survey = mspec.simulate_survey(N, seed=11)
    from mspec.io import write_lamost_fits

    write_lamost_fits(survey.isel(spectra=slice(0, 40)), tmp_path / "a", layout="image")
    write_lamost_fits(survey.isel(spectra=slice(40, N)), tmp_path / "b", layout="table")
    store = tmp_path / "spectra.zarr"
    cfg = _config(store, tmp_path / "run", models, sources=[str(tmp_path / "a")])
    first = run(cfg)
    assert first.n_spectra == 40  # chunks [0,16) [16,32) [32,40)
    cfg2 = cfg.replace(sources=(str(tmp_path / "a"), str(tmp_path / "b")))
    second = run(cfg2)
    assert second.n_spectra == N
    for s in PIPELINE:
        # [32,48) replaces the partial [32,40); [48,64) is new
        assert second.stages[s.name]["computed"] == 2, s.name
        assert second.stages[s.name]["skipped"] == 2, s.name
    cat = pd.read_parquet(second.catalog)
    assert len(cat) == N and cat["rv_tm"].notna().sum() > N // 2


@pytest.mark.distributed
def test_scheduler_address_gives_identical_outputs(tmp_path, store, models, reference):
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                      dashboard_address="127.0.0.1:0") as cluster, Client(cluster):  # fmt: skip
        cfg = _config(
            store, tmp_path / "run", models, cluster={"scheduler": cluster.scheduler_address}
        )
        res = run(cfg)
        names = {sp.name for sp in cluster.scheduler.extensions["spans"].spans.values()}
    assert all(res.stages[s.name]["computed"] == N // CHUNK for s in PIPELINE)
    _same_outputs(reference[0], tmp_path / "run")
    # every stage's chunks ran in its named span
    assert {(f"mspec-{s.name}",) for s in PIPELINE} <= names, names


def test_outputs_lazy_builders(store, models):
    """Every stage builder builds a graph without computing."""
    from mspec.io.store import open_store
    from mspec.pipeline.stages import RunContext
    from mspec.simulate import simulated_templates
    from mspec.testing import raise_if_computes

    cfg = _config(store, "unused", models)
    ds = open_store(store)
    ctx = RunContext(config=cfg, models_dir=Path(models), templates=simulated_templates())
    full = ds
    for s in PIPELINE:
        if s.prepare is not None:  # population statistics: computed once, by design
            ctx.stats[s.name] = s.prepare(ctx, full)
        with raise_if_computes():
            out = s.build(ctx, full)
        full = full.assign(out.data_vars)
    assert np.isin(["teff", "rv_tm", "spt_class", "rv_from"], list(full.data_vars)).all()


def test_relative_paths_resolve_from_the_working_directory(tmp_path, store, models, monkeypatch):
    """A config with relative paths (as `mspec demo --out demo_output` makes) runs to the end."""
    from mspec.config import load_config

    monkeypatch.chdir(store.parent)
    cfg = _config(store.name, "relrun", models)
    res = run(cfg, stages=["preprocess"])
    saved = load_config(store.parent / "relrun" / "config.resolved.toml")
    assert Path(saved.store) == store and Path(saved.run_dir) == store.parent / "relrun"
    assert res.catalogs and Path(res.run_dir).is_absolute()


def test_building_the_cnn_graphs_does_not_import_torch(store, models):
    """SCM/DGCM/SPMM's CNN tasks are built in the driver without torch (~180 MiB there);
    the networks are built where the tasks run. A wrong weights file still fails at once."""
    code = f"""
import shutil, sys, tempfile
from pathlib import Path
import mspec
from mspec.io.store import open_store
from mspec.ml.infer import predict
from mspec.ml.io import ModelFileError
from mspec.testing import raise_if_computes
ds = open_store({str(store)!r})
models = Path({str(models)!r})
with raise_if_computes():
    pre = mspec.preprocess(ds, recipe="cnn")
    for kind in ("spt", "wdm", "dmgm"):
        out = predict(pre, models / kind)
    rest = mspec.preprocess(ds, recipe="tlma", rv=ds["lamost_rv"].fillna(0.0), merge=False)
    lum = out["dmgm_class"]
    tl = predict(rest, models / "tlma", lumclass=lum)
assert "teff" in tl and "spt_class" not in tl
assert "torch" not in sys.modules, "graph building imported torch"
bad = Path(tempfile.mkdtemp()) / "spt"
shutil.copytree(models / "spt", bad)
import hashlib, json
meta = json.loads((bad / "model.json").read_text())
f = meta["members"][0]["file"]
blob = (models / "wdm" / f).read_bytes()  # 2 outputs, not 8: the shapes differ
(bad / f).write_bytes(blob)
meta["members"][0]["sha256"] = hashlib.sha256(blob).hexdigest()
(bad / "model.json").write_text(json.dumps(meta))
try:
    predict(pre, bad)
except ModelFileError as exc:
    print("refused:", exc)
else:
    raise SystemExit("a swapped weights file was accepted")
assert "torch" not in sys.modules
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=600)  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    assert "refused:" in res.stdout and "does not fit" in res.stdout


def test_run_starts_its_cluster_with_lean_dask_logs(store, models, tmp_path, monkeypatch):
    """mspec.run opens (or connects) its cluster inside lean_dask_config: the scheduler and
    the workers keep short developer logs, not 1,000 task-laden messages per connection."""
    import dask

    from mspec._exec import DASK_LOG_LENGTH
    from mspec.pipeline import runner

    seen = {}

    class Stop(Exception):
        pass

    def spy(cfg, client, stack):
        seen["length"] = dask.config.get("distributed.admin.low-level-log-length")
        raise Stop

    monkeypatch.setattr(runner, "_open_cluster", spy)
    with pytest.raises(Stop):
        run(_config(store, tmp_path / "run", models))
    assert seen["length"] == DASK_LOG_LENGTH
    assert dask.config.get("distributed.admin.low-level-log-length") == 1000  # restored
