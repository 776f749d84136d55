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


@pytest.fixture(params=BACKENDS)
def executor(request, _executors) -> ParallelExecutor:
    name = request.param
    if name not in _executors:
        executor = ParallelExecutor(max_workers=2, backend=name)
        executor.__enter__()
        _executors[name] = executor
    return _executors[name]


@pytest.fixture
def backend(executor) -> str:
    return executor.backend
