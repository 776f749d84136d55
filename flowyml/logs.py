"""Worker logs on the driver: what steps log or print in other processes reaches the ``flowyml`` log.

On ``sync`` and ``thread`` a step runs in the driver process, so its log
records go wherever the driver's logging sends them. On ``process`` and
``distributed`` it runs in a worker process whose logging nobody watches;
there, flowyml forwards what a step logs (any logger) or prints while it runs
to the driver and replays it under ``flowyml.steps.<step>``, tagged with the
step and partition::

    INFO flowyml.steps.clean: clean[3]: dropped 12 rows without a fare

Each replayed record also carries ``step``, ``partition``, ``attempt``,
``run_id``, ``worker`` and ``origin`` (the worker-side logger's name, or
``"print"``) for formatters and filters. Only records made inside a flowyml
task are forwarded, at the level the driver's ``flowyml`` logger would show
when the pool or cluster opened (never above INFO): configure logging before
you open the executor. Printed lines still reach the worker's own output too.

:class:`TaskLogFilter` adds the same attributes to records made in the
driver process (``sync``, ``thread``), so one format fits every backend::

    handler.addFilter(TaskLogFilter())
    handler.setFormatter(logging.Formatter("%(levelname)s %(step)s[%(partition)s] %(message)s"))

How records travel: ``process`` pool workers put them on a queue that a
listener thread in the driver replays (:class:`ProcessLogBridge`);
``distributed`` workers publish them as Dask events on a per-run topic that the
driver's client subscribes to (``flowyml.executors.distributed``).
"""

from __future__ import annotations

import logging
import sys
import threading
import traceback
from collections.abc import Callable, Iterable
from typing import Any, TextIO

from .context import TaskContext, current_task
from .secrets import scrub

__all__ = [
    "HEARTBEAT_FAILURE",
    "LOG_TOPIC",
    "ProcessLogBridge",
    "TaskLogFilter",
    "forwarding_level",
    "install_forwarding",
    "quiet_heartbeats_while_closing",
    "replay",
]

#: Distributed workers publish a run's forwarded records on this event topic.
LOG_TOPIC = "flowyml-logs-{run_id}"

#: Replayed records go to this logger's children, one per step.
STEPS_LOGGER = "flowyml.steps"

#: A payload: what crosses the process boundary for one record (msgpack-able).
Payload = dict[str, Any]
Send = Callable[[TaskContext, Payload], None]


