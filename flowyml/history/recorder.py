"""One run's record in the history: written as the run starts, completed when it ends.

Each run's record is written by a thread of its own (``flowyml-history``):

- it opens the database (SQLAlchemy's import and the schema check, once per
  process), then waits up to ``GRACE`` seconds for the run to end;
- a run that ended by then is written once, complete: a short run costs one
  transaction, after ``run()`` has returned;
- a longer run is inserted as ``running``, and its heartbeat refreshed every
  ``HEARTBEAT`` seconds while it runs (how a run on another host whose
  process died is found ``lost``); its record is completed once it ends.

``run()`` never waits for the database. Reading the history in the same
process (:func:`flowyml.history.runs` and the others) waits for the records
of ended runs still being written (:func:`flush`), and so does the
interpreter as it exits. Nothing here is done per task.

Recording never fails a run: a history that cannot be written warns once per
database and process (:class:`~flowyml.history.HistoryWarning`, from the
run's own thread), and the run goes on.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from functools import partial
from typing import Any, NamedTuple

from .config import HEARTBEAT, emit_warnings, retention, warn_once
from .database import BUSY_TIMEOUT

__all__ = ["GRACE", "RunRecord", "flush"]

#: Seconds a run may take before its record is inserted as ``running``: a run
#: that ends sooner is written once, complete. A process killed sooner leaves no record.
GRACE = 0.1

#: Seconds the interpreter waits at exit for records still being written (a
#: SQLite writer may wait ``BUSY_TIMEOUT`` for its turn).
EXIT_TIMEOUT = BUSY_TIMEOUT + 10.0

#: Files listed per source in a run's record (the rest are counted).
MAX_FILES = 1000

_pending: set[RunRecord] = set()
_pending_lock = threading.Lock()
_exit_hooked = False


class _End(NamedTuple):
    """What the record keeps of an ended run: not its result, whose outputs may be large."""

    status: str
    steps: Callable[[], dict[str, Any]] | None  # folds the step results (see PipelineResult.fold_steps)
    duration_s: float
    error: BaseException | None
    at: datetime


class RunRecord:
    """The history row of one run, from its start to its end."""

    def __init__(self, url: str, pipeline: str, run_id: str, started_at: datetime, backend: str, workers: int,
                 steps: tuple[Any, ...]) -> None:
        self.url = url
        self.run_id = run_id
        self.key = _new_key()  # the row's key: run ids are short, and many hosts may share a history
        self._row: dict[str, Any] = {
            "id": self.key,
            "run_id": run_id,
            "pipeline": pipeline,
            "status": "running",
            "started_at": started_at,
            "heartbeat_at": started_at,
            "backend": backend,
            "workers": workers,
            "command": _command(tuple(sys.argv)),
        }
        self._steps = steps  # the plan's steps (immutable): their params are read in the record's thread
        self._sources: dict[str, list[Any]] | None = None
        self._inserted = False  # the row is in the database (a run longer than GRACE)
        self._sources_inserted = False  # and its sources with it (they were listed by then)
        self._engine: Any = None
        self._end: _End | None = None
        self._ended = threading.Event()
        self._report_path: str | None = None
        self._report_written = True
        self._busy = True  # a thread of the record's is writing: it writes a new report path too
        self._lock = threading.Lock()  # the report path and _busy
        self._thread = threading.Thread(target=self._write, name="flowyml-history", daemon=True)

    def start(self) -> None:
        global _exit_hooked
        emit_warnings()
        with _pending_lock:
            _pending.add(self)
            if not _exit_hooked:
                import atexit

                atexit.register(flush, EXIT_TIMEOUT)
                _exit_hooked = True
        try:
            self._thread.start()
        except RuntimeError:  # no thread to be had (a limit, or the interpreter is exiting)
            with _pending_lock:
                _pending.discard(self)
            raise

    def sources_resolved(self, sources: dict[str, list[Any]]) -> None:
        """The run has listed its sources' partitions: the record names their files."""
        self._sources = sources

    def finish(self, result: Any = None, error: BaseException | None = None) -> None:
        """The run ended: ``result`` of a run that returned, else the ``error`` it raised."""
        if result is None:
            result = getattr(error, "result", None)
        if isinstance(error, KeyboardInterrupt | SystemExit):
            status = "interrupted"
        elif error is not None or (result is not None and not result.success):
            status = "failed"
        else:
            status = "succeeded"
        now = datetime.now(UTC)
        duration = result.duration_s if result is not None else (now - self._row["started_at"]).total_seconds()
        self._end = _End(status, result.fold_steps if result is not None else None, duration, error, now)
        self._ended.set()
        emit_warnings()

    def report_saved(self, path: str) -> None:
        """The run's report was written to ``path``: the record names it (written by the record's thread)."""
        with self._lock:
            self._report_path = path
            self._report_written = False
            if self._busy:  # the record's thread writes it before it ends
                return
            self._busy = True
        with _pending_lock:
            _pending.add(self)
        self._thread = threading.Thread(target=self._write_reports, name="flowyml-history", daemon=True)
        self._thread.start()

    # -- the record's thread ----------------------------------------------------------

    def _write(self) -> None:
        try:
            if self._open():
                if not self._ended.wait(GRACE):
                    self._insert()
                    while not self._ended.wait(HEARTBEAT):
                        self._beat()
                self._complete()
        except Exception as exc:
            warn_once(self.url, exc)
        self._write_reports()

    def _open(self) -> bool:
        from .database import open_engine

        try:
            self._engine = open_engine(self.url)
            return True
        except Exception as exc:
            warn_once(self.url, exc)
            return False

    def _values(self) -> dict[str, Any]:
        """The record's start: the run, this process, its params and sources (as known now)."""
        params = {s.name: dict(s.params) for s in self._steps if s.params}
        row = dict(self._row, **_this_process(), params=_plain(params))
        if self._sources is not None:
            row["sources"] = _files(self._sources)
        return row

    def _insert(self) -> None:
        from .database import transaction

        row = self._values()
        transaction(self._engine, lambda c: c.execute(_statements().insert, row))
        self._inserted = True
        self._sources_inserted = "sources" in row

    def _beat(self) -> None:
        from .database import transaction

        try:
            transaction(self._engine, lambda c: c.execute(
                _statements().update, {"key": self.key, "heartbeat_at": datetime.now(UTC)}))
        except Exception:  # a missed heartbeat is no reason to warn: the next one may pass
            pass

    def _complete(self) -> None:
        from ..result import error_line
        from .database import transaction
        from .maintenance import prune, prune_due

        end = self._end
        assert end is not None, "completed once the run ended"
        step_rows: list[dict[str, Any]] = []
        if end.steps is not None:
            # Folded apart from ``result.steps``, which the user may be reading in their thread.
            for position, (name, s) in enumerate(end.steps().items()):
                step_rows.append({
                    "run": self.key, "position": position, "name": name, "status": str(s.status),
                    "tasks": s.tasks, "cached_tasks": s.cached_tasks, "attempts": s.attempts,
                    "duration_s": s.duration_s, "partitions": s.partitions, "rows_in": s.rows_in,
                    "rows_out": s.rows_out, "error": error_line(s.error), "traceback": s.traceback,
                })
        # The run's error names the step that failed first, as the listing shows it.
        failed = [row for row in step_rows if row["error"]]
        message: str | None = None
        error = end.error
        if error is not None and getattr(error, "step", None) is not None:
            message = f"{error.step}: {error_line(error)}"  # type: ignore[attr-defined]
        elif failed:
            message = f"{failed[0]['name']}: {failed[0]['error']}"
        elif error is not None:
            message = error_line(error) if str(error) else type(error).__name__
        values = {
            "status": end.status,
            "ended_at": end.at,
            "heartbeat_at": end.at,
            "duration_s": end.duration_s,
            "tasks": sum(row["tasks"] for row in step_rows),
            "cached_tasks": sum(row["cached_tasks"] for row in step_rows),
            "error": message,
        }
        with self._lock:  # a report saved already: named in the same transaction
            if not self._report_written:
                values["report_path"], self._report_written = self._report_path, True
        keep = retention(warn=True)

        statements = _statements()
        if self._inserted:  # an UPDATE of the row, with the sources if they were listed after it
            statement, row = statements.update, dict(values, key=self.key)
            if self._sources is not None and not self._sources_inserted:
                row["sources"] = _files(self._sources)
        else:  # a short run: written once, complete
            statement, row = statements.insert, dict(self._values(), **values)

        def write(connection: Any) -> bool:
            connection.execute(statement, row)
            if step_rows:
                connection.execute(statements.insert_steps, step_rows)
            return keep is not None and prune_due(connection)

        if transaction(self._engine, write):
            assert keep is not None
            prune(self._engine, keep)

    def _write_reports(self) -> None:
        """Write the report path saved last, until none is left unwritten; then this thread is done."""
        from .database import transaction

        try:
            while True:
                with self._lock:
                    if self._report_written:
                        self._busy = False
                        return
                    path, self._report_written = self._report_path, True
                if self._engine is not None and self._end is not None:
                    try:
                        transaction(self._engine, partial(_set_report_path, key=self.key, path=path))
                    except Exception as exc:
                        warn_once(self.url, exc)
        finally:
            with _pending_lock:
                _pending.discard(self)


