"""The four CNNs of Li et al. 2025: CNN-SPT, CNN-WDM, CNN-dMgM and CNN-TLMA.

All four share one architecture, as the paper describes: 4 convolution layers, each followed by
ReLU and a max-pooling layer, then 1 fully connected layer (the code pools before the ReLU:
identical result, since ReLU is monotonic, and 4x less work). The input is one preprocessed
spectrum, ``flux_grid`` (z-scored flux on the 1 A grid 3900-8899 A, 5000 pixels). Classifiers
output logits over their class list (softmax is applied at inference); CNN-TLMA outputs the 4
z-scored labels (Teff, logg, [M/H], [alpha/M]).

The paper gives no channel counts or kernel sizes; the defaults here (8-16-32-32 channels,
kernels 9-7-5-3, pooling by 4) are small enough for > 2,000 spectra/s per CPU core at
inference and reach the paper's accuracies on simulated data (see docs/ml.md). Every size is
a parameter and is stored in the model metadata, so a saved model always rebuilds exactly.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from mspec.ml.base import (  # noqa: F401 - re-exported: part of this module's API
    CLASSES,
    DEFAULT_ARCH,
    KINDS,
    TLMA_LABELS,
    n_outputs,
    network_input,
)

__all__ = [
    "KINDS",
    "CLASSES",
    "TLMA_LABELS",
    "DEFAULT_ARCH",
    "SpectrumCNN",
    "build_model",
    "n_outputs",
    "count_parameters",
]


class SpectrumCNN(nn.Module):
    """1-D CNN: 4 x (conv -> ReLU -> max-pool), then one fully connected layer.

    Parameters
    ----------
    n_out : int
        Number of outputs (classes for a classifier, labels for a regressor).
    n_in : int
        Input length in pixels (5000 for ``flux_grid``).
    channels : sequence of 4 int
        Output channels of the 4 convolution layers.
    kernels : sequence of 4 int
        Kernel sizes (pixels, odd: the convolutions are 'same'-padded).
    pool : int
        Max-pooling window and stride.
    dropout : float
        Dropout probability before the fully connected layer (0 disables it).

    Notes
    -----
    Input shape ``(batch, n_in)`` or ``(batch, 1, n_in)``; output ``(batch, n_out)``.
    """

    def __init__(
        self,
        n_out: int,
        n_in: int = 5000,
        channels: Sequence[int] = DEFAULT_ARCH["channels"],
        kernels: Sequence[int] = DEFAULT_ARCH["kernels"],
        pool: int = 4,
        dropout: float = 0.0,
    ):
        super().__init__()
        channels, kernels = tuple(int(c) for c in channels), tuple(int(k) for k in kernels)
        if len(channels) != 4 or len(kernels) != 4:
            raise ValueError(
                f"channels and kernels must have 4 entries each, got {channels} and {kernels}"
            )
        if any(c < 1 for c in channels):
            raise ValueError(f"channels must be positive, got {channels}")
        if any(k < 1 or k % 2 == 0 for k in kernels):
            raise ValueError(f"kernels must be positive odd integers, got {kernels}")
        if int(pool) < 1:
            raise ValueError(f"pool must be >= 1, got {pool}")
        if int(n_out) < 1:
            raise ValueError(f"n_out must be >= 1, got {n_out}")
        if not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        length = int(n_in)
        for _ in range(4):
            length //= int(pool)
        if length < 1:
            raise ValueError(f"n_in={n_in} is too short for 4 poolings by {pool}")
        layers: list[nn.Module] = []
        c_in = 1
        for c, k in zip(channels, kernels):
            # max-pool then ReLU == ReLU then max-pool (ReLU is monotonic), 4x fewer ReLUs
            layers += [nn.Conv1d(c_in, c, k, padding=k // 2), nn.MaxPool1d(int(pool))]
            layers.append(nn.ReLU(inplace=True))
            c_in = c
        self.features = nn.Sequential(*layers)
        self.dropout = nn.Dropout(float(dropout)) if dropout > 0 else nn.Identity()
        self.fc = nn.Linear(c_in * length, int(n_out))
        self.n_in, self.n_out = int(n_in), int(n_out)
        self.arch = {
            "n_in": int(n_in),
            "channels": list(channels),
            "kernels": list(kernels),
            "pool": int(pool),
            "dropout": float(dropout),
        }

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:
            x = x.unsqueeze(1)
        x = self.features(x)
        return self.fc(self.dropout(torch.flatten(x, 1)))


def build_model(kind: str, **arch) -> SpectrumCNN:
    """Build the network for a model ``kind`` with the default architecture, overridden by ``arch``.

    Parameters
    ----------
    kind : {"spt", "wdm", "dmgm", "tlma"}
        Which network: the classifiers output one logit per class of :data:`CLASSES`;
        ``"tlma"`` outputs the 4 z-scored labels of :data:`TLMA_LABELS`.
    **arch
        Overrides of :data:`DEFAULT_ARCH` (``n_in``, ``channels``, ``kernels``, ``pool``,
        ``dropout``).

    Returns
    -------
    SpectrumCNN
    """
    unknown = set(arch) - set(DEFAULT_ARCH)
    if unknown:
        raise ValueError(f"unknown architecture argument(s) {sorted(unknown)}")
    return SpectrumCNN(n_outputs(kind), **{**DEFAULT_ARCH, **arch})


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters of ``model``."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
