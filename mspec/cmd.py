"""The extinction-corrected Gaia colour-magnitude diagram (paper Sect. 3.4.1, Fig. 6).

Quantities (catalogue fields of the paper's Table 9):

``M_G_0``
    ``G - 5 log10(d) + 5 - A_G`` with ``d = r_med_geo`` (Bailer-Jones et al. 2021, pc) and
    ``A_G = R_G E(B-V)`` (paper Eq. 1). NaN where ``d`` is missing or not positive.
``bp_rp_0``
    ``(BP - RP) - (R_BP - R_RP) E(B-V)``.
``W1_W2_0``
    ``(W1 - W2) - (R_W1 - R_W2) E(B-V)`` with R_W1 = 0.19, R_W2 = 0.15 (Yuan, Liu & Xiang
    2013, MNRAS 430, 2188; the paper's Table 9 cites Zhang & Yuan 2023 for WISE, whose
    single-valued coefficients we have not been able to check here).
``CMD_flag``
    1 when all five Gaia quality cuts pass (paper Sect. 3.4.1, after Li et al. 2021):
    ``parallax_over_error > 5``, ``phot_g/bp/rp_mean_flux_over_error > 20``,
    ``ruwe < 1.4``; 0 otherwise. A missing (NaN) value fails its cut, so no Gaia match
    gives 0.
``CMD_pos``
    ``"dM"`` inside the quadrilateral with vertices (0.7, 5), (1.4, 5), (4, 16.5), (5, 16.5)
    in ((BP-RP)_0, M_G); ``"gM"`` above (brighter than) the line
    ``M_G = 1.8 (BP-RP)_0 - 2.2``, i.e. ``M_G_0 <= 1.8 bp_rp_0 - 2.2``; ``"other"``
    elsewhere; ``""`` (empty) where the star is not placed: ``CMD_flag`` 0 (the paper gives
    positions only for ``CMD_flag = 1``; ``require_flag=False`` places those too) or a NaN
    colour / magnitude. Region boundaries belong to the region (1e-9 mag tolerance). The
    paper gives no colour limit for the gM region and none is applied, so luminous K stars
    also land in "gM"; the two regions do not overlap.

Extinction coefficients (``coefficients=``):

``"cv18"`` (default)
    Casagrande & VandenBerg (2018, MNRAS 479, L102) Teff-dependent fits
    ``R = a0 + T4 (a1 + a2 T4) + a3 [Fe/H]``, ``T4 = Teff / 1e4``, at [Fe/H] = 0 (the
    coefficients as tabulated by BASTA's ``constants.extinction`` for CV18):
    G (1.4013, 3.1406, -1.5626, -0.0101), BP (1.7895, 4.2355, -2.7071, -0.0253),
    RP (1.8593, 0.3985, -0.1771, 0.0026). C&V give R as a function of Teff, not colour,
    so Teff comes from (BP-RP)_0 through the mean dwarf colour-Teff sequence
    (:data:`TEFF_SEQUENCE`, after Pecaut & Mamajek 2013), clamped to 3000-10000 K; and
    (BP-RP)_0 solves ``(BP-RP)_0 + (R_BP - R_RP)((BP-RP)_0) E(B-V) = BP - RP`` by bisection
    (:data:`N_ITER` halvings of a bracket 0.55 |E(B-V)| wide: < 1e-12 mag). The root is
    unique for E(B-V) < 2.7 (the left side rises with (BP-RP)_0 while
    |d(R_BP - R_RP)/d(BP-RP)_0| <= 0.37); a fixed-point iteration would not converge for
    blue stars beyond E(B-V) ~ 0.6, where that slope reaches 1.6. Below ~3500 K the
    MARCS-based fit is extrapolated; the giant colour-Teff relation differs by ~100-300 K,
    which changes R_G by < 0.02. For M stars this gives R_G ~ 2.2-2.4, smaller than the
    single numbers below. :mod:`mspec.simulate` reddens its photometry with these
    coefficients (:func:`extinction_coefficients` at the true intrinsic colour).
``"cv18_fixed"``
    The single values R_G = 2.740, R_BP = 3.374, R_RP = 2.035 (C&V 2018 for a reference
    spectrum).

Three entry points: :func:`place` for pandas / dask DataFrames (the catalogue side),
:func:`place_dataset` as a lazy pipeline stage on the spectra Dataset, and
:func:`load_gaia_table` + :func:`join_gaia` to bring a Gaia/Bailer-Jones/Bayestar/WISE
cross-match onto the Dataset.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import xarray as xr

from mspec.stage import merge_outputs, stage
from mspec.variables import annotate

__all__ = [
    "GaiaTableWarning",
    "check_radius",
    "GAIA_COLUMNS",
    "QUALITY_CUTS",
    "DM_VERTICES",
    "GM_LINE",
    "CV18",
    "CV18_FIXED",
    "R_W1",
    "R_W2",
    "TEFF_SEQUENCE",
    "N_ITER",
    "extinction_coefficients",
    "deredden",
    "quality_flag",
    "cmd_position",
    "place",
    "place_dataset",
    "load_gaia_table",
    "join_gaia",
]


class GaiaTableWarning(UserWarning):
    """Bad values in an input Gaia/WISE table (replaced by NaN) or missing columns."""


#: Numeric cross-match columns the CMD and the store know (registry names).
GAIA_COLUMNS = (
    "gaia_source_id",
    "phot_g_mean_mag",
    "phot_bp_mean_mag",
    "phot_rp_mean_mag",
    "parallax",
    "parallax_error",
    "parallax_over_error",
    "phot_g_mean_flux_over_error",
    "phot_bp_mean_flux_over_error",
    "phot_rp_mean_flux_over_error",
    "ruwe",
    "r_med_geo",
    "ebv",
    "w1",
    "w2",
    "w1_err",
    "w2_err",
)
_PHOT = ("phot_g_mean_mag", "phot_bp_mean_mag", "phot_rp_mean_mag", "r_med_geo", "ebv")
#: (column, comparison, threshold): the five Gaia cuts of the paper, Sect. 3.4.1
QUALITY_CUTS = (
    ("parallax_over_error", ">", 5.0),
    ("phot_g_mean_flux_over_error", ">", 20.0),
    ("phot_bp_mean_flux_over_error", ">", 20.0),
    ("phot_rp_mean_flux_over_error", ">", 20.0),
    ("ruwe", "<", 1.4),
)
#: dM quadrilateral, ((BP-RP)_0, M_G), counter-clockwise
DM_VERTICES = ((0.7, 5.0), (1.4, 5.0), (5.0, 16.5), (4.0, 16.5))
#: gM line M_G = slope * (BP-RP)_0 + intercept; gM where M_G_0 <= line
GM_LINE = (1.8, -2.2)
_TOL = 1e-9

#: Casagrande & VandenBerg 2018 Teff fits (a0, a1, a2, a3) for G, BP, RP
CV18 = {
    "G": (1.4013, 3.1406, -1.5626, -0.0101),
    "BP": (1.7895, 4.2355, -2.7071, -0.0253),
    "RP": (1.8593, 0.3985, -0.1771, 0.0026),
}
#: Casagrande & VandenBerg 2018 single values (the simulator's constants)
CV18_FIXED = {"G": 2.740, "BP": 3.374, "RP": 2.035}
#: WISE A_W / E(B-V) (Yuan, Liu & Xiang 2013)
R_W1, R_W2 = 0.19, 0.15
#: mean dwarf (BP-RP)_0 -> Teff (K) sequence, after Pecaut & Mamajek (2013, updated table);
#: approximate (a few 0.01 mag in colour), used only for the colour dependence of R
TEFF_SEQUENCE = (
    (-0.10, 0.00, 0.38, 0.82, 0.98, 1.43, 1.84, 2.00, 2.20, 2.45, 2.80, 3.10, 3.55, 4.00, 4.60),
    (11000.0, 9700, 7220, 5770, 5270, 4440, 3850, 3660, 3560, 3430, 3210, 3060, 2810, 2680, 2500),
)
#: bisection halvings for (BP-RP)_0 (bracket width 0.55 |E(B-V)| / 2**N_ITER)
N_ITER = 45
_COEFFS = ("cv18", "cv18_fixed")


def _check_coefficients(coefficients):
    if coefficients not in _COEFFS:
        raise ValueError(f"coefficients must be one of {_COEFFS}, got {coefficients!r}")


def _r_cv18(c, bands=("G", "BP", "RP")):
    teff = np.interp(np.where(np.isfinite(c), c, 1.84), *TEFF_SEQUENCE)
    t4 = np.clip(teff, 3000.0, 10000.0) / 1e4
    out = []
    for b in bands:
        a0, a1, a2, _a3 = CV18[b]  # [Fe/H] = 0
        out.append(a0 + t4 * (a1 + a2 * t4))
    return tuple(out)


# range of R_BP - R_RP over the clamped Teff range: brackets the (BP-RP)_0 root
_t4 = np.linspace(0.3, 1.0, 7001)
_dr = [CV18["BP"][k] - CV18["RP"][k] for k in range(3)]
_dr = _dr[0] + _t4 * (_dr[1] + _t4 * _dr[2])
_DR_LO, _DR_HI = float(_dr.min()) - 0.01, float(_dr.max()) + 0.01
del _dr, _t4


def _solve_bp_rp_0(c_obs, ebv):
    """(BP-RP)_0 with c0 + (R_BP - R_RP)(c0) E(B-V) = c_obs, by vectorised bisection."""
    # f(a) = (dR(a) - _DR_HI) ebv and f(b) = (dR(b) - _DR_LO) ebv have opposite signs
    a = c_obs - _DR_HI * ebv
    b = c_obs - _DR_LO * ebv
    with np.errstate(invalid="ignore"):
        bp, rp = _r_cv18(a, ("BP", "RP"))
        sa = np.sign(a + (bp - rp) * ebv - c_obs)
        for _ in range(N_ITER):
            m = 0.5 * (a + b)
            bp, rp = _r_cv18(m, ("BP", "RP"))
            same = np.sign(m + (bp - rp) * ebv - c_obs) == sa
            a = np.where(same, m, a)
            b = np.where(same, b, m)
    return 0.5 * (a + b)


def extinction_coefficients(bp_rp_0, coefficients: str = "cv18"):
    """A_X / E(B-V) for Gaia G, BP, RP at intrinsic colour ``bp_rp_0``.

    Parameters
    ----------
    bp_rp_0 : float or array_like
        Intrinsic colour (BP-RP)_0 (mag); ignored for ``"cv18_fixed"``.
    coefficients : {"cv18", "cv18_fixed"}
        See the module docstring.

    Returns
    -------
    tuple of numpy.ndarray
        ``(R_G, R_BP, R_RP)`` (dimensionless), broadcast to the shape of ``bp_rp_0``.
    """
    _check_coefficients(coefficients)
    c = np.asarray(bp_rp_0, dtype=np.float64)
    if coefficients == "cv18_fixed":
        return tuple(np.full(c.shape, CV18_FIXED[b]) for b in ("G", "BP", "RP"))
    return _r_cv18(c)


def deredden(g, bp, rp, dist, ebv, w1=None, w2=None, *, coefficients: str = "cv18"):
    """Absolute magnitude and intrinsic colours (paper Eq. 1), elementwise numpy.

    Parameters
    ----------
    g, bp, rp : array_like
        Gaia G, BP, RP apparent magnitudes (mag).
    dist : array_like
        Distance (pc), Bailer-Jones ``r_med_geo``; not positive or NaN -> NaN ``M_G_0``.
    ebv : array_like
        E(B-V) (mag); NaN -> every output NaN (no correction can be made).
    w1, w2 : array_like, optional
        AllWISE W1, W2 (mag); omitted -> ``W1_W2_0`` NaN.
    coefficients : {"cv18", "cv18_fixed"}
        Extinction coefficients (module docstring).

    Returns
    -------
    dict of numpy.ndarray
        ``M_G_0``, ``bp_rp_0``, ``W1_W2_0`` (mag) and ``A_G`` (mag).
    """
    _check_coefficients(coefficients)
    g, bp, rp, dist, ebv = (np.asarray(x, dtype=np.float64) for x in (g, bp, rp, dist, ebv))
    g, bp, rp, dist, ebv = np.broadcast_arrays(g, bp, rp, dist, ebv)
    c_obs = bp - rp
    if coefficients == "cv18":
        c0 = _solve_bp_rp_0(c_obs, ebv)
    else:
        c0 = c_obs - (CV18_FIXED["BP"] - CV18_FIXED["RP"]) * ebv
    r_g, _, _ = extinction_coefficients(c0, coefficients)
    a_g = r_g * ebv
    with np.errstate(invalid="ignore", divide="ignore"):
        d = np.where(dist > 0, dist, np.nan)
        m_g = g - 5.0 * np.log10(d) + 5.0 - a_g
    if w1 is None or w2 is None:
        w12 = np.full(g.shape, np.nan)
    else:
        w12 = (np.asarray(w1, np.float64) - np.asarray(w2, np.float64)) - (R_W1 - R_W2) * ebv
        w12 = np.broadcast_to(w12, g.shape).astype(np.float64)
    return {"M_G_0": m_g, "bp_rp_0": c0, "W1_W2_0": w12, "A_G": a_g}


def quality_flag(parallax_over_error, g_foe, bp_foe, rp_foe, ruwe):
    """The paper's five Gaia quality cuts (``CMD_flag``), elementwise.

    Parameters
    ----------
    parallax_over_error : array_like
        Gaia ``parallax_over_error`` (dimensionless); must be > 5.
    g_foe, bp_foe, rp_foe : array_like
        ``phot_{g,bp,rp}_mean_flux_over_error`` (dimensionless); each must be > 20.
    ruwe : array_like
        Gaia RUWE (dimensionless); must be < 1.4.

    Returns
    -------
    numpy.ndarray of int8
        1 where all cuts pass, 0 otherwise (NaN fails).
    """
    vals = [
        np.asarray(x, dtype=np.float64) for x in (parallax_over_error, g_foe, bp_foe, rp_foe, ruwe)
    ]
    ok = np.ones(np.broadcast_shapes(*(v.shape for v in vals)), bool)
    with np.errstate(invalid="ignore"):
        for v, (_, op, thr) in zip(vals, QUALITY_CUTS):
            ok &= (v > thr) if op == ">" else (v < thr)
    return ok.astype(np.int8)


def _in_dm(c, m):
    inside = np.isfinite(c) & np.isfinite(m)
    nv = len(DM_VERTICES)
    for k in range(nv):
        (x1, y1), (x2, y2) = DM_VERTICES[k], DM_VERTICES[(k + 1) % nv]
        with np.errstate(invalid="ignore"):
            inside &= (x2 - x1) * (m - y1) - (y2 - y1) * (c - x1) >= -_TOL
    return inside


def cmd_position(bp_rp_0, m_g_0, flag=None):
    """Place stars on the paper's CMD regions.

    Parameters
    ----------
    bp_rp_0 : array_like
        (BP-RP)_0 (mag).
    m_g_0 : array_like
        M_G (mag).
    flag : array_like, optional
        ``CMD_flag``; where given and 0 the star is not placed (``""``).

    Returns
    -------
    numpy.ndarray of str (``<U5``)
        ``"dM"``, ``"gM"``, ``"other"`` or ``""`` (not placed: flag 0 or NaN input).
    """
    c = np.asarray(bp_rp_0, dtype=np.float64)
    m = np.asarray(m_g_0, dtype=np.float64)
    c, m = np.broadcast_arrays(c, m)
    ok = np.isfinite(c) & np.isfinite(m)
    if flag is not None:
        ok &= np.asarray(flag) == 1
    dm = _in_dm(c, m)
    with np.errstate(invalid="ignore"):
        gm = m <= GM_LINE[0] * c + GM_LINE[1] + _TOL
    out = np.full(c.shape, "other", dtype="<U5")
    out[gm] = "gM"
    out[dm] = "dM"
    out[~ok] = ""
    return out


# --- tables ---------------------------------------------------------------------------------
def _numeric(df: pd.DataFrame, cols, *, what: str = "table") -> pd.DataFrame:
    """Coerce ``cols`` of ``df`` to float; strings become NaN with a warning."""
    for col in cols:
        if col not in df.columns:
            continue
        s = df[col]
        if pd.api.types.is_bool_dtype(s) or not pd.api.types.is_numeric_dtype(s):
            conv = pd.to_numeric(s, errors="coerce")
            bad = conv.isna() & s.notna()
            txt = s[bad].astype(str).str.strip()
            nbad = int((txt != "").sum())
            if nbad:
                warnings.warn(
                    f"{what}: {nbad} non-numeric value(s) in column {col!r} replaced by NaN",
                    GaiaTableWarning,
                    stacklevel=3,
                )
            df[col] = conv.astype(np.float64)
    return df


def _place_pandas(df: pd.DataFrame, coefficients: str, require_flag: bool) -> pd.DataFrame:
    df = df.copy()
    n = len(df)
    has_placed = "bp_rp_0" in df.columns and "M_G_0" in df.columns
    num_cols = [*GAIA_COLUMNS, "bp_rp_0", "M_G_0", "W1_W2_0", "CMD_flag"]
    df = _numeric(df, [c for c in num_cols if c != "gaia_source_id"], what="place")
    nan = np.full(n, np.nan)

    def col(name):
        return df[name].to_numpy(np.float64) if name in df.columns else nan

    if has_placed:
        c0, mg = col("bp_rp_0"), col("M_G_0")
        if "W1_W2_0" in df.columns:
            w12 = col("W1_W2_0")
        else:
            w12 = deredden(nan, nan, nan, nan, col("ebv"), col("w1"), col("w2"))["W1_W2_0"]
    else:
        missing = [c for c in _PHOT if c not in df.columns]
        if missing:
            raise ValueError(
                f"table: columns {missing} are missing (needed for M_G_0 and bp_rp_0, or "
                "give 'bp_rp_0' and 'M_G_0' directly)"
            )
        r = deredden(
            col("phot_g_mean_mag"),
            col("phot_bp_mean_mag"),
            col("phot_rp_mean_mag"),
            col("r_med_geo"),
            col("ebv"),
            col("w1") if "w1" in df.columns else None,
            col("w2") if "w2" in df.columns else None,
            coefficients=coefficients,
        )
        c0, mg, w12 = r["bp_rp_0"], r["M_G_0"], r["W1_W2_0"]
    qcols = [q for q, _, _ in QUALITY_CUTS]
    missing_q = [q for q in qcols if q not in df.columns]
    if not missing_q:
        flag = quality_flag(*(col(q) for q in qcols))
    elif "CMD_flag" in df.columns:
        flag = (col("CMD_flag") == 1).astype(np.int8)
    else:
        if n:
            warnings.warn(
                f"place: quality columns {missing_q} missing: CMD_flag = 0 for every row",
                GaiaTableWarning,
                stacklevel=3,
            )
        flag = np.zeros(n, np.int8)
    pos = cmd_position(c0, mg, flag if require_flag else None)
    df["M_G_0"] = mg
    df["bp_rp_0"] = c0
    df["W1_W2_0"] = w12
    df["CMD_flag"] = flag.astype(np.int8)
    df["CMD_pos"] = pd.Series(pos, index=df.index, dtype=object)
    return df


def place(table, *, coefficients: str = "cv18", require_flag: bool = True):
    """Add the CMD columns to a pandas or dask DataFrame.

    Parameters
    ----------
    table : pandas.DataFrame or dask.dataframe.DataFrame
        Gaia cross-match with the columns of :mod:`mspec.simulate` (``phot_g_mean_mag``,
        ``phot_bp_mean_mag``, ``phot_rp_mean_mag`` in mag, ``r_med_geo`` in pc, ``ebv`` in
        mag, the five quality columns, optionally ``w1``/``w2`` in mag). A table that
        already holds ``bp_rp_0`` and ``M_G_0`` (mag) is placed with those directly. Strings
        in numeric columns become NaN with a :class:`GaiaTableWarning`.
    coefficients : {"cv18", "cv18_fixed"}
        Extinction coefficients (module docstring).
    require_flag : bool
        Only place rows with ``CMD_flag`` 1, as the paper does (default); others get ``""``.

    Returns
    -------
    pandas.DataFrame or dask.dataframe.DataFrame
        A copy (lazy for dask) with ``M_G_0``, ``bp_rp_0``, ``W1_W2_0`` (float64, mag),
        ``CMD_flag`` (int8) and ``CMD_pos`` (str) added or replaced.

    Raises
    ------
    TypeError
        ``table`` is not a DataFrame.
    ValueError
        Photometry columns missing (and no ``bp_rp_0``/``M_G_0``), bad ``coefficients``.
    """
    _check_coefficients(coefficients)
    if not isinstance(require_flag, bool):
        raise TypeError(f"require_flag must be True or False, got {require_flag!r}")
    if isinstance(table, pd.DataFrame):
        return _place_pandas(table, coefficients, require_flag)
    try:
        import dask.dataframe as dd
    except ImportError:  # pragma: no cover
        dd = None
    if dd is not None and isinstance(table, dd.DataFrame):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", GaiaTableWarning)
            meta = _place_pandas(table._meta, coefficients, require_flag)
        return table.map_partitions(_place_pandas, coefficients, require_flag, meta=meta)
    raise TypeError(f"table must be a pandas or dask DataFrame, got {type(table).__name__}")


# --- the Dataset stage ---------------------------------------------------------------------
_STAGE_INPUTS = [*_PHOT, *(q for q, _, _ in QUALITY_CUTS)]


def _place_arrays(
    g, bp, rp, dist, ebv, w1, w2, poe, gfoe, bpfoe, rpfoe, ruwe, *, coefficients, require_flag
):
    r = deredden(g, bp, rp, dist, ebv, w1, w2, coefficients=coefficients)
    flag = quality_flag(poe, gfoe, bpfoe, rpfoe, ruwe)
    pos = cmd_position(r["bp_rp_0"], r["M_G_0"], flag if require_flag else None)
    return r["M_G_0"], r["bp_rp_0"], r["W1_W2_0"], flag, pos


@stage(
    "cmd",
    module="SCM",
    inputs=_STAGE_INPUTS,
    outputs=["M_G_0", "bp_rp_0", "W1_W2_0", "CMD_flag", "CMD_pos"],
    version="2",
    description="extinction-corrected Gaia CMD: M_G_0, bp_rp_0, W1_W2_0, CMD_flag, CMD_pos",
)
def place_dataset(ds, *, coefficients: str = "cv18", require_flag: bool = True):
    """The CMD as a lazy stage on the spectra Dataset (elementwise along ``spectra``).

    Parameters
    ----------
    ds : xarray.Dataset
        Holds the Gaia cross-match variables on ``spectra`` (``phot_g_mean_mag``,
        ``phot_bp_mean_mag``, ``phot_rp_mean_mag`` mag, ``r_med_geo`` pc, ``ebv`` mag and
        the five quality columns; ``w1``/``w2`` mag optional), e.g. from
        :func:`join_gaia` or :func:`mspec.simulate_survey`.
    coefficients : {"cv18", "cv18_fixed"}
        Extinction coefficients (module docstring).
    require_flag : bool
        Only place spectra with ``CMD_flag`` 1 (default, as the paper).
    merge : bool
        Merge the outputs into ``ds`` (default) or return them alone.

    Returns
    -------
    xarray.Dataset
        ``M_G_0``, ``bp_rp_0``, ``W1_W2_0`` (float64, mag), ``CMD_flag`` (int8),
        ``CMD_pos`` (``<U5``), lazy where ``ds`` is dask-backed.
    """
    _check_coefficients(coefficients)
    if not isinstance(require_flag, bool):
        raise TypeError(f"require_flag must be True or False, got {require_flag!r}")
    ref = ds["phot_g_mean_mag"]
    wise = []
    for name in ("w1", "w2"):
        if name in ds.variables:
            wise.append(ds[name])
        else:
            wise.append(xr.full_like(ref, np.nan, dtype=np.float64))
    args = [ds[c] for c in _PHOT] + wise + [ds[q] for q, _, _ in QUALITY_CUTS]
    outs = xr.apply_ufunc(
        _place_arrays,
        *args,
        output_core_dims=[[]] * 5,
        dask="parallelized",
        output_dtypes=[np.float64, np.float64, np.float64, np.int8, np.dtype("<U5")],
        kwargs={"coefficients": coefficients, "require_flag": require_flag},
    )
    names = ["M_G_0", "bp_rp_0", "W1_W2_0", "CMD_flag", "CMD_pos"]
    out = xr.Dataset({n: o for n, o in zip(names, outs)})
    out = annotate(out)
    out.attrs["cmd_coefficients"] = coefficients
    out.attrs["cmd_require_flag"] = int(require_flag)
    return out


# --- Gaia / WISE input ----------------------------------------------------------------------
def load_gaia_table(path) -> pd.DataFrame:
    """Read a Gaia/Bailer-Jones/Bayestar/WISE cross-match table into pandas.

    Parameters
    ----------
    path : str or PathLike
        ``.parquet``/``.pq``, ``.csv``/``.csv.gz`` or ``.fits``/``.fit``/``.fits.gz``.

    Returns
    -------
    pandas.DataFrame
        Column names lower-cased except the registry's mixed-case CMD names
        (``M_G_0``, ``W1_W2_0``, ``CMD_flag``, ``CMD_pos``); ``source_id`` is renamed
        ``gaia_source_id`` when the latter is absent; byte strings decoded; non-numeric
        values in known numeric columns replaced by NaN with a :class:`GaiaTableWarning`;
        multidimensional FITS columns dropped with a warning.

    Raises
    ------
    FileNotFoundError
        ``path`` does not exist.
    ValueError
        Unknown file type.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or PathLike, got {type(path).__name__}")
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"path: {str(p)!r} does not exist")
    name = p.name.lower()
    if name.endswith((".parquet", ".pq")):
        df = pd.read_parquet(p)
    elif name.endswith((".csv", ".csv.gz")):
        df = pd.read_csv(p, low_memory=False)
    elif name.endswith((".fits", ".fit", ".fits.gz", ".fts")):
        from astropy.table import Table

        t = Table.read(p, format="fits")
        multi = [c for c in t.colnames if len(t[c].shape) > 1]
        if multi:
            warnings.warn(
                f"load_gaia_table: dropped multidimensional columns {multi}",
                GaiaTableWarning,
                stacklevel=2,
            )
            t.remove_columns(multi)
        df = t.to_pandas()
        for c in df.columns:
            if df[c].dtype == object and len(df) and isinstance(df[c].iloc[0], bytes):
                df[c] = df[c].str.decode("utf-8", errors="replace").str.strip()
    else:
        raise ValueError(f"path: unknown table type {p.name!r} (Parquet, CSV or FITS)")
    return _normalise_columns(df, what="load_gaia_table")


