"""Radial velocities by χ² template matching (paper: RVMM / TM, TML7500).

* :mod:`mspec.rv.templates` — template libraries (xarray Datasets) and their loaders;
* :mod:`mspec.rv.chi2_kernels` — numba kernels (no xarray);
* :mod:`mspec.rv.tm_engine` — numpy level: configuration, template preparation, the numba
  and torch (:mod:`mspec.rv.chi2_torch`) engines;
* :mod:`mspec.rv.matching` — :func:`template_match`, the lazy xarray/dask wrapper (a stage);
* :mod:`mspec.rv.reference` — the plain numpy reference of the same algorithm;
* :mod:`mspec.rv.lines` — :func:`line_rvs`: per-line RVs, DSAL I/II and DSEL (a stage),
  with :mod:`mspec.rv.lines_kernels` (numba) and :mod:`mspec.rv.lines_reference` (numpy).

``mspec.rv.template_match`` is the function; no submodule has that name.
"""

from mspec.rv.lines import line_rvs
from mspec.rv.matching import template_match
from mspec.rv.reconcile import reconcile_rv, rv_residual_sigmas
from mspec.rv.templates import (
    default_templates,
    load_templates,
    make_library,
    pyhammer_templates,
    replicate_templates,
    save_templates,
)

__all__ = [
    "template_match",
    "line_rvs",
    "reconcile_rv",
    "rv_residual_sigmas",
    "default_templates",
    "load_templates",
    "make_library",
    "pyhammer_templates",
    "replicate_templates",
    "save_templates",
]
