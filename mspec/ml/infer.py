"""Batched, lazy CNN inference over spectrum chunks.

:func:`predict` maps the networks over the ``spectra`` chunks of ``flux_grid`` with
:func:`xarray.apply_ufunc` (``dask="parallelized"``, i.e. one ``map_blocks`` task per chunk), so
it stays lazy and runs unchanged on a laptop or a dask cluster. The weights travel inside the
task graph (a few tens of kB), so workers need no shared filesystem; each worker process builds
the networks once and caches them, keyed by model path + sha256 of metadata and weights, and
runs them in batches on ``cuda`` when available, else on the CPU. When the connected dask
cluster has workers that declare a ``GPU`` resource, the tasks are annotated to run there.
"""

from __future__ import annotations

import numbers
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import xarray as xr

from mspec.ml.base import CLASSES, TLMA_LABELS, network_input
from mspec.ml.calibrate import CalibrationWarning, apply_calibration, noise_proxy
from mspec.ml.io import (
    ModelFileError,
    model_from_bytes,
    read_member_bytes,
    read_metadata,
    sha256_bytes,
)
from mspec.stage import stage
from mspec.variables import annotate

if TYPE_CHECKING:  # annotations only: torch is imported where networks run
    import torch

__all__ = ["ModelRef", "load_ref", "predict", "predict_array", "clear_cache"]

_CACHE: dict[tuple[str, str], list[torch.nn.Module]] = {}
_LOCK = threading.Lock()
_CACHE_MAX = 32

#: Every variable some model kind writes (``<k>_classes`` coordinates come with them).
_OUTPUTS = (
    *(f"{k}_{v}" for k in CLASSES for v in ("prob", "class")),
    *TLMA_LABELS,
    *(f"{k}_err" for k in TLMA_LABELS),
    *(f"{k}_err_ens" for k in TLMA_LABELS),
)


@dataclass(frozen=True, eq=False)
class ModelRef:
    """A model directory read into memory: metadata + weights bytes, identified by a hash.

    Small enough to ship inside a dask graph; equality and dask tokens use ``key`` only.
    """

    path: str
    meta: dict = field(repr=False)
    blobs: tuple[bytes, ...] = field(repr=False)
    key: str = ""

    def __eq__(self, other):
        return isinstance(other, ModelRef) and other.key == self.key

    def __hash__(self):
        return hash(self.key)

    def __dask_tokenize__(self):
        return ("mspec.ml.ModelRef", self.key)

    @property
    def kind(self) -> str:
        return self.meta["kind"]

    def models(self, device: str) -> list[torch.nn.Module]:
        """The member networks on ``device``, built once per process (cached)."""
        ck = (self.key, device)
        with _LOCK:
            models = _CACHE.get(ck)
            if models is None:
                models = [
                    model_from_bytes(
                        self.meta, b, name=str(Path(self.path) / m["file"]), device=device
                    )
                    for m, b in zip(self.meta["members"], self.blobs)
                ]
                if len(_CACHE) >= _CACHE_MAX:  # drop the oldest model set
                    _CACHE.pop(next(iter(_CACHE)))
                _CACHE[ck] = models
        return models


def clear_cache() -> None:
    """Drop every cached network of this process."""
    with _LOCK:
        _CACHE.clear()


def load_ref(model_dir) -> ModelRef:
    """Read a (non-pair) model directory into a :class:`ModelRef`, checking every hash."""
    meta = read_metadata(model_dir)
    if meta["kind"] == "tlma_pair":
        raise ModelFileError(f"{model_dir} is a CNN-TLMA pair, not a single model")
    blobs = tuple(read_member_bytes(model_dir, meta))
    path = str(Path(model_dir).resolve())
    key = sha256_bytes(
        (path + "\0" + str(sorted(meta.items()))).encode() + b"".join(blobs)
    )  # path + hash of metadata and every weights file
    return ModelRef(path, meta, blobs, key)


def _device(device) -> str:
    if device is None or device == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return str(device)


