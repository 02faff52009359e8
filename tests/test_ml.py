"""CNNs (issue 7): networks, training, model files and batched lazy inference.

Tiny networks and few epochs keep this fast; the full-size accuracy runs are in docs/ml.md.
"""

from __future__ import annotations

import json

import dask
import numpy as np
import pytest
import torch
import xarray as xr

from mspec.ml import io as mlio
from mspec.ml.infer import clear_cache, predict, predict_array
from mspec.ml.models import CLASSES, DEFAULT_ARCH, TLMA_LABELS, build_model, count_parameters
from mspec.ml.train import (
    train_classifier,
    train_regressor,
    train_tlma_pair,
)
from mspec.variables import validate

TINY = {"channels": (4, 4, 8, 8), "kernels": (5, 5, 3, 3)}
FAST = {"lr": 3e-3, "batch_size": 64}  # tiny nets and data learn faster with these
WL = np.arange(3900.0, 8900.0)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _zscore(x):
    return ((x - x.mean(1, keepdims=True)) / x.std(1, keepdims=True)).astype(np.float32)


def _ds(x, chunks=None):
    n = x.shape[0]
    ds = xr.Dataset(
        {"flux_grid": (("spectra", "grid"), x)},
        coords={
            "obsid": ("spectra", np.arange(n, dtype=np.int64) + 10_000),
            "wavelength_grid": ("grid", WL),
        },
    )
    return ds.chunk({"spectra": chunks}) if chunks else ds


def synth_classes(n, classes, seed=0, noise=0.5):
    """flux_grid-like spectra: each class has its own 6 absorption lines, random depth."""
    rng = np.random.default_rng(seed)
    centers = np.random.default_rng(123).uniform(4000, 8800, size=(len(classes), 6))
    y = rng.integers(0, len(classes), n)
    amp = rng.uniform(0.5, 1.5, size=(n, 1))
    x = np.zeros((n, WL.size))
    for i in range(len(classes)):
        prof = sum(np.exp(-0.5 * ((WL - c) / 15.0) ** 2) for c in centers[i])
        x[y == i] = -amp[y == i] * prof
    x += rng.normal(0, noise, x.shape)
    return _zscore(x), np.asarray(classes)[y]


