"""The scheduler plugin behind the flowyml page: it counts each run's tasks per step.

Three feeds, all on the scheduler's event loop (see :mod:`.state`):

- the driver's announcements of a run's start and end, through the RPC
  handler ``flowyml_dashboard`` the plugin adds to the scheduler;
- the ``transition`` hook: a task starting to run (``processing``), stopping,
  or erring. It runs for every transition of every task on the cluster, so it
  is a dictionary lookup for a task already seen and a few string checks for
  one that is not; a task that is not of a run going on is left at that;
- the ``log_event`` hook: the outcome events flowyml's tasks publish on
  ``flowyml-<run_id>`` (succeeded, failed, skipped, cached).
"""

from __future__ import annotations

import logging
from collections.abc import Hashable
from typing import Any

from distributed.diagnostics.plugin import SchedulerPlugin

from .state import RUN_ID_LENGTH, Board

__all__ = ["HANDLER", "PAGE_TOPIC", "PLUGIN_NAME", "DashboardPlugin"]

log = logging.getLogger("flowyml.dashboard")

#: The plugin's name on the scheduler (``scheduler.plugins[PLUGIN_NAME]``).
PLUGIN_NAME = "flowyml-dashboard"
#: The scheduler RPC the driver announces runs through.
HANDLER = "flowyml_dashboard"
#: The plugin logs where the page is on this topic, once: drivers read it to link the page.
PAGE_TOPIC = "flowyml-dashboard"

_OUTCOME_TOPIC = "flowyml-"  # + run id: what flowyml's tasks publish (flowyml.tasks._publish)
_OUTCOME_TOPIC_LENGTH = len(_OUTCOME_TOPIC) + RUN_ID_LENGTH


class DashboardPlugin(SchedulerPlugin):
    """Counts the tasks of flowyml runs per step, for the ``/flowyml`` page."""

    name = PLUGIN_NAME

    def __init__(self) -> None:
        self.board = Board()
        self._keys = self.board.keys  # the hot path's dict, one attribute lookup away

    def attach(self, scheduler: Any, page_path: str) -> None:
        """Add the announcement handler to ``scheduler`` and say where the page is."""
        scheduler.handlers[HANDLER] = self.announce
        scheduler.log_event(PAGE_TOPIC, {"path": page_path})

    # -- the driver's announcements ------------------------------------------------------

    def announce(self, action: str = "", message: Any = None) -> str:
        """RPC from a driver: ``action`` is ``"start"`` (``message`` describes the run) or ``"end"``."""
        if action == "start":
            self.board.start(message)
        elif action == "end":
            self.board.end(str(message["run_id"]), str(message.get("status", "succeeded")))
        return "OK"

    # -- hooks ----------------------------------------------------------------------------

    def transition(self, key: Hashable, start: str, finish: str, *args: Any, **kwargs: Any) -> None:
        step = self._keys.get(key)
        if step is None:
            if not self.board.live:
                return
            step = self.board.step_of(key)
            if step is None:
                return
        if finish == "processing":
            step.running += 1
        elif start == "processing":
            step.running -= 1
            if finish == "erred":  # raised (on_failure="raise"), or its workers kept dying
                step.failed += 1
        elif finish == "erred":  # waited on a task that erred: it never runs
            step.skipped += 1
        elif finish == "forgotten":
            del self._keys[key]

    def log_event(self, topic: str, msg: Any) -> None:
        if len(topic) == _OUTCOME_TOPIC_LENGTH and topic.startswith(_OUTCOME_TOPIC):
            self.board.outcomes(topic[-RUN_ID_LENGTH:], msg)

    def remove_client(self, scheduler: Any, client: str) -> None:
        self.board.client_gone(client)
