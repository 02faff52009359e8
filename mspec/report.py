"""Accuracy of a run against the simulation truth, as a JSON-ready dict and a Markdown report.

Pure functions of a catalog table (a :class:`pandas.DataFrame`, one row per spectrum): no
pipeline knowledge, no I/O except :func:`write_report`. The columns used are

- predictions: ``spt_class``, ``wdm_class``, ``dmgm_class`` (CNN classes), ``rv`` and
  ``rv_err`` (the reconciled RV, when the run has it), ``rv_tm``, ``rv_tm_err``,
  ``rv_tml7500``, ``lamost_rv`` (km/s), ``teff``/``teff_err`` (K), ``logg``,
  ``m_h``, ``alpha_m`` and their ``*_err`` (dex);
- truth: ``true_class`` (OB, A, F, G, K, M, WD, GALAXY, QSO), ``true_lumclass`` (``dM``/``gM``
  for M stars, else empty), ``true_teff``, ``true_logg``, ``true_m_h``, ``true_alpha_m``,
  ``true_rv``;
- ``snr_i`` (S/N in the i band) for the S/N cuts and bins.

Any column may be missing: what needs it is skipped and named in ``metrics["skipped"]``.

Definitions (the choices where the paper is silent):

- Classifier accuracy = correct / evaluated, where spectra without a prediction (missing or
  empty class) count as wrong and appear in the confusion matrix column ``"(none)"``.
  CNN-SPT is scored on every spectrum whose true class is one of its 8 classes, with a true
  WD counted as OB (CNN-SPT has no WD class); CNN-WDM on true WD and M; CNN-dMgM on true M
  with a known luminosity class.
- Residuals are prediction - truth. ``bias`` is their median, ``sigma`` the robust standard
  deviation 1.4826 * MAD, ``outlier_frac`` (RV only) the fraction with
  ``|residual| > rv_outlier_kms``.
- ``slope``/``intercept``: Theil-Sen fit of predicted vs true (median of pairwise slopes; at
  most ``_MAX_PAIRS`` random pairs, fixed seed, for large samples); ``slope_ols`` the ordinary
  least-squares slope. A slope < 1 means the predictions compress the true scale.
- ``err_calibration`` = std((pred - true) / err) over spectra with err > 0: 1 when the quoted
  errors match the scatter, > 1 when they are too small. ``err_calibration_robust`` is the
  same with 1.4826 * MAD. ``median_err`` is the median quoted (internal) error, the quantity
  the paper's "internal errors" describe.
- RV and CNN-TLMA statistics are for true M stars with S/N_i > ``snr_min`` (``"selected"``);
  RV also over all S/N (``"all"``) and per S/N_i bin; CNN-TLMA separately for true dM and gM.

Non-finite numbers are written as ``None`` so that ``json.dumps(metrics, allow_nan=False)``
works.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

__all__ = [
    "SPT_CLASSES",
    "WDM_CLASSES",
    "DMGM_CLASSES",
    "TLMA_PARAMS",
    "PAPER",
    "robust_sigma",
    "theil_sen",
    "residual_stats",
    "confusion_matrix",
    "accuracy_metrics",
    "accuracy_columns",
    "write_report",
]

# Copies of mspec.ml.models.CLASSES (that module imports torch; a test keeps them equal).
#: CNN-SPT classes, in output order.
SPT_CLASSES: tuple[str, ...] = ("OB", "A", "F", "G", "K", "M", "GALAXY", "QSO")
#: CNN-WDM classes.
WDM_CLASSES: tuple[str, ...] = ("WD", "M")
#: CNN-dMgM classes.
DMGM_CLASSES: tuple[str, ...] = ("dM", "gM")

#: CNN-TLMA parameters: column -> (label for tables, unit).
TLMA_PARAMS: dict[str, tuple[str, str]] = {
    "teff": ("Teff", "K"),
    "logg": ("logg", "dex"),
    "m_h": ("[M/H]", "dex"),
    "alpha_m": ("[α/M]", "dex"),
}

#: Li et al. 2025 headline figures (fractions; K; dex; km/s).
PAPER: dict = {
    "accuracy": {"spt": 0.9918, "wdm": 0.9968, "dmgm": 0.9985},
    "internal_err": {
        "dM": {"teff": 30.0, "logg": 0.07, "m_h": 0.07, "alpha_m": 0.02},
        "gM": {"teff": 17.0, "logg": 0.07, "m_h": 0.05, "alpha_m": 0.02},
    },
    "vs_apogee": {
        "dM": {"teff": 34.0, "logg": 0.12, "m_h": 0.09, "alpha_m": 0.03},
        "gM": {"teff": 14.0, "logg": 0.07, "m_h": 0.04, "alpha_m": 0.02},
    },
    "rv_vs_gaia": {"sigma": 11.0, "sigma_snr_gt_20": 7.0, "offset": -5.0},
}

_CLASSIFIERS = {
    # key: (name, prediction column, classes)
    "spt": ("CNN-SPT", "spt_class", SPT_CLASSES),
    "wdm": ("CNN-WDM", "wdm_class", WDM_CLASSES),
    "dmgm": ("CNN-dMgM", "dmgm_class", DMGM_CLASSES),
}
_RV = {
    # key: (name, column)
    "rv": ("reconciled", "rv"),
    "tm": ("TM", "rv_tm"),
    "tml7500": ("TML7500", "rv_tml7500"),
    "lamost": ("LAMOST", "lamost_rv"),
}
_NONE = "(none)"
_MAX_PAIRS = 200_000


# --------------------------------------------------------------------------- statistics


def _finite(x) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64).ravel()
    return x[np.isfinite(x)]


def _f(x) -> float | None:
    """A JSON-safe float: None for NaN/inf/None."""
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def robust_sigma(x) -> float:
    """Robust standard deviation 1.4826 * median(|x - median(x)|) of the finite values.

    Parameters
    ----------
    x : array-like
        Values (any unit; the result has the same unit).

    Returns
    -------
    float
        NaN when there is no finite value.
    """
    x = _finite(x)
    if x.size == 0:
        return float("nan")
    return float(1.4826 * np.median(np.abs(x - np.median(x))))


def theil_sen(x, y, *, max_pairs: int = _MAX_PAIRS, seed: int = 0) -> tuple[float, float]:
    """Theil-Sen line through (x, y): median of pairwise slopes, median intercept.

    Parameters
    ----------
    x, y : array-like
        Abscissa (e.g. true value) and ordinate (predicted value), same length; pairs with a
        non-finite member are dropped, pairs with equal x are ignored.
    max_pairs : int
        With more than this many pairs, this many random pairs (fixed ``seed``) are used, so
        the cost stays O(max_pairs) for any sample size.
    seed : int
        Seed of the pair sampling.

    Returns
    -------
    (slope, intercept) : tuple of float
        NaN when fewer than 2 distinct x values remain.
    """
    x = np.asarray(x, dtype=np.float64).ravel()
    y = np.asarray(y, dtype=np.float64).ravel()
    if x.shape != y.shape:
        raise ValueError(f"x and y must have the same length, got {x.size} and {y.size}")
    if max_pairs < 1:
        raise ValueError(f"max_pairs must be positive, got {max_pairs}")
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    n = x.size
    if n < 2:
        return float("nan"), float("nan")
    if n * (n - 1) // 2 <= max_pairs:
        i, j = np.triu_indices(n, k=1)
    else:
        rng = np.random.default_rng(seed)
        i = rng.integers(0, n, max_pairs)
        j = rng.integers(0, n, max_pairs)
    dx = x[j] - x[i]
    keep = dx != 0
    if not keep.any():
        return float("nan"), float("nan")
    slope = float(np.median((y[j] - y[i])[keep] / dx[keep]))
    return slope, float(np.median(y - slope * x))


def residual_stats(pred, true, err=None, *, outlier: float | None = None) -> dict:
    """Statistics of ``pred - true`` over the pairs where both are finite.

    Parameters
    ----------
    pred, true : array-like
        Predicted and true values (same unit, e.g. km/s, K or dex).
    err : array-like, optional
        Quoted 1-sigma errors of ``pred`` (same unit); adds ``median_err``,
        ``err_calibration`` and ``err_calibration_robust``.
    outlier : float, optional
        Threshold on ``|pred - true|`` (same unit) for ``outlier_frac``.

    Returns
    -------
    dict
        ``n``, ``bias`` (median residual), ``mean``, ``sigma`` (1.4826 MAD), ``std``,
        ``slope``, ``intercept`` (Theil-Sen), ``slope_ols``, and the optional keys above;
        None where undefined (e.g. ``n == 0``).
    """
    pred = np.asarray(pred, dtype=np.float64).ravel()
    true = np.asarray(true, dtype=np.float64).ravel()
    if pred.shape != true.shape:
        raise ValueError(f"pred and true must have the same length, got {pred.size}, {true.size}")
    ok = np.isfinite(pred) & np.isfinite(true)
    p, t = pred[ok], true[ok]
    d = p - t
    n = int(d.size)
    out: dict = {"n": n}
    out["bias"] = _f(np.median(d)) if n else None
    out["mean"] = _f(np.mean(d)) if n else None
    out["sigma"] = _f(robust_sigma(d))
    out["std"] = _f(np.std(d, ddof=1)) if n > 1 else None
    slope, icpt = theil_sen(t, p)
    out["slope"], out["intercept"] = _f(slope), _f(icpt)
    out["slope_ols"] = _f(np.polyfit(t, p, 1)[0]) if n > 1 and np.ptp(t) > 0 else None
    if outlier is not None:
        out["outlier_kms"] = float(outlier)
        out["outlier_frac"] = _f(np.mean(np.abs(d) > outlier)) if n else None
    if err is not None:
        e = np.asarray(err, dtype=np.float64).ravel()
        if e.shape != pred.shape:
            raise ValueError(f"err must have the length of pred ({pred.size}), got {e.size}")
        e = e[ok]
        good = np.isfinite(e) & (e > 0)
        z = d[good] / e[good]
        out["median_err"] = _f(np.median(e[good])) if good.any() else None
        out["err_calibration"] = _f(np.std(z, ddof=1)) if z.size > 1 else None
        out["err_calibration_robust"] = _f(robust_sigma(z))
    return out


def confusion_matrix(true, pred, classes: Sequence[str]) -> pd.DataFrame:
    """Counts of (true, predicted) labels: rows true, columns predicted.

    Parameters
    ----------
    true, pred : array-like of str
        True and predicted labels, same length; an empty or missing prediction is counted in
        the column ``"(none)"``. Rows whose true label is not in ``classes`` are ignored.
    classes : sequence of str
        The classes, in display order. Predicted labels outside them get extra columns.

    Returns
    -------
    pandas.DataFrame
        int64 counts, index ``classes`` (name "true"), columns ``classes`` plus any extra
        predicted labels (name "predicted").
    """
    classes = [str(c) for c in classes]
    if not classes:
        raise ValueError("classes must not be empty")
    t = _labels(pd.Series(np.asarray(true, dtype=object)))
    p = _labels(pd.Series(np.asarray(pred, dtype=object)))
    if t.size != p.size:
        raise ValueError(f"true and pred must have the same length, got {t.size}, {p.size}")
    p = np.where(p == "", _NONE, p)
    keep = np.isin(t, classes)
    t, p = t[keep], p[keep]
    extra = sorted(set(p.tolist()) - set(classes), key=lambda c: (c == _NONE, c))
    cols = classes + extra
    cm = pd.crosstab(
        pd.Categorical(t, categories=classes), pd.Categorical(p, categories=cols), dropna=False
    )
    cm = cm.reindex(index=classes, columns=cols, fill_value=0).astype(np.int64)
    cm.index.name, cm.columns.name = "true", "predicted"
    return cm


# --------------------------------------------------------------------------- catalog access


def _labels(s: pd.Series) -> np.ndarray:
    """String labels with missing -> '' and bytes decoded, whitespace stripped.

    An object array whose rows share one string per distinct label (8 bytes a row): a
    fixed-width unicode array of a catalog's reason column took ~300 bytes a row.
    """
    codes, uniques = pd.factorize(s, use_na_sentinel=True)
    lab = [u.decode() if isinstance(u, bytes) else u for u in uniques]
    lab = pd.Series(lab, dtype="string").fillna("").str.strip().to_numpy(dtype=object)
    table = np.empty(len(lab) + 1, dtype=object)
    table[: len(lab)] = lab
    table[-1] = ""  # code -1: missing
    return table[codes]


def _num(cat: pd.DataFrame, col: str) -> np.ndarray:
    return pd.to_numeric(cat[col], errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)


def _snr_labels(edges: Sequence[float]) -> list[str]:
    lab = [f"({_g(a)},{_g(b)}]" for a, b in zip(edges[:-1], edges[1:])]
    return [*lab, f">{_g(edges[-1])}"]


def _g(x: float) -> str:
    return f"{x:g}"


def _snr_bin_masks(snr: np.ndarray, edges: Sequence[float]) -> dict[str, np.ndarray]:
    labels = _snr_labels(edges)
    masks = {}
    for k, lab in enumerate(labels):
        lo = edges[k]
        hi = edges[k + 1] if k + 1 < len(edges) else np.inf
        masks[lab] = (snr > lo) & (snr <= hi)
    return masks


def _check_table(cat) -> None:
    """A pandas DataFrame, or a column table that reads columns when asked for (``name in
    cat``, ``len(cat)``, ``cat[name]`` -> Series, ``cat.columns``; the run report's reader of
    a survey's catalog): the statistics read one column at a time either way."""
    if isinstance(cat, pd.DataFrame):
        return
    if not all(hasattr(cat, a) for a in ("columns", "__contains__", "__getitem__", "__len__")):
        raise TypeError(f"cat must be a pandas DataFrame, got {type(cat).__name__}")


def _check_args(cat, snr_edges, snr_min, rv_outlier_kms) -> list[float]:
    _check_table(cat)
    try:
        edges = [float(e) for e in snr_edges]
    except (TypeError, ValueError) as exc:
        raise ValueError(f"snr_edges must be a sequence of numbers, got {snr_edges!r}") from exc
    if len(edges) < 1 or not all(math.isfinite(e) for e in edges):
        raise ValueError(f"snr_edges must be finite numbers, got {snr_edges!r}")
    if any(b <= a for a, b in zip(edges[:-1], edges[1:])):
        raise ValueError(f"snr_edges must be strictly increasing, got {snr_edges!r}")
    if not (isinstance(snr_min, (int, float)) and math.isfinite(snr_min)):
        raise ValueError(f"snr_min must be a finite number, got {snr_min!r}")
    if not (isinstance(rv_outlier_kms, (int, float)) and rv_outlier_kms > 0):
        raise ValueError(f"rv_outlier_kms must be a positive number, got {rv_outlier_kms!r}")
    return edges


# --------------------------------------------------------------------------- metrics


def accuracy_columns(names) -> list[str]:
    """The columns of ``names`` that :func:`accuracy_metrics` and
    :func:`mspec.plots.accuracy_figure` may read, in the order of ``names``.

    Parameters
    ----------
    names : iterable of str
        A catalog's column names.

    Returns
    -------
    list of str
        ``snr_i``, every ``true_*`` column, the classifier, RV (with ``*_err``) and CNN-TLMA
        (with ``*_err``) columns that are present.
    """
    used = {"snr_i", *(c for _, c, _ in _CLASSIFIERS.values())}
    for _, col in _RV.values():
        used |= {col, f"{col}_err"}
    for p in TLMA_PARAMS:
        used |= {p, f"{p}_err"}
    return [c for c in names if c in used or str(c).startswith("true_")]


def accuracy_metrics(
    cat: pd.DataFrame,
    *,
    snr_edges: Sequence[float] = (0.0, 20.0, 50.0, 100.0),
    snr_min: float = 20.0,
    rv_outlier_kms: float = 50.0,
) -> dict:
    """Accuracy of the classifiers, RVs and CNN-TLMA parameters against the truth.

    Parameters
    ----------
    cat : pandas.DataFrame
        One row per spectrum with predictions and ``true_*`` columns (see the module
        docstring); missing columns skip what needs them. A column table that reads its
        columns on demand (``in``, ``len``, ``[name]`` -> Series, ``columns``) works too.
    snr_edges : sequence of float
        S/N_i bin edges: bins ``(e0, e1], (e1, e2], ..., > e_last``. Default: the paper's
        (0, 20], (20, 50], (50, 100], > 100. Spectra with S/N_i <= e0 fall in no bin.
    snr_min : float
        S/N_i cut (exclusive) for the ``"selected"`` RV and CNN-TLMA statistics.
    rv_outlier_kms : float
        |RV - true RV| above which an RV is an outlier (km/s).

    Returns
    -------
    dict
        JSON-serialisable::

            {"n_spectra", "snr_bins", "snr_min", "skipped": [str, ...],
             "classification": {"spt"|"wdm"|"dmgm": {"name", "selection", "classes", "n",
                 "n_correct", "n_unpredicted", "accuracy", "recall": {cls: frac},
                 "precision": {cls: frac}, "confusion": {true: {pred: count}},
                 "by_snr": {bin: {"n", "accuracy"}}}},
             "rv": {"selection", "cut", "outlier_kms",
                 "rv"|"tm"|"tml7500"|"lamost": {"name",
                 "column", "selected": stats, "all": stats, "by_snr": {bin: stats}}},
             "tlma": {"selection", "cut",
                 "dM"|"gM": {param: stats + {"by_snr": {bin: stats}}}}}

        with ``stats`` from :func:`residual_stats` (fractions in [0, 1], RV in km/s, Teff in
        K, the others in dex). Sections whose columns are missing are absent and explained in
        ``skipped``.

    Raises
    ------
    TypeError
        If ``cat`` is not a DataFrame.
    ValueError
        For bad ``snr_edges``, ``snr_min`` or ``rv_outlier_kms``.
    """
    edges = _check_args(cat, snr_edges, snr_min, rv_outlier_kms)
    n = len(cat)
    skipped: list[str] = []
    m: dict = {
        "n_spectra": int(n),
        "snr_bins": _snr_labels(edges),
        "snr_min": float(snr_min),
        "skipped": skipped,
    }
    if "snr_i" in cat:
        snr = _num(cat, "snr_i")
        bins = _snr_bin_masks(snr, edges)
        cut = snr > snr_min
        cut_text = f"S/N_i > {_g(snr_min)}"
    else:
        snr = None
        bins = {}
        cut = np.ones(n, bool)
        cut_text = "all S/N (snr_i missing)"
        skipped.append("S/N_i cut and per-S/N bins: missing column snr_i")

    if "true_class" in cat:
        tclass = _labels(cat["true_class"])
    else:
        tclass = None
        skipped.append("everything scored against the truth: missing column true_class")
        return m
    tlum = _labels(cat["true_lumclass"]) if "true_lumclass" in cat else None

    # ---- classifiers
    cls: dict = {}
    for key, (name, col, classes) in _CLASSIFIERS.items():
        if col not in cat:
            skipped.append(f"{name} accuracy: missing column {col}")
            continue
        pred = _labels(cat[col])
        if key == "spt":
            truth = np.where(tclass == "WD", "OB", tclass)
            sel = np.isin(truth, classes)
            text = "true class in the CNN-SPT classes; true WD counted as OB"
        elif key == "wdm":
            truth = tclass
            sel = np.isin(truth, classes)
            text = "true WD and M"
        else:
            if tlum is None:
                skipped.append(f"{name} accuracy: missing column true_lumclass")
                continue
            truth = tlum
            sel = (tclass == "M") & np.isin(tlum, classes)
            text = "true M with a known luminosity class"
        cls[key] = _class_scores(name, text, truth, pred, sel, classes, bins)
    m["classification"] = cls

    # ---- radial velocities
    isM = tclass == "M"
    if "true_rv" not in cat:
        skipped.append("RV accuracy: missing column true_rv")
    else:
        trv = _num(cat, "true_rv")
        rv: dict = {
            "selection": f"true M, {cut_text}",
            "cut": cut_text,
            "outlier_kms": float(rv_outlier_kms),
        }
        for key, (name, col) in _RV.items():
            if col not in cat:
                skipped.append(f"{name} RV accuracy: missing column {col}")
                continue
            pred = _num(cat, col)
            err = _num(cat, f"{col}_err") if f"{col}_err" in cat else None

            def st(mask, pred=pred, err=err):
                e = None if err is None else err[mask]
                return residual_stats(pred[mask], trv[mask], e, outlier=rv_outlier_kms)

            entry = {"name": name, "column": col, "selected": st(isM & cut), "all": st(isM)}
            entry["by_snr"] = {b: st(isM & mk) for b, mk in bins.items()}
            rv[key] = entry
        m["rv"] = rv

    # ---- CNN-TLMA
    if tlum is None:
        skipped.append("CNN-TLMA accuracy: missing column true_lumclass")
    else:
        tl: dict = {"selection": f"true M, {cut_text}, by true luminosity class", "cut": cut_text}
        for lum in DMGM_CLASSES:
            sel_l = isM & (tlum == lum)
            per: dict = {}
            for p in TLMA_PARAMS:
                miss = [c for c in (p, f"true_{p}") if c not in cat]
                if miss:
                    if lum == DMGM_CLASSES[0]:
                        skipped.append(f"CNN-TLMA {p}: missing column {', '.join(miss)}")
                    continue
                pred, true = _num(cat, p), _num(cat, f"true_{p}")
                err = _num(cat, f"{p}_err") if f"{p}_err" in cat else None
                if err is None and lum == DMGM_CLASSES[0]:
                    skipped.append(f"CNN-TLMA {p} error calibration: missing column {p}_err")

                def st(mask, pred=pred, true=true, err=err):
                    e = None if err is None else err[mask]
                    return residual_stats(pred[mask], true[mask], e)

                entry = st(sel_l & cut)
                entry["by_snr"] = {b: st(sel_l & mk) for b, mk in bins.items()}
                per[p] = entry
            tl[lum] = per
        m["tlma"] = tl
    return _jsonable(m)


def _class_scores(name, text, truth, pred, sel, classes, bins) -> dict:
    t, p = truth[sel], pred[sel]
    ok = t == p
    n = int(t.size)
    cm = confusion_matrix(t, p, classes)
    recall = {c: _f(cm.loc[c, c] / cm.loc[c].sum()) if cm.loc[c].sum() else None for c in classes}
    colsum = cm.sum(axis=0)
    precision = {c: _f(cm.loc[c, c] / colsum[c]) if colsum[c] else None for c in classes}
    by = {}
    for b, mk in bins.items():
        k = mk[sel]
        by[b] = {"n": int(k.sum()), "accuracy": _f(ok[k].mean()) if k.any() else None}
    return {
        "name": name,
        "selection": text,
        "classes": list(classes),
        "n": n,
        "n_correct": int(ok.sum()),
        "n_unpredicted": int((p == "").sum()),
        "accuracy": _f(ok.mean()) if n else None,
        "recall": recall,
        "precision": precision,
        "confusion": {str(r): {str(c): int(v) for c, v in row.items()} for r, row in cm.iterrows()},
        "by_snr": by,
    }


def _jsonable(obj):
    """Recursively turn numpy scalars into Python ones and non-finite floats into None."""
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return _f(obj)
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if obj is None or isinstance(obj, str):
        return obj
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"metrics value of type {type(obj).__name__} is not JSON-serialisable")