def _set_report_path(connection: Any, key: str, path: str | None) -> None:
    connection.execute(_statements().update, {"key": key, "report_path": path})


def flush(timeout: float | None = None) -> bool:
    """Wait until the records of this process's ended runs are written; False if ``timeout`` passed first.

    Runs still running are not waited for (their records complete when they
    end). Warnings the records' threads raised are given here, in the caller's thread.
    """
    import time

    deadline = None if timeout is None else time.monotonic() + timeout
    with _pending_lock:
        ended = [record for record in _pending if record._ended.is_set()]
    for record in ended:
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        record._thread.join(left)
    emit_warnings()
    return not any(record._thread.is_alive() for record in ended)


def _reset_after_fork() -> None:
    """A forked child writes no record of its parent's runs (their threads are not in it)."""
    global _pending_lock
    _pending.clear()
    _pending_lock = threading.Lock()


os.register_at_fork(after_in_child=_reset_after_fork)


class _Statements(NamedTuple):
    insert: Any
    update: Any  # SET the columns a call gives, WHERE id = :key
    insert_steps: Any


@functools.cache
def _statements() -> _Statements:
    """The record's statements, built once: SQLAlchemy then compiles each once per engine."""
    import sqlalchemy as sa

    from .schema import runs, steps

    return _Statements(runs.insert(), runs.update().where(runs.c.id == sa.bindparam("key")), steps.insert())


