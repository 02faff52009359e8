"""Preprocessing (paper steps 1-5): numba kernels and lazy xarray wrappers.

See ``docs/preprocessing.md``. Public entry points: :func:`preprocess` (recipes ``"cnn"``,
``"tlma"``, ``"tm"``) and :func:`prepare_templates`.
"""

import sys
import types

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


class _CallablePackage(types.ModuleType):
    """``mspec.preprocess`` is both this package and the public function of the flat API.

    Importing any submodule rebinds the attribute ``mspec.preprocess`` to the package, so the
    package itself forwards calls: ``mspec.preprocess(ds, "cnn")`` always works.
    """

    def __call__(self, *args, **kwargs):
        return preprocess(*args, **kwargs)


sys.modules[__name__].__class__ = _CallablePackage
