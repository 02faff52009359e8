"""External comparison of the recommended catalog (paper Sect. 4.2, Figures 13-16).

:func:`compare_catalogs` cross-matches the catalog with an external table (APOGEE, Gaia RVS,
another M catalog) on the sky within 3″ (astropy ``match_to_catalog_sky``: each catalog
spectrum gets its nearest external source, kept if closer than the radius; several spectra
of one star may match the same source, as in the paper's spectrum-level comparisons),
applies the paper's quality criteria (Sect. 4.2: ``snr_u``, ``snr_g`` > 0; ``snr_r``,
``snr_i``, ``snr_z`` > 20; every ``orp_*`` < 1 %) and the catalog's own flags
(``parameter_flag = 1`` for the parameters, ``rv_flag = 1`` for the RV), and reports for
each parameter, luminosity class and S/N_i bin (and all S/N together) the offset
μ = mean(this work − external) and dispersion σ = std (ddof=1), with the median and the
robust σ (1.4826 MAD) beside them.

Figures (matplotlib Figure API, no pyplot state): :func:`comparison_figure` (this work
against the external values with the one-to-one line and μ, σ per class, and the
difference against S/N_i with per-bin μ ± σ, like Figures 14-16) and
:func:`internal_error_figure` (the internal errors against S/N_i: median in (S/N_i − 2.5,
S/N_i + 2.5] with 16th-84th percentile bars, dM and gM, like Figure 13).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from mspec.flags import SNR_BINS

__all__ = [
    "COMPARED",
    "ALIASES",
    "ComparisonResult",
    "read_table",
    "resolve_columns",
    "crossmatch",
    "quality_mask",
    "comparison_stats",
    "compare_catalogs",
    "comparison_figure",
    "internal_error_figure",
]

#: Quantities compared, with units.
COMPARED: dict[str, str] = {
    "rv": "km/s",
    "teff": "K",
    "logg": "dex",
    "m_h": "dex",
    "alpha_m": "dex",
}
#: Column names looked up (case-insensitively) in an external table for each quantity.
ALIASES: dict[str, tuple[str, ...]] = {
    "ra": ("ra", "raj2000", "ra_icrs", "_raj2000"),
    "dec": ("dec", "dej2000", "de_icrs", "decj2000", "_dej2000"),
    "rv": ("rv", "radial_velocity", "vhelio_avg", "vhelio", "hrv"),
    "teff": ("teff", "t_eff"),
    "logg": ("logg", "log_g"),
    "m_h": ("m_h", "[m/h]", "mh", "feh", "fe_h", "[fe/h]"),
    "alpha_m": ("alpha_m", "[alpha/m]", "alpham", "alpha_fe", "[alpha/fe]"),
}
_LABELS = {
    "rv": "RV",
    "teff": r"$T_\mathrm{eff}$",
    "logg": r"$\log g$",
    "m_h": "[M/H]",
    "alpha_m": r"[$\alpha$/M]",
}
_QUALITY = {"snr_u": 0.0, "snr_g": 0.0, "snr_r": 20.0, "snr_i": 20.0, "snr_z": 20.0}
_ORP_MAX = 0.01


@dataclass
class ComparisonResult:
    """What :func:`compare_catalogs` returns.

    Attributes
    ----------
    matched : pandas.DataFrame
        One row per matched catalog spectrum: the catalog columns, ``ext_<q>`` for every
        compared quantity, ``sep_arcsec``, ``quality`` (the paper's criteria pass) and
        ``diff_<q>`` (this work − external; NaN where not compared).
    stats : pandas.DataFrame
        :func:`comparison_stats` of ``matched``.
    columns : dict
        quantity -> external column used.
    n_catalog, n_external : int
        Rows of the inputs.
    """

    matched: pd.DataFrame
    stats: pd.DataFrame
    columns: dict = field(default_factory=dict)
    n_catalog: int = 0
    n_external: int = 0


def read_table(path) -> pd.DataFrame:
    """Read an external table: Parquet (file or directory), CSV, or anything astropy reads
    (FITS, ECSV, VOTable).

    Parameters
    ----------
    path : path-like

    Returns
    -------
    pandas.DataFrame
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"external table {p} does not exist")
    name = p.name.lower()
    if p.is_dir() or name.endswith((".parquet", ".pq")):
        return pd.read_parquet(p)
    if name.endswith((".csv", ".csv.gz")):
        return pd.read_csv(p)
    import warnings

    from astropy.table import Table

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t = Table.read(p)
    multi = [c for c in t.colnames if len(t[c].shape) > 1]
    if multi:
        t.remove_columns(multi)
    df = t.to_pandas()
    for c in df.columns:
        if df[c].dtype == object and len(df) and isinstance(df[c].iloc[0], bytes):
            df[c] = df[c].str.decode("utf-8")
    return df


