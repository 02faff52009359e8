"""The simulator's template grid: noiseless model spectra as a template library.

These are the demo's RV templates (``[templates] set = "demo"``): they match the simulated
survey exactly, so template matching on a simulated survey measures the method, not template
mismatch.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import xarray as xr

from mspec.rv.templates import GRID_SIZE, GRID_START, make_library

__all__ = ["simulated_templates", "dwarf_logg", "giant_logg", "alpha_trend", "SIM_DWARFS",
           "SIM_GIANTS"]  # fmt: skip


#: Main-sequence log g (cgs) of M/late-K dwarfs vs Teff (K) (Pecaut & Mamajek 2013-like).
_MS_TEFF = np.array([2300.0, 2500, 2850, 3050, 3200, 3400, 3550, 3850, 4050, 4400])
_MS_LOGG = np.array([5.30, 5.25, 5.15, 5.05, 4.97, 4.87, 4.80, 4.67, 4.62, 4.60])


def dwarf_logg(teff):
    """Main-sequence log g (cgs) for Teff (K), used for the dwarf templates."""
    return np.interp(np.asarray(teff, float), _MS_TEFF, _MS_LOGG)


def giant_logg(teff):
    """Typical M-giant log g (cgs) for Teff (K): ~1.55 at 3900 K down to ~0 at 3000 K."""
    return 1.55 - (3900.0 - np.asarray(teff, float)) / 800.0 * 1.4


def alpha_trend(m_h):
    """Galactic-disc [α/M] trend used for simulated templates: 0.05 - 0.25 [M/H] (dex)."""
    return 0.05 - 0.25 * np.asarray(m_h, float)


#: Default simulator grid (93 templates): M dwarfs Teff 2400-4100 K by 100 K x [M/H]
#: -0.6/-0.3/0/+0.3 on the main sequence, and M giants Teff 3100-4000 K by 150 K x [M/H]
#: -0.6/-0.3/0; [α/M] follows :func:`alpha_trend`.
SIM_DWARFS = {
    "teff": tuple(np.arange(2400.0, 4101.0, 100.0)),
    "logg": dwarf_logg,
    "m_h": (-0.6, -0.3, 0.0, 0.3),
}
SIM_GIANTS = {
    "teff": tuple(np.arange(3100.0, 4001.0, 150.0)),
    "logg": giant_logg,
    "m_h": (-0.6, -0.3, 0.0),
}


def simulated_templates(
    grid: Sequence[dict] | None = None,
    *,
    alpha_m=alpha_trend,
    normalise: str = "mean",
) -> xr.Dataset:
    """Noiseless simulator spectra on a Teff/logg/[M/H] grid (default for the demo).

    Parameters
    ----------
    grid : sequence of dict, optional
        Each dict has ``teff`` and ``m_h`` sequences and ``logg``: a sequence (Cartesian
        product) or a function of Teff; optional ``kind`` (``"M"``). Default
        ``[SIM_DWARFS, SIM_GIANTS]`` (93 templates, dwarfs and giants).
    alpha_m : float or callable
        [α/M] (dex), or a function of [M/H] (default :func:`alpha_trend`).
    normalise : {"mean", "zscore"}
        See :func:`make_library`.

    Returns
    -------
    xarray.Dataset
        Library with Teff/logg/[M/H] and luminosity class (``dM`` for logg >= 3.5, else
        ``gM``).
    """
    from mspec.simulate.survey import model_spectrum

    if grid is None:
        grid = [SIM_DWARFS, SIM_GIANTS]
    rows = []
    for g in grid:
        kind = g.get("kind", "M")
        for teff in g["teff"]:
            loggs = [float(g["logg"](teff))] if callable(g["logg"]) else g["logg"]
            for logg in loggs:
                for m_h in g["m_h"]:
                    a = float(alpha_m(m_h)) if callable(alpha_m) else float(alpha_m)
                    rows.append((float(teff), float(logg), float(m_h), a, kind))
    if not rows:
        raise ValueError("grid holds no (teff, logg, m_h) point")
    # the model on a fine log grid (R >> 1800), then steps 3 + 4b like any template
    loglam = np.arange(np.log10(GRID_START) - 0.01, np.log10(GRID_START + GRID_SIZE) + 0.01, 1e-5)
    teff, logg, m_h, alpha, kind = (np.array(c) for c in zip(*rows))
    flux = np.atleast_2d(model_spectrum(teff, logg, m_h, alpha, loglam, rv=0.0, kind=kind))
    lum = np.where(logg >= 3.5, "dM", "gM")
    names = [
        f"sim_{lc}_T{t:.0f}_g{lg:.2f}_m{mh:+.1f}" for lc, t, lg, mh in zip(lum, teff, logg, m_h)
    ]
    return make_library(
        loglam,
        flux,
        names,
        spt=["M"] * len(rows),
        teff=teff,
        logg=logg,
        m_h=m_h,
        lumclass=lum,
        source="mspec.simulate.model_spectrum",
        normalise=normalise,
    )
