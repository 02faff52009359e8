"""Helpers for tests (mspec's own and users'): a scheduler that forbids computing, tiny
simulated surveys written as FITS and ingested, and tiny CNN models.

Nothing here is used by the pipeline itself.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

__all__ = [
    "ComputeError",
    "raise_if_computes",
    "tiny_survey_store",
    "tiny_models",
    "zarr_arrays_equal",
]


class ComputeError(AssertionError):
    """Something computed a dask graph where only building one was allowed."""


def _boom(*args, **kwargs):
    raise ComputeError("a dask graph was computed where the code must stay lazy")


@contextlib.contextmanager
def raise_if_computes():
    """Within the block, any dask compute raises :class:`ComputeError`."""
    import dask

    with dask.config.set(scheduler=_boom):
        yield


def tiny_survey_store(
    directory, n: int = 48, *, seed: int = 1, chunk_size: int = 16, layout: str = "image"
) -> Path:
    """Simulate ``n`` spectra, write them as LAMOST FITS and ingest them into a store.

    Parameters
    ----------
    directory : path-like
        Parent directory: FITS go to ``fits/``, the store to ``spectra.zarr``.
    n, seed : int
        Survey size and seed (:func:`mspec.simulate_survey`).
    chunk_size : int
        Spectra per store chunk.
    layout : str
        LAMOST file layout.

    Returns
    -------
    pathlib.Path
        The store path.
    """
    import mspec
    from mspec.io import write_lamost_fits

    directory = Path(directory)
    survey = mspec.simulate_survey(n, seed=seed)
    write_lamost_fits(survey, directory / "fits", layout=layout)
    store = directory / "spectra.zarr"
    mspec.ingest([str(directory / "fits" / "catalog.parquet")], str(store),
                 chunk_size=chunk_size, client="sync")  # fmt: skip
    return store


def tiny_models(directory, *, n_train: int = 300, seed: int = 0) -> Path:
    """Train minimal CNNs (1 epoch, 2-member ensembles) for tests of the plumbing.

    Returns
    -------
    pathlib.Path
        Model directory with ``spt/``, ``wdm/``, ``dmgm/``, ``tlma/``.
    """
    from mspec.pipeline.models import build_default_models

    return build_default_models(directory, n_train=n_train, epochs=1, folds=2, seed=seed)


def zarr_arrays_equal(a, b) -> list[str]:
    """Names of the arrays that differ (bytes, shape or dtype) between two Zarr groups."""
    import zarr

    ga, gb = zarr.open_group(str(a), mode="r"), zarr.open_group(str(b), mode="r")
    na, nb = dict(ga.arrays()), dict(gb.arrays())
    diff = sorted(set(na) ^ set(nb))
    for name in sorted(set(na) & set(nb)):
        x, y = na[name][...], nb[name][...]
        if x.shape != y.shape or x.dtype != y.dtype:
            diff.append(name)
        elif x.dtype.kind in "OT":
            if x.tolist() != y.tolist():
                diff.append(name)
        elif x.tobytes() != y.tobytes():
            diff.append(name)
    return diff
