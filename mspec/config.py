"""Typed run configuration for ``mspec run CONFIG``, loaded from TOML.

One frozen :class:`Config` holds every setting of a pipeline run: the inputs (``sources``,
``store``, ``run_dir``, ``chunk_size``) at the top level of the file and one table per
concern (``[cluster]``, ``[models]``, ``[templates]``, ``[gaia]``, ``[preprocess]``,
``[rv]``, ``[ml]``, ``[thresholds]``, ``[numba]``, ``[selection]``). Every field has a default, a one-line
description and its units in the dataclass field metadata; :func:`default_toml` and
:func:`config_reference_markdown` (``docs/configuration.md``) are generated from them.

Loading is strict: an unknown table, an unknown key, a value of the wrong type, an
out-of-range number or a bad choice raises :class:`ConfigError` naming the dotted key, the
file and the expected type, e.g.::

    ConfigError: run.toml: rv.oversample must be an int, got str ('69')

An int is accepted for a float field; a bool is never accepted for an int. Relative paths in
a file resolve against the file's directory and ``~`` expands. TOML is data only: nothing in a
configuration file is ever evaluated.

:meth:`Config.section_hash` (sha256 of the canonical JSON of one section) lets the pipeline
runner refuse to resume a stage whose settings changed; :func:`save_resolved` writes the
configuration a run actually used to ``RUN_DIR/config.resolved.toml``.

Examples
--------
>>> from mspec.config import Config
>>> cfg = Config.from_dict({"store": "/data/spectra.zarr", "rv": {"engine": "torch"}})
>>> cfg.rv.engine, cfg.chunk_size
('torch', 1000)
>>> Config.from_dict(cfg.to_dict()) == cfg
True
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

try:  # Python >= 3.11
    import tomllib as _toml
except ModuleNotFoundError:  # pragma: no cover - Python 3.10 needs the tomli backport
    try:
        import tomli as _toml
    except ModuleNotFoundError:
        _toml = None

__all__ = [
    "ConfigError",
    "Config",
    "ClusterConfig",
    "ModelsConfig",
    "TemplatesConfig",
    "GaiaConfig",
    "PreprocessConfig",
    "RVConfig",
    "MLConfig",
    "ThresholdsConfig",
    "NumbaConfig",
    "SelectionConfig",
    "load_config",
    "default_toml",
    "save_resolved",
    "config_reference_markdown",
    "RESOLVED_NAME",
    "TOP_SECTION",
]

#: File name :func:`save_resolved` writes inside the run directory.
RESOLVED_NAME = "config.resolved.toml"

#: Section name of the top-level keys (``sources``, ``store``, ``run_dir``, ``chunk_size``)
#: for :meth:`Config.section_hash`; not a TOML table (those keys sit above the first table).
TOP_SECTION = "run"


class ConfigError(ValueError):
    """A bad run configuration: unknown key or table, wrong type, bad value.

    Parameters
    ----------
    source : str
        Where the configuration came from (a file path, or ``"<dict>"``).
    key : str
        Dotted key, e.g. ``"rv.oversample"`` (a table name for a bad table).
    message : str
        What is wrong, e.g. ``"must be an int, got str ('69')"``.
    expected : str, optional
        The expected type or form, e.g. ``"an int"``.
    """

    def __init__(self, source: str, key: str, message: str, expected: str = ""):
        self.source = source
        self.key = key
        self.expected = expected
        super().__init__(f"{source}: {message}")


# --------------------------------------------------------------------------------------
# field helpers
# --------------------------------------------------------------------------------------

#: value kinds: how a field is type-checked, written to TOML and resolved
_KINDS = {
    "int": "an int",
    "float": "a float",
    "bool": "a bool",
    "str": "a str",
    "strs": "a list of str",
}


def _f(
    kind: str,
    default: Any,
    doc: str,
    *,
    units: str = "",
    lo: float | None = None,
    hi: float | None = None,
    lo_open: bool = False,
    choices: tuple[str, ...] | None = None,
    path: str = "",
    optional: bool = False,
    pattern: str | None = None,
    pattern_doc: str = "",
    example: str = "",
):
    """A dataclass field with the metadata used for checking, TOML and docs.

    Parameters
    ----------
    kind : {"int", "float", "bool", "str", "strs"}
        Value type (``"strs"``: a list of str, stored as a tuple).
    default : object
        Default value (``None`` only with ``optional=True``: unset).
    doc : str
        One-line description.
    units : str
        Physical units (empty if none).
    lo, hi : float, optional
        Inclusive range limits (``lo_open``: ``lo`` itself is excluded).
    choices : tuple of str, optional
        Allowed values of a str field; with ``path="choice_or_path"`` any other value is a path.
    path : {"", "path", "paths", "choice_or_path"}
        Path handling: resolved against the config file's directory, ``~`` expanded; empty
        strings stay empty (unset).
    optional : bool
        The value may be unset (``None``; omitted from TOML).
    pattern : str, optional
        Regular expression a str value must match fully (``pattern_doc`` describes it).
    example : str
        Example TOML value shown (commented out) for an unset optional field.
    """
    meta = dict(
        kind=kind,
        doc=doc,
        units=units,
        lo=lo,
        hi=hi,
        lo_open=lo_open,
        choices=choices,
        path=path,
        optional=optional,
        pattern=pattern,
        pattern_doc=pattern_doc,
        example=example,
    )
    if kind == "strs":
        return field(default_factory=lambda: tuple(default), metadata=meta)
    return field(default=default, metadata=meta)


def _section(cls):
    return field(default_factory=cls, metadata={"section": cls})


def _type_name(v: Any) -> str:
    return type(v).__name__


def _short_repr(v: Any, n: int = 60) -> str:
    r = repr(v)
    return r if len(r) <= n else r[: n - 3] + "..."


def _got(v: Any) -> str:
    return f"got {_type_name(v)} ({_short_repr(v)})"


def _expected(meta: Mapping) -> str:
    """The expected type/form of a field in words (``"an int in 1..100000"``)."""
    kind = meta["kind"]
    s = _KINDS[kind]
    lo, hi = meta["lo"], meta["hi"]
    if lo is not None or hi is not None:
        fmt = (lambda x: f"{x:g}") if kind == "float" else (lambda x: str(int(x)))
        if lo is not None and hi is not None and meta["lo_open"]:
            s += f" > {fmt(lo)} and <= {fmt(hi)}"
        elif lo is not None and hi is not None:
            s += f" in {fmt(lo)}..{fmt(hi)}"
        elif lo is not None:
            s += f" > {fmt(lo)}" if meta["lo_open"] else f" >= {fmt(lo)}"
        else:
            s += f" <= {fmt(hi)}"
    if meta["choices"] and meta["path"] != "choice_or_path":
        s += ", one of " + ", ".join(repr(c) for c in meta["choices"])
    elif meta["choices"]:
        s += ": " + ", ".join(repr(c) for c in meta["choices"]) + " or a path"
    if meta["pattern_doc"]:
        s += f" ({meta['pattern_doc']})"
    if meta["optional"]:
        s += " (or unset)"
    return s


def _check(meta: Mapping, key: str, v: Any, source: str) -> Any:
    """Type- and range-check one value; return it normalised (int -> float, list -> tuple).

    Raises
    ------
    ConfigError
        Naming ``key``, ``source`` and the expected type.
    """
    kind = meta["kind"]
    expected = _expected(meta)

    def bad(what: str):
        return ConfigError(source, key, f"{key} must be {expected}, {what}", expected)

    def bad_type(v):
        # a wrong type names the type only: "rv.oversample must be an int, got str ('69')"
        exp = _KINDS[kind] + (" (or unset)" if meta["optional"] else "")
        return ConfigError(source, key, f"{key} must be {exp}, {_got(v)}", exp)

    if v is None:
        if meta["optional"]:
            return None
        raise bad_type(v)
    if kind == "bool":
        if not isinstance(v, bool):
            raise bad_type(v)
        return v
    if kind == "int":
        if isinstance(v, bool) or not isinstance(v, int):
            raise bad_type(v)
        v = int(v)
    elif kind == "float":
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise bad_type(v)
        v = float(v)
        if math.isnan(v) and (meta["lo"] is not None or meta["hi"] is not None):
            raise bad(_got(v))
    elif kind == "str":
        if not isinstance(v, str):
            raise bad_type(v)
    elif kind == "strs":
        if isinstance(v, (str, bytes)) or not isinstance(v, (list, tuple)):
            raise bad_type(v)
        for i, item in enumerate(v):
            if not isinstance(item, str) or not item.strip():
                raise ConfigError(
                    source,
                    f"{key}[{i}]",
                    f"{key}[{i}] must be a non-empty str, {_got(item)}",
                    "a non-empty str",
                )
        return tuple(v)
    if kind in ("int", "float"):
        lo, hi = meta["lo"], meta["hi"]
        if lo is not None and (v < lo or (meta["lo_open"] and v == lo)):
            raise bad(_got(v))
        if hi is not None and v > hi:
            raise bad(_got(v))
    if kind == "str":
        if meta["choices"] and meta["path"] != "choice_or_path" and v not in meta["choices"]:
            raise bad(_got(v))
        if meta["pattern"] and not re.fullmatch(meta["pattern"], v):
            raise bad(_got(v))
    return v


def _check_memory_limit(v: str, key: str, source: str) -> str:
    """``"auto"``, ``"0"`` (no limit) or a byte size dask understands (``"4GB"``)."""
    expected = "a str: 'auto', '0' (no limit) or a size like '4GB'"
    if v.strip().lower() == "auto":
        return "auto"
    from dask.utils import parse_bytes

    try:
        n = parse_bytes(v)
    except (ValueError, TypeError):
        raise ConfigError(source, key, f"{key} must be {expected}, {_got(v)}", expected) from None
    if n < 0:
        raise ConfigError(source, key, f"{key} must be {expected}, {_got(v)}", expected)
    return v


def _resolve_path(p: str, base_dir: Path | None) -> str:
    """Expand ``~``; join a relative path to ``base_dir`` (URLs and empty strings untouched)."""
    if not p or "://" in p:
        return p
    p = os.path.expanduser(p)
    if base_dir is not None and not os.path.isabs(p):
        p = os.path.normpath(os.path.join(os.fspath(base_dir), p))
    return p


class _Section:
    """Shared behaviour of the configuration tables (validated on construction)."""

    def __post_init__(self):
        _validate_into(self, type(self)._name, "<Config>")

    def to_dict(self) -> dict:
        """The table as a plain dict (lists for list fields, ``None`` for unset)."""
        return {
            f.name: list(v) if isinstance(v := getattr(self, f.name), tuple) else v
            for f in dataclasses.fields(self)
        }


def _validate_into(obj, prefix: str, source: str) -> None:
    """Check every field of ``obj`` in place (frozen: via ``object.__setattr__``)."""
    for f in dataclasses.fields(obj):
        if "kind" not in f.metadata:
            continue
        key = f"{prefix}.{f.name}" if prefix else f.name
        v = _check(f.metadata, key, getattr(obj, f.name), source)
        if key == "cluster.memory_limit":
            v = _check_memory_limit(v, key, source)
        object.__setattr__(obj, f.name, v)


# --------------------------------------------------------------------------------------
# the tables
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClusterConfig(_Section):
    """Dask cluster: a LocalCluster started by the runner, or a running scheduler."""

    _name = "cluster"
    n_workers: int = _f(
        "int",
        0,
        "Worker processes of the LocalCluster; 0 = one per core.",
        units="count",
        lo=0,
        hi=4096,
    )
    threads_per_worker: int = _f(
        "int",
        1,
        "Threads per worker process (numba kernels release the GIL).",
        units="count",
        lo=1,
        hi=1024,
    )
    memory_limit: str = _f(
        "str",
        "auto",
        "Memory limit per worker: 'auto' (share of the machine), '0' (none) or a size like '4GB'.",
        units="bytes",
    )
    scheduler: str = _f(
        "str",
        "",
        "Address of a running dask scheduler (e.g. 'tcp://host:8786'); empty = start a LocalCluster.",
    )


@dataclass(frozen=True)
class ModelsConfig(_Section):
    """Trained CNNs (CNN-SPT, CNN-WDM, CNN-dMgM, CNN-TLMA ensembles)."""

    _name = "models"
    dir: str = _f(
        "str",
        "",
        "Directory of trained models; empty = the default simulator-trained models from the cache.",
        units="path",
        path="path",
    )


@dataclass(frozen=True)
class TemplatesConfig(_Section):
    """RV template library for χ² template matching."""

    _name = "templates"
    set: str = _f(
        "str",
        "real",
        "Template library: 'real' (PyHammer SDSS M templates), 'demo' (simulator grid) or a path to a saved library.",
        units="name or path",
        choices=("real", "demo"),
        path="choice_or_path",
    )


@dataclass(frozen=True)
class GaiaConfig(_Section):
    """External photometry and astrometry joined into the catalogue (the paper's CMD)."""

    _name = "gaia"
    table: str = _f(
        "str",
        "",
        "Gaia/WISE cross-match table (Parquet/CSV/FITS), joined on obsid when it has that column, else by position within `radius`; its columns replace those from `hats`; empty = none.",
        units="path",
        path="path",
    )
    hats: str = _f(
        "str",
        "",
        "HATS catalogue or collection (directory or URL, e.g. https://data.lsdb.io/hats/gaia_dr3) cross-matched by position within `radius` per chunk with lsdb (extra `mspec[survey]`); empty = none.",
        units="path or URL",
        path="path",
    )
    radius: float = _f(
        "float",
        3.0,
        "Positional match radius for `hats` and for a `table` without obsid (nearest source within it).",
        units="arcsec",
        lo=0.0,
        lo_open=True,
    )


@dataclass(frozen=True)
class PreprocessConfig(_Section):
    """Preprocessing onto the 1 Å model grid for the CNNs."""

    _name = "preprocess"
    max_gap: float | None = _f(
        "float",
        None,
        "Widest gap between good pixels bridged by interpolation; unset = bridge every gap.",
        units="Angstrom",
        lo=0.0,
        lo_open=True,
        optional=True,
        example="10.0",
    )
    fill_value: float = _f(
        "float",
        0.0,
        "Value written into uncovered grid points of the CNN input.",
        units="normalised flux",
    )


@dataclass(frozen=True)
class RVConfig(_Section):
    """χ² template-matching radial velocities (TM and TML7500; see ``mspec.template_match``)."""

    _name = "rv"
    weighting: str = _f(
        "str",
        "none",
        "χ² weights: 'none' (the paper's unweighted χ²) or 'ivar' (inverse variance).",
        choices=("none", "ivar"),
    )
    oversample: int = _f(
        "int",
        69,
        "Velocity-lattice steps per native pixel (69 gives 1.0005 km/s).",
        units="steps per pixel",
        lo=1,
        hi=10_000,
    )
    fit_halfwidth: int = _f(
        "int",
        2,
        "Trial RVs each side of the χ² minimum in the Gaussian fit (2 = 5 points).",
        units="trial points",
        lo=1,
        hi=10,
    )
    min_pixels: int = _f(
        "int",
        200,
        "Fewest usable window pixels for a measurement (fewer: status 'no coverage').",
        units="pixels",
        lo=1,
        hi=100_000,
    )
    mask_tellurics: bool = _f(
        "bool",
        False,
        "Also drop the telluric bands from the χ² (not in the paper).",
    )
    engine: str = _f(
        "str",
        "numba",
        "χ² engine: 'numba' (CPU kernels) or 'torch' (GPU when available).",
        choices=("numba", "torch"),
    )
    device: str = _f(
        "str",
        "",
        "torch device for engine = 'torch' (e.g. 'cpu', 'cuda:0'); empty = CUDA if available, else CPU.",
        pattern=r"|[A-Za-z][A-Za-z0-9_]*(:\d+)?",
        pattern_doc="empty or like 'cpu', 'cuda:0'",
    )
    tml_wave_max: float = _f(
        "float",
        7500.0,
        "Upper end of the observed-frame window of TML7500 (only the paper's 7500 is accepted: "
        "the output names say what was computed).",
        units="Angstrom",
        lo=7500.0,
        hi=7500.0,
    )


@dataclass(frozen=True)
class MLConfig(_Section):
    """CNN inference (SCM, DGCM, SPMM)."""

    _name = "ml"
    batch_size: int = _f(
        "int",
        1024,
        "Spectra per forward pass of a network.",
        units="spectra",
        lo=1,
        hi=1_000_000,
    )
    device: str = _f(
        "str",
        "",
        "torch device (e.g. 'cpu', 'cuda:0'); empty = CUDA if available, else CPU.",
        pattern=r"|[A-Za-z][A-Za-z0-9_]*(:\d+)?",
        pattern_doc="empty or like 'cpu', 'cuda:0'",
    )


@dataclass(frozen=True)
class ThresholdsConfig(_Section):
    """RV reconciliation and inspection thresholds (the paper's RVMM decision rules)."""

    _name = "thresholds"
    tm_sigma: float = _f(
        "float",
        3.0,
        "Accept the TM RV when within this many combined errors of the LAMOST pipeline RV.",
        units="sigma",
        lo=0.0,
        lo_open=True,
        hi=1e6,
    )
    dsal_sigma: float = _f(
        "float",
        2.0,
        "Else accept the DSAL RV when within this many combined errors of the LAMOST RV.",
        units="sigma",
        lo=0.0,
        lo_open=True,
        hi=1e6,
    )
    inspect_abs_rv: float = _f(
        "float",
        150.0,
        "Spectra with |RV| above this always go to the inspection queue.",
        units="km/s",
        lo=0.0,
        lo_open=True,
        hi=3e5,
    )


@dataclass(frozen=True)
class NumbaConfig(_Section):
    """numba compilation cache."""

    _name = "numba"
    cache: bool = _f("bool", True, "Cache compiled numba kernels on disk (faster worker start).")
    cache_dir: str = _f(
        "str",
        "",
        "Directory of the numba cache; empty = the user cache directory.",
        units="path",
        path="path",
    )


@dataclass(frozen=True)
class SelectionConfig(_Section):
    """Which spectra enter the M-star selection (SCM; see ``mspec.scm``)."""

    _name = "selection"
    entry: str = _f(
        "str",
        "lamost",
        "Spectra that enter SCM: 'lamost' (LAMOST's M list: subclass dM*, gM*, sdM*, M*, as the "
        "paper) or 'all' (every spectrum; M stars LAMOST typed otherwise become new_m).",
        choices=("lamost", "all"),
    )


# --------------------------------------------------------------------------------------
# the configuration
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Config:
    """The settings of one pipeline run (frozen; validated on construction).

    Build one with :func:`load_config` (a TOML file), :meth:`from_dict` or ``Config()``
    (all defaults); derive variants with :meth:`replace`. ``store`` and ``run_dir`` default
    to empty (unset); :meth:`check_complete` raises if a run needs them.

    Attributes
    ----------
    sources : tuple of str
        Spectra to ingest (paths, globs, catalogue files).
    store : str
        Path of the Zarr spectra store.
    run_dir : str
        Directory of the run's outputs.
    chunk_size : int
        Spectra per chunk.
    cluster, models, templates, gaia, preprocess, rv, ml, thresholds, numba, selection
        The tables (:class:`ClusterConfig` ...).
    """

    sources: tuple[str, ...] = _f(
        "strs",
        (),
        "Spectra to ingest: FITS files, directories, globs or LAMOST catalogues (CSV/Parquet); empty = use the existing store.",
        units="paths",
        path="paths",
    )
    store: str = _f(
        "str",
        "",
        "Zarr spectra store (created by ingest if sources are given); required for a run.",
        units="path",
        path="path",
    )
    run_dir: str = _f(
        "str",
        "",
        "Run directory: stage outputs, done records, logs, catalogue; required for a run.",
        units="path",
        path="path",
    )
    chunk_size: int = _f(
        "int",
        1000,
        "Spectra per chunk of the store and of every stage output.",
        units="spectra",
        lo=1,
        hi=100_000,
    )
    cluster: ClusterConfig = _section(ClusterConfig)
    models: ModelsConfig = _section(ModelsConfig)
    templates: TemplatesConfig = _section(TemplatesConfig)
    gaia: GaiaConfig = _section(GaiaConfig)
    preprocess: PreprocessConfig = _section(PreprocessConfig)
    rv: RVConfig = _section(RVConfig)
    ml: MLConfig = _section(MLConfig)
    thresholds: ThresholdsConfig = _section(ThresholdsConfig)
    numba: NumbaConfig = _section(NumbaConfig)
    selection: SelectionConfig = _section(SelectionConfig)

    def __post_init__(self):
        _validate_into(self, "", "<Config>")
        for name, cls in _SECTIONS.items():
            v = getattr(self, name)
            if not isinstance(v, cls):
                expected = f"a {cls.__name__}"
                raise ConfigError(
                    "<Config>", name, f"{name} must be {expected}, {_got(v)}", expected
                )

    # -- construction -------------------------------------------------------------------

    @classmethod
    def from_dict(
        cls, d: Mapping, source: str = "<dict>", *, base_dir: str | os.PathLike | None = None
    ) -> Config:
        """Build a configuration from a nested mapping (the parsed TOML), strictly.

        Parameters
        ----------
        d : Mapping
            Top-level keys and one mapping per table; missing keys take their defaults.
        source : str
            Name used in error messages (a file path for :func:`load_config`).
        base_dir : path-like, optional
            Directory relative paths resolve against (the config file's directory). Without
            it relative paths are kept as given; ``~`` always expands.

        Returns
        -------
        Config

        Raises
        ------
        ConfigError
            Unknown table or key, wrong type, out-of-range or bad choice (names the dotted
            key, ``source`` and the expected type).
        """
        if not isinstance(d, Mapping):
            raise ConfigError(source, "", f"the configuration must be a table, {_got(d)}")
        base = None if base_dir is None else Path(base_dir).expanduser().absolute()
        top: dict[str, Any] = {}
        sections: dict[str, Any] = {}
        for key, value in d.items():
            if not isinstance(key, str):
                raise ConfigError(source, str(key), f"key {key!r} must be a str")
            if key in _SECTIONS:
                if isinstance(value, _SECTIONS[key]):
                    value = value.to_dict()
                if not isinstance(value, Mapping):
                    raise ConfigError(
                        source, key, f"{key} must be a table ([{key}]), {_got(value)}", "a table"
                    )
                sections[key] = _parse_section(key, value, source, base)
            elif key in _TOP_FIELDS:
                top[key] = _parse_value(_TOP_FIELDS[key], key, value, source, base)
            else:
                raise _unknown(key, value, source, "")
        return cls(**top, **sections)

    def to_dict(self) -> dict:
        """The configuration as a nested dict of plain values (JSON-able; ``None`` = unset).

        ``Config.from_dict(cfg.to_dict()) == cfg``.
        """
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if "section" in f.metadata:
                out[f.name] = v.to_dict()
            else:
                out[f.name] = list(v) if isinstance(v, tuple) else v
        return out

    def replace(self, **changes) -> Config:
        """A copy with some settings changed (validated like a file).

        Parameters
        ----------
        **changes
            Top-level keys (``chunk_size=500``), tables as a mapping merged into the current
            one (``rv={"engine": "torch"}``) or a section object, or dotted keys
            (``**{"rv.oversample": 10}``).

        Returns
        -------
        Config

        Raises
        ------
        ConfigError
            As :meth:`from_dict` (source ``"<replace>"``).
        """
        d = self.to_dict()
        for key, value in changes.items():
            if "." in key:
                sec, _, name = key.partition(".")
                if sec not in _SECTIONS:
                    raise _unknown(key, value, "<replace>", "")
                d[sec][name] = value
            elif key in _SECTIONS and isinstance(value, Mapping):
                d[key].update(value)
            else:
                d[key] = value
        return Config.from_dict(d, source="<replace>")

    # -- output -------------------------------------------------------------------------

    def to_toml(self, *, commented: bool = False) -> str:
        """The configuration as TOML text; :func:`load_config` reads it back equal.

        Parameters
        ----------
        commented : bool
            Precede every key with its description and units as ``#`` comments.

        Returns
        -------
        str
        """
        return _to_toml(self, commented)

    # -- hashing ------------------------------------------------------------------------

    def section_dict(self, name: str) -> dict:
        """One section as a plain dict; ``name`` a table or ``"run"`` (the top-level keys).

        Raises
        ------
        KeyError
            Unknown section name.
        """
        if name == TOP_SECTION:
            return {k: v for k, v in self.to_dict().items() if k in _TOP_FIELDS}
        if name not in _SECTIONS:
            raise KeyError(
                f"unknown config section {name!r}; expected one of "
                + ", ".join(repr(s) for s in (TOP_SECTION, *_SECTIONS))
            )
        return getattr(self, name).to_dict()

    def section_hash(self, name: str) -> str:
        """sha256 (hex) of the canonical JSON of one section.

        Parameters
        ----------
        name : str
            A table name (``"rv"``, ``"preprocess"`` ...) or ``"run"`` for the top-level keys
            (``sources``, ``store``, ``run_dir``, ``chunk_size``).

        Returns
        -------
        str
            64 hex digits; changes exactly when a value of that section changes.
        """
        return _sha256(self.section_dict(name))

    def hash(self, sections: tuple[str, ...] | list[str] | None = None) -> str:
        """sha256 (hex) of the canonical JSON of the configuration.

        Parameters
        ----------
        sections : sequence of str, optional
            Hash only these sections (names as in :meth:`section_hash`); default all.

        Returns
        -------
        str
        """
        if sections is None:
            return _sha256(self.to_dict())
        return _sha256({s: self.section_dict(s) for s in sections})

    def check_complete(self, source: str = "<Config>") -> Config:
        """Raise unless the keys a pipeline run needs (``store``, ``run_dir``) are set.

        Returns
        -------
        Config
            ``self``.

        Raises
        ------
        ConfigError
        """
        for key in ("store", "run_dir"):
            if not getattr(self, key):
                raise ConfigError(
                    source, key, f"{key} is required for a run (a str path), got ''", "a str"
                )
        return self


_SECTIONS: dict[str, type] = {
    f.name: f.metadata["section"] for f in dataclasses.fields(Config) if "section" in f.metadata
}
_TOP_FIELDS: dict[str, dataclasses.Field] = {
    f.name: f for f in dataclasses.fields(Config) if "kind" in f.metadata
}
_SECTION_FIELDS: dict[str, dict[str, dataclasses.Field]] = {
    name: {f.name: f for f in dataclasses.fields(cls)} for name, cls in _SECTIONS.items()
}


def _all_keys() -> dict[str, dataclasses.Field]:
    out = dict(_TOP_FIELDS)
    for sec, fs in _SECTION_FIELDS.items():
        out.update({f"{sec}.{k}": f for k, f in fs.items()})
    return out


def _unknown(key: str, value: Any, source: str, section: str) -> ConfigError:
    """ConfigError for an unknown key or table: what was expected, and a 'did you mean'."""
    dotted = f"{section}.{key}" if section else key
    if not section and isinstance(value, Mapping):
        close = difflib.get_close_matches(key, list(_SECTIONS), n=1)
        hint = f"; did you mean [{close[0]}]?" if close else ""
        expected = "one of the tables " + ", ".join(f"[{s}]" for s in _SECTIONS)
        return ConfigError(
            source, key, f"unknown table [{key}]{hint} (expected {expected})", expected
        )
    keys = _all_keys()
    if section:
        names = list(_SECTION_FIELDS[section])
        close = difflib.get_close_matches(key, names, n=1)
        if key in _TOP_FIELDS:
            hint = f"; {key} is a top-level key: put it above the first [table]"
        elif close:
            meta = keys[f"{section}.{close[0]}"].metadata
            hint = f"; did you mean {section}.{close[0]} ({_expected(meta)})?"
        else:
            hint = ""
        expected = f"one of the keys of [{section}]: " + ", ".join(names)
    else:
        # a typo of a top-level key, or a table's key written above the tables
        leaf = [k for k in keys if k.rsplit(".", 1)[-1] == key]
        close = difflib.get_close_matches(key, list(_TOP_FIELDS) + list(_SECTIONS), n=1)
        if leaf:
            hint = f"; did you mean {leaf[0]} (in table [{leaf[0].split('.')[0]}])?"
        elif close and close[0] in _TOP_FIELDS:
            hint = f"; did you mean {close[0]} ({_expected(_TOP_FIELDS[close[0]].metadata)})?"
        elif close:
            hint = f"; did you mean the table [{close[0]}]?"
        else:
            hint = ""
        expected = "one of the top-level keys " + ", ".join(_TOP_FIELDS) + " or a [table]"
    return ConfigError(
        source, dotted, f"unknown key {dotted}{hint} (expected {expected})", expected
    )


def _parse_value(f: dataclasses.Field, key: str, value: Any, source: str, base) -> Any:
    meta = f.metadata
    v = _check(meta, key, value, source)
    how = meta["path"]
    if how == "path" or (how == "choice_or_path" and v not in meta["choices"]):
        v = _resolve_path(v, base)
    elif how == "paths":
        v = tuple(_resolve_path(p, base) for p in v)
    return v


def _parse_section(name: str, d: Mapping, source: str, base) -> Any:
    fields_ = _SECTION_FIELDS[name]
    kwargs = {}
    for key, value in d.items():
        if not isinstance(key, str) or key not in fields_:
            raise _unknown(str(key), value, source, name)
        dotted = f"{name}.{key}"
        v = _parse_value(fields_[key], dotted, value, source, base)
        if dotted == "cluster.memory_limit":
            v = _check_memory_limit(v, dotted, source)
        kwargs[key] = v
    return _SECTIONS[name](**kwargs)


# --------------------------------------------------------------------------------------
# hashing, TOML text
# --------------------------------------------------------------------------------------


def _canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=True)


