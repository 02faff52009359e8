"""Read and write LAMOST low-resolution spectrum FITS files (every layout).

Three layouts exist; the reader tells them apart from the file's *content*, never its name:

``"image"`` (DR2-DR8)
    Primary HDU holds a 5 x N image: flux, ivar, wavelength (A, vacuum), andmask, ormask.
    float32, or float64 in the DR2 (pipeline 2.7.5) files.
``"oldest"`` (DR1, pipeline v2.6.4)
    Same 5 x N image, but row 2 is a normalised flux ("Subcontinuum"), not a wavelength; the
    wavelengths are ``10**(COEFF0 + COEFF1 * i)``. Recognised positively, never as "anything
    else with COEFF keys": exactly 5 rows, N from 1000 to 2 ``NPIX`` (real files: 3904-3909),
    COEFF1 within 1 % of 1e-4, COEFF0 within 0.02 dex (200 pixels) of 3.5682, ``EXTEN0`` (when
    present) naming the Subcontinuum row, finite ivar >= 0, finite mask values non-negative
    integers. Anything else is quarantined as ``unknown_layout``. These files have no
    ``OBSID``: see :func:`derived_obsid`.
``"table"`` (DR9+)
    Header-only primary HDU (stale NAXISn cards ignored) and a binary table (``COADD``) with
    one row of array columns FLUX, IVAR, WAVELENGTH, ANDMASK, ORMASK (masks stored as floats),
    NORMALIZATION.

Gzipped files are recognised by their magic bytes and decompressed as a stream, never past
:data:`MAX_FILE_BYTES` (a LAMOST spectrum is < 1 MB; larger files, plain or decompressed, are
quarantined as ``too_large`` without being held in memory). Each spectrum is placed on the
shared native grid :func:`mspec.variables.loglam_grid` (``NPIX`` pixels from log10 lambda =
3.5682, step 1e-4): by an integer pixel offset when the file's wavelengths lie on the grid
(within :data:`ON_GRID_TOL` pixels), otherwise by linear interpolation with propagated inverse
variance (never by snapping), flagged with ``resampled = True`` and ``loglam_offset``.
Grid pixels the file does not cover are padded with NaN flux, ivar 0 and the
:data:`MASK_NODATA` bit in both masks.

Values are cleaned, never silently dropped: non-finite flux (or flux beyond float32) is stored
as NaN with ivar 0; NaN, infinite or negative ivar as 0; a mask value that is not a
non-negative integer below 2**31 (NaN, inf, 1e20, -1, 0.5) as :data:`MASK_NODATA`, so the
pixel counts as masked. A header card that cannot be parsed (``SNRI = 12.5.3``, non-ASCII
bytes) or a non-finite number gives the missing value of its field (NaN, -1, "" or a derived
obsid) and a message in ``read_warnings``; the spectrum is kept. Finite S/N, RA, Dec and Z
values are kept as given (negative or huge S/N included): judging them is left to later
stages.
"""

from __future__ import annotations

import hashlib
import io
import os
import stat
import warnings
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from mspec.variables import C_KMS, DLOGLAM, LOGLAM0, NPIX, VARIABLES, annotate, loglam_grid

__all__ = [
    "LAYOUTS",
    "MASK_NODATA",
    "MAX_FILE_BYTES",
    "ON_GRID_TOL",
    "QUARANTINE_CODES",
    "META_VARIABLES",
    "BadFileError",
    "read_lamost",
    "read_spectrum",
    "write_lamost_fits",
    "derived_obsid",
    "detect_layout",
    "input_catalog_magnitudes",
]

#: File layouts understood by :func:`read_lamost` and written by :func:`write_lamost_fits`.
LAYOUTS = ("image", "oldest", "table")

#: Mask bit set (in both ``andmask`` and ``ormask``) on grid pixels a file does not cover:
#: LAMOST's own NODATA bit (bit 6, value 32), as :mod:`mspec.simulate` uses for short spectra.
MASK_NODATA = np.int32(32)

#: A file is "on the grid" when the median offset of its pixels from the nearest grid pixels is
#: at most this many pixels (0.14 km/s) and every pixel is within :data:`_STEP_TOL`. Real
#: DR7/DR9 files sit +0.0011 px off because their float32 wavelengths were computed from a
#: float32 COEFF0; anything larger is resampled, never snapped (0.02 px = 1.4 km/s).
ON_GRID_TOL = 0.002
_STEP_TOL = 0.005

#: Largest file (after gunzip) the reader accepts, in bytes. A LAMOST spectrum is < 1 MB; the
#: cap stops a small ``.fits.gz`` from expanding to gigabytes. Read at call time, so it can be
#: changed here (per process) or per call with ``max_bytes=``.
MAX_FILE_BYTES = 16 * 2**20

# Positive checks of the DR1 ("oldest") layout, which has no wavelength row to check.
_OLDEST_NPIX = (1000, 2 * NPIX)  # real files: 3904-3909 pixels
_OLDEST_COEFF0_TOL = 0.02  # dex (200 pixels): real files start at 3.5682, written ones trimmed
_OLDEST_COEFF1_RTOL = 0.01

#: Reasons a file is quarantined by :func:`mspec.io.store.ingest` (code -> meaning).
QUARANTINE_CODES = {
    "not_found": "file does not exist or cannot be opened",
    "not_fits": "not a FITS file",
    "truncated": "file is shorter than its headers say (or a broken gzip stream)",
    "too_large": "file (after gunzip) larger than MAX_FILE_BYTES",
    "unknown_layout": "no LAMOST spectrum layout recognised",
    "wavelength_not_increasing": "wavelengths not finite, positive and strictly increasing",
    "no_grid_overlap": "wavelengths do not overlap the shared grid",
    "no_finite_flux": "no finite flux value",
    "all_masked": "every pixel masked (ivar 0 or andmask set)",
    "duplicate_obsid": "obsid already stored (the first occurrence is kept)",
    "read_error": "unexpected error while reading",
    "changed_during_ingest": "read when planned but not when written (moved or rewritten "
    "meanwhile); retried by the next ingest",
    "outside_root": "listed in a catalogue but outside the catalogue's folder (not opened)",
}

#: Per-spectrum variables read_lamost produces, with their in-memory dtypes and missing values.
META_VARIABLES: dict[str, tuple[str, object]] = {
    "ra": ("float64", np.nan),
    "dec": ("float64", np.nan),
    "mjd": ("int64", -1),
    "snr_u": ("float64", np.nan),
    "snr_g": ("float64", np.nan),
    "snr_r": ("float64", np.nan),
    "snr_i": ("float64", np.nan),
    "snr_z": ("float64", np.nan),
    "lamost_class": ("str", ""),
    "lamost_subclass": ("str", ""),
    "lamost_z": ("float64", np.nan),
    "lamost_z_err": ("float64", np.nan),
    "lamost_rv": ("float64", np.nan),
    "file": ("str", ""),
    "release": ("str", ""),
    "loglam_offset": ("float64", 0.0),
    "resampled": ("bool", False),
}

