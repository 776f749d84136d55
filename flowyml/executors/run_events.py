"""One distributed run's events: live task outcomes, forwarded worker logs, lost workers.

:class:`_RunEvents` subscribes the driver's client to the run's event topics
before the graph is sent, feeds each task's outcome to the run's progress and
report as workers publish them (in batches, see ``FLUSH_DELAY`` in
:mod:`flowyml.executors.distributed`), and after the run catches up on
events that arrived late, notes workers lost meanwhile and tidies the
scheduler (:func:`_after_run`, run on the scheduler).
"""

from __future__ import annotations

import html
import logging
import threading
import time
import weakref
from typing import Any

from .._compat import drop_topics, topic_events
from ..logs import LOG_TOPIC, replay
from .base import RunHooks

log = logging.getLogger("flowyml")

#: Workers report each finished task on this topic (see ``tasks.Outcome``).
EVENT_TOPIC = "flowyml-{run_id}"

#: Seconds a worker holds task events before sending them as one message. Each
#: event is a message the scheduler handles and forwards; batching keeps that
#: cost per worker per interval instead of per task, and progress still moves
#: within this delay.
FLUSH_DELAY = 0.02

#: Seconds to wait, after the results are in, for the last batches of events.
CATCH_UP_TIMEOUT = 2.0
#: After a failure, the events are in once none came for this long (several flushes).
QUIET_AFTER = 5 * FLUSH_DELAY

def _step_of(key: Any, suffix: str) -> tuple[str, int | None]:
    """``("clean-1a2b3c4d", 3)`` -> ``("clean", 3)``; ``"load-1a2b3c4d"`` -> ``("load", None)``.

    A copy of a function added under several names, ``("process_chunk-1a2b3c4d",
    "chunk_0")``, -> ``("chunk_0", None)``.
    """
    if isinstance(key, tuple) and isinstance(key[1], str):
        return key[1], None
    name, partition = (key[0], key[1]) if isinstance(key, tuple) else (key, None)
    name = str(name)
    if suffix and name.endswith(suffix):
        name = name[: -len(suffix)]
    return name, partition


class _RunEvents:
    """One run's event topics: outcomes (live progress) and forwarded logs."""

    def __init__(self, client: Any, hooks: RunHooks, suffix: str) -> None:
        self.client = client
        self.hooks = hooks
        self.suffix = suffix
        self.outcome_topic = EVENT_TOPIC.format(run_id=hooks.run_id)
        self.log_topic = LOG_TOPIC.format(run_id=hooks.run_id)
        self.started = time.time()
        self.received: dict[tuple[str, int | None], Any] = {}
        self.count = 0  # events received, repeats included (the scheduler counts them too)
        self.closed = False
        self._expected: int | None = None
        self._all_in = threading.Event()
        self._arrived = threading.Event()  # set by every outcome event (see settle)

    def subscribe(self) -> None:
        # Sent on the client's ordered stream ahead of the graph, so no event of
        # this run can reach the scheduler before the subscription. The client
        # keeps handlers after unsubscribing: they hold this object weakly, so a
        # finished run's recorder and graph are not kept alive by them.
        self.client.subscribe_topic(self.outcome_topic, _weak_handler(self, "_on_outcome"))
        self.client.subscribe_topic(self.log_topic, _weak_handler(self, "_on_log"))

    def _on_outcome(self, event: tuple[float, Any]) -> None:
        from ..tasks import outcome_from_event

        if self.closed:  # in flight when the run ended: the record is complete without it
            return
        message = event[1]
        batch = message if message and isinstance(message[0], (list, tuple)) else [message]
        self.count += 1
        for item in batch:
            outcome = outcome_from_event(item)
            self.received[(outcome.step, outcome.partition)] = outcome
            self.hooks.task_reported(outcome)
        if self._expected is not None and len(self.received) >= self._expected:
            self._all_in.set()
        self._arrived.set()

    def wait_for(self, expected: int) -> None:
        """Wait (briefly) until ``expected`` tasks have reported; the rest is caught up later."""
        self._expected = expected
        if len(self.received) >= expected:
            return
        if not self._all_in.wait(CATCH_UP_TIMEOUT):
            log.debug("run %s: %d of %d task events arrived in time", self.hooks.run_id,
                      len(self.received), expected)

    def settle(self) -> None:
        """After a failure: wait while events still arrive (a worker flushes every FLUSH_DELAY).

        The run's end does not say how many tasks finished, so this waits until
        no event came for a few flush delays, at most CATCH_UP_TIMEOUT.
        """
        deadline = time.monotonic() + CATCH_UP_TIMEOUT
        while time.monotonic() < deadline:
            self._arrived.clear()
            if not self._arrived.wait(QUIET_AFTER):
                return

    def _on_log(self, event: tuple[float, Any]) -> None:
        replay(event[1])

    def finish(self) -> None:
        """Stop listening, catch up on missed outcomes, note lost workers, tidy the scheduler."""
        for topic in (self.outcome_topic, self.log_topic):
            self.client.unsubscribe_topic(topic)
        try:
            after = self.client.run_on_scheduler(
                _after_run,
                topics=[self.outcome_topic, self.log_topic],
                received=self.count,
                suffix=self.suffix,
                since=self.started - 300,  # scheduler clocks may differ a little
            )
        except Exception as exc:  # an older or locked-down scheduler: public API only
            log.debug("could not query the scheduler after the run: %s", exc)
            after = {"missed": [m for _, m in self.client.get_events(self.outcome_topic)], "lost": []}
        if after["missed"]:
            self._catch_up(after["missed"])
        if after["lost"]:
            self._note_lost(after["lost"])
        self.closed = True

    def _catch_up(self, messages: list[Any]) -> None:
        from ..tasks import outcome_from_event

        items = [item for m in messages for item in (m if m and isinstance(m[0], (list, tuple)) else [m])]
        for item in items:
            outcome = outcome_from_event(item)
            if (outcome.step, outcome.partition) not in self.received:
                self.received[(outcome.step, outcome.partition)] = outcome
                self.hooks.task_reported(outcome)

    def _note_lost(self, lost: list[dict[str, Any]]) -> None:
        from ..tasks import Outcome

        extra: dict[tuple[str, int | None], int] = {}
        for event in lost:
            for key in event["processing"]:
                where = _step_of(key, self.suffix)
                extra[where] = extra.get(where, 0) + 1
            log.warning(
                "worker %s died during run %s while running %s; results lost with it: %s "
                "(Dask reruns lost tasks on other workers, up to "
                "distributed.scheduler.allowed-failures times)",
                event["worker"],
                self.hooks.run_id,
                _names(event["processing"], self.suffix) or "nothing of this run",
                _names(event["recomputed"], self.suffix) or "none",
            )
        for where, count in extra.items():
            outcome = self.received.get(where)
            if outcome is not None:  # the record counts the attempt that died with its worker
                fields = [getattr(outcome, name) for name in Outcome.__slots__]
                fields[Outcome.__slots__.index("attempts")] += count
                self.hooks.task_reported(Outcome(*fields))
        add_html = getattr(self.hooks, "add_report_html", None)
        if add_html is not None:
            add_html(_lost_workers_html(lost, self.suffix, self.started))


