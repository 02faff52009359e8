"""Spectral models behind :mod:`mspec.simulate` (private; see ``docs/simulator.md``).

Stars (OB..M) come from the processed real templates in :mod:`mspec.simulate.bank`; white dwarfs,
galaxies and QSOs are analytic. Every function works on a batch: parameters are 1-D arrays
of length ``n`` and spectra are ``(n, npix)`` arrays on an observed-frame log10-wavelength
grid. All fluxes are flux densities per Angstrom with unit mean over 5000-9000 A (rest frame
for stars, observed frame for galaxies and QSOs), before extinction and flux calibration.
"""

from __future__ import annotations

import numpy as np
from scipy.special import erf

from mspec.simulate import bank as sb
from mspec.variables import C_KMS, DLOGLAM

HC_K = 1.438777e8  # h c / k in Angstrom * K
FWHM_SIGMA = 2.3548200450309493

#: Vacuum rest wavelengths (A) used by the models.
HALPHA, HBETA, CA_K, CA_H = 6564.61, 4862.68, 3934.78, 3969.59
BALMER = np.array([6564.61, 4862.68, 4341.68, 4102.89, 3971.20, 3890.17])

GROUP_INDEX = {g: np.array([k for k, f in enumerate(sb.FEATURES) if f[1] == g]) for g in sb.GROUPS}


# -- relations --------------------------------------------------------------------------------
def dwarf_subtype(teff):
    """M-dwarf spectral subtype (-2 = K5, -1 = K7, 0..9 = M0..M9) for Teff (K)."""
    return np.interp(-np.asarray(teff, float), -sb.DWARF_TEFF, sb.DWARF_SUBTYPES)


def giant_subtype(teff):
    """Spectral subtype (0..7 = M0 III..M7 III) for an M giant of Teff (K)."""
    return np.interp(-np.asarray(teff, float), -sb.GIANT_TEFF, sb.GIANT_SUBTYPES)


def dwarf_teff(subtype):
    """Inverse of :func:`dwarf_subtype`."""
    return np.interp(np.asarray(subtype, float), sb.DWARF_SUBTYPES, sb.DWARF_TEFF)


def giant_teff(subtype):
    """Inverse of :func:`giant_subtype`."""
    return np.interp(np.asarray(subtype, float), sb.GIANT_SUBTYPES, sb.GIANT_TEFF)


_MS_TEFF = np.array([2350.0, 2550, 2900, 3120, 3300, 3500, 3650, 3950, 4150, 4450, 5250, 6000])
_MS_LOGG = np.array([5.30, 5.25, 5.15, 5.05, 4.97, 4.87, 4.80, 4.67, 4.62, 4.60, 4.55, 4.40])


def ms_logg(teff):
    """Solar-metallicity main-sequence log g (cgs) for Teff (K), used as the dwarf reference."""
    return np.interp(np.asarray(teff, float), _MS_TEFF, _MS_LOGG)


def giant_logg(teff):
    """Typical M-giant log g (cgs) for Teff (K): M0 III ~1.55 down to M7 III ~0.15."""
    return 1.55 - (3900.0 - np.asarray(teff, float)) / 800.0 * 1.4


# -- stars from the bank ------------------------------------------------------------------
#: Chemistry of the M-star models (simulator version 2; sources in docs/simulator.md).
#: ln(depth factor) per dex of [M/H] of the TiO bands: tuned so that zeta_TiO/CaH (Lepine et
#: al. 2007) changes by ~0.6 per dex, the slope of the zeta-[Fe/H] calibrations of Woolf et
#: al. (2009), Mann et al. (2013) and Lepine et al. (2013) ([Fe/H] ~ 1.3-1.6 zeta + const).
K_TIO_MH = 0.45
#: CaH is nearly metallicity-blind at fixed Teff (Woolf et al. 2009: CaH2 traces Teff):
#: the feature term cancels most of the envelope term below.
K_CAH_MH = -0.15
#: All absorption (line blanketing, atomic lines) relative to the upper envelope.
K_ENV_MH = 0.3
#: Extra strength of the strong atomic lines (K I, Na I, Ca II triplet) per dex of [M/H].
K_ATOM_MH = 0.5
#: [alpha/M]: ln(depth factor) per dex for the alpha-element features. Atomic Mg I b and Ca I
#: lines on the square-root part of the curve of growth (EW ~ sqrt(abundance): 0.5 ln 10 =
#: 1.15); TiO (Ti and O are both alpha elements), CaH and the Ca II triplet.
K_ALPHA = {"TiO": 1.0, "CaH": 0.5, "CaII": 0.8, "MgI": 1.15, "CaI": 1.15}


