"""Tables saved with a store: per-spectrum metadata and the quarantine of skipped files.

Both are folders of Parquet parts (one per ingest batch) inside the store, so they can be
read with pandas, pyarrow or ``dask.dataframe.read_parquet`` directly; the helpers here only
read the parts of *committed* batches.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["read_metadata", "read_quarantine", "QUARANTINE_COLUMNS"]

#: Columns of the quarantine table.
QUARANTINE_COLUMNS = ("path", "file", "obsid", "code", "reason", "batch")


def _parts(store: Path, folder: str) -> list[str]:
    from mspec.io.store import store_state

    n = int(store_state(store)["batches"])
    d = store / folder
    if not d.exists():
        return []
    out = []
    for p in sorted(d.glob("part-*.parquet")):
        if int(p.stem.split("-")[1]) < n:
            out.append(str(p))
    return out


def read_metadata(store: str | os.PathLike):
    """Per-spectrum metadata of a store as a lazy ``dask.dataframe``.

    Parameters
    ----------
    store : str or PathLike
        Store written by :func:`mspec.io.store.ingest`.

    Returns
    -------
    dask.dataframe.DataFrame
        One row per stored spectrum, in store order: ``obsid``, ``row`` (index along
        ``spectra``) and every per-spectrum variable of the store (``ra``, ``dec``, ``mjd``,
        ``snr_*``, ``lamost_*``, ``file``, ``release``, ``resampled``, ``loglam_offset``, and
        catalogue extras such as Gaia or ``true_*`` columns).
    """
    import dask.dataframe as dd
    import pandas as pd

    parts = _parts(Path(store), "metadata.parquet")
    if not parts:
        return dd.from_pandas(
            pd.DataFrame({"obsid": pd.Series(dtype="int64"), "row": pd.Series(dtype="int64")}),
            npartitions=1,
        )
    return dd.read_parquet(parts)


def read_quarantine(store: str | os.PathLike):
    """Files an ingest skipped, with the reason (a ``pandas.DataFrame``).

    Parameters
    ----------
    store : str or PathLike
        Store written by :func:`mspec.io.store.ingest`.

    Returns
    -------
    pandas.DataFrame
        Columns :data:`QUARANTINE_COLUMNS`: absolute ``path``, base name ``file``, ``obsid``
        (nullable; known for duplicates and files that were read), ``code`` (a key of
        :data:`mspec.io.lamost.QUARANTINE_CODES`), human-readable ``reason`` and ingest
        ``batch``. Duplicate obsids have code ``"duplicate_obsid"``. A file that a later
        ingest read again (it changed, see :func:`mspec.io.store.ingest`) appears only with
        its latest outcome: not at all once stored, with its new reason otherwise.
    """
    import pandas as pd

    parts = _parts(Path(store), "quarantine.parquet")
    if not parts:
        return pd.DataFrame(
            {
                c: pd.Series(
                    dtype="Int64" if c == "obsid" else ("int64" if c == "batch" else "object")
                )
                for c in QUARANTINE_COLUMNS
            }
        )
    q = pd.concat([pd.read_parquet(p) for p in parts], ignore_index=True)
    latest = _latest_batch(Path(store))
    keep = [latest.get(path, b) == b for path, b in zip(q["path"], q["batch"])]
    return q[keep].reset_index(drop=True)


def _latest_batch(store: Path) -> dict[str, int]:
    """path -> the last committed batch whose plan lists it."""
    import pyarrow.parquet as pq

    from mspec.io.store import store_state

    n = int(store_state(store)["batches"])
    out: dict[str, int] = {}
    for p in sorted((store / "_mspec" / "log").glob("batch-*.parquet")):
        b = int(p.stem.split("-")[1])
        if b < n:
            for path in pq.read_table(p, columns=["path"]).column("path").to_pylist():
                out[path] = b
    return out
