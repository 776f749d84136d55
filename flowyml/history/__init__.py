"""The run history: every run (API, CLI, notebook) recorded in a database, to query, chart and prune.

By default an embedded SQLite file, ``$FLOWYML_HOME/history.db``
(``~/.flowyml/history.db``); ``FLOWYML_HISTORY=postgresql://...`` shares one
history between job hosts; ``FLOWYML_HISTORY=off`` or
``Pipeline.run(history=False)`` records nothing. See ``docs/monitoring.md``.

>>> import flowyml.history
>>> flowyml.history.runs(pipeline="etl", since="7d")            # doctest: +SKIP
>>> flowyml.history.show("1a2b3c4d")["steps"]                    # doctest: +SKIP

Importing this module is cheap: SQLAlchemy is imported when a function
first reads or writes the database.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .config import DEFAULT_RETENTION, HistoryConfigError, HistoryWarning, history_url, parse_age

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["DEFAULT_RETENTION", "HistoryConfigError", "HistoryWarning", "flush", "prune", "runs", "show",
           "steps", "trends"]

Since = str | timedelta | datetime | None


def runs(
    pipeline: str | None = None,
    *,
    status: str | None = None,
    since: Since = None,
    limit: int | None = 100,
    url: str | None = None,
) -> pd.DataFrame:
    """Recent runs, newest first, one row each: a DataFrame for notebooks.

    Parameters
    ----------
    pipeline : str, optional
        Only this pipeline's runs.
    status : str, optional
        ``running``, ``succeeded``, ``failed``, ``interrupted`` or ``lost``.
    since : str, timedelta or datetime, optional
        Runs started since then: an age (``"7d"``, ``"12h"``), a time
        (``"2026-12-01"``, naive times are UTC) or a ``timedelta``.
    limit : int or None
        At most this many (default 100); None for all.
    url : str, optional
        The history's database; default ``FLOWYML_HISTORY`` or ``$FLOWYML_HOME/history.db``.
    """
    import pandas as pd

    from .queries import RUN_COLUMNS, open_history, read_runs, since_time

    rows = read_runs(open_history(_url(url)), pipeline, status, since_time(since), limit)
    frame = pd.DataFrame(rows, columns=list(RUN_COLUMNS))
    for column in ("started_at", "ended_at"):
        frame[column] = pd.to_datetime(frame[column], utc=True)
    return frame


def show(run_id: str, *, url: str | None = None) -> dict[str, Any]:
    """One run in full (a unique prefix of its id will do), with ``"steps"``: one dict per step, in order.

    Raises ``KeyError`` naming the run when the history has no such run.
    """
    from .queries import open_history, read_run

    run = read_run(open_history(_url(url)), run_id)
    if run is None:
        raise KeyError(f"no run {run_id!r} in the history (flowyml history lists the recent ones)")
    return run


def steps(pipeline: str, *, last: int = 30, url: str | None = None) -> pd.DataFrame:
    """The steps of the pipeline's ``last`` ended runs, oldest first: one row per step per run."""
    import pandas as pd

    from .queries import STEP_COLUMNS, open_history, read_steps

    rows = read_steps(open_history(_url(url)), pipeline, last)
    frame = pd.DataFrame(rows, columns=[*STEP_COLUMNS, "started_at", "run_status"])
    frame["started_at"] = pd.to_datetime(frame["started_at"], utc=True)
    return frame


def trends(pipeline: str, path: str | Path, *, last: int = 30, url: str | None = None) -> Path:
    """Write one self-contained HTML page charting the pipeline's last runs; its path.

    Each step's duration over the last ``last`` runs, failures marked, and
    the cache hit rate of each run.
    """
    from .queries import open_history, recent
    from .trends_page import write_trends

    return write_trends(pipeline, *recent(open_history(_url(url)), pipeline, last), Path(path))


def prune(older_than: str | timedelta = DEFAULT_RETENTION, *, url: str | None = None) -> int:
    """Delete the runs started more than ``older_than`` ago (``"30d"``); how many were deleted.

    Runs still running are kept. Runs also prune themselves once a day by
    ``FLOWYML_HISTORY_RETENTION`` (default ``90d``; ``never`` keeps all).
    """
    from .maintenance import prune as prune_runs
    from .queries import open_history

    age = parse_age(older_than, "older_than") if isinstance(older_than, str) else older_than
    return prune_runs(open_history(_url(url)), age)


def flush(timeout: float | None = None) -> bool:
    """Wait until the records of this process's ended runs are written; False if ``timeout`` passed first.

    ``run()`` returns before its record is complete (see
    :mod:`flowyml.history.recorder`); the functions here that read the
    history call this first, and the interpreter does as it exits.
    """
    from .recorder import flush as flush_records

    return flush_records(timeout)


def _url(url: str | None) -> str | None:
    return history_url(url) if url is not None else history_url()
