"""Sink commits on object stores (S3, GCS, Azure, ``memory://``), which have no atomic rename.

A local sink swaps a staging folder into place with one rename. An object
store renames by copying, object by object, so flowyml commits there with
what such stores do offer: each object appears whole when its upload
completes, and a create-only write (S3's ``If-None-Match: *``, GCS's
``ifGenerationMatch=0``, Azure's ``If-None-Match``; fsspec's ``"xb"`` mode)
fails for everyone but the first writer.

Layout under the output prefix ``<out>/``::

    <out>/part-00000.parquet ...                         the committed output
    <out>/_flowyml/manifest.json                         what the last commit published
    <out>/_flowyml/commit.json                           only while a commit publishes (created with "xb")
    <out>/_flowyml/staging/<run>/owner.json              who stages there: host, process, start time
    <out>/_flowyml/staging/<run>/part-00000.parquet.staged   a partition, written whole by its worker

Readers of the folder skip ``_flowyml/``: pyarrow, pandas, Spark, Hive and
Athena skip folders starting with ``_``, and Dask, which lists every file
below the folder and keeps those ending in ``.parquet``, skips staged files
by their ``.staged`` suffix. Nothing else flowyml writes there ends in a data
suffix.

The protocol (:func:`commit`), run once every partition is staged:

1. List the staging prefix; every partition must be there, else nothing happens.
2. Create ``commit.json`` with a create-only write. It records the writer
   (host, process, start), the staged files and the old files to remove. If
   it exists, another commit is publishing: this one fails with
   :class:`~flowyml.exceptions.CommitConflictError` and the output is that
   other run's. If its writer is dead (same host, process gone; or another
   host and older than :data:`COMMIT_LEASE_S`), its commit is first rolled
   forward from the record (its staged files are still there), then this
   one is tried once more.
3. Publish: copy every staged file to its final name (server-side copies, in
   parallel), then remove the old files the new output does not have.
4. Write ``manifest.json``, remove the staging prefix, remove ``commit.json``.

Staged names may lie in folders (Hive outputs, ``year=2024/part-00000.parquet``).
With ``replace=`` (``mode="overwrite_partitions"``), step 3 removes only the
old files below the replaced folders; the others stay untouched and the
manifest lists them with the new files.

What a reader listing the folder sees: before step 3, the old output; after
it, exactly the new one. During step 3 (a burst of parallel server-side
copies, then one batched delete) it may see some files already new and some
still old: no object store can switch many objects at once for a reader that
lists them. Readers that must never see that window read a table format
(``write_delta``) or wait while ``_flowyml/commit.json`` exists. Two runs
never mix: the second to create ``commit.json`` fails before it copies
anything. A run that fails or is killed before step 2 never touches the
output; its staging is removed by the next commit (or abort) to that output
once its owner is known dead (same host: its process is gone; another host:
:data:`STALE_AFTER_S`).
"""

from __future__ import annotations

import json
import os
import re
import socket
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from flowyml.exceptions import CommitConflictError, DataError, StorageError

__all__ = [
    "COMMIT_LEASE_S",
    "STALE_AFTER_S",
    "Owner",
    "abort",
    "commit",
    "control_prefix",
    "remove_stale",
    "stage_path",
    "staging_prefix",
    "write_owner",
]

#: Folder, under the output, of everything flowyml keeps there besides the output.
CONTROL = "_flowyml"
#: Suffix of staged partition files: no reader takes them for data.
STAGED_SUFFIX = ".staged"
#: A commit record written on another host counts as dead after this long.
COMMIT_LEASE_S = 3600.0
#: Staging owned by a run on another host counts as dead after this long.
STALE_AFTER_S = 24 * 3600.0


@dataclass(frozen=True)
class Owner:
    """Who writes: a process on a host, told apart from a later process with the same pid."""

    host: str
    pid: int
    pid_started: float
    started_at: float

    @classmethod
    def me(cls) -> Owner:
        import psutil

        return cls(socket.gethostname(), os.getpid(), psutil.Process().create_time(), time.time())

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> Owner | None:
        try:
            return cls(str(record["host"]), int(record["pid"]), float(record["pid_started"]),
                       float(record["started_at"]))
        except (KeyError, TypeError, ValueError):
            return None

    def is_dead(self, lease: float) -> bool:
        """True when this owner can no longer write: its process is gone, or (another host) its lease ran out."""
        if self.host != socket.gethostname():
            return time.time() - self.started_at > lease
        import psutil

        try:
            return abs(psutil.Process(self.pid).create_time() - self.pid_started) > 1.0
        except psutil.NoSuchProcess:
            return True
        except psutil.Error:  # another user's process: it exists
            return False

    def describe(self) -> str:
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.started_at))
        return f"process {self.pid} on {self.host}, since {since}"


#: fsspec filesystems whose ``"xb"`` mode only became a create-only write in this release;
#: before it, a second commit would silently overwrite the first's claim.
EXCLUSIVE_WRITES_SINCE = {"s3fs": (2025, 7, 0)}


