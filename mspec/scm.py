"""SCM, the spectral classification module: M or not M (paper Sect. 3.4.1), as a lazy stage.

The paper (Li et al. 2025) flags *non-M candidates* among the spectra of LAMOST's M catalogue
(M_Catalog_V0): CNN-SPT predicts a type other than K or M, CNN-WDM predicts a white dwarf,
or the star lies outside the dM and gM regions of the Gaia CMD. It then looked at the
13,436 candidates by eye. :func:`select_m_stars` flags exactly the same candidates and
replaces the eye by documented rules that combine the evidence into a probability; what the
rules cannot settle goes to the inspection queue (``scm_inspect``), and a human's verdict
passed back as ``decisions`` overrides the rules.

Evidence, as natural-log odds for "M" (summed; the sign decides; :func:`m_log_odds`):

* CNN-SPT: ``w logit(p_M)``, probabilities clipped to [:data:`P_FLOOR`, 1 - P_FLOOR] (a CNN
  with 99 % validation accuracy is not trusted beyond 1e-3) and weighted by
  ``w = clip(S/N_max / SNR_FULL, W_MIN, 1)`` (S/N_max = max of snr_u..snr_z, the paper's
  quality measure): a CNN's answer on a spectrum at S/N 3 counts less;
* CNN-WDM: ``min(0, w logit(p_M))``, only when CNN-SPT's best class is one a white dwarf gets
  (OB, A, F, QSO) or K/M: it knows only WD and M, so it can speak against M (a white dwarf),
  never for M against K or G;
* the colour (BP-RP)_0 where it is reliable (BP and RP flux over error > 20):
  ``clip((c0 - COLOUR_MID) / COLOUR_SCALE, -8, 3)`` with COLOUR_MID = 1.76 mag at the K9 / M0
  boundary (Pecaut & Mamajek 2013) less the colour error of a 0.02 mag E(B-V) error — far
  too blue is decisive, red only says "not hotter than M"; the CMD "other" region (outside
  dM and gM) :data:`W_OTHER` = -2;
* LAMOST's own type: +:data:`W_LAMOST` = 3 on its M list (the paper found 0.45 % non-M
  there), -3 for another definite type, and a third / half of that at the K7 / M0
  boundary where LAMOST's types scatter (a K subclass -1, an M0 / dM0 +1.5); 0 where
  the LAMOST pipeline failed.

Rules (``scm_reason``; the table with the paper's counterpart is in ``docs/classification.md``):

``direct``
    not a candidate: kept as M, as the paper (unless the summed evidence says otherwise:
    then ``k_not_m`` or ``cmd_non_m``, beyond the paper).
``m_cmd_only``
    candidate only because of the CMD ("other" region) while the evidence says M: kept.
``m_cnn_overruled``
    a CNN flagged it but the summed evidence says M (the paper's red-end anomalies): kept.
``wd``, ``spt_non_m``
    non-M: a white dwarf (CNN-WDM), or CNN-SPT's type.
``cmd_non_m``
    non-M because of the CMD (region, colour) or LAMOST's other type, although no CNN
    flagged it or CNN-SPT said M.
``k_not_m``
    CNN-SPT says K and the summed evidence agrees (late-K stars LAMOST typed M0, the
    contaminants the paper's footnote 13 worries about).
``s_star``, ``c_star``
    ZrO (S-type) or C2 (carbon star) bandhead index below its threshold at enough S/N,
    outside the CMD dM region: the non-M stars the paper found by eye among its gM
    candidates (:data:`ZRO_MAX` with snr_r >= 20, :data:`C2_MAX` with snr_g >= 15).
``no_data``
    no usable CNN output (no usable flux): ``UNKNOWN``, not M.
``human``
    a decision from the inspection queue (``decisions``).

A decision whose probability is below :data:`INSPECT_BELOW`, or where a confident CNN and
the CMD colour contradict each other, is still made, and also queued (``scm_inspect`` names
why).

Which spectra enter (``entry``): ``"lamost"`` (the paper): LAMOST's M list, subclass ``dM*``,
``gM*``, ``sdM*`` or ``M*``; ``"all"``: every spectrum. Beyond the paper, with ``"all"`` a
spectrum LAMOST called something else carries that type as evidence against M (-3; a K type
-1), so it becomes M only when the CNNs and the colour outweigh it; such stars are ``new_m``
(:func:`new_m_table` lists them).
"""

from __future__ import annotations

import re
import warnings

import numpy as np
import pandas as pd
import xarray as xr

from mspec.stage import stage
from mspec.variables import annotate

__all__ = [
    "ENTRIES",
    "SCM_REASONS",
    "SCM_CLASSES",
    "P_FLOOR",
    "INSPECT_BELOW",
    "COLOUR_MID",
    "COLOUR_SCALE",
    "COLOUR_CLIP",
    "W_OTHER",
    "W_LAMOST",
    "K_LABEL",
    "M0_LABEL",
    "SNR_FULL",
    "W_MIN",
    "ZRO_MAX",
    "C2_MAX",
    "ZRO_MIN_SNR",
    "C2_MIN_SNR",
    "lamost_is_m",
    "m_log_odds",
    "scm_decide",
    "select_m_stars",
    "new_m_table",
    "decisions_array",
    "resolve_cmd",
]

