"""Optional torch path of template matching equals the numba kernel (CPU; CUDA if present)."""

from __future__ import annotations

import numpy as np
import pytest

from mspec.rv.templates import pyhammer_templates
from mspec.rv.tm_engine import make_config, match_arrays

torch = pytest.importorskip("torch")

from test_rv import LOGLAM, fake_spectra  # noqa: E402

from mspec.rv.chi2_torch import match_arrays_torch  # noqa: E402


@pytest.fixture(scope="module")
def case():
    lib = pyhammer_templates("M[0-4]_+0.0*")
    flux, ivar, ormask = fake_spectra(lib, [37.2, -143.9, 311.0, 5.0, 900.0], snr=30, seed=1)
    flux[3] = np.nan  # no coverage
    ivar[3] = 0
    return lib, flux, ivar, ormask


def _check(case, device, weighting):
    lib, flux, ivar, ormask = case
    w, f1 = lib.template_wavelength.values, lib.template_flux.values
    cfg = make_config(LOGLAM, weighting=weighting, shifts=np.arange(-500, 501, 50))
    a = match_arrays(flux, ivar, ormask, f1, w, cfg)
    b = match_arrays_torch(flux, ivar, ormask, f1, w, cfg, device=device, batch=3, dense_batch=2)
    np.testing.assert_array_equal(a["status"], b["status"])
    np.testing.assert_array_equal(a["template"], b["template"])
    np.testing.assert_allclose(b["rv"], a["rv"], atol=0.1, equal_nan=True)
    np.testing.assert_allclose(b["rv"], a["rv"], rtol=1e-6, equal_nan=True)
    np.testing.assert_allclose(b["err"], a["err"], rtol=1e-5, equal_nan=True)
    np.testing.assert_allclose(b["err_stat"], a["err_stat"], rtol=1e-6, equal_nan=True)
    np.testing.assert_allclose(b["chi2"], a["chi2"], rtol=1e-9, equal_nan=True)


@pytest.mark.parametrize("weighting", ["none", "ivar"])
def test_torch_cpu_equals_numba(case, weighting):
    _check(case, "cpu", weighting)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_torch_cuda_equals_numba(case):
    _check(case, "cuda", "none")


def test_template_match_torch_engine(case):
    from test_rv import as_dataset

    from mspec.rv import template_match

    lib, flux, ivar, ormask = case
    ds = as_dataset(flux, ivar, ormask)
    shifts = np.arange(-500, 501, 250)
    a = template_match(ds, templates=lib, merge=False, shifts=shifts)
    b = template_match(
        ds.chunk({"spectra": 2}),
        templates=lib,
        merge=False,
        shifts=shifts,
        engine="torch",
        device="cpu",
    )
    b = b.compute()
    for v in ("tm_status", "tm_template"):
        np.testing.assert_array_equal(a[v].values, b[v].values)
    np.testing.assert_allclose(b.rv_tm.values, a.rv_tm.values, rtol=1e-6, equal_nan=True)
    with pytest.raises(ValueError, match="engine"):
        template_match(ds, templates=lib, engine="jax")