class TaskLogFilter(logging.Filter):
    """Tag records with the flowyml task they were made in.

    Adds ``step``, ``partition``, ``attempt`` and ``run_id`` (all None outside
    a task) unless the record already has them (a replayed worker record).
    Attach it to a handler, where it sees every record the handler gets.

    Examples
    --------
    >>> record = logging.makeLogRecord({"msg": "hello"})
    >>> TaskLogFilter().filter(record), record.step
    (True, None)
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "step"):
            context = current_task()
            record.step = context.step if context else None
            record.partition = context.partition if context else None
            record.attempt = context.attempt if context else None
            record.run_id = context.run_id if context else None
        return True


def forwarding_level() -> int:
    """The lowest level worth sending: what the driver's ``flowyml`` logger shows, at most INFO.

    Printed lines are INFO, so they are forwarded unless the driver is set
    to show only warnings and worse; DEBUG records only when it shows DEBUG.
    """
    return min(logging.INFO, logging.getLogger("flowyml").getEffectiveLevel())


# -- worker side --------------------------------------------------------------------

_sending = threading.local()  # guards against a record made while forwarding one


def payload(record: logging.LogRecord, context: TaskContext, worker: str) -> Payload:
    """One record, flattened to plain values, with its task."""
    exc_text = record.exc_text
    if record.exc_info and not exc_text:
        exc_text = "".join(traceback.format_exception(*record.exc_info)).rstrip("\n")
    return {
        "step": context.step,
        "partition": context.partition,
        "attempt": context.attempt,
        "run_id": context.run_id,
        "worker": worker,
        "origin": record.name,
        "levelno": record.levelno,
        "msg": scrub(record.getMessage()),
        "exc_text": scrub(exc_text) if exc_text else exc_text,
        "created": record.created,
        "pathname": record.pathname,
        "lineno": record.lineno,
        "funcName": record.funcName,
    }


class _ForwardingHandler(logging.Handler):
    """On a worker: hands each record made inside a flowyml task to ``send``."""

    def __init__(self, send: Send, level: int, worker: str) -> None:
        super().__init__(level)
        self._send = send
        self._worker = worker
        self.active = True

    def emit(self, record: logging.LogRecord) -> None:
        context = current_task()
        if context is None or not self.active or getattr(_sending, "active", False):
            return
        _sending.active = True
        try:
            self._send(context, payload(record, context, self._worker))
        except Exception:  # a log line must never fail the step
            self.handleError(record)
        finally:
            _sending.active = False


class _TaskStream:
    """Stands in for ``sys.stdout``/``stderr`` on a worker.

    Text written outside a task passes straight through. Inside a task it is
    written through too, and each complete line is also forwarded as a record
    (origin ``"print"``), buffered per thread so concurrent tasks do not mix.
    """

    def __init__(self, stream: TextIO, handler: _ForwardingHandler, levelno: int) -> None:
        self._stream = stream
        self._handler = handler
        self._levelno = levelno
        self._lines = threading.local()

    def write(self, text: str) -> int:
        written = self._stream.write(text)
        handler = self._handler
        if handler.active and current_task() is not None and self._levelno >= handler.level:
            pending = getattr(self._lines, "text", "") + text
            *lines, self._lines.text = pending.split("\n")
            for line in lines:
                self._forward(line)
        return written

    def _forward(self, line: str) -> None:
        record = logging.LogRecord("print", self._levelno, "", 0, line, None, None)
        self._handler.handle(record)

    def flush(self) -> None:
        self._stream.flush()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def install_forwarding(send: Send, level: int, worker: str) -> Callable[[], None]:
    """Forward records and printed lines made inside flowyml tasks in this process.

    Adds a handler to the root logger, lowers the root level to ``level``
    when it is higher and the root logger has no handler yet (else records of
    loggers without a level of their own would be dropped before any handler;
    a root logger with handlers was configured by someone, whose level
    stands), and wraps ``sys.stdout`` and ``sys.stderr``. Returns a function
    that undoes all of it.

    Parameters
    ----------
    send : callable
        ``send(context, payload)``: ships one record to the driver.
    level : int
        The lowest level forwarded (see :func:`forwarding_level`).
    worker : str
        This worker's name in the replayed records.
    """
    root = logging.getLogger()
    handler = _ForwardingHandler(send, level, worker)
    old_level = root.level
    # Only where nobody configured the root logger (a worker process): in a
    # driver hosting in-process workers, the user's level stands.
    lowered = root.level > level and not root.handlers
    root.addHandler(handler)
    if lowered:
        root.setLevel(level)
    old_out, old_err = sys.stdout, sys.stderr
    sys.stdout = new_out = _TaskStream(old_out, handler, logging.INFO)
    sys.stderr = new_err = _TaskStream(old_err, handler, logging.WARNING)

    def uninstall() -> None:
        handler.active = False  # a stream wrapped again since stays in place, but inert
        root.removeHandler(handler)
        if lowered and root.level == level:
            root.setLevel(old_level)
        if sys.stdout is new_out:
            sys.stdout = old_out
        if sys.stderr is new_err:
            sys.stderr = old_err

    return uninstall


# -- driver side --------------------------------------------------------------------


def replay(item: Payload) -> None:
    """Emit a forwarded record on the driver under ``flowyml.steps.<step>``."""
    step, partition = item["step"], item["partition"]
    logger = logging.getLogger(f"{STEPS_LOGGER}.{step}")
    level = item["levelno"]
    if not logger.isEnabledFor(level):
        return
    tag = step if partition is None else f"{step}[{partition}]"
    extra = {key: item[key] for key in ("step", "partition", "attempt", "run_id", "worker", "origin")}
    record = logger.makeRecord(
        logger.name, level, item["pathname"], item["lineno"], f"{tag}: {item['msg']}", (), None,
        func=item["funcName"], extra=extra,
    )
    record.created = item["created"]
    record.exc_text = item["exc_text"]
    logger.handle(record)


class ProcessLogBridge:
    """Carries log records from ``process`` pool workers to the driver.

    The driver owns a queue and a listener thread that replays what arrives;
    each pool worker calls :func:`worker_setup` with :attr:`initargs` from
    its pool initializer. The queue is a ``SimpleQueue``: a worker's ``put``
    is in the pipe before its task returns, so :meth:`flush` (a marker put
    after the run) comes back only once every record of the run is replayed.

    Parameters
    ----------
    context : multiprocessing context
        The pool's (``spawn``).
    """

    def __init__(self, context: Any) -> None:
        self.level = forwarding_level()
        self._queue = context.SimpleQueue()
        self._flushed: dict[int, threading.Event] = {}
        self._lock = threading.Lock()
        self._marker = 0
        self._thread = threading.Thread(target=self._listen, name="flowyml-process-logs", daemon=True)
        self._thread.start()

    @property
    def initargs(self) -> tuple[Any, int]:
        return (self._queue, self.level)

    def _listen(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            if isinstance(item, int):
                self._flushed.pop(item).set()
                continue
            try:
                replay(item)
            except Exception:  # a bad record must not stop the listener
                logging.getLogger("flowyml").exception("could not replay a worker log record")

    def flush(self, timeout: float = 10.0) -> None:
        """Return once every record put before this call is replayed."""
        with self._lock:
            self._marker += 1
            marker = self._marker
            event = self._flushed[marker] = threading.Event()
        self._queue.put(marker)
        event.wait(timeout)

    def stop(self) -> None:
        """Replay what is left and stop the listener (after the pool has shut down)."""
        self._queue.put(None)
        self._thread.join()
        self._queue.close()


def worker_setup(queue: Any, level: int) -> None:
    """In a ``process`` pool worker: forward task records to ``queue``."""
    import os

    def send(context: TaskContext, item: Payload) -> None:
        queue.put(item)

    install_forwarding(send, level, f"process-{os.getpid()}")


#: What a worker logs when a heartbeat meets a closed connection.
HEARTBEAT_FAILURE = "Failed to communicate with scheduler during heartbeat."


class _ClosingHeartbeatFilter(logging.Filter):
    """Drops a heartbeat failure logged while every worker of the process is closing.

    Closing a ``LocalCluster`` races with the workers' heartbeats: a worker
    tells the scheduler it is closing, the scheduler drops its connections, and
    a heartbeat already on its way fails and logs a traceback at ERROR, to the
    stderr of a job that did nothing wrong. A worker still running keeps it.
    """

    def __init__(self, workers: Callable[[], Iterable[Any]]) -> None:
        super().__init__()
        self._workers = workers

    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg != HEARTBEAT_FAILURE:
            return True
        from distributed.worker import WORKER_ANY_RUNNING

        return any(w.status in WORKER_ANY_RUNNING for w in self._workers())


def quiet_heartbeats_while_closing() -> None:
    """Install the filter once per worker process; a plugin's teardown runs before
    the worker stops its heartbeats, so it stays for the life of the process."""
    from distributed import Worker

    logger = logging.getLogger("distributed.worker")
    if not any(isinstance(f, _ClosingHeartbeatFilter) for f in logger.filters):
        logger.addFilter(_ClosingHeartbeatFilter(lambda: list(Worker._instances)))
