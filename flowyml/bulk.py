"""Building many small objects at once without the garbage collector's repeated passes.

Planning, compiling and folding a run's report allocate one or a few small
objects per task and create no reference cycles. CPython's collector runs a
pass every 700 allocations and, as objects survive, full passes over the
whole heap: in a notebook holding large data, compiling a pipeline of many
thousands of steps spent more time in those passes than in compiling. Inside
:func:`no_gc_passes` the collector waits; it runs as usual right after, once.
Never used around user code (steps run with the collector on).
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["no_gc_passes"]


@contextmanager
def no_gc_passes() -> Iterator[None]:
    """Pause automatic garbage collection for the block (re-entrant, restores the old state)."""
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()
