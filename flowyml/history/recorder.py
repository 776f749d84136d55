"""One run's record in the history: written when the run starts, completed when it ends.

Each run's record is written by a thread of its own (``flowyml-history``):

- as the run starts, it imports SQLAlchemy, connects and inserts the run as
  ``running``, while the run plans and executes;
- while the run goes on, it refreshes the run's heartbeat every
  ``HEARTBEAT`` seconds: that is how a run on another host whose process
  died is found ``lost``;
- once the run has ended, it folds the run's steps and completes the record.
  ``run()`` does not wait for this: the result is the user's at once.
  Reading the history in the same process (:func:`flowyml.history.runs`
  and the others) waits for the records still being written
  (:func:`flush`), and so does the interpreter as it exits.

Nothing here is done per task. Recording never fails a run: a history that
cannot be written warns once per database and process
(:class:`~flowyml.history.HistoryWarning`), and the run goes on.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import threading
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, NamedTuple

from .config import HEARTBEAT, warn_once

if TYPE_CHECKING:
    from ..result import PipelineResult

__all__ = ["RunRecord", "flush"]

#: Seconds the interpreter waits at exit for records still being written.
EXIT_TIMEOUT = 30.0

_pending: set[RunRecord] = set()
_pending_lock = threading.Lock()
_exit_hooked = False

#: Files listed per source in a run's record (the rest are counted).
MAX_FILES = 1000

class RunRecord:
    """The history row of one run, from its start to its end."""

    def __init__(self, url: str, pipeline: str, run_id: str, started_at: datetime, backend: str, workers: int,
                 params: dict[str, Any], sources: dict[str, list[Any]]) -> None:
        import shlex

        self.url = url
        self.run_id = run_id
        self._row: dict[str, Any] = {
            "run_id": run_id,
            "pipeline": pipeline,
            "status": "running",
            "started_at": started_at,
            "heartbeat_at": started_at,
            "backend": backend,
            "workers": workers,
            "command": shlex.join(sys.argv) if sys.argv and sys.argv[0] else None,
        }
        self._params = params
        self._sources = sources
        self._engine: Any = None
        self._failed = False
        self._ended = threading.Event()
        self._end: tuple[Any, BaseException | None] = (None, None)
        self._ended_at: datetime | None = None
        self._report_path: str | None = None
        self._completed = False
        self._lock = threading.Lock()  # the report path, against the record's completion
        self._thread = threading.Thread(target=self._write, name="flowyml-history", daemon=True)

    def start(self) -> None:
        global _exit_hooked
        with _pending_lock:
            _pending.add(self)
            if not _exit_hooked:
                import atexit

                atexit.register(flush, EXIT_TIMEOUT)
                _exit_hooked = True
        self._thread.start()

    def finish(self, result: PipelineResult | None = None, error: BaseException | None = None) -> None:
        """The run ended: ``result`` of a run that returned, else the ``error`` it raised (its record completes)."""
        self._end = (result if result is not None else getattr(error, "result", None), error)
        self._ended_at = datetime.now(UTC)
        self._ended.set()

    def report_saved(self, path: str) -> None:
        """The run's report was written to ``path``: the record names it."""
        with self._lock:
            if not self._completed:  # the completion writes it
                self._report_path = path
                return
        if self._failed or self._engine is None:
            return
        from .database import transaction

        try:
            transaction(self._engine, lambda c: c.execute(
                _statements().update, {"key": self.run_id, "report_path": path}))
        except Exception as exc:
            warn_once(self.url, exc)

    # -- the record's thread ----------------------------------------------------------

    def _write(self) -> None:
        try:
            if self._open():
                self._beat()
                with self._lock:
                    try:
                        self._complete(*self._end)
                    except Exception as exc:
                        warn_once(self.url, exc)
                    self._completed = True
        finally:
            with _pending_lock:
                _pending.discard(self)

    def _open(self) -> bool:
        try:
            from .database import open_engine, transaction

            row = dict(self._row, **_this_process(), params=_plain(self._params), sources=_files(self._sources))
            engine = open_engine(self.url)
            transaction(engine, lambda c: c.execute(_statements().insert, row))
            self._engine = engine
            return True
        except Exception as exc:
            self._failed = True
            warn_once(self.url, exc)
            return False

    def _beat(self) -> None:
        from .database import transaction

        while not self._ended.wait(HEARTBEAT):
            try:
                transaction(self._engine, lambda c: c.execute(
                    _statements().update, {"key": self.run_id, "heartbeat_at": datetime.now(UTC)}))
            except Exception:  # a missed heartbeat is no reason to warn: the next one may pass
                pass

    def _complete(self, result: PipelineResult | None, error: BaseException | None) -> None:
        from ..result import error_line
        from .database import transaction
        from .maintenance import prune_by_retention, prune_due

        now = self._ended_at or datetime.now(UTC)
        started: datetime = self._row["started_at"]
        if isinstance(error, KeyboardInterrupt | SystemExit):
            status = "interrupted"
        elif error is not None or (result is not None and not result.success):
            status = "failed"
        else:
            status = "succeeded"
        step_rows: list[dict[str, Any]] = []
        if result is not None:
            # Folded apart from ``result.steps``, which the user may be reading in their thread.
            for position, (name, s) in enumerate(result.fold_steps().items()):
                step_rows.append({
                    "run_id": self.run_id, "position": position, "name": name, "status": str(s.status),
                    "tasks": s.tasks, "cached_tasks": s.cached_tasks, "attempts": s.attempts,
                    "duration_s": s.duration_s, "partitions": s.partitions, "rows_in": s.rows_in,
                    "rows_out": s.rows_out, "error": error_line(s.error), "traceback": s.traceback,
                })
        # The run's error names the step that failed first, as the listing shows it.
        failed = [row for row in step_rows if row["error"]]
        message: str | None = None
        if error is not None and getattr(error, "step", None) is not None:
            message = f"{error.step}: {error_line(error)}"  # type: ignore[attr-defined]
        elif failed:
            message = f"{failed[0]['name']}: {failed[0]['error']}"
        elif error is not None:
            message = error_line(error) if str(error) else type(error).__name__
        values = {
            "status": status,
            "ended_at": now,
            "heartbeat_at": now,
            "duration_s": result.duration_s if result is not None else (now - started).total_seconds(),
            "tasks": sum(row["tasks"] for row in step_rows),
            "cached_tasks": sum(row["cached_tasks"] for row in step_rows),
            "error": message,
        }

        if self._report_path is not None:
            values["report_path"] = self._report_path

        def write(connection: Any) -> bool:
            statements = _statements()
            connection.execute(statements.update, {"key": self.run_id, **values})
            if step_rows:
                connection.execute(statements.insert_steps, step_rows)
            return prune_due(connection)

        if transaction(self._engine, write):
            prune_by_retention(self._engine)


