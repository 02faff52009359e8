import numpy as np
import pytest
import xarray as xr

from mspec import variables as V
from mspec.testing import raise_if_computes


def _good():
    n, p = 3, V.NPIX
    return xr.Dataset(
        {
            "flux": (("spectra", "pixels"), np.ones((n, p), np.float32)),
            "ivar": (("spectra", "pixels"), np.ones((n, p), np.float32)),
            "ra": ("spectra", np.zeros(n)),
            "lamost_class": ("spectra", np.array(["STAR"] * n)),
            "true_active": ("spectra", np.zeros(n, bool)),
        },
        coords={
            "obsid": ("spectra", np.arange(n, dtype=np.int64)),
            "loglam": ("pixels", V.loglam_grid()),
        },
    )


def test_good_dataset_validates():
    ds = V.annotate(_good())
    assert V.validate(ds) is ds
    V.validate(ds, ["flux", "ivar", "obsid", "loglam"], check_units=True)
    assert ds["ra"].attrs["units"] == "deg"


def test_missing_variable_named():
    with pytest.raises(V.VariableError, match="'ormask' is missing"):
        V.validate(_good(), ["flux", "ormask"])


def test_unregistered_variable_named():
    with pytest.raises(V.VariableError, match="'bogus' is not in the registry"):
        V.validate(_good(), ["bogus"])


def test_wrong_dims_named():
    ds = _good()
    ds["ra"] = ("pixels", np.zeros(V.NPIX))
    with pytest.raises(V.VariableError, match=r"'ra' has dims \('pixels',\)"):
        V.validate(ds)


def test_wrong_dtype_named():
    ds = _good()
    ds["flux"] = ds["flux"].astype(np.float64)
    with pytest.raises(V.VariableError, match="'flux' has dtype float64"):
        V.validate(ds)
    ds = _good()
    ds["ra"] = ds["ra"].astype(np.int64)
    with pytest.raises(V.VariableError, match="'ra' has dtype int64, expected 'f'"):
        V.validate(ds, ["ra"])


def test_wrong_units_named():
    ds = _good()
    ds["ra"].attrs["units"] = "rad"
    with pytest.raises(V.VariableError, match="'ra' has units 'rad'"):
        V.validate(ds, ["ra"], check_units=True)


def test_register_conflict_and_string_kinds():
    with pytest.raises(ValueError, match="already registered"):
        V.register("ra", ("spectra",), "i", "deg", "x")
    var = V.VARIABLES["lamost_class"]
    for dt in ("U4", "O", "S4"):
        assert var.dtype_ok(np.dtype(dt))
    assert not var.dtype_ok(np.dtype("f8"))


def test_validate_is_lazy():
    import dask.array as da

    ds = _good()
    ds["flux"] = (("spectra", "pixels"), da.ones((3, V.NPIX), dtype=np.float32, chunks=(1, -1)))
    with raise_if_computes():
        V.validate(ds)


def test_grid():
    g = V.loglam_grid()
    assert g[0] == V.LOGLAM0 and len(g) == V.NPIX
    assert 10 ** g[0] == pytest.approx(3700.0, abs=0.1)
