"""Label tables for training on real spectra: read, join to a spectra store, filter.

A user's label catalogue (an APOGEE DR17 x LAMOST cross-match, a literature compilation, a
class list) rarely carries the store's row order. :func:`join_labels` attaches its rows to
the store's spectra by

- ``obsid`` (LAMOST observation id; columns ``obsid``/``OBSID``),
- file name (columns ``file``, ``file_name``, ``filename``, ``FILENAME``, ``spec_file``,
  ``fits``, ``path``; compared by base name without ``.gz``, so paths and ``.fits.gz`` work), or
- position (columns ``ra``/``dec``, ``RA``/``DEC``, ``RAJ2000``/``DEJ2000``, degrees) within a
  radius (default 3 arcsec, the paper's cross-match radius; astropy ``search_around_sky``):
  every spectrum of a star gets the star's labels, and a spectrum with several table rows
  within the radius gets the nearest;

and reports the table rows that matched no spectrum. :func:`label_columns` finds the label
columns under their usual names (APOGEE's ``TEFF``, ``LOGG``, ``M_H``, ``ALPHA_M``,
``ASPCAP_CLASS``; literature ``teff_lit`` ...; ``[Fe/H]`` stands in for ``[M/H]`` when no
``[M/H]`` column exists) or as the user maps them. :func:`training_filters` applies the paper's
training-set filters: S/N_max = max(S/N_u..z) >= 5, and classes consistent with the LAMOST
pipeline's. :func:`lumclass_from_logg` gives M stars a dwarf/giant class from a label
table's log g when it has no class column (split at :data:`DWARF_LOGG_MIN`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

__all__ = [
    "OBSID_COLUMNS",
    "FILE_COLUMNS",
    "POSITION_COLUMNS",
    "LABEL_ALIASES",
    "LabelJoin",
    "read_label_table",
    "join_labels",
    "label_columns",
    "lumclass_from_aspcap",
    "DWARF_LOGG_MIN",
    "lumclass_from_logg",
    "training_filters",
]

log = logging.getLogger("mspec.ml")

OBSID_COLUMNS = ("obsid", "OBSID", "ObsID", "lamost_obsid")
FILE_COLUMNS = ("file", "file_name", "filename", "FILENAME", "FILE", "spec_file", "fits", "path")
POSITION_COLUMNS = (
    ("ra", "dec"),
    ("RA", "DEC"),
    ("RAJ2000", "DEJ2000"),
    ("ra_deg", "dec_deg"),
    ("RA_deg", "DEC_deg"),
)
#: Label -> column names tried in order (first present wins); ``--columns`` overrides.
LABEL_ALIASES = {
    "teff": ("teff", "TEFF", "Teff", "teff_lit", "TEFF_SPEC", "teff_apogee"),
    "logg": ("logg", "LOGG", "log_g", "logg_lit", "LOGG_SPEC", "logg_apogee"),
    "m_h": ("m_h", "M_H", "[M/H]", "mh", "m_h_apogee", "feh", "fe_h", "FE_H", "[Fe/H]", "feh_lit"),
    "alpha_m": ("alpha_m", "ALPHA_M", "[alpha/M]", "alpha_m_apogee"),
    "rv": ("rv", "RV", "vhelio", "VHELIO_AVG", "rv_lamost"),
    "lumclass": ("lumclass", "luminosity_class", "LUMCLASS", "dmgm"),
    "aspcap_class": ("ASPCAP_CLASS", "aspcap_class"),
}
_METALLICITY_STANDINS = ("feh", "fe_h", "FE_H", "[Fe/H]", "feh_lit")


@dataclass
class LabelJoin:
    """A label table joined to a store's spectra.

    Attributes
    ----------
    table : pandas.DataFrame
        One row per store spectrum, in store order (index: store row 0..n-1), holding the
        matched table row's columns (NaN/None where unmatched) plus ``_table_row`` (row of
        the label table, -1 unmatched) and, for position joins, ``_sep_arcsec``.
    key : str
        ``"obsid"``, ``"file"`` or ``"position"``.
    report : dict
        ``key``, ``n_table``, ``n_spectra``, ``n_spectra_matched``, ``n_table_matched``,
        ``n_table_unmatched``, ``unmatched`` (the first 50 unmatched table keys), and for
        position joins ``radius_arcsec`` and ``n_spectra_with_several_rows``.
    unmatched : pandas.DataFrame
        The table rows that matched no spectrum.
    """

    table: object
    key: str
    report: dict = field(default_factory=dict)
    unmatched: object = None


def read_label_table(labels):
    """Read a label table: a pandas DataFrame, or a CSV / Parquet / FITS file.

    Parameters
    ----------
    labels : pandas.DataFrame or path-like
        ``.csv`` (also ``.csv.gz``, ``.txt``), ``.parquet``/``.pq`` or ``.fits``/``.fit``
        (first table HDU, via astropy; multidimensional columns are dropped).

    Returns
    -------
    pandas.DataFrame

    Raises
    ------
    ValueError
        If the file does not exist, has an unknown suffix or no rows.
    """
    import pandas as pd

    if isinstance(labels, pd.DataFrame):
        table = labels.reset_index(drop=True)
    else:
        path = Path(labels)
        if not path.exists():
            raise ValueError(f"labels file {str(path)!r} does not exist")
        name = path.name.lower()
        if name.endswith((".parquet", ".pq")):
            table = pd.read_parquet(path)
        elif name.endswith((".csv", ".txt", ".csv.gz")):
            table = pd.read_csv(path)
        elif name.endswith((".fits", ".fit", ".fits.gz")):
            from astropy.table import Table

            t = Table.read(path)
            keep = [c for c in t.colnames if len(t[c].shape) <= 1]
            table = t[keep].to_pandas()
            for c in table.columns:  # FITS strings come padded
                if table[c].dtype == object:
                    table[c] = table[c].map(
                        lambda v: v.decode().strip() if isinstance(v, bytes) else v
                    )
        else:
            raise ValueError(f"labels {str(path)!r}: expected a .csv, .parquet or .fits file")
    if len(table) == 0:
        raise ValueError("labels table has no rows")
    return table


def _first(table, names):
    for c in names:
        if c in table.columns:
            return c
    return None


def _base(name) -> str:
    s = str(name).strip().replace("\\", "/").rsplit("/", 1)[-1]
    return s[:-3] if s.lower().endswith(".gz") else s


def join_labels(ds, table, *, on: str = "auto", radius_arcsec: float = 3.0) -> LabelJoin:
    """Attach label-table rows to the spectra of a store.

    Parameters
    ----------
    ds : xarray.Dataset
        The store (:func:`mspec.open_store`): ``obsid``, and ``file`` or ``ra``/``dec`` as
        the join needs (only these per-spectrum variables are read).
    table : pandas.DataFrame
        The label table (:func:`read_label_table`).
    on : {"auto", "obsid", "file", "position"}
        Join key. ``"auto"``: ``obsid`` if the table has an obsid column, else the file name,
        else the position.
    radius_arcsec : float
        Position-join radius (arcsec, > 0).

    Returns
    -------
    LabelJoin

    Raises
    ------
    ValueError
        Unknown ``on``, a key column missing in the table or the store, duplicate obsid or
        file names in the table, or no table row matching any spectrum.
    """
    import pandas as pd

    if on not in ("auto", "obsid", "file", "position"):
        raise ValueError(f"on must be 'auto', 'obsid', 'file' or 'position', got {on!r}")
    if not float(radius_arcsec) > 0:
        raise ValueError(f"radius_arcsec must be > 0, got {radius_arcsec}")
    n = ds.sizes["spectra"]
    table = table.reset_index(drop=True)
    c_obs, c_file = _first(table, OBSID_COLUMNS), _first(table, FILE_COLUMNS)
    c_pos = next(((a, b) for a, b in POSITION_COLUMNS if a in table and b in table), None)
    if on == "auto":
        on = "obsid" if c_obs else "file" if c_file else "position" if c_pos else None
        if on is None:
            raise ValueError(
                "labels table needs a join key: an obsid column "
                f"({', '.join(OBSID_COLUMNS)}), a file-name column ({', '.join(FILE_COLUMNS)}) "
                "or ra/dec columns (degrees)"
            )
    row_of = np.full(n, -1, dtype=np.int64)
    sep = None
    extra = {}
    if on in ("obsid", "file"):
        col = c_obs if on == "obsid" else c_file
        if col is None:
            names = OBSID_COLUMNS if on == "obsid" else FILE_COLUMNS
            raise ValueError(f"labels table needs an obsid column for on={on!r} (one of {names})"
                             if on == "obsid" else
                             f"labels table needs a file-name column (one of {names})")  # fmt: skip
        if on == "obsid":
            keys_t = pd.to_numeric(table[col], errors="coerce")
            bad = keys_t.isna()
            keys_t = keys_t.fillna(-1).astype(np.int64).to_numpy()
            keys_s = (ds["obsid"].values if "obsid" in ds.coords or "obsid" in ds
                      else np.arange(n)).astype(np.int64)  # fmt: skip
        else:
            if "file" not in ds:
                raise ValueError("the store has no 'file' variable: join on obsid or position")
            keys_t = np.array([_base(v) for v in table[col].astype(str)], dtype=object)
            bad = table[col].isna().to_numpy()
            keys_s = np.array([_base(v) for v in np.asarray(ds["file"].values).astype(str)],
                              dtype=object)  # fmt: skip
        kt = pd.Series(keys_t)
        dup = kt[~np.asarray(bad)].duplicated(keep=False)
        if dup.any():
            raise ValueError(
                f"labels table has duplicate {on} values in column {col!r} (e.g. "
                f"{kt[~np.asarray(bad)][dup].iloc[0]!r}); one label row per spectrum"
            )
        lookup = {k: i for i, k in enumerate(keys_t) if not bad[i]}
        for j, k in enumerate(keys_s):
            row_of[j] = lookup.get(k, -1)
        extra["column"] = col
    else:
        if c_pos is None:
            raise ValueError(
                "labels table needs ra/dec columns in degrees for a position join (one of "
                f"{[f'{a}/{b}' for a, b in POSITION_COLUMNS]})"
            )
        for v in ("ra", "dec"):
            if v not in ds:
                raise ValueError(f"the store has no {v!r} variable: join on obsid or file")
        from astropy import units as u
        from astropy.coordinates import SkyCoord, search_around_sky

        ra_t = pd.to_numeric(table[c_pos[0]], errors="coerce").to_numpy(np.float64)
        de_t = pd.to_numeric(table[c_pos[1]], errors="coerce").to_numpy(np.float64)
        ra_s = np.asarray(ds["ra"].values, np.float64)
        de_s = np.asarray(ds["dec"].values, np.float64)
        gt = np.flatnonzero(np.isfinite(ra_t) & np.isfinite(de_t) & (np.abs(de_t) <= 90))
        gs = np.flatnonzero(np.isfinite(ra_s) & np.isfinite(de_s) & (np.abs(de_s) <= 90))
        sep = np.full(n, np.nan)
        if gt.size and gs.size:
            ct = SkyCoord(ra_t[gt] * u.deg, de_t[gt] * u.deg)
            cs = SkyCoord(ra_s[gs] * u.deg, de_s[gs] * u.deg)
            i_s, i_t, d2, _ = search_around_sky(cs, ct, float(radius_arcsec) * u.arcsec)
            d = d2.to_value(u.arcsec)
            order = np.lexsort((d, i_s))  # per spectrum, nearest first
            i_s, i_t, d = i_s[order], i_t[order], d[order]
            first = np.ones(i_s.size, bool)
            first[1:] = i_s[1:] != i_s[:-1]
            several = np.unique(i_s[~first])
            row_of[gs[i_s[first]]] = gt[i_t[first]]
            sep[gs[i_s[first]]] = d[first]
            extra["n_spectra_with_several_rows"] = int(several.size)
        else:
            extra["n_spectra_with_several_rows"] = 0
        extra["radius_arcsec"] = float(radius_arcsec)
        extra["columns"] = list(c_pos)
    matched_t = np.unique(row_of[row_of >= 0])
    if matched_t.size == 0:
        what = {"obsid": "no obsid of the labels table is in the store",
                "file": "no file name of the labels table is in the store",
                "position": f"no labels-table position within {radius_arcsec} arcsec of a "
                            "store spectrum"}[on]  # fmt: skip
        raise ValueError(what)
    aligned = table.reindex(row_of).reset_index(drop=True)  # row -1: all missing
    aligned["_table_row"] = row_of
    if sep is not None:
        aligned["_sep_arcsec"] = sep
    unmatched = table.drop(index=table.index[matched_t]).copy()
    key_cols = [c for c in (c_obs, c_file, *(c_pos or ())) if c is not None]
    report = {
        "key": on,
        **extra,
        "n_table": int(len(table)),
        "n_spectra": int(n),
        "n_spectra_matched": int((row_of >= 0).sum()),
        "n_table_matched": int(matched_t.size),
        "n_table_unmatched": int(len(unmatched)),
        "unmatched": unmatched[key_cols].head(50).to_dict(orient="records") if key_cols else [],
    }
    if len(unmatched):
        log.warning("labels: %d of %d table rows match no spectrum of the store (join on %s)",
                    len(unmatched), len(table), on)  # fmt: skip
    return LabelJoin(aligned, on, report, unmatched)


def label_columns(table, kind: str, columns: dict | None = None) -> dict:
    """Find the label columns of a table for a model ``kind``.

    Parameters
    ----------
    table : pandas.DataFrame
    kind : {"spt", "wdm", "dmgm", "tlma"}
        Classifiers need a class column (``<kind>``, ``label``, ``class``; CNN-dMgM also
        ``lumclass``/``luminosity_class``/``ASPCAP_CLASS``); CNN-TLMA needs at least one of
        ``teff, logg, m_h, alpha_m`` (aliases in :data:`LABEL_ALIASES`) and may use ``rv``,
        ``lumclass`` and ``ASPCAP_CLASS``.
    columns : dict, optional
        Explicit mapping label -> table column (e.g. ``{"m_h": "feh_lit"}``), checked.

    Returns
    -------
    dict
        label -> column name, for the labels found (``"class"`` for classifiers).

    Raises
    ------
    ValueError
        If a mapped column is missing or the required labels are not found.
    """
    columns = dict(columns or {})
    for k, c in columns.items():
        if c not in table.columns:
            raise ValueError(f"columns: {k}={c!r}: no column {c!r} in the labels table")
    out: dict[str, str] = {}
    if kind in ("spt", "wdm", "dmgm"):
        names = (kind, "label", "class", "CLASS")
        if kind == "dmgm":
            names += LABEL_ALIASES["lumclass"] + LABEL_ALIASES["aspcap_class"]
        c = columns.get("class") or columns.get(kind) or _first(table, names)
        if c is None:
            raise ValueError(f"labels table needs a {kind} class column (one of {list(names)})")
        out["class"] = c
        return out
    if kind != "tlma":
        raise ValueError(f"kind must be one of ('spt', 'wdm', 'dmgm', 'tlma'), got {kind!r}")
    unknown = set(columns) - set(LABEL_ALIASES)
    if unknown:
        raise ValueError(f"columns: unknown label(s) {sorted(unknown)}; known: "
                         f"{sorted(LABEL_ALIASES)}")  # fmt: skip
    for k, names in LABEL_ALIASES.items():
        c = columns.get(k) or _first(table, names)
        if c is not None:
            out[k] = c
    if not any(k in out for k in ("teff", "logg", "m_h", "alpha_m")):
        raise ValueError(
            "labels table has none of the CNN-TLMA label columns teff, logg, m_h, alpha_m "
            "(or their aliases, see mspec.ml.labels.LABEL_ALIASES); map them with columns="
        )
    if out.get("m_h") in _METALLICITY_STANDINS and "m_h" not in columns:
        log.warning("labels: no [M/H] column; using %r ([Fe/H]) as [M/H]", out["m_h"])
    return out


def lumclass_from_aspcap(values) -> np.ndarray:
    """``dM``/``gM``/``""`` from APOGEE ``ASPCAP_CLASS`` grid names (``Md_*`` / ``Mg_*``)."""
    v = np.asarray(values).astype(str)
    s = np.char.strip(v)
    return np.where(np.char.startswith(s, "Md"), "dM", np.where(np.char.startswith(s, "Mg"),
                                                                 "gM", "")).astype("<U2")  # fmt: skip


#: log g (cgs) at and above which an M star counts as a dwarf (dM), below as a giant (gM).
#: The paper's recommended ranges (Li et al. 2025, Table 10; :data:`mspec.flags.TABLE10_RANGES`)
#: are log g 4.35-5.45 for M dwarfs and -0.05-1.55 for M giants: 3.0 lies in the middle of the
#: ~2.8 dex gap between them (M stars have no subgiant branch to fill it), so label errors of
#: ~1 dex still land on the right side; it is also the simulator's own split
#: (``mspec.simulate.survey``: M stars with log g < 3.0 are giants).
DWARF_LOGG_MIN = 3.0


def lumclass_from_logg(logg) -> np.ndarray:
    """``dM`` (log g >= :data:`DWARF_LOGG_MIN`), ``gM`` (below) or ``""`` (no log g) per row.

    Meant for M stars: a K dwarf's log g says ``dM`` too (the LAMOST-consistency filter of
    :func:`training_filters` then drops spectra LAMOST does not type M or K7).
    """
    import pandas as pd

    g = pd.to_numeric(pd.Series(np.asarray(logg, dtype=object)), errors="coerce").to_numpy(float)
    with np.errstate(invalid="ignore"):
        return np.where(np.isfinite(g), np.where(g >= DWARF_LOGG_MIN, "dM", "gM"),
                        "").astype("<U2")  # fmt: skip


def _lamost_kind(lamost_class, lamost_subclass, kind: str) -> np.ndarray:
    """What the LAMOST pipeline says, in the label vocabulary of ``kind`` ('' = unknown)."""
    cl = np.char.upper(np.char.strip(np.asarray(lamost_class).astype(str)))
    sub = np.char.strip(np.asarray(lamost_subclass).astype(str))
    # luminosity prefixes: gM3 (giant), dM3 (dwarf), sdM1 (subdwarf) -> spectral letter M
    core = [s[2:] if s.startswith("sd") else s[1:] if s[:1] in ("d", "g") else s for s in sub]
    first = np.array([s[:1].upper() for s in core], dtype="<U1")
    star = cl == "STAR"
    if kind == "spt":
        letter = np.where(np.isin(first, ["O", "B"]), "OB", first)
        out = np.where(star & np.isin(letter, ["OB", "A", "F", "G", "K", "M"]), letter, "")
        out = np.where(cl == "GALAXY", "GALAXY", np.where(cl == "QSO", "QSO", out))
        return out.astype("<U6")
    # LAMOST's K7, the subtype just before M0, counts as M-type for the M-star networks
    k7 = np.array([c.upper() == "K7" for c in core], dtype=bool)
    if kind == "wdm":
        wd = star & np.char.startswith(np.char.upper(sub), "WD")
        return np.where(wd, "WD", np.where(star & ((first == "M") | k7), "M", "")).astype("<U2")
    # dmgm / tlma: giants carry a 'g' prefix (gM3); dwarfs M3, dM3, sdM1, K7
    mtype = star & ((first == "M") | k7)
    return np.where(mtype & np.char.startswith(sub, "g"), "gM",
                    np.where(mtype, "dM", "")).astype("<U2")  # fmt: skip


def training_filters(ds, labels_class=None, *, kind: str, snr_min: float = 5.0,
                     consistent: bool = True) -> tuple[np.ndarray, dict]:  # fmt: skip
    """The paper's training-set filters, per store spectrum.

    Parameters
    ----------
    ds : xarray.Dataset
        The store (reads ``snr_u`` ... ``snr_z``, ``lamost_class``, ``lamost_subclass``).
    labels_class : array-like of str, optional
        The label table's class per spectrum (``spt``/``wdm``/``dmgm`` classes, or
        ``dM``/``gM`` for CNN-TLMA); empty or None = no class to check.
    kind : {"spt", "wdm", "dmgm", "tlma"}
    snr_min : float
        Keep S/N_max = max(snr_u, snr_g, snr_r, snr_i, snr_z) >= ``snr_min`` (paper: 5).
    consistent : bool
        Keep only spectra whose label class agrees with the LAMOST pipeline's class (paper:
        consistency of classification results; for CNN-TLMA the dwarf/giant class, as the
        paper required ASPCAP_CLASS to agree with the DGCM class). Spectra for which LAMOST
        gives no usable class (``Unknown``) are dropped; no label class = no check. For the
        M-star networks (WDM, dMgM, TLMA) LAMOST's K7 counts as M-type (the subtype just
        before M0; LAMOST types many early M dwarfs K7); CNN-SPT compares the letter.

    Returns
    -------
    (numpy.ndarray of bool, dict)
        Keep mask and the number dropped per reason (``"snr_max"``, ``"inconsistent_class"``).
    """
    n = ds.sizes["spectra"]
    keep = np.ones(n, bool)
    counts = {}
    bands = [f"snr_{b}" for b in "ugriz" if f"snr_{b}" in ds]
    if snr_min is not None and bands:
        snr = np.stack([np.asarray(ds[b].values, np.float64) for b in bands], 1)
        with np.errstate(invalid="ignore"):
            smax = np.nanmax(np.where(np.isfinite(snr), snr, -np.inf), axis=1)
        ok = smax >= float(snr_min)
        counts["snr_max"] = int((~ok).sum())
        keep &= ok
    if consistent and labels_class is not None and "lamost_class" in ds and "lamost_subclass" in ds:
        lab = np.asarray(labels_class, dtype=object)
        lab = np.array(["" if v is None or (isinstance(v, float) and np.isnan(v)) else str(v)
                        for v in lab])  # fmt: skip
        lk = _lamost_kind(ds["lamost_class"].values, ds["lamost_subclass"].values,
                          "dmgm" if kind == "tlma" else kind)  # fmt: skip
        check = lab != ""
        ok = ~check | (lk == lab)
        counts["inconsistent_class"] = int((~ok).sum())
        keep &= ok
    return keep, counts
