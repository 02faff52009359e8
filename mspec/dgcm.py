"""DGCM, the dwarf/giant classification module (paper Sect. 3.4.2), as a lazy stage.

The paper takes as *gM candidates* the M stars LAMOST calls giants, those CNN-dMgM calls
giants and those in the gM region of the Gaia CMD (53,987 spectra), calls every other M star
a dwarf, and classified the candidates by eye with the features of its Table 3 (CaH band,
K I, Na I and Ca II lines). :func:`split_dwarfs_giants` takes the same candidates and replaces
the eye by one documented combination of the evidence, as natural-log odds for "giant"
(:func:`giant_log_odds`):

* CNN-dMgM: ``logit(p_gM)``, clipped at ``P_FLOOR`` = 1e-3 (+-6.9);
* the CMD (stars placed by :mod:`mspec.cmd`, ``CMD_flag`` 1): gM region +:data:`W_CMD`, dM
  region -W_CMD; "other" or not placed: 0. The absolute magnitude is physical evidence the
  spectrum does not carry, so it outweighs a confident CNN on its own;
* the Table-3 indices (:func:`index_score`): CaH3 against the dwarf CaH3-TiO5 sequence
  (CaH "dip" in dwarfs, "flat" in giants), the Ca II triplet (deep in giants) and Na I
  (deep in dwarfs), each term a capped z-like score, scaled down at low S/N;
* LAMOST's class: giant (subclass ``gM*``) +:data:`W_LAMOST`, dwarf (``dM*``, ``sdM*``,
  ``M*``, ``K*``) -W_LAMOST; other subclasses (``entry="all"``) 0.

Rules (``dgcm_reason``; the table with the paper's counterpart is in
``docs/classification.md``): ``direct`` (not a candidate: dM, as the paper); for candidates
the sign of the summed odds decides and the reason names what decided: ``all_agree``,
``cmd`` (the CMD against a CNN or LAMOST), ``spectra_over_cmd`` (CNN, indices and LAMOST
together against the CMD), ``cnn`` (no CMD; CNN-dMgM against LAMOST), ``indices`` (the
Table-3 indices tipped the balance), ``lamost`` (LAMOST's class tipped it); ``no_data``
(no evidence at all: dM, the common class); ``human`` (``decisions``).
``dgcm_inspect``: ``low_prob`` (probability below 0.9), ``cnn_cmd_conflict`` (a confident
CNN against the CMD), ``direct_giant_like`` (not a candidate, but the evidence leans giant),
``no_data``.

Spectra that are not M (``is_m`` False from :func:`mspec.scm.select_m_stars`) get
``luminosity_class`` ``""``; without ``is_m`` every spectrum is treated as an M star. S-type
and carbon stars are taken out by SCM (``scm_class`` S / C, ZrO and C2 bandhead indices).
"""

from __future__ import annotations

import re

import numpy as np
import xarray as xr

from mspec.scm import P_FLOOR, _along, _optional, decisions_array, resolve_cmd
from mspec.stage import stage
from mspec.variables import annotate

__all__ = [
    "DGCM_REASONS",
    "W_CMD",
    "W_LAMOST",
    "INSPECT_BELOW",
    "lamost_luminosity",
    "index_score",
    "giant_log_odds",
    "dgcm_decide",
    "split_dwarfs_giants",
]

#: dgcm_reason code -> meaning
DGCM_REASONS = {
    "direct": "not a gM candidate (LAMOST dwarf, CNN-dMgM dM, CMD not gM): dM, as the paper",
    "all_agree": "candidate; CNN-dMgM, CMD (where placed) and LAMOST agree",
    "cmd": "candidate; the CMD region decided against CNN-dMgM or LAMOST",
    "spectra_over_cmd": "candidate; CNN-dMgM, indices and LAMOST together outweighed the CMD",
    "cnn": "candidate, no CMD; CNN-dMgM decided against LAMOST",
    "indices": "candidate; the Table-3 indices tipped the balance",
    "lamost": "candidate; LAMOST's class tipped the balance",
    "no_data": "no CNN, CMD, index or LAMOST evidence: dM (the common class)",
    "human": "decision from the inspection queue",
}
#: log-odds weight of the CMD region (gM +, dM -)
W_CMD = 8.0
#: log-odds weight of LAMOST's luminosity class (giant +, dwarf -)
W_LAMOST = 2.0
#: decisions with a probability below this are queued too
INSPECT_BELOW = 0.9
#: CNN-dMgM log odds beyond which a CNN is "confident" (p > 0.99)
_CONFIDENT = float(np.log(99.0))

