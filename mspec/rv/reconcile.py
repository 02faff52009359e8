"""RV reconciliation (paper: RVMM, Li et al. 2025 Sect. 3.4.3): one RV per spectrum.

Two steps, like the paper:

1. :func:`rv_residual_sigmas` (eager, 1-D arrays only): the population statistics of the
   run — mean and σ of the TM − LAMOST, DSAL I − LAMOST and DSAL II − LAMOST residuals by
   iterative clipping (3σ for TM, 2σ for DSAL, the paper's Figure 10), and the statistics the
   automatic rules need: reduced-χ² levels per S/N bin (TM quality, red-end anomalies),
   per-line offsets (wavelength-calibration test), the LAMOST RV error per S/N bin and the
   error scale of each method. A plain ``dict`` of floats and lists (JSON-serialisable) that a
   run stores.
2. :func:`reconcile_rv` (a lazy stage): the rules, in the paper's order, per spectrum; the
   outputs ``rv``, ``rv_err``, ``rv_from``, ``rv_inspect``, ``rv_flag`` and the diagnostics
   ``tm_chi2_excess``, ``red_end_excess``, ``line_rv_slope``.

The rules are documented in ``docs/rv_reconcile.md`` and in :func:`reconcile_rv`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import xarray as xr

from mspec.stage import stage
from mspec.variables import annotate

__all__ = [
    "RV_FROM",
    "MJD_RV_RELIABLE",
    "SNR_EDGES",
    "rv_residual_sigmas",
    "reconcile_rv",
    "reconcile_arrays",
    "decision_codes",
]

#: Values of ``rv_from`` (exactly the paper's, Table 7), in code order.
RV_FROM = (
    "LAMOST",
    "TM",
    "DSAL I",
    "DSAL II",
    "TML7500",
    "DSEL",
    "NoRV_lowQuality",
    "NoRV_waveErr",
)
_CODE = {name: i for i, name in enumerate(RV_FROM)}
#: MJD of 2012-01-14: rv_flag needs an observation after it (paper Sect. 4.1).
MJD_RV_RELIABLE = 55940
#: S/N_i bin edges of the per-bin population statistics.
SNR_EDGES = (0.0, 5.0, 10.0, 20.0, 40.0, 80.0, math.inf)
_MIN_BIN = 20  # fewest spectra for a bin's own statistics (else the nearest bin's)
_ROBUST = 1.482602218505602  # sigma / MAD for a Gaussian
_STR_LEN = 96
_LINE_VARS = ("rv_line", "rv_line_err", "line_status")
_LINE_STATS = ("rv_line", "line_status")  # what the population statistics read
_GATHER_CHUNKS = 16  # chunks whose population is selected per graph

#: Inputs every reconciliation needs (the rvmm stage outputs and store metadata).
INPUTS = (
    "lamost_rv",
    "mjd",
    "rv_tm",
    "rv_tm_err_stat",
    "tm_status",
    "rv_tml7500",
    "rv_tml7500_err_stat",
    "tml7500_status",
    "rv_line",
    "rv_line_err",
    "line_status",
    "rv_dsal1",
    "rv_dsal1_err",
    "rv_dsal1_n",
    "rv_dsal2",
    "rv_dsal2_err",
    "rv_dsal2_n",
    "rv_dsel",
    "rv_dsel_err",
    "rv_dsel_n",
    "ew_halpha",
)
#: Used when present (older runs without them skip the corresponding checks).
OPTIONAL = ("tm_quality", "tml7500_quality", "tm_chi2_red", "tml7500_chi2_red", "snr_i")
OUTPUTS = (
    "rv",
    "rv_err",
    "rv_from",
    "rv_inspect",
    "rv_flag",
    "tm_chi2_excess",
    "red_end_excess",
    "line_rv_slope",
)


# ------------------------------------------------------------------------------- statistics


def _clipped(resid, nsigma: float) -> dict:
    """Mean and std of ``resid`` after iterative ``nsigma`` clipping (to convergence)."""
    from astropy.stats import sigma_clip

    r = np.asarray(resid, dtype=np.float64)
    r = r[np.isfinite(r)]
    if r.size < 3:
        return {"mean": math.nan, "sigma": math.nan, "n": int(r.size), "n_used": 0}
    c = sigma_clip(r, sigma=nsigma, maxiters=None, cenfunc="mean", stdfunc="std")
    kept = np.asarray(c.data[~c.mask])
    return {
        "mean": float(kept.mean()),
        "sigma": float(kept.std()),
        "n": int(r.size),
        "n_used": int(kept.size),
    }


def _robust(x) -> tuple[float, float]:
    x = np.asarray(x, dtype=np.float64)
    x = x[np.isfinite(x)]
    if x.size == 0:
        return math.nan, math.nan
    med = float(np.median(x))
    return med, float(_ROBUST * np.median(np.abs(x - med)))


def _bin_index(snr) -> np.ndarray:
    snr = np.asarray(snr, dtype=np.float64)
    idx = np.searchsorted(np.asarray(SNR_EDGES[1:-1]), np.nan_to_num(snr, nan=0.0), side="left")
    return idx.astype(np.int64)


def _binned_robust(values, snr, ok) -> dict:
    """Median and robust σ of ``values[ok]`` per S/N bin (sparse bins borrow a neighbour)."""
    nb = len(SNR_EDGES) - 1
    b = _bin_index(snr)
    med = [math.nan] * nb
    sig = [math.nan] * nb
    cnt = [0] * nb
    for k in range(nb):
        sel = ok & (b == k) & np.isfinite(values)
        cnt[k] = int(sel.sum())
        if cnt[k] >= _MIN_BIN:
            med[k], sig[k] = _robust(values[sel])
    have = [k for k in range(nb) if cnt[k] >= _MIN_BIN]
    for k in range(nb):
        if cnt[k] < _MIN_BIN and have:
            j = min(have, key=lambda h: (abs(h - k), h))
            med[k], sig[k] = med[j], sig[j]
    return {"snr_edges": list(SNR_EDGES), "median": med, "sigma": sig, "n": cnt}


def _binned_clipped(resid, snr, nsigma: float, fallback: dict) -> dict:
    """:func:`_clipped` per S/N bin; sparse bins borrow the nearest bin's, else ``fallback``."""
    nb = len(SNR_EDGES) - 1
    b = _bin_index(snr)
    stats = []
    for k in range(nb):
        sel = (b == k) & np.isfinite(resid)
        stats.append(_clipped(resid[sel], nsigma) if sel.sum() >= _MIN_BIN else None)
    have = [k for k in range(nb) if stats[k] is not None]
    mean, sigma, cnt = [], [], []
    for k in range(nb):
        st = stats[k]
        if st is None:
            st = stats[min(have, key=lambda h: (abs(h - k), h))] if have else fallback
        mean.append(st["mean"])
        sigma.append(st["sigma"])
        cnt.append(int(((b == k) & np.isfinite(resid)).sum()))
    return {"snr_edges": list(SNR_EDGES), "mean": mean, "sigma": sigma, "n": cnt}