_KEEP_CASE = {"m_g_0": "M_G_0", "w1_w2_0": "W1_W2_0", "cmd_flag": "CMD_flag", "cmd_pos": "CMD_pos"}


def _normalise_columns(df: pd.DataFrame, *, what: str) -> pd.DataFrame:
    df = df.copy()
    df.columns = [_KEEP_CASE.get(str(c).lower(), str(c).lower()) for c in df.columns]
    if "source_id" in df.columns and "gaia_source_id" not in df.columns:
        df = df.rename(columns={"source_id": "gaia_source_id"})
    numeric = [*_JOIN_FLOAT, "ra", "dec"]
    df = _numeric(df, numeric, what=what)
    for c in ("gaia_source_id", "obsid"):
        if c in df.columns:
            df[c] = _ids(df[c], c, what=what)
    return df


def _ids(s: pd.Series, name: str, *, what: str) -> pd.Series:
    """Integer ids (nullable Int64) without a float round trip (Gaia ids exceed 2**53)."""
    if pd.api.types.is_integer_dtype(s):
        return s.astype("Int64")
    if pd.api.types.is_float_dtype(s):
        ok = s.notna() & np.isfinite(s) & (s == np.round(s))
        out = pd.Series(pd.NA, index=s.index, dtype="Int64")
        out[ok] = s[ok].astype(np.int64)
        return out
    txt = s.astype(str).str.strip()
    good = txt.str.fullmatch(r"[+-]?\d+") & s.notna()
    nbad = int((~good & s.notna() & (txt != "") & (txt.str.lower() != "nan")).sum())
    if nbad:
        warnings.warn(
            f"{what}: {nbad} non-integer value(s) in column {name!r} replaced by missing",
            GaiaTableWarning,
            stacklevel=4,
        )
    out = pd.Series(pd.NA, index=s.index, dtype="Int64")
    out[good] = [int(v) for v in txt[good]]
    return out