def synth_labels(n, seed=0, noise=0.3):
    """Spectra whose line depths depend linearly on (teff, logg, m_h, alpha_m)."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, 4))
    centers = np.random.default_rng(7).uniform(4000, 8800, size=(4, 5))
    x = np.zeros((n, WL.size))
    for k in range(4):
        prof = sum(np.exp(-0.5 * ((WL - c) / 20.0) ** 2) for c in centers[k])
        x -= (1.5 + z[:, [k]]) * prof
    x += rng.normal(0, noise, x.shape)
    lab = {
        "teff": 3600 + 200 * z[:, 0],
        "logg": 4.8 + 0.2 * z[:, 1],
        "m_h": -0.2 + 0.3 * z[:, 2],
        "alpha_m": 0.05 + 0.05 * z[:, 3],
    }
    return _zscore(x), lab


@pytest.fixture(scope="module")
def spt_data():
    x, y = synth_classes(640, CLASSES["spt"], seed=1)
    return x, y


@pytest.fixture(scope="module")
def spt_model(tmp_path_factory, spt_data):
    x, y = spt_data
    out = tmp_path_factory.mktemp("spt")
    metrics = train_classifier(_ds(x, 160), y, "spt", out, epochs=10, seed=3, arch=TINY, **FAST)
    return out, metrics


@pytest.fixture(scope="module")
def tlma_data():
    return synth_labels(240, seed=2)


@pytest.fixture(scope="module")
def tlma_model(tmp_path_factory, tlma_data):
    x, lab = tlma_data
    out = tmp_path_factory.mktemp("tlma")
    metrics = train_regressor(
        _ds(x), lab, out, folds=3, epochs=8, seed=0, arch=TINY, lr=1e-2, batch_size=32
    )
    return out, metrics


# ---------------------------------------------------------------------------- networks
def _expected_params(n_out, channels, kernels, n_in=5000, pool=4):
    p, c_in, length = 0, 1, n_in
    for c, k in zip(channels, kernels):
        p += c * c_in * k + c
        c_in = c
        length //= pool
    return p + c_in * length * n_out + n_out


@pytest.mark.parametrize("kind", ["spt", "wdm", "dmgm", "tlma"])
def test_shapes_and_parameter_counts(kind):
    n_out = len(CLASSES.get(kind, TLMA_LABELS))
    m = build_model(kind)
    assert m(torch.zeros(3, 5000)).shape == (3, n_out)
    assert m(torch.zeros(2, 1, 5000)).shape == (2, n_out)
    assert count_parameters(m) == _expected_params(
        n_out, DEFAULT_ARCH["channels"], DEFAULT_ARCH["kernels"]
    )
    convs = [x for x in m.modules() if isinstance(x, torch.nn.Conv1d)]
    pools = [x for x in m.modules() if isinstance(x, torch.nn.MaxPool1d)]
    fcs = [x for x in m.modules() if isinstance(x, torch.nn.Linear)]
    relus = [x for x in m.modules() if isinstance(x, torch.nn.ReLU)]
    assert (len(convs), len(pools), len(fcs), len(relus)) == (4, 4, 1, 4)
    t = build_model(kind, **TINY)
    assert count_parameters(t) == _expected_params(n_out, TINY["channels"], TINY["kernels"])


@pytest.mark.parametrize("kind", ["spt", "wdm", "dmgm", "tlma"])
@pytest.mark.parametrize(
    "arch",
    [{}, TINY, {"n_in": 4000, "pool": 3, "channels": (2, 3, 5, 7), "kernels": (3, 5, 7, 9)},
     {"dropout": 0.2}],
)  # fmt: skip
def test_state_shapes_without_torch_match_the_network(kind, arch):
    """The torch-free shapes that check a weights file in the driver are the network's."""
    from mspec.ml.base import state_shapes

    want = {k: tuple(v.shape) for k, v in build_model(kind, **arch).state_dict().items()}
    assert state_shapes(kind, **arch) == want
    with pytest.raises(ValueError, match="bogus"):
        state_shapes(kind, bogus=1)
    with pytest.raises(ValueError, match="n_in"):
        state_shapes(kind, n_in=100)


@pytest.mark.parametrize(
    ("kwargs", "word"),
    [
        ({"channels": (1, 2, 3)}, "channels"),
        ({"kernels": (4, 5, 5, 3)}, "kernels"),
        ({"pool": 0}, "pool"),
        ({"n_in": 100}, "n_in"),
        ({"dropout": 1.5}, "dropout"),
        ({"bogus": 1}, "bogus"),
    ],
)
def test_bad_architecture_arguments(kwargs, word):
    with pytest.raises(ValueError, match=word):
        build_model("spt", **kwargs)
    with pytest.raises(ValueError, match="kind"):
        build_model("xyz")


# ---------------------------------------------------------------------------- training
def test_classifier_learns(spt_model):
    out, m = spt_model
    assert m["val_accuracy"] > 0.5  # chance is 1/8
    h = m["history"]
    assert min(h["val_loss"]) < h["val_loss"][0] * 0.9
    assert h["train_loss"][-1] < h["train_loss"][0]
    assert m["n_train"] + m["n_val"] == 640
    assert abs(m["n_val"] / 640 - 0.25) < 0.02  # stratified 3:1
    cm = np.array(m["confusion"])
    assert cm.shape == (8, 8) and cm.sum() == m["n_val"]
    assert (out / "curves.png").stat().st_size > 1000
    assert (out / "confusion.png").stat().st_size > 1000