# Pipeline version -> data release for files without DATA_V (documented in docs/store.md).
_VERSPIPE_RELEASE = {"2.6": "LAMOST DR1", "2.7": "LAMOST DR2"}
_Z_MISSING = -9999.0
_GRID = loglam_grid()


class BadFileError(ValueError):
    """A file cannot be ingested; ``code`` is a key of :data:`QUARANTINE_CODES`."""

    def __init__(self, code: str, reason: str):
        if code not in QUARANTINE_CODES:  # pragma: no cover - programming error
            raise KeyError(code)
        super().__init__(f"{code}: {reason}")
        self.code = code
        self.reason = reason


# --------------------------------------------------------------------------- low level I/O


class _View:
    """What the readers need from a file: HDU 0 header (dict), primary image, spectrum table."""

    __slots__ = ("header", "image", "table", "n_hdus")

    def __init__(self, header, image, table, n_hdus):
        self.header = header  # dict: key -> value (first occurrence)
        self.image = image  # primary data array or None
        self.table = table  # {COLUMN: row-0 1-D array} of the FLUX/IVAR/WAVELENGTH table, or None
        self.n_hdus = n_hdus


_CHUNK = 1 << 16


def _read_bytes(path, max_bytes: int | None = None) -> bytes:
    """Whole file in memory (gunzipped, at most ``max_bytes``); classify missing, empty, too
    large, broken gzip, not FITS."""
    limit = MAX_FILE_BYTES if max_bytes is None else max_bytes
    try:
        with open(path, "rb") as fh:
            head = fh.read(2)
            if head == b"\x1f\x8b":
                raw = _gunzip_capped(fh, head, limit)
            else:
                st = os.fstat(fh.fileno())
                if stat.S_ISREG(st.st_mode) and st.st_size > limit:
                    raise BadFileError("too_large", f"{st.st_size} bytes (limit {limit})")
                # a pipe has no size: read one byte past the cap instead
                rest = fh.read() if stat.S_ISREG(st.st_mode) else fh.read(limit - len(head) + 1)
                raw = head + rest
                if len(raw) > limit:
                    raise BadFileError("too_large", f"more than {limit} bytes")
    except OSError as exc:
        raise BadFileError("not_found", f"cannot open: {exc}") from None
    if not raw:
        raise BadFileError("truncated", "empty file")
    if not raw.startswith(b"SIMPLE  ="):
        raise BadFileError("not_fits", "no SIMPLE card at the start of the file")
    return raw


def _gunzip_capped(fh, pending: bytes, limit: int) -> bytes:
    """Decompress a (multi-member) gzip stream chunk by chunk, never holding more than
    ``limit + 1`` output bytes: a gzip bomb is rejected after ``limit`` bytes (and a stream of
    empty members after ``2 * limit`` compressed bytes)."""
    out = bytearray()
    dec = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)  # gzip header and CRC checked by zlib
    n_in = len(pending)
    try:
        while True:
            if not pending:
                pending = fh.read(_CHUNK)
                if not pending:
                    break
                n_in += len(pending)
                if n_in > 2 * limit:
                    raise BadFileError("too_large", f"more than {2 * limit} compressed bytes")
            if dec.eof:  # another member follows (trailing NUL padding is allowed, as gzip does)
                pending = pending.lstrip(b"\0")
                if not pending:
                    continue
                dec = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
            out += dec.decompress(pending, limit + 1 - len(out))
            if len(out) > limit:
                raise BadFileError("too_large", f"decompresses to more than {limit} bytes")
            pending = dec.unused_data if dec.eof else dec.unconsumed_tail
    except zlib.error as exc:
        raise BadFileError("truncated", f"broken gzip stream: {exc}") from None
    if not dec.eof:
        raise BadFileError("truncated", "broken gzip stream: ends before the end-of-stream marker")
    return bytes(out)


# ---- fast path: the plain FITS LAMOST writes (no scaling, no heap); anything else -> astropy


class _NotPlain(Exception):
    pass


def _card_value(text: str):
    text = text.strip()
    if text.startswith("'"):
        out, i = [], 1
        while i < len(text):
            c = text[i]
            if c == "'":
                if text[i + 1 : i + 2] == "'":
                    out.append("'")
                    i += 2
                    continue
                return "".join(out).rstrip()
            out.append(c)
            i += 1
        raise _NotPlain("unterminated string")
    v = text.split("/", 1)[0].strip()
    if v == "T":
        return True
    if v == "F":
        return False
    if not v:
        return None
    try:
        return int(v)
    except ValueError:
        pass
    try:
        return float(v.replace("D", "E"))
    except ValueError:
        raise _NotPlain(f"value {v!r}") from None


class _BadCard(str):
    """The raw text of a header card whose value cannot be parsed (``12.5.3``, non-ASCII
    bytes): the metadata treats it as missing and records a warning, instead of losing the
    whole spectrum to one card."""


class _LazyHeader(dict):
    """Header cards parsed on first access (most of LAMOST's ~120 cards are never read)."""

    def __getitem__(self, key):
        v = dict.__getitem__(self, key)
        if isinstance(v, bytes):
            # non-ASCII bytes become "?", as astropy reads them
            text = v.decode("ascii", "replace").replace("\ufffd", "?")
            try:
                v = _card_value(text)
            except _NotPlain:
                v = _BadCard(text.split("/", 1)[0].strip())
            dict.__setitem__(self, key, v)
        return v

    def get(self, key, default=None):
        return self[key] if key in self else default


def _parse_header(raw: bytes, pos: int):
    cards = _LazyHeader()
    while True:
        block = raw[pos : pos + 2880]
        if len(block) < 2880:
            raise _NotPlain("header runs past the end")
        for i in range(0, 2880, 80):
            key = block[i : i + 8].rstrip()
            if key == b"END":
                return cards, pos + 2880
            if key == b"CONTINUE":  # long strings: leave them to astropy
                raise _NotPlain("CONTINUE card")
            if block[i + 8 : i + 10] == b"= ":
                k = key.decode("ascii")
                if k not in cards:
                    dict.__setitem__(cards, k, block[i + 10 : i + 80])
        pos += 2880


_BITPIX = {-32: ">f4", -64: ">f8", 16: ">i2", 32: ">i4", 64: ">i8", 8: "u1"}
_TFORM = {"E": ">f4", "D": ">f8", "J": ">i4", "I": ">i2", "K": ">i8", "B": "u1"}


def _data_size(h) -> int:
    naxis = int(h.get("NAXIS", 0))
    if naxis == 0:
        return 0
    n = 1
    for k in range(1, naxis + 1):
        n *= int(h[f"NAXIS{k}"])
    return abs(int(h["BITPIX"])) // 8 * (n + int(h.get("PCOUNT", 0))) * int(h.get("GCOUNT", 1))


