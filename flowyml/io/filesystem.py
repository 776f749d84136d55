"""Filesystems and paths: where data lives, what identifies a file's version, and how paths are shown.

Every path flowyml reads or writes may be a local path or an fsspec URL
(``s3://``, ``gs://``, ``abfs://``, ``memory://``, ``file://``...), with
``storage_options`` as pandas and Dask take them. Everything that touches
fsspec or decides how a path appears in a message is here:

- :func:`filesystem_for` finds a path's filesystem, and turns fsspec's
  errors (an unknown scheme, a missing package such as s3fs) into a
  :class:`~flowyml.exceptions.StorageError` that says what to install;
- :func:`storage_error` does the same for a missing bucket or denied access;
- :func:`file_version` says what identifies a file's content (its size and
  modification time locally, its ETag or generation on object stores);
- :func:`display_path` shows paths without secrets (:mod:`flowyml.secrets`).

Credentials travel to workers inside the tasks that need them (as in Dask);
they are never part of a message, a report, a cache key or a file flowyml writes.
"""

from __future__ import annotations

import os
import re
from typing import Any

from flowyml.exceptions import StorageError
from flowyml.secrets import SECRET_OPTIONS, redact_option, redact_url, remember

__all__ = [
    "SECRET_OPTIONS",
    "display_path",
    "file_version",
    "filesystem_for",
    "full_path",
    "is_local",
    "is_url",
    "redact_option",
    "redact_url",
    "storage_error",
]

#: URL scheme -> (the package fsspec needs for it, flowyml's extra that installs it).
PACKAGES = {
    "s3": ("s3fs", "s3"),
    "s3a": ("s3fs", "s3"),
    "gs": ("gcsfs", "gcs"),
    "gcs": ("gcsfs", "gcs"),
    "abfs": ("adlfs", "azure"),
    "abfss": ("adlfs", "azure"),
    "az": ("adlfs", "azure"),
    "adl": ("adlfs", "azure"),
}

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+)://")


def scheme_of(path: str) -> str | None:
    """``"s3"`` for ``s3://bucket/key``; None for a local path (a Windows drive is no scheme)."""
    match = _SCHEME.match(path)
    return match[1].lower() if match else None


def is_url(path: str) -> bool:
    """A path on another filesystem than the local one (``s3://...``; ``file://`` is local)."""
    scheme = scheme_of(path)
    return scheme is not None and scheme not in ("file", "local")


def filesystem_for(path: str, storage_options: dict[str, Any] | None = None, *,
                   who: str = "") -> tuple[Any, str]:
    """The fsspec filesystem that holds ``path`` and the path within it.

    ``who`` names the source, sink or cache in errors (``"source 'trips'"``).

    Raises
    ------
    StorageError
        The scheme is unknown, or the package for it is not installed (the
        message names the package and flowyml's extra that brings it).
    """
    from fsspec.core import url_to_fs

    remember(storage_options)
    try:
        return url_to_fs(path, **(storage_options or {}))
    except ImportError as exc:
        scheme = scheme_of(path) or "file"
        package, extra = PACKAGES.get(scheme, (None, None))
        fix = (f'pip install "flowyml[{extra}]" (or pip install {package})' if package
               else f"install the fsspec implementation for {scheme}://")
        raise StorageError(f"{_prefix(who)}{redact_url(path)} needs a package that is not installed: "
                           f"{exc}; {fix}") from exc
    except ValueError as exc:
        if "protocol" not in str(exc).lower():
            raise StorageError(f"{_prefix(who)}{redact_url(path)}: {exc}") from exc
        known = ", ".join(f"{name}://" for name in ("s3", "gs", "abfs", "memory", "file", "http"))
        raise StorageError(
            f"{_prefix(who)}{redact_url(path)}: unknown URL scheme {scheme_of(path)!r}; "
            f"use a local path or an fsspec URL ({known}...)"
        ) from exc
    except TypeError as exc:  # an option the filesystem does not take
        raise StorageError(f"{_prefix(who)}{redact_url(path)}: storage_options do not fit its filesystem: "
                           f"{exc}") from exc


def storage_error(exc: BaseException, who: str, path: str) -> StorageError:
    """A StorageError for an error touching ``path``: missing bucket or folder, access denied..."""
    shown = redact_url(path)
    if isinstance(exc, PermissionError):
        detail = (f"access denied ({exc}); check the credentials (storage_options=, or the "
                  f"environment as for pandas: AWS_*, GOOGLE_APPLICATION_CREDENTIALS, AZURE_*)")
    elif isinstance(exc, FileNotFoundError):
        detail = f"it does not exist ({exc}); check the bucket or folder name"
    else:
        detail = f"{type(exc).__name__}: {exc}"
    return StorageError(f"{_prefix(who)}cannot use {shown}: {detail}")


def _prefix(who: str) -> str:
    return f"{who}: " if who else ""


#: Keys of an fsspec ``info`` dict that change whenever an object's content does, best first.
_VERSION_KEYS = ("VersionId", "generation", "ETag", "etag", "md5Hash", "LastModified", "last_modified",
                 "mtime", "created")


def file_version(fs: Any, path: str, info: dict[str, Any] | None = None) -> tuple[int, int | str]:
    """``(size, version)`` of a file: its modification time in ns locally, else its ETag or generation.

    ``info`` (from a listing) saves asking the filesystem again.
    """
    if is_local(fs):
        stat = os.stat(path)
        return stat.st_size, stat.st_mtime_ns
    if info is None:
        info = fs.info(path)
    found = [f"{key}={_comparable(info[key])}" for key in _VERSION_KEYS if info.get(key) not in (None, "")]
    version = found[0] if found else str(fs.ukey(path))
    return int(info.get("size") or 0), version


def _comparable(value: Any) -> str:
    # A listing and a HEAD may give one time as a float and as a datetime.
    if hasattr(value, "timestamp"):
        value = value.timestamp()
    return f"{value:.6f}" if isinstance(value, float) else str(value)


def is_local(fs: Any) -> bool:
    """``fs`` is the local filesystem."""
    protocol = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    return "file" in protocol or "local" in protocol


def full_path(fs: Any, path: str) -> str:
    """``path`` as a partition records it: a local path, else a URL with its protocol."""
    return path if is_local(fs) else fs.unstrip_protocol(path)


def display_path(path: str) -> str:
    """``path`` as messages show it: relative to the working directory when below it; URLs redacted."""
    if is_url(path):
        return redact_url(path)
    try:
        relative = os.path.relpath(path)
    except ValueError:  # another drive on Windows
        return path
    return path if relative.startswith("..") else relative
