"""Simulator throughput (spectra/s) and peak memory against the survey size.

The template bank is built (and the numba kernel compiled) once in ``setup``, so the timings
are the steady-state cost of ``simulate_survey``; ``track_spectra_per_second`` reports the
rate directly. Goal: 10,000 spectra well under a minute on 2 cores.
"""

import time

from benchmarks._common import size
from mspec.simulate import survey as simulate

N_SPECTRA = size([1000, 3000, 10000], [20])


class Simulate:
    params = [N_SPECTRA]
    param_names = ["n_spectra"]
    timeout = 600
    number = 1
    repeat = 2

    def setup(self, n_spectra):
        simulate.simulate_survey(5, seed=0)  # build the bank, compile the kernel

    def time_simulate_survey(self, n_spectra):
        simulate.simulate_survey(n_spectra, seed=1)

    def time_simulate_survey_noiseless(self, n_spectra):
        simulate.simulate_survey(n_spectra, seed=1, noiseless=True)

    def peakmem_simulate_survey(self, n_spectra):
        simulate.simulate_survey(n_spectra, seed=1)

    def track_spectra_per_second(self, n_spectra):
        t0 = time.perf_counter()
        simulate.simulate_survey(n_spectra, seed=1)
        return n_spectra / (time.perf_counter() - t0)

    track_spectra_per_second.unit = "spectra/s"


class ModelSpectrum:
    params = [size([100, 1000], [5])]
    param_names = ["n_models"]

    def setup(self, n_models):
        import numpy as np

        from mspec.variables import loglam_grid

        rng = np.random.default_rng(0)
        self.ll = loglam_grid()
        self.teff = rng.uniform(2500, 4000, n_models)
        self.rv = rng.normal(0, 50, n_models)
        simulate.model_spectrum(3500, 4.9, 0, 0, self.ll)

    def time_model_spectrum_dwarfs(self, n_models):
        simulate.model_spectrum(self.teff, 4.9, 0.0, 0.1, self.ll, rv=self.rv, kind="dM")