def rv_residual_sigmas(
    ds: xr.Dataset,
    *,
    where=None,
    tm_clip: float = 3.0,
    dsal_clip: float = 2.0,
) -> dict:
    """Population statistics of a run for :func:`reconcile_rv` (eager).

    Reads only 1-D per-spectrum variables (and the small ``rv_line``/``line_status``
    tables). Dask-backed input is selected chunk by chunk and reduced in one task, so under
    a distributed client the population is gathered on a worker, not in this process.

    Parameters
    ----------
    ds : xarray.Dataset
        The rvmm outputs with the store metadata: :data:`INPUTS` (``mjd`` and the DSEL
        variables are not used here) and, when present, :data:`OPTIONAL`.
    where : array_like of bool or xarray.DataArray, optional
        The population (e.g. the M-star candidates; a dask-backed DataArray stays lazy);
        default every spectrum.
    tm_clip, dsal_clip : float
        Iterative clipping thresholds (σ) of the TM − LAMOST (3, the paper) and DSAL −
        LAMOST (2) residuals.

    Returns
    -------
    dict
        ``tm``, ``dsal1``, ``dsal2``: ``{"mean", "sigma", "n", "n_used"}`` (km/s) of the
        clipped residual distributions (TM: status 0 only); ``lamost_err``: LAMOST RV error
        per S/N bin, sqrt(σ_bin² − median(err_TM²)) with σ_bin the bin's ``tm_bins`` σ, or
        σ_bin/√2 when TM's error is more than 70 % of the variance (km/s); ``err_scale``: std, within 3 robust σ, of
        (X − TM)/sqrt(err_X² + err_TM²) for X in DSAL I, DSAL II, DSEL (the factor their
        errors, std/sqrt(n), are multiplied by; TML7500 shares TM's pixels and keeps its own);
        ``chi2_tm``, ``chi2_tml7500``: median and robust σ of log10 reduced χ² per S/N bin;
        ``red_ratio``: the same for log10(tm_chi2_red / tml7500_chi2_red);
        ``tm_bins``, ``dsal1_bins``, ``dsal2_bins``: the clipped residual mean and σ per
        S/N bin (clipping within the bin); ``line_offsets`` / ``line_scatter``: median and
        robust σ (S/N_i > 20) of rv_line − rv_tm per absorption line (km/s); ``n_spectra``.
        Statistics that cannot be computed are NaN (the rules that need them are skipped).

    Raises
    ------
    mspec.variables.VariableError
        A required variable is missing or malformed.
    ValueError
        ``where`` of the wrong length; a clipping threshold not positive.
    """
    from mspec.variables import validate

    if not isinstance(ds, xr.Dataset):
        raise TypeError(f"ds must be an xarray.Dataset, got {type(ds).__name__}")
    for name, v in (("tm_clip", tm_clip), ("dsal_clip", dsal_clip)):
        if not (float(v) > 0):
            raise ValueError(f"{name} must be positive, got {v!r}")
    need = [
        "lamost_rv",
        "rv_tm",
        "rv_tm_err_stat",
        "tm_status",
        "rv_dsal1",
        "rv_dsal1_err",
        "rv_dsal1_n",
        "rv_dsal2",
        "rv_dsal2_err",
        "rv_dsal2_n",
    ]
    validate(ds, need)
    n = ds.sizes["spectra"]
    mask = None
    if where is not None:
        if isinstance(where, xr.DataArray):
            mask = where.data  # lazy when dask-backed: not computed here
        else:
            mask = np.asarray(getattr(where, "values", where), dtype=bool)
        if mask.shape != (n,):
            raise ValueError(f"where has shape {mask.shape}, expected ({n},)")
    cols = [
        *need,
        *[v for v in (*OPTIONAL, "rv_tml7500", "rv_tml7500_err_stat", "tml7500_status",
                      "rv_dsel", "rv_dsel_err", "rv_dsel_n") if v in ds.variables],
        *(_LINE_STATS if _has_lines(ds) else ()),
    ]  # fmt: skip
    columns = {c: ds[c].data for c in cols}
    lines = (_small(ds["lines"]).astype(str), _line_kinds(ds)) if _has_lines(ds) else None
    import dask

    if not any(dask.is_dask_collection(v) for v in (*columns.values(), mask)):
        return _sigmas(_select_rows(columns, mask), lines, float(tm_clip), float(dsal_clip))
    # one task per chunk selects its population, one more gathers them and reduces them to
    # the statistics: under a distributed client both run on workers, and the driver builds
    # a graph of ~1 task per chunk and variable and receives the (small) result only
    sub = ds[cols]
    spectra_chunks = (
        next(
            (v.chunks[v.dims.index("spectra")] for v in sub.data_vars.values() if v.chunks),
            None,
        )
        or mask.chunks[0]
    )  # else only the mask is dask-backed
    sub = sub.chunk({d: (spectra_chunks if d == "spectra" else -1) for d in sub.dims})
    blocks = {c: sub[c].data.to_delayed().reshape(-1) for c in cols}
    if mask is not None:
        mask = xr.DataArray(mask, dims="spectra").chunk({"spectra": spectra_chunks})
        masks = mask.data.astype(bool).to_delayed().reshape(-1)
    else:
        masks = [None] * len(spectra_chunks)
    select = dask.delayed(_select_rows, pure=True)
    parts = []
    # a few chunks at a time, kept where they were computed (futures on the workers): a
    # graph of every chunk's column reads at once would cost the driver ~6 kB per task
    for a in range(0, len(masks), _GATHER_CHUNKS):
        batch = [select({c: blocks[c][i] for c in cols}, masks[i])
                 for i in range(a, min(a + _GATHER_CHUNKS, len(masks)))]  # fmt: skip
        parts.extend(dask.persist(*batch))
    task = dask.delayed(_sigmas_of_parts, pure=True)(parts, lines, float(tm_clip), float(dsal_clip))
    return task.compute()