# --------------------------------------------------------------------------- formatting


def _na(x) -> bool:
    return x is None or (isinstance(x, float) and not math.isfinite(x))


def _pct(x) -> str:
    return "n/a" if _na(x) else f"{100 * x:.2f}%"


def _kms(x, signed: bool = False) -> str:
    return "n/a" if _na(x) else (f"{x:+.1f} km/s" if signed else f"{x:.1f} km/s")


def _param(p: str, x, signed: bool = False) -> str:
    if _na(x):
        return "n/a"
    if TLMA_PARAMS[p][1] == "K":
        return f"{x:+.0f} K" if signed else f"{x:.0f} K"
    return f"{x:+.3f} dex" if signed else f"{x:.3f} dex"


def _num_s(x, fmt: str = ".3f") -> str:
    return "n/a" if _na(x) else format(x, fmt)


def _cell(s) -> str:
    return str(s).replace("\n", " ").replace("|", "\\|")


def _table(header: Sequence[str], rows: Iterable[Sequence]) -> list[str]:
    out = ["| " + " | ".join(_cell(h) for h in header) + " |"]
    out.append("|" + "|".join("---" for _ in header) + "|")
    out += ["| " + " | ".join(_cell(c) for c in r) + " |" for r in rows]
    return out


def _summary_rows(m: dict) -> list[list[str]]:
    rows = []
    cls = m.get("classification", {})
    for key in ("spt", "wdm", "dmgm"):
        c = cls.get(key)
        if c is None:
            continue
        rows.append(
            [
                f"{c['name']} accuracy ({c['selection']}; N = {c['n']})",
                _pct(c.get("accuracy")),
                _pct(PAPER["accuracy"][key]),
            ]
        )
    rv = m.get("rv", {})
    # the paper's RV figures (vs Gaia) are for its recommended, i.e. reconciled, RV
    paper_key = "rv" if "rv" in rv else "tm"
    for key in ("rv", "tm", "tml7500", "lamost"):
        r = rv.get(key)
        if r is None:
            continue
        s, a = r["selected"], r["all"]
        cut = rv["selection"]
        paper = key == paper_key
        rows += [
            [
                f"{r['name']} RV − true: bias ({cut}; N = {s['n']})",
                _kms(s.get("bias"), True),
                f"{PAPER['rv_vs_gaia']['offset']:+.0f} km/s (vs Gaia)" if paper else "—",
            ],
            [
                f"{r['name']} RV − true: robust σ ({cut})",
                _kms(s.get("sigma")),
                f"{PAPER['rv_vs_gaia']['sigma_snr_gt_20']:.0f} km/s (vs Gaia, S/N > 20)"
                if paper
                else "—",
            ],
            [
                f"{r['name']} RV − true: robust σ (true M, all S/N; N = {a['n']})",
                _kms(a.get("sigma")),
                f"{PAPER['rv_vs_gaia']['sigma']:.0f} km/s (vs Gaia)" if paper else "—",
            ],
            [
                f"{r['name']} RV outliers, |Δ| > {rv['outlier_kms']:g} km/s ({cut})",
                _pct(s.get("outlier_frac")),
                "—",
            ],
        ]
    tl = m.get("tlma", {})
    for lum in DMGM_CLASSES:
        for p, st in tl.get(lum, {}).items():
            label = TLMA_PARAMS[p][0]
            rows.append(
                [
                    f"{lum} {label}: robust σ vs truth · bias · slope "
                    f"({tl.get('cut', '')}; N = {st['n']})",
                    f"{_param(p, st.get('sigma'))} · {_param(p, st.get('bias'), True)} · "
                    f"{_num_s(st.get('slope'), '.2f')}",
                    f"{_param(p, PAPER['vs_apogee'][lum][p])} (vs APOGEE)",
                ]
            )
            rows.append(
                [
                    f"{lum} {label}: median internal error · std(Δ/err)",
                    f"{_param(p, st.get('median_err'))} · "
                    f"{_num_s(st.get('err_calibration'), '.2f')}",
                    f"{_param(p, PAPER['internal_err'][lum][p])}",
                ]
            )
    return rows