#: accepted values of ``entry``
ENTRIES = ("lamost", "all")
#: scm_reason code -> meaning
SCM_REASONS = {
    "direct": "not a non-M candidate (CNN-SPT K/M, CNN-WDM M, CMD dM/gM or not placed): M",
    "m_cmd_only": "candidate only by the CMD 'other' region; the CNNs and colour say M: M",
    "m_cnn_overruled": "flagged by a CNN, but the summed evidence (other CNN, CMD) says M: M",
    "wd": "CNN-WDM white dwarf, supported by the summed evidence: not M",
    "spt_non_m": "CNN-SPT type other than K/M, supported by the summed evidence: not M",
    "cmd_non_m": "the CMD (region/colour) outweighs CNNs that said M or K: not M",
    "k_not_m": "entry='all': CNN-SPT says K for a spectrum LAMOST did not call M: not M",
    "s_star": "ZrO 6474 bandhead index below threshold: S-type star, not M",
    "c_star": "C2 5165 bandhead index below threshold: carbon star, not M",
    "no_data": "no usable CNN output (no usable flux): UNKNOWN, not M",
    "human": "decision from the inspection queue",
}
#: classes scm_class takes (besides "" for spectra that did not enter)
SCM_CLASSES = ("M", "OB", "A", "F", "G", "K", "GALAXY", "QSO", "WD", "S", "C", "BINARY", "UNKNOWN")
#: CNN probabilities are clipped to [P_FLOOR, 1 - P_FLOOR] before the logit
P_FLOOR = 1e-3
#: decisions with a probability below this go to the queue as well
INSPECT_BELOW = 0.9
#: (BP-RP)_0 (mag) where the colour term is 0: at the K9 / M0 boundary (K9 ~1.77, M0 ~1.84,
#: Pecaut & Mamajek 2013) less ~0.02 mag, the colour error a 0.02 mag E(B-V) error gives, so
#: reddening noise does not push boundary M0 dwarfs to K; M giants are redder still
COLOUR_MID = 1.76
#: colour term slope: (c0 - COLOUR_MID) / COLOUR_SCALE, clipped to COLOUR_CLIP
COLOUR_SCALE = 0.04
#: limits of the colour term: a colour far bluer than any M star (a K3 dwarf at 1.28) is
#: decisive (-8), a red one only says "not hotter than M" (+3)
COLOUR_CLIP = (-8.0, 3.0)
#: log odds of the CMD "other" region (outside the dM and gM regions)
W_OTHER = -2.0
#: log odds of LAMOST's own type: +W on its M list, -W for another definite type
W_LAMOST = 3.0
#: LAMOST label weights (in units of W_LAMOST) at the K7 / M0 boundary, where LAMOST's types
#: scatter most: a K subclass counts against M a third as much, an M0 / dM0 for M half as much
K_LABEL = -1.0 / 3.0
M0_LABEL = 0.5
#: CNN log odds are scaled by clip(S/N_max / SNR_FULL, W_MIN, 1)
SNR_FULL = 20.0
W_MIN = 0.25
#: idx_zro below this (with snr_r >= ZRO_MIN_SNR): S-type star
ZRO_MAX = 0.85
#: idx_c2 below this (with snr_g >= C2_MIN_SNR): carbon star
C2_MAX = 0.80
#: least LAMOST S/N in r (ZrO 6474) / g (C2 5165) for the S / C rules
ZRO_MIN_SNR = 20.0
C2_MIN_SNR = 15.0
#: S / C probability: sigmoid((threshold - index) / BAND_SCALE)
BAND_SCALE = 0.045

_LAMOST_M = re.compile(r"^\s*(dM|gM|sdM|M)", re.IGNORECASE)
_NON_M_SPT = ("OB", "A", "F", "G", "GALAXY", "QSO")
_WD_LIKE = ("OB", "A", "F", "QSO", "M", "K")  # CNN-SPT answers for which CNN-WDM counts
_REASON_LEN = 16
_CLASS_LEN = 8
_INSPECT_LEN = 24


def lamost_is_m(subclass):
    """Whether LAMOST subclasses belong to LAMOST's M list (M_Catalog_V0).

    Parameters
    ----------
    subclass : array_like of str
        LAMOST ``subclass`` values (``dM2``, ``gM0``, ``sdM1``, ``M3``, ``K7`` ...).

    Returns
    -------
    numpy.ndarray of bool
        True for subclasses starting with ``dM``, ``gM``, ``sdM`` or ``M`` (case-insensitive,
        as LAMOST's M-star catalogue).
    """
    s = np.asarray(subclass).astype(str)
    return np.array([bool(_LAMOST_M.match(v)) for v in s.ravel()], bool).reshape(s.shape)


def _logit(p):
    p = np.clip(np.asarray(p, np.float64), P_FLOOR, 1.0 - P_FLOOR)
    return np.log(p / (1.0 - p))