def _select_rows(columns: dict, mask) -> dict:
    """The population's rows of ``columns`` (one chunk, or all in memory; ``mask`` None:
    every row)."""
    rows = slice(None) if mask is None else np.asarray(mask, dtype=bool)
    return {c: np.asarray(v)[rows] for c, v in columns.items()}


def _sigmas_of_parts(parts: list, lines, tm_clip: float, dsal_clip: float) -> dict:
    """:func:`_sigmas` of the population gathered from its chunks (:func:`_select_rows`)."""
    columns = {c: np.concatenate([p[c] for p in parts]) for c in parts[0]}
    return _sigmas(columns, lines, tm_clip, dsal_clip)


def _has_lines(ds) -> bool:
    return all(v in ds.variables for v in _LINE_STATS)


def _sigmas(columns: dict, lines, tm_clip: float, dsal_clip: float) -> dict:
    """:func:`rv_residual_sigmas` on numpy arrays: ``columns`` of the population (and
    ``rv_line``/``line_status`` when ``lines`` = (line names, line kinds) is given)."""
    a = {c: np.asarray(v) for c, v in columns.items()}
    n_sel = a["lamost_rv"].shape[0]
    snr = a.get("snr_i", np.full(n_sel, np.nan))
    lam = a["lamost_rv"].astype(np.float64)
    tm_ok = _tm_usable(a, "tm", check_quality=True)
    tm = np.where(tm_ok, a["rv_tm"], np.nan)
    out: dict = {"n_spectra": int(n_sel)}
    out["tm"] = _clipped(tm - lam, tm_clip)
    d1 = a["rv_dsal1"].astype(np.float64)
    d2 = np.where(a["rv_dsal2_n"] >= 2, a["rv_dsal2"], np.nan)
    out["dsal1"] = _clipped(d1 - lam, dsal_clip)
    out["dsal2"] = _clipped(d2 - lam, dsal_clip)
    # the same per S/N bin (clipping within each bin)
    out["tm_bins"] = _binned_clipped(tm - lam, snr, tm_clip, out["tm"])
    out["dsal1_bins"] = _binned_clipped(d1 - lam, snr, dsal_clip, out["dsal1"])
    out["dsal2_bins"] = _binned_clipped(d2 - lam, snr, dsal_clip, out["dsal2"])
    # LAMOST error per S/N bin: the bin's clipped TM - LAMOST scatter minus the TM error
    # (median err_stat^2 of the bin); when TM's error dominates (less than 30 % left for
    # LAMOST's variance) the two are taken as equal shares
    r = tm - lam
    etm2 = a["rv_tm_err_stat"].astype(np.float64) ** 2
    e2 = _binned_robust(etm2, snr, np.isfinite(r))
    lam_err = []
    for sg, em in zip(out["tm_bins"]["sigma"], e2["median"], strict=True):
        if not (np.isfinite(sg) and np.isfinite(em)):
            lam_err.append(math.nan)
        elif sg**2 - em >= 0.3 * sg**2:
            lam_err.append(float(math.sqrt(sg**2 - em)))
        else:
            lam_err.append(float(sg / math.sqrt(2.0)))
    out["lamost_err"] = {"snr_edges": list(SNR_EDGES), "sigma": lam_err}
    # error scales of the other methods against TM (TM's err_stat is calibrated)
    scales = {}
    base = {
        "dsal1": (a["rv_dsal1"], a["rv_dsal1_err"], a["rv_dsal1_n"]),
        "dsal2": (d2, a["rv_dsal2_err"], a["rv_dsal2_n"]),
        "dsel": (a.get("rv_dsel"), a.get("rv_dsel_err"), a.get("rv_dsel_n")),
    }
    for key, (v, e, cnt) in base.items():
        if v is None or e is None:
            scales[key] = math.nan
            continue
        ee = _method_error(e, cnt)
        pull = (np.asarray(v, np.float64) - tm) / np.sqrt(ee**2 + etm2)
        pull = pull[np.isfinite(pull)]
        if pull.size >= _MIN_BIN:
            # robust σ, then the std within 3 robust σ: the core of the distribution
            _, rs = _robust(pull)
            core = pull[np.abs(pull - np.median(pull)) <= 3 * rs]
            scales[key] = float(max(np.std(core), 0.3)) if core.size else math.nan
        else:
            scales[key] = math.nan
    out["err_scale"] = scales
    # reduced chi2 per S/N bin (TM quality) and the red-end ratio
    for p in ("tm", "tml7500"):
        red = a.get(f"{p}_chi2_red")
        st_ = a.get(f"{p}_status")
        if red is None or st_ is None:
            out[f"chi2_{p}"] = None
            continue
        with np.errstate(invalid="ignore", divide="ignore"):
            lr = np.log10(red.astype(np.float64))
        out[f"chi2_{p}"] = _binned_robust(lr, snr, st_ == 0)
    if a.get("tm_chi2_red") is not None and a.get("tml7500_chi2_red") is not None:
        with np.errstate(invalid="ignore", divide="ignore"):
            ratio = np.log10(a["tm_chi2_red"] / a["tml7500_chi2_red"])
        ok = (a["tm_status"] == 0) & (a.get("tml7500_status", a["tm_status"]) == 0)
        out["red_ratio"] = _binned_robust(ratio, snr, ok)
    else:
        out["red_ratio"] = None
    # per-line offsets against TM (absorption lines)
    out["line_offsets"] = {}
    out["line_scatter"] = {}
    if lines is not None:
        names, kinds = lines
        rl = np.where(a.pop("line_status") == 0, a.pop("rv_line"), np.nan)
        for j, nm in enumerate(names):
            if kinds[j] != "absorption":
                continue
            med, _ = _robust(rl[:, j] - tm)
            out["line_offsets"][str(nm)] = med
            hi = snr > 20
            _, sc = _robust((rl[:, j] - tm)[hi]) if hi.sum() >= _MIN_BIN else _robust(rl[:, j] - tm)
            out["line_scatter"][str(nm)] = sc
    return out


