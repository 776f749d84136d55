"""What the flowyml page shows: the runs on one scheduler and their steps' counts (pure data).

:class:`Board` is fed three ways, all on the scheduler's event loop:

- :meth:`Board.start` / :meth:`Board.end`: the driver announces a run (its
  pipeline, run id, steps with their dependencies, task totals and the
  tasks its cache spared) before the graph is sent, and its end after;
- :meth:`Board.outcomes`: the outcome events flowyml's tasks publish on the
  run's topic ``flowyml-<run_id>`` (succeeded, failed, skipped, cached);
- :meth:`Board.step_of` gives the plugin's transition hook the counters of a
  task key, so it counts the tasks running, and those that erred.

Nothing here imports Dask: the counting is tested without a scheduler.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Hashable
from typing import Any

__all__ = ["FINISHED_RUNS_KEPT", "STEPS_SHOWN", "Board"]

#: Finished runs the page keeps (the oldest is forgotten first): memory stays bounded.
FINISHED_RUNS_KEPT = 20
#: Steps a run shows one by one; the counts of the rest are summed in one line.
STEPS_SHOWN = 200
#: Run ids are 8 hex digits, and keys of a run end in ``-<run_id>`` (see flowyml.run).
RUN_ID_LENGTH = 8

_SUCCEEDED, _FAILED, _SKIPPED, _CACHED = "succeeded", "failed", "skipped", "cached"


class StepCounts:
    """One step of one run: its task total and how many are in each state."""

    __slots__ = ("cached", "deps", "done", "failed", "name", "running", "skipped", "total")

    def __init__(self, name: str, deps: list[int], total: int, cached: int) -> None:
        self.name = name
        self.deps = deps
        self.total = total
        self.cached = cached
        self.running = self.done = self.failed = self.skipped = 0

    def as_dict(self) -> dict[str, Any]:
        finished = self.cached + self.done + self.failed + self.skipped
        running = max(self.running, 0)
        return {
            "name": self.name, "deps": self.deps, "total": self.total,
            "waiting": max(self.total - finished - running, 0), "running": running,
            "done": self.done, "failed": self.failed, "cached": self.cached, "skipped": self.skipped,
        }


class Run:
    """One run as the driver announced it, and its steps' counts."""

    def __init__(self, message: dict[str, Any], now: float) -> None:
        self.run_id = str(message["run_id"])
        self.pipeline = str(message.get("pipeline", ""))
        self.client = message.get("client")
        self.started = now
        self.steps: dict[str, StepCounts] = {}
        for name, deps, total, cached in message.get("steps", ()):
            self.steps[str(name)] = StepCounts(str(name), [int(d) for d in deps], int(total), int(cached))
        self.layers = _layers([step.deps for step in self.steps.values()])

    def as_dict(self, status: str, ended: float | None, now: float) -> dict[str, Any]:
        steps = [step.as_dict() for step in self.steps.values()]
        for step, layer in zip(steps, self.layers):
            step["layer"] = layer
        totals = {name: sum(step[name] for step in steps)
                  for name in ("total", "waiting", "running", "done", "failed", "cached", "skipped")}
        shown, rest = steps[:STEPS_SHOWN], steps[STEPS_SHOWN:]
        return {
            "run_id": self.run_id, "pipeline": self.pipeline, "status": status,
            "started": self.started, "ended": ended, "elapsed_s": round((ended or now) - self.started, 3),
            "totals": totals, "steps": shown, "more_steps": len(rest),
        }