def m_log_odds(p_spt_m, p_wdm_m, spt_best, cmd_pos, bp_rp_0, colour_ok, lamost_label, snr_max):
    """Summed natural-log odds that a spectrum is an M star, and its parts.

    Parameters
    ----------
    p_spt_m : array_like
        CNN-SPT probability of class M (NaN: no CNN-SPT evidence).
    p_wdm_m : array_like
        CNN-WDM probability of class M (NaN: none).
    spt_best : array_like of str
        CNN-SPT's most probable class (decides whether CNN-WDM counts).
    cmd_pos : array_like of str
        ``CMD_pos`` (``"dM"``, ``"gM"``, ``"other"``, ``""`` = not placed).
    bp_rp_0 : array_like
        Intrinsic colour (BP-RP)_0 (mag).
    colour_ok : array_like of bool
        Whether the colour is reliable (BP and RP flux over error > 20).
    lamost_label : array_like of float
        +1 on LAMOST's M list (:data:`M0_LABEL` for M0 / dM0), :data:`K_LABEL` a LAMOST K
        type, -1 another definite LAMOST type, 0 none (pipeline failure).
    snr_max : array_like
        Largest LAMOST S/N over the u..z bands (NaN: unknown, full weight).

    Returns
    -------
    dict of numpy.ndarray
        ``total`` (> 0: M) and the parts ``spt``, ``wdm``, ``colour``, ``region``,
        ``lamost`` (module docstring for the formulas).
    """
    spt_best = np.asarray(spt_best).astype(str)
    pos = np.asarray(cmd_pos).astype(str)
    c0 = np.asarray(bp_rp_0, np.float64)
    ps = np.asarray(p_spt_m, np.float64)
    pw = np.asarray(p_wdm_m, np.float64)
    snr = np.asarray(snr_max, np.float64)
    w = np.where(np.isfinite(snr), np.clip(snr / SNR_FULL, W_MIN, 1.0), 1.0)
    l_spt = np.where(np.isfinite(ps), w * _logit(np.nan_to_num(ps, nan=0.5)), 0.0)
    # CNN-WDM knows WD and M only: it can speak against M (a white dwarf), never for M
    # against K or G, and only where CNN-SPT's answer is one a white dwarf can get
    wd_counts = np.isin(spt_best, _WD_LIKE) | ~np.isfinite(ps)
    l_wdm = np.where(
        np.isfinite(pw) & wd_counts, np.minimum(0.0, w * _logit(np.nan_to_num(pw, nan=0.5))), 0.0
    )
    ok = np.asarray(colour_ok, bool) & np.isfinite(c0)
    l_col = np.where(
        ok,
        np.clip((np.nan_to_num(c0) - COLOUR_MID) / COLOUR_SCALE, COLOUR_CLIP[0], COLOUR_CLIP[1]),
        0.0,
    )
    l_reg = np.where(pos == "other", W_OTHER, 0.0)
    l_lam = W_LAMOST * np.asarray(lamost_label, np.float64)
    total = l_spt + l_wdm + l_col + l_reg + l_lam
    return {
        "total": total,
        "spt": l_spt,
        "wdm": l_wdm,
        "colour": l_col,
        "region": l_reg,
        "lamost": l_lam,
    }


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-np.asarray(x, np.float64)))


