"""mspec: a refined M-type star catalog from LAMOST low-resolution spectra at survey scale.

The public API is flat; names are imported lazily so ``import mspec`` stays cheap (no numba
compilation, no torch import) until a function is used.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY = {
    "simulate_survey": "mspec.simulate",
    "ingest": "mspec.io.store",
    "open_store": "mspec.io.store",
    "template_match": "mspec.rv.template_match",
    "validate": "mspec.variables",
}
_SUBMODULES = {"io", "ml", "rv", "preprocess", "variables", "simulate", "cli"}

__all__ = sorted([*_LAZY, *_SUBMODULES, "__version__"])


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    if name in _SUBMODULES:
        return importlib.import_module(f"mspec.{name}")
    raise AttributeError(f"module 'mspec' has no attribute {name!r}")


def __dir__():
    return __all__