def _sha256(obj: Any) -> str:
    return hashlib.sha256(_canonical_json(obj).encode("ascii")).hexdigest()


_ESCAPES = {
    '"': '\\"',
    "\\": "\\\\",
    "\b": "\\b",
    "\t": "\\t",
    "\n": "\\n",
    "\f": "\\f",
    "\r": "\\r",
}


def _toml_str(s: str) -> str:
    out = []
    for ch in s:
        if ch in _ESCAPES:
            out.append(_ESCAPES[ch])
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    if isinstance(v, str):
        return _toml_str(v)
    if isinstance(v, (list, tuple)):
        if not v:
            return "[]"
        if len(v) == 1:
            return f"[{_toml_value(v[0])}]"
        return "[\n" + "".join(f"    {_toml_value(x)},\n" for x in v) + "]"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")  # pragma: no cover


def _comment(meta: Mapping) -> list[str]:
    text = meta["doc"]
    if meta["units"]:
        text += f" [{meta['units']}]"
    lines = [f"# {text}"]
    lines.append(f"# Type: {_expected(meta)}.")
    return lines


def _key_lines(name: str, value: Any, meta: Mapping, commented: bool) -> list[str]:
    lines = _comment(meta) if commented else []
    if value is None:
        if commented:
            lines.append(f"# {name} = {meta['example'] or '...'}  # unset by default")
    else:
        lines.append(f"{name} = {_toml_value(value)}")
    return lines