_JOIN_FLOAT = [c for c in GAIA_COLUMNS if c != "gaia_source_id"] + ["bp_rp_0", "M_G_0", "W1_W2_0"]


def _match_block(ra, dec, *, cat_ra, cat_dec, cat_rows, radius):
    from astropy import units as u
    from astropy.coordinates import SkyCoord

    ra = np.asarray(ra, np.float64)
    dec = np.asarray(dec, np.float64)
    idx = np.full(ra.shape, -1, np.int64)
    sep = np.full(ra.shape, np.nan)
    ok = np.isfinite(ra) & np.isfinite(dec) & (np.abs(dec) <= 90)
    if not ok.any() or cat_ra.size == 0:
        return idx, sep
    cat = SkyCoord(cat_ra * u.deg, cat_dec * u.deg)
    obj = SkyCoord(ra[ok] * u.deg, dec[ok] * u.deg)
    if cat_ra.size == 1:  # match_to_catalog_sky needs >= 1 entry; handle scalars uniformly
        s = obj.separation(cat[0]).arcsec
        j = np.zeros(s.shape, np.int64)
    else:
        j, s2d, _ = obj.match_to_catalog_sky(cat)
        s = s2d.arcsec
    hit = s <= radius
    sub_idx = np.where(hit, cat_rows[j], -1)
    sub_sep = np.where(hit, s, np.nan)
    idx[ok] = sub_idx
    sep[ok] = sub_sep
    return idx, sep


