"""Processed template bank for the survey simulator (private; see ``docs/simulator.md``).

The real PyHammer templates (SDSS/BOSS co-adds, vacuum, rest frame, R~2000; by default the
library packaged with mspec, :func:`mspec.data.packaged_templates`) are put once on a
fine uniform log10-wavelength grid (``DG = 1e-5`` dex), smoothed to LAMOST resolution
(R~1800) and box-averaged over one native LAMOST pixel (1e-4 dex). A bank value at ``x`` is
then the flux a native pixel centred on ``x`` records, so an observed pixel of a star with
Doppler shift ``s = log10(1 + v/c)`` is the bank evaluated at ``loglam - s``: the shift is
exact and the resampling flux-conserving (up to linear interpolation on the fine grid).

Besides the flux ``T`` the bank holds, for every template, two log-depth arrays used for the
parametric line-strength dependences: ``log(T / C_k)`` inside each feature window ``k``
(``C_k`` a local pseudo-continuum from anchor windows) and ``log(T / C_env)`` everywhere
(``C_env`` an upper envelope). Scaling a log-depth by ``a`` scales the optical depth of the
feature by ``a``.
"""

from __future__ import annotations

import functools
import math
import threading

import numpy as np

from mspec.variables import C_KMS, DLOGLAM

#: Fine grid of the bank: log10(lambda/A) = G0 + DG * k, k = 0..NF-1 (3630.8 - 9549.9 A).
G0 = 3.5600
DG = 1e-5
NF = 42001
#: LAMOST resolving power adopted and the PyHammer templates' own.
R_LAMOST = 1800.0
R_TEMPLATES = 2000.0

#: Spectral-type <-> Teff relation adopted for M dwarfs (subtype -2 = K5, -1 = K7, 0..9 =
#: M0..M9). M0-M4: calibrated on the real LAMOST DR7 M dwarfs with literature Teff in
#: ``../shared/data/lamost_dr7_mdwarfs`` (simulator version 2): each real spectrum's
#: CaH2/CaH3/TiO5 give its model subtype, and a Theil-Sen fit of literature Teff on that
#: subtype gives Teff = 3967 - 178 * subtype (29 stars, robust scatter 153 K); M5-M9 keep the
#: previous steps (Mann et al. 2015 spacing), K7/K5 the Pecaut & Mamajek (2013) values. See
#: docs/simulator.md.
DWARF_SUBTYPES = np.array([-2.0, -1.0, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9])
DWARF_TEFF = np.array([4450.0, 4150.0, 3970, 3790, 3610, 3430, 3250, 3070, 2860, 2670, 2530, 2340])
#: M giants (van Belle et al. 1999; Perrin et al. 1998): M0 III ... M7 III.
GIANT_SUBTYPES = np.array([0.0, 1, 2, 3, 4, 5, 6, 7])
GIANT_TEFF = np.array([3900.0, 3810, 3730, 3640, 3560, 3420, 3250, 3100])

#: Non-M templates in Teff order (adopted Teff, Pecaut & Mamajek 2013 dwarfs).
HOT_TEMPLATES = [
    ("B3", 17000.0),
    ("B6", 14000.0),
    ("A0", 9600.0),
    ("A6_+0.0_Dwarf", 8000.0),
    ("F0_+0.0_Dwarf", 7200.0),
    ("F5_+0.0_Dwarf", 6500.0),
    ("G0_+0.0_Dwarf", 5900.0),
    ("G5_+0.0_Dwarf", 5650.0),
    ("K0_+0.0_Dwarf", 5250.0),
    ("K3_+0.0_Dwarf", 4850.0),
    ("K5_+0.0_Dwarf", 4450.0),
    ("K7_+0.0_Dwarf", 4150.0),
    ("M0_+0.0_Dwarf", 3950.0),
]
FEH_NODES = np.array([-1.0, -0.5, 0.0, 0.5, 1.0])

