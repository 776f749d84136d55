"""The distributed backend: a ``distributed.Client`` on a Dask cluster.

Three ways to get a client, in order: ``client=`` (used as is, never closed),
``address=`` or ``FLOWYML_SCHEDULER_ADDRESS`` (connect, with ``security=``
for TLS; the cluster is left running), else a ``LocalCluster`` of
``max_workers`` single-threaded worker processes bound to 127.0.0.1, closed
with the executor. The client is never made the process-wide default: a
default client captures every other Dask computation in the process (and
switches ``dask.dataframe`` to p2p shuffles).

One run is one ``client.get`` of the compiled graph:

- a whole step whose function the pipeline adds under several names is keyed
  ``("process_chunk-1a2b3c4d", "chunk_0")``: one Dask task prefix for all the
  copies (see :mod:`flowyml.compile`), as Dask's scheduler pays per prefix;
- a run left with no worker connected to the scheduler fails with a
  :class:`~flowyml.BackendError` after ``no_workers_timeout`` seconds
  (``FLOWYML_NO_WORKERS_TIMEOUT``, default 120): Dask itself would wait for
  workers forever;

- keys carry a run token (``("clean-1a2b3c4d", 3)``) so concurrent runs on
  one cluster never share keys; Dask strips it, so task prefixes on the
  dashboard are the step names;
- a step's ``resources`` become Dask resource restrictions (per-key layer
  annotations of a ``HighLevelGraph``);
- each task publishes how it went (no value) on the event topic
  ``flowyml-<run_id>``; the driver subscribes, so progress moves live, and
  reads the topic back after the run only if the live stream missed some;
- what steps log or print on a worker is published on ``flowyml-logs-<run_id>``
  by a worker plugin (``flowyml-logs``) and replayed on the driver
  (:mod:`flowyml.logs`);
- after the run one call to the scheduler drops the run's event topics (a
  long-lived scheduler would otherwise keep every run's events) and lists the
  run's tasks that were lost with a dying worker: their records count the
  lost attempt and the HTML report gets a "Workers lost" section;
- with ``performance_report=``, Dask's own performance report of the run is
  written and linked from the HTML report;
- where the scheduler serves the flowyml page (always on flowyml's own
  ``LocalCluster``, which preloads :mod:`flowyml.dashboard`), each run is
  announced to it before its graph is sent and after it ends, and
  ``flowyml_page_link`` names the page.

Why a step's ``retries`` are not also given to Dask: Dask's ``retries`` re-run
a task that *raised*, which flowyml's own retry loop already does (with
``retry_delay`` and attempt numbers); both would run a failing step
``(retries + 1) ** 2`` times. A worker's death is a different path in the
scheduler: the tasks it was running are rescheduled on other workers up to
``distributed.scheduler.allowed-failures`` times (default 3), whatever their
``retries``; past that the run fails with :class:`~flowyml.StepFailed` caused
by :class:`~flowyml.WorkerDiedError`.

One backend, one file, as every backend: this one is the longest because
Dask's distributed scheduler sends no task's report back to flowyml, so it
also carries what reports them (the worker plugin, the run's event topics)
and what tidies the scheduler after a run.
"""

from __future__ import annotations

import gc
import html
import logging
import os
import threading
import time
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from distributed.diagnostics.plugin import WorkerPlugin

from ..bulk import no_gc_passes
from ..dashboard.driver import announce_end, announce_start, page_link
from ..exceptions import BackendError, OptionError, StepFailed, WorkerDiedError
from ..logs import LOG_TOPIC, forwarding_level, install_forwarding, quiet_heartbeats_while_closing
from .base import Backend, RunHooks, register
from .cluster_graph import cluster_graph, reporting_tasks
from .run_events import EVENT_TOPIC, FLUSH_DELAY, _RunEvents, _step_of

__all__ = ["EVENT_TOPIC", "DistributedBackend", "FlowymlPlugin"]

log = logging.getLogger("flowyml")

#: The worker plugin's name: registering it again replaces it, never doubles it.
PLUGIN_NAME = "flowyml"

#: Seconds a run waits with no worker connected before it fails (``FLOWYML_NO_WORKERS_TIMEOUT``).
NO_WORKERS_TIMEOUT = 120.0
#: How often, at most, a run asks the scheduler how many workers it has.
WORKERS_CHECK_INTERVAL = 1.0
#: Seconds to wait for a connection (or a LocalCluster) begun in the background.
#: Dask bounds each step of it (the connect timeout, worker start-up); this only
#: keeps a run or a ``close`` from waiting forever on a start that never ends.
START_TIMEOUT = 300.0