def _small(da_: xr.DataArray) -> np.ndarray:
    """Values of a small coordinate (``lines``), read in this thread even when dask-backed."""
    import dask.array as dsa

    data = da_.data
    if isinstance(data, dsa.Array):
        return np.asarray(data.compute(scheduler="synchronous"))
    return np.asarray(da_.values)


def _line_kinds(ds) -> np.ndarray:
    if "line_kind" in ds.coords or "line_kind" in ds.variables:
        return _small(ds["line_kind"]).astype(str)
    names = _small(ds["lines"]).astype(str)
    return np.where(np.char.endswith(names, "_em"), "emission", "absorption")


def _method_error(err, n) -> np.ndarray:
    """Error of a line-combination RV: std/sqrt(n) (the error of a mean), at least 1 km/s."""
    e = np.asarray(err, dtype=np.float64)
    if n is None:
        return e
    n = np.asarray(n, dtype=np.float64)
    return np.maximum(np.where(n > 1, e / np.sqrt(np.maximum(n, 1.0)), e), 1.0)


def _tm_usable(a: Mapping, p: str, *, check_quality: bool) -> np.ndarray:
    ok = (np.asarray(a[f"{p}_status"]) == 0) & np.isfinite(np.asarray(a[f"rv_{p}"], float))
    q = a.get(f"{p}_quality")
    if check_quality and q is not None:
        ok &= np.asarray(q) == 0
    return ok


# ------------------------------------------------------------------------------- the rules


def _lookup(stats, snr) -> tuple[np.ndarray, np.ndarray]:
    b = _bin_index(snr)
    med = np.asarray(stats["median"], dtype=np.float64)
    sig = np.asarray(stats["sigma"], dtype=np.float64)
    return med[b], sig[b]


def _excess(value_log, stats, snr) -> np.ndarray:
    if stats is None:
        return np.full(np.shape(snr), np.nan)
    med, sig = _lookup(stats, snr)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (value_log - med) / np.where(sig > 0, sig, np.nan)


def _line_slope(
    rv_line, rv_line_err, line_status, wave, kinds, offsets, scatter, *, min_lines: int
):
    """Slope (km/s per 1000 Å) of the absorption-line RVs against wavelength, and its error.

    ``offsets`` (per line, km/s) are subtracted first; weights 1/(err² + scatter²) with
    ``scatter`` the line's systematic scatter in the run (at least 5 km/s); up to two lines
    more than 3.5σ from the weighted mean are dropped; the slope error is inflated by the
    fit's reduced χ² when above 1. NaN with fewer than ``min_lines`` lines.
    """
    ns = rv_line.shape[0]
    ab = np.asarray(kinds) == "absorption"
    v = np.where(line_status == 0, rv_line, np.nan)[:, ab]
    x = (np.asarray(wave, np.float64)[ab] - 8000.0) / 1000.0
    v = v - np.nan_to_num(np.asarray(offsets, dtype=np.float64)[ab])[None, :]
    sc = np.maximum(np.nan_to_num(np.asarray(scatter, np.float64)[ab], nan=20.0), 5.0)
    var = np.asarray(rv_line_err, np.float64)[:, ab] ** 2 + sc[None, :] ** 2
    slope = np.full(ns, np.nan)
    sig = np.full(ns, np.nan)
    ok = np.isfinite(v)
    cnt = ok.sum(axis=1)
    for i in np.flatnonzero(cnt >= min_lines):
        m = ok[i] & np.isfinite(var[i])
        xi, vi, wi = x[m], v[i, m], 1.0 / var[i, m]
        if vi.size < min_lines:
            continue
        for _ in range(2):
            mu = np.sum(wi * vi) / np.sum(wi)
            dev = np.abs(vi - mu) * np.sqrt(wi)
            j = int(np.argmax(dev))
            if dev[j] > 3.5 and vi.size > min_lines:
                xi, vi, wi = np.delete(xi, j), np.delete(vi, j), np.delete(wi, j)
        w = wi
        sw, sx, sy = w.sum(), (w * xi).sum(), (w * vi).sum()
        sxx, sxy = (w * xi * xi).sum(), (w * xi * vi).sum()
        den = sw * sxx - sx * sx
        if den <= 0:
            continue
        b = (sw * sxy - sx * sy) / den
        a0 = (sy - b * sx) / sw
        res = vi - a0 - b * xi
        dof = max(vi.size - 2, 1)
        scale = max(1.0, float(np.sqrt((w * res * res).sum() / dof)))
        slope[i] = b
        sig[i] = math.sqrt(sw / den) * scale
    return slope, sig


