"""`mspec run` on the real LAMOST files of ../shared/data with the packaged real templates."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mspec.config import Config
from mspec.data import shared_data_dir
from mspec.pipeline import run
from mspec.testing import tiny_models

DATA = shared_data_dir()
FOLDERS = ["lamost_dr7_mdwarfs", "lamost_dr1", "lamost_dr2", "lamost_dr9plus"]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.realdata,
    pytest.mark.skipif(not (DATA / "lamost_dr7_mdwarfs").is_dir(), reason="no ../shared/data"),
]


def test_run_on_real_files(tmp_path_factory):
    models = tiny_models(tmp_path_factory.mktemp("models"))
    tmp = tmp_path_factory.mktemp("real")
    cfg = Config.from_dict(
        {
            "sources": [str(DATA / f) for f in FOLDERS],
            "store": str(tmp / "real.zarr"),
            "run_dir": str(tmp / "run"),
            "chunk_size": 16,
            "cluster": {"scheduler": "sync"},
            "models": {"dir": str(models)},
            "templates": {"set": "real"},
        }
    )
    res = run(cfg)
    n_files = sum(len(list((DATA / f).glob("*.fits*"))) for f in FOLDERS)
    assert res.ingest["stored"] + res.ingest["quarantined"] + res.ingest["duplicates"] == n_files
    assert res.n_spectra == res.ingest["stored"] >= 40
    # what it could not do is said: no Gaia data for real files without a [gaia] table
    assert any("no Gaia data" in x for x in res.not_available)
    cat = pd.read_parquet(res.catalog)
    assert len(cat) == res.n_spectra
    dr7 = cat["file"].astype(str).str.contains("|".join(
        p.name.split(".")[0] for p in (DATA / "lamost_dr7_mdwarfs").glob("*.fits")
    ))  # fmt: skip
    d = (cat.loc[dr7, "rv_tm"] - cat.loc[dr7, "lamost_rv"]).to_numpy()
    d = d[np.isfinite(d)]
    assert d.size >= 30
    robust = 1.4826 * np.median(np.abs(d - np.median(d)))
    assert robust < 8.0, robust  # docs/accuracy.md: 4.0 km/s
    assert Path(res.run_dir, "inputs.json").is_file()
