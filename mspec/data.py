"""Locating and reading the real reference data: packaged with mspec, or beside the project.

The PyHammer templates (Kesseli et al. 2017; SDSS/BOSS co-adds, vacuum, rest frame, R~2000,
MIT) ship with mspec as a compact library, ``mspec/templates/pyhammer.npz`` (all 47 templates
resampled flux-conservingly onto one log10-λ grid of step 2.5e-5 dex; derived once by
``scripts/build_template_library.py``, see ``mspec/templates/README.md``), read by
:func:`packaged_templates`. It is the default of every template user, so results never
depend on whether ``../shared`` exists.

The original template FITS files and the real LAMOST files live in ``../shared/data`` next
to the repository, or wherever ``$MSPEC_SHARED_DATA`` points (:func:`pyhammer_files`,
:func:`read_pyhammer`).
"""

from __future__ import annotations

import fnmatch
import functools
import os
import re
from pathlib import Path

import numpy as np

__all__ = [
    "shared_data_dir",
    "pyhammer_dir",
    "pyhammer_files",
    "parse_pyhammer_name",
    "read_pyhammer",
    "packaged_templates_path",
    "packaged_templates",
]

#: Layout version of ``mspec/templates/pyhammer.npz`` (checked on reading).
PACKAGED_FORMAT = "mspec-pyhammer-v1"

_TEMPLATE_RE = re.compile(
    r"^(?P<spt>[OBAFGKML])(?P<sub>\d+(?:\.\d+)?)?(?:_(?P<feh>[+-]\d+\.\d+))?(?:_(?P<lum>Dwarf|Giant))?$"
)
_SPT_ORDER = "OBAFGKML"


def shared_data_dir() -> Path:
    """Return the directory holding the shared real data.

    ``$MSPEC_SHARED_DATA`` wins; otherwise ``../shared/data`` relative to the repository root
    (the directory above the ``mspec`` package).

    Returns
    -------
    pathlib.Path
        The data directory (not checked for existence; callers report what is missing).
    """
    env = os.environ.get("MSPEC_SHARED_DATA")
    if env:
        return Path(env).expanduser().resolve()
    return Path(__file__).resolve().parents[1].parent / "shared" / "data"


def pyhammer_dir() -> Path:
    """Return the PyHammer template directory (``<shared data>/templates_pyhammer``)."""
    return shared_data_dir() / "templates_pyhammer"


def _sort_key(path: Path):
    info = parse_pyhammer_name(path)
    feh = info["feh"]
    return (_SPT_ORDER.index(info["spt"][0]), info["subtype"], 0.0 if np.isnan(feh) else feh)


def pyhammer_files(pattern: str = "M*", directory: str | os.PathLike | None = None) -> list[Path]:
    """List PyHammer template files, ordered by spectral type, subtype and [Fe/H].

    Parameters
    ----------
    pattern : str
        Glob on the file name without ``.fits.gz`` (``"M*"``: the 33 M templates; ``"*"``: all).
    directory : path-like, optional
        Template directory (default :func:`pyhammer_dir`).

    Returns
    -------
    list of pathlib.Path

    Raises
    ------
    FileNotFoundError
        If the directory does not exist or no file matches ``pattern``.
    """
    d = Path(directory) if directory is not None else pyhammer_dir()
    if not d.is_dir():
        raise FileNotFoundError(
            f"template directory {str(d)!r} does not exist (set MSPEC_SHARED_DATA)"
        )
    files = [p for p in d.glob(f"{pattern}.fits*") if _TEMPLATE_RE.match(_stem(p))]
    if not files:
        raise FileNotFoundError(f"no PyHammer template matches pattern={pattern!r} in {str(d)!r}")
    return sorted(files, key=_sort_key)