#: Feature windows (vacuum, rest frame, Angstrom): name, group, window, anchor windows
#: (one anchor: constant pseudo-continuum, two: a straight line between them).
FEATURES = [
    ("MgI_5175", "MgI", (5160.0, 5192.0), [(5140.0, 5156.0), (5196.0, 5210.0)]),
    ("CaI_6110", "CaI", (6098.0, 6128.0), [(6085.0, 6096.0), (6130.0, 6142.0)]),
    ("TiO_6160", "TiO", (6160.0, 6280.0), [(6125.0, 6150.0)]),
    ("CaI_6450", "CaI", (6436.0, 6470.0), [(6425.0, 6434.0), (6472.0, 6482.0)]),
    ("CaH_6830", "CaH", (6800.0, 6866.0), [(7044.0, 7050.0)]),
    ("CaH_7000", "CaH", (6948.0, 7040.0), [(7044.0, 7050.0)]),
    ("TiO_7100", "TiO", (7055.0, 7165.0), [(7044.0, 7050.0)]),
    ("VO_7430", "VO", (7335.0, 7540.0), [(7300.0, 7320.0), (7545.0, 7560.0)]),
    ("KI_7680", "KI", (7657.0, 7712.0), [(7640.0, 7653.0), (7717.0, 7730.0)]),
    ("VO_7900", "VO", (7855.0, 7975.0), [(7835.0, 7850.0), (7980.0, 7995.0)]),
    ("NaI_8190", "NaI", (8176.0, 8206.0), [(8150.0, 8172.0), (8210.0, 8230.0)]),
    ("TiO_8440", "TiO", (8435.0, 8470.0), [(8405.0, 8430.0)]),
    ("CaII_8500", "CaII", (8491.0, 8511.0), [(8475.0, 8488.0), (8515.0, 8528.0)]),
    ("CaII_8544", "CaII", (8534.0, 8556.0), [(8515.0, 8528.0), (8560.0, 8575.0)]),
    ("CaII_8665", "CaII", (8653.0, 8677.0), [(8630.0, 8648.0), (8680.0, 8695.0)]),
]
GROUPS = ["TiO", "CaH", "VO", "KI", "NaI", "CaII", "MgI", "CaI"]
#: Taper (A) at each window edge so scaled features join the unscaled spectrum smoothly.
TAPER_A = 3.0
#: Window (rest, A) whose mean pseudo-continuum sets the H-alpha emission line flux.
HALPHA_CONT = ((6535.0, 6552.0), (6578.0, 6595.0))
_KERNEL_LOCK = threading.Lock()


def fine_grid() -> np.ndarray:
    """Return the bank's fine log10-wavelength grid (float64)."""
    return G0 + DG * np.arange(NF, dtype=np.float64)


def _sigma_fine() -> float:
    """Gaussian sigma (fine pixels) taking the templates from R~2000 to R~1800."""
    fwhm_ln = math.sqrt(1.0 / R_LAMOST**2 - 1.0 / R_TEMPLATES**2)
    return fwhm_ln / math.log(10.0) / 2.354820045 / DG


def _onto_fine(loglam: np.ndarray, flux: np.ndarray) -> np.ndarray:
    """Flux-conserving rebin of a template onto the fine grid, then smooth and pixel-average."""
    from scipy.ndimage import convolve1d, gaussian_filter1d

    good = np.isfinite(flux)
    loglam, flux = loglam[good], flux[good]
    # cumulative integral over log-lambda at the template's pixel edges
    mid = 0.5 * (loglam[1:] + loglam[:-1])
    edges = np.concatenate([[loglam[0] - (mid[0] - loglam[0])], mid, [2 * loglam[-1] - mid[-1]]])
    cum = np.concatenate([[0.0], np.cumsum(flux * np.diff(edges))])
    fe = G0 - 0.5 * DG + DG * np.arange(NF + 1)
    # outside the template use its edge values (never reached for |v| < 4000 km/s)
    c = np.interp(fe, edges, cum)
    lo, hi = fe < edges[0], fe > edges[-1]
    c[lo] = cum[0] - (edges[0] - fe[lo]) * flux[0]
    c[hi] = cum[-1] + (fe[hi] - edges[-1]) * flux[-1]
    f = np.diff(c) / DG
    f = gaussian_filter1d(f, _sigma_fine(), mode="nearest", truncate=5.0)
    # box average over one native pixel (DLOGLAM = 10 fine pixels), exactly centred
    k = round(DLOGLAM / DG)
    box = np.ones(k + 1)
    box[0] = box[-1] = 0.5
    return convolve1d(f, box / k, mode="nearest")


