"""The driver's side of the flowyml page: find it, and announce each run to it.

A scheduler that serves the page logs its path on the ``flowyml-dashboard``
topic (:class:`~flowyml.dashboard.plugin.DashboardPlugin`); :func:`page_link`
reads it once per connection. A run on such a scheduler is announced before
its graph is sent (pipeline, run id, its steps with their dependencies, task
totals and the tasks the cache spared: those never reach the scheduler) and
its end after, through the plugin's RPC handler. Nothing is sent to a
scheduler without the page, and a failed announcement never fails a run.
"""

from __future__ import annotations

import logging
from collections.abc import Hashable, Mapping
from typing import Any

__all__ = ["announce_end", "announce_start", "describe_run", "page_link"]

log = logging.getLogger("flowyml")

PAGE_TOPIC = "flowyml-dashboard"  # as flowyml.dashboard.plugin.PAGE_TOPIC (which imports distributed)
HANDLER = "flowyml_dashboard"


def page_link(client: Any, dashboard_link: str | None) -> str | None:
    """The page's address when the client's scheduler serves it, else None."""
    if not dashboard_link:
        return None
    try:
        events = client.get_events(PAGE_TOPIC)
    except Exception as exc:  # an old or locked-down scheduler
        log.debug("could not ask the scheduler for the flowyml page: %s", exc)
        return None
    if not events:
        return None
    path = str(events[-1][1].get("path", "/flowyml"))  # "/dask/flowyml" under --dashboard-prefix /dask
    base, found, _ = dashboard_link.rpartition("/status")
    base = base if found else dashboard_link.rstrip("/")
    prefix = path.removesuffix("/flowyml")
    if prefix and not base.endswith(prefix):  # Dask's link names no prefix unless configured to
        base += prefix
    return f"{base}/flowyml"


def describe_run(graph: Any, dsk: Mapping[Hashable, Any], pipeline: str, client_id: str) -> dict[str, Any]:
    """The announcement of a run: ``steps`` as ``[name, [indices of dependencies], tasks, cached]``.

    A step's dependencies are read from its first and last tasks (every task
    is ``(callable, *keys or lists of keys)``, see :mod:`flowyml.compile`);
    a task of the compiled graph missing from ``dsk`` was culled by the cache.
    """
    step_of = graph.task_step()
    index = {name: i for i, name in enumerate(graph.step_keys)}
    culled = dsk is not graph.dsk
    steps = []
    for name, keys in graph.step_keys.items():
        deps: set[int] = set()
        for key in {keys[0], keys[-1]} if keys else ():
            task = graph.dsk.get(key)
            for arg in task[1:] if type(task) is tuple else ():
                for dep in arg if isinstance(arg, list) else (arg,):
                    parent = step_of.get(dep) if isinstance(dep, Hashable) else None
                    if parent is not None and parent != name:
                        deps.add(index[parent])
        cached = sum(1 for key in keys if key not in dsk) if culled else 0
        steps.append([name, sorted(deps), len(keys), cached])
    return {"run_id": graph.run_id, "pipeline": pipeline, "client": client_id, "steps": steps}


def announce_start(client: Any, hooks: Any, dsk: Mapping[Hashable, Any]) -> bool:
    """Announce the run of ``hooks`` (a RunRecorder) to the page; True if it was."""
    graph = getattr(hooks, "graph", None)
    if graph is None:
        return False
    try:
        message = describe_run(graph, dsk, getattr(hooks, "pipeline", "") or "flowyml", client.id)
        _send(client, "start", message)
    except Exception as exc:  # the page is a convenience: the run goes on without it
        log.debug("could not announce run %s to the flowyml page: %s", hooks.run_id, exc)
        return False
    return True


def announce_end(client: Any, run_id: str, status: str) -> None:
    try:
        _send(client, "end", {"run_id": run_id, "status": status})
    except Exception as exc:
        log.debug("could not announce the end of run %s to the flowyml page: %s", run_id, exc)


def _send(client: Any, action: str, message: dict[str, Any]) -> None:
    client.sync(getattr(client.scheduler, HANDLER), action=action, message=message)
