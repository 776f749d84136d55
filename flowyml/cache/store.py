"""The cache store: a directory of entries, written atomically and verified when read.

The directory is a local folder or an fsspec URL (``s3://bucket/cache``,
``gs://...``, with ``storage_options``): on clusters whose workers share no
disk, every worker writes the entries it computes there, and a rerun from any
machine finds them.

Layout
------
One file (or object) per entry, sharded by the first two characters of the key::

    <directory>/CACHEDIR.TAG            marks the directory as a cache for backup tools
    <directory>/ab/abcdef....entry      one entry
    <directory>/ab/abcdef....<pid>.<random>.tmp   a write in progress (or a killed one)

An entry is ``b"FLOWYMLC"``, a 4-byte big-endian header length, a UTF-8 JSON header
(``key``, ``format``, ``checksum`` = ``sha256:<hex>`` of the payload, ``size`` of the
payload, ``created``, ``type``, ``python``/``pandas``/``pyarrow`` versions), then the
payload. Data and metadata live in one file so that a single ``os.replace`` publishes
both: a reader never pairs new metadata with an old payload. ``store`` writes a
uniquely named ``.tmp`` file in the shard directory, fsyncs it, then ``os.replace``\\ s
it over the entry, so concurrent writers of one key never corrupt it (the last one
wins) and a reader sees the old entry or the new one, whole. ``.tmp`` leftovers of
killed writers are ignored by every reader and removed by ``clear``. ``load``
re-checks the size, the checksum and the key recorded in the header.

On an object store an entry is one object written by one upload, which
appears whole when it completes: no temporary object is needed. Planning a
run lists the shards it needs (one request per shard, not per task) and
trusts nothing more; every entry is checked in full as it loads, and a bad one
is discarded and recomputed.

What an entry's payload holds is :mod:`flowyml.cache.serialization`'s business.

.. warning::
   Loading a pickle runs code chosen by whoever wrote it. Never point flowyml at a
   cache directory that people you do not trust can write to.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import pathlib
import platform
import re
import secrets
import struct
from collections.abc import Iterable, Iterator
from typing import Any, cast

import pandas as pd
import pyarrow

from flowyml.cache.fingerprint import type_name
from flowyml.cache.serialization import FORMATS, deserialize, serialize
from flowyml.exceptions import CacheError
from flowyml.io.filesystem import filesystem_for, is_url, redact_url, storage_error

__all__ = ["CACHE_DIR_ENV", "Cache", "default_cache_dir", "open_cache"]

#: Environment variable naming the cache directory when none is given explicitly.
CACHE_DIR_ENV = "FLOWYML_CACHE_DIR"

_MAGIC = b"FLOWYMLC"
_HEADER_LENGTH = struct.Struct(">I")
_ENTRY_FORMAT_VERSION = 1
_ENTRY_SUFFIX = ".entry"
_TMP_SUFFIX = ".tmp"
# Keys become file names: refuse anything that could escape the shard directory.
_KEY_PATTERN = re.compile(r"[0-9A-Za-z_-]{4,200}")
_CACHEDIR_TAG = (
    "Signature: 8a477f597d28d172789f06886806bc55\n"
    "# This file marks a flowyml task cache; backup tools may skip this directory.\n"
)


def default_cache_dir(explicit: str | os.PathLike[str] | None = None) -> pathlib.Path | str | None:
    """The cache directory to use: ``explicit``, else ``$FLOWYML_CACHE_DIR``, else None.

    ``~`` is expanded in local paths; URLs (``s3://...``) are returned as they
    are; nothing is created.

    Examples
    --------
    >>> default_cache_dir("~/cache") == pathlib.Path.home() / "cache"
    True
    >>> default_cache_dir("s3://bucket/cache")
    's3://bucket/cache'
    """
    if explicit is not None:
        text = os.fspath(explicit)
    else:
        text = os.environ.get(CACHE_DIR_ENV, "").strip()
        if not text:
            return None
    return text if is_url(text) else pathlib.Path(text).expanduser()


def open_cache(cache_dir: str | os.PathLike[str] | None,
               storage_options: dict[str, Any] | None = None) -> Cache | None:
    """The pipeline's cache: ``cache_dir``, else ``FLOWYML_CACHE_DIR``, else None (no caching)."""
    directory = default_cache_dir(cache_dir)
    return Cache(directory, storage_options) if directory is not None else None


class Cache:
    """A directory of cache entries, shared safely by processes on one filesystem or object store.

    Parameters
    ----------
    directory : str or os.PathLike
        A local folder, created (with parents) if missing and stored as an
        absolute path, so a pickled ``Cache`` means the same folder in a worker
        process; or an fsspec URL (``s3://bucket/cache``) that every worker
        reaches.
    storage_options : dict, optional
        For a URL's filesystem (credentials, endpoint), as in pandas. Travels
        to the workers with the cache; never shown.

    Examples
    --------
    >>> import tempfile
    >>> cache = Cache(tempfile.mkdtemp())
    >>> from flowyml.cache import task_key
    >>> key = task_key("f" * 64, {"n": 1}, [])
    >>> cache.contains(key)
    False
    >>> cache.store(key, {"answer": 42})
    >>> cache.contains(key), cache.load(key)
    (True, {'answer': 42})
    >>> cache.clear()
    1
    """

    def __init__(self, directory: str | os.PathLike[str],
                 storage_options: dict[str, Any] | None = None) -> None:
        text = os.fspath(directory)
        self.storage_options = storage_options
        self.fs: Any = None
        if is_url(text):
            self.fs, root = filesystem_for(text, storage_options, who="the cache")
            self._root = root.rstrip("/")
            self.directory: pathlib.Path | str = self.fs.unstrip_protocol(self._root)
            self._tag_directory()
            return
        expanded = pathlib.Path(text).expanduser()
        self.directory = pathlib.Path(os.path.abspath(expanded))
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError) as exc:
            raise CacheError(
                f"cache directory {str(self.directory)!r} exists but is not a directory; "
                f"choose another cache_dir"
            ) from exc
        except OSError as exc:
            raise CacheError(
                f"cannot create cache directory {str(self.directory)!r}: {exc}"
            ) from exc
        self._tag_directory()

    @property
    def local(self) -> bool:
        """The cache is a folder of this machine (else a URL)."""
        return self.fs is None

    @property
    def shown(self) -> str:
        """The cache's place as messages show it (without secrets)."""
        return str(self.directory) if self.local else redact_url(str(self.directory))

    def __repr__(self) -> str:
        return f"Cache({self.shown!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Cache) and other.directory == self.directory

    def __hash__(self) -> int:
        return hash(self.directory)

    def __reduce__(self) -> tuple:
        # Sent to workers: only the directory (and how to reach it) travels.
        return (Cache, (str(self.directory), self.storage_options))

    # -- paths

    def entry_path(self, key: str) -> Any:
        """The file (a ``Path``) or object (its path on the filesystem) that holds the entry for ``key``."""
        _check_key(key)
        if self.local:
            return cast(pathlib.Path, self.directory) / key[:2] / f"{key}{_ENTRY_SUFFIX}"
        return f"{self._root}/{key[:2]}/{key}{_ENTRY_SUFFIX}"

    def _tag_directory(self) -> None:
        if not self.local:
            # Also the first touch of the bucket: a missing one or denied access
            # fails here, naming the cache, before any task runs.
            tag = f"{self._root}/CACHEDIR.TAG"
            try:
                if not self.fs.exists(tag):
                    self.fs.pipe_file(tag, _CACHEDIR_TAG.encode("ascii"))
            except OSError as exc:
                raise storage_error(exc, "the cache", str(self.directory)) from exc
            return
        local_tag = cast(pathlib.Path, self.directory) / "CACHEDIR.TAG"
        if local_tag.exists():
            return
        try:
            with open(local_tag, "x", encoding="ascii") as handle:
                handle.write(_CACHEDIR_TAG)
        except OSError:
            pass  # another process wrote it, or a read-only cache: not needed to work

    # -- queries

    def contains(self, key: str) -> bool:
        """True if a complete entry for ``key`` exists (one ``stat``; not verified)."""
        if self.local:
            return self.entry_path(key).is_file()
        return bool(self.present([key]))

    def present(self, keys: Iterable[str]) -> set[str]:
        """Which of ``keys`` have an entry: locally a ``stat`` each; on an object store one
        listing per shard the keys fall in, however many keys."""
        keys = list(keys)
        if self.local:
            return {key for key in keys if self.entry_path(key).is_file()}
        for key in keys:
            _check_key(key)
        found: set[str] = set()
        for shard in sorted({key[:2] for key in keys}):
            try:
                names = self.fs.ls(f"{self._root}/{shard}", detail=False, refresh=True)
            except FileNotFoundError:
                continue
            except OSError as exc:
                raise CacheError(f"cannot list the cache {self.shown}: {exc}") from exc
            found.update(name.rsplit("/", 1)[-1][: -len(_ENTRY_SUFFIX)] for name in names
                         if name.endswith(_ENTRY_SUFFIX))
        return found.intersection(keys)

    def load(self, key: str) -> Any:
        """The value stored under ``key``, after checking size, checksum and key.

        Raises
        ------
        CacheError
            Missing, truncated, corrupt or unreadable entry. The caller recomputes
            (and its ``store`` replaces the bad entry).
        """
        path, header, payload = self._read(key)
        try:
            return deserialize(header["format"], payload)
        except Exception as exc:
            raise CacheError(
                f"cache entry {self._shown_path(path)} ({header['format']}, a {header.get('type', '?')}) "
                f"cannot be decoded: {type(exc).__name__}: {exc}; it will be recomputed"
            ) from exc

    def check_header(self, key: str) -> dict[str, Any]:
        """The entry's header, after a cheap check: magic, header, key and total size.

        Reads the header only (a few hundred bytes) and compares the file's size
        with the one the header records, which catches truncated and garbled
        entries without reading the payload; :meth:`load` still verifies the
        checksum. On an object store the whole entry is checked instead (as
        :meth:`verify`). Raises :class:`CacheError` as ``load`` does.
        """
        if not self.local:
            return self.verify(key)
        path = self.entry_path(key)
        prefix = len(_MAGIC) + _HEADER_LENGTH.size
        try:
            with open(path, "rb") as handle:
                head = handle.read(prefix)
                if len(head) < prefix or not head.startswith(_MAGIC):
                    raise CacheError(f"cache entry {path} is not a flowyml cache entry (bad or missing header)")
                (header_length,) = _HEADER_LENGTH.unpack_from(head, len(_MAGIC))
                header_bytes = handle.read(min(header_length, 1 << 16))
                size = os.fstat(handle.fileno()).st_size
        except FileNotFoundError:
            raise CacheError(f"no cache entry for key {key} in {self.directory}") from None
        except OSError as exc:
            raise CacheError(f"cache entry {path} cannot be read: {exc}") from exc
        try:
            header = json.loads(header_bytes.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            raise CacheError(f"cache entry {path} has a garbled or truncated header: {exc}") from exc
        if not isinstance(header, dict) or header.get("key") != key or not isinstance(header.get("size"), int):
            raise CacheError(f"cache entry {path} has an unexpected header: {header!r:.200}")
        if size != prefix + header_length + header["size"]:
            raise CacheError(f"cache entry {path} is truncated or padded: {size} bytes, its header "
                             f"says {prefix + header_length + header['size']}")
        return header

    def verify(self, key: str) -> dict[str, Any]:
        """Check the whole entry (size, checksum, key) without decoding it; its header.

        Raises :class:`CacheError` as :meth:`load` does.
        """
        return self._read(key)[1]

    def _read(self, key: str) -> tuple[Any, dict[str, Any], memoryview]:
        """The entry's path, checked header and payload; CacheError when missing or damaged."""
        path = self.entry_path(key)
        try:
            data = path.read_bytes() if self.local else self.fs.cat_file(path)
        except FileNotFoundError:
            raise CacheError(f"no cache entry for key {key} in {self.shown}") from None
        except OSError as exc:
            raise CacheError(f"cache entry {self._shown_path(path)} cannot be read: {exc}") from exc
        header, payload = _parse_entry(data, self._shown_path(path), key)
        return path, header, payload

    def _shown_path(self, path: Any) -> Any:
        return path if self.local else redact_url(self.fs.unstrip_protocol(path))

    # -- updates

    def store(self, key: str, value: Any) -> None:
        """Write ``value`` under ``key`` atomically (temp file, fsync, ``os.replace``; one upload
        on an object store).

        Raises
        ------
        CacheError
            The value cannot be serialized (the message names its type), or the
            file cannot be written. The caller runs on without caching it.
        """
        final = self.entry_path(key)
        fmt, payload = serialize(value)
        header = {
            "flowyml_cache": _ENTRY_FORMAT_VERSION,
            "key": key,
            "format": fmt,
            "type": type_name(value),
            "size": len(payload),
            "checksum": "sha256:" + hashlib.sha256(payload).hexdigest(),
            "created": _dt.datetime.now(_dt.UTC).isoformat(),
            "python": platform.python_version(),
            "pandas": pd.__version__,
            "pyarrow": pyarrow.__version__,
        }
        header_bytes = json.dumps(header, sort_keys=True).encode("utf-8")
        parts = (_MAGIC, _HEADER_LENGTH.pack(len(header_bytes)), header_bytes, payload)
        try:
            if self.local:
                _write_atomically(final, parts)
            else:
                self.fs.pipe_file(final, b"".join(parts))
        except OSError as exc:
            raise CacheError(f"cannot write cache entry {self._shown_path(final)}: {exc}") from exc

    def discard(self, key: str) -> None:
        """Remove the entry for ``key``, if any."""
        try:
            if self.local:
                self.entry_path(key).unlink()
            else:
                self.fs.rm_file(self.entry_path(key))
        except FileNotFoundError:
            pass

    def info(self) -> dict[str, Any]:
        """Summary: ``directory``, ``entries``, ``total_bytes``, ``oldest``/``newest``
        (UTC datetimes of the entries' writes, None when empty) and
        ``temporary_files`` (writes in progress or left by killed writers)."""
        entries = total = temporary = 0
        times: list[float] = []
        for size, modified in self._entries(_ENTRY_SUFFIX):
            entries += 1
            total += size
            if modified is not None:
                times.append(modified)
        for _ in self._entries(_TMP_SUFFIX):
            temporary += 1

        def as_datetime(stamp: float | None) -> _dt.datetime | None:
            return None if stamp is None else _dt.datetime.fromtimestamp(stamp, _dt.UTC)

        return {
            "directory": self.shown,
            "entries": entries,
            "total_bytes": total,
            "oldest": as_datetime(min(times, default=None)),
            "newest": as_datetime(max(times, default=None)),
            "temporary_files": temporary,
        }

    def clear(self) -> int:
        """Remove every entry and ``.tmp`` leftover; return the number of entries removed.

        Only files this class writes are touched. A ``store`` running concurrently
        may then fail with ``CacheError`` (its temp file is gone); nothing is corrupted.
        """
        if not self.local:
            paths = [path for path in self._remote_files() if _is_entry_name(path.rsplit("/", 1)[-1])]
            if paths:
                self.fs.rm(paths)
            return sum(path.endswith(_ENTRY_SUFFIX) for path in paths)
        removed = 0
        for suffix in (_ENTRY_SUFFIX, _TMP_SUFFIX):
            for path in self._files(suffix):
                try:
                    path.unlink()
                except FileNotFoundError:
                    continue
                removed += suffix == _ENTRY_SUFFIX
        for shard in self._shards():
            try:
                shard.rmdir()  # only succeeds when empty
            except OSError:
                pass
        return removed

    def _entries(self, suffix: str) -> Iterator[tuple[int, float | None]]:
        """``(size, modified)`` of each file with ``suffix``."""
        if not self.local:
            for path, info in self._remote_files(detail=True).items():
                name = path.rsplit("/", 1)[-1]
                if name.endswith(suffix) and _is_entry_name(name):
                    modified = info.get("LastModified") or info.get("mtime") or info.get("created")
                    stamp = modified.timestamp() if hasattr(modified, "timestamp") else modified
                    yield int(info.get("size") or 0), stamp
            return
        for path in self._files(suffix):
            try:
                stat = path.stat()
            except FileNotFoundError:
                continue  # discarded meanwhile
            yield stat.st_size, stat.st_mtime

    def _remote_files(self, detail: bool = False) -> Any:
        try:
            return self.fs.find(self._root, detail=detail)
        except FileNotFoundError:
            return {} if detail else []

    def _shards(self) -> list[pathlib.Path]:
        try:
            children = list(cast(pathlib.Path, self.directory).iterdir())
        except FileNotFoundError:
            return []
        return [child for child in children if len(child.name) == 2 and child.is_dir()]

    def _files(self, suffix: str) -> list[pathlib.Path]:
        found: list[pathlib.Path] = []
        for shard in self._shards():
            try:
                names = os.listdir(shard)
            except FileNotFoundError:
                continue
            found.extend(shard / name for name in names
                         if name.endswith(suffix) and _KEY_PATTERN.fullmatch(name.split(".", 1)[0]))
        return found


def _is_entry_name(name: str) -> bool:
    return name.endswith((_ENTRY_SUFFIX, _TMP_SUFFIX)) and bool(_KEY_PATTERN.fullmatch(name.split(".", 1)[0]))


def _check_key(key: str) -> None:
    if not isinstance(key, str) or not _KEY_PATTERN.fullmatch(key):
        raise CacheError(
            f"invalid cache key {key!r}: expected 4-200 letters, digits, '_' or '-' "
            f"(as returned by task_key)"
        )


def _write_atomically(final: pathlib.Path, parts: tuple[bytes | memoryview, ...]) -> None:
    final.parent.mkdir(exist_ok=True)
    # A unique temp name per writer: concurrent writers never share a temp file.
    key = final.name[: -len(_ENTRY_SUFFIX)]
    tmp = final.with_name(f"{key}.{os.getpid()}.{secrets.token_hex(4)}{_TMP_SUFFIX}")
    try:
        with open(tmp, "xb") as handle:
            for part in parts:
                handle.write(part)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, final)
    except BaseException:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise
    _fsync_directory(final.parent)


