"""Calibrated CNN-TLMA errors: the ensemble std plus a noise-dependent term fitted on held-out spectra.

The paper's CNN-TLMA error is the standard deviation of the k-fold ensemble. Members trained on
90% overlapping data agree more than they are right, so that std underestimates the true error
(about 2x on simulated M dwarfs, more at low S/N, where the noise in the spectrum, which every
member sees the same way, dominates the error). mspec keeps the ensemble std (``<p>_err_ens``)
and adds a calibrated error (``<p>_err``)::

    err^2 = (c(nu) * err_ens)^2 + tau(nu)^2

where ``nu`` is a noise measure of the spectrum itself (:func:`noise_proxy`, so no S/N column
is needed at inference) and, per label, ``tau`` (an error floor added in quadrature) or ``c``
(a shrink factor, used only where the ensemble std alone is already too large) is fitted in
quantile bins of ``log nu`` so that the mean of ``(prediction - truth)^2 / err^2`` is 1 in
every bin of a calibration set the members did not train on (:func:`fit_calibration`).
Between bin centres ``tau^2`` and ``c`` are interpolated linearly in ``log nu`` (constant
beyond the outer centres). The fitted table is stored in the model's ``model.json``
(``"calibration"``); :func:`apply_calibration` evaluates it.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = [
    "CALIBRATION_VERSION",
    "CalibrationWarning",
    "noise_proxy",
    "fit_calibration",
    "apply_calibration",
    "pull_std",
]

#: Version of the calibration scheme recorded in ``model.json``.
CALIBRATION_VERSION = 1


def noise_proxy(x) -> np.ndarray:
    """Noise level of preprocessed spectra, measured from the spectra themselves.

    Robust pixel-to-pixel scatter of the z-scored ``flux_grid``: 1.4826 * median(|second
    difference|) / sqrt(6) (the std of white noise of unit variance gives 1 before the 1 A
    resampling, which correlates neighbouring pixels and lowers it by a constant factor).
    It grows as S/N falls and is relative to the spectrum's own contrast (the z-score), so it
    measures how much information the spectrum holds; it is what the calibration is binned in.

    Parameters
    ----------
    x : array-like, shape (n, npix) or (npix,)
        ``flux_grid`` values (z-scored flux, dimensionless); NaN pixels are ignored.

    Returns
    -------
    numpy.ndarray, shape (n,)
        Noise measure (dimensionless, in units of the spectrum's std); NaN for spectra with
        fewer than 10 finite second differences.
    """
    x = np.atleast_2d(np.asarray(x, dtype=np.float64))
    if x.ndim != 2:
        raise ValueError(f"x must be 1-D or 2-D, got {x.ndim} dimensions")
    n = x.shape[0]
    if x.shape[1] < 3 or n == 0:
        return np.full(n, np.nan)
    d = np.abs(x[:, 2:] - 2.0 * x[:, 1:-1] + x[:, :-2])
    good = np.isfinite(d)
    cnt = good.sum(axis=1)
    out = np.full(n, np.nan)
    ok = cnt >= 10
    if ok.any():
        if good[ok].all():
            med = np.median(d[ok], axis=1)
        else:
            med = np.nanmedian(np.where(good[ok], d[ok], np.nan), axis=1)
        out[ok] = 1.4826 * med / math.sqrt(6.0)
    return out


def _solve_bin(r2: np.ndarray, s2: np.ndarray) -> tuple[float, float]:
    """(c, tau) such that mean(r2 / (c^2 s2 + tau^2)) == 1 (tau >= 0, 0 < c <= 1)."""
    r2 = np.asarray(r2, float)
    s2 = np.maximum(np.asarray(s2, float), 0.0)
    if r2.size == 0:
        return 1.0, 0.0
    pos = s2 > 0

    def m(c, tau):
        den = c * c * s2 + tau * tau
        with np.errstate(divide="ignore", invalid="ignore"):
            q = np.where(den > 0, r2 / den, np.where(r2 > 0, np.inf, 0.0))
        return float(np.mean(q))

    if pos.all() and m(1.0, 0.0) <= 1.0:  # ensemble std alone too large: shrink it
        lo, hi = 1e-3, 1.0
        for _ in range(60):
            mid = math.sqrt(lo * hi)
            if m(mid, 0.0) > 1.0:
                lo = mid
            else:
                hi = mid
        return float(hi), 0.0
    # add a floor in quadrature: mean(r2 / (s2 + tau^2)) decreases with tau
    hi = math.sqrt(max(float(np.mean(r2)), 1e-300)) * 4.0 + 1e-300
    while m(1.0, hi) > 1.0:
        hi *= 2.0
    lo = 0.0
    for _ in range(80):
        mid = 0.5 * (lo + hi)
        if m(1.0, mid) > 1.0:
            lo = mid
        else:
            hi = mid
    return 1.0, float(hi)


def fit_calibration(
    resid,
    err_ens,
    nu,
    labels,
    *,
    min_per_bin: int = 100,
    max_bins: int = 6,
    source: str = "holdout",
) -> dict:
    """Fit the calibrated-error table on spectra the ensemble did not train on.

    Parameters
    ----------
    resid : array-like, shape (n, k)
        Prediction minus truth per label (physical units; NaN where no label).
    err_ens : array-like, shape (n, k)
        Ensemble std of the same predictions (same units).
    nu : array-like, shape (n,)
        :func:`noise_proxy` of the spectra.
    labels : sequence of str
        The k label names (keys of the table).
    min_per_bin : int
        Fewest calibration spectra per noise bin; fewer spectra give fewer bins (one bin: a
        single floor/factor per label). The floors are then made non-decreasing with the
        noise (isotonic regression): a noisier spectrum never gets a smaller error floor.
    max_bins : int
        Most noise bins.
    source : str
        Recorded: ``"holdout"`` (spectra no member trained on) or ``"oof"`` (out-of-fold).

    Returns
    -------
    dict
        JSON-serialisable: ``version``, ``method``, ``proxy``, ``source``, ``n`` per label,
        ``centers`` (log10 nu of each bin, per label), ``tau`` (per label and bin, label
        units), ``scale`` (c per label and bin) and ``pull_std_raw`` / ``pull_std`` (std of the
        pulls on the calibration set with the ensemble std and with the calibrated error).
    """
    resid = np.asarray(resid, float)
    err_ens = np.asarray(err_ens, float)
    nu = np.asarray(nu, float)
    labels = list(labels)
    if resid.ndim != 2 or resid.shape != err_ens.shape or resid.shape[1] != len(labels):
        raise ValueError(
            f"resid and err_ens must both be (n, {len(labels)}), got {resid.shape} and "
            f"{err_ens.shape}"
        )
    if nu.shape != (resid.shape[0],):
        raise ValueError(f"nu must have shape ({resid.shape[0]},), got {nu.shape}")
    if int(min_per_bin) < 1 or int(max_bins) < 1:
        raise ValueError("min_per_bin and max_bins must be >= 1")
    cal = {
        "version": CALIBRATION_VERSION,
        "method": "err^2 = (scale*err_ens)^2 + tau^2, binned in log10(noise_proxy)",
        "proxy": "noise_proxy: 1.4826*median|2nd difference of flux_grid|/sqrt(6)",
        "source": str(source),
        "n": {},
        "centers": {},
        "tau": {},
        "scale": {},
        "pull_std_raw": {},
        "pull_std": {},
    }
    lnu = np.log10(np.where(nu > 0, nu, np.nan))
    for j, name in enumerate(labels):
        ok = np.isfinite(resid[:, j]) & np.isfinite(err_ens[:, j]) & np.isfinite(lnu)
        r, s, ln = resid[ok, j], err_ens[ok, j], lnu[ok]
        cal["n"][name] = int(ok.sum())
        if r.size == 0:
            cal["centers"][name], cal["tau"][name], cal["scale"][name] = [0.0], [0.0], [1.0]
            cal["pull_std_raw"][name] = cal["pull_std"][name] = None
            continue
        nb = int(max(1, min(int(max_bins), r.size // int(min_per_bin))))
        edges = np.quantile(ln, np.linspace(0, 1, nb + 1))
        idx = np.clip(np.searchsorted(edges, ln, side="right") - 1, 0, nb - 1)
        centers, taus, scales, counts = [], [], [], []
        for b in range(nb):
            sel = idx == b
            if not sel.any():
                continue
            c, tau = _solve_bin(r[sel] ** 2, s[sel] ** 2)
            centers.append(float(np.median(ln[sel])))
            taus.append(tau)
            scales.append(c)
            counts.append(int(sel.sum()))
        # a noisier spectrum cannot have a smaller error floor: isotonic (pool adjacent
        # violators) fit of tau^2, non-decreasing with the noise, weighted by bin counts
        taus = np.sqrt(_isotonic(np.square(taus), counts)).tolist()
        cal["centers"][name], cal["tau"][name], cal["scale"][name] = centers, taus, scales
        err = _eval(centers, taus, scales, s, ln)
        with np.errstate(divide="ignore", invalid="ignore"):
            cal["pull_std_raw"][name] = _finite_std(r / s)
            cal["pull_std"][name] = _finite_std(r / err)
    return cal


def _isotonic(v, w) -> np.ndarray:
    """Weighted least-squares non-decreasing fit of ``v`` (pool adjacent violators)."""
    blocks = []  # [value, weight, count]
    for x, wt in zip(np.asarray(v, float), np.asarray(w, float)):
        blocks.append([x, wt, 1])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            b = blocks.pop()
            a = blocks[-1]
            tot = a[1] + b[1]
            a[0] = (a[0] * a[1] + b[0] * b[1]) / tot
            a[1], a[2] = tot, a[2] + b[2]
    return np.concatenate([np.full(c, x) for x, _, c in blocks]) if blocks else np.zeros(0)


def _finite_std(v) -> float | None:
    v = np.asarray(v, float)
    v = v[np.isfinite(v)]
    return float(v.std()) if v.size > 1 else None


def _eval(centers, taus, scales, s, ln):
    centers = np.asarray(centers, float)
    t2 = np.asarray(taus, float) ** 2
    sc = np.asarray(scales, float)
    if centers.size == 1:
        tau2 = np.full(np.shape(ln), t2[0])
        c = np.full(np.shape(ln), sc[0])
    else:
        lnc = np.where(np.isfinite(ln), ln, np.median(centers))
        tau2 = np.interp(lnc, centers, t2)
        c = np.interp(lnc, centers, sc)
    return np.sqrt((c * s) ** 2 + tau2)


def apply_calibration(cal: dict | None, err_ens, nu, labels) -> np.ndarray:
    """Calibrated errors from ensemble stds and noise measures.

    Parameters
    ----------
    cal : dict or None
        The ``"calibration"`` entry of a model's metadata (:func:`fit_calibration`); None
        returns ``err_ens`` unchanged.
    err_ens : array-like, shape (n, k)
        Ensemble std per label (label units).
    nu : array-like, shape (n,)
        :func:`noise_proxy` of the spectra (NaN: the middle of the table is used).
    labels : sequence of str
        Label names of the k columns.

    Returns
    -------
    numpy.ndarray, shape (n, k)
        Calibrated errors (label units); NaN where ``err_ens`` is NaN.
    """
    err_ens = np.asarray(err_ens, float)
    if cal is None:
        return err_ens.copy()
    nu = np.asarray(nu, float)
    with np.errstate(divide="ignore", invalid="ignore"):
        ln = np.log10(np.where(nu > 0, nu, np.nan))
    out = np.empty_like(err_ens)
    for j, name in enumerate(labels):
        if name not in cal.get("tau", {}):
            out[:, j] = err_ens[:, j]
            continue
        out[:, j] = _eval(cal["centers"][name], cal["tau"][name], cal["scale"][name],
                          err_ens[:, j], ln)  # fmt: skip
    return out


def pull_std(pred, truth, err) -> float:
    """Standard deviation of ``(pred - truth) / err`` over the finite entries (NaN if < 2)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        p = (np.asarray(pred, float) - np.asarray(truth, float)) / np.asarray(err, float)
    v = _finite_std(p)
    return math.nan if v is None else v


class CalibrationWarning(UserWarning):
    """A CNN-TLMA model has no error calibration: its errors are the raw ensemble std."""
