"""Simulated LAMOST-like low-resolution survey with known truth.

:func:`simulate_survey` returns an in-memory :class:`xarray.Dataset` holding exactly the
variables the spectrum store holds (native LAMOST sampling on the shared ``loglam`` grid,
``flux``/``ivar``/masks, per-spectrum metadata, LAMOST pipeline class/subclass/redshift,
Gaia/WISE cross-match columns) plus the ``true_*`` truth. :func:`model_spectrum` evaluates the
noise-free model of one or many stars/galaxies/QSOs on any log10-wavelength grid.

M stars are built from the real SDSS M-dwarf templates (PyHammer, Kesseli et al. 2017),
interpolated in spectral type <-> Teff and [Fe/H], with parametric dependences on log g,
[alpha/M] and [M/H] beyond the template grid of the features experts use; the model, its
numbers and its limits are documented in ``docs/simulator.md``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping

import numpy as np

from mspec.cmd import CV18_FIXED, GAIA_COLUMNS, R_W1, R_W2, extinction_coefficients
from mspec.simulate import bank as sb
from mspec.simulate import models as sm
from mspec.variables import C_KMS, NPIX, SDSS_BANDS, loglam_grid

__all__ = [
    "CLASSES",
    "DEFAULT_MIX",
    "DEFAULT_MISSING",
    "DEFAULT_PIPELINE_ERRORS",
    "MASK_BITS",
    "KINDS",
    "TELLURIC_BANDS",
    "simulate_survey",
    "model_spectrum",
    "SIMULATED_VARIABLES",
]

#: True classes (CNN-SPT's 8 classes + white dwarfs).
CLASSES = ("OB", "A", "F", "G", "K", "M", "GALAXY", "QSO", "WD")
#: Default class mix: M-heavy (like a survey pre-selected for M candidates), every class present.
DEFAULT_MIX = {
    "M": 0.55,
    "K": 0.12,
    "G": 0.07,
    "F": 0.06,
    "A": 0.04,
    "OB": 0.03,
    "GALAXY": 0.05,
    "QSO": 0.04,
    "WD": 0.04,
}
#: Default fraction of M stars that are giants.
DEFAULT_GIANT_FRACTION = 0.08
#: Missing-value rates (fraction of all spectra; exact counts, rounded):
#: ``gaia``: no Gaia match (gaia_source_id -1, every Gaia column and r_med_geo NaN);
#: ``distance``: r_med_geo NaN although Gaia matched; ``ebv``: no reddening (NaN);
#: ``wise``: W1/W2 and errors NaN; ``lamost_z``: LAMOST pipeline failure (Z = -9999 -> NaN
#: lamost_z/lamost_z_err/lamost_rv, class 'Unknown', subclass 'Non'), chosen preferentially
#: at low S/N.
DEFAULT_MISSING = {"gaia": 0.04, "distance": 0.01, "ebv": 0.02, "wise": 0.05, "lamost_z": 0.01}
#: LAMOST pipeline mistakes (exact counts, rounded): ``type``: fraction of all successfully
#: classified spectra given a neighbouring wrong type; ``dm_to_gm``/``gm_to_dm``: fractions of
#: M dwarfs/giants whose LAMOST subclass has the wrong luminosity class (Li et al. 2025 found
#: 279 of ~820k dM and 1799 of ~50k gM); ``rv``: fraction of successfully fitted stars with a
#: catastrophic LAMOST RV (off by 100-500 km/s).
DEFAULT_PIPELINE_ERRORS = {"type": 0.01, "dm_to_gm": 0.003, "gm_to_dm": 0.036, "rv": 0.01}
#: Pixel mask bits (LAMOST names): set in ``ormask`` (some exposure) / ``andmask`` (all).
MASK_BITS = {
    "BADCCD": 1,
    "BADPROFILE": 2,
    "NOSKY": 4,
    "BRIGHTSKY": 8,
    "BADCENTER": 16,
    "NODATA": 32,
}
#: Model kinds understood by :func:`model_spectrum`.
KINDS = ("M", "dM", "gM", "OB", "A", "F", "G", "K", "WD", "DA", "DB", "DC", "GALAXY", "QSO")

#: Every variable :func:`simulate_survey` returns (besides the coordinates).
SIMULATED_VARIABLES = (
    "flux",
    "ivar",
    "andmask",
    "ormask",
    "ra",
    "dec",
    "mjd",
    "snr_u",
    "snr_g",
    "snr_r",
    "snr_i",
    "snr_z",
    "lamost_class",
    "lamost_subclass",
    "lamost_z",
    "lamost_z_err",
    "lamost_rv",
    "file",
    "release",
    "loglam_offset",
    "resampled",
    *GAIA_COLUMNS,
    "true_class",
    "true_lumclass",
    "true_subclass",
    "true_teff",
    "true_logg",
    "true_m_h",
    "true_alpha_m",
    "true_rv",
    "true_active",
    "true_distance",
    "true_ebv",
    "true_failure",
)

#: Version of the simulator's physics; models trained on it and runs using them record it.
#: Bump it whenever simulated spectra change.
SIMULATOR_VERSION = "2"

#: MJD of 2012-01-14: LAMOST RVs before it are unreliable (Li et al. 2025 rv_flag).
MJD_RV_RELIABLE = 55940
#: Last MJD of each data release (the release holds observations up to then).
_RELEASE_END = [
    (56474, "LAMOST DR1"),
    (56839, "LAMOST DR2"),
    (57204, "LAMOST DR3"),
    (57570, "LAMOST DR4"),
    (57935, "LAMOST DR5"),
    (58300, "LAMOST DR6"),
    (58665, "LAMOST DR7"),
    (59030, "LAMOST DR8"),
    (59395, "LAMOST DR9"),
    (59760, "LAMOST DR10"),
]
_MJD_START, _MJD_END = 55850, 59760

#: Bright night-sky lines (vacuum A, relative peak amplitude): [O I], Na D, [O I], OH.
SKY_LINES = np.array(
    [
        (5578.89, 30.0),
        (5891.58, 8.0),
        (5897.56, 8.0),
        (6302.05, 15.0),
        (6365.54, 5.0),
        (6865.9, 8.0),
        (6925.6, 6.0),
        (7243.0, 5.0),
        (7278.4, 5.0),
        (7318.5, 8.0),
        (7342.9, 8.0),
        (7371.3, 6.0),
        (7795.2, 8.0),
        (7823.6, 8.0),
        (7855.4, 6.0),
        (7916.0, 10.0),
        (7966.9, 10.0),
        (8401.4, 12.0),
        (8432.9, 12.0),
        (8467.6, 10.0),
        (8507.3, 10.0),
        (8829.5, 14.0),
        (8888.7, 14.0),
        (8921.2, 10.0),
        (8945.9, 12.0),
        (8988.9, 12.0),
    ]
)


# ---------------------------------------------------------------------------------------------
# argument checking
# ---------------------------------------------------------------------------------------------
def _check_fraction_map(arg: str, value, defaults: Mapping[str, float]) -> dict[str, float]:
    out = dict(defaults)
    if value is None:
        return out
    if not isinstance(value, Mapping):
        raise TypeError(f"{arg} must be a mapping of name -> fraction, got {type(value).__name__}")
    for k, v in value.items():
        if k not in defaults:
            raise ValueError(f"{arg} has unknown key {k!r}; known keys: {sorted(defaults)}")
        v = float(v)
        if not (0.0 <= v <= 1.0) or math.isnan(v):
            raise ValueError(f"{arg}[{k!r}] must be a fraction in [0, 1], got {v}")
        out[k] = v
    return out


def _check_mix(mix, giant_fraction) -> tuple[dict[str, float], float]:
    if giant_fraction is not None:
        giant_fraction = float(giant_fraction)
        if not (0.0 <= giant_fraction <= 1.0):
            raise ValueError(f"giant_fraction must be in [0, 1], got {giant_fraction}")
    if mix is None:
        gf = DEFAULT_GIANT_FRACTION if giant_fraction is None else giant_fraction
        return dict(DEFAULT_MIX), gf
    if not isinstance(mix, Mapping) or not mix:
        raise TypeError("mix must be a non-empty mapping of class -> fraction")
    mix = {str(k): float(v) for k, v in mix.items()}
    allowed = set(CLASSES) | {"dM", "gM"}
    for k, v in mix.items():
        if k not in allowed:
            raise ValueError(f"mix has unknown class {k!r}; known: {sorted(allowed)}")
        if not (v >= 0.0) or not math.isfinite(v):
            raise ValueError(f"mix[{k!r}] must be a non-negative fraction, got {v}")
    total = sum(mix.values())
    if abs(total - 1.0) > 1e-6:
        raise ValueError(f"mix fractions must sum to 1, got {total:.6g}")
    if ("dM" in mix or "gM" in mix) and "M" in mix:
        raise ValueError("mix must give either 'M' (with giant_fraction) or 'dM'/'gM', not both")
    if "dM" in mix or "gM" in mix:
        if giant_fraction is not None:
            raise ValueError("giant_fraction cannot be combined with 'dM'/'gM' keys in mix")
        dm, gm = mix.pop("dM", 0.0), mix.pop("gM", 0.0)
        mix["M"] = dm + gm
        gf = gm / (dm + gm) if dm + gm > 0 else 0.0
    else:
        gf = DEFAULT_GIANT_FRACTION if giant_fraction is None else giant_fraction
    return {c: mix.get(c, 0.0) for c in CLASSES}, gf


def _check_snr(snr):
    if snr is None:
        return None
    if np.ndim(snr) == 0:
        v = float(snr)
        if not (v > 0) or not math.isfinite(v):
            raise ValueError(f"snr must be positive, got {snr!r}")
        return (v, v)
    lo, hi = (float(x) for x in snr)
    if not (0 < lo <= hi) or not math.isfinite(hi):
        raise ValueError(f"snr range must satisfy 0 < lo <= hi, got {snr!r}")
    return (lo, hi)


def _exact_counts(n: int, fractions: np.ndarray) -> np.ndarray:
    """Largest-remainder rounding of ``n * fractions`` to integers summing to ``n``."""
    raw = n * np.asarray(fractions, float)
    base = np.floor(raw).astype(np.int64)
    rest = n - base.sum()
    order = np.argsort(-(raw - base), kind="stable")
    base[order[:rest]] += 1
    return base


def _choose(rng, n_pick: int, pool: np.ndarray, weights=None) -> np.ndarray:
    """``n_pick`` distinct members of ``pool`` (all of them if fewer), optionally weighted."""
    n_pick = min(int(n_pick), pool.size)
    if n_pick <= 0:
        return np.zeros(0, dtype=np.int64)
    p = None
    if weights is not None:
        p = np.asarray(weights, float)
        p = p / p.sum()
        # numpy needs at least n_pick non-zero weights
        if np.count_nonzero(p) < n_pick:
            p = None
    return np.sort(rng.choice(pool, size=n_pick, replace=False, p=p))


# ---------------------------------------------------------------------------------------------
# noise-free models
# ---------------------------------------------------------------------------------------------
_GAL_DEFAULTS = {"tcont": 5500.0, "d4000": 1.5, "passive": 0.5, "emission": 20.0, "sigma_v": 150.0}
_QSO_DEFAULTS = {"slope": -1.5, "fwhm_v": 4000.0, "ew_scale": 1.0}


def _param(extra, key, default, n):
    return np.broadcast_to(np.asarray(extra.get(key, default), dtype=np.float64), (n,))


def _render(kinds, teff, logg, m_h, alpha_m, rv, active, ew_halpha, loglam, extra):
    """Noise-free unit-normalised flux ``(n, npix)`` for a batch of mixed kinds (internal)."""
    n = kinds.size
    out = np.empty((n, loglam.size), dtype=np.float64)
    bank = sb.bank()
    shift = sb.doppler_shift(rv)
    lo, hi = sm.pixel_edges(loglam)
    for kind in np.unique(kinds):
        sel = np.nonzero(kinds == kind)[0]
        if kind in ("dM", "gM"):
            idx, w, feat, env = sm.m_setup(
                bank, teff[sel], logg[sel], m_h[sel], alpha_m[sel], kind == "gM"
            )
            f = bank.evaluate(idx, w, shift[sel], loglam, feat, env)
            if kind == "gM":
                f *= sm.giant_ca_triplet(loglam, rv[sel], logg[sel], m_h[sel])
        elif kind in ("OB", "A", "F", "G", "K"):
            idx, w, env = sm.hot_setup(bank, teff[sel], m_h[sel], alpha_m[sel])
            f = bank.evaluate(idx, w, shift[sel], loglam, None, env)
        elif kind in ("DA", "DB", "DC"):
            f = sm.white_dwarf(loglam, teff[sel], logg[sel], rv[sel], np.full(sel.size, kind))
            idx = None
        elif kind == "GALAXY":
            g = {k: _param(extra, k, v, n)[sel] for k, v in _GAL_DEFAULTS.items()}
            f = sm.galaxy(loglam, rv[sel] / C_KMS, **g)
            idx = None
        elif kind == "QSO":
            q = {k: _param(extra, k, v, n)[sel] for k, v in _QSO_DEFAULTS.items()}
            f = sm.qso(loglam, rv[sel] / C_KMS, **q)
            idx = None
        else:  # pragma: no cover - guarded by callers
            raise ValueError(f"kind={kind!r} is not one of {KINDS}")
        act = active[sel] & (idx is not None)
        if np.any(act):
            a = np.nonzero(act)[0]
            cont = np.sum(w[a] * bank.cont_ha[idx[a]], axis=1)
            dop = 1.0 + rv[sel][a] / C_KMS
            ew = ew_halpha[sel][a]
            # chromospheric lines: H-alpha, H-beta (Balmer decrement ~1.5 in flux), Ca II H & K
            for line, ratio in ((sm.HALPHA, 1.0), (sm.HBETA, 0.6), (sm.CA_K, 0.4), (sm.CA_H, 0.3)):
                c = line * dop
                f[a] += sm.gauss_pixels(lo, hi, c, sm.inst_sigma(c), ratio * ew * cont * dop)
        out[sel] = f
    return out


def _normalise_kind(kind, logg):
    kind = np.asarray(kind).astype(str)
    bad = ~np.isin(kind, KINDS)
    if np.any(bad):
        raise ValueError(f"kind={kind[bad][0]!r} is not one of {KINDS}")
    kind = np.where(kind == "M", np.where(np.asarray(logg) < 3.0, "gM", "dM"), kind)
    return np.where(kind == "WD", "DA", kind)


def model_spectrum(
    teff,
    logg,
    m_h,
    alpha_m,
    loglam,
    *,
    rv=0.0,
    kind="M",
    active=False,
    ew_halpha=None,
    extra: Mapping | None = None,
) -> np.ndarray:
    """Noise-free model spectrum at LAMOST resolution (R~1800) on any log10-wavelength grid.

    Each pixel holds the flux density averaged over a 1e-4 dex (native LAMOST) pixel centred
    on ``loglam``, of the model Doppler-shifted exactly (lambda_obs = lambda_rest (1 + rv/c)).
    Stars are normalised to unit mean flux over 5000-9000 A in the rest frame (galaxies and
    QSOs: observed frame), before extinction and flux calibration.

    Parameters
    ----------
    teff : float or array_like
        Effective temperature (K). Ignored for ``GALAXY``/``QSO``.
    logg : float or array_like
        log10 surface gravity (cgs). For ``kind="M"`` a value below 3 selects a giant.
    m_h, alpha_m : float or array_like
        [M/H] and [alpha/M] (dex). NaN is treated as 0 (e.g. white dwarfs).
    loglam : array_like, shape (npix,)
        log10(vacuum wavelength / A) of the pixel centres, observed frame.
    rv : float or array_like
        Radial velocity (km/s); for ``GALAXY``/``QSO`` it is ``c z``.
    kind : str or array_like of str
        One of :data:`KINDS`: ``"M"`` (dwarf or giant by ``logg``), ``"dM"``, ``"gM"``,
        ``"OB"``, ``"A"``, ``"F"``, ``"G"``, ``"K"``, ``"WD"``/``"DA"`` (hydrogen white dwarf),
        ``"DB"`` (helium white dwarf), ``"DC"`` (featureless white dwarf), ``"GALAXY"``,
        ``"QSO"``.
    active : bool or array_like
        Add chromospheric emission (H-alpha, H-beta, Ca II H&K) to stars.
    ew_halpha : float or array_like, optional
        H-alpha emission equivalent width (A, positive = emission) of active stars; default 4.
    extra : mapping, optional
        Hidden parameters of galaxies (``tcont`` K, ``d4000``, ``passive`` 0..1, ``emission``
        H-alpha EW in A, ``sigma_v`` km/s) and QSOs (``slope`` of f_lambda, ``fwhm_v`` km/s,
        ``ew_scale``), scalars or arrays.

    Returns
    -------
    numpy.ndarray
        float64 flux, shape ``(npix,)`` if every parameter is scalar, else ``(n, npix)``.

    Raises
    ------
    ValueError
        If ``kind`` or an ``extra`` key is unknown, ``loglam`` is not 1-D/finite, a star's
        ``teff``/``logg`` is not finite, ``|rv| >= c``, or the parameters do not broadcast.

    Notes
    -----
    Teff outside the template range is clamped to it (M: 2350-4450 K via K5..M9; OB-K:
    3950-17000 K).
    """
    loglam = np.asarray(loglam, dtype=np.float64)
    if loglam.ndim != 1 or not np.all(np.isfinite(loglam)):
        raise ValueError("loglam must be a 1-D array of finite log10 wavelengths")
    if ew_halpha is None:
        ew_halpha = 4.0
    extra = {} if extra is None else dict(extra)
    unknown = set(extra) - set(_GAL_DEFAULTS) - set(_QSO_DEFAULTS)
    if unknown:
        raise ValueError(
            f"extra has unknown keys {sorted(unknown)}; known: "
            f"{sorted(set(_GAL_DEFAULTS) | set(_QSO_DEFAULTS))}"
        )
    args = [teff, logg, m_h, alpha_m, rv, active, ew_halpha, kind]
    scalar = all(np.ndim(a) == 0 for a in args + list(extra.values()))
    try:
        b = np.broadcast_arrays(*[np.atleast_1d(a) for a in args + list(extra.values())])
    except ValueError as err:
        raise ValueError(f"model_spectrum parameters do not broadcast: {err}") from None
    if any(x.ndim != 1 for x in b):
        raise ValueError("model_spectrum parameters must be scalars or 1-D arrays")
    teff, logg, m_h, alpha_m, rv = (np.asarray(x, dtype=np.float64) for x in b[:5])
    active = b[5].astype(bool)
    ew = b[6].astype(np.float64)
    kinds = _normalise_kind(b[7], logg)
    extra = dict(zip(extra.keys(), b[8:]))
    m_h = np.nan_to_num(m_h)
    alpha_m = np.nan_to_num(alpha_m)
    star = ~np.isin(kinds, ["GALAXY", "QSO"])
    if np.any(star & ~(np.isfinite(teff) & (teff > 0))):
        raise ValueError("teff must be finite and positive for stars")
    if np.any(star & ~np.isfinite(logg)):
        raise ValueError("logg must be finite for stars")
    if not np.all(np.isfinite(rv)) or np.any(np.abs(rv) >= C_KMS):
        raise ValueError("rv must be finite with |rv| < c")
    out = _render(kinds, teff, logg, m_h, alpha_m, rv, active, ew, loglam, extra)
    return out[0] if scalar else out


# ---------------------------------------------------------------------------------------------
# observational ingredients
# ---------------------------------------------------------------------------------------------
#: Telluric absorption bands (vacuum A, observed frame; LAMOST spectra are not corrected):
#: gas, band head, end, optical depth at the head (airmass 1, 1 mm water), decay scale (A).
TELLURIC_BANDS = [
    ("O2", 6868.0, 6960.0, 0.35, 25.0),
    ("O2", 7594.0, 7700.0, 0.6, 30.0),
    ("O2", 6278.0, 6310.0, 0.08, 15.0),
    ("H2O", 7165.0, 7340.0, 0.10, 120.0),
    ("H2O", 8130.0, 8350.0, 0.08, 150.0),
    ("H2O", 8950.0, 9110.0, 0.15, 200.0),
]
_THR_LAM = np.array([3700.0, 3950, 4450, 4950, 5450, 5950, 6450, 6950, 7450, 7950, 8450, 9100])
_THR = np.array([0.006, 0.015, 0.09, 0.22, 0.3, 0.37, 0.72, 0.88, 1.0, 1.0, 0.86, 0.7])


@functools.lru_cache(maxsize=2)
def _instrument(npix: int = NPIX):
    """Throughput and relative sky spectrum on the native grid (cached)."""
    loglam = loglam_grid(npix)
    lam = 10.0**loglam
    # effective throughput (counts per unit calibrated flux), measured from the per-pixel
    # noise of the real bright DR7 M-dwarf files (photon-limited: T ~ f / sigma^2, relative
    # to 7700 A): the blue arm is ~50x less efficient at 3900 A than the red arm
    thr = np.interp(lam, _THR_LAM, _THR)
    thr *= 1.0 - 0.3 * np.exp(-(((lam - 5800.0) / 60.0) ** 2))  # dichroic crossover
    lo, hi = sm.pixel_edges(loglam)
    sky = 0.6 + 0.4 * (lam / 7000.0) ** 2
    c = SKY_LINES[:, 0]
    sky = sky + (
        sm.gauss_pixels(lo, hi, c, sm.inst_sigma(c), SKY_LINES[:, 1] * sm.inst_sigma(c) * 2.5)
    ).sum(axis=0)
    sky_pix = [np.nonzero((lo <= ln) & (hi > ln))[0][0] for ln in c]
    return loglam, lam, thr, sky, np.array(sky_pix)


#: LAMOST blue/red arm overlap: the dichroic splits the light near 5900 A and the two arms
#: are joined inside this window (vacuum A); see docs/simulator.md.
DICHROIC = (5700.0, 6000.0)


def _draw_systematics(rng, n):
    """Per-spectrum instrumental systematics (simulator version 2; docs/simulator.md).

    Higher-order flux-calibration wiggles (Legendre P4-P6), the blue/red arm scale mismatch
    and the splice artefact in the dichroic region, and sky-subtraction residuals (a global
    over/under-subtraction of the sky, a 0.5 % per-line jitter of the bright sky lines and,
    where the spectrum's ``BRIGHTSKY`` mask flags a poorly subtracted line, a residual of
    ``sky_bad`` ~ N(0, 0.15) times that line's flux).
    """
    return {
        "resp_hi": rng.normal(0.0, 1.0, (n, 3)) * np.array([0.02, 0.015, 0.01]),
        "arm_jump": rng.normal(0.0, 0.03, n),
        "splice": rng.uniform(5750.0, 5950.0, n),
        "dichroic_amp": rng.normal(0.0, 0.03, n),
        "sky_scale": rng.normal(0.0, 0.01, n),
        "sky_jitter": rng.normal(0.0, 0.005, (n, SKY_LINES.shape[0])),
        "sky_bad": rng.normal(0.0, 0.15, n),
    }


def _systematic_response(obs, sl, lam, xleg):
    """ln of the multiplicative systematics (flux calibration, dichroic) for rows ``sl``."""
    p4 = (35.0 * xleg**4 - 30.0 * xleg**2 + 3.0) / 8.0
    p5 = (63.0 * xleg**5 - 70.0 * xleg**3 + 15.0 * xleg) / 8.0
    p6 = (231.0 * xleg**6 - 315.0 * xleg**4 + 105.0 * xleg**2 - 5.0) / 16.0
    out = np.zeros((sl.stop - sl.start, lam.size))
    for j, p in enumerate((p4, p5, p6)):
        out += obs["resp_hi"][sl, j, None] * p
    d = lam[None, :] - obs["splice"][sl, None]
    # the red arm's calibration differs from the blue arm's by a few per cent (a smooth step
    # across the splice) and the splice leaves a ~150 A wiggle inside the dichroic window
    out += obs["arm_jump"][sl, None] / (1.0 + np.exp(-d / 30.0))
    out += (
        obs["dichroic_amp"][sl, None] * np.sin(2 * np.pi * d / 150.0) * np.exp(-((d / 80.0) ** 2))
    )
    return out


@functools.lru_cache(maxsize=2)
def _sky_line_profiles(npix: int = NPIX):
    """``(n_lines, npix)`` pixel profiles of the bright sky lines (the line part of the sky)."""
    loglam = loglam_grid(npix)
    lo, hi = sm.pixel_edges(loglam)
    c = SKY_LINES[:, 0]
    prof = sm.gauss_pixels(lo, hi, c, sm.inst_sigma(c), SKY_LINES[:, 1] * sm.inst_sigma(c) * 2.5)
    prof.setflags(write=False)
    return prof


@functools.lru_cache(maxsize=2)
def _sky_line_support(npix: int = NPIX):
    """Per sky line, the pixel slice where its profile is nonzero, and the summed profile."""
    prof = _sky_line_profiles(npix)
    cols = []
    for row in prof:
        nz = np.nonzero(row)[0]
        cols.append(slice(int(nz[0]), int(nz[-1]) + 1) if nz.size else slice(0, 0))
    total = prof.sum(axis=0)
    total.setflags(write=False)
    return tuple(cols), total


def _sky_residual(obs, sl, level):
    """Additive sky-subtraction residual (flux units) for rows ``sl`` of sky ``level``."""
    lam = 10.0 ** loglam_grid(NPIX)
    cont = 0.6 + 0.4 * (lam / 7000.0) ** 2
    prof = _sky_line_profiles()
    cols, _ = _sky_line_support()
    coef = obs["sky_scale"][sl, None] + obs["sky_jitter"][sl]
    lines = np.zeros((coef.shape[0], prof.shape[1]))
    for j, c in enumerate(cols):  # elementwise, not BLAS: identical for any chunking
        lines[:, c] += coef[:, j, None] * prof[j, c]
    return level[:, None] * (obs["sky_scale"][sl, None] * cont[None, :] + lines)


@functools.lru_cache(maxsize=2)
def _telluric_tau(npix: int = NPIX):
    """Optical depth shapes (O2, H2O at 1 mm water) at airmass 1 on the native grid, R~1800."""
    from scipy.ndimage import gaussian_filter1d

    lam = 10.0 ** loglam_grid(npix)
    out = {}
    for gas in ("O2", "H2O"):
        tau = np.zeros_like(lam)
        for head, end, tau0, scale in (b[1:] for b in TELLURIC_BANDS if b[0] == gas):
            sel = (lam >= head) & (lam <= end)
            tau[sel] += tau0 * np.exp(-(lam[sel] - head) / scale)
        # instrumental sigma is ~1 native pixel at R~1800
        out[gas] = gaussian_filter1d(tau, 1.0 / (sb.R_LAMOST * sm.FWHM_SIGMA * np.log(10) * 1e-4))
    return out["O2"], out["H2O"]


def _band_slices(lam):
    return {b: (lam >= lo) & (lam < hi) for b, (lo, hi) in SDSS_BANDS.items()}


def _mag_from_snr(snr, cond):
    """i-band magnitude whose S/N is ``snr`` under observing condition factor ``cond``.

    S/N = 60 cond F / sqrt(F + 0.3), F = 10**(-0.4 (i - 14.5)): photon-limited when bright,
    sky-limited when faint (i ~ 12.5: S/N ~ 150, i ~ 16.5: ~ 14, i ~ 17.8: ~ 5).
    """
    s2 = (snr / (60.0 * cond)) ** 2
    f = 0.5 * (s2 + np.sqrt(s2 * s2 + 1.2 * s2))
    return 14.5 - 2.5 * np.log10(f), 0.3 / f


# intrinsic Gaia colour (BP-RP)_0 and absolute G for each population, tabulated against Teff
# M dwarfs are tabulated against subtype (K5, K7, M0..M9), so they follow the SpT-Teff scale
_DM_ST = np.array([-2.0, -1, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9])
_DM_C = np.array([1.45, 1.7, 1.84, 2.0, 2.2, 2.45, 2.8, 3.1, 3.55, 4.0, 4.3, 4.6])
_DM_G = np.array([7.2, 7.9, 8.2, 8.7, 9.2, 10.0, 11.1, 11.9, 13.1, 14.5, 15.3, 16.2])
_GM_T = np.array([3000.0, 3100, 3300, 3500, 3700, 3900, 4100])
_GM_C = np.array([4.5, 4.2, 3.6, 2.9, 2.3, 1.9, 1.6])
_GM_G = np.array([-1.6, -1.6, -1.5, -1.2, -0.8, -0.3, 0.2])
_HOT_T = np.array([4150.0, 4450, 4850, 5250, 5650, 5900, 6500, 7200, 8000, 9600, 14000, 20000])
_HOT_C = np.array([1.7, 1.45, 1.2, 0.98, 0.85, 0.75, 0.6, 0.4, 0.2, 0.0, -0.1, -0.2])
_HOT_G = np.array([7.9, 7.2, 6.5, 5.6, 4.8, 4.2, 3.4, 2.6, 2.0, 1.0, 0.0, -1.2])
_WD_T = np.array([5000.0, 7000, 10000, 20000, 40000])
_WD_C = np.array([0.9, 0.4, 0.0, -0.3, -0.5])
_WD_G = np.array([14.5, 13.0, 11.5, 10.5, 9.5])


# ---------------------------------------------------------------------------------------------
# the survey
# ---------------------------------------------------------------------------------------------
def simulate_survey(
    n_spectra: int,
    seed: int = 0,
    mix: Mapping[str, float] | None = None,
    *,
    giant_fraction: float | None = None,
    snr=None,
    noiseless: bool = False,
    missing: Mapping[str, float] | None = None,
    pipeline_errors: Mapping[str, float] | None = None,
    early_fraction: float = 0.05,
    telluric: bool = True,
    chunk_size: int = 1000,
    failures: Mapping[str, float] | None = None,
):
    """Simulate a LAMOST-like low-resolution survey with known truth.

    Parameters
    ----------
    n_spectra : int
        Number of spectra (> 0).
    seed : int
        Seed of every random stream. Stars, observations, pipeline outputs, cross-match and
        noise use independent streams, so ``noiseless=True`` returns the identical survey
        without noise, and the result does not depend on ``chunk_size``.
    mix : mapping, optional
        Class -> fraction (classes of :data:`CLASSES`; ``"dM"``/``"gM"`` may replace ``"M"``
        to set the dwarf/giant ratio), summing to 1. Counts are exact (largest remainder).
        Default :data:`DEFAULT_MIX` (M-heavy, every class present).
    giant_fraction : float, optional
        Fraction of M stars that are giants when ``mix`` gives ``"M"`` (default 0.08).
    snr : float or (float, float), optional
        Target median per-pixel S/N in the i band for every spectrum, or a (lo, hi) range
        drawn log-uniformly. Default: a LAMOST-like, magnitude-limited distribution,
        log10 S/N_i ~ N(mu, 0.4) within [0.3, 3] with mu = 1.25 for M dwarfs (median ~18,
        ~25% below 10), 1.9 for M giants, 1.5 for OB-K stars, 1.0 for white dwarfs, galaxies
        and QSOs.
    noiseless : bool
        Return the noise-free flux (same stars, RVs, ivar, masks and metadata).
    missing : mapping, optional
        Missing-value rates overriding :data:`DEFAULT_MISSING`.
    pipeline_errors : mapping, optional
        LAMOST pipeline mistake rates overriding :data:`DEFAULT_PIPELINE_ERRORS`.
    early_fraction : float
        Fraction of spectra observed before MJD 55940 (2012-01-14), when LAMOST RVs are
        unreliable.
    telluric : bool
        Imprint uncorrected telluric O2/H2O bands (:data:`TELLURIC_BANDS`, observed frame,
        scaled by airmass and water vapour) like real LAMOST spectra. ``False`` gives an
        idealised survey whose spectra match :func:`model_spectrum` up to extinction and
        flux calibration.
    chunk_size : int
        Spectra rendered at a time (memory only; results do not depend on it).
    failures : mapping, optional
        Failure modes the RV reconciliation must catch, mode -> fraction of the M stars
        (:data:`mspec.simulate.failures.FAILURE_MODES`: ``red_end_anomaly``,
        ``wave_calibration``, ``emission_dwarf``, ``very_low_snr``,
        ``lamost_rv_catastrophic``, ``lamost_rv_modest``); adds the truth variable
        ``true_failure`` (mode or ``""``; all ``""`` by default: no failures).

    Returns
    -------
    xarray.Dataset
        In-memory numpy, dims ``spectra`` (coord ``obsid``) and ``pixels`` (coord ``loglam``,
        the shared native grid), holding :data:`SIMULATED_VARIABLES` with registry attrs.

    Raises
    ------
    ValueError, TypeError
        Naming the offending argument.
    FileNotFoundError
        If the PyHammer templates (``<shared data>/templates_pyhammer``, see
        :func:`mspec.data.shared_data_dir`; ``$MSPEC_SHARED_DATA``) are missing.
    """
    import xarray as xr

    from mspec.variables import annotate

    if isinstance(n_spectra, bool) or not isinstance(n_spectra, int | np.integer):
        raise TypeError(f"n_spectra must be an integer, got {type(n_spectra).__name__}")
    if n_spectra <= 0:
        raise ValueError(f"n_spectra must be positive, got {n_spectra}")
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    if (
        isinstance(chunk_size, bool)
        or not isinstance(chunk_size, int | np.integer)
        or chunk_size <= 0
    ):
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    early_fraction = float(early_fraction)
    if not (0.0 <= early_fraction <= 1.0):
        raise ValueError(f"early_fraction must be in [0, 1], got {early_fraction}")
    mix, gfrac = _check_mix(mix, giant_fraction)
    snr_range = _check_snr(snr)
    miss = _check_fraction_map("missing", missing, DEFAULT_MISSING)
    perr = _check_fraction_map("pipeline_errors", pipeline_errors, DEFAULT_PIPELINE_ERRORS)
    if failures is not None:
        from mspec.simulate.failures import check_failures

        check_failures(failures)
    n = int(n_spectra)

    ss = np.random.SeedSequence(int(seed))
    r_star, r_obs, r_pipe, r_xm, r_noise, r_mask = (np.random.default_rng(s) for s in ss.spawn(6))

    truth = _draw_stars(r_star, n, mix, gfrac)
    obs = _draw_observations(r_obs, n, truth, snr_range, early_fraction)
    # instrumental systematics (version 2) from their own stream: the six above are unchanged
    obs.update(
        _draw_systematics(
            np.random.default_rng(np.random.SeedSequence(int(seed), spawn_key=(1018,))), n
        )
    )
    xm = _draw_crossmatch(r_xm, n, truth, obs, miss)
    masks = _draw_masks(r_mask, n, obs)
    flux, ivar, ormask, andmask, snrs = _render_survey(
        truth, obs, xm, masks, r_noise, noiseless, bool(telluric), chunk_size
    )
    pipe = _draw_pipeline(r_pipe, n, truth, obs, snrs, miss, perr)

    loglam = loglam_grid()
    S, SP = ("spectra",), ("spectra", "pixels")
    data = {
        "flux": (SP, flux),
        "ivar": (SP, ivar),
        "andmask": (SP, andmask),
        "ormask": (SP, ormask),
        "ra": (S, obs["ra"]),
        "dec": (S, obs["dec"]),
        "mjd": (S, obs["mjd"]),
        **{f"snr_{b}": (S, snrs[b]) for b in SDSS_BANDS},
        **{k: (S, v) for k, v in pipe.items()},
        "file": (S, obs["file"]),
        "release": (S, obs["release"]),
        "loglam_offset": (S, np.zeros(n)),
        "resampled": (S, np.zeros(n, dtype=bool)),
        **{k: (S, v) for k, v in xm.items() if not k.startswith("_")},
        "true_class": (S, truth["class"]),
        "true_lumclass": (S, truth["lumclass"]),
        "true_subclass": (S, truth["subclass"]),
        "true_teff": (S, truth["teff"]),
        "true_logg": (S, truth["logg"]),
        "true_m_h": (S, truth["m_h"]),
        "true_alpha_m": (S, truth["alpha_m"]),
        "true_rv": (S, truth["rv"]),
        "true_active": (S, truth["active"]),
        "true_distance": (S, xm["_distance"]),
        "true_ebv": (S, xm["_ebv"]),
    }
    ds = xr.Dataset(data, coords={"obsid": (S, obs["obsid"]), "loglam": (("pixels",), loglam)})
    from mspec.simulate.failures import apply_failures

    ds = apply_failures(ds, failures or {}, int(seed))
    ds = ds[list(SIMULATED_VARIABLES)]
    ds.attrs.update(
        {
            "title": "mspec simulated LAMOST-like survey",
            "seed": int(seed),
            "noiseless": int(bool(noiseless)),
            "telluric": int(bool(telluric)),
            "giant_fraction": float(gfrac),
            "mix": ", ".join(f"{k}={v:g}" for k, v in mix.items()),
        }
    )
    return annotate(ds)


# -- stars -------------------------------------------------------------------------------------
def _spt_name(letter_ranges, teff):
    """LAMOST-style subtype strings (e.g. 'G2') from Teff via (letter, teff_0, teff_9) ranges."""
    out = np.empty(teff.size, dtype="<U8")
    for letter, t0, t9 in letter_ranges:
        sel = (teff <= t0) & (teff > t9) if t0 > t9 else np.zeros(teff.size, bool)
        if np.any(sel):
            sub = np.clip(np.round(9.0 * np.log(t0 / teff[sel]) / np.log(t0 / t9)), 0, 9)
            out[sel] = [f"{letter}{int(s)}" for s in sub]
    return out


_HOT_LETTERS = [
    ("O", 45000.0, 30001.0),
    ("B", 30000.0, 10001.0),
    ("A", 10000.0, 7301.0),
    ("F", 7300.0, 6001.0),
    ("G", 6000.0, 5301.0),
    ("K", 5300.0, 3951.0),
]


def _hot_subclass(teff):
    out = _spt_name(_HOT_LETTERS, teff)
    # LAMOST has K7 but no K6/K8/K9
    out = np.where(np.isin(out, ["K6", "K8", "K9"]), "K7", out)
    return np.where(out == "", "M0", out)


def _m_subclass(st, giant):
    sub = np.clip(np.round(st), -2, 9).astype(int)
    sub = np.where(giant, np.maximum(sub, 0), sub)  # M giants are never typed K here
    out = np.array([f"M{s}" if s >= 0 else ("K7" if s == -1 else "K5") for s in sub], dtype="<U8")
    return np.where(giant & (sub >= 0), np.char.add("g", out), out)


def _draw_stars(rng, n, mix, gfrac):
    counts = _exact_counts(n, [mix[c] for c in CLASSES])
    cls = np.repeat(np.array(CLASSES), counts)
    n_m = counts[CLASSES.index("M")]
    n_gm = int(round(gfrac * n_m))
    lum = np.where(cls == "M", "dM", "").astype("<U2")
    lum[np.nonzero(cls == "M")[0][:n_gm]] = "gM"
    perm = rng.permutation(n)
    cls, lum = cls[perm], lum[perm]

    teff = np.full(n, np.nan)
    logg = np.full(n, np.nan)
    m_h = np.full(n, np.nan)
    alpha = np.full(n, np.nan)
    rv = np.zeros(n)
    active = np.zeros(n, dtype=bool)
    ew_ha = np.zeros(n)
    kind = np.empty(n, dtype="<U6")
    sub = np.empty(n, dtype="<U8")
    extra = {k: np.full(n, v) for k, v in {**_GAL_DEFAULTS, **_QSO_DEFAULTS}.items()}

    # M dwarfs: spectral types skewed to early M like LAMOST's M sample
    d = np.nonzero(lum == "dM")[0]
    if d.size:
        u = rng.random(d.size)
        scale, lo, hi = 2.2, -0.5, 9.4
        st = lo - scale * np.log(1 - u * (1 - np.exp(-(hi - lo) / scale)))
        t = np.clip(sm.dwarf_teff(st) + rng.normal(0, 30, d.size), 2350.0, 4050.0)
        mh = np.clip(rng.normal(-0.15, 0.22, d.size), -1.3, 0.6)
        sd = rng.random(d.size) < 0.03  # a few subdwarfs, beyond the template grid
        mh[sd] = rng.uniform(-2.0, -1.0, sd.sum())
        teff[d], m_h[d] = t, mh
        alpha[d] = np.clip(0.05 - 0.25 * mh + rng.normal(0, 0.04, d.size), -0.15, 0.45)
        logg[d] = sm.ms_logg(t) - 0.1 * mh + rng.normal(0, 0.06, d.size)
        thin = rng.random(d.size) < 0.9
        rv[d] = np.where(thin, rng.normal(-5, 30, d.size), rng.normal(-20, 90, d.size))
        st_t = sm.dwarf_subtype(t)
        p_act = 0.02 + 0.88 / (1.0 + np.exp(-(st_t - 5.0) / 0.9))
        active[d] = rng.random(d.size) < p_act
        ew_ha[d] = np.clip(
            np.exp(rng.normal(np.log(2.5 + 0.8 * np.clip(st_t, 0, 9)), 0.5)), 0.5, 25
        )
        kind[d] = "dM"
        sub[d] = _m_subclass(np.maximum(st_t, 0.0), np.zeros(d.size, bool))
    g = np.nonzero(lum == "gM")[0]
    if g.size:
        st = 7.0 * rng.beta(1.2, 2.0, g.size)
        t = np.clip(sm.giant_teff(st) + rng.normal(0, 30, g.size), 3050.0, 4000.0)
        mh = np.clip(rng.normal(-0.3, 0.3, g.size), -2.0, 0.6)
        teff[g], m_h[g] = t, mh
        alpha[g] = np.clip(0.08 - 0.2 * mh + rng.normal(0, 0.04, g.size), -0.1, 0.45)
        logg[g] = np.clip(sm.giant_logg(t) + 0.3 * mh + rng.normal(0, 0.15, g.size), -0.5, 2.2)
        rv[g] = rng.normal(-20, 60, g.size)
        kind[g] = "gM"
        sub[g] = _m_subclass(sm.giant_subtype(t), np.ones(g.size, bool))
    ranges = {"OB": (10500.0, 20000.0), "A": (7400.0, 10000.0), "F": (6000.0, 7400.0)}
    ranges |= {"G": (5300.0, 6000.0), "K": (4050.0, 5300.0)}
    for c, (tlo, thi) in ranges.items():
        s = np.nonzero(cls == c)[0]
        if not s.size:
            continue
        t = np.exp(rng.uniform(np.log(tlo), np.log(thi), s.size))
        mh = np.clip(rng.normal(-0.2, 0.3, s.size), -2.0, 0.5)
        teff[s], m_h[s] = t, mh
        alpha[s] = np.clip(-0.25 * mh + rng.normal(0, 0.03, s.size), -0.05, 0.4)
        logg[s] = np.clip(sm.ms_logg(t) + rng.normal(-0.1, 0.15, s.size), 3.5, 4.8)
        logg[s] = np.where(t > 7500, rng.normal(4.0, 0.2, s.size), logg[s])
        rv[s] = rng.normal(-10, 40 if c in "GK" else 25, s.size)
        kind[s] = c
        sub[s] = _hot_subclass(t)
    w = np.nonzero(cls == "WD")[0]
    if w.size:
        t = np.exp(rng.uniform(np.log(5000.0), np.log(40000.0), w.size))
        teff[w] = t
        logg[w] = rng.normal(8.0, 0.2, w.size)
        rv[w] = rng.normal(20, 40, w.size)
        u = rng.random(w.size)
        # DB only where He I lines can show (> 11000 K); cooler non-DA white dwarfs are DC
        kind[w] = np.where(u < 0.8, "DA", np.where((u < 0.9) & (t > 11000.0), "DB", "DC"))
        sub[w] = kind[w]
    gx = np.nonzero(cls == "GALAXY")[0]
    if gx.size:
        z = 0.02 + rng.gamma(2.0, 0.05, gx.size)
        d4 = rng.uniform(1.1, 2.0, gx.size)
        passive = (d4 - 1.1) / 0.9
        extra["tcont"][gx] = 7000.0 - 2800.0 * passive + rng.normal(0, 200, gx.size)
        extra["d4000"][gx] = d4
        extra["passive"][gx] = passive
        extra["emission"][gx] = rng.uniform(0, 60, gx.size) * (1 - passive) ** 1.5
        extra["sigma_v"][gx] = rng.uniform(80, 250, gx.size)
        rv[gx] = C_KMS * z
        kind[gx] = "GALAXY"
        sub[gx] = np.where(passive > 0.6, "PASSIVE", "STARFORMING")
    q = np.nonzero(cls == "QSO")[0]
    if q.size:
        z = np.clip(rng.gamma(3.0, 0.5, q.size), 0.1, 4.0)
        extra["slope"][q] = rng.normal(-1.5, 0.3, q.size)
        extra["fwhm_v"][q] = rng.uniform(2500, 6000, q.size)
        extra["ew_scale"][q] = np.exp(rng.normal(0, 0.3, q.size))
        rv[q] = C_KMS * z
        kind[q] = "QSO"
        sub[q] = "QSO"
    return {
        "class": cls.astype("<U6"),
        "lumclass": lum,
        "kind": kind,
        "subclass": sub,
        "teff": teff,
        "logg": logg,
        "m_h": m_h,
        "alpha_m": alpha,
        "rv": rv,
        "active": active,
        "ew_halpha": ew_ha,
        "extra": extra,
    }


# -- observation metadata ----------------------------------------------------------------------
def _draw_observations(rng, n, truth, snr_range, early_fraction):
    if snr_range is None:
        # magnitude-limited: luminous giants and hot stars are seen bright, far away; faint
        # white dwarfs, galaxies and QSOs at low S/N
        mu = np.select(
            [
                truth["lumclass"] == "gM",
                truth["lumclass"] == "dM",
                np.isin(truth["class"], ["WD", "GALAXY", "QSO"]),
            ],
            [1.9, 1.25, 1.0],
            1.5,
        )
        snr = 10.0 ** np.clip(rng.normal(mu, 0.4, n), 0.3, 3.0)
    else:
        lo, hi = snr_range
        snr = np.exp(rng.uniform(np.log(lo), np.log(hi), n))
    cond = np.exp(rng.normal(0.0, 0.3, n))
    imag, sky_rel = _mag_from_snr(snr, cond)
    early = rng.random(n) < early_fraction
    mjd = np.where(
        early,
        rng.integers(_MJD_START, MJD_RV_RELIABLE, n),
        rng.integers(MJD_RV_RELIABLE, _MJD_END + 1, n),
    ).astype(np.int64)
    ra = rng.uniform(0.0, 360.0, n)
    dec = np.degrees(np.arcsin(rng.uniform(np.sin(np.radians(-10.0)), np.sin(np.radians(65.0)), n)))
    # native length 3820-3909 pixels: most spectra are (nearly) complete
    u = rng.random(n)
    npix = np.where(
        u < 0.75,
        NPIX,
        np.where(u < 0.95, rng.integers(3895, NPIX, n), rng.integers(3820, 3895, n)),
    )
    # obsid: unique, increasing with MJD
    ids = np.unique(rng.integers(100_000_000, 999_999_999, n + n // 10 + 16))
    while ids.size < n:  # pragma: no cover - astronomically unlikely
        ids = np.unique(np.concatenate([ids, rng.integers(100_000_000, 999_999_999, n)]))
    ids = np.sort(rng.choice(ids, n, replace=False))
    obsid = np.empty(n, dtype=np.int64)
    obsid[np.argsort(mjd, kind="stable")] = ids
    ends = np.array([e for e, _ in _RELEASE_END])
    rel_names = np.array([r for _, r in _RELEASE_END])
    release = rel_names[np.clip(np.searchsorted(ends, mjd), 0, ends.size - 1)]
    sp = rng.integers(1, 17, n)
    fiber = rng.integers(1, 251, n)
    file = np.array(
        [
            f"spec-{m + 1}-{_plan_name(a, d)}_sp{s:02d}-{f:03d}.fits"
            for m, a, d, s, f in zip(mjd, ra, dec, sp, fiber)
        ]
    )
    # flux calibration: overall LAMOST-like scale and a smooth relative response (Legendre)
    scale = 1500.0 * 10.0 ** (-0.4 * (imag - 14.5)) * np.exp(rng.normal(0, 0.4, n))
    # ~3% of spectra are badly flux-calibrated (wrong standard star, poor sky): large response
    bad_cal = rng.random(n) < 0.03
    resp = rng.normal(0.0, 1.0, (n, 3)) * np.where(bad_cal, 0.25, 0.06)[:, None]
    blue_dead = rng.random(n) < 0.3
    airmass = rng.uniform(1.0, 1.6, n)
    pwv = np.exp(rng.normal(0.0, 0.5, n))  # precipitable water (mm)
    return {
        "snr_target": snr,
        "imag": imag,
        "sky_rel": sky_rel,
        "mjd": mjd,
        "ra": ra,
        "dec": dec,
        "npix": npix,
        "obsid": obsid,
        "release": release,
        "file": file,
        "scale": scale,
        "resp": resp,
        "blue_dead": blue_dead,
        "airmass": airmass,
        "pwv": pwv,
    }


def _plan_name(ra, dec):
    h = ra / 15.0
    hh, mm = int(h), int((h % 1) * 60)
    ss = int((((h % 1) * 60) % 1) * 60)
    sgn = "N" if dec >= 0 else "S"
    ad = abs(dec)
    dd, dm = int(ad), int((ad % 1) * 60)
    ds = int((((ad % 1) * 60) % 1) * 60)
    return f"HD{hh:02d}{mm:02d}{ss:02d}{sgn}{dd:02d}{dm:02d}{ds:02d}V01"


# -- Gaia / Bailer-Jones / Bayestar / WISE -----------------------------------------------------
def _draw_crossmatch(rng, n, truth, obs, miss):
    cls, lum, teff = truth["class"], truth["lumclass"], truth["teff"]
    c0 = np.full(n, np.nan)
    mg = np.full(n, np.nan)
    gw1 = np.full(n, np.nan)
    w12 = np.full(n, np.nan)
    dm, gm = lum == "dM", lum == "gM"
    hot = np.isin(cls, ["OB", "A", "F", "G", "K"])
    wd, gal, qso = cls == "WD", cls == "GALAXY", cls == "QSO"
    st_dm = sm.dwarf_subtype(teff[dm])
    c0[dm] = np.interp(st_dm, _DM_ST, _DM_C)
    mg[dm] = np.interp(st_dm, _DM_ST, _DM_G) + rng.normal(0, 0.25, dm.sum())
    w12[dm] = np.clip(0.05 + 0.08 * (c0[dm] - 1.8), 0.0, 0.4)
    c0[gm] = np.interp(teff[gm], _GM_T, _GM_C)
    mg[gm] = np.interp(teff[gm], _GM_T, _GM_G) + rng.normal(0, 0.5, gm.sum())
    w12[gm] = -0.05 - 0.05 * (c0[gm] - 1.9)  # CO absorption in W2
    c0[hot] = np.interp(teff[hot], _HOT_T, _HOT_C)
    mg[hot] = np.interp(teff[hot], _HOT_T, _HOT_G) + rng.normal(0, 0.4, hot.sum())
    w12[hot] = 0.0
    c0[wd] = np.interp(teff[wd], _WD_T, _WD_C)
    mg[wd] = np.interp(teff[wd], _WD_T, _WD_G) + rng.normal(0, 0.3, wd.sum())
    w12[wd] = 0.0
    z = truth["rv"] / C_KMS
    c0[gal] = 1.0 + 0.5 * z[gal]
    w12[gal] = 0.1 + 0.005 * truth["extra"]["emission"][gal]
    c0[qso] = 0.6 + rng.normal(0, 0.1, qso.sum())
    w12[qso] = rng.normal(1.0, 0.2, qso.sum())
    gw1 = np.where(c0 > 1.0, 1.35 * c0 + 0.4, 1.75 * c0)
    gw1 = np.where(gal, 2.5 + z, np.where(qso, 3.5, gw1))
    # apparent G from the i-band magnitude the S/N implies (G - i ~ 0.2: rough, documented)
    gmag = obs["imag"] + 0.2 + rng.normal(0, 0.05, n)
    einf = np.exp(rng.normal(np.log(0.12), 0.6, n))
    stars = ~(gal | qso)
    dist = np.full(n, np.nan)
    ebv = einf.copy()
    d = np.full(n, 100.0)
    # distance and reddening depend on each other; this draw keeps the single reference R_G
    # (mspec.cmd.CV18_FIXED) so distances, E(B-V) and hence the spectra are those of
    # SIMULATOR_VERSION 2; the photometry below uses the colour-dependent coefficients
    for _ in range(4):
        ebv_s = einf * (1.0 - np.exp(-d / 400.0))
        d = 10.0 ** ((gmag - mg - CV18_FIXED["G"] * ebv_s + 5.0) / 5.0)
        d = np.clip(np.nan_to_num(d, nan=1000.0), 3.0, 1e5)
    dist[stars] = d[stars]
    ebv[stars] = (einf * (1.0 - np.exp(-d / 400.0)))[stars]
    # redden with the coefficients mspec.cmd de-reddens with (C&V 2018 at the intrinsic
    # colour), so mspec.cmd.deredden recovers c0 and mg exactly
    r_g, r_bp, r_rp = extinction_coefficients(c0, "cv18")
    # G consistent with the final distance: stars that would sit closer than 3 pc (or
    # beyond 100 kpc) are placed there and their G changed, keeping their S/N
    gmag = np.where(stars, mg + 5 * np.log10(np.where(stars, dist, 10.0)) - 5 + r_g * ebv, gmag)
    cobs = c0 + (r_bp - r_rp) * ebv
    g_rp = np.where(cobs < 1.0, 0.6 * cobs, 0.3 + 0.3 * cobs)
    rp = gmag - g_rp
    bp = rp + cobs
    plx_err = 0.015 + 0.012 * 10.0 ** (0.25 * (gmag - 15.0))
    plx_true = np.where(stars, 1000.0 / np.where(stars, dist, 1.0), 0.0)
    plx = plx_true + rng.normal(0, 1, n) * plx_err - 0.017
    poe = plx / plx_err

    def foe(mag, a, b):
        return 1.0857 / (a + b * 10.0 ** (0.4 * (mag - 17.0)))

    g_foe = foe(gmag, 0.0003, 0.0008) * np.exp(rng.normal(0, 0.1, n))
    bp_foe = foe(bp, 0.002, 0.004) * np.exp(rng.normal(0, 0.1, n))
    rp_foe = foe(rp, 0.002, 0.003) * np.exp(rng.normal(0, 0.1, n))
    binary = rng.random(n) < 0.08
    ruwe = np.where(binary, 1.4 + rng.exponential(1.0, n), np.exp(rng.normal(0.0, 0.08, n)))
    ruwe = np.where(gal, ruwe + 0.8, ruwe)
    good = poe > 5
    r_med = np.where(
        good,
        1000.0 / np.where(good, plx, 1.0) * np.exp(rng.normal(0, 0.01, n)),
        np.where(stars, dist, 3000.0) * np.exp(rng.normal(0, 0.3, n)),
    )
    ebv_obs = np.clip(ebv + rng.normal(0, 0.02, n), 0.0, None)
    w1_true = gmag - gw1 - (r_g - R_W1) * ebv
    w2_true = w1_true - w12 - (R_W1 - R_W2) * ebv
    w1_err = np.clip(0.022 + 0.03 * 10.0 ** (0.4 * (w1_true - 15.0)), 0.0, 0.35)
    w2_err = np.clip(0.020 + 0.06 * 10.0 ** (0.4 * (w2_true - 14.5)), 0.0, 0.5)
    w1 = w1_true + rng.normal(0, 1, n) * w1_err
    w2 = w2_true + rng.normal(0, 1, n) * w2_err
    source_id = rng.integers(10**15, 7 * 10**18, n, dtype=np.int64)

    allidx = np.arange(n)
    no_gaia = _choose(rng, round(miss["gaia"] * n), allidx)
    has_gaia = np.setdiff1d(allidx, no_gaia)
    no_dist = _choose(rng, round(miss["distance"] * n), has_gaia)
    no_ebv = _choose(rng, round(miss["ebv"] * n), allidx)
    no_wise = _choose(rng, round(miss["wise"] * n), allidx)
    source_id[no_gaia] = -1
    for arr in (gmag, bp, rp, plx, plx_err, poe, g_foe, bp_foe, rp_foe, ruwe):
        arr[no_gaia] = np.nan
    r_med[no_gaia] = np.nan
    r_med[no_dist] = np.nan
    ebv_obs[no_ebv] = np.nan
    for arr in (w1, w2, w1_err, w2_err):
        arr[no_wise] = np.nan
    return {
        "gaia_source_id": source_id,
        "phot_g_mean_mag": gmag,
        "phot_bp_mean_mag": bp,
        "phot_rp_mean_mag": rp,
        "parallax": plx,
        "parallax_error": plx_err,
        "parallax_over_error": poe,
        "phot_g_mean_flux_over_error": g_foe,
        "phot_bp_mean_flux_over_error": bp_foe,
        "phot_rp_mean_flux_over_error": rp_foe,
        "ruwe": ruwe,
        "r_med_geo": r_med,
        "ebv": ebv_obs,
        "w1": w1,
        "w2": w2,
        "w1_err": w1_err,
        "w2_err": w2_err,
        "_distance": dist,
        "_ebv": ebv,
    }


# -- pixel masks -------------------------------------------------------------------------------
def _draw_masks(rng, n, obs):
    """Per-spectrum mask events (runs of pixels); applied while rendering."""
    _, lam, _, _, sky_pix = _instrument()
    events = []  # (spectrum, first pixel, last pixel + 1, bit, in andmask too)
    # random bad CCD columns
    ncol = rng.poisson(0.15, n)
    for i in np.nonzero(ncol)[0]:
        for _ in range(ncol[i]):
            p0 = int(rng.integers(0, NPIX - 3))
            events.append(
                (i, p0, p0 + int(rng.integers(1, 4)), MASK_BITS["BADCCD"], bool(rng.random() < 0.5))
            )
    # a long bad run on the red CCD (seen in ~5% of real DR7 files)
    for i in np.nonzero(rng.random(n) < 0.03)[0]:
        p0 = int(np.searchsorted(lam, rng.uniform(6900.0, 7800.0)))
        events.append(
            (i, p0, min(NPIX, p0 + int(rng.integers(200, 900))), MASK_BITS["BADCCD"], True)
        )
    # dichroic overlap badly extracted: common in the first data release
    p_dich = np.where(obs["mjd"] <= _RELEASE_END[0][0], 0.4, 0.06)
    for i in np.nonzero(rng.random(n) < p_dich)[0]:
        a = int(np.searchsorted(lam, rng.uniform(5570.0, 5720.0)))
        b = int(np.searchsorted(lam, rng.uniform(5870.0, 5910.0)))
        events.append((i, a, b, MASK_BITS["BADPROFILE"], True))
    # bright sky lines: on nights with poor sky subtraction (~1 in 5 spectra) a few pixels
    # around each line are flagged, the brightest lines most often
    p_line = np.clip(SKY_LINES[:, 1] / 30.0, 0.1, 0.8)
    bad_sky = rng.random(n) < 0.2
    hit = (rng.random((n, p_line.size)) < p_line[None, :]) & bad_sky[:, None]
    for i, k in zip(*np.nonzero(hit)):
        w = int(rng.integers(1, 3))
        events.append(
            (
                i,
                sky_pix[k] - w,
                sky_pix[k] + w + 1,
                MASK_BITS["BRIGHTSKY"],
                bool(rng.random() < 0.3),
            )
        )
    # bad fibre centring occasionally flags the whole blue end
    for i in np.nonzero(rng.random(n) < 0.01)[0]:
        events.append((i, 0, int(rng.integers(100, 600)), MASK_BITS["BADCENTER"], False))
    if not events:
        return np.zeros((0, 5), dtype=np.int64)
    return np.array(events, dtype=np.int64)


# -- rendering ---------------------------------------------------------------------------------
def _row_median(values, valid):
    """Median of the ``valid`` entries of each row (0 where a row has none; never negative)."""
    if values.shape[1] == 0:
        return np.zeros(values.shape[0])
    v = np.sort(np.where(valid, values, np.inf), axis=1)
    k = valid.sum(axis=1)
    lo = np.take_along_axis(v, np.maximum((k - 1) // 2, 0)[:, None], axis=1)[:, 0]
    hi = np.take_along_axis(v, np.minimum(k // 2, v.shape[1] - 1)[:, None], axis=1)[:, 0]
    med = np.where(k > 0, 0.5 * (lo + hi), 0.0)
    return np.maximum(np.nan_to_num(med, nan=0.0, posinf=0.0), 0.0)


def _render_survey(truth, obs, xm, masks, r_noise, noiseless, telluric, chunk_size):
    n = truth["class"].size
    loglam, lam, thr, sky, _ = _instrument()
    bands = _band_slices(lam)
    flux = np.empty((n, NPIX), dtype=np.float32)
    ivar = np.empty((n, NPIX), dtype=np.float32)
    ormask = np.zeros((n, NPIX), dtype=np.int32)
    andmask = np.zeros((n, NPIX), dtype=np.int32)
    snrs = {b: np.zeros(n) for b in SDSS_BANDS}
    iband = bands["i"]
    xleg = np.linspace(-1.0, 1.0, NPIX)
    leg = np.stack([xleg, 1.5 * xleg**2 - 0.5, 2.5 * xleg**3 - 1.5 * xleg])  # P1..P3
    ev_row = masks[:, 0] if masks.size else np.zeros(0, dtype=np.int64)
    pix = np.arange(NPIX)
    ext_curve = sm.ccm_extinction(lam, np.ones(1))[0]  # A_lambda / E(B-V)
    tau_o2, tau_h2o = _telluric_tau() if telluric else (np.zeros(NPIX), np.zeros(NPIX))
    for start in range(0, n, chunk_size):
        sl = slice(start, min(n, start + chunk_size))
        m = sl.stop - sl.start
        f = _render(
            truth["kind"][sl],
            truth["teff"][sl],
            truth["logg"][sl],
            np.nan_to_num(truth["m_h"][sl]),
            np.nan_to_num(truth["alpha_m"][sl]),
            truth["rv"][sl],
            truth["active"][sl],
            truth["ew_halpha"][sl],
            loglam,
            {k: v[sl] for k, v in truth["extra"].items()},
        )
        # sky level reference: the object's i-band median before reddening/tellurics/response
        med0 = np.median(f[:, iband], axis=1) * obs["scale"][sl]
        # interstellar reddening, flux calibration response, telluric absorption, LAMOST scale
        logfac = -0.4 * np.log(10.0) * xm["_ebv"][sl, None] * ext_curve[None, :]
        for j in range(leg.shape[0]):  # elementwise, not BLAS: identical for any chunking
            logfac += obs["resp"][sl, j, None] * leg[j]
        logfac += _systematic_response(obs, sl, lam, xleg)
        logfac -= obs["airmass"][sl, None] * (tau_o2 + obs["pwv"][sl, None] * tau_h2o)
        f *= np.exp(logfac)
        f *= obs["scale"][sl, None]
        # variance: object + sky photons through the throughput, set to hit the target S/N_i
        med = np.median(f[:, iband], axis=1)
        var_shape = (np.maximum(f, 0.0) + obs["sky_rel"][sl, None] * med[:, None] * sky) / thr
        var_shape += 1e-4 * med[:, None] ** 2  # read noise / flat-field floor
        s_now = np.median(f[:, iband] / np.sqrt(var_shape[:, iband]), axis=1)
        k = (obs["snr_target"][sl] / s_now) ** 2
        var = var_shape / k[:, None]
        iv = 1.0 / var
        level = obs["sky_rel"][sl] * med0  # sky level (flux units)
        f += _sky_residual(obs, sl, level)  # systematic: in the noiseless flux too
        om = np.zeros((m, NPIX), dtype=np.int32)
        am = np.zeros((m, NPIX), dtype=np.int32)
        pad = pix[None, :] >= obs["npix"][sl, None]
        om[pad] |= MASK_BITS["NODATA"]
        am[pad] |= MASK_BITS["NODATA"]
        sel = np.nonzero((ev_row >= sl.start) & (ev_row < sl.stop))[0]
        spikes = []
        for i, a, b, bit, both in masks[sel]:
            a, b = max(a, 0), min(b, NPIX)
            om[i - sl.start, a:b] |= bit
            if both:
                am[i - sl.start, a:b] |= bit
            if bit == MASK_BITS["BADCCD"] and b - a <= 3:
                spikes.append((i - sl.start, a, b))
            if bit == MASK_BITS["BRIGHTSKY"]:  # poorly subtracted sky line: a real residual
                r = i - sl.start
                f[r, a:b] += obs["sky_bad"][i] * level[r] * _sky_line_support()[1][a:b]
        zero = (am != 0) | pad
        zero[:, :229] |= obs["blue_dead"][sl, None]
        # reported S/N: LAMOST-style median of flux * sqrt(ivar) over good pixels per band
        for bname, bsel in bands.items():
            with np.errstate(all="ignore"):
                q = f[:, bsel] * np.sqrt(iv[:, bsel])
            snrs[bname][sl] = _row_median(q, ~zero[:, bsel])
        if not noiseless:
            noise = r_noise.standard_normal((m, NPIX))
            f = f + noise * np.sqrt(var)
            for r, a, b in spikes:  # hot columns / cosmic-ray residue under the BADCCD flag
                f[r, a:b] += 20.0 * np.sqrt(var[r, a:b]) * (1.0 + np.abs(noise[r, a:b]))
        iv = np.where(zero, 0.0, iv)
        f = np.where(pad, np.nan, f)
        flux[sl] = f
        ivar[sl] = iv
        ormask[sl] = om
        andmask[sl] = am
    return flux, ivar, ormask, andmask, snrs


# -- LAMOST pipeline outputs -------------------------------------------------------------------
_WRONG_TYPE = {
    "dM": ["K7", "K5"],
    "gM": ["K5", "K7"],
    "K": ["M0", "G5", "G8"],
    "G": ["F9", "K0", "G0"],
    "F": ["A7", "G0", "F0"],
    "A": ["F0", "B9", "A1"],
    "OB": ["A0", "A1"],
    "DA": ["M2", "A0"],
    "DB": ["B9", "A0"],
    "DC": ["M3", "F0"],
}


def _draw_pipeline(rng, n, truth, obs, snrs, miss, perr):
    kind, cls = truth["kind"], truth["class"]
    snr_i = np.maximum(snrs["i"], 0.1)
    lclass = np.where(cls == "GALAXY", "GALAXY", np.where(cls == "QSO", "QSO", "STAR")).astype(
        "<U8"
    )
    sub = np.empty(n, dtype="<U8")
    st_noise = rng.normal(0, 1, n) * (0.35 + 3.0 / snr_i)
    dm, gm = kind == "dM", kind == "gM"
    sub[dm] = _m_subclass(
        sm.dwarf_subtype(truth["teff"][dm]) + st_noise[dm], np.zeros(dm.sum(), bool)
    )
    sub[gm] = _m_subclass(
        sm.giant_subtype(truth["teff"][gm]) + st_noise[gm], np.ones(gm.sum(), bool)
    )
    hot = np.isin(kind, ["OB", "A", "F", "G", "K"])
    sub[hot] = _hot_subclass(truth["teff"][hot] * (1.0 + 0.03 * st_noise[hot]))
    sub[np.isin(kind, ["DA", "DB", "DC"])] = "WD"
    sub[np.isin(kind, ["GALAXY", "QSO"])] = ""

    # redshift / RV with LAMOST-like errors (offset -4 km/s; ~4 km/s floor, worse at low S/N)
    rv_t = truth["rv"]
    z_t = rv_t / C_KMS
    sig = np.sqrt(4.0**2 + (150.0 / snr_i) ** 2)
    # the pilot survey (before MJD 55940) had a poorer wavelength calibration
    sig = np.where(obs["mjd"] < MJD_RV_RELIABLE, np.hypot(sig, 15.0), sig)
    star = ~np.isin(kind, ["GALAXY", "QSO"])
    rv_l = np.where(star, rv_t - 4.0 + rng.normal(0, 1, n) * sig, np.nan)
    zsig = np.where(kind == "QSO", 3e-4, 5e-5) * (1.0 + z_t)
    z_l = np.where(star, rv_l / C_KMS, z_t + rng.normal(0, 1, n) * zsig)
    zerr = np.where(star, sig / C_KMS, zsig) * np.exp(rng.normal(0, 0.2, n))

    allidx = np.arange(n)
    fail = _choose(rng, round(miss["lamost_z"] * n), allidx, weights=1.0 / snr_i**2)
    ok = np.setdiff1d(allidx, fail)
    # dM <-> gM luminosity-class swaps
    swap_d = _choose(rng, round(perr["dm_to_gm"] * np.count_nonzero(dm[ok])), ok[dm[ok]])
    swap_g = _choose(rng, round(perr["gm_to_dm"] * np.count_nonzero(gm[ok])), ok[gm[ok]])
    as_m = np.char.startswith(sub[swap_d], "M")
    sub[swap_d] = np.char.add("g", np.where(as_m, sub[swap_d], "M0"))
    sub[swap_g] = np.char.lstrip(sub[swap_g], "g")
    # wrong types
    pool = np.setdiff1d(ok, np.concatenate([swap_d, swap_g]))
    wrong = _choose(rng, round(perr["type"] * ok.size), pool)
    for i in wrong:
        k = kind[i]
        if k in _WRONG_TYPE:
            sub[i] = _WRONG_TYPE[k][int(rng.integers(len(_WRONG_TYPE[k])))]
            lclass[i] = "STAR"
        elif k == "GALAXY":
            if rng.random() < 0.5:
                lclass[i], sub[i] = "QSO", ""
            else:
                lclass[i], sub[i] = "STAR", "K5"
                rv_l[i] = rng.normal(0, 30)
                z_l[i] = rv_l[i] / C_KMS
        else:  # QSO
            if rng.random() < 0.5:
                lclass[i], sub[i] = "GALAXY", ""
                z_l[i] = rng.uniform(0.02, 0.4)
            else:
                lclass[i], sub[i] = "STAR", "A0"
                rv_l[i] = rng.normal(0, 30)
                z_l[i] = rv_l[i] / C_KMS
    # catastrophic stellar RVs
    spool = ok[star[ok]]
    cat = _choose(rng, round(perr["rv"] * spool.size), spool)
    off = rng.uniform(100.0, 500.0, cat.size) * rng.choice([-1.0, 1.0], cat.size)
    rv_l[cat] += off
    z_l[cat] = rv_l[cat] / C_KMS
    rv_out = z_l * C_KMS
    lclass[fail], sub[fail] = "Unknown", "Non"
    for arr in (z_l, zerr, rv_out):
        arr[fail] = np.nan
    return {
        "lamost_class": lclass,
        "lamost_subclass": sub,
        "lamost_z": z_l,
        "lamost_z_err": zerr,
        "lamost_rv": rv_out,
    }