def _fast_view(raw: bytes) -> _View:
    hdr, pos = _parse_header(raw, 0)
    if any(k in hdr for k in ("BSCALE", "BZERO", "BLANK")) or hdr.get("GROUPS"):
        raise _NotPlain("scaled primary")
    naxis = int(hdr.get("NAXIS", 0))
    image = None
    if naxis:
        shape = tuple(int(hdr[f"NAXIS{k}"]) for k in range(naxis, 0, -1))
        dt = np.dtype(_BITPIX[int(hdr["BITPIX"])])
        count = int(np.prod(shape))
        if pos + count * dt.itemsize > len(raw):
            raise _NotPlain("truncated")
        image = np.frombuffer(raw, dtype=dt, count=count, offset=pos).reshape(shape)
    pos += -(-_data_size(hdr) // 2880) * 2880
    table, n_hdus = None, 1
    while pos < len(raw) and table is None:
        ext, pos_data = _parse_header(raw, pos)
        n_hdus += 1
        size = _data_size(ext)
        if ext.get("XTENSION") == "BINTABLE":
            names = [
                str(ext.get(f"TTYPE{k}", "")).upper() for k in range(1, int(ext["TFIELDS"]) + 1)
            ]
            if {"FLUX", "IVAR", "WAVELENGTH"} <= set(names):
                if int(ext.get("PCOUNT", 0)) or int(ext["NAXIS2"]) < 1:
                    raise _NotPlain("heap or empty table")
                if pos_data + int(ext["NAXIS1"]) > len(raw):
                    raise _NotPlain("truncated")
                table, off = {}, pos_data
                for k, name in enumerate(names, start=1):
                    if f"TSCAL{k}" in ext or f"TZERO{k}" in ext:
                        raise _NotPlain("scaled column")
                    form = str(ext[f"TFORM{k}"]).strip()
                    rep, code = (int(form[:-1]) if form[:-1] else 1), form[-1]
                    dt = np.dtype(_TFORM[code])
                    table[name] = np.frombuffer(raw, dtype=dt, count=rep, offset=off)
                    off += rep * dt.itemsize
                if off != pos_data + int(ext["NAXIS1"]):
                    raise _NotPlain("row layout")
        pos = pos_data + -(-size // 2880) * 2880
    return _View(hdr, image, table, n_hdus)


# ---- general path: astropy, which also classifies what the fast path refused


def _astropy_view(raw: bytes) -> _View:
    from astropy.io import fits

    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            hdul = fits.open(io.BytesIO(raw), memmap=False, lazy_load_hdus=False, cache=False)
    except OSError as exc:
        if len(raw) < 2880:
            raise BadFileError("truncated", f"only {len(raw)} bytes: {exc}") from None
        raise BadFileError("not_fits", str(exc)) from None
    except Exception as exc:
        raise BadFileError("not_fits", f"{type(exc).__name__}: {exc}") from None
    with hdul:
        for w in caught:
            if "truncated" in str(w.message):
                raise BadFileError("truncated", str(w.message))
        for k, hdu in enumerate(hdul):
            end = getattr(hdu, "_data_offset", 0) + getattr(hdu, "_data_size", 0)
            if end > len(raw):
                raise BadFileError(
                    "truncated", f"HDU {k} needs {end} bytes but the file has {len(raw)}"
                )
        try:
            header = _astropy_header(hdul[0].header)
            image = hdul[0].data
            table = None
            for hdu in hdul[1:]:
                cols = getattr(hdu, "columns", None)
                if cols is None or not {"FLUX", "IVAR", "WAVELENGTH"} <= {
                    c.upper() for c in cols.names
                }:
                    continue
                if hdu.data is None or len(hdu.data) < 1:
                    raise BadFileError("truncated", "empty spectrum table")
                row = hdu.data[0]
                table = {c.upper(): np.asarray(row[c]).ravel() for c in cols.names}
                break
            return _View(header, image, table, len(hdul))
        except (ValueError, TypeError, IndexError) as exc:
            if isinstance(exc, BadFileError):
                raise
            raise BadFileError("truncated", f"cannot read the data: {exc}") from None


def _astropy_header(hdr) -> dict:
    """First occurrence of each key; an unparsable card (astropy's VerifyError on access)
    becomes a :class:`_BadCard`, as in the fast path."""
    out = {}
    for card in hdr.cards:
        key = card.keyword
        if key in out:
            continue
        try:
            out[key] = card.value
        except Exception:  # astropy raises VerifyError (not a ValueError) for these cards
            # the raw text: ``card.image`` would "fix" the card and warn once per file
            text = getattr(card, "_image", None) or ""
            out[key] = _BadCard(text[10:].split("/", 1)[0].strip())
    return out


def _view(path, max_bytes: int | None = None) -> _View:
    raw = _read_bytes(path, max_bytes)
    try:
        return _fast_view(raw)
    except (_NotPlain, KeyError, ValueError, TypeError, IndexError):
        return _astropy_view(raw)


def _looks_like_wavelength(row: np.ndarray) -> bool:
    finite = row[np.isfinite(row)]
    return finite.size > 0.9 * row.size and bool(np.all((finite > 1e3) & (finite < 1e5)))


def _mostly_wavelength(row: np.ndarray) -> bool:
    """A broken wavelength row (some NaN or junk): at least half its values look like A."""
    with np.errstate(invalid="ignore"):
        return int(np.count_nonzero((row > 1e3) & (row < 1e5))) >= 0.5 * row.size


def _oldest_problem(rows: np.ndarray, hdr, exten: str) -> str:
    """Why a 5 x N image is not the DR1 layout ("" if it is); see the module docstring."""
    n = rows.shape[1]
    if not _OLDEST_NPIX[0] <= n <= _OLDEST_NPIX[1]:
        return f"{n} pixels (DR1 files have {_OLDEST_NPIX[0]}-{_OLDEST_NPIX[1]})"
    c0, c1 = _float(hdr.get("COEFF0")), _float(hdr.get("COEFF1"))
    if np.isnan(c0) or np.isnan(c1):
        return "no numeric COEFF0/COEFF1"
    if abs(c1 / DLOGLAM - 1.0) > _OLDEST_COEFF1_RTOL:
        return f"COEFF1 = {c1:g} (DR1: {DLOGLAM:g})"
    if abs(c0 - LOGLAM0) > _OLDEST_COEFF0_TOL:
        return f"COEFF0 = {c0:g} (DR1: {LOGLAM0})"
    if exten and "subcontinuum" not in exten:
        return f"EXTEN0 = {exten!r} does not describe the DR1 rows"
    ivar = rows[1][np.isfinite(rows[1])]
    if ivar.size and float(ivar.min()) < 0:
        return "negative inverse variances"
    for k, name in ((3, "andmask"), (4, "ormask")):
        m = rows[k][np.isfinite(rows[k])]  # NaN/inf masks are read as masked, not as junk
        if m.size and (float(m.min()) < 0 or not np.array_equal(m, np.floor(m))):
            return f"{name} values that are not non-negative integers"
    return ""


def detect_layout(hdul) -> str:
    """Return the layout (``"image"``, ``"oldest"``, ``"table"``) of an open file.

    A 5 x N image whose row 2 is (mostly) wavelengths, or whose ``EXTEN0`` names a wavelength
    row, is ``"image"`` (a broken wavelength row is then rejected by the wavelength check); it
    is ``"oldest"`` only if it passes the positive DR1 checks of the module docstring.

    Parameters
    ----------
    hdul : astropy.io.fits.HDUList
        The open file.

    Returns
    -------
    str
        One of :data:`LAYOUTS`.

    Raises
    ------
    BadFileError
        ``unknown_layout`` if no layout fits (the reason names the failed check).
    """
    if not isinstance(hdul, _View):
        table = None
        for hdu in hdul[1:]:
            cols = getattr(hdu, "columns", None)
            if cols is not None and {"FLUX", "IVAR", "WAVELENGTH"} <= {
                c.upper() for c in cols.names
            }:
                table = {}
        hdul = _View(hdul[0].header, hdul[0].data, table, len(hdul))
    view = hdul
    data = view.image
    hdr = view.header
    if data is not None and data.size:
        if data.ndim != 2 or data.shape[0] != 5 or data.shape[1] < 2:
            raise BadFileError("unknown_layout", f"primary image of shape {data.shape}, not 5 x N")
        row2 = np.asarray(data[2], dtype=np.float64)
        if _looks_like_wavelength(row2):
            return "image"
        exten = str(hdr.get("EXTEN0", "") or "").lower()
        if "wavelength" in exten or _mostly_wavelength(row2):
            return "image"  # a broken wavelength row: rejected by the wavelength check
        problem = _oldest_problem(np.asarray(data, dtype=np.float64), hdr, exten)
        if problem:
            raise BadFileError(
                "unknown_layout", f"5 x N image, row 2 not wavelengths and not DR1: {problem}"
            )
        return "oldest"
    if view.table is not None:
        return "table"
    if view.n_hdus == 1:
        raise BadFileError("unknown_layout", "header-only file without extensions")
    raise BadFileError("unknown_layout", "no primary image and no FLUX/IVAR/WAVELENGTH table")


def _rows(view: _View, layout: str, notes: list[str] | None = None):
    """Return (loglam float64, flux, ivar, andmask, ormask) in the file's native pixels.

    Messages about cleaned values (invalid mask values) are appended to ``notes``.
    """
    hdr = view.header
    if layout == "table":
        tab = view.table

        def col(name, default=None):
            if name not in tab:
                return default
            return np.asarray(tab[name], dtype=np.float64).ravel()

        flux, ivar, wave = col("FLUX"), col("IVAR"), col("WAVELENGTH")
        n = flux.size
        andm = col("ANDMASK", np.zeros(n))
        orm = col("ORMASK", np.zeros(n))
    else:
        data = np.asarray(view.image, dtype=np.float64)
        flux, ivar = data[0], data[1]
        andm, orm = data[3], data[4]
        n = flux.size
        if layout == "image":
            wave = data[2]
        else:
            try:
                c0, c1 = float(hdr["COEFF0"]), float(hdr["COEFF1"])
            except (KeyError, TypeError, ValueError):
                raise BadFileError(
                    "unknown_layout", "oldest layout without COEFF0/COEFF1"
                ) from None
            loglam = c0 + c1 * np.arange(n, dtype=np.float64)
            wave = None
    if not (
        ivar.size == n and andm.size == n and orm.size == n and (wave is None or wave.size == n)
    ):
        raise BadFileError("unknown_layout", "columns of different lengths")
    if wave is not None:
        if not np.all(np.isfinite(wave)) or np.any(wave <= 0):
            raise BadFileError("wavelength_not_increasing", "non-finite or non-positive wavelength")
        loglam = np.log10(wave)
    if n < 2 or not np.all(np.isfinite(loglam)) or np.any(np.diff(loglam) <= 0):
        raise BadFileError("wavelength_not_increasing", "wavelengths not strictly increasing")
    masks = []
    for name, values in (("andmask", andm), ("ormask", orm)):
        m, n_bad = _mask(values)
        if n_bad and notes is not None:
            notes.append(
                f"{name}: {n_bad} values not bit masks (NaN, inf, < 0, >= 2**31 or "
                "fractional) read as MASK_NODATA"
            )
        masks.append(m)
    return loglam, flux, ivar, masks[0], masks[1]


def _mask(values: np.ndarray) -> tuple[np.ndarray, int]:
    """Masks are stored as floats in most layouts; return them as int32 bit masks.

    A value that is no int32 bit mask (NaN, inf, negative, >= 2**31, fractional) cannot be
    trusted to say "good": it becomes :data:`MASK_NODATA` (never 0, which a plain cast gives
    for 1e20 or 2**32). Returns the masks and the number of such values.
    """
    with np.errstate(invalid="ignore"):
        ok = np.isfinite(values) & (values >= 0) & (values < 2.0**31)
        ok &= values == np.floor(values)
    out = np.where(ok, values, 0.0).astype(np.int32)
    n_bad = int(ok.size - np.count_nonzero(ok))
    if n_bad:
        out[~ok] = MASK_NODATA
    return out, n_bad


# --------------------------------------------------------------------------- grid placement


def _grid_placement(loglam: np.ndarray):
    """Return (i0, frac, on_grid): integer start pixel, sub-pixel offset, placement mode."""
    rel = (loglam - LOGLAM0) / DLOGLAM - np.arange(loglam.size)
    off = float(np.median(rel))
    i0 = int(np.rint(off))
    frac = off - i0
    on_grid = abs(frac) <= ON_GRID_TOL and float(np.max(np.abs(rel - off))) <= _STEP_TOL
    pix0 = (loglam[0] - LOGLAM0) / DLOGLAM
    return i0, float(pix0 - np.rint(pix0)), on_grid


def _place(loglam, flux, ivar, andm, orm):
    """Put one spectrum on the shared grid. Returns (arrays, loglam_offset, resampled)."""
    out_f = np.full(NPIX, np.nan, dtype=np.float32)
    out_i = np.zeros(NPIX, dtype=np.float32)
    out_a = np.full(NPIX, MASK_NODATA, dtype=np.int32)
    out_o = np.full(NPIX, MASK_NODATA, dtype=np.int32)
    i0, frac, on_grid = _grid_placement(loglam)
    if on_grid:
        lo, hi = max(i0, 0), min(i0 + loglam.size, NPIX)
        if hi <= lo:
            raise BadFileError("no_grid_overlap", f"first pixel at grid index {i0}")
        s = slice(lo - i0, hi - i0)
        out_f[lo:hi] = flux[s]
        out_i[lo:hi] = ivar[s]
        out_a[lo:hi] = andm[s]
        out_o[lo:hi] = orm[s]
        return (out_f, out_i, out_a, out_o), 0.0, False
    tol = 1e-9
    lo = int(np.searchsorted(_GRID, loglam[0] - tol, side="left"))
    hi = int(np.searchsorted(_GRID, loglam[-1] + tol, side="right"))
    if hi <= lo:
        raise BadFileError("no_grid_overlap", "wavelength range outside the shared grid")
    f, iv, a, o = _interp_to_grid(loglam, flux, ivar, andm, orm, _GRID[lo:hi])
    out_f[lo:hi], out_i[lo:hi], out_a[lo:hi], out_o[lo:hi] = f, iv, a, o
    return (out_f, out_i, out_a, out_o), frac, True


def _interp_to_grid(loglam, flux, ivar, andm, orm, grid):
    """Linear interpolation in log lambda with inverse variance and masks propagated.

    f = (1 - t) f_j + t f_(j+1); var = (1 - t)^2 / ivar_j + t^2 / ivar_(j+1); a neighbour with
    zero weight does not contribute; one with nonzero weight and ivar 0 gives ivar 0. Masks are
    the bitwise OR of the contributing neighbours.
    """
    n = loglam.size
    j = np.clip(np.searchsorted(loglam, grid, side="right") - 1, 0, n - 2)
    t = np.clip((grid - loglam[j]) / (loglam[j + 1] - loglam[j]), 0.0, 1.0)
    w0, w1 = 1.0 - t, t
    use0, use1 = w0 > 0, w1 > 0
    f0 = np.where(use0, flux[j], 0.0)
    f1 = np.where(use1, flux[j + 1], 0.0)
    f = w0 * f0 + w1 * f1
    with np.errstate(divide="ignore", invalid="ignore"):
        iv0, iv1 = ivar[j], ivar[j + 1]
        var0 = np.where(use0, np.where(iv0 > 0, w0**2 / iv0, np.inf), 0.0)
        var1 = np.where(use1, np.where(iv1 > 0, w1**2 / iv1, np.inf), 0.0)
        var = var0 + var1
        iv = np.where(np.isfinite(var) & (var > 0), 1.0 / var, 0.0)
    a = np.where(use0, andm[j], 0) | np.where(use1, andm[j + 1], 0)
    o = np.where(use0, orm[j], 0) | np.where(use1, orm[j + 1], 0)
    return f.astype(np.float32), iv.astype(np.float32), a.astype(np.int32), o.astype(np.int32)


# --------------------------------------------------------------------------- metadata


def _card(hdr, *keys):
    for k in keys:
        if k in hdr:
            v = hdr[k]
            if v is None or (isinstance(v, str) and not v.strip()):
                continue
            return v
    return None


def _float(v) -> float:
    try:
        x = float(v)
    except (TypeError, ValueError):
        return np.nan
    return x if np.isfinite(x) else np.nan


def _int(v) -> int | None:
    """An int64 value, or None (missing, unparsable, fractional or outside int64)."""
    if isinstance(v, bool | np.bool_):
        return None
    try:
        x = int(str(v).strip()) if not isinstance(v, int | np.integer) else int(v)
    except (TypeError, ValueError):
        try:
            f = float(v)
        except (TypeError, ValueError):
            return None
        if not (np.isfinite(f) and f == int(f)):
            return None
        x = int(f)
    return x if -(1 << 63) <= x < (1 << 63) else None


#: Magnitudes outside this range (mag) are the input catalogues' "no value" fillers (99, 0,
#: and the odd 20 or 1 next to real values) rather than measurements.
_MAG_RANGE = (2.0, 19.9)


def input_catalog_magnitudes(header: Mapping) -> dict[str, float]:
    """The input-catalogue magnitudes of a LAMOST target, by band.

    LAMOST headers carry up to seven magnitudes ``MAG1``..``MAG7`` of the target from the
    catalogue it was selected from, with ``MAGTYPE`` naming their bands in order, one token
    per magnitude: a lower-case letter or a capitalised word (``"gribvjh"`` is g, r, i, b,
    v, j, h; ``"ugrizFuvUv"`` is u, g, r, i, z, Fuv, Uv; ``"Kp"`` is Kepler). Which survey
    each band comes from depends on the catalogue (``TSOURCE``); the values are given as they
    are, without colour terms.

    Parameters
    ----------
    header : Mapping
        A LAMOST primary header (e.g. :func:`astropy.io.fits.getheader`).

    Returns
    -------
    dict of str to float
        Magnitude (mag) per band token; bands whose value is missing, unparsable or outside
        2-19.9 mag (the catalogues' 99, 0, ... fillers) are left out. Empty when there is no
        ``MAGTYPE``.
    """
    import re

    mtype = _card(header, "MAGTYPE")
    if not isinstance(mtype, str):
        return {}
    out: dict[str, float] = {}
    for k, band in enumerate(re.findall(r"[A-Z][a-z]*|[a-z]", mtype)[:7], start=1):
        m = _float(_card(header, f"MAG{k}"))
        if _MAG_RANGE[0] <= m <= _MAG_RANGE[1]:
            out.setdefault(band, m)
    return out


def derived_obsid(header: Mapping, path: str | os.PathLike, content: bytes | None = None) -> int:
    """Stable, unique (negative) obsid for a file without an ``OBSID`` card.

    A LAMOST spectrum is identified by its local MJD, plan, spectrograph and fibre (the parts
    of its file name ``spec-LMJD-PLANID_spSS-FFF``). The id is ``-(h mod 2**62) - 1`` where
    ``h`` is the first 8 bytes (big-endian) of the BLAKE2b hash of ``"LMJD|PLANID|SPID|FIBERID"``
    from the header. When a card is missing it is the hash of the file's base name (without
    ``.gz``) and, when given, of ``content`` (a digest of the spectrum's data): two different
    files of the same name in different folders then get different ids, while the same file
    anywhere (gzipped or not) gets the same one. It is negative, so it never collides with a
    real (positive) LAMOST OBSID, independent of the directory the file sits in, and
    identical on every machine and Python run.

    Parameters
    ----------
    header : Mapping
        FITS header of HDU 0.
    path : str or PathLike
        File path (only the base name is used, as a fallback).
    content : bytes, optional
        Digest of the file's data, hashed with the base name when a card is missing.

    Returns
    -------
    int
        A negative 64-bit integer.
    """
    keys = ("LMJD", "PLANID", "SPID", "FIBERID")
    vals = [header.get(k) for k in keys]
    if all(v is not None and str(v).strip() for v in vals):
        text = "|".join(str(v).strip() for v in vals)
    else:
        name = os.path.basename(os.fspath(path))
        text = name[:-3] if name.endswith(".gz") else name
        if content is not None:
            text += "|" + hashlib.blake2b(bytes(content), digest_size=16).hexdigest()
    h = int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")
    return -(h % (1 << 62)) - 1


def _metadata(
    hdr, path, defaults: Mapping | None, notes: list[str] | None = None, content=None
) -> dict:
    """Per-spectrum values from the header (and ``defaults``); a card that is present but
    unusable gives the field's missing value and a message in ``notes``."""
    d = dict(defaults or {})
    meta: dict[str, object] = {}
    notes = [] if notes is None else notes

    def card(kind, *cards):
        """Parsed value of the first present card, or None; bad values noted, not raised."""
        name = next((k for k in cards if _card(hdr, k) is not None), None)
        if name is None:
            return None
        v = hdr[name]
        if isinstance(v, _BadCard):
            notes.append(f"{name}: unparsable value {str(v)[:30]!r} read as missing")
            return None
        if kind == "float" and np.isnan(_float(v)):
            notes.append(f"{name}: {str(v)[:30]!r} is not a finite number; read as NaN")
            return None
        if kind == "int" and _int(v) is None:
            notes.append(f"{name}: {str(v)[:30]!r} is not a 64-bit integer; read as missing")
            return None
        return v

    obsid = _int(card("int", "OBSID"))
    if obsid is None:
        obsid = _int(d.get("obsid"))
        if obsid is None:
            obsid = derived_obsid(hdr, path, content() if callable(content) else content)
    meta["obsid"] = int(obsid)

    def num(key, *cards):
        v = _float(card("float", *cards))
        if np.isnan(v) and key in d:
            v = _float(d[key])
        meta[key] = v

    num("ra", "RA")
    num("dec", "DEC")
    mjd = _int(card("int", "MJD"))
    if mjd is None:
        mjd = _int(d.get("mjd"))
    meta["mjd"] = -1 if mjd is None else mjd
    for b in "ugriz":
        num(f"snr_{b}", f"SNR{b.upper()}", f"SN_{b.upper()}")
    for key, name in (("lamost_class", "CLASS"), ("lamost_subclass", "SUBCLASS")):
        v = card("str", name)
        meta[key] = str(v).strip() if v is not None else str(d.get(key, "") or "")
    for key, name in (("lamost_z", "Z"), ("lamost_z_err", "Z_ERR")):
        v = _float(card("float", name))
        if np.isnan(v) and key in d:
            v = _float(d[key])
        meta[key] = np.nan if (np.isnan(v) or v <= _Z_MISSING + 0.5) else v
    meta["lamost_rv"] = meta["lamost_z"] * C_KMS
    meta["file"] = os.path.basename(os.fspath(path))
    rel = card("str", "DATA_V")
    if rel is not None:
        rel = str(rel).strip()
    elif str(d.get("release", "") or ""):
        rel = str(d["release"])
    else:
        ver = str(card("str", "VERSPIPE") or "").strip().lstrip("vV")
        rel = _VERSPIPE_RELEASE.get(".".join(ver.split(".")[:2]), "")
    meta["release"] = rel
    # other registered per-spectrum variables (e.g. Gaia, truth) from a catalogue
    for key, val in d.items():
        if key not in meta and key in VARIABLES and VARIABLES[key].dims == ("spectra",):
            meta[key] = val
    return meta


# --------------------------------------------------------------------------- public readers


def read_spectrum(
    path: str | os.PathLike,
    defaults: Mapping | None = None,
    *,
    with_meta: bool = True,
    max_bytes: int | None = None,
):
    """Read one LAMOST file into plain numpy arrays on the shared grid (the fast path).

    Parameters
    ----------
    path : str or PathLike
        FITS file (any layout, optionally gzipped).
    defaults : Mapping, optional
        Values used where the file lacks them (e.g. from a LAMOST catalogue row): ``obsid``
        when there is no OBSID card, ``release`` when there is no DATA_V, header fields the file
        lacks, and any other registered per-spectrum variable (Gaia, truth, ...).
    with_meta : bool
        Also build the metadata (False returns ``None`` for it: faster).
    max_bytes : int, optional
        Largest file size (after gunzip) accepted, in bytes; default :data:`MAX_FILE_BYTES`.

    Returns
    -------
    meta : dict
        Per-spectrum values (``obsid`` and :data:`META_VARIABLES`, plus extra defaults), and
        ``read_warnings``: a ``"; "``-joined string of what was read as missing or cleaned
        (unparsable header cards, invalid mask values), ``""`` when nothing was.
    arrays : tuple of numpy.ndarray
        ``flux`` (float32), ``ivar`` (float32, 1/flux**2), ``andmask``, ``ormask`` (int32),
        each of length ``NPIX``.
    layout : str
        The detected layout.

    Raises
    ------
    BadFileError
        With a :data:`QUARANTINE_CODES` code if the file cannot be used.
    """
    if not isinstance(path, str | os.PathLike):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    if defaults is not None and not isinstance(defaults, Mapping):
        raise TypeError(f"defaults must be a mapping, got {type(defaults).__name__}")
    if max_bytes is not None:
        if not isinstance(max_bytes, int | np.integer) or isinstance(max_bytes, bool):
            raise TypeError(f"max_bytes must be an int, got {type(max_bytes).__name__}")
        if max_bytes < 1:
            raise ValueError(f"max_bytes must be positive, got {max_bytes}")
    view = _view(path, max_bytes)
    layout = detect_layout(view)
    notes: list[str] = []
    try:
        loglam, flux, ivar, andm, orm = _rows(view, layout, notes)
    except (ValueError, TypeError, IndexError) as exc:
        if isinstance(exc, BadFileError):
            raise
        raise BadFileError("truncated", f"cannot read the data: {exc}") from None
    hdr = view.header
    # flux that is not finite (or overflows float32 storage) is stored as NaN with ivar 0;
    # NaN/negative/overflowing inverse variances carry no information: stored as 0 (= masked)
    big = float(np.finfo(np.float32).max)
    with np.errstate(invalid="ignore"):
        bad_flux = ~(np.abs(flux) <= big)
        ivar = np.where(~bad_flux & (ivar > 0) & (ivar <= big), ivar, 0.0)
    flux = np.where(bad_flux, np.nan, flux)
    if bad_flux.all():
        raise BadFileError("no_finite_flux", "no finite flux value")
    good = np.isfinite(flux) & (ivar > 0) & (andm == 0)
    if not np.any(good):
        raise BadFileError("all_masked", "every pixel has ivar 0, andmask set or no flux")
    arrays, offset, resampled = _place(loglam, flux, ivar, andm, orm)
    if not with_meta:
        return None, arrays, layout

    def digest():  # the file's own data, independent of gzip and of where the file lies
        h = hashlib.blake2b(digest_size=16)
        for a in (loglam, flux, ivar, andm, orm):
            h.update(np.ascontiguousarray(a, dtype=np.float64).tobytes())
        return h.digest()

    meta = _metadata(hdr, path, defaults, notes, content=digest)
    meta["loglam_offset"] = offset
    meta["resampled"] = resampled
    meta["read_warnings"] = "; ".join(notes)
    return meta, arrays, layout


def read_lamost(
    path: str | os.PathLike, *, defaults: Mapping | None = None, max_bytes: int | None = None
):
    """Read one LAMOST low-resolution spectrum (any layout, optionally gzipped).

    Parameters
    ----------
    path : str or PathLike
        The FITS file. The layout is detected from its content (see the module docstring).
    defaults : Mapping, optional
        Values for what the file lacks (see :func:`read_spectrum`).
    max_bytes : int, optional
        Largest file size (after gunzip) accepted; default :data:`MAX_FILE_BYTES`.

    Returns
    -------
    xarray.Dataset
        dims ``spectra`` (1) and ``pixels`` (``NPIX``); coordinates ``obsid`` (int64) and
        ``loglam`` (dex, the shared grid); ``flux``, ``ivar`` (float32), ``andmask``,
        ``ormask`` (int32) and the per-spectrum metadata of :data:`META_VARIABLES`
        (NaN / -1 / "" where the file lacks a value; ``lamost_z`` NaN where Z = -9999;
        ``lamost_rv`` = Z c in km/s). ``attrs["layout"]`` names the detected layout and
        ``attrs["read_warnings"]`` what was read as missing or cleaned (see
        :func:`read_spectrum`; ``""`` when nothing was).

    Raises
    ------
    BadFileError
        If the file cannot be used (missing, too large, not FITS, truncated, unknown layout,
        bad wavelengths, no finite flux, every pixel masked); ``.code`` says which.
    """
    meta, arrays, layout = read_spectrum(path, defaults, max_bytes=max_bytes)
    ds = spectra_dataset([meta], [arrays])
    ds.attrs["layout"] = layout
    ds.attrs["read_warnings"] = str(meta.get("read_warnings", ""))
    return ds


def spectra_dataset(metas: Sequence[Mapping], arrays: Sequence[tuple]):
    """Assemble per-file results of :func:`read_spectrum` into one Dataset (in memory)."""
    import xarray as xr

    n = len(metas)
    stacked = [np.stack([a[k] for a in arrays]) if n else None for k in range(4)]
    if n == 0:
        stacked = [
            np.zeros((0, NPIX), np.float32),
            np.zeros((0, NPIX), np.float32),
            np.zeros((0, NPIX), np.int32),
            np.zeros((0, NPIX), np.int32),
        ]
    data = {
        name: (("spectra", "pixels"), arr)
        for name, arr in zip(("flux", "ivar", "andmask", "ormask"), stacked)
    }
    keys = list(META_VARIABLES)
    for m in metas:  # registered variables only (``read_warnings`` once it is registered)
        keys += [k for k in m if k not in keys and k != "obsid" and k in VARIABLES]
    for key in keys:
        kind, missing = META_VARIABLES.get(key, (None, None))
        vals = [m.get(key, missing) for m in metas]
        data[key] = ("spectra", _column(key, vals, kind))
    ds = xr.Dataset(
        data,
        coords={
            "obsid": ("spectra", np.array([m["obsid"] for m in metas], dtype=np.int64)),
            "loglam": ("pixels", loglam_grid()),
        },
    )
    return annotate(ds)


def _column(key, vals, kind=None):
    if kind is None:
        kind = {"f": "float64", "i": "int64", "b": "bool", "S": "str"}.get(
            VARIABLES[key].dtype[:1] if key in VARIABLES else "S", "float64"
        )
        if key in VARIABLES and len(VARIABLES[key].dtype) > 1:
            kind = VARIABLES[key].dtype
    if kind == "str":
        return np.array(["" if v is None else str(v) for v in vals], dtype=str).astype("U")
    return np.array(vals, dtype=kind)


# --------------------------------------------------------------------------- writer


def _covered(flux_row, ivar_row, and_row, or_row):
    """Index range [lo, hi) without the padding at both ends (NaN flux, ivar 0, and only the
    NODATA bit in both masks; padded pixels with other bits are kept, so masks round-trip)."""
    pad = (
        ~np.isfinite(flux_row)
        & ~(ivar_row > 0)
        & (and_row == MASK_NODATA)
        & (or_row == MASK_NODATA)
    )
    idx = np.flatnonzero(~pad)
    if idx.size == 0:
        return 0, flux_row.size
    return int(idx[0]), int(idx[-1]) + 1


def _fits_name(name: str, obsid: int, mjd: int, gz: bool) -> str:
    base = os.path.basename(str(name)) if name else f"spec-{mjd}-MSPEC{obsid}.fits"
    for ext in (".gz", ".fits", ".fit", ".fts"):
        if base.lower().endswith(ext):
            base = base[: -len(ext)]
    return base + (".fits.gz" if gz else ".fits")


def _as_float32_mask(values: np.ndarray, name: str) -> np.ndarray:
    out = values.astype(np.float32)
    if not np.array_equal(out.astype(np.int64), values.astype(np.int64)):
        raise ValueError(f"{name}: mask values above 2**24 cannot be written as float32 exactly")
    return out


def write_lamost_fits(
    ds,
    directory: str | os.PathLike,
    layout: str = "image",
    gzip: bool = False,
    *,
    catalog: str | None = "catalog.parquet",
    overwrite: bool = False,
    progress: bool = False,
) -> list[Path]:
    """Write spectra as LAMOST FITS files in a real layout (a simulated FITS "survey").

    Each spectrum is trimmed to the pixels between its first and last pixel that is not
    padding (NaN flux, ivar 0 and masks exactly :data:`MASK_NODATA`), like the variable-length
    real files, and written with the
    header cards the real files of that layout carry (OBSID/DATA_V/SNRx for ``"image"`` and
    ``"table"``; SN_x, VERSPIPE v2.6.4 and LMJD/PLANID/SPID/FIBERID, but no OBSID, for
    ``"oldest"``). Z/Z_ERR are -9999 where ``lamost_z`` is NaN. Wavelengths come from the
    ``loglam`` coordinate, so a shifted coordinate writes off-grid files.

    Parameters
    ----------
    ds : xarray.Dataset
        Spectra with dims (``spectra``, ``pixels``): ``flux``, ``ivar``, ``andmask``,
        ``ormask``, coordinate ``obsid``; optional ``loglam`` coordinate (default the shared
        grid) and per-spectrum metadata (``ra``, ``dec``, ``mjd``, ``snr_*``, ``lamost_*``,
        ``release``, ``file``).
    directory : str or PathLike
        Output directory (created).
    layout : {"image", "oldest", "table"}
        File layout (DR2-DR8 image, DR1 oldest image, DR9+ binary table).
    gzip : bool
        Write ``.fits.gz`` files.
    progress : bool
        Show a progress bar (one step per file).
    catalog : str or None
        File name (``.parquet`` or ``.csv``) of a LAMOST-like catalogue written in
        ``directory``: one row per file with ``file``, ``obsid`` and every registered
        per-spectrum variable of ``ds`` (Gaia, ``true_*``, ...), so that ``ingest`` of the
        catalogue restores what FITS headers cannot hold. None: no catalogue.
    overwrite : bool
        Replace existing files; otherwise an existing file raises ``FileExistsError``.

    Returns
    -------
    list of pathlib.Path
        The FITS files, in the order of ``ds.spectra``.

    Raises
    ------
    ValueError
        Unknown ``layout``, missing variables, duplicate file names, or an ``"oldest"``
        layout requested for a non log-linear ``loglam``.
    """
    import xarray as xr
    from astropy.io import fits

    if not isinstance(ds, xr.Dataset):
        raise TypeError(f"ds must be an xarray.Dataset, got {type(ds).__name__}")
    if not isinstance(directory, str | os.PathLike):
        raise TypeError(f"directory must be a str or os.PathLike, got {type(directory).__name__}")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if not isinstance(gzip, bool | np.bool_):
        raise TypeError(f"gzip must be a bool, got {type(gzip).__name__}")
    if set(ds.dims) - {"spectra", "pixels"} or "pixels" not in ds.dims:
        raise ValueError(f"ds: dims must be ('spectra', 'pixels'), got {tuple(ds.dims)}")
    for name in ("flux", "ivar", "andmask", "ormask", "obsid"):
        if name not in ds.variables:
            raise ValueError(f"ds: variable {name!r} is missing")
    if catalog is not None and not str(catalog).endswith((".parquet", ".csv")):
        raise ValueError(f"catalog must end with .parquet or .csv, got {catalog!r}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    n = ds.sizes["spectra"]
    npix = ds.sizes["pixels"]
    loglam = (
        np.asarray(ds["loglam"].values, dtype=np.float64)
        if "loglam" in ds.variables
        else loglam_grid(npix)
    )
    if layout == "oldest":
        step = np.diff(loglam)
        if not np.allclose(step, step[0], rtol=0, atol=1e-12):
            raise ValueError("layout='oldest' needs a log-linear loglam coordinate")
    wave = (10.0**loglam).astype(np.float32)

    def col(name, missing):
        if name in ds.variables:
            return np.asarray(ds[name].values)
        return np.full(n, missing, dtype=object)

    obsid = np.asarray(ds["obsid"].values, dtype=np.int64)
    mjd = col("mjd", -1)
    names = [_fits_name(f, int(o), int(m), gzip) for f, o, m in zip(col("file", ""), obsid, mjd)]
    if len(set(names)) != len(names):
        raise ValueError("ds: file names are not unique (set a unique 'file' per spectrum)")
    flux = ds["flux"].values
    ivar = ds["ivar"].values
    andm = ds["andmask"].values
    orm = ds["ormask"].values
    meta = {k: col(k, m) for k, (_, m) in META_VARIABLES.items() if k != "file"}
    paths = []
    steps = range(n)
    if progress:
        from tqdm.auto import tqdm

        steps = tqdm(steps, desc=f"write FITS ({layout})", unit="file", leave=False)
    for i in steps:
        lo, hi = _covered(flux[i], ivar[i], andm[i], orm[i])
        hdr = fits.Header()
        hdr["FILENAME"] = names[i].removesuffix(".gz")
        hdr["AUTHOR"] = "mspec.io.write_lamost_fits"
        if layout != "oldest":
            hdr["OBSID"] = (int(obsid[i]), "Unique number ID of this spectrum")
            release = str(meta["release"][i] or "LAMOST DR7")
            hdr["DATA_V"] = (release, "Data release version")
        lmjd = int(mjd[i])
        hdr["LMJD"] = (lmjd, "Local Modified Julian Day")
        hdr["MJD"] = (lmjd, "Modified Julian Day")
        hdr["PLANID"] = (f"MSPEC{obsid[i]}", "Plan ID in use")
        hdr["SPID"] = (1 + int(abs(obsid[i]) // 1000) % 16, "Spectrograph ID")
        hdr["FIBERID"] = (int(abs(obsid[i]) % 1000), "Fiber ID of Object")
        for key, card in (("ra", "RA"), ("dec", "DEC")):
            v = _float(meta[key][i])
            if not np.isnan(v):
                hdr[card] = v
        hdr["VACUUM"] = (True, "Wavelengths are in vacuum")
        hdr["COEFF0"] = (float(loglam[lo]), "Central wavelength (log10) of first pixel")
        hdr["COEFF1"] = (
            float(loglam[min(lo + 1, npix - 1)] - loglam[lo]) or DLOGLAM,
            "Log10 dispersion per pixel",
        )
        hdr["VERSPIPE"] = {"oldest": "v2.6.4", "image": "v2.9.7", "table": "v2.9.8"}[layout]
        hdr["CLASS"] = str(meta["lamost_class"][i] or "")
        hdr["SUBCLASS"] = str(meta["lamost_subclass"][i] or "")
        for key, card in (("lamost_z", "Z"), ("lamost_z_err", "Z_ERR")):
            v = _float(meta[key][i])
            hdr[card] = _Z_MISSING if np.isnan(v) else v
        for b in "ugriz":
            v = _float(meta[f"snr_{b}"][i])
            card = f"SN_{b.upper()}" if layout == "oldest" else f"SNR{b.upper()}"
            if not np.isnan(v):
                hdr[card] = v
        s = slice(lo, hi)
        f32 = flux[i, s].astype(np.float32)
        i32 = ivar[i, s].astype(np.float32)
        a32 = _as_float32_mask(andm[i, s], "andmask")
        o32 = _as_float32_mask(orm[i, s], "ormask")
        if layout == "table":
            hdr["N_EXTEN"] = 2
            cols = [
                fits.Column(name=nm, format=f"{hi - lo}E", array=v[None, :])
                for nm, v in (
                    ("FLUX", f32),
                    ("IVAR", i32),
                    ("WAVELENGTH", wave[s]),
                    ("ANDMASK", a32),
                    ("ORMASK", o32),
                    ("NORMALIZATION", np.full(hi - lo, -9999.0, np.float32)),
                )
            ]
            hdul = fits.HDUList(
                [fits.PrimaryHDU(header=hdr), fits.BinTableHDU.from_columns(cols, name="COADD")]
            )
        else:
            if layout == "oldest":
                hdr["EXTEN0"] = "Flux Inverse Subcontinuum Andmask Ormask"
                good = f32[np.isfinite(f32) & (f32 > 0)]
                norm = float(np.median(good)) if good.size else 1.0
                row2 = (f32 / np.float32(norm)).astype(np.float32)
            else:
                hdr["EXTEN0"] = "Flux Inverse Wavelength Andmask Ormask"
                row2 = wave[s]
            image = np.stack([f32, i32, row2, a32, o32])
            prim = fits.PrimaryHDU(data=image, header=hdr)
            if layout == "image":
                prim.header["EXTNAME"] = "Flux"
            hdul = fits.HDUList([prim])
        path = directory / names[i]
        if path.exists() and not overwrite:
            raise FileExistsError(f"{path} exists (pass overwrite=True)")
        hdul.writeto(path, overwrite=overwrite, output_verify="silentfix")
        paths.append(path)
    if catalog is not None:
        _write_catalog(ds, directory / catalog, [p.name for p in paths])
    return paths


def _write_catalog(ds, path: Path, files: list[str]) -> None:
    import pandas as pd

    cols = {"file": files, "obsid": np.asarray(ds["obsid"].values, dtype=np.int64)}
    for name in ds.variables:
        var = VARIABLES.get(name)
        if var is None or var.dims != ("spectra",) or name in ("obsid", "file"):
            continue
        cols[name] = np.asarray(ds[name].values)
    df = pd.DataFrame(cols)
    if path.suffix == ".csv":
        df.to_csv(path, index=False)
    else:
        df.to_parquet(path, index=False)