def flush(timeout: float | None = None) -> bool:
    """Wait until every record this process is writing is complete; False if ``timeout`` passed first.

    Runs still running are not waited for (their records complete when they end).
    """
    import time

    deadline = None if timeout is None else time.monotonic() + timeout
    with _pending_lock:
        ended = [record for record in _pending if record._ended.is_set()]
    for record in ended:
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        record._thread.join(left)
    return not any(record._thread.is_alive() for record in ended)


class _Statements(NamedTuple):
    insert: Any
    update: Any  # SET the columns a call gives, WHERE run_id = :key
    insert_steps: Any


@functools.cache
def _statements() -> _Statements:
    """The record's statements, built once: SQLAlchemy then compiles each once per engine."""
    import sqlalchemy as sa

    from .schema import runs, steps

    return _Statements(runs.insert(), runs.update().where(runs.c.run_id == sa.bindparam("key")), steps.insert())


@functools.cache
def _this_process() -> dict[str, Any]:
    """What every record of this process says of it (read once: package metadata is slow to read)."""
    import socket
    from importlib.metadata import PackageNotFoundError, version

    import psutil

    out: dict[str, Any] = {"host": socket.gethostname(), "pid": os.getpid(), "user": _user(),
                           "pid_started": psutil.Process().create_time()}
    for package in ("flowyml", "dask", "pandas"):
        try:
            out[f"{package}_version"] = version(package)
        except PackageNotFoundError:
            out[f"{package}_version"] = None
    return out


def _user() -> str | None:
    import getpass

    try:
        return getpass.getuser()
    except Exception:  # no user name in this environment (some containers)
        return None


def _plain(value: Any) -> Any:
    """``value`` as JSON data (what JSON cannot hold, as its repr), credentials scrubbed."""
    from ..secrets import scrub

    return json.loads(scrub(json.dumps(value, default=repr)))


def _files(sources: dict[str, list[Any]]) -> dict[str, Any]:
    """Each source's files, with their size and modification time as the run planned them."""
    from ..secrets import redact_url

    out: dict[str, Any] = {}
    for name, partitions in sources.items():
        files: dict[str, dict[str, Any]] = {}
        for part in partitions:
            path = getattr(part, "path", None)
            if path is None or path in files:
                continue
            files[str(path)] = {"path": redact_url(str(path)), "size": getattr(part, "size", None),
                                "mtime_ns": getattr(part, "mtime_ns", None)}
        listed = list(files.values())
        out[name] = {"files": listed[:MAX_FILES], "count": len(listed),
                     "bytes": sum(f["size"] or 0 for f in listed if isinstance(f["size"], int))}
    return out
