"""The catalogs of a run (paper Sect. 3.1 and 4.1): M_Catalog_V0–V3, the recommended catalog
and non-M_Catalog, as Dask DataFrames; their summary, writers, reader and run-to-run diff.

:func:`build_catalog` reads a run directory (``RUN/config.resolved.toml`` names the store;
``RUN/stages/<name>.zarr`` hold the stage outputs, read with
:func:`mspec.io.zarrio.read_results` and joined to :func:`mspec.open_store` on the spectra
order; ``RUN/inputs.json`` holds the model and template hashes) and returns, lazily:

``M_Catalog_V0``
    The input M list: the spectra that entered SCM (``entered``; without SCM decisions in the
    run, LAMOST's M list: subclass ``dM*``, ``gM*``, ``sdM*`` or ``M*``).
``M_Catalog_V1``
    V0 after SCM: the spectra SCM kept as M (``is_m``), with the CMD, CNN-SPT/WDM and SCM
    columns.
``M_Catalog_V2``
    V1 after DGCM: the spectra with a ``luminosity_class`` dM or gM.
``M_Catalog_V3``
    V2 after RVMM: the same rows (the paper removes no spectrum in RVMM) with the reconciled
    ``rv``, ``rv_err``, ``rv_from``, ``rv_flag``, ``rv_inspect`` and the method RVs.
``recommended``
    V3 with the SPMM parameters and both flags: every Table-9 field with the paper's names,
    units and order (:data:`TABLE9`), then ``parameter_flag_reason``, the provenance
    columns and, for simulated surveys, the ``true_*`` columns.
``non_M_Catalog``
    The V1 rejects (``catalog`` = ``non-M_Catalog_V1``, ``type`` = ``scm_class``) and V2
    rejects (``non-M_Catalog_V2``, ``type`` ``UNKNOWN``: DGCM says not dM/gM), with their
    ``reason`` and ``prob``.

So, by construction, ``V0 = V1 + non-M from V1``, ``V1 = V2 + non-M from V2`` and
``V3 ⊆ V2`` (equal). A stage whose outputs are missing from the run (not run yet, or not
built in this mspec) never stops the build: its columns are present as nulls (NaN, ``<NA>``
or ``""``), its cut passes every spectrum, and :attr:`CatalogSet.notes` (and the summary)
say so. Spectra of chunks a stage has not finished (``RUN/stages/<name>.done/`` records) are
treated the same way, row by row. A stage group without a ``.done`` directory (written in
one go, e.g. by :func:`mspec.io.zarrio.write_results`) counts as complete.

When no stage provides the CMD columns (``M_G_0``, ``bp_rp_0``, ``W1_W2_0``, ``CMD_flag``,
``CMD_pos``) but the store holds the Gaia/WISE columns, they are computed here with
:func:`mspec.cmd.place` (noted).

Provenance: every row carries ``prov_mspec_version`` (the mspec that built the catalog),
``prov_models``, ``prov_templates`` and ``prov_config``: the first 16 hex digits of the
sha256 of the model files (``inputs.json``), of the template set, and of the
result-relevant configuration (every section but ``[cluster]`` and ``[numba]``, and not the
paths). The full digests, the stage stamps and the catalog's column units and descriptions
go to the file metadata (Parquet key-value metadata ``mspec``; FITS header cards), see
:func:`write`.

The ``parameter_flag`` error model is fitted on the recommended rows (one pass; the only
computation :func:`build_catalog` does) and saved as ``RUN/catalog/parameter_flag.json``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from mspec.flags import PARAMETERS, ParameterFlagFit, parameter_flag, rv_flag

log = logging.getLogger("mspec.catalog")

__all__ = [
    "CATALOG_KEYS",
    "TABLE9",
    "PROVENANCE_COLUMNS",
    "ColumnSpec",
    "CatalogSet",
    "CatalogError",
    "build_catalog",
    "per_spectrum_table",
    "catalog_summary",
    "column_spec",
    "write",
    "read_catalog",
    "diff_catalogs",
    "diff_runs",
]

#: Keys of :func:`build_catalog`'s result, in cascade order.
CATALOG_KEYS = (
    "M_Catalog_V0",
    "M_Catalog_V1",
    "M_Catalog_V2",
    "M_Catalog_V3",
    "recommended",
    "non_M_Catalog",
)

#: Provenance columns carried by every row of every catalog.
PROVENANCE_COLUMNS = ("prov_mspec_version", "prov_models", "prov_templates", "prov_config")

#: Config sections that do not change results (left out of the config hash).
_NON_RESULT_SECTIONS = ("cluster", "numba")
_PIPELINE_ORDER = ("preprocess", "scm", "cmd", "dgcm", "rvmm", "reconcile", "spmm")
_SKIP_VARS = {"flux", "ivar", "andmask", "ormask", "flux_masked", "ivar_masked", "spectra"}


class CatalogError(RuntimeError):
    """A catalog cannot be built or read (the message says why)."""


@dataclass(frozen=True)
class ColumnSpec:
    """One catalog column: dtype, units and description.

    Parameters
    ----------
    name : str
        Column name in the catalog.
    dtype : str
        pandas dtype: ``float64``, ``int64``, ``int8``, ``Int64``/``Int8`` (nullable),
        ``boolean`` (nullable) or ``string``.
    unit : str
        astropy-parsable unit, ``""`` for dimensionless.
    description : str
        One line.
    source : str
        Registry variable it comes from (``""``: made by the catalog).
    """

    name: str
    dtype: str
    unit: str
    description: str
    source: str = ""


def _t9(name, dtype, unit, desc, source=None):
    return ColumnSpec(name, dtype, unit, desc, name if source is None else source)


#: Paper Table 9: the recommended catalog's fields, in order (name, dtype, unit, description).
TABLE9: tuple[ColumnSpec, ...] = (
    _t9("obsid", "int64", "", "The unique spectral ID from LAMOST"),
    _t9("ra", "float64", "deg", "Right ascension from LAMOST (ICRS)"),
    _t9("dec", "float64", "deg", "Declination from LAMOST (ICRS)"),
    *(
        _t9(f"snr_{b}", "float64", "", f"The signal-to-noise ratio in the {b} band")
        for b in "ugriz"
    ),
    *(
        _t9(f"orp_{b}", "float64", "", f"The proportion of nonzero ormask values in the {b} band")
        for b in "ugriz"
    ),
    _t9("subclass", "string", "", "The stellar spectral type from LAMOST", "lamost_subclass"),
    _t9("luminosity_class", "string", "", "The corrected dM/gM classification result (DGCM)"),
    _t9("rv", "float64", "km/s", "The corrected RV (RVMM); null where no reliable RV"),
    _t9("rv_err", "float64", "km/s", "The error in RV"),
    _t9(
        "rv_from",
        "string",
        "",
        "The source of RV (LAMOST, TM, DSAL I, DSAL II, TML7500, "
        "DSEL, NoRV_lowQuality, NoRV_waveErr)",
    ),  # fmt: skip
    _t9("teff", "float64", "K", "Effective temperature (CNN-TLMA ensemble mean)"),
    _t9("teff_err", "float64", "K", "The error of the effective temperature"),
    _t9("logg", "float64", "dex", "Surface gravity log10(g / (cm s-2))"),
    _t9("logg_err", "float64", "dex", "The error of the surface gravity"),
    _t9("m_h", "float64", "dex", "Metallicity [M/H]"),
    _t9("m_h_err", "float64", "dex", "The error in the metallicity"),
    _t9("alpha_m", "float64", "dex", "Alpha element abundance [alpha/M]"),
    _t9("alpha_m_err", "float64", "dex", "The error of the alpha element abundance"),
    _t9("rv_flag", "int8", "", "The RV validity flag: 1 rv not null and mjd > 55940, else 0", ""),
    _t9(
        "parameter_flag", "int8", "", "The stellar parameter quality flag: 1 recommended, 0 not", ""
    ),
    _t9(
        "source_id",
        "Int64",
        "",
        "The unique source identifier from Gaia DR3 (null: no match)",
        "gaia_source_id",
    ),  # fmt: skip
    _t9("r_med_geo", "float64", "pc", "Median geometric distance (Bailer-Jones et al. 2021)"),
    _t9("ebv", "float64", "mag", "The colour excess E(B-V)"),
    _t9("bp_rp_0", "float64", "mag", "The extinction-corrected Gaia BP-RP colour"),
    _t9("M_G_0", "float64", "mag", "The absolute magnitude in Gaia's G band (paper Eq. 1)"),
    _t9(
        "CMD_flag",
        "Int8",
        "",
        "The Gaia astrometric quality flag: 1 reliable, 0 not (null: no CMD in the run)",
    ),  # fmt: skip
    _t9("CMD_pos", "string", "", "Position on the Gaia CMD for CMD_flag = 1: dM, gM, other"),
    _t9("W1_W2_0", "float64", "mag", "The extinction-corrected AllWISE W1-W2 colour"),
    _t9("e_W1", "float64", "mag", "The mean error of the AllWISE W1 magnitude", "w1_err"),
    _t9("e_W2", "float64", "mag", "The mean error of the AllWISE W2 magnitude", "w2_err"),
)
TABLE9_NAMES = tuple(c.name for c in TABLE9)

# columns of each cascade level (registry names), in order; present ones are kept
_V0_COLS = (
    "obsid", "ra", "dec", "mjd", "snr_u", "snr_g", "snr_r", "snr_i", "snr_z", "lamost_class",
    "lamost_subclass", "lamost_rv", "release", "file", "gaia_source_id", "r_med_geo", "ebv",
    "phot_g_mean_mag", "phot_bp_mean_mag", "phot_rp_mean_mag", "parallax", "parallax_error",
    "parallax_over_error", "phot_g_mean_flux_over_error", "phot_bp_mean_flux_over_error",
    "phot_rp_mean_flux_over_error", "ruwe", "w1", "w2", "w1_err", "w2_err",
)  # fmt: skip
_V1_COLS = (
    "orp_u", "orp_g", "orp_r", "orp_i", "orp_z", "preprocess_status", "spt_class", "wdm_class",
    "M_G_0", "bp_rp_0", "W1_W2_0", "CMD_flag", "CMD_pos", "entered", "is_m", "new_m",
    "scm_class", "scm_prob", "scm_reason", "scm_inspect",
)  # fmt: skip
_V2_COLS = (
    "dmgm_class", "luminosity_class", "dgcm_prob", "dgcm_reason", "dgcm_inspect",
)  # fmt: skip
_V3_COLS = (
    "rv", "rv_err", "rv_from", "rv_flag", "rv_inspect", "rv_tm", "rv_tm_err", "tm_status",
    "tm_template", "rv_tml7500", "rv_tml7500_err", "tml7500_status", "rv_dsal1",
    "rv_dsal1_err", "rv_dsal2", "rv_dsal2_err", "rv_dsel", "rv_dsel_err", "ew_halpha",
)  # fmt: skip
_NONM_COLS = ("catalog", "type", "reason", "prob")
# outputs of the modules whose absence is reported (module -> representative columns)
_MODULE_OUTPUTS = {
    "preprocess": ("orp_u", "orp_g", "orp_r", "orp_i", "orp_z"),
    "SCM": ("is_m", "scm_class", "scm_prob", "scm_reason"),
    "CMD": ("M_G_0", "bp_rp_0", "W1_W2_0", "CMD_flag", "CMD_pos"),
    "DGCM": ("luminosity_class", "dgcm_prob", "dgcm_reason"),
    "RVMM reconciliation": ("rv", "rv_err", "rv_from"),
    "SPMM": PARAMETERS + tuple(f"{p}_err" for p in PARAMETERS),
}
# dtypes of columns produced by other modules, when they are absent (null columns)
_NULL_DTYPES = {
    "entered": "boolean", "is_m": "boolean", "new_m": "boolean", "CMD_flag": "Int8",
    "rv_flag": "int8", "preprocess_status": "Int8", "tm_status": "Int8",
    "tml7500_status": "Int8", "gaia_source_id": "Int64", "mjd": "Int64",
}  # fmt: skip
_STRING_COLS = {
    "lamost_class", "lamost_subclass", "release", "file", "spt_class", "wdm_class", "CMD_pos",
    "scm_class", "scm_reason", "scm_inspect", "dmgm_class", "luminosity_class", "dgcm_reason",
    "dgcm_inspect", "rv_from", "rv_inspect", "tm_template", "catalog", "type", "reason",
}  # fmt: skip
_EXTRA_DESC = {
    "catalog": ("", "which non-M catalog: non-M_Catalog_V1 (SCM) or non-M_Catalog_V2 (DGCM)"),
    "type": ("", "the type assigned to the non-M spectrum (SCM class; UNKNOWN for DGCM rejects)"),
    "reason": ("", "the rule that rejected the spectrum (scm_reason or dgcm_reason)"),
    "prob": ("", "probability of the assigned type (scm_prob or 1 - dgcm_prob); NaN if none"),
    "parameter_flag_reason": ("", "why parameter_flag is 0 ('' when 1)"),
    "prov_mspec_version": ("", "mspec version that built the catalog"),
    "prov_models": ("", "sha256 (first 16 hex digits) of the CNN model files of the run"),
    "prov_templates": ("", "sha256 (first 16 hex digits) of the RV template set of the run"),
    "prov_config": ("", "sha256 (first 16 hex digits) of the result-relevant run configuration"),
    "rv": ("km/s", "reconciled radial velocity (RVMM); NaN where no reliable RV"),
    "rv_err": ("km/s", "error of rv"),
    "rv_from": ("", "source of rv: LAMOST, TM, DSAL I, DSAL II, TML7500, DSEL, NoRV_*"),
    "rv_flag": ("", "1 if rv is not null and mjd > 55940 (2012-01-14), else 0"),
    "rv_inspect": ("", "why RVMM wants a human look; '' if the rules settled it"),
}


class CatalogSet(dict):
    """``dict[str, dask.dataframe.DataFrame]`` of a run's catalogs, plus what built them.

    Attributes
    ----------
    notes : list of str
        What was missing or approximated (absent stages, unfinished chunks, CMD computed
        here, ...).
    provenance : dict
        Full digests and versions (``mspec_version``, ``models_sha256``,
        ``templates_sha256``, ``config_sha256``, ``stages``: the stage stamps).
    parameter_fit : ParameterFlagFit or None
        The ``parameter_flag`` error model used.
    columns : dict
        name -> :class:`ColumnSpec` of every column of every catalog.
    run_dir : str
        The run directory ('' when built otherwise).
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.notes: list[str] = []
        self.provenance: dict = {}
        self.parameter_fit: ParameterFlagFit | None = None
        self.columns: dict[str, ColumnSpec] = {}
        self.run_dir: str = ""


