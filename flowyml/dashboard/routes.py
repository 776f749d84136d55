"""The flowyml page's HTTP routes, served by the scheduler's own web server.

``routes`` is what ``distributed.scheduler.http.routes`` modules provide
(as ``distributed.http.scheduler.json`` does): ``/flowyml``, the page, and
``/flowyml/runs.json``, what it draws, read from the plugin every second.
:func:`flowyml.dashboard.dask_setup` adds the same routes to a scheduler whose
web server is already running (a ``--preload``).
"""

from __future__ import annotations

import json
from functools import cache
from importlib import resources
from typing import Any

from distributed.http.utils import RequestHandler

from .plugin import PLUGIN_NAME

__all__ = ["PAGE", "RUNS_JSON", "PageHandler", "RunsHandler", "routes"]

PAGE = "flowyml"
RUNS_JSON = "flowyml/runs.json"


@cache
def page_html() -> str:
    """The page: HTML with its style and script inline (no CDN); no data, so nothing to escape."""
    return resources.files("flowyml.dashboard").joinpath("static", "page.html").read_text(encoding="utf-8")


class PageHandler(RequestHandler):
    def get(self) -> None:
        self.set_header("Content-Type", "text/html; charset=utf-8")
        self.set_header("Cache-Control", "no-store")
        self.write(page_html())


class RunsHandler(RequestHandler):
    def get(self) -> None:
        plugin: Any = self.server.plugins.get(PLUGIN_NAME)
        if plugin is None:
            body: dict[str, Any] = {"runs": [], "error": "the flowyml scheduler plugin is not loaded "
                                                         "(dask scheduler --preload flowyml.dashboard)"}
        else:
            body = plugin.board.snapshot()
        self.set_header("Content-Type", "application/json")
        self.set_header("Cache-Control", "no-store")
        self.write(json.dumps(body))


routes: list[tuple[str, type, dict[str, Any]]] = [
    (f"{PAGE}/?", PageHandler, {}),
    (RUNS_JSON, RunsHandler, {}),
]
