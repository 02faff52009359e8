"""One numba jit helper for every mspec kernel: defaults and the on-disk cache, read once.

Compiled kernels are cached on disk by default, so no first call (and no new dask worker
process) spends a minute compiling. The cache lives in the user cache directory
(``$XDG_CACHE_HOME/mspec/numba``, default ``~/.cache/mspec/numba``), never beside the
installed sources. Environment:

* ``MSPEC_NUMBA_CACHE=0`` turns the cache off (``1``, the default, keeps it on);
* ``MSPEC_NUMBA_CACHE_DIR=/path`` puts it elsewhere.

The setting is read once, when this module is first imported (worker processes import it
afresh, so set the variables before starting a cluster).
"""

from __future__ import annotations

import os
from pathlib import Path

from numba import njit
from numba.core import caching

__all__ = ["CACHE", "CACHE_DIR", "jit", "cache_dir"]


def cache_dir() -> Path:
    """Directory of mspec's compiled-kernel cache (``MSPEC_NUMBA_CACHE_DIR`` wins)."""
    env = os.environ.get("MSPEC_NUMBA_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "mspec" / "numba"


def _cache_enabled() -> bool:
    value = os.environ.get("MSPEC_NUMBA_CACHE", "1").strip().lower()
    return value not in ("0", "false", "no", "off", "")


#: Whether mspec kernels are cached on disk (read once at import).
CACHE: bool = _cache_enabled()
#: Where they are cached.
CACHE_DIR: Path = cache_dir()
_PKG_ROOT = str(Path(__file__).resolve().parent)


class _MspecCacheLocator(caching.UserProvidedCacheLocator):
    """Numba cache locator for mspec's own kernels only: the user cache directory."""

    def __init__(self, py_func, py_file):
        self._py_file = py_file
        self._lineno = py_func.__code__.co_firstlineno
        self._cache_path = os.path.join(str(CACHE_DIR), self.get_suitable_cache_subpath(py_file))

    @classmethod
    def from_function(cls, py_func, py_file):
        if not str(Path(py_file).resolve()).startswith(_PKG_ROOT):
            return None
        self = cls(py_func, py_file)
        try:
            self.ensure_cache_path()
        except OSError:
            return None  # unwritable: numba falls back to its own locators
        return self


if CACHE and _MspecCacheLocator not in caching.CacheImpl._locator_classes:
    caching.CacheImpl._locator_classes.insert(0, _MspecCacheLocator)


def jit(fn=None, **options):
    """``numba.njit`` with mspec's defaults: ``nogil=True``, no fastmath, cache as configured.

    Parameters
    ----------
    fn : callable, optional
        Function to compile (``@jit`` or ``jit(fn)``); omitted for ``@jit(**options)``.
    **options
        Extra :func:`numba.njit` options (``parallel``, ``boundscheck``, ...).

    Returns
    -------
    numba dispatcher or decorator
    """
    options.setdefault("nogil", True)
    options.setdefault("cache", CACHE)
    if fn is None:
        return njit(**options)
    return njit(**options)(fn)