_GIANT = re.compile(r"^\s*gM", re.IGNORECASE)
_DWARF = re.compile(r"^\s*(dM|sdM|M|K)", re.IGNORECASE)
_INDEX_INPUTS = ("idx_cah3", "idx_tio5", "ew_nai", "ew_caii")


def lamost_luminosity(subclass):
    """LAMOST's luminosity class from its subclass.

    Parameters
    ----------
    subclass : array_like of str
        LAMOST ``subclass``.

    Returns
    -------
    numpy.ndarray of int8
        +1 giant (``gM*``), -1 dwarf (``dM*``, ``sdM*``, plain ``M*``, ``K*``), 0 other.
    """
    s = np.asarray(subclass).astype(str)
    flat = s.ravel()
    out = np.zeros(flat.shape, np.int8)
    for i, v in enumerate(flat):
        if _GIANT.match(v):
            out[i] = 1
        elif _DWARF.match(v):
            out[i] = -1
    return out.reshape(s.shape)


def index_score(idx_cah3, idx_tio5, ew_nai, ew_caii, snr_i=None):
    """Dwarf/giant score from the paper's Table-3 features (log odds, > 0 giant-like).

    Terms (each clipped to [-3, 3]; NaN inputs leave their term out):

    * CaH: ``d = idx_cah3 - (0.40 + 0.58 idx_tio5)`` (distance above the dwarf CaH3-TiO5
      sequence), term ``(d - m) / w`` with ``m = 0.02 + 0.28 (1 - TiO5)``,
      ``w = 0.02 + 0.12 (1 - TiO5)``: giants have a flat CaH (CaH3 near 1) at any TiO5;
    * Ca II triplet: ``(ew_caii - 7.3 A) / 1 A`` (giants deep: 8-10 A; dwarfs 1-6 A);
    * Na I: ``0.5 (1.0 A - ew_nai) / 0.5 A`` (dwarfs deep).

    The sum is multiplied by ``min(1, snr_i / 30)`` (noisy indices count less) and clipped
    to [-4, 4]. The sequence and centres were set from simulated spectra built on real SDSS
    M-dwarf templates (:mod:`mspec.simulate`) and agree with the literature ranges
    (Ca II triplet 8-10 A in M giants, Na I 8190 > 1 A in M dwarfs); on real data they
    are a tie-breaker, not the main evidence.

    Parameters
    ----------
    idx_cah3, idx_tio5, ew_nai, ew_caii : array_like
        From :func:`mspec.indices.spectral_indices` (EWs in Angstrom).
    snr_i : array_like, optional
        LAMOST S/N in the i band.

    Returns
    -------
    numpy.ndarray
        Score (NaN where no term could be computed).
    """
    cah3 = np.asarray(idx_cah3, np.float64)
    tio5 = np.asarray(idx_tio5, np.float64)
    nai = np.asarray(ew_nai, np.float64)
    caii = np.asarray(ew_caii, np.float64)
    with np.errstate(invalid="ignore"):
        t = np.clip(1.0 - tio5, 0.0, 1.0)
        d = cah3 - (0.40 + 0.58 * tio5)
        t_cah = np.clip((d - (0.02 + 0.28 * t)) / (0.02 + 0.12 * t), -3, 3)
        t_ca = np.clip(caii - 7.3, -3, 3)
        t_na = 0.5 * np.clip((1.0 - nai) / 0.5, -3, 3)
    terms = np.stack([t_cah, t_ca, t_na])
    anyf = np.any(np.isfinite(terms), axis=0)
    s = np.nansum(terms, axis=0)
    if snr_i is not None:
        snr = np.asarray(snr_i, np.float64)
        w = np.where(np.isfinite(snr), np.clip(snr / 30.0, 0.0, 1.0), 1.0)
        s = s * w
    return np.where(anyf, np.clip(s, -4.0, 4.0), np.nan)


