"""Credentials stay out of everything flowyml shows or writes.

``storage_options`` (keys, secrets, tokens, SAS signatures) and passwords in
URLs travel to the workers inside the tasks that need them, as in Dask, but
never appear in a ``repr``, a message, a log record flowyml forwards or
emits, a report, a picture, a cache key or a file flowyml writes:

- :func:`redact_url` and :func:`redact_option` show a URL or an option without
  its secret parts;
- every object that holds ``storage_options`` hands them to :func:`remember`
  in the process that builds or unpickles it, and :func:`scrub` replaces the
  values remembered in this process in any text (error messages, forwarded
  worker logs) before flowyml passes it on.

A library's own logging (botocore at DEBUG prints request headers) is that
library's to configure.
"""

from __future__ import annotations

import re
import threading
import urllib.parse
from collections.abc import Mapping
from typing import Any

__all__ = ["SECRET_OPTIONS", "redact_option", "redact_url", "remember", "scrub"]

#: Options whose values are credentials: shown as names only.
SECRET_OPTIONS = frozenset({"storage_options"})

# Keys of storage_options whose values are credentials (s3fs: key, secret, token;
# gcsfs: token; adlfs: account_key, sas_token, connection_string, client_secret...).
_SECRET_NAME = re.compile(r"key|secret|token|passw|credential|sas|signature|connection_string", re.I)
_SHORTEST = 4  # shorter values would scrub ordinary words

_remembered: set[str] = set()
_lock = threading.Lock()
_pattern: re.Pattern[str] | None = None


def remember(storage_options: Mapping[str, Any] | None) -> None:
    """Note the credential values in ``storage_options`` (nested dicts too) for :func:`scrub`."""
    if not storage_options:
        return
    found = set(_secret_values(storage_options))
    if found - _remembered:
        global _pattern
        with _lock:
            _remembered.update(found)
            _pattern = re.compile("|".join(re.escape(value) for value in sorted(_remembered, key=len, reverse=True)))


def _secret_values(options: Mapping[str, Any], secret: bool = False) -> list[str]:
    values = []
    for name, value in options.items():
        is_secret = secret or bool(_SECRET_NAME.search(str(name)))
        if isinstance(value, Mapping):
            values.extend(_secret_values(value, is_secret))
        elif isinstance(value, str) and is_secret and len(value) >= _SHORTEST:
            values.append(value)
    return values


def scrub(text: str) -> str:
    """``text`` with every credential value remembered in this process replaced by ``***``.

    >>> remember({"key": "AKIAEXAMPLE", "secret": "wJalrXUtnFEMI"})
    >>> scrub("signed with AKIAEXAMPLE / wJalrXUtnFEMI")
    'signed with *** / ***'
    """
    pattern = _pattern
    if pattern is None or not text:
        return text
    return pattern.sub("***", text)


def redact_url(path: str) -> str:
    """``path`` as it may be shown: without a password or query values (signatures, tokens).

    >>> redact_url("s3://bucket/trips/*.csv")
    's3://bucket/trips/*.csv'
    >>> redact_url("https://user:hunter2@example.com/data.csv?sig=abc&sv=2024")
    'https://user:***@example.com/data.csv?sig=***&sv=***'
    """
    if "://" not in path:
        return path
    parts = urllib.parse.urlsplit(path)
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, host = netloc.rsplit("@", 1)
        if ":" in userinfo:
            userinfo = userinfo.split(":", 1)[0] + ":***"
        netloc = f"{userinfo}@{host}"
    query = "&".join(f"{name}=***" for name, _ in urllib.parse.parse_qsl(parts.query, keep_blank_values=True))
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


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