def _fsync_directory(directory: pathlib.Path) -> None:
    # Makes the rename itself durable; not possible on every platform, never required.
    try:
        descriptor = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def _parse_entry(data: bytes, path: Any, key: str) -> tuple[dict[str, Any], memoryview]:
    """Split and verify an entry file; CacheError for anything unexpected."""
    prefix = len(_MAGIC) + _HEADER_LENGTH.size
    if len(data) < prefix or not data.startswith(_MAGIC):
        raise CacheError(f"cache entry {path} is not a flowyml cache entry (bad or missing header)")
    (header_length,) = _HEADER_LENGTH.unpack_from(data, len(_MAGIC))
    if prefix + header_length > len(data):
        raise CacheError(f"cache entry {path} is truncated inside its header")
    try:
        header = json.loads(data[prefix: prefix + header_length].decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise CacheError(f"cache entry {path} has a garbled header: {exc}") from exc
    required = {"flowyml_cache": int, "key": str, "format": str, "size": int, "checksum": str}
    if not isinstance(header, dict) or any(
        not isinstance(header.get(field), kind) for field, kind in required.items()
    ):
        raise CacheError(f"cache entry {path} has an incomplete header: {header!r:.200}")
    if header["flowyml_cache"] != _ENTRY_FORMAT_VERSION:
        raise CacheError(f"cache entry {path} has entry format {header['flowyml_cache']}, "
                         f"this flowyml reads {_ENTRY_FORMAT_VERSION}")
    if header["key"] != key:
        raise CacheError(f"cache entry {path} belongs to key {header['key']!r}, not {key!r}")
    if header["format"] not in FORMATS:
        raise CacheError(f"cache entry {path} has unknown format {header['format']!r}")
    payload = memoryview(data)[prefix + header_length:]
    if len(payload) != header["size"]:
        raise CacheError(f"cache entry {path} is truncated or padded: payload of "
                         f"{len(payload)} bytes, header says {header['size']}")
    algorithm, _, expected = header["checksum"].partition(":")
    if algorithm != "sha256" or hashlib.sha256(payload).hexdigest() != expected:
        raise CacheError(f"cache entry {path} is corrupt: checksum mismatch")
    if header["format"] == "pickle":
        _check_pickle_versions(header, path)
    return header, payload


def _check_pickle_versions(header: dict[str, Any], path: Any) -> None:
    # Unpickling across minor versions can "work" and yield subtly broken objects.
    for name, current in (("python", platform.python_version()), ("pandas", pd.__version__)):
        written = str(header.get(name, ""))
        if written.split(".")[:2] != current.split(".")[:2]:
            raise CacheError(f"cache entry {path} was pickled under {name} {written or '?'}, "
                             f"this is {current}; it will be recomputed")