def _members_forward(ref: ModelRef, x: np.ndarray, batch_size: int, device) -> np.ndarray:
    """Raw outputs of every member: (members, n, n_out) float32; all-NaN rows give NaN."""
    import torch  # here, on the worker: graph building (the driver) never imports it

    dev = _device(device)
    models = ref.models(dev)
    x = np.asarray(x, dtype=np.float32)
    n = x.shape[0]
    n_out = models[0].n_out
    out = np.full((len(models), n, n_out), np.nan, dtype=np.float32)
    valid = ~np.all(np.isnan(x), axis=1) if n else np.zeros(0, bool)
    idx = np.flatnonzero(valid)
    if idx.size == 0:
        return out
    with torch.inference_mode():
        for s in range(0, idx.size, batch_size):
            rows = idx[s : s + batch_size]
            # NaN pixels (no data) -> 0, the mean of a z-scored spectrum
            xb = torch.from_numpy(np.nan_to_num(x[rows], nan=0.0, posinf=0.0, neginf=0.0))
            xb = xb.to(dev)
            for j, m in enumerate(models):
                out[j, rows] = m(xb).float().cpu().numpy()
    return out


def _classify_block(x, *, ref, batch_size, device):
    raw = _members_forward(ref, x, batch_size, device)
    with np.errstate(invalid="ignore"):
        z = raw - np.max(np.where(np.isnan(raw), -np.inf, raw), axis=-1, keepdims=True)
        p = np.exp(z)
        p /= p.sum(axis=-1, keepdims=True)
    return p.mean(axis=0).astype(np.float32)


def _regress_members(ref: ModelRef, x, batch_size, device) -> np.ndarray:
    """Per-member labels in physical units: (members, n, 4) float64.

    Labels the model was not trained on (``labels_trained`` in its metadata) are NaN.
    """
    raw = _members_forward(ref, x, batch_size, device).astype(np.float64)
    mean = np.asarray(ref.meta["label_mean"], dtype=np.float64)
    std = np.asarray(ref.meta["label_std"], dtype=np.float64)
    out = raw * std + mean
    trained = ref.meta.get("labels_trained")
    if trained is not None:
        for i, k in enumerate(TLMA_LABELS):
            if k not in trained:
                out[..., i] = np.nan
    return out


def _ensemble_stats(vals: np.ndarray) -> np.ndarray:
    """Ensemble value and error: mean and std (ddof=1; 0 for one member) over members."""
    mean = vals.mean(axis=0)
    std = vals.std(axis=0, ddof=1) if vals.shape[0] > 1 else np.zeros_like(mean)
    return np.concatenate([mean, std], axis=-1)


def _regress_stats(ref: ModelRef, x, batch_size, device) -> np.ndarray:
    """(n, 12): ensemble means, calibrated errors, ensemble stds (TLMA_LABELS order each)."""
    k = len(TLMA_LABELS)
    st = _ensemble_stats(_regress_members(ref, x, batch_size, device))
    err = apply_calibration(ref.meta.get("calibration"), st[:, k:], noise_proxy(x), TLMA_LABELS)
    return np.concatenate([st[:, :k], err, st[:, k:]], axis=1)


def _regress_block(x, lum=None, *, refs, batch_size, device):
    n = x.shape[0]
    out = np.full((n, 3 * len(TLMA_LABELS)), np.nan, dtype=np.float64)
    if lum is None:
        (ref,) = refs.values()
        return _regress_stats(ref, x, batch_size, device)
    lum = np.asarray(lum).astype(str)
    for part, ref in refs.items():
        rows = np.flatnonzero(lum == part)
        if rows.size:
            out[rows] = _regress_stats(ref, x[rows], batch_size, device)
    return out


def _warn_uncalibrated(refs: dict) -> None:
    for ref in refs.values():
        if ref.meta.get("calibration") is None:
            warnings.warn(
                f"CNN-TLMA model {ref.path} has no error calibration (trained by an older "
                "mspec or with calibration='none'): its *_err equal the ensemble std "
                "*_err_ens, which underestimates the true error; retrain it to calibrate",
                CalibrationWarning,
                stacklevel=4,
            )


def _class_names(p, *, classes):
    names = np.asarray(classes, dtype=f"<U{_width(classes)}")
    ok = np.isfinite(p).all(axis=-1)
    idx = np.argmax(np.where(np.isfinite(p), p, -np.inf), axis=-1)
    return np.where(ok, names[idx], "").astype(names.dtype)


def _width(classes) -> int:
    return max(len(c) for c in classes)


