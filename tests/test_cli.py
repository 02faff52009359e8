"""The command line: version, help, one-line errors, generated reference page."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from mspec import __version__
from mspec.cli import cli_reference_markdown, main
from mspec.config import Config, default_toml, load_config

ROOT = Path(__file__).resolve().parents[1]


def _mspec(*args):
    return subprocess.run(
        [sys.executable, "-m", "mspec.cli", *args], capture_output=True, text=True, timeout=120
    )


def test_version():
    out = _mspec("--version")
    assert out.returncode == 0 and out.stdout.strip() == f"mspec {__version__}"


def test_demo_help_shows_defaults():
    out = _mspec("demo", "--help")
    assert out.returncode == 0
    assert "(default: 3000)" in out.stdout and "(default: demo_output)" in out.stdout


@pytest.mark.parametrize(
    "args, needle",
    [
        (["demo", "--n-spectra", "x"], "--n-spectra"),
        (["frobnicate"], "frobnicate"),
        (["run"], "config"),
        (["demo", "--n-spectra", "3", "--out", "{tmp}"], "n_spectra"),
        (["info", "{tmp}/nothing"], "not an mspec store"),
    ],
)
def test_errors_are_one_line(tmp_path, args, needle):
    out = _mspec(*[a.replace("{tmp}", str(tmp_path)) for a in args])
    assert out.returncode == 2, out.stderr
    err = out.stderr.strip().splitlines()
    assert len(err) == 1 and needle in err[0] and "Traceback" not in out.stderr


def test_debug_shows_traceback(tmp_path):
    out = _mspec("--debug", "info", str(tmp_path / "nothing"))
    assert out.returncode != 0 and "Traceback" in out.stderr


def test_config_defaults_load_back(tmp_path, capsys):
    assert main(["config", "--defaults"]) == 0
    text = capsys.readouterr().out
    assert text == default_toml(commented=True)
    f = tmp_path / "run.toml"
    f.write_text(text)
    assert load_config(f) == Config()


def test_cli_reference_page_is_current():
    assert (ROOT / "docs" / "cli.md").read_text() == cli_reference_markdown()


def test_models_path(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("MSPEC_MODELS_DIR", str(tmp_path))
    assert main(["models", "path"]) == 0
    assert capsys.readouterr().out.strip().startswith(str(tmp_path))


def test_models_build_uses_the_recipe_sizes(monkeypatch, tmp_path, capsys):
    """`mspec models build` builds what `mspec run` would (build_default_models's own sizes);
    --n-train/--epochs override them."""
    import mspec.pipeline.models as pm

    calls = []

    def fake(out_dir=None, **kw):
        calls.append(kw)
        return tmp_path

    monkeypatch.setattr(pm, "build_default_models", fake)
    assert main(["models", "build", "--dir", str(tmp_path)]) == 0
    assert "n_train" not in calls[-1] and "epochs" not in calls[-1]
    assert main(["models", "build", "--dir", str(tmp_path), "--n-train", "500"]) == 0
    assert calls[-1]["n_train"] == 500 and "epochs" not in calls[-1]


def test_terminal_log_filter():
    import logging

    from mspec.cli import _for_terminal

    def rec(name, level):
        return logging.LogRecord(name, level, __file__, 1, "m", None, None)

    assert _for_terminal(rec("mspec.run", logging.INFO))
    assert _for_terminal(rec("distributed.worker", logging.WARNING))
    assert not _for_terminal(rec("distributed.worker", logging.INFO))
    assert not _for_terminal(rec("distributed.shuffle._scheduler_plugin", logging.WARNING))
    assert _for_terminal(rec("distributed.shuffle._scheduler_plugin", logging.ERROR))


def test_version_matches_package_metadata():
    import tomllib

    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert meta["project"]["version"] == __version__
