"""Code fingerprints and the canonical encoding of values they and cache keys rest on.

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
* its default arguments and closure values (any value
  :func:`~flowyml.cache.keys.task_key` accepts; others, such as a lock or a
  connection, by their type only);
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

The canonical encoding (:func:`canonical`) turns a value into nested tuples of
primitives whose ``repr`` is deterministic; :func:`digest` hashes it. Keys
(:mod:`flowyml.cache.keys`) encode params with it too.
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
import linecache
import os
import pathlib
import re
import site
import sys
import sysconfig
import textwrap
import types
import uuid
from collections.abc import Callable
from typing import Any

import numpy as np
from dask.tokenize import TokenizationError, normalize_token, tokenize

from flowyml.exceptions import CacheError

__all__ = ["KEY_VERSION", "NotPlain", "Walk", "canonical", "code_fingerprint", "digest", "primitive", "type_name"]

# Bump when the canonical encoding changes: every old key then misses, none collides.
KEY_VERSION = 1
_MAX_DEPTH = 200


class Walk:
    """State of one canonical encoding: cycle protection and a per-call memo.

    ``id()`` is only used while the objects are alive and reachable from the value
    being encoded, never in the output, so results stay stable across processes.
    """

    def __init__(self) -> None:
        self.active: set[int] = set()
        self.memo: dict[int, Any] = {}
        self.depth = 0


class NotPlain(Exception):
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
    description = _describe_callable(func, Walk())
    return digest(("flowyml-code", KEY_VERSION, description))


def digest(description: Any) -> str:
    """SHA-256 hex digest of a canonical description (nested tuples of primitives)."""
    # repr of nested tuples of str/int/float/bool/None/bytes is deterministic and
    # unambiguous (strings are quoted and escaped).
    text = repr(description)
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def type_name(value: Any) -> str:
    """``module.QualifiedName`` of ``value``'s type, as messages and entry headers show it."""
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


def primitive(value: Any) -> tuple:
    return (type(value).__name__, repr(value))


def canonical(value: Any, walk: Walk, *, plain_only: bool) -> Any:
    """Deterministic, hashable description of a value (nested tuples of primitives).

    ``plain_only`` (used for globals) raises ``NotPlain`` for anything but plain
    data, numpy/pandas objects, functions and classes; otherwise arbitrary objects
    are described through their pickle recipe. Unencodable values raise CacheError.
    """
    kind = type(value)
    if kind in _PRIMITIVES:
        return primitive(value)
    if isinstance(value, enum.Enum):
        return ("enum", _class_reference(kind), value.name)
    if isinstance(value, _REPR_TYPES):
        return (type_name(value), repr(value))
    if isinstance(value, np.generic):
        return ("numpy-scalar", value.dtype.str, value.tobytes().hex())
    if isinstance(value, _CODE_TYPES):
        return _describe_callable(value, walk)
    identity = id(value)
    if identity in walk.active:
        return ("cycle", type_name(value))
    walk.depth += 1
    walk.active.add(identity)
    try:
        if walk.depth > _MAX_DEPTH:
            raise CacheError(f"the value nests deeper than {_MAX_DEPTH} levels")
        return _canonical_container(value, walk, plain_only=plain_only)
    finally:
        walk.active.discard(identity)
        walk.depth -= 1


def _canonical_container(value: Any, walk: Walk, *, plain_only: bool) -> Any:
    kind = type(value)

    def encode(item: Any) -> Any:
        return canonical(item, walk, plain_only=plain_only)

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
        raise NotPlain(type_name(value))
    if callable(value):
        # A callable object: its class's code and its state.
        return ("callable", _describe_callable(kind, walk), _canonical_state(value, walk))
    return ("object", _canonical_state(value, walk))


