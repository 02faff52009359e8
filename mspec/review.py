"""The inspection queue: spectra the rules cannot settle, for a person to look at.

Li et al. (2025) inspected 34,961 spectra by eye to settle their RVs (and 53,987 gM
candidates). mspec decides automatically where its documented rules can, and queues the
rest with a reason and the candidate values:

* :func:`build_queue` — one row per (spectrum, module) from every ``*_inspect`` variable
  (``rv_inspect`` from :func:`mspec.reconcile_rv`, ``scm_inspect``, ``dgcm_inspect`` from
  the SCM/DGCM rules) and every |RV| > 150 km/s;
* :func:`write_queue` — a run directory's queue: ``RUN/review/queue.parquet`` and one PNG
  per queued spectrum (RVMM: the eight DSAL absorption lines marked at the positions implied
  by each candidate RV, like the paper's Figure 11; SCM/DGCM: the spectrum with its
  candidates);
* :func:`read_decisions` — a reviewer's decisions CSV (``obsid,module,decision``): bad rows
  are reported and skipped, never fatal. :func:`mspec.reconcile_rv` honours the RVMM
  decisions (``decisions=``) on the next run.

``mspec inspect RUN [--decisions CSV]`` runs :func:`write_queue` (and checks a decisions
file). See ``docs/rv_reconcile.md``.
"""

from __future__ import annotations

import json
import logging
import math
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import xarray as xr

__all__ = [
    "MODULES",
    "INSPECT_VARIABLES",
    "QUEUE_COLUMNS",
    "DecisionWarning",
    "build_queue",
    "load_run",
    "write_queue",
    "read_decisions",
    "plot_rv_candidates",
]

log = logging.getLogger(__name__)

#: Paper modules whose rules can queue a spectrum.
MODULES = ("RVMM", "SCM", "DGCM")
#: ``*_inspect`` variable -> module.
INSPECT_VARIABLES = {"rv_inspect": "RVMM", "scm_inspect": "SCM", "dgcm_inspect": "DGCM"}
#: Columns of the queue table.
QUEUE_COLUMNS = ("obsid", "module", "reason", "candidates")
#: Candidate RVs shown for an RVMM row: variable -> rv_from name.
RV_CANDIDATES = {
    "lamost_rv": "LAMOST",
    "rv_tm": "TM",
    "rv_dsal1": "DSAL I",
    "rv_dsal2": "DSAL II",
    "rv_tml7500": "TML7500",
    "rv_dsel": "DSEL",
}
#: Candidate values shown for SCM / DGCM rows (whichever are present).
CLASS_CANDIDATES = {
    "SCM": ("lamost_class", "lamost_subclass", "spt_class", "wdm_class", "CMD_pos"),
    "DGCM": ("lamost_subclass", "dmgm_class", "CMD_pos", "luminosity_class"),
}
#: The eight DSAL absorption lines (vacuum Å, paper Table 5).
DSAL_LINES = (
    ("K I", 7667.0089),
    ("K I", 7701.0825),
    ("Na I", 8185.5054),
    ("Na I", 8197.0766),
    ("Ti I", 8437.26),
    ("Ca II", 8500.36),
    ("Ca II", 8544.44),
    ("Ca II", 8664.52),
)
_C_KMS = 299792.458


class DecisionWarning(UserWarning):
    """A row of a decisions file was skipped (the message says which and why)."""


def _str(a) -> np.ndarray:
    return np.asarray(a).astype(str)


def _candidates_rv(ds: xr.Dataset, idx: np.ndarray) -> list[str]:
    vals = {}
    for var, name in RV_CANDIDATES.items():
        if var in ds.variables:
            vals[name] = np.asarray(ds[var].values, dtype=np.float64)[idx]
    chosen = np.asarray(ds["rv"].values, np.float64)[idx] if "rv" in ds.variables else None
    src = _str(ds["rv_from"].values)[idx] if "rv_from" in ds.variables else None
    out = []
    for k in range(idx.size):
        d = {n: round(float(v[k]), 2) for n, v in vals.items() if math.isfinite(v[k])}
        if chosen is not None:
            d["rv"] = round(float(chosen[k]), 2) if math.isfinite(chosen[k]) else None
        if src is not None:
            d["rv_from"] = str(src[k])
        out.append(json.dumps(d, sort_keys=False))
    return out


