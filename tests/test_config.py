"""Tests of mspec.config: defaults, round trips, strict errors, paths, hashes, docs page."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from pathlib import Path

import pytest

from mspec import config as C
from mspec.config import (
    Config,
    ConfigError,
    config_reference_markdown,
    default_toml,
    load_config,
    save_resolved,
)

ROOT = Path(__file__).resolve().parents[1]

SECTIONS = [
    "cluster",
    "models",
    "templates",
    "gaia",
    "preprocess",
    "rv",
    "ml",
    "thresholds",
    "numba",
    "selection",
]


def write(tmp_path: Path, text: str, name: str = "run.toml") -> Path:
    p = tmp_path / name
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text, encoding="utf-8")
    return p


def custom() -> Config:
    """A configuration with every value changed from its default."""
    return Config.from_dict(
        {
            "sources": ["/data/a/*.fits.gz", "/data/cat.csv"],
            "store": "/data/spectra.zarr",
            "run_dir": "/runs/r1",
            "chunk_size": 500,
            "cluster": {
                "n_workers": 8,
                "threads_per_worker": 2,
                "memory_limit": "4GB",
                "scheduler": "tcp://10.0.0.1:8786",
            },
            "models": {"dir": "/models"},
            "templates": {"set": "demo"},
            "gaia": {"table": "/tables/gaia.parquet"},
            "preprocess": {"max_gap": 12.5, "fill_value": -1.0},
            "rv": {
                "weighting": "ivar",
                "oversample": 33,
                "fit_halfwidth": 3,
                "min_pixels": 150,
                "mask_tellurics": True,
                "engine": "torch",
                "device": "cuda:1",
                "tml_wave_max": 7500.0,
            },
            "ml": {"batch_size": 256, "device": "cpu"},
            "thresholds": {"tm_sigma": 2.5, "dsal_sigma": 1.5, "inspect_abs_rv": 200.0},
            "numba": {"cache": False, "cache_dir": "/cache/numba"},
            "selection": {"entry": "all"},
        }
    )


# ---------------------------------------------------------------------------- defaults


def test_defaults():
    c = Config()
    assert c == Config.from_dict({})
    assert c.sources == () and c.store == "" and c.run_dir == ""
    assert c.chunk_size == 1000
    assert (c.cluster.n_workers, c.cluster.threads_per_worker) == (0, 1)
    assert (c.cluster.memory_limit, c.cluster.scheduler) == ("auto", "")
    assert c.models.dir == "" and c.templates.set == "real" and c.gaia.table == ""
    assert c.preprocess.max_gap is None and c.preprocess.fill_value == 0.0
    rv = c.rv
    assert (rv.weighting, rv.oversample, rv.fit_halfwidth, rv.min_pixels) == ("none", 69, 2, 200)
    assert (rv.mask_tellurics, rv.engine, rv.device, rv.tml_wave_max) == (
        False,
        "numba",
        "",
        7500.0,
    )
    assert (c.ml.batch_size, c.ml.device) == (1024, "")
    assert (c.thresholds.tm_sigma, c.thresholds.dsal_sigma) == (3.0, 2.0)
    assert c.thresholds.inspect_abs_rv == 150.0
    assert (c.numba.cache, c.numba.cache_dir) == (True, "")
    assert [f.name for f in dataclasses.fields(Config)][4:] == SECTIONS


def test_rv_defaults_match_template_match():
    """The [rv] defaults are those of mspec.template_match."""
    import inspect

    from mspec.rv import template_match

    sig = inspect.signature(template_match).parameters
    rv = Config().rv
    for name in ("weighting", "oversample", "fit_halfwidth", "min_pixels", "mask_tellurics"):
        assert getattr(rv, name) == sig[name].default, name
    assert sig["engine"].default == rv.engine


def test_every_field_documented():
    def check(cls):
        for f in dataclasses.fields(cls):
            if "section" in f.metadata:
                check(f.metadata["section"])
                continue
            assert f.metadata["doc"].strip(), f.name
            assert "\n" not in f.metadata["doc"], f.name
            assert "units" in f.metadata

    check(Config)
    for name in SECTIONS:
        assert getattr(Config(), name).__doc__.strip()


def test_frozen_and_validated_on_construction():
    c = Config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.chunk_size = 5
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.rv.oversample = 5
    with pytest.raises(ConfigError, match=r"rv\.oversample must be an int, got str"):
        C.RVConfig(oversample="3")
    with pytest.raises(ConfigError, match="chunk_size"):
        Config(chunk_size=0)
    with pytest.raises(ConfigError, match="rv must be a RVConfig"):
        Config(rv={"oversample": 3})
    assert C.PreprocessConfig(max_gap=5).max_gap == 5.0
    assert isinstance(C.PreprocessConfig(max_gap=5).max_gap, float)


# --------------------------------------------------------------------------- round trips


def test_round_trip_dict():
    c = custom()
    d = c.to_dict()
    json.dumps(d)  # plain values
    assert isinstance(d["sources"], list)
    assert Config.from_dict(d) == c
    assert Config.from_dict(Config().to_dict()) == Config()
    assert c != Config()


@pytest.mark.parametrize("commented", [False, True])
def test_round_trip_toml(tmp_path, commented):
    c = custom()
    text = c.to_toml(commented=commented)
    C._toml.loads(text)  # valid TOML
    assert load_config(write(tmp_path, text)) == c
    # unset optional values are omitted, and still round-trip
    c2 = c.replace(preprocess={"max_gap": None})
    assert load_config(write(tmp_path, c2.to_toml(commented=commented), "b.toml")) == c2


def test_toml_string_escapes(tmp_path):
    odd = ['/d/quote"s', "/d/back\\slash", "/d/tab\there", "/d/ünïcode λ", "/d/ctl\x01"]
    c = Config(sources=tuple(odd), store="/d/a'b.zarr", run_dir="/r")
    assert load_config(write(tmp_path, c.to_toml())) == c


def test_toml_special_floats(tmp_path):
    c = Config(preprocess=C.PreprocessConfig(max_gap=math.inf, fill_value=-math.inf))
    assert load_config(write(tmp_path, c.to_toml())) == c
    c = Config(preprocess=C.PreprocessConfig(fill_value=1e-300))
    assert load_config(write(tmp_path, c.to_toml())) == c
    n = load_config(write(tmp_path, "[preprocess]\nfill_value = nan\n"))
    assert math.isnan(n.preprocess.fill_value)


def test_default_toml_loads_back_to_defaults(tmp_path):
    for commented in (True, False):
        text = default_toml(commented=commented)
        assert load_config(write(tmp_path, text)) == Config()
    text = default_toml()
    # every key appears with its description and units as comments
    for cls in [Config] + [
        dataclasses.fields(Config)[i].metadata["section"] for i in range(4, 4 + len(SECTIONS))
    ]:
        for f in dataclasses.fields(cls):
            if "kind" not in f.metadata:
                continue
            assert f"# {f.metadata['doc']}" in text, f.name
            if f.metadata["units"]:
                assert f"[{f.metadata['units']}]" in text, f.name
    for name in SECTIONS:
        assert f"\n[{name}]\n" in text
    # the commented-out example of an unset key is valid once uncommented
    line = next(s for s in text.splitlines() if s.startswith("# max_gap ="))
    c = load_config(write(tmp_path, text.replace(line, line[2:])))
    assert c.preprocess.max_gap == 10.0
    assert c.replace(preprocess={"max_gap": None}) == Config()


def test_safe_loading(tmp_path):
    """Values are data: nothing is evaluated."""
    assert load_config(write(tmp_path, "")) == Config()
    c = load_config(write(tmp_path, "[cluster]\nscheduler = \"__import__('os').system('x')\"\n"))
    assert c.cluster.scheduler == "__import__('os').system('x')"


# ------------------------------------------------------------------------------- errors

# (toml text, dotted key, expected type in the message)
BAD = [
    ('[rv]\noversample = "69"\n', "rv.oversample", "an int"),
    ("[rv]\noversample = 69.0\n", "rv.oversample", "an int"),
    ("[rv]\noversample = true\n", "rv.oversample", "an int"),
    ("[rv]\noversample = 0\n", "rv.oversample", "an int in 1..10000"),
    ("chunk_size = 0\n", "chunk_size", "an int in 1..100000"),
    ("chunk_size = -5\n", "chunk_size", "an int in 1..100000"),
    ("chunk_size = 100001\n", "chunk_size", "an int in 1..100000"),
    ("chunk_size = 10000000000000\n", "chunk_size", "an int in 1..100000"),
    ("chunk_size = true\n", "chunk_size", "an int"),
    ('chunk_size = "1000"\n', "chunk_size", "an int"),
    ("[cluster]\nn_workers = -1\n", "cluster.n_workers", "an int in 0..4096"),
    ("[cluster]\nthreads_per_worker = 0\n", "cluster.threads_per_worker", "an int in 1..1024"),
    ('[cluster]\nmemory_limit = "lots"\n', "cluster.memory_limit", "a str"),
    ("[cluster]\nmemory_limit = 4\n", "cluster.memory_limit", "a str"),
    ("[cluster]\nscheduler = 8786\n", "cluster.scheduler", "a str"),
    ('[rv]\nweighting = "inverse"\n', "rv.weighting", "a str, one of 'none', 'ivar'"),
    ('[rv]\nengine = "cuda"\n', "rv.engine", "a str, one of 'numba', 'torch'"),
    ("[rv]\nmask_tellurics = 1\n", "rv.mask_tellurics", "a bool"),
    ('[rv]\nmask_tellurics = "false"\n', "rv.mask_tellurics", "a bool"),
    ("[rv]\ntml_wave_max = 4000\n", "rv.tml_wave_max", "a float in 7500..7500"),
    ('[rv]\ntml_wave_max = "7500"\n', "rv.tml_wave_max", "a float"),
    ('[rv]\ndevice = "cuda 0"\n', "rv.device", "a str (empty or like"),
    ('[ml]\ndevice = "gpu!"\n', "ml.device", "a str (empty or like"),
    ("[ml]\nbatch_size = 0\n", "ml.batch_size", "an int in 1..1000000"),
    ("[ml]\nbatch_size = 1.5\n", "ml.batch_size", "an int"),
    ("[thresholds]\ntm_sigma = 0\n", "thresholds.tm_sigma", "a float > 0"),
    ("[thresholds]\ndsal_sigma = -1.0\n", "thresholds.dsal_sigma", "a float > 0"),
    ("[thresholds]\ninspect_abs_rv = nan\n", "thresholds.inspect_abs_rv", "a float > 0"),
    ("[thresholds]\ntm_sigma = inf\n", "thresholds.tm_sigma", "a float > 0"),
    ("[preprocess]\nmax_gap = 0\n", "preprocess.max_gap", "a float > 0 (or unset)"),
    ('[preprocess]\nmax_gap = "none"\n', "preprocess.max_gap", "a float (or unset)"),
    ('[preprocess]\nfill_value = "nan"\n', "preprocess.fill_value", "a float"),
    ('[numba]\ncache = "yes"\n', "numba.cache", "a bool"),
    ("[numba]\ncache_dir = false\n", "numba.cache_dir", "a str"),
    ("[models]\ndir = 1\n", "models.dir", "a str"),
    ("[templates]\nset = 2\n", "templates.set", "a str"),
    ("[gaia]\ntable = [1]\n", "gaia.table", "a str"),
    ("store = 5\n", "store", "a str"),
    ("run_dir = 2024-01-01\n", "run_dir", "a str"),
    ('sources = "a.fits"\n', "sources", "a list of str"),
    ('sources = ["a.fits", 1]\n', "sources[1]", "a non-empty str"),
    ('sources = ["a.fits", ""]\n', "sources[1]", "a non-empty str"),
    ("[store]\nx = 1\n", "store", "a str"),
    ("cluster = 3\n", "cluster", "a table"),
    ('rv = "fast"\n', "rv", "a table"),
    # unknown tables and keys
    ("[foo]\nx = 1\n", "foo", "one of the tables [cluster], [models]"),
    ("[rvs]\noversample = 3\n", "rvs", "one of the tables [cluster], [models]"),
    ("[rv]\noversampel = 3\n", "rv.oversampel", "one of the keys of [rv]: weighting, oversample"),
    ("[rv]\nchunk_size = 3\n", "rv.chunk_size", "one of the keys of [rv]"),
    ("chunksize = 3\n", "chunksize", "one of the top-level keys sources, store"),
    ("oversample = 3\n", "oversample", "one of the top-level keys sources, store"),
    ("[cluster.extra]\nx = 1\n", "cluster.extra", "one of the keys of [cluster]"),
]


@pytest.mark.parametrize("text,key,expected", BAD)
def test_errors_name_key_file_type(tmp_path, text, key, expected):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    err = info.value
    msg = str(err)
    assert isinstance(err, ValueError)
    assert msg.startswith(f"{path}: "), msg
    assert err.source == str(path)
    assert err.key == key, msg
    assert key in msg
    assert expected in msg, msg
    assert expected in err.expected or err.expected in expected


def test_error_message_exact(tmp_path):
    os.chdir(tmp_path)
    write(tmp_path, '[rv]\noversample = "69"\n')
    with pytest.raises(ConfigError) as info:
        load_config("run.toml")
    assert str(info.value) == "run.toml: rv.oversample must be an int, got str ('69')"


@pytest.mark.parametrize(
    "text,hint",
    [
        ("[rv]\noversampel = 3\n", "did you mean rv.oversample (an int in 1..10000)?"),
        ("[rvs]\noversample = 3\n", "did you mean [rv]?"),
        ("chunksize = 3\n", "did you mean chunk_size"),
        ("oversample = 3\n", "did you mean rv.oversample (in table [rv])?"),
        ("[rv]\nchunk_size = 3\n", "chunk_size is a top-level key"),
    ],
)
def test_unknown_key_hints(tmp_path, text, hint):
    with pytest.raises(ConfigError, match="unknown") as info:
        load_config(write(tmp_path, text))
    assert hint in str(info.value)


def test_bad_toml_and_missing_file(tmp_path):
    path = write(tmp_path, "[rv\noversample = 3\n")
    with pytest.raises(ConfigError, match=f"{path}: invalid TOML"):
        load_config(path)
    with pytest.raises(FileNotFoundError, match="nope.toml"):
        load_config(tmp_path / "nope.toml")


def test_from_dict_errors_name_source():
    with pytest.raises(ConfigError, match=r"^<dict>: rv\.engine must be"):
        Config.from_dict({"rv": {"engine": "jax"}})
    with pytest.raises(ConfigError, match=r"^mine: unknown key bogus"):
        Config.from_dict({"bogus": 1}, source="mine")
    with pytest.raises(ConfigError, match="must be a table"):
        Config.from_dict([1, 2])


def test_int_for_float_ok(tmp_path):
    c = load_config(write(tmp_path, "[rv]\ntml_wave_max = 7500\n[thresholds]\ntm_sigma = 4\n"))
    assert c.rv.tml_wave_max == 7500.0 and isinstance(c.rv.tml_wave_max, float)
    assert c.thresholds.tm_sigma == 4.0 and isinstance(c.thresholds.tm_sigma, float)


@pytest.mark.parametrize("value", ["auto", "AUTO", "4GB", "4 GiB", "512MB", "0", "1e9"])
def test_memory_limit_forms(value):
    assert Config.from_dict({"cluster": {"memory_limit": value}}).cluster.memory_limit in (
        value,
        "auto",
    )


# -------------------------------------------------------------------------------- paths


def test_relative_paths_resolve_against_config_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    cdir = tmp_path / "configs" / "sub"
    text = """