def _check_stages(stages) -> list[dict]:
    if isinstance(stages, (str, bytes, Mapping)) or not isinstance(stages, Iterable):
        raise TypeError(f"stages must be a list of dicts, got {type(stages).__name__}")
    out = []
    for i, s in enumerate(stages):
        if not isinstance(s, Mapping) or not {"stage", "seconds"} <= set(s):
            raise ValueError(
                f"stages[{i}] must be a dict with keys 'stage', 'seconds' and 'text', got {s!r}"
            )
        try:
            sec = float(s["seconds"])
        except (TypeError, ValueError) as exc:
            raise ValueError(
                f"stages[{i}]['seconds'] must be a number, got {s['seconds']!r}"
            ) from exc
        if not math.isfinite(sec) or sec < 0:
            raise ValueError(
                f"stages[{i}]['seconds'] must be a finite duration >= 0 (the stage's own "
                f"time, not cumulative), got {s['seconds']!r}"
            )
        out.append({"stage": str(s["stage"]), "seconds": sec, "text": str(s.get("text", ""))})
    return out


def _seconds(x: float) -> str:
    return f"{x:.1f}" if x < 100 else f"{x:.0f}"


def write_report(
    out_dir,
    cat: pd.DataFrame | None,
    *,
    stages: Sequence[Mapping],
    metrics: Mapping | None = None,
    title: str = "mspec demo report",
    notes: Sequence[str] = (),
) -> Path:
    """Write ``report.md`` and ``metrics.json`` into ``out_dir``.

    ``report.md`` starts (after the title) with the summary table (metric | value | paper's
    figure), then the stage timing table with the total, the confusion matrices (rows true,
    columns predicted), the per-S/N_i tables, the CNN-TLMA details, any other metrics, and
    the notes (including what was skipped for missing columns).

    Parameters
    ----------
    out_dir : path-like
        Output directory (created if needed).
    cat : pandas.DataFrame or None
        The catalog; used to compute the metrics when ``metrics`` is None.
    stages : sequence of dict
        ``{"stage": str, "seconds": float, "text": str}`` per stage, in run order, with each
        stage's own duration in seconds (not cumulative).
    metrics : dict, optional
        The output of :func:`accuracy_metrics` (default: computed from ``cat``). Extra
        top-level keys (e.g. training summaries) are kept in ``metrics.json`` and shown as
        JSON under "Other metrics".
    title : str
        First-level heading of ``report.md``.
    notes : sequence of str
        Free-text notes listed at the end.

    Returns
    -------
    pathlib.Path
        The path of ``report.md``. ``metrics.json`` beside it holds
        ``{"title", "stages", "total_seconds", "metrics", "notes"}``.

    Raises
    ------
    TypeError, ValueError
        For bad ``stages``, ``metrics``, ``notes`` or ``cat`` (named in the message).
    """
    st = _check_stages(stages)
    if isinstance(notes, str) or not all(isinstance(x, str) for x in notes):
        raise TypeError("notes must be a sequence of strings")
    if metrics is None:
        if cat is None:
            raise ValueError("give cat or metrics: both are None")
        metrics = accuracy_metrics(cat)
    elif not isinstance(metrics, Mapping):
        raise TypeError(f"metrics must be a dict, got {type(metrics).__name__}")
    metrics = _jsonable(metrics)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    total = float(sum(s["seconds"] for s in st))

    lines = [f"# {title}", ""]
    summary = _summary_rows(metrics)
    if not summary:
        summary = [["(no accuracy metric could be computed; see notes)", "—", "—"]]
    lines += _table(["metric", "value", "paper (Li et al. 2025)"], summary)
    lines += [
        "",
        "Values are against the simulation truth; the paper's figures are against the "
        "references named (Gaia, APOGEE) or internal (ensemble) errors.",
        "",
        "## Stage timings",
        "",
    ]
    lines += _table(
        ["stage", "seconds", "what it did"],
        [[s["stage"], _seconds(s["seconds"]), s["text"]] for s in st]
        + [["**total**", f"**{_seconds(total)}**", ""]],
    )

    cls = metrics.get("classification", {})
    if cls:
        lines += ["", "## Confusion matrices", "", "Rows: true class; columns: predicted."]
        for c in cls.values():
            lines += ["", f"### {c['name']} ({c['selection']}; accuracy {_pct(c['accuracy'])})", ""]
            conf = c["confusion"]
            cols = list(next(iter(conf.values())).keys()) if conf else []
            rows = [
                [f"**{t}**", *[row[k] for k in cols], _pct(c["recall"].get(t))]
                for t, row in conf.items()
            ]
            prec = ["precision", *[_pct(c["precision"].get(k)) for k in cols], ""]
            lines += _table(["true \\ predicted", *cols, "recall"], [*rows, prec])

    bins = metrics.get("snr_bins", [])
    if bins and (cls or metrics.get("rv") or metrics.get("tlma")):
        lines += ["", "## By S/N_i", ""]
        if cls:
            lines += ["### Classifier accuracy", ""]
            rows = []
            for c in cls.values():
                rows.append(
                    [
                        c["name"],
                        *[
                            f"{_pct(c['by_snr'][b]['accuracy'])} ({c['by_snr'][b]['n']})"
                            if b in c["by_snr"]
                            else "n/a"
                            for b in bins
                        ],
                    ]
                )
            lines += _table(["classifier", *[f"S/N_i {b} (N)" for b in bins]], rows)
            lines.append("")
        rv = metrics.get("rv", {})
        rv_keys = [k for k in ("rv", "tm", "tml7500", "lamost") if k in rv]
        if rv_keys:
            lines += [
                f"### RV − true RV, true M (bias / robust σ / outliers > "
                f"{rv['outlier_kms']:g} km/s)",
                "",
            ]
            rows = []
            for k in rv_keys:
                r = rv[k]
                cells = []
                for b in bins:
                    s = r["by_snr"].get(b)
                    cells.append(
                        "n/a"
                        if s is None
                        else f"{_kms(s['bias'], True)} / {_kms(s['sigma'])} / "
                        f"{_pct(s.get('outlier_frac'))} ({s['n']})"
                    )
                rows.append([r["name"], *cells])
            lines += _table(["RV", *[f"S/N_i {b} (N)" for b in bins]], rows)
            lines.append("")
        tl = metrics.get("tlma", {})
        if any(tl.get(lum) for lum in DMGM_CLASSES):
            lines += ["### CNN-TLMA robust σ vs truth, true M by luminosity class", ""]
            rows = []
            for lum in DMGM_CLASSES:
                for p, s in tl.get(lum, {}).items():
                    rows.append(
                        [
                            f"{lum} {TLMA_PARAMS[p][0]}",
                            *[
                                f"{_param(p, s['by_snr'][b]['sigma'])} ({s['by_snr'][b]['n']})"
                                if b in s.get("by_snr", {})
                                else "n/a"
                                for b in bins
                            ],
                        ]
                    )
            lines += _table(["parameter", *[f"S/N_i {b} (N)" for b in bins]], rows)

    tl = metrics.get("tlma", {})
    if any(tl.get(lum) for lum in DMGM_CLASSES):
        lines += ["", f"## CNN-TLMA details ({tl['selection']})", ""]
        rows = []
        for lum in DMGM_CLASSES:
            for p, s in tl.get(lum, {}).items():
                rows.append(
                    [
                        f"{lum} {TLMA_PARAMS[p][0]}",
                        s["n"],
                        _param(p, s.get("bias"), True),
                        _param(p, s.get("sigma")),
                        _num_s(s.get("slope"), ".3f"),
                        _num_s(s.get("slope_ols"), ".3f"),
                        _param(p, s.get("median_err")),
                        _num_s(s.get("err_calibration"), ".2f"),
                        _num_s(s.get("err_calibration_robust"), ".2f"),
                        _param(p, PAPER["internal_err"][lum][p]),
                    ]
                )
        lines += _table(
            [
                "parameter",
                "N",
                "bias",
                "robust σ",
                "slope (Theil–Sen)",
                "slope (OLS)",
                "median err",
                "std(Δ/err)",
                "robust std(Δ/err)",
                "paper internal err",
            ],
            rows,
        )

    known = {"n_spectra", "snr_bins", "snr_min", "skipped", "classification", "rv", "tlma"}
    other = {k: v for k, v in metrics.items() if k not in known}
    if other:
        lines += ["", "## Other metrics", "", "```json", json.dumps(other, indent=2), "```"]

    all_notes = list(notes)
    all_notes += [f"Skipped: {s}." for s in metrics.get("skipped", [])]
    all_notes += [
        'Accuracy counts spectra without a prediction as wrong (column "(none)").',
        "bias = median(pred − true); robust σ = 1.4826·MAD; slope = Theil–Sen fit of "
        "predicted vs true (< 1: compressed scale); std(Δ/err) ≈ 1 when quoted errors are "
        "right, > 1 when they are too small.",
    ]
    lines += ["", "## Notes", ""] + [f"- {x}" for x in all_notes] + [""]

    path = out_dir / "report.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    doc = {
        "title": title,
        "stages": st,
        "total_seconds": total,
        "metrics": metrics,
        "notes": list(notes),
    }
    (out_dir / "metrics.json").write_text(
        json.dumps(doc, indent=2, allow_nan=False, ensure_ascii=False), encoding="utf-8"
    )
    return path
