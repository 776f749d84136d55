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
import warnings
from datetime import timedelta
from pathlib import Path

__all__ = ["DEFAULT_RETENTION", "HEARTBEAT", "LOST_AFTER", "HistoryConfigError", "HistoryWarning", "history_url",
           "home", "parse_age", "retention", "warn_once"]

#: How long runs are kept when ``FLOWYML_HISTORY_RETENTION`` is not set.
DEFAULT_RETENTION = "90d"

#: Seconds between a running run's heartbeats.
HEARTBEAT = 60.0

#: A running record of another host without a heartbeat for this long is lost.
LOST_AFTER = timedelta(seconds=5 * HEARTBEAT)

_warned: set[str] = set()

_OFF = {"off", "0", "false", "no", "none"}
_ON = {"", "on", "1", "true", "yes", "default"}
_AGE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h|d|w)\s*$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


class HistoryConfigError(ValueError):
    """A history setting (URL, age, retention) that cannot be used; the message says how to fix it."""


def home() -> Path:
    """``$FLOWYML_HOME``, default ``~/.flowyml``: where flowyml keeps its own files."""
    return Path(os.environ.get("FLOWYML_HOME") or "~/.flowyml").expanduser()


def history_url(history: bool | str | None = None) -> str | None:
    """The database a run records itself in, or None for none.

    ``history``: a run's own setting (``Pipeline.run(history=...)``): False
    records nothing, a string is a URL; None and True follow
    ``FLOWYML_HISTORY``.
    """
    if history is False:
        return None
    if isinstance(history, str):
        return _url_of(history, "history=")
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
            f"{where}={setting!r} is neither 'on', 'off' nor a database URL; "
            "use e.g. sqlite:////path/to/history.db or postgresql://user@host/db"
        )
    return text


def parse_age(text: str, what: str = "age") -> timedelta:
    """``"30d"`` -> 30 days; units s, m, h, d, w."""
    match = _AGE.match(str(text))
    if match is None:
        raise HistoryConfigError(f"{what} {text!r} is not an age: write a number and a unit, e.g. 30d, 12h, 2w")
    return timedelta(**{_UNITS[match.group(2)]: float(match.group(1))})


def retention() -> timedelta | None:
    """How long runs are kept (``FLOWYML_HISTORY_RETENTION``); None: for ever."""
    setting = os.environ.get("FLOWYML_HISTORY_RETENTION", "").strip() or DEFAULT_RETENTION
    if setting.lower() in ("never", "off", "forever"):
        return None
    return parse_age(setting, "FLOWYML_HISTORY_RETENTION")


class HistoryWarning(UserWarning):
    """The run history could not be written; the run went on unrecorded."""


def warn_once(url: str, exc: BaseException) -> None:
    """Say once per database and process that the history failed, and why."""
    from ..secrets import redact_url

    if url in _warned:
        return
    _warned.add(url)
    warnings.warn(
        f"flowyml: the run history at {redact_url(url)} cannot be written ({type(exc).__name__}: {exc}); "
        "runs go on unrecorded. Fix the database or set FLOWYML_HISTORY=off.",
        HistoryWarning,
        stacklevel=2,
    )