class Board:
    """The runs of one scheduler: those going on, and the last ``kept`` finished ones.

    Examples
    --------
    >>> board = Board()
    >>> board.start({"run_id": "1a2b3c4d", "pipeline": "etl", "client": "c",
    ...              "steps": [["load", [], 2, 0], ["clean", [0], 2, 0]]})
    >>> board.step_of(("load-1a2b3c4d", 0)).running += 1      # the plugin's transition hook
    >>> board.outcomes("1a2b3c4d", [["load", 1, "succeeded", 1, 0.0, 0.1, "w", None]])
    >>> [(s["name"], s["waiting"], s["running"], s["done"]) for s in board.snapshot()["runs"][0]["steps"]]
    [('load', 0, 1, 1), ('clean', 2, 0, 0)]
    """

    def __init__(self, kept: int = FINISHED_RUNS_KEPT, clock: Any = time.time) -> None:
        self.live: dict[str, Run] = {}
        self.finished: deque[dict[str, Any]] = deque(maxlen=kept)
        self._clock = clock
        # key -> its step's counters, found once per key; dropped when Dask forgets the key.
        self.keys: dict[Hashable, StepCounts] = {}

    # -- the driver's announcements --------------------------------------------------

    def start(self, message: dict[str, Any]) -> None:
        run = Run(message, self._clock())
        # A run announced again (a new round after a corrupt cache entry) starts over.
        self.live[run.run_id] = run
        if any(earlier["run_id"] == run.run_id for earlier in self.finished):
            kept = [earlier for earlier in self.finished if earlier["run_id"] != run.run_id]
            self.finished = deque(kept, maxlen=self.finished.maxlen)

    def end(self, run_id: str, status: str = _SUCCEEDED) -> None:
        run = self.live.pop(run_id, None)
        if run is None:
            return
        if status == _SUCCEEDED and any(step.failed for step in run.steps.values()):
            status = _FAILED  # on_failure="continue": the graph finished, some steps failed
        for step in run.steps.values():
            step.running = 0  # tasks cancelled with the run are not running any more
        self.finished.appendleft(run.as_dict(status, self._clock(), self._clock()))

    def client_gone(self, client: str) -> None:
        """The driver's client left without ending its runs (the process died)."""
        for run_id in [r.run_id for r in self.live.values() if r.client == client]:
            self.end(run_id, "lost")

    # -- what the scheduler sees ---------------------------------------------------------

    def step_of(self, key: Hashable) -> StepCounts | None:
        """The counters of a task of a live run, else None (not flowyml's, or not announced)."""
        name = key[0] if type(key) is tuple else key
        if type(name) is not str or len(name) <= RUN_ID_LENGTH + 1 or name[-RUN_ID_LENGTH - 1] != "-":
            return None
        run = self.live.get(name[-RUN_ID_LENGTH:])
        if run is None:
            return None
        # ("process_chunk-<id>", "chunk_0"): a copy of a function added under several names.
        step_name = key[1] if type(key) is tuple and type(key[1]) is str else name[:-RUN_ID_LENGTH - 1]
        step = run.steps.get(step_name)
        if step is not None:
            self.keys[key] = step
        return step

    def outcomes(self, run_id: str, message: Any) -> None:
        """A batch of task outcomes a worker published: ``[step, partition, status, ...]`` each."""
        run = self.live.get(run_id)
        if run is None or not message:
            return
        batch = message if isinstance(message[0], (list, tuple)) else [message]
        steps = run.steps
        for item in batch:
            step = steps.get(item[0])
            if step is None:
                continue
            status = item[2]
            if status == _SUCCEEDED:
                step.done += 1
            elif status == _CACHED:
                step.cached += 1
            elif status == _FAILED:
                step.failed += 1
            elif status == _SKIPPED:
                step.skipped += 1

    def snapshot(self) -> dict[str, Any]:
        """The page's JSON: runs going on (oldest first), then finished ones (newest first)."""
        now = self._clock()
        live = sorted(self.live.values(), key=lambda run: run.started)
        return {
            "now": now,
            "kept_finished": self.finished.maxlen,
            "runs": [run.as_dict("running", None, now) for run in live] + list(self.finished),
        }


def _layers(deps: list[list[int]]) -> list[int]:
    """Each step's column in a layered drawing: one more than its deepest dependency."""
    layers: list[int] = []
    for i, parents in enumerate(deps):
        layers.append(max((layers[d] + 1 for d in parents if d < i), default=0))
    return layers
