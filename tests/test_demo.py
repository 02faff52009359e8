"""`make demo` end to end at a tiny size: every stage runs and the outputs are consistent."""

import json

import numpy as np
import pandas as pd
import pytest

from mspec.demo import run_demo


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.realdata
def test_demo_end_to_end(tmp_path):
    # several chunks per variable (the crash of issue 11 needed more than one chunk)
    report = run_demo(
        tmp_path, n_spectra=60, n_train=240, epochs=1, n_workers=1, seed=3, chunk_size=16
    )
    text = report.read_text()
    lines = text.splitlines()
    # a summary table first, then every stage with its own duration
    assert lines[0].startswith("# ") and lines[2].startswith("| metric | value | paper")
    for stage in (
        "simulate",
        "write FITS",
        "train CNNs",
        "run: ingest",
        "run: preprocess",
        "run: scm",
        "run: dgcm",
        "run: rvmm",
        "run: spmm",
        "run: catalog",
    ):
        assert f"| {stage} |" in text, stage
    cat = pd.read_parquet(tmp_path / "catalog.parquet")
    assert len(cat) == 60 and cat["obsid"].is_unique
    for col in ("rv_tm", "rv_tml7500", "spt_class", "dmgm_class", "teff", "true_rv"):
        assert col in cat
    m = cat["true_class"] == "M"
    # TM works without training: simulated M stars at their true RV within a few km/s
    d = (cat.loc[m, "rv_tm"] - cat.loc[m, "true_rv"]).to_numpy()
    assert np.nanmedian(np.abs(d)) < 5
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["metrics"]["n_spectra"] == 60
    assert {s["stage"] for s in metrics["stages"]} >= {"simulate", "train CNNs", "run: rvmm"}
    # the catalog: documented order, no index artefacts, TLMA only for spectra classified M
    from mspec.pipeline.runner import CATALOG_ORDER

    assert list(cat.columns[:3]) == ["obsid", "ra", "dec"] and "spectra" not in cat
    head = [c for c in cat.columns if c in CATALOG_ORDER]
    assert head == [c for c in CATALOG_ORDER if c in cat.columns]
    assert cat.loc[~cat["is_m"].astype(bool), "teff"].isna().all()
    import pyarrow.parquet as pq

    units = json.loads(pq.read_schema(tmp_path / "catalog.parquet" / "part.0.parquet")
                       .metadata[b"mspec_units"])  # fmt: skip
    assert units["rv_tm"] == "km/s" and units["teff"] == "K"
    assert (tmp_path / "models" / "tlma").is_dir()
    assert (tmp_path / "accuracy.png").stat().st_size > 0
    # every store the demo wrote has one chunking along spectra, and no object dtypes
    from mspec.io.zarrio import check_uniform_chunks

    stores = [tmp_path / "spectra.zarr", *(tmp_path / "run" / "stages").glob("*.zarr")]
    from mspec.pipeline import PIPELINE

    assert len(stores) == 1 + len(PIPELINE)
    for store in stores:
        chunks = check_uniform_chunks(store)
        assert len(chunks) == 4, (store, chunks)


def test_demo_bad_argument(tmp_path):
    with pytest.raises(ValueError, match="n_spectra"):
        run_demo(tmp_path, n_spectra=3)
