"""Quality flags of the recommended catalog (paper Sect. 4.1): ``rv_flag`` and ``parameter_flag``.

``rv_flag``
    1 when the RV is not null and the spectrum was observed after 2012 January 14
    (``mjd > 55940``; before that date the red-channel arc lamp made some wavelength
    calibrations, hence RVs, unreliable); 0 otherwise (also when ``mjd`` is missing).

``parameter_flag``
    Exactly the paper's two steps, applied per spectrum to the four CNN-TLMA parameters:

    0. ``snr_i <= 0`` (or missing): 0.
    1. *The errors are within a reasonable range.* Separately for dM and gM and for each
       S/N_i bin (0, 20], (20, 50], (50, 100], (100, inf) and each parameter p in Teff,
       log g, [M/H], [α/M], fit by ordinary least squares

       ``σ̂_p = a0 + a1 S/N_i + a2 Teff + a3 log g + a4 [M/H] + a5 [α/M]``   (paper Eq. 3)

       and keep the spectrum if ``σ_p − σ̂_p < mean(σ_p − σ̂_p) + 3 STD(σ_p − σ̂_p)``
       (Eq. 4) for all four parameters. The mean is that of the fitted sample (0 up to
       rounding for a least-squares fit with an intercept); STD is the population standard
       deviation (``ddof=0``, as ``numpy.std``).
    2. *The values are within a reasonable range*: all four inside the paper's Table 10
       range of the spectrum's luminosity class (:data:`TABLE10_RANGES`, closed intervals).

    ``parameter_flag`` is 1 only when a spectrum passes all of these, else 0; a spectrum
    without a dM/gM class or with a missing parameter or error gets 0. The companion
    ``parameter_flag_reason`` says why a 0 is a 0 (``''`` for 1).

The fit is a global statistic: :func:`fit_parameter_errors` makes **one pass** over a pandas
or dask DataFrame, accumulating per group the count, the means and the centred cross-product
matrix of ``[1, S/N_i, Teff, log g, [M/H], [α/M], σ_Teff, σ_logg, σ_[M/H], σ_[α/M]]``
(merged between partitions with Chan et al.'s pairwise update, so the result does not depend
on the partitioning beyond rounding), and solves the four least-squares problems from them.
Rows entering a fit: a dM/gM class, ``snr_i > 0`` and all eight values finite. A group with
fewer than ``min_rows`` such rows cannot be fitted reliably: its error cut is not applied
(the range cut still is) and the fit records why. :func:`parameter_flag` then applies the
fit lazily. The fit (coefficients, residual mean and STD, threshold, counts) is a
:class:`ParameterFlagFit`, saved as JSON with :meth:`ParameterFlagFit.to_json` (the
catalog stores it as ``RUN/catalog/parameter_flag.json``) and reusable on another table.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import pandas as pd

__all__ = [
    "RV_FLAG_MJD",
    "SNR_BINS",
    "PARAMETERS",
    "TABLE10_RANGES",
    "rv_flag",
    "snr_bin",
    "ParameterFlagFit",
    "ParameterFlagResult",
    "fit_parameter_errors",
    "parameter_flag",
]

#: MJD of 2012 January 14: spectra observed later (``mjd > RV_FLAG_MJD``) may get rv_flag 1.
RV_FLAG_MJD = 55940

#: The paper's S/N_i bins (lower bound exclusive, upper bound inclusive).
SNR_BINS: tuple[tuple[str, float, float], ...] = (
    ("(0,20]", 0.0, 20.0),
    ("(20,50]", 20.0, 50.0),
    ("(50,100]", 50.0, 100.0),
    (">100", 100.0, math.inf),
)

#: The four CNN-TLMA parameters, in the order of the regressors a2..a5.
PARAMETERS: tuple[str, ...] = ("teff", "logg", "m_h", "alpha_m")

#: Paper Table 10: recommended parameter ranges (closed) per luminosity class.
TABLE10_RANGES: dict[str, dict[str, tuple[float, float]]] = {
    "dM": {
        "teff": (3225.0, 4125.0),
        "logg": (4.35, 5.45),
        "m_h": (-0.85, 0.35),
        "alpha_m": (-0.13, 0.25),
    },
    "gM": {
        "teff": (3425.0, 4075.0),
        "logg": (-0.05, 1.55),
        "m_h": (-1.35, 0.45),
        "alpha_m": (-0.03, 0.31),
    },
}

_LUMCLASSES = ("dM", "gM")
# regressors of Eq. 3 after the intercept, then the four errors
_REGRESSORS = ("snr_i", *PARAMETERS)
_ERRORS = tuple(f"{p}_err" for p in PARAMETERS)
_FIT_COLS = (*_REGRESSORS, *_ERRORS)


# --------------------------------------------------------------------------- rv_flag


def rv_flag(rv, mjd, *, mjd_min: int = RV_FLAG_MJD):
    """The paper's RV validity flag: 1 if ``rv`` is not null and ``mjd > mjd_min``, else 0.

    Parameters
    ----------
    rv : array-like, pandas/dask Series or xarray DataArray
        Final radial velocity (km/s); NaN / null = no RV.
    mjd : array-like of the same shape
        Modified Julian date of the observation (d); NaN or missing gives 0.
    mjd_min : int
        Last date (MJD) whose spectra are not trusted; default 55940 (2012-01-14).

    Returns
    -------
    same kind as ``rv``
        int8 array / Series / DataArray (lazy for dask and dask-backed xarray inputs).
    """
    if isinstance(mjd_min, bool) or not isinstance(mjd_min, int | np.integer | float):
        raise TypeError(f"mjd_min must be a number (MJD, d), got {mjd_min!r}")
    try:
        import xarray as xr
    except ImportError:  # pragma: no cover - xarray is a dependency
        xr = None
    if xr is not None and isinstance(rv, xr.DataArray):
        ok = np.isfinite(rv.astype("float64")) & (mjd.astype("float64") > mjd_min)
        out = ok.astype("int8")
        out.attrs = {"units": "", "long_name": "RV validity flag (paper Sect. 4.1)"}
        return out.rename("rv_flag")
    if hasattr(rv, "astype") and hasattr(rv, "index") and hasattr(rv, "fillna"):
        # pandas or dask Series: nullable dtypes fill as NaN
        r = rv.astype("float64")
        m = mjd.astype("float64")
        ok = r.notnull() & (r.abs() < np.inf) & (m.fillna(-np.inf) > mjd_min)
        return ok.astype("int8").rename("rv_flag")
    r = np.asarray(rv, dtype="float64")
    m = np.asarray(mjd, dtype="float64")
    if r.shape != m.shape:
        raise ValueError(f"rv and mjd must have the same shape, got {r.shape} and {m.shape}")
    with np.errstate(invalid="ignore"):
        return (np.isfinite(r) & (np.nan_to_num(m, nan=-np.inf) > mjd_min)).astype("int8")


def snr_bin(snr_i) -> np.ndarray:
    """Index of the paper's S/N_i bin (0..3, see :data:`SNR_BINS`); -1 for S/N_i <= 0 / NaN.

    Parameters
    ----------
    snr_i : array-like
        S/N in the SDSS i band.

    Returns
    -------
    numpy.ndarray of int8
    """
    s = np.asarray(snr_i, dtype="float64")
    out = np.full(s.shape, -1, dtype="int8")
    for k, (_, lo, hi) in enumerate(SNR_BINS):
        with np.errstate(invalid="ignore"):
            out[(s > lo) & (s <= hi)] = k
    return out


# --------------------------------------------------------------------------- the fit


@dataclass
class ParameterFlagFit:
    """The fitted error model of ``parameter_flag`` (paper Eqs. 3-4) and the ranges used.

    Attributes
    ----------
    groups : list of dict
        One per (luminosity class, S/N_i bin, parameter): ``lumclass``, ``snr_bin`` (label),
        ``snr_lo``, ``snr_hi``, ``parameter``, ``n`` (rows fitted), ``fitted`` (bool),
        ``coefficients`` (a0..a5 for 1, S/N_i, Teff [K], log g, [M/H], [α/M]; units of the
        parameter's error per unit of each regressor), ``mean`` and ``std`` of
        σ_p − σ̂_p (units of the parameter), ``threshold`` = mean + ``n_sigma`` std, and
        ``note`` (why a group was not fitted).
    ranges : dict
        The Table-10 ranges applied (lumclass -> parameter -> [lo, hi]).
    n_sigma : float
        The 3 of Eq. 4.
    min_rows : int
        Fewest rows a group needs for its fit to be used.
    """

    groups: list[dict] = field(default_factory=list)
    ranges: dict = field(default_factory=lambda: _copy_ranges(TABLE10_RANGES))
    n_sigma: float = 3.0
    min_rows: int = 20

    def group(self, lumclass: str, bin_index: int, parameter: str) -> dict | None:
        """The entry of one group (None if absent)."""
        label = SNR_BINS[bin_index][0]
        for g in self.groups:
            if (g["lumclass"], g["snr_bin"], g["parameter"]) == (lumclass, label, parameter):
                return g
        return None

    def coefficients(self) -> pd.DataFrame:
        """The fit as a table: one row per group, columns a0..a5, mean, std, threshold, n."""
        rows = []
        for g in self.groups:
            c = g.get("coefficients") or [math.nan] * 6
            rows.append(
                {
                    "lumclass": g["lumclass"],
                    "snr_bin": g["snr_bin"],
                    "parameter": g["parameter"],
                    "n": g["n"],
                    "fitted": g["fitted"],
                    **{f"a{k}": c[k] for k in range(6)},
                    "mean": g["mean"],
                    "std": g["std"],
                    "threshold": g["threshold"],
                    "note": g.get("note", ""),
                }
            )
        return pd.DataFrame(rows)

    def to_dict(self) -> dict:
        """JSON-ready dict (NaN written as null)."""
        return _nan_to_none(
            {
                "model": "sigma_p_hat = a0 + a1*snr_i + a2*teff + a3*logg + a4*m_h + a5*alpha_m",
                "rule": "keep if sigma_p - sigma_p_hat < mean + n_sigma*std (ddof=0), per "
                "lumclass, snr_i bin and parameter; then Table-10 ranges",
                "regressors": ["1", *_REGRESSORS],
                "snr_bins": [[lbl, lo, None if math.isinf(hi) else hi] for lbl, lo, hi in SNR_BINS],
                "n_sigma": self.n_sigma,
                "min_rows": self.min_rows,
                "ranges": {k: {p: list(v) for p, v in r.items()} for k, r in self.ranges.items()},
                "groups": self.groups,
            }
        )

    def to_json(self, path) -> None:
        """Write :meth:`to_dict` as JSON to ``path`` (parent directories created)."""
        path = os.fspath(path)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.to_dict(), f, indent=1)
        os.replace(tmp, path)

    @classmethod
    def from_dict(cls, d: Mapping) -> ParameterFlagFit:
        """Inverse of :meth:`to_dict`."""
        groups = []
        for g in d.get("groups", []):
            g = dict(g)
            for k in ("mean", "std", "threshold"):
                g[k] = math.nan if g.get(k) is None else float(g[k])
            if g.get("coefficients") is not None:
                g["coefficients"] = [math.nan if c is None else float(c) for c in g["coefficients"]]
            groups.append(g)
        ranges = {
            k: {p: (float(v[0]), float(v[1])) for p, v in r.items()}
            for k, r in d.get("ranges", TABLE10_RANGES).items()
        }
        return cls(
            groups=groups,
            ranges=ranges,
            n_sigma=float(d.get("n_sigma", 3.0)),
            min_rows=int(d.get("min_rows", 20)),
        )

    @classmethod
    def from_json(cls, path) -> ParameterFlagFit:
        """Read a fit written by :meth:`to_json`."""
        with open(os.fspath(path)) as f:
            return cls.from_dict(json.load(f))


class ParameterFlagResult(NamedTuple):
    """What :func:`parameter_flag` returns."""

    flag: object
    """int8 Series (pandas or dask): 1 recommended, 0 not."""
    reason: object
    """string Series: why the flag is 0 (``''`` when 1)."""
    fit: ParameterFlagFit
    """The error-model fit used."""


def _copy_ranges(r):
    return {k: {p: tuple(v) for p, v in d.items()} for k, d in r.items()}


def _nan_to_none(obj):
    if isinstance(obj, float):
        return None if not math.isfinite(obj) else obj
    if isinstance(obj, dict):
        return {k: _nan_to_none(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_nan_to_none(v) for v in obj]
    if isinstance(obj, np.generic):
        return _nan_to_none(obj.item())
    return obj


def _check_columns(table, lumclass: str) -> None:
    if not isinstance(lumclass, str):
        raise TypeError(f"lumclass must be a column name (str), got {lumclass!r}")
    cols = list(table.columns)
    need = [lumclass, *_FIT_COLS]
    missing = [c for c in need if c not in cols]
    if missing:
        raise KeyError(f"parameter_flag: table lacks the columns {missing} (needs {need})")


def _check_options(n_sigma, min_rows, ranges):
    if isinstance(n_sigma, bool) or not isinstance(n_sigma, int | float) or not n_sigma > 0:
        raise ValueError(f"n_sigma must be a positive number, got {n_sigma!r}")
    if isinstance(min_rows, bool) or not isinstance(min_rows, int) or min_rows < 7:
        raise ValueError(
            f"min_rows must be an int >= 7 (6 coefficients plus one degree of freedom), "
            f"got {min_rows!r}"
        )
    if not isinstance(ranges, Mapping) or set(ranges) != set(_LUMCLASSES):
        raise ValueError(f"ranges must map 'dM' and 'gM' to parameter ranges, got {ranges!r}")
    for k, r in ranges.items():
        if set(r) != set(PARAMETERS):
            raise ValueError(f"ranges[{k!r}] must give {PARAMETERS}, got {sorted(r)}")
        for p, v in r.items():
            if len(v) != 2 or not float(v[0]) <= float(v[1]):
                raise ValueError(f"ranges[{k!r}][{p!r}] must be (lo, hi) with lo <= hi, got {v}")


def _group_keys(lum: np.ndarray, snr: np.ndarray) -> np.ndarray:
    """Group index 0..7 (lumclass * 4 + bin) or -1."""
    b = snr_bin(snr).astype(np.int16)
    lum = np.asarray(lum, dtype=object)
    li = np.full(lum.shape, -1, dtype=np.int16)
    li[lum == "dM"] = 0
    li[lum == "gM"] = 1
    out = li * len(SNR_BINS) + b
    out[(li < 0) | (b < 0)] = -1
    return out


def _partition_moments(df: pd.DataFrame, lumclass: str) -> np.ndarray:
    """Per group: [n, mean(10), centred cross-product (10x10)] packed in one array."""
    k = len(_FIT_COLS)
    ng = len(_LUMCLASSES) * len(SNR_BINS)
    out = np.zeros((ng, 1 + k + k * k), dtype=np.float64)
    if len(df) == 0:
        return out
    z = np.column_stack([pd.to_numeric(df[c], errors="coerce").to_numpy("float64", na_value=np.nan)
                         for c in _FIT_COLS])  # fmt: skip
    lum = df[lumclass].astype(object).where(df[lumclass].notna(), "").to_numpy()
    g = _group_keys(lum, z[:, 0])
    ok = (g >= 0) & np.isfinite(z).all(axis=1)
    for gi in np.unique(g[ok]):
        zz = z[ok & (g == gi)]
        n = zz.shape[0]
        mu = zz.mean(axis=0)
        d = zz - mu
        out[gi, 0] = n
        out[gi, 1 : 1 + k] = mu
        out[gi, 1 + k :] = (d.T @ d).ravel()
    return out


def _merge_moments(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Chan et al. (1979) pairwise merge of packed moments (per group)."""
    k = len(_FIT_COLS)
    out = np.empty_like(a)
    for gi in range(a.shape[0]):
        na, nb = a[gi, 0], b[gi, 0]
        if nb == 0:
            out[gi] = a[gi]
            continue
        if na == 0:
            out[gi] = b[gi]
            continue
        n = na + nb
        ma, mb = a[gi, 1 : 1 + k], b[gi, 1 : 1 + k]
        delta = mb - ma
        out[gi, 0] = n
        out[gi, 1 : 1 + k] = ma + delta * (nb / n)
        ca = a[gi, 1 + k :].reshape(k, k)
        cb = b[gi, 1 + k :].reshape(k, k)
        out[gi, 1 + k :] = (ca + cb + np.outer(delta, delta) * (na * nb / n)).ravel()
    return out


def _solve(moments: np.ndarray, n_sigma: float, min_rows: int, ranges) -> ParameterFlagFit:
    k = len(_FIT_COLS)
    nx = len(_REGRESSORS)
    groups = []
    for li, lum in enumerate(_LUMCLASSES):
        for bi, (label, lo, hi) in enumerate(SNR_BINS):
            m = moments[li * len(SNR_BINS) + bi]
            n = int(m[0])
            mu = m[1 : 1 + k]
            c = m[1 + k :].reshape(k, k)
            cxx = c[:nx, :nx]
            for pi, p in enumerate(PARAMETERS):
                entry = {
                    "lumclass": lum,
                    "snr_bin": label,
                    "snr_lo": lo,
                    "snr_hi": None if math.isinf(hi) else hi,
                    "parameter": p,
                    "n": n,
                    "fitted": False,
                    "coefficients": None,
                    "mean": math.nan,
                    "std": math.nan,
                    "threshold": math.nan,
                    "note": "",
                }
                if n < min_rows:
                    entry["note"] = (
                        f"{n} spectra with S/N_i > 0 and finite values < min_rows={min_rows}: "
                        "error cut not applied in this group (Table-10 ranges still are)"
                    )
                    groups.append(entry)
                    continue
                yi = nx + pi
                cxy = c[:nx, yi]
                # least squares on centred data; the pseudo-inverse handles a degenerate
                # regressor (e.g. a constant column) with the minimum-norm solution
                beta = np.linalg.pinv(cxx, rcond=1e-12, hermitian=True) @ cxy
                a0 = mu[yi] - beta @ mu[:nx]
                rss = c[yi, yi] - 2.0 * beta @ cxy + beta @ cxx @ beta
                std = math.sqrt(max(rss, 0.0) / n)
                # mean residual of an OLS fit with intercept: exactly 0 (kept for Eq. 4)
                mean = float(mu[yi] - a0 - beta @ mu[:nx])
                entry.update(
                    fitted=True,
                    coefficients=[float(a0), *map(float, beta)],
                    mean=mean,
                    std=std,
                    threshold=mean + n_sigma * std,
                )
                groups.append(entry)
    return ParameterFlagFit(
        groups=groups, ranges=_copy_ranges(ranges), n_sigma=float(n_sigma), min_rows=min_rows
    )


def _is_dask(table) -> bool:
    return type(table).__module__.startswith("dask")


def fit_parameter_errors(
    table,
    *,
    lumclass: str = "luminosity_class",
    n_sigma: float = 3.0,
    min_rows: int = 20,
    ranges: Mapping | None = None,
) -> ParameterFlagFit:
    """Fit the paper's error model (Eq. 3) per luminosity class, S/N_i bin and parameter.

    One pass over the data; a dask DataFrame is computed (this is a global statistic).

    Parameters
    ----------
    table : pandas.DataFrame or dask.dataframe.DataFrame
        Columns ``snr_i``, ``teff`` (K), ``logg`` (dex), ``m_h`` (dex), ``alpha_m`` (dex),
        their ``*_err`` (same units) and the luminosity class column.
    lumclass : str
        Column holding ``"dM"`` / ``"gM"`` (other values: not fitted, flag 0).
    n_sigma : float
        The 3 of Eq. 4.
    min_rows : int
        Fewest rows for a group's fit to be used (>= 7).
    ranges : mapping, optional
        Table-10 ranges (default :data:`TABLE10_RANGES`), recorded in the fit.

    Returns
    -------
    ParameterFlagFit

    Raises
    ------
    KeyError
        A needed column is missing (named).
    ValueError
        Bad ``n_sigma`` / ``min_rows`` / ``ranges``.
    """
    ranges = TABLE10_RANGES if ranges is None else ranges
    _check_options(n_sigma, min_rows, ranges)
    _check_columns(table, lumclass)
    cols = [lumclass, *_FIT_COLS]
    if _is_dask(table):
        import dask

        parts = table[cols].to_delayed()
        moments = [dask.delayed(_partition_moments)(p, lumclass) for p in parts]
        # pairwise tree reduction, so the graph stays shallow and every merge is small
        while len(moments) > 1:
            moments = [
                dask.delayed(_merge_moments)(moments[i], moments[i + 1])
                if i + 1 < len(moments)
                else moments[i]
                for i in range(0, len(moments), 2)
            ]
        total = moments[0].compute()
    else:
        total = _partition_moments(table[cols], lumclass)
    return _solve(total, n_sigma, min_rows, ranges)


def _flag_partition(df: pd.DataFrame, fit_dict: dict, lumclass: str) -> pd.DataFrame:
    fit = ParameterFlagFit.from_dict(fit_dict)
    n = len(df)
    flag = np.zeros(n, dtype=np.int8)
    reasons = np.full(n, "", dtype=object)
    if n == 0:
        return pd.DataFrame(
            {"parameter_flag": flag, "parameter_flag_reason": pd.array([], dtype="string")},
            index=df.index,
        )
    num = {
        c: pd.to_numeric(df[c], errors="coerce").to_numpy("float64", na_value=np.nan)
        for c in _FIT_COLS
    }
    lum = df[lumclass].astype(object).where(df[lumclass].notna(), "").to_numpy()
    snr = num["snr_i"]
    b = snr_bin(snr)
    why: list[list[str]] = [[] for _ in range(n)]

    def add(mask, text):
        for i in np.flatnonzero(mask):
            why[i].append(text)

    no_snr = b < 0
    add(no_snr, "snr_i <= 0 or missing")
    no_lum = ~np.isin(lum, _LUMCLASSES)
    add(no_lum & ~no_snr, "no dM/gM luminosity class")
    finite = np.ones(n, dtype=bool)
    for p in PARAMETERS:
        finite &= np.isfinite(num[p]) & np.isfinite(num[f"{p}_err"])
    add(~finite & ~no_snr & ~no_lum, "parameter or error missing")
    live = ~no_snr & ~no_lum & finite
    x = np.column_stack([np.ones(n), *(num[c] for c in _REGRESSORS)])
    err_bad = {p: np.zeros(n, dtype=bool) for p in PARAMETERS}
    rng_bad = {p: np.zeros(n, dtype=bool) for p in PARAMETERS}
    for lc in _LUMCLASSES:
        in_lc = live & (lum == lc)
        for p in PARAMETERS:
            lo, hi = fit.ranges[lc][p]
            v = num[p]
            with np.errstate(invalid="ignore"):
                rng_bad[p] |= in_lc & ~((v >= lo) & (v <= hi))
        for bi in range(len(SNR_BINS)):
            sel = in_lc & (b == bi)
            if not sel.any():
                continue
            for p in PARAMETERS:
                g = fit.group(lc, bi, p)
                if g is None or not g["fitted"]:
                    continue
                pred = x[sel] @ np.asarray(g["coefficients"], dtype=np.float64)
                resid = num[f"{p}_err"][sel] - pred
                idx = np.flatnonzero(sel)
                err_bad[p][idx[~(resid < g["threshold"])]] = True
    for p in PARAMETERS:
        add(err_bad[p], f"{p}_err outlier (Eq. 4)")
    for p in PARAMETERS:
        add(rng_bad[p], f"{p} outside Table 10")
    ok = live.copy()
    for p in PARAMETERS:
        ok &= ~err_bad[p] & ~rng_bad[p]
    flag[ok] = 1
    for i in range(n):
        reasons[i] = "; ".join(why[i])
    return pd.DataFrame(
        {
            "parameter_flag": flag,
            "parameter_flag_reason": pd.array(reasons, dtype="string"),
        },
        index=df.index,
    )


def parameter_flag(
    table,
    *,
    fit: ParameterFlagFit | Mapping | str | os.PathLike | None = None,
    lumclass: str = "luminosity_class",
    n_sigma: float = 3.0,
    min_rows: int = 20,
    ranges: Mapping | None = None,
) -> ParameterFlagResult:
    """The paper's ``parameter_flag`` for every row of ``table`` (module docstring).

    Parameters
    ----------
    table : pandas.DataFrame or dask.dataframe.DataFrame
        As for :func:`fit_parameter_errors`.
    fit : ParameterFlagFit, dict, path or None
        A previous fit (object, :meth:`ParameterFlagFit.to_dict` dict or JSON path) to
        apply; None fits ``table`` itself (one pass, computed).
    lumclass : str
        Luminosity-class column (``"dM"`` / ``"gM"``).
    n_sigma, min_rows, ranges
        Used when fitting (see :func:`fit_parameter_errors`); ignored with ``fit``.

    Returns
    -------
    ParameterFlagResult
        ``(flag, reason, fit)``: an int8 Series named ``parameter_flag`` (lazy for dask
        input, same index/partitions as ``table``), a string Series
        ``parameter_flag_reason`` ('' for 1; otherwise e.g. ``"teff_err outlier (Eq. 4);
        logg outside Table 10"``), and the fit.
    """
    _check_columns(table, lumclass)
    if fit is None:
        fit = fit_parameter_errors(
            table, lumclass=lumclass, n_sigma=n_sigma, min_rows=min_rows, ranges=ranges
        )
    elif isinstance(fit, Mapping):
        fit = ParameterFlagFit.from_dict(fit)
    elif isinstance(fit, str | os.PathLike):
        fit = ParameterFlagFit.from_json(fit)
    elif not isinstance(fit, ParameterFlagFit):
        raise TypeError(f"fit must be a ParameterFlagFit, dict, path or None, got {fit!r}")
    fd = fit.to_dict()
    cols = [lumclass, *_FIT_COLS]
    if _is_dask(table):
        meta = pd.DataFrame(
            {
                "parameter_flag": pd.Series([], dtype="int8"),
                "parameter_flag_reason": pd.Series([], dtype="string"),
            }
        )
        out = table[cols].map_partitions(_flag_partition, fd, lumclass, meta=meta)
    else:
        out = _flag_partition(table[cols], fd, lumclass)
    return ParameterFlagResult(out["parameter_flag"], out["parameter_flag_reason"], fit)
