"""Spectral indices that separate M dwarfs from M giants (paper Table 3), as a lazy stage.

Li et al. 2025 (Section 3.4.2, Table 3) classified dM/gM by eye from four features:
the CaH band at 6946-7050 Angstrom (a dip in dwarfs, flat in giants), the K I doublet
(7665, 7699; deep in dwarfs), the Na I doublet (8183, 8195; deep in dwarfs) and the Ca II
triplet (8498, 8542, 8662; deep in giants). :func:`spectral_indices` measures them, plus
the standard molecular-band indices, on the native pixels in the rest frame:

``idx_cah2``, ``idx_cah3``, ``idx_tio5``
    Reid, Hawley & Gizis (1995, AJ 110, 1838) band ratios (mean flux in the band / mean
    flux in the 7042-7046 Angstrom pseudo-continuum). CaH3 (6960-6990) lies inside the
    paper's CaH feature (6946-7050) and is the number behind its "dip / flat" criterion.
    TiO5 decreases (deeper band) toward later M types.
``idx_zeta``
    zeta_TiO/CaH = (1 - TiO5) / (1 - [TiO5]_Zsun) with
    [TiO5]_Zsun = -0.050 - 0.118 CaH + 0.670 CaH^2 - 0.164 CaH^3, CaH = CaH2 + CaH3
    (Lepine, Rich & Shara 2007, ApJ 669, 1235; the calibration Lepine et al. 2013, AJ 145,
    102 adopt for dwarfs). Another calibration can be passed as ``zeta_coef``. The index
    is meant for dwarfs; for giants it is just a number.
``ew_ki``, ``ew_nai``, ``ew_caii``
    Equivalent widths (Angstrom, positive = absorption), summed over the lines of the
    feature, against a straight pseudo-continuum fitted through the continuum windows.
``idx_zro``
    S-type star indicator: mean flux just redward of the ZrO gamma-system (0,0) bandhead
    at 6474 Angstrom (air) over the mean flux just blueward of it. ZrO bands are degraded
    to the red, so a ZrO band makes the index drop below 1; the (0,0) head near 6474 is
    the band S stars have been classified by since Keenan (1954) and the ZrO feature
    Li et al. 2025 (after Chen et al. 2022) inspected by eye.
``idx_c2``
    Carbon-star indicator: mean flux just blueward of the C2 Swan (0,0) bandhead at
    5165 Angstrom (air) over the mean flux just redward of it. Swan bands are degraded to
    the violet, so C2 makes the index drop below 1, while M stars (TiO alpha-system head
    at 5167, degraded to the red, and the Mg b triplet redward of it) give > 1.

Every window is defined in **air** wavelengths, as published, and converted to vacuum
(LAMOST is vacuum) with the IAU standard conversion of Morton (2000, ApJS 130, 403; the
Edlen 1966 / Ciddor-type formula the SDSS ``airtovac`` uses)::

    lambda_vac = lambda_air * (1 + 6.4328e-5 + 2.94981e-2 / (146 - s^2)
                                          + 2.5540e-4 / (41 - s^2)),  s = 1e4 / lambda_air

(:func:`air_to_vacuum`; the shift is 1.9-2.4 Angstrom over 6800-8700 Angstrom).

Window choices (air, Angstrom; :data:`BANDS_AIR`) — the paper gives only the line
positions, so these are ours:

=========  ==========================================  =================================
feature    line bands                                  continuum windows
=========  ==========================================  =================================
K I        7657-7673, 7691-7707                        7640-7652, 7712-7724
Na I       8176-8202                                   8150-8170, 8206-8226
Ca II      8484-8513, 8522-8562, 8642-8682 (Cenarro    8474-8484, 8563-8577, 8619-8642,
           et al. 2001 line bands)                     8700-8725 (Cenarro et al. 2001)
=========  ==========================================  =================================

In M stars every "continuum" is a pseudo-continuum (TiO/VO bands everywhere), and the K I
and Na I regions sit in telluric O2 / H2O bands, so the EWs are relative diagnostics
(dwarfs vs giants at the same colour), not abundances. Telluric absorption is not removed.

Status (``idx_status``, CF flag attributes): 0 ok; 1 no rv (NaN rv: everything NaN);
2 fewer than two good pixels; 3 some indices not measurable (a window outside the
spectrum or inside a masked stretch longer than ``max_gap`` pixels, or a non-positive
pseudo-continuum); 4 no index measurable. (``idx_zro`` and ``idx_c2`` count like the others.)
"""

