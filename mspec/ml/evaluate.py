"""Accuracy runs of the CNNs: train on a simulated survey, test on a fresh one and on real data.

Reproduces the CNN figures of ``docs/accuracy.md``::

    python -m mspec.ml.evaluate train --n 12000 --out models --epochs 40 --folds 10
    python -m mspec.ml.evaluate test  --models models --n 3000 --seed 99
    python -m mspec.ml.evaluate real  --models models
    python -m mspec.ml.evaluate finetune-cv --models ~/.cache/mspec/models/sim-2-r3

``train`` simulates a class-balanced survey (every CNN-SPT class, WDs, dM and gM equally
represented, S/N_i drawn log-uniformly in 5-150) and calls
:func:`mspec.ml.train.train_all_demo`; ``test`` applies the models to an independent default-mix
survey and reports accuracies by S/N; ``real`` applies them to the real LAMOST spectra in
``../shared/data`` (see :func:`evaluate_real`); ``finetune-cv`` cross-validates fine-tuning the
dM CNN-TLMA ensemble on the real DR7 M dwarfs (:func:`finetune_cross_validation`).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import xarray as xr

from mspec.ml.recipe import BALANCED_MIX

__all__ = [
    "BALANCED_MIX",
    "CLASS_TEFF_RANGES",
    "SUBTYPE_SCALES",
    "STAR_SEQUENCE",
    "SNR_BINS",
    "simulate_training_survey",
    "evaluate_simulated",
    "evaluate_real",
    "boundary_distance",
    "spt_accuracy_report",
    "binary_accuracy_report",
    "classifier_accuracy",
    "tlma_accuracy",
    "inference_speed",
    "PLACEHOLDER_FEH",
    "LIT_TEFF_SIGMA",
    "stratified_folds",
    "label_noise_ceiling",
    "three_cornered_hat",
    "photometric_tracer",
    "M_DWARF_R_I",
    "finetune_cross_validation",
]


def simulate_training_survey(n: int, seed: int = 0, snr=(5.0, 150.0), mix=None) -> xr.Dataset:
    """A class-balanced simulated survey for training (see module docstring)."""
    from mspec.simulate import simulate_survey

    return simulate_survey(int(n), seed=seed, mix=mix or BALANCED_MIX, snr=snr)


def _predict_all(ds: xr.Dataset, models: Path, rv, lumclass=None, tlma=True) -> xr.Dataset:
    from mspec.ml.infer import predict
    from mspec.preprocessing.steps import preprocess

    cnn = preprocess(ds, recipe="cnn", merge=False)
    out = xr.Dataset(coords=ds.coords)
    for kind in ("spt", "wdm", "dmgm"):
        if (models / kind / "model.json").exists():
            res = predict(cnn, models / kind)
            out[f"{kind}_prob"] = res[f"{kind}_prob"]
            out[f"{kind}_class"] = res[f"{kind}_class"]
    if tlma and (models / "tlma" / "model.json").exists():
        tl = preprocess(ds.assign(_rv=("spectra", np.asarray(rv, float))), recipe="tlma", rv="_rv")
        lum = lumclass if lumclass is not None else out.get("dmgm_class")
        res = predict(tl, models / "tlma", lumclass=lum)
        for k in ("teff", "logg", "m_h", "alpha_m"):
            out[k], out[f"{k}_err"] = res[k], res[f"{k}_err"]
    return out.compute()


def evaluate_simulated(models, n: int = 3000, seed: int = 99) -> dict:
    """Accuracy of trained models on an independent default-mix simulated survey.

    CNN-TLMA is applied with the true dwarf/giant class (its own accuracy; CNN-dMgM's is
    reported separately) and the true RV; its errors are given for dwarfs and giants at
    S/N_i > 20 and 10-20.
    """
    from mspec.simulate import simulate_survey

    models = Path(models)
    ds = simulate_survey(int(n), seed=seed)
    out = _predict_all(ds, models, ds["true_rv"].values, lumclass=ds["true_lumclass"])
    tc = ds["true_class"].values.astype(str)
    tl = ds["true_lumclass"].values.astype(str)
    snr = ds["snr_i"].values
    res: dict = {"n": int(n), "seed": seed}
    bins = [(0, 10), (10, 20), (20, 1e9)]
    for kind, truth, keep in (
        ("spt", tc, tc != "WD"),
        ("wdm", tc, np.isin(tc, ["WD", "M"])),
        ("dmgm", tl, np.isin(tl, ["dM", "gM"])),
    ):
        if f"{kind}_class" not in out:
            continue
        ok = out[f"{kind}_class"].values == truth
        r = {"all": float(ok[keep].mean()), "n": int(keep.sum())}
        for lo, hi in bins:
            sel = keep & (snr > lo) & (snr <= hi)
            r[f"snr_i {lo}-{hi if hi < 1e9 else 'inf'}"] = (
                float(ok[sel].mean()) if sel.any() else None
            )
        res[kind] = r
    if "teff" in out:
        for lo, hi, key in ((20, 1e9, "tlma_snr_i_gt_20"), (10, 20, "tlma_snr_i_10_20")):
            t = {}
            for part in ("dM", "gM"):
                sel = (tl == part) & (snr > lo) & (snr <= hi) & np.isfinite(out["teff"].values)
                d = {}
                for k in ("teff", "logg", "m_h", "alpha_m"):
                    diff = out[k].values[sel] - ds[f"true_{k}"].values[sel]
                    if not sel.any():
                        continue
                    d[k] = {
                        "rms": float(np.sqrt(np.mean(diff**2))),
                        "bias": float(np.mean(diff)),
                        "p16_p84_half": float(np.diff(np.percentile(diff, [16, 84]))[0] / 2),
                        "median_err": float(np.median(out[f"{k}_err"].values[sel])),
                    }
                d["n"] = int(sel.sum())
                t[part] = d
            res[key] = t
    return res


def _real_files():
    from mspec.data import shared_data_dir

    root = shared_data_dir()
    return sorted(p for p in root.glob("lamost_*/*.fits*"))


def evaluate_real(models) -> dict:
    """Apply simulation-trained models to the real LAMOST spectra in ``../shared/data``.

    Returns per file the LAMOST class/subclass and what CNN-SPT, CNN-WDM, CNN-dMgM say, plus
    CNN-TLMA (dM ensemble, rest frame from the LAMOST RV, 0 where LAMOST has none) for the
    DR7 M dwarfs against the literature labels of ``lamost_dr7_mdwarfs/labels.csv``:
    ``dr7_tlma_teff`` (all 36), ``dr7_tlma_teff_called_m`` (those CNN-SPT calls M),
    ``dr7_tlma_m_h`` and ``dr7_tlma_m_h_measured`` (without the placeholder [Fe/H] = -0.05
    rows), each with ``n``, ``bias``, ``median``, ``rms``, ``std``, ``robust_sigma``
    (1.4826 MAD), ``corr``, ``slope_theil_sen``, ``slope_ols`` (prediction on literature)
    and ``pred_range`` (K or dex); ``dr7_three_cornered_hat`` (``all``, ``called_m``):
    :func:`three_cornered_hat` of the literature Teff, the CNN-TLMA Teff and the
    input-catalogue r - i (:func:`photometric_tracer`) of the stars that have all three.
    """
    import pandas as pd

    from mspec.data import shared_data_dir
    from mspec.io import read_lamost

    models = Path(models)
    dss, names = [], []
    for f in _real_files():
        try:
            dss.append(read_lamost(f))
            names.append(f)
        except Exception as e:  # a bad real file is reported, not fatal
            print(f"skip {f.name}: {e}")
    ds = xr.concat(dss, dim="spectra", coords="minimal", compat="override")
    rv = np.nan_to_num(ds["lamost_rv"].values.astype(float), nan=0.0)
    out = _predict_all(ds, models, rv)
    rows = []
    for i, f in enumerate(names):
        row = {
            "file": f.name,
            "folder": f.parent.name,
            "lamost_class": str(ds["lamost_class"].values[i]),
            "lamost_subclass": str(ds["lamost_subclass"].values[i]),
            "snr_i": float(ds["snr_i"].values[i]),
        }
        for kind in ("spt", "wdm", "dmgm"):
            if f"{kind}_class" in out:
                row[kind] = str(out[f"{kind}_class"].values[i])
                row[f"{kind}_pmax"] = float(np.nanmax(out[f"{kind}_prob"].values[i]))
        if "teff" in out:
            row["teff"] = float(out["teff"].values[i])
            row["teff_err"] = float(out["teff_err"].values[i])
        rows.append(row)
    table = pd.DataFrame(rows)
    lab = pd.read_csv(shared_data_dir() / "lamost_dr7_mdwarfs" / "labels.csv")
    dr7 = table[table.folder == "lamost_dr7_mdwarfs"].merge(
        lab, left_on="file", right_on="file_name", how="left"
    )
    res = {"table": table.to_dict(orient="records")}
    if "spt" in table:
        res["dr7_mdwarfs_called_M"] = float((dr7["spt"] == "M").mean())
        res["dr7_n"] = len(dr7)
        res["dr7_spt_counts"] = dr7["spt"].value_counts().to_dict()
    if "teff" in dr7:
        # CNN-TLMA with the dM ensemble for every DR7 M dwarf (they are all dwarfs)
        tl_dm = _tlma_part(ds, models, rv, "dM")
        d = tl_dm[[n.parent.name == "lamost_dr7_mdwarfs" for n in names]]
        dr7["teff_dM"] = d[:, 0]
        dr7["m_h_dM"] = d[:, 2]
        res["dr7_tlma_teff"] = _versus_literature(dr7["teff_dM"], dr7["teff_lit"])
        res["dr7_tlma_teff_called_m"] = _versus_literature(
            dr7["teff_dM"][dr7["spt"] == "M"], dr7["teff_lit"][dr7["spt"] == "M"]
        )
        res["dr7_tlma_m_h"] = _versus_literature(dr7["m_h_dM"], dr7["feh_lit"])
        # 22 of the 36 literature [Fe/H] are the placeholder -0.05 (labels README)
        real = dr7["feh_lit"] != -0.05
        res["dr7_tlma_m_h_measured"] = _versus_literature(dr7["m_h_dM"][real], dr7["feh_lit"][real])
        # an independent Teff tracer (input-catalogue r - i) measures the labels' noise and
        # the CNN's slope on the true scale, free of the labels' regression dilution
        dr7["r_i"] = photometric_tracer([n for n in names if n.parent.name == "lamost_dr7_mdwarfs"])
        res["dr7_three_cornered_hat"] = {
            name: three_cornered_hat(d["teff_lit"], d["teff_dM"], d["r_i"])
            for name, d in (("all", dr7), ("called_m", dr7[dr7["spt"] == "M"]))
        }
        cols = ["file", "snr_r", "teff_lit", "teff_dM", "feh_lit", "m_h_dM", "r_i", "spt", "dmgm"]
        res["dr7_table"] = dr7[cols].to_dict(orient="records")
    return res


def _versus_literature(pred, lit) -> dict:
    """Prediction against literature labels: offsets, robust sigma, slopes, correlation."""
    from scipy.stats import theilslopes

    p, t = np.asarray(pred, dtype=np.float64), np.asarray(lit, dtype=np.float64)
    ok = np.isfinite(p) & np.isfinite(t)
    p, t = p[ok], t[ok]
    d = p - t
    out = {"n": int(ok.sum())}
    if d.size < 3:
        return out
    out.update(
        bias=float(d.mean()),
        median=float(np.median(d)),
        rms=float(np.sqrt(np.mean(d**2))),
        std=float(d.std()),
        robust_sigma=float(1.4826 * np.median(np.abs(d - np.median(d)))),
        corr=float(np.corrcoef(p, t)[0, 1]) if np.ptp(p) > 0 and np.ptp(t) > 0 else None,
        slope_theil_sen=float(theilslopes(p, t)[0]) if np.ptp(t) > 0 else None,
        slope_ols=float(np.polyfit(t, p, 1)[0]) if np.ptp(t) > 0 else None,
        pred_range=[float(p.min()), float(p.max())],
    )
    return out


def _tlma_part(ds, models, rv, part) -> np.ndarray:
    from mspec.ml.infer import predict_array
    from mspec.preprocessing.steps import preprocess

    tl = preprocess(ds.assign(_rv=("spectra", rv)), recipe="tlma", rv="_rv", merge=False)
    return predict_array(tl["flux_grid"].values, Path(models) / "tlma" / part)


# --------------------------------------------------------------------------------------------
# CNN accuracy away from class boundaries (issue 18)
# --------------------------------------------------------------------------------------------
#: Teff ranges (K) the simulator draws each CNN-SPT star class from (mspec.simulate.survey):
#: the classes abut, so a spectrum next to a boundary is ambiguous by construction. M dwarfs
#: reach up to 4050 K (abutting K), M giants up to 4000 K.
CLASS_TEFF_RANGES = {
    "OB": (10500.0, 20000.0),
    "A": (7400.0, 10000.0),
    "F": (6000.0, 7400.0),
    "G": (5300.0, 6000.0),
    "K": (4050.0, 5300.0),
    "dM": (2350.0, 4050.0),
    "gM": (3050.0, 4000.0),
}
#: (Teff of subtype 0, Teff of subtype 9) of the LAMOST-style subtype scale of each hot class
#: (as mspec.simulate.survey names subtypes): one subtype = log(t0 / t9) / 9 in ln Teff.
SUBTYPE_SCALES = {
    "OB": (30000.0, 10001.0),
    "A": (10000.0, 7301.0),
    "F": (7300.0, 6001.0),
    "G": (6000.0, 5301.0),
    "K": (5300.0, 3951.0),
}
#: CNN-SPT star classes in Teff order; neighbours in this list are adjacent types.
STAR_SEQUENCE = ("OB", "A", "F", "G", "K", "M")
#: Default S/N_i bins of the accuracy reports.
SNR_BINS = ((0.0, 10.0), (10.0, 20.0), (20.0, 50.0), (50.0, np.inf))


def boundary_distance(true_class, true_teff, true_lumclass=None) -> np.ndarray:
    """Distance of each simulated spectrum from the nearest class boundary, in subtypes.

    The simulator draws the CNN-SPT star classes over abutting Teff ranges
    (:data:`CLASS_TEFF_RANGES`). The distance is measured on the star's own class's subtype
    scale: log Teff steps of :data:`SUBTYPE_SCALES` for OB-K, and the simulator's M-dwarf /
    M-giant subtype-Teff relations (:func:`mspec.simulate.models.dwarf_subtype`,
    ``giant_subtype``) for M stars, from the class edges that touch another class (OB's hot
    end and M's cool end are not boundaries).

    Parameters
    ----------
    true_class : array-like of str
        ``true_class`` of a simulated survey.
    true_teff : array-like of float
        ``true_teff`` (K).
    true_lumclass : array-like of str, optional
        ``true_lumclass`` (``"dM"``/``"gM"``): giants use the giant scale. Default: all M are
        dwarfs.

    Returns
    -------
    numpy.ndarray of float
        Subtypes to the nearest boundary (>= 0); ``inf`` for classes without a Teff boundary
        (GALAXY, QSO, WD) and NaN where ``true_teff`` is not finite for a star class.
    """
    from mspec.simulate import models as sm

    cls = np.asarray(true_class).astype(str)
    t = np.asarray(true_teff, dtype=np.float64)
    if cls.shape != t.shape or cls.ndim != 1:
        raise ValueError("true_class and true_teff must be 1-D arrays of the same length")
    lum = (
        np.asarray(true_lumclass).astype(str)
        if true_lumclass is not None
        else np.where(cls == "M", "dM", "")
    )
    if lum.shape != cls.shape:
        raise ValueError("true_lumclass must have one value per spectrum")
    out = np.full(cls.size, np.inf)
    with np.errstate(invalid="ignore", divide="ignore"):
        for c, (t0, t9) in SUBTYPE_SCALES.items():
            sel = cls == c
            if not sel.any():
                continue
            w = np.log(t0 / t9) / 9.0
            lo, hi = CLASS_TEFF_RANGES[c]
            d_lo = np.log(t[sel] / lo) / w  # towards the cooler neighbour
            d_hi = np.log(hi / t[sel]) / w if c != "OB" else np.full(sel.sum(), np.inf)
            out[sel] = np.maximum(np.minimum(d_lo, d_hi), 0.0)
        dm = (cls == "M") & (lum != "gM")
        out[dm] = np.maximum(sm.dwarf_subtype(t[dm]) - sm.dwarf_subtype(4050.0), 0.0)
        gm = (cls == "M") & (lum == "gM")
        out[gm] = np.maximum(sm.giant_subtype(t[gm]) - sm.giant_subtype(4000.0), 0.0)
    star = np.isin(cls, STAR_SEQUENCE)
    out[star & ~np.isfinite(t)] = np.nan
    return out


def _adjacent(a: str, b: str) -> bool:
    if a in STAR_SEQUENCE and b in STAR_SEQUENCE:
        return abs(STAR_SEQUENCE.index(a) - STAR_SEQUENCE.index(b)) == 1
    return False


def _bin_label(lo, hi) -> str:
    return f"{lo:g}-{hi:g}" if np.isfinite(hi) else f">{lo:g}"


def spt_accuracy_report(
    true_class, pred_class, snr_i, distance, *, snr_bins=SNR_BINS, min_distance: float = 1.0
) -> dict:
    """CNN-SPT accuracy on all spectra and away from class boundaries, per S/N_i bin.

    Parameters
    ----------
    true_class, pred_class : array-like of str
        True and predicted CNN-SPT classes (spectra whose true class is not one of CNN-SPT's,
        e.g. WD, are left out).
    snr_i : array-like of float
        S/N in the i band.
    distance : array-like of float
        :func:`boundary_distance` (subtypes).
    snr_bins : sequence of (lo, hi)
        S/N_i bins (lo < S/N_i <= hi); one more entry ``"all"`` covers every spectrum and
        ``">20"`` every S/N_i > 20.
    min_distance : float
        "Away from boundaries" means more than ``min_distance`` subtypes from one.

    Returns
    -------
    dict
        Per bin label: ``n``, ``accuracy`` (all spectra), ``n_away``, ``accuracy_away``,
        ``n_errors``, ``errors_adjacent`` (fraction of the star-class errors that are between
        adjacent types), ``errors_near_boundary`` (fraction of all errors within
        ``min_distance`` of a boundary), ``confusions`` (``"true->pred": count``, every error),
        ``non_adjacent`` (the star-class confusions that are not between adjacent types).
    """
    from mspec.ml.models import CLASSES

    tc = np.asarray(true_class).astype(str)
    pc = np.asarray(pred_class).astype(str)
    snr = np.asarray(snr_i, dtype=np.float64)
    dist = np.asarray(distance, dtype=np.float64)
    if not (tc.shape == pc.shape == snr.shape == dist.shape):
        raise ValueError("true_class, pred_class, snr_i and distance must have the same shape")
    keep = np.isin(tc, CLASSES["spt"])
    bins = [(_bin_label(lo, hi), (snr > lo) & (snr <= hi)) for lo, hi in snr_bins]
    bins += [(">20", snr > 20), ("all", np.ones(tc.size, bool))]
    out = {}
    for label, sel in bins:
        s = sel & keep
        ok = tc[s] == pc[s]
        away = dist[s] > min_distance
        err = ~ok
        star_err = err & np.isin(tc[s], STAR_SEQUENCE) & np.isin(pc[s], STAR_SEQUENCE)
        adj = np.array([_adjacent(a, b) for a, b in zip(tc[s][star_err], pc[s][star_err])])
        conf: dict[str, int] = {}
        for a, b in zip(tc[s][err], pc[s][err]):
            conf[f"{a}->{b}"] = conf.get(f"{a}->{b}", 0) + 1
        non_adj = {k: v for k, v in conf.items() if not _adjacent(*k.split("->"))
                   and k.split("->")[0] in STAR_SEQUENCE and k.split("->")[1] in STAR_SEQUENCE}  # fmt: skip
        out[label] = {
            "n": int(s.sum()),
            "accuracy": float(ok.mean()) if s.any() else None,
            "n_away": int(away.sum()),
            "accuracy_away": float(ok[away].mean()) if away.any() else None,
            "n_errors": int(err.sum()),
            "errors_adjacent": float(adj.mean()) if adj.size else None,
            "errors_near_boundary": float((dist[s][err] <= min_distance).mean())
            if err.any()
            else None,
            "confusions": dict(sorted(conf.items(), key=lambda kv: -kv[1])),
            "non_adjacent": non_adj,
        }
    return out


def binary_accuracy_report(truth, pred, snr_i, *, classes, snr_bins=SNR_BINS) -> dict:
    """Accuracy of a two-class CNN (CNN-WDM, CNN-dMgM) per S/N_i bin.

    Parameters
    ----------
    truth, pred : array-like of str
        True and predicted classes; spectra whose truth is not in ``classes`` are left out.
    snr_i : array-like of float
        S/N in the i band.
    classes : sequence of str
        The network's classes.
    snr_bins : sequence of (lo, hi)
        As in :func:`spt_accuracy_report`.

    Returns
    -------
    dict
        Per bin label (and ``">20"``, ``"all"``): ``n``, ``accuracy``, ``recall`` per class.
    """
    t = np.asarray(truth).astype(str)
    p = np.asarray(pred).astype(str)
    snr = np.asarray(snr_i, dtype=np.float64)
    keep = np.isin(t, list(classes))
    bins = [(_bin_label(lo, hi), (snr > lo) & (snr <= hi)) for lo, hi in snr_bins]
    bins += [(">20", snr > 20), ("all", np.ones(t.size, bool))]
    out = {}
    for label, sel in bins:
        s = sel & keep
        ok = t[s] == p[s]
        out[label] = {
            "n": int(s.sum()),
            "accuracy": float(ok.mean()) if s.any() else None,
            "recall": {
                c: (float(ok[t[s] == c].mean()) if (t[s] == c).any() else None) for c in classes
            },
        }
    return out


def inference_speed(model_dir, *, n: int = 4096, batch_size: int = 1024, repeats: int = 3) -> dict:
    """CPU inference speed of one model directory on one torch thread.

    Parameters
    ----------
    model_dir : path-like
        A single model (classifier or one CNN-TLMA ensemble; all members are run).
    n : int
        Spectra per timed pass (random z-scored 5000-pixel inputs).
    batch_size : int
        Spectra per forward pass.
    repeats : int
        Timed passes; the fastest is reported (the machine may be shared).

    Returns
    -------
    dict
        ``spectra_per_s_per_core`` (best pass, wall clock), ``median_spectra_per_s``,
        ``spectra_per_cpu_s`` (per second of this process's CPU time: the per-core speed
        when the machine is shared), ``members``, ``n``, ``batch_size``, ``torch_threads``.
    """
    import torch

    from mspec.ml.infer import load_ref, predict_array

    ref = load_ref(model_dir)
    x = np.random.default_rng(0).standard_normal((int(n), ref.meta["arch"]["n_in"]))
    x = x.astype(np.float32)
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        predict_array(x[:batch_size], model_dir, batch_size=batch_size, device="cpu")  # warm-up
        rates, cpu_rates = [], []
        for _ in range(int(repeats)):
            t0, c0 = time.perf_counter(), time.process_time()
            predict_array(x, model_dir, batch_size=batch_size, device="cpu")
            rates.append(n / (time.perf_counter() - t0))
            cpu_rates.append(n / max(time.process_time() - c0, 1e-9))
    finally:
        torch.set_num_threads(old)
    return {
        "spectra_per_s_per_core": float(max(rates)),
        "median_spectra_per_s": float(np.median(rates)),
        "spectra_per_cpu_s": float(max(cpu_rates)),
        "members": len(ref.meta["members"]),
        "n": int(n),
        "batch_size": int(batch_size),
        "torch_threads": 1,
    }


def classifier_accuracy(models, ds: xr.Dataset | None = None, *, n: int = 4000, seed: int = 99,
                        snr=(5.0, 150.0), mix=None, min_distance: float = 1.0) -> dict:  # fmt: skip
    """CNN-SPT, CNN-WDM and CNN-dMgM accuracy on a simulated survey, two ways, per S/N_i bin.

    Parameters
    ----------
    models : path-like
        Directory with ``spt/``, ``wdm/``, ``dmgm/`` (those present are evaluated).
    ds : xarray.Dataset, optional
        A simulated survey (with ``true_*``); default: ``simulate_survey(n, seed=seed,
        mix=mix or BALANCED_MIX, snr=snr)``, an independent class-balanced survey with S/N_i
        log-uniform in ``snr``.
    n, seed, snr, mix
        The survey to simulate when ``ds`` is not given.
    min_distance : float
        Subtypes from a class boundary beyond which a spectrum counts as "away".

    Returns
    -------
    dict
        ``spt`` (:func:`spt_accuracy_report`), ``wdm`` and ``dmgm``
        (:func:`binary_accuracy_report`, on WD + M and dM + gM spectra), ``n``, ``seed``.
    """
    from mspec.ml.models import CLASSES

    models = Path(models)
    if ds is None:
        from mspec.simulate import simulate_survey

        ds = simulate_survey(int(n), seed=seed, mix=mix or BALANCED_MIX, snr=snr)
    for v in ("true_class", "true_teff", "true_lumclass", "snr_i"):
        if v not in ds:
            raise ValueError(f"ds has no {v!r}: classifier_accuracy needs a simulated survey")
    out = _predict_all(ds, models, rv=np.zeros(ds.sizes["spectra"]), tlma=False)
    tc = ds["true_class"].values.astype(str)
    tl = ds["true_lumclass"].values.astype(str)
    snr_i = ds["snr_i"].values
    res: dict = {"n": int(ds.sizes["spectra"]), "seed": ds.attrs.get("seed", seed)}
    if "spt_class" in out:
        dist = boundary_distance(tc, ds["true_teff"].values, tl)
        res["spt"] = spt_accuracy_report(tc, out["spt_class"].values, snr_i, dist,
                                         min_distance=min_distance)  # fmt: skip
    if "wdm_class" in out:
        res["wdm"] = binary_accuracy_report(tc, out["wdm_class"].values, snr_i,
                                            classes=CLASSES["wdm"])  # fmt: skip
    if "dmgm_class" in out:
        res["dmgm"] = binary_accuracy_report(tl, out["dmgm_class"].values, snr_i,
                                             classes=CLASSES["dmgm"])  # fmt: skip
    return res


def _robust_sigma(d: np.ndarray) -> float:
    return float(1.4826 * np.median(np.abs(d - np.median(d)))) if d.size else float("nan")


def tlma_accuracy(models, ds: xr.Dataset | None = None, *, n: int = 3000, seed: int = 99,
                  snr=(5.0, 150.0), mix=None, snr_bins=SNR_BINS) -> dict:  # fmt: skip
    """CNN-TLMA accuracy and error calibration on a simulated survey, per part and S/N_i bin.

    The dM and gM ensembles are applied with the true dwarf/giant class and in the true rest
    frame (their own accuracy; CNN-dMgM's and the RV's are measured separately).

    Parameters
    ----------
    models : path-like
        Directory with ``tlma/`` (a dM/gM pair), or the pair directory itself.
    ds : xarray.Dataset, optional
        A simulated survey with ``true_*``; default ``simulate_survey(n, seed=seed,
        mix=mix or {"dM": 0.8, "gM": 0.2}, snr=snr)`` (independent of any training survey
        as long as ``seed`` differs).
    n, seed, snr, mix
        The survey to simulate when ``ds`` is not given.
    snr_bins : sequence of (lo, hi)
        S/N_i bins (lo < S/N_i <= hi); ``">20"`` and ``"all"`` are added.

    Returns
    -------
    dict
        ``{"dM": {bin: {"n": int, label: {"sigma", "bias", "rms", "pull", "pull_raw",
        "median_err", "median_err_ens"}}}, "gM": ..., "n", "seed"}``: ``sigma`` is the
        robust std (1.4826 MAD) of prediction - truth (K or dex), ``bias`` its median,
        ``pull`` the std of (prediction - truth) / calibrated error (``<p>_err``),
        ``pull_raw`` the same with the ensemble std (``<p>_err_ens``).
    """
    from mspec.ml.calibrate import pull_std
    from mspec.ml.infer import predict
    from mspec.ml.models import TLMA_LABELS
    from mspec.preprocessing.steps import preprocess

    models = Path(models)
    pair = models / "tlma" if (models / "tlma" / "model.json").exists() else models
    if not (pair / "model.json").exists():
        raise ValueError(f"models has no CNN-TLMA pair (tlma/model.json): {str(models)!r}")
    if ds is None:
        from mspec.simulate import simulate_survey

        ds = simulate_survey(int(n), seed=seed, mix=mix or {"dM": 0.8, "gM": 0.2}, snr=snr)
    for v in ("true_lumclass", "true_rv", "snr_i", *(f"true_{k}" for k in TLMA_LABELS)):
        if v not in ds:
            raise ValueError(f"ds has no {v!r}: tlma_accuracy needs a simulated survey")
    tl = preprocess(ds, recipe="tlma", rv=ds["true_rv"], merge=False)
    res = predict(tl, pair, lumclass=ds["true_lumclass"]).compute()
    lum = ds["true_lumclass"].values.astype(str)
    snr_i = ds["snr_i"].values
    bins = [(_bin_label(lo, hi), (snr_i > lo) & (snr_i <= hi)) for lo, hi in snr_bins]
    bins += [(">20", snr_i > 20), ("all", np.ones(snr_i.size, bool))]
    out: dict = {"n": int(ds.sizes["spectra"]), "seed": ds.attrs.get("seed", seed)}
    for part in ("dM", "gM"):
        rows = {}
        for label, sel in bins:
            s = sel & (lum == part) & np.isfinite(res["teff"].values)
            r: dict = {"n": int(s.sum())}
            for k in TLMA_LABELS:
                pred, true = res[k].values[s], ds[f"true_{k}"].values[s]
                d = pred - true
                r[k] = {
                    "sigma": _robust_sigma(d),
                    "bias": float(np.median(d)) if d.size else float("nan"),
                    "rms": float(np.sqrt(np.mean(d**2))) if d.size else float("nan"),
                    "pull": pull_std(pred, true, res[f"{k}_err"].values[s]) if d.size else None,
                    "pull_raw": pull_std(pred, true, res[f"{k}_err_ens"].values[s])
                    if d.size
                    else None,
                    "median_err": float(np.median(res[f"{k}_err"].values[s])) if d.size else None,
                    "median_err_ens": float(np.median(res[f"{k}_err_ens"].values[s]))
                    if d.size
                    else None,
                }
            rows[label] = r
        out[part] = rows
    return out


# --------------------------------------------------------------------------------------------
# Fine-tuning on real labelled spectra, cross-validated (issue 18)
# --------------------------------------------------------------------------------------------
#: The literature [Fe/H] that labels.csv uses as a placeholder (22 of its 36 rows; labels
#: README): not a measurement, never trained on nor scored.
PLACEHOLDER_FEH = -0.05
#: Robust scatter (K) of the DR7 M dwarfs' literature Teff about their CaH2/CaH3/TiO5 index
#: relation (docs/accuracy.md, "Simulation to real"): an upper bound on their label noise.
LIT_TEFF_SIGMA = 153.0


def _dm_ensemble(models) -> Path:
    """The dM CNN-TLMA ensemble of a model directory, a dM/gM pair or an ensemble."""
    from mspec.ml.io import read_metadata

    models = Path(models)
    d = models / "tlma" if (models / "tlma" / "model.json").exists() else models
    meta = read_metadata(d)
    if meta["kind"] == "tlma_pair":
        if "dM" not in meta["parts"]:
            raise ValueError(f"the CNN-TLMA pair {str(d)!r} has no dM ensemble")
        d = d / meta["parts"]["dM"]
        meta = read_metadata(d)
    if meta["kind"] != "tlma":
        raise ValueError(f"{str(models)!r} holds no CNN-TLMA ensemble (kind {meta['kind']!r})")
    return d


def stratified_folds(values, k: int, seed: int) -> np.ndarray:
    """Fold of each item (0..k-1) so that every fold spans the range of ``values``.

    The items are sorted by ``values`` (ties in random order) and each run of ``k``
    consecutive items is dealt one to each fold in random order (the last, shorter run to a
    random subset of folds): fold sizes differ by at most one.

    Parameters
    ----------
    values : array-like of float
        The stratifying quantity (here literature Teff, K).
    k : int
        Number of folds (2 <= k <= number of items).
    seed : int
        Seeds the tie-breaks and the dealing.

    Returns
    -------
    numpy.ndarray of int
    """
    v = np.asarray(values, dtype=np.float64)
    if not 2 <= int(k) <= v.size:
        raise ValueError(f"k must be in [2, {v.size}], got {k}")
    rng = np.random.default_rng(seed)
    order = np.lexsort((rng.random(v.size), v))
    fold = np.empty(v.size, dtype=np.int64)
    for start in range(0, v.size, int(k)):
        block = order[start : start + int(k)]
        fold[block] = rng.permutation(int(k))[: block.size]
    return fold


def label_noise_ceiling(lit, sigma: float, *, n_mc: int = 4000, seed: int = 0) -> dict:
    """What a perfect predictor would score against labels with Gaussian noise ``sigma``.

    With labels L = T + e (e ~ N(0, sigma), independent of the true value T), a predictor that
    returns T exactly scatters about L by ``sigma`` and its slope on L is attenuated to
    ``var(T) / var(L) = 1 - sigma**2 / var(L)`` (regression dilution), its correlation with L
    to the square root of that. ``var(L)`` is measured on ``lit``; the Monte Carlo draws
    ``len(lit)`` true values from the literature values shrunk to ``var(T)``, adds the noise
    and gives the spread of the Theil-Sen slope, robust sigma and correlation on a sample of
    this size.

    Parameters
    ----------
    lit : array-like of float
        The literature labels of the test stars (e.g. Teff, K).
    sigma : float
        Label noise (same unit).
    n_mc : int
        Monte Carlo samples.
    seed : int
        Monte Carlo seed.

    Returns
    -------
    dict
        ``label_sigma``, ``lit_std`` (std of ``lit``), ``slope`` and ``corr`` (expected
        values), ``robust_sigma`` (= ``sigma``), and ``mc``: median and 16th/84th percentiles
        of ``slope_theil_sen``, ``robust_sigma`` and ``corr`` for ``n`` stars; ``None``
        values when ``sigma**2 >= var(lit)``.
    """
    from scipy.stats import theilslopes

    t = np.asarray(lit, dtype=np.float64)
    t = t[np.isfinite(t)]
    var = float(t.var(ddof=1))
    out: dict = {"label_sigma": float(sigma), "lit_std": float(np.sqrt(var)), "n": int(t.size),
                 "robust_sigma": float(sigma)}  # fmt: skip
    frac = 1.0 - float(sigma) ** 2 / var
    if frac <= 0:
        out.update(slope=None, corr=None, mc=None)
        return out
    out.update(slope=frac, corr=float(np.sqrt(frac)))
    rng = np.random.default_rng(seed)
    m = t.mean()
    stats = {"slope_theil_sen": [], "robust_sigma": [], "corr": []}
    for _ in range(int(n_mc)):
        true = m + np.sqrt(frac) * (rng.choice(t, t.size) - m)
        lab = true + rng.normal(0.0, float(sigma), t.size)
        d = true - lab
        stats["slope_theil_sen"].append(theilslopes(true, lab)[0])
        stats["robust_sigma"].append(_robust_sigma(d))
        stats["corr"].append(np.corrcoef(true, lab)[0, 1])
    out["mc"] = {k: [float(x) for x in np.percentile(v, [50, 16, 84])] for k, v in stats.items()}
    return out


def _hat_point(lab: np.ndarray, pred: np.ndarray, tracer: np.ndarray) -> dict:
    """One three-cornered-hat estimate from the sample covariances (see three_cornered_hat)."""
    c = np.cov(np.vstack([lab, pred, tracer]))
    if c[0, 2] == 0 or c[1, 2] == 0:
        return {}
    var_t = c[0, 1] * c[0, 2] / c[1, 2]
    slope = c[1, 2] / c[0, 2]
    t_slope = c[1, 2] / c[0, 1] if c[0, 1] != 0 else np.nan
    var_lab = c[0, 0] - var_t
    var_pred_own = c[1, 1] - slope**2 * var_t
    var_err = float(np.var(pred - lab, ddof=1)) - var_lab
    return {
        "true_std": float(np.sqrt(var_t)) if var_t > 0 else np.nan,
        "label_var": float(var_lab),
        "label_sigma": float(np.sqrt(max(var_lab, 0.0))),
        "slope": float(slope),
        "pred_sigma_own": float(np.sqrt(max(var_pred_own, 0.0)) / abs(slope)) if slope else np.nan,
        "pred_error_std": float(np.sqrt(max(var_err, 0.0))),
        "tracer_sigma": float(np.sqrt(max(c[2, 2] - t_slope**2 * var_t, 0.0)) / abs(t_slope))
        if np.isfinite(t_slope) and t_slope
        else np.nan,
        "ceiling_slope": float(var_t / c[0, 0]),
    }


def three_cornered_hat(lab, pred, tracer, *, n_boot: int = 4000, seed: int = 0) -> dict:
    """Label noise, a predictor's true scale and its own error, from a third independent tracer.

    With three measurements of the same true quantity T for each star, the labels
    ``L = T + e_L``, the prediction ``P = a_P + b_P T + e_P`` and a tracer
    ``C = a_C + b_C T + e_C`` on any linear scale (e.g. a colour), whose errors are
    independent of each other and of T, the sample covariances give

    - var(T) = cov(L, P) cov(L, C) / cov(P, C), hence the label noise
      sigma_L**2 = var(L) - var(T), which :func:`label_noise_ceiling` needs and the labels
      alone cannot give;
    - the prediction's slope on the true values, b_P = cov(P, C) / cov(L, C) (the tracer as an
      instrumental variable: free of the regression dilution that compresses the slope of P
      on noisy labels to b_P var(T) / var(L));
    - the prediction's error against the true values beyond a constant offset,
      std(P - T)**2 = var(P - L) - sigma_L**2, and its scatter about its own linear scale.

    Percentile intervals come from resampling the stars (bootstrap). Estimates of a variance
    can come out negative in small samples; the sigmas are then 0 and ``label_var`` keeps the
    sign. The estimates are only as good as the assumptions: errors that correlate (e.g. a
    tracer and a prediction read from the same spectrum) bias them.

    Parameters
    ----------
    lab : array-like of float
        Labels (e.g. literature Teff, K); they define the scale.
    pred : array-like of float
        Predictions (same unit as ``lab``).
    tracer : array-like of float
        A third tracer of the same quantity with independent errors, any unit (e.g. r - i, mag).
    n_boot : int
        Bootstrap resamples (0: none).
    seed : int
        Bootstrap seed.

    Returns
    -------
    dict
        ``n``; ``true_std`` (std of T), ``label_sigma`` (sigma_L) and ``label_var``,
        ``slope`` (b_P), ``pred_error_std`` (std of P - T), ``pred_sigma_own`` (scatter of P
        about a_P + b_P T, in units of T), ``tracer_sigma`` (the tracer's scatter in units of
        T), ``ceiling_slope`` (var(T) / var(L): the slope of a perfect predictor on these
        labels), ``offset`` (median of P - L); ``ci``: per quantity the bootstrap
        2.5th, 16th, 50th, 84th and 97.5th percentiles; ``loo``: per quantity the smallest
        and largest leave-one-star-out estimate; ``loo_most_influential``: the position (in
        the input arrays) of the star whose removal moves ``label_sigma`` most, and
        ``label_sigma`` without it.
    """
    a = [np.asarray(v, dtype=np.float64) for v in (lab, pred, tracer)]
    if not a[0].shape == a[1].shape == a[2].shape or a[0].ndim != 1:
        raise ValueError("lab, pred and tracer must be 1-d arrays of the same length")
    ok = np.isfinite(a[0]) & np.isfinite(a[1]) & np.isfinite(a[2])
    lab_, pred_, tr = (v[ok] for v in a)
    if ok.sum() < 5:
        raise ValueError(
            f"three_cornered_hat needs at least 5 stars with all three values, got {ok.sum()}"
        )
    out: dict = {"n": int(ok.sum()), "offset": float(np.median(pred_ - lab_))}
    out.update(_hat_point(lab_, pred_, tr))
    rng = np.random.default_rng(seed)
    boot: dict[str, list] = {}
    for _ in range(int(n_boot)):
        k = rng.integers(0, lab_.size, lab_.size)
        for key, v in _hat_point(lab_[k], pred_[k], tr[k]).items():
            boot.setdefault(key, []).append(v)
    out["ci"] = {
        key: [float(x) for x in np.nanpercentile(v, [2.5, 16, 50, 84, 97.5])]
        for key, v in boot.items()
    }
    # leave-one-out: how much one star moves each estimate (a single bad label can dominate)
    idx = np.flatnonzero(ok)
    keep = np.ones(idx.size, bool)
    loo: dict[str, list] = {}
    for j in range(idx.size):
        keep[j] = False
        for key, v in _hat_point(lab_[keep], pred_[keep], tr[keep]).items():
            loo.setdefault(key, []).append(v)
        keep[j] = True
    if loo:
        out["loo"] = {
            key: [float(np.nanmin(v)), float(np.nanmax(v))]
            for key, v in loo.items()
            if np.isfinite(v).any()
        }
        ls = np.asarray(loo["label_sigma"], dtype=np.float64)
        j = int(np.nanargmax(np.abs(ls - out["label_sigma"])))
        out["loo_most_influential"] = {"index": int(idx[j]), "label_sigma_without": float(ls[j])}
    return out


#: An M dwarf's r - i (mag) lies within this range (K7 ~ 0.6, M5 ~ 1.9); input-catalogue
#: colours outside it are photometry problems (saturation, blends, mixed catalogues).
M_DWARF_R_I = (0.4, 2.5)


def photometric_tracer(files) -> np.ndarray:
    """The r - i colour (mag) of each LAMOST file's target from its input-catalogue magnitudes.

    A Teff tracer independent of the spectrum and of the literature labels, for
    :func:`three_cornered_hat`. NaN where the header has no r or i, or where r - i falls
    outside :data:`M_DWARF_R_I`.

    Parameters
    ----------
    files : sequence of path-like
        LAMOST spectrum files.

    Returns
    -------
    numpy.ndarray of float
    """
    from astropy.io import fits

    from mspec.io.lamost import input_catalog_magnitudes

    out = np.full(len(files), np.nan)
    for j, f in enumerate(files):
        m = input_catalog_magnitudes(fits.getheader(f))
        if "r" in m and "i" in m and M_DWARF_R_I[0] <= m["r"] - m["i"] <= M_DWARF_R_I[1]:
            out[j] = m["r"] - m["i"]
    return out


def _summarise_seeds(per_seed: dict) -> dict:
    """Mean, min and max over seeds of every number of :func:`_versus_literature`."""
    out = {}
    keys = ("median", "robust_sigma", "rms", "slope_theil_sen", "slope_ols", "corr")
    for k in keys:
        v = np.array([r[k] for r in per_seed.values() if r.get(k) is not None], dtype=float)
        if v.size:
            out[k] = {"mean": float(v.mean()), "min": float(v.min()), "max": float(v.max())}
    out["n"] = max(r["n"] for r in per_seed.values())
    return out


def finetune_cross_validation(
    models,
    *,
    k: int = 6,
    seeds=(0, 1, 2),
    epochs: int = 60,
    lr=(1e-4, 3e-4, 1e-3, 3e-3, 1e-2),
    batch_size: int = 8,
    patience: int = 5,
    labels=None,
    store=None,
    work_dir=None,
    threads: int | None = 1,
    label_sigma: float = LIT_TEFF_SIGMA,
    progress: bool = False,
    zero_point: bool = False,
) -> dict:
    """Out-of-fold accuracy of fine-tuning the dM CNN-TLMA ensemble on the real DR7 M dwarfs.

    The honest figure for the label-transfer path (``mspec train tlma --finetune``): the
    36 real LAMOST DR7 M dwarfs of ``../shared/data/lamost_dr7_mdwarfs`` with the literature
    labels of its ``labels.csv`` are split into ``k`` folds stratified by literature Teff
    (:func:`stratified_folds`); for each fold the simulator-trained dM ensemble is
    fine-tuned with :func:`mspec.ml.train.train_from_store` (the CLI's function) on the
    labels of the other ``k - 1`` folds only, and predicts the held-out fold. Repeated for
    each seed (new folds and new training randomness). The default models predict the same
    stars, in the same rest frame, without fine-tuning.

    Protocol, fixed before looking at any out-of-fold figure: Teff (``teff_lit``) and the
    measured [Fe/H] (``feh_lit`` as [M/H], the placeholder :data:`PLACEHOLDER_FEH` masked)
    are trained; logg (``logg_lit`` is mostly a placeholder 5.0) and [α/M] (no labels) are
    taught from the base members' own predictions (``train_regressor``'s rule for missing
    labels). Every layer is fine-tuned with Adam. The hyper-parameters are chosen by inner
    validation only, inside each outer fold's training stars: each ensemble member stops
    early on its own inner validation fold (the number of epochs), and with several ``lr``
    one ensemble is fine-tuned per learning rate and the one with the lowest inner
    out-of-fold Teff rms (``train_regressor``'s ``metrics["rms"]["teff"]``, every training
    star predicted by the member that did not train on it) predicts the held-out fold. The
    held-out fold is predicted by every learning rate's ensemble too (``per_lr``, a
    diagnostic, not a choice). The rest frame is the LAMOST RV, 0 km/s where LAMOST has none
    (as :func:`evaluate_real`), given to the trainer as the table's ``rv``.

    With ``zero_point=True`` the same protocol measures the lighter transfer instead: each
    fold's training stars only set the ensemble's zero point
    (:func:`mspec.ml.train.recalibrate_zero_point`, the CLI's ``--zero-point``); nothing is
    trained and ``lr``, ``epochs``, ``batch_size`` and ``patience`` do not apply (results
    are listed under the learning rate 0).

    Parameters
    ----------
    models : path-like
        The default models (a directory with ``tlma/``), a dM/gM pair or a dM ensemble.
    k : int
        Outer folds (>= 2).
    seeds : sequence of int
        One repetition per seed: the fold assignment and the fine-tuning use it.
    epochs : int
        Maximum fine-tuning epochs per member.
    lr : float or sequence of float
        Adam learning rate(s) of the fine-tuning; several: chosen per outer fold by inner
        validation (above). Its choice, 3e-3, is now the library's default for fine-tuning
        CNN-TLMA (:data:`mspec.ml.train.FINETUNE_DEFAULTS`).
    batch_size : int
        Spectra per optimizer step (8: a few steps per epoch on ~25 training stars).
    patience : int
        Early-stopping patience (epochs without a better inner validation loss).
    labels : path-like, optional
        The label table (default ``lamost_dr7_mdwarfs/labels.csv``; needs ``file_name``,
        ``teff_lit``, ``feh_lit``).
    store : path-like, optional
        A store of the DR7 M dwarfs already ingested (default: ingested into ``work_dir``).
    work_dir : path-like, optional
        Where the store and the fold models go (kept); default a temporary directory
        (removed).
    threads : int, optional
        torch threads.
    label_sigma : float
        Literature Teff noise (K) for :func:`label_noise_ceiling` (default
        :data:`LIT_TEFF_SIGMA`, an upper bound).
    progress : bool
        Print one line per fold.
    zero_point : bool
        Recalibrate the zero point per fold instead of fine-tuning (above).

    Returns
    -------
    dict
        ``protocol`` (the settings above, the base ensemble and its ``model.json`` sha256);
        ``stars``: per star ``file``, ``obsid``, ``teff_lit`` (K), ``feh_lit`` (dex, NaN for
        a placeholder), ``spt`` (CNN-SPT class when ``models`` has ``spt/``), ``teff_base``,
        ``m_h_base`` (default models), and per seed ``fold_<s>``, ``teff_cv_<s>`` (K),
        ``m_h_cv_<s>`` (dex), out of fold; ``folds``: per seed and fold the held-out files
        and obsids, the files of the label table given to the trainer, the obsids its
        trainers fitted on (their ``oof_predictions.csv``), per learning rate the inner
        out-of-fold Teff and [M/H] rms and the members' epochs, the chosen ``lr``, seconds;
        ``finetuned``: per sample (``"all"``, and ``"called_m"`` with CNN-SPT) and label
        (``teff`` against ``teff_lit``, ``m_h`` against the measured ``feh_lit``) the
        :func:`_versus_literature` numbers per seed and their mean/min/max over seeds;
        ``default``: the same for the default models; ``noise_ceiling``:
        :func:`label_noise_ceiling` of Teff for each sample; ``three_cornered_hat``: per
        sample, :func:`three_cornered_hat` of the literature Teff, the prediction
        (``default``; ``finetuned``: the mean over seeds of the out-of-fold ones) and the
        input-catalogue r - i (``stars`` column ``r_i``, mag); ``per_lr``: per learning rate
        the ``finetuned`` summary over seeds had that rate been fixed; ``seconds``.

    Raises
    ------
    RuntimeError
        If a held-out star's label reached its fold's trainer (a leak).
    """
    import hashlib
    import shutil
    import tempfile

    import pandas as pd

    from mspec.data import shared_data_dir
    from mspec.io.store import ingest, open_store
    from mspec.ml.infer import predict_array
    from mspec.ml.labels import join_labels, read_label_table
    from mspec.ml.train import train_from_store
    from mspec.preprocessing.steps import preprocess

    t_start = time.perf_counter()
    base = _dm_ensemble(models)
    src = shared_data_dir() / "lamost_dr7_mdwarfs"
    labels = Path(labels) if labels is not None else src / "labels.csv"
    table = read_label_table(labels)
    for c in ("file_name", "teff_lit", "feh_lit"):
        if c not in table.columns:
            raise ValueError(f"labels table {str(labels)!r} has no column {c!r}")
    seeds = [int(s) for s in seeds]
    lrs = [0.0] if zero_point else [float(v) for v in np.atleast_1d(lr)]
    if not zero_point and (not lrs or min(lrs) <= 0 or len(set(lrs)) != len(lrs)):
        raise ValueError(f"lr must be distinct positive learning rates, got {lr!r}")
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be distinct integers, got {seeds}")
    tmp = None
    if work_dir is None:
        tmp = tempfile.mkdtemp(prefix="mspec-finetune-cv-")
        work = Path(tmp)
    else:
        work = Path(work_dir)
        work.mkdir(parents=True, exist_ok=True)
    try:
        if store is None:
            store = work / "dr7.zarr"
            if not (store / "zarr.json").exists():
                ingest([str(src)], str(store), chunk_size=64, client="sync")
        ds = open_store(store)
        lj = join_labels(ds, table, on="file")
        t = lj.table
        rv = np.nan_to_num(ds["lamost_rv"].values.astype(np.float64), nan=0.0)
        x = preprocess(ds.assign(_rv=("spectra", rv)), recipe="tlma", rv="_rv",
                       merge=False)["flux_grid"].values  # fmt: skip
        teff_lit = pd.to_numeric(t["teff_lit"], errors="coerce").to_numpy(np.float64)
        feh_lit = pd.to_numeric(t["feh_lit"], errors="coerce").to_numpy(np.float64)
        feh_lit = np.where(feh_lit == PLACEHOLDER_FEH, np.nan, feh_lit)
        stars = np.flatnonzero(
            (t["_table_row"].to_numpy() >= 0) & np.isfinite(teff_lit) & np.isfinite(x).any(axis=1)
        )
        if stars.size < 2 * int(k):
            raise ValueError(f"only {stars.size} labelled real spectra for {k} folds")
        files = np.asarray(ds["file"].values).astype(str)
        names = np.array([Path(f).name for f in files])
        obsid = np.asarray(ds["obsid"].values).astype(np.int64)
        # the trainer's label table: one row per star, the store's rest-frame RV as `rv`
        train_table = pd.DataFrame({"file_name": names[stars], "teff_lit": teff_lit[stars],
                                    "feh_lit": feh_lit[stars], "rv": rv[stars]})  # fmt: skip
        columns = {"teff": "teff_lit", "m_h": "feh_lit", "rv": "rv"}
        base_pred = predict_array(x[stars], base)
        spt = None
        root = Path(models)
        if (root / "spt" / "model.json").exists():
            from mspec.ml.infer import predict

            cnn = preprocess(ds, recipe="cnn", merge=False)
            spt = predict(cnn, root / "spt")["spt_class"].values[stars].astype(str)
        rows = {
            "file": names[stars], "obsid": obsid[stars], "teff_lit": teff_lit[stars],
            "feh_lit": feh_lit[stars], "teff_base": base_pred[:, 0], "m_h_base": base_pred[:, 2],
        }  # fmt: skip
        if spt is not None:
            rows["spt"] = spt
        rows["r_i"] = photometric_tracer([src / n for n in names[stars]])
        fold_log = []
        for s in seeds:
            fold = stratified_folds(teff_lit[stars], k, s)
            pred = np.full((len(lrs), stars.size, 2), np.nan)
            chosen = np.full(stars.size, -1)
            for f in range(int(k)):
                test = fold == f
                t0 = time.perf_counter()
                tab = train_table[~test].reset_index(drop=True)
                inner, fitted_all = [], set()
                for j, rate in enumerate(lrs):
                    out_dir = work / f"seed{s}" / f"fold{f}" / f"lr{rate:g}"
                    how = (
                        {"zero_point": True}
                        if zero_point
                        else {"epochs": epochs, "seed": s, "lr": rate, "batch_size": batch_size,
                              "patience": patience, "plots": False, "calibration": "oof"}
                    )  # fmt: skip
                    m = train_from_store(kind="tlma", store=store, labels=tab, out_dir=out_dir,
                                         on="file", columns=columns, finetune=base,
                                         threads=threads, **how)  # fmt: skip
                    fitted = (
                        m["obsids"]
                        if zero_point
                        else pd.read_csv(out_dir / "oof_predictions.csv")["obsid"]
                    )
                    fitted_all |= {int(o) for o in fitted}
                    leak = (fitted_all & {int(o) for o in obsid[stars][test]}) | (
                        set(tab["file_name"]) & set(names[stars][test])
                    )
                    if leak:
                        raise RuntimeError(f"seed {s} fold {f}: held-out stars trained on: {leak}")
                    pred[j, test] = predict_array(x[stars][test], out_dir)[:, [0, 2]]
                    if zero_point:
                        zp = m["zero_point"]
                        inner.append({"lr": rate, "inner_oof_rms_teff": 0.0,
                                      "zero_point": {q: zp[q]["offset"] for q in zp}})  # fmt: skip
                        continue
                    inner.append({"lr": rate, "inner_oof_rms_teff": m["rms"]["teff"],
                                  "inner_oof_rms_m_h": m["rms"]["m_h"],
                                  "epochs_run": [mm["epochs_run"] for mm in m["members"]]})  # fmt: skip
                best = int(np.argmin([r["inner_oof_rms_teff"] for r in inner]))
                chosen[test] = best
                fold_log.append({
                    "seed": s, "fold": f, "test_files": names[stars][test].tolist(),
                    "test_obsids": obsid[stars][test].tolist(),
                    "train_table_files": tab["file_name"].tolist(),
                    "train_obsids": sorted(fitted_all), "inner": inner, "lr": lrs[best],
                    "seconds": round(time.perf_counter() - t0, 1),
                })  # fmt: skip
                if progress:
                    what = (
                        f"Teff zero point {inner[0]['zero_point']['teff']:+.0f} K"
                        if zero_point
                        else "inner oof Teff rms "
                        + ", ".join(
                            f"{r['inner_oof_rms_teff']:.0f} K (lr {r['lr']:g})" for r in inner
                        )
                    )
                    print(f"seed {s} fold {f + 1}/{k}: {int(test.sum())} held out, "
                          f"{len(fitted_all)} trained, {what}, "
                          f"{time.perf_counter() - t0:.0f} s", flush=True)  # fmt: skip
            rows[f"fold_{s}"] = fold
            rows[f"lr_{s}"] = np.array(lrs)[chosen]
            rows[f"teff_cv_{s}"] = pred[chosen, np.arange(stars.size), 0]
            rows[f"m_h_cv_{s}"] = pred[chosen, np.arange(stars.size), 1]
            for j, rate in enumerate(lrs):
                rows[f"teff_cv_{s}_lr{rate:g}"] = pred[j, :, 0]
                rows[f"m_h_cv_{s}_lr{rate:g}"] = pred[j, :, 1]
        st = pd.DataFrame(rows)
        samples = {"all": np.ones(len(st), bool)}
        if spt is not None:
            samples["called_m"] = st["spt"].to_numpy() == "M"
        fin, dflt, ceil, hat = {}, {}, {}, {}
        per_lr: dict = {f"{rate:g}": {} for rate in lrs}
        for name, sel in samples.items():
            sub = st[sel]
            fin[name], dflt[name] = {}, {}
            for rate in lrs:
                per_lr[f"{rate:g}"][name] = {}
            for lab, lit in (("teff", "teff_lit"), ("m_h", "feh_lit")):
                per = {s: _versus_literature(sub[f"{lab}_cv_{s}"], sub[lit]) for s in seeds}
                fin[name][lab] = {"per_seed": per, "over_seeds": _summarise_seeds(per)}
                dflt[name][lab] = _versus_literature(sub[f"{lab}_base"], sub[lit])
                for rate in lrs:
                    per = {s: _versus_literature(sub[f"{lab}_cv_{s}_lr{rate:g}"], sub[lit])
                           for s in seeds}  # fmt: skip
                    per_lr[f"{rate:g}"][name][lab] = _summarise_seeds(per)
            ceil[name] = label_noise_ceiling(sub["teff_lit"], label_sigma)
            if np.isfinite(sub["r_i"]).sum() >= 5:
                oof = np.mean([sub[f"teff_cv_{s}"] for s in seeds], axis=0)
                hat[name] = {
                    "default": three_cornered_hat(sub["teff_lit"], sub["teff_base"], sub["r_i"]),
                    "finetuned": three_cornered_hat(sub["teff_lit"], oof, sub["r_i"]),
                }
        sha = hashlib.sha256((base / "model.json").read_bytes()).hexdigest()
        return {
            "protocol": {
                "k": int(k),
                "seeds": seeds,
                "stratified_by": "teff_lit",
                "epochs": int(epochs),
                "lr": lrs,
                "lr_choice": "lowest inner out-of-fold Teff rms" if len(lrs) > 1 else "fixed",
                "mode": "zero_point" if zero_point else "finetune",
                "batch_size": int(batch_size),
                "patience": int(patience),
                "layers": "all",
                "trained_labels": {"teff": "teff_lit", "m_h": "feh_lit"},
                "from_base": ["logg", "alpha_m"],
                "placeholder_feh": PLACEHOLDER_FEH,
                "rest_frame": "LAMOST RV, 0 km/s where missing",
                "base": str(base.resolve()),
                "base_model_json_sha256": sha,
                "labels": str(Path(labels).resolve()),
                "n_stars": int(stars.size),
                "n_feh_measured": int(np.isfinite(feh_lit[stars]).sum()),
            },
            "stars": st.to_dict(orient="records"),
            "folds": fold_log,
            "finetuned": fin,
            "default": dflt,
            "noise_ceiling": ceil,
            "three_cornered_hat": hat,
            "per_lr": per_lr,
            "seconds": round(time.perf_counter() - t_start, 1),
        }
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def main(argv=None) -> int:  # pragma: no cover - exercised by the documented runs
    p = argparse.ArgumentParser(prog="python -m mspec.ml.evaluate")
    sub = p.add_subparsers(dest="cmd", required=True)
    q = sub.add_parser("train")
    q.add_argument("--n", type=int, default=12000)
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--out", required=True)
    q.add_argument("--epochs", type=int, default=40)
    q.add_argument("--folds", type=int, default=10)
    q.add_argument(
        "--threads", type=int, default=1, help="torch threads (1 avoids OpenMP oversubscription)"
    )
    q.add_argument(
        "--only", choices=["all", "classifiers", "tlma"], default="all", help="what to train"
    )
    q = sub.add_parser("test")
    q.add_argument("--models", required=True)
    q.add_argument("--n", type=int, default=3000)
    q.add_argument("--seed", type=int, default=99)
    q = sub.add_parser("real")
    q.add_argument("--models", required=True)
    q = sub.add_parser("accuracy", help="classifier_accuracy + tlma_accuracy + inference_speed")
    q.add_argument("--models", required=True)
    q.add_argument("--n", type=int, default=4000, help="class-balanced classifier test survey")
    q.add_argument("--n-tlma", type=int, default=3000, help="80%% dM / 20%% gM test survey")
    q.add_argument("--seed", type=int, default=99)
    q = sub.add_parser(
        "finetune-cv",
        help="out-of-fold accuracy of fine-tuning CNN-TLMA dM on the real DR7 M dwarfs",
    )
    q.add_argument("--models", required=True, help="default models (with tlma/) or a dM ensemble")
    q.add_argument("--k", type=int, default=6, help="outer folds")
    q.add_argument("--seeds", default="0,1,2", help="comma-separated repetition seeds")
    q.add_argument("--epochs", type=int, default=60, help="maximum fine-tuning epochs")
    q.add_argument(
        "--lr",
        default="1e-4,3e-4,1e-3,3e-3,1e-2",
        help="learning rate(s); several: inner-validated",
    )
    q.add_argument("--batch-size", type=int, default=8)
    q.add_argument(
        "--zero-point",
        action="store_true",
        help="set only the zero point from each fold's training stars (the CLI's "
        "--zero-point) instead of fine-tuning",
    )
    q.add_argument("--work-dir", default=None, help="keep the store and fold models here")
    q.add_argument("--out", default=None, help="also write the JSON result here")
    a = p.parse_args(argv)
    if a.cmd == "train":
        from mspec.ml.train import train_all_demo

        t0 = time.perf_counter()
        mix = {"dM": 0.5, "gM": 0.5} if a.only == "tlma" else None
        ds = simulate_training_survey(a.n, a.seed, mix=mix)
        t1 = time.perf_counter()
        res = train_all_demo(
            ds, a.out, epochs=a.epochs, folds=a.folds, seed=a.seed, progress=True,
            threads=a.threads, only=a.only,
        )  # fmt: skip
        res["simulate_seconds"] = round(t1 - t0, 1)
        res["total_seconds"] = round(time.perf_counter() - t0, 1)
        for k in ("spt", "wdm", "dmgm"):
            if k in res:
                res[k].pop("history", None)
        print(json.dumps(res, indent=1, default=str))
    elif a.cmd == "accuracy":
        import torch

        torch.set_num_threads(1)
        t0 = time.perf_counter()
        res = {"classifiers": classifier_accuracy(a.models, n=a.n, seed=a.seed)}
        res["tlma"] = tlma_accuracy(a.models, n=a.n_tlma, seed=a.seed)
        res["inference_speed"] = {
            k: inference_speed(Path(a.models) / k)
            for k in ("spt", "wdm", "dmgm", "tlma/dM", "tlma/gM")
        }
        res["seconds"] = round(time.perf_counter() - t0, 1)
        print(json.dumps(res, indent=1, default=str))
    elif a.cmd == "finetune-cv":
        import torch

        torch.set_num_threads(1)
        res = finetune_cross_validation(
            a.models, k=a.k, seeds=[int(v) for v in a.seeds.split(",") if v.strip()],
            epochs=a.epochs, lr=[float(v) for v in a.lr.split(",")], batch_size=a.batch_size, work_dir=a.work_dir,
            progress=True, zero_point=a.zero_point,
        )  # fmt: skip
        text = json.dumps(res, indent=1, default=str)
        if a.out:
            Path(a.out).write_text(text + "\n")
        print(text)
    elif a.cmd == "test":
        print(json.dumps(evaluate_simulated(a.models, a.n, a.seed), indent=1))
    else:
        print(json.dumps(evaluate_real(a.models), indent=1, default=str))
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
