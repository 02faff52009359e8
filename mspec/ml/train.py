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

from mspec.ml.io import write_model, write_pair
from mspec.ml.models import CLASSES, TLMA_LABELS, build_model, count_parameters
from mspec.ml.models import network_input as _flux_grid

__all__ = [
    "PAPER_CLASS_WEIGHTS",
    "train_classifier",
    "train_regressor",
    "train_tlma_pair",
    "train_from_store",
    "train_all_demo",
]

log = logging.getLogger("mspec.ml")

#: Class weights quoted by the paper (every other class 1).
PAPER_CLASS_WEIGHTS = {"spt": {"OB": 3.62}, "wdm": {"WD": 4.23}, "dmgm": {}}
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
):
    """Train ``model`` with early stopping; returns (history, best_epoch) and keeps best weights.

    ``target(rows) -> tensor`` gives the targets of dataset rows; ``loss_fn(out, t)`` is a mean
    loss. Validation loss is the mean over every validation spectrum.
    """
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(
        opt, mode="min", factor=lr_factor, patience=lr_patience
    )
    history = {"train_loss": [], "val_loss": [], "lr": []}
    best, best_state, best_epoch, bad = math.inf, None, 0, 0
    for epoch in range(int(epochs)):
        t0 = time.perf_counter()
        model.train()
        tot, cnt = 0.0, 0
        for xb, rb in data.batches(train_rows, batch_size, rng):
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
        ax.scatter(true[:, k], pred[:, k], s=3, alpha=0.5)
        lo = np.nanmin([true[:, k].min(), pred[:, k].min()])
        hi = np.nanmax([true[:, k].max(), pred[:, k].max()])
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
    batch_size: int = 128,
    lr: float = 1e-3,
    patience: int = 5,
    lr_patience: int = 2,
    lr_factor: float = 0.5,
    arch: dict | None = None,
    device=None,
    max_memory: float = 2 * 2**30,
    threads: int | None = None,
    progress: bool = False,
    plots: bool = True,
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
    batch_size, lr : int, float
        Adam mini-batch size and learning rate (paper: 128, 1e-3).
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

    Returns
    -------
    dict
        Metrics (also stored in ``model.json``): ``val_accuracy``, ``val_loss``,
        ``per_class_recall``, ``confusion`` (rows true, columns predicted), ``n_train``,
        ``n_val``, ``epochs_run``, ``best_epoch``, ``train_seconds``, ``history``.
    """
    if kind not in CLASSES:
        raise ValueError(f"kind must be one of {tuple(CLASSES)}, got {kind!r}")
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
        y_t = torch.from_numpy(y_all)
        w_t = torch.tensor(weights, dtype=torch.float32, device=dev)

        def loss_fn(out, t):
            return torch.nn.functional.cross_entropy(out, t, weight=w_t)

        history, best_epoch = _fit(
            model, data, tr, va, lambda r: y_t[torch.from_numpy(r)], loss_fn,
            epochs=epochs, lr=lr, batch_size=int(batch_size), patience=int(patience),
            lr_patience=int(lr_patience), lr_factor=float(lr_factor), rng=rng, device=dev,
            label=f"CNN-{kind.upper()}", progress=progress,
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
    """(n, 4) float64 array of teff, logg, m_h, alpha_m from a table along spectra."""
    cols = []
    for name in TLMA_LABELS:
        try:
            col = labels[name]
        except (KeyError, IndexError, TypeError, ValueError):
            raise ValueError(
                f"labels must be a table (DataFrame, Dataset or dict) with columns "
                f"{list(TLMA_LABELS)}; {name!r} is missing"
            ) from None
        cols.append(_as_1d(col, n, f"labels[{name!r}]").astype(np.float64))
    return np.stack(cols, axis=1)


def train_regressor(
    ds: xr.Dataset,
    labels,
    out_dir,
    *,
    folds: int = 10,
    epochs: int = 30,
    seed: int = 0,
    batch_size: int = 128,
    lr: float = 1e-3,
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
) -> dict:
    """Train a k-fold CNN-TLMA ensemble (Teff, logg, [M/H], [alpha/M]) and write it.

    Member ``i`` trains on every fold but ``i`` and uses fold ``i`` for early stopping; the
    labels are z-scored with the mean and std of all labelled spectra (stored in the metadata).
    Train dwarfs and giants separately (or use :func:`train_tlma_pair`).

    Parameters
    ----------
    ds : xarray.Dataset
        Holds ``flux_grid`` preprocessed with the rest-frame ``"tlma"`` recipe (lazy is fine).
    labels : table
        ``teff`` (K), ``logg`` (dex), ``m_h`` (dex), ``alpha_m`` (dex) along ``spectra``
        (pandas DataFrame, xarray Dataset or dict of arrays). Rows with any NaN are not used.
    out_dir : path-like
        Model directory to write (``model.json``, ``member_NN.safetensors``, ``curves.png``,
        ``oof.png``, ``oof_predictions.csv``).
    folds : int
        Ensemble size k (>= 2; paper: 10).
    epochs, seed, batch_size, lr, patience, lr_patience, lr_factor, arch, device, max_memory, threads, progress, plots
        As in :func:`train_classifier`.
    name : str
        Name used in logs and plot titles.

    Returns
    -------
    dict
        Metrics: out-of-fold ``rms``/``bias`` per label (each spectrum predicted by the member
        that did not train on it), ``members`` (per-member val loss, epochs), ``n``,
        ``train_seconds``.
    """
    if int(folds) < 2:
        raise ValueError(f"folds must be >= 2, got {folds}")
    _check_common(epochs, batch_size, lr, patience, max_memory)
    fg = _flux_grid(ds)
    n = fg.sizes["spectra"]
    y = _label_table(labels, n)
    rows = np.flatnonzero(np.isfinite(y).all(axis=1))
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
        rows = rows[data.valid[rows]]
        if rows.size < 2 * int(folds):
            raise ValueError(f"only {rows.size} labelled spectra with data for {folds} folds")
        mean = y[rows].mean(axis=0)
        std = y[rows].std(axis=0)
        std = np.where(std > 0, std, 1.0)
        z = torch.from_numpy(((y - mean) / std).astype(np.float32))
        rng = np.random.default_rng(seed)
        perm = rng.permutation(rows)
        parts = np.array_split(perm, int(folds))
        for k in range(int(folds)):
            va = np.sort(parts[k])
            tr = np.sort(np.concatenate([parts[j] for j in range(int(folds)) if j != k]))
            fold_of[va] = k
            model = build_model("tlma", **(arch or {})).to(dev)
            history, best_epoch = _fit(
                model, data, tr, va, lambda r: z[torch.from_numpy(r)],
                torch.nn.functional.mse_loss, epochs=epochs, lr=lr,
                batch_size=int(batch_size), patience=int(patience),
                lr_patience=int(lr_patience), lr_factor=float(lr_factor), rng=rng,
                device=dev, label=f"{name} fold {k + 1}/{folds}", progress=progress,
            )  # fmt: skip
            out, vr = _outputs(model, data, va, int(batch_size), dev)
            oof[vr] = out * std + mean
            states.append(model.state_dict())
            histories.append(history)
            members.append({
                "fold": k, "n_train": int(tr.size), "n_val": int(va.size),
                "metrics": {"val_loss": float(min(history["val_loss"])),
                            "best_epoch": int(best_epoch), "epochs_run": len(history["val_loss"])},
            })  # fmt: skip
    resid = oof[rows] - y[rows]
    metrics = {
        "rms": {k: float(np.sqrt(np.mean(resid[:, i] ** 2))) for i, k in enumerate(TLMA_LABELS)},
        "bias": {k: float(np.mean(resid[:, i])) for i, k in enumerate(TLMA_LABELS)},
        "n": int(rows.size),
        "folds": int(folds),
        "train_seconds": round(time.perf_counter() - t_start, 2),
        "members": [m["metrics"] for m in members],
    }
    obsid = _obsids(ds, n)
    meta = {
        "kind": "tlma",
        "name": name,
        "labels": list(TLMA_LABELS),
        "label_units": ["K", "dex", "dex", "dex"],
        "label_mean": mean.tolist(),
        "label_std": std.tolist(),
        "arch": build_model("tlma", **(arch or {})).arch,
        "n_parameters": count_parameters(build_model("tlma", **(arch or {}))),
        "input": "flux_grid",
        "recipe": "tlma",
        "grid": GRID,
        "training_set_hash": _dataset_hash(
            obsid, rows, y[:, 0], extra=np.ascontiguousarray(y[rows]).tobytes()
        ),
        "recipe_training": {
            "optimizer": "Adam", "lr": float(lr), "batch_size": int(batch_size),
            "folds": int(folds), "patience": int(patience), "lr_patience": int(lr_patience),
            "lr_factor": float(lr_factor), "max_epochs": int(epochs), "seed": int(seed),
            "device": str(dev), "loss": "MSE on z-scored labels",
        },
        "metrics": metrics,
        "mspec_version": _mspec_version(),
        "torch_version": torch.__version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "members": members,
    }  # fmt: skip
    out_dir = write_model(out_dir, meta, states)
    import pandas as pd

    table = {"obsid": obsid[rows], "fold": fold_of[rows]}
    for i, k in enumerate(TLMA_LABELS):
        table[k] = y[rows, i]
        table[f"{k}_oof"] = oof[rows, i]
    pd.DataFrame(table).to_csv(out_dir / "oof_predictions.csv", index=False)
    if plots:
        _plot_curves(histories, out_dir / "curves.png", f"{name}: {folds} folds")
        _plot_oof(
            y[rows],
            oof[rows],
            out_dir / "oof.png",
            f"{name} out-of-fold (Teff rms {metrics['rms']['teff']:.0f} K)",
        )
    log.info("%s: out-of-fold rms %s on %d spectra", name, metrics["rms"], rows.size)
    return metrics


def train_tlma_pair(ds, labels, lumclass, out_dir, **kwargs) -> dict:
    """Train the dM and gM CNN-TLMA ensembles into ``out_dir/dM`` and ``out_dir/gM``.

    Parameters
    ----------
    ds, labels
        As in :func:`train_regressor`.
    lumclass : array-like of str
        ``"dM"`` / ``"gM"`` per spectrum; other values are not used.
    out_dir : path-like
        Pair directory; :func:`mspec.ml.predict` with ``lumclass=`` applies it.
    **kwargs
        Passed to :func:`train_regressor` (``folds``, ``epochs``, ``seed``, ...).

    Returns
    -------
    dict
        ``{"dM": metrics, "gM": metrics}`` for the parts that had labelled spectra.
    """
    fg = _flux_grid(ds)
    n = fg.sizes["spectra"]
    lum = _str_labels(lumclass, n)
    y = _label_table(labels, n)
    out, parts = {}, {}
    for part in ("dM", "gM"):
        sel = lum == part
        if not sel.any():
            continue
        yp = np.where(sel[:, None], y, np.nan)
        out[part] = train_regressor(
            ds,
            {k: yp[:, i] for i, k in enumerate(TLMA_LABELS)},
            Path(out_dir) / part,
            name=f"CNN-TLMA-{part}",
            **kwargs,
        )
        parts[part] = part
    if not parts:
        raise ValueError("lumclass has no 'dM' or 'gM' spectra")
    write_pair(out_dir, parts, {"mspec_version": _mspec_version()})
    return out


def _read_label_table(labels):
    import pandas as pd

    if isinstance(labels, pd.DataFrame):
        table = labels
    else:
        path = Path(labels)
        if not path.exists():
            raise ValueError(f"labels file {str(path)!r} does not exist")
        if path.suffix.lower() in (".parquet", ".pq"):
            table = pd.read_parquet(path)
        elif path.suffix.lower() in (".csv", ".txt") or path.name.lower().endswith(".csv.gz"):
            table = pd.read_csv(path)
        else:
            raise ValueError(f"labels {str(path)!r}: expected a .csv or .parquet file")
    if "obsid" not in table.columns:
        raise ValueError("labels table needs an 'obsid' column")
    if table["obsid"].duplicated().any():
        raise ValueError("labels table has duplicate obsid values")
    return table


def _aligned(table, obsid: np.ndarray):
    """Rows of ``table`` in the order of the store's ``obsid`` (missing obsids -> NaN)."""
    t = table.set_index(table["obsid"].astype(np.int64))
    return t.reindex(obsid.astype(np.int64))


