"""The pipeline's stages: ingest → preprocess → SCM → RVMM → DGCM → SPMM → catalog.

Each :class:`PipelineStage` builds, lazily, the outputs of one paper module from the spectra
store and the persisted outputs of the stages before it; the runner
(:mod:`mspec.pipeline.runner`) persists them chunk by chunk. A part of a module that is not
built yet is listed by :meth:`PipelineStage.unavailable` and reported as *not available* —
never faked.

Order: the paper's modules decide in the order SCM → DGCM → RVMM (the catalog versions
V1, V2, V3 follow it). mspec *measures* the RVs (TM, TML7500, line RVs) of every spectrum
before DGCM, because DGCM's spectral indices are measured in the rest frame; this changes no
decision, only when a quantity is computed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import xarray as xr

__all__ = ["PipelineStage", "PIPELINE", "stage_names", "RunContext"]


@dataclass
class RunContext:
    """What the stage builders need besides the data: config, models, templates."""

    config: object
    models_dir: object = None
    templates: xr.Dataset | None = None
    templates_hash: str = ""
    model_hashes: dict = field(default_factory=dict)
    #: reviewers' decisions (``RUN/review/decisions.csv`` read by mspec.review), or None
    decisions: object = None
    decisions_hash: str = ""
    #: population statistics of stages with a ``prepare`` step, by stage name
    stats: dict = field(default_factory=dict)


def _outputs(res: xr.Dataset, names) -> xr.Dataset:
    return res[[n for n in names if n in res.data_vars]]


# --------------------------------------------------------------------------- builders


def _preprocess(ctx: RunContext, ds: xr.Dataset) -> xr.Dataset:
    from mspec.preprocessing import preprocess

    cfg = ctx.config.preprocess
    out = preprocess(ds, recipe="cnn", max_gap=cfg.max_gap, fill_value=cfg.fill_value, merge=False)
    return out


def _predict(ctx: RunContext, ds: xr.Dataset, kind: str, **kw) -> xr.Dataset:
    from mspec.ml.infer import predict

    dev = ctx.config.ml.device or None
    return predict(
        ds,
        ctx.models_dir / kind,
        batch_size=ctx.config.ml.batch_size,
        device=dev,
        merge=False,
        **kw,
    )


def _gaia_columns(ctx: RunContext, ds: xr.Dataset) -> xr.Dataset | None:
    """The store's Gaia/WISE columns, or those joined from the configured ``[gaia] hats``
    catalogue and ``[gaia] table`` (the table's columns win), or None."""
    from mspec import cmd

    cfg = ctx.config.gaia
    if cfg.hats or cfg.table:
        out = ds
        if cfg.hats:
            from mspec.io.gaia_hats import join_gaia_hats

            out = join_gaia_hats(out, cfg.hats, radius_arcsec=cfg.radius, merge=True)
        if cfg.table:
            table = cmd.load_gaia_table(cfg.table)
            on = "obsid" if "obsid" in table.columns else "position"
            out = cmd.join_gaia(out, table, on=on, radius_arcsec=cfg.radius, merge=True)
        return out
    if all(v in ds.variables for v in cmd.place_dataset.stage.inputs):
        return ds
    return None


def has_gaia(ctx: RunContext, ds: xr.Dataset) -> bool:
    """Whether the CMD can be placed (Gaia columns in the store, a configured table or HATS
    catalogue)."""
    from mspec import cmd

    return bool(ctx.config.gaia.table or ctx.config.gaia.hats) or all(
        v in ds.variables for v in cmd.place_dataset.stage.inputs
    )


def _scm(ctx: RunContext, ds: xr.Dataset) -> xr.Dataset:
    from mspec import cmd
    from mspec.scm import select_m_stars

    parts = [_predict(ctx, ds, "spt"), _predict(ctx, ds, "wdm")]
    gaia = _gaia_columns(ctx, ds)
    if gaia is not None:
        placed = cmd.place_dataset(gaia, merge=False)
        parts.append(placed)
        if ctx.config.gaia.table or ctx.config.gaia.hats:  # keep the joined columns
            joined = [v for v in gaia.data_vars if v not in ds.data_vars]
            parts.append(gaia[joined])
    measured = xr.merge(parts, compat="override", join="exact")
    decided = select_m_stars(
        ds.assign(measured.data_vars),
        decisions=ctx.decisions,
        entry=ctx.config.selection.entry,
        merge=False,
    )
    return xr.merge([measured, decided], compat="override", join="exact")


def _dgcm(ctx: RunContext, ds: xr.Dataset) -> xr.Dataset:
    from mspec.dgcm import split_dwarfs_giants
    from mspec.indices import spectral_indices

    parts = [
        _predict(ctx, ds, "dmgm"),
        spectral_indices(ds, rv="rv_tm", merge=False),
    ]
    measured = xr.merge(parts, compat="override", join="exact")
    decided = split_dwarfs_giants(
        ds.assign(measured.data_vars), decisions=ctx.decisions, merge=False
    )
    return xr.merge([measured, decided], compat="override", join="exact")


def _rvmm(ctx: RunContext, ds: xr.Dataset) -> xr.Dataset:
    from mspec.rv import template_match

    rv = ctx.config.rv
    opts = dict(
        templates=ctx.templates,
        weighting=rv.weighting,
        oversample=rv.oversample,
        fit_halfwidth=rv.fit_halfwidth,
        min_pixels=rv.min_pixels,
        mask_tellurics=rv.mask_tellurics,
        engine=rv.engine,
        device=rv.device or None,
        quality=True,  # edge / ambiguous-minimum bits and reduced chi2 for reconciliation
        merge=False,
    )
    tm = template_match(ds, **opts)
    tml = template_match(ds, wave_max=rv.tml_wave_max, **opts)
    parts = [tm, tml]
    from mspec.rv.lines import line_rvs

    parts.append(line_rvs(ds.assign(rv_tm=tm["rv_tm"]), rv_init="rv_tm", merge=False))
    return xr.merge(parts, compat="override", join="exact")


def _reconcile_stats(ctx: RunContext, ds: xr.Dataset) -> dict:
    """The run's residual distributions (paper: σ of TM − LAMOST, DSAL − LAMOST), M stars."""
    from mspec.rv.reconcile import rv_residual_sigmas

    where = ds["is_m"] if "is_m" in ds.variables else None
    return rv_residual_sigmas(ds, where=where)


def _reconcile(ctx: RunContext, ds: xr.Dataset) -> xr.Dataset:
    from mspec.rv.reconcile import reconcile_rv

    th = ctx.config.thresholds
    return reconcile_rv(
        ds,
        sigmas=ctx.stats["reconcile"],
        decisions=ctx.decisions,
        tm_sigma=th.tm_sigma,
        dsal_sigma=th.dsal_sigma,
        inspect_abs_rv=th.inspect_abs_rv,
        merge=False,
    )


def _spmm(ctx: RunContext, ds: xr.Dataset) -> xr.Dataset:
    from mspec.ml.infer import predict
    from mspec.preprocessing import preprocess

    # the paper's step 2: rest frame from the TM radial velocity, then the dM or gM
    # ensemble chosen by CNN-dMgM's class
    cfg = ctx.config.preprocess
    rest = preprocess(
        ds[["flux", "ivar", "ormask"]],
        recipe="tlma",
        rv=ds["rv_tm"],
        max_gap=cfg.max_gap,
        fill_value=cfg.fill_value,
        merge=False,
    )
    return predict(
        rest,
        ctx.models_dir / "tlma",
        lumclass=ds["luminosity_class"],
        batch_size=ctx.config.ml.batch_size,
        device=ctx.config.ml.device or None,
        merge=False,
    )


# --------------------------------------------------------------------------- declarations


@dataclass(frozen=True)
class PipelineStage:
    """One persisted stage of a run.

    Parameters
    ----------
    name : str
        Stage (and Zarr group) name.
    module : str
        Paper module.
    needs : tuple of str
        Earlier stages whose persisted outputs it reads.
    inputs : tuple of str
        Store / upstream variables it reads.
    sections : tuple of str
        Config sections its results depend on (a change refuses a resume).
    steps : tuple of str
        What it computes, in words (with versions in :attr:`version`).
    version : str
        Bumped when the results change.
    build : callable
        ``(RunContext, Dataset) -> Dataset`` of outputs, lazy.
    uses_models : tuple of str
        Model kinds whose hashes stamp the stage.
    uses_templates : bool
        Whether the template library's hash stamps the stage.
    uses_decisions : bool
        Whether the reviewers' decisions (``RUN/review/decisions.csv``) stamp the stage.
    prepare : callable, optional
        ``(RunContext, Dataset) -> dict``: population statistics computed once over the
        whole input before the chunks (persisted as ``RUN/stages/<name>.stats.json`` and
        reused on resume; ``--redo`` recomputes them).
    planned : tuple of (str, callable)
        Parts of the paper module not built yet: (description, availability check).
    """

    name: str
    module: str
    needs: tuple[str, ...]
    inputs: tuple[str, ...]
    sections: tuple[str, ...]
    steps: tuple[str, ...]
    version: str
    build: Callable[[RunContext, xr.Dataset], xr.Dataset] | None
    uses_models: tuple[str, ...] = ()
    uses_templates: bool = False
    uses_decisions: bool = False
    planned: tuple[tuple[str, Callable[[], bool]], ...] = ()
    prepare: Callable[[RunContext, xr.Dataset], dict] | None = None

    def unavailable(self) -> list[str]:
        """Parts of this paper module that are not available in this mspec."""
        return [desc for desc, ok in self.planned if not ok()]

    def full_version(self) -> str:
        """Version including the optional parts present (their arrival changes results)."""
        extra = [desc for desc, ok in self.planned if ok()]
        return self.version + ("+" + "+".join(extra) if extra else "")


PIPELINE: tuple[PipelineStage, ...] = (
    PipelineStage(
        name="preprocess",
        module="preprocess",
        needs=(),
        inputs=("flux", "ivar", "ormask"),
        sections=("preprocess",),
        steps=("paper steps 1, 3, 4a, 5 (recipe 'cnn'): flux_grid, orp_*, status",),
        version="1",
        build=_preprocess,
    ),
    PipelineStage(
        name="scm",
        module="SCM",
        needs=("preprocess",),
        inputs=("flux_grid",),
        sections=("ml", "gaia", "selection"),
        steps=(
            "CNN-SPT",
            "CNN-WDM",
            "Gaia CMD placement where Gaia data exist",
            "SCM decision rules (select_m_stars)",
        ),
        version="4",
        build=_scm,
        uses_models=("spt", "wdm"),
        uses_decisions=True,
    ),
    PipelineStage(
        name="rvmm",
        module="RVMM",
        needs=(),
        inputs=("flux", "ivar", "ormask"),
        sections=("rv", "templates"),
        steps=("TM", "TML7500", "line-by-line RVs DSAL I/II, DSEL (line_rvs)"),
        version="3",
        build=_rvmm,
        uses_templates=True,
    ),
    PipelineStage(
        name="dgcm",
        module="DGCM",
        needs=("preprocess", "scm", "rvmm"),
        inputs=("flux_grid", "flux", "ivar", "ormask", "rv_tm", "is_m"),
        sections=("ml",),
        steps=(
            "CNN-dMgM",
            "spectral indices (CaH, TiO5, zeta, K I, Na I, Ca II, ZrO, C2) in the TM rest frame",
            "DGCM decision rules (split_dwarfs_giants)",
        ),
        version="3",
        build=_dgcm,
        uses_models=("dmgm",),
        uses_decisions=True,
    ),
    PipelineStage(
        name="reconcile",
        module="RVMM",
        needs=("scm", "rvmm"),
        inputs=("lamost_rv", "mjd", "rv_tm", "tm_status"),
        sections=("thresholds",),
        steps=("RV reconciliation (reconcile_rv): rv, rv_err, rv_from, rv_flag, rv_inspect",),
        version="1",
        build=_reconcile,
        uses_decisions=True,
        prepare=_reconcile_stats,
    ),
    PipelineStage(
        name="spmm",
        module="SPMM",
        needs=("dgcm", "rvmm"),
        inputs=("flux", "ivar", "ormask", "rv_tm", "luminosity_class"),
        sections=("preprocess", "ml"),
        steps=("CNN-TLMA dM/gM ensembles (by DGCM's luminosity class) in the TM rest frame",),
        version="2",
        build=_spmm,
        uses_models=("tlma",),
    ),
)

#: Catalog parts not built yet.
CATALOG_PLANNED: tuple[str, ...] = ()


def stage_names() -> list[str]:
    """Persisted stage names in run order."""
    return [s.name for s in PIPELINE]


def downstream(names) -> list[str]:
    """The named stages and every stage that needs them, directly or not, in run order."""
    hit = set(names)
    for s in PIPELINE:
        if hit.intersection(s.needs):
            hit.add(s.name)
    return [s.name for s in PIPELINE if s.name in hit]
