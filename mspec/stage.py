"""The stage contract shared by every pipeline stage.

Every public stage is a function ``(ds, *, <options>, merge=True) -> xarray.Dataset`` that

* checks its inputs against the registry (:func:`mspec.variables.validate`),
* stays lazy (builds a dask graph, computes nothing),
* returns its registry-named outputs merged into ``ds`` (a warning when one overwrites an
  existing variable) or, with ``merge=False``, the outputs alone,

and declares once, with :func:`stage`, its name, the paper module it belongs to, its inputs,
outputs and a version string (bumped whenever its results change, so the pipeline runner
refuses to resume a stage computed by another version). The merge follows sgkit's
``conditional_merge_datasets``.

Per-spectrum status variables use the CF ``flag_values``/``flag_meanings`` attributes
(:func:`flag_attrs`).
"""

from __future__ import annotations

import functools
import inspect
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import xarray as xr

from mspec.variables import validate

__all__ = [
    "StageSpec",
    "STAGES",
    "MergeWarning",
    "stage",
    "merge_outputs",
    "flag_attrs",
    "get_stage",
]


class MergeWarning(UserWarning):
    """A stage output replaced a variable that was already in the input Dataset."""


@dataclass(frozen=True)
class StageSpec:
    """Declaration of one stage.

    Parameters
    ----------
    name : str
        Stage name (``"preprocess"``, ``"template_match"``, ...), unique.
    module : str
        Paper module it belongs to: ``"ingest"``, ``"preprocess"``, ``"SCM"``, ``"DGCM"``,
        ``"RVMM"``, ``"SPMM"`` or ``"catalog"``.
    inputs : tuple of str
        Registry variables the stage always needs.
    outputs : tuple of str
        Registry variables it may write (the exact set can depend on options).
    version : str
        Bumped whenever the stage's results change.
    description : str
        One line.
    """

    name: str
    module: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    version: str
    description: str = ""
    func: Callable | None = field(default=None, compare=False, repr=False)


#: Every declared stage, by name (filled as stage modules are imported).
STAGES: dict[str, StageSpec] = {}

_MODULES = ("ingest", "preprocess", "SCM", "DGCM", "RVMM", "SPMM", "catalog")


def flag_attrs(meanings: Mapping[int, str], dtype=np.int8) -> dict:
    """CF ``flag_values`` / ``flag_meanings`` attributes of a status variable.

    Parameters
    ----------
    meanings : mapping of int to str
        Status code -> meaning; meanings are turned into single words (spaces, commas and
        other separators become ``_``) as CF requires.
    dtype : numpy dtype
        dtype of ``flag_values`` (the status variable's dtype).

    Returns
    -------
    dict
        ``{"flag_values": ndarray, "flag_meanings": "word word ..."}``.
    """
    codes = sorted(int(k) for k in meanings)
    words = []
    for c in codes:
        w = "".join(ch if ch.isalnum() else "_" for ch in str(meanings[c]).strip())
        while "__" in w:
            w = w.replace("__", "_")
        words.append(w.strip("_") or f"code_{c}")
    return {"flag_values": np.array(codes, dtype=dtype), "flag_meanings": " ".join(words)}


def merge_outputs(
    ds: xr.Dataset, out: xr.Dataset, *, merge: bool = True, stage_name: str = ""
) -> xr.Dataset:
    """Return ``out`` alone or merged into ``ds``, the stage contract's last step.

    Parameters
    ----------
    ds : xarray.Dataset
        The stage input.
    out : xarray.Dataset
        The stage outputs (data variables and any new coordinates).
    merge : bool
        True: ``ds`` with ``out``'s variables added, replacing (with a :class:`MergeWarning`)
        variables of the same name. False: ``out``.
    stage_name : str
        Named in the warning.

    Returns
    -------
    xarray.Dataset
    """
    if not isinstance(merge, bool):
        raise TypeError(f"merge must be True or False, got {merge!r}")
    if not merge:
        return out
    replaced = [v for v in out.data_vars if v in ds.variables]
    # coordinates a stage makes itself (e.g. wavelength_grid) replace the input's silently:
    # they describe the new variables, not earlier results
    own_coords = [c for c in out.coords if c in ds.coords and c not in ds.dims]
    if replaced:
        warnings.warn(
            f"{stage_name or 'stage'}: replacing existing variables {sorted(replaced)}",
            MergeWarning,
            stacklevel=3,
        )
    base = ds.drop_vars([v for v in (*replaced, *own_coords) if v not in ds.dims])
    merged = base.assign(out.data_vars)
    extra = {c: out[c] for c in out.coords if c not in merged.coords}
    if extra:
        merged = merged.assign_coords(extra)
    merged.attrs = {**ds.attrs, **out.attrs}
    return merged


def stage(
    name: str,
    *,
    module: str,
    inputs: Sequence[str],
    outputs: Sequence[str],
    version: str,
    description: str = "",
):
    """Declare a stage function and give it the contract's checks and merge.

    The decorated function must take ``ds`` first and its options as keywords, and return
    the outputs only; the wrapper adds the ``merge`` keyword (default True), checks that
    ``ds`` is a Dataset holding ``inputs`` with registered dims/dtypes, and merges.

    Parameters
    ----------
    name, module, inputs, outputs, version, description
        See :class:`StageSpec`.

    Returns
    -------
    callable
        Decorator.
    """
    if module not in _MODULES:
        raise ValueError(f"module must be one of {_MODULES}, got {module!r}")

    def deco(fn):
        sig = inspect.signature(fn)
        if "merge" in sig.parameters:
            raise TypeError(f"stage {name!r}: the wrapped function must not take 'merge'")

        @functools.wraps(fn)
        def wrapper(ds, *args, merge: bool = True, **kwargs):
            if not isinstance(ds, xr.Dataset):
                raise TypeError(f"ds must be an xarray.Dataset, got {type(ds).__name__}")
            if not isinstance(merge, bool):
                raise TypeError(f"merge must be True or False, got {merge!r}")
            if spec.inputs:
                validate(ds, list(spec.inputs))
            out = fn(ds, *args, **kwargs)
            return merge_outputs(ds, out, merge=merge, stage_name=name)

        params = [*sig.parameters.values()]
        merge_param = inspect.Parameter("merge", inspect.Parameter.KEYWORD_ONLY, default=True)
        kw_end = [p for p in params if p.kind is inspect.Parameter.VAR_KEYWORD]
        rest = [p for p in params if p.kind is not inspect.Parameter.VAR_KEYWORD]
        wrapper.__signature__ = sig.replace(parameters=[*rest, merge_param, *kw_end])
        spec = StageSpec(
            name=name,
            module=module,
            inputs=tuple(inputs),
            outputs=tuple(outputs),
            version=str(version),
            description=description,
            func=wrapper,
        )
        old = STAGES.get(name)
        if old is not None and (old.module, old.version) != (spec.module, spec.version):
            raise ValueError(f"stage {name!r} is declared twice")
        STAGES[name] = spec
        wrapper.stage = spec
        return wrapper

    return deco


def get_stage(name: str) -> StageSpec:
    """Return the declaration of stage ``name``.

    Stages register themselves when their module is imported (``import mspec`` imports them
    all; ``mspec.ml`` on first use).

    Raises
    ------
    KeyError
        Unknown stage name (the message lists the known ones).
    """
    try:
        return STAGES[name]
    except KeyError:
        raise KeyError(f"unknown stage {name!r}; known: {sorted(STAGES)}") from None