from __future__ import annotations

import numpy as np
import xarray as xr

from mspec import indices_kernels as K
from mspec.stage import flag_attrs, stage
from mspec.variables import annotate

__all__ = [
    "BANDS_AIR",
    "ZETA_LEPINE2007",
    "INDEX_NAMES",
    "RATIO_NAMES",
    "air_to_vacuum",
    "band_table",
    "measure_indices",
    "spectral_indices",
]

#: output variable names, in the kernel's column order
INDEX_NAMES = (
    "idx_cah2",
    "idx_cah3",
    "idx_tio5",
    "idx_zeta",
    "ew_ki",
    "ew_nai",
    "ew_caii",
    "idx_zro",
    "idx_c2",
)
#: band-ratio indices in the order of ``band_table()["ratios"]``
RATIO_NAMES = ("cah2", "cah3", "tio5", "zro", "c2")

#: [TiO5]_Zsun polynomial coefficients c0..c3 in CaH = CaH2 + CaH3 (Lepine et al. 2007)
ZETA_LEPINE2007 = (-0.050, -0.118, 0.670, -0.164)

#: window definitions in air Angstrom: ratio indices as (numerator, denominator) and
#: equivalent-width features as (line bands, continuum windows)
BANDS_AIR = {
    "ratios": {
        "cah2": ((6814.0, 6846.0), (7042.0, 7046.0)),
        "cah3": ((6960.0, 6990.0), (7042.0, 7046.0)),
        "tio5": ((7126.0, 7135.0), (7042.0, 7046.0)),
        # ZrO gamma (0,0) head 6474 (red-degraded): band redward / continuum blueward
        "zro": ((6478.0, 6498.0), (6448.0, 6470.0)),
        # C2 Swan (0,0) head 5165 (violet-degraded): band blueward / continuum redward
        "c2": ((5130.0, 5160.0), (5170.0, 5200.0)),
    },
    "features": {
        "ki": (((7657.0, 7673.0), (7691.0, 7707.0)), ((7640.0, 7652.0), (7712.0, 7724.0))),
        "nai": (((8176.0, 8202.0),), ((8150.0, 8170.0), (8206.0, 8226.0))),
        "caii": (
            ((8484.0, 8513.0), (8522.0, 8562.0), (8642.0, 8682.0)),
            ((8474.0, 8484.0), (8563.0, 8577.0), (8619.0, 8642.0), (8700.0, 8725.0)),
        ),
    },
}

_STATUS_ATTRS = flag_attrs(K.STATUS_MEANINGS, dtype=np.int8)


def air_to_vacuum(wave_air):
    """Convert air wavelengths to vacuum (Morton 2000, IAU standard).

    Parameters
    ----------
    wave_air : float or array_like
        Air wavelength(s) in Angstrom (> 2000 Angstrom, where the formula applies).

    Returns
    -------
    float or numpy.ndarray
        Vacuum wavelength(s) in Angstrom.
    """
    w = np.asarray(wave_air, dtype=np.float64)
    if np.any(~np.isfinite(w)) or np.any(w < 2000.0):
        raise ValueError("wave_air must be finite air wavelengths >= 2000 Angstrom")
    s2 = (1e4 / w) ** 2
    n = 1.0 + 6.4328e-5 + 2.94981e-2 / (146.0 - s2) + 2.5540e-4 / (41.0 - s2)
    out = w * n
    return float(out) if out.ndim == 0 else out


