"""Training of the CNN classifiers and the k-fold CNN-TLMA ensembles.

Spectra come from the (lazy, dask/Zarr-backed) ``flux_grid`` of a preprocessed Dataset and are
read one ``spectra`` chunk at a time, never the whole store at once: when the labelled spectra
fit in ``max_memory`` they are gathered chunk by chunk into one array (one read of the store);
otherwise every epoch streams the chunks in a random order through a shuffle buffer of a few
chunks. Recipe (Li et al. 2025): stratified 3:1 train:validation split (classifiers) or k-fold
cross-validation (CNN-TLMA, k = 10), Adam (lr 1e-3), batches of 128, learning rate reduced on
plateau of the validation loss, early stopping on the validation loss (the best epoch's
weights are kept). Everything is seeded; ``torch.use_deterministic_algorithms`` is on while
training, so the same seed, data and thread count give bit-identical weights.

Fine-tuning (``finetune=``, transfer learning of a trained model on a small real labelled set)
uses its own defaults, :data:`FINETUNE_DEFAULTS`: batches of 8 (a few optimizer steps per
epoch on tens of spectra, where 128 would be one) and Adam at 3e-3 for CNN-TLMA (the rate
inner validation chose most often when fine-tuning the dM ensemble on the real DR7 M dwarfs,
docs/accuracy.md) or 1e-4 for the classifiers; explicit ``batch_size``/``lr`` win. Early
stopping counts the base model itself as a candidate (epoch 0, its validation loss before
any update): a member whose fine-tuning never lowers its validation loss keeps the base
weights, and ``model.json`` records it (``kept_base``).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import logging
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
import xarray as xr

from mspec.ml.calibrate import fit_calibration, noise_proxy
from mspec.ml.io import write_model, write_pair
from mspec.ml.models import CLASSES, TLMA_LABELS, build_model, count_parameters
from mspec.ml.models import network_input as _flux_grid

__all__ = [
    "PAPER_CLASS_WEIGHTS",
    "train_classifier",
    "train_regressor",
    "train_tlma_pair",
    "recalibrate_zero_point",
    "train_from_store",
    "train_all_demo",
    "augment_batch",
    "DEFAULT_AUGMENT",
    "TRAIN_DEFAULTS",
    "FINETUNE_DEFAULTS",
]

log = logging.getLogger("mspec.ml")

#: Class weights quoted by the paper (every other class 1).
PAPER_CLASS_WEIGHTS = {"spt": {"OB": 3.62}, "wdm": {"WD": 4.23}, "dmgm": {}}
#: Adam mini-batch size and learning rate when training from scratch (the paper's recipe).
TRAIN_DEFAULTS = {"batch_size": 128, "lr": 1e-3}
#: ... and when fine-tuning (``finetune=``): small batches for small real sets; CNN-TLMA's rate
#: is the one inner validation chose in 13 of 18 folds of
#: :func:`mspec.ml.evaluate.finetune_cross_validation` (docs/accuracy.md; in 8 of 18, tied
#: with 1e-3, once the base model became an early-stopping candidate: docs/ml.md); the
#: classifiers' 1e-4 has not been validated on real classes.
FINETUNE_DEFAULTS = {"batch_size": 8, "lr": {"tlma": 3e-3, "classifier": 1e-4}}
#: Wavelength grid of ``flux_grid`` (preprocessing step 4a), recorded in the metadata.
GRID = {"start": 3900.0, "step": 1.0, "npix": 5000, "units": "Angstrom", "medium": "vacuum"}


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
def _mspec_version() -> str:
    from mspec._version import __version__

    return __version__


def _device(device) -> torch.device:
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


@contextlib.contextmanager
def _deterministic(seed: int, threads: int | None):
    """Seed torch and switch deterministic algorithms on (restored on exit)."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS
    prev_det = torch.are_deterministic_algorithms_enabled()
    prev_threads = torch.get_num_threads()
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    if threads is not None:
        torch.set_num_threads(int(threads))
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(prev_det)
        torch.set_num_threads(prev_threads)


def _as_1d(values, n: int, name: str) -> np.ndarray:
    if isinstance(values, xr.DataArray):
        values = values.values
    elif hasattr(values, "to_numpy"):
        values = values.to_numpy()
    arr = np.asarray(values)
    if arr.ndim != 1 or arr.shape[0] != n:
        raise ValueError(f"{name} must be one value per spectrum ({n}), got shape {arr.shape}")
    return arr


def _str_labels(labels, n: int) -> np.ndarray:
    arr = _as_1d(labels, n, "labels")
    out = np.array(
        [
            "" if (v is None or (isinstance(v, float) and np.isnan(v))) else str(v)
            for v in arr.tolist()
        ]
    )
    return out if out.size else np.zeros(0, dtype="<U1")


class _Data:
    """Chunk-wise access to selected rows of ``flux_grid`` (see module docstring).

    ``rows`` are dataset row indices. In memory mode they are gathered once; in streaming mode
    each call to :meth:`batches` reads the chunks that hold the wanted rows.
    """

    def __init__(self, fg: xr.DataArray, rows: np.ndarray, max_memory: float, buffer_chunks=4):
        self.fg = fg
        self.n_in = fg.sizes["grid"]
        n = fg.sizes["spectra"]
        chunks = fg.chunks[0] if fg.chunks is not None else (n,)
        self.bounds = np.concatenate([[0], np.cumsum(chunks)]).astype(np.int64)
        self.buffer_chunks = max(1, int(buffer_chunks))
        rows = np.unique(np.asarray(rows, dtype=np.int64))
        self.in_memory = rows.size * self.n_in * 4 <= max_memory
        self.valid = np.zeros(n, dtype=bool)  # labelled rows with some finite flux
        self.nu = np.full(n, np.nan)  # noise proxy of each read row (calibrated errors)
        self.pos = np.full(n, -1, dtype=np.int64)
        if self.in_memory:
            self.x = np.empty((rows.size, self.n_in), dtype=np.float32)
            self.pos[rows] = np.arange(rows.size)
        for b in range(len(chunks)):  # one pass over the store, one chunk at a time
            r = rows[(rows >= self.bounds[b]) & (rows < self.bounds[b + 1])]
            if r.size == 0:
                continue
            xb = self._read(b, r)
            self.valid[r] = ~np.all(np.isnan(xb), axis=1)
            self.nu[r] = noise_proxy(xb)
            if self.in_memory:
                self.x[self.pos[r]] = np.nan_to_num(xb, nan=0.0, posinf=0.0, neginf=0.0)

    def _read(self, b: int, r: np.ndarray) -> np.ndarray:
        a, e = self.bounds[b], self.bounds[b + 1]
        block = self.fg.isel(spectra=slice(int(a), int(e))).values
        return np.asarray(block[r - a], dtype=np.float32)

    def _clean(self, xb):
        return np.nan_to_num(xb, nan=0.0, posinf=0.0, neginf=0.0).astype(np.float32, copy=False)

    def batches(self, rows: np.ndarray, batch_size: int, rng=None):
        """Yield ``(x, rows)`` batches: shuffled when ``rng`` is given, else in row order."""
        rows = np.asarray(rows, dtype=np.int64)
        if self.in_memory:
            order = rng.permutation(rows) if rng is not None else rows
            for s in range(0, order.size, batch_size):
                r = order[s : s + batch_size]
                yield self.x[self.pos[r]], r
            return
        blocks = np.searchsorted(self.bounds, rows, side="right") - 1
        ub = np.unique(blocks)
        if rng is not None:
            ub = rng.permutation(ub)
        carry_x = np.zeros((0, self.n_in), np.float32)
        carry_r = np.zeros(0, np.int64)
        for g in range(0, ub.size, self.buffer_chunks):
            xs, rs = [carry_x], [carry_r]
            for b in ub[g : g + self.buffer_chunks]:
                r = np.sort(rows[blocks == b])
                xs.append(self._clean(self._read(int(b), r)))
                rs.append(r)
            gx, gr = np.concatenate(xs), np.concatenate(rs)
            if rng is not None:
                p = rng.permutation(gr.size)
                gx, gr = gx[p], gr[p]
            last = g + self.buffer_chunks >= ub.size
            stop = gr.size if last else (gr.size // batch_size) * batch_size
            for s in range(0, stop, batch_size):
                yield gx[s : min(s + batch_size, stop)], gr[s : min(s + batch_size, stop)]
            carry_x, carry_r = gx[stop:], gr[stop:]


#: Default augmentation (``augment=True``): see :func:`augment_batch`.
DEFAULT_AUGMENT = {"rv_sigma": 30.0, "tilt": 0.3, "mask_frac": 0.3, "mask_width": 150}
_AUG_KEYS = ("rv_sigma", "tilt", "mask_frac", "mask_width")


def _check_augment(augment) -> dict | None:
    if augment is None or augment is False:
        return None
    if augment is True:
        return dict(DEFAULT_AUGMENT)
    if not isinstance(augment, dict):
        raise ValueError(f"augment must be None, True or a dict, got {augment!r}")
    unknown = set(augment) - set(_AUG_KEYS)
    if unknown:
        raise ValueError(f"augment has unknown key(s) {sorted(unknown)}; known: {_AUG_KEYS}")
    out = {**{k: 0.0 for k in _AUG_KEYS}, **augment}
    if any(float(out[k]) < 0 for k in _AUG_KEYS) or float(out["mask_frac"]) > 1:
        raise ValueError(f"augment values must be >= 0 (mask_frac <= 1), got {augment}")
    return out


def augment_batch(x, rng, *, rv_sigma=0.0, tilt=0.0, mask_frac=0.0, mask_width=0) -> np.ndarray:
    """Randomly perturbed copies of z-scored spectra on the 1 A grid (training augmentation).

    Each spectrum gets, independently: a Doppler shift by a velocity drawn from
    N(0, ``rv_sigma``) km/s (linear interpolation, a shift of lambda*v/c pixels); a smooth
    flux-calibration error, a linear plus quadratic trend over the grid with coefficients drawn
    from N(0, ``tilt``) (in units of the spectrum's std, added before re-z-scoring); and, with
    probability ``mask_frac``, a stretch of ``mask_width`` pixels at a random place set to 0
    (what NaN / masked pixels become at the network input). Every spectrum is z-scored again
    afterwards.

    Parameters
    ----------
    x : numpy.ndarray, shape (n, npix)
        z-scored ``flux_grid`` rows (float32, no NaN).
    rng : numpy.random.Generator
    rv_sigma : float
        km/s.
    tilt : float
        Standard deviation of the trend coefficients (z-score units at the grid ends).
    mask_frac : float
        Fraction of spectra given a masked stretch.
    mask_width : int
        Pixels (1 A each) per masked stretch.

    Returns
    -------
    numpy.ndarray
        The perturbed batch (a new array; ``x`` is not modified).
    """
    from mspec.variables import C_KMS

    x = np.array(x, dtype=np.float32, copy=True)
    n, npix = x.shape
    if n == 0:
        return x
    pix = np.arange(npix, dtype=np.float64)
    if rv_sigma > 0:
        lam = GRID["start"] + GRID["step"] * pix
        v = rng.normal(0.0, float(rv_sigma), n)
        for i in range(n):  # observed at lam came from lam / (1 + v/c)
            src = (lam / (1.0 + v[i] / C_KMS) - GRID["start"]) / GRID["step"]
            x[i] = np.interp(src, pix, x[i])
    if tilt > 0:
        u = (pix - 0.5 * (npix - 1)) / (0.5 * (npix - 1))
        a = rng.normal(0.0, float(tilt), (n, 2))
        x += (a[:, :1] * u + a[:, 1:] * (u * u - 1.0 / 3.0)).astype(np.float32)
    if mask_frac > 0 and mask_width > 0:
        w = int(min(mask_width, npix))
        hit = np.flatnonzero(rng.random(n) < float(mask_frac))
        for i, s0 in zip(hit, rng.integers(0, npix - w + 1, hit.size)):
            x[i, s0 : s0 + w] = 0.0
    mu = x.mean(axis=1, keepdims=True)
    sd = x.std(axis=1, keepdims=True)
    return ((x - mu) / np.where(sd > 0, sd, 1.0)).astype(np.float32)


def _stratified_split(y: np.ndarray, rows: np.ndarray, frac: float, rng) -> tuple:
    """Split ``rows`` (labels ``y``) per class: ``frac`` of each class (>= 1 if it has >= 2)."""
    tr, va = [], []
    for c in np.unique(y):
        r = rng.permutation(rows[y == c])
        nv = int(round(frac * r.size)) if r.size >= 2 else 0
        nv = min(max(nv, 1 if r.size >= 2 else 0), r.size - 1)
        va.append(r[:nv])
        tr.append(r[nv:])
    return np.sort(np.concatenate(tr)), np.sort(np.concatenate(va))


def _dataset_hash(obsid: np.ndarray, rows: np.ndarray, labels: np.ndarray, extra=b"") -> str:
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(obsid[rows]).astype("<i8").tobytes())
    h.update(
        np.ascontiguousarray(labels[rows]).astype("<U16").tobytes()
        if labels.dtype.kind in "UO"
        else np.ascontiguousarray(labels[rows], "<f8").tobytes()
    )
    h.update(extra)
    return h.hexdigest()