# --------------------------------------------------------------------------- column specs


def column_spec(name: str, dtype: str | None = None) -> ColumnSpec:
    """Units and description of a catalog column (Table 9, the registry, or the catalog's own).

    Parameters
    ----------
    name : str
        Column name.
    dtype : str, optional
        Its pandas dtype (filled in for columns outside Table 9).

    Returns
    -------
    ColumnSpec
    """
    from mspec.variables import VARIABLES

    for c in TABLE9:
        if c.name == name:
            return c
    if name in _EXTRA_DESC:
        unit, desc = _EXTRA_DESC[name]
        return ColumnSpec(name, dtype or "", unit, desc, "")
    var = VARIABLES.get(name)
    if var is not None:
        return ColumnSpec(name, dtype or "", var.units, var.description, name)
    return ColumnSpec(name, dtype or "", "", "", "")


# --------------------------------------------------------------------------- reading a run


def _short(h: str) -> str:
    return (h or "")[:16]


def _sha(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def _group_order(names: Iterable[str]) -> list[str]:
    names = list(names)
    head = [n for n in _PIPELINE_ORDER if n in names]
    return head + sorted(n for n in names if n not in head)


def _done_mask(run_dir: Path, name: str, n: int) -> np.ndarray | None:
    """Rows of stage ``name`` whose chunk is finished; None when the group has no records."""
    from mspec._exec import DoneRecords

    d = run_dir / "stages" / f"{name}.done"
    if not d.is_dir():
        return None
    mask = np.zeros(n, dtype=bool)
    for a, b in DoneRecords(d).ranges():
        mask[max(0, a) : min(n, b)] = True
    return mask


def _provenance(run_dir: Path, cfg) -> dict:
    from mspec._version import __version__

    inputs = {}
    p = run_dir / "inputs.json"
    if p.is_file():
        try:
            inputs = json.loads(p.read_text())
        except (OSError, ValueError):
            inputs = {}
    models = inputs.get("models_sha256") or {}
    sections = {
        k: v
        for k, v in cfg.to_dict().items()
        if isinstance(v, dict) and k not in _NON_RESULT_SECTIONS
    }
    stamps = {}
    for s in sorted((run_dir / "stages").glob("*.json")):
        try:
            stamps[s.stem] = json.loads(s.read_text())
        except (OSError, ValueError):
            continue
    return {
        "mspec_version": __version__,
        "models_sha256": _sha(models) if models else "",
        "models_dir": inputs.get("models_dir", ""),
        "templates_set": inputs.get("templates_set", ""),
        "templates_sha256": inputs.get("templates_sha256", ""),
        "config_sha256": _sha(sections),
        "stages": {k: {"version": v.get("version", "")} for k, v in stamps.items()},
        "run_dir": str(run_dir),
    }


def _gather(run_dir: Path, cfg, notes: list[str]):
    """Where the store's per-spectrum metadata and every stage's per-spectrum outputs are:
    the :class:`_RowReader` that reads them a range of rows at a time, the number of
    spectra and the stage each stage variable comes from."""
    from mspec.io.store import open_store
    from mspec.io.zarrio import read_results

    store = cfg.store
    if not store or not Path(store).exists():
        raise CatalogError(f"the run's store {store!r} does not exist (config.resolved.toml)")
    ds = open_store(store)
    n = int(ds.sizes["spectra"])
    cols = {
        str(v): ds[v].variable
        for v in ds.variables
        if ds[v].dims == ("spectra",) and str(v) not in _SKIP_VARS
    }
    reader = _RowReader(str(store), n, tuple(ds.chunks["spectra"]), tuple(cols))
    groups = sorted((run_dir / "stages").glob("*.zarr")) if (run_dir / "stages").is_dir() else []
    names = _group_order(g.name[: -len(".zarr")] for g in groups)
    origin: dict[str, str] = {}
    for name in names:
        path = run_dir / "stages" / f"{name}.zarr"
        try:
            grp = read_results(path)
        except Exception as exc:  # noqa: BLE001 - an unreadable group is reported, not fatal
            notes.append(f"stage {name}: group unreadable ({type(exc).__name__}: {exc}); skipped")
            continue
        if "spectra" not in grp.dims:
            continue
        m = int(grp.sizes["spectra"])
        if m < n:
            notes.append(f"stage {name}: covers {m} of {n} spectra (store grew); rest null")
        grp = grp.isel(spectra=slice(0, min(m, n)))
        bad = _misaligned(path, Path(store), min(m, n))
        if bad:
            notes.append(f"stage {name}: {bad}; group skipped")
            continue
        done = _done_mask(run_dir, name, n)
        if done is not None and not done.all():
            notes.append(
                f"stage {name}: {int((~done).sum())} of {n} spectra in unfinished chunks; "
                "their outputs are treated as absent"
            )
        partial = m < n or (done is not None and not done.all())
        taken = []
        for v in sorted(map(str, grp.data_vars)):  # a fixed order (zarr lists in any order)
            var = grp[v]
            if var.dims != ("spectra",) or v in _SKIP_VARS or v == "obsid":
                continue
            if v in cols or v in origin:
                if v not in cols:  # two stages give it: the first (pipeline order) wins
                    notes.append(f"variable {v!r} in stages {origin[v]} and {name}: "
                                 f"{origin[v]}'s used")  # fmt: skip
                continue
            origin[v] = name
            taken.append(str(v))
        if taken:
            reader.groups.append((str(path), tuple(taken), m, done if partial else None))
    return n, origin, reader


def _misaligned(group: Path, store: Path, m: int, k: int = 64) -> str:
    """'' when the group's obsid agrees with the store's at its first and last ``k`` rows.

    A cheap check (two small Zarr reads, no dask compute) against a group written for
    another store or another order; groups without ``obsid`` are trusted.
    """
    import zarr

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            g = zarr.open_group(str(group), mode="r")
            s = zarr.open_group(str(store), mode="r")
            if "obsid" not in g or "obsid" not in s or m == 0:
                return ""
            go, so = g["obsid"], s["obsid"]
            for sl in (slice(0, min(k, m)), slice(max(0, m - k), m)):
                if not np.array_equal(np.asarray(go[sl]), np.asarray(so[sl])):
                    return (
                        f"obsid of rows {sl.start}-{sl.stop} differ from the store's (a group "
                        "of another store or order)"
                    )
    except Exception as exc:  # noqa: BLE001 - reported as a note, never fatal
        return f"obsid unreadable ({type(exc).__name__}: {exc})"
    return ""


def _null_fill_rows(arr: np.ndarray, a: int, b: int, m: int, done) -> np.ndarray:
    """Rows ``a:b`` of a stage variable whose group holds ``m`` rows (``arr``: rows
    ``a:min(b, m)``), null where the group ends or a chunk is not done (NaN for numbers,
    integers and booleans then as float64; '' for strings)."""
    kind = arr.dtype.kind
    if kind == "f":
        fill, dtype = np.nan, arr.dtype
    elif kind in "iub":
        fill, dtype = np.nan, np.float64
    else:
        fill, dtype = "", arr.dtype
    out = np.full(b - a, fill, dtype=dtype)
    out[: len(arr)] = arr
    if done is not None:
        out[~done[a:b]] = fill
    return out


class _RowReader:
    """Reads rows ``[a, b)`` of the store's per-spectrum metadata and of every stage's
    per-spectrum outputs into one pandas DataFrame (index: row positions).

    One task per partition (:func:`dask.dataframe.from_map`) instead of one per variable
    and chunk: a run's ~130 per-spectrum variables made the catalog graph ~130 tasks per
    chunk, and the scheduler's memory grew with it. Picklable: paths and names only, plus
    the done masks of unfinished stages.
    """

    def __init__(self, store: str, n: int, chunks: tuple, names: tuple):
        self.store, self.n, self.chunks, self.names = store, n, chunks, names
        #: (group path, variables, rows it holds, done mask or None)
        self.groups: list[tuple] = []

    def ranges(self) -> list[tuple[int, int]]:
        """Row ranges of the partitions: the store's chunks."""
        edges = np.concatenate([[0], np.cumsum(self.chunks)]).astype(int)
        return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:], strict=True)]

    def __call__(self, rng: tuple[int, int]) -> pd.DataFrame:
        from mspec.io.store import open_store
        from mspec.io.zarrio import read_results

        a, b = rng
        cols: dict[str, np.ndarray] = {}
        sub = open_store(self.store)[list(self.names)].isel(spectra=slice(a, b))
        sub = sub.compute(scheduler="sync")
        for v in self.names:
            cols[v] = np.asarray(sub[v].values)
        for path, names, m, done in self.groups:
            partial = m < self.n or done is not None  # then every chunk null-filled alike
            grp = read_results(path)[list(names)].isel(spectra=slice(min(a, m), min(b, m)))
            grp = grp.compute(scheduler="sync")
            for v in names:
                arr = np.asarray(grp[v].values)
                cols[v] = _null_fill_rows(arr, a, b, m, done) if partial else arr
        return pd.DataFrame(cols, index=pd.RangeIndex(a, b))