def _candidates_class(ds: xr.Dataset, idx: np.ndarray, module: str) -> list[str]:
    cols = [c for c in CLASS_CANDIDATES.get(module, ()) if c in ds.variables]
    vals = {c: np.asarray(ds[c].values)[idx] for c in cols}
    out = []
    for k in range(idx.size):
        d = {}
        for c, v in vals.items():
            x = v[k]
            if isinstance(x, (float, np.floating)):
                if math.isfinite(x):
                    d[c] = float(x)
            else:
                d[c] = str(x)
        out.append(json.dumps(d))
    return out


def build_queue(ds: xr.Dataset, *, inspect_abs_rv: float = 150.0) -> pd.DataFrame:
    """The inspection queue of a Dataset of results (eager; 1-D variables only).

    Parameters
    ----------
    ds : xarray.Dataset
        Per-spectrum results with the ``obsid`` coordinate (or variable) and any of
        :data:`INSPECT_VARIABLES` (other ``<x>_inspect`` variables are queued under module
        ``X``), ``rv`` (else ``lamost_rv``) and the candidate RVs of
        :data:`RV_CANDIDATES`.
    inspect_abs_rv : float
        Spectra with |rv| above this (km/s) are queued even without an ``rv_inspect``
        reason (the paper inspected them all).

    Returns
    -------
    pandas.DataFrame
        Columns :data:`QUEUE_COLUMNS`: ``obsid`` (str), ``module`` (``RVMM``/``SCM``/
        ``DGCM``), ``reason`` and ``candidates`` (a JSON object: candidate RVs in km/s by
        method, with the chosen ``rv`` and ``rv_from``; or the class labels of SCM/DGCM).
        One row per (spectrum, module), in spectrum order; empty when nothing is queued.

    Raises
    ------
    TypeError
        ``ds`` is not a Dataset.
    ValueError
        ``ds`` has no ``obsid``; ``inspect_abs_rv`` not positive.
    """
    if not isinstance(ds, xr.Dataset):
        raise TypeError(f"ds must be an xarray.Dataset, got {type(ds).__name__}")
    if not (float(inspect_abs_rv) > 0):
        raise ValueError(f"inspect_abs_rv must be positive, got {inspect_abs_rv!r}")
    if "obsid" not in ds.variables:
        raise ValueError("ds has no obsid (coordinate or variable)")
    obsid = _str(ds["obsid"].values)
    rows = []
    inspect = {v: m for v, m in INSPECT_VARIABLES.items() if v in ds.variables}
    for v in ds.data_vars:
        name = str(v)
        if name.endswith("_inspect") and name not in inspect and ds[v].dims == ("spectra",):
            inspect[name] = name[: -len("_inspect")].upper()
    for var, module in inspect.items():
        reason = _str(ds[var].values)
        reason = np.where(np.isin(reason, ["", "nan", "None"]), "", reason)
        if module == "RVMM":
            rv_var = "rv" if "rv" in ds.variables else "lamost_rv"
            if rv_var in ds.variables:
                rv = np.asarray(ds[rv_var].values, dtype=np.float64)
                with np.errstate(invalid="ignore"):
                    big = (np.abs(rv) > inspect_abs_rv) & (reason == "")
                reason = np.where(big, f"|rv| > {inspect_abs_rv:g} km/s", reason)
        idx = np.flatnonzero(reason != "")
        if not idx.size:
            continue
        cand = _candidates_rv(ds, idx) if module == "RVMM" else _candidates_class(ds, idx, module)
        rows.append(
            pd.DataFrame(
                {
                    "obsid": obsid[idx],
                    "module": module,
                    "reason": reason[idx],
                    "candidates": cand,
                    "_order": idx,
                }
            )
        )
    if "rv_inspect" not in inspect:
        rv_var = "rv" if "rv" in ds.variables else "lamost_rv"
        if rv_var in ds.variables:
            rv = np.asarray(ds[rv_var].values, dtype=np.float64)
            with np.errstate(invalid="ignore"):
                idx = np.flatnonzero(np.abs(rv) > inspect_abs_rv)
            if idx.size:
                rows.append(
                    pd.DataFrame(
                        {
                            "obsid": obsid[idx],
                            "module": "RVMM",
                            "reason": f"|rv| > {inspect_abs_rv:g} km/s",
                            "candidates": _candidates_rv(ds, idx),
                            "_order": idx,
                        }
                    )
                )
    if not rows:
        return pd.DataFrame({c: pd.Series(dtype=str) for c in QUEUE_COLUMNS})
    q = pd.concat(rows, ignore_index=True)
    q["_m"] = q["module"].map({m: i for i, m in enumerate(MODULES)}).fillna(len(MODULES))
    q = q.sort_values(["_order", "_m"], kind="stable").drop(columns=["_order", "_m"])
    return q.reset_index(drop=True)[list(QUEUE_COLUMNS)]