def decision_codes(obsid, decisions) -> np.ndarray:
    """Code per spectrum of the decision a reviewer made (-1: none).

    Parameters
    ----------
    obsid : array_like
        Spectrum ids.
    decisions : pandas.DataFrame or None
        Columns ``obsid`` and ``decision`` (an ``rv_from`` value), as returned by
        :func:`mspec.review.read_decisions`. Later rows win for a repeated obsid.

    Returns
    -------
    numpy.ndarray
        int8 index into :data:`RV_FROM`, -1 where there is no decision.
    """
    obs = np.asarray(obsid).astype(str)
    out = np.full(obs.shape, -1, np.int8)
    if decisions is None or len(decisions) == 0:
        return out
    table = {}
    for o, d in zip(
        np.asarray(decisions["obsid"]).astype(str),
        np.asarray(decisions["decision"]).astype(str),
        strict=True,
    ):
        if d in _CODE:
            table[o] = _CODE[d]
    for k, o in enumerate(obs.ravel()):
        c = table.get(o)
        if c is not None:
            out.flat[k] = c
    return out


def _f(x) -> float:
    """float(x), NaN for None (JSON null)."""
    return math.nan if x is None else float(x)


def reconcile_arrays(a: Mapping, sigmas: Mapping, *, decision=None, wave=None, kinds=None,
                     line_names=None,
                     tm_sigma: float = 3.0, dsal_sigma: float = 2.0,
                     inspect_abs_rv: float = 150.0, chi2_sigma: float = 5.0,
                     red_sigma: float = 4.0, slope_min: float = 25.0, slope_sigma: float = 3.0,
                     window_sigma: float = 5.0, window_min: float = 30.0,
                     agree_sigma: float = 3.0, agree_floor: float = 15.0,
                     max_abs_rv: float = 600.0, max_std: float = 20.0,
                     per_snr: bool = True, drift_sigma: float = 4.0,
                     drift_min: float = 20.0) -> dict:  # fmt: skip
    """The reconciliation rules on numpy arrays (one block of spectra).

    Parameters
    ----------
    a : mapping
        The :data:`INPUTS` (and any :data:`OPTIONAL`) as numpy arrays; ``rv_line`` and
        ``line_status`` ``(n, n_lines)``.
    sigmas : mapping
        From :func:`rv_residual_sigmas`.
    decision : array_like of int, optional
        Reviewer decisions (:func:`decision_codes`).
    wave, kinds, line_names : array_like
        Rest wavelength (Å), kind and name of each line (``rv_line``'s columns).
    tm_sigma, dsal_sigma, inspect_abs_rv, ...
        See :func:`reconcile_rv`.

    Returns
    -------
    dict
        :data:`OUTPUTS` as numpy arrays.
    """
    lam = np.asarray(a["lamost_rv"], dtype=np.float64)
    n = lam.shape[0]
    snr = (
        np.asarray(a["snr_i"], dtype=np.float64)
        if a.get("snr_i") is not None
        else np.full(n, np.nan)
    )
    f64 = {k: np.asarray(a[k], dtype=np.float64) for k in (
        "rv_tm", "rv_tm_err_stat", "rv_tml7500", "rv_tml7500_err_stat", "rv_dsal1",
        "rv_dsal1_err", "rv_dsal2", "rv_dsal2_err", "rv_dsel", "rv_dsel_err", "ew_halpha")}  # fmt: skip
    cnt = {k: np.asarray(a[k], dtype=np.int64) for k in ("rv_dsal1_n", "rv_dsal2_n", "rv_dsel_n")}
    # --- diagnostics
    with np.errstate(invalid="ignore", divide="ignore"):
        tm_lr = (
            np.log10(np.asarray(a["tm_chi2_red"], np.float64))
            if a.get("tm_chi2_red") is not None
            else np.full(n, np.nan)
        )
        tml_lr = (
            np.log10(np.asarray(a["tml7500_chi2_red"], np.float64))
            if a.get("tml7500_chi2_red") is not None
            else np.full(n, np.nan)
        )
    tm_x = _excess(tm_lr, sigmas.get("chi2_tm"), snr)
    tml_x = _excess(tml_lr, sigmas.get("chi2_tml7500"), snr)
    red_x = _excess(tm_lr - tml_lr, sigmas.get("red_ratio"), snr)
    offs = sigmas.get("line_offsets") or {}
    rv_line = np.asarray(a["rv_line"], dtype=np.float64)
    lstat = np.asarray(a["line_status"])
    nl = rv_line.shape[1]
    if wave is None or kinds is None:
        wave = np.zeros(nl)
        kinds = np.full(nl, "emission")  # unknown lines: no slope test
    if line_names is None:
        line_names = [""] * nl
    off_arr = np.array([_f(offs.get(str(nm))) for nm in line_names], dtype=np.float64)
    scat = sigmas.get("line_scatter") or {}
    sc_arr = np.array([_f(scat.get(str(nm))) for nm in line_names], dtype=np.float64)
    slope, slope_sig = _line_slope(
        rv_line, np.asarray(a["rv_line_err"], np.float64), lstat, np.asarray(wave, np.float64),
        np.asarray(kinds), off_arr, sc_arr, min_lines=4,
    )  # fmt: skip
    # --- usable candidates
    tm_ok = _tm_usable(a, "tm", check_quality=True) & ~(tm_x > chi2_sigma)
    tml_ok = _tm_usable(a, "tml7500", check_quality=True) & ~(tml_x > chi2_sigma)
    red_anom = (red_x > red_sigma) & tml_ok
    d1 = f64["rv_dsal1"]
    d1_ok = np.isfinite(d1) & ~red_anom
    d2_ok = np.isfinite(f64["rv_dsal2"]) & (cnt["rv_dsal2_n"] >= 2) & ~red_anom
    d2_ok &= f64["rv_dsal2_err"] < max_std
    dsel_ok = np.isfinite(f64["rv_dsel"]) & (cnt["rv_dsel_n"] >= 1)
    scale = sigmas.get("err_scale") or {}

    def _sc(key):
        v = _f(scale.get(key))
        return v if np.isfinite(v) else 1.0

    e_tm = f64["rv_tm_err_stat"]
    e_tml = f64["rv_tml7500_err_stat"]  # calibrated like TM's (not scaled: TML shares TM's pixels)
    e_d1 = _method_error(f64["rv_dsal1_err"], cnt["rv_dsal1_n"]) * _sc("dsal1")
    e_d2 = _method_error(f64["rv_dsal2_err"], cnt["rv_dsal2_n"]) * _sc("dsal2")
    e_el = _method_error(f64["rv_dsel_err"], cnt["rv_dsel_n"]) * _sc("dsel")

    def agree(x, ex, y, ey):
        with np.errstate(invalid="ignore"):
            return np.abs(x - y) <= np.maximum(agree_sigma * np.hypot(ex, ey), agree_floor)

    # --- wavelength-calibration error
    with np.errstate(invalid="ignore"):
        slope_bad = (np.abs(slope) > slope_min) & (np.abs(slope) > slope_sigma * slope_sig)
        window_bad = (
            tm_ok
            & tml_ok
            & ~red_anom
            & (
                np.abs(f64["rv_tm"] - f64["rv_tml7500"])
                > np.maximum(window_sigma * np.hypot(e_tm, e_tml), window_min)
            )
        )
        implausible = (
            tm_ok & d1_ok & agree(f64["rv_tm"], e_tm, d1, e_d1) & (np.abs(d1) > max_abs_rv)
        )
        # RV drifting with wavelength: TML7500 (4700-7500 A), TM (4700-8899 A) and DSAL
        # (7667-8665 A) in monotonic order, each step significant
        d_ref = np.where(d1_ok, d1, np.where(d2_ok, f64["rv_dsal2"], np.nan))
        e_ref = np.where(d1_ok, e_d1, e_d2)
        step1 = f64["rv_tm"] - f64["rv_tml7500"]
        step2 = d_ref - f64["rv_tm"]
        # the TM - TML7500 step is the smaller one (their windows overlap below 7500 A)
        big1 = np.abs(step1) > np.maximum(0.5 * drift_sigma * np.hypot(e_tm, e_tml), drift_min / 2)
        big2 = np.abs(step2) > np.maximum(drift_sigma * np.hypot(e_tm, e_ref), drift_min)
        drift = tm_ok & tml_ok & ~red_anom & big1 & big2 & (np.sign(step1) == np.sign(step2))
    wave_err = slope_bad | window_bad | implausible | drift

    # --- the paper's acceptance of the LAMOST RV
    def band(key):
        if per_snr and sigmas.get(f"{key}_bins") is not None:
            st = sigmas[f"{key}_bins"]
            b = _bin_index(snr)
            return (
                np.array([_f(x) for x in st["mean"]])[b],
                np.array([_f(x) for x in st["sigma"]])[b],
            )
        st = sigmas.get(key) or {}
        return np.full(n, _f(st.get("mean"))), np.full(n, _f(st.get("sigma")))

    m_tm, sg_tm = band("tm")
    d_lam = np.where(d1_ok, d1, np.where(d2_ok, f64["rv_dsal2"], np.nan))
    (m1, s1), (m2, s2) = band("dsal1"), band("dsal2")
    m_d = np.where(d1_ok, m1, m2)
    sg_d = np.where(d1_ok, s1, s2)
    with np.errstate(invalid="ignore"):
        acc_tm = np.isfinite(lam) & tm_ok & (np.abs(f64["rv_tm"] - lam - m_tm) <= tm_sigma * sg_tm)
        acc_d = (
            np.isfinite(lam) & np.isfinite(d_lam) & (np.abs(d_lam - lam - m_d) <= dsal_sigma * sg_d)
        )
    # --- automatic choice
    tm_corr = tm_ok & (
        (d1_ok & agree(f64["rv_tm"], e_tm, d1, e_d1))
        | (d2_ok & agree(f64["rv_tm"], e_tm, f64["rv_dsal2"], e_d2))
    )
    code = np.full(n, _CODE["NoRV_lowQuality"], np.int8)
    reason = np.full(n, "", dtype=f"<U{_STR_LEN}")
    unset = np.ones(n, bool)

    def put(mask, name, why=""):
        nonlocal unset
        m = unset & mask
        code[m] = _CODE[name]
        if why:
            reason[m] = why
        unset = unset & ~m

    put(wave_err, "NoRV_waveErr")
    put(acc_tm, "LAMOST")
    put(acc_d, "LAMOST")
    put(red_anom, "TML7500")
    put(tm_corr, "TM")
    put(d1_ok, "DSAL I")
    put(dsel_ok, "DSEL")
    put(d2_ok, "DSAL II", "DSAL II only (TM unusable or not corroborated)")
    put(tm_ok, "TM", "TM not corroborated by DSAL")
    put(np.ones(n, bool), "NoRV_lowQuality")
    # --- reviewer decisions override the rules
    dec = None if decision is None else np.asarray(decision)
    if dec is not None:
        has = dec >= 0
        code[has] = dec[has]
        reason[has] = ""
    rv = np.full(n, np.nan)
    err = np.full(n, np.nan)
    # LAMOST error: per S/N bin from the run
    le = sigmas.get("lamost_err")
    if le is not None:
        e_lam = np.array([_f(x) for x in le["sigma"]])[_bin_index(snr)]
    else:
        e_lam = sg_tm
    src = {
        "LAMOST": (lam, e_lam),
        "TM": (f64["rv_tm"], e_tm),
        "DSAL I": (d1, e_d1),
        "DSAL II": (f64["rv_dsal2"], e_d2),
        "TML7500": (f64["rv_tml7500"], e_tml),
        "DSEL": (f64["rv_dsel"], e_el),
    }
    for name, (v, e) in src.items():
        m = code == _CODE[name]
        rv[m] = v[m]
        err[m] = e[m]
    # a decision for a method without a value: no RV, and say so
    lost = np.isnan(rv) & (code < _CODE["NoRV_lowQuality"])
    if dec is not None:
        lost_dec = lost & (dec >= 0)
        reason[lost_dec] = "decision names a method without a value"
    code[lost] = _CODE["NoRV_lowQuality"]
    err[np.isnan(rv)] = np.nan
    with np.errstate(invalid="ignore"):
        big = np.abs(rv) > inspect_abs_rv
    reason = np.where(
        big & (dec < 0 if dec is not None else True),
        np.where(reason == "", f"|rv| > {inspect_abs_rv:g} km/s",
                 np.char.add(reason, f"; |rv| > {inspect_abs_rv:g} km/s")),
        reason,
    ).astype(f"<U{_STR_LEN}")  # fmt: skip
    mjd = np.asarray(a["mjd"], dtype=np.float64)
    flag = (np.isfinite(rv) & (mjd > MJD_RV_RELIABLE)).astype(np.int8)
    return {
        "rv": rv,
        "rv_err": err,
        "rv_from": np.asarray(RV_FROM, dtype="<U15")[code],
        "rv_inspect": reason,
        "rv_flag": flag,
        "tm_chi2_excess": tm_x,
        "red_end_excess": red_x,
        "line_rv_slope": slope,
    }


