"""The default simulator-trained models: their directory key and the shared training recipe."""

from __future__ import annotations

import json

import pytest

from mspec.ml.recipe import (
    BALANCED_MIX,
    BATCH_SIZE,
    MODEL_RECIPE_VERSION,
    TLMA_AUGMENT,
    TLMA_MIX,
)
from mspec.pipeline.models import build_default_models, default_models_dir, list_models
from mspec.simulate import SIMULATOR_VERSION

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_directory_key_has_simulator_and_recipe_versions(monkeypatch, tmp_path):
    monkeypatch.setenv("MSPEC_MODELS_DIR", str(tmp_path))
    d = default_models_dir()
    assert d == tmp_path / f"sim-{SIMULATOR_VERSION}-r{MODEL_RECIPE_VERSION}"
    # a new recipe or a new simulator never reuses older models
    assert default_models_dir(recipe_version=MODEL_RECIPE_VERSION + 1) != d
    assert default_models_dir(simulator_version="0") != d
    assert default_models_dir("7", 3).name == "sim-7-r3"


def test_recipe_mixes():
    assert sum(BALANCED_MIX.values()) == pytest.approx(1.0)
    assert sum(TLMA_MIX.values()) == pytest.approx(1.0)
    # class-balanced: every class the same share, giants as many as dwarfs
    assert len(set(BALANCED_MIX.values())) == 1 and BALANCED_MIX["gM"] == BALANCED_MIX["dM"]
    assert TLMA_MIX["gM"] >= 0.25


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    d = tmp_path_factory.mktemp("default") / "m"
    return build_default_models(d, n_train=400, epochs=1, folds=2, seed=0)


def test_build_records_the_recipe(built):
    info = json.loads((built / "models.json").read_text())
    assert info["model_recipe_version"] == MODEL_RECIPE_VERSION
    assert info["simulator_version"] == SIMULATOR_VERSION
    assert info["recipe"]["version"] == MODEL_RECIPE_VERSION
    assert info["n_train"] == 400 and info["n_tlma"] == 300  # 3/4 of n_train by default
    assert info["tlma_epochs"] == 1 and info["folds"] == 2
    assert set(info["stage_seconds"]) == {"simulate", "spt", "wdm", "dmgm", "tlma"}
    assert info["cpu_seconds"] > 0
    assert list_models(built)["ready"]
    for sub in ("spt", "wdm", "dmgm", "tlma/dM", "tlma/gM"):
        meta = json.loads((built / sub / "model.json").read_text())
        assert meta["simulator_version"] == SIMULATOR_VERSION
        assert meta["provenance"]["model_recipe_version"] == MODEL_RECIPE_VERSION


def test_classifiers_train_on_a_balanced_augmented_set(built):
    spt = json.loads((built / "spt" / "model.json").read_text())
    assert spt["recipe_training"]["augment"]["rv_sigma"] > 0
    assert spt["recipe_training"]["batch_size"] == BATCH_SIZE
    counts = spt["metrics"]["train_counts"]
    single = [v for c, v in counts.items() if c != "M"]  # M = dwarfs + giants: twice as many
    assert min(single) >= 0.8 * max(single)
    assert counts["M"] == pytest.approx(2 * sum(single) / len(single), rel=0.2)
    dmgm = json.loads((built / "dmgm" / "model.json").read_text())["metrics"]["train_counts"]
    assert dmgm["gM"] == pytest.approx(dmgm["dM"], rel=0.2)  # enough giants


def test_tlma_pair_trains_dwarfs_and_giants(built):
    dm = json.loads((built / "tlma" / "dM" / "model.json").read_text())
    gm = json.loads((built / "tlma" / "gM" / "model.json").read_text())
    assert dm["recipe_training"]["batch_size"] == BATCH_SIZE
    # recipe 3: RV shifts and flux-calibration trends, no masks (accuracy.md)
    for meta in (dm, gm):
        aug = meta["recipe_training"]["augment"]
        assert aug["rv_sigma"] == TLMA_AUGMENT["rv_sigma"] > 0
        assert aug["tilt"] == TLMA_AUGMENT["tilt"] > 0 and aug["mask_frac"] == 0
    info = json.loads((built / "models.json").read_text())
    assert info["recipe"]["tlma"]["augment"] == TLMA_AUGMENT
    n_dm = dm["metrics"]["n"] + dm["metrics"]["n_calibration"]
    n_gm = gm["metrics"]["n"] + gm["metrics"]["n_calibration"]
    assert n_dm + n_gm == 300
    assert n_gm == pytest.approx(TLMA_MIX["gM"] * 300, abs=2)


def test_reuse_and_bad_arguments(built, tmp_path):
    before = (built / "models.json").read_text()
    assert build_default_models(built, n_train=400, epochs=1, folds=2) == built
    assert (built / "models.json").read_text() == before  # reused, not retrained
    with pytest.raises(ValueError, match="n_train"):
        build_default_models(tmp_path / "x", n_train=10)
    with pytest.raises(ValueError, match="folds"):
        build_default_models(tmp_path / "x", n_train=400, epochs=1, folds=1)
    with pytest.raises(ValueError, match="tlma_epochs"):
        build_default_models(tmp_path / "x", n_train=400, epochs=1, tlma_epochs=0)


def test_demo_trains_with_the_shared_recipe(monkeypatch, tmp_path):
    """The demo calls the same recipe function as build_default_models, at its own size."""
    import mspec.ml.recipe as recipe
    from mspec import demo

    calls = []

    def fake(out_dir, **kw):
        calls.append(kw)
        raise RuntimeError("stop here")

    monkeypatch.setattr(recipe, "train_default_models", fake)
    with pytest.raises(RuntimeError, match="stop here"):
        demo._train(demo._Timer(), tmp_path, 600, 5, 3)
    (kw,) = calls
    assert kw["n_train"] == 600 and kw["epochs"] == 3 and kw["seed"] == 5