def _window_mean(lam: np.ndarray, f: np.ndarray, lo: float, hi: float) -> float:
    sel = (lam >= lo) & (lam <= hi)
    return float(np.mean(f[sel]))


def _feature_depths(lam: np.ndarray, t: np.ndarray) -> np.ndarray:
    """log(T / C_k) inside each feature window (0 outside), clipped to <= 0."""
    out = np.zeros_like(t)
    for _name, _grp, (lo, hi), anchors in FEATURES:
        sel = (lam >= lo - TAPER_A) & (lam <= hi + TAPER_A)
        if len(anchors) == 1:
            cont = np.full(sel.sum(), _window_mean(lam, t, *anchors[0]))
        else:
            (a0, a1), (b0, b1) = anchors
            ya, yb = _window_mean(lam, t, a0, a1), _window_mean(lam, t, b0, b1)
            xa, xb = 0.5 * (a0 + a1), 0.5 * (b0 + b1)
            cont = ya + (yb - ya) * (lam[sel] - xa) / (xb - xa)
        out[sel] = np.minimum(np.log(t[sel] / np.maximum(cont, 1e-30)), 0.0)
    return out


def _envelope_depth(t: np.ndarray) -> np.ndarray:
    """log(T / upper envelope), clipped to <= 0 (the envelope: running max, then smoothed)."""
    from scipy.ndimage import gaussian_filter1d, maximum_filter1d

    env = maximum_filter1d(t, size=801, mode="nearest")
    env = gaussian_filter1d(env, 300.0, mode="nearest")
    env = np.maximum(env, t)
    return np.minimum(np.log(t / env), 0.0)


def feature_weights() -> tuple[np.ndarray, np.ndarray]:
    """Per fine pixel: feature index (-1 outside every window) and a 0..1 edge taper."""
    lam = 10.0 ** fine_grid()
    fid = np.full(NF, -1, dtype=np.int16)
    wt = np.zeros(NF, dtype=np.float64)
    for k, (_name, _grp, (lo, hi), _anch) in enumerate(FEATURES):
        sel = (lam >= lo - TAPER_A) & (lam <= hi + TAPER_A)
        fid[sel] = k
        x = np.minimum(lam[sel] - (lo - TAPER_A), (hi + TAPER_A) - lam[sel]) / (2 * TAPER_A)
        wt[sel] = np.clip(x, 0.0, 1.0)
    return fid, wt


def _read_template(name: str, directory: str | None) -> tuple[np.ndarray, np.ndarray]:
    """One template's (loglam, flux): the packaged library (default) or ``directory``'s FITS."""
    from pathlib import Path

    from mspec.data import packaged_templates, read_pyhammer

    if directory is None:
        loglam, flux, info = packaged_templates("*")
        names = [i["name"] for i in info]
        if name not in names:
            raise FileNotFoundError(f"no packaged PyHammer template named {name!r}")
        return loglam, np.asarray(flux[names.index(name)], dtype=np.float64)
    p = Path(directory) / f"{name}.fits.gz"
    if not p.is_file():
        p = Path(directory) / f"{name}.fits"
    return read_pyhammer(p)


def _m_templates(directory: str | None) -> list[dict]:
    """Name info (:func:`mspec.data.parse_pyhammer_name`) of the M templates available."""
    from mspec.data import packaged_templates, parse_pyhammer_name, pyhammer_files

    if directory is None:
        return packaged_templates("M*")[2]
    return [parse_pyhammer_name(p) for p in pyhammer_files("M*", directory=directory)]