def scm_decide(
    spt_prob,
    spt_classes,
    wdm_prob,
    wdm_classes,
    lamost_subclass,
    cmd_pos,
    bp_rp_0,
    colour_ok=None,
    snr_max=None,
    idx_zro=None,
    idx_c2=None,
    snr_r=None,
    snr_g=None,
    decision=None,
    lamost_class=None,
    *,
    entry: str = "lamost",
):
    """The SCM rules on numpy arrays (one block of spectra).

    Parameters
    ----------
    spt_prob : array_like, shape ``(n, n_spt)``
        CNN-SPT probabilities (NaN rows: no usable data).
    spt_classes : sequence of str
        CNN-SPT class names (must contain ``"M"`` and ``"K"``).
    wdm_prob : array_like, shape ``(n, 2)``
        CNN-WDM probabilities.
    wdm_classes : sequence of str
        CNN-WDM class names (``"WD"``, ``"M"``).
    lamost_subclass : array_like of str, shape ``(n,)``
        LAMOST subclass (:func:`lamost_is_m` decides the M list).
    cmd_pos : array_like of str, shape ``(n,)``
        ``CMD_pos`` (``""`` where not placed).
    bp_rp_0 : array_like, shape ``(n,)``
        (BP-RP)_0 (mag).
    colour_ok : array_like of bool, optional
        Reliable colour (default: where ``cmd_pos`` is not ``""``).
    snr_max : array_like, optional
        Largest LAMOST S/N over u..z (default: full CNN weight).
    idx_zro, idx_c2 : array_like, optional
        Bandhead indices (:mod:`mspec.indices`); NaN or omitted: the S / C rules do not apply.
    snr_r, snr_g : array_like, optional
        LAMOST S/N in r and g (for the S / C rules; omitted: rule not applied).
    decision : array_like of str, optional
        Inspection decisions (a class of :data:`SCM_CLASSES`; ``""`` = none).
    lamost_class : array_like of str, optional
        LAMOST class; ``"Unknown"`` (pipeline failure) gives no LAMOST evidence.
    entry : {"lamost", "all"}
        Which spectra enter.

    Returns
    -------
    dict of numpy.ndarray
        ``entered``, ``is_m``, ``new_m`` (bool), ``scm_class``, ``scm_reason``,
        ``scm_inspect`` (str) and ``scm_prob`` (float64).
    """
    sp = np.asarray(spt_prob, np.float64)
    wp = np.asarray(wdm_prob, np.float64)
    n = sp.shape[0]
    scl = [str(c) for c in spt_classes]
    wcl = [str(c) for c in wdm_classes]
    sub = np.asarray(lamost_subclass).astype(str).reshape(n)
    lam_m = lamost_is_m(sub)
    pos = np.asarray(cmd_pos).astype(str).reshape(n)
    c0 = np.asarray(bp_rp_0, np.float64).reshape(n)

    def opt(a):
        return np.full(n, np.nan) if a is None else np.asarray(a, np.float64).reshape(n)

    zro, c2, snr_r, snr_g, snr_max = (opt(a) for a in (idx_zro, idx_c2, snr_r, snr_g, snr_max))
    col_ok = (pos != "") if colour_ok is None else np.asarray(colour_ok, bool).reshape(n)
    dec = np.full(n, "") if decision is None else np.asarray(decision).astype(str).reshape(n)
    lcls = np.full(n, "STAR") if lamost_class is None else np.asarray(lamost_class).astype(str)
    lcls = lcls.reshape(n)
    failed = (np.char.lower(lcls) == "unknown") | np.isin(sub, ["", "Non", "non"]) & ~np.isin(
        np.char.upper(lcls), ["GALAXY", "QSO"]
    )
    up = np.char.upper(np.char.strip(sub))
    k_type = np.char.startswith(up, "K")
    m0_type = np.isin(up, ["M0", "DM0"])
    lamost_label = np.where(lam_m, np.where(m0_type, M0_LABEL, 1.0), -1.0)
    lamost_label = np.where(~lam_m & k_type, K_LABEL, lamost_label)
    lamost_label = np.where(~lam_m & failed, 0.0, lamost_label)

    entered = np.ones(n, bool) if entry == "all" else lam_m.copy()
    has_spt = np.all(np.isfinite(sp), axis=1) if sp.size else np.zeros(n, bool)
    has_wdm = np.all(np.isfinite(wp), axis=1) if wp.size else np.zeros(n, bool)
    sp0 = np.nan_to_num(sp, nan=-1.0)
    spt_best = np.where(has_spt, np.asarray(scl)[np.argmax(sp0, 1)] if n else "", "")
    wdm_best = np.where(
        has_wdm, np.asarray(wcl)[np.argmax(np.nan_to_num(wp, nan=-1.0), 1)] if n else "", ""
    )
    p_spt_m = np.where(has_spt, sp[:, scl.index("M")], np.nan)
    p_wdm_m = np.where(has_wdm, wp[:, wcl.index("M")], np.nan)
    p_wd = np.where(has_wdm, wp[:, wcl.index("WD")], np.nan)

    ev = m_log_odds(p_spt_m, p_wdm_m, spt_best, pos, c0, col_ok, lamost_label, snr_max)
    logodds = ev["total"]
    p_m = _sigmoid(logodds)

    cand_spt = has_spt & ~np.isin(spt_best, ["K", "M"])
    cand_wdm = has_wdm & (wdm_best == "WD")
    cand_cmd = pos == "other"
    candidate = cand_spt | cand_wdm | cand_cmd

    is_m = np.zeros(n, bool)
    cls = np.full(n, "", dtype=f"<U{_CLASS_LEN}")
    reason = np.full(n, "", dtype=f"<U{_REASON_LEN}")
    inspect = np.full(n, "", dtype=f"<U{_INSPECT_LEN}")
    prob = np.full(n, np.nan)

    # the type of a rejected spectrum: WD when CNN-WDM says so and CNN-SPT's answer is one a
    # white dwarf gets (or K/M); else CNN-SPT's most probable class other than M
    nm_prob = np.where((np.asarray(scl) == "M")[None, :], -1.0, sp0)
    best_nm = np.asarray(scl)[np.argmax(nm_prob, 1)] if n else spt_best
    is_wd = cand_wdm & (p_wd >= 0.5) & np.isin(spt_best, _WD_LIKE)
    non_m_type = np.where(is_wd, "WD", best_nm)

    nodata = entered & ~has_spt & ~has_wdm
    live = entered & ~nodata
    yes = logodds > 0

    # not candidates: M (the paper) unless the summed evidence says otherwise (beyond the
    # paper: a K-like CNN-SPT answer or a colour far too blue for an M star)
    nc = live & ~candidate
    direct = nc & yes
    is_m[direct] = True
    reason[direct] = "direct"
    k_rule = nc & ~direct & (spt_best == "K")
    reason[k_rule] = "k_not_m"
    rest = nc & ~direct & ~k_rule
    reason[rest] = "cmd_non_m"

    # candidates: the summed evidence decides
    cand = live & candidate
    keep = cand & yes
    is_m[keep] = True
    reason[keep & ~cand_spt & ~cand_wdm] = "m_cmd_only"
    reason[keep & (cand_spt | cand_wdm)] = "m_cnn_overruled"
    rej = cand & ~yes
    reason[rej & is_wd] = "wd"
    reason[rej & ~is_wd & cand_spt] = "spt_non_m"
    reason[rej & ~is_wd & ~cand_spt] = "cmd_non_m"

    cls[is_m] = "M"
    nm = live & ~is_m
    cls[nm] = non_m_type[nm]
    cls[k_rule] = "K"
    prob[live] = np.where(is_m[live], p_m[live], 1.0 - p_m[live])

    # S and C stars (ZrO / C2 bandheads), outside the CMD dM region
    not_dm = pos != "dM"
    with np.errstate(invalid="ignore"):
        s_star = live & not_dm & (zro < ZRO_MAX) & (snr_r >= ZRO_MIN_SNR)
        c_star = live & not_dm & (c2 < C2_MAX) & (snr_g >= C2_MIN_SNR) & ~s_star
    for mask, code, name, idx, thr in (
        (s_star, "s_star", "S", zro, ZRO_MAX),
        (c_star, "c_star", "C", c2, C2_MAX),
    ):
        is_m[mask] = False
        cls[mask] = name
        reason[mask] = code
        prob[mask] = _sigmoid((thr - idx[mask]) / BAND_SCALE)

    # the queue
    with np.errstate(invalid="ignore"):
        unsure = live & (prob < INSPECT_BELOW)
        p_best = np.where(has_spt, np.max(sp0, axis=1), np.nan)
        conflict = live & (
            (cand_spt & (p_best >= 0.9) & (ev["colour"] >= 2.0))
            | ((spt_best == "M") & (p_best >= 0.9) & (ev["colour"] <= -2.0))
        )
    inspect[unsure] = "low_prob"
    inspect[conflict] = "cnn_colour_conflict"
    inspect[(s_star | c_star) & (prob < INSPECT_BELOW)] = "weak_band"

    cls[nodata] = "UNKNOWN"
    reason[nodata] = "no_data"

    # human decisions win
    hum = entered & (dec != "")
    if hum.any():
        d = dec[hum]
        is_m[hum] = d == "M"
        cls[hum] = d
        reason[hum] = "human"
        inspect[hum] = ""
        prob[hum] = 1.0

    return {
        "entered": entered,
        "is_m": is_m,
        "new_m": is_m & ~lam_m,
        "scm_class": cls,
        "scm_prob": prob,
        "scm_reason": reason,
        "scm_inspect": inspect,
    }