def _stem(path: Path) -> str:
    name = Path(path).name
    for suffix in (".fits.gz", ".fits", ".fit.gz", ".fit"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem


def parse_pyhammer_name(path: str | os.PathLike) -> dict:
    """Parse a PyHammer template file name such as ``M3_+0.5_Dwarf.fits.gz``.

    Parameters
    ----------
    path : path-like
        Template file (only its name is used).

    Returns
    -------
    dict
        ``name`` (e.g. ``"M3_+0.5_Dwarf"``), ``spt`` (``"M3"``), ``subtype`` (float, 3.0),
        ``feh`` ([Fe/H] in dex, NaN when the name has none), ``lumclass`` (``"dV"`` for
        dwarfs, ``"gIII"`` for giants, ``""`` when unstated).

    Raises
    ------
    ValueError
        If the name does not follow the PyHammer convention.
    """
    stem = _stem(Path(path))
    m = _TEMPLATE_RE.match(stem)
    if m is None:
        raise ValueError(f"path={str(path)!r} is not a PyHammer template name like 'M3_+0.5_Dwarf'")
    sub = float(m["sub"]) if m["sub"] else 0.0
    lum = {"Dwarf": "dV", "Giant": "gIII", None: ""}[m["lum"]]
    return {
        "name": stem,
        "spt": f"{m['spt']}{m['sub'] or ''}",
        "subtype": sub,
        "feh": float(m["feh"]) if m["feh"] else float("nan"),
        "lumclass": lum,
    }


@functools.lru_cache(maxsize=64)
def _read_cached(path: str) -> tuple[np.ndarray, np.ndarray]:
    from astropy.io import fits

    with fits.open(path, memmap=False) as hdul:
        tab = hdul[1].data
        loglam = np.asarray(tab["LogLam"], dtype=np.float64)
        flux = np.asarray(tab["Flux"], dtype=np.float64)
    # LogLam is stored as float32, so it jitters by up to half a float32 ulp (2.4e-7 dex,
    # 0.16 km/s). The underlying grid is exactly linear: restore it with a straight-line fit.
    i = np.arange(loglam.size, dtype=np.float64)
    slope, intercept = np.polyfit(i, loglam, 1)
    fitted = intercept + slope * i
    if np.max(np.abs(fitted - loglam)) < 5e-7:
        loglam = fitted
    loglam.setflags(write=False)
    flux.setflags(write=False)
    return loglam, flux


def read_pyhammer(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Read one PyHammer template.

    Parameters
    ----------
    path : path-like
        A ``*.fits`` or ``*.fits.gz`` template file.

    Returns
    -------
    loglam : numpy.ndarray
        log10(vacuum wavelength / Angstrom), rest frame, float64, strictly increasing. The
        float32 jitter of the stored column is removed by a linear fit when the residual is
        below 5e-7 dex (it is for every shipped template).
    flux : numpy.ndarray
        Flux density (arbitrary normalisation), float64. Both arrays are read-only and cached.

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"template file {str(p)!r} does not exist")
    return _read_cached(str(p.resolve()))


def packaged_templates_path():
    """Return the packaged template library file (``mspec/templates/pyhammer.npz``).

    Returns
    -------
    importlib.resources.abc.Traversable
        The resource (a :class:`pathlib.Path` for a normal install); open it with ``.open("rb")``.
    """
    from importlib.resources import files

    return files("mspec").joinpath("templates", "pyhammer.npz")


@functools.lru_cache(maxsize=1)
def _packaged_cached() -> tuple[np.ndarray, np.ndarray, tuple[dict, ...]]:
    res = packaged_templates_path()
    if not res.is_file():
        raise FileNotFoundError(
            f"packaged template library {str(res)!r} is missing: reinstall mspec, or rebuild it "
            "with scripts/build_template_library.py"
        )
    with res.open("rb") as fh, np.load(fh, allow_pickle=False) as z:
        fmt = str(z["format"])
        if fmt != PACKAGED_FORMAT:
            raise ValueError(f"{str(res)!r} has format {fmt!r}, expected {PACKAGED_FORMAT!r}")
        npix = int(z["npix"])
        loglam = float(z["loglam0"]) + float(z["dloglam"]) * np.arange(npix, dtype=np.float64)
        planes = z["flux_shuffled"]  # (4, n, npix) little-endian byte planes of float32
        flux = np.ascontiguousarray(np.moveaxis(planes, 0, -1)).view("<f4")[..., 0]
        flux = flux.astype(np.float32, copy=False)
        info = tuple(
            {
                "name": str(n),
                "spt": str(s),
                "subtype": float(sub),
                "feh": float(feh),
                "lumclass": str(lc),
            }
            for n, s, sub, feh, lc in zip(
                z["name"], z["spt"], z["subtype"], z["feh"], z["lumclass"]
            )
        )
    if flux.shape != (len(info), npix):
        raise ValueError(f"{str(res)!r}: flux shape {flux.shape} != ({len(info)}, {npix})")
    loglam.setflags(write=False)
    flux.setflags(write=False)
    return loglam, flux, info


def packaged_templates(pattern: str = "*") -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """Read the PyHammer templates packaged with mspec (no ``../shared`` needed).

    All 47 templates of ``../shared/data/templates_pyhammer`` (Kesseli et al. 2017; MIT,
    licence and attribution in ``mspec/templates/``), resampled flux-conservingly onto one
    shared log10-λ grid (step 2.5e-5 dex, 3650.2-10199.1 Å) by
    ``scripts/build_template_library.py``.

    Parameters
    ----------
    pattern : str
        Shell-style glob on the template name, like :func:`pyhammer_files` (``"*"``: all 47,
        ``"M*"``: the 33 M templates, ``"K7_*"``...).

    Returns
    -------
    loglam : numpy.ndarray, shape (npix,)
        log10(vacuum rest wavelength / Å), float64, uniform step 2.5e-5 dex (pixel centres).
    flux : numpy.ndarray, shape (n, npix)
        Mean flux density over each pixel (arbitrary normalisation as in the source files),
        float32.
    info : list of dict
        Per template, as :func:`parse_pyhammer_name` gives: ``name``, ``spt``, ``subtype``,
        ``feh`` (dex, NaN when unstated), ``lumclass``. Ordered like :func:`pyhammer_files`.

    The arrays are read-only and shared between calls (cached).

    Raises
    ------
    TypeError
        If ``pattern`` is not a string.
    FileNotFoundError
        If no packaged template matches ``pattern`` (or the package data is missing).
    """
    if not isinstance(pattern, str):
        raise TypeError(f"pattern must be a string glob such as 'M*', got {type(pattern).__name__}")
    loglam, flux, info = _packaged_cached()
    idx = [j for j, i in enumerate(info) if fnmatch.fnmatchcase(i["name"], pattern)]
    if not idx:
        raise FileNotFoundError(f"no packaged PyHammer template matches pattern={pattern!r}")
    if len(idx) == len(info):
        return loglam, flux, [dict(i) for i in info]
    sub = flux[idx]
    sub.setflags(write=False)
    return loglam, sub, [dict(info[j]) for j in idx]
