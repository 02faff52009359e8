"""The HTML report of a run directory: ``RUN/report/index.html`` (``mspec report RUN``).

One self-contained page (every figure embedded as a base64 PNG, no external file, script or
font, so it opens offline and can be mailed) with

- the run: spectra, wall time, mspec version, store, configuration hash;
- per-stage run time and cost (wall seconds, core-seconds per spectrum, chunks computed and
  skipped) and the parts of the paper's pipeline this mspec does not build yet;
- per-stage counts in the style of the paper's Tables 1 (SCM: spectral classes), 4 (DGCM:
  dwarfs and giants) and 7 (RVMM: where the RV comes from), as far as the run has the stages;
- the quarantine summary of the store (files skipped at ingest, by reason);
- the figures: CNN confusion matrices (simulated runs), the Gaia CMD with the paper's dM and
  gM regions, the Kiel diagram and Teff vs (BP-RP)_0, RV vs LAMOST RV (with the 3-sigma /
  2-sigma bands of the reconciliation when the run has it), RV and parameter errors vs S/N_i
  (the paper's Figure 13), the rv_from breakdown, example spectra with the lines marked, and
  on simulated runs every result against the truth.

Every figure is also written as a PNG file beside the page; ``report/manifest.json`` lists
the figures and, for each figure not drawn, why. A figure whose inputs the run does not have
(a stage not run, no Gaia photometry, no truth) is *stated* as not drawn, never drawn empty.
A figure that fails on bad data is stated with the error; the report itself never fails
because of the data (only for a path that is not a run directory).

Figures use the matplotlib Figure API only (no pyplot state), the Okabe-Ito colour-blind-safe
palette and axis labels with units.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import json
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure

from mspec._exec import release_memory
from mspec.plots import OKABE_ITO, accuracy_figure, confusion_figure
from mspec.report import (
    DMGM_CLASSES,
    SPT_CLASSES,
    TLMA_PARAMS,
    _labels,
    _num,
    _summary_rows,
    accuracy_metrics,
    confusion_matrix,
    robust_sigma,
)

log = logging.getLogger("mspec.report")

__all__ = [
    "write_run_report",
    "FIGURE_NAMES",
    "RV_FROM_VALUES",
    "clipped_mean_std",
    "REPORT_DIRNAME",
]

#: Subdirectory of the run directory that holds the report.
REPORT_DIRNAME = "report"

#: The paper's rv_from values (Table 7), in its order.
RV_FROM_VALUES: tuple[str, ...] = (
    "LAMOST",
    "TM",
    "DSAL I",
    "DSAL II",
    "TML7500",
    "DSEL",
    "NoRV_lowQuality",
    "NoRV_waveErr",
)
_C_KMS = 299792.458
_SCM_ORDER = ("M", "K", "G", "F", "A", "OB", "WD", "GALAXY", "QSO", "S", "C")
_LUM_COLOUR = {"dM": OKABE_ITO["blue"], "gM": OKABE_ITO["vermillion"]}
_OTHER = "#999999"
_AXIS = {
    "teff": r"$T_\mathrm{eff}$ (K)",
    "logg": r"$\log g$ (dex)",
    "m_h": "[M/H] (dex)",
    "alpha_m": r"[$\alpha$/M] (dex)",
}
_ERR_AXIS = {
    "teff": r"$\sigma_{T_\mathrm{eff}}$ (K)",
    "logg": r"$\sigma_{\log g}$ (dex)",
    "m_h": r"$\sigma_\mathrm{[M/H]}$ (dex)",
    "alpha_m": r"$\sigma_{[\alpha/\mathrm{M}]}$ (dex)",
}
_RV_METHODS = (
    # column, label
    ("rv", "reconciled RV (rv)"),
    ("rv_tm", "TM"),
    ("rv_tml7500", "TML7500"),
    ("rv_dsal1", "DSAL I"),
    ("rv_dsal2", "DSAL II"),
    ("rv_dsel", "DSEL"),
    ("lamost_rv", "LAMOST pipeline"),
)
_GAIA_PHOT = (
    "phot_g_mean_mag",
    "phot_bp_mean_mag",
    "phot_rp_mean_mag",
    "r_med_geo",
    "ebv",
    "parallax_over_error",
    "phot_g_mean_flux_over_error",
    "phot_bp_mean_flux_over_error",
    "phot_rp_mean_flux_over_error",
    "ruwe",
)
# lines marked on example spectra: (label, vacuum rest wavelength in Angstrom, kind)
_SPEC_LINES = (
    ("Hα", 6564.60, "emission"),
    ("K I", 7667.0089, "absorption"),
    ("K I", 7701.0825, "absorption"),
    ("Na I", 8185.5054, "absorption"),
    ("Na I", 8197.0766, "absorption"),
    ("Ti I", 8437.26, "absorption"),
    ("Ca II", 8500.36, "absorption"),
    ("Ca II", 8544.44, "absorption"),
    ("Ca II", 8664.52, "absorption"),
)


# --------------------------------------------------------------------------- statistics


def clipped_mean_std(x, k: float, *, max_iter: int = 50) -> tuple[float, float, int]:
    """Mean and standard deviation after iterative ``k``-sigma clipping (the paper's bands).

    Values with ``|x - mean| > k * std`` are removed and the statistics recomputed until
    nothing more is removed (at most ``max_iter`` rounds), as the paper does for the
    TM - LAMOST (k = 3) and DSAL - LAMOST (k = 2) residuals of its Figure 10.

    Parameters
    ----------
    x : array-like
        Residuals (any unit; km/s for RVs); non-finite values are ignored.
    k : float
        Clipping threshold in standard deviations (> 0).
    max_iter : int
        Maximum clipping rounds (>= 1).

    Returns
    -------
    (mean, std, n) : tuple
        Mean and standard deviation (ddof=0) of the values kept, in the unit of ``x``, and
        how many were kept; ``(nan, nan, 0)`` without finite values.

    Raises
    ------
    ValueError
        For a non-positive or non-finite ``k`` or ``max_iter < 1``.
    """
    if not (isinstance(k, (int, float)) and math.isfinite(k) and k > 0):
        raise ValueError(f"k must be a positive number, got {k!r}")
    if not (isinstance(max_iter, (int, np.integer)) and max_iter >= 1):
        raise ValueError(f"max_iter must be a positive integer, got {max_iter!r}")
    x = np.asarray(x, dtype=np.float64).ravel()
    x = x[np.isfinite(x)]
    if x.size == 0:
        return float("nan"), float("nan"), 0
    keep = np.ones(x.size, bool)
    for _ in range(int(max_iter)):
        m, s = float(np.mean(x[keep])), float(np.std(x[keep]))
        new = np.abs(x - m) <= k * s if s > 0 else keep
        if new.sum() == keep.sum() or new.sum() < 2:
            break
        keep = new
    m, s = float(np.mean(x[keep])), float(np.std(x[keep]))
    return m, s, int(keep.sum())


# --------------------------------------------------------------------------- run loading


@dataclass
class _Run:
    path: Path
    info: dict = field(default_factory=dict)  # run.json
    inputs: dict = field(default_factory=dict)  # inputs.json
    config: object = None
    config_text: str = ""
    cat: _Catalog | None = None
    cat_error: str = ""
    units: dict = field(default_factory=dict)
    store: Path | None = None
    notes: list = field(default_factory=list)

    def has(self, *cols: str) -> bool:
        return self.cat is not None and all(c in self.cat for c in cols)

    @property
    def simulated(self) -> bool:
        return self.has("true_class")


def _read_json(path: Path, notes: list) -> dict:
    if not path.is_file():
        notes.append(f"{path.name} is missing from the run directory")
        return {}
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        notes.append(f"{path.name} could not be read ({exc})")
        return {}
    return obj if isinstance(obj, dict) else {}


def _load_run(run_dir: Path) -> _Run:
    r = _Run(path=run_dir)
    r.info = _read_json(run_dir / "run.json", r.notes)
    if not isinstance(r.info.get("stages", {}), dict):
        r.notes.append("run.json: 'stages' is not a mapping; ignored")
        r.info["stages"] = {}
    if not isinstance(r.info.get("not_available", []), list):
        r.info["not_available"] = [str(r.info["not_available"])]
    r.inputs = _read_json(run_dir / "inputs.json", r.notes)
    cfg_path = run_dir / "config.resolved.toml"
    if cfg_path.is_file():
        r.config_text = cfg_path.read_text(encoding="utf-8", errors="replace")
        try:
            from mspec.config import load_config

            r.config = load_config(cfg_path)
            r.store = Path(r.config.store)
        except Exception as exc:  # noqa: BLE001 - an old or edited config: say so, go on
            r.notes.append(f"config.resolved.toml could not be loaded ({exc})")
    cat_path = run_dir / "catalog" / "catalog.parquet"
    if cat_path.exists():
        try:
            r.cat, r.units = _read_catalog(cat_path)
        except Exception as exc:  # noqa: BLE001 - a broken catalog is reported, not fatal
            r.cat_error = f"{type(exc).__name__}: {exc}"
    else:
        r.cat_error = "the run has no catalog (RUN/catalog/catalog.parquet)"
    return r


class _LRU(OrderedDict):
    """A dict that drops its least recently used entries past a size in bytes (the newest
    entry always stays); ``size`` gives an entry's bytes."""

    def __init__(self, max_bytes: int, size):
        super().__init__()
        self.max_bytes = int(max_bytes)
        self._size = size
        self._bytes: dict = {}  # bytes per key
        self._total = 0

    def get_or(self, key, make):
        """The entry at ``key``, made by ``make()`` (and kept) when absent."""
        if key in self:
            self.move_to_end(key)
            return self[key]
        value = make()
        self[key] = value
        self._bytes[key] = int(self._size(value))
        self._total += self._bytes[key]
        while len(self) > 1 and self._total > self.max_bytes:
            old, _ = self.popitem(last=False)
            self._total -= self._bytes.pop(old)
        return value

    def clear(self) -> None:
        super().clear()
        self._bytes.clear()
        self._total = 0


def _series_bytes(s: pd.Series) -> int:
    return int(s.memory_usage(index=False, deep=False))


class _Catalog:
    """The run catalog's columns, read from Parquet when a figure or table asks for them.

    The report uses a few dozen of the catalog's ~130 columns, so only those are read, one
    file at a time (a pyarrow Dataset would keep every file's footer, ~0.5 MB each, once
    scanned), and at most :attr:`CACHE_BYTES` of them are kept (least recently used dropped
    first, read again when asked for): the driver's memory does not grow with the survey.
    Supports what the report does with a table: ``col in cat``, ``len(cat)``, ``cat[col]``
    (a pandas Series), ``cat[[cols]]`` (a DataFrame), :meth:`row` and :meth:`frame`.
    """

    #: Bytes of columns kept between reads.
    CACHE_BYTES = 4 * 2**20

    def __init__(self, path: Path):
        import pyarrow.dataset as pads
        import pyarrow.parquet as pq

        dset = pads.dataset(str(path), format="parquet")  # file order and schema only
        self.schema = dset.schema
        self.columns = list(self.schema.names)
        self._names = set(self.columns)
        self._files = list(dset.files)
        del dset
        # rows per file from each footer in turn (Dataset.count_rows held ~0.5 MB per file)
        self._rows = np.array([pq.read_metadata(f).num_rows for f in self._files], dtype=np.int64)
        self._n = int(self._rows.sum())
        self._cache = _LRU(self.CACHE_BYTES, _series_bytes)

    def __contains__(self, col) -> bool:
        return col in self._names

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, key):
        if isinstance(key, str):
            return self._column(key)
        return self.frame(key)

    def _read(self, col: str) -> pd.Series:
        import pyarrow as pa
        import pyarrow.parquet as pq

        # arrow's threaded read-ahead buffers stayed in its memory pool
        parts = [pq.read_table(f, columns=[col], use_threads=False) for f in self._files]
        if not parts:
            return pd.Series([], name=col, dtype=self.schema.field(col).type.to_pandas_dtype())
        column = pa.concat_tables(parts, promote_options="permissive").column(0)
        del parts
        return column.to_pandas().rename(col)

    def _column(self, col: str) -> pd.Series:
        if col not in self._names:
            raise KeyError(col)
        return self._cache.get_or(col, lambda: self._read(col))

    def frame(self, cols) -> pd.DataFrame:
        """A pandas DataFrame of the named columns (those present), in catalog order."""
        return pd.DataFrame({c: self._column(c) for c in cols if c in self._names})

    def row(self, i: int) -> dict:
        """Every column's value in row ``i`` (0-based), read on its own."""
        import pyarrow.parquet as pq

        i = int(i)
        if not 0 <= i < self._n:
            raise IndexError(f"row {i} of a catalog of {self._n}")
        ends = np.cumsum(self._rows)
        k = int(np.searchsorted(ends, i, side="right"))
        local = i - int(ends[k] - self._rows[k])
        return pq.read_table(self._files[k]).slice(local, 1).to_pylist()[0]