def check_exclusive_writes(fs: Any, who: str) -> None:
    """Raise unless ``fs`` makes ``"xb"`` writes create-only (a commit's claim depends on it)."""
    package = type(fs).__module__.split(".", 1)[0]
    minimum = EXCLUSIVE_WRITES_SINCE.get(package)
    if minimum is None:
        return
    installed = _installed_version(package)
    if installed is not None and installed < minimum:
        wanted = ".".join(map(str, minimum))
        raise StorageError(
            f"{who}: committing to an object store needs create-only writes, which {package} makes "
            f"from {wanted} on; this is {package} {'.'.join(map(str, installed))}. "
            f'pip install "{package}>={wanted}"'
        )


def _installed_version(package: str) -> tuple[int, ...] | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        numbers = re.findall(r"\d+", version(package))
    except PackageNotFoundError:
        return None
    return tuple(int(number) for number in numbers[:3])


def control_prefix(target: str) -> str:
    return f"{target}/{CONTROL}"


def staging_prefix(target: str, run_id: str) -> str:
    return f"{target}/{CONTROL}/staging/{run_id}"


def stage_path(target: str, run_id: str, name: str) -> str:
    """Where a run stages the file that will be ``<target>/<name>``."""
    return f"{staging_prefix(target, run_id)}/{name}{STAGED_SUFFIX}"


def write_owner(fs: Any, target: str, run_id: str) -> None:
    """Record that this process (the run's driver) owns the run's staging; called as the run starts."""
    fs.pipe_file(f"{staging_prefix(target, run_id)}/owner.json", _json(asdict(Owner.me())))


def commit(fs: Any, target: str, run_id: str, names: Sequence[str], *,
           replace: Sequence[str] | None = None) -> list[str]:
    """Publish the run's staged ``names`` as the output at ``target``; the committed paths.

    ``names`` may lie in folders (``year=2024/part-00000.parquet``). With
    ``replace`` (folders, for ``mode="overwrite_partitions"``), only the old
    files below those folders are removed, every other old file stays, and the
    manifest lists the whole output; without it, the new files are the whole
    output.

    Raises
    ------
    DataError
        A partition file was not staged; the output is untouched.
    CommitConflictError
        Another run is committing to ``target``; the output is that run's.
    """
    staging = staging_prefix(target, run_id)
    if any("/" in name for name in names):
        staged = set(_relative(staging, _find(fs, staging)))
    else:
        # One listing, which also tells the filesystem each staged file's size: the
        # copies then need no request of their own to ask it.
        staged = {path.rsplit("/", 1)[-1] for path in _listing(fs, staging)}
    missing = sorted(name for name in names if name + STAGED_SUFFIX not in staged)
    if missing:
        raise DataError(
            f"cannot commit {fs.unstrip_protocol(target)}: {len(missing)} partition file(s) were not written "
            f"({', '.join(missing[:5])}{'...' if len(missing) > 5 else ''}); the previous output is untouched"
        )
    remove_stale(fs, target, keep=run_id)
    old = set(_output_files(fs, target)) - set(names)
    kept: list[str] = []
    if replace is not None:
        folders = tuple(folder.rstrip("/") + "/" for folder in replace)
        kept = sorted(name for name in old if not name.startswith(folders))
        old -= set(kept)
    record = {
        "run_id": run_id,
        "owner": asdict(Owner.me()),
        "staging": staging,
        "files": sorted(names),
        "remove": sorted(old),
        "kept": kept,
    }
    _create_record(fs, target, record)
    _publish(fs, target, record)
    return [f"{target}/{name}" for name in sorted(names)]


def abort(fs: Any, target: str, run_id: str) -> None:
    """Remove a run's staging; the output is untouched."""
    _remove_prefix(fs, staging_prefix(target, run_id))


def remove_stale(fs: Any, target: str, keep: str | None = None) -> None:
    """Remove the staging of dead runs, and roll forward a commit whose writer died."""
    record = _read_json(fs, f"{control_prefix(target)}/commit.json")
    if record is not None and _owner_dead(record.get("owner"), COMMIT_LEASE_S):
        _roll_forward(fs, target, record)
    root = f"{control_prefix(target)}/staging"
    for run in _children(fs, root):
        if run == keep:
            continue
        owner = _read_json(fs, f"{root}/{run}/owner.json")
        if owner is None:
            # No owner record (a run that died before writing it, or another
            # tool's leftovers): judged by the age of its newest file.
            dead = _newest_age(fs, f"{root}/{run}") > STALE_AFTER_S
        else:
            dead = _owner_dead(owner, STALE_AFTER_S)
        if dead:
            _remove_prefix(fs, f"{root}/{run}")


# -- the steps of a commit --------------------------------------------------------------