def _obsids(ds, n: int) -> np.ndarray:
    if "obsid" in ds.coords or "obsid" in ds:
        return np.asarray(ds["obsid"].values).astype(np.int64)
    return np.arange(n, dtype=np.int64)


def _defaults(batch_size, lr, finetune, what: str) -> tuple[int, float]:
    """``batch_size`` and ``lr``, or their defaults (:data:`TRAIN_DEFAULTS` /
    :data:`FINETUNE_DEFAULTS`) when None."""
    if finetune is None:
        bs, rate = TRAIN_DEFAULTS["batch_size"], TRAIN_DEFAULTS["lr"]
    else:
        bs, rate = FINETUNE_DEFAULTS["batch_size"], FINETUNE_DEFAULTS["lr"][what]
    return (bs if batch_size is None else batch_size), (rate if lr is None else lr)


def _check_common(epochs, batch_size, lr, patience, max_memory):
    if int(epochs) < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not float(lr) > 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    if int(patience) < 1:
        raise ValueError(f"patience must be >= 1, got {patience}")
    if float(max_memory) < 0:
        raise ValueError(f"max_memory must be >= 0, got {max_memory}")


def _fit(
    model,
    data,
    train_rows,
    val_rows,
    target,
    loss_fn,
    *,
    epochs,
    lr,
    batch_size,
    patience,
    lr_patience,
    lr_factor,
    rng,
    device,
    label,
    progress,
    augment=None,
    start_candidate=False,
):
    """Train ``model`` with early stopping; returns (history, best_epoch) and keeps best weights.

    ``target(rows) -> tensor`` gives the targets of dataset rows; ``loss_fn(out, t)`` is a mean
    loss. Validation loss is the mean over every validation spectrum. With
    ``start_candidate`` (fine-tuning) the starting weights are a candidate too: their
    validation loss is ``history["val_loss_base"]``, and when no epoch lowers it the starting
    weights are kept and ``best_epoch`` is 0. Without it nothing is evaluated before the first
    epoch (from-scratch training is unchanged, bit for bit).
    """
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(
        opt, mode="min", factor=lr_factor, patience=lr_patience
    )
    history = {"train_loss": [], "val_loss": [], "lr": []}
    best, best_state, best_epoch, bad = math.inf, None, 0, 0
    if start_candidate:  # epoch 0: the base model as it is (no RNG is drawn)
        v0 = _evaluate_loss(model, data, val_rows, target, loss_fn, batch_size, device)
        history["val_loss_base"] = v0
        if math.isfinite(v0):
            best, best_state = v0, copy.deepcopy(model.state_dict())
        log.info("%s epoch 0 (base model): val loss %.4f", label, v0)
    for epoch in range(int(epochs)):
        t0 = time.perf_counter()
        model.train()
        tot, cnt = 0.0, 0
        for xb, rb in data.batches(train_rows, batch_size, rng):
            if augment:
                xb = augment_batch(xb, rng, **augment)
            x = torch.from_numpy(xb).to(device)
            t = target(rb).to(device)
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(x), t)
            loss.backward()
            opt.step()
            tot += float(loss.detach()) * len(rb)
            cnt += len(rb)
        vloss = _evaluate_loss(model, data, val_rows, target, loss_fn, batch_size, device)
        history["train_loss"].append(tot / max(cnt, 1))
        history["val_loss"].append(vloss)
        history["lr"].append(opt.param_groups[0]["lr"])
        sched.step(vloss)
        msg = (
            f"{label} epoch {epoch + 1}: train loss {tot / max(cnt, 1):.4f}, "
            f"val loss {vloss:.4f} ({time.perf_counter() - t0:.1f} s)"
        )
        log.info(msg)
        if hasattr(progress, "update"):  # a tqdm bar shared by several networks
            progress.set_postfix_str(label, refresh=False)
            progress.update(1)
        elif progress:
            print(msg, flush=True)
        if not math.isfinite(best) or vloss < best - 1e-7 * abs(best):
            best, best_epoch, bad = vloss, epoch + 1, 0
            best_state = copy.deepcopy(model.state_dict())
        else:
            bad += 1
            if bad >= patience:
                break
    if best_state is not None:
        model.load_state_dict(best_state)
    return history, best_epoch


def _evaluate_loss(model, data, rows, target, loss_fn, batch_size, device) -> float:
    model.eval()
    tot, cnt = 0.0, 0
    with torch.no_grad():
        for xb, rb in data.batches(rows, batch_size):
            out = model(torch.from_numpy(xb).to(device))
            tot += float(loss_fn(out, target(rb).to(device))) * len(rb)
            cnt += len(rb)
    return tot / cnt if cnt else math.nan


def _outputs(model, data, rows, batch_size, device) -> tuple[np.ndarray, np.ndarray]:
    """Raw model outputs for ``rows`` (returned in the order of the returned rows)."""
    model.eval()
    outs, rs = [], []
    with torch.no_grad():
        for xb, rb in data.batches(rows, batch_size):
            outs.append(model(torch.from_numpy(xb).to(device)).float().cpu().numpy())
            rs.append(rb)
    if not outs:
        return np.zeros((0, model.n_out), np.float32), np.zeros(0, np.int64)
    return np.concatenate(outs), np.concatenate(rs)


def _class_weights(kind, class_weight, counts: np.ndarray) -> np.ndarray:
    classes = CLASSES[kind]
    if class_weight is None:
        return np.ones(len(classes))
    if isinstance(class_weight, str):
        if class_weight == "paper":
            d = PAPER_CLASS_WEIGHTS[kind]
            return np.array([d.get(c, 1.0) for c in classes], dtype=np.float64)
        if class_weight == "balanced":  # n / (k * n_c) over the classes present
            present = counts > 0
            w = np.ones(len(classes))
            w[present] = counts[present].sum() / (present.sum() * counts[present])
            return w
        raise ValueError(
            f"class_weight must be 'balanced', 'paper', None or a dict, got {class_weight!r}"
        )
    if isinstance(class_weight, dict):
        unknown = set(class_weight) - set(classes)
        if unknown:
            raise ValueError(f"class_weight has unknown classes {sorted(unknown)} for {kind!r}")
        return np.array([float(class_weight.get(c, 1.0)) for c in classes])
    raise ValueError(
        f"class_weight must be 'balanced', 'paper', None or a dict, got {class_weight!r}"
    )


