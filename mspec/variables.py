"""Registry of every dataset variable mspec reads or writes.

Each entry gives the variable's dimensions, dtype kind, units and a description. Stages
attach these attributes with :func:`attrs_for` / :func:`annotate` and check their inputs with
:func:`validate`, so a wrong or missing variable fails early with a message that names it.

Dtype kinds follow numpy: ``"f"`` float, ``"i"`` signed int, ``"u"`` unsigned int, ``"b"``
bool, ``"S"`` string (numpy ``U``/``S``/``O``/``T`` all accepted). An exact numpy dtype may be
given instead (``"float32"``); then the stored dtype must match it exactly.

Later stages add their variables here, in their own section.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np

__all__ = [
    "C_KMS",
    "LOGLAM0",
    "DLOGLAM",
    "NPIX",
    "SDSS_BANDS",
    "Variable",
    "VARIABLES",
    "VariableError",
    "register",
    "attrs_for",
    "annotate",
    "validate",
    "loglam_grid",
]

#: Speed of light (km/s).
C_KMS = 299792.458
#: Shared native LAMOST grid: log10(lambda / Angstrom) = LOGLAM0 + DLOGLAM * i, vacuum.
LOGLAM0 = 3.5682
DLOGLAM = 1e-4
#: Number of native pixels on the shared grid (3700.0-9099.6 A; the longest real spectra).
NPIX = 3909
#: SDSS band edges (A) used for per-band S/N and masked-pixel fractions (orp_u..orp_z).
SDSS_BANDS = {
    "u": (3500.0, 4000.0),
    "g": (4000.0, 5500.0),
    "r": (5500.0, 6900.0),
    "i": (6900.0, 8400.0),
    "z": (8400.0, 9600.0),
}


def loglam_grid(npix: int = NPIX) -> np.ndarray:
    """Return the shared native log10-wavelength grid.

    Parameters
    ----------
    npix : int
        Number of pixels (default :data:`NPIX`).

    Returns
    -------
    numpy.ndarray
        float64 array of log10(lambda / Angstrom), vacuum.
    """
    return LOGLAM0 + DLOGLAM * np.arange(npix, dtype=np.float64)


class VariableError(ValueError):
    """A dataset variable is missing or does not match the registry."""


@dataclass(frozen=True)
class Variable:
    """Registry entry for one dataset variable.

    Parameters
    ----------
    dims : tuple of str
        Dimension names, in order.
    dtype : str
        numpy dtype kind (``"f"``, ``"i"``, ``"u"``, ``"b"``, ``"S"``) or an exact dtype name.
    units : str
        Physical units (astropy-parsable where physical; ``""`` for dimensionless).
    description : str
        One line saying what the variable holds.
    """

    dims: tuple[str, ...]
    dtype: str
    units: str
    description: str

    def dtype_ok(self, dtype: np.dtype) -> bool:
        """Whether ``dtype`` is acceptable for this variable."""
        dtype = np.dtype(dtype)
        if self.dtype == "S":
            return dtype.kind in "USOT"
        if len(self.dtype) == 1:
            return dtype.kind == self.dtype
        return dtype == np.dtype(self.dtype)


VARIABLES: dict[str, Variable] = {}


def register(name: str, dims: Iterable[str], dtype: str, units: str, description: str) -> Variable:
    """Add a variable to the registry.

    Parameters
    ----------
    name : str
        Variable name (``<thing>_<quantity>``).
    dims, dtype, units, description
        See :class:`Variable`.

    Returns
    -------
    Variable
        The new entry.

    Raises
    ------
    ValueError
        If ``name`` is already registered with a different definition.
    """
    var = Variable(tuple(dims), dtype, units, description)
    old = VARIABLES.get(name)
    if old is not None and old != var:
        raise ValueError(f"variable {name!r} is already registered as {old}")
    VARIABLES[name] = var
    return var


def _reg_many(dims, dtype, units, items: Mapping[str, str]) -> None:
    for name, desc in items.items():
        register(name, dims, dtype, units, desc)


S = ("spectra",)
SP = ("spectra", "pixels")

# --- coordinates ------------------------------------------------------------------------
register("obsid", S, "i", "", "LAMOST observation id (unique; derived for files without OBSID)")
register(
    "loglam", ("pixels",), "f", "dex", "log10 of vacuum wavelength in Angstrom, shared native grid"
)

# --- store: native spectra (issue 4) ----------------------------------------------------
register(
    "flux", SP, "float32", "", "flux in LAMOST units (relative flux calibration); NaN where no data"
)
register(
    "ivar", SP, "float32", "", "inverse variance of flux, in 1/flux**2; 0 where no data or bad"
)
register(
    "andmask",
    SP,
    "i",
    "",
    "LAMOST AND pixel bitmask (nonzero = bad in every exposure); set where padded",
)
register(
    "ormask",
    SP,
    "i",
    "",
    "LAMOST OR pixel bitmask (nonzero = bad in some exposure); set where padded",
)

# --- store: per-spectrum metadata -------------------------------------------------------
register("ra", S, "f", "deg", "right ascension (ICRS)")
register("dec", S, "f", "deg", "declination (ICRS)")
register("mjd", S, "i", "d", "modified Julian date of the observation")
for _b in SDSS_BANDS:
    register(
        f"snr_{_b}", S, "f", "", f"LAMOST pipeline signal-to-noise ratio in the SDSS {_b} band"
    )
register("lamost_class", S, "S", "", "LAMOST pipeline class (STAR, GALAXY, QSO, Unknown)")
register("lamost_subclass", S, "S", "", "LAMOST pipeline subclass (e.g. M2, dM0, gM3, K5, WD)")
register(
    "lamost_z", S, "f", "", "LAMOST pipeline redshift Z; NaN where the pipeline failed (Z = -9999)"
)
register("lamost_z_err", S, "f", "", "LAMOST pipeline redshift error; NaN where missing")
register("lamost_rv", S, "f", "km/s", "LAMOST pipeline radial velocity, Z * c; NaN where missing")
register("file", S, "S", "", "source file name (basename)")
register("release", S, "S", "", "LAMOST data release (e.g. 'LAMOST DR7'), from DATA_V or VERSPIPE")
register(
    "loglam_offset",
    S,
    "f",
    "pix",
    "offset of the file's first pixel from the shared grid before resampling",
)
register(
    "resampled",
    S,
    "b",
    "",
    "True if the file's wavelengths were off the grid and the spectrum was resampled",
)

# --- store: Gaia DR3 / Bailer-Jones / Bayestar / WISE cross-match -------------------------
register("gaia_source_id", S, "i", "", "Gaia DR3 source_id; -1 where no match")
register("phot_g_mean_mag", S, "f", "mag", "Gaia G magnitude")
register("phot_bp_mean_mag", S, "f", "mag", "Gaia BP magnitude")
register("phot_rp_mean_mag", S, "f", "mag", "Gaia RP magnitude")
register("parallax", S, "f", "mas", "Gaia parallax")
register("parallax_error", S, "f", "mas", "Gaia parallax error")
register("parallax_over_error", S, "f", "", "Gaia parallax / parallax_error")
register("phot_g_mean_flux_over_error", S, "f", "", "Gaia G flux over error")
register("phot_bp_mean_flux_over_error", S, "f", "", "Gaia BP flux over error")
register("phot_rp_mean_flux_over_error", S, "f", "", "Gaia RP flux over error")
register("ruwe", S, "f", "", "Gaia renormalised unit weight error")
register("r_med_geo", S, "f", "pc", "Bailer-Jones et al. 2021 median geometric distance")
register("ebv", S, "f", "mag", "E(B-V) reddening (Bayestar19, converted to E(B-V))")
register("w1", S, "f", "mag", "WISE W1 magnitude")
register("w2", S, "f", "mag", "WISE W2 magnitude")
register("w1_err", S, "f", "mag", "WISE W1 magnitude error")
register("w2_err", S, "f", "mag", "WISE W2 magnitude error")

# --- simulator truth (issue 3) ----------------------------------------------------------
register("true_class", S, "S", "", "true type: OB, A, F, G, K, M, GALAXY, QSO, WD")
register("true_lumclass", S, "S", "", "true luminosity class for M stars: dM or gM ('' otherwise)")
register("true_teff", S, "f", "K", "true effective temperature (NaN for galaxies/QSOs)")
register("true_logg", S, "f", "dex", "true log10 surface gravity, cgs (NaN for galaxies/QSOs)")
register("true_m_h", S, "f", "dex", "true metallicity [M/H] (NaN for galaxies/QSOs)")
register("true_alpha_m", S, "f", "dex", "true alpha enhancement [alpha/M] (NaN for galaxies/QSOs)")
register("true_rv", S, "f", "km/s", "true radial velocity (c*z for galaxies/QSOs)")
register(
    "true_active", S, "b", "", "True if the star has H-alpha emission (chromospheric activity)"
)
register(
    "true_subclass",
    S,
    "S",
    "",
    "true subtype: M0..M9 (dM), gM0..gM7, O/B/A/F/G/K subtype, DA/DB/DC, STARFORMING/PASSIVE, QSO",
)
register("true_distance", S, "f", "pc", "true distance (NaN for galaxies/QSOs)")
register("true_ebv", S, "f", "mag", "true E(B-V) applied to the spectrum and photometry")

# --- preprocessing (issue 5) ------------------------------------------------------------
register(
    "wavelength_grid",
    ("grid",),
    "f",
    "Angstrom",
    "vacuum wavelength of the 1 A model grid (observed frame for cnn, rest frame for tlma)",
)
register(
    "flux_grid",
    ("spectra", "grid"),
    "float32",
    "",
    "preprocessed flux on the 1 A grid (z-scored); NaN outside coverage or if status != 0",
)
for _b in SDSS_BANDS:
    register(
        f"orp_{_b}",
        S,
        "f",
        "",
        f"fraction of ormask != 0 pixels in the SDSS {_b} band, over the spectrum's "
        "finite-flux pixels; NaN if it has none there",
    )
register("grid_coverage", S, "f", "", "fraction of wavelength_grid covered by the good-pixel range")
register(
    "preprocess_status",
    S,
    "i",
    "",
    "preprocessing status: 0 ok, 1 no good pixels, 2 no grid coverage, 3 zero variance, "
    "4 bad rv (NaN or |rv| >= c)",
)
register("npix_good", S, "i", "pix", "number of native pixels kept by preprocessing step 1")
register(
    "flux_masked",
    SP,
    "float32",
    "",
    "flux after step 1 (tm recipe): NaN where ormask != 0, ivar <= 0 or flux non-finite",
)
register("ivar_masked", SP, "float32", "", "ivar after step 1 (tm recipe): 0 at dropped pixels")
# --- template-matching RV (issue 6) -----------------------------------------------------
register(
    "velocities",
    ("velocities",),
    "f",
    "km/s",
    "trial RVs of the template-matching chi2 grid (lattice values nearest 60n, n=-10..10)",
)
for _p, _lbl in (("tm", "TM (4700-8899 A)"), ("tml7500", "TML7500 (4700-7500 A)")):
    register(f"rv_{_p}", S, "f", "km/s", f"{_lbl} radial velocity; NaN when {_p}_status != 0")
    register(
        f"rv_{_p}_err",
        S,
        "f",
        "km/s",
        f"{_lbl} RV error as in the paper: std of the 1001 shift re-measurement residuals",
    )
    register(
        f"rv_{_p}_err_stat",
        S,
        "f",
        "km/s",
        f"{_lbl} calibrated statistical RV error: chi2 curvature, residual (sandwich) variance",
    )
    register(f"{_p}_template", S, "S", "", f"{_lbl} best template name ('' when none)")
    register(
        f"{_p}_chi2_min",
        S,
        "f",
        "",
        f"{_lbl} minimum chi2 (Gaussian fit) of the best template, flux units squared",
    )
    register(
        f"{_p}_chi2",
        ("spectra", "velocities"),
        "f",
        "",
        f"{_lbl} chi2 curve of the best template on the trial RV grid",
    )
    register(
        f"{_p}_status",
        S,
        "i",
        "",
        f"{_lbl} status: 0 ok, 1 no coverage, 2 flat chi2, 3 fit failed, 4 RV outside grid, "
        "5 shift step failed",
    )
register("template_name", ("templates",), "S", "", "template name (unique)")
register(
    "template_wavelength",
    ("grid",),
    "f",
    "Angstrom",
    "template 1 A grid, vacuum rest frame (4600-8999 A: 4700-8899 plus shift margin)",
)
register(
    "template_flux",
    ("templates", "grid"),
    "f",
    "",
    "template flux after steps 3 and 4b, normalised (mean or z-score); NaN outside coverage",
)
register("template_spt", ("templates",), "S", "", "template spectral type ('' if unknown)")
register("template_teff", ("templates",), "f", "K", "template Teff (NaN if unknown)")
register("template_logg", ("templates",), "f", "dex", "template log g, cgs (NaN if unknown)")
register("template_m_h", ("templates",), "f", "dex", "template [M/H] or [Fe/H] (NaN if unknown)")
register("template_lumclass", ("templates",), "S", "", "template luminosity class (dV/dM/gM; '')")
register("template_source", ("templates",), "S", "", "where the template comes from")
# --- CNNs (issue 7) ---------------------------------------------------------------------
for _k, _net in (("spt", "CNN-SPT"), ("wdm", "CNN-WDM"), ("dmgm", "CNN-dMgM")):
    register(f"{_k}_classes", (f"{_k}_classes",), "S", "", f"class names of {_net} (coordinate)")
    register(
        f"{_k}_prob",
        ("spectra", f"{_k}_classes"),
        "f",
        "",
        f"{_net} class probabilities (softmax, mean over members); NaN where no usable data",
    )
    register(f"{_k}_class", S, "S", "", f"{_net} most probable class; '' where no usable data")
for _p, _u, _d in (
    ("teff", "K", "effective temperature"),
    ("logg", "dex", "log10 surface gravity, cgs"),
    ("m_h", "dex", "metallicity [M/H]"),
    ("alpha_m", "dex", "alpha enhancement [alpha/M]"),
):
    register(_p, S, "f", _u, f"CNN-TLMA {_d}: mean over the k-fold ensemble")
    register(
        f"{_p}_err", S, "f", _u,
        f"CNN-TLMA {_d} error: calibrated (ensemble std with a fitted floor; raw std in {_p}_err_ens)",
    )  # fmt: skip


def attrs_for(name: str) -> dict[str, str]:
    """Return the xarray attrs (``units``, ``long_name``) for a registered variable.

    Parameters
    ----------
    name : str
        Registered variable name.

    Returns
    -------
    dict
        ``{"units": ..., "long_name": ...}``.

    Raises
    ------
    VariableError
        If ``name`` is not registered.
    """
    try:
        var = VARIABLES[name]
    except KeyError:
        raise VariableError(f"variable {name!r} is not in the registry (mspec.variables)") from None
    return {"units": var.units, "long_name": var.description}


def annotate(ds, names: Iterable[str] | None = None):
    """Attach registry attrs to the variables of ``ds`` (returns a new Dataset, lazily).

    Parameters
    ----------
    ds : xarray.Dataset
        Dataset whose variables to annotate.
    names : iterable of str, optional
        Variables to annotate; default every registered variable present in ``ds``.

    Returns
    -------
    xarray.Dataset
        Shallow copy with ``units`` and ``long_name`` attrs set.
    """
    ds = ds.copy()
    if names is None:
        names = [n for n in ds.variables if n in VARIABLES]
    for name in names:
        ds[name].attrs.update(attrs_for(name))
    return ds


def validate(ds, names: Iterable[str] | None = None, *, check_units: bool = False):
    """Check that ``ds`` holds the named variables with registered dims and dtypes.

    Only metadata is inspected: nothing is computed, so this is cheap on lazy datasets.

    Parameters
    ----------
    ds : xarray.Dataset
        Dataset to check.
    names : iterable of str, optional
        Variables that must be present and valid. Default: every variable (and coordinate)
        of ``ds`` that is in the registry; unregistered variables are then ignored.
    check_units : bool
        Also require the ``units`` attr to equal the registry's.

    Returns
    -------
    xarray.Dataset
        ``ds`` itself, so calls can be chained.

    Raises
    ------
    VariableError
        Naming the first offending variable and what is wrong: not registered, missing,
        wrong dims, wrong dtype or wrong units.
    """
    if names is None:
        names = [n for n in ds.variables if n in VARIABLES]
    elif isinstance(names, str):
        names = [names]
    problems = []
    for name in names:
        var = VARIABLES.get(name)
        if var is None:
            problems.append(f"{name!r} is not in the registry (mspec.variables)")
            continue
        if name not in ds.variables:
            problems.append(f"{name!r} is missing from the dataset")
            continue
        da = ds[name]
        if tuple(da.dims) != var.dims:
            problems.append(f"{name!r} has dims {tuple(da.dims)}, expected {var.dims}")
        if not var.dtype_ok(da.dtype):
            problems.append(f"{name!r} has dtype {da.dtype}, expected {var.dtype!r}")
        if check_units and da.attrs.get("units", None) != var.units:
            problems.append(f"{name!r} has units {da.attrs.get('units')!r}, expected {var.units!r}")
    if problems:
        raise VariableError("invalid dataset: " + "; ".join(problems))
    return ds


# --- CMD and spectral indices (issue 14) ---
register("M_G_0", S, "f", "mag", "extinction-corrected absolute G: G - 5 log10 r_med_geo + 5 - A_G")
register("bp_rp_0", S, "f", "mag", "extinction-corrected Gaia colour (BP - RP)_0")
register("W1_W2_0", S, "f", "mag", "extinction-corrected AllWISE colour (W1 - W2)_0")
register(
    "CMD_flag", S, "i", "", "1: the five Gaia quality cuts pass (paper Sect. 3.4.1); 0 otherwise"
)
register(
    "CMD_pos", S, "S", "", "Gaia CMD position: dM, gM, other; '' where not placed (CMD_flag 0)"
)
register("gaia_match_sep", S, "f", "arcsec", "separation of the positional Gaia match; NaN if none")
register("idx_cah2", S, "f", "", "CaH2 band index (Reid et al. 1995), rest frame")
register("idx_cah3", S, "f", "", "CaH3 band index (Reid et al. 1995), rest frame")
register("idx_tio5", S, "f", "", "TiO5 band index (Reid et al. 1995), rest frame")
register("idx_zeta", S, "f", "", "zeta_TiO/CaH metallicity index (Lepine et al. 2007)")
register("ew_ki", S, "f", "Angstrom", "K I 7665/7699 doublet equivalent width (absorption > 0)")
register("ew_nai", S, "f", "Angstrom", "Na I 8183/8195 doublet equivalent width (absorption > 0)")
register("ew_caii", S, "f", "Angstrom", "Ca II triplet equivalent width (absorption > 0)")
register("idx_status", S, "int8", "", "spectral_indices status (CF flag_values/flag_meanings)")


# --- line-by-line RVs (issue 13) ---
register("lines", ("lines",), "S", "", "spectral line name, e.g. 'KI_7667' (suffix _em: emission)")
register("line_wavelength", ("lines",), "f", "Angstrom", "vacuum rest wavelength of the line")
register("line_kind", ("lines",), "S", "", "'absorption' (DSAL lines) or 'emission' (DSEL lines)")
register(
    "rv_line",
    ("spectra", "lines"),
    "f",
    "km/s",
    "RV of one line: Gaussian-on-linear-continuum centre; NaN when line_status != 0",
)
register(
    "rv_line_err",
    ("spectra", "lines"),
    "f",
    "km/s",
    "error of rv_line from the fit covariance (ivar), scaled by max(1, reduced chi2)",
)
register(
    "line_status",
    ("spectra", "lines"),
    "i",
    "",
    "line fit status: 0 ok, 1 no rv_init, 2 no data, 3 too few pixels, 4 fit failed, "
    "5 centre at window edge, 6 wrong sign of amplitude, 7 width out of range, 8 too weak",
)
register(
    "ew_halpha",
    S,
    "f",
    "Angstrom",
    "H-alpha equivalent width, rest frame, negative = emission; NaN when not measurable",
)
register(
    "rv_dsal1",
    S,
    "f",
    "km/s",
    "DSAL I RV: mean of >= 3 mutually consistent absorption-line RVs; NaN otherwise",
)
register("rv_dsal1_err", S, "f", "km/s", "DSAL I error: std (ddof=0) of the consistent lines")
register("rv_dsal1_n", S, "i", "", "number of consistent absorption lines (DSAL I needs >= 3)")
register(
    "rv_dsal2", S, "f", "km/s", "DSAL II RV: mean after iterative 1-sigma clipping of line RVs"
)
register(
    "rv_dsal2_err",
    S,
    "f",
    "km/s",
    "DSAL II error: std (ddof=0) of the lines left (one line: its fit error)",
)
register("rv_dsal2_n", S, "i", "", "number of absorption lines left by DSAL II clipping")
register(
    "rv_dsel",
    S,
    "f",
    "km/s",
    "DSEL RV: DSAL II rule on emission-line RVs, when H-alpha emission is detected; else NaN",
)
register(
    "rv_dsel_err",
    S,
    "f",
    "km/s",
    "DSEL error: std (ddof=0) of the emission lines left (one line: its fit error)",
)
register("rv_dsel_n", S, "i", "", "number of emission lines left by DSEL clipping (0: none)")
# --- reader warnings (issue 17) ------------------------------------------------------------
register(
    "read_warnings",
    ("spectra",),
    "S",
    "",
    "what the reader read as missing or cleaned (unparsable header cards, invalid mask values); "
    "'' if nothing",
)

# --- SCM and DGCM decision rules; ZrO / C2 indices (issue 14, part 2) ---------------------
register("idx_zro", S, "f", "", "ZrO 6474 bandhead index (band / blueward continuum; S stars < 1)")
register(
    "idx_c2", S, "f", "", "C2 Swan 5165 bandhead index (band / redward continuum; C stars < 1)"
)
register(
    "entered", S, "b", "", "True if the spectrum entered SCM (M_Catalog_V0 for entry='lamost')"
)
register("is_m", S, "b", "", "SCM decision: True if the spectrum is an M star")
register(
    "scm_class",
    S,
    "S",
    "",
    "SCM type: M, or the non-M type (OB, A, F, G, K, WD, GALAXY, QSO, S, C); '' if not entered",
)
register("scm_prob", S, "f", "", "SCM probability of scm_class; NaN where no evidence")
register(
    "scm_reason", S, "S", "", "SCM rule that decided (docs/classification.md); '' if not entered"
)
register("scm_inspect", S, "S", "", "why SCM wants a human look; '' if the rules settled it")
register(
    "new_m", S, "b", "", "True if SCM found an M star that LAMOST classified as something else"
)
register("luminosity_class", S, "S", "", "DGCM luminosity class: dM or gM; '' for non-M")
register("dgcm_prob", S, "f", "", "DGCM probability of luminosity_class; NaN for non-M")
register("dgcm_reason", S, "S", "", "DGCM rule that decided (docs/classification.md); '' for non-M")
register("dgcm_inspect", S, "S", "", "why DGCM wants a human look; '' if the rules settled it")
register(
    "dgcm_idx_score",
    S,
    "f",
    "",
    "dwarf/giant index score (natural-log likelihood ratio, > 0 giant-like); NaN if unmeasured",
)
# --- calibrated CNN-TLMA errors (issue 18, machine-learning half) ----------------------------
# <p>_err (registered above) is now the calibrated error (mspec.ml.calibrate); the paper's
# error, the raw ensemble std, keeps its own name:
for _p, _u, _d in (
    ("teff", "K", "effective temperature"),
    ("logg", "dex", "log10 surface gravity, cgs"),
    ("m_h", "dex", "metallicity [M/H]"),
    ("alpha_m", "dex", "alpha enhancement [alpha/M]"),
):
    register(
        f"{_p}_err_ens",
        S,
        "f",
        _u,
        f"CNN-TLMA {_d}: raw std (ddof=1) over the k-fold ensemble (the paper's error; "
        f"{_p}_err is the calibrated error)",
    )

# --- catalog flags (issue 15) --------------------------------------------------------------
register(
    "parameter_flag",
    S,
    "int8",
    "",
    "1: the CNN-TLMA parameters are recommended (paper Sect. 4.1: S/N_i > 0, error within "
    "mean + 3 std of its fitted model, values inside Table 10); 0 otherwise",
)
register("parameter_flag_reason", S, "S", "", "why parameter_flag is 0 ('' when 1)")


# --- RV reconciliation, TM quality, inspection queue, simulator failure modes (issue 13) ---
for _p, _lbl in (("tm", "TM"), ("tml7500", "TML7500")):
    register(
        f"{_p}_quality",
        S,
        "i",
        "",
        f"{_lbl} quality bits (CF flag_masks): 1 chi2 minimum at the trial-grid edge, "
        "2 ambiguous (a second minimum >= 180 km/s away at least half as deep); 0 good",
    )
    register(
        f"{_p}_chi2_red",
        S,
        "f",
        "",
        f"{_lbl} reduced chi2: {_p}_chi2_min over the mean noise variance (1/ivar) of the "
        "window pixels; ~1 for a perfect template",
    )
register("rv", S, "f", "km/s", "reconciled radial velocity (paper: rv); NaN without a reliable RV")
register("rv_err", S, "f", "km/s", "error of rv, calibrated on the run (see docs/rv_reconcile.md)")
register(
    "rv_from",
    S,
    "S",
    "",
    "source of rv: LAMOST, TM, DSAL I, DSAL II, TML7500, DSEL, NoRV_lowQuality, NoRV_waveErr",
)
register("rv_inspect", S, "S", "", "why the RV is queued for inspection ('' when settled)")
register("rv_flag", S, "i", "", "1: rv is not null and the spectrum was observed after MJD 55940")
register(
    "tm_chi2_excess",
    S,
    "f",
    "",
    "log10 tm_chi2_red above the run's median for the S/N_i bin, in robust sigma",
)
register(
    "red_end_excess",
    S,
    "f",
    "",
    "red-end anomaly statistic: log10(tm_chi2_red / tml7500_chi2_red) above the run's "
    "median for the S/N_i bin, in robust sigma",
)
register(
    "line_rv_slope",
    S,
    "f",
    "m / (s Angstrom)",
    "slope of the absorption-line RVs against wavelength (= km/s per 1000 A); NaN < 4 lines",
)
register(
    "true_failure",
    S,
    "S",
    "",
    "simulated failure mode (mspec.simulate.failures): red_end_anomaly, wave_calibration, "
    "emission_dwarf, very_low_snr, lamost_rv_catastrophic, lamost_rv_modest; '' none",
)
