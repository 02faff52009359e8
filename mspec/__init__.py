"""mspec: a refined M-type star catalog from LAMOST low-resolution spectra at survey scale.

The public API is flat and explicit (``__all__``). Modules that import torch (the CNNs) are
loaded on first use, so ``import mspec`` does not import torch; numba kernels compile (or
load from the on-disk cache) on their first call.

Paper modules (Li et al. 2025) and where they live:

* preprocessing (steps 1–5): :mod:`mspec.preprocessing` (:func:`preprocess`);
* SCM, the M / non-M decision: CNN-SPT and CNN-WDM (:mod:`mspec.ml`), the Gaia CMD
  (:mod:`mspec.cmd`), the rules (:mod:`mspec.scm`, :func:`select_m_stars`);
* DGCM, dwarf / giant: CNN-dMgM (:mod:`mspec.ml`), the CMD, spectral indices
  (:mod:`mspec.indices`), the rules (:mod:`mspec.dgcm`, :func:`split_dwarfs_giants`);
* RVMM, radial velocities: TM/TML7500 (:mod:`mspec.rv.matching`), DSAL I/II and DSEL
  (:mod:`mspec.rv.lines`), the reconciliation (:mod:`mspec.rv.reconcile`,
  :func:`reconcile_rv`) and the inspection queue (:mod:`mspec.review`);
* SPMM, stellar parameters: the CNN-TLMA ensembles (:mod:`mspec.ml`);
* flags and the catalogs V0–V3: :mod:`mspec.flags`, :mod:`mspec.catalog` (:func:`build_catalog`);
* the pipeline that runs them in order, resumably: :mod:`mspec.pipeline` (:func:`run`).
"""

from __future__ import annotations

import importlib

from mspec import (  # noqa: E402
    catalog,
    cmd,
    compare,
    dgcm,
    flags,
    io,
    pipeline,
    review,
    rv,
    scm,
    stage,
    variables,
)
from mspec._version import __version__  # noqa: E402
from mspec.catalog import build_catalog  # noqa: E402
from mspec.config import Config, ConfigError, load_config  # noqa: E402
from mspec.dgcm import split_dwarfs_giants  # noqa: E402
from mspec.indices import spectral_indices  # noqa: E402
from mspec.io.store import ingest, open_store  # noqa: E402
from mspec.pipeline import RunError, RunResult, StageChangedError, run  # noqa: E402
from mspec.preprocessing import preprocess  # noqa: E402
from mspec.rv import line_rvs, reconcile_rv, template_match  # noqa: E402
from mspec.scm import select_m_stars  # noqa: E402
from mspec.simulate import simulate_survey  # noqa: E402
from mspec.variables import validate  # noqa: E402

#: Loaded on first use (they import torch).
_LAZY_MODULES = {"ml"}

__all__ = [
    "__version__",
    "scm",
    "review",
    "flags",
    "dgcm",
    "compare",
    "catalog",
    "Config",
    "build_catalog",
    "ConfigError",
    "RunError",
    "RunResult",
    "StageChangedError",
    "cmd",
    "ingest",
    "io",
    "line_rvs",
    "load_config",
    "ml",
    "open_store",
    "pipeline",
    "preprocess",
    "reconcile_rv",
    "run",
    "rv",
    "select_m_stars",
    "simulate_survey",
    "spectral_indices",
    "split_dwarfs_giants",
    "stage",
    "template_match",
    "validate",
    "variables",
]


def __getattr__(name: str):
    if name in _LAZY_MODULES:
        return importlib.import_module(f"mspec.{name}")
    raise AttributeError(f"module 'mspec' has no attribute {name!r}")


def __dir__():
    return __all__