_HEADER = """\
# mspec run configuration (TOML), for `mspec run CONFIG`.
# Relative paths resolve against this file's directory; ~ expands.
# Unknown keys and tables are errors. Reference: docs/configuration.md
"""


def _to_toml(cfg: Config, commented: bool) -> str:
    out: list[str] = [_HEADER] if commented else []
    for name, f in _TOP_FIELDS.items():
        out.extend(_key_lines(name, getattr(cfg, name), f.metadata, commented))
        if commented:
            out.append("")
    for sec in _SECTIONS:
        if out and out[-1] != "":
            out.append("")
        obj = getattr(cfg, sec)
        if commented:
            out.append(f"# {_first_line(type(obj).__doc__)}")
        out.append(f"[{sec}]")
        for key, f in _SECTION_FIELDS[sec].items():
            out.extend(_key_lines(key, getattr(obj, key), f.metadata, commented))
            if commented:
                out.append("")
    while out and out[-1] == "":
        out.pop()
    return "\n".join(out) + "\n"


def _first_line(doc: str | None) -> str:
    return (doc or "").strip().splitlines()[0].strip() if doc else ""


# --------------------------------------------------------------------------------------
# public functions
# --------------------------------------------------------------------------------------


def _require_toml():
    if _toml is None:  # pragma: no cover - only on Python 3.10 without tomli
        raise ImportError(
            "reading TOML on Python 3.10 needs the 'tomli' package (pip install tomli)"
        )
    return _toml


