"""The CNN models a run uses: a user's directory, or the default simulator-trained set.

A run needs CNN-SPT, CNN-WDM, CNN-dMgM and the CNN-TLMA pair. When the configuration names
no model directory, the default models are trained once on the simulator into
``$XDG_CACHE_HOME/mspec/models/<simulator-version>/`` (``~/.cache/...``; ``MSPEC_MODELS_DIR``
overrides the parent) and reused by every later run. ``mspec models build|list|path``
manage them.
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


def default_models_dir(simulator_version: str | None = None) -> Path:
    """Directory of the default simulator-trained models.

    Parameters
    ----------
    simulator_version : str, optional
        Default :data:`mspec.simulate.SIMULATOR_VERSION`.

    Returns
    -------
    pathlib.Path
        ``<cache>/mspec/models/<simulator-version>`` (not created).
    """
    if simulator_version is None:
        from mspec.simulate import SIMULATOR_VERSION

        simulator_version = SIMULATOR_VERSION
    env = os.environ.get("MSPEC_MODELS_DIR")
    if env:
        base = Path(env).expanduser()
    else:
        cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        base = Path(cache) / "mspec" / "models"
    return base / f"sim-{simulator_version}"


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
    n_train: int = 6000,
    epochs: int = 8,
    folds: int = 5,
    seed: int = 0,
    threads: int | None = 1,
    progress: bool = False,
    force: bool = False,
) -> Path:
    """Train the default CNNs on a simulated survey (once; reused afterwards).

    Parameters
    ----------
    out_dir : path-like, optional
        Where to write them (default :func:`default_models_dir`).
    n_train : int
        Simulated training spectra.
    epochs, folds, seed : int
        Maximum epochs per network, CNN-TLMA ensemble size, seed.
    threads : int, optional
        torch threads.
    progress : bool
        Print one line per epoch.
    force : bool
        Retrain even if the models exist.

    Returns
    -------
    pathlib.Path
        The model directory.
    """
    out = Path(out_dir) if out_dir is not None else default_models_dir()
    if n_train < 50:
        raise ValueError(f"n_train must be at least 50, got {n_train}")
    if models_ready(out) and not force:
        log.info("models in %s already built; reusing them", out)
        return out
    from mspec._version import __version__
    from mspec.ml.train import train_all_demo
    from mspec.simulate import SIMULATOR_VERSION, simulate_survey

    log.info("training the default CNNs on %d simulated spectra into %s", n_train, out)
    t0 = time.perf_counter()
    train = simulate_survey(n_train, seed=seed + 1)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        # an upper bound: early stopping may end a network before its last epoch
        bar = tqdm(total=epochs * (3 + 2 * folds), desc="train CNNs", unit="epoch")
    try:
        metrics = train_all_demo(
            train, out, epochs=epochs, folds=folds, seed=seed, threads=threads, progress=bar
        )
    finally:
        if bar is not None:
            bar.close()
    info = {
        "simulator_version": SIMULATOR_VERSION,
        "mspec_version": __version__,
        "n_train": n_train,
        "epochs": epochs,
        "folds": folds,
        "seed": seed,
        "seconds": round(time.perf_counter() - t0, 1),
        "val_accuracy": {
            k: metrics[k].get("val_accuracy") for k in ("spt", "wdm", "dmgm") if k in metrics
        },
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