def m_setup(bank: sb.Bank, teff, logg, m_h, alpha_m, giant):
    """Template indices/weights and line-strength coefficients for M (and late-K) stars.

    Linear interpolation in spectral subtype between the solar-metallicity real templates
    (the subtype from Teff by the dwarf or giant relation); [M/H], [alpha/M] and gravity act
    parametrically on the log-depths of the feature windows (:data:`mspec.simulate.bank.
    FEATURES`) and of all absorption (the envelope term). ``giant`` selects the giant
    Teff-subtype relation and the Table-3 gravity signatures (weaker CaH, K I, Na I,
    stronger Ca II triplet). Returns ``idx (n,2), w (n,2), feat_coef (n,nfeat), env_coef (n,)``.
    """
    teff, logg, m_h, alpha_m = (np.asarray(a, float) for a in (teff, logg, m_h, alpha_m))
    giant = np.asarray(giant, bool)
    st = np.where(giant, giant_subtype(teff), dwarf_subtype(teff))
    st = np.clip(st, sb.DWARF_SUBTYPES[0], sb.DWARF_SUBTYPES[-1])
    si = np.clip(np.floor(st - sb.DWARF_SUBTYPES[0]).astype(int), 0, sb.DWARF_SUBTYPES.size - 2)
    sf = st - sb.DWARF_SUBTYPES[si]
    # the solar-[Fe/H] node of each subtype (the nearest available template to [Fe/H] = 0):
    # the library's other [Fe/H] variants are few-star co-adds with photometric [Fe/H] and a
    # non-monotonic zeta, so metallicity is modelled parametrically instead (version 2)
    sol = int(np.argmin(np.abs(sb.FEH_NODES)))
    idx = np.stack([bank.mgrid[si, sol], bank.mgrid[si + 1, sol]], axis=1)
    w = np.stack([1 - sf, sf], axis=1)
    env_coef = np.exp(K_ENV_MH * m_h) - 1.0
    # gravity relative to the main sequence (dwarfs), metallicity and alpha, per feature group
    dg = np.where(giant, 0.0, logg - ms_logg(teff))
    lna = {
        "TiO": K_TIO_MH * m_h + K_ALPHA["TiO"] * alpha_m,
        "CaH": K_CAH_MH * m_h
        + 0.8 * dg
        + K_ALPHA["CaH"] * alpha_m
        + np.where(giant, np.log(0.15), 0.0),
        "VO": np.zeros_like(teff),
        "KI": 1.0 * dg + K_ATOM_MH * m_h + np.where(giant, np.log(0.25), 0.0),
        "NaI": 1.0 * dg + K_ATOM_MH * m_h + np.where(giant, np.log(0.2), 0.0),
        # giants: the extra, gravity-driven Ca II strength is added by giant_ca_triplet
        "CaII": -0.8 * dg + K_ATOM_MH * m_h + K_ALPHA["CaII"] * alpha_m,
        "MgI": K_ALPHA["MgI"] * alpha_m,
        "CaI": K_ALPHA["CaI"] * alpha_m,
    }
    feat = np.zeros((teff.size, len(sb.FEATURES)))
    for g, cols in GROUP_INDEX.items():
        feat[:, cols] = (np.exp(lna[g]) - 1.0)[:, None]
    return idx, w, feat, env_coef


CA_TRIPLET = np.array([8500.36, 8544.44, 8664.52])
#: Extra Ca II triplet equivalent widths (A) of an M giant at log g = 1.5, [M/H] = 0.
GIANT_CA_EW = np.array([1.0, 2.2, 1.8])


