"""Cache keys: one per task, from its step's fingerprint, its params and its inputs.

Keys
----
``task_key`` is a SHA-256 hex digest over a canonical text encoding of the
fingerprint, each param (by name) and each input. Params are encoded by value
(:func:`~flowyml.cache.fingerprint.canonical`): plain data as for fingerprints
(dict order kept, set order not), numpy/pandas objects through
``dask.tokenize`` (with ``ensure_deterministic``), functions by their fingerprint,
other objects through their pickle recipe (``__reduce_ex__``), whose parts must be
encodable in turn. A param that cannot be encoded raises ``CacheError`` naming it.

An input is an upstream task's key (a str), or for a source partition its
identity tuple ``(path, size, mtime_ns, offset, length)``, never its index.
"""

from __future__ import annotations

import os
from typing import Any

from flowyml.cache.fingerprint import KEY_VERSION, NotPlain, Walk, canonical, digest, primitive, type_name
from flowyml.exceptions import CacheError

__all__ = ["task_key"]


def task_key(fingerprint: str, params: dict[str, Any], inputs: list[Any]) -> str:
    """Cache key of one task: its step's code, its params and its inputs.

    Parameters
    ----------
    fingerprint : str
        ``code_fingerprint`` of the step's function.
    params : dict
        The bound parameter values, by name (order does not matter).
    inputs : list
        In order: upstream task keys (str), or for a source partition its identity
        tuple ``(path, size, mtime_ns, offset, length)`` (paths may be ``PathLike``).

    Returns
    -------
    str
        A 64-character hex digest (SHA-256), the same in every process.

    Raises
    ------
    CacheError
        If a param or an input cannot be encoded deterministically; the message
        names it. The caller should run that task uncached.

    Examples
    --------
    >>> key = task_key("f" * 64, {"chunk_id": 3}, [("data/a.csv", 120, 17, 0, None)])
    >>> key == task_key("f" * 64, {"chunk_id": 3}, [("data/a.csv", 120, 17, 0, None)])
    True
    >>> key == task_key("f" * 64, {"chunk_id": 4}, [("data/a.csv", 120, 17, 0, None)])
    False
    """
    if not isinstance(fingerprint, str):
        raise TypeError(
            f"task_key: fingerprint must be a str, got {type(fingerprint).__qualname__}"
        )
    encoded_params = []
    for name in sorted(params):
        try:
            encoded = canonical(params[name], Walk(), plain_only=False)
        except (CacheError, NotPlain, RecursionError) as exc:
            raise CacheError(
                f"param {name!r} (a {type_name(params[name])}) cannot be turned into a "
                f"cache key: {exc}. Pass plain data (numbers, strings, lists, dicts, "
                f"numpy/pandas objects) or give the class a __dask_tokenize__ method; "
                f"the task runs uncached meanwhile."
            ) from exc
        encoded_params.append((name, encoded))
    encoded_inputs = [_encode_input(position, item) for position, item in enumerate(inputs)]
    return digest(("flowyml-task", KEY_VERSION, fingerprint, encoded_params, encoded_inputs))


def _encode_input(position: int, item: Any) -> tuple:
    if isinstance(item, str):
        return ("key", item)
    if isinstance(item, (tuple, list)):
        parts = []
        for part in item:
            if isinstance(part, os.PathLike):
                part = os.fspath(part)
            if part is not None and not isinstance(part, (str, bytes, int, float)):
                raise CacheError(
                    f"input {position} of the task: identity tuple {item!r} holds a "
                    f"{type_name(part)}; expected (path, size, mtime_ns, offset, length)."
                )
            parts.append(primitive(part))
        return ("identity", tuple(parts))
    raise CacheError(
        f"input {position} of the task is a {type_name(item)}; expected an upstream "
        f"task key (str) or a partition identity tuple (path, size, mtime_ns, offset, length)."
    )
