"""Quick start: a small simulated survey through the store, preprocessing and TM RVs.

Run with ``.venv/bin/python examples/quickstart.py`` (about a minute on a laptop).
"""

import tempfile
from pathlib import Path

import numpy as np

import mspec
from mspec.io import write_lamost_fits
from mspec.simulate import simulated_templates


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="mspec-quickstart-"))
    survey = mspec.simulate_survey(200, seed=1, mix={"M": 1.0}, snr=(20, 80))
    write_lamost_fits(survey, work / "fits", layout="image")
    summary = mspec.ingest([str(work / "fits" / "catalog.parquet")], str(work / "spectra.zarr"))
    print("ingest:", summary["stored"], "stored,", summary["quarantined"], "quarantined")

    ds = mspec.open_store(str(work / "spectra.zarr"))  # lazy, dask-backed
    ds = mspec.preprocess(ds, recipe="cnn")  # adds flux_grid on the 1 A grid (lazy)
    rv = mspec.template_match(ds, templates=simulated_templates(), merge=False)  # lazy
    rv = rv.compute()
    d = rv["rv_tm"].values - ds["true_rv"].values
    print(
        f"TM RV - truth: median {np.nanmedian(d):+.2f} km/s, "
        f"robust sigma {1.4826 * np.nanmedian(np.abs(d - np.nanmedian(d))):.2f} km/s"
    )


if __name__ == "__main__":
    main()
