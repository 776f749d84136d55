"""Content-addressed task cache: keys from code, params and inputs; atomic, verified entries.

How the core uses it
--------------------
On the driver, before anything runs, every task gets a key, bottom-up::

    fingerprint = code_fingerprint(step_function)          # once per step
    key = task_key(fingerprint, bound_params, input_keys)  # per task (per partition)

``input_keys`` lists, in order, the keys of the upstream tasks, or for a source
partition its identity tuple ``(path, size, mtime_ns, offset, length)``, never its
index. Tasks whose key ``Cache.contains`` become "load from cache" tasks; the others
compute and call ``Cache.store`` on the worker that computed them. ``Cache.load``
raises :class:`~flowyml.exceptions.CacheError` for a missing, truncated, corrupt or
unreadable entry; the caller warns and recomputes.

What a fingerprint covers
-------------------------
``code_fingerprint(func)`` hashes:

* the function's source, parsed and dumped as an AST, so comments, blank lines and
  formatting do not count, and neither do the decorators of the function itself
  (``@step(retries=2)`` is configuration, not computation);
* its bytecode, recursively through nested functions, lambdas and comprehensions,
  without line numbers. For functions with no source (a REPL, ``python -c``,
  ``exec``) and for lambdas (several lambdas can share one source line) this is the
  only code part. Docstrings are constants of the bytecode, so editing one counts;
* its default arguments and closure values (any value :func:`task_key` accepts;
  others, such as a lock or a connection, by their type only);
* the module globals it (or a nested function) references, when they are plain data
  (numbers, strings, bytes, None, enums, dates, paths, tuples/lists/dicts/sets of
  those, dataclasses of those), numpy arrays or pandas objects (by content), or
  functions and classes of the user's own code (recursively, each once: recursion is
  safe), including callable objects that set ``__wrapped__`` (``functools.wraps``,
  ``@step``), by the wrapped function. Other globals (modules, loggers, clients)
  count by their type only.

Code of installed packages and the standard library (files under ``site-packages``
or the interpreter's prefix) counts by its qualified name only: upgrading pandas
does not invalidate the cache; clear it if that matters. Attribute constants reached
through a module (``config.THRESHOLD``) are not followed either. Fingerprints are
stable across processes and sessions of the same Python minor version (no ``id()``,
no ``hash()``; sets are sorted). A different Python version changes the bytecode,
hence the keys.

Keys
----
``task_key`` is a SHA-256 hex digest over a canonical text encoding of the
fingerprint, each param (by name) and each input. Params are encoded by value:
plain data as above (dict order kept, set order not), numpy/pandas objects through
``dask.tokenize`` (with ``ensure_deterministic``), functions by their fingerprint,
other objects through their pickle recipe (``__reduce_ex__``), whose parts must be
encodable in turn. A param that cannot be encoded raises ``CacheError`` naming it.

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

Payloads: a ``pandas.DataFrame`` is stored as Parquet (pyarrow) when Parquet keeps it
exactly (dtypes, index, column labels, ``attrs``): frames with ``object`` columns or
an ``object`` index go to pickle, and every other frame is first round-tripped on its
first rows; any difference sends it to pickle too. Everything else, Series included,
is pickled (protocol 5; cloudpickle when plain pickle cannot, e.g. lambdas). A pickle
written by another Python or pandas minor version is treated as unreadable (recomputed)
rather than trusted.

.. warning::
   Loading a pickle runs code chosen by whoever wrote it. Never point flowyml at a
   cache directory that people you do not trust can write to.
"""

from __future__ import annotations

import ast
import collections
import dataclasses
import datetime as _dt
import decimal
import enum
import fractions
import functools
import hashlib
import inspect
import io
import json
import os
import pathlib
import pickle
import platform
import re
import secrets
import site
import struct
import sys
import sysconfig
import textwrap
import types
import uuid
from typing import Any, Callable

import cloudpickle
import numpy as np
import pandas as pd
import pyarrow
from dask.tokenize import TokenizationError, normalize_token, tokenize

from flowyml.exceptions import CacheError

__all__ = ["Cache", "code_fingerprint", "default_cache_dir", "task_key"]

#: Environment variable naming the cache directory when none is given explicitly.
CACHE_DIR_ENV = "FLOWYML_CACHE_DIR"

