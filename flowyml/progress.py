"""The progress display executors drive while a pipeline runs.

The core creates one ``Progress`` per run and calls ``start(step)`` when a
task begins and ``finish(step, status)`` when it ends (from any thread)::

    with Progress(total=17, tasks_per_step={"load": 1, "clean": 8, "enrich": 8},
                  description="trips") as progress:
        progress.start("clean")
        ...
        progress.finish("clean", "succeeded")

Shown where a person is watching: a ``tqdm`` bar (tasks done / total, the
running steps in its postfix) in a terminal, or a widget in Jupyter. Where
nobody is (cron, CI, Airflow logs), it logs one INFO line per finished step
under the ``flowyml`` logger instead and prints nothing::

    step 'clean' succeeded: 8 tasks in 1.23s

Calls are cheap (a lock, a few dict updates, and at most ten redraws a
second however many tasks finish), so the core may call it for every task.
"""

from __future__ import annotations

import io
import logging
import os
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any, TextIO

from .status import Status

__all__ = ["Progress"]

logger = logging.getLogger("flowyml")

#: Seconds between two redraws of the bar (and of its postfix).
REDRAW_INTERVAL = 0.1
#: Seconds between redraws while no task starts or finishes, so the elapsed
#: time keeps moving during a long task.
IDLE_REDRAW_INTERVAL = 1.0
#: Running steps named in the postfix before it says "+N more".
POSTFIX_STEPS = 3


def _in_jupyter_kernel() -> bool:
    """True inside a Jupyter kernel; never imports IPython (a kernel already has)."""
    ipython = sys.modules.get("IPython")
    if ipython is None:
        return False
    try:
        shell = ipython.get_ipython()
    except Exception:  # a half-initialised or unusual IPython: treat as "not a notebook"
        return False
    return shell is not None and getattr(shell, "kernel", None) is not None


def _is_terminal(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):  # no isatty, or a closed stream
        return False


def _reported_width(stream: Any) -> int:
    """Columns the terminal behind ``stream`` reports; 0 when it reports none."""
    try:
        return os.get_terminal_size(stream.fileno()).columns
    except (AttributeError, ValueError, OSError, io.UnsupportedOperation):
        return 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    return int(value) if value.isdigit() and int(value) > 0 else default


def _bar_class() -> Any:
    """tqdm's notebook widget in Jupyter when ipywidgets is installed, else its text bar.

    ``tqdm.auto`` would pick the widget class in every kernel and, without
    ipywidgets, print a ``TqdmWarning`` on every run; Jupyter renders the
    text bar (carriage returns and all) just as well. Imported here: a
    disabled display needs no tqdm.
    """
    if _in_jupyter_kernel():
        try:
            import ipywidgets  # noqa: F401  only probing that widgets can be drawn
            from tqdm.notebook import tqdm as notebook_tqdm
        except ImportError:
            pass
        else:
            return notebook_tqdm
    from tqdm.std import tqdm

    return tqdm


def auto_enabled(stream: Any = None) -> bool:
    """Whether a bar should show: ``stream`` (default stderr) is a terminal, or this is Jupyter."""
    return _is_terminal(sys.stderr if stream is None else stream) or _in_jupyter_kernel()


@dataclass
class _StepTally:
    """What one step's tasks have done so far."""

    first_seen: float
    last_seen: float
    running: int = 0
    done: int = 0
    failed: int = 0
    cached: int = 0
    skipped: int = 0
    logged: bool = False
    order: int = 0  # when the step was first seen, among all steps

    def status(self) -> Status:
        if self.failed:
            return Status.FAILED
        if self.done and self.skipped == self.done:
            return Status.SKIPPED
        if self.done and self.cached == self.done:
            return Status.CACHED
        return Status.SUCCEEDED


def _plural(count: int, expected: int | None) -> str:
    if expected is not None and expected != count:
        return f"{count} of {expected} tasks finished"
    return "1 task" if count == 1 else f"{count} tasks"