# --------------------------------------------------------------------------- the frame


def _is_present(df: pd.DataFrame, col: str) -> bool:
    return col in df.columns


def _nullable_bool(s: pd.Series) -> pd.Series:
    if s.dtype.kind == "f":
        out = pd.array(np.where(np.isnan(s.to_numpy()), False, s.to_numpy() != 0), "boolean")
        out[np.isnan(s.to_numpy())] = pd.NA
        return pd.Series(out, index=s.index)
    return s.astype("boolean")


def _to_dtype(s: pd.Series, dtype: str) -> pd.Series:
    if dtype == "string":
        return s.astype("string").fillna("")
    if dtype == "boolean":
        return _nullable_bool(s)
    if dtype in ("Int64", "Int8", "Int16", "Int32"):
        if s.dtype.kind == "f":
            v = s.to_numpy()
            arr = pd.array(np.where(np.isfinite(v), v, 0).astype("int64"), dtype=dtype)
            arr[~np.isfinite(v)] = pd.NA
            return pd.Series(arr, index=s.index)
        return s.astype(dtype)
    if dtype in ("int8", "int16", "int32", "int64"):
        return s.fillna(0).astype(dtype) if s.dtype.kind == "f" else s.astype(dtype)
    if dtype == "float64":
        return pd.to_numeric(s, errors="coerce").astype("float64")
    return s.astype(dtype)


def _col(df: pd.DataFrame, name: str, dtype: str) -> pd.Series:
    """Column ``name`` as ``dtype``; an absent column is all null."""
    if name in df.columns:
        return _to_dtype(df[name], dtype)
    n = len(df)
    if dtype == "string":
        return pd.Series(pd.array([""] * n, dtype="string"), index=df.index)
    if dtype == "float64":
        return pd.Series(np.full(n, np.nan), index=df.index)
    if dtype in ("int8", "int16", "int32", "int64"):
        return pd.Series(np.zeros(n, dtype=dtype), index=df.index)
    return pd.Series(pd.array([pd.NA] * n, dtype=dtype), index=df.index)