def _new_key() -> str:
    import uuid

    return uuid.uuid4().hex


@functools.cache
def _this_process() -> dict[str, Any]:
    """What every record of this process says of it (read once: package metadata is slow to read)."""
    import socket
    from importlib.metadata import PackageNotFoundError, version

    import psutil

    from .maintenance import host_id

    out: dict[str, Any] = {"host": socket.gethostname(), "host_id": host_id(), "pid": os.getpid(),
                           "user": _user(), "pid_started": psutil.Process().create_time()}
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


@functools.lru_cache(maxsize=4)
def _command(argv: tuple[str, ...]) -> str | None:
    """The command line ``argv``, with what looks like a credential in it replaced by ``***``."""
    if not argv or not argv[0]:
        return None
    import shlex

    from ..secrets import redact_url, scrub

    shown = []
    for word in argv:
        name, equals, value = word.partition("=")
        if "://" in word:  # a URL, or NAME=URL (--input trips=https://...)
            word = f"{name}={redact_url(value)}" if equals and "://" in value else redact_url(word)
        elif equals and _secret_name(name):
            word = f"{name}=***"
        shown.append(word)
    return scrub(shlex.join(shown))


def _secret_name(name: str) -> bool:
    from ..secrets import _SECRET_NAME

    return bool(_SECRET_NAME.search(name))


def _plain(value: Any) -> Any:
    """``value`` as JSON data (what JSON cannot hold, as its repr), credentials replaced by ``***``."""
    from ..secrets import scrub

    return json.loads(scrub(json.dumps(_redacted(value), default=repr)))


def _redacted(value: Any, secret: bool = False) -> Any:
    """Params with the values of credential-named keys, and URL passwords and queries, hidden."""
    from ..secrets import redact_url

    if isinstance(value, dict):
        return {key: _redacted(item, secret or _secret_name(str(key))) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_redacted(item, secret) for item in value]
    if secret and value is not None:
        return "***"
    if isinstance(value, str) and "://" in value:
        return redact_url(value)
    return value


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
