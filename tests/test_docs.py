"""The documentation site builds without warnings; generated pages match their generators."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


def _mkdocs_missing() -> str:
    for mod in ("mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers.python"):
        try:
            __import__(mod)
        except ImportError:
            return mod
    return ""


def test_cli_page_is_generated():
    from mspec.cli import cli_reference_markdown

    assert (DOCS / "cli.md").read_text() == cli_reference_markdown(), (
        "docs/cli.md is out of date: regenerate it from mspec.cli.cli_reference_markdown()"
    )


def test_configuration_page_is_generated():
    from mspec.config import config_reference_markdown

    assert (DOCS / "configuration.md").read_text() == config_reference_markdown()


def test_nav_entries_exist():
    """Every nav entry of mkdocs.yml exists (or is an optional page not written yet).

    Pages not in the nav are appended under "More" by scripts/mkdocs_hooks.py.
    """
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        from mkdocs_hooks import OPTIONAL_PAGES
    finally:
        sys.path.pop(0)
    text = (ROOT / "mkdocs.yml").read_text()
    nav = text.split("\nnav:", 1)[1]
    listed = set(re.findall(r"([\w/.-]+\.md)\s*$", nav, flags=re.M))
    pages = {p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md")}
    assert listed - pages - OPTIONAL_PAGES == set(), "nav entries without a page"


def test_method_page_covers_the_paper_modules():
    text = (DOCS / "method.md").read_text()
    for part in ("preprocess", "SCM", "DGCM", "RVMM", "SPMM", "Deviations", "by eye"):
        assert part in text, part


@pytest.mark.slow
def test_site_builds_strict(tmp_path):
    missing = _mkdocs_missing()
    if missing:
        pytest.skip(f"{missing} is not installed (pip install -e '.[dev]' installs the docs tools)")
    exe = shutil.which("mkdocs", path=str(Path(sys.executable).parent)) or "mkdocs"
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    res = subprocess.run(
        [exe, "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    log = res.stdout + res.stderr
    assert res.returncode == 0, log[-5000:]
    assert "WARNING" not in log, log[-5000:]
    site = tmp_path / "site"
    for page in ("index.html", "method.html", "cli.html", "configuration.html",
                 "reference/mspec.html", "reference/rv.html", "benchmarks.html"):  # fmt: skip
        assert (site / page).exists(), page
    api = (site / "reference" / "mspec.html").read_text()
    # mkdocstrings rendered the numpydoc docstrings: signatures and parameter tables
    assert "template_match" in api and "Parameters" in api
    # the stage contract's merge keyword is in the rendered signature (scripts/griffe_stage.py)
    assert "merge" in (site / "reference" / "rv.html").read_text()
