"""The distributed backend: a ``distributed.Client`` on a cluster.

Three ways to get a client, in order: ``client=`` (used as is, never closed),
``address=`` or ``FLOWYML_SCHEDULER_ADDRESS`` (connect; the cluster is left
running), else a ``LocalCluster`` of ``max_workers`` single-threaded worker
processes on 127.0.0.1, closed with the executor. The client is never made
the process-wide default: a default client captures every other Dask
computation in the process (and switches ``dask.dataframe`` to p2p shuffles).

Keys carry a run token (``("clean-1a2b3c4d", 3)``) so concurrent runs on one
cluster never share keys; the dashboard strips it, showing step names.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

from ..exceptions import BackendError
from .base import Backend, RunHooks, register

__all__ = ["DistributedBackend", "EVENT_TOPIC"]

log = logging.getLogger("flowyml")

#: Workers report each finished task on this topic (see ``tasks.Outcome``).
EVENT_TOPIC = "flowyml-{run_id}"


@register
class DistributedBackend(Backend):
    """Runs the graph with ``client.get`` on a Dask cluster."""

    name = "distributed"
    pickles = True

    def __init__(
        self,
        max_workers: int | None = None,
        *,
        address: str | None = None,
        client: Any = None,
        security: Any = None,
    ) -> None:
        super().__init__(max_workers)
        self.address = address or os.environ.get("FLOWYML_SCHEDULER_ADDRESS") or None
        self.security = security
        self._given_client = client
        self._client = None
        self._cluster = None
        if client is not None:
            self.max_workers = max_workers or _worker_threads(client) or self.max_workers

    def open(self) -> None:
        if self._client is not None:
            return
        from distributed import Client, LocalCluster

        if self._given_client is not None:
            self._client = self._given_client
        elif self.address:
            try:
                self._client = Client(
                    self.address, security=self.security, set_as_default=False, timeout="30s"
                )
            except OSError as exc:
                raise BackendError(
                    f"cannot reach the Dask scheduler at {self.address!r}: {exc}. Check the "
                    f"address (FLOWYML_SCHEDULER_ADDRESS), that `dask scheduler` is running, "
                    f"and the TLS settings (security=...)"
                ) from exc
        else:
            self._cluster = LocalCluster(
                n_workers=self.max_workers,
                threads_per_worker=1,
                processes=True,
                host="127.0.0.1",
                dashboard_address="127.0.0.1:0",
                silence_logs=logging.WARNING,
            )
            self._client = Client(self._cluster, set_as_default=False)
        self.dashboard_link = self._client.dashboard_link
        log.info("Dask dashboard: %s", self.dashboard_link)

    def close(self) -> None:
        client, self._client = self._client, None
        cluster, self._cluster = self._cluster, None
        if client is not None and client is not self._given_client:
            client.close()
        if cluster is not None:
            cluster.close()

    @property
    def client(self) -> Any:
        return self._client

    def key_suffix(self, run_id: str) -> str:
        return f"-{run_id}"

    def execute(self, dsk: Mapping, keys: Sequence[Hashable], hooks: RunHooks) -> list[Any]:
        if self._client is None:
            self.open()
        from ..tasks import outcome_from_event

        topic = EVENT_TOPIC.format(run_id=hooks.run_id)
        try:
            return list(self._client.get(dict(dsk), list(keys), sync=True))
        finally:
            for _, message in self._client.get_events(topic):
                hooks.task_reported(outcome_from_event(message))


def _worker_threads(client: Any) -> int | None:
    try:
        return sum(client.nthreads().values()) or None
    except Exception:  # a client still connecting
        return None