# --------------------------------------------------------------------------- xarray helpers


def _spectra_chunks(ds):
    for v in ds.data_vars.values():
        if v.dims[:1] == ("spectra",) and v.chunks is not None:
            return v.chunks[0]
    return None


def _along(ds, values, dtype):
    """A numpy array on ``spectra`` chunked like ``ds``."""
    da = xr.DataArray(np.asarray(values, dtype=dtype), dims="spectra")
    ch = _spectra_chunks(ds)
    return da.chunk({"spectra": ch}) if ch is not None else da


def decisions_array(ds, decisions, allowed, *, what: str, module: str, normalise=None):
    """Inspection decisions aligned with ``ds.spectra`` (``""`` where none).

    Parameters
    ----------
    ds : xarray.Dataset
        With the ``obsid`` coordinate (in memory).
    decisions : pandas.DataFrame, str, PathLike or None
        Columns ``obsid`` and ``decision`` (a CSV/Parquet path is read with pandas); with a
        ``module`` column (the review queue's decisions file, :func:`mspec.review.read_decisions`)
        only the rows of ``module`` are used.
    allowed : sequence of str
        Accepted decision values (matched case-insensitively, returned in this spelling).
    what : str
        Argument name for messages.
    module : str
        Paper module (``"SCM"``, ``"DGCM"``) whose rows a ``module`` column selects.
    normalise : callable, optional
        Maps a decision string before the check.

    Returns
    -------
    numpy.ndarray of str

    Raises
    ------
    ValueError
        Missing columns or a decision value not in ``allowed``.
    """
    n = ds.sizes["spectra"]
    out = np.full(n, "", dtype=object)
    if decisions is None:
        return out.astype(str)
    if isinstance(decisions, (str, bytes)) or hasattr(decisions, "__fspath__"):
        path = str(decisions)
        decisions = (
            pd.read_parquet(path) if path.endswith((".parquet", ".pq")) else (pd.read_csv(path))
        )
    if not isinstance(decisions, pd.DataFrame):
        raise TypeError(
            f"{what} must be a pandas DataFrame (columns obsid, decision) or a path, "
            f"got {type(decisions).__name__}"
        )
    cols = {str(c).lower(): c for c in decisions.columns}
    missing = [c for c in ("obsid", "decision") if c not in cols]
    if missing:
        raise ValueError(f"{what}: columns {missing} are missing (need obsid, decision)")
    if "obsid" not in ds.coords:
        raise ValueError(f"ds: {what} need the 'obsid' coordinate")
    if "module" in cols:
        mods = decisions[cols["module"]].astype(str).str.strip().str.upper()
        decisions = decisions[mods == module.upper()]
    df = decisions[[cols["obsid"], cols["decision"]]].copy()
    df.columns = ["obsid", "decision"]
    df = df[df["decision"].notna() & (df["decision"].astype(str).str.strip() != "")]
    lookup = {a.lower(): a for a in allowed}
    vals = []
    for v in df["decision"].astype(str).str.strip():
        key = normalise(v) if normalise else v
        if key.lower() not in lookup:
            raise ValueError(
                f"{what}: decision {v!r} is not one of {', '.join(allowed)} (case-insensitive)"
            )
        vals.append(lookup[key.lower()])
    df["decision"] = vals
    try:
        df["obsid"] = pd.to_numeric(df["obsid"], errors="raise").astype(np.int64)
    except (ValueError, TypeError):
        raise ValueError(f"{what}: column 'obsid' must hold integer obsids") from None
    dup = df["obsid"].duplicated(keep="last")
    if dup.any():
        warnings.warn(
            f"{what}: {int(dup.sum())} duplicated obsid(s); the last decision wins",
            UserWarning,
            stacklevel=3,
        )
        df = df[~dup]
    obsid = np.asarray(ds["obsid"].values, np.int64)
    pos = pd.Index(df["obsid"].to_numpy()).get_indexer(obsid)
    hit = pos >= 0
    out[hit] = df["decision"].to_numpy()[pos[hit]]
    unknown = len(df) - int(np.isin(df["obsid"].to_numpy(), obsid).sum())
    if unknown:
        warnings.warn(
            f"{what}: {unknown} decision(s) for obsids not in the dataset were ignored",
            UserWarning,
            stacklevel=3,
        )
    return out.astype(str)