# --------------------------------------------------------------------------------------------
# plots (matplotlib Figure objects render with Agg; no pyplot global state)
# --------------------------------------------------------------------------------------------
def _plot_curves(histories: list[dict], path: Path, title: str) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    for i, h in enumerate(histories):
        ep = np.arange(1, len(h["train_loss"]) + 1)
        lab = f" ({len(histories)} members)" if len(histories) > 1 else ""
        ax.plot(ep, h["train_loss"], color="C0", alpha=0.7, label="train" + lab if i == 0 else None)
        ax.plot(
            ep, h["val_loss"], color="C1", alpha=0.7, label="validation" + lab if i == 0 else None
        )
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def _plot_confusion(cm: np.ndarray, classes, path: Path, title: str) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(1.0 + 0.6 * len(classes), 0.8 + 0.6 * len(classes)))
    ax = fig.subplots()
    norm = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    for i in range(len(classes)):
        for j in range(len(classes)):
            ax.text(
                j,
                i,
                str(cm[i, j]),
                ha="center",
                va="center",
                color="white" if norm[i, j] > 0.5 else "black",
                fontsize=8,
            )
    ax.set_xticks(range(len(classes)), classes, rotation=45)
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def _plot_oof(true: np.ndarray, pred: np.ndarray, path: Path, title: str) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 3.2))
    axes = fig.subplots(1, len(TLMA_LABELS))
    for k, (ax, name) in enumerate(zip(axes, TLMA_LABELS)):
        ok = np.isfinite(true[:, k]) & np.isfinite(pred[:, k])
        if not ok.any():
            ax.set_title(f"{name}: no labels")
            continue
        ax.scatter(true[ok, k], pred[ok, k], s=3, alpha=0.5)
        lo = min(true[ok, k].min(), pred[ok, k].min())
        hi = max(true[ok, k].max(), pred[ok, k].max())
        ax.plot([lo, hi], [lo, hi], "k-", lw=0.5)
        ax.set_xlabel(f"true {name}")
        ax.set_ylabel(f"predicted {name}")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