def _gpu_annotations(gpu) -> dict:
    """``resources={"GPU": 1}`` when asked, or when ``gpu="auto"`` and the cluster has GPU workers."""
    if gpu is False or gpu is None:
        return {}
    if gpu is True:
        return {"resources": {"GPU": 1}}
    if gpu != "auto":
        raise ValueError(f"gpu must be 'auto', True or False, got {gpu!r}")
    try:
        from distributed import default_client

        client = default_client()
    except (ImportError, ValueError):
        return {}
    try:
        workers = client.scheduler_info(n_workers=-1)["workers"].values()
    except TypeError:  # older distributed without n_workers
        workers = client.scheduler_info()["workers"].values()
    if any((w.get("resources") or {}).get("GPU", 0) >= 1 for w in workers):
        return {"resources": {"GPU": 1}}
    return {}


def _flux_input(ds: xr.Dataset, n_in: int, meta: dict) -> xr.DataArray:
    fg = network_input(ds)
    if fg.sizes["grid"] != n_in:
        raise ValueError(
            f"flux_grid has {fg.sizes['grid']} grid pixels but the model expects {n_in}"
        )
    grid = meta.get("grid")
    if (
        grid
        and "wavelength_grid" in fg.coords
        and isinstance(fg["wavelength_grid"].data, np.ndarray)
    ):
        wg = np.asarray(fg["wavelength_grid"].values, dtype=np.float64)
        if (
            abs(wg[0] - grid["start"]) > 1e-6
            or abs((wg[-1] - wg[0]) / max(n_in - 1, 1) - grid["step"]) > 1e-9
        ):
            raise ValueError(
                f"flux_grid wavelength_grid {wg[0]}..{wg[-1]} A does not match the model grid "
                f"{grid['start']}..{grid['start'] + grid['step'] * (n_in - 1)} A"
            )
    if fg.chunks is not None and len(fg.chunks[1]) > 1:
        raise ValueError(
            "flux_grid is chunked along 'grid'; rechunk with ds.chunk(grid=-1) before predict"
        )
    return fg