def _colour_ok(src):
    """Reliable colour: BP and RP flux over error > 20 (else CMD_flag 1, else placed)."""
    foe = ("phot_bp_mean_flux_over_error", "phot_rp_mean_flux_over_error")
    if all(c in src.variables for c in foe):
        return (src[foe[0]] > 20.0) & (src[foe[1]] > 20.0)
    if "CMD_flag" in src.variables:
        return src["CMD_flag"] == 1
    return src["CMD_pos"] != ""


def resolve_cmd(ds, gaia):
    """The CMD variables for ``ds``: from ``ds``, from its Gaia columns, or from ``gaia``.

    Parameters
    ----------
    ds : xarray.Dataset
        Spectra.
    gaia : pandas.DataFrame, str, PathLike or None
        Cross-match table; when given it is joined with :func:`mspec.cmd.join_gaia` (on
        ``obsid`` when the table has it, else by position within 3 arcsec) and used instead
        of any Gaia columns of ``ds``. A HATS catalogue (directory or URL, see
        :func:`mspec.io.gaia_hats.is_hats_catalog`) is matched by position within 3 arcsec
        with :func:`mspec.io.gaia_hats.join_gaia_hats` (needs lsdb).

    Returns
    -------
    (xarray.DataArray, xarray.DataArray, xarray.DataArray, str)
        ``CMD_pos`` (``""`` where not placed), ``bp_rp_0`` (mag), whether the colour is
        reliable (BP/RP flux over error > 20) and where they came from (``"dataset"``,
        ``"gaia columns"``, ``"gaia table"`` or ``"none"``). Lazy like ``ds``.

    Raises
    ------
    ValueError
        ``gaia`` lacks the columns the CMD needs.
    """
    from mspec.cmd import QUALITY_CUTS, cmd_position, join_gaia, load_gaia_table, place_dataset

    need = [
        "phot_g_mean_mag",
        "phot_bp_mean_mag",
        "phot_rp_mean_mag",
        "r_med_geo",
        "ebv",
        *(q for q, _, _ in QUALITY_CUTS),
    ]
    if gaia is not None:
        from mspec.io.gaia_hats import is_hats_catalog, join_gaia_hats

        if is_hats_catalog(gaia):
            joined = join_gaia_hats(ds, gaia, merge=False)
        else:
            tab = gaia if isinstance(gaia, pd.DataFrame) else load_gaia_table(gaia)
            cols = [str(c).lower() for c in tab.columns]
            on = "obsid" if "obsid" in cols else "position"
            joined = join_gaia(ds, tab, on=on, merge=False)
        if all(c in joined.variables for c in need):
            cmd = place_dataset(joined, merge=False)
            return cmd["CMD_pos"], cmd["bp_rp_0"], _colour_ok(joined), "gaia table"
        if "bp_rp_0" in joined.variables and "M_G_0" in joined.variables:
            pos = xr.apply_ufunc(
                cmd_position,
                joined["bp_rp_0"],
                joined["M_G_0"],
                dask="parallelized",
                output_dtypes=[np.dtype("<U5")],
            )
            ok = joined["bp_rp_0"].notnull()
            return pos, joined["bp_rp_0"], ok, "gaia table"
        raise ValueError(
            "gaia: the table needs the Gaia photometry, distance, E(B-V) and quality columns "
            f"{need} (or bp_rp_0 and M_G_0)"
        )
    if "CMD_pos" in ds.variables and "bp_rp_0" in ds.variables:
        return ds["CMD_pos"], ds["bp_rp_0"], _colour_ok(ds), "dataset"
    if all(c in ds.variables for c in need):
        cmd = place_dataset(ds, merge=False)
        return cmd["CMD_pos"], cmd["bp_rp_0"], _colour_ok(ds), "gaia columns"
    empty = _along(ds, np.full(ds.sizes["spectra"], ""), "<U5")
    nan = _along(ds, np.full(ds.sizes["spectra"], np.nan), np.float64)
    no = _along(ds, np.zeros(ds.sizes["spectra"], bool), bool)
    return empty, nan, no, "none"