def test_model_directory_contents(spt_model):
    out, m = spt_model
    meta = json.loads((out / "model.json").read_text())
    assert meta["kind"] == "spt" and meta["classes"] == list(CLASSES["spt"])
    assert meta["grid"]["start"] == 3900.0 and meta["grid"]["npix"] == 5000
    assert meta["recipe"] == "cnn" and len(meta["training_set_hash"]) == 64
    assert meta["metrics"]["val_accuracy"] == m["val_accuracy"]
    assert "mspec_version" in meta and meta["arch"]["channels"] == list(TINY["channels"])
    files = sorted(p.name for p in out.iterdir())
    assert files == ["confusion.png", "curves.png", "member_00.safetensors", "model.json"]
    blob = (out / "member_00.safetensors").read_bytes()
    assert not blob.startswith(b"\x80")  # not a pickle


def test_training_is_reproducible(tmp_path, spt_data):
    x, y = spt_data
    x, y = x[:200], y[:200]
    kw = {"epochs": 2, "arch": TINY}
    m1 = train_classifier(_ds(x), y, "spt", tmp_path / "a", seed=5, plots=False, **kw)
    m2 = train_classifier(_ds(x, 50), y, "spt", tmp_path / "b", seed=5, plots=False, **kw)
    m3 = train_classifier(_ds(x), y, "spt", tmp_path / "c", seed=6, plots=False, **kw)
    w = {k: (tmp_path / k / "member_00.safetensors").read_bytes() for k in "abc"}
    assert w["a"] == w["b"]  # chunking does not change training
    assert m1["history"] == m2["history"]
    assert w["a"] != w["c"]
    assert m1["history"] != m3["history"]


def test_streaming_training_reads_one_chunk_at_a_time(tmp_path, spt_data):
    x, y = spt_data
    ds = _ds(x, 80)
    seen = []

    def counting_get(dsk, keys, **kw):
        res = dask.get(dsk, keys, **kw)
        for r in dask.core.flatten(res) if isinstance(res, list | tuple) else [res]:
            if isinstance(r, np.ndarray) and r.ndim == 2:
                seen.append(r.shape[0])
        return res

    with dask.config.set(scheduler=counting_get):
        m = train_classifier(
            ds,
            y,
            "spt",
            tmp_path / "s",
            epochs=10,
            seed=3,
            arch=TINY,
            max_memory=0,
            plots=False,
            **FAST,
        )
    assert seen and max(seen) <= 80  # never more than one chunk in a compute
    assert m["val_accuracy"] > 0.3


def test_class_weights(tmp_path, spt_data):
    x, y = spt_data
    m = train_classifier(
        _ds(x[:160]), y[:160], "spt", tmp_path / "p", epochs=1, arch=TINY,
        class_weight="paper", plots=False,
    )  # fmt: skip
    meta = mlio.read_metadata(tmp_path / "p")
    assert meta["class_weight"]["OB"] == 3.62 and meta["class_weight"]["M"] == 1.0
    assert m["epochs_run"] == 1
    train_classifier(_ds(x[:160]), y[:160], "spt", tmp_path / "b", epochs=1, arch=TINY, plots=False)
    cw = mlio.read_metadata(tmp_path / "b")["class_weight"]
    counts = mlio.read_metadata(tmp_path / "b")["metrics"]["train_counts"]
    n = sum(counts.values())
    assert cw["M"] == pytest.approx(n / (8 * counts["M"]))


def test_unlabelled_and_empty_spectra_are_skipped(tmp_path):
    x, y = synth_classes(120, CLASSES["wdm"], seed=4)
    y = y.astype(object)
    y[:10] = "K"  # not a WDM class
    y[10:15] = None
    x[15:20] = np.nan  # no data
    m = train_classifier(_ds(x), y, "wdm", tmp_path / "w", epochs=2, arch=TINY, plots=False)
    assert m["n_train"] + m["n_val"] == 100


# ---------------------------------------------------------------------------- inference
def test_weights_round_trip_gives_identical_outputs(tmp_path):
    torch.manual_seed(0)
    model = build_model("dmgm", **TINY).eval()
    meta = {"kind": "dmgm", "classes": list(CLASSES["dmgm"]), "arch": model.arch}
    mlio.write_model(tmp_path / "m", meta, [model.state_dict()])
    (loaded,), meta2 = mlio.load_models(tmp_path / "m")
    x = torch.randn(7, 5000)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k])


