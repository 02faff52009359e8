"""Preprocessing (paper steps 1-5): numba kernels and lazy xarray wrappers.

See ``docs/preprocessing.md``. Public entry points: :func:`preprocess` (a stage, recipes
``"cnn"``, ``"tlma"``, ``"tm"``; ``from mspec.preprocessing import preprocess``) and
:func:`prepare_templates`. The package is ``mspec.preprocessing``, so the flat
``mspec.preprocess`` is always the function.
"""

from mspec.preprocessing.kernels import GRID_4A, GRID_4B, STATUS_MEANINGS, Grid, wavelength_grid
from mspec.preprocessing.steps import RECIPES, prepare_templates, preprocess

__all__ = [
    "GRID_4A",
    "GRID_4B",
    "Grid",
    "RECIPES",
    "STATUS_MEANINGS",
    "prepare_templates",
    "preprocess",
    "wavelength_grid",
]
