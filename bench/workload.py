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


# -- the partitioned shape of ``bench/scaling.py``: a source of N cheap partitions --------------


class NoopPart:
    """One partition of :class:`NoopSource`: loading it returns its index (no file to read)."""

    __slots__ = ("index",)

    def __init__(self, index: int) -> None:
        self.index = index

    def load(self) -> int:
        return self.index


class NoopSource:
    """``count`` in-memory partitions: a source as flowyml sees one (``partitions()``, each with ``load()``)."""

    def __init__(self, count: int) -> None:
        self.count = count
        self.name: str | None = None  # set by Pipeline.add_source

    def partitions(self) -> list[NoopPart]:
        return [NoopPart(i) for i in range(self.count)]


def load_part(index: int) -> int:
    """The raw-Dask twin of ``NoopPart.load``."""
    return index


def double(value: int) -> int:
    """First per-partition step."""
    return 2 * value


def inc(value: int) -> int:
    """Second per-partition step."""
    return value + 1


def total(values) -> int:
    """The reduction: sums its group. Its output is what it sums, so it can run as a tree."""
    return int(sum(values))