# ------------------------------------------------------------------------- run directories


def load_run(run_dir) -> xr.Dataset:
    """Every persisted stage output of a run merged with its store (lazy).

    Parameters
    ----------
    run_dir : path-like
        A run directory (``config.resolved.toml``, ``stages/<name>.zarr``).

    Returns
    -------
    xarray.Dataset
        The store (:func:`mspec.open_store`) with the variables of every stage group.

    Raises
    ------
    FileNotFoundError
        ``run_dir`` is not a run directory, or its store is missing.
    """
    from mspec.config import load_config
    from mspec.io.store import open_store
    from mspec.io.zarrio import read_results

    run_dir = Path(run_dir)
    cfg_path = run_dir / "config.resolved.toml"
    if not cfg_path.is_file():
        raise FileNotFoundError(
            f"{run_dir} is not an mspec run directory (no config.resolved.toml)"
        )
    cfg = load_config(cfg_path)
    if not Path(cfg.store).exists():
        raise FileNotFoundError(f"the run's store is missing: {cfg.store}")
    ds = open_store(cfg.store)
    n = ds.sizes["spectra"]
    stages = sorted((run_dir / "stages").glob("*.zarr")) if (run_dir / "stages").is_dir() else []
    for path in stages:
        try:
            up = read_results(path)
        except Exception as exc:  # noqa: BLE001 - a broken group is reported, not fatal
            log.warning("review: cannot read %s (%s); skipped", path, exc)
            continue
        m = min(n, up.sizes.get("spectra", 0))
        if "spectra" in up.dims:
            up = up.isel(spectra=slice(0, m))
        up = up.drop_vars([c for c in ("obsid",) if c in up.variables])
        if m < n and "spectra" in up.dims:
            log.warning("review: %s holds %d of %d spectra", path.name, m, n)
            continue
        ds = ds.assign({v: up[v] for v in up.data_vars if v not in ds})
        extra = {c: up[c] for c in up.coords if c not in ds.coords and c not in up.dims}
        if extra:
            ds = ds.assign_coords(extra)
    return ds


def _ensure_reconciled(ds: xr.Dataset, decisions) -> xr.Dataset:
    """Add the reconciliation when the run has the rvmm outputs but no ``rv_inspect``."""
    from mspec.rv.reconcile import INPUTS, reconcile_rv

    if "rv_inspect" in ds.variables and decisions is None:
        return ds
    if not all(v in ds.variables for v in INPUTS):
        return ds
    keep = [v for v in ds.data_vars if ds[v].dims == ("spectra",) or "lines" in ds[v].dims]
    sub = ds[keep]
    out = reconcile_rv(sub, decisions=decisions, merge=False).compute()
    return ds.drop_vars([v for v in out.data_vars if v in ds.data_vars]).assign(out.data_vars)