def _check_choice(value, name, choices):
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def _optional(ds, name):
    if name in ds.variables:
        return ds[name].astype(np.float64)
    return _along(ds, np.full(ds.sizes["spectra"], np.nan), np.float64)


def _scm_block(spt_prob, wdm_prob, sub, lcls, pos, c0, col_ok, snr_max, zro, c2, snr_r,
               snr_g, dec, *, spt_classes, wdm_classes, entry):  # fmt: skip
    r = scm_decide(
        spt_prob, spt_classes, wdm_prob, wdm_classes, sub, pos, c0, col_ok, snr_max, zro, c2,
        snr_r, snr_g, dec, lcls, entry=entry,
    )  # fmt: skip
    return tuple(r[k] for k in _SCM_OUT)


_SCM_OUT = ("entered", "is_m", "new_m", "scm_class", "scm_prob", "scm_reason", "scm_inspect")
_SCM_DTYPES = (
    np.bool_,
    np.bool_,
    np.bool_,
    np.dtype(f"<U{_CLASS_LEN}"),
    np.float64,
    np.dtype(f"<U{_REASON_LEN}"),
    np.dtype(f"<U{_INSPECT_LEN}"),
)


@stage(
    "select_m_stars",
    module="SCM",
    inputs=["spt_prob", "wdm_prob", "lamost_subclass"],
    outputs=list(_SCM_OUT),
    version="2",
    description="SCM decision rules: M / non-M with a probability, reason and inspection queue",
)
def select_m_stars(ds, *, gaia=None, decisions=None, entry="lamost", indices_rv="lamost_rv"):
    """Decide which spectra are M stars (the paper's SCM), lazily.

    Parameters
    ----------
    ds : xarray.Dataset
        Holds ``spt_prob`` (``spectra``, ``spt_classes``) and ``wdm_prob`` (``spectra``,
        ``wdm_classes``) from :func:`mspec.ml.predict`, ``lamost_subclass`` and the
        ``obsid`` coordinate. Optional: ``CMD_pos``/``bp_rp_0`` (:func:`mspec.cmd.place_dataset`)
        or the Gaia columns to compute them; ``idx_zro``/``idx_c2``
        (:func:`mspec.indices.spectral_indices`) or the native ``flux``, ``ivar``,
        ``ormask`` to measure them; ``snr_r``/``snr_g``.
    gaia : pandas.DataFrame, str or PathLike, optional
        Gaia/WISE cross-match (Parquet/CSV/FITS) joined with :func:`mspec.cmd.join_gaia`
        (on ``obsid`` if the table has it, else by position within 3 arcsec), or a HATS
        catalogue (directory or URL, e.g. Gaia DR3) matched by position within 3 arcsec
        with lsdb (:func:`mspec.io.gaia_hats.join_gaia_hats`); used instead of Gaia columns
        in ``ds``. Spectra without a row or match: the CMD does not apply.
    decisions : pandas.DataFrame, str or PathLike, optional
        Inspection verdicts, columns ``obsid`` and ``decision`` (a class of
        :data:`SCM_CLASSES`, case-insensitive; ``"non-M"`` is read as ``UNKNOWN``); they
        override the rules (``scm_reason`` ``"human"``, ``scm_prob`` 1). With a ``module``
        column (the review queue's decisions CSV) only the ``SCM`` rows count.
    entry : {"lamost", "all"}
        Which spectra enter: LAMOST's M list (the paper's M_Catalog_V0) or every spectrum.
    indices_rv : str or None
        RV variable (km/s) used to measure ``idx_zro``/``idx_c2`` when ``ds`` lacks them
        (default the LAMOST pipeline RV: SCM runs before the RV module).
    merge : bool
        Merge the outputs into ``ds`` (default) or return them alone.

    Returns
    -------
    xarray.Dataset
        On ``spectra``: ``entered``, ``is_m``, ``new_m`` (bool), ``scm_class``,
        ``scm_reason``, ``scm_inspect`` (str; ``""`` where not entered / nothing to
        inspect) and ``scm_prob`` (float64, probability of ``scm_class``; NaN where not
        entered or no data). Attributes record ``entry``, where the CMD and the bandhead
        indices came from and the number of decisions applied; :func:`new_m_table` lists
        the ``new_m`` spectra.

    Raises
    ------
    ValueError
        Bad ``entry``, a decisions table without ``obsid``/``decision`` or with an unknown
        decision, a Gaia table without the needed columns, CNN classes without M/K/WD.
    """
    _check_choice(entry, "entry", ENTRIES)
    spt_classes = [str(c) for c in ds["spt_classes"].values]
    wdm_classes = [str(c) for c in ds["wdm_classes"].values]
    for need, have, name in (("M", spt_classes, "spt_classes"), ("K", spt_classes, "spt_classes"),
                             ("M", wdm_classes, "wdm_classes"), ("WD", wdm_classes, "wdm_classes")):  # fmt: skip
        if need not in have:
            raise ValueError(f"ds: {name} {have} lacks class {need!r}")
    dec = decisions_array(
        ds,
        decisions,
        SCM_CLASSES,
        what="decisions",
        module="SCM",
        normalise=lambda v: "UNKNOWN" if v.lower() in ("non-m", "nonm", "non_m") else v,
    )
    cmd_pos, c0, col_ok, cmd_src = resolve_cmd(ds, gaia)
    zro, c2, idx_src = _bandhead_indices(ds, indices_rv)
    snr_max = _snr_max(ds)
    if "lamost_class" in ds.variables:
        lcls = ds["lamost_class"]
    else:
        lcls = _along(ds, np.full(ds.sizes["spectra"], "STAR"), "<U4")
    outs = xr.apply_ufunc(
        _scm_block,
        ds["spt_prob"],
        ds["wdm_prob"],
        ds["lamost_subclass"],
        lcls,
        cmd_pos,
        c0,
        col_ok,
        snr_max,
        zro,
        c2,
        _optional(ds, "snr_r"),
        _optional(ds, "snr_g"),
        _along(ds, dec, dec.dtype if dec.size else "<U1"),
        input_core_dims=[["spt_classes"], ["wdm_classes"], *[[]] * 11],
        output_core_dims=[[]] * len(_SCM_OUT),
        dask="parallelized",
        output_dtypes=list(_SCM_DTYPES),
        kwargs={"spt_classes": spt_classes, "wdm_classes": wdm_classes, "entry": entry},
    )
    out = xr.Dataset({k: o for k, o in zip(_SCM_OUT, outs)})
    if "obsid" in ds.coords:
        out = out.assign_coords(obsid=ds["obsid"])
    out = annotate(out)
    out.attrs.update(
        {
            "scm_entry": entry,
            "scm_cmd_source": cmd_src,
            "scm_indices_source": idx_src,
            "scm_decisions": int((dec != "").sum()),
        }
    )
    return out


