"""The stage contract (mspec.stage) applied to preprocess, template_match and ml.predict.

For each stage: merge=True returns ``ds`` plus the outputs, merge=False the outputs alone;
a MergeWarning on overwrite; lazy (nothing computed while building the graph); a missing
input is a VariableError naming it; status variables carry CF flags; declared in STAGES.
"""

from __future__ import annotations

import inspect
import sys
import types

import dask
import numpy as np
import pytest
import xarray as xr

from mspec.preprocessing import preprocess
from mspec.rv import template_match
from mspec.simulate import simulate_survey, simulated_templates
from mspec.stage import STAGES, MergeWarning, get_stage
from mspec.testing import raise_if_computes
from mspec.variables import VariableError

SHIFTS = np.arange(-500.0, 501.0, 250.0)  # 5 shifts: enough for the contract, fast
TINY = {"channels": (4, 4, 8, 8), "kernels": (5, 5, 3, 3)}
WL = np.arange(3900.0, 8900.0)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def survey():
    return simulate_survey(24, seed=1)


@pytest.fixture(scope="module")
def lazy_survey(survey):
    return survey.chunk({"spectra": 8})


@pytest.fixture(scope="module")
def lib():
    return simulated_templates().isel(templates=slice(0, 6))


@pytest.fixture(scope="module")
def cnn(survey):
    return preprocess(survey, recipe="cnn", fill_value=0.0)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny CNN-SPT classifier and a tiny CNN-TLMA ensemble, trained in seconds."""
    from mspec.ml.train import train_classifier, train_regressor

    rng = np.random.default_rng(0)
    n = 48
    x = rng.standard_normal((n, WL.size)).astype(np.float32)
    ds = xr.Dataset({"flux_grid": (("spectra", "grid"), x)}, coords={"wavelength_grid": WL})
    ds = ds.assign_coords(wavelength_grid=("grid", WL))
    root = tmp_path_factory.mktemp("models")
    y = np.array(["M", "K"])[np.arange(n) % 2]
    train_classifier(ds, y, "spt", root / "spt", epochs=1, arch=TINY, plots=False)
    lab = {k: rng.normal(size=n) for k in ("teff", "logg", "m_h", "alpha_m")}
    train_regressor(ds, lab, root / "tlma", folds=2, epochs=1, arch=TINY, plots=False)
    return root


def _predict(ds, models, kind="spt", **kw):
    from mspec.ml.infer import predict

    return predict(ds, models / kind, **kw)


# --- the three stages, run the same way ----------------------------------------------------


def _run(name, ds, models=None, lib=None, **kw):
    if name == "preprocess":
        return preprocess(ds, recipe="cnn", **kw)
    if name == "template_match":
        return template_match(ds, templates=lib, shifts=SHIFTS, **kw)
    return _predict(ds, models, **kw)


STAGE_NAMES = ["preprocess", "template_match", "cnn_predict"]
OUT_MAIN = {"preprocess": "flux_grid", "template_match": "rv_tm", "cnn_predict": "spt_prob"}


def _input(name, survey, cnn):
    return cnn if name == "cnn_predict" else survey


@pytest.mark.parametrize("name", STAGE_NAMES)
def test_merge_true_and_false(name, survey, cnn, models, lib):
    ds = _input(name, survey, cnn)
    if name == "preprocess":
        ds = survey
    alone = _run(name, ds, models, lib, merge=False)
    merged = _run(name, ds, models, lib)
    assert OUT_MAIN[name] in alone
    # merge=False: the outputs only, none of the inputs
    assert not set(alone.data_vars) & set(ds.data_vars)
    assert set(alone.data_vars) <= set(STAGES[name].outputs)
    # merge=True: ds plus the outputs, inputs untouched
    assert set(merged.data_vars) == set(ds.data_vars) | set(alone.data_vars)
    for v in ds.data_vars:
        xr.testing.assert_identical(merged[v], ds[v])
    for v in alone.data_vars:
        xr.testing.assert_identical(merged[v], alone[v])


@pytest.mark.parametrize("name", STAGE_NAMES)
def test_merge_warns_on_overwrite(name, survey, cnn, models, lib):
    ds = _input(name, survey, cnn)
    once = _run(name, ds, models, lib)
    with pytest.warns(MergeWarning, match=OUT_MAIN[name]):
        twice = _run(name, once, models, lib)
    assert set(twice.data_vars) == set(once.data_vars)


def test_preprocess_merge_replaces_wavelength_grid(survey):
    cnn = preprocess(survey, recipe="cnn")
    with pytest.warns(MergeWarning):
        tl = preprocess(cnn, recipe="tlma", rv="true_rv")
    assert tl.wavelength_grid.attrs["frame"] == "rest"
    assert tl.flux_grid.wavelength_grid.attrs["frame"] == "rest"


@pytest.mark.parametrize("name", STAGE_NAMES)
def test_lazy(name, lazy_survey, models, lib):
    with raise_if_computes():
        ds = lazy_survey
        if name == "cnn_predict":
            ds = preprocess(lazy_survey, recipe="cnn")
        out = _run(name, ds, models, lib)
        assert isinstance(out[OUT_MAIN[name]].data, dask.array.Array)
        assert out[OUT_MAIN[name]].chunks[0] == (8, 8, 8)
    assert np.isfinite(out[OUT_MAIN[name]].values).any()


@pytest.mark.parametrize(
    "name, missing",
    [
        ("preprocess", "ivar"),
        ("preprocess", "loglam"),
        ("template_match", "ormask"),
        ("template_match", "flux"),
        ("cnn_predict", "flux_grid"),
    ],
)
def test_missing_input_is_named(name, missing, survey, cnn, models, lib):
    ds = _input(name, survey, cnn).drop_vars(missing)
    with pytest.raises(VariableError, match=missing):
        _run(name, ds, models, lib)


@pytest.mark.parametrize("name", STAGE_NAMES)
def test_not_a_dataset(name, survey, cnn, models, lib):
    ds = _input(name, survey, cnn)
    with pytest.raises(TypeError, match="ds"):
        _run(name, ds[OUT_MAIN["preprocess"] if name == "cnn_predict" else "flux"], models, lib)
    with pytest.raises(TypeError, match="merge"):
        _run(name, ds, models, lib, merge="no")


@pytest.mark.parametrize("name", STAGE_NAMES)
def test_declared_with_keyword_options(name):
    spec = STAGES[name]
    assert spec is get_stage(name)
    assert spec.version and isinstance(spec.version, str)
    assert spec.module in {"preprocess", "RVMM", "SCM"}
    sig = inspect.signature(spec.func)
    params = list(sig.parameters.values())
    assert params[0].name == "ds"
    positional = [p.name for p in params[1:] if p.kind is not p.KEYWORD_ONLY]
    assert positional == (["model_dir"] if name == "cnn_predict" else [])
    assert sig.parameters["merge"].default is True


def test_stage_functions_are_the_public_ones():
    import mspec.ml.infer
    import mspec.rv
    import mspec.rv.matching

    assert STAGES["preprocess"].func is preprocess
    assert STAGES["template_match"].func is mspec.rv.template_match
    assert mspec.rv.matching.template_match is mspec.rv.template_match
    assert STAGES["cnn_predict"].func is mspec.ml.infer.predict
    # no module/function shadowing
    assert isinstance(mspec.rv.template_match, types.FunctionType)
    package = sys.modules["mspec.preprocessing"]
    assert isinstance(package, types.ModuleType) and not callable(package)
    assert package.preprocess is preprocess
    import mspec

    assert mspec.preprocess is preprocess and mspec.template_match is mspec.rv.template_match


def test_positional_options_are_refused(survey, lib):
    with pytest.raises(TypeError):
        preprocess(survey, "cnn")
    with pytest.raises(TypeError):
        template_match(survey, lib)


# --- status variables ---------------------------------------------------------------------


def _check_flags(da):
    values = np.asarray(da.attrs["flag_values"])
    meanings = da.attrs["flag_meanings"].split()
    assert values.size == len(meanings) > 1
    assert values.dtype == da.dtype
    assert all(m.replace("_", "").isalnum() for m in meanings)
    assert set(np.unique(da.values)) <= set(values.tolist())


def test_status_flags(survey, lib):
    _check_flags(preprocess(survey, recipe="cnn", merge=False)["preprocess_status"])
    _check_flags(preprocess(survey, recipe="tm", merge=False)["preprocess_status"])
    tm = template_match(survey, templates=lib, shifts=SHIFTS, merge=False)
    _check_flags(tm["tm_status"])
    assert tm["tm_status"].attrs["flag_meanings"].split()[:2] == ["ok", "no_coverage"]
    t7 = template_match(survey, templates=lib, shifts=SHIFTS, wave_max=7500, merge=False)
    _check_flags(t7["tml7500_status"])


# --- template_match: outputs say what was computed ---------------------------------------------


@pytest.mark.parametrize("wave_max, prefix", [(None, "tm"), (7500, "tml7500"), (7500.0, "tml7500")])
def test_template_match_prefix(survey, lib, wave_max, prefix):
    out = template_match(survey, templates=lib, shifts=SHIFTS, wave_max=wave_max, merge=False)
    assert f"rv_{prefix}" in out and f"{prefix}_status" in out
    assert all(v.startswith((f"rv_{prefix}", f"{prefix}_")) for v in out.data_vars)


@pytest.mark.parametrize("wave_max", [8000, 7499.0, 8899, "7500", True])
def test_template_match_other_wave_max_refused(survey, lib, wave_max):
    with pytest.raises(ValueError, match="wave_max"):
        template_match(survey, templates=lib, wave_max=wave_max)


# --- ml.predict: arguments checked at call time --------------------------------------------------


def test_predict_tlma_merge(cnn, models):
    alone = _predict(cnn, models, "tlma", merge=False)
    assert set(alone.data_vars) == {
        "teff", "logg", "m_h", "alpha_m", "teff_err", "logg_err", "m_h_err", "alpha_m_err",
        "teff_err_ens", "logg_err_ens", "m_h_err_ens", "alpha_m_err_ens",  # issue 18
    }  # fmt: skip
    merged = _predict(cnn, models, "tlma")
    assert set(merged.data_vars) == set(cnn.data_vars) | set(alone.data_vars)


def test_predict_bad_arguments_named(cnn, models):
    import torch

    with pytest.raises(TypeError, match="batch_size"):
        _predict(cnn, models, batch_size="x")
    with pytest.raises(TypeError, match="batch_size"):
        _predict(cnn, models, batch_size=2.5)
    with pytest.raises(ValueError, match="batch_size"):
        _predict(cnn, models, batch_size=0)
    with pytest.raises(ValueError, match="gpu"):
        _predict(cnn, models, gpu="bogus")
    with pytest.raises(ValueError, match="device"):
        _predict(cnn, models, device="bogus")
    if torch.cuda.device_count() < 8:
        with pytest.raises(ValueError, match="device"):
            _predict(cnn, models, device="cuda:7")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="device"):
            _predict(cnn, models, device="cuda")
    out = _predict(cnn, models, device="cpu", batch_size=5, gpu=False, merge=False)
    assert out["spt_prob"].shape == (cnn.sizes["spectra"], 8)
