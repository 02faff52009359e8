"""The mspec command line.

Each subcommand parses its arguments here and calls the public Python API, so the CLI and
the library cannot drift apart. Argument and input errors print one line and exit non-zero
(``--debug`` shows the traceback). Exit codes: 0 success, 1 failure during the work,
2 bad arguments, configuration or input, 3 the run directory is locked by a live run,
4 a stage's version or configuration changed (rerun with ``--redo STAGE``).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

log = logging.getLogger("mspec")

DESCRIPTION = (
    "mspec turns a LAMOST low-resolution survey into a refined M-star catalog "
    "(Li et al. 2025): classification, radial velocities and stellar parameters."
)
EPILOG = (
    "Start with 'mspec demo' (a simulated survey end to end) or 'mspec config --defaults > "
    "run.toml' then 'mspec run run.toml'. 'mspec COMMAND --help' describes each command."
)


class _Formatter(argparse.HelpFormatter):
    """Shows each option's default where it has a meaningful one (not None/False)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "%(default)" in text or action.default in (None, False, argparse.SUPPRESS):
            return text
        if action.option_strings or action.nargs in (argparse.OPTIONAL, argparse.ZERO_OR_MORE):
            text += " (default: %(default)s)"
        return text


class _Parser(argparse.ArgumentParser):
    """Argument errors in one line (no usage dump), exit code 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


class CLIError(Exception):
    """An error to report in one line (exit code in ``code``)."""

    def __init__(self, message: str, code: int = 2):
        super().__init__(message)
        self.code = code


def _setup_logging(logfile: str | None, verbose: bool = False) -> None:
    """INFO to the log file; only warnings (or INFO with -v) to the terminal."""
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    term = logging.StreamHandler(sys.stderr)
    term.setLevel(logging.INFO if verbose else logging.WARNING)
    term.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    handlers: list[logging.Handler] = [term]
    if logfile:
        Path(logfile).parent.mkdir(parents=True, exist_ok=True)
        fh = logging.FileHandler(logfile)
        fh.setFormatter(fmt)
        fh.setLevel(logging.INFO)
        handlers.append(fh)
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    for h in handlers:
        root.addHandler(h)
    root.setLevel(logging.INFO)
    # distributed's INFO chatter goes to the log file only
    for name in ("distributed", "tornado", "bokeh", "numba", "asyncio"):
        logging.getLogger(name).setLevel(logging.INFO if logfile else logging.WARNING)
    term.addFilter(_for_terminal)


def _for_terminal(record: logging.LogRecord) -> bool:
    """Warnings and mspec's own messages; not distributed's P2P-shuffle bookkeeping
    ("Shuffle ... initialized by task" / "deactivated"), which it logs as warnings."""
    if record.name.startswith("distributed.shuffle") and record.levelno < logging.ERROR:
        return False
    return record.levelno >= logging.WARNING or record.name.startswith("mspec")


def _local_or_client(scheduler: str | None, stack):
    """``scheduler``: None (LocalCluster), a dask address, or threads/processes/sync."""
    import os

    from mspec._exec import LOCAL_SCHEDULERS, lean_dask_config

    if scheduler in LOCAL_SCHEDULERS:
        return scheduler
    from distributed import Client

    stack.enter_context(lean_dask_config())
    if scheduler:
        return stack.enter_context(Client(scheduler))
    from distributed import LocalCluster

    # one single-threaded worker process per core: FITS header parsing holds the GIL
    cluster = stack.enter_context(
        LocalCluster(
            n_workers=os.cpu_count() or 1,
            threads_per_worker=1,
            dashboard_address="127.0.0.1:0",
            silence_logs=logging.WARNING,
        )
    )
    return stack.enter_context(Client(cluster))


def _cmd_ingest(args: argparse.Namespace) -> int:
    from contextlib import ExitStack

    from mspec.io.store import ingest, resolve_sources

    if not resolve_sources(args.sources, allow_outside=args.allow_outside):
        raise CLIError(f"sources: nothing to ingest in {args.sources} (no FITS files matched)")
    with ExitStack() as stack:
        client = _local_or_client(args.scheduler, stack)
        summary = ingest(
            args.sources,
            args.store,
            chunk_size=args.chunk_size,
            client=client,
            progress=True,
            allow_outside=args.allow_outside,
        )
    log.info("ingest summary: %s", summary)
    print(json.dumps(summary, indent=1))
    return 0


def _column_map(items, what: str) -> dict[str, str]:
    """``--columns`` values (``NAME=COLUMN``, comma-separated, repeatable) as a dict."""
    columns = {}
    for item in items or []:
        for part in item.split(","):
            if not part.strip():
                continue
            key, sep, col = part.partition("=")
            if not sep or not key.strip() or not col.strip():
                raise CLIError(f"--columns: expected {what}=COLUMN, got {part!r}")
            columns[key.strip()] = col.strip()
    return columns


def _cmd_train(args: argparse.Namespace) -> int:
    from mspec.ml.train import train_from_store

    columns = _column_map(args.columns, "LABEL")
    if args.part and args.kind != "tlma":
        raise CLIError(f"--part chooses a member of the CNN-TLMA dM/gM pair: not for {args.kind}")
    extra = {}
    if args.lr is not None:  # None: the library's default (from scratch or fine-tuning)
        extra["lr"] = args.lr
    if args.batch_size is not None:
        extra["batch_size"] = args.batch_size
    if args.zero_point and (args.kind != "tlma" or not args.finetune):
        raise CLIError("--zero-point recalibrates a trained CNN-TLMA model: it needs 'tlma' "
                       "and --finetune MODEL_DIR")  # fmt: skip
    if args.kind == "tlma":
        extra["calibration"] = args.calibration
        if args.part:
            extra["part"] = args.part
        if args.zero_point:
            extra["zero_point"] = True
    elif args.augment:
        extra["augment"] = True
    metrics = train_from_store(
        kind=args.kind,
        store=args.store,
        labels=args.labels,
        out_dir=args.out,
        epochs=args.epochs,
        seed=args.seed,
        folds=args.folds,
        on=args.on,
        radius_arcsec=args.radius,
        columns=columns or None,
        snr_min=args.snr_min if args.snr_min > 0 else None,
        consistent=not args.no_consistency,
        finetune=args.finetune,
        threads=args.threads,
        progress=True,
        **extra,
    )

    def _short(m):  # per-epoch histories and obsid lists stay in model.json; print the summary
        return {
            k: (_short(v) if isinstance(v, dict) else v)
            for k, v in m.items()
            if k not in ("history", "obsids")
        }

    print(json.dumps(_short(metrics), indent=1, default=str))
    log.info("model written to %s", args.out)
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from mspec.demo import run_demo

    run_demo(
        args.out,
        n_spectra=args.n_spectra,
        seed=args.seed,
        n_workers=args.workers,
        n_train=args.n_train,
        epochs=args.epochs,
        chunk_size=args.chunk_size,
    )
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from mspec.config import load_config
    from mspec.pipeline import run

    cfg = load_config(args.config)
    changes = {}
    if args.scheduler:
        changes["cluster"] = {"scheduler": args.scheduler}
    if args.workers is not None:
        changes.setdefault("cluster", {})["n_workers"] = args.workers
    if changes:
        cfg = cfg.replace(**changes)
    cfg.check_complete(str(args.config))
    Path(cfg.run_dir).mkdir(parents=True, exist_ok=True)
    res = run(cfg, redo=args.redo or (), progress=not args.quiet)
    print(f"run complete: {res.n_spectra} spectra in {res.seconds:.0f} s; catalog {res.catalog}")
    for name, info in res.stages.items():
        extra = ""
        if "computed" in info:
            extra = f" ({info['computed']} chunks computed, {info['skipped']} already done)"
        print(f"  {name:<10} {info.get('seconds', 0):8.1f} s{extra}")
    for line in res.not_available:
        print(f"  not available: {line}")
    if res.report:
        print(f"report: {res.report}")
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    path = Path(args.path)
    if (path / "config.resolved.toml").is_file():
        from mspec.pipeline import run_status

        info = run_status(path)
        if Path(info["store"]).exists():
            info["quarantine"] = _quarantine_summary(Path(info["store"]))
    else:
        from mspec.io.store import open_store, store_state

        st = store_state(path)
        ds = open_store(path)
        info = {
            "store": str(path),
            "n_spectra": int(ds.sizes["spectra"]),
            "chunk_size": int(st["chunk_size"]),
            "variables": sorted(ds.data_vars),
            "quarantine": _quarantine_summary(path),
        }
    print(json.dumps(info, indent=1, default=str))
    return 0


def _quarantine_summary(store: Path) -> dict:
    import pandas as pd

    q = Path(store) / "quarantine.parquet"
    if not q.exists():
        return {"files": 0}
    df = pd.read_parquet(q)
    col = "code" if "code" in df else df.columns[0]
    return {
        "files": int(len(df)),
        "by_reason": {str(k): int(v) for k, v in df[col].value_counts().items()},
    }


def _cmd_config(args: argparse.Namespace) -> int:
    from mspec.config import default_toml, load_config

    if args.defaults or not args.check:
        print(default_toml(commented=True), end="")
        return 0
    cfg = load_config(args.check)
    print(cfg.to_toml(), end="")
    return 0


def _cmd_models(args: argparse.Namespace) -> int:
    from mspec.pipeline.models import build_default_models, default_models_dir, list_models

    if args.action == "path":
        print(default_models_dir())
    elif args.action == "list":
        print(json.dumps(list_models(args.dir), indent=1, default=str))
    else:
        # only what the user gave: the defaults are build_default_models's (the recipe's)
        size = {k: v for k, v in (("n_train", args.n_train), ("epochs", args.epochs)) if v}
        path = build_default_models(args.dir, force=args.force, progress=True, **size)
        print(path)
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from mspec.run_report import write_run_report

    path = write_run_report(args.run, out_dir=args.out, n_examples=args.examples)
    print(path)
    return 0


def _cmd_catalog(args: argparse.Namespace) -> int:
    from mspec.catalog import CatalogError, build_catalog, catalog_summary, diff_runs, write

    target = list(args.target)
    try:
        if target[0] == "diff":
            if len(target) != 3:
                raise CLIError("catalog diff: expected two run directories: diff RUN_A RUN_B")
            d = diff_runs(target[1], target[2], n_sigma=args.sigma)
            counts = d.attrs.get("counts", {})
            print(json.dumps(counts, indent=1))
            if args.out:
                out = Path(args.out)
                if out.suffix.lower() != ".csv":
                    out.mkdir(parents=True, exist_ok=True)
                    out = out / "catalog_diff.csv"
                d.to_csv(out, index=False)
                print(f"changed spectra: {out}")
            elif len(d):
                print(d.head(50).to_string(index=False))
            return 0
        if len(target) != 1:
            raise CLIError("catalog: expected one run directory (or 'diff RUN_A RUN_B')")
        if not args.out:
            raise CLIError("catalog: --out DIR is required")
        cats = build_catalog(target[0])
        written = write(cats, args.out, formats=tuple(args.format))
        summary = catalog_summary(cats)
        summary.to_csv(Path(args.out) / "catalog_summary.csv", index=False)
    except (CatalogError, KeyError) as exc:
        raise CLIError(str(exc).strip("'\"")) from exc
    with pd_options():
        print(summary.drop(columns=["note"]).to_string(index=False))
    print(json.dumps(written, indent=1))
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from mspec.catalog import CatalogError
    from mspec.compare import compare_catalogs, comparison_figure, internal_error_figure

    columns = _column_map(args.columns, "QUANTITY")
    try:
        res = compare_catalogs(
            args.catalog,
            args.external,
            columns=columns or None,
            radius_arcsec=args.radius,
            quality_cuts=not args.no_quality_cuts,
            use_flags=not args.no_flags,
        )
    except (CatalogError, KeyError) as exc:
        raise CLIError(str(exc).strip("'\"")) from exc
    print(
        f"matched {len(res.matched)} of {res.n_catalog} catalog spectra within "
        f"{args.radius} arcsec of {res.n_external} external rows; columns {res.columns}"
    )
    with pd_options():
        print(res.stats[res.stats.n > 0].to_string(index=False))
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        res.stats.to_csv(out / "comparison_stats.csv", index=False)
        res.matched.to_parquet(out / "matched.parquet", index=False)
        comparison_figure(res, name=args.name).savefig(out / "comparison.png", dpi=120)
        internal_error_figure(res.matched).savefig(out / "internal_errors.png", dpi=120)
        print(f"written to {out}")
    return 0


def pd_options():
    import pandas as pd

    return pd.option_context("display.width", 200, "display.max_columns", 20)


def _cmd_inspect(args: argparse.Namespace) -> int:
    from mspec.review import load_run, read_decisions, write_queue

    run_dir = Path(args.run)
    if not (run_dir / "config.resolved.toml").is_file():
        raise CLIError(f"{run_dir} is not an mspec run directory (no config.resolved.toml)")
    decisions = None
    if args.decisions:
        obsids = load_run(run_dir)["obsid"].values
        decisions = read_decisions(args.decisions, known_obsids=obsids)
        print(f"decisions: {len(decisions)} used, {len(decisions.attrs['skipped'])} rows skipped")
        from mspec._exec import atomic_write
        from mspec.pipeline.runner import DECISIONS_FILE

        target = run_dir / DECISIONS_FILE
        if Path(args.decisions).resolve() != target.resolve():
            atomic_write(target, Path(args.decisions).read_bytes())
        print(f"decisions saved to {target}: the next `mspec run` honours them "
              "(the deciding stages are redone with --redo scm)")  # fmt: skip
    q = write_queue(run_dir, decisions=decisions, max_plots=args.max_plots)
    counts = q.groupby("module").size().to_dict() if len(q) else {}
    print(f"queue: {len(q)} spectra {counts}; {run_dir / 'review' / 'queue.parquet'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """Build the ``mspec`` argument parser."""
    from mspec._version import __version__

    p = _Parser(prog="mspec", description=DESCRIPTION, epilog=EPILOG, formatter_class=_Formatter)
    p.add_argument("--version", action="version", version=f"mspec {__version__}")
    p.add_argument("--log", default=None, help="also write the full log (INFO) to this file")
    p.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    p.add_argument("-v", "--verbose", action="store_true", help="INFO messages in the terminal")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    q = sub.add_parser(
        "run",
        help="run the pipeline described by a TOML config (resumable)",
        description="Run ingest -> preprocess -> SCM -> DGCM -> RVMM -> SPMM -> catalog. "
        "Finished chunks are skipped on a rerun.",
        formatter_class=_Formatter,
    )
    q.add_argument("config", help="TOML run configuration ('mspec config --defaults')")
    q.add_argument("--scheduler", default=None, help="dask scheduler address (overrides config)")
    q.add_argument("--workers", type=int, default=None, help="LocalCluster workers (overrides)")
    q.add_argument(
        "--redo",
        action="append",
        metavar="STAGE",
        help="recompute STAGE and every stage that needs it (repeatable)",
    )
    q.add_argument("--quiet", action="store_true", help="no progress bars")
    q.set_defaults(func=_cmd_run)

    q = sub.add_parser(
        "info",
        help="what a store or run directory holds (spectra, stages done/pending)",
        formatter_class=_Formatter,
    )
    q.add_argument("path", help="a Zarr spectra store or a run directory")
    q.set_defaults(func=_cmd_info)

    q = sub.add_parser(
        "config",
        help="print the commented default configuration, or check a file",
        formatter_class=_Formatter,
    )
    q.add_argument("--defaults", action="store_true", help="print the default TOML (default)")
    q.add_argument("--check", metavar="FILE", help="load FILE and print it resolved")
    q.set_defaults(func=_cmd_config)

    q = sub.add_parser(
        "models", help="the default CNN models (build, list, path)", formatter_class=_Formatter
    )
    q.add_argument("action", choices=["build", "list", "path"])
    q.add_argument("--dir", default=None, help="model directory (default: the user cache)")
    q.add_argument(
        "--n-train",
        type=int,
        default=None,
        help="simulated classifier training spectra (default: build_default_models's, 12000)",
    )
    q.add_argument("--epochs", type=int, default=None, help="maximum epochs per CNN (default: 12)")
    q.add_argument("--force", action="store_true", help="rebuild even if present")
    q.set_defaults(func=_cmd_models)

    q = sub.add_parser(
        "ingest", help="ingest LAMOST FITS files into a Zarr store", formatter_class=_Formatter
    )
    q.add_argument(
        "sources", nargs="+", help="directories, globs, files, or a LAMOST catalogue (CSV/Parquet)"
    )
    q.add_argument("store", help="path of the Zarr store to create or append to")
    q.add_argument("--chunk-size", type=int, default=1000, help="spectra per chunk")
    q.add_argument(
        "--allow-outside",
        action="store_true",
        help="let catalogue paths point outside the catalogue's folder",
    )
    q.add_argument(
        "--scheduler",
        default=None,
        help="address of a running dask scheduler, or threads|processes|sync",
    )
    q.set_defaults(func=_cmd_ingest)

    q = sub.add_parser(
        "train",
        help="train a CNN (spt, wdm, dmgm classifiers or tlma ensemble)",
        formatter_class=_Formatter,
    )
    q.add_argument("kind", choices=["spt", "wdm", "dmgm", "tlma"])
    q.add_argument(
        "--store",
        required=True,
        help="Zarr store with the spectra, or a run directory of it ('mspec run': its DGCM "
        "luminosity_class then picks the dM/gM member for labels without a class)",
    )
    q.add_argument(
        "--labels",
        required=True,
        help="label table (CSV/Parquet/FITS), joined to the store on obsid, file name or "
        "position; columns found under their usual names (APOGEE TEFF/LOGG/M_H/ALPHA_M/"
        "ASPCAP_CLASS, teff_lit, class, lumclass, rv ...) or mapped with --columns",
    )
    q.add_argument("--out", required=True, help="output model directory")
    q.add_argument(
        "--on",
        choices=["auto", "obsid", "file", "position"],
        default="auto",
        help="join key (auto: obsid, else file name, else ra/dec)",
    )
    q.add_argument("--radius", type=float, default=3.0, help="position-join radius (arcsec)")
    q.add_argument(
        "--columns",
        action="append",
        metavar="LABEL=COLUMN",
        help="map labels to table columns, e.g. m_h=feh_lit,teff=TEFF (repeatable)",
    )
    q.add_argument(
        "--snr-min", type=float, default=5.0, help="keep S/N_max >= this (paper: 5; 0: off)"
    )
    q.add_argument(
        "--no-consistency",
        action="store_true",
        help="keep labelled spectra whose class disagrees with the LAMOST pipeline's",
    )
    q.add_argument(
        "--finetune",
        metavar="MODEL_DIR",
        default=None,
        help="fine-tune this trained model (same kind; a tlma ensemble or dM/gM pair, or the "
        "default model set of 'mspec models path') instead of training from scratch; a pair "
        "fine-tunes each member on the spectra of its class: the labels' lumclass/"
        "ASPCAP_CLASS, else the run's luminosity_class, else the labels' logg (>= 3.0: dM), "
        "else give --part",
    )
    q.add_argument(
        "--part",
        choices=["dM", "gM"],
        default=None,
        help="tlma: train or fine-tune only this member of the dM/gM pair (the other is "
        "copied from a --finetune pair); labelled spectra without a class count as this one",
    )
    q.add_argument(
        "--zero-point",
        action="store_true",
        help="tlma with --finetune: do not train; shift the model's outputs by the median "
        "offset to the labels (corrects a zero point without compressing the scale; the "
        "lightest label transfer, for a few dozen labelled stars)",
    )
    q.add_argument("--epochs", type=int, default=30, help="maximum epochs")
    q.add_argument("--folds", type=int, default=10, help="k-fold ensemble size (tlma)")
    q.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="spectra per optimizer step (default: 128; 8 when fine-tuning)",
    )
    q.add_argument(
        "--lr",
        type=float,
        default=None,
        help="Adam learning rate (default: 1e-3; when fine-tuning 3e-3 for tlma, 1e-4 for "
        "classifiers)",
    )
    q.add_argument(
        "--calibration",
        choices=["auto", "holdout", "oof", "none"],
        default="auto",
        help="tlma error calibration: held-out set, out-of-fold predictions or none "
        "(auto: holdout when >= 100 spectra)",
    )
    q.add_argument(
        "--augment",
        action="store_true",
        help="classifiers: random RV shifts, flux-calibration tilts and masks while training",
    )
    q.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    q.add_argument("--seed", type=int, default=0, help="random seed")
    q.set_defaults(func=_cmd_train)

    q = sub.add_parser(
        "inspect",
        help="write a run's inspection queue and plots; check a decisions CSV",
        description="Write RUN/review/queue.parquet (spectra the rules cannot settle, and "
        "every |RV| > 150 km/s, with their candidate values) and one PNG per queued spectrum "
        "(the eight DSAL lines marked at each candidate RV). With --decisions, the decisions "
        "(CSV: obsid,module,decision) are checked (bad rows reported and skipped), applied "
        "to the RV reconciliation, and decided spectra leave the queue; the file is saved as "
        "RUN/review/decisions.csv, which the next `mspec run` honours (SCM, DGCM and the RV "
        "reconciliation; rerun with --redo scm to apply them).",
        formatter_class=_Formatter,
    )
    q.add_argument("run", help="run directory")
    q.add_argument("--decisions", metavar="CSV", default=None, help="reviewer decisions")
    q.add_argument("--max-plots", type=int, default=None, help="at most this many PNGs")
    q.set_defaults(func=_cmd_inspect)

    q = sub.add_parser(
        "demo",
        help="simulate a survey with known truth and run the whole pipeline on it",
        description="Simulate a LAMOST-like survey, write it as FITS, ingest it and run the "
        "pipeline on a LocalCluster; writes a catalog, plots and an accuracy report.",
        formatter_class=_Formatter,
    )
    q.add_argument("--out", default="demo_output", help="output directory")
    q.add_argument("--n-spectra", type=int, default=3000, help="spectra in the simulated survey")
    q.add_argument("--seed", type=int, default=42, help="random seed")
    q.add_argument("--workers", type=int, default=2, help="LocalCluster workers")
    q.add_argument(
        "--n-train",
        type=int,
        default=None,
        help="simulated CNN training spectra (default: 2 x n-spectra)",
    )
    q.add_argument("--epochs", type=int, default=8, help="maximum epochs per CNN")
    q.add_argument("--chunk-size", type=int, default=250, help="spectra per chunk")
    q.set_defaults(func=_cmd_demo)

    q = sub.add_parser(
        "report",
        help="write the HTML report of a run directory (RUN/report/index.html)",
        description="One self-contained HTML page (figures embedded, opens offline) with "
        "per-stage counts, run time and cost, the quarantine summary and the figures; the "
        "figures are also saved as PNG files beside it.",
        formatter_class=_Formatter,
    )
    q.add_argument("run", help="a run directory (the run_dir of 'mspec run')")
    q.add_argument("--out", default=None, help="output directory (default: RUN/report)")
    q.add_argument("--examples", type=int, default=4, help="example spectra drawn (0-12)")
    q.set_defaults(func=_cmd_report)
    q = sub.add_parser(
        "catalog",
        help="write a run's catalogs (M_Catalog_V0-V3, recommended, non-M) or diff two runs",
        usage="mspec catalog RUN --out DIR [--format {parquet,fits} ...]\n"
        "       mspec catalog diff RUN_A RUN_B [--sigma SIGMA] [--out CSV]",
        description="'mspec catalog RUN --out DIR' builds M_Catalog_V0..V3, the recommended "
        "catalog (the paper's Table 9) and non-M_Catalog from a run directory and writes them "
        "as partitioned Parquet and FITS, with catalog_summary.csv (counts per stage, like the "
        "paper's Tables 1, 4 and 7) and parameter_flag.json. 'mspec catalog diff RUN_A RUN_B' "
        "lists the spectra added, removed, reclassified, or whose rv/parameters changed "
        "beyond their errors.",
        formatter_class=_Formatter,
    )
    q.add_argument("target", nargs="+", metavar="RUN | diff RUN_A RUN_B",
                   help="a run directory, or 'diff' and two run directories")  # fmt: skip
    q.add_argument("--out", default=None,
                   help="output directory (catalog; required) or CSV file/directory (diff)")  # fmt: skip
    q.add_argument("--format", nargs="+", choices=("parquet", "fits"),
                   default=["parquet", "fits"], help="output formats")  # fmt: skip
    q.add_argument("--sigma", type=float, default=3.0,
                   help="diff: a value changed when |new - old| > SIGMA combined errors")  # fmt: skip
    q.set_defaults(func=_cmd_catalog)

    q = sub.add_parser(
        "compare",
        help="compare a catalog with an external one (APOGEE, Gaia RVS, ...) within 3 arcsec",
        description="Cross-match within --radius arcsec, apply the paper's quality criteria "
        "(snr_u, snr_g > 0; snr_r, snr_i, snr_z > 20; orp < 1 %) and the flags, and report "
        "offset and dispersion per parameter, luminosity class and S/N_i bin; with --out, "
        "also the table, the matches and the figures (paper Figures 13-16).",
        formatter_class=_Formatter,
    )
    q.add_argument("catalog", help="a catalog file written by 'mspec catalog' or a run dir")
    q.add_argument("external", help="external table: Parquet, CSV, FITS, ECSV or VOTable")
    q.add_argument("--columns", action="append", metavar="QUANTITY=COLUMN",
                   help="external column of ra, dec, rv, teff, logg, m_h or alpha_m "
                   "(default: looked up by common names; repeatable, comma-separated)")  # fmt: skip
    q.add_argument("--radius", type=float, default=3.0, help="match radius (arcsec)")
    q.add_argument("--name", default="external", help="label of the external catalog in plots")
    q.add_argument("--no-quality-cuts", action="store_true",
                   help="do not apply the paper's S/N and orp criteria")  # fmt: skip
    q.add_argument("--no-flags", action="store_true",
                   help="also compare values with parameter_flag / rv_flag 0")  # fmt: skip
    q.add_argument("--out", default=None, help="directory for the table, matches and figures")
    q.set_defaults(func=_cmd_compare)
    return p


def cli_reference_markdown() -> str:
    """The command-line reference page (``docs/cli.md``), generated from the parser."""
    import os

    from mspec.pipeline.runner import EXIT_CODES

    old = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "96"  # help text wraps the same everywhere
    try:
        parser = build_parser()
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parts = [
            "# Command line",
            "",
            "<!-- Generated by mspec.cli.cli_reference_markdown(); do not edit by hand. -->",
            "",
            "`pip install mspec` (or `make install`) puts an `mspec` command on the PATH. Every",
            "subcommand calls the public Python API, so the two behave the same. Errors in",
            "arguments, configuration or input print one line (`--debug` shows the traceback);",
            "the full log goes to `--log FILE` (and, for `mspec run`, to `RUN_DIR/run.log`).",
            "",
            "## Exit codes",
            "",
            "| code | meaning |",
            "|---|---|",
            *(f"| {k} | {v} |" for k, v in EXIT_CODES.items()),
            "| 130 | interrupted (Ctrl-C) |",
            "",
            "## `mspec`",
            "",
            "```text",
            parser.format_help().rstrip(),
            "```",
        ]
        for name, sp in sub.choices.items():
            parts += ["", f"## `mspec {name}`", "", "```text", sp.format_help().rstrip(), "```"]
        return "\n".join(parts) + "\n"
    finally:
        if old is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = old


def _one_line(exc: BaseException) -> str:
    msg = str(exc).strip().splitlines()
    text = msg[0] if msg else type(exc).__name__
    if isinstance(exc, FileNotFoundError) and exc.filename and str(exc.filename) not in text:
        text = f"{text}: {exc.filename}"
    return f"mspec: error: {text}"


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``mspec`` command; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logfile = args.log
    if logfile is None and args.command == "demo":
        logfile = str(Path(args.out) / "demo.log")
    _setup_logging(logfile, args.verbose)
    from mspec._exec import LockError
    from mspec.io.store import StoreError
    from mspec.pipeline.runner import RunError, StageChangedError

    try:
        return int(args.func(args) or 0)
    except CLIError as exc:
        if args.debug:
            raise
        print(_one_line(exc), file=sys.stderr)
        return exc.code
    except StageChangedError as exc:
        if args.debug:
            raise
        print(_one_line(exc), file=sys.stderr)
        return 4
    except LockError as exc:
        if args.debug:
            raise
        print(_one_line(exc), file=sys.stderr)
        return 3
    except (
        ValueError,
        TypeError,
        FileNotFoundError,
        NotADirectoryError,
        RunError,
        StoreError,
    ) as exc:
        if args.debug:
            raise
        print(_one_line(exc), file=sys.stderr)
        log.debug("error", exc_info=True)
        return 2
    except KeyboardInterrupt:
        print("mspec: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - one line for users; the log has the traceback
        if args.debug:
            raise
        log.error("failed", exc_info=True)
        print(_one_line(exc) + " (run with --debug for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
