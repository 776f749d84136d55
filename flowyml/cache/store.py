"""The cache store: a directory of entries, written atomically and verified when read.

On-disk layout
--------------
One file per entry, sharded by the first two characters of the key::

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
from typing import Any

import pandas as pd
import pyarrow

from flowyml.cache.fingerprint import type_name
from flowyml.cache.serialization import FORMATS, deserialize, serialize
from flowyml.exceptions import CacheError

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


def default_cache_dir(explicit: str | os.PathLike[str] | None = None) -> pathlib.Path | None:
    """The cache directory to use: ``explicit``, else ``$FLOWYML_CACHE_DIR``, else None.

    ``~`` is expanded; nothing is created.

    Examples
    --------
    >>> default_cache_dir("~/cache") == pathlib.Path.home() / "cache"
    True
    """
    if explicit is not None:
        return pathlib.Path(os.fspath(explicit)).expanduser()
    from_env = os.environ.get(CACHE_DIR_ENV, "").strip()
    if from_env:
        return pathlib.Path(from_env).expanduser()
    return None


def open_cache(cache_dir: str | os.PathLike[str] | None) -> Cache | None:
    """The pipeline's cache: ``cache_dir``, else ``FLOWYML_CACHE_DIR``, else None (no caching)."""
    directory = default_cache_dir(cache_dir)
    return Cache(directory) if directory is not None else None


class Cache:
    """A directory of cache entries, shared safely by processes on one filesystem.

    Parameters
    ----------
    directory : str or os.PathLike
        Created (with parents) if missing. Stored as an absolute path, so a pickled
        ``Cache`` means the same directory in a worker process.

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

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        expanded = pathlib.Path(os.fspath(directory)).expanduser()
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

    def __repr__(self) -> str:
        return f"Cache({str(self.directory)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Cache) and other.directory == self.directory

    def __hash__(self) -> int:
        return hash(self.directory)

    def __reduce__(self) -> tuple:
        # Sent to workers: only the directory travels.
        return (Cache, (str(self.directory),))

    # -- paths

    def entry_path(self, key: str) -> pathlib.Path:
        """The file that holds (or would hold) the entry for ``key``."""
        _check_key(key)
        return self.directory / key[:2] / f"{key}{_ENTRY_SUFFIX}"

    def _tag_directory(self) -> None:
        tag = self.directory / "CACHEDIR.TAG"
        if tag.exists():
            return
        try:
            with open(tag, "x", encoding="ascii") as handle:
                handle.write(_CACHEDIR_TAG)
        except OSError:
            pass  # another process wrote it, or a read-only cache: not needed to work

    # -- queries

    def contains(self, key: str) -> bool:
        """True if a complete entry for ``key`` exists (one ``stat``; not verified)."""
        return self.entry_path(key).is_file()

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
                f"cache entry {path} ({header['format']}, a {header.get('type', '?')}) "
                f"cannot be decoded: {type(exc).__name__}: {exc}; it will be recomputed"
            ) from exc

    def check_header(self, key: str) -> dict[str, Any]:
        """The entry's header, after a cheap check: magic, header, key and total size.

        Reads the header only (a few hundred bytes) and compares the file's size
        with the one the header records, which catches truncated and garbled
        entries without reading the payload; :meth:`load` still verifies the
        checksum. Raises :class:`CacheError` as ``load`` does.
        """
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

    def _read(self, key: str) -> tuple[pathlib.Path, dict[str, Any], bytes]:
        """The entry's path, checked header and payload; CacheError when missing or damaged."""
        path = self.entry_path(key)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise CacheError(f"no cache entry for key {key} in {self.directory}") from None
        except OSError as exc:
            raise CacheError(f"cache entry {path} cannot be read: {exc}") from exc
        header, payload = _parse_entry(data, path, key)
        return path, header, payload

    # -- updates

    def store(self, key: str, value: Any) -> None:
        """Write ``value`` under ``key`` atomically (temp file, fsync, ``os.replace``).

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
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(),
            "python": platform.python_version(),
            "pandas": pd.__version__,
            "pyarrow": pyarrow.__version__,
        }
        header_bytes = json.dumps(header, sort_keys=True).encode("utf-8")
        parts = (_MAGIC, _HEADER_LENGTH.pack(len(header_bytes)), header_bytes, payload)
        try:
            _write_atomically(final, parts)
        except OSError as exc:
            raise CacheError(f"cannot write cache entry {final}: {exc}") from exc

    def discard(self, key: str) -> None:
        """Remove the entry for ``key``, if any."""
        try:
            self.entry_path(key).unlink()
        except FileNotFoundError:
            pass

    def info(self) -> dict[str, Any]:
        """Summary: ``directory``, ``entries``, ``total_bytes``, ``oldest``/``newest``
        (UTC datetimes of the entries' writes, None when empty) and
        ``temporary_files`` (writes in progress or left by killed writers)."""
        entries = total = temporary = 0
        times: list[float] = []
        for path in self._files(_ENTRY_SUFFIX):
            try:
                stat = path.stat()
            except FileNotFoundError:
                continue  # discarded meanwhile
            entries += 1
            total += stat.st_size
            times.append(stat.st_mtime)
        for _ in self._files(_TMP_SUFFIX):
            temporary += 1

        def as_datetime(stamp: float | None) -> _dt.datetime | None:
            return None if stamp is None else _dt.datetime.fromtimestamp(stamp, _dt.timezone.utc)

        return {
            "directory": str(self.directory),
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

    def _shards(self) -> list[pathlib.Path]:
        try:
            children = list(self.directory.iterdir())
        except FileNotFoundError:
            return []
        return [child for child in children if len(child.name) == 2 and child.is_dir()]

    def _files(self, suffix: str) -> list[pathlib.Path]:
        found = []
        for shard in self._shards():
            try:
                names = os.listdir(shard)
            except FileNotFoundError:
                continue
            found.extend(shard / name for name in names
                         if name.endswith(suffix) and _KEY_PATTERN.fullmatch(name.split(".", 1)[0]))
        return found


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


def _parse_entry(data: bytes, path: pathlib.Path, key: str) -> tuple[dict[str, Any], memoryview]:
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


def _check_pickle_versions(header: dict[str, Any], path: pathlib.Path) -> None:
    # Unpickling across minor versions can "work" and yield subtly broken objects.
    for name, current in (("python", platform.python_version()), ("pandas", pd.__version__)):
        written = str(header.get(name, ""))
        if written.split(".")[:2] != current.split(".")[:2]:
            raise CacheError(f"cache entry {path} was pickled under {name} {written or '?'}, "
                             f"this is {current}; it will be recomputed")
