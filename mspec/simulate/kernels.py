"""Numba kernel of the simulator's template-bank evaluation (numpy reference:
:meth:`mspec.simulate.bank.Bank.evaluate_numpy`; they are tested against each other)."""

from __future__ import annotations

import math

import numba
import numpy as np

from mspec._numba import jit


@jit(parallel=True)
def evaluate_bank(flat, nf, g0, dg, idx, weights, shift, loglam, fid, taper, feat_coef, env_coef):
    """Flux ``(n, npix)`` of weighted template combinations with line-strength scaling.

    ``flat`` is the bank ``(n_templates * nf, 3)`` (flux, feature log-depth, envelope
    log-depth); ``feat_coef`` has one extra trailing column of zeros for pixels outside every
    feature window (``fid == -1``).
    """
    n, q = idx.shape
    npix = loglam.size
    nfeat = feat_coef.shape[1] - 1
    out = np.empty((n, npix))
    for r in numba.prange(n):
        for p in range(npix):
            x = (loglam[p] - shift[r] - g0) / dg
            i0 = int(math.floor(x))
            i0 = min(max(i0, 0), nf - 2)
            f = min(max(x - i0, 0.0), 1.0)
            t = 0.0
            lf = 0.0
            le = 0.0
            for k in range(q):
                w = weights[r, k]
                if w == 0.0:
                    continue
                j = idx[r, k] * nf + i0
                t += w * (flat[j, 0] + f * (flat[j + 1, 0] - flat[j, 0]))
                lf += w * (flat[j, 1] + f * (flat[j + 1, 1] - flat[j, 1]))
                le += w * (flat[j, 2] + f * (flat[j + 1, 2] - flat[j, 2]))
            c = fid[i0]
            if c < 0:
                c = nfeat
            expo = feat_coef[r, c] * taper[i0] * lf + env_coef[r] * le
            out[r, p] = t * math.exp(expo)
    return out