class FlowymlPlugin(WorkerPlugin):
    """On every worker: batch task events, and publish what flowyml tasks log or print.

    Only records made inside a flowyml task are forwarded (see
    :func:`flowyml.logs.install_forwarding`); the rest of the worker's logging
    is left alone, so the plugin is harmless on a shared cluster.
    """

    def __init__(self, level: int, quiet_shutdown: bool = False) -> None:
        self.level = level
        self.quiet_shutdown = quiet_shutdown
        self._uninstall: Callable[[], None] | None = None
        self._worker: Any = None  # distributed.Worker, once set up
        self._lock = threading.Lock()
        self._pending: dict[str, list] = {}

    def __getstate__(self) -> dict[str, Any]:
        return {"level": self.level, "quiet_shutdown": self.quiet_shutdown}

    def __setstate__(self, state: dict[str, Any]) -> None:
        FlowymlPlugin.__init__(self, state["level"], state.get("quiet_shutdown", False))

    def setup(self, worker: Any) -> None:
        from distributed import get_worker

        def send(context, item) -> None:
            # Several workers may share a process (LocalCluster(processes=False)):
            # each forwards only its own tasks' records, to its own scheduler.
            try:
                owner = get_worker()
            except ValueError:  # a thread the step started itself (a timeout's): assume ours
                owner = worker
            if owner is worker:
                worker.log_event(LOG_TOPIC.format(run_id=context.run_id), item)

        self._worker = worker
        self._uninstall = install_forwarding(send, self.level, worker.address)
        if self.quiet_shutdown:
            quiet_heartbeats_while_closing()

    def teardown(self, worker: Any) -> None:
        self._flush()
        if self._uninstall is not None:
            self._uninstall()
            self._uninstall = None

    def publish(self, topic: str, event: list) -> None:
        """From a task thread: queue ``event``; the worker's loop sends the batch shortly."""
        with self._lock:
            first = not self._pending
            self._pending.setdefault(topic, []).append(event)
        if first:
            self._worker.loop.add_callback(self._worker.loop.call_later, FLUSH_DELAY, self._flush)

    def _flush(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, {}
        for topic, events in pending.items():
            self._worker.log_event(topic, events)


@register
class DistributedBackend(Backend):
    """Runs the graph with ``client.get`` on a Dask cluster.

    Opening is reference-counted, so threads running pipelines on one
    executor at once share one client and the last to finish closes it.
    """

    name = "distributed"
    pickles = True
    groups_copies = True
    has_client = True

    def __init__(
        self,
        max_workers: int | None = None,
        *,
        address: str | None = None,
        client: Any = None,
        security: Any = None,
        performance_report: str | os.PathLike[str] | None = None,
        no_workers_timeout: float | None = None,
    ) -> None:
        super().__init__(max_workers)
        self.no_workers_timeout = _no_workers_timeout(no_workers_timeout)
        self._requested_workers = max_workers
        self.address = address or os.environ.get("FLOWYML_SCHEDULER_ADDRESS") or None
        self.security = security
        self.performance_report = performance_report
        self._given_client = client
        self._client: Any = None  # distributed.Client, imported only when connecting
        self._cluster: Any = None  # the LocalCluster started here, if any
        self._opened = 0
        self._lock = threading.Lock()
        self._start_lock = threading.Lock()
        self._starting: threading.Thread | None = None  # connecting in the background (start)
        self._start_error: BaseException | None = None
        if client is not None:
            self.max_workers = max_workers or _worker_threads(client) or self.max_workers

    # -- lifecycle ------------------------------------------------------------------

    def start(self) -> None:
        """Connect (or start the LocalCluster) in a background thread; ``open`` waits for it."""
        with self._start_lock:  # not self._lock: a start under way holds that one
            if self._client is not None or self._starting is not None:
                return
            self._start_error = None
            self._starting = threading.Thread(target=self._connect_in_background, name="flowyml-cluster-start",
                                              daemon=True)
            self._starting.start()

    def _connect_in_background(self) -> None:
        try:
            with self._lock:
                if self._client is None:
                    self._connect()
        except BaseException as exc:  # raised in the run that waits for it
            self._start_error = exc

    def _join_start(self) -> BaseException | None:
        """Wait for a background start; its error, if it failed (and nobody took it yet)."""
        thread = self._starting
        if thread is None:
            return None
        thread.join(START_TIMEOUT)
        if thread.is_alive():
            where = f"the Dask scheduler at {self.address}" if self.address else "the LocalCluster"
            return BackendError(
                f"connecting to {where} did not finish within {START_TIMEOUT:g} s; check that the "
                f"scheduler answers (its dashboard's /health page) and how loaded this machine is"
            )
        with self._start_lock:
            if self._starting is not thread:
                return None
            self._starting = None
            error, self._start_error = self._start_error, None
        return error

    def open(self) -> None:
        with self._connected():
            self._opened += 1  # only once connected: a failed open needs no close

    @contextmanager
    def _connected(self) -> Iterator[None]:
        """Hold the lock with a client: the one a background start made, else a new one."""
        error = self._join_start()
        if error is not None:
            raise error
        with self._lock:
            if self._client is None:
                self._connect()
            yield

    def cancel_start(self) -> None:
        self._join_start()  # a cluster half-started cannot be stopped: let it finish, then close it
        with self._lock:
            if self._opened:  # a run opened it meanwhile: it is theirs
                return
            client, self._client = self._client, None
            cluster, self._cluster = self._cluster, None
        self._disconnect(client, cluster)

    def _connect(self) -> None:
        with _no_finalizers_while_starting():
            self._connect_now()

    def _connect_now(self) -> None:
        from distributed import Client, LocalCluster

        if self._given_client is not None:
            self._client = self._given_client
        elif self.address:
            try:
                # The connect timeout is Dask's (distributed.comm.timeouts.connect, 30 s).
                self._client = Client(self.address, security=self.security, set_as_default=False)
            except (OSError, TypeError, ValueError) as exc:  # unreachable, or TLS settings that do not fit
                raise BackendError(
                    f"cannot reach the Dask scheduler at {self.address!r}: {exc}. Check the "
                    f"address (FLOWYML_SCHEDULER_ADDRESS), that `dask scheduler` is running, "
                    f"and the TLS settings (security=...)"
                ) from exc
        else:
            from .local import _main_module_hidden

            # Like the process pool's: a script without an ``if __name__ ==
            # "__main__":`` guard must not run again in every worker it spawns.
            with _main_module_hidden():
                self._cluster = LocalCluster(
                    n_workers=self.max_workers,
                    threads_per_worker=1,
                    processes=True,
                    host="127.0.0.1",
                    dashboard_address="127.0.0.1:0",
                    silence_logs=logging.WARNING,
                    scheduler_kwargs=_with_dashboard_preload(),
                )
            self._client = Client(self._cluster, set_as_default=False)
        if self._cluster is None and not self._requested_workers:
            # A cluster we did not size: report what it has.
            self.max_workers = _worker_threads(self._client) or self.max_workers
        try:
            # Idempotent: the same name replaces the plugin on every worker,
            # and workers that join later get it too.
            plugin = FlowymlPlugin(forwarding_level(), quiet_shutdown=self._cluster is not None)
            self._client.register_plugin(plugin, name=PLUGIN_NAME)
        except Exception as exc:  # logs are a convenience; the run must not depend on them
            log.warning("worker logs will not reach this process: %s", exc)
        self.dashboard_link = self._client.dashboard_link
        self.flowyml_page_link = page_link(self._client, self.dashboard_link)
        if self.flowyml_page_link:
            log.info("Dask dashboard: %s, flowyml page: %s", self.dashboard_link, self.flowyml_page_link)
        else:
            log.info("Dask dashboard: %s", self.dashboard_link)

    def close(self) -> None:
        self._join_start()
        with self._lock:
            self._opened = max(self._opened - 1, 0)
            if self._opened:
                return
            client, self._client = self._client, None
            cluster, self._cluster = self._cluster, None
        self._disconnect(client, cluster)

    def _disconnect(self, client: Any, cluster: Any) -> None:
        if client is not None and client is not self._given_client:
            client.close()
        if cluster is not None:
            cluster.close()

    @property
    def client(self) -> Any:
        return self._client

    def _replace_lost_workers(self) -> None:
        """Bring flowyml's own LocalCluster back to ``max_workers`` workers.

        A worker that dies is restarted by its nanny. But a worker the scheduler
        removes (it stopped answering: a blocked event loop, a long pause) closes
        its nanny as well, and a ``LocalCluster`` never starts another: without
        this, the cluster shrinks for good, to no worker at all. The cluster
        forgets such a worker after ``distributed.deploy.lost-worker-timeout``
        (15 s); ``scale`` then starts its replacement.
        """
        cluster = self._cluster
        if cluster is not None and cluster.status.name == "running" and len(cluster.workers) < self.max_workers:
            log.warning("flowyml's LocalCluster has %d of its %d workers; starting replacements",
                        len(cluster.workers), self.max_workers)
            cluster.scale(self.max_workers)

    def key_suffix(self, run_id: str) -> str:
        return f"-{run_id}"

    def check_local_paths(self, paths: Sequence[Any]) -> None:
        if self._cluster is not None or not paths:  # flowyml's own LocalCluster runs on this machine
            return
        from ..io.shared import check_workers_see

        check_workers_see(self._client, list(paths))

    # -- one run ----------------------------------------------------------------------

    def execute(self, dsk: Mapping, keys: Sequence[Hashable], hooks: RunHooks) -> list[Any]:
        if self._client is None:  # called outside ``open``: connect for this and later runs
            with self._connected():
                pass
        client = self._client
        run = _RunEvents(client, hooks, self.key_suffix(hooks.run_id))
        window = _PerformanceWindow(client, self.performance_report) if self.performance_report else None
        run.subscribe()
        announced = self.flowyml_page_link is not None and announce_start(client, hooks, dsk)
        status = "failed"
        try:
            graph = cluster_graph(dsk, hooks.run_id, getattr(hooks, "pipeline", None) or "flowyml")
            futures = client.get(graph, list(keys), sync=False)
            try:
                _wait_with_workers(client, futures, self.no_workers_timeout, self._replace_lost_workers)
                values = client.gather(futures)
            finally:
                for future in futures:
                    future.release()
            run.wait_for(reporting_tasks(dsk))  # the last batches of events may be in flight
            status = "succeeded"
            return values
        except BaseException as exc:
            if not isinstance(exc, Exception):  # interrupted: the run did not fail, it was stopped
                status = "stopped"
                raise
            run.settle()  # the failed run's report: tasks that finished just before still report
            if type(exc).__name__ == "KilledWorker":
                error = _worker_died(exc, run.suffix)
                raise error from error.__cause__
            raise
        finally:
            run.finish()
            if announced:
                announce_end(client, hooks.run_id, status)
            if window is not None:
                window.save(hooks)


@contextmanager
def _no_finalizers_while_starting() -> Iterator[None]:
    """Start a Client or LocalCluster with no garbage collection pass in the middle.

    Dask's ``LoopRunner`` holds one lock, shared by every client, while it
    starts a client's event loop. If the collector runs then (any allocation
    may start a pass) and finalizes a Client nobody closed (one whose connection
    failed, or one a notebook dropped), that Client's ``__del__`` stops its own
    loop and waits for the same lock, held by its own thread: the start never
    ends (seen in CI, distributed 2026.8). So pending garbage is collected
    first, before the lock is taken, and the collector waits until the start is
    over.
    """
    gc.collect()
    with no_gc_passes():
        yield


def _with_dashboard_preload() -> dict[str, Any]:
    """The scheduler's preloads (``distributed.scheduler.preload``) and the flowyml page's.

    So the ``/flowyml`` page is on the dashboard of flowyml's own cluster (see
    :mod:`flowyml.dashboard`); the user's own preloads keep their arguments.
    """
    import dask

    preload = dask.config.get("distributed.scheduler.preload", None) or []
    preload = [preload] if isinstance(preload, str) else list(preload)
    argv = dask.config.get("distributed.scheduler.preload-argv", None) or []
    if "flowyml.dashboard" in preload:
        return {}
    if argv and not isinstance(argv[0], str):  # one list of arguments per preload
        return {"preload": [*preload, "flowyml.dashboard"], "preload_argv": [*argv, []]}
    return {"preload": [*preload, "flowyml.dashboard"], "preload_argv": argv}


def _no_workers_timeout(given: float | str | None) -> float:
    """Seconds from the argument, else ``FLOWYML_NO_WORKERS_TIMEOUT``, else the default; ``inf`` waits forever."""
    source, value = "no_workers_timeout", given
    if value is None:
        source, value = "FLOWYML_NO_WORKERS_TIMEOUT", os.environ.get("FLOWYML_NO_WORKERS_TIMEOUT") or None
    if value is None:
        return NO_WORKERS_TIMEOUT
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        seconds = -1.0
    if not seconds > 0:  # also NaN
        raise OptionError(f"{source} must be a positive number of seconds (or inf), got {value!r}")
    return seconds


def _wait_with_workers(client: Any, futures: list[Any], timeout: float, check: Callable[[], None]) -> None:
    """Wait until ``futures`` are done (or one failed); fail after ``timeout`` s with no worker.

    Dask's scheduler keeps a graph waiting for workers forever (unless its own
    ``distributed.scheduler.no-workers-timeout`` is set, which flowyml cannot
    set on a cluster it did not start). So the run asks the scheduler, between
    short waits, whether any worker is connected, and gives up once none has
    been for ``timeout`` seconds. ``check`` runs between the waits (it replaces
    the lost workers of flowyml's own cluster).
    """
    done = threading.Event()
    lock = threading.Lock()
    pending = [len(futures)]

    def finished(future: Any) -> None:  # in the client's thread; a failure ends the wait at once
        with lock:
            pending[0] -= 1
            if not pending[0] or future.status != "finished":
                done.set()

    for future in futures:
        future.add_done_callback(finished)
    interval = min(WORKERS_CHECK_INTERVAL, timeout / 4)
    alone_since: float | None = None
    while not done.wait(interval):
        check()
        if client.nthreads():
            alone_since = None
            continue
        now = time.monotonic()
        if alone_since is None:
            alone_since = now
            log.warning("no Dask worker is connected to the scheduler at %s; the run fails if none "
                        "joins within %g s (FLOWYML_NO_WORKERS_TIMEOUT)", client.scheduler.address, timeout)
        elif now - alone_since >= timeout:
            raise BackendError(
                f"no Dask worker was connected to the scheduler at {client.scheduler.address} for "
                f"{now - alone_since:.0f} s, so the run stopped waiting (no_workers_timeout="
                f"{timeout:g} s, FLOWYML_NO_WORKERS_TIMEOUT). Start workers (`dask worker "
                f"{client.scheduler.address}`), look in the workers' logs for why they stopped "
                f"(killed, out of memory), or give them longer with a larger no_workers_timeout"
            )


def _worker_died(exc: Exception, suffix: str) -> StepFailed:
    """A task whose workers kept dying, as the step failure it is."""
    step, partition = _step_of(getattr(exc, "task", None), suffix)
    tries = getattr(exc, "allowed_failures", 0) + 1
    last = getattr(getattr(exc, "last_worker", None), "address", "?")
    cause = WorkerDiedError(
        f"{tries} workers died while running it, the last {last} (killed, out of memory or a "
        f"crash; see that worker's log). Dask gives up after "
        f"distributed.scheduler.allowed-failures + 1 = {tries} deaths"
    )
    cause.__cause__ = exc
    error = StepFailed(step, partition, tries, f"WorkerDiedError: {cause}")
    error.__cause__ = cause
    return error


class _PerformanceWindow:
    """Dask's ``performance_report`` for one run, without a default client.

    ``distributed.performance_report`` finds its client with ``get_client()``,
    which needs a default client; this asks our client's scheduler directly.
    """

    def __init__(self, client: Any, template: str | os.PathLike[str]) -> None:
        self.client = client
        self.template = template
        self.start = time.time()
        self.last_count = client.run_on_scheduler(_monitor_count)
        client.get_task_stream(start=0, stop=0)  # installs the task-stream plugin

    def save(self, hooks: RunHooks) -> None:
        path = Path(str(self.template).format(run_id=hooks.run_id))
        try:
            page = self.client.sync(
                self.client.scheduler.performance_report,
                start=self.start,
                last_count=self.last_count,
                code=f"flowyml run {hooks.run_id}",
                mode=None,
            )
            path.parent.mkdir(parents=True, exist_ok=True)
            temporary = path.with_name(f".{path.name}.{hooks.run_id}.tmp")
            temporary.write_text(page, encoding="utf-8")
            os.replace(temporary, path)
        except Exception as exc:  # the run's own result matters more than its report
            log.warning("could not write Dask's performance report to %s: %s", path, exc)
            return
        log.info("Dask performance report: %s", path)
        add_html = getattr(hooks, "add_report_html", None)
        if add_html is not None:
            uri = path.resolve().as_uri()
            add_html(
                "<h2>Dask performance report</h2><p>Dask's own report of this run (task stream, "
                f"worker profile, bandwidth): <a href=\"{html.escape(uri)}\">{html.escape(str(path))}"
                "</a></p>"
            )


def _monitor_count(dask_scheduler: Any) -> int:
    return dask_scheduler.monitor.count


def _worker_threads(client: Any) -> int | None:
    try:
        return sum(client.nthreads().values()) or None
    except Exception:  # a client still connecting
        return None