def _dtype_of(name: str, series: pd.Series | None = None) -> str:
    for c in TABLE9:
        if c.name == name and c.source == name:
            return c.dtype
    if name in _STRING_COLS:
        return "string"
    if name in _NULL_DTYPES:
        return _NULL_DTYPES[name]
    if name in ("obsid",):
        return "int64"
    if series is not None:
        k = series.dtype.kind
        if k in "OUST" or str(series.dtype) in ("string", "str"):
            return "string"
        if k == "b":
            return "boolean"
        if k in "iu":
            return str(series.dtype)
    return "float64"


def _lamost_m(sub: pd.Series) -> np.ndarray:
    s = sub.astype("string").fillna("").str.strip()
    return s.str.match(r"(?i)^(dM|gM|sdM|M)").fillna(False).to_numpy(dtype=bool)


def _standardize(
    df: pd.DataFrame, present: dict, prov: dict, cmd_here: bool, want: tuple
) -> pd.DataFrame:
    """One partition: coerce dtypes, add absent columns as nulls, cascade membership."""
    out = pd.DataFrame(index=df.index)
    if cmd_here and len(df):
        from mspec.cmd import place

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            placed = place(df.drop(columns=[c for c in _MODULE_OUTPUTS["CMD"] if c in df]))
        for c in _MODULE_OUTPUTS["CMD"]:
            df = df.assign(**{c: placed[c].to_numpy()})
    elif cmd_here:
        df = df.assign(**{c: pd.Series([], dtype="float64") for c in _MODULE_OUTPUTS["CMD"]})
        df["CMD_pos"] = pd.Series([], dtype="string")
    for name in want:
        out[name] = _col(df, name, _dtype_of(name, df[name] if name in df else None))
    n = len(df)
    # --- membership (a null decision: the stage did not decide this row -> kept) ---
    if present["entered"]:
        ent = out["entered"]
        v0 = ent.fillna(False).to_numpy(dtype=bool)
        # rows the SCM chunk did not finish: LAMOST's list decides
        undecided = ent.isna().to_numpy()
        if undecided.any():
            v0[undecided] = _lamost_m(out["lamost_subclass"])[undecided]
    else:
        v0 = _lamost_m(out["lamost_subclass"]) if n else np.zeros(0, bool)
    ism = out["is_m"]
    scm_reject = (ism == False).fillna(False).to_numpy(dtype=bool)  # noqa: E712
    v1 = v0 & ~scm_reject
    lum = out["luminosity_class"]
    if present["luminosity_class"]:
        decided = lum.notna().to_numpy() & present["luminosity_mask"](df)
        is_mg = lum.isin(["dM", "gM"]).to_numpy(dtype=bool)
        dgcm_reject = decided & ~is_mg
    else:
        dgcm_reject = np.zeros(n, bool)
    v2 = v1 & ~dgcm_reject
    out["_v0"] = v0
    out["_v1"] = v1
    out["_v2"] = v2
    nonm_stage = np.where(v0 & scm_reject, 1, np.where(v1 & dgcm_reject, 2, 0)).astype("int8")
    out["_nonm"] = nonm_stage
    cat = np.where(nonm_stage == 1, "non-M_Catalog_V1",
                   np.where(nonm_stage == 2, "non-M_Catalog_V2", ""))  # fmt: skip
    out["catalog"] = pd.array(cat, dtype="string")
    scm_cls = out["scm_class"].to_numpy(dtype=object)
    out["type"] = pd.array(
        np.where(nonm_stage == 1, np.where(scm_cls == "", "UNKNOWN", scm_cls),
                 np.where(nonm_stage == 2, "UNKNOWN", "")).astype(str),
        dtype="string",
    )  # fmt: skip
    out["reason"] = pd.array(
        np.where(nonm_stage == 1, out["scm_reason"].to_numpy(dtype=object),
                 np.where(nonm_stage == 2, out["dgcm_reason"].to_numpy(dtype=object), ""))
        .astype(str),
        dtype="string",
    )  # fmt: skip
    sp = out["scm_prob"].to_numpy(dtype="float64")
    dp = out["dgcm_prob"].to_numpy(dtype="float64")
    out["prob"] = np.where(nonm_stage == 1, sp, np.where(nonm_stage == 2, dp, np.nan))
    # --- rv_flag: the RVMM's when it gave one, else the paper's rule from rv and mjd ---
    if present["rv_flag"]:
        rvf = df["rv_flag"]
        rvf_num = pd.to_numeric(rvf, errors="coerce").to_numpy(dtype="float64")
        computed = rv_flag(out["rv"].to_numpy("float64"), _mjd(out))
        out["rv_flag"] = np.where(np.isfinite(rvf_num), rvf_num, computed).astype("int8")
    else:
        out["rv_flag"] = rv_flag(out["rv"].to_numpy("float64"), _mjd(out))
    # --- luminosity class used by SPMM / the flag: DGCM's, else CNN-dMgM's ---
    lc = out["luminosity_class"].to_numpy(dtype=object)
    if not present["luminosity_class"]:
        lc = out["dmgm_class"].to_numpy(dtype=object)
    out["_lumclass"] = pd.array(np.asarray(lc, dtype=str), dtype="string")
    for k, v in prov.items():
        out[k] = pd.array([v] * n, dtype="string")
    return out


def _mjd(out: pd.DataFrame) -> np.ndarray:
    m = out["mjd"]
    return pd.to_numeric(m, errors="coerce").astype("float64").to_numpy(na_value=np.nan)


def _recommended_partition(df: pd.DataFrame) -> pd.DataFrame:
    out = pd.DataFrame(index=df.index)
    for c in TABLE9:
        src = c.source or c.name
        if c.name in ("parameter_flag",):
            out[c.name] = df["parameter_flag"].astype("int8")
            continue
        s = df[src] if src in df else None
        if c.name == "source_id" and s is not None:
            s = s.astype("Int64")
            s = s.mask(s < 0)
        out[c.name] = _to_dtype(s, c.dtype) if s is not None else _col(df, src, c.dtype)
    return out


def _run_config(run_dir: Path):
    from mspec.config import ConfigError, load_config

    conf = run_dir / "config.resolved.toml"
    if not conf.is_file():
        raise CatalogError(f"run: {run_dir} is not an mspec run directory (no {conf.name})")
    try:
        return load_config(conf)
    except ConfigError as exc:
        raise CatalogError(f"run: cannot read {conf}: {exc}") from exc


def per_spectrum_table(run) -> tuple:
    """Every per-spectrum variable of a run as one lazy table.

    The store's per-spectrum metadata and each stage's per-spectrum outputs (the first stage
    in pipeline order wins a name two give), one partition per store chunk, read by one
    task each; rows of chunks a stage has not finished are null in its columns (as in
    :func:`build_catalog`).

    Parameters
    ----------
    run : path-like
        Run directory (``config.resolved.toml`` names the store).

    Returns
    -------
    frame : dask.dataframe.DataFrame
        Index: the spectrum's position in the store (divisions known).
    notes : list of str
        What was null-filled or skipped, and why.

    Raises
    ------
    CatalogError
        ``run`` is not a run directory, or its store is gone or empty.
    """
    run_dir = Path(run)
    notes: list[str] = []
    n, _origin, reader = _gather(run_dir, _run_config(run_dir), notes)
    if n == 0:
        raise CatalogError(f"run: the store of {run_dir} holds no spectra")
    return _frame(reader), notes


def _frame(reader: _RowReader):
    """The per-spectrum table as a dask DataFrame, one partition per store chunk (known
    divisions: row positions)."""
    import dask.dataframe as dd

    ranges = reader.ranges()
    meta = reader((0, 0)).iloc[:0]
    divisions = (*(a for a, _ in ranges), ranges[-1][1] - 1)
    return dd.from_map(reader, ranges, meta=meta, divisions=divisions, enforce_metadata=False)


