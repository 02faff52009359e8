"""Figures of a run's accuracy against the simulation truth (matplotlib Figure API only).

No pyplot state: every function builds its own :class:`matplotlib.figure.Figure`, saves it
and lets it go, so the functions are safe in worker processes and notebooks alike. Colours
are the Okabe-Ito colour-blind-safe palette; every axis is labelled with its unit. The
catalog columns and selections are those of :mod:`mspec.report`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from mspec.report import (
    DMGM_CLASSES,
    TLMA_PARAMS,
    _check_table,
    _labels,
    _num,
    residual_stats,
)

__all__ = ["OKABE_ITO", "accuracy_figure", "confusion_figure"]

#: Okabe & Ito (2008) colour-blind-safe palette.
OKABE_ITO: dict[str, str] = {
    "black": "#000000",
    "orange": "#E69F00",
    "sky_blue": "#56B4E9",
    "green": "#009E73",
    "yellow": "#F0E442",
    "blue": "#0072B2",
    "vermillion": "#D55E00",
    "purple": "#CC79A7",
}
_LUM_COLOUR = {"dM": OKABE_ITO["blue"], "gM": OKABE_ITO["vermillion"]}
_LUM_NAME = {"dM": "M dwarfs (true dM)", "gM": "M giants (true gM)"}
_AXIS = {
    "teff": r"$T_\mathrm{eff}$ (K)",
    "logg": r"$\log g$ (dex)",
    "m_h": "[M/H] (dex)",
    "alpha_m": r"[$\alpha$/M] (dex)",
}
_FMT = {"teff": ".0f", "logg": ".3f", "m_h": ".3f", "alpha_m": ".3f"}


def _out_path(path, default_name: str) -> Path:
    if not isinstance(path, (str, Path)):
        raise TypeError(f"path must be a str or Path, got {type(path).__name__}")
    path = Path(path)
    if path.is_dir() or path.suffix == "":
        path = path / default_name
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def _unavailable(ax, text: str) -> None:
    ax.text(
        0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, wrap=True,
        color=OKABE_ITO["black"], fontsize=9,
    )  # fmt: skip
    ax.set_xticks([])
    ax.set_yticks([])


def _missing(cat: pd.DataFrame, cols: Sequence[str]) -> list[str]:
    return [c for c in cols if c not in cat]


def accuracy_figure(cat: pd.DataFrame, path, *, snr_min: float = 20.0, dpi: int = 110) -> Path:
    """Predicted vs true CNN-TLMA parameters and RV residuals, as a PNG.

    Rows 1-4: Teff, logg, [M/H], [alpha/M]; left column true M dwarfs, right column true M
    giants (S/N_i > ``snr_min``), predicted vs true with the 1:1 line and the Theil-Sen fit
    (its slope, the robust sigma and N in the legend). Row 5: TM RV - true RV (left) and
    LAMOST RV - true RV (right) vs true RV, for true M stars at S/N_i > ``snr_min``. A panel
    whose columns are missing says "not available" and names them.

    Parameters
    ----------
    cat : pandas.DataFrame
        The catalog (columns as in :mod:`mspec.report`), or a column table as
        :func:`mspec.report.accuracy_metrics` takes.
    path : path-like
        Output file; a directory (or a path without suffix) gets ``accuracy.png`` inside.
    snr_min : float
        S/N_i cut (exclusive); ignored, and said in the title, when ``snr_i`` is missing.
    dpi : int
        Resolution of the PNG (dots per inch).

    Returns
    -------
    pathlib.Path
        The written file.

    Raises
    ------
    TypeError
        If ``cat`` is not a DataFrame or ``path`` not path-like.
    ValueError
        For a non-finite ``snr_min`` or non-positive ``dpi``.
    """
    _check_table(cat)
    if not np.isfinite(snr_min):
        raise ValueError(f"snr_min must be finite, got {snr_min!r}")
    if not (isinstance(dpi, (int, np.integer)) and dpi > 0):
        raise ValueError(f"dpi must be a positive integer, got {dpi!r}")
    out = _out_path(path, "accuracy.png")
    n = len(cat)
    if "snr_i" in cat:
        cut = _num(cat, "snr_i") > snr_min
        cut_text = f"S/N$_i$ > {snr_min:g}"
    else:
        cut = np.ones(n, bool)
        cut_text = "all S/N (snr_i not available)"
    tclass = _labels(cat["true_class"]) if "true_class" in cat else None
    tlum = _labels(cat["true_lumclass"]) if "true_lumclass" in cat else None

    fig = Figure(figsize=(10, 21), layout="constrained")
    axes = fig.subplots(len(TLMA_PARAMS) + 1, 2)
    fig.suptitle(f"mspec accuracy vs simulation truth (true M stars, {cut_text})")

    for row, p in enumerate(TLMA_PARAMS):
        for col, lum in enumerate(DMGM_CLASSES):
            ax = axes[row, col]
            miss = _missing(cat, ["true_class", "true_lumclass", p, f"true_{p}"])
            if miss:
                _unavailable(
                    ax,
                    f"{TLMA_PARAMS[p][0]} ({lum}): not available\n"
                    f"(missing column {', '.join(miss)})",
                )
                continue
            sel = (tclass == "M") & (tlum == lum) & cut
            _param_panel(ax, p, lum, _num(cat, f"true_{p}")[sel], _num(cat, p)[sel])

    rv_panels = (("rv_tm", "TM", OKABE_ITO["blue"]), ("lamost_rv", "LAMOST", OKABE_ITO["orange"]))
    ylims = []
    for col, (rvcol, name, colour) in enumerate(rv_panels):
        ax = axes[-1, col]
        miss = _missing(cat, ["true_class", "true_rv", rvcol])
        if miss:
            _unavailable(ax, f"{name} RV: not available\n(missing column {', '.join(miss)})")
            continue
        sel = (tclass == "M") & cut
        t, r = _num(cat, "true_rv")[sel], _num(cat, rvcol)[sel]
        ok = np.isfinite(t) & np.isfinite(r)
        t, d = t[ok], (r - t)[ok]
        if d.size == 0:
            _unavailable(ax, f"{name} RV: no finite values (N = 0)")
            continue
        st = residual_stats(r[ok], t)
        ax.scatter(
            t,
            d,
            s=4,
            alpha=0.5,
            color=colour,
            rasterized=True,
            linewidths=0,
            label=f"{name} RV (N = {d.size})",
        )
        ax.axhline(0.0, color=OKABE_ITO["black"], lw=1, label="zero")
        ax.axhline(
            st["bias"],
            color=OKABE_ITO["black"],
            lw=1,
            ls="--",
            label=f"median {st['bias']:+.1f} km/s, robust σ {st['sigma']:.1f} km/s",
        )
        ax.set_xlabel("true RV (km/s)")
        ax.set_ylabel(f"{name} RV − true RV (km/s)")
        ax.set_title(f"{name} RV residuals, true M, {cut_text}")
        ax.legend(fontsize=8, loc="best", markerscale=3)
        # clip the view to the bulk so a few outliers do not hide it
        lo, hi = np.percentile(d, [0.5, 99.5])
        pad = max(5.0, 0.2 * (hi - lo))
        ylims.append((lo - pad, hi + pad))
    if ylims:  # same y range for TM and LAMOST, for comparison
        lo, hi = min(a for a, _ in ylims), max(b for _, b in ylims)
        for ax in axes[-1]:
            if ax.has_data():
                ax.set_ylim(lo, hi)
    fig.savefig(out, dpi=dpi)
    return out


def _param_panel(ax, p: str, lum: str, true: np.ndarray, pred: np.ndarray) -> None:
    label, unit = TLMA_PARAMS[p]
    ok = np.isfinite(true) & np.isfinite(pred)
    t, y = true[ok], pred[ok]
    if t.size == 0:
        _unavailable(ax, f"{label} ({lum}): no finite values (N = 0)")
        return
    st = residual_stats(y, t)
    colour = _LUM_COLOUR[lum]
    # view the bulk (0.5-99.5 percentiles of both axes) so a few wild values do not hide it
    both = np.concatenate([t, y])
    lo, hi = (float(v) for v in np.percentile(both, [0.5, 99.5]))
    pad = 0.05 * (hi - lo) if hi > lo else 0.5
    lo, hi = lo - pad, hi + pad
    n_out = int(np.sum((t < lo) | (t > hi) | (y < lo) | (y > hi)))
    outside = f" ({n_out} outside the view)" if n_out else ""
    ax.scatter(
        t,
        y,
        s=4,
        alpha=0.5,
        color=colour,
        rasterized=True,
        linewidths=0,
        label=f"{_LUM_NAME[lum]}, N = {t.size}{outside}",
    )
    xs = np.array([lo, hi])
    ax.plot(xs, xs, color=OKABE_ITO["black"], lw=1, label="1:1")
    if st["slope"] is not None:
        f = _FMT[p]
        ax.plot(
            xs,
            st["intercept"] + st["slope"] * xs,
            color=OKABE_ITO["black"],
            lw=1.2,
            ls="--",
            label=f"Theil–Sen fit: slope {st['slope']:.3f}, "
            f"robust σ {format(st['sigma'], f)} {unit}",
        )
    ax.set_xlim(lo, hi)
    ax.set_ylim(lo, hi)
    ax.set_xlabel(f"true {_AXIS[p]}")
    ax.set_ylabel(f"CNN-TLMA {_AXIS[p]}")
    ax.set_title(f"{label}, {_LUM_NAME[lum]}")
    ax.legend(fontsize=8, loc="upper left", markerscale=3)


def confusion_figure(
    cm, classes: Sequence[str] | None, path, *, title: str | None = None, dpi: int = 110
) -> Path:
    """A confusion matrix as a PNG: colour = fraction of the true class, text = counts.

    Parameters
    ----------
    cm : pandas.DataFrame, dict of dict or 2-D array
        Counts, rows true and columns predicted: a DataFrame such as
        :func:`mspec.report.confusion_matrix` returns, a nested dict ``{true: {pred: n}}``
        as in ``accuracy_metrics(...)["classification"][...]["confusion"]``, or an array
        whose rows and columns are ``classes``.
    classes : sequence of str or None
        Row order (true classes). None: the DataFrame/dict order. Extra predicted columns of
        a DataFrame or dict (e.g. ``"(none)"``) are kept after these.
    path : path-like
        Output file; a directory (or a path without suffix) gets ``confusion.png`` inside.
    title : str, optional
        Axes title.
    dpi : int
        Resolution of the PNG (dots per inch).

    Returns
    -------
    pathlib.Path
        The written file.
    """
    if isinstance(cm, Mapping):
        cm = pd.DataFrame({k: dict(v) for k, v in cm.items()}).T.fillna(0)
    if isinstance(cm, pd.DataFrame):
        rows = list(cm.index) if classes is None else [str(c) for c in classes]
        missing = [c for c in rows if c not in cm.index]
        if missing:
            raise ValueError(f"classes {missing} are not rows of cm")
        cols = rows + [c for c in cm.columns if c not in rows]
        cm = cm.reindex(index=rows, columns=cols, fill_value=0)
        counts = cm.to_numpy(dtype=np.float64)
    else:
        counts = np.asarray(cm, dtype=np.float64)
        if classes is None:
            raise ValueError("classes must be given when cm is an array")
        rows = cols = [str(c) for c in classes]
        if counts.shape != (len(rows), len(cols)):
            raise ValueError(
                f"cm must be a {len(rows)}x{len(cols)} array for {len(rows)} classes, "
                f"got shape {counts.shape}"
            )
    if not (isinstance(dpi, (int, np.integer)) and dpi > 0):
        raise ValueError(f"dpi must be a positive integer, got {dpi!r}")
    out = _out_path(path, "confusion.png")
    tot = counts.sum(axis=1, keepdims=True)
    frac = np.divide(counts, tot, out=np.zeros_like(counts), where=tot > 0)
    size = 1.2 + 0.7 * max(len(cols), 2)
    fig = Figure(figsize=(size + 1.5, 1.2 + 0.7 * max(len(rows), 2) + 0.8), layout="constrained")
    ax = fig.subplots()
    im = ax.imshow(frac, cmap="viridis", vmin=0, vmax=1, aspect="auto")
    for i in range(len(rows)):
        for j in range(len(cols)):
            ax.text(
                j,
                i,
                f"{int(counts[i, j])}",
                ha="center",
                va="center",
                fontsize=8,
                color="black" if frac[i, j] > 0.6 else "white",
            )
    ax.set_xticks(range(len(cols)), cols, rotation=45, ha="right")
    ax.set_yticks(range(len(rows)), rows)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    if title:
        ax.set_title(title)
    fig.colorbar(im, ax=ax, label="fraction of the true class")
    fig.savefig(out, dpi=dpi)
    return out