def giant_log_odds(p_gm, cmd_pos, lamost_lum, idx_score):
    """Summed log odds for "giant" and its parts.

    Parameters
    ----------
    p_gm : array_like
        CNN-dMgM probability of gM (NaN: no CNN evidence).
    cmd_pos : array_like of str
        ``CMD_pos``.
    lamost_lum : array_like of int
        :func:`lamost_luminosity`.
    idx_score : array_like
        :func:`index_score` (NaN: none).

    Returns
    -------
    dict of numpy.ndarray
        ``total``, ``cnn``, ``cmd``, ``lamost``, ``idx``.
    """
    p = np.asarray(p_gm, np.float64)
    pc = np.clip(np.nan_to_num(p, nan=0.5), P_FLOOR, 1 - P_FLOOR)
    l_cnn = np.where(np.isfinite(p), np.log(pc / (1 - pc)), 0.0)
    pos = np.asarray(cmd_pos).astype(str)
    l_cmd = np.where(pos == "gM", W_CMD, np.where(pos == "dM", -W_CMD, 0.0))
    l_lam = W_LAMOST * np.asarray(lamost_lum, np.float64)
    l_idx = np.nan_to_num(np.asarray(idx_score, np.float64), nan=0.0)
    total = l_cnn + l_cmd + l_lam + l_idx
    return {"total": total, "cnn": l_cnn, "cmd": l_cmd, "lamost": l_lam, "idx": l_idx}


def dgcm_decide(dmgm_prob, dmgm_classes, is_m, lamost_lum, cmd_pos, idx_score, decision=None):
    """The DGCM rules on numpy arrays (one block).

    Parameters
    ----------
    dmgm_prob : array_like, shape ``(n, 2)``
        CNN-dMgM probabilities (NaN rows: none).
    dmgm_classes : sequence of str
        Its class names (``"dM"``, ``"gM"``).
    is_m : array_like of bool
        SCM decision (only M stars are classified).
    lamost_lum : array_like of int
        :func:`lamost_luminosity`.
    cmd_pos : array_like of str
        ``CMD_pos``.
    idx_score : array_like
        :func:`index_score`.
    decision : array_like of str, optional
        ``"dM"``/``"gM"`` from the inspection queue, ``""`` none.

    Returns
    -------
    dict of numpy.ndarray
        ``luminosity_class``, ``dgcm_reason``, ``dgcm_inspect`` (str), ``dgcm_prob``.
    """
    pr = np.asarray(dmgm_prob, np.float64)
    n = pr.shape[0]
    cl = [str(c) for c in dmgm_classes]
    has = np.all(np.isfinite(pr), axis=1) if pr.size else np.zeros(n, bool)
    p_gm = np.where(has, pr[:, cl.index("gM")], np.nan)
    m = np.asarray(is_m, bool).reshape(n)
    pos = np.asarray(cmd_pos).astype(str).reshape(n)
    lam = np.asarray(lamost_lum).reshape(n)
    sc = np.asarray(idx_score, np.float64).reshape(n)
    dec = np.full(n, "") if decision is None else np.asarray(decision).astype(str).reshape(n)
    parts = giant_log_odds(p_gm, pos, lam, sc)
    total = parts["total"]

    lum = np.full(n, "", dtype="<U2")
    reason = np.full(n, "", dtype="<U16")
    inspect = np.full(n, "", dtype="<U17")
    prob = np.full(n, np.nan)

    cand = m & ((lam == 1) | (has & (p_gm > 0.5)) | (pos == "gM"))
    direct = m & ~cand
    lum[direct] = "dM"
    reason[direct] = "direct"
    giant = total > 0
    c = cand
    lum[c] = np.where(giant[c], "gM", "dM")
    sgn = np.where(giant, 1.0, -1.0)
    agrees = {k: parts[k] * sgn > 0 for k in ("cnn", "cmd", "lamost", "idx")}
    disagrees = {k: parts[k] * sgn < 0 for k in ("cnn", "cmd", "lamost", "idx")}
    placed = np.isin(pos, ["dM", "gM"])
    none_against = ~disagrees["cnn"] & ~disagrees["cmd"] & ~disagrees["lamost"]
    without_idx = (total - parts["idx"]) * sgn > 0  # decided without the indices?
    r = np.full(n, "lamost", dtype="<U16")
    r[~without_idx] = "indices"
    r[without_idx & agrees["cnn"]] = "cnn"
    r[placed] = np.where(agrees["cmd"][placed], "cmd", "spectra_over_cmd")
    r[none_against] = "all_agree"
    reason[c] = r[c]
    with np.errstate(over="ignore"):
        p_class = 1.0 / (1.0 + np.exp(-np.abs(total)))
    prob[m] = np.where(direct[m], 1.0 / (1.0 + np.exp(total[m])), p_class[m])

    nodata = m & (total == 0) & ~has & ~placed & (lam == 0) & ~np.isfinite(sc)
    lum[nodata] = "dM"
    reason[nodata] = "no_data"
    prob[nodata] = np.nan

    inspect[m & (prob < INSPECT_BELOW)] = "low_prob"
    inspect[direct & giant] = "direct_giant_like"
    conflict = (
        m & placed & has & (np.abs(parts["cnn"]) > _CONFIDENT) & (parts["cnn"] * parts["cmd"] < 0)
    )
    inspect[conflict] = "cnn_cmd_conflict"
    inspect[nodata] = "no_data"

    hum = m & (dec != "")
    lum[hum] = dec[hum]
    reason[hum] = "human"
    inspect[hum] = ""
    prob[hum] = 1.0
    return {"luminosity_class": lum, "dgcm_prob": prob, "dgcm_reason": reason,
            "dgcm_inspect": inspect}  # fmt: skip