def _snr_max(ds):
    """S/N_max = max(snr_u..snr_z) as in the paper (NaN where none is known)."""
    bands = [ds[f"snr_{b}"].astype(np.float64) for b in "ugriz" if f"snr_{b}" in ds.variables]
    if not bands:
        return _along(ds, np.full(ds.sizes["spectra"], np.nan), np.float64)
    return xr.concat(bands, dim="_band").max("_band", skipna=True)


def _bandhead_indices(ds, rv):
    if "idx_zro" in ds.variables and "idx_c2" in ds.variables:
        return ds["idx_zro"], ds["idx_c2"], "dataset"
    if all(v in ds.variables for v in ("flux", "ivar", "ormask", "loglam")):
        from mspec.indices import spectral_indices

        if rv is not None and rv not in ds.variables:
            raise ValueError(f"indices_rv: variable {rv!r} is not in the dataset")
        ind = spectral_indices(ds, rv=rv, merge=False)
        return ind["idx_zro"], ind["idx_c2"], f"measured (rv={rv})"
    nan = _along(ds, np.full(ds.sizes["spectra"], np.nan), np.float64)
    return nan, nan, "none"


def new_m_table(ds) -> pd.DataFrame:
    """The ``new_m`` candidates: M stars LAMOST classified as something else.

    Parameters
    ----------
    ds : xarray.Dataset
        Output of :func:`select_m_stars` with ``entry="all"`` (merged, so that
        ``lamost_class``/``lamost_subclass`` are there too). Computes the small columns.

    Returns
    -------
    pandas.DataFrame
        One row per ``new_m`` spectrum: ``obsid``, ``lamost_class``, ``lamost_subclass``,
        ``scm_prob``, ``scm_reason``, ``scm_inspect`` (and ``ra``, ``dec`` when present).
    """
    cols = [
        c
        for c in ("ra", "dec", "lamost_class", "lamost_subclass", "scm_prob", "scm_reason",
                  "scm_inspect")
        if c in ds.variables
    ]  # fmt: skip
    sel = np.asarray(ds["new_m"].values, bool)
    small = ds[["new_m", *cols]].isel(spectra=np.flatnonzero(sel)).compute()
    df = pd.DataFrame({c: small[c].values for c in cols})
    df.insert(0, "obsid", small["obsid"].values if "obsid" in small.coords else np.nan)
    return df