def band_table(bands_air=None) -> dict:
    """Vacuum windows in the layout the kernels and the numpy reference take.

    Parameters
    ----------
    bands_air : mapping, optional
        Windows in air Angstrom, same structure as :data:`BANDS_AIR` (default).

    Returns
    -------
    dict
        ``ratios``: list of 5 ``(num, den)`` vacuum windows (:data:`RATIO_NAMES`: cah2,
        cah3, tio5, zro, c2);
        ``features``: list of 3 ``(lines, conts)`` (ki, nai, caii); ``zeta``:
        :data:`ZETA_LEPINE2007`; and flat arrays ``ratio_lo/ratio_hi`` (10,),
        ``line_lo/line_hi/line_ptr``, ``cont_lo/cont_hi/cont_ptr`` for the kernels.
    """
    b = BANDS_AIR if bands_air is None else bands_air
    try:
        ratios = [b["ratios"][k] for k in RATIO_NAMES]
        feats = [b["features"][k] for k in ("ki", "nai", "caii")]
    except (KeyError, TypeError) as e:
        raise ValueError(f"bands_air must have the structure of BANDS_AIR (missing {e})") from None

    def vac(win):
        lo, hi = air_to_vacuum(float(win[0])), air_to_vacuum(float(win[1]))
        if not hi > lo:
            raise ValueError(f"bands_air: window {tuple(win)} must have lo < hi")
        return (lo, hi)

    ratios_v = [(vac(nu), vac(de)) for nu, de in ratios]
    feats_v = []
    for lines, conts in feats:
        if len(lines) < 1 or len(conts) < 2:
            raise ValueError("bands_air: each feature needs >= 1 line band and >= 2 continua")
        feats_v.append(([vac(w) for w in lines], [vac(w) for w in conts]))
    flat_r = [w for pair in ratios_v for w in pair]
    lines_flat = [w for lines, _ in feats_v for w in lines]
    conts_flat = [w for _, conts in feats_v for w in conts]
    return {
        "ratios": ratios_v,
        "features": feats_v,
        "zeta": np.asarray(ZETA_LEPINE2007, np.float64),
        "ratio_lo": np.array([w[0] for w in flat_r]),
        "ratio_hi": np.array([w[1] for w in flat_r]),
        "line_lo": np.array([w[0] for w in lines_flat]),
        "line_hi": np.array([w[1] for w in lines_flat]),
        "line_ptr": np.cumsum([0] + [len(lines) for lines, _ in feats_v]).astype(np.int64),
        "cont_lo": np.array([w[0] for w in conts_flat]),
        "cont_hi": np.array([w[1] for w in conts_flat]),
        "cont_ptr": np.cumsum([0] + [len(conts) for _, conts in feats_v]).astype(np.int64),
    }


def _check_max_gap(max_gap):
    if isinstance(max_gap, bool) or not isinstance(max_gap, (int, np.integer)) or max_gap < 0:
        raise ValueError(f"max_gap must be a non-negative int (pixels), got {max_gap!r}")
    return int(max_gap)


def _zeta(zeta_coef):
    z = np.asarray(ZETA_LEPINE2007 if zeta_coef is None else zeta_coef, dtype=np.float64)
    if z.shape != (4,) or not np.all(np.isfinite(z)):
        raise ValueError(f"zeta_coef must be 4 finite numbers c0..c3, got {zeta_coef!r}")
    return z


