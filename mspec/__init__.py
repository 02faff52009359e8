"""mspec: a refined M-type star catalog from LAMOST low-resolution spectra at survey scale.

The public API is flat and explicit (``__all__``). Modules that import torch (the CNNs) are
loaded on first use, so ``import mspec`` does not import torch; numba kernels compile (or
load from the on-disk cache) on their first call.

Paper modules (Li et al. 2025) and where they live:

* preprocessing (steps 1–5): :mod:`mspec.preprocessing` (:func:`preprocess`);
* SCM, the M / non-M decision: CNN-SPT and CNN-WDM (:mod:`mspec.ml`), the Gaia CMD
  (:mod:`mspec.cmd`);
* DGCM, dwarf / giant: CNN-dMgM (:mod:`mspec.ml`), the CMD, spectral indices
  (:mod:`mspec.indices`);
* RVMM, radial velocities: TM/TML7500 (:mod:`mspec.rv.matching`), DSAL I/II and DSEL
  (:mod:`mspec.rv.lines`);
* SPMM, stellar parameters: the CNN-TLMA ensembles (:mod:`mspec.ml`);
* the pipeline that runs them in order, resumably: :mod:`mspec.pipeline` (:func:`run`).
"""

from __future__ import annotations

import importlib

from mspec import cmd, io, pipeline, rv, stage, variables  # noqa: E402
from mspec._version import __version__  # noqa: E402
from mspec.config import Config, ConfigError, load_config  # noqa: E402
from mspec.indices import spectral_indices  # noqa: E402
from mspec.io.store import ingest, open_store  # noqa: E402
from mspec.pipeline import RunError, RunResult, StageChangedError, run  # noqa: E402
from mspec.preprocessing import preprocess  # noqa: E402
from mspec.rv import line_rvs, template_match  # noqa: E402
from mspec.simulate import simulate_survey  # noqa: E402
from mspec.variables import validate  # noqa: E402

#: Loaded on first use (they import torch).
_LAZY_MODULES = {"ml"}

__all__ = [
    "__version__",
    "Config",
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
    "run",
    "rv",
    "simulate_survey",
    "spectral_indices",
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
