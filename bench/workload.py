"""The functions both sides of ``bench/overhead.py`` run (importable by worker processes).

They live in a module, not in the benchmark script, so that flowyml and raw
Dask both pickle them by reference: the comparison then measures scheduling,
not shipping function bodies.
"""

from __future__ import annotations


def noop():
    """An independent step that does nothing."""
    return None


def combine(*parts):
    """The fan-in step: one task that depends on every other."""
    return len(parts)


def link(*parts):
    """A step of the layered DAG: depends on 2-3 steps of the layer before."""
    return None


def burn(n: int = 10_000_000) -> int:
    """Pure-Python CPU work that holds the GIL (about 1 s for the default n here)."""
    total = 0
    for i in range(n):
        total += i * i % 7
    return total