def giant_ca_triplet(loglam, rv, logg, m_h):
    """Transmission of the extra Ca II triplet absorption of M giants (Table 3: 'Deep').

    Gaussian lines (intrinsic sigma 3 A plus the instrument) whose equivalent widths grow
    as log g falls and [M/H] rises, added on top of the template's own (dwarf) lines.
    """
    lam = 10.0 ** (loglam[None, :] - sb.doppler_shift(rv)[:, None])
    scale = np.clip(
        (1.0 + 0.5 * (1.5 - np.asarray(logg, float))) * np.exp(0.5 * np.asarray(m_h, float)),
        0.3,
        4.0,
    )
    tau = np.zeros_like(lam)
    for line, ew in zip(CA_TRIPLET, GIANT_CA_EW):
        sig = np.hypot(3.0, inst_sigma(line))
        tau += (ew * scale / (np.sqrt(2 * np.pi) * sig))[:, None] * np.exp(
            -0.5 * ((lam - line) / sig) ** 2
        )
    return np.exp(-tau)


def hot_setup(bank: sb.Bank, teff, m_h, alpha_m):
    """Template indices/weights (interpolation in log Teff) for OB/A/F/G/K stars."""
    teff = np.asarray(teff, float)
    lt = np.log10(bank.hot_teff)[::-1]  # ascending
    x = np.clip(np.log10(teff), lt[0], lt[-1])
    i = np.clip(np.searchsorted(lt, x) - 1, 0, lt.size - 2)
    f = (x - lt[i]) / (lt[i + 1] - lt[i])
    order = bank.hot_index[::-1]
    idx = np.stack([order[i], order[i + 1]], axis=1)
    w = np.stack([1 - f, f], axis=1)
    # metal lines scale with [M/H] (weakly for hot stars whose lines are mostly H, He)
    k = np.where(teff > 7500.0, 0.3, 0.9)
    env_coef = np.exp(k * np.asarray(m_h, float) + 0.3 * np.asarray(alpha_m, float)) - 1.0
    return idx, w, env_coef


# -- analytic pieces --------------------------------------------------------------------------
def planck(lam, teff):
    """Planck f_lambda shape (arbitrary units) at wavelengths ``lam`` (A) for ``teff`` (K)."""
    x = HC_K / (lam * teff)
    return 1.0 / (lam / 5000.0) ** 5 / np.expm1(np.minimum(x, 700.0))


def pixel_edges(loglam):
    """Wavelength (A) edges of pixels centred on ``loglam`` (width ``DLOGLAM`` dex)."""
    return 10.0 ** (loglam - 0.5 * DLOGLAM), 10.0 ** (loglam + 0.5 * DLOGLAM)


def gauss_pixels(lo, hi, centre, sigma, flux, nsig=6.0):
    """Pixel averages of Gaussian lines of integrated ``flux`` (per-A density).

    ``lo, hi`` are ``(npix,)`` ascending pixel edges (A); ``centre, sigma, flux`` are
    ``(n,)``. Only pixels within ``nsig`` sigma of each centre are evaluated.
    """
    centre, sigma, flux = (np.asarray(a, float) for a in (centre, sigma, flux))
    n, npix = centre.size, lo.size
    out = np.zeros((n, npix))
    first = np.searchsorted(hi, centre - nsig * sigma)
    last = np.searchsorted(lo, centre + nsig * sigma)
    width = int(np.max(last - first, initial=0)) + 1
    if width <= 1 and not np.any(last > first):
        return out
    cols = np.clip(first[:, None] + np.arange(width)[None, :], 0, npix - 1)
    s = np.sqrt(2.0) * sigma[:, None]
    frac = 0.5 * (erf((hi[cols] - centre[:, None]) / s) - erf((lo[cols] - centre[:, None]) / s))
    vals = flux[:, None] * frac / (hi[cols] - lo[cols])
    # clipped columns repeat the edge pixel: keep each pixel once
    # (and only each row's own window, so results do not depend on the other rows)
    j = first[:, None] + np.arange(width)[None, :]
    keep = (j < npix) & (j <= last[:, None])
    rows = np.broadcast_to(np.arange(n)[:, None], cols.shape)
    out[rows[keep], cols[keep]] = vals[keep]
    return out


