"""Physics sanity tests of the simulator (issue 18): direction and size of each dependence.

Every test measures a published index (``mspec.indices.measure_indices``) or an equivalent
width on noiseless ``model_spectrum`` output and checks the sign and the size of its change
with Teff, [M/H], [alpha/M] and log g, plus the LAMOST-like instrument systematics of the
survey. Sources and the adopted numbers are in docs/simulator.md.
"""

from __future__ import annotations

import numpy as np
import pytest

from mspec.indices import measure_indices
from mspec.simulate import bank as sb
from mspec.simulate import models as sm
from mspec.simulate import survey as sim
from mspec.variables import loglam_grid

LL = loglam_grid()
LAM = 10.0**LL
CAH2, CAH3, TIO5, ZETA, KI, NAI, CAII = range(7)


def _spec(teff, m_h=0.0, alpha_m=0.0, logg=None, kind="dM"):
    teff = np.atleast_1d(np.asarray(teff, float))
    n = teff.size
    lg = sm.ms_logg(teff) if logg is None else np.broadcast_to(np.asarray(logg, float), (n,))
    return sim.model_spectrum(
        teff,
        lg,
        np.broadcast_to(np.asarray(m_h, float), (n,)),
        np.broadcast_to(np.asarray(alpha_m, float), (n,)),
        LL,
        kind=kind,
    )


def _idx(flux):
    out, status = measure_indices(
        LL, flux, np.ones_like(flux), np.zeros(flux.shape, int), np.zeros(flux.shape[0])
    )
    assert np.all(status <= 3)  # 3: an index beyond these (e.g. zeta of a K7) not defined
    return out


def _ew(flux, lines, conts):
    """EW (A) of ``lines`` windows against a straight line through two continuum windows."""
    out = []
    for f in flux:
        (xa, ya), (xb, yb) = (
            (LAM[(LAM >= a) & (LAM <= b)].mean(), f[(LAM >= a) & (LAM <= b)].mean())
            for a, b in conts
        )
        tot = 0.0
        for a, b in lines:
            s = (LAM >= a) & (LAM <= b)
            c = ya + (yb - ya) * (LAM[s] - xa) / (xb - xa)
            tot += np.sum((1 - f[s] / c) * np.gradient(LAM)[s])
        out.append(tot)
    return np.array(out)


def _mg_b(flux):
    return _ew(flux, [(5163.0, 5190.0)], [(5140.0, 5156.0), (5196.0, 5210.0)])


def _ca_i(flux):
    return _ew(flux, [(6100.0, 6126.0)], [(6085.0, 6096.0), (6130.0, 6142.0)])


def test_version_bumped():
    assert sim.SIMULATOR_VERSION == "2"


# -- Teff ------------------------------------------------------------------------------------
def test_band_depths_deepen_with_falling_teff():
    """CaH2, CaH3, TiO5 fall monotonically from 4000 K to 2800 K (deeper bands in cooler
    dwarfs), by the amounts of the Reid et al. 1995 / Lepine et al. 2003 K7-M6 sequences."""
    teff = np.arange(2800.0, 4001.0, 100.0)
    o = _idx(_spec(teff))
    for k in (CAH2, CAH3, TIO5):
        assert np.all(np.diff(o[:, k]) > 0), (k, o[:, k])
    # K7/M0 (~4000 K): indices ~0.85-0.9; M5-M6 (~2900 K): CaH2 ~0.35-0.4, TiO5 ~0.3-0.35
    assert 0.8 < o[-1, CAH2] < 0.95 and 0.8 < o[-1, TIO5] < 0.95
    assert 0.3 < o[1, CAH2] < 0.45 and 0.25 < o[1, TIO5] < 0.45


def test_vo_band_strengthens_in_late_m():
    """The VO band at 7434 A (index VO 7434 of Hawley et al. 2002: F(7430-7470) /
    F(7550-7570)) deepens from M4 to M8 dwarfs: VO is a late-M feature."""
    f = _spec(sm.dwarf_teff(np.array([4.0, 6.0, 8.0])))

    def vo(x):
        return x[:, (LAM >= 7432) & (LAM <= 7472)].mean(1) / x[
            :, (LAM >= 7552) & (LAM <= 7572)
        ].mean(1)

    v = vo(f)
    assert v[0] > v[1] > v[2], v
    assert v[0] - v[2] > 0.05, v


