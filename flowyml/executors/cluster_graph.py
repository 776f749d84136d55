"""A run's graph as the distributed scheduler gets it: spans, resource restrictions, its reporting tasks.

- Every task is annotated with its step's Dask span, ``(pipeline, step)``
  inside ``(pipeline,)``, so Dask's Fine Performance Metrics break a
  cluster's time down by pipeline and step.
- A step's ``resources`` become Dask resource restrictions: per-key layer
  annotations of a ``HighLevelGraph``.
- :func:`reporting_tasks` counts the tasks whose outcome the driver waits
  for on the run's event topic.
"""

from __future__ import annotations

import uuid
from collections.abc import Hashable, Mapping
from typing import Any

from .._compat import graph_expression

__all__ = ["cluster_graph", "reporting_tasks"]


def cluster_graph(dsk: Mapping, run_id: str, pipeline: str) -> Any:
    """The graph as a Dask expression: each task in its step's span, and restricted where steps ask.

    Built here with the run id as its token: ``client.get`` would otherwise
    hash every task (pickling each flowyml task object) just to name it.
    """
    from dask.highlevelgraph import HighLevelGraph, MaterializedLayer

    dsk = dsk if isinstance(dsk, dict) else dict(dsk)
    spans = _StepSpans(pipeline, f"-{run_id}")
    restricted = _resources_by_key(dsk)
    layers: dict[str, MaterializedLayer] = {}
    groups: dict[tuple, dict] = {}
    plain = {}
    for key, task in dsk.items():
        resources = restricted.get(key)
        if resources is None:
            plain[key] = task
        else:
            groups.setdefault(tuple(sorted(resources.items())), {})[key] = task
    layers[f"flowyml-{run_id}"] = MaterializedLayer(plain, annotations={"span": spans})
    for i, (pairs, tasks) in enumerate(groups.items()):
        layers[f"flowyml-{run_id}-resources-{i}"] = MaterializedLayer(
            tasks, annotations={"resources": dict(pairs), "span": spans}
        )
    hlg = HighLevelGraph(layers, {name: set() for name in layers})
    return graph_expression(hlg, f"flowyml-{run_id}")


class _StepSpans:
    """A run's Dask spans: ``(pipeline, step)`` inside ``(pipeline,)``, as ``distributed.span`` makes them.

    Dask then breaks a run's time down by pipeline and step (the dashboard's
    Fine Performance Metrics, ``Span.cumulative_worker_metrics``). Dask gives
    a span whole task groups: copies of one function grouped under one key
    name (see :mod:`flowyml.compile`) share the span named after that name.
    Fresh ids per run, as ``span`` makes: two runs are two spans.
    """

    def __init__(self, pipeline: str, suffix: str) -> None:
        self._pipeline = pipeline
        self._suffix = suffix
        self._ids = (str(uuid.uuid4()),)
        self._by_name: dict[str, dict[str, tuple[str, ...]]] = {}

    def __call__(self, key: Hashable) -> dict[str, tuple[str, ...]]:
        name = key[0] if isinstance(key, tuple) else key
        name = str(name).removesuffix(self._suffix)
        annotation = self._by_name.get(name)
        if annotation is None:  # one per step: pickled once however many tasks share it
            annotation = {"name": (self._pipeline, name), "ids": (*self._ids, str(uuid.uuid4()))}
            self._by_name[name] = annotation
        return annotation


def reporting_tasks(dsk: Mapping) -> int:
    """How many tasks publish an outcome: flowyml's own (they carry the run id), wrapped or not.

    A cached run wraps each computed task in the one that stores its result
    (``.task``): counted short, the driver would stop listening before the
    last batches of events arrive, and lose them.
    """
    return sum(1 for task in dsk.values() if isinstance(task, tuple) and task and _reports(task[0]))


def _reports(func: Any) -> bool:
    while func is not None and not hasattr(func, "run_id"):
        func = getattr(func, "task", None)
    return func is not None


def _resources_by_key(dsk: Mapping) -> dict[Hashable, Mapping[str, float]]:
    out = {}
    for key, task in dsk.items():
        spec = getattr(task[0], "spec", None) if isinstance(task, tuple) and task else None
        resources = getattr(spec, "resources", None)
        if resources:
            out[key] = resources
    return out
