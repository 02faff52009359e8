"""The survey simulator: LAMOST-like spectra with known truth.

* :mod:`mspec.simulate.survey` — :func:`simulate_survey` (whole surveys: stars, observations,
  Gaia/WISE cross-match, masks, noise, LAMOST pipeline values) and :func:`model_spectrum`;
* :mod:`mspec.simulate.models` — the physical models of each kind of object;
* :mod:`mspec.simulate.bank` — the template bank built from the packaged PyHammer templates;
* :mod:`mspec.simulate.kernels` — numba kernels of the bank (with a numpy reference);
* :mod:`mspec.simulate.templates` — the simulator's template grid as an RV template library.

See ``docs/simulator.md``.
"""

from mspec.simulate.survey import (
    CLASSES,
    DEFAULT_MISSING,
    DEFAULT_MIX,
    DEFAULT_PIPELINE_ERRORS,
    KINDS,
    MASK_BITS,
    MJD_RV_RELIABLE,
    SIMULATED_VARIABLES,
    SIMULATOR_VERSION,
    TELLURIC_BANDS,
    model_spectrum,
    simulate_survey,
)
from mspec.simulate.templates import simulated_templates

__all__ = [
    "CLASSES",
    "DEFAULT_MISSING",
    "DEFAULT_MIX",
    "DEFAULT_PIPELINE_ERRORS",
    "KINDS",
    "MASK_BITS",
    "MJD_RV_RELIABLE",
    "SIMULATED_VARIABLES",
    "SIMULATOR_VERSION",
    "TELLURIC_BANDS",
    "model_spectrum",
    "simulate_survey",
    "simulated_templates",
]
