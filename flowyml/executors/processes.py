"""Where worker processes come from: a forkserver that has pandas imported already.

A spawned worker starts a fresh interpreter and imports flowyml, pandas,
pyarrow and Dask: most of a second, paid by every pool that starts (a
scheduled job's fresh ``with ParallelExecutor()``, every run of
``parallel_map``). Python's ``forkserver`` start method pays those imports
once per driver process, in one server process started the first time a pool
is needed; each worker after that is a fork of the server, up in
milliseconds, with nothing imported twice. Workers still start clean: the
server is single-threaded and never runs user code, and each child takes the
driver's ``sys.path``, working directory and main module settings as a
spawned one would. Where there is no forkserver (Windows), workers are
spawned.

Two things a forked worker would not get right by itself, which
:func:`prepare_worker` (run first in every worker) fixes:

- the environment: it has the server's, from when the server started. It
  takes the driver's, as it was when the pool started, so a variable set
  after the first run (credentials, an S3 endpoint, ``DASK_*`` settings)
  reaches the workers as it would spawned ones;
- dying with the driver. Python hands every child of the server a copy of
  the pipe that keeps the server alive, and a worker's parent is the server,
  not the driver: a driver killed outright (SIGKILL, the OOM killer) would
  leave the server and every worker running for good. The worker drops its
  copy, so the server ends with the driver, and asks Linux for a signal when
  its parent, the server, ends.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import threading
from collections.abc import Mapping
from multiprocessing.context import BaseContext

__all__ = ["PRELOAD", "dies_with_driver", "prepare_worker", "process_context"]

#: Imported once by the forkserver (or by each spawned worker as it starts),
#: where the driver has them: what the first tasks would otherwise import.
PRELOAD = ("dask.local", "flowyml.tasks", "flowyml.cache.tasks", "pandas", "pyarrow")


def process_context() -> BaseContext:
    """The multiprocessing context worker pools start their processes with."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    # Only read when the server starts (the first pool of this process); a
    # list the user's own code set is kept.
    from multiprocessing import forkserver

    current = list(getattr(getattr(forkserver, "_forkserver", None), "_preload_modules", []))
    wanted = [name for name in PRELOAD if name in sys.modules and name not in current]
    if wanted:
        context.set_forkserver_preload([name for name in current if name != "__main__"] + wanted)
    return context


def dies_with_driver(context: BaseContext) -> bool:
    """Whether a worker started now may ask for a signal when its parent ends.

    Linux's parent-death signal follows the thread that started the process:
    only ask when that thread lives as long as the driver does, the main one,
    or the forkserver's (which ends with the driver).
    """
    return context.get_start_method() == "forkserver" or threading.current_thread() is threading.main_thread()


def prepare_worker(environ: Mapping[str, str] | None, die_with_parent: bool) -> None:
    """In a new worker process: take the driver's environment, and die with it."""
    _adopt_environment(environ)
    _release_forkserver()
    if die_with_parent:
        from ..timeouts import die_with_parent as arrange

        arrange()


def _release_forkserver() -> None:
    """Close this process's copy of the pipe that keeps the forkserver alive.

    Only a child of the server has one it did not open itself; a pool this
    worker starts later launches a server of its own, as it would anyway.
    """
    from multiprocessing import forkserver

    server = getattr(forkserver, "_forkserver", None)
    fd = getattr(server, "_forkserver_alive_fd", None)
    if isinstance(fd, int) and getattr(server, "_forkserver_pid", None) is None:
        try:
            os.close(fd)
        except OSError:
            pass
        server._forkserver_alive_fd = None  # type: ignore[union-attr]


def _adopt_environment(environ: Mapping[str, str] | None) -> None:
    """In a worker: take ``environ`` (the driver's, when the pool started) as its own.

    ``DASK_*`` variables are read when Dask is imported, which the forkserver
    did: Dask's configuration is refreshed when they differ.
    """
    if environ is None or environ == os.environ:
        return
    dask_changed = {k: v for k, v in os.environ.items() if k.startswith("DASK_")} != {
        k: v for k, v in environ.items() if k.startswith("DASK_")
    }
    os.environ.clear()
    os.environ.update(environ)
    if dask_changed and "dask" in sys.modules:
        import dask.config

        dask.config.refresh()
