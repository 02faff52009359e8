"""Torch-free definitions shared by the CNNs, their training and inference: the class lists,
the CNN-TLMA labels, the default architecture and the network input.

Graph building (:func:`mspec.ml.predict` on a lazy Dataset, the pipeline's SCM/DGCM/SPMM
stages) needs only these, so a run's driver process never imports torch (~180 MiB); the
networks themselves (:mod:`mspec.ml.models`) are built on the workers.
"""

from __future__ import annotations

import xarray as xr

__all__ = [
    "KINDS",
    "CLASSES",
    "TLMA_LABELS",
    "DEFAULT_ARCH",
    "n_outputs",
    "network_input",
    "state_shapes",
]

#: Class lists of the classifiers, in output order.
CLASSES: dict[str, tuple[str, ...]] = {
    "spt": ("OB", "A", "F", "G", "K", "M", "GALAXY", "QSO"),
    "wdm": ("WD", "M"),
    "dmgm": ("dM", "gM"),
}
#: Labels of the CNN-TLMA regressor, in output order (z-scored during training).
TLMA_LABELS: tuple[str, ...] = ("teff", "logg", "m_h", "alpha_m")
#: Every model kind.
KINDS: tuple[str, ...] = (*CLASSES, "tlma")

#: Default architecture (see module docstring).
DEFAULT_ARCH: dict = {
    "n_in": 5000,
    "channels": (8, 16, 32, 32),
    "kernels": (9, 7, 5, 3),
    "pool": 4,
    "dropout": 0.0,
}


def n_outputs(kind: str) -> int:
    """Number of network outputs for a model ``kind`` (``"spt"``, ``"wdm"``, ``"dmgm"``, ``"tlma"``)."""
    if kind in CLASSES:
        return len(CLASSES[kind])
    if kind == "tlma":
        return len(TLMA_LABELS)
    raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")


def network_input(ds) -> xr.DataArray:
    """Return ``ds["flux_grid"]`` after checking it is a (spectra, grid) input for the CNNs.

    Raises
    ------
    TypeError, ValueError
        If ``ds`` is not a Dataset or lacks a ``flux_grid`` with dims (spectra, grid).
    """
    if not isinstance(ds, xr.Dataset):
        raise TypeError(f"ds must be an xarray.Dataset, got {type(ds).__name__}")
    if "flux_grid" not in ds:
        raise ValueError(
            "ds has no 'flux_grid': preprocess it first (mspec.preprocess(ds, recipe='cnn') for the "
            "classifiers, mspec.preprocess(ds, recipe='tlma', rv=...) for CNN-TLMA)"
        )
    fg = ds["flux_grid"]
    if fg.dims != ("spectra", "grid"):
        raise ValueError(f"flux_grid must have dims ('spectra', 'grid'), got {fg.dims}")
    return fg


def state_shapes(kind: str, **arch) -> dict[str, tuple[int, ...]]:
    """Shapes of the tensors of a ``kind`` network's state dict, without building it.

    Lets a weights file be checked against its metadata where torch is not imported (a
    run's driver). Must match :class:`mspec.ml.models.SpectrumCNN` (a test builds both).

    Parameters
    ----------
    kind : {"spt", "wdm", "dmgm", "tlma"}
        The model kind (sets the number of outputs).
    **arch
        Overrides of :data:`DEFAULT_ARCH`.

    Returns
    -------
    dict
        Tensor name -> shape.

    Raises
    ------
    ValueError, TypeError
        An unknown kind or architecture argument, or values no network can have.
    """
    unknown = set(arch) - set(DEFAULT_ARCH)
    if unknown:
        raise ValueError(f"unknown architecture argument(s) {sorted(unknown)}")
    a = {**DEFAULT_ARCH, **arch}
    channels, kernels = tuple(int(c) for c in a["channels"]), tuple(int(k) for k in a["kernels"])
    pool, length = int(a["pool"]), int(a["n_in"])
    if len(channels) != 4 or len(kernels) != 4 or pool < 1 or min(channels) < 1:
        raise ValueError(f"not a valid architecture: {a}")
    for _ in range(4):
        length //= pool
    if length < 1:
        raise ValueError(f"n_in={a['n_in']} is too short for 4 poolings by {pool}")
    out: dict[str, tuple[int, ...]] = {}
    c_in = 1
    for i, (c, k) in enumerate(zip(channels, kernels)):
        # SpectrumCNN.features: [conv, max-pool, ReLU] per block
        out[f"features.{3 * i}.weight"] = (c, c_in, k)
        out[f"features.{3 * i}.bias"] = (c,)
        c_in = c
    n_out = n_outputs(kind)
    out["fc.weight"] = (n_out, c_in * length)
    out["fc.bias"] = (n_out,)
    return out