_MAGIC = b"FLOWYMLC"
_HEADER_LENGTH = struct.Struct(">I")
_ENTRY_FORMAT_VERSION = 1
_ENTRY_SUFFIX = ".entry"
_TMP_SUFFIX = ".tmp"
# Bump when the canonical encoding changes: every old key then misses, none collides.
_KEY_VERSION = 1
# Keys become file names: refuse anything that could escape the shard directory.
_KEY_PATTERN = re.compile(r"[0-9A-Za-z_-]{4,200}")
# Rows round-tripped through Parquet before trusting it with a whole frame.
_PROBE_ROWS = 16
_MAX_DEPTH = 200
_CACHEDIR_TAG = (
    "Signature: 8a477f597d28d172789f06886806bc55\n"
    "# This file marks a flowyml task cache; backup tools may skip this directory.\n"
)


# --------------------------------------------------------------------------- keys


class _Walk:
    """State of one canonical encoding: cycle protection and a per-call memo.

    ``id()`` is only used while the objects are alive and reachable from the value
    being encoded, never in the output, so results stay stable across processes.
    """

    def __init__(self) -> None:
        self.active: set[int] = set()
        self.memo: dict[int, Any] = {}
        self.depth = 0


class _NotPlain(Exception):
    """A global that is not plain data; it counts by its type only."""


def code_fingerprint(func: Callable[..., Any]) -> str:
    """Hash of what a function computes: its code, defaults, closure and globals.

    Parameters
    ----------
    func : callable
        A function, lambda, ``functools.partial``, bound method or callable object.

    Returns
    -------
    str
        A 64-character hex digest, identical in every process and session that runs
        the same code under the same Python minor version.

    Raises
    ------
    TypeError
        If ``func`` is not callable.

    Notes
    -----
    See the module docstring for exactly what counts (comments and the function's
    own decorators do not; body, defaults, closure values and plain-data globals do).

    Examples
    --------
    >>> def double(x):
    ...     return 2 * x
    >>> def triple(x):
    ...     return 3 * x
    >>> len(code_fingerprint(double)), code_fingerprint(double) == code_fingerprint(triple)
    (64, False)
    """
    if not callable(func):
        raise TypeError(f"code_fingerprint needs a callable, got {type(func).__qualname__}")
    description = _describe_callable(func, _Walk())
    return _digest(("flowyml-code", _KEY_VERSION, description))


def task_key(fingerprint: str, params: dict[str, Any], inputs: list[Any]) -> str:
    """Cache key of one task: its step's code, its params and its inputs.

    Parameters
    ----------
    fingerprint : str
        ``code_fingerprint`` of the step's function.
    params : dict
        The bound parameter values, by name (order does not matter).
    inputs : list
        In order: upstream task keys (str), or for a source partition its identity
        tuple ``(path, size, mtime_ns, offset, length)`` (paths may be ``PathLike``).

    Returns
    -------
    str
        A 64-character hex digest (SHA-256), the same in every process.

    Raises
    ------
    CacheError
        If a param or an input cannot be encoded deterministically; the message
        names it. The caller should run that task uncached.

    Examples
    --------
    >>> key = task_key("f" * 64, {"chunk_id": 3}, [("data/a.csv", 120, 17, 0, None)])
    >>> key == task_key("f" * 64, {"chunk_id": 3}, [("data/a.csv", 120, 17, 0, None)])
    True
    >>> key == task_key("f" * 64, {"chunk_id": 4}, [("data/a.csv", 120, 17, 0, None)])
    False
    """
    if not isinstance(fingerprint, str):
        raise TypeError(
            f"task_key: fingerprint must be a str, got {type(fingerprint).__qualname__}"
        )
    encoded_params = []
    for name in sorted(params):
        try:
            encoded = _canonical(params[name], _Walk(), plain_only=False)
        except (CacheError, _NotPlain, RecursionError) as exc:
            raise CacheError(
                f"param {name!r} (a {_type_name(params[name])}) cannot be turned into a "
                f"cache key: {exc}. Pass plain data (numbers, strings, lists, dicts, "
                f"numpy/pandas objects) or give the class a __dask_tokenize__ method; "
                f"the task runs uncached meanwhile."
            ) from exc
        encoded_params.append((name, encoded))
    encoded_inputs = [_encode_input(position, item) for position, item in enumerate(inputs)]
    return _digest(("flowyml-task", _KEY_VERSION, fingerprint, encoded_params, encoded_inputs))