def _check_batch_size(batch_size) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral):
        raise TypeError(f"batch_size must be a positive integer, got {batch_size!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return int(batch_size)


def _check_device(device, gpu) -> None:
    """Fail now, naming ``device``, if it is not a torch device of this process."""
    if device is None or device == "auto":
        return
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as e:
        raise ValueError(f"device={device!r} is not a torch device: {e}") from None
    if dev.type == "cpu":
        return
    if dev.type == "cuda":
        if gpu is True:  # the tasks run on the cluster's GPU workers, not here
            return
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0 or (dev.index is not None and dev.index >= n):
            have = f"{n} CUDA device(s)" if n else "no CUDA device"
            raise ValueError(f"device={device!r}: this process has {have}")
        return
    if dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise ValueError(f"device={device!r}: MPS is not available")
        return
    raise ValueError(f"device={device!r}: only 'cpu', 'cuda[:i]' and 'mps' are supported")


@stage(
    "cnn_predict",
    module="SCM",
    inputs=["flux_grid"],
    outputs=_OUTPUTS,
    version="2",
    description="CNN inference: CNN-SPT, CNN-WDM, CNN-dMgM classes or CNN-TLMA labels",
)
def predict(
    ds: xr.Dataset,
    model_dir,
    *,
    lumclass=None,
    batch_size: int = 1024,
    device=None,
    gpu="auto",
) -> xr.Dataset:
    """Apply a trained CNN (or CNN-TLMA ensemble) to every spectrum, lazily.

    One stage (:mod:`mspec.stage`), ``"cnn_predict"``, for every model kind: the kind, and so
    the outputs, come from ``model_dir``; the declaration lists every output any kind
    writes. It is filed under the SCM module although CNN-TLMA belongs to SPMM (one stage
    name per function). The inputs are checked against the registry, the result is lazy,
    and the outputs are merged into ``ds`` (``merge=True``, a
    :class:`~mspec.stage.MergeWarning` when they replace variables) or returned alone
    (``merge=False``).

    Parameters
    ----------
    ds : xarray.Dataset
        Holds ``flux_grid`` (spectra, grid): the preprocessed spectra (recipe ``"cnn"`` for the
        classifiers, ``"tlma"`` for CNN-TLMA), numpy- or dask-backed; ``grid`` must be a
        single chunk. All-NaN spectra (no usable data) get NaN outputs and class ``""``.
    model_dir : path-like
        Directory written by :func:`mspec.ml.train_classifier`,
        :func:`mspec.ml.train_regressor` or a CNN-TLMA pair (``dM/`` + ``gM/``).
    lumclass : str or array-like, optional
        For a CNN-TLMA pair only: per-spectrum luminosity class (``"dM"``/``"gM"``; anything
        else gets NaN), as a variable name in ``ds`` or an array along ``spectra``.
    batch_size : int
        Spectra per forward pass (a positive integer).
    device : str or torch.device, optional
        torch device; default ``cuda`` when available on the worker, else ``cpu``. An
        explicit device must exist in the calling process (checked at call time), except a
        CUDA device with ``gpu=True``, whose tasks run on the cluster's GPU workers.
    gpu : {"auto", True, False}
        Annotate the tasks with ``resources={"GPU": 1}``: ``"auto"`` does so when the default
        dask client's cluster has workers declaring a ``GPU`` resource.
    merge : bool
        True (default): ``ds`` with the outputs added; False: the outputs alone.

    Returns
    -------
    xarray.Dataset
        For classifier kind ``k`` in {spt, wdm, dmgm}: ``k_prob`` (spectra,
        k_classes; softmax probabilities, mean over members) and ``k_class`` (most probable
        class); for CNN-TLMA: ``teff, logg, m_h, alpha_m`` (ensemble mean, K / dex),
        ``teff_err, logg_err, m_h_err, alpha_m_err`` (calibrated errors, same units:
        :mod:`mspec.ml.calibrate`) and ``teff_err_ens, ...`` (the paper's error, the ensemble
        std with ddof=1). A model without a calibration (older model directories) gives
        ``_err == _err_ens`` with a :class:`~mspec.ml.calibrate.CalibrationWarning`.

    Raises
    ------
    ModelFileError
        If ``model_dir`` or a weights file is missing, corrupt or inconsistent.
    mspec.variables.VariableError
        If ``ds`` lacks ``flux_grid`` or it has the wrong dims/dtype.
    ValueError
        If ``flux_grid`` does not suit the model or an argument is invalid (named).
    TypeError
        If ``batch_size`` is not an integer.
    """
    batch_size = _check_batch_size(batch_size)
    _check_device(device, gpu)
    ann = _gpu_annotations(gpu)
    meta = read_metadata(model_dir)
    kind = meta["kind"]
    import dask

    if kind in CLASSES:
        ref = load_ref(model_dir)
        fg = _flux_input(ds, ref.meta["arch"]["n_in"], ref.meta)
        classes = list(CLASSES[kind])
        cdim = f"{kind}_classes"
        with dask.annotate(**ann):
            prob = xr.apply_ufunc(
                _classify_block,
                fg,
                input_core_dims=[["grid"]],
                output_core_dims=[[cdim]],
                dask="parallelized",
                output_dtypes=[np.float32],
                dask_gufunc_kwargs={"output_sizes": {cdim: len(classes)}},
                kwargs={"ref": ref, "batch_size": batch_size, "device": device},
            )
        prob = prob.assign_coords({cdim: np.asarray(classes)})
        cls = xr.apply_ufunc(
            _class_names,
            prob,
            input_core_dims=[[cdim]],
            dask="parallelized",
            output_dtypes=[np.dtype(f"<U{_width(classes)}")],
            kwargs={"classes": classes},
        )
        out = xr.Dataset({f"{kind}_prob": prob, f"{kind}_class": cls})
        return annotate(out, [f"{kind}_prob", f"{kind}_class", cdim])

    if kind == "tlma_pair":
        if lumclass is None:
            raise ValueError(
                "lumclass is required for a CNN-TLMA pair (dM and gM ensembles): give a "
                "variable name in ds or an array of 'dM'/'gM' along spectra"
            )
        refs = {part: load_ref(Path(model_dir) / sub) for part, sub in meta["parts"].items()}
        if isinstance(lumclass, str):
            if lumclass not in ds:
                raise ValueError(f"lumclass {lumclass!r} is not a variable of ds")
            lum = ds[lumclass]
        else:
            lum = (
                lumclass
                if isinstance(lumclass, xr.DataArray)
                else xr.DataArray(np.asarray(lumclass), dims="spectra")
            )
        if lum.dims != ("spectra",) or lum.sizes["spectra"] != ds.sizes.get("spectra"):
            raise ValueError("lumclass must be one value per spectrum, along 'spectra'")
        if isinstance(lum.data, np.ndarray) and lum.dtype.kind == "O":
            lum = lum.astype(str)
        first = next(iter(refs.values()))
        fg = _flux_input(ds, first.meta["arch"]["n_in"], first.meta)
        if fg.chunks is not None and lum.chunks is None:
            lum = lum.chunk({"spectra": fg.chunks[0]})
        elif fg.chunks is None and lum.chunks is not None:
            fg = fg.chunk({"spectra": lum.chunks[0]})
        args, cores = [fg, lum], [["grid"], []]
    elif kind == "tlma":
        refs = {None: load_ref(model_dir)}
        fg = _flux_input(ds, refs[None].meta["arch"]["n_in"], refs[None].meta)
        args, cores = [fg], [["grid"]]
    else:  # pragma: no cover - read_metadata rejects unknown kinds
        raise ModelFileError(f"unknown model kind {kind!r}")

    _warn_uncalibrated(refs)
    with dask.annotate(**ann):
        res = xr.apply_ufunc(
            _regress_block,
            *args,
            input_core_dims=cores,
            output_core_dims=[["tlma_out"]],
            dask="parallelized",
            output_dtypes=[np.float64],
            dask_gufunc_kwargs={"output_sizes": {"tlma_out": 3 * len(TLMA_LABELS)}},
            kwargs={"refs": refs, "batch_size": batch_size, "device": device},
        )
    new = {}
    k = len(TLMA_LABELS)
    for i, name in enumerate(TLMA_LABELS):
        new[name] = res.isel(tlma_out=i, drop=True)
        new[f"{name}_err"] = res.isel(tlma_out=k + i, drop=True)
        new[f"{name}_err_ens"] = res.isel(tlma_out=2 * k + i, drop=True)
    return annotate(xr.Dataset(new), list(new))


def predict_array(
    x,
    model_dir,
    *,
    batch_size: int = 1024,
    device=None,
    members: bool = False,
    errors: str = "calibrated",
):
    """Direct (eager) inference on a numpy array of preprocessed spectra.

    Parameters
    ----------
    x : array-like, shape (n, n_in) or (n_in,)
        ``flux_grid`` values.
    model_dir : path-like
        A single model directory (classifier or one CNN-TLMA ensemble).
    batch_size : int
        Spectra per forward pass.
    device : str, optional
        torch device (default: cuda when available, else cpu).
    members : bool
        Return the per-member outputs (members, n, n_out): classifier probabilities or
        regressor labels in physical units, instead of the ensemble summary.
    errors : {"calibrated", "ensemble"}
        Regressor errors: the calibrated errors (:mod:`mspec.ml.calibrate`; the ensemble std
        for a model without calibration) or the raw ensemble std (ddof=1).

    Returns
    -------
    numpy.ndarray
        Classifier: probabilities (n, n_classes). Regressor: (n, 8) = 4 means then 4 errors
        (order :data:`mspec.ml.models.TLMA_LABELS`; K and dex).
    """
    if errors not in ("calibrated", "ensemble"):
        raise ValueError(f"errors must be 'calibrated' or 'ensemble', got {errors!r}")
    ref = load_ref(model_dir)
    x = np.atleast_2d(np.asarray(x, dtype=np.float32))
    if x.shape[1] != ref.meta["arch"]["n_in"]:
        raise ValueError(f"x has {x.shape[1]} pixels, the model expects {ref.meta['arch']['n_in']}")
    if ref.kind in CLASSES:
        if members:
            raw = _members_forward(ref, x, int(batch_size), device).astype(np.float64)
            e = np.exp(raw - raw.max(axis=-1, keepdims=True))
            return (e / e.sum(axis=-1, keepdims=True)).astype(np.float32)
        return _classify_block(x, ref=ref, batch_size=int(batch_size), device=device)
    if members:
        return _regress_members(ref, x, int(batch_size), device)
    st = _regress_stats(ref, x, int(batch_size), device)
    k = len(TLMA_LABELS)
    return (
        st[:, : 2 * k] if errors == "calibrated" else np.concatenate([st[:, :k], st[:, 2 * k :]], 1)
    )
