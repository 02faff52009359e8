"""The CNN models a run uses: a user's directory, or the default simulator-trained set.

A run needs CNN-SPT, CNN-WDM, CNN-dMgM and the CNN-TLMA pair. When the configuration names
no model directory, the default models are trained once on the simulator, with the recipe of
:func:`mspec.ml.recipe.train_default_models`, into
``$XDG_CACHE_HOME/mspec/models/sim-<simulator-version>-r<recipe-version>/`` (``~/.cache/...``;
``MSPEC_MODELS_DIR`` overrides the parent) and reused by every later run: a new simulator or a
new recipe gets a new directory. ``mspec models build|list|path`` manage them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path

log = logging.getLogger("mspec.models")

__all__ = [
    "KINDS",
    "ModelsMissingError",
    "default_models_dir",
    "models_ready",
    "missing_models",
    "build_default_models",
    "model_hashes",
    "list_models",
]

#: Model subdirectories a run needs.
KINDS = ("spt", "wdm", "dmgm", "tlma")


class ModelsMissingError(FileNotFoundError):
    """A model directory lacks one of the CNNs a run needs."""


def default_models_dir(
    simulator_version: str | None = None, recipe_version: int | None = None
) -> Path:
    """Directory of the default simulator-trained models.

    Parameters
    ----------
    simulator_version : str, optional
        Default :data:`mspec.simulate.SIMULATOR_VERSION`.
    recipe_version : int, optional
        Default :data:`mspec.ml.recipe.MODEL_RECIPE_VERSION`.

    Returns
    -------
    pathlib.Path
        ``<cache>/mspec/models/sim-<simulator-version>-r<recipe-version>`` (not created).
    """
    if simulator_version is None:
        from mspec.simulate import SIMULATOR_VERSION

        simulator_version = SIMULATOR_VERSION
    if recipe_version is None:
        from mspec.ml.recipe import MODEL_RECIPE_VERSION

        recipe_version = MODEL_RECIPE_VERSION
    env = os.environ.get("MSPEC_MODELS_DIR")
    if env:
        base = Path(env).expanduser()
    else:
        cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        base = Path(cache) / "mspec" / "models"
    return base / f"sim-{simulator_version}-r{recipe_version}"


def missing_models(model_dir) -> list[str]:
    """Kinds in :data:`KINDS` without a ``model.json`` under ``model_dir``."""
    d = Path(model_dir)
    return [k for k in KINDS if not (d / k / "model.json").is_file()]


def models_ready(model_dir) -> bool:
    """Whether ``model_dir`` holds every CNN a run needs."""
    return not missing_models(model_dir)


def model_hashes(model_dir) -> dict[str, str]:
    """sha256 of every file of every model under ``model_dir`` (relative path -> hex).

    Parameters
    ----------
    model_dir : path-like
        Directory with ``spt/``, ``wdm/``, ``dmgm/``, ``tlma/``.

    Returns
    -------
    dict
        Sorted by path; plots and logs (``*.png``, ``*.log``) are left out.
    """
    d = Path(model_dir)
    out = {}
    for p in sorted(d.rglob("*")):
        if p.is_file() and p.suffix not in (".png", ".log") and not p.name.startswith("."):
            out[str(p.relative_to(d))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def build_default_models(
    out_dir=None,
    *,
    n_train: int = 12000,
    epochs: int = 12,
    n_tlma: int | None = None,
    tlma_epochs: int | None = None,
    folds: int = 5,
    seed: int = 0,
    threads: int | None = 1,
    progress: bool = False,
    force: bool = False,
) -> Path:
    """Train the default CNNs on simulated surveys (once; reused afterwards).

    The recipe is :func:`mspec.ml.recipe.train_default_models` (version
    :data:`mspec.ml.recipe.MODEL_RECIPE_VERSION`): the classifiers on a class-balanced,
    augmented survey, the CNN-TLMA dM/gM ensembles on a dwarf + giant survey of their own.
    The defaults meet the simulated accuracy goals of docs/accuracy.md; the demo trains the
    same recipe at a smaller size.

    Parameters
    ----------
    out_dir : path-like, optional
        Where to write them (default :func:`default_models_dir`).
    n_train : int
        Spectra of the class-balanced classifier training survey.
    epochs : int
        Maximum epochs per classifier.
    n_tlma : int, optional
        Spectra of the CNN-TLMA training survey (two thirds dwarfs); default
        ``3 * n_train // 4``.
    tlma_epochs : int, optional
        Maximum epochs per CNN-TLMA ensemble member; default ``epochs``.
    folds : int
        CNN-TLMA ensemble size.
    seed : int
        Seed of the surveys and the training.
    threads : int, optional
        torch threads.
    progress : bool
        Show a progress bar (one step per epoch).
    force : bool
        Retrain even if the models exist.

    Returns
    -------
    pathlib.Path
        The model directory; ``models.json`` in it records the recipe (version, sizes,
        seeds), the simulator version and the training times.
    """
    out = Path(out_dir) if out_dir is not None else default_models_dir()
    if isinstance(n_train, bool) or not isinstance(n_train, int) or n_train < 50:
        raise ValueError(f"n_train must be an integer >= 50, got {n_train!r}")
    n_tlma = 3 * n_train // 4 if n_tlma is None else n_tlma
    tlma_epochs = epochs if tlma_epochs is None else tlma_epochs
    if models_ready(out) and not force:
        log.info("models in %s already built; reusing them", out)
        return out
    from mspec._version import __version__
    from mspec.ml.recipe import MODEL_RECIPE_VERSION, train_default_models
    from mspec.simulate import SIMULATOR_VERSION

    log.info("training the default CNNs (recipe %d) on %d + %d simulated spectra into %s",
             MODEL_RECIPE_VERSION, n_train, n_tlma, out)  # fmt: skip
    t0, c0 = time.perf_counter(), time.process_time()
    bar = None
    if progress:
        from tqdm.auto import tqdm

        # an upper bound: early stopping may end a network before its last epoch
        bar = tqdm(total=3 * epochs + 2 * folds * tlma_epochs, desc="train CNNs", unit="epoch")
    try:
        res = train_default_models(out, n_train=n_train, epochs=epochs, n_tlma=n_tlma,
                                   tlma_epochs=tlma_epochs, folds=folds, seed=seed,
                                   threads=threads, progress=bar)  # fmt: skip
    finally:
        if bar is not None:
            bar.close()
    info = {
        "simulator_version": SIMULATOR_VERSION,
        "model_recipe_version": MODEL_RECIPE_VERSION,
        "mspec_version": __version__,
        "n_train": n_train,
        "epochs": epochs,
        "n_tlma": n_tlma,
        "tlma_epochs": tlma_epochs,
        "folds": folds,
        "seed": seed,
        "threads": threads,
        "recipe": res["recipe"],
        "seconds": round(time.perf_counter() - t0, 1),
        "cpu_seconds": round(time.process_time() - c0, 1),
        "stage_seconds": res["seconds"],
        "stage_cpu_seconds": res["cpu_seconds"],
        "val_accuracy": {k: res[k].get("val_accuracy") for k in ("spt", "wdm", "dmgm") if k in res},
        "tlma_oof_rms": {p: m.get("rms") for p, m in res.get("tlma", {}).items()},
    }
    (out / "models.json").write_text(json.dumps(info, indent=1, default=str))
    log.info("default CNNs trained in %.0f s", info["seconds"])
    return out


def list_models(model_dir=None) -> dict:
    """Describe the models in ``model_dir`` (default: the default models).

    Returns
    -------
    dict
        ``{"dir": str, "ready": bool, "missing": [...], "info": {...}}``.
    """
    d = Path(model_dir) if model_dir is not None else default_models_dir()
    info = {}
    if (d / "models.json").is_file():
        info = json.loads((d / "models.json").read_text())
    return {"dir": str(d), "ready": models_ready(d), "missing": missing_models(d), "info": info}