def _read_catalog(path: Path) -> tuple[_Catalog, dict]:
    cat = _Catalog(path)
    units = {}
    raw = (cat.schema.metadata or {}).get(b"mspec_units")
    if raw:
        try:
            units = json.loads(raw.decode())
        except ValueError:
            units = {}
    return cat, units


# --------------------------------------------------------------------------- selections


# per-report memo of column conversions (string labels, floats): the figures and tables ask
# for the same columns many times; the frame is kept in the value so its id is not reused.
# Bounded like the catalog's column cache, so it does not grow with the survey.
_MEMO: _LRU = _LRU(4 * 2**20, lambda v: v[1].nbytes)
_STYLE: dict = {}  # per-report drawing settings


def _ms() -> float:
    """Marker size of scatter plots: larger for small catalogs."""
    return _STYLE.get("ms", 5.0)


def _str(cat: pd.DataFrame, col: str) -> np.ndarray:
    return _MEMO.get_or((id(cat), "s", col), lambda: (cat, _labels(cat[col])))[1]


def _n(cat: pd.DataFrame, col: str) -> np.ndarray:
    return _MEMO.get_or((id(cat), "n", col), lambda: (cat, _num(cat, col)))[1]


def _m_selection(r: _Run) -> tuple[np.ndarray, str]:
    """The spectra the run calls M (its best available decision) and how it was chosen."""
    cat = r.cat
    n = len(cat)
    if "is_m" in cat:
        v = cat["is_m"]
        if v.dtype == object or str(v.dtype).startswith(("string", "str")):
            sel = np.isin(np.char.lower(_str(cat, "is_m").astype(str)), ("true", "1", "yes"))
        else:
            sel = pd.to_numeric(v, errors="coerce").fillna(0).to_numpy() > 0
        return np.asarray(sel, bool), "SCM decision is_m"
    if "spt_class" in cat:
        sel = _str(cat, "spt_class") == "M"
        text = "CNN-SPT class M"
        if "wdm_class" in cat:
            sel &= _str(cat, "wdm_class") != "WD"
            text += " and CNN-WDM not WD"
        return sel, text
    return np.ones(n, bool), "all spectra (no M classification in this run)"


def _lum(r: _Run) -> tuple[np.ndarray | None, str]:
    """dM/gM label per spectrum ('' elsewhere) from the best source in the run."""
    cat = r.cat
    m, _ = _m_selection(r)
    if "luminosity_class" in cat:
        return _str(cat, "luminosity_class"), "DGCM luminosity_class"
    if "dmgm_class" in cat:
        return np.where(m, _str(cat, "dmgm_class"), ""), "CNN-dMgM class of M spectra"
    if "CMD_pos" in cat:
        return np.where(m, _str(cat, "CMD_pos"), ""), "Gaia CMD position of M spectra"
    return None, ""


def _sample(mask: np.ndarray, max_points: int, seed: int = 0) -> tuple[np.ndarray, str]:
    """Indices of at most ``max_points`` of the True entries (fixed seed) and a note."""
    idx = np.flatnonzero(mask)
    if idx.size <= max_points:
        return idx, ""
    rng = np.random.default_rng(seed)
    keep = np.sort(rng.choice(idx, max_points, replace=False))
    return keep, f" (random {max_points:,} of {idx.size:,} shown)"


def _lims(values: Sequence[np.ndarray], q=(0.5, 99.5), pad: float = 0.05) -> tuple | None:
    v = np.concatenate([np.asarray(a, float)[np.isfinite(a)] for a in values] or [np.array([])])
    if v.size == 0:
        return None
    lo, hi = (float(x) for x in np.percentile(v, q))
    if hi <= lo:
        lo, hi = lo - 1.0, hi + 1.0
    p = pad * (hi - lo)
    return lo - p, hi + p


# --------------------------------------------------------------------------- figures


@dataclass
class _FigResult:
    name: str
    title: str
    caption: str = ""
    file: str = ""
    png: bytes = b""
    reason: str = ""  # not drawn: why


class _NotDrawn(Exception):
    """A figure is not drawn; the message says why (a stage not run, a column missing)."""


_FIGURES: list[tuple[str, str, Callable]] = []


def _figure(name: str, title: str):
    def deco(func):
        _FIGURES.append((name, title, func))
        return func

    return deco


def _need(r: _Run, cols: Sequence[str], what: str) -> None:
    if r.cat is None:
        raise _NotDrawn(f"no catalog: {r.cat_error}")
    miss = [c for c in cols if c not in r.cat]
    if miss:
        raise _NotDrawn(f"{what} (the catalog has no column {', '.join(miss)})")


def _stage_missing(r: _Run, stage: str, what: str) -> str:
    if stage not in r.info.get("stages", {}):
        return f"stage {stage!r} ({what}) was not run"
    return f"the {what} outputs are not in the catalog"


def _save(fig: Figure, path: Path, dpi: int) -> bytes:
    fig.savefig(path, dpi=dpi)
    return path.read_bytes()


@_figure("confusion", "CNN confusion matrices against the simulation truth")
def _fig_confusion(r: _Run, out: Path, opt: dict) -> list[tuple[str, str, str]]:
    if r.cat is None:
        raise _NotDrawn(f"no catalog: {r.cat_error}")
    if not r.simulated:
        raise _NotDrawn(
            "not a simulated run (no true_class column): confusion matrices need the truth"
        )
    cls = opt["metrics"].get("classification", {})
    if not cls:
        raise _NotDrawn(_stage_missing(r, "scm", "CNN-SPT/CNN-WDM") + "; no CNN class column")
    files = []
    for key in ("spt", "wdm", "dmgm"):
        c = cls.get(key)
        if not c or not c.get("confusion"):
            continue
        acc = c.get("accuracy")
        acc_s = "n/a" if acc is None else f"{100 * acc:.2f}%"
        title = f"{c['name']} ({c['selection']}; N = {c['n']}; accuracy {acc_s})"
        p = out / f"confusion_{key}.png"
        confusion_figure(c["confusion"], None, p, title=title, dpi=opt["dpi"])
        files.append((p.name, title, "rows: true class; columns: predicted; colour: fraction"))
    # the run's final decisions (SCM / DGCM rules), when the run has them
    tclass = _str(r.cat, "true_class")
    if "scm_class" in r.cat:
        pred = _str(r.cat, "scm_class")
        classes = [c for c in ("M", "K", "G", "F", "A", "OB", "WD", "GALAXY", "QSO")
                   if c in set(tclass)]  # fmt: skip
        cm = confusion_matrix(tclass, pred, classes)
        p = out / "confusion_scm.png"
        title = f"SCM final class vs true class (N = {int(cm.to_numpy().sum())})"
        confusion_figure(cm, None, p, title=title, dpi=opt["dpi"])
        files.append((p.name, title, "rows: true class; columns: SCM scm_class"))
    if "luminosity_class" in r.cat and "true_lumclass" in r.cat:
        cm = confusion_matrix(
            _str(r.cat, "true_lumclass"), _str(r.cat, "luminosity_class"), DMGM_CLASSES
        )
        p = out / "confusion_dgcm.png"
        title = f"DGCM luminosity_class vs truth, true M (N = {int(cm.to_numpy().sum())})"
        confusion_figure(cm, None, p, title=title, dpi=opt["dpi"])
        files.append((p.name, title, "rows: true dM/gM; columns: DGCM luminosity_class"))
    if not files:
        raise _NotDrawn("no classifier could be scored against the truth")
    return files


def _cmd_table(r: _Run) -> tuple[pd.DataFrame, str]:
    cat = r.cat
    if "M_G_0" in cat and "bp_rp_0" in cat:
        t = cat[["M_G_0", "bp_rp_0"]].copy()
        t["CMD_flag"] = _n(cat, "CMD_flag") if "CMD_flag" in cat else np.nan
        t["CMD_pos"] = _str(cat, "CMD_pos") if "CMD_pos" in cat else ""
        return t, "CMD outputs of the run"
    miss = [c for c in _GAIA_PHOT[:5] if c not in cat]
    if miss:
        raise _NotDrawn(
            "the run has no CMD outputs (M_G_0, bp_rp_0) and the catalog no Gaia photometry "
            f"to place the stars (missing {', '.join(miss)})"
        )
    import warnings

    from mspec.cmd import GaiaTableWarning, place

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GaiaTableWarning)
        t = place(cat[[c for c in _GAIA_PHOT if c in cat]].copy())
    return t, "placed here with mspec.cmd.place from the catalog's Gaia columns"


