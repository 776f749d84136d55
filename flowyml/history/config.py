"""Where the run history lives, and how long it keeps runs: read from the environment, no database touched.

- ``FLOWYML_HISTORY``: unset or ``on`` for the default database,
  ``off`` to record nothing, or a SQLAlchemy URL
  (``postgresql://user@host/db``, ``sqlite:////var/lib/flowyml/history.db``).
- ``FLOWYML_HOME`` (default ``~/.flowyml``): the default database is
  ``$FLOWYML_HOME/history.db``, an embedded SQLite file.
- ``FLOWYML_HISTORY_RETENTION`` (default ``90d``): runs older than this are
  pruned once a day by the runs themselves; ``never`` keeps them all.
"""

from __future__ import annotations

import os
import re
import threading
import warnings
from datetime import timedelta
from pathlib import Path

__all__ = [
    "DEFAULT_RETENTION",
    "HEARTBEAT",
    "LOST_AFTER",
    "HistoryConfigError",
    "HistoryWarning",
    "emit_warnings",
    "history_url",
    "home",
    "parse_age",
    "retention",
    "shown_url",
    "warn_once",
]

#: How long runs are kept when ``FLOWYML_HISTORY_RETENTION`` is not set.
DEFAULT_RETENTION = "90d"

#: Seconds between a running run's heartbeats.
HEARTBEAT = 60.0

#: A running record of another host without a heartbeat for this long is lost.
LOST_AFTER = timedelta(seconds=5 * HEARTBEAT)

_warned: set[str] = set()
_warned_lock = threading.Lock()

_OFF = {"off", "0", "false", "no", "none"}
_ON = {"", "on", "1", "true", "yes", "default"}
_AGE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h|d|w)\s*$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


class HistoryConfigError(ValueError):
    """A history setting (URL, age, retention) that cannot be used; the message says how to fix it."""


def home() -> Path:
    """``$FLOWYML_HOME``, default ``~/.flowyml``: where flowyml keeps its own files."""
    return Path(os.environ.get("FLOWYML_HOME") or "~/.flowyml").expanduser()


def history_url(history: bool | str | None = None, what: str = "history") -> str | None:
    """The database a run records itself in, or None for none.

    ``history``: a run's own setting (``Pipeline.run(history=...)``): False
    records nothing, a string is a URL; None and True follow
    ``FLOWYML_HISTORY``. ``what`` names the setting in errors.
    """
    if history is False:
        return None
    if isinstance(history, str):
        return _url_of(history, what)
    setting = os.environ.get("FLOWYML_HISTORY", "")
    if setting.strip().lower() in _OFF:
        return None
    return _url_of(setting, "FLOWYML_HISTORY")


def _url_of(setting: str, where: str) -> str | None:
    text = setting.strip()
    if text.lower() in _OFF:
        return None
    if text.lower() in _ON:
        return f"sqlite:///{home() / 'history.db'}"
    if "://" not in text:
        raise HistoryConfigError(
            f"{where}={shown_url(setting)!r} is neither 'on', 'off' nor a database URL; "
            "use e.g. sqlite:////path/to/history.db or postgresql://user@host/db"
        )
    return text


def parse_age(text: str, what: str = "age") -> timedelta:
    """``"30d"`` -> 30 days; units s, m, h, d, w."""
    match = _AGE.match(str(text))
    if match is None:
        raise HistoryConfigError(f"{what} {text!r} is not an age: write a number and a unit, e.g. 30d, 12h, 2w")
    return timedelta(**{_UNITS[match.group(2)]: float(match.group(1))})


def retention(warn: bool = False) -> timedelta | None:
    """How long runs are kept (``FLOWYML_HISTORY_RETENTION``); None: for ever.

    ``warn``: a setting that is no age warns (once) and keeps the default,
    rather than raising: runs prune with it, and recording never fails a run.
    """
    setting = os.environ.get("FLOWYML_HISTORY_RETENTION", "").strip() or DEFAULT_RETENTION
    if setting.lower() in ("never", "off", "forever"):
        return None
    try:
        return parse_age(setting, "FLOWYML_HISTORY_RETENTION")
    except HistoryConfigError as exc:
        if not warn:
            raise
        warn_once("FLOWYML_HISTORY_RETENTION", exc, f"{exc}; runs are kept {DEFAULT_RETENTION}")
        return parse_age(DEFAULT_RETENTION)


class HistoryWarning(UserWarning):
    """The run history could not be written, or a history setting is unusable; the run went on."""


_queued: list[str] = []


def warn_once(where: str, exc: BaseException, message: str | None = None) -> None:
    """Say once per database (or setting) and process that the history failed, and why.

    The warning is queued, and given by :func:`emit_warnings` in the run's own
    thread: a warning raised in a record's thread could be swallowed by a
    ``catch_warnings`` block the user's thread is in at that moment.
    """
    with _warned_lock:
        if where in _warned:
            return
        _warned.add(where)
        if message is None:
            message = (f"the run history at {shown_url(where)} cannot be written ({type(exc).__name__}: "
                       f"{_one_line(exc)}); runs go on unrecorded. Fix the database, point FLOWYML_HISTORY "
                       "elsewhere, or set FLOWYML_HISTORY=off")
        _queued.append(f"flowyml: {message}")
    if threading.current_thread() is threading.main_thread():
        emit_warnings()


def emit_warnings() -> None:
    """Give the queued history warnings (called in the run's thread, as runs start and end)."""
    with _warned_lock:
        messages = _queued[:]
        _queued.clear()
    for message in messages:
        warnings.warn(message, HistoryWarning, stacklevel=3)


def shown_url(url: str) -> str:
    """``url`` as it may be shown: its password hidden, the rest as given."""
    from ..secrets import redact_url

    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # no URL SQLAlchemy can read: shown as any URL is
        return redact_url(url) if "://" in url else "***" if "=" in url else url


def _one_line(exc: BaseException) -> str:
    from ..secrets import scrub

    return scrub(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
