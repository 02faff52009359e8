"""LAMOST FITS input/output and the chunked Zarr spectrum store.

``read_lamost`` / ``write_lamost_fits`` (:mod:`mspec.io.lamost`) handle single files of every
LAMOST layout; ``ingest`` / ``open_store`` (:mod:`mspec.io.store`) build and open the store;
:mod:`mspec.io.tables` reads the Parquet tables saved with it.
"""

from __future__ import annotations

import importlib

from mspec.io.lamost import BadFileError, read_lamost, write_lamost_fits

__all__ = [
    "BadFileError",
    "read_lamost",
    "write_lamost_fits",
    "ingest",
    "open_store",
    "read_metadata",
    "read_quarantine",
]

_LAZY = {
    "ingest": "mspec.io.store",
    "open_store": "mspec.io.store",
    "read_metadata": "mspec.io.tables",
    "read_quarantine": "mspec.io.tables",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mspec.io' has no attribute {name!r}")