@_figure("cmd", "Gaia colour-magnitude diagram with the dM and gM regions")
def _fig_cmd(r: _Run, out: Path, opt: dict):
    if r.cat is None:
        raise _NotDrawn(f"no catalog: {r.cat_error}")
    from mspec.cmd import DM_VERTICES, GM_LINE

    t, source = _cmd_table(r)
    c, mg = _n(t, "bp_rp_0"), _n(t, "M_G_0")
    flag = _n(t, "CMD_flag")
    good = np.isfinite(c) & np.isfinite(mg) & (flag == 1)
    if not good.any():
        raise _NotDrawn(
            "no spectrum with Gaia photometry passing the five quality cuts (CMD_flag = 1)"
        )
    m, msel = _m_selection(r)
    pos = _labels(t["CMD_pos"]) if "CMD_pos" in t else np.full(len(t), "")
    fig = Figure(figsize=(8, 7.5), layout="constrained")
    ax = fig.subplots()
    idx, note = _sample(good, opt["max_points"])
    groups = (
        ("dM", _LUM_COLOUR["dM"], "CMD_pos dM"),
        ("gM", _LUM_COLOUR["gM"], "CMD_pos gM"),
        ("other", _OTHER, "CMD_pos other"),
    )
    for key, colour, label in groups:
        k = idx[pos[idx] == key]
        if k.size == 0:
            continue
        k_m = k[m[k]]
        k_n = k[~m[k]]
        if k_m.size:
            ax.scatter(c[k_m], mg[k_m], s=_ms(), color=colour, alpha=0.6, linewidths=0,
                       rasterized=True, label=f"{label}, M ({k_m.size:,})")  # fmt: skip
        if k_n.size:
            ax.scatter(c[k_n], mg[k_n], s=2 * _ms(), marker="x", color=colour, alpha=0.7,
                       linewidths=0.8, rasterized=True,
                       label=f"{label}, not M ({k_n.size:,})")  # fmt: skip
    v = np.array([*DM_VERTICES, DM_VERTICES[0]])
    ax.plot(v[:, 0], v[:, 1], color=OKABE_ITO["black"], lw=1.4, label="dM region (paper)")
    xlim = _lims([c[good]], q=(0, 100), pad=0.08) or (0, 5)
    xlim = (min(xlim[0], 0.5), max(xlim[1], 5.2))
    xs = np.linspace(*xlim, 50)
    ax.plot(xs, GM_LINE[0] * xs + GM_LINE[1], color=OKABE_ITO["black"], lw=1.4, ls="--",
            label=f"gM above $M_G$ = {GM_LINE[0]:g} $(BP-RP)_0$ − {-GM_LINE[1]:g}")  # fmt: skip
    ylim = _lims([mg[good]], q=(0, 100), pad=0.08) or (-4, 17)
    ax.set_xlim(*xlim)
    ax.set_ylim(max(ylim[1], 17.0), min(ylim[0], -4.0))  # bright at the top
    ax.set_xlabel(r"$(G_\mathrm{BP} - G_\mathrm{RP})_0$ (mag)")
    ax.set_ylabel(r"$M_{G,0}$ (mag)")
    n_bad = int((~good).sum())
    ax.set_title(f"Gaia CMD, CMD_flag = 1: {int(good.sum()):,} spectra{note}")
    ax.legend(fontsize=8, loc="upper right", markerscale=2)
    cap = (
        f"Extinction-corrected CMD ({source}); dots: spectra the run calls M ({msel}), "
        f"crosses: the others. {n_bad:,} spectra are not placed (no Gaia match, a failed "
        "quality cut or missing photometry)."
    )
    return fig, cap


@_figure("kiel", "Kiel diagram and Teff vs (BP−RP)_0")
def _fig_kiel(r: _Run, out: Path, opt: dict):
    if r.cat is None:
        raise _NotDrawn(f"no catalog: {r.cat_error}")
    if not r.has("teff", "logg"):
        raise _NotDrawn(_stage_missing(r, "spmm", "SPMM CNN-TLMA"))
    teff, logg = _n(r.cat, "teff"), _n(r.cat, "logg")
    lum, lum_src = _lum(r)
    if lum is None:
        lum = np.full(len(r.cat), "")
    ok = np.isfinite(teff) & np.isfinite(logg)
    if not ok.any():
        raise _NotDrawn("no spectrum has CNN-TLMA parameters (none classified M)")
    try:
        cmd, _ = _cmd_table(r)
        color = _n(cmd, "bp_rp_0")
        cmd_note = ""
    except _NotDrawn as exc:
        color, cmd_note = None, str(exc)
    fig = Figure(figsize=(13, 5.8), layout="constrained")
    ax1, ax2 = fig.subplots(1, 2)
    idx, note = _sample(ok, opt["max_points"])
    for key in (*DMGM_CLASSES, ""):
        k = idx[lum[idx] == key] if key else idx[~np.isin(lum[idx], DMGM_CLASSES)]
        if k.size == 0:
            continue
        colour = _LUM_COLOUR.get(key, _OTHER)
        label = f"{key or 'unclassified'} ({k.size:,})"
        ax1.scatter(teff[k], logg[k], s=_ms(), color=colour, alpha=0.6, linewidths=0,
                    rasterized=True, label=label)  # fmt: skip
        if color is not None:
            kk = k[np.isfinite(color[k])]
            if kk.size:
                ax2.scatter(color[kk], teff[kk], s=_ms(), color=colour, alpha=0.6, linewidths=0,
                            rasterized=True, label=f"{key or 'unclassified'} ({kk.size:,})")  # fmt: skip
    ax1.invert_xaxis()
    ax1.invert_yaxis()
    ax1.set_xlabel(_AXIS["teff"])
    ax1.set_ylabel(_AXIS["logg"])
    ax1.set_title(f"Kiel diagram, CNN-TLMA{note}")
    ax1.legend(fontsize=8, title=lum_src, title_fontsize=8, markerscale=2)
    if color is None:
        _say(ax2, f"Teff vs (BP−RP)$_0$ not drawn:\n{cmd_note}")
    elif not ax2.has_data():
        _say(ax2, "Teff vs (BP−RP)$_0$ not drawn:\nno spectrum with both Teff and (BP−RP)$_0$")
    else:
        ax2.set_xlabel(r"$(G_\mathrm{BP} - G_\mathrm{RP})_0$ (mag)")
        ax2.set_ylabel(_AXIS["teff"])
        ax2.set_title(r"$T_\mathrm{eff}$ vs $(G_\mathrm{BP} - G_\mathrm{RP})_0$")
        ax2.legend(fontsize=8, title=lum_src, title_fontsize=8, markerscale=2)
    cap = (
        "CNN-TLMA Teff and log g (left; hot and low gravity towards the origin as usual) and "
        f"Teff against the dereddened Gaia colour (right); colours: {lum_src}."
    )
    return fig, cap


def _say(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, fontsize=10,
            wrap=True)  # fmt: skip
    ax.set_xticks([])
    ax.set_yticks([])


def _band_panel(ax, x, y, mu, sd, k, name, colour, note):
    lim = _lims([x, y]) or (-300, 300)
    ok = np.isfinite(x) & np.isfinite(y)
    inside = ok & (np.abs(y - x - mu) <= k * sd)
    outside = ok & ~inside
    ax.scatter(x[inside], y[inside], s=_ms(), color=colour, alpha=0.5, linewidths=0,
               rasterized=True, label=f"within {k:g}σ ({int(inside.sum()):,})")  # fmt: skip
    ax.scatter(x[outside], y[outside], s=2 * _ms(), marker="x", color=OKABE_ITO["vermillion"],
               linewidths=0.8, rasterized=True,
               label=f"outside ({int(outside.sum()):,})")  # fmt: skip
    xs = np.array(lim)
    ax.plot(xs, xs, color=OKABE_ITO["black"], lw=0.8, label="1:1")
    for sgn in (-1, 1):
        ax.plot(xs, xs + mu + sgn * k * sd, color=OKABE_ITO["black"], lw=1.2, ls="--",
                label=None if sgn < 0 else f"{k:g}σ band")  # fmt: skip
    ax.text(0.03, 0.97, f"band: RV({name}) − RV(LAMOST) = {mu:+.2f} ± {k:g} × {sd:.2f} "
            f"km/s\n(mean and σ after iterative {k:g}σ clipping)",
            transform=ax.transAxes, va="top", fontsize=8)  # fmt: skip
    ax.set_xlim(*lim)
    ax.set_ylim(*lim)
    ax.set_xlabel("LAMOST RV (km/s)")
    ax.set_ylabel(f"{name} RV (km/s)")
    ax.set_title(f"{name} vs LAMOST{note}")
    ax.legend(fontsize=7, loc="lower right", markerscale=2)