@pytest.mark.parametrize("chunks", [None, 7, 64])
def test_map_blocks_inference_equals_direct(spt_model, spt_data, chunks):
    out, _ = spt_model
    x, _ = spt_data
    x = x[:100].copy()
    x[3] = np.nan  # an empty spectrum
    x[5, :100] = np.nan  # partly missing
    ds = _ds(x, chunks)
    res = predict(ds, out)
    validate(res, ["spt_prob", "spt_class", "spt_classes"])
    prob = res["spt_prob"].values
    direct = np.stack([predict_array(x[i], out, batch_size=1)[0] for i in range(len(x))])
    np.testing.assert_allclose(prob, direct, rtol=1e-5, atol=1e-6, equal_nan=True)
    assert np.isnan(prob[3]).all() and res["spt_class"].values[3] == ""
    np.testing.assert_allclose(np.nansum(prob, axis=1)[np.arange(100) != 3], 1.0, rtol=1e-5)
    want = np.asarray(CLASSES["spt"])[np.argmax(np.nan_to_num(prob, nan=-1), axis=1)]
    want[3] = ""
    assert (res["spt_class"].values == want).all()
    ref = predict(_ds(x), out)["spt_prob"].values
    np.testing.assert_array_equal(prob, ref)  # chunked == unchunked


def test_predict_is_lazy(spt_model, spt_data):
    out, _ = spt_model
    x, _ = spt_data

    def boom(*a, **k):
        raise AssertionError("computed")

    with dask.config.set(scheduler=boom):
        res = predict(_ds(x, 100), out)
    assert isinstance(res["spt_prob"].data, dask.array.Array)
    assert isinstance(res["spt_class"].data, dask.array.Array)


def test_ensemble_mean_and_std(tlma_model, tlma_data):
    out, metrics = tlma_model
    x, lab = tlma_data
    meta = mlio.read_metadata(out)
    assert len(meta["members"]) == 3 and meta["recipe"] == "tlma"
    np.testing.assert_allclose(meta["label_mean"][0], np.mean(lab["teff"]))
    res = predict(_ds(x[:50], 20), out)
    validate(res, [*TLMA_LABELS, *(f"{k}_err" for k in TLMA_LABELS)])
    validate(res, [f"{k}_err_ens" for k in TLMA_LABELS])
    members = predict_array(x[:50], out, members=True)
    assert members.shape == (3, 50, 4)
    for i, k in enumerate(TLMA_LABELS):
        np.testing.assert_allclose(res[k].values, members[:, :, i].mean(0), rtol=1e-6)
        np.testing.assert_allclose(
            res[f"{k}_err_ens"].values, members[:, :, i].std(0, ddof=1), rtol=1e-5, atol=1e-9
        )
        # the calibrated error adds a term in quadrature or shrinks by the fitted factor
        cal = meta["calibration"]
        if min(cal["scale"][k]) >= 1.0:
            assert (res[f"{k}_err"].values >= res[f"{k}_err_ens"].values - 1e-9).all()
    # members really differ, and each is the z-scored output mapped back to physical units
    assert (res["teff_err_ens"].values > 0).all()
    np.testing.assert_allclose(predict_array(x[:50], out)[:, 4:], np.stack(
        [res[f"{k}_err"].values for k in TLMA_LABELS], 1), rtol=1e-6)  # fmt: skip
    np.testing.assert_allclose(predict_array(x[:50], out, errors="ensemble")[:, 4:], np.stack(
        [res[f"{k}_err_ens"].values for k in TLMA_LABELS], 1), rtol=1e-6)  # fmt: skip
    models, _ = mlio.load_models(out)
    with torch.no_grad():
        z = models[1](torch.from_numpy(x[:50])).numpy()
    np.testing.assert_allclose(
        members[1, :, 0], z[:, 0] * meta["label_std"][0] + meta["label_mean"][0], rtol=1e-5
    )
    assert (out / "oof_predictions.csv").exists() and (out / "oof.png").exists()
    assert set(metrics["rms"]) == set(TLMA_LABELS)


