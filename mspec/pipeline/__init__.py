"""The pipeline: the paper's modules as persisted, resumable stages, and its runner.

* :mod:`mspec.pipeline.stages` — the stages in order (ingest → preprocess → SCM → DGCM →
  RVMM → SPMM → catalog), what each computes and what is not available yet;
* :mod:`mspec.pipeline.runner` — :func:`run`, chunk-by-chunk persistence, done records,
  stamps, locks, resume;
* :mod:`mspec.pipeline.models` — the CNN models a run uses (default: trained once on the
  simulator into the user cache).
"""

from mspec.pipeline.runner import RunError, RunResult, StageChangedError, run, run_status
from mspec.pipeline.stages import PIPELINE, stage_names

__all__ = [
    "run",
    "run_status",
    "RunResult",
    "RunError",
    "StageChangedError",
    "PIPELINE",
    "stage_names",
]
