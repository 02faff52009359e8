"""Accuracy runs of the CNNs: train on a simulated survey, test on a fresh one and on real data.

Reproduces the CNN figures of ``docs/accuracy.md``::

    python -m mspec.ml.evaluate train --n 12000 --out models --epochs 40 --folds 10
    python -m mspec.ml.evaluate test  --models models --n 3000 --seed 99
    python -m mspec.ml.evaluate real  --models models

``train`` simulates a class-balanced survey (every CNN-SPT class, WDs, dM and gM equally
represented, S/N_i drawn log-uniformly in 5-150) and calls
:func:`mspec.ml.train.train_all_demo`; ``test`` applies the models to an independent default-mix
survey and reports accuracies by S/N; ``real`` applies them to the real LAMOST spectra in
``../shared/data`` (see :func:`evaluate_real`).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import xarray as xr

__all__ = ["BALANCED_MIX", "simulate_training_survey", "evaluate_simulated", "evaluate_real"]

#: Training mix: the 8 CNN-SPT classes + WD equally, M split evenly into dwarfs and giants.
BALANCED_MIX = {
    "OB": 0.1, "A": 0.1, "F": 0.1, "G": 0.1, "K": 0.1, "GALAXY": 0.1, "QSO": 0.1, "WD": 0.1,
    "dM": 0.1, "gM": 0.1,
}  # fmt: skip


def simulate_training_survey(n: int, seed: int = 0, snr=(5.0, 150.0), mix=None) -> xr.Dataset:
    """A class-balanced simulated survey for training (see module docstring)."""
    from mspec.simulate import simulate_survey

    return simulate_survey(int(n), seed=seed, mix=mix or BALANCED_MIX, snr=snr)


def _predict_all(ds: xr.Dataset, models: Path, rv, lumclass=None) -> xr.Dataset:
    from mspec.ml.infer import predict
    from mspec.preprocessing.steps import preprocess

    cnn = preprocess(ds, recipe="cnn", merge=False)
    out = xr.Dataset(coords=ds.coords)
    for kind in ("spt", "wdm", "dmgm"):
        if (models / kind / "model.json").exists():
            res = predict(cnn, models / kind)
            out[f"{kind}_prob"] = res[f"{kind}_prob"]
            out[f"{kind}_class"] = res[f"{kind}_class"]
    if (models / "tlma" / "model.json").exists():
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
    CNN-TLMA (dM ensemble, rest frame from the LAMOST RV) for the DR7 M dwarfs against the
    literature Teff of ``lamost_dr7_mdwarfs/labels.csv``.
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
        diff = dr7["teff_dM"] - dr7["teff_lit"]
        ok = np.isfinite(diff)
        res["dr7_tlma_teff"] = {
            "n": int(ok.sum()),
            "bias": float(diff[ok].mean()),
            "rms": float(np.sqrt((diff[ok] ** 2).mean())),
            "std": float(diff[ok].std()),
            "corr": float(np.corrcoef(dr7["teff_dM"][ok], dr7["teff_lit"][ok])[0, 1]),
        }
        res["dr7_table"] = dr7[["file", "snr_r", "teff_lit", "teff_dM", "spt", "dmgm"]].to_dict(
            orient="records"
        )
    return res


def _tlma_part(ds, models, rv, part) -> np.ndarray:
    from mspec.ml.infer import predict_array
    from mspec.preprocessing.steps import preprocess

    tl = preprocess(ds.assign(_rv=("spectra", rv)), recipe="tlma", rv="_rv", merge=False)
    return predict_array(tl["flux_grid"].values, Path(models) / "tlma" / part)


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
    elif a.cmd == "test":
        print(json.dumps(evaluate_simulated(a.models, a.n, a.seed), indent=1))
    else:
        print(json.dumps(evaluate_real(a.models), indent=1, default=str))
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