def _processed(name: str, directory: str | None) -> np.ndarray:
    """One template on the fine grid, smoothed, unit mean over 5000-9000 A."""
    loglam, flux = _read_template(name, directory)
    t = _onto_fine(loglam, flux)
    lam = 10.0 ** fine_grid()
    t = t / _window_mean(lam, t, 5000.0, 9000.0)
    # co-add noise and the faint blue end of late M templates can dip to <= 0
    t = np.maximum(t, 1e-4)
    return t


class Bank:
    """Template bank: ``data[j, k, q]`` for template ``j``, fine pixel ``k``; ``q`` = 0: flux,
    1: feature log-depth, 2: envelope log-depth. Built once per process (see :func:`bank`).

    ``directory=None`` (default) uses the PyHammer library packaged with mspec
    (:func:`mspec.data.packaged_templates`); a directory reads the original FITS files."""

    def __init__(self, directory: str | None = None):
        directory = None if directory is None else str(directory)
        names: list[str] = []
        avail: dict[int, dict[float, str]] = {}
        for info in _m_templates(directory):
            feh = info["feh"]
            avail.setdefault(int(info["subtype"]), {})[0.0 if np.isnan(feh) else feh] = info["name"]
        avail[-1] = {0.0: "K7_+0.0_Dwarf"}
        avail[-2] = {0.0: "K5_+0.0_Dwarf"}
        for _n, _t in HOT_TEMPLATES:
            if _n not in names:
                names.append(_n)
        for sub in sorted(avail):
            for feh in sorted(avail[sub]):
                if avail[sub][feh] not in names:
                    names.append(avail[sub][feh])
        index = {n: j for j, n in enumerate(names)}
        self.names = names
        #: M grid: node (subtype, feh) -> template index; missing [Fe/H] nodes take the
        #: nearest available [Fe/H] of the same subtype (the parametric [M/H] term covers it)
        self.subtypes = DWARF_SUBTYPES.copy()
        self.mgrid = np.zeros((self.subtypes.size, FEH_NODES.size), dtype=np.int64)
        self.feh_lo = np.zeros(self.subtypes.size)
        self.feh_hi = np.zeros(self.subtypes.size)
        for i, sub in enumerate(self.subtypes):
            have = np.array(sorted(avail[int(sub)]))
            self.feh_lo[i], self.feh_hi[i] = have.min(), have.max()
            for m, feh in enumerate(FEH_NODES):
                near = have[np.argmin(np.abs(have - feh))]
                self.mgrid[i, m] = index[avail[int(sub)][float(near)]]
        self.hot_index = np.array([index[n] for n, _t in HOT_TEMPLATES])
        self.hot_teff = np.array([t for _n, t in HOT_TEMPLATES])

        lam = 10.0 ** fine_grid()
        data = np.empty((len(names), NF, 3), dtype=np.float64)
        cont_ha = np.empty(len(names))
        for j, n in enumerate(names):
            t = _processed(n, directory)
            data[j, :, 0] = t
            data[j, :, 1] = _feature_depths(lam, t)
            data[j, :, 2] = _envelope_depth(t)
            (a0, a1), (b0, b1) = HALPHA_CONT
            cont_ha[j] = 0.5 * (_window_mean(lam, t, a0, a1) + _window_mean(lam, t, b0, b1))
        self.data = data
        self._flat = data.reshape(-1, 3)
        self.cont_ha = cont_ha
        self.fid, self.taper = feature_weights()
        data.setflags(write=False)

    # -- evaluation ------------------------------------------------------------------------
    def evaluate(self, idx, weights, shift, loglam, feat_coef=None, env_coef=None):
        """Weighted template combination at ``loglam - shift`` with line-strength scaling.

        Parameters
        ----------
        idx, weights : ndarray (n, q)
            Template indices and weights (rows sum to 1).
        shift : ndarray (n,)
            log10(1 + v/c) per spectrum.
        loglam : ndarray (npix,)
            Observed-frame log10 wavelengths.
        feat_coef : ndarray (n, n_features), optional
            ``a_k - 1``: change of the log-depth of feature ``k``.
        env_coef : ndarray (n,), optional
            ``a - 1`` for the whole-spectrum (metallicity) log-depth.

        Returns
        -------
        ndarray (n, npix), float64
            Flux, unit mean over 5000-9000 A before scaling (numba kernel; see
            :meth:`evaluate_numpy` for the reference).
        """
        from mspec.simulate.kernels import evaluate_bank

        n = idx.shape[0]
        fc = np.zeros((n, len(FEATURES) + 1))
        if feat_coef is not None:
            fc[:, :-1] = feat_coef
        ec = np.zeros(n) if env_coef is None else np.asarray(env_coef, np.float64)
        # numba's fallback 'workqueue' threading layer cannot run parallel kernels from two
        # threads at once: serialise calls (cheap; each call is already multi-threaded)
        with _KERNEL_LOCK:
            return evaluate_bank(
                self._flat,
                NF,
                G0,
                DG,
                np.ascontiguousarray(idx, dtype=np.int64),
                np.ascontiguousarray(weights, dtype=np.float64),
                np.ascontiguousarray(shift, dtype=np.float64),
                np.ascontiguousarray(loglam, dtype=np.float64),
                self.fid,
                self.taper,
                fc,
                ec,
            )

    def evaluate_numpy(self, idx, weights, shift, loglam, feat_coef=None, env_coef=None):
        """Weighted template combination at ``loglam - shift`` with line-strength scaling.

        Parameters
        ----------
        idx, weights : ndarray (n, q)
            Template indices and weights (rows sum to 1).
        shift : ndarray (n,)
            log10(1 + v/c) per spectrum.
        loglam : ndarray (npix,)
            Observed-frame log10 wavelengths.
        feat_coef : ndarray (n, n_features), optional
            ``a_k - 1``: change of the log-depth of feature ``k``.
        env_coef : ndarray (n,), optional
            ``a - 1`` for the whole-spectrum (metallicity) log-depth.

        Returns
        -------
        ndarray (n, npix), float64
            Flux, unit mean over 5000-9000 A before scaling.
        """
        x = (loglam[None, :] - shift[:, None] - G0) / DG
        i0 = np.floor(x).astype(np.int64)
        np.clip(i0, 0, NF - 2, out=i0)
        f = np.clip(x - i0, 0.0, 1.0)[..., None]
        acc = np.zeros(x.shape + (3,))
        for q in range(idx.shape[1]):
            w = weights[:, q]
            if not np.any(w):
                continue
            flat = idx[:, q, None] * NF + i0
            a = self._flat[flat]
            b = self._flat[flat + 1]
            acc += w[:, None, None] * (a + f * (b - a))
        flux = acc[..., 0]
        expo = np.zeros(x.shape)
        if feat_coef is not None:
            fid = self.fid[i0]
            coef = np.concatenate([feat_coef, np.zeros((feat_coef.shape[0], 1))], axis=1)
            expo += (
                np.take_along_axis(coef, fid.astype(np.int64), axis=1)
                * self.taper[i0]
                * acc[..., 1]
            )
        if env_coef is not None:
            expo += env_coef[:, None] * acc[..., 2]
        return flux * np.exp(expo)


@functools.lru_cache(maxsize=2)
def bank(directory: str | None = None) -> Bank:
    """Return the process-wide template bank (built on first use, ~seconds)."""
    return Bank(directory)


def doppler_shift(rv_kms) -> np.ndarray:
    """log10(1 + v/c): the exact log-wavelength shift of lambda_obs = lambda_rest (1 + v/c)."""
    return np.log10(1.0 + np.asarray(rv_kms, dtype=np.float64) / C_KMS)