# --------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------
def train_classifier(
    ds: xr.Dataset,
    labels,
    kind: str,
    out_dir,
    *,
    epochs: int = 30,
    seed: int = 0,
    class_weight="balanced",
    val_fraction: float = 0.25,
    batch_size: int | None = None,
    lr: float | None = None,
    patience: int = 5,
    lr_patience: int = 2,
    lr_factor: float = 0.5,
    arch: dict | None = None,
    device=None,
    max_memory: float = 2 * 2**30,
    threads: int | None = None,
    progress: bool = False,
    plots: bool = True,
    finetune=None,
    provenance: dict | None = None,
    augment: dict | None = None,
) -> dict:
    """Train CNN-SPT, CNN-WDM or CNN-dMgM and write its model directory.

    Parameters
    ----------
    ds : xarray.Dataset
        Holds ``flux_grid`` (spectra, grid), preprocessed with the ``"cnn"`` recipe; may be lazy
        (dask/Zarr): it is read chunk by chunk, never all at once.
    labels : array-like of str
        Class name per spectrum (along ``spectra``). Spectra whose label is not one of the
        kind's classes (e.g. ``""``, ``"WD"`` for CNN-SPT) and all-NaN spectra are not used.
    kind : {"spt", "wdm", "dmgm"}
        Which classifier (classes in :data:`mspec.ml.models.CLASSES`).
    out_dir : path-like
        Model directory to write (``model.json``, ``member_00.safetensors``, ``curves.png``,
        ``confusion.png``).
    epochs : int
        Maximum number of epochs (early stopping usually ends sooner).
    seed : int
        Seed of the split, the weight initialisation and the batch order.
    class_weight : {"balanced", "paper"} or dict or None
        Loss weights: ``"balanced"`` = n / (k n_c) from the training counts; ``"paper"`` = the
        paper's (OB 3.62, WD 4.23, others 1); a dict class -> weight (others 1); None = 1.
    val_fraction : float
        Validation fraction of every class (paper: train:test = 3:1, i.e. 0.25).
    batch_size, lr : int, float, optional
        Adam mini-batch size and learning rate (paper: 128, 1e-3). Default 128 and 1e-3; when
        fine-tuning 8 and 1e-4 (:data:`FINETUNE_DEFAULTS`). The values used are recorded in
        ``model.json`` (``recipe_training``).
    patience : int
        Early stopping: epochs without a lower validation loss before stopping.
    lr_patience, lr_factor : int, float
        ReduceLROnPlateau settings.
    arch : dict, optional
        Architecture overrides (see :data:`mspec.ml.models.DEFAULT_ARCH`).
    device : str, optional
        torch device; default ``cuda`` if available else ``cpu``.
    max_memory : float
        Bytes of spectra to hold in memory; above this the chunks are streamed every epoch.
    threads : int, optional
        torch CPU threads while training (reproducibility across machines needs a fixed value).
    progress : bool
        Print one line per epoch.
    plots : bool
        Write ``curves.png`` and ``confusion.png``.
    finetune : path-like, optional
        A trained classifier directory of the same kind to start from (transfer learning):
        its architecture and weights are the starting point; ``batch_size`` defaults to 8 and
        ``lr`` to 1e-4. The base model is an early-stopping candidate (epoch 0): if no epoch
        lowers its validation loss its weights are returned unchanged (``kept_base``).
    provenance : dict, optional
        Extra JSON fields recorded in the metadata (e.g. the label table and its join).
    augment : dict, optional
        Training-time augmentation of the spectra (:func:`augment_batch`): keys
        ``rv_sigma`` (km/s), ``tilt`` (relative flux slope over the grid), ``mask_frac``
        (fraction of spectra given a masked stretch), ``mask_width`` (pixels); True: the
        defaults :data:`DEFAULT_AUGMENT`; None: off. Applied to training batches only.

    Returns
    -------
    dict
        Metrics (also stored in ``model.json``): ``val_accuracy``, ``val_loss``,
        ``per_class_recall``, ``confusion`` (rows true, columns predicted), ``n_train``,
        ``n_val``, ``epochs_run``, ``best_epoch``, ``train_seconds``, ``history``; when
        fine-tuning also ``val_loss_base`` (the base model's) and ``kept_base``.
    """
    if kind not in CLASSES:
        raise ValueError(f"kind must be one of {tuple(CLASSES)}, got {kind!r}")
    base_state, base_meta = None, None
    if finetune is not None:
        from mspec.ml.io import ModelFileError, load_models

        base_models, base_meta = load_models(finetune, device="cpu")
        if base_meta["kind"] != kind:
            raise ModelFileError(
                f"finetune model {str(finetune)!r} is a {base_meta['kind']!r} model, not {kind!r}"
            )
        if arch:
            raise ValueError("arch cannot be given with finetune (the base model's is kept)")
        arch = dict(base_meta["arch"])
        base_state = base_models[0].state_dict()
    batch_size, lr = _defaults(batch_size, lr, finetune, "classifier")
    augment = _check_augment(augment)
    if not 0.0 < float(val_fraction) < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    _check_common(epochs, batch_size, lr, patience, max_memory)
    fg = _flux_grid(ds)
    n = fg.sizes["spectra"]
    lab = _str_labels(labels, n)
    classes = CLASSES[kind]
    cidx = {c: i for i, c in enumerate(classes)}
    y_all = np.array([cidx.get(v, -1) for v in lab.tolist()], dtype=np.int64)
    rows = np.flatnonzero(y_all >= 0)
    if np.unique(y_all[rows]).size < 2:
        raise ValueError(
            f"labels must contain at least 2 of the {kind!r} classes {classes}; "
            f"found {sorted(set(lab[rows].tolist()))}"
        )
    dev = _device(device)
    t_start = time.perf_counter()
    with _deterministic(seed, threads):
        data = _Data(fg, rows, max_memory)
        rows = rows[data.valid[rows]]
        rng = np.random.default_rng(seed)
        tr, va = _stratified_split(y_all[rows], rows, float(val_fraction), rng)
        if tr.size == 0 or va.size == 0:
            raise ValueError("too few labelled spectra for a train/validation split")
        counts = np.bincount(y_all[tr], minlength=len(classes))
        weights = _class_weights(kind, class_weight, counts)
        model = build_model(kind, **(arch or {})).to(dev)
        if base_state is not None:
            model.load_state_dict(base_state)
        y_t = torch.from_numpy(y_all)
        w_t = torch.tensor(weights, dtype=torch.float32, device=dev)

        def loss_fn(out, t):
            return torch.nn.functional.cross_entropy(out, t, weight=w_t)

        history, best_epoch = _fit(
            model, data, tr, va, lambda r: y_t[torch.from_numpy(r)], loss_fn,
            epochs=epochs, lr=lr, batch_size=int(batch_size), patience=int(patience),
            lr_patience=int(lr_patience), lr_factor=float(lr_factor), rng=rng, device=dev,
            label=f"CNN-{kind.upper()}", progress=progress, augment=augment,
            start_candidate=base_state is not None,
        )  # fmt: skip
        out, vr = _outputs(model, data, va, int(batch_size), dev)
    pred = out.argmax(axis=1)
    true = y_all[vr]
    cm = np.zeros((len(classes), len(classes)), dtype=np.int64)
    np.add.at(cm, (true, pred), 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = np.diag(cm) / cm.sum(axis=1)
    metrics = {
        "val_accuracy": float((pred == true).mean()),
        "val_loss": float(min(history["val_loss"])),
        "per_class_recall": {
            c: (None if np.isnan(r) else float(r)) for c, r in zip(classes, recall)
        },
        "confusion": cm.tolist(),
        "n_train": int(tr.size),
        "n_val": int(va.size),
        "train_counts": {c: int(k) for c, k in zip(classes, counts)},
        "epochs_run": len(history["val_loss"]),
        "best_epoch": int(best_epoch),
        "train_seconds": round(time.perf_counter() - t_start, 2),
        "history": history,
    }
    if base_state is not None:
        metrics["val_loss"] = float(np.nanmin([history["val_loss_base"], *history["val_loss"]]))
        metrics["val_loss_base"] = float(history["val_loss_base"])
        metrics["kept_base"] = best_epoch == 0
        if best_epoch == 0:
            log.warning("CNN-%s: fine-tuning never lowered the validation loss of the base "
                        "model: its weights are kept", kind.upper())  # fmt: skip
    obsid = _obsids(ds, n)
    meta = {
        "kind": kind,
        "classes": list(classes),
        "arch": model.arch,
        "n_parameters": count_parameters(model),
        "input": "flux_grid",
        "recipe": "cnn",
        "grid": GRID,
        "training_set_hash": _dataset_hash(obsid, np.sort(np.concatenate([tr, va])), lab),
        "class_weight": {c: float(w) for c, w in zip(classes, weights)},
        "recipe_training": {
            "optimizer": "Adam", "lr": float(lr), "batch_size": int(batch_size),
            "val_fraction": float(val_fraction), "patience": int(patience),
            "lr_patience": int(lr_patience), "lr_factor": float(lr_factor),
            "max_epochs": int(epochs), "seed": int(seed), "device": str(dev),
        },
        "metrics": metrics,
        "mspec_version": _mspec_version(),
        "torch_version": torch.__version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "members": [{"metrics": {"val_accuracy": metrics["val_accuracy"]}}],
    }  # fmt: skip
    if augment:
        meta["recipe_training"]["augment"] = dict(augment)
    if base_meta is not None:
        from mspec.ml.io import META_NAME, sha256_bytes

        meta["finetuned_from"] = {
            "path": str(Path(finetune).resolve()),
            "model_json_sha256": sha256_bytes((Path(finetune) / META_NAME).read_bytes()),
            "training_set_hash": base_meta.get("training_set_hash"),
            "kept_base": best_epoch == 0,
        }
        for k in ("simulator_version",):
            if base_meta.get(k):
                meta[k] = base_meta[k]
    if provenance:
        meta["provenance"] = provenance
        if provenance.get("simulator_version") is not None:  # simulator-trained
            meta.setdefault("simulator_version", provenance["simulator_version"])
    out_dir = write_model(out_dir, meta, [model.state_dict()])
    if plots:
        title = f"CNN-{kind.upper()} (val acc {metrics['val_accuracy']:.4f})"
        _plot_curves([history], out_dir / "curves.png", title)
        _plot_confusion(cm, classes, out_dir / "confusion.png", title)
    log.info(
        "CNN-%s: val accuracy %.4f on %d spectra", kind.upper(), metrics["val_accuracy"], va.size
    )
    return metrics


def _label_table(labels, n: int) -> np.ndarray:
    """(n, 4) float64 array of teff, logg, m_h, alpha_m from a table along spectra.

    A label column that is absent is all NaN (not trained, or taken from the base model when
    fine-tuning); at least one of the four must be present.
    """
    cols, present = [], 0
    for name in TLMA_LABELS:
        try:
            col = labels[name]
        except (KeyError, IndexError, TypeError, ValueError):
            cols.append(np.full(n, np.nan))
            continue
        present += 1
        cols.append(_as_1d(col, n, f"labels[{name!r}]").astype(np.float64))
    if not present:
        raise ValueError(
            f"labels must be a table (DataFrame, Dataset or dict) with at least one of the "
            f"columns {list(TLMA_LABELS)}"
        )
    return np.stack(cols, axis=1)


def _masked_mse(out: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Mean squared error over the finite targets only (labels may be missing)."""
    m = torch.isfinite(t)
    d = torch.where(m, out - torch.nan_to_num(t), torch.zeros_like(out))
    return (d * d).sum() / m.sum().clamp(min=1)


def _base_ensemble(init) -> tuple[list, dict]:
    """Load the members and metadata of a CNN-TLMA ensemble to fine-tune."""
    from mspec.ml.io import ModelFileError, load_models, read_metadata

    meta = read_metadata(init)
    if meta["kind"] != "tlma":
        raise ModelFileError(
            f"finetune model {str(init)!r} is a {meta['kind']!r} model, not a CNN-TLMA ensemble"
        )
    models, meta = load_models(init, device="cpu")
    return models, meta


def train_regressor(
    ds: xr.Dataset,
    labels,
    out_dir,
    *,
    folds: int = 10,
    epochs: int = 30,
    seed: int = 0,
    batch_size: int | None = None,
    lr: float | None = None,
    patience: int = 5,
    lr_patience: int = 2,
    lr_factor: float = 0.5,
    arch: dict | None = None,
    device=None,
    max_memory: float = 2 * 2**30,
    threads: int | None = None,
    progress: bool = False,
    plots: bool = True,
    name: str = "CNN-TLMA",
    calibration: str = "auto",
    calib_fraction: float = 0.15,
    finetune=None,
    provenance: dict | None = None,
    augment: dict | None = None,
) -> dict:
    """Train a k-fold CNN-TLMA ensemble (Teff, logg, [M/H], [alpha/M]) and write it.

    Member ``i`` trains on every fold but ``i`` and uses fold ``i`` for early stopping; the
    labels are z-scored with the mean and std of the labelled spectra (stored in the metadata).
    Train dwarfs and giants separately (or use :func:`train_tlma_pair`). A label may be
    missing (NaN) for some or all spectra: the loss uses the labels present; a label with no
    value at all is not trained and predicted as NaN (unless fine-tuning, see ``finetune``).

    Calibrated errors (:mod:`mspec.ml.calibrate`): a calibration set that no member trains on
    is held out (``calib_fraction`` of the labelled spectra), the ensemble is applied to it
    and the noise-binned error table is fitted on its residuals and stored in ``model.json``;
    :func:`mspec.ml.predict` then reports the ensemble std (``<p>_err_ens``) and the calibrated
    error (``<p>_err``).

    Parameters
    ----------
    ds : xarray.Dataset
        Holds ``flux_grid`` preprocessed with the rest-frame ``"tlma"`` recipe (lazy is fine).
    labels : table
        ``teff`` (K), ``logg`` (dex), ``m_h`` (dex), ``alpha_m`` (dex) along ``spectra``
        (pandas DataFrame, xarray Dataset or dict of arrays); NaN = not known; a missing
        column = not known for any spectrum.
    out_dir : path-like
        Model directory to write (``model.json``, ``member_NN.safetensors``, ``curves.png``,
        ``oof.png``, ``oof_predictions.csv``).
    folds : int
        Ensemble size k (>= 2; paper: 10). Fine-tuning uses the base ensemble's size.
    epochs, seed, patience, lr_patience, lr_factor, arch, device, max_memory, threads, progress, plots
        As in :func:`train_classifier`.
    batch_size : int, optional
        Adam mini-batch size; default 128 (paper), 8 when fine-tuning.
    lr : float, optional
        Adam learning rate; default 1e-3 (paper), 3e-3 when fine-tuning
        (:data:`FINETUNE_DEFAULTS`).
    name : str
        Name used in logs and plot titles.
    calibration : {"auto", "holdout", "oof", "none"}
        How the error calibration is fitted: on a held-out set (``"holdout"``), on the
        out-of-fold predictions of all labelled spectra (``"oof"``: each residual from the
        member that did not train on the spectrum, which errs a little more than the ensemble
        mean, so the errors come out slightly conservative), or not at all (``"none"``:
        calibrated = ensemble std). ``"auto"``: holdout when it gives >= 100 spectra, else oof.
    calib_fraction : float
        Fraction of the labelled spectra held out for the calibration (``"holdout"``).
    finetune : path-like, optional
        A CNN-TLMA ensemble directory to start from (transfer learning): member ``i`` starts
        from the base member ``i``'s weights, keeps its architecture and label scaling, and is
        trained on every fold but ``i`` of the new labelled set (k = the base ensemble's size).
        Labels missing in the new set are taught from the base member's own predictions, so
        they stay what the base model said instead of drifting. Each base member is an
        early-stopping candidate (epoch 0, its loss on its validation fold before any update):
        a member that fine-tuning never improves on validation keeps the base weights
        (``kept_base`` in its metrics; ``finetuned_from.members_kept_base`` lists them).
    provenance : dict, optional
        Extra JSON fields recorded in the metadata (e.g. the label table and its join).
    augment : dict, optional
        Training-time augmentation of the spectra, as in :func:`train_classifier` (applied
        to training batches only; validation, out-of-fold and calibration spectra are not
        augmented). For CNN-TLMA the RV shift stands for the error of the rest-frame RV.

    Returns
    -------
    dict
        Metrics: out-of-fold ``rms``/``bias`` per label (each spectrum predicted by the member
        that did not train on it), ``members`` (per-member val loss, epochs; when fine-tuning
        also ``val_loss_base`` and ``kept_base``), ``n``, ``train_seconds``, ``calibration``
        (the fitted table's pull stds); when fine-tuning ``members_kept_base`` (fold indices).
    """
    if calibration not in ("auto", "holdout", "oof", "none"):
        raise ValueError(
            f"calibration must be 'auto', 'holdout', 'oof' or 'none', got {calibration!r}"
        )
    if not 0.0 < float(calib_fraction) < 0.5:
        raise ValueError(f"calib_fraction must be in (0, 0.5), got {calib_fraction}")
    base_models, base_meta = (None, None)
    if finetune is not None:
        base_models, base_meta = _base_ensemble(finetune)
        if arch:
            raise ValueError("arch cannot be given with finetune (the base model's is kept)")
        folds = len(base_models)
        arch = dict(base_meta["arch"])
    batch_size, lr = _defaults(batch_size, lr, finetune, "tlma")
    augment = _check_augment(augment)
    if int(folds) < 2:
        raise ValueError(f"folds must be >= 2, got {folds}")
    _check_common(epochs, batch_size, lr, patience, max_memory)
    fg = _flux_grid(ds)
    n = fg.sizes["spectra"]
    y = _label_table(labels, n)
    rows = np.flatnonzero(np.isfinite(y).any(axis=1))
    if rows.size < 2 * int(folds):
        raise ValueError(
            f"need at least {2 * int(folds)} labelled spectra for {folds} folds, got {rows.size}"
        )
    dev = _device(device)
    t_start = time.perf_counter()
    states, members, histories = [], [], []
    oof = np.full((n, len(TLMA_LABELS)), np.nan)
    fold_of = np.full(n, -1, dtype=np.int64)
    with _deterministic(seed, threads):
        data = _Data(fg, rows, max_memory)
        n_no_data = int((~data.valid[rows]).sum())
        rows = rows[data.valid[rows]]
        if rows.size < 2 * int(folds):
            raise ValueError(f"only {rows.size} labelled spectra with data for {folds} folds")
        if n_no_data:
            log.warning("%s: %d labelled spectra have no usable flux_grid (failed "
                        "preprocessing, e.g. no RV): not used", name, n_no_data)  # fmt: skip
        have = np.isfinite(y[rows]).any(axis=0)
        if base_meta is not None:
            mean = np.asarray(base_meta["label_mean"], dtype=np.float64)
            std = np.asarray(base_meta["label_std"], dtype=np.float64)
            trained = list(base_meta.get("labels_trained", TLMA_LABELS))
        else:
            mean = np.array([np.nanmean(y[rows, i]) if have[i] else 0.0 for i in range(4)])
            std = np.array([np.nanstd(y[rows, i]) if have[i] else 1.0 for i in range(4)])
            std = np.where(std > 0, std, 1.0)
            trained = [k for k, h in zip(TLMA_LABELS, have) if h]
            if len(trained) < len(TLMA_LABELS):
                log.warning("%s: no values for %s: not trained, predicted as NaN", name,
                            [k for k, h in zip(TLMA_LABELS, have) if not h])  # fmt: skip
        z = torch.from_numpy(((y - mean) / std).astype(np.float32))  # NaN where no label
        rng = np.random.default_rng(seed)
        perm = rng.permutation(rows)
        mode = calibration
        if mode == "auto":
            mode = "holdout" if int(round(calib_fraction * rows.size)) >= 100 else "oof"
        cal_rows = np.zeros(0, np.int64)
        if mode == "holdout":
            ncal = int(round(calib_fraction * rows.size))
            if rows.size - ncal < 2 * int(folds) or ncal < 2:
                raise ValueError(f"too few labelled spectra ({rows.size}) for a calibration "
                                 f"hold-out of {calib_fraction:.0%}; use calibration='oof'")  # fmt: skip
            cal_rows, perm = np.sort(perm[:ncal]), perm[ncal:]
        parts = np.array_split(perm, int(folds))
        fit_rows = np.sort(perm)
        for k in range(int(folds)):
            va = np.sort(parts[k])
            tr = np.sort(np.concatenate([parts[j] for j in range(int(folds)) if j != k]))
            fold_of[va] = k
            model = build_model("tlma", **(arch or {})).to(dev)
            zk = z
            if base_models is not None:
                model.load_state_dict(base_models[k].state_dict())
                miss = ~np.isfinite(y[fit_rows]).all(axis=1)
                if miss.any():  # missing labels: targets = the base member's own outputs
                    bo, br = _outputs(model, data, fit_rows[miss], int(batch_size), dev)
                    zk = z.clone()
                    cur = zk[torch.from_numpy(br)]
                    zk[torch.from_numpy(br)] = torch.where(torch.isfinite(cur), cur,
                                                           torch.from_numpy(bo))  # fmt: skip
            history, best_epoch = _fit(
                model, data, tr, va, lambda r, zk=zk: zk[torch.from_numpy(r)],
                _masked_mse, epochs=epochs, lr=lr,
                batch_size=int(batch_size), patience=int(patience),
                lr_patience=int(lr_patience), lr_factor=float(lr_factor), rng=rng,
                device=dev, label=f"{name} fold {k + 1}/{folds}", progress=progress,
                augment=augment, start_candidate=base_models is not None,
            )  # fmt: skip
            out, vr = _outputs(model, data, va, int(batch_size), dev)
            oof[vr] = out * std + mean
            states.append(copy.deepcopy(model.state_dict()))
            histories.append(history)
            members.append({
                "fold": k, "n_train": int(tr.size), "n_val": int(va.size),
                "metrics": {"val_loss": float(min(history["val_loss"])),
                            "best_epoch": int(best_epoch), "epochs_run": len(history["val_loss"])},
            })  # fmt: skip
            if base_models is not None:
                mm = members[-1]["metrics"]
                v0 = float(history["val_loss_base"])
                mm.update(val_loss=float(np.nanmin([v0, mm["val_loss"]])), val_loss_base=v0,
                          kept_base=best_epoch == 0)  # fmt: skip
        # calibration: the whole ensemble on spectra it did not train on
        cal = None
        if mode != "none":
            crow = cal_rows if mode == "holdout" else fit_rows
            ens = []
            for st in states:
                m = build_model("tlma", **(arch or {})).to(dev)
                m.load_state_dict(st)
                o, orow = _outputs(m, data, crow, int(batch_size), dev)
                ens.append(o.astype(np.float64) * std + mean)
            ens = np.stack(ens)
            e_mean, e_std = ens.mean(axis=0), ens.std(axis=0, ddof=1)
            pred = e_mean if mode == "holdout" else oof[orow]
            cal = fit_calibration(pred - y[orow], e_std, data.nu[orow], TLMA_LABELS,
                                  source=mode)  # fmt: skip
    resid = oof[fit_rows] - y[fit_rows]

    def _stat(f, i):
        v = resid[:, i][np.isfinite(resid[:, i])]
        return float(f(v)) if v.size else None

    metrics = {
        "rms": {k: _stat(lambda v: np.sqrt(np.mean(v**2)), i) for i, k in enumerate(TLMA_LABELS)},
        "bias": {k: _stat(np.mean, i) for i, k in enumerate(TLMA_LABELS)},
        "n": int(fit_rows.size),
        "n_calibration": int(cal_rows.size),
        "n_no_data": n_no_data,
        "folds": int(folds),
        "train_seconds": round(time.perf_counter() - t_start, 2),
        "members": [m["metrics"] for m in members],
        "calibration": None if cal is None else {
            "source": cal["source"], "pull_std_raw": cal["pull_std_raw"],
            "pull_std": cal["pull_std"]},
    }  # fmt: skip
    kept = [m["fold"] for m in members if m["metrics"].get("kept_base")]
    if base_meta is not None:
        metrics["members_kept_base"] = kept
        if kept:
            log.warning("%s: fine-tuning never lowered the validation loss of base member(s) "
                        "%s: their weights are kept", name, kept)  # fmt: skip
    obsid = _obsids(ds, n)
    all_rows = np.sort(np.concatenate([fit_rows, cal_rows]))
    recipe = {
        "optimizer": "Adam", "lr": float(lr), "batch_size": int(batch_size),
        "folds": int(folds), "patience": int(patience), "lr_patience": int(lr_patience),
        "lr_factor": float(lr_factor), "max_epochs": int(epochs), "seed": int(seed),
        "device": str(dev), "loss": "MSE on z-scored labels (labels present only)",
        "calibration": mode, "calib_fraction": float(calib_fraction) if mode == "holdout" else 0.0,
    }  # fmt: skip
    if augment:
        recipe["augment"] = dict(augment)
    meta = {
        "kind": "tlma",
        "name": name,
        "labels": list(TLMA_LABELS),
        "labels_trained": trained,
        "label_units": ["K", "dex", "dex", "dex"],
        "label_mean": mean.tolist(),
        "label_std": std.tolist(),
        "arch": build_model("tlma", **(arch or {})).arch,
        "n_parameters": count_parameters(build_model("tlma", **(arch or {}))),
        "input": "flux_grid",
        "recipe": "tlma",
        "grid": GRID,
        "training_set_hash": _dataset_hash(
            obsid, all_rows, y[:, 0], extra=np.ascontiguousarray(y[all_rows]).tobytes()
        ),
        "recipe_training": recipe,
        "calibration": cal,
        "metrics": metrics,
        "mspec_version": _mspec_version(),
        "torch_version": torch.__version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "members": members,
    }
    if base_meta is not None:
        from mspec.ml.io import META_NAME, sha256_bytes

        meta["finetuned_from"] = {
            "path": str(Path(finetune).resolve()),
            "model_json_sha256": sha256_bytes((Path(finetune) / META_NAME).read_bytes()),
            "training_set_hash": base_meta.get("training_set_hash"),
            "simulator_version": base_meta.get("simulator_version"),
            "labels_from_base": [k for k, h in zip(TLMA_LABELS, have) if not h],
            "members_kept_base": kept,
        }
        if base_meta.get("simulator_version"):
            meta["simulator_version"] = base_meta["simulator_version"]
    if provenance:
        meta["provenance"] = provenance
        if provenance.get("simulator_version") is not None:  # simulator-trained
            meta.setdefault("simulator_version", provenance["simulator_version"])
    out_dir = write_model(out_dir, meta, states)
    import pandas as pd

    table = {"obsid": obsid[fit_rows], "fold": fold_of[fit_rows]}
    for i, k in enumerate(TLMA_LABELS):
        table[k] = y[fit_rows, i]
        table[f"{k}_oof"] = oof[fit_rows, i]
    pd.DataFrame(table).to_csv(out_dir / "oof_predictions.csv", index=False)
    if plots:
        _plot_curves(histories, out_dir / "curves.png", f"{name}: {folds} folds")
        rms_t = metrics["rms"]["teff"]
        _plot_oof(
            y[fit_rows],
            oof[fit_rows],
            out_dir / "oof.png",
            f"{name} out-of-fold" + (f" (Teff rms {rms_t:.0f} K)" if rms_t is not None else ""),
        )
    log.info("%s: out-of-fold rms %s on %d spectra", name, metrics["rms"], fit_rows.size)
    return metrics


def recalibrate_zero_point(
    ds,
    labels,
    base,
    out_dir,
    *,
    min_stars: int = 3,
    name: str = "CNN-TLMA",
    provenance: dict | None = None,
    batch_size: int = 256,
    device=None,
    threads: int | None = None,
) -> dict:
    """Shift a CNN-TLMA ensemble's outputs onto real labels' zero point (no retraining).

    The lightest label transfer: the base ensemble predicts the labelled spectra, and each
    label's offset is the median of (label - prediction) over the spectra that have it. The
    new model is the base one with its outputs shifted by those offsets (its ``label_mean``
    moved; weights, error calibration and scale unchanged), so unlike fine-tuning it cannot
    compress the base model's scale towards a few noisy labels; it corrects a zero point,
    e.g. the offset of a simulator-trained ensemble on real spectra (docs/accuracy.md).

    Parameters
    ----------
    ds : xarray.Dataset
        Holds ``flux_grid`` preprocessed with the rest-frame ``"tlma"`` recipe (lazy is
        fine; only the labelled rows are read).
    labels : table
        ``teff`` (K), ``logg``, ``m_h``, ``alpha_m`` (dex) along ``spectra``, NaN = not
        known, as in :func:`train_regressor`.
    base : path-like
        The CNN-TLMA ensemble to recalibrate (one ensemble, not a pair).
    out_dir : path-like
        Model directory to write (the base's files, ``model.json`` updated).
    min_stars : int
        A label with fewer values keeps the base zero point (offset 0).
    name : str
        Name used in logs.
    provenance : dict, optional
        Extra JSON fields recorded in the metadata.
    batch_size, device, threads
        Inference settings (:func:`mspec.ml.infer.predict_array`).

    Returns
    -------
    dict
        ``zero_point`` (per label: ``offset`` (K or dex, added to the outputs), ``offset_err``
        (1.2533 x robust sigma / sqrt(n)), ``n``, ``robust_sigma`` of label - prediction
        before the shift, ``applied``), ``n`` (labelled spectra with data), ``n_no_data``
        (labelled spectra without any finite pixel, e.g. no rest frame: not used),
        ``obsids`` (those used; also in ``model.json``).
    """
    import shutil

    from mspec.ml.infer import predict_array
    from mspec.ml.io import META_NAME, read_metadata, sha256_bytes, write_metadata
    from mspec.report import robust_sigma

    base = Path(base)
    meta = read_metadata(base)
    if meta["kind"] != "tlma":
        raise ValueError(f"base {str(base)!r} is a {meta['kind']!r} model, not one CNN-TLMA "
                         "ensemble (a dM/gM pair: use train_tlma_pair(..., zero_point=True))")  # fmt: skip
    if int(min_stars) < 1:
        raise ValueError(f"min_stars must be >= 1, got {min_stars!r}")
    fg = _flux_grid(ds)
    n = fg.sizes["spectra"]
    y = _label_table(labels, n)
    rows = np.flatnonzero(np.isfinite(y).any(axis=1))
    x = np.asarray(fg.isel(spectra=rows).values, dtype=np.float32)
    has = np.isfinite(x).any(axis=1)  # no data (e.g. no rest frame): nothing to compare
    n_no_data = int((~has).sum())
    rows, x = rows[has], x[has]
    if rows.size == 0:
        raise ValueError(f"{name}: no labelled spectra with data to take a zero point from")
    with _deterministic(0, threads):
        pred = predict_array(x, base, batch_size=int(batch_size), device=device)
    k = len(TLMA_LABELS)
    d = y[rows] - pred[:, :k]
    record, offsets = {}, np.zeros(k)
    for i, lab in enumerate(TLMA_LABELS):
        v = d[:, i][np.isfinite(d[:, i])]
        rs = robust_sigma(v)
        applied = v.size >= int(min_stars)
        offsets[i] = float(np.median(v)) if applied else 0.0
        record[lab] = {
            "offset": float(offsets[i]), "n": int(v.size), "robust_sigma": rs,
            "offset_err": float(1.2533 * rs / np.sqrt(v.size)) if v.size else float("nan"),
            "applied": bool(applied),
        }  # fmt: skip
    out = Path(out_dir)
    if out.resolve() != base.resolve():
        shutil.copytree(base, out, dirs_exist_ok=True)
    obsids = _obsids(ds, n)[rows].tolist()
    new = dict(meta)
    new["label_mean"] = (np.asarray(meta["label_mean"], dtype=np.float64) + offsets).tolist()
    new["zero_point"] = {"labels": record, "obsids": obsids, "min_stars": int(min_stars)}
    new["recalibrated_from"] = {
        "path": str(base.resolve()),
        "model_json_sha256": sha256_bytes((base / META_NAME).read_bytes()),
    }
    if provenance:
        new["provenance"] = {**(meta.get("provenance") or {}), **provenance}
    new["mspec_version"] = _mspec_version()
    write_metadata(out, new)
    log.info("%s: zero point from %d labelled spectra: %s", name, rows.size,
             {k_: round(r["offset"], 3) for k_, r in record.items() if r["applied"]})  # fmt: skip
    return {"zero_point": record, "n": int(rows.size), "n_no_data": n_no_data, "obsids": obsids}


def train_tlma_pair(ds, labels, lumclass, out_dir, *, part: str | None = None, **kwargs) -> dict:
    """Train the dM and gM CNN-TLMA ensembles into ``out_dir/dM`` and ``out_dir/gM``.

    Parameters
    ----------
    ds, labels
        As in :func:`train_regressor`.
    lumclass : array-like of str
        ``"dM"`` / ``"gM"`` per spectrum; other values are not used.
    out_dir : path-like
        Pair directory; :func:`mspec.ml.predict` with ``lumclass=`` applies it.
    part : {"dM", "gM"}, optional
        Train (or fine-tune) only this member.
    **kwargs
        Passed to :func:`train_regressor` (``folds``, ``epochs``, ``seed``, ``finetune``,
        ...). With ``finetune`` a dM/gM pair, each member starts from the base pair's member
        of the same class, and a member that is not trained (no spectra of its class, or not
        ``part``) is copied unchanged from the base pair, so the result is a complete pair;
        the pair's ``model.json`` records which parts were fine-tuned and which copied
        (``finetuned_from``).

    Returns
    -------
    dict
        ``{"dM": metrics, "gM": metrics}`` for the parts trained.
    """
    import shutil

    from mspec.ml.io import META_NAME, read_metadata, sha256_bytes

    if part not in (None, "dM", "gM"):
        raise ValueError(f"part must be 'dM', 'gM' or None, got {part!r}")
    fg = _flux_grid(ds)
    n = fg.sizes["spectra"]
    lum = _str_labels(lumclass, n)
    y = _label_table(labels, n)
    finetune = kwargs.pop("finetune", None)
    zero_point = bool(kwargs.pop("zero_point", False))
    if zero_point and finetune is None:
        raise ValueError("zero_point=True recalibrates a trained model: give finetune=<base>")
    base_parts = None
    if finetune is not None:
        bm = read_metadata(finetune)
        if bm["kind"] == "tlma_pair":
            base_parts = {p: Path(finetune) / sub for p, sub in bm["parts"].items()}
    wanted = ("dM", "gM") if part is None else (part,)
    if part is not None and not (lum == part).any():
        raise ValueError(f"lumclass has no {part!r} spectra to train the {part} member on")
    out, parts = {}, {}
    for cls in wanted:
        sel = lum == cls
        if not sel.any():
            continue
        base = finetune
        if base_parts is not None:
            base = base_parts.get(cls)
            if base is None:
                raise ValueError(f"finetune pair {str(finetune)!r} has no {cls} ensemble")
        yp = np.where(sel[:, None], y, np.nan)
        lab = {k: yp[:, i] for i, k in enumerate(TLMA_LABELS)}
        dest, name = Path(out_dir) / cls, f"CNN-TLMA-{cls}"
        try:
            if zero_point:  # inference only: the training settings do not apply
                zkw = {k: kwargs[k] for k in ("provenance", "threads", "device") if k in kwargs}
                out[cls] = recalibrate_zero_point(ds, lab, base, dest, name=name, **zkw)
            else:
                out[cls] = train_regressor(ds, lab, dest, name=name, finetune=base, **kwargs)
        except ValueError as exc:  # say which member (part= trains one member only)
            msg = f"CNN-TLMA {cls} member: {exc}"
            try:
                new = type(exc)(msg)
            except Exception:  # noqa: BLE001 - a ValueError subclass with other arguments
                new = ValueError(msg)
            raise new from exc
        parts[cls] = cls
    if not parts:
        raise ValueError("lumclass has no 'dM' or 'gM' spectra")
    meta = {"mspec_version": _mspec_version()}
    if finetune is not None:
        copied = {}
        for p, src in (base_parts or {}).items():
            if p in parts:
                continue
            dst = Path(out_dir) / p
            if not (dst.exists() and dst.resolve() == src.resolve()):
                if dst.exists():
                    shutil.rmtree(dst)
                shutil.copytree(src, dst)
            parts[p] = p
            copied[p] = sha256_bytes((src / META_NAME).read_bytes())
            log.info("CNN-TLMA-%s: not fine-tuned; copied unchanged from %s", p, src)
        meta["finetuned_from"] = {
            "path": str(Path(finetune).resolve()),
            "model_json_sha256": sha256_bytes((Path(finetune) / META_NAME).read_bytes()),
            "parts_finetuned": sorted(out),
            "parts_copied": copied,
            "mode": "zero_point" if zero_point else "finetune",
        }
    write_pair(out_dir, parts, meta)
    return out


def _file_sha256(path) -> str | None:
    import hashlib as _h

    try:
        return _h.sha256(Path(path).read_bytes()).hexdigest()
    except (OSError, TypeError):
        return None


def _open_training_data(store):
    """The spectra to train on: a Dataset as given, a run directory (its store merged with
    the run's stage outputs, :func:`mspec.review.load_run`) or a store (:func:`open_store`)."""
    if isinstance(store, xr.Dataset):
        return store
    if (Path(store) / "config.resolved.toml").is_file():
        from mspec.review import load_run

        return load_run(store)
    from mspec.io.store import open_store

    return open_store(store)


def _resolve_finetune(finetune, kind: str):
    """``finetune`` itself, or its ``<kind>/`` sub-directory when ``finetune`` is a default
    model set (``mspec models path``: ``spt/ wdm/ dmgm/ tlma/``) rather than one model."""
    if finetune is None:
        return None
    f = Path(finetune)
    if not (f / "model.json").is_file() and (f / kind / "model.json").is_file():
        log.info("finetune: %s is a model set; using its %s/", f, kind)
        return f / kind
    return f


#: Variables of a store or run that give a spectrum's dwarf/giant class, in order of trust:
#: the pipeline's DGCM decision, then the CNN-dMgM class alone.
LUMCLASS_VARIABLES = ("luminosity_class", "dmgm_class")


def _tlma_lumclass(ds, t, cols, matched, *, want: bool, part):
    """The dM/gM class per spectrum for a CNN-TLMA pair, and where it came from.

    Returns ``(lum, checked, source)``: ``lum`` the class used ("" = none; None when no class
    is needed and the table has none), ``checked`` the classes that describe the labels (the
    table's class column or log g), compared with LAMOST's by the consistency filter (None
    when there are none), ``source`` a short description. Order: the table's ``lumclass`` /
    ``ASPCAP_CLASS`` column; when a class is needed (``want``) and the table has none, the
    run's or store's :data:`LUMCLASS_VARIABLES`, else the table's log g
    (:func:`mspec.ml.labels.lumclass_from_logg`); with ``part``, spectra without a class are
    taken to be ``part``.
    """
    from mspec.ml.labels import DWARF_LOGG_MIN, lumclass_from_aspcap, lumclass_from_logg

    n = len(t)
    lum = checked = source = None
    if "lumclass" in cols:
        lum = np.array([str(v) if isinstance(v, str) else "" for v in t[cols["lumclass"]]])
        checked, source = lum, f"labels column {cols['lumclass']!r}"
    elif "aspcap_class" in cols:
        lum = lumclass_from_aspcap(t[cols["aspcap_class"]].fillna("").to_numpy())
        checked, source = lum, f"labels column {cols['aspcap_class']!r} (ASPCAP_CLASS)"
    elif want:
        var = next((v for v in LUMCLASS_VARIABLES if v in ds), None)
        if var is not None:
            lum = np.asarray(ds[var].values).astype(str)
            lum = np.where(np.isin(lum, ["dM", "gM"]), lum, "").astype("<U2")
            source = f"{var!r} of the store/run"
        elif "logg" in cols:
            lum = lumclass_from_logg(t[cols["logg"]].to_numpy(dtype=object))
            checked = lum
            source = f"labels log g ({cols['logg']!r} >= {DWARF_LOGG_MIN:g}: dM, below: gM)"
    if part is not None:
        if lum is None:
            lum, source = np.full(n, part, dtype="<U2"), f"part={part!r} (every labelled spectrum)"
        else:
            lum = np.where(lum == "", part, lum)
            source += f"; part={part!r} (spectra without a class taken as {part})"
    if lum is not None:
        lum = np.where(matched, lum, "")
    return lum, checked, source


def train_from_store(
    *,
    kind: str,
    store,
    labels,
    out_dir,
    epochs: int = 30,
    seed: int = 0,
    folds: int = 10,
    on: str = "auto",
    radius_arcsec: float = 3.0,
    columns: dict | None = None,
    snr_min: float | None = 5.0,
    consistent: bool = True,
    finetune=None,
    part: str | None = None,
    zero_point: bool = False,
    **kwargs,
) -> dict:
    """Train (or fine-tune) one model on a store's spectra and a user's label table.

    The label transfer path (the CLI's ``mspec train``): the table is joined to the store's
    spectra (:func:`mspec.ml.labels.join_labels`: on ``obsid``, file name or position within
    ``radius_arcsec``), its label columns are found under their usual names or mapped with
    ``columns`` (:func:`mspec.ml.labels.label_columns`), the paper's training-set filters are
    applied (S/N_max >= ``snr_min``; classes consistent with the LAMOST pipeline's), the store
    is preprocessed lazily and the model is trained, or fine-tuned from ``finetune``.

    Parameters
    ----------
    kind : {"spt", "wdm", "dmgm", "tlma"}
        Model to train.
    store : path-like or xarray.Dataset
        Zarr store written by :func:`mspec.ingest` (opened lazily, read chunk by chunk), a
        run directory of that store (``mspec run``: its store with the run's outputs, e.g.
        the DGCM ``luminosity_class``), or an opened Dataset.
    labels : path-like or pandas.DataFrame
        CSV / Parquet / FITS label table. Classifiers read the class from the first of the
        columns ``<kind>``, ``label``, ``class`` (CNN-dMgM also ``lumclass`` or
        ``ASPCAP_CLASS``); CNN-TLMA reads ``teff, logg, m_h, alpha_m`` (K, dex; any subset,
        aliases such as APOGEE's ``TEFF, LOGG, M_H, ALPHA_M`` or ``teff_lit``), optionally
        ``rv`` (km/s, rest frame; default the store's LAMOST RV) and ``lumclass`` (``dM``/
        ``gM``, or APOGEE ``ASPCAP_CLASS``: then the dM and gM ensembles are trained into
        ``out_dir/dM`` and ``out_dir/gM``). Spectra without a table row are not used.
    out_dir : path-like
        Model directory to write.
    epochs, seed, folds : int
        See :func:`train_classifier` / :func:`train_regressor` (``folds`` is ignored when
        fine-tuning: the base ensemble's size is kept).
    on : {"auto", "obsid", "file", "position"}
        Join key (:func:`mspec.ml.labels.join_labels`).
    radius_arcsec : float
        Radius of a position join (arcsec; paper: 3).
    columns : dict, optional
        label -> table column (e.g. ``{"m_h": "feh_lit", "class": "my_type"}``).
    snr_min : float or None
        Training-set filter S/N_max = max(snr_u..snr_z) >= ``snr_min`` (paper: 5); None: off.
    consistent : bool
        Keep only spectra whose label class agrees with the LAMOST pipeline's class (for
        CNN-TLMA: a class from the table, its class column or its log g).
    finetune : path-like, optional
        A trained model directory of the same kind (for CNN-TLMA an ensemble or a dM/gM pair;
        a default model set, ``mspec models path``, stands for its ``<kind>/``) to start
        from: transfer learning of simulator-trained models on a small real set. Batch size
        and learning rate then default to :data:`FINETUNE_DEFAULTS`. A dM/gM pair needs a
        dwarf/giant class per spectrum: the table's ``lumclass``/``ASPCAP_CLASS`` column;
        else the run's or store's ``luminosity_class`` (DGCM) or ``dmgm_class``
        (CNN-dMgM); else the table's log g (dM at log g >= 3.0,
        :data:`mspec.ml.labels.DWARF_LOGG_MIN`); else ``part`` must say which member to
        fine-tune. Members with no spectra are copied unchanged from the base pair.
    part : {"dM", "gM"}, optional
        CNN-TLMA only: train or fine-tune only this member of the dM/gM pair (the output is
        a pair directory; fine-tuning a pair, the other member is copied from it). Spectra
        known to be of the other class are left out; spectra with no class are taken to be
        ``part``.
    zero_point : bool
        CNN-TLMA only, with ``finetune``: do not train; shift the base model's outputs by
        the median offset to the labels (:func:`recalibrate_zero_point`), which corrects a
        zero point without compressing the scale towards a few noisy labels.
    **kwargs
        Passed on to the training function (``lr``, ``batch_size``, ``arch``, ``threads``,
        ``calibration``, ...).

    Returns
    -------
    dict
        The training metrics, plus ``labels``: the join report (``key``, matched and
        unmatched counts, unmatched keys), the columns used, the rows dropped per filter and,
        for a CNN-TLMA pair, ``lumclass`` (its source and counts) (also recorded in
        ``model.json`` under ``provenance``).
    """
    from mspec.ml.io import read_metadata
    from mspec.ml.labels import (
        join_labels,
        label_columns,
        lumclass_from_aspcap,
        read_label_table,
        training_filters,
    )
    from mspec.preprocessing.steps import preprocess

    if kind not in (*CLASSES, "tlma"):
        raise ValueError(f"kind must be one of {(*CLASSES, 'tlma')}, got {kind!r}")
    if part is not None and (kind != "tlma" or part not in ("dM", "gM")):
        raise ValueError(f"part must be 'dM' or 'gM' and needs kind 'tlma' (got {part!r} "
                         f"for {kind!r})")  # fmt: skip
    if zero_point and (kind != "tlma" or finetune is None):
        raise ValueError("zero_point recalibrates a trained CNN-TLMA model: it needs kind "
                         f"'tlma' and finetune=<model> (got kind {kind!r}, finetune={finetune!r})")  # fmt: skip
    finetune = _resolve_finetune(finetune, kind)
    pair_base = finetune is not None and read_metadata(finetune)["kind"] == "tlma_pair"
    table = read_label_table(labels)
    ds = _open_training_data(store)
    lj = join_labels(ds, table, on=on, radius_arcsec=radius_arcsec)
    cols = label_columns(table, kind, columns)
    t = lj.table
    matched = (t["_table_row"] >= 0).to_numpy()
    if kind in CLASSES:
        lab = t[cols["class"]].to_numpy(dtype=object)
        if cols["class"] in ("ASPCAP_CLASS", "aspcap_class"):
            lab = lumclass_from_aspcap(np.where(matched, lab, "")).astype(object)
        lab = np.array(["" if (v is None or (isinstance(v, float) and np.isnan(v))) else str(v)
                        for v in lab], dtype=object)  # fmt: skip
        keep, dropped = training_filters(ds, lab, kind=kind, snr_min=snr_min,
                                         consistent=consistent)  # fmt: skip
        dropped["total"] = int(((~keep) & matched).sum())
        lab = np.where(keep, lab, "")
        prov = _provenance(labels, lj, cols, dropped, snr_min, consistent)
        prep = preprocess(ds, recipe="cnn")
        m = train_classifier(prep, lab, kind, out_dir, epochs=epochs, seed=seed,
                             finetune=finetune, provenance=prov, **kwargs)  # fmt: skip
        m["labels"] = prov
        return m
    rv = None
    if "rv" in cols:
        rv = xr.DataArray(pd_num(t[cols["rv"]]), dims="spectra")
    elif "lamost_rv" in ds:
        rv = ds["lamost_rv"]
    else:
        raise ValueError("the store has no 'lamost_rv' and the labels table no rv column: "
                         "CNN-TLMA needs a radial velocity for the rest frame")  # fmt: skip
    want = pair_base or part is not None
    lum, checked, lum_source = _tlma_lumclass(ds, t, cols, matched, want=want, part=part)
    if pair_base and (lum is None or not np.isin(lum[matched], ["dM", "gM"]).any()):
        raise ValueError(
            f"--finetune {str(finetune)!r} is a dM/gM pair, but no dwarf/giant class was "
            "found for the labelled spectra (no lumclass/ASPCAP_CLASS or logg column in the "
            "labels table, no luminosity_class/dmgm_class in the store): choose the member "
            f"to fine-tune with --part dM or --part gM (part= in Python), or pass one "
            f"ensemble, e.g. --finetune {str(Path(finetune) / 'dM')!r}"
        )
    keep, dropped = training_filters(ds, checked, kind="tlma", snr_min=snr_min,
                                     consistent=consistent)  # fmt: skip
    if part is not None and lum is not None:  # known to be the other member's class
        other = matched & keep & (lum != part)
        dropped["other_part"] = int(other.sum())
        keep &= ~other
    y = {k: np.where(keep, pd_num(t[c]), np.nan) for k, c in cols.items()
         if k in TLMA_LABELS}  # fmt: skip
    dropped["total"] = int(((~keep) & matched).sum())
    prov = _provenance(labels, lj, cols, dropped, snr_min, consistent)
    from_column = "lumclass" in cols or "aspcap_class" in cols
    if lum is not None and (part is not None or not from_column):  # a class mspec chose
        used = np.where(keep & matched, lum, "")
        counts = {c: int((used == c).sum()) for c in ("dM", "gM")}
        prov["lumclass"] = {"source": lum_source, "part": part, "counts": counts}
        if part is not None and counts[part] == 0:
            raise ValueError(f"--part {part}: no labelled spectrum of class {part} is left to "
                             f"train on (class from {lum_source}; after the filters "
                             f"{counts['dM']} dM, {counts['gM']} gM)")  # fmt: skip
    prep = preprocess(ds, recipe="tlma", rv=rv)
    common = dict(epochs=epochs, seed=seed, finetune=finetune, provenance=prov, **kwargs)
    if lum is not None:
        m = train_tlma_pair(prep, y, np.where(keep, lum, ""), out_dir, folds=folds, part=part,
                            zero_point=zero_point, **common)  # fmt: skip
    elif zero_point:
        m = recalibrate_zero_point(prep, y, finetune, out_dir, provenance=prov,
                                   threads=kwargs.get("threads"))  # fmt: skip
    else:
        m = train_regressor(prep, y, out_dir, folds=folds, **common)
    m["labels"] = prov
    return m


def pd_num(col) -> np.ndarray:
    """A table column as float64 (non-numbers -> NaN)."""
    import pandas as pd

    return pd.to_numeric(col, errors="coerce").to_numpy(np.float64)


def _provenance(labels, lj, cols, dropped, snr_min, consistent) -> dict:
    src = None if not isinstance(labels, (str, os.PathLike)) else str(Path(labels).resolve())
    rep = dict(lj.report)
    rep["unmatched"] = rep.get("unmatched", [])[:20]
    return {
        "label_table": src,
        "label_table_sha256": _file_sha256(labels) if src else None,
        "join": rep,
        "columns": dict(cols),
        "filters": {"snr_max_min": snr_min, "consistent_classes": bool(consistent)},
        "dropped": {k: int(v) for k, v in dropped.items()},
    }


def train_all_demo(
    ds: xr.Dataset,
    out_dir,
    *,
    epochs: int = 15,
    folds: int = 5,
    seed: int = 0,
    progress: bool = False,
    threads: int | None = None,
    only: str = "all",
    augment=None,
) -> dict:
    """Train CNN-SPT, CNN-WDM, CNN-dMgM and the CNN-TLMA pair on a simulated survey.

    Parameters
    ----------
    ds : xarray.Dataset
        A survey from :func:`mspec.simulate_survey` (with its ``true_*`` truth), raw (it is
        preprocessed here: recipe ``"cnn"``, and ``"tlma"`` shifted by ``true_rv``).
    out_dir : path-like
        Parent directory: models go to ``spt/``, ``wdm/``, ``dmgm/`` and ``tlma/`` (pair).
    epochs, folds, seed : int
        Maximum epochs per network, CNN-TLMA ensemble size, seed.
    progress : bool
        Print one line per epoch.
    threads : int, optional
        torch threads (1 is fastest on a busy machine: no OpenMP oversubscription).
    only : {"all", "classifiers", "tlma"}
        Train only the classifiers or only the CNN-TLMA pair.
    augment : None, True or dict
        Training augmentation of the classifiers (see :func:`train_classifier`); off by
        default. With a class-balanced set it lifts CNN-SPT away from class boundaries at
        S/N_i > 20 from 98.0% to 98.5% (docs/accuracy.md).

    Returns
    -------
    dict
        ``{"spt": metrics, "wdm": ..., "dmgm": ..., "tlma": {"dM": ..., "gM": ...},
        "seconds": {...}}``.
    """
    from mspec.preprocessing.steps import preprocess

    out = Path(out_dir)
    for v in ("true_class", "true_lumclass", "true_rv", "true_teff"):
        if v not in ds:
            raise ValueError(f"ds has no {v!r}: train_all_demo needs a simulated survey")
    if only not in ("all", "classifiers", "tlma"):
        raise ValueError(f"only must be 'all', 'classifiers' or 'tlma', got {only!r}")
    common = {"epochs": epochs, "seed": seed, "progress": progress, "threads": threads}
    res, secs = {}, {}
    if only in ("all", "classifiers"):
        cnn = preprocess(ds, recipe="cnn")
        true_class = ds["true_class"].values
        for kind, lab in (
            ("spt", true_class),
            ("wdm", true_class),
            ("dmgm", ds["true_lumclass"].values),
        ):
            t0 = time.perf_counter()
            res[kind] = train_classifier(cnn, lab, kind, out / kind, augment=augment, **common)
            secs[kind] = round(time.perf_counter() - t0, 1)
    if only in ("all", "tlma"):
        t0 = time.perf_counter()
        tl = preprocess(ds, recipe="tlma", rv=ds["true_rv"])
        lab = {k: ds[f"true_{k}"].values for k in TLMA_LABELS}
        res["tlma"] = train_tlma_pair(
            tl, lab, ds["true_lumclass"].values, out / "tlma", folds=folds, **common
        )
        secs["tlma"] = round(time.perf_counter() - t0, 1)
    res["seconds"] = secs
    return res