def resolve_columns(external: pd.DataFrame, columns: Mapping[str, str] | None = None) -> dict:
    """Which external column holds each of ra, dec and the compared quantities.

    Parameters
    ----------
    external : pandas.DataFrame
    columns : mapping, optional
        Explicit ``{quantity: external column}`` (quantities: ra, dec, rv, teff, logg, m_h,
        alpha_m); the rest are looked up in :data:`ALIASES`.

    Returns
    -------
    dict
        Quantity -> column for those found; always ``ra`` and ``dec``.

    Raises
    ------
    KeyError
        A named column is missing, or no ra/dec column is found.
    """
    lower = {c.lower(): c for c in external.columns}
    out = {}
    columns = dict(columns or {})
    unknown = [k for k in columns if k not in ALIASES]
    if unknown:
        raise KeyError(f"columns: unknown quantities {unknown}; known: {list(ALIASES)}")
    for q, aliases in ALIASES.items():
        if q in columns:
            if columns[q] not in external.columns:
                raise KeyError(f"columns: {q}={columns[q]!r} is not a column of the external table")
            out[q] = columns[q]
            continue
        for a in aliases:
            if a in lower:
                out[q] = lower[a]
                break
    for q in ("ra", "dec"):
        if q not in out:
            raise KeyError(
                f"external table: no {q} column (looked for {ALIASES[q]}); name it with "
                f"columns={{'{q}': ...}}"
            )
    return out