def test_teff_scale_matches_real_lamost_m_dwarfs():
    """The adopted SpT-Teff scale is the one the real DR7 M dwarfs with literature Teff give:
    each real spectrum's CaH2/CaH3/TiO5 pick its model subtype (solar [M/H]) and a Theil-Sen
    fit of literature Teff on that subtype matches the scale's slope (-180 K per subtype)
    within 25 % and its M0 Teff (3970 K) within 80 K."""
    pd = pytest.importorskip("pandas")
    from astropy.io import fits
    from scipy import stats

    from mspec.data import shared_data_dir

    d = shared_data_dir() / "lamost_dr7_mdwarfs"
    lab = pd.read_csv(d / "labels.csv")
    s_grid = np.linspace(-1.0, 6.0, 141)
    grid = _idx(_spec(sm.dwarf_teff(s_grid)))[:, [CAH2, CAH3, TIO5]]
    best, teff = [], []
    for row in lab.itertuples():
        with fits.open(d / row.file_name) as h:
            data = h[0].data.astype(float)
            hdr = h[0].header
        if not str(hdr["SUBCLASS"]).startswith("M"):
            continue  # LAMOST's own K7/G5 calls: not M dwarfs by their spectra
        n = data.shape[1]
        f, iv = np.full(LL.size, np.nan), np.zeros(LL.size)
        f[:n], iv[:n] = data[0], data[1]
        rv = hdr["Z"] * 299792.458 if hdr["Z"] > -9000 else 0.0
        o, st = measure_indices(LL, f[None], iv[None], (iv <= 0)[None].astype(int), [rv])
        x = o[0, [CAH2, CAH3, TIO5]]
        if not np.all(np.isfinite(x)):
            continue
        best.append(s_grid[np.argmin(((grid - x) ** 2).sum(1))])
        teff.append(row.teff_lit)
    x, y = np.array(best), np.array(teff)
    assert x.size >= 25
    slope, icpt, *_ = stats.theilslopes(y, x)
    assert -225 < slope < -135, slope  # measured -178 K per subtype (29 stars)
    assert abs(icpt - sb.DWARF_TEFF[2]) < 80, icpt  # measured 3967 K
    # and the literature scatter about it is what the labels allow (measured 153 K)
    res = y - (icpt + slope * x)
    assert 1.4826 * np.median(np.abs(res - np.median(res))) < 220


# -- metallicity ---------------------------------------------------------------------------
@pytest.mark.parametrize("teff", [3000.0, 3400.0, 3800.0])
def test_zeta_tracks_metallicity(teff):
    """zeta_TiO/CaH (Lepine et al. 2007) falls with [M/H] at fixed Teff by ~0.5-0.8 per dex
    (the slope of the Woolf et al. 2009 / Mann et al. 2013 / Lepine et al. 2013 zeta-[Fe/H]
    calibrations); solar dwarfs have zeta ~ 1, [M/H] = -1 falls among the subdwarfs
    (zeta < 0.825) and CaH2, the Teff tracer, hardly moves."""
    mh = np.array([-1.0, -0.5, 0.0, 0.3])
    o = _idx(_spec(np.full(4, teff), mh))
    z = o[:, ZETA]
    assert np.all(np.diff(z) > 0), z
    slope = (z[3] - z[1]) / 0.8
    assert 0.3 < slope < 1.1, slope  # measured 0.53-0.94 (3000-3800 K)
    assert 0.85 < z[2] < 1.35, z  # measured 1.00-1.24
    assert 0.3 < z[0] < 0.7, z  # measured 0.48-0.54
    assert abs(o[1, CAH2] - o[2, CAH2]) < 0.04  # measured <= 0.02


def test_atomic_lines_grow_with_metallicity():
    """Na I 8190 and K I 7700 (dwarf gravity features) and Mg b strengthen with [M/H]."""
    mh = np.array([-0.5, 0.0, 0.3])
    f = _spec(np.full(3, 3400.0), mh)
    o = _idx(f)
    for k in (NAI, KI):
        assert np.all(np.diff(o[:, k]) > 0), o[:, k]
        # ln EW per dex: measured ~1.0 (K_ENV_MH + K_ATOM_MH = 0.8 in log-depth)
        assert 0.4 < np.log(o[2, k] / o[0, k]) / 0.8 < 1.6, o[:, k]
    mg = _mg_b(f)
    assert np.all(np.diff(mg) > 0), mg


# -- alpha -------------------------------------------------------------------------------------
@pytest.mark.parametrize("teff", [3000.0, 3400.0, 3800.0])
def test_alpha_features(teff):
    """[alpha/M] deepens the alpha-element features at this resolution: Mg I b and Ca I
    6102-6122 (EW ~ sqrt(abundance): d ln EW / d[alpha/M] ~ 1.15), TiO (TiO5 falls) and CaH,
    and leaves the non-alpha Na I doublet alone."""
    a = np.array([0.0, 0.4])
    f = _spec(np.full(2, teff), 0.0, a)
    for ew in (_mg_b(f), _ca_i(f)):
        assert ew[1] > ew[0] > 0
        assert 0.6 < np.log(ew[1] / ew[0]) / 0.4 < 1.7, ew  # measured 1.1-1.3
    o = _idx(f)
    assert o[1, TIO5] < o[0, TIO5] - 0.05, o[:, TIO5]  # measured -0.10..-0.14
    assert o[1, CAH3] < o[0, CAH3], o[:, CAH3]
    assert abs(o[1, NAI] / o[0, NAI] - 1) < 0.01


