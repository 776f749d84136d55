"""Timeouts: run one attempt of a step for at most ``timeout`` seconds.

:func:`call_with_timeout` runs the attempt in a thread where the worker
settings say so (the ``sync``, ``thread`` and ``distributed`` backends): an
overrunning attempt is abandoned, reported as failed and retried at once, but
Python cannot stop a thread, so it runs on to its end in the background.

Killable timeouts (:func:`call_in_child`): on the ``process`` backend a step
with ``timeout=`` runs each attempt in a child forked from the pool worker.
The worker waits for the child's result for at most ``timeout`` seconds; a
child that overruns is killed (with its process group, so anything it
started dies too) and the attempt fails with
:class:`~flowyml.exceptions.StepTimeoutError`, to be retried like any other
failure. A child that dies (segfault, ``os._exit``, out of memory) fails the
attempt with :class:`~flowyml.exceptions.WorkerDiedError`; the pool worker
itself lives on.

Why fork: the child shares the worker's memory, so the step's inputs (often
a large DataFrame) reach it without being copied or pickled, and it starts
quickly. A pool worker runs one task at a time in its main thread, and waits for
its store thread to end (:mod:`flowyml.behind`), so at the Python level
it is single-threaded when it forks; the native thread pools of
NumPy (OpenBLAS) and pyarrow register fork handlers. Where other Python
threads are running (a step that started some), the attempt runs in a
freshly spawned process instead, its function and arguments sent by
cloudpickle. Either way a child that hung after the fork would only ever
cost its timeout: it is killed like any overrunning attempt.

Only the result (or the exception, with its traceback) travels back, through
a pipe, pickled with cloudpickle.
"""

from __future__ import annotations

import os
import pickle
import select
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import cloudpickle

from . import behind
from .context import TaskContext, running
from .exceptions import StepTimeoutError, WorkerDiedError

__all__ = ["call_in_child", "call_with_timeout", "die_with_parent", "exit_cause"]

_OK, _ERROR = b"k", b"e"