def _encode_input(position: int, item: Any) -> tuple:
    if isinstance(item, str):
        return ("key", item)
    if isinstance(item, (tuple, list)):
        parts = []
        for part in item:
            if isinstance(part, os.PathLike):
                part = os.fspath(part)
            if part is not None and not isinstance(part, (str, bytes, int, float)):
                raise CacheError(
                    f"input {position} of the task: identity tuple {item!r} holds a "
                    f"{_type_name(part)}; expected (path, size, mtime_ns, offset, length)."
                )
            parts.append(_primitive(part))
        return ("identity", tuple(parts))
    raise CacheError(
        f"input {position} of the task is a {_type_name(item)}; expected an upstream "
        f"task key (str) or a partition identity tuple (path, size, mtime_ns, offset, length)."
    )


def _digest(description: Any) -> str:
    # repr of nested tuples of str/int/float/bool/None/bytes is deterministic and
    # unambiguous (strings are quoted and escaped).
    text = repr(description)
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def _type_name(value: Any) -> str:
    kind = type(value)
    return f"{kind.__module__}.{kind.__qualname__}"


_PRIMITIVES = (type(None), bool, int, float, complex, str, bytes, type(Ellipsis))
_REPR_TYPES = (
    _dt.datetime,
    _dt.date,
    _dt.time,
    _dt.timedelta,
    _dt.timezone,
    decimal.Decimal,
    fractions.Fraction,
    pathlib.PurePath,
    uuid.UUID,
    range,
    slice,
)


_BUILTIN_CALLABLES = (
    types.BuiltinFunctionType,
    types.MethodDescriptorType,
    types.WrapperDescriptorType,
    types.MethodWrapperType,
    types.ClassMethodDescriptorType,
)
_CODE_TYPES = (
    types.FunctionType,
    types.MethodType,
    functools.partial,
    type,
    types.ModuleType,
    *_BUILTIN_CALLABLES,
)


def _primitive(value: Any) -> tuple:
    return (type(value).__name__, repr(value))


def _canonical(value: Any, walk: _Walk, *, plain_only: bool) -> Any:
    """Deterministic, hashable description of a value (nested tuples of primitives).

    ``plain_only`` (used for globals) raises ``_NotPlain`` for anything but plain
    data, numpy/pandas objects, functions and classes; otherwise arbitrary objects
    are described through their pickle recipe. Unencodable values raise CacheError.
    """
    kind = type(value)
    if kind in _PRIMITIVES:
        return _primitive(value)
    if isinstance(value, enum.Enum):
        return ("enum", _class_reference(kind), value.name)
    if isinstance(value, _REPR_TYPES):
        return (_type_name(value), repr(value))
    if isinstance(value, np.generic):
        return ("numpy-scalar", value.dtype.str, value.tobytes().hex())
    if isinstance(value, _CODE_TYPES):
        return _describe_callable(value, walk)
    identity = id(value)
    if identity in walk.active:
        return ("cycle", _type_name(value))
    walk.depth += 1
    walk.active.add(identity)
    try:
        if walk.depth > _MAX_DEPTH:
            raise CacheError(f"the value nests deeper than {_MAX_DEPTH} levels")
        return _canonical_container(value, walk, plain_only=plain_only)
    finally:
        walk.active.discard(identity)
        walk.depth -= 1


def _canonical_container(value: Any, walk: _Walk, *, plain_only: bool) -> Any:
    kind = type(value)

    def encode(item: Any) -> Any:
        return _canonical(item, walk, plain_only=plain_only)

    if kind in (tuple, list):
        return (kind.__name__, tuple(encode(item) for item in value))
    if isinstance(value, tuple) and hasattr(kind, "_fields"):  # namedtuple
        return ("namedtuple", _class_reference(kind), tuple(encode(item) for item in value))
    if isinstance(value, dict) and kind.__module__ in ("builtins", "collections"):
        # Insertion order is kept: user code may depend on it.
        items = tuple((encode(k), encode(v)) for k, v in value.items())
        if isinstance(value, collections.defaultdict):
            return (kind.__name__, encode(value.default_factory), items)
        return (kind.__name__, items)
    if kind in (set, frozenset):
        return (kind.__name__, tuple(sorted((encode(item) for item in value), key=repr)))
    if dataclasses.is_dataclass(value):
        fields = tuple(
            (field.name, encode(getattr(value, field.name))) for field in dataclasses.fields(value)
        )
        return ("dataclass", _describe_callable(kind, walk), fields)
    if _dask_knows(value):
        return ("dask", _dask_token(value))
    wrapped = getattr(value, "__wrapped__", None)
    if callable(value) and isinstance(wrapped, types.FunctionType):
        # A decorated helper such as another @step: its code is the wrapped function's.
        return ("wraps", _describe_callable(wrapped, walk))
    if plain_only:
        raise _NotPlain(_type_name(value))
    if callable(value):
        # A callable object: its class's code and its state.
        return ("callable", _describe_callable(kind, walk), _canonical_state(value, walk))
    return ("object", _canonical_state(value, walk))