_DGCM_OUT = ("luminosity_class", "dgcm_prob", "dgcm_reason", "dgcm_inspect", "dgcm_idx_score")
_DGCM_DTYPES = (np.dtype("<U2"), np.float64, np.dtype("<U16"), np.dtype("<U17"), np.float64)


def _dgcm_block(prob, is_m, lam, pos, cah3, tio5, nai, caii, snr_i, dec, *, classes):
    sc = index_score(cah3, tio5, nai, caii, snr_i)
    r = dgcm_decide(prob, classes, is_m, lam, pos, sc, dec)
    return (*(r[k] for k in _DGCM_OUT[:4]), np.where(np.asarray(is_m, bool), sc, np.nan))


def _table3(ds, rv):
    if all(v in ds.variables for v in _INDEX_INPUTS):
        return [ds[v].astype(np.float64) for v in _INDEX_INPUTS], "dataset"
    if all(v in ds.variables for v in ("flux", "ivar", "ormask", "loglam")):
        from mspec.indices import spectral_indices

        if rv is not None and rv not in ds.variables:
            raise ValueError(f"indices_rv: variable {rv!r} is not in the dataset")
        ind = spectral_indices(ds, rv=rv, merge=False)
        return [ind[v] for v in _INDEX_INPUTS], f"measured (rv={rv})"
    nan = _along(ds, np.full(ds.sizes["spectra"], np.nan), np.float64)
    return [nan] * 4, "none"