def build_catalog(
    run,
    *,
    parameter_fit: ParameterFlagFit | Mapping | str | os.PathLike | None = None,
    min_rows: int = 20,
    save_fit: bool = True,
) -> CatalogSet:
    """Build M_Catalog_V0–V3, the recommended catalog and non-M_Catalog of a run (lazy).

    Parameters
    ----------
    run : path-like
        Run directory (``mspec run`` output: ``config.resolved.toml``, ``stages/``).
    parameter_fit : ParameterFlagFit, dict or path, optional
        Apply this ``parameter_flag`` error model (e.g. a previous release's) instead of
        fitting one on the run.
    min_rows : int
        Fewest spectra per (class, S/N_i bin) for the error fit (:func:`mspec.flags.
        fit_parameter_errors`).
    save_fit : bool
        Write the fit to ``RUN/catalog/parameter_flag.json``.

    Returns
    -------
    CatalogSet
        ``dict`` with keys :data:`CATALOG_KEYS`, each a ``dask.dataframe.DataFrame`` indexed
        by the spectrum's position in the store (divisions known), plus ``notes``,
        ``provenance``, ``parameter_fit`` and ``columns``.

    Raises
    ------
    CatalogError
        ``run`` is not a run directory, or its store is gone.
    """
    run_dir = Path(run)
    cfg = _run_config(run_dir)
    notes: list[str] = []
    n, origin, reader = _gather(run_dir, cfg, notes)
    prov_full = _provenance(run_dir, cfg)
    prov = {
        "prov_mspec_version": prov_full["mspec_version"],
        "prov_models": _short(prov_full["models_sha256"]),
        "prov_templates": _short(prov_full["templates_sha256"]),
        "prov_config": _short(prov_full["config_sha256"]),
    }
    have = {*reader.names, *origin}
    for module, outs in _MODULE_OUTPUTS.items():
        missing = [c for c in outs if c not in have]
        if module in ("CMD", "SCM", "DGCM") and missing:
            continue  # specific notes below
        if missing:
            notes.append(f"{module}: outputs {missing} absent from the run; null in the catalogs")
    need_cmd = [c for c in _MODULE_OUTPUTS["CMD"] if c not in have]
    cmd_here = False
    if need_cmd:
        phot = ("phot_g_mean_mag", "phot_bp_mean_mag", "phot_rp_mean_mag", "r_med_geo", "ebv")
        if all(c in have for c in phot):
            cmd_here = True
            notes.append("CMD: no stage gave the CMD columns; computed by the catalog from the "
                         "store's Gaia/WISE columns (mspec.cmd.place)")  # fmt: skip
        else:
            notes.append(f"CMD: outputs {need_cmd} absent (no stage, no Gaia columns in the "
                         "store); null in the catalogs")  # fmt: skip
    if "is_m" not in have:
        notes.append("SCM: no decisions (is_m) in the run: M_Catalog_V1 = M_Catalog_V0, no "
                     "non-M_Catalog_V1 rows")  # fmt: skip
    if "luminosity_class" not in have:
        notes.append("DGCM: no decisions (luminosity_class) in the run: M_Catalog_V2 = "
                     "M_Catalog_V1; parameter_flag uses CNN-dMgM's class (dmgm_class), the "
                     "one SPMM chose its ensemble by")  # fmt: skip
    if "entered" not in have:
        notes.append("M_Catalog_V0: LAMOST's M list (subclass dM*, gM*, sdM*, M*): no SCM "
                     "'entered' variable in the run")  # fmt: skip
    if n == 0:
        raise CatalogError(f"run: the store {cfg.store} holds no spectra")

    frame = _frame(reader)
    truth = sorted(c for c in frame.columns if c.startswith("true_"))
    extra = [
        c
        for c in frame.columns
        if c not in (*_V0_COLS, *_V1_COLS, *_V2_COLS, *_V3_COLS, *TABLE9_NAMES)
        and not c.startswith("true_")
        and c in origin
    ]
    want = tuple(
        dict.fromkeys(
            [*_V0_COLS, *_V1_COLS, *_V2_COLS, *_V3_COLS, *PARAMETERS,
             *(f"{p}_err" for p in PARAMETERS), *extra, *truth]
        )
    )  # fmt: skip
    lum_done = _done_mask(run_dir, origin.get("luminosity_class", ""), n)
    present = {
        "entered": "entered" in have,
        "luminosity_class": "luminosity_class" in have,
        "rv_flag": "rv_flag" in have,
        # a luminosity_class '' in an unfinished DGCM chunk is not a decision
        "luminosity_mask": _RowMask(lum_done),
    }
    meta = _standardize(frame._meta, present, prov, cmd_here, want)
    std = frame.map_partitions(
        _standardize, present, prov, cmd_here, want, meta=meta, align_dataframes=False
    )
    cmd_cols = _MODULE_OUTPUTS["CMD"]

    def level(cols, always=()):
        return [c for c in cols if c in have or c in always or (cmd_here and c in cmd_cols)]

    v0_cols = level(_V0_COLS, ("obsid", "ra", "dec", "mjd", "snr_u", "snr_g", "snr_r", "snr_i",
                               "snr_z", "lamost_subclass"))  # fmt: skip
    v1_cols = v0_cols + level(_V1_COLS, (*_MODULE_OUTPUTS["preprocess"], "is_m", "scm_class",
                                         "scm_prob", "scm_reason", *cmd_cols))  # fmt: skip
    v2_cols = v1_cols + level(_V2_COLS, ("luminosity_class", "dgcm_prob", "dgcm_reason"))
    v3_cols = v2_cols + level(_V3_COLS, ("rv", "rv_err", "rv_from", "rv_flag")) + extra
    tail = [*PROVENANCE_COLUMNS, *truth]
    v0 = std[std["_v0"]][[*v0_cols, *tail]]
    v1 = std[std["_v1"]][[*v1_cols, *tail]]
    v2 = std[std["_v2"]][[*v2_cols, *tail]]
    v3 = std[std["_v2"]][[*v3_cols, *tail]]
    nonm_cols = _unique([*v1_cols, "dmgm_class", "luminosity_class", "dgcm_prob", "dgcm_reason",
                         *_NONM_COLS])  # fmt: skip
    nonm = std[std["_nonm"] > 0][[*nonm_cols, *tail]]
    # --- recommended: V3 + SPMM + flags (Table 9) ---
    rec_in = std[std["_v2"]]
    flag_cols = ["_lumclass", "snr_i", *PARAMETERS, *(f"{p}_err" for p in PARAMETERS)]
    flag_table = rec_in[flag_cols]
    if parameter_fit is None and not all(p in have for p in PARAMETERS):
        fit = ParameterFlagFit(min_rows=min_rows)
        notes.append("parameter_flag: no SPMM parameters in the run: 0 everywhere, no fit")
        res = parameter_flag(flag_table, fit=fit, lumclass="_lumclass")
    else:
        res = parameter_flag(flag_table, fit=parameter_fit, lumclass="_lumclass",
                             min_rows=min_rows)  # fmt: skip
        not_fitted = sorted({(g["lumclass"], g["snr_bin"]) for g in res.fit.groups
                             if not g["fitted"]})  # fmt: skip
        if not_fitted and parameter_fit is None:
            notes.append(
                "parameter_flag: error cut not applied (fewer than "
                f"{res.fit.min_rows} spectra) in {', '.join(f'{a} S/N_i {b}' for a, b in not_fitted)}"
            )
    rec_base = rec_in.assign(parameter_flag=res.flag, parameter_flag_reason=res.reason)
    rec_meta = _recommended_partition(rec_base._meta)
    rec = rec_base.map_partitions(_recommended_partition, meta=rec_meta)
    rec = rec.assign(
        parameter_flag_reason=rec_base["parameter_flag_reason"],
        **{c: rec_base[c] for c in tail},
    )
    if save_fit:
        res.fit.to_json(run_dir / "catalog" / "parameter_flag.json")
    cats = CatalogSet(
        M_Catalog_V0=v0,
        M_Catalog_V1=v1,
        M_Catalog_V2=v2,
        M_Catalog_V3=v3,
        recommended=rec,
        non_M_Catalog=nonm,
    )
    cats.notes = notes
    cats.provenance = prov_full
    cats.parameter_fit = res.fit
    cats.run_dir = str(run_dir)
    for df in cats.values():
        for c, dt in df.dtypes.items():
            cats.columns.setdefault(c, _with_dtype(column_spec(c), str(dt)))
    for c in TABLE9:
        cats.columns[c.name] = c
    for note in notes:
        log.info("catalog: %s", note)
    return cats


class _RowMask:
    """Picklable: rows of a partition whose stage chunk is done (all when no records)."""

    def __init__(self, done):
        self.done = done

    def __call__(self, df: pd.DataFrame) -> np.ndarray:
        if self.done is None or len(df) == 0:
            return np.ones(len(df), dtype=bool)
        return self.done[np.asarray(df.index, dtype=np.int64)]


def _unique(cols) -> list:
    return list(dict.fromkeys(cols))


