"""Preprocessing (paper steps 1-5): numba kernels and lazy xarray wrappers.

See ``docs/preprocessing.md``. Public entry points: :func:`preprocess` (a stage, recipes
``"cnn"``, ``"tlma"``, ``"tm"``; ``from mspec.preprocess import preprocess``) and
:func:`prepare_templates`. ``mspec.preprocess`` is this package, never the function.
"""

from mspec.preprocess.kernels import GRID_4A, GRID_4B, STATUS_MEANINGS, Grid, wavelength_grid
from mspec.preprocess.steps import RECIPES, prepare_templates, preprocess

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