@stage(
    "split_dwarfs_giants",
    module="DGCM",
    inputs=["dmgm_prob", "lamost_subclass"],
    outputs=list(_DGCM_OUT),
    version="1",
    description="DGCM decision rules: dM / gM with a probability, reason and inspection queue",
)
def split_dwarfs_giants(ds, *, gaia=None, decisions=None, indices_rv="lamost_rv"):
    """Split M stars into dwarfs and giants (the paper's DGCM), lazily.

    Parameters
    ----------
    ds : xarray.Dataset
        Holds ``dmgm_prob`` (``spectra``, ``dmgm_classes``) from :func:`mspec.ml.predict`,
        ``lamost_subclass`` and the ``obsid`` coordinate; normally ``is_m`` from
        :func:`mspec.scm.select_m_stars` (without it every spectrum counts as M).
        Optional: ``CMD_pos``/``bp_rp_0`` or the Gaia columns; the Table-3 indices
        (``idx_cah3``, ``idx_tio5``, ``ew_nai``, ``ew_caii``) or ``flux``/``ivar``/
        ``ormask`` to measure them; ``snr_i``.
    gaia : pandas.DataFrame, str or PathLike, optional
        Gaia/WISE cross-match joined with :func:`mspec.cmd.join_gaia` (as in
        :func:`mspec.scm.select_m_stars`); spectra without a row: no CMD evidence.
    decisions : pandas.DataFrame, str or PathLike, optional
        Inspection verdicts, columns ``obsid`` and ``decision`` (``dM`` or ``gM``,
        case-insensitive); they override the rules for M stars (``dgcm_reason`` ``"human"``).
        With a ``module`` column (the review queue's decisions CSV) only the ``DGCM`` rows
        count. A spectrum found not to be M belongs in SCM's decisions.
    indices_rv : str or None
        RV variable (km/s) for measuring the indices when ``ds`` lacks them (default the
        LAMOST pipeline RV: DGCM runs before the RV module).
    merge : bool
        Merge the outputs into ``ds`` (default) or return them alone.

    Returns
    -------
    xarray.Dataset
        On ``spectra``: ``luminosity_class`` (``"dM"``/``"gM"``, ``""`` for non-M),
        ``dgcm_prob`` (probability of that class; NaN for non-M or no evidence),
        ``dgcm_reason``, ``dgcm_inspect`` (str) and ``dgcm_idx_score`` (float64).

    Raises
    ------
    ValueError
        A decisions table without ``obsid``/``decision`` or with a value other than dM/gM,
        a Gaia table without the needed columns, CNN-dMgM classes without dM/gM.
    """
    classes = [str(c) for c in ds["dmgm_classes"].values]
    for need in ("dM", "gM"):
        if need not in classes:
            raise ValueError(f"ds: dmgm_classes {classes} lacks class {need!r}")
    if "is_m" in ds.variables:
        is_m = ds["is_m"]
        if is_m.dims != ("spectra",) or is_m.dtype != bool:
            raise ValueError("ds: 'is_m' must be a bool variable on spectra")
    else:
        is_m = _along(ds, np.ones(ds.sizes["spectra"], bool), bool)
    dec = decisions_array(ds, decisions, ("dM", "gM"), what="decisions", module="DGCM")
    cmd_pos, _c0, _colour_ok, cmd_src = resolve_cmd(ds, gaia)
    idx, idx_src = _table3(ds, indices_rv)
    lam = xr.apply_ufunc(
        lamost_luminosity, ds["lamost_subclass"], dask="parallelized", output_dtypes=[np.int8]
    )
    outs = xr.apply_ufunc(
        _dgcm_block,
        ds["dmgm_prob"],
        is_m,
        lam,
        cmd_pos,
        *idx,
        _optional(ds, "snr_i"),
        _along(ds, dec, dec.dtype if dec.size else "<U1"),
        input_core_dims=[["dmgm_classes"], *[[]] * 9],
        output_core_dims=[[]] * len(_DGCM_OUT),
        dask="parallelized",
        output_dtypes=list(_DGCM_DTYPES),
        kwargs={"classes": classes},
    )
    out = xr.Dataset({k: o for k, o in zip(_DGCM_OUT, outs)})
    if "obsid" in ds.coords:
        out = out.assign_coords(obsid=ds["obsid"])
    out = annotate(out)
    out.attrs.update(
        {
            "dgcm_cmd_source": cmd_src,
            "dgcm_indices_source": idx_src,
            "dgcm_decisions": int((dec != "").sum()),
        }
    )
    return out