def measure_indices(loglam, flux, ivar, ormask, rv, *, max_gap=2, zeta_coef=None, bands=None):
    """Measure the indices of a block of spectra with the numba kernel (numpy in/out).

    Parameters
    ----------
    loglam : array_like, shape ``(npix,)``
        log10 observed vacuum wavelength (Angstrom).
    flux, ivar, ormask : array_like, shape ``(n, npix)``
        Native spectra (flux units arbitrary; ``ormask`` nonzero = bad).
    rv : array_like, shape ``(n,)``
        Radial velocities (km/s) used to shift to the rest frame; NaN -> status 1.
    max_gap : int
        Most consecutive bad pixels interpolated across inside one window (default 2).
    zeta_coef : sequence of 4 float, optional
        [TiO5]_Zsun polynomial (default :data:`ZETA_LEPINE2007`).
    bands : dict, optional
        Output of :func:`band_table` (default windows when omitted).

    Returns
    -------
    (numpy.ndarray, numpy.ndarray)
        ``(n, 9)`` float64 in the order of :data:`INDEX_NAMES` (ratios dimensionless, EWs
        Angstrom) and ``(n,)`` int8 status.
    """
    max_gap = _check_max_gap(max_gap)
    bt = band_table() if bands is None else bands
    zc = _zeta(zeta_coef)
    loglam = np.ascontiguousarray(loglam, dtype=np.float64)
    flux = np.asarray(flux)
    if flux.ndim != 2 or flux.shape[1] != loglam.shape[0]:
        raise ValueError(
            f"flux must be (n, npix) with npix = len(loglam) = {loglam.shape[0]}, got {flux.shape}"
        )
    ivar = np.asarray(ivar)
    ormask = np.asarray(ormask)
    if ivar.shape != flux.shape or ormask.shape != flux.shape:
        raise ValueError("ivar and ormask must have the shape of flux")
    rv = np.ascontiguousarray(np.broadcast_to(np.asarray(rv, np.float64), flux.shape[:1]))
    out = np.empty((flux.shape[0], K.N_OUT), np.float64)
    status = np.empty(flux.shape[0], np.int8)
    K.indices_block(
        loglam,
        np.ascontiguousarray(flux),
        np.ascontiguousarray(ivar),
        np.ascontiguousarray(ormask),
        rv,
        bt["ratio_lo"],
        bt["ratio_hi"],
        bt["line_lo"],
        bt["line_hi"],
        bt["line_ptr"],
        bt["cont_lo"],
        bt["cont_hi"],
        bt["cont_ptr"],
        zc,
        max_gap,
        out,
        status,
    )
    return out, status


def _block(flux, ivar, ormask, rv, loglam, *, max_gap, zeta_coef, bands):
    shape = flux.shape[:-1]
    loglam = np.asarray(loglam, np.float64).reshape(-1, np.shape(loglam)[-1])[0]
    if not (np.all(np.isfinite(loglam)) and np.all(np.diff(loglam) > 0)):
        raise ValueError("coordinate 'loglam' must be finite and strictly increasing")
    out, status = measure_indices(
        loglam,
        flux.reshape(-1, flux.shape[-1]),
        ivar.reshape(-1, flux.shape[-1]),
        ormask.reshape(-1, flux.shape[-1]),
        np.asarray(rv, np.float64).reshape(-1),
        max_gap=max_gap,
        zeta_coef=zeta_coef,
        bands=bands,
    )
    return (*(out[:, q].reshape(shape) for q in range(K.N_OUT)), status.reshape(shape))