def test_regressor_learns(tlma_model, tlma_data):
    _, metrics = tlma_model
    _, lab = tlma_data
    # out-of-fold errors well below the label scatter
    assert metrics["rms"]["teff"] < 0.8 * np.std(lab["teff"])


def test_regressor_augmentation_is_recorded_and_checked(tmp_path):
    x, lab = synth_labels(60, seed=4)
    aug = {"rv_sigma": 5.0, "tilt": 0.3}
    train_regressor(_ds(x), lab, tmp_path / "a", folds=2, epochs=2, seed=0, arch=TINY,
                    augment=aug, plots=False)  # fmt: skip
    rec = mlio.read_metadata(tmp_path / "a")["recipe_training"]["augment"]
    assert rec["rv_sigma"] == 5.0 and rec["tilt"] == 0.3 and rec["mask_frac"] == 0.0
    # augmentation changes what the members learn (same seed, data and split otherwise)
    train_regressor(_ds(x), lab, tmp_path / "b", folds=2, epochs=2, seed=0, arch=TINY,
                    plots=False)  # fmt: skip
    pa, pb = (predict_array(x[:5], tmp_path / d) for d in ("a", "b"))
    assert not np.allclose(pa, pb)
    with pytest.raises(ValueError, match="augment"):
        train_regressor(_ds(x), lab, tmp_path / "c", folds=2, epochs=1, arch=TINY,
                        augment={"shift": 1.0})  # fmt: skip


def test_tlma_pair_dispatch(tmp_path):
    x, lab = synth_labels(120, seed=9)
    lum = np.array(["dM", "gM", ""])[np.arange(120) % 3]
    res = train_tlma_pair(_ds(x), lab, lum, tmp_path / "p", folds=2, epochs=1, arch=TINY)
    assert set(res) == {"dM", "gM"}
    ds = _ds(x, 50).assign(lumc=("spectra", lum))
    out = predict(ds, tmp_path / "p", lumclass="lumc")
    dm = predict_array(x, tmp_path / "p" / "dM")
    gm = predict_array(x, tmp_path / "p" / "gM")
    t = out["teff"].values
    np.testing.assert_allclose(t[lum == "dM"], dm[lum == "dM", 0], rtol=1e-6)
    np.testing.assert_allclose(t[lum == "gM"], gm[lum == "gM", 0], rtol=1e-6)
    assert np.isnan(t[lum == ""]).all()
    with pytest.raises(ValueError, match="lumclass"):
        predict(ds, tmp_path / "p")
    with pytest.raises(ValueError, match="lumclass"):
        predict(ds, tmp_path / "p", lumclass="nope")


# ---------------------------------------------------------------------------- errors
def test_corrupt_or_wrong_weights_give_clear_errors(spt_model, tmp_path):
    import shutil

    out, _ = spt_model
    bad = tmp_path / "bad"
    shutil.copytree(out, bad)
    ds = _ds(np.zeros((4, 5000), np.float32))
    f = bad / "member_00.safetensors"
    f.write_bytes(f.read_bytes()[:-100])  # truncated
    clear_cache()
    with pytest.raises(mlio.ModelFileError, match="member_00.safetensors.*corrupt"):
        predict(ds, bad)
    # garbage with a matching hash: the safetensors parser rejects it
    f.write_bytes(b"not a safetensors file at all")
    meta = json.loads((bad / "model.json").read_text())
    meta["members"][0]["sha256"] = mlio.sha256_bytes(f.read_bytes())
    (bad / "model.json").write_text(json.dumps(meta))
    with pytest.raises(mlio.ModelFileError, match="not a valid safetensors"):
        predict(ds, bad)
    # valid safetensors of another architecture
    other = build_model("spt")
    from safetensors.torch import save_file

    save_file(other.state_dict(), f)
    meta["members"][0]["sha256"] = mlio.sha256_bytes(f.read_bytes())
    (bad / "model.json").write_text(json.dumps(meta))
    with pytest.raises(mlio.ModelFileError, match="does not fit the architecture"):
        predict(ds, bad)
    f.unlink()
    with pytest.raises(mlio.ModelFileError, match="missing"):
        predict(ds, bad)
    (bad / "model.json").write_text("{not json")
    with pytest.raises(mlio.ModelFileError, match="not valid JSON"):
        predict(ds, bad)
    (bad / "model.json").unlink()
    with pytest.raises(mlio.ModelFileError, match="model.json"):
        predict(ds, bad)
    with pytest.raises(mlio.ModelFileError, match="not a directory"):
        predict(ds, tmp_path / "nowhere")


