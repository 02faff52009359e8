"""Shared helpers for the asv benchmarks.

``MSPEC_BENCH_SMOKE=1`` shrinks every size so that ``tests/test_benchmarks_smoke.py`` can run
each benchmark once in seconds.
"""

import os

SMOKE = os.environ.get("MSPEC_BENCH_SMOKE") == "1"


def size(full, smoke):
    """Return ``smoke`` under the smoke test, else ``full``."""
    return smoke if SMOKE else full