def call_with_timeout(
    func: Callable[..., Any],
    args: list[Any],
    kwargs: dict[str, Any],
    timeout: float,
    context: TaskContext,
    *,
    killable: bool = False,
) -> Any:
    """Run one attempt for at most ``timeout`` seconds.

    In a thread, an overrunning attempt is abandoned: it is reported as failed
    (and retried) at once, but Python cannot stop a thread, so it runs on to
    its end in the background. ``killable`` (the process backend's
    :attr:`~flowyml.tasks.WorkerSettings.killable_timeouts`): the attempt runs
    in a child process that is killed instead (:func:`call_in_child`).
    """
    if killable:
        return call_in_child(func, args, kwargs, timeout, context)
    box: dict[str, Any] = {}

    def target() -> None:
        with running(context):
            try:
                box["value"] = func(*args, **kwargs)
            except BaseException as exc:  # handed to the waiting thread
                box["error"] = exc

    thread = threading.Thread(target=target, name=f"flowyml-{context.step}", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise StepTimeoutError(
            f"step {context.step!r} attempt {context.attempt} ran past its timeout of "
            f"{timeout:g}s (its thread cannot be stopped and runs on in the background)"
        )
    if "error" in box:
        raise box["error"]
    return box["value"]


def call_in_child(
    func: Callable[..., Any],
    args: list[Any],
    kwargs: dict[str, Any],
    timeout: float,
    context: TaskContext,
) -> Any:
    """Call ``func(*args, **kwargs)`` in a child process killed after ``timeout`` seconds.

    Returns the value, or raises the exception the call raised (with its
    traceback), :class:`StepTimeoutError` when it overran, or
    :class:`WorkerDiedError` when the child died without answering.
    """
    behind.settle()  # the worker's store thread, if busy, ends first: fork single-threaded
    if hasattr(os, "fork") and threading.active_count() == 1:
        pid, reader = _fork(func, args, kwargs, context)
    else:
        pid, reader = _spawn(func, args, kwargs, context)
    try:
        data, finished = _read_until(reader, time.monotonic() + timeout)
    finally:
        os.close(reader)
    if not finished:
        _kill(pid)
        raise StepTimeoutError(
            f"step {context.step!r}" + _partition(context) + f" attempt {context.attempt} ran past "
            f"its timeout of {timeout:g}s; its process was killed"
        )
    exitcode = _reap(pid)
    if not data:
        raise WorkerDiedError(
            f"the process running step {context.step!r}" + _partition(context) +
            f" attempt {context.attempt} died: {exit_cause(exitcode)}"
        )
    return _decode(data)


def _partition(context: TaskContext) -> str:
    return f" partition {context.partition}" if context.partition is not None else ""


# -- starting the child ----------------------------------------------------------------


def _fork(func, args, kwargs, context) -> tuple[int, int]:
    reader, writer = os.pipe()
    for stream in (sys.stdout, sys.stderr):  # or buffered output would print twice
        try:
            stream.flush()
        except Exception:
            pass
    parent = os.getpid()
    pid = os.fork()
    if pid == 0:  # the child: never returns
        os.close(reader)
        _child_main(writer, lambda: _call(func, args, kwargs, context), parent)
    os.close(writer)
    return pid, reader


def _spawn(func, args, kwargs, context) -> tuple[int, int]:
    import tempfile

    reader, writer = os.pipe()
    with tempfile.NamedTemporaryFile("wb", prefix="flowyml-attempt-", suffix=".pkl", delete=False) as file:
        cloudpickle.dump((func, args, kwargs, context, os.getpid()), file)
    os.set_inheritable(writer, True)
    try:
        pid = os.posix_spawn(
            sys.executable,
            [sys.executable, "-c", "from flowyml.timeouts import _spawned_main; _spawned_main()",
             str(writer), file.name],
            dict(os.environ),
            setsid=True,  # its own group: a timeout kills what it started too
        )
    except BaseException:
        os.close(reader)
        os.unlink(file.name)
        raise
    finally:
        os.close(writer)
    return pid, reader


def _spawned_main() -> None:
    """Entry point of a spawned child (see ``_spawn``)."""
    writer, path = int(sys.argv[1]), sys.argv[2]
    with open(path, "rb") as file:
        func, args, kwargs, context, parent = cloudpickle.load(file)
    os.unlink(path)
    _child_main(writer, lambda: _call(func, args, kwargs, context), parent)


def _call(func, args, kwargs, context) -> Any:
    with running(context):
        return func(*args, **kwargs)


def _child_main(writer: int, call: Callable[[], Any], parent: int) -> None:
    code = 0
    try:
        try:
            os.setpgid(0, 0)  # its own group: a timeout kills what it started too
        except OSError:
            pass
        die_with_parent(parent)
        try:
            data = _OK + cloudpickle.dumps(call(), protocol=pickle.HIGHEST_PROTOCOL)
        except BaseException as exc:  # handed to the parent, traceback included
            data = _ERROR + _encode_error(exc)
        _write_all(writer, data)
    except BaseException:
        code = 70
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass
        os._exit(code)  # no atexit handlers, no finalizers of the parent's objects


def die_with_parent(parent: int | None = None) -> None:
    """Ask Linux to SIGKILL this process when its parent dies (no-op elsewhere).

    ``parent`` is the expected parent pid: if it is already gone, exit now.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)
    except Exception:
        return
    if parent is not None and os.getppid() != parent:
        os._exit(70)


# -- talking to it ----------------------------------------------------------------------


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]
    os.close(fd)


def _read_until(fd: int, deadline: float) -> tuple[bytes, bool]:
    """Everything the child writes until it closes the pipe, or until ``deadline``."""
    chunks: list[bytes] = []
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return b"", False
        ready, _, _ = select.select([fd], [], [], remaining)
        if not ready:
            continue
        chunk = os.read(fd, 1 << 20)
        if not chunk:
            return b"".join(chunks), True
        chunks.append(chunk)


def _encode_error(exc: BaseException) -> bytes:
    from .exceptions import _pack_cause

    return pickle.dumps(_pack_cause(exc), protocol=pickle.HIGHEST_PROTOCOL)


def _decode(data: bytes) -> Any:
    kind, body = data[:1], data[1:]
    if kind == _OK:
        return cloudpickle.loads(body)
    payload, tb = pickle.loads(body)
    error = pickle.loads(payload)
    if tb is not None:
        from tblib import Traceback

        error = error.with_traceback(Traceback.from_dict(tb).as_traceback())
    raise error


def _kill(pid: int) -> None:
    for target in (lambda: os.killpg(pid, signal.SIGKILL), lambda: os.kill(pid, signal.SIGKILL)):
        try:
            target()
        except OSError:
            pass
    _reap(pid)


def _reap(pid: int) -> int | None:
    """Wait for the child; its exit code (-N for signal N), None if already reaped elsewhere."""
    while True:
        try:
            return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
        except InterruptedError:
            continue
        except ChildProcessError:
            return None


def exit_cause(exitcode: int | None) -> str:
    """A process's exit code in words (``Process.exitcode`` convention: -N for signal N).

    Examples
    --------
    >>> exit_cause(-9)
    'killed by signal SIGKILL (killed, e.g. by the out-of-memory killer)'
    >>> exit_cause(3)
    'exited with code 3'
    """
    if exitcode is None:
        return "exit cause unknown"
    if exitcode >= 0:
        return f"exited with code {exitcode}"
    try:
        name = signal.Signals(-exitcode).name
    except ValueError:
        name = str(-exitcode)
    hint = _SIGNAL_HINTS.get(name)
    return f"killed by signal {name}" + (f" ({hint})" if hint else "")


_SIGNAL_HINTS = {
    "SIGKILL": "killed, e.g. by the out-of-memory killer",
    "SIGSEGV": "segmentation fault",
    "SIGBUS": "bus error",
    "SIGABRT": "aborted",
    "SIGTERM": "terminated",
    "SIGFPE": "floating-point exception",
}