def test_bad_arguments_are_named(spt_model, tmp_path):
    out, _ = spt_model
    x, y = synth_classes(40, CLASSES["wdm"])
    ds = _ds(x)
    for kwargs, word in [
        ({"kind": "foo"}, "kind"),
        ({"labels": y[:10]}, "labels"),
        ({"epochs": 0}, "epochs"),
        ({"class_weight": "weird"}, "class_weight"),
        ({"val_fraction": 1.5}, "val_fraction"),
        ({"batch_size": 0}, "batch_size"),
        ({"labels": np.full(40, "WD")}, "at least 2"),
    ]:
        args = {"labels": y, "kind": "wdm", **kwargs}
        with pytest.raises(ValueError, match=word):
            train_classifier(ds, args.pop("labels"), args.pop("kind"), tmp_path / "x", **args)
    with pytest.raises(ValueError, match="flux_grid"):
        train_classifier(ds.drop_vars("flux_grid"), y, "wdm", tmp_path / "x")
    with pytest.raises(TypeError, match="ds"):
        train_classifier(x, y, "wdm", tmp_path / "x")
    _, lab = synth_labels(40)
    with pytest.raises(ValueError, match="folds"):
        train_regressor(ds, lab, tmp_path / "r", folds=1)
    with pytest.raises(ValueError, match="at least one of the columns"):  # a missing label
        train_regressor(ds, {"vsini": lab["teff"]}, tmp_path / "r")  # is allowed, all are not
    with pytest.raises(ValueError, match="batch_size"):
        predict(ds, out, batch_size=0)
    with pytest.raises(ValueError, match="flux_grid"):
        predict(ds.drop_vars("flux_grid"), out)
    with pytest.raises(ValueError, match="grid"):
        predict(ds.chunk({"grid": 1000}), out)
    with pytest.raises(ValueError, match="grid pixels"):
        predict(ds.isel(grid=slice(0, 4000)), out)
    with pytest.raises(ValueError, match="wavelength_grid"):
        predict(ds.assign_coords(wavelength_grid=("grid", WL + 100)), out)
    with pytest.raises(ValueError, match="gpu"):
        predict(ds, out, gpu="maybe")


# ---------------------------------------------------------------------------- devices
@pytest.mark.distributed
def test_distributed_inference_equals_local(spt_model, spt_data):
    from distributed import Client, LocalCluster

    out, _ = spt_model
    x, _ = spt_data
    ds = _ds(x[:200], 50)
    local = predict(ds, out)["spt_prob"].values
    with (
        LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, resources={"GPU": 1},
            dashboard_address=None,
        ) as cluster,
        Client(cluster),
    ):  # fmt: skip
        res = predict(ds, out)
        layers = res["spt_prob"].data.__dask_graph__().layers
        assert any(
            (lay.annotations or {}).get("resources") == {"GPU": 1} for lay in layers.values()
        )
        dist = res["spt_prob"].values
    np.testing.assert_array_equal(dist, local)
    # without GPU workers no annotation is added
    plain = predict(ds, out)["spt_prob"].data.__dask_graph__().layers
    assert not any((lay.annotations or {}).get("resources") for lay in plain.values())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cpu_and_gpu_inference_agree(spt_model, spt_data, tlma_model, tlma_data):
    for (out, _), (x, _) in ((spt_model, spt_data), (tlma_model, tlma_data)):
        cpu = predict_array(x[:64], out, device="cpu")
        gpu = predict_array(x[:64], out, device="cuda")
        np.testing.assert_allclose(cpu, gpu, rtol=1e-3, atol=1e-4)
