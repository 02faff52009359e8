"""Line-by-line RVs (DSAL I / DSAL II / DSEL): core-seconds per spectrum, and cost vs TM.

``LinesPerSpectrum`` times ONE spectrum through all 16 line fits, the Hα equivalent width
and the DSAL/DSEL combinations in one thread (numba kernel vs the numpy reference), so the
figure is core-seconds per spectrum.

``LinesVsTM`` measures, on the same block of spectra and in one thread
(``time.thread_time``), the core-seconds per spectrum of :func:`mspec.rv.lines.line_rvs`
and of :func:`mspec.rv.template_match` (33 real PyHammer M templates, the paper's 1001
shifts; fewer under ``MSPEC_BENCH_SMOKE``), and their ratio (goal: line RVs ≤ 20 % of TM).
Spectra are real templates shifted by a random RV (±300 km/s), tilted, with noise (S/N 30);
the initial RV given to the line fits is the true RV + 3 km/s.
"""

import time

import numpy as np
import xarray as xr

from benchmarks._common import SMOKE, size
from mspec.rv import pyhammer_templates, template_match
from mspec.rv.lines import line_rvs, lines_arrays
from mspec.rv.lines_reference import lines_spectrum_ref
from mspec.variables import C_KMS, NPIX, loglam_grid

LOGLAM = loglam_grid()
WAVE = 10.0**LOGLAM


def _spectra(lib, n, seed=0, snr=30.0):
    """``n`` spectra from library templates; returns flux, ivar, ormask, true RV."""
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
    return flux.astype(np.float32), ivar.astype(np.float32), ormask, rv


def _dataset(flux, ivar, ormask, rv_init):
    return xr.Dataset(
        {
            "flux": (("spectra", "pixels"), flux),
            "ivar": (("spectra", "pixels"), ivar),
            "ormask": (("spectra", "pixels"), ormask),
            "rv_guess": ("spectra", rv_init),
        },
        coords={"loglam": ("pixels", LOGLAM)},
    )


class LinesPerSpectrum:
    """Core-seconds for one spectrum (16 line fits + EW + DSAL/DSEL), kernel vs reference."""

    params = [["numba", "numpy"]]
    param_names = ["impl"]
    timeout = 300
    number = 1
    repeat = (1, 5, 30.0)

    def setup(self, impl):
        lib = pyhammer_templates("M*")
        self.flux, self.ivar, self.ormask, rv = _spectra(lib, 1, seed=1)
        self.rv_init = rv + 3.0
        if impl == "numba":  # compile outside the timing
            lines_arrays(self.flux, self.ivar, self.ormask, LOGLAM, self.rv_init)

    def time_lines_one_spectrum(self, impl):
        if impl == "numba":
            lines_arrays(self.flux, self.ivar, self.ormask, LOGLAM, self.rv_init)
        else:
            lines_spectrum_ref(
                self.flux[0], self.ivar[0], self.ormask[0], LOGLAM, float(self.rv_init[0])
            )


class LinesVsTM:
    """Core-seconds per spectrum of line_rvs and of template_match on the same spectra."""

    timeout = 900
    number = 1
    repeat = 1

    def setup_cache(self):
        lib = pyhammer_templates("M*")
        n = size(200, 3)
        flux, ivar, ormask, rv = _spectra(lib, n, seed=2)
        ds = _dataset(flux, ivar, ormask, rv + 3.0)
        shifts = np.arange(-500.0, 501.0, 250.0) if SMOKE else None
        tiny = ds.isel(spectra=slice(0, 1))  # compile / build trial templates untimed
        _ = template_match(tiny, templates=lib, shifts=shifts)["rv_tm"].values
        _ = line_rvs(tiny, rv_init="rv_guess", merge=False)["rv_dsal1"].values
        t0 = time.thread_time()
        _ = template_match(ds, templates=lib, shifts=shifts)["rv_tm"].values
        t_tm = (time.thread_time() - t0) / n
        t0 = time.thread_time()
        _ = line_rvs(ds, rv_init="rv_guess", merge=False)["rv_dsal1"].values
        t_lines = (time.thread_time() - t0) / n
        return {"tm": t_tm, "lines": t_lines}

    def track_lines_core_s_per_spectrum(self, cache):
        return cache["lines"]

    def track_tm_core_s_per_spectrum(self, cache):
        return cache["tm"]

    def track_lines_over_tm(self, cache):
        return cache["lines"] / cache["tm"]

    track_lines_core_s_per_spectrum.unit = "s"
    track_tm_core_s_per_spectrum.unit = "s"
    track_lines_over_tm.unit = "ratio"
