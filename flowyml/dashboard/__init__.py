"""The flowyml page on the Dask dashboard: ``/flowyml``, beside ``/status``.

It shows the flowyml runs going on on a cluster and the last finished ones
(:data:`~flowyml.dashboard.state.FINISHED_RUNS_KEPT`): for each, its pipeline,
run id, elapsed time and step graph with each step's tasks waiting, running,
done, failed, skipped and cached, redrawn every second.

The scheduler serves it, with no server of its own:

- flowyml's own ``LocalCluster`` loads it by itself;
- any other scheduler, with ``dask scheduler --preload flowyml.dashboard``
  (flowyml installed where the scheduler runs): Dask imports this module and
  calls :func:`dask_setup` once the scheduler's web server runs, which adds the
  scheduler plugin (:class:`~flowyml.dashboard.plugin.DashboardPlugin`) and the
  page's routes (:mod:`flowyml.dashboard.routes`) to it.

A driver links the page (``executor.flowyml_page_link``) when the scheduler
has it, and announces each run's start and end to it
(:mod:`flowyml.dashboard.driver`).
"""

from __future__ import annotations

from typing import Any

__all__ = ["dask_setup", "install"]


def dask_setup(scheduler: Any) -> None:
    """Dask's preload hook (``dask scheduler --preload flowyml.dashboard``)."""
    install(scheduler)


def install(scheduler: Any) -> Any:
    """Serve the page from ``scheduler``: its plugin, its routes. Idempotent; returns the plugin.

    Dask starts a scheduler's web server before it runs preloads, with the
    routes of ``distributed.scheduler.http.routes`` only, so the routes are
    added to the running application (unless that setting already named
    :mod:`flowyml.dashboard.routes`).
    """
    from .plugin import PLUGIN_NAME, DashboardPlugin

    plugin = scheduler.plugins.get(PLUGIN_NAME)
    if plugin is None:
        plugin = DashboardPlugin()
        scheduler.add_plugin(plugin, name=PLUGIN_NAME)
    application = getattr(scheduler, "http_application", None)
    prefix = "/"
    if application is not None:
        from .web import add_routes

        prefix = add_routes(application, scheduler)
    plugin.attach(scheduler, f"{prefix}flowyml")
    return plugin
