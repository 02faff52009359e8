"""CNNs of Li et al. 2025: CNN-SPT, CNN-WDM, CNN-dMgM classifiers and CNN-TLMA ensembles.

- :mod:`mspec.ml.base`: the class lists, labels, default architecture and network input,
  without torch (what building an inference graph needs: a run's driver never imports torch).
- :mod:`mspec.ml.models`: the networks (4 conv + 4 max-pool + 1 fully connected layer).
- :mod:`mspec.ml.train`: training from a lazy (Zarr/dask) Dataset, chunk by chunk.
- :mod:`mspec.ml.infer`: lazy, batched inference over spectrum chunks (``map_blocks``).
- :mod:`mspec.ml.io`: model directories (safetensors weights + JSON metadata, no pickle).
- :mod:`mspec.ml.calibrate`: calibrated CNN-TLMA errors.
- :mod:`mspec.ml.labels`: label tables joined to a store (label transfer from real spectra).
- :mod:`mspec.ml.evaluate`: accuracy runs (per S/N_i bin, away from class boundaries).
- :mod:`mspec.ml.recipe`: the recipe of the default simulator-trained models.

torch is imported when a function is first used, so ``import mspec.ml`` stays cheap.
"""

from __future__ import annotations

import importlib

_LAZY = {
    "train_classifier": "mspec.ml.train",
    "train_regressor": "mspec.ml.train",
    "train_tlma_pair": "mspec.ml.train",
    "train_from_store": "mspec.ml.train",
    "train_all_demo": "mspec.ml.train",
    "train_default_models": "mspec.ml.recipe",
    "predict": "mspec.ml.infer",
    "predict_array": "mspec.ml.infer",
    "ModelFileError": "mspec.ml.io",
    "load_models": "mspec.ml.io",
    "build_model": "mspec.ml.models",
    "CLASSES": "mspec.ml.models",
    "TLMA_LABELS": "mspec.ml.models",
    "augment_batch": "mspec.ml.train",
    "join_labels": "mspec.ml.labels",
    "read_label_table": "mspec.ml.labels",
    "noise_proxy": "mspec.ml.calibrate",
    "fit_calibration": "mspec.ml.calibrate",
    "apply_calibration": "mspec.ml.calibrate",
    "CalibrationWarning": "mspec.ml.calibrate",
    "classifier_accuracy": "mspec.ml.evaluate",
    "inference_speed": "mspec.ml.evaluate",
    "tlma_accuracy": "mspec.ml.evaluate",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mspec.ml' has no attribute {name!r}")


def __dir__():
    return __all__