def write_queue(
    run_dir,
    *,
    decisions=None,
    plots: bool = True,
    max_plots: int | None = None,
    inspect_abs_rv: float = 150.0,
) -> pd.DataFrame:
    """Write a run's inspection queue and its plots under ``RUN/review/``.

    Parameters
    ----------
    run_dir : path-like
        Run directory.
    decisions : pandas.DataFrame, optional
        Decisions already made (:func:`read_decisions`): the RVMM ones are applied (the
        reconciliation is redone on the run's rvmm outputs), so decided spectra leave the
        queue; decided SCM/DGCM spectra are dropped from the queue.
    plots : bool
        Write ``RUN/review/plots/<obsid>_<module>.png`` for each queued row.
    max_plots : int, optional
        At most this many PNGs (queue order); default all.
    inspect_abs_rv : float
        See :func:`build_queue`.

    Returns
    -------
    pandas.DataFrame
        The queue (also written to ``RUN/review/queue.parquet``), with a ``png`` column
        (relative path of the PNG, "" when none).

    Raises
    ------
    FileNotFoundError
        Not a run directory, or its store is missing.
    ValueError
        ``max_plots`` negative.
    """
    if max_plots is not None and (isinstance(max_plots, bool) or int(max_plots) < 0):
        raise ValueError(f"max_plots must be a non-negative integer, got {max_plots!r}")
    run_dir = Path(run_dir)
    ds = load_run(run_dir)
    rv_dec = None
    if decisions is not None and len(decisions):
        rv_dec = decisions[decisions["module"] == "RVMM"] if "module" in decisions else decisions
    ds = _ensure_reconciled(ds, rv_dec if rv_dec is not None and len(rv_dec) else None)
    cols = [v for v in ds.data_vars if ds[v].dims == ("spectra",) and ds[v].dtype.kind != "V"]
    small = ds[cols].compute()
    q = build_queue(small, inspect_abs_rv=inspect_abs_rv)
    if decisions is not None and len(decisions) and "module" in decisions:
        done = set(zip(_str(decisions["obsid"]), _str(decisions["module"]), strict=True))
        keep = [(o, m) not in done for o, m in zip(q["obsid"], q["module"], strict=True)]
        q = q[np.asarray(keep, bool)].reset_index(drop=True)
    out = run_dir / "review"
    (out / "plots").mkdir(parents=True, exist_ok=True)
    q = q.assign(png="")
    if plots and len(q):
        limit = len(q) if max_plots is None else min(len(q), int(max_plots))
        obs_index = pd.Index(_str(ds["obsid"].values))
        loglam = np.asarray(ds["loglam"].values, dtype=np.float64)
        for k in range(limit):
            row = q.iloc[k]
            i = int(obs_index.get_loc(row["obsid"]))
            spec = ds[["flux", "ivar", "ormask"]].isel(spectra=i).compute()
            name = f"{_safe(row['obsid'])}_{row['module']}.png"
            try:
                fig = plot_rv_candidates(
                    loglam,
                    np.asarray(spec["flux"].values, np.float64),
                    np.asarray(spec["ivar"].values, np.float64),
                    np.asarray(spec["ormask"].values),
                    json.loads(row["candidates"]) if row["module"] == "RVMM" else {},
                    title=f"obsid {row['obsid']} — {row['module']}: {row['reason']}",
                    labels=None if row["module"] == "RVMM" else json.loads(row["candidates"]),
                )
                fig.savefig(out / "plots" / name, dpi=90)
                q.loc[q.index[k], "png"] = f"plots/{name}"
            except Exception as exc:  # noqa: BLE001 - a bad spectrum never stops the queue
                log.warning("review: no plot for %s (%s)", row["obsid"], exc)
    q.to_parquet(out / "queue.parquet", index=False)
    return q


def _safe(s: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in str(s))


# ------------------------------------------------------------------------------- plotting


def plot_rv_candidates(loglam, flux, ivar, ormask, candidates, *, title="", labels=None):
    """Figure of the eight DSAL lines with each candidate RV marked (paper Figure 11).

    Parameters
    ----------
    loglam : array_like
        log10 vacuum wavelength (Å) of the native pixels.
    flux, ivar, ormask : array_like
        One spectrum on that grid; pixels with ``ormask != 0`` or ``ivar <= 0`` are greyed.
    candidates : mapping
        Method -> RV (km/s), e.g. ``{"LAMOST": 12.0, "TM": -40.2}``; non-numeric entries
        (``rv_from``) and None are ignored. Empty: the full spectrum is drawn instead.
    title : str
        Figure title.
    labels : mapping, optional
        Extra text (class labels of an SCM/DGCM row), shown under the title.

    Returns
    -------
    matplotlib.figure.Figure
        Not attached to pyplot; save it with ``fig.savefig``.
    """
    from matplotlib.figure import Figure

    from mspec.plots import OKABE_ITO

    lam = 10.0 ** np.asarray(loglam, dtype=np.float64)
    f = np.asarray(flux, dtype=np.float64)
    good = (np.asarray(ormask) == 0) & (np.asarray(ivar) > 0) & np.isfinite(f)
    rvs = {
        k: float(v)
        for k, v in (candidates or {}).items()
        if k != "rv_from" and isinstance(v, (int, float)) and v is not None and math.isfinite(v)
    }
    palette = [
        OKABE_ITO[c]
        for c in ("vermillion", "blue", "green", "orange", "purple", "sky_blue", "black")
    ]
    colours = {k: palette[i % len(palette)] for i, k in enumerate(rvs)}
    if not rvs:
        fig = Figure(figsize=(11, 4), layout="constrained")
        ax = fig.add_subplot()
        ax.plot(lam[good], f[good], lw=0.6, color="k")
        ax.set_xlabel("observed vacuum wavelength (Å)")
        ax.set_ylabel("flux (LAMOST units)")
        text = title
        if labels:
            text += "\n" + ", ".join(f"{k}={v}" for k, v in labels.items())
        fig.suptitle(text, fontsize=9)
        return fig
    fig = Figure(figsize=(13, 6.5), layout="constrained")
    axes = fig.subplots(2, 4)
    vals = np.array(list(rvs.values()))
    for ax, (name, w0) in zip(axes.ravel(), DSAL_LINES, strict=True):
        lo = w0 * (1 + min(vals.min(), 0.0) / _C_KMS) - 25.0
        hi = w0 * (1 + max(vals.max(), 0.0) / _C_KMS) + 25.0
        sel = (lam >= lo) & (lam <= hi)
        ax.plot(lam[sel & good], f[sel & good], lw=0.8, color="k", drawstyle="steps-mid")
        bad = sel & ~good & np.isfinite(f)
        if bad.any():
            ax.plot(lam[bad], f[bad], ".", ms=2, color="0.6", label="masked")
        for k, v in rvs.items():
            ax.axvline(w0 * (1 + v / _C_KMS), color=colours[k], lw=1.0, ls="--")
        ax.set_xlim(lo, hi)
        ax.set_title(f"{name} {w0:.2f} Å", fontsize=9)
        ax.set_xlabel("observed vacuum wavelength (Å)", fontsize=8)
        ax.tick_params(labelsize=7)
    axes[0, 0].set_ylabel("flux (LAMOST units)")
    axes[1, 0].set_ylabel("flux (LAMOST units)")
    from matplotlib.lines import Line2D

    handles = [
        Line2D([], [], color=colours[k], ls="--", label=f"{k}: {v:+.1f} km/s")
        for k, v in rvs.items()
    ]
    fig.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 7), fontsize=8)
    fig.suptitle(title, fontsize=10)
    return fig