def load_config(path: str | os.PathLike) -> Config:
    """Read a run configuration from a TOML file.

    Parameters
    ----------
    path : path-like
        The TOML file. Relative paths inside it resolve against its directory.

    Returns
    -------
    Config

    Raises
    ------
    FileNotFoundError
        ``path`` does not exist.
    ConfigError
        Invalid TOML, or an unknown/mistyped key (the message names the dotted key, the
        file and the expected type).
    """
    toml = _require_toml()
    source = os.fspath(path)
    p = Path(source).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"configuration file not found: {source}")
    try:
        with open(p, "rb") as fh:
            data = toml.load(fh)
    except toml.TOMLDecodeError as e:
        raise ConfigError(source, "", f"invalid TOML: {e}", "TOML") from None
    except UnicodeDecodeError:
        raise ConfigError(source, "", "not a text file (invalid UTF-8): not TOML", "TOML") from None
    return Config.from_dict(data, source=source, base_dir=p.absolute().parent)


def default_toml(commented: bool = True) -> str:
    """The default configuration as TOML text (loads back to ``Config()``).

    Parameters
    ----------
    commented : bool
        Precede each key with its description, units and type as ``#`` comments.

    Returns
    -------
    str
    """
    return Config().to_toml(commented=commented)


def save_resolved(config: Config, run_dir: str | os.PathLike) -> Path:
    """Write the configuration a run uses to ``run_dir/config.resolved.toml`` (atomically).

    Parameters
    ----------
    config : Config
        The resolved configuration (absolute paths after :func:`load_config`).
    run_dir : path-like
        Run directory; created if missing.

    Returns
    -------
    pathlib.Path
        The written file; :func:`load_config` reads it back equal to ``config``.
    """
    d = Path(run_dir).expanduser()
    d.mkdir(parents=True, exist_ok=True)
    out = d / RESOLVED_NAME
    text = f"# resolved configuration of this run; sha256 {config.hash()}\n" + config.to_toml(
        commented=True
    )
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, out)
    return out