def inst_sigma(lam):
    """Instrumental Gaussian sigma (A) at wavelength ``lam`` for R~1800."""
    return np.asarray(lam, float) / (sb.R_LAMOST * FWHM_SIGMA)


#: He I lines of DB white dwarfs (vacuum A), relative depth, HWHM (A).
HE_I = [
    (4027.3, 0.6, 12.0),
    (4389.2, 0.5, 10.0),
    (4472.7, 1.0, 15.0),
    (4923.3, 0.6, 12.0),
    (5017.1, 0.5, 10.0),
    (5877.2, 0.9, 14.0),
    (6679.9, 0.5, 12.0),
    (7067.1, 0.4, 10.0),
]


def white_dwarf(loglam, teff, logg, rv, wd_type):
    """White dwarf, observed frame: ``wd_type`` per spectrum ``"DA"`` (pressure-broadened
    Balmer lines), ``"DB"`` (He I lines, strongest near 22000 K) or ``"DC"`` (featureless)."""
    teff, logg = np.asarray(teff, float)[:, None], np.asarray(logg, float)[:, None]
    wd_type = np.asarray(wd_type).astype(str)[:, None]
    lam = 10.0 ** (loglam[None, :] - sb.doppler_shift(rv)[:, None])
    cont = planck(lam, teff)
    ref = planck(np.linspace(5000.0, 9000.0, 81)[None, :], teff).mean(axis=1, keepdims=True)
    tau = np.zeros_like(lam)
    h = 0.9 * np.exp(-((np.log10(teff / 13000.0) / 0.25) ** 2))
    h = np.where(wd_type == "DA", h, 0.0)
    depth = np.array([1.0, 1.3, 1.25, 1.1, 0.9, 0.7])
    hwhm = np.array([30.0, 35.0, 32.0, 28.0, 22.0, 16.0])
    width = (1.0 + 0.5 * (logg - 8.0)) * (0.6 + h)
    for line, d, w in zip(BALMER, depth, hwhm):
        tau += h * d / (1.0 + ((lam - line) / (w * width)) ** 2)
    he = 0.6 * np.exp(-((np.log10(teff / 22000.0) / 0.15) ** 2))
    he = np.where(wd_type == "DB", he, 0.0)
    for line, d, w in HE_I:
        tau += he * d / (1.0 + ((lam - line) / (w * (1.0 + 0.5 * (logg - 8.0)))) ** 2)
    return cont * np.exp(-tau) / ref


def galaxy(loglam, z, tcont, d4000, passive, emission, sigma_v):
    """Galaxy: old/young stellar continuum with a 4000 A break, absorption and emission lines.

    Parameters are ``(n,)`` arrays: redshift, continuum colour temperature (K), D4000 break
    amplitude, passive fraction 0..1 (absorption strength), H-alpha emission EW (A, rest) and
    velocity dispersion (km/s).
    """
    z = np.asarray(z, float)
    lam = 10.0 ** (loglam[None, :] - np.log10(1.0 + z)[:, None])

    def cont_fn(lr):
        c = planck(lr, tcont[:, None])
        step = 1.0 / (1.0 + np.exp(-(4000.0 - lr) / 25.0))
        return c * (1.0 - (1.0 - 1.0 / d4000[:, None]) * step)

    cont = cont_fn(lam)
    ref = cont_fn(np.linspace(5000.0, 9000.0, 81)[None, :] / (1.0 + z[:, None])).mean(
        axis=1, keepdims=True
    )
    # (line, EW in A for a fully passive galaxy, intrinsic width in A: blends are broad)
    absl = [
        (3934.78, 8.0, 0.0),
        (3969.59, 6.0, 0.0),
        (4305.0, 5.0, 10.0),
        (5176.7, 4.0, 6.0),
        (5895.6, 3.0, 0.0),
    ]
    a = np.zeros_like(lam)
    for line, ew, extra in absl:
        sig = np.sqrt((line * sigma_v / C_KMS) ** 2 + inst_sigma(line) ** 2 + extra**2)
        a += (ew * passive / (np.sqrt(2 * np.pi) * sig))[:, None] * np.exp(
            -0.5 * ((lam - line) / sig[:, None]) ** 2
        )
    flux = cont * np.clip(1.0 - a, 0.05, None)
    lo, hi = pixel_edges(loglam)
    ems = [
        (6564.61, 1.0),
        (6585.27, 0.40),
        (6549.86, 0.13),
        (4862.68, 0.30),
        (5008.24, 0.25),
        (4960.29, 0.083),
        (3727.09, 0.30),
        (3729.88, 0.40),
        (6718.29, 0.15),
        (6732.67, 0.11),
    ]
    for line, ratio in ems:
        lc = cont_fn(np.full((1, 1), line))[:, 0]
        sig = np.sqrt((line * sigma_v / C_KMS) ** 2 + inst_sigma(line) ** 2) * (1.0 + z)
        flux = flux + gauss_pixels(lo, hi, line * (1.0 + z), sig, emission * ratio * lc * (1.0 + z))
    return flux / ref


