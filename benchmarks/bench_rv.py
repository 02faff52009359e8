"""Template-matching RV (TM): time per spectrum, numba vs numpy reference, Dask memory, tasks.

``TMPerSpectrum`` times ONE spectrum through the paper configuration (N templates × 21 trial
RVs, then the 1001-shift step with the best template) in one thread, so the figure is
core-seconds per spectrum. Templates are the 33 real PyHammer M templates, cycled to reach
10 / 50 / 233 (the paper's library size). The numpy reference gets a reduced shift grid under
``MSPEC_BENCH_SMOKE`` only.

``TMDask`` runs :func:`mspec.template_match` through dask (threaded scheduler, chunks of 1000
spectra generated on the fly) and reduces the RVs to one number, so peak memory shows whether
it stays flat from 10k to 100k spectra. That case uses 2 templates and one shift to keep it
short: memory, not speed, is measured there.
"""

import dask
import dask.array as da
import numpy as np
import xarray as xr

from benchmarks._common import SMOKE, size
from mspec.rv import template_match
from mspec.rv.reference import tm_spectrum_ref
from mspec.rv.templates import pyhammer_templates, replicate_templates
from mspec.rv.tm_engine import make_config, match_arrays
from mspec.variables import C_KMS, NPIX, loglam_grid

LOGLAM = loglam_grid()
WAVE = 10.0**LOGLAM


def _spectra(lib, n, seed=0, snr=30.0):
    """Spectra made from library templates: random RV (±300 km/s), continuum tilt, noise."""
    rng = np.random.default_rng(seed)
    w, f1 = lib.template_wavelength.values, lib.template_flux.values
    flux = np.full((n, NPIX), np.nan)
    sel = (WAVE > 4610) & (WAVE < 8990)
    rv = rng.uniform(-300, 300, n)
    for k in range(n):
        t = k % f1.shape[0]
        s = np.interp(WAVE[sel] / (1 + rv[k] / C_KMS), w, f1[t])
        flux[k, sel] = 50.0 * s * (1.0 + 0.2 * (WAVE[sel] - 6500.0) / 2000.0)
    sigma = np.nanmedian(flux, axis=1, keepdims=True) / snr
    ivar = np.where(np.isfinite(flux), 1.0 / sigma**2, 0.0)
    flux = flux + rng.standard_normal(flux.shape) * sigma
    ormask = np.where(np.isfinite(flux), 0, 1).astype(np.int32)
    return flux.astype(np.float32), ivar.astype(np.float32), ormask


class TMPerSpectrum:
    """Core-seconds per spectrum, paper configuration, by number of templates and impl."""

    params = [[10, 50, 233], ["numba", "numpy"]]
    param_names = ["n_templates", "impl"]
    timeout = 600
    number = 1
    repeat = (1, 3, 60.0)

    def setup(self, n_templates, impl):
        base = pyhammer_templates("M*")
        self.lib = replicate_templates(base, n_templates)
        self.w = self.lib.template_wavelength.values
        self.f1 = np.ascontiguousarray(self.lib.template_flux.values)
        self.flux, self.ivar, self.ormask = _spectra(base, 1, seed=1)
        shifts = np.arange(-500.0, 501.0, 250.0) if (SMOKE and impl == "numpy") else None
        self.cfg = make_config(LOGLAM, shifts=shifts)
        self.token = f"bench-{n_templates}"
        if impl == "numba":  # compile and build the trial templates outside the timing
            match_arrays(self.flux, self.ivar, self.ormask, self.f1, self.w, self.cfg, self.token)

    def time_tm_one_spectrum(self, n_templates, impl):
        if impl == "numba":
            match_arrays(self.flux, self.ivar, self.ormask, self.f1, self.w, self.cfg, self.token)
        else:
            tm_spectrum_ref(
                self.flux[0], self.ivar[0], self.ormask[0], LOGLAM, self.w, self.f1, self.cfg
            )


def _lazy_survey(n, chunk, lib):
    """A dask-backed survey of ``n`` spectra generated chunk by chunk (never all in memory)."""
    nchunks = -(-n // chunk)
    sizes = tuple(min(chunk, n - i * chunk) for i in range(nchunks))

    def block(kind, block_info=None):
        loc = block_info[None]["array-location"][0]
        f, iv, om = _spectra(lib, loc[1] - loc[0], seed=loc[0])
        return {"flux": f, "ivar": iv, "ormask": om}[kind]

    arrs = {}
    for kind, dt in (("flux", np.float32), ("ivar", np.float32), ("ormask", np.int32)):
        arrs[kind] = da.map_blocks(
            block, kind, dtype=dt, chunks=(sizes, (NPIX,)), meta=np.empty((0, 0), dt)
        )
    return xr.Dataset(
        {k: (("spectra", "pixels"), v) for k, v in arrs.items()},
        coords={"loglam": ("pixels", LOGLAM)},
    )


class TMDask:
    """Peak memory through the dask path for 10k vs 100k spectra (should be flat)."""

    params = [size([10_000, 100_000], [40, 80])]
    param_names = ["n_spectra"]
    timeout = 900
    number = 1
    repeat = 1

    def setup(self, n_spectra):
        self.lib = pyhammer_templates("M[02]_+0.0*")
        self.chunk = size(1000, 20)
        self.ds = _lazy_survey(n_spectra, self.chunk, self.lib)

    def peakmem_template_match(self, n_spectra):
        out = template_match(self.ds, templates=self.lib, merge=False, shifts=[0.0])
        with dask.config.set(scheduler="threads"):
            out["rv_tm"].mean().compute()

    def track_num_tasks_per_chunk(self, n_spectra):
        out = template_match(self.ds, templates=self.lib, merge=False, shifts=[0.0])
        graph = out["rv_tm"].data.__dask_graph__()
        return len(graph) / len(self.ds.chunks["spectra"])

    track_num_tasks_per_chunk.unit = "tasks"
