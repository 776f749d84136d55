"""The task cache: a rerun loads every task whose code, params and inputs did not change.

How the core uses it
--------------------
On the driver, before anything runs, every task gets a key, bottom-up::

    fingerprint = code_fingerprint(step_function)          # once per step
    key = task_key(fingerprint, bound_params, input_keys)  # per task (per partition)

``input_keys`` lists, in order, the keys of the upstream tasks, or for a source
partition its identity tuple ``(path, size, mtime_ns, offset, length)``, never its
index. Tasks whose key ``Cache.contains`` become "load from cache" tasks; the others
compute and call ``Cache.store`` on the worker that computed them. ``Cache.load``
raises :class:`~flowyml.exceptions.CacheError` for a missing, truncated, corrupt or
unreadable entry; the caller warns and recomputes.

The modules, in the order a cached run uses them:

- :mod:`~flowyml.cache.fingerprint`: what a step's code is (``code_fingerprint``)
  and the canonical encoding of values;
- :mod:`~flowyml.cache.keys`: one key per task (``task_key``);
- :mod:`~flowyml.cache.rewrite`: the compiled graph rewritten so that cached
  tasks load and the others store (``plan_cached_run``);
- :mod:`~flowyml.cache.tasks`: the load, restage and store tasks it puts in the graph;
- :mod:`~flowyml.cache.store`: the directory of entries, written atomically and
  verified when read (``Cache``);
- :mod:`~flowyml.cache.serialization`: how a value becomes an entry's payload.
"""

from __future__ import annotations

from flowyml.cache.fingerprint import code_fingerprint
from flowyml.cache.keys import task_key
from flowyml.cache.rewrite import CachedGraph, plan_cached_run, warn_stale
from flowyml.cache.store import CACHE_DIR_ENV, Cache, default_cache_dir, open_cache

__all__ = [
    "CACHE_DIR_ENV",
    "Cache",
    "CachedGraph",
    "code_fingerprint",
    "default_cache_dir",
    "open_cache",
    "plan_cached_run",
    "task_key",
    "warn_stale",
]