def _create_record(fs: Any, target: str, record: dict[str, Any]) -> None:
    path = f"{control_prefix(target)}/commit.json"
    for attempt in (1, 2):
        try:
            with fs.open(path, "xb") as handle:
                handle.write(_json(record))
            return
        except FileExistsError:
            other = _read_json(fs, path)
            if other is None:  # removed meanwhile: the other commit has just finished
                continue
            owner = Owner.from_record(other.get("owner") or {})
            if attempt == 1 and owner is not None and owner.is_dead(COMMIT_LEASE_S):
                _roll_forward(fs, target, other)
                continue
            who = owner.describe() if owner is not None else "an unknown writer"
            raise CommitConflictError(
                f"cannot commit {fs.unstrip_protocol(target)}: run {other.get('run_id')!r} ({who}) is "
                f"committing to it right now, so this run's output was not committed and the output "
                f"will be that run's. Run again once it has finished; if that run is dead, remove "
                f"{fs.unstrip_protocol(path)}"
            ) from None
    raise CommitConflictError(f"cannot commit {fs.unstrip_protocol(target)}: other runs keep committing to it")


def _publish(fs: Any, target: str, record: dict[str, Any]) -> None:
    """Steps 3 and 4: copy the staged files into place, remove old files, tidy up."""
    staging = record["staging"]
    names = list(record["files"])
    sources = [f"{staging}/{name}{STAGED_SUFFIX}" for name in names]
    if names:
        fs.copy(sources, [f"{target}/{name}" for name in names])
    removals = [f"{target}/{name}" for name in record["remove"]]
    if removals:
        _remove_files(fs, removals)
    files = sorted([*names, *record.get("kept", [])])  # kept: the partitions overwrite_partitions left
    manifest = {"run_id": record["run_id"], "committed_at": time.time(), "files": files}
    fs.pipe_file(f"{control_prefix(target)}/manifest.json", _json(manifest))
    _remove_prefix(fs, staging)
    _remove_files(fs, [f"{control_prefix(target)}/commit.json"])


def _roll_forward(fs: Any, target: str, record: dict[str, Any]) -> None:
    """Finish a commit whose writer died: its staged files are complete (it recorded them last)."""
    staging = record.get("staging", "")
    if not staging.startswith(f"{control_prefix(target)}/staging/"):
        raise DataError(f"{fs.unstrip_protocol(target)}: {CONTROL}/commit.json is not flowyml's; remove it")
    present = set(_relative(staging, _find(fs, staging)))
    files = list(record.get("files", []))
    if present and all(name + STAGED_SUFFIX in present for name in files):
        _publish(fs, target, record)  # it died before or while copying: finish its steps
    else:
        # It had published and was removing its staging (records are only
        # written once every partition is staged): only tidying up is left.
        _remove_prefix(fs, staging)
        _remove_files(fs, [f"{control_prefix(target)}/commit.json"])


# -- filesystem helpers -----------------------------------------------------------------


def _json(value: Any) -> bytes:
    return json.dumps(value, indent=1, sort_keys=True).encode()


def _read_json(fs: Any, path: str) -> dict[str, Any] | None:
    try:
        value = json.loads(fs.cat_file(path))
    except (FileNotFoundError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _owner_dead(record: Any, lease: float) -> bool:
    owner = Owner.from_record(record) if isinstance(record, dict) else None
    return owner is None or owner.is_dead(lease)


def _listing(fs: Any, prefix: str) -> list[str]:
    """The files directly under ``prefix``, listed afresh (and so known to the filesystem's cache)."""
    try:
        entries = fs.ls(prefix, detail=True, refresh=True)
    except FileNotFoundError:
        return []
    return [entry["name"] for entry in entries if entry.get("type") == "file"]


def _find(fs: Any, prefix: str) -> list[str]:
    try:
        return list(fs.find(prefix))
    except FileNotFoundError:
        return []


def _relative(prefix: str, paths: Iterable[str]) -> list[str]:
    root = prefix.rstrip("/") + "/"
    return [path[len(root):] for path in paths if path.startswith(root)]


def _children(fs: Any, prefix: str) -> list[str]:
    try:
        return [entry.rstrip("/").rsplit("/", 1)[-1] for entry in fs.ls(prefix, detail=False)]
    except FileNotFoundError:
        return []


def _output_files(fs: Any, target: str) -> list[str]:
    """The output's files, relative to ``target``, without flowyml's control folder."""
    root = target.rstrip("/") + "/"
    relative = (path[len(root):] for path in _find(fs, target) if path.startswith(root))
    return [path for path in relative if path.split("/", 1)[0] != CONTROL]


def _newest_age(fs: Any, prefix: str) -> float:
    newest = 0.0
    for path in _find(fs, prefix):
        try:
            newest = max(newest, fs.modified(path).timestamp())
        except (FileNotFoundError, NotImplementedError, AttributeError):
            continue
    return time.time() - newest if newest else float("inf")


def _remove_files(fs: Any, paths: Iterable[str]) -> None:
    paths = list(paths)
    if not paths:
        return
    try:
        fs.rm(paths)
    except FileNotFoundError:  # some were gone already (a roll-forward racing the writer): one by one
        for path in paths:
            try:
                fs.rm_file(path)
            except FileNotFoundError:
                pass


def _remove_prefix(fs: Any, prefix: str) -> None:
    fs.invalidate_cache(prefix)
    paths = _find(fs, prefix)
    if paths:
        _remove_files(fs, paths)
    if "memory" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)):
        try:  # a filesystem with real folders keeps an empty one (object stores have none)
            fs.rm(prefix, recursive=True)
        except (FileNotFoundError, OSError):
            pass
