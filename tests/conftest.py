"""Shared fixtures: one open executor per backend for the whole session.

Every behaviour test takes ``executor`` and so runs on all four backends; the
pools and the LocalCluster are started once, as a notebook user's would be
inside ``with ParallelExecutor(...)``.
"""

from __future__ import annotations

import pytest

from flowyml import ParallelExecutor

BACKENDS = ["sync", "thread", "process", "distributed"]


@pytest.fixture(scope="session")
def _executors():
    opened = {}
    yield opened
    for executor in opened.values():
        executor.close()


def _open(name: str, opened: dict) -> ParallelExecutor:
    if name not in opened:
        executor = ParallelExecutor(max_workers=2, backend=name)
        executor.__enter__()
        opened[name] = executor
    return opened[name]


@pytest.fixture(params=BACKENDS)
def executor(request, _executors) -> ParallelExecutor:
    return _open(request.param, _executors)


@pytest.fixture(params=["thread", "process"])
def pooled_executor(request, _executors) -> ParallelExecutor:
    """Backends where several tasks run at once and the driver waits for them."""
    return _open(request.param, _executors)


@pytest.fixture(params=["sync", "thread"])
def in_process_executor(request, _executors) -> ParallelExecutor:
    """Backends whose steps run in the driver's own process: nothing is pickled."""
    return _open(request.param, _executors)


@pytest.fixture(params=["process", "distributed"])
def worker_executor(request, _executors) -> ParallelExecutor:
    """Backends whose steps run in worker processes that can die on their own."""
    return _open(request.param, _executors)


@pytest.fixture
def process_executor(_executors) -> ParallelExecutor:
    """The process backend: its pool, not Dask, recovers from a dead worker."""
    return _open("process", _executors)


@pytest.fixture
def backend(executor) -> str:
    return executor.backend
