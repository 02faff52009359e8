"""Preprocessing throughput (spectra/s/core) and peak memory: numba kernels vs numpy reference.

The kernel benchmarks call the block drivers directly on in-memory arrays in one thread, so
``track_spectra_per_s_per_core`` is the per-core rate; ``PreprocessDask`` adds the xarray/dask
wrapper on top (synchronous scheduler, i.e. still one core).
"""

import time

import numpy as np
import xarray as xr

from benchmarks._common import size
from mspec.preprocessing import kernels as K
from mspec.preprocessing import reference as R
from mspec.preprocessing.steps import prepare_templates, preprocess
from mspec.variables import NPIX, loglam_grid

WAVE = 10.0 ** loglam_grid()


def _spectra(n, seed=0):
    """LAMOST-like spectra on the shared grid: smooth continuum, lines, noise, ~3% masked."""
    rng = np.random.default_rng(seed)
    cont = 1.0 + 0.5 * np.sin(WAVE / 300.0)[None] + 0.2 * rng.random((n, 1))
    flux = (cont + 0.03 * rng.standard_normal((n, NPIX))).astype(np.float32)
    ivar = rng.uniform(50, 150, (n, NPIX)).astype(np.float32)
    ivar[:, :40] = 0  # blue end without data, as in DR7 files
    ormask = (rng.random((n, NPIX)) < 0.03).astype(np.int32)
    rv = rng.uniform(-300, 300, n)
    return flux, ivar, ormask, rv


def _run(recipe, flux, ivar, ormask, rv, impl):
    if recipe == "tm":
        return impl.mask_spectra(flux, ivar, ormask, WAVE)
    return impl.preprocess_grid(flux, ivar, ormask, WAVE, rv if recipe == "tlma" else None)


class Preprocess:
    """Kernels vs numpy reference per recipe, one core."""

    params = [["cnn", "tlma", "tm"]]
    param_names = ["recipe"]
    timeout = 300

    def setup(self, recipe):
        self.n = size(2000, 16)
        self.data = _spectra(self.n)
        _run(recipe, *(a[:2] for a in self.data), K)  # compile outside the timing

    def time_kernel(self, recipe):
        _run(recipe, *self.data, K)

    def time_reference(self, recipe):
        _run(recipe, *self.data, R)

    def peakmem_kernel(self, recipe):
        _run(recipe, *self.data, K)

    def peakmem_reference(self, recipe):
        _run(recipe, *self.data, R)

    def peakmem_baseline(self, recipe):
        """Imports + inputs only: subtract from the two above for the working memory."""

    def track_spectra_per_s_per_core(self, recipe):
        best = np.inf
        for _ in range(3):
            t0 = time.perf_counter()
            _run(recipe, *self.data, K)
            best = min(best, time.perf_counter() - t0)
        return self.n / best

    track_spectra_per_s_per_core.unit = "spectra/s"

    def track_reference_spectra_per_s(self, recipe):
        t0 = time.perf_counter()
        _run(recipe, *self.data, R)
        return self.n / (time.perf_counter() - t0)

    track_reference_spectra_per_s.unit = "spectra/s"


class PreprocessDask:
    """The lazy xarray wrapper on a dask-chunked dataset (synchronous scheduler: one core)."""

    params = [["cnn", "tlma", "tm"]]
    param_names = ["recipe"]
    timeout = 300

    def setup(self, recipe):
        n = size(4000, 16)
        flux, ivar, ormask, rv = _spectra(n)
        ds = xr.Dataset(
            {
                "flux": (("spectra", "pixels"), flux),
                "ivar": (("spectra", "pixels"), ivar),
                "ormask": (("spectra", "pixels"), ormask),
                "rv": ("spectra", rv),
            },
            coords={"obsid": ("spectra", np.arange(n)), "loglam": ("pixels", loglam_grid())},
        )
        self.n = n
        self.ds = ds.chunk({"spectra": size(1000, 8), "pixels": -1})
        self.rv = "rv" if recipe == "tlma" else None
        preprocess(ds.isel(spectra=slice(0, 2)), recipe=recipe, rv=self.rv)  # compile

    def _compute(self, recipe):
        out = preprocess(self.ds, recipe=recipe, rv=self.rv, merge=False)
        return out.compute(scheduler="sync")

    def time_wrapper(self, recipe):
        self._compute(recipe)

    def peakmem_wrapper(self, recipe):
        self._compute(recipe)

    def track_wrapper_spectra_per_s_per_core(self, recipe):
        t0 = time.perf_counter()
        self._compute(recipe)
        return self.n / (time.perf_counter() - t0)

    track_wrapper_spectra_per_s_per_core.unit = "spectra/s"


class Templates:
    """prepare_templates on PyHammer-like fine grids (61,618 px, 0.17 A)."""

    params = [["mean", "zscore"]]
    param_names = ["normalise"]

    def setup(self, normalise):
        n = size(33, 2)
        self.loglam = np.linspace(np.log10(3650.0), np.log10(10200.0), 61618)
        self.flux = 1.0 + np.random.default_rng(1).random((n, self.loglam.size))
        prepare_templates(self.loglam, self.flux[:1], normalise)

    def time_prepare_templates(self, normalise):
        prepare_templates(self.loglam, self.flux, normalise)