def _with_dtype(spec: ColumnSpec, dtype: str) -> ColumnSpec:
    return ColumnSpec(spec.name, dtype, spec.unit, spec.description, spec.source)


# --------------------------------------------------------------------------- summary

#: rv_from values in the paper's Table 7 order.
RV_FROM_VALUES = (
    "LAMOST", "TM", "DSAL I", "DSAL II", "TML7500", "DSEL", "NoRV_lowQuality", "NoRV_waveErr",
)  # fmt: skip


def _lamost_lum(sub: pd.Series) -> pd.Series:
    """LAMOST's luminosity label from its subclass: gM (gM*), dM (dM*, sdM*, M*), or other."""
    s = sub.astype("string").fillna("").str.strip()
    giant = s.str.match(r"(?i)^gM").fillna(False).to_numpy(dtype=bool)
    m = s.str.match(r"(?i)^(dM|sdM|M)").fillna(False).to_numpy(dtype=bool)
    return pd.Series(np.where(giant, "gM", np.where(m, "dM", "other")), index=s.index)


def _summary_parts(cats: Mapping):
    """The small aggregates of :func:`catalog_summary`, as one dict of lazy objects."""
    v0, v1, v2 = cats["M_Catalog_V0"], cats["M_Catalog_V1"], cats["M_Catalog_V2"]
    v3, rec, nonm = cats["M_Catalog_V3"], cats["recommended"], cats["non_M_Catalog"]
    # a handful of groups: one tree reduction (dask would shuffle with split_out > 1 at
    # >= 15 partitions, costing the scheduler P2P state for a few integers)
    parts = {
        "n_v0": v0.shape[0],
        "n_v1": v1.shape[0],
        "n_v2": v2.shape[0],
        "n_v3": v3.shape[0],
        "n_rec": rec.shape[0],
        "v0_sub": v0["lamost_subclass"]
        .map_partitions(_lamost_lum, meta=("lamost", "object"))
        .value_counts(split_out=1),
        "nonm_types": nonm.groupby(["catalog", "type"]).size(split_out=1),
        "v2_lum": v2.groupby("luminosity_class").size(split_out=1),
        "v2_switch": v2.assign(
            _lamost=v2["lamost_subclass"].map_partitions(_lamost_lum, meta=("x", "object"))
        )
        .groupby(["_lamost", "luminosity_class"])
        .size(split_out=1),
        "rv_from": v3.groupby("rv_from").size(split_out=1),
        "rv_flag": v3["rv_flag"].sum(),
        "pflag": rec.groupby(["luminosity_class", "parameter_flag"]).size(split_out=1),
    }
    if "rv_inspect" in v3.columns:
        parts["rv_inspect"] = (v3["rv_inspect"] != "").sum()
    if "new_m" in v1.columns:
        parts["new_m"] = v1["new_m"].fillna(False).astype(bool).sum()
    return parts


def catalog_summary(cats: Mapping) -> pd.DataFrame:
    """Counts per stage, like the paper's Tables 1, 4 and 7, plus the flags.

    Parameters
    ----------
    cats : CatalogSet or mapping
        :func:`build_catalog`'s result (computed here in one pass).

    Returns
    -------
    pandas.DataFrame
        Columns ``section`` (``M_Catalog_V0``, ``SCM (Table 1)``, ``DGCM (Table 4)``,
        ``RVMM (Table 7)``, ``recommended``, ``notes``), ``item``, ``count`` (Int64;
        null for notes), ``fraction`` (of the section's reference count) and ``note``.
        The notes of ``cats`` (absent stages, ...) are rows of section ``notes``.
    """
    import dask

    missing = [k for k in CATALOG_KEYS if k not in cats]
    if missing:
        raise KeyError(f"cats lacks the catalogs {missing}; pass build_catalog's result")
    (p,) = dask.compute(_summary_parts(cats))
    rows = []

    def add(section, item, count, ref=None, note=""):
        frac = (float(count) / ref) if ref else np.nan
        rows.append({"section": section, "item": item, "count": int(count), "fraction": frac,
                     "note": note})  # fmt: skip

    n0, n1, n2, n3, nr = (int(p[k]) for k in ("n_v0", "n_v1", "n_v2", "n_v3", "n_rec"))
    add("M_Catalog_V0", "spectra", n0)
    for lab in ("dM", "gM"):
        add("M_Catalog_V0", f"LAMOST {lab} (subclass)", int(p["v0_sub"].get(lab, 0)), n0)
    if int(p["v0_sub"].get("other", 0)):
        add("M_Catalog_V0", "LAMOST not M (SCM entry='all')", int(p["v0_sub"]["other"]), n0)
    sec = "SCM (Table 1)"
    add(sec, "M_Catalog_V1", n1, n0)
    nt = p["nonm_types"]
    v1_rej = nt.xs("non-M_Catalog_V1", level=0) if "non-M_Catalog_V1" in nt.index.get_level_values(
        0) else pd.Series(dtype="int64")  # fmt: skip
    add(sec, "non-M_Catalog_V1", int(v1_rej.sum()), n0)
    for t, c in v1_rej.sort_values(ascending=False).items():
        add(sec, f"non-M_Catalog_V1 type {t}", int(c), n0)
    if "new_m" in p:
        add(sec, "new_m (M stars LAMOST called something else)", int(p["new_m"]), n1)
    sec = "DGCM (Table 4)"
    add(sec, "M_Catalog_V2", n2, n1)
    for lab in ("dM", "gM"):
        add(sec, f"luminosity_class {lab}", int(p["v2_lum"].get(lab, 0)), n2)
    sw = p["v2_switch"]
    for a, b in (("dM", "gM"), ("gM", "dM")):
        add(sec, f"LAMOST {a} -> DGCM {b}", int(sw.get((a, b), 0)), n2)
    v2_rej = nt.xs("non-M_Catalog_V2", level=0) if "non-M_Catalog_V2" in nt.index.get_level_values(
        0) else pd.Series(dtype="int64")  # fmt: skip
    add(sec, "non-M_Catalog_V2", int(v2_rej.sum()), n1)
    sec = "RVMM (Table 7)"
    add(sec, "M_Catalog_V3", n3, n2)
    rf = p["rv_from"]
    for v in RV_FROM_VALUES:
        add(sec, f"rv_from {v}", int(rf.get(v, 0)), n3)
    other = int(sum(c for k, c in rf.items() if k not in RV_FROM_VALUES and k != ""))
    if other:
        add(sec, "rv_from other", other, n3)
    add(sec, "rv_from missing (no reconciliation)", int(rf.get("", 0)), n3)
    add(sec, "rv_flag = 1", int(p["rv_flag"]), n3)
    if "rv_inspect" in p:
        add(sec, "rv_inspect (queued for a human look)", int(p["rv_inspect"]), n3)
    sec = "recommended"
    add(sec, "spectra", nr, n3)
    pf = p["pflag"]
    for lab in ("dM", "gM"):
        tot = int(sum(c for (lc, _f), c in pf.items() if lc == lab))
        add(sec, f"{lab} parameter_flag = 1", int(pf.get((lab, 1), 0)), tot)
    add(sec, "parameter_flag = 1", int(sum(c for (_lc, f), c in pf.items() if f == 1)), nr)
    out = pd.DataFrame(rows)
    notes = list(getattr(cats, "notes", []))
    if notes:
        nrows = pd.DataFrame(
            {
                "section": "notes",
                "item": [f"note {i + 1}" for i in range(len(notes))],
                "count": pd.NA,
                "fraction": np.nan,
                "note": notes,
            }
        )
        out = pd.concat([out, nrows], ignore_index=True)
    out["count"] = out["count"].astype("Int64")
    return out


# --------------------------------------------------------------------------- writers


def _meta_dict(cats, key: str, df) -> dict:
    cols = {}
    specs = getattr(cats, "columns", {}) or {}
    for c, dt in df.dtypes.items():
        spec = specs.get(c) or column_spec(c)
        cols[c] = {"dtype": str(dt), "unit": spec.unit, "description": spec.description}
    return {
        "catalog": key,
        "columns": cols,
        "provenance": getattr(cats, "provenance", {}),
        "notes": list(getattr(cats, "notes", [])),
        "paper": "Li et al. 2025, Refined M-type Star Catalog from LAMOST DR10 (Table 9)",
    }


def _canonical_dtype(dt: str) -> str:
    dt = str(dt)
    if dt in ("str", "string", "string[python]", "string[pyarrow]", "object"):
        return "string"
    return dt


