"""The recipe of mspec's default simulator-trained CNNs (one function, shared by every caller).

:func:`train_default_models` is what :func:`mspec.pipeline.models.build_default_models`
(``mspec run`` without a model directory, ``mspec models build``) and the demo train. The
recipe has a version, :data:`MODEL_RECIPE_VERSION`, that is part of the default model
directory's name and of every model's metadata, so models trained with an older recipe are
never reused by mistake.

Recipe versions:

1. One default-mix survey (M-heavy, 8% of the M stars giants), 8 epochs, no augmentation.
   CNN-dMgM saw ~260 giants and reached 87% at S/N_i > 20; CNN-SPT 90% away from class
   boundaries (docs/accuracy.md).
2. Classifiers on a class-balanced survey (:data:`BALANCED_MIX`: every CNN-SPT class, white
   dwarfs, M dwarfs and M giants in equal numbers; S/N_i log-uniform in 5-150) with training
   augmentation (random RV shifts, flux-calibration trends, masked stretches); the CNN-TLMA
   dM/gM ensembles on a survey of their own (:data:`TLMA_MIX`, same S/N range), not
   augmented (augmenting them gave rare catastrophic Teff errors that broke the error
   calibration; docs/accuracy.md); every network in mini-batches of :data:`BATCH_SIZE` (32,
   not the paper's 128).
3. As 2, but the CNN-TLMA ensembles are trained with :data:`TLMA_AUGMENT` (RV shifts of
   N(0, 5 km/s) and flux-calibration trends of N(0, 0.15), no masked stretches): on the real
   DR7 M dwarfs the Teff scale is no longer compressed (slope on the true scale 1.00 against
   0.83, measured with an independent photometric tracer) with the simulated accuracy and
   error calibration unchanged (docs/accuracy.md, "Real spectra: the labels' noise and the
   CNN's true scale").
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

log = logging.getLogger("mspec.ml")

__all__ = [
    "MODEL_RECIPE_VERSION",
    "BALANCED_MIX",
    "TLMA_MIX",
    "TRAINING_SNR",
    "BATCH_SIZE",
    "TLMA_AUGMENT",
    "train_default_models",
]

#: Version of the default training recipe (module docstring); bump it when the recipe
#: changes so the default model directory changes with it.
MODEL_RECIPE_VERSION = 3
#: Classifier training mix: the 8 CNN-SPT classes + WD equally, M split into dwarfs and giants.
BALANCED_MIX = {
    "OB": 0.1, "A": 0.1, "F": 0.1, "G": 0.1, "K": 0.1, "GALAXY": 0.1, "QSO": 0.1, "WD": 0.1,
    "dM": 0.1, "gM": 0.1,
}  # fmt: skip
#: CNN-TLMA training mix: dwarfs (the accuracy goals are set for them) and giants.
TLMA_MIX = {"dM": 2 / 3, "gM": 1 / 3}
#: S/N_i range of the training surveys, drawn log-uniformly (per pixel, i band).
TRAINING_SNR = (5.0, 150.0)
#: Mini-batch size of every network: 4x the optimizer steps of the paper's 128 per epoch for
#: about the same compute; these small networks are limited by the number of steps at the
#: demo's sizes (docs/accuracy.md).
BATCH_SIZE = 32
#: CNN-TLMA training augmentation (:func:`mspec.ml.train.augment_batch`): the RV shift stands
#: for the rest-frame RV's error, the trends for LAMOST's flux-calibration errors, which the
#: simulator-trained networks otherwise read as Teff (a compressed Teff scale on real
#: spectra). Twice these trends (0.3), or masked stretches, gave rare confident Teff errors on
#: simulated spectra that broke the error calibration at S/N_i <= 10 (docs/accuracy.md).
TLMA_AUGMENT = {"rv_sigma": 5.0, "tilt": 0.15}


def _check_int(name: str, value, lo: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise ValueError(f"{name} must be an integer >= {lo}, got {value!r}")
    return value


def train_default_models(
    out_dir,
    *,
    n_train: int,
    epochs: int,
    n_tlma: int,
    tlma_epochs: int,
    folds: int,
    seed: int = 0,
    threads: int | None = 1,
    progress=False,
) -> dict:
    """Simulate the training surveys and train the default CNNs into ``out_dir``.

    Parameters
    ----------
    out_dir : path-like
        Parent directory: ``spt/``, ``wdm/``, ``dmgm/`` and the ``tlma/`` dM/gM pair.
    n_train : int
        Spectra of the class-balanced classifier survey (:data:`BALANCED_MIX`; CNN-SPT sees
        90% of them, CNN-WDM 30%, CNN-dMgM 20%).
    epochs : int
        Maximum epochs of each classifier.
    n_tlma : int
        Spectra of the CNN-TLMA survey (:data:`TLMA_MIX`: two thirds dwarfs).
    tlma_epochs : int
        Maximum epochs of each CNN-TLMA ensemble member.
    folds : int
        CNN-TLMA ensemble size (k-fold; >= 2).
    seed : int
        Seeds the surveys (``seed + 1`` classifiers, ``seed + 2`` CNN-TLMA) and the training.
    threads : int, optional
        torch threads while training (1: no OpenMP oversubscription on a shared machine).
    progress : bool or tqdm bar
        Print one line per epoch, or update a shared tqdm bar.

    Returns
    -------
    dict
        ``{"spt": metrics, "wdm": ..., "dmgm": ..., "tlma": {"dM": ..., "gM": ...},
        "seconds": {"simulate": s, "spt": s, ..., "tlma": s}, "cpu_seconds": {...},
        "recipe": {...}}`` (the recipe as recorded in ``models.json``).
    """
    from mspec.ml.models import TLMA_LABELS
    from mspec.ml.train import train_classifier, train_tlma_pair
    from mspec.preprocessing.steps import preprocess
    from mspec.simulate import SIMULATOR_VERSION, simulate_survey

    _check_int("n_train", n_train, 50)
    _check_int("n_tlma", n_tlma, 20)
    _check_int("epochs", epochs, 1)
    _check_int("tlma_epochs", tlma_epochs, 1)
    _check_int("folds", folds, 2)
    out = Path(out_dir)
    secs, cpu = {}, {}

    def _clock(key, t0, c0):
        secs[key] = round(time.perf_counter() - t0, 1)
        cpu[key] = round(time.process_time() - c0, 1)

    t0, c0 = time.perf_counter(), time.process_time()
    cls = simulate_survey(n_train, seed=seed + 1, mix=BALANCED_MIX, snr=TRAINING_SNR)
    tl_sim = simulate_survey(n_tlma, seed=seed + 2, mix=TLMA_MIX, snr=TRAINING_SNR)
    _clock("simulate", t0, c0)
    # recorded in every model.json: where the labels came from and with which recipe
    prov = {"training": "simulator", "simulator_version": SIMULATOR_VERSION,
            "model_recipe_version": MODEL_RECIPE_VERSION}  # fmt: skip
    common = {"seed": seed, "progress": progress, "threads": threads, "provenance": prov,
              "batch_size": BATCH_SIZE}  # fmt: skip
    res: dict = {}
    cnn = preprocess(cls, recipe="cnn")
    true_class = cls["true_class"].values
    for kind, lab in (("spt", true_class), ("wdm", true_class),
                      ("dmgm", cls["true_lumclass"].values)):  # fmt: skip
        t0, c0 = time.perf_counter(), time.process_time()
        res[kind] = train_classifier(cnn, lab, kind, out / kind, epochs=epochs, augment=True,
                                     **common)  # fmt: skip
        _clock(kind, t0, c0)
    t0, c0 = time.perf_counter(), time.process_time()
    tl = preprocess(tl_sim, recipe="tlma", rv=tl_sim["true_rv"])
    lab = {k: tl_sim[f"true_{k}"].values for k in TLMA_LABELS}
    res["tlma"] = train_tlma_pair(tl, lab, tl_sim["true_lumclass"].values, out / "tlma",
                                  folds=folds, epochs=tlma_epochs, augment=dict(TLMA_AUGMENT),
                                  **common)  # fmt: skip
    _clock("tlma", t0, c0)
    res["seconds"], res["cpu_seconds"] = secs, cpu
    res["recipe"] = {
        "version": MODEL_RECIPE_VERSION,
        "classifiers": {"survey": {"n": n_train, "seed": seed + 1, "mix": "BALANCED_MIX",
                                   "snr_i": list(TRAINING_SNR)},
                        "epochs": epochs, "augment": True, "batch_size": BATCH_SIZE},
        "tlma": {"survey": {"n": n_tlma, "seed": seed + 2, "mix": dict(TLMA_MIX),
                            "snr_i": list(TRAINING_SNR)},
                 "epochs": tlma_epochs, "folds": folds, "batch_size": BATCH_SIZE,
                 "augment": dict(TLMA_AUGMENT)},
        "seed": seed,
    }  # fmt: skip
    return res
