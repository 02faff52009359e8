"""The Jupyter notebooks in examples/ execute (nbmake) and are committed without outputs."""

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "examples").glob("*.ipynb"))
EXPECTED = {
    "01_quickstart",
    "02_explore_store",
    "03_rv_diagnostics",
    "04_train_your_own",
    "05_catalog_dask",
}


def _load(path):
    return json.loads(path.read_text())


def test_the_notebooks_are_there():
    assert {p.stem for p in NOTEBOOKS} >= EXPECTED


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_committed_without_outputs(path):
    """Outputs are stripped in git (clear them before committing: Jupyter's "Clear All Outputs"
    or ``jupyter nbconvert --clear-output --inplace``)."""
    nb = _load(path)
    for i, cell in enumerate(nb["cells"]):
        if cell["cell_type"] != "code":
            continue
        assert cell.get("outputs") == [], f"cell {i} has outputs"
        assert cell.get("execution_count") is None, f"cell {i} has an execution count"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_parameter_cell_first(path):
    """The first code cell holds the parameters (tagged ``parameters``, papermill style)."""
    code = [c for c in _load(path)["cells"] if c["cell_type"] == "code"]
    assert code, "no code cell"
    first = code[0]
    assert "parameters" in first.get("metadata", {}).get("tags", [])
    src = "".join(first["source"])
    assert re.search(r"^[A-Z_]+ = ", src, flags=re.M), src


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_executes(path, tmp_path):
    """Run the notebook with nbmake in a separate pytest; a run that collects nothing fails."""
    assert importlib.util.find_spec("nbmake"), "nbmake (dev extras) is needed to run notebooks"
    env = dict(os.environ, TMPDIR=str(tmp_path), MPLBACKEND="Agg", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "pytest", "--nbmake", "--nbmake-timeout=600"]
    cmd += ["-p", "no:cacheprovider", "-q", "-o", "addopts=", str(path)]
    res = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=900, env=env)
    out = res.stdout + res.stderr
    # exit code 5 (nothing collected) or a skip must not pass
    assert res.returncode == 0, out[-6000:]
    assert re.search(r"\b1 passed\b", out), out[-3000:]
