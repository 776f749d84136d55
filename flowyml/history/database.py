"""Opening a history database: one engine per URL per process, its schema brought up to date.

- SQLite (the default): write-ahead logging, so readers never wait for a
  writer; every transaction begins ``IMMEDIATE`` and waits up to
  ``BUSY_TIMEOUT`` seconds for the write lock, so many runs at once take
  turns instead of failing with "database is locked".
- PostgreSQL: ``postgresql://`` URLs use psycopg (version 3), the driver
  the ``flowyml[postgres]`` extra installs, unless the URL names another.
- The schema is versioned with Alembic. Opening a database reads its version
  (one query); only one whose version is older runs the migrations, holding
  a lock (SQLite's write lock, a PostgreSQL advisory lock) so that many
  processes opening a new database at once migrate it once.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import sqlalchemy as sa

from .config import HistoryConfigError

__all__ = ["BUSY_TIMEOUT", "HEAD", "open_engine", "transaction"]

#: The schema versions this flowyml knows, oldest first (its ``migrations/versions``);
#: it writes the last, ``HEAD``.
REVISIONS = ("0001",)
HEAD = REVISIONS[-1]

#: Seconds a SQLite writer waits for another's lock before giving up.
BUSY_TIMEOUT = 60.0

#: Attempts of a transaction that failed for a passing reason (a dropped connection, a deadlock).
ATTEMPTS = 4

#: PostgreSQL advisory lock key held while migrating (any constant that other software is unlikely to use).
_MIGRATION_LOCK = 0x666C6F77  # "flow"

#: Alembic's version table of the history: its own, so that a database other
#: software migrates with Alembic can hold the history too.
VERSION_TABLE = "flowyml_alembic_version"

#: Seconds to wait for a database server to answer a connection.
CONNECT_TIMEOUT = 10

_engines: dict[str, sa.Engine] = {}
_locks: dict[str, threading.Lock] = {}
_lock = threading.Lock()
_migrating = threading.Lock()  # Alembic's context is global: one migration at a time per process

T = TypeVar("T")


def open_engine(url: str) -> sa.Engine:
    """The engine for ``url``, made once per process, with its schema at ``HEAD``.

    One lock per URL: a database that is slow to answer holds up no other.
    """
    engine = _engines.get(url)
    if engine is not None:
        return engine
    with _lock:
        lock = _locks.setdefault(url, threading.Lock())
    with lock:
        engine = _engines.get(url)
        if engine is None:
            engine = _engine(url)
            _upgrade(engine)
            _engines[url] = engine
        return engine


def transaction(engine: sa.Engine, work: Callable[[sa.Connection], T], *, write: bool = True) -> T:
    """``work(connection)`` in one transaction, retried when it failed for a passing reason.

    ``write=False``: a reading transaction, which on SQLite takes no write lock.
    """
    for attempt in range(1, ATTEMPTS + 1):
        try:
            with engine.connect() as connection:
                if not write:
                    connection = connection.execution_options(flowyml_read=True)
                with connection.begin():
                    return work(connection)
        except sa.exc.OperationalError as exc:
            # SQLite's lock wait timed out, or a server connection dropped: retry on a fresh one.
            if attempt == ATTEMPTS or not _passing(exc):
                raise
            time.sleep(0.05 * 2**attempt)
    raise AssertionError("unreachable")


def _passing(exc: sa.exc.OperationalError) -> bool:
    text = str(exc.orig).lower()
    return exc.connection_invalidated or any(
        word in text for word in ("locked", "busy", "deadlock", "could not serialize", "connection", "closed")
    )


def _engine(url: str) -> sa.Engine:
    try:
        parsed = sa.engine.make_url(url)
    except sa.exc.ArgumentError:
        raise HistoryConfigError(f"history URL {url!r} is not a database URL (e.g. postgresql://user@host/db)") \
            from None
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    if parsed.get_backend_name() == "sqlite":
        return _sqlite_engine(parsed)
    shown = parsed.render_as_string(hide_password=True)
    arguments: dict[str, Any] = {}
    if parsed.get_backend_name() == "postgresql" and "connect_timeout" not in parsed.query:
        arguments["connect_args"] = {"connect_timeout": CONNECT_TIMEOUT}
    try:
        return sa.create_engine(parsed, pool_pre_ping=True, pool_size=2, max_overflow=2, **arguments)
    except ModuleNotFoundError as exc:
        extra = " (pip install 'flowyml[postgres]')" if parsed.get_backend_name() == "postgresql" else ""
        raise HistoryConfigError(f"the history database {shown} needs the {exc.name!r} driver{extra}") from None
    except (sa.exc.ArgumentError, sa.exc.NoSuchModuleError, ValueError) as exc:
        raise HistoryConfigError(f"the history database URL {shown} cannot be used: {exc}") from None


def _sqlite_engine(url: sa.URL) -> sa.Engine:
    if url.database and url.database != ":memory:":
        Path(url.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
    # pysqlite's own transaction handling begins transactions late and never
    # for DDL: turned off, and the transaction begun here, IMMEDIATE (see
    # SQLAlchemy's "Serializable isolation / Savepoints / Transactional DDL").
    engine = sa.create_engine(url, connect_args={"timeout": BUSY_TIMEOUT, "isolation_level": None})

    @sa.event.listens_for(engine, "connect")
    def _connect(dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        cursor.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT * 1000)}")
        cursor.execute("PRAGMA journal_mode = WAL")  # persistent: set by the first opener, read by the others
        cursor.execute("PRAGMA synchronous = NORMAL")  # WAL's safe setting: a crash loses no committed run
        cursor.execute("PRAGMA foreign_keys = ON")
        cursor.close()

    @sa.event.listens_for(engine, "begin")
    def _begin(connection: sa.Connection) -> None:
        # A writer takes the write lock as it begins, so two writers never deadlock
        # upgrading a read lock; a reader takes none, and never waits for a writer.
        read = connection.get_execution_options().get("flowyml_read", False)
        connection.exec_driver_sql("BEGIN" if read else "BEGIN IMMEDIATE")

    return engine


def _version(connection: sa.Connection) -> str | None:
    if not sa.inspect(connection).has_table(VERSION_TABLE):
        return None
    return connection.execute(sa.text(f"SELECT version_num FROM {VERSION_TABLE}")).scalar()


def _upgrade(engine: sa.Engine) -> None:
    """Bring the schema to ``HEAD``: a read when it is there already, Alembic under a lock when not."""
    version = transaction(engine, _version, write=False)
    if version == HEAD:
        return

    def migrate(connection: sa.Connection) -> None:
        if connection.dialect.name == "postgresql":
            connection.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": _MIGRATION_LOCK})
        version = _version(connection)
        if version == HEAD:  # another process migrated it while this one waited
            return
        if version is not None and version not in REVISIONS:
            raise HistoryConfigError(
                f"the history database {engine.url.render_as_string(hide_password=True)} has schema version "
                f"{version!r}, newer than this flowyml knows ({HEAD!r}): upgrade flowyml, "
                "or set FLOWYML_HISTORY to another database"
            )
        from alembic import command
        from alembic.config import Config

        config = Config()
        config.set_main_option("script_location", str(Path(__file__).with_name("migrations")))
        config.attributes["connection"] = connection
        with _migrating:
            command.upgrade(config, HEAD)

    transaction(engine, migrate)
