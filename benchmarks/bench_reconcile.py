"""RV reconciliation cost: line RVs + reconciliation per spectrum, against TM (issue 13).

``ReconcileVsTM`` measures, on the same block of spectra and in one thread
(``time.thread_time``), the core-seconds per spectrum of

* :func:`mspec.rv.template_match` (33 real PyHammer M templates, the paper's 1001 shifts;
  fewer under ``MSPEC_BENCH_SMOKE``),
* :func:`mspec.rv.lines.line_rvs` (16 line fits, EW, DSAL I/II, DSEL),
* :func:`mspec.rv.reconcile.rv_residual_sigmas` + :func:`mspec.rv.reconcile.reconcile_rv`
  (the run statistics and the rules),

and the ratio (line RVs + reconciliation) / TM — goal ≤ 0.20. Spectra are real templates
shifted by a random RV (±300 km/s), tilted, with noise (S/N 30), as in ``bench_lines``;
the LAMOST RV is the truth plus 5 km/s noise, 5 % of them off by 200 km/s.
"""

import time

import numpy as np

from benchmarks._common import SMOKE, size
from benchmarks.bench_lines import _dataset, _spectra
from mspec.rv import pyhammer_templates, template_match
from mspec.rv.lines import line_rvs
from mspec.rv.reconcile import reconcile_rv, rv_residual_sigmas


class ReconcileVsTM:
    """Core-seconds per spectrum: TM, line RVs, reconciliation; and their ratio."""

    timeout = 900
    number = 1
    repeat = 1

    def setup_cache(self):
        lib = pyhammer_templates("M*")
        n = size(200, 6)
        flux, ivar, ormask, rv = _spectra(lib, n, seed=3)
        ds = _dataset(flux, ivar, ormask, rv + 3.0)
        rng = np.random.default_rng(0)
        lam = rv + rng.normal(0, 5, n)
        lam[rng.random(n) < 0.05] += 200.0
        ds = ds.assign(
            lamost_rv=("spectra", lam),
            mjd=("spectra", np.full(n, 57000, np.int32)),
            snr_i=("spectra", np.full(n, 30.0)),
        )
        shifts = np.arange(-500.0, 501.0, 250.0) if SMOKE else None
        tiny = ds.isel(spectra=slice(0, 2))  # compile / build trial templates untimed
        kw = dict(templates=lib, shifts=shifts, quality=True, merge=False)
        t0_ = template_match(tiny, **kw).compute()
        t7_ = template_match(tiny, wave_max=7500, **kw).compute()
        l0_ = line_rvs(tiny.assign(rv_tm=t0_.rv_tm), merge=False).compute()
        reconcile_rv(tiny.assign(t0_.data_vars).assign(t7_.data_vars).assign(l0_), merge=False)

        t0 = time.thread_time()
        tm = template_match(ds, **kw).compute()
        t_tm = (time.thread_time() - t0) / n
        tml = template_match(ds, wave_max=7500, **kw).compute()
        t0 = time.thread_time()
        lr = line_rvs(ds.assign(rv_tm=tm.rv_tm), merge=False).compute()
        t_lines = (time.thread_time() - t0) / n
        full = ds.assign(tm.data_vars).assign(tml.data_vars).assign(lr)
        t0 = time.thread_time()
        sig = rv_residual_sigmas(full)
        out = reconcile_rv(full, sigmas=sig, merge=False).compute()
        t_rec = (time.thread_time() - t0) / n
        assert out.sizes["spectra"] == n
        return {"tm": t_tm, "lines": t_lines, "reconcile": t_rec}

    def track_tm_core_s_per_spectrum(self, cache):
        return cache["tm"]

    def track_lines_core_s_per_spectrum(self, cache):
        return cache["lines"]

    def track_reconcile_core_s_per_spectrum(self, cache):
        return cache["reconcile"]

    def track_lines_and_reconcile_over_tm(self, cache):
        return (cache["lines"] + cache["reconcile"]) / cache["tm"]

    track_tm_core_s_per_spectrum.unit = "s"
    track_lines_core_s_per_spectrum.unit = "s"
    track_reconcile_core_s_per_spectrum.unit = "s"
    track_lines_and_reconcile_over_tm.unit = "ratio"