def _canonical_state(value: Any, walk: _Walk) -> Any:
    """Describe an arbitrary object by what pickle would record: its recipe."""
    try:
        recipe = value.__reduce_ex__(4)
    except Exception as exc:
        raise CacheError(f"a {_type_name(value)} cannot be described ({exc})") from exc
    if isinstance(recipe, str):  # a module-level singleton, pickled by name
        return ("global", type(value).__module__, recipe)
    recipe = list(recipe) + [None] * (6 - len(recipe))
    constructor, arguments, state, list_items, dict_items, _setter = recipe[:6]
    if list_items is not None:
        list_items = list(list_items)
    if dict_items is not None:
        dict_items = list(dict_items)
    return tuple(
        _canonical(part, walk, plain_only=False)
        for part in (constructor, arguments, state, list_items, dict_items)
    )


def _dask_knows(value: Any) -> bool:
    """True for objects dask tokenizes by content (numpy, pandas, ...)."""
    if hasattr(value, "__dask_tokenize__"):
        return True
    handler = normalize_token.dispatch(type(value))
    # normalize_object pickles the object, which is not stable for classes defined
    # in __main__ (cloudpickle embeds a random id); we use the pickle recipe instead.
    return getattr(handler, "__name__", "") != "normalize_object"


def _dask_token(value: Any) -> str:
    try:
        return tokenize(value, ensure_deterministic=True)
    except TokenizationError as exc:
        raise CacheError(
            f"dask cannot tokenize a {_type_name(value)} deterministically ({exc})"
        ) from exc


# ------------------------------------------------------------- code description


def _describe_callable(func: Any, walk: _Walk) -> Any:
    """Describe a function, class, module or other callable for a fingerprint."""
    if isinstance(func, types.ModuleType):
        return ("module", func.__name__)
    if isinstance(func, functools.partial):
        return (
            "partial",
            _describe_callable(func.func, walk),
            _describe_value(func.args, walk),
            _describe_value(func.keywords, walk),
        )
    if isinstance(func, types.MethodType):
        return (
            "method",
            _describe_callable(func.__func__, walk),
            _describe_value(func.__self__, walk),
        )
    if isinstance(func, types.FunctionType):
        if not _is_user_code(func.__code__.co_filename):
            return ("function-ref", func.__module__, func.__qualname__)
        return _memoized(func, walk, _describe_function)
    if isinstance(func, type):
        if not _is_user_module(func.__module__):
            return _class_reference(func)
        return _memoized(func, walk, _describe_class)
    if isinstance(func, _BUILTIN_CALLABLES):
        owner = getattr(func, "__self__", None)
        module = getattr(func, "__module__", None) or getattr(type(owner), "__module__", "")
        bound = None
        if owner is not None and not isinstance(owner, (types.ModuleType, type)):
            bound = _describe_value(owner, walk)  # ",".join and ";".join differ
        return ("builtin", module, getattr(func, "__qualname__", repr(func)), bound)
    # A callable object (an instance with __call__).
    return ("callable", _describe_callable(type(func), walk), _describe_value(func, walk))


def _memoized(obj: Any, walk: _Walk, describe: Callable[[Any, _Walk], Any]) -> Any:
    identity = id(obj)
    if identity in walk.memo:
        return walk.memo[identity]
    if identity in walk.active:
        # Recursion (f calls f, or a method names its class): the name is enough,
        # the code is being described one level up.
        return ("cycle", getattr(obj, "__qualname__", _type_name(obj)))
    walk.active.add(identity)
    try:
        walk.memo[identity] = description = describe(obj, walk)
    finally:
        walk.active.discard(identity)
    return description