# ------------------------------------------------------------------------------- decisions


def read_decisions(path, module: str | None = None, *, known_obsids=None) -> pd.DataFrame:
    """Read a reviewer's decisions CSV; bad rows are reported and skipped.

    The file has a header with the columns ``obsid``, ``module`` and ``decision`` (any
    order; other columns are kept). RVMM decisions are :data:`mspec.rv.reconcile.RV_FROM`
    values (``TM``, ``DSAL II``, ``NoRV_waveErr`` ...); SCM/DGCM decisions are the labels
    their rules define (any non-empty text here). A later row for the same (obsid, module)
    replaces an earlier one.

    Parameters
    ----------
    path : path-like
        The CSV file.
    module : str, optional
        Keep only this module's rows (``"RVMM"``, ``"SCM"`` or ``"DGCM"``).
    known_obsids : array_like, optional
        The run's obsids: rows naming another obsid are skipped.

    Returns
    -------
    pandas.DataFrame
        Columns ``obsid`` (str), ``module``, ``decision`` (and any extra columns), one row
        per (obsid, module). ``attrs["skipped"]`` lists ``(line, reason)`` of every skipped
        row (line numbers count the header as 1); each is also issued as a
        :class:`DecisionWarning` and logged.

    Raises
    ------
    FileNotFoundError
        ``path`` does not exist.
    ValueError
        ``module`` unknown, or the file is not a CSV with the three columns (named in the
        message).
    """
    from mspec.rv.reconcile import RV_FROM

    if module is not None and module not in MODULES:
        raise ValueError(f"module must be one of {MODULES} or None, got {module!r}")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"decisions file not found: {path}")
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False, skipinitialspace=True)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise ValueError(f"decisions file {path} is not a readable CSV: {exc}") from None
    df.columns = [str(c).strip() for c in df.columns]
    missing = [c for c in ("obsid", "module", "decision") if c not in df.columns]
    if missing:
        raise ValueError(
            f"decisions file {path} lacks the column(s) {missing} "
            "(expected a header obsid,module,decision)"
        )
    for c in ("obsid", "module", "decision"):
        df[c] = df[c].astype(str).str.strip()
    known = None if known_obsids is None else set(_str(known_obsids).tolist())
    skipped = []
    keep = np.ones(len(df), bool)
    for k, (o, m, d) in enumerate(zip(df["obsid"], df["module"], df["decision"], strict=True)):
        why = ""
        if o == "":
            why = "empty obsid"
        elif m not in MODULES:
            why = f"unknown module {m!r} (known: {', '.join(MODULES)})"
        elif d == "":
            why = "empty decision"
        elif m == "RVMM" and d not in RV_FROM:
            why = f"unknown RVMM decision {d!r} (known: {', '.join(RV_FROM)})"
        elif known is not None and o not in known:
            why = f"obsid {o} is not in the run"
        if why:
            keep[k] = False
            skipped.append((k + 2, why))
    for line, why in skipped:
        msg = f"{path.name} line {line}: {why}; row skipped"
        log.warning("decisions: %s", msg)
        warnings.warn(msg, DecisionWarning, stacklevel=2)
    df = df[keep]
    if module is not None:
        df = df[df["module"] == module]
    df = df.drop_duplicates(["obsid", "module"], keep="last").reset_index(drop=True)
    df.attrs["skipped"] = skipped
    return df