@_figure("rv_lamost", "RV vs LAMOST RV")
def _fig_rv_lamost(r: _Run, out: Path, opt: dict):
    if r.cat is None:
        raise _NotDrawn(f"no catalog: {r.cat_error}")
    if "lamost_rv" not in r.cat:
        raise _NotDrawn("the catalog has no LAMOST RV (lamost_rv)")
    if "rv_tm" not in r.cat:
        raise _NotDrawn(_stage_missing(r, "rvmm", "RVMM template matching"))
    m, msel = _m_selection(r)
    lam, tm = _n(r.cat, "lamost_rv"), _n(r.cat, "rv_tm")
    base = m & np.isfinite(lam) & np.isfinite(tm)
    if not base.any():
        raise _NotDrawn(f"no M spectrum ({msel}) with both a TM and a LAMOST RV")
    reconciled = r.has("rv", "rv_from")
    if not reconciled:
        fig = Figure(figsize=(7, 6.5), layout="constrained")
        ax = fig.subplots()
        idx, note = _sample(base, opt["max_points"])
        d = tm[base] - lam[base]
        lim = _lims([lam[idx], tm[idx]]) or (-300, 300)
        ax.scatter(lam[idx], tm[idx], s=_ms(), color=OKABE_ITO["blue"], alpha=0.5, linewidths=0,
                   rasterized=True, label=f"M spectra ({int(base.sum()):,})")  # fmt: skip
        ax.plot(lim, lim, color=OKABE_ITO["black"], lw=0.8, label="1:1")
        ax.text(0.03, 0.97, f"TM − LAMOST: median {np.median(d):+.2f} km/s, robust σ "
                f"{robust_sigma(d):.2f} km/s", transform=ax.transAxes, va="top",
                fontsize=8)  # fmt: skip
        ax.set_xlim(*lim)
        ax.set_ylim(*lim)
        ax.set_xlabel("LAMOST RV (km/s)")
        ax.set_ylabel("TM RV (km/s)")
        ax.set_title(f"TM vs LAMOST{note}")
        ax.legend(fontsize=8, loc="lower right", markerscale=2)
        cap = (
            f"TM RV against the LAMOST pipeline RV for M spectra ({msel}). The run has no RV "
            "reconciliation outputs (rv, rv_from), so TM vs LAMOST only is shown and the "
            "3σ/2σ bands of the reconciliation are not drawn."
        )
        return fig, cap
    k_tm, k_dsal = opt["tm_sigma"], opt["dsal_sigma"]
    mu, sd, n_kept = clipped_mean_std(tm[base] - lam[base], k_tm)
    bands = {"TM": {"k": k_tm, "mean_kms": mu, "sigma_kms": sd, "n": int(base.sum()),
                    "n_kept": n_kept}}  # fmt: skip
    out_tm = base & (np.abs(tm - lam - mu) > k_tm * sd)
    panels = [("TM", lam, tm, mu, sd, k_tm, base)]
    d1 = _n(r.cat, "rv_dsal1") if "rv_dsal1" in r.cat else np.full(len(r.cat), np.nan)
    d2 = _n(r.cat, "rv_dsal2") if "rv_dsal2" in r.cat else np.full(len(r.cat), np.nan)
    s1 = out_tm & np.isfinite(d1) & np.isfinite(lam)
    s2 = out_tm & ~np.isfinite(d1) & np.isfinite(d2) & np.isfinite(lam)
    for name, dv, sel in (("DSAL I", d1, s1), ("DSAL II", d2, s2)):
        if sel.sum() >= 2:
            a, b, kept = clipped_mean_std(dv[sel] - lam[sel], k_dsal)
            panels.append((name, lam, dv, a, b, k_dsal, sel))
            bands[name] = {"k": k_dsal, "mean_kms": a, "sigma_kms": b, "n": int(sel.sum()),
                           "n_kept": kept}  # fmt: skip
    opt["stats"]["rv_bands"] = bands
    fig = Figure(figsize=(6 * (len(panels) + 1), 6), layout="constrained")
    axes = fig.subplots(1, len(panels) + 1)
    for ax, (name, x, y, a, b, k, sel) in zip(axes, panels):
        idx, note = _sample(sel, opt["max_points"])
        _band_panel(ax, x[idx], y[idx], a, b, k, name, OKABE_ITO["blue"], note)
    ax = axes[-1]
    rvf = _str(r.cat, "rv_from")
    rv = _n(r.cat, "rv")
    sel = m & np.isfinite(rv) & np.isfinite(lam)
    idx, note = _sample(sel, opt["max_points"])
    palette = [OKABE_ITO[c] for c in ("sky_blue", "blue", "green", "orange", "purple",
                                      "vermillion", "yellow", "black")]  # fmt: skip
    for i, v in enumerate(RV_FROM_VALUES):
        k = idx[rvf[idx] == v]
        if k.size:
            ax.scatter(lam[k], rv[k], s=_ms(), color=palette[i], alpha=0.7, linewidths=0,
                       rasterized=True, label=f"{v} ({k.size:,})")  # fmt: skip
    lim = _lims([lam[idx], rv[idx]]) or (-300, 300)
    ax.plot(lim, lim, color=OKABE_ITO["black"], lw=0.8)
    ax.set_xlim(*lim)
    ax.set_ylim(*lim)
    ax.set_xlabel("LAMOST RV (km/s)")
    ax.set_ylabel("reconciled RV, rv (km/s)")
    ax.set_title(f"final rv by rv_from{note}")
    ax.legend(fontsize=7, loc="lower right", markerscale=2)
    cap = (
        f"Like the paper's Figure 10, for M spectra ({msel}): TM vs LAMOST with the "
        f"{k_tm:g}σ band of the TM − LAMOST residuals (mean and σ by iterative {k_tm:g}σ "
        "clipping, measured on this run); for the spectra outside it, DSAL I (where "
        f"available, else DSAL II) vs LAMOST with the {k_dsal:g}σ band; last panel: the "
        "reconciled rv coloured by rv_from."
    )
    return fig, cap


def _binned(snr: np.ndarray, y: np.ndarray, width: float, top: float, min_n: int):
    edges = np.arange(0.0, top + width, width)
    cen, med, lo, hi = [], [], [], []
    for a, b in zip(edges[:-1], edges[1:]):
        k = (snr > a) & (snr <= b) & np.isfinite(y)
        if k.sum() >= min_n:
            q = np.percentile(y[k], [16, 50, 84])
            cen.append(0.5 * (a + b))
            lo.append(q[0])
            med.append(q[1])
            hi.append(q[2])
    return np.array(cen), np.array(med), np.array(lo), np.array(hi)


@_figure("errors_snr", "RV and parameter errors vs S/N_i (paper Figure 13)")
def _fig_errors_snr(r: _Run, out: Path, opt: dict):
    if r.cat is None:
        raise _NotDrawn(f"no catalog: {r.cat_error}")
    _need(r, ["snr_i"], "no S/N_i")
    rv_col = "rv_err" if "rv_err" in r.cat else ("rv_tm_err" if "rv_tm_err" in r.cat else None)
    params = [p for p in TLMA_PARAMS if f"{p}_err" in r.cat]
    if rv_col is None and not params:
        raise _NotDrawn(
            _stage_missing(r, "rvmm", "RVMM") + "; " + _stage_missing(r, "spmm", "SPMM")
        )
    snr = _n(r.cat, "snr_i")
    lum, lum_src = _lum(r)
    m, msel = _m_selection(r)
    if lum is None:
        lum = np.where(m, "dM", "")
        lum_src = f"{msel} (no dwarf/giant split in this run)"
    cols = ([(rv_col, "RV")] if rv_col else []) + [(f"{p}_err", p) for p in params]
    ncol = 2
    nrow = math.ceil(len(cols) / ncol)
    fig = Figure(figsize=(12, 3.8 * nrow), layout="constrained")
    axes = np.atleast_1d(fig.subplots(nrow, ncol)).ravel()
    for ax in axes[len(cols) :]:
        ax.set_visible(False)
    top = opt["snr_max"]
    width = opt["snr_bin"]
    for ax, (col, what) in zip(axes, cols):
        y = _n(r.cat, col)
        drawn = False
        for key in DMGM_CLASSES:
            sel = (lum == key) & m & np.isfinite(y) & np.isfinite(snr) & (snr > 0) & (snr < top)
            if not sel.any():
                continue
            colour = _LUM_COLOUR[key]
            idx, _ = _sample(sel, opt["max_points"])
            ax.scatter(snr[idx], y[idx], s=_ms(), color=colour, alpha=0.25, linewidths=0,
                       rasterized=True)  # fmt: skip
            c, med, lo, hi = _binned(snr[sel], y[sel], width, top, opt["min_bin_count"])
            if c.size:
                ax.errorbar(c, med, yerr=[med - lo, hi - med], fmt="o-", ms=3, lw=1,
                            color=colour, capsize=2,
                            label=f"{key}: median, 16–84% ({int(sel.sum()):,})")  # fmt: skip
            else:
                ax.plot([], [], "o", color=colour, label=f"{key} ({int(sel.sum()):,})")
            drawn = True
        if not drawn:
            _say(ax, f"{col}: no finite value for M spectra")
            continue
        ax.set_xlabel(r"S/N$_i$")
        if what == "RV":
            ax.set_ylabel(f"RV error, {col} (km/s)")
        else:
            ax.set_ylabel(f"CNN-TLMA {_ERR_AXIS[what]}")
        lim = _lims([y[m & np.isfinite(y)]], q=(0, 98), pad=0.05)
        if lim:
            ax.set_ylim(max(0.0, lim[0]), lim[1])
        ax.legend(fontsize=8)
    cap = (
        f"Errors against S/N_i for M spectra ({msel}), dwarfs and giants ({lum_src}): points "
        f"per spectrum, and the median with 16th–84th percentiles in S/N_i bins of "
        f"{width:g} (bins with ≥ {opt['min_bin_count']} spectra), S/N_i < {top:g}, as the "
        f"paper's Figure 13. RV error: {rv_col or 'not available'}."
    )
    return fig, cap


@_figure("rv_from", "Where the RV comes from (rv_from, paper Table 7)")
def _fig_rv_from(r: _Run, out: Path, opt: dict):
    if r.cat is None:
        raise _NotDrawn(f"no catalog: {r.cat_error}")
    if "rv_from" not in r.cat:
        raise _NotDrawn(
            _stage_missing(r, "rvmm", "RV reconciliation") + " (no rv_from column): the RV "
            "reconciliation is not part of this run"
        )
    rvf = _str(r.cat, "rv_from")
    m, msel = _m_selection(r)
    vals = list(RV_FROM_VALUES) + sorted(set(rvf[m]) - set(RV_FROM_VALUES) - {""})
    counts = np.array([int(np.sum(rvf[m] == v)) for v in vals])
    if counts.sum() == 0:
        raise _NotDrawn(f"no M spectrum ({msel}) has an rv_from value")
    truth = r.has("true_rv", "rv")
    fig = Figure(figsize=(12 if truth else 7, 4.8), layout="constrained")
    axes = fig.subplots(1, 2 if truth else 1)
    ax = axes[0] if truth else axes
    y = np.arange(len(vals))
    ax.barh(y, counts, color=OKABE_ITO["blue"])
    tot = counts.sum()
    for yi, cnt in zip(y, counts):
        ax.text(cnt, yi, f" {cnt:,} ({100 * cnt / tot:.1f}%)", va="center", fontsize=8)
    ax.set_yticks(y, vals)
    ax.invert_yaxis()
    ax.set_xlabel("number of M spectra")
    ax.set_xlim(0, max(counts.max() * 1.3, 1))
    ax.set_title(f"rv_from of {tot:,} M spectra")
    if truth:
        ax2 = axes[1]
        d = _n(r.cat, "rv") - _n(r.cat, "true_rv")
        sig, lab = [], []
        for v in vals:
            k = m & (rvf == v) & np.isfinite(d)
            if k.sum() >= 2:
                sig.append(robust_sigma(d[k]))
                lab.append(f"{v} ({int(k.sum())})")
        if sig:
            yy = np.arange(len(sig))
            ax2.barh(yy, sig, color=OKABE_ITO["green"])
            ax2.set_yticks(yy, lab)
            ax2.invert_yaxis()
            ax2.set_xlabel("robust σ of rv − true RV (km/s)")
            ax2.set_title("accuracy by rv_from (simulation truth)")
        else:
            _say(ax2, "too few spectra per rv_from value to score against the truth")
    cap = (
        f"Counts of the reconciliation's rv_from values for M spectra ({msel}), in the "
        "order of the paper's Table 7"
        + ("; right: robust σ of rv − true RV per value." if truth else ".")
    )
    return fig, cap