def crossmatch(
    catalog: pd.DataFrame,
    external: pd.DataFrame,
    *,
    radius_arcsec: float = 3.0,
    ext_ra: str = "ra",
    ext_dec: str = "dec",
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Nearest external source of each catalog row, within ``radius_arcsec``.

    Parameters
    ----------
    catalog : pandas.DataFrame
        With ``ra``, ``dec`` (deg).
    external : pandas.DataFrame
        With ``ext_ra``, ``ext_dec`` (deg).
    radius_arcsec : float
        Match radius (arcsec).

    Returns
    -------
    (cat_index, ext_index, sep_arcsec) : arrays
        Positions (``iloc``) of the matched pairs and their separations.
    """
    from astropy import units as u
    from astropy.coordinates import SkyCoord

    if not radius_arcsec > 0:
        raise ValueError(f"radius_arcsec must be positive, got {radius_arcsec!r}")
    cra = pd.to_numeric(catalog["ra"], errors="coerce").to_numpy("float64")
    cdec = pd.to_numeric(catalog["dec"], errors="coerce").to_numpy("float64")
    era = pd.to_numeric(external[ext_ra], errors="coerce").to_numpy("float64")
    edec = pd.to_numeric(external[ext_dec], errors="coerce").to_numpy("float64")
    cok = np.flatnonzero(np.isfinite(cra) & np.isfinite(cdec) & (np.abs(cdec) <= 90))
    eok = np.flatnonzero(np.isfinite(era) & np.isfinite(edec) & (np.abs(edec) <= 90))
    if len(cok) == 0 or len(eok) == 0:
        e = np.zeros(0, dtype=np.int64)
        return e, e, np.zeros(0)
    c1 = SkyCoord(cra[cok] * u.deg, cdec[cok] * u.deg)
    c2 = SkyCoord(era[eok] * u.deg, edec[eok] * u.deg)
    idx, sep, _ = c1.match_to_catalog_sky(c2)
    sep = sep.to_value(u.arcsec)
    keep = sep < radius_arcsec
    return cok[keep], eok[idx[keep]], sep[keep]


def quality_mask(table: pd.DataFrame) -> np.ndarray:
    """The paper's Sect. 4.2 spectral quality criteria (missing columns fail).

    ``snr_u``, ``snr_g`` > 0; ``snr_r``, ``snr_i``, ``snr_z`` > 20; ``orp_u`` ... ``orp_z``
    < 0.01.

    Parameters
    ----------
    table : pandas.DataFrame

    Returns
    -------
    numpy.ndarray of bool
    """
    ok = np.ones(len(table), dtype=bool)
    with np.errstate(invalid="ignore"):
        for c, lo in _QUALITY.items():
            v = (
                pd.to_numeric(table[c], errors="coerce").to_numpy("float64")
                if c in table
                else np.full(len(table), np.nan)
            )
            ok &= v > lo
        for b in "ugriz":
            c = f"orp_{b}"
            v = (
                pd.to_numeric(table[c], errors="coerce").to_numpy("float64")
                if c in table
                else np.full(len(table), np.nan)
            )
            ok &= v < _ORP_MAX
    return ok


def _robust_sigma(d: np.ndarray) -> float:
    if len(d) == 0:
        return np.nan
    return float(1.4826 * np.median(np.abs(d - np.median(d))))


def comparison_stats(matched: pd.DataFrame, quantities: Sequence[str] | None = None):
    """Offset and dispersion of this work − external per quantity, class and S/N_i bin.

    Parameters
    ----------
    matched : pandas.DataFrame
        :attr:`ComparisonResult.matched` (``diff_<q>``, ``luminosity_class``, ``snr_i``).
    quantities : sequence of str, optional
        Default: every ``diff_<q>`` present.

    Returns
    -------
    pandas.DataFrame
        Columns ``quantity``, ``unit``, ``lumclass`` (dM, gM, all), ``snr_bin`` (the
        paper's bins and ``all``), ``n``, ``offset`` (mean), ``sigma`` (std, ddof=1),
        ``median``, ``robust_sigma``.
    """
    if quantities is None:
        quantities = [q for q in COMPARED if f"diff_{q}" in matched]
    rows = []
    lum = (
        matched["luminosity_class"].astype("string").fillna("").to_numpy(dtype=object)
        if "luminosity_class" in matched
        else np.full(len(matched), "", dtype=object)
    )
    snr = pd.to_numeric(matched.get("snr_i", pd.Series(np.nan, index=matched.index)))
    snr = snr.to_numpy("float64")
    bins = [("all", -np.inf, np.inf), *SNR_BINS]
    for q in quantities:
        d = pd.to_numeric(matched[f"diff_{q}"], errors="coerce").to_numpy("float64")
        for lc in ("dM", "gM", "all"):
            in_lc = np.ones(len(d), bool) if lc == "all" else (lum == lc)
            for label, lo, hi in bins:
                with np.errstate(invalid="ignore"):
                    in_b = np.ones(len(d), bool) if label == "all" else (snr > lo) & (snr <= hi)
                x = d[in_lc & in_b & np.isfinite(d)]
                rows.append(
                    {
                        "quantity": q,
                        "unit": COMPARED.get(q, ""),
                        "lumclass": lc,
                        "snr_bin": label,
                        "n": len(x),
                        "offset": float(np.mean(x)) if len(x) else np.nan,
                        "sigma": float(np.std(x, ddof=1)) if len(x) > 1 else np.nan,
                        "median": float(np.median(x)) if len(x) else np.nan,
                        "robust_sigma": _robust_sigma(x),
                    }
                )
    return pd.DataFrame(rows)


def _catalog_frame(catalog) -> pd.DataFrame:
    if isinstance(catalog, pd.DataFrame):
        return catalog.reset_index(drop=True)
    if hasattr(catalog, "compute"):
        return catalog.compute().reset_index(drop=True)
    from mspec.catalog import read_catalog

    p = Path(catalog)
    if (p / "config.resolved.toml").is_file():
        from mspec.catalog import build_catalog

        return build_catalog(p, save_fit=False)["recommended"].compute().reset_index(drop=True)
    return read_catalog(p)


def compare_catalogs(
    catalog,
    external,
    *,
    columns: Mapping[str, str] | None = None,
    radius_arcsec: float = 3.0,
    quality_cuts: bool = True,
    use_flags: bool = True,
) -> ComparisonResult:
    """Cross-match the catalog with an external table and measure offsets and dispersions.

    Parameters
    ----------
    catalog : DataFrame (pandas or dask), path or run directory
        The recommended catalog (Table-9 columns), a file written by
        :func:`mspec.catalog.write`, or a run directory (its catalog is built).
    external : pandas.DataFrame or path
        The external table (:func:`read_table` formats) with positions in deg and any of
        the compared quantities (:data:`ALIASES`, or ``columns``).
    columns : mapping, optional
        ``{quantity: external column}`` overriding the alias look-up.
    radius_arcsec : float
        Match radius (arcsec; the paper: 3).
    quality_cuts : bool
        Apply the paper's Sect. 4.2 spectral quality criteria (:func:`quality_mask`).
    use_flags : bool
        Compare parameters only where ``parameter_flag == 1`` and rv only where
        ``rv_flag == 1`` (the paper's recommended values).

    Returns
    -------
    ComparisonResult
    """
    cat = _catalog_frame(catalog)
    ext = read_table(external) if not isinstance(external, pd.DataFrame) else external
    cols = resolve_columns(ext, columns)
    for need in ("ra", "dec"):
        if need not in cat:
            raise KeyError(f"catalog: no {need!r} column")
    ci, ei, sep = crossmatch(
        cat, ext, radius_arcsec=radius_arcsec, ext_ra=cols["ra"], ext_dec=cols["dec"]
    )
    m = cat.iloc[ci].reset_index(drop=True)
    m["sep_arcsec"] = sep
    good = quality_mask(m) if quality_cuts else np.ones(len(m), bool)
    m["quality"] = good
    compared = [q for q in COMPARED if q in cols and q in m]
    for q in compared:
        ours = pd.to_numeric(m[q], errors="coerce").to_numpy("float64")
        theirs = pd.to_numeric(ext[cols[q]].iloc[ei], errors="coerce").to_numpy("float64")
        m[f"ext_{q}"] = theirs
        use = good.copy()
        if use_flags:
            flag = "rv_flag" if q == "rv" else "parameter_flag"
            if flag in m:
                use &= pd.to_numeric(m[flag], errors="coerce").to_numpy("float64") == 1
        m[f"diff_{q}"] = np.where(use, ours - theirs, np.nan)
    stats = comparison_stats(m, compared)
    return ComparisonResult(
        matched=m,
        stats=stats,
        columns={q: cols[q] for q in ("ra", "dec", *compared)},
        n_catalog=len(cat),
        n_external=len(ext),
    )


def _colours():
    from mspec.plots import OKABE_ITO

    return {"dM": OKABE_ITO["blue"], "gM": OKABE_ITO["vermillion"], "": OKABE_ITO["black"]}


def comparison_figure(result: ComparisonResult, *, name: str = "external"):
    """This work against the external values (top) and the difference against S/N_i
    (bottom), one column per compared quantity (the paper's Figures 14-16).

    Parameters
    ----------
    result : ComparisonResult
    name : str
        Label of the external catalog.

    Returns
    -------
    matplotlib.figure.Figure
    """
    from matplotlib.figure import Figure

    qs = [q for q in COMPARED if f"diff_{q}" in result.matched]
    ncol = max(1, len(qs))
    fig = Figure(figsize=(3.6 * ncol, 7.0), layout="constrained")
    axes = fig.subplots(2, ncol, squeeze=False)
    m = result.matched
    lum = (
        m["luminosity_class"].astype("string").fillna("").to_numpy(dtype=object)
        if "luminosity_class" in m
        else np.full(len(m), "", dtype=object)
    )
    col = _colours()
    snr = pd.to_numeric(m.get("snr_i", pd.Series(np.nan, index=m.index))).to_numpy("float64")
    st = result.stats
    for j, q in enumerate(qs):
        d = m[f"diff_{q}"].to_numpy("float64")
        ok = np.isfinite(d)
        ours = pd.to_numeric(m[q], errors="coerce").to_numpy("float64")
        theirs = m[f"ext_{q}"].to_numpy("float64")
        ax, bx = axes[0, j], axes[1, j]
        unit = COMPARED[q]
        text = []
        for lc in ("dM", "gM", ""):
            sel = ok & (lum == lc)
            if not sel.any():
                continue
            lab = lc or "no class"
            ax.scatter(theirs[sel], ours[sel], s=4, alpha=0.5, color=col[lc], label=lab)
            bx.scatter(snr[sel], d[sel], s=4, alpha=0.4, color=col[lc])
            row = st[(st.quantity == q) & (st.lumclass == (lc or "all")) & (st.snr_bin == "all")]
            if len(row):
                r = row.iloc[0]
                text.append(f"{lab}: μ={r.offset:.3g}, σ={r.sigma:.3g} {unit} (N={r.n})")
            for label, lo, hi in SNR_BINS:
                r = st[(st.quantity == q) & (st.lumclass == (lc or "all")) & (st.snr_bin == label)]
                if len(r) and r.iloc[0].n > 1:
                    x = min(lo + 10.0, 150.0) if np.isinf(hi) else 0.5 * (lo + hi)
                    x += {"dM": -2.0, "gM": 2.0}.get(lc, 0.0)
                    bx.errorbar(x, r.iloc[0].offset, yerr=r.iloc[0].sigma, fmt="o",
                                color=col[lc], mec="k", ms=5, capsize=3)  # fmt: skip
        if ok.any():
            lo_ = np.nanmin([np.nanmin(theirs[ok]), np.nanmin(ours[ok])])
            hi_ = np.nanmax([np.nanmax(theirs[ok]), np.nanmax(ours[ok])])
            ax.plot([lo_, hi_], [lo_, hi_], color="0.4", lw=1, ls="--")
            ax.legend(loc="upper left", fontsize=7, frameon=False)
        ax.set_xlabel(f"{_LABELS[q]} ({name}) [{unit}]")
        ax.set_ylabel(f"{_LABELS[q]} (this work) [{unit}]")
        ax.set_title("\n".join(text) or "no matches", fontsize=7)
        bx.axhline(0.0, color="0.4", lw=1, ls="--")
        bx.set_xlabel(r"S/N$_i$")
        bx.set_ylabel(f"Δ{_LABELS[q]} (this work − {name}) [{unit}]")
    if not qs:
        axes[0, 0].text(0.5, 0.5, "nothing to compare", ha="center", va="center")
    return fig


def internal_error_figure(catalog: pd.DataFrame, *, snr_max: float = 200.0, step: float = 5.0):
    """Internal errors against S/N_i, like the paper's Figure 13.

    Each point is the median error of the recommended values (``rv_flag = 1`` for rv,
    ``parameter_flag = 1`` for the parameters) in (S/N_i − step/2, S/N_i + step/2]; bars
    span the 16th-84th percentiles; dM and gM separately.

    Parameters
    ----------
    catalog : pandas.DataFrame
        The recommended catalog (``snr_i``, ``luminosity_class``, ``<q>_err``, flags).
    snr_max, step : float
        Range and spacing of the S/N_i points.

    Returns
    -------
    matplotlib.figure.Figure
    """
    from matplotlib.figure import Figure

    if hasattr(catalog, "compute"):
        catalog = catalog.compute()
    qs = [q for q in COMPARED if f"{q}_err" in catalog]
    fig = Figure(figsize=(3.2 * max(1, len(qs)), 3.2), layout="constrained")
    axes = fig.subplots(1, max(1, len(qs)), squeeze=False)[0]
    snr = pd.to_numeric(catalog["snr_i"], errors="coerce").to_numpy("float64")
    lum = catalog["luminosity_class"].astype("string").fillna("").to_numpy(dtype=object)
    centres = np.arange(step, snr_max + step / 2, step)
    col = _colours()
    for ax, q in zip(axes, qs, strict=False):
        e = pd.to_numeric(catalog[f"{q}_err"], errors="coerce").to_numpy("float64")
        flag = "rv_flag" if q == "rv" else "parameter_flag"
        use = np.isfinite(e)
        if flag in catalog:
            use &= pd.to_numeric(catalog[flag], errors="coerce").to_numpy("float64") == 1
        for lc in ("dM", "gM"):
            x, med, lo, hi = [], [], [], []
            for c in centres:
                with np.errstate(invalid="ignore"):
                    sel = use & (lum == lc) & (snr > c - step / 2) & (snr <= c + step / 2)
                if sel.sum() >= 3:
                    v = e[sel]
                    p16, p50, p84 = np.percentile(v, [16, 50, 84])
                    x.append(c)
                    med.append(p50)
                    lo.append(p50 - p16)
                    hi.append(p84 - p50)
            if x:
                ax.errorbar(x, med, yerr=[lo, hi], fmt="o-", ms=3, lw=1, color=col[lc],
                            label=lc, capsize=2)  # fmt: skip
        ax.set_xlabel(r"S/N$_i$")
        ax.set_ylabel(f"σ {_LABELS[q]} [{COMPARED[q]}]")
        ax.legend(fontsize=7, frameon=False)
    return fig