def _describe_function(func: types.FunctionType, walk: _Walk) -> Any:
    code = func.__code__
    closure = ()
    if func.__closure__:
        cells = []
        for name, cell in zip(code.co_freevars, func.__closure__):
            try:
                contents = cell.cell_contents
            except ValueError:  # a cell not filled yet
                cells.append((name, "empty-cell"))
                continue
            cells.append((name, _describe_value(contents, walk)))
        closure = tuple(cells)
    return (
        "function",
        _source_description(code),
        _describe_code(code),
        _describe_value(func.__defaults__, walk),
        _describe_value(func.__kwdefaults__, walk),
        closure,
        _describe_globals(func, walk),
    )


def _describe_value(value: Any, walk: _Walk) -> Any:
    """Closure values and defaults: by value when encodable, else by type."""
    try:
        return _canonical(value, walk, plain_only=False)
    except (CacheError, _NotPlain, RecursionError):
        return ("opaque", _type_name(value))


def _describe_globals(func: types.FunctionType, walk: _Walk) -> tuple:
    namespace = func.__globals__
    described = []
    for name in sorted(_referenced_names(func.__code__)):
        if name not in namespace:  # a builtin, or an attribute name
            continue
        value = namespace[name]
        try:
            described.append((name, _canonical(value, walk, plain_only=True)))
        except (CacheError, _NotPlain, RecursionError):
            described.append((name, ("opaque", _type_name(value))))
    return tuple(described)


def _referenced_names(code: types.CodeType) -> set[str]:
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _referenced_names(const)
    return names


def _describe_code(code: types.CodeType) -> tuple:
    # Line numbers (co_firstlineno, co_linetable) and the file name are left out:
    # moving a function or editing comments above it changes nothing it computes.
    return (
        "code",
        code.co_name,
        code.co_argcount,
        code.co_posonlyargcount,
        code.co_kwonlyargcount,
        code.co_flags,
        code.co_code.hex(),
        getattr(code, "co_exceptiontable", b"").hex(),
        tuple(_describe_constant(const) for const in code.co_consts),
        code.co_names,
        code.co_varnames,
        code.co_freevars,
        code.co_cellvars,
    )


def _describe_constant(const: Any) -> Any:
    if isinstance(const, types.CodeType):
        return _describe_code(const)
    if isinstance(const, (tuple, frozenset)):
        items = tuple(_describe_constant(item) for item in const)
        if isinstance(const, frozenset):  # `x in {"a", "b"}`: order follows hash()
            items = tuple(sorted(items, key=repr))
        return (type(const).__name__, items)
    return _primitive(const)


def _source_description(code: types.CodeType) -> Any:
    """The function's source as an AST dump, or None (lambdas, no source)."""
    if code.co_name == "<lambda>":
        return None  # the source line may hold other lambdas: bytecode decides
    try:
        source = inspect.getsource(code)  # a code object: no __wrapped__ unwrapping
    except (OSError, TypeError, IndexError):
        return None
    try:
        tree = ast.parse(textwrap.dedent(source))
    except SyntaxError:
        return None
    node = tree.body[0] if len(tree.body) == 1 else tree
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        node.decorator_list = []
    return ast.dump(node, include_attributes=False)


def _describe_class(cls: type, walk: _Walk) -> Any:
    members = []
    for name, member in sorted(vars(cls).items()):
        # ``__slotnames__`` is a cache copyreg adds to the class the first time an
        # instance is pickled (or described): not code, and it would change the key.
        if name in ("__dict__", "__weakref__", "__module__", "__qualname__", "__doc__", "__slotnames__"):
            continue
        if isinstance(member, (staticmethod, classmethod)):
            member = member.__func__
        if isinstance(member, property):
            members.append((name, tuple(
                _describe_callable(part, walk) if part is not None else None
                for part in (member.fget, member.fset, member.fdel)
            )))
        elif isinstance(member, types.FunctionType):
            members.append((name, _describe_callable(member, walk)))
        else:
            try:
                members.append((name, _canonical(member, walk, plain_only=True)))
            except (CacheError, _NotPlain, RecursionError):
                continue  # descriptors, enum internals...: the methods carry the code
    bases = tuple(_describe_callable(base, walk) for base in cls.__bases__ if base is not object)
    return ("class", cls.__qualname__, bases, tuple(members))


def _class_reference(cls: type) -> tuple:
    return ("class-ref", cls.__module__, cls.__qualname__)