def _example_rows(r: _Run, n: int, eligible: np.ndarray) -> list[tuple[int, str]]:
    cat = r.cat
    snr = _n(cat, "snr_i") if "snr_i" in cat else np.zeros(len(cat))
    snr = np.where(np.isfinite(snr), snr, -np.inf)
    m, _ = _m_selection(r)
    lum, _ = _lum(r)
    picks: list[tuple[int, str]] = []

    def add(mask, why, pick="max"):
        taken = np.isin(np.arange(len(cat)), [i for i, _ in picks])
        idx = np.flatnonzero(mask & eligible & ~taken)
        if idx.size == 0 or len(picks) >= n:
            return
        if pick == "max":
            i = idx[np.argmax(snr[idx])]
        elif pick == "min":
            i = idx[np.argmin(snr[idx])]
        else:
            i = idx[np.argsort(snr[idx])[idx.size // 2]]
        picks.append((int(i), why))

    if lum is not None:
        add(m & (lum == "dM"), "highest-S/N M dwarf")
        add(m & (lum == "gM"), "highest-S/N M giant")
    add(m, "median-S/N M spectrum", pick="median")
    add(m, "highest-S/N M spectrum")
    add(~m, "highest-S/N non-M spectrum")
    everything = np.ones(len(cat), bool)
    add(everything, "median-S/N spectrum", pick="median")
    add(everything, "lowest-S/N spectrum", pick="min")
    add(everything, "highest-S/N spectrum")
    return picks[:n]


@_figure("spectra", "Example spectra with the lines marked")
def _fig_spectra(r: _Run, out: Path, opt: dict):
    if r.cat is None:
        raise _NotDrawn(f"no catalog: {r.cat_error}")
    if r.store is None:
        raise _NotDrawn("the run's configuration (store path) could not be read")
    if not Path(r.store).exists():
        raise _NotDrawn(f"the store {r.store} is not there (moved or deleted)")
    if opt["n_examples"] == 0:
        raise _NotDrawn("n_examples = 0")
    from mspec.io.store import open_store

    ds = open_store(str(r.store))
    obs_store = np.asarray(ds["obsid"].values)
    pos = pd.Index(obs_store)
    if "obsid" not in r.cat:
        raise _NotDrawn("the catalog has no obsid column to find the spectra in the store")
    j_all = pos.get_indexer(pd.to_numeric(r.cat["obsid"], errors="coerce").to_numpy())
    if not (j_all >= 0).any():
        raise _NotDrawn(f"no obsid of the catalog is in the store {r.store}")
    picks = _example_rows(r, opt["n_examples"], j_all >= 0)
    rows = [i for i, _ in picks]
    whys = [w for _, w in picks]
    where = [int(j_all[i]) for i in rows]
    # one spectrum at a time: each read decompresses a whole store chunk per variable (on
    # the workers when a dask client is active, as in a run)
    sub = [ds[["flux", "ivar", "ormask"]].isel(spectra=j).compute() for j in where]
    wave = 10.0 ** np.asarray(ds["loglam"].values, dtype=np.float64)
    fig = Figure(figsize=(13, 3.2 * len(rows)), layout="constrained")
    axes = np.atleast_1d(fig.subplots(len(rows), 1))
    for ax, i, why, k in zip(axes, rows, whys, range(len(rows))):
        flux = np.asarray(sub[k]["flux"].values, dtype=np.float64)
        bad = (
            (np.asarray(sub[k]["ormask"].values) != 0)
            | (np.asarray(sub[k]["ivar"].values) <= 0)
            | ~np.isfinite(flux)
        )
        good = ~bad
        show = np.where(good, flux, np.nan)
        ax.plot(wave, show, color=OKABE_ITO["black"], lw=0.6, label="flux (good pixels)")
        ax.fill_between(wave, 0, 1, where=bad, transform=ax.get_xaxis_transform(),
                        color=OKABE_ITO["orange"], alpha=0.25, lw=0,
                        label=f"masked ({int(bad.sum())} px: ormask ≠ 0 or ivar = 0)")  # fmt: skip
        rv, rv_name = np.nan, ""
        for col, label in (("rv", "rv"), ("rv_tm", "TM"), ("lamost_rv", "LAMOST")):
            if col in r.cat:
                v = float(_n(r.cat, col)[i])
                if np.isfinite(v):
                    rv, rv_name = v, label
                    break
        shift = 1.0 + (rv / _C_KMS if np.isfinite(rv) else 0.0)
        seen = set()
        for name, lam0, kind in _SPEC_LINES:
            x = lam0 * shift
            colour = OKABE_ITO["vermillion"] if kind == "emission" else OKABE_ITO["blue"]
            ax.axvline(x, color=colour, lw=0.8, ls="--" if kind == "absorption" else ":")
            if name not in seen:
                ax.text(x, 0.98, name, transform=ax.get_xaxis_transform(), rotation=90,
                        va="top", ha="right", fontsize=7, color=colour)  # fmt: skip
                seen.add(name)
        if good.any():
            lo, hi = np.nanpercentile(show, [0.5, 99.5])
            pad = 0.1 * (hi - lo) if hi > lo else 1.0
            ax.set_ylim(lo - pad, hi + 2 * pad)
        ax.set_xlim(wave[0], wave[-1])
        ax.set_xlabel("vacuum wavelength (Å)")
        ax.set_ylabel("flux (LAMOST relative units)")
        row = r.cat.row(i)
        bits = [f"obsid {row.get('obsid')}", why]
        for col, fmt in (("snr_i", "S/N$_i$ {:.1f}"), ("teff", "Teff {:.0f} K")):
            if col in r.cat and np.isfinite(_n(r.cat, col)[i]):
                bits.append(fmt.format(_n(r.cat, col)[i]))
        for col in ("spt_class", "luminosity_class", "dmgm_class", "true_subclass"):
            if col in r.cat and str(row.get(col) or "").strip():
                bits.append(f"{col} {row.get(col)}")
        bits.append(
            f"lines at RV {rv:+.1f} km/s ({rv_name})" if rv_name else "lines at rest (no RV)"
        )
        ax.set_title(" · ".join(bits), fontsize=9)
        ax.legend(fontsize=7, loc="lower left")
    cap = (
        "Observed spectra from the store (native pixels, vacuum wavelengths); masked pixels "
        "shaded; dashed blue: absorption lines of the DSAL method (K I, Na I, Ti I, Ca II), "
        "dotted red: Hα, each shifted by the spectrum's RV (reconciled rv, else TM, else "
        "LAMOST)."
    )
    return fig, cap


@_figure("truth_tlma", "CNN-TLMA parameters and RVs against the simulation truth")
def _fig_truth_tlma(r: _Run, out: Path, opt: dict):
    if r.cat is None:
        raise _NotDrawn(f"no catalog: {r.cat_error}")
    if not r.simulated:
        raise _NotDrawn("not a simulated run (no true_* columns)")
    if "teff" not in r.cat and "rv_tm" not in r.cat:
        raise _NotDrawn(
            _stage_missing(r, "spmm", "SPMM") + "; " + _stage_missing(r, "rvmm", "RVMM")
        )
    p = out / "truth_tlma.png"
    accuracy_figure(r.cat, p, snr_min=opt["snr_min"], dpi=opt["dpi"])
    cap = (
        f"Predicted vs true Teff, log g, [M/H], [α/M] for true M dwarfs and giants at S/N_i > "
        f"{opt['snr_min']:g} (1:1 line, Theil–Sen fit), and TM / LAMOST RV residuals."
    )
    return [(p.name, "CNN-TLMA and RV vs truth", cap)]


@_figure("truth_rv", "Every RV method against the simulation truth")
def _fig_truth_rv(r: _Run, out: Path, opt: dict):
    if r.cat is None:
        raise _NotDrawn(f"no catalog: {r.cat_error}")
    if not r.has("true_rv", "true_class"):
        raise _NotDrawn("not a simulated run (no true_rv column)")
    cols = [(c, lab) for c, lab in _RV_METHODS if c in r.cat]
    if not any(c != "lamost_rv" for c, _ in cols):
        raise _NotDrawn(_stage_missing(r, "rvmm", "RVMM"))
    truth = _n(r.cat, "true_rv")
    is_m = _str(r.cat, "true_class") == "M"
    ncol = 2
    nrow = math.ceil(len(cols) / ncol)
    fig = Figure(figsize=(12, 3.8 * nrow), layout="constrained")
    axes = np.atleast_1d(fig.subplots(nrow, ncol)).ravel()
    for ax in axes[len(cols) :]:
        ax.set_visible(False)
    snr = _n(r.cat, "snr_i") if "snr_i" in r.cat else np.full(len(r.cat), np.nan)
    last = None
    snr_c = np.clip(np.nan_to_num(snr, nan=1.0, posinf=1.0, neginf=1.0), 1.0, None)
    norm = LogNorm(vmin=1.0, vmax=max(2.0, float(np.max(snr_c[is_m], initial=2.0))))
    for ax, (col, lab) in zip(axes, cols):
        v = _n(r.cat, col)
        sel = is_m & np.isfinite(v) & np.isfinite(truth)
        if not sel.any():
            _say(ax, f"{lab}: no value for a true M star (N = 0 of {int(is_m.sum())})")
            continue
        d = v - truth
        idx, note = _sample(sel, opt["max_points"])
        sc = ax.scatter(truth[idx], d[idx], s=_ms(), c=snr_c[idx], norm=norm, cmap="viridis",
                        alpha=0.7, linewidths=0, rasterized=True)  # fmt: skip
        ax.axhline(0, color=OKABE_ITO["black"], lw=0.8)
        ds = d[sel]
        ax.set_title(
            f"{lab}: N = {int(sel.sum()):,} of {int(is_m.sum()):,} true M; median "
            f"{np.median(ds):+.1f}, robust σ {robust_sigma(ds):.1f} km/s{note}",
            fontsize=9,
        )
        lim = _lims([ds], q=(1, 99), pad=0.3)
        if lim:
            ax.set_ylim(*lim)
        ax.set_xlabel("true RV (km/s)")
        ax.set_ylabel(f"{col} − true RV (km/s)")
        last = sc
    if last is not None:
        fig.colorbar(last, ax=[a for a in axes if a.get_visible()], label=r"S/N$_i$", shrink=0.6)
    cap = (
        "Residual of each RV in the run against the true RV, true M stars, all S/N "
        "(colour: S/N_i); the title gives how many have a value, the median and the robust σ."
    )
    return fig, cap


@_figure("truth_class", "Classes and dwarf/giant split against the simulation truth")
def _fig_truth_class(r: _Run, out: Path, opt: dict):
    if r.cat is None:
        raise _NotDrawn(f"no catalog: {r.cat_error}")
    if not r.has("true_class", "true_lumclass"):
        raise _NotDrawn("not a simulated run (no true_class / true_lumclass)")
    lum, lum_src = _lum(r)
    if lum is None:
        raise _NotDrawn(_stage_missing(r, "dgcm", "DGCM"))
    tclass = _str(r.cat, "true_class")
    tl = _str(r.cat, "true_lumclass")
    m, msel = _m_selection(r)
    snr = _n(r.cat, "snr_i") if "snr_i" in r.cat else np.full(len(r.cat), np.nan)
    fig = Figure(figsize=(12, 4.8), layout="constrained")
    ax1, ax2 = fig.subplots(1, 2)
    # M selection: recall and contamination per S/N_i bin
    edges = [0, 10, 20, 50, 100, np.inf]
    labels, rec, pur, nn = [], [], [], []
    for a, b in zip(edges[:-1], edges[1:]):
        k = (snr > a) & (snr <= b)
        t = k & (tclass == "M")
        p = k & m
        labels.append(f"({a:g},{b:g}]" if np.isfinite(b) else f">{a:g}")
        rec.append(np.mean(m[t]) if t.any() else np.nan)
        pur.append(np.mean(tclass[p] == "M") if p.any() else np.nan)
        nn.append(int(t.sum()))
    x = np.arange(len(labels))
    ax1.bar(x - 0.2, rec, 0.4, color=OKABE_ITO["blue"], label="true M kept (recall)")
    ax1.bar(x + 0.2, pur, 0.4, color=OKABE_ITO["orange"], label="selected that are M (purity)")
    ax1.set_xticks(x, [f"{lab}\nN={n}" for lab, n in zip(labels, nn)], fontsize=8)
    ax1.set_ylim(0, 1.05)
    ax1.set_xlabel(r"S/N$_i$ bin (true M in bin)")
    ax1.set_ylabel("fraction")
    ax1.set_title(f"M selection vs truth ({msel})", fontsize=10)
    ax1.legend(fontsize=8, loc="lower right")
    sel = tclass == "M"
    acc = []
    for a, b in zip(edges[:-1], edges[1:]):
        k = sel & (snr > a) & (snr <= b) & np.isin(tl, DMGM_CLASSES)
        acc.append(np.mean(lum[k] == tl[k]) if k.any() else np.nan)
    ax2.bar(x, acc, 0.6, color=OKABE_ITO["green"])
    ax2.set_xticks(x, labels, fontsize=8)
    ax2.set_ylim(0, 1.05)
    ax2.set_xlabel(r"S/N$_i$ bin")
    ax2.set_ylabel("fraction of true M with the right dM/gM")
    ax2.set_title(f"dwarf/giant vs truth ({lum_src})", fontsize=10)
    cap = (
        "Left: the fraction of true M stars the run keeps as M and the fraction of the "
        "spectra it keeps that are truly M, by S/N_i; right: dwarf/giant accuracy on true M."
    )
    return fig, cap


#: Names of the report's figures, in page order (``figures=`` of :func:`write_run_report`).
FIGURE_NAMES: tuple[str, ...] = tuple(name for name, _, _ in _FIGURES)


# --------------------------------------------------------------------------- tables


def _count_table(
    values: np.ndarray, order: Sequence[str] = (), zeros: bool = False
) -> list[tuple[str, int]]:
    """(value, count) pairs: ``order`` first (with 0 counts when ``zeros``), then the rest."""
    vals = np.asarray(values).astype(str)
    uniq, cnt = np.unique(vals, return_counts=True)
    d = dict(zip(uniq.tolist(), cnt.tolist()))
    keys = [k for k in order if zeros or k in d] + sorted(k for k in d if k not in order)
    return [(k if k != "" else "(none)", int(d.get(k, 0))) for k in keys]


def _reason_rows(cat: pd.DataFrame, col: str, mask, label: str) -> list[list]:
    """One row per non-empty value of a reason / inspection column (most frequent first)."""
    if col not in cat:
        return []
    v = _str(cat, col)
    v = v[mask] if mask is not None else v
    v = v[v != ""]
    rows = [[label, k, c] for k, c in _count_table(v)]
    return sorted(rows, key=lambda x: -x[2])


def _flag_count(cat: pd.DataFrame, col: str) -> int:
    v = cat[col]
    if v.dtype == object or str(v.dtype).startswith(("string", "str")):
        return int(np.isin(np.char.lower(_str(cat, col).astype(str)), ("true", "1", "yes")).sum())
    return int((pd.to_numeric(v, errors="coerce").fillna(0).to_numpy() > 0).sum())


def _counts_sections(r: _Run) -> list[tuple[str, str, list[str], list[list]]]:
    """(heading, text, header, rows) per counts table; text says what is not there."""
    out = []
    cat = r.cat
    if cat is None:
        return [("Counts", f"No catalog: {r.cat_error}.", [], [])]
    n = len(cat)
    # Table 1 (SCM)
    rows = []
    if "spt_class" in cat:
        for k, v in _count_table(_str(cat, "spt_class"), SPT_CLASSES, zeros=True):
            rows.append(["CNN-SPT", k, v])
    if "wdm_class" in cat:
        for k, v in _count_table(_str(cat, "wdm_class"), ("WD", "M"), zeros=True):
            rows.append(["CNN-WDM", k, v])
    if "CMD_pos" in cat:
        for k, v in _count_table(_str(cat, "CMD_pos"), ("dM", "gM", "other"), zeros=True):
            rows.append(["Gaia CMD position", k if k != "(none)" else "(not placed)", v])
    if "scm_class" in cat:
        for k, v in _count_table(_str(cat, "scm_class"), _SCM_ORDER):
            rows.append(["SCM final class (scm_class)", k, v])
    if "spt_class" in cat:
        spt = _str(cat, "spt_class")
        cand = ~np.isin(spt, ("K", "M"))
        why = "CNN-SPT not K/M"
        if "wdm_class" in cat:
            cand |= _str(cat, "wdm_class") == "WD"
            why += " or CNN-WDM WD"
        if "CMD_pos" in cat:
            cand |= _str(cat, "CMD_pos") == "other"
            why += " or CMD outside the dM/gM regions"
        rows.append([f"SCM inspection candidates ({why})", "candidates", int(cand.sum())])
    if "entered" in cat:
        rows.append(["entered SCM (M_Catalog_V0)", "entered", _flag_count(cat, "entered")])
    rows += _reason_rows(cat, "scm_reason", None, "SCM rule (scm_reason)")
    rows += _reason_rows(cat, "scm_inspect", None, "SCM inspection queue (scm_inspect)")
    if "new_m" in cat:
        rows.append(["M stars LAMOST called something else (new_m)", "new M", _flag_count(
            cat, "new_m")])  # fmt: skip
    m, msel = _m_selection(r)
    rows.append([f"M spectra ({msel})", "M", int(m.sum())])
    text = f"{n:,} spectra in the catalog."
    if "scm_class" not in cat:
        text += (
            " The SCM decision rules (scm_class, is_m) are not in this run: M spectra are "
            "those CNN-SPT calls M and CNN-WDM does not call WD."
        )
    out.append(("SCM: spectral classes (paper Table 1)", text, ["source", "class", "spectra"],
                rows))  # fmt: skip
    # Table 4 (DGCM)
    rows = []
    if "dmgm_class" in cat:
        for k, v in _count_table(_str(cat, "dmgm_class")[m], DMGM_CLASSES, zeros=True):
            rows.append(["CNN-dMgM (M spectra)", k, v])
    if "CMD_pos" in cat:
        for k, v in _count_table(_str(cat, "CMD_pos")[m], ("dM", "gM", "other"), zeros=True):
            rows.append(["Gaia CMD position (M spectra)", k if k != "(none)" else "(not placed)",
                         v])  # fmt: skip
    if "lamost_subclass" in cat:
        sub = _str(cat, "lamost_subclass")[m]
        giant = np.char.startswith(sub.astype(str), "gM")
        rows.append(["LAMOST subclass (M spectra)", "gM*", int(giant.sum())])
        rows.append(["LAMOST subclass (M spectra)", "other", int((~giant).sum())])
    if "luminosity_class" in cat:
        for k, v in _count_table(_str(cat, "luminosity_class")[m], DMGM_CLASSES, zeros=True):
            rows.append(["DGCM final (luminosity_class)", k, v])
    rows += _reason_rows(cat, "dgcm_reason", m, "DGCM rule (dgcm_reason)")
    rows += _reason_rows(cat, "dgcm_inspect", None, "DGCM inspection queue (dgcm_inspect)")
    text = ""
    if not rows:
        text = _stage_missing(r, "dgcm", "DGCM") + "."
    elif "luminosity_class" not in cat:
        text = "The DGCM decision rules (luminosity_class) are not in this run."
    out.append(("DGCM: dwarfs and giants (paper Table 4)", text, ["source", "class", "spectra"],
                rows))  # fmt: skip
    # Table 7 (RVMM)
    rows = []
    if "rv_from" in cat:
        for k, v in _count_table(_str(cat, "rv_from")[m], RV_FROM_VALUES, zeros=True):
            rows.append(["rv_from", k, v])
    for col, lab in _RV_METHODS:
        if col in cat:
            rows.append(["finite RV (M spectra)", lab, int(np.isfinite(_n(cat, col)[m]).sum())])
    rows += _reason_rows(cat, "rv_inspect", None, "RV inspection queue (rv_inspect)")
    if "rv_flag" in cat:
        rows.append(["rv_flag = 1", "", int((_n(cat, "rv_flag") == 1).sum())])
    text = ""
    if "rv_tm" not in cat:
        text = _stage_missing(r, "rvmm", "RVMM") + "."
    elif "rv_from" not in cat:
        text = (
            "The RV reconciliation (rv, rv_from) is not in this run: the counts give how many "
            "M spectra each RV method measured."
        )
    out.append(("RVMM: where the RV comes from (paper Table 7)", text,
                ["source", "value", "spectra"], rows))  # fmt: skip
    # SPMM
    rows = []
    if "teff" in cat:
        lum, lum_src = _lum(r)
        t = np.isfinite(_n(cat, "teff"))
        if lum is not None:
            for key in DMGM_CLASSES:
                rows.append(
                    [f"CNN-TLMA parameters ({lum_src})", key, int((t & (lum == key)).sum())]
                )
        rows.append(["CNN-TLMA parameters", "all", int(t.sum())])
    if "parameter_flag" in cat:
        rows.append(["parameter_flag = 1", "", int((_n(cat, "parameter_flag") == 1).sum())])
        t = np.isfinite(_n(cat, "teff")) if "teff" in cat else None
        rows += _reason_rows(cat, "parameter_flag_reason", t, "parameter_flag = 0 (reason)")
    text = "" if rows else _stage_missing(r, "spmm", "SPMM") + "."
    out.append(("SPMM: stellar parameters", text, ["source", "class", "spectra"], rows))
    return out


def _quarantine(r: _Run) -> tuple[str, list[list]]:
    if r.store is None:
        return "The store path is unknown (config not readable).", []
    q = Path(r.store) / "quarantine.parquet"
    ingest = r.info.get("ingest") or {}
    pre = ""
    if ingest:
        pre = (
            f"This run ingested: {ingest.get('stored', 0)} stored, "
            f"{ingest.get('quarantined', 0)} quarantined, {ingest.get('duplicates', 0)} "
            "duplicates. "
        )
    if not q.exists():
        return pre + f"No file of the store ({r.store}) was quarantined.", []
    try:
        df = pd.read_parquet(q)
    except Exception as exc:  # noqa: BLE001
        return pre + f"The quarantine table {q} could not be read ({exc}).", []
    if df.empty:
        return pre + "The quarantine table is empty.", []
    code = "code" if "code" in df else df.columns[0]
    rows = []
    for k, g in df.groupby(code, sort=False):
        ex = ""
        if "reason" in g and len(g):
            ex = str(g["reason"].iloc[0])[:160]
        f = str(g["file"].iloc[0]) if "file" in g and len(g) else ""
        rows.append([str(k), int(len(g)), f, ex])
    rows.sort(key=lambda x: -x[1])
    return pre + f"{len(df):,} files in {q} (skipped at ingest, never stored):", rows


def _stage_rows(r: _Run) -> tuple[list[list], list[str]]:
    from mspec.pipeline.stages import PIPELINE

    st = r.info.get("stages", {})
    names = ["ingest", *[s.name for s in PIPELINE], "catalog"]
    names += [k for k in st if k not in names]
    modules = {s.name: s.module for s in PIPELINE}
    rows, not_run = [], []
    for name in names:
        info = st.get(name)
        if not isinstance(info, dict):
            if name != "ingest":
                not_run.append(name)
            continue
        cs = info.get("core_seconds_per_spectrum")
        rows.append(
            [
                name,
                info.get("module", modules.get(name, "")),
                ", ".join(info.get("steps", [])) or info.get("status", ""),
                info.get("chunks", ""),
                info.get("computed", ""),
                info.get("skipped", ""),
                _secs(info.get("seconds")),
                "" if cs is None else f"{1000 * float(cs):.2f}",
                "; ".join(info.get("not_available", [])),
            ]
        )
    return rows, not_run


def _secs(x) -> str:
    if x is None:
        return ""
    try:
        x = float(x)
    except (TypeError, ValueError):
        return str(x)
    if not math.isfinite(x):
        return str(x)
    return f"{x:.2f}" if x < 10 else f"{x:.1f}" if x < 100 else f"{x:.0f}"


# --------------------------------------------------------------------------- HTML

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;
max-width:1300px;margin:1.5em auto;padding:0 1em;color:#1a1a1a;line-height:1.45}
h1{font-size:1.7em;margin-bottom:.2em}h2{border-bottom:2px solid #0072B2;padding-bottom:.2em;
margin-top:1.8em}h3{margin-bottom:.3em}
table{border-collapse:collapse;margin:.5em 0 1em;font-size:.9em}
th,td{border:1px solid #ccc;padding:.25em .6em;text-align:left;vertical-align:top}
th{background:#eef4fa}td.num{text-align:right;font-variant-numeric:tabular-nums}
figure{margin:1em 0 2em}figure img{max-width:100%;height:auto;border:1px solid #ddd}
figcaption{font-size:.9em;color:#333;margin-top:.3em}
.notdrawn{background:#fff6e5;border-left:4px solid #E69F00;padding:.4em .8em;margin:.6em 0}
.meta{color:#444;font-size:.9em}nav ul{columns:2}code{background:#f3f3f3;padding:0 .2em}
pre{background:#f7f7f7;padding:.6em;overflow:auto;font-size:.8em;max-height:30em}
"""

# marks every <img> that decoded (naturalWidth > 0) so a headless browser can check them
_JS = """
window.addEventListener('load', function () {
  var imgs = document.images, ok = 0, bad = [];
  for (var i = 0; i < imgs.length; i++) {
    var good = imgs[i].complete && imgs[i].naturalWidth > 0 && imgs[i].naturalHeight > 0;
    imgs[i].setAttribute('data-decoded', good ? 'yes' : 'no');
    imgs[i].setAttribute('data-natural-width', imgs[i].naturalWidth);
    if (good) { ok++; } else { bad.push(imgs[i].id); }
  }
  document.body.setAttribute('data-images-total', imgs.length);
  document.body.setAttribute('data-images-decoded', ok);
  document.body.setAttribute('data-images-broken', bad.join(' '));
});
"""


def _e(x) -> str:
    return html.escape(str(x), quote=True)


def _html_table(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    h = "".join(f"<th>{_e(c)}</th>" for c in header)
    body = []
    for row in rows:
        cells = []
        for c in row:
            cls = ' class="num"' if isinstance(c, (int, float, np.integer, np.floating)) else ""
            txt = f"{c:,}" if isinstance(c, (int, np.integer)) and not isinstance(c, bool) else c
            cells.append(f"<td{cls}>{_e(txt)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><thead><tr>{h}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _render(r: _Run, figs: list[_FigResult], opt: dict, seconds: float) -> str:
    from mspec._version import __version__

    info = r.info
    now = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    n = info.get("n_spectra", len(r.cat) if r.cat is not None else 0)
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>mspec run report: {_e(r.path.name)}</title>",
        f"<style>{_CSS}</style>",
        f"<script>{_JS}</script>",
        "</head><body>",
        "<h1>mspec run report</h1>",
        f'<p class="meta">Run directory <code>{_e(r.path)}</code> · store '
        f"<code>{_e(r.store or '?')}</code> · {_e(n)} spectra · run wall time "
        f"{_secs(info.get('seconds'))} s · mspec {_e(__version__)} · report generated {now} "
        f"in {seconds:.1f} s{' · simulated survey (truth available)' if r.simulated else ''}"
        "</p>",
    ]
    sections = [
        ("summary", "Summary"),
        ("stages", "Stages: run time and cost"),
        ("counts", "Counts per stage"),
        ("quarantine", "Quarantine"),
        *[(f.name, f.title) for f in _dedupe(figs)],
        ("notes", "Notes"),
    ]
    parts.append(
        "<nav><ul>"
        + "".join(f'<li><a href="#{_e(a)}">{_e(t)}</a></li>' for a, t in sections)
        + "</ul></nav>"
    )
    # summary
    parts.append('<h2 id="summary">Summary</h2>')
    na = info.get("not_available", [])
    if na:
        parts.append(
            "<p>Not available in this mspec (not built yet, never faked):</p><ul>"
            + "".join(f"<li>{_e(x)}</li>" for x in na)
            + "</ul>"
        )
    if r.cat_error:
        parts.append(f'<p class="notdrawn">Catalog: {_e(r.cat_error)}</p>')
    if r.simulated:
        rows = _safe(lambda: _summary_rows(opt["metrics"]), [], r, "accuracy summary")
        if rows:
            parts.append("<p>Accuracy against the simulation truth, with the paper's figures:</p>")
            parts.append(_html_table(["metric", "value", "paper (Li et al. 2025)"], rows))
    # stages
    rows, not_run = _safe(lambda: _stage_rows(r), ([], []), r, "stage table")
    parts.append('<h2 id="stages">Stages: run time and cost</h2>')
    if rows:
        parts.append(
            _html_table(
                [
                    "stage",
                    "module",
                    "what",
                    "chunks",
                    "computed",
                    "skipped",
                    "wall s",
                    "core-ms / spectrum",
                    "not available",
                ],  # fmt: skip
                rows,
            )
        )
        parts.append(
            "<p>wall s: the stage's own wall time in the last run; core-ms / spectrum: CPU "
            "time of the driver and every worker process during the stage / spectra computed "
            "(wall time × worker threads where CPU time could not be read; empty when every "
            "chunk was already done).</p>"
        )
    else:
        parts.append('<p class="notdrawn">No stage record (run.json missing or empty).</p>')
    if not_run:
        parts.append(
            '<p class="notdrawn">Stages not run in this run directory: '
            + ", ".join(f"<code>{_e(s)}</code>" for s in not_run)
            + ". Their counts and figures are stated as not available below.</p>"
        )
    # counts
    parts.append('<h2 id="counts">Counts per stage</h2>')
    for head, text, _header, rows in _safe(lambda: _counts_sections(r), [], r, "counts"):
        parts.append(f"<h3>{_e(head)}</h3>")
        if text:
            parts.append(f"<p>{_e(text)}</p>")
        groups = _group_counts(rows)
        opt["counts"][head] = groups
        for source, items in groups.items():
            # like the paper's tables: the values as columns, one row of counts
            parts.append(
                _html_table(
                    [source, *(k or "count" for k in items)], [["spectra", *items.values()]]
                )
            )
    # quarantine
    parts.append('<h2 id="quarantine">Quarantine</h2>')
    text, rows = _safe(lambda: _quarantine(r), ("", []), r, "quarantine summary")
    parts.append(f"<p>{_e(text)}</p>")
    if rows:
        parts.append(_html_table(["reason code", "files", "example file", "example reason"], rows))
    # figures
    done_sections = set()
    for f in figs:
        if f.name not in done_sections:
            parts.append(f'<h2 id="{_e(f.name)}">{_e(f.title)}</h2>')
            done_sections.add(f.name)
        if f.reason:
            parts.append(f'<p class="notdrawn">Not drawn: {_e(f.reason)}</p>')
            continue
        b64 = base64.b64encode(f.png).decode("ascii")
        fid = "fig-" + Path(f.file).stem
        parts.append(
            f'<figure><img id="{_e(fid)}" src="data:image/png;base64,{b64}" '
            f'alt="{_e(f.caption or f.title)}"><figcaption>{_e(f.caption)} '
            f"(<code>{_e(f.file)}</code>)</figcaption></figure>"
        )
    # notes
    parts.append('<h2 id="notes">Notes</h2><ul>')
    notes = list(r.notes) + [
        "Colours: Okabe–Ito colour-blind-safe palette; dwarfs (dM) blue, giants (gM) "
        "vermillion, others grey.",
        f"Scatter plots show at most {opt['max_points']:,} random points per group (fixed "
        "seed); statistics use every spectrum.",
        "Figures are also saved as PNG files beside this page; manifest.json lists them and "
        "the figures not drawn, with the reason.",
    ]
    parts += [f"<li>{_e(x)}</li>" for x in notes]
    parts.append("</ul>")
    if r.config_text:
        parts.append(
            "<details><summary>Resolved configuration (config.resolved.toml)</summary>"
            f"<pre>{_e(r.config_text)}</pre></details>"
        )
    parts.append("</body></html>")
    return "\n".join(parts)


def _safe(func, default, r: _Run, what: str):
    """``func()``, or ``default`` with a note when bad data make it fail."""
    try:
        return func()
    except Exception as exc:  # noqa: BLE001 - the page is written whatever the data
        log.warning("run report: %s failed", what, exc_info=True)
        r.notes.append(f"{what} could not be computed: {type(exc).__name__}: {exc}")
        return default


def _group_counts(rows: list[list]) -> dict[str, dict[str, int]]:
    """``[[source, value, count], ...]`` -> ``{source: {value: count}}`` in row order."""
    out: dict[str, dict[str, int]] = {}
    for source, value, count in rows:
        out.setdefault(str(source), {})[str(value)] = int(count)
    return out


def _dedupe(figs: list[_FigResult]) -> list[_FigResult]:
    seen, out = set(), []
    for f in figs:
        if f.name not in seen:
            seen.add(f.name)
            out.append(f)
    return out


# --------------------------------------------------------------------------- public


def write_run_report(
    run_dir,
    *,
    out_dir=None,
    n_examples: int = 4,
    max_points: int = 50_000,
    snr_min: float = 20.0,
    tm_sigma: float = 3.0,
    dsal_sigma: float = 2.0,
    dpi: int = 100,
    figures: Sequence[str] | None = None,
) -> Path:
    """Write the HTML report of a run directory: ``RUN/report/index.html`` and its PNGs.

    Reads ``RUN/run.json`` (per-stage chunks, seconds, core-seconds per spectrum, parts not
    available), ``RUN/config.resolved.toml`` (the store), ``RUN/catalog/catalog.parquet``
    (the per-spectrum table) and, for the example spectra and the quarantine summary, the
    store. Works on any run: what the run does not have (a stage not run, no Gaia
    photometry, no truth) is stated in the page instead of drawn empty; a figure that fails
    on bad data is stated with its error and the rest of the report is written.

    Parameters
    ----------
    run_dir : path-like
        A run directory (``mspec run`` / :func:`mspec.run` output; holds
        ``config.resolved.toml``).
    out_dir : path-like, optional
        Where to write the page, its PNGs and ``manifest.json`` (default ``RUN/report``).
    n_examples : int
        Example spectra drawn (0-12).
    max_points : int
        At most this many random points per scatter panel (per class in the error panels;
        >= 100); statistics use every spectrum.
    snr_min : float
        S/N_i cut (exclusive) of the truth comparisons (as :func:`mspec.report.accuracy_metrics`).
    tm_sigma, dsal_sigma : float
        Widths, in standard deviations, of the TM - LAMOST and DSAL - LAMOST bands of the
        RV comparison (the paper's 3 and 2).
    dpi : int
        Resolution of the PNGs (dots per inch, 50-300).
    figures : sequence of str, optional
        Draw only these figures (names in :data:`FIGURE_NAMES`); the others are stated as
        not requested. Default: all.

    Returns
    -------
    pathlib.Path
        The path of ``index.html``.

    Raises
    ------
    FileNotFoundError
        ``run_dir`` does not exist.
    ValueError
        ``run_dir`` is not a run directory, or a bad option (named in the message).
    """
    if not isinstance(run_dir, (str, Path)):
        raise TypeError(f"run_dir must be a path, got {type(run_dir).__name__}")
    run_dir = Path(run_dir)
    if not run_dir.exists():
        raise FileNotFoundError(f"run_dir {run_dir} does not exist")
    if not run_dir.is_dir() or not (
        (run_dir / "config.resolved.toml").is_file() or (run_dir / "run.json").is_file()
    ):
        raise ValueError(
            f"run_dir {run_dir} is not an mspec run directory (no config.resolved.toml or run.json)"
        )
    _check_int("n_examples", n_examples, 0, 12)
    _check_int("max_points", max_points, 100, None)
    _check_int("dpi", dpi, 50, 300)
    for name, v in (("snr_min", snr_min), ("tm_sigma", tm_sigma), ("dsal_sigma", dsal_sigma)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ValueError(f"{name} must be a finite number, got {v!r}")
    if tm_sigma <= 0 or dsal_sigma <= 0:
        raise ValueError(f"tm_sigma and dsal_sigma must be > 0, got {tm_sigma}, {dsal_sigma}")
    if figures is not None:
        if isinstance(figures, str) or not all(isinstance(f, str) for f in figures):
            raise ValueError(f"figures must be a list of figure names, got {figures!r}")
        unknown = [f for f in figures if f not in FIGURE_NAMES]
        if unknown:
            raise ValueError(f"figures: unknown {unknown}; the figures are {list(FIGURE_NAMES)}")
        figures = set(figures)
    _MEMO.clear()
    _STYLE.clear()
    try:
        return _write(
            run_dir, out_dir, n_examples, max_points, snr_min, tm_sigma, dsal_sigma, dpi, figures
        )
    finally:
        _MEMO.clear()
        _STYLE.clear()


def _write(run_dir, out_dir, n_examples, max_points, snr_min, tm_sigma, dsal_sigma, dpi, figures):
    t0 = time.perf_counter()
    out = Path(out_dir) if out_dir is not None else run_dir / REPORT_DIRNAME
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*.png"):  # figures of an earlier report that may not apply now
        old.unlink()
    r = _load_run(run_dir)
    if r.cat is not None:
        _STYLE["ms"] = 4.0 if len(r.cat) > 20_000 else 8.0 if len(r.cat) > 2_000 else 16.0
    opt = {
        "n_examples": int(n_examples),
        "max_points": int(max_points),
        "snr_min": float(snr_min),
        "tm_sigma": float(tm_sigma),
        "dsal_sigma": float(dsal_sigma),
        "dpi": int(dpi),
        "snr_bin": 5.0,
        "snr_max": 200.0,
        "min_bin_count": 5,
        "metrics": {},
        "stats": {},
        "counts": {},
    }
    if r.cat is not None and r.simulated:
        try:
            opt["metrics"] = accuracy_metrics(r.cat, snr_min=float(snr_min))
        except Exception as exc:  # noqa: BLE001 - reported, not fatal
            r.notes.append(f"accuracy metrics failed: {type(exc).__name__}: {exc}")
    figs: list[_FigResult] = []
    for name, title, func in _FIGURES:
        if figures is not None and name not in figures:
            figs.append(_FigResult(name, title, reason="not requested (figures=...)"))
            continue
        figs += _draw(name, title, func, r, out, opt)
        release_memory()  # a figure's transient arrays must not raise the next one's floor
    page = _render(r, figs, opt, time.perf_counter() - t0)
    path = out / "index.html"
    tmp = out / "index.html.tmp"
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(path)
    manifest = {
        "run_dir": str(run_dir),
        "html": path.name,
        "figures": [
            {"name": f.name, "file": f.file, "title": f.title, "caption": f.caption}
            for f in figs
            if not f.reason
        ],
        "not_drawn": [
            {"name": f.name, "title": f.title, "reason": f.reason} for f in figs if f.reason
        ],  # fmt: skip
        "counts": opt["counts"],
        "stats": opt["stats"],
        "seconds": round(time.perf_counter() - t0, 2),
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1), encoding="utf-8")
    log.info("run report: %s (%d figures, %d not drawn, %.1f s)", path,
             len(manifest["figures"]), len(manifest["not_drawn"]), manifest["seconds"])  # fmt: skip
    return path


def _check_int(name: str, v, lo: int, hi: int | None) -> None:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
        raise ValueError(f"{name} must be an integer, got {v!r}")
    if v < lo or (hi is not None and v > hi):
        rng = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise ValueError(f"{name} must be {rng}, got {v}")


def _draw(name, title, func, r: _Run, out: Path, opt: dict) -> list[_FigResult]:
    try:
        res = func(r, out, opt)
    except _NotDrawn as exc:
        return [_FigResult(name, title, reason=str(exc))]
    except Exception as exc:  # noqa: BLE001 - one figure's failure never stops the report
        log.warning("run report: figure %s failed", name, exc_info=True)
        return [_FigResult(name, title, reason=f"failed: {type(exc).__name__}: {exc}")]
    if isinstance(res, list):  # already saved: (file, title, caption)
        return [
            _FigResult(name, title, caption=f"{t}. {cap}", file=f, png=(out / f).read_bytes())
            for f, t, cap in res
        ]
    fig, cap = res
    p = out / f"{name}.png"
    try:
        png = _save(fig, p, opt["dpi"])
    except Exception as exc:  # noqa: BLE001 - drawing can fail on odd data too
        log.warning("run report: figure %s failed", name, exc_info=True)
        p.unlink(missing_ok=True)
        return [_FigResult(name, title, reason=f"failed: {type(exc).__name__}: {exc}")]
    return [_FigResult(name, title, caption=cap, file=p.name, png=png)]
