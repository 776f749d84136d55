"""Filesystems and paths: where a source's files live, and how paths are shown.

Everything that touches fsspec or decides how a path appears in a message is
here, so that other storage (fsspec URLs such as ``s3://``, with
``storage_options``) plugs in at one seam: :func:`filesystem_for` finds the
filesystem of a path, :func:`stat_file` what identifies a file's version,
:func:`full_path` and :func:`display_path` how a path is stored and shown, and
:func:`redact_option` keeps credentials out of reprs and messages.
"""

from __future__ import annotations

import os
from typing import Any

from fsspec.core import url_to_fs

__all__ = ["SECRET_OPTIONS", "display_path", "filesystem_for", "full_path", "is_local", "is_url",
           "redact_option", "stat_file"]


def filesystem_for(path: str) -> tuple[Any, str]:
    """The fsspec filesystem that holds ``path`` (a local path or a URL), and the path within it."""
    return url_to_fs(path)


#: Options whose values are credentials: shown as names only.
SECRET_OPTIONS = frozenset({"storage_options"})


def redact_option(name: str, value: Any) -> Any:
    """``value`` as it may be shown: the keys of ``storage_options``, never their values.

    >>> redact_option("storage_options", {"key": "AKIA...", "secret": "s3cr3t"})
    {'key': '***', 'secret': '***'}
    >>> redact_option("sep", ";")
    ';'
    """
    if name in SECRET_OPTIONS and isinstance(value, dict):
        return {key: "***" for key in value}
    if name in SECRET_OPTIONS and value is not None:
        return "***"
    return value


def is_url(path: str) -> bool:
    """A path on another filesystem than the local one (``s3://...``; ``file://`` is local)."""
    return "://" in path and not path.startswith("file://")


def stat_file(fs: Any, path: str) -> tuple[int, int | str]:
    """``(size, version)`` of a file: its modification time in ns locally, else ``fs.ukey``."""
    if is_local(fs):
        stat = os.stat(path)
        return stat.st_size, stat.st_mtime_ns
    return int(fs.size(path)), str(fs.ukey(path))


def is_local(fs: Any) -> bool:
    """``fs`` is the local filesystem."""
    protocol = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    return "file" in protocol or "local" in protocol


def full_path(fs: Any, path: str) -> str:
    """``path`` as a partition records it: a local path, else a URL with its protocol."""
    return path if is_local(fs) else fs.unstrip_protocol(path)


def display_path(path: str) -> str:
    """``path`` as messages show it: relative to the working directory when below it."""
    if is_url(path):
        return path
    try:
        relative = os.path.relpath(path)
    except ValueError:  # another drive on Windows
        return path
    return path if relative.startswith("..") else relative
