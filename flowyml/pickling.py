"""What must reach worker processes: checked to pickle before any task starts, and how it is pickled.

:func:`dumps` is how the process backend pickles tasks and results, and how
a task that sends others' values on in one payload pickles it
(:class:`~flowyml.fuse.CachedReads`): one rule for what travels by value.
"""

from __future__ import annotations

import pickle
from typing import TYPE_CHECKING, Any

import cloudpickle

from .exceptions import NotPicklableError

if TYPE_CHECKING:
    from .plan import Plan

__all__ = ["check_picklable", "dumps"]


def check_picklable(plan: Plan) -> None:
    """Raise :class:`NotPicklableError` naming the first step, param or input that cannot pickle.

    Functions from ``__main__``, notebooks and files loaded by the CLI pickle by
    value (cloudpickle), so they run on process and distributed workers.
    """
    # Each object is checked once: one function added as many steps is pickled
    # once, not once per step (this runs before every process/distributed run).
    seen: set[int] = set()
    for name, value in plan.inputs.items():
        _check(value, f"input {name!r}", "pass it as a file source or build it inside a step", seen)
    for s in plan.steps:
        _check(s.func, f"step {s.name!r} (its function {_name(s.func)})",
               "move what it closes over (locks, connections, open files) inside the function", seen)
        for key, value in s.params.items():
            _check(value, f"step {s.name!r}, param {key!r}", "pass something picklable, such as a path", seen)
        for hook in (s.finalize, s.abort):
            if hook is not None:
                _check(hook, f"step {s.name!r} ({_name(hook)})", "make it a module-level function", seen)


_ATOMIC = (bool, int, float, str, bytes)


def _check(value: Any, what: str, fix: str, seen: set[int]) -> None:
    if value is None or type(value) in _ATOMIC:
        return  # always picklable (subclasses are checked: they may live in __main__)
    if id(value) in seen:  # ids are stable: the plan holds every object until the run ends
        return
    seen.add(id(value))
    try:
        cloudpickle.dumps(value)
    except Exception as exc:
        raise NotPicklableError(
            f"{what} cannot be pickled for the worker processes ({type(exc).__name__}: {exc}); "
            f"{fix}, or use backend='thread' or 'sync', which do not pickle"
        ) from exc


def _name(func: Any) -> str:
    return getattr(func, "__qualname__", None) or repr(func)


def dumps(value: Any) -> bytes:
    """Serialize a task or a result for the process pool: ``pickle``, else ``cloudpickle``.

    Dask's multiprocessing scheduler uses cloudpickle for everything, whose
    Python-level hook runs for every object and looks up every class and
    function by name: much of the pickling cost of a small task. Plain
    ``pickle`` is right whenever everything is importable by the workers; what
    is not (functions or classes from ``__main__``, a notebook, a module
    registered with ``cloudpickle.register_pickle_by_value``, lambdas, closures)
    either fails to pickle or names its module in the bytes, and goes to
    cloudpickle, by value. ``distributed`` serializes the same way.
    """
    try:
        data = pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception:
        return cloudpickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
    if b"__main__" in data or _names_by_value_module(data):
        return cloudpickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
    return data


def _names_by_value_module(data: bytes) -> bool:
    registry = cloudpickle.list_registry_pickle_by_value()
    return bool(registry) and any(name.encode() in data for name in registry)