def _arrow_schema(df_meta: pd.DataFrame, meta: dict):
    import pyarrow as pa

    schema = pa.Schema.from_pandas(df_meta, preserve_index=False)
    fields = []
    for f in schema:
        info = meta["columns"].get(f.name, {})
        md = {"unit": info.get("unit", ""), "description": info.get("description", "")}
        fields.append(f.with_metadata({k: str(v) for k, v in md.items()}))
    return pa.schema(fields)


def _parquet_job(df, path: Path, meta: dict, partition_on):
    """A lazy Parquet write into ``path``.tmp (renamed by the caller once written)."""
    import shutil as _sh

    tmp = path.with_name(path.name + ".tmp")
    _sh.rmtree(tmp, ignore_errors=True)
    df = df.reset_index(drop=True)
    return tmp, df.to_parquet(
        str(tmp),
        write_index=False,
        schema=_arrow_schema(df._meta, meta),
        custom_metadata={"mspec": json.dumps(meta, default=str)},
        partition_on=partition_on,
        compute=False,
    )


def _fits_table(pdf: pd.DataFrame, meta: dict):
    from astropy.table import MaskedColumn, Table

    t = Table()
    for c in pdf.columns:
        s = pdf[c]
        info = meta["columns"].get(c, {})
        dt = _canonical_dtype(info.get("dtype", str(s.dtype)))
        if dt == "string":
            vals = s.astype("string").fillna("").to_numpy(dtype=object).astype(str)
            width = max(1, int(max((len(v.encode()) for v in vals), default=1)))
            col = MaskedColumn(np.char.encode(vals, "utf-8").astype(f"S{width}"), name=c)
        elif dt == "boolean":  # FITS logicals have no reliable null in astropy: int16 + TNULL
            col = MaskedColumn(
                s.fillna(False).to_numpy(dtype=bool).astype("int16"),
                mask=s.isna().to_numpy(),
                name=c,
            )
        elif dt in ("Int8", "Int16", "Int32", "Int64"):
            fits_dt = "int64" if dt == "Int64" else ("int32" if dt == "Int32" else "int16")
            col = MaskedColumn(s.fillna(0).to_numpy(dtype=fits_dt), mask=s.isna().to_numpy(),
                               name=c)  # fmt: skip
        elif dt == "int8":  # FITS has no signed byte
            col = MaskedColumn(s.to_numpy(dtype="int16"), name=c)
        else:
            col = MaskedColumn(s.to_numpy(), name=c)
        col.description = info.get("description", "")[:68]
        t[c] = col
    return t


def _write_fits(pdf: pd.DataFrame, path: Path, meta: dict, key: str) -> Path:
    from astropy.io import fits

    pdf = pdf.reset_index(drop=True)
    t = _fits_table(pdf, meta)
    with warnings.catch_warnings():
        # units FITS does not know (dex) are written as given, below
        warnings.simplefilter("ignore")
        hdu = fits.table_to_hdu(t)
    hdr = hdu.header
    for i, c in enumerate(pdf.columns, start=1):
        unit = meta["columns"].get(c, {}).get("unit", "")
        if unit:
            hdr[f"TUNIT{i}"] = unit
    hdr["EXTNAME"] = key.replace("-", "_")[:68]
    prov = meta.get("provenance", {})
    hdr["MSPECVER"] = str(prov.get("mspec_version", ""))
    hdr["MODELSHA"] = str(prov.get("models_sha256", ""))
    hdr["TEMPLSHA"] = str(prov.get("templates_sha256", ""))
    hdr["CONFGSHA"] = str(prov.get("config_sha256", ""))
    hdr["MSPECMET"] = json.dumps(meta, default=str, separators=(",", ":"))
    for note in meta.get("notes", []):
        hdr.add_comment(note[:72])
    primary = fits.PrimaryHDU()
    primary.header["ORIGIN"] = "mspec"
    tmp = path.with_name(path.name + ".tmp")
    fits.HDUList([primary, hdu]).writeto(tmp, overwrite=True)
    os.replace(tmp, path)
    return path


