"""Pipeline faults (issue 17): a dask worker killed during each stage, two runs of one
configuration, a full disk. Every run must end with the bytes of an undisturbed run.
(kill -9 of ``mspec run`` itself is tested in ``test_pipeline.py``.)"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from mspec.config import Config
from mspec.pipeline import PIPELINE, RunError, run
from mspec.testing import tiny_models, tiny_survey_store, zarr_arrays_equal

N, CHUNK = 48, 12  # 4 chunks per stage

pytestmark = [pytest.mark.slow]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return tiny_models(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return tiny_survey_store(tmp_path_factory.mktemp("survey"), N, seed=17, chunk_size=CHUNK)


def _config(store, run_dir, models, **extra) -> Config:
    d = {
        "store": str(store),
        "run_dir": str(run_dir),
        "chunk_size": CHUNK,
        "cluster": {"scheduler": "sync"},
        "models": {"dir": str(models)},
        "templates": {"set": "demo"},
        "rv": {"oversample": 23},
    }
    d.update(extra)
    return Config.from_dict(d)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, store, models):
    run_dir = tmp_path_factory.mktemp("ref") / "run"
    run(_config(store, run_dir, models))
    return run_dir


def _catalog_files(run_dir: Path) -> dict[str, bytes]:
    root = run_dir / "catalog" / "catalog.parquet"
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*.parquet"))}


def _same_outputs(a: Path, b: Path) -> None:
    for s in PIPELINE:
        ga, gb = a / "stages" / f"{s.name}.zarr", b / "stages" / f"{s.name}.zarr"
        assert zarr_arrays_equal(ga, gb) == [], s.name
    assert _catalog_files(a) == _catalog_files(b)


def test_same_config_twice_gives_bitwise_identical_catalogs(tmp_path, store, models, reference):
    second = tmp_path / "again"
    run(_config(store, second, models))
    cat_a, cat_b = _catalog_files(reference), _catalog_files(second)
    assert cat_a and cat_a == cat_b  # the Parquet bytes themselves
    assert pq.read_table(reference / "catalog" / "catalog.parquet").num_rows == N
    _same_outputs(reference, second)


@pytest.mark.distributed
def test_worker_killed_during_each_stage(tmp_path, store, models, reference, monkeypatch):
    """kill -9 one of two LocalCluster workers while each stage computes: dask reschedules
    the lost tasks on the surviving / restarted worker and the outputs are identical."""
    from distributed import Client, LocalCluster

    monkeypatch.setenv("MSPEC_TEST_CHUNK_DELAY", "0.5")  # time to kill inside a stage
    run_dir = tmp_path / "run"
    killed: list[tuple[str, int]] = []
    stop = threading.Event()

    with (
        LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address="127.0.0.1:0"
        ) as cluster,
        Client(cluster) as client,
    ):

        def killer():
            for s in PIPELINE:
                stamp = run_dir / "stages" / f"{s.name}.json"
                done = run_dir / "stages" / f"{s.name}.done"
                while not stop.is_set() and not stamp.exists():
                    time.sleep(0.02)
                if stop.is_set():
                    return
                n_done = len(list(done.glob("*.json"))) if done.exists() else 0
                if n_done >= N // CHUNK:
                    continue  # finished before we could act (recorded below)
                pids = client.run(os.getpid)
                victim = sorted(pids.values())[0]
                os.kill(victim, signal.SIGKILL)
                killed.append((s.name, n_done))
                # wait for this stage to finish before moving to the next
                while not stop.is_set() and not (
                    done.exists() and len(list(done.glob("*.json"))) >= N // CHUNK
                ):
                    time.sleep(0.05)

        t = threading.Thread(target=killer, daemon=True)
        t.start()
        try:
            res = run(_config(store, run_dir, models), client=client)
        finally:
            stop.set()
            t.join(30)
    assert [k for k, _ in killed] == [s.name for s in PIPELINE], killed
    assert all(n < N // CHUNK for _, n in killed)
    assert all(res.stages[s.name]["computed"] == N // CHUNK for s in PIPELINE)
    _same_outputs(reference, run_dir)


def _du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _mount_tmpfs(where: Path, size: int) -> bool:
    where.mkdir(parents=True, exist_ok=True)
    if shutil.which("mount") is None:
        return False
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
        capture_output=True,
    )
    return r.returncode == 0


def test_disk_full_then_rerun_after_freeing_space(tmp_path, store, models, reference):
    """A run directory on a small tmpfs: the run stops with a one-line RunError naming the
    full disk; after the tmpfs is grown (space freed) the same command completes with the
    bytes of an undisturbed run."""
    mnt = tmp_path / "small"
    need = _du(reference)
    size = max(64 * 1024, (need // 2) // 4096 * 4096)  # room for about half of the outputs
    if not _mount_tmpfs(mnt, size):
        pytest.skip("mounting a tmpfs is not permitted here (see the ENOSPC simulation test)")
    try:
        run_dir = mnt / "run"
        cfg = _config(store, run_dir, models)
        with pytest.raises(RunError, match="no space left on the device") as info:
            run(cfg)
        msg = str(info.value)
        assert "\n" not in msg and "rerun" in msg
        done_before = sum(
            len(list((run_dir / "stages" / f"{s.name}.done").glob("*.json")))
            for s in PIPELINE
            if (run_dir / "stages" / f"{s.name}.done").exists()
        )
        subprocess.run(["mount", "-o", f"remount,size={64 * 2**20}", str(mnt)], check=True)
        res = run(cfg)
        assert sum(res.stages[s.name]["skipped"] for s in PIPELINE) == done_before
        _same_outputs(reference, run_dir)
        assert not list(run_dir.rglob("*.partial"))
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_enospc_from_the_writer_is_a_run_error(tmp_path, store, models, reference, monkeypatch):
    """The same without a mount: zarr's writer raises ENOSPC after a few chunk files."""
    import errno

    import zarr.storage._local as local

    orig = local._put
    calls = {"n": 0}

    def full_disk(path, value, exclusive=False):
        calls["n"] += 1
        if calls["n"] > 60:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return orig(path, value, exclusive=exclusive)

    monkeypatch.setattr(local, "_put", full_disk)
    cfg = _config(store, tmp_path / "run", models)
    with pytest.raises(RunError, match=r"^stage \w+: no space left on the device"):
        run(cfg)
    monkeypatch.setattr(local, "_put", orig)
    run(cfg)
    _same_outputs(reference, tmp_path / "run")