@functools.lru_cache(maxsize=1)
def _library_roots() -> tuple[str, ...]:
    """Directories of installed code: the standard library and site-packages."""
    paths = {sysconfig.get_paths()[name] for name in ("stdlib", "platstdlib", "purelib", "platlib")}
    paths.update(site.getsitepackages())
    paths.add(site.getusersitepackages())
    return tuple(sorted({os.path.join(os.path.realpath(path), "") for path in paths if path}))


@functools.lru_cache(maxsize=4096)
def _is_user_code(filename: str) -> bool:
    """Code from the REPL, notebooks, scripts and source checkouts; not installed code."""
    if not filename or filename.startswith("<"):
        return True
    real = os.path.realpath(filename)
    return not any(real.startswith(root) for root in _library_roots())


def _is_user_module(module_name: str) -> bool:
    if module_name in ("__main__", "__mp_main__"):
        return True
    filename = getattr(sys.modules.get(module_name), "__file__", None)
    return filename is not None and _is_user_code(filename)


# ------------------------------------------------------------------ the store


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
            if header["format"] == "parquet":
                return pd.read_parquet(io.BytesIO(payload), engine="pyarrow")
            return pickle.loads(payload)
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
        fmt, payload = _serialize(value)
        header = {
            "flowyml_cache": _ENTRY_FORMAT_VERSION,
            "key": key,
            "format": fmt,
            "type": _type_name(value),
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
    if header["format"] not in ("parquet", "pickle"):
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


# -------------------------------------------------------------- serialization


def _serialize(value: Any) -> tuple[str, bytes | memoryview]:
    if type(value) is pd.DataFrame:
        parquet = _parquet_bytes(value)
        if parquet is not None:
            return "parquet", parquet
    try:
        return "pickle", pickle.dumps(value, protocol=5)
    except Exception:
        pass  # lambdas, local classes...: cloudpickle pickles them by value
    try:
        return "pickle", cloudpickle.dumps(value, protocol=5)
    except Exception as exc:
        raise CacheError(
            f"a {_type_name(value)} cannot be stored in the cache (not picklable: "
            f"{type(exc).__name__}: {exc}); the task runs uncached"
        ) from exc


def _parquet_bytes(frame: pd.DataFrame) -> memoryview | None:
    """Parquet bytes of ``frame`` if Parquet gives it back exactly, else None."""
    if _has_object_dtype(frame):
        return None  # object columns come back retyped (e.g. as str) or not at all
    head = frame.iloc[:_PROBE_ROWS]
    try:
        probe = _to_parquet(head)
        if not _identical(pd.read_parquet(io.BytesIO(probe), engine="pyarrow"), head):
            return None
        return probe if len(frame) <= _PROBE_ROWS else _to_parquet(frame)
    except Exception:  # pyarrow refuses the frame (sparse, complex, duplicate names...)
        return None


def _to_parquet(frame: pd.DataFrame) -> memoryview:
    buffer = io.BytesIO()
    frame.to_parquet(buffer, engine="pyarrow")
    return buffer.getbuffer()


def _has_object_dtype(frame: pd.DataFrame) -> bool:
    indexes = [frame.index, frame.columns]
    levels = [level for index in indexes
              for level in (index.levels if isinstance(index, pd.MultiIndex) else [index])]
    return any(dtype == object for dtype in frame.dtypes) or any(
        level.dtype == object and not _all_strings(level) for level in levels
    )


def _all_strings(level: pd.Index) -> bool:
    """True for an object index of strings only, no missing value.

    pandas < 3 gives string labels the object dtype (pandas 3 the str dtype),
    so without this no frame with named columns would be stored as Parquet
    there. Parquet brings every string of such an index back as the same type,
    so the probe on the first rows answers for the whole index.
    """
    return pd.api.types.infer_dtype(level, skipna=False) == "string"


def _identical(got: pd.DataFrame, want: pd.DataFrame) -> bool:
    try:
        pd.testing.assert_frame_equal(
            got, want, check_exact=True, check_index_type=True, check_column_type=True,
            check_freq=True, check_flags=True, check_categorical=True,
        )
    except AssertionError:
        return False
    return (
        got.attrs == want.attrs
        and [type(label) for label in got.columns] == [type(label) for label in want.columns]
        and [type(label) for label in got.index] == [type(label) for label in want.index]
    )