sources = ["fits/*.fits.gz", "/abs/cat.csv", "~/more/*.fits", "s3://bucket/x.fits"]
store = "spectra.zarr"
run_dir = "../runs/r1"

[models]
dir = "~/models"

[templates]
set = "lib/templates.zarr"

[gaia]
table = "./gaia.parquet"

[numba]
cache_dir = "cache"
"""
    monkeypatch.chdir(tmp_path)
    c = load_config(write(tmp_path, text, "configs/sub/run.toml"))
    assert c.sources == (
        str(cdir / "fits/*.fits.gz"),
        "/abs/cat.csv",
        str(tmp_path / "home/more/*.fits"),
        "s3://bucket/x.fits",
    )
    assert c.store == str(cdir / "spectra.zarr")
    assert c.run_dir == str(tmp_path / "configs/runs/r1")
    assert c.models.dir == str(tmp_path / "home/models")
    assert c.templates.set == str(cdir / "lib/templates.zarr")
    assert c.gaia.table == str(cdir / "gaia.parquet")
    assert c.numba.cache_dir == str(cdir / "cache")
    # the same file loaded via a relative path from elsewhere resolves the same way
    monkeypatch.chdir(cdir)
    assert load_config("run.toml") == c
    # round trip of the resolved (absolute) configuration
    assert load_config(write(tmp_path, c.to_toml(), "elsewhere/x.toml")) == c


def test_names_and_empty_strings_are_not_paths(tmp_path):
    text = '[templates]\nset = "demo"\n[models]\ndir = ""\n[gaia]\ntable = ""\n'
    c = load_config(write(tmp_path, text))
    assert (c.templates.set, c.models.dir, c.gaia.table, c.store) == ("demo", "", "", "")
    assert load_config(write(tmp_path, '[templates]\nset = "real"\n')).templates.set == "real"


def test_from_dict_paths(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    c = Config.from_dict({"store": "a.zarr", "run_dir": "~/r"})
    assert (c.store, c.run_dir) == ("a.zarr", str(tmp_path / "r"))
    c = Config.from_dict({"store": "a.zarr"}, base_dir=tmp_path / "x")
    assert c.store == str(tmp_path / "x" / "a.zarr")


# -------------------------------------------------------------------------------- hashes


def test_section_hash_changes_only_with_its_section():
    base = Config()
    names = ["run", *SECTIONS]
    h0 = {n: base.section_hash(n) for n in names}
    assert all(len(h) == 64 for h in h0.values())
    assert len(set(h0.values())) == len(names)
    changes = {
        "run": {"chunk_size": 999},
        "cluster": {"cluster.n_workers": 3},
        "models": {"models.dir": "/m"},
        "templates": {"templates.set": "demo"},
        "gaia": {"gaia.table": "/g.parquet"},
        "preprocess": {"preprocess.max_gap": 4.0},
        "rv": {"rv.oversample": 70},
        "ml": {"ml.batch_size": 8},
        "thresholds": {"thresholds.tm_sigma": 3.5},
        "numba": {"numba.cache": False},
        "selection": {"selection.entry": "all"},
    }
    assert set(changes) == set(names)
    for changed, kw in changes.items():
        c = base.replace(**kw)
        for n in names:
            assert (c.section_hash(n) != h0[n]) == (n == changed), (changed, n)
        assert c.hash() != base.hash()
    # deterministic, independent of construction path; canonical JSON sha256
    assert Config.from_dict(base.to_dict()).section_hash("rv") == h0["rv"]
    canon = json.dumps(base.rv.to_dict(), sort_keys=True, separators=(",", ":"))
    assert h0["rv"] == hashlib.sha256(canon.encode()).hexdigest()
    assert base.section_hash("run") != base.replace(sources=["/x"]).section_hash("run")
    with pytest.raises(KeyError, match="unknown config section"):
        base.section_hash("nope")


def test_hash_selected_sections():
    base = Config()
    c = base.replace(cluster={"n_workers": 7})
    assert c.hash() != base.hash()
    assert c.hash(["rv", "preprocess"]) == base.hash(["rv", "preprocess"])
    assert c.hash(["cluster"]) != base.hash(["cluster"])


# ------------------------------------------------------------------------------- replace


def test_replace():
    base = custom()
    c = base.replace(chunk_size=10, rv={"engine": "numba"}, **{"ml.batch_size": 3})
    assert (c.chunk_size, c.rv.engine, c.ml.batch_size) == (10, "numba", 3)
    assert c.rv.oversample == base.rv.oversample  # merged, not reset
    assert base.chunk_size == 500  # unchanged
    c2 = base.replace(rv=C.RVConfig())
    assert c2.rv == Config().rv
    with pytest.raises(ConfigError, match=r"^<replace>: rv\.oversample must be an int"):
        base.replace(**{"rv.oversample": "x"})
    with pytest.raises(ConfigError, match="unknown key"):
        base.replace(bogus=1)
    with pytest.raises(ConfigError, match="unknown"):
        base.replace(**{"nope.x": 1})


def test_check_complete():
    with pytest.raises(ConfigError, match="store is required"):
        Config().check_complete()
    with pytest.raises(ConfigError, match="run_dir is required"):
        Config(store="/s.zarr").check_complete()
    c = Config(store="/s.zarr", run_dir="/r")
    assert c.check_complete() is c


# -------------------------------------------------------------------------- save_resolved


def test_save_resolved(tmp_path):
    c = custom()
    out = save_resolved(c, tmp_path / "new" / "run")
    assert out == tmp_path / "new" / "run" / "config.resolved.toml"
    assert out.is_file()
    assert load_config(out) == c
    assert c.hash() in out.read_text().splitlines()[0]
    assert [p.name for p in out.parent.iterdir()] == ["config.resolved.toml"]  # no temp left
    # overwrite with a changed configuration
    c2 = c.replace(chunk_size=7)
    assert load_config(save_resolved(c2, tmp_path / "new" / "run")) == c2


# ---------------------------------------------------------------------------- docs page


def test_docs_page_is_generated():
    page = (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
    assert page == config_reference_markdown(), (
        "docs/configuration.md is stale: python -m mspec.config > docs/configuration.md"
    )


def test_reference_lists_every_key():
    md = config_reference_markdown()
    for key in C._all_keys():
        assert f"| `{key}` |" in md, key
