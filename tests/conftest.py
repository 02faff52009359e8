"""Fixtures shared by several test modules."""

import pytest


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module: tiny nets gain nothing from more, and a busy CI box
    makes OpenMP threads spin (10x slowdowns seen with 2 threads on 2 loaded cores)."""
    torch = pytest.importorskip("torch")
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
