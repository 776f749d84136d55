"""Whether a cluster's workers see this machine's disk, checked before a run writes to it.

On Kubernetes, a cloud Dask service or dask-jobqueue, workers have disks of
their own. A local sink path there would "succeed" with every partition left
on some worker's disk, a local cache would be written where no later run
looks, and a local source would fail on the first worker that opens it. So
before a run on a cluster flowyml did not start itself, the driver asks every
worker about each local path the run uses:

- a folder it will write (a sink's parent folder, the cache): the driver
  writes a probe file with a random name and content there, and each worker
  must read the same content back (a worker that has its own folder at the
  same path fails this too);
- a file it will read (a source's first file): each worker must see it with
  the size the driver planned.

A path any worker cannot see is a :class:`~flowyml.exceptions.BackendError`
that names it, what uses it and the workers, and suggests a URL. One round
trip to the workers per run; probes are removed at once.
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass

from flowyml.exceptions import BackendError
from flowyml.io.filesystem import display_path

__all__ = ["LocalPath", "Probe", "check_workers_see", "prepare", "remove", "seen"]

_PROBE_PREFIX = ".flowyml-probe-"


@dataclass(frozen=True)
class LocalPath:
    """A local path a run uses: ``kind`` is ``"folder"`` (written) or ``"file"`` (read).

    ``probe_in`` is the folder the probe file goes to, when not ``path`` itself
    (a sink's output may not exist yet: its parent does).
    """

    kind: str
    who: str  # "sink 'write_parquet'", "the cache", "source 'trips'"
    path: str
    size: int | None = None  # for a file: the size planned
    probe_in: str | None = None


@dataclass(frozen=True)
class Probe:
    """What a worker checks: a file that must exist with ``size`` bytes, or hold ``content``."""

    path: str
    size: int | None = None
    content: str | None = None


def prepare(paths: list[LocalPath]) -> list[Probe]:
    """Write a probe file in each folder (this runs on the driver); one probe per path."""
    probes = []
    for item in paths:
        if item.kind == "file":
            probes.append(Probe(item.path, size=item.size))
            continue
        folder = item.probe_in or item.path
        os.makedirs(folder, exist_ok=True)
        content = secrets.token_hex(16)
        probe = os.path.join(folder, f"{_PROBE_PREFIX}{content[:12]}")
        with open(probe, "w", encoding="ascii") as handle:
            handle.write(content)
        probes.append(Probe(probe, content=content))
    return probes


def seen(probes: list[Probe]) -> list[bool]:
    """Which probes this process sees as the driver left them (this runs on each worker)."""
    answers = []
    for probe in probes:
        try:
            if probe.content is not None:
                with open(probe.path, encoding="ascii") as handle:
                    answers.append(handle.read() == probe.content)
            else:
                answers.append(os.path.getsize(probe.path) == probe.size)
        except OSError:
            answers.append(False)
    return answers


def remove(probes: list[Probe]) -> None:
    for probe in probes:
        if probe.content is not None:
            try:
                os.remove(probe.path)
            except OSError:
                pass


def check_workers_see(client: object, paths: list[LocalPath]) -> None:
    """Raise unless every worker of ``client``'s cluster sees every path in ``paths``."""
    if not paths:
        return
    probes = prepare(paths)
    try:
        answers = client.run(seen, probes)  # type: ignore[attr-defined]
    finally:
        remove(probes)
    blind: dict[LocalPath, list[str]] = {}  # path -> the workers that do not see it
    for worker, seen_here in answers.items():
        for item, ok in zip(paths, seen_here):
            if not ok:
                blind.setdefault(item, []).append(worker)
    if not blind:
        return
    item, workers = next(iter(blind.items()))
    more = f" (and {len(blind) - 1} more local path(s))" if len(blind) > 1 else ""
    action = "write to" if item.kind == "folder" else "read"
    raise BackendError(
        f"{item.who}: {display_path(item.path)} is on this machine's disk, which {len(workers)} of the "
        f"cluster's {len(answers)} workers cannot see ({', '.join(sorted(workers)[:3])}"
        f"{'...' if len(workers) > 3 else ''}){more}: the run cannot {action} it there. Use a URL every "
        f"worker reaches (s3://bucket/..., gs://bucket/..., abfs://container/...), or a folder mounted "
        f"at the same path on every worker."
    )
