"""The ``mspec`` command line.

Each subcommand parses its arguments here and calls the public Python API, so the CLI and
the library cannot drift apart.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

log = logging.getLogger("mspec")


def _setup_logging(logfile: str | None) -> None:
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if logfile:
        Path(logfile).parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(logfile))
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        handlers=handlers,
        force=True,
    )


def _client(scheduler: str | None):
    """Connect to ``scheduler`` if given; otherwise return None (callers start a LocalCluster)."""
    if not scheduler:
        return None
    from distributed import Client

    return Client(scheduler)


def _cmd_ingest(args: argparse.Namespace) -> int:
    """Ingest on ``--scheduler`` (an address, or threads/processes/sync), else a LocalCluster."""
    import json
    import os

    from mspec.io.store import ingest

    local = {"threads", "processes", "sync", "synchronous", "single-threaded"}
    cluster = None
    if args.scheduler in local:
        client = args.scheduler
    elif args.scheduler:
        client = _client(args.scheduler)
    else:
        from distributed import Client, LocalCluster

        # one single-threaded worker process per core: FITS header parsing holds the GIL
        cluster = LocalCluster(
            n_workers=os.cpu_count() or 1,
            threads_per_worker=1,
            dashboard_address="127.0.0.1:0",
        )
        client = Client(cluster)
    try:
        summary = ingest(
            args.sources, args.store, chunk_size=args.chunk_size, client=client, progress=True
        )
    finally:
        if not isinstance(client, str):
            client.close()
        if cluster is not None:
            cluster.close()
    log.info("ingest summary: %s", summary)
    print(json.dumps(summary, indent=1))
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from mspec.ml.train import train_from_store

    metrics = train_from_store(
        kind=args.kind,
        store=args.store,
        labels=args.labels,
        out_dir=args.out,
        epochs=args.epochs,
        seed=args.seed,
        folds=args.folds,
        progress=True,
    )
    import json

    def _short(m):  # per-epoch histories stay in model.json; print the summary
        return {
            k: (_short(v) if isinstance(v, dict) else v) for k, v in m.items() if k != "history"
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
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    """Build the ``mspec`` argument parser."""
    p = argparse.ArgumentParser(prog="mspec", description=__doc__.splitlines()[0])
    p.add_argument("--log", default=None, help="also write the log to this file")
    sub = p.add_subparsers(dest="command", required=True)

    q = sub.add_parser("ingest", help="ingest LAMOST FITS files into a Zarr store")
    q.add_argument(
        "sources", nargs="+", help="directories, globs, files, or a LAMOST catalogue (CSV/Parquet)"
    )
    q.add_argument("store", help="path of the Zarr store to create or append to")
    q.add_argument("--chunk-size", type=int, default=1000, help="spectra per chunk")
    q.add_argument(
        "--scheduler",
        default=None,
        help="address of a running dask scheduler, or threads|processes|sync",
    )
    q.set_defaults(func=_cmd_ingest)

    q = sub.add_parser("train", help="train a CNN (spt, wdm, dmgm classifiers or tlma ensemble)")
    q.add_argument("kind", choices=["spt", "wdm", "dmgm", "tlma"])
    q.add_argument("--store", required=True, help="Zarr store with the spectra")
    q.add_argument("--labels", required=True, help="label table (CSV/Parquet) keyed by obsid")
    q.add_argument("--out", required=True, help="output model directory")
    q.add_argument("--epochs", type=int, default=30)
    q.add_argument("--folds", type=int, default=10, help="k-fold ensemble size (tlma)")
    q.add_argument("--seed", type=int, default=0)
    q.set_defaults(func=_cmd_train)

    q = sub.add_parser("demo", help="simulate a survey and run everything that exists end to end")
    q.add_argument("--out", default="demo_output", help="output directory")
    q.add_argument("--n-spectra", type=int, default=3000)
    q.add_argument("--seed", type=int, default=42)
    q.add_argument("--workers", type=int, default=2, help="LocalCluster workers")
    q.add_argument(
        "--n-train",
        type=int,
        default=None,
        help="simulated CNN training spectra (default 2 x n-spectra)",
    )
    q.add_argument("--epochs", type=int, default=8, help="maximum epochs per CNN")
    q.set_defaults(func=_cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``mspec`` command."""
    args = build_parser().parse_args(argv)
    _setup_logging(args.log)
    return int(args.func(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