@stage(
    "spectral_indices",
    module="DGCM",
    inputs=["flux", "ivar", "ormask", "loglam"],
    outputs=[*INDEX_NAMES, "idx_status"],
    version="2",
    description="CaH2/CaH3/TiO5/zeta, K I, Na I, Ca II equivalent widths (paper Table 3), "
    "ZrO and C2 bandhead indices",
)
def spectral_indices(ds, *, rv="rv_tm", max_gap=2, zeta_coef=None):
    """Measure the dwarf/giant spectral indices of every spectrum, lazily.

    Parameters
    ----------
    ds : xarray.Dataset
        Holds ``flux``, ``ivar``, ``ormask`` (``spectra``, ``pixels``) and the ``loglam``
        coordinate (log10 vacuum Angstrom); dask-backed inputs may be chunked along
        ``spectra`` only.
    rv : str or None
        Name of the ``(spectra,)`` radial-velocity variable (km/s) used to shift each
        spectrum to the rest frame (default ``"rv_tm"``, template matching). NaN rv gives
        NaN indices and status 1. ``None``: the spectra are already in the rest frame.
    max_gap : int
        Most consecutive bad pixels interpolated across inside one window (default 2).
    zeta_coef : sequence of 4 float, optional
        [TiO5]_Zsun = c0 + c1 CaH + c2 CaH^2 + c3 CaH^3 (default Lepine et al. 2007).
    merge : bool
        Merge the outputs into ``ds`` (default) or return them alone.

    Returns
    -------
    xarray.Dataset
        ``idx_cah2``, ``idx_cah3``, ``idx_tio5``, ``idx_zeta`` (dimensionless),
        ``ew_ki``, ``ew_nai``, ``ew_caii`` (Angstrom), ``idx_zro``, ``idx_c2``
        (dimensionless), ``idx_status`` (int8, CF flags), all on ``spectra``.

    Raises
    ------
    ValueError
        ``rv`` not a variable on ``spectra``, ``pixels`` split into several chunks, a
        non-increasing ``loglam``, or a bad ``max_gap`` / ``zeta_coef``.
    """
    max_gap = _check_max_gap(max_gap)
    zc = _zeta(zeta_coef)
    for name in ("flux", "ivar", "ormask"):
        da = ds[name]
        if da.chunks is not None and len(da.chunks[da.dims.index("pixels")]) > 1:
            raise ValueError(
                f"spectral_indices needs the core dimension 'pixels' of {name!r} in one chunk; "
                "rechunk with ds.chunk({'pixels': -1})"
            )
    if rv is None:
        rv_da = xr.DataArray(np.zeros(ds.sizes["spectra"]), dims="spectra")
        rv_name = "0 (rest frame)"
    elif isinstance(rv, str):
        if rv not in ds.variables:
            raise ValueError(f"rv: variable {rv!r} is not in the dataset")
        rv_da = ds[rv]
        if rv_da.dims != ("spectra",) or rv_da.dtype.kind not in "fiu":
            raise ValueError(f"rv: {rv!r} must be a numeric (spectra,) variable in km/s")
        rv_da = rv_da.astype(np.float64)
        rv_name = rv
    else:
        raise ValueError(f"rv must be a variable name or None, got {rv!r}")
    flux = ds["flux"]
    if flux.chunks is not None and rv_da.chunks is None:
        rv_da = rv_da.chunk({"spectra": flux.chunks[0]})
    elif flux.chunks is None and rv_da.chunks is not None:
        # keep everything lazy: follow the rv chunks
        flux = flux.chunk({"spectra": rv_da.chunks[0], "pixels": -1})
    # loglam travels as an input: a dask-backed coordinate must not be computed here
    loglam = xr.DataArray(ds["loglam"].variable)
    if isinstance(loglam.data, np.ndarray):
        ll = np.asarray(loglam.values, np.float64)
        if ll.ndim != 1 or not (np.all(np.isfinite(ll)) and np.all(np.diff(ll) > 0)):
            raise ValueError("coordinate 'loglam' must be finite and strictly increasing")
    bands = band_table()
    outs = xr.apply_ufunc(
        _block,
        flux,
        ds["ivar"],
        ds["ormask"],
        rv_da,
        loglam,
        input_core_dims=[["pixels"], ["pixels"], ["pixels"], [], ["pixels"]],
        output_core_dims=[[]] * (K.N_OUT + 1),
        dask="parallelized",
        output_dtypes=[np.float64] * K.N_OUT + [np.int8],
        kwargs=dict(max_gap=max_gap, zeta_coef=zc, bands=bands),
    )
    out = xr.Dataset({name: outs[q] for q, name in enumerate(INDEX_NAMES)})
    out["idx_status"] = outs[K.N_OUT]
    out = annotate(out)
    out["idx_status"].attrs.update(_STATUS_ATTRS)
    out.attrs.update(
        {
            "spectral_indices_rv": rv_name,
            "spectral_indices_max_gap_pix": max_gap,
            "spectral_indices_zeta_coef": list(map(float, zc)),
        }
    )
    return out