def _first_col(table, names, what):
    for c in names:
        if c in table.columns:
            return c
    raise ValueError(f"labels table needs a {what} column (one of {list(names)})")


def train_from_store(
    *,
    kind: str,
    store,
    labels,
    out_dir,
    epochs: int = 30,
    seed: int = 0,
    folds: int = 10,
    **kwargs,
) -> dict:
    """Preprocess a Zarr store lazily and train one model on a label table (the CLI's ``train``).

    Parameters
    ----------
    kind : {"spt", "wdm", "dmgm", "tlma"}
        Model to train.
    store : path-like
        Zarr store written by :func:`mspec.ingest` (opened lazily, read chunk by chunk).
    labels : path-like or pandas.DataFrame
        CSV/Parquet label table keyed by ``obsid``. Classifiers read the class name from the
        first of the columns ``<kind>``, ``label``, ``class`` (dMgM also ``lumclass``); CNN-TLMA
        reads ``teff, logg, m_h, alpha_m``, optionally ``rv`` (km/s, for the rest-frame shift;
        default the store's LAMOST RV) and ``lumclass`` (``dM``/``gM``: then the dM and gM
        ensembles are trained into ``out_dir/dM`` and ``out_dir/gM``). Spectra of the store
        without a row in the table are not used.
    out_dir : path-like
        Model directory to write.
    epochs, seed, folds : int
        See :func:`train_classifier` / :func:`train_regressor`.
    **kwargs
        Passed on to the training function.

    Returns
    -------
    dict
        The training metrics.
    """
    from mspec.io.store import open_store
    from mspec.preprocessing.steps import preprocess

    if kind not in (*CLASSES, "tlma"):
        raise ValueError(f"kind must be one of {(*CLASSES, 'tlma')}, got {kind!r}")
    table = _read_label_table(labels)
    ds = open_store(store)
    obsid = np.asarray(ds["obsid"].values)
    t = _aligned(table, obsid)
    if t.index.isin(table["obsid"]).sum() == 0 if len(t) else True:
        raise ValueError("no obsid of the labels table is in the store")
    if kind in CLASSES:
        names = (kind, "label", "class") + (("lumclass",) if kind == "dmgm" else ())
        col = _first_col(table, names, f"{kind} class")
        prep = preprocess(ds, recipe="cnn")
        return train_classifier(
            prep, t[col].to_numpy(dtype=object), kind, out_dir, epochs=epochs, seed=seed, **kwargs
        )
    rv = None
    if "rv" in table.columns:
        rv = xr.DataArray(t["rv"].to_numpy(np.float64), dims="spectra")
    prep = preprocess(ds, recipe="tlma", rv=rv)
    lab = {k: t[k].to_numpy(np.float64) for k in TLMA_LABELS if k in t.columns}
    if "lumclass" in table.columns:
        return train_tlma_pair(
            prep,
            lab,
            t["lumclass"].to_numpy(dtype=object),
            out_dir,
            folds=folds,
            epochs=epochs,
            seed=seed,
            **kwargs,
        )
    return train_regressor(prep, lab, out_dir, folds=folds, epochs=epochs, seed=seed, **kwargs)


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
            res[kind] = train_classifier(cnn, lab, kind, out / kind, **common)
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