def qso(loglam, z, slope, fwhm_v, ew_scale):
    """QSO: power-law continuum, broad and narrow emission lines, a Lyman-alpha forest."""
    z = np.asarray(z, float)
    lam = 10.0 ** (loglam[None, :] - np.log10(1.0 + z)[:, None])

    def cont_fn(lr):
        return (lr / 3000.0) ** slope[:, None]

    cont = cont_fn(lam)
    ref = cont_fn(np.linspace(5000.0, 9000.0, 81)[None, :] / (1.0 + z[:, None])).mean(
        axis=1, keepdims=True
    )
    lo, hi = pixel_edges(loglam)
    lines = [
        (1215.67, 90.0, 1.0),
        (1240.14, 15.0, 1.0),
        (1399.8, 8.0, 1.0),
        (1549.06, 35.0, 1.0),
        (1908.73, 20.0, 1.0),
        (2799.12, 30.0, 1.0),
        (4102.89, 5.0, 1.0),
        (4341.68, 12.0, 1.0),
        (4862.68, 50.0, 1.0),
        (5008.24, 12.0, 0.12),
        (4960.29, 4.0, 0.12),
        (6564.61, 200.0, 1.0),
    ]
    flux = cont.copy()
    for line, ew, narrow in lines:
        lc = cont_fn(np.full((1, 1), line))[:, 0]
        sig_v = fwhm_v * narrow / FWHM_SIGMA
        sig = np.sqrt((line * sig_v / C_KMS) ** 2 + inst_sigma(line) ** 2) * (1.0 + z)
        flux = flux + gauss_pixels(lo, hi, line * (1.0 + z), sig, ew * ew_scale * lc * (1.0 + z))
    # mean Lyman-alpha forest transmission blueward of Ly-alpha (Faucher-Giguere et al. 2008)
    lam_obs = 10.0 ** loglam[None, :]
    forest = lam < 1215.67
    tau = 0.0018 * (lam_obs / 1215.67) ** 3.92
    flux = np.where(forest, flux * np.exp(-tau), flux)
    return flux / ref


def ccm_extinction(lam, ebv, rv=3.1):
    """Cardelli, Clayton & Mathis (1989) A_lambda (mag) for E(B-V) ``ebv`` (n,) at ``lam`` (A)."""
    x = 1e4 / np.asarray(lam, float)
    y = x - 1.82
    a = 1 + y * (
        0.17699
        + y
        * (-0.50447 + y * (-0.02427 + y * (0.72085 + y * (0.01979 + y * (-0.77530 + y * 0.32999)))))
    )
    b = y * (
        1.41338
        + y
        * (2.28305 + y * (1.07233 + y * (-5.38434 + y * (-0.62251 + y * (5.30260 - y * 2.09002)))))
    )
    ir = x < 1.1
    a = np.where(ir, 0.574 * x**1.61, a)
    b = np.where(ir, -0.527 * x**1.61, b)
    return np.asarray(ebv, float)[:, None] * (a * rv + b)[None, :]