def _md_cell(s: str) -> str:
    return s.replace("|", "\\|")


def _md_default(v: Any) -> str:
    if v is None:
        return "unset"
    return "`" + _toml_value(list(v) if isinstance(v, tuple) else v).replace("\n", " ") + "`"


def _md_table(rows: list[tuple[str, dataclasses.Field, Any]]) -> list[str]:
    lines = ["| Key | Type | Default | Units | Description |", "|---|---|---|---|---|"]
    for key, f, default in rows:
        m = f.metadata
        lines.append(
            f"| `{key}` | {_md_cell(_expected(m))} | {_md_cell(_md_default(default))} "
            f"| {_md_cell(m['units'] or '–')} | {_md_cell(m['doc'])} |"
        )
    return lines


def config_reference_markdown() -> str:
    """The configuration reference page (``docs/configuration.md``), generated.

    Regenerate the page with ``python -m mspec.config > docs/configuration.md``.

    Returns
    -------
    str
        Markdown: one table per section (key, type, default, units, description) and the
        commented default file.
    """
    cfg = Config()
    out = [
        "# Run configuration",
        "",
        "<!-- Generated by mspec.config.config_reference_markdown(); do not edit by hand.",
        "     Regenerate: python -m mspec.config > docs/configuration.md -->",
        "",
        "`mspec run CONFIG` reads one TOML file into a typed, frozen `mspec.config.Config`",
        "(`mspec.config.load_config(path)`). Every key has a default; a file only needs the keys",
        "it changes (in practice `store`, `run_dir` and usually `sources`).",
        "",
        "* **Strict**: an unknown table, an unknown key, a wrong type, an out-of-range number or",
        "  a bad choice is an error naming the dotted key, the file and the expected type, e.g.",
        "  `ConfigError: run.toml: rv.oversample must be an int, got str ('69')`. An int is",
        "  accepted for a float key; `true`/`false` never for an int key.",
        "* **Paths** (`sources`, `store`, `run_dir`, `models.dir`, `templates.set` when not a",
        "  name, `gaia.table`, `gaia.hats`, `numba.cache_dir`) resolve relative to the",
        "  configuration file's directory; `~` expands; a URL (`scheme://...`) is kept as is;",
        "  an empty string means unset.",
        "* **Safe**: TOML is data; nothing in the file is evaluated.",
        "* **Resume**: the run writes the resolved configuration to",
        f"  `RUN_DIR/{RESOLVED_NAME}` and stamps each stage with `Config.section_hash(name)`",
        '  (sha256 of the canonical JSON of one section; `"run"` names the top-level keys), so',
        "  a stage whose settings changed is not resumed.",
        "",
        "Python: `load_config(path)`, `Config.from_dict(d)`, `Config.to_dict()`,",
        "`Config.to_toml()`, `Config.replace(**changes)`, `Config.hash()`,",
        "`Config.section_hash(name)`, `default_toml()`, `save_resolved(config, run_dir)`.",
        "",
        "## Top-level keys",
        "",
        "These come before the first `[table]` of the file.",
        "",
    ]
    out += _md_table([(k, f, getattr(cfg, k)) for k, f in _TOP_FIELDS.items()])
    for sec, cls in _SECTIONS.items():
        obj = getattr(cfg, sec)
        out += ["", f"## `[{sec}]`", "", _first_line(cls.__doc__), ""]
        out += _md_table(
            [(f"{sec}.{k}", f, getattr(obj, k)) for k, f in _SECTION_FIELDS[sec].items()]
        )
    out += [
        "",
        "## Default file",
        "",
        "`mspec.config.default_toml()` (loads back to the defaults):",
        "",
        "```toml",
        default_toml(commented=True).rstrip("\n"),
        "```",
        "",
    ]
    return "\n".join(out)


if __name__ == "__main__":  # pragma: no cover
    import sys

    if sys.argv[1:] == ["--defaults"]:
        sys.stdout.write(default_toml(commented=True))
    else:
        sys.stdout.write(config_reference_markdown())
