"""Failure modes of LAMOST spectra that the RV reconciliation must catch (issue 13).

:func:`apply_failures` alters a simulated survey (the output of
:func:`mspec.simulate.simulate_survey`, which calls it through its ``failures=`` option) and
records what it did in the truth variable ``true_failure`` (one mode per spectrum, ``""``
when untouched). Modes (each applied to a fraction of the M stars, chosen at random,
disjoint):

``red_end_anomaly``
    Calibration-lamp contamination at the red end (Li et al. 2025, Sect. 3.4.3): Ar I arc
    lines at fixed *observed* wavelengths beyond a start wavelength drawn in 7550–7800 Å,
    3–10 times the local continuum in peak height (times a per-line weight 0.4–1), on a
    scattered-light ramp rising to 0.5–2 times the median red flux at 9100 Å. Everything below 7500 Å is untouched, so
    TML7500 still works; the DSAL lines (7667–8665 Å) and TM are corrupted. The LAMOST RV is
    also off by 40–200 km/s (its pipeline fits the whole spectrum).
``wave_calibration``
    A wrong wavelength solution of the red arm (observed λ ≥ 5900 Å): a wrong dispersion,
    δ(λ) = a + k (λ − 5900 Å), |k| in 1.1–2.6 Å per 1000 Å and |a| < 0.5 Å, so features
    appear at λ + δ(λ) (the flux seen at λ is the flux of λ − δ(λ)): apparent RVs grow from
    ~0 at the dichroic to 90–220 km/s at 8200 Å, and the DSAL lines drift by 30–70 km/s
    from K I to Ca II — the paper's "abnormal absorption line positions". The LAMOST RV
    shares the error (it is measured on the same pixels): + c δ(7000 Å)/7000 Å.
``emission_dwarf``
    Flaring M dwarfs (dwarfs only): a hot veiling continuum (3–8 times the photospheric
    median, flat in f_λ) fills the absorption lines, and strong emission lines at the star's
    RV (Hα EW 30–80 Å; Hβ, Ca II H&K, He I 5877/6680 and the Ca II triplet) — enough for
    absorption-line methods to fail. The LAMOST RV is off by 50–300 km/s.
``very_low_snr``
    Extra white noise bringing S/N_i to 0.5–2.5; ``snr_*`` and the LAMOST RV (error
    sqrt(4² + (150/S/N)²) km/s) follow.
``lamost_rv_catastrophic``
    LAMOST RV off by 100–500 km/s (either sign).
``lamost_rv_modest``
    LAMOST RV off by 30–90 km/s (either sign): beyond the agreement band but plausible.

Added flux (lamp lines, veiling, emission) adds photon noise: variance grows by
``var * added / reference`` with ``reference`` the running median of the flux, and ``ivar``
is updated. Everything is drawn from its own random stream (derived from the survey seed),
so the untouched spectra, and every other variable, are identical to a survey without
failures.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from mspec.variables import C_KMS, SDSS_BANDS

__all__ = ["FAILURE_MODES", "ARC_LINES_VAC", "check_failures", "apply_failures"]

#: Failure mode -> one line (see the module docstring).
FAILURE_MODES = {
    "red_end_anomaly": "calibration-lamp lines and scattered light beyond ~7600 A",
    "wave_calibration": "wrong wavelength solution (dispersion) of the red arm",
    "emission_dwarf": "flaring dM: veiling continuum and strong emission lines",
    "very_low_snr": "S/N_i 0.5-2.5",
    "lamost_rv_catastrophic": "LAMOST RV off by 100-500 km/s",
    "lamost_rv_modest": "LAMOST RV off by 30-90 km/s",
}

#: Ar I arc-lamp lines (air Å, NIST strong lines) converted to vacuum (x 1.000275).
ARC_LINES_VAC = (
    np.array(
        [
            7635.106,
            7723.761,
            7948.176,
            8006.157,
            8103.693,
            8115.311,
            8264.522,
            8408.210,
            8424.648,
            8521.442,
            8667.944,
            8761.686,
            9122.967,
        ]  # fmt: skip
    )
    * 1.000275
)
_ARC_WEIGHTS = np.array([1.0, 0.6, 0.5, 0.6, 0.8, 1.0, 0.7, 0.6, 0.8, 0.5, 0.4, 0.5, 1.0])

#: Emission lines of a flare (vacuum Å, EW relative to Hα).
_FLARE_LINES = np.array(
    [
        (6564.61, 1.0),  # H alpha
        (4862.68, 0.5),  # H beta
        (3934.78, 0.4),  # Ca II K
        (3969.59, 0.3),  # Ca II H
        (5877.25, 0.05),  # He I
        (6679.99, 0.03),  # He I
        (8500.36, 0.06),  # Ca II triplet
        (8544.44, 0.08),
        (8664.52, 0.07),
    ]
)
_RED_ARM = 5900.0
_R = 1800.0
_FWHM_SIGMA = 2.3548200450309493


def check_failures(failures) -> dict[str, float]:
    """Validate a ``failures`` mapping (mode -> fraction of M stars).

    Parameters
    ----------
    failures : mapping or None
        Keys from :data:`FAILURE_MODES`, values fractions in [0, 1] summing to at most 1.

    Returns
    -------
    dict
        Every mode with its fraction (0 when not given).

    Raises
    ------
    TypeError, ValueError
        Naming ``failures`` and the offending key or value.
    """
    out = dict.fromkeys(FAILURE_MODES, 0.0)
    if failures is None:
        return out
    if not isinstance(failures, Mapping):
        raise TypeError(
            f"failures must be a mapping of mode -> fraction, got {type(failures).__name__}"
        )
    for k, v in failures.items():
        if k not in FAILURE_MODES:
            raise ValueError(f"failures has unknown mode {k!r}; known: {sorted(FAILURE_MODES)}")
        try:
            v = float(v)
        except (TypeError, ValueError):
            raise ValueError(f"failures[{k!r}] must be a number, got {v!r}") from None
        if not (0.0 <= v <= 1.0) or math.isnan(v):
            raise ValueError(f"failures[{k!r}] must be a fraction in [0, 1], got {v}")
        out[k] = v
    if sum(out.values()) > 1.0 + 1e-9:
        raise ValueError(f"failures fractions must sum to at most 1, got {sum(out.values()):.6g}")
    return out


def _running_median(flux: np.ndarray, width: int = 41) -> np.ndarray:
    from scipy.ndimage import median_filter

    f = np.where(np.isfinite(flux), flux, np.nan)
    fill = np.nanmedian(f) if np.isfinite(f).any() else 0.0
    return median_filter(np.where(np.isfinite(f), f, fill), size=width, mode="nearest")


def _gauss(lam, centre, sigma, area):
    return area / (sigma * math.sqrt(2.0 * math.pi)) * np.exp(-0.5 * ((lam - centre) / sigma) ** 2)


def _add_signal(rng, flux, ivar, add, ref):
    """Add ``add`` to ``flux`` with photon noise; returns new flux and ivar (float64)."""
    good = (ivar > 0) & np.isfinite(flux)
    var = np.where(good, 1.0 / np.where(good, ivar, 1.0), 0.0)
    scale = np.maximum(ref, 0.05 * max(float(np.nanmedian(np.abs(ref))), 1e-30))
    var_add = np.where(good, var * np.maximum(add, 0.0) / scale, 0.0)
    new = flux + add + rng.standard_normal(flux.size) * np.sqrt(var_add)
    new_var = var + var_add
    new_ivar = np.where(good, 1.0 / np.where(good, new_var, 1.0), 0.0)
    return np.where(np.isfinite(flux), new, flux), new_ivar


def _snr_bands(lam, flux, ivar):
    ref = _running_median(flux, 21)
    out = {}
    for b, (lo, hi) in SDSS_BANDS.items():
        sel = (lam >= lo) & (lam < hi) & (ivar > 0) & np.isfinite(flux)
        out[b] = float(np.median(ref[sel] * np.sqrt(ivar[sel]))) if sel.any() else 0.0
        out[b] = max(out[b], 0.0)
    return out


def _set_lamost_rv(ds, i, rv):
    ds["lamost_rv"].values[i] = rv
    ds["lamost_z"].values[i] = rv / C_KMS


def apply_failures(ds, failures: Mapping[str, float], seed: int):
    """Apply failure modes to a simulated survey in place and add ``true_failure``.

    Parameters
    ----------
    ds : xarray.Dataset
        In-memory simulated survey (numpy-backed), as built by
        :func:`mspec.simulate.simulate_survey`.
    failures : mapping
        Mode -> fraction of the M stars (:data:`FAILURE_MODES`; checked by
        :func:`check_failures`). Counts are exact (rounded); modes never overlap.
    seed : int
        The survey seed; the failures use their own stream derived from it.

    Returns
    -------
    xarray.Dataset
        ``ds`` with altered ``flux``/``ivar``/``snr_*``/``lamost_rv``/``lamost_z``/
        ``lamost_z_err`` and the new string variable ``true_failure`` (mode or ``""``).
    """
    fr = check_failures(failures)
    rng = np.random.default_rng(np.random.SeedSequence(int(seed)).spawn(7)[6])
    n = ds.sizes["spectra"]
    lam = 10.0 ** np.asarray(ds["loglam"].values, dtype=np.float64)
    cls = np.asarray(ds["true_class"].values).astype(str)
    lum = np.asarray(ds["true_lumclass"].values).astype(str)
    truth_rv = np.asarray(ds["true_rv"].values, dtype=np.float64)
    label = np.full(n, "", dtype="<U24")
    pool = np.flatnonzero(cls == "M")
    rng.shuffle(pool)
    # dwarfs first for emission_dwarf: take them from the dwarf part of the pool
    n_m = pool.size
    used = np.zeros(n, bool)
    for mode, frac in fr.items():
        k = int(round(frac * n_m))
        if k == 0:
            continue
        cand = pool[~used[pool]]
        if mode == "emission_dwarf":
            cand = cand[lum[cand] == "dM"]
        if mode.startswith("lamost_rv") or mode == "very_low_snr":
            cand = cand[np.isfinite(ds["lamost_rv"].values[cand])]
        pick = np.sort(cand[:k])
        used[pick] = True
        label[pick] = mode
    flux = ds["flux"].values
    ivar = ds["ivar"].values
    ormask = ds["ormask"].values
    for i in np.flatnonzero(label != ""):
        mode = label[i]
        f = flux[i].astype(np.float64)
        iv = ivar[i].astype(np.float64)
        changed = True
        if mode == "red_end_anomaly":
            start = rng.uniform(7550.0, 7800.0)
            ref = _running_median(f)
            red = lam > start
            med_red = float(np.nanmedian(ref[red])) if red.any() else 0.0
            add = np.zeros_like(lam)
            amp = rng.uniform(3.0, 10.0)
            for c, w in zip(ARC_LINES_VAC, _ARC_WEIGHTS, strict=True):
                if c > start:
                    sig = c / (_R * _FWHM_SIGMA)
                    peak = amp * w * max(float(np.interp(c, lam, ref)), 0.1 * med_red)
                    add += _gauss(lam, c, sig, peak * sig * math.sqrt(2.0 * math.pi))
            b = rng.uniform(0.5, 2.0)
            add += np.where(red, b * med_red * ((lam - start) / (lam[-1] - start)) ** 2, 0.0)
            f, iv = _add_signal(rng, f, iv, add, ref)
            off = rng.uniform(40.0, 200.0) * rng.choice([-1.0, 1.0])
            _set_lamost_rv(ds, i, ds["lamost_rv"].values[i] + off)
        elif mode == "wave_calibration":
            k = rng.uniform(1.1e-3, 2.6e-3) * rng.choice([-1.0, 1.0])
            a0 = rng.uniform(-0.5, 0.5)
            red = lam >= _RED_ARM
            delta = a0 + k * (lam - _RED_ARM)
            src = lam[red] - delta[red]
            ok = np.isfinite(f)
            fr_red = np.interp(src, lam[ok], f[ok], left=np.nan, right=np.nan)
            iv_red = np.interp(src, lam, iv, left=0.0, right=0.0)
            idx = np.clip(np.searchsorted(lam, src), 0, lam.size - 1)
            f[red] = np.where(np.isfinite(f[red]), fr_red, f[red])
            iv[red] = np.where(np.isfinite(f[red]), iv_red, 0.0)
            ormask[i, red] = ormask[i, idx]
            d7000 = a0 + k * (7000.0 - _RED_ARM)
            _set_lamost_rv(ds, i, ds["lamost_rv"].values[i] + C_KMS * d7000 / 7000.0)
        elif mode == "emission_dwarf":
            ref = _running_median(f)
            good = np.isfinite(f) & (iv > 0)
            med = float(np.median(ref[good])) if good.any() else 0.0
            veil = rng.uniform(3.0, 8.0) * med
            cont = ref + veil
            add = np.full_like(lam, veil)
            ew_ha = rng.uniform(30.0, 80.0)
            dop = 1.0 + truth_rv[i] / C_KMS
            for c0, rel in _FLARE_LINES:
                c = c0 * dop
                if lam[0] < c < lam[-1]:
                    area = rel * ew_ha * float(np.interp(c, lam, cont))
                    add += _gauss(lam, c, c / (_R * _FWHM_SIGMA), area)
            f, iv = _add_signal(rng, f, iv, add, ref)
            off = rng.uniform(50.0, 300.0) * rng.choice([-1.0, 1.0])
            _set_lamost_rv(ds, i, ds["lamost_rv"].values[i] + off)
        elif mode == "very_low_snr":
            target = rng.uniform(0.5, 2.5)
            now = max(_snr_bands(lam, f, iv)["i"], 1e-3)
            good = (iv > 0) & np.isfinite(f)
            var = np.where(good, 1.0 / np.where(good, iv, 1.0), 0.0)
            if now > target:
                var_new = var * (now / target) ** 2
                extra = np.sqrt(np.maximum(var_new - var, 0.0))
                f = np.where(good, f + rng.standard_normal(f.size) * extra, f)
                iv = np.where(good, 1.0 / np.where(good, var_new, 1.0), 0.0)
            sig = math.sqrt(4.0**2 + (150.0 / target) ** 2)
            _set_lamost_rv(ds, i, truth_rv[i] - 4.0 + rng.normal() * sig)
            ds["lamost_z_err"].values[i] = sig / C_KMS
        else:
            changed = False
            lo, hi = (100.0, 500.0) if mode == "lamost_rv_catastrophic" else (30.0, 90.0)
            off = rng.uniform(lo, hi) * rng.choice([-1.0, 1.0])
            _set_lamost_rv(ds, i, ds["lamost_rv"].values[i] + off)
        if changed:
            flux[i] = f.astype(flux.dtype)
            ivar[i] = iv.astype(ivar.dtype)
            for b, v in _snr_bands(lam, f, iv).items():
                ds[f"snr_{b}"].values[i] = v
    ds["true_failure"] = (("spectra",), label.astype(str))
    ds.attrs["failures"] = ", ".join(f"{k}={v:g}" for k, v in fr.items() if v > 0)
    return ds