def test_alpha_and_metallicity_are_separable():
    """[M/H] and [alpha/M] change different sets of features (so a CNN can tell them
    apart): at equal TiO5 change, [M/H] moves Na I strongly and Mg b weakly, [alpha/M] moves
    Mg b strongly and Na I not at all."""
    base = _spec(3400.0)
    dm = _spec(3400.0, m_h=-0.3)
    da = _spec(3400.0, alpha_m=0.2)
    ob, om_, oa = _idx(base)[0], _idx(dm)[0], _idx(da)[0]
    assert om_[NAI] / ob[NAI] < 0.85 and abs(oa[NAI] / ob[NAI] - 1) < 0.01
    mg = _mg_b(np.vstack([base, dm, da]))
    assert mg[2] / mg[0] > 1.15 and abs(mg[1] / mg[0] - 1) < 0.15


# -- gravity -----------------------------------------------------------------------------
def test_giants_vs_dwarfs_table3():
    """At equal Teff an M giant has a flat CaH (CaH3 ~ 1), weak Na I and K I and a deep Ca II
    triplet compared with a dwarf (Li et al. 2025, Table 3)."""
    t = np.array([3500.0, 3800.0])
    od = _idx(_spec(t))
    og = _idx(_spec(t, m_h=0.0, logg=sm.giant_logg(t), kind="gM"))
    assert np.all(og[:, CAH3] > od[:, CAH3] + 0.05)
    assert np.all(og[:, NAI] < 0.5 * od[:, NAI])
    assert np.all(og[:, KI] < 0.6 * od[:, KI])
    assert np.all(og[:, CAII] > od[:, CAII] + 1.0)


def test_dwarf_gravity_direction():
    """Higher log g (at fixed Teff) deepens the pressure-sensitive Na I and CaH."""
    lo, hi = _idx(_spec(3400.0, logg=4.7))[0], _idx(_spec(3400.0, logg=5.1))[0]
    assert hi[NAI] > lo[NAI] * 1.2
    assert hi[CAH3] < lo[CAH3]


# -- instrument ------------------------------------------------------------------------------
def _obs(n=3, **kw):
    obs = {
        "resp_hi": np.zeros((n, 3)),
        "arm_jump": np.zeros(n),
        "splice": np.full(n, 5850.0),
        "dichroic_amp": np.zeros(n),
        "sky_scale": np.zeros(n),
        "sky_jitter": np.zeros((n, sim.SKY_LINES.shape[0])),
        "sky_bad": np.zeros(n),
        "sky_rel": np.ones(n),
    }
    obs.update(kw)
    return obs


def test_dichroic_step_and_splice_wiggle():
    """The arm mismatch is a step of exp(arm_jump) across the splice; the splice wiggle stays
    inside the dichroic region; P4-P6 are smooth and bounded."""
    xleg = np.linspace(-1.0, 1.0, LAM.size)
    sl = slice(0, 2)
    r = sim._systematic_response(_obs(2, arm_jump=np.array([0.03, -0.05])), sl, LAM, xleg)
    blue, red = LAM < 5500, LAM > 6200
    np.testing.assert_allclose(r[:, blue], 0.0, atol=1e-3)
    np.testing.assert_allclose(r[0, red], 0.03, atol=1e-3)
    np.testing.assert_allclose(r[1, red], -0.05, atol=1e-3)
    w = sim._systematic_response(_obs(2, dichroic_amp=np.array([0.03, 0.03])), sl, LAM, xleg)
    outside = (LAM < sim.DICHROIC[0] - 100) | (LAM > sim.DICHROIC[1] + 100)
    assert np.max(np.abs(w[:, outside])) < 1e-3
    assert 0.015 < np.max(np.abs(w)) <= 0.03
    p = sim._systematic_response(
        _obs(1, resp_hi=np.array([[0.02, 0.015, 0.01]])), slice(0, 1), LAM, xleg
    )
    assert np.max(np.abs(p)) <= 0.045 + 1e-12


def test_sky_residual_at_sky_lines():
    """Sky residuals are additive, scale with the sky level, and sit on the sky lines."""
    level = np.array([1.0, 2.0])
    o = _obs(2, sky_jitter=np.full((2, sim.SKY_LINES.shape[0]), 0.01))
    res = sim._sky_residual(o, slice(0, 2), level)
    np.testing.assert_allclose(res[1], 2 * res[0])
    k5577 = np.argmin(np.abs(LAM - 5578.89))
    quiet = np.argmin(np.abs(LAM - 6700.0))
    assert res[0, k5577] > 100 * abs(res[0, quiet])
    assert not np.any(sim._sky_residual(_obs(2), slice(0, 2), level))


def test_survey_systematics_are_drawn_and_deterministic():
    """The survey draws the systematics from their own stream: the same seed gives the same
    spectra, the noiseless survey carries them too, and the LAMOST-like sizes hold."""
    a = sim.simulate_survey(40, seed=5, mix={"dM": 1.0}, noiseless=True)
    b = sim.simulate_survey(40, seed=5, mix={"dM": 1.0}, noiseless=True, chunk_size=7)
    np.testing.assert_array_equal(a.flux.values, b.flux.values)
    o = sim._draw_systematics(np.random.default_rng(0), 20000)
    assert 0.025 < np.std(o["arm_jump"]) < 0.035
    assert np.all((o["splice"] >= sim.DICHROIC[0]) & (o["splice"] <= sim.DICHROIC[1]))
    assert 0.13 < np.std(o["sky_bad"]) < 0.17
