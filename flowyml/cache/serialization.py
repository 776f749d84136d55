"""Cache payloads: how a task's value becomes the bytes of an entry, and back.

A ``pandas.DataFrame`` is stored as Parquet (pyarrow) when Parquet keeps it
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

import io
import pickle
from typing import Any

import cloudpickle
import pandas as pd

from flowyml.cache.fingerprint import type_name
from flowyml.exceptions import CacheError

__all__ = ["FORMATS", "deserialize", "serialize"]

#: The payload formats an entry may have.
FORMATS = ("parquet", "pickle")
# Rows round-tripped through Parquet before trusting it with a whole frame.
_PROBE_ROWS = 16


def serialize(value: Any) -> tuple[str, bytes | memoryview]:
    """The entry format (one of :data:`FORMATS`) and payload of ``value``.

    Raises
    ------
    CacheError
        ``value`` cannot be pickled (the message names its type).
    """
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
            f"a {type_name(value)} cannot be stored in the cache (not picklable: "
            f"{type(exc).__name__}: {exc}); the task runs uncached"
        ) from exc


def deserialize(fmt: str, payload: bytes | memoryview) -> Any:
    """The value of a payload :func:`serialize` made (any decoding error propagates)."""
    if fmt == "parquet":
        return pd.read_parquet(io.BytesIO(payload), engine="pyarrow")
    return pickle.loads(payload)


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
    # dtype == object compares numpy dtypes (dtype('O') == object), not classes: `is` would be wrong.
    return any(dtype == object for dtype in frame.dtypes) or any(  # noqa: E721
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