def _weak_handler(target: _RunEvents, method: str) -> Any:
    ref = weakref.ref(target)

    def handle(event: tuple[float, Any]) -> None:
        obj = ref()
        if obj is not None:
            getattr(obj, method)(event)

    return handle


def _names(keys: list[Any], suffix: str) -> str:
    parts = []
    for key in keys:
        step, partition = _step_of(key, suffix)
        parts.append(step if partition is None else f"{step}[{partition}]")
    return ", ".join(sorted(parts))


def _lost_workers_html(lost: list[dict[str, Any]], suffix: str, started: float) -> str:
    rows = "".join(
        f"<tr><td><code>{html.escape(str(e['worker']))}</code></td>"
        f"<td>{max(e['time'] - started, 0):.2f}s</td>"
        f"<td>{html.escape(_names(e['processing'], suffix)) or '-'}</td>"
        f"<td>{html.escape(_names(e['recomputed'], suffix)) or '-'}</td></tr>"
        for e in lost
    )
    return (
        "<h2>Workers lost</h2><p>These Dask workers died during the run. Dask recomputed their "
        "tasks on other workers; each task that was running counts the lost attempt.</p>"
        "<table><thead><tr><th>worker</th><th>died after</th><th>running (recomputed)</th>"
        f"<th>finished results lost (recomputed)</th></tr></thead><tbody>{rows}</tbody></table>"
    )


def _after_run(
    dask_scheduler: Any, topics: list[str], received: int, suffix: str, since: float
) -> dict[str, list]:
    """On the scheduler: the run's missed outcome events, its lost tasks; drops its topics."""
    count, events = topic_events(dask_scheduler, topics[0])
    missed = [msg for _, msg in events] if count > received else []
    drop_topics(dask_scheduler, topics)

    def ours(key: Any) -> bool:
        name = key[0] if isinstance(key, tuple) else key
        return isinstance(name, str) and name.endswith(suffix)

    lost = []
    for stamp, msg in reversed(topic_events(dask_scheduler, "all")[1]):
        if stamp < since:
            break
        if isinstance(msg, dict) and msg.get("action") == "remove-worker":
            processing = [k for k in msg.get("processing-tasks", ()) if ours(k)]
            recomputed = [k for k in msg.get("lost-computed-tasks", ()) if ours(k)]
            if processing or recomputed:
                lost.append({"worker": msg.get("worker"), "time": stamp,
                             "processing": processing, "recomputed": recomputed})
    lost.reverse()
    return {"missed": missed, "lost": lost}