def _step_message(step: str, tally: _StepTally, expected: int | None) -> str:
    details = [f"{n} {word}" for n, word in ((tally.failed, "failed"), (tally.cached, "cached")) if n]
    if tally.skipped and tally.skipped != tally.done:
        details.append(f"{tally.skipped} skipped")
    extra = f" ({', '.join(details)})" if details and tally.status() not in (Status.CACHED, Status.SKIPPED) else ""
    verdict = tally.status() if expected is None or tally.done >= expected else Status.STOPPED
    seconds = tally.last_seen - tally.first_seen
    return f"step {step!r} {verdict}: {_plural(tally.done, expected)}{extra} in {seconds:.2f}s"


class Progress:
    """Tasks done out of ``total``, as a bar or as one log line per finished step.

    Parameters
    ----------
    total : int
        Number of tasks the run will start or load from cache.
    tasks_per_step : dict, optional
        Step name -> its number of tasks, so a step's log line is written as
        soon as its last task finishes. Steps not listed are logged at
        ``close()``.
    enabled : bool, optional
        Show a bar. None (the default) shows one when stderr is a terminal
        or when running in a Jupyter kernel, and logs otherwise.
    description : str
        Text before the bar, such as the pipeline's name.
    file : text stream, optional
        Where the bar is drawn (default: stderr, or the notebook widget).

    Notes
    -----
    Thread-safe: ``start``/``finish`` may be called from any thread. When
    disabled it writes nothing but log records.
    """

    def __init__(
        self,
        total: int,
        *,
        tasks_per_step: Mapping[str, int] | None = None,
        enabled: bool | None = None,
        description: str = "",
        file: TextIO | None = None,
    ) -> None:
        self.total = int(total)
        self.description = description
        self.enabled = auto_enabled(file) if enabled is None else bool(enabled)
        self._expected = tasks_per_step or {}  # read only: not copied (a run passes one per task)
        self._steps: dict[str, _StepTally] = {}
        # Steps with a task running now (step -> its index in _steps): what the postfix
        # names. Scanning every tally at each redraw cost a run of 100,000 steps a pass
        # over all of them ten times a second.
        self._running: dict[str, int] = {}
        self._lock = threading.Lock()
        self._done = 0
        self._drawn = 0  # tasks already passed to the bar
        self._last_draw = 0.0
        self._postfix = ""
        self._closed = False
        self._bar = self._make_bar(file) if self.enabled else None
        # No bar and a logger that would drop the step lines (a library's default):
        # nothing to show, so events only count, without the lock or the tallies.
        self._silent = self._bar is None and not logger.isEnabledFor(logging.INFO)
        self._stop_ticker = threading.Event()
        self._ticker: threading.Thread | None = None
        if self._bar is not None:
            # Without events a long task would freeze the elapsed-time display.
            self._ticker = threading.Thread(target=self._tick, name="flowyml-progress", daemon=True)
            self._ticker.start()

    def _make_bar(self, file: TextIO | None) -> Any:
        tqdm = _bar_class()
        options: dict[str, Any] = {
            "total": self.total,
            "desc": self.description or None,
            "unit": "task",
            # flowyml rate-limits redraws itself (_draw); tqdm draws whenever asked.
            "mininterval": 0,
            "miniters": 1,
            "dynamic_ncols": True,
            "leave": True,
        }
        if file is not None:
            options["file"] = file
        stream = sys.stderr if file is None else file
        if _is_terminal(stream) and _reported_width(stream) <= 0:
            # A terminal that reports no size (docker exec, some CI runners): tqdm would
            # draw nothing at all, so give it a fixed size instead.
            options["dynamic_ncols"] = False
            options["ncols"] = _env_int("COLUMNS", 100)
            options["nrows"] = _env_int("LINES", 24)
        return tqdm(**options)

    @property
    def silent(self) -> bool:
        """Nothing is shown or logged: ``start`` does nothing and ``finish`` only counts."""
        return self._silent

    # -- events ---------------------------------------------------------------

    def start(self, key_step: str) -> None:
        """A task of step ``key_step`` started running."""
        if self._silent:
            return
        now = time.perf_counter()
        with self._lock:
            tally = self._tally(key_step, now)
            tally.running += 1
            if tally.running == 1:
                self._running[key_step] = tally.order
            if self._bar is not None and now - self._last_draw >= REDRAW_INTERVAL:
                self._draw(now)

    def finish(self, step: str, status: str = "succeeded") -> None:
        """One task of ``step`` ended: ``succeeded``, ``failed``, ``cached`` or ``skipped``."""
        if self._silent:
            self._done += 1
            return
        now = time.perf_counter()
        message = None
        with self._lock:
            tally = self._tally(step, now)
            if tally.running:
                tally.running -= 1
                if not tally.running:
                    del self._running[step]
            tally.done += 1
            tally.last_seen = now
            if status == "failed":
                tally.failed += 1
            elif status == "cached":
                tally.cached += 1
            elif status == "skipped":
                tally.skipped += 1
            self._done += 1
            if self._bar is not None:
                if now - self._last_draw >= REDRAW_INTERVAL:
                    self._draw(now)
            elif not tally.logged and tally.done == self._expected.get(step):
                tally.logged = True
                # Formatting costs more than the rest of this method: skip it when
                # the record would be dropped (the default, as flowyml's logger is silent).
                if logger.isEnabledFor(logging.INFO):
                    message = _step_message(step, tally, self._expected.get(step))
        if message is not None:  # logged outside the lock: handlers may be slow
            logger.info(message)

    def _tally(self, step: str, now: float) -> _StepTally:
        tally = self._steps.get(step)
        if tally is None:
            tally = self._steps[step] = _StepTally(first_seen=now, last_seen=now, order=len(self._steps))
        return tally

    # -- drawing --------------------------------------------------------------

    def running_steps(self) -> dict[str, int]:
        """Step name -> tasks running now, in the order the steps first appeared."""
        with self._lock:
            return {name: self._steps[name].running for name in self._running_in_order()}

    def _running_in_order(self) -> list[str]:
        """Steps with a task running, in the order the steps first appeared (a few: about one per worker)."""
        return sorted(self._running, key=self._running.__getitem__)

    @property
    def done(self) -> int:
        """Tasks finished so far (any status)."""
        return self._done

    def _postfix_text(self) -> str:
        running = [(name, self._steps[name].running) for name in self._running_in_order()]
        if not running:
            return ""
        names = [name if count == 1 else f"{name}×{count}" for name, count in running[:POSTFIX_STEPS]]
        more = f" +{len(running) - POSTFIX_STEPS} more" if len(running) > POSTFIX_STEPS else ""
        return "running " + ", ".join(names) + more

    def _draw(self, now: float) -> None:
        """Push new counts and the running steps to the bar; called with the lock held."""
        bar = self._bar
        assert bar is not None, "drawn only when the progress has a bar"
        self._last_draw = now
        postfix = self._postfix_text()
        if postfix != self._postfix:
            self._postfix = postfix
            bar.set_postfix_str(postfix, refresh=False)
        if self._done > self._drawn:
            bar.update(self._done - self._drawn)  # draws too (mininterval=0)
            self._drawn = self._done
        else:
            bar.refresh()

    def refresh(self) -> None:
        """Redraw the bar now (counts, running steps, elapsed time)."""
        with self._lock:
            if self._bar is not None and not self._closed:
                self._draw(time.perf_counter())

    def _tick(self) -> None:
        while not self._stop_ticker.wait(IDLE_REDRAW_INTERVAL):
            with self._lock:
                if self._closed:
                    return
                if time.perf_counter() - self._last_draw >= IDLE_REDRAW_INTERVAL:
                    self._draw(time.perf_counter())

    # -- end ------------------------------------------------------------------

    def close(self) -> None:
        """Draw the final count and release the bar; log steps not logged yet. Idempotent."""
        messages = []
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self._bar is not None:
                self._draw(time.perf_counter())
                self._bar.close()
            else:
                for step, tally in self._steps.items():
                    if not tally.logged and tally.done:
                        tally.logged = True
                        if logger.isEnabledFor(logging.INFO):
                            messages.append(_step_message(step, tally, self._expected.get(step)))
        self._stop_ticker.set()
        if self._ticker is not None and self._ticker is not threading.current_thread():
            self._ticker.join()
        for message in messages:
            logger.info(message)

    def __enter__(self) -> Progress:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()
