"""Ctrl-C and SIGTERM during a run: stop the workers, remove partial output, exit non-zero.

Python turns SIGINT (Ctrl-C) into ``KeyboardInterrupt`` in the main thread;
:func:`interruptible` does the same for SIGTERM (what ``kill``, Kubernetes
and most schedulers send), as :class:`RunInterrupted`, a ``KeyboardInterrupt``.
Either way the run's one code path reacts the same: the process backend
kills its workers at once instead of waiting for running steps, the sinks'
staging directories are removed, and the CLI exits with ``128 + signal``
(130 for SIGINT, 143 for SIGTERM).

A second signal while the first is being handled exits at once.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["RunInterrupted", "exit_code", "interruptible"]


class RunInterrupted(KeyboardInterrupt):
    """SIGTERM (or another signal) stopped the run; ``signum`` says which."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextmanager
def interruptible() -> Iterator[None]:
    """Within the block, SIGINT and SIGTERM raise ``KeyboardInterrupt`` in the main thread.

    The first signal raises; a second one (cleanup taking too long) exits the
    process at once with ``128 + signal``. Outside the main thread this does
    nothing (Python only delivers signals there).
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []

    def handler(signum: int, frame: object) -> None:
        if received:
            os._exit(128 + signum)
        received.append(signum)
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        raise RunInterrupted(signum)

    previous = {number: signal.signal(number, handler) for number in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for number, old in previous.items():
            signal.signal(number, old)


def exit_code(interrupt: KeyboardInterrupt) -> int:
    """``128 + signal``: 130 for Ctrl-C, 143 for SIGTERM."""
    return 128 + getattr(interrupt, "signum", signal.SIGINT)


def exit_now(code: int) -> None:
    """Exit with ``code``, without waiting for threads that are still running steps.

    Steps running in threads (``thread`` backend, timed-out attempts) cannot
    be stopped; Python would wait for them before exiting.
    """
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
    busy = [t for t in threading.enumerate() if t is not threading.current_thread() and not t.daemon
            and t.is_alive()]
    if busy:
        os._exit(code)
    sys.exit(code)