def _canonical_state(value: Any, walk: Walk) -> Any:
    """Describe an arbitrary object by what pickle would record: its recipe."""
    try:
        recipe = value.__reduce_ex__(4)
    except Exception as exc:
        raise CacheError(f"a {type_name(value)} cannot be described ({exc})") from exc
    if isinstance(recipe, str):  # a module-level singleton, pickled by name
        return ("global", type(value).__module__, recipe)
    recipe = list(recipe) + [None] * (6 - len(recipe))
    constructor, arguments, state, list_items, dict_items, _setter = recipe[:6]
    if list_items is not None:
        list_items = list(list_items)
    if dict_items is not None:
        dict_items = list(dict_items)
    return tuple(
        canonical(part, walk, plain_only=False)
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
            f"dask cannot tokenize a {type_name(value)} deterministically ({exc})"
        ) from exc


# ------------------------------------------------------------- code description


def _describe_callable(func: Any, walk: Walk) -> Any:
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


def _memoized(obj: Any, walk: Walk, describe: Callable[[Any, Walk], Any]) -> Any:
    identity = id(obj)
    if identity in walk.memo:
        return walk.memo[identity]
    if identity in walk.active:
        # Recursion (f calls f, or a method names its class): the name is enough,
        # the code is being described one level up.
        return ("cycle", getattr(obj, "__qualname__", type_name(obj)))
    walk.active.add(identity)
    try:
        walk.memo[identity] = description = describe(obj, walk)
    finally:
        walk.active.discard(identity)
    return description


def _describe_function(func: types.FunctionType, walk: Walk) -> Any:
    code = func.__code__
    closure: tuple[tuple[str, Any], ...] = ()
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


def _describe_value(value: Any, walk: Walk) -> Any:
    """Closure values and defaults: by value when encodable, else by type."""
    try:
        return canonical(value, walk, plain_only=False)
    except (CacheError, NotPlain, RecursionError):
        return ("opaque", type_name(value))


def _describe_globals(func: types.FunctionType, walk: Walk) -> tuple:
    namespace = func.__globals__
    described = []
    for name in sorted(_referenced_names(func.__code__)):
        if name not in namespace:  # a builtin, or an attribute name
            continue
        value = namespace[name]
        try:
            described.append((name, canonical(value, walk, plain_only=True)))
        except (CacheError, NotPlain, RecursionError):
            described.append((name, ("opaque", type_name(value))))
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
    return primitive(const)


def _source(code: types.CodeType) -> str | None:
    """The source of ``code``: what ``inspect.getsource(code)`` returns, without its cost.

    ``inspect`` first finds the module of the file, by resolving the path of
    every module loaded (about 850 ``realpath`` calls with pandas and Dask
    imported: 60 ms of an all-cached run). A code object names its file and
    first line (its first decorator's) itself: its block is read from there.
    Where ``linecache`` cannot read the file alone (a module from a zip
    archive, which needs its loader), ``inspect`` still does.
    """
    lines = linecache.getlines(code.co_filename)
    first = code.co_firstlineno - 1
    if lines and 0 <= first < len(lines) and _DEFINITION.match(lines[first]):
        return "".join(inspect.getblock(lines[first:]))
    try:
        return inspect.getsource(code)  # a code object: no __wrapped__ unwrapping
    except (OSError, TypeError, IndexError):
        return None


#: The line a function's code object starts at: its ``def`` or first decorator.
_DEFINITION = re.compile(r"^(\s*def\s)|(\s*async\s+def\s)|^(\s*@)")


def _source_description(code: types.CodeType) -> Any:
    """The function's source as an AST dump, or None (lambdas, no source)."""
    if code.co_name == "<lambda>":
        return None  # the source line may hold other lambdas: bytecode decides
    source = _source(code)
    if source is None:
        return None
    try:
        tree = ast.parse(textwrap.dedent(source))
    except SyntaxError:
        return None
    node = tree.body[0] if len(tree.body) == 1 else tree
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        node.decorator_list = []
    return ast.dump(node, include_attributes=False)


def _describe_class(cls: type, walk: Walk) -> Any:
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
                members.append((name, canonical(member, walk, plain_only=True)))
            except (CacheError, NotPlain, RecursionError):
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