def write(
    cats: Mapping,
    out_dir,
    formats: Iterable[str] = ("parquet", "fits"),
    *,
    keys: Iterable[str] | None = None,
    partition_on: list[str] | None = None,
) -> dict[str, dict[str, str]]:
    """Write catalogs as partitioned Parquet and/or FITS (both read back by
    :func:`read_catalog` with identical values and dtypes).

    Parquet: ``out_dir/<key>.parquet/`` with one file per Dask partition (``partition_on``
    adds Hive partitioning by those columns); every field carries ``unit`` and
    ``description`` field metadata, and the schema's key-value metadata ``mspec`` holds a
    JSON with every column's dtype, unit and description, the provenance and the notes.

    FITS: ``out_dir/<key>.fits``, a binary-table HDU written from an astropy Table with
    ``TUNITn`` units and column descriptions; provenance in ``MSPECVER``, ``MODELSHA``,
    ``TEMPLSHA``, ``CONFGSHA``; the same JSON in ``MSPECMET``. FITS has no signed byte and
    no null strings: int8 columns are written as int16, nullable integers as masked
    (``TNULLn``) columns, and read back as written by :func:`read_catalog`.

    Parameters
    ----------
    cats : CatalogSet or mapping of name -> DataFrame
        :func:`build_catalog`'s result (pandas or dask DataFrames).
    out_dir : path-like
        Output directory (created).
    formats : iterable of {"parquet", "fits"}
        What to write.
    keys : iterable of str, optional
        Catalogs to write (default all of ``cats``).
    partition_on : list of str, optional
        Parquet Hive-partitioning columns.

    Returns
    -------
    dict
        key -> {format: path}.
    """
    if isinstance(formats, str):
        formats = (formats,)
    formats = tuple(formats)
    bad = [f for f in formats if f not in ("parquet", "fits")]
    if bad or not formats:
        raise ValueError(
            f"formats must be a non-empty subset of ('parquet', 'fits'), got {formats}"
        )
    keys = list(cats) if keys is None else list(keys)
    unknown = [k for k in keys if k not in cats]
    if unknown:
        raise KeyError(f"keys: {unknown} not in the catalogs {list(cats)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    import shutil as _sh

    import dask
    import dask.dataframe as dd

    written: dict[str, dict[str, str]] = {k: {} for k in keys}
    metas, frames, jobs = {}, {}, []
    for key in keys:
        df = cats[key]
        if isinstance(df, pd.DataFrame):
            df = dd.from_pandas(df, npartitions=1)
        frames[key] = df
        metas[key] = _meta_dict(cats, key, df)
        if "parquet" in formats:
            tmp, job = _parquet_job(df, out / f"{key}.parquet", metas[key], partition_on)
            jobs.append((key, tmp, job))
    fits_keys = list(keys) if "fits" in formats else []
    # one pass over the run's data for every catalog and format
    results = dask.compute(*[j for _, _, j in jobs], *[frames[k] for k in fits_keys])
    for key, tmp, _ in jobs:
        final = out / f"{key}.parquet"
        _sh.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        written[key]["parquet"] = str(final)
    for key, pdf in zip(fits_keys, results[len(jobs) :], strict=True):
        written[key]["fits"] = str(_write_fits(pdf, out / f"{key}.fits", metas[key], key))
    if getattr(cats, "parameter_fit", None) is not None:
        cats.parameter_fit.to_json(out / "parameter_flag.json")
    return written


def _restore(pdf: pd.DataFrame, cols: Mapping) -> pd.DataFrame:
    out = {}
    for c in pdf.columns:
        dt = _canonical_dtype(cols.get(c, {}).get("dtype", str(pdf[c].dtype)))
        s = pdf[c]
        if dt == "string":
            if s.dtype.kind == "S" or (s.dtype == object and len(s) and isinstance(
                    s.dropna().iloc[0] if s.notna().any() else "", bytes)):  # fmt: skip
                s = s.map(lambda v: v.decode() if isinstance(v, bytes) else v)
            out[c] = s.astype("string").fillna("")
        elif dt == "boolean":
            out[c] = (
                s.astype("Int16").astype("boolean") if s.dtype.kind != "b" else s.astype("boolean")
            )
        elif dt.startswith("Int"):
            out[c] = s.astype(dt)
        else:
            out[c] = s.astype(dt)
    return pd.DataFrame(out, index=pdf.index)


def read_catalog(path, *, lazy: bool = False):
    """Read a catalog written by :func:`write` (Parquet directory/file or FITS).

    Parameters
    ----------
    path : path-like
        ``<key>.parquet`` (directory or file) or ``<key>.fits``.
    lazy : bool
        Parquet only: return a dask DataFrame.

    Returns
    -------
    pandas.DataFrame or dask.dataframe.DataFrame
        The columns with the dtypes they were written with; ``df.attrs["mspec"]`` holds the
        metadata (units, descriptions, provenance, notes) for a pandas result.

    Raises
    ------
    CatalogError
        Missing file or unknown format.
    """
    p = Path(path)
    if not p.exists():
        raise CatalogError(f"path: {p} does not exist")
    name = p.name.lower()
    if name.endswith((".fits", ".fit", ".fits.gz")):
        from astropy.io import fits
        from astropy.table import Table

        with fits.open(p) as hl:
            hdu = hl[1]
            meta = json.loads(hdu.header.get("MSPECMET", "{}") or "{}")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # units FITS does not know (dex)
            t = Table.read(p, hdu=1)
        pdf = t.to_pandas()
        out = _restore(pdf, meta.get("columns", {}))
        out.attrs["mspec"] = meta
        return out
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(next(p.glob("*.parquet")) if p.is_dir() else p)
    except StopIteration:
        raise CatalogError(f"path: {p} holds no Parquet files") from None
    raw = (schema.metadata or {}).get(b"mspec")
    meta = json.loads(raw) if raw else {}
    cols = meta.get("columns", {})
    import dask.dataframe as dd

    ddf = dd.read_parquet(str(p))
    if lazy:
        m = _restore(ddf._meta, cols)
        return ddf.map_partitions(_restore, cols, meta=m)
    with warnings.catch_warnings():
        # dask's Parquet reader uses an inplace keyword pandas deprecates: not ours to fix
        warnings.filterwarnings("ignore", message=".*inplace keyword.*")
        pdf = ddf.compute()
    out = _restore(pdf.reset_index(drop=True), cols)
    out.attrs["mspec"] = meta
    return out


# --------------------------------------------------------------------------- diff


def _states(cats: Mapping) -> pd.DataFrame:
    """Per obsid of M_Catalog_V0: final class, rv, parameters (pandas)."""
    import dask

    rec_cols = ["obsid", "luminosity_class", "rv", "rv_err", "rv_from", "parameter_flag",
                *PARAMETERS, *(f"{p}_err" for p in PARAMETERS)]  # fmt: skip
    v0, rec, nonm = dask.compute(
        cats["M_Catalog_V0"][["obsid"]], cats["recommended"][rec_cols],
        cats["non_M_Catalog"][["obsid", "type"]],
    )  # fmt: skip
    st = v0.merge(rec, on="obsid", how="left").merge(nonm, on="obsid", how="left")
    lum = st["luminosity_class"].astype("string").fillna("")
    typ = st["type"].astype("string").fillna("")
    in_rec = st["obsid"].isin(rec["obsid"]).to_numpy()
    cls = np.where(in_rec, np.where(lum == "", "M", lum), np.where(typ != "", "non-M:" + typ,
                                                                     "non-M"))  # fmt: skip
    st["class"] = cls
    return st.drop(columns=["luminosity_class", "type"]).set_index("obsid")


def diff_catalogs(a: Mapping, b: Mapping, *, n_sigma: float = 3.0) -> pd.DataFrame:
    """What changed between two builds of the catalog (e.g. two data releases or runs).

    Parameters
    ----------
    a, b : CatalogSet or mapping
        :func:`build_catalog` results (old, new).
    n_sigma : float
        An rv or parameter "changed" when ``|new - old| > n_sigma * sqrt(err_old**2 +
        err_new**2)`` (a missing error counts as 0), or when it became null / not null.

    Returns
    -------
    pandas.DataFrame
        One row per changed spectrum: ``obsid``, ``change`` (comma-joined: ``added``,
        ``removed`` from M_Catalog_V0; ``reclassified`` when the final class — dM, gM, or
        ``non-M:<type>`` — differs; ``rv``; ``parameters``; ``parameter_flag``),
        ``parameters_changed`` (which of teff, logg, m_h, alpha_m), ``class_a``,
        ``class_b``, ``rv_a``, ``rv_b``, ``rv_from_a``, ``rv_from_b``, ``<p>_a``, ``<p>_b``,
        ``parameter_flag_a``, ``parameter_flag_b``. ``df.attrs["counts"]`` counts each
        change.
    """
    if isinstance(n_sigma, bool) or not isinstance(n_sigma, int | float) or not n_sigma >= 0:
        raise ValueError(f"n_sigma must be a non-negative number, got {n_sigma!r}")
    sa, sb = _states(a), _states(b)
    j = sa.merge(sb, left_index=True, right_index=True, how="outer", suffixes=("_a", "_b"))
    only_b = ~j.index.isin(sa.index)
    only_a = ~j.index.isin(sb.index)
    both = ~only_a & ~only_b
    changes = [[] for _ in range(len(j))]
    params_changed = [[] for _ in range(len(j))]

    def moved(x, ex, y, ey):
        xa, xb = j[x].to_numpy("float64"), j[y].to_numpy("float64")
        ea = np.nan_to_num(j[ex].to_numpy("float64"), nan=0.0)
        eb = np.nan_to_num(j[ey].to_numpy("float64"), nan=0.0)
        with np.errstate(invalid="ignore"):
            big = np.abs(xb - xa) > n_sigma * np.sqrt(ea**2 + eb**2)
        return both & ((np.isnan(xa) != np.isnan(xb)) | (big & ~np.isnan(xa) & ~np.isnan(xb)))

    rv_m = moved("rv_a", "rv_err_a", "rv_b", "rv_err_b")
    p_m = {p: moved(f"{p}_a", f"{p}_err_a", f"{p}_b", f"{p}_err_b") for p in PARAMETERS}
    recl = both & (j["class_a"].to_numpy(dtype=object) != j["class_b"].to_numpy(dtype=object))
    pfa = j["parameter_flag_a"].to_numpy("float64")
    pfb = j["parameter_flag_b"].to_numpy("float64")
    pf_m = both & ~np.isnan(pfa) & ~np.isnan(pfb) & (pfa != pfb)
    for i in np.flatnonzero(only_b):
        changes[i].append("added")
    for i in np.flatnonzero(only_a):
        changes[i].append("removed")
    for i in np.flatnonzero(recl):
        changes[i].append("reclassified")
    for i in np.flatnonzero(rv_m):
        changes[i].append("rv")
    for p, m in p_m.items():
        for i in np.flatnonzero(m):
            params_changed[i].append(p)
    for i in range(len(j)):
        if params_changed[i]:
            changes[i].append("parameters")
    for i in np.flatnonzero(pf_m):
        changes[i].append("parameter_flag")
    keep = np.array([bool(c) for c in changes])
    out = pd.DataFrame(
        {
            "obsid": j.index.to_numpy()[keep],
            "change": [",".join(c) for c, k in zip(changes, keep, strict=True) if k],
            "parameters_changed": [
                ",".join(c) for c, k in zip(params_changed, keep, strict=True) if k
            ],  # fmt: skip
        }
    )
    detail = ["class_a", "class_b", "rv_a", "rv_b", "rv_err_a", "rv_err_b", "rv_from_a",
              "rv_from_b", *(f"{p}_{s}" for p in PARAMETERS for s in "ab"),
              "parameter_flag_a", "parameter_flag_b"]  # fmt: skip
    for c in detail:
        out[c] = j[c].to_numpy()[keep]
    for c in ("class_a", "class_b", "rv_from_a", "rv_from_b", "change", "parameters_changed"):
        out[c] = out[c].astype("string").fillna("")
    for c in ("parameter_flag_a", "parameter_flag_b"):
        out[c] = pd.to_numeric(out[c]).astype("Int8")
    out.attrs["counts"] = {
        "added": int(only_b.sum()),
        "removed": int(only_a.sum()),
        "reclassified": int(recl.sum()),
        "rv": int(rv_m.sum()),
        "parameters": int(np.any(np.column_stack(list(p_m.values())), axis=1).sum()),
        "parameter_flag": int(pf_m.sum()),
        "unchanged": int((both & ~keep).sum()),
    }
    return out


def diff_runs(run_a, run_b, *, n_sigma: float = 3.0) -> pd.DataFrame:
    """:func:`diff_catalogs` of two run directories (their catalogs are built, not saved).

    Parameters
    ----------
    run_a, run_b : path-like
        Old and new run directory.
    n_sigma : float
        See :func:`diff_catalogs`.

    Returns
    -------
    pandas.DataFrame
    """
    return diff_catalogs(
        build_catalog(run_a, save_fit=False), build_catalog(run_b, save_fit=False),
        n_sigma=n_sigma,
    )  # fmt: skip
