"""Optional torch path for template matching (GPU when present): the χ² sums on the device.

The expensive part of TM is the χ² of every (template, trial RV) and of the best template's
dense curve for the shift step: batched matrix products of the per-spectrum moment weights
(w x^k O, w x^p) with the shifted templates, then batched 5×5 solves — the same normal
equations as the numba kernel, in float64. The cheap sequential parts (Gaussian fits,
best-template choice, the 1001 re-measurements, the statistical error) run in the numba
helpers of :mod:`mspec.rv.chi2_kernels` on the host, so the results equal
:func:`mspec.rv.tm_engine.match_arrays` to rounding (tested on CPU torch; a CUDA test
runs when a GPU is present).
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

from mspec.rv import chi2_kernels as K
from mspec.rv.tm_engine import prepared

__all__ = ["match_arrays_torch"]


def _torch():
    import torch

    return torch


def _chi2_batch(torch, P, Q, S, sumo2, nval):
    """χ² for every spectrum b and template row m: P (B,5,n), Q (B,9,n), S (B|1, M, n)."""
    b = (
        torch.einsum("bkn,bmn->bmk", P, S)
        if S.shape[0] > 1
        else torch.einsum("bkn,mn->bmk", P, S[0])
    )
    s2 = S * S
    a = (
        torch.einsum("bpn,bmn->bmp", Q, s2)
        if S.shape[0] > 1
        else torch.einsum("bpn,mn->bmp", Q, s2[0])
    )
    idx = torch.arange(5, device=P.device)
    hank = a[..., idx[:, None] + idx[None, :]]  # (B, M, 5, 5)
    coef, info = torch.linalg.solve_ex(hank, b.unsqueeze(-1))
    btc = (b * coef.squeeze(-1)).sum(-1)
    chi2 = (sumo2[:, None] - btc) / nval[:, None]
    return torch.where(info == 0, chi2, torch.full_like(chi2, math.nan))


@njit(nogil=True)
def _select(curves, vt, halfwidth, best, best_mu, best_chi, tshow, status):
    """Step 1 from the χ² curves ``(B, T, 21)``: best template, initial RV, status."""
    for s in range(curves.shape[0]):
        ntpl = curves.shape[1]
        bt = -1
        bchi = np.inf
        bmu = math.nan
        code_fail = K.STATUS_FIT_FAILED
        bsamp = np.inf
        bsamp_t = 0
        for t in range(ntpl):
            c = curves[s, t]
            mu, ymin, code = K._fit_curve(vt, c, halfwidth)
            smin = np.inf
            for q in range(c.size):
                if c[q] < smin:
                    smin = c[q]
            if smin < bsamp:
                bsamp = smin
                bsamp_t = t
            if code == K.STATUS_OK and ymin < bchi:
                bchi = ymin
                bt = t
                bmu = mu
            elif code == K.STATUS_EDGE and bt < 0:
                code_fail = K.STATUS_EDGE
        ts = bt if bt >= 0 else bsamp_t
        tshow[s] = ts
        c = curves[s, ts]
        cmax = -np.inf
        cmin = np.inf
        for q in range(c.size):
            cmax = max(cmax, c[q])
            cmin = min(cmin, c[q])
        best[s] = ts
        best_chi[s] = cmin
        best_mu[s] = math.nan
        if not (cmax - cmin > 1e-12 * abs(cmax)):
            status[s] = K.STATUS_FLAT_CHI2
        elif bt < 0:
            status[s] = code_fail
        else:
            status[s] = K.STATUS_OK
            best_mu[s] = bmu
            best_chi[s] = bchi


@njit(nogil=True)
def _finish(dense, m0, mlo, mt, vt, ms, vs, halfwidth, h):
    """Step 2 from the dense χ² curve: (rv, err, status)."""
    ntr = mt.size
    curve = np.empty(ntr)
    res = np.empty(ms.size)
    nok = 0
    acc = 0.0
    c = 299792.458
    for si in range(ms.size):
        for q in range(ntr):
            curve[q] = dense[m0 + mt[q] - ms[si] - mlo]
        mu, ymin, code = K._fit_curve(vt, curve, halfwidth)
        if code == K.STATUS_OK:
            e = c * ((1.0 + mu / c) / (1.0 + vs[si] / c) - 1.0)
            res[nok] = e
            acc += e
            nok += 1
    if 2 * nok < ms.size:
        return math.nan, math.nan, K.STATUS_SHIFT_FAILED
    mean = acc / nok
    acc2 = 0.0
    for i in range(nok):
        acc2 += (res[i] - mean) ** 2
    v0 = c * (10.0 ** (m0 * h) - 1.0)
    rv = c * ((1.0 + v0 / c) * (1.0 + mean / c) - 1.0)
    return rv, math.sqrt(acc2 / nok), K.STATUS_OK


@njit(nogil=True)
def _err_stat(flux, ivar, ormask, x, i0, n, use_ivar, ftpl, g0, lam_lat, jlo, k, h, rv):
    pw = np.empty((n, 5))
    qw = np.empty((n, 9))
    sumo2, nval = K._prep_obs(flux, ivar, ormask, x, i0, n, use_ivar, pw, qw)
    mf = int(np.rint(math.log10(1.0 + rv / 299792.458) / h))
    smid = np.empty(n)
    slo = np.empty(n)
    shi = np.empty(n)
    K._shifted(ftpl, g0, lam_lat, jlo, i0, n, k, mf, smid)
    K._shifted(ftpl, g0, lam_lat, jlo, i0, n, k, mf - 1, slo)
    K._shifted(ftpl, g0, lam_lat, jlo, i0, n, k, mf + 1, shi)
    b = np.empty(5)
    a = np.empty(9)
    coef = np.empty(5)
    K._chi2_slice(smid, 0, n, pw, qw, sumo2, nval, b, a, coef)
    dv = 299792.458 * (10.0 ** ((mf + 1) * h) - 10.0 ** ((mf - 1) * h))
    return K._stat_error(flux, i0, n, x, qw, smid, slo, shi, dv, coef)


def match_arrays_torch(
    flux,
    ivar,
    ormask,
    flux1a,
    wave1a,
    cfg: K.TMConfig,
    *,
    device=None,
    batch=64,
    dense_batch=4,
    token=None,
) -> dict:
    """Template matching with the χ² sums in torch (``device``: default CUDA if available).

    Same arguments and outputs as :func:`mspec.rv.tm_engine.match_arrays`.

    Parameters
    ----------
    device : str or torch.device, optional
        ``"cuda"``, ``"cpu"``...; default CUDA when available, else CPU.
    batch : int
        Spectra per device batch for step 1.
    dense_batch : int
        Spectra per batch of the shift step (each needs ~0.4 GB of device memory).
    """
    torch = _torch()
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    p = prepared(flux1a, wave1a, cfg, token)
    flux = np.ascontiguousarray(np.atleast_2d(flux), dtype=np.float64)
    ivar = np.ascontiguousarray(np.atleast_2d(ivar), dtype=np.float64)
    ormask = np.ascontiguousarray(cfg.apply_mask(np.atleast_2d(ormask)), dtype=np.int64)
    ns = flux.shape[0]
    i0, n, k, h = p["i0"], p["n"], cfg.oversample, cfg.h
    mt, vt, ms, vs = p["mt"], p["vt"], p["ms"], p["vs"]
    ntpl, ntr = p["trials"].shape[:2]
    use_ivar = cfg.weighting == "ivar"
    out = dict(
        rv=np.full(ns, np.nan),
        err=np.full(ns, np.nan),
        err_stat=np.full(ns, np.nan),
        template=np.full(ns, -1, np.int32),
        chi2_min=np.full(ns, np.nan),
        chi2=np.full((ns, ntr), np.nan),
        status=np.zeros(ns, np.int8),
    )
    st = torch.as_tensor(p["trials"].reshape(ntpl * ntr, n), device=dev)
    xs = torch.as_tensor(p["x"], device=dev)
    xp = torch.stack([xs**j for j in range(9)])  # (9, n)
    lam_lat = torch.as_tensor(p["lam_lat"], device=dev)
    f1 = torch.as_tensor(p["flux1a"], device=dev)
    g0 = p["g0"]
    span = int(mt.max() - mt.min() + ms.max() - ms.min()) + 1
    for s0 in range(0, ns, batch):
        sl = slice(s0, min(ns, s0 + batch))
        o = flux[sl, i0 : i0 + n]
        iv = ivar[sl, i0 : i0 + n]
        good = (ormask[sl, i0 : i0 + n] == 0) & (iv > 0) & np.isfinite(o) & np.isfinite(iv)
        w = np.where(good, iv if use_ivar else 1.0, 0.0)
        o = np.where(good, o, 0.0)
        nval = good.sum(axis=1)
        wt = torch.as_tensor(w, device=dev)
        obs = torch.as_tensor(o, device=dev)
        Q = wt[:, None, :] * xp[None]
        P = (wt * obs)[:, None, :] * xp[None, :5]
        sumo2 = (wt * obs * obs).sum(-1)
        nv = torch.as_tensor(np.maximum(nval, 1).astype(np.float64), device=dev)
        curves = _chi2_batch(torch, P, Q, st[None], sumo2, nv).reshape(-1, ntpl, ntr)
        curves = curves.cpu().numpy()
        nb = curves.shape[0]
        best = np.empty(nb, np.int64)
        best_mu = np.empty(nb)
        best_chi = np.empty(nb)
        tshow = np.empty(nb, np.int64)
        status = np.empty(nb, np.int8)
        _select(curves, vt, cfg.fit_halfwidth, best, best_mu, best_chi, tshow, status)
        nocov = nval < cfg.min_pixels
        status[nocov] = K.STATUS_NO_COVERAGE
        idx = np.arange(sl.start, sl.stop)
        out["status"][idx] = status
        out["template"][idx] = np.where(nocov, -1, tshow)
        out["chi2"][idx] = np.where(nocov[:, None], np.nan, curves[np.arange(nb), tshow])
        out["chi2_min"][idx] = np.where(nocov, np.nan, best_chi)
        ok = np.nonzero(status == K.STATUS_OK)[0]
        if ok.size == 0:
            continue
        # step 2: dense χ² curve of each spectrum's best template over its lattice range,
        # a few spectra at a time (each holds span x window float64 shifted templates)
        m0 = np.rint(np.log10(1.0 + best_mu[ok] / K.C_KMS) / h).astype(np.int64)
        mlo = m0 + mt.min() - ms.max()
        lat = torch.as_tensor((np.arange(i0, i0 + n) * k - p["jlo"]).astype(np.int64), device=dev)
        dense = np.empty((ok.size, span))
        for d0 in range(0, ok.size, dense_batch):
            sub = slice(d0, min(ok.size, d0 + dense_batch))
            ms_t = torch.as_tensor(mlo[sub, None] + np.arange(span)[None], device=dev)
            jj = lat[None, None, :] - ms_t[:, :, None]  # (b, span, n) lattice positions
            u = lam_lat[jj] - g0
            kk = torch.clamp(torch.floor(u).long(), 0, f1.shape[1] - 2)
            fr = u - kk
            del u
            rows = f1[torch.as_tensor(best[ok[sub]], device=dev)]  # (b, G)
            nb_ = rows.shape[0]
            lo_v = rows.gather(1, kk.reshape(nb_, -1)).reshape(kk.shape)
            hi_v = rows.gather(1, (kk + 1).reshape(nb_, -1)).reshape(kk.shape)
            S = lo_v * (1.0 - fr) + hi_v * fr
            del lo_v, hi_v, kk, fr, jj
            okt = torch.as_tensor(ok[sub], device=dev)
            dense[sub] = _chi2_batch(torch, P[okt], Q[okt], S, sumo2[okt], nv[okt]).cpu().numpy()
        for j, b in enumerate(ok):
            gi = sl.start + b
            rv, err, code = _finish(
                dense[j], int(m0[j]), int(mlo[j]), mt, vt, ms, vs, cfg.fit_halfwidth, h
            )
            out["status"][gi] = code
            if code != K.STATUS_OK:
                continue
            out["rv"][gi] = rv
            out["err"][gi] = err
            out["err_stat"][gi] = _err_stat(
                flux[gi],
                ivar[gi],
                ormask[gi],
                p["x"],
                i0,
                n,
                use_ivar,
                p["flux1a"][best[b]],
                g0,
                p["lam_lat"],
                p["jlo"],
                k,
                h,
                rv,
            )
    return out