def _block(*arrays, names, sigmas, wave, kinds, line_names, opts):
    a = dict(zip(names, arrays, strict=True))
    shape = np.shape(a["lamost_rv"])
    flat = {k: (v.reshape(-1, v.shape[-1]) if k in _LINE_VARS else v.reshape(-1))
            for k, v in a.items()}  # fmt: skip
    dec = flat.pop("_decision", None)
    r = reconcile_arrays(
        flat, sigmas, decision=dec, wave=wave, kinds=kinds, line_names=line_names, **opts
    )
    return tuple(r[k].reshape(shape) for k in OUTPUTS)


@stage(
    "reconcile_rv",
    module="RVMM",
    inputs=INPUTS,
    outputs=OUTPUTS,
    version="1",
    description="one RV per spectrum: LAMOST, TM, DSAL I/II, TML7500, DSEL or NoRV, by rules",
)
def reconcile_rv(
    ds: xr.Dataset,
    *,
    sigmas: Mapping | None = None,
    decisions=None,
    tm_sigma: float = 3.0,
    dsal_sigma: float = 2.0,
    inspect_abs_rv: float = 150.0,
    chi2_sigma: float = 5.0,
    red_sigma: float = 4.0,
    slope_min: float = 25.0,
    slope_sigma: float = 3.0,
    agree_sigma: float = 3.0,
    agree_floor: float = 15.0,
    per_snr: bool = True,
) -> xr.Dataset:
    """Reconcile the RVs of each spectrum into one (paper: RVMM), lazily.

    Rules, applied in this order (the first that applies decides; see
    ``docs/rv_reconcile.md``):

    0. A reviewer's decision (``decisions``) wins: the named method's RV (or no RV).
    1. **Wavelength-calibration error** → ``NoRV_waveErr``: the absorption-line RVs drift
       with wavelength (weighted slope over the DSAL lines, after the run's per-line
       offsets, steeper than ``slope_min`` km/s per 1000 Å and ``slope_sigma`` σ), or TM and
       TML7500 (both good) disagree by more than max(5σ, 30 km/s) without a red-end anomaly,
       or TM and DSAL I agree at an implausible |RV| > 600 km/s.
    2. **LAMOST** when TM is usable and |TM − LAMOST − μ_TM| ≤ ``tm_sigma`` σ_TM.
    3. **LAMOST** when DSAL (I if available, else II with ≥ 2 lines) agrees:
       |DSAL − LAMOST − μ| ≤ ``dsal_sigma`` σ (σ, μ: :func:`rv_residual_sigmas`).
    4. **TML7500** when a red-end anomaly is detected: log10(χ²_red TM / χ²_red TML7500)
       more than ``red_sigma`` robust σ above the run's median in the spectrum's S/N bin,
       with TML7500 usable (DSAL is then not used: its lines are all beyond 7600 Å).
    5. **TM** when DSAL I or DSAL II agrees with it (within max(``agree_sigma`` σ,
       ``agree_floor``)).
    6. **DSAL I** (≥ 3 mutually consistent lines).
    7. **DSEL** (Hα emission detected and DSEL measured).
    8. **DSAL II** (≥ 2 lines, std < 20 km/s) — queued for inspection.
    9. **TM** alone — queued for inspection.
    10. **NoRV_lowQuality**.

    TM (and TML7500) is *usable* when its status is 0, its quality bits are 0 (minimum not at
    the grid edge, not ambiguous) and its reduced χ² is not more than ``chi2_sigma`` robust σ
    above the run's median for its S/N bin (``tm_chi2_excess``) — the A star at S/N 9 whose
    TM says 489 km/s is not used. Every final |rv| > ``inspect_abs_rv`` is queued
    (``rv_inspect``), as the paper inspected them.

    Parameters
    ----------
    ds : xarray.Dataset
        rvmm outputs and store metadata: :data:`INPUTS`; :data:`OPTIONAL` used when present.
    sigmas : mapping, optional
        :func:`rv_residual_sigmas` output; computed (eagerly, 1-D variables only) from
        ``ds`` when None.
    decisions : pandas.DataFrame, optional
        Columns ``obsid`` and ``decision`` (a :data:`RV_FROM` value), e.g. from
        :func:`mspec.review.read_decisions`; obsids not in ``ds`` are ignored.
    tm_sigma, dsal_sigma : float
        Acceptance bands (σ) of the LAMOST RV against TM (3) and DSAL (2).
    inspect_abs_rv : float
        |rv| above which a spectrum is queued (km/s).
    chi2_sigma : float
        TM quality: robust σ of the reduced-χ² excess that makes TM unusable.
    red_sigma : float
        Red-end anomaly threshold (robust σ).
    slope_min, slope_sigma : float
        Wavelength-calibration test: line-RV slope (km/s per 1000 Å) and its significance.
    agree_sigma, agree_floor : float
        Agreement of two methods: |a − b| ≤ max(agree_sigma √(σa² + σb²), agree_floor km/s).
    per_snr : bool
        True (default): the acceptance bands of rules 2 and 3 use μ and σ of the
        spectrum's S/N bin (``tm_bins``, ``dsal1_bins``, ``dsal2_bins``); False: the paper's
        single σ of the whole run (a 3σ band of ±55 km/s then accepts LAMOST RVs 40 km/s
        off at S/N 80, where TM and LAMOST agree to a few km/s).
    merge : bool
        Added by the stage contract.

    Returns
    -------
    xarray.Dataset
        ``rv``, ``rv_err`` (km/s, NaN without an RV), ``rv_from`` (a :data:`RV_FROM`
        value), ``rv_inspect`` (reason the spectrum is queued, or ""), ``rv_flag`` (int8: 1
        when rv is not null and MJD > 55940), and the diagnostics ``tm_chi2_excess``,
        ``red_end_excess`` (robust σ) and ``line_rv_slope`` (km/s per 1000 Å). The sigmas
        used are in the attribute ``rv_sigmas`` (JSON).

    Raises
    ------
    mspec.variables.VariableError
        A required input is missing or malformed.
    ValueError, TypeError
        A bad option or ``decisions`` (named in the message).
    """
    import json

    for name, v in (
        ("tm_sigma", tm_sigma),
        ("dsal_sigma", dsal_sigma),
        ("inspect_abs_rv", inspect_abs_rv),
        ("chi2_sigma", chi2_sigma),
        ("red_sigma", red_sigma),
        ("slope_min", slope_min),
        ("slope_sigma", slope_sigma),
        ("agree_sigma", agree_sigma),
        ("agree_floor", agree_floor),
    ):
        if isinstance(v, bool) or not isinstance(v, int | float) or not (v > 0):
            raise ValueError(f"{name} must be a positive number, got {v!r}")
    if not isinstance(per_snr, bool):
        raise TypeError(f"per_snr must be True or False, got {per_snr!r}")
    if sigmas is None:
        sigmas = rv_residual_sigmas(ds)
    if not isinstance(sigmas, Mapping) or "tm" not in sigmas:
        raise TypeError("sigmas must be the dict returned by rv_residual_sigmas")
    if decisions is not None:
        cols = getattr(decisions, "columns", None)
        if cols is None or not {"obsid", "decision"} <= set(cols):
            raise TypeError("decisions must be a pandas DataFrame with columns obsid, decision")
        bad = sorted(set(np.asarray(decisions["decision"]).astype(str)) - set(RV_FROM))
        if bad:
            raise ValueError(f"decisions has unknown decision values {bad}; known: {RV_FROM}")
    names = [*INPUTS, *[v for v in OPTIONAL if v in ds.variables]]
    args = [ds[v] for v in names]
    core = [["lines"] if v in _LINE_VARS else [] for v in names]
    obsid = ds["obsid"] if "obsid" in ds.variables else None
    if decisions is not None and len(decisions) and obsid is None:
        raise ValueError("decisions were given but ds has no obsid to match them to")
    if decisions is not None and obsid is not None and len(decisions):
        table = decisions[["obsid", "decision"]].copy()
        dec = xr.apply_ufunc(
            decision_codes,
            obsid,
            kwargs={"decisions": table},
            dask="parallelized",
            output_dtypes=[np.int8],
        )
        if ds["lamost_rv"].chunks is not None and dec.chunks is None:
            dec = dec.chunk({"spectra": ds["lamost_rv"].chunksizes["spectra"]})
        names.append("_decision")
        args.append(dec)
        core.append([])
    if ds["lamost_rv"].chunks is not None:
        chunks = ds["lamost_rv"].chunksizes["spectra"]
        args = [x.chunk({"spectra": chunks}) if x.chunks is None else x for x in args]
        args = [x.chunk({"lines": -1}) if "lines" in x.dims else x for x in args]
    args = [x.drop_vars([c for c in x.coords if c not in x.dims], errors="ignore")
            for x in args]  # fmt: skip
    wave = (
        _small(ds["line_wavelength"]).astype(np.float64)
        if "line_wavelength" in ds.variables
        else None
    )
    has_lines = "lines" in ds.variables or "lines" in ds.coords
    kinds = _line_kinds(ds) if has_lines else None
    line_names = _small(ds["lines"]).astype(str).tolist() if has_lines else None
    opts = dict(
        tm_sigma=float(tm_sigma),
        dsal_sigma=float(dsal_sigma),
        inspect_abs_rv=float(inspect_abs_rv),
        chi2_sigma=float(chi2_sigma),
        red_sigma=float(red_sigma),
        slope_min=float(slope_min),
        slope_sigma=float(slope_sigma),
        agree_sigma=float(agree_sigma),
        agree_floor=float(agree_floor),
        per_snr=per_snr,
    )
    outs = xr.apply_ufunc(
        _block,
        *args,
        input_core_dims=core,
        output_core_dims=[[]] * len(OUTPUTS),
        dask="parallelized",
        output_dtypes=[
            np.float64,
            np.float64,
            np.dtype("<U15"),
            np.dtype(f"<U{_STR_LEN}"),
            np.int8,
            np.float64,
            np.float64,
            np.float64,
        ],
        kwargs=dict(
            names=names,
            sigmas=dict(sigmas),
            wave=wave,
            kinds=kinds,
            line_names=line_names,
            opts=opts,
        ),
    )
    out = xr.Dataset(dict(zip(OUTPUTS, outs, strict=True)))
    if "obsid" in ds.coords:
        out = out.assign_coords(obsid=ds["obsid"])
    out = annotate(out)
    out["rv_flag"].attrs.update(
        flag_values=np.array([0, 1], np.int8), flag_meanings="not_recommended recommended"
    )
    out.attrs["rv_sigmas"] = json.dumps(_jsonable(sigmas))
    return out


def _jsonable(x):
    if isinstance(x, Mapping):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_jsonable(v) for v in x]
    if isinstance(x, float | np.floating):
        v = float(x)
        return v if math.isfinite(v) else None
    if isinstance(x, np.integer):
        return int(x)
    return x