def check_radius(radius_arcsec) -> float:
    """``radius_arcsec`` as a positive finite float (arcsec), else ValueError naming it."""
    try:
        radius = float(radius_arcsec)
    except (TypeError, ValueError):
        raise ValueError(
            f"radius_arcsec must be a positive number, got {radius_arcsec!r}"
        ) from None
    if not (np.isfinite(radius) and radius > 0):
        raise ValueError(f"radius_arcsec must be a positive number, got {radius_arcsec!r}")
    return radius


def join_gaia(ds, table, *, on: str = "obsid", radius_arcsec: float = 3.0, merge: bool = True):
    """Bring Gaia/WISE cross-match columns onto the spectra Dataset.

    Parameters
    ----------
    ds : xarray.Dataset
        Spectra with the ``obsid`` coordinate (``on="obsid"``) or ``ra``/``dec`` (deg,
        ``on="position"``).
    table : pandas.DataFrame, dask.dataframe.DataFrame, str or PathLike
        The cross-match (a path is read with :func:`load_gaia_table`; a dask DataFrame is
        computed: the table must fit in memory). Known numeric columns (:data:`GAIA_COLUMNS`
        plus ``bp_rp_0``, ``M_G_0``, ``W1_W2_0``) present in the table are joined; strings in
        them become NaN with a :class:`GaiaTableWarning`.
    on : {"obsid", "position"}
        Join on the LAMOST ``obsid`` (first row wins for a duplicated obsid, with a warning)
        or on the nearest table source within ``radius_arcsec`` (``ra``/``dec`` deg, ICRS,
        astropy ``SkyCoord.match_to_catalog_sky``).
    radius_arcsec : float
        Positional match radius (arcsec, > 0; default 3, as the paper).
    merge : bool
        Return ``ds`` with the columns added (replacing, with a warning, existing ones) or
        only the joined variables.

    Returns
    -------
    xarray.Dataset
        The joined columns along ``spectra`` (float64, NaN where no match;
        ``gaia_source_id`` int64, -1 where no match), plus ``gaia_match_sep`` (arcsec) for
        ``on="position"``. When ``ds`` is dask-backed the positional match runs per
        ``spectra`` chunk, lazily (the table travels with the graph); for ``on="obsid"``
        the row index is built in memory from the ``obsid`` coordinate (which is in memory
        anyway) and the columns are gathered per chunk.

    Raises
    ------
    ValueError
        Bad ``on``/``radius_arcsec``, or the columns the join needs are missing.
    """
    if not isinstance(ds, xr.Dataset):
        raise TypeError(f"ds must be an xarray.Dataset, got {type(ds).__name__}")
    if on not in ("obsid", "position"):
        raise ValueError(f"on must be 'obsid' or 'position', got {on!r}")
    radius = check_radius(radius_arcsec)
    if isinstance(table, (str, os.PathLike)):
        tab = load_gaia_table(table)
    elif isinstance(table, pd.DataFrame):
        tab = _normalise_columns(table, what="join_gaia")
    else:
        try:
            import dask.dataframe as dd
        except ImportError:  # pragma: no cover
            dd = None
        if dd is not None and isinstance(table, dd.DataFrame):
            tab = _normalise_columns(table.compute(), what="join_gaia")
        else:
            raise TypeError(f"table must be a DataFrame or a path, got {type(table).__name__}")
    tab = tab.reset_index(drop=True)
    cols = [c for c in _JOIN_FLOAT if c in tab.columns]
    has_sid = "gaia_source_id" in tab.columns
    if not cols and not has_sid:
        raise ValueError(f"table: none of the known columns {list(GAIA_COLUMNS)} is present")
    ref = ds["obsid"] if "obsid" in ds.coords else None
    if on == "obsid":
        if "obsid" not in tab.columns:
            raise ValueError("table: on='obsid' needs an 'obsid' column")
        if ref is None:
            raise ValueError("ds: on='obsid' needs the 'obsid' coordinate")
        keyed = tab.loc[tab["obsid"].notna()].copy()
        keyed["obsid"] = keyed["obsid"].astype(np.int64)
        dup = keyed["obsid"].duplicated(keep="first")
        if dup.any():
            warnings.warn(
                f"join_gaia: {int(dup.sum())} duplicated obsid row(s) in the table; first kept",
                GaiaTableWarning,
                stacklevel=2,
            )
            keyed = keyed.loc[~dup]
        pos = pd.Index(keyed["obsid"].to_numpy()).get_indexer(np.asarray(ref.values, np.int64))
        rows = np.where(pos >= 0, keyed.index.to_numpy()[np.maximum(pos, 0)], -1)
        idx = xr.DataArray(rows.astype(np.int64), dims="spectra")
        chunks = ds["ra"].chunks if "ra" in ds.variables else None
        if chunks is None:
            for v in ds.data_vars.values():
                if v.dims[:1] == ("spectra",) and v.chunks is not None:
                    chunks = v.chunks[:1]
                    break
        if chunks is not None:
            idx = idx.chunk({"spectra": chunks[0]})
        sep = None
    else:
        for c in ("ra", "dec"):
            if c not in tab.columns:
                raise ValueError(f"table: on='position' needs a {c!r} column (deg)")
            if c not in ds.variables:
                raise ValueError(f"ds: on='position' needs the {c!r} variable (deg)")
        okc = tab["ra"].notna() & tab["dec"].notna() & (tab["dec"].abs() <= 90)
        kw = dict(
            cat_ra=tab.loc[okc, "ra"].to_numpy(np.float64),
            cat_dec=tab.loc[okc, "dec"].to_numpy(np.float64),
            cat_rows=tab.index[okc].to_numpy(np.int64),
            radius=radius,
        )
        idx, sep = xr.apply_ufunc(
            _match_block,
            ds["ra"],
            ds["dec"],
            output_core_dims=[[], []],
            dask="parallelized",
            output_dtypes=[np.int64, np.float64],
            kwargs=kw,
        )
    out = {}

    def gather(ix, *, values):
        return values[ix]

    for c in cols:
        vals = np.append(tab[c].to_numpy(np.float64), np.nan)  # index -1 -> NaN
        out[c] = xr.apply_ufunc(
            gather, idx, dask="parallelized", output_dtypes=[np.float64], kwargs={"values": vals}
        )
    if has_sid:
        sidv = np.append(tab["gaia_source_id"].fillna(-1).to_numpy(np.int64), -1)
        out["gaia_source_id"] = xr.apply_ufunc(
            gather, idx, dask="parallelized", output_dtypes=[np.int64], kwargs={"values": sidv}
        )
    if sep is not None:
        out["gaia_match_sep"] = sep
    res = xr.Dataset(out)
    if ref is not None:
        res = res.assign_coords(obsid=ref)
    res = annotate(res)
    res.attrs["gaia_join"] = on if on == "obsid" else f"position, {radius:g} arcsec"
    if not merge:
        return res
    return merge_outputs(ds, res, merge=True, stage_name="join_gaia")
